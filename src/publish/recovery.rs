//! What the status topic already holds of this instance's changes beyond the sink's stored
//! cursor. The cursor is stored after delivery, and a delivery that timed out may still have
//! been written, so before publishing from its cursor (at start, and after any failed
//! delivery) the sink reads the topic from its floors to the end and skips what it finds.
//!
//! Invariants:
//! - Every record the sink writes carries its publisher id and sequence in headers
//!   ([`PUBLISHER_HEADER`], [`SEQUENCE_HEADER`]); records of other publishers are ignored.
//! - A floor is an offset below which no record of this publisher has a sequence beyond the
//!   stored cursor; a partition without a floor is read from its end (nothing was published
//!   there yet), and retention's low watermark bounds the read from below.
//! - A partition's reported end is a lower bound: reading stops only once nothing fetched is
//!   left and the position has passed it.

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use rdkafka::consumer::Consumer;
use rdkafka::error::KafkaError;
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};

use crate::domain::Sequence;
use crate::kafka::{self as client, Cluster};

/// Header naming the instance that published a change: its publisher id in hex.
pub const PUBLISHER_HEADER: &str = "scand-publisher";
/// Header carrying a change's sequence in its publisher's change log.
pub const SEQUENCE_HEADER: &str = "scand-sequence";

const METADATA_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum RecoveryError {
    #[error("status topic {0} has no partitions (missing?)")]
    NoPartitions(String),
    #[error("reading the status topic: {0}")]
    Kafka(#[from] KafkaError),
    #[error("the status topic's tail was not read within {0:?}")]
    Timeout(Duration),
}

/// What the topic holds of this publisher beyond the cursor, and where each partition ended.
#[derive(Debug, Default, PartialEq)]
pub struct Tail {
    pub published: BTreeSet<u64>,
    pub ends: HashMap<i32, i64>,
}

/// Each partition's end (high watermark) of `topic`.
pub fn ends<C: rdkafka::ClientContext>(
    client: &rdkafka::client::Client<C>,
    topic: &str,
) -> Result<HashMap<i32, i64>, RecoveryError> {
    let mut ends = HashMap::new();
    for partition in partitions(client.fetch_metadata(Some(topic), METADATA_TIMEOUT)?, topic)? {
        let (_, high) = client.fetch_watermarks(topic, partition, METADATA_TIMEOUT)?;
        ends.insert(partition, high);
    }
    Ok(ends)
}

fn partitions(
    metadata: rdkafka::metadata::Metadata,
    topic: &str,
) -> Result<Vec<i32>, RecoveryError> {
    let partitions = client::partition_ids(&metadata, topic);
    if partitions.is_empty() {
        return Err(RecoveryError::NoPartitions(topic.to_owned()));
    }
    Ok(partitions)
}

/// The publisher id as written in [`PUBLISHER_HEADER`].
pub fn publisher_tag(publisher: u64) -> String {
    format!("{publisher:016x}")
}

/// Reads `topic` from `floors` to its end for records of `publisher` after `cursor`.
/// Blocking: the sink runs it on a blocking thread.
pub fn read_tail(
    cluster: &Cluster,
    topic: &str,
    publisher: u64,
    cursor: Sequence,
    floors: &HashMap<i32, i64>,
    within: Duration,
) -> Result<Tail, RecoveryError> {
    let consumer = client::assigning_consumer(cluster, "scand-status-recovery")?;
    let partitions = partitions(
        consumer.fetch_metadata(Some(topic), METADATA_TIMEOUT)?,
        topic,
    )?;
    let mut tail = Tail::default();
    let mut reading = TopicPartitionList::new();
    let mut remaining: HashMap<i32, i64> = HashMap::new();
    for partition in partitions {
        let (low, high) = consumer.fetch_watermarks(topic, partition, METADATA_TIMEOUT)?;
        tail.ends.insert(partition, high);
        let from = floors
            .get(&partition)
            .copied()
            .unwrap_or(high)
            .clamp(low, high);
        if from < high {
            reading.add_partition_offset(topic, partition, Offset::Offset(from))?;
            remaining.insert(partition, high);
        }
    }
    if remaining.is_empty() {
        return Ok(tail);
    }
    consumer.assign(&reading)?;
    let tag = publisher_tag(publisher);
    let deadline = Instant::now() + within;
    while !remaining.is_empty() {
        if Instant::now() >= deadline {
            return Err(RecoveryError::Timeout(within));
        }
        let Some(message) = consumer.poll(Duration::from_millis(200)) else {
            // A partition is read once nothing fetched is left and the position passed its
            // end. Not at the record before the end: tansu 0.6 reports an end inside the last
            // multi-record batch (its base offset + 1), and stopping there skipped the rest.
            for position in consumer.position()?.elements() {
                if let Offset::Offset(next) = position.offset() {
                    if remaining
                        .get(&position.partition())
                        .is_some_and(|end| next >= *end)
                    {
                        remaining.remove(&position.partition());
                    }
                }
            }
            continue;
        };
        let message = message?;
        if let Some(sequence) = sequence_of(&message, &tag).filter(|s| *s > cursor.0) {
            tail.published.insert(sequence);
        }
    }
    Ok(tail)
}

/// The sequence a record carries when `tag` published it.
fn sequence_of(message: &impl Message, tag: &str) -> Option<u64> {
    let headers = message.headers()?;
    let mut publisher = None;
    let mut sequence = None;
    for header in headers.iter() {
        match header.key {
            PUBLISHER_HEADER => publisher = header.value,
            SEQUENCE_HEADER => sequence = header.value,
            _ => {}
        }
    }
    (publisher? == tag.as_bytes()).then_some(())?;
    std::str::from_utf8(sequence?).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::message::{Header, OwnedHeaders, OwnedMessage, Timestamp};

    fn record(publisher: &str, sequence: &str) -> OwnedMessage {
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: SEQUENCE_HEADER,
                value: Some(sequence.as_bytes()),
            })
            .insert(Header {
                key: PUBLISHER_HEADER,
                value: Some(publisher.as_bytes()),
            });
        OwnedMessage::new(
            None,
            None,
            "shipments.status".into(),
            Timestamp::NotAvailable,
            0,
            0,
            Some(headers),
        )
    }

    #[test]
    fn only_this_publishers_sequences_are_read() {
        let me = publisher_tag(0xabc);
        assert_eq!(me, "0000000000000abc");
        assert_eq!(sequence_of(&record(&me, "42"), &me), Some(42));
        assert_eq!(sequence_of(&record(&publisher_tag(7), "42"), &me), None);
        assert_eq!(sequence_of(&record(&me, "x"), &me), None);
    }
}
