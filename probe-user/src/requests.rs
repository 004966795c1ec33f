//! The request-level view: turns what the connection state machine observes into metric updates,
//! live gauges (queue depth, batch size, tokens/s) and a bounded log of recent finished requests
//! (timings only, never text) for `/api/v1/requests` and the demo summary.

use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, Mutex},
};

use prometheus_client::metrics::histogram::Histogram;
use serde::Serialize;

use crate::{
    http::{ConnId, Endpoint, Observer, ParseErrorKind, RequestMeta, RequestRecord},
    metrics::{ErrorLabels, KindLabels, Metrics, ModelLabels, ReqLabels, StatusLabels},
};

/// Distinct model label values; later ones are exported as `other` (bounded cardinality).
pub const MAX_MODELS: usize = 32;
/// Finished requests kept for `/api/v1/requests` (≈ 4096 × (100 B + gaps) of memory at most).
pub const RECENT_KEPT: usize = 4096;
/// Window of `llm_tokens_per_second`, in one-second buckets.
pub const TOKEN_WINDOW_S: usize = 10;

/// A finished request as `/api/v1/requests` shows it.
#[derive(Clone, Debug, Serialize)]
pub struct RequestView {
    pub seq: u64,
    pub pid: u32,
    pub fd: u32,
    pub endpoint: &'static str,
    pub model: Option<String>,
    pub stream: Option<bool>,
    pub request_id: Option<String>,
    pub status: Option<u16>,
    pub outcome: &'static str,
    pub arrival_ns: u64,
    pub ttft_ns: Option<u64>,
    pub duration_ns: u64,
    pub content_events: u64,
    pub tokens: u64,
    pub prompt_tokens: Option<u64>,
    pub completion_tokens: Option<u64>,
    pub gaps_ns: Vec<u64>,
}

/// Recent finished requests, shared with the HTTP server.
#[derive(Default)]
pub struct Recent {
    pub finished_total: u64,
    pub items: VecDeque<RequestView>,
}

pub type SharedRecent = Arc<Mutex<Recent>>;

struct Handles {
    ttft: Histogram,
    tbt: Histogram,
}

/// Per-model tokens in one-second buckets over the last `TOKEN_WINDOW_S` seconds.
#[derive(Default)]
struct TokenWindow {
    buckets: [u64; TOKEN_WINDOW_S],
    /// Second (CLOCK_MONOTONIC) that `buckets[sec % N]` holds, per slot.
    secs: [u64; TOKEN_WINDOW_S],
}

impl TokenWindow {
    fn add(&mut self, ts_ns: u64, n: u64) {
        let sec = ts_ns / 1_000_000_000;
        let i = (sec % TOKEN_WINDOW_S as u64) as usize;
        if self.secs[i] != sec {
            self.secs[i] = sec;
            self.buckets[i] = 0;
        }
        self.buckets[i] += n;
    }

    /// Tokens per second over the full seconds before `now_ns` (the current second is partial).
    fn rate(&self, now_ns: u64) -> f64 {
        let now = now_ns / 1_000_000_000;
        let lo = now.saturating_sub(TOKEN_WINDOW_S as u64);
        let sum: u64 = (0..TOKEN_WINDOW_S)
            .filter(|&i| self.secs[i] >= lo && self.secs[i] < now)
            .map(|i| self.buckets[i])
            .sum();
        sum as f64 / TOKEN_WINDOW_S as f64
    }
}

pub struct RequestStats {
    metrics: Metrics,
    models: Vec<String>,
    handles: HashMap<Endpoint, HashMap<String, Handles>>,
    windows: HashMap<String, TokenWindow>,
    waiting: i64,
    streaming: i64,
    seq: u64,
    recent: SharedRecent,
    /// Connections the state machine gave up on; the agent removes them from the kernel map.
    pub untrack: Vec<ConnId>,
    /// Kernel timestamp of the record being processed (set by the agent before each dispatch),
    /// so live token counts land in the right second of the window.
    pub now_ns: u64,
}

impl RequestStats {
    pub fn new(metrics: Metrics, recent: SharedRecent) -> Self {
        Self {
            metrics,
            models: Vec::new(),
            handles: HashMap::new(),
            windows: HashMap::new(),
            waiting: 0,
            streaming: 0,
            seq: 0,
            recent,
            untrack: Vec::new(),
            now_ns: 0,
        }
    }

    /// Bounded model label: the first `MAX_MODELS` names as themselves, then `other`.
    fn model_label(&mut self, meta: &RequestMeta) -> String {
        let Some(m) = meta.model.as_deref() else {
            return "unknown".to_owned();
        };
        if self.models.iter().any(|k| k == m) {
            return m.to_owned();
        }
        if self.models.len() < MAX_MODELS {
            self.models.push(m.to_owned());
            return m.to_owned();
        }
        "other".to_owned()
    }

    fn model_str<'a>(&self, meta: &'a RequestMeta) -> &'a str {
        match meta.model.as_deref() {
            None => "unknown",
            Some(m) if self.models.iter().any(|k| k == m) => m,
            Some(_) => "other",
        }
    }

    fn handles(&mut self, meta: &RequestMeta) -> Option<&Handles> {
        let endpoint = meta.endpoint?;
        let model = self.model_str(meta).to_owned();
        let per = self.handles.entry(endpoint).or_default();
        if !per.contains_key(&model) {
            let labels = ReqLabels {
                model: model.clone(),
                endpoint: endpoint.as_str(),
            };
            let h = Handles {
                ttft: self.metrics.ttft.get_or_create(&labels).clone(),
                tbt: self.metrics.tbt.get_or_create(&labels).clone(),
            };
            per.insert(model.clone(), h);
        }
        per.get(&model)
    }

    fn add_tokens(&mut self, meta: &RequestMeta, ts_ns: u64, n: u64) {
        let model = self.model_str(meta);
        if let Some(w) = self.windows.get_mut(model) {
            w.add(ts_ns, n);
        } else {
            let mut w = TokenWindow::default();
            w.add(ts_ns, n);
            self.windows.insert(model.to_owned(), w);
        }
    }

    /// Refresh the sliding-window gauges; called about once a second.
    pub fn tick(&mut self, now_ns: u64) {
        for (model, w) in &self.windows {
            self.metrics
                .tokens_per_second
                .get_or_create(&ModelLabels {
                    model: model.clone(),
                })
                .set(w.rate(now_ns));
        }
    }

    pub fn queue_depth(&self) -> i64 {
        self.waiting
    }

    pub fn batch_size(&self) -> i64 {
        self.streaming
    }
}

impl Observer for RequestStats {
    fn request_started(&mut self, _conn: ConnId, meta: &RequestMeta, _arrival_ns: u64) {
        // Register the model name now so that every later event of this request agrees on it.
        let _ = self.model_label(meta);
        self.waiting += 1;
        self.metrics.queue_depth.set(self.waiting);
    }

    fn first_token(&mut self, _conn: ConnId, meta: &RequestMeta, ttft_ns: u64) {
        if let Some(h) = self.handles(meta) {
            h.ttft.observe(ttft_ns as f64 / 1e9);
        }
        self.add_tokens(meta, self.now_ns, 1);
        self.waiting -= 1;
        self.streaming += 1;
        self.metrics.queue_depth.set(self.waiting);
        self.metrics.batch_size.set(self.streaming);
    }

    fn token_gap(&mut self, _conn: ConnId, meta: &RequestMeta, gap_ns: u64) {
        if let Some(h) = self.handles(meta) {
            h.tbt.observe(gap_ns as f64 / 1e9);
        }
        self.add_tokens(meta, self.now_ns, 1);
    }

    fn request_finished(&mut self, r: RequestRecord) {
        if r.first_token_ns.is_some() {
            self.streaming -= 1;
        } else {
            self.waiting -= 1;
        }
        self.metrics.queue_depth.set(self.waiting);
        self.metrics.batch_size.set(self.streaming);
        let Some(endpoint) = r.meta.endpoint else {
            return;
        };
        let model = self.model_str(&r.meta).to_owned();
        let status = r.outcome.as_str();
        let labels = StatusLabels {
            model: model.clone(),
            endpoint: endpoint.as_str(),
            status,
        };
        let duration_ns = r.end_ns.saturating_sub(r.arrival_ns);
        self.metrics.requests.get_or_create(&labels).inc();
        self.metrics
            .duration
            .get_or_create(&labels)
            .observe(duration_ns as f64 / 1e9);
        if r.outcome.is_error() {
            let e = ErrorLabels {
                model: model.clone(),
                endpoint: endpoint.as_str(),
                error_type: status,
            };
            self.metrics.errors.get_or_create(&e).inc();
        }
        let tokens = r.tokens();
        let ml = ModelLabels { model };
        self.metrics
            .generated_tokens
            .get_or_create(&ml)
            .inc_by(tokens);
        if let Some(p) = r.prompt_tokens {
            self.metrics.prompt_tokens.get_or_create(&ml).inc_by(p);
        }
        // Content events were already counted into the window as they streamed.
        self.add_tokens(&r.meta, r.end_ns, tokens.saturating_sub(r.content_events));
        self.seq += 1;
        let view = RequestView {
            seq: self.seq,
            pid: r.conn.tgid,
            fd: r.conn.fd,
            endpoint: endpoint.as_str(),
            model: r.meta.model.clone(),
            stream: r.meta.stream,
            request_id: r.meta.request_id.clone(),
            status: r.status,
            outcome: status,
            arrival_ns: r.arrival_ns,
            ttft_ns: r.first_token_ns.map(|t| t.saturating_sub(r.arrival_ns)),
            duration_ns,
            content_events: r.content_events,
            tokens,
            prompt_tokens: r.prompt_tokens,
            completion_tokens: r.completion_tokens,
            gaps_ns: r.gaps_ns,
        };
        if let Ok(mut recent) = self.recent.lock() {
            recent.finished_total += 1;
            if recent.items.len() >= RECENT_KEPT {
                recent.items.pop_front();
            }
            recent.items.push_back(view);
        }
    }

    fn parse_error(&mut self, _conn: ConnId, kind: ParseErrorKind) {
        self.metrics
            .parse_errors
            .get_or_create(&KindLabels {
                kind: kind.as_str(),
            })
            .inc();
    }

    fn untrack(&mut self, conn: ConnId) {
        self.untrack.push(conn);
    }
}
