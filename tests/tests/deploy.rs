//! The deployment files, checked offline with real tools: `promtool check rules` and
//! `promtool test rules` (every alert fires on series that should fire it and stays silent on
//! healthy ones), and `tests/deploy/check_deploy.py` (kubernetes-validate on every manifest, the
//! `PrometheusRule` equal to the rules file, selectors and ports consistent, the systemd unit).
use std::process::Command;

use harness::{python, workspace_root};

#[test]
fn promtool_checks_and_unit_tests_pass() {
    let out = Command::new("bash")
        .arg(workspace_root().join("deploy/prometheus/check.sh"))
        .output()
        .expect("run deploy/prometheus/check.sh (needs promtool: cargo xtask setup)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{text}");
    assert!(out.status.success(), "promtool failed:\n{text}");
}

#[test]
fn kubernetes_and_systemd_manifests_validate() {
    let out = Command::new(python())
        .arg(workspace_root().join("tests/deploy/check_deploy.py"))
        .current_dir(workspace_root())
        .output()
        .expect("run tests/deploy/check_deploy.py (needs the venv: cargo xtask setup)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{text}");
    assert!(out.status.success(), "deploy check failed:\n{text}");
}
