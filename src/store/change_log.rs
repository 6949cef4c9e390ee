//! The change log's retention: blocks of changes leave the log, oldest first, once every change
//! in them was committed longer ago than the retention and every sink delivered it. One range
//! delete and the new first sequence go in one write, so a reader that finds a change missing
//! also finds the first sequence moved past it (and ends with OUT_OF_RANGE, never a gap).

use std::time::SystemTime;

use rocksdb::{IteratorMode, WriteBatch};

use super::{codec, keys, Store, StoreError};
use crate::domain::Sequence;
use crate::telemetry::metrics as m;

/// Most blocks one trim looks at: the next sweep goes on where it stopped.
const TRIM_BLOCKS: usize = 4_096;

impl Store {
    /// Oldest sequence the change log keeps (1 until it was first trimmed).
    pub fn first_sequence(&self) -> Result<Sequence, StoreError> {
        Ok(self
            .db
            .get_cf(self.cf(keys::META), keys::META_FIRST_SEQUENCE)?
            .and_then(|v| keys::decode_change_key(&v))
            .unwrap_or(Sequence(1)))
    }

    /// Removes the blocks whose changes were all committed before `older_than` and delivered
    /// by each of `sinks`; returns how many changes left the log.
    pub fn trim_change_log(
        &self,
        older_than: SystemTime,
        sinks: &[&str],
    ) -> Result<u64, StoreError> {
        let mut delivered = u64::MAX;
        for sink in sinks {
            delivered = delivered.min(self.sink_cursor(sink)?.0);
        }
        let cutoff = prost_types::Timestamp::from(older_than);
        let cutoff = (cutoff.seconds, cutoff.nanos);
        let cf = self.cf(keys::CHANGES);
        let mut first = None;
        let mut end = None;
        for item in self
            .db
            .iterator_cf(cf, IteratorMode::Start)
            .take(TRIM_BLOCKS)
        {
            let (key, value) = item?;
            let block = codec::decode_change_block(&key, &value)?;
            let Some(last) = block.changes.last() else {
                continue;
            };
            let committed = last
                .committed_time
                .map_or((i64::MAX, 0), |t| (t.seconds, t.nanos));
            if committed >= cutoff || last.sequence > delivered {
                break;
            }
            first.get_or_insert(keys::decode_change_key(&key));
            end = Some(last.sequence + 1);
        }
        let (Some(Some(first)), Some(end)) = (first, end) else {
            return Ok(0);
        };
        let mut batch = WriteBatch::default();
        batch.delete_range_cf(cf, keys::change_key(first), keys::change_key(Sequence(end)));
        batch.put_cf(
            self.cf(keys::META),
            keys::META_FIRST_SEQUENCE,
            keys::change_key(Sequence(end)),
        );
        self.db.write(batch)?;
        let removed = end - first.0;
        metrics::gauge!(m::CHANGE_LOG_FIRST_SEQUENCE).set(end as f64);
        metrics::counter!(m::RETENTION_REMOVED_TOTAL, "what" => "changes").increment(removed);
        Ok(removed)
    }
}
