//! Security: gRPC over TLS with mutual TLS (certificates made at test time with rcgen), and
//! per-device bearer tokens. Only a scanner with a certificate from the configured CA gets a
//! connection; only a known token gets a call; a scan from a device its token does not allow
//! is REJECTED with its reason while the rest of the batch is stored.

mod common;

use std::path::Path;

use common::*;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
};
use scand::proto::pb::{self, scan_ingest_client::ScanIngestClient, Outcome};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

const DOCK_TOKEN: &str = "dock7-token-0123456789abcdef";
const HUB_TOKEN: &str = "hub-token-0123456789abcdefgh";

struct Pki {
    ca_pem: String,
    client_cert_pem: String,
    client_key_pem: String,
    rogue_cert_pem: String,
    rogue_key_pem: String,
}

fn ca(name: &str) -> (CertificateParams, KeyPair, String) {
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    let key = KeyPair::generate().expect("ca key");
    let pem = params.self_signed(&key).expect("self-signed").pem();
    (params, key, pem)
}

fn leaf(
    issuer: &Issuer<'_, &KeyPair>,
    name: &str,
    usage: ExtendedKeyUsagePurpose,
) -> (String, String) {
    let params = CertificateParams::new(vec![name.to_owned()]).expect("leaf params");
    signed(issuer, params, usage)
}

/// `params` for `usage`, named by their first subject name, issued by `issuer`: PEM cert, key.
fn signed(
    issuer: &Issuer<'_, &KeyPair>,
    mut params: CertificateParams,
    usage: ExtendedKeyUsagePurpose,
) -> (String, String) {
    let name = match params.subject_alt_names.first() {
        Some(rcgen::SanType::DnsName(name)) => name.to_string(),
        _ => "leaf".to_owned(),
    };
    params.distinguished_name.push(DnType::CommonName, name);
    params.extended_key_usages = vec![usage];
    let key = KeyPair::generate().expect("leaf key");
    let cert = params.signed_by(&key, issuer).expect("signed");
    (cert.pem(), key.serialize_pem())
}

/// A CA issuing the server's and a scanner's certificates, and a rogue CA with its own client.
fn pki(dir: &Path) -> Pki {
    let (ca_params, ca_key, ca_pem) = ca("scand test CA");
    let issuer = Issuer::from_params(&ca_params, &ca_key);
    let (server_cert, server_key) = leaf(&issuer, "localhost", ExtendedKeyUsagePurpose::ServerAuth);
    let (client_cert_pem, client_key_pem) = leaf(
        &issuer,
        "dock7-handheld-1",
        ExtendedKeyUsagePurpose::ClientAuth,
    );
    let (rogue_params, rogue_key, _) = ca("rogue CA");
    let rogue_issuer = Issuer::from_params(&rogue_params, &rogue_key);
    let (rogue_cert_pem, rogue_key_pem) = leaf(
        &rogue_issuer,
        "dock7-handheld-1",
        ExtendedKeyUsagePurpose::ClientAuth,
    );
    for (name, pem) in [
        ("ca.pem", &ca_pem),
        ("server.pem", &server_cert),
        ("server.key", &server_key),
    ] {
        std::fs::write(dir.join(name), pem).expect("write pem");
    }
    Pki {
        ca_pem,
        client_cert_pem,
        client_key_pem,
        rogue_cert_pem,
        rogue_key_pem,
    }
}

fn secured_daemon(dir: &Path) -> (Daemon, Pki) {
    let pki = pki(dir);
    let config = format!(
        "[grpc.tls]\ncert = \"{0}/server.pem\"\nkey = \"{0}/server.key\"\nclient_ca = \"{0}/ca.pem\"\n\
         [[grpc.auth.tokens]]\ntoken = \"{DOCK_TOKEN}\"\ndevices = [\"dock7-handheld-1\", \"dock7-handheld-2\"]\n\
         [[grpc.auth.tokens]]\ntoken = \"{HUB_TOKEN}\"\ndevices = [\"*\"]\nscopes = [\"ingest\", \"read\"]\n",
        dir.display()
    );
    (Daemon::start(&dir.join("data"), &config), pki)
}

async fn tls_channel(
    daemon: &Daemon,
    ca: &str,
    identity: Option<(&str, &str)>,
) -> Result<Channel, String> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .domain_name("localhost");
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    Channel::from_shared(format!("https://localhost:{}", daemon.grpc.port()))
        .expect("uri")
        .tls_config(tls)
        .expect("client tls")
        .connect()
        .await
        .map_err(|e| format!("{e:?}"))
}

fn scan_from(device: &str, id: &str, number: &str) -> pb::Scan {
    let mut scan = scan(
        id,
        number,
        pb::ScanType::ArrivedAtFacility,
        minutes_ago(5),
        "hub-1",
    );
    scan.device_id = device.to_owned();
    scan
}

/// One scan from `device`, submitted with `token` (the batch is named after the scan).
async fn submit_one(
    client: &mut ScanIngestClient<Channel>,
    device: &str,
    scan_id: &str,
    number: &str,
    token: &str,
) -> Result<pb::BatchAck, tonic::Status> {
    let scans = vec![scan_from(device, scan_id, number)];
    client
        .submit_scans(with_token(batch(scan_id, scans), token))
        .await
        .map(tonic::Response::into_inner)
}

fn with_token<T>(message: T, token: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {token}").parse().expect("ascii"),
    );
    request
}

#[tokio::test]
async fn only_clients_with_a_certificate_from_the_ca_get_a_connection() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (daemon, pki) = secured_daemon(dir.path());

    // No client certificate, a certificate from another CA, and plaintext: all refused.
    let refused = [
        tls_channel(&daemon, &pki.ca_pem, None).await,
        tls_channel(
            &daemon,
            &pki.ca_pem,
            Some((&pki.rogue_cert_pem, &pki.rogue_key_pem)),
        )
        .await,
    ];
    for attempt in refused {
        match attempt {
            Err(_) => {}
            // rustls may complete the client side before the server's alert arrives: then the
            // first call is the one that fails.
            Ok(channel) => {
                let mut client = ScanIngestClient::new(channel);
                let call = submit_one(
                    &mut client,
                    "dock7-handheld-1",
                    "x-1",
                    "TLSPARCEL0001",
                    DOCK_TOKEN,
                )
                .await;
                let status = call.expect_err("a client without a valid certificate is refused");
                assert!(
                    matches!(
                        status.code(),
                        tonic::Code::Unavailable | tonic::Code::Cancelled | tonic::Code::Unknown
                    ),
                    "{status:?}"
                );
            }
        }
    }
    let plaintext = ScanIngestClient::connect(daemon.url()).await;
    if let Ok(mut client) = plaintext {
        submit_one(
            &mut client,
            "dock7-handheld-1",
            "p-1",
            "TLSPARCEL0001",
            DOCK_TOKEN,
        )
        .await
        .expect_err("plaintext refused");
    }

    // A scanner with a certificate from the CA streams and is answered.
    let channel = tls_channel(
        &daemon,
        &pki.ca_pem,
        Some((&pki.client_cert_pem, &pki.client_key_pem)),
    )
    .await
    .expect("mutual TLS connection");
    let mut client = ScanIngestClient::new(channel);
    let ack = submit_one(
        &mut client,
        "dock7-handheld-1",
        "ok-1",
        "TLSPARCEL0001",
        DOCK_TOKEN,
    )
    .await
    .expect("accepted over mutual TLS");
    assert_eq!(outcomes(&ack), vec![Outcome::Accepted]);
    let scans = tokio_stream::iter(vec![batch(
        "s",
        vec![scan_from("dock7-handheld-2", "ok-2", "TLSPARCEL0002")],
    )]);
    let mut acks = client
        .stream_scans(with_token(scans, DOCK_TOKEN))
        .await
        .expect("stream over mutual TLS")
        .into_inner();
    let ack = acks.message().await.expect("ack").expect("one ack");
    assert_eq!(outcomes(&ack), vec![Outcome::Accepted]);

    // The operator's client speaks mutual TLS too.
    std::fs::write(dir.path().join("client.pem"), &pki.client_cert_pem).expect("write");
    std::fs::write(dir.path().join("client.key"), &pki.client_key_pem).expect("write");
    let ctl = |with_identity: bool| {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_scand"));
        command
            .args(["ctl", "--target"])
            .arg(format!("https://localhost:{}", daemon.grpc.port()))
            .arg("--tls-ca")
            .arg(dir.path().join("ca.pem"));
        if with_identity {
            command
                .arg("--tls-cert")
                .arg(dir.path().join("client.pem"))
                .arg("--tls-key")
                .arg(dir.path().join("client.key"));
        }
        command
            .args(["--token", HUB_TOKEN, "get", "TLSPARCEL0001", "--json"])
            .env_remove("SCAND_TOKEN")
            .output()
            .expect("run scand ctl")
    };
    let shown = ctl(true);
    assert!(
        shown.status.success(),
        "{}",
        String::from_utf8_lossy(&shown.stderr)
    );
    assert!(String::from_utf8_lossy(&shown.stdout).contains("\"TLSPARCEL0001\""));
    let refused = ctl(false);
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("scand at https://localhost:"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
}

#[tokio::test]
async fn tokens_authorize_calls_and_each_scan_s_device() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (daemon, pki) = secured_daemon(dir.path());
    let channel = tls_channel(
        &daemon,
        &pki.ca_pem,
        Some((&pki.client_cert_pem, &pki.client_key_pem)),
    )
    .await
    .expect("mutual TLS connection");
    let mut client = ScanIngestClient::new(channel);
    let one = || {
        batch(
            "t",
            vec![scan_from("dock7-handheld-1", "t-1", "TOKPARCEL0001")],
        )
    };

    let missing = client.submit_scans(one()).await.expect_err("no token");
    assert_eq!(missing.code(), tonic::Code::Unauthenticated);
    assert!(
        missing.message().starts_with("missing bearer token"),
        "{}",
        missing.message()
    );
    let unknown = client
        .submit_scans(with_token(one(), "dock7-token-0123456789abcdeX"))
        .await
        .expect_err("unknown token");
    assert_eq!(unknown.code(), tonic::Code::Unauthenticated);
    assert_eq!(unknown.message(), "unknown bearer token");
    let stream = client
        .stream_scans(tokio_stream::iter(vec![one()]))
        .await
        .expect_err("a stream without a token is refused");
    assert_eq!(stream.code(), tonic::Code::Unauthenticated);

    // The dock's token covers its two handhelds, not another dock's.
    let ack = client
        .submit_scans(with_token(
            batch(
                "mixed",
                vec![
                    scan_from("dock7-handheld-1", "m-1", "TOKPARCEL0002"),
                    scan_from("dock9-handheld-1", "m-2", "TOKPARCEL0003"),
                    scan_from("dock7-handheld-2", "m-3", "TOKPARCEL0004"),
                ],
            ),
            DOCK_TOKEN,
        ))
        .await
        .expect("answered")
        .into_inner();
    assert_eq!(
        outcomes(&ack),
        vec![Outcome::Accepted, Outcome::Rejected, Outcome::Accepted]
    );
    assert_eq!(
        ack.results[1].reason,
        "device_not_allowed: device_id \"dock9-handheld-1\" is not allowed for this bearer token"
    );
    // The hub's token allows any device.
    let ack = submit_one(
        &mut client,
        "dock9-handheld-1",
        "h-1",
        "TOKPARCEL0003",
        HUB_TOKEN,
    )
    .await
    .expect("answered");
    assert_eq!(outcomes(&ack), vec![Outcome::Accepted]);

    let metrics = daemon.metrics();
    for line in [
        "scand_auth_failures_total{reason=\"missing_token\"} 2",
        "scand_auth_failures_total{reason=\"unknown_token\"} 1",
        "scand_scans_rejected_total{reason=\"device_not_allowed\"} 1",
    ] {
        assert!(metrics.contains(line), "{line} missing from\n{metrics}");
    }
}

/// A daemon with an ingest token, a read token kept in a file of its own, and an admin token:
/// every service asks for its scope, health stays open, and `scand ctl` sends its token.
#[tokio::test]
async fn scoped_tokens_guard_the_read_and_admin_side_too() {
    const READ_TOKEN: &str = "reader-token-0123456789abcdef";
    const ADMIN_TOKEN: &str = "admin-token-0123456789abcdefg";
    let dir = tempfile::tempdir().expect("tempdir");
    let read_file = dir.path().join("read.token");
    std::fs::write(&read_file, format!("{READ_TOKEN}\n")).expect("write the token file");
    let config = format!(
        "[[grpc.auth.tokens]]\ntoken = \"{HUB_TOKEN}\"\ndevices = [\"*\"]\n\
         [[grpc.auth.tokens]]\ntoken_file = \"{}\"\nscopes = [\"read\"]\n\
         [[grpc.auth.tokens]]\ntoken = \"{ADMIN_TOKEN}\"\nscopes = [\"admin\"]\n",
        read_file.display()
    );
    let daemon = Daemon::start(&dir.path().join("data"), &config);
    let mut ingest = daemon.ingest().await;
    let ack = ingest
        .submit_scans(with_token(
            batch("s", journey("SCOPEPARCEL1", "s")),
            HUB_TOKEN,
        ))
        .await
        .expect("an ingest token ingests")
        .into_inner();
    assert!(ack
        .results
        .iter()
        .all(|r| r.outcome == Outcome::Accepted as i32));
    let denied = ingest
        .submit_scans(with_token(
            batch("r", journey("SCOPEPARCEL2", "r")),
            READ_TOKEN,
        ))
        .await
        .expect_err("a read token does not ingest");
    assert_eq!(denied.code(), tonic::Code::PermissionDenied);

    let mut tracking = daemon.tracking().await;
    let get = |token: Option<&str>| {
        let request = pb::GetShipmentRequest {
            tracking_number: "SCOPEPARCEL1".into(),
            journey: 0,
        };
        match token {
            Some(token) => with_token(request, token),
            None => tonic::Request::new(request),
        }
    };
    let anonymous = tracking
        .get_shipment(get(None))
        .await
        .expect_err("no token");
    assert_eq!(anonymous.code(), tonic::Code::Unauthenticated);
    assert!(
        anonymous.message().contains("scope `read`"),
        "{}",
        anonymous.message()
    );
    let ingest_only = tracking
        .get_shipment(get(Some(HUB_TOKEN)))
        .await
        .expect_err("an ingest token does not read");
    assert_eq!(ingest_only.code(), tonic::Code::PermissionDenied);
    let shipment = tracking
        .get_shipment(get(Some(READ_TOKEN)))
        .await
        .expect("the read token from its file reads")
        .into_inner();
    assert_eq!(shipment.timeline.len(), journey("SCOPEPARCEL1", "s").len());
    let feed = tracking
        .watch_status_changes(pb::WatchRequest::default())
        .await
        .expect_err("the feed needs a token too");
    assert_eq!(feed.code(), tonic::Code::Unauthenticated);

    let mut operations = pb::operations_client::OperationsClient::connect(daemon.url())
        .await
        .expect("connect Operations");
    let reader_stats = operations
        .get_stats(with_token(pb::GetStatsRequest {}, READ_TOKEN))
        .await
        .expect_err("a read token is no admin");
    assert_eq!(reader_stats.code(), tonic::Code::PermissionDenied);
    operations
        .get_stats(with_token(pb::GetStatsRequest {}, ADMIN_TOKEN))
        .await
        .expect("the admin token gets stats");

    let channel = Channel::from_shared(daemon.url())
        .expect("url")
        .connect()
        .await
        .expect("connect");
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    health
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .expect("health stays open for probes");

    let ctl = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_scand"))
            .arg("ctl")
            .args(["--target", &daemon.url()])
            .args(args)
            .env_remove("SCAND_TARGET")
            .env_remove("SCAND_TOKEN")
            .output()
            .expect("run scand ctl")
    };
    let read_file = read_file.to_str().expect("utf-8 path");
    let table = ctl(&["--token-file", read_file, "get", "SCOPEPARCEL1"]);
    assert!(
        table.status.success(),
        "{}",
        String::from_utf8_lossy(&table.stderr)
    );
    assert!(String::from_utf8_lossy(&table.stdout).contains("SCOPEPARCEL1"));
    let refused = ctl(&["get", "SCOPEPARCEL1"]);
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("Unauthenticated"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
}

/// A server certificate for `names`, issued by `issuer`, expiring on `expires` (y, m, d).
fn server_certificate(
    issuer: &Issuer<'_, &KeyPair>,
    names: &[&str],
    expires: (i32, u8, u8),
) -> (String, String) {
    let mut params =
        CertificateParams::new(names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>())
            .expect("params");
    params.not_after = rcgen::date_time_ymd(expires.0, expires.1, expires.2);
    signed(issuer, params, ExtendedKeyUsagePurpose::ServerAuth)
}

/// Installs a certificate and its key as an operator's tooling would: each file replaced whole.
fn install(dir: &Path, (cert, key): &(String, String)) {
    for (name, pem) in [("server.key", key), ("server.pem", cert)] {
        let staged = dir.join(format!("{name}.new"));
        std::fs::write(&staged, pem).expect("write");
        std::fs::rename(&staged, dir.join(name)).expect("replace");
    }
}

async fn tls_tracking(
    daemon: &Daemon,
    ca_pem: &str,
    name: &str,
) -> Result<pb::tracking_client::TrackingClient<Channel>, String> {
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca_pem))
        .domain_name(name);
    Channel::from_shared(format!("https://localhost:{}", daemon.grpc.port()))
        .expect("uri")
        .tls_config(tls)
        .expect("client tls")
        .connect()
        .await
        .map(pb::tracking_client::TrackingClient::new)
        .map_err(|e| format!("{e:?}"))
}

async fn answers(client: &mut pb::tracking_client::TrackingClient<Channel>) -> bool {
    let reply = client
        .get_shipment(pb::GetShipmentRequest {
            tracking_number: "ROTATE00001".into(),
            journey: 0,
        })
        .await;
    matches!(reply, Err(status) if status.code() == tonic::Code::NotFound)
}

/// Waits until scand counts `n` successful TLS reloads.
async fn wait_for_reloads(daemon: &Daemon, n: f64) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while daemon.metric("scand_tls_reloads_total{result=\"ok\"}") < n {
        assert!(std::time::Instant::now() < deadline, "no reload");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// Rotating the server certificate needs no restart: on SIGHUP, and on a changed file, new
/// connections get the new certificate while an open one goes on; the expiry is exported.
#[tokio::test]
async fn the_server_certificate_rotates_under_a_live_connection() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (ca_params, ca_key, ca_pem) = ca("scand rotation CA");
    let issuer = Issuer::from_params(&ca_params, &ca_key);
    install(
        dir.path(),
        &server_certificate(&issuer, &["localhost"], (2031, 1, 1)),
    );
    let config = format!(
        "[grpc.tls]\ncert = \"{0}/server.pem\"\nkey = \"{0}/server.key\"\n",
        dir.path().display()
    );
    let daemon = Daemon::start(&dir.path().join("data"), &config);
    let expiry = "scand_tls_certificate_expiry_timestamp_seconds";
    assert_eq!(daemon.metric(expiry), 1_924_992_000.0, "2031-01-01");
    let mut open = tls_tracking(&daemon, &ca_pem, "localhost")
        .await
        .expect("connects");
    assert!(answers(&mut open).await);
    assert!(
        tls_tracking(&daemon, &ca_pem, "rotated.scand.test")
            .await
            .is_err(),
        "the first certificate does not name rotated.scand.test"
    );

    install(
        dir.path(),
        &server_certificate(&issuer, &["localhost", "rotated.scand.test"], (2032, 1, 1)),
    );
    std::process::Command::new("kill")
        .args(["-HUP", &daemon.child.id().to_string()])
        .status()
        .expect("send SIGHUP");
    wait_for_reloads(&daemon, 1.0).await;
    assert_eq!(daemon.metric(expiry), 1_956_528_000.0, "2032-01-01");
    let mut rotated = tls_tracking(&daemon, &ca_pem, "rotated.scand.test")
        .await
        .expect("new connections get the new certificate");
    assert!(answers(&mut rotated).await);
    assert!(answers(&mut open).await, "the open connection goes on");

    // A changed file is noticed without a signal.
    install(
        dir.path(),
        &server_certificate(&issuer, &["localhost"], (2033, 1, 1)),
    );
    wait_for_reloads(&daemon, 2.0).await;
    assert_eq!(daemon.metric(expiry), 1_988_150_400.0, "2033-01-01");
    assert!(answers(&mut open).await);
}
