//! Kafka sink: drains the change log in sequence order to the status topic, keyed by tracking
//! number (so a shipment's changes stay ordered on one partition), with the journey, version,
//! sequence and publisher id in headers.
//!
//! Invariants:
//! - Idempotent producer, acks=all. The sink's cursor advances only over changes whose
//!   delivery report succeeded (or that the topic is found to hold), in order: a failure is
//!   retried with backoff from the first undelivered change, never skipped.
//! - In a fleet, a change is published only once the changelog task has decided it: a
//!   change of a replicated shipment goes out once a snapshot carrying it is on the
//!   changelog, and a void one (its snapshot dropped when its partition moved, so the next
//!   owner derives it again) never.
//! - Each change reaches the topic once. The cursor is stored after delivery, so before
//!   publishing from it (at start and after a failed delivery, which may still have been
//!   written) the sink reads the topic's tail from its floors (`recovery`) and skips what
//!   its publisher id already wrote there.
//! - Floors move (to the topic's ends, every few seconds) only while nothing beyond the
//!   cursor is delivered or in doubt.
//! - With the broker away, ingest goes on; the backlog is `scand_outbox_pending`.
//! - At shutdown the sink publishes what is decided until its inputs end (bounded by the
//!   daemon's grace), so a graceful stop leaves no change behind.

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant, SystemTime};

use prost::Message;
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::recovery::{self, RecoveryError, Tail, PUBLISHER_HEADER, SEQUENCE_HEADER};
use crate::domain::Sequence;
use crate::kafka::{Cluster, LoggingContext};
use crate::proto::codec::Encoding;
use crate::proto::pb;
use crate::proto::storage::SinkFloors;
use crate::store::replicated::Decided;
use crate::store::{Store, StoreError};
use crate::telemetry::admin::OutputHealth;
use crate::telemetry::metrics as m;

/// The sink's name in `meta` and in metric labels.
pub const SINK: &str = crate::store::keys::KAFKA_SINK;

const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(10);
/// How often the floors move up to the topic's ends (a query per partition), bounding what a
/// recovery reads to what was published since.
const FLOORS_EVERY: Duration = Duration::from_secs(5);
/// How far apart two reads of the status topic's tail must agree before the sink trusts it.
const SETTLE: Duration = Duration::from_secs(1);
/// How long reading the status topic's tail may take before it counts as a failure.
const RECOVERY_WITHIN: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
enum PublishError {
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("delivery of sequence {sequence} failed: {source}")]
    Delivery { sequence: u64, source: KafkaError },
    #[error("recovery: {0}")]
    Recovery(#[from] RecoveryError),
}

/// The sink's progress: the stored cursor, what was delivered beyond it, and the floors its
/// recovery reads from, with when they last moved to the topic's ends.
#[derive(Debug)]
struct Progress {
    cursor: Sequence,
    ahead: BTreeSet<u64>,
    floors: SinkFloors,
    floors_at: Instant,
}

impl Default for Progress {
    fn default() -> Self {
        Self {
            cursor: Sequence::default(),
            ahead: BTreeSet::new(),
            floors: SinkFloors::default(),
            floors_at: Instant::now(),
        }
    }
}

impl Progress {
    /// Takes in what the topic holds: its sequences count as delivered; where it ended are
    /// the new floors once nothing lies beyond the cursor.
    fn merge(&mut self, tail: Tail) {
        self.ahead.extend(tail.published);
        self.advance();
        if self.ahead.is_empty() {
            self.floors.next_offsets = tail.ends;
        }
    }

    /// Moves the cursor over the delivered changes that follow it.
    fn advance(&mut self) {
        self.ahead.retain(|s| *s > self.cursor.0);
        while self.ahead.first() == Some(&(self.cursor.0 + 1)) {
            self.ahead.pop_first();
            self.cursor = Sequence(self.cursor.0 + 1);
        }
    }
}

pub struct KafkaSink {
    store: Store,
    cluster: Cluster,
    producer: FutureProducer<LoggingContext>,
    config: KafkaSinkConfig,
    committed: watch::Receiver<Sequence>,
    /// In a fleet, what the changelog task decided: changes are published up to its
    /// `through`, its void ones never.
    decided: Option<watch::Receiver<Decided>>,
    health: OutputHealth,
}

impl KafkaSink {
    pub fn new(
        store: Store,
        cluster: Cluster,
        producer: FutureProducer<LoggingContext>,
        config: KafkaSinkConfig,
        (committed, decided): (watch::Receiver<Sequence>, Option<watch::Receiver<Decided>>),
        health: OutputHealth,
    ) -> Self {
        Self {
            store,
            cluster,
            producer,
            config,
            committed,
            decided,
            health,
        }
    }

    /// Runs until `shutdown`.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let stored = self.store.sink_cursor(SINK).and_then(|cursor| {
            Ok((
                cursor,
                self.store.sink_floors(SINK)?,
                self.store.publisher_id()?,
            ))
        });
        let (cursor, floors, publisher) = match stored {
            Ok(stored) => stored,
            Err(error) => {
                tracing::error!(%error, "kafka sink cannot read its position; not publishing");
                return;
            }
        };
        let mut progress = Progress {
            cursor,
            floors,
            ..Progress::default()
        };
        let tag = recovery::publisher_tag(publisher);
        tracing::info!(topic = %self.config.topic, from = cursor.0, publisher = %tag, "kafka sink started");
        let mut backoff = RETRY_MIN;
        let mut in_doubt = true;
        loop {
            let step = if in_doubt {
                self.recover(&mut progress, publisher).await
            } else {
                let committed = *self.committed.borrow();
                metrics::gauge!(m::OUTBOX_PENDING)
                    .set(committed.0.saturating_sub(progress.cursor.0) as f64);
                let upto = match &self.decided {
                    Some(decided) => {
                        let decided = decided.borrow();
                        let upto = committed.min(decided.through);
                        if upto > progress.cursor {
                            progress
                                .ahead
                                .extend(decided.void.range(progress.cursor.0 + 1..=upto.0));
                        }
                        upto
                    }
                    None => committed,
                };
                if upto <= progress.cursor {
                    // Stopping, the sink goes on until the writer and the changelog task have
                    // ended and it has published all they decided (the daemon's grace bounds
                    // it): an instance removed for good leaves nothing unpublished behind.
                    let stopping = shutdown.is_cancelled();
                    tokio::select! {
                        () = shutdown.cancelled(), if !stopping => {}
                        changed = self.committed.changed() => if changed.is_err() { break },
                        more = decided_changed(&mut self.decided) => if !more { break },
                    }
                    continue;
                }
                self.publish_from(&mut progress, upto, &tag).await
            };
            in_doubt = step.is_err();
            match step {
                Ok(()) => {
                    backoff = RETRY_MIN;
                    self.health.delivered();
                }
                Err(error) => {
                    metrics::counter!(m::PUBLISH_TOTAL, "sink" => SINK, "result" => "error")
                        .increment(1);
                    self.health.failed(&error);
                    tracing::warn!(%error, retry_in = ?backoff, "kafka sink: retrying after sequence {}", progress.cursor.0);
                    tokio::select! {
                        () = shutdown.cancelled() => break,
                        () = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(RETRY_MAX);
                }
            }
        }
        tracing::info!(delivered = progress.cursor.0, "kafka sink stopped");
    }

    /// Reads the topic's tail for changes this publisher wrote beyond the cursor.
    async fn recover(&self, progress: &mut Progress, publisher: u64) -> Result<(), PublishError> {
        let (cluster, topic) = (self.cluster.clone(), self.config.topic.clone());
        let (cursor, floors) = (progress.cursor, progress.floors.next_offsets.clone());
        let tail = tokio::task::spawn_blocking(move || {
            // A broker coming back can answer the read before it appends a write of ours it
            // held (seen with a stopped broker): the tail counts once two reads a moment
            // apart find the same of ours (others' records may keep coming).
            let read = || {
                recovery::read_tail(
                    &cluster,
                    &topic,
                    publisher,
                    cursor,
                    &floors,
                    RECOVERY_WITHIN,
                )
            };
            let mut last = read()?;
            loop {
                std::thread::sleep(SETTLE);
                let tail = read()?;
                if tail.published == last.published {
                    return Ok::<_, RecoveryError>(tail);
                }
                last = tail;
            }
        })
        .await
        .map_err(|e| StoreError::WriteFailed(e.to_string()))??;
        if !tail.published.is_empty() {
            tracing::info!(
                found = tail.published.len(),
                after = cursor.0,
                "kafka sink: the status topic already holds changes beyond the stored cursor"
            );
        }
        progress.merge(tail);
        self.save(progress)
    }

    /// Publishes one chunk after the cursor, up to the durable sequence `upto`, skipping what
    /// is known delivered; waits for every delivery report of the chunk.
    async fn publish_from(
        &self,
        progress: &mut Progress,
        upto: Sequence,
        tag: &str,
    ) -> Result<(), PublishError> {
        let store = self.store.clone();
        let limit = self.config.max_in_flight;
        let cursor = progress.cursor;
        let changes = tokio::task::spawn_blocking(move || store.changes(cursor, upto, limit))
            .await
            .map_err(|e| StoreError::WriteFailed(e.to_string()))??;
        // Hand the whole chunk to the producer, then take every delivery report.
        let mut pending = Vec::with_capacity(changes.len());
        for change in changes
            .iter()
            .filter(|c| !progress.ahead.contains(&c.sequence))
        {
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
                    key: SEQUENCE_HEADER,
                    value: Some(sequence.as_bytes()),
                })
                .insert(Header {
                    key: PUBLISHER_HEADER,
                    value: Some(tag.as_bytes()),
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
        let mut failure = None;
        for (change, delivery) in pending {
            let result = match delivery {
                None => Err(KafkaError::Canceled),
                Some(delivery) => match delivery.await {
                    Ok(Ok(_)) => Ok(()),
                    Ok(Err((error, _))) => Err(error),
                    Err(_) => Err(KafkaError::Canceled),
                },
            };
            match result {
                Ok(()) => {
                    progress.ahead.insert(change.sequence);
                    metrics::counter!(m::PUBLISH_TOTAL, "sink" => SINK, "result" => "ok")
                        .increment(1);
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
                Err(source) => {
                    failure.get_or_insert(PublishError::Delivery {
                        sequence: change.sequence,
                        source,
                    });
                }
            }
        }
        // A crash here, with the chunk delivered and the cursor not stored, is the case the
        // recovery at start exists for (`FAILPOINTS=sink-delivered=return` aborts here).
        fail::fail_point!("sink-delivered", |_| std::process::abort());
        progress.advance();
        if failure.is_none()
            && progress.ahead.is_empty()
            && progress.floors_at.elapsed() >= FLOORS_EVERY
        {
            // Nothing of this publisher beyond the cursor is on the topic or on its way, so
            // the topic's ends are floors (lower bounds at worst: tansu reports an end inside
            // a partition's last multi-record batch).
            progress.floors.next_offsets = self.topic_ends().await?;
            progress.floors_at = Instant::now();
        }
        self.save(progress)?;
        failure.map_or(Ok(()), Err)
    }

    /// Each status partition's end (high watermark).
    async fn topic_ends(&self) -> Result<HashMap<i32, i64>, PublishError> {
        let (producer, topic) = (self.producer.clone(), self.config.topic.clone());
        Ok(
            tokio::task::spawn_blocking(move || recovery::ends(producer.client(), &topic))
                .await
                .map_err(|e| StoreError::WriteFailed(e.to_string()))??,
        )
    }

    fn save(&self, progress: &Progress) -> Result<(), PublishError> {
        self.store
            .set_sink_position(SINK, progress.cursor, &progress.floors)?;
        Ok(())
    }
}

/// Waits for the changelog task's next decisions; never returns without a fleet, `false` once
/// the task is gone.
async fn decided_changed(decided: &mut Option<watch::Receiver<Decided>>) -> bool {
    match decided {
        Some(decided) => decided.changed().await.is_ok(),
        None => std::future::pending().await,
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
    fn the_cursor_moves_over_delivered_changes_in_order_only() {
        let mut progress = Progress {
            cursor: Sequence(10),
            ..Progress::default()
        };
        progress.ahead.extend([12, 13]);
        progress.advance();
        assert_eq!(progress.cursor, Sequence(10));
        progress.merge(Tail {
            published: BTreeSet::from([9, 11]),
            ends: HashMap::from([(0, 5)]),
        });
        assert_eq!(progress.cursor, Sequence(13));
        assert!(progress.ahead.is_empty());
        assert_eq!(progress.floors.next_offsets, HashMap::from([(0, 5)]));
    }

    #[test]
    fn floors_stay_while_a_change_beyond_the_cursor_is_on_the_topic() {
        let mut progress = Progress {
            cursor: Sequence(10),
            floors: SinkFloors {
                next_offsets: HashMap::from([(0, 1)]),
            },
            ..Progress::default()
        };
        progress.merge(Tail {
            published: BTreeSet::from([12]),
            ends: HashMap::from([(0, 9)]),
        });
        assert_eq!(progress.cursor, Sequence(10));
        assert_eq!(progress.floors.next_offsets, HashMap::from([(0, 1)]));
    }

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
