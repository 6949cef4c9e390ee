//! Record codecs for sources that carry one scan per message (Kafka): a `scand.v1.Scan` as
//! protobuf, or the same Scan in its proto3 JSON form (`json`: either spelling of a field
//! name, enums by name or number, timestamps in RFC 3339).
//!
//! Decoding only turns bytes into a wire `Scan`; validation stays in `validate`, shared by
//! every source.

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
}

impl DecodeError {
    /// Stable code for metrics labels and dead-letter headers.
    pub fn code(&self) -> &'static str {
        match self {
            DecodeError::Empty => "empty",
            DecodeError::Protobuf(_) => "protobuf_decode",
            DecodeError::Json(_) => "json_decode",
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

fn decode_json(bytes: &[u8]) -> Result<pb::Scan, DecodeError> {
    super::json::from_json(bytes).map_err(DecodeError::Json)
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
        assert!(
            bad_enum.to_string().contains("SCAN_TYPE_TELEPORTED"),
            "{bad_enum}"
        );
        let bad_time =
            decode(br#"{"event_time":"yesterday"}"#, Encoding::Json).expect_err("bad time");
        assert!(bad_time.to_string().contains("timestamp"), "{bad_time}");
        assert_eq!(bad_time.code(), "json_decode");
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
