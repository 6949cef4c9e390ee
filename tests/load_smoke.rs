//! `scand-load` against the real daemon: a few thousand realistic scans over several streams,
//! every answer checked by the generator (it exits non-zero on any unexpected outcome); and its
//! raw ingest floor, which must ack every scan it stored, as e2e.sh's figure assumes.

mod common;

use common::Daemon;

/// `scand-load`, built beside scand (`bash .ci/run` builds it first): a crate of its own,
/// tools/scand-load, so cargo names only scand's binaries to these tests.
fn scand_load() -> std::path::PathBuf {
    let path = std::path::Path::new(env!("CARGO_BIN_EXE_scand")).with_file_name("scand-load");
    assert!(
        path.exists(),
        "{} is missing: build it with `cargo build -p scand-load` (as `bash .ci/run` does) \
         before these tests",
        path.display()
    );
    path
}

/// Runs `scand-load` with `args` (which include `--json`); asserts it succeeded and returns its
/// JSON summary.
fn load(args: &[&str]) -> serde_json::Value {
    let out = std::process::Command::new(scand_load())
        .args(args)
        .output()
        .expect("run scand-load");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "scand-load failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.trim()).expect("JSON summary")
}

#[test]
fn load_generator_gets_every_expected_answer() {
    let dir = tempfile::tempdir().expect("tempdir");
    let daemon = Daemon::start(&dir.path().join("data"), "");
    let summary = load(&[
        "--target",
        &daemon.url(),
        "--shipments",
        "300",
        "--streams",
        "3",
        "--batch-size",
        "100",
        "--json",
    ]);
    assert_eq!(summary["ok"], true);
    assert_eq!(summary["mismatched"], 0);
    assert_eq!(summary["scans_sent"], summary["scans_acked"]);
    assert!(
        summary["duplicate"].as_u64() > Some(0) && summary["rejected"].as_u64() > Some(0),
        "{summary}"
    );
}

#[test]
fn raw_ingest_floor_acks_every_scan() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("raw-ingest");
    let data = data.to_str().expect("UTF-8 temp path");
    let summary = load(&[
        "--mode",
        "raw-ingest",
        "--data",
        data,
        "--shipments",
        "200",
        "--json",
        "--quiet",
    ]);
    assert_eq!(summary["mode"], "rawingest");
    assert!(summary["scans_sent"].as_u64() > Some(0), "{summary}");
    assert_eq!(summary["scans_acked"], summary["scans_sent"], "{summary}");
}
