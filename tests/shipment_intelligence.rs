//! Stalled shipments and shipment flags against the real daemon: a shipment whose latest scan
//! is older than its status's threshold is published as STALLED by the sweep and moved on by a
//! later scan; regressions and clock-skewed scans are counted on the shipment and in metrics.

mod common;

use common::{batch, get_shipment, minutes_ago, outcomes, scan, take_changes, watch, Daemon};
use scand::proto::pb::{Outcome, ScanType, Status};

/// In transit stalls after 30 minutes without a scan; swept every 100 ms.
const STALL: &str =
    "[stall]\nsweep_interval = \"100ms\"\n[stall.thresholds]\nin_transit = \"30m\"\n\
                     out_for_delivery = \"0s\"\n";

#[tokio::test]
async fn a_shipment_without_scans_stalls_and_a_later_scan_moves_it_on() {
    let dir = tempfile::tempdir().expect("tempdir");
    let daemon = Daemon::start(&dir.path().join("data"), STALL);
    let mut ingest = daemon.ingest().await;
    let mut tracking = daemon.tracking().await;
    let mut feed = watch(&mut tracking, 0, Some("STUCK0001".into())).await;

    let ack = ingest
        .submit_scans(batch(
            "b1",
            vec![
                scan(
                    "s1",
                    "STUCK0001",
                    ScanType::PickedUp,
                    minutes_ago(90),
                    "wh-1",
                ),
                scan(
                    "s2",
                    "STUCK0001",
                    ScanType::Sorted,
                    minutes_ago(60),
                    "hub-1",
                ),
                // Out for delivery has no threshold ("0s"): never stalls.
                scan(
                    "f1",
                    "FINE00001",
                    ScanType::OutForDelivery,
                    minutes_ago(600),
                    "van",
                ),
            ],
        ))
        .await
        .expect("ack")
        .into_inner();
    assert_eq!(outcomes(&ack), vec![Outcome::Accepted; 3]);

    let changes = take_changes(&mut feed, 3).await;
    let summary: Vec<_> = changes
        .iter()
        .map(|c| {
            (
                c.version,
                c.status,
                c.stalled_status,
                c.cause_scan_id.as_str(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        vec![
            (1, Status::InTransit as i32, 0, "s1"),
            (2, Status::InTransit as i32, 0, "s2"),
            (3, Status::Stalled as i32, Status::InTransit as i32, ""),
        ]
    );
    assert_eq!(changes[2].sub_status, ScanType::Sorted as i32);
    assert_eq!(
        changes[2].event_time.map(|t| t.seconds),
        Some(minutes_ago(30).seconds),
        "a STALLED change is dated at the deadline that passed"
    );
    let stuck = get_shipment(&mut tracking, "STUCK0001")
        .await
        .expect("found");
    assert_eq!(
        (stuck.status, stuck.stalled_status, stuck.version),
        (Status::Stalled as i32, Status::InTransit as i32, 3)
    );
    let fine = get_shipment(&mut tracking, "FINE00001")
        .await
        .expect("found");
    assert_eq!(fine.status, Status::OutForDelivery as i32);
    assert!(daemon.metrics().contains("scand_shipments_stalled 1"));

    ingest
        .submit_scans(batch(
            "b2",
            vec![scan(
                "s3",
                "STUCK0001",
                ScanType::DepartedFacility,
                minutes_ago(1),
                "hub-1",
            )],
        ))
        .await
        .expect("ack");
    let [moved_on] = take_changes(&mut feed, 1).await.try_into().expect("one");
    assert_eq!(
        (
            moved_on.version,
            moved_on.previous_status,
            moved_on.previous_stalled_status,
            moved_on.status,
            moved_on.sub_status,
        ),
        (
            4,
            Status::Stalled as i32,
            Status::InTransit as i32,
            Status::InTransit as i32,
            ScanType::DepartedFacility as i32,
        )
    );
    let metrics = daemon.metrics();
    assert!(metrics.contains("scand_shipments_stalled 0"), "{metrics}");
    assert!(
        metrics.contains("scand_shipments_stalled_total{status=\"in_transit\"} 1"),
        "{metrics}"
    );
}

#[tokio::test]
async fn regressions_and_clock_skew_are_flagged_on_the_shipment() {
    let dir = tempfile::tempdir().expect("tempdir");
    let daemon = Daemon::start(&dir.path().join("data"), "");
    let mut ingest = daemon.ingest().await;
    let mut tracking = daemon.tracking().await;
    ingest
        .submit_scans(batch(
            "b1",
            vec![
                // Two days behind the server clock: accepted, flagged as clock skew.
                scan(
                    "r1",
                    "BACKWARD1",
                    ScanType::PickedUp,
                    minutes_ago(2 * 24 * 60),
                    "wh",
                ),
                scan(
                    "r2",
                    "BACKWARD1",
                    ScanType::OutForDelivery,
                    minutes_ago(50),
                    "van",
                ),
            ],
        ))
        .await
        .expect("ack");
    ingest
        .submit_scans(batch(
            "b2",
            vec![scan(
                "r3",
                "BACKWARD1",
                ScanType::ArrivedAtFacility,
                minutes_ago(20),
                "hub",
            )],
        ))
        .await
        .expect("ack");
    let shipment = get_shipment(&mut tracking, "BACKWARD1")
        .await
        .expect("found");
    assert_eq!(shipment.status, Status::InTransit as i32);
    assert_eq!(shipment.regressions, 1);
    assert_eq!(shipment.clock_skewed_scans, 1);
    let metrics = daemon.metrics();
    assert!(
        metrics.contains("scand_status_regressions_total 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("scand_scans_clock_skew_total 1"),
        "{metrics}"
    );
}

#[tokio::test]
async fn carriers_are_recognised_and_flagged_numbers_marked() {
    let dir = tempfile::tempdir().expect("tempdir");
    let daemon = Daemon::start(&dir.path().join("data"), "");
    let mut ingest = daemon.ingest().await;
    let mut tracking = daemon.tracking().await;
    let mut feed = watch(&mut tracking, 0, Some("1Z5R89390357567127".into())).await;
    let ack = ingest
        .submit_scans(batch(
            "b1",
            vec![
                scan(
                    "u1",
                    "1z5r 8939 0357 5671 27",
                    ScanType::PickedUp,
                    minutes_ago(9),
                    "wh",
                ),
                scan(
                    "u2",
                    "1Z5R89390357567128",
                    ScanType::PickedUp,
                    minutes_ago(9),
                    "wh",
                ),
                scan("u3", "PARCEL0001", ScanType::PickedUp, minutes_ago(9), "wh"),
            ],
        ))
        .await
        .expect("ack")
        .into_inner();
    assert_eq!(outcomes(&ack), vec![Outcome::Accepted; 3], "flag accepts");

    let ups = get_shipment(&mut tracking, "1Z5R89390357567127")
        .await
        .expect("found");
    assert_eq!(
        (
            ups.carrier.as_str(),
            ups.carrier_service.as_str(),
            ups.tracking_number_issue.as_str()
        ),
        ("ups", "UPS Ground", "")
    );
    let [change] = take_changes(&mut feed, 1).await.try_into().expect("one");
    assert_eq!(
        (change.carrier.as_str(), change.carrier_service.as_str()),
        ("ups", "UPS Ground")
    );
    let typo = get_shipment(&mut tracking, "1Z5R89390357567128")
        .await
        .expect("found");
    assert_eq!(
        (typo.carrier.as_str(), typo.tracking_number_issue.as_str()),
        ("ups", "tracking_number_check_digit")
    );
    let unknown = get_shipment(&mut tracking, "PARCEL0001")
        .await
        .expect("found");
    assert_eq!(
        (
            unknown.carrier.as_str(),
            unknown.tracking_number_issue.as_str()
        ),
        ("", "tracking_number_unknown_format")
    );
    let metrics = daemon.metrics();
    for line in [
        "scand_tracking_numbers_flagged_total{reason=\"tracking_number_check_digit\"} 1",
        "scand_tracking_numbers_flagged_total{reason=\"tracking_number_unknown_format\"} 1",
    ] {
        assert!(metrics.contains(line), "{line} missing:\n{metrics}");
    }
}

#[tokio::test]
async fn the_reject_policy_refuses_bad_numbers_with_the_reason_and_custom_formats_pass() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = "[ingest.tracking_numbers]\npolicy = \"reject\"\n\
                  [[ingest.tracking_numbers.custom]]\ncarrier = \"acme\"\nname = \"acme_order\"\n\
                  regex = \"ORD(?<SerialNumber>[0-9]{8})(?<CheckDigit>[0-9])\"\n\
                  check_digit = { name = \"luhn\" }\n";
    let daemon = Daemon::start(&dir.path().join("data"), config);
    let mut ingest = daemon.ingest().await;
    let mut tracking = daemon.tracking().await;
    let ack = ingest
        .submit_scans(batch(
            "b1",
            vec![
                scan(
                    "r1",
                    "RB123456785GB",
                    ScanType::PickedUp,
                    minutes_ago(9),
                    "post",
                ),
                scan(
                    "r2",
                    "1Z5R89390357567128",
                    ScanType::PickedUp,
                    minutes_ago(9),
                    "wh",
                ),
                scan("r3", "PARCEL0001", ScanType::PickedUp, minutes_ago(9), "wh"),
                scan(
                    "r4",
                    "ORD123456782",
                    ScanType::PickedUp,
                    minutes_ago(9),
                    "shop",
                ),
            ],
        ))
        .await
        .expect("ack")
        .into_inner();
    assert_eq!(
        outcomes(&ack),
        vec![
            Outcome::Accepted,
            Outcome::Rejected,
            Outcome::Rejected,
            Outcome::Accepted
        ]
    );
    assert_eq!(
        ack.results[1].reason,
        "tracking_number_check_digit: tracking_number has the shape of a ups number but its check digit is wrong"
    );
    assert!(
        ack.results[2]
            .reason
            .starts_with("tracking_number_unknown_format: "),
        "{}",
        ack.results[2].reason
    );
    let s10 = get_shipment(&mut tracking, "RB123456785GB")
        .await
        .expect("found");
    assert_eq!(s10.carrier, "s10");
    let order = get_shipment(&mut tracking, "ORD123456782")
        .await
        .expect("found");
    assert_eq!(order.carrier, "acme");
}
