//! `--mode kafka`: the workload produced to scand's scans topic, as a sorting system would:
//! protobuf values keyed by tracking number, idempotent and acks=all. Reports how fast the
//! broker took them and the delivery latency; scand's answers are not visible on this path
//! (dead letters and the status topic are).

use std::time::{Duration, Instant};

use prost::Message;
use rdkafka::config::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};

use crate::workload::Planned;

/// Records handed to the producer before waiting for their delivery reports.
const IN_FLIGHT: usize = 20_000;

pub async fn produce(
    brokers: &str,
    topic: &str,
    planned: &[Planned],
    json: bool,
) -> Result<bool, String> {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "5")
        // Keyed by tracking number and partitioned as Kafka's default partitioner does: the
        // contract scand's scans topics rest on.
        .set("partitioner", "murmur2_random")
        .create()
        .map_err(|e| format!("kafka producer: {e}"))?;
    let mut latency = hdrhistogram::Histogram::<u64>::new(3).map_err(|e| e.to_string())?;
    let mut failed = 0u64;
    let started = Instant::now();
    let mut pending = tokio::task::JoinSet::new();
    let mut planned = planned.iter();
    loop {
        while pending.len() < IN_FLIGHT {
            let Some(p) = planned.next() else { break };
            let value = p.scan.encode_to_vec();
            let key = p.scan.tracking_number.clone();
            let producer = producer.clone();
            let topic = topic.to_owned();
            pending.spawn(async move {
                let sent = Instant::now();
                let record = FutureRecord::to(&topic).key(&key).payload(&value).headers(
                    OwnedHeaders::new().insert(Header {
                        key: "content-type",
                        value: Some("application/x-protobuf"),
                    }),
                );
                let result = producer.send(record, Duration::from_secs(30)).await;
                (result.is_ok(), sent.elapsed())
            });
        }
        let Some(joined) = pending.join_next().await else {
            break;
        };
        let (ok, took) = joined.map_err(|e| e.to_string())?;
        if ok {
            let _ = latency.record(took.as_micros() as u64);
        } else {
            failed += 1;
        }
    }
    let elapsed = started.elapsed();
    let delivered = latency.len();
    let rate = delivered as f64 / elapsed.as_secs_f64();
    let ms = |q: f64| latency.value_at_quantile(q) as f64 / 1000.0;
    if json {
        println!(
            "{}",
            serde_json::json!({
                "mode": "kafka", "topic": topic, "delivered": delivered, "failed": failed,
                "elapsed_s": elapsed.as_secs_f64(), "records_per_s": rate,
                "delivery_ms": { "p50": ms(0.5), "p99": ms(0.99), "max": latency.max() as f64 / 1000.0 },
            })
        );
    } else {
        println!("produced to       {topic:>12}");
        println!("delivered         {delivered:>12}");
        println!("failed            {failed:>12}");
        println!("throughput        {rate:>12.0} records/s");
        println!(
            "delivery (ms)     p50 {:.2}  p99 {:.2}  max {:.2}",
            ms(0.5),
            ms(0.99),
            latency.max() as f64 / 1000.0
        );
    }
    Ok(failed == 0)
}
