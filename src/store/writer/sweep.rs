//! The stall sweep: a task that reads the due part of the deadline index off the writer thread
//! and has the writer stall those shipments in small chunks, each written and synced like a
//! group, and the index the writer keeps beside each shipment's state.
//!
//! Invariant: the index holds at most one entry per shipment, never later than its real
//! deadline, so a due shipment is never missed; an entry is checked against the stored state
//! before anything is stalled, so a scan written after the sweep read the entry wins.

use std::time::{Instant, SystemTime};

use rocksdb::{ColumnFamily, WriteBatch, WriteOptions};
use tokio::sync::oneshot;

use super::changes::{change_record, tally, timestamp};
use super::syncer::Applied;
use super::{Job, Writer, WriterHandle};
use crate::domain::{EventTime, Sequence, Status, TrackingNumber};
use crate::engine::stall::StallPolicy;
use crate::engine::ShipmentState;
use crate::store::codec::{self, ChangeRecord};
use crate::store::{keys, StoreError};
use crate::telemetry::metrics as m;

/// Most entries of the deadline index one sweep reads; the rest are due at the next sweep,
/// which follows at once. Read off the writer thread and many at a time: each read of the
/// index sorts a copy of its live memtable (tens of milliseconds at 8 MiB).
pub(super) const SWEEP_READ: usize = 8_192;

/// Most due shipments the writer stalls in one write. Each chunk queues behind the scans
/// already waiting and is written unsynced like a group, so a sweep holds the writer about as
/// long as a group of scans at a time (1,000 shipments, read and synced on the writer, held it
/// for 30-60 ms; 10,000 for a few hundred, the p99 of every ack waiting behind it).
const SWEEP_CHUNK: usize = 256;

/// What one sweep did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Swept {
    pub stalled: usize,
    /// More shipments are due than one sweep handles: sweep again now.
    pub more_due: bool,
}

impl WriterHandle {
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

/// Keeps the deadline index a lower bound of the shipment's deadline, one entry per
/// shipment at most, in the same write as its state. A scan usually moves the deadline
/// later: then nothing is written, and the sweep, finding the entry due, re-indexes the
/// shipment at its real deadline. An earlier deadline (a status with a shorter threshold)
/// replaces the entry, and a shipment that can no longer stall (delivered, returned)
/// removes it: entries the sweep would only read to drop cost it a shipment read each,
/// which at millions of stored shipments kept a core busy.
pub(super) fn index_stall_deadline(
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
    pub(super) fn stall_due(
        &mut self,
        now: EventTime,
        due: &[Vec<u8>],
    ) -> Result<(Applied, usize), StoreError> {
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
            let mut state = match codec::decode_shipment(keys::shipment_key(&number), &bytes) {
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
                    codec::encode_shipment_head(&state, 0..0),
                );
                continue;
            };
            state.stall_deadline = None;
            sequence = Sequence(sequence.0 + 1);
            batch.merge_cf(
                shipments_cf,
                keys::shipment_key(&number),
                codec::encode_shipment_head(&state, sequence.0..sequence.0 + 1),
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
        crate::store::put_change_blocks(&mut batch, self.store.cf(keys::CHANGES), &records);
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
}
