//! `llm-probe`: per-request TTFT/TBT of an unmodified, running LLM inference server, measured from
//! its own sockets through eBPF, exported as Prometheus `llm_*` metrics.
use std::net::SocketAddr;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use probe_user::agent;

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
    },
}

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run { pids, port, listen } => {
            if pids.is_empty() && port.is_none() {
                eprintln!("error: say what to trace: --pid PID and/or --port PORT (see --help)");
                std::process::exit(2);
            }
            run(agent::Options { pids, port, listen })
        }
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
