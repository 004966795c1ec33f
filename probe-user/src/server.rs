//! The agent's HTTP face: `/metrics` (Prometheus text), `/health` (JSON verdict),
//! `/api/v1/requests` (recent finished requests: timings and ids, never text) and
//! `/api/v1/memleak` (the GPU memory ledger). Reads snapshots the agent keeps current; never
//! imports the agent or the system side (kernel counters reach `/metrics` through the registry's
//! collectors).

use std::{convert::Infallible, net::SocketAddr, sync::Arc};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{
    body::Incoming, header, server::conn::http1, service::service_fn, Request, Response, StatusCode,
};
use hyper_util::rt::TokioIo;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

use crate::{
    cuda::{
        ledger::Symbolize,
        state::{symbolize_report, SharedCuda},
    },
    health::SharedHealth,
    requests::SharedRecent,
};

/// Where the agent serves by default: loopback only.
pub const DEFAULT_LISTEN: std::net::SocketAddr = std::net::SocketAddr::V4(
    std::net::SocketAddrV4::new(std::net::Ipv4Addr::LOCALHOST, 9464),
);

/// What the handlers read.
pub struct ServerState {
    pub registry: Registry,
    pub recent: SharedRecent,
    pub health: SharedHealth,
    /// The GPU memory ledger (`/api/v1/memleak`); `None` in tests without CUDA state.
    pub cuda: Option<SharedCuda>,
    /// Names call sites for `/api/v1/memleak`, outside the ledger's lock.
    pub symbolizer: std::sync::Mutex<Box<dyn Symbolize + Send>>,
}

fn reply(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    if let Ok(v) = header::HeaderValue::from_str(content_type) {
        r.headers_mut().insert(header::CONTENT_TYPE, v);
    }
    r
}

pub fn render_metrics(state: &ServerState) -> String {
    let mut out = String::with_capacity(64 * 1024);
    if prometheus_client::encoding::text::encode(&mut out, &state.registry).is_err() {
        out.clear();
    }
    out
}

fn handle(state: &ServerState, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    match req.uri().path() {
        "/metrics" => reply(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            render_metrics(state),
        ),
        "/health" => {
            let (code, body) = match (state.health.lock(), state.recent.lock()) {
                (Ok(h), Ok(r)) => h.verdict(&r),
                _ => (StatusCode::INTERNAL_SERVER_ERROR, "{}".to_owned()),
            };
            reply(code, "application/json", body)
        }
        "/api/v1/requests" => {
            let body = state.recent.lock().map_or_else(
                |_| "{}".to_owned(),
                |r| {
                    serde_json::json!({"finished_total": r.finished_total, "requests": r.items})
                        .to_string()
                },
            );
            reply(StatusCode::OK, "application/json", body)
        }
        "/api/v1/memleak" => memleak(state, req.uri().query().unwrap_or("")),
        "/" => reply(
            StatusCode::OK,
            "text/plain",
            "llm-probe: /metrics (Prometheus), /health (JSON verdict), /api/v1/requests (recent \
             requests), /api/v1/memleak?pid=PID&older_than=30s&top=10 (GPU memory ledger)\n",
        ),
        _ => reply(StatusCode::NOT_FOUND, "text/plain", "not found\n"),
    }
}

/// Serve until the task is dropped.
pub async fn serve(listener: TcpListener, state: Arc<ServerState>) {
    loop {
        let (stream, _peer): (_, SocketAddr) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                log::warn!("accept on the metrics listener failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let state = state.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(handle(&state, &req)) }
            });
            if let Err(e) = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await
            {
                log::debug!("metrics connection: {e}");
            }
        });
    }
}

/// `/api/v1/memleak?pid=PID[&older_than=30s][&top=10]`: the ledger's report for one process, or
/// without `pid` the list of processes the ledger knows.
fn memleak(state: &ServerState, query: &str) -> Response<Full<Bytes>> {
    let Some(cuda) = &state.cuda else {
        return reply(StatusCode::NOT_FOUND, "text/plain", "no CUDA ledger\n");
    };
    let mut pid = None;
    let mut older_than = std::time::Duration::from_secs(30);
    let mut top = 10usize;
    for kv in query.split('&').filter(|s| !s.is_empty()) {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        let bad = |what: &str| {
            reply(
                StatusCode::BAD_REQUEST,
                "text/plain",
                format!("bad {what}: {v:?}\n"),
            )
        };
        match k {
            "pid" => match v.parse() {
                Ok(p) => pid = Some(p),
                Err(_) => return bad("pid"),
            },
            "older_than" => match humantime::parse_duration(v) {
                Ok(d) => older_than = d,
                Err(_) => return bad("older_than (e.g. 30s, 5m)"),
            },
            "top" => match v.parse() {
                Ok(t) => top = t,
                Err(_) => return bad("top"),
            },
            _ => {}
        }
    }
    let (mut report, exited) = {
        let Ok(mut c) = cuda.lock() else {
            return reply(
                StatusCode::INTERNAL_SERVER_ERROR,
                "text/plain",
                "ledger lock poisoned\n",
            );
        };
        let Some(pid) = pid else {
            let body = serde_json::json!({ "pids": c.pids() }).to_string();
            return reply(StatusCode::OK, "application/json", body);
        };
        let now = probe_common::clock::monotonic_ns();
        let r = c.report(pid, now, older_than.as_nanos() as u64, top);
        (r, std::mem::take(&mut c.exited))
    };
    if let Ok(mut sym) = state.symbolizer.lock() {
        for p in exited {
            sym.forget(p);
        }
        symbolize_report(&mut report, &mut **sym);
    }
    let body = serde_json::to_string(&report).unwrap_or_else(|_| "{}".to_owned());
    reply(StatusCode::OK, "application/json", body)
}
