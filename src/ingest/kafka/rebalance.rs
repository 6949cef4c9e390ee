//! The source's side of a rebalance: each assigned partition is claimed and stays paused; its
//! restore waits for the previous owner's handoff (announced on the members topic), reads the
//! changelog on a blocking thread, then the partition is sought to where its state ends,
//! confirmed and resumed. Each revoked partition is released at once, before the callback
//! returns, so nothing of it is applied, swept or replicated here afterwards.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, RebalanceProtocol};
use rdkafka::statistics::Statistics;
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientContext, Offset, TopicPartitionList};

use super::{KafkaSource, RETRY_MAX, RETRY_MIN};
use crate::domain::ownership::{Generation, Ownership};
use crate::kafka as client;
use crate::scaleout::changelog;
use crate::scaleout::members::PartitionCounts;
use crate::telemetry::lag::Lag;
use crate::telemetry::metrics as m;

/// How long a revoked partition's release waits for a changelog record on its way: a little
/// longer than a delivery may take.
const RELEASE_WAIT: Duration = changelog::DELIVERY_TIMEOUT.saturating_add(Duration::from_secs(1));

const SEEK_TIMEOUT: Duration = Duration::from_secs(10);

const METADATA_TIMEOUT: Duration = Duration::from_secs(5);

/// Claims each assigned partition and keeps it paused until its state is restored (by the
/// source loop, see [`KafkaSource::run`]); releases each revoked partition at once, so nothing
/// of it is applied, swept or replicated here afterwards.
pub struct SourceContext {
    /// The lag of the partitions this consumer owns, from its statistics.
    pub(super) lag: Lag,
    pub(super) ownership: Ownership,
    pub(super) claims: Arc<Claims>,
    /// How many partitions each scans topic has, read at every assignment: where a tracking
    /// number belongs.
    pub(super) partitions: PartitionCounts,
}

/// Partitions assigned and waiting for their restore, and the wake-up of the source loop
/// that starts restores. Bounded by the partitions of the scans topics.
#[derive(Default)]
pub(super) struct Claims {
    waiting: Mutex<Vec<Claimed>>,
    pub(super) wake: tokio::sync::Notify,
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
pub(super) struct RestoreDone {
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

impl KafkaSource {
    /// Restores the claimed partitions one after the other on a blocking thread; each end
    /// comes back through `done`.
    pub(super) fn start_restores(&self, done: &tokio::sync::mpsc::Sender<RestoreDone>) {
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
    pub(super) fn finish_restore(&self, done: RestoreDone) {
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
}
