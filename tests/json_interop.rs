//! The JSON form of the wire messages is proto3's canonical JSON mapping, checked against
//! another implementation: Python's `google.protobuf.json_format` (PyPI `protobuf`, installed
//! by scripts/setup.sh) reads what scand writes (the Kafka sink's changes, `scand ctl --json`'s
//! shipments and stats) into the same messages, and scand's Kafka source reads what it writes.

use std::io::Write;
use std::process::{Command, Stdio};

use prost::Message;
use scand::proto::codec::{self, Encoding};
use scand::proto::json::to_json;
use scand::proto::{pb, FILE_DESCRIPTOR_SET};

/// Python's side: `parse` reads `NAME<TAB>JSON` lines and answers each message's binary form
/// in hex; `print` reads `NAME<TAB>HEX` lines and answers each message's JSON.
const PYTHON: &str = r#"
import sys
from google.protobuf import descriptor_pb2, descriptor_pool, json_format, message_factory
files = descriptor_pb2.FileDescriptorSet.FromString(open(sys.argv[1], "rb").read())
pool = descriptor_pool.DescriptorPool()
for f in files.file:
    pool.Add(f)
def new(name):
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(name))()
for line in sys.stdin:
    name, payload = line.rstrip("\n").split("\t", 1)
    message = new(name)
    if sys.argv[2] == "parse":
        json_format.Parse(payload, message)
        print(message.SerializeToString().hex())
    else:
        message.ParseFromString(bytes.fromhex(payload))
        print(json_format.MessageToJson(message, indent=None))
"#;

fn python(mode: &str, lines: &[(String, String)]) -> Vec<String> {
    let dir = tempfile::tempdir().expect("tempdir");
    let descriptors = dir.path().join("scand.desc");
    std::fs::write(&descriptors, FILE_DESCRIPTOR_SET).expect("write the descriptor set");
    let mut child = Command::new("python3")
        .args(["-c", PYTHON])
        .arg(&descriptors)
        .arg(mode)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("this test needs python3 with PyPI's protobuf (scripts/setup.sh installs it)");
    let mut stdin = child.stdin.take().expect("stdin");
    for (name, payload) in lines {
        writeln!(stdin, "{name}\t{payload}").expect("write");
    }
    drop(stdin);
    let out = child.wait_with_output().expect("python runs");
    assert!(
        out.status.success(),
        "python's json_format: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .expect("utf-8")
        .lines()
        .map(str::to_owned)
        .collect()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Vec<u8> {
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).expect("hex"))
        .collect()
}

fn timestamp(seconds: i64, nanos: i32) -> Option<prost_types::Timestamp> {
    Some(prost_types::Timestamp { seconds, nanos })
}

fn scan() -> pb::Scan {
    pb::Scan {
        scan_id: "s-1".into(),
        tracking_number: "1Z999AA10123456784".into(),
        scan_type: pb::ScanType::DepartedFacility as i32,
        event_time: timestamp(1_795_594_500, 250_000_000),
        location: Some(pb::Location {
            facility_id: "HUB-7".into(),
            kind: pb::LocationKind::SortingFacility as i32,
            latitude: Some(50.1),
            longitude: Some(-8.25),
        }),
        device_id: "sorter-4".into(),
        source: pb::Source::Sorter as i32,
        attributes: [("belt".to_owned(), "4".to_owned())].into(),
        ..Default::default()
    }
}

#[test]
fn python_reads_what_scand_writes() {
    let change = pb::StatusChange {
        sequence: u64::MAX - 1,
        tracking_number: "1Z999AA10123456784".into(),
        version: 3,
        previous_status: pb::Status::InTransit as i32,
        status: pb::Status::OutForDelivery as i32,
        cause_scan_id: "s-9".into(),
        event_time: timestamp(1_795_594_500, 0),
        committed_time: timestamp(1_795_594_501, 123_000_000),
        correction: true,
        carrier: "UPS".into(),
        ..Default::default()
    };
    let shipment = pb::Shipment {
        tracking_number: "1Z999AA10123456784".into(),
        status: pb::Status::InTransit as i32,
        sub_status: pb::ScanType::DepartedFacility as i32,
        version: 2,
        timeline: vec![scan()],
        ..Default::default()
    };
    let stats = pb::Stats {
        version: "0.1.0".into(),
        last_sequence: 7,
        sinks: vec![pb::SinkStats {
            name: "kafka".into(),
            delivered_sequence: 5,
            pending: 2,
        }],
        ..Default::default()
    };
    let read = python(
        "parse",
        &[
            ("scand.v1.StatusChange".into(), to_json(&change)),
            ("scand.v1.Shipment".into(), to_json(&shipment)),
            ("scand.v1.Stats".into(), to_json(&stats)),
        ],
    );
    assert_eq!(read.len(), 3, "{read:?}");
    assert_eq!(
        pb::StatusChange::decode(unhex(&read[0]).as_slice()).expect("change"),
        change
    );
    assert_eq!(
        pb::Shipment::decode(unhex(&read[1]).as_slice()).expect("shipment"),
        shipment
    );
    assert_eq!(
        pb::Stats::decode(unhex(&read[2]).as_slice()).expect("stats"),
        stats
    );
}

#[test]
fn scand_reads_what_python_writes() {
    let written = python(
        "print",
        &[("scand.v1.Scan".into(), hex(&scan().encode_to_vec()))],
    );
    let [json] = written.as_slice() else {
        panic!("one JSON document: {written:?}")
    };
    assert!(json.contains("\"scanId\""), "canonical names: {json}");
    assert_eq!(codec::decode(json.as_bytes(), Encoding::Json), Ok(scan()));
}
