//! Kafka sink: drains the change log in sequence order to the status topic, keyed by tracking
//! number (so a shipment's changes stay ordered on one partition), with the version and
//! sequence in headers.
//!
//! Invariants:
//! - Idempotent producer, acks=all. The sink's cursor advances only over changes whose
//!   delivery report succeeded, in order: a failure is retried with backoff from the first
//!   undelivered change, never skipped.
//! - The cursor is stored after delivery. A crash between the two repeats a few changes with
//!   identical content (consumers drop versions they have seen); none is ever lost.
//! - With the broker away, ingest goes on; the backlog is `scand_outbox_pending`.

use std::time::{Duration, SystemTime};

use prost::Message;
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::domain::Sequence;
use crate::kafka::LoggingContext;
use crate::proto::codec::Encoding;
use crate::proto::pb;
use crate::store::{Store, StoreError};
use crate::telemetry::admin::OutputHealth;
use crate::telemetry::metrics as m;

/// The sink's name in `meta` and in metric labels.
pub const SINK: &str = "kafka";

const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
enum PublishError {
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("delivery of sequence {sequence} failed: {source}")]
    Delivery { sequence: u64, source: KafkaError },
}

pub struct KafkaSink {
    store: Store,
    producer: FutureProducer<LoggingContext>,
    config: KafkaSinkConfig,
    committed: watch::Receiver<Sequence>,
    health: OutputHealth,
}

impl KafkaSink {
    pub fn new(
        store: Store,
        producer: FutureProducer<LoggingContext>,
        config: KafkaSinkConfig,
        committed: watch::Receiver<Sequence>,
        health: OutputHealth,
    ) -> Self {
        Self {
            store,
            producer,
            config,
            committed,
            health,
        }
    }

    /// Runs until `shutdown`.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut cursor = match self.store.sink_cursor(SINK) {
            Ok(c) => c,
            Err(error) => {
                tracing::error!(%error, "kafka sink cannot read its cursor; not publishing");
                return;
            }
        };
        tracing::info!(topic = %self.config.topic, from = cursor.0, "kafka sink started");
        let mut backoff = RETRY_MIN;
        loop {
            let committed = *self.committed.borrow();
            metrics::gauge!(m::OUTBOX_PENDING).set(committed.0.saturating_sub(cursor.0) as f64);
            if committed <= cursor {
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    changed = self.committed.changed() => if changed.is_err() { break },
                }
                continue;
            }
            let step = tokio::select! {
                () = shutdown.cancelled() => break,
                step = self.publish_from(cursor, committed) => step,
            };
            match step {
                Ok(delivered) => {
                    cursor = delivered;
                    backoff = RETRY_MIN;
                    self.health.delivered();
                }
                Err((delivered, error)) => {
                    cursor = delivered;
                    metrics::counter!(m::PUBLISH_TOTAL, "sink" => SINK, "result" => "error")
                        .increment(1);
                    self.health.failed(&error);
                    tracing::warn!(%error, retry_in = ?backoff, "kafka sink: retrying from sequence {}", cursor.0 + 1);
                    tokio::select! {
                        () = shutdown.cancelled() => break,
                        () = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(RETRY_MAX);
                }
            }
        }
        tracing::info!(delivered = cursor.0, "kafka sink stopped");
    }

    /// Publishes one chunk after `cursor`, up to the durable sequence `upto`; returns the new
    /// cursor, or how far it got.
    async fn publish_from(
        &self,
        cursor: Sequence,
        upto: Sequence,
    ) -> Result<Sequence, (Sequence, PublishError)> {
        let store = self.store.clone();
        let limit = self.config.max_in_flight;
        let changes = tokio::task::spawn_blocking(move || store.changes(cursor, upto, limit))
            .await
            .map_err(|e| {
                (
                    cursor,
                    PublishError::Store(StoreError::WriteFailed(e.to_string())),
                )
            })?
            .map_err(|e| (cursor, e.into()))?;
        // Hand the whole chunk to the producer, then take delivery reports in order.
        let mut pending = Vec::with_capacity(changes.len());
        for change in &changes {
            let payload = encode(change, self.config.encoding);
            let version = change.version.to_string();
            let sequence = change.sequence.to_string();
            let journey = change.journey.to_string();
            let headers = OwnedHeaders::new()
                .insert(Header {
                    key: "scand-journey",
                    value: Some(journey.as_bytes()),
                })
                .insert(Header {
                    key: "scand-version",
                    value: Some(version.as_bytes()),
                })
                .insert(Header {
                    key: "scand-sequence",
                    value: Some(sequence.as_bytes()),
                })
                .insert(Header {
                    key: "content-type",
                    value: Some(content_type(self.config.encoding).as_bytes()),
                });
            let record = FutureRecord::to(&self.config.topic)
                .key(change.tracking_number.as_bytes())
                .payload(&payload)
                .headers(headers);
            match self.producer.send_result(record) {
                Ok(delivery) => pending.push((change, Some(delivery))),
                Err((error, _)) => {
                    // Refused (e.g. queue full): counts as failed, retried from here.
                    tracing::debug!(%error, "producer queue refused a change");
                    pending.push((change, None));
                    break;
                }
            }
        }
        let mut delivered = cursor;
        for (change, delivery) in pending {
            let result = match delivery {
                None => Err(KafkaError::Canceled),
                Some(delivery) => match delivery.await {
                    Ok(Ok(_)) => Ok(()),
                    Ok(Err((error, _))) => Err(error),
                    Err(_) => Err(KafkaError::Canceled),
                },
            };
            if let Err(source) = result {
                self.save(delivered).map_err(|e| (delivered, e.into()))?;
                return Err((
                    delivered,
                    PublishError::Delivery {
                        sequence: change.sequence,
                        source,
                    },
                ));
            }
            delivered = Sequence(change.sequence);
            metrics::counter!(m::PUBLISH_TOTAL, "sink" => SINK, "result" => "ok").increment(1);
            if let Some(committed) = change
                .committed_time
                .and_then(|t| SystemTime::try_from(t).ok())
            {
                if let Ok(age) = SystemTime::now().duration_since(committed) {
                    metrics::histogram!(m::PUBLISH_LATENCY_SECONDS, "sink" => SINK)
                        .record(age.as_secs_f64());
                }
            }
        }
        self.save(delivered).map_err(|e| (delivered, e.into()))?;
        Ok(delivered)
    }

    fn save(&self, delivered: Sequence) -> Result<(), StoreError> {
        self.store.set_sink_cursor(SINK, delivered)
    }
}

pub fn content_type(encoding: Encoding) -> &'static str {
    match encoding {
        Encoding::Protobuf => "application/x-protobuf",
        Encoding::Json => "application/json",
    }
}

/// The change as the sink's consumers read it.
pub fn encode(change: &pb::StatusChange, encoding: Encoding) -> Vec<u8> {
    match encoding {
        Encoding::Protobuf => change.encode_to_vec(),
        Encoding::Json => crate::proto::json::to_json(change).into_bytes(),
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaSinkConfig {
    pub enabled: bool,
    /// Status changes, keyed by tracking number.
    pub topic: String,
    pub encoding: Encoding,
    /// Changes handed to the producer before waiting for their delivery reports.
    pub max_in_flight: usize,
}

impl Default for KafkaSinkConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            topic: "shipments.status".to_owned(),
            encoding: Encoding::Protobuf,
            max_in_flight: 1000,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_encoding_carries_the_whole_change() {
        let change = pb::StatusChange {
            sequence: 7,
            tracking_number: "PARCEL0001".into(),
            version: 2,
            status: pb::Status::Delivered as i32,
            ..Default::default()
        };
        assert_eq!(
            crate::proto::json::from_json::<pb::StatusChange>(&encode(&change, Encoding::Json)),
            Ok(change.clone())
        );
        assert_eq!(
            pb::StatusChange::decode(encode(&change, Encoding::Protobuf).as_slice()).ok(),
            Some(change)
        );
    }
}
