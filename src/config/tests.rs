use std::net::SocketAddr;

use super::*;
use crate::proto::codec::Encoding;
use figment::Jail;

fn load_in_jail(toml: &str) -> Result<Config, String> {
    let mut result = Err(String::new());
    Jail::expect_with(|jail| {
        jail.create_file("scand.toml", toml)?;
        result = Config::load(Some(std::path::Path::new("scand.toml"))).map_err(|e| e.to_string());
        Ok(())
    });
    result
}

#[test]
fn shipped_config_is_the_defaults() {
    let shipped = include_str!("../../config/scand.toml");
    assert_eq!(load_in_jail(shipped), Ok(Config::default()));
}

#[test]
fn unknown_key_is_named() {
    let err = load_in_jail("[grpc]\nlisten_on = \"127.0.0.1:1\"\n").expect_err("unknown key");
    assert!(err.contains("listen_on"), "{err}");
}

#[test]
fn bad_address_is_named() {
    let err = load_in_jail("[grpc]\nlisten = \"localhost\"\n").expect_err("bad address");
    assert!(
        err.contains("grpc.listen") || err.contains("listen"),
        "{err}"
    );
    assert!(err.contains("socket address"), "{err}");
}

#[test]
fn bad_duration_is_named() {
    let err = load_in_jail("[dedup]\nwindow = \"sixty\"\n").expect_err("bad duration");
    assert!(err.contains("window"), "{err}");
}

#[test]
fn durations_read_as_humans_write_them() {
    let c = load_in_jail("[dedup]\nwindow = \"90s\"\n[stall.thresholds]\nin_transit = \"7days\"\n")
        .expect("valid");
    assert_eq!(c.dedup.window, Duration::from_secs(90));
    assert_eq!(
        c.stall.thresholds.in_transit,
        Duration::from_secs(7 * 24 * 3600)
    );
}

#[test]
fn environment_overrides_the_file() {
    Jail::expect_with(|jail| {
        jail.create_file("scand.toml", "[grpc]\nlisten = \"127.0.0.1:1000\"\n")?;
        jail.set_env("SCAND_GRPC__LISTEN", "0.0.0.0:2000");
        jail.set_env("SCAND_GRPC__ALLOW_ANONYMOUS", "true");
        jail.set_env("SCAND_INGEST__MAX_BATCH_SCANS", "7");
        jail.set_env("SCAND_CONFIG", "scand.toml");
        let c =
            Config::load(Some(std::path::Path::new("scand.toml"))).map_err(|e| e.to_string())?;
        assert_eq!(c.grpc.listen, SocketAddr::from(([0, 0, 0, 0], 2000)));
        assert_eq!(c.ingest.max_batch_scans, 7);
        Ok(())
    });
}

#[test]
fn variables_a_platform_injects_are_not_options_and_typos_in_options_are_errors() {
    Jail::expect_with(|jail| {
        // What Kubernetes gives every pod of a namespace with a Service named `scand`, and
        // what an operator's shell may hold for `scand ctl`.
        for (name, value) in [
            ("SCAND_PORT", "tcp://10.96.0.12:50051"),
            ("SCAND_PORT_50051_TCP", "tcp://10.96.0.12:50051"),
            ("SCAND_PORT_50051_TCP_ADDR", "10.96.0.12"),
            ("SCAND_PORT_50051_TCP_PORT", "50051"),
            ("SCAND_PORT_50051_TCP_PROTO", "tcp"),
            ("SCAND_SERVICE_HOST", "10.96.0.12"),
            ("SCAND_SERVICE_PORT", "50051"),
            ("SCAND_SERVICE_PORT_GRPC", "50051"),
            ("SCAND_TARGET", "http://scand:50051"),
            ("SCAND_CONFIG", "scand.toml"),
        ] {
            jail.set_env(name, value);
        }
        jail.set_env("SCAND_GRPC__LISTEN", "0.0.0.0:2000");
        jail.set_env("SCAND_GRPC__ALLOW_ANONYMOUS", "true");
        let c = Config::load(None).map_err(|e| e.to_string())?;
        assert_eq!(c.grpc.listen, SocketAddr::from(([0, 0, 0, 0], 2000)));
        jail.set_env("SCAND_GRPC__LISTN", "0.0.0.0:2001");
        let err = Config::load(None)
            .expect_err("a typo in an option")
            .to_string();
        assert!(err.contains("listn"), "{err}");
        Ok(())
    });
    Jail::expect_with(|jail| {
        jail.set_env("SCAND_GPRC__LISTEN", "0.0.0.0:2001");
        let err = Config::load(None)
            .expect_err("a typo in a section")
            .to_string();
        assert!(err.contains("gprc"), "{err}");
        Ok(())
    });
}

#[test]
fn an_address_other_hosts_reach_needs_tokens_or_client_certificates() {
    let err = load_in_jail("[grpc]\nlisten = \"0.0.0.0:50051\"\n").expect_err("anonymous");
    assert!(
        err.starts_with("invalid value for `grpc.listen`: 0.0.0.0:50051 is reachable"),
        "{err}"
    );
    load_in_jail("[grpc]\nlisten = \"0.0.0.0:50051\"\nallow_anonymous = true\n")
        .expect("anonymous by choice");
    load_in_jail(
        "[grpc]\nlisten = \"0.0.0.0:50051\"\n[[grpc.auth.tokens]]\n\
         token = \"0123456789abcdef-secret\"\ndevices = [\"*\"]\n",
    )
    .expect("tokens");
    load_in_jail("[grpc]\nlisten = \"127.0.0.1:50051\"\n").expect("loopback");
}

#[test]
fn kafka_sections_and_passthrough_properties_load() {
    let c = load_in_jail(
        "[kafka]\nbrokers = \"b1:9092\"\n[kafka.source]\nenabled = true\ntopics = [\"a\"]\n\
         topic_encodings = { a = \"json\" }\n[kafka.consumer.properties]\n\"security.protocol\" = \"SSL\"\n",
    )
    .expect("valid");
    assert!(c.kafka.source.enabled);
    assert_eq!(c.kafka.source.topic_encodings["a"], Encoding::Json);
    assert_eq!(c.kafka.consumer.properties["security.protocol"], "SSL");
    let err = load_in_jail("[kafka.source]\nenabled = true\ndead_letter_topic = \"scans.raw\"\n")
        .expect_err("loop");
    assert!(err.contains("kafka.source.dead_letter_topic"), "{err}");
}

#[test]
fn tls_and_tokens_are_checked_and_tokens_never_printed() {
    let err = load_in_jail("[grpc.tls]\ncert = \"server.pem\"\n").expect_err("no key");
    assert_eq!(
        err,
        "invalid value for `grpc.tls`: set both `cert` and `key`, or neither"
    );
    let err = load_in_jail("[grpc.tls]\ncert = \"missing.pem\"\nkey = \"missing.key\"\n")
        .expect_err("missing file");
    assert_eq!(
        err,
        "invalid value for `grpc.tls.cert`: missing.pem is not a readable file"
    );
    let err = load_in_jail("[grpc.tls]\nclient_ca = \"ca.pem\"\n").expect_err("no tls");
    assert!(
        err.starts_with("invalid value for `grpc.tls.client_ca`"),
        "{err}"
    );
    let tokens = "[[grpc.auth.tokens]]\ntoken = \"0123456789abcdef-secret\"\n\
                  devices = [\"dev-1\"]\n";
    let config = load_in_jail(tokens).expect("valid token");
    let shown = format!("{config:?}");
    assert!(!shown.contains("secret"), "{shown}");
    let err = load_in_jail(&format!("{tokens}{tokens}")).expect_err("twice");
    assert_eq!(
        err,
        "invalid value for `grpc.auth.tokens`: token #2 is configured twice"
    );
    let err = load_in_jail("[[grpc.auth.tokens]]\ntoken = \"short\"\ndevices = [\"d\"]\n")
        .expect_err("short");
    assert_eq!(
        err,
        "invalid value for `grpc.auth.tokens`: token #1 is shorter than 16 characters"
    );
}

#[test]
fn zero_limit_is_refused() {
    let err = load_in_jail("[ingest]\nmax_batch_scans = 0\n").expect_err("zero");
    assert_eq!(
        err,
        "invalid value for `ingest.max_batch_scans`: must be at least 1"
    );
}

#[test]
fn memtables_total_below_one_memtable_is_refused() {
    let err = load_in_jail("[store]\nmemtables_total_bytes = 1048576\n").expect_err("small");
    assert_eq!(
        err,
        "invalid value for `store.memtables_total_bytes`: must be at least store.memtable_bytes"
    );
}
