//! The crash-consistency harness shared by the crash, disk-fault and overload tests: a
//! reproducible workload of shuffled journeys with retries, a scanner that records every scan
//! it got an ACK for, and the verification that every acked scan survived, that each shipment's
//! state is a fresh replay of its timeline, and that the change log is gapless.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::*;
use scand::domain::ScanType;
use scand::engine::status::Derived;
use scand::proto::pb::{self, Outcome};
use tokio_stream::wrappers::ReceiverStream;

/// Scan id → tracking number of every scan acknowledged (ACCEPTED or DUPLICATE).
pub type Acked = Arc<Mutex<HashMap<String, String>>>;

pub const BATCH: usize = 50;

/// A small deterministic PRNG (xorshift), so every round is reproducible from its number.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// A tracking number's second journey after [`journey`]: a new label 20 minutes ago, after
/// the first journey's delivery, and on to out for delivery.
const SECOND_JOURNEY: [(pb::ScanType, u64, &str); 4] = [
    (pb::ScanType::LabelCreated, 20, "shop-2"),
    (pb::ScanType::PickedUp, 15, "wh-2"),
    (pb::ScanType::ArrivedAtFacility, 10, "hub-2"),
    (pb::ScanType::OutForDelivery, 5, "van-2"),
];

/// Every scan of the workload, in a shuffled but reproducible order, with retries mixed in.
/// `shipments` journeys whose tracking numbers start with `prefix`; every tenth number is used
/// again for a second journey, its scans shuffled among the first's.
pub fn workload(prefix: &str, round: u64, shipments: usize) -> Vec<pb::Scan> {
    let mut scans = Vec::new();
    for s in 0..shipments {
        let number = format!("{prefix}{round:03}{s:05}");
        scans.extend(journey(&number, &format!("{prefix}r{round}s{s}")));
        if s % 10 == 0 {
            scans.extend(
                SECOND_JOURNEY
                    .iter()
                    .enumerate()
                    .map(|(i, (t, ago, facility))| {
                        scan(
                            &format!("{prefix}r{round}s{s}-again-{i}"),
                            &number,
                            *t,
                            minutes_ago(*ago),
                            facility,
                        )
                    }),
            );
        }
    }
    let mut rng = Rng::new(round);
    for i in (1..scans.len()).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        scans.swap(i, j);
    }
    let retries: Vec<pb::Scan> = (0..scans.len() / 10)
        .map(|_| scans[rng.below(scans.len() as u64) as usize].clone())
        .collect();
    for (k, retry) in retries.into_iter().enumerate() {
        let at = (k * 37) % scans.len();
        scans.insert(at, retry);
    }
    scans
}

/// Streams `scans` in batches until done or the server goes away; returns the scans acked.
pub async fn stream_until_cut(daemon_url: String, scans: Vec<pb::Scan>, acked: Acked) -> usize {
    let batches = scans
        .chunks(BATCH)
        .enumerate()
        .map(|(i, c)| batch(&format!("b{i}"), c.to_vec()))
        .collect();
    stream_batches(daemon_url, batches, acked).await.0
}

/// Streams `batches` as fast as the server takes them, recording every ack; returns the scans
/// acked and how the stream ended (`Err` when the call or the stream failed).
pub async fn stream_batches(
    daemon_url: String,
    batches: Vec<pb::ScanBatch>,
    acked: Acked,
) -> (usize, Result<(), tonic::Status>) {
    let mut client = match IngestClient::connect(daemon_url).await {
        Ok(client) => client,
        Err(error) => return (0, Err(tonic::Status::unavailable(error.to_string()))),
    };
    let by_id: HashMap<String, Vec<pb::Scan>> = batches
        .iter()
        .map(|b| (b.batch_id.clone(), b.scans.clone()))
        .collect();
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tokio::spawn(async move {
        for b in batches {
            if tx.send(b).await.is_err() {
                return;
            }
        }
    });
    let mut acks = match client.stream_scans(ReceiverStream::new(rx)).await {
        Ok(response) => response.into_inner(),
        Err(status) => return (0, Err(status)),
    };
    let mut count = 0;
    loop {
        match acks.message().await {
            Ok(Some(ack)) => count += record_acks(&acked, &by_id[&ack.batch_id], &ack),
            Ok(None) => return (count, Ok(())),
            Err(status) => return (count, Err(status)),
        }
    }
}

/// Records every scan of `sent` that `ack` answers (ACCEPTED or DUPLICATE); a REJECTED one
/// fails the test, as the workloads hold valid scans only. Returns how many were recorded.
pub fn record_acks(acked: &Acked, sent: &[pb::Scan], ack: &pb::BatchAck) -> usize {
    let mut acked = acked.lock().expect("lock");
    for (scan, result) in sent.iter().zip(&ack.results) {
        assert_eq!(scan.scan_id, result.scan_id);
        assert_ne!(
            result.outcome,
            Outcome::Rejected as i32,
            "{}",
            result.reason
        );
        acked.insert(scan.scan_id.clone(), scan.tracking_number.clone());
    }
    ack.results.len()
}

/// Submits `scans` in unary batches of [`BATCH`], each of which must be stored, and records
/// the acks.
pub async fn submit_all(daemon: &Daemon, scans: &[pb::Scan], acked: &Acked, tag: &str) {
    let mut ingest = daemon.ingest().await;
    for (i, chunk) in scans.chunks(BATCH).enumerate() {
        let ack = ingest
            .submit_scans(batch(&format!("{tag}{i}"), chunk.to_vec()))
            .await
            .expect("stored")
            .into_inner();
        record_acks(acked, chunk, &ack);
    }
}

/// Checks the daemon's state against every acked scan; returns the change log's last sequence.
pub async fn verify(daemon: &Daemon, acked: &HashMap<String, String>) -> u64 {
    verify_from(daemon, acked, 0).await
}

/// Like [`verify`], reading the change log after `from` only: the shipments of `acked` must
/// have all their changes there (they are new since `from`).
pub async fn verify_from(daemon: &Daemon, acked: &HashMap<String, String>, from: u64) -> u64 {
    let mut tracking = daemon.tracking().await;
    let mut by_shipment: BTreeMap<&str, HashSet<&str>> = BTreeMap::new();
    for (scan_id, number) in acked {
        by_shipment
            .entry(number.as_str())
            .or_default()
            .insert(scan_id.as_str());
    }
    // (tracking number, journey) -> (version, status, sub-status).
    let mut versions: HashMap<(String, u32), (u64, i32, i32)> = HashMap::new();
    for (number, ids) in &by_shipment {
        let latest = get_shipment(&mut tracking, number)
            .await
            .unwrap_or_else(|e| panic!("acked shipment {number} lost: {e}"));
        let mut stored: HashSet<String> = HashSet::new();
        for summary in &latest.journeys {
            let shipment = get_journey(&mut tracking, number, summary.journey)
                .await
                .unwrap_or_else(|e| panic!("{number}: journey {} lost: {e}", summary.journey));
            stored.extend(shipment.timeline.iter().map(|s| s.scan_id.clone()));
            // Each journey's stored state is what a fresh replay of its timeline derives.
            let replay = Derived::of(
                shipment
                    .timeline
                    .iter()
                    .map(|s| ScanType::from_i32(s.scan_type).expect("stored scan type")),
            );
            let point = replay.point.expect("a status");
            let journey = format!("{number} journey {}", summary.journey);
            assert_eq!(shipment.status, point.status.as_i32(), "{journey}");
            assert_eq!(
                shipment.sub_status,
                point.sub_status.map_or(0, ScanType::as_i32),
                "{journey}"
            );
            assert_eq!(
                shipment.scans_after_terminal, replay.scans_after_terminal,
                "{journey}"
            );
            versions.insert(
                (shipment.tracking_number.clone(), summary.journey),
                (shipment.version, shipment.status, shipment.sub_status),
            );
        }
        let lost: Vec<&&str> = ids.iter().filter(|id| !stored.contains(**id)).collect();
        assert!(lost.is_empty(), "{number}: acked scans lost: {lost:?}");
    }

    // The change log: sequences 1..=N without gaps, versions per journey 1..=v.
    let end = daemon.metric("scand_change_log_sequence") as u64;
    let mut feed = watch(&mut tracking, from, None).await;
    let mut expected_total = 0u64;
    let mut seen_versions: HashMap<(String, u32), u64> = HashMap::new();
    let mut last_status: HashMap<(String, u32), (i32, i32)> = HashMap::new();
    let mut sequence = from;
    while sequence < end {
        let change = tokio::time::timeout(Duration::from_secs(20), feed.message())
            .await
            .expect("the feed delivers the committed log")
            .expect("feed healthy")
            .expect("feed open");
        sequence += 1;
        assert_eq!(change.sequence, sequence, "sequence gap or repeat");
        let key = (change.tracking_number.clone(), change.journey);
        // Shipments older than `from` may continue their versions here; acked ones start at 1.
        let first_version = if versions.contains_key(&key) {
            0
        } else {
            change.version - 1
        };
        let v = seen_versions.entry(key.clone()).or_insert(first_version);
        assert_eq!(
            change.version,
            *v + 1,
            "{} journey {}: version gap or repeat",
            change.tracking_number,
            change.journey
        );
        *v = change.version;
        last_status.insert(key, (change.status, change.sub_status));
    }
    for ((number, journey), (version, status, sub_status)) in &versions {
        let key = (number.clone(), *journey);
        assert_eq!(
            seen_versions.get(&key),
            Some(version),
            "{number} journey {journey}: log and state disagree"
        );
        assert_eq!(
            last_status.get(&key),
            Some(&(*status, *sub_status)),
            "{number} journey {journey}"
        );
        expected_total += version;
    }
    assert!(sequence - from >= expected_total);
    sequence
}

/// Follows the change feed from a cursor, checking as it goes that sequences are contiguous;
/// ends when the stream breaks (the daemon was killed).
pub struct FeedFollower {
    pub seen: Arc<Mutex<Vec<u64>>>,
    task: tokio::task::JoinHandle<()>,
}

impl FeedFollower {
    pub fn start(daemon_url: String, after: u64) -> FeedFollower {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let out = seen.clone();
        let task = tokio::spawn(async move {
            let Ok(mut tracking) = TrackingClient::connect(daemon_url).await else {
                return;
            };
            let Ok(response) = tracking
                .watch_status_changes(pb::WatchRequest {
                    after_sequence: after,
                    tracking_number: None,
                })
                .await
            else {
                return;
            };
            let mut stream = response.into_inner();
            let mut last = after;
            while let Ok(Some(change)) = stream.message().await {
                assert_eq!(change.sequence, last + 1, "feed skipped or repeated");
                last = change.sequence;
                out.lock().expect("lock").push(last);
            }
        });
        FeedFollower { seen, task }
    }

    pub fn task_abort(&self) {
        self.task.abort();
    }

    /// The last sequence received (or `after` if none), once the stream has ended.
    pub async fn finish(self, after: u64) -> u64 {
        let _ = tokio::time::timeout(Duration::from_secs(10), self.task).await;
        let seen = self.seen.lock().expect("lock");
        seen.last().copied().unwrap_or(after)
    }
}
