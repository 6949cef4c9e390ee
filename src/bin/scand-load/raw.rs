//! The raw limits scand is measured against, on the same workload in the same run:
//! - RocksDB: the scans' stored records (event key and value) written with plain `WriteBatch`es
//!   in key order, the WAL synced on a second thread behind the writes, as scand's writer does,
//!   with no engine, no shipment records and no gRPC: one key per scan, the least any layout
//!   that keeps each scan must write;
//! - transport: a tonic `ScanIngest` server in this process that answers every scan ACCEPTED
//!   without doing anything, driven by the same streams scand is driven by.

use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime};

use rocksdb::{ColumnFamilyDescriptor, Options, WriteBatch, WriteOptions, DB};
use scand::api::pb::{self, scan_ingest_server::ScanIngest};
use scand::config::IngestConfig;
use scand::ingest::validate::Validator;
use scand::store::keys;
use tokio_stream::{wrappers::ReceiverStream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use crate::workload::Planned;

/// Throughput and per-write latency of the raw RocksDB run.
pub struct RawStore {
    pub scans: u64,
    pub elapsed: Duration,
    pub write_ms_p50: f64,
    pub write_ms_p99: f64,
}

/// Writes the scans as scand stores them, with the same durability and the same tricks scand's
/// writer uses, so the limit is the best plain RocksDB does: each group of `group_batches`
/// batches is one WriteBatch holding an `events` key per scan, in key order (the engine orders
/// a group so, and sorted inserts are cheaper in the memtable), written without a sync; a second
/// thread syncs the WAL once for every group written since its last sync, at most 4 groups
/// behind. A group's latency runs from the start of its write to the sync that covers it.
pub fn rocksdb(
    path: &std::path::Path,
    planned: &[Planned],
    batch_size: usize,
    group_batches: usize,
    memtable_bytes: usize,
) -> Result<RawStore, String> {
    let validator = Validator::new(&IngestConfig::default()).map_err(|e| e.to_string())?;
    let now = SystemTime::now();
    // Keyed before the clock starts, as scand's ingest side prepares a scan before its writer.
    let stored: Vec<(Vec<u8>, Vec<u8>)> = planned
        .iter()
        .filter_map(|p| validator.validate(p.scan.clone(), now).ok())
        .map(|s| {
            let key = keys::event_key(&s.tracking_number, s.event_time, &s.scan_id);
            (key, s.stored)
        })
        .collect();
    let mut options = Options::default();
    options.create_if_missing(true);
    options.create_missing_column_families(true);
    options.increase_parallelism(2);
    options.set_allow_concurrent_memtable_write(false);
    let cf = |name: &str| {
        let mut o = Options::default();
        o.set_write_buffer_size(memtable_bytes);
        o.set_compression_type(rocksdb::DBCompressionType::Lz4);
        // Hashed by tracking number as scand's memtables are, with a skip list per bucket:
        // these are many keys a shipment, mostly appended in order, which a skip list takes
        // best (scand's buckets hold one key's operands, newest first: a linked list).
        scand::store::prefix_by_tracking_number(&mut o);
        o.set_memtable_factory(rocksdb::MemtableFactory::HashSkipList {
            bucket_count: scand::store::memtable_bucket_count(memtable_bytes),
            height: 4,
            branching_factor: 4,
        });
        ColumnFamilyDescriptor::new(name, o)
    };
    let db = std::sync::Arc::new(
        DB::open_cf_descriptors(&options, path, [cf(keys::EVENTS)]).map_err(|e| e.to_string())?,
    );
    let (written, to_sync) = std::sync::mpsc::sync_channel::<Instant>(4);
    let syncer = {
        let db = db.clone();
        std::thread::spawn(move || -> Result<hdrhistogram::Histogram<u64>, String> {
            let mut writes = hdrhistogram::Histogram::<u64>::new(3).map_err(|e| e.to_string())?;
            while let Ok(first) = to_sync.recv() {
                let mut groups = vec![first];
                groups.extend(to_sync.try_iter());
                db.flush_wal(true).map_err(|e| e.to_string())?;
                for started in groups {
                    let _ = writes.record(started.elapsed().as_micros() as u64);
                }
            }
            Ok(writes)
        })
    };
    let events = db
        .cf_handle(keys::EVENTS)
        .ok_or("no events column family")?;
    let started = Instant::now();
    for group in stored.chunks(batch_size * group_batches.max(1)) {
        let write_started = Instant::now();
        let mut sorted: Vec<_> = group.iter().collect();
        sorted.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        let bytes = group
            .iter()
            .map(|(key, value)| key.len() + value.len())
            .sum::<usize>();
        let mut batch = WriteBatch::with_capacity_bytes(bytes + 32 * group.len());
        for (key, value) in sorted {
            batch.put_cf(events, key, value);
        }
        db.write_opt(batch, &WriteOptions::default())
            .map_err(|e| e.to_string())?;
        written
            .send(write_started)
            .map_err(|_| "the raw syncer stopped".to_owned())?;
    }
    drop(written);
    let writes = syncer
        .join()
        .map_err(|_| "the raw syncer panicked".to_owned())??;
    Ok(RawStore {
        scans: stored.len() as u64,
        elapsed: started.elapsed(),
        write_ms_p50: writes.value_at_quantile(0.5) as f64 / 1000.0,
        write_ms_p99: writes.value_at_quantile(0.99) as f64 / 1000.0,
    })
}

/// Answers every scan ACCEPTED, touching nothing but the decoded message.
struct NullIngest;

#[tonic::async_trait]
impl ScanIngest for NullIngest {
    type StreamScansStream = ReceiverStream<Result<pb::BatchAck, Status>>;

    async fn stream_scans(
        &self,
        request: Request<Streaming<pb::ScanBatch>>,
    ) -> Result<Response<Self::StreamScansStream>, Status> {
        let mut batches = request.into_inner();
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        tokio::spawn(async move {
            while let Some(Ok(batch)) = batches.next().await {
                if tx.send(Ok(accept_all(batch))).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn submit_scans(
        &self,
        request: Request<pb::ScanBatch>,
    ) -> Result<Response<pb::BatchAck>, Status> {
        Ok(Response::new(accept_all(request.into_inner())))
    }
}

fn accept_all(batch: pb::ScanBatch) -> pb::BatchAck {
    pb::BatchAck {
        batch_id: batch.batch_id,
        results: batch
            .scans
            .into_iter()
            .map(|s| pb::ScanResult {
                scan_id: s.scan_id,
                outcome: pb::Outcome::Accepted as i32,
                reason: String::new(),
            })
            .collect(),
    }
}

/// Starts the null server on a free loopback port; returns its URL.
pub async fn null_server() -> Result<String, String> {
    let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .map_err(|e| e.to_string())?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let service = pb::scan_ingest_server::ScanIngestServer::new(NullIngest)
        .max_decoding_message_size(64 * 1024 * 1024);
    tokio::spawn(
        tonic::transport::Server::builder()
            .initial_stream_window_size(4 * 1024 * 1024)
            .initial_connection_window_size(16 * 1024 * 1024)
            .add_service(service)
            .serve_with_incoming(
                tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            ),
    );
    Ok(format!("http://{addr}"))
}
