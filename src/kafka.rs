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

/// A producer that delivers each message once and in order per partition.
pub fn idempotent_producer(
    cluster: &Cluster,
) -> Result<FutureProducer<LoggingContext>, KafkaError> {
    client_config(
        cluster,
        &cluster.producer,
        &[
            ("enable.idempotence", "true"),
            ("acks", "all"),
            ("linger.ms", "5"),
            ("compression.type", "lz4"),
        ],
    )
    .create_with_context(LoggingContext)
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
/// librdkafka properties passed through as they are (TLS, SASL, timeouts...).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaClientConfig {
    pub properties: BTreeMap<String, String>,
}
