//! The ingest path's per-scan costs outside the engine: protobuf decode of a ScanBatch as it
//! arrives over gRPC, validation, the carrier check of a tracking number, and the dedup lookup against a real RocksDB: reading the
//! state of the shipments a batch touches (stored ones and new ones), whose timeline summary
//! the engine deduplicates against.
//! `cargo bench --bench ingest`.

use std::hint::black_box;
use std::time::{Duration, Instant, SystemTime};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use prost::Message;
use scand::config::RetentionConfig;
use scand::domain::TrackingNumber;
use scand::engine::{stall::StallPolicy, Engine};
use scand::ingest::carrier::CarrierRegistry;
use scand::ingest::validate::Validator;
use scand::ingest::IngestConfig;
use scand::proto::pb;
use scand::store::StoreConfig;
use scand::store::{writer, Store};

fn scan(i: usize) -> pb::Scan {
    pb::Scan {
        scan_id: format!("LD0001{i:010}-{}", i % 20),
        tracking_number: format!("LD0001{:010}", i / 20),
        scan_type: pb::ScanType::Sorted as i32,
        event_time: Some(prost_types::Timestamp::from(
            SystemTime::now() - Duration::from_secs(3600),
        )),
        location: Some(pb::Location {
            facility_id: format!("F2-{}", i % 500),
            kind: pb::LocationKind::SortingFacility as i32,
            latitude: Some(52.1),
            longitude: Some(4.3),
        }),
        device_id: format!("dev-{}", i % 5000),
        source: pb::Source::Handheld as i32,
        ..Default::default()
    }
}

fn decode(c: &mut Criterion) {
    let mut group = c.benchmark_group("scan_batch");
    for n in [1usize, 100, 1000] {
        let bytes = pb::ScanBatch {
            batch_id: "b".into(),
            scans: (0..n).map(scan).collect(),
        }
        .encode_to_vec();
        group.throughput(Throughput::Elements(n as u64));
        group.bench_with_input(BenchmarkId::new("decode", n), &bytes, |b, bytes| {
            b.iter(|| black_box(pb::ScanBatch::decode(bytes.as_slice())))
        });
        let batch = pb::ScanBatch::decode(bytes.as_slice()).expect("decodes");
        let validator = Validator::new(&IngestConfig::default()).expect("formats");
        // Every tracking number seen before: the carrier check is remembered.
        group.bench_with_input(BenchmarkId::new("validate", n), &batch, |b, batch| {
            b.iter(|| {
                let now = SystemTime::now();
                for s in &batch.scans {
                    let _ = black_box(validator.validate(s.clone(), now));
                }
            })
        });
        // First sight of each number (a fresh validator per batch): the full carrier check.
        group.bench_with_input(
            BenchmarkId::new("validate_first_sight", n),
            &batch,
            |b, batch| {
                b.iter_batched(
                    || Validator::new(&IngestConfig::default()).expect("formats"),
                    |fresh| {
                        let now = SystemTime::now();
                        for s in &batch.scans {
                            let _ = black_box(fresh.validate(s.clone(), now));
                        }
                        // Dropped after the timing, like the setup that built it.
                        fresh
                    },
                    criterion::BatchSize::LargeInput,
                )
            },
        );
    }
    group.finish();
}

/// Numbers of the built-in carriers (valid, from the public reference vectors), one with a
/// wrong check digit, and ones of no known format (the load generator's `LD…`).
const NUMBERS: &[(&str, &str)] = &[
    ("ups", "1Z5R89390357567127"),
    ("fedex_12", "986578788855"),
    ("fedex_34", "1001921334250001000300779017972697"),
    ("usps_impb", "420787459400111206206406260787"),
    ("s10", "RB123456785GB"),
    ("dhl_ecommerce", "GM2951173225174494"),
    ("amazon", "TBA000000000000"),
    ("check_digit_mismatch", "1Z5R89390357567128"),
    ("unknown_format", "LD00010000012345"),
];

fn carrier_check(c: &mut Criterion) {
    let registry = CarrierRegistry::builtin();
    let mut group = c.benchmark_group("carrier_check");
    for (name, number) in NUMBERS {
        group.bench_with_input(BenchmarkId::new("classify", name), number, |b, number| {
            b.iter(|| black_box(registry.classify(number)))
        });
    }
    group.finish();
}

/// A store holding `n` scans, written through the real writer.
fn filled_store(n: usize) -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = StoreConfig {
        path: dir.path().to_owned(),
        ..StoreConfig::default()
    };
    let store = Store::open(&config).expect("opens");
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let (handle, _, thread) = writer::spawn(
        store.clone(),
        Engine::new(Duration::from_secs(60)),
        (StallPolicy::default(), RetentionConfig::default().policy()),
        &config,
        None,
    )
    .expect("writer");
    let validator = Validator::new(&IngestConfig::default()).expect("formats");
    runtime.block_on(async {
        for chunk in (0..n).collect::<Vec<_>>().chunks(1000) {
            let now = SystemTime::now();
            let scans = chunk
                .iter()
                .map(|&i| validator.validate(scan(i), now).expect("valid"))
                .collect();
            let answer = handle
                .enqueue(scans, Vec::new(), Instant::now())
                .await
                .expect("queued");
            answer.await.expect("answered").expect("durable");
        }
    });
    drop(handle);
    thread.join().expect("writer stops");
    (dir, store)
}

fn shipment_state_lookup(c: &mut Criterion) {
    let stored = 100_000;
    let (_dir, store) = filled_store(stored);
    let mut group = c.benchmark_group("shipment_state_lookup");
    let batch = 500;
    group.throughput(Throughput::Elements(batch as u64));
    let number = |s: String| TrackingNumber::parse(&s).expect("valid");
    let hits: Vec<TrackingNumber> = (0..batch)
        .map(|i| number(scan(i * 97 % stored).tracking_number))
        .collect();
    let misses: Vec<TrackingNumber> = (0..batch)
        .map(|i| number(format!("NEVERSEEN{i:06}")))
        .collect();
    for (name, numbers) in [("hit", &hits), ("miss", &misses)] {
        let numbers: Vec<&TrackingNumber> = numbers.iter().collect();
        group.bench_function(BenchmarkId::new(name, batch), |b| {
            b.iter(|| black_box(store.shipment_states(&numbers).expect("reads")))
        });
    }
    group.finish();
}

criterion_group!(benches, decode, carrier_check, shipment_state_lookup);
criterion_main!(benches);
