use std::collections::HashMap;
use std::time::Duration;

use proptest::prelude::*;

use super::*;
use crate::domain::Status;
use ScanType::*;

const MINUTE: i64 = 60_000_000;

fn engine() -> Engine {
    Engine::new(Duration::from_secs(60))
}

fn tn(s: &str) -> TrackingNumber {
    TrackingNumber::parse(s).expect("valid tracking number")
}

fn scan(
    index: usize,
    number: &str,
    id: &str,
    t: ScanType,
    minute: i64,
    facility: &str,
) -> Incoming {
    Incoming {
        index,
        tracking_number: tn(number),
        scan_id: ScanId::parse(id).expect("valid scan id"),
        scan_type: t,
        event_time: EventTime(minute * MINUTE),
        facility: facility_hash(facility),
        clock_skewed: false,
    }
}

/// Feeds batches through the engine and keeps the changes it published.
struct Harness {
    engine: Engine,
    states: States,
    changes: Vec<Change>,
}

impl Harness {
    fn new() -> Self {
        Self {
            engine: engine(),
            states: States::default(),
            changes: Vec::new(),
        }
    }

    fn apply(&mut self, batch: Vec<Incoming>) -> Vec<Outcome> {
        let effects = self.engine.apply(batch, &mut self.states);
        self.changes.extend(effects.changes);
        effects.outcomes.into_iter().map(|(_, o)| o).collect()
    }

    fn state(&self, number: &str) -> &ShipmentState {
        &self.states[&tn(number)]
    }
}

#[test]
fn journey_publishes_each_milestone_in_order() {
    let mut h = Harness::new();
    let n = "1Z999AA10123456784";
    // A truck uploads its whole day at once, newest first.
    let outcomes = h.apply(vec![
        scan(0, n, "s4", Delivered, 40, "door"),
        scan(1, n, "s3", OutForDelivery, 30, "van1"),
        scan(2, n, "s2", ArrivedAtFacility, 20, "hub"),
        scan(3, n, "s1", LabelCreated, 10, "shop"),
    ]);
    assert_eq!(outcomes, vec![Outcome::Accepted; 4]);
    let statuses: Vec<(u64, Status)> = h
        .changes
        .iter()
        .map(|c| (c.version.0, c.current.status))
        .collect();
    assert_eq!(
        statuses,
        vec![
            (1, Status::LabelCreated),
            (2, Status::InTransit),
            (3, Status::OutForDelivery),
            (4, Status::Delivered)
        ]
    );
    assert_eq!(h.changes[1].current.sub_status, Some(ArrivedAtFacility));
    assert!(h.changes.iter().all(|c| !c.correction && !c.regression));
    assert_eq!(
        h.changes.iter().map(|c| c.cause).collect::<Vec<_>>(),
        vec![Some(3), Some(2), Some(1), Some(0)]
    );
}

#[test]
fn a_batch_is_applied_by_shipment_in_order_of_first_scan_and_outcomes_keep_arrival_order() {
    let engine = engine();
    let mut states = States::default();
    let (b, a) = ("SHIPMENTB1", "SHIPMENTA1");
    let effects = engine.apply(
        vec![
            scan(0, b, "b2", ArrivedAtFacility, 20, "hub"),
            scan(1, a, "a1", LabelCreated, 5, "shop"),
            scan(2, b, "b1", LabelCreated, 10, "shop"),
            scan(3, a, "a1", LabelCreated, 5, "shop"),
        ],
        &mut states,
    );
    assert_eq!(
        effects.outcomes,
        vec![
            (0, Outcome::Accepted),
            (1, Outcome::Accepted),
            (2, Outcome::Accepted),
            (3, Outcome::Duplicate(DuplicateKind::ScanId)),
        ]
    );
    // B came first: its scans in timeline order, then A's.
    assert_eq!(effects.stored, vec![2, 0, 1]);
    assert_eq!(
        effects
            .changes
            .iter()
            .map(|c| (c.tracking_number.as_str(), c.version.0, c.cause))
            .collect::<Vec<_>>(),
        vec![(b, 1, Some(2)), (b, 2, Some(0)), (a, 1, Some(1))]
    );
}

#[test]
fn a_scan_after_the_latest_wakes_a_stalled_shipment_once_and_is_counted() {
    let engine = engine();
    let mut states = States::default();
    let n = "PARCEL0001";
    engine.apply(vec![scan(0, n, "a", LabelCreated, 10, "shop")], &mut states);
    states.get_mut(&tn(n)).expect("stored").stalled = true;
    let late = engine.apply(vec![scan(0, n, "old", PickedUp, 5, "van")], &mut states);
    assert_eq!(late.woken, 0, "an older read says nothing about now");
    let effects = engine.apply(
        vec![
            scan(0, n, "b", PickedUp, 20, "van"),
            scan(1, n, "c", ArrivedAtFacility, 30, "hub"),
        ],
        &mut states,
    );
    assert_eq!(effects.woken, 1);
    assert!(!states[&tn(n)].stalled);
}

#[test]
fn same_scan_id_is_a_duplicate_and_changes_nothing() {
    let mut h = Harness::new();
    let n = "PARCEL0001";
    h.apply(vec![scan(0, n, "a", LabelCreated, 1, "shop")]);
    let before = h.state(n).clone();
    let outcomes = h.apply(vec![scan(0, n, "a", LabelCreated, 1, "shop")]);
    assert_eq!(outcomes, vec![Outcome::Duplicate(DuplicateKind::ScanId)]);
    assert_eq!(h.state(n), &before);
    assert_eq!(h.changes.len(), 1);
}

#[test]
fn scan_id_repeated_within_a_batch_is_a_duplicate() {
    let mut h = Harness::new();
    let outcomes = h.apply(vec![
        scan(0, "PARCEL0001", "a", LabelCreated, 1, "shop"),
        scan(1, "PARCEL0001", "a", LabelCreated, 1, "shop"),
    ]);
    assert_eq!(
        outcomes,
        vec![Outcome::Accepted, Outcome::Duplicate(DuplicateKind::ScanId)]
    );
}

#[test]
fn a_scan_id_names_a_read_of_one_parcel_so_another_parcel_may_use_it() {
    let mut h = Harness::new();
    let outcomes = h.apply(vec![
        scan(0, "PARCEL0001", "dev7-000001", LabelCreated, 1, "shop"),
        scan(1, "PARCEL0002", "dev7-000001", LabelCreated, 2, "shop"),
    ]);
    assert_eq!(outcomes, vec![Outcome::Accepted, Outcome::Accepted]);
    let outcomes = h.apply(vec![scan(
        0,
        "PARCEL0002",
        "dev7-000001",
        LabelCreated,
        2,
        "shop",
    )]);
    assert_eq!(outcomes, vec![Outcome::Duplicate(DuplicateKind::ScanId)]);
    assert_eq!(h.state("PARCEL0001").timeline.len(), 1);
    assert_eq!(h.state("PARCEL0002").timeline.len(), 1);
}

#[test]
fn same_physical_read_within_window_is_a_fingerprint_duplicate() {
    let mut h = Harness::new();
    let n = "PARCEL0001";
    h.apply(vec![scan(0, n, "head-a", Sorted, 5, "hub")]);
    let outcomes = h.apply(vec![
        scan(0, n, "head-b", Sorted, 5, "hub"),
        scan(1, n, "other-hub", Sorted, 5, "hub2"),
        scan(2, n, "next-minute", Sorted, 6, "hub"),
    ]);
    assert_eq!(
        outcomes,
        vec![
            Outcome::Duplicate(DuplicateKind::Fingerprint),
            Outcome::Accepted,
            Outcome::Accepted
        ]
    );
    assert_eq!(h.state(n).timeline.len(), 3);
}

#[test]
fn earliest_read_of_a_physical_event_wins_whatever_arrived_first() {
    let n = "PARCEL0001";
    let early = || scan(0, n, "b-early", Sorted, 5, "hub");
    let mut late = scan(0, n, "a-late", Sorted, 5, "hub");
    late.event_time = EventTime(5 * MINUTE + 30_000_000);

    let mut h = Harness::new();
    h.apply(vec![late.clone()]);
    let outcomes = h.apply(vec![early()]);
    assert_eq!(
        outcomes,
        vec![Outcome::Duplicate(DuplicateKind::Fingerprint)]
    );
    let ids: Vec<&str> = h
        .state(n)
        .timeline
        .iter()
        .map(|e| e.scan_id.as_str())
        .collect();
    assert_eq!(ids, vec!["b-early"]);
    // The replaced read is still known: retrying it changes nothing.
    assert_eq!(
        h.apply(vec![late.clone()]),
        vec![Outcome::Duplicate(DuplicateKind::ScanId)]
    );
    // Nor does its scan id reused for another read by a broken device: stored once, ever.
    let mut other = late;
    other.scan_type = Loaded;
    other.event_time = EventTime(9 * MINUTE);
    assert_eq!(
        h.apply(vec![other]),
        vec![Outcome::Duplicate(DuplicateKind::ScanId)]
    );
    assert_eq!(h.state(n).timeline.len(), 1);
}

#[test]
fn late_scan_does_not_change_delivered_status() {
    let mut h = Harness::new();
    let n = "PARCEL0001";
    h.apply(vec![
        scan(0, n, "s1", OutForDelivery, 10, "van"),
        scan(1, n, "s2", Delivered, 20, "door"),
    ]);
    let outcomes = h.apply(vec![scan(0, n, "late", ArrivedAtFacility, 30, "hub")]);
    assert_eq!(outcomes, vec![Outcome::Accepted]);
    let state = h.state(n);
    assert_eq!(
        state.derived.point.map(|p| p.status),
        Some(Status::Delivered)
    );
    assert_eq!(state.derived.scans_after_terminal, 1);
    assert_eq!(state.timeline.len(), 3);
    assert_eq!(h.changes.len(), 2);
}

#[test]
fn late_earlier_scan_is_inserted_without_changing_the_status() {
    let mut h = Harness::new();
    let n = "PARCEL0001";
    h.apply(vec![scan(0, n, "s3", OutForDelivery, 30, "van")]);
    h.apply(vec![scan(0, n, "s1", ArrivedAtFacility, 10, "hub")]);
    let state = h.state(n);
    let ids: Vec<&str> = state.timeline.iter().map(|e| e.scan_id.as_str()).collect();
    assert_eq!(ids, vec!["s1", "s3"]);
    assert_eq!(
        state.derived.point.map(|p| p.status),
        Some(Status::OutForDelivery)
    );
    assert_eq!(state.version, Version(1));
}

#[test]
fn late_delivered_scan_corrects_history() {
    let mut h = Harness::new();
    let n = "PARCEL0001";
    h.apply(vec![scan(0, n, "s1", OutForDelivery, 10, "van")]);
    h.apply(vec![scan(0, n, "s3", ArrivedAtFacility, 30, "hub")]);
    h.apply(vec![scan(0, n, "s2", Delivered, 20, "door")]);
    let last = h.changes.last().expect("a change");
    assert_eq!(last.current.status, Status::Delivered);
    assert_eq!(last.previous.map(|p| p.status), Some(Status::InTransit));
    assert!(last.correction);
    assert!(!last.regression);
    assert_eq!(last.version, Version(3));
    assert_eq!(h.state(n).derived.scans_after_terminal, 1);
}

#[test]
fn return_after_delivery_moves_the_status_and_back_in_transit_is_a_regression() {
    let mut h = Harness::new();
    let n = "PARCEL0001";
    h.apply(vec![
        scan(0, n, "s1", OutForDelivery, 10, "van"),
        scan(1, n, "s2", ArrivedAtFacility, 20, "hub"),
        scan(2, n, "s3", Delivered, 30, "door"),
        scan(3, n, "s4", ReturnedToSender, 40, "hub"),
    ]);
    let seen: Vec<(Status, bool)> = h
        .changes
        .iter()
        .map(|c| (c.current.status, c.regression))
        .collect();
    assert_eq!(
        seen,
        vec![
            (Status::OutForDelivery, false),
            (Status::InTransit, true),
            (Status::Delivered, false),
            (Status::ReturnedToSender, false)
        ]
    );
}

#[test]
fn sub_status_change_within_in_transit_is_a_new_version() {
    let mut h = Harness::new();
    let n = "PARCEL0001";
    h.apply(vec![
        scan(0, n, "s1", ArrivedAtFacility, 10, "hub"),
        scan(1, n, "s2", Sorted, 11, "hub"),
        scan(2, n, "s3", Picked, 1, "shop"),
        scan(3, n, "s4", Packed, 2, "shop"),
    ]);
    let v: Vec<(u64, Status, Option<ScanType>)> = h
        .changes
        .iter()
        .map(|c| (c.version.0, c.current.status, c.current.sub_status))
        .collect();
    assert_eq!(
        v,
        vec![
            (1, Status::PickedPacked, None),
            (2, Status::InTransit, Some(ArrivedAtFacility)),
            (3, Status::InTransit, Some(Sorted)),
        ]
    );
}

// ---- journeys ------------------------------------------------------------------------------

const DAY: i64 = 24 * 60;

/// (journey, version, status) of each change published so far.
fn journey_changes(h: &Harness) -> Vec<(u32, u64, Status)> {
    h.changes
        .iter()
        .map(|c| (c.journey, c.version.0, c.current.status))
        .collect()
}

#[test]
fn a_label_after_delivery_starts_the_next_journey_with_its_own_versions() {
    let mut h = Harness::new();
    let n = "PARCEL0001";
    h.apply(vec![
        scan(0, n, "a1", LabelCreated, 0, "shop"),
        scan(1, n, "a2", Delivered, DAY, "door"),
    ]);
    let outcomes = h.apply(vec![
        scan(0, n, "b1", LabelCreated, 90 * DAY, "shop"),
        scan(1, n, "b2", ArrivedAtFacility, 91 * DAY, "hub"),
    ]);
    assert_eq!(outcomes, vec![Outcome::Accepted; 2]);
    assert_eq!(
        journey_changes(&h),
        vec![
            (1, 1, Status::LabelCreated),
            (1, 2, Status::Delivered),
            (2, 1, Status::LabelCreated),
            (2, 2, Status::InTransit),
        ]
    );
    assert_eq!(
        h.changes[2].previous, None,
        "a journey's first change has no previous"
    );
    let state = h.state(n);
    assert_eq!(state.journey(), 2);
    assert_eq!(state.derived.scans_after_terminal, 0);
    assert_eq!(
        state.journey_ranges(),
        vec![(1, 0..2), (2, 2..4)],
        "journey 1 keeps its two scans"
    );
    assert_eq!(state.point_of(1).map(|p| p.status), Some(Status::Delivered));
}

#[test]
fn any_scan_long_after_the_terminal_one_starts_a_journey_and_one_soon_after_stays() {
    let engine = engine().new_journey_after(Duration::from_secs(30 * 24 * 3600));
    let mut h = Harness {
        engine,
        ..Harness::new()
    };
    let n = "PARCEL0001";
    h.apply(vec![scan(0, n, "a1", Delivered, 0, "door")]);
    h.apply(vec![scan(0, n, "a2", ArrivedAtFacility, 29 * DAY, "hub")]);
    assert_eq!(h.state(n).journey(), 1);
    assert_eq!(h.state(n).derived.scans_after_terminal, 1);
    h.apply(vec![scan(0, n, "b1", ArrivedAtFacility, 31 * DAY, "hub")]);
    assert_eq!(h.state(n).journey(), 2);
    assert_eq!(
        journey_changes(&h),
        vec![(1, 1, Status::Delivered), (2, 1, Status::InTransit)]
    );
}

#[test]
fn a_late_scan_goes_to_the_journey_its_event_time_falls_in() {
    let mut h = Harness::new();
    let n = "PARCEL0001";
    h.apply(vec![
        scan(0, n, "a1", LabelCreated, 0, "shop"),
        scan(1, n, "a3", Delivered, 2 * DAY, "door"),
        scan(2, n, "b1", LabelCreated, 90 * DAY, "shop"),
    ]);
    let published = h.changes.len();
    // A truck's upload from journey 1's transit, months late.
    h.apply(vec![scan(0, n, "a2", Sorted, DAY, "hub")]);
    let state = h.state(n);
    assert_eq!(state.journey_ranges(), vec![(1, 0..3), (2, 3..4)]);
    assert_eq!(state.point_of(1).map(|p| p.status), Some(Status::Delivered));
    assert_eq!(
        state.point_of(2).map(|p| p.status),
        Some(Status::LabelCreated)
    );
    assert_eq!(h.changes.len(), published, "neither journey's status moved");
}

#[test]
fn a_late_terminal_scan_splits_a_journey_and_later_numbers_keep_counting_up() {
    let mut h = Harness::new();
    let n = "PARCEL0001";
    h.apply(vec![
        scan(0, n, "a1", LabelCreated, 0, "shop"),
        scan(1, n, "b1", LabelCreated, 40 * DAY, "shop"),
        scan(2, n, "b2", Delivered, 42 * DAY, "door"),
    ]);
    assert_eq!(h.state(n).journey(), 1, "no terminal scan between them yet");
    // Journey 1's delivery arrives late: the label at day 40 starts journey 2.
    h.apply(vec![scan(0, n, "a2", Delivered, DAY, "door")]);
    let state = h.state(n);
    assert_eq!(state.journey_ranges(), vec![(1, 0..2), (2, 2..4)]);
    assert_eq!(
        journey_changes(&h),
        vec![
            (1, 1, Status::LabelCreated),
            (1, 2, Status::Delivered),
            (2, 1, Status::Delivered),
        ]
    );
    assert!(h.changes[2].correction);
}

#[test]
fn scans_of_an_expired_journey_are_refused_and_a_new_label_opens_the_next() {
    let mut h = Harness::new();
    let n = "PARCEL0001";
    h.states.insert(
        tn(n),
        ShipmentState {
            journey: 3,
            expired: Some(journey::Expired {
                journeys: 3,
                until: EventTime(10 * DAY * MINUTE),
            }),
            ..ShipmentState::default()
        },
    );
    let outcomes = h.apply(vec![
        scan(0, n, "old", Delivered, 9 * DAY, "door"),
        scan(1, n, "tail", ArrivedAtFacility, 11 * DAY, "hub"),
        scan(2, n, "new", LabelCreated, 12 * DAY, "shop"),
    ]);
    assert_eq!(
        outcomes,
        vec![
            Outcome::JourneyExpired,
            Outcome::JourneyExpired,
            Outcome::Accepted
        ]
    );
    assert_eq!(journey_changes(&h), vec![(4, 1, Status::LabelCreated)]);
    let late = h.apply(vec![scan(
        0,
        n,
        "tail2",
        ArrivedAtFacility,
        11 * DAY,
        "hub",
    )]);
    assert_eq!(
        late,
        vec![Outcome::JourneyExpired],
        "still before journey 4's first scan"
    );
}

// ---- properties ----------------------------------------------------------------------------

const FACILITIES: [&str; 3] = ["hub-a", "hub-b", "van-7"];

/// A physical read: what the shipment history is made of.
#[derive(Clone, Debug)]
struct Read {
    shipment: usize,
    scan_type: ScanType,
    second: i64,
    facility: usize,
}

fn read() -> impl Strategy<Value = Read> {
    (
        0usize..3,
        0usize..ScanType::ALL.len(),
        0i64..600,
        0usize..FACILITIES.len(),
    )
        .prop_map(|(shipment, t, second, facility)| Read {
            shipment,
            scan_type: ScanType::ALL[t],
            second,
            facility,
        })
}

/// Reads, plus copies: retries (same scan id) and second reads of the same event (new scan id,
/// a few seconds later, maybe in the same fingerprint window).
fn deliveries(reads: &[Read], extra: &[(usize, bool, i64)]) -> Vec<Incoming> {
    let mk = |r: &Read, id: String, second: i64| Incoming {
        index: 0,
        tracking_number: tn(&format!("SHIPMENT{:04}", r.shipment)),
        scan_id: ScanId::parse(&id).expect("scan id"),
        scan_type: r.scan_type,
        event_time: EventTime(second * 1_000_000),
        facility: facility_hash(FACILITIES[r.facility]),
        clock_skewed: false,
    };
    let mut out: Vec<Incoming> = reads
        .iter()
        .enumerate()
        .map(|(i, r)| mk(r, format!("read-{i}"), r.second))
        .collect();
    for (k, (pick, retry, offset)) in extra.iter().enumerate() {
        let i = pick % reads.len();
        let r = &reads[i];
        out.push(if *retry {
            mk(r, format!("read-{i}"), r.second)
        } else {
            mk(r, format!("second-read-{k}"), r.second + offset)
        });
    }
    out
}

/// A journey as the final view compares it: (number, entries, closed, status, scans after
/// terminal).
type JourneyView = (u32, u32, Option<EventTime>, Option<StatusPoint>, u32);

fn final_view(h: &Harness) -> Vec<(TrackingNumber, Vec<Entry>, Vec<JourneyView>)> {
    let mut v: Vec<_> = h
        .states
        .iter()
        .map(|(k, s)| {
            let journeys = s
                .earlier
                .iter()
                .cloned()
                .chain([s.latest_journey()])
                .map(|j| {
                    (
                        j.number,
                        j.entries,
                        j.closed,
                        j.derived.point,
                        j.derived.scans_after_terminal,
                    )
                })
                .collect();
            (k.clone(), s.timeline.clone(), journeys)
        })
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

fn run(mut scans: Vec<Incoming>, cuts: &[usize]) -> Harness {
    for (i, s) in scans.iter_mut().enumerate() {
        s.index = i;
    }
    let mut h = Harness::new();
    let mut rest = scans;
    for cut in cuts {
        if rest.is_empty() {
            break;
        }
        let at = cut % rest.len() + 1;
        let tail = rest.split_off(at);
        h.apply(rest);
        rest = tail;
    }
    if !rest.is_empty() {
        h.apply(rest);
    }
    h
}

/// Versions count per (tracking number, journey), from 1, without a gap or a repeat, and each
/// journey's state has the last one published for it.
fn check_versions(h: &Harness) -> Result<(), TestCaseError> {
    let mut last: HashMap<(&TrackingNumber, u32), u64> = HashMap::new();
    for c in &h.changes {
        let v = last.entry((&c.tracking_number, c.journey)).or_insert(0);
        prop_assert_eq!(c.version.0, *v + 1, "versions gapless per journey");
        prop_assert!(c.previous != Some(c.current), "a change changes something");
        *v = c.version.0;
    }
    for (number, state) in &h.states {
        for journey in state
            .earlier
            .iter()
            .cloned()
            .chain([state.latest_journey()])
        {
            prop_assert_eq!(
                journey.version.0,
                last.get(&(number, journey.number)).copied().unwrap_or(0)
            );
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn final_shipment_is_independent_of_arrival_order_duplicates_and_batching(
        reads in prop::collection::vec(read(), 1..30),
        extra in prop::collection::vec((any::<usize>(), any::<bool>(), 0i64..90), 0..20),
        shuffle_seed in any::<u64>(),
        cuts in prop::collection::vec(any::<usize>(), 0..6),
    ) {
        let reference = run(deliveries(&reads, &[]), &[]);
        let mut shuffled = deliveries(&reads, &extra);
        // Fisher-Yates with a tiny LCG: proptest shrinks the seed, not the permutation.
        let mut x = shuffle_seed | 1;
        for i in (1..shuffled.len()).rev() {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let j = (x >> 33) as usize % (i + 1);
            shuffled.swap(i, j);
        }
        let h = run(shuffled, &cuts);
        // Second reads of the same event can only shrink a timeline to the earliest read of each
        // event, which the reference (no copies) may not have; compare against a reference that
        // received the copies in a single ordered batch instead.
        let reference_with_copies = run(deliveries(&reads, &extra), &[]);
        prop_assert_eq!(final_view(&h), final_view(&reference_with_copies));
        if extra.iter().all(|(_, retry, _)| *retry) {
            prop_assert_eq!(final_view(&h), final_view(&reference));
        }
        check_versions(&h)?;
        check_versions(&reference_with_copies)?;
    }

    #[test]
    fn replaying_batches_changes_nothing(
        reads in prop::collection::vec(read(), 1..30),
        cuts in prop::collection::vec(any::<usize>(), 0..6),
    ) {
        let scans = deliveries(&reads, &[]);
        let mut h = run(scans.clone(), &cuts);
        let before = final_view(&h);
        let changes = h.changes.len();
        let versions: Vec<Version> = h.states.values().map(|s| s.version).collect();
        let outcomes = h.apply(scans.into_iter().enumerate().map(|(i, mut s)| { s.index = i; s }).collect());
        prop_assert!(outcomes.iter().all(|o| matches!(o, Outcome::Duplicate(_))));
        prop_assert_eq!(final_view(&h), before);
        prop_assert_eq!(h.changes.len(), changes);
        prop_assert_eq!(h.states.values().map(|s| s.version).collect::<Vec<_>>(), versions);
    }

    #[test]
    fn two_journeys_are_found_whatever_the_arrival_order_duplicates_and_batching(
        first in prop::collection::vec((0usize..13, 0i64..100), 0..12),
        second in prop::collection::vec((0usize..13, 200i64..300), 1..12),
        retries in prop::collection::vec(any::<usize>(), 0..8),
        shuffle_seed in any::<u64>(),
        cuts in prop::collection::vec(any::<usize>(), 0..6),
    ) {
        // Journey 1 ends with a delivery at second 100; every scan of journey 2 comes more
        // than `new_journey_after` (50 s) after it. No other scan is terminal, and facilities
        // are unique (no fingerprint duplicates): both journeys keep every read.
        let open: Vec<ScanType> = ScanType::ALL
            .into_iter()
            .filter(|t| !matches!(t, Delivered | ReturnedToSender))
            .collect();
        prop_assert_eq!(open.len(), 13);
        let engine = Engine::new(Duration::from_secs(1)).new_journey_after(Duration::from_secs(50));
        let mk = |i: usize, (t, second): (usize, i64)| Incoming {
            index: i,
            tracking_number: tn("SHIPMENT0001"),
            scan_id: ScanId::parse(&format!("read-{i}")).expect("scan id"),
            scan_type: open[t],
            event_time: EventTime(second * 1_000_000),
            facility: i as u64,
            clock_skewed: false,
        };
        let mut ordered: Vec<Incoming> =
            first.iter().enumerate().map(|(i, r)| mk(i, *r)).collect();
        ordered.push(Incoming {
            scan_type: Delivered,
            ..mk(first.len(), (0, 100))
        });
        let offset = ordered.len();
        ordered.extend(second.iter().enumerate().map(|(i, r)| mk(offset + i, *r)));
        let mut arriving = ordered.clone();
        for pick in &retries {
            arriving.push(ordered[pick % ordered.len()].clone());
        }
        let mut x = shuffle_seed | 1;
        for i in (1..arriving.len()).rev() {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let j = (x >> 33) as usize % (i + 1);
            arriving.swap(i, j);
        }
        let run_with = |scans: Vec<Incoming>, cuts: &[usize]| {
            let mut h = Harness { engine, ..Harness::new() };
            let mut rest: Vec<Incoming> =
                scans.into_iter().enumerate().map(|(i, mut s)| { s.index = i; s }).collect();
            for cut in cuts {
                if rest.is_empty() {
                    break;
                }
                let tail = rest.split_off(cut % rest.len() + 1);
                h.apply(rest);
                rest = tail;
            }
            if !rest.is_empty() {
                h.apply(rest);
            }
            h
        };
        let reference = run_with(ordered, &[]);
        let h = run_with(arriving, &cuts);
        prop_assert_eq!(final_view(&h), final_view(&reference));
        let state = h.state("SHIPMENT0001");
        let ranges = state.journey_ranges();
        prop_assert_eq!(ranges.len(), 2);
        prop_assert_eq!(ranges[0].1.len(), first.len() + 1);
        prop_assert_eq!(ranges[1].1.len(), second.len());
        check_versions(&h)?;
    }
}
