//! Column family names and key encodings: the one place that knows how keys are laid out.
//! Nothing outside this module builds a key by hand.
//!
//! Integers in keys are big-endian (signed ones with the sign bit flipped) so that byte order
//! is numeric order and a prefix iteration walks a timeline or the change log in order.

use crate::domain::{EventTime, Sequence, TrackingNumber};

/// `tracking_number` → shipment record: status, version and the timeline, each entry with its
/// stored scan (see `codec`): one key per shipment holds all a shipment read needs.
pub const SHIPMENTS: &str = "shipments";
/// `first sequence` → a block of consecutive `scand.v1.StatusChange`s written together (see
/// `codec::ChangeBlock`): the change log the feed and publishers read. A block per write, not
/// a key per change: a batch of scans changes most of its shipments' statuses.
pub const CHANGES: &str = "change_blocks";
/// Most changes in one block, so a reader resuming anywhere decodes little it skips.
pub const CHANGES_PER_BLOCK: usize = 256;
/// Small named values (see the `META_*` keys).
pub const META: &str = "meta";
/// `deadline ␀ tracking_number` → empty: shipments by their next deadline (when they stall or
/// when retention expires their oldest journey), so a sweep reads only the ones due, never
/// every shipment. Named when it held stall deadlines alone.
/// Shipments of a source partition this instance does not own have a parked entry instead
/// (see [`parked_key`]).
pub const STALL_DEADLINES: &str = "stall_deadlines";

/// `tracking_number` → what retention removed of a number none of whose journeys is left (a
/// `ShipmentRecord` with only its journey fields): apart from `shipments`, so that removing a
/// number's last journey deletes its record, and RocksDB, counting deletions, compacts the
/// space away (an overwrite with a small record left the old one in the lowest level).
pub const EXPIRED: &str = "expired";

pub const ALL_COLUMN_FAMILIES: [&str; 5] = [SHIPMENTS, CHANGES, META, STALL_DEADLINES, EXPIRED];

/// Oldest sequence `changes` keeps (absent: 1), moved by the change log's retention.
pub const META_FIRST_SEQUENCE: &[u8] = b"first_sequence";
/// Highest sequence written to `changes`.
pub const META_LAST_SEQUENCE: &[u8] = b"last_sequence";
/// Layout version of this data directory.
pub const META_SCHEMA_VERSION: &[u8] = b"schema_version";
/// The layout this build writes; a directory at an earlier version is brought to it by the
/// migrations of `store::open`, one version at a time, and a later one is refused.
pub const SCHEMA_VERSION: u32 = 2;
/// Scans stored (u64 BE), kept in the same writes that store and replace them.
pub const META_STORED_SCANS: &[u8] = b"stored_scans";
/// Shipments currently stalled (u64 BE), kept in the same writes that stall and wake them.
pub const META_STALLED_SHIPMENTS: &[u8] = b"stalled_shipments";
/// Written (synced) to learn whether a store that refused writes takes them again.
pub const META_WRITE_PROBE: &[u8] = b"write_probe";

/// What every source offset key begins with.
pub const SOURCE_OFFSET_PREFIX: &[u8] = b"source_offset\0";

/// Next offset to consume of a source partition: `source_offset ␀ topic ␀ partition(i32 BE)`.
pub fn source_offset_key(topic: &str, partition: i32) -> Vec<u8> {
    let mut key = SOURCE_OFFSET_PREFIX.to_vec();
    key.extend_from_slice(topic.as_bytes());
    key.push(SEPARATOR);
    key.extend_from_slice(&partition.to_be_bytes());
    key
}

/// `None` for a key [`source_offset_key`] did not build.
pub fn decode_source_offset_key(key: &[u8]) -> Option<(String, i32)> {
    let rest = key.strip_prefix(SOURCE_OFFSET_PREFIX)?;
    let (topic, partition) = rest.split_at(rest.len().checked_sub(5)?);
    let (separator, partition) = partition.split_first()?;
    (*separator == SEPARATOR).then_some(())?;
    Some((
        std::str::from_utf8(topic).ok()?.to_owned(),
        i32::from_be_bytes(partition.try_into().ok()?),
    ))
}

/// Highest sequence a sink has delivered: `sink_cursor ␀ sink`.
pub fn sink_cursor_key(sink: &str) -> Vec<u8> {
    let mut key = b"sink_cursor\0".to_vec();
    key.extend_from_slice(sink.as_bytes());
    key
}

/// Where a sink's recovery reads its destination from: `sink_floors ␀ sink`, a `SinkFloors`.
pub fn sink_floors_key(sink: &str) -> Vec<u8> {
    let mut key = b"sink_floors\0".to_vec();
    key.extend_from_slice(sink.as_bytes());
    key
}

/// This data directory's identity as a publisher, stamped on what it publishes: 8 bytes,
/// drawn once when the store is created, kept by backups.
pub const META_PUBLISHER_ID: &[u8] = b"publisher_id";

/// The Kafka sink's name in its `meta` keys and metric labels.
pub const KAFKA_SINK: &str = "kafka";

/// How far this instance's change log is decided against the changelog
/// (`scand.storage.v1.Replicated`); absent until scale-out first runs.
pub const META_REPLICATED: &[u8] = b"replicated";

/// Tracking numbers are `[A-Z0-9]`, so a zero byte cannot occur inside one.
const SEPARATOR: u8 = 0;

fn ordered_i64(v: i64) -> [u8; 8] {
    ((v as u64) ^ (1 << 63)).to_be_bytes()
}

/// The tracking number a `shipments` key belongs to: the prefix its memtable hashes by, so a
/// shipment's operands share one bucket. Bytes before the first separator (all of a shipment
/// key, which has none; public for `scand-load`'s raw limit, whose keys have more after it).
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

/// What every parked deadline key begins with: a first byte no deadline's key has (it would
/// be hundreds of thousands of years away), so parked keys sort after every due one.
const PARKED_PREFIX: &[u8] = &[0xff, b'p', SEPARATOR];

/// The parked deadline of a shipment whose source partition this instance does not own:
/// `0xff p ␀ topic ␀ partition(i32 BE) ␀ tracking_number`, in the deadline index beside the
/// real deadlines, never due, so that the partition's shipments can be put back at their
/// deadlines when it is owned again (a prefix read), and swept by no one meanwhile.
pub fn parked_key(topic: &str, partition: i32, tracking_number: &TrackingNumber) -> Vec<u8> {
    let mut key = parked_prefix(topic, partition);
    key.extend_from_slice(tracking_number.as_str().as_bytes());
    key
}

/// Every parked key of a partition begins with this.
pub fn parked_prefix(topic: &str, partition: i32) -> Vec<u8> {
    let mut key = PARKED_PREFIX.to_vec();
    key.extend_from_slice(topic.as_bytes());
    key.push(SEPARATOR);
    key.extend_from_slice(&partition.to_be_bytes());
    key.push(SEPARATOR);
    key
}

/// The tracking number of a parked key of the partition whose [`parked_prefix`] it has.
pub fn decode_parked_key(prefix: &[u8], key: &[u8]) -> Option<TrackingNumber> {
    let number = std::str::from_utf8(key.strip_prefix(prefix)?).ok()?;
    TrackingNumber::parse(number).ok()
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
    fn a_shipment_key_is_its_tracking_number_prefix() {
        let n = tn("PARCEL0001");
        assert_eq!(tracking_number_prefix(shipment_key(&n)), b"PARCEL0001");
        assert_eq!(tracking_number_prefix(b"PARCEL0001\0later"), b"PARCEL0001");
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
    fn source_offset_keys_round_trip() {
        let key = source_offset_key("scans.v1", 7);
        assert_eq!(decode_source_offset_key(&key), Some(("scans.v1".into(), 7)));
        assert_eq!(decode_source_offset_key(b"source_offset\0x"), None);
        assert_eq!(decode_source_offset_key(&sink_cursor_key("kafka")), None);
    }

    #[test]
    fn meta_keys_do_not_collide() {
        assert_ne!(source_offset_key("a", 1), source_offset_key("a", 2));
        assert_ne!(source_offset_key("a\u{1}", 0), source_offset_key("a", 1));
        assert!(!sink_cursor_key("kafka").starts_with(META_LAST_SEQUENCE));
        assert_ne!(sink_cursor_key("kafka"), sink_floors_key("kafka"));
    }

    #[test]
    fn parked_keys_are_never_due_and_group_by_partition() {
        let parked = parked_key("scans", 2, &tn("AAA00001"));
        // Half of i64: about 146,000 years of microseconds.
        assert!(parked.as_slice() > stall_keys_due(EventTime(i64::MAX / 2)).as_slice());
        assert!(parked.starts_with(&parked_prefix("scans", 2)));
        assert!(!parked.starts_with(&parked_prefix("scans", 1)));
        assert!(!parked.starts_with(&parked_prefix("scan", 2)));
        let prefix = parked_prefix("scans", 2);
        assert_eq!(decode_parked_key(&prefix, &parked), Some(tn("AAA00001")));
        assert_eq!(decode_parked_key(&parked_prefix("scans", 3), &parked), None);
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
