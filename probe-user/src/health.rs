//! `/health` and `llm-probe health`: a verdict — `overall` ∈ healthy/warning/critical,
//! `timestamp`, and `checks` for gpu, `kv_cache`, latency, errors and queue (each with status,
//! value, issues) — plus the probe's own checks (targets, programs, events). Thresholds default to
//! the alert rules' (docs/health.md lists them), overridable in a config file (`[health]` in
//! llm-probe.toml, every key documented on `Thresholds`). HTTP 200 for healthy/warning, 503 for
//! critical. Pure: the agent keeps a `Health` snapshot current; the server asks it for a verdict.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::{SystemTime, UNIX_EPOCH},
};

use hyper::StatusCode;
use serde::{Deserialize, Serialize};

use crate::requests::Recent;

#[derive(Clone, Debug, Serialize)]
pub struct TargetView {
    pub pid: u32,
    pub comm: String,
    pub alive: bool,
    /// How the process became a target: `pid`, `port`, `fork`.
    pub via: &'static str,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Healthy,
    Warning,
    Critical,
    /// Nothing to judge (no GPU, no engine page): never raises `overall`.
    Unavailable,
}

impl Status {
    fn rank(self) -> u8 {
        match self {
            Self::Healthy | Self::Unavailable => 0,
            Self::Warning => 1,
            Self::Critical => 2,
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct Check {
    pub status: Status,
    pub value: Option<f64>,
    pub issues: Vec<String>,
}

impl Check {
    fn new(status: Status, value: Option<f64>) -> Self {
        Self {
            status,
            value,
            issues: Vec::new(),
        }
    }
}

/// Health thresholds. Defaults match the alert rules' (deploy/prometheus); a value strictly above
/// a threshold triggers it (`kv_cache_warning = 0.85` → 0.85 is healthy, 0.851 is a warning).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Thresholds {
    /// KV-cache utilization (0–1, highest engine) above which the check warns.
    pub kv_cache_warning: f64,
    /// … and is critical.
    pub kv_cache_critical: f64,
    /// TTFT p99 in seconds over the last `latency_window` requests: warning above.
    pub ttft_p99_warning_seconds: f64,
    /// … critical above.
    pub ttft_p99_critical_seconds: f64,
    /// Requests (most recent) that the TTFT p99 and the error rate are computed over.
    pub latency_window: usize,
    /// Error rate (errors / requests over the window) above which the check warns.
    pub error_rate_warning: f64,
    /// … and is critical.
    pub error_rate_critical: f64,
    /// Queue depth (requests waiting for a first token; the larger of the probe's view and the
    /// engines' own) above which the check warns.
    pub queue_warning: f64,
    /// … and is critical.
    pub queue_critical: f64,
    /// GPU utilization below which a GPU counts as idle (warning).
    pub gpu_idle_below: f64,
    /// GPU utilization above which a GPU counts as saturated (warning).
    pub gpu_saturated_above: f64,
}

impl Default for Thresholds {
    fn default() -> Self {
        Self {
            kv_cache_warning: 0.85,
            kv_cache_critical: 0.95,
            ttft_p99_warning_seconds: 2.0,
            ttft_p99_critical_seconds: 5.0,
            latency_window: 100,
            error_rate_warning: 0.01,
            error_rate_critical: 0.05,
            queue_warning: 50.0,
            queue_critical: 200.0,
            gpu_idle_below: 0.10,
            gpu_saturated_above: 0.99,
        }
    }
}

/// The config file (`--config llm-probe.toml`). Unknown keys are an error, so typos are caught.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub health: Thresholds,
}

/// A config file that does not parse (the binary reads the file and names it in the message).
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct ConfigError(#[from] toml::de::Error);

impl Config {
    /// Parse the file's text.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        Ok(toml::from_str(text)?)
    }
}

/// One GPU as the health check sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct GpuView {
    pub index: u32,
    pub utilization: Option<f64>,
}

/// Everything the verdict reads; the agent keeps it current.
#[derive(Default)]
pub struct Health {
    pub thresholds: Thresholds,
    pub targets: BTreeMap<u32, TargetView>,
    pub programs_attached: usize,
    pub programs_total: usize,
    pub events_delivered: u64,
    pub events_lost: u64,
    pub port: Option<u16>,
    /// `Err(reason)` when NVML is not usable.
    pub gpus: Option<Result<Vec<GpuView>, String>>,
    /// Highest KV-cache utilization the engine bridge exports, if any.
    pub kv_cache_max: Option<f64>,
    /// Engines whose last scrape failed: (url, error).
    pub engine_failures: Vec<(String, String)>,
    /// Requests waiting for their first token (the probe's own count).
    pub queue_depth: f64,
    /// Largest queue an engine reports about itself.
    pub engine_queue_max: Option<f64>,
}

pub type SharedHealth = Arc<Mutex<Health>>;

fn level(value: f64, warning: f64, critical: f64) -> Status {
    if value > critical {
        Status::Critical
    } else if value > warning {
        Status::Warning
    } else {
        Status::Healthy
    }
}

/// p-quantile by nearest rank (on windows of ~100 requests, within one sample of interpolation).
fn quantile(mut v: Vec<f64>, q: f64) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    Some(v[rank - 1])
}

impl Health {
    fn probe_checks(&self, out: &mut BTreeMap<&'static str, Check>) {
        let live = self.targets.values().filter(|t| t.alive).count();
        let mut target = Check::new(Status::Healthy, Some(live as f64));
        if live == 0 {
            target.status = Status::Critical;
            target.issues.push(match self.port {
                Some(p) => format!(
                    "no traced process is alive; waiting for a listener on port {p} to re-attach"
                ),
                None => "no traced process is alive".to_owned(),
            });
        }
        for t in self.targets.values().filter(|t| !t.alive) {
            target
                .issues
                .push(format!("process {} ({}) exited", t.pid, t.comm));
        }
        out.insert("targets", target);
        let mut programs = Check::new(Status::Healthy, Some(self.programs_attached as f64));
        if self.programs_attached < self.programs_total {
            programs.status = Status::Warning;
            programs.issues.push(format!(
                "{} of {} kernel programs attached",
                self.programs_attached, self.programs_total
            ));
        }
        out.insert("programs", programs);
        let mut events = Check::new(Status::Healthy, Some(self.events_lost as f64));
        if self.events_lost > 0 {
            events.status = Status::Warning;
            events.issues.push(format!(
                "{} kernel events lost (see llm_probe_events_lost_total)",
                self.events_lost
            ));
        }
        out.insert("events", events);
    }

    fn gpu_check(&self) -> Check {
        let t = &self.thresholds;
        match &self.gpus {
            None => Check {
                status: Status::Unavailable,
                value: None,
                issues: vec!["GPU not sampled yet".into()],
            },
            Some(Err(reason)) => Check {
                status: Status::Unavailable,
                value: None,
                issues: vec![reason.clone()],
            },
            Some(Ok(gpus)) => {
                let mut c = Check::new(Status::Healthy, None);
                for g in gpus {
                    let Some(u) = g.utilization else { continue };
                    c.value = Some(c.value.map_or(u, |v: f64| v.max(u)));
                    if u > t.gpu_saturated_above {
                        c.status = Status::Warning;
                        c.issues.push(format!(
                            "gpu {}: utilization at {:.0}% (saturated)",
                            g.index,
                            u * 100.0
                        ));
                    } else if u < t.gpu_idle_below {
                        c.status = Status::Warning;
                        c.issues.push(format!(
                            "gpu {}: utilization at {:.0}% (idle?)",
                            g.index,
                            u * 100.0
                        ));
                    }
                }
                c
            }
        }
    }

    /// All checks, with the request-derived ones computed over the last `latency_window` requests.
    pub fn checks(&self, recent: &Recent) -> BTreeMap<&'static str, Check> {
        let t = &self.thresholds;
        let mut out = BTreeMap::new();
        self.probe_checks(&mut out);
        out.insert("gpu", self.gpu_check());

        let mut kv = match self.kv_cache_max {
            Some(v) => Check::new(level(v, t.kv_cache_warning, t.kv_cache_critical), Some(v)),
            None => Check::new(Status::Unavailable, None),
        };
        if kv.value.is_none() {
            kv.issues
                .push("no engine reports KV-cache utilization (--engine-metrics URL)".into());
        }
        for (url, e) in &self.engine_failures {
            // An engine page we cannot read hides KV pressure: say so instead of looking healthy.
            if kv.status.rank() < Status::Warning.rank() {
                kv.status = Status::Warning;
            }
            kv.issues.push(format!("engine metrics {url}: {e}"));
        }
        out.insert("kv_cache", kv);

        let window: Vec<_> = recent
            .items
            .iter()
            .rev()
            .take(t.latency_window.max(1))
            .collect();
        let ttfts: Vec<f64> = window
            .iter()
            .filter_map(|r| r.ttft_ns)
            .map(|n| n as f64 / 1e9)
            .collect();
        out.insert(
            "latency",
            match quantile(ttfts, 0.99) {
                Some(p99) => Check::new(
                    level(p99, t.ttft_p99_warning_seconds, t.ttft_p99_critical_seconds),
                    Some(p99),
                ),
                None => Check {
                    status: Status::Healthy,
                    value: None,
                    issues: vec!["no recent requests".into()],
                },
            },
        );
        let errors = window.iter().filter(|r| r.outcome != "ok").count();
        let rate = if window.is_empty() {
            0.0
        } else {
            errors as f64 / window.len() as f64
        };
        out.insert(
            "errors",
            Check::new(
                level(rate, t.error_rate_warning, t.error_rate_critical),
                Some(rate),
            ),
        );

        let depth = self
            .engine_queue_max
            .map_or(self.queue_depth, |e| e.max(self.queue_depth));
        out.insert(
            "queue",
            Check::new(level(depth, t.queue_warning, t.queue_critical), Some(depth)),
        );
        out
    }

    /// (HTTP status, JSON body).
    pub fn verdict(&self, recent: &Recent) -> (StatusCode, String) {
        let checks = self.checks(recent);
        let overall = checks
            .values()
            .map(|c| c.status)
            .max_by_key(|s| s.rank())
            .unwrap_or(Status::Healthy);
        let overall = if overall == Status::Unavailable {
            Status::Healthy
        } else {
            overall
        };
        let ts = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        let body = serde_json::json!({
            "overall": overall,
            "timestamp": ts,
            "checks": checks,
            "targets": self.targets.values().collect::<Vec<_>>(),
            "events": {"delivered": self.events_delivered, "lost": self.events_lost},
        });
        let code = if overall == Status::Critical {
            StatusCode::SERVICE_UNAVAILABLE
        } else {
            StatusCode::OK
        };
        (code, body.to_string())
    }
}

#[cfg(test)]
mod tests;
