//! The probe's life around its targets: children forked after attach are traced, a target that
//! exits is reported and re-attached when its port comes back, SIGTERM detaches cleanly, under
//! ring-buffer pressure every kernel record is either delivered or counted lost, and both socket
//! capture paths load and say which is in use; the benchmark floors measure nothing. Needs root.

use std::{process::Command, time::Duration};

use serde_json::json;
use tests::{
    free_port, metric_sum, mock_llm_js, node_under_probe, node_under_probe_with, require_root,
    start_node,
    traffic::{chat_req, records, run_concurrent, run_one},
    wait_for, Probe, Proc,
};

#[test]
fn children_forked_after_attach_are_traced() {
    if !require_root("children_forked_after_attach_are_traced") {
        return;
    }
    let port = free_port();
    let script = mock_llm_js();
    // The shell is the target; node is forked by it only after the probe has attached.
    let parent = Proc::spawn(
        "sh",
        Command::new("sh")
            .arg("-c")
            .arg(format!("sleep 2; node {} {port}; true", script.display())),
    );
    // Dropping the shell does not stop the node it forked: this guard does, even on panic.
    struct KillChild(String);
    impl Drop for KillChild {
        fn drop(&mut self) {
            let _ = Command::new("pkill").args(["-f", &self.0]).status();
        }
    }
    let _child = KillChild(format!("mock_llm.js {port}"));
    let probe = Probe::start(&["--pid".into(), parent.pid().to_string()]);
    let addr = format!("127.0.0.1:{port}");
    wait_for("node forked by the target", Duration::from_secs(20), || {
        tests::http_get(&addr, "/health").is_ok_and(|(s, _)| s == 200)
    });
    let s = run_one(&addr, chat_req("child-1", "kid", true, 4, &json!({})));
    assert!(s.error.is_none());
    let recs = records(&probe, 1);
    assert_eq!(recs[0]["request_id"], "child-1");
    assert_ne!(
        recs[0]["pid"].as_u64(),
        Some(u64::from(parent.pid())),
        "served by the child"
    );
    assert!(
        probe.proc.log_text().contains("forked"),
        "{}",
        probe.proc.log_text()
    );
}

#[test]
fn target_exit_is_reported_and_port_reattached() {
    let Some(served) = node_under_probe("target_exit_is_reported_and_port_reattached") else {
        return;
    };
    let probe = served.probe;
    run_one(
        &served.addr,
        chat_req("first-life", "r", true, 3, &json!({})),
    );
    records(&probe, 1);
    drop(served.node);
    wait_for(
        "/health to turn critical after the target exits",
        Duration::from_secs(10),
        || probe.health().0 == 503,
    );
    let (_, h) = probe.health();
    assert_eq!(h["overall"], "critical", "{h}");
    assert!(probe.proc.log_text().contains("exited") || probe.proc.log_text().contains("gone"));

    let _node2 = start_node(served.port);
    wait_for(
        "re-attach to the new listener",
        Duration::from_secs(10),
        || probe.health().0 == 200,
    );
    run_one(
        &served.addr,
        chat_req("second-life", "r", true, 3, &json!({})),
    );
    let recs = records(&probe, 2);
    assert!(
        recs.iter().any(|r| r["request_id"] == "second-life"),
        "{recs:#?}"
    );
}

#[test]
fn sigterm_detaches_cleanly() {
    let Some(mut served) = node_under_probe("sigterm_detaches_cleanly") else {
        return;
    };
    // Every agent thread (one, since the agent runs on a current-thread runtime; more while a
    // sampler runs) is under SCHED_BATCH (the default `--agent-sched batch`); the traced server
    // keeps its own policy.
    let agent = thread_policies(served.probe.proc.pid());
    assert!(
        !agent.is_empty() && agent.iter().all(|&p| p == libc::SCHED_BATCH),
        "agent thread policies {agent:?}"
    );
    let server = thread_policies(served.node.pid());
    assert!(
        server.iter().all(|&p| p == libc::SCHED_OTHER),
        "server thread policies {server:?}"
    );
    let probe = &mut served.probe;
    probe.proc.signal(libc::SIGTERM);
    wait_for(
        "llm-probe to exit on SIGTERM",
        Duration::from_secs(10),
        || !probe.proc.alive(),
    );
    let status = probe.proc.child.wait().expect("wait");
    assert!(
        status.success(),
        "exit status {status}:\n{}",
        probe.proc.log_text()
    );
    assert!(
        probe.proc.log_text().contains("detaching"),
        "{}",
        probe.proc.log_text()
    );
    // The server keeps serving after the probe went away.
    let s = run_one(&served.addr, chat_req("after", "x", true, 2, &json!({})));
    assert!(s.error.is_none(), "{s:?}");
}

#[test]
fn ring_pressure_every_event_delivered_or_counted_lost() {
    let Some(served) = node_under_probe("ring_pressure_every_event_delivered_or_counted_lost")
    else {
        return;
    };
    let probe = &served.probe;
    // Freeze the agent so nothing drains, then push ~20 MB of 3 KB events through an 8 MB ring.
    probe.proc.signal(libc::SIGSTOP);
    let reqs = (0..4)
        .map(|i| {
            chat_req(
                &format!("big-{i}"),
                "big",
                true,
                1500,
                &json!({"pad": 3000}),
            )
        })
        .collect();
    let samples = run_concurrent(&served.addr, reqs);
    probe.proc.signal(libc::SIGCONT);
    assert!(samples.iter().all(|s| s.error.is_none()), "{samples:?}");
    // Let the agent drain, then the counters must balance exactly.
    let counts = || {
        let m = probe.metrics();
        let seen = metric_sum(&m, "llm_probe_events_seen_total", &[]);
        let delivered = metric_sum(&m, "llm_probe_events_total", &[]);
        let lost = metric_sum(
            &m,
            "llm_probe_events_lost_total",
            &[("reason", "ringbuf_full")],
        ) + metric_sum(&m, "llm_probe_events_lost_total", &[("reason", "map_full")]);
        (seen, delivered, lost, m)
    };
    let mut prev = counts();
    wait_for("counters to settle", Duration::from_secs(20), || {
        std::thread::sleep(Duration::from_millis(500));
        let now = counts();
        let settled = (now.0, now.1, now.2) == (prev.0, prev.1, prev.2);
        prev = now;
        settled
    });
    let (seen, delivered, lost, m) = prev;
    eprintln!("ring pressure: seen {seen}, delivered {delivered}, lost {lost}");
    assert!(lost > 0.0, "the test must actually overflow the ring:\n{m}");
    assert_eq!(seen, delivered + lost, "seen = delivered + lost:\n{m}");
    let (_, h) = probe.health();
    assert_eq!(h["checks"]["events"]["status"], "warning", "{h}");
}

/// Both socket capture paths load on this kernel, each says in `llm_probe_attached` and the log
/// which it is, neither leaves the other's programs attached, and `auto` picks the `sock:` one.
/// The accuracy tests run on both (`cargo xtask test` repeats them with `--capture syscalls`).
#[test]
fn capture_paths_load_and_say_which_is_in_use() {
    for (choice, used, unused) in [
        ("sock", "sock_send_data", "sys_enter_write"),
        ("syscalls", "sys_enter_write", "sock_send_data"),
        ("auto", "sock_send_data", "sys_enter_write"),
    ] {
        let Some(served) = node_under_probe_with(
            "capture_paths_load_and_say_which_is_in_use",
            &["--capture", choice],
        ) else {
            return;
        };
        let text = served.probe.metrics();
        let attached = |p: &str| metric_sum(&text, "llm_probe_attached", &[("program", p)]);
        assert_eq!(attached(used), 1.0, "--capture {choice}:\n{text}");
        assert_eq!(attached(unused), 0.0, "--capture {choice}:\n{text}");
        let path = if used.starts_with("sock") {
            "sock"
        } else {
            "syscalls"
        };
        let log = served.probe.proc.log_text();
        assert!(
            log.contains(&format!("socket capture path: {path} (")),
            "--capture {choice}:\n{log}"
        );
        let s = run_one(&served.addr, chat_req("paths", "x", true, 3, &json!({})));
        assert!(s.error.is_none(), "{s:?}");
        wait_for("the request on record", Duration::from_secs(5), || {
            served.probe.requests().0 == 1
        });
        let (_, recs) = served.probe.requests();
        assert_eq!(recs[0]["tokens"], 3, "--capture {choice}: {:?}", recs[0]);
    }
}

/// The scheduling policy of every thread of `pid` (`/proc/PID/task/TID/stat` field 41).
fn thread_policies(pid: u32) -> Vec<i32> {
    let mut out = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).expect("task dir") {
        let path = t.expect("task entry").path().join("stat");
        let Ok(stat) = std::fs::read_to_string(&path) else {
            continue; // the thread exited
        };
        // Fields after the `(comm)` start at field 3.
        let rest = &stat[stat.rfind(')').expect("stat comm") + 1..];
        let policy = rest.split_whitespace().nth(41 - 3).expect("policy field");
        out.push(policy.parse().expect("policy number"));
    }
    out
}

/// The benchmark floors (`--bench-floor`, docs/BENCHMARKS.md *The floor*) attach the `sock:`
/// programs and measure nothing: under `hooks` they return at once (no record of the traffic);
/// under `records` every send of the server delivers one bare record, and still no request is
/// made of them. Without `--capture sock` the flag is refused. Needs root.
#[test]
fn bench_floors_attach_and_measure_nothing() {
    const REQUESTS: usize = 5;
    for floor in ["hooks", "records"] {
        let Some(served) = node_under_probe_with(
            "bench_floors_attach_and_measure_nothing",
            &["--capture", "sock", "--bench-floor", floor],
        ) else {
            return;
        };
        let text = served.probe.metrics();
        let attached = |p: &str| metric_sum(&text, "llm_probe_attached", &[("program", p)]);
        assert_eq!(attached("sock_send_data"), 1.0, "{floor}:\n{text}");
        assert_eq!(attached("sys_enter_write"), 0.0, "{floor}:\n{text}");
        for i in 0..REQUESTS {
            let s = run_one(
                &served.addr,
                chat_req(&format!("floor-{i}"), "x", true, 4, &json!({})),
            );
            assert!(s.error.is_none(), "{s:?}");
        }
        // Each streamed response is at least its head and 4 events: 5 sends.
        let sends = (REQUESTS * 5) as f64;
        let events = || metric_sum(&served.probe.metrics(), "llm_probe_events_total", &[]);
        if floor == "records" {
            wait_for("a record per send", Duration::from_secs(5), || {
                events() >= sends
            });
        } else {
            // Three drain intervals: whatever the kernel wrote is read by then.
            std::thread::sleep(Duration::from_millis(300));
            assert!(events() < REQUESTS as f64, "{floor}: {} records", events());
        }
        assert_eq!(served.probe.requests().0, 0, "{floor}: a request measured");
        let log = served.probe.proc.log_text();
        assert!(log.contains("a benchmark floor"), "{floor}:\n{log}");
    }
    let out = Command::new(tests::probe_bin())
        .args(["run", "--port", "1", "--bench-floor", "hooks"])
        .output()
        .expect("running llm-probe");
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--capture sock"),
        "{out:?}"
    );
}
