//! `/health`: a JSON verdict on the probe itself — are the targets alive, are the programs
//! attached, are events being lost. Shaped like the seed's `HealthChecker` (`overall`, `timestamp`,
//! `checks.{name}.{status,value,issues}`); HTTP 503 when critical.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::{SystemTime, UNIX_EPOCH},
};

use hyper::StatusCode;
use serde::Serialize;

#[derive(Clone, Debug, Serialize)]
pub struct TargetView {
    pub pid: u32,
    pub comm: String,
    pub alive: bool,
    /// How the process became a target: `pid`, `port`, `fork`.
    pub via: &'static str,
}

#[derive(Clone, Copy, Debug, Serialize, serde::Deserialize, PartialEq, Eq, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Healthy,
    Warning,
    Critical,
}

#[derive(Clone, Debug, Serialize)]
pub struct Check {
    pub status: Status,
    pub value: f64,
    pub issues: Vec<String>,
}

#[derive(Default)]
pub struct Health {
    pub targets: BTreeMap<u32, TargetView>,
    pub programs_attached: usize,
    pub programs_total: usize,
    pub events_delivered: u64,
    pub events_lost: u64,
    pub port: Option<u16>,
}

pub type SharedHealth = Arc<Mutex<Health>>;

impl Health {
    pub fn checks(&self) -> BTreeMap<&'static str, serde_json::Value> {
        let live = self.targets.values().filter(|t| t.alive).count();
        let mut target = Check {
            status: Status::Healthy,
            value: live as f64,
            issues: vec![],
        };
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
        let mut programs = Check {
            status: Status::Healthy,
            value: self.programs_attached as f64,
            issues: vec![],
        };
        if self.programs_attached < self.programs_total {
            programs.status = Status::Warning;
            programs.issues.push(format!(
                "{} of {} kernel programs attached",
                self.programs_attached, self.programs_total
            ));
        }
        let mut events = Check {
            status: Status::Healthy,
            value: self.events_lost as f64,
            issues: vec![],
        };
        if self.events_lost > 0 {
            events.status = Status::Warning;
            events.issues.push(format!(
                "{} kernel events lost (see llm_probe_events_lost_total)",
                self.events_lost
            ));
        }
        let mut out = BTreeMap::new();
        let to = |c: Check| serde_json::to_value(c).unwrap_or_default();
        out.insert("targets", to(target));
        out.insert("programs", to(programs));
        out.insert("events", to(events));
        out.insert(
            "gpu",
            serde_json::json!({"status": "unavailable", "issues": ["GPU checks are not built yet"]}),
        );
        out
    }

    /// (HTTP status, JSON body).
    pub fn verdict(&self) -> (StatusCode, String) {
        let checks = self.checks();
        let overall = checks
            .values()
            .filter_map(|c| serde_json::from_value::<Status>(c["status"].clone()).ok())
            .max()
            .unwrap_or(Status::Healthy);
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
mod tests {
    use super::*;

    fn target(alive: bool) -> TargetView {
        TargetView {
            pid: 1,
            comm: "x".into(),
            alive,
            via: "pid",
        }
    }

    #[test]
    fn dead_target_is_critical_and_503() {
        let mut h = Health {
            programs_attached: 3,
            programs_total: 3,
            ..Health::default()
        };
        h.targets.insert(1, target(true));
        assert_eq!(h.verdict().0, StatusCode::OK);
        h.targets.insert(1, target(false));
        let (code, body) = h.verdict();
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
        assert!(body.contains("\"overall\":\"critical\""), "{body}");
        assert!(body.contains("exited"), "{body}");
    }

    #[test]
    fn lost_events_warn() {
        let mut h = Health {
            programs_attached: 3,
            programs_total: 3,
            events_lost: 2,
            ..Health::default()
        };
        h.targets.insert(1, target(true));
        let (code, body) = h.verdict();
        assert_eq!(code, StatusCode::OK);
        assert!(body.contains("\"overall\":\"warning\""), "{body}");
    }
}
