//! `scand-load`: drives a running scand with realistic scan traffic over gRPC and reports
//! throughput and ack latency; exits non-zero when any scan got another answer than expected.
//! `--mode` runs the same workload against the raw limits instead (see `raw`), or produces it
//! to a Kafka topic for scand's Kafka source.
//!
//! With `--rate`, batches are sent on a fixed schedule (open loop) and latency is measured
//! from each batch's scheduled time, so a stalled server shows up as latency instead of
//! silently slowing the sender (no coordinated omission).

mod kafka;
mod postgres;
mod raw;
mod retention;
mod store;
mod workload;

use std::collections::VecDeque;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use scand::proto::pb::{self, scan_ingest_client::ScanIngestClient, Outcome};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use workload::{Planned, Shape};

/// The allocator scand runs with, so `--mode store` measures scand's writer as it runs.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// Stream to scand over gRPC and check every answer.
    Scand,
    /// Write the same scans' records straight into a RocksDB at --data (no gRPC, no logic).
    RawRocksdb,
    /// Stream to an in-process server that accepts everything without work.
    RawTransport,
    /// Stream to an in-process server that writes each scan under its event key into a RocksDB
    /// at --data as raw-rocksdb does and acks a batch once its WAL sync returned: transport and
    /// store together, one key a scan, durable before the ack, no logic: what any gRPC ingest
    /// that stores each scan durably pays at least on this machine.
    RawIngest,
    /// Feed scand's writer (engine, group commit, RocksDB at --data) in this process, no gRPC.
    Store,
    /// Months in minutes: --scans-per-day of whole journeys for --days through scand's writer
    /// at --data, the clock moved a day at a time and retention swept after each day; prints
    /// the data directory's size and each day's throughput.
    Retention,
    /// Produce the scans to a Kafka topic (--kafka-brokers, --kafka-topic).
    Kafka,
    /// The same dedup/order/status logic in PostgreSQL (--pg-url), for comparison.
    Postgres,
}

/// Load generator for scand: realistic journeys over gRPC, outcomes checked.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// What to drive with the workload.
    #[arg(long, value_enum, default_value_t = Mode::Scand)]
    mode: Mode,
    /// raw-rocksdb, raw-ingest, store: the (new) database directory.
    #[arg(long, default_value = "./raw-rocksdb")]
    data: std::path::PathBuf,
    /// raw-rocksdb, raw-ingest: batches per synced write (scand groups queued batches likewise).
    #[arg(long, default_value_t = 8)]
    group_batches: usize,
    /// store: scand's config file (default: built-in defaults); SCAND_* variables override it.
    #[arg(long)]
    config: Option<std::path::PathBuf>,
    /// raw-rocksdb, raw-ingest: memtable size per column family, as scand's store.memtable_bytes.
    #[arg(long, default_value_t = 64 * 1024 * 1024)]
    memtable_bytes: usize,
    /// kafka: bootstrap servers.
    #[arg(long, default_value = "127.0.0.1:9092")]
    kafka_brokers: String,
    /// kafka: the scans topic scand consumes.
    #[arg(long, default_value = "scans.raw")]
    kafka_topic: String,
    /// postgres: connection string; --streams sessions run concurrently.
    #[arg(long, default_value = "host=127.0.0.1 port=55432 user=postgres")]
    pg_url: String,
    /// scand gRPC endpoint.
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    target: String,
    /// retention: simulated days.
    #[arg(long, default_value_t = 120)]
    days: u32,
    /// retention: scans a day (whole ten-scan journeys, a twentieth on reused numbers).
    #[arg(long, default_value_t = 200_000)]
    scans_per_day: usize,
    /// Shipments to generate (each 9-25 scans).
    #[arg(long, default_value_t = 10_000)]
    shipments: usize,
    /// Only each journey's first N steps (1: labels created and nothing since, a cheap way to
    /// store many shipments); unset: whole journeys.
    #[arg(long)]
    steps: Option<usize>,
    /// Seed: the same seed gives the same traffic.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Extra scans that repeat an earlier one, in percent.
    #[arg(long, default_value_t = 5.0)]
    duplicate_pct: f64,
    /// Scans held back and uploaded late in bulk, in percent.
    #[arg(long, default_value_t = 5.0)]
    out_of_order_pct: f64,
    /// Extra broken scans, in percent.
    #[arg(long, default_value_t = 1.0)]
    invalid_pct: f64,
    /// Device clocks are off by up to this many seconds either way.
    #[arg(long, default_value_t = 30)]
    clock_skew_secs: u64,
    /// Scans per batch.
    #[arg(long, default_value_t = 500)]
    batch_size: usize,
    /// Concurrent gRPC streams (each on its own connection).
    #[arg(long, default_value_t = 4)]
    streams: usize,
    /// Batches in flight per stream when running closed loop.
    #[arg(long, default_value_t = 8)]
    window: usize,
    /// Offered load in scans/s over all streams (open loop); unset = as fast as acks allow.
    #[arg(long)]
    rate: Option<f64>,
    /// Print the summary as JSON on stdout.
    #[arg(long)]
    json: bool,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

#[derive(Default)]
struct Tally {
    sent: u64,
    acked: u64,
    accepted: u64,
    duplicate: u64,
    rejected: u64,
    mismatched: u64,
    first_mismatches: Vec<String>,
}

struct Shared {
    tally: Mutex<Tally>,
    latency_us: Mutex<Histogram<u64>>,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    match run(args).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("scand-load: {e}");
            ExitCode::from(2)
        }
    }
}

async fn run(args: Args) -> Result<bool, String> {
    let shape = Shape {
        shipments: args.shipments,
        seed: args.seed,
        duplicate_pct: args.duplicate_pct,
        out_of_order_pct: args.out_of_order_pct,
        invalid_pct: args.invalid_pct,
        clock_skew: Duration::from_secs(args.clock_skew_secs),
        max_steps: args.steps,
    };
    let planned = workload::generate(&shape);
    let total = planned.len() as u64;
    let mut target = args.target.clone();
    match args.mode {
        Mode::Scand => {}
        Mode::RawRocksdb => {
            let raw = raw::rocksdb(
                &args.data,
                &planned,
                args.batch_size.max(1),
                args.group_batches,
                args.memtable_bytes,
            )?;
            let rate = raw.scans as f64 / raw.elapsed.as_secs_f64();
            if args.json {
                println!(
                    "{}",
                    serde_json::json!({
                        "mode": "raw-rocksdb", "scans": raw.scans, "elapsed_s": raw.elapsed.as_secs_f64(),
                        "scans_per_s": rate, "batch_size": args.batch_size, "group_batches": args.group_batches,
                        "write_ms": { "p50": raw.write_ms_p50, "p99": raw.write_ms_p99 },
                    })
                );
            } else {
                println!("raw RocksDB       {:>12} scans", raw.scans);
                println!("elapsed           {:>12.2} s", raw.elapsed.as_secs_f64());
                println!("throughput        {rate:>12.0} scans/s");
                println!(
                    "synced write (ms) p50 {:.2}  p99 {:.2}",
                    raw.write_ms_p50, raw.write_ms_p99
                );
            }
            return Ok(true);
        }
        Mode::Store => {
            let in_flight = args.streams.max(1) * args.window.max(1);
            let run = store::run(
                &args.data,
                &planned,
                args.batch_size,
                in_flight,
                args.config.as_deref(),
            )
            .await?;
            let rate = run.scans as f64 / run.elapsed.as_secs_f64();
            let [p50, p99, max] = run.latency_ms;
            if args.json {
                println!(
                    "{}",
                    serde_json::json!({
                        "mode": "store", "scans": run.scans, "elapsed_s": run.elapsed.as_secs_f64(),
                        "scans_per_s": rate, "batch_size": args.batch_size, "in_flight": in_flight,
                        "batch_ms": { "p50": p50, "p99": p99, "max": max },
                    })
                );
            } else {
                println!("scand store       {:>12} scans", run.scans);
                println!("throughput        {rate:>12.0} scans/s");
                println!("batch (ms)        p50 {p50:.2}  p99 {p99:.2}  max {max:.2}");
            }
            return Ok(true);
        }
        Mode::Retention => {
            let in_flight = args.streams.max(1) * args.window.max(1);
            let json = args.json;
            if !json {
                println!(
                    "{:>5}  {:>14}  {:>14}  {:>10}  {:>16}",
                    "day", "data bytes", "of which WAL", "scans/s", "journeys expired"
                );
            }
            retention::run(
                &args.data,
                args.config.as_deref(),
                args.days,
                args.scans_per_day,
                args.batch_size,
                in_flight,
                |d| {
                    if json {
                        println!(
                            "{}",
                            serde_json::json!({
                                "mode": "retention", "day": d.day, "data_bytes": d.bytes,
                                "wal_bytes": d.wal_bytes,
                                "scans_per_s": d.scans_per_s, "journeys_expired": d.journeys_removed,
                            })
                        );
                    } else {
                        println!(
                            "{:>5}  {:>14}  {:>14}  {:>10.0}  {:>16}",
                            d.day, d.bytes, d.wal_bytes, d.scans_per_s, d.journeys_removed
                        );
                    }
                },
            )
            .await?;
            return Ok(true);
        }
        Mode::Kafka => {
            return kafka::produce(&args.kafka_brokers, &args.kafka_topic, &planned, args.json)
                .await;
        }
        Mode::RawTransport => target = raw::null_server().await?,
        Mode::RawIngest => {
            target = raw::ingest_server(&args.data, args.group_batches, args.memtable_bytes).await?
        }
        Mode::Postgres => {
            let pg = postgres::run(&args.pg_url, &planned, args.batch_size, args.streams).await?;
            let rate = pg.scans as f64 / pg.elapsed.as_secs_f64();
            let [p50, p99, max] = pg.latency_ms;
            if args.json {
                println!(
                    "{}",
                    serde_json::json!({
                        "mode": "postgres", "scans": pg.scans, "elapsed_s": pg.elapsed.as_secs_f64(),
                        "scans_per_s": rate, "batch_size": args.batch_size, "streams": args.streams,
                        "commit_ms": { "p50": p50, "p99": p99, "max": max },
                    })
                );
            } else {
                println!("postgres          {:>12} scans", pg.scans);
                println!("throughput        {rate:>12.0} scans/s");
                println!("commit (ms)       p50 {p50:.2}  p99 {p99:.2}  max {max:.2}");
            }
            return Ok(true);
        }
    }
    let check_outcomes = args.mode == Mode::Scand;
    let streams = args.streams.max(1);
    // One shipment always goes down one stream, so its scans are answered in send order.
    let mut shards: Vec<Vec<Planned>> = vec![Vec::new(); streams];
    for p in planned {
        let shard = fnv(&p.scan.tracking_number) as usize % streams;
        shards[shard].push(p);
    }

    let shared = Arc::new(Shared {
        tally: Mutex::new(Tally::default()),
        latency_us: Mutex::new(
            Histogram::new_with_bounds(1, 600_000_000, 3).map_err(|e| e.to_string())?,
        ),
    });
    let progress = if args.quiet || args.json {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(total)
    };
    progress.set_style(
        ProgressStyle::with_template(
            "{elapsed_precise} [{bar:40}] {pos}/{len} scans acked ({per_sec})",
        )
        .map_err(|e| e.to_string())?,
    );
    // Messages are built before the clock starts: the generator's own work in the measured
    // window is only sending and checking.
    let batch_size = args.batch_size.max(1);
    let prepared: Vec<Vec<Prepared>> = shards
        .into_iter()
        .map(|shard| {
            shard
                .chunks(batch_size)
                .enumerate()
                .map(|(i, batch)| Prepared {
                    message: pb::ScanBatch {
                        batch_id: format!("{i}"),
                        scans: batch.iter().map(|p| p.scan.clone()).collect(),
                    },
                    planned: batch.to_vec(),
                })
                .collect()
        })
        .collect();
    let started = Instant::now();
    let cpu_started = process_cpu_seconds();
    let per_stream_rate = args.rate.map(|r| r / streams as f64);
    let mut tasks = Vec::new();
    for (stream, batches) in prepared.into_iter().enumerate() {
        let target = target.clone();
        let shared = shared.clone();
        let progress = progress.clone();
        let window = args.window.max(1);
        tasks.push(tokio::spawn(async move {
            drive(
                target,
                batches,
                Pace {
                    batch_size,
                    window,
                    rate: per_stream_rate,
                    // Streams take turns: the offered load arrives evenly, not in bursts of
                    // one batch per stream at once.
                    phase: args.rate.map_or(Duration::ZERO, |r| {
                        Duration::from_secs_f64((stream * batch_size) as f64 / r)
                    }),
                },
                check_outcomes,
                shared,
                progress,
            )
            .await
        }));
    }
    for task in tasks {
        task.await.map_err(|e| e.to_string())??;
    }
    let elapsed = started.elapsed();
    // The generator shares the machine with scand: what it spent of the cores in the window.
    let generator_cpu_s = cpu_started
        .zip(process_cpu_seconds())
        .map(|(before, after)| after - before);
    progress.finish_and_clear();

    let tally = shared.tally.lock().map_err(|e| e.to_string())?;
    let h = shared.latency_us.lock().map_err(|e| e.to_string())?;
    let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    let rate = tally.acked as f64 / elapsed.as_secs_f64();
    let ok = tally.mismatched == 0 && tally.acked == tally.sent;
    if args.json {
        let summary = serde_json::json!({
            "mode": format!("{:?}", args.mode).to_lowercase(),
            "scans_sent": tally.sent, "scans_acked": tally.acked, "accepted": tally.accepted,
            "duplicate": tally.duplicate, "rejected": tally.rejected, "mismatched": tally.mismatched,
            "elapsed_s": elapsed.as_secs_f64(), "scans_per_s": rate,
            "offered_scans_per_s": args.rate, "batch_size": args.batch_size, "streams": streams,
            "ack_latency_ms": { "p50": ms(0.5), "p90": ms(0.9), "p99": ms(0.99), "p999": ms(0.999), "max": h.max() as f64 / 1000.0 },
            "generator_cpu_s": generator_cpu_s,
            "ok": ok,
        });
        println!("{summary}");
    } else {
        println!("scans sent        {:>12}", tally.sent);
        println!("scans acked       {:>12}", tally.acked);
        println!("  accepted        {:>12}", tally.accepted);
        println!("  duplicate       {:>12}", tally.duplicate);
        println!("  rejected        {:>12}", tally.rejected);
        println!("unexpected        {:>12}", tally.mismatched);
        println!("elapsed           {:>12.2} s", elapsed.as_secs_f64());
        println!("throughput        {:>12.0} scans/s", rate);
        if let Some(r) = args.rate {
            println!("offered           {:>12.0} scans/s", r);
        }
        if let Some(cpu) = generator_cpu_s {
            println!("generator CPU     {cpu:>12.2} s (this process, inside the window)");
        }
        println!(
            "ack latency (ms)  p50 {:.2}  p90 {:.2}  p99 {:.2}  p99.9 {:.2}  max {:.2}",
            ms(0.5),
            ms(0.9),
            ms(0.99),
            ms(0.999),
            h.max() as f64 / 1000.0
        );
    }
    for m in &tally.first_mismatches {
        eprintln!("unexpected: {m}");
    }
    Ok(ok)
}

/// User plus system CPU of this process so far, from `/proc/self/stat` (Linux; its clock
/// ticks are 1/100 s). `None` elsewhere.
fn process_cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the parenthesised command name: state is the first, utime the 12th.
    let mut fields = stat.rsplit_once(')')?.1.split_whitespace().skip(11);
    let user: u64 = fields.next()?.parse().ok()?;
    let system: u64 = fields.next()?.parse().ok()?;
    Some((user + system) as f64 / 100.0)
}

fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Batches sent and not yet answered, with their scheduled send time: acks come in order.
type Unanswered = VecDeque<(Instant, Vec<Planned>)>;

/// One batch ready to send, with what each of its scans should be answered.
struct Prepared {
    message: pb::ScanBatch,
    planned: Vec<Planned>,
}

/// How one stream sends: batch size, batches in flight (closed loop) or offered rate.
struct Pace {
    batch_size: usize,
    window: usize,
    rate: Option<f64>,
    /// Delay of this stream's schedule (open loop).
    phase: Duration,
}

/// Sends one shard's batches down one stream and checks every answer (only that each scan was
/// answered, in order, when `check_outcomes` is off).
async fn drive(
    target: String,
    batches: Vec<Prepared>,
    Pace {
        batch_size,
        window,
        rate,
        phase,
    }: Pace,
    check_outcomes: bool,
    shared: Arc<Shared>,
    progress: ProgressBar,
) -> Result<(), String> {
    let channel = tonic::transport::Endpoint::from_shared(target)
        .map_err(|e| e.to_string())?
        .initial_stream_window_size(4 * 1024 * 1024)
        .initial_connection_window_size(16 * 1024 * 1024)
        .connect()
        .await
        .map_err(|e| format!("cannot connect: {e}"))?;
    let mut client = ScanIngestClient::new(channel).max_decoding_message_size(64 * 1024 * 1024);

    // Open loop: the queue of scheduled-but-unanswered batches must not limit sending.
    let in_flight = if rate.is_some() {
        batches.len().max(1)
    } else {
        window
    };
    let (tx, rx) = mpsc::channel::<pb::ScanBatch>(in_flight);
    let slots = Arc::new(tokio::sync::Semaphore::new(in_flight));
    let pending: Arc<Mutex<Unanswered>> = Arc::new(Mutex::new(VecDeque::new()));

    let sender = {
        let pending = pending.clone();
        let slots = slots.clone();
        let shared = shared.clone();
        tokio::spawn(async move {
            let start = Instant::now() + phase;
            for (i, Prepared { message, planned }) in batches.into_iter().enumerate() {
                let Ok(permit) = slots.clone().acquire_owned().await else {
                    return;
                };
                permit.forget();
                let scheduled = match rate {
                    Some(r) => {
                        let at = start + Duration::from_secs_f64((i * batch_size) as f64 / r);
                        tokio::time::sleep_until(at.into()).await;
                        at
                    }
                    None => Instant::now(),
                };
                if let Ok(mut tally) = shared.tally.lock() {
                    tally.sent += planned.len() as u64;
                }
                if let Ok(mut q) = pending.lock() {
                    q.push_back((scheduled, planned));
                }
                if tx.send(message).await.is_err() {
                    return;
                }
            }
        })
    };

    let mut acks = client
        .stream_scans(ReceiverStream::new(rx))
        .await
        .map_err(|e| format!("StreamScans: {e}"))?
        .into_inner();
    while let Some(ack) = acks
        .message()
        .await
        .map_err(|e| format!("stream failed: {e}"))?
    {
        let Some((scheduled, batch)) = pending.lock().ok().and_then(|mut q| q.pop_front()) else {
            return Err("ack for a batch never sent".into());
        };
        slots.add_permits(1);
        let latency = scheduled.elapsed().as_micros() as u64;
        if let Ok(mut h) = shared.latency_us.lock() {
            let _ = h.record(latency.max(1));
        }
        let mut tally = shared.tally.lock().map_err(|e| e.to_string())?;
        for (planned, result) in batch.iter().zip(&ack.results) {
            tally.acked += 1;
            match Outcome::try_from(result.outcome) {
                Ok(Outcome::Accepted) => tally.accepted += 1,
                Ok(Outcome::Duplicate) => tally.duplicate += 1,
                Ok(Outcome::Rejected) => tally.rejected += 1,
                _ => {}
            }
            let expected = !check_outcomes || result.outcome == planned.expect as i32;
            if !expected || result.scan_id != planned.scan.scan_id {
                tally.mismatched += 1;
                if tally.first_mismatches.len() < 10 {
                    tally.first_mismatches.push(format!(
                        "{}: expected {:?}, got {:?} {}",
                        planned.scan.scan_id,
                        planned.expect,
                        Outcome::try_from(result.outcome),
                        result.reason
                    ));
                }
            }
        }
        progress.inc(batch.len() as u64);
    }
    // The stream ends after the sender has sent everything and every batch was answered.
    sender.await.map_err(|e| e.to_string())?;
    Ok(())
}
