//! The proto3 JSON form of the `scand.v1` messages, both ways, through their own descriptors
//! (prost-reflect over the descriptor set built with them): field names in lowerCamelCase,
//! enums by name, 64-bit integers as strings, timestamps in RFC 3339, defaults left out; both
//! spellings of a field name and enums by name or number are read. What the Kafka sink writes,
//! `scand ctl --json` prints and the Kafka source reads (`codec`), so any proto3 JSON
//! implementation reads and writes the same (tested against Python's `json_format`).

use std::sync::LazyLock;

use prost::Message;
use prost_reflect::{DescriptorPool, DynamicMessage, MessageDescriptor};

use super::pb;

/// The descriptors of scand.v1, from the set compiled with the messages.
static POOL: LazyLock<DescriptorPool> = LazyLock::new(|| {
    DescriptorPool::decode(super::FILE_DESCRIPTOR_SET)
        .expect("the descriptor set is built with the messages it describes")
});

/// A `scand.v1` message with its full name, so its descriptor can be found.
pub trait Named: Message + Default {
    const NAME: &'static str;
}

impl Named for pb::Scan {
    const NAME: &'static str = "scand.v1.Scan";
}

impl Named for pb::StatusChange {
    const NAME: &'static str = "scand.v1.StatusChange";
}

impl Named for pb::Shipment {
    const NAME: &'static str = "scand.v1.Shipment";
}

impl Named for pb::Stats {
    const NAME: &'static str = "scand.v1.Stats";
}

impl Named for pb::BackupReply {
    const NAME: &'static str = "scand.v1.BackupReply";
}

fn descriptor<M: Named>() -> MessageDescriptor {
    POOL.get_message_by_name(M::NAME)
        .expect("every Named message is in the descriptor set (tested)")
}

/// The message's proto3 JSON.
pub fn to_json<M: Named>(message: &M) -> String {
    let mut dynamic = DynamicMessage::new(descriptor::<M>());
    dynamic
        .transcode_from(message)
        .expect("a message transcodes to its own descriptor");
    serde_json::to_string(&dynamic).expect("a message serializes to JSON")
}

/// A message from its proto3 JSON; unknown fields are an error.
pub fn from_json<M: Named>(bytes: &[u8]) -> Result<M, String> {
    let mut reader = serde_json::Deserializer::from_slice(bytes);
    let dynamic =
        DynamicMessage::deserialize(descriptor::<M>(), &mut reader).map_err(|e| e.to_string())?;
    reader.end().map_err(|e| e.to_string())?;
    dynamic.transcode_to::<M>().map_err(|e| e.to_string())
}

/// An enum value's name (`STATUS_DELIVERED`), as the JSON form spells it.
pub fn status_name(n: i32) -> &'static str {
    pb::Status::try_from(n)
        .unwrap_or(pb::Status::Unspecified)
        .as_str_name()
}

pub fn scan_type_name(n: i32) -> &'static str {
    pb::ScanType::try_from(n)
        .unwrap_or(pb::ScanType::Unspecified)
        .as_str_name()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    #[test]
    fn every_named_message_has_its_descriptor() {
        descriptor::<pb::Scan>();
        descriptor::<pb::StatusChange>();
        descriptor::<pb::Shipment>();
        descriptor::<pb::Stats>();
        descriptor::<pb::BackupReply>();
    }

    #[test]
    fn a_change_reads_as_proto3_json() {
        let change = pb::StatusChange {
            sequence: 7,
            tracking_number: "PARCEL0001".into(),
            version: 2,
            previous_status: pb::Status::InTransit as i32,
            status: pb::Status::Stalled as i32,
            stalled_status: pb::Status::InTransit as i32,
            event_time: Some(prost_types::Timestamp {
                seconds: 1_795_594_500,
                nanos: 0,
            }),
            ..Default::default()
        };
        let v: Value = serde_json::from_str(&to_json(&change)).expect("json");
        assert_eq!(v["status"], "STATUS_STALLED");
        assert_eq!(v["stalledStatus"], "STATUS_IN_TRANSIT");
        assert_eq!(v["previousStatus"], "STATUS_IN_TRANSIT");
        assert_eq!(v["eventTime"], "2026-11-25T08:15:00Z");
        assert_eq!(v["version"], "2", "64-bit integers are strings");
        assert_eq!(v["sequence"], "7");
        assert_eq!(v.get("subStatus"), None, "defaults are left out");
        assert_eq!(v.get("location"), None);
        assert_eq!(
            from_json::<pb::StatusChange>(to_json(&change).as_bytes()),
            Ok(change)
        );
    }

    #[test]
    fn a_shipment_lists_its_timeline() {
        let v: Value = serde_json::from_str(&to_json(&pb::Shipment {
            tracking_number: "PARCEL0001".into(),
            status: pb::Status::Delivered as i32,
            timeline: vec![pb::Scan {
                scan_id: "s1".into(),
                scan_type: pb::ScanType::Delivered as i32,
                ..Default::default()
            }],
            ..Default::default()
        }))
        .expect("json");
        assert_eq!(v["status"], "STATUS_DELIVERED");
        assert_eq!(v["timeline"][0]["scanType"], "SCAN_TYPE_DELIVERED");
        assert_eq!(v["timeline"][0]["scanId"], "s1");
    }

    #[test]
    fn both_field_spellings_and_enum_numbers_read_and_unknown_fields_do_not() {
        let proto_names = br#"{"scan_id":"a","scan_type":"SCAN_TYPE_SORTED"}"#;
        let json_names = br#"{"scanId":"a","scanType":7}"#;
        let a = from_json::<pb::Scan>(proto_names).expect("proto names");
        let b = from_json::<pb::Scan>(json_names).expect("json names");
        assert_eq!(a.scan_id, "a");
        assert_eq!(a.scan_type, pb::ScanType::Sorted as i32);
        assert_eq!(b.scan_type, 7);
        let unknown = from_json::<pb::Scan>(br#"{"scanId":"a","colour":"red"}"#);
        assert!(unknown.is_err_and(|e| e.contains("colour")));
    }
}
