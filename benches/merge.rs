//! The `shipments` merge operator, which RocksDB runs on the flush thread for every shipment
//! a memtable holds deltas of, and in compactions and reads: a journey's deltas combined
//! without their record (a flush), and one delta merged into a long record (a compaction or
//! a read). The wire merge scand runs beside the prost decode-apply-encode merge it
//! replaced, in the same run. `cargo bench --bench merge`.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use prost::Message;
use scand::store::codec::merge::{merge_shipment_records, prost_merge};
use scand::store::codec::{EntryRecord, ShipmentRecord};

/// The delta of one scan of a journey: the head as the writer writes it and the entry with
/// its stored scan (~170 bytes, as in the load generator's workload).
fn delta(step: usize) -> Vec<u8> {
    ShipmentRecord {
        status: 3,
        sub_status: 6,
        version: step as u64 + 1,
        timeline: vec![EntryRecord {
            event_time: 1_700_000_000_000_000 + step as i64 * 3_600_000_000,
            scan_id: format!("dev-{:04}-{:08}", step % 7, 1_000 + step),
            scan_type: 6,
            facility: 0x9e37_79b9_7f4a_7c15 ^ step as u64,
            event: vec![b'x'; 170].into(),
        }],
        stall_deadline: Some(1_700_200_000_000_000),
        carrier: "ups".into(),
        carrier_service: "UPS Ground".into(),
        ..Default::default()
    }
    .encode_to_vec()
}

fn merge(c: &mut Criterion) {
    type Merge = fn(Option<&[u8]>, Vec<&[u8]>) -> Option<Vec<u8>>;
    let merges: [(&str, Merge); 2] = [
        ("wire", |r, d| merge_shipment_records(r, d)),
        ("prost", |r, d| prost_merge(r, d)),
    ];
    let mut group = c.benchmark_group("shipment_merge");
    for n in [2usize, 15] {
        let deltas: Vec<Vec<u8>> = (0..n).map(delta).collect();
        group.throughput(Throughput::Elements(n as u64));
        for (name, merge) in merges {
            group.bench_with_input(
                BenchmarkId::new(format!("{name}/deltas_without_record"), n),
                &deltas,
                |b, deltas| {
                    b.iter(|| black_box(merge(None, deltas.iter().map(Vec::as_slice).collect())))
                },
            );
        }
    }
    let journey: Vec<Vec<u8>> = (0..20).map(delta).collect();
    let record =
        merge_shipment_records(None, journey.iter().map(Vec::as_slice)).unwrap_or_default();
    let next = delta(20);
    group.throughput(Throughput::Elements(1));
    for (name, merge) in merges {
        group.bench_function(format!("{name}/one_delta_into_20_entries"), |b| {
            b.iter(|| black_box(merge(Some(&record), vec![next.as_slice()])))
        });
    }
    group.finish();
}

criterion_group!(benches, merge);
criterion_main!(benches);
