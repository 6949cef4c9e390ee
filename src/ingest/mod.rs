//! Ingest: where scans enter. Every source (today gRPC; Kafka plugs in the same way) hands
//! batches to [`Ingestor`], which validates each scan, queues the valid ones for the store
//! writer and assembles the per-scan answer once the batch is durable.
//!
//! Invariants: one result per scan, in the batch's order; a rejected scan never reaches the
//! store; an answer is produced only after the writer confirmed the durable write.

pub mod carrier;
pub mod changelog;
pub mod codec;
pub mod gateway;
pub mod grpc;
pub mod kafka;
pub mod validate;

use std::time::{Instant, SystemTime};

use tokio::sync::oneshot;

use crate::api::pb;
use crate::engine::{DuplicateKind, Outcome};
use crate::store::{writer::WriterHandle, StoreError};
use crate::telemetry::metrics as m;
use gateway::Gateway;
use validate::{Rejection, Validator};

#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("batch has {scans} scans; the limit is {limit} (ingest.max_batch_scans): split it")]
    BatchTooLarge { scans: usize, limit: usize },
    #[error("store unavailable: {0}")]
    Store(#[from] StoreError),
    #[error("kafka unavailable, batch not forwarded (resend it): {0}")]
    Gateway(#[from] rdkafka::error::KafkaError),
}

impl From<IngestError> for tonic::Status {
    fn from(e: IngestError) -> Self {
        match e {
            IngestError::BatchTooLarge { .. } => tonic::Status::invalid_argument(e.to_string()),
            IngestError::Store(_) | IngestError::Gateway(_) => {
                tonic::Status::unavailable(e.to_string())
            }
        }
    }
}

/// Where valid scans go: this instance's store, or (gateway mode) the partitioned topic.
#[derive(Clone)]
pub enum Destination {
    Store(WriterHandle),
    Kafka(Gateway),
}

enum Answer {
    Store(oneshot::Receiver<Result<Vec<Outcome>, StoreError>>),
    Kafka(gateway::Forwarded),
}

/// Validates batches and hands them to their destination.
#[derive(Clone)]
pub struct Ingestor {
    validator: Validator,
    destination: Destination,
    max_batch_scans: usize,
}

/// A batch queued for the writer, in the order it was queued; resolve it with [`Pending::ack`].
pub struct Pending {
    batch_id: String,
    results: Vec<pb::ScanResult>,
    /// Index into `results` of each scan sent to the writer, in the order sent.
    queued: Vec<usize>,
    answer: Option<Answer>,
}

impl Ingestor {
    pub fn new(validator: Validator, destination: Destination, max_batch_scans: usize) -> Self {
        Self {
            validator,
            destination,
            max_batch_scans,
        }
    }

    /// Validates a batch and queues its valid scans (waiting while the writer's queue is full).
    /// Batches queued by one caller are applied in the order they were queued.
    #[tracing::instrument(name = "ingest", skip_all, fields(batch_id = %batch.batch_id, scans = batch.scans.len(), source = source))]
    pub async fn queue(
        &self,
        batch: pb::ScanBatch,
        source: &'static str,
    ) -> Result<Pending, IngestError> {
        let received = Instant::now();
        let scans = batch.scans.len();
        if scans > self.max_batch_scans {
            metrics::counter!(m::INGEST_BATCHES_FAILED_TOTAL, "reason" => "batch_too_large")
                .increment(1);
            return Err(IngestError::BatchTooLarge {
                scans,
                limit: self.max_batch_scans,
            });
        }
        metrics::counter!(m::SCANS_RECEIVED_TOTAL, "source" => source).increment(scans as u64);
        metrics::histogram!(m::INGEST_BATCH_SCANS).record(scans as f64);

        let now = SystemTime::now();
        let mut results = Vec::with_capacity(scans);
        let mut valid = Vec::with_capacity(scans);
        let mut queued = Vec::with_capacity(scans);
        for scan in batch.scans {
            let scan_id = scan.scan_id.clone();
            match self.validator.validate(scan, now) {
                Ok(v) => {
                    tracing::debug!(tracking_number = %v.tracking_number, scan_id = %v.scan_id, "scan queued");
                    queued.push(results.len());
                    valid.push(v);
                    results.push(pb::ScanResult {
                        scan_id,
                        outcome: pb::Outcome::Accepted as i32,
                        reason: String::new(),
                    });
                }
                Err(rejection) => {
                    record_rejection(&rejection);
                    tracing::debug!(%scan_id, reason = %rejection.reason(), "scan rejected");
                    results.push(pb::ScanResult {
                        scan_id,
                        outcome: pb::Outcome::Rejected as i32,
                        reason: rejection.reason(),
                    });
                }
            }
        }
        let answer = match &self.destination {
            _ if valid.is_empty() => None,
            Destination::Store(writer) => Some(Answer::Store(
                writer.enqueue(valid, Vec::new(), received).await?,
            )),
            Destination::Kafka(gateway) => Some(Answer::Kafka(gateway.forward(&valid))),
        };
        Ok(Pending {
            batch_id: batch.batch_id,
            results,
            queued,
            answer,
        })
    }

    /// Validates, stores and answers one batch.
    pub async fn ingest(
        &self,
        batch: pb::ScanBatch,
        source: &'static str,
    ) -> Result<pb::BatchAck, IngestError> {
        self.queue(batch, source).await?.ack().await
    }
}

impl Pending {
    /// Waits until the batch is durable and returns its answer.
    pub async fn ack(self) -> Result<pb::BatchAck, IngestError> {
        let Pending {
            batch_id,
            mut results,
            queued,
            answer,
        } = self;
        let outcomes = match answer {
            None => Vec::new(),
            // Forwarded scans are durable in Kafka; their owner answers duplicates there.
            Some(Answer::Kafka(forwarded)) => {
                forwarded.delivered().await?;
                Vec::new()
            }
            Some(Answer::Store(answer)) => answer.await.map_err(|_| StoreError::WriterGone)??,
        };
        for (position, outcome) in queued.into_iter().zip(outcomes) {
            let result = &mut results[position];
            match outcome {
                Outcome::Accepted => {}
                Outcome::Duplicate(kind) => {
                    result.outcome = pb::Outcome::Duplicate as i32;
                    result.reason = match kind {
                        DuplicateKind::ScanId => "duplicate_scan_id: scan_id already recorded".into(),
                        DuplicateKind::Fingerprint => {
                            "duplicate_fingerprint: same tracking number, scan type and facility within the dedup window".into()
                        }
                    };
                }
            }
        }
        Ok(pb::BatchAck { batch_id, results })
    }
}

fn record_rejection(rejection: &Rejection) {
    metrics::counter!(m::SCANS_REJECTED_TOTAL, "reason" => rejection.code()).increment(1);
}
