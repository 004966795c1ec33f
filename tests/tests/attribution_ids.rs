//! Hand-offs matched by request id (docs/attribution.md, "Matching by request id"), against the
//! two-process Node stand-in: the front sends the worker each request under its streamed id
//! (`chatcmpl-<hex>`, suffixed as vLLM's internal ids are; or a bare uuid hex, as `SGLang`'s
//! rid) and, meanwhile, id-less "chatter"
//! both ways every 2 ms — the traffic of other requests. The nearest IPC times are then chatter;
//! the request's own hand-off and answer are found only by its id. Witnesses: the front's own
//! clock around its send and at the answer (`timing` lines); for the decode gaps, its clock at
//! each later answer and write. Needs root (eBPF).

#![allow(
    clippy::many_single_char_names,
    reason = "stage figures read best as f, e, o next to their witnesses"
)]

use std::{collections::HashMap, time::Duration};

use serde_json::{json, Value};
use tests::{
    node_with_args_under_probe,
    traffic::{by_id, chat_req, gaps_sum, records, run_concurrent, run_one},
    NodeUnderProbe,
};

/// max(1 ms, 5 %) + `extra_ms`, as in the attribution test.
fn close(probe_ns: u64, witness_ns: u64, extra_ms: f64) -> bool {
    let (p, w) = (probe_ns as f64 / 1e6, witness_ns as f64 / 1e6);
    (p - w).abs() <= (w * 0.05).max(1.0) + extra_ms
}

fn ns(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a number: {v}"))
}

/// The stand-in's `timing` line for `id`, as its `key=value` words.
fn timing_words(served: &NodeUnderProbe, id: &str) -> HashMap<String, String> {
    let prefix = format!("timing {id} ");
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    loop {
        let log = served.node.log_text();
        if let Some(l) = log.lines().find(|l| l.starts_with(&prefix)) {
            return l
                .split_whitespace()
                .filter_map(|w| w.split_once('='))
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no timing line for {id}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The stand-in's `timing` line for `id`: ns figures.
fn timing(served: &NodeUnderProbe, id: &str) -> HashMap<String, u64> {
    timing_words(served, id)
        .into_iter()
        .map(|(k, v)| (k, v.parse().expect("ns")))
        .collect()
}

/// The front's clock over a request's decode gaps (`ID/gaps`: when it got each later answer and
/// when it then wrote; the first write is `first_ns`): (engine, output), summed over the gaps.
fn gaps_witness(served: &NodeUnderProbe, id: &str, first_ns: u64) -> (u64, u64, usize) {
    let w = timing_words(served, &format!("{id}/gaps"));
    let list = |k: &str| -> Vec<u64> { w[k].split(',').map(|v| v.parse().expect("ns")).collect() };
    let (got, wrote) = (list("got_ns"), list("write_ns"));
    assert_eq!(got.len(), wrote.len(), "{w:?}");
    let mut prev = first_ns;
    let (mut engine, mut output) = (0, 0);
    for (g, wr) in got.iter().zip(&wrote) {
        engine += g - prev;
        output += wr - g;
        prev = *wr;
    }
    (engine, output, got.len())
}

/// (engine, output, gaps matched by id) of a record's decode split, checked to add up to its
/// gaps.
fn decode(rec: &Value) -> (u64, u64, u64) {
    let d = &rec["decode_ns"];
    let (e, o) = (ns(&d["engine"]), ns(&d["output"]));
    let gaps: u64 = gaps_sum(rec);
    assert_eq!(e + o, gaps, "{rec}");
    (e, o, ns(&d["by_id"]))
}

/// (frontend, engine, output) of a record, its stages checked to add up to the TTFT.
fn split(rec: &Value) -> (u64, u64, u64) {
    let st = &rec["stages_ns"];
    let s = ["socket_queue", "frontend", "engine", "output"].map(|k| ns(&st[k]));
    assert_eq!(s.iter().sum::<u64>(), ns(&rec["ttft_ns"]), "{rec}");
    (s[1], s[2], s[3])
}

/// The front's clock: (read → send, send → answer, answer → first write) and the send call.
fn witness(t: &HashMap<String, u64>) -> (u64, u64, u64, u64) {
    (
        t["sent_ns"] - t["req_ns"],
        t["got_ns"] - t["sent_ns"],
        t["first_ns"] - t["got_ns"],
        t["sent_end_ns"] - t["sent_ns"],
    )
}

/// The stages of a request matched by id against the front's clock: the hand-off falls inside
/// the front's send call; the answer is received before the front's `got` stamp (Node dispatches
/// it after the read: up to `dispatch_ms`), so engine may be short and output long by that much.
fn assert_matched(rec: &Value, t: &HashMap<String, u64>, dispatch_ms: f64) {
    let (f, e, o) = split(rec);
    let (w_f, w_e, w_o, call) = witness(t);
    assert_eq!(rec["hand_off"], "id", "{rec}");
    let within =
        |p: u64, lo: u64, hi: u64| close(p, lo, 0.0) || close(p, hi, 0.0) || (lo..=hi).contains(&p);
    assert!(
        within(f, w_f, w_f + call),
        "frontend {f} vs the front's {w_f} (+ send call {call}): {rec}"
    );
    assert!(
        close(e, w_e.saturating_sub(call), dispatch_ms) && e <= w_e + 1_000_000,
        "engine {e} vs the front's {w_e}: {rec}"
    );
    assert!(
        close(o, w_o, dispatch_ms) && o + 1_000_000 >= w_o,
        "output {o} vs the front's {w_o}: {rec}"
    );
}

#[test]
fn hand_offs_are_matched_by_the_request_id_in_ipc_bytes() {
    let Some(served) = node_with_args_under_probe(
        "hand_offs_are_matched_by_the_request_id_in_ipc_bytes",
        &["--worker"],
        &[],
    ) else {
        return;
    };
    if std::env::var(tests::CAPTURE_ENV).as_deref() == Ok("syscalls") {
        return; // the syscall path sees no IPC
    }
    let mut n = 0;
    let mut next = |k: usize| {
        n += k;
        n
    };
    let shape = |ids: bool| {
        json!({"front_wait_ms": 20, "worker_ms": 40, "output_wait_ms": 20, "chatter_ms": 2,
               "ipc_ids": ids, "report": true})
    };
    // The same, and each later token through the worker too, chatter going on: 3 decode gaps of
    // 40 ms in the worker, then 20 ms waiting in the front.
    let with_gaps = |ids: bool| {
        let mut v = shape(ids);
        v["worker_gaps"] = json!(true);
        v
    };

    // Without ids the nearest IPC is chatter: a hand-off 2 ms after the read, a return 2 ms
    // before the write — the 20 ms on either side of the engine land in `engine`. The decode
    // gaps likewise end at chatter.
    run_one(
        &served.addr,
        chat_req("plain", "m", true, 4, &with_gaps(false)),
    );
    let recs = records(&served.probe, next(1));
    let rec = by_id(&recs, "plain");
    let (f, e, o) = split(rec);
    let t = timing(&served, "plain");
    let (w_f, w_e, w_o, _) = witness(&t);
    eprintln!("by time: frontend {f} engine {e} output {o}; the front's {w_f} / {w_e} / {w_o}");
    assert_eq!(rec["hand_off"], "time", "{rec}");
    assert!(
        f < w_f / 2 && o < w_o / 2,
        "chatter bounds the stages by time: {rec}"
    );
    let (de, dout, by) = decode(rec);
    let (w_de, w_dout, gaps) = gaps_witness(&served, "plain", t["first_ns"]);
    eprintln!("decode by time: engine {de} output {dout}; the front's {w_de} / {w_dout}");
    assert_eq!((by, gaps), (0, 3), "{rec}");
    assert!(
        dout < w_dout / 2,
        "chatter bounds the decode output by time: {rec}"
    );

    // With ids: each stage is the front's own, and so is each decode gap's split.
    run_one(
        &served.addr,
        chat_req("by-id", "m", true, 4, &with_gaps(true)),
    );
    let recs = records(&served.probe, next(1));
    let rec = by_id(&recs, "by-id");
    let t = timing(&served, "by-id");
    eprintln!("by id: {}; the front's {:?}", rec["stages_ns"], witness(&t));
    assert_matched(rec, &t, 3.0);
    let (de, dout, by) = decode(rec);
    let (w_de, w_dout, _) = gaps_witness(&served, "by-id", t["first_ns"]);
    eprintln!("decode by id: engine {de} output {dout}; the front's {w_de} / {w_dout}");
    assert_eq!(by, 3, "every gap's return found by its id: {rec}");
    // The answer is received before the front's `got` stamp (Node's dispatch): engine may be
    // short and output long by that much, over the three gaps.
    assert!(
        close(de, w_de, 3.0) && de <= w_de + 1_000_000,
        "decode engine {de} vs the front's {w_de}: {rec}"
    );
    assert!(
        close(dout, w_dout, 3.0) && dout + 1_000_000 >= w_dout,
        "decode output {dout} vs the front's {w_dout}: {rec}"
    );

    // SGLang's shape: the streamed id is a bare uuid4 hex, passed to the worker unchanged.
    let mut bare = with_gaps(true);
    bare["ipc_ids"] = json!("bare");
    run_one(&served.addr, chat_req("bare", "m", true, 4, &bare));
    let recs = records(&served.probe, next(1));
    let rec = by_id(&recs, "bare");
    let t = timing(&served, "bare");
    eprintln!(
        "bare id: {}; the front's {:?}",
        rec["stages_ns"],
        witness(&t)
    );
    assert_matched(rec, &t, 3.0);
    assert_eq!(
        decode(rec).2,
        3,
        "every gap's return found by its bare id: {rec}"
    );

    // 32 at once, each with its own id among everyone's chatter and hand-offs. The front's loop
    // serves all of them, so Node's dispatch of an answer can wait for other requests' work (it
    // is `output` to the probe and `engine` to the front's stamp): bounded by the chatter and
    // the 32 handlers, a few ms.
    let reqs = (0..32)
        .map(|i| chat_req(&format!("m{i}"), "m", true, 1, &shape(true)))
        .collect();
    for s in run_concurrent(&served.addr, reqs) {
        assert!(s.error.is_none(), "{}: {:?}", s.request_id, s.error);
    }
    let recs = records(&served.probe, next(32));
    let mut worst = (0u64, String::new());
    for i in 0..32 {
        let id = format!("m{i}");
        let rec = by_id(&recs, &id);
        let t = timing(&served, &id);
        let (f, e, o) = split(rec);
        let (w_f, w_e, w_o, _) = witness(&t);
        let d = f.abs_diff(w_f).max(e.abs_diff(w_e)).max(o.abs_diff(w_o));
        if d > worst.0 {
            worst = (d, format!("{id}: {f}/{e}/{o} vs {w_f}/{w_e}/{w_o}"));
        }
        assert_matched(rec, &t, 5.0);
    }
    eprintln!(
        "32 at once, matched by id: largest difference {} ns ({})",
        worst.0, worst.1
    );
}

/// The probe's state split of a stage (`threads_ns.<stage>`): (on-CPU, runnable, blocked), or
/// `None` when the stage was not split.
fn states(rec: &Value, stage: &str) -> Option<(u64, u64, u64)> {
    let s = &rec["threads_ns"][stage];
    s.is_object()
        .then(|| (ns(&s["on_cpu"]), ns(&s["runnable"]), ns(&s["blocked"])))
}

/// vLLM's shape of hand-off: the event loop does not write the IPC itself but wakes an I/O
/// thread of its process that does (ZMQ's), and that thread receives the answer. The stand-in's
/// `--io-thread` front does the same through a worker thread and a unix socket. The kernel dates
/// those calls on the clock of the serving thread that woke the I/O thread, so each stage is
/// still split by the event loop's states. Witnesses: the loop thread's schedstat at the read,
/// at its hand-off (before it wakes the I/O thread), when it got the answer and at the first
/// write. Needs root (eBPF).
#[test]
fn an_io_threads_hand_off_is_split_on_the_serving_threads_clock() {
    let Some(served) = node_with_args_under_probe(
        "an_io_threads_hand_off_is_split_on_the_serving_threads_clock",
        &["--worker", "--io-thread", "--sched"],
        &[],
    ) else {
        return;
    };
    if std::env::var(tests::CAPTURE_ENV).as_deref() == Ok("syscalls") {
        return; // the syscall path sees no IPC
    }
    if std::env::var(tests::THREAD_STATES_ENV).as_deref() == Ok("off") {
        return;
    }
    // 20 ms of the loop's CPU, 40 ms in the worker (the loop idle), 10 ms of the loop's CPU.
    let shape = json!({"front_burn_ms": 20, "worker_ms": 40, "output_burn_ms": 10,
                       "report": true, "report_sched": true});
    // A thread is known from its first switch-out after attach: the idle loop's first request
    // would find no clock at its read.
    run_one(&served.addr, chat_req("warm-up", "m", true, 1, &shape));
    let mut split_n = 0;
    for i in 0..3 {
        let id = format!("io{i}");
        run_one(&served.addr, chat_req(&id, "m", true, 1, &shape));
        let recs = records(&served.probe, i + 2);
        let rec = by_id(&recs, &id);
        let t = timing(&served, &id);
        let (f, e, o) = split(rec);
        let w = |k: &str| t[&format!("{k}_on_ns")];
        let (w_f, w_o) = (w("sent") - w("req"), w("first") - w("got"));
        assert_eq!(rec["hand_off"], "id", "{rec}");
        // A wake-up of the I/O thread by another thread of the process (not the loop) in
        // between leaves a call on its own clock: that request is not split, never mis-split.
        let (Some((f_on, f_run, f_blk)), Some((e_on, _, e_blk)), Some((o_on, _, _))) = (
            states(rec, "frontend"),
            states(rec, "engine"),
            states(rec, "output"),
        ) else {
            eprintln!("{id}: not split per stage: {rec}");
            continue;
        };
        split_n += 1;
        eprintln!(
            "{id}: hand-off by {}; frontend {f} (on-CPU {f_on}, runnable {f_run}, blocked \
             {f_blk}), engine {e} (on-CPU {e_on}, blocked {e_blk}), output {o} (on-CPU {o_on}); \
             the loop's schedstat on-CPU: frontend {w_f}, output {w_o}",
            rec["hand_off"]
        );
        assert!(
            close(f_on, w_f, 1.0),
            "frontend on-CPU {f_on} vs schedstat {w_f}: {rec}"
        );
        assert!(
            close(o_on, w_o, 1.0),
            "output on-CPU {o_on} vs schedstat {w_o}: {rec}"
        );
        // The loop waits for the worker: its engine stage is blocked but for waking and
        // dispatching (and any chatter of other requests: none here).
        assert!(
            e_blk + 2_000_000 >= e && e >= 39_000_000,
            "engine: blocked {e_blk} of {e}: {rec}"
        );
    }
    assert!(
        split_n >= 2,
        "{split_n} of 3 requests split per stage on the loop's clock"
    );
}

/// The engine process's own side of the engine stage (`engine_ns`): the worker receives the
/// request, waits 30 ms (its queue), spends 40 ms of CPU (its prefill) and answers, all on its
/// one thread; then the same with a CPU hog sharing the worker's CPU (run-queue delay in the
/// engine). Witnesses: the worker's clock and its thread's schedstat at its receipt of the
/// hand-off and just before its answer. Needs root (eBPF).
#[test]
fn the_engine_processs_thread_splits_its_part_of_the_engine_stage() {
    engine_process_split(
        "the_engine_processs_thread_splits_its_part_of_the_engine_stage",
        false,
    );
}

/// The worker's socket I/O made by a thread of its own while its main thread waits and burns (as
/// vLLM's `EngineCore` leaves its socket I/O to ZMQ's I/O threads): the engine process's part is
/// split by its main thread's states (docs/attribution.md, "The engine process's side").
#[test]
fn an_engines_io_thread_is_dated_on_its_main_thread() {
    engine_process_split("an_engines_io_thread_is_dated_on_its_main_thread", true);
}

/// Two requests without and two with a CPU hog on the worker's CPU: the engine process's side
/// of each (`engine_ns`) against the worker's own clock and schedstat. `io_thread`: the worker
/// does its socket I/O in a thread of its own (`--worker-io-thread`), and the front through its
/// I/O thread (`--io-thread`).
fn engine_process_split(test: &str, io_thread: bool) {
    let args: &[&str] = if io_thread {
        &["--worker", "--io-thread", "--worker-io-thread", "--sched"]
    } else {
        &["--worker", "--sched"]
    };
    let Some(served) = node_with_args_under_probe(test, args, &[]) else {
        return;
    };
    if std::env::var(tests::CAPTURE_ENV).as_deref() == Ok("syscalls") {
        return; // the syscall path sees no IPC
    }
    let states_on = std::env::var(tests::THREAD_STATES_ENV).as_deref() != Ok("off");
    let front = served.node.pid();
    let worker: u32 = std::fs::read_to_string(format!("/proc/{front}/task/{front}/children"))
        .expect("the front's children")
        .split_whitespace()
        .next()
        .and_then(|p| p.parse().ok())
        .expect("the worker process");
    let shape = json!({"worker_ms": 30, "worker_burn_ms": 40, "report": true,
                       "report_worker": true});
    // The worker's threads are known from their first switch-out after attach.
    run_one(&served.addr, chat_req("warm-up", "m", true, 1, &shape));
    let mut n = 1;
    let mut hog = None;
    for (i, starved) in [false, false, true, true].into_iter().enumerate() {
        if starved && hog.is_none() {
            tests::pin(worker, "1");
            hog = Some(tests::cpu_hog(1));
            std::thread::sleep(Duration::from_millis(100));
        }
        let id = format!("engine{i}");
        run_one(&served.addr, chat_req(&id, "m", true, 1, &shape));
        n += 1;
        let recs = records(&served.probe, n);
        let rec = by_id(&recs, &id);
        let t = timing(&served, &id);
        let (_, e, _) = split(rec);
        assert_eq!(rec["hand_off"], "id", "{rec}");
        let side = &rec["engine_ns"];
        assert_eq!(
            side["pid"], worker,
            "the worker is the engine process: {rec}"
        );
        let (to, inside, back) = (
            ns(&side["to_engine"]),
            ns(&side["in_engine"]),
            ns(&side["from_engine"]),
        );
        assert_eq!(to + inside + back, e, "the three add up to engine: {rec}");
        // The worker's stamps come after Node dispatched the message the probe saw received
        // and before the send the probe sees: the probe's span holds the witness's. With an I/O
        // thread, that thread's stamps are the nearer ones, and the main thread's states over
        // the hops between the two threads (each way) are not witnessed: they widen the bound.
        let w = |k: &str| t[&format!("w_{k}_ns")];
        let (w_span, hops) = if io_thread {
            let hops = (w("in") - w("io_in")) + (w("io_out") - w("out"));
            (w("io_out") - w("io_in"), hops)
        } else {
            (w("out") - w("in"), 0)
        };
        eprintln!(
            "{id}{}: engine {e}: to {to}, in {inside}, back {back}; the worker's own {w_span} \
             (hops between its threads {hops}); threads {} of tid {}",
            if starved { " (hog)" } else { "" },
            side["threads"],
            side["tid"]
        );
        assert!(
            inside >= w_span && close(inside, w_span, 1.0),
            "in_engine {inside} vs the worker's clock {w_span}: {rec}"
        );
        if !states_on {
            assert!(side["threads"].is_null(), "{rec}");
            continue;
        }
        let s = &side["threads"];
        assert_eq!(side["tid"], worker, "the worker's main thread: {rec}");
        let (on, run, blk) = (ns(&s["on_cpu"]), ns(&s["runnable"]), ns(&s["blocked"]));
        assert_eq!(on + run + blk, inside, "{rec}");
        let (w_on, w_run) = (w("out_on") - w("in_on"), w("out_run") - w("in_run"));
        eprintln!("  on {on} run {run} blocked {blk}; schedstat on {w_on} run {w_run}");
        let extra = 1.0 + hops as f64 / 1e6;
        assert!(
            close(on, w_on, extra) && close(run, w_run, extra),
            "the worker's states vs its schedstat (on {w_on}, run {w_run}): {rec}"
        );
        assert!(blk >= 28_000_000, "the 30 ms wait is blocked: {rec}");
        if starved {
            assert!(
                run >= 10_000_000,
                "a hog on the worker's CPU is run-queue delay in the engine: {rec}"
            );
        }
    }
    drop(hog);
    tests::pin(worker, "0-1");
}
