//! Every metric family the agent exports, one child module per family (the catalog with types,
//! labels and buckets is docs/metrics.md): `requests` (what users feel: `llm_ttft_seconds`
//! …), `probe` (the probe's own health: `llm_probe_*`, including the kernel's counters read at
//! scrape time), `cuda`, `gpu` and `engine`. Pure: families are defined and registered here and
//! updated by the modules that own the data.

pub mod cuda;
pub mod engine;
pub mod gpu;
pub mod probe;
pub mod requests;
pub mod threads;

pub use probe::ProbeMetrics;
pub use requests::RequestMetrics;

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{family::Family, gauge::Gauge, histogram::Histogram},
};

/// TTFT buckets: the catalog's (docs/metrics.md), with three finer ones below 50 ms so small and
/// fast engines still get meaningful quantiles. The alert thresholds (2 s, 5 s) are boundaries.
pub const TTFT_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0,
];
/// TBT buckets: the catalog's, with three finer ones below 10 ms (same reason).
pub const TBT_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.07, 0.1, 0.15, 0.2,
];
/// Request-duration buckets: the catalog's, with 10 ms and 50 ms added below.
pub const DURATION_BUCKETS: &[f64] = &[0.01, 0.05, 0.1, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReqLabels {
    pub model: String,
    pub endpoint: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StageLabels {
    pub model: String,
    pub stage: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StageOnlyLabels {
    pub stage: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StageStateLabels {
    pub stage: &'static str,
    pub state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabels {
    pub state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabels {
    pub model: String,
    pub endpoint: &'static str,
    pub status: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub model: String,
    pub endpoint: &'static str,
    pub error_type: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelLabels {
    pub model: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProgramLabels {
    pub program: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WhatLabels {
    pub what: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ByLabels {
    pub by: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PidLabels {
    pub pid: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BuildLabels {
    pub version: &'static str,
    pub aya: &'static str,
}

/// A histogram family whose every series has the same buckets.
pub type HistFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// A gauge holding an `f64`.
pub type F64Gauge = Gauge<f64, std::sync::atomic::AtomicU64>;

/// Longest label value taken from traffic or an engine page, in bytes.
pub const MAX_LABEL_LEN: usize = 64;

/// A label value that came from outside (a client's `model`, an engine's worker or reason label),
/// made safe for every exposition parser: ASCII letters, digits and `_ . : / @ + - =` are kept,
/// every other character (quotes, backslashes, newlines, NUL, escapes, non-ASCII) becomes `_`, and
/// the result is cut at `MAX_LABEL_LEN` bytes. prometheus-client writes label values verbatim,
/// so a `"` or a newline would otherwise end the value early and make the whole page unparsable
/// (a real Prometheus then marks the target down and every series of the node is gone). An empty
/// value becomes `_`: an empty label is the same as no label to Prometheus.
pub fn label_value(raw: &str) -> String {
    let mut out: String = raw
        .chars()
        .take(MAX_LABEL_LEN)
        .map(|c| {
            if c.is_ascii_alphanumeric() || "_.:/@+-=".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    if out.is_empty() {
        out.push('_');
    }
    out
}
