//! `cargo xtask bench`: the benchmarks of docs/BENCHMARKS.md, each against a baseline measured in
//! the same run where the goal is relative.
//!
//! - overhead: a loopback SSE server at saturation, alternating rounds without and with llm-probe
//!   attached → requests/s loss and p99 increase (goal ≤ 2 % and ≤ 5 %).
//! - rss: llm-probe's resident memory with 1,000 concurrent streams (goal ≤ 64 MiB).
//! - ingest, render: `cargo bench -p probe-user` (goal ≥ 1 M events/s; p99 ≤ 10 ms at 5k series).
use std::fmt::Write as _;
use std::{
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use serde_json::Value;

use crate::{root, run, step};

pub(crate) struct Kill(pub(crate) Child);
impl Drop for Kill {
    fn drop(&mut self) {
        // SAFETY: signals to our own child (continued first: it may be stopped, `programs`).
        unsafe {
            libc::kill(self.0.id() as i32, libc::SIGCONT);
            libc::kill(self.0.id() as i32, libc::SIGINT);
        }
        std::thread::sleep(Duration::from_millis(300));
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub(crate) fn bench_bin() -> std::path::PathBuf {
    root().join("target/release/llm-bench")
}

pub(crate) fn wait_port(port: u16) -> Result<()> {
    let start = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if start.elapsed() > Duration::from_secs(20) {
            bail!("nothing listens on {port}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

pub(crate) fn client(port: u16, concurrency: usize, seconds: u64) -> Result<Value> {
    client_with(port, concurrency, seconds, &[])
}

/// [`client`] with more `llm-bench client` arguments (`--tls`).
pub(crate) fn client_with(
    port: u16,
    concurrency: usize,
    seconds: u64,
    extra: &[&str],
) -> Result<Value> {
    let out = Command::new(bench_bin())
        .args([
            "client",
            &format!("127.0.0.1:{port}"),
            "--concurrency",
            &concurrency.to_string(),
        ])
        .args(["--seconds", &seconds.to_string()])
        .args(extra)
        .output()
        .context("running llm-bench client")?;
    serde_json::from_slice(&out.stdout).context("llm-bench client output")
}

/// `llm-bench server` on a free loopback port, streaming `events` SSE events per request with
/// `gap_us` between them; returns it (killed on drop) and its port once it listens.
pub(crate) fn bench_server(events: usize, gap_us: u64) -> Result<(Kill, u16)> {
    let port = tests::free_port();
    let server = Kill(
        Command::new(bench_bin())
            .args(["server", &port.to_string(), "--events", &events.to_string()])
            .args(["--gap-us", &gap_us.to_string()])
            .stderr(Stdio::null())
            .spawn()?,
    );
    wait_port(port)?;
    Ok((server, port))
}

/// The probe configurations the benchmarks compare, by name: the default (the `sock:` capture
/// path with thread states) first, the same without the scheduler programs
/// (`--thread-states off`: what latency attribution's thread split costs), the syscall fallback.
pub(crate) const CAPTURE_PATHS: [&str; 3] = ["sock", "sock-nothreads", "syscalls"];

/// The overhead benchmark's configurations: [`CAPTURE_PATHS`] and the default path with the
/// agent on the default CPU policy (`--agent-sched normal`: what `SCHED_BATCH` buys).
pub(crate) const OVERHEAD_CONFIGS: [&str; 4] =
    ["sock", "sock-nothreads", "syscalls", "sock-normal"];

/// Every probe configuration a benchmark takes (`--configs`): its name, its `llm-probe run`
/// arguments and what it measures. `untraced` and `programs` run the defaults and differ in how
/// they are started ([`start_probe_with`]).
pub(crate) const CONFIGS: [(&str, &[&str], &str); 11] = [
    ("auto", &["--capture", "auto"], "the defaults"),
    ("sock", &["--capture", "sock"], "the `sock:` capture path"),
    (
        "sock-nothreads",
        &["--capture", "sock", "--thread-states", "off"],
        "`sock:` without the scheduler programs (--thread-states off)",
    ),
    (
        "syscalls",
        &["--capture", "syscalls"],
        "the syscall-tracepoint fallback",
    ),
    (
        "sock-nossl",
        &["--capture", "sock", "--ssl-probes", "off"],
        "`sock:` without the OpenSSL uprobes",
    ),
    (
        "sock-normal",
        &["--capture", "sock", "--agent-sched", "normal"],
        "`sock:` with the agent on the default CPU policy",
    ),
    (
        "slow-drain",
        &["--capture", "auto", "--drain-interval", "100ms"],
        "the defaults, the ring drained every 100 ms instead of 10 ms",
    ),
    (
        "untraced",
        &["--capture", "auto"],
        "the agent tracing a port nobody listens on: what every other process pays",
    ),
    (
        "programs",
        &["--capture", "auto"],
        "the defaults, the agent stopped once attached: the kernel side alone",
    ),
    (
        "floor-hooks",
        &["--capture", "sock", "--bench-floor", "hooks"],
        "the `sock:` programs attached, each returning at once: their dispatch alone",
    ),
    (
        "floor-records",
        &["--capture", "sock", "--bench-floor", "records"],
        "as floor-hooks, plus one bare record per traced send: the least per-write capture",
    ),
];

/// The floor benchmark's configurations (`--only floor`): the default path against what its
/// hooks alone and one bare record per write cost.
pub(crate) const FLOOR_CONFIGS: [&str; 3] = ["sock", "floor-hooks", "floor-records"];

/// `llm-probe run` arguments of configuration `config` (the defaults for a name not in
/// [`CONFIGS`]).
fn config_args(config: &str) -> &'static [&'static str] {
    CONFIGS
        .iter()
        .find(|(name, _, _)| *name == config)
        .map_or(&["--capture", "auto"], |(_, args, _)| args)
}

pub(crate) fn start_probe(probe: &Path, port: u16) -> Result<(Kill, u16)> {
    start_probe_with(probe, port, "auto")
}

/// [`start_probe`] in configuration `config` (a [`CONFIGS`] name; anything else: defaults).
/// `untraced`: `--port` names a free port, so that the programs run and exit early for every
/// process and the agent keeps its timers, with nothing traced. `programs`: the agent is stopped
/// (`SIGSTOP`) once it serves: every program still runs and writes its record (refused and
/// counted as lost once the ring is full), nothing reads them: the kernel's cost without the
/// agent's. The agent is continued before it is stopped for good.
pub(crate) fn start_probe_with(probe: &Path, port: u16, config: &str) -> Result<(Kill, u16)> {
    let listen = tests::free_port();
    let traced = if config == "untraced" {
        tests::free_port()
    } else {
        port
    };
    let p = Kill(
        Command::new(probe)
            .arg("run")
            .args(config_args(config))
            .args([
                "--port",
                &traced.to_string(),
                "--listen",
                &format!("127.0.0.1:{listen}"),
            ])
            .env("RUST_LOG", "warn")
            .spawn()?,
    );
    wait_port(listen)?;
    if config == "programs" {
        // SAFETY: signal to our own child; `Kill` continues it before ending it.
        unsafe { libc::kill(p.0.id() as i32, libc::SIGSTOP) };
    }
    Ok((p, listen))
}

pub(crate) fn scrape(port: u16, name: &str) -> f64 {
    tests::http_get(&format!("127.0.0.1:{port}"), "/metrics")
        .map_or(f64::NAN, |(_, body)| tests::metric_sum(&body, name, &[]))
}

/// utime + stime of a process, in seconds (/proc/PID/stat fields 14 and 15, in clock ticks).
pub(crate) fn cpu_seconds(pid: u32) -> f64 {
    stat(&std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default()).1
}

/// The parent pid and utime + stime in seconds of a /proc/PID/stat text (`None` and 0 when it is
/// not one).
fn stat(text: &str) -> (Option<u32>, f64) {
    // After the comm field: state(0) ppid(1) … utime(11) stime(12).
    let f: Vec<&str> = text
        .rsplit_once(')')
        .map_or("", |(_, a)| a)
        .split_whitespace()
        .collect();
    let num = |i: usize| f.get(i).and_then(|x| x.parse::<f64>().ok()).unwrap_or(0.0);
    // SAFETY: plain getter.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (
        f.get(1).and_then(|x| x.parse().ok()),
        (num(11) + num(12)) / hz.max(1.0),
    )
}

/// [`cpu_seconds`] of `root` and of every process descending from it (one pass over /proc): an
/// engine's CPU, its workers' included.
pub(crate) fn tree_cpu_seconds(root: u32) -> f64 {
    let mut procs = std::collections::HashMap::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let text = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
        if let (Some(ppid), cpu) = stat(&text) {
            procs.insert(pid, (ppid, cpu));
        }
    }
    let descends = |mut p: u32| loop {
        if p == root {
            return true;
        }
        match procs.get(&p) {
            Some(&(pp, _)) if pp != 0 && pp != p => p = pp,
            _ => return false,
        }
    };
    procs
        .iter()
        .filter(|(&pid, _)| descends(pid))
        .map(|(_, &(_, cpu))| cpu)
        .sum()
}

/// One probe configuration's results over the rounds of a with/without comparison.
#[derive(Clone, Default)]
pub(crate) struct Probed {
    pub rps: Vec<f64>,
    pub p99: Vec<f64>,
    /// The agent's CPU, % of one core, per round.
    pub cpu: Vec<f64>,
    pub cpu_secs: f64,
    /// `metric` scraped from the agent at the end of each round, summed.
    pub scraped: f64,
}

impl Probed {
    /// One round: the agent started in `config`, `load` run against the server, the agent's CPU
    /// and `metric` taken, the agent stopped. Appends ` | NAME rps p99` to `line`; returns the
    /// load's result.
    pub(crate) fn round(
        &mut self,
        (probe, port, config, name): (&Path, u16, &str, &str),
        seconds: u64,
        metric: &str,
        line: &mut String,
        load: impl FnOnce() -> Result<Value>,
    ) -> Result<Value> {
        let get = |v: &Value, k: &str| v[k].as_f64().unwrap_or(0.0);
        let (p, listen) = start_probe_with(probe, port, config)?;
        let cpu0 = cpu_seconds(p.0.id());
        let w = load()?;
        let used = cpu_seconds(p.0.id()) - cpu0;
        self.cpu.push(used / seconds as f64 * 100.0);
        self.cpu_secs += used;
        self.scraped += scrape(listen, metric);
        drop(p);
        let _ = write!(
            line,
            " | {name} {:>7.0} req/s p99 {:>6.3} ms",
            get(&w, "rps"),
            get(&w, "p99_ms")
        );
        self.rps.push(get(&w, "rps"));
        self.p99.push(get(&w, "p99_ms"));
        Ok(w)
    }
}

pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Saturated SSE server (`llm-bench server`, 8 keep-alive streams of 16 events): req/s and p99
/// without the probe, then with it in each of `configs` ([`OVERHEAD_CONFIGS`] for
/// `--only overhead`, [`FLOOR_CONFIGS`] for `--only floor`), in alternating rounds; and the
/// agent's CPU per 1,000 kernel events.
pub fn overhead(probe: &Path, rounds: usize, seconds: u64, configs: &[&str]) -> Result<()> {
    let (_server, port) = bench_server(16, 0)?;
    step(&format!(
        "overhead: {rounds} rounds x ({seconds} s without llm-probe, then {seconds} s with it on \
         each probe configuration: {}), 8 keep-alive streams, 16 SSE events each",
        configs.join(", ")
    ));
    let get = |v: &Value, k: &str| v[k].as_f64().unwrap_or(0.0);
    let _ = client(port, 8, 1)?; // warm-up
    let (mut base_rps, mut base_p99) = (vec![], vec![]);
    let mut probed = vec![Probed::default(); configs.len()];
    for r in 0..rounds {
        let b = client(port, 8, seconds)?;
        let mut line = format!(
            "  round {r}: without {:>7.0} req/s p99 {:>6.3} ms",
            get(&b, "rps"),
            get(&b, "p99_ms")
        );
        base_rps.push(get(&b, "rps"));
        base_p99.push(get(&b, "p99_ms"));
        for (s, path) in probed.iter_mut().zip(configs.iter().copied()) {
            let run = (probe, port, path, path);
            s.round(run, seconds, "llm_probe_events_total", &mut line, || {
                client(port, 8, seconds)
            })?;
        }
        println!("{line}");
    }
    let (br, bp) = (median(base_rps), median(base_p99));
    println!("overhead: median without llm-probe {br:.0} req/s p99 {bp:.3} ms");
    for (s, path) in probed.iter().zip(configs) {
        let (wr, wp) = (median(s.rps.clone()), median(s.p99.clone()));
        println!(
            "overhead, {path}: {wr:.0} req/s = {:.1} % of baseline (goal >= 90 %), \
             p99 {wp:.3} ms = {:+.1} % (goal <= +15 %); {:.0} kernel events; agent {:.0} % of \
             one core (median) on this {}-core machine, {}",
            wr / br * 100.0,
            (wp / bp - 1.0) * 100.0,
            s.scraped,
            median(s.cpu.clone()),
            std::thread::available_parallelism().map_or(0, std::num::NonZero::get),
            if s.scraped > 0.0 {
                format!(
                    "{:.3} ms of CPU per 1,000 events",
                    s.cpu_secs / s.scraped * 1e6
                )
            } else {
                "no events".to_owned()
            },
        );
    }
    Ok(())
}

/// Round `r`'s baseline and probed measurement, in the order of the round: even rounds the
/// baseline first, odd rounds the probe first (a host that drifts within a round would otherwise
/// bias every round the same way, and the sign test would count the drift as the probe's cost).
pub(crate) fn in_order<T>(
    r: usize,
    mut baseline: impl FnMut() -> Result<T>,
    mut probed: impl FnMut() -> Result<T>,
) -> Result<(T, T)> {
    if r.is_multiple_of(2) {
        let b = baseline()?;
        Ok((b, probed()?))
    } else {
        let w = probed()?;
        Ok((baseline()?, w))
    }
}

/// Each round's with/without change, paired (a round's two halves share the host's state of the
/// moment, which moves by more than the probe's cost between rounds): their median and range, and
/// a two-sided sign test of "the probe changes nothing" — resolved when p < 0.05.
pub(crate) fn paired(without: &[f64], with: &[f64]) -> String {
    let mut d: Vec<f64> = without
        .iter()
        .zip(with)
        .filter(|(b, _)| **b > 0.0)
        .map(|(b, w)| (w / b - 1.0) * 100.0)
        .collect();
    if d.is_empty() {
        return "no rounds".into();
    }
    d.sort_by(f64::total_cmp);
    let n = d.len();
    let (down, up) = (
        d.iter().filter(|x| **x < 0.0).count(),
        d.iter().filter(|x| **x > 0.0).count(),
    );
    let p = sign_test(down, up);
    format!(
        "median {:+.1} % (rounds {:+.1} to {:+.1} %), {down} of {n} lower, {up} higher, sign test \
         p = {p:.3}: {}",
        median(d.clone()),
        d[0],
        d[n - 1],
        if p < 0.05 { "resolved" } else { "not resolved" }
    )
}

/// Two-sided sign-test p-value for `a` rounds one way and `b` the other (ties left out).
fn sign_test(one_way: usize, other: usize) -> f64 {
    let rounds = one_way + other;
    if rounds == 0 {
        return 1.0;
    }
    let fewer = one_way.min(other);
    // P(X <= fewer) for X ~ Binomial(rounds, 1/2), doubled.
    let mut choose = 1.0f64; // C(rounds, 0)
    let mut tail = 0.0;
    for i in 0..=fewer {
        tail += choose;
        choose = choose * (rounds - i) as f64 / (i + 1) as f64;
    }
    (2.0 * tail / 2f64.powi(rounds as i32)).min(1.0)
}

fn rss_kib(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

pub fn rss(probe: &Path, streams: usize) -> Result<()> {
    // Slow streams: one event every 100 ms, so all stay open while we measure.
    let (_server, port) = bench_server(100_000, 100_000)?;
    let (p, listen) = start_probe(probe, port)?;
    let pid = p.0.id();
    step(&format!("rss: {streams} concurrent streams for 15 s"));
    let hold = Kill(
        Command::new(bench_bin())
            .args([
                "hold",
                &format!("127.0.0.1:{port}"),
                "--streams",
                &streams.to_string(),
                "--seconds",
                "15",
            ])
            .stderr(Stdio::null())
            .stdout(Stdio::null())
            .spawn()?,
    );
    std::thread::sleep(Duration::from_secs(12));
    let streaming = scrape(listen, "llm_batch_size");
    let rss = rss_kib(pid, "VmRSS:");
    let hwm = rss_kib(pid, "VmHWM:");
    drop(hold);
    println!(
        "rss: llm-probe with {streaming:.0} streams in flight: VmRSS {:.1} MiB, peak {:.1} MiB (goal <= 64 MiB): {}",
        rss as f64 / 1024.0,
        hwm as f64 / 1024.0,
        if hwm <= 64 * 1024 { "met" } else { "NOT met" }
    );
    Ok(())
}

/// Issue 10's heavy row: 4,096 streams of 4,100 events each (`llm-bench client` at concurrency
/// 4,096 against `llm-bench server --events 4100`), then `GET /api/v1/requests`: the agent's peak
/// resident memory (`VmHWM`) and the size of that answer, with the default memory budget.
pub fn long_streams(probe: &Path, streams: usize, events: usize, seconds: u64) -> Result<()> {
    // The server and the client each hold `streams` sockets: raise the limit they inherit.
    tests::raise_nofile(16_384);
    let (_server, port) = bench_server(events, 0)?;
    let (p, listen) = start_probe(probe, port)?;
    let pid = p.0.id();
    let rss0 = rss_kib(pid, "VmRSS:");
    step(&format!(
        "long streams: {streams} concurrent streams of {events} events for up to {seconds} s"
    ));
    let t0 = Instant::now();
    let out = Command::new(bench_bin())
        .args([
            "client",
            &format!("127.0.0.1:{port}"),
            "--concurrency",
            &streams.to_string(),
            "--seconds",
            &seconds.to_string(),
        ])
        .stderr(Stdio::null())
        .output()
        .context("running llm-bench client")?;
    let client: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    std::thread::sleep(Duration::from_secs(2));
    let events_seen = scrape(listen, "llm_probe_events_seen_total");
    let lost = scrape(listen, "llm_probe_events_lost_total");
    let finished = scrape(listen, "llm_requests_total");
    let hwm_load = rss_kib(pid, "VmHWM:");
    let t1 = Instant::now();
    let page = tests::http_get(&format!("127.0.0.1:{listen}"), "/api/v1/requests")
        .map(|(_, b)| b)
        .unwrap_or_default();
    let get_ms = t1.elapsed().as_secs_f64() * 1e3;
    let hwm = rss_kib(pid, "VmHWM:");
    println!(
        "long streams: {:.0} s, client {client}; probe saw {events_seen:.0} events ({lost:.0} lost), {finished:.0} requests finished",
        t0.elapsed().as_secs_f64()
    );
    println!(
        "long streams: RSS at start {:.1} MiB, peak under load {:.1} MiB, peak after GET /api/v1/requests {:.1} MiB; that GET returned {:.1} MiB in {get_ms:.0} ms",
        rss0 as f64 / 1024.0,
        hwm_load as f64 / 1024.0,
        hwm as f64 / 1024.0,
        page.len() as f64 / (1024.0 * 1024.0)
    );
    Ok(())
}

pub fn micro() -> Result<()> {
    step("ingest, render, ledger and listener-check micro-benchmarks (cargo bench -p probe-user)");
    run(Command::new("cargo").current_dir(root()).args([
        "bench",
        "-p",
        "probe-user",
        "--bench",
        "ingest",
        "--bench",
        "render",
        "--bench",
        "ledger",
        "--bench",
        "listeners",
    ]))
}

#[cfg(test)]
mod stats_tests {
    use super::{paired, sign_test};

    #[test]
    fn sign_test_matches_the_binomial() {
        assert!((sign_test(10, 0) - 2.0 / 1024.0).abs() < 1e-12);
        assert!((sign_test(1, 3) - 10.0 / 16.0).abs() < 1e-12);
        assert!((sign_test(5, 5) - 1.0).abs() < 1e-12);
        assert!((sign_test(0, 0) - 1.0).abs() < 1e-12);
    }

    #[test]
    fn paired_rounds_say_whether_the_change_is_resolved() {
        let without = [800.0, 834.0, 820.0, 791.0, 782.0, 798.0];
        let lower: Vec<f64> = without.iter().map(|b| b * 0.98).collect();
        let s = paired(&without, &lower);
        assert!(s.starts_with("median -2.0 %"), "{s}");
        assert!(
            s.contains("6 of 6 lower") && s.ends_with(": resolved"),
            "{s}"
        );
        let mixed = [810.0, 820.0, 800.0, 800.0, 790.0, 790.0];
        let s = paired(&without, &mixed);
        assert!(s.ends_with("not resolved"), "{s}");
    }
}
