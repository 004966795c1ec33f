//! `llm-probe run`: attach, then drain the ring buffer into the connection state machine and the
//! metrics, keep the target set current (forks, exits, re-attach by port), serve the results.
//!
//! Data path: ring buffer record → `events::decode` → `http::ConnTracker` → `RequestStats`
//! (`Observer`) → metric families. One task owns all parser state, so the hot path takes no lock.

use std::{
    future::Future,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::Context as _;
use aya::maps::{MapData, RingBuf};
use prometheus_client::registry::Registry;
use tokio::io::{unix::AsyncFd, Interest};

mod samplers;
use samplers::{run_bridge, start_gpu_sampler};

use crate::{
    attach,
    cuda::{
        ledger::LedgerConfig,
        metrics::CudaMetrics,
        state::{CudaState, SharedCuda},
    },
    ebpf::{Counters, Kernel},
    engine::{Bridge, EngineMetrics, EngineUrl},
    events::{decode, Event},
    gpu::GpuMetrics,
    health::Thresholds,
    health::{Health, SharedHealth, TargetView},
    http::{ConnId, ConnTracker},
    metrics::{Metrics, ProgramLabels, ReasonLabels},
    requests::{Recent, RequestStats, SharedRecent},
    server::{self, ServerState},
};

/// How often the ring buffer is drained when no wakeup came (records below the wakeup threshold
/// wait at most this long; request timestamps come from the kernel, so this adds no error).
pub const DRAIN_INTERVAL: Duration = Duration::from_millis(10);
/// Target liveness, re-attach, counters and sliding windows.
pub const HOUSEKEEPING_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Clone, Debug)]
pub struct Options {
    pub pids: Vec<u32>,
    pub port: Option<u16>,
    pub listen: SocketAddr,
    /// NVML and engine-page sampling interval.
    pub sample_interval: Duration,
    pub engine_urls: Vec<EngineUrl>,
    pub thresholds: Thresholds,
    /// Leak age/window and KV-pool age of the GPU memory ledger.
    pub ledger: LedgerConfig,
    /// Probe the CUDA runtime's launch entry points as well as the driver's.
    pub cuda_runtime_launches: bool,
    /// CUDA uprobes per traced process instead of per library file.
    pub cuda_per_process: bool,
}

pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer to a local timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Everything the ingest loop owns: record → decode → connection state → request stats → metrics.
pub struct Ingest {
    pub tracker: ConnTracker,
    pub stats: RequestStats,
    pub metrics: Metrics,
    /// CUDA ledger, steps and launches (`None`: records of that kind are only counted).
    pub cuda: Option<SharedCuda>,
}

impl Ingest {
    pub fn new(metrics: Metrics, recent: SharedRecent) -> Self {
        Self {
            tracker: ConnTracker::new(),
            stats: RequestStats::new(metrics.clone(), recent),
            metrics,
            cuda: None,
        }
    }

    /// Process one ring-buffer record.
    pub fn handle(&mut self, raw: &[u8], health: &SharedHealth) {
        let ev = match decode(raw) {
            Ok(ev) => ev,
            Err(e) => {
                log::debug!("undecodable record: {e}");
                self.metrics
                    .events_lost
                    .get_or_create(&ReasonLabels { reason: e.reason() })
                    .inc();
                return;
            }
        };
        match ev {
            Event::Data {
                header,
                fd,
                egress,
                ret,
                payload,
                arrival_ns,
                ..
            } => {
                let conn = ConnId {
                    tgid: header.tgid,
                    fd,
                };
                // Ingress bytes are dated by their arrival at the socket when the kernel knows it:
                // a request that waited in the receive queue was waiting for the user too.
                let ts = if !egress && arrival_ns != 0 && arrival_ns <= header.ts_ns {
                    arrival_ns
                } else {
                    header.ts_ns
                };
                self.stats.now_ns = ts;
                let s = &mut self.stats;
                match (ret, egress) {
                    (n, true) if n > 0 => self.tracker.on_egress(conn, ts, n as u64, payload, s),
                    (n, false) if n > 0 => self.tracker.on_ingress(conn, ts, n as u64, payload, s),
                    (0, false) => self.tracker.on_peer_closed(conn, ts, s),
                    (0, true) => {}
                    (n, _) => self.tracker.on_io_error(conn, ts, (-n) as i32, s),
                }
                if !self.stats.first_tokens.is_empty() {
                    if let Some(Ok(mut c)) = self.cuda.as_ref().map(|c| c.lock()) {
                        for &t in &self.stats.first_tokens {
                            c.on_first_token(t);
                        }
                    }
                    self.stats.first_tokens.clear();
                }
            }
            Event::Accept { header, fd } => {
                let conn = ConnId {
                    tgid: header.tgid,
                    fd,
                };
                self.tracker.on_accept(conn, header.ts_ns, &mut self.stats);
            }
            Event::Close { header, fd } => {
                let conn = ConnId {
                    tgid: header.tgid,
                    fd,
                };
                self.tracker.on_close(conn, header.ts_ns, &mut self.stats);
            }
            Event::Fork { header, child } => {
                log::info!(
                    "traced process {} forked {child}; tracing it too",
                    header.tgid
                );
                if let Ok(mut h) = health.lock() {
                    h.targets.insert(
                        child,
                        TargetView {
                            pid: child,
                            comm: attach::comm(child),
                            alive: true,
                            via: "fork",
                        },
                    );
                }
            }
            Event::CudaMem(ev) => {
                if let Some(Ok(mut c)) = self.cuda.as_ref().map(|c| c.lock()) {
                    c.on_mem(&ev);
                }
            }
            Event::CudaSync(ev) => {
                let waiting = self.stats.queue_depth() > 0;
                if let Some(Ok(mut c)) = self.cuda.as_ref().map(|c| c.lock()) {
                    c.on_sync(&ev, waiting);
                }
            }
            Event::Exit { header } => {
                log::warn!("traced process {} exited", header.tgid);
                self.tracker
                    .on_process_exit(header.tgid, header.ts_ns, &mut self.stats);
                if let Ok(mut h) = health.lock() {
                    if let Some(t) = h.targets.get_mut(&header.tgid) {
                        t.alive = false;
                    }
                }
                if let Some(Ok(mut c)) = self.cuda.as_ref().map(|c| c.lock()) {
                    c.forget(header.tgid);
                }
            }
        }
    }
}

/// Add `pids` (and their descendants) to the kernel target set and pick up their open server-side
/// connections. Targets go in first so that nothing accepted during the scan is missed.
fn add_targets(
    kernel: &Mutex<Kernel>,
    health: &SharedHealth,
    pids: &[u32],
    ports: &[u16],
    via: &'static str,
) -> anyhow::Result<()> {
    let all = attach::with_descendants(pids).context("listing descendants")?;
    let mut k = kernel
        .lock()
        .map_err(|_| anyhow::anyhow!("kernel lock poisoned"))?;
    for &pid in &all {
        k.add_target(pid)?;
    }
    for &pid in &all {
        k.attach_cuda_for(pid);
    }
    for &pid in &all {
        match attach::scan_sockets(pid, ports) {
            Ok(s) => {
                for &fd in &s.server_conns {
                    k.track_conn(pid, fd)?;
                }
                for &port in s.listen_ports.iter().chain(ports) {
                    k.add_listen_port(port)?;
                }
                log::info!(
                    "tracing pid {pid} ({}): listening on {:?}, {} open connection(s) picked up",
                    attach::comm(pid),
                    s.listen_ports,
                    s.server_conns.len()
                );
            }
            Err(e) => log::warn!("scanning sockets of pid {pid}: {e}"),
        }
    }
    drop(k);
    if let Ok(mut h) = health.lock() {
        for &pid in &all {
            let via = if pids.contains(&pid) { via } else { "fork" };
            h.targets.insert(
                pid,
                TargetView {
                    pid,
                    comm: attach::comm(pid),
                    alive: true,
                    via,
                },
            );
        }
    }
    Ok(())
}

/// Push kernel counters into the registry and the health view.
struct CounterSync {
    last: Counters,
}

impl CounterSync {
    fn sync(&mut self, now: Counters, metrics: &Metrics, health: &SharedHealth) {
        let d = |a: u64, b: u64| a.saturating_sub(b);
        metrics.events_seen.inc_by(d(now.seen, self.last.seen));
        metrics
            .events_lost
            .get_or_create(&ReasonLabels {
                reason: "ringbuf_full",
            })
            .inc_by(d(now.lost_ringbuf_full, self.last.lost_ringbuf_full));
        metrics
            .events_lost
            .get_or_create(&ReasonLabels { reason: "map_full" })
            .inc_by(d(now.lost_map_full, self.last.lost_map_full));
        for (reason, now, last) in [
            ("truncated", now.truncated, self.last.truncated),
            ("iov_skipped", now.iov_skipped, self.last.iov_skipped),
            (
                "read_user_failed",
                now.read_user_failed,
                self.last.read_user_failed,
            ),
        ] {
            metrics
                .capture_incomplete
                .get_or_create(&ReasonLabels { reason })
                .inc_by(d(now, last));
        }
        self.last = now;
        if let Ok(mut h) = health.lock() {
            h.events_delivered = metrics.events.get();
            h.events_lost = now.lost_ringbuf_full + now.lost_map_full;
        }
    }
}

pub async fn run(opts: Options, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let (mut kernel, ring) = Kernel::load().context("attaching the kernel programs")?;
    kernel.set_cuda_runtime_launches(opts.cuda_runtime_launches);
    kernel.set_cuda_per_process(opts.cuda_per_process);
    let mut registry = Registry::default();
    let metrics = Metrics::new(&mut registry);
    let gpu_metrics = GpuMetrics::new(&mut registry);
    let engine_metrics = EngineMetrics::new(&mut registry);
    let cuda_metrics = CudaMetrics::new(&mut registry);
    let health: SharedHealth = Arc::new(Mutex::new(Health {
        port: opts.port,
        thresholds: opts.thresholds.clone(),
        ..Health::default()
    }));
    for a in &kernel.attached {
        metrics
            .attached
            .get_or_create(&ProgramLabels { program: a.program })
            .set(i64::from(a.ok));
    }
    metrics
        .attached
        .get_or_create(&ProgramLabels {
            program: "cuda_uprobes",
        })
        .set(i64::from(kernel.cuda_loaded()));
    let cuda: SharedCuda = Arc::new(Mutex::new(CudaState::new(
        cuda_metrics.clone(),
        opts.ledger,
    )));
    if let Ok(mut h) = health.lock() {
        h.programs_total = kernel.attached.len();
        h.programs_attached = kernel.attached.iter().filter(|a| a.ok).count();
    }
    let kernel = Arc::new(Mutex::new(kernel));

    let ports: Vec<u16> = opts.port.into_iter().collect();
    let mut roots = opts.pids.clone();
    if let Some(port) = opts.port {
        match attach::pids_listening_on(port) {
            Ok(p) => roots.extend(p),
            Err(e) if opts.pids.is_empty() => {
                log::warn!("{e}; waiting for a process to listen on port {port}");
            }
            Err(e) => log::warn!("{e}"),
        }
    }
    roots.sort_unstable();
    roots.dedup();
    for &pid in &roots {
        if !attach::alive(pid) {
            anyhow::bail!("process {pid} does not exist");
        }
    }
    add_targets(
        &kernel,
        &health,
        &roots,
        &ports,
        if opts.pids.is_empty() { "port" } else { "pid" },
    )?;

    let recent: SharedRecent = Arc::new(Mutex::new(Recent::default()));
    let counter_sync = Arc::new(Mutex::new(CounterSync {
        last: Counters::default(),
    }));
    let refresh = {
        let (kernel, metrics, health, cs, cuda) = (
            kernel.clone(),
            metrics.clone(),
            health.clone(),
            counter_sync.clone(),
            cuda.clone(),
        );
        Box::new(move || {
            let Ok(mut k) = kernel.lock() else { return };
            let now = k.counters();
            if let Ok(mut c) = cuda.lock() {
                c.fold_launches(&mut k);
            }
            drop(k);
            if let Ok(mut cs) = cs.lock() {
                cs.sync(now, &metrics, &health);
            }
        })
    };
    let listener = tokio::net::TcpListener::bind(opts.listen)
        .await
        .with_context(|| format!("binding the metrics listener on {}", opts.listen))?;
    log::info!(
        "serving /metrics, /health and /api/v1/requests on http://{}",
        listener.local_addr()?
    );
    let state = Arc::new(ServerState {
        registry,
        recent: recent.clone(),
        health: health.clone(),
        refresh,
        cuda: Some(cuda.clone()),
        symbolizer: Mutex::new(crate::cuda::symbolize::BlazeSymbolizer::new()),
    });
    let server = tokio::spawn(server::serve(listener, state.clone()));

    start_gpu_sampler(
        opts.sample_interval,
        gpu_metrics,
        metrics.clone(),
        health.clone(),
        cuda.clone(),
    );
    let engines = if opts.engine_urls.is_empty() {
        None
    } else {
        let bridge = Bridge::new(opts.engine_urls.clone(), engine_metrics);
        Some(tokio::spawn(run_bridge(
            bridge,
            opts.sample_interval,
            health.clone(),
        )))
    };
    let mut ingest = Ingest::new(metrics.clone(), recent);
    ingest.cuda = Some(cuda.clone());
    // SAFETY: the ring buffer owns its fd for as long as the AsyncFd owns the ring buffer, and
    // nothing else closes it.
    let mut ring: AsyncFd<RingBuf<MapData>> =
        unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }
            .map_err(|e| anyhow::anyhow!("polling the ring buffer: {}", e.into_parts().1))?;
    let mut drain_tick = tokio::time::interval(DRAIN_INTERVAL);
    let mut house_tick = tokio::time::interval(HOUSEKEEPING_INTERVAL);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            guard = ring.readable_mut() => {
                let mut guard = guard.context("ring buffer poll")?;
                drain(guard.get_inner_mut(), &mut ingest, &health);
                guard.clear_ready();
            }
            _ = drain_tick.tick() => drain(ring.get_mut(), &mut ingest, &health),
            _ = house_tick.tick() => {
                housekeeping(&kernel, &health, &opts, &ports, &mut ingest);
                (state.refresh)();
            }
        }
        if !ingest.stats.untrack.is_empty() {
            if let Ok(mut k) = kernel.lock() {
                for c in ingest.stats.untrack.drain(..) {
                    k.untrack_conn(c.tgid, c.fd);
                }
            }
        }
    }
    log::info!("shutting down: detaching kernel programs");
    server.abort();
    if let Some(e) = engines {
        e.abort();
    }
    drop(ring);
    drop(kernel);
    Ok(())
}

fn drain(ring: &mut RingBuf<MapData>, ingest: &mut Ingest, health: &SharedHealth) {
    let mut n = 0u64;
    while let Some(item) = ring.next() {
        ingest.handle(&item, health);
        n += 1;
    }
    if n > 0 {
        ingest.metrics.events.inc_by(n);
    }
}

fn housekeeping(
    kernel: &Mutex<Kernel>,
    health: &SharedHealth,
    opts: &Options,
    ports: &[u16],
    ingest: &mut Ingest,
) {
    let now = monotonic_ns();
    ingest.stats.tick(now);
    ingest
        .metrics
        .connections
        .set(ingest.tracker.open_connections() as i64);
    if let Ok(mut h) = health.lock() {
        h.queue_depth = ingest.stats.queue_depth() as f64;
    }
    let mut live = 0;
    let mut died = Vec::new();
    if let Ok(mut h) = health.lock() {
        for t in h.targets.values_mut().filter(|t| t.alive) {
            if attach::alive(t.pid) {
                live += 1;
            } else {
                t.alive = false;
                died.push(t.pid);
            }
        }
    }
    for pid in died {
        // The exit tracepoint normally reports this first; this covers a lost record.
        log::warn!("traced process {pid} is gone");
        ingest.tracker.on_process_exit(pid, now, &mut ingest.stats);
        if let Ok(mut k) = kernel.lock() {
            k.remove_target(pid);
        }
        if let Some(Ok(mut c)) = ingest.cuda.as_ref().map(|c| c.lock()) {
            c.forget(pid);
        }
    }
    if let Some(cuda) = &ingest.cuda {
        crate::cuda::state::housekeeping(kernel, health, cuda, now);
    }
    ingest.metrics.targets.set(live);
    if live == 0 {
        if let Some(port) = opts.port {
            // The full /proc scan also finds listeners in other network namespaces (containers),
            // but costs more; do it every 10th tick unless the cheap check says the port is back.
            let tick = now / HOUSEKEEPING_INTERVAL.as_nanos() as u64;
            if !attach::listening_in_own_netns(port) && !tick.is_multiple_of(10) {
                return;
            }
            if let Ok(pids) = attach::pids_listening_on(port) {
                log::info!("a process listens on port {port} again: re-attaching to {pids:?}");
                if let Err(e) = add_targets(kernel, health, &pids, ports, "port") {
                    log::warn!("re-attach failed: {e:#}");
                }
            }
        }
    }
}
