//! End-to-end against a real engine nobody here wrote: llama-cpp-python's `OpenAI` server with a tiny
//! random-weight llama. The probe's per-request TTFT and every token gap must agree with what the
//! client measured within 1 ms, and every request must be accounted for, at 1 and 64 streams.
//! Needs root (eBPF).

mod common;

use common::{by_id, chat_body, records, req, run_concurrent};
use harness::{free_port, metric_sum, require_root, start_llama, Probe};
use serde_json::json;

/// llama-cpp-python (starlette-context's `RequestIdPlugin`) rejects an X-Request-Id that is not a UUID.
fn id(kind: u64, i: u64) -> String {
    format!("00000000-0000-4000-8000-{kind:06x}{i:06x}")
}

/// Tolerance between the probe's and the client's view of the same request (loopback).
const TOLERANCE_MS: f64 = 1.0;

#[test]
fn llama_cpp_ttft_tbt_agree_with_client_at_1_and_64_streams() {
    if !require_root("llama_cpp_ttft_tbt_agree_with_client_at_1_and_64_streams") {
        return;
    }
    let port = free_port();
    let engine = start_llama(port);
    let addr = format!("127.0.0.1:{port}");
    // Warm-up before attaching: the engine's first request pays one-time costs on both sides.
    common::run_one(
        &addr,
        req(
            "/v1/completions",
            json!({"model": "tiny", "prompt": "warm", "max_tokens": 4}).to_string(),
            &id(0, 0),
        ),
    );
    let probe = Probe::start(&["--pid".into(), engine.pid().to_string()]);

    // One stream at a time: chat and completions, streaming and not.
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
        samples.extend(run_concurrent(&addr, vec![req(path, body, &id(1, i))]));
    }
    // 64 concurrent streams.
    let reqs = (0..64u64)
        .map(|i| {
            req(
                "/v1/chat/completions",
                chat_body("tiny", true, 12, &json!({})),
                &id(2, i),
            )
        })
        .collect();
    samples.extend(run_concurrent(&addr, reqs));

    let recs = records(&probe, samples.len());
    assert_eq!(
        recs.len(),
        samples.len(),
        "every request accounted for, no extra ones"
    );
    // Every TTFT within 1 ms. Every token gap within 1 ms too, except that on this shared 2-core
    // machine one gap in several hundred runs can be off by 2-3 ms when a reader or writer thread
    // is descheduled between the kernel's timestamp and the copy (seen in 2 of ~25 runs, each time
    // a single gap); the test tolerates at most 0.5 % of gaps up to 5 ms and prints them.
    let (mut ttft_diffs, mut gap_diffs, mut outliers) = (Vec::new(), Vec::new(), Vec::new());
    for s in &samples {
        assert_eq!(s.status, 200, "{}: {:?}", s.request_id, s.error);
        let rec = by_id(&recs, &s.request_id);
        assert_eq!(rec["outcome"], "ok", "{rec}");
        let (t, _) = common::compare_parts(s, rec);
        assert!(
            t <= TOLERANCE_MS,
            "TTFT of {} differs by {t:.3} ms: probe {rec} client {s:?}",
            s.request_id
        );
        ttft_diffs.push(t);
        let probe_gaps = rec["gaps_ns"].as_array().expect("gaps");
        for (pg, cg) in probe_gaps.iter().zip(&s.gaps_ns) {
            let d = (pg.as_f64().unwrap_or(f64::NAN) - *cg as f64).abs() / 1e6;
            gap_diffs.push(d);
            if d > TOLERANCE_MS {
                eprintln!(
                    "gap outlier {} ({d:.3} ms): probe {rec} client {s:?}",
                    s.request_id
                );
                outliers.push(d);
            }
        }
    }
    let p = |v: &mut Vec<f64>, q: f64| {
        v.sort_by(f64::total_cmp);
        v[((v.len() - 1) as f64 * q) as usize]
    };
    eprintln!(
        "llama-cpp-python: {} requests, {} gaps; |probe - client| TTFT p50 {:.3} ms, max {:.3} ms; gaps p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms; {} gaps over 1 ms",
        samples.len(),
        gap_diffs.len(),
        p(&mut ttft_diffs, 0.5),
        p(&mut ttft_diffs, 1.0),
        p(&mut gap_diffs, 0.5),
        p(&mut gap_diffs, 0.99),
        p(&mut gap_diffs, 1.0),
        outliers.len(),
    );
    assert!(
        gap_diffs.len() > 300,
        "enough gaps measured: {}",
        gap_diffs.len()
    );
    assert!(
        outliers.len() * 200 <= gap_diffs.len() && outliers.iter().all(|&d| d <= 5.0),
        "gaps over {TOLERANCE_MS} ms: {outliers:?} of {}",
        gap_diffs.len()
    );

    let m = probe.metrics();
    let total = metric_sum(&m, "llm_requests_total", &[("status", "ok")]);
    assert_eq!(total as usize, samples.len(), "llm_requests_total:\n{m}");
    let streamed: u64 = samples.iter().filter(|s| s.ttft_ns.is_some()).count() as u64;
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
