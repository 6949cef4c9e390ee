//! Realistic, reproducible scan traffic: shipments walking their lifecycle across warehouses,
//! hubs and vans, with retries, second reads, late bulk uploads, clock skew and broken scans,
//! each scan tagged with the outcome scand must answer.

use std::time::{Duration, SystemTime};

use rand::{rngs::StdRng, Rng, SeedableRng};
use scand::proto::pb::{self, Outcome, ScanType};

#[derive(Clone, Debug)]
pub struct Shape {
    pub shipments: usize,
    pub seed: u64,
    /// Share of extra scans that repeat an earlier one (half retries, half second reads).
    pub duplicate_pct: f64,
    /// Share of scans held back and sent later in a bulk upload.
    pub out_of_order_pct: f64,
    /// Share of extra scans that are broken and must be rejected.
    pub invalid_pct: f64,
    /// Device clocks are off by up to this much either way.
    pub clock_skew: Duration,
    /// Each journey cut after this many steps (1: labels created and nothing since); `None`:
    /// whole journeys.
    pub max_steps: Option<usize>,
}

/// One scan and the answer scand owes it.
#[derive(Clone, Debug)]
pub struct Planned {
    pub scan: pb::Scan,
    pub expect: Outcome,
}

/// A lifecycle step: scan type and the facility kind it happens at.
fn lifecycle(rng: &mut StdRng) -> Vec<(ScanType, pb::LocationKind)> {
    use pb::LocationKind::*;
    use ScanType::*;
    let mut steps = vec![
        (LabelCreated, Warehouse),
        (Picked, Warehouse),
        (Packed, Warehouse),
        (PickedUp, Warehouse),
    ];
    for _ in 0..rng.random_range(1..=3) {
        steps.extend([
            (ArrivedAtFacility, SortingFacility),
            (Sorted, SortingFacility),
            (DepartedFacility, SortingFacility),
            (Loaded, Vehicle),
        ]);
    }
    steps.push((OutForDelivery, Vehicle));
    match rng.random_range(0..100) {
        0..=79 => steps.push((Delivered, DeliveryPoint)),
        80..=89 => steps.extend([
            (DeliveryAttempted, DeliveryPoint),
            (OutForDelivery, Vehicle),
            (Delivered, DeliveryPoint),
        ]),
        90..=94 => steps.extend([(HeldAtPickupPoint, PickupPoint), (Delivered, PickupPoint)]),
        95..=97 => steps.extend([
            (Exception, SortingFacility),
            (OutForDelivery, Vehicle),
            (Delivered, DeliveryPoint),
        ]),
        _ => steps.extend([
            (DeliveryAttempted, DeliveryPoint),
            (ReturnedToSender, SortingFacility),
        ]),
    }
    steps
}

/// Every scan in send order.
pub fn generate(shape: &Shape) -> Vec<Planned> {
    let mut rng = StdRng::seed_from_u64(shape.seed);
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    // Journeys start 4-11 days ago with steps 5-180 minutes apart: even the longest (25 steps,
    // ~75 h) ends in the past, so no step needs clamping to "now" (which would put two steps in
    // one fingerprint window and make a planned ACCEPTED a duplicate).
    let mut timed: Vec<(i64, Planned)> = Vec::new();
    for s in 0..shape.shipments {
        let number = format!("LD{:04}{:010}", shape.seed % 10_000, s);
        let skew = shape.clock_skew.as_secs() as i64;
        let device_skew = if skew > 0 {
            rng.random_range(-skew..=skew)
        } else {
            0
        };
        let mut minute = (now - 11 * 86_400) / 60 + rng.random_range(0..7 * 24 * 60);
        let steps = lifecycle(&mut rng)
            .into_iter()
            .take(shape.max_steps.unwrap_or(usize::MAX));
        for (step, (scan_type, kind)) in steps.enumerate() {
            minute += rng.random_range(5..180);
            let seconds = minute * 60 + rng.random_range(0..30) + device_skew;
            let scan = pb::Scan {
                scan_id: format!("{number}-{step}"),
                tracking_number: number.clone(),
                scan_type: scan_type as i32,
                event_time: Some(prost_types::Timestamp { seconds, nanos: 0 }),
                location: Some(pb::Location {
                    facility_id: format!("F{}-{}", kind as i32, rng.random_range(0..500)),
                    kind: kind as i32,
                    latitude: Some(rng.random_range(-60.0..70.0)),
                    longitude: Some(rng.random_range(-170.0..170.0)),
                }),
                device_id: format!("dev-{}", rng.random_range(0..5000)),
                source: pb::Source::Handheld as i32,
                ..Default::default()
            };
            timed.push((
                seconds,
                Planned {
                    scan,
                    expect: Outcome::Accepted,
                },
            ));
        }
    }
    // Scanners report in event-time order, except trucks that upload late in bulk.
    timed.sort_by_key(|(t, p)| (*t, p.scan.scan_id.clone()));
    let mut on_time = Vec::with_capacity(timed.len());
    let mut late = Vec::new();
    for (_, planned) in timed {
        if rng.random_bool(shape.out_of_order_pct / 100.0) {
            late.push(planned);
        } else {
            on_time.push(planned);
        }
    }
    let mut uploads = Vec::new();
    for chunk in late.chunks(500) {
        let at = rng.random_range(0..=on_time.len());
        uploads.extend(chunk.iter().cloned().map(|p| (at, p)));
    }
    let scans = insert_at(on_time, uploads);

    let extras = |pct: f64| (scans.len() as f64 * pct / 100.0).round() as usize;
    let (duplicates, invalid) = (extras(shape.duplicate_pct), extras(shape.invalid_pct));
    let mut inserts = Vec::with_capacity(duplicates + invalid);
    for k in 0..duplicates {
        // A copy goes after its original, so the original is answered first.
        let from = rng.random_range(0..scans.len());
        let mut copy = scans[from].clone();
        copy.expect = Outcome::Duplicate;
        if k % 2 == 1 {
            // A second head reads the same parcel a moment later: same fingerprint.
            copy.scan.scan_id.push_str("-again");
            if let Some(t) = copy.scan.event_time.as_mut() {
                t.nanos = 1000;
            }
        }
        inserts.push((rng.random_range(from + 1..=scans.len()), copy));
    }
    for k in 0..invalid {
        let mut bad = scans[rng.random_range(0..scans.len())].clone();
        bad.expect = Outcome::Rejected;
        bad.scan.scan_id = format!("bad-{k}");
        match k % 4 {
            0 => bad.scan.tracking_number = "??".into(),
            1 => bad.scan.scan_type = 99,
            2 => bad.scan.event_time = None,
            _ => {
                bad.scan.event_time = Some(prost_types::Timestamp {
                    seconds: now + 86_400,
                    nanos: 0,
                })
            }
        }
        inserts.push((rng.random_range(0..=scans.len()), bad));
    }
    insert_at(scans, inserts)
}

/// `base` with each `(at, item)` placed before `base[at]` (at the end for `at == len`), items
/// for one position in the order given. One pass: inserting one by one is quadratic.
fn insert_at(base: Vec<Planned>, mut inserts: Vec<(usize, Planned)>) -> Vec<Planned> {
    inserts.sort_by_key(|(at, _)| *at);
    let mut out = Vec::with_capacity(base.len() + inserts.len());
    let mut pending = inserts.into_iter().peekable();
    for (i, item) in base.into_iter().enumerate() {
        while let Some((_, inserted)) = pending.next_if(|(at, _)| *at <= i) {
            out.push(inserted);
        }
        out.push(item);
    }
    out.extend(pending.map(|(_, inserted)| inserted));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_workload() {
        let shape = Shape {
            shipments: 50,
            seed: 7,
            duplicate_pct: 10.0,
            out_of_order_pct: 10.0,
            invalid_pct: 2.0,
            clock_skew: Duration::from_secs(30),
            max_steps: None,
        };
        let a = generate(&shape);
        let b = generate(&shape);
        assert_eq!(a.len(), b.len());
        assert!(a
            .iter()
            .zip(&b)
            .all(|(x, y)| x.scan.scan_id == y.scan.scan_id && x.expect == y.expect));
        assert!(a.iter().any(|p| p.expect == Outcome::Duplicate));
        assert!(a.iter().any(|p| p.expect == Outcome::Rejected));
        for (i, p) in a.iter().enumerate() {
            if p.expect == Outcome::Duplicate && !p.scan.scan_id.ends_with("-again") {
                let original = a
                    .iter()
                    .position(|o| o.scan.scan_id == p.scan.scan_id)
                    .expect("original");
                assert!(original < i, "a copy comes after its original");
            }
        }
    }
}
