//! The raw limits scand is measured against, on the same workload in the same run:
//! - RocksDB: the scans' stored records (event key and value) written with plain `WriteBatch`es
//!   in key order, the WAL synced on a second thread behind the writes, as scand's writer does,
//!   with no engine, no shipment records and no gRPC: one key per scan, the least any layout
//!   that keeps each scan must write;
//! - transport: a tonic `ScanIngest` server in this process that answers every scan ACCEPTED
//!   without doing anything, driven by the same streams scand is driven by;
//! - ingest: both in one process, the same server storing each batch's scans into the same
//!   RocksDB the same way and acking a batch once the WAL sync covering it returned. Transport
//!   and store together, one key a scan, durable before the ack, no logic: what any gRPC ingest
//!   that stores each scan durably pays at least on this machine.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use rocksdb::{ColumnFamily, ColumnFamilyDescriptor, Options, WriteBatch, WriteOptions, DB};
use scand::domain::EventTime;
use scand::ingest::validate::Validator;
use scand::ingest::IngestConfig;
use scand::proto::pb::{self, scan_ingest_server::ScanIngest};
use scand::store::codec;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::{wrappers::ReceiverStream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use crate::workload::Planned;

/// The raw limits' one column family: a scan per key.
const EVENTS: &str = "events";

/// A scan's key in the raw limits: `tracking_number ␀ event_time ␀ scan_id`, the time
/// big-endian with its sign bit flipped, so a shipment's scans sort by time within its prefix
/// (the prefix scand's memtables hash by).
fn event_key(tracking_number: &str, event_time: EventTime, scan_id: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(tracking_number.len() + 10 + scan_id.len());
    key.extend_from_slice(tracking_number.as_bytes());
    key.push(0);
    key.extend_from_slice(&((event_time.0 as u64) ^ (1 << 63)).to_be_bytes());
    key.push(0);
    key.extend_from_slice(scan_id.as_bytes());
    key
}

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
    path: &Path,
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
            let key = event_key(s.tracking_number.as_str(), s.event_time, s.scan_id.as_str());
            (key, s.stored)
        })
        .collect();
    let db = open_events_db(path, memtable_bytes)?;
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
    let events = db.cf_handle(EVENTS).ok_or("no events column family")?;
    let started = Instant::now();
    for group in stored.chunks(batch_size * group_batches.max(1)) {
        let write_started = Instant::now();
        write_sorted(&db, events, group.iter().collect())?;
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

/// The raw limits' one RocksDB: only an `events` column family, configured as scand's, so both
/// raw stores measure the same database.
fn open_events_db(path: &Path, memtable_bytes: usize) -> Result<Arc<DB>, String> {
    let mut options = Options::default();
    options.create_if_missing(true);
    options.create_missing_column_families(true);
    options.increase_parallelism(2);
    options.set_allow_concurrent_memtable_write(false);
    let mut events = Options::default();
    events.set_write_buffer_size(memtable_bytes);
    events.set_compression_type(rocksdb::DBCompressionType::Lz4);
    // Hashed by tracking number as scand's memtables are, with a skip list per bucket: these
    // are many keys a shipment, mostly appended in order, which a skip list takes best
    // (scand's buckets hold one key's operands, newest first: a linked list).
    scand::store::prefix_by_tracking_number(&mut events);
    events.set_memtable_factory(rocksdb::MemtableFactory::HashSkipList {
        bucket_count: scand::store::memtable_bucket_count(memtable_bytes),
        height: 4,
        branching_factor: 4,
    });
    let events = ColumnFamilyDescriptor::new(EVENTS, events);
    DB::open_cf_descriptors(&options, path, [events])
        .map(Arc::new)
        .map_err(|e| e.to_string())
}

/// Writes one group's records as one WriteBatch in key order (the engine orders a group so,
/// and sorted inserts are cheaper in the memtable), without a sync: the syncer covers it.
fn write_sorted(
    db: &DB,
    events: &ColumnFamily,
    mut records: Vec<&(Vec<u8>, Vec<u8>)>,
) -> Result<(), String> {
    records.sort_unstable_by(|a, b| a.0.cmp(&b.0));
    let bytes = records
        .iter()
        .map(|(key, value)| key.len() + value.len())
        .sum::<usize>();
    let mut batch = WriteBatch::with_capacity_bytes(bytes + 32 * records.len());
    for (key, value) in records {
        batch.put_cf(events, key, value);
    }
    db.write_opt(batch, &WriteOptions::default())
        .map_err(|e| e.to_string())
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

/// Said once the WAL sync covering a batch's write returned, or why it failed.
type Durable = oneshot::Sender<Result<(), String>>;

/// One received batch's records (event key, encoded scan) on their way to the writer.
struct ToWrite {
    records: Vec<(Vec<u8>, Vec<u8>)>,
    durable: Durable,
}

/// Stores every scan under its event key, durably, then answers it ACCEPTED: no validation,
/// no dedup, no shipment records, no change log.
struct StoringIngest {
    writer: mpsc::Sender<ToWrite>,
}

/// Keys and encodes a batch's scans and queues them for the writer; the receiver answers once
/// they are durable. A value is scand's stored form of the scan (`codec::encode_event`, as
/// the raw RocksDB limit stores), so both raw stores write the same bytes.
async fn write(
    writer: &mpsc::Sender<ToWrite>,
    batch: &mut pb::ScanBatch,
) -> oneshot::Receiver<Result<(), String>> {
    let records = batch
        .scans
        .iter_mut()
        .map(|scan| {
            // Nothing here judges a scan: one without a usable time is stored at time 0.
            let event_time = scan
                .event_time
                .as_ref()
                .and_then(|t| EventTime::from_parts(t.seconds, t.nanos))
                .unwrap_or(EventTime(0));
            let key = event_key(&scan.tracking_number, event_time, &scan.scan_id);
            (key, codec::encode_event(scan))
        })
        .collect();
    let (durable, synced) = oneshot::channel();
    // A stopped writer drops `durable` with the message, which answers `synced` with an error.
    let _ = writer.send(ToWrite { records, durable }).await;
    synced
}

/// The batch's ack once its write is durable; UNAVAILABLE when the write or sync failed.
async fn answer(
    batch: pb::ScanBatch,
    synced: oneshot::Receiver<Result<(), String>>,
) -> Result<pb::BatchAck, Status> {
    match synced.await {
        Ok(Ok(())) => Ok(accept_all(batch)),
        Ok(Err(e)) => Err(Status::unavailable(format!("raw ingest: {e}"))),
        Err(_) => Err(Status::unavailable("raw ingest: the writer stopped")),
    }
}

#[tonic::async_trait]
impl ScanIngest for StoringIngest {
    type StreamScansStream = ReceiverStream<Result<pb::BatchAck, Status>>;

    async fn stream_scans(
        &self,
        request: Request<Streaming<pb::ScanBatch>>,
    ) -> Result<Response<Self::StreamScansStream>, Status> {
        let mut batches = request.into_inner();
        let (acks, acks_rx) = mpsc::channel(16);
        // Batches written and not yet answered, in arrival order: the stream's next batches
        // are queued for the writer while earlier ones wait for their sync.
        let (waiting, mut waiting_rx) = mpsc::channel(8);
        let writer = self.writer.clone();
        tokio::spawn(async move {
            while let Some(Ok(mut batch)) = batches.next().await {
                // The slot first, so at most 8 of this stream's batches are past this point.
                let Ok(slot) = waiting.reserve().await else {
                    return;
                };
                let synced = write(&writer, &mut batch).await;
                slot.send((batch, synced));
            }
        });
        tokio::spawn(async move {
            while let Some((batch, synced)) = waiting_rx.recv().await {
                let ack = answer(batch, synced).await;
                // After a failed write the stream ends with its status: nothing later is acked.
                let failed = ack.is_err();
                if acks.send(ack).await.is_err() || failed {
                    return;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(acks_rx)))
    }

    async fn submit_scans(
        &self,
        request: Request<pb::ScanBatch>,
    ) -> Result<Response<pb::BatchAck>, Status> {
        let mut batch = request.into_inner();
        let synced = write(&self.writer, &mut batch).await;
        answer(batch, synced).await.map(Response::new)
    }
}

/// Starts the storing server on a free loopback port over a new RocksDB at `path`; returns its
/// URL. Its writer groups up to `group_batches` queued batches into one sorted write, as
/// `rocksdb` does, and a syncer thread syncs the WAL once for all groups written since its last
/// sync (at most 4 behind), then answers their batches.
pub async fn ingest_server(
    path: &Path,
    group_batches: usize,
    memtable_bytes: usize,
) -> Result<String, String> {
    let db = open_events_db(path, memtable_bytes)?;
    let group_batches = group_batches.max(1);
    // Room for the next group to gather while one is written.
    let (writer, mut to_write) = mpsc::channel::<ToWrite>(group_batches);
    let (written, to_sync) = std::sync::mpsc::sync_channel::<Vec<Durable>>(4);
    let syncer_db = db.clone();
    // Both threads come from the runtime's blocking pool, which the runtime waits for when it
    // shuts down: dropping the server ends the writer, then the syncer, which hold the only DB
    // handles, so RocksDB closes before the process exits (closing it under exit aborts).
    tokio::task::spawn_blocking(move || {
        while let Ok(first) = to_sync.recv() {
            let mut waiting = first;
            waiting.extend(to_sync.try_iter().flatten());
            let synced = syncer_db.flush_wal(true).map_err(|e| e.to_string());
            for durable in waiting {
                let _ = durable.send(synced.clone());
            }
        }
    });
    tokio::task::spawn_blocking(move || {
        // open_events_db created it; were it missing, leaving drops `to_write`, which
        // answers every batch UNAVAILABLE.
        let Some(events) = db.cf_handle(EVENTS) else {
            return;
        };
        while let Some(first) = to_write.blocking_recv() {
            let mut group = vec![first];
            while group.len() < group_batches {
                let Ok(more) = to_write.try_recv() else {
                    break;
                };
                group.push(more);
            }
            let result = write_sorted(&db, events, group.iter().flat_map(|b| &b.records).collect());
            let durable = group.into_iter().map(|b| b.durable);
            match result {
                // A stopped syncer drops them, which answers their batches UNAVAILABLE.
                Ok(()) => {
                    let _ = written.send(durable.collect());
                }
                Err(e) => {
                    for d in durable {
                        let _ = d.send(Err(e.clone()));
                    }
                }
            }
        }
    });
    serve(StoringIngest { writer }).await
}

/// Starts the null server on a free loopback port; returns its URL.
pub async fn null_server() -> Result<String, String> {
    serve(NullIngest).await
}

/// Serves `ingest` on a free loopback port (wide flow-control windows, no Nagle, 64 MiB
/// messages: nothing on the server side throttles the streams); returns its URL.
async fn serve<S: ScanIngest>(ingest: S) -> Result<String, String> {
    let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .map_err(|e| e.to_string())?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let service = pb::scan_ingest_server::ScanIngestServer::new(ingest)
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
