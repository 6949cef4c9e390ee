//! What the changelog task decides of this instance's changes as its snapshots are delivered
//! or dropped, and where a recovery would read the changelog for those still in doubt.
//!
//! Invariants:
//! - A change is void only if no snapshot of its shipment from its window or later made it to
//!   the changelog: a later snapshot of a shipment carries every earlier change of it.
//! - `through` moves only to the end of a write whose snapshots were all handed over before.
//! - A floor never passes a delivered snapshot of a write beyond `through`, and every later
//!   snapshot lands above the floors (offsets grow per partition).

use std::collections::HashMap;
use std::ops::Range;

use crate::domain::Sequence;
use crate::store::replicated::ReplicationProgress;

/// One snapshot of a window as it went: its shipment (empty for a marker), the changes it
/// carries, and where its pieces landed (`None` for one that never did).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sent {
    pub tracking_number: String,
    pub changes: Range<u64>,
    pub landed: Vec<Option<(i32, i64)>>,
}

impl Sent {
    fn on_log(&self) -> bool {
        self.landed.iter().all(Option::is_some)
    }
}

/// What a window held besides its snapshots: the last write end among them (with how many
/// snapshots came before it) and the changes the writer found void.
#[derive(Debug, Default)]
pub struct WindowEnd {
    pub through: Option<(usize, Sequence)>,
    pub void: Vec<u64>,
}

/// The changelog task's running decisions.
#[derive(Debug)]
pub struct Tracker {
    progress: ReplicationProgress,
    /// Per partition, the offset after this instance's last delivered record.
    next: HashMap<i32, i64>,
    /// Per partition, the lowest offset of a delivered snapshot of a write not yet decided.
    undecided: HashMap<i32, i64>,
}

impl Tracker {
    /// Starts from stored decisions whose floors were the changelog's ends when nothing of
    /// this instance was on its way.
    pub fn new(progress: ReplicationProgress) -> Self {
        Self {
            next: progress.floors.clone(),
            undecided: HashMap::new(),
            progress,
        }
    }

    pub fn progress(&self) -> &ReplicationProgress {
        &self.progress
    }

    /// The Kafka sink has passed `sequence`: void changes up to it need no keeping.
    pub fn forget_void_through(&mut self, sequence: Sequence) {
        let void = &mut self.progress.decided.void;
        *void = void.split_off(&(sequence.0 + 1));
    }

    /// Takes in a window whose every snapshot was delivered or dropped for good; returns how
    /// many changes it found void.
    pub fn record(&mut self, sent: &[Sent], end: WindowEnd) -> usize {
        let decided = &mut self.progress.decided;
        let before = decided.void.len();
        for (index, snapshot) in sent.iter().enumerate() {
            let carried = sent[index..]
                .iter()
                .any(|later| later.tracking_number == snapshot.tracking_number && later.on_log());
            if !carried {
                decided.void.extend(snapshot.changes.clone());
            }
        }
        decided.void.extend(end.void);
        let found = decided.void.len() - before;
        for (partition, offset) in sent.iter().flat_map(|s| s.landed.iter().flatten()) {
            let next = self.next.entry(*partition).or_insert(0);
            *next = (*next).max(offset + 1);
        }
        let undecided_from = match end.through {
            Some((before, through)) => {
                decided.through = decided.through.max(through);
                self.undecided.clear();
                before
            }
            None => 0,
        };
        for (partition, offset) in sent[undecided_from..]
            .iter()
            .flat_map(|s| s.landed.iter().flatten())
        {
            let lowest = self.undecided.entry(*partition).or_insert(*offset);
            *lowest = (*lowest).min(*offset);
        }
        self.progress.floors = self
            .next
            .iter()
            .map(|(partition, next)| {
                let floor = self
                    .undecided
                    .get(partition)
                    .map_or(*next, |u| (*u).min(*next));
                (*partition, floor)
            })
            .collect();
        found
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use crate::store::replicated::Decided;

    fn sent(number: &str, changes: Range<u64>, landed: &[Option<(i32, i64)>]) -> Sent {
        Sent {
            tracking_number: number.into(),
            changes,
            landed: landed.to_vec(),
        }
    }

    fn tracker() -> Tracker {
        Tracker::new(ReplicationProgress {
            decided: Decided {
                through: Sequence(10),
                void: BTreeSet::new(),
            },
            floors: HashMap::from([(0, 100), (1, 50)]),
        })
    }

    #[test]
    fn a_dropped_snapshot_voids_its_changes_unless_a_later_one_of_its_shipment_landed() {
        let mut tracker = tracker();
        let found = tracker.record(
            &[
                sent("A", 11..13, &[None]),
                sent("B", 13..14, &[None]),
                sent("A", 14..15, &[Some((0, 100))]),
                sent("C", 15..16, &[Some((1, 50)), None]),
            ],
            WindowEnd {
                through: Some((4, Sequence(15))),
                void: vec![16],
            },
        );
        assert_eq!(found, 3);
        let progress = tracker.progress();
        assert_eq!(progress.decided.through, Sequence(15));
        assert_eq!(progress.decided.void, BTreeSet::from([13, 15, 16]));
        assert_eq!(progress.floors, HashMap::from([(0, 101), (1, 51)]));
    }

    #[test]
    fn floors_stay_below_the_snapshots_of_a_write_not_yet_decided() {
        let mut tracker = tracker();
        tracker.record(
            &[
                sent("A", 11..12, &[Some((0, 100))]),
                sent("B", 12..13, &[Some((1, 50))]),
                sent("C", 0..0, &[Some((1, 51))]),
            ],
            WindowEnd {
                through: Some((2, Sequence(12))),
                void: Vec::new(),
            },
        );
        assert_eq!(tracker.progress().decided.through, Sequence(12));
        assert_eq!(
            tracker.progress().floors,
            HashMap::from([(0, 101), (1, 51)])
        );
        // The rest of that write, over another window with no write's end in it.
        tracker.record(&[sent("D", 13..14, &[Some((1, 52))])], WindowEnd::default());
        assert_eq!(tracker.progress().decided.through, Sequence(12));
        assert_eq!(
            tracker.progress().floors,
            HashMap::from([(0, 101), (1, 51)])
        );
        // Its end decides it: the floors move past everything delivered.
        tracker.record(
            &[],
            WindowEnd {
                through: Some((0, Sequence(14))),
                void: Vec::new(),
            },
        );
        assert_eq!(tracker.progress().decided.through, Sequence(14));
        assert_eq!(
            tracker.progress().floors,
            HashMap::from([(0, 101), (1, 53)])
        );
    }
}
