//! `llm_thread_seconds_total{process, role, state}` and `llm_threads_tracked`: where the traced
//! processes' threads spend their time (`crate::threads`). Labels are bounded there: at most
//! 256 (process, role) pairs × 3 states.

use std::sync::atomic::AtomicU64;

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

use crate::threads::{RoleKey, STATES};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ThreadLabels {
    pub process: String,
    pub role: String,
    pub state: &'static str,
}

#[derive(Clone)]
pub struct ThreadMetrics {
    pub seconds: Family<ThreadLabels, Counter<f64, AtomicU64>>,
    pub tracked: Gauge,
}

impl ThreadMetrics {
    pub fn new(registry: &mut Registry) -> Self {
        let m = Self {
            seconds: Family::default(),
            tracked: Gauge::default(),
        };
        registry.register(
            "llm_thread_seconds",
            "Time the traced processes' threads spent on a CPU (on_cpu), runnable but waiting for \
             one (runnable: run-queue delay) or blocked (blocked: futex/GIL, I/O, another \
             process), by process name and thread role (thread name without a pool's trailing number)",
            m.seconds.clone(),
        );
        registry.register(
            "llm_threads_tracked",
            "Threads of traced processes whose scheduler time is followed",
            m.tracked.clone(),
        );
        m
    }

    /// Add nanoseconds per key (`ThreadAccounting::update`'s deltas).
    pub fn add(&self, deltas: &[(RoleKey, [u64; 3])]) {
        for (k, d) in deltas {
            for (state, ns) in STATES.iter().zip(d) {
                if *ns > 0 {
                    self.seconds
                        .get_or_create(&ThreadLabels {
                            process: k.process.clone(),
                            role: k.role.clone(),
                            state,
                        })
                        .inc_by(*ns as f64 / 1e9);
                }
            }
        }
    }
}
