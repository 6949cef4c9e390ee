//! Value codecs: the engine's shipment state as a protobuf record (`shipments`), so fields can
//! be added without a migration, and blocks of the change log (`changes`).

use prost::Message;

use crate::domain::{EventTime, Origin, ScanId, ScanType, Status, Version};
use crate::engine::status::{Derived, StatusPoint};
use crate::engine::{Entry, Flags, NumberCheck, ShipmentState};

use super::StoreError;
use crate::api::pb;

#[derive(Clone, PartialEq, prost::Message)]
pub struct ShipmentRecord {
    #[prost(int32, tag = "1")]
    pub status: i32,
    #[prost(int32, tag = "2")]
    pub sub_status: i32,
    #[prost(uint64, tag = "3")]
    pub version: u64,
    #[prost(uint32, tag = "4")]
    pub scans_after_terminal: u32,
    /// Ordered by (event_time, scan_id), like the `events` keys.
    #[prost(message, repeated, tag = "5")]
    pub timeline: Vec<EntryRecord>,
    #[prost(bool, tag = "6")]
    pub stalled: bool,
    /// The key this shipment has in the stall deadline index, if any.
    #[prost(sint64, optional, tag = "7")]
    pub stall_deadline: Option<i64>,
    #[prost(uint32, tag = "8")]
    pub regressions: u32,
    #[prost(uint32, tag = "9")]
    pub clock_skewed_scans: u32,
    #[prost(string, tag = "10")]
    pub carrier: String,
    #[prost(string, tag = "11")]
    pub carrier_service: String,
    #[prost(string, tag = "12")]
    pub tracking_number_issue: String,
    /// The owning source partition (Kafka), or empty.
    #[prost(string, tag = "13")]
    pub owner_topic: String,
    #[prost(int32, tag = "14")]
    pub owner_partition: i32,
    /// Scan ids of reads replaced by an earlier read of the same event.
    #[prost(string, repeated, tag = "15")]
    pub replaced_scan_ids: Vec<String>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct EntryRecord {
    #[prost(sint64, tag = "1")]
    pub event_time: i64,
    #[prost(string, tag = "2")]
    pub scan_id: String,
    #[prost(int32, tag = "3")]
    pub scan_type: i32,
    #[prost(fixed64, tag = "4")]
    pub facility: u64,
}

/// The record of a state, as owned protobuf; `encode_shipment` writes the same bytes without
/// building it.
#[cfg(test)]
fn shipment_record(state: &ShipmentState) -> ShipmentRecord {
    let point = state.derived.point;
    ShipmentRecord {
        status: point.map_or(0, |p| p.status.as_i32()),
        sub_status: point.and_then(|p| p.sub_status).map_or(0, ScanType::as_i32),
        version: state.version.0,
        scans_after_terminal: state.derived.scans_after_terminal,
        timeline: state
            .timeline
            .iter()
            .map(|e| EntryRecord {
                event_time: e.event_time.0,
                scan_id: e.scan_id.as_str().to_owned(),
                scan_type: e.scan_type.as_i32(),
                facility: e.facility,
            })
            .collect(),
        stalled: state.stalled,
        stall_deadline: state.stall_deadline.map(|t| t.0),
        regressions: state.flags.regressions,
        clock_skewed_scans: state.flags.clock_skewed_scans,
        carrier: state.flags.tracking_number.carrier.clone(),
        carrier_service: state.flags.tracking_number.service.clone(),
        tracking_number_issue: state.flags.tracking_number.issue.clone(),
        owner_topic: state
            .owner
            .as_ref()
            .map(|o| o.topic.clone())
            .unwrap_or_default(),
        owner_partition: state.owner.as_ref().map_or(0, |o| o.partition),
        replaced_scan_ids: state
            .replaced
            .iter()
            .map(|id| id.as_str().to_owned())
            .collect(),
    }
}

/// Encodes the state as a `ShipmentRecord`, field by field from the state itself: the writer
/// encodes every touched shipment in every group, and building the owned record first would
/// copy each scan id of the timeline. Same bytes as prost's encoding of the record (tested).
pub fn encode_shipment(state: &ShipmentState) -> Vec<u8> {
    use prost::encoding::{
        bool, encode_key, encode_varint, encoded_len_varint, fixed64, int32, key_len, sint64,
        uint32, uint64, WireType,
    };

    fn str_len(tag: u32, value: &str) -> usize {
        if value.is_empty() {
            0
        } else {
            key_len(tag) + encoded_len_varint(value.len() as u64) + value.len()
        }
    }
    fn put_str(tag: u32, value: &str, buf: &mut Vec<u8>) {
        if !value.is_empty() {
            encode_key(tag, WireType::LengthDelimited, buf);
            encode_varint(value.len() as u64, buf);
            buf.extend_from_slice(value.as_bytes());
        }
    }
    fn entry_len(e: &Entry) -> usize {
        let time = e.event_time.0;
        let scan_type = e.scan_type.as_i32();
        (if time != 0 {
            sint64::encoded_len(1, &time)
        } else {
            0
        }) + str_len(2, e.scan_id.as_str())
            + (if scan_type != 0 {
                int32::encoded_len(3, &scan_type)
            } else {
                0
            })
            + (if e.facility != 0 {
                fixed64::encoded_len(4, &e.facility)
            } else {
                0
            })
    }

    let point = state.derived.point;
    let status = point.map_or(0, |p| p.status.as_i32());
    let sub_status = point.and_then(|p| p.sub_status).map_or(0, ScanType::as_i32);
    let check = &state.flags.tracking_number;
    let owner_topic = state.owner.as_ref().map_or("", |o| o.topic.as_str());
    let owner_partition = state.owner.as_ref().map_or(0, |o| o.partition);
    let timeline_bytes: usize = state
        .timeline
        .iter()
        .map(|e| {
            let len = entry_len(e);
            key_len(5) + encoded_len_varint(len as u64) + len
        })
        .sum();
    let mut buf =
        Vec::with_capacity(timeline_bytes + 96 + check.carrier.len() + check.service.len());
    if status != 0 {
        int32::encode(1, &status, &mut buf);
    }
    if sub_status != 0 {
        int32::encode(2, &sub_status, &mut buf);
    }
    if state.version.0 != 0 {
        uint64::encode(3, &state.version.0, &mut buf);
    }
    if state.derived.scans_after_terminal != 0 {
        uint32::encode(4, &state.derived.scans_after_terminal, &mut buf);
    }
    for e in &state.timeline {
        encode_key(5, WireType::LengthDelimited, &mut buf);
        encode_varint(entry_len(e) as u64, &mut buf);
        if e.event_time.0 != 0 {
            sint64::encode(1, &e.event_time.0, &mut buf);
        }
        put_str(2, e.scan_id.as_str(), &mut buf);
        if e.scan_type.as_i32() != 0 {
            int32::encode(3, &e.scan_type.as_i32(), &mut buf);
        }
        if e.facility != 0 {
            fixed64::encode(4, &e.facility, &mut buf);
        }
    }
    if state.stalled {
        bool::encode(6, &state.stalled, &mut buf);
    }
    if let Some(deadline) = state.stall_deadline {
        sint64::encode(7, &deadline.0, &mut buf);
    }
    if state.flags.regressions != 0 {
        uint32::encode(8, &state.flags.regressions, &mut buf);
    }
    if state.flags.clock_skewed_scans != 0 {
        uint32::encode(9, &state.flags.clock_skewed_scans, &mut buf);
    }
    put_str(10, &check.carrier, &mut buf);
    put_str(11, &check.service, &mut buf);
    put_str(12, &check.issue, &mut buf);
    put_str(13, owner_topic, &mut buf);
    if owner_partition != 0 {
        int32::encode(14, &owner_partition, &mut buf);
    }
    for id in &state.replaced {
        // Repeated strings are written even when empty.
        encode_key(15, WireType::LengthDelimited, &mut buf);
        encode_varint(id.as_str().len() as u64, &mut buf);
        buf.extend_from_slice(id.as_str().as_bytes());
    }
    buf
}

/// A value of the `changes` column family: consecutive status changes, in sequence order.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ChangeBlock {
    #[prost(message, repeated, tag = "1")]
    pub changes: Vec<pb::StatusChange>,
}

pub fn decode_change_block(key: &[u8], bytes: &[u8]) -> Result<ChangeBlock, StoreError> {
    ChangeBlock::decode(bytes).map_err(|e| StoreError::Corrupt {
        key: format!("change block {:?}", super::keys::decode_change_key(key)),
        what: e.to_string(),
    })
}

pub fn decode_shipment(key: &[u8], bytes: &[u8]) -> Result<ShipmentState, StoreError> {
    let corrupt = |what: &str| StoreError::Corrupt {
        key: String::from_utf8_lossy(key).into_owned(),
        what: what.to_owned(),
    };
    let record = ShipmentRecord::decode(bytes).map_err(|e| corrupt(&e.to_string()))?;
    let point = match record.status {
        0 => None,
        n => Some(StatusPoint {
            status: Status::from_i32(n).ok_or_else(|| corrupt("unknown status"))?,
            sub_status: match record.sub_status {
                0 => None,
                n => Some(ScanType::from_i32(n).ok_or_else(|| corrupt("unknown sub-status"))?),
            },
            stalled: false,
        }),
    };
    let timeline = record
        .timeline
        .into_iter()
        .map(|e| {
            Ok(Entry {
                event_time: EventTime(e.event_time),
                scan_id: ScanId::from_stored(e.scan_id),
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
            .into_iter()
            .map(ScanId::from_stored)
            .collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipment_state_round_trips() {
        let state = ShipmentState {
            timeline: vec![
                Entry {
                    event_time: EventTime(-3),
                    scan_id: ScanId::from_stored("a".into()),
                    scan_type: ScanType::Sorted,
                    facility: u64::MAX,
                },
                Entry {
                    event_time: EventTime(9),
                    scan_id: ScanId::from_stored("b".into()),
                    scan_type: ScanType::Delivered,
                    facility: 7,
                },
            ],
            derived: Derived {
                point: Some(StatusPoint {
                    status: Status::Delivered,
                    sub_status: None,
                    stalled: false,
                }),
                scans_after_terminal: 2,
            },
            version: Version(4),
            stalled: true,
            stall_deadline: Some(EventTime(-77)),
            flags: Flags {
                regressions: 1,
                clock_skewed_scans: 3,
                tracking_number: NumberCheck {
                    carrier: "ups".into(),
                    service: "UPS United States Ground".into(),
                    issue: String::new(),
                },
            },
            owner: Some(Origin {
                topic: "scans.raw".into(),
                partition: 3,
            }),
            replaced: vec![
                ScanId::from_stored("c".into()),
                ScanId::from_stored("d".into()),
            ],
        };
        let bytes = encode_shipment(&state);
        assert_eq!(bytes, shipment_record(&state).encode_to_vec());
        assert_eq!(decode_shipment(b"k", &bytes).expect("decodes"), state);
        let empty = ShipmentState::default();
        assert_eq!(
            encode_shipment(&empty),
            shipment_record(&empty).encode_to_vec()
        );
    }

    #[test]
    fn garbage_is_reported_as_corrupt_not_a_panic() {
        let err = decode_shipment(b"PARCEL0001", &[0xff, 0xff, 0xff]).expect_err("corrupt");
        assert!(err.to_string().contains("PARCEL0001"), "{err}");
    }
}
