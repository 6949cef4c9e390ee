//! The engine: the pure, synchronous core. It takes a batch of validated scans and the current
//! state of the shipments they touch, and returns each scan's outcome, the timeline edits and
//! the status changes. No I/O, no clock, no async: the same inputs give the same outputs.
//!
//! Invariants (property-tested in `tests`):
//! - A shipment's final timeline and status depend only on the set of distinct physical reads
//!   it received, not on arrival order, duplicates or how scans were split into batches.
//! - Applying the same batch twice changes nothing the second time.
//! - Each change of a journey's (status, sub-status) bumps that journey's version by exactly
//!   one (see [`journey`] for how a number's scans fall into journeys).

pub mod journey;
pub mod retention;
pub mod stall;
pub mod status;

use std::collections::HashMap;

use crate::domain::{
    EventTime, NumberCheck, Origin, ScanId, ScanType, StatusPoint, TrackingNumber, Version,
};
use journey::{Expired, Journey, Lifecycle};
use status::Derived;

/// One scan the engine should place, already validated.
#[derive(Clone, Debug)]
pub struct Incoming {
    /// The caller's handle for this scan: outcomes and changes refer to it.
    pub index: usize,
    pub tracking_number: TrackingNumber,
    pub scan_id: ScanId,
    pub scan_type: ScanType,
    pub event_time: EventTime,
    /// Identity of the facility or vehicle (see [`facility_hash`]), part of the fingerprint.
    pub facility: u64,
    /// Its event time was far from the time scand received it (counted on the shipment).
    pub clock_skewed: bool,
}

/// One scan of a shipment's timeline: enough to deduplicate and derive status without reading
/// the stored scans.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub event_time: EventTime,
    pub scan_id: ScanId,
    pub scan_type: ScanType,
    pub facility: u64,
}

impl Entry {
    pub(crate) fn order_key(&self) -> (EventTime, &ScanId) {
        (self.event_time, &self.scan_id)
    }
}

/// The shipments a batch touches, by tracking number. foldhash: several times faster than
/// SipHash on short keys, and still randomly seeded per process against crafted collisions.
pub type States = HashMap<TrackingNumber, ShipmentState, Hasher>;
pub type Hasher = foldhash::fast::RandomState;

/// A tracking number as the engine sees it: its timeline, holding every retained journey's
/// scans, and its journeys. The latest journey's status, version and flags are fields of the
/// state itself (most numbers have one journey); earlier ones are in `earlier`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ShipmentState {
    /// Ordered by (event_time, scan_id).
    pub timeline: Vec<Entry>,
    /// The latest journey's status.
    pub derived: Derived,
    /// The latest journey's version.
    pub version: Version,
    /// The latest journey's number; 0 before the number's first scan (see [`Self::journey`]).
    pub journey: u32,
    /// Event time of the scan that made the latest journey terminal.
    pub closed: Option<EventTime>,
    /// Retained journeys before the latest, oldest first.
    pub earlier: Vec<Journey>,
    /// What retention removed of this number.
    pub expired: Option<Expired>,
    /// Last versions of journey numbers a late scan merged into the journey before.
    pub vanished: Vec<(u32, Version)>,
    /// No scan for longer than its status's threshold (see [`stall`]); published as STALLED.
    pub stalled: bool,
    /// The deadline indexed for this shipment, so the index entry can be replaced exactly.
    pub stall_deadline: Option<EventTime>,
    pub flags: Flags,
    /// The source partition that orders this shipment, when it came from Kafka.
    pub owner: Option<Origin>,
    /// Scan ids of reads an earlier read of the same physical event replaced: with the
    /// timeline, every scan id this shipment ever stored, so none is stored twice.
    pub replaced: Vec<ScanId>,
}

/// What ops want to see on a shipment besides its status.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Flags {
    /// The latest journey's status changes that went backwards in the lifecycle.
    pub regressions: u32,
    /// The latest journey's stored scans whose event time was far from the time they were
    /// received.
    pub clock_skewed_scans: u32,
    /// Carrier check of the tracking number, from the first scan (see `ingest::carrier`).
    pub tracking_number: NumberCheck,
}

impl ShipmentState {
    /// The published status point: the derived one, marked stalled while the shipment is.
    pub fn point(&self) -> Option<StatusPoint> {
        self.derived.point.map(|p| StatusPoint {
            stalled: self.stalled,
            ..p
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DuplicateKind {
    ScanId,
    Fingerprint,
}

impl DuplicateKind {
    pub const ALL: [DuplicateKind; 2] = [DuplicateKind::ScanId, DuplicateKind::Fingerprint];

    pub fn label(self) -> &'static str {
        match self {
            DuplicateKind::ScanId => "scan_id",
            DuplicateKind::Fingerprint => "fingerprint",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Accepted,
    Duplicate(DuplicateKind),
    /// It belongs to a journey retention removed (see [`journey::Expired`]); nothing stored.
    JourneyExpired,
}

/// A status change, before the writer gives it a sequence.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    pub tracking_number: TrackingNumber,
    pub journey: u32,
    pub version: Version,
    pub previous: Option<StatusPoint>,
    pub current: StatusPoint,
    /// `Incoming::index` of the scan that caused it; `None` for a stall (no scan came).
    pub cause: Option<usize>,
    pub regression: bool,
    /// The cause was placed before the latest scan already known: history was rewritten.
    pub correction: bool,
}

/// Everything a batch does; the writer turns it into one atomic write.
#[derive(Debug, Default)]
pub struct Effects {
    /// One per incoming scan, by `Incoming::index`.
    pub outcomes: Vec<(usize, Outcome)>,
    /// Scans to store in the timeline (by `Incoming::index`), grouped by shipment (see
    /// [`Engine::apply`] for the order).
    pub stored: Vec<usize>,
    /// Timeline entries replaced by an earlier read of the same physical event, grouped by
    /// shipment in the order of `stored` (each comes with a stored scan of its shipment).
    pub removed: Vec<(TrackingNumber, EventTime, ScanId)>,
    pub changes: Vec<Change>,
    /// Scans placed after a terminal status (kept, not moving the status).
    pub after_terminal: u32,
    /// Stalled shipments a scan after their latest one woke.
    pub woken: u32,
}

fn micros(d: std::time::Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

/// Stable 64-bit FNV-1a: fingerprints are stored, so the hash must never change between builds.
pub fn facility_hash(facility_id: &str) -> u64 {
    facility_id.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The incoming scan being placed, as `insert` needs it.
#[derive(Clone, Copy)]
struct Placed {
    index: usize,
    clock_skewed: bool,
}

#[derive(Clone, Copy, Debug)]
pub struct Engine {
    /// Width of the fingerprint's event-time bucket, in microseconds.
    fingerprint_window_micros: i64,
    lifecycle: Lifecycle,
}

impl Engine {
    /// Entries a timeline past its first few gets room for at once: a journey is 9 to 25
    /// scans, and doubling (4 → 8 → 16 → 32) copies it at each step. Not from the first scan:
    /// a shipment seen once keeps a small timeline in the cache.
    const JOURNEY_ENTRIES: usize = 16;

    /// The default time after a terminal scan past which any scan starts a new journey.
    pub const NEW_JOURNEY_AFTER: std::time::Duration =
        std::time::Duration::from_secs(30 * 24 * 3600);

    pub fn new(fingerprint_window: std::time::Duration) -> Self {
        Self {
            fingerprint_window_micros: micros(fingerprint_window).max(1),
            lifecycle: Lifecycle {
                new_journey_after_micros: micros(Self::NEW_JOURNEY_AFTER),
            },
        }
    }

    /// With journeys starting after `after` without a scan since a terminal one (see
    /// [`journey`]).
    pub fn new_journey_after(self, after: std::time::Duration) -> Self {
        Self {
            lifecycle: Lifecycle {
                new_journey_after_micros: micros(after),
            },
            ..self
        }
    }

    fn bucket(&self, t: EventTime) -> i64 {
        t.0.div_euclid(self.fingerprint_window_micros)
    }

    fn same_physical_read(&self, a: &Entry, b: &Entry) -> bool {
        a.scan_type == b.scan_type
            && a.facility == b.facility
            && self.bucket(a.event_time) == self.bucket(b.event_time)
    }

    /// Applies a batch. `states` must hold the current state of every shipment the batch
    /// touches (absent = never seen); it is updated in place.
    pub fn apply(&self, batch: Vec<Incoming>, states: &mut States) -> Effects {
        // Most scans are stored and change their shipment's status: sized once, not doubled
        // up from empty every group.
        let mut effects = Effects {
            stored: Vec::with_capacity(batch.len()),
            changes: Vec::with_capacity(batch.len()),
            ..Effects::default()
        };
        // A shipment's scans are applied together, in timeline order, so a bulk upload
        // publishes each milestone in sequence; the arrival index breaks exact ties
        // deterministically. Shipments go in order of their first scan in the batch, grouped
        // by a counting sort: sorting the scans themselves by tracking number had been a
        // seventh of the writer's instructions. Only a shipment's own few scans are compared.
        let mut shipment_ids: HashMap<&TrackingNumber, usize, Hasher> =
            HashMap::with_capacity_and_hasher(batch.len(), Hasher::default());
        let shipment_of: Vec<usize> = batch
            .iter()
            .map(|scan| {
                let next = shipment_ids.len();
                *shipment_ids.entry(&scan.tracking_number).or_insert(next)
            })
            .collect();
        let mut run_starts = vec![0usize; shipment_ids.len() + 1];
        for &shipment in &shipment_of {
            run_starts[shipment + 1] += 1;
        }
        for shipment in 0..shipment_ids.len() {
            run_starts[shipment + 1] += run_starts[shipment];
        }
        let mut order = vec![0usize; batch.len()];
        let mut next_slot = run_starts.clone();
        for (position, &shipment) in shipment_of.iter().enumerate() {
            order[next_slot[shipment]] = position;
            next_slot[shipment] += 1;
        }
        for run in run_starts.windows(2) {
            order[run[0]..run[1]].sort_unstable_by(|&a, &b| {
                let (a, b) = (&batch[a], &batch[b]);
                (a.event_time, &a.scan_id, a.index).cmp(&(b.event_time, &b.scan_id, b.index))
            });
        }
        let mut scans: Vec<Option<Incoming>> = batch.into_iter().map(Some).collect();
        let mut outcomes = vec![None; scans.len()];
        for run in run_starts.windows(2) {
            let run = &order[run[0]..run[1]];
            let Some(first) = run.first().and_then(|&position| scans[position].as_ref()) else {
                continue;
            };
            let state = states.entry(first.tracking_number.clone()).or_default();
            for &position in run {
                if let Some(scan) = scans[position].take() {
                    outcomes[position] = Some(self.place(scan, state, &mut effects));
                }
            }
        }
        // By position first: in arrival order, which is usually index order already.
        effects.outcomes = outcomes.into_iter().flatten().collect();
        effects.outcomes.sort_unstable_by_key(|(index, _)| *index);
        effects
    }

    fn place(
        &self,
        scan: Incoming,
        state: &mut ShipmentState,
        effects: &mut Effects,
    ) -> (usize, Outcome) {
        let index = scan.index;
        // A scan id is the device's name for one read of this parcel: the timeline and the
        // replaced reads hold every one stored.
        if state.timeline.iter().any(|e| e.scan_id == scan.scan_id)
            || state.replaced.contains(&scan.scan_id)
        {
            return (index, Outcome::Duplicate(DuplicateKind::ScanId));
        }
        let entry = Entry {
            event_time: scan.event_time,
            scan_id: scan.scan_id,
            scan_type: scan.scan_type,
            facility: scan.facility,
        };
        if self.lifecycle.refused_as_expired(state, &entry) {
            return (index, Outcome::JourneyExpired);
        }
        let tracking_number = scan.tracking_number;
        let placed = Placed {
            index,
            clock_skewed: scan.clock_skewed,
        };
        if let Some(pos) = state
            .timeline
            .iter()
            .position(|e| self.same_physical_read(e, &entry))
        {
            // The timeline keeps the earliest read of a physical event, whatever came first.
            if entry.order_key() >= state.timeline[pos].order_key() {
                return (index, Outcome::Duplicate(DuplicateKind::Fingerprint));
            }
            let replaced = state.timeline.remove(pos);
            state.replaced.push(replaced.scan_id.clone());
            effects.removed.push((
                tracking_number.clone(),
                replaced.event_time,
                replaced.scan_id,
            ));
            self.insert(tracking_number, placed, entry, true, state, effects);
            return (index, Outcome::Duplicate(DuplicateKind::Fingerprint));
        }
        self.insert(tracking_number, placed, entry, false, state, effects);
        (index, Outcome::Accepted)
    }

    /// Places `entry` and derives the new statuses; `replaced` = an entry was just removed,
    /// so the journeys must be refolded even when appending.
    fn insert(
        &self,
        tracking_number: TrackingNumber,
        placed: Placed,
        entry: Entry,
        replaced: bool,
        state: &mut ShipmentState,
        effects: &mut Effects,
    ) {
        let pos = state
            .timeline
            .partition_point(|e| e.order_key() < entry.order_key());
        let appended = pos == state.timeline.len();
        let opens_journey = state.timeline.last().is_some()
            && state
                .closed
                .is_some_and(|closed| self.lifecycle.starts_journey(closed, &entry));
        let timeline = &mut state.timeline;
        if !timeline.is_empty()
            && timeline.len() == timeline.capacity()
            && timeline.len() < Self::JOURNEY_ENTRIES
        {
            timeline.reserve_exact(Self::JOURNEY_ENTRIES - timeline.len());
        }
        timeline.insert(pos, entry);
        effects.stored.push(placed.index);
        if appended && !replaced {
            if opens_journey {
                let latest = state.latest_journey();
                let next = state.open_journey(latest.number + 1);
                state.earlier.push(Journey {
                    entries: latest.entries - 1,
                    ..latest
                });
                state.set_latest_journey(next);
            } else if state.timeline.len() == 1 {
                // The number's first retained scan: its journey follows any expired ones.
                state.journey = state.journey();
            }
            self.step_latest(tracking_number, placed, state, effects);
        } else {
            self.refold(tracking_number, placed, pos, appended, state, effects);
        }
    }

    /// Folds the scan just appended to the timeline into the latest journey.
    fn step_latest(
        &self,
        tracking_number: TrackingNumber,
        placed: Placed,
        state: &mut ShipmentState,
        effects: &mut Effects,
    ) {
        let Some(entry) = state.timeline.last() else {
            return;
        };
        if placed.clock_skewed {
            state.flags.clock_skewed_scans += 1;
        }
        let mut closed = state.closed;
        let derived = Lifecycle::step(state.derived, &mut closed, entry);
        effects.after_terminal += derived
            .scans_after_terminal
            .saturating_sub(state.derived.scans_after_terminal);
        let previous = state.point();
        state.derived = derived;
        state.closed = closed;
        // Only a scan after the latest one wakes a stalled shipment: a late upload of older
        // reads says nothing about where the parcel is now.
        if state.stalled {
            state.stalled = false;
            effects.woken += 1;
        }
        let Some(current) = state.point() else {
            return;
        };
        if previous == Some(current) {
            return;
        }
        state.version = Version(state.version.0 + 1);
        let regression = previous.is_some_and(|p| p.status.is_regression_to(current.status));
        if regression {
            state.flags.regressions += 1;
        }
        effects.changes.push(Change {
            tracking_number,
            journey: state.journey,
            version: state.version,
            previous,
            current,
            cause: Some(placed.index),
            regression,
            correction: false,
        });
    }

    /// Refolds every journey of the timeline after a scan was placed before the latest one or
    /// replaced one (at `pos`), publishing each journey whose status moved.
    fn refold(
        &self,
        tracking_number: TrackingNumber,
        placed: Placed,
        pos: usize,
        appended: bool,
        state: &mut ShipmentState,
        effects: &mut Effects,
    ) {
        let segments = self.lifecycle.segments(&state.timeline);
        let mut journeys = std::mem::take(&mut state.earlier);
        journeys.push(state.latest_journey());
        let mut previous: Vec<Option<StatusPoint>> =
            journeys.iter().map(|j| j.derived.point).collect();
        if let Some(latest) = previous.last_mut() {
            *latest = state.point();
        }
        if state.stalled && (appended || segments.len() != journeys.len()) {
            state.stalled = false;
            effects.woken += 1;
        }
        while journeys.len() > segments.len() {
            if let Some(gone) = journeys.pop() {
                state.vanished.push((gone.number, gone.version));
            }
        }
        while journeys.len() < segments.len() {
            let number = journeys.last().map_or(1, |j| j.number + 1);
            journeys.push(state.open_journey(number));
        }
        let last = journeys.len() - 1;
        let mut start = 0;
        for (at, (journey, segment)) in journeys.iter_mut().zip(&segments).enumerate() {
            let range = start..start + segment.entries;
            start = range.end;
            journey.entries = segment.entries as u32;
            journey.closed = segment.closed;
            if placed.clock_skewed && range.contains(&pos) {
                journey.clock_skewed_scans += 1;
            }
            effects.after_terminal += segment
                .derived
                .scans_after_terminal
                .saturating_sub(journey.derived.scans_after_terminal);
            journey.derived = segment.derived;
            let Some(current) = segment.derived.point.map(|p| StatusPoint {
                stalled: at == last && state.stalled,
                ..p
            }) else {
                continue;
            };
            let before = previous.get(at).copied().flatten();
            if before == Some(current) {
                continue;
            }
            journey.version = Version(journey.version.0 + 1);
            let regression = before.is_some_and(|p| p.status.is_regression_to(current.status));
            if regression {
                journey.regressions += 1;
            }
            effects.changes.push(Change {
                tracking_number: tracking_number.clone(),
                journey: journey.number,
                version: journey.version,
                previous: before,
                current,
                cause: Some(placed.index),
                regression,
                correction: !appended,
            });
        }
        if let Some(latest) = journeys.pop() {
            state.set_latest_journey(latest);
        }
        state.earlier = journeys;
    }
}

#[cfg(test)]
mod tests;
