//! Partition state replication for scale-out: after each durable write, the store writer hands
//! over the new state of every shipment a Kafka source partition owns (a [`Snapshot`]), then a
//! marker per partition ("complete up to offset N"); this task produces them, in order, to a
//! compacted changelog topic on the same partition number as their scans. When a partition is
//! assigned, the new owner reads that changelog partition to its end, installs every snapshot
//! (jobs of the store writer, a chunk at a time) and resumes consuming scans at the last
//! marker.
//!
//! Invariants:
//! - The changelog may lag the store (it is written after durability), never lead it, and the
//!   resume point is a marker, so it never passes a snapshot that was not written. A new owner
//!   re-applies the scans after the marker; those it already holds are duplicates. Nothing is
//!   lost or applied twice.
//! - Only an owned partition's snapshots are sent, each under an ownership guard: once a
//!   partition is released, nothing more of it reaches the changelog from this instance.
//! - A snapshot larger than `kafka.source.changelog_max_record_bytes` is sent in pieces, its
//!   head last; a restore installs it only whole (checksum verified).
//! - A restore holds at most one chunk of snapshots in memory (and the pieces of a split one).
//! - After each window the task stores, then tells the Kafka sink, which of this instance's
//!   changes the changelog holds and which are void (`decisions`); a window left undelivered
//!   at shutdown stays in doubt for the next start's `resolve`.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use prost::Message;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Message as _};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::decisions::{Sent, Tracker, WindowEnd};
use crate::domain::ownership::{Generation, OutputGuard, Ownership};
use crate::kafka::{self as client, Cluster, LoggingContext};
use crate::store::replicated::{Decided, ReplicationProgress};
use crate::store::writer::{Assembler, Replica, Snapshot, WriterHandle};
use crate::store::{Store, StoreError};
use crate::telemetry::admin::OutputHealth;
use crate::telemetry::metrics as m;

const RETRY_MAX: Duration = Duration::from_secs(5);

/// Snapshots handed to the producer at once before their delivery reports are awaited: one
/// awaited at a time, the producer's linger alone held a partition to ~200 snapshots a second.
const WINDOW: usize = 512;

/// Snapshots one restore job installs: what a restore holds in memory at most.
const RESTORE_CHUNK: usize = 1_000;

/// How long a changelog record may take to be delivered: a release of the partition waits
/// for one on its way (see `Ownership::release`), so this bounds a rebalance.
pub const DELIVERY_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("changelog: {0}")]
    Kafka(#[from] KafkaError),
    #[error("changelog: {0}")]
    Store(#[from] StoreError),
    #[error("changelog record at {partition}:{offset} is not a snapshot: {reason}")]
    Decode {
        partition: i32,
        offset: i64,
        reason: String,
    },
    #[error("changelog partition {partition} read no further than offset {next} of {high} within {timeout:?}")]
    Incomplete {
        partition: i32,
        next: i64,
        high: i64,
        timeout: Duration,
    },
    #[error("the partition was released or claimed again during its restore")]
    Stale,
}

/// The changelog's producer: idempotent, with deliveries bounded by [`DELIVERY_TIMEOUT`].
pub fn producer(cluster: &Cluster) -> Result<FutureProducer<LoggingContext>, KafkaError> {
    let timeout = DELIVERY_TIMEOUT.as_millis().to_string();
    client::idempotent_producer_with(
        cluster,
        &[
            ("message.timeout.ms", timeout.as_str()),
            // One record a batch, pipelined: tansu 0.6 reads a partition of multi-record
            // batches back short (a restore found one snapshot of many).
            ("batch.num.messages", "1"),
            ("linger.ms", "0"),
        ],
    )
}

/// The changelog task: produces the snapshots of owned partitions in order until the writer
/// stops sending them; a snapshot whose guard is closed (its partition released here) is
/// dropped. Up to [`WINDOW`] snapshots are handed to the producer before their delivery
/// reports are awaited. A failed write is retried with backoff, counted, and told to
/// readiness; meanwhile the writer waits once the queue of snapshots is full (backpressure,
/// not a silent gap in the changelog). After each window it stores and tells the Kafka sink
/// what it decided: which changes are on the changelog (publishable) and which are void.
pub struct ChangelogTask {
    pub producer: FutureProducer<LoggingContext>,
    pub topic: String,
    pub ownership: Ownership,
    pub max_record_bytes: usize,
    pub health: OutputHealth,
    pub store: Store,
    pub decided: watch::Sender<Decided>,
}

impl ChangelogTask {
    /// Runs until the writer stops, from the decisions a [`recover`] stored.
    pub async fn run(
        self,
        mut replicas: mpsc::Receiver<Replica>,
        progress: ReplicationProgress,
        shutdown: CancellationToken,
    ) {
        let mut tracker = Tracker::new(progress);
        while let Some(first) = replicas.recv().await {
            let mut window = vec![first];
            while window.len() < WINDOW {
                match replicas.try_recv() {
                    Ok(next) => window.push(next),
                    Err(_) => break,
                }
            }
            let mut end = WindowEnd::default();
            let mut sent = Vec::with_capacity(window.len());
            let mut guards = Vec::with_capacity(window.len());
            let mut pieces: Vec<(usize, Snapshot)> = Vec::with_capacity(window.len());
            for replica in window {
                match replica {
                    Replica::Snapshot(outgoing) => {
                        let owner = guards.len();
                        let number = outgoing.snapshot.tracking_number.clone();
                        let parts = outgoing.snapshot.into_pieces(self.max_record_bytes);
                        sent.push(Sent {
                            tracking_number: number,
                            changes: outgoing.changes,
                            landed: vec![None; parts.len()],
                        });
                        guards.push(outgoing.guard);
                        pieces.extend(parts.into_iter().map(|part| (owner, part)));
                    }
                    Replica::Through { sequence, void } => {
                        end.through = Some((sent.len(), sequence));
                        end.void.extend(void);
                    }
                }
            }
            let output = (&self.ownership, guards.as_slice());
            let Some(landed) = deliver(
                &self.producer,
                &self.topic,
                &pieces,
                output,
                &self.health,
                &shutdown,
            )
            .await
            else {
                // Left in doubt: the next start's recovery decides them from the changelog.
                return;
            };
            let mut next_piece = vec![0; sent.len()];
            for ((owner, _), at) in pieces.iter().zip(landed) {
                sent[*owner].landed[next_piece[*owner]] = at;
                next_piece[*owner] += 1;
            }
            let void = tracker.record(&sent, end);
            metrics::counter!(m::STATUS_CHANGES_VOID_TOTAL).increment(void as u64);
            // Stored before the sink is told, so what it publishes or skips stays decided.
            match self
                .store
                .set_replication_progress(tracker.progress(), false)
            {
                Ok(passed) => tracker.forget_void_through(passed),
                Err(error) => tracing::warn!(%error, "changelog decisions not stored"),
            }
            self.decided
                .send_replace(tracker.progress().decided.clone());
        }
    }
}

/// Sends `pieces` (each with the index of its guard) in order, all handed to the producer
/// before their reports are awaited, until each is delivered, its guard is closed, or the
/// daemon stops. After a failure, everything from the failed piece on is sent again, in
/// order, so a shipment's latest state stays the last on the log. Returns where each piece
/// landed (if it did), or `None` when the daemon stopped with some still undelivered.
async fn deliver(
    producer: &FutureProducer<LoggingContext>,
    topic: &str,
    pieces: &[(usize, Snapshot)],
    (ownership, guards): (&Ownership, &[OutputGuard]),
    health: &OutputHealth,
    shutdown: &CancellationToken,
) -> Option<Vec<Option<(i32, i64)>>> {
    let mut landed = vec![None; pieces.len()];
    let mut from = 0;
    let mut backoff = Duration::from_millis(100);
    loop {
        let mut pending = Vec::with_capacity(pieces.len() - from);
        for (index, (owner, piece)) in pieces.iter().enumerate().skip(from) {
            if !guards.get(*owner).is_some_and(|g| ownership.is_open(g)) {
                metrics::counter!(m::CHANGELOG_RECORDS_TOTAL, "result" => "fenced").increment(1);
                continue;
            }
            let payload = piece.encode_to_vec();
            let key = piece.key();
            let record = FutureRecord::to(topic)
                .key(key.as_bytes())
                .partition(piece.partition)
                .payload(&payload);
            let sent = match injected_failure() {
                Some(error) => Err(error),
                None => producer.send_result(record).map_err(|(error, _)| error),
            };
            let refused = sent.is_err();
            pending.push((index, sent));
            if refused {
                break;
            }
        }
        let mut failed = None;
        for (index, sent) in pending {
            let result = match sent {
                Ok(delivery) => match delivery.await {
                    Ok(Ok(delivery)) => Ok((delivery.partition, delivery.offset)),
                    Ok(Err((error, _))) => Err(error),
                    Err(_) => Err(KafkaError::Canceled),
                },
                Err(error) => Err(error),
            };
            match result {
                Ok(at) => {
                    landed[index] = Some(at);
                    if failed.is_none() {
                        metrics::counter!(m::CHANGELOG_RECORDS_TOTAL, "result" => "sent")
                            .increment(1);
                    }
                }
                // Sent again from the first failed piece on.
                Err(error) => {
                    failed.get_or_insert((index, error));
                }
            }
        }
        let Some((index, error)) = failed else {
            health.delivered();
            return Some(landed);
        };
        if shutdown.is_cancelled() {
            // The next owner resumes from an earlier offset instead; nothing is lost.
            tracing::warn!(%error, "changelog write abandoned at shutdown");
            return None;
        }
        metrics::counter!(m::CHANGELOG_RECORDS_TOTAL, "result" => "error").increment(1);
        health.failed(&error);
        tracing::warn!(%error, retry_in = ?backoff, "changelog write failed; retrying");
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(RETRY_MAX);
        from = index;
    }
}

/// A test's stand-in for a broker that refuses the changelog's writes
/// (`FAILPOINTS=changelog-send=return`); nothing in a build without the `failpoints` feature.
fn injected_failure() -> Option<KafkaError> {
    fail::fail_point!("changelog-send", |_| Some(KafkaError::MessageProduction(
        RDKafkaErrorCode::TopicAuthorizationFailed
    )));
    None
}

/// What a partition's restore did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Restored {
    pub shipments: usize,
    /// Where the partition's consumption resumes.
    pub resume: i64,
}

/// Restores one source partition claimed under `generation`: reads its changelog partition
/// to the end it had when the restore began, has the writer install it over the local state a
/// chunk at a time, and ends with the writer storing where consumption resumes.
/// Stops with [`RestoreError::Stale`] as soon as the claim is no longer current. Blocking.
pub fn restore(
    cluster: &Cluster,
    changelog: &str,
    writer: &WriterHandle,
    ownership: &Ownership,
    (source_topic, partition): (&str, i32),
    generation: Generation,
) -> Result<Restored, RestoreError> {
    let consumer = client::assigning_consumer(cluster, "scand-changelog-restore")?;
    let timeout = READ_TIMEOUT;
    let current = || {
        ownership
            .is_current(source_topic, partition, generation)
            .then_some(())
            .ok_or(RestoreError::Stale)
    };
    let (low, high) = consumer.fetch_watermarks(changelog, partition, timeout)?;
    // Without any marker, nothing is known complete: resume from the partition's start.
    let mut resume = 0;
    let mut shipments = 0;
    let mut chunk = Vec::with_capacity(RESTORE_CHUNK);
    let mut assembler = Assembler::default();
    let reads = HashMap::from([(partition, (low, high))]);
    read_to_ends(&consumer, changelog, &reads, current, |message| {
        let decode_error = |reason: String| RestoreError::Decode {
            partition,
            offset: message.offset(),
            reason,
        };
        let snapshot = Snapshot::decode(message.payload().unwrap_or_default())
            .map_err(|e| decode_error(e.to_string()))?;
        if snapshot.topic != source_topic {
            return Ok(());
        }
        let Some(snapshot) = assembler
            .offer(snapshot)
            .map_err(|e| decode_error(e.to_string()))?
        else {
            return Ok(());
        };
        if snapshot.is_marker() {
            resume = snapshot.next_offset;
        } else {
            chunk.push(snapshot);
            if chunk.len() == RESTORE_CHUNK {
                let full = std::mem::take(&mut chunk);
                shipments += writer.install_blocking(source_topic, partition, full)?;
            }
        }
        Ok(())
    })?;
    if !chunk.is_empty() {
        shipments += writer.install_blocking(source_topic, partition, chunk)?;
    }
    current()?;
    let resume = writer.resume_blocking(source_topic, partition, resume)?;
    Ok(Restored { shipments, resume })
}

/// How long a read of the changelog may go without a record before it counts as stuck.
pub(super) const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Reads changelog partitions (partition → from, end) until each has passed its end, handing
/// every record to `each`; `still` is asked before every poll (a restore stops once its claim
/// is stale). Fails with [`RestoreError::Incomplete`] when nothing comes for [`READ_TIMEOUT`].
pub(super) fn read_to_ends(
    consumer: &BaseConsumer,
    changelog: &str,
    reads: &HashMap<i32, (i64, i64)>,
    still: impl Fn() -> Result<(), RestoreError>,
    mut each: impl FnMut(&BorrowedMessage<'_>) -> Result<(), RestoreError>,
) -> Result<(), RestoreError> {
    let mut tpl = TopicPartitionList::new();
    let mut next: HashMap<i32, i64> = HashMap::new();
    for (partition, (from, end)) in reads {
        if from < end {
            tpl.add_partition_offset(changelog, *partition, Offset::Offset(*from))?;
            next.insert(*partition, *from);
        }
    }
    if next.is_empty() {
        return Ok(());
    }
    consumer.assign(&tpl)?;
    let behind = |next: &HashMap<i32, i64>| {
        next.iter()
            .find(|(p, n)| reads.get(*p).is_some_and(|(_, end)| *n < end))
            .map(|(p, n)| (*p, *n, reads[p].1))
    };
    let mut last_read = Instant::now();
    while let Some((partition, at, high)) = behind(&next) {
        still()?;
        let Some(message) = consumer.poll(Duration::from_millis(500)) else {
            if last_read.elapsed() > READ_TIMEOUT {
                return Err(RestoreError::Incomplete {
                    partition,
                    next: at,
                    high,
                    timeout: READ_TIMEOUT,
                });
            }
            continue;
        };
        last_read = Instant::now();
        let message = message?;
        next.insert(message.partition(), message.offset() + 1);
        each(&message)?;
    }
    Ok(())
}
