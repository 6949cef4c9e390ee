//! The syncer: a thread that syncs the WAL once for every group the writer wrote since its last
//! sync, then answers those groups' callers, advances the durable sequence readers stop at, and
//! hands their changelog snapshots on.
//!
//! Invariant: nothing is answered Ok, and no sequence becomes visible, before the sync that
//! covers its write returned Ok; a failed sync answers every waiting group UNAVAILABLE.

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{mpsc, oneshot, watch};

use super::{Outgoing, Replica, Request};
use crate::domain::Sequence;
use crate::engine::retention::Removed;
use crate::engine::Outcome;
use crate::store::{Store, StoreError};
use crate::telemetry::metrics as m;

/// Groups written and waiting for their WAL sync, at most.
pub(super) const SYNC_QUEUE_GROUPS: usize = 4;

/// What the writer and the syncer tell the rest of scand.
pub(super) struct Signals {
    /// The highest sequence whose write is durable: feeds and sinks read up to it.
    pub(super) durable: watch::Sender<Sequence>,
    /// The last write's error while writes fail; `None` once one succeeds.
    pub(super) failure: watch::Sender<Option<String>>,
}

impl Signals {
    /// Wakes the readers only when the sequence moved: a group without changes keeps it.
    pub(super) fn advance(&self, sequence: Sequence) {
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
    pub(super) fn record_write(&self, error: Option<&StoreError>) {
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
pub(super) struct Applied {
    pub(super) outcomes: Vec<Vec<Outcome>>,
    pub(super) sequence: Sequence,
    pub(super) snapshots: Vec<Outgoing>,
    /// Changes of shipments whose partition was no longer owned here: no snapshot carries them.
    pub(super) void: Vec<u64>,
}

/// A group written to RocksDB, waiting for the WAL sync that makes it durable. A sweep
/// write comes this way too, with no requests but its sweeper's answer.
pub(super) struct Written {
    pub(super) group: Vec<Request>,
    pub(super) applied: Applied,
    pub(super) swept: Option<SweepAnswer>,
}

/// What a sweep write did (shipments stalled, what retention removed), and who waits to hear it.
pub(super) struct SweepAnswer {
    pub(super) swept: (usize, Removed),
    pub(super) reply: oneshot::Sender<Result<(usize, Removed), StoreError>>,
}

/// Syncs the WAL for every group written since its last sync (one fsync covers them all),
/// then answers their callers, advances the durable sequence and sends their changelog
/// snapshots; dropping the answered groups frees their scans off the writer thread.
pub(super) struct Syncer {
    pub(super) store: Store,
    pub(super) signals: Arc<Signals>,
    pub(super) changelog: Option<mpsc::Sender<Replica>>,
}

impl Syncer {
    pub(super) fn run(self, written: std::sync::mpsc::Receiver<Written>) {
        while let Ok(first) = written.recv() {
            // A test's stand-in for the syncer's death (a panic): it stops with groups unsynced.
            fail::fail_point!("wal-syncer-stops", |_| ());
            let mut groups = vec![first];
            groups.extend(written.try_iter());
            let started = Instant::now();
            let spans: Vec<tracing::Span> = groups
                .iter()
                .flat_map(|written| &written.group)
                .map(|request| tracing::info_span!(parent: &request.span, "wal_sync"))
                .collect();
            let synced = self.store.sync_wal();
            drop(spans);
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
                                void,
                            },
                        swept,
                    } in groups
                    {
                        self.signals.advance(sequence);
                        for (request, outcomes) in group.into_iter().zip(outcomes) {
                            metrics::histogram!(m::INGEST_LATENCY_SECONDS)
                                .record(request.received.elapsed().as_secs_f64());
                            // A caller that went away still had its batch stored.
                            let _ = request.reply.send(Ok(outcomes));
                        }
                        if let Some(SweepAnswer { swept, reply }) = swept {
                            let _ = reply.send(Ok(swept));
                        }
                        self.send_snapshots(snapshots, sequence, void);
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
                        if let Some(SweepAnswer { reply, .. }) = written.swept {
                            let _ = reply.send(Err(StoreError::Unwritable(message.clone())));
                        }
                    }
                }
            }
        }
    }

    /// The group is durable whatever happens here: a missed snapshot only means the next owner
    /// of the partition resumes earlier and re-applies those scans itself.
    fn send_snapshots(&self, snapshots: Vec<Outgoing>, sequence: Sequence, void: Vec<u64>) {
        let Some(changelog) = &self.changelog else {
            return;
        };
        let through = Replica::Through { sequence, void };
        for replica in snapshots
            .into_iter()
            .map(Replica::Snapshot)
            .chain([through])
        {
            if changelog.blocking_send(replica).is_err() {
                tracing::warn!("changelog stopped; state is no longer replicated");
                return;
            }
        }
    }
}
