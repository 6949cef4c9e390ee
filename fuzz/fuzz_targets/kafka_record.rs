//! The Kafka source's handling of one record (`ingest::kafka::triage`, the code the consumer
//! runs): payload, optional `content-type` header and topic are built from the input; every
//! outcome must be a valid scan or a dead letter with a code and a `code: message` reason.
//!
//! Input layout (so seeds are easy to write by hand): byte 0 picks the content-type header,
//! byte 1 the topic, the default encoding and whether the payload is absent; a raw header
//! takes a length byte and that many bytes; the rest is the payload.

#![no_main]

use arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use scand::ingest::kafka::KafkaSourceConfig;
use scand::ingest::kafka::{encoding_of, triage};
use scand::proto::codec::{self, Encoding};

mod common;

struct Record<'a> {
    content_type: Option<&'a [u8]>,
    topic: &'static str,
    default_json: bool,
    payload: Option<&'a [u8]>,
}

const TOPICS: [&str; 4] = ["scans.raw", "scans.json", "scans.proto", "scans.other"];

fn record(mut u: Unstructured<'_>) -> Result<Record<'_>> {
    let header: u8 = u.arbitrary()?;
    let flags: u8 = u.arbitrary()?;
    let content_type: Option<&[u8]> = match header % 8 {
        0 => None,
        1 => Some(b""),
        2 => Some(b"application/json"),
        3 => Some(b"application/x-protobuf"),
        4 => Some(b"Application/JSON; charset=utf-8"),
        5 => Some(b" application/vnd.google.protobuf ;v=1"),
        _ => {
            let len: u8 = u.arbitrary()?;
            Some(u.bytes(usize::from(len % 48))?)
        }
    };
    Ok(Record {
        content_type,
        topic: TOPICS[usize::from(flags % 4)],
        default_json: flags & 4 != 0,
        payload: (flags & 8 == 0).then(|| u.take_rest()),
    })
}

fn config(default_json: bool) -> KafkaSourceConfig {
    let mut config = KafkaSourceConfig::default();
    config.encoding = if default_json {
        Encoding::Json
    } else {
        Encoding::Protobuf
    };
    config
        .topic_encodings
        .insert("scans.json".into(), Encoding::Json);
    config
        .topic_encodings
        .insert("scans.proto".into(), Encoding::Protobuf);
    config
}

fuzz_target!(|data: &[u8]| {
    let Ok(r) = record(Unstructured::new(data)) else {
        return;
    };
    let config = config(r.default_json);
    let v = common::validators();

    // The header wins when it names an encoding; else the topic's; else the default.
    let named = r
        .content_type
        .and_then(|c| std::str::from_utf8(c).ok())
        .and_then(Encoding::from_content_type);
    let expected = named
        .or(match r.topic {
            "scans.json" => Some(Encoding::Json),
            "scans.proto" => Some(Encoding::Protobuf),
            _ => None,
        })
        .unwrap_or(config.encoding);
    let encoding = encoding_of(r.content_type, r.topic, &config);
    assert_eq!(encoding, expected);

    let outcome = triage(
        r.payload,
        r.content_type,
        r.topic,
        &config,
        &v.flag,
        common::now(),
    );
    if common::debug() {
        match &outcome {
            Ok(valid) => eprintln!("{encoding:?}: stored {}", valid.scan_id),
            Err(refusal) => eprintln!("{encoding:?}: dead letter {}", refusal.reason),
        }
    }
    match outcome {
        Ok(valid) => {
            let scan = codec::decode(r.payload.unwrap_or_default(), encoding)
                .expect("a stored record decodes");
            common::check_valid(&scan, &valid, &v.config);
        }
        Err(refusal) => {
            common::check_code(refusal.code);
            assert!(
                refusal.reason.len() > refusal.code.len() + 2
                    && refusal.reason.starts_with(refusal.code)
                    && refusal.reason[refusal.code.len()..].starts_with(": "),
                "dead-letter reason {:?} is not `{}: message`",
                refusal.reason,
                refusal.code
            );
            if r.payload.is_none_or(<[u8]>::is_empty) {
                assert_eq!(refusal.code, "empty");
            }
        }
    }
});
