//! Per-device bearer tokens for `ScanIngest` (`[[grpc.auth.tokens]]`). A call must carry
//! `authorization: Bearer <token>` naming a configured token, else it is refused as a whole
//! (UNAUTHENTICATED); each scan of an authorized call must come from a device the token
//! allows, else that scan alone is REJECTED (`device_not_allowed`).
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

/// The configured tokens; `None` from [`DeviceTokens::new`] when there are none.
#[derive(Clone, Debug)]
pub struct DeviceTokens {
    by_digest: Arc<HashMap<[u8; 32], Arc<AllowedDevices>>>,
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
                (digest(entry.token.as_bytes()), Arc::new(allowed))
            })
            .collect();
        Some(Self {
            by_digest: Arc::new(by_digest),
        })
    }

    /// The devices the call's bearer token allows.
    pub fn authorize(&self, metadata: &MetadataMap) -> Result<Arc<AllowedDevices>, Status> {
        let refuse = |reason: &'static str, message: &str| {
            metrics::counter!(m::AUTH_FAILURES_TOTAL, "reason" => reason).increment(1);
            Err(Status::unauthenticated(message))
        };
        let Some(header) = metadata.get("authorization") else {
            return refuse(
                "missing_token",
                "missing bearer token: send `authorization: Bearer <token>` (scand requires a device token for scans)",
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
                "malformed authorization header: expected `Bearer <token>`",
            );
        };
        match self.by_digest.get(&digest(token.as_bytes())) {
            Some(allowed) => Ok(allowed.clone()),
            None => refuse("unknown_token", "unknown bearer token"),
        }
    }
}

fn digest(token: &[u8]) -> [u8; 32] {
    Sha256::digest(token).into()
}

/// Per-device bearer tokens for `ScanIngest`. With none configured, ingest needs no token.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    pub tokens: Vec<DeviceToken>,
}

/// One bearer token and the device ids whose scans it may send (`"*"`: any device).
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceToken {
    pub token: String,
    pub devices: Vec<String>,
}

impl std::fmt::Debug for DeviceToken {
    // A token is a secret: never in logs or error messages.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceToken")
            .field("token", &"<redacted>")
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
                    devices: vec!["dock7-1".into(), "dock7-2".into()],
                },
                DeviceToken {
                    token: "hub-0123456789abcdefgh".into(),
                    devices: vec!["*".into()],
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
            .authorize(&metadata("Bearer dock7-0123456789abcdef"))
            .expect("known token");
        assert!(allowed.permits("dock7-1"));
        assert!(allowed.permits("dock7-2"));
        assert!(!allowed.permits("dock8-1"));
        assert!(!allowed.permits(""));
        let any = tokens()
            .authorize(&metadata("Bearer hub-0123456789abcdefgh"))
            .expect("known token");
        assert_eq!(*any, AllowedDevices::Any);
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
            let status = tokens.authorize(&metadata).expect_err("refused");
            assert_eq!(status.code(), tonic::Code::Unauthenticated);
            assert!(
                status.message().starts_with(message),
                "{}",
                status.message()
            );
        }
    }
}
