//! Kafka consumer lag per partition this instance owns, as two gauges rendered at each scrape:
//! `scand_kafka_consumer_lag_records` (records behind the partition's end, from librdkafka's
//! statistics) and `scand_kafka_consumer_lag_seconds` (while behind, the age of the newest
//! record consumed; 0 when caught up).
//!
//! Invariant: only partitions in the latest statistics are rendered, so a partition this
//! instance no longer owns leaves the scrape at the next statistics (every few seconds) instead
//! of keeping its last value forever, as a registered gauge would.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

pub const LAG_RECORDS: &str = "scand_kafka_consumer_lag_records";
pub const LAG_SECONDS: &str = "scand_kafka_consumer_lag_seconds";

#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct Partition {
    /// Records behind the end, as of the latest statistics.
    behind: i64,
    /// When the newest record consumed was produced (its Kafka timestamp).
    newest_consumed: Option<SystemTime>,
}

/// The lag board, shared by the Kafka source (writes) and the admin endpoint (renders).
#[derive(Clone, Default)]
pub struct Lag {
    partitions: Arc<Mutex<BTreeMap<(String, i32), Partition>>>,
}

impl Lag {
    /// Replaces the owned partitions and their lag with the latest statistics: partitions not
    /// in them are no longer owned.
    pub fn owned(&self, lag: impl IntoIterator<Item = ((String, i32), i64)>) {
        let mut partitions = self.lock();
        let previous = std::mem::take(&mut *partitions);
        for (key, behind) in lag {
            let newest_consumed = previous.get(&key).and_then(|p| p.newest_consumed);
            partitions.insert(
                key,
                Partition {
                    behind,
                    newest_consumed,
                },
            );
        }
    }

    /// The newest record consumed from a partition was produced at `produced`.
    pub fn consumed(&self, topic: &str, partition: i32, produced: SystemTime) {
        if let Some(p) = self.lock().get_mut(&(topic.to_owned(), partition)) {
            if p.newest_consumed.is_none_or(|t| t < produced) {
                p.newest_consumed = Some(produced);
            }
        }
    }

    /// The two gauges in the Prometheus text format, as of `now`.
    pub fn render(&self, now: SystemTime) -> String {
        let partitions = self.lock();
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# HELP {LAG_RECORDS} Records behind the end of each source partition this instance owns."
        );
        let _ = writeln!(out, "# TYPE {LAG_RECORDS} gauge");
        for ((topic, partition), p) in partitions.iter() {
            let _ = writeln!(
                out,
                "{LAG_RECORDS}{{topic=\"{topic}\",partition=\"{partition}\"}} {}",
                p.behind
            );
        }
        let _ = writeln!(
            out,
            "# HELP {LAG_SECONDS} While a partition is behind, the age of the newest record consumed from it; 0 when caught up."
        );
        let _ = writeln!(out, "# TYPE {LAG_SECONDS} gauge");
        for ((topic, partition), p) in partitions.iter() {
            let seconds = match p.newest_consumed {
                Some(produced) if p.behind > 0 => now
                    .duration_since(produced)
                    .unwrap_or(Duration::ZERO)
                    .as_secs_f64(),
                _ => 0.0,
            };
            let _ = writeln!(
                out,
                "{LAG_SECONDS}{{topic=\"{topic}\",partition=\"{partition}\"}} {seconds}"
            );
        }
        out
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<(String, i32), Partition>> {
        self.partitions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_owned_partitions_render_and_seconds_count_only_while_behind() {
        let lag = Lag::default();
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
        lag.owned([(("scans".to_owned(), 0), 5), (("scans".to_owned(), 1), 0)]);
        lag.consumed("scans", 0, t0);
        lag.consumed("scans", 1, t0);
        lag.consumed("scans", 2, t0);
        let text = lag.render(t0 + Duration::from_secs(30));
        assert!(
            text.contains("scand_kafka_consumer_lag_records{topic=\"scans\",partition=\"0\"} 5\n")
        );
        assert!(
            text.contains("scand_kafka_consumer_lag_seconds{topic=\"scans\",partition=\"0\"} 30\n")
        );
        assert!(
            text.contains("scand_kafka_consumer_lag_seconds{topic=\"scans\",partition=\"1\"} 0\n")
        );
        assert!(!text.contains("partition=\"2\""), "never owned: {text}");
        // Partition 0 moved to another instance; 1 stays, its consumed time kept.
        lag.owned([(("scans".to_owned(), 1), 3)]);
        let text = lag.render(t0 + Duration::from_secs(40));
        assert!(!text.contains("partition=\"0\""), "no longer owned: {text}");
        assert!(
            text.contains("scand_kafka_consumer_lag_seconds{topic=\"scans\",partition=\"1\"} 40\n")
        );
    }
}
