//! The wire contract, a leaf every layer may use: the `scand.v1` messages and services
//! generated from proto/scand/v1/scand.proto, the descriptor set served by reflection, the
//! storage messages (`storage`), and the two non-protobuf forms of the messages: `codec` (a Kafka record's bytes into a `Scan`) and
//! `json` (the messages as the Kafka sink and `scand ctl --json` print them).
//!
//! Invariant: nothing here knows a layer of scand; the domain's conversions to and from these
//! types live with the domain (`crate::domain`).

pub mod codec;
pub mod json;

/// Generated from proto/scand/v1/scand.proto.
#[allow(clippy::all, clippy::pedantic)]
pub mod pb {
    tonic::include_proto!("scand.v1");
}

/// scand's storage format, generated from proto/scand/storage/v1/storage.proto: the values of
/// its column families and the changelog's snapshots. Not a public API; the store's hot
/// encoders write the same bytes by hand (`store::codec`, tested against these).
#[allow(clippy::all, clippy::pedantic)]
pub mod storage {
    tonic::include_proto!("scand.storage.v1");
}

/// The encoded descriptor set of scand.v1, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("scand_descriptor");
