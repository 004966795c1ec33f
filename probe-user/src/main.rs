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
use probe_user::{
    agent::{self, LaunchProbes, ProbeScope},
    cuda::ledger::LedgerConfig,
    server, webclient,
};

mod explain;
mod memleak;
mod trace;

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

/// A duration flag's default, shown by --help in humantime form.
fn human(ns: u64) -> humantime::Duration {
    std::time::Duration::from_nanos(ns).into()
}

/// CUDA probe and GPU memory ledger settings of `run`.
#[derive(clap::Args, Clone)]
#[command(next_help_heading = "CUDA probes and GPU memory ledger")]
struct CudaArgs {
    /// Live allocations at least this old, at call sites whose live bytes grew over
    /// --leak-window, count as leak suspects (llm_gpu_memory_leak_suspect_bytes).
    #[arg(long = "leak-age", default_value_t = human(LedgerConfig::default().leak_age_ns), value_name = "DURATION")]
    leak_age: humantime::Duration,
    /// Window over which a call site's growth is judged.
    #[arg(long = "leak-window", default_value_t = human(LedgerConfig::default().window_ns), value_name = "DURATION")]
    leak_window: humantime::Duration,
    /// A VMM reservation must live this long before it is reported as the KV-cache pool
    /// (llm_kv_cache_pool_bytes).
    #[arg(long = "kv-pool-min-age", default_value_t = human(LedgerConfig::default().kv_pool_min_age_ns), value_name = "DURATION")]
    kv_pool_min_age: humantime::Duration,
    /// Which CUDA launch entry points to probe. all: driver and runtime (launches counted under
    /// the API the application called). driver: cuLaunchKernel & co. only - a cudaLaunchKernel
    /// that reaches the driver (all of them with driver 580) is counted once, under the driver's
    /// name, with one probe hit per launch instead of two (eager-mode engines launch thousands of
    /// kernels per step; see docs/cuda.md).
    #[arg(long = "cuda-launch-probes", value_enum, default_value_t = LaunchProbes::default())]
    cuda_launch_probes: LaunchProbes,
    /// Where the CUDA uprobes apply. host: each library file once, for every process that maps
    /// it (also after a later dlopen, fork or exec); untraced processes using the same libcuda
    /// take each breakpoint (about 1 us) and are filtered out. process: only the traced
    /// processes pay, but a child is covered from the next second after its fork, and a process
    /// that execs after attach is not covered again.
    #[arg(long = "cuda-probe-scope", value_enum, default_value_t = ProbeScope::default())]
    cuda_probe_scope: ProbeScope,
}

impl CudaArgs {
    fn options(&self) -> agent::CudaOptions {
        let ns = |d: humantime::Duration| d.as_nanos() as u64;
        agent::CudaOptions {
            ledger: LedgerConfig {
                leak_age_ns: ns(self.leak_age),
                window_ns: ns(self.leak_window),
                kv_pool_min_age_ns: ns(self.kv_pool_min_age),
            },
            launch_probes: self.cuda_launch_probes,
            scope: self.cuda_probe_scope,
        }
    }
}

/// `llm-probe run`'s flags.
#[derive(clap::Args)]
struct RunArgs {
    /// Process to trace, with all its descendants, including ones forked later (vLLM's API
    /// server and engine core are separate processes). Repeatable.
    #[arg(long = "pid", value_name = "PID")]
    pids: Vec<u32>,
    /// Trace whichever process listens on this TCP port; if it exits, re-attach when a process
    /// listens on the port again.
    #[arg(long, value_name = "PORT")]
    port: Option<u16>,
    /// Address for /metrics, /health and /api/v1/*.
    #[arg(long, default_value_t = server::DEFAULT_LISTEN, value_name = "ADDR")]
    listen: SocketAddr,
    /// How often to sample the GPUs (NVML) and scrape the engines' own metrics pages
    /// (e.g. 5s, 500ms).
    #[arg(long = "sample-interval", visible_alias = "nvml-interval", default_value_t = human(DEFAULT_SAMPLE_INTERVAL_NS), value_name = "DURATION")]
    sample_interval: humantime::Duration,
    /// An engine's own Prometheus page to scrape and re-export normalised (KV-cache
    /// utilization, preemptions, engine queue and batch): vLLM, SGLang, TGI, llama.cpp.
    /// Repeatable. Example: --engine-metrics http://127.0.0.1:8000/metrics
    #[arg(long = "engine-metrics", value_name = "URL")]
    engine_metrics: Vec<probe_user::engine::EngineUrl>,
    /// A model name the engine serves, always exported under its own `model` label. Repeatable.
    /// With this flag, only these names get a label (others are `other`); without it, a name
    /// gets one once the server answered it with success, up to --max-models.
    #[arg(long = "model", value_name = "NAME")]
    models: Vec<String>,
    /// Distinct `model` labels admitted without --model (later names are exported as `other`).
    #[arg(long = "max-models", default_value_t = probe_user::requests::MAX_MODELS, value_name = "N")]
    max_models: usize,
    /// A file holding a bearer token: clients outside loopback may then read /api/* by sending
    /// `Authorization: Bearer <token>`. Without it, /api/* (request ids, per-token timings, the
    /// GPU ledger) is served to loopback clients only. /metrics and /health are not affected.
    #[arg(long = "api-token-file", value_name = "FILE")]
    api_token_file: Option<std::path::PathBuf>,
    /// Serve /metrics, /health and /api/* over HTTPS with this certificate chain (PEM, leaf
    /// first); needs --tls-key.
    #[arg(long = "tls-cert", value_name = "FILE", requires = "tls_key")]
    tls_cert: Option<std::path::PathBuf>,
    /// The private key of --tls-cert (PEM: PKCS#8, PKCS#1 or SEC1).
    #[arg(long = "tls-key", value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<std::path::PathBuf>,
    /// With --port: trace only listeners with this process name (/proc/PID/comm). Repeatable.
    /// On a shared node another tenant's server may listen on the same port in its own network
    /// namespace; the --target-* flags say which one is meant (each given list must match).
    #[arg(long = "target-comm", value_name = "NAME")]
    target_comm: Vec<String>,
    /// With --port: trace only listeners in a cgroup under this path (a line of
    /// /proc/PID/cgroup starts with it), e.g. /kubepods/burstable/pod<uid>. Repeatable.
    #[arg(long = "target-cgroup", value_name = "PATH")]
    target_cgroup: Vec<String>,
    /// With --port: trace only listeners in this network namespace: `host` (the agent's own) or
    /// a link as /proc/PID/ns/net reads, e.g. 'net:[4026532281]'. Repeatable.
    #[arg(long = "target-netns", value_name = "NETNS")]
    target_netns: Vec<String>,
    /// Bytes the HTTP parser's buffers may hold together, over all connections (e.g. 32MiB,
    /// 500KiB). Past it, body sniffs, events in progress and gap lists are given back and
    /// counted in llm_probe_budget_dropped_total{what}.
    #[arg(long = "memory-budget", default_value = "32MiB", value_parser = parse_bytes, value_name = "SIZE")]
    memory_budget: usize,
    /// How server socket I/O is captured. `auto`: the `sock:` tracepoint path where it loads
    /// (x86-64, Linux >= 6.6; other processes' syscalls cost nothing), else syscall tracepoints
    /// (work everywhere, but slow every syscall of every process while attached). `sock` and
    /// `syscalls` force one; the log and llm_probe_attached{program} say which is in use.
    #[arg(long, value_enum, default_value_t = probe_user::kernel::CaptureChoice::Auto, value_name = "PATH")]
    capture: probe_user::kernel::CaptureChoice,
    /// Scheduler programs (sched_switch, sched_wakeup): where the traced threads spend their time
    /// (llm_thread_seconds_total) and the thread-state split of each request's TTFT stages.
    /// `off` saves their cost on every context switch of the machine; stages are still timed.
    #[arg(long = "thread-states", value_enum, default_value_t = OnOff::On, value_name = "ON|OFF")]
    thread_states: OnOff,
    /// OpenSSL uprobes (SSL_read/SSL_write, per traced process): HTTPS servers are read through
    /// them (docs/tls.md). `off`: their TLS connections count as tls_unreadable instead.
    #[arg(long = "ssl-probes", value_enum, default_value_t = OnOff::On, value_name = "ON|OFF")]
    ssl_probes: OnOff,
    /// CPU scheduling of the agent's own threads. `batch` (SCHED_BATCH, same nice level and CPU
    /// share): the agent waking up does not preempt the server it traces; records carry kernel
    /// timestamps, so draining them a little later changes no figure. `normal`: SCHED_OTHER.
    #[arg(long = "agent-sched", value_enum, default_value_t = AgentSched::Batch, value_name = "POLICY")]
    agent_sched: AgentSched,
    /// How long records may wait in the kernel's ring buffer before the agent reads them, when
    /// fewer than 64 KiB are waiting (more wake it at once). Each drain wakes the agent; records
    /// carry kernel timestamps, so a longer interval delays the figures, never changes them.
    #[arg(long = "drain-interval", default_value_t = human(probe_user::agent::DRAIN_INTERVAL.as_nanos() as u64), value_name = "DURATION")]
    drain_interval: humantime::Duration,
    /// Benchmarks only (docs/BENCHMARKS.md, "The floor"): what the `sock:` path costs a traced
    /// server before it does any work. `hooks`: its programs are attached and return at once;
    /// `records`: plus one bare record per send of a traced process. Nothing is measured.
    #[arg(long = "bench-floor", value_enum, default_value_t = probe_user::kernel::BenchFloor::Off, value_name = "FLOOR", hide = true)]
    bench_floor: probe_user::kernel::BenchFloor,
    /// Config file; its `[health]` table overrides the health thresholds (see docs/health.md).
    #[arg(long, value_name = "FILE")]
    config: Option<std::path::PathBuf>,
    #[command(flatten)]
    cuda: CudaArgs,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum OnOff {
    On,
    Off,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum AgentSched {
    Batch,
    Normal,
}

/// NVML sampling and engine scraping, every 5 s unless told otherwise.
const DEFAULT_SAMPLE_INTERVAL_NS: u64 = 5_000_000_000;

#[derive(Subcommand)]
enum Command {
    /// Attach to a server and export metrics until interrupted (SIGINT/SIGTERM detach cleanly).
    Run(Box<RunArgs>),
    /// Where did GPU memory go? Outstanding CUDA allocations of a process grouped by call site
    /// (bytes, count, oldest age, growth), then VMM fragmentation, size classes and churn. Asks the
    /// `llm-probe run` at --url; with none running there, attaches itself for --duration and sees
    /// only what is allocated from then on.
    Memleak(memleak::Args),
    /// Ask a running `llm-probe run` for its health verdict. Exit status: 0 healthy, 1 warning,
    /// 2 critical, 3 unreachable — for scripts and Kubernetes probes.
    Health {
        /// The running agent.
        #[arg(long, default_value_t = format!("http://{}", server::DEFAULT_LISTEN))]
        url: String,
        /// Print the whole JSON verdict instead of a summary.
        #[arg(long)]
        json: bool,
    },
    /// Print one NVML sample of every GPU as JSON (what `run` exports as llm_gpu_*).
    Gpu,
    /// Why were requests slow? The slowest recent requests of a running `llm-probe run`, by time
    /// to first token, each split into stages (waiting in the server's socket; the front end
    /// until its hand-off to the engine process; the engine; the output until the first token),
    /// the engine stage's wait for the GPU in CUDA synchronize calls (gpu_sync, with the CUDA
    /// probes live) and the server's time by thread state (on a CPU, waiting for a CPU, blocked).
    Explain(explain::Args),
    /// Record a running `llm-probe run` for --duration into a Chrome trace-event file (open it in
    /// https://ui.perfetto.dev or chrome://tracing): a track per request with its TTFT stages
    /// and decode, every traced thread's on-CPU / runnable / blocked share per second, and with
    /// the CUDA probes live each engine thread's prefill and decode steps.
    Trace(trace::Args),
}

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => run_agent(*args),
        Command::Memleak(args) => memleak::run(&args),
        Command::Health { url, json } => std::process::exit(health_cli(&url, json)),
        Command::Gpu => gpu_cli(),
        Command::Explain(args) => explain::run(&args),
        Command::Trace(args) => trace::run(&args),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run_agent(args: RunArgs) -> anyhow::Result<()> {
    if args.pids.is_empty() && args.port.is_none() {
        eprintln!("error: say what to trace: --pid PID and/or --port PORT (see --help)");
        std::process::exit(2);
    }
    let thresholds = match args.config.as_deref().map(load_config) {
        None => probe_user::health::Thresholds::default(),
        Some(Ok(c)) => c.health,
        Some(Err(e)) => {
            eprintln!("error: {e:#}");
            std::process::exit(2);
        }
    };
    let token = match args.api_token_file.as_deref().map(load_token) {
        None => None,
        Some(Ok(t)) => Some(t),
        Some(Err(e)) => {
            eprintln!("error: {e:#}");
            std::process::exit(2);
        }
    };
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => match load_tls(cert, key) {
            Ok(t) => Some(t),
            Err(e) => {
                eprintln!("error: {e:#}");
                std::process::exit(2);
            }
        },
        _ => None,
    };
    if args.drain_interval.is_zero() {
        eprintln!("error: --drain-interval must be longer than 0");
        std::process::exit(2);
    }
    if args.bench_floor != probe_user::kernel::BenchFloor::Off {
        if args.capture != probe_user::kernel::CaptureChoice::Sock {
            eprintln!("error: --bench-floor measures the sock: path: add --capture sock");
            std::process::exit(2);
        }
        log::warn!(
            "--bench-floor {:?}: a benchmark floor; no request is measured",
            args.bench_floor
        );
    }
    if args.agent_sched == AgentSched::Batch {
        sched_batch();
    }
    let interval: std::time::Duration = args.sample_interval.into();
    run(agent::Options {
        pids: args.pids,
        port: args.port,
        listen: args.listen,
        gpu_interval: interval,
        engine_interval: interval,
        engine_urls: args.engine_metrics,
        thresholds,
        cuda: args.cuda.options(),
        models: probe_user::requests::ModelPolicy {
            allow: args.models,
            max: args.max_models,
        },
        access: server::Access { token },
        memory_budget: args.memory_budget,
        capture: args.capture,
        thread_states: args.thread_states == OnOff::On,
        ssl_probes: args.ssl_probes == OnOff::On,
        scope: probe_user::discover::Scope {
            comms: args.target_comm,
            cgroups: args.target_cgroup,
            netns: args.target_netns,
        },
        tls,
        drain_interval: args.drain_interval.into(),
        bench_floor: args.bench_floor,
    })
}

/// Largest operator file read (config, token, certificate chain, key): each is a few KiB.
const MAX_OPERATOR_FILE_BYTES: u64 = 1 << 20;

/// The first `MAX_OPERATOR_FILE_BYTES` of a file the operator named on the command line.
fn read_operator_file(path: &std::path::Path) -> anyhow::Result<Vec<u8>> {
    use std::io::Read as _;
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .with_context(|| format!("opening {}", path.display()))?
        .take(MAX_OPERATOR_FILE_BYTES)
        .read_to_end(&mut bytes)
        .with_context(|| format!("reading {}", path.display()))?;
    Ok(bytes)
}

fn load_tls(
    cert: &std::path::Path,
    key: &std::path::Path,
) -> anyhow::Result<tokio_rustls::TlsAcceptor> {
    server::tls_acceptor(&read_operator_file(cert)?, &read_operator_file(key)?)
        .with_context(|| format!("{} / {}", cert.display(), key.display()))
}

/// `123`, `64KiB`, `32MiB`, `1GiB` (also `KB`/`MB`/`GB` as powers of 1024).
fn parse_bytes(s: &str) -> Result<usize, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: usize = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size (e.g. 32MiB)"))?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        _ => return Err(format!("{s:?}: unknown unit (B, KiB, MiB, GiB)")),
    };
    n.checked_mul(1 << shift)
        .filter(|&b| b >= 64 * 1024)
        .ok_or_else(|| format!("{s:?}: between 64KiB and the address space, please"))
}

/// The bearer token of `--api-token-file`: its first line, at least 16 characters.
fn load_token(path: &std::path::Path) -> anyhow::Result<String> {
    let text = read_operator_file(path)?;
    let token = String::from_utf8_lossy(&text)
        .lines()
        .next()
        .unwrap_or("")
        .trim()
        .to_owned();
    anyhow::ensure!(
        token.len() >= 16 && token.bytes().all(|b| b.is_ascii_graphic()),
        "{}: the token must be one line of at least 16 printable characters",
        path.display()
    );
    Ok(token)
}

/// The operator's `--config` file (a few lines of TOML).
fn load_config(path: &std::path::Path) -> anyhow::Result<probe_user::health::Config> {
    let text = String::from_utf8(read_operator_file(path)?)
        .with_context(|| format!("{}: not UTF-8", path.display()))?;
    probe_user::health::Config::from_toml(&text).with_context(|| path.display().to_string())
}

/// Put the calling thread, and so every thread it starts later (the runtime's workers, the
/// samplers), under SCHED_BATCH: the agent's wake-ups (one per 64 KiB of records) then wait for
/// the running task's turn instead of preempting it. Measured on the saturated SSE server: p99
/// 1.66 → 1.22 ms, req/s unchanged (docs/BENCHMARKS.md). A refusal is logged, not fatal.
fn sched_batch() {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: plain syscall on the calling thread with a valid parameter block.
    let rc = unsafe { libc::sched_setscheduler(0, libc::SCHED_BATCH, &raw const param) };
    if rc == 0 {
        log::info!("agent threads run under SCHED_BATCH (--agent-sched batch)");
    } else {
        log::warn!(
            "cannot switch the agent to SCHED_BATCH: {}; staying on the default policy",
            std::io::Error::last_os_error()
        );
    }
}

/// The agent on one thread: the ring buffer's readiness and the drain tick wake the thread that
/// drains. On a multi-threaded runtime a worker took each wake-up and woke the thread blocked in
/// `block_on` (three context switches per idle drain tick instead of one, and a futex wake per
/// ring wake-up under load). /metrics and /api render on the same thread between drains; the
/// ring holds the records meanwhile.
fn run(opts: agent::Options) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    Ok(rt.block_on(agent::run(opts, shutdown_signal()))?)
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
    let body = match ask(url, "/health") {
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

/// Largest answer read from a running agent (a /health verdict is a few KiB; a memleak report
/// tens; a page of 1,000 requests with all their kept gaps about 10 MiB).
const MAX_ANSWER_BYTES: usize = 16 * 1024 * 1024;
/// A running agent answers in milliseconds; this bounds a hung one.
const ASK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// GET `path` from the agent at `url` (`http://host[:port]`): (status, body).
fn ask(url: &str, path: &str) -> anyhow::Result<(u16, String)> {
    let parsed: probe_user::engine::EngineUrl = url.parse()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let server = webclient::Server {
        host: parsed.host(),
        port: parsed.port(),
    };
    let r = rt.block_on(webclient::get(server, path, MAX_ANSWER_BYTES, ASK_TIMEOUT))?;
    Ok((r.status, r.body))
}

/// GET `path` from the agent at `url`: its JSON answer, or an error naming what went wrong.
fn ask_json(url: &str, path: &str) -> anyhow::Result<serde_json::Value> {
    let (status, body) = ask(url, path)?;
    anyhow::ensure!(status == 200, "{url}{path} answered {status}");
    serde_json::from_str(&body).map_err(|e| anyhow::anyhow!("{url}{path} is not JSON: {e}"))
}

fn gpu_cli() -> anyhow::Result<()> {
    use probe_user::{gpu::GpuInventory as _, nvml::NvmlInventory};

    let mut inv = NvmlInventory::new().context("NVML")?;
    // GPM (SM activity) needs two samples; the second one reports it.
    let _ = inv.sample();
    std::thread::sleep(std::time::Duration::from_secs(1));
    let samples = inv.sample().context("NVML sample")?;
    println!("{}", serde_json::to_string_pretty(&samples)?);
    Ok(())
}
