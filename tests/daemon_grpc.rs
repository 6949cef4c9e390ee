//! The real daemon over a real socket: ingest, dedup, order, status, query and the change feed.
//! Needs nothing but the built `scand` binary.

mod common;

use common::*;
use scand::proto::pb::{Outcome, ScanType, Status};
use tonic::Code;

#[tokio::test]
async fn journey_is_acked_ordered_queried_and_published() {
    let dir = tempfile::tempdir().expect("tempdir");
    let daemon = Daemon::start(&dir.path().join("data"), "");
    let mut ingest = daemon.ingest().await;
    let mut tracking = daemon.tracking().await;

    // The truck uploads out of order, in two batches, with a retry and a double read.
    let mut scans = journey("1z 999-aa1 0123 4567 84", "j");
    let delivered_at = scans[7].event_time;
    scans.reverse();
    let second_half = scans.split_off(4);
    let mut first = scans;
    first.push(first[0].clone()); // a retry of the delivered scan: same scan_id
    let mut double_read = first[1].clone(); // OUT_FOR_DELIVERY read again by a second device
    double_read.scan_id = "j-6-second-head".into();
    first.push(double_read);

    // The second batch goes out once the first is acked, so they are not committed together.
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let mut acks = ingest
        .stream_scans(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect("stream")
        .into_inner();
    tx.send(batch("b1", first)).await.expect("send b1");
    let ack1 = acks.message().await.expect("ack").expect("ack 1");
    tx.send(batch("b2", second_half)).await.expect("send b2");
    let ack2 = acks.message().await.expect("ack").expect("ack 2");
    drop(tx);
    assert!(acks.message().await.expect("clean end").is_none());

    assert_eq!(ack1.batch_id, "b1");
    assert_eq!(
        outcomes(&ack1),
        vec![
            Outcome::Accepted,
            Outcome::Accepted,
            Outcome::Accepted,
            Outcome::Accepted,
            Outcome::Duplicate,
            Outcome::Duplicate
        ]
    );
    assert!(
        ack1.results[4].reason.starts_with("duplicate_scan_id"),
        "{}",
        ack1.results[4].reason
    );
    assert!(
        ack1.results[5].reason.starts_with("duplicate_fingerprint"),
        "{}",
        ack1.results[5].reason
    );
    assert_eq!(
        ack1.results
            .iter()
            .map(|r| r.scan_id.as_str())
            .collect::<Vec<_>>(),
        vec!["j-7", "j-6", "j-5", "j-4", "j-7", "j-6-second-head"]
    );
    assert_eq!(outcomes(&ack2), vec![Outcome::Accepted; 4]);

    let shipment = get_shipment(&mut tracking, "1Z999AA10123456784")
        .await
        .expect("shipment");
    assert_eq!(shipment.tracking_number, "1Z999AA10123456784");
    assert_eq!(shipment.status, Status::Delivered as i32);
    assert_eq!(shipment.sub_status, ScanType::Unspecified as i32);
    let ids: Vec<&str> = shipment
        .timeline
        .iter()
        .map(|s| s.scan_id.as_str())
        .collect();
    assert_eq!(
        ids,
        vec!["j-0", "j-1", "j-2", "j-3", "j-4", "j-5", "j-6", "j-7"]
    );
    assert!(shipment
        .timeline
        .iter()
        .all(|s| s.tracking_number == "1Z999AA10123456784" && s.received_time.is_some()));
    // Batch 1 walked ARRIVED → DEPARTED → OUT_FOR_DELIVERY → DELIVERED; batch 2's earlier
    // scans only fill in history behind the terminal status.
    assert_eq!(shipment.version, 4);
    assert_eq!(shipment.scans_after_terminal, 0);

    let mut feed = watch(&mut tracking, 0, None).await;
    let changes = take_changes(&mut feed, 4).await;
    let seen: Vec<(u64, u64, i32, i32, i32, &str)> = changes
        .iter()
        .map(|c| {
            (
                c.sequence,
                c.version,
                c.previous_status,
                c.status,
                c.sub_status,
                c.cause_scan_id.as_str(),
            )
        })
        .collect();
    assert_eq!(
        seen,
        vec![
            (
                1,
                1,
                Status::Unspecified as i32,
                Status::InTransit as i32,
                ScanType::ArrivedAtFacility as i32,
                "j-4"
            ),
            (
                2,
                2,
                Status::InTransit as i32,
                Status::InTransit as i32,
                ScanType::DepartedFacility as i32,
                "j-5"
            ),
            (
                3,
                3,
                Status::InTransit as i32,
                Status::OutForDelivery as i32,
                ScanType::Unspecified as i32,
                "j-6"
            ),
            (
                4,
                4,
                Status::OutForDelivery as i32,
                Status::Delivered as i32,
                ScanType::Unspecified as i32,
                "j-7"
            ),
        ]
    );
    assert_eq!(
        changes[3].location.as_ref().map(|l| l.facility_id.as_str()),
        Some("door")
    );
    assert_eq!(changes[3].event_time, delivered_at);
}

#[tokio::test]
async fn milestones_in_one_batch_publish_in_sequence_and_the_feed_resumes_from_a_cursor() {
    let dir = tempfile::tempdir().expect("tempdir");
    let daemon = Daemon::start(&dir.path().join("data"), "");
    let mut ingest = daemon.ingest().await;
    let mut tracking = daemon.tracking().await;

    let mut feed = watch(&mut tracking, 0, Some("parcel-0002".into())).await;

    // Two shipments; the scans of each arrive shuffled in one bulk upload.
    let mut scans = journey("PARCEL-0001", "a");
    scans.extend(journey("PARCEL-0002", "b"));
    scans.reverse();
    let ack = ingest
        .submit_scans(batch("bulk", scans))
        .await
        .expect("submit")
        .into_inner();
    assert_eq!(outcomes(&ack), vec![Outcome::Accepted; 16]);

    // Only PARCEL0002's changes, live, every milestone in order.
    let live = take_changes(&mut feed, 7).await;
    let expected = [
        (Status::LabelCreated, ScanType::Unspecified),
        (Status::PickedPacked, ScanType::Unspecified),
        (Status::InTransit, ScanType::PickedUp),
        (Status::InTransit, ScanType::ArrivedAtFacility),
        (Status::InTransit, ScanType::DepartedFacility),
        (Status::OutForDelivery, ScanType::Unspecified),
        (Status::Delivered, ScanType::Unspecified),
    ];
    let seen: Vec<(i32, i32, u64)> = live
        .iter()
        .map(|c| (c.status, c.sub_status, c.version))
        .collect();
    let want: Vec<(i32, i32, u64)> = expected
        .iter()
        .enumerate()
        .map(|(i, (s, t))| (*s as i32, *t as i32, i as u64 + 1))
        .collect();
    assert_eq!(seen, want);
    assert!(live
        .iter()
        .all(|c| c.tracking_number == "PARCEL0002" && !c.regression && !c.correction));

    // The whole log: 14 changes, sequences 1..=14, each shipment's versions 1..=7.
    let mut all = watch(&mut tracking, 0, None).await;
    let log = take_changes(&mut all, 14).await;
    assert_eq!(
        log.iter().map(|c| c.sequence).collect::<Vec<_>>(),
        (1..=14).collect::<Vec<_>>()
    );
    for number in ["PARCEL0001", "PARCEL0002"] {
        let versions: Vec<u64> = log
            .iter()
            .filter(|c| c.tracking_number == number)
            .map(|c| c.version)
            .collect();
        assert_eq!(versions, (1..=7).collect::<Vec<_>>(), "{number}");
    }

    // A subscriber that saw up to sequence 9 resumes with exactly 10..=14, then live ones.
    let mut resumed = watch(&mut tracking, 9, None).await;
    let rest = take_changes(&mut resumed, 5).await;
    assert_eq!(rest, log[9..].to_vec());
    let late = ingest
        .submit_scans(batch(
            "rts",
            vec![scan(
                "a-rts",
                "PARCEL0001",
                ScanType::ReturnedToSender,
                minutes_ago(10),
                "hub-1",
            )],
        ))
        .await
        .expect("submit")
        .into_inner();
    assert_eq!(outcomes(&late), vec![Outcome::Accepted]);
    let next = take_changes(&mut resumed, 1).await;
    assert_eq!(
        (next[0].sequence, next[0].version, next[0].status),
        (15, 8, Status::ReturnedToSender as i32)
    );
    assert_eq!(next[0].previous_status, Status::Delivered as i32);
}

#[tokio::test]
async fn late_scan_after_delivery_is_kept_and_counted_but_does_not_move_the_status() {
    let dir = tempfile::tempdir().expect("tempdir");
    let daemon = Daemon::start(&dir.path().join("data"), "");
    let mut ingest = daemon.ingest().await;
    let mut tracking = daemon.tracking().await;
    ingest
        .submit_scans(batch("j", journey("PARCEL0003", "c")))
        .await
        .expect("submit");
    let ack = ingest
        .submit_scans(batch(
            "late",
            vec![scan(
                "c-late",
                "PARCEL0003",
                ScanType::ArrivedAtFacility,
                minutes_ago(5),
                "hub-9",
            )],
        ))
        .await
        .expect("submit")
        .into_inner();
    assert_eq!(outcomes(&ack), vec![Outcome::Accepted]);
    let shipment = get_shipment(&mut tracking, "PARCEL0003")
        .await
        .expect("shipment");
    assert_eq!(shipment.status, Status::Delivered as i32);
    assert_eq!(shipment.timeline.len(), 9);
    assert_eq!(
        shipment.timeline.last().map(|s| s.scan_id.as_str()),
        Some("c-late")
    );
    assert_eq!(shipment.scans_after_terminal, 1);
    assert!(daemon
        .metrics()
        .contains("scand_scans_after_terminal_total 1"));
}

#[tokio::test]
async fn unknown_shipment_is_not_found_and_a_malformed_number_is_invalid() {
    let dir = tempfile::tempdir().expect("tempdir");
    let daemon = Daemon::start(&dir.path().join("data"), "");
    let mut tracking = daemon.tracking().await;
    let missing = get_shipment(&mut tracking, "NOSUCH0001")
        .await
        .expect_err("not found");
    assert_eq!(missing.code(), Code::NotFound);
    let bad = get_shipment(&mut tracking, "no/such")
        .await
        .expect_err("invalid");
    assert_eq!(bad.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn health_and_reflection_are_served_and_metrics_are_exported() {
    let dir = tempfile::tempdir().expect("tempdir");
    let daemon = Daemon::start(&dir.path().join("data"), "");

    let channel = tonic::transport::Endpoint::from_shared(daemon.url())
        .expect("url")
        .connect()
        .await
        .expect("connect");
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    for service in ["", "scand.v1.ScanIngest", "scand.v1.Tracking"] {
        let reply = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: service.into(),
            })
            .await
            .expect("health")
            .into_inner();
        assert_eq!(
            reply.status,
            tonic_health::pb::health_check_response::ServingStatus::Serving as i32,
            "{service:?}"
        );
    }

    use tonic_reflection::pb::v1::{
        server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
        ServerReflectionRequest,
    };
    let mut reflection = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut replies = reflection
        .server_reflection_info(tokio_stream::iter(vec![request]))
        .await
        .expect("reflection")
        .into_inner();
    let reply = replies.message().await.expect("reply").expect("one reply");
    let Some(MessageResponse::ListServicesResponse(list)) = reply.message_response else {
        panic!("unexpected reply {reply:?}")
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for want in [
        "scand.v1.ScanIngest",
        "scand.v1.Tracking",
        "grpc.health.v1.Health",
    ] {
        assert!(
            names.iter().any(|n| n == want),
            "{want} missing from {names:?}"
        );
    }

    // Before anything happened, every series of a known label is there at zero.
    let fresh = daemon.metrics();
    for line in [
        "scand_scans_duplicate_total{kind=\"scan_id\"} 0",
        "scand_scans_duplicate_total{kind=\"fingerprint\"} 0",
        "scand_shipments_stalled_total{status=\"in_transit\"} 0",
        "scand_shipments_stalled_total{status=\"exception\"} 0",
        "scand_scans_rejected_total{reason=\"event_time_in_future\"} 0",
        "scand_status_changes_total{status=\"stalled\"} 0",
        "scand_scans_received_total{source=\"kafka\"} 0",
        "scand_scans_accepted_total 0",
    ] {
        assert!(
            fresh.contains(line),
            "{line} missing at start from:\n{fresh}"
        );
    }
    assert!(
        !fresh.contains("scand_shipments_stalled_total{status=\"delivered\"}"),
        "a delivered shipment never stalls"
    );

    let mut ingest = daemon.ingest().await;
    ingest
        .submit_scans(batch("m", journey("PARCEL0004", "m")))
        .await
        .expect("submit");
    let text = daemon.metrics();
    for line in [
        "scand_scans_received_total{source=\"grpc\"} 8",
        "scand_scans_accepted_total 8",
        "scand_status_changes_total{status=\"delivered\"} 1",
        "scand_ready 1",
        "scand_ingest_latency_seconds_bucket",
        "scand_ingest_batch_scans_bucket",
        "scand_feed_subscribers",
        "scand_rocksdb_size_bytes{cf=\"change_blocks\"}",
        "scand_rocksdb_memtable_bytes{cf=\"shipments\"}",
        "scand_rocksdb_pending_compaction_bytes",
        "scand_rocksdb_running_compactions",
        "scand_rocksdb_write_stall_ratio 0",
        "scand_rocksdb_block_cache_usage_bytes",
        "scand_rocksdb_block_cache_capacity_bytes 134217728",
        "scand_rocksdb_block_cache_hits_total",
        "scand_rocksdb_block_cache_misses_total",
        "scand_shipments_stalled 0",
    ] {
        assert!(text.contains(line), "{line} missing from:\n{text}");
    }
    assert_eq!(
        http_get(daemon.admin, "/healthz").map(|(c, _)| c),
        Some(200)
    );
}
