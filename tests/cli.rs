//! The `scand` command line: help, and `check-config` on good and broken files.

use std::process::{Command, Output};

fn scand(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_scand"))
        .args(args)
        .env_remove("SCAND_CONFIG")
        .output()
        .expect("run scand")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn help_documents_every_subcommand() {
    let out = scand(&["--help"]);
    assert!(out.status.success());
    let help = text(&out.stdout);
    assert!(
        help.contains("run") && help.contains("Run the daemon until SIGTERM or SIGINT"),
        "{help}"
    );
    assert!(
        help.contains("check-config") && help.contains("Validate a config file"),
        "{help}"
    );
    assert!(
        help.contains("ctl") && help.contains("Operator commands against a running daemon"),
        "{help}"
    );
    let ctl_help = text(&scand(&["ctl", "--help"]).stdout);
    for sub in ["get", "tail", "stats", "--target"] {
        assert!(ctl_help.contains(sub), "ctl --help lacks {sub}: {ctl_help}");
    }
    for sub in ["run", "check-config"] {
        let out = scand(&[sub, "--help"]);
        assert!(out.status.success(), "{sub} --help");
        assert!(text(&out.stdout).contains("--config"), "{sub} --help");
    }
}

#[test]
fn shipped_config_checks_ok() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/config/scand.toml");
    let out = scand(&["check-config", "--config", path]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).ends_with(": ok\n"));
}

fn check(toml: &str) -> (bool, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("scand.toml");
    std::fs::write(&path, toml).expect("write");
    let out = scand(&[
        "check-config",
        "--config",
        path.to_str().expect("utf-8 path"),
    ]);
    (out.status.success(), text(&out.stderr))
}

#[test]
fn unknown_key_fails_naming_it() {
    let (ok, err) = check("[store]\npaht = \"/tmp/x\"\n");
    assert!(!ok);
    assert!(
        err.contains("unknown field") && err.contains("paht"),
        "{err}"
    );
}

#[test]
fn bad_address_fails_naming_the_key() {
    let (ok, err) = check("[admin]\nlisten = \"127.0.0.1\"\n");
    assert!(!ok);
    assert!(
        err.contains("admin.listen") && err.contains("socket address"),
        "{err}"
    );
}

#[test]
fn bad_duration_fails_naming_the_key() {
    let (ok, err) = check("[ingest]\nmax_future_skew = \"5 parsecs\"\n");
    assert!(!ok);
    assert!(err.contains("ingest.max_future_skew"), "{err}");
}

#[test]
fn missing_file_fails() {
    let out = scand(&["check-config", "--config", "/nonexistent/scand.toml"]);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("/nonexistent/scand.toml does not exist"));
}
