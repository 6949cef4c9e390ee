//! Crash consistency: SIGKILL the daemon while scanners stream, restart it on the same data
//! directory, and check that every acknowledged scan survived, that each shipment's state is a
//! fresh replay of its timeline, and that the change log has no gaps and no repeats.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use scand::api::pb::{self, Outcome};
use scand::domain::ScanType;
use scand::engine::status::Derived;
use tokio_stream::wrappers::ReceiverStream;

const SHIPMENTS: usize = 300;
const BATCH: usize = 50;

/// Every scan of the workload, in a shuffled but reproducible order, with retries mixed in.
fn workload(round: u64) -> Vec<pb::Scan> {
    let mut scans = Vec::new();
    for s in 0..SHIPMENTS {
        scans.extend(journey(
            &format!("CRASH{round:02}{s:05}"),
            &format!("r{round}s{s}"),
        ));
    }
    let mut x = round.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for i in (1..scans.len()).rev() {
        let j = (next() % (i as u64 + 1)) as usize;
        scans.swap(i, j);
    }
    let retries: Vec<pb::Scan> = (0..scans.len() / 10)
        .map(|_| scans[(next() % scans.len() as u64) as usize].clone())
        .collect();
    for (k, retry) in retries.into_iter().enumerate() {
        let at = (k * 37) % scans.len();
        scans.insert(at, retry);
    }
    scans
}

/// Streams `scans` in batches until done or the server goes away; returns the scans acked.
async fn stream_until_cut(
    daemon_url: String,
    scans: Vec<pb::Scan>,
    acked: Arc<Mutex<HashMap<String, String>>>,
) -> usize {
    let Ok(mut client) = IngestClient::connect(daemon_url).await else {
        return 0;
    };
    let batches: Vec<pb::ScanBatch> = scans
        .chunks(BATCH)
        .enumerate()
        .map(|(i, c)| batch(&format!("b{i}"), c.to_vec()))
        .collect();
    let by_id: HashMap<String, Vec<pb::Scan>> = batches
        .iter()
        .map(|b| (b.batch_id.clone(), b.scans.clone()))
        .collect();
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tokio::spawn(async move {
        for b in batches {
            if tx.send(b).await.is_err() {
                return;
            }
        }
    });
    let Ok(response) = client.stream_scans(ReceiverStream::new(rx)).await else {
        return 0;
    };
    let mut acks = response.into_inner();
    let mut count = 0;
    while let Ok(Some(ack)) = acks.message().await {
        let sent = &by_id[&ack.batch_id];
        let mut acked = acked.lock().expect("lock");
        for (scan, result) in sent.iter().zip(&ack.results) {
            assert_eq!(scan.scan_id, result.scan_id);
            assert_ne!(
                result.outcome,
                Outcome::Rejected as i32,
                "{}",
                result.reason
            );
            acked.insert(scan.scan_id.clone(), scan.tracking_number.clone());
            count += 1;
        }
    }
    count
}

async fn verify(daemon: &Daemon, acked: &HashMap<String, String>) {
    let mut tracking = daemon.tracking().await;
    let mut by_shipment: BTreeMap<&str, HashSet<&str>> = BTreeMap::new();
    for (scan_id, number) in acked {
        by_shipment
            .entry(number.as_str())
            .or_default()
            .insert(scan_id.as_str());
    }
    let mut versions: HashMap<String, (u64, i32, i32)> = HashMap::new();
    for (number, ids) in &by_shipment {
        let shipment = get_shipment(&mut tracking, number)
            .await
            .unwrap_or_else(|e| panic!("acked shipment {number} lost: {e}"));
        let stored: HashSet<&str> = shipment
            .timeline
            .iter()
            .map(|s| s.scan_id.as_str())
            .collect();
        let lost: Vec<&&str> = ids.iter().filter(|id| !stored.contains(**id)).collect();
        assert!(lost.is_empty(), "{number}: acked scans lost: {lost:?}");
        // The stored state is what a fresh replay of the timeline derives.
        let replay = Derived::of(
            shipment
                .timeline
                .iter()
                .map(|s| ScanType::from_i32(s.scan_type).expect("stored scan type")),
        );
        let point = replay.point.expect("a status");
        assert_eq!(shipment.status, point.status.as_i32(), "{number}");
        assert_eq!(
            shipment.sub_status,
            point.sub_status.map_or(0, ScanType::as_i32),
            "{number}"
        );
        assert_eq!(
            shipment.scans_after_terminal, replay.scans_after_terminal,
            "{number}"
        );
        versions.insert(
            shipment.tracking_number.clone(),
            (shipment.version, shipment.status, shipment.sub_status),
        );
    }

    // The change log: sequences 1..=N without gaps, versions per shipment 1..=v.
    let mut feed = watch(&mut tracking, 0, None).await;
    let mut expected_total = 0u64;
    let mut seen_versions: HashMap<String, u64> = HashMap::new();
    let mut last_status: HashMap<String, (i32, i32)> = HashMap::new();
    let mut sequence = 0u64;
    loop {
        let next = tokio::time::timeout(Duration::from_secs(2), feed.message()).await;
        let Ok(Ok(Some(change))) = next else { break };
        sequence += 1;
        assert_eq!(change.sequence, sequence, "sequence gap or repeat");
        let v = seen_versions
            .entry(change.tracking_number.clone())
            .or_insert(0);
        assert_eq!(
            change.version,
            *v + 1,
            "{}: version gap or repeat",
            change.tracking_number
        );
        *v = change.version;
        last_status.insert(
            change.tracking_number.clone(),
            (change.status, change.sub_status),
        );
    }
    for (number, (version, status, sub_status)) in &versions {
        assert_eq!(
            seen_versions.get(number),
            Some(version),
            "{number}: log and state disagree"
        );
        assert_eq!(
            last_status.get(number),
            Some(&(*status, *sub_status)),
            "{number}"
        );
        expected_total += version;
    }
    assert!(sequence >= expected_total);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_stream_loses_no_acked_scan_and_no_version() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Small memtables: flushes (and so compactions) happen during the load.
    let mut daemon = Daemon::start(&dir.path().join("data"), "");
    let acked = Arc::new(Mutex::new(HashMap::new()));
    let mut total_acked = 0;
    for round in 0..4u64 {
        let started = std::time::Instant::now();
        let scans = workload(round);
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
    let shipment = get_shipment(&mut tracking, "CRASH0000000")
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
