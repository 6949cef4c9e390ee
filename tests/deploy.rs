//! The ops kit in deploy/ is valid and true to the daemon: the dashboard, alert rules, scrape
//! config, Kubernetes manifests, systemd unit and Dockerfile parse and carry what they must, every
//! alert's runbook link lands on a section of docs/OPERATIONS.md, and every metric the dashboard
//! and the rules name is exported by a live scand (with Kafka on, against a real broker).
//! `promtool check rules/config` and `promtool test rules` run in .ci/run.

mod common;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::kafka::{Broker, Record};
use common::{batch, journey, minutes_ago, scan, Daemon};
use prost::Message;
use scand::proto::pb::ScanType;
use serde::Deserialize;

fn repo(path: &str) -> String {
    let full = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(path);
    std::fs::read_to_string(&full).unwrap_or_else(|e| panic!("{}: {e}", full.display()))
}

fn yaml_documents(path: &str) -> Vec<serde_yaml::Value> {
    serde_yaml::Deserializer::from_str(&repo(path))
        .map(|doc| serde_yaml::Value::deserialize(doc).unwrap_or_else(|e| panic!("{path}: {e}")))
        .collect()
}

/// Every `scand_*` metric name in a text (PromQL expressions).
fn metric_names(text: &str, into: &mut BTreeSet<String>) {
    let mut rest = text;
    while let Some(at) = rest.find("scand_") {
        let name: String = rest[at..]
            .chars()
            .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
            .collect();
        rest = &rest[at + name.len()..];
        into.insert(name);
    }
}

fn dashboard_exprs() -> Vec<String> {
    let dashboard: serde_json::Value =
        serde_json::from_str(&repo("deploy/grafana/scand-dashboard.json")).expect("dashboard json");
    assert!(dashboard["schemaVersion"].as_u64() >= Some(39));
    let panels = dashboard["panels"].as_array().expect("panels");
    assert!(panels.len() >= 15, "{} panels", panels.len());
    panels
        .iter()
        .flat_map(|p| {
            let targets = p["targets"].as_array().expect("targets");
            assert!(!targets.is_empty(), "panel {} has no query", p["title"]);
            targets
                .iter()
                .map(|t| t["expr"].as_str().expect("expr").to_owned())
        })
        .collect()
}

fn alert_rules() -> Vec<serde_yaml::Value> {
    let rules = &yaml_documents("deploy/prometheus/alerts.yml")[0];
    rules["groups"][0]["rules"]
        .as_sequence()
        .expect("rules")
        .clone()
}

/// GitHub's anchors of the `##`/`###` headings of a markdown file.
fn anchors(markdown: &str) -> BTreeSet<String> {
    markdown
        .lines()
        .filter(|l| l.starts_with("## ") || l.starts_with("### "))
        .map(|l| {
            l.trim_start_matches('#')
                .trim()
                .to_lowercase()
                .chars()
                .filter(|c| c.is_alphanumeric() || *c == ' ' || *c == '-')
                .map(|c| if c == ' ' { '-' } else { c })
                .collect()
        })
        .collect()
}

#[test]
fn every_alert_says_what_happened_and_links_its_runbook() {
    let runbook = anchors(&repo("docs/OPERATIONS.md"));
    let rules = alert_rules();
    let names: Vec<&str> = rules.iter().filter_map(|r| r["alert"].as_str()).collect();
    for required in [
        "ScandIngestStopped",
        "ScandRejectRateHigh",
        "ScandOutboxGrowing",
        "ScandConsumerLagGrowing",
        "ScandDeadLetters",
        "ScandWriteStalls",
        "ScandNotReady",
    ] {
        assert!(names.contains(&required), "no alert {required}");
    }
    for rule in &rules {
        let annotations = &rule["annotations"];
        for key in ["summary", "description", "runbook_url"] {
            assert!(
                annotations[key].as_str().is_some(),
                "{:?} lacks {key}",
                rule["alert"]
            );
        }
        let url = annotations["runbook_url"].as_str().unwrap_or_default();
        let anchor = url.rsplit('#').next().unwrap_or_default();
        assert!(
            url.contains("docs/OPERATIONS.md#") && runbook.contains(anchor),
            "{url}: no such section in docs/OPERATIONS.md"
        );
    }
    let scrape = &yaml_documents("deploy/prometheus/scrape.yml")[0];
    assert_eq!(scrape["rule_files"][0].as_str(), Some("alerts.yml"));
    assert_eq!(
        scrape["scrape_configs"][0]["static_configs"][0]["targets"][0].as_str(),
        Some("127.0.0.1:9464")
    );
}

#[test]
fn kubernetes_manifests_run_scand_with_its_volume_probes_and_ports() {
    let docs = yaml_documents("deploy/kubernetes/scand.yaml");
    let kinds: Vec<&str> = docs.iter().filter_map(|d| d["kind"].as_str()).collect();
    for kind in ["ConfigMap", "Service", "StatefulSet", "ServiceMonitor"] {
        assert!(kinds.contains(&kind), "no {kind} in {kinds:?}");
    }
    let set = docs
        .iter()
        .find(|d| d["kind"].as_str() == Some("StatefulSet"))
        .expect("statefulset");
    let container = &set["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(
        container["readinessProbe"]["httpGet"]["path"].as_str(),
        Some("/readyz")
    );
    assert_eq!(
        container["livenessProbe"]["httpGet"]["path"].as_str(),
        Some("/healthz")
    );
    assert_eq!(
        container["startupProbe"]["httpGet"]["path"].as_str(),
        Some("/readyz"),
        "liveness waits until a long store open or restore is done"
    );
    let defaults = scand::config::Config::default();
    let ports: Vec<u64> = container["ports"]
        .as_sequence()
        .expect("ports")
        .iter()
        .filter_map(|p| p["containerPort"].as_u64())
        .collect();
    assert_eq!(
        ports,
        vec![
            u64::from(defaults.grpc.listen.port()),
            u64::from(defaults.admin.listen.port())
        ]
    );
    assert_eq!(
        set["spec"]["volumeClaimTemplates"][0]["metadata"]["name"].as_str(),
        container["volumeMounts"][0]["name"].as_str()
    );
    let grace = set["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        .as_u64()
        .expect("grace");
    assert!(grace > defaults.grpc.shutdown_grace.as_secs());
    // The ConfigMap's config must load as a scand config.
    let config = docs
        .iter()
        .find(|d| d["kind"].as_str() == Some("ConfigMap"))
        .and_then(|d| d["data"]["scand.toml"].as_str())
        .expect("config");
    // Its tokens come from the Secret the pod mounts; here, files of test secrets.
    let secrets = token_secrets();
    let mount = container["volumeMounts"]
        .as_sequence()
        .expect("mounts")
        .iter()
        .find(|m| m["name"].as_str() == Some("tokens"))
        .and_then(|m| m["mountPath"].as_str())
        .expect("the tokens Secret is mounted");
    let config = config.replace(mount, &secrets.path().display().to_string());
    let file = tempfile::NamedTempFile::new().expect("temp");
    std::fs::write(file.path(), config).expect("write");
    let loaded =
        scand::config::Config::load(Some(file.path())).expect("the ConfigMap is a valid config");
    assert!(!loaded.grpc.listen.ip().is_loopback());
    assert_eq!(loaded.grpc.auth.tokens.len(), 3, "callers need a token");
    assert!(!loaded.grpc.allow_anonymous);
}

/// A directory holding the token secrets the shipped kit mounts, one file each.
fn token_secrets() -> tempfile::TempDir {
    let secrets = tempfile::tempdir().expect("tempdir");
    for name in ["scanners", "readers", "admin"] {
        let secret = format!("{name}-0123456789abcdef\n");
        std::fs::write(secrets.path().join(name), secret).expect("write a secret");
    }
    secrets
}

/// `scand check-config` run with the environment the image sets (its `ENV` lines).
fn check_config_as_the_image(config: &std::path::Path) -> std::process::Output {
    let dockerfile = repo("Dockerfile");
    let env_block = dockerfile
        .split("ENV ")
        .nth(1)
        .expect("the image sets its environment");
    let env: Vec<(String, String)> = env_block
        .lines()
        .take_while(|line| !line.starts_with("USER") && !line.trim().is_empty())
        .filter_map(|line| {
            let (name, value) = line.trim().trim_end_matches('\\').trim().split_once('=')?;
            Some((name.to_owned(), value.to_owned()))
        })
        .collect();
    assert!(
        env.iter().any(|(name, _)| name == "SCAND_GRPC__LISTEN"),
        "{env:?}"
    );
    std::process::Command::new(env!("CARGO_BIN_EXE_scand"))
        .args(["check-config", "--config"])
        .arg(config)
        .envs(env)
        .output()
        .expect("run scand check-config")
}

#[test]
fn the_image_serves_only_callers_with_a_token() {
    let refused = check_config_as_the_image(
        &PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("config/scand.toml"),
    );
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains(
            "invalid value for `grpc.listen`: 0.0.0.0:50051 is reachable from other hosts"
        ),
        "{stderr}"
    );
    let secrets = token_secrets();
    let image_config = repo("deploy/docker/tokens.toml")
        .replace("/run/secrets/scand", &secrets.path().display().to_string());
    let file = tempfile::NamedTempFile::new().expect("temp");
    std::fs::write(file.path(), image_config).expect("write");
    let accepted = check_config_as_the_image(file.path());
    assert!(
        accepted.status.success(),
        "{}",
        String::from_utf8_lossy(&accepted.stderr)
    );
}

/// The variables the kubelet puts into every pod of the namespace for each Service of the
/// shipped manifest (service links, on unless `enableServiceLinks: false`), named as it names
/// them: `SCAND_SERVICE_HOST`, `SCAND_PORT_50051_TCP_ADDR`, ... for a Service named `scand`.
fn service_link_variables(docs: &[serde_yaml::Value]) -> Vec<(String, String)> {
    let mut variables = Vec::new();
    let host = "10.96.0.12";
    for service in docs
        .iter()
        .filter(|d| d["kind"].as_str() == Some("Service"))
    {
        let name = service["metadata"]["name"]
            .as_str()
            .expect("named")
            .to_uppercase()
            .replace('-', "_");
        let ports = service["spec"]["ports"].as_sequence().expect("ports");
        let port = |p: &serde_yaml::Value| p["port"].as_u64().expect("port");
        variables.push((format!("{name}_SERVICE_HOST"), host.to_owned()));
        variables.push((format!("{name}_SERVICE_PORT"), port(&ports[0]).to_string()));
        variables.push((
            format!("{name}_PORT"),
            format!("tcp://{host}:{}", port(&ports[0])),
        ));
        for p in ports {
            let number = port(p);
            if let Some(port_name) = p["name"].as_str() {
                variables.push((
                    format!("{name}_SERVICE_PORT_{}", port_name.to_uppercase()),
                    number.to_string(),
                ));
            }
            let prefix = format!("{name}_PORT_{number}_TCP");
            variables.push((prefix.clone(), format!("tcp://{host}:{number}")));
            variables.push((format!("{prefix}_PROTO"), "tcp".to_owned()));
            variables.push((format!("{prefix}_PORT"), number.to_string()));
            variables.push((format!("{prefix}_ADDR"), host.to_owned()));
        }
    }
    variables
}

#[tokio::test]
async fn the_daemon_starts_with_the_environment_a_pod_of_the_manifest_gets() {
    let docs = yaml_documents("deploy/kubernetes/scand.yaml");
    let mut variables = service_link_variables(&docs);
    assert!(
        variables.iter().any(|(name, _)| name == "SCAND_PORT"),
        "the manifest's Service named scand injects SCAND_PORT: {variables:?}"
    );
    // And what an operator's shell may hold for `scand ctl`.
    variables.push(("SCAND_TARGET".to_owned(), "http://scand:50051".to_owned()));
    let env: Vec<(&str, &str)> = variables
        .iter()
        .map(|(name, value)| (name.as_str(), value.as_str()))
        .collect();
    let dir = tempfile::tempdir().expect("tempdir");
    let daemon = Daemon::start_with_env(&dir.path().join("data"), "", &env);
    assert_eq!(daemon.metric("scand_ready"), 1.0);
}

#[tokio::test]
async fn a_live_scrape_passes_promtool_check_metrics() {
    let dir = tempfile::tempdir().expect("tempdir");
    let daemon = Daemon::start(&dir.path().join("data"), "");
    let mut ingest = daemon.ingest().await;
    ingest
        .submit_scans(batch("p", journey("PROMTOOL01", "p")))
        .await
        .expect("submit");
    let scrape = daemon.metrics();
    let mut promtool = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect(
            "this test needs promtool: Debian's prometheus package (scripts/setup.sh installs it)",
        );
    use std::io::Write;
    promtool
        .stdin
        .take()
        .expect("stdin")
        .write_all(scrape.as_bytes())
        .expect("write the scrape");
    let out = promtool.wait_with_output().expect("promtool runs");
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_systemd_unit_and_the_image_are_hardened() {
    let unit = repo("deploy/systemd/scand.service");
    for line in [
        "DynamicUser=yes",
        "StateDirectory=scand",
        "ProtectSystem=strict",
        "NoNewPrivileges=yes",
        "CapabilityBoundingSet=",
        "SystemCallFilter=@system-service",
        "Restart=on-failure",
        "Type=notify",
        "NotifyAccess=main",
        "WatchdogSec=30s",
        "ExecStart=/usr/local/bin/scand run --config /etc/scand/scand.toml",
    ] {
        assert!(unit.lines().any(|l| l == line), "unit lacks {line}");
    }
    let dockerfile = repo("Dockerfile");
    assert!(
        dockerfile
            .lines()
            .filter(|l| l.starts_with("FROM "))
            .count()
            >= 2
    );
    assert!(dockerfile.lines().any(|l| l.starts_with("USER ")));
    assert!(dockerfile.contains("EXPOSE 50051 9464"));
}

#[tokio::test]
async fn every_metric_the_dashboard_and_the_alerts_name_is_exported() {
    let mut wanted = BTreeSet::new();
    for expr in dashboard_exprs() {
        metric_names(&expr, &mut wanted);
    }
    for rule in alert_rules() {
        metric_names(rule["expr"].as_str().unwrap_or_default(), &mut wanted);
    }

    let broker = Broker::start();
    broker
        .create_topics(&[
            ("scans.raw", 1),
            ("scans.dlq", 1),
            ("shipments.status", 1),
            ("scand.changelog", 1),
            ("scand.members", 1),
        ])
        .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let config = format!(
        "[stall]\nsweep_interval = \"100ms\"\n[stall.thresholds]\nin_transit = \"1m\"\n\
         [kafka]\nbrokers = \"{}\"\n[kafka.source]\nenabled = true\nbatch_max_wait = \"10ms\"\n\
         [kafka.sink]\nenabled = true\n[kafka.consumer.properties]\n\"statistics.interval.ms\" = \"200\"\n",
        broker.bootstrap
    );
    let daemon = Daemon::start(&dir.path().join("data"), &config);
    let mut ingest = daemon.ingest().await;
    let mut scans = journey("METRICS01", "m");
    scans.push(scans[0].clone());
    scans.push(scan(
        "stuck",
        "STUCK0001",
        ScanType::Sorted,
        minutes_ago(10),
        "hub",
    ));
    scans.push(scan("bad", "??", ScanType::Sorted, minutes_ago(10), "hub"));
    ingest.submit_scans(batch("b1", scans)).await.expect("ack");
    let records: Vec<Record> = vec![
        ("BROKEN1".into(), vec![0xff, 0x00], vec![]),
        (
            "KAFKA0001".into(),
            scan("k1", "KAFKA0001", ScanType::PickedUp, minutes_ago(5), "wh").encode_to_vec(),
            vec![],
        ),
    ];
    broker.produce("scans.raw", &records).await;

    // The series only TLS has (the served certificate's expiry), from a daemon with TLS on.
    let tls_dir = tempfile::tempdir().expect("tempdir");
    let key = rcgen::KeyPair::generate().expect("key");
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
        .expect("params")
        .self_signed(&key)
        .expect("certificate");
    std::fs::write(tls_dir.path().join("server.pem"), cert.pem()).expect("write");
    std::fs::write(tls_dir.path().join("server.key"), key.serialize_pem()).expect("write");
    let tls_daemon = Daemon::start(
        &tls_dir.path().join("data"),
        &format!(
            "[grpc.tls]\ncert = \"{0}/server.pem\"\nkey = \"{0}/server.key\"\n",
            tls_dir.path().display()
        ),
    );

    let deadline = Instant::now() + Duration::from_secs(60);
    let missing = loop {
        let scrapes = daemon.metrics() + &tls_daemon.metrics();
        let exported: BTreeSet<String> = scrapes
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.split(['{', ' ']).next())
            .map(str::to_owned)
            .collect();
        let missing: Vec<&String> = wanted.iter().filter(|n| !exported.contains(*n)).collect();
        if missing.is_empty() || Instant::now() > deadline {
            break missing.into_iter().cloned().collect::<Vec<_>>();
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert!(
        missing.is_empty(),
        "named in deploy/ but not exported by scand: {missing:?}"
    );
    assert!(
        wanted.len() > 30,
        "only {} metric names found",
        wanted.len()
    );
}
