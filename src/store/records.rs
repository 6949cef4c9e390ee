//! Value codecs for the `shipments` column family: the engine's shipment state as a protobuf
//! record, so fields can be added without a migration.

use prost::Message;

use crate::domain::{EventTime, ScanId, ScanType, Status, Version};
use crate::engine::status::{Derived, StatusPoint};
use crate::engine::{Entry, ShipmentState};

use super::StoreError;

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

pub fn encode_shipment(state: &ShipmentState) -> Vec<u8> {
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
    }
    .encode_to_vec()
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
                }),
                scans_after_terminal: 2,
            },
            version: Version(4),
        };
        let bytes = encode_shipment(&state);
        assert_eq!(decode_shipment(b"k", &bytes).expect("decodes"), state);
    }

    #[test]
    fn garbage_is_reported_as_corrupt_not_a_panic() {
        let err = decode_shipment(b"PARCEL0001", &[0xff, 0xff, 0xff]).expect_err("corrupt");
        assert!(err.to_string().contains("PARCEL0001"), "{err}");
    }
}
