//! A gRPC `ScanBatch` from arbitrary bytes: prost decoding, then every scan through the edge
//! validator, checking what a validated scan and a rejection must look like (see `common`).

#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message;
use scand::proto::pb;

mod common;

fuzz_target!(|data: &[u8]| {
    let Ok(batch) = pb::ScanBatch::decode(data) else {
        return;
    };
    for scan in &batch.scans {
        let _ = common::check_scan(scan);
    }
});
