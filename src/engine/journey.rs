//! Journeys: the successive shipments of one tracking number. Carriers reuse numbers months
//! after a delivery; each reuse is a journey of its own, with its own status, versions and
//! flags, numbered 1, 2, … per tracking number.
//!
//! Invariants:
//! - Journeys are a function of the ordered timeline alone: walking it, a journey ends at its
//!   first terminal scan (DELIVERED, RETURNED_TO_SENDER), and the first later scan that is a
//!   LABEL_CREATED or PICKED_UP, or that comes more than `new_journey_after` after that terminal
//!   scan, starts the next one. Placement is by event time, never by arrival, so arrival order
//!   and duplicates cannot change a number's journeys (property-tested in `tests`).
//! - Versions belong to a journey number: whatever scans a number holds, the versions
//!   published under it only increase (a journey a late scan merges away keeps its last version
//!   for when the number appears again).
//! - Scans at or before the end of an expired journey (see [`Expired`]) are refused, so nothing
//!   retention removed comes back half.

use super::status::Derived;
use super::{Entry, ShipmentState};
use crate::domain::{EventTime, ScanType, StatusPoint, Version};

/// A journey of a number that is not its latest: closed, with its share of the timeline.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Journey {
    pub number: u32,
    /// How many timeline entries, from where the previous journey's end, are this journey's.
    pub entries: u32,
    /// Event time of the scan that made it terminal.
    pub closed: Option<EventTime>,
    pub derived: Derived,
    pub version: Version,
    pub regressions: u32,
    pub clock_skewed_scans: u32,
}

/// What retention removed of a number: its journeys up to `journeys`, whose last scan was at
/// `until`. Kept with the number so that later journeys go on counting and late scans of a
/// removed journey are refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Expired {
    pub journeys: u32,
    pub until: EventTime,
}

/// One journey of a segmented timeline.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Segment {
    pub entries: usize,
    pub derived: Derived,
    pub closed: Option<EventTime>,
}

/// Where journeys begin and end (see the module doc).
#[derive(Clone, Copy, Debug)]
pub(super) struct Lifecycle {
    pub new_journey_after_micros: i64,
}

impl Lifecycle {
    /// Whether `entry`, ordered after a journey closed at `closed`, begins the next journey.
    pub fn starts_journey(&self, closed: EventTime, entry: &Entry) -> bool {
        entry.event_time > closed
            && (matches!(entry.scan_type, ScanType::LabelCreated | ScanType::PickedUp)
                || entry.event_time.0.saturating_sub(closed.0) > self.new_journey_after_micros)
    }

    /// Whether a scan of `entry` can still be placed, given what retention removed: it must come
    /// after the removed journeys' last scan, and if it would be the number's first entry, it
    /// must begin a journey (otherwise it continues a removed one).
    pub fn refused_as_expired(&self, state: &ShipmentState, entry: &Entry) -> bool {
        let Some(expired) = state.expired else {
            return false;
        };
        let first = state
            .timeline
            .first()
            .is_none_or(|first| entry.order_key() < first.order_key());
        entry.event_time <= expired.until || (first && !self.starts_journey(expired.until, entry))
    }

    /// Folds `derived` one scan on, noting when the journey closes.
    pub fn step(derived: Derived, closed: &mut Option<EventTime>, entry: &Entry) -> Derived {
        let next = derived.step(entry.scan_type);
        if closed.is_none() && next.point.is_some_and(|p| p.status.is_terminal()) {
            *closed = Some(entry.event_time);
        }
        next
    }

    /// The journeys of a whole timeline, in order.
    pub fn segments(&self, timeline: &[Entry]) -> Vec<Segment> {
        let mut segments = Vec::with_capacity(1);
        let mut current = Segment {
            entries: 0,
            derived: Derived::default(),
            closed: None,
        };
        for entry in timeline {
            if let Some(closed) = current.closed {
                if self.starts_journey(closed, entry) {
                    segments.push(current);
                    current = Segment {
                        entries: 0,
                        derived: Derived::default(),
                        closed: None,
                    };
                }
            }
            current.derived = Self::step(current.derived, &mut current.closed, entry);
            current.entries += 1;
        }
        segments.push(current);
        segments
    }
}

impl ShipmentState {
    /// The number of the latest journey (1 for a number never seen).
    pub fn journey(&self) -> u32 {
        self.journey.max(self.expired.map_or(0, |e| e.journeys) + 1)
    }

    /// Each journey's entries: the earlier ones', then the latest one's.
    pub fn journey_ranges(&self) -> Vec<(u32, std::ops::Range<usize>)> {
        let mut ranges = Vec::with_capacity(self.earlier.len() + 1);
        let mut start = 0;
        for journey in &self.earlier {
            let end = (start + journey.entries as usize).min(self.timeline.len());
            ranges.push((journey.number, start..end));
            start = end;
        }
        ranges.push((self.journey(), start..self.timeline.len()));
        ranges
    }

    /// The latest journey as a [`Journey`], with the entries it has.
    pub fn latest_journey(&self) -> Journey {
        let earlier: u32 = self.earlier.iter().map(|j| j.entries).sum();
        Journey {
            number: self.journey(),
            entries: (self.timeline.len() as u32).saturating_sub(earlier),
            closed: self.closed,
            derived: self.derived,
            version: self.version,
            regressions: self.flags.regressions,
            clock_skewed_scans: self.flags.clock_skewed_scans,
        }
    }

    /// Makes `journey` the latest journey.
    pub(super) fn set_latest_journey(&mut self, journey: Journey) {
        self.journey = journey.number;
        self.closed = journey.closed;
        self.derived = journey.derived;
        self.version = journey.version;
        self.flags.regressions = journey.regressions;
        self.flags.clock_skewed_scans = journey.clock_skewed_scans;
    }

    /// A new journey numbered `number`, continuing the versions of a journey of that number a
    /// late scan had merged away.
    pub(super) fn open_journey(&mut self, number: u32) -> Journey {
        let version = match self.vanished.iter().position(|(n, _)| *n == number) {
            Some(at) => self.vanished.swap_remove(at).1,
            None => Version(0),
        };
        Journey {
            number,
            version,
            ..Journey::default()
        }
    }

    /// Whether the latest journey is terminal.
    pub fn is_closed(&self) -> bool {
        self.closed.is_some()
    }

    /// The status of journey `number` as published (the latest one marked stalled while it is).
    pub fn point_of(&self, number: u32) -> Option<StatusPoint> {
        if number == self.journey() {
            return self.point();
        }
        self.earlier
            .iter()
            .find(|j| j.number == number)
            .and_then(|j| j.derived.point)
    }
}
