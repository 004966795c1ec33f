//! The GPU's share of a request's engine stage: how long the engine waited in CUDA synchronize
//! calls while the request was in the engine (docs/attribution.md, "GPU waits").
//!
//! A synchronize call (`cuStreamSynchronize`, `cuCtxSynchronize`, `cuEventSynchronize`, the
//! runtime's) returns when the GPU finished the work queued before it: the host thread's wait in
//! it is GPU time the request could not get past. Its interval (entry → return, both stamped by
//! the kernel) is kept per *process tree* — the engine that computes for a request is often another
//! process than the one that read it (vLLM's API server hands requests to `EngineCore`, whose
//! workers sync) — and a request's wait is the part of its engine stage covered by the union of
//! those intervals: two workers of one tensor-parallel step waiting at once count once, and a step
//! that serves a batch counts for every request of the batch whose engine stage it overlaps (a
//! batch's requests all wait for it; nothing is apportioned).

use std::collections::VecDeque;

use rustc_hash::FxHashMap;
use serde::Serialize;

/// Sync intervals kept per process tree: at 100 steps/s on 8 workers, the last ~5 s. A request
/// whose engine stage began before the oldest dropped interval ended gets no figure (never an
/// undercount).
pub const SYNCS_KEPT: usize = 4096;
/// Process trees with sync history, and processes mapped to a tree (bounded like the IPC log).
pub const GPU_TREES: usize = 256;
pub const GPU_PROCESSES: usize = 4096;

/// The engine stage's GPU wait (ns): `sync_wait` ≤ the engine stage.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct GpuWait {
    /// Time inside the engine stage during which a thread of the serving process tree was inside
    /// a CUDA synchronize call (union over threads and processes).
    pub sync_wait: u64,
    /// Synchronize calls that overlapped the stage.
    pub syncs: u32,
}

#[derive(Debug, Default)]
struct Tree {
    /// (start, end), ordered by end.
    syncs: VecDeque<(u64, u64)>,
    /// The end of the newest interval dropped for room: windows starting before it are unknown.
    dropped_until: u64,
}

/// Sync intervals by process tree, and which tree each traced process belongs to.
#[derive(Debug, Default)]
pub struct GpuLog {
    tree_of: FxHashMap<u32, u32>,
    trees: FxHashMap<u32, Tree>,
}

impl GpuLog {
    /// The tree `tgid` belongs to (itself when never joined to one).
    fn tree(&self, tgid: u32) -> u32 {
        self.tree_of.get(&tgid).copied().unwrap_or(tgid)
    }

    /// `child` belongs to `parent`'s tree (a fork, or a descendant found at attach).
    pub fn join(&mut self, child: u32, parent: u32) {
        let root = self.tree(parent);
        if child == root
            || (self.tree_of.len() >= GPU_PROCESSES && !self.tree_of.contains_key(&child))
        {
            return;
        }
        self.tree_of.insert(child, root);
    }

    /// A synchronize call of a thread of `tgid` ran from `start` to `end`.
    pub fn record(&mut self, tgid: u32, start: u64, end: u64) {
        let root = self.tree(tgid);
        if start > end || (self.trees.len() >= GPU_TREES && !self.trees.contains_key(&root)) {
            return;
        }
        let t = self.trees.entry(root).or_default();
        if t.syncs.len() >= SYNCS_KEPT {
            if let Some((_, e)) = t.syncs.pop_front() {
                t.dropped_until = t.dropped_until.max(e);
            }
        }
        let at = t
            .syncs
            .iter()
            .rposition(|&(_, e)| e <= end)
            .map_or(0, |i| i + 1);
        t.syncs.insert(at, (start, end));
    }

    /// `tgid` exited: its tree keeps its history (other members may still compute).
    pub fn forget(&mut self, tgid: u32) {
        self.tree_of.remove(&tgid);
        if !self.tree_of.values().any(|&r| r == tgid) {
            self.trees.remove(&tgid);
        }
    }

    /// The GPU wait of `tgid`'s tree inside `[from, to]`: `None` when the tree has no sync on
    /// record (no CUDA probes, or no GPU work yet) or its history no longer reaches `from`.
    pub fn wait_in(&self, tgid: u32, from: u64, to: u64) -> Option<GpuWait> {
        if self.trees.is_empty() {
            return None; // no GPU work seen (every gap of a CPU-only server asks)
        }
        let t = self.trees.get(&self.tree(tgid))?;
        if from < t.dropped_until || to < from {
            return None;
        }
        // Intervals ending after `from` and starting before `to`, clipped to the window. Walked
        // by end, newest first, their union needs no sort: an interval ending before the start
        // of the block merged so far cannot touch it, nor can any after it.
        let first = t.syncs.partition_point(|&(_, e)| e <= from);
        let mut w = GpuWait::default();
        let mut block: Option<(u64, u64)> = None;
        for &(s, e) in t.syncs.range(first..).rev().filter(|&&(s, _)| s < to) {
            let (s, e) = (s.max(from), e.min(to));
            w.syncs = w.syncs.saturating_add(1);
            block = match block {
                Some((lo, hi)) if e >= lo => Some((lo.min(s), hi)),
                Some((lo, hi)) => {
                    w.sync_wait += hi - lo;
                    Some((s, e))
                }
                None => Some((s, e)),
            };
        }
        if let Some((lo, hi)) = block {
            w.sync_wait += hi - lo;
        }
        Some(w)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlapping_waits_count_once_and_are_clipped_to_the_window() {
        let mut g = GpuLog::default();
        g.join(11, 10);
        g.join(12, 11); // a grandchild joins the root's tree
        g.record(11, 100, 200);
        g.record(12, 150, 260); // another worker of the same step
        g.record(10, 400, 450);
        g.record(10, 900, 1_000); // after the window
        let w = g.wait_in(12, 120, 430).expect("tree has syncs");
        // [120,260] ∪ [400,430] = 140 + 30
        assert_eq!(
            w,
            GpuWait {
                sync_wait: 170,
                syncs: 3
            }
        );
        assert_eq!(g.wait_in(10, 500, 800).map(|w| w.sync_wait), Some(0));
    }

    #[test]
    fn no_figure_without_syncs_or_beyond_the_kept_history() {
        let mut g = GpuLog::default();
        assert_eq!(g.wait_in(1, 0, 10), None, "no CUDA seen: unknown, not 0");
        g.record(2, 0, 5);
        assert_eq!(
            g.wait_in(1, 0, 10),
            None,
            "another tree's syncs are not ours"
        );
        for i in 0..=SYNCS_KEPT as u64 {
            g.record(1, 10 * i, 10 * i + 5);
        }
        assert_eq!(g.wait_in(1, 0, 100), None, "the first interval was dropped");
        let w = g.wait_in(1, 100, 120).expect("kept");
        assert_eq!(w.sync_wait, 10);
    }

    #[test]
    fn out_of_order_records_and_exits() {
        let mut g = GpuLog::default();
        g.join(2, 1);
        g.record(2, 50, 60);
        g.record(1, 10, 20); // a record that ended earlier arrives later
        assert_eq!(g.wait_in(1, 0, 100).map(|w| w.sync_wait), Some(20));
        g.forget(2);
        assert_eq!(g.wait_in(1, 0, 100).map(|w| w.sync_wait), Some(20));
        g.forget(1);
        assert_eq!(g.wait_in(1, 0, 100), None);
    }

    #[test]
    fn bounded_processes_and_trees() {
        let mut g = GpuLog::default();
        for p in 0..(GPU_PROCESSES as u32 + 10) {
            g.join(p + 1_000_000, 1);
        }
        assert_eq!(g.tree_of.len(), GPU_PROCESSES);
        for p in 0..(GPU_TREES as u32 + 10) {
            g.record(p + 10, 0, 1);
        }
        assert_eq!(g.trees.len(), GPU_TREES);
    }
}
