//! Admin HTTP: `/metrics` in the Prometheus text format, `/healthz` (the process answers) and
//! `/readyz` (the store is open, takes writes, and the gRPC services listen).

use std::net::SocketAddr;
use std::sync::{
    atomic::{AtomicBool, Ordering},
    Arc, Mutex,
};

use axum::{extract::State, http::StatusCode, routing::get, Router};
use metrics_exporter_prometheus::PrometheusHandle;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Readiness, read by `/readyz` and exported as `scand_ready`: the daemon says when it
/// serves, the store writer when the store refuses writes.
#[derive(Clone, Default)]
pub struct Readiness {
    serving: Arc<AtomicBool>,
    store_failure: Arc<Mutex<Option<String>>>,
}

impl Readiness {
    pub fn set(&self, serving: bool) {
        self.serving.store(serving, Ordering::SeqCst);
        self.export();
    }

    /// Why the store refuses writes, or `None` once it takes them again.
    pub fn set_store_failure(&self, failure: Option<String>) {
        if let Ok(mut slot) = self.store_failure.lock() {
            *slot = failure;
        }
        self.export();
    }

    pub fn is_ready(&self) -> bool {
        self.not_ready_because().is_none()
    }

    fn not_ready_because(&self) -> Option<String> {
        if !self.serving.load(Ordering::SeqCst) {
            return Some("starting or stopping".to_owned());
        }
        let failure = self.store_failure.lock().ok()?.clone()?;
        Some(format!("store refuses writes: {failure}"))
    }

    fn export(&self) {
        let ready = if self.is_ready() { 1.0 } else { 0.0 };
        ::metrics::gauge!(super::metrics::READY).set(ready);
    }
}

#[derive(Clone)]
struct AdminState {
    metrics: PrometheusHandle,
    readiness: Readiness,
}

/// Serves until `shutdown` is cancelled.
pub async fn serve(
    listener: TcpListener,
    metrics: PrometheusHandle,
    readiness: Readiness,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(render_metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .with_state(AdminState { metrics, readiness });
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
}

async fn render_metrics(State(state): State<AdminState>) -> String {
    state.metrics.render()
}

async fn ready(State(state): State<AdminState>) -> (StatusCode, String) {
    match state.readiness.not_ready_because() {
        None => (StatusCode::OK, "ready\n".to_owned()),
        Some(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {reason}\n"),
        ),
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Address of the HTTP endpoint serving /metrics, /healthz and /readyz.
    pub listen: SocketAddr,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 9464)),
        }
    }
}
