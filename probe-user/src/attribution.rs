//! Latency attribution: where a request's time to first token went, from the moments the kernel
//! saw (docs/attribution.md has the definitions and what is not built yet). Pure: a finished
//! `RequestRecord` in, stage durations out.
//!
//! Stages, in order, adding up to the TTFT exactly:
//! - `socket_queue`: the request's first bytes reached the server's socket → the server's read
//!   that returned them (the event loop was busy elsewhere, or the thread waited for a CPU);
//! - `engine`: that read → the write of the first content event. For a single-process server this
//!   is all of parsing, queueing, prefill, detokenizing and the first write; the multi-process
//!   split (frontend → engine hand-off → output) is not built yet.
//!
//! The `engine` stage is split by the scheduler state of the thread that read the request, when
//! the same thread also wrote the first content event (asyncio, Node, llama.cpp's HTTP thread):
//! the differences of that thread's kernel clock (`ThreadClock`) between the two moments are its
//! on-CPU, runnable (run-queue delay) and blocked time, and add up to the stage exactly. Other
//! requests get no split (`threads` is `None`), counted as `unknown` time in the metrics.

use serde::Serialize;

use crate::http::{Moment, RequestRecord, ThreadClock};

/// Stage names, as metric label values and `/api/v1/requests` keys.
pub const STAGES: [&str; 2] = ["socket_queue", "engine"];
/// Thread states of a stage's split (`unknown`: the stage had no split).
pub const STATES: [&str; 4] = ["on_cpu", "runnable", "blocked", "unknown"];

/// A request's TTFT split into stages (ns); the fields sum to its `ttft_ns`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Stages {
    pub socket_queue: u64,
    pub engine: u64,
}

impl Stages {
    pub const fn total(&self) -> u64 {
        self.socket_queue + self.engine
    }

    /// (name, ns) in `STAGES` order.
    pub const fn named(&self) -> [(&'static str, u64); 2] {
        [(STAGES[0], self.socket_queue), (STAGES[1], self.engine)]
    }
}

/// One stage's time by the state of the thread doing the work (ns); sums to the stage.
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

/// The stages that have a thread split; today only `engine`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct StageThreads {
    pub engine: StateSplit,
}

/// A request's TTFT breakdown.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Breakdown {
    pub stages: Stages,
    pub threads: Option<StageThreads>,
}

/// The breakdown of a finished request with a first token, or `None` (no first token, or the
/// read that returned its first bytes is not known: a connection picked up mid-request).
pub fn ttft(r: &RequestRecord) -> Option<Breakdown> {
    let first = r.first_token_at?;
    if r.read.ts_ns == 0 || first.ts_ns < r.arrival_ns {
        return None;
    }
    // Arrival is never after the read that returned the bytes, nor the read after the response;
    // clamping keeps the sum exact if a clock ever says otherwise.
    let read_ns = r.read.ts_ns.clamp(r.arrival_ns, first.ts_ns);
    let stages = Stages {
        socket_queue: read_ns - r.arrival_ns,
        engine: first.ts_ns - read_ns,
    };
    let threads = (read_ns == r.read.ts_ns)
        .then(|| split(&r.read, &first, stages.engine))
        .flatten()
        .map(|engine| StageThreads { engine });
    Some(Breakdown { stages, threads })
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
        let b = ttft(&r).expect("breakdown");
        assert_eq!(
            b.stages,
            Stages {
                socket_queue: 400,
                engine: 1_000
            }
        );
        assert_eq!(b.stages.total(), 1_400);
        let t = b.threads.expect("split").engine;
        assert_eq!((t.on_cpu, t.runnable, t.blocked), (300, 200, 500));
    }

    #[test]
    fn no_split_across_threads_unknown_clocks_or_a_restarted_clock() {
        let other_thread = record(
            0,
            at(100, 7, clock(10, 0, 0)),
            Some(at(200, 8, clock(110, 0, 0))),
        );
        assert_eq!(ttft(&other_thread).expect("stages").threads, None);
        let unknown = record(
            0,
            at(100, 7, ThreadClock::default()),
            Some(at(200, 7, clock(110, 0, 0))),
        );
        assert_eq!(ttft(&unknown).expect("stages").threads, None);
        // Thread id reused: the new thread's clock is behind the old one's.
        let restarted = record(
            0,
            at(100, 7, clock(1_000, 0, 0)),
            Some(at(200, 7, clock(50, 50, 0))),
        );
        assert_eq!(ttft(&restarted).expect("stages").threads, None);
        // Differences that do not add up to the stage are not a split either.
        let gap = record(
            0,
            at(100, 7, clock(10, 0, 0)),
            Some(at(200, 7, clock(60, 0, 0))),
        );
        assert_eq!(ttft(&gap).expect("stages").threads, None);
    }

    #[test]
    fn unknown_read_or_no_first_token_gives_no_breakdown() {
        assert_eq!(
            ttft(&record(
                0,
                Moment::default(),
                Some(at(5, 1, clock(1, 0, 0)))
            )),
            None
        );
        assert_eq!(ttft(&record(0, at(5, 1, clock(1, 0, 0)), None)), None);
    }

    #[test]
    fn out_of_order_clocks_still_sum_to_the_ttft() {
        // A read dated before arrival (never expected) is clamped: the stages still add up.
        let r = record(
            1_000,
            at(900, 7, clock(1, 0, 0)),
            Some(at(1_500, 7, clock(601, 0, 0))),
        );
        let b = ttft(&r).expect("breakdown");
        assert_eq!(
            b.stages,
            Stages {
                socket_queue: 0,
                engine: 500
            }
        );
        assert_eq!(b.threads, None);
    }
}
