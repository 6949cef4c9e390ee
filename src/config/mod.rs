//! Configuration: a TOML file layered under `SCAND_*` environment variables
//! (`SCAND_GRPC__LISTEN=0.0.0.0:50051` sets `grpc.listen`; a variable without `__`, such as the
//! `SCAND_PORT` Kubernetes injects for a Service named `scand`, is no option). Each component's section is a
//! struct beside that component (`store::StoreConfig`, `ingest::IngestConfig`, ...); this
//! module composes them, holds the engine's (dedup, stall), and checks the whole.
//!
//! Invariant: a config that loads is complete and sane. Unknown keys, bad addresses, bad
//! durations and out-of-range limits are errors that name the key, never silently ignored.

use std::{path::PathBuf, time::Duration};

use figment::{
    providers::{Env, Format, Serialized, Toml},
    Figment,
};
use serde::{Deserialize, Serialize};

use crate::api::{tls::TlsConfig, GrpcConfig};
use crate::ingest::auth::{AuthConfig, Scope};
use crate::ingest::kafka::KafkaSourceConfig;
use crate::ingest::IngestConfig;
use crate::kafka::{Cluster, KafkaClientConfig};
use crate::publish::feed::FeedConfig;
use crate::publish::kafka::KafkaSinkConfig;
use crate::scaleout::gateway::KafkaGatewayConfig;
use crate::store::StoreConfig;
use crate::telemetry::{admin::AdminConfig, LogConfig};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{0}")]
    Load(#[from] Box<figment::Error>),
    #[error("config file {0} does not exist")]
    Missing(PathBuf),
    #[error("invalid value for `{key}`: {reason}")]
    Invalid { key: &'static str, reason: String },
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub grpc: GrpcConfig,
    pub admin: AdminConfig,
    pub store: StoreConfig,
    pub ingest: IngestConfig,
    pub dedup: DedupConfig,
    pub feed: FeedConfig,
    pub stall: StallConfig,
    pub lifecycle: LifecycleConfig,
    pub retention: RetentionConfig,
    pub kafka: KafkaConfig,
    pub log: LogConfig,
}

/// Stalled shipments: no scan for longer than the threshold of the shipment's status.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StallConfig {
    /// How often the deadline index is swept for shipments that stalled and journeys that
    /// expired (`[retention]`), and the change log trimmed.
    #[serde(with = "humantime_serde")]
    pub sweep_interval: Duration,
    pub thresholds: StallThresholds,
}

/// Per status; "0s" = never stalls in that status. Terminal statuses never stall.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StallThresholds {
    #[serde(with = "humantime_serde")]
    pub label_created: Duration,
    #[serde(with = "humantime_serde")]
    pub picked_packed: Duration,
    #[serde(with = "humantime_serde")]
    pub in_transit: Duration,
    #[serde(with = "humantime_serde")]
    pub out_for_delivery: Duration,
    #[serde(with = "humantime_serde")]
    pub delivery_attempted: Duration,
    #[serde(with = "humantime_serde")]
    pub available_for_pickup: Duration,
    #[serde(with = "humantime_serde")]
    pub exception: Duration,
}

impl Default for StallConfig {
    fn default() -> Self {
        Self {
            sweep_interval: Duration::from_secs(60),
            thresholds: StallThresholds::default(),
        }
    }
}

impl Default for StallThresholds {
    fn default() -> Self {
        const HOUR: u64 = 3600;
        Self {
            label_created: Duration::from_secs(7 * 24 * HOUR),
            picked_packed: Duration::from_secs(72 * HOUR),
            in_transit: Duration::from_secs(48 * HOUR),
            out_for_delivery: Duration::from_secs(12 * HOUR),
            delivery_attempted: Duration::from_secs(48 * HOUR),
            available_for_pickup: Duration::from_secs(7 * 24 * HOUR),
            exception: Duration::from_secs(72 * HOUR),
        }
    }
}

impl StallThresholds {
    pub fn policy(&self) -> crate::engine::stall::StallPolicy {
        use crate::domain::Status;
        crate::engine::stall::StallPolicy::new([
            (Status::LabelCreated, self.label_created),
            (Status::PickedPacked, self.picked_packed),
            (Status::InTransit, self.in_transit),
            (Status::OutForDelivery, self.out_for_delivery),
            (Status::DeliveryAttempted, self.delivery_attempted),
            (Status::AvailableForPickup, self.available_for_pickup),
            (Status::Exception, self.exception),
        ])
    }
}

/// Journeys: when a tracking number's next scan starts a new shipment (see `engine::journey`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LifecycleConfig {
    /// After a terminal scan, a scan this much later starts a new journey whatever its type
    /// (a LABEL_CREATED or PICKED_UP after it always does).
    #[serde(with = "humantime_serde")]
    pub new_journey_after: Duration,
}

impl Default for LifecycleConfig {
    fn default() -> Self {
        Self {
            new_journey_after: crate::engine::Engine::NEW_JOURNEY_AFTER,
        }
    }
}

/// How long scand keeps what it stored (see `engine::retention`), in event time against the
/// server clock; swept every `stall.sweep_interval`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetentionConfig {
    /// A journey closed (delivered, returned) this long ago is removed with its scans.
    #[serde(with = "humantime_serde")]
    pub closed_after: Duration,
    /// A journey without a scan for this long is removed with its scans.
    #[serde(with = "humantime_serde")]
    pub idle_after: Duration,
    /// Status changes committed this long ago leave the change log once every sink delivered
    /// them; a feed resuming before what is kept gets OUT_OF_RANGE.
    #[serde(with = "humantime_serde")]
    pub change_log: Duration,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        const DAY: u64 = 24 * 3600;
        Self {
            closed_after: Duration::from_secs(90 * DAY),
            idle_after: Duration::from_secs(180 * DAY),
            change_log: Duration::from_secs(14 * DAY),
        }
    }
}

impl RetentionConfig {
    pub fn policy(&self) -> crate::engine::retention::RetentionPolicy {
        crate::engine::retention::RetentionPolicy::new(self.closed_after, self.idle_after)
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DedupConfig {
    /// Reads of the same tracking number, scan type and facility in one window of event time
    /// are one physical event.
    #[serde(with = "humantime_serde")]
    pub window: Duration,
}

impl Default for DedupConfig {
    fn default() -> Self {
        Self {
            window: Duration::from_secs(60),
        }
    }
}

/// Kafka in and out. Each direction switches on by itself; with all off no broker is needed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaConfig {
    /// Bootstrap servers, `host:port[,host:port]`.
    pub brokers: String,
    pub source: KafkaSourceConfig,
    pub sink: KafkaSinkConfig,
    pub gateway: KafkaGatewayConfig,
    pub consumer: KafkaClientConfig,
    pub producer: KafkaClientConfig,
    /// How long writes to an output (the changelog, the status topic) may fail without a
    /// success before `/readyz` says not ready, naming the output and its error.
    #[serde(with = "humantime_serde")]
    pub unready_after: Duration,
}

impl KafkaConfig {
    /// How every Kafka client of this config reaches the cluster.
    pub fn cluster(&self) -> Cluster {
        Cluster {
            brokers: self.brokers.clone(),
            consumer: self.consumer.clone(),
            producer: self.producer.clone(),
        }
    }
}

impl Default for KafkaConfig {
    fn default() -> Self {
        Self {
            brokers: "127.0.0.1:9092".to_owned(),
            source: KafkaSourceConfig::default(),
            sink: KafkaSinkConfig::default(),
            gateway: KafkaGatewayConfig::default(),
            consumer: KafkaClientConfig::default(),
            producer: KafkaClientConfig::default(),
            unready_after: Duration::from_secs(60),
        }
    }
}

impl Config {
    /// Defaults, then the file (if given), then `SCAND_*` variables.
    pub fn load(file: Option<&std::path::Path>) -> Result<Self, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(path) = file {
            if !path.exists() {
                return Err(ConfigError::Missing(path.to_owned()));
            }
            figment = figment.merge(Toml::file_exact(path));
        }
        Self::from_figment(figment.merge(config_variables()))
    }

    fn from_figment(figment: Figment) -> Result<Self, ConfigError> {
        let mut config: Config = figment.extract().map_err(Box::new)?;
        read_token_files(&mut config.grpc.auth)?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let positive = [
            ("grpc.max_message_bytes", self.grpc.max_message_bytes),
            ("store.queue_batches", self.store.queue_batches),
            (
                "store.group_commit_batches",
                self.store.group_commit_batches,
            ),
            ("ingest.max_batch_scans", self.ingest.max_batch_scans),
            ("feed.subscriber_buffer", self.feed.subscriber_buffer),
            ("grpc.max_connections", self.grpc.max_connections),
            (
                "kafka.source.batch_max_records",
                self.kafka.source.batch_max_records,
            ),
            ("kafka.sink.max_in_flight", self.kafka.sink.max_in_flight),
        ];
        for (key, value) in positive {
            if value == 0 {
                return Err(ConfigError::Invalid {
                    key,
                    reason: "must be at least 1".to_owned(),
                });
            }
        }
        if let Err(error) =
            crate::ingest::carrier::CarrierRegistry::new(&self.ingest.tracking_numbers)
        {
            return Err(ConfigError::Invalid {
                key: "ingest.tracking_numbers",
                reason: error.to_string(),
            });
        }
        if self.stall.sweep_interval.is_zero() {
            return Err(ConfigError::Invalid {
                key: "stall.sweep_interval",
                reason: "must be longer than 0s".to_owned(),
            });
        }
        for (key, value) in [
            (
                "lifecycle.new_journey_after",
                self.lifecycle.new_journey_after,
            ),
            ("retention.closed_after", self.retention.closed_after),
            ("retention.idle_after", self.retention.idle_after),
            ("retention.change_log", self.retention.change_log),
            ("kafka.unready_after", self.kafka.unready_after),
        ] {
            if value.is_zero() {
                return Err(ConfigError::Invalid {
                    key,
                    reason: "must be longer than 0s".to_owned(),
                });
            }
        }
        if self.retention.change_log <= self.feed.stalled_subscriber_timeout {
            return Err(ConfigError::Invalid {
                key: "retention.change_log",
                reason: format!(
                    "must be longer than feed.stalled_subscriber_timeout ({}): a subscriber cut \
                     off for being slow must find its changes still kept when it resumes",
                    humantime::format_duration(self.feed.stalled_subscriber_timeout)
                ),
            });
        }
        if self.kafka.source.enabled
            && self.kafka.source.advertised_url.is_empty()
            && self.grpc.listen.ip().is_unspecified()
        {
            return Err(ConfigError::Invalid {
                key: "kafka.source.advertised_url",
                reason: format!(
                    "set the URL other instances reach this one's gRPC at: grpc.listen {} is \
                     no address they can use",
                    self.grpc.listen
                ),
            });
        }
        if self.kafka.source.changelog_max_record_bytes < 1024 {
            return Err(ConfigError::Invalid {
                key: "kafka.source.changelog_max_record_bytes",
                reason: "must be at least 1024".to_owned(),
            });
        }
        if self.dedup.window.is_zero() {
            return Err(ConfigError::Invalid {
                key: "dedup.window",
                reason: "must be longer than zero".to_owned(),
            });
        }
        if self.store.memtable_bytes < 1024 * 1024 {
            return Err(ConfigError::Invalid {
                key: "store.memtable_bytes",
                reason: "must be at least 1 MiB".to_owned(),
            });
        }
        if self.store.memtables_total_bytes < self.store.memtable_bytes {
            return Err(ConfigError::Invalid {
                key: "store.memtables_total_bytes",
                reason: "must be at least store.memtable_bytes".to_owned(),
            });
        }
        if self.grpc.stream_window_bytes < 65_535 || self.grpc.connection_window_bytes < 65_535 {
            return Err(ConfigError::Invalid {
                key: "grpc.stream_window_bytes",
                reason: "HTTP/2 windows must be at least 65535 bytes".to_owned(),
            });
        }
        if self.ingest.max_in_flight_bytes < self.grpc.max_message_bytes {
            return Err(ConfigError::Invalid {
                key: "ingest.max_in_flight_bytes",
                reason: "must be at least grpc.max_message_bytes (one batch must fit)".to_owned(),
            });
        }
        if self.feed.stalled_subscriber_timeout.is_zero() {
            return Err(ConfigError::Invalid {
                key: "feed.stalled_subscriber_timeout",
                reason: "must be longer than 0s".to_owned(),
            });
        }
        validate_tls(&self.grpc.tls)?;
        validate_auth(&self.grpc.auth)?;
        let anonymous = self.grpc.auth.tokens.is_empty() && self.grpc.tls.client_ca.is_none();
        if anonymous && !self.grpc.listen.ip().is_loopback() && !self.grpc.allow_anonymous {
            return Err(ConfigError::Invalid {
                key: "grpc.listen",
                reason: format!(
                    "{} is reachable from other hosts, where anyone could send scans and read \
                     every shipment: configure [[grpc.auth.tokens]] or grpc.tls.client_ca, or \
                     set grpc.allow_anonymous = true to serve anonymous callers",
                    self.grpc.listen
                ),
            });
        }
        let kafka = &self.kafka;
        if (kafka.source.enabled || kafka.sink.enabled || kafka.gateway.enabled)
            && kafka.brokers.trim().is_empty()
        {
            return Err(ConfigError::Invalid {
                key: "kafka.brokers",
                reason: "required when a Kafka source, sink or gateway is enabled".to_owned(),
            });
        }
        if kafka.source.enabled && kafka.source.topics.is_empty() {
            return Err(ConfigError::Invalid {
                key: "kafka.source.topics",
                reason: "name at least one topic".to_owned(),
            });
        }
        if kafka.source.enabled
            && kafka
                .source
                .topics
                .contains(&kafka.source.dead_letter_topic)
        {
            return Err(ConfigError::Invalid {
                key: "kafka.source.dead_letter_topic",
                reason: "must not be one of the source topics".to_owned(),
            });
        }
        Ok(())
    }
}

/// The `SCAND_*` variables that set options: those naming a key below a section
/// (`SCAND_GRPC__LISTEN`), and only those. Platforms inject variables of the same prefix that
/// are not options: Kubernetes `SCAND_PORT`, `SCAND_SERVICE_HOST`, `SCAND_PORT_50051_TCP_ADDR`…
/// for a Service named `scand`, and `scand ctl` reads `SCAND_TARGET`; none has the `__` that
/// separates a section from its key, so they never reach the options. A variable that has it
/// is an option, and an unknown one (a typo) is still an error that names it.
fn config_variables() -> Env {
    Env::prefixed("SCAND_")
        .filter(|key| key.as_str().contains("__"))
        .split("__")
}

/// Both of `cert` and `key` or neither, and every file readable.
fn validate_tls(tls: &TlsConfig) -> Result<(), ConfigError> {
    match (&tls.cert, &tls.key) {
        (Some(_), None) | (None, Some(_)) => {
            return Err(ConfigError::Invalid {
                key: "grpc.tls",
                reason: "set both `cert` and `key`, or neither".to_owned(),
            })
        }
        (None, None) if tls.client_ca.is_some() => {
            return Err(ConfigError::Invalid {
                key: "grpc.tls.client_ca",
                reason: "client certificates need TLS: set `cert` and `key` too".to_owned(),
            })
        }
        _ => {}
    }
    let files = [
        ("grpc.tls.cert", &tls.cert),
        ("grpc.tls.key", &tls.key),
        ("grpc.tls.client_ca", &tls.client_ca),
    ];
    for (key, path) in files {
        if let Some(path) = path.as_ref().filter(|p| !p.is_file()) {
            return Err(ConfigError::Invalid {
                key,
                reason: format!("{} is not a readable file", path.display()),
            });
        }
    }
    Ok(())
}

/// Reads each `token_file` into its token's secret: a token is in the config or in its file,
/// never both.
fn read_token_files(auth: &mut AuthConfig) -> Result<(), ConfigError> {
    for (position, entry) in auth.tokens.iter_mut().enumerate() {
        let Some(path) = &entry.token_file else {
            continue;
        };
        let invalid = |reason: String| ConfigError::Invalid {
            key: "grpc.auth.tokens",
            reason: format!("token #{} {reason}", position + 1),
        };
        if !entry.token.is_empty() {
            return Err(invalid(
                "sets both `token` and `token_file`: keep the secret in one place".to_owned(),
            ));
        }
        entry.token = std::fs::read_to_string(path)
            .map_err(|e| invalid(format!("cannot read token_file {}: {e}", path.display())))?
            .trim()
            .to_owned();
    }
    Ok(())
}

/// Tokens long enough, each with a scope, ingest tokens allowing some device, none twice.
fn validate_auth(auth: &AuthConfig) -> Result<(), ConfigError> {
    let mut seen = std::collections::HashSet::new();
    for (position, entry) in auth.tokens.iter().enumerate() {
        let problem = if entry.token.len() < 16 {
            Some("is shorter than 16 characters")
        } else if entry.scopes.is_empty() {
            Some("has no scope (list \"ingest\", \"read\" and/or \"admin\")")
        } else if entry.scopes.contains(&Scope::Ingest) && entry.devices.is_empty() {
            Some("allows no device (list device ids, or \"*\" for any)")
        } else if !seen.insert(entry.token.as_str()) {
            Some("is configured twice")
        } else {
            None
        };
        if let Some(problem) = problem {
            return Err(ConfigError::Invalid {
                key: "grpc.auth.tokens",
                reason: format!("token #{} {problem}", position + 1),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
// figment's Jail closures return figment::Error by design.
#[allow(clippy::result_large_err)]
mod tests;
