use prometheus_client::registry::Registry;

use super::*;
use crate::http::{Gap, Moment, Outcome, ThreadClock};

/// A gap of `ns` ending at `to`, its thread not known.
fn gap(to: u64, ns: u64) -> Gap {
    let at = |ts_ns| Moment {
        ts_ns,
        ..Moment::default()
    };
    Gap {
        from: at(to - ns),
        to: at(to),
        id: None,
    }
}

fn meta(model: Option<&str>) -> RequestMeta {
    RequestMeta {
        endpoint: Some(Endpoint::ChatCompletions),
        model: model.map(str::to_owned),
        ..RequestMeta::default()
    }
}

fn record(m: RequestMeta) -> RequestRecord {
    RequestRecord {
        conn: ConnId { tgid: 1, fd: 3 },
        meta: m,
        status: Some(200),
        outcome: Outcome::Ok,
        arrival_ns: 1_000,
        first_token_ns: Some(2_000),
        // Read at 1,200 (200 ns in the socket); the same thread wrote the first token 800 ns
        // later after 400 on a CPU, 100 runnable and 300 blocked.
        read: Moment {
            ts_ns: 1_200,
            tid: 5,
            clock: ThreadClock {
                on_cpu_ns: 100,
                runnable_ns: 0,
                blocked_ns: 0,
                ..ThreadClock::default()
            },
        },
        first_token_at: Some(Moment {
            ts_ns: 2_000,
            tid: 5,
            clock: ThreadClock {
                on_cpu_ns: 500,
                runnable_ns: 100,
                blocked_ns: 300,
                ..ThreadClock::default()
            },
        }),
        end_ns: 5_000,
        content_events: 3,
        token_events: 3,
        gaps_ns: vec![1_000, 1_000],
        prompt_tokens: Some(4),
        completion_tokens: Some(5),
        response_id: None,
    }
}

#[test]
fn model_labels_are_capped_and_gauges_balance() {
    let mut registry = Registry::default();
    let metrics = RequestMetrics::new(&mut registry);
    let mut s = RequestStats::new(metrics, SharedRecent::default());
    let conn = ConnId { tgid: 1, fd: 3 };
    for i in 0..(MAX_MODELS + 5) {
        let m = meta(Some(&format!("model-{i}")));
        s.request_started(conn, &m, 1_000);
        s.first_token(conn, &m, 1_000);
        s.token_gap(conn, &m, gap(1_000, 1_000));
        s.request_finished(record(m));
    }
    let m = meta(None);
    s.request_started(conn, &m, 1_000);
    assert_eq!((s.queue_depth(), s.batch_size()), (1, 0));
    s.request_finished(RequestRecord {
        first_token_ns: None,
        ..record(m)
    });
    assert_eq!((s.queue_depth(), s.batch_size()), (0, 0));

    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    let models: std::collections::BTreeSet<_> = text
        .lines()
        .filter(|l| l.starts_with("llm_requests_total{"))
        .filter_map(|l| l.split("model=\"").nth(1)?.split('"').next())
        .collect();
    assert_eq!(
        models.len(),
        MAX_MODELS + 2,
        "32 names + other + unknown: {models:?}"
    );
    assert!(models.contains("other") && models.contains("unknown"));
    assert!(
        text.contains(
            "llm_requests_total{model=\"other\",endpoint=\"/v1/chat/completions\",status=\"ok\"} 5"
        ),
        "{text}"
    );
    // usage.completion_tokens (5) wins over content events (3).
    assert!(
        text.contains("llm_generated_tokens_total{model=\"model-0\"} 5"),
        "{text}"
    );
    assert!(
        text.contains("llm_prompt_tokens_total{model=\"model-0\"} 4"),
        "{text}"
    );
    assert_eq!(
        s.recent.lock().unwrap().finished_total,
        MAX_MODELS as u64 + 6
    );
}

#[test]
fn ttft_stages_reach_the_log_and_the_metrics() {
    let mut registry = Registry::default();
    let metrics = RequestMetrics::new(&mut registry);
    let mut s = RequestStats::new(metrics, SharedRecent::default());
    let conn = ConnId { tgid: 1, fd: 3 };
    let m = meta(Some("m"));
    s.request_started(conn, &m, 1_000);
    s.first_token(conn, &m, 1_000);
    // Two gaps: 2,000..3,000 with the engine's answer received at 2,700; 3,000..3,400 without.
    let recv = Moment {
        ts_ns: 2_700,
        ..Moment::default()
    };
    s.ipc.record(1, recv, false, b"");
    // GPU waits of the process: one inside the TTFT's engine stage (1,200..2,000), one inside the
    // first gap's engine part (2,000..2,700), one in its output part (not counted).
    s.gpu.record(1, 1_300, 1_500);
    s.gpu.record(1, 2_100, 2_500);
    s.gpu.record(1, 2_750, 2_800);
    // The first gap's writes were both made by thread 5: 200 on a CPU, 100 runnable, 700
    // blocked; the second's first write has no known thread.
    let on5 = |ts_ns, on, run, blk| Moment {
        ts_ns,
        tid: 5,
        clock: ThreadClock {
            on_cpu_ns: on,
            runnable_ns: run,
            blocked_ns: blk,
            ..ThreadClock::default()
        },
    };
    let first_gap = Gap {
        from: on5(2_000, 1_000, 0, 0),
        to: on5(3_000, 1_200, 100, 700),
        id: None,
    };
    s.now_ns = 3_000;
    s.token_gap(conn, &m, first_gap);
    s.now_ns = 3_400;
    s.token_gap(conn, &m, gap(3_400, 400));
    s.request_finished(record(m.clone()));
    // A second request whose first token was written by another thread: no split.
    s.request_started(conn, &m, 1_000);
    s.first_token(conn, &m, 1_000);
    let mut other = record(m);
    other.first_token_at = other.first_token_at.map(|f| Moment { tid: 6, ..f });
    s.request_finished(other);

    let recent = s.recent.lock().unwrap();
    let v = serde_json::to_value(&recent.items[0]).unwrap();
    assert_eq!(v["ttft_ns"], 1_000);
    assert_eq!(
        v["stages_ns"],
        serde_json::json!({"socket_queue": 200, "frontend": 0, "engine": 800, "output": 0})
    );
    assert_eq!(
        v["threads_ns"],
        serde_json::json!({
            "server": {"on_cpu": 400, "runnable": 100, "blocked": 300},
            "engine": {"on_cpu": 400, "runnable": 100, "blocked": 300},
            "frontend": {"on_cpu": 0, "runnable": 0, "blocked": 0},
            "output": {"on_cpu": 0, "runnable": 0, "blocked": 0},
        }),
        "no hand-off: the engine stage is the server span"
    );
    assert_eq!(
        v["decode_ns"],
        serde_json::json!({"engine": 1_100, "output": 300, "by_id": 0, "gpu_sync": 400, "threads":
            {"on_cpu": 200, "runnable": 100, "blocked": 700, "unknown": 400}})
    );
    assert_eq!(
        v["gpu_ns"],
        serde_json::json!({"sync_wait": 200, "syncs": 1})
    );
    let v = serde_json::to_value(&recent.items[1]).unwrap();
    assert_eq!(v["threads_ns"], serde_json::Value::Null);
    assert_eq!(
        v["decode_ns"],
        serde_json::Value::Null,
        "no gaps, no decode split"
    );
    drop(recent);

    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    assert!(
        !text.contains("stage=\"frontend\",state"),
        "no hand-off: no frontend thread time\n{text}"
    );
    for line in [
        "llm_ttft_stage_seconds_count{model=\"m\",stage=\"socket_queue\"} 2",
        "llm_ttft_stage_seconds_sum{model=\"m\",stage=\"engine\"} 0.0000016",
        "llm_ttft_stage_thread_seconds_total{stage=\"server\",state=\"on_cpu\"} 4e-7",
        "llm_ttft_gpu_wait_seconds_count{model=\"m\"} 2",
        "llm_tbt_gpu_wait_seconds_total 4e-7",
        "llm_ttft_stage_thread_seconds_total{stage=\"server\",state=\"unknown\"} 8e-7",
        "llm_ttft_stage_thread_seconds_total{stage=\"engine\",state=\"on_cpu\"} 4e-7",
        "llm_ttft_stage_thread_seconds_total{stage=\"engine\",state=\"unknown\"} 8e-7",
        "llm_tbt_stage_seconds_total{stage=\"engine\"} 0.0000011",
        "llm_tbt_stage_seconds_total{stage=\"output\"} 3e-7",
        "llm_tbt_thread_seconds_total{state=\"blocked\"} 7e-7",
        "llm_tbt_thread_seconds_total{state=\"unknown\"} 4e-7",
    ] {
        assert!(text.contains(line), "{line} in\n{text}");
    }
}

#[test]
fn token_window_rate() {
    let mut w = TokenWindow::default();
    for sec in 0..10u64 {
        w.add(sec * 1_000_000_000 + 5, 20);
    }
    assert!((w.rate(10 * 1_000_000_000) - 20.0).abs() < 1e-9);
    assert!(
        w.rate(30 * 1_000_000_000).abs() < 1e-9,
        "old seconds fall out of the window"
    );
}

fn labels_of(registry: &Registry) -> std::collections::BTreeSet<String> {
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, registry).unwrap();
    text.lines()
        .filter(|l| l.starts_with("llm_requests_total{"))
        .filter_map(|l| Some(l.split("model=\"").nth(1)?.split('"').next()?.to_owned()))
        .collect()
}

/// A flood of made-up names answered 404 takes no slot; the real model, answered 2xx, gets
/// its own label afterwards; hostile bytes never reach the page.
#[test]
fn models_are_admitted_on_success_only_and_made_safe() {
    let mut registry = Registry::default();
    let mut s = RequestStats::new(RequestMetrics::new(&mut registry), SharedRecent::default());
    let conn = ConnId { tgid: 1, fd: 3 };
    for i in 0..1000 {
        let m = meta(Some(&format!("bogus-{i}")));
        s.request_started(conn, &m, 1_000);
        s.request_finished(RequestRecord {
            status: Some(404),
            outcome: Outcome::ClientError,
            first_token_ns: None,
            content_events: 0,
            token_events: 0,
            gaps_ns: Vec::new(),
            ..record(m)
        });
    }
    for name in ["real-model", "evil\"} 1\nllm_x{a=\"", "nul\0esc\u{1b}[31m"] {
        let m = meta(Some(name));
        s.request_started(conn, &m, 1_000);
        s.first_token(conn, &m, 1_000);
        s.request_finished(record(m));
    }
    let got = labels_of(&registry);
    let want: std::collections::BTreeSet<String> =
        ["other", "real-model", "evil___1_llm_x_a=_", "nul_esc__31m"]
            .into_iter()
            .map(str::to_owned)
            .collect();
    assert_eq!(got, want);
}

/// With an allowlist, exactly those names get a label, even when others are answered 2xx.
#[test]
fn allowlisted_models_only() {
    let mut registry = Registry::default();
    let mut s = RequestStats::new(RequestMetrics::new(&mut registry), SharedRecent::default());
    s.set_policy(ModelPolicy {
        allow: vec!["llama".to_owned()],
        max: 1,
    });
    let conn = ConnId { tgid: 1, fd: 3 };
    for name in ["whatever", "llama"] {
        let m = meta(Some(name));
        s.request_started(conn, &m, 1_000);
        s.first_token(conn, &m, 1_000);
        s.request_finished(record(m));
    }
    let got = labels_of(&registry);
    assert_eq!(got.into_iter().collect::<Vec<_>>(), ["llama", "other"]);
}

/// Two HTTP/2 streams of one connection stream together: each request's decode split holds its
/// own gaps only, and the first to finish does not take the other's.
#[test]
fn concurrent_requests_of_one_connection_keep_their_own_decode() {
    let mut registry = Registry::default();
    let metrics = RequestMetrics::new(&mut registry);
    let mut s = RequestStats::new(metrics, SharedRecent::default());
    let conn = ConnId { tgid: 1, fd: 3 };
    let (a, b) = (
        RequestMeta {
            seq: 1,
            ..meta(Some("m"))
        },
        RequestMeta {
            seq: 2,
            ..meta(Some("m"))
        },
    );
    for m in [&a, &b] {
        s.request_started(conn, m, 1_000);
        s.first_token(conn, m, 1_000);
    }
    for (now, m, gap) in [(3_000, &a, 1_000), (3_100, &b, 1_100), (3_500, &a, 500)] {
        s.now_ns = now;
        s.token_gap(conn, m, self::gap(now, gap));
    }
    s.request_finished(record(a));
    s.now_ns = 4_000;
    s.token_gap(conn, &b, gap(4_000, 900));
    s.request_finished(record(b));
    let recent = s.recent.lock().unwrap();
    let engine =
        |i: usize| serde_json::to_value(&recent.items[i]).unwrap()["decode_ns"]["engine"].clone();
    assert_eq!((engine(0), engine(1)), (1_500.into(), 2_000.into()));
}
