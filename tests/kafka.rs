//! Kafka in and out against a real broker (tansu): scans consumed from `scans.raw`, poison
//! records dead-lettered, status changes published to `shipments.status` in version order,
//! exact resume after SIGKILL, and publishing that survives a stalled broker.

mod common;

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use common::kafka::{by_key, header, Broker, Record};
use common::*;
use prost::Message as _;
use rdkafka::message::Message;
use scand::proto::pb::{self, Outcome, ScanType};

fn kafka_config(broker: &Broker, source: bool, sink: bool) -> String {
    format!(
        "[kafka]\nbrokers = \"{}\"\n[kafka.source]\nenabled = {source}\nbatch_max_wait = \"10ms\"\n\
         [kafka.sink]\nenabled = {sink}\n[kafka.consumer.properties]\n\"session.timeout.ms\" = \"6000\"\n\"max.poll.interval.ms\" = \"8000\"\n\"statistics.interval.ms\" = \"500\"\n",
        broker.bootstrap
    )
}

async fn topics(broker: &Broker) {
    broker
        .create_topics(&[
            ("scans.raw", 3),
            ("scans.dlq", 1),
            ("shipments.status", 3),
            ("scand.changelog", 3),
            ("scand.members", 1),
        ])
        .await;
}

fn json_scan(s: &pb::Scan) -> Vec<u8> {
    let t = s.event_time.expect("time");
    let when =
        humantime::format_rfc3339(std::time::UNIX_EPOCH + Duration::from_secs(t.seconds as u64));
    serde_json::json!({
        "scan_id": s.scan_id,
        "tracking_number": s.tracking_number,
        "scan_type": pb::ScanType::try_from(s.scan_type).expect("type").as_str_name(),
        "event_time": when.to_string(),
        "location": {"facility_id": s.location.as_ref().map(|l| l.facility_id.clone()), "kind": "LOCATION_KIND_SORTING_FACILITY"},
        "source": "SOURCE_SORTER",
    })
    .to_string()
    .into_bytes()
}

/// Journeys for `n` shipments, shuffled, half as JSON (by header), with retries mixed in.
fn journeys(prefix: &str, n: usize) -> Vec<Record> {
    let mut records: Vec<Record> = Vec::new();
    for s in 0..n {
        let number = format!("{prefix}{s:06}");
        for scan in journey(&number, &format!("{number}-k")) {
            if s % 2 == 0 {
                records.push((
                    number.clone(),
                    json_scan(&scan),
                    vec![("content-type", "application/json")],
                ));
            } else {
                records.push((number.clone(), scan.encode_to_vec(), vec![]));
            }
        }
    }
    let mut x = 0x2545_f491_4f6c_dd1du64;
    for i in (1..records.len()).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        records.swap(i, (x % (i as u64 + 1)) as usize);
    }
    let retries: Vec<Record> = records.iter().step_by(9).cloned().collect();
    records.extend(retries);
    records
}

async fn wait_all_delivered(
    daemon: &Daemon,
    prefix: &str,
    n: usize,
    timeout: Duration,
) -> HashMap<String, u64> {
    let mut tracking = daemon.tracking().await;
    let deadline = Instant::now() + timeout;
    let mut versions = HashMap::new();
    for s in 0..n {
        let number = format!("{prefix}{s:06}");
        loop {
            if let Ok(shipment) = get_shipment(&mut tracking, &number).await {
                if shipment.timeline.len() == JOURNEY.len() {
                    assert_eq!(shipment.status, pb::Status::Delivered as i32, "{number}");
                    versions.insert(number.clone(), shipment.version);
                    break;
                }
            }
            if Instant::now() > deadline {
                let kafka: Vec<String> = daemon
                    .metrics()
                    .lines()
                    .filter(|l| l.starts_with("scand_kafka") || l.starts_with("scand_scans"))
                    .map(str::to_owned)
                    .collect();
                panic!("{number} not complete in time; {kafka:#?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    versions
}

/// Submits a whole journey over gRPC for each of `n` shipments numbered `{prefix}{s:06}`, each
/// scan accepted.
async fn submit_journeys(daemon: &Daemon, prefix: &str, n: usize) {
    let mut ingest = daemon.ingest().await;
    for s in 0..n {
        let number = format!("{prefix}{s:06}");
        let ack = ingest
            .submit_scans(batch(&number, journey(&number, &number)))
            .await
            .expect("acked")
            .into_inner();
        assert_eq!(outcomes(&ack), vec![Outcome::Accepted; JOURNEY.len()]);
    }
}

/// Reads the status topic (`read_committed`) until every shipment's last version is there,
/// then checks that each shipment's changes are versions 1..=v in order, each exactly once,
/// and that no sequence of the publisher appears twice.
fn check_status_topic(broker: &Broker, versions: &HashMap<String, u64>) {
    let total: u64 = versions.values().sum();
    let messages = broker.consume_until("shipments.status", Duration::from_secs(60), |m| {
        let seen = by_key(m);
        m.len() as u64 >= total
            && versions.iter().all(|(k, v)| {
                seen.get(k).is_some_and(|list| {
                    list.iter()
                        .any(|x| header(x, "scand-version") == Some(v.to_string()))
                })
            })
    });
    let grouped = by_key(&messages);
    for (number, last) in versions {
        let list = grouped
            .get(number)
            .unwrap_or_else(|| panic!("{number}: no status changes published"));
        let mut expected = 1u64;
        for m in list {
            let change =
                pb::StatusChange::decode(m.payload().expect("payload")).expect("StatusChange");
            assert_eq!(change.tracking_number, *number);
            assert_eq!(header(m, "scand-version"), Some(change.version.to_string()));
            assert_eq!(header(m, "scand-journey"), Some(change.journey.to_string()));
            assert_eq!(
                header(m, "scand-sequence"),
                Some(change.sequence.to_string())
            );
            assert!(
                change.version >= expected,
                "{number} v{}: published twice: {:?}",
                change.version,
                list.iter()
                    .map(|m| (m.partition(), m.offset(), header(m, "scand-sequence")))
                    .collect::<Vec<_>>()
            );
            assert_eq!(
                change.version, expected,
                "{number}: version gap or disorder"
            );
            expected += 1;
        }
        assert_eq!(expected - 1, *last, "{number}: last published version");
    }
    let mut sequences = HashSet::new();
    for m in &messages {
        let key = (header(m, "scand-publisher"), header(m, "scand-sequence"));
        assert!(sequences.insert(key.clone()), "{key:?} published twice");
    }
}

/// Waits until A and B own the 3 partitions between them, each some.
async fn wait_shared(a: &Daemon, b: &Daemon, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let owned_a = metric_value(&a.metrics(), "scand_kafka_partitions_assigned");
        let owned_b = metric_value(&b.metrics(), "scand_kafka_partitions_assigned");
        if owned_a > 0 && owned_b > 0 && owned_a + owned_b == 3 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "partitions not shared: A owns {owned_a}, B owns {owned_b}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn metric_value(text: &str, series: &str) -> u64 {
    text.lines()
        .find(|l| l.starts_with(series))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn journeys_from_kafka_are_applied_dead_lettered_and_published_in_version_order() {
    let broker = Broker::start();
    topics(&broker).await;
    let mut records = journeys("KIN", 40);
    let future = pb::Scan {
        event_time: Some(prost_types::Timestamp {
            seconds: minutes_ago(0).seconds + 86_400,
            nanos: 0,
        }),
        ..scan(
            "future-1",
            "KIN000000",
            ScanType::Sorted,
            minutes_ago(0),
            "hub-x",
        )
    };
    let poison: Vec<Record> = vec![
        ("KIN000001".into(), vec![0xff, 0xfe, 0x00, 0x01], vec![]),
        ("garbage".into(), b"not a scan".to_vec(), vec![]),
        (
            "KIN000002".into(),
            br#"{"scan_id":"j1","scan_type":"SCAN_TYPE_TELEPORTED"}"#.to_vec(),
            vec![("content-type", "application/json")],
        ),
        (
            "KIN000000".into(),
            future.encode_to_vec(),
            vec![("trace", "abc")],
        ),
    ];
    records.splice(17..17, poison);
    broker.produce("scans.raw", &records).await;

    let dir = tempfile::tempdir().expect("tempdir");
    let daemon = Daemon::start(&dir.path().join("data"), &kafka_config(&broker, true, true));
    let versions = wait_all_delivered(&daemon, "KIN", 40, Duration::from_secs(90)).await;
    check_status_topic(&broker, &versions);

    let dead = broker.consume_until("scans.dlq", Duration::from_secs(30), |m| m.len() >= 4);
    let mut reasons: Vec<String> = dead
        .iter()
        .map(|m| header(m, "scand-reason").expect("reason header"))
        .collect();
    reasons.sort();
    let codes: Vec<&str> = reasons
        .iter()
        .map(|r| r.split(':').next().unwrap_or_default())
        .collect();
    assert_eq!(
        codes,
        vec![
            "event_time_in_future",
            "json_decode",
            "protobuf_decode",
            "protobuf_decode"
        ],
        "{reasons:?}"
    );
    for m in &dead {
        assert_eq!(
            header(m, "scand-source-topic").as_deref(),
            Some("scans.raw")
        );
        assert!(
            header(m, "scand-source-partition").is_some()
                && header(m, "scand-source-offset").is_some()
        );
    }
    let future_letter = dead
        .iter()
        .find(|m| m.key() == Some(b"KIN000000".as_slice()))
        .expect("rejected scan dead-lettered");
    assert_eq!(
        future_letter.payload(),
        Some(future.encode_to_vec().as_slice()),
        "original value kept"
    );
    assert_eq!(
        header(future_letter, "trace").as_deref(),
        Some("abc"),
        "original headers kept"
    );

    // A scan already taken from Kafka is a duplicate over gRPC.
    let mut ingest = daemon.ingest().await;
    let again = journey("KIN000001", "KIN000001-k").remove(3);
    let ack = ingest
        .submit_scans(batch("x", vec![again]))
        .await
        .expect("submit")
        .into_inner();
    assert_eq!(outcomes(&ack), vec![Outcome::Duplicate]);

    // librdkafka reports lag with its statistics (every 500 ms here).
    let expected = [
        "scand_kafka_dead_letters_total{reason=\"protobuf_decode\"} 2",
        "scand_kafka_dead_letters_total{reason=\"json_decode\"} 1",
        "scand_kafka_dead_letters_total{reason=\"event_time_in_future\"} 1",
        "scand_outbox_pending 0",
        "scand_kafka_records_total{topic=\"scans.raw\"}",
        "scand_publish_total{sink=\"kafka\",result=\"ok\"}",
        "scand_publish_latency_seconds_bucket",
        "scand_kafka_consumer_lag_records{topic=\"scans.raw\",partition=\"0\"} 0",
        "scand_kafka_consumer_lag_seconds{topic=\"scans.raw\",partition=\"0\"} 0",
        "scand_kafka_partitions_assigned 3",
    ];
    let metrics = daemon
        .metrics_showing(&expected, Duration::from_secs(10))
        .await;
    for line in expected {
        assert!(metrics.contains(line), "{line} missing:\n{metrics}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_consumption_resumes_exactly_where_the_state_was() {
    let broker = Broker::start();
    topics(&broker).await;
    broker.produce("scans.raw", &journeys("KCR", 300)).await;

    let dir = tempfile::tempdir().expect("tempdir");
    // Small batches and one batch per write: many offset commits for the kill to land between.
    let config = kafka_config(&broker, true, true).replace(
        "batch_max_wait = \"10ms\"",
        "batch_max_wait = \"10ms\"\nbatch_max_records = 50",
    );
    let mut daemon = Daemon::start_with_env(
        &dir.path().join("data"),
        &config,
        &[
            ("SCAND_STORE__QUEUE_BATCHES", "2"),
            ("SCAND_STORE__GROUP_COMMIT_BATCHES", "1"),
        ],
    );
    // Kill once a quarter of the records were consumed.
    let total = journeys("KCR", 300).len() as u64;
    let consumed = loop {
        let n = metric_value(
            &daemon.metrics(),
            "scand_kafka_records_total{topic=\"scans.raw\"}",
        );
        if n >= total / 4 {
            break n;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    daemon.kill();
    eprintln!("killed after {consumed} of {total} records");
    assert!(consumed < total, "consumption finished before the kill");
    // A fresh consumer group: scand resumes where its replicated state ends whatever the
    // group, and tansu 0.6 can leave a restarted member of the old group without partitions for
    // minutes while the killed member is still registered (docs/RELIABILITY.md).
    let daemon = daemon.restart_with_env(&[("SCAND_KAFKA__SOURCE__GROUP_ID", "scand-restarted")]);
    let versions = wait_all_delivered(&daemon, "KCR", 300, Duration::from_secs(120)).await;
    check_status_topic(&broker, &versions);
    // Nothing consumed before the kill was applied twice: the only scan-id duplicates are the
    // retries in the workload itself (every 9th record) and the records read again because
    // their state had not reached the changelog, all answered from the state.
    let retries = journeys("KCR", 300).len() - 300 * JOURNEY.len();
    let metrics = daemon.metrics();
    let duplicates = metric_value(&metrics, "scand_scans_duplicate_total{kind=\"scan_id\"}");
    let reread = metric_value(&metrics, "scand_kafka_records_reread_total ");
    assert!(
        duplicates <= retries as u64 + reread,
        "{duplicates} duplicates after restart; the workload has {retries} retries, {reread} \
         records were read again"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_changes_reach_kafka_in_order_after_the_broker_stalls_under_grpc_load() {
    let broker = Broker::start();
    topics(&broker).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let daemon = Daemon::start(
        &dir.path().join("data"),
        &kafka_config(&broker, false, true),
    );
    let mut ingest = daemon.ingest().await;
    let n = 60;
    for s in 0..n {
        let number = format!("KBR{s:06}");
        if s == n / 3 {
            broker.pause();
        }
        let ack = ingest
            .submit_scans(batch(&number, journey(&number, &number)))
            .await
            .expect("acked while the broker is away")
            .into_inner();
        assert_eq!(outcomes(&ack), vec![Outcome::Accepted; JOURNEY.len()]);
    }
    let pending = daemon.metrics();
    assert!(
        !pending.contains("scand_outbox_pending 0\n"),
        "the backlog shows while the broker stalls"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    broker.resume();
    let versions = wait_all_delivered(&daemon, "KBR", n, Duration::from_secs(10)).await;
    check_status_topic(&broker, &versions);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(feature = "failpoints"),
    ignore = "needs the failpoints feature: cargo test --features scand/failpoints"
)]
async fn a_publisher_killed_between_delivery_and_its_cursor_publishes_each_change_once() {
    let broker = Broker::start();
    topics(&broker).await;
    let dir = tempfile::tempdir().expect("tempdir");
    // The scans are stored while the sink is off, so its whole backlog lies ahead of it.
    let daemon = Daemon::start_with_env(
        &dir.path().join("data"),
        &kafka_config(&broker, false, true),
        &[
            ("SCAND_KAFKA__SINK__ENABLED", "false"),
            ("SCAND_KAFKA__SINK__MAX_IN_FLIGHT", "20"),
        ],
    );
    let n = 40;
    submit_journeys(&daemon, "KPK", n).await;
    // With the sink on, the third chunk is delivered and the process aborts before storing
    // the cursor: without reading the topic's tail, the next start publishes it again.
    let (daemon, status) = daemon
        .restart_until_exit(
            &[
                ("SCAND_KAFKA__SINK__ENABLED", "true"),
                ("FAILPOINTS", "sink-delivered=2*off->return"),
            ],
            Duration::from_secs(60),
        )
        .await;
    assert!(
        !status.success(),
        "the sink aborts after a delivery: {status:?}"
    );
    let daemon = daemon.restart_with_env(&[("FAILPOINTS", "sink-delivered=off")]);
    let versions = wait_all_delivered(&daemon, "KPK", n, Duration::from_secs(30)).await;
    check_status_topic(&broker, &versions);
    let published = metric_value(
        &daemon.metrics(),
        "scand_publish_total{sink=\"kafka\",result=\"ok\"}",
    );
    let total: u64 = versions.values().sum();
    assert_eq!(
        published,
        total - 60,
        "the last life publishes what the first had not: all but three chunks of 20"
    );
}

/// A graceful stop publishes what is still pending: an instance removed for good leaves no
/// change behind. The sink is slowed (a pause after each chunk of 10), so SIGTERM comes while
/// most of the changes are unpublished; the topic then holds every version, with no restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(feature = "failpoints"),
    ignore = "needs the failpoints feature: cargo test --features scand/failpoints"
)]
async fn a_graceful_stop_publishes_every_pending_change_first() {
    let broker = Broker::start();
    topics(&broker).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut daemon = Daemon::start_with_env(
        &dir.path().join("data"),
        &kafka_config(&broker, false, true),
        &[
            ("SCAND_KAFKA__SINK__MAX_IN_FLIGHT", "10"),
            ("FAILPOINTS", "sink-delivered=sleep(150)"),
        ],
    );
    let n = 12;
    submit_journeys(&daemon, "KGS", n).await;
    let versions = wait_all_delivered(&daemon, "KGS", n, Duration::from_secs(30)).await;
    let total: u64 = versions.values().sum();
    let published = || {
        metric_value(
            &daemon.metrics(),
            "scand_publish_total{sink=\"kafka\",result=\"ok\"}",
        )
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while published() == 0 {
        assert!(Instant::now() < deadline, "the sink never published");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let published_before = metric_value(
        &daemon.metrics(),
        "scand_publish_total{sink=\"kafka\",result=\"ok\"}",
    );
    assert!(
        published_before < total,
        "the stop comes with changes pending ({published_before} of {total} published)"
    );
    assert!(daemon.terminate().await.success(), "stops cleanly");
    check_status_topic(&broker, &versions);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_forwards_grpc_scans_to_the_partition_owner() {
    let broker = Broker::start();
    topics(&broker).await;
    let owner_dir = tempfile::tempdir().expect("tempdir");
    let owner = Daemon::start(
        &owner_dir.path().join("data"),
        &kafka_config(&broker, true, false),
    );
    let gateway_dir = tempfile::tempdir().expect("tempdir");
    let gateway = Daemon::start(
        &gateway_dir.path().join("data"),
        &(kafka_config(&broker, false, false) + "[kafka.gateway]\nenabled = true\n"),
    );
    let mut ingest = gateway.ingest().await;
    let mut scans = journey("KGW000000", "gw");
    scans.push(scan(
        "",
        "KGW000000",
        ScanType::Sorted,
        minutes_ago(1),
        "hub",
    ));
    let ack = ingest
        .submit_scans(batch("gw", scans))
        .await
        .expect("forwarded")
        .into_inner();
    let mut want = vec![Outcome::Accepted; JOURNEY.len()];
    want.push(Outcome::Rejected);
    assert_eq!(outcomes(&ack), want);
    let versions = wait_all_delivered(&owner, "KGW", 1, Duration::from_secs(30)).await;
    assert_eq!(versions["KGW000000"], 7);
    // The gateway applied nothing itself.
    let mut tracking = gateway.tracking().await;
    let local = get_shipment(&mut tracking, "KGW000000").await;
    assert_eq!(
        local.expect_err("not stored on the gateway").code(),
        tonic::Code::NotFound
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_moving_to_a_new_instance_takes_its_shipments_state_along() {
    let broker = Broker::start();
    topics(&broker).await;
    let n = 30;
    let mut early: Vec<Record> = Vec::new();
    let mut late: Vec<Record> = Vec::new();
    for s in 0..n {
        let number = format!("KRB{s:06}");
        for (i, scan) in journey(&number, &number).into_iter().enumerate() {
            let record = (number.clone(), scan.encode_to_vec(), vec![]);
            if i < 4 {
                early.push(record)
            } else {
                late.push(record)
            }
        }
    }
    broker.produce("scans.raw", &early).await;
    let config = kafka_config(&broker, true, true);
    let dir_a = tempfile::tempdir().expect("tempdir");
    let a = Daemon::start(&dir_a.path().join("data"), &config);
    let mut tracking_a = a.tracking().await;
    for s in 0..n {
        let number = format!("KRB{s:06}");
        let deadline = Instant::now() + Duration::from_secs(60);
        while get_shipment(&mut tracking_a, &number)
            .await
            .map(|x| x.timeline.len())
            .unwrap_or(0)
            < 4
        {
            assert!(
                Instant::now() < deadline,
                "{number}: first half not applied by A"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    // B joins the group: the partitions it takes bring their shipments' state from A.
    let dir_b = tempfile::tempdir().expect("tempdir");
    let b = Daemon::start(&dir_b.path().join("data"), &config);
    wait_shared(&a, &b, Duration::from_secs(60)).await;
    assert!(
        metric_value(&b.metrics(), "scand_kafka_restored_shipments_total") > 0,
        "B restored nothing"
    );
    broker.produce("scans.raw", &late).await;

    // Every shipment completes on its owner, history included, versions continuing across owners.
    let mut tracking_b = b.tracking().await;
    let mut versions = HashMap::new();
    for s in 0..n {
        let number = format!("KRB{s:06}");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let on_b = get_shipment(&mut tracking_b, &number)
                .await
                .ok()
                .filter(|x| x.timeline.len() == JOURNEY.len());
            let on_a = get_shipment(&mut tracking_a, &number)
                .await
                .ok()
                .filter(|x| x.timeline.len() == JOURNEY.len());
            if let Some(done) = on_b.or(on_a) {
                assert_eq!(done.status, pb::Status::Delivered as i32, "{number}");
                versions.insert(number.clone(), done.version);
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{number} not complete on its owner"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    check_status_topic(&broker, &versions);

    // Any instance answers for any number: the one not owning its partition asks the owner.
    for s in 0..n {
        let number = format!("KRB{s:06}");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let from_a = get_shipment(&mut tracking_a, &number).await;
            let from_b = get_shipment(&mut tracking_b, &number).await;
            match (from_a, from_b) {
                (Ok(a), Ok(b)) if a.timeline.len() == JOURNEY.len() => {
                    assert_eq!(a, b, "{number}: A and B answer alike");
                    break;
                }
                answers => assert!(
                    Instant::now() < deadline,
                    "{number}: not answered alike by both: {answers:?}"
                ),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    assert!(
        metric_value(&a.metrics(), "scand_kafka_partitions_assigned") > 0,
        "A kept some partitions, so both forwarded"
    );
}

/// Ownership is a fence: once B takes partitions from A, A keeps those shipments' state but
/// sweeps none of it, so every shipment stalls once, by its owner, under one version (without
/// the fence A and B each published a STALLED of the same version for B's shipments).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_partition_moves_only_its_new_owner_stalls_its_shipments() {
    const STALL_AFTER: Duration = Duration::from_secs(30);
    let broker = Broker::start();
    topics(&broker).await;
    let config = kafka_config(&broker, true, true)
        + &format!(
            "[stall]\nsweep_interval = \"1s\"\n[stall.thresholds]\nin_transit = \"{}s\"\n",
            STALL_AFTER.as_secs()
        );
    let n = 30;
    let numbers: Vec<String> = (0..n).map(|s| format!("KST{s:06}")).collect();
    let scanned = Instant::now();
    let records: Vec<Record> = numbers
        .iter()
        .map(|number| {
            let arrived = scan(
                &format!("{number}-a"),
                number,
                pb::ScanType::ArrivedAtFacility,
                minutes_ago(0),
                "hub-1",
            );
            (number.clone(), arrived.encode_to_vec(), vec![])
        })
        .collect();
    broker.produce("scans.raw", &records).await;
    let dir_a = tempfile::tempdir().expect("tempdir");
    let a = Daemon::start(&dir_a.path().join("data"), &config);
    let mut tracking_a = a.tracking().await;
    for number in &numbers {
        let deadline = Instant::now() + Duration::from_secs(30);
        while get_shipment(&mut tracking_a, number).await.is_err() {
            assert!(Instant::now() < deadline, "{number} not applied by A");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let dir_b = tempfile::tempdir().expect("tempdir");
    let b = Daemon::start(&dir_b.path().join("data"), &config);
    wait_shared(&a, &b, Duration::from_secs(60)).await;
    assert!(
        scanned.elapsed() < STALL_AFTER,
        "the rebalance took longer than the stall threshold: the test shows nothing"
    );

    // Each shipment stalls once, on its owner; a few sweeps more publish nothing else.
    let messages = broker.consume_until("shipments.status", Duration::from_secs(90), |m| {
        let stalled = m
            .iter()
            .filter(|x| {
                pb::StatusChange::decode(x.payload().unwrap_or_default())
                    .is_ok_and(|c| c.status == pb::Status::Stalled as i32)
            })
            .count();
        stalled >= n
    });
    tokio::time::sleep(Duration::from_secs(3)).await;
    let messages = broker.consume_until("shipments.status", Duration::from_secs(10), |m| {
        m.len() >= messages.len()
    });
    let grouped = by_key(&messages);
    for number in &numbers {
        let changes: Vec<(u64, i32)> = grouped
            .get(number)
            .unwrap_or_else(|| panic!("{number}: nothing published"))
            .iter()
            .map(|m| {
                let change =
                    pb::StatusChange::decode(m.payload().expect("payload")).expect("StatusChange");
                (change.version, change.status)
            })
            .collect();
        assert_eq!(
            changes,
            [
                (1, pb::Status::InTransit as i32),
                (2, pb::Status::Stalled as i32)
            ],
            "{number}"
        );
    }
    // Each shipment is stalled on one instance only: A keeps the state of the shipments it
    // lost, but not as stalled.
    let stalled_a = metric_value(&a.metrics(), "scand_shipments_stalled ");
    let stalled_b = metric_value(&b.metrics(), "scand_shipments_stalled ");
    assert_eq!(
        stalled_a + stalled_b,
        n as u64,
        "A {stalled_a}, B {stalled_b}"
    );
}

/// A changelog that refuses writes is retried and counted, and once it has refused them for
/// `kafka.unready_after` `/readyz` says so with the error; the scans consumed meanwhile are
/// applied all the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changelog_refusing_writes_makes_the_instance_unready_with_the_reason() {
    let broker = Broker::start();
    topics(&broker).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let config = kafka_config(&broker, true, false)
        .replace("[kafka.source]", "unready_after = \"2s\"\n[kafka.source]");
    let daemon = Daemon::start_with_env(
        &dir.path().join("data"),
        &config,
        &[("FAILPOINTS", "changelog-send=return")],
    );
    let records: Vec<Record> = journey("KCL000000", "cl")
        .iter()
        .map(|s| ("KCL000000".to_owned(), s.encode_to_vec(), vec![]))
        .collect();
    broker.produce("scans.raw", &records).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    let answer = loop {
        let (code, body) = http_get(daemon.admin, "/readyz").expect("readyz answers");
        if code == 503 {
            break body;
        }
        assert!(Instant::now() < deadline, "still ready: {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        answer.starts_with("not ready: changelog writes have failed for ")
            && answer.contains("Topic authorization failed"),
        "{answer}"
    );
    assert!(daemon.metric("scand_changelog_records_total{result=\"error\"}") > 0.0);
    let versions = wait_all_delivered(&daemon, "KCL", 1, Duration::from_secs(30)).await;
    assert_eq!(versions["KCL000000"], 7);
}

/// Exactly once across a move after a kill: A applies scans whose snapshots never reach the
/// changelog (its writes refused), so it publishes none of their changes; A is killed; B takes
/// every partition, finds nothing of those shipments on the changelog, reads their records
/// again and publishes each version; A, restarted, decides from the changelog that its changes
/// were void and publishes none of them. Without the changelog gating the sink, A published its
/// versions 1..4 and B the same ones again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(feature = "failpoints"),
    ignore = "needs the failpoints feature: cargo test --features scand/failpoints"
)]
async fn an_owner_killed_before_its_changes_reached_the_changelog_leaves_them_to_the_next_owner() {
    let broker = Broker::start();
    topics(&broker).await;
    let n = 12;
    let (mut early, mut late): (Vec<Record>, Vec<Record>) = (Vec::new(), Vec::new());
    for s in 0..n {
        let number = format!("KVD{s:06}");
        for (i, scan) in journey(&number, &number).into_iter().enumerate() {
            let record = (number.clone(), scan.encode_to_vec(), vec![]);
            if i < 4 {
                early.push(record);
            } else {
                late.push(record);
            }
        }
    }
    broker.produce("scans.raw", &early).await;
    let config = kafka_config(&broker, true, true);
    let dir_a = tempfile::tempdir().expect("tempdir");
    let mut a = Daemon::start_with_env(
        &dir_a.path().join("data"),
        &config,
        &[("FAILPOINTS", "changelog-send=return")],
    );
    let mut tracking_a = a.tracking().await;
    let mut derived_by_a = 0;
    for s in 0..n {
        let number = format!("KVD{s:06}");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let shipment = get_shipment(&mut tracking_a, &number).await.ok();
            if let Some(shipment) = shipment.filter(|x| x.timeline.len() == 4) {
                derived_by_a += shipment.version;
                break;
            }
            assert!(Instant::now() < deadline, "{number}: not applied by A");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        metric_value(
            &a.metrics(),
            "scand_publish_total{sink=\"kafka\",result=\"ok\"}"
        ),
        0,
        "nothing is published before the changelog holds it"
    );
    a.kill();

    // After A's session expired (tansu hands a dead member's partitions on only then).
    tokio::time::sleep(Duration::from_secs(8)).await;
    let dir_b = tempfile::tempdir().expect("tempdir");
    let b = Daemon::start(&dir_b.path().join("data"), &config);
    let deadline = Instant::now() + Duration::from_secs(60);
    while metric_value(&b.metrics(), "scand_kafka_partitions_assigned") < 3 {
        assert!(Instant::now() < deadline, "B did not take every partition");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    broker.produce("scans.raw", &late).await;
    let versions = wait_all_delivered(&b, "KVD", n, Duration::from_secs(60)).await;

    let a = a.restart_with_env(&[("FAILPOINTS", "changelog-send=off")]);
    wait_shared(&a, &b, Duration::from_secs(60)).await;
    assert_eq!(
        metric_value(&a.metrics(), "scand_status_changes_void_total"),
        derived_by_a,
        "A's changes were decided void at its start"
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    check_status_topic(&broker, &versions);
    assert_eq!(
        metric_value(
            &a.metrics(),
            "scand_publish_total{sink=\"kafka\",result=\"ok\"}"
        ),
        0,
        "A published none of the changes it derived"
    );
}

/// The partitioning contract: a record on a partition its tracking number does not belong to
/// (its producer keyed it by something else) is produced again, keyed by the number, to the
/// partition Kafka's default partitioner gives the number, and applied from there, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_on_another_partition_than_its_numbers_is_rerouted_there() {
    let broker = Broker::start();
    topics(&broker).await;
    let number = "KRR000000";
    let belongs = scand::kafka::partition_of(number.as_bytes(), 3);
    let wrong = (belongs + 1) % 3;
    let records: Vec<Record> = journey(number, "rr")
        .iter()
        .map(|s| ("order-4711".to_owned(), s.encode_to_vec(), vec![]))
        .collect();
    broker.produce_to("scans.raw", Some(wrong), &records).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let daemon = Daemon::start(&dir.path().join("data"), &kafka_config(&broker, true, true));
    let versions = wait_all_delivered(&daemon, "KRR", 1, Duration::from_secs(60)).await;
    assert_eq!(versions[number], 7);
    check_status_topic(&broker, &versions);
    assert_eq!(
        metric_value(&daemon.metrics(), "scand_kafka_records_rerouted_total"),
        JOURNEY.len() as u64
    );
    let rerouted = broker.consume_until("scans.raw", Duration::from_secs(30), |m| {
        m.len() >= 2 * JOURNEY.len()
    });
    let moved: Vec<&rdkafka::message::OwnedMessage> = rerouted
        .iter()
        .filter(|m| m.key() == Some(number.as_bytes()))
        .collect();
    assert_eq!(moved.len(), JOURNEY.len());
    for m in moved {
        assert_eq!(m.partition(), belongs);
        assert_eq!(
            header(m, "scand-reason"),
            Some(format!(
                "rerouted: tracking number {number} belongs to partition {belongs}, not {wrong}; \
                 key scans by the normalized tracking number"
            ))
        );
    }
}

/// Runs scand with the Kafka source replicating to `changelog` and expects it to refuse to
/// start: returns what it said.
fn refused_at_start(broker: &Broker, changelog: &str) -> String {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("scand.toml");
    let toml = format!(
        "[grpc]\nlisten = \"127.0.0.1:{}\"\n[admin]\nlisten = \"127.0.0.1:{}\"\n[store]\npath = \"{}\"\n{}",
        free_port(),
        free_port(),
        dir.path().join("data").display(),
        kafka_config(broker, true, false).replace(
            "batch_max_wait = \"10ms\"",
            &format!("batch_max_wait = \"10ms\"\nchangelog_topic = \"{changelog}\""),
        )
    );
    std::fs::write(&config, toml).expect("write config");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_scand"))
        .args(["run", "--config"])
        .arg(&config)
        .env("RUST_LOG", "error")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn scand");
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("scand started with changelog topic {changelog:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let output = child.wait_with_output().expect("output");
    assert!(!output.status.success(), "{changelog}: exit status");
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// A changelog that could not hand partition state on is refused at start, with the reason:
/// missing, not compacted, or with fewer partitions than the scans topic; and so is a missing
/// members topic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changelog_that_cannot_replicate_is_refused_at_start() {
    let broker = Broker::start();
    broker
        .create_topics(&[
            ("scans.raw", 3),
            ("narrow.changelog", 2),
            ("scand.retained", 3),
            ("scand.changelog", 3),
        ])
        .await;
    let missing = refused_at_start(&broker, "absent.changelog");
    assert!(
        missing.contains("changelog topic \"absent.changelog\" does not exist"),
        "{missing}"
    );
    let deleting = refused_at_start(&broker, "scand.retained");
    assert!(
        deleting.contains("\"scand.retained\" has cleanup.policy=delete: it must be compact"),
        "{deleting}"
    );
    let narrow = refused_at_start(&broker, "narrow.changelog");
    assert!(
        narrow.contains(
            "\"narrow.changelog\" has 2 partitions, fewer than the 3 of scans topic \"scans.raw\""
        ),
        "{narrow}"
    );
    let no_members = refused_at_start(&broker, "scand.changelog");
    assert!(
        no_members.contains("members topic \"scand.members\" does not exist"),
        "{no_members}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unwritable_dead_letter_topic_holds_the_partition_instead_of_dropping() {
    let broker = Broker::start();
    topics(&broker).await;
    let number = "KDL000000";
    let mut records: Vec<Record> = vec![(number.into(), b"poison".to_vec(), vec![])];
    records.extend(
        journey(number, "dl")
            .iter()
            .map(|s| (number.to_owned(), s.encode_to_vec(), vec![])),
    );
    broker.produce("scans.raw", &records).await;

    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let broken = kafka_config(&broker, true, false).replace(
        "batch_max_wait = \"10ms\"",
        "batch_max_wait = \"10ms\"\ndead_letter_topic = \"no such topic!\"",
    ) + "[kafka.producer.properties]\n\"message.timeout.ms\" = \"500\"\n";
    let mut daemon = Daemon::start(&data, &broken);
    let deadline = Instant::now() + Duration::from_secs(30);
    while metric_value(&daemon.metrics(), "scand_kafka_dead_letter_errors_total") == 0 {
        assert!(
            Instant::now() < deadline,
            "dead-letter failure not reported"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The batch holding the poison waits: nothing behind it is applied or committed.
    let mut tracking = daemon.tracking().await;
    let held = get_shipment(&mut tracking, number).await;
    assert_eq!(
        held.expect_err("held behind the poison").code(),
        tonic::Code::NotFound
    );
    daemon.kill();

    // With a writable dead-letter topic, the poison goes there and the rest is applied.
    let daemon = Daemon::start(&data, &kafka_config(&broker, true, false));
    let versions = wait_all_delivered(&daemon, "KDL", 1, Duration::from_secs(60)).await;
    assert_eq!(versions[number], 7);
    let dead = broker.consume_until("scans.dlq", Duration::from_secs(30), |m| !m.is_empty());
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].payload(), Some(b"poison".as_slice()));
}

/// Polls `/readyz` until its answer satisfies `want`; the last answer.
async fn readiness_until(
    daemon: &Daemon,
    within: Duration,
    want: impl Fn(u16, &str) -> bool,
) -> (u16, String) {
    let deadline = Instant::now() + within;
    loop {
        let answer = http_get(daemon.admin, "/readyz").unwrap_or((0, String::new()));
        if want(answer.0, &answer.1) || Instant::now() >= deadline {
            return answer;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_down_for_a_minute_during_a_rebalance_loses_nothing_and_repeats_nothing() {
    let broker = Broker::start();
    topics(&broker).await;
    let config = kafka_config(&broker, true, true);
    let env = [("SCAND_KAFKA__UNREADY_AFTER", "5s")];
    let journeys = |prefix: &str| -> Vec<Record> {
        (0..20)
            .flat_map(|s| {
                let number = format!("{prefix}{s:06}");
                journey(&number, &number)
                    .into_iter()
                    .map(move |scan| (scan.tracking_number.clone(), scan.encode_to_vec(), vec![]))
            })
            .collect()
    };
    broker.produce("scans.raw", &journeys("KDA")).await;
    let dir_a = tempfile::tempdir().expect("tempdir");
    let a = Daemon::start_with_env(&dir_a.path().join("data"), &config, &env);
    wait_all_delivered(&a, "KDA", 20, Duration::from_secs(60)).await;

    // B joins, and the broker stops answering while the group rebalances.
    let dir_b = tempfile::tempdir().expect("tempdir");
    let b = Daemon::start_with_env(&dir_b.path().join("data"), &config, &env);
    broker.pause();
    let outage = Instant::now();
    for (name, daemon) in [("A", &a), ("B", &b)] {
        let (code, body) =
            readiness_until(daemon, Duration::from_secs(40), |code, _| code == 503).await;
        assert_eq!(code, 503, "{name} says ready with the broker down: {body}");
        assert!(
            body.contains("members topic writes have failed"),
            "{name}'s reason: {body}"
        );
    }
    tokio::time::sleep(Duration::from_secs(60).saturating_sub(outage.elapsed())).await;
    broker.resume();

    // Back: both ready again, the partitions spread, new scans applied once, nothing lost.
    for (name, daemon) in [("A", &a), ("B", &b)] {
        let (code, body) =
            readiness_until(daemon, Duration::from_secs(60), |code, _| code == 200).await;
        assert_eq!(
            code, 200,
            "{name} not ready after the broker came back: {body}"
        );
    }
    broker.produce("scans.raw", &journeys("KDB")).await;
    wait_shared(&a, &b, Duration::from_secs(90)).await;
    let mut versions = wait_all_delivered(&a, "KDA", 20, Duration::from_secs(60)).await;
    versions.extend(wait_all_delivered(&b, "KDB", 20, Duration::from_secs(90)).await);
    check_status_topic(&broker, &versions);
}
