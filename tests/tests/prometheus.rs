//! Dashboards and alert rules meet a real Prometheus: Debian's `prometheus`, started on loopback
//! with a temporary config, scrapes `llm-probe` attached to the real tiny engine under load (plus
//! an engine metrics page for the KV-cache panels). Every panel query of
//! deploy/grafana/llm-probe.json is evaluated through the HTTP API and must return data, except
//! panels documented as GPU-only (NVML; skipped, with the reason printed, when no GPU exists). The
//! CUDA panels get their data from the stand-in libcuda/libcudart engine (tests/fixtures/cuda)
//! traced by the same probe. Every rule of deploy/prometheus/llm-probe-rules.yml must load and
//! evaluate. Needs root (eBPF).

use std::{
    io::{Read as _, Write as _},
    net::TcpListener,
    process::Command,
    time::Duration,
};

use serde_json::Value;
use tests::{
    fake_cuda::{self, FakeEngine},
    free_port, http_get, output_ok,
    prom::Prometheus,
    require_root, start_llama, wait_for, workspace_root, Probe,
};

fn engine_page_server() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = l.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        let mut preemptions = 0u64;
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
            let _ = s.read(&mut [0u8; 4096]);
            preemptions += 1;
            let body = format!(
                "vllm:kv_cache_usage_perc{{engine=\"0\"}} 0.42\nvllm:num_requests_waiting{{engine=\"0\"}} 1\n\
                 vllm:num_requests_running{{engine=\"0\"}} 2\nvllm:num_preemptions_total{{engine=\"0\"}} {preemptions}\n"
            );
            let _ = write!(
                s,
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    port
}

#[test]
fn every_dashboard_query_returns_data_and_every_rule_evaluates() {
    if !require_root("every_dashboard_query_returns_data_and_every_rule_evaluates") {
        return;
    }
    let root = workspace_root();
    let engine_port = free_port();
    let engine = start_llama(engine_port);
    let page_port = engine_page_server();
    // The stand-in CUDA engine fills the CUDA panels (launches, syncs, steps, ledger, KV pool).
    let fc = fake_cuda::build().expect("building the stand-in CUDA libraries");
    let mut cuda_engine = FakeEngine::start(&fc, "full", &[], 2000).expect("fake CUDA engine");
    let probe = Probe::start(&[
        "--pid".into(),
        engine.pid().to_string(),
        "--pid".into(),
        cuda_engine.pid.to_string(),
        "--kv-pool-min-age".into(),
        "1s".into(),
        "--engine-metrics".into(),
        format!("http://127.0.0.1:{page_port}/metrics"),
        "--sample-interval".into(),
        "1s".into(),
    ]);

    let prom = Prometheus::start(&probe.addr);

    fake_cuda::wait_attached(&probe);
    cuda_engine.go().expect("CUDA scenario");

    // Load for ~12 s while Prometheus scrapes every 250 ms (bounded: 400 requests at most).
    output_ok(
        "llm-load",
        Command::new(root.join("target/release/llm-load"))
            .args([
                "--addr",
                &format!("127.0.0.1:{engine_port}"),
                "--concurrency",
                "4",
                "--requests",
                "400",
            ])
            .args(["--max-seconds", "12", "--max-tokens", "16"]),
    );
    // A `rate()` needs two scrapes of a series: wait for three scrapes of the probe (the load
    // can end before Prometheus's first scrape: its service discovery takes ~5 s to hand over
    // the target, and 400 requests on the tiny model may take less).
    wait_for(
        "three scrapes of the probe",
        Duration::from_secs(30),
        || {
            prom.query("count_over_time(up{job=\"llm-probe\"}[5m])")["data"]["result"][0]["value"]
                [1]
            .as_str()
            .and_then(|v| v.parse::<u32>().ok())
            .is_some_and(|n| n >= 3)
        },
    );
    std::thread::sleep(Duration::from_secs(2));
    let up = prom.query("up{job=\"llm-probe\"}");
    assert_eq!(
        up["data"]["result"][0]["value"][1], "1",
        "Prometheus scrapes the probe: {up}"
    );

    let gpu = !prom.query("llm_gpu_utilization")["data"]["result"]
        .as_array()
        .is_none_or(Vec::is_empty);
    let dash: Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("deploy/grafana/llm-probe.json")).expect("dashboard"),
    )
    .expect("dashboard is JSON");
    let (mut checked, mut skipped) = (0, 0);
    let mut failures = Vec::new();
    for p in dash["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .filter(|p| p["type"] != "row")
    {
        let title = p["title"].as_str().unwrap_or("?");
        let gpu_only = p["description"]
            .as_str()
            .is_some_and(|d| d.contains("GPU-only"));
        for t in p["targets"].as_array().expect("targets") {
            let expr = t["expr"].as_str().expect("expr");
            assert!(
                !expr.contains("histogram_quantile") || expr.contains("sum by (le"),
                "{title}: histogram_quantile must aggregate with sum by (le, …): {expr}"
            );
            let q = expr.replace("$instance", ".*").replace("$model", ".*");
            let v = prom.query(&q);
            assert_eq!(v["status"], "success", "{title}: {q} → {v}");
            let empty = v["data"]["result"].as_array().is_none_or(Vec::is_empty);
            if gpu_only && !gpu {
                eprintln!("SKIP panel {title:?}: GPU-only and this machine has no GPU ({q})");
                skipped += 1;
            } else if empty {
                failures.push(format!("{title}: {q}"));
            } else {
                checked += 1;
            }
        }
    }
    eprintln!("dashboard: {checked} queries returned data, {skipped} GPU-only skipped");
    assert!(
        failures.is_empty(),
        "queries without data:\n{}",
        failures.join("\n")
    );
    assert!(checked >= 15, "{checked}");

    // Every rule loaded and evaluated without error.
    let rules_file =
        std::fs::read_to_string(root.join("deploy/prometheus/llm-probe-rules.yml")).expect("rules");
    let expected = rules_file.matches("- alert:").count();
    wait_for("rules evaluated", Duration::from_secs(20), || {
        let (_, body) = http_get(&prom.addr, "/api/v1/rules").expect("rules API");
        let v: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
        let rules: Vec<&Value> = v["data"]["groups"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|g| g["rules"].as_array().into_iter().flatten())
            .collect();
        rules.len() == expected
            && rules.iter().all(|r| {
                r["health"] == "ok"
                    && r["lastEvaluation"]
                        .as_str()
                        .is_some_and(|t| !t.starts_with("0001"))
            })
    });
    eprintln!("rules: {expected} alert rules loaded and evaluated (health ok)");
}
