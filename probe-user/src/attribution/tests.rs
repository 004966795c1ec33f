use super::*;
use crate::http::{ConnId, Outcome, RequestMeta, ThreadClock};

fn clock(on: u64, run: u64, blk: u64) -> ThreadClock {
    ThreadClock {
        on_cpu_ns: on,
        runnable_ns: run,
        blocked_ns: blk,
        ..ThreadClock::default()
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
        response_id: None,
    }
}

fn at(ts: u64, tid: u32, c: ThreadClock) -> Moment {
    Moment {
        ts_ns: ts,
        tid,
        clock: c,
    }
}

/// A moment at `ts` on a thread that is not known.
fn when(ts: u64) -> Moment {
    at(ts, 0, ThreadClock::default())
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
fn no_split_across_threads_unknown_clocks_a_restarted_clock_or_a_repair() {
    for (why, read, first) in [
        (
            "another thread",
            at(100, 7, clock(10, 0, 0)),
            at(200, 8, clock(110, 0, 0)),
        ),
        (
            "a clock not known",
            at(100, 7, ThreadClock::default()),
            at(200, 7, clock(110, 0, 0)),
        ),
        // Thread id reused: the new thread's clock is behind the old one's.
        (
            "a restarted clock",
            at(100, 7, clock(1_000, 0, 0)),
            at(200, 7, clock(50, 50, 0)),
        ),
        // Differences that do not add up to the stage are not a split either.
        (
            "a short sum",
            at(100, 7, clock(10, 0, 0)),
            at(200, 7, clock(60, 0, 0)),
        ),
        // The kernel repaired the thread's entry in between (a switch-in was not seen): the
        // differences add up, but part of the on-CPU time sits in runnable.
        (
            "a repair in between",
            at(100, 7, clock(10, 0, 0)),
            at(
                200,
                7,
                ThreadClock {
                    repairs: 1,
                    ..clock(40, 70, 0)
                },
            ),
        ),
    ] {
        let r = record(0, read, Some(first));
        let b = ttft(&r, &IpcLog::default(), &GpuLog::default()).expect("stages");
        assert_eq!(b.threads, None, "{why}");
    }
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
        ipc.record(1, when(t), egress, b"");
    }
    for t in [2_100, 1_700, 2_500] {
        ipc.record(1, when(t), false, b""); // out of order on purpose
    }
    ipc.record(2, when(1_100), true, b"");
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
    // The IPC was made by a thread that is not known: the server span is split, no stage is.
    let t = b.threads.expect("split");
    assert_eq!(t.server.total(), 1_400);
    assert_eq!((t.frontend, t.engine, t.output), (None, None, None));
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
    early.record(1, when(1_300), true, b"");
    early.record(1, when(1_200), false, b"");
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
fn each_stage_is_split_when_the_serving_thread_made_the_hand_off_and_return() {
    // Thread 7 reads at 1,000, spins 300 until its send at 1,300, sleeps until the engine's
    // answer is received at 2,100 (runnable 100 of it), spins 300 to the write at 2,400.
    let mut ipc = IpcLog::default();
    ipc.record(1, at(1_300, 7, clock(310, 0, 0)), true, b"");
    ipc.record(1, at(2_100, 7, clock(310, 100, 700)), false, b"");
    let r = record(
        1_000,
        at(1_000, 7, clock(10, 0, 0)),
        Some(at(2_400, 7, clock(610, 100, 700))),
    );
    let b = ttft(&r, &ipc, &GpuLog::default()).expect("breakdown");
    let t = b.threads.expect("split");
    let s = |on_cpu, runnable, blocked| {
        Some(StateSplit {
            on_cpu,
            runnable,
            blocked,
        })
    };
    assert_eq!(
        (t.frontend, t.engine, t.output),
        (s(300, 0, 0), s(0, 100, 700), s(300, 0, 0))
    );
    assert_eq!(t.server, s(600, 100, 700).expect("split"));
    // The return received by another thread (vLLM's ZMQ I/O thread): the two stages it bounds
    // have no split; the frontend still has.
    let mut other = IpcLog::default();
    other.record(1, at(1_300, 7, clock(310, 0, 0)), true, b"");
    other.record(1, at(2_100, 8, clock(50, 0, 50)), false, b"");
    let t = ttft(&r, &other, &GpuLog::default())
        .and_then(|b| b.threads)
        .expect("split");
    assert_eq!((t.frontend, t.engine, t.output), (s(300, 0, 0), None, None));
    // No hand-off (a single-process server): frontend and output are empty, engine is the span.
    let t = ttft(&r, &IpcLog::default(), &GpuLog::default())
        .and_then(|b| b.threads)
        .expect("split");
    assert_eq!(
        (t.frontend, t.engine, t.output),
        (s(0, 0, 0), Some(t.server), s(0, 0, 0))
    );
}

#[test]
fn ipc_log_is_bounded() {
    let mut ipc = IpcLog::default();
    for t in 0..(IPC_KEPT as u64 + 10) {
        ipc.record(1, when(t), true, b"");
    }
    assert_eq!(ipc.procs[&1][1].len(), IPC_KEPT);
    assert_eq!(ipc.procs[&1][1].front().map(|m| m.ts_ns), Some(10));
    for p in 0..(IPC_PROCESSES as u32 + 5) {
        ipc.record(100 + p, when(1), false, b"");
    }
    assert_eq!(ipc.procs.len(), IPC_PROCESSES);
}

/// A gap between writes at `from` and `to` whose thread is not known.
fn gap(from: u64, to: u64) -> Gap {
    Gap {
        from: at(from, 0, ThreadClock::default()),
        to: at(to, 0, ThreadClock::default()),
        id: None,
    }
}

#[test]
fn decode_gaps_split_at_the_last_receive_inside_them() {
    let mut ipc = IpcLog::default();
    for t in [150, 180, 260] {
        ipc.record(1, when(t), false, b"");
    }
    let no_gpu = GpuLog::default();
    let split = |engine, output| GapSplit {
        by: if output > 0 { "time" } else { "none" },
        engine,
        output,
        gpu_sync: None,
        threads: DecodeThreads {
            unknown: engine + output,
            ..DecodeThreads::default()
        },
    };
    let mut d = Decode::default();
    // Gap 100..200: the engine's answer arrived at 180 (the last inside), then 20 of output.
    assert_eq!(d.add_gap((&ipc, &no_gpu), 1, &gap(100, 200)), split(80, 20));
    // Gap 200..250: no receive inside: all engine. Another process's IPC does not count.
    ipc.record(2, when(220), false, b"");
    assert_eq!(d.add_gap((&ipc, &no_gpu), 1, &gap(200, 250)), split(50, 0));
    assert_eq!(d.add_gap((&ipc, &no_gpu), 1, &gap(250, 300)), split(10, 40));
    assert_eq!(
        d,
        Decode {
            engine: 140,
            output: 60,
            by_id: 0,
            gpu_sync: None,
            threads: DecodeThreads {
                unknown: 200,
                ..DecodeThreads::default()
            }
        }
    );
}

#[test]
fn decode_gaps_split_at_the_last_receive_that_carried_the_id() {
    let mut ipc = IpcLog::default();
    // The request's answers at 150 and 350; another request's at 180 and 380 (and id-less
    // chatter at 190), which by time would end each gap.
    ipc.record(1, when(150), false, b"out chatcmpl-mine-1");
    ipc.record(1, when(180), false, b"out chatcmpl-other-2");
    ipc.record(1, when(190), false, b"chatter");
    ipc.record(1, when(350), false, b"out chatcmpl-other-2 chatcmpl-mine-1");
    ipc.record(1, when(380), false, b"out chatcmpl-other-2");
    let no_gpu = GpuLog::default();
    let mine = Some(crate::http::id_hash(b"chatcmpl-mine"));
    let with_id = |from, to, id| Gap {
        id,
        ..gap(from, to)
    };
    let mut d = Decode::default();
    let g = d.add_gap((&ipc, &no_gpu), 1, &with_id(100, 200, mine));
    assert_eq!(
        (g.by, g.engine, g.output),
        ("id", 50, 50),
        "its own answer at 150"
    );
    let g = d.add_gap((&ipc, &no_gpu), 1, &with_id(200, 400, mine));
    assert_eq!(
        (g.engine, g.output),
        (150, 50),
        "the batch at 350 carried it"
    );
    // No receive with the id inside the gap (the front wrote twice from one answer): by time.
    let g = d.add_gap((&ipc, &no_gpu), 1, &with_id(360, 390, mine));
    assert_eq!((g.by, g.engine, g.output), ("time", 20, 10));
    // Without an id, the same gap as the first ends at the chatter.
    let g = d.add_gap((&ipc, &no_gpu), 1, &gap(100, 200));
    assert_eq!((g.engine, g.output), (90, 10));
    assert_eq!(d.by_id, 2);
    assert_eq!(d.engine + d.output, 100 + 200 + 30 + 100);
}

#[test]
fn decode_gaps_are_split_by_the_writing_threads_states() {
    let (ipc, gpu) = (IpcLog::default(), GpuLog::default());
    let mut d = Decode::default();
    // Thread 7 wrote both ends: 100 ns of its gap on a CPU, 50 runnable, 850 blocked.
    let one = Gap {
        from: at(1_000, 7, clock(500, 10, 2_000)),
        to: at(2_000, 7, clock(600, 60, 2_850)),
        id: None,
    };
    let g = d.add_gap((&ipc, &gpu), 1, &one);
    assert_eq!(
        g.threads,
        DecodeThreads {
            on_cpu: 100,
            runnable: 50,
            blocked: 850,
            unknown: 0
        }
    );
    // The next gap's write came from another thread: unknown, and the sum still holds.
    let other = Gap {
        from: one.to,
        to: at(2_400, 8, clock(50, 0, 0)),
        id: None,
    };
    assert_eq!(d.add_gap((&ipc, &gpu), 1, &other).threads.unknown, 400);
    // A clock that went backwards (a reused thread id) is no split either.
    let restarted = Gap {
        from: at(2_400, 8, clock(5_000, 0, 0)),
        to: at(2_500, 8, clock(10, 90, 0)),
        id: None,
    };
    assert_eq!(d.add_gap((&ipc, &gpu), 1, &restarted).threads.unknown, 100);
    assert_eq!(
        d.threads,
        DecodeThreads {
            on_cpu: 100,
            runnable: 50,
            blocked: 850,
            unknown: 500
        }
    );
    assert_eq!(d.threads.values().iter().sum::<u64>(), d.engine + d.output);
}

#[test]
fn decode_gaps_gpu_wait_is_taken_over_their_engine_part() {
    let ipc = {
        let mut l = IpcLog::default();
        l.record(1, when(180), false, b"");
        l
    };
    let mut gpu = GpuLog::default();
    gpu.join(3, 1);
    gpu.record(3, 120, 170); // inside the engine part of gap 100..200 (until 180)
    gpu.record(3, 185, 195); // in its output part: not counted
    let mut d = Decode::default();
    assert_eq!(
        d.add_gap((&ipc, &gpu), 1, &gap(100, 200)),
        GapSplit {
            by: "time",
            engine: 80,
            output: 20,
            gpu_sync: Some(50),
            threads: DecodeThreads {
                unknown: 100,
                ..DecodeThreads::default()
            }
        }
    );
    assert_eq!(d.add_gap((&ipc, &gpu), 1, &gap(200, 260)).gpu_sync, Some(0));
    assert_eq!(d.gpu_sync, Some(50));
}

#[test]
fn a_request_whose_id_is_in_the_ipc_bytes_gets_its_own_hand_off_and_return() {
    // Two overlapping requests of one front process. A read at 1,000 and a first write at
    // 3,000 (A); B's hand-off (at 1,100) and return (at 2,900) are the nearest IPC times in A's
    // window, A's own are at 1,400 and 2,200 (with suffixed internal ids, as vLLM's).
    let mut ipc = IpcLog::default();
    ipc.record(
        1,
        when(1_100),
        true,
        b"\x92\xd9\x14chatcmpl-bbb-1234abcd\xc0",
    );
    ipc.record(
        1,
        when(1_400),
        true,
        b"\x92\xd9\x14chatcmpl-aaa-9876fedc\xc0",
    );
    ipc.record(1, when(2_200), false, b"[chatcmpl-aaa-9876fedc]");
    ipc.record(
        1,
        when(2_900),
        false,
        b"[chatcmpl-bbb-1234abcd, chatcmpl-aaa-9876fedc]",
    );
    let mut r = record(1_000, at(1_000, 7, clock(10, 0, 0)), Some(when(3_000)));
    let by_time = ttft(&r, &ipc, &GpuLog::default()).expect("breakdown");
    assert_eq!(by_time.hand_off_by(), "time");
    assert_eq!(
        (
            by_time.stages.frontend,
            by_time.stages.engine,
            by_time.stages.output
        ),
        (100, 1_800, 100)
    );
    r.response_id = Some(crate::http::id_hash(b"chatcmpl-aaa"));
    let by_id = ttft(&r, &ipc, &GpuLog::default()).expect("breakdown");
    assert_eq!(by_id.hand_off_by(), "id");
    assert_eq!(
        (
            by_id.stages.frontend,
            by_id.stages.engine,
            by_id.stages.output
        ),
        (400, 800, 800)
    );
    assert_eq!(by_id.stages.total(), 2_000);
    // An id seen only outside the request's window (an earlier request with the same id, as
    // servers that stream one fixed id do) falls back to the times.
    r.read = when(1_500);
    r.arrival_ns = 1_500;
    let late = ttft(&r, &ipc, &GpuLog::default()).expect("breakdown");
    assert_eq!(late.hand_off_by(), "none");
    // No IPC at all: none.
    let alone = ttft(&r, &IpcLog::default(), &GpuLog::default()).expect("breakdown");
    assert_eq!(alone.hand_off_by(), "none");
}

#[test]
fn the_engine_processs_own_ipc_splits_the_engine_stage() {
    // The front (tgid 1) hands request A off at 1,400 and gets it back at 2,200. The engine
    // (tgid 2) receives it at 1,500 and sends its first output at 2,000 on one thread that was
    // on a CPU 50, waiting for one 400 and blocked 50 of those 500 ns. A detokenizer (tgid 3)
    // passes it on later; tgid 4 saw the id before the hand-off (another request's).
    let a = b"chatcmpl-aaa-9876fedc";
    let mut ipc = IpcLog::default();
    ipc.record(1, when(1_400), true, a);
    ipc.record(4, when(1_300), false, a);
    ipc.record(4, when(1_350), true, a);
    ipc.record(2, at(1_500, 9, clock(100, 0, 0)), false, a);
    ipc.record(2, at(2_000, 9, clock(150, 400, 50)), true, a);
    ipc.record(3, when(2_050), false, a);
    ipc.record(3, when(2_100), true, a);
    ipc.record(1, when(2_200), false, a);
    let mut r = record(1_000, when(1_000), Some(when(3_000)));
    r.response_id = Some(crate::http::id_hash(b"chatcmpl-aaa"));
    let b = ttft(&r, &ipc, &GpuLog::default()).expect("breakdown");
    assert_eq!(b.hand_off_by(), "id");
    let e = b.engine_side.expect("the engine process's side");
    assert_eq!(
        (e.pid, e.to_engine, e.in_engine, e.from_engine),
        (2, 100, 500, 200)
    );
    assert_eq!(e.to_engine + e.in_engine + e.from_engine, b.stages.engine);
    assert_eq!(
        e.threads,
        Some(StateSplit {
            on_cpu: 50,
            runnable: 400,
            blocked: 50
        })
    );
    assert_eq!(e.tid, 9, "the thread whose clock dated both calls");

    // Its output sent by another thread (vLLM's ZMQ I/O threads): times, no thread split.
    let mut two = IpcLog::default();
    two.record(1, when(1_400), true, a);
    two.record(2, at(1_500, 9, clock(100, 0, 0)), false, a);
    two.record(2, at(2_000, 10, clock(150, 400, 50)), true, a);
    two.record(1, when(2_200), false, a);
    let e = ttft(&r, &two, &GpuLog::default())
        .and_then(|b| b.engine_side)
        .expect("the engine process's side");
    assert_eq!((e.in_engine, e.threads, e.tid), (500, None, 0));

    // The engine's send after the front's return (a clock disagreement) or no id: none.
    let mut late = IpcLog::default();
    late.record(1, when(1_400), true, a);
    late.record(2, when(1_500), false, a);
    late.record(2, when(2_300), true, a);
    late.record(1, when(2_200), false, a);
    assert_eq!(
        ttft(&r, &late, &GpuLog::default()).unwrap().engine_side,
        None
    );
    r.response_id = None;
    assert_eq!(
        ttft(&r, &ipc, &GpuLog::default()).unwrap().engine_side,
        None
    );
}
