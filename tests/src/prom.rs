//! A real Prometheus for the tests: Debian's `prometheus`, on loopback with a temporary config that
//! scrapes one target and evaluates the project's alert rules every [`INTERVAL`] (the shipped
//! rules file with its groups' `interval: 30s` set to it; expressions and `for:` as shipped).

use std::{fmt::Write as _, path::PathBuf, process::Command, time::Duration};

use serde_json::Value;

use crate::{free_port, http_get, wait_for, workspace_root, Proc};

/// Scrape and rule-evaluation interval. A second let a scrape miss a state the probe showed for
/// about 1.5 s (vLLM's KV cache above 95 % under a 3 s load: Prometheus saw 0.857 at most, the
/// alert never went pending; CI, 2026-12-07); four scrapes a second do not.
const INTERVAL: &str = "250ms";

pub struct Prometheus {
    pub proc: Proc,
    /// `127.0.0.1:<port>` of its HTTP API.
    pub addr: String,
    dir: PathBuf,
}

impl Prometheus {
    /// Scrape `target` (`host:port`) as job `llm-probe` with deploy/prometheus/llm-probe-rules.yml.
    pub fn start(target: &str) -> Prometheus {
        Self::launch(target, None)
    }

    /// [`Self::start`], sending alerts to the Alertmanager at `alertmanager` (`host:port`), with
    /// every rule's `for:` set to 0 s so that an alert fires at the first evaluation where its
    /// expression holds (expressions and labels as shipped).
    pub fn start_alerting(target: &str, alertmanager: &str) -> Prometheus {
        Self::launch(target, Some(alertmanager))
    }

    fn launch(target: &str, alertmanager: Option<&str>) -> Prometheus {
        let bin = ["/usr/bin/prometheus", "/usr/sbin/prometheus"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())
            .expect("prometheus missing: run `cargo xtask setup` (Debian package `prometheus`)");
        let port = free_port();
        let dir =
            std::env::temp_dir().join(format!("llm-probe-prom-{}-{port}", std::process::id()));
        std::fs::create_dir_all(dir.join("data")).expect("temp dir");
        let rules =
            std::fs::read_to_string(workspace_root().join("deploy/prometheus/llm-probe-rules.yml"))
                .expect("rules file");
        assert!(
            rules.contains("interval: 30s"),
            "the rules' group interval moved"
        );
        let mut rules = rules.replace("interval: 30s", &format!("interval: {INTERVAL}"));
        let mut config = format!(
            "global:\n  scrape_interval: {INTERVAL}\n  evaluation_interval: {INTERVAL}\n\
             rule_files:\n  - {}\n\
             scrape_configs:\n  - job_name: llm-probe\n    static_configs:\n      - targets: ['{target}']\n",
            dir.join("rules.yml").display(),
        );
        if let Some(am) = alertmanager {
            rules = rules
                .lines()
                .map(|l| {
                    let indent = &l[..l.len() - l.trim_start().len()];
                    if l.trim_start().starts_with("for: ") {
                        format!("{indent}for: 0s")
                    } else {
                        l.to_owned()
                    }
                })
                .collect::<Vec<_>>()
                .join("\n");
            let _ = writeln!(
                config,
                "alerting:\n  alertmanagers:\n    - static_configs:\n        - targets: ['{am}']"
            );
        }
        std::fs::write(dir.join("rules.yml"), rules).expect("write rules");
        std::fs::write(dir.join("prometheus.yml"), config).expect("write config");
        let proc = Proc::spawn(
            "prometheus",
            Command::new(bin)
                .arg(format!(
                    "--config.file={}",
                    dir.join("prometheus.yml").display()
                ))
                .arg(format!(
                    "--storage.tsdb.path={}",
                    dir.join("data").display()
                ))
                .arg(format!("--web.listen-address=127.0.0.1:{port}")),
        );
        let addr = format!("127.0.0.1:{port}");
        wait_for("Prometheus ready", Duration::from_secs(30), || {
            http_get(&addr, "/-/ready").is_ok_and(|(s, _)| s == 200)
        });
        Prometheus { proc, addr, dir }
    }

    /// An instant query through the HTTP API (the whole JSON answer).
    pub fn query(&self, q: &str) -> Value {
        let (_, body) = http_get(&self.addr, &format!("/api/v1/query?query={}", encode(q)))
            .expect("query Prometheus");
        serde_json::from_str(&body).unwrap_or(Value::Null)
    }

    /// The result vector of [`Self::query`] (empty when none or on error).
    pub fn series(&self, q: &str) -> Vec<Value> {
        self.query(q)["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Percent-encodes a query for a URL.
pub fn encode(q: &str) -> String {
    q.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}
