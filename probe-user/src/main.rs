//! `llm-probe`: per-request TTFT/TBT of an unmodified, running LLM inference server, measured from
//! its own sockets through eBPF, exported as Prometheus `llm_*` metrics.
// Doc comments on the CLI types are clap's `--help` text for operators: plain prose, no Markdown.
#![expect(
    clippy::doc_markdown,
    reason = "clap help text is shown verbatim in --help"
)]
use std::net::SocketAddr;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use probe_user::agent;

mod memleak;

#[derive(Parser)]
#[command(
    name = "llm-probe",
    version,
    about = "Time every request of a running LLM server (TTFT, TBT, e2e, errors, tokens/s) from its \
             own sockets through eBPF - no code change, no restart",
    after_help = "Examples:\n  \
      sudo llm-probe run --port 8000                 # the server listening on :8000\n  \
      sudo llm-probe run --pid 4242 --pid 4243       # these processes and their children\n  \
      curl -s localhost:9464/metrics | grep llm_ttft # what users feel\n\n\
      Needs root (or CAP_BPF, CAP_PERFMON, CAP_SYS_PTRACE and CAP_DAC_READ_SEARCH).\n\
      Log level: RUST_LOG=debug."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// GPU memory ledger and CUDA probe settings of `run`.
#[derive(clap::Args, Clone)]
struct LedgerArgs {
    /// Live allocations at least this old, at call sites whose live bytes grew over
    /// --leak-window, count as leak suspects (llm_gpu_memory_leak_suspect_bytes).
    #[arg(long = "leak-age", default_value = "30s", value_parser = humantime::parse_duration, value_name = "DURATION")]
    leak_age: std::time::Duration,
    /// Window over which a call site's growth is judged.
    #[arg(long = "leak-window", default_value = "5m", value_parser = humantime::parse_duration, value_name = "DURATION")]
    leak_window: std::time::Duration,
    /// A VMM reservation must live this long before it is reported as the KV-cache pool
    /// (llm_kv_cache_pool_bytes).
    #[arg(long = "kv-pool-min-age", default_value = "10s", value_parser = humantime::parse_duration, value_name = "DURATION")]
    kv_pool_min_age: std::time::Duration,
    /// Which CUDA launch entry points to probe. all: driver and runtime (launches counted under
    /// the API the application called). driver: cuLaunchKernel & co. only - a cudaLaunchKernel
    /// that reaches the driver (all of them with driver 580) is counted once, under the driver's
    /// name, with one probe hit per launch instead of two (eager-mode engines launch thousands of
    /// kernels per step; see docs/cuda.md).
    #[arg(long = "cuda-launch-probes", value_enum, default_value_t = LaunchProbes::All)]
    cuda_launch_probes: LaunchProbes,
    /// Where the CUDA uprobes apply. host: each library file once, for every process that maps
    /// it (also after a later dlopen, fork or exec); untraced processes using the same libcuda
    /// take each breakpoint (about 1 us) and are filtered out. process: only the traced
    /// processes pay, but a child is covered from the next second after its fork, and a process
    /// that execs after attach is not covered again.
    #[arg(long = "cuda-probe-scope", value_enum, default_value_t = ProbeScope::Host)]
    cuda_probe_scope: ProbeScope,
}

#[derive(clap::ValueEnum, Clone, Copy, PartialEq, Eq)]
enum ProbeScope {
    Host,
    Process,
}

#[derive(clap::ValueEnum, Clone, Copy, PartialEq, Eq)]
enum LaunchProbes {
    All,
    Driver,
}

impl LedgerArgs {
    fn config(&self) -> probe_user::cuda::ledger::LedgerConfig {
        probe_user::cuda::ledger::LedgerConfig {
            leak_age_ns: self.leak_age.as_nanos() as u64,
            window_ns: self.leak_window.as_nanos() as u64,
            kv_pool_min_age_ns: self.kv_pool_min_age.as_nanos() as u64,
        }
    }
}

#[derive(Subcommand)]
enum Command {
    /// Attach to a server and export metrics until interrupted (SIGINT/SIGTERM detach cleanly).
    Run {
        /// Process to trace, with all its descendants, including ones forked later (vLLM's API
        /// server and engine core are separate processes). Repeatable.
        #[arg(long = "pid", value_name = "PID")]
        pids: Vec<u32>,
        /// Trace whichever process listens on this TCP port; if it exits, re-attach when a process
        /// listens on the port again.
        #[arg(long, value_name = "PORT")]
        port: Option<u16>,
        /// Address for /metrics, /health and /api/v1/requests.
        #[arg(long, default_value = "127.0.0.1:9464", value_name = "ADDR")]
        listen: SocketAddr,
        /// How often to sample NVML and scrape the engines' own metrics pages (e.g. 5s, 500ms).
        #[arg(long = "nvml-interval", default_value = "5s", value_parser = humantime::parse_duration, value_name = "DURATION")]
        sample_interval: std::time::Duration,
        /// An engine's own Prometheus page to scrape and re-export normalised (KV-cache
        /// utilization, preemptions, engine queue and batch): vLLM, SGLang, TGI, llama.cpp.
        /// Repeatable. Example: --engine-metrics http://127.0.0.1:8000/metrics
        #[arg(long = "engine-metrics", value_name = "URL")]
        engine_metrics: Vec<probe_user::engine::EngineUrl>,
        /// Config file; its `[health]` table overrides the health thresholds (see docs/health.md).
        #[arg(long, value_name = "FILE")]
        config: Option<std::path::PathBuf>,
        #[command(flatten)]
        ledger: LedgerArgs,
    },
    /// Where did GPU memory go? Outstanding CUDA allocations of a process grouped by call site
    /// (bytes, count, oldest age, growth), then VMM fragmentation, size classes and churn. Asks the
    /// `llm-probe run` at --url; with none running there, attaches itself for --duration and sees
    /// only what is allocated from then on.
    Memleak(memleak::Args),
    /// Ask a running `llm-probe run` for its health verdict. Exit status: 0 healthy, 1 warning,
    /// 2 critical, 3 unreachable — for scripts and Kubernetes probes.
    Health {
        #[arg(long, default_value = "http://127.0.0.1:9464")]
        url: String,
        /// Print the whole JSON verdict instead of a summary.
        #[arg(long)]
        json: bool,
    },
    /// Print one NVML sample of every GPU as JSON (what `run` exports as llm_gpu_*).
    Gpu,
}

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run {
            pids,
            port,
            listen,
            sample_interval,
            engine_metrics,
            config,
            ledger,
        } => {
            if pids.is_empty() && port.is_none() {
                eprintln!("error: say what to trace: --pid PID and/or --port PORT (see --help)");
                std::process::exit(2);
            }
            let thresholds = match config.as_deref().map(probe_user::health::Config::load) {
                None => probe_user::health::Thresholds::default(),
                Some(Ok(c)) => c.health,
                Some(Err(e)) => {
                    eprintln!("error: {e}");
                    std::process::exit(2);
                }
            };
            run(agent::Options {
                pids,
                port,
                listen,
                sample_interval,
                engine_urls: engine_metrics,
                thresholds,
                ledger: ledger.config(),
                cuda_runtime_launches: ledger.cuda_launch_probes == LaunchProbes::All,
                cuda_per_process: ledger.cuda_probe_scope == ProbeScope::Process,
            })
        }
        Command::Memleak(args) => memleak::run(&args),
        Command::Health { url, json } => std::process::exit(health_cli(&url, json)),
        Command::Gpu => gpu_cli(),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(opts: agent::Options) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the runtime")?;
    rt.block_on(agent::run(opts, shutdown_signal()))
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut int), Ok(mut term)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        log::warn!("cannot install signal handlers; stop with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = int.recv() => log::info!("SIGINT"),
        _ = term.recv() => log::info!("SIGTERM"),
    }
}

/// `llm-probe health`: 0 healthy, 1 warning, 2 critical, 3 unreachable or unreadable.
fn health_cli(url: &str, json: bool) -> i32 {
    let body = match probe_user::client::get(url, "/health") {
        Ok((_, body)) => body,
        Err(e) => {
            eprintln!("llm-probe health: {url}: {e:#}");
            return 3;
        }
    };
    let Ok(v) = serde_json::from_str::<serde_json::Value>(&body) else {
        eprintln!("llm-probe health: {url}/health did not answer JSON");
        return 3;
    };
    let overall = v["overall"].as_str().unwrap_or("unknown");
    if json {
        println!("{body}");
    } else {
        println!("{overall}");
        if let Some(checks) = v["checks"].as_object() {
            for (name, c) in checks {
                let status = c["status"].as_str().unwrap_or("?");
                let issues: Vec<&str> = c["issues"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|i| i.as_str())
                    .collect();
                println!("  {name:<9} {status:<11} {}", issues.join("; "));
            }
        }
    }
    match overall {
        "healthy" => 0,
        "warning" => 1,
        "critical" => 2,
        _ => 3,
    }
}

fn gpu_cli() -> anyhow::Result<()> {
    use probe_user::gpu::{GpuInventory as _, NvmlInventory};
    let mut inv = NvmlInventory::new().context("NVML")?;
    // GPM (SM activity) needs two samples; the second one reports it.
    let _ = inv.sample();
    std::thread::sleep(std::time::Duration::from_secs(1));
    let samples = inv.sample().context("NVML sample")?;
    println!("{}", serde_json::to_string_pretty(&samples)?);
    Ok(())
}
