//! TTFT attribution against known ground truth: the Node stand-in server (one event-loop thread
//! reads the request and writes the response) does things the test controls — sleeps (its thread
//! is blocked), spins the loop for a known CPU time (on-CPU; requests behind it wait in the socket),
//! spins while a hog shares its CPU (runnable) — and prints the monotonic times it received each
//! request and wrote its first token. Witnesses: that print, the client's send time, and the
//! kernel's own per-thread accounting (/proc/PID/task/TID/schedstat). Needs root (eBPF).

#![allow(
    clippy::many_single_char_names,
    reason = "stage figures read best as q, f, e, o next to their witnesses"
)]

use std::{thread, time::Duration};

use serde_json::{json, Value};
use tests::{
    cpu_hog, node_with_args_under_probe, pin, schedstat, steal_ticks,
    traffic::{
        by_id, chat_req, gaps_sum, records, run_concurrent, run_one, split_request, split_whole,
    },
    NodeUnderProbe,
};

/// Allowed difference between a probe figure and its witness: max(1 ms, 5 %), as the issue asks;
/// `extra_ms` for witnesses that cover a longer window than the stage (stated where used).
fn close(probe_ns: u64, witness_ns: u64, extra_ms: f64) -> bool {
    let (p, w) = (probe_ns as f64 / 1e6, witness_ns as f64 / 1e6);
    (p - w).abs() <= (w * 0.05).max(1.0) + extra_ms
}

/// Node runs a handler after its read returns (parse, dispatch): a witness clock that starts in
/// it starts that much late. 1.0–2.2 ms measured; 6.3 ms on a slow host (2026-12-06, old and new
/// probe alike).
const NODE_DISPATCH_MS: f64 = 8.0;

/// `close`, or later than the witness by up to Node's dispatch.
fn close_or_dispatch(probe_ns: u64, witness_ns: u64) -> bool {
    close(probe_ns, witness_ns, 0.0)
        || (probe_ns >= witness_ns && close(probe_ns, witness_ns, NODE_DISPATCH_MS))
}

/// A thread state of a stage within max(1 ms, 5 % of the stage) + `extra_ms` of the witness: a
/// state's share is what the stage is split into, so its error is measured against the stage (a
/// 4 ms shift between on-CPU and runnable in a 152 ms spin was seen twice in 40 runs, with the
/// sum exact; 5 % of a 6 ms runnable share would be 0.3 ms).
fn state_close(probe_ns: u64, witness_ns: u64, stage_ns: u64, extra_ms: f64) -> bool {
    let (p, w, s) = (
        probe_ns as f64 / 1e6,
        witness_ns as f64 / 1e6,
        stage_ns as f64 / 1e6,
    );
    (p - w).abs() <= (s * 0.05).max(1.0) + extra_ms
}

fn ns(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a number: {v}"))
}

/// The stand-in's request-handler and first-write times for `id` (its `timing` line).
fn server_times(served: &NodeUnderProbe, id: &str) -> (u64, u64) {
    let t: std::collections::HashMap<String, u64> = server_line(served, id).into_iter().collect();
    (t["req_ns"], t["first_ns"])
}

/// The four stages of one record (checked to add up to its TTFT).
fn stages(rec: &Value) -> [u64; 4] {
    let st = &rec["stages_ns"];
    let s = ["socket_queue", "frontend", "engine", "output"].map(|k| ns(&st[k]));
    assert_eq!(
        s.iter().sum::<u64>(),
        ns(&rec["ttft_ns"]),
        "stages add up to the TTFT: {rec}"
    );
    s
}

/// (`socket_queue`, engine) of a single-process request (no hand-off: frontend and output are 0).
fn single(rec: &Value) -> (u64, u64) {
    let [q, f, e, o] = stages(rec);
    assert_eq!(
        (f, o),
        (0, 0),
        "a single-process server has no hand-off: {rec}"
    );
    (q, e)
}

/// Stages and the serving thread's split of a single-process request: no hand-off, so frontend
/// and output are 0 and the split covers the engine stage.
fn breakdown(rec: &Value) -> (u64, u64, (u64, u64, u64)) {
    let (q, e) = single(rec);
    let t = &rec["threads_ns"]["server"];
    assert!(t.is_object(), "the serving thread's time is split: {rec}");
    let split = (ns(&t["on_cpu"]), ns(&t["runnable"]), ns(&t["blocked"]));
    assert_eq!(
        split.0 + split.1 + split.2,
        e,
        "states add up to the stage: {rec}"
    );
    (q, e, split)
}

/// The stand-in's `timing` line for `id` as (`key`, ns) pairs. The stand-in prints it before
/// the response ends, but the test's reader thread of its output may not have read it yet when
/// the probe's record is in: wait for it a little.
fn server_line(served: &NodeUnderProbe, id: &str) -> Vec<(String, u64)> {
    let prefix = format!("timing {id} ");
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    let line = loop {
        let log = served.node.log_text();
        if let Some(l) = log.lines().find(|l| l.starts_with(&prefix)) {
            break l.to_owned();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no timing line for {id} in:\n{log}"
        );
        thread::sleep(Duration::from_millis(20));
    };
    line.split_whitespace()
        .filter_map(|w| w.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.parse().expect("ns")))
        .collect()
}

/// One request alone, with the event-loop thread's schedstat read around it: (schedstat's
/// on-CPU and run-queue ns, the host's steal during the request in ms). The probe dates with
/// `bpf_ktime_get_ns`, which runs on while the hypervisor steals the vCPU; schedstat's on-CPU time
/// (`clock_task`) leaves steal out, so a thread on a CPU shows up to the steal more in the probe
/// (10 ms in one run of the 150 ms spin).
fn solo(served: &NodeUnderProbe, id: &str, extra: &Value) -> ((u64, u64), f64) {
    let pid = served.node.pid();
    let (before, steal0) = (schedstat(pid, pid), steal_ticks());
    let s = run_one(&served.addr, chat_req(id, "m", true, 1, extra));
    assert!(s.error.is_none(), "{id}: {:?}", s.error);
    let after = schedstat(pid, pid);
    let steal_ms = (steal_ticks() - steal0) as f64 * 10.0;
    ((after.0 - before.0, after.1 - before.1), steal_ms)
}

#[test]
fn ttft_stages_match_what_the_stand_in_did() {
    let Some(served) = node_with_args_under_probe(
        "ttft_stages_match_what_the_stand_in_did",
        &["--worker", "--sched"],
        &[],
    ) else {
        return;
    };
    let pid = served.node.pid();
    let mut n = 0;
    let mut next = |k: usize| {
        n += k;
        n
    };

    // A thread's clock starts the first time it leaves a CPU after attach: the idle loop's
    // first wake-up (this request's read) comes before that, so it has no split.
    run_one(&served.addr, chat_req("warm-up", "m", true, 1, &json!({})));
    let warm = records(&served.probe, next(1));
    assert!(by_id(&warm, "warm-up")["stages_ns"].is_object());

    // Blocked: the loop waits 120 ms on a timer.
    let extra = json!({"ttft_ms": 120, "report": true});
    let (rec, id, (ws, steal)) =
        split_request(&served, &mut next, "sleep", |id| solo(&served, id, &extra));
    let rec = &rec;
    let (q, e, (on, run, blk)) = breakdown(rec);
    let (t_req, t_first) = server_times(&served, &id);
    eprintln!(
        "sleep: socket_queue {q} engine {e} (server {}) on {on} run {run} blocked {blk} ns; \
         schedstat on {} run {} over the request",
        t_first - t_req,
        ws.0,
        ws.1
    );
    assert!(
        close_or_dispatch(e, t_first - t_req),
        "engine vs the server's own clock: {rec}"
    );
    assert!(blk >= 114_000_000, "the 120 ms wait is blocked time: {rec}");
    // schedstat covers the whole request (+ the rest of the response): ≤ 1 ms more CPU.
    assert!(
        state_close(on, ws.0, e, 1.0 + steal) && state_close(run, ws.1, e, 1.0),
        "split vs schedstat {ws:?} (steal {steal} ms): {rec}"
    );

    // On-CPU: the loop spins for 150 ms of CPU time.
    let extra = json!({"burn_cpu_ms": 150, "report": true});
    let (rec, id, (ws, steal)) =
        split_request(&served, &mut next, "burn", |id| solo(&served, id, &extra));
    let rec = &rec;
    let (_, e, (on, run, blk)) = breakdown(rec);
    let (t_req, t_first) = server_times(&served, &id);
    eprintln!(
        "burn: engine {e} (server {}) on {on} run {run} blocked {blk}; schedstat {ws:?}",
        t_first - t_req
    );
    assert!(
        close_or_dispatch(e, t_first - t_req),
        "engine vs the server's clock: {rec}"
    );
    // Process CPU: Node's GC/compiler threads count too (139.9 ms seen; schedstat, the exact
    // witness below, 143.2 ms).
    assert!(
        on >= 120_000_000,
        "150 ms of spinning is on-CPU time: {rec}"
    );
    assert!(
        state_close(on, ws.0, e, 1.0 + steal) && state_close(run, ws.1, e, 1.0),
        "split vs schedstat {ws:?} (steal {steal} ms): {rec}"
    );

    // Runnable: the same spin with a CPU hog pinned to the server's CPU.
    pin(pid, "1");
    let hog = cpu_hog(1);
    thread::sleep(Duration::from_millis(100));
    let extra = json!({"burn_cpu_ms": 100, "report": true});
    let (rec, _, (ws, steal)) = split_request(&served, &mut next, "starved", |id| {
        solo(&served, id, &extra)
    });
    drop(hog);
    pin(pid, "0-1");
    let rec = &rec;
    let (_, e, (on, run, blk)) = breakdown(rec);
    eprintln!("starved: engine {e} on {on} run {run} blocked {blk}; schedstat {ws:?}");
    assert!(
        run >= 30_000_000,
        "a hog on the server's CPU shows as runnable time: {rec}"
    );
    assert!(
        state_close(on, ws.0, e, 1.0 + steal) && state_close(run, ws.1, e, 1.0),
        "split vs schedstat {ws:?} (steal {steal} ms): {rec}"
    );

    // Blocked on a lock: another thread of the server holds it 100 ms while the loop waits in a
    // futex (the first use starts that thread: a warm-up request first).
    run_one(
        &served.addr,
        chat_req("lock-warm-up", "m", true, 1, &json!({"lock_ms": 1})),
    );
    records(&served.probe, next(1));
    let extra = json!({"lock_ms": 100, "report": true});
    let (rec, id, (ws, steal)) =
        split_request(&served, &mut next, "locked", |id| solo(&served, id, &extra));
    let rec = &rec;
    let (_, e, (on, run, blk)) = breakdown(rec);
    let wait: u64 = server_line(&served, &id)
        .into_iter()
        .find(|(k, _)| k == "lock_wait_ns")
        .map(|(_, v)| v)
        .expect("lock_wait_ns");
    eprintln!(
        "locked: engine {e} on {on} run {run} blocked {blk}; the loop's own wait {wait}; \
         schedstat {ws:?}"
    );
    assert!(
        wait >= 100_000_000 && state_close(blk, wait, e, 1.0),
        "the wait for the lock is blocked time: {rec}"
    );
    assert!(
        state_close(on, ws.0, e, 1.0 + steal) && state_close(run, ws.1, e, 1.0),
        "split vs schedstat {ws:?} (steal {steal} ms): {rec}"
    );

    // Socket queue: a request sent while the loop spins on another one waits in the socket.
    let addr = served.addr.clone();
    let busy = thread::spawn(move || {
        run_one(
            &addr,
            chat_req("busy", "m", true, 1, &json!({"burn_cpu_ms": 250})),
        )
    });
    thread::sleep(Duration::from_millis(60));
    let s = run_one(
        &served.addr,
        chat_req("queued", "m", true, 1, &json!({"report": true})),
    );
    assert!(busy.join().expect("busy").error.is_none());
    let recs = records(&served.probe, next(2));
    let rec = by_id(&recs, "queued");
    let (q, e) = single(rec);
    let (t_req, _) = server_times(&served, "queued");
    let waited = t_req - s.start_ns;
    eprintln!("queued: socket_queue {q} (client send → server handler {waited}) engine {e}");
    assert!(
        q >= 100_000_000,
        "the request waited behind the spin: {rec}"
    );
    // The witness also holds the loopback delivery and the parse (tens of µs).
    assert!(
        close(q, waited, 0.0),
        "socket_queue vs the server's and client's clocks: {rec}"
    );

    // 32 at once: the loop serves all of them, so each request's engine stage holds its 30 ms
    // timer and the loop's work on the others. Witnesses per request: the stand-in's clock and
    // its loop thread's schedstat read at the request and at the first write (--sched).
    let steal0 = steal_ticks();
    let extra = json!({"ttft_ms": 30, "report": true, "report_sched": true});
    let reqs = (0..32)
        .map(|i| chat_req(&format!("c{i}"), "m", true, 2, &extra))
        .collect();
    let repairs = served.probe.thread_repairs();
    let sent: Vec<_> = run_concurrent(&served.addr, reqs);
    let steal = (steal_ticks() - steal0) as f64 * 10.0;
    let recs = records(&served.probe, next(32));
    let repairs = served.probe.thread_repairs() - repairs;
    let mut worst = (0.0f64, String::new());
    let mut unsplit = Vec::new();
    for s in &sent {
        assert!(s.error.is_none(), "{}: {:?}", s.request_id, s.error);
        let id = &s.request_id;
        let rec = by_id(&recs, id);
        if !split_whole(rec) {
            // As in `split_request`: only with a repair counted, and checked below.
            single(rec);
            unsplit.push(id.clone());
            continue;
        }
        let (q, e, (on, run, blk)) = breakdown(rec);
        let t: std::collections::HashMap<String, u64> =
            server_line(&served, id).into_iter().collect();
        let w = t["first_ns"] - t["req_ns"];
        let w_on = t["first_on_ns"] - t["req_on_ns"];
        let w_run = t["first_run_ns"] - t["req_run_ns"];
        let w_blk = w.saturating_sub(w_on + w_run);
        // The client's send stamp comes before its write; with 32 client threads on 2 CPUs it
        // can be preempted in between, so the client's side bounds the queue from above only.
        let waited = t["req_ns"] - s.start_ns;
        let diffs = [
            e.abs_diff(w),
            on.abs_diff(w_on),
            run.abs_diff(w_run),
            blk.abs_diff(w_blk),
        ];
        let d = diffs.iter().max().copied().unwrap_or(0) as f64 / 1e6;
        if d > worst.0 {
            worst = (d, format!("{id}: engine {e} vs {w}, on {on} vs {w_on}, run {run} vs {w_run}, blocked {blk} vs {w_blk}"));
        }
        assert!(
            e >= 29_000_000 && close_or_dispatch(e, w),
            "{id}: engine vs the server's clock {w}: {rec}"
        );
        assert!(
            q <= waited + 1_000_000,
            "{id}: socket_queue {q} vs client send → handler {waited}: {rec}"
        );
        assert!(
            state_close(on, w_on, e, 1.0 + steal)
                && state_close(run, w_run, e, 1.0)
                && state_close(blk, w_blk, e, 1.0 + steal),
            "{id}: split vs the loop's schedstat on {w_on} run {w_run} blocked {w_blk} \
             (steal {steal} ms): {rec}"
        );
    }
    eprintln!(
        "32 at once: largest difference {:.3} ms ({}); steal {steal} ms; unsplit {unsplit:?} \
         ({repairs} repairs)",
        worst.0, worst.1
    );
    assert!(
        unsplit.is_empty() || (repairs > 0 && unsplit.len() <= 8),
        "unsplit {unsplit:?} with {repairs} thread-state repairs counted"
    );

    // Two processes, shaped like vLLM: the front spins 40 ms (tokenizing), hands the request to
    // a worker over a unix socket, the worker takes 80 ms (the engine), the front spins 40 ms on
    // the answer (detokenizing) and writes the first token.
    let steal0 = steal_ticks();
    let extra = json!({"front_burn_ms": 40, "worker_ms": 80, "output_burn_ms": 40, "report": true,
                       "report_sched": true});
    let (rec, id, ()) = split_request(&served, &mut next, "two-process", |id| {
        run_one(&served.addr, chat_req(id, "m", true, 1, &extra));
    });
    let rec = &rec;
    let [_, f, e, o] = stages(rec);
    let t: std::collections::HashMap<String, u64> = server_line(&served, &id).into_iter().collect();
    let (w_f, w_e, w_o) = (
        t["sent_ns"] - t["req_ns"],
        t["got_ns"] - t["sent_ns"],
        t["first_ns"] - t["got_ns"],
    );
    // The front's IPC write happens inside its send call, between `sent` and `sent_end` (a
    // preemption there delayed it by 4.9 ms in one run): the probe's hand-off must fall in it.
    let send_call = t["sent_end_ns"] - t["sent_ns"];
    eprintln!(
        "two-process: frontend {f} engine {e} output {o} ns; the front's clock {w_f} / {w_e} / \
         {w_o} (send call {send_call})"
    );
    if std::env::var(tests::CAPTURE_ENV).as_deref() == Ok("syscalls") {
        // The syscall path sees only the server's own connections: no hand-off, no split.
        assert_eq!((f, o), (0, 0), "{rec}");
        return;
    }
    let within = |probe: u64, lo: u64, hi: u64| {
        close(probe, lo, 0.0) || close(probe, hi, 0.0) || (lo..=hi).contains(&probe)
    };
    assert!(
        within(f, w_f, w_f + send_call),
        "frontend vs the front's clock {w_f} (+ send call {send_call}): {rec}"
    );
    // The front's `got` is stamped after Node dispatched the IPC message the probe saw received
    // (`NODE_DISPATCH_MS`): that time is the probe's `output` and the witness's engine. Their sum
    // has no such offset.
    assert!(
        within(e + o, (w_e + w_o).saturating_sub(send_call), w_e + w_o),
        "engine + output vs the front's clock {}: {rec}",
        w_e + w_o
    );
    assert!(
        close(e, w_e.saturating_sub(send_call), NODE_DISPATCH_MS) && e <= w_e,
        "engine vs the front's clock {w_e}: {rec}"
    );
    assert!(
        close(o, w_o, NODE_DISPATCH_MS) && o >= w_o,
        "output vs the front's clock {w_o}: {rec}"
    );
    assert!(rec["threads_ns"]["server"].is_object(), "{rec}");
    let steal = (steal_ticks() - steal0) as f64 * 10.0;
    stage_threads_match_the_loops_schedstat(rec, &t, send_call, steal);

    // Decode through the worker: each of 3 gaps is 30 ms in the worker, then 10 ms of the
    // front's CPU. The probe splits each gap at the front's receive of the answer, and by the
    // state of the loop thread, which made every write.
    let steal0 = steal_ticks();
    let extra = json!({"worker_ms": 30, "output_burn_ms": 10, "worker_gaps": true,
                       "report_sched": true});
    let (rec, id, ()) = split_request(&served, &mut next, "decode", |id| {
        run_one(&served.addr, chat_req(id, "m", true, 4, &extra));
    });
    let rec = &rec;
    let gaps: u64 = gaps_sum(rec);
    let (de, dout) = (
        ns(&rec["decode_ns"]["engine"]),
        ns(&rec["decode_ns"]["output"]),
    );
    eprintln!("decode: engine {de} output {dout} ns over gaps {gaps} ns");
    assert_eq!(
        de + dout,
        gaps,
        "the decode split adds up to the gaps: {rec}"
    );
    assert!(de >= 89_000_000, "3 x 30 ms in the worker: {rec}");
    // 3 x (10 ms of CPU + Node's dispatch of the answer, 1-3 ms, + the write).
    assert!(
        (30_000_000..=45_000_000).contains(&dout),
        "3 x 10 ms of output work: {rec}"
    );
    decode_threads_match_the_loops_schedstat(&served, &id, rec, gaps, steal0);

    // 32 overlapping hand-offs: the boundaries are the nearest IPC times (docs/attribution.md):
    // the hand-off is the first send at or after the read (its own or an earlier one), the
    // return the last receive before the first write (its own answer, sent back 60 ms after its
    // own send, or a later one). So `frontend` ≤ the front's read → its own send call's end,
    // `engine` ≥ the worker's 60 ms less that send call, `output` ≤ first write − (own send +
    // 60 ms); and the four stages still add up to the TTFT.
    // (No ids in the IPC messages: matching by id is `attribution_ids.rs`.)
    let extra = json!({"front_burn_ms": 5, "worker_ms": 60, "output_burn_ms": 5, "report": true,
                       "ipc_ids": false});
    let reqs = (0..32)
        .map(|i| chat_req(&format!("w{i}"), "m", true, 1, &extra))
        .collect();
    for s in run_concurrent(&served.addr, reqs) {
        assert!(s.error.is_none(), "{}: {:?}", s.request_id, s.error);
    }
    let recs = records(&served.probe, next(32));
    let mut slack = (0u64, 0u64, 0u64);
    for i in 0..32 {
        let id = format!("w{i}");
        let rec = by_id(&recs, &id);
        assert_eq!(rec["hand_off"], "time", "{rec}");
        let [q, f, e, o] = stages(rec);
        assert_eq!(
            q + f + e + o,
            ns(&rec["ttft_ns"]),
            "{id}: stages add up: {rec}"
        );
        let t: std::collections::HashMap<String, u64> =
            server_line(&served, &id).into_iter().collect();
        let send_call = t["sent_end_ns"] - t["sent_ns"];
        // The read comes before the stand-in's handler stamp (`req_ns`): the parse, and any wait
        // for a CPU in between (32 client threads, the worker and the agent share 2 CPUs), which
        // no witness sees. That wait is in the stage's runnable time; a wrong boundary (another
        // request's send) would be off by its 5 ms front burn or more.
        let wait = rec["threads_ns"]["frontend"]["runnable"]
            .as_u64()
            .unwrap_or(0);
        let f_max = t["sent_end_ns"] - t["req_ns"] + 1_000_000 + wait;
        let o_max = (t["first_ns"] - t["sent_ns"]).saturating_sub(59_000_000);
        let e_min = 59_000_000u64.saturating_sub(send_call);
        assert!(
            f <= f_max,
            "{id}: frontend {f} > read → own send {f_max}: {rec}"
        );
        assert!(
            o <= o_max,
            "{id}: output {o} > first write − answer {o_max}: {rec}"
        );
        assert!(e >= e_min, "{id}: engine {e} < the worker's 60 ms: {rec}");
        slack = (
            slack.0.max(f_max - f),
            slack.1.max(o_max - o),
            slack.2.max(e - e_min),
        );
    }
    eprintln!("32 hand-offs at once: largest distance from the bound (frontend, output, engine) {slack:?} ns");
}

/// The two-process request's per-stage thread split (the loop thread read the request, sent the
/// hand-off, received the answer and wrote the first token, so each stage has one) against the
/// loop's schedstat read by the stand-in at its handler, just before its send, just after the
/// answer and at the first write (`t`). Each state within max(1 ms, 5 % of its stage) + the
/// steal, + the send call for all stages (the hand-off is inside it) and Node's dispatch of the
/// answer for engine and output (on a CPU after the receive the probe sees, before `got`).
fn stage_threads_match_the_loops_schedstat(
    rec: &Value,
    t: &std::collections::HashMap<String, u64>,
    send_call: u64,
    steal: f64,
) {
    let send_ms = send_call as f64 / 1e6;
    let marks = [("req", "frontend"), ("sent", "engine"), ("got", "output")];
    let ends = ["sent", "got", "first"];
    for ((from, stage), to) in marks.into_iter().zip(ends) {
        let split = &rec["threads_ns"][stage];
        assert!(split.is_object(), "{stage}: one thread at both ends: {rec}");
        let [on, run, blk] = ["on_cpu", "runnable", "blocked"].map(|k| ns(&split[k]));
        let span = ns(&rec["stages_ns"][stage]);
        assert_eq!(on + run + blk, span, "{stage}: the states add up: {rec}");
        let at = |mark: &str, what: &str| t[&format!("{mark}_{what}ns")];
        let w_span = at(to, "") - at(from, "");
        let w_on = at(to, "on_") - at(from, "on_");
        let w_run = at(to, "run_") - at(from, "run_");
        let w_blk = w_span.saturating_sub(w_on + w_run);
        let extra = steal
            + send_ms
            + if stage == "frontend" {
                0.0
            } else {
                NODE_DISPATCH_MS
            };
        eprintln!(
            "{stage} threads: on {on} run {run} blocked {blk}; the loop's schedstat {w_on} / \
             {w_run} / {w_blk} (allowance + {extra:.2} ms)"
        );
        assert!(
            state_close(on, w_on, span, extra)
                && state_close(run, w_run, span, extra)
                && state_close(blk, w_blk, span, extra),
            "{stage} split vs the loop's schedstat on {w_on} run {w_run} blocked {w_blk}: {rec}"
        );
    }
    // 40 ms spins on either side of an 80 ms wait for the worker: each stage's largest state.
    let largest = |stage: &str| {
        let split = &rec["threads_ns"][stage];
        ["on_cpu", "runnable", "blocked"]
            .into_iter()
            .max_by_key(|k| ns(&split[*k]))
            .expect("three states")
    };
    assert_eq!(
        [largest("frontend"), largest("engine"), largest("output")],
        ["on_cpu", "blocked", "on_cpu"],
        "{rec}"
    );
}

/// The decode gaps' thread split of `rec` (request `decode`) against the loop thread's schedstat
/// read by the stand-in just after its first and its last content write: each state within
/// max(1 ms, 5 % of the gaps), + the steal since `steal0` for on-CPU and blocked (see `solo`).
fn decode_threads_match_the_loops_schedstat(
    served: &NodeUnderProbe,
    id: &str,
    rec: &Value,
    gaps: u64,
    steal0: u64,
) {
    let steal = (steal_ticks() - steal0) as f64 * 10.0;
    let th = &rec["decode_ns"]["threads"];
    let [on, run, blk, unknown] = ["on_cpu", "runnable", "blocked", "unknown"].map(|k| ns(&th[k]));
    assert_eq!(
        on + run + blk + unknown,
        gaps,
        "the states add up to the gaps: {rec}"
    );
    assert_eq!(unknown, 0, "one thread made every write: {rec}");
    let t: std::collections::HashMap<String, u64> = server_line(served, &format!("{id}/decode"))
        .into_iter()
        .collect();
    let w = t["last_ns"] - t["first_ns"];
    let (w_on, w_run) = (
        t["last_on_ns"] - t["first_on_ns"],
        t["last_run_ns"] - t["first_run_ns"],
    );
    let w_blk = w.saturating_sub(w_on + w_run);
    eprintln!(
        "decode threads: on {on} run {run} blocked {blk} over {gaps}; the loop's schedstat \
         {w_on} / {w_run} / {w_blk} over {w} (steal {steal} ms)"
    );
    assert!(
        close(gaps, w, 0.0),
        "the gaps vs the stand-in's clock {w}: {rec}"
    );
    assert!(
        state_close(on, w_on, gaps, steal)
            && state_close(run, w_run, gaps, 0.0)
            && state_close(blk, w_blk, gaps, steal),
        "decode split vs the loop's schedstat on {w_on} run {w_run} blocked {w_blk} \
         (steal {steal} ms): {rec}"
    );
    // 3 x 30 ms waiting for the worker: blocked; 3 x 10 ms of CPU: on a CPU.
    assert!(blk >= 85_000_000 && on >= 29_000_000, "{rec}");
}
