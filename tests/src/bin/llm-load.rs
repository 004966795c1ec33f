//! `llm-load`: a small, bounded load generator for an OpenAI-compatible server on loopback. Prints
//! one JSON line per request (what the client measured) or a summary. Used by `cargo xtask demo`.
use std::time::{Duration, Instant};

use clap::Parser;
use tests::client::{self, Req};

#[derive(Parser)]
#[command(about = "Bounded streaming load against a local LLM server (loopback only)")]
struct Args {
    /// Server address (must be on 127.0.0.0/8).
    #[arg(long, default_value = "127.0.0.1:8000")]
    addr: String,
    /// Concurrent streams.
    #[arg(long, default_value_t = 4)]
    concurrency: usize,
    /// Total requests (bounded).
    #[arg(long, default_value_t = 40)]
    requests: usize,
    /// Stop after this many seconds even if requests remain.
    #[arg(long, default_value_t = 60)]
    max_seconds: u64,
    #[arg(long, default_value_t = 32)]
    max_tokens: u32,
    #[arg(long, default_value = "tiny-llama")]
    model: String,
    /// Print one JSON line per request.
    #[arg(long)]
    json: bool,
    /// Print one JSON summary line (requests/s, p50/p99 end-to-end and TTFT) at the end.
    #[arg(long)]
    summary: bool,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    anyhow::ensure!(
        a.addr.starts_with("127.") || a.addr.starts_with("localhost"),
        "loopback only"
    );
    let start = Instant::now();
    let deadline = start + Duration::from_secs(a.max_seconds);
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..a.concurrency {
        let (next, addr, model, json) = (next.clone(), a.addr.clone(), a.model.clone(), a.json);
        let (total, max_tokens) = (a.requests, a.max_tokens);
        tasks.push(tokio::spawn(async move {
            let mut done = Vec::new();
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= total || Instant::now() > deadline {
                    return done;
                }
                let stream = i % 4 != 3;
                let body = serde_json::json!({
                    "model": model, "stream": stream, "max_tokens": max_tokens,
                    "messages": [{"role": "user", "content": "Say something about latency."}],
                });
                let req = Req {
                    path: "/v1/chat/completions".into(),
                    body: body.to_string(),
                    // UUID-shaped: llama-cpp-python rejects any other X-Request-Id.
                    request_id: format!("00000000-0000-4000-8000-{i:012x}"),
                    abort_after: None,
                    timeout: Duration::from_mins(1),
                };
                let s = client::run(&addr, &req).await;
                if json {
                    println!("{}", serde_json::to_string(&s).unwrap_or_default());
                }
                done.push(s);
            }
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await?);
    }
    let ok = all
        .iter()
        .filter(|s| s.error.is_none() && s.status == 200)
        .count();
    eprintln!("llm-load: {} requests, {ok} ok", all.len());
    if a.summary {
        let secs = start.elapsed().as_secs_f64();
        let pct = |mut v: Vec<u64>, q: f64| -> f64 {
            v.sort_unstable();
            v.get(((v.len().max(1) - 1) as f64 * q) as usize)
                .map_or(0.0, |&x| x as f64 / 1e6)
        };
        let e2e: Vec<u64> = all.iter().map(|s| s.duration_ns).collect();
        let ttft: Vec<u64> = all.iter().filter_map(|s| s.ttft_ns).collect();
        let tokens: u64 = all.iter().map(|s| s.content_events).sum();
        println!(
            "{}",
            serde_json::json!({
                "requests": all.len(), "ok": ok, "rps": all.len() as f64 / secs,
                "tokens": tokens, "tokens_per_s": tokens as f64 / secs,
                "p50_ms": pct(e2e.clone(), 0.5), "p99_ms": pct(e2e, 0.99),
                "ttft_p99_ms": pct(ttft, 0.99),
            })
        );
    }
    Ok(())
}
