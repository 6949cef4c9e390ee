//! The store: RocksDB behind one door. Column families and key layouts live in `keys`, value
//! codecs in `records`, the shipments' merge operator in `merge`, and every write goes
//! through the single `writer`, which turns an engine result into one atomic, synced
//! `WriteBatch`.
//!
//! Invariants:
//! - One writer: no two threads ever write state, so the engine's read-modify-write of a
//!   shipment cannot race and no transaction machinery is needed.
//! - Atomic and durable before acknowledged: a batch's events, shipment records, scan-id
//!   memory, status changes and sequence counter land in one WriteBatch with the WAL synced.
//! - Reads that must agree (a shipment record and its timeline) use one snapshot.

pub mod cache;
pub mod keys;
pub mod merge;
pub mod records;
pub mod writer;

use std::{path::Path, sync::Arc, time::SystemTime};

use prost::Message;
use rocksdb::{
    BlockBasedOptions, Cache, ColumnFamily, ColumnFamilyDescriptor, Direction, IteratorMode,
    Options, ReadOptions, DB,
};

use crate::api::pb;
use crate::config::StoreConfig;
use crate::domain::{EventTime, Sequence, TrackingNumber};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("RocksDB: {0}")]
    Rocks(#[from] rocksdb::Error),
    #[error("stored value under {key:?} is corrupt: {what}")]
    Corrupt { key: String, what: String },
    #[error("data directory has schema version {found}; this build reads {expected}")]
    Schema { found: u32, expected: u32 },
    #[error("the store writer has stopped")]
    WriterGone,
    #[error("could not start the store writer: {0}")]
    WriterThread(#[from] std::io::Error),
    #[error("store write failed, nothing acknowledged: {0}")]
    WriteFailed(String),
    #[error(
        "store refuses writes (disk full or read-only?): {0}; nothing of this batch was \
         stored, resend it later"
    )]
    Unwritable(String),
}

/// Shared read access to the database; the writer holds the only write path.
#[derive(Clone)]
pub struct Store {
    db: Arc<DB>,
    /// Holds RocksDB's statistics (tickers) and the block cache, for metrics.
    telemetry: Arc<StoreTelemetry>,
    /// Bumped by every write of shipment state that bypasses the writer (changelog restore).
    restore_epoch: Arc<std::sync::atomic::AtomicU64>,
    /// Held by the writer from reading a group's states to writing them, and by a restore
    /// for its reads, write and epoch bump: a restore never lands in between, so the writer
    /// never merges a delta built on a state the restore replaced into the restored record.
    /// It guards the count of stored scans, which both keep in `meta` with what they write.
    state_writes: Arc<std::sync::Mutex<u64>>,
}

struct StoreTelemetry {
    options: Options,
    cache: Cache,
    cache_capacity: usize,
}

/// Memtables of a column family keyed by tracking number, hashed by it: an insert finds its
/// shipment's bucket, where the default memtable walks one skip list of every key in 64 MiB
/// (its splice search was a quarter of the writer's time). Every read of these column
/// families stays within one tracking number (a point read, or a timeline bounded by
/// `keys::timeline_range`), which is what a hashed memtable serves. One bucket per 256 bytes
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

fn now_unix_secs() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

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
            if name == keys::EVENTS || name == keys::SHIPMENTS {
                hash_memtable_by_tracking_number(&mut o, config.memtable_bytes);
            }
            if name == keys::STALL_DEADLINES {
                append_only_memtable(&mut o, config.memtable_bytes);
            }
            if name == keys::SHIPMENTS {
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
        // Hashed memtables take inserts from one thread at a time; scand has one writer.
        db_opts.set_allow_concurrent_memtable_write(false);
        // Tickers only (cache hits, stall time): timers and histograms cost on every write.
        db_opts.enable_statistics();
        db_opts.set_statistics_level(rocksdb::statistics::StatsLevel::ExceptHistogramOrTimers);
        let mut descriptors = vec![
            cf(keys::EVENTS, false),
            cf(keys::SHIPMENTS, true),
            cf(keys::CHANGES, false),
            cf(keys::META, false),
            cf(keys::STALL_DEADLINES, false),
        ];
        // RocksDB opens a directory only with all of its column families named; retired ones
        // are opened here to be dropped below.
        let existing = DB::list_cf(&db_opts, &config.path).unwrap_or_default();
        let retired: Vec<&str> = keys::RETIRED_COLUMN_FAMILIES
            .into_iter()
            .filter(|name| existing.iter().any(|e| e == name))
            .collect();
        descriptors.extend(retired.iter().map(|name| cf(name, false)));
        let legacy_changes = existing.iter().any(|e| e == keys::LEGACY_CHANGES);
        if legacy_changes {
            descriptors.push(cf(keys::LEGACY_CHANGES, false));
        }
        let mut db = DB::open_cf_descriptors(&db_opts, &config.path, descriptors)?;
        if legacy_changes {
            migrate_legacy_changes(&db)?;
            db.drop_cf(keys::LEGACY_CHANGES)?;
        }
        for name in retired {
            tracing::info!(column_family = name, "dropping a retired column family");
            db.drop_cf(name)?;
        }
        let store = Store {
            db: Arc::new(db),
            telemetry: Arc::new(StoreTelemetry {
                options: db_opts,
                cache,
                cache_capacity: config.block_cache_bytes,
            }),
            restore_epoch: Arc::default(),
            state_writes: Arc::default(),
        };
        store.check_schema()?;
        let stored_scans = match store.meta_u64(keys::META_STORED_SCANS)? {
            Some(counted) => counted,
            // A directory from before the count: its scans are all under `events` keys.
            None => {
                let estimate = store.estimate_keys(keys::EVENTS)?;
                store.db.put_cf(
                    store.cf(keys::META),
                    keys::META_STORED_SCANS,
                    estimate.to_be_bytes(),
                )?;
                estimate
            }
        };
        *store.exclusive_state_writes() = stored_scans;
        Ok(store)
    }

    /// Scans stored, as counted by the writes that store and replace them (for a directory
    /// from before the count, from RocksDB's estimate of its `events` keys on).
    pub fn stored_scans(&self) -> Result<u64, StoreError> {
        Ok(self.meta_u64(keys::META_STORED_SCANS)?.unwrap_or(0))
    }

    /// A u64 (BE) of `meta`.
    fn meta_u64(&self, key: &[u8]) -> Result<Option<u64>, StoreError> {
        let Some(v) = self.db.get_cf(self.cf(keys::META), key)? else {
            return Ok(None);
        };
        v.as_slice()
            .try_into()
            .map(|bytes| Some(u64::from_be_bytes(bytes)))
            .map_err(|_| StoreError::Corrupt {
                key: String::from_utf8_lossy(key).into_owned(),
                what: format!("{} bytes", v.len()),
            })
    }

    fn check_schema(&self) -> Result<(), StoreError> {
        let meta = self.cf(keys::META);
        let found = self.db.get_cf(meta, keys::META_SCHEMA_VERSION)?;
        let upgradable = found.as_deref().is_some_and(|v| {
            keys::UPGRADABLE_SCHEMA_VERSIONS
                .iter()
                .any(|old| v == old.to_be_bytes())
        });
        match found.filter(|_| !upgradable) {
            // A new directory, or one whose layout this build reads as it is.
            None => {
                self.db.put_cf(
                    meta,
                    keys::META_SCHEMA_VERSION,
                    keys::SCHEMA_VERSION.to_be_bytes(),
                )?;
                Ok(())
            }
            Some(v) => {
                let found = v
                    .as_slice()
                    .try_into()
                    .map(u32::from_be_bytes)
                    .map_err(|_| StoreError::Corrupt {
                        key: "schema_version".into(),
                        what: format!("{} bytes", v.len()),
                    })?;
                if found == keys::SCHEMA_VERSION {
                    Ok(())
                } else {
                    Err(StoreError::Schema {
                        found,
                        expected: keys::SCHEMA_VERSION,
                    })
                }
            }
        }
    }

    /// Column families are all created at open, so a missing one is a broken build.
    fn cf(&self, name: &str) -> &ColumnFamily {
        #[allow(clippy::expect_used)]
        self.db
            .cf_handle(name)
            .expect("column families are created when the store opens")
    }

    pub fn path(&self) -> &Path {
        self.db.path()
    }

    /// The highest sequence in the change log (0 when empty).
    pub fn last_sequence(&self) -> Result<Sequence, StoreError> {
        let Some(v) = self
            .db
            .get_cf(self.cf(keys::META), keys::META_LAST_SEQUENCE)?
        else {
            return Ok(Sequence(0));
        };
        keys::decode_change_key(&v).ok_or_else(|| StoreError::Corrupt {
            key: "last_sequence".into(),
            what: format!("{} bytes", v.len()),
        })
    }

    /// Exports RocksDB's own figures as metrics: size and memtables per column family,
    /// pending compaction, running compactions, write stall time, block cache use and hits.
    pub fn record_metrics(&self) -> Result<(), StoreError> {
        use crate::telemetry::metrics as m;
        use rocksdb::statistics::Ticker;
        let mut pending_compaction = 0;
        for cf in keys::ALL_COLUMN_FAMILIES {
            let size = self.cf_property(cf, "rocksdb.live-sst-files-size")?;
            let memtables = self.cf_property(cf, "rocksdb.cur-size-all-mem-tables")?;
            metrics::gauge!(m::ROCKSDB_SIZE_BYTES, "cf" => cf).set(size.unwrap_or(0) as f64);
            metrics::gauge!(m::ROCKSDB_MEMTABLE_BYTES, "cf" => cf)
                .set(memtables.unwrap_or(0) as f64);
            pending_compaction += self
                .cf_property(cf, "rocksdb.estimate-pending-compaction-bytes")?
                .unwrap_or(0);
        }
        metrics::gauge!(m::ROCKSDB_PENDING_COMPACTION_BYTES).set(pending_compaction as f64);
        let running = self
            .db
            .property_int_value("rocksdb.num-running-compactions")?
            .unwrap_or(0);
        metrics::gauge!(m::ROCKSDB_RUNNING_COMPACTIONS).set(running as f64);
        let telemetry = &self.telemetry;
        let stall_micros = telemetry.options.get_ticker_count(Ticker::StallMicros);
        metrics::gauge!(m::ROCKSDB_WRITE_STALL_SECONDS_TOTAL).set(stall_micros as f64 / 1e6);
        metrics::gauge!(m::ROCKSDB_BLOCK_CACHE_USAGE_BYTES).set(telemetry.cache.get_usage() as f64);
        metrics::gauge!(m::ROCKSDB_BLOCK_CACHE_CAPACITY_BYTES).set(telemetry.cache_capacity as f64);
        metrics::counter!(m::ROCKSDB_BLOCK_CACHE_HITS_TOTAL)
            .absolute(telemetry.options.get_ticker_count(Ticker::BlockCacheHit));
        metrics::counter!(m::ROCKSDB_BLOCK_CACHE_MISSES_TOTAL)
            .absolute(telemetry.options.get_ticker_count(Ticker::BlockCacheMiss));
        Ok(())
    }

    /// Shipment state is read and written by the holder alone, which keeps the count of
    /// stored scans it guards (see `state_writes`). Nothing panics while holding it, so a
    /// poisoned lock only means its holder's thread died.
    pub(crate) fn exclusive_state_writes(&self) -> std::sync::MutexGuard<'_, u64> {
        self.state_writes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Changes whenever shipment state was written behind the writer (see `cache`).
    pub fn restore_epoch(&self) -> u64 {
        self.restore_epoch.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The stored state of each shipment (`None` = never seen): what deduplicates and orders a
    /// scan. One batched multi-get; bloom filters make a new shipment's miss cheap.
    pub fn shipment_states(
        &self,
        numbers: &[&TrackingNumber],
    ) -> Result<Vec<Option<crate::engine::ShipmentState>>, StoreError> {
        let keys = numbers.iter().map(|n| keys::shipment_key(n));
        // The writer asks in key order; RocksDB then skips sorting the keys itself.
        let sorted = numbers.is_sorted();
        numbers
            .iter()
            .zip(
                self.db
                    .batched_multi_get_cf(self.cf(keys::SHIPMENTS), keys, sorted),
            )
            .map(|(number, value)| match value? {
                Some(bytes) => {
                    records::decode_shipment(keys::shipment_key(number), &bytes).map(Some)
                }
                None => Ok(None),
            })
            .collect()
    }

    /// Syncs the WAL: every write before this call is durable once it returns Ok.
    pub fn sync_wal(&self) -> Result<(), StoreError> {
        self.db.flush_wal(true)?;
        Ok(())
    }

    /// RocksDB's estimate of the keys in a column family.
    pub fn estimate_keys(&self, cf: &str) -> Result<u64, StoreError> {
        Ok(self
            .db
            .property_int_value_cf(self.cf(cf), "rocksdb.estimate-num-keys")?
            .unwrap_or(0))
    }

    /// An integer RocksDB property of one column family (`None` when RocksDB has no value).
    pub fn cf_property(&self, cf: &str, property: &str) -> Result<Option<u64>, StoreError> {
        Ok(self.db.property_int_value_cf(self.cf(cf), property)?)
    }

    /// Up to `limit` keys of the deadline index due at `now`, earliest first. Read by the
    /// sweeper, not the writer: an iterator sorts a copy of the index's live (vector) memtable.
    pub fn due_stall_keys(&self, now: EventTime, limit: usize) -> Result<Vec<Vec<u8>>, StoreError> {
        let mut read = ReadOptions::default();
        read.set_iterate_upper_bound(keys::stall_keys_due(now));
        self.db
            .iterator_cf_opt(self.cf(keys::STALL_DEADLINES), read, IteratorMode::Start)
            .take(limit)
            .map(|item| {
                item.map(|(key, _)| key.into_vec())
                    .map_err(StoreError::from)
            })
            .collect()
    }

    /// Shipments currently stalled, as counted by the writes that stall and wake them.
    pub fn stalled_shipments(&self) -> Result<u64, StoreError> {
        Ok(self.meta_u64(keys::META_STALLED_SHIPMENTS)?.unwrap_or(0))
    }

    /// The next offset to consume from a source partition, as stored with the state it produced.
    pub fn source_offset(&self, topic: &str, partition: i32) -> Result<Option<i64>, StoreError> {
        let key = keys::source_offset_key(topic, partition);
        self.db
            .get_cf(self.cf(keys::META), &key)?
            .map(|v| {
                v.as_slice()
                    .try_into()
                    .map(i64::from_be_bytes)
                    .map_err(|_| StoreError::Corrupt {
                        key: String::from_utf8_lossy(&key).into_owned(),
                        what: format!("{} bytes", v.len()),
                    })
            })
            .transpose()
    }

    /// The highest sequence `sink` has delivered (0 before its first delivery).
    pub fn sink_cursor(&self, sink: &str) -> Result<Sequence, StoreError> {
        let key = keys::sink_cursor_key(sink);
        match self.db.get_cf(self.cf(keys::META), &key)? {
            None => Ok(Sequence(0)),
            Some(v) => keys::decode_change_key(&v).ok_or_else(|| StoreError::Corrupt {
                key: String::from_utf8_lossy(&key).into_owned(),
                what: format!("{} bytes", v.len()),
            }),
        }
    }

    /// Records `sink`'s progress. Not synced: after a crash the sink may repeat changes it had
    /// delivered, which consumers drop by version; it never skips one.
    pub fn set_sink_cursor(&self, sink: &str, delivered: Sequence) -> Result<(), StoreError> {
        self.db.put_cf(
            self.cf(keys::META),
            keys::sink_cursor_key(sink),
            keys::change_key(delivered),
        )?;
        Ok(())
    }

    /// The stored scans of one shipment, whole and encoded, in timeline order.
    pub fn timeline_values(
        &self,
        tracking_number: &TrackingNumber,
    ) -> Result<Vec<Vec<u8>>, StoreError> {
        let snapshot = self.db.snapshot();
        let key = keys::shipment_key(tracking_number);
        match snapshot.get_cf(self.cf(keys::SHIPMENTS), key)? {
            Some(bytes) => self.scans_at(&snapshot, tracking_number, key, &bytes),
            None => Ok(Vec::new()),
        }
    }

    /// The whole scans of a shipment's record as read in `snapshot`, in timeline order: from
    /// its entries, or, for entries of an earlier layout or a restore, from their `events`
    /// keys (one range read, in the same order).
    fn scans_at(
        &self,
        snapshot: &rocksdb::Snapshot<'_>,
        tracking_number: &TrackingNumber,
        key: &[u8],
        record: &[u8],
    ) -> Result<Vec<Vec<u8>>, StoreError> {
        let record = records::decode_shipment_record(key, record)?;
        let number = tracking_number.as_str();
        let mut events = None;
        let mut scans = Vec::with_capacity(record.timeline.len());
        for entry in &record.timeline {
            if let Some(scan) = records::entry_scan(number, entry) {
                scans.push(scan);
                continue;
            }
            let events = events.get_or_insert_with(|| {
                let (start, end) = keys::timeline_range(tracking_number);
                let mut read = ReadOptions::default();
                read.set_snapshot(snapshot);
                read.set_iterate_upper_bound(end);
                self.db.iterator_cf_opt(
                    self.cf(keys::EVENTS),
                    read,
                    IteratorMode::From(&start, Direction::Forward),
                )
            });
            let wanted = keys::event_key(
                tracking_number,
                EventTime(entry.event_time),
                &crate::domain::ScanId::from_stored(&entry.scan_id),
            );
            let (key, value) = loop {
                match events.next().transpose()? {
                    Some((key, value)) if *key == *wanted => break (key, value),
                    Some((key, _)) if *key < *wanted => continue,
                    _ => {
                        return Err(StoreError::Corrupt {
                            key: String::from_utf8_lossy(&wanted).into_owned(),
                            what: "timeline entry without its stored scan".into(),
                        })
                    }
                }
            };
            scans.push(records::event_wire(&key, &value)?);
        }
        Ok(scans)
    }

    /// Installs shipments of one source partition replicated from its previous owner: every
    /// snapshot newer than the local state replaces what is stored for its shipment, and the
    /// partition resumes at `resume` (the last complete-state marker) unless the local state is
    /// further along. One synced write, counted in the stored scans.
    pub fn restore(
        &self,
        topic: &str,
        partition: i32,
        snapshots: &[writer::Snapshot],
        resume: i64,
    ) -> Result<usize, StoreError> {
        let mut stored_scans = self.exclusive_state_writes();
        let local = self.source_offset(topic, partition)?.unwrap_or(-1);
        let mut batch = rocksdb::WriteBatch::default();
        let mut restored = 0;
        // Per restored shipment: the scans it had here, and those it has restored.
        let mut scan_counts: std::collections::HashMap<TrackingNumber, (u64, u64)> =
            std::collections::HashMap::new();
        for snapshot in snapshots.iter().filter(|s| s.next_offset > local) {
            let corrupt = |what: String| StoreError::Corrupt {
                key: snapshot.tracking_number.clone(),
                what,
            };
            let number = TrackingNumber::parse(&snapshot.tracking_number)
                .map_err(|e| corrupt(e.to_string()))?;
            let had = match scan_counts.get(&number) {
                Some(&(had, _)) => had,
                None => self.scans_stored_for(&number)?,
            };
            scan_counts.insert(number.clone(), (had, snapshot.events.len() as u64));
            let (start, end) = keys::timeline_range(&number);
            batch.delete_range_cf(self.cf(keys::EVENTS), start, end);
            for bytes in &snapshot.events {
                let scan =
                    pb::Scan::decode(bytes.as_slice()).map_err(|e| corrupt(e.to_string()))?;
                let scan_id = crate::domain::ScanId::from_stored(&scan.scan_id);
                let event_time = scan
                    .event_time
                    .and_then(|t| EventTime::from_parts(t.seconds, t.nanos))
                    .ok_or_else(|| {
                        corrupt(format!("scan {} has no valid event time", scan.scan_id))
                    })?;
                // Stored whole, as the snapshot carries it (fields a newer build added
                // included): readers take both forms (`records::event_wire`).
                batch.put_cf(
                    self.cf(keys::EVENTS),
                    keys::event_key(&number, event_time, &scan_id),
                    bytes,
                );
            }
            batch.put_cf(
                self.cf(keys::SHIPMENTS),
                keys::shipment_key(&number),
                &snapshot.record,
            );
            // The deadline index is local: rebuild this shipment's entry from its record.
            let state = records::decode_shipment(keys::shipment_key(&number), &snapshot.record)?;
            if let Some(deadline) = state.stall_deadline {
                batch.put_cf(
                    self.cf(keys::STALL_DEADLINES),
                    keys::stall_key(deadline, &number),
                    [],
                );
            }
            restored += 1;
        }
        batch.put_cf(
            self.cf(keys::META),
            keys::source_offset_key(topic, partition),
            resume.max(local).to_be_bytes(),
        );
        let now_stored = scan_counts.values().fold(*stored_scans, |n, &(had, now)| {
            (n + now).saturating_sub(had)
        });
        batch.put_cf(
            self.cf(keys::META),
            keys::META_STORED_SCANS,
            now_stored.to_be_bytes(),
        );
        let mut sync = rocksdb::WriteOptions::default();
        sync.set_sync(true);
        self.db.write_opt(batch, &sync)?;
        *stored_scans = now_stored;
        self.restore_epoch
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Ok(restored)
    }

    /// The length of a shipment's stored timeline (0 for one never seen).
    fn scans_stored_for(&self, tracking_number: &TrackingNumber) -> Result<u64, StoreError> {
        let key = keys::shipment_key(tracking_number);
        Ok(match self.db.get_cf(self.cf(keys::SHIPMENTS), key)? {
            Some(bytes) => records::decode_shipment_record(key, &bytes)?.timeline.len() as u64,
            None => 0,
        })
    }

    /// A shipment with its timeline in order, read from one snapshot.
    pub fn shipment(
        &self,
        tracking_number: &TrackingNumber,
    ) -> Result<Option<pb::Shipment>, StoreError> {
        let snapshot = self.db.snapshot();
        let key = keys::shipment_key(tracking_number);
        let Some(bytes) = snapshot.get_cf(self.cf(keys::SHIPMENTS), key)? else {
            return Ok(None);
        };
        let state = records::decode_shipment(key, &bytes)?;
        let timeline = self
            .scans_at(&snapshot, tracking_number, key, &bytes)?
            .into_iter()
            .map(|scan| {
                pb::Scan::decode(scan.as_slice()).map_err(|e| StoreError::Corrupt {
                    key: tracking_number.to_string(),
                    what: e.to_string(),
                })
            })
            .collect::<Result<_, _>>()?;
        let (status, sub_status) = crate::api::status_fields(state.point());
        let stalled_status = crate::api::stalled_status(state.point());
        let flags = state.flags;
        Ok(Some(pb::Shipment {
            tracking_number: tracking_number.to_string(),
            status,
            sub_status,
            version: state.version.0,
            timeline,
            scans_after_terminal: state.derived.scans_after_terminal,
            stalled_status,
            regressions: flags.regressions,
            clock_skewed_scans: flags.clock_skewed_scans,
            carrier: flags.tracking_number.carrier,
            carrier_service: flags.tracking_number.service,
            tracking_number_issue: flags.tracking_number.issue,
        }))
    }

    /// Up to `limit` changes with a sequence above `after` and at most `upto`, in order: from
    /// the block holding `after + 1` (the last block starting at or before it) onwards. Readers
    /// pass the durable sequence (the writer's watch) as `upto`: the log may already hold
    /// changes of a write whose WAL sync is still under way.
    pub fn changes(
        &self,
        after: Sequence,
        upto: Sequence,
        limit: usize,
    ) -> Result<Vec<pb::StatusChange>, StoreError> {
        let Some(start) = after.0.checked_add(1) else {
            return Ok(Vec::new());
        };
        let limit =
            limit.min(usize::try_from(upto.0.saturating_sub(after.0)).unwrap_or(usize::MAX));
        let start_key = keys::change_key(Sequence(start));
        let mut blocks = self.db.raw_iterator_cf(self.cf(keys::CHANGES));
        blocks.seek_for_prev(start_key);
        if !blocks.valid() {
            blocks.status()?;
            blocks.seek(start_key);
        }
        let mut out = Vec::new();
        while out.len() < limit {
            let Some((key, value)) = blocks.item() else {
                blocks.status()?;
                break;
            };
            let block = records::decode_change_block(key, value)?;
            out.extend(
                block
                    .changes
                    .into_iter()
                    .filter(|c| c.sequence >= start)
                    .take(limit - out.len()),
            );
            blocks.next();
        }
        Ok(out)
    }
}

/// Puts `records` (consecutive sequences, in order) into the change log as blocks of at most
/// `keys::CHANGES_PER_BLOCK`, each keyed by its first sequence.
pub(crate) fn put_change_blocks(
    batch: &mut rocksdb::WriteBatch,
    cf: &ColumnFamily,
    records: &[records::ChangeRecord<'_>],
) {
    for block in records.chunks(keys::CHANGES_PER_BLOCK) {
        if let Some(first) = block.first() {
            batch.put_cf(
                cf,
                keys::change_key(Sequence(first.sequence)),
                records::encode_change_block(block),
            );
        }
    }
}

fn records_of(changes: &[pb::StatusChange]) -> Vec<records::ChangeRecord<'_>> {
    changes.iter().map(records::ChangeRecord::of).collect()
}

/// Copies the change log of an earlier build (a key per change) into blocks, in one write, so
/// feeds and sinks resume at the same sequences after the upgrade.
fn migrate_legacy_changes(db: &DB) -> Result<(), StoreError> {
    let (Some(legacy), Some(blocks)) = (
        db.cf_handle(keys::LEGACY_CHANGES),
        db.cf_handle(keys::CHANGES),
    ) else {
        return Ok(());
    };
    let mut batch = rocksdb::WriteBatch::default();
    let mut pending = Vec::with_capacity(keys::CHANGES_PER_BLOCK);
    let mut migrated = 0u64;
    for item in db.iterator_cf(legacy, IteratorMode::Start) {
        let (key, value) = item?;
        let change = pb::StatusChange::decode(value.as_ref()).map_err(|e| StoreError::Corrupt {
            key: format!("change {:?}", keys::decode_change_key(&key)),
            what: e.to_string(),
        })?;
        pending.push(change);
        migrated += 1;
        if pending.len() == keys::CHANGES_PER_BLOCK {
            put_change_blocks(&mut batch, blocks, &records_of(&pending));
            pending.clear();
        }
    }
    put_change_blocks(&mut batch, blocks, &records_of(&pending));
    let mut sync = rocksdb::WriteOptions::default();
    sync.set_sync(true);
    db.write_opt(batch, &sync)?;
    tracing::info!(changes = migrated, "change log moved into blocks");
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

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

    /// The directory opened raw with `column_families`, as an earlier build would have left it.
    fn earlier_build<'a>(
        config: &StoreConfig,
        column_families: impl IntoIterator<Item = &'a str>,
    ) -> DB {
        let mut options = Options::default();
        options.create_if_missing(true);
        options.create_missing_column_families(true);
        DB::open_cf(&options, &config.path, column_families).expect("opens")
    }

    #[test]
    fn a_retired_column_family_is_dropped_and_the_rest_kept() {
        let (dir, config) = temp_config();
        {
            let names = keys::ALL_COLUMN_FAMILIES
                .into_iter()
                .chain(keys::RETIRED_COLUMN_FAMILIES);
            let db = earlier_build(&config, names);
            let events = db.cf_handle(keys::EVENTS).expect("events");
            db.put_cf(events, b"kept", b"1").expect("put");
        }
        let store = Store::open(&config).expect("opens with the retired family present");
        assert_eq!(
            store
                .db
                .get_cf(store.cf(keys::EVENTS), b"kept")
                .expect("get"),
            Some(b"1".to_vec())
        );
        drop(store);
        let left = DB::list_cf(&Options::default(), dir.path()).expect("lists");
        assert!(
            keys::RETIRED_COLUMN_FAMILIES
                .iter()
                .all(|name| !left.iter().any(|l| l == name)),
            "{left:?}"
        );
        Store::open(&config).expect("reopens");
    }

    fn change(sequence: u64) -> pb::StatusChange {
        pb::StatusChange {
            sequence,
            tracking_number: format!("PARCEL{sequence:04}"),
            version: 1,
            ..Default::default()
        }
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
    fn a_change_log_of_one_key_per_change_is_moved_into_blocks_at_open() {
        let (dir, config) = temp_config();
        {
            let names = [
                keys::EVENTS,
                keys::SHIPMENTS,
                keys::LEGACY_CHANGES,
                keys::META,
            ];
            let db = earlier_build(&config, names);
            let legacy = db.cf_handle(keys::LEGACY_CHANGES).expect("changes");
            for sequence in 1..=600 {
                db.put_cf(
                    legacy,
                    keys::change_key(Sequence(sequence)),
                    change(sequence).encode_to_vec(),
                )
                .expect("put");
            }
        }
        let store = Store::open(&config).expect("opens and migrates");
        assert_eq!(
            sequences(
                &store
                    .changes(Sequence(0), Sequence(u64::MAX), 1000)
                    .expect("reads")
            ),
            (1..=600).collect::<Vec<_>>()
        );
        assert_eq!(
            store
                .changes(Sequence(599), Sequence(u64::MAX), 10)
                .expect("reads"),
            vec![change(600)]
        );
        drop(store);
        let left = DB::list_cf(&Options::default(), dir.path()).expect("lists");
        assert!(!left.iter().any(|l| l == keys::LEGACY_CHANGES), "{left:?}");
    }

    /// A snapshot as a writer builds one: its record's timeline lists the scans it carries.
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
        writer::Snapshot {
            tracking_number: number.into(),
            topic: "scans.raw".into(),
            partition: 1,
            next_offset,
            record: records::encode_shipment(&state),
            events: scan_ids
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
                .collect(),
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
            snapshot("PARCEL0001", 10, &["a", "b"]).events
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
            snapshot("PARCEL0001", 41, &["g"]).events
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
            "data directory has schema version 99; this build reads 3"
        );
    }

    #[test]
    fn version_1_and_2_directories_open_and_are_marked_current() {
        for old in [1u32, 2] {
            let (_dir, config) = temp_config();
            {
                let store = Store::open(&config).expect("opens");
                store
                    .db
                    .put_cf(
                        store.cf(keys::META),
                        keys::META_SCHEMA_VERSION,
                        old.to_be_bytes(),
                    )
                    .expect("writes");
            }
            let store = Store::open(&config).expect("upgrades");
            let version = store
                .db
                .get_cf(store.cf(keys::META), keys::META_SCHEMA_VERSION)
                .expect("reads");
            assert_eq!(version.as_deref(), Some(&3u32.to_be_bytes()[..]));
        }
    }
}
