//! The single writer: a dedicated thread that takes ingest batches from a bounded queue,
//! combines those waiting into one group (group commit), runs the engine over them against the
//! stored shipment state, and writes the result as one synced `WriteBatch`. Only then does it
//! answer the callers, so an answer means durable.
//!
//! Invariants:
//! - Nothing is acknowledged before `DB::write` with a synced WAL returned Ok.
//! - A failed write acknowledges nothing and advances nothing: the sequence counter moves only
//!   after a write succeeds, and shipment state is re-read from RocksDB for every group.
//! - The queue is bounded: when the disk is the bottleneck, callers wait (backpressure).

use std::collections::HashMap;
use std::time::{Instant, SystemTime};

use prost::Message;
use rocksdb::{WriteBatch, WriteOptions};
use tokio::sync::{mpsc, oneshot, watch};

use super::{keys, records, Store, StoreError};
use crate::api::{pb, status_fields};
use crate::domain::{EventTime, ScanId, ScanType, Sequence, TrackingNumber};
use crate::engine::{Effects, Engine, Incoming, Outcome, ShipmentState};
use crate::telemetry::metrics as m;

/// A validated scan, with its wire form as it will be stored.
#[derive(Clone, Debug)]
pub struct StoreScan {
    pub tracking_number: TrackingNumber,
    pub scan_id: ScanId,
    pub scan_type: ScanType,
    pub event_time: EventTime,
    pub facility: u64,
    pub wire: pb::Scan,
    /// The source partition that owns this shipment (Kafka source), for the changelog.
    pub origin: Option<Origin>,
}

/// A source partition.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Origin {
    pub topic: String,
    pub partition: i32,
}

/// A shipment's whole stored state after a durable write, for replication to a new owner of
/// its partition: the shipment record, every stored scan, and the partition position the
/// state covers.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Snapshot {
    #[prost(string, tag = "1")]
    pub tracking_number: String,
    #[prost(string, tag = "2")]
    pub topic: String,
    #[prost(int32, tag = "3")]
    pub partition: i32,
    /// Next offset of the partition that this state includes everything before.
    #[prost(int64, tag = "4")]
    pub next_offset: i64,
    #[prost(bytes = "vec", tag = "5")]
    pub record: Vec<u8>,
    /// Encoded `scand.v1.Scan`s, timeline order.
    #[prost(bytes = "vec", repeated, tag = "6")]
    pub events: Vec<Vec<u8>>,
}

impl Snapshot {
    /// Marks a partition's state complete up to `next_offset` (no shipment: empty number).
    pub fn marker(topic: &str, partition: i32, next_offset: i64) -> Self {
        Snapshot {
            topic: topic.to_owned(),
            partition,
            next_offset,
            ..Snapshot::default()
        }
    }

    pub fn is_marker(&self) -> bool {
        self.tracking_number.is_empty()
    }

    /// The compaction key: the shipment, or one marker key per source topic.
    pub fn key(&self) -> String {
        if self.is_marker() {
            format!("\u{0}marker\u{0}{}", self.topic)
        } else {
            self.tracking_number.clone()
        }
    }
}

/// A consumed source position, stored in the same write as the scans it carried, so a
/// restart resumes exactly after them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SourceOffset {
    pub topic: String,
    pub partition: i32,
    /// The next offset to consume.
    pub next: i64,
}

struct Request {
    scans: Vec<StoreScan>,
    offsets: Vec<SourceOffset>,
    received: Instant,
    reply: oneshot::Sender<Result<Vec<Outcome>, StoreError>>,
}

/// The ingest side's handle on the writer.
#[derive(Clone)]
pub struct WriterHandle {
    tx: mpsc::Sender<Request>,
}

impl WriterHandle {
    /// Queues a batch for the writer, waiting while its queue is full. The receiver resolves
    /// once the batch is durable, with one outcome per scan in order.
    pub async fn enqueue(
        &self,
        scans: Vec<StoreScan>,
        offsets: Vec<SourceOffset>,
        received: Instant,
    ) -> Result<oneshot::Receiver<Result<Vec<Outcome>, StoreError>>, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(Request {
                scans,
                offsets,
                received,
                reply,
            })
            .await
            .map_err(|_| StoreError::WriterGone)?;
        Ok(answer)
    }
}

/// Starts the writer thread. It stops once every [`WriterHandle`] is dropped and the queue is
/// drained; join the returned handle to know every accepted batch was answered.
pub fn spawn(
    store: Store,
    engine: Engine,
    queue_batches: usize,
    group_commit_batches: usize,
    changelog: Option<mpsc::Sender<Snapshot>>,
) -> Result<
    (
        WriterHandle,
        watch::Receiver<Sequence>,
        std::thread::JoinHandle<()>,
    ),
    StoreError,
> {
    let last = store.last_sequence()?;
    let (tx, rx) = mpsc::channel(queue_batches);
    let (sequence_tx, sequence_rx) = watch::channel(last);
    let writer = Writer {
        store,
        engine,
        last_sequence: last,
        sequence_tx,
        group_commit_batches,
        changelog,
    };
    let thread = std::thread::Builder::new()
        .name("scand-writer".into())
        .spawn(move || writer.run(rx))?;
    Ok((WriterHandle { tx }, sequence_rx, thread))
}

struct Writer {
    store: Store,
    engine: Engine,
    last_sequence: Sequence,
    sequence_tx: watch::Sender<Sequence>,
    group_commit_batches: usize,
    /// Where shipments owned by a source partition are replicated after each write.
    changelog: Option<mpsc::Sender<Snapshot>>,
}

impl Writer {
    fn run(mut self, mut rx: mpsc::Receiver<Request>) {
        while let Some(first) = rx.blocking_recv() {
            let mut group = vec![first];
            while group.len() < self.group_commit_batches {
                match rx.try_recv() {
                    Ok(next) => group.push(next),
                    Err(_) => break,
                }
            }
            metrics::histogram!(m::STORE_GROUP_BATCHES).record(group.len() as f64);
            let started = Instant::now();
            let result = self.commit(&group);
            metrics::histogram!(m::STORE_WRITE_SECONDS).record(started.elapsed().as_secs_f64());
            match result {
                Ok(mut per_request) => {
                    for request in group.into_iter().rev() {
                        let outcomes = per_request.pop().unwrap_or_default();
                        metrics::histogram!(m::INGEST_LATENCY_SECONDS)
                            .record(request.received.elapsed().as_secs_f64());
                        // A caller that went away still had its batch stored; nothing to undo.
                        let _ = request.reply.send(Ok(outcomes));
                    }
                }
                Err(error) => {
                    metrics::counter!(m::STORE_WRITE_ERRORS_TOTAL).increment(1);
                    tracing::error!(%error, batches = group.len(), "store write failed; nothing acknowledged");
                    let message = error.to_string();
                    for request in group {
                        let _ = request
                            .reply
                            .send(Err(StoreError::WriteFailed(message.clone())));
                    }
                }
            }
        }
        tracing::info!(
            last_sequence = self.last_sequence.0,
            "store writer drained and stopped"
        );
    }

    /// Applies and durably writes a group; returns each request's outcomes.
    fn commit(&mut self, group: &[Request]) -> Result<Vec<Vec<Outcome>>, StoreError> {
        let scans: Vec<&StoreScan> = group.iter().flat_map(|r| r.scans.iter()).collect();
        let db = &self.store.db;
        let shipments_cf = self.store.cf(keys::SHIPMENTS);
        let dedup_cf = self.store.cf(keys::DEDUP);
        let events_cf = self.store.cf(keys::EVENTS);
        let changes_cf = self.store.cf(keys::CHANGES);

        let mut numbers: Vec<&TrackingNumber> = scans.iter().map(|s| &s.tracking_number).collect();
        numbers.sort_unstable();
        numbers.dedup();
        let mut states: HashMap<TrackingNumber, ShipmentState> =
            HashMap::with_capacity(numbers.len());
        for (number, value) in numbers.iter().zip(db.batched_multi_get_cf(
            shipments_cf,
            numbers.iter().map(|n| keys::shipment_key(n)),
            false,
        )) {
            if let Some(bytes) = value? {
                let key = keys::shipment_key(number);
                states.insert((*number).clone(), records::decode_shipment(key, &bytes)?);
            }
        }
        let known: Vec<bool> = db
            .batched_multi_get_cf(
                dedup_cf,
                scans.iter().map(|s| keys::dedup_key(&s.scan_id)),
                false,
            )
            .into_iter()
            .map(|r| r.map(|v| v.is_some()))
            .collect::<Result<_, _>>()?;

        let incoming = scans
            .iter()
            .zip(known)
            .enumerate()
            .map(|(index, (s, scan_id_known))| Incoming {
                index,
                tracking_number: s.tracking_number.clone(),
                scan_id: s.scan_id.clone(),
                scan_type: s.scan_type,
                event_time: s.event_time,
                facility: s.facility,
                scan_id_known,
            })
            .collect();
        let Effects {
            outcomes,
            stored,
            removed,
            changes,
            after_terminal,
        } = self.engine.apply(incoming, &mut states);

        let mut batch = WriteBatch::default();
        let now_secs = super::now_unix_secs();
        let received_time = prost_types::Timestamp::from(SystemTime::now());
        // Protobuf merges concatenated encodings, so the stamp is appended to each stored scan
        // instead of cloning the scan to set it.
        let stamp = pb::Scan {
            received_time: Some(received_time),
            ..Default::default()
        }
        .encode_to_vec();
        let mut touched: Vec<&TrackingNumber> = Vec::new();
        for &index in &stored {
            let scan = scans[index];
            let mut value = Vec::with_capacity(scan.wire.encoded_len() + stamp.len());
            scan.wire.encode_raw(&mut value);
            value.extend_from_slice(&stamp);
            batch.put_cf(
                events_cf,
                keys::event_key(&scan.tracking_number, scan.event_time, &scan.scan_id),
                value,
            );
            batch.put_cf(
                dedup_cf,
                keys::dedup_key(&scan.scan_id),
                keys::dedup_value(&scan.tracking_number, now_secs),
            );
            touched.push(&scan.tracking_number);
        }
        for (number, event_time, scan_id) in &removed {
            batch.delete_cf(events_cf, keys::event_key(number, *event_time, scan_id));
        }
        touched.sort_unstable();
        touched.dedup();
        for number in touched {
            if let Some(state) = states.get(number) {
                batch.put_cf(
                    shipments_cf,
                    keys::shipment_key(number),
                    records::encode_shipment(state),
                );
            }
        }
        let mut sequence = self.last_sequence;
        for change in &changes {
            sequence = Sequence(sequence.0 + 1);
            let cause = scans[change.cause];
            let (previous_status, previous_sub_status) = status_fields(change.previous);
            let (status, sub_status) = status_fields(Some(change.current));
            let record = pb::StatusChange {
                sequence: sequence.0,
                tracking_number: change.tracking_number.to_string(),
                version: change.version.0,
                previous_status,
                status,
                sub_status,
                cause_scan_id: cause.scan_id.to_string(),
                event_time: cause.wire.event_time,
                location: cause.wire.location.clone(),
                regression: change.regression,
                previous_sub_status,
                correction: change.correction,
                committed_time: Some(received_time),
            };
            batch.put_cf(
                changes_cf,
                keys::change_key(sequence),
                record.encode_to_vec(),
            );
        }
        for offset in group.iter().flat_map(|r| &r.offsets) {
            batch.put_cf(
                self.store.cf(keys::META),
                keys::source_offset_key(&offset.topic, offset.partition),
                offset.next.to_be_bytes(),
            );
        }
        if sequence != self.last_sequence {
            batch.put_cf(
                self.store.cf(keys::META),
                keys::META_LAST_SEQUENCE,
                keys::change_key(sequence),
            );
        }

        let mut sync = WriteOptions::default();
        sync.set_sync(true);
        db.write_opt(batch, &sync)?;

        self.last_sequence = sequence;
        if let Some(changelog) = &self.changelog {
            // The batch is durable whatever happens here: a missed snapshot only means the next
            // owner resumes earlier and re-applies those scans itself.
            if let Err(error) = self.replicate(changelog, group, &scans, &states) {
                tracing::error!(%error, "changelog snapshot not sent");
            }
        }
        self.sequence_tx.send_replace(sequence);
        metrics::gauge!(m::CHANGE_LOG_SEQUENCE).set(sequence.0 as f64);
        record_metrics(&outcomes, &changes, after_terminal);

        let mut per_request = Vec::with_capacity(group.len());
        let mut outcomes = outcomes.into_iter().map(|(_, o)| o);
        for request in group {
            per_request.push(outcomes.by_ref().take(request.scans.len()).collect());
        }
        Ok(per_request)
    }
}

impl Writer {
    /// Sends the new state of every shipment a source partition owns to the changelog.
    /// Waits when the changelog is behind (bounded channel): backpressure, not buffering.
    fn replicate(
        &self,
        changelog: &mpsc::Sender<Snapshot>,
        group: &[Request],
        scans: &[&StoreScan],
        states: &HashMap<TrackingNumber, ShipmentState>,
    ) -> Result<(), StoreError> {
        let mut owned: HashMap<&TrackingNumber, &Origin> = HashMap::new();
        for scan in scans {
            if let Some(origin) = &scan.origin {
                owned.insert(&scan.tracking_number, origin);
            }
        }
        let next_offset = |topic: &str, partition: i32| {
            group
                .iter()
                .flat_map(|r| &r.offsets)
                .filter(|o| o.topic == topic && o.partition == partition)
                .map(|o| o.next)
                .max()
                .unwrap_or_default()
        };
        for (number, origin) in owned {
            let Some(state) = states.get(number) else {
                continue;
            };
            let snapshot = Snapshot {
                tracking_number: number.to_string(),
                topic: origin.topic.clone(),
                partition: origin.partition,
                next_offset: next_offset(&origin.topic, origin.partition),
                record: records::encode_shipment(state),
                events: self.store.timeline_values(number)?,
            };
            if changelog.blocking_send(snapshot).is_err() {
                tracing::warn!("changelog stopped; state is no longer replicated");
                return Ok(());
            }
        }
        // After every snapshot of the group: a marker saying the partition's state is complete
        // up to here. A new owner resumes at the last marker, never beyond a missing snapshot.
        let mut partitions: Vec<(&str, i32)> = group
            .iter()
            .flat_map(|r| &r.offsets)
            .map(|o| (o.topic.as_str(), o.partition))
            .collect();
        partitions.sort_unstable();
        partitions.dedup();
        for (topic, partition) in partitions {
            let marker = Snapshot::marker(topic, partition, next_offset(topic, partition));
            if changelog.blocking_send(marker).is_err() {
                return Ok(());
            }
        }
        Ok(())
    }
}

fn record_metrics(
    outcomes: &[(usize, Outcome)],
    changes: &[crate::engine::Change],
    after_terminal: u32,
) {
    let mut accepted = 0u64;
    let mut by_kind: HashMap<&'static str, u64> = HashMap::new();
    for (_, outcome) in outcomes {
        match outcome {
            Outcome::Accepted => accepted += 1,
            Outcome::Duplicate(kind) => *by_kind.entry(kind.label()).or_default() += 1,
        }
    }
    metrics::counter!(m::SCANS_ACCEPTED_TOTAL).increment(accepted);
    for (kind, n) in by_kind {
        metrics::counter!(m::SCANS_DUPLICATE_TOTAL, "kind" => kind).increment(n);
    }
    for change in changes {
        metrics::counter!(m::STATUS_CHANGES_TOTAL, "status" => change.current.status.label())
            .increment(1);
    }
    metrics::counter!(m::SCANS_AFTER_TERMINAL_TOTAL).increment(u64::from(after_terminal));
}
