//! Device memory per process, rebuilt from `CudaMemEvent` records: live allocations by call site,
//! VMM reservations and their mappings, leak suspects, fragmentation and the KV-cache pool.
//!
//! Plain allocations (`cuMemAlloc*`, `cudaMalloc*`, managed, pitch, async, pool) are keyed by
//! (pid, device pointer); any free API frees any of them (`cudaFree` on a `cuMemAlloc` pointer is
//! legal). VMM physical handles (`cuMemCreate` … `cuMemRelease`) count as live memory too; reserved
//! virtual address space (`cuMemAddressReserve`) does not, it only frames the mappings
//! (`cuMemMap`/`cuMemUnmap`) from which fragmentation and the KV pool are read.
//!
//! Records made by the runtime's own call into the driver (`nested`, e.g. `cudaMalloc` →
//! `cuMemAlloc_v2`) are covered by the runtime record and change nothing. Failed calls are only
//! counted.
//!
//! **Leak suspects.** A live allocation is a suspect when it is at least `leak_age_ns` old and its
//! call site's outstanding bytes grew over the growth window: outstanding now − outstanding at the
//! oldest retained `tick` sample (0 for a site that did not exist then; with no sample yet, all its
//! outstanding bytes count as growth). Startup pools (weights, KV cache) are allocated once and
//! then stay flat, so they stop being suspects once a full window has passed without growth; a
//! site that keeps adding memory that is never freed stays one.
//!
//! Memory allocated before the probe attached is invisible: its free shows up as an unknown free,
//! and it is in neither live bytes nor any report.
use std::collections::{BTreeMap, VecDeque};
use std::hash::Hasher as _;

use probe_common::cuda::api;
use probe_common::{CudaMemEvent, STACK_DEPTH};
use rustc_hash::{FxHashMap, FxHasher};
use vmm::Reservation;

mod report;
mod vmm;
pub use report::{
    human_bytes, render_text, Churn, Fragmentation, LeakReport, NoSymbols, ReservationReport,
    SiteReport, SizeClass, Symbolize,
};

/// Live allocations (plain + VMM handles) tracked per process: ~40 B each in the hash map, so at
/// most ~40 MiB per process. Engines with caching allocators hold thousands; a million means
/// something allocates without bound, which the dropped count then shows.
pub const MAX_LIVE_PER_PID: usize = 1 << 20;
/// Call sites per process: each holds its stack (≤ 128 B) and ≤ 17 growth samples, ≤ ~20 MiB in
/// all. Sites past the cap are counted under one "call sites over limit" site.
pub const MAX_SITES_PER_PID: usize = 64 * 1024;
/// Freed addresses remembered per process to tell a double free from an unknown one. Caching
/// allocators reuse addresses quickly, so a double free is almost always of a recent free.
pub const FREED_MEMORY: usize = 4096;
/// VMM reservations plus mappings per process. `PyTorch`'s expandable segments map 2/20 MiB chunks
/// (a few thousand on an 80 GiB GPU); this leaves ample room while bounding memory.
pub const MAX_VMM_PER_PID: usize = 256 * 1024;
/// Growth samples kept per window: `tick` stores one at most every `window / SAMPLES_PER_WINDOW`,
/// so a site costs a fixed ≤ 17 samples whatever the tick rate.
const SAMPLES_PER_WINDOW: u64 = 16;
/// Site of allocations whose record carried no stack.
const SITE_NONE: u32 = 0;
/// Site of allocations made at new call sites once `MAX_SITES_PER_PID` is reached.
const SITE_OVERFLOW: u32 = 1;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LedgerConfig {
    /// Age from which a live allocation at a growing call site is a leak suspect.
    pub leak_age_ns: u64,
    /// Growth and churn window.
    pub window_ns: u64,
    /// Age from which a VMM reservation may be the KV-cache pool (a startup pool, not scratch).
    pub kv_pool_min_age_ns: u64,
}

impl Default for LedgerConfig {
    fn default() -> Self {
        Self {
            leak_age_ns: 30_000_000_000,
            window_ns: 300_000_000_000,
            kv_pool_min_age_ns: 10_000_000_000,
        }
    }
}

/// What one record did to the ledger.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Applied {
    /// A plain allocation, or a VMM physical handle (`cuMemCreate`), became live.
    Alloc { api: u32, bytes: u64 },
    /// A live allocation was freed, or a handle released (`cuMemRelease`).
    Free { api: u32, bytes: u64 },
    /// A reservation or mapping changed (`cuMemAddressReserve/Free`, `cuMemMap/Unmap`).
    Vmm,
    /// The call returned an error: counted, nothing else changes.
    Failed { api: u32 },
    /// The runtime's own driver call, already recorded by the runtime API.
    Nested { api: u32 },
    /// Free of an address this process freed recently and has not allocated since.
    DoubleFree { api: u32 },
    /// Free of an address never seen: allocated before the probe attached, or the record of its
    /// allocation was lost (ring buffer full, live-allocation cap).
    UnknownFree { api: u32 },
    /// A no-op: free of null, allocation of 0 bytes, a non-memory API id.
    Ignored,
    /// The allocation or mapping was not recorded: the per-process cap was reached.
    Dropped { api: u32 },
}

/// Counters of one process since the ledger first saw it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PidCounters {
    pub allocs: u64,
    pub frees: u64,
    pub failed_calls: u64,
    pub double_frees: u64,
    pub unknown_frees: u64,
    pub dropped: u64,
}

#[derive(Clone, Copy)]
struct Live {
    bytes: u64,
    ts_ns: u64,
    site: u32,
    api: u8,
}

struct Site {
    stack: Box<[u64]>,
    outstanding: u64,
    /// Outstanding bytes at the last `samples.len()` entries of `Proc::samples` (a site created
    /// later has fewer: it had 0 then).
    samples: VecDeque<u64>,
}

#[derive(Clone, Copy)]
struct Sample {
    ts_ns: u64,
    allocs: u64,
    frees: u64,
}

#[derive(Clone, Copy, PartialEq, Eq, Hash)]
enum Ns {
    Ptr,
    Handle,
}

struct Proc {
    allocs: FxHashMap<u64, Live>,
    handles: FxHashMap<u64, Live>,
    live_bytes: u64,
    freed: FxHashMap<(u64, Ns), u64>,
    freed_ring: VecDeque<((u64, Ns), u64)>,
    freed_seq: u64,
    sites: Vec<Site>,
    site_index: FxHashMap<u64, u32>,
    /// Live plain allocations by size class: 0 for 0 bytes, k + 1 for [2^k, 2^(k+1)).
    class_count: [u64; 65],
    class_bytes: [u64; 65],
    reservations: BTreeMap<u64, Reservation>,
    /// Mappings outside any known reservation (reserved before attach, or its record lost).
    unknown: Reservation,
    vmm_entries: usize,
    samples: VecDeque<Sample>,
    first_ns: u64,
    c: PidCounters,
}

fn stack_hash(stack: &[u64]) -> u64 {
    let mut h = FxHasher::default();
    for &a in stack {
        h.write_u64(a);
    }
    h.finish()
}

fn size_class(bytes: u64) -> usize {
    (64 - bytes.leading_zeros()) as usize
}

impl Proc {
    fn new(first_ns: u64) -> Self {
        // The first sample is the moment the process was first seen, with nothing outstanding: a
        // process younger than the window has grown by everything it holds, and its churn counts
        // from then (not from the first tick, which may come after its startup allocations).
        let site = |s: &[u64]| Site {
            stack: s.into(),
            outstanding: 0,
            samples: VecDeque::from([0]),
        };
        Self {
            allocs: FxHashMap::default(),
            handles: FxHashMap::default(),
            live_bytes: 0,
            freed: FxHashMap::default(),
            freed_ring: VecDeque::with_capacity(FREED_MEMORY + 1),
            freed_seq: 0,
            sites: vec![site(&[]), site(&[])],
            site_index: FxHashMap::default(),
            class_count: [0; 65],
            class_bytes: [0; 65],
            reservations: BTreeMap::new(),
            unknown: Reservation::new(0, first_ns),
            vmm_entries: 0,
            samples: VecDeque::from([Sample {
                ts_ns: first_ns,
                allocs: 0,
                frees: 0,
            }]),
            first_ns,
            c: PidCounters::default(),
        }
    }

    fn intern(&mut self, stack: &[u64], warned: &mut u8) -> u32 {
        if stack.is_empty() {
            return SITE_NONE;
        }
        let mut h = stack_hash(stack);
        // Open addressing over the index: on a hash collision with another stack, probe on.
        while let Some(&id) = self.site_index.get(&h) {
            if *self.sites[id as usize].stack == *stack {
                return id;
            }
            h = h.wrapping_add(0x9e37_79b9_7f4a_7c15);
        }
        if self.sites.len() >= MAX_SITES_PER_PID {
            warn_once(
                warned,
                1,
                "call sites per process at the cap; new ones are merged",
            );
            return SITE_OVERFLOW;
        }
        let id = self.sites.len() as u32;
        self.sites.push(Site {
            stack: stack.into(),
            outstanding: 0,
            samples: VecDeque::new(),
        });
        self.site_index.insert(h, id);
        id
    }

    /// Saturating: sizes come from the traced process, which may report any u64.
    fn account(&mut self, l: Live, ns: Ns, add: bool) {
        let site = &mut self.sites[l.site as usize];
        let op = |a: u64, b: u64| {
            if add {
                a.saturating_add(b)
            } else {
                a.saturating_sub(b)
            }
        };
        self.live_bytes = op(self.live_bytes, l.bytes);
        site.outstanding = op(site.outstanding, l.bytes);
        if ns == Ns::Ptr {
            let c = size_class(l.bytes);
            self.class_count[c] = op(self.class_count[c], 1);
            self.class_bytes[c] = op(self.class_bytes[c], l.bytes);
        }
    }

    fn alloc(&mut self, ev: &CudaMemEvent, ns: Ns, warned: &mut u8) -> Applied {
        let (addr, bytes) = (ev.addr, ev.size);
        self.c.allocs += 1;
        // cudaMalloc(0) succeeds with a null pointer.
        if addr == 0 || bytes == 0 {
            return Applied::Ignored;
        }
        let map = match ns {
            Ns::Ptr => &self.allocs,
            Ns::Handle => &self.handles,
        };
        if self.allocs.len() + self.handles.len() >= MAX_LIVE_PER_PID && !map.contains_key(&addr) {
            warn_once(
                warned,
                2,
                "live allocations per process at the cap; new ones dropped",
            );
            self.c.dropped += 1;
            return Applied::Dropped { api: ev.api };
        }
        let n = (ev.nframes as usize).min(STACK_DEPTH);
        let site = self.intern(&ev.stack[..n], warned);
        let live = Live {
            bytes,
            ts_ns: ev.header.ts_ns,
            site,
            api: ev.api as u8,
        };
        let map = match ns {
            Ns::Ptr => &mut self.allocs,
            Ns::Handle => &mut self.handles,
        };
        if let Some(old) = map.insert(addr, live) {
            // The driver only hands out a live address again if we missed its free.
            log::debug!(
                "alloc of live {addr:#x} ({} bytes): free was lost",
                old.bytes
            );
            self.account(old, ns, false);
        }
        self.account(live, ns, true);
        Applied::Alloc { api: ev.api, bytes }
    }

    fn free(&mut self, api: u32, addr: u64, ns: Ns) -> Applied {
        self.c.frees += 1;
        if addr == 0 {
            return Applied::Ignored; // cudaFree(NULL) is a successful no-op
        }
        let map = match ns {
            Ns::Ptr => &mut self.allocs,
            Ns::Handle => &mut self.handles,
        };
        if let Some(old) = map.remove(&addr) {
            self.account(old, ns, false);
            self.freed_seq += 1;
            self.freed.insert((addr, ns), self.freed_seq);
            self.freed_ring.push_back(((addr, ns), self.freed_seq));
            if self.freed_ring.len() > FREED_MEMORY {
                if let Some((k, seq)) = self.freed_ring.pop_front() {
                    if self.freed.get(&k) == Some(&seq) {
                        self.freed.remove(&k);
                    }
                }
            }
            Applied::Free {
                api,
                bytes: old.bytes,
            }
        } else if self.freed.contains_key(&(addr, ns)) {
            self.c.double_frees += 1;
            Applied::DoubleFree { api }
        } else {
            self.c.unknown_frees += 1;
            Applied::UnknownFree { api }
        }
    }
    fn lives(&self) -> impl Iterator<Item = &Live> {
        self.allocs.values().chain(self.handles.values())
    }

    /// Outstanding bytes of a site at the oldest retained sample.
    fn site_base(&self, s: &Site) -> u64 {
        if s.samples.len() == self.samples.len() {
            s.samples.front().copied().unwrap_or(0)
        } else {
            0
        }
    }

    fn growth(&self, s: &Site) -> i64 {
        s.outstanding as i64 - self.site_base(s) as i64
    }

    fn tick(&mut self, now: u64, window: u64) {
        let step = (window / SAMPLES_PER_WINDOW).max(1);
        if self
            .samples
            .back()
            .is_none_or(|b| now >= b.ts_ns.saturating_add(step))
        {
            self.samples.push_back(Sample {
                ts_ns: now,
                allocs: self.c.allocs,
                frees: self.c.frees,
            });
            for s in &mut self.sites {
                s.samples.push_back(s.outstanding);
            }
        }
        while self.samples.len() > 1
            && self
                .samples
                .front()
                .is_some_and(|f| f.ts_ns.saturating_add(window) < now)
        {
            self.samples.pop_front();
            let n = self.samples.len();
            for s in &mut self.sites {
                if s.samples.len() > n {
                    s.samples.pop_front();
                }
            }
        }
    }
}

fn warn_once(warned: &mut u8, bit: u8, msg: &str) {
    if *warned & bit == 0 {
        *warned |= bit;
        log::warn!("cuda ledger: {msg}");
    }
}

/// Device memory state of every traced process. Fed in record order by one thread.
pub struct Ledger {
    cfg: LedgerConfig,
    procs: FxHashMap<u32, Proc>,
    /// Caps already logged (bit per cap), so each is logged once.
    warned: u8,
}

impl Ledger {
    pub fn new(cfg: LedgerConfig) -> Self {
        Self {
            cfg,
            procs: FxHashMap::default(),
            warned: 0,
        }
    }

    pub fn config(&self) -> &LedgerConfig {
        &self.cfg
    }

    /// Applies one record. Steady state allocates nothing except for a new call site.
    pub fn apply(&mut self, ev: &CudaMemEvent) -> Applied {
        let a = ev.api;
        if ev.nested != 0 {
            return Applied::Nested { api: a };
        }
        if !api::is_mem(a) {
            return Applied::Ignored;
        }
        let ts = ev.header.ts_ns;
        let p = self
            .procs
            .entry(ev.header.tgid)
            .or_insert_with(|| Proc::new(ts));
        if ev.result != 0 {
            // The driver rejects a double or unknown free with an error (CUDA_ERROR_INVALID_VALUE):
            // those are still worth telling apart from other failures.
            let ns = match a {
                api::CU_MEM_FREE
                | api::CU_MEM_FREE_ASYNC
                | api::CU_MEM_FREE_ASYNC_PTSZ
                | api::CUDA_FREE
                | api::CUDA_FREE_ASYNC => Some(Ns::Ptr),
                api::CU_MEM_RELEASE => Some(Ns::Handle),
                _ => None,
            };
            let live = |ns| match ns {
                Ns::Ptr => p.allocs.contains_key(&ev.addr),
                Ns::Handle => p.handles.contains_key(&ev.addr),
            };
            if let Some(ns) = ns.filter(|&ns| ev.addr != 0 && !live(ns)) {
                let r = p.free(a, ev.addr, ns);
                p.c.frees -= 1; // not a free that happened
                return r;
            }
            p.c.failed_calls += 1;
            return Applied::Failed { api: a };
        }
        let w = &mut self.warned;
        match a {
            api::CU_MEM_ALLOC
            | api::CU_MEM_ALLOC_PITCH
            | api::CU_MEM_ALLOC_MANAGED
            | api::CU_MEM_ALLOC_ASYNC
            | api::CU_MEM_ALLOC_ASYNC_PTSZ
            | api::CU_MEM_ALLOC_FROM_POOL_ASYNC
            | api::CU_MEM_ALLOC_FROM_POOL_ASYNC_PTSZ
            | api::CUDA_MALLOC
            | api::CUDA_MALLOC_ASYNC => p.alloc(ev, Ns::Ptr, w),
            api::CU_MEM_FREE
            | api::CU_MEM_FREE_ASYNC
            | api::CU_MEM_FREE_ASYNC_PTSZ
            | api::CUDA_FREE
            | api::CUDA_FREE_ASYNC => p.free(a, ev.addr, Ns::Ptr),
            api::CU_MEM_CREATE => p.alloc(ev, Ns::Handle, w),
            // The driver keeps a released handle's memory until its last unmap; the ledger
            // counts it out at release (the process gave it up).
            api::CU_MEM_RELEASE => p.free(a, ev.addr, Ns::Handle),
            api::CU_MEM_ADDRESS_RESERVE => p.reserve(ev.addr, ev.size, ts, w),
            api::CU_MEM_ADDRESS_FREE => {
                p.drop_reservation(ev.addr);
                Applied::Vmm
            }
            api::CU_MEM_MAP => p.map(ev.addr, ev.size, w),
            api::CU_MEM_UNMAP => p.unmap(ev.addr, ev.size),
            _ => Applied::Ignored,
        }
    }

    /// Samples per-site outstanding bytes and alloc/free counts for the growth and churn window
    /// (at most `SAMPLES_PER_WINDOW` per window) and drops samples older than the window.
    pub fn tick(&mut self, now_ns: u64) {
        for p in self.procs.values_mut() {
            p.tick(now_ns, self.cfg.window_ns);
        }
    }

    /// Plain allocations plus unreleased VMM physical handles. Reserved VA is not memory.
    pub fn live_bytes(&self, pid: u32) -> u64 {
        self.procs.get(&pid).map_or(0, |p| p.live_bytes)
    }

    /// Live allocations (plain + handles).
    pub fn live_allocations(&self, pid: u32) -> u64 {
        self.procs
            .get(&pid)
            .map_or(0, |p| (p.allocs.len() + p.handles.len()) as u64)
    }

    /// Bytes of live allocations at least `leak_age_ns` old at growing call sites (module doc).
    pub fn leak_suspect_bytes(&self, pid: u32, now_ns: u64) -> u64 {
        let Some(p) = self.procs.get(&pid) else {
            return 0;
        };
        let growing: Vec<bool> = p.sites.iter().map(|s| p.growth(s) > 0).collect();
        p.lives()
            .filter(|l| {
                now_ns.saturating_sub(l.ts_ns) >= self.cfg.leak_age_ns && growing[l.site as usize]
            })
            .map(|l| l.bytes)
            .sum()
    }

    /// 1 − largest free extent / free bytes, over all VMM reservations of the process (free =
    /// reserved and not mapped). `None` without reservations or without free bytes in them.
    pub fn fragmentation_ratio(&self, pid: u32) -> Option<f64> {
        self.procs.get(&pid)?.fragmentation_ratio()
    }

    /// Mapped bytes of the process's largest (by mapped bytes) reservation that has existed for
    /// at least `kv_pool_min_age_ns`; `None` when no such reservation has mapped bytes.
    pub fn kv_pool_bytes(&self, pid: u32, now_ns: u64) -> Option<u64> {
        let p = self.procs.get(&pid)?;
        p.kv_pool(now_ns, self.cfg.kv_pool_min_age_ns)
            .map(|(_, r)| r.mapped)
    }

    /// Processes with state, ascending.
    pub fn pids(&self) -> Vec<u32> {
        let mut v: Vec<u32> = self.procs.keys().copied().collect();
        v.sort_unstable();
        v
    }

    pub fn counters(&self, pid: u32) -> Option<PidCounters> {
        self.procs.get(&pid).map(|p| p.c)
    }

    /// The process exited: drop all its state.
    pub fn forget(&mut self, pid: u32) {
        self.procs.remove(&pid);
    }
}

#[cfg(test)]
mod tests;
