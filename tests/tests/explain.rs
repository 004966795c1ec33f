//! The tools that read latency attribution back: `llm-probe explain` (the slowest requests as a
//! table) and `llm-probe trace` (a Chrome trace-event file with request and thread tracks),
//! against the Node stand-in under a real probe. Needs root (eBPF).

use std::{process::Command, thread, time::Duration};

use serde_json::{json, Value};
use tests::{
    node_under_probe,
    traffic::{by_id, chat_req, records, run_one},
    NodeUnderProbe,
};

fn ns(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a number: {v}"))
}

/// `llm-probe explain ARGS` against the probe of `served`.
fn explain(served: &NodeUnderProbe, args: &[&str]) -> std::process::Output {
    Command::new(tests::probe_bin())
        .args(["explain", "--url", &format!("http://{}", served.probe.addr)])
        .args(args)
        .output()
        .expect("llm-probe explain")
}

#[test]
fn explain_prints_the_slowest_requests_with_their_stages() {
    let Some(served) = node_under_probe("explain_prints_the_slowest_requests_with_their_stages")
    else {
        return;
    };
    // Node's first request after start pays its warm-up (tens of ms of compiling and a late
    // accept: 69.5 ms for a 5 ms request once): it goes first, and is not one of the three.
    for (id, ttft) in [("warm-up", 0), ("fast", 5), ("slow", 90), ("mid", 40)] {
        run_one(
            &served.addr,
            chat_req(id, "m", true, 2, &json!({"ttft_ms": ttft})),
        );
    }
    records(&served.probe, 4);
    let out = explain(&served, &["--top", "2"]);
    let text = String::from_utf8_lossy(&out.stdout);
    eprintln!("{text}");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Vec<&str> = text.lines().filter(|l| l.contains(" m ")).collect();
    assert_eq!(rows.len(), 2, "--top 2: {text}");
    assert!(
        rows[0].starts_with("slow") && rows[1].starts_with("mid"),
        "slowest first: {text}"
    );
    for h in [
        "TTFT",
        "socket_queue",
        "engine",
        "HANDOFF",
        "on_cpu",
        "runnable",
        "blocked",
    ] {
        assert!(text.contains(h), "column {h}: {text}");
    }
    let one = explain(&served, &["--request-id", "fast"]);
    let text = String::from_utf8_lossy(&one.stdout);
    assert!(
        one.status.success() && text.contains("fast") && !text.contains("slow"),
        "{text}"
    );
    // One request in detail: its decode (2 tokens: one gap; a single-process server, all of it
    // engine).
    assert!(
        text.contains("decode (first token -> last): engine"),
        "{text}"
    );
    let none = explain(&served, &["--request-id", "nope"]);
    assert_eq!(none.status.code(), Some(1), "an unknown id is an error");
}

#[test]
fn trace_writes_request_and_thread_tracks() {
    let Some(served) = node_under_probe("trace_writes_request_and_thread_tracks") else {
        return;
    };
    let out = std::env::temp_dir().join(format!("llm-probe-trace-{}.json", std::process::id()));
    let url = format!("http://{}", served.probe.addr);
    let (bin, path) = (tests::probe_bin(), out.clone());
    let recorder = thread::spawn(move || {
        Command::new(bin)
            .args(["trace", "--url", &url, "--duration", "3s", "-o"])
            .arg(&path)
            .output()
            .expect("llm-probe trace")
    });
    thread::sleep(Duration::from_millis(1200));
    for i in 0..4 {
        let extra = json!({"ttft_ms": 20, "gap_ms": 5, "burn_cpu_ms": 10});
        run_one(
            &served.addr,
            chat_req(&format!("t{i}"), "m", true, 3, &extra),
        );
    }
    let done = recorder.join().expect("recorder");
    assert!(
        done.status.success(),
        "{}",
        String::from_utf8_lossy(&done.stderr)
    );
    let trace: Value =
        serde_json::from_slice(&std::fs::read(&out).expect("trace file")).expect("JSON");
    let _ = std::fs::remove_file(&out);
    let events = trace["traceEvents"].as_array().expect("traceEvents");
    // Trace-event format: every event has a phase, a pid, and (but metadata) a numeric time.
    for e in events {
        let ph = e["ph"].as_str().expect("ph");
        assert!(["X", "C", "M"].contains(&ph) && e["pid"].is_u64(), "{e}");
        assert!(
            ph == "M" || e["ts"].as_f64().is_some_and(|t| t >= 0.0),
            "{e}"
        );
    }
    let recs = records(&served.probe, 4);
    for i in 0..4 {
        let id = format!("t{i}");
        let rec = by_id(&recs, &id);
        let slices: Vec<&Value> = events
            .iter()
            .filter(|e| e["ph"] == "X" && e["args"]["request_id"] == id.as_str())
            .collect();
        let stage_us: f64 = slices
            .iter()
            .filter(|e| e["name"] != "decode")
            .map(|e| e["dur"].as_f64().expect("dur"))
            .sum();
        let ttft_us = ns(&rec["ttft_ns"]) as f64 / 1e3;
        assert!(
            (stage_us - ttft_us).abs() < 0.01,
            "{id}: stage slices {stage_us} µs vs TTFT {ttft_us}"
        );
        assert!(
            slices.iter().any(|e| e["name"] == "decode"),
            "{id}: decode slice"
        );
    }
    let pid = u64::from(served.node.pid());
    let counters: Vec<&Value> = events
        .iter()
        .filter(|e| e["ph"] == "C" && e["pid"] == pid)
        .collect();
    assert!(
        counters.len() >= 2,
        "per-second thread counters of the server: {counters:?}"
    );
    for c in &counters {
        let sum: f64 = ["on_cpu", "runnable", "blocked"]
            .iter()
            .map(|k| c["args"][k].as_f64().expect("share"))
            .sum();
        assert!(
            sum > 0.5 && sum < 1.1,
            "a thread's shares of an interval add up to ~1: {c}"
        );
    }
}
