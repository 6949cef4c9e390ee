//! Opening the store: the column families and their tuning for this workload (hashed
//! memtables by tracking number, the shipments' merge operator, the deadline index's
//! append-only memtable, bloom filters, one block cache), and the schema check.
//!
//! Invariant: a directory opens only at the schema this build writes, reached through a
//! migration per version when it was earlier; a later one is refused, never read.

use std::sync::Arc;

use rocksdb::{BlockBasedOptions, Cache, ColumnFamilyDescriptor, Options, DB};

use super::codec::merge;
use super::{keys, Store, StoreConfig, StoreError, StoreTelemetry};

/// Memtables of the shipments, hashed by tracking number: an insert finds its shipment's
/// bucket, where the default memtable walks one skip list of every key in 64 MiB (its splice
/// search was a quarter of the writer's time). Every read of `shipments` is a point read of
/// one tracking number, which is what a hashed memtable serves. One bucket per 256 bytes
/// of memtable, so buckets are mostly one shipment each. A bucket is a sorted linked list: a
/// shipment's bucket holds the merge operands of its one key, newest first, so each insert
/// goes to the front (a skip list per bucket searched from its top level for every insert:
/// 4 % of the writer's instructions, a seventh of its time at 60,000 shipments, where the
/// nodes are cache misses).
fn hash_memtable_by_tracking_number(options: &mut Options, memtable_bytes: usize) {
    prefix_by_tracking_number(options);
    options.set_memtable_factory(rocksdb::MemtableFactory::HashLinkList {
        bucket_count: memtable_bucket_count(memtable_bytes),
    });
}

/// The tracking number as a column family's prefix (the key of hashed memtables). Public for
/// the raw RocksDB limit of `scand-load`.
pub fn prefix_by_tracking_number(options: &mut Options) {
    options.set_prefix_extractor(rocksdb::SliceTransform::create(
        "scand.tracking_number",
        keys::tracking_number_prefix,
        None,
    ));
}

/// Buckets of a hashed memtable: one per 256 bytes, about a shipment record or a scan.
pub fn memtable_bucket_count(memtable_bytes: usize) -> usize {
    (memtable_bytes / 256).max(1024)
}

/// The deadline index takes an insert or a delete for about one scan in three (a status with a
/// shorter threshold moves a shipment's deadline earlier), at positions spread over every
/// shipment's deadline: in a skip list those were a fifth of the writer's instructions. Only
/// the sweep reads it, once per interval and in order, so an unsorted memtable that appends
/// each entry and sorts when read or flushed serves it; kept small so that sort stays short.
fn append_only_memtable(options: &mut Options, memtable_bytes: usize) {
    options.set_memtable_factory(rocksdb::MemtableFactory::Vector);
    options.set_write_buffer_size(memtable_bytes.min(STALL_INDEX_MEMTABLE_BYTES));
}

/// Some 190,000 entries of the deadline index (~43 bytes each in the memtable). A 2 MiB one
/// sorted faster but flushed, and so switched the WAL, six times in a 911,815-scan run where
/// this one flushed once (BENCHMARKS.md).
const STALL_INDEX_MEMTABLE_BYTES: usize = 8 * 1024 * 1024;

impl Store {
    pub fn open(config: &StoreConfig) -> Result<Self, StoreError> {
        let cache = Cache::new_lru_cache(config.block_cache_bytes);
        let table = |bloom: bool| {
            let mut t = BlockBasedOptions::default();
            t.set_block_cache(&cache);
            // Index and filter blocks grow with the data; in the cache they share its bound
            // instead of adding memory per SST file (L0's stay pinned: every read needs them).
            t.set_cache_index_and_filter_blocks(true);
            t.set_pin_l0_filter_and_index_blocks_in_cache(true);
            if bloom {
                t.set_bloom_filter(10.0, false);
            }
            t
        };
        let cf = |name: &str, bloom: bool| {
            let mut o = Options::default();
            o.set_write_buffer_size(config.memtable_bytes);
            if bloom {
                o.set_memtable_whole_key_filtering(true);
                o.set_memtable_prefix_bloom_ratio(0.05);
            }
            o.set_block_based_table_factory(&table(bloom));
            o.set_compression_type(rocksdb::DBCompressionType::Lz4);
            if name == keys::SHIPMENTS {
                hash_memtable_by_tracking_number(&mut o, config.memtable_bytes);
            }
            if name == keys::STALL_DEADLINES {
                append_only_memtable(&mut o, config.memtable_bytes);
            }
            if name == keys::SHIPMENTS {
                // Retention deletes whole records, and tracking numbers are issued in runs, so
                // a day's deletions cover a range of keys that new records no longer touch:
                // compactions moving fresh files down never overlap it, and its tombstones sat
                // above the data they delete (the tables grew 9.5 MB a simulated day after
                // retention began, BENCHMARKS.md "Retention"). A file that is half deletions in
                // any 10,000 entries is compacted down first.
                o.add_compact_on_deletion_collector_factory(10_000, 5_000, 0.5);
                o.set_merge_operator_associative(
                    "scand.shipment_delta",
                    |_key: &[u8], record: Option<&[u8]>, deltas: &rocksdb::MergeOperands| {
                        merge::merge_shipment_records(record, deltas)
                    },
                );
            }
            ColumnFamilyDescriptor::new(name, o)
        };

        let mut db_opts = Options::default();
        db_opts.create_if_missing(true);
        db_opts.create_missing_column_families(true);
        db_opts.increase_parallelism(2);
        db_opts.set_max_background_jobs(2);
        db_opts.set_db_write_buffer_size(config.memtables_total_bytes);
        db_opts.set_keep_log_file_num(4);
        // A WAL file goes only once every column family's data in it is flushed; the small
        // families (deadline index, change log) fill their memtables slowly, and held 1.7 GB
        // of WAL behind 1 GB of tables over 120 simulated days (BENCHMARKS.md, "Retention").
        // Past this, RocksDB flushes the family holding the oldest WAL.
        db_opts.set_max_total_wal_size((2 * config.memtables_total_bytes) as u64);
        // Hashed memtables take inserts from one thread at a time; scand has one writer.
        db_opts.set_allow_concurrent_memtable_write(false);
        // Tickers only (cache hits, stall time): timers and histograms cost on every write.
        db_opts.enable_statistics();
        db_opts.set_statistics_level(rocksdb::statistics::StatsLevel::ExceptHistogramOrTimers);
        let descriptors = keys::ALL_COLUMN_FAMILIES
            .map(|name| cf(name, name == keys::SHIPMENTS || name == keys::EXPIRED));
        let db = DB::open_cf_descriptors(&db_opts, &config.path, descriptors)?;
        let store = Store {
            db: Arc::new(db),
            telemetry: Arc::new(StoreTelemetry {
                options: db_opts,
                cache,
                cache_capacity: config.block_cache_bytes,
                stall_sample: std::sync::Mutex::new((0, std::time::Instant::now())),
            }),
        };
        store.check_schema()?;
        Ok(store)
    }

    /// Marks a new directory with this build's schema version, brings an earlier one to it
    /// through [`MIGRATIONS`], and refuses a later (or unreadable) one.
    fn check_schema(&self) -> Result<(), StoreError> {
        let meta = self.cf(keys::META);
        let Some(found) = self.db.get_cf(meta, keys::META_SCHEMA_VERSION)? else {
            self.put_schema_version(keys::SCHEMA_VERSION)?;
            return Ok(());
        };
        let found = found
            .as_slice()
            .try_into()
            .map(u32::from_be_bytes)
            .map_err(|_| StoreError::Corrupt {
                key: "schema_version".into(),
                what: format!("{} bytes", found.len()),
            })?;
        if found == 0 || found > keys::SCHEMA_VERSION {
            return Err(StoreError::Schema {
                found,
                expected: keys::SCHEMA_VERSION,
            });
        }
        for version in found..keys::SCHEMA_VERSION {
            let migrate = MIGRATIONS[version as usize - 1];
            migrate(&self.db)?;
            self.put_schema_version(version + 1)?;
            tracing::info!(from = version, to = version + 1, "data directory migrated");
        }
        Ok(())
    }

    fn put_schema_version(&self, version: u32) -> Result<(), StoreError> {
        let mut sync = rocksdb::WriteOptions::default();
        sync.set_sync(true);
        self.db.put_cf_opt(
            self.cf(keys::META),
            keys::META_SCHEMA_VERSION,
            version.to_be_bytes(),
            &sync,
        )?;
        Ok(())
    }
}

/// Brings a data directory from one schema version to the next, in synced writes of its own.
type Migration = fn(&DB) -> Result<(), StoreError>;

/// `MIGRATIONS[v - 1]` takes a directory from version `v` to `v + 1`: one per version before
/// [`keys::SCHEMA_VERSION`] (tested), so a layout change ships with the step that gets
/// existing directories there.
pub(super) const MIGRATIONS: [Migration; keys::SCHEMA_VERSION as usize - 1] =
    [index_every_shipment];

/// Version 1 to 2 (journeys and retention): the deadline index held only shipments that could
/// stall; now every shipment has an entry, its next deadline being retention's at the latest.
/// Each shipment without one is indexed as due at once, so the first sweep puts it at its real
/// deadline. A whole pass over `shipments`, once.
fn index_every_shipment(db: &DB) -> Result<(), StoreError> {
    use prost::Message;
    let (Some(shipments), Some(index)) = (
        db.cf_handle(keys::SHIPMENTS),
        db.cf_handle(keys::STALL_DEADLINES),
    ) else {
        return Err(StoreError::Corrupt {
            key: "column families".into(),
            what: "shipments or the deadline index is missing".into(),
        });
    };
    let mut sync = rocksdb::WriteOptions::default();
    sync.set_sync(true);
    let mut batch = rocksdb::WriteBatch::default();
    for item in db.iterator_cf(shipments, rocksdb::IteratorMode::Start) {
        let (key, value) = item?;
        let mut record = super::codec::decode_shipment_record(&key, &value)?;
        if record.stall_deadline.is_some() {
            continue;
        }
        let number = std::str::from_utf8(&key)
            .ok()
            .and_then(|n| crate::domain::TrackingNumber::parse(n).ok())
            .ok_or_else(|| StoreError::Corrupt {
                key: String::from_utf8_lossy(&key).into_owned(),
                what: "not a tracking number".into(),
            })?;
        let due = crate::domain::EventTime(0);
        record.stall_deadline = Some(due.0);
        batch.put_cf(index, keys::stall_key(due, &number), []);
        batch.put_cf(shipments, &key, record.encode_to_vec());
        if batch.len() >= 2_000 {
            db.write_opt(std::mem::take(&mut batch), &sync)?;
        }
    }
    db.write_opt(batch, &sync)?;
    Ok(())
}
