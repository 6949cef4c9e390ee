//! A changelog restore, as a job of the writer: installs the shipments of one source partition
//! replicated from its previous owner. On the writer thread, so no write of shipment state
//! ever races another, and the writer's cache and counters stay the store's.

use rocksdb::{WriteBatch, WriteOptions};

use super::{Snapshot, Writer};
use crate::domain::TrackingNumber;
use crate::store::{codec, keys, StoreError};

impl Writer {
    /// Every snapshot newer than the local state replaces the stored record of its shipment
    /// (scans included, byte for byte as the snapshot carries them; the change sequences,
    /// which name the previous owner's change log, left out), and the partition resumes
    /// at `resume` (the last complete-state marker) unless the local state is further along.
    /// One synced write, counted in the stored scans; the restored shipments leave the cache.
    pub(super) fn restore(
        &mut self,
        topic: &str,
        partition: i32,
        snapshots: &[Snapshot],
        resume: i64,
    ) -> Result<usize, StoreError> {
        let store = &self.store;
        let local = store.source_offset(topic, partition)?.unwrap_or(-1);
        let mut batch = WriteBatch::default();
        let mut restored = Vec::new();
        // Per restored shipment: the scans it had here, and those it has restored.
        let mut scan_counts: std::collections::HashMap<TrackingNumber, (u64, u64)> =
            std::collections::HashMap::new();
        for snapshot in snapshots.iter().filter(|s| s.next_offset > local) {
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
            // The deadline index is local: rebuild this shipment's entry from its record.
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
        batch.put_cf(
            store.cf(keys::META),
            keys::source_offset_key(topic, partition),
            resume.max(local).to_be_bytes(),
        );
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
        Ok(restored.len())
    }
}
