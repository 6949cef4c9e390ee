//! The single writer: a dedicated thread that takes ingest batches from a bounded queue,
//! combines those waiting into one group (group commit), runs the engine over them against the
//! stored shipment state, and writes the result as one `WriteBatch`. A second thread, the
//! syncer, then syncs the WAL (one fsync for every group written since the last) and only then
//! answers the groups' callers, so an answer means durable; meanwhile the writer applies the
//! next group. A stall sweep reads the due part of the deadline index off this thread and
//! hands the writer the due shipments in small chunks, each written and synced like a group.
//!
//! Here: the queue, its handle and the writer thread's loop. `commit` applies a group,
//! `syncer` makes it durable and answers, `sweep` stalls due shipments, `replicate` builds the
//! changelog snapshots, `changes` the published form of a change.
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

mod changes;
mod commit;
mod replicate;
mod restore;
mod sweep;
mod syncer;
#[cfg(test)]
mod tests;

use std::sync::Arc;
use std::time::Instant;

use rocksdb::WriteOptions;
use tokio::sync::{mpsc, oneshot, watch};

use super::cache::ShipmentCache;
use super::{keys, Store, StoreError};
use crate::domain::ownership::Ownership;
use crate::domain::scan::ValidScan;
use crate::domain::{EventTime, Sequence};
use crate::engine::retention::{Removed, RetentionPolicy};
use crate::engine::stall::StallPolicy;
use crate::engine::{Engine, Outcome};
use crate::telemetry::metrics as m;
pub use replicate::{Assembler, Outgoing, Replica, Snapshot};
pub use sweep::{run_sweeper, ChangeLogRetention, Swept};
use syncer::{Signals, SweepAnswer, Syncer, Written, SYNC_QUEUE_GROUPS};

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
    scans: Vec<ValidScan>,
    offsets: Vec<SourceOffset>,
    received: Instant,
    reply: oneshot::Sender<Result<Vec<Outcome>, StoreError>>,
    /// The caller's span (its batch's): the group commit and the sync of it are its children.
    span: tracing::Span,
}

/// What the writer thread is asked to do, in queue order.
enum Job {
    Ingest(Request),
    /// Sweep the shipments of these due deadline index keys (read by the sweeper) whose
    /// deadline is still at or before `now`; answered with how many stalled and what retention
    /// removed, once durable.
    Sweep {
        now: EventTime,
        due: Vec<Vec<u8>>,
        reply: oneshot::Sender<Result<(usize, Removed), StoreError>>,
    },
    /// A tiny synced write: does the store take writes again?
    Probe {
        reply: oneshot::Sender<Result<(), StoreError>>,
    },
    /// Install shipments of a source partition replicated from its previous owner (a chunk of
    /// its changelog); answered with how many, once durable.
    Install {
        topic: String,
        partition: i32,
        snapshots: Vec<Snapshot>,
        reply: oneshot::Sender<Result<usize, StoreError>>,
    },
    /// A source partition's restore is complete: store where its consumption resumes and put
    /// back (a chunk of) its parked deadlines; answered with the offset and whether parked
    /// deadlines are left.
    Resume {
        topic: String,
        partition: i32,
        resume: i64,
        /// The first resume job of a restore (more follow while deadlines stay parked).
        first: bool,
        reply: oneshot::Sender<Result<(i64, bool), StoreError>>,
    },
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

    /// Has the writer install a chunk of a source partition's replicated shipments over the
    /// state here and waits until they are durable. Blocking: for the restore, which
    /// reads the changelog on a thread of its own.
    pub fn install_blocking(
        &self,
        topic: &str,
        partition: i32,
        snapshots: Vec<Snapshot>,
    ) -> Result<usize, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .blocking_send(Job::Install {
                topic: topic.to_owned(),
                partition,
                snapshots,
                reply,
            })
            .map_err(|_| StoreError::WriterGone)?;
        answer.blocking_recv().map_err(|_| StoreError::WriterGone)?
    }

    /// Ends a source partition's restore: consumption resumes at `resume` (the changelog's last
    /// complete-state marker), even when the state here is further along, and the deadlines parked
    /// while another instance owned the partition are put back. Returns where to resume.
    /// Blocking, like [`WriterHandle::install_blocking`].
    pub fn resume_blocking(
        &self,
        topic: &str,
        partition: i32,
        resume: i64,
    ) -> Result<i64, StoreError> {
        let mut first = true;
        loop {
            let (reply, answer) = oneshot::channel();
            self.tx
                .blocking_send(Job::Resume {
                    topic: topic.to_owned(),
                    partition,
                    resume,
                    first: std::mem::take(&mut first),
                    reply,
                })
                .map_err(|_| StoreError::WriterGone)?;
            let (from, more) = answer
                .blocking_recv()
                .map_err(|_| StoreError::WriterGone)??;
            if !more {
                return Ok(from);
            }
        }
    }

    /// Queues a batch for the writer, waiting while its queue is full. The receiver resolves
    /// once the batch is durable, with one outcome per scan in order.
    pub async fn enqueue(
        &self,
        scans: Vec<ValidScan>,
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
                span: tracing::Span::current(),
            }))
            .await
            .map_err(|_| StoreError::WriterGone)?;
        Ok(answer)
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
    retention: RetentionPolicy,
    last_sequence: Sequence,
    /// Mirrors `META_STALLED_SHIPMENTS`: moves only with a successful write.
    stalled_shipments: u64,
    /// Mirrors `META_STORED_SCANS`: moves only with a successful write.
    stored_scans: u64,
    group_commit_batches: usize,
    /// What the last group's WriteBatch held per scan (shipment deltas with their scans,
    /// changes):
    /// the next one is sized from it.
    batch_bytes_per_scan: usize,
    cache: ShipmentCache,
    /// Partitions a restore has this instance read again, and what it installed.
    rereads: restore::Rereads,
    /// Where shipments owned by a source partition are replicated, and which partitions are
    /// owned here: a shipment of a partition owned elsewhere is neither swept nor replicated.
    replication: Option<Replication>,
}

/// Scale-out: the changelog that replicates each source partition's shipments after every
/// durable write, and the fence saying which partitions this instance owns.
#[derive(Clone)]
pub struct Replication {
    pub snapshots: mpsc::Sender<Replica>,
    pub ownership: Ownership,
    /// This instance's publisher id, which its snapshots carry.
    pub publisher: u64,
}

impl Writer {
    fn run(mut self, mut rx: mpsc::Receiver<Job>) {
        let mut held: Option<Job> = None;
        while let Some(job) = held.take().or_else(|| rx.blocking_recv()) {
            let first = match job {
                Job::Ingest(request) => request,
                Job::Sweep { now, due, reply } => {
                    match self.sweep_due(now, &due) {
                        Ok((applied, stalled, removed)) => self.hand_to_syncer(Written {
                            group: Vec::new(),
                            applied,
                            swept: Some(SweepAnswer {
                                swept: (stalled, removed),
                                reply,
                            }),
                        }),
                        Err(error) => {
                            self.signals.record_write(Some(&error));
                            tracing::error!(%error, "sweep write failed; nothing stalled or removed");
                            let _ = reply.send(Err(error));
                        }
                    }
                    continue;
                }
                Job::Probe { reply } => {
                    // A writer whose syncer died answers no batch again: say so to the check.
                    let result = if self.syncer.is_finished() {
                        Err(StoreError::SyncerGone)
                    } else {
                        self.probe()
                    };
                    self.signals.record_write(result.as_ref().err());
                    let _ = reply.send(result);
                    continue;
                }
                Job::Install {
                    topic,
                    partition,
                    snapshots,
                    reply,
                } => {
                    let result = self.install(&topic, partition, &snapshots);
                    self.signals.record_write(result.as_ref().err());
                    let _ = reply.send(result);
                    continue;
                }
                Job::Resume {
                    topic,
                    partition,
                    resume,
                    first,
                    reply,
                } => {
                    let result = self.resume(&topic, partition, resume, first);
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
            let spans: Vec<tracing::Span> = group
                .iter()
                .map(
                    |r| tracing::info_span!(parent: &r.span, "group_commit", batches = group.len()),
                )
                .collect();
            let result = self.commit(&group);
            drop(spans);
            metrics::histogram!(m::STORE_WRITE_SECONDS).record(started.elapsed().as_secs_f64());
            if result.is_err() {
                // The group was applied to the cached states before its write failed.
                self.cache.clear();
            }
            match result {
                Ok(applied) => self.hand_to_syncer(Written {
                    group,
                    applied,
                    swept: None,
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
            if let Some(SweepAnswer { reply, .. }) = orphaned.swept {
                let _ = reply.send(Err(stopped()));
            }
        }
    }

    fn probe(&self) -> Result<(), StoreError> {
        let mut sync = WriteOptions::default();
        sync.set_sync(true);
        let now = crate::store::now_unix_secs().to_be_bytes();
        self.store.db.put_cf_opt(
            self.store.cf(keys::META),
            keys::META_WRITE_PROBE,
            now,
            &sync,
        )?;
        Ok(())
    }
}

/// Starts the writer thread. It stops once every [`WriterHandle`] is dropped and the queue is
/// drained; join the returned handle to know every accepted batch was answered.
pub fn spawn(
    store: Store,
    engine: Engine,
    policies: (StallPolicy, RetentionPolicy),
    config: &super::StoreConfig,
    replication: Option<Replication>,
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
    let stored_scans = store.stored_scans()?;
    metrics::gauge!(m::SHIPMENTS_STALLED).set(stalled_shipments as f64);
    metrics::gauge!(m::CHANGE_LOG_SEQUENCE).set(last.0 as f64);
    metrics::gauge!(m::CHANGE_LOG_FIRST_SEQUENCE).set(store.first_sequence()?.0 as f64);
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
        changelog: replication.as_ref().map(|r| r.snapshots.clone()),
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
        stall: policies.0,
        retention: policies.1,
        last_sequence: last,
        stalled_shipments,
        stored_scans,
        group_commit_batches: config.group_commit_batches,
        batch_bytes_per_scan: 512,
        cache: ShipmentCache::new(config.shipment_cache_entries),
        rereads: restore::Rereads::default(),
        store,
        replication,
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
