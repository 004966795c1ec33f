//! The engine-metrics bridge: scrapes each inference engine's own Prometheus page
//! (`--engine-metrics URL`) through `crate::webclient` and re-exports what it says under
//! engine-neutral names (`crate::metrics::engine`).
//!
//! A failed scrape removes every gauge that URL exported, so a dead engine shows as missing data
//! rather than as its last good values; counters stay (Prometheus treats their disappearance as a
//! reset anyway) and resume by delta.

use std::{future::Future, pin::Pin, task::Poll, time::Duration};

use prometheus_client::metrics::family::Family;
use rustc_hash::FxHashMap;

use crate::{
    engine::{normalize_counted, EngineError, EngineUrl, WorkerSample},
    metrics::{
        engine::{EngineMetrics, PreemptionLabels, UrlLabels, WorkerLabels},
        F64Gauge,
    },
    webclient::{self, WebError},
};

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

/// Why one scrape gave nothing.
#[derive(Debug, thiserror::Error)]
pub enum ScrapeError {
    #[error(transparent)]
    Fetch(#[from] WebError),
    #[error("HTTP status {0} (expected 200)")]
    Status(u16),
    #[error(transparent)]
    Page(#[from] EngineError),
    #[error("scrape did not finish")]
    Unfinished,
}

/// Fetches one page: 200 or an error.
async fn fetch(url: &EngineUrl, max_page: usize, timeout: Duration) -> Result<String, ScrapeError> {
    let server = webclient::Server {
        host: url.host(),
        port: url.port(),
    };
    let r = webclient::get(server, url.path(), max_page, timeout).await?;
    if r.status != 200 {
        return Err(ScrapeError::Status(r.status));
    }
    Ok(r.body)
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

type Scrape<'a> = Pin<Box<dyn Future<Output = Result<String, ScrapeError>> + Send + 'a>>;

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
                    url: crate::metrics::label_value(&url.to_string()),
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
                let fut: Scrape<'_> = Box::pin(fetch(url, max_page, timeout));
                Some(fut)
            })
            .collect();
        // A join on the caller's task rather than spawned tasks: no 'static clones, and nothing
        // keeps running if the caller drops the poll.
        let mut results: Vec<Option<Result<String, ScrapeError>>> = std::iter::repeat_with(|| None)
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
            let page = result.unwrap_or(Err(ScrapeError::Unfinished));
            let normalized = page.and_then(|p| {
                normalize_counted(&p, &target.default_worker).map_err(ScrapeError::from)
            });
            match normalized {
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

    fn fail(&mut self, e: &ScrapeError, m: &EngineMetrics) {
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
) -> [(Option<f64>, &'m Family<WorkerLabels, F64Gauge>); 3] {
    [
        (e.kv, &m.kv_cache_utilization),
        (e.queue, &m.queue_depth),
        (e.batch, &m.batch_size),
    ]
}

#[cfg(test)]
mod tests;
