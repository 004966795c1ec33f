//! Hostile traffic and hostile targets against the real agent (root; docs/security.md): label
//! values that would break the exposition format, a flood of made-up model names, a target that
//! forks hundreds of times, writes past the capture, stalled bodies, hostile library files,
//! scoped targets and dropped capabilities. The agent's own endpoint is in `endpoint.rs`. Each
//! test stays on 127.0.0.1 (or a network namespace of its own) and is bounded in count and time.

use std::{
    io::Write as _,
    net::TcpStream,
    process::{Command, Stdio},
    time::Duration,
};

use serde_json::json;
use tests::{
    free_port, metric_sum, node_under_probe, node_under_probe_with, raise_nofile, require_root,
    start_node,
    traffic::{by_id, chat_req, run_concurrent},
    vm_hwm, wait_for, Probe, Proc,
};

/// `promtool check metrics` on `page`: the lines that say the text could not be parsed (lint
/// remarks about names are not parse errors and are ignored).
fn parse_errors(page: &str) -> Vec<String> {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus; cargo xtask setup installs it)");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(page.as_bytes())
        .expect("write page");
    let out = child.wait_with_output().expect("promtool ran");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .chain(String::from_utf8_lossy(&out.stderr).lines())
        .filter(|l| l.contains("parsing error") || l.contains("error while linting"))
        .map(str::to_owned)
        .collect()
}

fn model_labels(page: &str) -> Vec<String> {
    page.lines()
        .filter(|l| l.starts_with("llm_requests_total{"))
        .filter_map(|l| Some(l.split("model=\"").nth(1)?.split('"').next()?.to_owned()))
        .collect()
}

/// Names with `"`, newline, NUL, ESC and backslash, and a 300-byte one, answered 200, reach the
/// page only as safe labels; 400 made-up names answered 503 take no label slot; the real model
/// answered afterwards has its own label; promtool parses the whole page.
#[test]
fn hostile_model_names_neither_break_the_page_nor_take_slots() {
    let Some(t) = node_under_probe("hostile_model_names_neither_break_the_page_nor_take_slots")
    else {
        return;
    };
    let flood: Vec<_> = (0..400)
        .map(|i| {
            chat_req(
                &format!("flood-{i}"),
                &format!("made-up-{i}"),
                true,
                2,
                &json!({"fail": "503"}),
            )
        })
        .collect();
    for batch in flood.chunks(50) {
        run_concurrent(&t.addr, batch.to_vec());
    }
    let long = "x".repeat(300);
    let hostile = [
        "q\"uote} 1\nllm_fake_total 9",
        "new\nline",
        "nul\u{0}byte",
        "esc\u{1b}[31mred",
        "back\\slash",
        long.as_str(),
        "real-model",
    ];
    let reqs: Vec<_> = hostile
        .iter()
        .enumerate()
        .map(|(i, m)| chat_req(&format!("hostile-{i}"), m, true, 3, &json!({})))
        .collect();
    run_concurrent(&t.addr, reqs);
    let n = flood.len() + hostile.len();
    let got = t.probe.wait_requests(n, Duration::from_secs(20));
    assert_eq!(got.len(), n, "every request recorded");
    let page = t.probe.metrics();
    assert_eq!(
        parse_errors(&page),
        Vec::<String>::new(),
        "promtool parses the page"
    );
    assert!(
        !page.lines().any(|l| l.starts_with("llm_fake_total")),
        "an injected sample never appears"
    );
    let labels = model_labels(&page);
    assert!(labels.iter().any(|l| l == "real-model"), "{labels:?}");
    assert!(
        !labels.iter().any(|l| l.starts_with("made-up")),
        "{labels:?}"
    );
    for l in &labels {
        assert!(l.len() <= 64, "label too long: {l}");
        assert!(
            l.chars()
                .all(|c| c.is_ascii_alphanumeric() || "_.:/@+-=".contains(c)),
            "unsafe label {l:?}"
        );
    }
}

/// A traced shell that forks 300 short-lived children: each fork is traced, each exit recorded,
/// and `/health` keeps only the newest exited targets instead of growing with every fork.
#[test]
fn forks_do_not_grow_health() {
    if !require_root("forks_do_not_grow_health") {
        return;
    }
    let shell = Proc::spawn(
        "forker",
        Command::new("sh").args([
            "-c",
            "sleep 2; i=0; while [ $i -lt 300 ]; do /bin/true; i=$((i+1)); done; sleep 60",
        ]),
    );
    let probe = Probe::start(&["--pid".into(), shell.pid().to_string()]);
    wait_for("300 traced forks", Duration::from_secs(30), || {
        probe.proc.log_text().matches(" forked ").count() >= 300
    });
    std::thread::sleep(Duration::from_secs(2));
    // Let the housekeeping detach the CUDA probes of the children that lived long enough to get
    // them (a target is forgotten only after that).
    std::thread::sleep(Duration::from_secs(2));
    let (_, h) = probe.health();
    let exited = h["targets"].as_array().map_or(0, |t| {
        t.iter().filter(|t| t["alive"] == json!(false)).count()
    });
    assert!(exited <= 16, "{exited} exited targets in /health: {h}");
    assert!(
        h.to_string().len() < 8 * 1024,
        "/health is {} bytes",
        h.to_string().len()
    );
}

/// Streams whose every SSE event is a ~6 KB write (more than the kernel's 4 KiB capture per
/// syscall) keep their chunked framing from the syscall's byte count, and their events count as
/// content from their captured start (`"content":"tok…`). Half the servers wait before the end;
/// the other half write the last big event, the usage event, `[DONE]` and the terminator in one
/// writev (Node corks them): the kernel's capture of the write's last 256 bytes shows the end.
/// Every stream ends `ok` with the client's content-event count.
#[test]
fn writes_past_the_capture_keep_their_framing() {
    let Some(t) = node_under_probe("writes_past_the_capture_keep_their_framing") else {
        return;
    };
    let reqs: Vec<_> = (0..20)
        .map(|i| {
            let extra = if i % 2 == 0 {
                json!({"pad": 6000, "tail_ms": 20})
            } else {
                json!({"pad": 6000, "usage": true})
            };
            chat_req(&format!("big-{i}"), "m", true, 5, &extra)
        })
        .collect();
    let samples = run_concurrent(&t.addr, reqs);
    assert!(samples.iter().all(|s| s.status == 200 && s.error.is_none()));
    let recs = t.probe.wait_requests(20, Duration::from_secs(20));
    assert_eq!(recs.len(), 20, "{recs:?}");
    for s in &samples {
        let r = by_id(&recs, &s.request_id);
        assert_eq!(r["outcome"], "ok", "{r}");
        assert_eq!(r["content_events"].as_u64(), Some(s.content_events), "{r}");
        if s.request_id.ends_with(['1', '3', '5', '7', '9']) {
            assert_eq!(r["completion_tokens"], 5, "usage in the tail: {r}");
        }
    }
}

/// 2,000 connections that stall 60 KiB into a 1 MB request body: without a budget the agent
/// would keep ~64 KiB of body sniff for each (about 130 MB); with `--memory-budget 8MiB` its
/// peak RSS stays far below the `DaemonSet`'s 128 MiB limit, and the drops are counted.
#[test]
fn stalled_bodies_stay_within_the_memory_budget() {
    if !require_root("stalled_bodies_stay_within_the_memory_budget") {
        return;
    }
    raise_nofile(8192);
    let Some(t) = node_under_probe_with(
        "stalled_bodies_stay_within_the_memory_budget",
        &["--memory-budget", "8MiB"],
    ) else {
        return;
    };
    let head = "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
                Content-Length: 1000000\r\n\r\n{\"model\":\"m\",\"messages\":[{\"role\":\"user\",\"content\":\"";
    let mut held = Vec::new();
    for _ in 0..2000 {
        let Ok(mut s) = TcpStream::connect(&t.addr) else {
            continue;
        };
        if s.write_all(head.as_bytes()).is_ok() {
            held.push(s);
        }
    }
    assert!(held.len() >= 1900, "{} connections held", held.len());
    // The body in 4 KiB rounds across all connections, so that the server reads (and the kernel
    // captures) each piece on its own, as a slow client's body arrives.
    let piece = vec![b'a'; 4096];
    for _ in 0..15 {
        for s in &mut held {
            let _ = s.write_all(&piece);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // Let the server read everything and the agent drain it.
    std::thread::sleep(Duration::from_secs(3));
    let hwm = vm_hwm(t.probe.proc.pid());
    let page = t.probe.metrics();
    let dropped = metric_sum(
        &page,
        "llm_probe_budget_dropped_total",
        &[("what", "request_body")],
    );
    drop(held);
    println!(
        "agent peak RSS with 2,000 stalled bodies: {} MiB, {dropped} sniffs dropped",
        hwm >> 20
    );
    assert!(dropped > 1000.0, "budget drops: {dropped}\n{page}");
    assert!(hwm < 100 << 20, "agent peak RSS {} MiB", hwm >> 20);
}

/// Once attached, the agent keeps `CAP_BPF`, `CAP_PERFMON`, `CAP_SYS_PTRACE` and
/// `CAP_DAC_READ_SEARCH` and nothing else (effective, permitted and bounding sets), and still
/// times requests.
#[test]
fn the_agent_keeps_only_the_capabilities_it_needs() {
    let Some(t) = node_under_probe("the_agent_keeps_only_the_capabilities_it_needs") else {
        return;
    };
    let status =
        std::fs::read_to_string(format!("/proc/{}/status", t.probe.proc.pid())).expect("status");
    let cap = |name: &str| -> u64 {
        let hex = status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .expect("capability line")
            .trim();
        u64::from_str_radix(hex, 16).expect("hex")
    };
    let kept = (1 << 2) | (1 << 19) | (1 << 38) | (1 << 39);
    assert_eq!(cap("CapEff:"), kept, "{status}");
    assert_eq!(cap("CapPrm:"), kept, "{status}");
    assert_eq!(cap("CapBnd:"), kept, "{status}");
    assert_eq!(cap("CapInh:"), 0, "{status}");
    run_concurrent(
        &t.addr,
        vec![chat_req("after-drop", "m", true, 2, &json!({}))],
    );
    let recs = t.probe.wait_requests(1, Duration::from_secs(10));
    assert_eq!(recs.len(), 1);
}

/// `--port` with a scope traces only the listener the operator meant: a server outside
/// `--target-comm` is left alone (and the log says where it lives), one inside is traced.
#[test]
fn port_targets_are_scoped() {
    if !require_root("port_targets_are_scoped") {
        return;
    }
    let port = free_port();
    let _node = start_node(port);
    let args = |comm: &str| -> Vec<String> {
        [
            "--port",
            &port.to_string(),
            "--target-comm",
            comm,
            "--target-netns",
            "host",
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect()
    };
    let outside = Probe::start(&args("python3"));
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        outside.metrics().contains("llm_probe_targets 0"),
        "{}",
        outside.proc.log_text()
    );
    assert!(
        outside.proc.log_text().contains("outside --target-*"),
        "{}",
        outside.proc.log_text()
    );
    drop(outside);
    let inside = Probe::start(&args("node"));
    wait_for("the node server traced", Duration::from_secs(10), || {
        inside.metrics().contains("llm_probe_targets 1")
    });
    assert!(
        inside.proc.log_text().contains("found by port"),
        "{}",
        inside.proc.log_text()
    );
}

/// An `ld.so.cache` in the new glibc format whose `entries` all point at one string of
/// `string_len` bytes without a NUL inside the first `PATH_MAX` (header layout as
/// `struct cache_file_new`, glibc `elf/cache.c`).
fn crafted_ld_so_cache(entries: u32, string_len: usize) -> Vec<u8> {
    const HEADER: usize = 48;
    const ENTRY: usize = 24;
    let mut b = Vec::new();
    b.extend_from_slice(b"glibc-ld.so.cache1.1");
    b.extend_from_slice(&entries.to_ne_bytes()); // nlibs at 20
    b.extend_from_slice(&0u32.to_ne_bytes()); // len_strings
    b.push(2); // flags: little endian
    b.resize(HEADER, 0);
    let strings = HEADER + ENTRY * entries as usize;
    for _ in 0..entries {
        b.extend_from_slice(&1i32.to_ne_bytes()); // flags
        b.extend_from_slice(&(strings as u32).to_ne_bytes()); // key
        b.extend_from_slice(&(strings as u32).to_ne_bytes()); // value
        b.extend_from_slice(&0u32.to_ne_bytes()); // osversion
        b.extend_from_slice(&0u64.to_ne_bytes()); // hwcap
    }
    b.resize(strings + string_len, b'a');
    b.push(0);
    b
}

/// A target whose mount namespace holds a crafted 1 MB `ld.so.cache` (20,000 entries all naming
/// one 700 KB string) and whose `LD_LIBRARY_PATH` holds a 2 GiB sparse `libcuda.so.1` (a real
/// ELF stand-in with a hole appended): the agent reads neither whole — its peak RSS stays small,
/// and it says why the library was not probed.
#[test]
fn hostile_library_files_are_read_in_bounded_pieces() {
    if !require_root("hostile_library_files_are_read_in_bounded_pieces") {
        return;
    }
    let cuda = tests::fake_cuda::build().expect("stand-in CUDA libraries");
    let dir = std::env::temp_dir().join(format!("llmp-hostile-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("lib")).expect("dir");
    let lib = dir.join("lib/libcuda.so.1");
    std::fs::copy(cuda.libcuda(), &lib).expect("copy");
    std::fs::File::options()
        .write(true)
        .open(&lib)
        .and_then(|f| f.set_len(2 << 30))
        .expect("sparse 2 GiB");
    let cache = dir.join("ld.so.cache");
    std::fs::write(&cache, crafted_ld_so_cache(20_000, 700 * 1024)).expect("cache");
    // The target: its own mount namespace with the crafted cache over /etc/ld.so.cache.
    let script = format!(
        "mount --bind {} /etc/ld.so.cache && exec sleep 60",
        cache.display()
    );
    let target = Proc::spawn(
        "hostile-target",
        Command::new("unshare")
            .args(["-m", "--propagation", "private", "sh", "-c", &script])
            .env("LD_LIBRARY_PATH", dir.join("lib")),
    );
    std::thread::sleep(Duration::from_millis(500));
    let probe = Probe::start(&["--pid".into(), target.pid().to_string()]);
    wait_for("the library refused", Duration::from_secs(20), || {
        probe
            .proc
            .log_text()
            .contains("more than a CUDA library holds")
    });
    let hwm = vm_hwm(probe.proc.pid());
    println!("agent peak RSS with the hostile files: {} MiB", hwm >> 20);
    assert!(hwm < 100 << 20, "agent peak RSS {} MiB", hwm >> 20);
    drop(probe);
    drop(target);
    let _ = std::fs::remove_dir_all(&dir);
}

/// 4,096 concurrent streams of 4,100 SSE events each (16.8 M events, about two minutes here),
/// then a full page of `/api/v1/requests` (1,000 requests with 1,024 gaps each): with the
/// default memory budget the agent's peak RSS stays under the `DaemonSet`'s 128 MiB limit, the
/// page is bounded, and every event is accounted for (seen = delivered + lost).
#[test]
fn long_streams_and_the_request_log_fit_the_daemonset_limit() {
    if !require_root("long_streams_and_the_request_log_fit_the_daemonset_limit") {
        return;
    }
    raise_nofile(16_384);
    let bench = tests::workspace_root().join("target/release/llm-bench");
    let port = free_port();
    let _server = Proc::spawn(
        "llm-bench server",
        Command::new(&bench).args(["server", &port.to_string(), "--events", "4100"]),
    );
    wait_for("llm-bench server", Duration::from_secs(10), || {
        TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    let probe = Probe::start(&["--port".into(), port.to_string()]);
    let start = std::time::Instant::now();
    let out = tests::output_ok(
        "llm-bench client",
        Command::new(&bench).args([
            "client",
            &format!("127.0.0.1:{port}"),
            "--concurrency",
            "4096",
            // Each connection stops after the request running at this deadline: one request
            // each (a stream lasts far longer), with time for all 4,096 connects.
            "--seconds",
            "10",
        ]),
    );
    let client: serde_json::Value = serde_json::from_slice(&out.stdout).expect("client JSON");
    let requests = client["requests"].as_u64().expect("requests");
    let lost = metric_sum(&probe.metrics(), "llm_probe_events_lost_total", &[]);
    if lost == 0.0 {
        wait_for("every request recorded", Duration::from_secs(30), || {
            probe.requests().0 >= requests
        });
    }
    std::thread::sleep(Duration::from_secs(1));
    let m = probe.metrics();
    let (seen, lost) = (
        metric_sum(&m, "llm_probe_events_seen_total", &[]),
        metric_sum(&m, "llm_probe_events_lost_total", &[]),
    );
    let pid = probe.proc.pid();
    let hwm_load = vm_hwm(pid);
    let (code, page) = tests::http_get(&probe.addr, "/api/v1/requests").expect("GET");
    let hwm = vm_hwm(pid);
    let listed = serde_json::from_str::<serde_json::Value>(&page).expect("page JSON")["requests"]
        .as_array()
        .map_or(0, Vec::len);
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    eprintln!(
        "{requests} streams of 4,100 events in {:.0} s: {seen} events seen, {lost} lost; agent peak \
         RSS {:.1} MiB under load, {:.1} MiB after GET /api/v1/requests ({code}, {:.1} MiB, {listed} requests)",
        start.elapsed().as_secs_f64(),
        mib(hwm_load),
        mib(hwm),
        mib(page.len() as u64)
    );
    assert_eq!(requests, 4096, "every stream completed");
    assert_eq!(code, 200);
    assert!(listed <= 1000, "{listed}");
    assert!(hwm < 128 << 20, "peak RSS {:.1} MiB", mib(hwm));
    let delivered = metric_sum(&m, "llm_probe_events_total", &[]);
    assert_eq!(seen, delivered + lost, "seen = delivered + lost");
    // The agent reports its own CPU, which /proc/PID/stat read around a scrape brackets.
    let cpu_s = || {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
        let f: Vec<&str> = stat
            .rsplit_once(')')
            .expect("comm")
            .1
            .split_whitespace()
            .collect();
        // SAFETY: a plain libc query.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        (f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap()) / hz
    };
    let before = cpu_s();
    let cpu = metric_sum(&probe.metrics(), "llm_probe_cpu_seconds_total", &[]);
    let after = cpu_s();
    eprintln!(
        "agent CPU {cpu:.2} s (/proc: {before:.2}-{after:.2} s) = {:.3} ms per 1,000 records",
        cpu / delivered.max(1.0) * 1e6
    );
    assert!(
        cpu > 0.0 && before <= cpu && cpu <= after,
        "llm_probe_cpu_seconds_total {cpu} outside {before}..{after}"
    );
}
