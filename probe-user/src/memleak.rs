//! `llm-probe memleak`: the GPU memory ledger of one process, from the running agent or, with none
//! running, from an agent this command runs for `--duration`.

use std::time::Duration;

use anyhow::Context as _;
use probe_user::{agent, cuda::ledger::LeakReport};

#[derive(clap::Args)]
pub struct Args {
    /// The process (an attached target of the running agent).
    #[arg(long)]
    pub pid: u32,
    /// The running agent.
    #[arg(long, default_value_t = format!("http://{}", probe_user::server::DEFAULT_LISTEN))]
    pub url: String,
    /// Only allocations at least this old (e.g. 30s, 5m, 0s for all).
    #[arg(long = "older-than", default_value = "30s", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub older_than: Duration,
    /// Call sites to show, largest first.
    #[arg(long, default_value_t = 10)]
    pub top: usize,
    /// Without a running agent: how long to watch before reporting.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub duration: Duration,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

fn path(a: &Args) -> String {
    format!(
        "/api/v1/memleak?pid={}&older_than={}ms&top={}",
        a.pid,
        a.older_than.as_millis(),
        a.top
    )
}

pub fn run(a: &Args) -> anyhow::Result<()> {
    let body = match crate::ask(&a.url, &path(a)) {
        Ok((200, body)) => body,
        Ok((status, body)) => anyhow::bail!("{}: HTTP {status}: {}", a.url, body.trim()),
        Err(e) => {
            eprintln!(
                "llm-probe memleak: no agent at {} ({e:#}); attaching to pid {} for {} — only \
                 allocations made from now on are seen",
                a.url,
                a.pid,
                humantime::format_duration(a.duration)
            );
            watch_self(a)?
        }
    };
    if a.json {
        println!("{body}");
        return Ok(());
    }
    let report: LeakReport = serde_json::from_str(&body).context("reading the ledger report")?;
    print!("{}", probe_user::cuda::ledger::render_text(&report));
    Ok(())
}

/// Run an agent on an ephemeral local port for `duration`, then ask it.
fn watch_self(a: &Args) -> anyhow::Result<String> {
    // Nothing it sees can be older than the watch: keep --older-than below it, or the report is
    // empty by construction.
    let older_than = if a.older_than >= a.duration {
        eprintln!(
            "llm-probe memleak: --older-than {} is not shorter than --duration; showing every \
             allocation seen",
            humantime::format_duration(a.older_than)
        );
        Duration::ZERO
    } else {
        a.older_than
    };
    let path = path(&Args {
        older_than,
        url: a.url.clone(),
        ..*a
    });
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let listen = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let opts = agent::Options {
        pids: vec![a.pid],
        port: None,
        listen,
        gpu_interval: Duration::from_secs(5),
        engine_interval: Duration::from_secs(5),
        engine_urls: Vec::new(),
        thresholds: probe_user::health::Thresholds::default(),
        cuda: agent::CudaOptions::default(),
        models: probe_user::requests::ModelPolicy::default(),
        access: probe_user::server::Access::default(),
        memory_budget: probe_user::http::conn::DEFAULT_MEMORY_BUDGET,
        capture: probe_user::kernel::CaptureChoice::Auto,
        thread_states: false,
        ssl_probes: false,
        scope: probe_user::discover::Scope::default(),
        tls: None,
        drain_interval: agent::DRAIN_INTERVAL,
        bench_floor: probe_user::kernel::BenchFloor::Off,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let agent = rt.spawn(agent::run(opts, async {
        let _ = rx.await;
    }));
    std::thread::sleep(a.duration);
    let url = format!("http://{listen}");
    let result = crate::ask(&url, &path);
    let _ = tx.send(());
    let joined = rt.block_on(agent);
    match (result, joined) {
        (Ok((200, body)), _) => Ok(body),
        (_, Ok(Err(e))) => Err(anyhow::Error::new(e).context("the agent failed")),
        (Ok((status, body)), _) => anyhow::bail!("HTTP {status}: {}", body.trim()),
        (Err(e), _) => Err(e.context("asking the agent")),
    }
}
