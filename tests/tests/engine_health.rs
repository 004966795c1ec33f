//! The engine-metrics bridge and the health verdict end to end: a page server the test controls
//! plays the engine's /metrics (vLLM names), `llm-probe run --engine-metrics` re-exports it, and
//! `/health` plus `llm-probe health` follow KV-cache utilization 0.5 → 0.91 → 0.97 from healthy to
//! warning to critical. Without NVML (this machine, CI) the GPU check says unavailable. Root.

use std::{
    io::{Read as _, Write as _},
    net::TcpListener,
    process::Command,
    sync::{Arc, Mutex},
    time::Duration,
};

use tests::{free_port, metric_sum, probe_bin, require_root, start_node, wait_for, Probe};

fn vllm_page(kv: f64, waiting: u32) -> String {
    format!(
        "# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.\n\
         # TYPE vllm:kv_cache_usage_perc gauge\n\
         vllm:kv_cache_usage_perc{{engine=\"0\",model_name=\"tiny\"}} {kv}\n\
         # TYPE vllm:num_requests_waiting gauge\n\
         vllm:num_requests_waiting{{engine=\"0\",model_name=\"tiny\"}} {waiting}\n\
         # TYPE vllm:num_requests_running gauge\n\
         vllm:num_requests_running{{engine=\"0\",model_name=\"tiny\"}} 3\n\
         # TYPE vllm:num_preemptions counter\n\
         vllm:num_preemptions_total{{engine=\"0\",model_name=\"tiny\"}} 7\n"
    )
}

/// Serves whatever is in `page` (or a 500 when it starts with "500") to every request.
fn page_server(page: Arc<Mutex<String>>) -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = l.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
            let _ = s.read(&mut [0u8; 4096]);
            let body = page.lock().map(|p| p.clone()).unwrap_or_default();
            let status = if body.starts_with("500") {
                "500 Internal Server Error"
            } else {
                "200 OK"
            };
            let _ = write!(
                s,
                "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    port
}

fn cli_health(addr: &str) -> i32 {
    let out = Command::new(probe_bin())
        .args(["health", "--url", &format!("http://{addr}")])
        .output()
        .expect("llm-probe health");
    out.status.code().unwrap_or(-1)
}

#[test]
fn engine_bridge_moves_health_from_healthy_to_warning_to_critical() {
    if !require_root("engine_bridge_moves_health_from_healthy_to_warning_to_critical") {
        return;
    }
    let page = Arc::new(Mutex::new(vllm_page(0.5, 2)));
    let page_port = page_server(page.clone());
    let node_port = free_port();
    let _node = start_node(node_port);
    let probe = Probe::start(&[
        "--port".into(),
        node_port.to_string(),
        "--engine-metrics".into(),
        format!("http://127.0.0.1:{page_port}/metrics"),
        "--sample-interval".into(),
        "200ms".into(),
    ]);
    // worker_id = the URL's host:port plus the engine's own `engine` label (two vLLM servers
    // both say engine="0").
    let worker = format!("127.0.0.1:{page_port}/0");
    let kv = |p: &Probe| {
        metric_sum(
            &p.metrics(),
            "llm_kv_cache_utilization",
            &[("worker_id", &worker)],
        )
    };
    wait_for("KV 0.5 re-exported", Duration::from_secs(10), || {
        kv(&probe) == 0.5
    });
    let m = probe.metrics();
    assert_eq!(
        metric_sum(&m, "llm_engine_queue_depth", &[("worker_id", &worker)]),
        2.0,
        "{m}"
    );
    assert_eq!(
        metric_sum(&m, "llm_engine_batch_size", &[("worker_id", &worker)]),
        3.0,
        "{m}"
    );
    assert_eq!(
        metric_sum(&m, "llm_preemption_total", &[("worker_id", &worker)]),
        7.0,
        "{m}"
    );
    assert_eq!(
        metric_sum(&m, "llm_probe_attached", &[("program", "nvml")]),
        0.0,
        "no NVML here: {m}"
    );
    let (code, h) = probe.health();
    assert_eq!((code, h["overall"].as_str()), (200, Some("healthy")), "{h}");
    assert_eq!(h["checks"]["gpu"]["status"], "unavailable", "{h}");
    assert_eq!(h["checks"]["kv_cache"]["value"], 0.5, "{h}");
    assert_eq!(cli_health(&probe.addr), 0);

    *page.lock().unwrap() = vllm_page(0.91, 2);
    wait_for("KV 0.91", Duration::from_secs(10), || kv(&probe) == 0.91);
    let (code, h) = probe.health();
    assert_eq!((code, h["overall"].as_str()), (200, Some("warning")), "{h}");
    assert_eq!(cli_health(&probe.addr), 1);

    *page.lock().unwrap() = vllm_page(0.97, 2);
    wait_for("KV 0.97", Duration::from_secs(10), || kv(&probe) == 0.97);
    let (code, h) = probe.health();
    assert_eq!(
        (code, h["overall"].as_str()),
        (503, Some("critical")),
        "{h}"
    );
    assert_eq!(cli_health(&probe.addr), 2);

    // The engine goes bad: errors are counted and its gauges expire instead of going stale.
    *page.lock().unwrap() = "500".into();
    wait_for("scrape errors counted", Duration::from_secs(10), || {
        metric_sum(
            &probe.metrics(),
            "llm_probe_engine_scrape_errors_total",
            &[],
        ) >= 1.0
    });
    wait_for("stale KV gauge removed", Duration::from_secs(10), || {
        !probe.metrics().contains("llm_kv_cache_utilization{")
    });
    *page.lock().unwrap() = "<html>not metrics</html>".into();
    std::thread::sleep(Duration::from_millis(600));
    assert!(probe
        .metrics()
        .contains("llm_probe_engine_scrape_errors_total"));
    assert_eq!(
        cli_health(&probe.addr),
        1,
        "an unreadable engine page is a warning"
    );
    assert_eq!(cli_health("127.0.0.1:1"), 3, "unreachable probe");
}
