//! Overload and abuse: offered load beyond what the writer sustains, a feed subscriber that
//! stops reading, and more connections than allowed. Memory stays bounded, callers see
//! backpressure or RESOURCE_EXHAUSTED with a reason, and nothing acked is lost.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::harness::{self, record_acks, verify, workload, Acked};
use common::*;
use scand::proto::pb;
use tokio_stream::wrappers::ReceiverStream;

/// Peak resident set of a process, in MiB (VmHWM).
fn peak_rss_mib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kib| kib / 1024)
        .expect("VmHWM")
}

/// Streams all `batches`; the stream must stay healthy under overload.
async fn stream_batches(daemon_url: String, batches: Vec<pb::ScanBatch>, acked: Acked) -> u64 {
    let (count, ended) = harness::stream_batches(daemon_url, batches, acked).await;
    ended.expect("stream healthy under overload");
    count as u64
}

fn batches(prefix: &str, round: u64, shipments: usize, size: usize) -> Vec<pb::ScanBatch> {
    workload(prefix, round, shipments)
        .chunks(size)
        .enumerate()
        .map(|(i, c)| batch(&format!("{prefix}{round}-{i}"), c.to_vec()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_times_peak_load_keeps_memory_bounded_and_refuses_with_a_reason() {
    // Small against what the load below puts in flight: with 1 MiB, a writer fast enough
    // (one key a scan) kept the in-flight bytes 13 KB under it and nothing was refused.
    const BUDGET: u64 = 256 * 1024;
    let dir = tempfile::tempdir().expect("tempdir");
    let daemon = Daemon::start_with_env(
        &dir.path().join("data"),
        &format!("[ingest]\nmax_in_flight_bytes = {BUDGET}\nadmission_timeout = \"50ms\"\n"),
        &[("SCAND_GRPC__MAX_MESSAGE_BYTES", &BUDGET.to_string())],
    );
    let pid = daemon.child.id();
    let acked: Acked = Arc::new(Mutex::new(HashMap::new()));

    // The peak this build sustains here: 4 streams, closed loop.
    let started = Instant::now();
    let mut peak_runs = Vec::new();
    for stream in 0..4 {
        peak_runs.push(tokio::spawn(stream_batches(
            daemon.url(),
            batches("PEAK", stream, 250, 200),
            acked.clone(),
        )));
    }
    let mut peak_scans = 0;
    for run in peak_runs {
        peak_scans += run.await.expect("peak stream");
    }
    let peak = peak_scans as f64 / started.elapsed().as_secs_f64();
    let rss_at_peak = peak_rss_mib(pid);

    // Three times that, open loop: unary calls fired on a schedule whether or not earlier
    // ones were answered, plus unpaced streams. Eight of them: with four, a writer fast
    // enough kept the in-flight bytes a few kilobytes under the budget.
    let offered = 3.0 * peak;
    let batch_size = 200;
    let unary = batches("OVER", 0, 5000, batch_size);
    let interval = Duration::from_secs_f64(batch_size as f64 / offered);
    let overloaded = Arc::new(AtomicU64::new(0));
    let answered = Arc::new(AtomicU64::new(0));
    let in_flight_seen = Arc::new(AtomicU64::new(0));
    let sampler = {
        let admin = daemon.admin;
        let in_flight_seen = in_flight_seen.clone();
        tokio::spawn(async move {
            loop {
                if let Some((_, body)) = http_get(admin, "/metrics") {
                    let value = body
                        .lines()
                        .find_map(|l| l.strip_prefix("scand_ingest_in_flight_bytes "))
                        .and_then(|v| v.parse::<f64>().ok())
                        .unwrap_or(0.0);
                    in_flight_seen.fetch_max(value as u64, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    let streams: Vec<_> = (0..8)
        .map(|s| {
            tokio::spawn(stream_batches(
                daemon.url(),
                batches("FLOOD", s, 500, batch_size),
                acked.clone(),
            ))
        })
        .collect();
    let client = daemon.ingest().await;
    let mut ticks = tokio::time::interval(interval);
    let mut calls = Vec::new();
    for b in unary {
        ticks.tick().await;
        let (mut client, acked, overloaded, answered) = (
            client.clone(),
            acked.clone(),
            overloaded.clone(),
            answered.clone(),
        );
        calls.push(tokio::spawn(async move {
            let scans = b.scans.clone();
            match client.submit_scans(b).await {
                Ok(ack) => {
                    record_acks(&acked, &scans, &ack.into_inner());
                    answered.fetch_add(1, Ordering::Relaxed);
                }
                Err(status) => {
                    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
                    assert!(
                        status.message().starts_with(&format!(
                            "scand is overloaded: {BUDGET} bytes of scans are already waiting \
                             to be stored (ingest.max_in_flight_bytes); nothing of this batch \
                             was stored, retry with backoff"
                        )),
                        "{}",
                        status.message()
                    );
                    overloaded.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    for call in calls {
        call.await.expect("unary call");
    }
    for stream in streams {
        stream.await.expect("stream under overload");
    }
    sampler.abort();
    let rss_overloaded = peak_rss_mib(pid);
    eprintln!(
        "peak {peak:.0} scans/s; offered {offered:.0}/s: {} unary answered, {} RESOURCE_EXHAUSTED; \
         in flight at most {} bytes; peak RSS {rss_at_peak} MiB at peak, {rss_overloaded} MiB after",
        answered.load(Ordering::Relaxed),
        overloaded.load(Ordering::Relaxed),
        in_flight_seen.load(Ordering::Relaxed),
    );
    assert!(
        overloaded.load(Ordering::Relaxed) > 0,
        "3x peak never hit the in-flight budget"
    );
    assert!(in_flight_seen.load(Ordering::Relaxed) <= BUDGET);
    // Bounded: what overload adds is the budget plus decoded requests waiting for admission,
    // not the backlog of everything offered.
    assert!(
        rss_overloaded <= rss_at_peak + 256,
        "RSS grew from {rss_at_peak} MiB to {rss_overloaded} MiB under overload"
    );
    let acked = acked.lock().expect("lock").clone();
    verify(&daemon, &acked).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_feed_subscriber_that_stops_reading_is_cut_off_and_resumes_from_its_cursor() {
    let dir = tempfile::tempdir().expect("tempdir");
    let daemon = Daemon::start(
        &dir.path().join("data"),
        "[feed]\nsubscriber_buffer = 16\nstalled_subscriber_timeout = \"1s\"\n",
    );
    // A subscriber with a small HTTP/2 window that reads nothing.
    let channel = tonic::transport::Endpoint::from_shared(daemon.url())
        .expect("uri")
        .initial_stream_window_size(65_535)
        .connect()
        .await
        .expect("connect");
    let mut tracking = pb::tracking_client::TrackingClient::new(channel);
    let mut stalled = watch(&mut tracking, 0, None).await;

    let mut ingest = daemon.ingest().await;
    for (i, chunk) in workload("FEED", 0, 600).chunks(500).enumerate() {
        ingest
            .submit_scans(batch(&format!("f{i}"), chunk.to_vec()))
            .await
            .expect("stored");
    }
    let total = daemon.metric("scand_change_log_sequence") as u64;
    assert!(total >= 1000, "{total} changes");
    let deadline = Instant::now() + Duration::from_secs(30);
    while daemon.metric("scand_feed_subscribers_cut_off_total") < 1.0 {
        assert!(
            Instant::now() < deadline,
            "stalled subscriber never cut off"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(daemon.metric("scand_feed_subscribers"), 0.0);

    // It reads what reached it, then the reason; resuming after the last one completes the log.
    let mut received = Vec::new();
    let status = loop {
        match stalled.message().await {
            Ok(Some(change)) => received.push(change.sequence),
            Ok(None) => panic!("stream ended without a status"),
            Err(status) => break status,
        }
    };
    assert_eq!(status.code(), tonic::Code::ResourceExhausted);
    assert_eq!(
        status.message(),
        "subscriber took no change for 1s while changes were waiting; cut off to free the \
         server. Resume with after_sequence = the last sequence you received"
    );
    assert!(
        (received.len() as u64) < total,
        "the cut-off came before the end"
    );
    let last = received.last().copied().unwrap_or(0);
    let mut resumed = watch(&mut tracking, last, None).await;
    let rest = take_changes(&mut resumed, (total - last) as usize).await;
    received.extend(rest.iter().map(|c| c.sequence));
    assert_eq!(received, (1..=total).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_limit_wait_until_one_closes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let daemon = Daemon::start_with_env(
        &dir.path().join("data"),
        "",
        &[("SCAND_GRPC__MAX_CONNECTIONS", "2")],
    );
    let mut first = daemon.tracking().await;
    let mut second = daemon.tracking().await;
    for client in [&mut first, &mut second] {
        let missing = get_shipment(client, "NOSUCHPARCEL")
            .await
            .expect_err("none");
        assert_eq!(missing.code(), tonic::Code::NotFound);
    }
    assert_eq!(daemon.metric("scand_grpc_connections"), 2.0);

    let url = daemon.url();
    let third = tokio::spawn(async move {
        let mut client = pb::tracking_client::TrackingClient::connect(url)
            .await
            .expect("connects once a place is free");
        get_shipment(&mut client, "NOSUCHPARCEL").await
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!third.is_finished(), "a third connection was served");
    drop(first);
    let answer = tokio::time::timeout(Duration::from_secs(20), third)
        .await
        .expect("served after a connection closed")
        .expect("task");
    assert_eq!(answer.expect_err("none").code(), tonic::Code::NotFound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scanner_that_stops_reading_acks_holds_no_share_of_the_in_flight_budget() {
    let dir = tempfile::tempdir().expect("tempdir");
    let daemon = Daemon::start_with_env(
        &dir.path().join("data"),
        "[ingest]\nmax_in_flight_bytes = 1048576\nadmission_timeout = \"2s\"\n",
        &[("SCAND_GRPC__MAX_MESSAGE_BYTES", "1048576")],
    );
    // ~90 KiB batches: if the stalled stream's stored batches still counted, its dozen or so
    // would fill the 1 MiB budget and every other caller would be refused.
    let stalled_batches = batches("STALL", 0, 1200, 800);
    let stored_before_stall = stalled_batches.len();
    let (tx, rx) = tokio::sync::mpsc::channel(stored_before_stall);
    for b in stalled_batches {
        tx.send(b).await.expect("queued");
    }
    let mut stalled_client = daemon.ingest().await;
    let _acks_never_read = stalled_client
        .stream_scans(ReceiverStream::new(rx))
        .await
        .expect("stream");
    // Its batches are stored although nobody reads their acks, and once stored they no longer
    // count against the budget.
    let deadline = Instant::now() + Duration::from_secs(60);
    while daemon.metric_sum("scand_scans_accepted_total") < 2000.0
        || daemon.metric("scand_ingest_in_flight_bytes") >= 1048576.0 / 2.0
    {
        assert!(
            Instant::now() < deadline,
            "the stalled stream's stored batches still hold the in-flight budget"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let acked: Acked = Arc::new(Mutex::new(HashMap::new()));
    let mut other = daemon.ingest().await;
    for b in batches("OTHER", 0, 200, 200) {
        let scans = b.scans.clone();
        let ack = other
            .submit_scans(b)
            .await
            .expect("another scanner is not blocked by the stalled one");
        record_acks(&acked, &scans, &ack.into_inner());
    }
    let acked = acked.lock().expect("lock").clone();
    verify(&daemon, &acked).await;
    drop(tx);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_beyond_the_per_connection_limit_wait_until_one_ends() {
    let dir = tempfile::tempdir().expect("tempdir");
    let daemon = Daemon::start_with_env(
        &dir.path().join("data"),
        "",
        &[("SCAND_GRPC__MAX_CONCURRENT_STREAMS", "2")],
    );
    // One connection: two open feed streams use up its streams.
    let mut tracking = daemon.tracking().await;
    let first = watch(&mut tracking, 0, None).await;
    let _second = watch(&mut tracking, 0, None).await;
    let mut third_client = tracking.clone();
    let third = tokio::spawn(async move { get_shipment(&mut third_client, "NOSUCHPARCEL").await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !third.is_finished(),
        "a third stream was served on the connection"
    );
    drop(first);
    let answer = tokio::time::timeout(Duration::from_secs(20), third)
        .await
        .expect("served once a stream ended")
        .expect("task");
    assert_eq!(answer.expect_err("none").code(), tonic::Code::NotFound);
}
