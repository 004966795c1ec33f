//! Kernel and graph launch counts: folded from the kernel's per-thread counters (`CUDA_THREADS`)
//! into `llm_cuda_kernel_launches_total{api}` / `llm_cuda_graph_launches_total{api}` by delta, at
//! every housekeeping tick and scrape. Entries of threads that exited are folded one last time and
//! removed from the map.

use probe_common::{cuda::api, CudaThread};
use rustc_hash::FxHashMap;

use super::metrics::{ApiLabels, CudaMetrics};

#[derive(Default)]
pub struct LaunchTracker {
    last: FxHashMap<u32, CudaThread>,
    /// Launch totals per process since attach (for `llm-probe memleak` and the demo).
    pub per_pid: FxHashMap<u32, (u64, u64)>,
}

impl LaunchTracker {
    /// Fold `threads` (tid, counters) into the metrics. Returns the thread ids whose entries can be
    /// deleted from the kernel map (`alive` says the thread is gone and its last counts are folded).
    pub fn fold_with(
        &mut self,
        threads: &[(u32, CudaThread)],
        m: &CudaMetrics,
        alive: impl Fn(u32, u32) -> bool,
    ) -> Vec<u32> {
        let mut dead = Vec::new();
        for (tid, now) in threads {
            let zero = CudaThread::default();
            let last = match self.last.get(tid) {
                // A reused thread id (another process): start from zero.
                Some(l) if l.tgid == now.tgid => l,
                _ => &zero,
            };
            let mut totals = (0u64, 0u64);
            for id in 0..api::LAUNCH_COUNT {
                let i = id as usize;
                let d = now.launches[i].saturating_sub(last.launches[i]);
                if d == 0 {
                    continue;
                }
                let labels = ApiLabels { api: api::NAMES[i] };
                if api::is_graph_launch(id) {
                    m.graph_launches.get_or_create(&labels).inc_by(d);
                    totals.1 += d;
                } else {
                    m.kernel_launches.get_or_create(&labels).inc_by(d);
                    totals.0 += d;
                }
            }
            // Only on new launches: the last fold of an exited process's threads must not bring
            // back the entry `forget_pid` removed.
            if totals != (0, 0) {
                let t = self.per_pid.entry(now.tgid).or_default();
                t.0 += totals.0;
                t.1 += totals.1;
            }
            let nested = now.nested.saturating_sub(last.nested);
            if nested > 0 {
                m.nested
                    .get_or_create(&ApiLabels { api: "launch" })
                    .inc_by(nested);
            }
            if alive(now.tgid, *tid) {
                self.last.insert(*tid, *now);
            } else {
                self.last.remove(tid);
                dead.push(*tid);
            }
        }
        dead
    }

    pub fn forget_pid(&mut self, pid: u32) {
        self.per_pid.remove(&pid);
    }
}

#[cfg(test)]
mod tests {
    use prometheus_client::registry::Registry;

    use super::*;

    fn thread(tgid: u32, kernel: u64, graph: u64, nested: u64) -> CudaThread {
        let mut t = CudaThread {
            tgid,
            nested,
            ..CudaThread::default()
        };
        t.launches[api::CU_LAUNCH_KERNEL as usize] = kernel;
        t.launches[api::CU_GRAPH_LAUNCH as usize] = graph;
        t
    }

    #[test]
    fn deltas_dead_threads_and_reused_ids() {
        let m = CudaMetrics::new(&mut Registry::default());
        let mut t = LaunchTracker::default();
        let get = |m: &CudaMetrics, api| m.kernel_launches.get_or_create(&ApiLabels { api }).get();
        assert!(t
            .fold_with(&[(10, thread(1, 5, 1, 0))], &m, |_, _| true)
            .is_empty());
        assert!(t
            .fold_with(&[(10, thread(1, 8, 1, 2))], &m, |_, _| true)
            .is_empty());
        assert_eq!(get(&m, "cuLaunchKernel"), 8);
        assert_eq!(
            m.graph_launches
                .get_or_create(&ApiLabels {
                    api: "cuGraphLaunch"
                })
                .get(),
            1
        );
        assert_eq!(
            m.nested.get_or_create(&ApiLabels { api: "launch" }).get(),
            2
        );
        // The thread exits with 2 more launches: folded, then reported for deletion.
        assert_eq!(
            t.fold_with(&[(10, thread(1, 10, 1, 2))], &m, |_, _| false),
            vec![10]
        );
        assert_eq!(get(&m, "cuLaunchKernel"), 10);
        // Thread id 10 reused by process 2: counted from zero.
        t.fold_with(&[(10, thread(2, 3, 0, 0))], &m, |_, _| true);
        assert_eq!(get(&m, "cuLaunchKernel"), 13);
        assert_eq!(t.per_pid[&1], (10, 1));
        assert_eq!(t.per_pid[&2], (3, 0));
    }
}
