//! The agent's HTTP face: `/metrics` (Prometheus text), `/health` (JSON verdict),
//! `/api/v1/requests` (recent finished requests: timings and ids, never text),
//! `/api/v1/memleak` (the GPU memory ledger), `/api/v1/threads` (traced threads' totals) and
//! `/api/v1/steps` (recent CUDA engine steps).
//! Reads snapshots the agent keeps current; never imports the agent or the system side (kernel
//! counters reach `/metrics` through the registry's collectors).

use std::{convert::Infallible, net::SocketAddr, sync::Arc};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{
    body::Incoming, header, server::conn::http1, service::service_fn, Request, Response, StatusCode,
};
use hyper_util::rt::TokioIo;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::{
    cuda::{
        ledger::Symbolize,
        state::{symbolize_report, SharedCuda},
    },
    health::SharedHealth,
    requests::SharedRecent,
    threads::SharedThreads,
};

/// Where the agent serves by default: loopback only.
pub const DEFAULT_LISTEN: std::net::SocketAddr = std::net::SocketAddr::V4(
    std::net::SocketAddrV4::new(std::net::Ipv4Addr::LOCALHOST, 9464),
);

mod slots;

/// Connections served at once. Prometheus keeps one, an operator a few: 64 leaves room for both
/// while a flood of idle connections cannot take the agent's fds (the open-file limit, 1024 under
/// systemd by default, is shared with the /proc reads that keep targets attached). When all are
/// taken, a new connection gets the slot of the one idle the longest (`server/slots.rs`).
pub const MAX_CONNECTIONS: usize = 64;
/// A request head must arrive within this; a client that sends nothing is dropped.
pub const HEADER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
/// Finished requests one `/api/v1/requests` answer holds at most (`?limit=`).
pub const MAX_REQUESTS_PAGE: usize = 1000;

/// Why `--tls-cert`/`--tls-key` could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading PEM: {0}")]
    Pem(#[from] rustls_pki_types::pem::Error),
    #[error("the certificate file holds no certificate")]
    NoCertificate,
    #[error("TLS: {0}")]
    Rustls(#[from] tokio_rustls::rustls::Error),
}

/// A TLS acceptor for the endpoint from PEM text: the certificate chain (leaf first) and its
/// private key (PKCS#8, PKCS#1 or SEC1). TLS 1.2 and 1.3 with rustls' safe defaults (ring).
pub fn tls_acceptor(cert_pem: &[u8], key_pem: &[u8]) -> Result<TlsAcceptor, TlsError> {
    use rustls_pki_types::{pem::PemObject as _, CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_slice_iter(cert_pem).collect::<Result<Vec<_>, _>>()?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate);
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem)?;
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let config = tokio_rustls::rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Who may read `/api/*` (request ids and per-token timings of other people's requests, the GPU
/// ledger): clients on loopback always; others only with the bearer token, when one is set.
/// `/metrics` and `/health` are open to whoever reaches the listener, as with any exporter.
#[derive(Clone, Debug, Default)]
pub struct Access {
    /// `--api-token-file`: the token a non-loopback client must send as `Authorization: Bearer`.
    pub token: Option<String>,
}

impl Access {
    /// May `peer`, sending `authorization`, read `/api/*`?
    pub fn api_allowed(&self, peer: SocketAddr, authorization: Option<&[u8]>) -> bool {
        if peer.ip().is_loopback() {
            return true;
        }
        let (Some(token), Some(sent)) = (&self.token, authorization) else {
            return false;
        };
        let want = format!("Bearer {token}");
        // Compared in full, in constant time for equal lengths.
        sent.len() == want.len()
            && sent
                .iter()
                .zip(want.as_bytes())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0
    }
}

/// What the handlers read.
pub struct ServerState {
    pub access: Access,
    pub registry: Registry,
    pub recent: SharedRecent,
    /// Every traced thread's totals (`/api/v1/threads`).
    pub threads: SharedThreads,
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

fn handle(state: &ServerState, peer: SocketAddr, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    if path.starts_with("/api/") {
        let auth = req
            .headers()
            .get(header::AUTHORIZATION)
            .map(header::HeaderValue::as_bytes);
        if !state.access.api_allowed(peer, auth) {
            return reply(
                StatusCode::FORBIDDEN,
                "text/plain",
                "/api/* is served to loopback clients, and to others with the bearer token of \
                 --api-token-file\n",
            );
        }
    }
    match path {
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
        "/api/v1/requests" => requests_page(state, req.uri().query().unwrap_or("")),
        "/api/v1/memleak" => memleak(state, req.uri().query().unwrap_or("")),
        "/api/v1/steps" => steps_page(state, req.uri().query().unwrap_or("")),
        "/api/v1/threads" => {
            let body = state.threads.lock().map_or_else(
                |_| "{}".to_owned(),
                |t| serde_json::to_string(&*t).unwrap_or_else(|_| "{}".to_owned()),
            );
            reply(StatusCode::OK, "application/json", body)
        }
        "/" => reply(
            StatusCode::OK,
            "text/plain",
            "llm-probe: /metrics (Prometheus), /health (JSON verdict), /api/v1/requests (recent \
             requests), /api/v1/memleak?pid=PID&older_than=30s&top=10 (GPU memory ledger), \
             /api/v1/threads (traced threads' on-CPU / runnable / blocked totals), \
             /api/v1/steps?after=SEQ (recent CUDA engine steps)\n",
        ),
        _ => reply(StatusCode::NOT_FOUND, "text/plain", "not found\n"),
    }
}

/// `limit` (default and cap `max`) and `after` (default 0) of a paged `/api/*` query, or the
/// 400 answer to a value that is not a number.
#[expect(
    clippy::result_large_err,
    reason = "the error is the answer, built once"
)]
fn page_query(query: &str, max: usize) -> Result<(usize, u64), Response<Full<Bytes>>> {
    let mut limit = max;
    let mut after = 0u64;
    for kv in query.split('&').filter(|s| !s.is_empty()) {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        let parsed = match k {
            "limit" => v.parse().map(|n: usize| limit = n.min(max)),
            "after" => v.parse().map(|n| after = n),
            _ => Ok(()),
        };
        if parsed.is_err() {
            return Err(reply(
                StatusCode::BAD_REQUEST,
                "text/plain",
                format!("bad {k}: {v:?} (a number)\n"),
            ));
        }
    }
    Ok((limit, after))
}

/// `/api/v1/requests[?limit=N][&after=SEQ]`: the newest `limit` finished requests (default and
/// cap `MAX_REQUESTS_PAGE`) with a sequence number above `after`, oldest first.
fn requests_page(state: &ServerState, query: &str) -> Response<Full<Bytes>> {
    let (limit, after) = match page_query(query, MAX_REQUESTS_PAGE) {
        Ok(q) => q,
        Err(r) => return r,
    };
    let body = state.recent.lock().map_or_else(
        |_| "{}".to_owned(),
        |r| {
            let newer = r.items.iter().filter(|v| v.seq > after);
            let n = newer.clone().count();
            let page = RequestsPage {
                finished_total: r.finished_total,
                requests: newer.skip(n.saturating_sub(limit)).collect(),
            };
            // Serialised straight from the records: `json!` would first build a `Value` tree,
            // ~32 bytes per number, 36 MiB of peak memory for a 5 MiB page of 1,000 long
            // streams' gaps (measured with `cargo xtask bench --only longstreams`).
            serde_json::to_string(&page).unwrap_or_else(|_| "{}".to_owned())
        },
    );
    reply(StatusCode::OK, "application/json", body)
}

/// Steps one `/api/v1/steps` answer holds at most (`?limit=`).
pub const MAX_STEPS_PAGE: usize = 4096;

/// `/api/v1/steps[?after=SEQ][&limit=N]`: CUDA engine steps released after `after`, oldest first,
/// at most `limit` (default and cap `MAX_STEPS_PAGE`); `newest` is the last step's sequence
/// number (page on from the last `seq` until the list is empty). Without CUDA probes: no steps.
fn steps_page(state: &ServerState, query: &str) -> Response<Full<Bytes>> {
    let (limit, after) = match page_query(query, MAX_STEPS_PAGE) {
        Ok(q) => q,
        Err(r) => return r,
    };
    #[derive(serde::Serialize)]
    struct StepsPage<'a> {
        newest: u64,
        steps: Vec<&'a crate::cuda::steps::StepView>,
    }
    const EMPTY: &str = r#"{"newest":0,"steps":[]}"#;
    let body = match state.cuda.as_ref().map(|c| c.lock()) {
        Some(Ok(c)) => serde_json::to_string(&StepsPage {
            newest: c.recent_steps.newest(),
            steps: c.recent_steps.after(after, limit).collect(),
        })
        .unwrap_or_else(|_| EMPTY.to_owned()),
        _ => EMPTY.to_owned(),
    };
    reply(StatusCode::OK, "application/json", body)
}

#[derive(serde::Serialize)]
struct RequestsPage<'a> {
    finished_total: u64,
    requests: Vec<&'a crate::requests::RequestView>,
}

/// Serve until the task is dropped: at most `MAX_CONNECTIONS` at once (a full house evicts the
/// longest-idle connection), each request head (and the TLS handshake, with `tls`) within
/// `HEADER_TIMEOUT`.
pub async fn serve(listener: TcpListener, state: Arc<ServerState>, tls: Option<TlsAcceptor>) {
    let slots = slots::Slots::new(MAX_CONNECTIONS);
    loop {
        let (stream, peer): (_, SocketAddr) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                log::warn!("accept on the metrics listener failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let Some(slot) = slots.acquire().map(Arc::new) else {
            log::debug!("{MAX_CONNECTIONS} connections busy: closing the one from {peer}");
            drop(stream);
            continue;
        };
        let state = state.clone();
        let tls = tls.clone();
        let conn_slot = slot.clone();
        let task = tokio::spawn(async move {
            let svc_slot = conn_slot.clone();
            let svc = service_fn(move |req| {
                let state = state.clone();
                let slot = svc_slot.clone();
                async move {
                    slot.request_started();
                    let resp = handle(&state, peer, &req);
                    slot.request_done();
                    Ok::<_, Infallible>(resp)
                }
            });
            let mut http = http1::Builder::new();
            http.timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT);
            let served = match tls {
                None => http.serve_connection(TokioIo::new(stream), svc).await,
                Some(acceptor) => {
                    match tokio::time::timeout(HEADER_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(stream)) => http.serve_connection(TokioIo::new(stream), svc).await,
                        Ok(Err(e)) => {
                            log::debug!("TLS handshake with {peer}: {e}");
                            return;
                        }
                        Err(_) => {
                            log::debug!("TLS handshake with {peer}: timed out");
                            return;
                        }
                    }
                }
            };
            if let Err(e) = served {
                log::debug!("metrics connection: {e}");
            }
            drop(conn_slot);
        });
        slot.set_task(task.abort_handle());
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
