//! Start-time checks of the topics scale-out rests on. The changelog must exist, be compacted
//! (it keeps each shipment's latest state however old, not a window of states) and have at
//! least as many partitions as every scans topic (a partition's state goes to the changelog
//! partition of the same number); the members topic must exist. Refused at start with the
//! reason, never found wanting at the first rebalance. A changelog that may compact a snapshot
//! away within the hour (`min.compaction.lag.ms`) gets a warning.

use std::collections::HashMap;
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};

use crate::kafka::{self as client, Cluster};

const METADATA_TIMEOUT: Duration = Duration::from_secs(10);

/// Below this `min.compaction.lag.ms`, a start warns: a restart decides what it had in flight
/// by reading its own latest snapshots back from the changelog (`resolve`).
const MIN_COMPACTION_LAG: Duration = Duration::from_secs(3600);

#[derive(Debug, thiserror::Error)]
pub enum TopicCheckError {
    #[error("cannot read the changelog topic's metadata from {brokers}: {source}")]
    Kafka { brokers: String, source: KafkaError },
    #[error(
        "changelog topic {topic:?} does not exist: create it with cleanup.policy=compact and at \
         least {needs} partitions (kafka.source.changelog_topic)"
    )]
    Missing { topic: String, needs: usize },
    #[error(
        "members topic {topic:?} does not exist: create it (one partition is enough, \
         cleanup.policy=compact) (kafka.source.members_topic)"
    )]
    MembersMissing { topic: String },
    #[error(
        "changelog topic {topic:?} has cleanup.policy={policy}: it must be compact, or a \
         partition's next owner restores only the states retention left"
    )]
    NotCompacted { topic: String, policy: String },
    #[error(
        "changelog topic {topic:?} has {has} partitions, fewer than the {needs} of scans topic \
         {scans:?}: a scans partition's state is replicated to the changelog partition of the \
         same number"
    )]
    TooFewPartitions {
        topic: String,
        has: usize,
        needs: usize,
        scans: String,
    },
}

/// The topics scale-out uses, by name.
#[derive(Clone, Copy, Debug)]
pub struct FleetTopics<'a> {
    pub scans: &'a [String],
    pub changelog: &'a str,
    pub members: &'a str,
}

/// Checks the changelog topic against the scans topics it replicates (a scans topic that does
/// not exist yet has no partitions to compare), and that the members topic exists. Returns
/// the scans topics' partition counts.
pub async fn check(
    cluster: &Cluster,
    topics: FleetTopics<'_>,
) -> Result<HashMap<String, i32>, TopicCheckError> {
    let FleetTopics {
        scans: scans_topics,
        changelog,
        members,
    } = topics;
    let kafka = |source| TopicCheckError::Kafka {
        brokers: cluster.brokers.clone(),
        source,
    };
    let admin: AdminClient<DefaultClientContext> =
        client::client_config(cluster, &cluster.consumer, &[])
            .create()
            .map_err(kafka)?;
    let mut needs = (0, String::new());
    let mut counts = HashMap::new();
    for topic in scans_topics {
        let Some(partitions) = partitions(&admin, topic).await.map_err(kafka)? else {
            continue;
        };
        counts.insert(topic.clone(), partitions as i32);
        if partitions > needs.0 {
            needs = (partitions, topic.clone());
        }
    }
    let Some(has) = partitions(&admin, changelog).await.map_err(kafka)? else {
        return Err(TopicCheckError::Missing {
            topic: changelog.to_owned(),
            needs: needs.0.max(1),
        });
    };
    let described = admin
        .describe_configs(
            &[ResourceSpecifier::Topic(changelog)],
            &AdminOptions::new().request_timeout(Some(METADATA_TIMEOUT)),
        )
        .await
        .map_err(kafka)?;
    let config = described
        .into_iter()
        .next()
        .ok_or_else(|| kafka(KafkaError::AdminOpCreation("no answer".into())))?
        .map_err(|code| kafka(KafkaError::AdminOp(code)))?;
    // Absent from the answer: the broker's default, which is Kafka's `delete`.
    let policy = config
        .get("cleanup.policy")
        .and_then(|entry| entry.value.clone())
        .unwrap_or_else(|| "delete".to_owned());
    if !policy.split(',').any(|p| p.trim() == "compact") {
        return Err(TopicCheckError::NotCompacted {
            topic: changelog.to_owned(),
            policy,
        });
    }
    // Absent from the answer (tansu reports no such key): nothing to say.
    let lag = config
        .get("min.compaction.lag.ms")
        .and_then(|entry| entry.value.as_deref())
        .and_then(|v| v.parse::<u64>().ok());
    if lag.is_some_and(|ms| ms < MIN_COMPACTION_LAG.as_millis() as u64) {
        tracing::warn!(
            topic = changelog,
            min_compaction_lag_ms = lag,
            "the changelog may compact away a snapshot of this instance before a restart \
             reads it back to decide what was in flight; set min.compaction.lag.ms above how \
             long an instance may stay down (an hour at least)"
        );
    }
    if has < needs.0 {
        return Err(TopicCheckError::TooFewPartitions {
            topic: changelog.to_owned(),
            has,
            needs: needs.0,
            scans: needs.1,
        });
    }
    if partitions(&admin, members).await.map_err(kafka)?.is_none() {
        return Err(TopicCheckError::MembersMissing {
            topic: members.to_owned(),
        });
    }
    Ok(counts)
}

/// The topic's partition count, `None` if it does not exist.
async fn partitions(
    admin: &AdminClient<DefaultClientContext>,
    topic: &str,
) -> Result<Option<usize>, KafkaError> {
    let metadata = tokio::task::block_in_place(|| {
        admin.inner().fetch_metadata(Some(topic), METADATA_TIMEOUT)
    })?;
    let Some(found) = metadata.topics().iter().find(|t| t.name() == topic) else {
        return Ok(None);
    };
    match found.error() {
        None => Ok(Some(found.partitions().len())),
        Some(error)
            if RDKafkaErrorCode::from(error) == RDKafkaErrorCode::UnknownTopicOrPartition =>
        {
            Ok(None)
        }
        Some(error) => Err(KafkaError::MetadataFetch(error.into())),
    }
}
