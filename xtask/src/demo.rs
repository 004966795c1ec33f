//! `cargo xtask demo`: a real tiny engine (llama-cpp-python + a random-weight llama GGUF), a bounded
//! load on loopback, llm-probe attached by port, and a live summary of what it measures.
use std::{
    path::Path,
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use serde_json::Value;

use crate::{root, step};

struct Kill(Child);
impl Drop for Kill {
    fn drop(&mut self) {
        // SAFETY: signal to our own child; SIGINT lets llm-probe detach cleanly.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGINT) };
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(3) {
            if matches!(self.0.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn get(addr: &str, path: &str) -> Option<String> {
    tests::http_get(addr, path).ok().map(|(_, body)| body)
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i.min(v.len() - 1)]
}

fn summary(addr: &str) -> Option<String> {
    let v: Value = serde_json::from_str(&get(addr, "/api/v1/requests")?).ok()?;
    let reqs = v["requests"].as_array()?;
    let mut ttft: Vec<f64> = reqs
        .iter()
        .filter_map(|r| r["ttft_ns"].as_f64())
        .map(|x| x / 1e6)
        .collect();
    let mut tbt: Vec<f64> = reqs
        .iter()
        .filter_map(|r| r["gaps_ns"].as_array())
        .flatten()
        .filter_map(Value::as_f64)
        .map(|x| x / 1e6)
        .collect();
    let errors = reqs.iter().filter(|r| r["outcome"] != "ok").count();
    let metrics = get(addr, "/metrics").unwrap_or_default();
    let series = |name: &str| tests::metric_sum(&metrics, name, &[]);
    Some(format!(
        "requests {:>5} (errors {errors})  TTFT p50 {:>7.2} ms p99 {:>7.2} ms  TBT p50 {:>6.2} ms p99 {:>6.2} ms  \
         {:>7.1} tok/s  queue {} batch {}",
        v["finished_total"],
        pct(&mut ttft, 0.5),
        pct(&mut ttft, 0.99),
        pct(&mut tbt, 0.5),
        pct(&mut tbt, 0.99),
        series("llm_tokens_per_second"),
        series("llm_queue_depth"),
        series("llm_batch_size"),
    ))
}

/// Returns the number of requests llm-probe recorded.
pub fn run(probe: &Path, duration: u64, listen: &str) -> Result<u64> {
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        ctrlc::set_handler(move || stop.store(true, Ordering::SeqCst))
            .context("installing Ctrl-C handler")?;
    }
    let port = tests::free_port();
    step(&format!(
        "starting the engine: llama-cpp-python on 127.0.0.1:{port} with a tiny random llama"
    ));
    let engine = Kill(
        tests::llama_command(port)
            .args(["--model_alias", "tiny-llama"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting llama-cpp-python")?,
    );
    let engine_addr = format!("127.0.0.1:{port}");
    let start = Instant::now();
    while get(&engine_addr, "/v1/models").is_none() {
        if start.elapsed() > Duration::from_mins(1) {
            bail!("the engine did not come up in 60 s");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    step(&format!(
        "attaching: llm-probe run --port {port} --listen {listen}"
    ));
    let probe_proc = Kill(
        Command::new(probe)
            .args(["run", "--port", &port.to_string(), "--listen", listen])
            .spawn()
            .context("starting llm-probe")?,
    );
    let start = Instant::now();
    while get(listen, "/health").is_none() {
        if start.elapsed() > Duration::from_secs(30) {
            bail!("llm-probe did not come up in 30 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let max_seconds = if duration == 0 { 3600 } else { duration };
    step(&format!(
        "load: 4 concurrent streams (chat, 3 of 4 streaming) for up to {max_seconds} s"
    ));
    let load = Kill(
        Command::new(root().join("target/release/llm-load"))
            .args([
                "--addr",
                &engine_addr,
                "--concurrency",
                "4",
                "--requests",
                "100000",
            ])
            .args([
                "--max-seconds",
                &max_seconds.to_string(),
                "--max-tokens",
                "48",
            ])
            .stdout(Stdio::null())
            .spawn()
            .context("starting llm-load")?,
    );
    step(&format!(
        "live summary (metrics at http://{listen}/metrics); Ctrl-C to stop"
    ));
    let begin = Instant::now();
    while !stop.load(Ordering::SeqCst)
        && (duration == 0 || begin.elapsed() < Duration::from_secs(duration))
    {
        std::thread::sleep(Duration::from_secs(2));
        if let Some(line) = summary(listen) {
            println!("{line}");
        }
    }
    drop(load);
    step("a few of the exported series:");
    let metrics = get(listen, "/metrics").unwrap_or_default();
    for l in metrics.lines().filter(|l| {
        l.starts_with("llm_requests_total")
            || l.starts_with("llm_ttft_seconds_count")
            || l.starts_with("llm_tbt_seconds_count")
            || l.starts_with("llm_generated_tokens_total")
            || l.starts_with("llm_probe_events_total")
            || l.starts_with("llm_probe_events_lost_total")
    }) {
        println!("  {l}");
    }
    let recorded = get(listen, "/api/v1/requests")
        .and_then(|b| serde_json::from_str::<Value>(&b).ok())
        .and_then(|v| v["finished_total"].as_u64())
        .unwrap_or(0);
    drop(probe_proc);
    drop(engine);
    Ok(recorded)
}
