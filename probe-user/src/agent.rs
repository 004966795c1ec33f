//! `llm-probe run`: attach, then drain the ring buffer into the connection state machine and the
//! metrics, keep the target set current (forks, exits, re-attach by port), serve the results.
//! The only module that wires the system side (`kernel`, `discover`, `nvml`, `scrape`) to the pure
//! side (`record`, `http`, `requests`, `cuda`, `health`, `metrics`).
//!
//! Data path: ring buffer record → `record::decode` → `http::ConnTracker` → `RequestStats`
//! (`Observer`) → metric families. One task owns all parser state, so the hot path takes no lock.

mod collector;
mod cuda;
mod ingest;
mod maps_watch;
mod privileges;
mod samplers;
mod ssl;
mod targets;
mod threads;

use std::{
    future::Future,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use probe_common::{clock::monotonic_ns, MAX_LISTEN_PORTS};
use prometheus_client::registry::Registry;
use tokio::io::{unix::AsyncFd, Interest};

pub use ingest::Ingest;
pub use targets::Targets;

use self::{
    collector::{KernelSource, LaunchCollector, SelfCpuCollector},
    cuda::CudaHousekeeping,
    ingest::MAX_DRAIN_BATCH,
    samplers::{run_bridge, start_gpu_sampler, GpuSampler},
};
use crate::{
    cuda::{
        ledger::LedgerConfig,
        state::{CudaState, SharedCuda},
    },
    discover::{self, DiscoverError},
    engine::EngineUrl,
    gpu::GpuInventory,
    health::{Health, SharedHealth, Thresholds},
    kernel::{Kernel, LoadError, Ring},
    metrics::{
        cuda::CudaMetrics, engine::EngineMetrics, gpu::GpuMetrics, ProbeMetrics, ProgramLabels,
        RequestMetrics,
    },
    nvml::NvmlInventory,
    requests::{ModelPolicy, Recent, SharedRecent},
    scrape::Bridge,
    server::{self, ServerState},
    symbolize::BlazeSymbolizer,
};

/// How often the ring buffer is drained when no wakeup came, by default (`--drain-interval`):
/// records below the wakeup threshold wait at most this long while records flow; request
/// timestamps come from the kernel, so this adds no error.
pub const DRAIN_INTERVAL: Duration = Duration::from_millis(10);
/// The longest wait between drains of a quiet ring: each drain that finds nothing doubles the
/// next wait up to this (or `--drain-interval`, when longer), and one that finds records goes back
/// to `--drain-interval`. An agent attached to an idle process went from 310 to 25 context
/// switches a second (docs/BENCHMARKS.md, *The agent's wake-ups*); the first record after a
/// quiet spell waits this long at most.
pub const QUIET_DRAIN_INTERVAL: Duration = Duration::from_millis(80);
/// Target liveness, re-attach, counters and sliding windows.
pub const HOUSEKEEPING_INTERVAL: Duration = Duration::from_secs(1);

/// The wait before the next timed drain, after one that handled `handled` records.
fn next_drain(previous: Duration, handled: u64, base: Duration) -> Duration {
    if handled > 0 {
        base
    } else {
        (previous * 2).min(QUIET_DRAIN_INTERVAL.max(base))
    }
}

/// Why `llm-probe run` could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("attaching the kernel programs: {0}")]
    Load(#[source] LoadError),
    #[error("updating the kernel's maps: {0}")]
    Maps(#[source] LoadError),
    #[error("listing descendants: {0}")]
    Discover(#[from] DiscoverError),
    #[error("process {0} does not exist")]
    NoSuchProcess(u32),
    #[error("binding the metrics listener on {0}: {1}")]
    Listen(SocketAddr, #[source] std::io::Error),
    #[error("polling the ring buffer: {0}")]
    Ring(#[source] std::io::Error),
    #[error("the kernel state's lock is poisoned (a thread panicked)")]
    Poisoned,
}

/// Which CUDA launch entry points get uprobes (`--cuda-launch-probes`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LaunchProbes {
    /// Driver and runtime: launches counted under the API the application called.
    #[default]
    All,
    /// Driver only: one probe hit per launch; runtime launches counted under the driver's name.
    Driver,
}

/// Where the CUDA uprobes apply (`--cuda-probe-scope`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum ProbeScope {
    /// Each library file once, for every process that maps it; filtered by tgid in the kernel.
    #[default]
    Host,
    /// Per traced process: untraced processes never trap (see docs/cuda.md for the caveats).
    Process,
}

/// CUDA probe settings.
#[derive(Clone, Debug, Default)]
pub struct CudaOptions {
    /// Leak age/window and KV-pool age of the GPU memory ledger.
    pub ledger: LedgerConfig,
    pub launch_probes: LaunchProbes,
    pub scope: ProbeScope,
}

#[derive(Clone)]
pub struct Options {
    pub pids: Vec<u32>,
    pub port: Option<u16>,
    pub listen: SocketAddr,
    /// NVML sampling interval.
    pub gpu_interval: Duration,
    /// Engine metrics page scrape interval.
    pub engine_interval: Duration,
    pub engine_urls: Vec<EngineUrl>,
    pub thresholds: Thresholds,
    pub cuda: CudaOptions,
    /// Which `model` values get their own label.
    pub models: ModelPolicy,
    /// Who may read `/api/*`.
    pub access: server::Access,
    /// Bytes the HTTP parser's buffers may hold together.
    pub memory_budget: usize,
    /// Which socket capture path to load.
    pub capture: crate::kernel::CaptureChoice,
    /// Attach the scheduler programs (thread states, the thread split of TTFT stages).
    pub thread_states: bool,
    /// Attach the OpenSSL uprobes (TLS plaintext).
    pub ssl_probes: bool,
    /// Which processes found by `--port` are meant.
    pub scope: discover::Scope,
    /// Serve the endpoint over TLS (`--tls-cert`, `--tls-key`).
    pub tls: Option<tokio_rustls::TlsAcceptor>,
    /// How often the ring buffer is drained when the kernel did not wake the agent.
    pub drain_interval: Duration,
    /// A benchmark floor (`--bench-floor`): normally `Off`.
    pub bench_floor: crate::kernel::BenchFloor,
}

/// Add `pids` (and their descendants) to the target set and the kernel filter, attach their CUDA
/// probes, and pick up their open server-side connections. Targets go in first so that nothing
/// accepted during the scan is missed.
fn add_targets(
    kernel: &Mutex<Kernel>,
    targets: &mut Targets,
    pids: &[u32],
    ports: &[u16],
    via: &'static str,
) -> Result<(), AgentError> {
    let mut all = Vec::new();
    for (pid, root) in discover::with_descendants(pids)? {
        targets.in_tree(pid, root);
        all.push(pid);
    }
    let mut k = kernel.lock().map_err(|_| AgentError::Poisoned)?;
    for &pid in &all {
        k.add_target(pid).map_err(AgentError::Maps)?;
        targets.add(pid, if pids.contains(&pid) { via } else { "fork" });
    }
    if k.cuda_loaded() {
        for &pid in &all {
            k.attach_cuda_for(pid);
            targets.set_cuda(pid, true);
        }
    }
    if k.ssl_loaded() {
        for &pid in &all {
            ssl::attach(&mut k, targets, pid);
        }
    }
    // The named ports first: with the kernel's port map full, a process's other listeners (an
    // engine worker's collective-communication ports) are the ones left out.
    for &port in ports {
        k.add_listen_port(port).map_err(AgentError::Maps)?;
    }
    for &pid in &all {
        match discover::scan_sockets(pid, ports) {
            Ok(s) => {
                for &fd in &s.server_conns {
                    k.track_conn(pid, fd).map_err(AgentError::Maps)?;
                }
                let left_out: Vec<u16> = s
                    .listen_ports
                    .iter()
                    .copied()
                    .filter(|&port| k.add_listen_port(port).is_err())
                    .collect();
                if !left_out.is_empty() {
                    log::warn!(
                        "pid {pid}: listening ports {left_out:?} not traced (the kernel's port map is full at \
                         {MAX_LISTEN_PORTS}): connections to them are not read"
                    );
                }
                log::info!(
                    "tracing pid {pid} (found by {}; {}): listening on {:?}, {} open \
                     connection(s) picked up",
                    if pids.contains(&pid) { via } else { "fork" },
                    discover::whereabouts(pid),
                    s.listen_ports,
                    s.server_conns.len()
                );
            }
            Err(e) => log::warn!("scanning sockets of pid {pid}: {e}"),
        }
    }
    drop(k);
    targets.publish();
    Ok(())
}

/// The listeners on `port` that `scope` admits; the others are logged with where they live.
fn in_scope(pids: Vec<u32>, port: u16, scope: &discover::Scope) -> Vec<u32> {
    if scope.is_empty() {
        return pids;
    }
    pids.into_iter()
        .filter(|&pid| {
            let w = discover::whereabouts(pid);
            let ok = scope.admits(&w);
            if !ok {
                log::info!("pid {pid} listens on port {port} but is outside --target-*: {w}");
            }
            ok
        })
        .collect()
}

/// The processes to start from: `--pid`s and whoever listens on `--port` within the scope.
fn initial_roots(opts: &Options) -> Result<Vec<u32>, AgentError> {
    let mut roots = opts.pids.clone();
    if let Some(port) = opts.port {
        match discover::pids_listening_on(port) {
            Ok(p) => roots.extend(in_scope(p, port, &opts.scope)),
            Err(e) if opts.pids.is_empty() => {
                log::warn!("{e}; waiting for a process to listen on port {port}");
            }
            Err(e) => log::warn!("{e}"),
        }
    }
    roots.sort_unstable();
    roots.dedup();
    for &pid in &roots {
        if !discover::alive(pid) {
            return Err(AgentError::NoSuchProcess(pid));
        }
    }
    Ok(roots)
}

/// The loop's state besides the ring buffer.
struct Agent {
    opts: Options,
    ports: Vec<u16>,
    kernel: Arc<Mutex<Kernel>>,
    targets: Targets,
    ingest: Ingest,
    health: SharedHealth,
    cuda: SharedCuda,
    cuda_housekeeping: CudaHousekeeping,
    /// Which targets' maps the CUDA and OpenSSL housekeeping read (every other tick).
    maps_watch: maps_watch::MapsWatch,
    housekeeping_ticks: u64,
    threads: threads::ThreadSampler,
}

/// Take the hard open-file limit as the soft one: the agent holds a descriptor per attached
/// program and uprobe link, per served connection and per /proc read, and systemd's default soft
/// limit (1024) is reached by a few hundred CUDA links plus a connection flood.
fn raise_nofile() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: valid pointers to a local rlimit.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raw const lim) != 0 {
                log::debug!("raising RLIMIT_NOFILE failed");
            }
        }
    }
}

/// The agent never executes anything: with `no_new_privs` no exec of a setuid or file-capability
/// binary could ever hand it more than it has (docs/security.md).
fn no_new_privs() {
    // SAFETY: plain prctl with constant arguments.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        log::debug!("prctl(PR_SET_NO_NEW_PRIVS) failed");
    }
}

pub async fn run(opts: Options, shutdown: impl Future<Output = ()>) -> Result<(), AgentError> {
    raise_nofile();
    no_new_privs();
    let (mut kernel, ring) = Kernel::load(opts.capture, opts.thread_states, opts.bench_floor)
        .map_err(AgentError::Load)?;
    kernel.set_cuda_runtime_launches(opts.cuda.launch_probes == LaunchProbes::All);
    kernel.set_cuda_per_process(opts.cuda.scope == ProbeScope::Process);
    if !opts.ssl_probes {
        log::info!("--ssl-probes off: TLS connections are counted as tls_unreadable, not read");
        kernel.disable_ssl();
    }
    let mut registry = Registry::default();
    let requests = RequestMetrics::new(&mut registry);
    let probe = ProbeMetrics::new(&mut registry);
    let gpu_metrics = GpuMetrics::new(&mut registry);
    let engine_metrics = EngineMetrics::new(&mut registry);
    let cuda_metrics = CudaMetrics::new(&mut registry);
    let thread_metrics = crate::metrics::threads::ThreadMetrics::new(&mut registry);
    let health: SharedHealth = Arc::new(Mutex::new(Health {
        port: opts.port,
        thresholds: opts.thresholds.clone(),
        ..Health::default()
    }));
    for a in kernel.attached.iter().chain(&kernel.refused) {
        probe
            .attached
            .get_or_create(&ProgramLabels { program: a.program })
            .set(i64::from(a.ok));
    }
    probe
        .attached
        .get_or_create(&ProgramLabels {
            program: "cuda_uprobes",
        })
        .set(i64::from(kernel.cuda_loaded()));
    probe
        .attached
        .get_or_create(&ProgramLabels {
            program: "ssl_uprobes",
        })
        .set(i64::from(kernel.ssl_loaded()));
    let cuda: SharedCuda = Arc::new(Mutex::new(CudaState::new(cuda_metrics, opts.cuda.ledger)));
    if let Ok(mut h) = health.lock() {
        h.programs_total = kernel.attached.len();
        h.programs_attached = kernel.attached.iter().filter(|a| a.ok).count();
    }
    let kernel = Arc::new(Mutex::new(kernel));
    probe.collect_kernel(&mut registry, Box::new(KernelSource(kernel.clone())));
    registry.register_collector(Box::new(SelfCpuCollector));
    registry.register_collector(Box::new(LaunchCollector {
        kernel: kernel.clone(),
        cuda: cuda.clone(),
    }));

    let mut targets = Targets::new(health.clone());
    let ports: Vec<u16> = opts.port.into_iter().collect();
    let roots = initial_roots(&opts)?;
    let via = if opts.pids.is_empty() { "port" } else { "pid" };
    add_targets(&kernel, &mut targets, &roots, &ports, via)?;
    // Attached, tracefs mounted, limits raised: from here on the agent needs only these.
    privileges::drop_unneeded();

    let recent: SharedRecent = Arc::new(Mutex::new(Recent::default()));
    let listener = tokio::net::TcpListener::bind(opts.listen)
        .await
        .map_err(|e| AgentError::Listen(opts.listen, e))?;
    log::info!(
        "serving /metrics, /health and /api/v1/requests on http://{}",
        listener.local_addr().unwrap_or(opts.listen)
    );
    let thread_sampler = threads::ThreadSampler::new(thread_metrics);
    let state = Arc::new(ServerState {
        access: opts.access.clone(),
        registry,
        recent: recent.clone(),
        threads: thread_sampler.shared.clone(),
        health: health.clone(),
        cuda: Some(cuda.clone()),
        symbolizer: Mutex::new(Box::new(BlazeSymbolizer::new())),
    });
    let server = tokio::spawn(server::serve(listener, state, opts.tls.clone()));

    let inventory = NvmlInventory::new().map(|i| Box::new(i) as Box<dyn GpuInventory>);
    let (h, c, live) = (health.clone(), cuda.clone(), targets.subscribe());
    start_gpu_sampler(
        inventory,
        opts.gpu_interval,
        &probe,
        move |inv| GpuSampler::new(inv, gpu_metrics, h, c, live, discover::hostname()),
        &health,
    );
    let engines = (!opts.engine_urls.is_empty()).then(|| {
        let bridge = Bridge::new(opts.engine_urls.clone(), engine_metrics);
        tokio::spawn(run_bridge(bridge, opts.engine_interval, health.clone()))
    });
    let mut ingest = Ingest::new(requests, probe, recent);
    ingest.stats.set_policy(opts.models.clone());
    ingest.tracker = crate::http::ConnTracker::with_budget(opts.memory_budget);
    ingest.cuda = Some(cuda.clone());
    let mut agent = Agent {
        opts,
        ports,
        kernel,
        targets,
        ingest,
        health,
        cuda,
        cuda_housekeeping: CudaHousekeeping::default(),
        maps_watch: maps_watch::MapsWatch::default(),
        housekeeping_ticks: 0,
        threads: thread_sampler,
    };
    // SAFETY: the ring buffer owns its fd for as long as the AsyncFd owns the ring buffer, and
    // nothing else closes it.
    let mut ring: AsyncFd<Ring> =
        unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }
            .map_err(|e| AgentError::Ring(e.into_parts().1))?;
    let base = agent.opts.drain_interval;
    let mut wait = base;
    let drain_tick = tokio::time::sleep(wait);
    let mut house_tick = tokio::time::interval(HOUSEKEEPING_INTERVAL);
    tokio::pin!(shutdown, drain_tick);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            guard = ring.readable_mut() => {
                let mut guard = guard.map_err(AgentError::Ring)?;
                // A full batch may leave records behind: stay ready and come back after the
                // other branches (housekeeping, SIGTERM) had their turn.
                if agent.ingest.drain(guard.get_inner_mut(), &mut agent.targets) < MAX_DRAIN_BATCH {
                    guard.clear_ready();
                }
            }
            () = &mut drain_tick => {
                let handled = agent.ingest.drain(ring.get_mut(), &mut agent.targets);
                wait = next_drain(wait, handled, base);
                drain_tick.as_mut().reset(tokio::time::Instant::now() + wait);
            }
            _ = house_tick.tick() => agent.housekeeping(),
        }
        agent.after_drain();
    }
    log::info!("shutting down: detaching kernel programs");
    server.abort();
    if let Some(e) = engines {
        e.abort();
    }
    drop(ring);
    drop(agent);
    Ok(())
}

impl Agent {
    /// Connections the parser gave up on leave the kernel map; target changes are published.
    fn after_drain(&mut self) {
        if !self.ingest.stats.untrack.is_empty() {
            if let Ok(mut k) = self.kernel.lock() {
                for c in self.ingest.stats.untrack.drain(..) {
                    k.untrack_conn(c.tgid, c.fd);
                }
            }
        }
        self.targets.publish();
    }

    fn housekeeping(&mut self) {
        let now = monotonic_ns();
        let ingest = &mut self.ingest;
        ingest.stats.tick(now);
        ingest
            .probe
            .connections
            .set(ingest.tracker.open_connections() as i64);
        for pid in self.targets.alive() {
            if discover::alive(pid) {
                continue;
            }
            // The exit tracepoint normally reports this first; this covers a lost record.
            log::warn!("traced process {pid} is gone");
            self.targets.exited(pid);
            ingest.tracker.on_process_exit(pid, now, &mut ingest.stats);
            if let Ok(mut k) = self.kernel.lock() {
                k.remove_target(pid);
            }
            if let Ok(mut c) = self.cuda.lock() {
                c.forget(pid);
            }
        }
        self.housekeeping_ticks += 1;
        if let (Ok(mut k), Ok(mut c)) = (self.kernel.lock(), self.cuda.lock()) {
            k.sync_targets();
            let alive = self.targets.alive();
            self.threads.tick(&mut k, &alive, now);
            let rescan = if (k.cuda_loaded() || k.ssl_loaded())
                && self.housekeeping_ticks.is_multiple_of(2)
            {
                self.maps_watch.due(&alive)
            } else {
                Vec::new()
            };
            self.cuda_housekeeping
                .tick(&mut k, &mut c, &mut self.targets, &rescan, now);
            ssl::tick(&mut k, &mut self.targets, &rescan);
            if let Ok(mut h) = self.health.lock() {
                let counters = k.counters();
                h.events_delivered = ingest.probe.events.get();
                h.events_lost = counters.lost();
                h.queue_depth = ingest.stats.queue_depth() as f64;
            }
        }
        let live = self.targets.alive().len();
        ingest.probe.targets.set(live as i64);
        self.targets.publish();
        if live == 0 {
            self.reattach(now);
        }
    }

    /// With `--port`, trace whoever listens on the port again.
    fn reattach(&mut self, now: u64) {
        let Some(port) = self.opts.port else { return };
        // The full /proc scan also finds listeners in other network namespaces (containers), but
        // costs more; do it every 10th tick unless the cheap check says the port is back.
        let tick = now / HOUSEKEEPING_INTERVAL.as_nanos() as u64;
        if !discover::listening_in_own_netns(port) && !tick.is_multiple_of(10) {
            return;
        }
        if let Ok(pids) = discover::pids_listening_on(port) {
            let pids = in_scope(pids, port, &self.opts.scope);
            if pids.is_empty() {
                return;
            }
            log::info!("a process listens on port {port} again: re-attaching to {pids:?}");
            if let Err(e) = add_targets(&self.kernel, &mut self.targets, &pids, &self.ports, "port")
            {
                log::warn!("re-attach failed: {e:#}");
            }
        }
    }
}

#[cfg(test)]
mod drain_tests {
    use super::*;

    #[test]
    fn a_quiet_ring_is_drained_less_often_and_a_busy_one_at_the_interval() {
        let base = Duration::from_millis(10);
        let mut wait = base;
        let mut waits = vec![];
        for _ in 0..5 {
            wait = next_drain(wait, 0, base);
            waits.push(wait.as_millis());
        }
        assert_eq!(waits, vec![20, 40, 80, 80, 80]);
        assert_eq!(next_drain(wait, 3, base), base);
        // An interval longer than the quiet one is kept as it is.
        let slow = Duration::from_millis(250);
        assert_eq!(next_drain(slow, 0, slow), slow);
    }
}
