//! A second server stack (Node.js `http`: libuv writes chunked bodies with writev) with delays the
//! test controls: exact timing, error outcomes, client aborts, Ollama NDJSON, usage chunks,
//! pipelining, keep-alive connections opened before attach, and bad input. Needs root (eBPF).

use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
    time::Duration,
};

use serde_json::json;
use tests::{
    free_port, http_get, metric_sum, node_under_probe, node_under_probe_with, require_root,
    start_node, steal_ticks,
    traffic::{by_id, chat_body, chat_req, compare, records, req, run_concurrent, run_one},
    Probe,
};

fn ms(ns: &serde_json::Value) -> f64 {
    ns.as_f64().unwrap_or(f64::NAN) / 1e6
}

#[test]
fn node_exact_timing_matches_controlled_delays_and_client() {
    let Some(served) = node_under_probe("node_exact_timing") else {
        return;
    };
    // The server's own delays are checked on every round; the agreement with the reference
    // client (≤ 1 ms) gets one re-measured round when the shared 2-core VM delays the client
    // itself (seen once: the client read a first token 1.5 ms after the probe saw it written,
    // under vCPU steal), and further ones (up to four) while the host took CPU time from the VM,
    // as in the llama.cpp accuracy test. Every round is printed.
    for round in 0..4 {
        let steal = steal_ticks();
        let (exact, batched) = timing_round(&served, round);
        let steal = steal_ticks() - steal;
        eprintln!(
            "round {round}: |probe - client| {exact:.3} ms (80/25 ms server), {batched:.3} ms \
             (3 events per write); vCPU steal {steal} ticks"
        );
        if exact <= 1.0 && batched <= 1.0 {
            return;
        }
        if round >= 1 && steal == 0 {
            break; // the host took nothing: the disagreement is not the VM's noise
        }
    }
    panic!("probe and client disagree by more than 1 ms in every round (above)");
}

/// One round of the exact-timing test: the server's delays asserted, and the probe-client
/// differences (ms) of the two requests returned.
fn timing_round(served: &tests::NodeUnderProbe, round: u32) -> (f64, f64) {
    let (id1, id2) = (format!("exact-{round}"), format!("batched-{round}"));
    let extra = json!({"ttft_ms": 80, "gap_ms": 25, "usage": true});
    let s = run_one(&served.addr, chat_req(&id1, "m1", true, 10, &extra));
    let batched = json!({"ttft_ms": 10, "gap_ms": 5, "batch": 3});
    let b = run_one(&served.addr, chat_req(&id2, "m1", true, 9, &batched));
    let recs = records(&served.probe, 2 * (round as usize + 1));

    let r = by_id(&recs, &id1);
    let ttft = ms(&r["ttft_ns"]);
    let gaps: Vec<f64> = r["gaps_ns"]
        .as_array()
        .expect("gaps")
        .iter()
        .map(ms)
        .collect();
    eprintln!("node: server waits 80 ms then 25 ms per token; probe TTFT {ttft:.3} ms, gaps {gaps:.3?} ms");
    // The first token cannot come before the server's 80 ms wait; the upper bound leaves room for
    // a loaded CI machine. libuv arms timers from its cached loop time, so one gap can come out up
    // to ~1 ms short of 25 ms (24.69 ms seen); their mean cannot.
    // (Loose above: Node itself was late on a loaded 2-core VM, 115.6 ms seen: 10.4 ms before it
    // read the request, 105 ms to its first write; `compare` holds the probe to the client.)
    assert!(
        (80.0..180.0).contains(&ttft),
        "ttft {ttft} ms for a server that waits 80 ms: {r}"
    );
    for &g in &gaps {
        assert!(
            (23.0..40.0).contains(&g),
            "gap {g} ms for a server that waits 25 ms: {r}"
        );
    }
    let mean = gaps.iter().sum::<f64>() / gaps.len() as f64;
    assert!((24.5..30.0).contains(&mean), "mean gap {mean} ms: {r}");
    assert_eq!(
        r["content_events"], 10,
        "role-only first chunk and usage chunk are not content: {r}"
    );
    assert_eq!(r["completion_tokens"], 10);
    assert_eq!(r["prompt_tokens"], 7);
    assert_eq!(r["model"], "m1");
    let exact = compare(&s, r);

    // Three events per write: gaps of 0 inside a write are real and reported.
    let r = by_id(&recs, &id2);
    assert_eq!(r["content_events"], 9, "{r}");
    let zeros = r["gaps_ns"]
        .as_array()
        .expect("gaps")
        .iter()
        .filter(|g| g.as_u64() == Some(0))
        .count();
    assert_eq!(zeros, 6, "{r}");
    (exact, compare(&b, r))
}

#[test]
fn node_errors_aborts_and_ollama() {
    // The requests run concurrently and the 503 may finish before any m2 request succeeded: a
    // name answered only with errors so far is `other` (made-up names take no label slot), so
    // the allowlist names m2 for the per-model assertions below.
    let Some(served) = node_under_probe_with("node_errors_aborts_and_ollama", &["--model", "m2"])
    else {
        return;
    };
    let mut abort = chat_req("abort", "m2", true, 20, &json!({"gap_ms": 40}));
    abort.abort_after = Some(3);
    let reqs = vec![
        chat_req("http503", "m2", true, 5, &json!({"fail": "503"})),
        chat_req(
            "streamerr",
            "m2",
            true,
            5,
            &json!({"fail": "stream_error", "fail_after": 2}),
        ),
        chat_req(
            "reset",
            "m2",
            true,
            5,
            &json!({"fail": "reset", "fail_after": 2, "gap_ms": 5}),
        ),
        req(
            "/api/generate",
            json!({"model": "m2", "prompt": "x", "max_tokens": 6, "gap_ms": 3}).to_string(),
            "ollama",
        ),
        chat_req("nonstream", "m2", false, 4, &json!({"ttft_ms": 20})),
        abort,
    ];
    let samples = run_concurrent(&served.addr, reqs);
    let recs = records(&served.probe, samples.len());
    let outcome = |id: &str| {
        by_id(&recs, id)["outcome"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    };
    assert_eq!(outcome("http503"), "server_error");
    assert_eq!(by_id(&recs, "http503")["status"], 503);
    assert_eq!(outcome("streamerr"), "stream_error");
    assert_eq!(outcome("reset"), "server_reset");
    assert_eq!(outcome("abort"), "client_abort");
    assert_eq!(outcome("ollama"), "ok");
    assert_eq!(outcome("nonstream"), "ok");
    let o = by_id(&recs, "ollama");
    assert_eq!(
        (
            o["content_events"].as_u64(),
            o["completion_tokens"].as_u64()
        ),
        (Some(6), Some(6)),
        "{o}"
    );
    let n = by_id(&recs, "nonstream");
    assert_eq!(n["completion_tokens"], 4, "{n}");
    assert!(ms(&n["ttft_ns"]) >= 20.0, "{n}");
    let a = by_id(&recs, "abort");
    assert_eq!(a["content_events"], 3, "events before the abort: {a}");

    let m = served.probe.metrics();
    for (kind, n) in [
        ("server_error", 1.0),
        ("stream_error", 1.0),
        ("server_reset", 1.0),
        ("client_abort", 1.0),
    ] {
        assert_eq!(
            metric_sum(
                &m,
                "llm_error_total",
                &[("error_type", kind), ("model", "m2")]
            ),
            n,
            "{kind}:\n{m}"
        );
    }
    assert_eq!(
        metric_sum(&m, "llm_requests_total", &[("model", "m2")]),
        6.0
    );
}

#[test]
fn node_pipelining_keepalive_before_attach_and_bad_input() {
    if !require_root("node_pipelining_keepalive_before_attach_and_bad_input") {
        return;
    }
    let port = free_port();
    let _node = start_node(port);
    let addr = format!("127.0.0.1:{port}");
    // A keep-alive connection that exists before the probe attaches.
    let mut early = TcpStream::connect(&addr).expect("connect");
    early
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let one = |id: &str| {
        let body = chat_body("m3", true, 3, &json!({}));
        format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Request-Id: {id}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
    };
    let read_until_done = |s: &mut TcpStream, n: usize| {
        let mut all = Vec::new();
        let mut buf = [0u8; 8192];
        while all.windows(5).filter(|w| w == b"0\r\n\r\n").count() < n {
            let k = s.read(&mut buf).expect("read");
            assert!(k > 0, "server closed");
            all.extend_from_slice(&buf[..k]);
        }
    };
    early
        .write_all(one("before-attach").as_bytes())
        .expect("write");
    read_until_done(&mut early, 1);

    let mut probe = Probe::start(&["--port".into(), port.to_string()]);
    assert!(
        probe
            .proc
            .log_text()
            .contains("1 open connection(s) picked up"),
        "{}",
        probe.proc.log_text()
    );
    for i in 0..3 {
        early
            .write_all(one(&format!("keepalive-{i}")).as_bytes())
            .expect("write");
        read_until_done(&mut early, 1);
    }
    // Two requests in one write (pipelining) on a fresh connection.
    let mut p = TcpStream::connect(&addr).expect("connect");
    p.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    p.write_all(format!("{}{}", one("pipe-a"), one("pipe-b")).as_bytes())
        .expect("write");
    read_until_done(&mut p, 2);
    // Non-LLM paths are not requests.
    assert_eq!(http_get(&addr, "/health").expect("health").0, 200);
    assert_eq!(http_get(&addr, "/metrics").expect("metrics").0, 200);
    // Bad input: garbage, a TLS hello, a malformed request line, an oversized header.
    for junk in [
        b"\x00\x01\x02garbage\xff\xfe\r\n\r\n".to_vec(),
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03".to_vec(),
        b"GET\r\n\r\n".to_vec(),
        format!(
            "POST /v1/chat/completions HTTP/1.1\r\nX-Big: {}\r\n\r\n",
            "a".repeat(20_000)
        )
        .into_bytes(),
    ] {
        let mut s = TcpStream::connect(&addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let _ = s.write_all(&junk);
        let _ = s.read(&mut [0u8; 1024]);
    }
    let recs = records(&probe, 5);
    std::thread::sleep(Duration::from_millis(300));
    let (total, recs_now) = probe.requests();
    assert_eq!(
        total, 5,
        "keepalive-0..2 + pipe-a + pipe-b and nothing else: {recs_now:#?}"
    );
    for id in [
        "keepalive-0",
        "keepalive-1",
        "keepalive-2",
        "pipe-a",
        "pipe-b",
    ] {
        let r = by_id(&recs, id);
        assert_eq!(
            (r["outcome"].as_str(), r["content_events"].as_u64()),
            (Some("ok"), Some(3)),
            "{r}"
        );
    }
    // The junk connections' records may still be in flight on a loaded host: wait (bounded)
    // for them to be counted, then assert on one page so a failure shows everything.
    let counted = |m: &str| {
        metric_sum(m, "llm_probe_parse_errors_total", &[]) >= 3.0
            && metric_sum(
                m,
                "llm_probe_capture_incomplete_total",
                &[("reason", "truncated")],
            ) >= 1.0
    };
    let start = std::time::Instant::now();
    while !counted(&probe.metrics()) && start.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(100));
    }
    let m = probe.metrics();
    let errors = metric_sum(&m, "llm_probe_parse_errors_total", &[]);
    assert!(errors >= 3.0, "bad input counted:\n{m}");
    assert!(
        metric_sum(
            &m,
            "llm_probe_capture_incomplete_total",
            &[("reason", "truncated")]
        ) >= 1.0,
        "the 20 KB header was captured truncated, and that is counted:\n{m}"
    );
    assert!(probe.proc.alive(), "the probe survived bad input");
    assert_eq!(probe.health().0, 200);
}

/// A traced server with many listening ports besides its API port, as an engine whose workers
/// hold collective-communication ports (each vLLM worker about 13 of gloo's; eight workers over
/// 100). The probe attaches and reads its requests. With the kernel's port map at 64 entries the
/// agent refused to start ("map full").
#[test]
fn a_server_with_many_listening_ports_is_traced() {
    let Some(served) =
        tests::node_with_args_under_probe("many_listening_ports", &["--listeners", "100"], &[])
    else {
        return;
    };
    let s = run_one(
        &served.addr,
        chat_req("many-ports", "m", true, 3, &json!({"gap_ms": 5})),
    );
    assert!(s.error.is_none(), "{:?}", s.error);
    let recs = records(&served.probe, 1);
    let rec = by_id(&recs, "many-ports");
    assert_eq!(rec["outcome"], "ok", "{rec}");
    assert_eq!(rec["content_events"], 3, "{rec}");
}
