//! `scand-load` against the real daemon: a few thousand realistic scans over several streams,
//! every answer checked by the generator (it exits non-zero on any unexpected outcome).

mod common;

use common::Daemon;

#[test]
fn load_generator_gets_every_expected_answer() {
    let dir = tempfile::tempdir().expect("tempdir");
    let daemon = Daemon::start(&dir.path().join("data"), "");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_scand-load"))
        .args([
            "--target",
            &daemon.url(),
            "--shipments",
            "300",
            "--streams",
            "3",
            "--batch-size",
            "100",
            "--json",
        ])
        .output()
        .expect("run scand-load");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "scand-load failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: serde_json::Value = serde_json::from_str(stdout.trim()).expect("JSON summary");
    assert_eq!(summary["ok"], true);
    assert_eq!(summary["mismatched"], 0);
    assert_eq!(summary["scans_sent"], summary["scans_acked"]);
    assert!(
        summary["duplicate"].as_u64() > Some(0) && summary["rejected"].as_u64() > Some(0),
        "{summary}"
    );
}
