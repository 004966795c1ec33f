//! `llm_cuda_*`, `llm_gpu_memory_*`, `llm_kv_cache_pool_bytes` and `llm_engine_step_seconds`.
//! Launch and nested-call counts live in the kernel's per-thread map and are read at scrape time:
//! `encode_collected` writes them for the agent's collector.
//! Labels stay bounded: `api` is one of the 37 probed entry points, `pid` only an attached
//! process (removed when it exits), `phase` prefill or decode.

use prometheus_client::{
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric as _},
    metrics::{
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::Gauge,
        histogram::Histogram,
        MetricType,
    },
    registry::Registry,
};
use std::sync::atomic::AtomicU64;

use crate::metrics::PidLabels;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ApiLabels {
    pub api: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabels {
    pub phase: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FreeErrorLabels {
    pub reason: &'static str,
}

/// Sync waits: 10 µs … 10 s (a decode step on an H100 is 5–50 ms; a stuck GPU shows at the top).
pub const SYNC_BUCKETS: &[f64] = &[
    0.000_01, 0.000_05, 0.000_1, 0.000_5, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5,
    1.0, 2.0, 10.0,
];
/// Engine steps: 100 µs … 10 s.
pub const STEP_BUCKETS: &[f64] = &[
    0.000_1, 0.000_5, 0.001, 0.002, 0.005, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.2, 0.5,
    1.0, 2.0, 10.0,
];

type HistFamily<L> = Family<L, Histogram, fn() -> Histogram>;
fn sync_hist() -> Histogram {
    Histogram::new(SYNC_BUCKETS.iter().copied())
}
fn step_hist() -> Histogram {
    Histogram::new(STEP_BUCKETS.iter().copied())
}

#[derive(Clone)]
pub struct CudaMetrics {
    pub alloc: Family<ApiLabels, Counter>,
    pub free: Family<ApiLabels, Counter>,
    pub alloc_bytes: Family<ApiLabels, Counter>,
    pub free_bytes: Family<ApiLabels, Counter>,
    pub failed: Family<ApiLabels, Counter>,
    pub bad_frees: Family<FreeErrorLabels, Counter>,
    pub live_bytes: Family<PidLabels, Gauge>,
    pub leak_suspect_bytes: Family<PidLabels, Gauge>,
    pub fragmentation: Family<PidLabels, Gauge<f64, AtomicU64>>,
    pub kv_pool_bytes: Family<PidLabels, Gauge>,
    pub unattributed_bytes: Family<PidLabels, Gauge>,
    pub sync_wait: HistFamily<ApiLabels>,
    pub step: HistFamily<PhaseLabels>,
    pub libraries: Gauge,
}

impl CudaMetrics {
    pub fn new(registry: &mut Registry) -> Self {
        let m = Self {
            alloc: Family::default(),
            free: Family::default(),
            alloc_bytes: Family::default(),
            free_bytes: Family::default(),
            failed: Family::default(),
            bad_frees: Family::default(),
            live_bytes: Family::default(),
            leak_suspect_bytes: Family::default(),
            fragmentation: Family::default(),
            kv_pool_bytes: Family::default(),
            unattributed_bytes: Family::default(),
            sync_wait: Family::new_with_constructor(sync_hist),
            step: Family::new_with_constructor(step_hist),
            libraries: Gauge::default(),
        };
        let r = registry;
        r.register(
            "llm_cuda_alloc",
            "Successful device memory allocations (incl. cuMemCreate and cuMemAddressReserve)",
            m.alloc.clone(),
        );
        r.register(
            "llm_cuda_free",
            "Successful device memory frees (incl. cuMemRelease and cuMemAddressFree)",
            m.free.clone(),
        );
        r.register(
            "llm_cuda_alloc_bytes",
            "Bytes allocated (reserved address space counts under cuMemAddressReserve only)",
            m.alloc_bytes.clone(),
        );
        r.register(
            "llm_cuda_free_bytes",
            "Bytes freed, as known from the allocation the probe saw",
            m.free_bytes.clone(),
        );
        r.register(
            "llm_gpu_memory_live_bytes",
            "Device memory held by a traced process per the probe's ledger: allocations and \
             physical VMM handles seen since attach",
            m.live_bytes.clone(),
        );
        r.register(
            "llm_gpu_memory_leak_suspect_bytes",
            "Live bytes older than the leak age at call sites whose live bytes grew over the \
             leak window (see `llm-probe memleak`)",
            m.leak_suspect_bytes.clone(),
        );
        r.register(
            "llm_gpu_memory_fragmentation_ratio",
            "1 - largest free extent / free bytes inside the process's VMM reservations",
            m.fragmentation.clone(),
        );
        r.register(
            "llm_gpu_memory_unattributed_bytes",
            "NVML's per-process GPU memory minus the ledger's live bytes: allocations made before \
             attach, the CUDA context, and calls the probe does not see",
            m.unattributed_bytes.clone(),
        );
        r.register(
            "llm_kv_cache_pool_bytes",
            "Mapped bytes of the process's largest long-lived VMM reservation (the KV-cache pool \
             of engines that grow it through cuMemCreate/cuMemMap)",
            m.kv_pool_bytes.clone(),
        );
        r.register(
            "llm_cuda_sync_wait_seconds",
            "Time a traced thread blocked in a CUDA synchronisation call",
            m.sync_wait.clone(),
        );
        r.register(
            "llm_engine_step_seconds",
            "Engine steps: first launch after a sync to the next sync's return on the same thread; \
             prefill when a request's first token followed it",
            m.step.clone(),
        );
        r.register(
            "llm_probe_cuda_failed_calls",
            "CUDA memory calls that returned an error (nothing entered in the ledger)",
            m.failed.clone(),
        );
        r.register(
            "llm_probe_cuda_bad_frees",
            "Frees of a pointer freed before (double) or never seen allocated (unknown: also \
             memory allocated before attach)",
            m.bad_frees.clone(),
        );
        r.register(
            "llm_probe_cuda_libraries",
            "CUDA library files (libcuda, libcudart) with uprobes attached",
            m.libraries.clone(),
        );
        m
    }
}

/// Counts the agent reads from the kernel at scrape time, by `api` label: kernel launches, graph
/// launches, and driver calls nested in a runtime call (`launch` for launches).
#[derive(Clone, Debug, Default)]
pub struct Collected {
    pub kernel_launches: Vec<(&'static str, u64)>,
    pub graph_launches: Vec<(&'static str, u64)>,
    pub nested: Vec<(&'static str, u64)>,
}

fn counter_family(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    values: &[(&'static str, u64)],
) -> std::fmt::Result {
    if values.is_empty() {
        return Ok(());
    }
    let mut family = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
    for &(api, v) in values {
        ConstCounter::new(v).encode(family.encode_family(&ApiLabels { api })?)?;
    }
    Ok(())
}

/// `llm_cuda_kernel_launches_total{api}`, `llm_cuda_graph_launches_total{api}` and
/// `llm_probe_cuda_nested_calls_total{api}` (series with a count above zero only).
pub fn encode_collected(enc: &mut DescriptorEncoder, c: &Collected) -> std::fmt::Result {
    counter_family(
        enc,
        "llm_cuda_kernel_launches",
        "Kernel launches by the traced processes, by CUDA entry point (a runtime launch that \
         reaches the driver counts once, as the runtime API)",
        &c.kernel_launches,
    )?;
    counter_family(
        enc,
        "llm_cuda_graph_launches",
        "CUDA graph launches by the traced processes, by entry point",
        &c.graph_launches,
    )?;
    counter_family(
        enc,
        "llm_probe_cuda_nested_calls",
        "Driver calls made by a runtime call of the same thread (counted once, under the \
         runtime API; api=launch for kernel/graph launches)",
        &c.nested,
    )
}
