//! gRPC: a Python grpcio server-streaming service (`tests/fixtures/servers/grpc_llm.py`, the C
//! core's own HTTP/2 over plain sockets). Per-message TTFT and gaps within 1 ms of an `h2` client
//! that runs four concurrent calls on one connection per round; the method path is the endpoint;
//! a non-zero `grpc-status` is an error outcome and a cancelled call a client abort. Needs root
//! (eBPF) and the venv of `cargo xtask setup` (grpcio).

use std::{net::TcpStream, process::Command, time::Duration};

use serde_json::{json, Value};
use tests::{
    client::Req,
    free_port, grpc_llm_py,
    h2_client::H2Conn,
    metric_sum, python, require_root,
    traffic::{by_id, compare, records, timing_rounds_with},
    wait_for, Probe, Proc,
};

const METHOD: &str = "/llm.Generator/Generate";

fn call(id: &str, body: &Value) -> Req {
    Req {
        path: METHOD.into(),
        body: body.to_string(),
        request_id: id.into(),
        abort_after: None,
        timeout: Duration::from_secs(30),
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

#[test]
fn grpcio_streaming_agrees_with_the_client() {
    if !require_root("grpcio_streaming_agrees_with_the_client") {
        return;
    }
    let py = python();
    assert!(py.exists(), "run `cargo xtask setup` first");
    let port = free_port();
    let server = Proc::spawn(
        "grpc-llm",
        Command::new(&py).arg(grpc_llm_py()).arg(port.to_string()),
    );
    wait_for("the grpcio server", Duration::from_mins(1), || {
        TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    let addr = format!("127.0.0.1:{port}");
    // Warm the server on a connection of its own runtime, closed before the probe attaches.
    let warm = runtime().block_on(async {
        let conn = H2Conn::connect(&addr, false).await.expect("h2 connection");
        conn.grpc(&call("warm", &json!({"n": 2}))).await
    });
    assert!(warm.error.is_none(), "{warm:?}\n{}", server.log_text());
    assert_eq!(warm.grpc_status, Some(0), "{warm:?}");

    let probe = Probe::start(&["--port".into(), port.to_string()]);
    let rt = runtime();
    let pace = |i: u64| json!({"model": "m1", "n": 8, "ttft_ms": 60 + 7 * i, "gap_ms": 20 + 3 * i});
    let all = timing_rounds_with(&probe, 4, 20, |round| {
        rt.block_on(async {
            let conn = H2Conn::connect(&addr, false).await.expect("h2 connection");
            let tasks: Vec<_> = (0..4)
                .map(|i| {
                    let r = call(&format!("grpc-{round}-{i}"), &pace(i));
                    let c = conn.clone();
                    tokio::spawn(async move { c.grpc(&r).await })
                })
                .collect();
            let mut out = Vec::new();
            for t in tasks {
                let s = t.await.expect("client task");
                assert_eq!(s.grpc_status, Some(0), "{s:?}");
                out.push(s);
            }
            out
        })
    });
    let recs = records(&probe, all.len());
    for s in &all {
        let r = by_id(&recs, &s.request_id);
        assert_eq!(r["endpoint"], METHOD, "{r}");
        assert_eq!(r["model"], "m1", "{r}");
        eprintln!(
            "{}: TTFT probe {:.3} ms (socket queue {:.3} ms), client {:.3} ms; |probe - client| \
             max {:.3} ms",
            s.request_id,
            r["ttft_ns"].as_f64().unwrap_or(0.0) / 1e6,
            r["stages_ns"]["socket_queue"].as_f64().unwrap_or(0.0) / 1e6,
            s.ttft_ns.unwrap_or(0) as f64 / 1e6,
            compare(s, r)
        );
    }

    // A call that fails with INTERNAL after two messages, and one the client cancels.
    let (failed, cancelled) = rt.block_on(async {
        let conn = H2Conn::connect(&addr, false).await.expect("h2 connection");
        let f = call("grpc-fail", &json!({"n": 2, "gap_ms": 10, "fail": 13}));
        let mut c = call("grpc-cancel", &json!({"n": 8, "gap_ms": 30}));
        c.abort_after = Some(2);
        let done = tokio::join!(conn.grpc(&f), conn.grpc(&c));
        // The connection's task sends the cancel only while this runtime runs.
        tokio::time::sleep(Duration::from_millis(300)).await;
        done
    });
    assert_eq!(failed.grpc_status, Some(13), "{failed:?}");
    assert!(cancelled.aborted, "{cancelled:?}");
    let recs = records(&probe, all.len() + 2);
    let f = by_id(&recs, "grpc-fail");
    assert_eq!(
        (f["outcome"].as_str(), f["content_events"].as_u64()),
        (Some("server_error"), Some(2)),
        "{f}"
    );
    assert_eq!(
        by_id(&recs, "grpc-cancel")["outcome"],
        "client_abort",
        "{recs:?}"
    );

    let m = probe.metrics();
    assert!(
        metric_sum(&m, "llm_requests_total", &[("endpoint", METHOD)]) >= all.len() as f64,
        "{m}"
    );
    for kind in ["not_http", "bad_h2", "truncated_capture"] {
        assert_eq!(
            metric_sum(&m, "llm_probe_parse_errors_total", &[("kind", kind)]),
            0.0,
            "{kind}: {m}"
        );
    }
    assert_eq!(metric_sum(&m, "llm_probe_events_lost_total", &[]), 0.0);
}
