//! One record's fate, without I/O: its encoding (its `content-type` header, else its topic's,
//! else the source's default), decoded and validated into a scan to store, or refused with the
//! code and reason its dead letter carries. Apart from the consumer so the fuzzer runs exactly
//! what the consumer runs.

use std::time::SystemTime;

use rdkafka::message::{Headers, Message, OwnedMessage};

use super::KafkaSourceConfig;
use crate::domain::scan::ValidScan;
use crate::ingest::validate::Validator;
use crate::proto::codec::{self, Encoding};
use crate::telemetry::metrics as m;

/// Why a record goes to the dead-letter topic: the stable code (metrics label) and the reason
/// sent in the `scand-reason` header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub code: &'static str,
    pub reason: String,
}

/// The value of a record's first `content-type` header, if it has one with a value.
pub(super) fn content_type(record: &OwnedMessage) -> Option<&[u8]> {
    record.headers().and_then(|headers| {
        headers
            .iter()
            .find(|h| h.key.eq_ignore_ascii_case("content-type"))
            .and_then(|h| h.value)
    })
}

/// The encoding of a record: its `content-type` header when that names one, else the topic's
/// configured encoding, else the source's default.
pub fn encoding_of(
    content_type: Option<&[u8]>,
    topic: &str,
    config: &KafkaSourceConfig,
) -> Encoding {
    content_type
        .and_then(|v| std::str::from_utf8(v).ok())
        .and_then(Encoding::from_content_type)
        .or_else(|| config.topic_encodings.get(topic).copied())
        .unwrap_or(config.encoding)
}

/// One record's fate, without I/O: decoded and validated into a scan to store, or refused
/// with the code and reason its dead letter carries. Split out of [`KafkaSource`] so the
/// fuzzer runs exactly what the consumer runs.
pub fn triage(
    payload: Option<&[u8]>,
    content_type: Option<&[u8]>,
    topic: &str,
    config: &KafkaSourceConfig,
    validator: &Validator,
    now: SystemTime,
) -> Result<ValidScan, Refusal> {
    let scan = codec::decode(
        payload.unwrap_or_default(),
        encoding_of(content_type, topic, config),
    )
    .map_err(|error| Refusal {
        code: error.code(),
        reason: format!("{}: {error}", error.code()),
    })?;
    validator.validate(scan, now).map_err(|rejection| {
        metrics::counter!(m::SCANS_REJECTED_TOTAL, "reason" => rejection.code()).increment(1);
        Refusal {
            code: rejection.code(),
            reason: rejection.reason(),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ingest::IngestConfig;
    use std::time::Duration;

    fn now() -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000)
    }

    fn validator() -> Validator {
        Validator::new(&IngestConfig::default()).expect("default formats compile")
    }

    const JSON: &[u8] = br#"{"scan_id":"s1","tracking_number":"PARCEL0001","scan_type":"SCAN_TYPE_SORTED","event_time":"2027-01-15T08:00:00Z"}"#;

    #[test]
    fn header_then_topic_then_default_chooses_the_encoding() {
        let mut config = KafkaSourceConfig::default();
        config
            .topic_encodings
            .insert("scans.json".to_owned(), Encoding::Json);
        let json = Some(&b"application/json; charset=utf-8"[..]);
        assert_eq!(encoding_of(json, "scans.raw", &config), Encoding::Json);
        assert_eq!(encoding_of(None, "scans.json", &config), Encoding::Json);
        // A header naming no known encoding, or not UTF-8, falls through to the topic.
        let unknown = Some(&b"text/plain"[..]);
        assert_eq!(encoding_of(unknown, "scans.json", &config), Encoding::Json);
        assert_eq!(
            encoding_of(Some(&[0xff][..]), "scans.raw", &config),
            Encoding::Protobuf
        );
        let protobuf = Some(&b"application/x-protobuf"[..]);
        assert_eq!(
            encoding_of(protobuf, "scans.json", &config),
            Encoding::Protobuf
        );
    }

    #[test]
    fn triage_stores_valid_records_and_refuses_the_rest_with_a_code() {
        let config = KafkaSourceConfig::default();
        let v = validator();
        let json = Some(&b"application/json"[..]);
        let stored = triage(Some(JSON), json, "scans.raw", &config, &v, now()).expect("valid");
        assert_eq!(stored.scan_id.as_str(), "s1");
        assert!(stored.origin.is_none());

        let refused = |payload: Option<&[u8]>, content_type: Option<&[u8]>| {
            triage(payload, content_type, "scans.raw", &config, &v, now())
                .expect_err("refused")
                .code
        };
        assert_eq!(refused(None, None), "empty");
        assert_eq!(refused(Some(JSON), None), "protobuf_decode");
        assert_eq!(refused(Some(&b"{"[..]), json), "json_decode");
        let unspecified = &br#"{"scan_id":"s1","tracking_number":"PARCEL0001"}"#[..];
        let refusal =
            triage(Some(unspecified), json, "scans.raw", &config, &v, now()).expect_err("rejected");
        assert_eq!(refusal.code, "unspecified_scan_type");
        assert_eq!(
            refusal.reason,
            "unspecified_scan_type: scan_type is SCAN_TYPE_UNSPECIFIED"
        );
    }
}
