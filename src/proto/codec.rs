//! Record codecs for sources that carry one scan per message (Kafka): a `scand.v1.Scan` as
//! protobuf, or the same Scan as JSON with the proto's field names (snake_case or the proto3
//! JSON lowerCamelCase), enums by name or number and timestamps in RFC 3339.
//!
//! Decoding only turns bytes into a wire `Scan`; validation stays in `validate`, shared by
//! every source.

use std::collections::HashMap;

use prost::Message;
use serde::Deserialize;

use crate::proto::pb;

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Encoding {
    Protobuf,
    Json,
}

impl Encoding {
    /// The encoding a `content-type` header names, if it names one.
    pub fn from_content_type(value: &str) -> Option<Self> {
        let media = value
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        match media.as_str() {
            "application/x-protobuf"
            | "application/protobuf"
            | "application/vnd.google.protobuf" => Some(Encoding::Protobuf),
            "application/json" => Some(Encoding::Json),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("empty record value")]
    Empty,
    #[error("not a scand.v1.Scan protobuf: {0}")]
    Protobuf(String),
    #[error("not a scand.v1.Scan JSON document: {0}")]
    Json(String),
    #[error("{field}: unknown enum name {value:?}")]
    EnumName { field: &'static str, value: String },
    #[error("{field}: not an RFC 3339 timestamp: {value:?}")]
    Timestamp { field: &'static str, value: String },
}

impl DecodeError {
    /// Stable code for metrics labels and dead-letter headers.
    pub fn code(&self) -> &'static str {
        match self {
            DecodeError::Empty => "empty",
            DecodeError::Protobuf(_) => "protobuf_decode",
            DecodeError::Json(_) | DecodeError::EnumName { .. } | DecodeError::Timestamp { .. } => {
                "json_decode"
            }
        }
    }
}

pub fn decode(bytes: &[u8], encoding: Encoding) -> Result<pb::Scan, DecodeError> {
    if bytes.is_empty() {
        return Err(DecodeError::Empty);
    }
    match encoding {
        Encoding::Protobuf => {
            pb::Scan::decode(bytes).map_err(|e| DecodeError::Protobuf(e.to_string()))
        }
        Encoding::Json => decode_json(bytes),
    }
}

#[derive(Deserialize)]
#[serde(untagged)]
enum EnumValue {
    Name(String),
    Number(i32),
}

impl EnumValue {
    fn resolve(
        self,
        field: &'static str,
        by_name: fn(&str) -> Option<i32>,
    ) -> Result<i32, DecodeError> {
        match self {
            EnumValue::Number(n) => Ok(n),
            EnumValue::Name(name) => {
                by_name(&name).ok_or(DecodeError::EnumName { field, value: name })
            }
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonLocation {
    #[serde(default, alias = "facilityId")]
    facility_id: String,
    #[serde(default)]
    kind: Option<EnumValue>,
    #[serde(default)]
    latitude: Option<f64>,
    #[serde(default)]
    longitude: Option<f64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonSensor {
    #[serde(default, alias = "temperatureC")]
    temperature_c: Option<f64>,
    #[serde(default, alias = "humidityPct")]
    humidity_pct: Option<f64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonScan {
    #[serde(default, alias = "scanId")]
    scan_id: String,
    #[serde(default, alias = "trackingNumber")]
    tracking_number: String,
    #[serde(default, alias = "scanType")]
    scan_type: Option<EnumValue>,
    #[serde(default, alias = "eventTime")]
    event_time: Option<String>,
    #[serde(default)]
    location: Option<JsonLocation>,
    #[serde(default, alias = "deviceId")]
    device_id: String,
    #[serde(default)]
    source: Option<EnumValue>,
    #[serde(default)]
    sensor: Option<JsonSensor>,
    #[serde(default, alias = "exceptionCode")]
    exception_code: Option<String>,
    #[serde(default)]
    attributes: HashMap<String, String>,
    #[serde(default, alias = "receivedTime")]
    received_time: Option<String>,
}

fn timestamp(field: &'static str, value: String) -> Result<prost_types::Timestamp, DecodeError> {
    humantime::parse_rfc3339_weak(&value)
        .map(prost_types::Timestamp::from)
        .map_err(|_| DecodeError::Timestamp { field, value })
}

fn decode_json(bytes: &[u8]) -> Result<pb::Scan, DecodeError> {
    let j: JsonScan =
        serde_json::from_slice(bytes).map_err(|e| DecodeError::Json(e.to_string()))?;
    let location = j
        .location
        .map(|l| {
            Ok::<_, DecodeError>(pb::Location {
                facility_id: l.facility_id,
                kind: l
                    .kind
                    .map(|k| {
                        k.resolve("location.kind", |s| {
                            pb::LocationKind::from_str_name(s).map(|v| v as i32)
                        })
                    })
                    .transpose()?
                    .unwrap_or(0),
                latitude: l.latitude,
                longitude: l.longitude,
            })
        })
        .transpose()?;
    Ok(pb::Scan {
        scan_id: j.scan_id,
        tracking_number: j.tracking_number,
        scan_type: j
            .scan_type
            .map(|k| {
                k.resolve("scan_type", |s| {
                    pb::ScanType::from_str_name(s).map(|v| v as i32)
                })
            })
            .transpose()?
            .unwrap_or(0),
        event_time: j
            .event_time
            .map(|t| timestamp("event_time", t))
            .transpose()?,
        location,
        device_id: j.device_id,
        source: j
            .source
            .map(|k| k.resolve("source", |s| pb::Source::from_str_name(s).map(|v| v as i32)))
            .transpose()?
            .unwrap_or(0),
        sensor: j.sensor.map(|s| pb::SensorReading {
            temperature_c: s.temperature_c,
            humidity_pct: s.humidity_pct,
        }),
        exception_code: j.exception_code,
        attributes: j.attributes,
        received_time: j
            .received_time
            .map(|t| timestamp("received_time", t))
            .transpose()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_scan_with_proto_names_decodes() {
        let json = br#"{"scan_id":"s1","tracking_number":"1z999","scan_type":"SCAN_TYPE_SORTED",
            "event_time":"2026-11-25T08:15:00.250Z",
            "location":{"facility_id":"HUB-1","kind":"LOCATION_KIND_SORTING_FACILITY","latitude":50.1},
            "source":"SOURCE_SORTER","attributes":{"belt":"4"},"sensor":{"temperature_c":4.5}}"#;
        let scan = decode(json, Encoding::Json).expect("decodes");
        assert_eq!(scan.scan_id, "s1");
        assert_eq!(scan.scan_type, pb::ScanType::Sorted as i32);
        assert_eq!(
            scan.event_time.map(|t| (t.seconds, t.nanos)),
            Some((1_795_594_500, 250_000_000))
        );
        assert_eq!(
            scan.location.as_ref().map(|l| l.kind),
            Some(pb::LocationKind::SortingFacility as i32)
        );
        assert_eq!(scan.source, pb::Source::Sorter as i32);
        assert_eq!(scan.attributes["belt"], "4");
        assert_eq!(scan.sensor.and_then(|s| s.temperature_c), Some(4.5));
    }

    #[test]
    fn json_camel_case_and_enum_numbers_decode() {
        let json = br#"{"scanId":"s2","trackingNumber":"PARCEL01","scanType":13,"eventTime":"2026-11-25T08:15:00Z"}"#;
        let scan = decode(json, Encoding::Json).expect("decodes");
        assert_eq!((scan.scan_id.as_str(), scan.scan_type), ("s2", 13));
    }

    #[test]
    fn json_errors_are_precise() {
        let bad_enum = decode(br#"{"scan_type":"SCAN_TYPE_TELEPORTED"}"#, Encoding::Json)
            .expect_err("bad enum");
        assert_eq!(
            bad_enum.to_string(),
            "scan_type: unknown enum name \"SCAN_TYPE_TELEPORTED\""
        );
        let bad_time =
            decode(br#"{"event_time":"yesterday"}"#, Encoding::Json).expect_err("bad time");
        assert_eq!(
            bad_time.to_string(),
            "event_time: not an RFC 3339 timestamp: \"yesterday\""
        );
        let unknown = decode(br#"{"scan_idd":"x"}"#, Encoding::Json).expect_err("unknown field");
        assert!(unknown.to_string().contains("scan_idd"), "{unknown}");
        assert_eq!(decode(b"", Encoding::Json), Err(DecodeError::Empty));
        assert_eq!(
            decode(b"{not json", Encoding::Json).map_err(|e| e.code()),
            Err("json_decode")
        );
    }

    #[test]
    fn protobuf_round_trips_and_garbage_is_an_error() {
        let scan = pb::Scan {
            scan_id: "p1".into(),
            tracking_number: "PARCEL01".into(),
            scan_type: 5,
            ..Default::default()
        };
        assert_eq!(decode(&scan.encode_to_vec(), Encoding::Protobuf), Ok(scan));
        assert_eq!(
            decode(&[0xff, 0xff, 0xff, 0xff], Encoding::Protobuf).map_err(|e| e.code()),
            Err("protobuf_decode")
        );
    }

    #[test]
    fn content_type_header_selects_encoding() {
        assert_eq!(
            Encoding::from_content_type("application/json; charset=utf-8"),
            Some(Encoding::Json)
        );
        assert_eq!(
            Encoding::from_content_type("application/x-protobuf"),
            Some(Encoding::Protobuf)
        );
        assert_eq!(Encoding::from_content_type("text/plain"), None);
    }
}
