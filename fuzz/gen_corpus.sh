#!/usr/bin/env bash
# Writes the seed corpus (fuzz/corpus/<target>/) from readable sources: protobuf seeds are
# encoded from text format by protoc (the one vendored with the build's crates), JSON seeds are
# written as they are. Rerun after changing a seed; the outputs are committed.
set -euo pipefail
cd "$(dirname "$0")"
PROTOC=${PROTOC:-$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/protoc-bin-vendored-linux-x86_64-*/bin/protoc | head -n1)}
INCLUDE="$(dirname "$PROTOC")/../include"
enc() { # enc <message> <text>: the message as protobuf bytes on stdout
  printf '%s' "$2" | "$PROTOC" -I ../proto -I "$INCLUDE" --encode="scand.v1.$1" scand/v1/scand.proto
}
rm -rf corpus && mkdir -p corpus/{scan_batch,json_scan,kafka_record,engine,merge}

# A realistic scan: valid UPS number, 1 minute before the fuzzers' fixed clock (1.8e9 s).
GOOD='scan_id: "dev-17/000042" tracking_number: " 1z 999-aa1 0123456784 " scan_type: SCAN_TYPE_SORTED
event_time { seconds: 1799999940 nanos: 250000000 }
location { facility_id: "HUB-BER-1" kind: LOCATION_KIND_SORTING_FACILITY latitude: 52.5 longitude: 13.4 }
device_id: "sorter-4" source: SOURCE_SORTER sensor { temperature_c: 4.5 }
attributes { key: "belt" value: "4" }'
DELIVERED='scan_id: "van-9/77" tracking_number: "PARCEL0001" scan_type: SCAN_TYPE_DELIVERED
event_time { seconds: 1799990000 } location { facility_id: "door" kind: LOCATION_KIND_DELIVERY_POINT }
exception_code: "" source: SOURCE_HANDHELD'
NO_TIME='scan_id: "s3" tracking_number: "JD014600006281234567" scan_type: SCAN_TYPE_PICKED_UP'

enc ScanBatch "batch_id: \"b1\" scans { $GOOD } scans { $DELIVERED }" >corpus/scan_batch/valid_two_scans
enc ScanBatch "batch_id: \"b2\" scans { $GOOD } scans { $NO_TIME } scans { scan_type: SCAN_TYPE_EXCEPTION }" >corpus/scan_batch/mixed_rejections
enc ScanBatch 'batch_id: "b3" scans { scan_id: "f1" tracking_number: "PARCEL0001" scan_type: SCAN_TYPE_LOADED event_time { seconds: 1800000301 } }
scans { scan_id: "f2" tracking_number: "PARCEL0001" scan_type: SCAN_TYPE_LOADED event_time { seconds: 1799999000 } location { latitude: 91 } }' >corpus/scan_batch/future_and_latitude
head -c 40 corpus/scan_batch/valid_two_scans >corpus/scan_batch/truncated
printf '' >corpus/scan_batch/empty

enc Scan "$GOOD" >corpus/json_scan/protobuf_scan
cat >corpus/json_scan/snake_case.json <<'J'
{"scan_id":"dev-17/000042","tracking_number":"1Z999AA10123456784","scan_type":"SCAN_TYPE_SORTED",
 "event_time":"2027-01-15T07:59:00.250Z",
 "location":{"facility_id":"HUB-BER-1","kind":"LOCATION_KIND_SORTING_FACILITY","latitude":52.5,"longitude":13.4},
 "device_id":"sorter-4","source":"SOURCE_SORTER","sensor":{"temperature_c":4.5,"humidity_pct":40},
 "exception_code":"DAMAGED","attributes":{"belt":"4"},"received_time":"2027-01-15T07:59:01Z"}
J
printf '%s' '{"scanId":"s2","trackingNumber":"PARCEL01","scanType":13,"eventTime":"2027-01-15T07:00:00Z","location":{"facilityId":"door","kind":4}}' >corpus/json_scan/camel_case.json
printf '%s' '{"scan_id":"s3","tracking_number":"PARCEL01","scan_type":"SCAN_TYPE_TELEPORTED"}' >corpus/json_scan/bad_enum.json
printf '%s' '{"scan_id":"s4","tracking_number":"PARCEL01","scan_type":5,"event_time":"yesterday"}' >corpus/json_scan/bad_time.json
printf '%s' '{"scan_idd":"x","attributes":{"a":1}}' >corpus/json_scan/unknown_field.json
printf '%s' '{"scan_id":' >corpus/json_scan/truncated.json

# kafka_record: byte 0 = header (0 none, 2 json, 3 protobuf, 6 raw: length byte + bytes),
# byte 1 = topic (low 2 bits: scans.raw, scans.json, scans.proto, other) | 4 default json |
# 8 no payload; the rest is the payload.
{ printf '\x02\x00'; cat corpus/json_scan/snake_case.json; } >corpus/kafka_record/json_by_header
{ printf '\x00\x00'; cat corpus/json_scan/protobuf_scan; } >corpus/kafka_record/protobuf_by_default
{ printf '\x00\x01'; cat corpus/json_scan/camel_case.json; } >corpus/kafka_record/json_by_topic
{ printf '\x06\x04\x0atext/plain'; cat corpus/json_scan/snake_case.json; } >corpus/kafka_record/unknown_header_json_default
printf '\x03\x08' >corpus/kafka_record/no_payload
{ printf '\x03\x04'; cat corpus/json_scan/bad_enum.json; } >corpus/kafka_record/json_sent_as_protobuf

# engine: arbitrary-derived input; a few fixed pseudo-random seeds of different lengths.
python3 - <<'P'
import random
rng = random.Random(1800000000)
for n in (48, 96, 160, 256):
    open(f"corpus/engine/random_{n}", "wb").write(bytes(rng.randrange(256) for _ in range(n)))
P

# merge: byte 0 = 1 when the first value is the stored record; each value = length byte + bytes.
# Record: status 3, version 1, entry (event time 5, scan id "s-1"); delta: version 2, entry
# (event time 2, scan id "s-2": a late scan), an empty replaced id.
printf '\x01\x0d\x08\x03\x18\x01\x2a\x07\x08\x0a\x12\x03s-1\x0f\x08\x03\x18\x02\x2a\x07\x08\x04\x12\x03s-2\x7a\x00' >corpus/merge/record_and_late_delta
printf '\x00\x07\x2a\x05\x12\x03s-1\x07\x2a\x05\x12\x03s-1' >corpus/merge/one_read_twice

du -sh corpus
