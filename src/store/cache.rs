//! The writer's cache of shipment state: the engine's view of recently touched shipments, so a
//! group does not read and decode their records again. Owned by the writer thread alone.
//!
//! The engine applies a group to the cached states in place: a group's shipments are looked up
//! once, with no copy in and out of a separate map.
//!
//! Invariants:
//! - Write-through: between groups every entry equals the stored record. A group changes its
//!   entries before its write; if that write fails, the writer empties the cache, so the next
//!   group reads the stored state again.
//! - Only the writer writes shipment records; what it writes without applying a group (a
//!   stall, a changelog restore) it forgets here, so the next group reads it again.
//! - Bounded by entry count between groups: after a group's write that left it over its
//!   capacity, the cache evicts down to three quarters of it (arbitrary entries: a hash map's order is as good as random here, and costs no
//!   bookkeeping per access). During a group it also holds that group's shipments.

use crate::domain::TrackingNumber;
use crate::engine::{ShipmentState, States};

pub struct ShipmentCache {
    entries: States,
    capacity: usize,
}

impl ShipmentCache {
    pub fn new(capacity: usize) -> Self {
        Self {
            entries: States::with_capacity_and_hasher(capacity.min(1 << 16), Default::default()),
            capacity,
        }
    }

    pub fn contains(&self, number: &TrackingNumber) -> bool {
        self.entries.contains_key(number)
    }

    pub fn get(&self, number: &TrackingNumber) -> Option<&ShipmentState> {
        self.entries.get(number)
    }

    /// Adds a state read from the store.
    pub fn insert(&mut self, number: TrackingNumber, state: ShipmentState) {
        self.entries.insert(number, state);
    }

    /// The states a group applies to: every shipment it touches must be in it (absent = never
    /// stored); shipments the group creates are added to it.
    pub fn states(&mut self) -> &mut States {
        &mut self.entries
    }

    pub fn forget(&mut self, number: &TrackingNumber) {
        self.entries.remove(number);
    }

    /// Drops everything: a write failed, so entries may be ahead of the store.
    pub fn clear(&mut self) {
        self.entries.clear();
    }

    /// Evicts entries beyond the capacity, once the group that added them is written: a
    /// quarter of the capacity at a time, the rest moved into a fresh table. Removing entries
    /// in place left the table's probe sequences ever longer (a removed slot ends no lookup, and
    /// most lookups are of shipments not cached): after a few million shipments the writer spent
    /// most of its time probing, at a third of its throughput (BENCHMARKS.md, "Retention").
    /// Moving the kept three quarters costs three moves per inserted entry.
    pub fn trim(&mut self) {
        if self.entries.len() <= self.capacity {
            return;
        }
        let keep = self.capacity - self.capacity / 4;
        let kept = std::mem::replace(
            &mut self.entries,
            States::with_capacity_and_hasher(self.capacity + self.capacity / 8, Default::default()),
        );
        self.entries.extend(kept.into_iter().take(keep));
    }

    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn number(i: usize) -> TrackingNumber {
        TrackingNumber::parse(&format!("PARCEL{i:06}")).expect("valid")
    }

    #[test]
    fn a_group_changes_entries_in_place_and_a_failed_write_clears_them() {
        let mut cache = ShipmentCache::new(10);
        cache.insert(number(1), ShipmentState::default());
        assert!(cache.contains(&number(1)));
        cache.states().entry(number(2)).or_default().stalled = true;
        assert!(cache.contains(&number(2)), "created by the group");
        cache.clear();
        assert_eq!(cache.len(), 0);
    }

    #[test]
    fn trims_to_its_capacity() {
        let mut cache = ShipmentCache::new(32);
        for i in 0..100 {
            cache.insert(number(i), ShipmentState::default());
        }
        assert_eq!(cache.len(), 100, "a group may exceed it until its write");
        cache.trim();
        assert_eq!(cache.len(), 24, "a quarter of the capacity below it");
        assert!((0..100).filter(|&i| cache.contains(&number(i))).count() == 24);
        let mut off = ShipmentCache::new(0);
        off.insert(number(1), ShipmentState::default());
        off.trim();
        assert_eq!(off.len(), 0);
    }
}
