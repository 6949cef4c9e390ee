//! scand: a scan-ingestion daemon for parcels.
//!
//! A scan enters through `ingest` (gRPC today; each source is an adapter), is validated at the
//! edge (`ingest::validate`), and is queued for the one store writer (`store::writer`). The
//! writer loads the touched shipments, lets the pure `engine` deduplicate, order and derive
//! status, and writes events, shipment state, scan-id memory and status changes in one synced
//! RocksDB `WriteBatch` (`store`). Only then is the scan acknowledged. Status changes leave
//! through `publish` (the resumable gRPC change feed), reading the change log from their own
//! cursor. `api` holds the wire contract and the query service; `config` and `telemetry`
//! (metrics, tracing, admin HTTP) stand beside the pipeline; `daemon` wires it all up, and
//! `ctl` is the operator's client of a running daemon.
//!
//! Dependency rule: `engine` and `domain` know nothing of tokio, gRPC or RocksDB; `store`
//! knows nothing of gRPC services; adapters depend inward, never on each other.

pub mod api;
pub mod config;
pub mod ctl;
pub mod daemon;
pub mod domain;
pub mod engine;
pub mod ingest;
pub mod kafka;
pub mod publish;
pub mod store;
pub mod telemetry;
