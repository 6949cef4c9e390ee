//! Ingest: where scans enter. Every source goes through [`Ingestor`]: gRPC (`grpc`) hands it
//! whole batches, which it validates, queues for the store writer (or, in gateway mode,
//! forwards to the partitioned topic) and answers per scan once durable; Kafka (`kafka`)
//! validates with its validator, dead-letters what fails, and stores the rest with their
//! offsets through [`Ingestor::store`].
//!
//! Invariants: one result per scan, in the batch's order; a rejected scan never reaches the
//! store; an answer is produced only after the writer confirmed the durable write.

pub mod auth;
pub mod carrier;
pub mod grpc;
pub mod kafka;
pub mod message_limit;
pub mod validate;

use std::sync::Arc;
use std::time::{Duration, Instant};

use prost::Message;
use serde::{Deserialize, Serialize};
use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};
use tracing::Instrument;

use crate::domain::scan::ValidScan;
use crate::engine::{DuplicateKind, Outcome};
use crate::proto::pb;
use crate::scaleout::gateway::{self, Gateway};
use crate::store::writer::{SourceOffset, WriterHandle};
use crate::store::StoreError;
use crate::telemetry::metrics as m;
use auth::AllowedDevices;
use validate::{Rejection, Validator, MAX_FIELD_BYTES};

#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("batch has {scans} scans; the limit is {limit} (ingest.max_batch_scans): split it")]
    BatchTooLarge { scans: usize, limit: usize },
    #[error("store unavailable: {0}")]
    Store(#[from] StoreError),
    #[error("kafka unavailable, batch not forwarded (resend it): {0}")]
    Gateway(#[from] rdkafka::error::KafkaError),
    #[error("this ingestor forwards scans to Kafka and stores none")]
    NotStoring,
    #[error(
        "scand is overloaded: {limit} bytes of scans are already waiting to be stored \
         (ingest.max_in_flight_bytes); nothing of this batch was stored, retry with backoff"
    )]
    Overloaded { limit: usize },
}

impl From<IngestError> for tonic::Status {
    fn from(e: IngestError) -> Self {
        match e {
            IngestError::BatchTooLarge { .. } => tonic::Status::invalid_argument(e.to_string()),
            IngestError::Store(_) | IngestError::Gateway(_) => {
                tonic::Status::unavailable(e.to_string())
            }
            IngestError::NotStoring => tonic::Status::internal(e.to_string()),
            IngestError::Overloaded { .. } => tonic::Status::resource_exhausted(e.to_string()),
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

impl Answer {
    /// Waits for the destination in a task of its own that returns the batch's bytes to the
    /// in-flight budget as soon as the batch is stored, not when its caller reads the answer:
    /// a scanner that stops reading acks holds no share of the budget.
    fn resolve(self, admitted: Admitted) -> oneshot::Receiver<Result<Vec<Outcome>, IngestError>> {
        let (tx, rx) = oneshot::channel();
        tokio::spawn(async move {
            let result = match self {
                // Forwarded scans are durable in Kafka; their owner answers duplicates there.
                Answer::Kafka(forwarded) => forwarded
                    .delivered()
                    .await
                    .map(|()| Vec::new())
                    .map_err(IngestError::from),
                Answer::Store(answer) => match answer.await {
                    Ok(stored) => stored.map_err(IngestError::from),
                    Err(_) => Err(StoreError::WriterGone.into()),
                },
            };
            drop(admitted);
            let _ = tx.send(result);
        });
        rx
    }
}

/// How long a caller may wait for room among the batches in flight.
#[derive(Clone, Copy, Debug)]
pub enum Admission {
    /// As long as it takes: the caller is a stream, and waiting is its backpressure.
    Wait,
    /// Up to this long, then RESOURCE_EXHAUSTED: the caller holds a whole request meanwhile.
    Within(Duration),
}

/// Who sent a batch and what it may send.
#[derive(Clone, Copy)]
pub struct Caller<'a> {
    pub source: &'static str,
    /// Devices the caller's bearer token allows; `None` when tokens are not in use.
    pub devices: Option<&'a AllowedDevices>,
    pub admission: Admission,
}

/// Validates batches and hands them to their destination.
#[derive(Clone)]
pub struct Ingestor {
    validator: Validator,
    destination: Destination,
    max_batch_scans: usize,
    /// One permit per encoded byte of the batches accepted and not yet answered.
    in_flight: Arc<Semaphore>,
    max_in_flight_bytes: usize,
}

/// A batch queued for the writer, in the order it was queued; resolve it with [`Pending::ack`].
pub struct Pending {
    batch_id: String,
    results: Vec<pb::ScanResult>,
    /// Index into `results` of each scan sent to the writer, in the order sent.
    queued: Vec<usize>,
    answer: Option<oneshot::Receiver<Result<Vec<Outcome>, IngestError>>>,
    /// The batch's span, until it is answered.
    span: tracing::Span,
}

/// A batch's share of `ingest.max_in_flight_bytes`, counted in `scand_ingest_in_flight_bytes`
/// until dropped (once the batch is stored or refused).
struct Admitted(OwnedSemaphorePermit);

impl Drop for Admitted {
    fn drop(&mut self) {
        metrics::gauge!(m::INGEST_IN_FLIGHT_BYTES).decrement(self.0.num_permits() as f64);
    }
}

impl Ingestor {
    pub fn new(
        validator: Validator,
        destination: Destination,
        max_batch_scans: usize,
        max_in_flight_bytes: usize,
    ) -> Self {
        Self {
            validator,
            destination,
            max_batch_scans,
            in_flight: Arc::new(Semaphore::new(max_in_flight_bytes)),
            max_in_flight_bytes,
        }
    }

    /// Room for a batch of `bytes` among the batches in flight.
    async fn admit(&self, bytes: usize, admission: Admission) -> Result<Admitted, IngestError> {
        // A batch larger than the whole budget (only possible if the limits were set so) still
        // gets through alone rather than never.
        let permits = u32::try_from(bytes.clamp(1, self.max_in_flight_bytes)).unwrap_or(u32::MAX);
        let acquire = self.in_flight.clone().acquire_many_owned(permits);
        let permit = match admission {
            Admission::Wait => acquire.await.ok(),
            Admission::Within(wait) => tokio::time::timeout(wait, acquire)
                .await
                .ok()
                .and_then(Result::ok),
        };
        let Some(permit) = permit else {
            metrics::counter!(m::INGEST_BATCHES_FAILED_TOTAL, "reason" => "overloaded")
                .increment(1);
            return Err(IngestError::Overloaded {
                limit: self.max_in_flight_bytes,
            });
        };
        metrics::gauge!(m::INGEST_IN_FLIGHT_BYTES).increment(f64::from(permits));
        Ok(Admitted(permit))
    }

    /// Validates a batch and queues its valid scans (waiting while the writer's queue is full).
    /// Batches queued by one caller are applied in the order they were queued. The batch's span
    /// (`scan_batch`) lasts from here to its answer; the writer's group commit and WAL sync of
    /// it are its children.
    pub async fn queue(
        &self,
        batch: pb::ScanBatch,
        caller: Caller<'_>,
    ) -> Result<Pending, IngestError> {
        let span = tracing::info_span!(
            "scan_batch",
            batch_id = %batch.batch_id,
            scans = batch.scans.len(),
            source = caller.source
        );
        self.queue_in_span(batch, caller, span.clone())
            .instrument(span)
            .await
    }

    async fn queue_in_span(
        &self,
        batch: pb::ScanBatch,
        caller: Caller<'_>,
        span: tracing::Span,
    ) -> Result<Pending, IngestError> {
        let received = Instant::now();
        let source = caller.source;
        let scans = batch.scans.len();
        if scans > self.max_batch_scans {
            metrics::counter!(m::INGEST_BATCHES_FAILED_TOTAL, "reason" => "batch_too_large")
                .increment(1);
            return Err(IngestError::BatchTooLarge {
                scans,
                limit: self.max_batch_scans,
            });
        }
        let admitted = self.admit(batch.encoded_len(), caller.admission).await?;
        metrics::counter!(m::SCANS_RECEIVED_TOTAL, "source" => source).increment(scans as u64);
        metrics::histogram!(m::INGEST_BATCH_SCANS).record(scans as f64);

        let now = self.validator.now();
        let mut results = Vec::with_capacity(scans);
        let mut valid = Vec::with_capacity(scans);
        let mut queued = Vec::with_capacity(scans);
        for scan in batch.scans {
            let scan_id = scan.scan_id.clone();
            let validated = match caller.devices {
                // An oversized device id is left to the validator, which names the limit.
                Some(devices)
                    if scan.device_id.len() <= MAX_FIELD_BYTES
                        && !devices.permits(&scan.device_id) =>
                {
                    Err(Rejection::DeviceNotAllowed(scan.device_id))
                }
                _ => self.validator.validate(scan, now),
            };
            match validated {
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
                enqueue(writer, valid, Vec::new(), received).await?,
            )),
            Destination::Kafka(gateway) => Some(Answer::Kafka(gateway.forward(&valid))),
        };
        Ok(Pending {
            batch_id: batch.batch_id,
            results,
            queued,
            answer: answer.map(|answer| answer.resolve(admitted)),
            span,
        })
    }

    /// The validator every source checks its scans with.
    pub fn validator(&self) -> &Validator {
        &self.validator
    }

    /// Stores scans a source validated itself (`ingest::kafka`, which dead-letters what fails)
    /// together with the source positions they carry, in one durable write: resolves once it
    /// is durable, with one outcome per scan. Fails fast while the store refuses writes.
    pub async fn store(
        &self,
        scans: Vec<ValidScan>,
        offsets: Vec<SourceOffset>,
        received: Instant,
    ) -> Result<Vec<Outcome>, IngestError> {
        let Destination::Store(writer) = &self.destination else {
            return Err(IngestError::NotStoring);
        };
        let span = tracing::info_span!("scan_batch", scans = scans.len(), source = "kafka");
        async {
            enqueue(writer, scans, offsets, received)
                .await?
                .await
                .map_err(|_| StoreError::WriterGone)?
                .map_err(IngestError::from)
        }
        .instrument(span)
        .await
    }

    /// Validates, stores and answers one batch.
    pub async fn ingest(
        &self,
        batch: pb::ScanBatch,
        caller: Caller<'_>,
    ) -> Result<pb::BatchAck, IngestError> {
        self.queue(batch, caller).await?.ack().await
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
            span,
        } = self;
        let outcomes = match answer {
            None => Vec::new(),
            Some(answer) => answer
                .instrument(span)
                .await
                .map_err(|_| StoreError::WriterGone)??,
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
                Outcome::JourneyExpired => {
                    let rejection = Rejection::JourneyExpired;
                    record_rejection(&rejection);
                    result.outcome = pb::Outcome::Rejected as i32;
                    result.reason = rejection.reason();
                }
            }
        }
        Ok(pb::BatchAck { batch_id, results })
    }
}

/// Queues scans for the writer, failing fast rather than queueing batches bound to fail while
/// the store refuses writes (the writer probes meanwhile).
async fn enqueue(
    writer: &WriterHandle,
    scans: Vec<ValidScan>,
    offsets: Vec<SourceOffset>,
    received: Instant,
) -> Result<oneshot::Receiver<Result<Vec<Outcome>, StoreError>>, IngestError> {
    if let Some(failure) = writer.failure() {
        metrics::counter!(m::INGEST_BATCHES_FAILED_TOTAL, "reason" => "store_unwritable")
            .increment(1);
        return Err(StoreError::Unwritable(failure).into());
    }
    Ok(writer.enqueue(scans, offsets, received).await?)
}

fn record_rejection(rejection: &Rejection) {
    metrics::counter!(m::SCANS_REJECTED_TOTAL, "reason" => rejection.code()).increment(1);
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IngestConfig {
    /// Largest batch accepted in one ScanBatch.
    pub max_batch_scans: usize,
    /// Encoded bytes of scan batches accepted but not yet answered, across all callers. A
    /// stream beyond it waits (HTTP/2 flow control pushes back on the scanner); a unary call
    /// waits up to `admission_timeout`, then fails with RESOURCE_EXHAUSTED.
    pub max_in_flight_bytes: usize,
    #[serde(with = "humantime_serde")]
    pub admission_timeout: Duration,
    /// A scan more than this far ahead of the server clock is rejected.
    #[serde(with = "humantime_serde")]
    pub max_future_skew: Duration,
    /// A scan older than this is rejected.
    #[serde(with = "humantime_serde")]
    pub max_age: Duration,
    /// Accepted scans further ahead of the server clock than this are flagged as clock skew.
    #[serde(with = "humantime_serde")]
    pub clock_skew_flag_ahead: Duration,
    /// Accepted scans further behind the server clock than this are flagged as clock skew.
    #[serde(with = "humantime_serde")]
    pub clock_skew_flag_behind: Duration,
    /// Carrier formats and check digits of tracking numbers, and what to do when one fails.
    pub tracking_numbers: crate::ingest::carrier::CarrierConfig,
}

impl Default for IngestConfig {
    fn default() -> Self {
        Self {
            max_batch_scans: 10_000,
            max_in_flight_bytes: 256 * 1024 * 1024,
            admission_timeout: Duration::from_secs(1),
            max_future_skew: Duration::from_secs(5 * 60),
            max_age: Duration::from_secs(90 * 24 * 3600),
            clock_skew_flag_ahead: Duration::from_secs(60),
            clock_skew_flag_behind: Duration::from_secs(24 * 3600),
            tracking_numbers: crate::ingest::carrier::CarrierConfig::default(),
        }
    }
}
