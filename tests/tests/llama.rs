//! End-to-end against a real engine nobody here wrote: llama-cpp-python's `OpenAI` server with a tiny
//! random-weight llama. The probe's per-request TTFT must agree with what the client measured within
//! 1 ms for every request, and its token gaps within 1 ms (≥ 99 %, none over 5 ms), and every
//! request must be accounted for, at 1 and 64 streams.
//! Needs root (eBPF).

use serde_json::json;
use tests::{
    client::Sample,
    free_port, metric_sum, require_root, start_llama,
    traffic::{chat_body, chat_req, req, run_concurrent, run_one, timing_rounds},
    Probe,
};

/// llama-cpp-python (starlette-context's `RequestIdPlugin`) rejects an X-Request-Id that is not a UUID.
fn id(kind: u64, i: u64) -> String {
    format!("00000000-0000-4000-8000-{kind:06x}{i:06x}")
}

#[test]
fn llama_cpp_ttft_tbt_agree_with_client_at_1_and_64_streams() {
    if !require_root("llama_cpp_ttft_tbt_agree_with_client_at_1_and_64_streams") {
        return;
    }
    let port = free_port();
    let engine = start_llama(port);
    let addr = format!("127.0.0.1:{port}");
    // Warm-up before attaching: the engine's first request pays one-time costs on both sides.
    run_one(
        &addr,
        req(
            "/v1/completions",
            json!({"model": "tiny", "prompt": "warm", "max_tokens": 4}).to_string(),
            &id(0, 0),
        ),
    );
    let probe = Probe::start(&["--pid".into(), engine.pid().to_string()]);

    // The reference (a client on the same 2-core VM) is itself noisy: when the host deschedules a
    // vCPU (steal time) the client reads several events late, in one read. A noisy round is
    // measured once more; further rounds (up to eight, each started on a quiet host) only while
    // the host took CPU time from the VM during the failed round. Every round is printed, the
    // criteria of each are the same, and one round must meet them.
    let all = timing_rounds(&probe, 8, |round| round_of_requests(&addr, round));
    let streamed = all.iter().filter(|s| s.ttft_ns.is_some()).count() as u64;
    let samples_total = all.len();

    let m = probe.metrics();
    let total = metric_sum(&m, "llm_requests_total", &[("status", "ok")]);
    assert_eq!(total as usize, samples_total, "llm_requests_total:\n{m}");
    assert_eq!(
        metric_sum(&m, "llm_ttft_seconds_count", &[("model", "tiny")]) as u64,
        streamed
    );
    assert_eq!(
        metric_sum(&m, "llm_queue_depth", &[]),
        0.0,
        "nothing left waiting"
    );
    assert_eq!(
        metric_sum(&m, "llm_batch_size", &[]),
        0.0,
        "nothing left streaming"
    );
    assert!(metric_sum(&m, "llm_generated_tokens_total", &[("model", "tiny")]) > 0.0);
    assert!(
        metric_sum(&m, "llm_prompt_tokens_total", &[("model", "tiny")]) > 0.0,
        "usage of non-streamed responses"
    );
    assert_eq!(metric_sum(&m, "llm_probe_events_lost_total", &[]), 0.0);
}

/// 8 requests one at a time (chat and completions, streaming and not), then 64 concurrent streams.
fn round_of_requests(addr: &str, round: u64) -> Vec<Sample> {
    let mut samples = Vec::new();
    for i in 0..8u64 {
        let stream = i % 4 != 3;
        let (path, body) = if i % 2 == 0 {
            (
                "/v1/chat/completions",
                chat_body("tiny", stream, 16, &json!({})),
            )
        } else {
            (
                "/v1/completions",
                json!({"model": "tiny", "prompt": "The probe", "stream": stream, "max_tokens": 16})
                    .to_string(),
            )
        };
        samples.extend(run_concurrent(
            addr,
            vec![req(path, body, &id(round * 10 + 1, i))],
        ));
    }
    let reqs = (0..64u64)
        .map(|i| chat_req(&id(round * 10 + 2, i), "tiny", true, 12, &json!({})))
        .collect();
    samples.extend(run_concurrent(addr, reqs));
    samples
}
