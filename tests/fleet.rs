//! The fleet on the real broker: three scand instances in one consumer group on a 6-partition
//! scans topic, a producer keeping up load while instances join, leave gracefully, are killed
//! (SIGKILL) and restarted (as a supervisor does: tansu does not hand a dead member's
//! partitions to the others before someone joins), so that every partition changes owner at
//! least twice. Stall thresholds are short, so owners stall and sweep shipments all along. At
//! the end:
//! - every record the broker acked is in its shipment's timeline exactly once, whichever
//!   instance is asked (a query for a partition owned elsewhere is forwarded to its owner),
//!   and every instance gives the same answer;
//! - the status topic, read with `read_committed`, has versions 1..n once each per (tracking
//!   number, journey): no change published twice or skipped, across kills and moves;
//! - every STALLED on the status topic was committed by an instance while it owned the
//!   shipment's partition (the members topic tells who owned what, when);
//! - the members topic shows each partition's moves.

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::kafka::{header, Broker};
use common::*;
use prost::Message as _;
use rdkafka::message::Message as _;
use rdkafka::producer::FutureRecord;
use scand::proto::{pb, storage};

const PARTITIONS: i32 = 6;
const SHIPMENTS: usize = 60;

fn config(broker: &Broker) -> String {
    format!(
        "[stall]\nsweep_interval = \"500ms\"\n[stall.thresholds]\nin_transit = \"8s\"\n\
         [kafka]\nbrokers = \"{}\"\n[kafka.source]\nenabled = true\nbatch_max_wait = \"10ms\"\n\
         [kafka.sink]\nenabled = true\n[kafka.consumer.properties]\n\"session.timeout.ms\" = \"6000\"\n\
         \"heartbeat.interval.ms\" = \"1000\"\n\"max.poll.interval.ms\" = \"10000\"\n\
         \"statistics.interval.ms\" = \"500\"\n",
        broker.bootstrap
    )
}

/// Produces journeys a scan at a time, round robin over [`SHIPMENTS`] shipments, and starts
/// over with new shipments until `stop`; returns the scans the broker acknowledged, by
/// tracking number.
fn start_load(
    broker: &Broker,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<HashMap<String, Vec<String>>> {
    let producer = broker.producer();
    tokio::spawn(async move {
        let mut acked: HashMap<String, Vec<String>> = HashMap::new();
        for round in 0.. {
            let journeys: Vec<Vec<pb::Scan>> = (0..SHIPMENTS)
                .map(|s| {
                    let number = format!("FLT{round:02}{s:04}");
                    journey(&number, &format!("{number}-s"))
                })
                .collect();
            for step in 0..JOURNEY.len() {
                for scans in &journeys {
                    if stop.load(Ordering::Relaxed) {
                        return acked;
                    }
                    let scan = &scans[step];
                    let payload = scan.encode_to_vec();
                    let record = FutureRecord::to("scans.raw")
                        .key(&scan.tracking_number)
                        .payload(&payload);
                    if let Ok(Ok(_)) = producer
                        .send_result(record)
                        .map_err(|(e, _)| e)
                        .expect("queued")
                        .await
                    {
                        acked
                            .entry(scan.tracking_number.clone())
                            .or_default()
                            .push(scan.scan_id.clone());
                    }
                    tokio::time::sleep(Duration::from_millis(15)).await;
                }
            }
        }
        acked
    })
}

/// Each partition's latest claimant and how many times its owner changed, from the members
/// topic.
fn ownership(broker: &Broker) -> (HashMap<i32, String>, HashMap<i32, usize>) {
    let members = broker.consume_until("scand.members", Duration::from_secs(3), |_| false);
    let mut owner: HashMap<i32, String> = HashMap::new();
    let mut moves: HashMap<i32, usize> = HashMap::new();
    for m in &members {
        let member = storage::Member::decode(m.payload().unwrap_or_default()).expect("Member");
        for owned in &member.owned {
            let previous = owner.insert(owned.partition, member.url.clone());
            if previous.is_some_and(|p| p != member.url) {
                *moves.entry(owned.partition).or_default() += 1;
            }
        }
    }
    (owner, moves)
}

/// From when until when (unix milliseconds; open while still claimed) one owner held one
/// partition.
type Interval = (i64, Option<i64>);

/// When each publisher owned each partition, from the members topic.
fn ownership_intervals(broker: &Broker) -> HashMap<(String, i32), Vec<Interval>> {
    let members = broker.consume_until("scand.members", Duration::from_secs(3), |_| false);
    let mut intervals: HashMap<(String, i32), Vec<Interval>> = HashMap::new();
    for m in &members {
        let member = storage::Member::decode(m.payload().unwrap_or_default()).expect("Member");
        let owned: HashSet<i32> = member.owned.iter().map(|o| o.partition).collect();
        for partition in 0..PARTITIONS {
            let list = intervals
                .entry((member.publisher.clone(), partition))
                .or_default();
            let open = list.last().is_some_and(|(_, until)| until.is_none());
            match (owned.contains(&partition), open) {
                (true, false) => list.push((member.at_unix_ms, None)),
                (false, true) => {
                    if let Some(last) = list.last_mut() {
                        last.1 = Some(member.at_unix_ms);
                    }
                }
                _ => {}
            }
        }
    }
    intervals
}

/// Waits until the running instances own every partition between them, each some.
async fn wait_spread(daemons: &[&Daemon], what: &str) {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let owned: Vec<u64> = daemons
            .iter()
            .map(|d| d.metric_sum("scand_kafka_partitions_assigned") as u64)
            .collect();
        if owned.iter().sum::<u64>() == PARTITIONS as u64 && owned.iter().all(|n| *n > 0) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: partitions not spread over the instances: {owned:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Restarts a killed instance once the broker has expired its session (`session.timeout.ms`
/// is 6 s here). tansu 0.6 drops an expired member from its group without starting a new
/// generation (its coordinator's heartbeat removes the member before the check that would move
/// the group to rebalancing, `coordinator/group/administrator.rs`), so a dead member's
/// partitions stay assigned to it until someone joins; a member that joins while the dead one
/// is still unexpired gets a generation that hands the dead one partitions again.
async fn restart_after_session_timeout(daemon: Daemon) -> Daemon {
    tokio::time::sleep(Duration::from_secs(8)).await;
    daemon.restart()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_under_load_through_joins_leaves_and_kills_loses_nothing_and_answers_alike() {
    let broker = Broker::start();
    broker
        .create_topics(&[
            ("scans.raw", PARTITIONS),
            ("scans.dlq", 1),
            ("shipments.status", PARTITIONS),
            ("scand.changelog", PARTITIONS),
            ("scand.members", 1),
        ])
        .await;
    let config = config(&broker);
    let dirs: Vec<tempfile::TempDir> = (0..3)
        .map(|_| tempfile::tempdir().expect("tempdir"))
        .collect();
    let data = |i: usize| dirs[i].path().join("data");

    let a = Daemon::start(&data(0), &config);
    let stop = Arc::new(AtomicBool::new(false));
    let load = start_load(&broker, stop.clone());
    let b = Daemon::start(&data(1), &config);
    let mut c = Daemon::start(&data(2), &config);
    wait_spread(&[&a, &b, &c], "A, B and C joined").await;

    // B leaves gracefully; C is killed and restarted, as a supervisor does; B comes back;
    // then A is killed and restarted.
    let mut b = b;
    assert!(b.terminate().await.success(), "B stops cleanly");
    wait_spread(&[&a, &c], "B left").await;
    c.kill();
    let c = restart_after_session_timeout(c).await;
    wait_spread(&[&a, &c], "C was killed and restarted").await;
    let b = b.restart();
    wait_spread(&[&a, &b, &c], "B restarted").await;
    let mut a = a;
    a.kill();
    let a = restart_after_session_timeout(a).await;
    wait_spread(&[&a, &b, &c], "A was killed and restarted").await;

    // Until every partition has changed owner twice (and for `FLEET_CHURN_ROUNDS` rounds at
    // least: the soak, scripts/fleet-soak.sh), the owner of the partition that moved least
    // leaves gracefully and comes back.
    let rounds: usize = std::env::var("FLEET_CHURN_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut fleet = vec![a, b, c];
    for round in 0..rounds.max(2 * PARTITIONS as usize) {
        let (owner, moves) = ownership(&broker);
        let moved = |p: &i32| moves.get(p).copied().unwrap_or(0);
        let lagging = (0..PARTITIONS).min_by_key(moved).unwrap_or_default();
        if round >= rounds && moved(&lagging) >= 2 {
            break;
        }
        let i = fleet
            .iter()
            .position(|d| owner.get(&lagging) == Some(&d.url()))
            .expect("a running instance owns every partition");
        let mut leaving = fleet.remove(i);
        assert!(leaving.terminate().await.success(), "stops cleanly");
        wait_spread(&fleet.iter().collect::<Vec<_>>(), "an owner left").await;
        fleet.insert(i, leaving.restart());
        wait_spread(&fleet.iter().collect::<Vec<_>>(), "it came back").await;
    }

    stop.store(true, Ordering::Relaxed);
    let acked = load.await.expect("load");
    let acked_total: usize = acked.values().map(Vec::len).sum();
    assert!(
        acked_total > SHIPMENTS,
        "the load ran: {acked_total} scans acked"
    );

    // Every acked scan is in its timeline exactly once, and every instance answers alike.
    let mut clients = Vec::new();
    for daemon in &fleet {
        clients.push(daemon.tracking().await);
    }
    for (number, ids) in &acked {
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let mut answers = Vec::new();
            for client in clients.iter_mut() {
                answers.push(get_shipment(client, number).await);
            }
            let complete = answers.iter().all(|answer| {
                answer.as_ref().is_ok_and(|shipment| {
                    let stored: Vec<&str> = shipment
                        .timeline
                        .iter()
                        .map(|s| s.scan_id.as_str())
                        .collect();
                    ids.iter().all(|id| stored.contains(&id.as_str()))
                })
            });
            if complete {
                let shipments: Vec<pb::Shipment> =
                    answers.into_iter().map(|a| a.expect("answered")).collect();
                let stored: Vec<&str> = shipments[0]
                    .timeline
                    .iter()
                    .map(|s| s.scan_id.as_str())
                    .collect();
                let unique: HashSet<&&str> = stored.iter().collect();
                assert_eq!(unique.len(), stored.len(), "{number}: a scan twice");
                assert_eq!(shipments[0], shipments[1], "{number}: A and B differ");
                assert_eq!(shipments[0], shipments[2], "{number}: A and C differ");
                break;
            }
            if Instant::now() >= deadline {
                let partition = scand::kafka::partition_of(number.as_bytes(), PARTITIONS);
                let kafka: Vec<String> = fleet
                    .iter()
                    .flat_map(|d| {
                        let url = d.url();
                        d.metrics()
                            .lines()
                            .filter(|l| l.starts_with("scand_kafka") && !l.contains("bucket"))
                            .map(|l| format!("{url} {l}"))
                            .collect::<Vec<_>>()
                    })
                    .collect();
                panic!(
                    "{number} (partition {partition}): acked {ids:?} missing or answers \
                     differ: {answers:?}\n{kafka:#?}"
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    // Once the last stalls are swept (threshold 8 s), the status topic is read for every
    // shipment's versions 1..=n, each exactly once.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let mut last: HashMap<(String, u32), u64> = HashMap::new();
    for number in acked.keys() {
        let shipment = get_shipment(&mut clients[0], number)
            .await
            .expect("answered");
        last.insert((number.clone(), shipment.journey), shipment.version);
    }
    let versions_of = |messages: &[rdkafka::message::OwnedMessage]| {
        let mut versions: HashMap<(String, u32), Vec<u64>> = HashMap::new();
        for m in messages {
            let change =
                pb::StatusChange::decode(m.payload().unwrap_or_default()).expect("StatusChange");
            versions
                .entry((change.tracking_number, change.journey))
                .or_default()
                .push(change.version);
        }
        versions
    };
    let status = broker.consume_until("shipments.status", Duration::from_secs(60), |m| {
        let versions = versions_of(m);
        last.iter()
            .all(|(key, n)| versions.get(key).is_some_and(|v| v.contains(n)))
    });
    let published = versions_of(&status);
    let mut wrong = Vec::new();
    for (key, n) in &last {
        let versions = published.get(key).cloned().unwrap_or_default();
        let mut sorted = versions.clone();
        sorted.sort_unstable();
        if sorted != (1..=*n).collect::<Vec<_>>() {
            wrong.push((key.clone(), format!("{versions:?} of 1..={n}")));
        }
    }
    let intervals = ownership_intervals(&broker);
    if !wrong.is_empty() {
        eprintln!(
            "{}",
            explain(&wrong, &status, &intervals, &fleet, &mut clients).await
        );
    }
    assert!(
        wrong.is_empty(),
        "{} shipments without versions 1..n exactly once on the status topic, e.g. {:?}",
        wrong.len(),
        wrong.iter().take(5).collect::<Vec<_>>()
    );

    // Every STALLED on the status topic was committed while its publisher owned the
    // shipment's partition (from its claim, announced within moments, to its release).
    let mut stalled = 0;
    for m in &status {
        let change =
            pb::StatusChange::decode(m.payload().unwrap_or_default()).expect("StatusChange");
        if change.status != pb::Status::Stalled as i32 {
            continue;
        }
        stalled += 1;
        let publisher = header(m, "scand-publisher").expect("publisher header");
        let partition = scand::kafka::partition_of(change.tracking_number.as_bytes(), PARTITIONS);
        let committed = change.committed_time.expect("committed time");
        let at = committed.seconds * 1000 + i64::from(committed.nanos) / 1_000_000;
        let owned = intervals
            .get(&(publisher.clone(), partition))
            .is_some_and(|list| {
                list.iter()
                    .any(|(from, until)| from - 2000 <= at && until.is_none_or(|u| at <= u))
            });
        assert!(
            owned,
            "{} stalled by {publisher} at {at}, which did not own partition {partition}: {:?}",
            change.tracking_number,
            intervals.get(&(publisher.clone(), partition))
        );
    }
    assert!(stalled > 0, "the sweeps stalled shipments during the run");

    // Each partition changed owner at least twice, as the members topic tells.
    let (_, moves) = ownership(&broker);
    eprintln!(
        "fleet tally: {acked_total} scans acked for {} shipments, each in its timeline once on \
         all 3 instances; {} status changes, versions 1..n once each; {stalled} STALLED, each \
         committed by the partition's owner; moves per partition {moves:?}",
        acked.len(),
        status.len(),
    );
    for partition in 0..PARTITIONS {
        assert!(
            moves.get(&partition).copied().unwrap_or(0) >= 2,
            "partition {partition} moved {:?} times: {moves:?}",
            moves.get(&partition)
        );
    }
}

/// For shipments whose versions on the status topic are wrong: who published each record
/// (publisher, sequence, where) and which instance's change log derived each version.
async fn explain(
    wrong: &[((String, u32), String)],
    status: &[rdkafka::message::OwnedMessage],
    intervals: &HashMap<(String, i32), Vec<Interval>>,
    fleet: &[Daemon],
    clients: &mut [TrackingClient],
) -> String {
    let mut lines = Vec::new();
    for ((number, journey), what) in wrong.iter().take(3) {
        let partition = scand::kafka::partition_of(number.as_bytes(), PARTITIONS);
        lines.push(format!(
            "{number} j{journey} (partition {partition}): {what}"
        ));
        for ((publisher, p), list) in intervals {
            if *p == partition {
                lines.push(format!("  {publisher} owned it {list:?}"));
            }
        }
        for m in status {
            let change =
                pb::StatusChange::decode(m.payload().unwrap_or_default()).expect("StatusChange");
            if &change.tracking_number == number && change.journey == *journey {
                lines.push(format!(
                    "  published v{} by {:?} seq {:?} at {}/{}, committed {:?}, sent {:?}",
                    change.version,
                    header(m, "scand-publisher"),
                    header(m, "scand-sequence"),
                    m.partition(),
                    m.offset(),
                    change
                        .committed_time
                        .map(|t| t.seconds * 1000 + i64::from(t.nanos) / 1_000_000),
                    m.timestamp().to_millis()
                ));
            }
        }
        for (daemon, client) in fleet.iter().zip(clients.iter_mut()) {
            let mut feed = watch(client, 0, Some(number.clone())).await;
            while let Ok(Ok(Some(change))) =
                tokio::time::timeout(Duration::from_millis(500), feed.message()).await
            {
                if change.journey == *journey {
                    lines.push(format!(
                        "  derived v{} ({}) seq {} on {}",
                        change.version,
                        change.status,
                        change.sequence,
                        daemon.url()
                    ));
                }
            }
        }
    }
    lines.join("\n")
}
