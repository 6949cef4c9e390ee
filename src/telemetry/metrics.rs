//! Every metric scand exports, named and described in one place. Names carry their unit and
//! counters end in `_total`; labels are small closed sets (never a tracking number or scan id).

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

pub const BUILD_INFO: &str = "scand_build_info";
pub const READY: &str = "scand_ready";
pub const SCANS_RECEIVED_TOTAL: &str = "scand_scans_received_total";
pub const SCANS_ACCEPTED_TOTAL: &str = "scand_scans_accepted_total";
pub const SCANS_DUPLICATE_TOTAL: &str = "scand_scans_duplicate_total";
pub const SCANS_REJECTED_TOTAL: &str = "scand_scans_rejected_total";
pub const SCANS_AFTER_TERMINAL_TOTAL: &str = "scand_scans_after_terminal_total";
pub const STATUS_CHANGES_TOTAL: &str = "scand_status_changes_total";
pub const STATUS_CHANGES_VOID_TOTAL: &str = "scand_status_changes_void_total";
pub const INGEST_BATCH_SCANS: &str = "scand_ingest_batch_scans";
pub const INGEST_LATENCY_SECONDS: &str = "scand_ingest_latency_seconds";
pub const INGEST_BATCHES_FAILED_TOTAL: &str = "scand_ingest_batches_failed_total";
pub const STORE_WRITE_SECONDS: &str = "scand_store_write_seconds";
pub const STORE_SYNC_SECONDS: &str = "scand_store_sync_seconds";
pub const STORE_GROUP_BATCHES: &str = "scand_store_group_batches";
pub const STORE_WRITE_ERRORS_TOTAL: &str = "scand_store_write_errors_total";
pub const STORE_SHIPMENT_CACHE_ENTRIES: &str = "scand_store_shipment_cache_entries";
pub const CHANGE_LOG_SEQUENCE: &str = "scand_change_log_sequence";
pub const FEED_SUBSCRIBERS: &str = "scand_feed_subscribers";
pub const FEED_CHANGES_SENT_TOTAL: &str = "scand_feed_changes_sent_total";
pub const KAFKA_RECORDS_TOTAL: &str = "scand_kafka_records_total";
pub const KAFKA_DEAD_LETTERS_TOTAL: &str = "scand_kafka_dead_letters_total";
pub const KAFKA_DEAD_LETTER_ERRORS_TOTAL: &str = "scand_kafka_dead_letter_errors_total";
pub const KAFKA_PARTITIONS_ASSIGNED: &str = "scand_kafka_partitions_assigned";
pub const KAFKA_RESTORED_SHIPMENTS_TOTAL: &str = "scand_kafka_restored_shipments_total";
pub const KAFKA_RECORDS_REREAD_TOTAL: &str = "scand_kafka_records_reread_total";
pub const KAFKA_RESTORE_SECONDS: &str = "scand_kafka_restore_seconds";
pub const KAFKA_HANDOFF_SECONDS: &str = "scand_kafka_handoff_seconds";
pub const KAFKA_RECORDS_FENCED_TOTAL: &str = "scand_kafka_records_fenced_total";
pub const KAFKA_RECORDS_REROUTED_TOTAL: &str = "scand_kafka_records_rerouted_total";
pub const CHANGELOG_RECORDS_TOTAL: &str = "scand_changelog_records_total";
pub const OUTBOX_PENDING: &str = "scand_outbox_pending";
pub const PUBLISH_TOTAL: &str = "scand_publish_total";
pub const PUBLISH_LATENCY_SECONDS: &str = "scand_publish_latency_seconds";
pub const GATEWAY_FORWARDED_TOTAL: &str = "scand_gateway_forwarded_total";
pub const ROCKSDB_SIZE_BYTES: &str = "scand_rocksdb_size_bytes";
pub const ROCKSDB_MEMTABLE_BYTES: &str = "scand_rocksdb_memtable_bytes";
pub const ROCKSDB_PENDING_COMPACTION_BYTES: &str = "scand_rocksdb_pending_compaction_bytes";
pub const ROCKSDB_RUNNING_COMPACTIONS: &str = "scand_rocksdb_running_compactions";
pub const ROCKSDB_WRITE_STALL_RATIO: &str = "scand_rocksdb_write_stall_ratio";
pub const ROCKSDB_BLOCK_CACHE_USAGE_BYTES: &str = "scand_rocksdb_block_cache_usage_bytes";
pub const ROCKSDB_BLOCK_CACHE_CAPACITY_BYTES: &str = "scand_rocksdb_block_cache_capacity_bytes";
pub const ROCKSDB_BLOCK_CACHE_HITS_TOTAL: &str = "scand_rocksdb_block_cache_hits_total";
pub const ROCKSDB_BLOCK_CACHE_MISSES_TOTAL: &str = "scand_rocksdb_block_cache_misses_total";
pub const SHIPMENTS_STALLED: &str = "scand_shipments_stalled";
pub const SHIPMENTS_STALLED_TOTAL: &str = "scand_shipments_stalled_total";
pub const STALL_SWEEP_SECONDS: &str = "scand_stall_sweep_seconds";
pub const RETENTION_REMOVED_TOTAL: &str = "scand_retention_removed_total";
pub const CHANGE_LOG_FIRST_SEQUENCE: &str = "scand_change_log_first_sequence";
pub const STORE_DISK_FREE_BYTES: &str = "scand_store_disk_free_bytes";
pub const STALL_SWEEP_UNREADABLE_TOTAL: &str = "scand_stall_sweep_unreadable_total";
pub const STATUS_REGRESSIONS_TOTAL: &str = "scand_status_regressions_total";
pub const SCANS_CLOCK_SKEW_TOTAL: &str = "scand_scans_clock_skew_total";
pub const TRACKING_NUMBERS_FLAGGED_TOTAL: &str = "scand_tracking_numbers_flagged_total";
pub const STORE_WRITABLE: &str = "scand_store_writable";
pub const GRPC_CONNECTIONS: &str = "scand_grpc_connections";
pub const INGEST_IN_FLIGHT_BYTES: &str = "scand_ingest_in_flight_bytes";
pub const AUTH_FAILURES_TOTAL: &str = "scand_auth_failures_total";
pub const FEED_SUBSCRIBERS_CUT_OFF_TOTAL: &str = "scand_feed_subscribers_cut_off_total";
pub const TLS_RELOADS_TOTAL: &str = "scand_tls_reloads_total";
pub const TLS_CERTIFICATE_EXPIRY_TIMESTAMP_SECONDS: &str =
    "scand_tls_certificate_expiry_timestamp_seconds";

const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0,
];
const BATCH_BUCKETS: &[f64] = &[
    1.0, 10.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0,
];
const GROUP_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0];

#[derive(Debug, thiserror::Error)]
#[error("cannot install the metrics recorder: {0}")]
pub struct MetricsError(String);

/// The closed label sets of the labelled series, which their owners name (the daemon passes
/// them in: this module knows no layer): each series of a known label is exported at zero from
/// the start, so `rate()` panels and alerts see it before its first event.
#[derive(Clone, Copy, Debug, Default)]
pub struct KnownLabels<'a> {
    /// `scand_scans_rejected_total{reason}`.
    pub rejection_reasons: &'a [&'static str],
    /// `scand_scans_duplicate_total{kind}`.
    pub duplicate_kinds: &'a [&'static str],
    /// `scand_status_changes_total{status}`.
    pub statuses: &'a [&'static str],
    /// `scand_shipments_stalled_total{status}`: the statuses a shipment can stall in.
    pub stallable_statuses: &'a [&'static str],
    /// `scand_scans_received_total{source}`.
    pub sources: &'a [&'static str],
}

/// Installs the global recorder and describes every metric. Histograms get explicit buckets:
/// without them the exporter renders summaries, which cannot be aggregated across instances.
pub fn install(known: &KnownLabels<'_>) -> Result<PrometheusHandle, MetricsError> {
    let builder = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
        .and_then(|b| {
            b.set_buckets_for_metric(Matcher::Full(INGEST_BATCH_SCANS.into()), BATCH_BUCKETS)
        })
        .and_then(|b| {
            b.set_buckets_for_metric(Matcher::Full(STORE_GROUP_BATCHES.into()), GROUP_BUCKETS)
        })
        .map_err(|e| MetricsError(e.to_string()))?;
    let handle = builder
        .install_recorder()
        .map_err(|e| MetricsError(e.to_string()))?;
    describe();
    // Gauges read as 0 from the start, so dashboards and alerts see them before first use.
    metrics::gauge!(FEED_SUBSCRIBERS).set(0.0);
    metrics::gauge!(CHANGE_LOG_SEQUENCE).set(0.0);
    metrics::gauge!(SHIPMENTS_STALLED).set(0.0);
    metrics::gauge!(STORE_WRITABLE).set(1.0);
    metrics::gauge!(GRPC_CONNECTIONS).set(0.0);
    metrics::gauge!(INGEST_IN_FLIGHT_BYTES).set(0.0);
    // Refusals by reason, so dashboards and rate() see a zero before the first one.
    for reason in ["batch_too_large", "overloaded", "store_unwritable"] {
        metrics::counter!(INGEST_BATCHES_FAILED_TOTAL, "reason" => reason).absolute(0);
    }
    for result in ["ok", "error"] {
        metrics::counter!(TLS_RELOADS_TOTAL, "result" => result).absolute(0);
    }
    for result in ["sent", "error", "fenced"] {
        metrics::counter!(CHANGELOG_RECORDS_TOTAL, "result" => result).absolute(0);
    }
    for what in ["journeys", "scans", "changes"] {
        metrics::counter!(RETENTION_REMOVED_TOTAL, "what" => what).absolute(0);
    }
    for reason in [
        "missing_token",
        "malformed_token",
        "unknown_token",
        "missing_scope",
    ] {
        metrics::counter!(AUTH_FAILURES_TOTAL, "reason" => reason).absolute(0);
    }
    let labelled = [
        (SCANS_REJECTED_TOTAL, "reason", known.rejection_reasons),
        (SCANS_DUPLICATE_TOTAL, "kind", known.duplicate_kinds),
        (STATUS_CHANGES_TOTAL, "status", known.statuses),
        (SHIPMENTS_STALLED_TOTAL, "status", known.stallable_statuses),
        (SCANS_RECEIVED_TOTAL, "source", known.sources),
    ];
    for (counter, label, values) in labelled {
        for value in values {
            metrics::counter!(counter, label => *value).absolute(0);
        }
    }
    for counter in [
        STATUS_CHANGES_VOID_TOTAL,
        SCANS_ACCEPTED_TOTAL,
        SCANS_AFTER_TERMINAL_TOTAL,
        FEED_CHANGES_SENT_TOTAL,
        FEED_SUBSCRIBERS_CUT_OFF_TOTAL,
        STATUS_REGRESSIONS_TOTAL,
        SCANS_CLOCK_SKEW_TOTAL,
        STORE_WRITE_ERRORS_TOTAL,
        KAFKA_DEAD_LETTER_ERRORS_TOTAL,
        KAFKA_RECORDS_FENCED_TOTAL,
        KAFKA_RECORDS_REROUTED_TOTAL,
        STALL_SWEEP_UNREADABLE_TOTAL,
    ] {
        metrics::counter!(counter).absolute(0);
    }
    Ok(handle)
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_gauge!(
        KAFKA_PARTITIONS_ASSIGNED,
        "Source partitions this instance owns."
    );
    describe_counter!(
        KAFKA_RESTORED_SHIPMENTS_TOTAL,
        Unit::Count,
        "Shipments installed from the changelog on partition assignment."
    );
    describe_counter!(
        KAFKA_RECORDS_REREAD_TOTAL,
        Unit::Count,
        "Records read again after a restore: applied here before, but not replicated to the changelog."
    );
    describe_histogram!(
        KAFKA_RESTORE_SECONDS,
        Unit::Seconds,
        "Time from a partition's assignment to its consumption: its restore from the changelog."
    );
    describe_histogram!(
        KAFKA_HANDOFF_SECONDS,
        Unit::Seconds,
        "Time a restore waited for the partition's previous owner to release it (announced on the members topic)."
    );
    describe_counter!(
        KAFKA_RECORDS_FENCED_TOTAL,
        Unit::Count,
        "Records not applied because their partition was not owned (restoring or revoked) when their batch was processed; the partition's owner applies them."
    );
    describe_counter!(
        KAFKA_RECORDS_REROUTED_TOTAL,
        Unit::Count,
        "Records read from another partition than their tracking number's (key not the normalized tracking number, or not Kafka's default partitioner), produced again to the partition they belong to."
    );
    describe_counter!(
        CHANGELOG_RECORDS_TOTAL,
        Unit::Count,
        "Changelog records by result: sent, error (retried), fenced (the partition is no longer owned here: dropped)."
    );
    describe_gauge!(BUILD_INFO, "Always 1; labels carry the version.");
    describe_gauge!(
        READY,
        "1 once the store is open and the services listen; 0 while starting or stopping."
    );
    describe_counter!(
        SCANS_RECEIVED_TOTAL,
        Unit::Count,
        "Scans received, by source."
    );
    describe_counter!(
        SCANS_ACCEPTED_TOTAL,
        Unit::Count,
        "Scans durably added to a timeline as new physical reads."
    );
    describe_counter!(
        SCANS_DUPLICATE_TOTAL,
        Unit::Count,
        "Duplicate scans, by kind (scan_id, fingerprint)."
    );
    describe_counter!(
        SCANS_REJECTED_TOTAL,
        Unit::Count,
        "Rejected scans, by reason."
    );
    describe_counter!(
        SCANS_AFTER_TERMINAL_TOTAL,
        Unit::Count,
        "Scans placed after a terminal status (kept, status unchanged)."
    );
    describe_counter!(
        STATUS_CHANGES_TOTAL,
        Unit::Count,
        "Status changes written to the change log, by new status."
    );
    describe_counter!(
        STATUS_CHANGES_VOID_TOTAL,
        Unit::Count,
        "Changes this instance derived whose state never reached the changelog (partition moved \
         or instance killed first): never published here, derived again by the next reader."
    );
    describe_histogram!(INGEST_BATCH_SCANS, Unit::Count, "Scans per received batch.");
    describe_histogram!(
        INGEST_LATENCY_SECONDS,
        Unit::Seconds,
        "Batch receipt to durable write."
    );
    describe_counter!(
        INGEST_BATCHES_FAILED_TOTAL,
        Unit::Count,
        "Batches refused as a whole, by reason."
    );
    describe_histogram!(
        STORE_WRITE_SECONDS,
        Unit::Seconds,
        "One group commit: engine plus RocksDB write (before its WAL sync)."
    );
    describe_histogram!(
        STORE_SYNC_SECONDS,
        Unit::Seconds,
        "One WAL sync making the groups written since the last one durable."
    );
    describe_histogram!(
        STORE_GROUP_BATCHES,
        Unit::Count,
        "Ingest batches combined into one RocksDB write."
    );
    describe_counter!(
        STORE_WRITE_ERRORS_TOTAL,
        Unit::Count,
        "Failed RocksDB writes (nothing acknowledged)."
    );
    describe_gauge!(
        STORE_WRITABLE,
        "0 while RocksDB refuses writes (disk full, I/O error): scans are refused, not acked."
    );
    describe_gauge!(
        GRPC_CONNECTIONS,
        "Open gRPC connections (grpc.max_connections)."
    );
    describe_gauge!(
        INGEST_IN_FLIGHT_BYTES,
        Unit::Bytes,
        "Encoded scan batches accepted and not yet answered (ingest.max_in_flight_bytes)."
    );
    describe_counter!(
        AUTH_FAILURES_TOTAL,
        Unit::Count,
        "Calls refused for a missing, malformed or unknown bearer token, or one without the service's scope, by reason."
    );
    describe_counter!(
        FEED_SUBSCRIBERS_CUT_OFF_TOTAL,
        Unit::Count,
        "Change feed subscribers cut off for taking no change within the timeout."
    );
    describe_gauge!(CHANGE_LOG_SEQUENCE, "Highest sequence in the change log.");
    describe_gauge!(
        STORE_SHIPMENT_CACHE_ENTRIES,
        "Shipments the writer holds decoded in memory (store.shipment_cache_entries)."
    );
    describe_gauge!(
        ROCKSDB_SIZE_BYTES,
        Unit::Bytes,
        "Live SST files per column family."
    );
    describe_gauge!(
        ROCKSDB_MEMTABLE_BYTES,
        Unit::Bytes,
        "Memtables (active and immutable) per column family."
    );
    describe_gauge!(
        ROCKSDB_PENDING_COMPACTION_BYTES,
        Unit::Bytes,
        "Bytes RocksDB estimates compaction must rewrite; growth precedes write stalls."
    );
    describe_gauge!(ROCKSDB_RUNNING_COMPACTIONS, "Compactions running now.");
    describe_gauge!(
        ROCKSDB_WRITE_STALL_RATIO,
        Unit::Count,
        "Share of the time since the previous reading (every 5 s) that RocksDB delayed or stopped writes, 0 to 1."
    );
    describe_counter!(
        TLS_RELOADS_TOTAL,
        Unit::Count,
        "Reloads of the gRPC TLS certificate (SIGHUP or a changed file), by result."
    );
    describe_gauge!(
        TLS_CERTIFICATE_EXPIRY_TIMESTAMP_SECONDS,
        Unit::Seconds,
        "When the gRPC TLS certificate served now expires (Unix time)."
    );
    describe_counter!(
        KAFKA_DEAD_LETTER_ERRORS_TOTAL,
        Unit::Count,
        "Failed attempts to deliver a dead letter (the source's partitions pause meanwhile)."
    );
    describe_gauge!(
        ROCKSDB_BLOCK_CACHE_USAGE_BYTES,
        Unit::Bytes,
        "Block cache in use."
    );
    describe_gauge!(
        ROCKSDB_BLOCK_CACHE_CAPACITY_BYTES,
        Unit::Bytes,
        "Block cache capacity (store.block_cache_bytes)."
    );
    describe_counter!(
        ROCKSDB_BLOCK_CACHE_HITS_TOTAL,
        Unit::Count,
        "Block cache hits."
    );
    describe_counter!(
        ROCKSDB_BLOCK_CACHE_MISSES_TOTAL,
        Unit::Count,
        "Block cache misses (reads from disk)."
    );
    describe_gauge!(
        SHIPMENTS_STALLED,
        "Shipments currently stalled (no scan for longer than their status's threshold)."
    );
    describe_counter!(
        SHIPMENTS_STALLED_TOTAL,
        Unit::Count,
        "STALLED changes published, by the status the shipment stalled in."
    );
    describe_histogram!(
        STALL_SWEEP_SECONDS,
        Unit::Seconds,
        "One stall sweep: read the due deadlines, write the STALLED changes."
    );
    describe_counter!(
        RETENTION_REMOVED_TOTAL,
        Unit::Count,
        "What retention removed: expired journeys, their scans, and status changes trimmed off \
         the change log."
    );
    describe_gauge!(
        CHANGE_LOG_FIRST_SEQUENCE,
        "Oldest sequence the change log keeps: a feed can resume after the one before it."
    );
    describe_gauge!(
        STORE_DISK_FREE_BYTES,
        Unit::Bytes,
        "Bytes available to scand on the data directory's filesystem."
    );
    describe_counter!(
        STALL_SWEEP_UNREADABLE_TOTAL,
        Unit::Count,
        "Due shipments whose stored record did not decode: not stalled, kept in the deadline \
         index and tried again at every sweep."
    );
    describe_counter!(
        STATUS_REGRESSIONS_TOTAL,
        Unit::Count,
        "Status changes that went backwards in the lifecycle."
    );
    describe_counter!(
        SCANS_CLOCK_SKEW_TOTAL,
        Unit::Count,
        "Scans whose event time was far from the time scand received them (accepted, flagged)."
    );
    describe_counter!(
        TRACKING_NUMBERS_FLAGGED_TOTAL,
        Unit::Count,
        "Scans whose tracking number failed the carrier check under the flag policy, by reason."
    );
    describe_gauge!(FEED_SUBSCRIBERS, "Open WatchStatusChanges streams.");
    describe_counter!(
        FEED_CHANGES_SENT_TOTAL,
        Unit::Count,
        "Status changes sent to feed subscribers."
    );
}
