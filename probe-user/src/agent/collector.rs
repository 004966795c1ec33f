//! What a scrape reads from the kernel at that moment (as `ebpf_exporter` reads its maps): the
//! per-CPU record counters and the per-thread CUDA launch counters. Registered in the registry as
//! prometheus-client `Collector`s, so the server only encodes the registry.

use std::{
    fmt,
    sync::{Arc, Mutex},
};

use prometheus_client::{collector::Collector, encoding::DescriptorEncoder};

use crate::{
    cuda::state::{CudaState, SharedCuda},
    kernel::Kernel,
    metrics::probe::{CounterSource, KernelCounters},
};

/// The kernel's per-CPU counters, summed.
pub(super) struct KernelSource(pub Arc<Mutex<Kernel>>);

impl CounterSource for KernelSource {
    fn read(&self) -> KernelCounters {
        self.0.lock().map(|k| k.counters()).unwrap_or_default()
    }
    fn misses(&self) -> Vec<(&'static str, u64)> {
        self.0
            .lock()
            .map(|k| k.program_misses())
            .unwrap_or_default()
    }
}

fn thread_alive(tgid: u32, tid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{tgid}/task/{tid}")).exists()
}

/// Fold the kernel's per-thread launch counters into `cuda`. Threads found dead are read again
/// after that finding, so the launches they made just before exiting count too; their kernel
/// entries are then deleted.
pub(super) fn fold_launches(kernel: &mut Kernel, cuda: &mut CudaState) {
    let mut threads = kernel.cuda_threads();
    let dead: Vec<u32> = threads
        .iter()
        .filter(|(tid, t)| !thread_alive(t.tgid, *tid))
        .map(|(tid, _)| *tid)
        .collect();
    if !dead.is_empty() {
        threads = kernel.cuda_threads();
    }
    for tid in cuda.fold_launches(&threads, |_, tid| !dead.contains(&tid)) {
        kernel.forget_cuda_thread(tid);
    }
}

/// `llm_probe_cpu_seconds_total`: the agent's own user + system CPU time (/proc/self/stat), read
/// at each scrape; over `llm_probe_events_total` it is the agent's CPU per record.
#[derive(Debug)]
pub(super) struct SelfCpuCollector;

impl Collector for SelfCpuCollector {
    fn encode(&self, enc: DescriptorEncoder) -> fmt::Result {
        let Ok(stat) = procfs::process::Process::myself().and_then(|p| p.stat()) else {
            return Ok(());
        };
        let ticks = (stat.utime + stat.stime) as f64;
        crate::metrics::probe::encode_cpu(enc, ticks / procfs::ticks_per_second() as f64)
    }
}

/// `llm_cuda_kernel_launches_total`, `llm_cuda_graph_launches_total` and
/// `llm_probe_cuda_nested_calls_total`, folded from the kernel at each scrape.
pub(super) struct LaunchCollector {
    pub kernel: Arc<Mutex<Kernel>>,
    pub cuda: SharedCuda,
}

impl fmt::Debug for LaunchCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LaunchCollector").finish_non_exhaustive()
    }
}

impl Collector for LaunchCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        // Lock order everywhere: kernel, then CUDA state.
        let collected = {
            let (Ok(mut k), Ok(mut c)) = (self.kernel.lock(), self.cuda.lock()) else {
                return Ok(());
            };
            fold_launches(&mut k, &mut c);
            c.collected()
        };
        crate::metrics::cuda::encode_collected(&mut enc, &collected)
    }
}
