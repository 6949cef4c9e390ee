//! Replication of a partition's shipments to the changelog: after each durable write, the
//! stored record (scans included) of every shipment a source partition owns, then a marker per
//! partition saying its state is complete up to the group's offsets, so a new owner resumes at
//! the last marker.

use std::collections::HashMap;

use super::{Request, Writer};
use crate::domain::scan::ValidScan;
use crate::domain::{Origin, TrackingNumber};
use crate::engine::ShipmentState;
use crate::store::StoreError;

/// A changelog record (`scand.storage.v1.Snapshot`): one shipment's stored record, scans
/// included, after a durable write, with the partition position the state covers; or a marker.
pub use crate::proto::storage::Snapshot;

impl Snapshot {
    /// Marks a partition's state complete up to `next_offset` (no shipment: empty number).
    pub fn marker(topic: &str, partition: i32, next_offset: i64) -> Self {
        Snapshot {
            topic: topic.to_owned(),
            partition,
            next_offset,
            ..Snapshot::default()
        }
    }

    pub fn is_marker(&self) -> bool {
        self.tracking_number.is_empty()
    }

    /// The compaction key: the shipment, or one marker key per source topic.
    pub fn key(&self) -> String {
        if self.is_marker() {
            format!("\u{0}marker\u{0}{}", self.topic)
        } else {
            self.tracking_number.clone()
        }
    }
}

impl Writer {
    /// Snapshots of the stalled shipments that a source partition owns, positioned at the
    /// partition's stored offset (the state includes everything before it).
    pub(super) fn owned_snapshots(
        &self,
        shipments: &[(TrackingNumber, ShipmentState)],
    ) -> Result<Vec<Snapshot>, StoreError> {
        let mut snapshots = Vec::new();
        for (number, state) in shipments {
            let Some(owner) = &state.owner else { continue };
            let Some(record) = self.store.shipment_record(number)? else {
                continue;
            };
            let next_offset = self
                .store
                .source_offset(&owner.topic, owner.partition)?
                .unwrap_or_default();
            snapshots.push(Snapshot {
                tracking_number: number.to_string(),
                topic: owner.topic.clone(),
                partition: owner.partition,
                next_offset,
                record,
            });
        }
        Ok(snapshots)
    }

    /// The state of every shipment of the group that a source partition owns, for the
    /// changelog, then a marker per partition saying its state is complete up to the group's
    /// offsets: a new owner resumes at the last marker, never beyond a missing snapshot.
    pub(super) fn snapshots(
        &self,
        group: &[Request],
        scans: &[&ValidScan],
    ) -> Result<Vec<Snapshot>, StoreError> {
        let mut owned: HashMap<&TrackingNumber, &Origin> = HashMap::new();
        for scan in scans {
            if let Some(origin) = &scan.origin {
                owned.insert(&scan.tracking_number, origin);
            }
        }
        let next_offset = |topic: &str, partition: i32| {
            group
                .iter()
                .flat_map(|r| &r.offsets)
                .filter(|o| o.topic == topic && o.partition == partition)
                .map(|o| o.next)
                .max()
                .unwrap_or_default()
        };
        let mut snapshots = Vec::with_capacity(owned.len() + 1);
        for (number, origin) in owned {
            let Some(record) = self.store.shipment_record(number)? else {
                continue;
            };
            snapshots.push(Snapshot {
                tracking_number: number.to_string(),
                topic: origin.topic.clone(),
                partition: origin.partition,
                next_offset: next_offset(&origin.topic, origin.partition),
                record,
            });
        }
        let mut partitions: Vec<(&str, i32)> = group
            .iter()
            .flat_map(|r| &r.offsets)
            .map(|o| (o.topic.as_str(), o.partition))
            .collect();
        partitions.sort_unstable();
        partitions.dedup();
        for (topic, partition) in partitions {
            snapshots.push(Snapshot::marker(
                topic,
                partition,
                next_offset(topic, partition),
            ));
        }
        Ok(snapshots)
    }
}
