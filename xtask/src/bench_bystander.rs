//! What llm-probe costs processes it does not trace (the bystanders on a shared node): ns per
//! `getppid()`, per 64-byte `write` to /dev/null, per TCP loopback ping-pong round trip and per
//! pipe ping-pong round trip with another process (`cat`), timed in this untraced process without
//! llm-probe and with it attached to a server elsewhere (`llm-bench server`, traced by port), on
//! each socket capture path. Each configuration is paired with a baseline measured next to it, in
//! alternating order (the host moves by more than a few percent between rounds, less within a
//! pair), and each pair's change goes into a sign test, as the engine benchmarks do.

use std::fmt::Write as _;
use std::{
    io::{Read as _, Write as _},
    net::{TcpListener, TcpStream},
    os::fd::AsRawFd as _,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};

use crate::{
    bench::{bench_server, in_order, paired, start_probe_with, CAPTURE_PATHS},
    bench_progcost::{programs, set_stats, Program},
    step,
};

const SYSCALLS: u32 = 2_000_000;
const WRITES: u32 = 1_000_000;
const ROUND_TRIPS: u32 = 20_000;
/// What is timed, and the most each may slow down (issues 12 and 13).
const GOALS: [(&str, f64); 4] = [
    ("getppid", 3.0),
    ("write 64 B to /dev/null", 5.0),
    ("TCP loopback ping-pong", 10.0),
    ("pipe ping-pong with another process", 3.0),
];

/// The operations timed, in [`GOALS`]' order: each returns ns per call or round trip.
const OPS: [fn() -> Result<f64>; 4] = [getppid, write_null, tcp_ping_pong, pipe_ping_pong];
/// Calls or round trips each operation makes.
const COUNTS: [u32; 4] = [SYSCALLS, WRITES, ROUND_TRIPS, ROUND_TRIPS];

/// ns per call of `getppid`, of a 64-byte write to /dev/null, per TCP ping-pong round trip
/// (two threads of this process) and per pipe ping-pong round trip with a `cat` process.
fn measure() -> Result<[f64; 4]> {
    Ok([OPS[0]()?, OPS[1]()?, OPS[2]()?, OPS[3]()?])
}

#[expect(
    clippy::unnecessary_wraps,
    reason = "one signature for every operation in OPS"
)]
fn getppid() -> Result<f64> {
    let t = Instant::now();
    for _ in 0..SYSCALLS {
        // SAFETY: a plain syscall without arguments.
        std::hint::black_box(unsafe { libc::getppid() });
    }
    Ok(t.elapsed().as_nanos() as f64 / f64::from(SYSCALLS))
}

fn write_null() -> Result<f64> {
    let null = std::fs::OpenOptions::new().write(true).open("/dev/null")?;
    let buf = [b'x'; 64];
    let t = Instant::now();
    for _ in 0..WRITES {
        // SAFETY: a valid fd and buffer.
        std::hint::black_box(unsafe { libc::write(null.as_raw_fd(), buf.as_ptr().cast(), 64) });
    }
    Ok(t.elapsed().as_nanos() as f64 / f64::from(WRITES))
}

fn tcp_ping_pong() -> Result<f64> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let echo = std::thread::spawn(move || -> std::io::Result<()> {
        let (mut s, _) = listener.accept()?;
        s.set_nodelay(true)?;
        let mut b = [0u8; 1];
        while s.read(&mut b)? == 1 {
            s.write_all(&b)?;
        }
        Ok(())
    });
    let mut c = TcpStream::connect(addr)?;
    c.set_nodelay(true)?;
    let ns = round_trips(&mut c.try_clone()?, &mut c)?;
    drop(c);
    let _ = echo.join();
    Ok(ns)
}

/// Two processes over pipes: `cat` writes back each byte as it reads it. Every round trip is two
/// wake-ups and two context switches, which the scheduler programs see.
fn pipe_ping_pong() -> Result<f64> {
    let mut cat = Command::new("cat")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("starting cat")?;
    let (mut to, mut from) = (
        cat.stdin.take().context("cat's stdin")?,
        cat.stdout.take().context("cat's stdout")?,
    );
    let ns = round_trips(&mut to, &mut from)?;
    drop(to);
    let _ = cat.wait();
    Ok(ns)
}

/// ns per one-byte round trip: `ROUND_TRIPS` times a byte written to `to`, its echo read back.
fn round_trips(to: &mut impl std::io::Write, from: &mut impl std::io::Read) -> Result<f64> {
    let mut b = [0u8; 1];
    let t = Instant::now();
    for _ in 0..ROUND_TRIPS {
        to.write_all(b"p")?;
        from.read_exact(&mut b)?;
    }
    Ok(t.elapsed().as_nanos() as f64 / f64::from(ROUND_TRIPS))
}

pub fn bystander(probe: &Path, rounds: usize) -> Result<()> {
    let (_server, port) = bench_server(16, 0)?;
    step(&format!(
        "bystanders: {rounds} rounds, an untraced process without llm-probe and with it \
         attached elsewhere, paired, in each configuration: {}",
        CAPTURE_PATHS.join(", ")
    ));
    let _ = measure()?; // warm-up
    let mut without = vec![Vec::new(); CAPTURE_PATHS.len()];
    let mut with = vec![Vec::new(); CAPTURE_PATHS.len()];
    let show = |m: &[f64; 4]| format!("{:.0}, {:.0}, {:.0}, {:.0}", m[0], m[1], m[2], m[3]);
    for r in 0..rounds {
        let mut line = format!("  round {r} (getppid, write, ping-pong, pipe ns; without → with):");
        for (i, path) in CAPTURE_PATHS.iter().enumerate() {
            let (b, w) = in_order(r, measure, || {
                let (p, _) = start_probe_with(probe, port, path)?;
                // Past the agent's start (its first housekeeping, the backlog of the ring).
                std::thread::sleep(Duration::from_secs(2));
                let w = measure();
                drop(p);
                w
            })?;
            let _ = write!(line, " | {path}: {} → {}", show(&b), show(&w));
            without[i].push(b);
            with[i].push(w);
        }
        println!("{line}");
    }
    for (k, (name, goal)) in GOALS.iter().enumerate() {
        for (i, path) in CAPTURE_PATHS.iter().enumerate() {
            let pick = |v: &[[f64; 4]]| -> Vec<f64> { v.iter().map(|m| m[k]).collect() };
            println!(
                "bystander {name}, {path}: {} (goal <= +{goal} %)",
                paired(&pick(&without[i]), &pick(&with[i]))
            );
        }
    }
    direct(probe, port)
}

/// The kernel's own account, exact where the timings above drown in the host's noise: the probe's
/// BPF run time and program runs per operation (kernel BPF statistics), attached in each
/// configuration. An upper bound: the statistics add two clock reads per run (≈ 40 ns here), and
/// runs for the node's other tasks in the same seconds count too. The tracepoint dispatch around
/// each run is not in it.
fn direct(probe: &Path, port: u16) -> Result<()> {
    step("bystanders, direct: the probe's BPF run time per operation (kernel BPF statistics)");
    let others = programs()?;
    // The probe's programs now: id → (name, run time ns, runs).
    let probe_bpf = || -> Result<Vec<(u64, Program)>> {
        Ok(programs()?
            .into_iter()
            .filter(|(id, _)| !others.contains_key(id))
            .collect())
    };
    set_stats(true)?;
    let result = (|| -> Result<()> {
        for path in CAPTURE_PATHS {
            let (p, _) = start_probe_with(probe, port, path)?;
            std::thread::sleep(Duration::from_secs(2));
            let mut line = format!("bystander direct, {path}:");
            for (k, op) in OPS.iter().enumerate() {
                let before = probe_bpf()?;
                let per = op()?;
                let count = f64::from(COUNTS[k]);
                let (mut ns, mut runs, mut parts) = (0, 0, String::new());
                for (id, (name, t1, n1)) in probe_bpf()? {
                    let (t0, n0) = before
                        .iter()
                        .find(|(i, _)| *i == id)
                        .map_or((0, 0), |(_, (_, t, n))| (*t, *n));
                    if n1 > n0 {
                        let (dt, dn) = (t1 - t0, n1 - n0);
                        // Programs that ran for this operation are named (not a fork or exit
                        // elsewhere on the node in the same seconds); all count in the totals.
                        if dn as f64 / count >= 0.05 {
                            let _ = write!(
                                parts,
                                " {name} {:.0} ns x {:.1}",
                                dt as f64 / dn as f64,
                                dn as f64 / count
                            );
                        }
                        (ns, runs) = (ns + dt, runs + dn);
                    }
                }
                let bpf = ns as f64 / count;
                let _ = write!(
                    line,
                    "\n    {}: {bpf:.0} ns of BPF in {:.1} runs per op ({:.2} % of {per:.0} ns){}{parts}",
                    GOALS[k].0,
                    runs as f64 / count,
                    bpf / per * 100.0,
                    if parts.is_empty() { "" } else { ":" },
                );
            }
            drop(p);
            println!("{line}");
        }
        Ok(())
    })();
    set_stats(false)?;
    result
}
