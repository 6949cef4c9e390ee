//! Value codecs: the engine's shipment state as a `ShipmentRecord` (`shipments`), so fields can
//! be added without a migration, the deltas the writer merges into it, and blocks of the change
//! log (`change_blocks`). The messages are generated from proto/scand/storage/v1/storage.proto;
//! the encoders the writer runs for every group are written by hand for speed (`wire`, one
//! set of wire primitives and field numbers shared with `merge`, the shipments' merge operator
//! on the wire bytes) and give prost's bytes (tested). A stored scan is kept in its timeline
//! entry, without the scan id and tracking number the entry and key already hold.

pub mod merge;
mod wire;

use prost::Message;

use super::StoreError;
use crate::domain::{
    EventTime, NumberCheck, Origin, ScanId, ScanType, Status, StatusPoint, Version,
};
use crate::engine::journey::{Expired, Journey};
use crate::engine::status::Derived;
use crate::engine::{Entry, Flags, ShipmentState};
use crate::proto::pb;
use wire::{entry, shipment};

pub use crate::proto::storage::{ChangeBlock, EntryRecord, JourneyRecord, ShipmentRecord};

/// The record of a state, as owned protobuf; `encode_shipment` writes the same bytes without
/// building it.
#[cfg(test)]
fn shipment_record(state: &ShipmentState) -> ShipmentRecord {
    let mut record = ShipmentRecord {
        timeline: state
            .timeline
            .iter()
            .map(|e| EntryRecord {
                event_time: e.event_time.0,
                scan_id: e.scan_id.as_str().to_owned(),
                scan_type: e.scan_type.as_i32(),
                facility: e.facility,
                event: Default::default(),
            })
            .collect(),
        ..ShipmentRecord::default()
    };
    set_head(&mut record, state);
    record
}

fn point_fields(point: Option<StatusPoint>) -> (i32, i32) {
    (
        point.map_or(0, |p| p.status.as_i32()),
        point.and_then(|p| p.sub_status).map_or(0, ScanType::as_i32),
    )
}

fn journey_record(journey: &Journey) -> JourneyRecord {
    let (status, sub_status) = point_fields(journey.derived.point);
    JourneyRecord {
        number: journey.number,
        entries: journey.entries,
        closed: journey.closed.map(|t| t.0),
        status,
        sub_status,
        version: journey.version.0,
        scans_after_terminal: journey.derived.scans_after_terminal,
        regressions: journey.regressions,
        clock_skewed_scans: journey.clock_skewed_scans,
    }
}

/// Sets every field of `record` but the timeline and the change sequences from `state`: how
/// the rare rewrites of a whole record (retention) keep their stored scans.
pub fn set_head(record: &mut ShipmentRecord, state: &ShipmentState) {
    let (status, sub_status) = point_fields(state.derived.point);
    record.status = status;
    record.sub_status = sub_status;
    record.version = state.version.0;
    record.scans_after_terminal = state.derived.scans_after_terminal;
    record.stalled = state.stalled;
    record.stall_deadline = state.stall_deadline.map(|t| t.0);
    record.regressions = state.flags.regressions;
    record.clock_skewed_scans = state.flags.clock_skewed_scans;
    record
        .carrier
        .clone_from(&state.flags.tracking_number.carrier);
    record
        .carrier_service
        .clone_from(&state.flags.tracking_number.service);
    record
        .tracking_number_issue
        .clone_from(&state.flags.tracking_number.issue);
    record.owner_topic = state
        .owner
        .as_ref()
        .map(|o| o.topic.clone())
        .unwrap_or_default();
    record.owner_partition = state.owner.as_ref().map_or(0, |o| o.partition);
    record.replaced_scan_ids = state
        .replaced
        .iter()
        .map(|id| id.as_str().to_owned())
        .collect();
    record.journey = state.journey;
    record.closed = state.closed.map(|t| t.0);
    record.earlier_journeys = state.earlier.iter().map(journey_record).collect();
    record.expired_journeys = state.expired.map_or(0, |e| e.journeys);
    record.expired_until = state.expired.map(|e| e.until.0);
    record.vanished_journeys = state
        .vanished
        .iter()
        .map(|(number, version)| JourneyRecord {
            number: *number,
            version: version.0,
            ..JourneyRecord::default()
        })
        .collect();
}

/// Encoded length of a proto3 string field (absent when empty).
fn str_len(tag: u32, value: &str) -> usize {
    use prost::encoding::{encoded_len_varint, key_len};
    if value.is_empty() {
        0
    } else {
        key_len(tag) + encoded_len_varint(value.len() as u64) + value.len()
    }
}

/// Writes a proto3 string field (nothing when empty).
fn put_str(tag: u32, value: &str, buf: &mut Vec<u8>) {
    if !value.is_empty() {
        wire::key(tag, wire::LEN, buf);
        wire::varint(value.len() as u64, buf);
        buf.extend_from_slice(value.as_bytes());
    }
}

/// A `scand.v1.Location` field as prost writes it (the message even when empty; its optional
/// coordinates whenever set), without prost's generic encoder, which goes through `BufMut` a
/// byte at a time: most status changes carry their scan's location.
fn encode_location(tag: u32, location: &pb::Location, buf: &mut Vec<u8>) {
    use prost::encoding::{double, int32};
    let coordinate =
        |tag: u32, value: Option<f64>| value.map_or(0, |v| double::encoded_len(tag, &v));
    let len = str_len(1, &location.facility_id)
        + if location.kind != 0 {
            int32::encoded_len(2, &location.kind)
        } else {
            0
        }
        + coordinate(3, location.latitude)
        + coordinate(4, location.longitude);
    wire::key(tag, wire::LEN, buf);
    wire::varint(len as u64, buf);
    put_str(1, &location.facility_id, buf);
    if location.kind != 0 {
        wire::int32(2, &location.kind, buf);
    }
    for (field, value) in [(3, location.latitude), (4, location.longitude)] {
        if let Some(value) = value {
            wire::fixed64(field, &value.to_bits(), buf);
        }
    }
}

/// One timeline entry's fields, borrowed from the state or from the scan that added it.
#[derive(Clone, Copy)]
pub struct EntryFields<'a> {
    pub event_time: EventTime,
    pub scan_id: &'a str,
    pub scan_type: ScanType,
    pub facility: u64,
    /// The stored scan, in the delta that adds it; empty where only the summary is written.
    pub event: &'a [u8],
}

impl<'a> From<&'a Entry> for EntryFields<'a> {
    fn from(e: &'a Entry) -> Self {
        EntryFields {
            event_time: e.event_time,
            scan_id: e.scan_id.as_str(),
            scan_type: e.scan_type,
            facility: e.facility,
            event: &[],
        }
    }
}

/// Encodes the state as a `ShipmentRecord` without stored scans: the delta from nothing that
/// the tests compare prost's encoding of the record against.
#[cfg(test)]
pub fn encode_shipment(state: &ShipmentState) -> Vec<u8> {
    encode_shipment_delta(
        state,
        state.timeline.iter().map(EntryFields::from),
        state.replaced.iter().map(ScanId::as_str),
        0..0,
    )
}

/// A delta of the state's head alone (status, version, flags, deadline): what the stall sweep
/// changes, written without rewriting the timeline and the scans it stores.
pub fn encode_shipment_head(state: &ShipmentState, changes: std::ops::Range<u64>) -> Vec<u8> {
    encode_shipment_delta(state, std::iter::empty(), std::iter::empty(), changes)
}

/// Encodes what one write changed in a shipment, the operand [`super::merge`] applies to the
/// stored record: the state's head (status, version, flags, ...) whole, the timeline entries
/// the write added with their stored scans, and the scan ids it replaced (whose entries the
/// merge removes). A `ShipmentRecord` in form, so a delta merged into
/// nothing is the record of a shipment that had nothing before.
pub fn encode_shipment_delta<'a>(
    state: &ShipmentState,
    timeline: impl Iterator<Item = EntryFields<'a>> + Clone,
    replaced: impl Iterator<Item = &'a str> + Clone,
    changes: std::ops::Range<u64>,
) -> Vec<u8> {
    use prost::encoding::{encoded_len_varint, fixed64, int32, key_len, sint64};

    fn entry_len(e: &EntryFields<'_>) -> usize {
        let time = e.event_time.0;
        let scan_type = e.scan_type.as_i32();
        (if time != 0 {
            sint64::encoded_len(entry::EVENT_TIME, &time)
        } else {
            0
        }) + str_len(entry::SCAN_ID, e.scan_id)
            + (if scan_type != 0 {
                int32::encoded_len(entry::SCAN_TYPE, &scan_type)
            } else {
                0
            })
            + (if e.facility != 0 {
                fixed64::encoded_len(entry::FACILITY, &e.facility)
            } else {
                0
            })
            + (if e.event.is_empty() {
                0
            } else {
                key_len(entry::EVENT) + encoded_len_varint(e.event.len() as u64) + e.event.len()
            })
    }

    let (status, sub_status) = point_fields(state.derived.point);
    let check = &state.flags.tracking_number;
    let owner_topic = state.owner.as_ref().map_or("", |o| o.topic.as_str());
    let owner_partition = state.owner.as_ref().map_or(0, |o| o.partition);
    let timeline_bytes: usize = timeline
        .clone()
        .map(|e| {
            let len = entry_len(&e);
            key_len(shipment::TIMELINE) + encoded_len_varint(len as u64) + len
        })
        .sum();
    let replaced_bytes: usize = replaced.clone().map(|id| id.len() + 2).sum();
    let change_bytes = (changes.end - changes.start) as usize * 10;
    let mut buf = Vec::with_capacity(
        timeline_bytes
            + replaced_bytes
            + change_bytes
            + 96
            + (state.earlier.len() + state.vanished.len()) * 48
            + check.carrier.len()
            + check.service.len(),
    );
    if status != 0 {
        wire::int32(shipment::STATUS, &status, &mut buf);
    }
    if sub_status != 0 {
        wire::int32(shipment::SUB_STATUS, &sub_status, &mut buf);
    }
    if state.version.0 != 0 {
        wire::uint64(shipment::VERSION, &state.version.0, &mut buf);
    }
    if state.derived.scans_after_terminal != 0 {
        wire::uint32(
            shipment::SCANS_AFTER_TERMINAL,
            &state.derived.scans_after_terminal,
            &mut buf,
        );
    }
    for e in timeline {
        wire::key(shipment::TIMELINE, wire::LEN, &mut buf);
        wire::varint(entry_len(&e) as u64, &mut buf);
        if e.event_time.0 != 0 {
            wire::sint64(entry::EVENT_TIME, &e.event_time.0, &mut buf);
        }
        put_str(entry::SCAN_ID, e.scan_id, &mut buf);
        if e.scan_type.as_i32() != 0 {
            wire::int32(entry::SCAN_TYPE, &e.scan_type.as_i32(), &mut buf);
        }
        if e.facility != 0 {
            wire::fixed64(entry::FACILITY, &e.facility, &mut buf);
        }
        if !e.event.is_empty() {
            wire::key(entry::EVENT, wire::LEN, &mut buf);
            wire::varint(e.event.len() as u64, &mut buf);
            buf.extend_from_slice(e.event);
        }
    }
    if state.stalled {
        wire::bool(shipment::STALLED, &state.stalled, &mut buf);
    }
    if let Some(deadline) = state.stall_deadline {
        wire::sint64(shipment::STALL_DEADLINE, &deadline.0, &mut buf);
    }
    if state.flags.regressions != 0 {
        wire::uint32(shipment::REGRESSIONS, &state.flags.regressions, &mut buf);
    }
    if state.flags.clock_skewed_scans != 0 {
        wire::uint32(
            shipment::CLOCK_SKEWED_SCANS,
            &state.flags.clock_skewed_scans,
            &mut buf,
        );
    }
    put_str(shipment::CARRIER, &check.carrier, &mut buf);
    put_str(shipment::CARRIER_SERVICE, &check.service, &mut buf);
    put_str(shipment::TRACKING_NUMBER_ISSUE, &check.issue, &mut buf);
    put_str(shipment::OWNER_TOPIC, owner_topic, &mut buf);
    if owner_partition != 0 {
        wire::int32(shipment::OWNER_PARTITION, &owner_partition, &mut buf);
    }
    for id in replaced {
        // Repeated strings are written even when empty.
        wire::key(shipment::REPLACED_SCAN_IDS, wire::LEN, &mut buf);
        wire::varint(id.len() as u64, &mut buf);
        buf.extend_from_slice(id.as_bytes());
    }
    for sequence in changes {
        wire::uint64(shipment::CHANGE_SEQUENCES, &sequence, &mut buf);
    }
    if state.journey != 0 {
        wire::uint32(shipment::JOURNEY, &state.journey, &mut buf);
    }
    if let Some(closed) = state.closed {
        wire::sint64(shipment::CLOSED, &closed.0, &mut buf);
    }
    // Rare (a number reused within retention): prost's encoder is fast enough.
    for journey in &state.earlier {
        prost::encoding::message::encode(
            shipment::EARLIER_JOURNEYS,
            &journey_record(journey),
            &mut buf,
        );
    }
    if let Some(expired) = state.expired {
        if expired.journeys != 0 {
            wire::uint32(shipment::EXPIRED_JOURNEYS, &expired.journeys, &mut buf);
        }
        wire::sint64(shipment::EXPIRED_UNTIL, &expired.until.0, &mut buf);
    }
    for (number, version) in &state.vanished {
        let record = JourneyRecord {
            number: *number,
            version: version.0,
            ..JourneyRecord::default()
        };
        prost::encoding::message::encode(shipment::VANISHED_JOURNEYS, &record, &mut buf);
    }
    buf
}

/// The sequences of a shipment's status changes its record lists (the index a change feed
/// filtered to one shipment reads), without decoding the rest of the record.
pub fn change_sequences(key: &[u8], record: &[u8]) -> Result<Vec<u64>, StoreError> {
    let corrupt = || not_a_record(key);
    let mut sequences = Vec::new();
    for field in wire::fields(record, wire::RECURSION_LIMIT) {
        let field = field.ok_or_else(corrupt)?;
        if field.tag == shipment::CHANGE_SEQUENCES {
            let mut value = field.payload;
            sequences.push(wire::read_varint(&mut value).ok_or_else(corrupt)?);
        }
    }
    Ok(sequences)
}

/// A record without its change sequences: what a restore installs, since the sequences name
/// changes in the previous owner's change log, not this instance's.
pub fn without_change_sequences(key: &[u8], record: &[u8]) -> Result<Vec<u8>, StoreError> {
    let mut kept = Vec::with_capacity(record.len());
    for field in wire::fields(record, wire::RECURSION_LIMIT) {
        let field = field.ok_or_else(|| not_a_record(key))?;
        if field.tag != shipment::CHANGE_SEQUENCES {
            kept.extend_from_slice(field.whole);
        }
    }
    Ok(kept)
}

fn not_a_record(key: &[u8]) -> StoreError {
    StoreError::Corrupt {
        key: String::from_utf8_lossy(key).into_owned(),
        what: "not a shipment record".to_owned(),
    }
}

/// Decodes a record or delta. Copied once into a shared buffer, which the entries' stored
/// scans then point into: decoded from the slice, each would be an allocation of its own.
fn decode_record(bytes: &[u8]) -> Result<ShipmentRecord, prost::DecodeError> {
    ShipmentRecord::decode(prost::bytes::Bytes::copy_from_slice(bytes))
}

/// A shipment's record with its stored scans, as read for GetShipment and changelog snapshots.
pub fn decode_shipment_record(key: &[u8], bytes: &[u8]) -> Result<ShipmentRecord, StoreError> {
    decode_record(bytes).map_err(|e| StoreError::Corrupt {
        key: String::from_utf8_lossy(key).into_owned(),
        what: e.to_string(),
    })
}

/// A `scand.v1.StatusChange` as it is published, borrowing its strings from the shipment's
/// state and the scan that caused it: the writer encodes one for most scans, and an owned
/// message would copy five strings each time. [`encode_change_block`] writes the same bytes as
/// prost's encoding of the owned [`ChangeBlock`] (tested).
#[derive(Debug)]
pub struct ChangeRecord<'a> {
    pub sequence: u64,
    pub tracking_number: &'a str,
    pub version: u64,
    pub previous_status: i32,
    pub status: i32,
    pub sub_status: i32,
    pub cause_scan_id: &'a str,
    pub event_time: Option<prost_types::Timestamp>,
    pub location: Option<&'a pb::Location>,
    pub regression: bool,
    pub previous_sub_status: i32,
    pub correction: bool,
    pub committed_time: Option<prost_types::Timestamp>,
    pub stalled_status: i32,
    pub carrier: &'a str,
    pub carrier_service: &'a str,
    pub previous_stalled_status: i32,
    pub journey: u32,
}

impl<'a> ChangeRecord<'a> {
    /// The record of an owned change: the tests write change logs from owned messages.
    #[cfg(test)]
    pub fn of(change: &'a pb::StatusChange) -> Self {
        ChangeRecord {
            sequence: change.sequence,
            tracking_number: &change.tracking_number,
            version: change.version,
            previous_status: change.previous_status,
            status: change.status,
            sub_status: change.sub_status,
            cause_scan_id: &change.cause_scan_id,
            event_time: change.event_time,
            location: change.location.as_ref(),
            regression: change.regression,
            previous_sub_status: change.previous_sub_status,
            correction: change.correction,
            committed_time: change.committed_time,
            stalled_status: change.stalled_status,
            carrier: &change.carrier,
            carrier_service: &change.carrier_service,
            previous_stalled_status: change.previous_stalled_status,
            journey: change.journey,
        }
    }

    /// The message's fields in tag order, proto3 defaults left out (prost's encoding).
    fn encode(&self, buf: &mut Vec<u8>) {
        let enum_field = |tag: u32, value: i32, buf: &mut Vec<u8>| {
            if value != 0 {
                wire::int32(tag, &value, buf);
            }
        };
        if self.sequence != 0 {
            wire::uint64(1, &self.sequence, buf);
        }
        put_str(2, self.tracking_number, buf);
        if self.version != 0 {
            wire::uint64(3, &self.version, buf);
        }
        enum_field(4, self.previous_status, buf);
        enum_field(5, self.status, buf);
        enum_field(6, self.sub_status, buf);
        put_str(7, self.cause_scan_id, buf);
        if let Some(time) = &self.event_time {
            wire::timestamp(8, time, buf);
        }
        if let Some(location) = self.location {
            encode_location(9, location, buf);
        }
        if self.regression {
            wire::bool(10, &self.regression, buf);
        }
        enum_field(11, self.previous_sub_status, buf);
        if self.correction {
            wire::bool(12, &self.correction, buf);
        }
        if let Some(time) = &self.committed_time {
            wire::timestamp(13, time, buf);
        }
        enum_field(14, self.stalled_status, buf);
        put_str(15, self.carrier, buf);
        put_str(16, self.carrier_service, buf);
        enum_field(17, self.previous_stalled_status, buf);
        if self.journey != 0 {
            wire::uint32(18, &self.journey, buf);
        }
    }
}

/// A scan's stored form, kept in its timeline entry: its wire form without the scan id and
/// tracking number, which the entry and its key hold. A third of each scan less to copy into
/// the WAL, the memtable and every SST.
pub fn encode_event(scan: &mut pb::Scan) -> Vec<u8> {
    let scan_id = std::mem::take(&mut scan.scan_id);
    let tracking_number = std::mem::take(&mut scan.tracking_number);
    let value = scan.encode_to_vec();
    scan.scan_id = scan_id;
    scan.tracking_number = tracking_number;
    value
}

/// The whole wire form of the stored scan of an entry, `None` for an entry without one.
pub fn entry_scan(tracking_number: &str, entry: &EntryRecord) -> Option<Vec<u8>> {
    (!entry.event.is_empty()).then(|| whole_scan(tracking_number, &entry.scan_id, &entry.event))
}

/// A stored scan's whole wire form. Prost writes fields in tag order and a stored scan lacks
/// only the first two, so the two put in front give the bytes the whole scan encodes to.
pub fn whole_scan(tracking_number: &str, scan_id: &str, value: &[u8]) -> Vec<u8> {
    let mut whole = Vec::with_capacity(value.len() + tracking_number.len() + scan_id.len() + 6);
    put_str(1, scan_id, &mut whole);
    put_str(2, tracking_number, &mut whole);
    whole.extend_from_slice(value);
    whole
}

/// Encodes consecutive changes as a [`ChangeBlock`] value, without owned messages.
pub fn encode_change_block(changes: &[ChangeRecord<'_>]) -> Vec<u8> {
    let mut block = Vec::with_capacity(changes.len() * 160);
    let mut change = Vec::with_capacity(256);
    for record in changes {
        change.clear();
        record.encode(&mut change);
        wire::key(1, wire::LEN, &mut block);
        wire::varint(change.len() as u64, &mut block);
        block.extend_from_slice(&change);
    }
    block
}

pub fn decode_change_block(key: &[u8], bytes: &[u8]) -> Result<ChangeBlock, StoreError> {
    ChangeBlock::decode(bytes).map_err(|e| StoreError::Corrupt {
        key: format!("change block {:?}", super::keys::decode_change_key(key)),
        what: e.to_string(),
    })
}

/// The engine's state of a shipment from its record (its stored scans left out).
pub fn decode_shipment(key: &[u8], bytes: &[u8]) -> Result<ShipmentState, StoreError> {
    let corrupt = |what: &str| StoreError::Corrupt {
        key: String::from_utf8_lossy(key).into_owned(),
        what: what.to_owned(),
    };
    let record = decode_shipment_record(key, bytes)?;
    let point_of = |status: i32, sub_status: i32| -> Result<Option<StatusPoint>, StoreError> {
        Ok(match status {
            0 => None,
            n => Some(StatusPoint {
                status: Status::from_i32(n).ok_or_else(|| corrupt("unknown status"))?,
                sub_status: match sub_status {
                    0 => None,
                    n => Some(ScanType::from_i32(n).ok_or_else(|| corrupt("unknown sub-status"))?),
                },
                stalled: false,
            }),
        })
    };
    let point = point_of(record.status, record.sub_status)?;
    let earlier = record
        .earlier_journeys
        .iter()
        .map(|j| {
            Ok(Journey {
                number: j.number,
                entries: j.entries,
                closed: j.closed.map(EventTime),
                derived: Derived {
                    point: point_of(j.status, j.sub_status)?,
                    scans_after_terminal: j.scans_after_terminal,
                },
                version: Version(j.version),
                regressions: j.regressions,
                clock_skewed_scans: j.clock_skewed_scans,
            })
        })
        .collect::<Result<Vec<_>, StoreError>>()?;
    let timeline = record
        .timeline
        .into_iter()
        .map(|e| {
            Ok(Entry {
                event_time: EventTime(e.event_time),
                scan_id: ScanId::from_stored(&e.scan_id),
                scan_type: ScanType::from_i32(e.scan_type)
                    .ok_or_else(|| corrupt("unknown scan type"))?,
                facility: e.facility,
            })
        })
        .collect::<Result<Vec<_>, StoreError>>()?;
    Ok(ShipmentState {
        timeline,
        derived: Derived {
            point,
            scans_after_terminal: record.scans_after_terminal,
        },
        version: Version(record.version),
        journey: record.journey,
        closed: record.closed.map(EventTime),
        earlier,
        expired: record.expired_until.map(|until| Expired {
            journeys: record.expired_journeys,
            until: EventTime(until),
        }),
        vanished: record
            .vanished_journeys
            .iter()
            .map(|j| (j.number, Version(j.version)))
            .collect(),
        stalled: record.stalled,
        stall_deadline: record.stall_deadline.map(EventTime),
        flags: Flags {
            regressions: record.regressions,
            clock_skewed_scans: record.clock_skewed_scans,
            tracking_number: NumberCheck {
                carrier: record.carrier,
                service: record.carrier_service,
                issue: record.tracking_number_issue,
            },
        },
        owner: (!record.owner_topic.is_empty()).then_some(Origin {
            topic: record.owner_topic,
            partition: record.owner_partition,
        }),
        replaced: record
            .replaced_scan_ids
            .iter()
            .map(|id| ScanId::from_stored(id))
            .collect(),
    })
}

#[cfg(test)]
mod tests;
