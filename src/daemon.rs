//! The daemon: wires the pipeline together, serves it, and shuts it down in order.
//!
//! Start: metrics → admin HTTP (not ready) → RocksDB → writer thread → gRPC services → ready
//! (and `READY=1` to systemd).
//! Stop (SIGTERM/SIGINT, or a fatal error: the gRPC server, the store writer or its syncer gone):
//! `STOPPING=1`, not ready → stop accepting, end feed streams, stop reading scan streams →
//! answer every batch already queued once it is durable → writer drains and stops → RocksDB
//! closes. The whole stop takes at most `grpc.shutdown_grace`; a fatal error exits non-zero.
//! Meanwhile a check of the store pipeline keeps `/healthz` honest and pets systemd's watchdog.

use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Server;

use crate::api::operations::OperationsService;
use crate::api::tracking::{Forwarding, TrackingService};
use crate::api::{connections, tls};
use crate::config::Config;
use crate::domain::clock::Clock;
use crate::domain::ownership::Ownership;
use crate::domain::Status;
use crate::engine::{DuplicateKind, Engine};
use crate::ingest::auth::{DeviceTokens, Scope};
use crate::ingest::kafka::KafkaSource;
use crate::ingest::message_limit;
use crate::ingest::validate::Rejection;
use crate::ingest::{grpc::ScanIngestService, validate::Validator, Destination, Ingestor};
use crate::proto::{pb, FILE_DESCRIPTOR_SET};
use crate::publish::feed::Feed;
use crate::publish::kafka::KafkaSink;
use crate::scaleout::gateway::Gateway;
use crate::scaleout::members::{self, Router};
use crate::scaleout::{changelog, resolve, topics};
use crate::store::replicated::Decided;
use crate::store::{writer, Store, StoreError};
use crate::telemetry::lag::Lag;
use crate::telemetry::metrics::KnownLabels;
use crate::telemetry::{self, admin::Liveness, admin::Readiness};

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("cannot listen on {addr} ({what}): {source}")]
    Listen {
        what: &'static str,
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot open the store at {path}: {source}")]
    Store { path: String, source: StoreError },
    #[error(transparent)]
    Metrics(#[from] telemetry::metrics::MetricsError),
    #[error("gRPC server: {0}")]
    Serve(#[from] tonic::transport::Error),
    #[error("gRPC TLS (grpc.tls): {0}")]
    Tls(String),
    #[error("reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("kafka: {0}")]
    Kafka(String),
    #[error(transparent)]
    Carrier(#[from] crate::ingest::carrier::CarrierError),
    #[error("signal handling: {0}")]
    Signal(std::io::Error),
    #[error("stopped on a fatal error: {0}")]
    Fatal(String),
}

/// Runs until SIGTERM or SIGINT, then shuts down cleanly.
pub async fn run(config: Config) -> Result<(), DaemonError> {
    let statuses = Status::ALL.map(Status::label);
    let stallable = Status::ALL
        .into_iter()
        .filter(|s| !s.is_terminal() && *s != Status::Stalled)
        .map(Status::label)
        .collect::<Vec<_>>();
    let metrics = telemetry::metrics::install(&KnownLabels {
        rejection_reasons: &Rejection::CODES,
        duplicate_kinds: &DuplicateKind::ALL.map(DuplicateKind::label),
        statuses: &statuses,
        stallable_statuses: &stallable,
        sources: &["grpc", "kafka"],
    })?;
    metrics::gauge!(telemetry::metrics::BUILD_INFO, "version" => env!("CARGO_PKG_VERSION"))
        .set(1.0);
    let readiness = Readiness::default();
    readiness.set(false);
    let liveness = Liveness::new(PIPELINE_SILENCE_LIMIT);
    let lag = Lag::default();
    let shutdown = CancellationToken::new();

    let admin_listener = TcpListener::bind(config.admin.listen)
        .await
        .map_err(|source| DaemonError::Listen {
            what: "admin HTTP",
            addr: config.admin.listen,
            source,
        })?;
    let admin = tokio::spawn(telemetry::admin::serve(
        admin_listener,
        metrics,
        lag.clone(),
        readiness.clone(),
        liveness.clone(),
        shutdown.clone(),
    ));

    let store_config = config.store.clone();
    let store = tokio::task::spawn_blocking(move || Store::open(&store_config))
        .await
        .map_err(|e| DaemonError::Store {
            path: config.store.path.display().to_string(),
            source: StoreError::WriteFailed(e.to_string()),
        })?
        .map_err(|source| DaemonError::Store {
            path: config.store.path.display().to_string(),
            source,
        })?;
    let kafka = &config.kafka;
    let cluster = kafka.cluster();
    let mut kafka_tasks = Vec::new();
    // Which source partitions this instance owns: the fence of everything it sweeps and
    // replicates, and where queries for the others are forwarded.
    let ownership = Ownership::default();
    let fleet = if kafka.source.enabled {
        let publisher = store.publisher_id().map_err(|source| DaemonError::Store {
            path: config.store.path.display().to_string(),
            source,
        })?;
        let instance = (&ownership, publisher, &store);
        Some(start_fleet(&config, &readiness, instance, &mut kafka_tasks, &shutdown).await?)
    } else {
        None
    };
    let (writer, committed, writer_thread) = writer::spawn(
        store.clone(),
        Engine::new(config.dedup.window).new_journey_after(config.lifecycle.new_journey_after),
        (config.stall.thresholds.policy(), config.retention.policy()),
        &config.store,
        fleet.as_ref().map(|fleet| fleet.replication.clone()),
    )
    .map_err(|source| DaemonError::Store {
        path: config.store.path.display().to_string(),
        source,
    })?;

    let clock = Clock::default();
    let sinks: Vec<&'static str> = if kafka.sink.enabled {
        vec![crate::publish::kafka::SINK]
    } else {
        Vec::new()
    };
    let sweeper = tokio::spawn(writer::run_sweeper(
        writer.clone(),
        config.stall.sweep_interval,
        writer::ChangeLogRetention {
            keep: config.retention.change_log,
            sinks: sinks.clone(),
        },
        clock.clone(),
        shutdown.clone(),
    ));
    // A fatal error of a task that only a restart mends stops the daemon, which exits non-zero.
    let fatal = CancellationToken::new();
    let pipeline_check = tokio::spawn(check_pipeline(
        writer.clone(),
        liveness.clone(),
        fatal.clone(),
        shutdown.clone(),
    ));
    let store_health = tokio::spawn(follow_store_failures(
        writer.failures(),
        readiness.clone(),
        shutdown.clone(),
    ));
    let validator = Validator::new(&config.ingest)?.with_clock(clock);
    if let Some(fleet) = &fleet {
        let stores_here = Ingestor::new(
            validator.clone(),
            Destination::Store(writer.clone()),
            kafka.source.batch_max_records,
            config.ingest.max_in_flight_bytes,
        );
        let source = KafkaSource::new(
            &cluster,
            &kafka.source,
            writer.clone(),
            &fleet.router,
            stores_here,
            lag,
        )
        .map_err(|e| DaemonError::Kafka(e.to_string()))?;
        kafka_tasks.push(tokio::spawn(source.run(shutdown.clone())));
    }
    if kafka.sink.enabled {
        let producer = crate::kafka::idempotent_producer(&cluster)
            .map_err(|e| DaemonError::Kafka(e.to_string()))?;
        let sink = KafkaSink::new(
            store.clone(),
            cluster.clone(),
            producer,
            kafka.sink.clone(),
            (
                committed.clone(),
                fleet.as_ref().map(|fleet| fleet.decided.clone()),
            ),
            readiness.output("status topic", kafka.unready_after),
        );
        kafka_tasks.push(tokio::spawn(sink.run(shutdown.clone())));
    }
    let destination = if kafka.gateway.enabled {
        let producer = crate::kafka::idempotent_producer(&cluster)
            .map_err(|e| DaemonError::Kafka(e.to_string()))?;
        Destination::Kafka(Gateway::new(producer, kafka.gateway.topic.clone()))
    } else {
        Destination::Store(writer)
    };
    let ingestor = Ingestor::new(
        validator,
        destination,
        config.ingest.max_batch_scans,
        config.ingest.max_in_flight_bytes,
    );
    let feed = Feed::new(store.clone(), committed, &config.feed, shutdown.clone());
    let max_message = config.grpc.max_message_bytes;
    let tokens = DeviceTokens::new(&config.grpc.auth);
    let ingest_service = pb::scan_ingest_server::ScanIngestServer::new(ScanIngestService::new(
        ingestor,
        tokens.clone(),
        config.ingest.admission_timeout,
        shutdown.clone(),
    ))
    .max_decoding_message_size(max_message);
    let tracking_service = InterceptedService::new(
        pb::tracking_server::TrackingServer::new(TrackingService::new(
            store.clone(),
            feed,
            fleet.map(|fleet| Forwarding::new(fleet.router)),
        ))
        .max_decoding_message_size(max_message),
        DeviceTokens::require(tokens.clone(), Scope::Read),
    );
    let operations_service = InterceptedService::new(
        pb::operations_server::OperationsServer::new(OperationsService::new(store.clone(), sinks)),
        DeviceTokens::require(tokens, Scope::Admin),
    );

    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<pb::scan_ingest_server::ScanIngestServer<ScanIngestService>>()
        .await;
    health_reporter
        .set_serving::<pb::tracking_server::TrackingServer<TrackingService>>()
        .await;
    health_reporter
        .set_serving::<pb::operations_server::OperationsServer<OperationsService>>()
        .await;
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;

    let grpc_listener = TcpListener::bind(config.grpc.listen)
        .await
        .map_err(|source| DaemonError::Listen {
            what: "gRPC",
            addr: config.grpc.listen,
            source,
        })?;
    let tls = tls::ReloadingTls::load(&config.grpc.tls)
        .map_err(|error| DaemonError::Tls(error.to_string()))?;
    let tls_watch = tls
        .clone()
        .map(|tls| tokio::spawn(tls.watch(shutdown.clone())));
    let server = Server::builder()
        .layer(tower::util::MapResponseLayer::new(
            message_limit::map_response,
        ))
        .max_concurrent_streams(config.grpc.max_concurrent_streams)
        .initial_stream_window_size(config.grpc.stream_window_bytes)
        .initial_connection_window_size(config.grpc.connection_window_bytes)
        .http2_keepalive_interval(Some(config.grpc.keepalive_interval))
        .http2_keepalive_timeout(Some(config.grpc.keepalive_timeout))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(ingest_service)
        .add_service(tracking_service)
        .add_service(operations_service)
        .serve_with_incoming_shutdown(
            connections::incoming(
                grpc_listener,
                config.grpc.max_connections,
                tls,
                shutdown.clone(),
            ),
            shutdown.clone().cancelled_owned(),
        );
    let mut server = tokio::spawn(server);

    if let Err(error) = store.record_metrics() {
        tracing::warn!(%error, "RocksDB metrics not read");
    }
    let store_metrics = tokio::spawn(export_store_metrics(store.clone(), shutdown.clone()));
    readiness.set(true);
    notify_service_manager(sd_notify::NotifyState::Ready);
    tracing::info!(
        grpc = %config.grpc.listen,
        tls = config.grpc.tls.enabled(),
        mutual_tls = config.grpc.tls.client_ca.is_some(),
        device_tokens = config.grpc.auth.tokens.len(),
        admin = %config.admin.listen,
        data = %store.path().display(),
        "scand ready"
    );

    let failed = tokio::select! {
        signal = shutdown_signal() => {
            signal.map_err(DaemonError::Signal)?;
            tracing::info!("shutdown requested: finishing in-flight batches");
            None
        }
        ended = &mut server => {
            let reason = format!("the gRPC server stopped: {ended:?}");
            tracing::error!(%reason, "stopping");
            liveness.dead(reason.clone());
            Some(reason)
        }
        () = fatal.cancelled() => {
            let reason = liveness.dead_because().unwrap_or_else(|| "a fatal error".to_owned());
            tracing::error!(%reason, "stopping");
            Some(reason)
        }
    };
    // The whole shutdown, every step together, takes at most the grace period.
    let grace = config.grpc.shutdown_grace;
    let deadline = tokio::time::Instant::now() + grace;
    notify_service_manager(sd_notify::NotifyState::Stopping);
    readiness.set(false);
    health_reporter
        .set_not_serving::<pb::scan_ingest_server::ScanIngestServer<ScanIngestService>>()
        .await;
    shutdown.cancel();

    if !server.is_finished() {
        match tokio::time::timeout_at(deadline, &mut server).await {
            Ok(Ok(Err(error))) => tracing::warn!(%error, "gRPC server ended with an error"),
            Ok(_) => {}
            Err(_) => {
                tracing::warn!(
                    ?grace,
                    "in-flight calls still open after the grace period; closing them"
                );
                server.abort();
            }
        }
    }
    for task in kafka_tasks
        .into_iter()
        .chain([sweeper, store_metrics, store_health, pipeline_check])
        .chain(tls_watch)
    {
        if tokio::time::timeout_at(deadline, task).await.is_err() {
            tracing::warn!("a task still busy after the grace period");
        }
    }
    // The writer stops once the last handle (held by the services and their streams) is gone
    // and every queued batch was answered.
    let joined = tokio::task::spawn_blocking(move || writer_thread.join());
    if tokio::time::timeout_at(deadline, joined).await.is_err() {
        tracing::warn!("store writer still busy after the grace period");
    }
    let _ = tokio::time::timeout_at(deadline, admin).await;
    drop(store);
    match failed {
        None => {
            tracing::info!("scand stopped");
            Ok(())
        }
        Some(reason) => Err(DaemonError::Fatal(reason)),
    }
}

/// How long the store pipeline may leave its check unanswered before `/healthz` fails: far
/// above a group's write and sync under load, so only a stuck writer or disk trips it.
const PIPELINE_SILENCE_LIMIT: Duration = Duration::from_secs(60);

/// While the store refuses writes, how often the pipeline check probes it, so that recovery is
/// noticed (and readiness restored) without waiting for the next scan.
const RECOVERY_PROBE_INTERVAL: Duration = Duration::from_secs(1);

/// Sends the pipeline a probe (a synced write through the store writer) every few seconds, and
/// every second while the store refuses writes: each answer, even a refused write (a full disk
/// is the store's failure, not a stuck process), keeps `/healthz` alive and, under systemd with
/// `WatchdogSec=`, pets the watchdog; an answered write restores readiness. A writer or syncer
/// that stopped is fatal.
async fn check_pipeline(
    writer: writer::WriterHandle,
    liveness: Liveness,
    fatal: CancellationToken,
    shutdown: CancellationToken,
) {
    let every = sd_notify::watchdog_enabled()
        .map_or(Duration::from_secs(10), |watchdog| watchdog / 2)
        .min(Duration::from_secs(10));
    let mut failures = writer.failures();
    loop {
        let wait = if failures.borrow_and_update().is_some() {
            RECOVERY_PROBE_INTERVAL
        } else {
            every
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            () = tokio::time::sleep(wait) => {}
            // The store started or stopped refusing writes: wait at the other pace.
            changed = failures.changed() => {
                if changed.is_err() {
                    return;
                }
                continue;
            }
        }
        match tokio::time::timeout(PIPELINE_SILENCE_LIMIT, writer.probe()).await {
            Ok(Err(gone @ (StoreError::WriterGone | StoreError::SyncerGone))) => {
                liveness.dead(gone.to_string());
                fatal.cancel();
                return;
            }
            Ok(_) => {
                liveness.pipeline_answered();
                notify_service_manager(sd_notify::NotifyState::Watchdog);
            }
            Err(_) => tracing::error!(
                limit = ?PIPELINE_SILENCE_LIMIT,
                "the store pipeline did not answer its check"
            ),
        }
    }
}

/// Tells systemd (`Type=notify`) where the daemon stands; nothing without `NOTIFY_SOCKET`.
fn notify_service_manager(state: sd_notify::NotifyState<'_>) {
    if let Err(error) = sd_notify::notify(&[state]) {
        tracing::warn!(%error, "cannot notify the service manager");
    }
}

/// Scale-out on Kafka (the Kafka source on): checks the topics it rests on, then starts the
/// changelog task, the membership announcer and the directory's follower. Returns what the
/// writer replicates through and the router queries are forwarded by.
async fn start_fleet(
    config: &Config,
    readiness: &Readiness,
    (ownership, publisher, store): (&Ownership, u64, &Store),
    tasks: &mut Vec<tokio::task::JoinHandle<()>>,
    shutdown: &CancellationToken,
) -> Result<Fleet, DaemonError> {
    let kafka = &config.kafka;
    let source = &kafka.source;
    let cluster = kafka.cluster();
    let counts = topics::check(
        &cluster,
        topics::FleetTopics {
            scans: &source.topics,
            changelog: &source.changelog_topic,
            members: &source.members_topic,
        },
    )
    .await
    .map_err(|e| DaemonError::Kafka(e.to_string()))?;
    // What a kill left in doubt is decided before anything is consumed or published.
    let (resolving, topic, resolver) = (
        cluster.clone(),
        source.changelog_topic.clone(),
        store.clone(),
    );
    let progress = tokio::task::spawn_blocking(move || {
        resolve::resolve(&resolving, &topic, &resolver, publisher)
    })
    .await
    .map_err(|e| DaemonError::Kafka(e.to_string()))?
    .map_err(|e| DaemonError::Kafka(e.to_string()))?;
    let (decided_tx, decided) = tokio::sync::watch::channel(progress.decided.clone());
    let (snapshots, to_send) = tokio::sync::mpsc::channel(config.store.queue_batches * 64);
    let producer = changelog::producer(&cluster).map_err(|e| DaemonError::Kafka(e.to_string()))?;
    let task = changelog::ChangelogTask {
        producer,
        topic: source.changelog_topic.clone(),
        ownership: ownership.clone(),
        max_record_bytes: source.changelog_max_record_bytes,
        health: readiness.output("changelog", kafka.unready_after),
        store: store.clone(),
        decided: decided_tx,
    };
    tasks.push(tokio::spawn(task.run(to_send, progress, shutdown.clone())));
    let publisher_tag = crate::publish::recovery::publisher_tag(publisher);
    let me = if source.advertised_url.is_empty() {
        format!("http://{}", config.grpc.listen)
    } else {
        source.advertised_url.clone()
    };
    let producer = members::producer(&cluster).map_err(|e| DaemonError::Kafka(e.to_string()))?;
    tasks.push(tokio::spawn(members::announce(
        producer,
        source.members_topic.clone(),
        (me.clone(), publisher_tag),
        (
            ownership.clone(),
            readiness.output("members topic", kafka.unready_after),
        ),
        shutdown.clone(),
    )));
    let directory = members::Directory::default();
    let (follower, topic, stop) = (
        directory.clone(),
        source.members_topic.clone(),
        shutdown.clone(),
    );
    tasks.push(tokio::task::spawn_blocking(move || {
        members::follow(&cluster, &topic, &follower, &stop)
    }));
    let router = Router {
        directory,
        ownership: ownership.clone(),
        partitions: std::sync::Arc::new(std::sync::Mutex::new(counts)),
        topic: source.topics.first().cloned().unwrap_or_default(),
        me,
    };
    let replication = writer::Replication {
        snapshots,
        ownership: ownership.clone(),
        publisher,
    };
    Ok(Fleet {
        replication,
        router,
        decided,
    })
}

/// What scale-out gives the rest of the daemon: the writer's replication, the query router,
/// and the changelog task's decisions the Kafka sink publishes by.
struct Fleet {
    replication: writer::Replication,
    router: Router,
    decided: tokio::sync::watch::Receiver<Decided>,
}

/// Not ready while the store refuses writes, so load balancers send scanners elsewhere.
async fn follow_store_failures(
    mut failures: tokio::sync::watch::Receiver<Option<String>>,
    readiness: Readiness,
    shutdown: CancellationToken,
) {
    loop {
        let failure = failures.borrow_and_update().clone();
        readiness.set_store_failure(failure);
        tokio::select! {
            _ = shutdown.cancelled() => return,
            changed = failures.changed() => if changed.is_err() { return },
        }
    }
}

/// RocksDB's figures change slowly; reading its properties every few seconds is enough.
async fn export_store_metrics(store: Store, shutdown: CancellationToken) {
    let mut ticks = tokio::time::interval(Duration::from_secs(5));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticks.tick() => {}
        }
        let store = store.clone();
        match tokio::task::spawn_blocking(move || store.record_metrics()).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => tracing::warn!(%error, "RocksDB metrics not read"),
            Err(error) => tracing::warn!(%error, "RocksDB metrics task failed"),
        }
    }
}

async fn shutdown_signal() -> std::io::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}
