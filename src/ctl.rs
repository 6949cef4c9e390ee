//! `scand ctl`: the operator's client for a running daemon, over its public gRPC API.
//! `get` shows one shipment, `tail` follows the change feed, `stats` summarises the instance.
//! Output is a readable table, or JSON (`--json`, one object per line for `tail`) for scripts.
//!
//! Errors name what failed and where (the target address), so "daemon not running" and
//! "unknown tracking number" read differently.

use std::io::Write;
use std::time::{Duration, SystemTime};

use clap::{Args, Subcommand};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::proto::json;
use crate::proto::pb::{
    self, operations_client::OperationsClient, tracking_client::TrackingClient,
};

#[derive(Debug, Args)]
pub struct CtlArgs {
    /// The daemon's gRPC address.
    #[arg(
        long,
        global = true,
        env = "SCAND_TARGET",
        default_value = "http://127.0.0.1:50051"
    )]
    pub target: String,
    /// How long to wait for the daemon to answer a connection.
    #[arg(long, global = true, default_value = "5s", value_parser = humantime::parse_duration)]
    pub connect_timeout: Duration,
    #[command(flatten)]
    pub tls: CtlTls,
    /// Bearer token for a daemon with `[[grpc.auth.tokens]]` (scope `read` for get and tail,
    /// `admin` for stats).
    #[arg(long, global = true, env = "SCAND_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// A file holding the bearer token (instead of `--token`).
    #[arg(
        long,
        global = true,
        env = "SCAND_TOKEN_FILE",
        conflicts_with = "token"
    )]
    pub token_file: Option<std::path::PathBuf>,
    #[command(subcommand)]
    pub command: CtlCommand,
}

/// TLS towards a daemon with `[grpc.tls]` (use an `https://` target).
#[derive(Debug, Args)]
pub struct CtlTls {
    /// PEM CA certificate that signed the daemon's certificate.
    #[arg(long, global = true, env = "SCAND_TLS_CA")]
    pub tls_ca: Option<std::path::PathBuf>,
    /// PEM client certificate, for a daemon with `grpc.tls.client_ca` (mutual TLS).
    #[arg(long, global = true, env = "SCAND_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<std::path::PathBuf>,
    /// PEM private key of `--tls-cert`.
    #[arg(long, global = true, env = "SCAND_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<std::path::PathBuf>,
    /// Name to verify the daemon's certificate against (default: the target's host).
    #[arg(long, global = true)]
    pub tls_domain: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum CtlCommand {
    /// Show a shipment: status, carrier, flags and its timeline in order.
    Get {
        tracking_number: String,
        /// Which journey of the number (1 = its first; default: the latest).
        #[arg(long)]
        journey: Option<u32>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Follow the change feed: status changes as they are committed.
    Tail {
        /// Start at this sequence (inclusive): `--from 1` replays the whole history.
        /// Without it, only changes committed from now on are shown.
        #[arg(long)]
        from: Option<u64>,
        /// Only this shipment's changes.
        #[arg(long)]
        tracking_number: Option<String>,
        /// Stop after this many changes (default: follow until interrupted).
        #[arg(long)]
        count: Option<u64>,
        /// One JSON object per line instead of text.
        #[arg(long)]
        json: bool,
    },
    /// A short summary of the daemon: changes recorded, shipments, stalled, sink backlog.
    Stats {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Take a consistent backup while ingest goes on, into DESTINATION on the daemon's host
    /// (absent or an empty directory). Restore it with `scand restore`.
    Backup {
        destination: String,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    #[error("invalid --target {target}: {reason}")]
    Target { target: String, reason: String },
    #[error("cannot reach scand at {target}: {reason} (is the daemon running? set --target or SCAND_TARGET)")]
    Unreachable { target: String, reason: String },
    #[error("{0}")]
    NotFound(String),
    #[error("scand at {target} no longer keeps the changes asked for: {message}")]
    OutOfRange { target: String, message: String },
    #[error("scand at {target} answered {code:?}: {message}")]
    Rpc {
        target: String,
        code: tonic::Code,
        message: String,
    },
    #[error("writing output: {0}")]
    Output(#[from] std::io::Error),
    #[error("the token is not a valid header value (printable ASCII only)")]
    Token,
    #[error("cannot read {what} {path}: {source}")]
    TlsFile {
        what: &'static str,
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}

/// Runs one `ctl` command. A closed stdout (e.g. piped into `head`) ends it quietly.
pub async fn run(args: CtlArgs) -> Result<(), CtlError> {
    let channel = connect(&args.target, args.connect_timeout, &args.tls).await?;
    let bearer = bearer(&args)?;
    let rpc_error = |status: tonic::Status| match status.code() {
        tonic::Code::OutOfRange => CtlError::OutOfRange {
            target: args.target.clone(),
            message: status.message().to_owned(),
        },
        code => CtlError::Rpc {
            target: args.target.clone(),
            code,
            message: status.message().to_owned(),
        },
    };
    let mut out = std::io::stdout().lock();
    let result = match args.command {
        CtlCommand::Get {
            tracking_number,
            journey,
            json,
        } => {
            let reply = TrackingClient::with_interceptor(channel, bearer.clone())
                .get_shipment(pb::GetShipmentRequest {
                    tracking_number: tracking_number.clone(),
                    journey: journey.unwrap_or(0),
                })
                .await;
            let shipment = match reply {
                Ok(reply) => reply.into_inner(),
                Err(status) if status.code() == tonic::Code::NotFound => {
                    return Err(CtlError::NotFound(status.message().to_owned()))
                }
                Err(status) => return Err(rpc_error(status)),
            };
            if json {
                writeln!(out, "{}", json::to_json(&shipment))
            } else {
                write_shipment(&mut out, &shipment)
            }
        }
        CtlCommand::Tail {
            from,
            tracking_number,
            count,
            json,
        } => {
            let after_sequence = match from {
                Some(first) => first.saturating_sub(1),
                None => {
                    OperationsClient::with_interceptor(channel.clone(), bearer.clone())
                        .get_stats(pb::GetStatsRequest {})
                        .await
                        .map_err(rpc_error)?
                        .into_inner()
                        .last_sequence
                }
            };
            let mut stream = TrackingClient::with_interceptor(channel, bearer.clone())
                .watch_status_changes(pb::WatchRequest {
                    after_sequence,
                    tracking_number,
                })
                .await
                .map_err(rpc_error)?
                .into_inner();
            let mut shown = 0;
            loop {
                if count.is_some_and(|n| shown >= n) {
                    break Ok(());
                }
                let Some(change) = stream.message().await.map_err(rpc_error)? else {
                    break Ok(());
                };
                shown += 1;
                let written = if json {
                    writeln!(out, "{}", json::to_json(&change))
                } else {
                    writeln!(out, "{}", change_line(&change))
                };
                if let Err(error) = written.and_then(|()| out.flush()) {
                    break Err(error);
                }
            }
        }
        CtlCommand::Stats { json } => {
            let stats = OperationsClient::with_interceptor(channel, bearer.clone())
                .get_stats(pb::GetStatsRequest {})
                .await
                .map_err(rpc_error)?
                .into_inner();
            if json {
                writeln!(out, "{}", json::to_json(&stats))
            } else {
                write_stats(&mut out, &stats)
            }
        }
        CtlCommand::Backup { destination, json } => {
            let backup = OperationsClient::with_interceptor(channel, bearer.clone())
                .backup(pb::BackupRequest { destination })
                .await
                .map_err(rpc_error)?
                .into_inner();
            if json {
                writeln!(out, "{}", json::to_json(&backup))
            } else {
                write_backup(&mut out, &backup)
            }
        }
    };
    match result {
        Err(error) if error.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => Ok(other?),
    }
}

/// An interceptor sending `--token` (or the content of `--token-file`) as a bearer token.
fn bearer(
    args: &CtlArgs,
) -> Result<
    impl FnMut(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> + Clone,
    CtlError,
> {
    let token = match (&args.token, &args.token_file) {
        (Some(token), _) => Some(token.trim().to_owned()),
        (None, Some(path)) => Some(
            std::fs::read_to_string(path)
                .map_err(|source| CtlError::TlsFile {
                    what: "token file",
                    path: path.clone(),
                    source,
                })?
                .trim()
                .to_owned(),
        ),
        (None, None) => None,
    };
    let header = token
        .map(|token| {
            tonic::metadata::MetadataValue::try_from(format!("Bearer {token}"))
                .map_err(|_| CtlError::Token)
        })
        .transpose()?;
    Ok(move |mut request: tonic::Request<()>| {
        if let Some(header) = &header {
            request
                .metadata_mut()
                .insert("authorization", header.clone());
        }
        Ok(request)
    })
}

async fn connect(target: &str, timeout: Duration, tls: &CtlTls) -> Result<Channel, CtlError> {
    let mut endpoint = Endpoint::from_shared(target.to_owned()).map_err(|e| CtlError::Target {
        target: target.to_owned(),
        reason: e.to_string(),
    })?;
    if let Some(config) = client_tls(tls)? {
        endpoint = endpoint.tls_config(config).map_err(|e| CtlError::Target {
            target: target.to_owned(),
            reason: source_chain(&e),
        })?;
    }
    endpoint
        .connect_timeout(timeout)
        .connect()
        .await
        .map_err(|e| CtlError::Unreachable {
            target: target.to_owned(),
            reason: source_chain(&e),
        })
}

fn client_tls(tls: &CtlTls) -> Result<Option<ClientTlsConfig>, CtlError> {
    let read = |what: &'static str, path: &std::path::Path| {
        std::fs::read(path).map_err(|source| CtlError::TlsFile {
            what,
            path: path.to_owned(),
            source,
        })
    };
    if tls.tls_ca.is_none() && tls.tls_cert.is_none() {
        return Ok(None);
    }
    let mut config = ClientTlsConfig::new();
    if let Some(ca) = &tls.tls_ca {
        config = config.ca_certificate(Certificate::from_pem(read("--tls-ca", ca)?));
    }
    if let (Some(cert), Some(key)) = (&tls.tls_cert, &tls.tls_key) {
        config = config.identity(Identity::from_pem(
            read("--tls-cert", cert)?,
            read("--tls-key", key)?,
        ));
    }
    if let Some(domain) = &tls.tls_domain {
        config = config.domain_name(domain.clone());
    }
    Ok(Some(config))
}

/// tonic's transport errors say only "transport error"; the cause is further down.
fn source_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text = format!("{text}: {cause}");
        source = cause.source();
    }
    text
}

fn short_status(n: i32) -> &'static str {
    json::status_name(n).trim_start_matches("STATUS_")
}

fn short_scan_type(n: i32) -> &'static str {
    json::scan_type_name(n).trim_start_matches("SCAN_TYPE_")
}

/// `IN_TRANSIT (SORTED)`, `STALLED in OUT_FOR_DELIVERY`.
fn status_text(status: i32, sub_status: i32, stalled_status: i32) -> String {
    let mut text = if status == pb::Status::Stalled as i32 {
        format!("STALLED in {}", short_status(stalled_status))
    } else {
        short_status(status).to_owned()
    };
    if sub_status != 0 {
        text = format!("{text} ({})", short_scan_type(sub_status));
    }
    text
}

fn time_text(t: Option<prost_types::Timestamp>) -> String {
    t.and_then(|t| SystemTime::try_from(t).ok()).map_or_else(
        || "-".to_owned(),
        |t| humantime::format_rfc3339_seconds(t).to_string(),
    )
}

fn write_shipment(out: &mut impl Write, s: &pb::Shipment) -> std::io::Result<()> {
    let carrier = match (s.carrier.as_str(), s.tracking_number_issue.as_str()) {
        ("", "") => "not recognised".to_owned(),
        ("", issue) => format!("not recognised ({issue})"),
        (carrier, "") if s.carrier_service.is_empty() => carrier.to_owned(),
        (carrier, "") => format!("{carrier}, {}", s.carrier_service),
        (carrier, issue) => format!("{carrier}? ({issue})"),
    };
    writeln!(out, "Tracking number  {}", s.tracking_number)?;
    let kept: Vec<String> = s.journeys.iter().map(|j| j.journey.to_string()).collect();
    writeln!(
        out,
        "Journey          {} (kept: {})",
        s.journey,
        kept.join(", ")
    )?;
    writeln!(
        out,
        "Status           {}",
        status_text(s.status, s.sub_status, s.stalled_status)
    )?;
    writeln!(out, "Version          {}", s.version)?;
    writeln!(out, "Carrier          {carrier}")?;
    writeln!(
        out,
        "Flags            {} after terminal, {} regressions, {} clock-skewed scans",
        s.scans_after_terminal, s.regressions, s.clock_skewed_scans
    )?;
    writeln!(out)?;
    writeln!(
        out,
        "{:>3}  {:<20}  {:<20}  {:<16}  {:<12}  {:<8}  SCAN ID",
        "#", "EVENT TIME (UTC)", "SCAN TYPE", "FACILITY", "DEVICE", "SOURCE"
    )?;
    for (i, scan) in s.timeline.iter().enumerate() {
        let facility = scan
            .location
            .as_ref()
            .map_or("-", |l| l.facility_id.as_str());
        let source = pb::Source::try_from(scan.source)
            .unwrap_or(pb::Source::Unspecified)
            .as_str_name()
            .trim_start_matches("SOURCE_");
        writeln!(
            out,
            "{:>3}  {:<20}  {:<20}  {:<16}  {:<12}  {:<8}  {}",
            i + 1,
            time_text(scan.event_time),
            short_scan_type(scan.scan_type),
            facility,
            scan.device_id,
            source,
            scan.scan_id
        )?;
    }
    Ok(())
}

/// A tracking number, with its journey when the number is on a later one.
fn journey_text(tracking_number: &str, journey: u32) -> String {
    if journey > 1 {
        format!("{tracking_number} (journey {journey})")
    } else {
        tracking_number.to_owned()
    }
}

fn change_line(c: &pb::StatusChange) -> String {
    let previous = if c.previous_status == 0 {
        "(new)".to_owned()
    } else {
        status_text(
            c.previous_status,
            c.previous_sub_status,
            c.previous_stalled_status,
        )
    };
    let mut line = format!(
        "#{}  {}  {}  v{}  {} -> {}",
        c.sequence,
        time_text(c.event_time),
        journey_text(&c.tracking_number, c.journey),
        c.version,
        previous,
        status_text(c.status, c.sub_status, c.stalled_status),
    );
    if !c.cause_scan_id.is_empty() {
        line.push_str(&format!("  scan {}", c.cause_scan_id));
    }
    if c.regression {
        line.push_str("  [regression]");
    }
    if c.correction {
        line.push_str("  [correction]");
    }
    line
}

fn write_backup(out: &mut impl Write, b: &pb::BackupReply) -> std::io::Result<()> {
    writeln!(out, "backup       {}", b.destination)?;
    writeln!(
        out,
        "sequence     {} (a restored instance continues after it)",
        b.last_sequence
    )?;
    writeln!(out, "bytes        {}", b.bytes)?;
    for offset in &b.source_offsets {
        writeln!(
            out,
            "offset       {}[{}] next {}",
            offset.topic, offset.partition, offset.next_offset
        )?;
    }
    Ok(())
}

fn write_stats(out: &mut impl Write, s: &pb::Stats) -> std::io::Result<()> {
    writeln!(
        out,
        "scand {}, up {}",
        s.version,
        humantime::format_duration(Duration::from_secs(s.uptime_seconds))
    )?;
    writeln!(out, "status changes     {}", s.last_sequence)?;
    writeln!(out, "shipments          ~{}", s.shipments_estimate)?;
    writeln!(out, "stored scans       ~{}", s.stored_scans_estimate)?;
    writeln!(out, "stalled shipments  {}", s.stalled_shipments)?;
    writeln!(
        out,
        "data               {} MiB",
        s.data_bytes / (1024 * 1024)
    )?;
    if s.sinks.is_empty() {
        writeln!(out, "sinks              none (change feed only)")?;
    }
    for sink in &s.sinks {
        writeln!(
            out,
            "sink {:<13} delivered up to {}, {} pending",
            sink.name, sink.delivered_sequence, sink.pending
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_read_as_operators_say_them() {
        assert_eq!(
            status_text(pb::Status::InTransit as i32, pb::ScanType::Sorted as i32, 0),
            "IN_TRANSIT (SORTED)"
        );
        assert_eq!(
            status_text(
                pb::Status::Stalled as i32,
                0,
                pb::Status::OutForDelivery as i32
            ),
            "STALLED in OUT_FOR_DELIVERY"
        );
    }

    #[test]
    fn a_change_is_one_line_with_its_flags() {
        let line = change_line(&pb::StatusChange {
            sequence: 9,
            tracking_number: "PARCEL0001".into(),
            version: 4,
            previous_status: pb::Status::OutForDelivery as i32,
            status: pb::Status::InTransit as i32,
            sub_status: pb::ScanType::Sorted as i32,
            cause_scan_id: "s9".into(),
            regression: true,
            event_time: Some(prost_types::Timestamp {
                seconds: 1_795_594_500,
                nanos: 0,
            }),
            ..Default::default()
        });
        assert_eq!(
            line,
            "#9  2026-11-25T08:15:00Z  PARCEL0001  v4  OUT_FOR_DELIVERY -> IN_TRANSIT (SORTED)  scan s9  [regression]"
        );
    }
}
