//! Gateway mode: validated gRPC scans are produced to the partitioned scans topic, keyed by
//! tracking number, instead of being applied here. The instance that owns the partition
//! (a Kafka source in the same consumer group) deduplicates, orders and derives status, so
//! each shipment has exactly one writer however many front ends take scans.
//!
//! Invariant: a batch is acknowledged only once every scan's delivery report succeeded
//! (idempotent producer, acks=all). Its scans answer ACCEPTED, meaning durable in Kafka;
//! duplicates are found by the owner, which treats them as such.

use prost::Message;
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use serde::{Deserialize, Serialize};

use crate::domain::scan::ValidScan;
use crate::kafka::LoggingContext;
use crate::telemetry::metrics as m;

#[derive(Clone)]
pub struct Gateway {
    producer: FutureProducer<LoggingContext>,
    topic: String,
}

/// Deliveries of one batch, awaited by [`Forwarded::delivered`].
pub struct Forwarded(Vec<Result<DeliveryFuture, KafkaError>>);

impl Gateway {
    pub fn new(producer: FutureProducer<LoggingContext>, topic: String) -> Self {
        Self { producer, topic }
    }

    /// Hands every scan to the producer, in order.
    pub fn forward(&self, scans: &[ValidScan]) -> Forwarded {
        Forwarded(
            scans
                .iter()
                .map(|scan| {
                    let payload = scan.wire.encode_to_vec();
                    let headers = OwnedHeaders::new().insert(Header {
                        key: "content-type",
                        value: Some("application/x-protobuf".as_bytes()),
                    });
                    let record = FutureRecord::to(&self.topic)
                        .key(scan.tracking_number.as_str().as_bytes())
                        .payload(&payload)
                        .headers(headers);
                    self.producer
                        .send_result(record)
                        .map_err(|(error, _)| error)
                })
                .collect(),
        )
    }
}

impl Forwarded {
    /// Resolves once every scan is acknowledged by the broker, or with the first failure.
    pub async fn delivered(self) -> Result<(), KafkaError> {
        let count = self.0.len() as u64;
        for delivery in self.0 {
            match delivery?.await {
                Ok(Ok(_)) => {}
                Ok(Err((error, _))) => return Err(error),
                Err(_) => return Err(KafkaError::Canceled),
            }
        }
        metrics::counter!(m::GATEWAY_FORWARDED_TOTAL).increment(count);
        Ok(())
    }
}

/// Gateway mode: gRPC scans are produced to the partitioned scans topic (key = tracking
/// number) instead of being applied here, so the partition's owner orders each shipment.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaGatewayConfig {
    pub enabled: bool,
    pub topic: String,
}

impl Default for KafkaGatewayConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            topic: "scans.raw".to_owned(),
        }
    }
}
