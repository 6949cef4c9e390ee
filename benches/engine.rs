//! Engine throughput without I/O: applying batches of fresh and duplicate-heavy scans, and
//! deriving status over long timelines. `cargo bench --bench engine`.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use scand::domain::{EventTime, ScanId, ScanType, TrackingNumber};
use scand::engine::{facility_hash, status::Derived, Engine, Incoming, States};

fn scans(n: usize, shipments: usize) -> Vec<Incoming> {
    (0..n)
        .map(|i| Incoming {
            index: i,
            tracking_number: TrackingNumber::parse(&format!("BENCH{:08}", i % shipments))
                .expect("valid"),
            scan_id: ScanId::parse(&format!("scan-{i}")).expect("valid"),
            scan_type: ScanType::ALL[(i / shipments) % ScanType::ALL.len()],
            event_time: EventTime(i as i64 * 61_000_000),
            facility: facility_hash(&format!("hub-{}", i % 7)),
            clock_skewed: false,
        })
        .collect()
}

fn apply(c: &mut Criterion) {
    let engine = Engine::new(Duration::from_secs(60));
    let mut group = c.benchmark_group("engine_apply");
    for n in [1usize, 100, 1000] {
        let batch = scans(n, n.div_ceil(4));
        group.throughput(Throughput::Elements(n as u64));
        group.bench_with_input(BenchmarkId::new("fresh", n), &batch, |b, batch| {
            b.iter(|| {
                let mut states = States::default();
                black_box(engine.apply(batch.clone(), &mut states))
            })
        });
        let mut states = States::default();
        engine.apply(batch.clone(), &mut states);
        // The same scans again: every one a scan-id duplicate found in its shipment's timeline.
        group.bench_with_input(BenchmarkId::new("duplicates", n), &batch, |b, batch| {
            b.iter(|| {
                let mut s = states.clone();
                black_box(engine.apply(batch.clone(), &mut s))
            })
        });
    }
    group.finish();
}

fn derive(c: &mut Criterion) {
    let mut group = c.benchmark_group("status_derivation");
    for len in [10usize, 100, 1000] {
        let types: Vec<ScanType> = (0..len).map(|i| ScanType::ALL[i % 9]).collect();
        group.throughput(Throughput::Elements(len as u64));
        group.bench_with_input(BenchmarkId::from_parameter(len), &types, |b, types| {
            b.iter(|| black_box(Derived::of(types.iter().copied())))
        });
    }
    group.finish();
}

criterion_group!(benches, apply, derive);
criterion_main!(benches);
