//! scand: a scan-ingestion daemon for parcels.
//!
//! A scan's path:
//! 1. `ingest` takes it in (`ingest::grpc` from handhelds, `ingest::kafka` from sorters) and
//!    validates it at the edge (`ingest::validate`, carrier checks in `ingest::carrier`) into a
//!    `domain::scan::ValidScan`; a rejected scan gets its reason there and goes no further.
//! 2. `store::writer` queues it for the one writer thread, which groups waiting batches, lets
//!    the pure `engine` deduplicate, order and derive status against the shipments' stored
//!    state, and writes scans, state, status changes and source offsets as one `WriteBatch`.
//! 3. The writer's syncer syncs the WAL; only then is the scan acknowledged (gRPC reply, Kafka
//!    offset) and its status changes shown to readers.
//! 4. `publish` reads the change log from its own cursors: the gRPC change feed and the Kafka
//!    status topic. `api` serves one shipment and operations over gRPC.
//! 5. On a fleet, `scaleout` replicates each Kafka partition's shipments to a changelog topic
//!    and restores them on the partition's next owner; a gateway forwards gRPC scans to the
//!    partitioned topic.
//!
//! Beside the pipeline: `domain` (typed ids and their wire form), `proto` (the generated
//! `scand.v1` contract), `config` (composes each component's section), `telemetry` (metrics,
//! logs, admin HTTP), `kafka` (client plumbing), `daemon` (wires it all up) and `ctl` (the
//! operator's client).
//!
//! Dependency rule (checked by tests/architecture.rs): `proto` is a leaf; `domain` → proto;
//! `engine` → domain; `store` → engine, domain, proto; `scaleout` → store; `ingest` → store,
//! engine, scaleout; `publish` → store; `api` → ingest, store, publish, scaleout. Nothing points
//! back up.

pub mod api;
pub mod config;
pub mod ctl;
pub mod daemon;
pub mod domain;
pub mod engine;
pub mod ingest;
pub mod kafka;
pub mod proto;
pub mod publish;
pub mod scaleout;
pub mod store;
pub mod telemetry;
