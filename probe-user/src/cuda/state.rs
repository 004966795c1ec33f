//! The agent's CUDA state: ledger, steps and launch counts, fed by the ingest loop (records) and
//! the agent's folds of the kernel's launch counters, read by the server (`/api/v1/memleak`) and
//! the scrape-time collector. Behind one mutex: CUDA records are rare (allocations, syncs), the
//! hot launch path never reaches user space.

use std::sync::{Arc, Mutex};

use probe_common::{cuda::api, CudaMemEvent, CudaSyncEvent, STACK_DEPTH};
use prometheus_client::metrics::{counter::Counter, histogram::Histogram};
use rustc_hash::FxHashSet;

use super::{
    launches::LaunchTracker,
    ledger::{Applied, LeakReport, Ledger, LedgerConfig, NoSymbols, Symbolize},
    steps::{Phase, RecentSteps, Step, Steps},
};
use crate::metrics::{
    cuda::{ApiLabels, Collected, CudaMetrics, FreeErrorLabels, PhaseLabels},
    PidLabels,
};

pub type SharedCuda = Arc<Mutex<CudaState>>;

/// Name the hex frames of `r` (made by `CudaState::report`).
pub fn symbolize_report(r: &mut LeakReport, sym: &mut dyn Symbolize) {
    for site in &mut r.sites {
        let addrs: Vec<u64> = site
            .frames
            .iter()
            .map(|f| u64::from_str_radix(f.trim_start_matches("0x"), 16).unwrap_or(0))
            .collect();
        site.frames = sym.symbolize(r.pid, &addrs);
    }
}

/// End of the user half of a 48-bit address space (x86-64 and arm64 with 4-level tables).
const USER_ADDR_END: u64 = 0x8000_0000_0000;

pub struct CudaState {
    pub ledger: Ledger,
    pub steps: Steps,
    /// Finished steps for `/api/v1/steps`.
    pub recent_steps: RecentSteps,
    pub launches: LaunchTracker,
    pub metrics: CudaMetrics,
    /// Processes that exited since the server last symbolized (their cached names are stale).
    pub exited: Vec<u32>,
    /// Processes with `pid`-labelled gauges (removed when the process goes).
    gauged: FxHashSet<u32>,
    out: Vec<(Step, Phase)>,
    handles: Handles,
    /// Memory and sync calls made by a runtime call of the same thread, by API id.
    nested: [u64; api::COUNT as usize],
    /// NVML's per-process GPU memory (summed over devices), from the NVML sampler.
    nvml_used: rustc_hash::FxHashMap<u32, u64>,
}

/// Metric handles per API id, looked up in their families once (a family lookup hashes the labels
/// under a lock; this path runs per allocation).
#[derive(Default)]
struct Handles {
    alloc: Vec<Option<(Counter, Counter)>>,
    free: Vec<Option<(Counter, Counter)>>,
    sync: Vec<Option<Histogram>>,
}

fn slot<T>(v: &mut Vec<Option<T>>, id: u32, make: impl FnOnce(ApiLabels) -> T) -> Option<&T> {
    let i = id as usize;
    let label = *api::NAMES.get(i)?;
    if v.len() <= i {
        v.resize_with(i + 1, || None);
    }
    Some(v[i].get_or_insert_with(|| make(ApiLabels { api: label })))
}

impl Handles {
    fn alloc(&mut self, m: &CudaMetrics, id: u32) -> Option<&(Counter, Counter)> {
        slot(&mut self.alloc, id, |l| {
            (
                m.alloc.get_or_create(&l).clone(),
                m.alloc_bytes.get_or_create(&l).clone(),
            )
        })
    }
    fn free(&mut self, m: &CudaMetrics, id: u32) -> Option<&(Counter, Counter)> {
        slot(&mut self.free, id, |l| {
            (
                m.free.get_or_create(&l).clone(),
                m.free_bytes.get_or_create(&l).clone(),
            )
        })
    }
    fn sync(&mut self, m: &CudaMetrics, id: u32) -> Option<&Histogram> {
        slot(&mut self.sync, id, |l| {
            m.sync_wait.get_or_create(&l).clone()
        })
    }
}

fn name(id: u32) -> &'static str {
    api::NAMES.get(id as usize).copied().unwrap_or("unknown")
}

impl CudaState {
    pub fn new(metrics: CudaMetrics, cfg: LedgerConfig) -> Self {
        Self {
            ledger: Ledger::new(cfg),
            steps: Steps::default(),
            recent_steps: RecentSteps::default(),
            launches: LaunchTracker::default(),
            metrics,
            exited: Vec::new(),
            gauged: FxHashSet::default(),
            out: Vec::new(),
            handles: Handles::default(),
            nested: [0; api::COUNT as usize],
            nvml_used: rustc_hash::FxHashMap::default(),
        }
    }

    pub fn on_mem(&mut self, ev: &CudaMemEvent) {
        let m = &self.metrics;
        // Kernels that know a uprobe sits on a function's first instruction (`push %rbp`) add the
        // caller's return address to the frame-pointer walk themselves: the record already has it
        // in stack[0], so drop the repeat.
        // Code without frame pointers leaves junk in the walk (seen on an H100 host: 0xc8 after a
        // Rust frame): the stack ends at the first address no user code can have.
        let n = (ev.nframes as usize).min(STACK_DEPTH);
        let valid = ev.stack[..n]
            .iter()
            .take_while(|&&a| (0x10000..USER_ADDR_END).contains(&a))
            .count()
            .max(n.min(1)) as u32;
        let dedup;
        let ev = if valid != ev.nframes || (ev.nframes >= 2 && ev.stack[1] == ev.stack[0]) {
            let mut e = *ev;
            e.nframes = valid;
            if e.nframes >= 2 && e.stack[1] == e.stack[0] {
                e.stack.copy_within(2.., 1);
                e.stack[STACK_DEPTH - 1] = 0;
                e.nframes -= 1;
            }
            dedup = e;
            &dedup
        } else {
            ev
        };
        match self.ledger.apply(ev) {
            Applied::Alloc { api, bytes } => {
                if let Some((n, b)) = self.handles.alloc(m, api) {
                    n.inc();
                    b.inc_by(bytes);
                }
            }
            Applied::Free { api, bytes } => {
                if let Some((n, b)) = self.handles.free(m, api) {
                    n.inc();
                    b.inc_by(bytes);
                }
            }
            Applied::Nested { api } => {
                if let Some(n) = self.nested.get_mut(api as usize) {
                    *n += 1;
                }
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
        if ev.nested != 0 {
            if let Some(n) = self.nested.get_mut(ev.api as usize) {
                *n += 1;
            }
            return;
        }
        let wait = ev.header.ts_ns.saturating_sub(ev.enter_ns) as f64 / 1e9;
        if let Some(h) = self.handles.sync(&self.metrics, ev.api) {
            h.observe(wait);
        }
        self.steps.on_sync(ev, waiting, &mut self.out);
        self.flush_steps();
    }

    pub fn on_first_token(&mut self, ts_ns: u64) {
        self.steps.on_first_token(ts_ns, &mut self.out);
        self.flush_steps();
    }

    fn flush_steps(&mut self) {
        for (s, phase) in self.out.drain(..) {
            self.recent_steps.push(&s, phase);
            self.metrics
                .step
                .get_or_create(&PhaseLabels {
                    phase: phase.as_str(),
                })
                .observe(s.seconds());
        }
    }

    /// Fold the kernel's per-thread launch counters (`threads`, read twice by the agent when some
    /// thread died in between, so its last launches count). Forgets the threads `alive` says are
    /// gone; returns them so the agent deletes their kernel entries.
    pub fn fold_launches(
        &mut self,
        threads: &[(u32, probe_common::CudaThread)],
        alive: impl Fn(u32, u32) -> bool,
    ) -> Vec<u32> {
        let gone = self.launches.fold_with(threads, alive);
        for &tid in &gone {
            self.steps.forget_thread(tid);
        }
        gone
    }

    /// The counts the scrape-time collector exports (`crate::metrics::cuda::encode_collected`).
    pub fn collected(&self) -> Collected {
        let mut c = Collected::default();
        for (i, &n) in self.launches.totals.iter().enumerate() {
            if n == 0 {
                continue;
            }
            let entry = (api::NAMES[i], n);
            if api::is_graph_launch(i as u32) {
                c.graph_launches.push(entry);
            } else {
                c.kernel_launches.push(entry);
            }
        }
        if self.launches.nested > 0 {
            c.nested.push(("launch", self.launches.nested));
        }
        c.nested.extend(
            self.nested
                .iter()
                .enumerate()
                .filter(|(_, &n)| n > 0)
                .map(|(i, &n)| (api::NAMES[i], n)),
        );
        c
    }

    /// Gauges for a traced process that allocates nothing while traced (a warmed-up caching
    /// allocator) but holds GPU memory per NVML: its unattributed memory is still worth showing.
    pub fn gauge_if_nvml_sees(&mut self, pid: u32) {
        if self.nvml_used.contains_key(&pid) {
            self.gauged.insert(pid);
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
            match self.nvml_used.get(&pid) {
                Some(&n) => {
                    m.unattributed_bytes
                        .get_or_create(&l)
                        .set(n.saturating_sub(self.ledger.live_bytes(pid)) as i64);
                }
                None => {
                    m.unattributed_bytes.remove(&l);
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

    /// NVML's latest per-process memory: (pid, bytes) over all devices.
    pub fn set_nvml_usage(&mut self, per_pid: impl IntoIterator<Item = (u32, u64)>) {
        self.nvml_used.clear();
        for (pid, bytes) in per_pid {
            *self.nvml_used.entry(pid).or_default() += bytes;
        }
    }

    /// The process exited: drop its ledger and its `pid` series.
    pub fn forget(&mut self, pid: u32) {
        self.ledger.forget(pid);
        self.steps.forget_process(pid);
        if self.exited.len() < 4096 {
            self.exited.push(pid);
        }
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
            m.unattributed_bytes.remove(&l);
        }
    }

    /// The ledger's report with call sites in hex (`symbolize_report` names them, outside this
    /// state's lock: the first lookup in a big library parses its DWARF for seconds).
    pub fn report(&mut self, pid: u32, now_ns: u64, older_than_ns: u64, top: usize) -> LeakReport {
        let mut r = self
            .ledger
            .report(pid, now_ns, older_than_ns, top, &mut NoSymbols);
        if let Some(&n) = self.nvml_used.get(&pid) {
            r.nvml_used_bytes = Some(n);
            r.unattributed_bytes = Some(n.saturating_sub(r.live_bytes));
        }
        r
    }

    /// Processes the ledger knows.
    pub fn pids(&self) -> Vec<u32> {
        self.ledger.pids()
    }
}

#[cfg(test)]
mod tests {
    use probe_common::{EventHeader, EventKind};
    use prometheus_client::registry::Registry;

    use super::*;

    fn alloc(addr: u64, stack: &[u64]) -> CudaMemEvent {
        let mut e = CudaMemEvent {
            header: EventHeader {
                kind: EventKind::CudaMem as u32,
                tgid: 7,
                tid: 7,
                _pad: 0,
                ts_ns: 1_000,
            },
            api: api::CU_MEM_ALLOC,
            addr,
            size: 4096,
            nframes: stack.len() as u32,
            ..CudaMemEvent::default()
        };
        e.stack[..stack.len()].copy_from_slice(stack);
        e
    }

    /// The kernel's repeat of the caller (uprobe on a `push %rbp`) is dropped, and a frame-pointer
    /// walk through code without frame pointers ends at the first impossible address.
    #[test]
    fn call_stacks_are_cleaned_before_the_ledger() {
        let mut s = CudaState::new(
            CudaMetrics::new(&mut Registry::default()),
            LedgerConfig::default(),
        );
        s.on_mem(&alloc(
            0x1000,
            &[0x5555_0000_1234, 0x5555_0000_1234, 0x5555_0000_5678],
        ));
        s.on_mem(&alloc(0x2000, &[0x5555_0000_9999, 0xc8, 0x5555_0000_1111]));
        s.on_mem(&alloc(0x3000, &[0x5555_0000_7777, 0x14fa_80c3_450f_e484]));
        let r = s.ledger.report(7, 2_000, 0, 10, &mut NoSymbols);
        let mut frames: Vec<Vec<String>> = r.sites.iter().map(|x| x.frames.clone()).collect();
        frames.sort();
        assert_eq!(
            frames,
            vec![
                vec!["0x555500001234".to_owned(), "0x555500005678".to_owned()],
                vec!["0x555500007777".to_owned()],
                vec!["0x555500009999".to_owned()],
            ]
        );
        assert_eq!(s.ledger.live_bytes(7), 3 * 4096);
    }
}
