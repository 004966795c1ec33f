//! Engine steps from sync records: a step is one thread's span from its first launch after a sync
//! to the return of its next sync (the kernel stamps both, see `CudaSyncEvent::step_start_ns`).
//!
//! Phase: when request timing knows some request is waiting for its first token, a step that ends
//! then is held until that token comes; the last held step that ended before the first token is
//! the prefill step, the others are decode. Steps while no request waits are decode at once; held
//! steps are released as decode after `HOLD_NS`. The sockets and the GPU often live in different
//! processes (vLLM's API server and engine core), so steps and tokens are matched across all
//! traced processes of this agent.

use std::collections::VecDeque;

use probe_common::CudaSyncEvent;

/// Longest a step waits for a first token before it counts as decode.
pub const HOLD_NS: u64 = 2_000_000_000;
/// Steps held at most (a runaway engine thread cannot grow this).
const MAX_HELD: usize = 4096;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Prefill,
    Decode,
}

impl Phase {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Prefill => "prefill",
            Self::Decode => "decode",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Step {
    pub tgid: u32,
    pub tid: u32,
    pub start_ns: u64,
    pub end_ns: u64,
    pub kernel_launches: u64,
    pub graph_launches: u64,
}

impl Step {
    pub fn seconds(&self) -> f64 {
        self.end_ns.saturating_sub(self.start_ns) as f64 / 1e9
    }
}

/// Finished steps kept for `/api/v1/steps` (`llm-probe trace` draws them): at 100 steps/s on 8
/// workers, the last ~10 s.
pub const RECENT_STEPS: usize = 8192;

/// A finished step as `/api/v1/steps` shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct StepView {
    /// Order of release (a step held for a first token is released later than it ended).
    pub seq: u64,
    pub pid: u32,
    pub tid: u32,
    pub start_ns: u64,
    pub end_ns: u64,
    pub phase: &'static str,
    pub kernel_launches: u64,
    pub graph_launches: u64,
}

/// The newest `RECENT_STEPS` finished steps.
#[derive(Debug, Default)]
pub struct RecentSteps {
    seq: u64,
    items: VecDeque<StepView>,
}

impl RecentSteps {
    pub fn push(&mut self, s: &Step, phase: Phase) {
        if self.items.len() >= RECENT_STEPS {
            self.items.pop_front();
        }
        self.seq += 1;
        self.items.push_back(StepView {
            seq: self.seq,
            pid: s.tgid,
            tid: s.tid,
            start_ns: s.start_ns,
            end_ns: s.end_ns,
            phase: phase.as_str(),
            kernel_launches: s.kernel_launches,
            graph_launches: s.graph_launches,
        });
    }

    /// The sequence number of the newest step released (0: none yet).
    pub const fn newest(&self) -> u64 {
        self.seq
    }

    /// At most `limit` steps released after `after`, oldest first (page on with the last `seq`).
    pub fn after(&self, after: u64, limit: usize) -> impl Iterator<Item = &StepView> {
        let skip = self.items.partition_point(|v| v.seq <= after);
        self.items.range(skip..).take(limit)
    }
}

#[derive(Default)]
struct ThreadMark {
    tgid: u32,
    kernel: u64,
    graph: u64,
}

#[derive(Default)]
pub struct Steps {
    threads: rustc_hash::FxHashMap<u32, ThreadMark>,
    held: VecDeque<Step>,
}

impl Steps {
    /// A sync returned. `waiting`: some request is waiting for its first token. Returns the steps
    /// whose phase is now known.
    pub fn on_sync(&mut self, ev: &CudaSyncEvent, waiting: bool, out: &mut Vec<(Step, Phase)>) {
        if ev.nested != 0 {
            return;
        }
        let m = self.threads.entry(ev.header.tid).or_default();
        m.tgid = ev.header.tgid;
        let kernel = ev.kernel_launches.saturating_sub(m.kernel);
        let graph = ev.graph_launches.saturating_sub(m.graph);
        m.kernel = ev.kernel_launches;
        m.graph = ev.graph_launches;
        if ev.step_start_ns == 0 || kernel + graph == 0 {
            return;
        }
        let step = Step {
            tgid: ev.header.tgid,
            tid: ev.header.tid,
            start_ns: ev.step_start_ns,
            end_ns: ev.header.ts_ns,
            kernel_launches: kernel,
            graph_launches: graph,
        };
        self.expire(step.end_ns, out);
        if waiting {
            if self.held.len() >= MAX_HELD {
                if let Some(s) = self.held.pop_front() {
                    out.push((s, Phase::Decode));
                }
            }
            self.held.push_back(step);
        } else {
            out.push((step, Phase::Decode));
        }
    }

    /// A first token was written at `ts_ns`: in each process, the last held step that ended before
    /// it is a prefill step (one per tensor-parallel rank), earlier held ones are decode.
    pub fn on_first_token(&mut self, ts_ns: u64, out: &mut Vec<(Step, Phase)>) {
        let n = self.held.iter().take_while(|s| s.end_ns <= ts_ns).count();
        let done: Vec<Step> = self.held.drain(..n).collect();
        for (i, s) in done.iter().enumerate() {
            let last_of_its_process = done[i + 1..].iter().all(|later| later.tgid != s.tgid);
            let phase = if last_of_its_process {
                Phase::Prefill
            } else {
                Phase::Decode
            };
            out.push((*s, phase));
        }
    }

    /// Release held steps older than `HOLD_NS` as decode.
    pub fn expire(&mut self, now_ns: u64, out: &mut Vec<(Step, Phase)>) {
        while self
            .held
            .front()
            .is_some_and(|s| now_ns.saturating_sub(s.end_ns) > HOLD_NS)
        {
            let s = self.held.pop_front().expect("checked");
            out.push((s, Phase::Decode));
        }
    }

    pub fn forget_thread(&mut self, tid: u32) {
        self.threads.remove(&tid);
    }

    /// The process exited: drop its threads' marks (threads that sync but never launch have no
    /// kernel counter entry, so `forget_thread` never sees them).
    pub fn forget_process(&mut self, tgid: u32) {
        self.threads.retain(|_, m| m.tgid != tgid);
    }
}

#[cfg(test)]
mod tests {
    use probe_common::EventHeader;

    use super::*;

    fn sync(tid: u32, start: u64, end: u64, kernel: u64, graph: u64) -> CudaSyncEvent {
        CudaSyncEvent {
            header: EventHeader {
                tgid: 1,
                tid,
                ts_ns: end,
                ..EventHeader::default()
            },
            kernel_launches: kernel,
            graph_launches: graph,
            step_start_ns: start,
            ..CudaSyncEvent::default()
        }
    }

    #[test]
    fn launches_between_syncs_make_a_step() {
        let mut s = Steps::default();
        let mut out = Vec::new();
        s.on_sync(&sync(7, 100, 1_100, 250, 0), false, &mut out);
        s.on_sync(&sync(7, 0, 1_200, 250, 0), false, &mut out); // sync with no launch: no step
        s.on_sync(&sync(7, 2_000, 5_000, 250, 1), false, &mut out);
        assert_eq!(out.len(), 2);
        assert_eq!(
            (
                out[0].0.kernel_launches,
                out[0].0.end_ns - out[0].0.start_ns
            ),
            (250, 1_000)
        );
        assert_eq!((out[1].0.graph_launches, out[1].1), (1, Phase::Decode));
    }

    #[test]
    fn the_step_before_a_first_token_is_prefill() {
        let mut s = Steps::default();
        let mut out = Vec::new();
        s.on_sync(&sync(7, 100, 1_000, 10, 0), true, &mut out);
        s.on_sync(&sync(7, 1_100, 2_000, 20, 0), true, &mut out);
        assert!(out.is_empty(), "held while a request waits");
        s.on_sync(&sync(7, 3_100, 4_000, 30, 0), true, &mut out);
        s.on_first_token(2_500, &mut out);
        assert_eq!(out.len(), 2);
        assert_eq!((out[0].1, out[1].1), (Phase::Decode, Phase::Prefill));
        assert_eq!(out[1].0.end_ns, 2_000);
        out.clear();
        s.expire(4_000 + HOLD_NS + 1, &mut out);
        assert_eq!(out, vec![(sync_step(3_100, 4_000), Phase::Decode)]);
    }

    fn sync_step(start: u64, end: u64) -> Step {
        Step {
            tgid: 1,
            tid: 7,
            start_ns: start,
            end_ns: end,
            kernel_launches: 10,
            graph_launches: 0,
        }
    }

    #[test]
    fn each_rank_has_its_prefill_step() {
        let mut s = Steps::default();
        let mut out = Vec::new();
        for tgid in [1, 2] {
            let mut ev = sync(7 + tgid, 100, 1_000, 10, 0);
            ev.header.tgid = tgid;
            s.on_sync(&ev, true, &mut out);
        }
        s.on_first_token(2_000, &mut out);
        assert_eq!(
            out.iter().map(|(st, p)| (st.tgid, *p)).collect::<Vec<_>>(),
            vec![(1, Phase::Prefill), (2, Phase::Prefill)]
        );
    }

    #[test]
    fn nested_syncs_are_ignored() {
        let mut s = Steps::default();
        let mut out = Vec::new();
        let mut ev = sync(7, 100, 1_000, 10, 0);
        ev.nested = 1;
        s.on_sync(&ev, false, &mut out);
        assert!(out.is_empty());
    }

    #[test]
    fn recent_steps_page_oldest_first_and_stay_bounded() {
        let mut r = RecentSteps::default();
        for i in 0..(RECENT_STEPS as u64 + 5) {
            r.push(&sync_step(i, i + 1), Phase::Decode);
        }
        assert_eq!(r.newest(), RECENT_STEPS as u64 + 5);
        let first: Vec<u64> = r.after(0, 3).map(|v| v.seq).collect();
        assert_eq!(first, [6, 7, 8], "the 5 oldest were dropped");
        let next: Vec<u64> = r.after(8, 2).map(|v| v.seq).collect();
        assert_eq!(next, [9, 10]);
        assert_eq!(r.after(r.newest(), 10).count(), 0);
        let v = r.after(8, 1).next().copied().expect("step");
        assert_eq!((v.start_ns, v.end_ns, v.phase, v.tid), (8, 9, "decode", 7));
    }
}
