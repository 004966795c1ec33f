//! Property tests for the engine-page normaliser: arbitrary text and mutated real pages never
//! panic it, and generated valid pages come back with exactly the values written into them.

use std::{collections::BTreeSet, fmt::Write as _};

use probe_user::engine::{normalize, worker_id, WorkerSample, DEFAULT_REASON, WORKER_LABELS};
use proptest::prelude::*;

const HOST: &str = "10.1.2.3:8000";

/// A real-looking vLLM V1 page, the seed for mutations.
const SEED: &str = r#"# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 3.0
vllm:num_requests_waiting{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 1.0
vllm:kv_cache_usage_perc{engine="0",model_name="a \"quoted\\ name\n"} 0.42
vllm:num_preemptions_total{engine="1",model_name="m"} 7.0 1700000000000
sglang:token_usage{tp_rank="0"} 0.5
tgi_queue_size 4
llamacpp:requests_processing NaN
x_total 1 # {trace_id="abc"} 1.0
# EOF
"#;

/// Pieces of real pages, so arbitrary input reaches deep parser states.
const FRAGMENTS: &[&str] = &[
    "vllm:kv_cache_usage_perc",
    "{engine=\"",
    "\"}",
    "\\\"",
    "\\\\",
    "\\n",
    ",",
    "=",
    " 1.5\n",
    " +Inf",
    " -Inf\n",
    " NaN\n",
    " 1e308\n",
    "# TYPE x gauge\n",
    "# EOF\n",
    "\n",
    "\r\n",
    " ",
    "\t",
    "é",
    "\u{0}",
    "tgi_queue_size 3\n",
];

#[derive(Debug, Clone)]
enum Mutation {
    Delete(usize, usize),
    Insert(usize, String),
    Replace(usize, char),
    Truncate(usize),
    Duplicate(usize, usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let text = prop_oneof![
        any::<String>(),
        prop::sample::select(FRAGMENTS).prop_map(str::to_owned),
    ];
    prop_oneof![
        (any::<usize>(), 0usize..40).prop_map(|(a, n)| Mutation::Delete(a, n)),
        (any::<usize>(), text).prop_map(|(a, s)| Mutation::Insert(a, s)),
        (any::<usize>(), any::<char>()).prop_map(|(a, c)| Mutation::Replace(a, c)),
        any::<usize>().prop_map(Mutation::Truncate),
        (any::<usize>(), 0usize..60).prop_map(|(a, n)| Mutation::Duplicate(a, n)),
    ]
}

fn mutate(page: &str, ops: &[Mutation]) -> String {
    let mut chars: Vec<char> = page.chars().collect();
    for op in ops {
        let len = chars.len().max(1);
        match op {
            Mutation::Delete(at, n) => {
                let at = at % len;
                let end = (at + n).min(chars.len());
                if at < end {
                    chars.drain(at..end);
                }
            }
            Mutation::Insert(at, s) => {
                let at = (at % len).min(chars.len());
                chars.splice(at..at, s.chars());
            }
            Mutation::Replace(at, c) => {
                if let Some(slot) = chars.get_mut(at % len) {
                    *slot = *c;
                }
            }
            Mutation::Truncate(at) => chars.truncate(at % len),
            Mutation::Duplicate(at, n) => {
                let at = at % len;
                let end = (at + n).min(chars.len());
                if at < end {
                    let copy: Vec<char> = chars[at..end].to_vec();
                    chars.splice(at..at, copy);
                }
            }
        }
    }
    chars.into_iter().collect()
}

/// Whatever comes back must at least be consistent: known worker ids, finite values.
fn check_sane(result: &Result<Vec<WorkerSample>, probe_user::engine::EngineError>) {
    if let Ok(workers) = result {
        assert!(!workers.is_empty());
        for w in workers {
            assert!(w.worker_id.starts_with(HOST), "{w:?}");
            let values = [w.kv_cache_utilization, w.queue_depth, w.batch_size];
            for v in values.into_iter().flatten() {
                assert!(v.is_finite() && v >= 0.0, "{w:?}");
            }
            for (reason, total) in &w.preemptions {
                assert!(
                    !reason.is_empty() && total.is_finite() && *total >= 0.0,
                    "{w:?}"
                );
            }
        }
    }
}

/// One worker as written into a generated page.
#[derive(Debug, Clone)]
struct GenWorker {
    kv: Option<(f64, usize)>,
    queue: Option<(u32, usize)>,
    batch: Option<(u32, usize)>,
    /// (reason, total); all under one of the two vLLM counter names.
    preemptions: Vec<(String, u32)>,
    old_counter_name: bool,
}

const KV_NAMES: &[&str] = &[
    "vllm:kv_cache_usage_perc",
    "vllm:gpu_cache_usage_perc",
    "sglang:token_usage",
    "llamacpp:kv_cache_usage_ratio",
];
const QUEUE_NAMES: &[&str] = &[
    "vllm:num_requests_waiting",
    "sglang:num_queue_reqs",
    "tgi_queue_size",
    "llamacpp:requests_deferred",
];
const BATCH_NAMES: &[&str] = &[
    "vllm:num_requests_running",
    "sglang:num_running_reqs",
    "tgi_batch_current_size",
    "llamacpp:requests_processing",
];

fn gen_worker() -> impl Strategy<Value = GenWorker> {
    (
        prop::option::of((0.0f64..=1.0, 0usize..4)),
        prop::option::of((any::<u32>(), 0usize..4)),
        prop::option::of((any::<u32>(), 0usize..4)),
        prop::collection::btree_map("[a-z_]{1,8}", any::<u32>(), 0..4),
        any::<bool>(),
    )
        .prop_map(|(kv, queue, batch, reasons, old_counter_name)| GenWorker {
            kv,
            // A worker with nothing on the page does not exist; give it a queue.
            queue: if kv.is_none() && batch.is_none() && reasons.is_empty() {
                Some(queue.unwrap_or((0, 0)))
            } else {
                queue
            },
            batch,
            preemptions: reasons.into_iter().collect(),
            old_counter_name,
        })
}

fn escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Sample lines for one worker, with a worker label `label=value` when given, a noisy
/// `model_name`, and the float written either way Rust prints it.
fn lines_for(w: &GenWorker, worker: Option<(&str, &str)>, exp: bool) -> Vec<String> {
    let labels = |extra: Option<(&str, &str)>| {
        let mut l = vec![r#"model_name="m \"x\" \\ y""#.to_owned()];
        if let Some((k, v)) = worker {
            l.push(format!("{k}=\"{}\"", escape(v)));
        }
        if let Some((k, v)) = extra {
            l.push(format!("{k}=\"{}\"", escape(v)));
        }
        l.join(",")
    };
    let num = |v: f64| {
        if exp {
            format!("{v:e}")
        } else {
            format!("{v:?}")
        }
    };
    let mut out = Vec::new();
    if let Some((v, n)) = w.kv {
        out.push(format!("{}{{{}}} {}", KV_NAMES[n], labels(None), num(v)));
    }
    if let Some((v, n)) = w.queue {
        out.push(format!(
            "{}{{{}}} {}",
            QUEUE_NAMES[n],
            labels(None),
            num(f64::from(v))
        ));
    }
    if let Some((v, n)) = w.batch {
        out.push(format!(
            "{}{{{}}}  {}  ",
            BATCH_NAMES[n],
            labels(None),
            num(f64::from(v))
        ));
    }
    let counter = if w.old_counter_name {
        "vllm:num_preemptions"
    } else {
        "vllm:num_preemptions_total"
    };
    for (reason, total) in &w.preemptions {
        let l = if reason == DEFAULT_REASON {
            labels(None)
        } else {
            labels(Some(("reason", reason)))
        };
        out.push(format!(
            "{counter}{{{l}}} {} 1700000000000",
            num(f64::from(*total))
        ));
    }
    out
}

fn expected(w: &GenWorker, id: String) -> WorkerSample {
    WorkerSample {
        worker_id: id,
        kv_cache_utilization: w.kv.map(|(v, _)| v),
        queue_depth: w.queue.map(|(v, _)| f64::from(v)),
        batch_size: w.batch.map(|(v, _)| f64::from(v)),
        preemptions: w
            .preemptions
            .iter()
            .map(|(r, t)| (r.clone(), f64::from(*t)))
            .collect(),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn arbitrary_text_never_panics(
        text in any::<String>(),
        pieces in prop::collection::vec(prop::sample::select(FRAGMENTS), 0..40),
    ) {
        check_sane(&normalize(&text, HOST));
        check_sane(&normalize(&pieces.concat(), HOST));
    }

    #[test]
    fn mutated_pages_never_panic(ops in prop::collection::vec(mutation(), 1..8)) {
        let page = mutate(SEED, &ops);
        check_sane(&normalize(&page, HOST));
    }

    #[test]
    fn generated_pages_round_trip(
        workers in prop::collection::vec(gen_worker(), 1..5),
        ids in prop::collection::btree_set("[a-zA-Z0-9 _.\"\\\\\n/-]{1,12}", 5),
        label in prop::sample::select(WORKER_LABELS),
        labelled in any::<bool>(),
        exp in any::<bool>(),
        order in any::<u64>(),
    ) {
        // Without a worker label every sample belongs to the URL's host:port: one worker.
        let workers = if labelled { workers } else { workers[..1].to_vec() };
        let ids: Vec<String> = ids.into_iter().collect();
        // Worker labels are exported in their exposition-safe form; ids that differ only in
        // unsafe characters become one worker, which this round trip does not model.
        let safe: BTreeSet<String> = ids.iter().map(|i| probe_user::metrics::label_value(i)).collect();
        prop_assume!(safe.len() == ids.len());
        let mut lines = vec!["# HELP vllm:num_requests_waiting waiting".to_owned(),
                             "unrelated_metric{a=\"b\"} 12".to_owned()];
        let mut want = Vec::new();
        for (w, id) in workers.iter().zip(&ids) {
            let (worker, exported) = if labelled {
                (Some((label, id.as_str())), worker_id(HOST, Some(id)))
            } else {
                (None, HOST.to_owned())
            };
            lines.extend(lines_for(w, worker, exp));
            want.push(expected(w, exported));
        }
        // A deterministic shuffle driven by the generated seed: page order must not matter.
        let mut state = order | 1;
        for i in (1..lines.len()).rev() {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            lines.swap(i, (state % (i as u64 + 1)) as usize);
        }
        let mut page = String::new();
        for l in &lines {
            let _ = writeln!(page, "{l}");
        }
        let got = match normalize(&page, HOST) {
            Ok(g) => g,
            Err(e) => return Err(TestCaseError::fail(format!("{e}\n{page}"))),
        };
        let mut got = got;
        for w in &mut got {
            w.preemptions.sort_by(|a, b| a.0.cmp(&b.0));
        }
        got.sort_by(|a, b| a.worker_id.cmp(&b.worker_id));
        want.sort_by(|a, b| a.worker_id.cmp(&b.worker_id));
        let distinct: BTreeSet<&str> = got.iter().map(|w| w.worker_id.as_str()).collect();
        prop_assert_eq!(distinct.len(), got.len());
        prop_assert_eq!(got, want, "{}", page);
    }
}
