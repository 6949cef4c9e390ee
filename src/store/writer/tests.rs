use std::time::Duration;

use prost::Message;
use rocksdb::IteratorMode;
use tokio::sync::oneshot;

use super::changes::{tally, timestamp};
use super::commit::incoming;
use super::sweep::SWEEP_READ;
use super::*;
use crate::domain::Status;
use crate::domain::{ScanId, ScanType, TrackingNumber};
use crate::engine::{ShipmentState, States};
use crate::proto::pb;
use crate::store::{codec, keys};

const HOUR: i64 = 3_600_000_000;

#[test]
fn tally_counts_each_label_in_order_of_first_occurrence() {
    let labels = ["in_transit", "delivered", "in_transit", "in_transit"];
    assert_eq!(
        tally(labels.into_iter()),
        vec![("in_transit", 3), ("delivered", 1)]
    );
    assert_eq!(tally(std::iter::empty()), vec![]);
}

fn policy() -> StallPolicy {
    StallPolicy::new([
        (Status::InTransit, Duration::from_secs(48 * 3600)),
        (Status::OutForDelivery, Duration::from_secs(12 * 3600)),
    ])
}

/// Journeys closed 1000 hours ago, or idle for 2000, expire.
fn retention() -> RetentionPolicy {
    RetentionPolicy::new(
        Duration::from_secs(1000 * 3600),
        Duration::from_secs(2000 * 3600),
    )
}

fn scan(number: &str, id: &str, scan_type: ScanType, hours: i64) -> ValidScan {
    let event_time = EventTime(hours * HOUR);
    let tracking_number = TrackingNumber::parse(number).expect("valid");
    let scan_id = ScanId::parse(id).expect("valid");
    let mut wire = pb::Scan {
        scan_id: id.into(),
        tracking_number: number.into(),
        scan_type: scan_type.as_i32(),
        event_time: Some(timestamp(event_time)),
        ..Default::default()
    };
    ValidScan {
        stored: codec::encode_event(&mut wire),
        tracking_number,
        scan_id,
        scan_type,
        event_time,
        facility: 1,
        wire,
        origin: None,
        clock_skewed: false,
        number_check: None,
    }
}

async fn ingest(writer: &WriterHandle, scans: Vec<ValidScan>) {
    let answer = writer
        .enqueue(scans, Vec::new(), Instant::now())
        .await
        .expect("queued");
    answer.await.expect("answered").expect("durable");
}

fn shipment(store: &Store, number: &str) -> pb::Shipment {
    store
        .shipment(&TrackingNumber::parse(number).expect("valid"), None)
        .expect("read")
        .expect("exists")
}

/// One sorting scan at hour 0 for each shipment: in transit, due to stall at hour 48.
async fn ingest_in_transit(writer: &WriterHandle, numbers: &[&str]) {
    let scans = numbers
        .iter()
        .map(|number| scan(number, "a1", ScanType::Sorted, 0))
        .collect();
    ingest(writer, scans).await;
}

/// A writer replicating the partitions `ownership` says are owned, as `publisher`, with what
/// it hands the changelog.
fn spawn_replicating(
    store: &Store,
    ownership: &Ownership,
    publisher: u64,
) -> (
    WriterHandle,
    mpsc::Receiver<Replica>,
    std::thread::JoinHandle<()>,
) {
    let (snapshots, replicated) = mpsc::channel(1024);
    let (writer, _, thread) = spawn(
        store.clone(),
        Engine::new(Duration::from_secs(60)),
        (policy(), retention()),
        &crate::store::StoreConfig::default(),
        Some(Replication {
            snapshots,
            ownership: ownership.clone(),
            publisher,
        }),
    )
    .expect("spawns");
    (writer, replicated, thread)
}

fn spawn_writer(store: &Store) -> (WriterHandle, std::thread::JoinHandle<()>) {
    let (writer, _, thread) = spawn(
        store.clone(),
        Engine::new(Duration::from_secs(60)),
        (policy(), retention()),
        &crate::store::StoreConfig {
            queue_batches: 4,
            group_commit_batches: 4,
            ..crate::store::StoreConfig::default()
        },
        None,
    )
    .expect("spawns");
    (writer, thread)
}

#[tokio::test]
async fn late_scans_read_back_whole_in_timeline_order_with_the_earlier_ones() {
    let (_dir, store) = crate::store::tests::temp_store();
    let number = TrackingNumber::parse("PARCEL0001").expect("valid");
    let (writer, thread) = spawn_writer(&store);
    ingest(
        &writer,
        vec![scan("PARCEL0001", "old", ScanType::PickedUp, 5)],
    )
    .await;
    // One late scan before the old one, one after it.
    ingest(
        &writer,
        vec![
            scan("PARCEL0001", "new", ScanType::Sorted, 9),
            scan("PARCEL0001", "early", ScanType::LabelCreated, 1),
        ],
    )
    .await;
    let timeline = shipment(&store, "PARCEL0001").timeline;
    let ids: Vec<&str> = timeline.iter().map(|s| s.scan_id.as_str()).collect();
    assert_eq!(ids, ["early", "old", "new"]);
    assert_eq!(
        timeline[1],
        scan("PARCEL0001", "old", ScanType::PickedUp, 5).wire
    );
    let values = store.timeline_values(&number).expect("reads");
    assert_eq!(
        values,
        timeline
            .iter()
            .map(Message::encode_to_vec)
            .collect::<Vec<_>>()
    );
    assert_eq!(store.stored_scans().expect("reads"), 3);
    drop(writer);
    thread.join().expect("writer stops");
}

/// Deltas written group by group, merged by RocksDB on read, at flush (deltas combined
/// without their record) and at compaction, give the bytes of the record the engine's
/// state has after the same groups: late scans, fingerprint replacements (also within a
/// group) and duplicates included.
#[tokio::test]
async fn shipment_deltas_merge_into_the_record_of_the_engines_state() {
    let (_dir, store) = crate::store::tests::temp_store();
    let (writer, _, thread) = spawn(
        store.clone(),
        Engine::new(Duration::from_secs(60)),
        (StallPolicy::new([]), retention()),
        &crate::store::StoreConfig::default(),
        None,
    )
    .expect("spawns");
    let engine = Engine::new(Duration::from_secs(60));
    let mut expected = States::default();
    let types = [
        ScanType::LabelCreated,
        ScanType::Sorted,
        ScanType::DepartedFacility,
        ScanType::OutForDelivery,
    ];
    let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
    let mut next = |bound: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % bound
    };
    let shipments_cf = store.cf(keys::SHIPMENTS);
    let stored_records = |store: &Store, expected: &States| {
        expected
            .iter()
            .map(|(number, state)| {
                let key = keys::shipment_key(number);
                let merged = store
                    .db
                    .get_cf(store.cf(keys::SHIPMENTS), key)
                    .expect("reads")
                    .expect("stored");
                // The record's state, and its stored scans in timeline order.
                let scan_ids = |scans: Vec<Vec<u8>>| -> Vec<String> {
                    scans
                        .iter()
                        .map(|bytes| pb::Scan::decode(bytes.as_slice()).expect("scan"))
                        .map(|scan| scan.scan_id)
                        .collect()
                };
                // The deadline index entry is the writer's, not the engine's.
                let merged = (
                    ShipmentState {
                        stall_deadline: None,
                        ..codec::decode_shipment(key, &merged).expect("decodes")
                    },
                    scan_ids(store.timeline_values(number).expect("scans")),
                );
                let ids = state.timeline.iter().map(|e| e.scan_id.to_string());
                (merged, (state.clone(), ids.collect::<Vec<_>>()))
            })
            .collect::<Vec<_>>()
    };
    for group in 0..40 {
        let batch: Vec<ValidScan> = (0..1 + next(8))
            .map(|_| {
                scan(
                    &format!("DELTA{:05}", next(5)),
                    &format!("s{}", next(60)),
                    types[next(4) as usize],
                    next(12) as i64,
                )
            })
            .collect();
        let incoming = batch
            .iter()
            .enumerate()
            .map(|(index, s)| incoming(s, index))
            .collect();
        engine.apply(incoming, &mut expected);
        ingest(&writer, batch).await;
        if group % 10 == 9 {
            store.db.flush_cf(shipments_cf).expect("flushes");
        }
    }
    let replaced: usize = expected.values().map(|s| s.replaced.len()).sum();
    assert!(replaced > 0, "the workload replaces some reads");
    for (merged, record) in stored_records(&store, &expected) {
        assert_eq!(merged, record);
    }
    store
        .db
        .compact_range_cf(shipments_cf, None::<&[u8]>, None::<&[u8]>);
    for (merged, record) in stored_records(&store, &expected) {
        assert_eq!(merged, record);
    }
    drop(writer);
    thread.join().expect("writer stops");
}

fn deadline_index(store: &Store) -> Vec<(i64, String)> {
    store
        .db
        .iterator_cf(store.cf(keys::STALL_DEADLINES), IteratorMode::Start)
        .map(|item| {
            let (key, _) = item.expect("reads");
            let (deadline, number) = keys::decode_stall_key(&key).expect("decodes");
            (deadline.0 / HOUR, number.as_str().to_owned())
        })
        .collect()
}

#[tokio::test]
async fn the_deadline_index_holds_one_entry_per_shipment() {
    let (_dir, store) = crate::store::tests::temp_store();
    let (writer, thread) = spawn_writer(&store);
    ingest(
        &writer,
        vec![
            scan("COURIER001", "a1", ScanType::Sorted, 0),
            scan("DONE000001", "b1", ScanType::Sorted, 0),
            scan("MOVING0001", "c1", ScanType::Sorted, 0),
        ],
    )
    .await;
    assert_eq!(
        deadline_index(&store),
        vec![
            (48, "COURIER001".to_owned()),
            (48, "DONE000001".to_owned()),
            (48, "MOVING0001".to_owned()),
        ]
    );
    ingest(
        &writer,
        vec![
            scan("COURIER001", "a2", ScanType::OutForDelivery, 1),
            scan("DONE000001", "b2", ScanType::Delivered, 2),
            scan("MOVING0001", "c2", ScanType::Sorted, 10),
        ],
    )
    .await;
    assert_eq!(
        deadline_index(&store),
        vec![
            (13, "COURIER001".to_owned()),
            (48, "MOVING0001".to_owned()),
            (1002, "DONE000001".to_owned()),
        ],
        "an earlier deadline replaces the entry, a delivered shipment's is when its journey \
         expires, a later one leaves the entry as a lower bound for the sweep"
    );
    drop(writer);
    thread.join().expect("writer stops");
}

#[tokio::test]
async fn a_sweep_stalls_at_most_what_it_reads_and_says_more_are_due() {
    let (_dir, store) = crate::store::tests::temp_store();
    let (writer, thread) = spawn_writer(&store);
    let scans: Vec<ValidScan> = (0..=SWEEP_READ)
        .map(|n| scan(&format!("LIMIT{n:05}"), "a1", ScanType::Sorted, 0))
        .collect();
    for batch in scans.chunks(500) {
        ingest(&writer, batch.to_vec()).await;
    }
    let first = writer.sweep(EventTime(48 * HOUR)).await.expect("sweeps");
    assert_eq!((first.stalled, first.more_due), (SWEEP_READ, true));
    let second = writer.sweep(EventTime(48 * HOUR)).await.expect("sweeps");
    assert_eq!((second.stalled, second.more_due), (1, false));
    drop(writer);
    thread.join().expect("writer stops");
}

/// A record that does not decode fails neither its chunk nor the sweeps after it: the
/// shipments beside it stall, and its own entry stays for the next sweep to try again.
#[tokio::test]
async fn a_due_shipment_whose_record_is_unreadable_is_kept_and_the_rest_stall() {
    let (_dir, store) = crate::store::tests::temp_store();
    let (writer, thread) = spawn_writer(&store);
    ingest_in_transit(&writer, &["BROKEN0001", "SOUND00001"]).await;
    store
        .db
        .put_cf(store.cf(keys::SHIPMENTS), b"BROKEN0001", [0xff; 3])
        .expect("overwrites");
    for expected_stalls in [1, 0] {
        let swept = writer.sweep(EventTime(48 * HOUR)).await.expect("sweeps");
        assert_eq!((swept.stalled, swept.more_due), (expected_stalls, false));
        assert_eq!(
            deadline_index(&store),
            vec![(48, "BROKEN0001".into()), (2000, "SOUND00001".into())],
            "the stalled one is indexed again for when retention expires it"
        );
    }
    assert_eq!(
        shipment(&store, "SOUND00001").status,
        pb::Status::Stalled as i32
    );
    assert_eq!(store.stalled_shipments().expect("count"), 1);
    drop(writer);
    thread.join().expect("writer stops");
}

/// The sweeper reads the due entries before the writer stalls them: a scan written in
/// between (here a delivery, which drops the entry) wins, and the entry is not stalled.
#[tokio::test]
async fn due_entries_a_scan_superseded_after_the_sweep_read_them_are_not_stalled() {
    let (_dir, store) = crate::store::tests::temp_store();
    let (writer, thread) = spawn_writer(&store);
    ingest_in_transit(&writer, &["RACE000001", "RACE000002"]).await;
    let now = EventTime(48 * HOUR);
    let due = store.due_stall_keys(now, SWEEP_READ).expect("reads");
    assert_eq!(due.len(), 2);
    ingest(
        &writer,
        vec![scan("RACE000001", "a2", ScanType::Delivered, 1)],
    )
    .await;
    let (reply, answer) = oneshot::channel();
    writer
        .tx
        .send(Job::Sweep { now, due, reply })
        .await
        .expect("queued");
    assert_eq!(answer.await.expect("answered").expect("durable").0, 1);
    assert_eq!(
        shipment(&store, "RACE000001").status,
        pb::Status::Delivered as i32
    );
    assert_eq!(
        shipment(&store, "RACE000002").status,
        pb::Status::Stalled as i32
    );
    assert_eq!(
        deadline_index(&store),
        vec![(1001, "RACE000001".into()), (2000, "RACE000002".into())],
        "each at when retention expires it"
    );
    assert_eq!(store.stalled_shipments().expect("count"), 1);
    drop(writer);
    thread.join().expect("writer stops");
}

/// A shipment's changes read through its record's index are the log's changes of that
/// shipment, in order, within the bounds asked, the sweep's STALLED included.
#[tokio::test]
async fn one_shipments_changes_read_through_its_index_are_the_logs_for_it() {
    let (_dir, store) = crate::store::tests::temp_store();
    let (writer, thread) = spawn_writer(&store);
    for hour in 0..4 {
        ingest(
            &writer,
            ["INDEXED001", "OTHER00001", "OTHER00002"]
                .iter()
                .zip(0..)
                .map(|(number, n)| {
                    let types = [
                        ScanType::LabelCreated,
                        ScanType::PickedUp,
                        ScanType::Sorted,
                        ScanType::Loaded,
                    ];
                    // Shipments interleave in the log; each ends in transit, so it stalls.
                    scan(
                        number,
                        &format!("{number}-{hour}"),
                        types[hour as usize],
                        hour + n,
                    )
                })
                .collect(),
        )
        .await;
    }
    assert_eq!(
        writer
            .sweep(EventTime(100 * HOUR))
            .await
            .expect("sweeps")
            .stalled,
        3
    );
    let all = store
        .changes(Sequence(0), Sequence(u64::MAX), 1000)
        .expect("log");
    let number = TrackingNumber::parse("INDEXED001").expect("valid");
    let of_it: Vec<pb::StatusChange> = all
        .iter()
        .filter(|c| c.tracking_number == "INDEXED001")
        .cloned()
        .collect();
    assert!(of_it.len() >= 3, "{of_it:?}");
    assert_eq!(
        of_it.last().map(|c| c.status),
        Some(pb::Status::Stalled as i32)
    );
    let indexed = |after: u64, upto: u64, limit: usize| {
        store
            .changes_of(&number, Sequence(after), Sequence(upto), limit)
            .expect("indexed read")
    };
    assert_eq!(indexed(0, u64::MAX, 1000), of_it);
    let second = of_it[1].sequence;
    assert_eq!(indexed(second - 1, u64::MAX, 1), vec![of_it[1].clone()]);
    assert_eq!(indexed(0, second, 1000), of_it[..2].to_vec());
    let unknown = TrackingNumber::parse("NEVERSEEN1").expect("valid");
    assert_eq!(
        store
            .changes_of(&unknown, Sequence(0), Sequence(u64::MAX), 10)
            .expect("reads"),
        vec![]
    );
    drop(writer);
    thread.join().expect("writer stops");
}

#[tokio::test]
async fn shipments_stall_at_their_deadline_once_and_a_later_scan_moves_them_on() {
    let (_dir, store) = crate::store::tests::temp_store();
    let (writer, thread) = spawn_writer(&store);
    ingest(
        &writer,
        vec![
            scan("TRANSIT001", "a1", ScanType::Sorted, 0),
            scan("COURIER001", "b1", ScanType::OutForDelivery, 0),
            scan("DONE000001", "c1", ScanType::Delivered, 0),
            scan("MOVING0001", "d1", ScanType::Sorted, 0),
            scan("MOVING0001", "d2", ScanType::Sorted, 10),
        ],
    )
    .await;
    ingest(
        &writer,
        vec![scan("MOVING0001", "d3", ScanType::Loaded, 20)],
    )
    .await;
    let sweep = |hours: i64| {
        let writer = writer.clone();
        async move { writer.sweep(EventTime(hours * HOUR)).await.expect("sweeps") }
    };
    assert_eq!(sweep(11).await.stalled, 0);
    assert_eq!(
        sweep(12).await.stalled,
        1,
        "out for delivery stalls after 12 h"
    );
    assert_eq!(sweep(47).await.stalled, 0);
    assert_eq!(
        sweep(67).await.stalled,
        1,
        "TRANSIT001 stalls at 48 h; MOVING0001's latest scan (20 h) moved it to 68 h"
    );
    assert_eq!(
        sweep(68).await.stalled,
        1,
        "MOVING0001 at its real deadline"
    );
    assert_eq!(sweep(999).await.stalled, 0, "stalled once, delivered never");
    assert_eq!(store.stalled_shipments().expect("count"), 3);

    let transit = shipment(&store, "TRANSIT001");
    assert_eq!(transit.status, pb::Status::Stalled as i32);
    assert_eq!(transit.stalled_status, pb::Status::InTransit as i32);
    assert_eq!(transit.sub_status, pb::ScanType::Sorted as i32);
    assert_eq!(transit.version, 2);
    // The sweep rewrote the head, not the timeline: every stored scan is still there.
    assert_eq!(
        transit.timeline,
        vec![scan("TRANSIT001", "a1", ScanType::Sorted, 0).wire]
    );
    let moving = shipment(&store, "MOVING0001").timeline;
    let ids: Vec<&str> = moving.iter().map(|s| s.scan_id.as_str()).collect();
    assert_eq!(ids, ["d1", "d2", "d3"]);
    let changes = store
        .changes(Sequence(0), Sequence(u64::MAX), 100)
        .expect("changes");
    let stalls: Vec<_> = changes
        .iter()
        .filter(|c| c.status == pb::Status::Stalled as i32)
        .map(|c| {
            (
                c.tracking_number.as_str(),
                c.version,
                c.stalled_status,
                c.event_time.map(|t| t.seconds),
                c.cause_scan_id.as_str(),
            )
        })
        .collect();
    assert_eq!(
        stalls,
        vec![
            (
                "COURIER001",
                2,
                pb::Status::OutForDelivery as i32,
                Some(12 * 3600),
                ""
            ),
            (
                "TRANSIT001",
                2,
                pb::Status::InTransit as i32,
                Some(48 * 3600),
                ""
            ),
            (
                "MOVING0001",
                3,
                pb::Status::InTransit as i32,
                Some(68 * 3600),
                ""
            ),
        ]
    );

    ingest(
        &writer,
        vec![scan("TRANSIT001", "a0", ScanType::PickedUp, -5)],
    )
    .await;
    assert_eq!(
        shipment(&store, "TRANSIT001").status,
        pb::Status::Stalled as i32,
        "an older scan uploaded late does not wake it"
    );
    ingest(
        &writer,
        vec![scan("TRANSIT001", "a2", ScanType::Sorted, 50)],
    )
    .await;
    let woken = store
        .changes(Sequence(8), Sequence(u64::MAX), 100)
        .expect("changes");
    let [change] = woken.as_slice() else {
        panic!("one change: {woken:?}")
    };
    assert_eq!(
        (
            change.previous_status,
            change.previous_stalled_status,
            change.status,
            change.sub_status,
            change.version,
            change.cause_scan_id.as_str()
        ),
        (
            pb::Status::Stalled as i32,
            pb::Status::InTransit as i32,
            pb::Status::InTransit as i32,
            pb::ScanType::Sorted as i32,
            3,
            "a2"
        )
    );
    assert_eq!(store.stalled_shipments().expect("count"), 2);
    assert_eq!(
        sweep(97).await.stalled,
        0,
        "its deadline moved to 50 h + 48 h"
    );
    assert_eq!(sweep(98).await.stalled, 1);

    drop(writer);
    thread.join().expect("writer stops");
}

/// A shipment's whole scans, as `timeline_values` reads them back.
fn whole_scans(number: &str, scan_ids: &[&str]) -> Vec<Vec<u8>> {
    scan_ids
        .iter()
        .map(|id| {
            pb::Scan {
                scan_id: (*id).into(),
                tracking_number: number.into(),
                event_time: Some(prost_types::Timestamp {
                    seconds: 60,
                    nanos: 0,
                }),
                ..Default::default()
            }
            .encode_to_vec()
        })
        .collect()
}

/// A snapshot as a writer builds one: its shipment's stored record, each entry with its scan.
fn snapshot(number: &str, next_offset: i64, scan_ids: &[&str]) -> Snapshot {
    let state = crate::engine::ShipmentState {
        timeline: scan_ids
            .iter()
            .map(|id| crate::engine::Entry {
                event_time: EventTime(60_000_000),
                scan_id: crate::domain::ScanId::from_stored(id),
                scan_type: crate::domain::ScanType::LabelCreated,
                facility: 0,
            })
            .collect(),
        ..Default::default()
    };
    let stored: Vec<Vec<u8>> = whole_scans(number, scan_ids)
        .iter()
        .map(|whole| {
            let mut scan = pb::Scan::decode(whole.as_slice()).expect("decodes");
            codec::encode_event(&mut scan)
        })
        .collect();
    let entries = state
        .timeline
        .iter()
        .zip(&stored)
        .map(|(entry, event)| codec::EntryFields {
            event,
            ..codec::EntryFields::from(entry)
        });
    Snapshot {
        tracking_number: number.into(),
        topic: "scans.raw".into(),
        partition: 1,
        next_offset,
        record: codec::encode_shipment_delta(&state, entries, std::iter::empty(), 0..0),
        ..Snapshot::default()
    }
}

/// A restore of partition 1 of `scans.raw`, as the Kafka source runs it (on a blocking
/// thread): the snapshots in one chunk, then the resume; what was installed, and where to
/// resume.
async fn restore(writer: &WriterHandle, snapshots: Vec<Snapshot>, resume: i64) -> (usize, i64) {
    let writer = writer.clone();
    tokio::task::spawn_blocking(move || {
        let installed = writer.install_blocking("scans.raw", 1, snapshots)?;
        let from = writer.resume_blocking("scans.raw", 1, resume)?;
        Ok::<_, StoreError>((installed, from))
    })
    .await
    .expect("joins")
    .expect("restores")
}

#[tokio::test]
async fn restore_installs_the_changelogs_state_and_resumes_at_the_last_marker() {
    let (_dir, store) = crate::store::tests::temp_store();
    let (writer, thread) = spawn_writer(&store);
    let n = |s: &str| TrackingNumber::parse(s).expect("valid");
    // A shipment the writer has cached, which the restore replaces.
    ingest(
        &writer,
        vec![scan("PARCEL0002", "x", ScanType::LabelCreated, 0)],
    )
    .await;
    // Fresh owner: everything installed, resume at the marker (not beyond a later snapshot).
    let restored = restore(
        &writer,
        vec![
            snapshot("PARCEL0001", 10, &["a", "b"]),
            snapshot("PARCEL0002", 30, &["c"]),
        ],
        20,
    )
    .await;
    assert_eq!(restored, (2, 20));
    assert_eq!(store.stored_scans().expect("reads"), 3);
    assert_eq!(
        store.source_offset("scans.raw", 1).expect("offset"),
        Some(20)
    );
    // Read back whole: the bytes the snapshot carried.
    assert_eq!(
        store.timeline_values(&n("PARCEL0001")).expect("events"),
        whole_scans("PARCEL0001", &["a", "b"])
    );
    let timeline = store
        .shipment(&n("PARCEL0002"), None)
        .expect("read")
        .expect("restored")
        .timeline;
    assert_eq!(timeline.len(), 1);
    assert_eq!(
        (
            timeline[0].scan_id.as_str(),
            timeline[0].tracking_number.as_str()
        ),
        ("c", "PARCEL0002")
    );
    // A previous owner coming back further along takes the changelog's state, and resumes
    // at its marker: what it applied past it was never replicated, so it reads it again.
    let restored = restore(&writer, vec![snapshot("PARCEL0001", 5, &["x"])], 5).await;
    assert_eq!(restored, (1, 5));
    assert_eq!(
        store.source_offset("scans.raw", 1).expect("offset"),
        Some(5)
    );
    assert_eq!(
        store.timeline_values(&n("PARCEL0001")).expect("events"),
        whole_scans("PARCEL0001", &["x"])
    );
    assert_eq!(store.stored_scans().expect("reads"), 2);
    // A newer snapshot replaces what it restores, in the count too, twice in one batch.
    let restored = restore(
        &writer,
        vec![
            snapshot("PARCEL0001", 40, &["d", "e", "f"]),
            snapshot("PARCEL0001", 41, &["g"]),
        ],
        41,
    )
    .await;
    assert_eq!(restored, (2, 41));
    assert_eq!(store.stored_scans().expect("reads"), 2);
    assert_eq!(
        store.timeline_values(&n("PARCEL0001")).expect("events"),
        whole_scans("PARCEL0001", &["g"])
    );
    // The writer's next group applies to the restored record, not to what it had cached.
    ingest(&writer, vec![scan("PARCEL0002", "d", ScanType::Sorted, 1)]).await;
    let restored_then_scanned = shipment(&store, "PARCEL0002");
    let ids: Vec<&str> = restored_then_scanned
        .timeline
        .iter()
        .map(|s| s.scan_id.as_str())
        .collect();
    assert_eq!(ids, ["c", "d"]);
    assert_eq!(restored_then_scanned.version, 1);
    assert_eq!(store.stored_scans().expect("reads"), 3);
    drop(writer);
    thread.join().expect("writer stops");
}

/// Ownership fences the sweep: a shipment of a partition another instance owns now is
/// neither stalled nor expired here; its deadline is parked under its partition and put back
/// when the partition's restore ends here, after which it stalls like any other.
#[tokio::test]
async fn a_partition_owned_elsewhere_is_not_swept_until_it_is_owned_here_again() {
    let (_dir, store) = crate::store::tests::temp_store();
    let ownership = Ownership::default();
    for partition in [0, 1] {
        let claim = ownership.claim("scans.raw", partition);
        assert!(ownership.confirm("scans.raw", partition, claim, 0));
    }
    let (writer, mut replicated, thread) = spawn_replicating(&store, &ownership, 1);
    // The changelog: takes every snapshot (and drops it, with its guard).
    tokio::spawn(async move { while replicated.recv().await.is_some() {} });
    let from_partition = |number: &str, partition: i32| ValidScan {
        origin: Some(crate::domain::Origin {
            topic: "scans.raw".into(),
            partition,
        }),
        ..scan(number, &format!("{number}-a"), ScanType::Sorted, 0)
    };
    ingest(
        &writer,
        vec![
            from_partition("PARCEL0001", 0),
            from_partition("PARCEL0002", 1),
        ],
    )
    .await;

    let released = {
        let ownership = ownership.clone();
        tokio::task::spawn_blocking(move || {
            ownership.release("scans.raw", 0, Duration::from_secs(10))
        })
    };
    assert!(
        released.await.expect("joins"),
        "the changelog took what was queued"
    );
    let swept = writer.sweep(EventTime(49 * HOUR)).await.expect("sweeps");
    assert_eq!(swept.stalled, 1);
    assert_eq!(
        shipment(&store, "PARCEL0002").status,
        pb::Status::Stalled as i32
    );
    assert_eq!(
        shipment(&store, "PARCEL0001").status,
        pb::Status::InTransit as i32
    );
    let parked = |partition| {
        let prefix = keys::parked_prefix("scans.raw", partition);
        store
            .db
            .prefix_iterator_cf(store.cf(keys::STALL_DEADLINES), &prefix)
            .map(|item| item.expect("reads").0)
            .take_while(|key| key.starts_with(&prefix))
            .filter_map(|key| keys::decode_parked_key(&prefix, &key))
            .map(|number| number.as_str().to_owned())
            .collect::<Vec<_>>()
    };
    assert_eq!(parked(0), ["PARCEL0001"]);
    // Parked entries are never due: a later sweep leaves the shipment alone too.
    assert_eq!(
        writer
            .sweep(EventTime(99 * HOUR))
            .await
            .expect("sweeps")
            .stalled,
        0
    );

    // Owned again: the restore's end puts the deadline back where the record has it.
    let claim = ownership.claim("scans.raw", 0);
    let resumed = {
        let writer = writer.clone();
        tokio::task::spawn_blocking(move || writer.resume_blocking("scans.raw", 0, 7))
            .await
            .expect("joins")
            .expect("resumes")
    };
    assert_eq!(resumed, 7);
    assert!(parked(0).is_empty());
    assert!(deadline_index(&store).contains(&(48, "PARCEL0001".to_owned())));
    assert!(ownership.confirm("scans.raw", 0, claim, resumed));
    assert_eq!(
        writer
            .sweep(EventTime(99 * HOUR))
            .await
            .expect("sweeps")
            .stalled,
        1
    );
    assert_eq!(
        shipment(&store, "PARCEL0001").status,
        pb::Status::Stalled as i32
    );
    drop(writer);
    thread.join().expect("writer stops");
}

/// What the writer hands the changelog: each owned shipment's snapshot with the changes it
/// carries and this instance's publisher id, then how far the change log goes. And what a
/// restore does with a shipment the changelog lacks entirely (its snapshot never got there):
/// the records read again drop its state here at their first scan of it, so its changes are
/// derived anew (the old ones are void), once.
#[tokio::test]
async fn a_shipment_the_changelog_never_got_is_derived_anew_when_its_records_are_read_again() {
    let (_dir, store) = crate::store::tests::temp_store();
    let ownership = Ownership::default();
    let claim = ownership.claim("scans.raw", 1);
    assert!(ownership.confirm("scans.raw", 1, claim, 0));
    let (writer, mut replicated, thread) = spawn_replicating(&store, &ownership, 7);
    let read_at = |id: &str, hours: i64, next: i64| {
        let scan = ValidScan {
            origin: Some(crate::domain::Origin {
                topic: "scans.raw".into(),
                partition: 1,
            }),
            ..scan("PARCEL0003", id, ScanType::Sorted, hours)
        };
        let offset = SourceOffset {
            topic: "scans.raw".into(),
            partition: 1,
            next,
        };
        let writer = writer.clone();
        async move {
            let answer = writer
                .enqueue(vec![scan], vec![offset], Instant::now())
                .await
                .expect("queued");
            answer.await.expect("answered").expect("durable");
        }
    };
    let changes_of = |after: u64| {
        store
            .changes(Sequence(after), Sequence(u64::MAX), 10)
            .expect("reads")
            .into_iter()
            .map(|c| (c.sequence, c.tracking_number, c.version))
            .collect::<Vec<_>>()
    };

    read_at("x1", 0, 30).await;
    assert_eq!(changes_of(0), [(1, "PARCEL0003".to_owned(), 1)]);
    let Some(Replica::Snapshot(outgoing)) = replicated.recv().await else {
        panic!("the shipment's snapshot first");
    };
    assert_eq!(
        (
            outgoing.snapshot.tracking_number.as_str(),
            outgoing.snapshot.publisher,
            outgoing.snapshot.covers,
            outgoing.changes
        ),
        ("PARCEL0003", 7, 1, 1..2)
    );
    let Some(Replica::Snapshot(marker)) = replicated.recv().await else {
        panic!("then the partition's marker");
    };
    assert_eq!(
        (marker.snapshot.is_marker(), marker.snapshot.next_offset),
        (true, 30)
    );
    let Some(Replica::Through { sequence, void }) = replicated.recv().await else {
        panic!("then the write's end");
    };
    assert_eq!((sequence, void), (Sequence(1), Vec::new()));
    tokio::spawn(async move { while replicated.recv().await.is_some() {} });

    // The changelog never got that snapshot: the restore finds nothing of the shipment and
    // resumes at an earlier marker.
    assert_eq!(restore(&writer, Vec::new(), 10).await, (0, 10));
    read_at("x1", 0, 11).await;
    let anew = shipment(&store, "PARCEL0003");
    assert_eq!(anew.version, 1);
    assert_eq!(anew.timeline.len(), 1);
    assert_eq!(changes_of(1), [(2, "PARCEL0003".to_owned(), 1)]);
    assert_eq!(store.stored_scans().expect("reads"), 1);
    // Dropped once: the next record read again applies on top.
    read_at("x2", 1, 12).await;
    let ids: Vec<String> = shipment(&store, "PARCEL0003")
        .timeline
        .into_iter()
        .map(|s| s.scan_id)
        .collect();
    assert_eq!(ids, ["x1", "x2"]);
    drop(writer);
    thread.join().expect("writer stops");
}

/// Retention at the writer: a journey closed long enough ago leaves the record with its stored
/// scans and dedup state, the number remembers it (a replay of its scans is refused, the next
/// journey is numbered after it), and the record goes once nothing is left to remember.
#[tokio::test]
async fn the_sweep_removes_expired_journeys_and_then_forgets_the_number() {
    let (_dir, store) = crate::store::tests::temp_store();
    let (writer, thread) = spawn_writer(&store);
    let number = TrackingNumber::parse("REUSED0001").expect("valid");
    ingest(
        &writer,
        vec![
            scan("REUSED0001", "a1", ScanType::Sorted, 0),
            scan("REUSED0001", "a2", ScanType::Delivered, 1),
            scan("REUSED0001", "b1", ScanType::LabelCreated, 500),
            scan("REUSED0001", "b2", ScanType::Delivered, 501),
        ],
    )
    .await;
    assert_eq!(store.stored_scans().expect("count"), 4);
    assert_eq!(
        writer
            .sweep(EventTime(1000 * HOUR))
            .await
            .expect("sweeps")
            .removed
            .journeys,
        0
    );
    let swept = writer.sweep(EventTime(1001 * HOUR)).await.expect("sweeps");
    assert_eq!((swept.removed.journeys, swept.removed.scans), (1, 2));
    assert_eq!(store.stored_scans().expect("count"), 2);
    let kept = shipment(&store, "REUSED0001");
    assert_eq!(kept.journey, 2);
    assert_eq!(
        kept.journeys
            .iter()
            .map(|j| (j.journey, j.scans))
            .collect::<Vec<_>>(),
        vec![(2, 2)]
    );
    assert_eq!(store.shipment(&number, Some(1)).expect("reads"), None);
    assert_eq!(deadline_index(&store), vec![(1501, "REUSED0001".into())]);

    // A replay of journey 1 is refused; a new label opens journey 3.
    let answer = writer
        .enqueue(
            vec![
                scan("REUSED0001", "a1", ScanType::Sorted, 0),
                scan("REUSED0001", "c1", ScanType::LabelCreated, 1200),
            ],
            Vec::new(),
            Instant::now(),
        )
        .await
        .expect("queued");
    assert_eq!(
        answer.await.expect("answered").expect("durable"),
        vec![Outcome::JourneyExpired, Outcome::Accepted]
    );
    assert_eq!(shipment(&store, "REUSED0001").journey, 3);

    // Journey 3 idles out: the record goes, the number's memory stays apart.
    let swept = writer.sweep(EventTime(3500 * HOUR)).await.expect("sweeps");
    assert_eq!((swept.removed.journeys, swept.removed.scans), (2, 3));
    assert_eq!(store.shipment_record(&number).expect("reads"), None);
    let memory = || {
        store
            .db
            .get_cf(store.cf(keys::EXPIRED), keys::shipment_key(&number))
            .expect("reads")
    };
    assert!(memory().is_some());
    assert_eq!(store.stored_scans().expect("count"), 0);
    assert_eq!(deadline_index(&store), vec![(4200, "REUSED0001".into())]);
    let answer = writer
        .enqueue(
            vec![scan("REUSED0001", "c1", ScanType::LabelCreated, 1200)],
            Vec::new(),
            Instant::now(),
        )
        .await
        .expect("queued");
    assert_eq!(
        answer.await.expect("answered").expect("durable"),
        vec![Outcome::JourneyExpired]
    );

    let swept = writer
        .sweep(EventTime(100_000 * HOUR))
        .await
        .expect("sweeps");
    assert_eq!((swept.removed.journeys, swept.removed.scans), (0, 0));
    assert_eq!(memory(), None, "forgotten");
    assert_eq!(deadline_index(&store), vec![]);
    drop(writer);
    thread.join().expect("writer stops");
}
