//! What llm-probe costs processes it does not trace (the bystanders on a shared node): ns per
//! `getppid()`, per 64-byte `write` to /dev/null, per TCP loopback ping-pong round trip and per
//! pipe ping-pong round trip with another process (`cat`), timed in this untraced process, in
//! alternating rounds without llm-probe and with it attached to a server elsewhere
//! (`llm-bench server`, traced by port), on each socket capture path.

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
    bench::{bench_server, median, start_probe_with, CAPTURE_PATHS},
    step,
};

const SYSCALLS: u32 = 2_000_000;
const WRITES: u32 = 1_000_000;
const ROUND_TRIPS: u32 = 50_000;

/// ns per call of `getppid`, of a 64-byte write to /dev/null, per TCP ping-pong round trip
/// (two threads of this process) and per pipe ping-pong round trip with a `cat` process.
fn measure() -> Result<[f64; 4]> {
    let t = Instant::now();
    for _ in 0..SYSCALLS {
        // SAFETY: a plain syscall without arguments.
        std::hint::black_box(unsafe { libc::getppid() });
    }
    let getppid = t.elapsed().as_nanos() as f64 / f64::from(SYSCALLS);

    let null = std::fs::OpenOptions::new().write(true).open("/dev/null")?;
    let buf = [b'x'; 64];
    let t = Instant::now();
    for _ in 0..WRITES {
        // SAFETY: a valid fd and buffer.
        std::hint::black_box(unsafe { libc::write(null.as_raw_fd(), buf.as_ptr().cast(), 64) });
    }
    let write = t.elapsed().as_nanos() as f64 / f64::from(WRITES);

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
    let pingpong = round_trips(&mut c.try_clone()?, &mut c)?;
    drop(c);
    let _ = echo.join();

    // Two processes over pipes: `cat` writes back each byte as it reads it. Every round trip is
    // two wake-ups and two context switches, which the scheduler programs see.
    let mut cat = Command::new("cat")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("starting cat")?;
    let (mut to, mut from) = (
        cat.stdin.take().context("cat's stdin")?,
        cat.stdout.take().context("cat's stdout")?,
    );
    let pipe = round_trips(&mut to, &mut from)?;
    drop(to);
    let _ = cat.wait();
    Ok([getppid, write, pingpong, pipe])
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
        "bystanders: {rounds} rounds, an untraced process without llm-probe, then with it \
         attached elsewhere in each configuration: {}",
        CAPTURE_PATHS.join(", ")
    ));
    let _ = measure()?; // warm-up
    let mut without = Vec::new();
    let mut with = vec![Vec::new(); CAPTURE_PATHS.len()];
    for r in 0..rounds {
        let b = measure()?;
        let mut line = format!(
            "  round {r}: without: getppid {:.0} ns, write {:.0} ns, ping-pong {:.0} ns, pipe \
             {:.0} ns",
            b[0], b[1], b[2], b[3]
        );
        without.push(b);
        for (i, path) in CAPTURE_PATHS.iter().enumerate() {
            let (p, _) = start_probe_with(probe, port, path)?;
            std::thread::sleep(Duration::from_secs(1));
            let w = measure()?;
            drop(p);
            let _ = write!(
                line,
                " | {path}: {:.0}, {:.0}, {:.0}, {:.0}",
                w[0], w[1], w[2], w[3]
            );
            with[i].push(w);
        }
        println!("{line}");
    }
    for (k, (name, goal)) in [
        ("getppid", 3.0),
        ("write 64 B to /dev/null", 5.0),
        ("TCP loopback ping-pong", 10.0),
        ("pipe ping-pong with another process", 3.0),
    ]
    .iter()
    .enumerate()
    {
        let b = median(without.iter().map(|m| m[k]).collect());
        let mut line = format!("bystander {name}: median {b:.0} ns without llm-probe");
        for (i, path) in CAPTURE_PATHS.iter().enumerate() {
            let w = median(with[i].iter().map(|m| m[k]).collect());
            let _ = write!(line, "; {path} {w:.0} ns ({:+.1} %)", (w / b - 1.0) * 100.0);
        }
        println!("{line} (goal <= +{goal} %)");
    }
    Ok(())
}
