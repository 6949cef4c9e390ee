use rocksdb::IteratorMode;

use super::*;

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

fn records_of(changes: &[pb::StatusChange]) -> Vec<codec::ChangeRecord<'_>> {
    changes.iter().map(codec::ChangeRecord::of).collect()
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
        "data directory has schema version 99; this build reads 2"
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

#[test]
fn a_version_one_directory_gets_every_shipment_indexed_due_at_once() {
    use prost::Message;
    let (_dir, config) = temp_config();
    {
        let store = Store::open(&config).expect("opens");
        let delivered = codec::ShipmentRecord {
            status: pb::Status::Delivered as i32,
            version: 2,
            ..Default::default()
        };
        let indexed = codec::ShipmentRecord {
            stall_deadline: Some(77),
            ..Default::default()
        };
        let shipments = store.cf(keys::SHIPMENTS);
        for (key, record) in [(b"DONE000001", &delivered), (b"MOVING0001", &indexed)] {
            store
                .db
                .put_cf(shipments, key, record.encode_to_vec())
                .expect("writes");
        }
        store
            .db
            .put_cf(
                store.cf(keys::META),
                keys::META_SCHEMA_VERSION,
                1u32.to_be_bytes(),
            )
            .expect("writes");
    }
    let store = Store::open(&config).expect("migrates");
    let index: Vec<Vec<u8>> = store
        .db
        .iterator_cf(store.cf(keys::STALL_DEADLINES), IteratorMode::Start)
        .map(|item| item.expect("reads").0.to_vec())
        .collect();
    let done = crate::domain::TrackingNumber::parse("DONE000001").expect("valid");
    assert_eq!(
        index,
        vec![keys::stall_key(crate::domain::EventTime(0), &done)]
    );
    let record = store.shipment_record(&done).expect("reads").expect("kept");
    let state = codec::decode_shipment(b"DONE000001", &record).expect("decodes");
    assert_eq!(state.stall_deadline, Some(crate::domain::EventTime(0)));
    assert_eq!(state.version.0, 2);
}

#[test]
fn the_change_log_is_trimmed_by_whole_blocks_old_enough_and_delivered_by_every_sink() {
    let (_dir, store) = temp_store();
    let cf = store.cf(keys::CHANGES);
    let at = |seconds: i64| Some(prost_types::Timestamp { seconds, nanos: 0 });
    // Three writes: 1..=300 (blocks 1 and 257) committed at 100 s, 301..=302 at 200 s.
    let changes: Vec<_> = (1..=302u64)
        .map(|s| pb::StatusChange {
            committed_time: at(if s <= 300 { 100 } else { 200 }),
            ..change(s)
        })
        .collect();
    let mut batch = rocksdb::WriteBatch::default();
    put_change_blocks(&mut batch, cf, &records_of(&changes[..300]));
    put_change_blocks(&mut batch, cf, &records_of(&changes[300..]));
    store.db.write(batch).expect("writes");
    let before = |seconds: u64| SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(seconds);
    assert_eq!(store.first_sequence().expect("reads"), Sequence(1));

    // The Kafka sink delivered up to 260: the block of 257..=300 is not all delivered.
    store
        .db
        .put_cf(
            store.cf(keys::META),
            keys::sink_cursor_key("kafka"),
            260u64.to_be_bytes(),
        )
        .expect("writes");
    assert_eq!(
        store
            .trim_change_log(before(150), &["kafka"])
            .expect("trims"),
        256
    );
    assert_eq!(store.first_sequence().expect("reads"), Sequence(257));
    let rest = store
        .changes(Sequence(0), Sequence(u64::MAX), 1000)
        .expect("reads");
    assert_eq!(sequences(&rest), (257..=302).collect::<Vec<_>>());

    assert_eq!(store.trim_change_log(before(150), &[]).expect("trims"), 44);
    assert_eq!(store.first_sequence().expect("reads"), Sequence(301));
    assert_eq!(
        store.trim_change_log(before(150), &[]).expect("trims"),
        0,
        "301 and 302 are younger"
    );
}
