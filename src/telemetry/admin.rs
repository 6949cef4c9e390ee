//! Admin HTTP: `/metrics` in the Prometheus text format, `/healthz` (the process is alive: its
//! gRPC server runs and its store pipeline answers) and `/readyz` (the store is open, takes
//! writes, the gRPC services listen, and no Kafka output has failed for longer than it may).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{
    atomic::{AtomicBool, Ordering},
    Arc, Mutex,
};
use std::time::{Duration, Instant};

use axum::{extract::State, http::StatusCode, routing::get, Router};
use metrics_exporter_prometheus::PrometheusHandle;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Readiness, read by `/readyz` and exported as `scand_ready`: the daemon says when it
/// serves, the store writer when the store refuses writes, and each Kafka output (the
/// changelog, the status topic) when its writes have failed for longer than it may.
#[derive(Clone, Default)]
pub struct Readiness {
    serving: Arc<AtomicBool>,
    store_failure: Arc<Mutex<Option<String>>>,
    outputs: Arc<Mutex<BTreeMap<&'static str, OutputFailure>>>,
}

/// An output failing since `since`, with its last error.
struct OutputFailure {
    since: Instant,
    reason: String,
    unready_after: Duration,
}

/// One output's say in readiness: each write reports whether it went through; after
/// `unready_after` of nothing but failures the daemon is not ready, with the last error.
#[derive(Clone)]
pub struct OutputHealth {
    readiness: Readiness,
    name: &'static str,
    unready_after: Duration,
}

impl OutputHealth {
    pub fn delivered(&self) {
        let cleared = lock(&self.readiness.outputs).remove(self.name).is_some();
        if cleared {
            tracing::warn!(output = self.name, "writes go through again");
            self.readiness.export();
        }
    }

    pub fn failed(&self, error: &dyn std::fmt::Display) {
        let reason = error.to_string();
        lock(&self.readiness.outputs)
            .entry(self.name)
            .and_modify(|failure| failure.reason.clone_from(&reason))
            .or_insert_with(|| OutputFailure {
                since: Instant::now(),
                reason,
                unready_after: self.unready_after,
            });
        self.readiness.export();
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Readiness {
    /// The readiness handle of an output named `name` (as `/readyz` will say it).
    pub fn output(&self, name: &'static str, unready_after: Duration) -> OutputHealth {
        OutputHealth {
            readiness: self.clone(),
            name,
            unready_after,
        }
    }

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
        if let Some(failure) = lock(&self.store_failure).clone() {
            return Some(format!("store refuses writes: {failure}"));
        }
        lock(&self.outputs).iter().find_map(|(name, failure)| {
            let failing = failure.since.elapsed();
            (failing >= failure.unready_after).then(|| {
                format!(
                    "{name} writes have failed for {}s: {}",
                    failing.as_secs(),
                    failure.reason
                )
            })
        })
    }

    fn export(&self) {
        let ready = if self.is_ready() { 1.0 } else { 0.0 };
        ::metrics::gauge!(super::metrics::READY).set(ready);
    }
}

/// Liveness, read by `/healthz`: whether the parts whose loss only a restart mends still
/// work. A part reports itself dead with the reason; the store pipeline also has to answer
/// its check again and again, or it counts as stuck.
#[derive(Clone)]
pub struct Liveness {
    dead: Arc<Mutex<Option<String>>>,
    /// When the store pipeline last answered its check, and how long an answer stays good.
    pipeline: Arc<Mutex<(std::time::Instant, std::time::Duration)>>,
}

impl Liveness {
    /// Alive from now; the pipeline must answer within `stale_after` of each last answer.
    pub fn new(stale_after: std::time::Duration) -> Self {
        Self {
            dead: Arc::default(),
            pipeline: Arc::new(Mutex::new((std::time::Instant::now(), stale_after))),
        }
    }

    /// A part is gone for good (the gRPC server stopped, the store writer stopped).
    pub fn dead(&self, reason: impl Into<String>) {
        if let Ok(mut slot) = self.dead.lock() {
            slot.get_or_insert(reason.into());
        }
    }

    /// The store pipeline answered its check.
    pub fn pipeline_answered(&self) {
        if let Ok(mut slot) = self.pipeline.lock() {
            slot.0 = std::time::Instant::now();
        }
    }

    /// Why the process should be restarted, or `None` while it is alive.
    pub fn dead_because(&self) -> Option<String> {
        if let Some(reason) = self.dead.lock().ok()?.clone() {
            return Some(reason);
        }
        let (answered, stale_after) = *self.pipeline.lock().ok()?;
        let silent = answered.elapsed();
        (silent > stale_after).then(|| {
            format!(
                "the store pipeline has not answered for {}s (stuck writer or disk)",
                silent.as_secs()
            )
        })
    }
}

#[derive(Clone)]
struct AdminState {
    metrics: PrometheusHandle,
    lag: super::lag::Lag,
    readiness: Readiness,
    liveness: Liveness,
}

/// Serves until `shutdown` is cancelled.
pub async fn serve(
    listener: TcpListener,
    metrics: PrometheusHandle,
    lag: super::lag::Lag,
    readiness: Readiness,
    liveness: Liveness,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(render_metrics))
        .route("/healthz", get(healthy))
        .route("/readyz", get(ready))
        .with_state(AdminState {
            metrics,
            lag,
            readiness,
            liveness,
        });
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
}

async fn render_metrics(State(state): State<AdminState>) -> String {
    let mut text = state.metrics.render();
    text.push_str(&state.lag.render(std::time::SystemTime::now()));
    text
}

async fn healthy(State(state): State<AdminState>) -> (StatusCode, String) {
    probe_answer(state.liveness.dead_because(), "ok", "not alive")
}

async fn ready(State(state): State<AdminState>) -> (StatusCode, String) {
    probe_answer(state.readiness.not_ready_because(), "ready", "not ready")
}

/// 200 with `yes`, or 503 with `no` and the reason.
fn probe_answer(failure: Option<String>, yes: &str, no: &str) -> (StatusCode, String) {
    match failure {
        None => (StatusCode::OK, format!("{yes}\n")),
        Some(reason) => (StatusCode::SERVICE_UNAVAILABLE, format!("{no}: {reason}\n")),
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::{Liveness, Readiness};

    #[test]
    fn an_output_failing_longer_than_it_may_makes_the_daemon_unready_until_it_delivers() {
        let readiness = Readiness::default();
        readiness.set(true);
        let changelog = readiness.output("changelog", Duration::from_millis(50));
        changelog.failed(&"topic authorization failed");
        assert_eq!(
            readiness.not_ready_because(),
            None,
            "not failing long enough"
        );
        std::thread::sleep(Duration::from_millis(80));
        changelog.failed(&"message too large");
        assert_eq!(
            readiness.not_ready_because().as_deref(),
            Some("changelog writes have failed for 0s: message too large")
        );
        changelog.delivered();
        assert_eq!(readiness.not_ready_because(), None);
        // A new failure counts from its own start.
        changelog.failed(&"broker down");
        assert_eq!(readiness.not_ready_because(), None);
    }

    #[test]
    fn alive_while_the_pipeline_answers_and_until_a_part_is_gone() {
        let liveness = Liveness::new(Duration::from_millis(50));
        assert_eq!(liveness.dead_because(), None);
        std::thread::sleep(Duration::from_millis(80));
        let stuck = liveness.dead_because().expect("a silent pipeline is stuck");
        assert!(
            stuck.starts_with("the store pipeline has not answered"),
            "{stuck}"
        );
        liveness.pipeline_answered();
        assert_eq!(liveness.dead_because(), None);
        liveness.dead("the gRPC server stopped");
        liveness.dead("a later reason");
        liveness.pipeline_answered();
        assert_eq!(
            liveness.dead_because().as_deref(),
            Some("the gRPC server stopped"),
            "the first reason stays; an answer does not revive a dead part"
        );
    }
}
