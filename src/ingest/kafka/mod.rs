//! Kafka source: a consumer group on the scans topics. Records are decoded (`proto::codec`),
//! validated (`validate`) and stored through the [`Ingestor`] like gRPC scans, with their
//! offsets; what cannot be decoded, and scans that are rejected, go to the dead-letter topic
//! with the reason in a header. A newly assigned partition stays paused while its state is
//! restored from the changelog (`scaleout::changelog`), then is consumed from where that
//! state ends; a revoked one is released at once (`domain::ownership`). `rebalance` holds
//! that side of the source, `triage` each record's fate without I/O.
//!
//! Invariants:
//! - A record's offset counts as consumed only once the batch holding it is durable: the next
//!   offset of every partition is written in the same RocksDB WriteBatch as the state it
//!   produced, and once a newly assigned partition's state is restored the consumer seeks
//!   there. A crash or rebalance neither loses nor re-applies a record (and a scan seen twice
//!   anyway is a scan-id duplicate).
//! - Only records of owned partitions are applied: one fetched before its partition was
//!   revoked, or before its restore ended, is left to the partition's owner.
//! - Dead letters are delivered before the batch (and so their offsets) is written; if the
//!   dead-letter topic cannot be written, the consumer pauses and retries, never drops.
//! - A record on another partition than its normalized tracking number's (by Kafka's default
//!   partitioner, `kafka::partition_of`) is never applied here: it is produced again to the
//!   partition it belongs to, like a dead letter, before its offset moves on, so its shipment's
//!   owner applies it.
//! - Offsets are committed to the broker too, asynchronously and after durability, only so
//!   that lag tools see progress; RocksDB is the source of truth.

mod rebalance;
mod triage;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, Headers, Message, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::validate::Rejection;
use super::Ingestor;
use crate::domain::ownership::Ownership;
use crate::domain::{scan::ValidScan, Origin};
use crate::engine::Outcome;
use crate::kafka::{self as client, Cluster, LoggingContext};
use crate::proto::codec::Encoding;
use crate::scaleout::members::{Directory, PartitionCounts, Router};
use crate::store::writer::{SourceOffset, WriterHandle};
use crate::telemetry::lag::Lag;
use crate::telemetry::metrics as m;
use rebalance::{Claims, SourceContext};
use triage::content_type;
pub use triage::{encoding_of, triage, Refusal};

pub const HEADER_REASON: &str = "scand-reason";
pub const HEADER_SOURCE_TOPIC: &str = "scand-source-topic";
pub const HEADER_SOURCE_PARTITION: &str = "scand-source-partition";
pub const HEADER_SOURCE_OFFSET: &str = "scand-source-offset";

const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(5);

/// Restores ended and not yet handled by the source loop, at most.
const RESTORES_ENDING: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum KafkaSourceError {
    #[error("kafka consumer: {0}")]
    Kafka(#[from] KafkaError),
}

/// The running source: consume, decode, validate, dead-letter, store, commit.
pub struct KafkaSource {
    consumer: StreamConsumer<SourceContext>,
    lag: Lag,
    dead_letters: FutureProducer<LoggingContext>,
    config: KafkaSourceConfig,
    /// Stores into this instance's store, whatever gRPC's destination.
    ingestor: Ingestor,
    /// Installs restored partition state, as jobs in its queue.
    writer: WriterHandle,
    cluster: Cluster,
    ownership: Ownership,
    claims: Arc<Claims>,
    partitions: PartitionCounts,
    /// The fleet's directory and this instance's URL in it: a restore waits for the previous
    /// owner to hand the partition over.
    members: (Directory, String),
}

/// A record that will not be applied here, and where it goes instead.
struct Diverted {
    record: OwnedMessage,
    to: Diversion,
}

enum Diversion {
    /// To the dead-letter topic: the code (metrics label) and the reason (header).
    DeadLetter { code: &'static str, reason: String },
    /// Back to its own topic, on the partition its normalized tracking number belongs to
    /// (`kafka::partition_of`): its producer keyed it otherwise, and its shipment is owned by
    /// whoever owns that partition.
    Reroute {
        tracking_number: String,
        partition: i32,
    },
}

impl KafkaSource {
    pub fn new(
        cluster: &Cluster,
        config: &KafkaSourceConfig,
        writer: WriterHandle,
        router: &Router,
        ingestor: Ingestor,
        lag: Lag,
    ) -> Result<Self, KafkaSourceError> {
        let (ownership, partitions) = (router.ownership.clone(), router.partitions.clone());
        let claims = Arc::new(Claims::default());
        let consumer: StreamConsumer<SourceContext> = client::client_config(
            cluster,
            &cluster.consumer,
            &[
                ("group.id", config.group_id.as_str()),
                ("enable.auto.commit", "false"),
                ("enable.auto.offset.store", "false"),
                ("auto.offset.reset", "earliest"),
                ("statistics.interval.ms", "5000"),
            ],
        )
        .create_with_context(SourceContext {
            lag: lag.clone(),
            ownership: ownership.clone(),
            claims: claims.clone(),
            partitions: partitions.clone(),
        })?;
        let topics: Vec<&str> = config.topics.iter().map(String::as_str).collect();
        consumer.subscribe(&topics)?;
        Ok(Self {
            consumer,
            lag,
            dead_letters: client::idempotent_producer(cluster)?,
            config: config.clone(),
            ingestor,
            writer,
            cluster: cluster.clone(),
            ownership,
            claims,
            partitions,
            members: (router.directory.clone(), router.me.clone()),
        })
    }

    /// Runs until `shutdown`; the batch in hand is finished first. Between batches it starts
    /// the restores of newly assigned partitions and, as each ends, seeks its partition to
    /// where the restored state ends and resumes it.
    pub async fn run(self, shutdown: CancellationToken) {
        tracing::info!(topics = ?self.config.topics, group = %self.config.group_id, "kafka source started");
        let (restored_tx, mut restored) = tokio::sync::mpsc::channel(RESTORES_ENDING);
        loop {
            let first = tokio::select! {
                () = shutdown.cancelled() => break,
                () = self.claims.wake.notified() => {
                    self.start_restores(&restored_tx);
                    continue;
                }
                Some(done) = restored.recv() => {
                    self.finish_restore(done);
                    continue;
                }
                record = self.consumer.recv() => record,
            };
            let mut records = Vec::with_capacity(self.config.batch_max_records);
            match first {
                Ok(record) => records.push(record.detach()),
                Err(error) => {
                    tracing::warn!(%error, "kafka consume error");
                    tokio::time::sleep(RETRY_MIN).await;
                    continue;
                }
            }
            let deadline = tokio::time::Instant::now() + self.config.batch_max_wait;
            while records.len() < self.config.batch_max_records {
                tokio::select! {
                    () = tokio::time::sleep_until(deadline) => break,
                    record = self.consumer.recv() => match record {
                        Ok(record) => records.push(record.detach()),
                        Err(error) => {
                            tracing::warn!(%error, "kafka consume error");
                            break;
                        }
                    },
                }
            }
            self.process(records, &shutdown).await;
        }
        tracing::info!("kafka source stopped");
    }

    async fn process(&self, records: Vec<OwnedMessage>, shutdown: &CancellationToken) {
        let received = Instant::now();
        let now = self.ingestor.validator().now();
        let mut offsets: BTreeMap<(String, i32), i64> = BTreeMap::new();
        let mut scans = Vec::with_capacity(records.len());
        // The record of each scan in `scans`, to dead-letter it if the store refuses it.
        let mut stored = Vec::with_capacity(records.len());
        let mut dead = Vec::new();
        let mut fenced = 0;
        for record in records {
            // Fetched before its partition was revoked, or before its restore ended: its
            // owner applies it.
            if !self
                .ownership
                .accepts(record.topic(), record.partition(), record.offset())
            {
                fenced += 1;
                continue;
            }
            metrics::counter!(m::KAFKA_RECORDS_TOTAL, "topic" => record.topic().to_owned())
                .increment(1);
            offsets.insert(
                (record.topic().to_owned(), record.partition()),
                record.offset() + 1,
            );
            if let Some(millis) = record.timestamp().to_millis() {
                let produced = std::time::UNIX_EPOCH
                    + Duration::from_millis(u64::try_from(millis).unwrap_or_default());
                self.lag
                    .consumed(record.topic(), record.partition(), produced);
            }
            match triage(
                record.payload(),
                content_type(&record),
                record.topic(),
                &self.config,
                self.ingestor.validator(),
                now,
            ) {
                Ok(mut valid) => match self.misplaced(&record, &valid) {
                    Some(partition) => dead.push(Diverted {
                        record,
                        to: Diversion::Reroute {
                            tracking_number: valid.tracking_number.to_string(),
                            partition,
                        },
                    }),
                    None => {
                        valid.origin = Some(Origin {
                            topic: record.topic().to_owned(),
                            partition: record.partition(),
                        });
                        scans.push(valid);
                        stored.push(record);
                    }
                },
                Err(Refusal { code, reason }) => dead.push(Diverted {
                    record,
                    to: Diversion::DeadLetter { code, reason },
                }),
            }
        }
        if fenced > 0 {
            metrics::counter!(m::KAFKA_RECORDS_FENCED_TOTAL).increment(fenced);
        }
        if offsets.is_empty() {
            return;
        }
        metrics::counter!(m::SCANS_RECEIVED_TOTAL, "source" => "kafka")
            .increment((scans.len() + dead.len()) as u64);
        self.divert(dead, shutdown).await;

        let offsets: Vec<SourceOffset> = offsets
            .into_iter()
            .map(|((topic, partition), next)| SourceOffset {
                topic,
                partition,
                next,
            })
            .collect();
        let outcomes = self.store_until_stored(scans, &offsets, received).await;
        // Scans of a journey retention removed: the store kept this batch's offsets out, so
        // they are dead-lettered first, then the offsets stored (a crash between the two reads
        // the batch again: its scans are duplicates by then, and the refusals are sent again).
        let refused: Vec<Diverted> = stored
            .into_iter()
            .zip(outcomes)
            .filter(|(_, outcome)| *outcome == Outcome::JourneyExpired)
            .map(|(record, _)| {
                let rejection = Rejection::JourneyExpired;
                metrics::counter!(m::SCANS_REJECTED_TOTAL, "reason" => rejection.code())
                    .increment(1);
                Diverted {
                    record,
                    to: Diversion::DeadLetter {
                        code: rejection.code(),
                        reason: rejection.reason(),
                    },
                }
            })
            .collect();
        if !refused.is_empty() {
            self.divert(refused, shutdown).await;
            self.store_until_stored(Vec::new(), &offsets, received)
                .await;
        }
        self.commit_to_broker(&offsets);
    }

    /// Stores a batch, retrying until it is stored; returns each scan's outcome.
    async fn store_until_stored(
        &self,
        scans: Vec<ValidScan>,
        offsets: &[SourceOffset],
        received: Instant,
    ) -> Vec<Outcome> {
        let mut backoff = RETRY_MIN;
        loop {
            match self
                .ingestor
                .store(scans.clone(), offsets.to_vec(), received)
                .await
            {
                Ok(outcomes) => return outcomes,
                Err(error) => {
                    // Nothing of this batch is stored; it is retried as a whole (its dead letters
                    // are already delivered and are not sent again).
                    tracing::error!(%error, "kafka batch not stored; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(RETRY_MAX);
                }
            }
        }
    }

    /// The partition the record belongs to, if it is not the one it was read from. `None`
    /// while the topic's partition count is unknown.
    fn misplaced(&self, record: &OwnedMessage, scan: &ValidScan) -> Option<i32> {
        let partitions = *self
            .partitions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(record.topic())?;
        let belongs = client::partition_of(scan.tracking_number.as_str().as_bytes(), partitions);
        (belongs != record.partition()).then_some(belongs)
    }

    /// Delivers each diverted record (dead letter or reroute) before the batch is stored,
    /// pausing the partitions while a delivery fails.
    async fn divert(&self, diverted: Vec<Diverted>, shutdown: &CancellationToken) {
        let mut paused: Option<TopicPartitionList> = None;
        for item in diverted {
            let mut backoff = RETRY_MIN;
            loop {
                match self.send_diverted(&item).await {
                    Ok(()) => {
                        match &item.to {
                            Diversion::DeadLetter { code, .. } => {
                                metrics::counter!(m::KAFKA_DEAD_LETTERS_TOTAL, "reason" => *code)
                                    .increment(1)
                            }
                            Diversion::Reroute { .. } => {
                                metrics::counter!(m::KAFKA_RECORDS_REROUTED_TOTAL).increment(1)
                            }
                        }
                        break;
                    }
                    Err(error) => {
                        metrics::counter!(m::KAFKA_DEAD_LETTER_ERRORS_TOTAL).increment(1);
                        tracing::error!(%error, "diverted record (dead letter or reroute) not delivered; partitions paused, retrying");
                        if paused.is_none() {
                            if let Ok(assignment) = self.consumer.assignment() {
                                if self.consumer.pause(&assignment).is_ok() {
                                    paused = Some(assignment);
                                }
                            }
                        }
                        if shutdown.is_cancelled() && backoff >= RETRY_MAX {
                            // Not stored, not committed: the record is consumed again after restart.
                            tracing::error!("shutting down with an undelivered diverted record; it is read again on restart");
                        }
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(RETRY_MAX);
                    }
                }
            }
        }
        if let Some(assignment) = paused {
            // Only the owned ones: the others stay paused until their restore ends.
            let mut owned = TopicPartitionList::new();
            for e in assignment.elements() {
                if self.ownership.is_owned(e.topic(), e.partition()) {
                    owned.add_partition(e.topic(), e.partition());
                }
            }
            if let Err(error) = self.consumer.resume(&owned) {
                tracing::error!(%error, "cannot resume partitions");
            }
        }
    }

    async fn send_diverted(&self, item: &Diverted) -> Result<(), KafkaError> {
        let record = &item.record;
        let mut headers = OwnedHeaders::new();
        if let Some(original) = record.headers() {
            for h in original.iter() {
                headers = headers.insert(Header {
                    key: h.key,
                    value: h.value,
                });
            }
        }
        let partition = record.partition().to_string();
        let offset = record.offset().to_string();
        let reason = match &item.to {
            Diversion::DeadLetter { reason, .. } => reason.clone(),
            Diversion::Reroute {
                tracking_number,
                partition: belongs,
            } => format!(
                "rerouted: tracking number {tracking_number} belongs to partition {belongs}, \
                 not {partition}; key scans by the normalized tracking number"
            ),
        };
        let headers = headers
            .insert(Header {
                key: HEADER_REASON,
                value: Some(reason.as_bytes()),
            })
            .insert(Header {
                key: HEADER_SOURCE_TOPIC,
                value: Some(record.topic().as_bytes()),
            })
            .insert(Header {
                key: HEADER_SOURCE_PARTITION,
                value: Some(partition.as_bytes()),
            })
            .insert(Header {
                key: HEADER_SOURCE_OFFSET,
                value: Some(offset.as_bytes()),
            });
        let mut out: FutureRecord<'_, [u8], [u8]> = match &item.to {
            Diversion::DeadLetter { .. } => {
                let out = FutureRecord::to(&self.config.dead_letter_topic);
                match record.key() {
                    Some(key) => out.key(key),
                    None => out,
                }
            }
            Diversion::Reroute {
                tracking_number,
                partition,
            } => FutureRecord::to(record.topic())
                .key(tracking_number.as_bytes())
                .partition(*partition),
        }
        .headers(headers);
        if let Some(payload) = record.payload() {
            out = out.payload(payload);
        }
        self.dead_letters
            .send(out, Duration::from_secs(5))
            .await
            .map(|_| ())
            .map_err(|(error, _)| error)
    }

    fn commit_to_broker(&self, offsets: &[SourceOffset]) {
        let mut tpl = TopicPartitionList::new();
        for o in offsets {
            if let Err(error) =
                tpl.add_partition_offset(&o.topic, o.partition, Offset::Offset(o.next))
            {
                tracing::warn!(%error, "cannot build offset commit");
            }
        }
        // Advisory only (lag tools); a failure here loses nothing.
        if let Err(error) = self.consumer.commit(&tpl, CommitMode::Async) {
            tracing::debug!(%error, "async offset commit failed");
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaSourceConfig {
    pub enabled: bool,
    pub topics: Vec<String>,
    pub group_id: String,
    /// Encoding of record values without a `content-type` header.
    pub encoding: Encoding,
    /// Per-topic encoding, overriding `encoding`.
    pub topic_encodings: BTreeMap<String, Encoding>,
    /// Records that cannot be decoded, and rejected scans, go here with the reason in headers.
    pub dead_letter_topic: String,
    /// Compacted topic replicating the state of each partition's shipments to its next owner;
    /// needs at least as many partitions as the scans topics.
    pub changelog_topic: String,
    /// Where the instances announce their gRPC URL and the partitions they own, so that any of
    /// them forwards a query to the shipment's owner.
    pub members_topic: String,
    /// This instance's gRPC URL as the others reach it; empty: `http://` + `grpc.listen`.
    pub advertised_url: String,
    /// Largest changelog record scand sends; a shipment's state larger than this travels in
    /// pieces. Keep it below the topic's `max.message.bytes` and the producer's
    /// `message.max.bytes` (both 1 MB by default).
    pub changelog_max_record_bytes: usize,
    /// Most records in one ingest batch.
    pub batch_max_records: usize,
    /// Longest wait for a batch to fill once its first record arrived.
    #[serde(with = "humantime_serde")]
    pub batch_max_wait: Duration,
}

impl Default for KafkaSourceConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            topics: vec!["scans.raw".to_owned()],
            group_id: "scand".to_owned(),
            encoding: Encoding::Protobuf,
            topic_encodings: BTreeMap::new(),
            dead_letter_topic: "scans.dlq".to_owned(),
            changelog_topic: "scand.changelog".to_owned(),
            changelog_max_record_bytes: 512 * 1024,
            members_topic: "scand.members".to_owned(),
            advertised_url: String::new(),
            batch_max_records: 2000,
            batch_max_wait: Duration::from_millis(20),
        }
    }
}
