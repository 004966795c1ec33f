//! The agent's HTTP face: `/metrics` (Prometheus text), `/health` (JSON verdict), and
//! `/api/v1/requests` (recent finished requests: timings and ids, never text).

use std::{convert::Infallible, net::SocketAddr, sync::Arc};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{
    body::Incoming, header, server::conn::http1, service::service_fn, Request, Response, StatusCode,
};
use hyper_util::rt::TokioIo;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

use crate::{health::SharedHealth, requests::SharedRecent};

/// What the handlers read. `refresh` pulls kernel-side counters into the registry before a scrape.
pub struct ServerState {
    pub registry: Registry,
    pub recent: SharedRecent,
    pub health: SharedHealth,
    pub refresh: Box<dyn Fn() + Send + Sync>,
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
    (state.refresh)();
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
            (state.refresh)();
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
        "/" => reply(
            StatusCode::OK,
            "text/plain",
            "llm-probe: /metrics (Prometheus), /health (JSON verdict), /api/v1/requests (recent requests)\n",
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
