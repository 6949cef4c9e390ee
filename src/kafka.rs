//! Kafka client plumbing shared by the Kafka adapters (`ingest::kafka`, `scaleout`,
//! `publish::kafka`): client configuration with pass-through properties, and a context that
//! routes librdkafka's logs into tracing and its statistics into metrics.

use std::collections::BTreeMap;

use rdkafka::client::ClientContext;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::error::KafkaError;
use rdkafka::producer::FutureProducer;
use rdkafka::statistics::Statistics;
use serde::{Deserialize, Serialize};

use crate::telemetry::metrics as m;

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

/// librdkafka logs through tracing; consumer statistics become lag gauges.
#[derive(Clone, Copy, Debug, Default)]
pub struct LoggingContext;

impl ClientContext for LoggingContext {
    fn log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        log(level, facility, message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        tracing::warn!(%error, reason, "kafka client error");
    }

    fn stats(&self, statistics: Statistics) {
        record_lag(&statistics);
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

/// Consumer lag per assigned partition, from librdkafka's statistics (no broker round trip).
pub fn record_lag(statistics: &Statistics) {
    for (topic, t) in &statistics.topics {
        for (partition, p) in &t.partitions {
            // -1 = the partition is not consumed by this client, or lag unknown yet.
            if *partition >= 0 && p.consumer_lag >= 0 {
                metrics::gauge!(m::KAFKA_CONSUMER_LAG, "topic" => topic.clone(), "partition" => partition.to_string())
                    .set(p.consumer_lag as f64);
            }
        }
    }
}

/// librdkafka properties passed through as they are (TLS, SASL, timeouts...).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaClientConfig {
    pub properties: BTreeMap<String, String>,
}
