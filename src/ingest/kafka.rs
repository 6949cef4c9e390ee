//! Kafka source: a consumer group on the scans topics. Records are decoded (`proto::codec`),
//! validated (`validate`) and stored through the [`Ingestor`] like gRPC scans, with their
//! offsets; what cannot be decoded, and scans that are rejected, go to the dead-letter topic
//! with the reason in a header. A newly assigned partition's state is restored from the
//! changelog (`scaleout::changelog`) before it is consumed.
//!
//! Invariants:
//! - A record's offset counts as consumed only once the batch holding it is durable: the next
//!   offset of every partition is written in the same RocksDB WriteBatch as the state it
//!   produced, and on assignment the consumer seeks there. A crash or rebalance neither loses
//!   nor re-applies a record (and a scan seen twice anyway is a scan-id duplicate).
//! - Dead letters are delivered before the batch (and so their offsets) is written; if the
//!   dead-letter topic cannot be written, the consumer pauses and retries, never drops.
//! - Offsets are committed to the broker too, asynchronously and after durability, only so
//!   that lag tools see progress; RocksDB is the source of truth.

use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime};

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, StreamConsumer};
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
use crate::domain::{scan::ValidScan, Origin};
use crate::engine::Outcome;
use crate::kafka::{self as client, Cluster, LoggingContext};
use crate::proto::codec::{self, Encoding};
use crate::scaleout::changelog;
use crate::store::writer::{SourceOffset, WriterHandle};
use crate::store::Store;
use crate::telemetry::lag::Lag;
use crate::telemetry::metrics as m;

pub const HEADER_REASON: &str = "scand-reason";
pub const HEADER_SOURCE_TOPIC: &str = "scand-source-topic";
pub const HEADER_SOURCE_PARTITION: &str = "scand-source-partition";
pub const HEADER_SOURCE_OFFSET: &str = "scand-source-offset";

const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum KafkaSourceError {
    #[error("kafka consumer: {0}")]
    Kafka(#[from] KafkaError),
}

/// Seeks each newly assigned partition to the offset stored with the state in RocksDB;
/// without one, librdkafka falls back to the group's committed offset, then
/// `auto.offset.reset`.
pub struct SourceContext {
    store: Store,
    /// The lag of the partitions this consumer owns, from its statistics.
    lag: Lag,
    /// Installs restored partition state, as a job in its queue.
    writer: WriterHandle,
    cluster: Cluster,
    changelog_topic: String,
}

impl ClientContext for SourceContext {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, facility: &str, message: &str) {
        client::log(level, facility, message);
    }

    fn stats(&self, statistics: Statistics) {
        client::record_lag(&statistics, &self.lag);
    }
}

impl ConsumerContext for SourceContext {
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                let assigned: Vec<(String, i32)> = tpl
                    .elements()
                    .iter()
                    .map(|e| (e.topic().to_owned(), e.partition()))
                    .collect();
                match changelog::restore(
                    &self.cluster,
                    &self.changelog_topic,
                    &self.writer,
                    &assigned,
                ) {
                    Ok(n) => {
                        metrics::counter!(m::KAFKA_RESTORED_SHIPMENTS_TOTAL).increment(n as u64);
                        tracing::info!(shipments = n, "state restored from the changelog");
                    }
                    Err(error) => {
                        tracing::error!(%error, "changelog restore failed; resuming from local state")
                    }
                }
                let mut positions = Vec::new();
                for elem in tpl.elements() {
                    match self.store.source_offset(elem.topic(), elem.partition()) {
                        Ok(Some(next)) => {
                            positions.push((elem.topic().to_owned(), elem.partition(), next))
                        }
                        Ok(None) => {}
                        Err(error) => {
                            tracing::error!(%error, "cannot read stored offset; using the group's")
                        }
                    }
                }
                tracing::info!(
                    ?positions,
                    "partitions assigned; resuming at the offsets stored with the state"
                );
                for (topic, partition, next) in positions {
                    if let Err(error) =
                        tpl.set_partition_offset(&topic, partition, Offset::Offset(next))
                    {
                        tracing::error!(%error, topic, partition, "cannot set start offset");
                    }
                }
                match consumer.assign(tpl) {
                    Ok(()) => metrics::gauge!(m::KAFKA_PARTITIONS_ASSIGNED).set(tpl.count() as f64),
                    Err(error) => tracing::error!(%error, "assign failed"),
                }
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                tracing::info!(revoked = ?tpl, "partitions revoked");
                match consumer.unassign() {
                    Ok(()) => metrics::gauge!(m::KAFKA_PARTITIONS_ASSIGNED).set(0.0),
                    Err(error) => tracing::error!(%error, "unassign failed"),
                }
            }
            other => tracing::error!(error = ?other, "rebalance error"),
        }
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
}

/// A record that will not be applied, and why.
struct DeadLetter {
    record: OwnedMessage,
    code: &'static str,
    reason: String,
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
        store: Store,
        writer: WriterHandle,
        ingestor: Ingestor,
        lag: Lag,
    ) -> Result<Self, KafkaSourceError> {
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
            store,
            lag: lag.clone(),
            writer,
            cluster: cluster.clone(),
            changelog_topic: config.changelog_topic.clone(),
        })?;
        let topics: Vec<&str> = config.topics.iter().map(String::as_str).collect();
        consumer.subscribe(&topics)?;
        Ok(Self {
            consumer,
            lag,
            dead_letters: client::idempotent_producer(cluster)?,
            config: config.clone(),
            ingestor,
        })
    }

    /// Runs until `shutdown`; the batch in hand is finished first.
    pub async fn run(self, shutdown: CancellationToken) {
        tracing::info!(topics = ?self.config.topics, group = %self.config.group_id, "kafka source started");
        loop {
            let first = tokio::select! {
                () = shutdown.cancelled() => break,
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
        for record in records {
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
                Ok(mut valid) => {
                    valid.origin = Some(Origin {
                        topic: record.topic().to_owned(),
                        partition: record.partition(),
                    });
                    scans.push(valid);
                    stored.push(record);
                }
                Err(Refusal { code, reason }) => dead.push(DeadLetter {
                    record,
                    code,
                    reason,
                }),
            }
        }
        metrics::counter!(m::SCANS_RECEIVED_TOTAL, "source" => "kafka")
            .increment((scans.len() + dead.len()) as u64);
        self.send_dead_letters(dead, shutdown).await;

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
        let refused: Vec<DeadLetter> = stored
            .into_iter()
            .zip(outcomes)
            .filter(|(_, outcome)| *outcome == Outcome::JourneyExpired)
            .map(|(record, _)| {
                let rejection = Rejection::JourneyExpired;
                metrics::counter!(m::SCANS_REJECTED_TOTAL, "reason" => rejection.code())
                    .increment(1);
                DeadLetter {
                    record,
                    code: rejection.code(),
                    reason: rejection.reason(),
                }
            })
            .collect();
        if !refused.is_empty() {
            self.send_dead_letters(refused, shutdown).await;
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

    async fn send_dead_letters(&self, dead: Vec<DeadLetter>, shutdown: &CancellationToken) {
        let mut paused: Option<TopicPartitionList> = None;
        for letter in dead {
            let mut backoff = RETRY_MIN;
            loop {
                match self.send_dead_letter(&letter).await {
                    Ok(()) => {
                        metrics::counter!(m::KAFKA_DEAD_LETTERS_TOTAL, "reason" => letter.code)
                            .increment(1);
                        break;
                    }
                    Err(error) => {
                        metrics::counter!(m::KAFKA_DEAD_LETTER_ERRORS_TOTAL).increment(1);
                        tracing::error!(%error, topic = %self.config.dead_letter_topic, "dead letter not delivered; partitions paused, retrying");
                        if paused.is_none() {
                            if let Ok(assignment) = self.consumer.assignment() {
                                if self.consumer.pause(&assignment).is_ok() {
                                    paused = Some(assignment);
                                }
                            }
                        }
                        if shutdown.is_cancelled() && backoff >= RETRY_MAX {
                            // Not stored, not committed: the record is consumed again after restart.
                            tracing::error!("shutting down with an undelivered dead letter; it is read again on restart");
                        }
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(RETRY_MAX);
                    }
                }
            }
        }
        if let Some(assignment) = paused {
            if let Err(error) = self.consumer.resume(&assignment) {
                tracing::error!(%error, "cannot resume partitions");
            }
        }
    }

    async fn send_dead_letter(&self, letter: &DeadLetter) -> Result<(), KafkaError> {
        let record = &letter.record;
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
        let headers = headers
            .insert(Header {
                key: HEADER_REASON,
                value: Some(letter.reason.as_bytes()),
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
        let mut out: FutureRecord<'_, [u8], [u8]> =
            FutureRecord::to(&self.config.dead_letter_topic).headers(headers);
        if let Some(key) = record.key() {
            out = out.key(key);
        }
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
