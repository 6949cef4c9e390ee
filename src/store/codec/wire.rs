//! Protobuf's wire format, both ways, for the store's hand-written codecs, and the field
//! numbers of the storage messages they spell out (proto/scand/storage/v1/storage.proto): the
//! encoders the writer runs for every group (`codec`), which write straight into a `Vec` where
//! prost's generic ones go through `BufMut` a byte at a time (the writer encodes some thirty
//! varints a scan), and the field slicer of the merge operator (`merge`), which reads a record
//! without decoding it into owned messages.
//!
//! Invariants: every encoder writes prost's bytes, the slicer takes what prost's decode takes,
//! and the field numbers are the generated messages' (all tested here, in `codec` and in
//! `merge`).

pub const VARINT: u8 = 0;
pub const FIXED64: u8 = 1;
pub const LEN: u8 = 2;
const START_GROUP: u8 = 3;
const END_GROUP: u8 = 4;
const FIXED32: u8 = 5;

/// Field numbers of `scand.storage.v1.ShipmentRecord`.
pub mod shipment {
    pub const STATUS: u32 = 1;
    pub const SUB_STATUS: u32 = 2;
    pub const VERSION: u32 = 3;
    pub const SCANS_AFTER_TERMINAL: u32 = 4;
    pub const TIMELINE: u32 = 5;
    pub const STALLED: u32 = 6;
    pub const STALL_DEADLINE: u32 = 7;
    pub const REGRESSIONS: u32 = 8;
    pub const CLOCK_SKEWED_SCANS: u32 = 9;
    pub const CARRIER: u32 = 10;
    pub const CARRIER_SERVICE: u32 = 11;
    pub const TRACKING_NUMBER_ISSUE: u32 = 12;
    pub const OWNER_TOPIC: u32 = 13;
    pub const OWNER_PARTITION: u32 = 14;
    pub const REPLACED_SCAN_IDS: u32 = 15;
    pub const CHANGE_SEQUENCES: u32 = 16;
    pub const JOURNEY: u32 = 17;
    pub const CLOSED: u32 = 18;
    pub const EARLIER_JOURNEYS: u32 = 19;
    pub const EXPIRED_JOURNEYS: u32 = 20;
    pub const EXPIRED_UNTIL: u32 = 21;
    pub const VANISHED_JOURNEYS: u32 = 22;
}

/// Field numbers of `scand.storage.v1.EntryRecord`.
pub mod entry {
    pub const EVENT_TIME: u32 = 1;
    pub const SCAN_ID: u32 = 2;
    pub const SCAN_TYPE: u32 = 3;
    pub const FACILITY: u32 = 4;
    pub const EVENT: u32 = 5;
}

#[inline]
pub fn varint(mut value: u64, buf: &mut Vec<u8>) {
    while value >= 0x80 {
        buf.push(value as u8 | 0x80);
        value >>= 7;
    }
    buf.push(value as u8);
}

#[inline]
pub fn key(tag: u32, wire_type: u8, buf: &mut Vec<u8>) {
    varint(u64::from(tag << 3 | u32::from(wire_type)), buf);
}

pub fn uint64(tag: u32, value: &u64, buf: &mut Vec<u8>) {
    key(tag, VARINT, buf);
    varint(*value, buf);
}

pub fn uint32(tag: u32, value: &u32, buf: &mut Vec<u8>) {
    key(tag, VARINT, buf);
    varint(u64::from(*value), buf);
}

/// Negative values take ten bytes, as in protobuf.
pub fn int32(tag: u32, value: &i32, buf: &mut Vec<u8>) {
    key(tag, VARINT, buf);
    varint(i64::from(*value) as u64, buf);
}

pub fn sint64(tag: u32, value: &i64, buf: &mut Vec<u8>) {
    key(tag, VARINT, buf);
    varint(((value << 1) ^ (value >> 63)) as u64, buf);
}

pub fn bool(tag: u32, value: &bool, buf: &mut Vec<u8>) {
    key(tag, VARINT, buf);
    buf.push(u8::from(*value));
}

pub fn fixed64(tag: u32, value: &u64, buf: &mut Vec<u8>) {
    key(tag, FIXED64, buf);
    buf.extend_from_slice(&value.to_le_bytes());
}

/// A `google.protobuf.Timestamp` field, defaults left out. Its length computed here:
/// prost's `encoded_len` of a `Timestamp` is a call into another crate, not inlined, and
/// the writer encodes two timestamps a status change.
pub fn timestamp(tag: u32, time: &prost_types::Timestamp, buf: &mut Vec<u8>) {
    use prost::encoding::{int32, int64};
    let len = if time.seconds != 0 {
        int64::encoded_len(1, &time.seconds)
    } else {
        0
    } + if time.nanos != 0 {
        int32::encoded_len(2, &time.nanos)
    } else {
        0
    };
    key(tag, LEN, buf);
    varint(len as u64, buf);
    if time.seconds != 0 {
        key(1, VARINT, buf);
        varint(time.seconds as u64, buf);
    }
    if time.nanos != 0 {
        int32(2, &time.nanos, buf);
    }
}

/// One field as it lies in its message: its tag and wire type, its whole bytes (key
/// included) and its value's bytes (what the length covers, for a length-delimited field).
#[derive(Clone, Copy)]
pub struct Field<'a> {
    pub tag: u32,
    pub wire_type: u8,
    pub whole: &'a [u8],
    pub payload: &'a [u8],
}

#[inline]
pub fn read_varint(buf: &mut &[u8]) -> Option<u64> {
    // Keys and most lengths and values here take one byte.
    if let Some((&byte, rest)) = buf.split_first() {
        if byte < 0x80 {
            *buf = rest;
            return Some(u64::from(byte));
        }
    }
    let mut value = 0u64;
    for (i, &byte) in buf.iter().enumerate().take(10) {
        value |= u64::from(byte & 0x7f) << (7 * i);
        if byte < 0x80 {
            *buf = &buf[i + 1..];
            return Some(value);
        }
    }
    None
}

/// The next field of `buf`, advancing past it; `None` when the bytes are no protobuf field.
/// `depth` is prost's recursion budget left ([`RECURSION_LIMIT`] for a record's fields): a
/// group (deprecated, but prost skips it as an unknown field) spends one a level, and where
/// prost's decode would run out, this fails too.
pub fn field<'a>(buf: &mut &'a [u8], depth: u32) -> Option<Field<'a>> {
    let start = *buf;
    let key = read_varint(buf)?;
    let tag = u32::try_from(key >> 3).ok().filter(|&t| t != 0)?;
    let wire_type = (key & 7) as u8;
    let value = *buf;
    let payload = match wire_type {
        VARINT => {
            read_varint(buf)?;
            &value[..value.len() - buf.len()]
        }
        FIXED64 => take(buf, 8)?,
        FIXED32 => take(buf, 4)?,
        LEN => {
            let len = usize::try_from(read_varint(buf)?).ok()?;
            take(buf, len)?
        }
        START_GROUP => {
            skip_group(buf, tag, depth)?;
            &value[..value.len() - buf.len()]
        }
        _ => return None,
    };
    Some(Field {
        tag,
        wire_type,
        whole: &start[..start.len() - buf.len()],
        payload,
    })
}

/// The next `len` bytes of `buf`, advancing past them.
fn take<'a>(buf: &mut &'a [u8], len: usize) -> Option<&'a [u8]> {
    let (taken, rest) = buf.split_at_checked(len)?;
    *buf = rest;
    Some(taken)
}

/// prost's `DecodeContext` recursion limit: the depth at which its decode fails.
pub const RECURSION_LIMIT: u32 = 100;

/// Skips a group's fields up to and with its end, as prost's `skip_field` does.
fn skip_group(buf: &mut &[u8], tag: u32, depth: u32) -> Option<()> {
    let inner_depth = depth.checked_sub(1).filter(|&d| d > 0)?;
    loop {
        let mut key_bytes = *buf;
        let key = read_varint(&mut key_bytes)?;
        if (key & 7) as u8 == END_GROUP {
            *buf = key_bytes;
            return (key >> 3 == u64::from(tag)).then_some(());
        }
        field(buf, inner_depth)?;
    }
}

/// The fields of a message, failing on the first malformed one.
pub fn fields(mut buf: &[u8], depth: u32) -> impl Iterator<Item = Option<Field<'_>>> {
    std::iter::from_fn(move || (!buf.is_empty()).then(|| field(&mut buf, depth)))
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::{entry, shipment};
    use crate::proto::storage::{EntryRecord, ShipmentRecord};

    #[test]
    fn timestamps_and_varints_encode_as_prost_does() {
        for (seconds, nanos) in [(0, 0), (1, 0), (0, 1), (-1, -1), (1 << 40, 999_999_999)] {
            let time = prost_types::Timestamp { seconds, nanos };
            let mut ours = Vec::new();
            super::timestamp(8, &time, &mut ours);
            let mut theirs = Vec::new();
            prost::encoding::message::encode(8, &time, &mut theirs);
            assert_eq!(ours, theirs, "{time:?}");
            assert_eq!(time.encoded_len(), theirs.len() - 2);
        }
        for value in [0, 1, 127, 128, 300, u64::MAX] {
            let mut ours = Vec::new();
            super::varint(value, &mut ours);
            let mut theirs = Vec::new();
            prost::encoding::encode_varint(value, &mut theirs);
            assert_eq!(ours, theirs);
            assert_eq!(prost::encoding::encoded_len_varint(value), ours.len());
        }
    }

    /// The tag of the one field a message encodes to.
    fn only_tag(bytes: &[u8]) -> u32 {
        let mut buf = bytes;
        let field = super::field(&mut buf, super::RECURSION_LIMIT).expect("a field");
        assert!(buf.is_empty(), "one field");
        field.tag
    }

    #[test]
    fn field_numbers_are_the_generated_messages() {
        let record = |set: fn(&mut ShipmentRecord)| {
            let mut r = ShipmentRecord::default();
            set(&mut r);
            only_tag(&r.encode_to_vec())
        };
        assert_eq!(record(|r| r.status = 1), shipment::STATUS);
        assert_eq!(record(|r| r.sub_status = 1), shipment::SUB_STATUS);
        assert_eq!(record(|r| r.version = 1), shipment::VERSION);
        assert_eq!(
            record(|r| r.scans_after_terminal = 1),
            shipment::SCANS_AFTER_TERMINAL
        );
        assert_eq!(
            record(|r| r.timeline.push(EntryRecord::default())),
            shipment::TIMELINE
        );
        assert_eq!(record(|r| r.stalled = true), shipment::STALLED);
        assert_eq!(
            record(|r| r.stall_deadline = Some(1)),
            shipment::STALL_DEADLINE
        );
        assert_eq!(record(|r| r.regressions = 1), shipment::REGRESSIONS);
        assert_eq!(
            record(|r| r.clock_skewed_scans = 1),
            shipment::CLOCK_SKEWED_SCANS
        );
        assert_eq!(record(|r| r.carrier = "c".into()), shipment::CARRIER);
        assert_eq!(
            record(|r| r.carrier_service = "s".into()),
            shipment::CARRIER_SERVICE
        );
        assert_eq!(
            record(|r| r.tracking_number_issue = "i".into()),
            shipment::TRACKING_NUMBER_ISSUE
        );
        assert_eq!(
            record(|r| r.owner_topic = "t".into()),
            shipment::OWNER_TOPIC
        );
        assert_eq!(record(|r| r.owner_partition = 1), shipment::OWNER_PARTITION);
        assert_eq!(
            record(|r| r.replaced_scan_ids.push("x".into())),
            shipment::REPLACED_SCAN_IDS
        );
        assert_eq!(
            record(|r| r.change_sequences.push(1)),
            shipment::CHANGE_SEQUENCES
        );
        let entry = |set: fn(&mut EntryRecord)| {
            let mut e = EntryRecord::default();
            set(&mut e);
            only_tag(&e.encode_to_vec())
        };
        assert_eq!(entry(|e| e.event_time = 1), entry::EVENT_TIME);
        assert_eq!(entry(|e| e.scan_id = "a".into()), entry::SCAN_ID);
        assert_eq!(entry(|e| e.scan_type = 1), entry::SCAN_TYPE);
        assert_eq!(entry(|e| e.facility = 1), entry::FACILITY);
        assert_eq!(entry(|e| e.event = vec![1].into()), entry::EVENT);
    }
}
