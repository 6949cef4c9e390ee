//! Telemetry: tracing setup, the metric catalogue (`metrics`), the Kafka lag board rendered at
//! each scrape (`lag`) and the admin HTTP endpoint (`admin`: /metrics, /healthz, /readyz).

pub mod admin;
pub mod lag;
pub mod metrics;

use serde::{Deserialize, Serialize};
use tracing_subscriber::{fmt, EnvFilter};

/// Installs the global tracing subscriber: human lines or JSON, filtered by RUST_LOG if set,
/// else by the configured directives.
pub fn init_tracing(config: &LogConfig) -> Result<(), String> {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&config.filter))
        .map_err(|e| format!("invalid log.filter {:?}: {e}", config.filter))?;
    let builder = fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let result = match config.format {
        LogFormat::Human => builder.try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .try_init(),
    };
    result.map_err(|e| e.to_string())
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Human,
    Json,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    pub format: LogFormat,
    /// tracing filter directives, e.g. `info` or `scand=debug`; RUST_LOG wins when set.
    pub filter: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::Human,
            filter: "info".to_owned(),
        }
    }
}
