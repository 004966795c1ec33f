//! Latency attribution: where a request's time to first token went, from the moments the kernel
//! saw (docs/attribution.md has the definitions). Pure: a finished `RequestRecord` and the
//! front process's recent IPC times in, stage durations out.
//!
//! Stages, in order, adding up to the TTFT exactly:
//! - `socket_queue`: the request's first bytes reached the server's socket → the server's read
//!   that returned them (the event loop was busy elsewhere, or the thread waited for a CPU);
//! - `frontend`: that read → the hand-off, the front process's first IPC send at or after it
//!   (vLLM's API server → `EngineCore` over ZMQ): parsing, templating, tokenization;
//! - `engine`: the hand-off → the return, the front process's last IPC receive at or before the
//!   first content write: queueing and prefill in the engine process;
//! - `output`: the return → the first content write (detokenize, SSE).
//!
//! Without IPC of the front process between its read and its first content write (a
//! single-process server), `frontend` and `output` are 0 and `engine` is all of it. With requests
//! overlapping, the first send after a read may be another request's hand-off and the last receive
//! before a write may carry other requests' outputs: boundaries are times, shared by every request
//! whose window holds them (a batched message is not apportioned), and exact for a request alone.
//!
//! The serving thread's states: when one thread read the request and wrote its first content
//! event (asyncio, Node, llama.cpp's HTTP thread), the differences of that thread's kernel clock
//! (`ThreadClock`) between the two moments are its on-CPU, runnable (run-queue delay) and blocked
//! time over `frontend` + `engine` + `output` together ("server"), adding up exactly.

use std::collections::VecDeque;

use rustc_hash::FxHashMap;
use serde::Serialize;

use crate::http::{Moment, RequestRecord, ThreadClock};

mod gpu;
pub use gpu::{GpuLog, GpuWait};

/// Stage names, as metric label values and `/api/v1/requests` keys.
pub const STAGES: [&str; 4] = ["socket_queue", "frontend", "engine", "output"];
/// Thread states of the serving thread's split (`unknown`: the request had no split).
pub const STATES: [&str; 4] = ["on_cpu", "runnable", "blocked", "unknown"];
/// The span the thread split covers: `frontend` + `engine` + `output`.
pub const SERVER_SPAN: &str = "server";

/// A request's TTFT split into stages (ns); the fields sum to its `ttft_ns`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Stages {
    pub socket_queue: u64,
    pub frontend: u64,
    pub engine: u64,
    pub output: u64,
}

impl Stages {
    pub const fn total(&self) -> u64 {
        self.socket_queue + self.frontend + self.engine + self.output
    }

    /// The stages after `socket_queue`: the serving thread's span.
    pub const fn server(&self) -> u64 {
        self.frontend + self.engine + self.output
    }

    /// (name, ns) in `STAGES` order.
    pub const fn named(&self) -> [(&'static str, u64); 4] {
        [
            (STAGES[0], self.socket_queue),
            (STAGES[1], self.frontend),
            (STAGES[2], self.engine),
            (STAGES[3], self.output),
        ]
    }
}

/// A span's time by the state of the thread doing the work (ns); sums to the span.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct StateSplit {
    pub on_cpu: u64,
    pub runnable: u64,
    pub blocked: u64,
}

impl StateSplit {
    pub const fn total(&self) -> u64 {
        self.on_cpu + self.runnable + self.blocked
    }
}

/// The spans that have a thread split: `server` (= `frontend` + `engine` + `output`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct StageThreads {
    pub server: StateSplit,
}

/// A request's TTFT breakdown.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Breakdown {
    pub stages: Stages,
    /// Whether IPC of the front process split the server's time (else all of it is `engine`).
    pub handed_off: bool,
    pub threads: Option<StageThreads>,
    /// The engine stage's wait in CUDA synchronize calls (`gpu::GpuLog`); `None` without CUDA.
    pub gpu: Option<GpuWait>,
}

/// IPC sends or receives of one process kept for attribution.
pub const IPC_KEPT: usize = 4096;
/// Processes whose IPC times are kept; IPC of further ones is not (their requests get no split).
pub const IPC_PROCESSES: usize = 256;

/// Recent IPC times (the kernel's `Ipc` records) per traced process, in time order, bounded.
#[derive(Debug, Default)]
pub struct IpcLog {
    procs: FxHashMap<u32, [VecDeque<u64>; 2]>,
}

impl IpcLog {
    /// One IPC send (`egress`) or receive of process `tgid` at `ts_ns`.
    pub fn record(&mut self, tgid: u32, ts_ns: u64, egress: bool) {
        if self.procs.len() >= IPC_PROCESSES && !self.procs.contains_key(&tgid) {
            return;
        }
        let q = &mut self.procs.entry(tgid).or_default()[usize::from(egress)];
        if q.len() >= IPC_KEPT {
            q.pop_front();
        }
        // Records reach the agent nearly in time order (per-CPU producers): insert from the back.
        let at = q.iter().rposition(|&t| t <= ts_ns).map_or(0, |i| i + 1);
        q.insert(at, ts_ns);
    }

    /// The process exited: its times go.
    pub fn forget(&mut self, tgid: u32) {
        self.procs.remove(&tgid);
    }

    /// (first send in `[from, to]`, then the last receive in `[that send, to]`).
    fn hand_off(&self, tgid: u32, from: u64, to: u64) -> Option<(u64, u64)> {
        let [_, sends] = self.procs.get(&tgid)?;
        let i = sends.partition_point(|&t| t < from);
        let sent = *sends.get(i).filter(|&&t| t <= to)?;
        Some((sent, self.last_recv_in(tgid, sent, to)?))
    }

    /// The last receive of `tgid` in `[from, to]`.
    fn last_recv_in(&self, tgid: u32, from: u64, to: u64) -> Option<u64> {
        let [recvs, _] = self.procs.get(&tgid)?;
        let j = recvs.partition_point(|&t| t <= to);
        recvs.get(j.checked_sub(1)?).copied().filter(|&t| t >= from)
    }
}

/// A request's decode time (first content write → last) split like the TTFT's server span: per
/// gap between two content writes, `engine` until the front process's last IPC receive inside the
/// gap, `output` from it to the write (a single-process server: all `engine`). Sums to the gaps.
/// `gpu_sync`: the part of `engine` during which the serving process tree waited in CUDA
/// synchronize calls (`gpu::GpuLog`), summed over the gaps that had a figure; `None` when none did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Decode {
    pub engine: u64,
    pub output: u64,
    pub gpu_sync: Option<u64>,
}

/// One gap's split: engine and output time, and the engine part's GPU wait when known.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GapSplit {
    pub engine: u64,
    pub output: u64,
    pub gpu_sync: Option<u64>,
}

impl Decode {
    /// Split the gap `[from, to]` of a request served by `tgid` and add it.
    pub fn add_gap(
        &mut self,
        (ipc, gpu): (&IpcLog, &GpuLog),
        tgid: u32,
        from: u64,
        to: u64,
    ) -> GapSplit {
        let back = ipc.last_recv_in(tgid, from, to).unwrap_or(to);
        let split = GapSplit {
            engine: back - from,
            output: to - back,
            gpu_sync: gpu.wait_in(tgid, from, back).map(|w| w.sync_wait),
        };
        self.engine += split.engine;
        self.output += split.output;
        if let Some(w) = split.gpu_sync {
            self.gpu_sync = Some(self.gpu_sync.unwrap_or(0) + w);
        }
        split
    }
}

/// The breakdown of a finished request with a first token, or `None` (no first token, or the
/// read that returned its first bytes is not known: a connection picked up mid-request).
pub fn ttft(r: &RequestRecord, ipc: &IpcLog, gpu: &GpuLog) -> Option<Breakdown> {
    let first = r.first_token_at?;
    if r.read.ts_ns == 0 || first.ts_ns < r.arrival_ns {
        return None;
    }
    // Arrival is never after the read that returned the bytes, nor the read after the response;
    // clamping keeps the sum exact if a clock ever says otherwise.
    let read_ns = r.read.ts_ns.clamp(r.arrival_ns, first.ts_ns);
    let mut stages = Stages {
        socket_queue: read_ns - r.arrival_ns,
        engine: first.ts_ns - read_ns,
        ..Stages::default()
    };
    let mut engine_at = (read_ns, first.ts_ns);
    let handed_off = match ipc.hand_off(r.conn.tgid, read_ns, first.ts_ns) {
        Some((sent, back)) => {
            stages.frontend = sent - read_ns;
            stages.engine = back - sent;
            stages.output = first.ts_ns - back;
            engine_at = (sent, back);
            true
        }
        None => false,
    };
    let threads = (read_ns == r.read.ts_ns)
        .then(|| split(&r.read, &first, stages.server()))
        .flatten()
        .map(|server| StageThreads { server });
    Some(Breakdown {
        stages,
        handed_off,
        threads,
        gpu: gpu.wait_in(r.conn.tgid, engine_at.0, engine_at.1),
    })
}

/// The state split of `[from, to]` on one thread, when both moments are on the same thread, both
/// clocks are known and their differences add up to `span` (a thread id reused by a new thread,
/// whose clock restarted, does not).
fn split(from: &Moment, to: &Moment, span: u64) -> Option<StateSplit> {
    if from.tid == 0 || from.tid != to.tid || !from.clock.is_known() || !to.clock.is_known() {
        return None;
    }
    let d = |a: u64, b: u64| b.checked_sub(a);
    let (a, b): (&ThreadClock, &ThreadClock) = (&from.clock, &to.clock);
    let s = StateSplit {
        on_cpu: d(a.on_cpu_ns, b.on_cpu_ns)?,
        runnable: d(a.runnable_ns, b.runnable_ns)?,
        blocked: d(a.blocked_ns, b.blocked_ns)?,
    };
    (s.total() == span).then_some(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::{ConnId, Outcome, RequestMeta};

    fn clock(on: u64, run: u64, blk: u64) -> ThreadClock {
        ThreadClock {
            on_cpu_ns: on,
            runnable_ns: run,
            blocked_ns: blk,
        }
    }

    fn record(arrival: u64, read: Moment, first: Option<Moment>) -> RequestRecord {
        RequestRecord {
            conn: ConnId { tgid: 1, fd: 3 },
            meta: RequestMeta::default(),
            status: Some(200),
            outcome: Outcome::Ok,
            arrival_ns: arrival,
            first_token_ns: first.map(|m| m.ts_ns),
            read,
            first_token_at: first,
            end_ns: 10_000,
            content_events: 1,
            token_events: 1,
            gaps_ns: Vec::new(),
            prompt_tokens: None,
            completion_tokens: None,
        }
    }

    fn at(ts: u64, tid: u32, c: ThreadClock) -> Moment {
        Moment {
            ts_ns: ts,
            tid,
            clock: c,
        }
    }

    #[test]
    fn stages_add_up_and_one_thread_is_split() {
        // Arrived at 1,000, read at 1,400 (400 in the socket), first token at 2,400: the reading
        // thread was on a CPU 300, runnable 200, blocked 500 in between.
        let r = record(
            1_000,
            at(1_400, 7, clock(5_000, 100, 9_000)),
            Some(at(2_400, 7, clock(5_300, 300, 9_500))),
        );
        let b = ttft(&r, &IpcLog::default(), &GpuLog::default()).expect("breakdown");
        assert_eq!(
            b.stages,
            Stages {
                socket_queue: 400,
                engine: 1_000,
                ..Stages::default()
            }
        );
        assert_eq!(b.stages.total(), 1_400);
        let t = b.threads.expect("split").server;
        assert_eq!((t.on_cpu, t.runnable, t.blocked), (300, 200, 500));
    }

    #[test]
    fn no_split_across_threads_unknown_clocks_or_a_restarted_clock() {
        let other_thread = record(
            0,
            at(100, 7, clock(10, 0, 0)),
            Some(at(200, 8, clock(110, 0, 0))),
        );
        assert_eq!(
            ttft(&other_thread, &IpcLog::default(), &GpuLog::default())
                .expect("stages")
                .threads,
            None
        );
        let unknown = record(
            0,
            at(100, 7, ThreadClock::default()),
            Some(at(200, 7, clock(110, 0, 0))),
        );
        assert_eq!(
            ttft(&unknown, &IpcLog::default(), &GpuLog::default())
                .expect("stages")
                .threads,
            None
        );
        // Thread id reused: the new thread's clock is behind the old one's.
        let restarted = record(
            0,
            at(100, 7, clock(1_000, 0, 0)),
            Some(at(200, 7, clock(50, 50, 0))),
        );
        assert_eq!(
            ttft(&restarted, &IpcLog::default(), &GpuLog::default())
                .expect("stages")
                .threads,
            None
        );
        // Differences that do not add up to the stage are not a split either.
        let gap = record(
            0,
            at(100, 7, clock(10, 0, 0)),
            Some(at(200, 7, clock(60, 0, 0))),
        );
        assert_eq!(
            ttft(&gap, &IpcLog::default(), &GpuLog::default())
                .expect("stages")
                .threads,
            None
        );
    }

    #[test]
    fn unknown_read_or_no_first_token_gives_no_breakdown() {
        assert_eq!(
            ttft(
                &record(0, Moment::default(), Some(at(5, 1, clock(1, 0, 0)))),
                &IpcLog::default(),
                &GpuLog::default()
            ),
            None
        );
        assert_eq!(
            ttft(
                &record(0, at(5, 1, clock(1, 0, 0)), None),
                &IpcLog::default(),
                &GpuLog::default()
            ),
            None
        );
    }

    #[test]
    fn out_of_order_clocks_still_sum_to_the_ttft() {
        // A read dated before arrival (never expected) is clamped: the stages still add up.
        let r = record(
            1_000,
            at(900, 7, clock(1, 0, 0)),
            Some(at(1_500, 7, clock(601, 0, 0))),
        );
        let b = ttft(&r, &IpcLog::default(), &GpuLog::default()).expect("breakdown");
        assert_eq!(
            b.stages,
            Stages {
                socket_queue: 0,
                engine: 500,
                ..Stages::default()
            }
        );
        assert_eq!(b.threads, None);
    }

    #[test]
    fn ipc_splits_the_server_time_into_frontend_engine_and_output() {
        // Read at 1,000; hand-off sent at 1,300; the engine's outputs came back at 1,700 and
        // 2,100; the first token was written at 2,400. IPC of another process and IPC outside
        // the window change nothing.
        let mut ipc = IpcLog::default();
        for (t, egress) in [(900, true), (1_300, true), (1_500, true), (1_200, false)] {
            ipc.record(1, t, egress);
        }
        for t in [2_100, 1_700, 2_500] {
            ipc.record(1, t, false); // out of order on purpose
        }
        ipc.record(2, 1_100, true);
        let r = record(
            1_000,
            at(1_000, 7, clock(10, 0, 0)),
            Some(at(2_400, 7, clock(410, 0, 1_000))),
        );
        let b = ttft(&r, &ipc, &GpuLog::default()).expect("breakdown");
        assert!(b.handed_off);
        assert_eq!(
            b.stages,
            Stages {
                socket_queue: 0,
                frontend: 300,
                engine: 800,
                output: 300
            }
        );
        assert_eq!(b.stages.total(), 1_400);
        assert_eq!(b.threads.expect("split").server.total(), 1_400);
        // The GPU wait is taken over the engine stage only ([1_300, 2_100]), from the syncs of
        // the engine process (5, a child of the front) as well as the front's own.
        let mut gpu = GpuLog::default();
        gpu.join(5, 1);
        gpu.record(5, 1_000, 1_400);
        gpu.record(1, 2_000, 2_300);
        let w = ttft(&r, &ipc, &gpu).expect("breakdown").gpu;
        assert_eq!(w.map(|w| (w.sync_wait, w.syncs)), Some((200, 2)));
        // A return before the hand-off is not one: no split, all of it is engine.
        let mut early = IpcLog::default();
        early.record(1, 1_300, true);
        early.record(1, 1_200, false);
        let b = ttft(&r, &early, &GpuLog::default()).expect("breakdown");
        assert!(!b.handed_off);
        assert_eq!(
            (b.stages.frontend, b.stages.engine, b.stages.output),
            (0, 1_400, 0)
        );
        // A process that exited is forgotten.
        ipc.forget(1);
        assert!(
            !ttft(&r, &ipc, &GpuLog::default())
                .expect("breakdown")
                .handed_off
        );
    }

    #[test]
    fn ipc_log_is_bounded() {
        let mut ipc = IpcLog::default();
        for t in 0..(IPC_KEPT as u64 + 10) {
            ipc.record(1, t, true);
        }
        assert_eq!(ipc.procs[&1][1].len(), IPC_KEPT);
        assert_eq!(ipc.procs[&1][1].front(), Some(&10));
        for p in 0..(IPC_PROCESSES as u32 + 5) {
            ipc.record(100 + p, 1, false);
        }
        assert_eq!(ipc.procs.len(), IPC_PROCESSES);
    }

    #[test]
    fn decode_gaps_split_at_the_last_receive_inside_them() {
        let mut ipc = IpcLog::default();
        for t in [150, 180, 260] {
            ipc.record(1, t, false);
        }
        let no_gpu = GpuLog::default();
        let split = |engine, output| GapSplit {
            engine,
            output,
            gpu_sync: None,
        };
        let mut d = Decode::default();
        // Gap 100..200: the engine's answer arrived at 180 (the last inside), then 20 of output.
        assert_eq!(d.add_gap((&ipc, &no_gpu), 1, 100, 200), split(80, 20));
        // Gap 200..250: no receive inside: all engine. Another process's IPC does not count.
        ipc.record(2, 220, false);
        assert_eq!(d.add_gap((&ipc, &no_gpu), 1, 200, 250), split(50, 0));
        assert_eq!(d.add_gap((&ipc, &no_gpu), 1, 250, 300), split(10, 40));
        assert_eq!(
            d,
            Decode {
                engine: 140,
                output: 60,
                gpu_sync: None
            }
        );
    }

    #[test]
    fn decode_gaps_gpu_wait_is_taken_over_their_engine_part() {
        let ipc = {
            let mut l = IpcLog::default();
            l.record(1, 180, false);
            l
        };
        let mut gpu = GpuLog::default();
        gpu.join(3, 1);
        gpu.record(3, 120, 170); // inside the engine part of gap 100..200 (until 180)
        gpu.record(3, 185, 195); // in its output part: not counted
        let mut d = Decode::default();
        assert_eq!(
            d.add_gap((&ipc, &gpu), 1, 100, 200),
            GapSplit {
                engine: 80,
                output: 20,
                gpu_sync: Some(50)
            }
        );
        assert_eq!(d.add_gap((&ipc, &gpu), 1, 200, 260).gpu_sync, Some(0));
        assert_eq!(d.gpu_sync, Some(50));
    }
}
