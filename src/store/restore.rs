//! Restore of a source partition's shipments replicated from its previous owner.

use super::{keys, records, writer::Snapshot, Store, StoreError};
use crate::domain::TrackingNumber;

impl Store {
    /// Installs shipments of one source partition replicated from its previous owner: every
    /// snapshot newer than the local state replaces the stored record of its shipment (scans
    /// included, byte for byte as the snapshot carries them), and the partition resumes at
    /// `resume` (the last complete-state marker) unless the local state is further along. One
    /// synced write, counted in the stored scans.
    pub fn restore(
        &self,
        topic: &str,
        partition: i32,
        snapshots: &[Snapshot],
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
            let number = TrackingNumber::parse(&snapshot.tracking_number).map_err(|e| {
                StoreError::Corrupt {
                    key: snapshot.tracking_number.clone(),
                    what: e.to_string(),
                }
            })?;
            let key = keys::shipment_key(&number);
            let record = records::decode_shipment_record(key, &snapshot.record)?;
            let had = match scan_counts.get(&number) {
                Some(&(had, _)) => had,
                None => self.scans_stored_for(&number)?,
            };
            scan_counts.insert(number.clone(), (had, record.timeline.len() as u64));
            batch.put_cf(self.cf(keys::SHIPMENTS), key, &snapshot.record);
            // The deadline index is local: rebuild this shipment's entry from its record.
            let state = records::decode_shipment(key, &snapshot.record)?;
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
}
