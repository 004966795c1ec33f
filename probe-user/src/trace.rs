//! `llm-probe trace`: a Chrome trace-event JSON file (Perfetto, chrome://tracing) of what a
//! running agent saw for `--duration`: a track per finished request with its TTFT stages and
//! decode as slices, per traced thread its on-CPU / runnable / blocked shares per second as a
//! counter track, and with the CUDA probes live each engine thread's steps (prefill / decode) as
//! slices on its own track. Built from `/api/v1/requests`, `/api/v1/threads` and
//! `/api/v1/steps`, polled once a second; the agent keeps no trace.

use std::{collections::BTreeMap, time::Duration};

use serde_json::{json, Value};

#[derive(clap::Args)]
pub struct Args {
    /// The running agent.
    #[arg(long, default_value_t = format!("http://{}", probe_user::server::DEFAULT_LISTEN))]
    pub url: String,
    /// How long to record (e.g. 10s, 1m).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub duration: Duration,
    /// Where to write the trace.
    #[arg(short, long, default_value = "trace.json", value_name = "FILE")]
    pub output: std::path::PathBuf,
}

/// Thread snapshots kept (one per second): an hour.
const MAX_SNAPSHOTS: usize = 3600;
/// CUDA steps kept (≈ 150 bytes each in the file).
const MAX_STEPS: usize = 200_000;

/// The CUDA steps released since the last poll, appended to `steps`; returns the steps the agent
/// dropped before they could be read (its buffer holds the last 8,192).
fn poll_steps(url: &str, after: &mut u64, steps: &mut Vec<Value>) -> anyhow::Result<u64> {
    let mut dropped = 0;
    while steps.len() < MAX_STEPS {
        let page = crate::ask_json(url, &format!("/api/v1/steps?after={after}"))?;
        let list = page["steps"].as_array().cloned().unwrap_or_default();
        let (Some(first), Some(last)) = (
            list.first().and_then(|v| v["seq"].as_u64()),
            list.last().and_then(|v| v["seq"].as_u64()),
        ) else {
            break;
        };
        dropped += first.saturating_sub(*after + 1);
        *after = last;
        steps.extend(list.into_iter().take(MAX_STEPS - steps.len()));
    }
    Ok(dropped)
}

pub fn run(a: &Args) -> anyhow::Result<()> {
    // Requests finished before the start are left out: remember the newest one now.
    let newest = crate::ask_json(&a.url, "/api/v1/requests?limit=1")?;
    let after = newest["requests"][0]["seq"].as_u64().unwrap_or(0);
    let mut step_after = crate::ask_json(&a.url, "/api/v1/steps?limit=0")?["newest"]
        .as_u64()
        .unwrap_or(0);
    let (mut steps, mut dropped) = (Vec::new(), 0);
    eprintln!(
        "recording {} from {} ...",
        humantime::format_duration(a.duration),
        a.url
    );
    let start = std::time::Instant::now();
    let mut snaps = Vec::new();
    loop {
        if snaps.len() < MAX_SNAPSHOTS {
            snaps.push(crate::ask_json(&a.url, "/api/v1/threads")?);
        }
        dropped += poll_steps(&a.url, &mut step_after, &mut steps)?;
        if start.elapsed() >= a.duration {
            break;
        }
        std::thread::sleep(Duration::from_secs(1).min(a.duration.saturating_sub(start.elapsed())));
    }
    let page = crate::ask_json(
        &a.url,
        &format!("/api/v1/requests?after={after}&limit=1000"),
    )?;
    let requests = page["requests"].as_array().cloned().unwrap_or_default();
    let trace = build(&requests, &snaps, &steps);
    let events = trace["traceEvents"].as_array().map_or(0, Vec::len);
    if dropped > 0 || steps.len() >= MAX_STEPS {
        eprintln!(
            "CUDA steps missing from the trace: {dropped} released faster than they were read, \
             and none after the first {MAX_STEPS}"
        );
    }
    std::fs::write(&a.output, serde_json::to_vec(&trace)?)
        .map_err(|e| anyhow::anyhow!("writing {}: {e}", a.output.display()))?;
    println!(
        "{}: {} requests, {} thread snapshots, {} CUDA steps, {events} events — open it in \
         https://ui.perfetto.dev or chrome://tracing",
        a.output.display(),
        requests.len(),
        snaps.len(),
        steps.len()
    );
    Ok(())
}

/// Microseconds since `t0` (trace-event timestamps are µs).
fn us(ns: u64, t0: u64) -> f64 {
    ns.saturating_sub(t0) as f64 / 1e3
}

/// The trace: requests (`/api/v1/requests` entries), thread snapshots (`/api/v1/threads`
/// answers, in time order) and CUDA steps (`/api/v1/steps` entries).
pub fn build(requests: &[Value], snaps: &[Value], steps: &[Value]) -> Value {
    let t0 = requests
        .iter()
        .filter_map(|r| r["arrival_ns"].as_u64())
        .chain(snaps.iter().filter_map(|s| s["at_ns"].as_u64()))
        .chain(steps.iter().filter_map(|s| s["start_ns"].as_u64()))
        .min()
        .unwrap_or(0);
    let mut events = Vec::new();
    let mut names: BTreeMap<u32, String> = BTreeMap::new();
    for r in requests {
        let (Some(pid), Some(seq), Some(arrival)) = (
            r["pid"].as_u64().and_then(|p| u32::try_from(p).ok()),
            r["seq"].as_u64(),
            r["arrival_ns"].as_u64(),
        ) else {
            continue;
        };
        // A track per request, numbered above any thread id.
        let tid = 1_000_000_000 + seq;
        let label = r["request_id"]
            .as_str()
            .map_or_else(|| format!("request #{seq}"), |id| format!("request {id}"));
        events.push(
            json!({"ph": "M", "name": "thread_name", "pid": pid, "tid": tid,
                           "args": {"name": label}}),
        );
        let args = json!({"request_id": r["request_id"], "model": r["model"],
                          "endpoint": r["endpoint"], "outcome": r["outcome"],
                          "engine_gpu_sync_ns": r["gpu_ns"]["sync_wait"],
                          "engine_process_ns": r["engine_ns"]["in_engine"],
                          "decode_gpu_sync_ns": r["decode_ns"]["gpu_sync"]});
        let mut at = arrival;
        let mut slice = |name: &str, ns: u64, at: &mut u64| {
            if ns > 0 {
                events.push(
                    json!({"ph": "X", "cat": "request", "name": name, "pid": pid,
                                   "tid": tid, "ts": us(*at, t0), "dur": ns as f64 / 1e3,
                                   "args": args}),
                );
            }
            *at += ns;
        };
        match r["stages_ns"].as_object() {
            Some(stages) => {
                for stage in probe_user::attribution::STAGES {
                    slice(stage, stages[stage].as_u64().unwrap_or(0), &mut at);
                }
            }
            None => slice("ttft", r["ttft_ns"].as_u64().unwrap_or(0), &mut at),
        }
        let rest = (arrival + r["duration_ns"].as_u64().unwrap_or(0)).saturating_sub(at);
        slice("decode", rest, &mut at);
    }
    // Thread counters: each thread's share of the next interval in each state.
    for pair in snaps.windows(2) {
        let (a, b) = (&pair[0], &pair[1]);
        let (Some(ta), Some(tb)) = (a["at_ns"].as_u64(), b["at_ns"].as_u64()) else {
            continue;
        };
        let span = tb.saturating_sub(ta).max(1) as f64;
        let before: BTreeMap<u64, &Value> = a["threads"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|t| Some((t["tid"].as_u64()?, t)))
            .collect();
        for t in b["threads"].as_array().into_iter().flatten() {
            let (Some(tid), Some(pid)) = (t["tid"].as_u64(), t["pid"].as_u64()) else {
                continue;
            };
            let Some(old) = before.get(&tid) else {
                continue;
            };
            let d = |k: &str| {
                t[k].as_u64()
                    .unwrap_or(0)
                    .saturating_sub(old[k].as_u64().unwrap_or(0)) as f64
                    / span
            };
            let pid = u32::try_from(pid).unwrap_or(0);
            names
                .entry(pid)
                .or_insert_with(|| t["process"].as_str().unwrap_or("?").to_owned());
            events.push(json!({"ph": "C", "name": format!("thread {} {}", tid,
                                   t["thread"].as_str().unwrap_or("?")),
                               "pid": pid, "ts": us(ta, t0),
                               "args": {"on_cpu": d("on_cpu_ns"), "runnable": d("runnable_ns"),
                                        "blocked": d("blocked_ns")}}));
        }
    }
    // CUDA steps: slices on the thread that launched and synchronized them.
    for st in steps {
        let (Some(pid), Some(tid), Some(start), Some(end)) = (
            st["pid"].as_u64(),
            st["tid"].as_u64(),
            st["start_ns"].as_u64(),
            st["end_ns"].as_u64(),
        ) else {
            continue;
        };
        events.push(json!({"ph": "X", "cat": "gpu",
                           "name": format!("{} step", st["phase"].as_str().unwrap_or("?")),
                           "pid": pid, "tid": tid, "ts": us(start, t0),
                           "dur": end.saturating_sub(start) as f64 / 1e3,
                           "args": {"kernel_launches": st["kernel_launches"],
                                    "graph_launches": st["graph_launches"]}}));
        if let Ok(pid) = u32::try_from(pid) {
            names.entry(pid).or_insert_with(|| format!("pid {pid}"));
        }
    }
    for r in requests {
        if let Some(pid) = r["pid"].as_u64().and_then(|p| u32::try_from(p).ok()) {
            names.entry(pid).or_insert_with(|| format!("pid {pid}"));
        }
    }
    for (pid, name) in names {
        events.push(json!({"ph": "M", "name": "process_name", "pid": pid,
                           "args": {"name": format!("{name} (pid {pid})")}}));
    }
    json!({"traceEvents": events, "displayTimeUnit": "ms",
           "otherData": {"source": "llm-probe trace", "clock": "CLOCK_MONOTONIC, from the earliest event"}})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_become_stage_slices_and_threads_counters() {
        let requests = vec![json!({
            "seq": 3, "pid": 42, "request_id": "r1", "model": "m", "endpoint": "/v1/completions",
            "outcome": "ok", "arrival_ns": 1_000_000u64, "ttft_ns": 6_000_000u64,
            "duration_ns": 10_000_000u64,
            "stages_ns": {"socket_queue": 1_000_000u64, "frontend": 0, "engine": 5_000_000u64,
                          "output": 0}
        })];
        let snaps = vec![
            json!({"at_ns": 2_000_000u64, "threads": [{"pid": 42, "tid": 42, "process": "node",
                   "thread": "node", "on_cpu_ns": 0, "runnable_ns": 0, "blocked_ns": 0}]}),
            json!({"at_ns": 12_000_000u64, "threads": [{"pid": 42, "tid": 42, "process": "node",
                   "thread": "node", "on_cpu_ns": 5_000_000u64, "runnable_ns": 1_000_000u64,
                   "blocked_ns": 4_000_000u64}]}),
        ];
        let steps = vec![
            json!({"seq": 1, "pid": 42, "tid": 43, "start_ns": 2_500_000u64,
                                "end_ns": 4_500_000u64, "phase": "prefill",
                                "kernel_launches": 50, "graph_launches": 0}),
        ];
        let t = build(&requests, &snaps, &steps);
        let ev = t["traceEvents"].as_array().unwrap();
        let step: Vec<&Value> = ev.iter().filter(|e| e["cat"] == "gpu").collect();
        assert_eq!(step.len(), 1);
        assert_eq!(
            (
                &step[0]["name"],
                &step[0]["tid"],
                &step[0]["ts"],
                &step[0]["dur"]
            ),
            (
                &json!("prefill step"),
                &json!(43),
                &json!(1_500.0),
                &json!(2_000.0)
            )
        );
        let slices: Vec<(&str, f64, f64)> = ev
            .iter()
            .filter(|e| e["ph"] == "X" && e["cat"] == "request")
            .map(|e| {
                (
                    e["name"].as_str().unwrap(),
                    e["ts"].as_f64().unwrap(),
                    e["dur"].as_f64().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            slices,
            [
                ("socket_queue", 0.0, 1_000.0),
                ("engine", 1_000.0, 5_000.0),
                ("decode", 6_000.0, 4_000.0)
            ]
        );
        let c: Vec<&Value> = ev.iter().filter(|e| e["ph"] == "C").collect();
        assert_eq!(c.len(), 1);
        assert_eq!(
            c[0]["args"],
            json!({"on_cpu": 0.5, "runnable": 0.1, "blocked": 0.4})
        );
        assert_eq!(c[0]["ts"], 1_000.0);
        assert!(ev
            .iter()
            .any(|e| e["ph"] == "M" && e["args"]["name"] == "node (pid 42)"));
        assert!(ev
            .iter()
            .any(|e| e["ph"] == "M" && e["args"]["name"] == "request r1"));
    }
}
