//! Health as systemd and Kubernetes see it, against the real daemon: `READY=1` once serving,
//! `WATCHDOG=1` while the store pipeline answers its checks, `STOPPING=1` on SIGTERM, over a
//! real `NOTIFY_SOCKET`; `/healthz` answering while the pipeline does.

mod common;

use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use common::{http_get, Daemon};

/// The notifications received on `socket` until `wanted` came (or `within` passed).
fn notifications_until(socket: &UnixDatagram, wanted: &str, within: Duration) -> Vec<String> {
    let deadline = Instant::now() + within;
    let mut received = Vec::new();
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        match socket.recv(&mut buf) {
            Ok(n) => {
                let message = String::from_utf8_lossy(&buf[..n]).into_owned();
                let done = message.lines().any(|line| line == wanted);
                received.push(message);
                if done {
                    break;
                }
            }
            Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(error) if error.kind() == std::io::ErrorKind::TimedOut => {}
            Err(error) => panic!("notify socket: {error}"),
        }
    }
    received
}

#[tokio::test]
async fn systemd_hears_ready_then_watchdog_pets_then_stopping() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket_path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).expect("bind the notify socket");
    socket
        .set_read_timeout(Some(Duration::from_millis(200)))
        .expect("timeout");
    let socket_path = socket_path.to_str().expect("utf-8 path").to_owned();
    // A 2 s watchdog: systemd expects a pet at least every 2 s; scand pets every second.
    let mut daemon = Daemon::start_with_env(
        &dir.path().join("data"),
        "",
        &[
            ("NOTIFY_SOCKET", &socket_path),
            ("WATCHDOG_USEC", "2000000"),
        ],
    );
    let ready = notifications_until(&socket, "READY=1", Duration::from_secs(10));
    assert!(
        ready.iter().any(|m| m.lines().any(|l| l == "READY=1")),
        "{ready:?}"
    );
    let pets = notifications_until(&socket, "WATCHDOG=1", Duration::from_secs(10));
    assert!(
        pets.iter().any(|m| m.lines().any(|l| l == "WATCHDOG=1")),
        "no watchdog pet within 10 s: {pets:?}"
    );
    let second = notifications_until(&socket, "WATCHDOG=1", Duration::from_secs(10));
    assert!(
        second.iter().any(|m| m.lines().any(|l| l == "WATCHDOG=1")),
        "the watchdog is pet again: {second:?}"
    );
    assert_eq!(
        http_get(daemon.admin, "/healthz"),
        Some((200, "ok\n".to_owned()))
    );
    let status = daemon.terminate().await;
    assert!(status.success(), "a clean stop exits 0: {status}");
    let stopping = notifications_until(&socket, "STOPPING=1", Duration::from_secs(5));
    assert!(
        stopping
            .iter()
            .any(|m| m.lines().any(|l| l == "STOPPING=1")),
        "{stopping:?}"
    );
}

/// The gRPC server's accept loop dies (a fail point stands in for a panic): the daemon stops on
/// its own, with a non-zero status a service manager restarts it for.
#[tokio::test]
#[cfg_attr(
    not(feature = "failpoints"),
    ignore = "needs the failpoints feature: cargo test --features scand/failpoints"
)]
async fn a_dead_grpc_server_stops_the_daemon_with_a_failure_status() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut daemon = Daemon::start_with_env(
        &dir.path().join("data"),
        "",
        &[("FAILPOINTS", "grpc-accept-loop-ends=return")],
    );
    assert_eq!(
        http_get(daemon.admin, "/healthz").map(|(code, _)| code),
        Some(200)
    );
    // The first connection meets the dead loop.
    let _ = tonic::transport::Channel::from_shared(daemon.url())
        .expect("url")
        .connect()
        .await;
    let status = daemon
        .exit_status(Duration::from_secs(30), "with its gRPC server gone")
        .await;
    assert_eq!(
        status.code(),
        Some(1),
        "a fatal stop is a failure: {status}"
    );
}

/// The WAL syncer dies (a fail point stands in for a panic): nothing is acknowledged any more,
/// the pipeline check notices, and the daemon stops with a failure status.
#[tokio::test]
#[cfg_attr(
    not(feature = "failpoints"),
    ignore = "needs the failpoints feature: cargo test --features scand/failpoints"
)]
async fn a_dead_wal_syncer_stops_the_daemon_with_a_failure_status() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut daemon = Daemon::start_with_env(
        &dir.path().join("data"),
        "",
        &[("FAILPOINTS", "wal-syncer-stops=return")],
    );
    let mut ingest = daemon.ingest().await;
    let unacked = ingest
        .submit_scans(common::batch("lost", common::journey("SYNCER0001", "s")))
        .await
        .expect_err("nothing is acknowledged without its sync");
    assert_eq!(unacked.code(), tonic::Code::Unavailable, "{unacked:?}");
    let status = daemon
        .exit_status(Duration::from_secs(40), "with its syncer gone")
        .await;
    assert_eq!(status.code(), Some(1), "{status}");
}
