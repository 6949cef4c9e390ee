//! Shared helpers for integration tests: start the real `scand` binary on free ports with a
//! temporary data directory, connect generated gRPC clients, build realistic scans.
#![allow(dead_code)]

pub mod harness;
pub mod kafka;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use scand::proto::pb;
use tonic::transport::Channel;

pub type IngestClient = pb::scan_ingest_client::ScanIngestClient<Channel>;
pub type TrackingClient = pb::tracking_client::TrackingClient<Channel>;

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// A running `scand run` process.
pub struct Daemon {
    pub child: Child,
    pub grpc: SocketAddr,
    pub admin: SocketAddr,
    pub data: PathBuf,
    config: PathBuf,
    env: Vec<(String, String)>,
}

impl Daemon {
    /// Starts scand on `data` with `extra` TOML appended to the test config.
    pub fn start(data: &Path, extra: &str) -> Daemon {
        Self::start_with_env(data, extra, &[])
    }

    /// Like [`Daemon::start`], with `SCAND_*` overrides in the environment.
    pub fn start_with_env(data: &Path, extra: &str, env: &[(&str, &str)]) -> Daemon {
        let grpc = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let config = data.with_extension("toml");
        let toml = format!(
            "[grpc]\nlisten = \"{grpc}\"\nshutdown_grace = \"5s\"\n[admin]\nlisten = \"{admin}\"\n\
             [store]\npath = \"{}\"\nmemtable_bytes = 4194304\n{extra}\n",
            data.display()
        );
        std::fs::write(&config, toml).expect("write config");
        let env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Self::spawn(grpc, admin, data.to_owned(), config, env)
    }

    fn spawn(
        grpc: SocketAddr,
        admin: SocketAddr,
        data: PathBuf,
        config: PathBuf,
        env: Vec<(String, String)>,
    ) -> Daemon {
        let mut daemon = Self::launch(grpc, admin, data, config, env);
        daemon.wait_ready();
        daemon
    }

    fn launch(
        grpc: SocketAddr,
        admin: SocketAddr,
        data: PathBuf,
        config: PathBuf,
        env: Vec<(String, String)>,
    ) -> Daemon {
        let child = Command::new(env!("CARGO_BIN_EXE_scand"))
            .args(["run", "--config"])
            .arg(&config)
            .env(
                "RUST_LOG",
                std::env::var("TEST_SCAND_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn scand");
        Daemon {
            child,
            grpc,
            admin,
            data,
            config,
            env,
        }
    }

    /// Starts again on the same ports, data and config.
    pub fn restart(self) -> Daemon {
        let mut daemon = self.relaunch();
        daemon.wait_ready();
        daemon
    }

    /// Stops this process and starts another on the same ports, data, config and
    /// environment, without waiting for it.
    fn relaunch(self) -> Daemon {
        let (grpc, admin, data, config, env) = (
            self.grpc,
            self.admin,
            self.data.clone(),
            self.config.clone(),
            self.env.clone(),
        );
        drop(self);
        Self::launch(grpc, admin, data, config, env)
    }

    /// Starts again on the same ports, data and config, with `env` set on top.
    pub fn restart_with_env(mut self, env: &[(&str, &str)]) -> Daemon {
        self.set_env(env);
        self.restart()
    }

    /// Starts again with `env` on top (a fail point that ends the process) and waits, not
    /// for readiness, but for the process to end by itself; returns its exit status.
    pub async fn restart_until_exit(
        mut self,
        env: &[(&str, &str)],
        within: Duration,
    ) -> (Daemon, std::process::ExitStatus) {
        self.set_env(env);
        let mut daemon = self.relaunch();
        let status = daemon.exit_status(within, "by itself").await;
        (daemon, status)
    }

    fn set_env(&mut self, env: &[(&str, &str)]) {
        for (key, value) in env {
            self.env.retain(|(k, _)| k != key);
            self.env.push((key.to_string(), value.to_string()));
        }
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("scand exited before it was ready: {status}");
            }
            if http_get(self.admin, "/readyz").is_some_and(|(code, _)| code == 200) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("scand did not become ready on {}", self.admin);
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.grpc)
    }

    pub async fn ingest(&self) -> IngestClient {
        IngestClient::connect(self.url())
            .await
            .expect("connect ScanIngest")
    }

    pub async fn tracking(&self) -> TrackingClient {
        TrackingClient::connect(self.url())
            .await
            .expect("connect Tracking")
    }

    pub fn metrics(&self) -> String {
        http_get(self.admin, "/metrics").expect("metrics").1
    }

    /// Scrapes until every one of `lines` shows (or `within` passed) and returns the last
    /// scrape: for series that appear a while after what causes them (librdkafka's statistics).
    pub async fn metrics_showing(&self, lines: &[&str], within: Duration) -> String {
        let deadline = Instant::now() + within;
        loop {
            let metrics = self.metrics();
            if lines.iter().all(|line| metrics.contains(line)) || Instant::now() >= deadline {
                return metrics;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// One series' value: `name` alone, or with its labels as rendered (`name{label="x"}`).
    pub fn metric(&self, series: &str) -> f64 {
        self.metrics()
            .lines()
            .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("metric {series} not exported"))
    }

    /// The sum of every series of a metric, whatever its labels.
    pub fn metric_sum(&self, name: &str) -> f64 {
        self.metrics()
            .lines()
            .filter(|l| {
                l.starts_with(name) && matches!(l.as_bytes().get(name.len()), Some(b' ' | b'{'))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// SIGKILL: no shutdown code runs.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then waits for the exit status (yielding, so clients in this runtime can
    /// answer the server's GOAWAY).
    pub async fn terminate(&mut self) -> std::process::ExitStatus {
        Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("send SIGTERM");
        self.exit_status(Duration::from_secs(30), "after SIGTERM")
            .await
    }

    /// Waits for the process to exit by itself within `within` (yielding meanwhile).
    pub async fn exit_status(&mut self, within: Duration, when: &str) -> std::process::ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status;
            }
            assert!(Instant::now() < deadline, "scand did not exit {when}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A minimal HTTP/1.0 GET: status code and body.
pub fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let code = response.split_whitespace().nth(1)?.parse().ok()?;
    let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_owned())?;
    Some((code, body))
}

pub fn timestamp(t: SystemTime) -> prost_types::Timestamp {
    prost_types::Timestamp::from(t)
}

/// `minutes_ago` before now, on the minute grid (so fingerprint windows are predictable).
pub fn minutes_ago(minutes_ago: u64) -> prost_types::Timestamp {
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs();
    let minute = now / 60 * 60 - minutes_ago * 60;
    prost_types::Timestamp {
        seconds: minute as i64,
        nanos: 0,
    }
}

pub fn scan(
    id: &str,
    tracking_number: &str,
    scan_type: pb::ScanType,
    at: prost_types::Timestamp,
    facility: &str,
) -> pb::Scan {
    pb::Scan {
        scan_id: id.to_owned(),
        tracking_number: tracking_number.to_owned(),
        scan_type: scan_type as i32,
        event_time: Some(at),
        location: Some(pb::Location {
            facility_id: facility.to_owned(),
            kind: pb::LocationKind::SortingFacility as i32,
            latitude: None,
            longitude: None,
        }),
        device_id: "handheld-7".to_owned(),
        source: pb::Source::Handheld as i32,
        ..Default::default()
    }
}

pub fn batch(id: &str, scans: Vec<pb::Scan>) -> pb::ScanBatch {
    pb::ScanBatch {
        batch_id: id.to_owned(),
        scans,
    }
}

pub fn outcomes(ack: &pb::BatchAck) -> Vec<pb::Outcome> {
    ack.results
        .iter()
        .map(|r| pb::Outcome::try_from(r.outcome).expect("known outcome"))
        .collect()
}

/// The standard journey of one parcel: (scan type, minutes ago, facility).
pub const JOURNEY: [(pb::ScanType, u64, &str); 8] = [
    (pb::ScanType::LabelCreated, 600, "shop-1"),
    (pb::ScanType::Picked, 590, "wh-1"),
    (pb::ScanType::Packed, 580, "wh-1"),
    (pb::ScanType::PickedUp, 500, "wh-1"),
    (pb::ScanType::ArrivedAtFacility, 400, "hub-1"),
    (pb::ScanType::DepartedFacility, 300, "hub-1"),
    (pb::ScanType::OutForDelivery, 100, "van-9"),
    (pb::ScanType::Delivered, 30, "door"),
];

pub fn journey(tracking_number: &str, prefix: &str) -> Vec<pb::Scan> {
    JOURNEY
        .iter()
        .enumerate()
        .map(|(i, (t, ago, facility))| {
            scan(
                &format!("{prefix}-{i}"),
                tracking_number,
                *t,
                minutes_ago(*ago),
                facility,
            )
        })
        .collect()
}

/// Opens the change feed after `after_sequence`, optionally for one shipment.
pub async fn watch(
    tracking: &mut TrackingClient,
    after_sequence: u64,
    tracking_number: Option<String>,
) -> tonic::Streaming<pb::StatusChange> {
    tracking
        .watch_status_changes(pb::WatchRequest {
            after_sequence,
            tracking_number,
        })
        .await
        .expect("feed")
        .into_inner()
}

/// GetShipment by tracking number: its latest journey.
pub async fn get_shipment(
    tracking: &mut TrackingClient,
    tracking_number: &str,
) -> Result<pb::Shipment, tonic::Status> {
    get_journey(tracking, tracking_number, 0).await
}

/// GetShipment of one journey of a tracking number (0: the latest).
pub async fn get_journey(
    tracking: &mut TrackingClient,
    tracking_number: &str,
    journey: u32,
) -> Result<pb::Shipment, tonic::Status> {
    tracking
        .get_shipment(pb::GetShipmentRequest {
            tracking_number: tracking_number.to_owned(),
            journey,
        })
        .await
        .map(tonic::Response::into_inner)
}

/// The scan ids of every journey of a tracking number (none if it has no scans).
pub async fn scan_ids(tracking: &mut TrackingClient, tracking_number: &str) -> Vec<String> {
    let Ok(latest) = get_shipment(tracking, tracking_number).await else {
        return Vec::new();
    };
    let mut ids = Vec::new();
    for summary in &latest.journeys {
        if let Ok(journey) = get_journey(tracking, tracking_number, summary.journey).await {
            ids.extend(journey.timeline.into_iter().map(|s| s.scan_id));
        }
    }
    ids
}

/// Collects `n` changes from a feed stream, failing after a timeout.
pub async fn take_changes(
    stream: &mut tonic::Streaming<pb::StatusChange>,
    n: usize,
) -> Vec<pb::StatusChange> {
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let next = tokio::time::timeout(Duration::from_secs(20), stream.message())
            .await
            .expect("feed delivered in time")
            .expect("feed healthy")
            .expect("feed open");
        out.push(next);
    }
    out
}
