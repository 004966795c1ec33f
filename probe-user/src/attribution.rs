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
//! Unless the request's id (the `id` its response streams) was found in the front's IPC bytes
//! (`ids`): then its hand-off is the first send that carried the id and its return the first
//! receive that did, whatever else overlapped.
//!
//! The serving thread's states: when one thread read the request and wrote its first content
//! event (asyncio, Node, llama.cpp's HTTP thread), the differences of that thread's kernel clock
//! (`ThreadClock`) between the two moments are its on-CPU, runnable (run-queue delay) and blocked
//! time over `frontend` + `engine` + `output` together ("server"), adding up exactly. Each of
//! the three stages is split the same way when the same thread also made the IPC send and
//! receive that bound it (Node's IPC), or when the kernel dated an I/O thread's call on the
//! serving thread's clock (vLLM's ZMQ I/O threads: docs/attribution.md, "The waker's clock").
//!
//! The engine process's side (`EngineSide`): when the request's id matched, the traced process
//! that first received that id at or after the hand-off and first sent it at or before the return
//! (the engine) splits `engine` into the way there, the engine process's own time (that receive →
//! that send: its queue and prefill) and the way back, and its own time by the state of the
//! engine thread that made both calls, when one thread did.

use std::collections::VecDeque;

use rustc_hash::FxHashMap;
use serde::Serialize;

use crate::http::{Gap, Moment, RequestRecord};

mod gpu;
mod ids;
pub use gpu::{GpuLog, GpuWait};
pub use ids::{id_hash, IdIndex};

/// How a request's hand-off was found (`Breakdown::hand_off_by`): `llm_ttft_hand_off_total{by}`
/// and `hand_off` in `/api/v1/requests`.
pub const HAND_OFF: [&str; 3] = ["id", "time", "none"];

/// Stage names, as metric label values and `/api/v1/requests` keys.
pub const STAGES: [&str; 4] = ["socket_queue", "frontend", "engine", "output"];
/// Thread states of the serving thread's split (`unknown`: the request had no split).
pub const STATES: [&str; 4] = ["on_cpu", "runnable", "blocked", "unknown"];
/// The span the thread split covers: `frontend` + `engine` + `output`.
pub const SERVER_SPAN: &str = "server";
/// The engine process's own part of `engine` (`EngineSide::in_engine`), split by its thread.
pub const ENGINE_PROCESS: &str = "engine_process";

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

/// The serving thread's split of `server` (= `frontend` + `engine` + `output`), and of each of
/// the three where the thread's clock is known at both of its ends (`None`: another thread made
/// the hand-off or the return). A request without a hand-off has `frontend` and `output` of 0
/// and `engine` split like `server`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct StageThreads {
    pub server: StateSplit,
    pub frontend: Option<StateSplit>,
    pub engine: Option<StateSplit>,
    pub output: Option<StateSplit>,
}

/// The engine process's part of a request's `engine` stage (ns), from the request's id in that
/// process's own IPC: `to_engine` + `in_engine` + `from_engine` = `engine`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct EngineSide {
    /// The engine process.
    pub pid: u32,
    /// The front's hand-off → the engine process's first receive that carried the id.
    pub to_engine: u64,
    /// That receive → the engine process's first send that carried the id (its first output):
    /// the engine's queue and prefill.
    pub in_engine: u64,
    /// That send → the front's return.
    pub from_engine: u64,
    /// `in_engine` by the state of the engine thread whose clock dated both calls (`None`: two
    /// threads, or a clock not known). That is the thread that made them, or, for calls of a
    /// helper thread, the process's main thread (vLLM's `EngineCore`, whose ZMQ I/O threads do
    /// its socket I/O while its main thread schedules and computes; docs/attribution.md).
    pub threads: Option<StateSplit>,
    /// The thread of `threads` (0 without a split); the main thread when it equals `pid`.
    pub tid: u32,
}

/// A request's TTFT breakdown.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Breakdown {
    pub stages: Stages,
    /// Whether IPC of the front process split the server's time (else all of it is `engine`).
    pub handed_off: bool,
    /// Whether that split came from the request's own id in the IPC bytes (else from times).
    pub matched: bool,
    pub threads: Option<StageThreads>,
    /// The engine stage's wait in CUDA synchronize calls (`gpu::GpuLog`); `None` without CUDA.
    pub gpu: Option<GpuWait>,
    /// The engine process's side of `engine`; `None` unless the hand-off matched by id and a
    /// traced process received and sent the id inside the engine stage.
    pub engine_side: Option<EngineSide>,
}

impl Breakdown {
    /// One of `HAND_OFF`.
    pub const fn hand_off_by(&self) -> &'static str {
        match (self.handed_off, self.matched) {
            (true, true) => "id",
            (true, false) => "time",
            (false, _) => "none",
        }
    }
}

/// IPC sends or receives of one process kept for attribution.
pub const IPC_KEPT: usize = 4096;
/// Processes whose IPC times are kept; IPC of further ones is not (their requests get no split).
pub const IPC_PROCESSES: usize = 256;

/// Recent IPC moments (the kernel's `Ipc` records: time, thread, its clock) per traced process,
/// in time order, bounded: 40 bytes each, at most 2 × 4,096 × 256 of them (84 MB; a process
/// takes what it has used).
#[derive(Debug, Default)]
pub struct IpcLog {
    procs: FxHashMap<u32, [VecDeque<Moment>; 2]>,
    ids: IdIndex,
}

impl IpcLog {
    /// One IPC send (`egress`) or receive of process `tgid` at `at`, whose first bytes (searched
    /// for request ids, then dropped) are `payload`.
    pub fn record(&mut self, tgid: u32, at: Moment, egress: bool, payload: &[u8]) {
        self.ids.record(tgid, at, egress, payload);
        if self.procs.len() >= IPC_PROCESSES && !self.procs.contains_key(&tgid) {
            return;
        }
        let q = &mut self.procs.entry(tgid).or_default()[usize::from(egress)];
        if q.len() >= IPC_KEPT {
            q.pop_front();
        }
        // Records reach the agent nearly in time order (per-CPU producers): insert from the back.
        let i = q
            .iter()
            .rposition(|m| m.ts_ns <= at.ts_ns)
            .map_or(0, |i| i + 1);
        q.insert(i, at);
    }

    /// The process exited: its times go.
    pub fn forget(&mut self, tgid: u32) {
        self.procs.remove(&tgid);
        self.ids.forget(tgid);
    }

    /// The hand-off and return of the request whose response id hashes to `id`: the first send
    /// that carried it in `[from, to]` and the first receive that carried it after that send,
    /// before `to`.
    fn matched(&self, tgid: u32, id: u64, from: u64, to: u64) -> Option<(Moment, Moment)> {
        let t = self.ids.get(tgid, id)?;
        let (sent, back) = (t.sent?, t.back?);
        (from <= sent.ts_ns && sent.ts_ns <= back.ts_ns && back.ts_ns <= to).then_some((sent, back))
    }

    /// The engine process's side of a request of `front` whose id hashes to `id`, handed off at
    /// `sent` and returned at `back`: of the other processes that received the id at or after
    /// `sent` and then sent it at or before `back`, the one that received it first (`SGLang`'s
    /// scheduler, not its detokenizer after it).
    fn engine_side(&self, front: u32, id: u64, sent: u64, back: u64) -> Option<EngineSide> {
        let (pid, intake, out) = self
            .ids
            .elsewhere(front, id)
            .filter_map(|(pid, t)| Some((pid, t.back?, t.sent?)))
            .filter(|(_, i, o)| sent <= i.ts_ns && i.ts_ns <= o.ts_ns && o.ts_ns <= back)
            .min_by_key(|(_, i, _)| i.ts_ns)?;
        let in_engine = out.ts_ns - intake.ts_ns;
        let threads = split(&intake, &out, in_engine);
        Some(EngineSide {
            pid,
            to_engine: intake.ts_ns - sent,
            in_engine,
            from_engine: back - out.ts_ns,
            threads,
            tid: if threads.is_some() { intake.tid } else { 0 },
        })
    }

    /// (first send in `[from, to]`, then the last receive in `[that send, to]`).
    fn hand_off(&self, tgid: u32, from: u64, to: u64) -> Option<(Moment, Moment)> {
        let [_, sends] = self.procs.get(&tgid)?;
        let i = sends.partition_point(|m| m.ts_ns < from);
        let sent = *sends.get(i).filter(|m| m.ts_ns <= to)?;
        Some((sent, self.last_recv_in(tgid, sent.ts_ns, to)?))
    }

    /// The last receive of `tgid` in `[from, to]` that carried the id hashing to `id`.
    fn last_recv_of(&self, tgid: u32, id: u64, from: u64, to: u64) -> Option<u64> {
        self.ids.get(tgid, id)?.last_back_in(from, to)
    }

    /// The last receive of `tgid` in `[from, to]`.
    fn last_recv_in(&self, tgid: u32, from: u64, to: u64) -> Option<Moment> {
        let [recvs, _] = self.procs.get(&tgid)?;
        let j = recvs.partition_point(|m| m.ts_ns <= to);
        recvs
            .get(j.checked_sub(1)?)
            .copied()
            .filter(|m| m.ts_ns >= from)
    }
}

/// A request's decode time (first content write → last) split like the TTFT's server span: per
/// gap between two content writes, `engine` until the front process's last IPC receive inside the
/// gap that carried the request's id (`by_id` counts those gaps), else its last IPC receive
/// inside the gap, and `output` from it to the write (no receive: all `engine`). Sums to the gaps.
/// `gpu_sync`: the part of `engine` during which the serving process tree waited in CUDA
/// synchronize calls (`gpu::GpuLog`), summed over the gaps that had a figure; `None` when none did.
/// `threads`: the same gaps by the state of the thread that wrote both ends of each.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Decode {
    pub engine: u64,
    pub output: u64,
    /// Gaps whose return was found by the request's id (the rest: by time).
    pub by_id: u64,
    pub gpu_sync: Option<u64>,
    pub threads: DecodeThreads,
}

/// Decode gaps by the state of the thread that made both writes of a gap (as `split`), and
/// `unknown` for the gaps without a split (two threads, or a clock not known at one end). The
/// four add up to the gaps.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct DecodeThreads {
    pub on_cpu: u64,
    pub runnable: u64,
    pub blocked: u64,
    pub unknown: u64,
}

impl DecodeThreads {
    /// The values in `STATES` order.
    pub const fn values(&self) -> [u64; 4] {
        [self.on_cpu, self.runnable, self.blocked, self.unknown]
    }

    /// A gap of `span` ns with its thread split, or without one (`unknown`).
    fn of(span: u64, split: Option<StateSplit>) -> Self {
        match split {
            Some(s) => Self {
                on_cpu: s.on_cpu,
                runnable: s.runnable,
                blocked: s.blocked,
                unknown: 0,
            },
            None => Self {
                unknown: span,
                ..Self::default()
            },
        }
    }

    fn add(&mut self, o: &Self) {
        self.on_cpu += o.on_cpu;
        self.runnable += o.runnable;
        self.blocked += o.blocked;
        self.unknown += o.unknown;
    }
}

/// One gap's split: engine and output time, the engine part's GPU wait when known, and the
/// writing thread's states.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GapSplit {
    /// How the return that ends `engine` was found: one of `HAND_OFF`.
    pub by: &'static str,
    pub engine: u64,
    pub output: u64,
    pub gpu_sync: Option<u64>,
    pub threads: DecodeThreads,
}

impl Decode {
    /// Split `gap` of a request served by `tgid` and add it.
    pub fn add_gap(&mut self, (ipc, gpu): (&IpcLog, &GpuLog), tgid: u32, gap: &Gap) -> GapSplit {
        let from = gap.from.ts_ns;
        let to = gap.to.ts_ns.max(from);
        let by_id = gap.id.and_then(|id| ipc.last_recv_of(tgid, id, from, to));
        let by_time = || ipc.last_recv_in(tgid, from, to).map(|m| m.ts_ns);
        let (by, back) = match (by_id, by_id.is_none().then(by_time).flatten()) {
            (Some(t), _) => ("id", t),
            (None, Some(t)) => ("time", t),
            (None, None) => ("none", to),
        };
        self.by_id += u64::from(by_id.is_some());
        let g = GapSplit {
            by,
            engine: back - from,
            output: to - back,
            gpu_sync: gpu.wait_in(tgid, from, back).map(|w| w.sync_wait),
            threads: DecodeThreads::of(to - from, split(&gap.from, &gap.to, to - from)),
        };
        self.engine += g.engine;
        self.output += g.output;
        if let Some(w) = g.gpu_sync {
            self.gpu_sync = Some(self.gpu_sync.unwrap_or(0) + w);
        }
        self.threads.add(&g.threads);
        g
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
    let read = Moment {
        ts_ns: read_ns,
        ..r.read
    };
    // The request's own id in the IPC bytes first, else the nearest IPC times. Without a
    // hand-off, the server's time is all engine: frontend and output are empty.
    let matched = r
        .response_id
        .and_then(|id| ipc.matched(r.conn.tgid, id, read_ns, first.ts_ns));
    let hand_off = matched.or_else(|| ipc.hand_off(r.conn.tgid, read_ns, first.ts_ns));
    let (sent, back) = hand_off.unwrap_or((read, first));
    let stages = Stages {
        socket_queue: read_ns - r.arrival_ns,
        frontend: sent.ts_ns - read_ns,
        engine: back.ts_ns - sent.ts_ns,
        output: first.ts_ns - back.ts_ns,
    };
    let threads = (read_ns == r.read.ts_ns)
        .then(|| split(&read, &first, stages.server()))
        .flatten()
        .map(|server| StageThreads {
            server,
            frontend: split(&read, &sent, stages.frontend),
            engine: split(&sent, &back, stages.engine),
            output: split(&back, &first, stages.output),
        });
    let engine_side = matched
        .zip(r.response_id)
        .and_then(|((s, b), id)| ipc.engine_side(r.conn.tgid, id, s.ts_ns, b.ts_ns));
    Some(Breakdown {
        stages,
        handed_off: hand_off.is_some(),
        matched: matched.is_some(),
        threads,
        gpu: gpu.wait_in(r.conn.tgid, sent.ts_ns, back.ts_ns),
        engine_side,
    })
}

/// The state split of `[from, to]` on one thread, when both moments are on the same thread, both
/// clocks are known, no scheduler event of the thread was missed in between (the kernel repaired
/// its entry: the time before the repair sits in a state the thread was not in) and their
/// differences add up to `span` (a thread id reused by a new thread, whose clock restarted, does
/// not).
fn split(from: &Moment, to: &Moment, span: u64) -> Option<StateSplit> {
    let (a, b) = (&from.clock, &to.clock);
    if from.tid == 0 || from.tid != to.tid || !a.is_known() || !b.is_known() {
        return None;
    }
    if a.repairs != b.repairs {
        return None;
    }
    let d = |a: u64, b: u64| b.checked_sub(a);
    let s = StateSplit {
        on_cpu: d(a.on_cpu_ns, b.on_cpu_ns)?,
        runnable: d(a.runnable_ns, b.runnable_ns)?,
        blocked: d(a.blocked_ns, b.blocked_ns)?,
    };
    (s.total() == span).then_some(s)
}

#[cfg(test)]
mod tests;
