//! The `Operations` service: a short summary of what this instance holds, for `scand ctl stats`
//! and for scripts. Read-only; every figure comes from the store, so it survives restarts.

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
}
