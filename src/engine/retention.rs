//! Retention: how long a number's journeys are kept. A journey closed (terminal) for longer
//! than `closed_after`, or without a scan for `idle_after`, expires with its scans and dedup
//! state; what expired is remembered (see [`Expired`]) until `closed_after + idle_after` after
//! its last scan (at least `closed_after` after it expired), and then the number is forgotten.
//!
//! Invariants:
//! - Journeys expire oldest first: a number's expired journeys are always its first ones.
//! - A state's next expiry is a function of the state alone, so the writer indexes it in the
//!   same write as the state, beside the stall deadline (the store sweeps only what is due).
//! - Pure: "now" is an input, read by the caller from the injectable clock.

use std::time::Duration;

use super::journey::Expired;
use super::{micros, ShipmentState};
use crate::domain::{EventTime, Version};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetentionPolicy {
    closed_after: i64,
    idle_after: i64,
}

/// What one expiry removed of a number.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Removed {
    pub journeys: u32,
    pub scans: usize,
    /// Nothing is left to remember: the number's record goes.
    pub forget: bool,
}

impl RetentionPolicy {
    pub fn new(closed_after: Duration, idle_after: Duration) -> Self {
        Self {
            closed_after: micros(closed_after),
            idle_after: micros(idle_after),
        }
    }

    fn after(t: EventTime, by: i64) -> EventTime {
        EventTime(t.0.saturating_add(by))
    }

    /// When the next part of `state` expires: its oldest journey, or, once every journey
    /// expired, the memory of them.
    pub fn expiry(&self, state: &ShipmentState) -> Option<EventTime> {
        let ranges = state.journey_ranges();
        let Some((_, range)) = ranges.first().filter(|(_, r)| !r.is_empty()) else {
            return state
                .expired
                .map(|e| Self::after(e.until, self.idle_after.saturating_add(self.closed_after)));
        };
        let closed = match state.earlier.first() {
            Some(journey) => journey.closed,
            None => state.closed,
        };
        Some(match closed {
            Some(closed) => Self::after(closed, self.closed_after),
            None => Self::after(state.timeline[range.end - 1].event_time, self.idle_after),
        })
    }

    /// Removes from `state` what expired at `now`, oldest journey first.
    pub fn expire(&self, state: &mut ShipmentState, now: EventTime) -> Removed {
        let mut removed = Removed::default();
        while let Some(expiry) = self.expiry(state) {
            if expiry > now {
                break;
            }
            if state.timeline.is_empty() {
                removed.forget = true;
                break;
            }
            let (number, range) = state.journey_ranges().swap_remove(0);
            let until = state.timeline[range.end - 1].event_time;
            state.timeline.drain(range.clone());
            removed.scans += range.len();
            removed.journeys += 1;
            if state.earlier.is_empty() {
                state.derived = Default::default();
                state.version = Version(0);
                state.closed = None;
                state.stalled = false;
                state.flags.regressions = 0;
                state.flags.clock_skewed_scans = 0;
                state.replaced.clear();
            } else {
                state.earlier.remove(0);
            }
            state.expired = Some(Expired {
                journeys: number,
                until,
            });
            state.vanished.retain(|(n, _)| *n > number);
        }
        removed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{ScanId, ScanType, TrackingNumber};
    use crate::engine::{Engine, Incoming, States};

    const DAY: i64 = 24 * 3600 * 1_000_000;

    fn policy() -> RetentionPolicy {
        RetentionPolicy::new(
            Duration::from_secs(90 * 24 * 3600),
            Duration::from_secs(180 * 24 * 3600),
        )
    }

    fn number() -> TrackingNumber {
        TrackingNumber::parse("PARCEL0001").expect("valid")
    }

    fn shipment(scans: &[(&str, ScanType, i64)]) -> ShipmentState {
        let mut states = States::default();
        let batch = scans
            .iter()
            .enumerate()
            .map(|(index, (id, scan_type, day))| Incoming {
                index,
                tracking_number: number(),
                scan_id: ScanId::parse(id).expect("valid"),
                scan_type: *scan_type,
                event_time: EventTime(day * DAY),
                facility: index as u64,
                clock_skewed: false,
            })
            .collect();
        Engine::new(Duration::from_secs(60)).apply(batch, &mut states);
        states.remove(&number()).expect("state")
    }

    #[test]
    fn a_closed_journey_expires_after_closed_after_and_an_open_one_after_idle_after() {
        let closed = shipment(&[("a", ScanType::Sorted, 0), ("b", ScanType::Delivered, 2)]);
        assert_eq!(policy().expiry(&closed), Some(EventTime(92 * DAY)));
        let open = shipment(&[("a", ScanType::Sorted, 0), ("b", ScanType::Sorted, 5)]);
        assert_eq!(policy().expiry(&open), Some(EventTime(185 * DAY)));
    }

    #[test]
    fn the_oldest_journey_goes_first_and_the_number_remembers_it() {
        let mut state = shipment(&[
            ("a", ScanType::LabelCreated, 0),
            ("b", ScanType::Delivered, 2),
            ("c", ScanType::LabelCreated, 60),
            ("d", ScanType::Sorted, 61),
        ]);
        assert_eq!(state.journey(), 2);
        assert_eq!(
            policy().expire(&mut state, EventTime(91 * DAY)),
            Removed::default(),
            "journey 1 closed at day 2 goes at day 92"
        );
        let removed = policy().expire(&mut state, EventTime(92 * DAY));
        assert_eq!(
            removed,
            Removed {
                journeys: 1,
                scans: 2,
                forget: false
            }
        );
        assert_eq!(state.journey_ranges(), vec![(2, 0..2)]);
        assert_eq!(
            state.expired,
            Some(Expired {
                journeys: 1,
                until: EventTime(2 * DAY)
            })
        );
        assert_eq!(policy().expiry(&state), Some(EventTime(241 * DAY)));
        let removed = policy().expire(&mut state, EventTime(241 * DAY));
        assert!(
            !removed.forget,
            "the number remembers its journeys a while longer"
        );
        assert_eq!(
            (removed.journeys, removed.scans, removed.forget),
            (1, 2, false)
        );
        assert!(state.timeline.is_empty());
        assert_eq!(state.journey(), 3, "the next journey is the third");
        assert_eq!(policy().expiry(&state), Some(EventTime(331 * DAY)));
        assert!(policy().expire(&mut state, EventTime(331 * DAY)).forget);
    }
}
