//! The `Operations` service: a short summary of what this instance holds, for `scand ctl stats`
//! and for scripts, and online backups (`scand ctl backup`). Every figure comes from the store,
//! so it survives restarts.

use std::time::Instant;

use tonic::{Request, Response, Status};

use crate::proto::pb::{self, operations_server::Operations};
use crate::store::{keys, Store, StoreError};

pub struct OperationsService {
    store: Store,
    started: Instant,
    /// Sinks that publish the change log here (their cursors are reported).
    sinks: Vec<&'static str>,
}

impl OperationsService {
    pub fn new(store: Store, sinks: Vec<&'static str>) -> Self {
        Self {
            store,
            started: Instant::now(),
            sinks,
        }
    }
}

fn stats(store: &Store, sinks: &[&'static str]) -> Result<pb::Stats, StoreError> {
    let last_sequence = store.last_sequence()?.0;
    let mut data_bytes = 0;
    for cf in keys::ALL_COLUMN_FAMILIES {
        for property in [
            "rocksdb.total-sst-files-size",
            "rocksdb.cur-size-all-mem-tables",
        ] {
            data_bytes += store.cf_property(cf, property)?.unwrap_or(0);
        }
    }
    let sinks = sinks
        .iter()
        .map(|&name| {
            let delivered = store.sink_cursor(name)?.0;
            Ok(pb::SinkStats {
                name: name.to_owned(),
                delivered_sequence: delivered,
                pending: last_sequence.saturating_sub(delivered),
            })
        })
        .collect::<Result<_, StoreError>>()?;
    Ok(pb::Stats {
        version: env!("CARGO_PKG_VERSION").to_owned(),
        uptime_seconds: 0,
        last_sequence,
        shipments_estimate: store.estimate_keys(keys::SHIPMENTS)?,
        stored_scans_estimate: store.stored_scans()?,
        stalled_shipments: store.stalled_shipments()?,
        data_bytes,
        sinks,
    })
}

#[tonic::async_trait]
impl Operations for OperationsService {
    async fn get_stats(
        &self,
        _request: Request<pb::GetStatsRequest>,
    ) -> Result<Response<pb::Stats>, Status> {
        let store = self.store.clone();
        let sinks = self.sinks.clone();
        let mut stats = tokio::task::spawn_blocking(move || stats(&store, &sinks))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(|e| Status::unavailable(e.to_string()))?;
        stats.uptime_seconds = self.started.elapsed().as_secs();
        Ok(Response::new(stats))
    }

    async fn backup(
        &self,
        request: Request<pb::BackupRequest>,
    ) -> Result<Response<pb::BackupReply>, Status> {
        let destination = request.into_inner().destination;
        if destination.is_empty() {
            return Err(Status::invalid_argument("destination is empty"));
        }
        let store = self.store.clone();
        let path = std::path::PathBuf::from(&destination);
        let started = Instant::now();
        let info = tokio::task::spawn_blocking(move || store.backup(&path))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(|e| match e {
                StoreError::Backup(_) => Status::failed_precondition(e.to_string()),
                e => Status::unavailable(e.to_string()),
            })?;
        tracing::info!(
            destination,
            last_sequence = info.last_sequence.0,
            bytes = info.bytes,
            seconds = started.elapsed().as_secs_f64(),
            "backup taken"
        );
        Ok(Response::new(pb::BackupReply {
            destination,
            last_sequence: info.last_sequence.0,
            source_offsets: info
                .source_offsets
                .into_iter()
                .map(|(topic, partition, next_offset)| pb::SourceOffset {
                    topic,
                    partition,
                    next_offset,
                })
                .collect(),
            bytes: info.bytes,
        }))
    }
}
