//! The request-level view: turns what the connection state machine observes into metric updates,
//! live gauges (queue depth, batch size, tokens/s) and a bounded log of recent finished requests
//! (timings only, never text) for `/api/v1/requests` and the demo summary.

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex},
};

use prometheus_client::metrics::histogram::Histogram;
use rustc_hash::FxHashMap;
use serde::Serialize;

use crate::{
    attribution::{self, Decode, EngineSide, GpuWait, StageThreads, Stages, StateSplit},
    http::{ConnId, Endpoint, Gap, Observer, ParseErrorKind, RequestMeta, RequestRecord},
    metrics::{
        ErrorLabels, KindLabels, ModelLabels, ReqLabels, RequestMetrics, StageLabels,
        StageOnlyLabels, StageStateLabels, StateLabels, StatusLabels,
    },
};

/// Distinct model label values admitted by default (`--max-models`); later ones are exported as
/// `other` (bounded cardinality).
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
    /// The TTFT split into stages that sum to `ttft_ns` (`crate::attribution`); `None` without a
    /// first token or when the read of the request's first bytes was not seen.
    pub stages_ns: Option<Stages>,
    /// How the hand-off that bounds `frontend`/`engine`/`output` was found
    /// (`attribution::HAND_OFF`: `id`, `time`, `none`); `None` without `stages_ns`.
    pub hand_off: Option<&'static str>,
    /// Stages split by the state of the thread doing the work; `None` when no stage could be.
    pub threads_ns: Option<StageThreads>,
    /// The engine stage's wait in CUDA synchronize calls of the serving process tree
    /// (`attribution::GpuWait`); `None` when no CUDA synchronize of that tree is on record.
    pub gpu_ns: Option<GpuWait>,
    /// The engine stage seen from the engine process's own IPC (`attribution::EngineSide`):
    /// the way there, the engine's own time with its thread's states, the way back; `None`
    /// unless the hand-off matched by id and the engine process's IPC carried the id.
    pub engine_ns: Option<EngineSide>,
    /// The gaps after the first token split into engine and output time (`attribution::Decode`);
    /// `None` without a second content event.
    pub decode_ns: Option<Decode>,
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
    /// Second (`CLOCK_MONOTONIC`) that `buckets[sec % N]` holds, per slot.
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

/// One exported model label with its cached metric handles and token window.
struct ModelEntry {
    label: String,
    /// TTFT/TBT handles per `Endpoint` (indexed by `Endpoint::slot`), created on first use so
    /// the hot path does no label hashing or allocation.
    handles: [Option<Handles>; Endpoint::SLOTS],
    window: TokenWindow,
}

impl ModelEntry {
    fn new(label: &str) -> Self {
        Self {
            label: label.to_owned(),
            handles: std::array::from_fn(|_| None),
            window: TokenWindow::default(),
        }
    }
}

/// Which `model` values get a label of their own. Any client can put any string in `model`, so a
/// name is admitted only when the server answered it with success (a 2xx status or a first token):
/// a flood of made-up names that the engine rejects with 404 takes no slot. With an allowlist
/// (`--model NAME`), exactly those names are admitted, from the start, and every other name is
/// `other` even when the server answers it (llama.cpp serves any name). The `other` and `unknown`
/// (no model field) labels always exist.
#[derive(Clone, Debug)]
pub struct ModelPolicy {
    pub allow: Vec<String>,
    /// Names admitted on success when there is no allowlist.
    pub max: usize,
}

impl Default for ModelPolicy {
    fn default() -> Self {
        Self {
            allow: Vec::new(),
            max: MAX_MODELS,
        }
    }
}

/// Index of the `unknown` (no model field) and `other` (over `MAX_MODELS`) entries.
const UNKNOWN: usize = 0;
const OTHER: usize = 1;

pub struct RequestStats {
    metrics: RequestMetrics,
    policy: ModelPolicy,
    /// Raw model name → index in `entries`; at most `MAX_MODELS` names.
    names: FxHashMap<String, usize>,
    entries: Vec<ModelEntry>,
    waiting: i64,
    streaming: i64,
    seq: u64,
    recent: SharedRecent,
    /// Connections the state machine gave up on; the agent removes them from the kernel map.
    pub untrack: Vec<ConnId>,
    /// Kernel timestamp of the record being processed (set by the agent before each dispatch),
    /// so live token counts land in the right second of the window.
    pub now_ns: u64,
    /// Times of first tokens since the agent last looked (engine steps before them are prefill
    /// steps); drained by the agent after every record.
    pub first_tokens: Vec<u64>,
    /// The traced processes' recent IPC, for the frontend / engine / output split.
    pub ipc: attribution::IpcLog,
    /// The traced process trees' recent CUDA synchronize calls, for the engine stage's GPU wait.
    pub gpu: attribution::GpuLog,
    /// The decode split of each streaming request so far, by connection and request (`seq`:
    /// HTTP/2 streams one connection's responses together); taken at its end.
    decode: FxHashMap<(ConnId, u64), Decode>,
    /// `llm_tbt_stage_seconds_total` for `engine` and `output`, looked up once (a gap is a hot
    /// path event: no label hashing per gap).
    tbt_stage: [TbtCounter; 2],
    /// `llm_tbt_thread_seconds_total` per `attribution::STATES`, looked up once as well.
    tbt_thread: [TbtCounter; 4],
}

type TbtCounter = prometheus_client::metrics::counter::Counter<f64, std::sync::atomic::AtomicU64>;

impl RequestStats {
    pub fn new(metrics: RequestMetrics, recent: SharedRecent) -> Self {
        let tbt_stage = ["engine", "output"].map(|stage| {
            metrics
                .tbt_stage
                .get_or_create(&StageOnlyLabels { stage })
                .clone()
        });
        let tbt_thread = attribution::STATES.map(|state| {
            metrics
                .tbt_thread
                .get_or_create(&StateLabels { state })
                .clone()
        });
        Self {
            metrics,
            policy: ModelPolicy::default(),
            names: FxHashMap::default(),
            entries: vec![ModelEntry::new("unknown"), ModelEntry::new("other")],
            waiting: 0,
            streaming: 0,
            seq: 0,
            recent,
            untrack: Vec::new(),
            now_ns: 0,
            first_tokens: Vec::new(),
            ipc: attribution::IpcLog::default(),
            gpu: attribution::GpuLog::default(),
            decode: FxHashMap::default(),
            tbt_stage,
            tbt_thread,
        }
    }

    /// Replace the admission policy; allowlisted names are admitted now.
    pub fn set_policy(&mut self, policy: ModelPolicy) {
        for name in &policy.allow {
            self.admit(name);
        }
        self.policy = policy;
    }

    fn admit(&mut self, name: &str) -> usize {
        if let Some(&i) = self.names.get(name) {
            return i;
        }
        self.entries
            .push(ModelEntry::new(&crate::metrics::label_value(name)));
        let i = self.entries.len() - 1;
        self.names.insert(name.to_owned(), i);
        i
    }

    /// The model label of a request: its own once admitted (see `ModelPolicy`), `unknown` without
    /// a model field, `other` otherwise. `succeeded`: the server answered it with success.
    fn entry(&mut self, meta: &RequestMeta, succeeded: bool) -> usize {
        let Some(m) = meta.model.as_deref() else {
            return UNKNOWN;
        };
        if let Some(&i) = self.names.get(m) {
            return i;
        }
        if !succeeded || !self.policy.allow.is_empty() || self.names.len() >= self.policy.max {
            return OTHER;
        }
        self.admit(m)
    }

    fn handles(&mut self, i: usize, endpoint: Endpoint) -> &Handles {
        let metrics = &self.metrics;
        let e = &mut self.entries[i];
        e.handles[endpoint.slot()].get_or_insert_with(|| {
            let labels = ReqLabels {
                model: e.label.clone(),
                endpoint: endpoint.as_str(),
            };
            Handles {
                ttft: metrics.ttft.get_or_create(&labels).clone(),
                tbt: metrics.tbt.get_or_create(&labels).clone(),
            }
        })
    }

    /// Refresh the sliding-window gauges; called about once a second.
    pub fn tick(&mut self, now_ns: u64) {
        for e in &self.entries {
            if e.window.secs.iter().any(|&s| s != 0) {
                self.metrics
                    .tokens_per_second
                    .get_or_create(&ModelLabels {
                        model: e.label.clone(),
                    })
                    .set(e.window.rate(now_ns));
            }
        }
    }

    pub fn queue_depth(&self) -> i64 {
        self.waiting
    }

    pub fn batch_size(&self) -> i64 {
        self.streaming
    }
}

impl RequestStats {
    /// One request's TTFT stages into `llm_ttft_stage_seconds` (`frontend` and `output` only
    /// when IPC split the server's time), its GPU wait into `llm_ttft_gpu_wait_seconds` and its
    /// serving thread's states (or `unknown`) into `llm_ttft_stage_thread_seconds_total`, for
    /// the `server` span and for each stage of the histogram.
    fn observe_stages(&self, model: &str, b: &attribution::Breakdown) {
        self.metrics
            .hand_off
            .get_or_create(&crate::metrics::ByLabels {
                by: b.hand_off_by(),
            })
            .inc();
        for (stage, ns) in b.stages.named() {
            if !b.handed_off && (stage == "frontend" || stage == "output") {
                continue;
            }
            self.metrics
                .ttft_stage
                .get_or_create(&StageLabels {
                    model: model.to_owned(),
                    stage,
                })
                .observe(ns as f64 / 1e9);
        }
        if let Some(w) = b.gpu {
            self.metrics
                .ttft_gpu_wait
                .get_or_create(&ModelLabels {
                    model: model.to_owned(),
                })
                .observe(w.sync_wait as f64 / 1e9);
        }
        let (t, st) = (b.threads, &b.stages);
        let spans = [
            (attribution::SERVER_SPAN, t.map(|t| t.server), st.server()),
            ("frontend", t.and_then(|t| t.frontend), st.frontend),
            ("engine", t.and_then(|t| t.engine), st.engine),
            ("output", t.and_then(|t| t.output), st.output),
        ];
        for (stage, split, span) in spans {
            if !b.handed_off && (stage == "frontend" || stage == "output") {
                continue;
            }
            self.count_states(stage, split, span);
        }
        if let Some(e) = b.engine_side {
            self.count_states(attribution::ENGINE_PROCESS, e.threads, e.in_engine);
        }
    }

    /// `span` ns of `stage` by its thread split, or all `unknown` without one.
    fn count_states(&self, stage: &'static str, split: Option<StateSplit>, span: u64) {
        let states = match split {
            Some(s) => [s.on_cpu, s.runnable, s.blocked, 0],
            None => [0, 0, 0, span],
        };
        for (state, ns) in attribution::STATES.into_iter().zip(states) {
            if ns > 0 {
                self.metrics
                    .ttft_stage_thread
                    .get_or_create(&StageStateLabels { stage, state })
                    .inc_by(ns as f64 / 1e9);
            }
        }
    }
}

impl Observer for RequestStats {
    fn request_started(&mut self, _conn: ConnId, _meta: &RequestMeta, _arrival_ns: u64) {
        self.waiting += 1;
        self.metrics.queue_depth.set(self.waiting);
    }

    fn first_token(&mut self, _conn: ConnId, meta: &RequestMeta, ttft_ns: u64) {
        // Content came back: the server accepted the request, and its model may take a slot.
        let i = self.entry(meta, true);
        if let Some(ep) = meta.endpoint {
            self.handles(i, ep).ttft.observe(ttft_ns as f64 / 1e9);
        }
        let now = self.now_ns;
        self.entries[i].window.add(now, 1);
        if self.first_tokens.len() < 1024 {
            self.first_tokens.push(now);
        }
        self.waiting -= 1;
        self.streaming += 1;
        self.metrics.queue_depth.set(self.waiting);
        self.metrics.batch_size.set(self.streaming);
    }

    fn token_gap(&mut self, conn: ConnId, meta: &RequestMeta, gap: Gap) {
        let i = self.entry(meta, true);
        if let Some(ep) = meta.endpoint {
            self.handles(i, ep).tbt.observe(gap.ns() as f64 / 1e9);
        }
        let now = self.now_ns;
        // One map lookup per gap; past the connection cap a gap is still split and counted.
        let mut spare = Decode::default();
        let d = if self.decode.len() < crate::http::conn::MAX_CONNS_TRACKED {
            self.decode.entry((conn, meta.seq)).or_default()
        } else {
            self.decode.get_mut(&(conn, meta.seq)).unwrap_or(&mut spare)
        };
        let split = d.add_gap((&self.ipc, &self.gpu), conn.tgid, &gap);
        self.metrics
            .tbt_return
            .get_or_create(&crate::metrics::ByLabels { by: split.by })
            .inc();
        let by_stage = self.tbt_stage.iter().zip([split.engine, split.output]);
        let by_state = self.tbt_thread.iter().zip(split.threads.values());
        for (counter, ns) in by_stage.chain(by_state) {
            if ns > 0 {
                counter.inc_by(ns as f64 / 1e9);
            }
        }
        if let Some(ns) = split.gpu_sync.filter(|&ns| ns > 0) {
            self.metrics.tbt_gpu_wait.inc_by(ns as f64 / 1e9);
        }
        self.entries[i].window.add(now, 1);
    }

    fn request_finished(&mut self, r: RequestRecord) {
        let decode = self.decode.remove(&(r.conn, r.meta.seq));
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
        let succeeded =
            r.first_token_ns.is_some() || r.status.is_some_and(|s| (200..300).contains(&s));
        let i = self.entry(&r.meta, succeeded);
        let model = self.entries[i].label.clone();
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
        let breakdown = attribution::ttft(&r, &self.ipc, &self.gpu);
        if let Some(b) = &breakdown {
            self.observe_stages(&model, b);
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
        self.entries[i]
            .window
            .add(r.end_ns, tokens.saturating_sub(r.content_events));
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
            stages_ns: breakdown.map(|b| b.stages),
            hand_off: breakdown.map(|b| b.hand_off_by()),
            threads_ns: breakdown.and_then(|b| b.threads),
            gpu_ns: breakdown.and_then(|b| b.gpu),
            engine_ns: breakdown.and_then(|b| b.engine_side),
            decode_ns: decode,
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

    fn budget_dropped(&mut self, _conn: ConnId, what: &'static str) {
        self.metrics
            .budget_dropped
            .get_or_create(&crate::metrics::WhatLabels { what })
            .inc();
    }
}

#[cfg(test)]
mod tests;
