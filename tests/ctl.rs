//! `scand ctl` against a running daemon: get (table and JSON), tail of the change feed, stats,
//! and the errors an operator sees when the daemon is not there or the number is unknown.

mod common;

use std::process::{Command, Output};

use common::{batch, free_port, journey, Daemon};

fn ctl(target: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_scand"))
        .arg("ctl")
        .args(["--target", target])
        .args(args)
        .env_remove("SCAND_TARGET")
        .output()
        .expect("run scand ctl")
}

fn stdout(out: &Output) -> String {
    assert!(
        out.status.success(),
        "ctl failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test]
async fn get_tail_and_stats_read_a_running_daemon() {
    let dir = tempfile::tempdir().expect("tempdir");
    let daemon = Daemon::start(&dir.path().join("data"), "");
    let mut ingest = daemon.ingest().await;
    ingest
        .submit_scans(batch("b1", journey("CTLPARCEL1", "c")))
        .await
        .expect("ack");
    let target = daemon.url();

    let table = stdout(&ctl(&target, &["get", "ctlparcel1"]));
    assert!(table.contains("Tracking number  CTLPARCEL1"), "{table}");
    assert!(table.contains("Status           DELIVERED"), "{table}");
    assert!(table.contains("Version          7"), "{table}");
    let rows: Vec<&str> = table
        .lines()
        .skip_while(|l| !l.contains("SCAN TYPE"))
        .skip(1)
        .collect();
    assert_eq!(rows.len(), 8, "{table}");
    assert!(
        rows[0].contains("LABEL_CREATED") && rows[0].contains("c-0"),
        "{table}"
    );
    assert!(
        rows[7].contains("DELIVERED") && rows[7].contains("door"),
        "{table}"
    );

    let json: serde_json::Value =
        serde_json::from_str(&stdout(&ctl(&target, &["get", "CTLPARCEL1", "--json"])))
            .expect("json");
    // proto3 JSON: 64-bit integers are strings, names lowerCamelCase, defaults left out.
    assert_eq!(json["status"], "STATUS_DELIVERED");
    assert_eq!(json["version"], "7");
    assert_eq!(json["trackingNumber"], "CTLPARCEL1");
    assert_eq!(json["timeline"].as_array().map(Vec::len), Some(8));

    let tail = stdout(&ctl(&target, &["tail", "--from", "1", "--count", "7"]));
    let lines: Vec<&str> = tail.lines().collect();
    assert_eq!(lines.len(), 7, "{tail}");
    assert!(lines[0].starts_with("#1  ") && lines[0].contains("(new) -> LABEL_CREATED"));
    assert!(lines[6].starts_with("#7  ") && lines[6].contains("-> DELIVERED"));
    let tail_json = stdout(&ctl(
        &target,
        &[
            "tail",
            "--from",
            "6",
            "--count",
            "2",
            "--tracking-number",
            "CTLPARCEL1",
            "--json",
        ],
    ));
    let sequences: Vec<u64> = tail_json
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).expect("json line")["sequence"]
                .as_str()
                .and_then(|s| s.parse().ok())
                .expect("sequence")
        })
        .collect();
    assert_eq!(sequences, vec![6, 7]);

    let stats: serde_json::Value =
        serde_json::from_str(&stdout(&ctl(&target, &["stats", "--json"]))).expect("json");
    assert_eq!(stats["lastSequence"], "7");
    assert_eq!(stats.get("stalledShipments"), None, "zero is left out");
    assert_eq!(stats.get("sinks"), None, "so is an empty list");
    let text = stdout(&ctl(&target, &["stats"]));
    assert!(text.contains("status changes     7"), "{text}");

    let missing = ctl(&target, &["get", "NOSUCHPARCEL"]);
    assert_eq!(missing.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&missing.stderr)
            .contains("no scans recorded for tracking number NOSUCHPARCEL"),
        "{missing:?}"
    );
}

#[test]
fn an_unreachable_daemon_is_reported_with_its_address() {
    let target = format!("http://127.0.0.1:{}", free_port());
    let out = ctl(&target, &["stats"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("cannot reach scand at {target}"))
            && stderr.contains("is the daemon running?"),
        "{stderr}"
    );
    let bad = ctl("not a url", &["stats"]);
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("invalid --target not a url"),
        "{bad:?}"
    );
}
