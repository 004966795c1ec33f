//! From an engine's own metric names to the bridge's normalised ones, per worker.
//!
//! Names are the engines' documented ones:
//! vLLM <https://docs.vllm.ai/en/latest/design/metrics.html> (`vllm:kv_cache_usage_perc`, a
//! fraction despite the name; `vllm:gpu_cache_usage_perc` in older releases),
//! `SGLang` <https://docs.sglang.ai/references/production_metrics.html>,
//! TGI <https://huggingface.co/docs/text-generation-inference/reference/metrics>,
//! llama.cpp `server --metrics` (`tools/server/README.md`).

use rustc_hash::FxHashMap;

use super::{
    promtext::{self, Line, Sample},
    EngineError, WorkerSample,
};

/// Distinct workers kept from one page: bounds the series one URL can create. Real pages carry
/// one worker per data-parallel rank (a handful); a page past this is not an engine's.
pub(crate) const MAX_WORKERS_PER_PAGE: usize = 64;
/// Distinct preemption reasons kept per worker, for the same reason (vLLM has none, engines that
/// label the cause use a few fixed words).
pub(crate) const MAX_REASONS_PER_WORKER: usize = 16;
/// Longest worker or reason label value kept: engine indexes and rank numbers are a few bytes; a
/// longer value is not an id, and would make an unbounded label.
pub(crate) const MAX_LABEL_VALUE_BYTES: usize = 128;

/// Labels naming the worker a sample belongs to, first present wins: vLLM's `engine` (the
/// data-parallel engine index), then generic `worker_id` / `worker`, then `SGLang`'s `dp_rank` and
/// `tp_rank` — data-parallel first, since each data-parallel rank runs its own scheduler (its own
/// queue and KV cache) while tensor-parallel ranks are shards of one.
pub const WORKER_LABELS: &[&str] = &["engine", "worker_id", "worker", "dp_rank", "tp_rank"];

/// Reason used for preemptions when the engine's counter has no `reason` label.
pub const DEFAULT_REASON: &str = "engine";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Field {
    KvCache,
    Queue,
    Batch,
    Preemptions,
}

/// Known engine metrics: (name, field, rank). Where one engine has an old and a new name for the
/// same thing and a page carries both (deprecation periods), the lower rank wins.
const KNOWN: &[(&str, Field, u8)] = &[
    ("vllm:kv_cache_usage_perc", Field::KvCache, 0),
    ("vllm:gpu_cache_usage_perc", Field::KvCache, 1),
    ("sglang:token_usage", Field::KvCache, 0),
    ("llamacpp:kv_cache_usage_ratio", Field::KvCache, 0),
    ("vllm:num_requests_waiting", Field::Queue, 0),
    ("sglang:num_queue_reqs", Field::Queue, 0),
    ("tgi_queue_size", Field::Queue, 0),
    ("llamacpp:requests_deferred", Field::Queue, 0),
    ("vllm:num_requests_running", Field::Batch, 0),
    ("sglang:num_running_reqs", Field::Batch, 0),
    ("tgi_batch_current_size", Field::Batch, 0),
    ("llamacpp:requests_processing", Field::Batch, 0),
    ("vllm:num_preemptions_total", Field::Preemptions, 0),
    ("vllm:num_preemptions", Field::Preemptions, 1),
];

/// What reading one page found, beyond the samples: for the bridge's debug log.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PageStats {
    pub samples: usize,
    pub malformed: usize,
    /// Known samples dropped: non-finite or negative values, over-long labels, caps reached.
    pub dropped: usize,
}

/// The worker id exported for a sample: the URL's `host:port`, qualified with the engine's own
/// worker label when it has one. The qualification is needed because the label alone is not
/// unique on a host: two vLLM servers on ports 8000 and 8001 both report `engine="0"`, and
/// would otherwise share (and overwrite, and remove) one series.
pub fn worker_id(default_worker: &str, label: Option<&str>) -> String {
    match label {
        Some(l) => format!("{default_worker}/{}", crate::metrics::label_value(l)),
        None => default_worker.to_owned(),
    }
}

/// One field being collected, with the rank of the name it came from.
#[derive(Clone, Copy, Debug, Default)]
struct Ranked(Option<(u8, f64)>);

impl Ranked {
    /// A better-ranked name replaces; the same rank keeps the largest value (several series folded
    /// into one worker, such as one per model, report the fullest).
    fn offer(&mut self, rank: u8, value: f64) {
        self.0 = match self.0 {
            Some((r, v)) if r < rank => Some((r, v)),
            Some((r, v)) if r == rank => Some((r, v.max(value))),
            _ => Some((rank, value)),
        };
    }

    fn value(self) -> Option<f64> {
        self.0.map(|(_, v)| v)
    }
}

#[derive(Debug, Default)]
struct Acc {
    worker_id: String,
    kv: Ranked,
    queue: Ranked,
    batch: Ranked,
    preemption_rank: Option<u8>,
    /// Counters of one reason folded into one worker are distinct events, so they add.
    preemptions: Vec<(String, f64)>,
}

/// [`super::normalize`] with the page's statistics.
pub fn normalize_counted(
    page: &str,
    default_worker: &str,
) -> Result<(Vec<WorkerSample>, PageStats), EngineError> {
    let mut stats = PageStats::default();
    let mut workers: Vec<Acc> = Vec::new();
    let mut index: FxHashMap<String, usize> = FxHashMap::default();
    for line in promtext::lines(page) {
        let sample = match line {
            Line::Sample(s) => s,
            Line::Malformed => {
                stats.malformed += 1;
                continue;
            }
        };
        stats.samples += 1;
        let Some(&(_, field, rank)) = KNOWN.iter().find(|(n, _, _)| *n == sample.name) else {
            continue;
        };
        if !accept(
            &sample,
            field,
            default_worker,
            &mut workers,
            &mut index,
            rank,
        ) {
            stats.dropped += 1;
        }
    }
    if workers.is_empty() {
        return Err(EngineError::NoKnownMetrics {
            samples: stats.samples,
            malformed: stats.malformed,
        });
    }
    let out = workers
        .into_iter()
        .map(|a| WorkerSample {
            worker_id: a.worker_id,
            kv_cache_utilization: a.kv.value(),
            queue_depth: a.queue.value(),
            batch_size: a.batch.value(),
            preemptions: a.preemptions,
        })
        .collect();
    Ok((out, stats))
}

/// Folds one known sample into its worker; false when it is dropped.
fn accept(
    sample: &Sample<'_>,
    field: Field,
    default_worker: &str,
    workers: &mut Vec<Acc>,
    index: &mut FxHashMap<String, usize>,
    rank: u8,
) -> bool {
    // Gauges and counters here are counts and fractions: a negative or non-finite value is an
    // engine bug or a scrape of something else, and exporting it would poison /health's maxima.
    if !sample.value.is_finite() || sample.value < 0.0 {
        return false;
    }
    let label = WORKER_LABELS
        .iter()
        .find_map(|l| sample.label(l).filter(|v| !v.is_empty()));
    if label.is_some_and(|l| l.len() > MAX_LABEL_VALUE_BYTES) {
        return false;
    }
    let id = worker_id(default_worker, label);
    let slot = if let Some(&i) = index.get(&id) {
        i
    } else {
        if workers.len() >= MAX_WORKERS_PER_PAGE {
            return false;
        }
        index.insert(id.clone(), workers.len());
        workers.push(Acc {
            worker_id: id,
            ..Acc::default()
        });
        workers.len() - 1
    };
    let Some(acc) = workers.get_mut(slot) else {
        return false;
    };
    match field {
        Field::KvCache => acc.kv.offer(rank, sample.value),
        Field::Queue => acc.queue.offer(rank, sample.value),
        Field::Batch => acc.batch.offer(rank, sample.value),
        Field::Preemptions => return add_preemptions(acc, sample, rank),
    }
    true
}

fn add_preemptions(acc: &mut Acc, sample: &Sample<'_>, rank: u8) -> bool {
    match acc.preemption_rank {
        Some(r) if r < rank => return true,
        Some(r) if r == rank => {}
        _ => {
            acc.preemption_rank = Some(rank);
            acc.preemptions.clear();
        }
    }
    let reason = sample
        .label("reason")
        .filter(|r| !r.is_empty())
        .unwrap_or(DEFAULT_REASON);
    if reason.len() > MAX_LABEL_VALUE_BYTES {
        return false;
    }
    // An engine page is not trusted to hold exposition-safe label values.
    let reason = &crate::metrics::label_value(reason);
    if let Some((_, total)) = acc.preemptions.iter_mut().find(|(r, _)| r == reason) {
        *total += sample.value;
        return true;
    }
    if acc.preemptions.len() >= MAX_REASONS_PER_WORKER {
        return false;
    }
    acc.preemptions.push((reason.to_owned(), sample.value));
    true
}

#[cfg(test)]
mod tests;
