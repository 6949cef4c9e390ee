//! TLS for the gRPC server (rustls, done by scand's own acceptor, not tonic's, so it can be
//! reloaded): the server's identity and, for mutual TLS, the CA that client certificates must
//! chain to. With a client CA a client without a valid certificate fails the handshake and never
//! reaches a service. The PEM files are read again on SIGHUP and when one of them changes on
//! disk (checked every few seconds): new connections get the new certificate, open ones keep
//! theirs. A reload that fails (a half-written file) keeps serving the previous certificate and
//! is counted. The served certificate's expiry is exported, so an alert fires before it lapses.
//!
//! Invariant: at every instant a complete, valid configuration is served; a reload swaps it
//! whole or not at all.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use serde::{Deserialize, Serialize};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use crate::telemetry::metrics as m;

/// How often the files are checked for a change.
const WATCH_INTERVAL: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {what} {path}: {source}")]
    Read {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{what} {path}: {reason}")]
    Invalid {
        what: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("grpc.tls: {0}")]
    Config(String),
}

/// The TLS configuration new connections are accepted with, reloadable.
pub struct ReloadingTls {
    files: TlsConfig,
    current: RwLock<Arc<ServerConfig>>,
    /// The files' modification times when last loaded: a change triggers a reload.
    loaded_from: Mutex<Vec<Option<SystemTime>>>,
}

impl ReloadingTls {
    /// Loads the files; `None` when TLS is off.
    pub fn load(files: &TlsConfig) -> Result<Option<Arc<Self>>, TlsError> {
        if !files.enabled() {
            return Ok(None);
        }
        let loaded_from = modified(files);
        let config = server_config(files)?;
        Ok(Some(Arc::new(Self {
            files: files.clone(),
            current: RwLock::new(Arc::new(config)),
            loaded_from: Mutex::new(loaded_from),
        })))
    }

    /// An acceptor with the configuration in force now.
    pub fn acceptor(&self) -> TlsAcceptor {
        let current = self
            .current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        TlsAcceptor::from(current.clone())
    }

    /// Reads the files again and serves them from now on; on an error, keeps what it served.
    pub fn reload(&self, why: &'static str) {
        let loaded_from = modified(&self.files);
        match server_config(&self.files) {
            Ok(config) => {
                *self
                    .current
                    .write()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(config);
                metrics::counter!(m::TLS_RELOADS_TOTAL, "result" => "ok").increment(1);
                tracing::info!(why, "TLS certificate reloaded");
            }
            Err(error) => {
                metrics::counter!(m::TLS_RELOADS_TOTAL, "result" => "error").increment(1);
                tracing::error!(%error, why, "TLS reload failed; serving the previous certificate");
            }
        }
        *self
            .loaded_from
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = loaded_from;
    }

    /// Reloads on SIGHUP and when a file changed, until `shutdown`.
    pub async fn watch(self: Arc<Self>, shutdown: CancellationToken) {
        use tokio::signal::unix::{signal, SignalKind};
        let mut hangups = match signal(SignalKind::hangup()) {
            Ok(hangups) => Some(hangups),
            Err(error) => {
                tracing::warn!(%error, "no SIGHUP handler; TLS reloads on file changes only");
                None
            }
        };
        let mut ticks = tokio::time::interval(WATCH_INTERVAL);
        loop {
            let hangup = async {
                match hangups.as_mut() {
                    Some(hangups) => hangups.recv().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = hangup => self.reload("SIGHUP"),
                _ = ticks.tick() => {
                    let changed = *self
                        .loaded_from
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        != modified(&self.files);
                    if changed {
                        self.reload("a certificate file changed");
                    }
                }
            }
        }
    }
}

/// The files' modification times (`None` for one that cannot be read).
fn modified(files: &TlsConfig) -> Vec<Option<SystemTime>> {
    [&files.cert, &files.key, &files.client_ca]
        .into_iter()
        .flatten()
        .map(|path| std::fs::metadata(path).and_then(|m| m.modified()).ok())
        .collect()
}

/// A rustls server configuration from the files, HTTP/2 only; exports the certificate's expiry.
fn server_config(files: &TlsConfig) -> Result<ServerConfig, TlsError> {
    let (Some(cert_path), Some(key_path)) = (&files.cert, &files.key) else {
        return Err(TlsError::Config("set both `cert` and `key`".into()));
    };
    let invalid = |what: &'static str, path: &Path, reason: String| TlsError::Invalid {
        what,
        path: path.to_owned(),
        reason,
    };
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(&read("grpc.tls.cert", cert_path)?)
            .collect::<Result<_, _>>()
            .map_err(|e| invalid("grpc.tls.cert", cert_path, e.to_string()))?;
    let Some(leaf) = chain.first() else {
        return Err(invalid("grpc.tls.cert", cert_path, "no certificate".into()));
    };
    let expiry = not_after(leaf)
        .ok_or_else(|| invalid("grpc.tls.cert", cert_path, "unreadable validity".into()))?;
    let key = PrivateKeyDer::from_pem_slice(&read("grpc.tls.key", key_path)?)
        .map_err(|e| invalid("grpc.tls.key", key_path, e.to_string()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let builder = match &files.client_ca {
        Some(ca_path) => {
            let mut roots = RootCertStore::empty();
            for ca in CertificateDer::pem_slice_iter(&read("grpc.tls.client_ca", ca_path)?) {
                let ca = ca.map_err(|e| invalid("grpc.tls.client_ca", ca_path, e.to_string()))?;
                roots
                    .add(ca)
                    .map_err(|e| invalid("grpc.tls.client_ca", ca_path, e.to_string()))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| invalid("grpc.tls.client_ca", ca_path, e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(chain, key)
        .map_err(|e| invalid("grpc.tls.key", key_path, e.to_string()))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    let seconds = expiry
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    metrics::gauge!(m::TLS_CERTIFICATE_EXPIRY_TIMESTAMP_SECONDS).set(seconds);
    Ok(config)
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.to_owned(),
        source,
    })
}

/// The `notAfter` of an X.509 certificate (DER): Certificate → tbsCertificate → validity.
fn not_after(certificate: &[u8]) -> Option<SystemTime> {
    let (_, certificate) = der(certificate, 0x30)?;
    let (_, mut tbs) = der(certificate, 0x30)?;
    // An explicit version ([0]) comes first when present.
    if tbs.first() == Some(&0xa0) {
        tbs = der(tbs, 0xa0)?.0;
    }
    for tag in [0x02, 0x30, 0x30] {
        tbs = der(tbs, tag)?.0; // serial number, signature algorithm, issuer
    }
    let (_, validity) = der(tbs, 0x30)?;
    let (_, after_not_before, _) = der_element(validity)?;
    let (tag, _, time) = der_element(after_not_before)?;
    let text = std::str::from_utf8(time).ok()?;
    let (year, rest) = match tag {
        0x17 => {
            let yy: i64 = text.get(0..2)?.parse().ok()?;
            (if yy >= 50 { 1900 + yy } else { 2000 + yy }, text.get(2..)?)
        }
        0x18 => (text.get(0..4)?.parse().ok()?, text.get(4..)?),
        _ => return None,
    };
    let field = |at: usize| -> Option<i64> { rest.get(at..at + 2)?.parse().ok() };
    let days = days_from_civil(year, field(0)?, field(2)?);
    let seconds = days * 86_400 + field(4)? * 3_600 + field(6)? * 60 + field(8)?;
    Some(SystemTime::UNIX_EPOCH + Duration::from_secs(u64::try_from(seconds).ok()?))
}

/// One DER element of tag `tag` at the start of `bytes`: (what follows it, its content).
fn der(bytes: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
    let (found, rest, content) = der_element(bytes)?;
    (found == tag).then_some((rest, content))
}

/// One DER element at the start of `bytes`: its tag, what follows it, its content.
fn der_element(bytes: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, bytes) = bytes.split_first()?;
    let (&first, mut bytes) = bytes.split_first()?;
    let len = if first < 0x80 {
        usize::from(first)
    } else {
        let octets = usize::from(first & 0x7f);
        let (len_bytes, rest) = bytes.split_at_checked(octets)?;
        bytes = rest;
        len_bytes.iter().try_fold(0usize, |len, &b| {
            len.checked_mul(256)?.checked_add(usize::from(b))
        })?
    };
    let (content, rest) = bytes.split_at_checked(len)?;
    Some((tag, rest, content))
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let month_index = (month + 9) % 12;
    let day_of_year = (153 * month_index + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_certificates_expiry_is_read_from_its_validity() {
        let mut params = rcgen::CertificateParams::new(vec!["localhost".into()]).expect("params");
        params.not_after = rcgen::date_time_ymd(2031, 7, 19);
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = params.self_signed(&key).expect("cert");
        let expiry = not_after(cert.der()).expect("validity");
        // 2031-07-19T00:00:00Z
        assert_eq!(
            expiry
                .duration_since(SystemTime::UNIX_EPOCH)
                .ok()
                .map(|d| d.as_secs()),
            Some(1_942_185_600)
        );
        params.not_after = rcgen::date_time_ymd(2051, 1, 1);
        let generalized = params.self_signed(&key).expect("cert");
        assert_eq!(
            not_after(generalized.der())
                .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
                .map(|d| d.as_secs()),
            Some(2_556_144_000)
        );
        assert_eq!(not_after(b"not a certificate"), None);
    }

    #[test]
    fn days_count_from_the_epoch() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
        assert_eq!(days_from_civil(2026, 12, 7), 20_794);
    }
}
