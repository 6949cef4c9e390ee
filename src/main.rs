//! The `scand` command: run the daemon, check a config file, or talk to a running daemon.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use scand::config::Config;

/// jemalloc for Rust and, through its unprefixed `malloc`, for RocksDB's C++ allocations too:
/// the writer allocates a group on one thread and the syncer frees it on another, a pattern
/// glibc's per-thread arenas handle badly (alternating A/B in BENCHMARKS.md: 14 % more
/// throughput and shorter p99 tails than glibc).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// scand ingests parcel scans over gRPC, deduplicates and orders them per tracking number in
/// RocksDB, derives each shipment's status and publishes every status change.
#[derive(Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon until SIGTERM or SIGINT.
    Run {
        /// Config file (TOML). SCAND_* environment variables override it.
        #[arg(long, short, env = "SCAND_CONFIG", default_value = "config/scand.toml")]
        config: PathBuf,
    },
    /// Validate a config file and exit: 0 if it is sound, 1 with the first error otherwise.
    CheckConfig {
        /// Config file (TOML). SCAND_* environment variables override it.
        #[arg(long, short, env = "SCAND_CONFIG", default_value = "config/scand.toml")]
        config: PathBuf,
    },
    /// Operator commands against a running daemon: get a shipment, tail changes, stats, backup.
    Ctl(Box<scand::ctl::CtlArgs>),
    /// Make a data directory from a backup (`scand ctl backup`), with scand stopped: start scand
    /// on DATA afterwards and it continues where the backup was taken.
    Restore {
        /// The backup directory.
        #[arg(long)]
        from: PathBuf,
        /// The data directory to create (absent or empty): the `store.path` scand runs on.
        #[arg(long)]
        data: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run { config } => run(&config),
        Command::CheckConfig { config } => check_config(&config),
        Command::Ctl(args) => ctl(*args),
        Command::Restore { from, data } => restore(&from, &data),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("scand: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn check_config(path: &std::path::Path) -> anyhow::Result<()> {
    Config::load(Some(path))
        .with_context(|| format!("{} is not a valid scand config", path.display()))?;
    println!("{}: ok", path.display());
    Ok(())
}

fn restore(from: &std::path::Path, data: &std::path::Path) -> anyhow::Result<()> {
    let info = scand::store::backup::restore(from, data)
        .with_context(|| format!("restoring {} into {}", from.display(), data.display()))?;
    println!(
        "{}: restored from {}; the change log continues after sequence {}",
        data.display(),
        from.display(),
        info.last_sequence.0
    );
    for (topic, partition, next) in &info.source_offsets {
        println!("  {topic}[{partition}] resumes at offset {next}");
    }
    Ok(())
}

fn ctl(args: scand::ctl::CtlArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(scand::ctl::run(args))?;
    Ok(())
}

fn run(path: &std::path::Path) -> anyhow::Result<()> {
    #[cfg(feature = "failpoints")]
    let _failpoints = fail::FailScenario::setup();
    let config = Config::load(Some(path)).with_context(|| format!("loading {}", path.display()))?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("scand")
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async {
        let traces = scand::telemetry::init_tracing(&config.log).map_err(anyhow::Error::msg)?;
        let ran = scand::daemon::run(config).await;
        traces.shutdown();
        Ok(ran?)
    })
}
