//! The agent's CUDA state: ledger, steps and launch counts, fed by the ingest loop and read by the
//! server (`/api/v1/memleak`). Behind one mutex: CUDA records are rare (allocations, syncs), the
//! hot launch path never reaches user space.

use std::sync::{Arc, Mutex};

use probe_common::{cuda::api, CudaMemEvent, CudaSyncEvent, STACK_DEPTH};
use rustc_hash::FxHashSet;

use super::{
    launches::LaunchTracker,
    ledger::{Applied, LeakReport, Ledger, LedgerConfig},
    metrics::{ApiLabels, CudaMetrics, FreeErrorLabels, PhaseLabels},
    steps::{Phase, Step, Steps},
    symbolize::BlazeSymbolizer,
};
use crate::{ebpf::Kernel, health::SharedHealth, metrics::PidLabels};

pub type SharedCuda = Arc<Mutex<CudaState>>;

pub struct CudaState {
    pub ledger: Ledger,
    pub steps: Steps,
    pub launches: LaunchTracker,
    pub metrics: CudaMetrics,
    symbolizer: BlazeSymbolizer,
    /// Processes with `pid`-labelled gauges (removed when the process goes).
    gauged: FxHashSet<u32>,
    out: Vec<(Step, Phase)>,
    /// (pid, path) of CUDA libraries already seen in /proc/PID/maps.
    seen_maps: FxHashSet<(u32, String)>,
    ticks: u64,
}

fn name(id: u32) -> &'static str {
    api::NAMES.get(id as usize).copied().unwrap_or("unknown")
}

impl CudaState {
    pub fn new(metrics: CudaMetrics, cfg: LedgerConfig) -> Self {
        Self {
            ledger: Ledger::new(cfg),
            steps: Steps::default(),
            launches: LaunchTracker::default(),
            metrics,
            symbolizer: BlazeSymbolizer::new(),
            gauged: FxHashSet::default(),
            out: Vec::new(),
            seen_maps: FxHashSet::default(),
            ticks: 0,
        }
    }

    pub fn on_mem(&mut self, ev: &CudaMemEvent) {
        let m = &self.metrics;
        // Kernels that know a uprobe sits on a function's first instruction (`push %rbp`) add the
        // caller's return address to the frame-pointer walk themselves: the record already has it
        // in stack[0], so drop the repeat.
        let dedup;
        let ev = if ev.nframes >= 2 && ev.stack[1] == ev.stack[0] {
            let mut e = *ev;
            e.stack.copy_within(2.., 1);
            e.stack[STACK_DEPTH - 1] = 0;
            e.nframes -= 1;
            dedup = e;
            &dedup
        } else {
            ev
        };
        match self.ledger.apply(ev) {
            Applied::Alloc { api, bytes } => {
                let l = ApiLabels { api: name(api) };
                m.alloc.get_or_create(&l).inc();
                m.alloc_bytes.get_or_create(&l).inc_by(bytes);
            }
            Applied::Free { api, bytes } => {
                let l = ApiLabels { api: name(api) };
                m.free.get_or_create(&l).inc();
                m.free_bytes.get_or_create(&l).inc_by(bytes);
            }
            Applied::Nested { api } => {
                m.nested.get_or_create(&ApiLabels { api: name(api) }).inc();
            }
            Applied::Failed { api } => {
                m.failed.get_or_create(&ApiLabels { api: name(api) }).inc();
            }
            Applied::DoubleFree { .. } => {
                m.bad_frees
                    .get_or_create(&FreeErrorLabels { reason: "double" })
                    .inc();
            }
            Applied::UnknownFree { .. } => {
                m.bad_frees
                    .get_or_create(&FreeErrorLabels { reason: "unknown" })
                    .inc();
            }
            _ => {}
        }
        self.gauged.insert(ev.header.tgid);
    }

    pub fn on_sync(&mut self, ev: &CudaSyncEvent, waiting: bool) {
        let l = ApiLabels { api: name(ev.api) };
        if ev.nested != 0 {
            self.metrics.nested.get_or_create(&l).inc();
            return;
        }
        let wait = ev.header.ts_ns.saturating_sub(ev.enter_ns) as f64 / 1e9;
        self.metrics.sync_wait.get_or_create(&l).observe(wait);
        self.steps.on_sync(ev, waiting, &mut self.out);
        self.flush_steps();
    }

    pub fn on_first_token(&mut self, ts_ns: u64) {
        self.steps.on_first_token(ts_ns, &mut self.out);
        self.flush_steps();
    }

    fn flush_steps(&mut self) {
        for (s, phase) in self.out.drain(..) {
            self.metrics
                .step
                .get_or_create(&PhaseLabels {
                    phase: phase.as_str(),
                })
                .observe(s.seconds());
        }
    }

    /// Pull the kernel's per-thread launch counters into the metrics.
    pub fn fold_launches(&mut self, kernel: &mut Kernel) {
        let threads = kernel.cuda_threads();
        for tid in self.launches.fold(&threads, &self.metrics) {
            kernel.forget_cuda_thread(tid);
            self.steps.forget_thread(tid);
        }
    }

    /// About once a second: growth samples, held steps, per-process gauges.
    pub fn tick(&mut self, now_ns: u64) {
        self.ledger.tick(now_ns);
        self.steps.expire(now_ns, &mut self.out);
        self.flush_steps();
        let m = &self.metrics;
        for &pid in &self.gauged {
            let l = PidLabels {
                pid: pid.to_string(),
            };
            m.live_bytes
                .get_or_create(&l)
                .set(self.ledger.live_bytes(pid) as i64);
            m.leak_suspect_bytes
                .get_or_create(&l)
                .set(self.ledger.leak_suspect_bytes(pid, now_ns) as i64);
            match self.ledger.fragmentation_ratio(pid) {
                Some(r) => {
                    m.fragmentation.get_or_create(&l).set(r);
                }
                None => {
                    m.fragmentation.remove(&l);
                }
            }
            match self.ledger.kv_pool_bytes(pid, now_ns) {
                Some(b) => {
                    m.kv_pool_bytes.get_or_create(&l).set(b as i64);
                }
                None => {
                    m.kv_pool_bytes.remove(&l);
                }
            }
        }
    }

    /// The process exited: drop its ledger and its `pid` series.
    pub fn forget(&mut self, pid: u32) {
        self.ledger.forget(pid);
        self.launches.forget_pid(pid);
        if self.gauged.remove(&pid) {
            let l = PidLabels {
                pid: pid.to_string(),
            };
            let m = &self.metrics;
            m.live_bytes.remove(&l);
            m.leak_suspect_bytes.remove(&l);
            m.fragmentation.remove(&l);
            m.kv_pool_bytes.remove(&l);
        }
    }

    pub fn report(&mut self, pid: u32, now_ns: u64, older_than_ns: u64, top: usize) -> LeakReport {
        self.ledger
            .report(pid, now_ns, older_than_ns, top, &mut self.symbolizer)
    }

    /// Processes the ledger knows.
    pub fn pids(&self) -> Vec<u32> {
        self.ledger.pids()
    }
}

/// Once a second from the agent's housekeeping: launch counts, ledger tick, and every other second
/// a look at the targets' maps for CUDA libraries that appeared without being predicted (a dlopen
/// by absolute path, say); those are resolved and attached then.
pub fn housekeeping(kernel: &Mutex<Kernel>, health: &SharedHealth, cuda: &SharedCuda, now_ns: u64) {
    let Ok(mut k) = kernel.lock() else { return };
    let Ok(mut c) = cuda.lock() else { return };
    c.fold_launches(&mut k);
    c.tick(now_ns);
    c.ticks += 1;
    if c.ticks % 2 == 0 && k.cuda_loaded() {
        let pids: Vec<u32> = health
            .lock()
            .map(|h| h.targets.values().filter(|t| t.alive).map(|t| t.pid).collect())
            .unwrap_or_default();
        for pid in pids {
            let new: Vec<String> = super::uprobes::mapped_cuda_paths(pid)
                .into_iter()
                .filter(|p| !c.seen_maps.contains(&(pid, p.clone())))
                .collect();
            if new.is_empty() {
                continue;
            }
            if k.attach_cuda_for(pid) > 0 {
                log::warn!(
                    "pid {pid} mapped {new:?}, which was not predicted at attach: its calls before \
                     now were not seen"
                );
            }
            for p in new {
                c.seen_maps.insert((pid, p));
            }
        }
    }
    c.metrics.libraries.set(k.cuda_files() as i64);
}
