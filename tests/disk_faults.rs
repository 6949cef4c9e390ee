//! Disk faults: the data directory on a small tmpfs that fills up. scand must stop acking and
//! say why (UNAVAILABLE to scanners, /readyz, metrics), lose and corrupt nothing, and take
//! scans again by itself once space returns.
//!
//! Needs root to mount the tmpfs (CI runs as root); elsewhere the test says so and passes.

mod common;

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::harness::{record_acks, submit_all, verify, workload, Acked};
use common::*;

/// Unmounts the tmpfs when the test ends, however it ends.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Option<Tmpfs> {
        std::fs::create_dir_all(at).expect("mount point");
        let mounted = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .status()
            .is_ok_and(|s| s.success());
        mounted.then(|| Tmpfs(at.to_owned()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Fills the file system holding `path` until it has no space left.
fn fill(path: &Path) {
    let mut ballast = std::fs::File::create(path).expect("ballast");
    let block = vec![0xa5u8; 64 * 1024];
    while ballast.write_all(&block).is_ok() {}
    let _ = ballast.sync_all();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_stops_acks_says_why_and_recovers_without_loss() {
    let dir = tempfile::tempdir().expect("tempdir");
    let Some(tmpfs) = Tmpfs::mount(&dir.path().join("disk"), "256m") else {
        eprintln!("SKIPPED: cannot mount a tmpfs here (needs root); CI runs this as root");
        return;
    };
    let data = tmpfs.0.join("data");
    let mut daemon = Daemon::start(&data, "");
    let acked: Acked = Arc::new(Mutex::new(HashMap::new()));
    submit_all(&daemon, &workload("DISK", 0, 100), &acked, "a").await;

    fill(&tmpfs.0.join("ballast"));
    // Keep scanning until the store refuses; every batch is either acked or refused whole.
    let mut ingest = daemon.ingest().await;
    let started = Instant::now();
    let mut refused = None;
    let mut round = 1;
    while refused.is_none() {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "writes kept succeeding on a full disk"
        );
        for (i, chunk) in workload("DISK", round, 50).chunks(50).enumerate() {
            match ingest
                .submit_scans(batch(&format!("full{round}-{i}"), chunk.to_vec()))
                .await
            {
                Ok(ack) => {
                    record_acks(&acked, chunk, &ack.into_inner());
                }
                Err(status) => {
                    refused = Some(status);
                    break;
                }
            }
        }
        round += 1;
    }
    let status = refused.expect("refused");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(
        status
            .message()
            .starts_with("store unavailable: store refuses writes (disk full or read-only?)")
            && status.message().contains("No space left on device"),
        "{}",
        status.message()
    );
    // Refused again at once while full, and the reason is on /readyz and in the metrics.
    let again = ingest
        .submit_scans(batch("again", workload("DISKX", 0, 1)))
        .await
        .expect_err("still full");
    assert_eq!(again.code(), tonic::Code::Unavailable);
    let (code, body) = http_get(daemon.admin, "/readyz").expect("readyz");
    assert_eq!(code, 503);
    assert!(
        body.starts_with("not ready: store refuses writes:"),
        "{body}"
    );
    assert_eq!(daemon.metric("scand_store_writable"), 0.0);
    assert_eq!(daemon.metric("scand_ready"), 0.0);
    assert!(daemon.metric("scand_store_write_errors_total") >= 1.0);

    // Space returns: scand notices by itself and takes scans again.
    std::fs::remove_file(tmpfs.0.join("ballast")).expect("free space");
    let deadline = Instant::now() + Duration::from_secs(60);
    while http_get(daemon.admin, "/readyz").map(|(c, _)| c) != Some(200) {
        assert!(
            Instant::now() < deadline,
            "scand did not recover after space returned"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(daemon.metric("scand_store_writable"), 1.0);
    submit_all(&daemon, &workload("DISK", 900, 50), &acked, "after").await;
    let acked_now = acked.lock().expect("lock").clone();
    verify(&daemon, &acked_now).await;

    // And nothing is corrupt on disk: a restart after SIGKILL reads it all back.
    daemon.kill();
    let daemon = daemon.restart();
    verify(&daemon, &acked_now).await;
}
