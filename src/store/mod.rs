//! The store: RocksDB behind one door. Column families and key layouts live in `keys`, value
//! codecs in `codec` (with the shipments' merge operator, `codec::merge`); `open` opens and tunes the
//! database, `reads` serves readers, and every write of shipment state goes through the single
//! `writer`, which turns an engine result into one atomic `WriteBatch` made durable by its
//! syncer before anything is acknowledged.
//!
//! Invariants:
//! - One writer of shipment state: the writer thread, which also runs changelog restores as
//!   jobs in its queue, so a shipment's read-modify-write never races another write. The only
//!   other writes are a sink's cursor and the changelog task's decisions (`replicated`), keys
//!   in `meta` no one else writes.
//! - Atomic and durable before acknowledged: a group's scans, shipment records, status changes,
//!   counters and source offsets land in one WriteBatch whose WAL sync returned before any ack.
//! - A shipment's record holds its scans, so one point read gives a consistent shipment.

pub mod backup;
pub mod cache;
mod change_log;
pub mod codec;
pub mod keys;
pub mod writer;

mod open;
mod reads;
pub mod replicated;
#[cfg(test)]
pub(crate) mod tests;

use std::path::{Path, PathBuf};
use std::{sync::Arc, time::SystemTime};

use rocksdb::{Cache, ColumnFamily, Options, DB};
use serde::{Deserialize, Serialize};

use crate::domain::Sequence;
pub use open::{memtable_bucket_count, prefix_by_tracking_number};

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
    #[error("the store's WAL syncer has stopped; nothing more can be acknowledged")]
    SyncerGone,
    #[error("could not start the store writer: {0}")]
    WriterThread(#[from] std::io::Error),
    #[error("store write failed, nothing acknowledged: {0}")]
    WriteFailed(String),
    #[error(
        "store refuses writes (disk full or read-only?): {0}; nothing of this batch was \
         stored, resend it later"
    )]
    Unwritable(String),
    #[error("backup: {0}")]
    Backup(String),
}

/// Shared read access to the database; the writer holds the only write path.
#[derive(Clone)]
pub struct Store {
    db: Arc<DB>,
    /// Holds RocksDB's statistics (tickers) and the block cache, for metrics.
    telemetry: Arc<StoreTelemetry>,
}

struct StoreTelemetry {
    options: Options,
    cache: Cache,
    cache_capacity: usize,
    /// RocksDB's stall time (µs) at the previous reading, and when: the stall ratio is the
    /// share of the time between two readings that writes stalled.
    stall_sample: std::sync::Mutex<(u64, std::time::Instant)>,
}

fn now_unix_secs() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Store {
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
        if let Ok(stat) = rustix::fs::statvfs(self.path()) {
            metrics::gauge!(m::STORE_DISK_FREE_BYTES)
                .set((stat.f_bavail.saturating_mul(stat.f_frsize)) as f64);
        }
        let telemetry = &self.telemetry;
        let stall_micros = telemetry.options.get_ticker_count(Ticker::StallMicros);
        let now = std::time::Instant::now();
        let (before, then) = std::mem::replace(
            &mut *telemetry
                .stall_sample
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
            (stall_micros, now),
        );
        let elapsed = now.duration_since(then).as_micros() as f64;
        if elapsed > 0.0 {
            let stalled = stall_micros.saturating_sub(before) as f64;
            metrics::gauge!(m::ROCKSDB_WRITE_STALL_RATIO).set((stalled / elapsed).min(1.0));
        }
        metrics::gauge!(m::ROCKSDB_BLOCK_CACHE_USAGE_BYTES).set(telemetry.cache.get_usage() as f64);
        metrics::gauge!(m::ROCKSDB_BLOCK_CACHE_CAPACITY_BYTES).set(telemetry.cache_capacity as f64);
        metrics::counter!(m::ROCKSDB_BLOCK_CACHE_HITS_TOTAL)
            .absolute(telemetry.options.get_ticker_count(Ticker::BlockCacheHit));
        metrics::counter!(m::ROCKSDB_BLOCK_CACHE_MISSES_TOTAL)
            .absolute(telemetry.options.get_ticker_count(Ticker::BlockCacheMiss));
        Ok(())
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
}

/// Puts `records` (consecutive sequences, in order) into the change log as blocks of at most
/// `keys::CHANGES_PER_BLOCK`, each keyed by its first sequence.
pub(crate) fn put_change_blocks(
    batch: &mut rocksdb::WriteBatch,
    cf: &ColumnFamily,
    records: &[codec::ChangeRecord<'_>],
) {
    for block in records.chunks(keys::CHANGES_PER_BLOCK) {
        if let Some(first) = block.first() {
            batch.put_cf(
                cf,
                keys::change_key(Sequence(first.sequence)),
                codec::encode_change_block(block),
            );
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// RocksDB data directory.
    pub path: PathBuf,
    /// Shared block cache, in bytes.
    pub block_cache_bytes: usize,
    /// Size of one memtable, in bytes (per column family).
    pub memtable_bytes: usize,
    /// All memtables together, in bytes: beyond it RocksDB flushes the largest, so memory stays
    /// bounded however many column families are busy.
    pub memtables_total_bytes: usize,
    /// Ingest batches waiting for the writer; beyond this, callers wait (backpressure).
    pub queue_batches: usize,
    /// Most ingest batches the writer combines into one synced write (group commit).
    pub group_commit_batches: usize,
    /// Shipments whose state the writer keeps decoded in memory (0 = none); ~1 KiB each.
    pub shipment_cache_entries: usize,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            path: PathBuf::from("./data"),
            block_cache_bytes: 128 * 1024 * 1024,
            memtable_bytes: 64 * 1024 * 1024,
            memtables_total_bytes: 192 * 1024 * 1024,
            queue_batches: 64,
            group_commit_batches: 32,
            shipment_cache_entries: 100_000,
        }
    }
}
