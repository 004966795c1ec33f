//! Kernel and graph launch counts, folded from the kernel's per-thread counters (`CUDA_THREADS`)
//! by delta. The agent folds at every housekeeping tick and at every scrape (its collector then
//! exports `totals` as `llm_cuda_kernel_launches_total{api}` / `llm_cuda_graph_launches_total{api}`).
//! Entries of threads that exited are folded one last time and removed from the map.

use probe_common::{cuda::api, CudaThread};
use rustc_hash::FxHashMap;

#[derive(Default)]
pub struct LaunchTracker {
    last: FxHashMap<u32, CudaThread>,
    /// Launch totals per process since attach (for `llm-probe memleak` and the demo).
    pub per_pid: FxHashMap<u32, (u64, u64)>,
    /// Launches since attach, by API id (kernel and graph launches alike).
    pub totals: [u64; api::LAUNCH_COUNT as usize],
    /// Driver launches made by a runtime launch of the same thread (counted once, as the runtime's).
    pub nested: u64,
}

impl LaunchTracker {
    /// Fold `threads` (tid, counters) into the totals. Returns the thread ids whose entries can be
    /// deleted from the kernel map (`alive` says the thread is gone and its last counts are folded).
    pub fn fold_with(
        &mut self,
        threads: &[(u32, CudaThread)],
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
                self.totals[i] += d;
                if api::is_graph_launch(id) {
                    totals.1 += d;
                } else {
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
            self.nested += now.nested.saturating_sub(last.nested);
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
        let mut t = LaunchTracker::default();
        let kernel = |t: &LaunchTracker| t.totals[api::CU_LAUNCH_KERNEL as usize];
        assert!(t
            .fold_with(&[(10, thread(1, 5, 1, 0))], |_, _| true)
            .is_empty());
        assert!(t
            .fold_with(&[(10, thread(1, 8, 1, 2))], |_, _| true)
            .is_empty());
        assert_eq!(kernel(&t), 8);
        assert_eq!(t.totals[api::CU_GRAPH_LAUNCH as usize], 1);
        assert_eq!(t.nested, 2);
        // The thread exits with 2 more launches: folded, then reported for deletion.
        assert_eq!(
            t.fold_with(&[(10, thread(1, 10, 1, 2))], |_, _| false),
            vec![10]
        );
        assert_eq!(kernel(&t), 10);
        // Thread id 10 reused by process 2: counted from zero.
        t.fold_with(&[(10, thread(2, 3, 0, 0))], |_, _| true);
        assert_eq!(kernel(&t), 13);
        assert_eq!(t.per_pid[&1], (10, 1));
        assert_eq!(t.per_pid[&2], (3, 0));
    }
}
