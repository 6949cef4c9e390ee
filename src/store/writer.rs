//! The single writer: a dedicated thread that takes ingest batches from a bounded queue,
//! combines those waiting into one group (group commit), runs the engine over them against the
//! stored shipment state, and writes the result as one `WriteBatch`. A second thread, the
//! syncer, then syncs the WAL (one fsync for every group written since the last) and only then
//! answers the groups' callers, so an answer means durable; meanwhile the writer applies the
//! next group. A stall sweep reads the due part of the deadline index off this thread and
//! hands the writer the due shipments in small chunks, each written and synced like a group.
//!
//! Invariants:
//! - Nothing is acknowledged, and no reader (feed, sinks, changelog) is shown a change, before
//!   a WAL sync that covers its write returned Ok: readers stop at the durable sequence.
//! - A failed write acknowledges nothing and advances nothing: the sequence counter moves only
//!   after a write succeeds. A group whose sync fails is answered UNAVAILABLE; its write is in
//!   RocksDB's memtable, so it may still become durable later, and a retry is then answered
//!   DUPLICATE: never acknowledged without being durable, never applied twice.
//! - The queue and the writer-to-syncer hand-off are bounded: when the disk is the bottleneck,
//!   callers wait (backpressure).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use rocksdb::{ColumnFamily, WriteBatch, WriteOptions};
use tokio::sync::{mpsc, oneshot, watch};

use super::cache::ShipmentCache;
use super::records::ChangeRecord;
use super::{keys, records, Store, StoreError};
use crate::api::{pb, stalled_status, status_fields};
pub use crate::domain::Origin;
use crate::domain::{EventTime, ScanId, ScanType, Sequence, Status, TrackingNumber};
use crate::engine::stall::StallPolicy;
use crate::engine::{Change, Effects, Engine, Incoming, NumberCheck, Outcome, ShipmentState};
use crate::telemetry::metrics as m;

/// Most entries of the deadline index one sweep reads; the rest are due at the next sweep,
/// which follows at once. Read off the writer thread and many at a time: each read of the
/// index sorts a copy of its live memtable (tens of milliseconds at 8 MiB).
const SWEEP_READ: usize = 8_192;

/// Most due shipments the writer stalls in one write. Each chunk queues behind the scans
/// already waiting and is written unsynced like a group, so a sweep holds the writer about as
/// long as a group of scans at a time (1,000 shipments, read and synced on the writer, held it
/// for 30-60 ms; 10,000 for a few hundred, the p99 of every ack waiting behind it).
const SWEEP_CHUNK: usize = 256;

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
    /// Event time far from receipt time (flagged on the shipment, not rejected).
    pub clock_skewed: bool,
    /// Its stored form (the wire form stamped with its receipt time, without what its
    /// timeline entry holds), encoded at the edge so the single writer does not spend its
    /// time encoding.
    pub stored: Vec<u8>,
    /// The carrier check of the tracking number, when the policy checks it.
    pub number_check: Option<Arc<NumberCheck>>,
}

impl StoreScan {
    /// What the engine needs of this scan, as the `index`-th of its group.
    fn incoming(&self, index: usize) -> Incoming {
        Incoming {
            index,
            tracking_number: self.tracking_number.clone(),
            scan_id: self.scan_id.clone(),
            scan_type: self.scan_type,
            event_time: self.event_time,
            facility: self.facility,
            clock_skewed: self.clock_skewed,
        }
    }
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

/// What the writer thread is asked to do, in queue order.
enum Job {
    Ingest(Request),
    /// Stall the shipments of these due deadline index keys (read by the sweeper) whose
    /// deadline is still at or before `now`; answered with how many, once durable.
    Stall {
        now: EventTime,
        due: Vec<Vec<u8>>,
        reply: oneshot::Sender<Result<usize, StoreError>>,
    },
    /// A tiny synced write: does the store take writes again?
    Probe {
        reply: oneshot::Sender<Result<(), StoreError>>,
    },
}

/// What one sweep did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Swept {
    pub stalled: usize,
    /// More shipments are due than one sweep handles: sweep again now.
    pub more_due: bool,
}

/// The ingest side's handle on the writer.
#[derive(Clone)]
pub struct WriterHandle {
    tx: mpsc::Sender<Job>,
    failure: watch::Receiver<Option<String>>,
    /// For the sweep's read of the deadline index, which stays off the writer thread.
    store: Store,
}

impl WriterHandle {
    /// Why the store refuses writes, while it does (the last failed write's error).
    pub fn failure(&self) -> Option<String> {
        self.failure.borrow().clone()
    }

    /// Follows [`WriterHandle::failure`] as it changes.
    pub fn failures(&self) -> watch::Receiver<Option<String>> {
        self.failure.clone()
    }

    /// One synced write of a probe key, in queue order.
    pub async fn probe(&self) -> Result<(), StoreError> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(Job::Probe { reply })
            .await
            .map_err(|_| StoreError::WriterGone)?;
        answer.await.map_err(|_| StoreError::WriterGone)?
    }

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
            .send(Job::Ingest(Request {
                scans,
                offsets,
                received,
                reply,
            }))
            .await
            .map_err(|_| StoreError::WriterGone)?;
        Ok(answer)
    }

    /// Publishes STALLED for the shipments whose stall deadline is at or before `now` (up to
    /// [`SWEEP_READ`] index entries), once durable: reads the due entries here, then has the
    /// writer stall them [`SWEEP_CHUNK`] at a time, each chunk queued behind the batches
    /// already waiting.
    pub async fn sweep(&self, now: EventTime) -> Result<Swept, StoreError> {
        let store = self.store.clone();
        let due = tokio::task::spawn_blocking(move || store.due_stall_keys(now, SWEEP_READ))
            .await
            .map_err(|e| {
                StoreError::WriteFailed(format!("the sweep's index read failed: {e}"))
            })??;
        let mut stalled = 0;
        for chunk in due.chunks(SWEEP_CHUNK) {
            let (reply, answer) = oneshot::channel();
            self.tx
                .send(Job::Stall {
                    now,
                    due: chunk.to_vec(),
                    reply,
                })
                .await
                .map_err(|_| StoreError::WriterGone)?;
            stalled += answer.await.map_err(|_| StoreError::WriterGone)??;
        }
        Ok(Swept {
            stalled,
            more_due: due.len() == SWEEP_READ,
        })
    }
}

/// Sweeps the stall deadline index every `interval` (and again at once while more are due)
/// until `shutdown`. `clock` is the server clock; tests pass their own.
pub async fn run_stall_sweeper(
    writer: WriterHandle,
    interval: std::time::Duration,
    clock: fn() -> SystemTime,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticks.tick() => {}
        }
        loop {
            let started = Instant::now();
            let swept = writer.sweep(EventTime::from_system_time(clock())).await;
            metrics::histogram!(m::STALL_SWEEP_SECONDS).record(started.elapsed().as_secs_f64());
            match swept {
                Ok(Swept { stalled, more_due }) => {
                    if stalled > 0 {
                        tracing::info!(stalled, "shipments stalled");
                    }
                    if !more_due || shutdown.is_cancelled() {
                        break;
                    }
                }
                Err(StoreError::WriterGone) => return,
                Err(error) => {
                    tracing::warn!(%error, "stall sweep failed; retrying at the next interval");
                    break;
                }
            }
        }
    }
}

/// While the store refuses writes, probes it every `interval` so that recovery is noticed
/// (and readiness restored) without waiting for the next scan.
pub async fn run_write_prober(
    writer: WriterHandle,
    interval: std::time::Duration,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let mut failures = writer.failures();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            failing = failures.wait_for(Option::is_some) => if failing.is_err() { return },
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            () = tokio::time::sleep(interval) => {}
        }
        if let Err(StoreError::WriterGone) = writer.probe().await {
            return;
        }
    }
}

/// Starts the writer thread. It stops once every [`WriterHandle`] is dropped and the queue is
/// drained; join the returned handle to know every accepted batch was answered.
pub fn spawn(
    store: Store,
    engine: Engine,
    stall: StallPolicy,
    config: &crate::config::StoreConfig,
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
    let stalled_shipments = store.stalled_shipments()?;
    metrics::gauge!(m::SHIPMENTS_STALLED).set(stalled_shipments as f64);
    metrics::gauge!(m::CHANGE_LOG_SEQUENCE).set(last.0 as f64);
    let (tx, rx) = mpsc::channel(config.queue_batches);
    let (sequence_tx, sequence_rx) = watch::channel(last);
    let (failure_tx, failure) = watch::channel(None);
    let signals = Arc::new(Signals {
        durable: sequence_tx,
        failure: failure_tx,
    });
    let (to_syncer, written) = std::sync::mpsc::sync_channel(SYNC_QUEUE_GROUPS);
    let syncer = Syncer {
        store: store.clone(),
        signals: signals.clone(),
        changelog: changelog.clone(),
    };
    let syncer = std::thread::Builder::new()
        .name("scand-syncer".into())
        .spawn(move || syncer.run(written))?;
    let store_for_sweeps = store.clone();
    let writer = Writer {
        to_syncer,
        syncer,
        signals,
        engine,
        stall,
        last_sequence: last,
        stalled_shipments,
        group_commit_batches: config.group_commit_batches,
        batch_bytes_per_scan: 512,
        cache: ShipmentCache::new(config.shipment_cache_entries, store.restore_epoch()),
        store,
        changelog,
    };
    let thread = std::thread::Builder::new()
        .name("scand-writer".into())
        .spawn(move || writer.run(rx))?;
    Ok((
        WriterHandle {
            tx,
            failure,
            store: store_for_sweeps,
        },
        sequence_rx,
        thread,
    ))
}

/// Groups written and waiting for their WAL sync, at most.
const SYNC_QUEUE_GROUPS: usize = 4;

/// What the writer and the syncer tell the rest of scand.
struct Signals {
    /// The highest sequence whose write is durable: feeds and sinks read up to it.
    durable: watch::Sender<Sequence>,
    /// The last write's error while writes fail; `None` once one succeeds.
    failure: watch::Sender<Option<String>>,
}

impl Signals {
    /// Wakes the readers only when the sequence moved: a group without changes keeps it.
    fn advance(&self, sequence: Sequence) {
        let advanced = self.durable.send_if_modified(|durable| {
            let later = sequence > *durable;
            if later {
                *durable = sequence;
            }
            later
        });
        if advanced {
            metrics::gauge!(m::CHANGE_LOG_SEQUENCE).set(sequence.0 as f64);
        }
    }

    /// Follows whether writes succeed: `scand_store_writable`, the error count, and the
    /// failure ingest and readiness see. Only RocksDB's own errors (I/O, no space) mean the
    /// store refuses writes; a corrupt record fails its group alone.
    fn record_write(&self, error: Option<&StoreError>) {
        match error {
            Some(error) => {
                metrics::counter!(m::STORE_WRITE_ERRORS_TOTAL).increment(1);
                if !matches!(error, StoreError::Rocks(_)) {
                    return;
                }
                metrics::gauge!(m::STORE_WRITABLE).set(0.0);
                let message = error.to_string();
                self.failure.send_if_modified(|failure| {
                    let changed = failure.as_deref() != Some(message.as_str());
                    *failure = Some(message);
                    changed
                });
            }
            None => {
                if self.failure.borrow().is_some() {
                    tracing::warn!("store takes writes again");
                    metrics::gauge!(m::STORE_WRITABLE).set(1.0);
                    self.failure.send_replace(None);
                }
            }
        }
    }
}

/// What applying a group produced: each request's outcomes, the group's last sequence and the
/// changelog snapshots to send once it is durable.
struct Applied {
    outcomes: Vec<Vec<Outcome>>,
    sequence: Sequence,
    snapshots: Vec<Snapshot>,
}

/// A group written to RocksDB, waiting for the WAL sync that makes it durable. A stall
/// write comes this way too, with no requests but its sweeper's answer.
struct Written {
    group: Vec<Request>,
    applied: Applied,
    stalled: Option<StallAnswer>,
}

/// How many shipments a stall write stalled, and who waits to hear it.
struct StallAnswer {
    count: usize,
    reply: oneshot::Sender<Result<usize, StoreError>>,
}

/// Syncs the WAL for every group written since its last sync (one fsync covers them all),
/// then answers their callers, advances the durable sequence and sends their changelog
/// snapshots; dropping the answered groups frees their scans off the writer thread.
struct Syncer {
    store: Store,
    signals: Arc<Signals>,
    changelog: Option<mpsc::Sender<Snapshot>>,
}

impl Syncer {
    fn run(self, written: std::sync::mpsc::Receiver<Written>) {
        while let Ok(first) = written.recv() {
            let mut groups = vec![first];
            groups.extend(written.try_iter());
            let started = Instant::now();
            let synced = self.store.sync_wal();
            metrics::histogram!(m::STORE_SYNC_SECONDS).record(started.elapsed().as_secs_f64());
            self.signals.record_write(synced.as_ref().err());
            match synced {
                Ok(()) => {
                    for Written {
                        group,
                        applied:
                            Applied {
                                outcomes,
                                sequence,
                                snapshots,
                            },
                        stalled,
                    } in groups
                    {
                        self.signals.advance(sequence);
                        for (request, outcomes) in group.into_iter().zip(outcomes) {
                            metrics::histogram!(m::INGEST_LATENCY_SECONDS)
                                .record(request.received.elapsed().as_secs_f64());
                            // A caller that went away still had its batch stored.
                            let _ = request.reply.send(Ok(outcomes));
                        }
                        if let Some(StallAnswer { count, reply }) = stalled {
                            let _ = reply.send(Ok(count));
                        }
                        self.send_snapshots(snapshots);
                    }
                }
                Err(error) => {
                    tracing::error!(%error, groups = groups.len(), "WAL sync failed; nothing acknowledged");
                    let message = error.to_string();
                    for written in groups {
                        for request in written.group {
                            let _ = request
                                .reply
                                .send(Err(StoreError::Unwritable(message.clone())));
                        }
                        if let Some(StallAnswer { reply, .. }) = written.stalled {
                            let _ = reply.send(Err(StoreError::Unwritable(message.clone())));
                        }
                    }
                }
            }
        }
    }

    /// The group is durable whatever happens here: a missed snapshot only means the next owner
    /// of the partition resumes earlier and re-applies those scans itself.
    fn send_snapshots(&self, snapshots: Vec<Snapshot>) {
        let Some(changelog) = &self.changelog else {
            return;
        };
        for snapshot in snapshots {
            if changelog.blocking_send(snapshot).is_err() {
                tracing::warn!("changelog stopped; state is no longer replicated");
                return;
            }
        }
    }
}

struct Writer {
    /// Written groups go to the `scand-syncer` thread, which makes them durable and answers.
    to_syncer: std::sync::mpsc::SyncSender<Written>,
    syncer: std::thread::JoinHandle<()>,
    signals: Arc<Signals>,
    store: Store,
    engine: Engine,
    stall: StallPolicy,
    last_sequence: Sequence,
    /// Mirrors `META_STALLED_SHIPMENTS`: moves only with a successful write.
    stalled_shipments: u64,
    group_commit_batches: usize,
    /// What the last group's WriteBatch held per scan (events, shipment records, changes):
    /// the next one is sized from it.
    batch_bytes_per_scan: usize,
    cache: ShipmentCache,
    /// Where shipments owned by a source partition are replicated after each durable write.
    changelog: Option<mpsc::Sender<Snapshot>>,
}

impl Writer {
    fn run(mut self, mut rx: mpsc::Receiver<Job>) {
        let mut held: Option<Job> = None;
        while let Some(job) = held.take().or_else(|| rx.blocking_recv()) {
            let first = match job {
                Job::Ingest(request) => request,
                Job::Stall { now, due, reply } => {
                    match self.stall_due(now, &due) {
                        Ok((applied, count)) => self.hand_to_syncer(Written {
                            group: Vec::new(),
                            applied,
                            stalled: Some(StallAnswer { count, reply }),
                        }),
                        Err(error) => {
                            self.signals.record_write(Some(&error));
                            tracing::error!(%error, "stall write failed; nothing stalled");
                            let _ = reply.send(Err(error));
                        }
                    }
                    continue;
                }
                Job::Probe { reply } => {
                    let result = self.probe();
                    self.signals.record_write(result.as_ref().err());
                    let _ = reply.send(result);
                    continue;
                }
            };
            let mut group = vec![first];
            while group.len() < self.group_commit_batches {
                match rx.try_recv() {
                    Ok(Job::Ingest(next)) => group.push(next),
                    Ok(sweep) => {
                        held = Some(sweep);
                        break;
                    }
                    Err(_) => break,
                }
            }
            metrics::histogram!(m::STORE_GROUP_BATCHES).record(group.len() as f64);
            let started = Instant::now();
            let result = self.commit(&group);
            metrics::histogram!(m::STORE_WRITE_SECONDS).record(started.elapsed().as_secs_f64());
            if result.is_err() {
                // The group was applied to the cached states before its write failed.
                self.cache.clear();
            }
            match result {
                Ok(applied) => self.hand_to_syncer(Written {
                    group,
                    applied,
                    stalled: None,
                }),
                Err(error) => {
                    self.signals.record_write(Some(&error));
                    tracing::error!(%error, batches = group.len(), "store write failed; nothing acknowledged");
                    let message = error.to_string();
                    let refusing = matches!(error, StoreError::Rocks(_));
                    for request in group {
                        let _ = request.reply.send(Err(if refusing {
                            StoreError::Unwritable(message.clone())
                        } else {
                            StoreError::WriteFailed(message.clone())
                        }));
                    }
                }
            }
        }
        // The syncer answers what is still waiting for a sync, then stops.
        drop(self.to_syncer);
        if self.syncer.join().is_err() {
            tracing::error!("the WAL syncer panicked");
        }
        tracing::info!(
            last_sequence = self.last_sequence.0,
            "store writer drained and stopped"
        );
    }

    fn hand_to_syncer(&self, written: Written) {
        if let Err(std::sync::mpsc::SendError(orphaned)) = self.to_syncer.send(written) {
            tracing::error!("the WAL syncer stopped; answering without it");
            let stopped = || StoreError::WriteFailed("the WAL syncer stopped".into());
            for request in orphaned.group {
                let _ = request.reply.send(Err(stopped()));
            }
            if let Some(StallAnswer { reply, .. }) = orphaned.stalled {
                let _ = reply.send(Err(stopped()));
            }
        }
    }

    fn probe(&self) -> Result<(), StoreError> {
        let mut sync = WriteOptions::default();
        sync.set_sync(true);
        let now = super::now_unix_secs().to_be_bytes();
        self.store.db.put_cf_opt(
            self.store.cf(keys::META),
            keys::META_WRITE_PROBE,
            now,
            &sync,
        )?;
        Ok(())
    }

    /// Applies and writes a group (its WAL not yet synced).
    fn commit(&mut self, group: &[Request]) -> Result<Applied, StoreError> {
        let store = self.store.clone();
        let mut stored_scans = store.exclusive_state_writes();
        let scans: Vec<&StoreScan> = group.iter().flat_map(|r| r.scans.iter()).collect();
        let db = &self.store.db;
        let shipments_cf = self.store.cf(keys::SHIPMENTS);
        let events_cf = self.store.cf(keys::EVENTS);
        let changes_cf = self.store.cf(keys::CHANGES);

        // The engine applies the group to the cached states in place; only shipments the
        // cache lacks are read, in key order.
        self.cache.check_epoch(self.store.restore_epoch());
        let mut misses: Vec<&TrackingNumber> = scans
            .iter()
            .map(|s| &s.tracking_number)
            .filter(|number| !self.cache.contains(number))
            .collect();
        misses.sort_unstable();
        misses.dedup();
        for (number, state) in misses.iter().zip(self.store.shipment_states(&misses)?) {
            if let Some(state) = state {
                self.cache.insert((*number).clone(), state);
            }
        }
        let incoming = scans
            .iter()
            .enumerate()
            .map(|(index, s)| s.incoming(index))
            .collect();
        let states = self.cache.states();
        let Effects {
            outcomes,
            stored,
            removed,
            changes,
            after_terminal,
            woken,
        } = self.engine.apply(incoming, states);

        // Sized up front: grown by doubling, a group's multi-megabyte batch would be copied
        // and faulted in several times over. Events are only a third to a half of it.
        let mut batch =
            WriteBatch::with_capacity_bytes(scans.len() * self.batch_bytes_per_scan * 9 / 8);
        let received_time = prost_types::Timestamp::from(SystemTime::now());
        // Each touched shipment with the positions in `stored` of the scans this group stored
        // for it. `stored` comes grouped by shipment (the engine applies scans so): one run
        // per shipment, one state lookup per shipment, not per scan.
        let mut touched: Vec<(&TrackingNumber, std::ops::Range<usize>)> = Vec::new();
        for (position, &index) in stored.iter().enumerate() {
            let scan = scans[index];
            match touched.last_mut() {
                Some((number, run)) if *number == &scan.tracking_number => run.end = position + 1,
                _ => touched.push((&scan.tracking_number, position..position + 1)),
            }
        }
        // A replaced scan leaves its entry with the merge; one stored by an earlier layout
        // also has an `events` key.
        for (number, event_time, scan_id) in &removed {
            batch.delete_cf(events_cf, keys::event_key(number, *event_time, scan_id));
        }
        // `removed` is grouped in the same shipment order, and each of its shipments stored a
        // scan: its runs are met in step with `touched`.
        let mut removed_runs = removed.chunk_by(|(a, _, _), (b, _, _)| a == b).peekable();
        let stall_index = self.store.cf(keys::STALL_DEADLINES);
        for (number, added) in touched {
            let replaced = removed_runs
                .next_if(|run| run.first().is_some_and(|(of, _, _)| of == number))
                .unwrap_or_default();
            if let Some(state) = states.get_mut(number) {
                let added = stored[added].iter().map(|&index| scans[index]);
                for scan in added.clone() {
                    annotate(state, scan);
                }
                index_stall_deadline(&self.stall, stall_index, &mut batch, number, state);
                // A delta, not the whole record: the timeline summary is what a record holds
                // most of, and a group adds a scan or two to it (see `records`).
                let replaced = replaced.iter().map(|(_, _, scan_id)| scan_id.as_str());
                let added = added.map(|scan| records::EntryFields {
                    event_time: scan.event_time,
                    scan_id: scan.scan_id.as_str(),
                    scan_type: scan.scan_type,
                    facility: scan.facility,
                    event: &scan.stored,
                });
                batch.merge_cf(
                    shipments_cf,
                    keys::shipment_key(number),
                    records::encode_shipment_delta(state, added, replaced),
                );
            }
        }
        let mut sequence = self.last_sequence;
        let mut records = Vec::with_capacity(changes.len());
        for change in &changes {
            sequence = Sequence(sequence.0 + 1);
            let cause = change.cause.map(|index| scans[index]);
            records.push(change_record(
                sequence,
                change,
                cause,
                states.get(&change.tracking_number),
                received_time,
            ));
        }
        super::put_change_blocks(&mut batch, changes_cf, &records);
        let stalled_shipments = self.stalled_shipments.saturating_sub(u64::from(woken));
        if woken > 0 {
            batch.put_cf(
                self.store.cf(keys::META),
                keys::META_STALLED_SHIPMENTS,
                stalled_shipments.to_be_bytes(),
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
        let now_stored = (*stored_scans + stored.len() as u64).saturating_sub(removed.len() as u64);
        if now_stored != *stored_scans {
            batch.put_cf(
                self.store.cf(keys::META),
                keys::META_STORED_SCANS,
                now_stored.to_be_bytes(),
            );
        }

        if !scans.is_empty() {
            self.batch_bytes_per_scan = batch.size_in_bytes() / scans.len();
        }
        // Not synced here: the syncer syncs the WAL for this and any later group at once.
        db.write_opt(batch, &WriteOptions::default())?;

        *stored_scans = now_stored;
        self.last_sequence = sequence;
        self.stalled_shipments = stalled_shipments;
        metrics::gauge!(m::SHIPMENTS_STALLED).set(stalled_shipments as f64);
        let snapshots = match self.changelog {
            Some(_) => self.snapshots(group, &scans).unwrap_or_else(|error| {
                tracing::error!(%error, "changelog snapshots not built");
                Vec::new()
            }),
            None => Vec::new(),
        };
        record_metrics(&outcomes, &changes, after_terminal);
        let clock_skewed = stored.iter().filter(|&&i| scans[i].clock_skewed).count();
        metrics::counter!(m::SCANS_CLOCK_SKEW_TOTAL).increment(clock_skewed as u64);

        // Written: the cached states are what RocksDB holds (and serves to any read).
        self.cache.trim();
        metrics::gauge!(m::STORE_SHIPMENT_CACHE_ENTRIES).set(self.cache.len() as f64);
        let mut per_request = Vec::with_capacity(group.len());
        let mut outcomes = outcomes.into_iter().map(|(_, o)| o);
        for request in group {
            per_request.push(outcomes.by_ref().take(request.scans.len()).collect());
        }
        Ok(Applied {
            outcomes: per_request,
            sequence,
            snapshots,
        })
    }
}

/// Keeps the deadline index a lower bound of the shipment's deadline, one entry per
/// shipment at most, in the same write as its state. A scan usually moves the deadline
/// later: then nothing is written, and the sweep, finding the entry due, re-indexes the
/// shipment at its real deadline. An earlier deadline (a status with a shorter threshold)
/// replaces the entry, and a shipment that can no longer stall (delivered, returned)
/// removes it: entries the sweep would only read to drop cost it a shipment read each,
/// which at millions of stored shipments kept a core busy.
fn index_stall_deadline(
    stall: &StallPolicy,
    index: &ColumnFamily,
    batch: &mut WriteBatch,
    number: &TrackingNumber,
    state: &mut ShipmentState,
) {
    let deadline = stall.deadline(state);
    match (state.stall_deadline, deadline) {
        (None, None) => return,
        (Some(indexed), Some(deadline)) if indexed <= deadline => return,
        _ => {}
    }
    if let Some(indexed) = state.stall_deadline {
        batch.delete_cf(index, keys::stall_key(indexed, number));
    }
    if let Some(deadline) = deadline {
        batch.put_cf(index, keys::stall_key(deadline, number), []);
    }
    state.stall_deadline = deadline;
}

impl Writer {
    /// Stalls the shipments of `due` (deadline index keys the sweeper read as due at `now`):
    /// checks each entry against its stored state (a stale entry is dropped, one whose
    /// shipment had later scans is moved to its real deadline), and writes the STALLED
    /// changes, the states and the index edits as one write, synced by the syncer like a group.
    fn stall_due(
        &mut self,
        now: EventTime,
        due: &[Vec<u8>],
    ) -> Result<(Applied, usize), StoreError> {
        let store = self.store.clone();
        let _exclusive = store.exclusive_state_writes();
        let db = &self.store.db;
        let index = self.store.cf(keys::STALL_DEADLINES);
        let shipments_cf = self.store.cf(keys::SHIPMENTS);
        let mut batch = WriteBatch::default();
        let mut entries = Vec::with_capacity(due.len());
        for key in due {
            match keys::decode_stall_key(key) {
                Some(entry) => entries.push((key, entry)),
                None => {
                    batch.delete_cf(index, key);
                    tracing::warn!(key = ?key, "unreadable stall index key dropped");
                }
            }
        }
        let values = db.batched_multi_get_cf(
            shipments_cf,
            entries
                .iter()
                .map(|(_, (_, number))| keys::shipment_key(number)),
            false,
        );
        let committed = prost_types::Timestamp::from(SystemTime::now());
        let mut sequence = self.last_sequence;
        let mut stalled = Vec::new();
        let mut changes = Vec::new();
        for ((key, (deadline, number)), value) in entries.into_iter().zip(values) {
            // The sweep reads and writes records itself; a cached copy would go stale.
            self.cache.forget(&number);
            let Some(bytes) = value? else {
                batch.delete_cf(index, key);
                continue;
            };
            let mut state = match records::decode_shipment(keys::shipment_key(&number), &bytes) {
                Ok(state) => state,
                Err(error) => {
                    // Its entry stays, so it is tried again, and the rest of the chunk goes
                    // on: failing the chunk would fail every sweep on the same entries.
                    tracing::error!(%error, %number, "shipment record unreadable; not stalled");
                    metrics::counter!(m::STALL_SWEEP_UNREADABLE_TOTAL).increment(1);
                    continue;
                }
            };
            batch.delete_cf(index, key);
            if state.stall_deadline != Some(deadline) {
                continue;
            }
            let Some(change) = self
                .engine
                .stall(&self.stall, number.clone(), &mut state, now)
            else {
                // Not due after all: later scans moved its deadline (index it there), or it
                // can no longer stall (forget the entry).
                state.stall_deadline = self.stall.deadline(&state);
                if let Some(later) = state.stall_deadline {
                    batch.put_cf(index, keys::stall_key(later, &number), []);
                }
                batch.merge_cf(
                    shipments_cf,
                    keys::shipment_key(&number),
                    records::encode_shipment_head(&state),
                );
                continue;
            };
            state.stall_deadline = None;
            sequence = Sequence(sequence.0 + 1);
            batch.merge_cf(
                shipments_cf,
                keys::shipment_key(&number),
                records::encode_shipment_head(&state),
            );
            changes.push((sequence, change, deadline));
            stalled.push((number, state));
        }
        let stalled_in = changes.iter().map(|(_, c, _)| c.current.status.label());
        for (status, n) in tally(stalled_in) {
            metrics::counter!(m::SHIPMENTS_STALLED_TOTAL, "status" => status).increment(n);
        }
        if !changes.is_empty() {
            metrics::counter!(m::STATUS_CHANGES_TOTAL, "status" => Status::Stalled.label())
                .increment(changes.len() as u64);
        }
        // One change per stalled shipment, in the same order.
        let records: Vec<ChangeRecord<'_>> = changes
            .iter()
            .zip(&stalled)
            .map(|((sequence, change, deadline), (_, state))| ChangeRecord {
                event_time: Some(timestamp(*deadline)),
                ..change_record(*sequence, change, None, Some(state), committed)
            })
            .collect();
        super::put_change_blocks(&mut batch, self.store.cf(keys::CHANGES), &records);
        let stalled_shipments = self.stalled_shipments + stalled.len() as u64;
        if !stalled.is_empty() {
            let meta = self.store.cf(keys::META);
            batch.put_cf(meta, keys::META_LAST_SEQUENCE, keys::change_key(sequence));
            batch.put_cf(
                meta,
                keys::META_STALLED_SHIPMENTS,
                stalled_shipments.to_be_bytes(),
            );
        }
        db.write_opt(batch, &WriteOptions::default())?;

        self.last_sequence = sequence;
        self.stalled_shipments = stalled_shipments;
        let snapshots = match self.changelog {
            Some(_) => self.owned_snapshots(&stalled).unwrap_or_else(|error| {
                tracing::error!(%error, "changelog snapshots of a stall not built");
                Vec::new()
            }),
            None => Vec::new(),
        };
        metrics::gauge!(m::SHIPMENTS_STALLED).set(stalled_shipments as f64);
        let applied = Applied {
            outcomes: Vec::new(),
            sequence,
            snapshots,
        };
        Ok((applied, stalled.len()))
    }

    /// Snapshots of the stalled shipments that a source partition owns, positioned at the
    /// partition's stored offset (the state includes everything before it).
    fn owned_snapshots(
        &self,
        shipments: &[(TrackingNumber, ShipmentState)],
    ) -> Result<Vec<Snapshot>, StoreError> {
        let mut snapshots = Vec::new();
        for (number, state) in shipments {
            let Some(owner) = &state.owner else { continue };
            let next_offset = self
                .store
                .source_offset(&owner.topic, owner.partition)?
                .unwrap_or_default();
            snapshots.push(Snapshot {
                tracking_number: number.to_string(),
                topic: owner.topic.clone(),
                partition: owner.partition,
                next_offset,
                record: records::encode_shipment(state),
                events: self.store.timeline_values(number)?,
            });
        }
        Ok(snapshots)
    }
}

/// What a stored scan tells about its shipment beyond the timeline: who owns it and which
/// carrier its number belongs to (from the first scan that says).
fn annotate(state: &mut ShipmentState, scan: &StoreScan) {
    if let Some(origin) = &scan.origin {
        if state.owner.as_ref() != Some(origin) {
            state.owner = Some(origin.clone());
        }
    }
    if let Some(check) = &scan.number_check {
        if state.flags.tracking_number == NumberCheck::default() {
            state.flags.tracking_number = NumberCheck::clone(check);
        }
    }
}

fn timestamp(t: EventTime) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.0.div_euclid(1_000_000),
        nanos: (t.0.rem_euclid(1_000_000) * 1_000) as i32,
    }
}

/// The published form of a change. `cause` is the scan behind it (none for a stall).
fn change_record<'a>(
    sequence: Sequence,
    change: &'a Change,
    cause: Option<&'a StoreScan>,
    state: Option<&'a ShipmentState>,
    committed: prost_types::Timestamp,
) -> ChangeRecord<'a> {
    let (previous_status, previous_sub_status) = status_fields(change.previous);
    let (status, sub_status) = status_fields(Some(change.current));
    let number_check = state.map(|s| &s.flags.tracking_number);
    ChangeRecord {
        sequence: sequence.0,
        tracking_number: change.tracking_number.as_str(),
        version: change.version.0,
        previous_status,
        status,
        sub_status,
        cause_scan_id: cause.map_or("", |c| c.scan_id.as_str()),
        event_time: cause.and_then(|c| c.wire.event_time),
        location: cause.and_then(|c| c.wire.location.as_ref()),
        regression: change.regression,
        previous_sub_status,
        correction: change.correction,
        committed_time: Some(committed),
        stalled_status: stalled_status(Some(change.current)),
        carrier: number_check.map_or("", |c| c.carrier.as_str()),
        carrier_service: number_check.map_or("", |c| c.service.as_str()),
        previous_stalled_status: stalled_status(change.previous),
    }
}

impl Writer {
    /// The state of every shipment of the group that a source partition owns, for the
    /// changelog, then a marker per partition saying its state is complete up to the group's
    /// offsets: a new owner resumes at the last marker, never beyond a missing snapshot.
    fn snapshots(
        &self,
        group: &[Request],
        scans: &[&StoreScan],
    ) -> Result<Vec<Snapshot>, StoreError> {
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
        let mut snapshots = Vec::with_capacity(owned.len() + 1);
        for (number, origin) in owned {
            let Some(state) = self.cache.get(number) else {
                continue;
            };
            snapshots.push(Snapshot {
                tracking_number: number.to_string(),
                topic: origin.topic.clone(),
                partition: origin.partition,
                next_offset: next_offset(&origin.topic, origin.partition),
                record: records::encode_shipment(state),
                events: self.store.timeline_values(number)?,
            });
        }
        let mut partitions: Vec<(&str, i32)> = group
            .iter()
            .flat_map(|r| &r.offsets)
            .map(|o| (o.topic.as_str(), o.partition))
            .collect();
        partitions.sort_unstable();
        partitions.dedup();
        for (topic, partition) in partitions {
            snapshots.push(Snapshot::marker(
                topic,
                partition,
                next_offset(topic, partition),
            ));
        }
        Ok(snapshots)
    }
}

/// One registry lookup per metric and label in a group, not one per scan: a labelled lookup
/// builds and hashes its key, and the writer is the pipeline's serial stage.
fn record_metrics(outcomes: &[(usize, Outcome)], changes: &[Change], after_terminal: u32) {
    let accepted = outcomes
        .iter()
        .filter(|(_, outcome)| *outcome == Outcome::Accepted)
        .count();
    metrics::counter!(m::SCANS_ACCEPTED_TOTAL).increment(accepted as u64);
    let duplicates = outcomes.iter().filter_map(|(_, outcome)| match outcome {
        Outcome::Duplicate(kind) => Some(kind.label()),
        Outcome::Accepted => None,
    });
    for (kind, n) in tally(duplicates) {
        metrics::counter!(m::SCANS_DUPLICATE_TOTAL, "kind" => kind).increment(n);
    }
    for (status, n) in tally(changes.iter().map(|c| c.current.status.label())) {
        metrics::counter!(m::STATUS_CHANGES_TOTAL, "status" => status).increment(n);
    }
    let regressions = changes.iter().filter(|c| c.regression).count();
    if regressions > 0 {
        metrics::counter!(m::STATUS_REGRESSIONS_TOTAL).increment(regressions as u64);
    }
    metrics::counter!(m::SCANS_AFTER_TERMINAL_TOTAL).increment(u64::from(after_terminal));
}

/// Occurrences of each label, in order of first occurrence. Labels are few (a status, a
/// duplicate kind), so a scan of the short list beats hashing.
fn tally(labels: impl Iterator<Item = &'static str>) -> Vec<(&'static str, u64)> {
    let mut counts: Vec<(&'static str, u64)> = Vec::new();
    for label in labels {
        match counts.iter_mut().find(|(seen, _)| *seen == label) {
            Some((_, n)) => *n += 1,
            None => counts.push((label, 1)),
        }
    }
    counts
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::Status;
    use crate::engine::States;
    use prost::Message;
    use rocksdb::IteratorMode;
    use std::time::Duration;

    const HOUR: i64 = 3_600_000_000;

    #[test]
    fn tally_counts_each_label_in_order_of_first_occurrence() {
        let labels = ["in_transit", "delivered", "in_transit", "in_transit"];
        assert_eq!(
            tally(labels.into_iter()),
            vec![("in_transit", 3), ("delivered", 1)]
        );
        assert_eq!(tally(std::iter::empty()), vec![]);
    }

    fn policy() -> StallPolicy {
        StallPolicy::new([
            (Status::InTransit, Duration::from_secs(48 * 3600)),
            (Status::OutForDelivery, Duration::from_secs(12 * 3600)),
        ])
    }

    fn scan(number: &str, id: &str, scan_type: ScanType, hours: i64) -> StoreScan {
        let event_time = EventTime(hours * HOUR);
        let tracking_number = TrackingNumber::parse(number).expect("valid");
        let scan_id = ScanId::parse(id).expect("valid");
        let mut wire = pb::Scan {
            scan_id: id.into(),
            tracking_number: number.into(),
            scan_type: scan_type.as_i32(),
            event_time: Some(timestamp(event_time)),
            ..Default::default()
        };
        StoreScan {
            stored: records::encode_event(&mut wire),
            tracking_number,
            scan_id,
            scan_type,
            event_time,
            facility: 1,
            wire,
            origin: None,
            clock_skewed: false,
            number_check: None,
        }
    }

    async fn ingest(writer: &WriterHandle, scans: Vec<StoreScan>) {
        let answer = writer
            .enqueue(scans, Vec::new(), Instant::now())
            .await
            .expect("queued");
        answer.await.expect("answered").expect("durable");
    }

    fn shipment(store: &Store, number: &str) -> pb::Shipment {
        store
            .shipment(&TrackingNumber::parse(number).expect("valid"))
            .expect("read")
            .expect("exists")
    }

    /// One sorting scan at hour 0 for each shipment: in transit, due to stall at hour 48.
    async fn ingest_in_transit(writer: &WriterHandle, numbers: &[&str]) {
        let scans = numbers
            .iter()
            .map(|number| scan(number, "a1", ScanType::Sorted, 0))
            .collect();
        ingest(writer, scans).await;
    }

    fn spawn_writer(store: &Store) -> (WriterHandle, std::thread::JoinHandle<()>) {
        let (writer, _, thread) = spawn(
            store.clone(),
            Engine::new(Duration::from_secs(60)),
            policy(),
            &crate::config::StoreConfig {
                queue_batches: 4,
                group_commit_batches: 4,
                ..crate::config::StoreConfig::default()
            },
            None,
        )
        .expect("spawns");
        (writer, thread)
    }

    #[tokio::test]
    async fn scans_an_earlier_layout_stored_under_events_keys_read_in_order_with_later_ones() {
        let (_dir, config) = crate::store::tests::temp_config();
        let number = TrackingNumber::parse("PARCEL0001").expect("valid");
        {
            // What a version 2 build left: the scan under its `events` key, the record without
            // it, no count of stored scans.
            let store = Store::open(&config).expect("opens");
            let old = scan("PARCEL0001", "old", ScanType::PickedUp, 5);
            let mut states = States::default();
            Engine::new(Duration::from_secs(60)).apply(vec![old.incoming(0)], &mut states);
            let state = states.get(&number).expect("applied");
            let db = &store.db;
            db.put_cf(
                store.cf(keys::EVENTS),
                keys::event_key(&number, old.event_time, &old.scan_id),
                &old.stored,
            )
            .expect("writes");
            db.put_cf(
                store.cf(keys::SHIPMENTS),
                keys::shipment_key(&number),
                records::encode_shipment(state),
            )
            .expect("writes");
            let meta = store.cf(keys::META);
            db.put_cf(meta, keys::META_SCHEMA_VERSION, 2u32.to_be_bytes())
                .expect("writes");
            db.delete_cf(meta, keys::META_STORED_SCANS).expect("writes");
        }
        let store = Store::open(&config).expect("opens");
        assert_eq!(store.stored_scans().expect("reads"), 1, "estimated");
        let (writer, thread) = spawn_writer(&store);
        // One late scan before the old one, one after it.
        ingest(
            &writer,
            vec![
                scan("PARCEL0001", "new", ScanType::Sorted, 9),
                scan("PARCEL0001", "early", ScanType::LabelCreated, 1),
            ],
        )
        .await;
        let timeline = shipment(&store, "PARCEL0001").timeline;
        let ids: Vec<&str> = timeline.iter().map(|s| s.scan_id.as_str()).collect();
        assert_eq!(ids, ["early", "old", "new"]);
        assert_eq!(
            timeline[1],
            scan("PARCEL0001", "old", ScanType::PickedUp, 5).wire
        );
        let values = store.timeline_values(&number).expect("reads");
        assert_eq!(
            values,
            timeline
                .iter()
                .map(Message::encode_to_vec)
                .collect::<Vec<_>>()
        );
        assert_eq!(store.stored_scans().expect("reads"), 3);
        drop(writer);
        thread.join().expect("writer stops");
    }

    /// Deltas written group by group, merged by RocksDB on read, at flush (deltas combined
    /// without their record) and at compaction, give the bytes of the record the engine's
    /// state has after the same groups: late scans, fingerprint replacements (also within a
    /// group) and duplicates included.
    #[tokio::test]
    async fn shipment_deltas_merge_into_the_record_of_the_engines_state() {
        let (_dir, store) = crate::store::tests::temp_store();
        let (writer, _, thread) = spawn(
            store.clone(),
            Engine::new(Duration::from_secs(60)),
            StallPolicy::new([]),
            &crate::config::StoreConfig::default(),
            None,
        )
        .expect("spawns");
        let engine = Engine::new(Duration::from_secs(60));
        let mut expected = States::default();
        let types = [
            ScanType::LabelCreated,
            ScanType::Sorted,
            ScanType::DepartedFacility,
            ScanType::OutForDelivery,
        ];
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = |bound: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % bound
        };
        let shipments_cf = store.cf(keys::SHIPMENTS);
        let stored_records = |store: &Store, expected: &States| {
            expected
                .iter()
                .map(|(number, state)| {
                    let key = keys::shipment_key(number);
                    let merged = store
                        .db
                        .get_cf(store.cf(keys::SHIPMENTS), key)
                        .expect("reads")
                        .expect("stored");
                    // The record's state, and its stored scans in timeline order.
                    let scan_ids = |scans: Vec<Vec<u8>>| -> Vec<String> {
                        scans
                            .iter()
                            .map(|bytes| pb::Scan::decode(bytes.as_slice()).expect("scan"))
                            .map(|scan| scan.scan_id)
                            .collect()
                    };
                    let merged = (
                        records::decode_shipment(key, &merged).expect("decodes"),
                        scan_ids(store.timeline_values(number).expect("scans")),
                    );
                    let ids = state.timeline.iter().map(|e| e.scan_id.to_string());
                    (merged, (state.clone(), ids.collect::<Vec<_>>()))
                })
                .collect::<Vec<_>>()
        };
        for group in 0..40 {
            let batch: Vec<StoreScan> = (0..1 + next(8))
                .map(|_| {
                    scan(
                        &format!("DELTA{:05}", next(5)),
                        &format!("s{}", next(60)),
                        types[next(4) as usize],
                        next(12) as i64,
                    )
                })
                .collect();
            let incoming = batch
                .iter()
                .enumerate()
                .map(|(index, s)| s.incoming(index))
                .collect();
            engine.apply(incoming, &mut expected);
            ingest(&writer, batch).await;
            if group % 10 == 9 {
                store.db.flush_cf(shipments_cf).expect("flushes");
            }
        }
        let replaced: usize = expected.values().map(|s| s.replaced.len()).sum();
        assert!(replaced > 0, "the workload replaces some reads");
        for (merged, record) in stored_records(&store, &expected) {
            assert_eq!(merged, record);
        }
        store
            .db
            .compact_range_cf(shipments_cf, None::<&[u8]>, None::<&[u8]>);
        for (merged, record) in stored_records(&store, &expected) {
            assert_eq!(merged, record);
        }
        drop(writer);
        thread.join().expect("writer stops");
    }

    fn deadline_index(store: &Store) -> Vec<(i64, String)> {
        store
            .db
            .iterator_cf(store.cf(keys::STALL_DEADLINES), IteratorMode::Start)
            .map(|item| {
                let (key, _) = item.expect("reads");
                let (deadline, number) = keys::decode_stall_key(&key).expect("decodes");
                (deadline.0 / HOUR, number.as_str().to_owned())
            })
            .collect()
    }

    #[tokio::test]
    async fn the_deadline_index_holds_one_entry_per_shipment_that_can_stall() {
        let (_dir, store) = crate::store::tests::temp_store();
        let (writer, thread) = spawn_writer(&store);
        ingest(
            &writer,
            vec![
                scan("COURIER001", "a1", ScanType::Sorted, 0),
                scan("DONE000001", "b1", ScanType::Sorted, 0),
                scan("MOVING0001", "c1", ScanType::Sorted, 0),
            ],
        )
        .await;
        assert_eq!(
            deadline_index(&store),
            vec![
                (48, "COURIER001".to_owned()),
                (48, "DONE000001".to_owned()),
                (48, "MOVING0001".to_owned()),
            ]
        );
        ingest(
            &writer,
            vec![
                scan("COURIER001", "a2", ScanType::OutForDelivery, 1),
                scan("DONE000001", "b2", ScanType::Delivered, 2),
                scan("MOVING0001", "c2", ScanType::Sorted, 10),
            ],
        )
        .await;
        assert_eq!(
            deadline_index(&store),
            vec![(13, "COURIER001".to_owned()), (48, "MOVING0001".to_owned())],
            "an earlier deadline replaces the entry, a delivered shipment has none, a later one \
             leaves the entry as a lower bound for the sweep"
        );
        drop(writer);
        thread.join().expect("writer stops");
    }

    #[tokio::test]
    async fn a_sweep_stalls_at_most_what_it_reads_and_says_more_are_due() {
        let (_dir, store) = crate::store::tests::temp_store();
        let (writer, thread) = spawn_writer(&store);
        let scans: Vec<StoreScan> = (0..=SWEEP_READ)
            .map(|n| scan(&format!("LIMIT{n:05}"), "a1", ScanType::Sorted, 0))
            .collect();
        for batch in scans.chunks(500) {
            ingest(&writer, batch.to_vec()).await;
        }
        let first = writer.sweep(EventTime(48 * HOUR)).await.expect("sweeps");
        assert_eq!((first.stalled, first.more_due), (SWEEP_READ, true));
        let second = writer.sweep(EventTime(48 * HOUR)).await.expect("sweeps");
        assert_eq!((second.stalled, second.more_due), (1, false));
        drop(writer);
        thread.join().expect("writer stops");
    }

    /// A record that does not decode fails neither its chunk nor the sweeps after it: the
    /// shipments beside it stall, and its own entry stays for the next sweep to try again.
    #[tokio::test]
    async fn a_due_shipment_whose_record_is_unreadable_is_kept_and_the_rest_stall() {
        let (_dir, store) = crate::store::tests::temp_store();
        let (writer, thread) = spawn_writer(&store);
        ingest_in_transit(&writer, &["BROKEN0001", "SOUND00001"]).await;
        store
            .db
            .put_cf(store.cf(keys::SHIPMENTS), b"BROKEN0001", [0xff; 3])
            .expect("overwrites");
        for expected_stalls in [1, 0] {
            let swept = writer.sweep(EventTime(48 * HOUR)).await.expect("sweeps");
            assert_eq!((swept.stalled, swept.more_due), (expected_stalls, false));
            assert_eq!(deadline_index(&store), vec![(48, "BROKEN0001".into())]);
        }
        assert_eq!(
            shipment(&store, "SOUND00001").status,
            pb::Status::Stalled as i32
        );
        assert_eq!(store.stalled_shipments().expect("count"), 1);
        drop(writer);
        thread.join().expect("writer stops");
    }

    /// The sweeper reads the due entries before the writer stalls them: a scan written in
    /// between (here a delivery, which drops the entry) wins, and the entry is not stalled.
    #[tokio::test]
    async fn due_entries_a_scan_superseded_after_the_sweep_read_them_are_not_stalled() {
        let (_dir, store) = crate::store::tests::temp_store();
        let (writer, thread) = spawn_writer(&store);
        ingest_in_transit(&writer, &["RACE000001", "RACE000002"]).await;
        let now = EventTime(48 * HOUR);
        let due = store.due_stall_keys(now, SWEEP_READ).expect("reads");
        assert_eq!(due.len(), 2);
        ingest(
            &writer,
            vec![scan("RACE000001", "a2", ScanType::Delivered, 1)],
        )
        .await;
        let (reply, answer) = oneshot::channel();
        writer
            .tx
            .send(Job::Stall { now, due, reply })
            .await
            .expect("queued");
        assert_eq!(answer.await.expect("answered").expect("durable"), 1);
        assert_eq!(
            shipment(&store, "RACE000001").status,
            pb::Status::Delivered as i32
        );
        assert_eq!(
            shipment(&store, "RACE000002").status,
            pb::Status::Stalled as i32
        );
        assert_eq!(deadline_index(&store), vec![]);
        assert_eq!(store.stalled_shipments().expect("count"), 1);
        drop(writer);
        thread.join().expect("writer stops");
    }

    #[tokio::test]
    async fn shipments_stall_at_their_deadline_once_and_a_later_scan_moves_them_on() {
        let (_dir, store) = crate::store::tests::temp_store();
        let (writer, thread) = spawn_writer(&store);
        ingest(
            &writer,
            vec![
                scan("TRANSIT001", "a1", ScanType::Sorted, 0),
                scan("COURIER001", "b1", ScanType::OutForDelivery, 0),
                scan("DONE000001", "c1", ScanType::Delivered, 0),
                scan("MOVING0001", "d1", ScanType::Sorted, 0),
                scan("MOVING0001", "d2", ScanType::Sorted, 10),
            ],
        )
        .await;
        ingest(
            &writer,
            vec![scan("MOVING0001", "d3", ScanType::Loaded, 20)],
        )
        .await;
        let sweep = |hours: i64| {
            let writer = writer.clone();
            async move { writer.sweep(EventTime(hours * HOUR)).await.expect("sweeps") }
        };
        assert_eq!(sweep(11).await.stalled, 0);
        assert_eq!(
            sweep(12).await.stalled,
            1,
            "out for delivery stalls after 12 h"
        );
        assert_eq!(sweep(47).await.stalled, 0);
        assert_eq!(
            sweep(67).await.stalled,
            1,
            "TRANSIT001 stalls at 48 h; MOVING0001's latest scan (20 h) moved it to 68 h"
        );
        assert_eq!(
            sweep(68).await.stalled,
            1,
            "MOVING0001 at its real deadline"
        );
        assert_eq!(
            sweep(2000).await.stalled,
            0,
            "stalled once, delivered never"
        );
        assert_eq!(store.stalled_shipments().expect("count"), 3);

        let transit = shipment(&store, "TRANSIT001");
        assert_eq!(transit.status, pb::Status::Stalled as i32);
        assert_eq!(transit.stalled_status, pb::Status::InTransit as i32);
        assert_eq!(transit.sub_status, pb::ScanType::Sorted as i32);
        assert_eq!(transit.version, 2);
        // The sweep rewrote the head, not the timeline: every stored scan is still there.
        assert_eq!(
            transit.timeline,
            vec![scan("TRANSIT001", "a1", ScanType::Sorted, 0).wire]
        );
        let moving = shipment(&store, "MOVING0001").timeline;
        let ids: Vec<&str> = moving.iter().map(|s| s.scan_id.as_str()).collect();
        assert_eq!(ids, ["d1", "d2", "d3"]);
        let changes = store
            .changes(Sequence(0), Sequence(u64::MAX), 100)
            .expect("changes");
        let stalls: Vec<_> = changes
            .iter()
            .filter(|c| c.status == pb::Status::Stalled as i32)
            .map(|c| {
                (
                    c.tracking_number.as_str(),
                    c.version,
                    c.stalled_status,
                    c.event_time.map(|t| t.seconds),
                    c.cause_scan_id.as_str(),
                )
            })
            .collect();
        assert_eq!(
            stalls,
            vec![
                (
                    "COURIER001",
                    2,
                    pb::Status::OutForDelivery as i32,
                    Some(12 * 3600),
                    ""
                ),
                (
                    "TRANSIT001",
                    2,
                    pb::Status::InTransit as i32,
                    Some(48 * 3600),
                    ""
                ),
                (
                    "MOVING0001",
                    3,
                    pb::Status::InTransit as i32,
                    Some(68 * 3600),
                    ""
                ),
            ]
        );

        ingest(
            &writer,
            vec![scan("TRANSIT001", "a0", ScanType::PickedUp, -5)],
        )
        .await;
        assert_eq!(
            shipment(&store, "TRANSIT001").status,
            pb::Status::Stalled as i32,
            "an older scan uploaded late does not wake it"
        );
        ingest(
            &writer,
            vec![scan("TRANSIT001", "a2", ScanType::Sorted, 50)],
        )
        .await;
        let woken = store
            .changes(Sequence(8), Sequence(u64::MAX), 100)
            .expect("changes");
        let [change] = woken.as_slice() else {
            panic!("one change: {woken:?}")
        };
        assert_eq!(
            (
                change.previous_status,
                change.previous_stalled_status,
                change.status,
                change.sub_status,
                change.version,
                change.cause_scan_id.as_str()
            ),
            (
                pb::Status::Stalled as i32,
                pb::Status::InTransit as i32,
                pb::Status::InTransit as i32,
                pb::ScanType::Sorted as i32,
                3,
                "a2"
            )
        );
        assert_eq!(store.stalled_shipments().expect("count"), 2);
        assert_eq!(
            sweep(97).await.stalled,
            0,
            "its deadline moved to 50 h + 48 h"
        );
        assert_eq!(sweep(98).await.stalled, 1);

        drop(writer);
        thread.join().expect("writer stops");
    }
}
