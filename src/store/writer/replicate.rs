//! Replication of a partition's shipments to the changelog: after each durable write, the
//! stored record (scans included) of every shipment a source partition owns, then a marker per
//! partition saying its state is complete up to the group's offsets, so a new owner resumes at
//! the last marker. A record larger than a changelog record may be travels in pieces, put
//! back together by the [`Assembler`] of the restore.

use std::collections::HashMap;
use std::ops::Range;

use prost::Message;

use super::{Request, Writer};
use crate::domain::ownership::OutputGuard;
use crate::domain::scan::ValidScan;
use crate::domain::{Origin, Sequence, TrackingNumber};
use crate::engine::ShipmentState;
use crate::store::StoreError;

/// A changelog record (`scand.storage.v1.Snapshot`): one shipment's stored record, scans
/// included, after a durable write, with the partition position the state covers; or a marker.
pub use crate::proto::storage::Snapshot;

/// A snapshot on its way to the changelog, under the guard of the claim it was made under: a
/// release of the partition waits for it, and it is dropped once the release has waited.
/// `changes` are the shipment's changes this write made (sequences in this instance's change
/// log): published once this snapshot (or a later one of the shipment) is on the changelog,
/// void if it is dropped.
#[derive(Debug)]
pub struct Outgoing {
    pub snapshot: Snapshot,
    pub guard: OutputGuard,
    pub changes: Range<u64>,
}

/// What the writer hands the changelog task after each durable write: its snapshots, then
/// how far the change log goes with them.
#[derive(Debug)]
pub enum Replica {
    Snapshot(Outgoing),
    /// Every snapshot of the writes up to `sequence` was handed over before this; `void` are
    /// changes among them that no snapshot carries (their partition was no longer owned here).
    Through {
        sequence: Sequence,
        void: Vec<u64>,
    },
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

    /// The compaction key: the shipment (or one piece of it), or one marker key per source
    /// topic.
    pub fn key(&self) -> String {
        if self.is_marker() {
            format!("\u{0}marker\u{0}{}", self.topic)
        } else if self.piece > 0 {
            format!("{}\u{0}piece\u{0}{}", self.tracking_number, self.piece)
        } else {
            self.tracking_number.clone()
        }
    }

    /// The records to send for this snapshot, none larger than `max_bytes` when encoded: itself,
    /// or its record split into pieces, the head (piece 0, under the shipment's key) last, so
    /// that a reader that has the head has read every piece before it.
    pub fn into_pieces(self, max_bytes: usize) -> Vec<Snapshot> {
        if self.is_marker() || self.encoded_len() <= max_bytes {
            return vec![self];
        }
        // What a piece carries besides its part of the record, generously.
        let overhead = self.encoded_len() - self.record.len() + 64;
        let size = max_bytes.saturating_sub(overhead).max(1);
        let checksum = fnv1a64(&self.record);
        let parts: Vec<&[u8]> = self.record.chunks(size).collect();
        let pieces = parts.len() as u32;
        let piece = |index: usize, part: &[u8]| Snapshot {
            tracking_number: self.tracking_number.clone(),
            topic: self.topic.clone(),
            partition: self.partition,
            next_offset: self.next_offset,
            record: part.to_vec(),
            pieces,
            piece: index as u32,
            record_checksum: checksum,
            publisher: self.publisher,
            covers: self.covers,
        };
        let mut out: Vec<Snapshot> = parts
            .iter()
            .enumerate()
            .skip(1)
            .map(|(index, part)| piece(index, part))
            .collect();
        out.push(piece(0, parts[0]));
        out
    }
}

/// FNV-1a, 64 bits: the checksum a split snapshot's pieces carry, stable across builds.
fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Puts split snapshots back together while the changelog is read in order: holds the latest
/// piece of each index per shipment until the shipment's head arrives.
#[derive(Debug, Default)]
pub struct Assembler {
    pieces: HashMap<String, HashMap<u32, Snapshot>>,
}

/// A head whose pieces do not add up to its record.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("changelog snapshot of {tracking_number} is split in {pieces} pieces, and those read do not make up its record")]
pub struct Incomplete {
    pub tracking_number: String,
    pub pieces: u32,
}

impl Assembler {
    /// A whole snapshot once it is complete (at once for one never split; at its head for a
    /// split one), `None` while pieces are still being read.
    pub fn offer(&mut self, snapshot: Snapshot) -> Result<Option<Snapshot>, Incomplete> {
        if snapshot.is_marker() {
            return Ok(Some(snapshot));
        }
        if snapshot.pieces <= 1 {
            self.pieces.remove(&snapshot.tracking_number);
            return Ok(Some(snapshot));
        }
        if snapshot.piece > 0 {
            self.pieces
                .entry(snapshot.tracking_number.clone())
                .or_default()
                .insert(snapshot.piece, snapshot);
            return Ok(None);
        }
        let mut held = self
            .pieces
            .remove(&snapshot.tracking_number)
            .unwrap_or_default();
        let incomplete = || Incomplete {
            tracking_number: snapshot.tracking_number.clone(),
            pieces: snapshot.pieces,
        };
        let mut record = snapshot.record.clone();
        for index in 1..snapshot.pieces {
            let piece = held.remove(&index).ok_or_else(incomplete)?;
            if piece.record_checksum != snapshot.record_checksum {
                return Err(incomplete());
            }
            record.extend_from_slice(&piece.record);
        }
        if fnv1a64(&record) != snapshot.record_checksum {
            return Err(incomplete());
        }
        Ok(Some(Snapshot {
            record,
            pieces: 0,
            piece: 0,
            record_checksum: 0,
            ..snapshot
        }))
    }
}

/// The changes each shipment's snapshot carries, by tracking number.
pub(super) type ChangeRuns<'a> = HashMap<&'a TrackingNumber, Range<u64>>;

impl Writer {
    /// Snapshots of the swept shipments that a source partition owns, positioned at the
    /// partition's stored offset (the state includes everything before it), and the changes
    /// of those owned elsewhere by now (void).
    pub(super) fn owned_snapshots(
        &self,
        shipments: &[(TrackingNumber, ShipmentState)],
        changes: &ChangeRuns<'_>,
    ) -> Result<(Vec<Outgoing>, Vec<u64>), StoreError> {
        let mut snapshots = Vec::new();
        let mut void = Vec::new();
        for (number, state) in shipments {
            let Some(owner) = &state.owner else { continue };
            let next_offset = self
                .store
                .source_offset(&owner.topic, owner.partition)?
                .unwrap_or_default();
            let run = changes.get(number).cloned().unwrap_or(0..0);
            let made = self.snapshot_of(number, owner, next_offset, run.clone())?;
            push_or_void(made, run, &mut snapshots, &mut void);
        }
        Ok((snapshots, void))
    }

    /// A shipment's stored record as a snapshot under a guard of its partition's claim, with
    /// the changes this write made of it; `Ok(None)` when the partition is not owned here (any
    /// longer).
    fn snapshot_of(
        &self,
        number: &TrackingNumber,
        origin: &Origin,
        next_offset: i64,
        changes: Range<u64>,
    ) -> Result<Option<Outgoing>, StoreError> {
        let Some(replication) = self.replication.as_ref() else {
            return Ok(None);
        };
        let Some(guard) = replication.ownership.guard(&origin.topic, origin.partition) else {
            return Ok(None);
        };
        let Some(record) = self.store.shipment_record(number)? else {
            return Ok(None);
        };
        // Sequences only grow: this write's last change is the record's last. Without one,
        // the record says.
        let covers = if changes.is_empty() {
            let key = crate::store::keys::shipment_key(number);
            crate::store::codec::change_sequences(key, &record)?
                .into_iter()
                .max()
                .unwrap_or_default()
        } else {
            changes.end - 1
        };
        Ok(Some(Outgoing {
            snapshot: Snapshot {
                tracking_number: number.to_string(),
                topic: origin.topic.clone(),
                partition: origin.partition,
                next_offset,
                record,
                publisher: replication.publisher,
                covers,
                ..Snapshot::default()
            },
            guard,
            changes,
        }))
    }

    /// A marker under a guard of its partition's claim; none when the partition is not owned
    /// here (any longer).
    fn guarded_marker(&self, marker: Snapshot) -> Option<Outgoing> {
        let replication = self.replication.as_ref()?;
        let guard = replication
            .ownership
            .guard(&marker.topic, marker.partition)?;
        Some(Outgoing {
            snapshot: Snapshot {
                publisher: replication.publisher,
                ..marker
            },
            guard,
            changes: 0..0,
        })
    }

    /// The state of every shipment of the group that a source partition owns, for the
    /// changelog, then a marker per partition saying its state is complete up to the group's
    /// offsets: a new owner resumes at the last marker, never beyond a missing snapshot. Also
    /// the changes of shipments whose partition is owned elsewhere by now (void).
    pub(super) fn snapshots(
        &self,
        group: &[Request],
        scans: &[&ValidScan],
        changes: &ChangeRuns<'_>,
    ) -> Result<(Vec<Outgoing>, Vec<u64>), StoreError> {
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
        let mut void = Vec::new();
        for (number, origin) in owned {
            let offset = next_offset(&origin.topic, origin.partition);
            let run = changes.get(number).cloned().unwrap_or(0..0);
            let made = self.snapshot_of(number, origin, offset, run.clone())?;
            push_or_void(made, run, &mut snapshots, &mut void);
        }
        let mut partitions: Vec<(&str, i32)> = group
            .iter()
            .flat_map(|r| &r.offsets)
            .map(|o| (o.topic.as_str(), o.partition))
            .collect();
        partitions.sort_unstable();
        partitions.dedup();
        for (topic, partition) in partitions {
            snapshots.extend(self.guarded_marker(Snapshot::marker(
                topic,
                partition,
                next_offset(topic, partition),
            )));
        }
        Ok((snapshots, void))
    }
}

/// A snapshot made goes out; the changes of one that could not be made (its partition no
/// longer owned here) are void: the partition's owner derives them again.
fn push_or_void(
    made: Option<Outgoing>,
    changes: Range<u64>,
    snapshots: &mut Vec<Outgoing>,
    void: &mut Vec<u64>,
) {
    match made {
        Some(outgoing) => snapshots.push(outgoing),
        None => void.extend(changes),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot(number: &str, record: Vec<u8>) -> Snapshot {
        Snapshot {
            tracking_number: number.into(),
            topic: "scans.raw".into(),
            partition: 2,
            next_offset: 40,
            record,
            ..Snapshot::default()
        }
    }

    fn assemble(assembler: &mut Assembler, pieces: Vec<Snapshot>) -> Vec<Snapshot> {
        pieces
            .into_iter()
            .filter_map(|piece| assembler.offer(piece).expect("complete"))
            .collect()
    }

    #[test]
    fn a_large_snapshot_travels_in_pieces_no_larger_than_allowed_and_comes_back_whole() {
        let record: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        let whole = snapshot("PARCEL0001", record);
        let small = snapshot("PARCEL0002", vec![7; 100]);
        assert_eq!(
            small.clone().into_pieces(1024),
            std::slice::from_ref(&small)
        );

        let pieces = whole.clone().into_pieces(1024);
        assert!(pieces.len() > 10);
        assert!(pieces.iter().all(|p| p.encoded_len() <= 1024));
        let keys: Vec<String> = pieces.iter().map(Snapshot::key).collect();
        assert_eq!(
            keys.last().map(String::as_str),
            Some("PARCEL0001"),
            "head last"
        );
        assert_eq!(keys[0], "PARCEL0001\u{0}piece\u{0}1");

        // Read back among other records, after an earlier split version of the same shipment.
        let mut assembler = Assembler::default();
        let earlier = snapshot("PARCEL0001", vec![1; 5_000]).into_pieces(1024);
        let mut log = earlier.clone();
        log.push(small.clone());
        log.extend(pieces.clone());
        log.push(Snapshot::marker("scans.raw", 2, 41));
        let read = assemble(&mut assembler, log);
        assert_eq!(read.len(), 4);
        assert_eq!(read[0].record, vec![1; 5_000]);
        assert_eq!(read[1], small);
        assert_eq!(read[2], whole);
        assert!(read[3].is_marker());

        // Compaction left an older split's extra pieces: the head uses its own and ignores them.
        let mut compacted: Vec<Snapshot> = earlier;
        compacted.retain(|p| p.piece >= 3);
        compacted.extend(snapshot("PARCEL0001", vec![9; 2_000]).into_pieces(1024));
        let read = assemble(&mut Assembler::default(), compacted);
        assert_eq!(read.len(), 1);
        assert_eq!(read[0].record, vec![9; 2_000]);
    }

    #[test]
    fn a_head_whose_pieces_are_missing_or_foreign_is_refused() {
        let pieces = snapshot("PARCEL0001", vec![3; 4_000]).into_pieces(1024);
        let head = pieces.last().cloned().expect("head");
        let mut assembler = Assembler::default();
        assert_eq!(
            assembler.offer(head.clone()),
            Err(Incomplete {
                tracking_number: "PARCEL0001".into(),
                pieces: head.pieces
            })
        );
        let other = snapshot("PARCEL0001", vec![4; 4_000]).into_pieces(1024);
        let mut mixed = assemble(&mut assembler, other[..other.len() - 1].to_vec());
        assert!(mixed.is_empty());
        mixed.extend(assembler.offer(head).ok().flatten());
        assert!(mixed.is_empty(), "pieces of another version make no record");
    }
}
