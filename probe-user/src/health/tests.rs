//! Every threshold edge of the health verdict, and the config file.
use super::*;
use crate::requests::RequestView;

fn base() -> Health {
    let mut h = Health {
        programs_attached: 3,
        programs_total: 3,
        ..Health::default()
    };
    h.targets.insert(
        1,
        TargetView {
            pid: 1,
            comm: "x".into(),
            alive: true,
            via: "pid",
        },
    );
    h
}

fn view(ttft_s: Option<f64>, outcome: &'static str) -> RequestView {
    RequestView {
        seq: 0,
        pid: 1,
        fd: 3,
        endpoint: "/v1/chat/completions",
        model: None,
        stream: Some(true),
        request_id: None,
        status: Some(200),
        outcome,
        arrival_ns: 0,
        ttft_ns: ttft_s.map(|s| (s * 1e9) as u64),
        stages_ns: None,
        hand_off: None,
        threads_ns: None,
        gpu_ns: None,
        engine_ns: None,
        decode_ns: None,
        duration_ns: 0,
        content_events: 1,
        tokens: 1,
        prompt_tokens: None,
        completion_tokens: None,
        gaps_ns: vec![],
    }
}

fn recent(items: Vec<RequestView>) -> Recent {
    Recent {
        finished_total: items.len() as u64,
        items: items.into(),
    }
}

fn status(h: &Health, r: &Recent, check: &str) -> Status {
    h.checks(r)[check].status
}

fn overall(h: &Health, r: &Recent) -> (u16, String) {
    let (code, body) = h.verdict(r);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    (code.as_u16(), v["overall"].as_str().unwrap().to_owned())
}

#[test]
fn kv_cache_edges() {
    let r = recent(vec![]);
    let mut h = base();
    assert_eq!(status(&h, &r, "kv_cache"), Status::Unavailable);
    assert_eq!(
        overall(&h, &r),
        (200, "healthy".into()),
        "unavailable never raises overall"
    );
    for (v, want, code) in [
        (0.5, "healthy", 200),
        (0.85, "healthy", 200),
        (0.8501, "warning", 200),
        (0.95, "warning", 200),
        (0.9501, "critical", 503),
    ] {
        h.kv_cache_max = Some(v);
        assert_eq!(overall(&h, &r), (code, want.into()), "kv {v}");
    }
    h.kv_cache_max = None;
    h.engine_failures = vec![("http://x/metrics".into(), "connection refused".into())];
    assert_eq!(
        status(&h, &r, "kv_cache"),
        Status::Warning,
        "an unreadable engine page warns"
    );
}

#[test]
fn latency_edges_and_window() {
    let h = base();
    assert_eq!(
        status(&h, &recent(vec![]), "latency"),
        Status::Healthy,
        "no data is healthy"
    );
    for (v, want) in [
        (2.0, Status::Healthy),
        (2.01, Status::Warning),
        (5.0, Status::Warning),
        (5.01, Status::Critical),
    ] {
        let r = recent((0..100).map(|_| view(Some(v), "ok")).collect());
        assert_eq!(status(&h, &r, "latency"), want, "ttft p99 {v}");
    }
    // p99 over 100: one slow request in 100 is the p99 at nearest rank 99 → not it.
    let mut items: Vec<_> = (0..99).map(|_| view(Some(0.1), "ok")).collect();
    items.push(view(Some(9.0), "ok"));
    assert_eq!(
        status(&h, &recent(items.clone()), "latency"),
        Status::Healthy
    );
    items.push(view(Some(9.0), "ok"));
    assert_eq!(
        status(&h, &recent(items), "latency"),
        Status::Critical,
        "two slow in the last 100"
    );
    // Slow requests older than the window do not count.
    let mut items: Vec<_> = (0..50).map(|_| view(Some(9.0), "ok")).collect();
    items.extend((0..100).map(|_| view(Some(0.1), "ok")));
    assert_eq!(status(&h, &recent(items), "latency"), Status::Healthy);
}

#[test]
fn error_rate_edges() {
    let h = base();
    for (errors, want) in [
        (0, Status::Healthy),
        (1, Status::Healthy),
        (2, Status::Warning),
        (5, Status::Warning),
        (6, Status::Critical),
    ] {
        let mut items: Vec<_> = (0..100 - errors).map(|_| view(Some(0.1), "ok")).collect();
        items.extend((0..errors).map(|_| view(None, "server_error")));
        assert_eq!(
            status(&h, &recent(items), "errors"),
            want,
            "{errors}/100 errors"
        );
    }
}

#[test]
fn queue_edges_and_engine_view() {
    let r = recent(vec![]);
    let mut h = base();
    for (q, want) in [
        (50.0, Status::Healthy),
        (51.0, Status::Warning),
        (200.0, Status::Warning),
        (201.0, Status::Critical),
    ] {
        h.queue_depth = q;
        assert_eq!(status(&h, &r, "queue"), want, "queue {q}");
    }
    h.queue_depth = 0.0;
    h.engine_queue_max = Some(300.0);
    assert_eq!(
        status(&h, &r, "queue"),
        Status::Critical,
        "the engine's own queue counts"
    );
}

#[test]
fn gpu_edges() {
    let r = recent(vec![]);
    let mut h = base();
    assert_eq!(status(&h, &r, "gpu"), Status::Unavailable);
    h.gpus = Some(Err("NVML: libnvidia-ml.so.1 not found".into()));
    let c = &h.checks(&r)["gpu"];
    assert_eq!(c.status, Status::Unavailable);
    assert!(c.issues[0].contains("libnvidia-ml"));
    assert_eq!(overall(&h, &r).1, "healthy");
    for (u, want) in [
        (0.5, Status::Healthy),
        (0.10, Status::Healthy),
        (0.05, Status::Warning),
        (0.99, Status::Healthy),
        (0.995, Status::Warning),
    ] {
        h.gpus = Some(Ok(vec![GpuView {
            index: 0,
            utilization: Some(u),
        }]));
        assert_eq!(status(&h, &r, "gpu"), want, "util {u}");
    }
}

#[test]
fn dead_target_is_critical_and_lost_events_warn() {
    let r = recent(vec![]);
    let mut h = base();
    h.events_lost = 2;
    assert_eq!(overall(&h, &r), (200, "warning".into()));
    h.targets.get_mut(&1).unwrap().alive = false;
    let (code, body) = h.verdict(&r);
    assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
    assert!(body.contains("exited"), "{body}");
}

#[test]
fn config_file_overrides_and_rejects_typos() {
    let c = Config::from_toml("[health]\nkv_cache_warning = 0.7\nqueue_critical = 10\n").unwrap();
    assert_eq!(c.health.kv_cache_warning, 0.7);
    assert_eq!(c.health.queue_critical, 10.0);
    assert_eq!(
        c.health.kv_cache_critical, 0.95,
        "unset keys keep their defaults"
    );
    let e = Config::from_toml("[health]\nkv_cach_warning = 0.7\n")
        .unwrap_err()
        .to_string();
    assert!(e.contains("kv_cach_warning"), "{e}");
}
