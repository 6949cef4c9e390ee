//! Kafka client plumbing shared by the Kafka adapters (`ingest::kafka`, `scaleout`,
//! `publish::kafka`): client configuration with pass-through properties, a context that routes
//! librdkafka's logs into tracing, and the consumer's statistics onto the lag board.

use std::collections::BTreeMap;

use rdkafka::client::ClientContext;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::error::KafkaError;
use rdkafka::producer::FutureProducer;
use rdkafka::statistics::Statistics;
use serde::{Deserialize, Serialize};

use crate::telemetry::lag::Lag;

/// How to reach the cluster: its bootstrap servers and each kind of client's properties.
#[derive(Clone, Debug, PartialEq)]
pub struct Cluster {
    /// Bootstrap servers, `host:port[,host:port]`.
    pub brokers: String,
    pub consumer: KafkaClientConfig,
    pub producer: KafkaClientConfig,
}

/// Client configuration: our defaults first, then the operator's properties, which win.
pub fn client_config(
    cluster: &Cluster,
    client: &KafkaClientConfig,
    defaults: &[(&str, &str)],
) -> ClientConfig {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", &cluster.brokers);
    for (key, value) in defaults {
        config.set(*key, *value);
    }
    for (key, value) in &client.properties {
        config.set(key, value);
    }
    config
}

/// A consumer that reads partitions it assigns itself (no group membership, no commits),
/// committed records only; `name` tells brokers' logs which part of scand reads.
pub fn assigning_consumer(
    cluster: &Cluster,
    name: &str,
) -> Result<rdkafka::consumer::BaseConsumer, KafkaError> {
    client_config(
        cluster,
        &cluster.consumer,
        &[
            ("group.id", name),
            ("enable.auto.commit", "false"),
            ("isolation.level", "read_committed"),
        ],
    )
    .create()
}

/// A producer that delivers each message once and in order per partition.
pub fn idempotent_producer(
    cluster: &Cluster,
) -> Result<FutureProducer<LoggingContext>, KafkaError> {
    idempotent_producer_with(cluster, &[])
}

/// [`idempotent_producer`] with more defaults of the caller's (the operator's still win).
pub fn idempotent_producer_with(
    cluster: &Cluster,
    more: &[(&str, &str)],
) -> Result<FutureProducer<LoggingContext>, KafkaError> {
    let mut defaults = vec![
        ("enable.idempotence", "true"),
        ("acks", "all"),
        ("linger.ms", "5"),
        ("compression.type", "lz4"),
        // Keyed records land where a Java producer puts them (`partition_of`).
        ("partitioner", "murmur2_random"),
    ];
    defaults.extend_from_slice(more);
    client_config(cluster, &cluster.producer, &defaults).create_with_context(LoggingContext)
}

/// librdkafka logs through tracing.
#[derive(Clone, Copy, Debug, Default)]
pub struct LoggingContext;

impl ClientContext for LoggingContext {
    fn log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        log(level, facility, message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        tracing::warn!(%error, reason, "kafka client error");
    }
}

pub fn log(level: RDKafkaLogLevel, facility: &str, message: &str) {
    match level {
        RDKafkaLogLevel::Emerg
        | RDKafkaLogLevel::Alert
        | RDKafkaLogLevel::Critical
        | RDKafkaLogLevel::Error => {
            tracing::error!(facility, "librdkafka: {message}")
        }
        RDKafkaLogLevel::Warning => tracing::warn!(facility, "librdkafka: {message}"),
        RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
            tracing::info!(facility, "librdkafka: {message}")
        }
        RDKafkaLogLevel::Debug => tracing::debug!(facility, "librdkafka: {message}"),
    }
}

/// Consumer lag per assigned partition, from librdkafka's statistics (no broker round trip):
/// the partitions in them are the ones this consumer owns now.
pub fn record_lag(statistics: &Statistics, lag: &Lag) {
    lag.owned(statistics.topics.iter().flat_map(|(topic, t)| {
        t.partitions
            .iter()
            // -1 = the partition is not consumed by this client, or lag unknown yet.
            .filter(|(partition, p)| **partition >= 0 && p.consumer_lag >= 0)
            .map(|(partition, p)| ((topic.clone(), *partition), p.consumer_lag))
    }));
}

/// The partition Kafka's default partitioner (the Java client's; librdkafka's
/// `murmur2_random`) gives a keyed record among `partitions`: the partitioning contract for the
/// scans topics, whose key is the normalized tracking number.
pub fn partition_of(key: &[u8], partitions: i32) -> i32 {
    // The Java client's `toPositive`: the sign bit dropped, not the absolute value.
    ((murmur2(key) & 0x7fff_ffff) % partitions.max(1) as u32) as i32
}

/// MurmurHash2 as Kafka's `Utils.murmur2` computes it (seed 0x9747b28c).
fn murmur2(data: &[u8]) -> u32 {
    const M: u32 = 0x5bd1_e995;
    let mut h: u32 = 0x9747_b28c ^ data.len() as u32;
    let mut words = data.chunks_exact(4);
    for word in words.by_ref() {
        let mut k = u32::from_le_bytes([word[0], word[1], word[2], word[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> 24;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M) ^ k;
    }
    let tail = words.remainder();
    if !tail.is_empty() {
        for (i, byte) in tail.iter().enumerate().rev() {
            h ^= u32::from(*byte) << (8 * i);
        }
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^ (h >> 15)
}

/// librdkafka properties passed through as they are (TLS, SASL, timeouts...).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaClientConfig {
    pub properties: BTreeMap<String, String>,
}

/// The partition ids `metadata` lists for `topic` (none if it does not exist).
pub fn partition_ids(metadata: &rdkafka::metadata::Metadata, topic: &str) -> Vec<i32> {
    metadata
        .topics()
        .iter()
        .filter(|t| t.name() == topic)
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn murmur2_is_the_java_clients() {
        // Kafka's own test vectors (UtilsTest.testMurmur2), as signed Java ints.
        let cases: [(&[u8], i32); 6] = [
            (b"21", -973_932_308),
            (b"foobar", -790_332_482),
            (b"a-little-bit-long-string", -985_981_536),
            (b"a-little-bit-longer-string", -1_486_304_829),
            (
                b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8",
                -58_897_971,
            ),
            (b"abc", 479_470_107),
        ];
        for (key, expected) in cases {
            assert_eq!(
                murmur2(key) as i32,
                expected,
                "{}",
                String::from_utf8_lossy(key)
            );
        }
    }

    #[test]
    fn a_tracking_number_has_the_partition_a_java_producer_gives_it() {
        // As kafka-python's murmur2 partitioner computes them for 6 partitions.
        assert_eq!(partition_of(b"1Z999AA10123456784", 6), 3);
        assert_eq!(partition_of(b"PARCEL0001", 6), 3);
        assert_eq!(partition_of(b"a-little-bit-longer-string", 6), 5);
        assert_eq!(partition_of(b"21", 6), 0);
        assert_eq!(partition_of(b"21", 1), 0);
    }
}
