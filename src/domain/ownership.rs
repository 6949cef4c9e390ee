//! Which Kafka source partitions this instance owns, and under which generation: the fence
//! every piece of partition state passes before it is applied, swept or sent anywhere.
//!
//! A partition is *claimed* when Kafka assigns it (its state is being restored; nothing of it
//! is consumed or sent), *owned* once its restore finished under the same claim, and *released*
//! when Kafka revokes it. Each claim gets a new generation, so work started under an earlier
//! claim (a restore, a record fetched before a revoke) is recognised as stale and dropped.
//!
//! Invariants:
//! - Only an owned partition's records are applied, its shipments swept and its state sent.
//! - Output for a partition (a changelog snapshot) is taken under an [`OutputGuard`] when it is
//!   made, while the partition is owned, and sent only while its guard is open: a release
//!   waits (bounded) for the guards taken before it, so what was queued is still delivered,
//!   then closes them, so once [`Ownership::release`] returns, nothing this instance does
//!   reaches Kafka for that partition.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::Origin;

/// One claim of a partition; later claims have larger generations.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Generation(pub u64);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Claim {
    /// Assigned; its state is being restored.
    Restoring(Generation),
    /// Restored: records from offset `from` on are applied.
    Owned { generation: Generation, from: i64 },
}

#[derive(Debug, Default)]
struct Partitions {
    claims: HashMap<(String, i32), Claim>,
    /// Output for each partition that is queued or being sent now.
    sending: HashMap<(String, i32), usize>,
    /// The claim whose guards may still send, per partition: from the claim until its release
    /// has waited.
    open: HashMap<(String, i32), Generation>,
    last_generation: u64,
}

/// Shared by the Kafka source (which claims and releases), the store writer (which sweeps
/// only what is owned) and the changelog (which sends only what is owned).
#[derive(Clone, Debug, Default)]
pub struct Ownership {
    partitions: Arc<Mutex<Partitions>>,
    /// Woken at every change of what is owned, so the fleet hears of it at once.
    changed: Arc<tokio::sync::Notify>,
}

/// Held while output for an owned partition is on its way; see [`Ownership::guard`].
#[derive(Debug)]
pub struct OutputGuard {
    partitions: Arc<Mutex<Partitions>>,
    key: (String, i32),
    generation: Generation,
}

impl Drop for OutputGuard {
    fn drop(&mut self) {
        let mut partitions = lock(&self.partitions);
        if let Some(n) = partitions.sending.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                partitions.sending.remove(&self.key);
            }
        }
    }
}

fn lock(partitions: &Mutex<Partitions>) -> MutexGuard<'_, Partitions> {
    // The critical sections cannot panic; a poisoned lock still holds consistent claims.
    partitions
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Ownership {
    /// Kafka assigned the partition: a new claim, restoring until [`Ownership::confirm`].
    pub fn claim(&self, topic: &str, partition: i32) -> Generation {
        let mut partitions = lock(&self.partitions);
        partitions.last_generation += 1;
        let generation = Generation(partitions.last_generation);
        let key = (topic.to_owned(), partition);
        partitions.open.insert(key.clone(), generation);
        partitions.claims.insert(key, Claim::Restoring(generation));
        self.changed.notify_one();
        generation
    }

    /// Waits for the next change of what is owned (one made since the last wait counts).
    pub async fn changed(&self) {
        self.changed.notified().await;
    }

    /// The restore under `generation` finished and consumption starts at `from`: owned, unless
    /// the partition was released or claimed again meanwhile (then `false`).
    pub fn confirm(&self, topic: &str, partition: i32, generation: Generation, from: i64) -> bool {
        let mut partitions = lock(&self.partitions);
        match partitions.claims.get_mut(&(topic.to_owned(), partition)) {
            Some(claim) if *claim == Claim::Restoring(generation) => {
                *claim = Claim::Owned { generation, from };
                self.changed.notify_one();
                true
            }
            _ => false,
        }
    }

    /// Kafka revoked the partition: from now on nothing of it is applied or swept, and no new
    /// output is made. Waits (at most `wait`) for the output made before, queued or on its
    /// way, then closes its guards: what is left is never sent. `false` if some was left.
    pub fn release(&self, topic: &str, partition: i32, wait: Duration) -> bool {
        let key = (topic.to_owned(), partition);
        let released = match lock(&self.partitions).claims.remove(&key) {
            Some(Claim::Restoring(g) | Claim::Owned { generation: g, .. }) => Some(g),
            None => None,
        };
        self.changed.notify_one();
        let deadline = Instant::now() + wait;
        let drained = loop {
            if !lock(&self.partitions).sending.contains_key(&key) {
                break true;
            }
            if Instant::now() >= deadline {
                break false;
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        let mut partitions = lock(&self.partitions);
        // A claim made meanwhile keeps its own guards open.
        if partitions.open.get(&key).copied() == released {
            partitions.open.remove(&key);
        }
        drained
    }

    /// Whether output made under `guard` may still be sent: its claim is not released.
    pub fn is_open(&self, guard: &OutputGuard) -> bool {
        lock(&self.partitions).open.get(&guard.key) == Some(&guard.generation)
    }

    /// Whether the current claim of the partition is `generation` (owned or restoring).
    pub fn is_current(&self, topic: &str, partition: i32, generation: Generation) -> bool {
        match lock(&self.partitions)
            .claims
            .get(&(topic.to_owned(), partition))
        {
            Some(Claim::Restoring(g) | Claim::Owned { generation: g, .. }) => *g == generation,
            None => false,
        }
    }

    /// Whether a record at `offset` of the partition is to be applied: owned, and not before
    /// where consumption restarted after the restore.
    pub fn accepts(&self, topic: &str, partition: i32, offset: i64) -> bool {
        matches!(
            lock(&self.partitions).claims.get(&(topic.to_owned(), partition)),
            Some(Claim::Owned { from, .. }) if offset >= *from
        )
    }

    /// Whether the partition is owned: restored, and consumed here.
    pub fn is_owned(&self, topic: &str, partition: i32) -> bool {
        matches!(
            lock(&self.partitions)
                .claims
                .get(&(topic.to_owned(), partition)),
            Some(Claim::Owned { .. })
        )
    }

    /// Whether shipments of `origin`'s partition are this instance's to sweep.
    pub fn owns(&self, origin: &Origin) -> bool {
        self.is_owned(&origin.topic, origin.partition)
    }

    /// Partitions owned now (restored and consuming).
    pub fn owned(&self) -> usize {
        lock(&self.partitions)
            .claims
            .values()
            .filter(|c| matches!(c, Claim::Owned { .. }))
            .count()
    }

    /// The partitions owned now, in order.
    pub fn owned_partitions(&self) -> Vec<(String, i32)> {
        let mut owned: Vec<(String, i32)> = lock(&self.partitions)
            .claims
            .iter()
            .filter(|(_, claim)| matches!(claim, Claim::Owned { .. }))
            .map(|(key, _)| key.clone())
            .collect();
        owned.sort_unstable();
        owned
    }

    /// A guard to make and send output for the partition under, if it is owned: a release
    /// waits for it, then closes it.
    pub fn guard(&self, topic: &str, partition: i32) -> Option<OutputGuard> {
        let key = (topic.to_owned(), partition);
        let mut partitions = lock(&self.partitions);
        let Some(Claim::Owned { generation, .. }) = partitions.claims.get(&key).copied() else {
            return None;
        };
        *partitions.sending.entry(key.clone()).or_default() += 1;
        Some(OutputGuard {
            partitions: self.partitions.clone(),
            key,
            generation,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn origin(partition: i32) -> Origin {
        Origin {
            topic: "scans".into(),
            partition,
        }
    }

    #[test]
    fn a_partition_is_owned_only_once_its_restore_is_confirmed_under_the_same_claim() {
        let ownership = Ownership::default();
        let first = ownership.claim("scans", 0);
        assert!(!ownership.owns(&origin(0)));
        assert!(!ownership.accepts("scans", 0, 10));
        assert!(ownership.is_current("scans", 0, first));

        // Claimed again before the first restore finished: the first restore is stale.
        let second = ownership.claim("scans", 0);
        assert!(second > first);
        assert!(!ownership.confirm("scans", 0, first, 5));
        assert!(!ownership.is_current("scans", 0, first));
        assert!(ownership.confirm("scans", 0, second, 5));
        assert!(ownership.owns(&origin(0)));
        assert!(!ownership.owns(&origin(1)));
        assert!(
            !ownership.accepts("scans", 0, 4),
            "before the restart point"
        );
        assert!(ownership.accepts("scans", 0, 5));
        assert_eq!(ownership.owned(), 1);
        assert_eq!(ownership.owned_partitions(), [("scans".to_owned(), 0)]);

        assert!(ownership.release("scans", 0, Duration::ZERO));
        assert!(!ownership.owns(&origin(0)));
        assert!(!ownership.accepts("scans", 0, 5));
        assert!(!ownership.confirm("scans", 0, second, 5));
        assert_eq!(ownership.owned(), 0);
    }

    #[test]
    fn output_is_guarded_only_while_owned_and_a_release_waits_for_it() {
        let ownership = Ownership::default();
        let claim = ownership.claim("scans", 3);
        assert!(ownership.guard("scans", 3).is_none(), "still restoring");
        assert!(ownership.confirm("scans", 3, claim, 0));
        let guard = ownership.guard("scans", 3).expect("owned");

        // The guard is held past the wait: the release says so, closes it, and the partition
        // is gone.
        assert!(ownership.is_open(&guard));
        assert!(!ownership.release("scans", 3, Duration::from_millis(20)));
        assert!(!ownership.is_open(&guard), "what is left is never sent");
        assert!(ownership.guard("scans", 3).is_none());
        drop(guard);

        let claim = ownership.claim("scans", 3);
        assert!(ownership.confirm("scans", 3, claim, 0));
        let guard = ownership.guard("scans", 3).expect("owned");
        let releaser = {
            let ownership = ownership.clone();
            std::thread::spawn(move || ownership.release("scans", 3, Duration::from_secs(10)))
        };
        std::thread::sleep(Duration::from_millis(30));
        assert!(!releaser.is_finished(), "the release waits for the guard");
        assert!(ownership.is_open(&guard), "and it may still send meanwhile");
        drop(guard);
        assert!(releaser.join().expect("release thread"));
    }
}
