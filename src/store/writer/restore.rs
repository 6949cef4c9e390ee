//! A changelog restore, as jobs of the writer: installs the shipments of one source partition
//! replicated from its previous owner, a chunk at a time, then stores where the partition's
//! consumption resumes and puts back the deadlines parked while it was owned elsewhere. On the
//! writer thread, so no write of shipment state ever races another, and the writer's cache and
//! counters stay the store's.

use rocksdb::{Direction, IteratorMode, ReadOptions, WriteBatch, WriteOptions};

use std::collections::{HashMap, HashSet};

use super::{Snapshot, Writer};
use crate::domain::{Origin, TrackingNumber};
use crate::store::{codec, keys, StoreError};
use crate::telemetry::metrics as m;

/// Most parked deadlines one resume job puts back: it holds the writer like a group does.
const UNPARK_CHUNK: usize = 1_024;

/// A source partition read again from its changelog marker up to where this instance had
/// applied it (`until`). A shipment of the partition that the changelog does not hold at all
/// (not `installed`) was never replicated: its state here is dropped when the records read
/// again first touch it, so its changes are derived anew (the old ones are void).
#[derive(Debug, Default)]
pub(super) struct Reread {
    until: i64,
    installed: HashSet<TrackingNumber>,
}

/// The restores' memory between jobs: the shipments each restore installed so far, and the
/// partitions being read again.
#[derive(Debug, Default)]
pub(super) struct Rereads {
    installing: HashMap<(String, i32), HashSet<TrackingNumber>>,
    active: HashMap<(String, i32), Reread>,
}

impl Rereads {
    /// Whether this is the first scan of `number` from `origin` while its partition is read
    /// again and the changelog did not hold it: then its state here (if of that partition) must
    /// go. Each number is looked at once a reread.
    pub(super) fn first_touch(&mut self, origin: &Origin, number: &TrackingNumber) -> bool {
        if self.active.is_empty() {
            return false;
        }
        self.active
            .get_mut(&(origin.topic.clone(), origin.partition))
            .is_some_and(|reread| reread.installed.insert(number.clone()))
    }

    /// Consumption of the partition reached `next`: a reread that far is over.
    pub(super) fn reached(&mut self, topic: &str, partition: i32, next: i64) {
        if self.active.is_empty() {
            return;
        }
        let key = (topic.to_owned(), partition);
        if self.active.get(&key).is_some_and(|r| next >= r.until) {
            self.active.remove(&key);
        }
    }
}

impl Writer {
    /// Every snapshot replaces the stored record of its shipment (scans included, byte for
    /// byte as the snapshot carries them; the change sequences, which name the previous
    /// owner's change log, left out) and is indexed at its deadline: the changelog is the
    /// partition's state, and whatever this instance holds beyond it was never replicated, so
    /// its changes are void and are derived again from the records read again. One synced
    /// write, counted in the stored scans; the restored shipments leave the cache.
    pub(super) fn install(
        &mut self,
        topic: &str,
        partition: i32,
        snapshots: &[Snapshot],
    ) -> Result<usize, StoreError> {
        let store = &self.store;
        let mut batch = WriteBatch::default();
        let mut restored = Vec::new();
        // Per restored shipment: the scans it had here, and those it has restored.
        let mut scan_counts: HashMap<TrackingNumber, (u64, u64)> = HashMap::new();
        for snapshot in snapshots {
            let number = TrackingNumber::parse(&snapshot.tracking_number).map_err(|e| {
                StoreError::Corrupt {
                    key: snapshot.tracking_number.clone(),
                    what: e.to_string(),
                }
            })?;
            let key = keys::shipment_key(&number);
            let record = codec::decode_shipment_record(key, &snapshot.record)?;
            let had = match scan_counts.get(&number) {
                Some(&(had, _)) => had,
                None => store.scans_stored_for(&number)?,
            };
            scan_counts.insert(number.clone(), (had, record.timeline.len() as u64));
            // The sequences the record lists are the previous owner's change log's.
            let record_here = codec::without_change_sequences(key, &snapshot.record)?;
            batch.put_cf(store.cf(keys::SHIPMENTS), key, record_here);
            // The deadline index is local: this shipment's entry, at the deadline its record
            // says it is indexed at. An entry of the state it replaces is dropped by the
            // sweep, which finds it stale.
            let state = codec::decode_shipment(key, &snapshot.record)?;
            if let Some(deadline) = state.stall_deadline {
                batch.put_cf(
                    store.cf(keys::STALL_DEADLINES),
                    keys::stall_key(deadline, &number),
                    [],
                );
            }
            restored.push(number);
        }
        let now_stored = scan_counts
            .values()
            .fold(self.stored_scans, |n, &(had, now)| {
                (n + now).saturating_sub(had)
            });
        batch.put_cf(
            store.cf(keys::META),
            keys::META_STORED_SCANS,
            now_stored.to_be_bytes(),
        );
        let mut sync = WriteOptions::default();
        sync.set_sync(true);
        store.db.write_opt(batch, &sync)?;
        self.stored_scans = now_stored;
        for number in &restored {
            self.cache.forget(number);
        }
        let count = restored.len();
        self.rereads
            .installing
            .entry((topic.to_owned(), partition))
            .or_default()
            .extend(restored);
        Ok(count)
    }

    /// Stores where the partition resumes: `resume`, the changelog's last complete-state
    /// marker, even when the state here is further along: what this instance applied past
    /// the marker was never replicated (its snapshots were left at a release that could not
    /// wait for them, or lost in a crash), so those records are read again (their scans come
    /// back as duplicates) and their shipments replicated; resuming further would leave the
    /// next owner without them. Then puts back up to [`UNPARK_CHUNK`] of the partition's
    /// parked deadlines at the deadline each shipment's record holds. One synced write;
    /// returns the offset and whether more are parked.
    /// On the first call of a restore (`first`), a partition read again from before its
    /// stored offset gets a [`Reread`] until consumption is back there.
    pub(super) fn resume(
        &mut self,
        topic: &str,
        partition: i32,
        resume: i64,
        first: bool,
    ) -> Result<(i64, bool), StoreError> {
        let store = &self.store;
        let from = resume;
        let local = store.source_offset(topic, partition)?;
        if first {
            let key = (topic.to_owned(), partition);
            self.rereads.active.remove(&key);
            let installed = self.rereads.installing.remove(&key).unwrap_or_default();
            if let Some(until) = local.filter(|l| *l > from) {
                self.rereads.active.insert(key, Reread { until, installed });
            }
        }
        if let Some(local) = local.filter(|l| *l > from) {
            metrics::counter!(m::KAFKA_RECORDS_REREAD_TOTAL).increment((local - from) as u64);
            tracing::info!(
                topic,
                partition,
                from,
                local,
                "state applied here past the changelog is read again to be replicated"
            );
        }
        let index = store.cf(keys::STALL_DEADLINES);
        let mut batch = WriteBatch::default();
        batch.put_cf(
            store.cf(keys::META),
            keys::source_offset_key(topic, partition),
            from.to_be_bytes(),
        );
        let prefix = keys::parked_prefix(topic, partition);
        let mut read = ReadOptions::default();
        read.set_iterate_range(rocksdb::PrefixRange(prefix.as_slice()));
        let mut parked = Vec::new();
        for item in
            store
                .db
                .iterator_cf_opt(index, read, IteratorMode::From(&prefix, Direction::Forward))
        {
            let (key, _) = item?;
            if parked.len() == UNPARK_CHUNK {
                break;
            }
            batch.delete_cf(index, &key);
            if let Some(number) = keys::decode_parked_key(&prefix, &key) {
                parked.push(number);
            }
        }
        let more = parked.len() == UNPARK_CHUNK;
        let numbers: Vec<&TrackingNumber> = parked.iter().collect();
        for (number, state) in parked.iter().zip(store.shipment_states(&numbers)?) {
            // A number retention forgot meanwhile has nothing left to sweep.
            if let Some(deadline) = state.and_then(|s| s.stall_deadline) {
                batch.put_cf(index, keys::stall_key(deadline, number), []);
            }
        }
        let mut sync = WriteOptions::default();
        sync.set_sync(true);
        store.db.write_opt(batch, &sync)?;
        Ok((from, more))
    }
}
