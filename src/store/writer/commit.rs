//! Group commit: the writer thread takes the batches waiting in its queue as one group, lets
//! the engine apply them to the shipments' states (cached, or read in key order), and writes
//! the scans, the shipment deltas, the status changes, the stall index edits, the source
//! offsets and the counters as one `WriteBatch`, unsynced: the syncer makes it durable.
//!
//! Invariants: the sequence counter, the stalled count and the cache move only after the
//! write succeeded; a failed write answers its whole group and clears the cache, which the
//! engine had already applied the group to.

use std::time::SystemTime;

use rocksdb::{WriteBatch, WriteOptions};

use super::changes::{change_record, tally};
use super::replicate::ChangeRuns;
use super::sweep::index_deadline;
use super::syncer::Applied;
use super::{Request, Writer};
use crate::domain::scan::ValidScan;
use crate::domain::{NumberCheck, Sequence, TrackingNumber};
use crate::engine::{Change, Effects, Incoming, Outcome, ShipmentState};
use crate::store::codec;
use crate::store::{keys, StoreError};
use crate::telemetry::metrics as m;

/// What the engine needs of a scan, as the `index`-th of its group.
pub(super) fn incoming(scan: &ValidScan, index: usize) -> Incoming {
    Incoming {
        index,
        tracking_number: scan.tracking_number.clone(),
        scan_id: scan.scan_id.clone(),
        scan_type: scan.scan_type,
        event_time: scan.event_time,
        facility: scan.facility,
        clock_skewed: scan.clock_skewed,
    }
}

impl Writer {
    /// Applies and writes a group (its WAL not yet synced).
    pub(super) fn commit(&mut self, group: &[Request]) -> Result<Applied, StoreError> {
        let scans: Vec<&ValidScan> = group.iter().flat_map(|r| r.scans.iter()).collect();
        let db = &self.store.db;
        let shipments_cf = self.store.cf(keys::SHIPMENTS);
        let changes_cf = self.store.cf(keys::CHANGES);

        // A partition read again after a restore: a shipment of it that the changelog does
        // not hold at all was never replicated, so at its first scan its state here goes and
        // its changes are derived anew (the earlier ones are void).
        let mut dropped: Vec<&TrackingNumber> = Vec::new();
        for scan in &scans {
            let number = &scan.tracking_number;
            let Some(origin) = &scan.origin else { continue };
            if !self.rereads.first_touch(origin, number) {
                continue;
            }
            let owner = match self.cache.get(number) {
                Some(state) => state.owner.clone(),
                None => self
                    .store
                    .shipment_states(&[number])?
                    .pop()
                    .flatten()
                    .and_then(|state| state.owner),
            };
            if owner.as_ref() == Some(origin) {
                self.cache.forget(number);
                dropped.push(number);
            }
        }
        // The engine applies the group to the cached states in place; only shipments the
        // cache lacks are read, in key order.
        let mut misses: Vec<&TrackingNumber> = scans
            .iter()
            .map(|s| &s.tracking_number)
            .filter(|number| !self.cache.contains(number) && !dropped.contains(number))
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
            .map(|(index, s)| incoming(s, index))
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
        // and faulted in several times over. Scans are only a third to a half of it.
        let mut batch =
            WriteBatch::with_capacity_bytes(scans.len() * self.batch_bytes_per_scan * 9 / 8);
        let received_time = prost_types::Timestamp::from(SystemTime::now());
        let mut dropped_scans = 0;
        for number in &dropped {
            dropped_scans += self.store.scans_stored_for(number)?;
            batch.delete_cf(shipments_cf, keys::shipment_key(number));
        }
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
        // `removed` is grouped in the same shipment order, and each of its shipments stored a
        // scan: its runs are met in step with `touched`.
        let mut removed_runs = removed.chunk_by(|(a, _, _), (b, _, _)| a == b).peekable();
        // `changes` too, each shipment's changes together (numbered in this order below): a
        // delta lists its shipment's change sequences, the index of a filtered feed.
        let mut change_runs = changes
            .chunk_by(|a, b| a.tracking_number == b.tracking_number)
            .peekable();
        let mut next_sequence = self.last_sequence.0 + 1;
        let mut sequences_of = |number: &TrackingNumber| {
            let run = change_runs
                .next_if(|run| run.first().is_some_and(|c| &c.tracking_number == number))
                .map_or(0, <[Change]>::len) as u64;
            next_sequence += run;
            next_sequence - run..next_sequence
        };
        let stall_index = self.store.cf(keys::STALL_DEADLINES);
        // Only a replicating writer needs each shipment's changes (its snapshots carry them).
        let replicating = self.replication.is_some();
        let mut change_runs_by_number = ChangeRuns::new();
        for (number, added) in touched {
            let replaced = removed_runs
                .next_if(|run| run.first().is_some_and(|(of, _, _)| of == number))
                .unwrap_or_default();
            let sequences = sequences_of(number);
            if replicating && !sequences.is_empty() {
                change_runs_by_number.insert(number, sequences.clone());
            }
            if let Some(state) = states.get_mut(number) {
                let added = stored[added].iter().map(|&index| scans[index]);
                for scan in added.clone() {
                    annotate(state, scan);
                }
                index_deadline(
                    (&self.stall, &self.retention),
                    stall_index,
                    &mut batch,
                    number,
                    state,
                );
                // A delta, not the whole record: the timeline summary is what a record holds
                // most of, and a group adds a scan or two to it (see `codec`).
                let replaced = replaced.iter().map(|(_, _, scan_id)| scan_id.as_str());
                let added = added.map(|scan| codec::EntryFields {
                    event_time: scan.event_time,
                    scan_id: scan.scan_id.as_str(),
                    scan_type: scan.scan_type,
                    facility: scan.facility,
                    event: &scan.stored,
                });
                batch.merge_cf(
                    shipments_cf,
                    keys::shipment_key(number),
                    codec::encode_shipment_delta(state, added, replaced, sequences),
                );
                if state.expired.is_some() {
                    // The record holds what expired now; a separate memory of it may go.
                    batch.delete_cf(self.store.cf(keys::EXPIRED), keys::shipment_key(number));
                }
            }
        }
        debug_assert!(
            change_runs.next().is_none(),
            "a change comes of a stored scan, so its shipment is touched"
        );
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
        crate::store::put_change_blocks(&mut batch, changes_cf, &records);
        let stalled_shipments = self.stalled_shipments.saturating_sub(u64::from(woken));
        if woken > 0 {
            batch.put_cf(
                self.store.cf(keys::META),
                keys::META_STALLED_SHIPMENTS,
                stalled_shipments.to_be_bytes(),
            );
        }
        // A request with a scan refused as of an expired journey keeps its offsets out: its
        // source dead-letters that scan first and then stores them (`Ingestor::store`), so a
        // crash between the two reads the records again instead of losing the dead letter.
        let mut first = 0;
        let mut offsets = Vec::new();
        for request in group {
            let scans = first..first + request.scans.len();
            first = scans.end;
            let refused = outcomes[scans]
                .iter()
                .any(|(_, outcome)| *outcome == Outcome::JourneyExpired);
            if !refused {
                offsets.extend(&request.offsets);
            }
        }
        for offset in offsets {
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
        let now_stored = (self.stored_scans + stored.len() as u64)
            .saturating_sub(removed.len() as u64 + dropped_scans);
        if now_stored != self.stored_scans {
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

        self.stored_scans = now_stored;
        self.last_sequence = sequence;
        for offset in group.iter().flat_map(|r| &r.offsets) {
            self.rereads
                .reached(&offset.topic, offset.partition, offset.next);
        }
        self.stalled_shipments = stalled_shipments;
        metrics::gauge!(m::SHIPMENTS_STALLED).set(stalled_shipments as f64);
        let (snapshots, void) = match self.replication {
            Some(_) => self
                .snapshots(group, &scans, &change_runs_by_number)
                .unwrap_or_else(|error| {
                    tracing::error!(%error, "changelog snapshots not built");
                    (Vec::new(), Vec::new())
                }),
            None => (Vec::new(), Vec::new()),
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
            void,
        })
    }
}

/// What a stored scan tells about its shipment beyond the timeline: who owns it and which
/// carrier its number belongs to (from the first scan that says).
fn annotate(state: &mut ShipmentState, scan: &ValidScan) {
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
        Outcome::Accepted | Outcome::JourneyExpired => None,
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
