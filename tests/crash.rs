//! Crash consistency: rounds of load over gRPC and Kafka, every tenth tracking number with a
//! second journey shuffled among the first's, SIGKILL at a random moment (small
//! memtables make flushes and compactions frequent, so kills land in them too), restart on
//! the same data directory, and verify: every acked scan (gRPC ACK, or Kafka delivery report)
//! is in its shipment's timeline; each shipment's state is a fresh replay of its timeline; the
//! change log and each shipment's versions are gapless with no repeats; a feed subscriber
//! resumes from its last cursor with nothing missed or repeated.
//!
//! `CRASH_ROUNDS` sets the rounds (CI: 10); `scripts/crash-soak.sh` runs 100+ and prints the
//! tally.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::harness::{stream_until_cut, verify, verify_from, workload, Acked, FeedFollower, Rng};
use common::kafka::{Broker, Record};
use common::*;
use prost::Message;
use scand::proto::pb::{self, Outcome};

const GRPC_SHIPMENTS: usize = 400;
const KAFKA_SHIPMENTS: usize = 100;

fn rounds() -> u64 {
    std::env::var("CRASH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10)
}

fn kafka_records(scans: &[pb::Scan]) -> Vec<Record> {
    scans
        .iter()
        .map(|s| {
            (
                s.tracking_number.clone(),
                s.encode_to_vec(),
                vec![("content-type", "application/x-protobuf")],
            )
        })
        .collect()
}

/// Waits until every scan produced to Kafka is in its shipment's timeline (of any journey).
async fn wait_consumed(daemon: &Daemon, produced: &HashMap<String, String>) {
    let mut by_shipment: HashMap<&str, Vec<&str>> = HashMap::new();
    for (id, number) in produced {
        by_shipment.entry(number).or_default().push(id);
    }
    let mut tracking = daemon.tracking().await;
    let deadline = Instant::now() + Duration::from_secs(120);
    for (number, ids) in by_shipment {
        loop {
            let stored = scan_ids(&mut tracking, number).await;
            if ids.iter().all(|id| stored.iter().any(|s| s == id)) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{number}: scans produced to Kafka never applied"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_random_moments_loses_no_acked_scan_and_no_version() {
    let broker = Arc::new(Broker::start());
    broker
        .create_topics(&[
            ("scans.raw", 3),
            ("scans.dlq", 1),
            ("scand.changelog", 3),
            ("scand.members", 1),
        ])
        .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let config = format!(
        "[kafka]\nbrokers = \"{}\"\n[kafka.source]\nenabled = true\nbatch_max_wait = \"10ms\"\n\
         batch_max_records = 100\n[kafka.consumer.properties]\n\"session.timeout.ms\" = \"6000\"\n\
         \"max.poll.interval.ms\" = \"8000\"\n",
        broker.bootstrap
    );
    // 1 MiB memtables: several flushes, and compactions, per round.
    let mut daemon = Daemon::start_with_env(
        &dir.path().join("data"),
        &config,
        &[("SCAND_STORE__MEMTABLE_BYTES", "1048576")],
    );
    let acked: Acked = Arc::new(Mutex::new(HashMap::new()));
    let produced = Arc::new(Mutex::new(HashMap::new()));
    let mut cursor = 0;
    let (mut grpc_acked, mut kafka_delivered) = (0usize, 0usize);
    let rounds = rounds();
    for round in 0..rounds {
        let mut rng = Rng::new(round + 1000);
        let scans = workload("CR", round, GRPC_SHIPMENTS);
        let follower = FeedFollower::start(daemon.url(), cursor);
        let load = tokio::spawn(stream_until_cut(daemon.url(), scans.clone(), acked.clone()));
        let kafka_scans = workload("CK", round, KAFKA_SHIPMENTS);
        let producing = {
            let (broker, produced, scans) = (broker.clone(), produced.clone(), kafka_scans);
            tokio::spawn(async move {
                broker.produce("scans.raw", &kafka_records(&scans)).await;
                let mut produced = produced.lock().expect("lock");
                for s in &scans {
                    produced.insert(s.scan_id.clone(), s.tracking_number.clone());
                }
                scans.len()
            })
        };
        // Kill once a random share (5-95 %) of the round's scans was acked: always mid-load.
        let started = Instant::now();
        let before = acked.lock().expect("lock").len() as u64;
        let share = 5 + rng.below(91);
        let target = before + scans.len() as u64 * share / 100 * 9 / 10;
        while (acked.lock().expect("lock").len() as u64) < target && !load.is_finished() {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let kill_after = started.elapsed();
        daemon.kill();
        let acked_before_kill = load.await.expect("scanner");
        grpc_acked += acked_before_kill;
        kafka_delivered += producing.await.expect("producer");
        let last_seen = follower.finish(cursor).await;
        // A fresh consumer group per start: scand positions itself at the offsets stored with
        // its state whatever the group, and tansu 0.6 can leave a restarted member of the old
        // group without partitions for minutes while the killed member is still registered.
        let group = format!("crash-{round}");
        daemon = daemon.restart_with_env(&[("SCAND_KAFKA__SOURCE__GROUP_ID", &group)]);

        // The subscriber resumes after the last change it saw: the next one, nothing skipped.
        let resumed = FeedFollower::start(daemon.url(), last_seen);
        let produced_now = produced.lock().expect("lock").clone();
        wait_consumed(&daemon, &produced_now).await;
        // This round's shipments in full (earlier rounds' are re-verified at the end).
        let this_round = |(_, number): (&String, &String)| {
            number.starts_with(&format!("CR{round:03}"))
                || number.starts_with(&format!("CK{round:03}"))
        };
        let everything: HashMap<String, String> = acked
            .lock()
            .expect("lock")
            .iter()
            .chain(produced_now.iter())
            .filter(|entry| this_round(*entry))
            .map(|(id, number)| (id.clone(), number.clone()))
            .collect();
        let log_end = verify_from(&daemon, &everything, cursor).await;
        // The resumed feed catches up with the log; then it must hold exactly the rest of it.
        let expected: Vec<u64> = (last_seen + 1..=log_end).collect();
        let deadline = Instant::now() + Duration::from_secs(10);
        while resumed.seen.lock().expect("lock").len() < expected.len() && Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        {
            let seen = resumed.seen.lock().expect("lock");
            assert_eq!(
                seen.as_slice(),
                expected.as_slice(),
                "round {round}: resumed feed"
            );
        }
        resumed.task_abort();

        // The scanner resends what it has no ack for; the history is complete and duplicate-free.
        stream_until_cut(daemon.url(), scans, acked.clone()).await;
        cursor = log_end;
        eprintln!(
            "round {round}: SIGKILL after {kill_after:?} with {acked_before_kill} scans acked \
             ({share} % target); feed resumed after {last_seen}; log {log_end} changes; verified"
        );
    }
    // Every round's scans, after all the kills.
    let mut everything = acked.lock().expect("lock").clone();
    everything.extend(produced.lock().expect("lock").clone());
    verify(&daemon, &everything).await;
    let everything = everything.len();
    eprintln!(
        "crash harness: rounds={rounds} grpc_scans_acked_before_kill={grpc_acked} \
         kafka_records_delivered={kafka_delivered} scans_checked={everything} lost=0"
    );
    assert!(grpc_acked > 0, "the load never got an ack before a kill");
    let mut tracking = daemon.tracking().await;
    // The workload's first number carries two journeys.
    let first = get_journey(&mut tracking, "CR00000000", 1)
        .await
        .expect("journey 1");
    assert_eq!(first.timeline.len(), JOURNEY.len());
    assert_eq!(first.status, pb::Status::Delivered as i32);
    let second = get_shipment(&mut tracking, "CR00000000")
        .await
        .expect("journey 2");
    assert_eq!((second.journey, second.timeline.len()), (2, 4));
    assert_eq!(second.status, pb::Status::OutForDelivery as i32);
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
    // The change log's position is known from the start, not only after the next write.
    assert_eq!(daemon.metric("scand_change_log_sequence"), 7.0);
}
