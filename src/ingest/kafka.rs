//! Kafka source: a consumer group on the scans topics. Records are decoded (`proto::codec`),
//! validated (`validate`) and stored through the [`Ingestor`] like gRPC scans, with their
//! offsets; what cannot be decoded, and scans that are rejected, go to the dead-letter topic
//! with the reason in a header. A newly assigned partition stays paused while its state is
//! restored from the changelog (`scaleout::changelog`), then is consumed from where that
//! state ends; a revoked one is released at once (`domain::ownership`).
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

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, RebalanceProtocol, StreamConsumer,
};
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, Headers, Message, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::statistics::Statistics;
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::validate::{Rejection, Validator};
use super::Ingestor;
use crate::domain::ownership::{Generation, Ownership};
use crate::domain::{scan::ValidScan, Origin};
use crate::engine::Outcome;
use crate::kafka::{self as client, Cluster, LoggingContext};
use crate::proto::codec::{self, Encoding};
use crate::scaleout::changelog;
use crate::scaleout::members::{Directory, PartitionCounts, Router};
use crate::store::writer::{SourceOffset, WriterHandle};
use crate::telemetry::lag::Lag;
use crate::telemetry::metrics as m;

pub const HEADER_REASON: &str = "scand-reason";
pub const HEADER_SOURCE_TOPIC: &str = "scand-source-topic";
pub const HEADER_SOURCE_PARTITION: &str = "scand-source-partition";
pub const HEADER_SOURCE_OFFSET: &str = "scand-source-offset";

const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(5);

/// How long a revoked partition's release waits for a changelog record on its way: a little
/// longer than a delivery may take.
const RELEASE_WAIT: Duration = changelog::DELIVERY_TIMEOUT.saturating_add(Duration::from_secs(1));

/// Restores ended and not yet handled by the source loop, at most.
const RESTORES_ENDING: usize = 16;

const SEEK_TIMEOUT: Duration = Duration::from_secs(10);

const METADATA_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum KafkaSourceError {
    #[error("kafka consumer: {0}")]
    Kafka(#[from] KafkaError),
}

/// Claims each assigned partition and keeps it paused until its state is restored (by the
/// source loop, see [`KafkaSource::run`]); releases each revoked partition at once, so nothing
/// of it is applied, swept or replicated here afterwards.
pub struct SourceContext {
    /// The lag of the partitions this consumer owns, from its statistics.
    lag: Lag,
    ownership: Ownership,
    claims: Arc<Claims>,
    /// How many partitions each scans topic has, read at every assignment: where a tracking
    /// number belongs.
    partitions: PartitionCounts,
}

/// Partitions assigned and waiting for their restore, and the wake-up of the source loop
/// that starts restores. Bounded by the partitions of the scans topics.
#[derive(Default)]
struct Claims {
    waiting: Mutex<Vec<Claimed>>,
    wake: tokio::sync::Notify,
}

/// A partition claimed under a generation, when, and how many restores of it failed so far.
#[derive(Clone, Debug)]
struct Claimed {
    topic: String,
    partition: i32,
    generation: Generation,
    at: Instant,
    failures: u32,
}

impl Claims {
    fn push(&self, claims: impl IntoIterator<Item = Claimed>) {
        self.waiting
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .extend(claims);
        self.wake.notify_one();
    }

    fn take(&self) -> Vec<Claimed> {
        std::mem::take(
            &mut *self
                .waiting
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
    }
}

/// A restore's end, for the source loop.
struct RestoreDone {
    claimed: Claimed,
    result: Result<changelog::Restored, changelog::RestoreError>,
}

impl ClientContext for SourceContext {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, facility: &str, message: &str) {
        client::log(level, facility, message);
    }

    fn stats(&self, statistics: Statistics) {
        client::record_lag(&statistics, &self.lag);
    }
}

impl SourceContext {
    /// Reads the partition count of each assigned topic (a topic can gain partitions).
    fn count_partitions(&self, consumer: &BaseConsumer<Self>, tpl: &TopicPartitionList) {
        let mut topics: Vec<String> = tpl
            .elements()
            .iter()
            .map(|e| e.topic().to_owned())
            .collect();
        topics.sort_unstable();
        topics.dedup();
        for topic in &topics {
            let topic = topic.as_str();
            match consumer.fetch_metadata(Some(topic), METADATA_TIMEOUT) {
                Ok(metadata) => {
                    if let Some(found) = metadata.topics().iter().find(|t| t.name() == topic) {
                        self.partitions
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner)
                            .insert(topic.to_owned(), found.partitions().len() as i32);
                    }
                }
                Err(error) => {
                    tracing::warn!(%error, topic, "partition count not read; keeping the last known")
                }
            }
        }
    }
}

impl ConsumerContext for SourceContext {
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        let cooperative = matches!(
            consumer.rebalance_protocol(),
            RebalanceProtocol::Cooperative
        );
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                self.count_partitions(consumer, tpl);
                let claimed: Vec<Claimed> = tpl
                    .elements()
                    .iter()
                    .map(|e| Claimed {
                        topic: e.topic().to_owned(),
                        partition: e.partition(),
                        generation: self.ownership.claim(e.topic(), e.partition()),
                        at: Instant::now(),
                        failures: 0,
                    })
                    .collect();
                let assigned = if cooperative {
                    consumer.incremental_assign(tpl)
                } else {
                    consumer.assign(tpl)
                };
                // Paused until restored: the source loop seeks each to where its state ends.
                if let Err(error) = assigned.and_then(|()| consumer.pause(tpl)) {
                    tracing::error!(%error, "assign failed");
                }
                tracing::info!(
                    partitions = ?claimed.iter().map(|c| (&c.topic, c.partition)).collect::<Vec<_>>(),
                    "partitions assigned; restoring their state before consuming them"
                );
                self.claims.push(claimed);
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                for e in tpl.elements() {
                    if !self
                        .ownership
                        .release(e.topic(), e.partition(), RELEASE_WAIT)
                    {
                        tracing::error!(
                            topic = e.topic(),
                            partition = e.partition(),
                            wait = ?RELEASE_WAIT,
                            "a changelog record of a revoked partition was still on its way"
                        );
                    }
                }
                tracing::info!(revoked = ?tpl, "partitions revoked");
                let unassigned = if cooperative {
                    consumer.incremental_unassign(tpl)
                } else {
                    consumer.unassign()
                };
                if let Err(error) = unassigned {
                    tracing::error!(%error, "unassign failed");
                }
            }
            other => tracing::error!(error = ?other, "rebalance error"),
        }
        metrics::gauge!(m::KAFKA_PARTITIONS_ASSIGNED).set(self.ownership.owned() as f64);
    }
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

/// Why a record goes to the dead-letter topic: the stable code (metrics label) and the reason
/// sent in the `scand-reason` header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub code: &'static str,
    pub reason: String,
}

/// The value of a record's first `content-type` header, if it has one with a value.
fn content_type(record: &OwnedMessage) -> Option<&[u8]> {
    record.headers().and_then(|headers| {
        headers
            .iter()
            .find(|h| h.key.eq_ignore_ascii_case("content-type"))
            .and_then(|h| h.value)
    })
}

/// The encoding of a record: its `content-type` header when that names one, else the topic's
/// configured encoding, else the source's default.
pub fn encoding_of(
    content_type: Option<&[u8]>,
    topic: &str,
    config: &KafkaSourceConfig,
) -> Encoding {
    content_type
        .and_then(|v| std::str::from_utf8(v).ok())
        .and_then(Encoding::from_content_type)
        .or_else(|| config.topic_encodings.get(topic).copied())
        .unwrap_or(config.encoding)
}

/// One record's fate, without I/O: decoded and validated into a scan to store, or refused
/// with the code and reason its dead letter carries. Split out of [`KafkaSource`] so the
/// fuzzer runs exactly what the consumer runs.
pub fn triage(
    payload: Option<&[u8]>,
    content_type: Option<&[u8]>,
    topic: &str,
    config: &KafkaSourceConfig,
    validator: &Validator,
    now: SystemTime,
) -> Result<ValidScan, Refusal> {
    let scan = codec::decode(
        payload.unwrap_or_default(),
        encoding_of(content_type, topic, config),
    )
    .map_err(|error| Refusal {
        code: error.code(),
        reason: format!("{}: {error}", error.code()),
    })?;
    validator.validate(scan, now).map_err(|rejection| {
        metrics::counter!(m::SCANS_REJECTED_TOTAL, "reason" => rejection.code()).increment(1);
        Refusal {
            code: rejection.code(),
            reason: rejection.reason(),
        }
    })
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

    /// Restores the claimed partitions one after the other on a blocking thread; each end
    /// comes back through `done`.
    fn start_restores(&self, done: &tokio::sync::mpsc::Sender<RestoreDone>) {
        let claims = self.claims.take();
        if claims.is_empty() {
            return;
        }
        let (cluster, writer, ownership) = (
            self.cluster.clone(),
            self.writer.clone(),
            self.ownership.clone(),
        );
        let (directory, me) = self.members.clone();
        let changelog_topic = self.config.changelog_topic.clone();
        let done = done.clone();
        tokio::task::spawn_blocking(move || {
            for claimed in claims {
                if claimed.failures > 0 {
                    std::thread::sleep(
                        (RETRY_MIN * 2u32.pow(claimed.failures.min(6))).min(RETRY_MAX),
                    );
                }
                let (topic, partition) = (claimed.topic.as_str(), claimed.partition);
                let started = Instant::now();
                let claiming = directory.await_handoff((topic, partition), &me, || {
                    ownership.is_current(topic, partition, claimed.generation)
                });
                metrics::histogram!(m::KAFKA_HANDOFF_SECONDS)
                    .record(started.elapsed().as_secs_f64());
                if !claiming.is_empty() {
                    tracing::warn!(
                        topic,
                        partition,
                        ?claiming,
                        "restoring a partition another instance still claims"
                    );
                }
                let result = changelog::restore(
                    &cluster,
                    &changelog_topic,
                    &writer,
                    &ownership,
                    (&claimed.topic, claimed.partition),
                    claimed.generation,
                );
                let ending = RestoreDone { claimed, result };
                if done.blocking_send(ending).is_err() {
                    return;
                }
            }
        });
    }

    /// A restore ended: on success the partition (if still claimed under the same
    /// generation) is sought to where its state ends, owned and resumed; a failed restore is
    /// tried again, the partition staying paused.
    fn finish_restore(&self, done: RestoreDone) {
        let RestoreDone { claimed, result } = done;
        let (topic, partition) = (claimed.topic.clone(), claimed.partition);
        let topic = topic.as_str();
        let retry = |claimed: Claimed, error: &dyn std::fmt::Display| {
            tracing::error!(%error, topic, partition, failures = claimed.failures + 1, "partition restore failed; retrying, the partition stays paused");
            self.claims.push([Claimed {
                failures: claimed.failures + 1,
                ..claimed
            }]);
        };
        let restored = match result {
            Ok(restored) => restored,
            Err(changelog::RestoreError::Stale) => return,
            Err(error) => return retry(claimed, &error),
        };
        if !self
            .ownership
            .is_current(topic, partition, claimed.generation)
        {
            return;
        }
        let mut tpl = TopicPartitionList::new();
        if let Err(error) =
            tpl.add_partition_offset(topic, partition, Offset::Offset(restored.resume))
        {
            return retry(claimed, &error);
        }
        let sought = self
            .consumer
            .seek_partitions(tpl.clone(), SEEK_TIMEOUT)
            .and_then(|sought| {
                sought
                    .elements()
                    .iter()
                    .find_map(|e| e.error().err())
                    .map_or(Ok(()), Err)
            });
        if let Err(error) = sought {
            return retry(claimed, &error);
        }
        if !self
            .ownership
            .confirm(topic, partition, claimed.generation, restored.resume)
        {
            return;
        }
        if let Err(error) = self.consumer.resume(&tpl) {
            tracing::error!(%error, topic, partition, "cannot resume a restored partition");
        }
        metrics::counter!(m::KAFKA_RESTORED_SHIPMENTS_TOTAL).increment(restored.shipments as u64);
        metrics::histogram!(m::KAFKA_RESTORE_SECONDS).record(claimed.at.elapsed().as_secs_f64());
        metrics::gauge!(m::KAFKA_PARTITIONS_ASSIGNED).set(self.ownership.owned() as f64);
        tracing::info!(
            topic,
            partition,
            shipments = restored.shipments,
            resume = restored.resume,
            "partition restored; consuming"
        );
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ingest::IngestConfig;

    fn now() -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000)
    }

    fn validator() -> Validator {
        Validator::new(&IngestConfig::default()).expect("default formats compile")
    }

    const JSON: &[u8] = br#"{"scan_id":"s1","tracking_number":"PARCEL0001","scan_type":"SCAN_TYPE_SORTED","event_time":"2027-01-15T08:00:00Z"}"#;

    #[test]
    fn header_then_topic_then_default_chooses_the_encoding() {
        let mut config = KafkaSourceConfig::default();
        config
            .topic_encodings
            .insert("scans.json".to_owned(), Encoding::Json);
        let json = Some(&b"application/json; charset=utf-8"[..]);
        assert_eq!(encoding_of(json, "scans.raw", &config), Encoding::Json);
        assert_eq!(encoding_of(None, "scans.json", &config), Encoding::Json);
        // A header naming no known encoding, or not UTF-8, falls through to the topic.
        let unknown = Some(&b"text/plain"[..]);
        assert_eq!(encoding_of(unknown, "scans.json", &config), Encoding::Json);
        assert_eq!(
            encoding_of(Some(&[0xff][..]), "scans.raw", &config),
            Encoding::Protobuf
        );
        let protobuf = Some(&b"application/x-protobuf"[..]);
        assert_eq!(
            encoding_of(protobuf, "scans.json", &config),
            Encoding::Protobuf
        );
    }

    #[test]
    fn triage_stores_valid_records_and_refuses_the_rest_with_a_code() {
        let config = KafkaSourceConfig::default();
        let v = validator();
        let json = Some(&b"application/json"[..]);
        let stored = triage(Some(JSON), json, "scans.raw", &config, &v, now()).expect("valid");
        assert_eq!(stored.scan_id.as_str(), "s1");
        assert!(stored.origin.is_none());

        let refused = |payload: Option<&[u8]>, content_type: Option<&[u8]>| {
            triage(payload, content_type, "scans.raw", &config, &v, now())
                .expect_err("refused")
                .code
        };
        assert_eq!(refused(None, None), "empty");
        assert_eq!(refused(Some(JSON), None), "protobuf_decode");
        assert_eq!(refused(Some(&b"{"[..]), json), "json_decode");
        let unspecified = &br#"{"scan_id":"s1","tracking_number":"PARCEL0001"}"#[..];
        let refusal =
            triage(Some(unspecified), json, "scans.raw", &config, &v, now()).expect_err("rejected");
        assert_eq!(refusal.code, "unspecified_scan_type");
        assert_eq!(
            refusal.reason,
            "unspecified_scan_type: scan_type is SCAN_TYPE_UNSPECIFIED"
        );
    }
}
