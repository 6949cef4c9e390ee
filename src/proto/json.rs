//! The JSON form of the public messages, as the Kafka sink and `scand ctl --json` print them:
//! proto field names, enums by name, timestamps in RFC 3339 (the proto3 JSON conventions).
//! One place, so every JSON consumer sees the same shape.

use std::time::SystemTime;

use serde_json::{json, Value};

use super::pb;

fn rfc3339(t: Option<prost_types::Timestamp>) -> Option<String> {
    t.and_then(|t| SystemTime::try_from(t).ok())
        .map(|t| humantime::format_rfc3339_nanos(t).to_string())
}

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

fn location(l: &pb::Location) -> Value {
    json!({
        "facility_id": l.facility_id,
        "kind": pb::LocationKind::try_from(l.kind).unwrap_or(pb::LocationKind::Unspecified).as_str_name(),
        "latitude": l.latitude,
        "longitude": l.longitude,
    })
}

pub fn status_change(c: &pb::StatusChange) -> Value {
    json!({
        "sequence": c.sequence,
        "tracking_number": c.tracking_number,
        "version": c.version,
        "previous_status": status_name(c.previous_status),
        "previous_sub_status": scan_type_name(c.previous_sub_status),
        "previous_stalled_status": status_name(c.previous_stalled_status),
        "status": status_name(c.status),
        "sub_status": scan_type_name(c.sub_status),
        "stalled_status": status_name(c.stalled_status),
        "cause_scan_id": c.cause_scan_id,
        "event_time": rfc3339(c.event_time),
        "location": c.location.as_ref().map(location),
        "regression": c.regression,
        "correction": c.correction,
        "committed_time": rfc3339(c.committed_time),
        "carrier": c.carrier,
        "carrier_service": c.carrier_service,
    })
}

pub fn scan(s: &pb::Scan) -> Value {
    json!({
        "scan_id": s.scan_id,
        "tracking_number": s.tracking_number,
        "scan_type": scan_type_name(s.scan_type),
        "event_time": rfc3339(s.event_time),
        "received_time": rfc3339(s.received_time),
        "location": s.location.as_ref().map(location),
        "device_id": s.device_id,
        "source": pb::Source::try_from(s.source).unwrap_or(pb::Source::Unspecified).as_str_name(),
        "sensor": s.sensor.as_ref().map(|r| json!({
            "temperature_c": r.temperature_c,
            "humidity_pct": r.humidity_pct,
        })),
        "exception_code": s.exception_code,
        "attributes": s.attributes,
    })
}

pub fn shipment(s: &pb::Shipment) -> Value {
    json!({
        "tracking_number": s.tracking_number,
        "status": status_name(s.status),
        "sub_status": scan_type_name(s.sub_status),
        "stalled_status": status_name(s.stalled_status),
        "version": s.version,
        "carrier": s.carrier,
        "carrier_service": s.carrier_service,
        "tracking_number_issue": s.tracking_number_issue,
        "scans_after_terminal": s.scans_after_terminal,
        "regressions": s.regressions,
        "clock_skewed_scans": s.clock_skewed_scans,
        "timeline": s.timeline.iter().map(scan).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn change_uses_proto_names_and_rfc3339() {
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
        let v = status_change(&change);
        assert_eq!(v["status"], "STATUS_STALLED");
        assert_eq!(v["stalled_status"], "STATUS_IN_TRANSIT");
        assert_eq!(v["previous_status"], "STATUS_IN_TRANSIT");
        assert_eq!(v["sub_status"], "SCAN_TYPE_UNSPECIFIED");
        assert_eq!(v["event_time"], "2026-11-25T08:15:00.000000000Z");
        assert_eq!(v["version"], 2);
        assert_eq!(v["location"], Value::Null);
    }

    #[test]
    fn shipment_lists_its_timeline() {
        let v = shipment(&pb::Shipment {
            tracking_number: "PARCEL0001".into(),
            status: pb::Status::Delivered as i32,
            timeline: vec![pb::Scan {
                scan_id: "s1".into(),
                scan_type: pb::ScanType::Delivered as i32,
                ..Default::default()
            }],
            ..Default::default()
        });
        assert_eq!(v["status"], "STATUS_DELIVERED");
        assert_eq!(v["timeline"][0]["scan_type"], "SCAN_TYPE_DELIVERED");
        assert_eq!(v["timeline"][0]["source"], "SOURCE_UNSPECIFIED");
    }
}
