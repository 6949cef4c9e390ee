//! Crash consistency: SIGKILL the daemon while scanners stream, restart it on the same data
//! directory, and check that every acknowledged scan survived, that each shipment's state is a
//! fresh replay of its timeline, and that the change log has no gaps and no repeats.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::harness::{stream_until_cut, verify, workload};
use common::*;
use scand::api::pb::{self, Outcome};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_stream_loses_no_acked_scan_and_no_version() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Small memtables: flushes (and so compactions) happen during the load.
    let mut daemon = Daemon::start(&dir.path().join("data"), "");
    let acked = Arc::new(Mutex::new(HashMap::new()));
    let mut total_acked = 0;
    for round in 0..4u64 {
        let started = std::time::Instant::now();
        let scans = workload("CRASH", round, 300);
        let load = tokio::spawn(stream_until_cut(daemon.url(), scans.clone(), acked.clone()));
        let kill_after = Duration::from_millis(150 + (round * 211) % 600);
        tokio::time::sleep(kill_after).await;
        daemon.kill();
        let acked_before_kill = load.await.expect("client task");
        total_acked += acked_before_kill;
        daemon = daemon.restart();
        eprintln!("round {round}: {acked_before_kill} scans acked before SIGKILL at {kill_after:?}; restarted at {:?}", started.elapsed());
        let seen = acked.lock().expect("lock").clone();
        verify(&daemon, &seen).await;
        eprintln!("round {round}: verified at {:?}", started.elapsed());

        // The scanner resends everything; the result is the complete, duplicate-free history.
        stream_until_cut(daemon.url(), scans, acked.clone()).await;
        eprintln!("round {round}: resent at {:?}", started.elapsed());
        let seen = acked.lock().expect("lock").clone();
        verify(&daemon, &seen).await;
        eprintln!("round {round}: verified again at {:?}", started.elapsed());
    }
    assert!(total_acked > 0, "the load never got an ack before the kill");
    let mut tracking = daemon.tracking().await;
    let shipment = get_shipment(&mut tracking, "CRASH00000000")
        .await
        .expect("shipment");
    assert_eq!(shipment.timeline.len(), JOURNEY.len());
    assert_eq!(shipment.status, pb::Status::Delivered as i32);
}

#[tokio::test]
async fn sigterm_answers_in_flight_batches_and_exits_cleanly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut daemon = Daemon::start(&dir.path().join("data"), "");
    let mut ingest = daemon.ingest().await;
    let ack = ingest
        .submit_scans(batch("j", journey("PARCEL0500", "t")))
        .await
        .expect("submit")
        .into_inner();
    assert_eq!(outcomes(&ack), vec![Outcome::Accepted; 8]);
    let status = daemon.terminate().await;
    assert!(status.success(), "exit status {status:?}");
    let daemon = daemon.restart();
    let mut tracking = daemon.tracking().await;
    let shipment = get_shipment(&mut tracking, "PARCEL0500")
        .await
        .expect("shipment kept");
    assert_eq!(shipment.timeline.len(), 8);
    assert_eq!(shipment.version, 7);
}
