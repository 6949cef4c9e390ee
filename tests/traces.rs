//! OpenTelemetry traces over OTLP, received by a real OTLP/gRPC trace receiver in this test:
//! with `OTEL_EXPORTER_OTLP_ENDPOINT` set, a scan batch is one span from receipt to its answer,
//! with the writer's group commit and WAL sync of it as children; `OTEL_SDK_DISABLED=true`
//! sends nothing.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{batch, free_port, journey, Daemon};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::trace::v1::Span;

/// Every span exported to it.
#[derive(Clone, Default)]
struct Receiver {
    spans: Arc<Mutex<Vec<Span>>>,
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let spans = request
            .into_inner()
            .resource_spans
            .into_iter()
            .flat_map(|r| r.scope_spans)
            .flat_map(|s| s.spans);
        self.spans.lock().expect("lock").extend(spans);
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

/// A receiver serving on a free port of this machine, and its address.
async fn receiver() -> (Receiver, String) {
    let receiver = Receiver::default();
    let port = free_port();
    let server = tonic::transport::Server::builder()
        .add_service(TraceServiceServer::new(receiver.clone()))
        .serve(([127, 0, 0, 1], port).into());
    tokio::spawn(server);
    (receiver, format!("http://127.0.0.1:{port}"))
}

/// A daemon exporting to a fresh receiver (exports every 100 ms), with `env` besides, after
/// one batch it acknowledged.
async fn one_batch_exported_with(env: &[(&str, &str)]) -> (Receiver, Daemon, tempfile::TempDir) {
    let (receiver, endpoint) = receiver().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut all = vec![
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
        ("OTEL_BSP_SCHEDULE_DELAY", "100"),
    ];
    all.extend_from_slice(env);
    let daemon = Daemon::start_with_env(&dir.path().join("data"), "", &all);
    let mut ingest = daemon.ingest().await;
    ingest
        .submit_scans(batch("traced-1", journey("TRACED0001", "t")))
        .await
        .expect("ack");
    (receiver, daemon, dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_is_one_span_with_its_group_commit_and_sync_as_children() {
    let (receiver, _daemon, _dir) =
        one_batch_exported_with(&[("OTEL_SERVICE_NAME", "scand-under-test")]).await;

    let deadline = Instant::now() + Duration::from_secs(20);
    let (batch_span, children) = loop {
        let spans = receiver.spans.lock().expect("lock").clone();
        let batch_span = spans.iter().find(|s| s.name == "scan_batch").cloned();
        if let Some(batch_span) = batch_span {
            let children: HashMap<String, Span> = spans
                .iter()
                .filter(|s| s.parent_span_id == batch_span.span_id)
                .map(|s| (s.name.clone(), s.clone()))
                .collect();
            if children.contains_key("group_commit") && children.contains_key("wal_sync") {
                break (batch_span, children);
            }
        }
        assert!(
            Instant::now() < deadline,
            "no batch span with its children: {spans:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    for child in children.values() {
        assert_eq!(child.trace_id, batch_span.trace_id);
        assert!(child.start_time_unix_nano >= batch_span.start_time_unix_nano);
        assert!(child.end_time_unix_nano <= batch_span.end_time_unix_nano);
    }
    assert!(
        batch_span.attributes.iter().any(|kv| kv.key == "batch_id"),
        "{batch_span:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sdk_switched_off_exports_nothing() {
    let (receiver, _daemon, _dir) = one_batch_exported_with(&[("OTEL_SDK_DISABLED", "true")]).await;
    // Ten times the export interval the first test sees its spans within.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(receiver.spans.lock().expect("lock").is_empty());
}
