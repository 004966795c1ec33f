//! `llm_kv_cache_utilization`, `llm_engine_queue_depth`, `llm_engine_batch_size` (per
//! `worker_id`), `llm_preemption_total` (per `worker_id` and `reason`) and
//! `llm_probe_engine_scrape_errors_total{url}`: what the engines' own pages say, re-exported by
//! `crate::scrape`.

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family},
    registry::Registry,
};

use super::F64Gauge;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WorkerLabels {
    pub worker_id: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PreemptionLabels {
    pub worker_id: String,
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UrlLabels {
    pub url: String,
}

/// The engine families. Cheap to clone (families are `Arc`s inside).
#[derive(Clone)]
pub struct EngineMetrics {
    pub kv_cache_utilization: Family<WorkerLabels, F64Gauge>,
    pub queue_depth: Family<WorkerLabels, F64Gauge>,
    pub batch_size: Family<WorkerLabels, F64Gauge>,
    pub preemptions: Family<PreemptionLabels, Counter<f64, std::sync::atomic::AtomicU64>>,
    pub scrape_errors: Family<UrlLabels, Counter>,
}

impl EngineMetrics {
    pub fn new(registry: &mut Registry) -> Self {
        let m = Self {
            kv_cache_utilization: Family::default(),
            queue_depth: Family::default(),
            batch_size: Family::default(),
            preemptions: Family::default(),
            scrape_errors: Family::default(),
        };
        registry.register(
            "llm_kv_cache_utilization",
            "KV-cache utilization (0-1) reported by the inference engine",
            m.kv_cache_utilization.clone(),
        );
        registry.register(
            "llm_engine_queue_depth",
            "Requests waiting in the engine's scheduler queue, as the engine reports",
            m.queue_depth.clone(),
        );
        registry.register(
            "llm_engine_batch_size",
            "Requests in the engine's running batch, as the engine reports",
            m.batch_size.clone(),
        );
        // prometheus-client appends `_total` to counters.
        registry.register(
            "llm_preemption",
            "Requests preempted by the engine (re-exported from its own counter)",
            m.preemptions.clone(),
        );
        registry.register(
            "llm_probe_engine_scrape_errors",
            "Failed scrapes of an engine metrics page",
            m.scrape_errors.clone(),
        );
        m
    }
}
