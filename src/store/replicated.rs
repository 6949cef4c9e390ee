//! What the changelog task has decided of this instance's change log: a change of a replicated
//! shipment is published only once a snapshot covering it is on the changelog, and never if
//! its snapshot was dropped (its partition moved; the next owner derives it again). The Kafka
//! sink publishes up to `through`, skipping `void`.
//!
//! Invariants:
//! - `through` only grows, and a change is in `void` only if no snapshot of this instance on
//!   the changelog carries it.
//! - Stored before the sink is told, so a published or skipped change stays decided.

use std::collections::{BTreeSet, HashMap};

use prost::Message;

use super::{keys, Store, StoreError};
use crate::domain::Sequence;
use crate::proto::storage::Replicated;

/// Every change up to `through` is decided; those in `void` are never published.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Decided {
    pub through: Sequence,
    pub void: BTreeSet<u64>,
}

/// The decisions with the changelog offsets a recovery reads this instance's snapshots from.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReplicationProgress {
    pub decided: Decided,
    pub floors: HashMap<i32, i64>,
}

impl Store {
    /// The stored decisions; `None` before scale-out first ran on this data directory.
    pub fn replication_progress(&self) -> Result<Option<ReplicationProgress>, StoreError> {
        let Some(bytes) = self.db.get_cf(self.cf(keys::META), keys::META_REPLICATED)? else {
            return Ok(None);
        };
        let stored = Replicated::decode(bytes.as_slice()).map_err(|e| StoreError::Corrupt {
            key: String::from_utf8_lossy(keys::META_REPLICATED).into_owned(),
            what: e.to_string(),
        })?;
        Ok(Some(ReplicationProgress {
            decided: Decided {
                through: Sequence(stored.through),
                void: stored.void.into_iter().collect(),
            },
            floors: stored.floors,
        }))
    }

    /// Stores the decisions without the void changes the Kafka sink has passed, and returns
    /// where the sink is. `sync`: made durable before returning (a recovery's decisions);
    /// otherwise with the next WAL sync.
    pub fn set_replication_progress(
        &self,
        progress: &ReplicationProgress,
        sync: bool,
    ) -> Result<Sequence, StoreError> {
        let passed = self.sink_cursor(keys::KAFKA_SINK)?;
        let stored = Replicated {
            through: progress.decided.through.0,
            void: progress
                .decided
                .void
                .range(passed.0 + 1..)
                .copied()
                .collect(),
            floors: progress.floors.clone(),
        };
        self.db.put_cf(
            self.cf(keys::META),
            keys::META_REPLICATED,
            stored.encode_to_vec(),
        )?;
        if sync {
            self.db.flush_wal(true)?;
        }
        Ok(passed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decisions_come_back_without_the_void_changes_the_sink_passed() {
        let (_dir, store) = crate::store::tests::temp_store();
        assert_eq!(store.replication_progress().ok(), Some(None));
        let progress = ReplicationProgress {
            decided: Decided {
                through: Sequence(40),
                void: BTreeSet::from([3, 17, 38]),
            },
            floors: HashMap::from([(0, 12), (5, 7)]),
        };
        store
            .set_sink_position(keys::KAFKA_SINK, Sequence(17), &Default::default())
            .expect("sink position");
        assert_eq!(
            store.set_replication_progress(&progress, false).ok(),
            Some(Sequence(17))
        );
        let back = store.replication_progress().expect("read").expect("stored");
        assert_eq!(back.decided.through, Sequence(40));
        assert_eq!(back.decided.void, BTreeSet::from([38]));
        assert_eq!(back.floors, progress.floors);
    }
}
