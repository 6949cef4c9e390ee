//! TLS for the gRPC server (rustls): the server's identity and, for mutual TLS, the CA that
//! client certificates must chain to. With a client CA a client without a valid certificate
//! fails the handshake and never reaches a service.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tonic::transport::{Certificate, Identity, ServerTlsConfig};

#[derive(Debug, thiserror::Error)]
#[error("cannot read {what} {path}: {source}")]
pub struct TlsError {
    what: &'static str,
    path: PathBuf,
    source: std::io::Error,
}

/// The server's TLS settings, or `None` when TLS is off. Reads the PEM files once.
pub fn server_config(config: &TlsConfig) -> Result<Option<ServerTlsConfig>, TlsError> {
    let (Some(cert), Some(key)) = (&config.cert, &config.key) else {
        return Ok(None);
    };
    let identity = Identity::from_pem(read("grpc.tls.cert", cert)?, read("grpc.tls.key", key)?);
    let mut tls = ServerTlsConfig::new().identity(identity);
    if let Some(ca) = &config.client_ca {
        tls = tls.client_ca_root(Certificate::from_pem(read("grpc.tls.client_ca", ca)?));
    }
    Ok(Some(tls))
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError {
        what,
        path: path.to_owned(),
        source,
    })
}

/// gRPC over TLS, off unless `cert` and `key` are set. With `client_ca`, mutual TLS: only
/// clients presenting a certificate issued by that CA get a connection.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// PEM certificate chain of the server.
    pub cert: Option<PathBuf>,
    /// PEM private key of `cert`.
    pub key: Option<PathBuf>,
    /// PEM CA certificate(s) that client certificates must chain to.
    pub client_ca: Option<PathBuf>,
}

impl TlsConfig {
    /// TLS is on when a certificate is configured.
    pub fn enabled(&self) -> bool {
        self.cert.is_some()
    }
}
