//! Bad input against the real daemon: each scan gets a precise reason, nothing crashes,
//! nothing good in the same batch is lost, and oversized calls fail with the limit named.

mod common;

use common::*;
use scand::proto::pb::{self, Outcome, ScanType};
use tonic::Code;

#[tokio::test]
async fn each_bad_scan_is_rejected_with_its_reason_and_good_ones_are_kept() {
    let dir = tempfile::tempdir().expect("tempdir");
    let daemon = Daemon::start(&dir.path().join("data"), "");
    let mut ingest = daemon.ingest().await;
    let ok = || {
        scan(
            "ok",
            "PARCEL0100",
            ScanType::Sorted,
            minutes_ago(5),
            "hub-1",
        )
    };
    let future = prost_types::Timestamp {
        seconds: minutes_ago(0).seconds + 3600,
        nanos: 0,
    };
    let ancient = prost_types::Timestamp {
        seconds: minutes_ago(0).seconds - 91 * 86_400,
        nanos: 0,
    };
    let cases: Vec<(pb::Scan, &str)> = vec![
        (
            pb::Scan {
                scan_id: String::new(),
                ..ok()
            },
            "missing_scan_id: ",
        ),
        (
            pb::Scan {
                tracking_number: String::new(),
                scan_id: "e1".into(),
                ..ok()
            },
            "missing_tracking_number: ",
        ),
        (
            pb::Scan {
                tracking_number: "ABC".into(),
                scan_id: "e2".into(),
                ..ok()
            },
            "tracking_number_length: ",
        ),
        (
            pb::Scan {
                tracking_number: "PARCEL_0100".into(),
                scan_id: "e3".into(),
                ..ok()
            },
            "tracking_number_charset: ",
        ),
        (
            pb::Scan {
                scan_type: 0,
                scan_id: "e4".into(),
                ..ok()
            },
            "unspecified_scan_type: ",
        ),
        (
            pb::Scan {
                scan_type: 42,
                scan_id: "e5".into(),
                ..ok()
            },
            "unknown_scan_type: scan_type 42",
        ),
        (
            pb::Scan {
                event_time: None,
                scan_id: "e6".into(),
                ..ok()
            },
            "missing_event_time: ",
        ),
        (
            pb::Scan {
                event_time: Some(future),
                scan_id: "e7".into(),
                ..ok()
            },
            "event_time_in_future: ",
        ),
        (
            pb::Scan {
                event_time: Some(ancient),
                scan_id: "e8".into(),
                ..ok()
            },
            "event_time_too_old: ",
        ),
        (
            pb::Scan {
                scan_id: "e9".into(),
                location: Some(pb::Location {
                    facility_id: "hub".into(),
                    kind: 0,
                    latitude: Some(-91.0),
                    longitude: None,
                }),
                ..ok()
            },
            "latitude_out_of_range: ",
        ),
        (
            pb::Scan {
                scan_id: "e10".into(),
                location: Some(pb::Location {
                    facility_id: "hub".into(),
                    kind: 0,
                    latitude: None,
                    longitude: Some(181.0),
                }),
                ..ok()
            },
            "longitude_out_of_range: ",
        ),
    ];
    let mut scans: Vec<pb::Scan> = cases.iter().map(|(s, _)| s.clone()).collect();
    scans.push(ok());
    let ack = ingest
        .submit_scans(batch("mixed", scans))
        .await
        .expect("the call succeeds")
        .into_inner();
    assert_eq!(ack.results.len(), cases.len() + 1);
    for ((_, reason), result) in cases.iter().zip(&ack.results) {
        assert_eq!(result.outcome, Outcome::Rejected as i32, "{reason}");
        assert!(
            result.reason.starts_with(reason),
            "want {reason:?}, got {:?}",
            result.reason
        );
    }
    let last = ack.results.last().expect("good scan result");
    assert_eq!(
        (last.scan_id.as_str(), last.outcome, last.reason.as_str()),
        ("ok", Outcome::Accepted as i32, "")
    );

    let mut tracking = daemon.tracking().await;
    let shipment = get_shipment(&mut tracking, "PARCEL0100")
        .await
        .expect("the good scan is stored");
    assert_eq!(shipment.timeline.len(), 1);

    let metrics = daemon.metrics();
    for reason in [
        "missing_scan_id",
        "tracking_number_length",
        "unknown_scan_type",
        "event_time_in_future",
        "latitude_out_of_range",
    ] {
        let line = format!("scand_scans_rejected_total{{reason=\"{reason}\"}} 1");
        assert!(metrics.contains(&line), "{line} missing");
    }
}

#[tokio::test]
async fn oversized_batches_and_messages_fail_the_call_naming_the_limit() {
    let dir = tempfile::tempdir().expect("tempdir");
    let daemon = Daemon::start_with_env(
        &dir.path().join("data"),
        "[ingest]\nmax_batch_scans = 5\n",
        &[("SCAND_GRPC__MAX_MESSAGE_BYTES", "20000")],
    );
    let mut ingest = daemon.ingest().await;
    let scans = |n: usize, prefix: &str| -> Vec<pb::Scan> {
        (0..n)
            .map(|i| {
                scan(
                    &format!("{prefix}{i}"),
                    "PARCEL0200",
                    ScanType::Sorted,
                    minutes_ago(i as u64),
                    &format!("hub-{prefix}"),
                )
            })
            .collect()
    };

    let too_many = ingest
        .submit_scans(batch("six", scans(6, "a")))
        .await
        .expect_err("refused");
    assert_eq!(too_many.code(), Code::InvalidArgument);
    assert_eq!(
        too_many.message(),
        "batch has 6 scans; the limit is 5 (ingest.max_batch_scans): split it"
    );

    let mut huge = scans(1, "h");
    huge[0].attributes.insert("blob".into(), "x".repeat(30_000));
    let too_big = ingest
        .submit_scans(batch("huge", huge.clone()))
        .await
        .expect_err("refused");
    assert_eq!(too_big.code(), Code::ResourceExhausted, "{too_big:?}");
    assert!(
        too_big.message().contains("the limit is: 20000 bytes"),
        "{}",
        too_big.message()
    );

    // On a stream, the oversized batch fails the stream after earlier batches were answered.
    let outbound = tokio_stream::iter(vec![batch("fine", scans(2, "s")), batch("huge", huge)]);
    let mut acks = ingest
        .stream_scans(outbound)
        .await
        .expect("stream")
        .into_inner();
    let first = acks.message().await.expect("first ack").expect("present");
    assert_eq!(outcomes(&first), vec![Outcome::Accepted; 2]);
    let err = acks.message().await.expect_err("stream fails");
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");

    // The daemon is unharmed.
    let ack = ingest
        .submit_scans(batch("after", scans(5, "z")))
        .await
        .expect("accepted")
        .into_inner();
    assert_eq!(outcomes(&ack), vec![Outcome::Accepted; 5]);
}
