//! The gRPC services that read and operate scand (`tracking`: one shipment and the change
//! feed; `operations`: stats and admin), and the server plumbing every service shares:
//! connection limits and TLS. The wire types are `crate::proto`; scan ingestion's service is an
//! ingest adapter (`ingest::grpc`, with `ingest::message_limit` for oversized batches).

pub mod connections;
pub mod operations;
pub mod tls;
pub mod tracking;

use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::ingest::auth::AuthConfig;
use tls::TlsConfig;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GrpcConfig {
    /// Address the gRPC services listen on.
    pub listen: SocketAddr,
    /// Largest accepted request message, in bytes.
    pub max_message_bytes: usize,
    /// HTTP/2 streams one connection may have open at once.
    pub max_concurrent_streams: u32,
    /// HTTP/2 flow-control windows: the 64 KiB protocol default caps a stream's throughput.
    pub stream_window_bytes: u32,
    pub connection_window_bytes: u32,
    #[serde(with = "humantime_serde")]
    pub keepalive_interval: Duration,
    #[serde(with = "humantime_serde")]
    pub keepalive_timeout: Duration,
    /// How long shutdown waits for in-flight calls before closing them.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// Connections served at once; further clients wait in the listen backlog.
    pub max_connections: usize,
    pub tls: TlsConfig,
    pub auth: AuthConfig,
    /// Serve callers with neither a token nor a client certificate on an address other hosts
    /// reach. Off: such a listen address needs `[[grpc.auth.tokens]]` or `tls.client_ca`.
    pub allow_anonymous: bool,
}

impl Default for GrpcConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 50051)),
            max_message_bytes: 16 * 1024 * 1024,
            max_concurrent_streams: 256,
            stream_window_bytes: 4 * 1024 * 1024,
            connection_window_bytes: 16 * 1024 * 1024,
            keepalive_interval: Duration::from_secs(30),
            keepalive_timeout: Duration::from_secs(10),
            shutdown_grace: Duration::from_secs(10),
            max_connections: 1024,
            tls: TlsConfig::default(),
            auth: AuthConfig::default(),
            allow_anonymous: false,
        }
    }
}
