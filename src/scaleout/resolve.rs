//! At start, before this instance consumes or publishes anything: the changes it made but had
//! not decided when it last stopped (killed with their snapshots on the way, or before they
//! were made) are decided from the changelog itself. A change of a replicated shipment is
//! published if a snapshot of this instance covering it is on the changelog (the next owner
//! restored it and will not derive it again), and is void if none is (the next owner reads
//! its records again and derives it anew).
//!
//! Invariants:
//! - Runs before the changelog task sends anything, so every snapshot of this instance on the
//!   changelog was made before the stop, and the changelog's ends are floors afterwards.
//! - The decisions are stored, synced, before the Kafka sink or the source starts.
//! - Requires the changelog to keep a shipment's latest snapshot of this instance until it
//!   restarts (`min.compaction.lag.ms` longer than an instance stays down, see
//!   docs/OPERATIONS.md): a newer snapshot of another owner compacts it away.

use std::collections::{BTreeSet, HashMap};

use prost::Message;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message as _;

use super::changelog::{read_to_ends, RestoreError, READ_TIMEOUT};
use crate::domain::{Sequence, TrackingNumber};
use crate::kafka::{self as client, Cluster};
use crate::store::keys::KAFKA_SINK;
use crate::store::replicated::{Decided, ReplicationProgress};
use crate::store::writer::Snapshot;
use crate::store::{Store, StoreError};
use crate::telemetry::metrics as m;

/// Changes read from the change log at once.
const CHUNK: usize = 1_000;

#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error("{0}")]
    Read(#[from] RestoreError),
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("changelog topic {0} has no partitions (missing?)")]
    NoPartitions(String),
}

impl From<KafkaError> for ResolveError {
    fn from(error: KafkaError) -> Self {
        Self::Read(RestoreError::Kafka(error))
    }
}

/// Decides the changes in doubt and stores the decisions with the changelog's ends as floors.
/// Blocking.
pub fn resolve(
    cluster: &Cluster,
    changelog: &str,
    store: &Store,
    publisher: u64,
) -> Result<ReplicationProgress, ResolveError> {
    let last = store.last_sequence()?;
    let consumer = client::assigning_consumer(cluster, "scand-changelog-resolve")?;
    let metadata = consumer.fetch_metadata(Some(changelog), READ_TIMEOUT)?;
    let partitions = client::partition_ids(&metadata, changelog);
    if partitions.is_empty() {
        return Err(ResolveError::NoPartitions(changelog.to_owned()));
    }
    let mut marks = HashMap::new();
    for partition in &partitions {
        marks.insert(
            *partition,
            consumer.fetch_watermarks(changelog, *partition, READ_TIMEOUT)?,
        );
    }
    let ends: HashMap<i32, i64> = marks.iter().map(|(p, (_, high))| (*p, *high)).collect();
    let decided = match store.replication_progress()? {
        // The first start with scale-out on this data directory: what it holds is published
        // as it was before.
        None => Decided {
            through: last,
            void: BTreeSet::new(),
        },
        Some(stored) => {
            let from = stored.decided.through.max(store.sink_cursor(KAFKA_SINK)?);
            let mut decided = stored.decided;
            if from < last {
                let reads: HashMap<i32, (i64, i64)> = marks
                    .iter()
                    .map(|(partition, (low, high))| {
                        let floor = stored.floors.get(partition).copied().unwrap_or(*low);
                        (*partition, (floor.clamp(*low, *high), *high))
                    })
                    .collect();
                let covered = covered(&consumer, changelog, publisher, &reads)?;
                let void = void_among(store, (from, last), &covered)?;
                tracing::info!(
                    in_doubt = last.0 - from.0,
                    void = void.len(),
                    "changes in doubt at start decided from the changelog"
                );
                metrics::counter!(m::STATUS_CHANGES_VOID_TOTAL).increment(void.len() as u64);
                decided.void.extend(void);
            }
            decided.through = last;
            decided
        }
    };
    let progress = ReplicationProgress {
        decided,
        floors: ends,
    };
    store.set_replication_progress(&progress, true)?;
    Ok(progress)
}

/// Per shipment, the last change of `publisher` that its snapshots on the changelog carry,
/// read over `reads` (partition → from, end).
fn covered(
    consumer: &BaseConsumer,
    changelog: &str,
    publisher: u64,
    reads: &HashMap<i32, (i64, i64)>,
) -> Result<HashMap<String, u64>, ResolveError> {
    let mut covered: HashMap<String, u64> = HashMap::new();
    read_to_ends(
        consumer,
        changelog,
        reads,
        || Ok(()),
        |message| {
            // Records that are not snapshots are the restore's to report; here they carry nothing.
            let Ok(snapshot) = Snapshot::decode(message.payload().unwrap_or_default()) else {
                return Ok(());
            };
            if snapshot.publisher == publisher && !snapshot.is_marker() && snapshot.piece == 0 {
                let last = covered.entry(snapshot.tracking_number).or_default();
                *last = (*last).max(snapshot.covers);
            }
            Ok(())
        },
    )?;
    Ok(covered)
}

/// The changes in `(after, upto]` of replicated shipments that no snapshot carries.
fn void_among(
    store: &Store,
    (after, upto): (Sequence, Sequence),
    covered: &HashMap<String, u64>,
) -> Result<Vec<u64>, StoreError> {
    let mut void = Vec::new();
    let mut cursor = after;
    loop {
        let changes = store.changes(cursor, upto, CHUNK)?;
        let Some(last) = changes.last() else {
            return Ok(void);
        };
        cursor = Sequence(last.sequence);
        for change in changes {
            let carried = covered
                .get(&change.tracking_number)
                .is_some_and(|covers| *covers >= change.sequence);
            if carried {
                continue;
            }
            let Ok(number) = TrackingNumber::parse(&change.tracking_number) else {
                continue;
            };
            let replicated = store
                .shipment_states(&[&number])?
                .pop()
                .flatten()
                .is_some_and(|state| state.owner.is_some());
            if replicated {
                void.push(change.sequence);
            }
        }
    }
}
