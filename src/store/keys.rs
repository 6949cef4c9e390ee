//! Column family names and key encodings: the one place that knows how keys are laid out.
//! Nothing outside this module builds a key by hand.
//!
//! Integers in keys are big-endian (signed ones with the sign bit flipped) so that byte order
//! is numeric order and a prefix iteration walks a timeline or the change log in order.

use crate::domain::{EventTime, ScanId, Sequence, TrackingNumber};

/// `tracking_number ␀ event_time ␀ scan_id` → the stored `scand.v1.Scan`, without the
/// tracking number and scan id its key holds (see `records::encode_event`).
pub const EVENTS: &str = "events";
/// `tracking_number` → shipment record: status, version and the timeline summary that
/// deduplicates and derives status without reading `events`.
pub const SHIPMENTS: &str = "shipments";
/// `first sequence` → a block of consecutive `scand.v1.StatusChange`s written together (see
/// `records::ChangeBlock`): the change log the feed and publishers read. A block per write, not
/// a key per change: a batch of scans changes most of its shipments' statuses.
pub const CHANGES: &str = "change_blocks";
/// Most changes in one block, so a reader resuming anywhere decodes little it skips.
pub const CHANGES_PER_BLOCK: usize = 256;
/// Small named values (see the `META_*` keys).
pub const META: &str = "meta";
/// `deadline ␀ tracking_number` → empty: shipments by the time they stall, so a sweep reads
/// only the ones due, never every shipment.
pub const STALL_DEADLINES: &str = "stall_deadlines";

pub const ALL_COLUMN_FAMILIES: [&str; 5] = [EVENTS, SHIPMENTS, CHANGES, META, STALL_DEADLINES];

/// Column families of earlier builds, dropped when a data directory is opened: `dedup` held a
/// key per stored scan id across shipments; a scan id now names a read of one shipment and its
/// timeline summary deduplicates it (see docs/ARCHITECTURE.md).
pub const RETIRED_COLUMN_FAMILIES: [&str; 1] = ["dedup"];
/// The change log of earlier builds, one `sequence` → `StatusChange` key per change: copied
/// into `CHANGES` blocks, then dropped, when a data directory is opened.
pub const LEGACY_CHANGES: &str = "changes";

/// Highest sequence written to `changes`.
pub const META_LAST_SEQUENCE: &[u8] = b"last_sequence";
/// Layout version of this data directory.
pub const META_SCHEMA_VERSION: &[u8] = b"schema_version";
/// 2: `shipments` values may be merge operands (deltas), which builds reading version 1
/// cannot apply. 3: a scan is stored in its shipment's timeline entry, where builds reading
/// version 2 would not look. Older directories open as they are and are marked 3: their
/// scans under `events` keys are read from there.
pub const SCHEMA_VERSION: u32 = 3;
/// Versions this build opens and upgrades by marking them current.
pub const UPGRADABLE_SCHEMA_VERSIONS: [u32; 2] = [1, 2];
/// Scans stored (u64 BE), kept in the same writes that store and replace them; set from
/// RocksDB's estimate of the `events` keys when a directory from before version 3 opens.
pub const META_STORED_SCANS: &[u8] = b"stored_scans";
/// Shipments currently stalled (u64 BE), kept in the same writes that stall and wake them.
pub const META_STALLED_SHIPMENTS: &[u8] = b"stalled_shipments";
/// Written (synced) to learn whether a store that refused writes takes them again.
pub const META_WRITE_PROBE: &[u8] = b"write_probe";

/// Next offset to consume of a source partition: `source_offset ␀ topic ␀ partition(i32 BE)`.
pub fn source_offset_key(topic: &str, partition: i32) -> Vec<u8> {
    let mut key = b"source_offset\0".to_vec();
    key.extend_from_slice(topic.as_bytes());
    key.push(SEPARATOR);
    key.extend_from_slice(&partition.to_be_bytes());
    key
}

/// Highest sequence a sink has delivered: `sink_cursor ␀ sink`.
pub fn sink_cursor_key(sink: &str) -> Vec<u8> {
    let mut key = b"sink_cursor\0".to_vec();
    key.extend_from_slice(sink.as_bytes());
    key
}

/// Tracking numbers are `[A-Z0-9]`, so a zero byte cannot occur inside one.
const SEPARATOR: u8 = 0;

fn ordered_i64(v: i64) -> [u8; 8] {
    ((v as u64) ^ (1 << 63)).to_be_bytes()
}

pub fn event_key(
    tracking_number: &TrackingNumber,
    event_time: EventTime,
    scan_id: &ScanId,
) -> Vec<u8> {
    event_key_unchecked(tracking_number.as_str(), event_time, scan_id.as_str())
}

/// [`event_key`]'s layout from unvalidated parts, for `scand-load`'s raw limits, which store
/// wire scans with no logic at all. scand itself keys validated scans only.
pub fn event_key_unchecked(tracking_number: &str, event_time: EventTime, scan_id: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(tracking_number.len() + 10 + scan_id.len());
    key.extend_from_slice(tracking_number.as_bytes());
    key.push(SEPARATOR);
    key.extend_from_slice(&ordered_i64(event_time.0));
    key.push(SEPARATOR);
    key.extend_from_slice(scan_id.as_bytes());
    key
}

/// The tracking number and scan id of an `events` key; `None` for a key this module did not
/// build. Fixed offsets after the number: the time may hold zero bytes, the scan id anything.
pub fn decode_event_key(key: &[u8]) -> Option<(&str, &str)> {
    let number = tracking_number_prefix(key);
    let scan_id = key.get(number.len() + 10..)?;
    Some((
        std::str::from_utf8(number).ok()?,
        std::str::from_utf8(scan_id).ok()?,
    ))
}

/// The half-open key range `[start, end)` holding one shipment's timeline.
pub fn timeline_range(tracking_number: &TrackingNumber) -> (Vec<u8>, Vec<u8>) {
    let mut start = tracking_number.as_str().as_bytes().to_vec();
    start.push(SEPARATOR);
    let mut end = tracking_number.as_str().as_bytes().to_vec();
    end.push(SEPARATOR + 1);
    (start, end)
}

/// The tracking number an `events` or `shipments` key belongs to: the prefix their memtables
/// hash by, so a shipment's keys share one bucket. Bytes before the first separator (all of a
/// shipment key, which has none).
pub fn tracking_number_prefix(key: &[u8]) -> &[u8] {
    match key.iter().position(|b| *b == SEPARATOR) {
        Some(end) => &key[..end],
        None => key,
    }
}

pub fn shipment_key(tracking_number: &TrackingNumber) -> &[u8] {
    tracking_number.as_str().as_bytes()
}

pub fn stall_key(deadline: EventTime, tracking_number: &TrackingNumber) -> Vec<u8> {
    let mut key = Vec::with_capacity(9 + tracking_number.as_str().len());
    key.extend_from_slice(&ordered_i64(deadline.0));
    key.push(SEPARATOR);
    key.extend_from_slice(tracking_number.as_str().as_bytes());
    key
}

/// The exclusive upper bound of the stall keys due at `now`.
pub fn stall_keys_due(now: EventTime) -> Vec<u8> {
    ordered_i64(now.0.saturating_add(1)).to_vec()
}

/// `None` for a key this module did not build.
pub fn decode_stall_key(key: &[u8]) -> Option<(EventTime, TrackingNumber)> {
    let deadline = u64::from_be_bytes(key.get(..8)?.try_into().ok()?) ^ (1 << 63);
    let number = std::str::from_utf8(key.get(9..)?).ok()?;
    Some((
        EventTime(deadline as i64),
        TrackingNumber::parse(number).ok()?,
    ))
}

pub fn change_key(sequence: Sequence) -> [u8; 8] {
    sequence.0.to_be_bytes()
}

pub fn decode_change_key(key: &[u8]) -> Option<Sequence> {
    key.try_into().ok().map(|b| Sequence(u64::from_be_bytes(b)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tn(s: &str) -> TrackingNumber {
        TrackingNumber::parse(s).expect("valid")
    }

    #[test]
    fn event_keys_sort_by_time_then_scan_id_including_negative_times() {
        let n = tn("PARCEL0001");
        let id = |s: &str| ScanId::parse(s).expect("valid");
        let keys = [
            event_key(&n, EventTime(-5), &id("z")),
            event_key(&n, EventTime(0), &id("a")),
            event_key(&n, EventTime(0), &id("b")),
            event_key(&n, EventTime(1 << 40), &id("a")),
        ];
        let mut sorted = keys.clone();
        sorted.sort();
        assert_eq!(sorted, keys);
        let (start, end) = timeline_range(&n);
        assert!(keys
            .iter()
            .all(|k| k.as_slice() >= start.as_slice() && k.as_slice() < end.as_slice()));
    }

    #[test]
    fn event_keys_give_back_their_number_and_scan_id() {
        let id = ScanId::parse("a\u{0}b-7").expect("valid");
        let key = event_key(&tn("PARCEL0001"), EventTime(256), &id);
        assert_eq!(decode_event_key(&key), Some(("PARCEL0001", "a\u{0}b-7")));
        assert_eq!(decode_event_key(b"PARCEL0001\0short"), None);
    }

    #[test]
    fn one_timeline_range_excludes_longer_numbers_with_the_same_prefix() {
        let (start, end) = timeline_range(&tn("PARCEL0001"));
        let other = event_key(
            &tn("PARCEL00012"),
            EventTime(0),
            &ScanId::parse("a").expect("valid"),
        );
        assert!(!(other.as_slice() >= start.as_slice() && other.as_slice() < end.as_slice()));
    }

    #[test]
    fn events_and_shipment_keys_share_their_tracking_number_prefix() {
        let n = tn("PARCEL0001");
        let event = event_key(&n, EventTime(0), &ScanId::parse("a").expect("valid"));
        assert_eq!(tracking_number_prefix(&event), b"PARCEL0001");
        assert_eq!(tracking_number_prefix(shipment_key(&n)), b"PARCEL0001");
        let (start, _) = timeline_range(&n);
        assert_eq!(tracking_number_prefix(&start), b"PARCEL0001");
    }

    #[test]
    fn change_keys_round_trip_in_order() {
        assert!(change_key(Sequence(2)) < change_key(Sequence(256)));
        assert_eq!(
            decode_change_key(&change_key(Sequence(77))),
            Some(Sequence(77))
        );
        assert_eq!(decode_change_key(b"short"), None);
    }

    #[test]
    fn meta_keys_do_not_collide() {
        assert_ne!(source_offset_key("a", 1), source_offset_key("a", 2));
        assert_ne!(source_offset_key("a\u{1}", 0), source_offset_key("a", 1));
        assert!(!sink_cursor_key("kafka").starts_with(META_LAST_SEQUENCE));
    }

    #[test]
    fn stall_keys_sort_by_deadline_and_round_trip() {
        let a = stall_key(EventTime(-1), &tn("ZZZ00001"));
        let b = stall_key(EventTime(5), &tn("AAA00001"));
        assert!(a < b);
        assert!(b.as_slice() < stall_keys_due(EventTime(5)).as_slice());
        assert!(b.as_slice() >= stall_keys_due(EventTime(4)).as_slice());
        assert_eq!(decode_stall_key(&b), Some((EventTime(5), tn("AAA00001"))));
        assert_eq!(decode_stall_key(b"short"), None);
    }
}
