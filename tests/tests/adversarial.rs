//! Hostile traffic and hostile targets against the real agent (root; docs/security.md): label
//! values that would break the exposition format, a flood of made-up model names, a flood of
//! idle connections to the agent's own port, a target that forks hundreds of times, a huge
//! request log. Each test stays on 127.0.0.1 and is bounded in count and time.

use std::{
    io::Write as _,
    net::TcpStream,
    process::{Command, Stdio},
    time::Duration,
};

use serde_json::{json, Value};
use tests::{
    free_port, http_get, metric_sum, node_under_probe, node_under_probe_with, require_root,
    start_node,
    traffic::{by_id, chat_req, run_concurrent},
    wait_for, Probe, Proc,
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

/// 1,100 idle connections to the agent's port (more than systemd's default open-file limit)
/// neither stop `/metrics` nor make the agent drop its live target. A scrape while the flood is
/// held open is answered at once: a full house gives the new connection the slot of the
/// longest-idle one, so it does not wait for the 5 s header timeout to free a slot.
#[test]
fn a_connection_flood_to_the_agent_keeps_the_target() {
    let Some(t) = node_under_probe("a_connection_flood_to_the_agent_keeps_the_target") else {
        return;
    };
    // This test's own descriptors: 1,100 sockets need more than the usual soft limit.
    raise_nofile(4096);
    let idle: Vec<TcpStream> = (0..1100)
        .filter_map(|_| TcpStream::connect(&t.probe.addr).ok())
        .collect();
    assert!(idle.len() > 1000, "opened {} connections", idle.len());
    let t0 = std::time::Instant::now();
    let (code, page) = http_get(&t.probe.addr, "/metrics").expect("scrape during the flood");
    let took = t0.elapsed();
    eprintln!(
        "/metrics with {} idle connections held open: {code} in {took:?}",
        idle.len()
    );
    assert_eq!(code, 200);
    assert!(page.contains("llm_probe_targets 1"), "{page}");
    assert!(took < Duration::from_secs(5), "waited {took:?} for a slot");
    // Housekeeping ticks with the flood open: the target must stay traced. The 64 connections
    // the agent took are closed by its 5 s header timeout, which frees its slots again.
    std::thread::sleep(Duration::from_secs(7));
    let (_, h) = t.probe.health();
    assert_eq!(h["checks"]["targets"]["value"], json!(1.0), "{h}");
    let page = t.probe.metrics();
    assert!(page.contains("llm_probe_targets 1"), "{page}");
    drop(idle);
    // Still timing requests afterwards.
    run_concurrent(
        &t.addr,
        vec![chat_req("after-flood", "m", true, 2, &json!({}))],
    );
    t.probe.wait_requests(1, Duration::from_secs(10));
    let _ = &t.node;
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

/// `/api/v1/requests` answers at most `limit` (and at most 1,000) requests, newest last, and
/// `after` pages forward.
#[test]
fn the_request_log_is_paged() {
    let Some(t) = node_under_probe("the_request_log_is_paged") else {
        return;
    };
    let reqs: Vec<_> = (0..30)
        .map(|i| chat_req(&format!("page-{i}"), "m", false, 1, &json!({})))
        .collect();
    run_concurrent(&t.addr, reqs);
    t.probe.wait_requests(30, Duration::from_secs(10));
    let get = |q: &str| -> Value {
        let (code, body) = http_get(&t.probe.addr, &format!("/api/v1/requests{q}")).expect("GET");
        assert_eq!(code, 200, "{body}");
        serde_json::from_str(&body).expect("JSON")
    };
    let page = get("?limit=5");
    let items = page["requests"].as_array().expect("requests");
    assert_eq!(items.len(), 5);
    let last_seq = items[4]["seq"].as_u64().expect("seq");
    assert_eq!(page["finished_total"], json!(30));
    let all = get("");
    assert_eq!(all["requests"].as_array().map(Vec::len), Some(30));
    assert_eq!(
        get(&format!("?after={last_seq}"))["requests"]
            .as_array()
            .map(Vec::len),
        Some(0)
    );
    let (code, _) = http_get(&t.probe.addr, "/api/v1/requests?limit=x").expect("GET");
    assert_eq!(code, 400);
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

/// Peak resident memory of `pid` (`VmHWM`), in bytes.
fn vm_hwm(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .expect("VmHWM")
        * 1024
}

fn raise_nofile(n: u64) {
    let lim = libc::rlimit {
        rlim_cur: n,
        rlim_max: n,
    };
    // SAFETY: valid pointer to a local; raising our own limit as root (children inherit it).
    unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raw const lim) };
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

/// A network namespace joined to this one by a veth pair (10.213.7.1 here, 10.213.7.2 there):
/// a client whose address is not loopback, on this machine. Removed on drop.
struct PeerNamespace {
    name: String,
    link: String,
}

impl PeerNamespace {
    fn new() -> Option<Self> {
        let id = std::process::id() % 100_000;
        let ns = Self {
            name: format!("llmp{id}"),
            link: format!("llmp{id}a"),
        };
        let peer = format!("llmp{id}b");
        let steps: [&[&str]; 8] = [
            &["netns", "add", &ns.name],
            &[
                "link", "add", &ns.link, "type", "veth", "peer", "name", &peer,
            ],
            &["link", "set", &peer, "netns", &ns.name],
            &["addr", "add", "10.213.7.1/30", "dev", &ns.link],
            &["link", "set", &ns.link, "up"],
            &["-n", &ns.name, "addr", "add", "10.213.7.2/30", "dev", &peer],
            &["-n", &ns.name, "link", "set", &peer, "up"],
            &["-n", &ns.name, "link", "set", "lo", "up"],
        ];
        for step in steps {
            let ok = Command::new("ip")
                .args(step)
                .status()
                .is_ok_and(|s| s.success());
            if !ok {
                println!(
                    "SKIP: `ip {}` failed: no network namespace for this test",
                    step.join(" ")
                );
                return None;
            }
        }
        Some(ns)
    }

    /// HTTP status of GET `url` from inside the namespace, with `headers`.
    fn status(&self, url: &str, headers: &[&str]) -> String {
        let mut cmd = Command::new("ip");
        cmd.args([
            "netns",
            "exec",
            &self.name,
            "curl",
            "-s",
            "-m",
            "5",
            "-o",
            "/dev/null",
        ]);
        cmd.args(["-w", "%{http_code}"]);
        for h in headers {
            cmd.args(["-H", h]);
        }
        let out = cmd.arg(url).output().expect("curl in the namespace");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for PeerNamespace {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.link])
            .status();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// An agent listening on every address answers `/metrics` to a client outside loopback but
/// refuses it `/api/*` (403) unless it sends the `--api-token-file` token; loopback clients keep
/// `/api/*` without one. The client is in a network namespace this test makes.
#[test]
fn api_is_refused_off_loopback_without_the_token() {
    if !require_root("api_is_refused_off_loopback_without_the_token") {
        return;
    }
    let Some(ns) = PeerNamespace::new() else {
        return;
    };
    let port = free_port();
    let _node = start_node(port);
    let token = "llm-probe-test-token-0123456789abcdef";
    let token_file = std::env::temp_dir().join(format!("llmp-token-{}", std::process::id()));
    std::fs::write(&token_file, format!("{token}\n")).expect("token file");
    let listen_port = free_port();
    let probe = Probe::start_on(
        &[
            "--port".into(),
            port.to_string(),
            "--api-token-file".into(),
            token_file.display().to_string(),
        ],
        &format!("0.0.0.0:{listen_port}"),
    );
    let base = format!("http://10.213.7.1:{listen_port}");
    let bearer = format!("Authorization: Bearer {token}");
    assert_eq!(ns.status(&format!("{base}/metrics"), &[]), "200");
    assert_eq!(ns.status(&format!("{base}/health"), &[]), "200");
    assert_eq!(ns.status(&format!("{base}/api/v1/requests"), &[]), "403");
    assert_eq!(
        ns.status(
            &format!("{base}/api/v1/requests"),
            &["Authorization: Bearer wrong-token-0000000000"]
        ),
        "403"
    );
    assert_eq!(ns.status(&format!("{base}/api/v1/memleak"), &[]), "403");
    assert_eq!(
        ns.status(&format!("{base}/api/v1/requests"), &[&bearer]),
        "200"
    );
    let (code, _) = http_get(&probe.addr, "/api/v1/requests").expect("loopback GET");
    assert_eq!(code, 200, "loopback needs no token");
    let _ = std::fs::remove_file(token_file);
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

/// With `--tls-cert`/`--tls-key` the endpoint speaks HTTPS only: curl with the certificate
/// gets `/metrics` and `/health`, a plain-HTTP client gets no answer. The certificate is made
/// here with openssl (self-signed, for 127.0.0.1).
#[test]
fn the_endpoint_serves_tls_when_given_a_certificate() {
    if !require_root("the_endpoint_serves_tls_when_given_a_certificate") {
        return;
    }
    let dir = std::env::temp_dir().join(format!("llmp-tls-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let made = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
        ])
        .args(["-nodes", "-days", "1", "-subj", "/CN=127.0.0.1"])
        .args(["-addext", "subjectAltName=IP:127.0.0.1"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("openssl");
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    let port = free_port();
    let _node = start_node(port);
    let listen = free_port();
    let mut agent = Proc::spawn(
        "llm-probe-tls",
        Command::new(tests::probe_bin())
            .args(["run", "--port", &port.to_string()])
            .args(["--listen", &format!("127.0.0.1:{listen}")])
            .arg("--tls-cert")
            .arg(&cert)
            .arg("--tls-key")
            .arg(&key),
    );
    let url = format!("https://127.0.0.1:{listen}");
    let curl = |path: &str| -> String {
        let out = Command::new("curl")
            .args([
                "-s",
                "-m",
                "5",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "--cacert",
            ])
            .arg(&cert)
            .arg(format!("{url}{path}"))
            .output()
            .expect("curl");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    wait_for("the HTTPS endpoint", Duration::from_secs(30), || {
        assert!(agent.alive(), "llm-probe exited:\n{}", agent.log_text());
        curl("/health") == "200"
    });
    assert_eq!(curl("/metrics"), "200");
    assert_eq!(curl("/api/v1/requests"), "200", "loopback needs no token");
    let plain = http_get(&format!("127.0.0.1:{listen}"), "/metrics");
    assert!(
        plain.as_ref().map_or(true, |(code, _)| *code != 200),
        "plain HTTP answered: {plain:?}"
    );
    drop(agent);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The shipped manifests, run as shipped: the `DaemonSet`'s container args and the systemd
/// unit's default and documented network command lines (with the engine port and the listen port
/// swapped for free ones) keep `/api/*` off the network. From another network namespace
/// `/metrics` answers where the listener is on the network, `/api/v1/requests` never does
/// without a token (403), and the unit's default listener is not reachable at all.
#[test]
fn shipped_manifests_keep_api_off_the_network() {
    if !require_root("shipped_manifests_keep_api_off_the_network") {
        return;
    }
    let Some(ns) = PeerNamespace::new() else {
        return;
    };
    let root = tests::workspace_root();
    let out = tests::output_ok(
        "reading the DaemonSet's args",
        Command::new(tests::python()).args([
            "-c",
            "import json, sys, yaml\n\
             for d in yaml.safe_load_all(open(sys.argv[1])):\n\
             \x20   if d and d.get('kind') == 'DaemonSet':\n\
             \x20       c = d['spec']['template']['spec']['containers'][0]\n\
             \x20       print(json.dumps([str(a) for a in c['args']]))",
            &root
                .join("deploy/kubernetes/daemonset.yaml")
                .display()
                .to_string(),
        ]),
    );
    let daemonset: Vec<String> =
        serde_json::from_slice(&out.stdout).expect("DaemonSet args as JSON");
    let unit =
        std::fs::read_to_string(root.join("deploy/systemd/llm-probe.service")).expect("unit");
    let unit_args = |prefix: &str| -> Vec<String> {
        let line = unit
            .lines()
            .find_map(|l| l.trim_start().strip_prefix(prefix))
            .unwrap_or_else(|| panic!("no {prefix} in the unit"));
        let words = line.trim_end_matches('"').split_whitespace();
        std::iter::once("run".to_owned())
            .chain(words.map(str::to_owned))
            .collect()
    };
    let cases = [
        ("DaemonSet", daemonset),
        ("unit default", unit_args("Environment=\"LLM_PROBE_ARGS=")),
        ("unit network example", unit_args("#   LLM_PROBE_ARGS=\"")),
    ];
    let port = free_port();
    let _node = start_node(port);
    for (what, args) in cases {
        assert_eq!(
            args.first().map(String::as_str),
            Some("run"),
            "{what}: {args:?}"
        );
        let i = args.iter().position(|a| a == "--listen").expect("--listen");
        let host = args[i + 1]
            .rsplit_once(':')
            .expect("host:port")
            .0
            .to_owned();
        let listen = format!("{host}:{}", free_port());
        let mut run: Vec<String> = Vec::new();
        let mut it = args.iter().skip(1).enumerate();
        while let Some((j, a)) = it.next() {
            if j + 1 == i {
                it.next(); // --listen's value: Probe::start_on passes ours
                continue;
            }
            run.push(a.replace("8000", &port.to_string()));
        }
        let probe = Probe::start_on(&run, &listen);
        let base = format!(
            "http://10.213.7.1:{}",
            listen.rsplit(':').next().unwrap_or_default()
        );
        let (metrics, api) = (
            ns.status(&format!("{base}/metrics"), &[]),
            ns.status(&format!("{base}/api/v1/requests"), &[]),
        );
        eprintln!(
            "{what}: llm-probe {} --listen {listen}: /metrics {metrics}, /api {api}",
            run.join(" ")
        );
        if host == "127.0.0.1" {
            assert_eq!((metrics.as_str(), api.as_str()), ("000", "000"), "{what}");
        } else {
            assert_eq!((metrics.as_str(), api.as_str()), ("200", "403"), "{what}");
        }
        let (code, _) = http_get(&probe.addr, "/api/v1/requests").expect("loopback GET");
        assert_eq!(code, 200, "{what}: loopback needs no token");
    }
}
