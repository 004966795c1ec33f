//! Metric families (prometheus-client), named and bucketed after the seed catalog
//! (`llm_*`, ../shared/reference/001_*.txt) plus the probe's self-metrics (`llm_probe_*`).

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

/// Catalog TTFT buckets, with three finer ones below 50 ms so small and fast engines still get
/// meaningful quantiles. Every catalog boundary is kept, so catalog thresholds line up.
pub const TTFT_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0,
];
/// Catalog TBT buckets, with three finer ones below 10 ms (same reason).
pub const TBT_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.07, 0.1, 0.15, 0.2,
];
/// Catalog request-duration buckets, with 10 ms and 50 ms added below.
pub const DURATION_BUCKETS: &[f64] = &[0.01, 0.05, 0.1, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReqLabels {
    pub model: String,
    pub endpoint: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabels {
    pub model: String,
    pub endpoint: &'static str,
    pub status: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub model: String,
    pub endpoint: &'static str,
    pub error_type: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelLabels {
    pub model: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProgramLabels {
    pub program: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PidLabels {
    pub pid: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BuildLabels {
    pub version: &'static str,
    pub aya: &'static str,
}

fn hist(buckets: &'static [f64]) -> impl Fn() -> Histogram + Clone {
    move || Histogram::new(buckets.iter().copied())
}

type HistFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn ttft() -> Histogram {
    hist(TTFT_BUCKETS)()
}
fn tbt() -> Histogram {
    hist(TBT_BUCKETS)()
}
fn duration() -> Histogram {
    hist(DURATION_BUCKETS)()
}

/// Every family the agent exports. Cheap to clone (families are `Arc`s inside).
#[derive(Clone)]
pub struct Metrics {
    pub ttft: HistFamily<ReqLabels>,
    pub tbt: HistFamily<ReqLabels>,
    pub duration: HistFamily<StatusLabels>,
    pub requests: Family<StatusLabels, Counter>,
    pub errors: Family<ErrorLabels, Counter>,
    pub tokens_per_second: Family<ModelLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    pub generated_tokens: Family<ModelLabels, Counter>,
    pub prompt_tokens: Family<ModelLabels, Counter>,
    pub queue_depth: Gauge,
    pub batch_size: Gauge,
    pub attached: Family<ProgramLabels, Gauge>,
    pub events: Counter,
    pub events_seen: Counter,
    pub events_lost: Family<ReasonLabels, Counter>,
    pub parse_errors: Family<KindLabels, Counter>,
    pub capture_incomplete: Family<ReasonLabels, Counter>,
    pub targets: Gauge,
    pub connections: Gauge,
    pub build_info: Family<BuildLabels, Gauge>,
}

impl Metrics {
    pub fn new(registry: &mut Registry) -> Self {
        let m = Self {
            ttft: Family::new_with_constructor(ttft),
            tbt: Family::new_with_constructor(tbt),
            duration: Family::new_with_constructor(duration),
            requests: Family::default(),
            errors: Family::default(),
            tokens_per_second: Family::default(),
            generated_tokens: Family::default(),
            prompt_tokens: Family::default(),
            queue_depth: Gauge::default(),
            batch_size: Gauge::default(),
            attached: Family::default(),
            events: Counter::default(),
            events_seen: Counter::default(),
            events_lost: Family::default(),
            parse_errors: Family::default(),
            capture_incomplete: Family::default(),
            targets: Gauge::default(),
            connections: Gauge::default(),
            build_info: Family::default(),
        };
        registry.register(
            "llm_ttft_seconds",
            "Time to first token: first request byte read by the server to the first response event carrying generated content",
            m.ttft.clone(),
        );
        registry.register(
            "llm_tbt_seconds",
            "Time between tokens: gap between successive content events of a streamed response",
            m.tbt.clone(),
        );
        registry.register(
            "llm_request_duration_seconds",
            "End-to-end request duration: first request byte read to last response byte written",
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
            "Generated tokens (usage.completion_tokens when reported, else content events)",
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
            "llm_probe_attached",
            "1 when the named kernel program is attached",
            m.attached.clone(),
        );
        registry.register(
            "llm_probe_events",
            "Kernel records delivered to the agent",
            m.events.clone(),
        );
        registry.register(
            "llm_probe_events_seen",
            "Kernel records produced (delivered + lost)",
            m.events_seen.clone(),
        );
        registry.register(
            "llm_probe_events_lost",
            "Kernel records lost, by reason",
            m.events_lost.clone(),
        );
        registry.register(
            "llm_probe_parse_errors",
            "Bytes on traced sockets that could not be parsed, by kind",
            m.parse_errors.clone(),
        );
        registry.register(
            "llm_probe_capture_incomplete",
            "Delivered records whose payload is incomplete: truncated at 4 KiB, iovecs past the \
             walked limit, or user memory that could not be read",
            m.capture_incomplete.clone(),
        );
        registry.register(
            "llm_probe_targets",
            "Processes traced now",
            m.targets.clone(),
        );
        registry.register(
            "llm_probe_connections",
            "Server-side connections with parser state",
            m.connections.clone(),
        );
        registry.register(
            "llm_probe_build_info",
            "Build information (value 1)",
            m.build_info.clone(),
        );
        m.build_info
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION"),
                aya: "0.14",
            })
            .set(1);
        for kind in crate::http::ParseErrorKind::ALL {
            let _ = m.parse_errors.get_or_create(&KindLabels {
                kind: kind.as_str(),
            });
        }
        for reason in LOST_REASONS {
            let _ = m.events_lost.get_or_create(&ReasonLabels { reason });
        }
        m
    }
}

/// Every `reason` of `llm_probe_events_lost_total`, pre-created so absent means zero, not unknown.
pub const LOST_REASONS: [&str; 4] = ["ringbuf_full", "map_full", "unknown_kind", "malformed"];
