//! The merge operator of the `shipments` column family, on the wire bytes: RocksDB calls it
//! at every flush, compaction and read that meets a shipment's deltas, so it never decodes a
//! record into owned messages. It slices each operand into its fields, keeps the last head,
//! merges the timeline entries by (event_time, scan_id) and copies every kept field's bytes
//! as they lie.
//!
//! Invariants:
//! - The result decodes to what applying the deltas one by one to the decoded record gives
//!   (`codec::ShipmentRecord` semantics: the last head whole, entries in order without
//!   repeats, replaced scan ids out of the timeline and into the replaced list, change
//!   sequences appended), and for
//!   operands in prost's encoding it is byte for byte prost's encoding of that record (tested
//!   against a prost model). Fields this build does not know are kept with the head.
//! - Associative: combining deltas without their record, then merging that into the record,
//!   gives the same bytes as merging them one by one.
//! - A value that is not a well-formed `ShipmentRecord` fails the merge (`None`, RocksDB's
//!   "corrupt"); nothing is dropped silently.

use super::wire::shipment::{CHANGE_SEQUENCES as CHANGES, REPLACED_SCAN_IDS as REPLACED, TIMELINE};
use super::wire::{entry, fields, read_varint, shipment, Field, LEN, RECURSION_LIMIT, VARINT};

/// The wire type a known field of `ShipmentRecord` must have (`None`: unknown to this build).
fn head_wire_type(tag: u32) -> Option<u8> {
    use shipment::*;
    match tag {
        STATUS | SUB_STATUS | VERSION | SCANS_AFTER_TERMINAL | STALLED | STALL_DEADLINE
        | REGRESSIONS | CLOCK_SKEWED_SCANS | OWNER_PARTITION | JOURNEY | CLOSED
        | EXPIRED_JOURNEYS | EXPIRED_UNTIL => Some(VARINT),
        CARRIER
        | CARRIER_SERVICE
        | TRACKING_NUMBER_ISSUE
        | OWNER_TOPIC
        | EARLIER_JOURNEYS
        | VANISHED_JOURNEYS => Some(LEN),
        _ => None,
    }
}

/// A timeline entry: what it is ordered and deduplicated by, and its field's bytes.
#[derive(Clone, Copy)]
struct Entry<'a> {
    event_time: i64,
    scan_id: &'a [u8],
    whole: &'a [u8],
}

impl<'a> Entry<'a> {
    fn of(field: Field<'a>) -> Option<Self> {
        let mut entry = Entry {
            event_time: 0,
            scan_id: &[],
            whole: field.whole,
        };
        // Decoded as prost decodes a nested message: one level deeper, and a repeated scalar
        // takes its last value.
        for inner in fields(field.payload, RECURSION_LIMIT - 1) {
            let inner = inner?;
            match (inner.tag, inner.wire_type) {
                (entry::EVENT_TIME, VARINT) => {
                    let mut value = inner.payload;
                    let zigzag = read_varint(&mut value)?;
                    entry.event_time = (zigzag >> 1) as i64 ^ -((zigzag & 1) as i64);
                }
                (entry::SCAN_ID, LEN) => entry.scan_id = inner.payload,
                (entry::EVENT_TIME | entry::SCAN_ID, _) => return None,
                _ => {}
            }
        }
        Some(entry)
    }

    fn order(&self) -> (i64, &'a [u8]) {
        (self.event_time, self.scan_id)
    }
}

/// The merge so far: the head of the last value applied (every field but the timeline and
/// the replaced ids), the timeline's entries in order, and the replaced scan ids.
struct Merged<'a> {
    head: Vec<Field<'a>>,
    entries: Vec<Entry<'a>>,
    /// Whether `entries` is strictly in (event_time, scan_id) order, so needs no sort.
    in_order: bool,
    replaced: Vec<Field<'a>>,
    /// Change sequences, every record's and delta's appended in order.
    changes: Vec<Field<'a>>,
}

/// The merge operator of the `shipments` column family (associative, so RocksDB also uses it
/// to combine deltas without their record): the record, if any, with each delta applied in
/// order. `None`, RocksDB's "corrupt", only when a value is malformed.
pub fn merge_shipment_records<'a>(
    record: Option<&'a [u8]>,
    deltas: impl IntoIterator<Item = &'a [u8]>,
) -> Option<Vec<u8>> {
    let mut merged = Merged {
        head: Vec::with_capacity(16),
        // An entry takes ~200 bytes with its stored scan.
        entries: Vec::with_capacity(record.map_or(16, |r| r.len() / 128 + 16)),
        in_order: true,
        replaced: Vec::new(),
        changes: Vec::new(),
    };
    if let Some(record) = record {
        merged.apply(record, false)?;
    }
    for delta in deltas {
        merged.apply(delta, true)?;
    }
    Some(merged.encode())
}

impl<'a> Merged<'a> {
    /// Takes in a record or delta: its head replaces the head, its entries join the timeline
    /// in (event_time, scan_id) order, keeping the earlier write's of two with one key, and
    /// the scan ids it replaced leave the timeline for the replaced list. The stored record
    /// (`delta` false) is taken as it is, as prost's merge took it.
    fn apply(&mut self, bytes: &'a [u8], delta: bool) -> Option<()> {
        self.head.clear();
        let replaced_before = self.replaced.len();
        for field in fields(bytes, RECURSION_LIMIT) {
            let field = field?;
            match field.tag {
                TIMELINE if field.wire_type == LEN => {
                    let entry = Entry::of(field)?;
                    // Deltas mostly append a later scan: then the timeline needs no sort.
                    self.in_order &= self
                        .entries
                        .last()
                        .is_none_or(|last| last.order() < entry.order());
                    self.entries.push(entry);
                }
                REPLACED if field.wire_type == LEN => self.replaced.push(field),
                CHANGES if field.wire_type == VARINT => self.changes.push(field),
                TIMELINE | REPLACED | CHANGES => return None,
                tag => {
                    if head_wire_type(tag).is_some_and(|expected| expected != field.wire_type) {
                        return None;
                    }
                    self.head.push(field);
                }
            }
        }
        if !delta {
            return Some(());
        }
        if !self.in_order {
            // Stable, so of two entries with one key the earlier write's stays.
            self.entries.sort_by(|a, b| a.order().cmp(&b.order()));
            self.entries.dedup_by(|a, b| a.order() == b.order());
            self.in_order = true;
        }
        let newly_replaced = &self.replaced[replaced_before..];
        if !newly_replaced.is_empty() {
            self.entries
                .retain(|e| !newly_replaced.iter().any(|id| id.payload == e.scan_id));
        }
        Some(())
    }

    /// The fields in tag order, as prost writes a record: the head below the timeline, the
    /// entries, the head between them and the replaced ids, the ids, the change sequences, then
    /// fields unknown here.
    fn encode(&self) -> Vec<u8> {
        let len = self.head.iter().map(|f| f.whole.len()).sum::<usize>()
            + self.entries.iter().map(|e| e.whole.len()).sum::<usize>()
            + self.replaced.iter().map(|f| f.whole.len()).sum::<usize>()
            + self.changes.iter().map(|f| f.whole.len()).sum::<usize>();
        let mut out = Vec::with_capacity(len);
        let head = |out: &mut Vec<u8>, tags: std::ops::Range<u32>| {
            for f in self.head.iter().filter(|f| tags.contains(&f.tag)) {
                out.extend_from_slice(f.whole);
            }
        };
        head(&mut out, 0..TIMELINE);
        for entry in &self.entries {
            out.extend_from_slice(entry.whole);
        }
        head(&mut out, TIMELINE + 1..REPLACED);
        for id in &self.replaced {
            out.extend_from_slice(id.whole);
        }
        head(&mut out, REPLACED + 1..CHANGES);
        for sequence in &self.changes {
            out.extend_from_slice(sequence.whole);
        }
        head(&mut out, CHANGES + 1..u32::MAX);
        out
    }
}

/// The same merge through prost's owned messages, as it was done before this module: the
/// reference its tests hold the wire merge to, and the baseline of `benches/merge.rs`.
#[doc(hidden)]
pub fn prost_merge<'a>(
    record: Option<&[u8]>,
    deltas: impl IntoIterator<Item = &'a [u8]>,
) -> Option<Vec<u8>> {
    use crate::store::codec::ShipmentRecord;
    use prost::Message;
    let mut merged = match record {
        Some(bytes) => ShipmentRecord::decode(bytes).ok()?,
        None => ShipmentRecord::default(),
    };
    for delta in deltas {
        let mut delta = ShipmentRecord::decode(delta).ok()?;
        let added = std::mem::take(&mut delta.timeline);
        let newly_replaced = std::mem::take(&mut delta.replaced_scan_ids);
        let new_changes = std::mem::take(&mut delta.change_sequences);
        let mut timeline = std::mem::take(&mut merged.timeline);
        let mut replaced = std::mem::take(&mut merged.replaced_scan_ids);
        let mut changes = std::mem::take(&mut merged.change_sequences);
        changes.extend(new_changes);
        timeline.extend(added);
        timeline.sort_by(|a, b| (a.event_time, &a.scan_id).cmp(&(b.event_time, &b.scan_id)));
        timeline.dedup_by(|a, b| a.event_time == b.event_time && a.scan_id == b.scan_id);
        timeline.retain(|e| !newly_replaced.contains(&e.scan_id));
        replaced.extend(newly_replaced);
        merged = ShipmentRecord {
            timeline,
            replaced_scan_ids: replaced,
            change_sequences: changes,
            ..delta
        };
    }
    Some(merged.encode_to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::codec::{EntryRecord, ShipmentRecord};
    use proptest::prelude::*;
    use prost::Message;

    /// One write's delta as a model: `adds` new entries (event times), `replaces` entries
    /// picked from the timeline so far (by position, modulo its length), and a head field
    /// that varies by write (carrier, deadline, stalled: fields on both sides of the
    /// timeline in tag order).
    type WriteModel = (Vec<i64>, Vec<usize>, u8);

    /// Deltas built from writes that keep the engine's invariants (scan ids are fresh, a
    /// replaced id is one the timeline holds), and the record they must merge into: the last
    /// head, every added entry not replaced in (event_time, scan_id) order, replaced ids in
    /// the order they were replaced.
    fn deltas_and_expected(writes: &[WriteModel]) -> (Vec<Vec<u8>>, ShipmentRecord) {
        let mut timeline: Vec<EntryRecord> = Vec::new();
        let mut replaced = Vec::new();
        let mut changes = Vec::new();
        let mut deltas = Vec::new();
        let mut next_id = 0;
        let head = |version: usize, variant: u8| ShipmentRecord {
            version: version as u64 + 1,
            status: 3,
            sub_status: i32::from(variant % 3),
            stalled: variant % 2 == 1,
            stall_deadline: (variant % 4 != 0).then_some(-i64::from(variant) * 1_000_003),
            carrier: ["", "ups", "dhl"][usize::from(variant % 3)].to_owned(),
            owner_partition: i32::from(variant % 5) - 2,
            ..Default::default()
        };
        for (version, (adds, replaces, variant)) in writes.iter().enumerate() {
            let added: Vec<EntryRecord> = adds
                .iter()
                .map(|t| {
                    next_id += 1;
                    EntryRecord {
                        event_time: *t,
                        scan_id: format!("s{:03}", 97 * next_id % 1000),
                        scan_type: 6,
                        facility: 1,
                        event: format!("scan {next_id}").into_bytes().into(),
                    }
                })
                .collect();
            timeline.extend(added.iter().cloned());
            let mut newly_replaced = Vec::new();
            for pick in replaces {
                if !timeline.is_empty() {
                    let gone = timeline.remove(pick % timeline.len());
                    newly_replaced.push(gone.scan_id);
                }
            }
            replaced.extend(newly_replaced.iter().cloned());
            // A write that changed the status brings its change's sequence.
            let new_changes: Vec<u64> = (variant % 2 == 0)
                .then_some(version as u64 * 300 + 1)
                .into_iter()
                .collect();
            changes.extend(new_changes.iter().copied());
            deltas.push(
                ShipmentRecord {
                    timeline: added,
                    replaced_scan_ids: newly_replaced,
                    change_sequences: new_changes,
                    ..head(version, *variant)
                }
                .encode_to_vec(),
            );
        }
        timeline.sort_by(|a, b| (a.event_time, &a.scan_id).cmp(&(b.event_time, &b.scan_id)));
        let last = writes.last().map_or(0, |w| w.2);
        let expected = ShipmentRecord {
            timeline,
            replaced_scan_ids: replaced,
            change_sequences: changes,
            ..head(writes.len() - 1, last)
        };
        (deltas, expected)
    }

    fn slices(deltas: &[Vec<u8>]) -> Vec<&[u8]> {
        deltas.iter().map(Vec::as_slice).collect()
    }

    proptest! {
        /// What RocksDB may do with deltas: apply them one by one to the record, combine a run
        /// of them without the record first (flush), or fold a prefix into the record and
        /// the rest later (compaction, then reads). All give the same record, byte for byte
        /// what prost's decode-apply-encode gives.
        #[test]
        fn merging_deltas_is_associative_and_matches_the_model(
            writes in prop::collection::vec(
                (
                    prop::collection::vec(0i64..6, 0..4),
                    prop::collection::vec(0usize..8, 0..2),
                    any::<u8>(),
                ),
                1..12,
            ),
            split in 0usize..12,
        ) {
            let (deltas, expected) = deltas_and_expected(&writes);
            let split = split.min(deltas.len());
            let all = merge_shipment_records(None, slices(&deltas)).expect("merges");
            prop_assert_eq!(
                ShipmentRecord::decode(all.as_slice()).expect("decodes"),
                expected.clone()
            );
            prop_assert_eq!(&all, &expected.encode_to_vec());
            let reference = prost_merge(None, slices(&deltas));
            prop_assert_eq!(Some(&all), reference.as_ref());
            let folded = merge_shipment_records(None, slices(&deltas[..split])).expect("merges");
            let rest = slices(&deltas[split..]);
            prop_assert_eq!(
                &merge_shipment_records(Some(&folded), rest.iter().copied()).expect("merges"),
                &all
            );
            if !rest.is_empty() {
                let combined = merge_shipment_records(None, rest.iter().copied()).expect("merges");
                prop_assert_eq!(
                    &merge_shipment_records(Some(&folded), [combined.as_slice()])
                        .expect("merges"),
                    &all
                );
            }
        }
    }

    proptest! {
        /// Any bytes: no panic, and whatever prost's merge takes, the wire merge takes too,
        /// into the same record (prost drops unknown fields, the wire merge keeps them).
        #[test]
        fn any_bytes_merge_as_prost_would_or_fail_without_a_panic(
            record in prop::option::of(prop::collection::vec(any::<u8>(), 0..64)),
            deltas in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..64), 0..4),
        ) {
            let wire = merge_shipment_records(record.as_deref(), slices(&deltas));
            if let Some(reference) = prost_merge(record.as_deref(), slices(&deltas)) {
                let wire = wire.expect("prost merged it");
                prop_assert_eq!(
                    ShipmentRecord::decode(wire.as_slice()).expect("decodes"),
                    ShipmentRecord::decode(reference.as_slice()).expect("decodes")
                );
            }
        }
    }

    #[test]
    fn a_record_merged_with_nothing_keeps_its_bytes() {
        let (deltas, expected) = deltas_and_expected(&[(vec![1, 3], vec![], 7)]);
        let record = expected.encode_to_vec();
        assert_eq!(
            merge_shipment_records(Some(&deltas[0]), []),
            Some(record.clone())
        );
        assert_eq!(merge_shipment_records(Some(&record), []), Some(record));
    }

    #[test]
    fn two_reads_of_one_event_keep_the_first_written() {
        let entry = |event: &str| EntryRecord {
            event_time: 5,
            scan_id: "s-1".to_owned(),
            event: event.as_bytes().to_vec().into(),
            ..Default::default()
        };
        let delta = |e: EntryRecord| {
            ShipmentRecord {
                timeline: vec![e],
                ..Default::default()
            }
            .encode_to_vec()
        };
        let (first, second) = (delta(entry("first")), delta(entry("second")));
        let merged =
            merge_shipment_records(None, [first.as_slice(), second.as_slice()]).expect("merges");
        assert_eq!(merged, first);
    }

    /// A delta of version 2 followed by `unknown`, fields this build does not know.
    fn version_2_delta_with(unknown: &[u8]) -> Vec<u8> {
        let mut delta = ShipmentRecord {
            version: 2,
            ..Default::default()
        }
        .encode_to_vec();
        delta.extend_from_slice(unknown);
        delta
    }

    #[test]
    fn fields_this_build_does_not_know_are_kept_after_the_known_ones() {
        // Field 40, a string a newer build might add.
        let delta = version_2_delta_with(&[0xc2, 0x02, 2, b'h', b'i']);
        let merged = merge_shipment_records(None, [delta.as_slice()]).expect("merges");
        assert_eq!(merged, delta);
        assert_eq!(
            ShipmentRecord::decode(merged.as_slice())
                .expect("decodes")
                .version,
            2
        );
    }

    /// A group of field `tag` holding `depth` groups of field 41 nested in it, and a varint.
    fn nested_groups(tag: u64, depth: usize) -> Vec<u8> {
        let mut bytes = Vec::new();
        let key = |tag: u64, wire_type: u64, bytes: &mut Vec<u8>| {
            prost::encoding::encode_varint(tag << 3 | wire_type, bytes)
        };
        key(tag, 3, &mut bytes);
        for _ in 0..depth {
            key(41, 3, &mut bytes);
        }
        bytes.extend_from_slice(&[0x08, 0x07]);
        for _ in 0..depth {
            key(41, 4, &mut bytes);
        }
        key(tag, 4, &mut bytes);
        bytes
    }

    #[test]
    fn an_unknown_group_is_skipped_as_prost_skips_it_and_kept() {
        // Found by the `merge` fuzz target: groups are deprecated, but prost skips an unknown
        // one, so the merge must take it too (and not a known field sent as one).
        let delta = version_2_delta_with(&nested_groups(40, 1));
        let merged = merge_shipment_records(None, [delta.as_slice()]).expect("merges");
        assert_eq!(merged, delta);
        let reference = prost_merge(None, [delta.as_slice()]).expect("prost merges");
        assert_eq!(
            ShipmentRecord::decode(merged.as_slice()).expect("decodes"),
            ShipmentRecord::decode(reference.as_slice()).expect("decodes")
        );
        assert_eq!(
            merge_shipment_records(None, [&nested_groups(1, 0)[..]]),
            None
        );
        // Where prost's recursion limit ends a decode, the merge fails too; in the record and
        // inside a timeline entry, a level deeper.
        for depth in 95..105 {
            let head = nested_groups(40, depth);
            let mut entry = vec![0x2a];
            prost::encoding::encode_varint(head.len() as u64, &mut entry);
            entry.extend_from_slice(&head);
            for value in [head, entry] {
                assert_eq!(
                    merge_shipment_records(None, [value.as_slice()]).is_some(),
                    prost_merge(None, [value.as_slice()]).is_some(),
                    "{depth} groups deep"
                );
            }
        }
    }

    #[test]
    fn a_value_that_is_no_record_fails_the_merge() {
        let record = ShipmentRecord::default().encode_to_vec();
        let entry_time_as_string = [0x2a, 4, 0x0a, 2, b'h', b'i'];
        let status_as_string = [0x0a, 1, b'x'];
        for bad in [
            &[0xff, 0xff][..],
            &[0x2a, 9, 0x10][..],
            &[0x7b][..],
            &entry_time_as_string[..],
            &status_as_string[..],
        ] {
            assert_eq!(
                merge_shipment_records(Some(&record), [bad]),
                None,
                "{bad:?}"
            );
            assert_eq!(merge_shipment_records(Some(bad), []), None, "{bad:?}");
        }
    }
}
