//! scand's own store path without the network: the workload's scans validated and encoded up
//! front (the gRPC threads' share of the work), then handed to scand's real writer (engine,
//! group commit, synced RocksDB writes) from this process. Set against the raw RocksDB limit,
//! it shows what the engine and the layout cost; set against scand over gRPC, what transport
//! and ingest cost.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use scand::config::Config;
use scand::domain::scan::ValidScan;
use scand::engine::Engine;
use scand::ingest::validate::Validator;
use scand::store::writer::WriterHandle;
use scand::store::{writer, Store};
use tokio::sync::Semaphore;

use crate::workload::Planned;

/// Throughput and per-batch latency (queued to durable) of the in-process run.
pub struct StoreRun {
    pub scans: u64,
    pub elapsed: Duration,
    /// Batch latency in milliseconds: p50, p99, max.
    pub latency_ms: [f64; 3],
}

/// Opens the store at `path` with scand's configuration (`config`, or the defaults, plus
/// `SCAND_*` environment overrides, as `scand run` reads it) and starts its writer.
pub fn open(
    path: &std::path::Path,
    config: Option<&std::path::Path>,
) -> Result<(Config, Store, WriterHandle, std::thread::JoinHandle<()>), String> {
    let mut config = Config::load(config).map_err(|e| e.to_string())?;
    config.store.path = path.to_owned();
    let store = Store::open(&config.store).map_err(|e| e.to_string())?;
    let (handle, _, thread) = writer::spawn(
        store.clone(),
        Engine::new(config.dedup.window).new_journey_after(config.lifecycle.new_journey_after),
        (config.stall.thresholds.policy(), config.retention.policy()),
        &config.store,
        None,
    )
    .map_err(|e| e.to_string())?;
    Ok((config, store, handle, thread))
}

/// Stops the writer once everything queued is written.
pub async fn close(
    handle: WriterHandle,
    thread: std::thread::JoinHandle<()>,
) -> Result<(), String> {
    drop(handle);
    tokio::task::spawn_blocking(move || thread.join())
        .await
        .map_err(|e| e.to_string())?
        .map_err(|_| "the writer thread panicked".to_owned())
}

/// Hands `valid` to the writer `batch_size` at a time with at most `in_flight` batches waiting,
/// until every batch is durable.
pub async fn feed(
    handle: &WriterHandle,
    valid: &[ValidScan],
    batch_size: usize,
    in_flight: usize,
) -> Result<StoreRun, String> {
    let slots = Arc::new(Semaphore::new(in_flight.max(1)));
    let mut answers = tokio::task::JoinSet::new();
    let started = Instant::now();
    for batch in valid.chunks(batch_size.max(1)) {
        let slot = slots
            .clone()
            .acquire_owned()
            .await
            .map_err(|e| e.to_string())?;
        let queued = Instant::now();
        let answer = handle
            .enqueue(batch.to_vec(), Vec::new(), queued)
            .await
            .map_err(|e| e.to_string())?;
        answers.spawn(async move {
            let stored = answer.await;
            drop(slot);
            stored
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())?;
            Ok::<_, String>(queued.elapsed())
        });
    }
    let mut latency = hdrhistogram::Histogram::<u64>::new(3).map_err(|e| e.to_string())?;
    while let Some(done) = answers.join_next().await {
        let took = done.map_err(|e| e.to_string())??;
        let _ = latency.record(took.as_micros() as u64);
    }
    let elapsed = started.elapsed();
    let ms = |q: f64| latency.value_at_quantile(q) as f64 / 1000.0;
    Ok(StoreRun {
        scans: valid.len() as u64,
        elapsed,
        latency_ms: [ms(0.5), ms(0.99), latency.max() as f64 / 1000.0],
    })
}

/// Feeds the valid scans, `batch_size` at a time with at most `in_flight` batches waiting for
/// the writer, into a fresh store at `path` (see [`open`]).
pub async fn run(
    path: &std::path::Path,
    planned: &[Planned],
    batch_size: usize,
    in_flight: usize,
    config: Option<&std::path::Path>,
) -> Result<StoreRun, String> {
    let (config, _store, handle, thread) = open(path, config)?;
    let validator = Validator::new(&config.ingest).map_err(|e| e.to_string())?;
    let now = SystemTime::now();
    let valid: Vec<_> = planned
        .iter()
        .filter_map(|p| validator.validate(p.scan.clone(), now).ok())
        .collect();
    let run = feed(&handle, &valid, batch_size, in_flight).await?;
    close(handle, thread).await?;
    Ok(run)
}
