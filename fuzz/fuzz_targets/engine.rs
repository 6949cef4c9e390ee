//! The pure engine under arbitrary deliveries: a small alphabet of shipments, scan ids, scan
//! types, event times and facilities, split into arbitrary batches (as the property tests in
//! `src/engine/tests.rs` do). A scan id names a read of one shipment.
//!
//! Checked after every batch: replaying it changes nothing; versions bump by one per change of
//! a (shipment, journey), gapless, the changes chain (`previous` = the journey's last published
//! point) and a regression is flagged exactly when the status steps back; a stored scan stays in
//! its timeline unless an earlier read of the same event replaced it; timelines are strictly
//! ordered by (event_time, scan_id), hold each scan id and each physical read once, and each
//! journey's status is the fold of its share of the timeline. At the end, when every scan id names one read, the final shipments equal
//! those of all distinct reads applied in one reversed batch (the property test's
//! `final_view`: versions and regression counts depend on how history arrived, by design, so
//! they are not compared).

#![no_main]

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use scand::domain::{EventTime, ScanId, ScanType, StatusPoint, TrackingNumber};
use scand::engine::status::Derived;
use scand::engine::{facility_hash, Change, Engine, Entry, Incoming, Outcome, States};

const SHIPMENTS: [&str; 3] = ["SHIPMENT0000", "SHIPMENT0001", "SHIPMENT0002"];
const FACILITIES: [&str; 3] = ["hub-a", "hub-b", "van-7"];
const SCAN_IDS: usize = 8;
const WINDOW_SECS: i64 = 60;

#[derive(Arbitrary, Debug, Clone, Copy)]
struct Read {
    shipment: u8,
    scan_type: u8,
    /// Seconds in -120..480: a few fingerprint windows, either side of the epoch.
    second: u16,
    facility: u8,
}

#[derive(Arbitrary, Debug)]
struct Delivery {
    /// Which of the scan ids (and so, normally, which read) is delivered.
    id: u8,
    /// End the batch after this delivery.
    cut: bool,
    /// With `Input::conflicting`, a different read under the same scan id (a broken device).
    other: Read,
}

#[derive(Arbitrary, Debug)]
struct Input {
    reads: [Read; SCAN_IDS],
    conflicting: bool,
    deliveries: Vec<Delivery>,
}

fn incoming(index: usize, id: usize, r: Read) -> Incoming {
    Incoming {
        index,
        tracking_number: TrackingNumber::parse(
            SHIPMENTS[usize::from(r.shipment) % SHIPMENTS.len()],
        )
        .expect("valid number"),
        scan_id: ScanId::parse(&format!("s{id}")).expect("valid scan id"),
        scan_type: ScanType::ALL[usize::from(r.scan_type) % ScanType::ALL.len()],
        event_time: EventTime((i64::from(r.second % 600) - 120) * 1_000_000),
        facility: facility_hash(FACILITIES[usize::from(r.facility) % FACILITIES.len()]),
        clock_skewed: r.facility & 0x80 != 0,
    }
}

/// The engine, every (shipment, scan id) it stored, and the published change log.
struct Harness {
    engine: Engine,
    states: States,
    stored: HashSet<(TrackingNumber, ScanId)>,
    changes: Vec<Change>,
}

impl Harness {
    fn new() -> Self {
        Self {
            engine: Engine::new(Duration::from_secs(WINDOW_SECS as u64)),
            states: States::default(),
            stored: HashSet::new(),
            changes: Vec::new(),
        }
    }

    fn apply(&mut self, batch: &[Incoming]) -> Vec<Outcome> {
        let batch: Vec<Incoming> = batch.to_vec();
        let ids: HashMap<usize, ScanId> =
            batch.iter().map(|s| (s.index, s.scan_id.clone())).collect();
        let batch_numbers: HashMap<usize, TrackingNumber> = batch
            .iter()
            .map(|s| (s.index, s.tracking_number.clone()))
            .collect();
        // Every journey's published point before the batch, by (shipment, journey).
        let mut before: HashMap<(TrackingNumber, u32), Option<StatusPoint>> = HashMap::new();
        for s in &batch {
            if let Some(state) = self.states.get(&s.tracking_number) {
                for (journey, _) in state.journey_ranges() {
                    before.insert(
                        (s.tracking_number.clone(), journey),
                        state.point_of(journey),
                    );
                }
            }
        }
        let effects = self.engine.apply(batch, &mut self.states);

        // One outcome per scan, by index; everything else refers to scans of this batch.
        let mut indexes: Vec<usize> = ids.keys().copied().collect();
        indexes.sort_unstable();
        let outcome_indexes: Vec<usize> = effects.outcomes.iter().map(|(i, _)| *i).collect();
        assert_eq!(
            outcome_indexes, indexes,
            "one outcome per scan, in index order"
        );
        for i in &effects.stored {
            assert!(
                self.stored
                    .insert((batch_numbers[i].clone(), ids[i].clone())),
                "scan id {} stored twice",
                ids[i]
            );
        }
        // Changes chain from each journey's published point before the batch to its point
        // after (a journey new in this batch starts from none).
        let mut last = before;
        for c in &effects.changes {
            assert!(c.cause.is_some_and(|i| ids.contains_key(&i)));
            let key = (c.tracking_number.clone(), c.journey);
            let previous = last.get(&key).copied().flatten();
            assert_eq!(
                c.previous, previous,
                "change does not follow the last published point"
            );
            last.insert(key, Some(c.current));
        }
        for ((number, journey), point) in &last {
            let state = &self.states[number];
            if state.journey_ranges().iter().any(|(j, _)| j == journey) {
                assert_eq!(
                    state.point_of(*journey),
                    *point,
                    "state differs from the last change"
                );
            }
        }
        // A stored scan is in its timeline unless an earlier read of the same event replaced it.
        let removed: HashSet<&ScanId> = effects.removed.iter().map(|(_, _, id)| id).collect();
        for (number, _, id) in &effects.removed {
            assert!(!self.states[number]
                .timeline
                .iter()
                .any(|e| &e.scan_id == id));
        }
        for i in &effects.stored {
            let s = &batch_numbers[i];
            let kept = self.states[s].timeline.iter().any(|e| e.scan_id == ids[i]);
            assert!(
                kept || removed.contains(&ids[i]),
                "stored scan {} lost",
                ids[i]
            );
        }
        // A regression is a step back in the lifecycle, and the shipment counts it.
        for c in &effects.changes {
            let back = c
                .previous
                .is_some_and(|p| p.status.is_regression_to(c.current.status));
            assert_eq!(c.regression, back, "regression flag wrong: {c:?}");
        }
        self.changes.extend(effects.changes);
        for (number, state) in &self.states {
            let regressions = self
                .changes
                .iter()
                .filter(|c| &c.tracking_number == number && c.regression)
                .count();
            let counted: u32 =
                state.earlier.iter().map(|j| j.regressions).sum::<u32>() + state.flags.regressions;
            // A journey a late scan merged away takes its count with it.
            assert!(counted as usize <= regressions);
            if state.vanished.is_empty() {
                assert_eq!(counted as usize, regressions);
            }
        }
        effects.outcomes.into_iter().map(|(_, o)| o).collect()
    }
}

/// (c): versions +1 per change, gapless per (shipment, journey); a change changes something.
fn check_versions(h: &Harness) {
    let mut last: HashMap<(&TrackingNumber, u32), u64> = HashMap::new();
    for c in &h.changes {
        let v = last.entry((&c.tracking_number, c.journey)).or_insert(0);
        assert_eq!(c.version.0, *v + 1, "versions gapless per journey");
        assert_ne!(c.previous, Some(c.current), "a change changes something");
        *v = c.version.0;
    }
    for (number, state) in &h.states {
        for journey in state
            .earlier
            .iter()
            .cloned()
            .chain([state.latest_journey()])
        {
            assert_eq!(
                journey.version.0,
                last.get(&(number, journey.number)).copied().unwrap_or(0)
            );
        }
    }
}

/// (d): timelines ordered, one entry per scan id and per physical read, status = fold.
fn check_timelines(h: &Harness) {
    for (number, state) in &h.states {
        let mut ids = HashSet::new();
        let key = |e: &Entry| (e.event_time, e.scan_id.clone());
        for pair in state.timeline.windows(2) {
            assert!(
                key(&pair[0]) < key(&pair[1]),
                "timeline out of order: {pair:?}"
            );
        }
        let mut reads = HashSet::new();
        for e in &state.timeline {
            assert!(ids.insert(e.scan_id.clone()), "scan id {} twice", e.scan_id);
            assert!(
                h.stored.contains(&(number.clone(), e.scan_id.clone())),
                "timeline holds a scan id never stored"
            );
            let bucket = e.event_time.0.div_euclid(WINDOW_SECS * 1_000_000);
            assert!(
                reads.insert((e.scan_type, e.facility, bucket)),
                "two reads of one physical event kept: {:?}",
                state.timeline
            );
        }
        let journeys: Vec<Derived> = state
            .earlier
            .iter()
            .map(|j| j.derived)
            .chain([state.derived])
            .collect();
        for ((_, range), derived) in state.journey_ranges().into_iter().zip(journeys) {
            assert_eq!(
                derived,
                Derived::of(state.timeline[range].iter().map(|e| e.scan_type)),
                "a journey's status is not the fold of its timeline"
            );
        }
    }
}

type View = Vec<(
    TrackingNumber,
    Vec<Entry>,
    Vec<(u32, usize, Option<StatusPoint>)>,
)>;

/// The property test's comparison: what depends only on the set of reads.
fn final_view(h: &Harness) -> View {
    let mut v: View = h
        .states
        .iter()
        .map(|(k, s)| {
            let journeys = s
                .journey_ranges()
                .into_iter()
                .map(|(number, range)| {
                    let point = s.point_of(number).map(|p| StatusPoint {
                        stalled: false,
                        ..p
                    });
                    (number, range.len(), point)
                })
                .collect();
            (k.clone(), s.timeline.clone(), journeys)
        })
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

fuzz_target!(|input: Input| {
    if input.deliveries.len() > 64 {
        return;
    }
    let scans: Vec<Incoming> = input
        .deliveries
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let id = usize::from(d.id) % SCAN_IDS;
            let read = if input.conflicting {
                d.other
            } else {
                input.reads[id]
            };
            incoming(i, id, read)
        })
        .collect();

    let mut h = Harness::new();
    let mut start = 0;
    for (i, d) in input.deliveries.iter().enumerate() {
        if !(d.cut || i + 1 == scans.len()) {
            continue;
        }
        let batch = &scans[start..=i];
        start = i + 1;
        h.apply(batch);
        check_timelines(&h);

        // (a): the same batch again is all duplicates and changes nothing.
        let states = h.states.clone();
        let changes = h.changes.len();
        let outcomes = h.apply(batch);
        assert!(
            outcomes.iter().all(|o| matches!(o, Outcome::Duplicate(_))),
            "replay accepted a scan: {outcomes:?}"
        );
        assert_eq!(h.changes.len(), changes, "replay published a change");
        assert!(h.states == states, "replay changed a shipment");
    }
    check_versions(&h);
    check_timelines(&h);

    // (b): the same distinct reads in one batch, in reverse, give the same shipments.
    if !input.conflicting {
        let mut seen = HashSet::new();
        let mut distinct: Vec<Incoming> = scans
            .iter()
            .filter(|s| seen.insert(s.scan_id.clone()))
            .cloned()
            .collect();
        distinct.reverse();
        for (i, s) in distinct.iter_mut().enumerate() {
            s.index = i;
        }
        let mut reference = Harness::new();
        reference.apply(&distinct);
        check_versions(&reference);
        assert_eq!(
            final_view(&h),
            final_view(&reference),
            "depends on arrival or batching"
        );
    }
});
