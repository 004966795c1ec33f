//! Pages written from each engine's documented metric names and label sets.

use super::*;

const HOST: &str = "127.0.0.1:8000";

fn norm(page: &str) -> Vec<WorkerSample> {
    match normalize_counted(page, HOST) {
        Ok((w, _)) => w,
        Err(e) => panic!("page did not normalise: {e}\n{page}"),
    }
}

fn worker(samples: &[WorkerSample], id: &str) -> WorkerSample {
    match samples.iter().find(|w| w.worker_id == id) {
        Some(w) => w.clone(),
        None => panic!("no worker {id:?} in {samples:?}"),
    }
}

/// vLLM V1 (0.10+): every series carries `engine` and `model_name`; counters come with
/// `_created` siblings from the Python client.
const VLLM_V1: &str = r#"# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 3.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 1.0
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 0.42
# HELP vllm:num_preemptions_total Cumulative number of preemption from the engine.
# TYPE vllm:num_preemptions_total counter
vllm:num_preemptions_total{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 7.0
vllm:num_preemptions_created{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 1.7e+09
# HELP vllm:prompt_tokens_total Number of prefill tokens processed.
# TYPE vllm:prompt_tokens_total counter
vllm:prompt_tokens_total{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 1234.0
"#;

#[test]
fn vllm_v1_page() {
    let w = norm(VLLM_V1);
    assert_eq!(
        w,
        vec![WorkerSample {
            worker_id: "127.0.0.1:8000/0".into(),
            kv_cache_utilization: Some(0.42),
            queue_depth: Some(1.0),
            batch_size: Some(3.0),
            preemptions: vec![("engine".into(), 7.0)],
        }]
    );
}

#[test]
fn vllm_old_names_without_engine_label() {
    let page = "# TYPE vllm:gpu_cache_usage_perc gauge\n\
        vllm:gpu_cache_usage_perc{model_name=\"m\"} 0.3\n\
        vllm:num_requests_waiting{model_name=\"m\"} 0.0\n\
        vllm:num_requests_running{model_name=\"m\"} 2.0\n\
        vllm:num_preemptions{model_name=\"m\"} 5\n";
    let w = norm(page);
    assert_eq!(w.len(), 1);
    assert_eq!(w[0].worker_id, HOST);
    assert_eq!(w[0].kv_cache_utilization, Some(0.3));
    assert_eq!(w[0].queue_depth, Some(0.0));
    assert_eq!(w[0].preemptions, vec![("engine".into(), 5.0)]);
}

#[test]
fn vllm_new_names_win_over_old_in_either_order() {
    for page in [
        "vllm:gpu_cache_usage_perc 0.9\nvllm:kv_cache_usage_perc 0.2\n\
         vllm:num_preemptions 50\nvllm:num_preemptions_total 4\n",
        "vllm:kv_cache_usage_perc 0.2\nvllm:gpu_cache_usage_perc 0.9\n\
         vllm:num_preemptions_total 4\nvllm:num_preemptions 50\n",
    ] {
        let w = norm(page);
        assert_eq!(w[0].kv_cache_utilization, Some(0.2), "{page}");
        assert_eq!(w[0].preemptions, vec![("engine".into(), 4.0)], "{page}");
    }
}

#[test]
fn vllm_data_parallel_engines_and_reasons() {
    let page = "vllm:kv_cache_usage_perc{engine=\"0\",model_name=\"m\"} 0.1\n\
        vllm:kv_cache_usage_perc{engine=\"1\",model_name=\"m\"} 0.8\n\
        vllm:num_requests_waiting{engine=\"1\",model_name=\"m\"} 9\n\
        vllm:num_preemptions_total{engine=\"1\",reason=\"kv_cache\"} 3\n\
        vllm:num_preemptions_total{engine=\"1\",reason=\"priority\"} 1\n\
        vllm:num_preemptions_total{engine=\"1\",reason=\"kv_cache\",model_name=\"other\"} 2\n";
    let w = norm(page);
    assert_eq!(w.len(), 2);
    assert_eq!(
        worker(&w, "127.0.0.1:8000/0").kv_cache_utilization,
        Some(0.1)
    );
    assert_eq!(worker(&w, "127.0.0.1:8000/0").queue_depth, None);
    let one = worker(&w, "127.0.0.1:8000/1");
    assert_eq!(one.kv_cache_utilization, Some(0.8));
    assert_eq!(one.queue_depth, Some(9.0));
    assert_eq!(
        one.preemptions,
        vec![("kv_cache".into(), 5.0), ("priority".into(), 1.0)]
    );
}

#[test]
fn sglang_page() {
    let page = "# HELP sglang:num_running_reqs The number of running requests.\n\
        # TYPE sglang:num_running_reqs gauge\n\
        sglang:num_running_reqs{model_name=\"qwen\"} 5.0\n\
        # TYPE sglang:num_queue_reqs gauge\n\
        sglang:num_queue_reqs{model_name=\"qwen\"} 2.0\n\
        # TYPE sglang:token_usage gauge\n\
        sglang:token_usage{model_name=\"qwen\"} 0.28\n\
        sglang:gen_throughput{model_name=\"qwen\"} 812.5\n";
    let w = norm(page);
    assert_eq!(
        w,
        vec![WorkerSample {
            worker_id: HOST.into(),
            kv_cache_utilization: Some(0.28),
            queue_depth: Some(2.0),
            batch_size: Some(5.0),
            preemptions: vec![],
        }]
    );
}

#[test]
fn sglang_ranks_pick_dp_before_tp() {
    let page = "sglang:num_queue_reqs{dp_rank=\"1\",tp_rank=\"4\"} 2\n\
        sglang:num_queue_reqs{tp_rank=\"3\"} 7\n\
        sglang:num_queue_reqs{tp_rank=\"\"} 1\n";
    let w = norm(page);
    assert_eq!(worker(&w, "127.0.0.1:8000/1").queue_depth, Some(2.0));
    assert_eq!(worker(&w, "127.0.0.1:8000/3").queue_depth, Some(7.0));
    // An empty label names no worker: the URL's host:port does.
    assert_eq!(worker(&w, HOST).queue_depth, Some(1.0));
}

#[test]
fn tgi_page() {
    let page = "# TYPE tgi_queue_size gauge\ntgi_queue_size 4\n\
        # TYPE tgi_batch_current_size gauge\ntgi_batch_current_size 8\n\
        # TYPE tgi_request_count counter\ntgi_request_count 100\n";
    let w = norm(page);
    assert_eq!(w.len(), 1);
    assert_eq!((w[0].queue_depth, w[0].batch_size), (Some(4.0), Some(8.0)));
    assert_eq!(w[0].kv_cache_utilization, None);
}

#[test]
fn llamacpp_page() {
    let page = "# HELP llamacpp:kv_cache_usage_ratio KV-cache usage. 1 means 100 percent usage.\n\
        # TYPE llamacpp:kv_cache_usage_ratio gauge\n\
        llamacpp:kv_cache_usage_ratio 0.125\n\
        # TYPE llamacpp:requests_processing gauge\nllamacpp:requests_processing 1\n\
        # TYPE llamacpp:requests_deferred gauge\nllamacpp:requests_deferred 0\n\
        llamacpp:prompt_tokens_total 42\n";
    let w = norm(page);
    assert_eq!(w[0].kv_cache_utilization, Some(0.125));
    assert_eq!((w[0].queue_depth, w[0].batch_size), (Some(0.0), Some(1.0)));
}

/// The first worker label present wins; an unescaped value (`a "quoted" \ id`) is exported only
/// in its exposition-safe form.
#[test]
fn worker_label_order_and_unsafe_values() {
    let page = "tgi_queue_size{worker=\"w\",engine=\"e\"} 1\n\
        tgi_queue_size{worker=\"w\"} 2\n\
        tgi_queue_size{worker_id=\"a \\\"quoted\\\" \\\\ id\"} 3\n";
    let w = norm(page);
    assert_eq!(worker(&w, "127.0.0.1:8000/e").queue_depth, Some(1.0));
    assert_eq!(worker(&w, "127.0.0.1:8000/w").queue_depth, Some(2.0));
    assert_eq!(
        worker(&w, "127.0.0.1:8000/a__quoted____id").queue_depth,
        Some(3.0)
    );
}

#[test]
fn malformed_lines_are_skipped_and_counted() {
    let page = "vllm:num_requests_running{engine=\"0\"} 3\n\
        vllm:num_requests_waiting{engine=\"0\" 9\n\
        this is not a metric\n\
        vllm:num_requests_waiting{engine=\"0\"} 1 1700000000000\n\
        vllm:kv_cache_usage_perc{engine=\"0\"} banana\n\
        vllm:kv_cache_usage_perc{engine=\"0\"} NaN\n\
        vllm:num_preemptions_total{engine=\"0\"} -1\n";
    let (w, stats) = match normalize_counted(page, HOST) {
        Ok(x) => x,
        Err(e) => panic!("{e}"),
    };
    assert_eq!(stats.malformed, 3);
    assert_eq!(stats.dropped, 2);
    assert_eq!(w[0].batch_size, Some(3.0));
    assert_eq!(w[0].queue_depth, Some(1.0));
    assert_eq!(w[0].kv_cache_utilization, None);
    assert!(w[0].preemptions.is_empty());
}

#[test]
fn truncated_page_drops_the_cut_line() {
    let full = "tgi_batch_current_size 8\ntgi_queue_size 12\n";
    let cut = &full[..full.len() - 2];
    let w = norm(cut);
    assert_eq!(w[0].batch_size, Some(8.0));
    assert_eq!(
        w[0].queue_depth, None,
        "the cut value 1 of 12 must not be exported"
    );
    // Cut in the middle of a label value.
    let cut = "tgi_batch_current_size 8\ntgi_queue_size{worker=\"ab";
    assert_eq!(norm(cut)[0].queue_depth, None);
}

#[test]
fn garbage_is_an_error() {
    for page in [
        "",
        "\n\n",
        "<!DOCTYPE html><html><body>404 Not Found</body></html>\n",
        "{\"error\":\"not found\"}",
        "\u{0}\u{1}\u{fffd}\u{7f}garbage\n\u{fffd}",
        "# HELP only comments\n# TYPE x gauge\n",
        "some_other_metric 1\nand_another{a=\"b\"} 2\n",
        "tgi_queue_size NaN\ntgi_batch_current_size -Inf\n",
    ] {
        assert!(
            matches!(
                normalize_counted(page, HOST),
                Err(EngineError::NoKnownMetrics { .. })
            ),
            "{page:?}"
        );
    }
}

#[test]
fn caps_bound_workers_reasons_and_label_length() {
    use std::fmt::Write as _;
    let mut page = String::new();
    for i in 0..MAX_WORKERS_PER_PAGE + 10 {
        let _ = writeln!(page, "tgi_queue_size{{worker=\"{i}\"}} 1");
    }
    for i in 0..MAX_REASONS_PER_WORKER + 5 {
        let _ = writeln!(
            page,
            "vllm:num_preemptions_total{{worker=\"0\",reason=\"r{i}\"}} 1"
        );
    }
    let long = "x".repeat(MAX_LABEL_VALUE_BYTES + 1);
    let _ = writeln!(
        page,
        "tgi_batch_current_size{{worker=\"0\",engine=\"{long}\"}} 1"
    );
    let (w, stats) = match normalize_counted(&page, HOST) {
        Ok(x) => x,
        Err(e) => panic!("{e}"),
    };
    assert_eq!(w.len(), MAX_WORKERS_PER_PAGE);
    assert_eq!(
        worker(&w, "127.0.0.1:8000/0").preemptions.len(),
        MAX_REASONS_PER_WORKER
    );
    assert_eq!(stats.dropped, 10 + 5 + 1);
}
