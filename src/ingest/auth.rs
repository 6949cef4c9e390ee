//! Bearer tokens with scopes (`[[grpc.auth.tokens]]`). Once any token is configured, every
//! call of `ScanIngest` (scope `ingest`), `Tracking` (scope `read`: shipments and the change
//! feed) and `Operations` (scope `admin`) must carry `authorization: Bearer <token>` naming a
//! configured token (else UNAUTHENTICATED) whose scopes include the service's (else
//! PERMISSION_DENIED); health and reflection stay open for probes. Each scan of an authorized
//! ingest call must come from a device the token allows, else that scan alone is REJECTED
//! (`device_not_allowed`). A token's secret is in the config or in a file of its own
//! (`token_file`: systemd `LoadCredential`, a Kubernetes Secret), read when the config loads.
//!
//! Tokens are kept as SHA-256 digests and looked up by digest, so neither memory dumps nor
//! lookup timing reveal a configured token.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tonic::metadata::MetadataMap;
use tonic::Status;

use crate::telemetry::metrics as m;

/// The device ids one token may send scans for.
#[derive(Debug, PartialEq, Eq)]
pub enum AllowedDevices {
    Any,
    Only(HashSet<String>),
}

impl AllowedDevices {
    pub fn permits(&self, device_id: &str) -> bool {
        match self {
            AllowedDevices::Any => true,
            AllowedDevices::Only(devices) => devices.contains(device_id),
        }
    }
}

/// What a token may do: one scope per gRPC service.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// Send scans (`ScanIngest`).
    Ingest,
    /// Read shipments and follow the change feed (`Tracking`).
    Read,
    /// Stats and administration (`Operations`).
    Admin,
}

impl Scope {
    fn name(self) -> &'static str {
        match self {
            Scope::Ingest => "ingest",
            Scope::Read => "read",
            Scope::Admin => "admin",
        }
    }
}

/// One configured token: its scopes and the devices it may send scans for.
#[derive(Debug)]
struct Grant {
    scopes: HashSet<Scope>,
    devices: Arc<AllowedDevices>,
}

/// The configured tokens; `None` from [`DeviceTokens::new`] when there are none.
#[derive(Clone, Debug)]
pub struct DeviceTokens {
    by_digest: Arc<HashMap<[u8; 32], Grant>>,
}

impl DeviceTokens {
    pub fn new(config: &AuthConfig) -> Option<Self> {
        if config.tokens.is_empty() {
            return None;
        }
        let by_digest = config
            .tokens
            .iter()
            .map(|entry| {
                let allowed = if entry.devices.iter().any(|d| d == "*") {
                    AllowedDevices::Any
                } else {
                    AllowedDevices::Only(entry.devices.iter().cloned().collect())
                };
                let grant = Grant {
                    scopes: entry.scopes.iter().copied().collect(),
                    devices: Arc::new(allowed),
                };
                (digest(entry.token.as_bytes()), grant)
            })
            .collect();
        Some(Self {
            by_digest: Arc::new(by_digest),
        })
    }

    /// The devices the call's bearer token allows, if the token has `scope`.
    pub fn authorize(
        &self,
        metadata: &MetadataMap,
        scope: Scope,
    ) -> Result<Arc<AllowedDevices>, Status> {
        let refuse = |reason: &'static str, message: String| {
            metrics::counter!(m::AUTH_FAILURES_TOTAL, "reason" => reason).increment(1);
            Err(Status::unauthenticated(message))
        };
        let Some(header) = metadata.get("authorization") else {
            return refuse(
                "missing_token",
                format!(
                    "missing bearer token: send `authorization: Bearer <token>` (this scand \
                     requires a token with scope `{}`)",
                    scope.name()
                ),
            );
        };
        let Some(token) = header
            .to_str()
            .ok()
            .and_then(|value| value.strip_prefix("Bearer "))
            .map(str::trim)
        else {
            return refuse(
                "malformed_token",
                "malformed authorization header: expected `Bearer <token>`".to_owned(),
            );
        };
        match self.by_digest.get(&digest(token.as_bytes())) {
            Some(grant) if grant.scopes.contains(&scope) => Ok(grant.devices.clone()),
            Some(_) => {
                metrics::counter!(m::AUTH_FAILURES_TOTAL, "reason" => "missing_scope").increment(1);
                Err(Status::permission_denied(format!(
                    "this bearer token lacks scope `{}`",
                    scope.name()
                )))
            }
            None => refuse("unknown_token", "unknown bearer token".to_owned()),
        }
    }

    /// A tonic interceptor admitting only calls whose token has `scope`.
    pub fn require(
        tokens: Option<DeviceTokens>,
        scope: Scope,
    ) -> impl FnMut(tonic::Request<()>) -> Result<tonic::Request<()>, Status> + Clone {
        move |request: tonic::Request<()>| {
            if let Some(tokens) = &tokens {
                tokens.authorize(request.metadata(), scope)?;
            }
            Ok(request)
        }
    }
}

fn digest(token: &[u8]) -> [u8; 32] {
    Sha256::digest(token).into()
}

/// Bearer tokens. With none configured, no call needs a token.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    pub tokens: Vec<DeviceToken>,
}

/// One bearer token: its secret (`token`, or the file `token_file` holds it in), its scopes
/// (default `["ingest"]`) and, for `ingest`, the device ids whose scans it may send (`"*"`:
/// any device).
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceToken {
    #[serde(default)]
    pub token: String,
    /// A file holding the secret (surrounding whitespace ignored), read when the config loads.
    #[serde(default)]
    pub token_file: Option<std::path::PathBuf>,
    #[serde(default = "DeviceToken::default_scopes")]
    pub scopes: Vec<Scope>,
    #[serde(default)]
    pub devices: Vec<String>,
}

impl DeviceToken {
    fn default_scopes() -> Vec<Scope> {
        vec![Scope::Ingest]
    }
}

impl std::fmt::Debug for DeviceToken {
    // A token is a secret: never in logs or error messages.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceToken")
            .field("token", &"<redacted>")
            .field("token_file", &self.token_file)
            .field("scopes", &self.scopes)
            .field("devices", &self.devices)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens() -> DeviceTokens {
        DeviceTokens::new(&AuthConfig {
            tokens: vec![
                DeviceToken {
                    token: "dock7-0123456789abcdef".into(),
                    token_file: None,
                    scopes: vec![Scope::Ingest],
                    devices: vec!["dock7-1".into(), "dock7-2".into()],
                },
                DeviceToken {
                    token: "hub-0123456789abcdefgh".into(),
                    token_file: None,
                    scopes: vec![Scope::Ingest],
                    devices: vec!["*".into()],
                },
                DeviceToken {
                    token: "reader-0123456789abcdef".into(),
                    token_file: None,
                    scopes: vec![Scope::Read],
                    devices: vec![],
                },
            ],
        })
        .expect("tokens configured")
    }

    fn metadata(value: &str) -> MetadataMap {
        let mut metadata = MetadataMap::new();
        metadata.insert("authorization", value.parse().expect("ascii"));
        metadata
    }

    #[test]
    fn no_tokens_means_no_authentication() {
        assert!(DeviceTokens::new(&AuthConfig::default()).is_none());
    }

    #[test]
    fn a_token_allows_exactly_its_devices() {
        let allowed = tokens()
            .authorize(&metadata("Bearer dock7-0123456789abcdef"), Scope::Ingest)
            .expect("known token");
        assert!(allowed.permits("dock7-1"));
        assert!(allowed.permits("dock7-2"));
        assert!(!allowed.permits("dock8-1"));
        assert!(!allowed.permits(""));
        let any = tokens()
            .authorize(&metadata("Bearer hub-0123456789abcdefgh"), Scope::Ingest)
            .expect("known token");
        assert_eq!(*any, AllowedDevices::Any);
    }

    #[test]
    fn a_token_without_the_services_scope_is_denied() {
        let tokens = tokens();
        let reader = metadata("Bearer reader-0123456789abcdef");
        assert!(tokens.authorize(&reader, Scope::Read).is_ok());
        for scope in [Scope::Ingest, Scope::Admin] {
            let status = tokens.authorize(&reader, scope).expect_err("denied");
            assert_eq!(status.code(), tonic::Code::PermissionDenied);
            assert_eq!(
                status.message(),
                format!("this bearer token lacks scope `{}`", scope.name())
            );
        }
        let dock = metadata("Bearer dock7-0123456789abcdef");
        let status = tokens.authorize(&dock, Scope::Read).expect_err("denied");
        assert_eq!(status.code(), tonic::Code::PermissionDenied);
    }

    #[test]
    fn missing_malformed_and_unknown_tokens_are_unauthenticated() {
        let tokens = tokens();
        for (metadata, message) in [
            (MetadataMap::new(), "missing bearer token"),
            (metadata("Basic abc"), "malformed authorization header"),
            (
                metadata("Bearer dock7-0123456789abcdeX"),
                "unknown bearer token",
            ),
        ] {
            let status = tokens
                .authorize(&metadata, Scope::Read)
                .expect_err("refused");
            assert_eq!(status.code(), tonic::Code::Unauthenticated);
            assert!(
                status.message().starts_with(message),
                "{}",
                status.message()
            );
        }
    }
}
