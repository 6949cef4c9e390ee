//! The writer's cache of shipment state: the engine's view of recently touched shipments, so a
//! group does not read and decode their records again. Owned by the writer thread alone.
//!
//! Invariants:
//! - Write-through: an entry equals the stored record. The writer takes entries out before
//!   applying a group and puts them back only after the group's write succeeded; a failed write
//!   drops them, so the next group reads the stored state again.
//! - Anything that writes shipment records behind the writer's back (a changelog restore)
//!   bumps the store's restore epoch; a changed epoch empties the cache.
//! - Bounded by entry count; when full, arbitrary entries are evicted (a hash map's order is as
//!   good as random here, and costs no bookkeeping per access).

use crate::domain::TrackingNumber;
use crate::engine::{ShipmentState, States};

pub struct ShipmentCache {
    entries: States,
    capacity: usize,
    epoch: u64,
}

impl ShipmentCache {
    pub fn new(capacity: usize, epoch: u64) -> Self {
        Self {
            entries: States::with_capacity_and_hasher(capacity.min(1 << 16), Default::default()),
            capacity,
            epoch,
        }
    }

    /// Empties the cache if the store was written behind the writer since the last call.
    pub fn check_epoch(&mut self, epoch: u64) {
        if epoch != self.epoch {
            self.entries.clear();
            self.epoch = epoch;
        }
    }

    pub fn take(&mut self, number: &TrackingNumber) -> Option<ShipmentState> {
        self.entries.remove(number)
    }

    pub fn forget(&mut self, number: &TrackingNumber) {
        self.entries.remove(number);
    }

    /// Puts back the states of a durable group, evicting others beyond the capacity.
    pub fn put_all(&mut self, states: impl IntoIterator<Item = (TrackingNumber, ShipmentState)>) {
        if self.capacity == 0 {
            return;
        }
        for (number, state) in states {
            self.entries.insert(number, state);
        }
        let excess = self.entries.len().saturating_sub(self.capacity);
        if excess > 0 {
            // Evict a little more than needed so eviction is not paid on every group.
            let evict = excess + self.capacity / 16;
            let victims: Vec<TrackingNumber> = self.entries.keys().take(evict).cloned().collect();
            for number in victims {
                self.entries.remove(&number);
            }
        }
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
    fn entries_are_taken_out_and_put_back() {
        let mut cache = ShipmentCache::new(10, 0);
        cache.put_all([(number(1), ShipmentState::default())]);
        assert!(cache.take(&number(1)).is_some());
        assert!(cache.take(&number(1)).is_none(), "taken out, not copied");
    }

    #[test]
    fn stays_within_its_capacity() {
        let mut cache = ShipmentCache::new(32, 0);
        cache.put_all((0..100).map(|i| (number(i), ShipmentState::default())));
        assert!(cache.len() <= 32, "{}", cache.len());
        let mut off = ShipmentCache::new(0, 0);
        off.put_all([(number(1), ShipmentState::default())]);
        assert_eq!(off.len(), 0);
    }

    #[test]
    fn a_new_restore_epoch_empties_it() {
        let mut cache = ShipmentCache::new(10, 3);
        cache.put_all([(number(1), ShipmentState::default())]);
        cache.check_epoch(3);
        assert_eq!(cache.len(), 1);
        cache.check_epoch(4);
        assert_eq!(cache.len(), 0);
    }
}
