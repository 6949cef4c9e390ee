//! A shipment's life over months, against the real daemon: a tracking number reused after
//! delivery starts a new journey (over gRPC and over Kafka), retention removes journeys and
//! trims the change log with the server clock moved months ahead (the `clock-offset-seconds`
//! fail point), and an online backup taken under load restores into a daemon that continues
//! where the backup was taken.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use common::harness::{stream_until_cut, verify_from, workload, Acked};
use common::kafka::{header, Broker, Record};
use common::*;
use prost::Message;
use rdkafka::Message as _;
use scand::proto::pb;

const DAY: u64 = 24 * 3600;

/// A timestamp `days` before now (after it, for a negative number).
fn days_ago(days: f64) -> prost_types::Timestamp {
    let by = Duration::from_secs_f64(days.abs() * DAY as f64);
    timestamp(if days < 0.0 {
        SystemTime::now() + by
    } else {
        SystemTime::now() - by
    })
}

fn scan_at(id: &str, number: &str, scan_type: pb::ScanType, days: f64) -> pb::Scan {
    scan(id, number, scan_type, days_ago(days), "hub-1")
}

fn scand(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_scand"))
        .args(args)
        .env_remove("SCAND_TARGET")
        .output()
        .expect("run scand")
}

/// Runs `scand ARGS`, which must succeed; its standard output.
fn scand_ok(args: &[&str]) -> String {
    let out = scand(args);
    assert!(
        out.status.success(),
        "scand {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `scand ctl backup DESTINATION [extra]` against `daemon`.
fn backup(daemon: &Daemon, destination: &Path, extra: &[&str]) -> Output {
    let url = daemon.url();
    let mut args = vec![
        "ctl",
        "--target",
        &url,
        "backup",
        destination.to_str().expect("utf-8"),
    ];
    args.extend_from_slice(extra);
    scand(&args)
}

/// `scand restore --from BACKUP --data DATA`, which must succeed; what it printed.
fn restore(backup: &Path, data: &Path) -> String {
    scand_ok(&[
        "restore",
        "--from",
        backup.to_str().expect("utf-8"),
        "--data",
        data.to_str().expect("utf-8"),
    ])
}

async fn submit(daemon: &Daemon, scans: Vec<pb::Scan>) -> Vec<(pb::Outcome, String)> {
    let ack = daemon
        .ingest()
        .await
        .submit_scans(batch("b", scans))
        .await
        .expect("answered")
        .into_inner();
    ack.results
        .into_iter()
        .map(|r| (pb::Outcome::try_from(r.outcome).expect("known"), r.reason))
        .collect()
}

/// (journey, version, status) of changes.
fn journey_versions(changes: &[pb::StatusChange]) -> Vec<(u32, u64, i32)> {
    changes
        .iter()
        .map(|c| (c.journey, c.version, c.status))
        .collect()
}

/// Nothing expires and nothing stalls: journeys months apart stay as they were sent.
const KEEP_A_YEAR: &str =
    "[ingest]\nmax_age = \"400days\"\n[retention]\nclosed_after = \"365days\"\n\
                           idle_after = \"365days\"\n[stall.thresholds]\nin_transit = \"0s\"\n";

#[tokio::test]
async fn a_number_reused_after_delivery_is_a_new_journey_and_late_scans_find_theirs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let daemon = Daemon::start(&dir.path().join("data"), KEEP_A_YEAR);
    let n = "REUSED00001";
    let first = submit(
        &daemon,
        vec![
            scan_at("j1-label", n, pb::ScanType::LabelCreated, 120.0),
            scan_at("j1-out", n, pb::ScanType::OutForDelivery, 118.5),
            scan_at("j1-door", n, pb::ScanType::Delivered, 118.0),
        ],
    )
    .await;
    assert!(
        first.iter().all(|(o, _)| *o == pb::Outcome::Accepted),
        "{first:?}"
    );
    // 90 days later the carrier prints the same number on a new parcel.
    let second = submit(
        &daemon,
        vec![
            scan_at("j2-label", n, pb::ScanType::LabelCreated, 28.0),
            scan_at("j2-hub", n, pb::ScanType::ArrivedAtFacility, 27.0),
        ],
    )
    .await;
    assert!(
        second.iter().all(|(o, _)| *o == pb::Outcome::Accepted),
        "{second:?}"
    );
    // A truck's upload from journey 1, months late: it goes where its event time falls.
    let late = submit(
        &daemon,
        vec![scan_at("j1-hub", n, pb::ScanType::Sorted, 119.0)],
    )
    .await;
    assert_eq!(late[0].0, pb::Outcome::Accepted);

    let mut tracking = daemon.tracking().await;
    let latest = get_shipment(&mut tracking, n).await.expect("found");
    assert_eq!(latest.journey, 2);
    assert_eq!(latest.status, pb::Status::InTransit as i32);
    assert_eq!(latest.version, 2);
    let ids: Vec<&str> = latest.timeline.iter().map(|s| s.scan_id.as_str()).collect();
    assert_eq!(ids, ["j2-label", "j2-hub"]);
    assert_eq!(
        latest
            .journeys
            .iter()
            .map(|j| (j.journey, j.status, j.scans, j.version))
            .collect::<Vec<_>>(),
        vec![
            (1, pb::Status::Delivered as i32, 4, 3),
            (2, pb::Status::InTransit as i32, 2, 2)
        ]
    );
    let first = get_journey(&mut tracking, n, 1)
        .await
        .expect("journey 1 kept");
    let ids: Vec<&str> = first.timeline.iter().map(|s| s.scan_id.as_str()).collect();
    assert_eq!(ids, ["j1-label", "j1-hub", "j1-out", "j1-door"]);
    assert_eq!(first.status, pb::Status::Delivered as i32);
    let missing = get_journey(&mut tracking, n, 3)
        .await
        .expect_err("no journey 3");
    assert_eq!(missing.code(), tonic::Code::NotFound);
    assert!(
        missing.message().contains("has no journey 3"),
        "{}",
        missing.message()
    );

    let mut feed = watch(&mut tracking, 0, Some(n.to_owned())).await;
    let changes = take_changes(&mut feed, 5).await;
    assert_eq!(
        journey_versions(&changes),
        vec![
            (1, 1, pb::Status::LabelCreated as i32),
            (1, 2, pb::Status::OutForDelivery as i32),
            (1, 3, pb::Status::Delivered as i32),
            (2, 1, pb::Status::LabelCreated as i32),
            (2, 2, pb::Status::InTransit as i32),
        ],
        "the late scan of journey 1 moved no status"
    );
    assert_eq!(
        changes[3].previous_status, 0,
        "a journey starts from nothing"
    );

    let text = scand_ok(&["ctl", "--target", &daemon.url(), "get", n, "--journey", "1"]);
    assert!(text.contains("Journey          1 (kept: 1, 2)"), "{text}");
    assert!(text.contains("j1-hub"), "{text}");
}

/// Retention with the server clock moved on by restarting the daemon with an offset: what
/// expired goes, a late scan of it is refused, the change log is trimmed and a feed resuming
/// before it is told so.
#[cfg_attr(
    not(feature = "failpoints"),
    ignore = "needs the failpoints feature: cargo test --features scand/failpoints"
)]
#[tokio::test]
async fn retention_removes_expired_journeys_and_the_change_log_as_the_clock_moves_on() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = "[ingest]\nmax_age = \"400days\"\n[stall]\nsweep_interval = \"100ms\"\n\
                  [retention]\nclosed_after = \"10days\"\nidle_after = \"20days\"\n\
                  change_log = \"5days\"\n";
    let daemon = Daemon::start(&dir.path().join("data"), config);
    let (done, idle) = ("CLOSED00001", "IDLE0000001");
    let stored = submit(
        &daemon,
        vec![
            scan_at("d1", done, pb::ScanType::LabelCreated, 5.0),
            scan_at("d2", done, pb::ScanType::Delivered, 4.0),
            scan_at("i1", idle, pb::ScanType::Sorted, 1.0),
        ],
    )
    .await;
    assert!(
        stored.iter().all(|(o, _)| *o == pb::Outcome::Accepted),
        "{stored:?}"
    );
    let before = daemon.metric("scand_change_log_sequence") as u64;
    assert_eq!(before, 3);

    // Fifteen days on: the delivered journey (closed 4 days before) is 11 days closed.
    let offset = (15 * DAY).to_string();
    let failpoint = format!("clock-offset-seconds=return({offset})");
    let daemon = daemon.restart_with_env(&[("FAILPOINTS", &failpoint)]);
    daemon
        .metrics_showing(
            &[
                "scand_retention_removed_total{what=\"journeys\"} 1",
                "scand_retention_removed_total{what=\"scans\"} 2",
            ],
            Duration::from_secs(30),
        )
        .await;
    let mut tracking = daemon.tracking().await;
    let gone = get_shipment(&mut tracking, done)
        .await
        .expect_err("removed");
    assert_eq!(gone.code(), tonic::Code::NotFound);
    let kept = get_shipment(&mut tracking, idle)
        .await
        .expect("idle 16 days: kept");
    assert_eq!(kept.status, pb::Status::Stalled as i32, "stalled meanwhile");

    // A late scan of the removed journey is refused; a new label opens journey 2.
    let answers = submit(
        &daemon,
        vec![
            scan_at("d3", done, pb::ScanType::Delivered, 4.5),
            scan_at("e1", done, pb::ScanType::LabelCreated, -14.0),
        ],
    )
    .await;
    assert_eq!(answers[0].0, pb::Outcome::Rejected);
    assert!(
        answers[0].1.starts_with("journey_expired: "),
        "{}",
        answers[0].1
    );
    assert_eq!(answers[1].0, pb::Outcome::Accepted);
    let reused = get_shipment(&mut tracking, done).await.expect("journey 2");
    assert_eq!((reused.journey, reused.version), (2, 1));
    assert!(daemon
        .metrics()
        .contains("scand_scans_rejected_total{reason=\"journey_expired\"} 1"));

    // The change log kept nothing committed more than 5 days before the moved clock.
    daemon
        .metrics_showing(
            &["scand_retention_removed_total{what=\"changes\"} 3"],
            Duration::from_secs(30),
        )
        .await;
    let first = daemon.metric("scand_change_log_first_sequence") as u64;
    assert_eq!(first, 4);
    let mut feed = watch(&mut tracking, 0, None).await;
    let status = feed.message().await.expect_err("out of range");
    assert_eq!(status.code(), tonic::Code::OutOfRange);
    assert!(
        status.message().contains("the oldest kept is 4"),
        "{}",
        status.message()
    );
    let mut resumed = watch(&mut tracking, 3, None).await;
    let next = take_changes(&mut resumed, 1).await;
    assert_eq!(next[0].sequence, 4);
    let out = scand(&[
        "ctl",
        "--target",
        &daemon.url(),
        "tail",
        "--from",
        "1",
        "--count",
        "1",
    ]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("no longer keeps the changes asked for"),
        "{stderr}"
    );
    assert!(stderr.contains("--from 4"), "{stderr}");

    // Thirty-five days on: the idle journey (last scan a day before) is 34 days idle.
    let offset = (35 * DAY).to_string();
    let failpoint = format!("clock-offset-seconds=return({offset})");
    let daemon = daemon.restart_with_env(&[("FAILPOINTS", &failpoint)]);
    let mut tracking = daemon.tracking().await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while get_shipment(&mut tracking, idle).await.is_ok() {
        assert!(Instant::now() < deadline, "the idle journey never expired");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A backup taken while scans stream in restores into a daemon that holds every scan acked
/// before the backup began and continues the change log after the backup's last sequence.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_taken_under_load_restores_everything_acked_before_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let daemon = Daemon::start(&dir.path().join("data"), "");
    let acked: Acked = Arc::new(Mutex::new(HashMap::new()));
    let scans = workload("BK", 1, 400);
    let load = tokio::spawn(stream_until_cut(daemon.url(), scans, acked.clone()));
    while acked.lock().expect("lock").len() < 600 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let acked_before = acked.lock().expect("lock").clone();
    let destination = dir.path().join("backups/monday");
    std::fs::create_dir_all(destination.parent().expect("parent")).expect("mkdir");
    let out = backup(&daemon, &destination, &["--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let reply: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let last_sequence: u64 = reply["lastSequence"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .expect("lastSequence");
    assert!(last_sequence > 0);
    load.await.expect("load");

    // A second backup into the same place is refused, and leaves the first as it was.
    let again = backup(&daemon, &destination, &[]);
    assert!(!again.status.success());
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("exists and is not empty"),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    drop(daemon);

    let restored_data = dir.path().join("restored");
    let restored_text = restore(&destination, &restored_data);
    assert!(restored_text.contains(&format!("continues after sequence {last_sequence}")));
    let restored = Daemon::start(&restored_data, "");
    verify_from(&restored, &acked_before, 0).await;
    assert_eq!(
        restored.metric("scand_change_log_sequence") as u64,
        last_sequence
    );
    let mut tracking = restored.tracking().await;
    let mut feed = watch(&mut tracking, last_sequence, None).await;
    let answers = submit(
        &restored,
        vec![scan(
            "after-restore",
            "RESTORED001",
            pb::ScanType::LabelCreated,
            minutes_ago(1),
            "shop",
        )],
    )
    .await;
    assert_eq!(answers[0].0, pb::Outcome::Accepted);
    let next = take_changes(&mut feed, 1).await;
    assert_eq!(next[0].sequence, last_sequence + 1);
    assert_eq!(next[0].tracking_number, "RESTORED001");
}

fn kafka_record(scan: &pb::Scan) -> Record {
    (
        scan.tracking_number.clone(),
        scan.encode_to_vec(),
        vec![("content-type", "application/x-protobuf")],
    )
}

async fn wait_for_journey(daemon: &Daemon, number: &str, journey: u32, scans: usize) {
    let mut tracking = daemon.tracking().await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(s) = get_shipment(&mut tracking, number).await {
            if s.journey == journey && s.timeline.len() == scans {
                return;
            }
        }
        assert!(
            Instant::now() < deadline,
            "{number}: journey {journey} never complete"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Over Kafka: a reused number's new journey, a scan of a journey retention removed
/// dead-lettered with `journey_expired`, and a backup whose offsets a restored daemon resumes
/// from, applying what was produced after it exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_journeys_expired_scans_and_a_backup_resume_from_its_offsets() {
    let broker = Broker::start();
    broker
        .create_topics(&[
            ("scans.raw", 1),
            ("scans.dlq", 1),
            ("scand.changelog", 1),
            ("scand.members", 1),
        ])
        .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let kafka = format!(
        "[ingest]\nmax_age = \"400days\"\n[stall]\nsweep_interval = \"100ms\"\n\
         [retention]\nclosed_after = \"30days\"\n\
         [kafka]\nbrokers = \"{}\"\n[kafka.source]\nenabled = true\nbatch_max_wait = \"10ms\"\n",
        broker.bootstrap
    );
    let daemon = Daemon::start(&dir.path().join("data"), &kafka);
    let n = "KAFKAREUSE1";
    // Journey 1 closed 100 days ago: retention removes it as soon as it is stored.
    broker
        .produce(
            "scans.raw",
            &[
                kafka_record(&scan_at("k1-label", n, pb::ScanType::LabelCreated, 101.0)),
                kafka_record(&scan_at("k1-door", n, pb::ScanType::Delivered, 100.0)),
            ],
        )
        .await;
    daemon
        .metrics_showing(
            &["scand_retention_removed_total{what=\"journeys\"} 1"],
            Duration::from_secs(60),
        )
        .await;
    broker
        .produce(
            "scans.raw",
            &[
                kafka_record(&scan_at("k1-late", n, pb::ScanType::Sorted, 100.5)),
                kafka_record(&scan_at("k2-label", n, pb::ScanType::LabelCreated, 2.0)),
            ],
        )
        .await;
    wait_for_journey(&daemon, n, 2, 1).await;
    let dead = broker.consume_until("scans.dlq", Duration::from_secs(30), |m| !m.is_empty());
    assert_eq!(dead.len(), 1);
    assert_eq!(
        header(&dead[0], "scand-reason")
            .as_deref()
            .map(|r| r.starts_with("journey_expired: ")),
        Some(true),
        "{:?}",
        header(&dead[0], "scand-reason")
    );
    let letter = pb::Scan::decode(dead[0].payload().expect("payload")).expect("the scan");
    assert_eq!(letter.scan_id, "k1-late");

    let destination = dir.path().join("backup");
    let out = backup(&daemon, &destination, &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("offset       scans.raw[0] next 4"), "{text}");

    // Produced after the backup: the restored daemon must apply it, once.
    broker
        .produce(
            "scans.raw",
            &[kafka_record(&scan_at(
                "k2-hub",
                n,
                pb::ScanType::ArrivedAtFacility,
                1.0,
            ))],
        )
        .await;
    wait_for_journey(&daemon, n, 2, 2).await;
    drop(daemon);
    let restored_data = dir.path().join("restored");
    let restored_text = restore(&destination, &restored_data);
    assert!(restored_text.contains("scans.raw[0] resumes at offset 4"));
    let restored = Daemon::start(&restored_data, &format!("{kafka}group_id = \"restored\"\n"));
    wait_for_journey(&restored, n, 2, 2).await;
    let mut tracking = restored.tracking().await;
    let shipment = get_shipment(&mut tracking, n).await.expect("found");
    let ids: Vec<&str> = shipment
        .timeline
        .iter()
        .map(|s| s.scan_id.as_str())
        .collect();
    assert_eq!(ids, ["k2-label", "k2-hub"]);
    assert_eq!(shipment.version, 2);
}

#[test]
fn retention_settings_out_of_range_fail_check_config_naming_the_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (toml, key) in [
        (
            "[retention]\nclosed_after = \"0s\"\n",
            "retention.closed_after",
        ),
        ("[retention]\nidle_after = \"0s\"\n", "retention.idle_after"),
        (
            "[lifecycle]\nnew_journey_after = \"0s\"\n",
            "lifecycle.new_journey_after",
        ),
        (
            "[retention]\nchange_log = \"10s\"\n",
            "retention.change_log",
        ),
        ("[retention]\nclosed_after = \"-1days\"\n", "closed_after"),
    ] {
        let path = dir.path().join("scand.toml");
        std::fs::write(&path, toml).expect("write");
        let out = scand(&["check-config", "--config", path.to_str().expect("utf-8")]);
        assert!(!out.status.success(), "{toml}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(key), "{toml}: {stderr}");
    }
}
