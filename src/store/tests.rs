use prost::Message;
use rocksdb::IteratorMode;

use super::*;
use crate::domain::{EventTime, TrackingNumber};
use crate::proto::pb;

pub(crate) fn temp_store() -> (tempfile::TempDir, Store) {
    let (dir, config) = temp_config();
    let store = Store::open(&config).expect("opens");
    (dir, store)
}

/// An empty data directory and the default store config pointing at it.
pub(crate) fn temp_config() -> (tempfile::TempDir, StoreConfig) {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = StoreConfig {
        path: dir.path().to_owned(),
        ..StoreConfig::default()
    };
    (dir, config)
}

fn change(sequence: u64) -> pb::StatusChange {
    pb::StatusChange {
        sequence,
        tracking_number: format!("PARCEL{sequence:04}"),
        version: 1,
        ..Default::default()
    }
}

fn records_of(changes: &[pb::StatusChange]) -> Vec<records::ChangeRecord<'_>> {
    changes.iter().map(records::ChangeRecord::of).collect()
}

fn sequences(changes: &[pb::StatusChange]) -> Vec<u64> {
    changes.iter().map(|c| c.sequence).collect()
}

#[test]
fn the_change_log_reads_from_inside_a_block_across_blocks_up_to_a_limit_and_a_sequence() {
    let (_dir, store) = temp_store();
    let cf = store.cf(keys::CHANGES);
    let mut batch = rocksdb::WriteBatch::default();
    // Two writes: 1..=300 (two blocks: 256 + 44) and 301..=302.
    let changes: Vec<_> = (1..=302).map(change).collect();
    put_change_blocks(&mut batch, cf, &records_of(&changes[..300]));
    put_change_blocks(&mut batch, cf, &records_of(&changes[300..]));
    store.db.write(batch).expect("writes");
    let mut blocks = 0;
    for item in store.db.iterator_cf(cf, IteratorMode::Start) {
        item.expect("reads");
        blocks += 1;
    }
    assert_eq!(blocks, 3);

    let all = store
        .changes(Sequence(0), Sequence(u64::MAX), 1000)
        .expect("reads");
    assert_eq!(sequences(&all), (1..=302).collect::<Vec<_>>());
    let inside = store
        .changes(Sequence(10), Sequence(u64::MAX), 5)
        .expect("reads");
    assert_eq!(sequences(&inside), vec![11, 12, 13, 14, 15]);
    let durable = store
        .changes(Sequence(10), Sequence(12), 100)
        .expect("reads");
    assert_eq!(sequences(&durable), vec![11, 12]);
    assert!(store
        .changes(Sequence(12), Sequence(12), 100)
        .expect("reads")
        .is_empty());
    let across = store
        .changes(Sequence(254), Sequence(u64::MAX), 50)
        .expect("reads");
    assert_eq!(sequences(&across), (255..=302).collect::<Vec<_>>());
    assert_eq!(
        sequences(
            &store
                .changes(Sequence(301), Sequence(u64::MAX), 10)
                .expect("reads")
        ),
        vec![302]
    );
    assert!(store
        .changes(Sequence(302), Sequence(u64::MAX), 10)
        .expect("reads")
        .is_empty());
    assert!(store
        .changes(Sequence(u64::MAX), Sequence(u64::MAX), 10)
        .expect("reads")
        .is_empty());
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
fn snapshot(number: &str, next_offset: i64, scan_ids: &[&str]) -> writer::Snapshot {
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
            records::encode_event(&mut scan)
        })
        .collect();
    let entries = state
        .timeline
        .iter()
        .zip(&stored)
        .map(|(entry, event)| records::EntryFields {
            event,
            ..records::EntryFields::from(entry)
        });
    writer::Snapshot {
        tracking_number: number.into(),
        topic: "scans.raw".into(),
        partition: 1,
        next_offset,
        record: records::encode_shipment_delta(&state, entries, std::iter::empty()),
    }
}

#[test]
fn restore_installs_newer_state_and_resumes_at_the_last_marker() {
    let (_dir, store) = temp_store();
    let n = |s: &str| TrackingNumber::parse(s).expect("valid");
    // Fresh owner: everything installed, resume at the marker (not beyond a later snapshot).
    let restored = store
        .restore(
            "scans.raw",
            1,
            &[
                snapshot("PARCEL0001", 10, &["a", "b"]),
                snapshot("PARCEL0002", 30, &["c"]),
            ],
            20,
        )
        .expect("restore");
    assert_eq!(restored, 2);
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
        .shipment(&n("PARCEL0002"))
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
    // A previous owner coming back further along keeps its own newer state and position.
    store
        .restore("scans.raw", 1, &[snapshot("PARCEL0001", 5, &["x"])], 5)
        .expect("restore");
    assert_eq!(
        store.source_offset("scans.raw", 1).expect("offset"),
        Some(20)
    );
    assert_eq!(
        store
            .timeline_values(&n("PARCEL0001"))
            .expect("events")
            .len(),
        2
    );
    assert_eq!(store.stored_scans().expect("reads"), 3);
    // A newer snapshot replaces what it restores, in the count too, twice in one batch.
    store
        .restore(
            "scans.raw",
            1,
            &[
                snapshot("PARCEL0001", 40, &["d", "e", "f"]),
                snapshot("PARCEL0001", 41, &["g"]),
            ],
            41,
        )
        .expect("restore");
    assert_eq!(store.stored_scans().expect("reads"), 2);
    assert_eq!(
        store.timeline_values(&n("PARCEL0001")).expect("events"),
        whole_scans("PARCEL0001", &["g"])
    );
}

#[test]
fn reopening_keeps_schema_and_refuses_another() {
    let (_dir, config) = temp_config();
    {
        let store = Store::open(&config).expect("opens");
        assert_eq!(store.last_sequence().expect("reads"), Sequence(0));
        store
            .db
            .put_cf(
                store.cf(keys::META),
                keys::META_SCHEMA_VERSION,
                99u32.to_be_bytes(),
            )
            .expect("writes");
    }
    let err = Store::open(&config).err().expect("refused");
    assert_eq!(
        err.to_string(),
        "data directory has schema version 99; this build reads 1"
    );
}

#[test]
fn every_schema_version_before_this_one_has_its_migration() {
    assert_eq!(
        open::MIGRATIONS.len() as u32 + 1,
        keys::SCHEMA_VERSION,
        "a layout change bumps keys::SCHEMA_VERSION and adds the migration from the version before"
    );
}
