//! The fleet's directory, kept on Kafka itself: every instance produces to the members topic
//! where it answers (its gRPC URL) and which source partitions it owns, on every change of
//! ownership and as a heartbeat; every instance reads the whole topic, so any of them knows
//! which instance answers for any tracking number. No service beside Kafka.
//!
//! Invariants:
//! - A tracking number belongs to the partition Kafka's default partitioner gives it
//!   (`kafka::partition_of`) among the partitions of the first scans topic: the producers'
//!   contract, which the Kafka source enforces by rerouting.
//! - A member's claims count while its last announcement is fresh ([`STALE_AFTER`]); of two
//!   members claiming one partition (for the moment a rebalance takes), the later announcement
//!   wins. A partition nobody fresh claims has no route: the caller is told to retry.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use prost::Message as _;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message as _;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;

use crate::domain::ownership::Ownership;
use crate::domain::TrackingNumber;
use crate::kafka::{self as client, Cluster, LoggingContext};
use crate::proto::storage::{Member, OwnedPartition};
use crate::telemetry::admin::OutputHealth;

/// How often an instance announces itself when nothing changed.
pub const HEARTBEAT: Duration = Duration::from_secs(2);

/// Claims of a member silent this long are ignored (it stopped, or lost the broker).
pub const STALE_AFTER: Duration = Duration::from_secs(10);

/// How often the announcer looks for a change of ownership.
const CHECK_EVERY: Duration = Duration::from_millis(200);

/// How many partitions each scans topic has: shared by the Kafka source (which reads them at
/// every assignment) and the router.
pub type PartitionCounts = Arc<Mutex<HashMap<String, i32>>>;

/// What every instance knows of the others, from the members topic.
#[derive(Clone, Debug, Default)]
pub struct Directory {
    members: Arc<RwLock<HashMap<String, Member>>>,
}

impl Directory {
    /// A member's announcement; an older one than that already known is ignored.
    pub fn update(&self, member: Member) {
        let mut members = self
            .members
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match members.get(&member.url) {
            Some(known) if known.at_unix_ms > member.at_unix_ms => {}
            _ => {
                members.insert(member.url.clone(), member);
            }
        }
    }

    /// The URL of the instance owning the partition as of `now`, if a fresh member claims it.
    pub fn owner(&self, topic: &str, partition: i32, now: SystemTime) -> Option<String> {
        self.claimants((topic, partition), now)
            .into_iter()
            .max_by_key(|(_, at)| *at)
            .map(|(url, _)| url)
    }

    /// The fresh members claiming the partition as of `now`, with when they last said so.
    fn claimants(&self, (topic, partition): (&str, i32), now: SystemTime) -> Vec<(String, i64)> {
        let fresh_since = unix_ms(now) - STALE_AFTER.as_millis() as i64;
        self.members
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .values()
            .filter(|m| m.at_unix_ms >= fresh_since)
            .filter(|m| {
                m.owned
                    .iter()
                    .any(|o| o.topic == topic && o.partition == partition)
            })
            .map(|m| (m.url.clone(), m.at_unix_ms))
            .collect()
    }
}

/// Longest a restore waits for the previous owner to hand a partition over: a live owner
/// releases within its release wait, a silent one's claim goes stale.
pub const HANDOFF_WAIT: Duration = STALE_AFTER.saturating_add(Duration::from_secs(11));

impl Directory {
    /// Fresh members other than `me` that claim the partition.
    pub fn others_claiming(
        &self,
        partition: (&str, i32),
        me: &str,
        now: SystemTime,
    ) -> Vec<String> {
        self.claimants(partition, now)
            .into_iter()
            .map(|(url, _)| url)
            .filter(|url| url != me)
            .collect()
    }

    /// Waits until no other fresh member claims the partition, while `still_wanted` holds and
    /// at most [`HANDOFF_WAIT`]; returns those still claiming it then. A restore must not read
    /// the changelog before the previous owner has released the partition (its last
    /// snapshots sent, then an announcement without it): tansu 0.6 answers a JoinGroup at
    /// once instead of waiting for every member to rejoin, so a partition can be assigned
    /// here while its previous owner has not yet been told to revoke it. Blocking.
    pub fn await_handoff(
        &self,
        partition: (&str, i32),
        me: &str,
        still_wanted: impl Fn() -> bool,
    ) -> Vec<String> {
        let deadline = Instant::now() + HANDOFF_WAIT;
        loop {
            let others = self.others_claiming(partition, me, SystemTime::now());
            if others.is_empty() || !still_wanted() || Instant::now() >= deadline {
                return others;
            }
            std::thread::sleep(CHECK_EVERY);
        }
    }
}

fn unix_ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Where a query about a tracking number is answered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Route {
    /// This instance owns the number's partition (or no fleet routing applies).
    Here,
    /// The owner answers at this URL.
    At(String),
    /// No instance owns the partition now (a rebalance is under way).
    Unowned { topic: String, partition: i32 },
}

/// Routes queries to the owner of the tracking number's partition.
#[derive(Clone, Debug)]
pub struct Router {
    pub directory: Directory,
    pub ownership: Ownership,
    pub partitions: PartitionCounts,
    /// The scans topic whose partitions own shipments.
    pub topic: String,
    /// This instance's own URL.
    pub me: String,
}

impl Router {
    pub fn route(&self, number: &TrackingNumber, now: SystemTime) -> Route {
        let Some(count) = self
            .partitions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&self.topic)
            .copied()
        else {
            return Route::Here;
        };
        let partition = client::partition_of(number.as_str().as_bytes(), count);
        if self.ownership.is_owned(&self.topic, partition) {
            return Route::Here;
        }
        match self.directory.owner(&self.topic, partition, now) {
            Some(url) if url != self.me => Route::At(url),
            _ => Route::Unowned {
                topic: self.topic.clone(),
                partition,
            },
        }
    }
}

/// The announcer's producer. Not idempotent: every announcement carries the whole claim and
/// the latest wins, so a duplicate is harmless, and a fenced producer id (which ends an
/// idempotent producer for good) cannot silence the instance.
pub fn producer(
    cluster: &Cluster,
) -> Result<FutureProducer<LoggingContext>, rdkafka::error::KafkaError> {
    client::client_config(
        cluster,
        &cluster.producer,
        // A heartbeat not delivered within this is a failure, told to readiness.
        &[
            ("enable.idempotence", "false"),
            ("acks", "all"),
            ("message.timeout.ms", "5000"),
        ],
    )
    .create_with_context(LoggingContext)
}

/// Announces this instance (where it answers, and its publisher id) to the members topic
/// whenever the partitions it owns change, and every [`HEARTBEAT`]; at shutdown, once more
/// owning nothing.
pub async fn announce(
    producer: FutureProducer<LoggingContext>,
    topic: String,
    (url, publisher): (String, String),
    (ownership, health): (Ownership, OutputHealth),
    shutdown: CancellationToken,
) {
    let mut announced: Option<(Vec<(String, i32)>, std::time::Instant)> = None;
    let mut ticks = tokio::time::interval(CHECK_EVERY);
    loop {
        // At once on a change of ownership: an ownership shorter than a tick would otherwise
        // never be told, and a release told late holds up the next owner's handoff.
        tokio::select! {
            () = shutdown.cancelled() => break,
            () = ownership.changed() => {}
            _ = ticks.tick() => {}
        }
        let owned = ownership.owned_partitions();
        let due = match &announced {
            Some((last, at)) => *last != owned || at.elapsed() >= HEARTBEAT,
            None => true,
        };
        if due {
            match send(&producer, &topic, (&url, &publisher), &owned).await {
                Ok(()) => {
                    health.delivered();
                    announced = Some((owned, std::time::Instant::now()));
                }
                // The heartbeat makes this the instance's sign of a broker it cannot reach.
                Err(error) => health.failed(&error),
            }
        }
    }
    if let Err(error) = send(&producer, &topic, (&url, &publisher), &[]).await {
        tracing::warn!(%error, topic, "leaving without telling the members topic");
    }
}

async fn send(
    producer: &FutureProducer<LoggingContext>,
    topic: &str,
    (url, publisher): (&str, &str),
    owned: &[(String, i32)],
) -> Result<(), rdkafka::error::KafkaError> {
    let member = Member {
        url: url.to_owned(),
        publisher: publisher.to_owned(),
        owned: owned
            .iter()
            .map(|(topic, partition)| OwnedPartition {
                topic: topic.clone(),
                partition: *partition,
            })
            .collect(),
        at_unix_ms: unix_ms(SystemTime::now()),
    };
    let payload = member.encode_to_vec();
    let record = FutureRecord::to(topic).key(url).payload(&payload);
    match producer.send(record, Duration::from_secs(5)).await {
        Ok(_) => Ok(()),
        Err((error, _)) => {
            tracing::warn!(%error, topic, "membership not announced; retrying");
            Err(error)
        }
    }
}

/// Reads the members topic from its start into `directory` until `shutdown`. Blocking: runs
/// on a thread of its own.
pub fn follow(cluster: &Cluster, topic: &str, directory: &Directory, shutdown: &CancellationToken) {
    let consumer = match client::assigning_consumer(cluster, "scand-members") {
        Ok(consumer) => consumer,
        Err(error) => {
            tracing::error!(%error, "members topic not followed: queries are answered here only");
            return;
        }
    };
    let mut assigned = 0;
    while !shutdown.is_cancelled() {
        if assigned == 0 {
            assigned = assign_all(&consumer, topic);
            if assigned == 0 {
                std::thread::sleep(Duration::from_secs(1));
                continue;
            }
        }
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(message)) => match Member::decode(message.payload().unwrap_or_default()) {
                Ok(member) => directory.update(member),
                Err(error) => tracing::warn!(%error, topic, "undecodable member record skipped"),
            },
            Some(Err(error)) => tracing::debug!(%error, "members topic read error"),
            None => {}
        }
    }
}

/// Assigns every partition of the topic from its start; how many.
fn assign_all(consumer: &BaseConsumer, topic: &str) -> usize {
    let partitions = match consumer.fetch_metadata(Some(topic), Duration::from_secs(5)) {
        Ok(metadata) => metadata
            .topics()
            .iter()
            .filter(|t| t.name() == topic)
            .flat_map(|t| t.partitions().iter().map(|p| p.id()))
            .collect::<Vec<i32>>(),
        Err(error) => {
            tracing::warn!(%error, topic, "members topic metadata not read; retrying");
            return 0;
        }
    };
    let mut tpl = TopicPartitionList::new();
    for partition in &partitions {
        if tpl
            .add_partition_offset(topic, *partition, Offset::Beginning)
            .is_err()
        {
            return 0;
        }
    }
    match consumer.assign(&tpl) {
        Ok(()) => partitions.len(),
        Err(error) => {
            tracing::warn!(%error, topic, "members topic not assigned; retrying");
            0
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(url: &str, owned: &[i32], at: SystemTime) -> Member {
        Member {
            url: url.into(),
            owned: owned
                .iter()
                .map(|p| OwnedPartition {
                    topic: "scans.raw".into(),
                    partition: *p,
                })
                .collect(),
            at_unix_ms: unix_ms(at),
            publisher: String::new(),
        }
    }

    #[test]
    fn a_restore_waits_for_the_previous_owner_to_announce_it_let_go() {
        let now = SystemTime::now();
        let directory = Directory::default();
        directory.update(member("http://old", &[3], now));
        directory.update(member("http://me", &[3], now));
        directory.update(member("http://gone", &[3], now - STALE_AFTER * 2));
        assert_eq!(
            directory.others_claiming(("scans.raw", 3), "http://me", now),
            ["http://old"]
        );
        // Given up once the claim is no longer wanted here (or after HANDOFF_WAIT).
        assert_eq!(
            directory.await_handoff(("scans.raw", 3), "http://me", || false),
            ["http://old"]
        );
        let releasing = directory.clone();
        let handed = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            releasing.update(member("http://old", &[], SystemTime::now()));
        });
        let started = Instant::now();
        assert!(directory
            .await_handoff(("scans.raw", 3), "http://me", || true)
            .is_empty());
        assert!(started.elapsed() >= Duration::from_millis(300));
        handed.join().expect("announces");
    }

    #[test]
    fn the_freshest_claim_of_a_partition_names_its_owner() {
        let now = SystemTime::now();
        let directory = Directory::default();
        directory.update(member("http://a", &[0, 1], now - Duration::from_secs(3)));
        directory.update(member("http://b", &[1, 2], now - Duration::from_secs(1)));
        assert_eq!(
            directory.owner("scans.raw", 0, now).as_deref(),
            Some("http://a")
        );
        assert_eq!(
            directory.owner("scans.raw", 1, now).as_deref(),
            Some("http://b")
        );
        assert_eq!(directory.owner("other", 1, now), None);
        // An older announcement arriving late changes nothing.
        directory.update(member("http://b", &[], now - Duration::from_secs(2)));
        assert_eq!(
            directory.owner("scans.raw", 2, now).as_deref(),
            Some("http://b")
        );
        // A member silent for too long owns nothing.
        let later = now + STALE_AFTER;
        assert_eq!(directory.owner("scans.raw", 0, later), None);
    }

    #[test]
    fn a_number_routes_here_to_its_owner_or_nowhere() {
        let now = SystemTime::now();
        let ownership = Ownership::default();
        let router = Router {
            directory: Directory::default(),
            ownership: ownership.clone(),
            partitions: PartitionCounts::default(),
            topic: "scans.raw".into(),
            me: "http://me".into(),
        };
        let number = TrackingNumber::parse("PARCEL0001").expect("valid");
        assert_eq!(
            router.route(&number, now),
            Route::Here,
            "no partition count yet"
        );
        router
            .partitions
            .lock()
            .expect("lock")
            .insert("scans.raw".into(), 6);
        // PARCEL0001 is on partition 3 of 6 (see `kafka::partition_of`).
        assert_eq!(
            router.route(&number, now),
            Route::Unowned {
                topic: "scans.raw".into(),
                partition: 3
            }
        );
        router.directory.update(member("http://b", &[3], now));
        assert_eq!(router.route(&number, now), Route::At("http://b".into()));
        let claim = ownership.claim("scans.raw", 3);
        assert!(ownership.confirm("scans.raw", 3, claim, 0));
        assert_eq!(router.route(&number, now), Route::Here);
    }
}
