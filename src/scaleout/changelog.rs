//! Partition state replication for scale-out: after each durable write, the store writer hands
//! over the new state of every shipment a Kafka source partition owns (a [`Snapshot`]), then a
//! marker per partition ("complete up to offset N"); this task produces them, in order, to a
//! compacted changelog topic on the same partition number as their scans. When a partition is
//! assigned, the new owner reads that changelog partition to its end, installs every snapshot
//! newer than its own state (a restore job of the store writer) and resumes consuming scans at
//! the last marker.
//!
//! Invariant: the changelog may lag the store (it is written after durability), never lead it,
//! and the resume point is a marker, so it never passes a snapshot that was not written. A new
//! owner re-applies the scans after the marker; those it already holds are duplicates. Nothing is
//! lost or applied twice.

use std::time::Duration;

use prost::Message;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message as _;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::kafka::{self as client, Cluster, LoggingContext};
use crate::store::writer::{Snapshot, WriterHandle};
use crate::store::StoreError;

const RETRY_MAX: Duration = Duration::from_secs(5);

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
}

/// Produces snapshots in order until the writer stops sending them.
pub async fn run(
    mut snapshots: mpsc::Receiver<Snapshot>,
    producer: FutureProducer<LoggingContext>,
    topic: String,
    shutdown: CancellationToken,
) {
    while let Some(snapshot) = snapshots.recv().await {
        let payload = snapshot.encode_to_vec();
        let mut backoff = Duration::from_millis(100);
        loop {
            let key = snapshot.key();
            let record = FutureRecord::to(&topic)
                .key(key.as_bytes())
                .partition(snapshot.partition)
                .payload(&payload);
            match producer.send(record, Duration::from_secs(5)).await {
                Ok(_) => break,
                Err((error, _)) if !shutdown.is_cancelled() => {
                    tracing::warn!(%error, "changelog write failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(RETRY_MAX);
                }
                Err((error, _)) => {
                    // The next owner resumes from an earlier offset instead; nothing is lost.
                    tracing::warn!(%error, "changelog write abandoned at shutdown");
                    break;
                }
            }
        }
    }
}

/// Reads the changelog partitions matching `assigned` (scans topic, partition) to their end and
/// installs what is newer than the local state. Blocking: runs inside the rebalance callback,
/// before consumption of those partitions starts.
pub fn restore(
    cluster: &Cluster,
    topic: &str,
    writer: &WriterHandle,
    assigned: &[(String, i32)],
) -> Result<usize, RestoreError> {
    let consumer: BaseConsumer = client::client_config(
        cluster,
        &cluster.consumer,
        &[
            ("group.id", "scand-changelog-restore"),
            ("enable.auto.commit", "false"),
        ],
    )
    .create()?;
    let timeout = Duration::from_secs(10);
    let mut restored = 0;
    for (source_topic, partition) in assigned {
        let (low, high) = consumer.fetch_watermarks(topic, *partition, timeout)?;
        if high <= low {
            continue;
        }
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(topic, *partition, Offset::Offset(low))?;
        consumer.assign(&tpl)?;
        let mut snapshots = Vec::new();
        // Without any marker, nothing is known complete: resume from the partition's start.
        let mut resume = 0;
        let mut seen = false;
        let mut next = low;
        while next < high {
            let Some(message) = consumer.poll(timeout) else {
                tracing::warn!(
                    partition,
                    next,
                    high,
                    "changelog read timed out; restoring what was read"
                );
                break;
            };
            let message = message?;
            next = message.offset() + 1;
            let snapshot =
                Snapshot::decode(message.payload().unwrap_or_default()).map_err(|e| {
                    RestoreError::Decode {
                        partition: *partition,
                        offset: message.offset(),
                        reason: e.to_string(),
                    }
                })?;
            if snapshot.topic != *source_topic {
                continue;
            }
            seen = true;
            if snapshot.is_marker() {
                resume = snapshot.next_offset;
            } else {
                snapshots.push(snapshot);
            }
        }
        if seen {
            restored += writer.restore_blocking(source_topic, *partition, snapshots, resume)?;
        }
    }
    Ok(restored)
}
