//! The sweep: a task that reads the due part of the deadline index off the writer thread and
//! has the writer handle those shipments in small chunks, each written and synced like a group:
//! stall the ones no scan reached in time, remove the journeys retention expired. Also the index
//! the writer keeps beside each shipment's state: its next deadline, the earlier of when it
//! stalls and when its oldest journey expires.
//!
//! Invariants:
//! - The index holds at most one entry per shipment, never later than its real deadline, so a
//!   due shipment is never missed; an entry is checked against the stored state before
//!   anything is stalled or removed, so a scan written after the sweep read the entry wins.
//! - A shipment of a source partition another instance owns is never stalled or expired here:
//!   its entry is parked under the partition (`keys::parked_key`) until the partition is
//!   owned again, when the restore puts it back at its deadline.

use std::time::{Instant, SystemTime};

use rocksdb::{ColumnFamily, WriteBatch, WriteOptions};
use tokio::sync::oneshot;

use super::changes::{change_record, tally, timestamp};
use super::replicate::ChangeRuns;
use super::syncer::Applied;
use super::{Job, Writer, WriterHandle};
use crate::domain::clock::Clock;
use crate::domain::{EventTime, Sequence, Status, TrackingNumber};
use crate::engine::retention::{Removed, RetentionPolicy};
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
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Swept {
    pub stalled: usize,
    /// What retention removed.
    pub removed: Removed,
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
        let mut swept = Swept {
            more_due: due.len() == SWEEP_READ,
            ..Swept::default()
        };
        for chunk in due.chunks(SWEEP_CHUNK) {
            let (reply, answer) = oneshot::channel();
            self.tx
                .send(Job::Sweep {
                    now,
                    due: chunk.to_vec(),
                    reply,
                })
                .await
                .map_err(|_| StoreError::WriterGone)?;
            let (stalled, removed) = answer.await.map_err(|_| StoreError::WriterGone)??;
            swept.stalled += stalled;
            swept.removed.journeys += removed.journeys;
            swept.removed.scans += removed.scans;
        }
        Ok(swept)
    }
}

/// Sweeps the deadline index every `interval` (and again at once while more are due), and trims
/// the change log (see [`crate::store::Store::trim_change_log`]), until `shutdown`.
pub async fn run_sweeper(
    writer: WriterHandle,
    interval: std::time::Duration,
    change_log: ChangeLogRetention,
    clock: Clock,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticks.tick() => {}
        }
        trim_change_log(&writer.store, &change_log, &clock).await;
        loop {
            let started = Instant::now();
            let swept = writer.sweep(clock.event_time()).await;
            metrics::histogram!(m::STALL_SWEEP_SECONDS).record(started.elapsed().as_secs_f64());
            match swept {
                Ok(Swept {
                    stalled,
                    removed,
                    more_due,
                }) => {
                    if stalled > 0 {
                        tracing::info!(stalled, "shipments stalled");
                    }
                    if removed.journeys > 0 {
                        tracing::info!(
                            journeys = removed.journeys,
                            scans = removed.scans,
                            "retention removed expired journeys"
                        );
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

/// How long the change log keeps a change, and which sinks must have delivered it first.
#[derive(Clone, Debug)]
pub struct ChangeLogRetention {
    pub keep: std::time::Duration,
    pub sinks: Vec<&'static str>,
}

async fn trim_change_log(
    store: &crate::store::Store,
    retention: &ChangeLogRetention,
    clock: &Clock,
) {
    let store = store.clone();
    let retention = retention.clone();
    let older_than = clock.now() - retention.keep;
    let trimmed =
        tokio::task::spawn_blocking(move || store.trim_change_log(older_than, &retention.sinks))
            .await;
    match trimmed {
        Ok(Ok(0)) => {}
        Ok(Ok(changes)) => tracing::info!(changes, "change log trimmed"),
        Ok(Err(error)) => {
            tracing::warn!(%error, "change log not trimmed; retrying at the next interval")
        }
        Err(error) => tracing::warn!(%error, "change log trim did not finish"),
    }
}

/// The shipment's next deadline: when it stalls or when its oldest journey expires.
pub(super) fn deadline(
    stall: &StallPolicy,
    retention: &RetentionPolicy,
    state: &ShipmentState,
) -> Option<EventTime> {
    match (stall.deadline(state), retention.expiry(state)) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Keeps the deadline index a lower bound of the shipment's deadline, one entry per
/// shipment at most, in the same write as its state. A scan usually moves the stall deadline
/// later: then nothing is written, and the sweep, finding the entry due, re-indexes the
/// shipment at its real deadline. An earlier deadline (a status with a shorter threshold)
/// replaces the entry, and so does the retention deadline of a shipment that can no longer
/// stall (delivered, returned): stale stall entries of every delivered shipment would cost
/// the sweep a shipment read each, which at millions of stored shipments kept a core busy.
pub(super) fn index_deadline(
    policies: (&StallPolicy, &RetentionPolicy),
    index: &ColumnFamily,
    batch: &mut WriteBatch,
    number: &TrackingNumber,
    state: &mut ShipmentState,
) {
    let can_stall = policies.0.deadline(state).is_some();
    let deadline = deadline(policies.0, policies.1, state);
    match (state.stall_deadline, deadline) {
        (None, None) => return,
        (Some(indexed), Some(deadline)) if indexed == deadline => return,
        (Some(indexed), Some(deadline)) if indexed < deadline && can_stall => return,
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
    /// Handles the shipments of `due` (deadline index keys the sweeper read as due at `now`):
    /// checks each entry against its stored state (a stale entry is dropped), removes what
    /// retention expired, stalls what no scan reached in time, re-indexes each at its next
    /// deadline, and writes the STALLED changes, the states and the index edits as one write,
    /// synced by the syncer like a group.
    pub(super) fn sweep_due(
        &mut self,
        now: EventTime,
        due: &[Vec<u8>],
    ) -> Result<(Applied, usize, Removed), StoreError> {
        let db = &self.store.db;
        let index = self.store.cf(keys::STALL_DEADLINES);
        let shipments_cf = self.store.cf(keys::SHIPMENTS);
        let expired_cf = self.store.cf(keys::EXPIRED);
        let mut batch = WriteBatch::default();
        let mut entries = Vec::with_capacity(due.len());
        for key in due {
            match keys::decode_stall_key(key) {
                Some(entry) => entries.push((key, entry)),
                None => {
                    batch.delete_cf(index, key);
                    tracing::warn!(key = ?key, "unreadable deadline index key dropped");
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
        let mut removed = Removed::default();
        // Shipments retention rewrote without a stall: replicated like the stalled ones.
        let mut trimmed = Vec::new();
        let mut stalled_shipments = self.stalled_shipments;
        for ((key, (deadline, number)), value) in entries.into_iter().zip(values) {
            // The sweep reads and writes records itself; a cached copy would go stale.
            self.cache.forget(&number);
            let shipment_key = keys::shipment_key(&number);
            // A number without a record may be remembered for its expired journeys.
            let bytes = match value? {
                Some(bytes) => bytes.to_vec(),
                None => match db.get_cf(expired_cf, shipment_key)? {
                    Some(bytes) => bytes,
                    None => {
                        batch.delete_cf(index, key);
                        continue;
                    }
                },
            };
            let mut state = match codec::decode_shipment(shipment_key, &bytes) {
                Ok(state) => state,
                Err(error) => {
                    // Its entry stays, so it is tried again, and the rest of the chunk goes
                    // on: failing the chunk would fail every sweep on the same entries.
                    tracing::error!(%error, %number, "shipment record unreadable; not swept");
                    metrics::counter!(m::STALL_SWEEP_UNREADABLE_TOTAL).increment(1);
                    continue;
                }
            };
            batch.delete_cf(index, key);
            if state.stall_deadline != Some(deadline) {
                continue;
            }
            if let Some(parked) = self.parked_key(&state, &number) {
                // Another instance owns the shipment now: it sweeps its own copy. The entry
                // waits, never due, until the partition is owned here again.
                batch.put_cf(index, parked, []);
                continue;
            }
            let was_stalled = state.stalled;
            let expired = self.retention.expire(&mut state, now);
            if was_stalled && !state.stalled {
                stalled_shipments = stalled_shipments.saturating_sub(1);
            }
            removed.journeys += expired.journeys;
            removed.scans += expired.scans;
            if expired.forget {
                batch.delete_cf(shipments_cf, shipment_key);
                batch.delete_cf(expired_cf, shipment_key);
                continue;
            }
            let mut change_sequences = 0..0;
            if let Some(change) = self
                .engine
                .stall(&self.stall, number.clone(), &mut state, now)
            {
                sequence = Sequence(sequence.0 + 1);
                change_sequences = sequence.0..sequence.0 + 1;
                changes.push((sequence, change, deadline));
            }
            state.stall_deadline = self::deadline(&self.stall, &self.retention, &state);
            if let Some(next) = state.stall_deadline {
                batch.put_cf(index, keys::stall_key(next, &number), []);
            }
            self.write_swept(
                &mut batch,
                shipment_key,
                &bytes,
                &state,
                expired,
                change_sequences,
            )?;
            if changes.len() > stalled.len() {
                stalled.push((number, state));
            } else if expired.journeys > 0 {
                trimmed.push((number, state));
            }
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
        stalled_shipments += changes.len() as u64;
        let meta = self.store.cf(keys::META);
        if sequence != self.last_sequence {
            batch.put_cf(meta, keys::META_LAST_SEQUENCE, keys::change_key(sequence));
        }
        if stalled_shipments != self.stalled_shipments {
            batch.put_cf(
                meta,
                keys::META_STALLED_SHIPMENTS,
                stalled_shipments.to_be_bytes(),
            );
        }
        let stored_scans = self.stored_scans.saturating_sub(removed.scans as u64);
        if removed.scans > 0 {
            batch.put_cf(meta, keys::META_STORED_SCANS, stored_scans.to_be_bytes());
        }
        db.write_opt(batch, &WriteOptions::default())?;

        self.last_sequence = sequence;
        self.stalled_shipments = stalled_shipments;
        self.stored_scans = stored_scans;
        if removed.journeys > 0 {
            metrics::counter!(m::RETENTION_REMOVED_TOTAL, "what" => "journeys")
                .increment(u64::from(removed.journeys));
            metrics::counter!(m::RETENTION_REMOVED_TOTAL, "what" => "scans")
                .increment(removed.scans as u64);
        }
        stalled.extend(trimmed);
        let (snapshots, void) = match self.replication {
            Some(_) => {
                // One change per stalled shipment, in the same order; the trimmed made none.
                let runs: ChangeRuns<'_> = stalled
                    .iter()
                    .zip(&changes)
                    .map(|((number, _), (sequence, _, _))| (number, sequence.0..sequence.0 + 1))
                    .collect();
                self.owned_snapshots(&stalled, &runs)
                    .unwrap_or_else(|error| {
                        tracing::error!(%error, "changelog snapshots of a sweep not built");
                        (Vec::new(), Vec::new())
                    })
            }
            None => (Vec::new(), Vec::new()),
        };
        metrics::gauge!(m::SHIPMENTS_STALLED).set(stalled_shipments as f64);
        let applied = Applied {
            outcomes: Vec::new(),
            sequence,
            snapshots,
            void,
        };
        Ok((applied, changes.len(), removed))
    }

    /// The parked deadline key of a shipment whose source partition this instance does not
    /// own; `None` for one it may sweep (owned here, or taken in over gRPC).
    fn parked_key(&self, state: &ShipmentState, number: &TrackingNumber) -> Option<Vec<u8>> {
        let ownership = &self.replication.as_ref()?.ownership;
        let owner = state.owner.as_ref()?;
        (!ownership.owns(owner)).then(|| keys::parked_key(&owner.topic, owner.partition, number))
    }

    /// Writes a swept shipment: with no journey left, its record goes and its memory is kept
    /// in `expired` (a deletion RocksDB compacts away promptly, see `keys::EXPIRED`); with
    /// journeys removed, the record is rewritten without their scans; otherwise only its head
    /// (stall, deadline) changed. `changes` are the sequences of its changes in this write.
    fn write_swept(
        &self,
        batch: &mut WriteBatch,
        key: &[u8],
        stored: &[u8],
        state: &ShipmentState,
        expired: Removed,
        changes: std::ops::Range<u64>,
    ) -> Result<(), StoreError> {
        let shipments = self.store.cf(keys::SHIPMENTS);
        if state.timeline.is_empty() {
            let mut memory = codec::ShipmentRecord::default();
            codec::set_head(&mut memory, state);
            batch.delete_cf(shipments, key);
            batch.put_cf(
                self.store.cf(keys::EXPIRED),
                key,
                prost::Message::encode_to_vec(&memory),
            );
        } else if expired.journeys > 0 {
            batch.put_cf(
                shipments,
                key,
                trimmed_record(key, stored, state, expired, changes)?,
            );
        } else {
            batch.merge_cf(shipments, key, codec::encode_shipment_head(state, changes));
        }
        Ok(())
    }
}

/// A record without the scans of the journeys retention removed (the first `removed.scans` of
/// its timeline), with the state's head and `changes` added to its change sequences: written
/// whole, the one write of a record that removes scans.
fn trimmed_record(
    key: &[u8],
    bytes: &[u8],
    state: &ShipmentState,
    removed: Removed,
    changes: std::ops::Range<u64>,
) -> Result<Vec<u8>, StoreError> {
    let mut record = codec::decode_shipment_record(key, bytes)?;
    record
        .timeline
        .drain(..removed.scans.min(record.timeline.len()));
    record.change_sequences.extend(changes);
    codec::set_head(&mut record, state);
    Ok(prost::Message::encode_to_vec(&record))
}
