//! What users feel, per model and endpoint: `llm_ttft_seconds`, `llm_tbt_seconds`,
//! `llm_request_duration_seconds`, `llm_requests_total`, `llm_error_total`, token counters and
//! rates, the probe's own view of queue depth and batch size, and the TTFT stage breakdown
//! (`llm_ttft_stage_seconds`, `llm_ttft_stage_thread_seconds_total`, `llm_ttft_gpu_wait_seconds`;
//! see `crate::attribution`). Updated by `crate::requests::RequestStats`.

use std::sync::atomic::AtomicU64;

use prometheus_client::{
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

use super::{
    ByLabels, ErrorLabels, F64Gauge, HistFamily, KindLabels, ModelLabels, ReqLabels, StageLabels,
    StageOnlyLabels, StageStateLabels, StateLabels, StatusLabels, WhatLabels, DURATION_BUCKETS,
    TBT_BUCKETS, TTFT_BUCKETS,
};

fn ttft() -> Histogram {
    Histogram::new(TTFT_BUCKETS.iter().copied())
}
fn tbt() -> Histogram {
    Histogram::new(TBT_BUCKETS.iter().copied())
}
fn duration() -> Histogram {
    Histogram::new(DURATION_BUCKETS.iter().copied())
}

/// The request families. Cheap to clone (families are `Arc`s inside).
#[derive(Clone)]
pub struct RequestMetrics {
    pub ttft: HistFamily<ReqLabels>,
    /// TTFT stages per request (`attribution::STAGES`).
    pub ttft_stage: HistFamily<StageLabels>,
    /// Seconds of TTFT stages by the state of the thread doing the work.
    pub ttft_stage_thread: Family<StageStateLabels, Counter<f64, AtomicU64>>,
    /// The engine stage's wait in CUDA synchronize calls, per request (`attribution::GpuWait`).
    pub ttft_gpu_wait: HistFamily<ModelLabels>,
    /// Requests with a TTFT breakdown by how their hand-off was found (`attribution::HAND_OFF`).
    pub hand_off: Family<ByLabels, Counter>,
    /// Gaps between tokens split into stages, by how their return was found (`HAND_OFF`).
    pub tbt_return: Family<ByLabels, Counter>,
    /// Seconds between tokens by stage (`engine`, `output`).
    pub tbt_stage: Family<StageOnlyLabels, Counter<f64, AtomicU64>>,
    /// Seconds of the gaps' engine part spent waiting in CUDA synchronize calls.
    pub tbt_gpu_wait: Counter<f64, AtomicU64>,
    /// Seconds between tokens by the state of the thread that wrote both ends of each gap.
    pub tbt_thread: Family<StateLabels, Counter<f64, AtomicU64>>,
    pub tbt: HistFamily<ReqLabels>,
    pub duration: HistFamily<StatusLabels>,
    pub requests: Family<StatusLabels, Counter>,
    pub errors: Family<ErrorLabels, Counter>,
    pub tokens_per_second: Family<ModelLabels, F64Gauge>,
    pub generated_tokens: Family<ModelLabels, Counter>,
    pub prompt_tokens: Family<ModelLabels, Counter>,
    pub queue_depth: Gauge,
    pub batch_size: Gauge,
    /// `llm_probe_parse_errors_total{kind}`: traffic the HTTP parser could not read.
    pub parse_errors: Family<KindLabels, Counter>,
    /// `llm_probe_budget_dropped_total{what}`: buffers the memory budget took back.
    pub budget_dropped: Family<WhatLabels, Counter>,
}

/// What the memory budget dropped (`http::Observer::budget_dropped`).
pub const BUDGET_DROPS: [&str; 3] = ["request_body", "response_body", "gaps"];

impl RequestMetrics {
    pub fn new(registry: &mut Registry) -> Self {
        let m = Self {
            ttft: Family::new_with_constructor(ttft),
            ttft_stage: Family::new_with_constructor(ttft),
            ttft_stage_thread: Family::default(),
            ttft_gpu_wait: Family::new_with_constructor(ttft),
            hand_off: Family::default(),
            tbt_return: Family::default(),
            tbt_stage: Family::default(),
            tbt_gpu_wait: Counter::default(),
            tbt_thread: Family::default(),
            tbt: Family::new_with_constructor(tbt),
            duration: Family::new_with_constructor(duration),
            requests: Family::default(),
            errors: Family::default(),
            tokens_per_second: Family::default(),
            generated_tokens: Family::default(),
            prompt_tokens: Family::default(),
            queue_depth: Gauge::default(),
            batch_size: Gauge::default(),
            parse_errors: Family::default(),
            budget_dropped: Family::default(),
        };
        registry.register(
            "llm_ttft_seconds",
            "Time to first token: request bytes reaching the server's socket to the write of the \
             first response event carrying generated content",
            m.ttft.clone(),
        );
        registry.register(
            "llm_ttft_stage_seconds",
            "Time to first token split into stages that add up to it: socket_queue (bytes on the \
             socket until the server read them), frontend (that read until the hand-off to the \
             engine process), engine (until its output came back), output (until the first \
             content write); single-process servers: engine only; docs/attribution.md",
            m.ttft_stage.clone(),
        );
        registry.register(
            "llm_ttft_stage_thread_seconds",
            "Seconds of TTFT by the scheduler state of the thread that read the request and \
             wrote its first token: on_cpu, runnable (waiting for a CPU), blocked, or unknown \
             (its clock not known at both ends of the span); stage=server is frontend + engine \
             + output, the other stages are each of them; stage=engine_process is the engine \
             process's own part of engine (its first receive to its first send of the request's \
             id), by the state of its thread that made both (do not sum over stage)",
            m.ttft_stage_thread.clone(),
        );
        for state in crate::attribution::STATES {
            let _ = m.ttft_stage_thread.get_or_create(&StageStateLabels {
                stage: crate::attribution::SERVER_SPAN,
                state,
            });
        }
        registry.register(
            "llm_ttft_gpu_wait_seconds",
            "Part of the engine stage of TTFT during which the serving process tree waited for \
             the GPU in CUDA synchronize calls (union over its threads); only requests of trees \
             with CUDA probes live and a synchronize call on record",
            m.ttft_gpu_wait.clone(),
        );
        registry.register(
            "llm_ttft_hand_off",
            "Requests whose TTFT was split into stages, by how the hand-off to the engine process \
             and the return were found: id (the request's own id in the IPC bytes: exact under \
             overlap), time (the nearest IPC times: a bound under overlap), none (no IPC: a \
             single-process server, all engine)",
            m.hand_off.clone(),
        );
        for by in crate::attribution::HAND_OFF {
            let _ = m.hand_off.get_or_create(&ByLabels { by });
        }
        registry.register(
            "llm_tbt_return",
            "Gaps between content events split into stages, by how the engine's output that \
             ended each one was found: id (the last IPC receive in the gap that carried the \
             request's id), time (the last IPC receive in the gap: a bound under overlap), none \
             (no IPC in the gap: all engine)",
            m.tbt_return.clone(),
        );
        for by in crate::attribution::HAND_OFF {
            let _ = m.tbt_return.get_or_create(&ByLabels { by });
        }
        registry.register(
            "llm_tbt_stage_seconds",
            "Seconds between content events split at the front process's last IPC receive inside \
             each gap: engine (waiting for the engine process's next output), output (the front \
             end turning it into the write); single-process servers: engine only",
            m.tbt_stage.clone(),
        );
        for stage in ["engine", "output"] {
            let _ = m.tbt_stage.get_or_create(&StageOnlyLabels { stage });
        }
        registry.register(
            "llm_tbt_gpu_wait_seconds",
            "Seconds of the engine part of the gaps between content events (llm_tbt_stage_seconds \
             {stage=\"engine\"}) during which the serving process tree waited for the GPU in CUDA \
             synchronize calls; counted only with the CUDA probes live",
            m.tbt_gpu_wait.clone(),
        );
        registry.register(
            "llm_tbt_thread_seconds",
            "Seconds between content events by the scheduler state of the thread that wrote both \
             events of each gap: on_cpu, runnable (waiting for a CPU), blocked, or unknown (two \
             threads, or a clock not known yet); adds up to the llm_tbt_seconds sums",
            m.tbt_thread.clone(),
        );
        for state in crate::attribution::STATES {
            let _ = m.tbt_thread.get_or_create(&StateLabels { state });
        }
        registry.register(
            "llm_tbt_seconds",
            "Time between tokens: gap between successive content events of a streamed response",
            m.tbt.clone(),
        );
        registry.register(
            "llm_request_duration_seconds",
            "End-to-end request duration: request bytes reaching the socket to the last response \
             byte written",
            m.duration.clone(),
        );
        // prometheus-client appends `_total` to counters.
        registry.register(
            "llm_requests",
            "Requests finished, by outcome",
            m.requests.clone(),
        );
        registry.register(
            "llm_error",
            "Requests that ended in an error, by error type",
            m.errors.clone(),
        );
        registry.register(
            "llm_tokens_per_second",
            "Generated tokens per second over the last 10 s",
            m.tokens_per_second.clone(),
        );
        registry.register(
            "llm_generated_tokens",
            "Generated tokens (usage.completion_tokens when reported, else one per streamed token event)",
            m.generated_tokens.clone(),
        );
        registry.register(
            "llm_prompt_tokens",
            "Prompt tokens, when the server reports usage",
            m.prompt_tokens.clone(),
        );
        registry.register(
            "llm_queue_depth",
            "Requests received that have no first token yet",
            m.queue_depth.clone(),
        );
        registry.register(
            "llm_batch_size",
            "Requests streaming tokens now",
            m.batch_size.clone(),
        );
        registry.register(
            "llm_probe_parse_errors",
            "Bytes on traced sockets that could not be parsed, by kind",
            m.parse_errors.clone(),
        );
        registry.register(
            "llm_probe_budget_dropped",
            "Parser buffers given back because the memory budget (--memory-budget) was spent, by \
             what they held: a request body's first bytes (its model may then be unknown), a \
             response event or JSON body in progress, a request's kept gap list",
            m.budget_dropped.clone(),
        );
        for what in BUDGET_DROPS {
            let _ = m.budget_dropped.get_or_create(&WhatLabels { what });
        }
        for kind in crate::http::ParseErrorKind::ALL {
            let _ = m.parse_errors.get_or_create(&KindLabels {
                kind: kind.as_str(),
            });
        }
        m
    }
}
