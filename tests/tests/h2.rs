//! HTTP/2: a Node `http2` server (its compatibility API over the same handlers as the HTTP/1
//! mock) as prior-knowledge h2c and as `h2` chosen by ALPN over TLS (Node's own OpenSSL, read
//! through the SSL uprobes). Per-stream TTFT and gaps within 1 ms of an `h2` client that runs
//! four concurrent streams on one connection per round; a stream the client cancels
//! (`RST_STREAM`) is a client abort, and the connection's other streams go on. Needs root (eBPF).

use std::{net::TcpStream, process::Command, time::Duration};

use serde_json::{json, Value};
use tests::{
    free_port,
    h2_client::H2Conn,
    metric_sum, mock_llm_js, require_root,
    tls_client::self_signed_cert,
    traffic::{by_id, chat_req, compare, records, timing_rounds_with},
    wait_for, Probe, Proc,
};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

fn node_h2(tls: bool) {
    let port = free_port();
    let mut cmd = Command::new("node");
    cmd.arg(mock_llm_js()).arg(port.to_string()).arg("--h2");
    let certs = tls.then(|| self_signed_cert("h2"));
    if let Some(c) = &certs {
        cmd.arg("--tls").arg(&c.cert).arg(&c.key);
    }
    let node = Proc::spawn(if tls { "node-h2-tls" } else { "node-h2c" }, &mut cmd);
    wait_for("the node http2 server", Duration::from_mins(1), || {
        TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    let addr = format!("127.0.0.1:{port}");
    let rt = runtime();
    // Node's first HTTP/2 streams run cold (its round 0 was 1.6 ms late at the client): warm it.
    // Its own runtime, dropped with the connection: one joined mid-stream would count as not_http.
    let warm = runtime().block_on(async {
        let conn = H2Conn::connect(&addr, tls).await.expect("h2 connection");
        let r = chat_req("warm", "m1", true, 4, &json!({"gap_ms": 5}));
        conn.exchange(&r).await
    });
    assert!(warm.error.is_none(), "{warm:?}\n{}", node.log_text());
    let probe = Probe::start(&["--port".into(), port.to_string()]);
    // Streams paced apart (their events do not reach the client in the same few µs, where the
    // `h2` crate's reads would date one stream's event by the next one's segment).
    let pace = |i: u64| json!({"ttft_ms": 60 + 7 * i, "gap_ms": 20 + 3 * i, "usage": true});
    let extra = pace(0);
    let all = timing_rounds_with(&probe, 4, 20, |round| {
        rt.block_on(async {
            let conn = H2Conn::connect(&addr, tls).await.expect("h2 connection");
            let tasks: Vec<_> = (0..4)
                .map(|i| {
                    let r = chat_req(&format!("h2-{round}-{i}"), "m1", true, 8, &pace(i));
                    let c = conn.clone();
                    tokio::spawn(async move { c.exchange(&r).await })
                })
                .collect();
            let mut out = Vec::new();
            for t in tasks {
                out.push(t.await.expect("client task"));
            }
            out
        })
    });
    let recs = records(&probe, all.len());
    for s in &all {
        let r = by_id(&recs, &s.request_id);
        let ttft = r["ttft_ns"].as_f64().unwrap_or(0.0) / 1e6;
        // Not before the server's wait. The upper bound is loose: a loaded 2-core VM makes Node
        // itself late (124 ms seen for an 81 ms wait: 13.6 ms before it read the request, ~30 ms
        // gaps for 29 ms timers); the agreement with the client (above) holds the probe to 1 ms.
        assert!(
            (60.0..180.0).contains(&ttft),
            "TTFT {ttft:.3} ms for a server that waits 60 to 81 ms: {r}"
        );
        assert_eq!(r["model"], "m1", "{r}");
        // Streams of one connection keep their own decode split: it adds up to their own gaps.
        let gaps: u64 = r["gaps_ns"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_u64)
            .sum();
        let d = &r["decode_ns"];
        let split = d["engine"].as_u64().unwrap_or(0) + d["output"].as_u64().unwrap_or(0);
        assert_eq!(split, gaps, "{r}");
        eprintln!(
            "{}: probe TTFT {ttft:.3} ms (client {:.3}), |probe - client| max {:.3} ms",
            s.request_id,
            s.ttft_ns.unwrap_or(0) as f64 / 1e6,
            compare(s, r)
        );
    }

    // A cancelled stream next to one that completes, on one connection.
    let (cancelled, done) = rt.block_on(async {
        let conn = H2Conn::connect(&addr, tls).await.expect("h2 connection");
        let mut a = chat_req("h2-cancel", "m1", true, 8, &extra);
        a.abort_after = Some(2);
        let b = chat_req("h2-beside", "m1", true, 4, &extra);
        tokio::join!(conn.exchange(&a), conn.exchange(&b))
    });
    assert!(cancelled.aborted, "{cancelled:?}");
    assert!(done.error.is_none(), "{done:?}");
    let recs = records(&probe, all.len() + 2);
    // One connection per round, and the one above.
    let connections = all.len() / 4 + 1;
    assert_eq!(
        by_id(&recs, "h2-cancel")["outcome"],
        "client_abort",
        "{recs:?}"
    );
    let beside = by_id(&recs, "h2-beside");
    assert_eq!(beside["outcome"], "ok", "{beside}");
    assert_eq!(beside["content_events"], 4, "{beside}");

    let m = probe.metrics();
    for kind in ["not_http", "bad_h2", "truncated_capture", "tls_unreadable"] {
        assert_eq!(
            metric_sum(&m, "llm_probe_parse_errors_total", &[("kind", kind)]),
            0.0,
            "{kind}: {m}\n{}",
            node.log_text()
        );
    }
    if tls {
        // The server's preface (SETTINGS) may be written before the client's preface is read:
        // that write comes before its SSL* is tied to the connection and is counted, nothing else.
        let unmatched = |d| metric_sum(&m, "llm_probe_tls_unmatched_total", &[("direction", d)]);
        assert_eq!(unmatched("read"), 0.0, "{m}");
        assert!(unmatched("write") <= connections as f64, "{m}");
    }
    assert_eq!(metric_sum(&m, "llm_probe_events_lost_total", &[]), 0.0);
}

#[test]
fn node_h2c_streams_agree_with_the_client() {
    if require_root("node_h2c_streams_agree_with_the_client") {
        node_h2(false);
    }
}

#[test]
fn node_h2_over_tls_agrees_with_the_client() {
    if require_root("node_h2_over_tls_agrees_with_the_client") {
        node_h2(true);
    }
}
