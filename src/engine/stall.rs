//! Stalled shipments: a shipment that is not terminal and has had no scan for longer than the
//! threshold of its status is published as STALLED (in the status it stalled in).
//!
//! Invariants:
//! - A shipment's stall deadline is a function of its state alone (latest event time + the
//!   threshold of its status), so it is recomputed, never accumulated, and the deadline index
//!   can be maintained in the same write as the state.
//! - Terminal, already stalled and status-less shipments have no deadline.
//! - Pure: "now" is an input, so tests drive time by hand.

use std::time::Duration;

use super::{Change, Engine, ShipmentState};
use crate::domain::{EventTime, Status, TrackingNumber, Version};

/// Per-status stall thresholds, in microseconds of event time; `None` = never stalls there.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StallPolicy {
    thresholds: [Option<i64>; 11],
}

impl StallPolicy {
    /// `thresholds`: (status, threshold) pairs; a zero threshold means never.
    pub fn new(thresholds: impl IntoIterator<Item = (Status, Duration)>) -> Self {
        let mut policy = StallPolicy::default();
        for (status, threshold) in thresholds {
            if status.is_terminal() || status == Status::Stalled || threshold.is_zero() {
                continue;
            }
            let micros = i64::try_from(threshold.as_micros()).unwrap_or(i64::MAX);
            policy.thresholds[status.as_i32() as usize] = Some(micros);
        }
        policy
    }

    fn threshold(&self, status: Status) -> Option<i64> {
        self.thresholds
            .get(status.as_i32() as usize)
            .copied()
            .flatten()
    }

    /// When `state` stalls if no later scan arrives.
    pub fn deadline(&self, state: &ShipmentState) -> Option<EventTime> {
        if state.stalled {
            return None;
        }
        let status = state.derived.point?.status;
        let threshold = self.threshold(status)?;
        let latest = state.timeline.last()?.event_time;
        Some(EventTime(latest.0.saturating_add(threshold)))
    }
}

impl Engine {
    /// Marks a shipment whose deadline passed as stalled. `None` when it is not due (a later
    /// scan moved its deadline, it is terminal, or it is already stalled).
    pub fn stall(
        &self,
        policy: &StallPolicy,
        tracking_number: TrackingNumber,
        state: &mut ShipmentState,
        now: EventTime,
    ) -> Option<Change> {
        let deadline = policy.deadline(state)?;
        if deadline > now {
            return None;
        }
        let previous = state.point();
        state.stalled = true;
        let current = state.point()?;
        state.version = Version(state.version.0 + 1);
        Some(Change {
            tracking_number,
            journey: state.journey(),
            version: state.version,
            previous,
            current,
            cause: None,
            regression: false,
            correction: false,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{ScanId, ScanType};
    use crate::engine::Incoming;

    const HOUR: i64 = 3_600_000_000;

    fn policy() -> StallPolicy {
        StallPolicy::new([
            (Status::InTransit, Duration::from_secs(48 * 3600)),
            (Status::OutForDelivery, Duration::from_secs(12 * 3600)),
            (Status::Exception, Duration::ZERO),
            (Status::Delivered, Duration::from_secs(1)),
        ])
    }

    fn scan(index: usize, id: &str, scan_type: ScanType, hours: i64) -> Incoming {
        Incoming {
            index,
            tracking_number: TrackingNumber::parse("PARCEL0001").expect("valid"),
            scan_id: ScanId::parse(id).expect("valid"),
            scan_type,
            event_time: EventTime(hours * HOUR),
            facility: index as u64,
            clock_skewed: false,
        }
    }

    fn shipment(scans: Vec<Incoming>) -> (Engine, crate::engine::States) {
        let engine = Engine::new(Duration::from_secs(60));
        let mut states = crate::engine::States::default();
        engine.apply(scans, &mut states);
        (engine, states)
    }

    fn number() -> TrackingNumber {
        TrackingNumber::parse("PARCEL0001").expect("valid")
    }

    #[test]
    fn deadline_is_latest_scan_plus_the_threshold_of_the_status() {
        let (_, states) = shipment(vec![
            scan(0, "a", ScanType::PickedUp, 0),
            scan(1, "b", ScanType::Sorted, 10),
        ]);
        assert_eq!(
            policy().deadline(&states[&number()]),
            Some(EventTime(58 * HOUR))
        );
    }

    #[test]
    fn terminal_zero_threshold_and_unlisted_statuses_never_stall() {
        for scan_type in [
            ScanType::Delivered,
            ScanType::Exception,
            ScanType::LabelCreated,
        ] {
            let (_, states) = shipment(vec![scan(0, "a", scan_type, 0)]);
            assert_eq!(policy().deadline(&states[&number()]), None, "{scan_type:?}");
        }
    }

    #[test]
    fn stalls_only_once_the_deadline_passed_then_a_later_scan_moves_it_on() {
        let (engine, mut states) = shipment(vec![scan(0, "a", ScanType::Sorted, 0)]);
        let state = states.get_mut(&number()).expect("state");
        assert_eq!(
            engine.stall(&policy(), number(), state, EventTime(47 * HOUR)),
            None
        );
        let change = engine
            .stall(&policy(), number(), state, EventTime(48 * HOUR))
            .expect("stalls at its deadline");
        assert_eq!(change.version, Version(2));
        assert_eq!(change.current.status, Status::InTransit);
        assert!(change.current.stalled);
        assert_eq!(change.previous.map(|p| p.stalled), Some(false));
        assert_eq!(policy().deadline(state), None, "stalled: no new deadline");
        assert_eq!(
            engine.stall(&policy(), number(), state, EventTime(99 * HOUR)),
            None
        );

        let effects = engine.apply(vec![scan(1, "b", ScanType::Sorted, 50)], &mut states);
        let [change] = effects.changes.as_slice() else {
            panic!("one change: {:?}", effects.changes)
        };
        assert_eq!(change.version, Version(3));
        assert!(change.previous.is_some_and(|p| p.stalled));
        assert!(!change.current.stalled);
        assert_eq!(change.current.status, Status::InTransit);
        assert_eq!(
            policy().deadline(&states[&number()]),
            Some(EventTime(98 * HOUR))
        );
    }

    #[test]
    fn a_late_scan_placed_before_the_latest_does_not_wake_a_stalled_shipment() {
        let (engine, mut states) = shipment(vec![scan(0, "a", ScanType::Sorted, 10)]);
        let state = states.get_mut(&number()).expect("state");
        engine
            .stall(&policy(), number(), state, EventTime(100 * HOUR))
            .expect("stalls");
        let effects = engine.apply(vec![scan(1, "b", ScanType::PickedUp, 5)], &mut states);
        assert!(effects.changes.is_empty(), "{:?}", effects.changes);
        assert!(states[&number()].stalled);
    }
}
