//! The deployment files, checked offline with real tools: `promtool check rules` and
//! `promtool test rules` (every alert fires on series that should fire it and stays silent on
//! healthy ones), and `tests/fixtures/deploy/check_deploy.py` (kubernetes-validate on every
//! manifest, the `PrometheusRule` equal to the rules file, selectors and ports consistent, the
//! systemd unit).
use std::process::Command;

use tests::{python, workspace_root};

/// Runs `cmd` (`what`, which `needs` something `cargo xtask setup` installs), prints its output and
/// asserts that it passed.
fn passes(what: &str, needs: &str, cmd: &mut Command) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("run {what} (needs {needs}: cargo xtask setup): {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{text}");
    assert!(out.status.success(), "{what} failed:\n{text}");
}

#[test]
fn promtool_checks_and_unit_tests_pass() {
    passes(
        "deploy/prometheus/check.sh",
        "promtool",
        Command::new("bash").arg(workspace_root().join("deploy/prometheus/check.sh")),
    );
}

#[test]
fn kubernetes_and_systemd_manifests_validate() {
    let script = "tests/fixtures/deploy/check_deploy.py";
    passes(
        script,
        "the venv",
        Command::new(python())
            .arg(workspace_root().join(script))
            .current_dir(workspace_root()),
    );
}
