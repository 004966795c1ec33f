//! The engine-metrics bridge: scrapes each inference engine's own Prometheus page
//! (`--engine-metrics URL`) and re-exports what it says under engine-neutral names —
//! `llm_kv_cache_utilization`, `llm_engine_queue_depth`, `llm_engine_batch_size` (gauges, per
//! `worker_id`) and `llm_preemption_total` (counter, per `worker_id` and `reason`) — plus
//! `llm_probe_engine_scrape_errors_total{url}`.
//!
//! A failed scrape removes every gauge that URL exported, so a dead engine shows as missing data
//! rather than as its last good values; counters stay (Prometheus treats their disappearance as a
//! reset anyway) and resume by delta.

mod client;
mod normalize;
mod promtext;

use std::{
    fmt, future::Future, pin::Pin, str::FromStr, sync::atomic::AtomicU64, task::Poll,
    time::Duration,
};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use rustc_hash::FxHashMap;

pub use normalize::{worker_id, DEFAULT_REASON, WORKER_LABELS};

/// Per-scrape limit, connect through last body byte. Engines render their page in milliseconds;
/// 2 s is well under any sensible scrape interval, so one hung engine cannot delay the next poll.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);
/// Largest page accepted. vLLM's page with per-model histograms is ~100 KiB; 8 MiB leaves room for
/// many models and workers while bounding what one misbehaving endpoint can make us hold.
pub const MAX_PAGE_BYTES: usize = 8 * 1024 * 1024;
/// Counter series (worker × reason) remembered per URL for delta export. Pages are already capped
/// per worker and per reason; this bounds what workers that come and go (restarts renumbering
/// them) can accumulate over the agent's life.
const MAX_COUNTER_SERIES_PER_URL: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(
        "{url:?}: https is not supported (llm-probe has no TLS client); \
         serve the engine's metrics over plain http://"
    )]
    Tls { url: String },
    #[error("{url:?}: scheme {scheme:?} is not supported; use http://")]
    UnsupportedScheme { url: String, scheme: String },
    #[error("{url:?} is not an engine metrics URL: {reason} (expected http://host[:port][/path])")]
    InvalidUrl { url: String, reason: &'static str },
    #[error("connect: {0}")]
    Connect(std::io::Error),
    #[error("read/write: {0}")]
    Io(std::io::Error),
    #[error("no complete response within {0:?}")]
    Timeout(Duration),
    #[error("HTTP status {0} (expected 200)")]
    Status(u16),
    #[error("page larger than {limit} bytes")]
    BodyTooLarge { limit: usize },
    #[error("bad HTTP response: {0}")]
    BadResponse(&'static str),
    #[error(
        "page has no known engine metric ({samples} samples, {malformed} malformed lines): \
         not a vLLM, SGLang, TGI or llama.cpp metrics page?"
    )]
    NoKnownMetrics { samples: usize, malformed: usize },
}

/// A plain-http engine metrics URL, as given on the command line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EngineUrl {
    original: String,
    /// As written, with brackets for IPv6 (`[::1]`), lower-cased.
    host: String,
    port: u16,
    /// Path and query, starting with `/`.
    path: String,
}

impl EngineUrl {
    /// `host:port`, the port always explicit: the worker id for pages without a worker label.
    pub fn host_port(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }

    pub fn path(&self) -> &str {
        &self.path
    }

    /// The Host header value (RFC 9110 §7.2: port omitted when it is the default).
    fn authority(&self) -> String {
        if self.port == 80 {
            self.host.clone()
        } else {
            self.host_port()
        }
    }

    /// The host for `connect`, without IPv6 brackets.
    fn connect_host(&self) -> &str {
        self.host.trim_start_matches('[').trim_end_matches(']')
    }
}

impl fmt::Display for EngineUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.original)
    }
}

impl FromStr for EngineUrl {
    type Err = EngineError;

    /// `http://host[:port][/path]`; port 80 and path `/metrics` (where vLLM, `SGLang`, TGI and
    /// llama.cpp all serve their page) when left out.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let invalid = |reason| EngineError::InvalidUrl {
            url: s.to_owned(),
            reason,
        };
        let Some((scheme, rest)) = s.split_once("://") else {
            return Err(invalid("no http:// scheme"));
        };
        if !scheme.eq_ignore_ascii_case("http") {
            let ok = |b: u8| b.is_ascii_alphanumeric() || b"+-.".contains(&b);
            if scheme.is_empty() || !scheme.bytes().all(ok) {
                return Err(invalid("no http:// scheme"));
            }
            if scheme.eq_ignore_ascii_case("https") {
                return Err(EngineError::Tls { url: s.to_owned() });
            }
            return Err(EngineError::UnsupportedScheme {
                url: s.to_owned(),
                scheme: scheme.to_ascii_lowercase(),
            });
        }
        // The path goes into the request line verbatim: no blanks or controls may hide in it.
        if rest.bytes().any(|b| b.is_ascii_control() || b == b' ') {
            return Err(invalid("blank or control character"));
        }
        let rest = rest.split('#').next().unwrap_or("");
        let split = rest.find(['/', '?']).unwrap_or(rest.len());
        let (authority, path) = rest.split_at(split);
        if authority.contains('@') {
            return Err(invalid("credentials in URLs are not supported"));
        }
        let (host, port) = split_host_port(authority).ok_or_else(|| invalid("bad host or port"))?;
        let path = match path {
            "" => "/metrics".to_owned(),
            p if p.starts_with('?') => format!("/{p}"),
            p => p.to_owned(),
        };
        Ok(Self {
            original: s.to_owned(),
            host: host.to_ascii_lowercase(),
            port,
            path,
        })
    }
}

/// `host`, `host:port`, `[v6]`, `[v6]:port`; port 80 when absent; port 0 rejected.
fn split_host_port(authority: &str) -> Option<(&str, u16)> {
    let (host, port) = if authority.starts_with('[') {
        let end = authority.find(']')?;
        let host = authority.get(..=end)?;
        let inner = host.get(1..end)?;
        if inner.is_empty()
            || !inner
                .bytes()
                .all(|b| b.is_ascii_hexdigit() || b":.".contains(&b))
        {
            return None;
        }
        match authority.get(end + 1..)? {
            "" => (host, None),
            p => (host, Some(p.strip_prefix(':')?)),
        }
    } else {
        let (host, port) = match authority.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        };
        let ok = |b: u8| b.is_ascii_alphanumeric() || b"-._".contains(&b);
        if host.is_empty() || !host.bytes().all(ok) {
            return None;
        }
        (host, port)
    };
    let port = match port {
        None => 80,
        Some(p) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => p.parse().ok()?,
        Some(_) => return None,
    };
    (port != 0).then_some((host, port))
}

/// What one page says, per worker.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct WorkerSample {
    pub worker_id: String,
    pub kv_cache_utilization: Option<f64>,
    pub queue_depth: Option<f64>,
    pub batch_size: Option<f64>,
    /// (reason, the engine's running total).
    pub preemptions: Vec<(String, f64)>,
}

/// Pure: parses a Prometheus text page and normalises it, one entry per worker in page order.
/// `default_worker` (the URL's `host:port`) is the worker id when a sample has no worker label,
/// and qualifies it when it has one (see [`worker_id`]). Malformed lines are skipped; a page
/// without a single usable known metric is an error.
pub fn normalize(page: &str, default_worker: &str) -> Result<Vec<WorkerSample>, EngineError> {
    normalize::normalize_counted(page, default_worker).map(|(w, _)| w)
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WorkerLabels {
    worker_id: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PreemptionLabels {
    worker_id: String,
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UrlLabels {
    url: String,
}

type GaugeF = Gauge<f64, AtomicU64>;

/// The bridge's families. Cheap to clone (families are `Arc`s inside).
#[derive(Clone)]
pub struct EngineMetrics {
    kv_cache_utilization: Family<WorkerLabels, GaugeF>,
    queue_depth: Family<WorkerLabels, GaugeF>,
    batch_size: Family<WorkerLabels, GaugeF>,
    preemptions: Family<PreemptionLabels, Counter<f64, AtomicU64>>,
    scrape_errors: Family<UrlLabels, Counter>,
}

impl EngineMetrics {
    pub fn new(registry: &mut Registry) -> Self {
        let m = Self {
            kv_cache_utilization: Family::default(),
            queue_depth: Family::default(),
            batch_size: Family::default(),
            preemptions: Family::default(),
            scrape_errors: Family::default(),
        };
        registry.register(
            "llm_kv_cache_utilization",
            "KV-cache utilization (0-1) reported by the inference engine",
            m.kv_cache_utilization.clone(),
        );
        registry.register(
            "llm_engine_queue_depth",
            "Requests waiting in the engine's scheduler queue, as the engine reports",
            m.queue_depth.clone(),
        );
        registry.register(
            "llm_engine_batch_size",
            "Requests in the engine's running batch, as the engine reports",
            m.batch_size.clone(),
        );
        // prometheus-client appends `_total` to counters.
        registry.register(
            "llm_preemption",
            "Requests preempted by the engine (re-exported from its own counter)",
            m.preemptions.clone(),
        );
        registry.register(
            "llm_probe_engine_scrape_errors",
            "Failed scrapes of an engine metrics page",
            m.scrape_errors.clone(),
        );
        m
    }
}

/// Gauges one URL exported for one worker at its last good scrape.
#[derive(Clone, Copy, Debug, Default)]
struct Exported {
    kv: Option<f64>,
    queue: Option<f64>,
    batch: Option<f64>,
}

struct Target {
    url: EngineUrl,
    labels: UrlLabels,
    default_worker: String,
    exported: FxHashMap<String, Exported>,
    /// Last engine total per (worker, reason), for delta export.
    counters: FxHashMap<(String, String), f64>,
    last_error: Option<String>,
}

/// Owns the URLs and their state; `poll_once` scrapes them all and updates the families.
pub struct Bridge {
    targets: Vec<Target>,
    metrics: EngineMetrics,
    timeout: Duration,
    max_page: usize,
}

type Scrape<'a> = Pin<Box<dyn Future<Output = Result<String, EngineError>> + Send + 'a>>;

impl Bridge {
    pub fn new(urls: Vec<EngineUrl>, metrics: EngineMetrics) -> Self {
        Self::with_limits(urls, metrics, DEFAULT_TIMEOUT, MAX_PAGE_BYTES)
    }

    /// [`Bridge::new`] with another timeout and page cap (tests use short ones).
    pub(crate) fn with_limits(
        urls: Vec<EngineUrl>,
        metrics: EngineMetrics,
        timeout: Duration,
        max_page: usize,
    ) -> Self {
        let targets = urls
            .into_iter()
            .map(|url| {
                let labels = UrlLabels {
                    url: url.to_string(),
                };
                // Present from the start at 0, so a rate over it exists before the first error.
                let _ = metrics.scrape_errors.get_or_create(&labels);
                Target {
                    default_worker: url.host_port(),
                    url,
                    labels,
                    exported: FxHashMap::default(),
                    counters: FxHashMap::default(),
                    last_error: None,
                }
            })
            .collect();
        Self {
            targets,
            metrics,
            timeout,
            max_page,
        }
    }

    /// Scrapes every URL concurrently, each within the timeout, then updates the families.
    pub async fn poll_once(&mut self) {
        let timeout = self.timeout;
        let max_page = self.max_page;
        let mut pending: Vec<Option<Scrape<'_>>> = self
            .targets
            .iter()
            .map(|t| {
                let url = &t.url;
                let fut: Scrape<'_> = Box::pin(async move {
                    match tokio::time::timeout(timeout, client::get(url, max_page)).await {
                        Ok(r) => r,
                        Err(_) => Err(EngineError::Timeout(timeout)),
                    }
                });
                Some(fut)
            })
            .collect();
        // A join on the caller's task rather than spawned tasks: no 'static clones, and nothing
        // keeps running if the caller drops the poll.
        let mut results: Vec<Option<Result<String, EngineError>>> = std::iter::repeat_with(|| None)
            .take(pending.len())
            .collect();
        std::future::poll_fn(|cx| {
            let mut busy = false;
            for (slot, result) in pending.iter_mut().zip(results.iter_mut()) {
                if let Some(fut) = slot {
                    if let Poll::Ready(r) = fut.as_mut().poll(cx) {
                        *result = Some(r);
                        *slot = None;
                    } else {
                        busy = true;
                    }
                }
            }
            if busy {
                Poll::Pending
            } else {
                Poll::Ready(())
            }
        })
        .await;
        drop(pending);
        for (target, result) in self.targets.iter_mut().zip(results) {
            let page = result.unwrap_or(Err(EngineError::BadResponse("scrape did not finish")));
            match page.and_then(|p| normalize::normalize_counted(&p, &target.default_worker)) {
                Ok((workers, stats)) => {
                    if stats.malformed > 0 || stats.dropped > 0 {
                        log::debug!(
                            "engine metrics {}: {} malformed lines, {} known samples dropped",
                            target.url,
                            stats.malformed,
                            stats.dropped
                        );
                    }
                    target.apply(&workers, &self.metrics);
                }
                Err(e) => target.fail(&e, &self.metrics),
            }
        }
    }

    /// Largest KV-cache utilization currently exported (None when no engine reports it).
    pub fn max_kv_utilization(&self) -> Option<f64> {
        self.max_of(|e| e.kv)
    }

    /// Largest engine queue depth currently exported.
    pub fn max_queue_depth(&self) -> Option<f64> {
        self.max_of(|e| e.queue)
    }

    fn max_of(&self, field: impl Fn(&Exported) -> Option<f64>) -> Option<f64> {
        self.targets
            .iter()
            .flat_map(|t| t.exported.values())
            .filter_map(field)
            .reduce(f64::max)
    }

    /// (url, last error) for URLs whose last scrape failed.
    pub fn failing(&self) -> Vec<(String, String)> {
        self.targets
            .iter()
            .filter_map(|t| Some((t.labels.url.clone(), t.last_error.clone()?)))
            .collect()
    }
}

impl Target {
    fn apply(&mut self, workers: &[WorkerSample], m: &EngineMetrics) {
        if self.last_error.take().is_some() {
            log::info!("engine metrics {}: scraping again", self.url);
        }
        let mut now: FxHashMap<String, Exported> = FxHashMap::default();
        for w in workers {
            let labels = WorkerLabels {
                worker_id: w.worker_id.clone(),
            };
            let e = Exported {
                kv: w.kv_cache_utilization,
                queue: w.queue_depth,
                batch: w.batch_size,
            };
            for (value, family) in gauges(&e, m) {
                if let Some(v) = value {
                    family.get_or_create(&labels).set(v);
                }
            }
            now.insert(w.worker_id.clone(), e);
            for (reason, total) in &w.preemptions {
                self.count(&w.worker_id, reason, *total, m);
            }
        }
        // A worker gone from the page, or a metric gone from a worker, takes its gauge with it.
        for (worker, old) in &self.exported {
            let cur = now.get(worker).copied().unwrap_or_default();
            let labels = WorkerLabels {
                worker_id: worker.clone(),
            };
            for ((was, family), (is, _)) in gauges(old, m).into_iter().zip(gauges(&cur, m)) {
                if was.is_some() && is.is_none() {
                    family.remove(&labels);
                }
            }
        }
        self.exported = now;
    }

    /// Re-exports an engine counter by delta; a drop means the engine restarted from zero.
    fn count(&mut self, worker: &str, reason: &str, total: f64, m: &EngineMetrics) {
        let key = (worker.to_owned(), reason.to_owned());
        let last = match self.counters.get(&key) {
            Some(&last) => last,
            None if self.counters.len() >= MAX_COUNTER_SERIES_PER_URL => return,
            // First sight: the whole total, so the re-export mirrors the engine's count.
            None => 0.0,
        };
        let delta = if total >= last { total - last } else { total };
        self.counters.insert(key, total);
        let labels = PreemptionLabels {
            worker_id: worker.to_owned(),
            reason: reason.to_owned(),
        };
        m.preemptions.get_or_create(&labels).inc_by(delta);
    }

    fn fail(&mut self, e: &EngineError, m: &EngineMetrics) {
        m.scrape_errors.get_or_create(&self.labels).inc();
        // Once per failure streak: a down engine would otherwise log every interval.
        if self.last_error.is_none() {
            log::warn!(
                "engine metrics {}: scrape failed: {e}; its gauges are withdrawn until it answers \
                 (further failures are counted in llm_probe_engine_scrape_errors_total)",
                self.url
            );
        }
        for (worker, old) in self.exported.drain() {
            let labels = WorkerLabels { worker_id: worker };
            for (was, family) in gauges(&old, m) {
                if was.is_some() {
                    family.remove(&labels);
                }
            }
        }
        self.last_error = Some(e.to_string());
    }
}

/// Each gauge field with its family, in one fixed order.
fn gauges<'m>(
    e: &Exported,
    m: &'m EngineMetrics,
) -> [(Option<f64>, &'m Family<WorkerLabels, GaugeF>); 3] {
    [
        (e.kv, &m.kv_cache_utilization),
        (e.queue, &m.queue_depth),
        (e.batch, &m.batch_size),
    ]
}

#[cfg(test)]
mod tests;
