//! `cargo xtask bench --only cuda`: what the CUDA uprobes cost a traced thread. The stand-in
//! `libcuda.so.1` (tests/fixtures/cuda, a few instructions per call) is called in a tight loop by
//! `fake_engine bench N`, alternating rounds without and with `llm-probe run` attached → ns added
//! per `cuLaunchKernel` (goal ≤ 500 ns) and per `cuMemAlloc_v2` + `cuMemFree_v2` pair (entry and
//! return probes on both). Needs root.
use std::{
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use tests::fake_cuda::{self, FakeEngine};

use crate::step;

const CALLS: &str = "200000";

fn once(fc: &fake_cuda::FakeCuda, probe: Option<&Path>) -> Result<(f64, f64)> {
    let mut engine = FakeEngine::start(fc, "bench", &[CALLS], 0)?;
    let mut agent = None;
    if let Some(bin) = probe {
        let listen = format!("127.0.0.1:{}", tests::free_port());
        let child = Command::new(bin)
            .args(["run", "--pid", &engine.pid.to_string(), "--listen", &listen])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting llm-probe")?;
        agent = Some(child);
        let start = Instant::now();
        loop {
            let attached = tests::http_get(&listen, "/metrics").map_or(0.0, |(_, b)| {
                tests::metric_sum(&b, "llm_probe_cuda_libraries", &[])
            });
            if attached >= 2.0 {
                break;
            }
            if start.elapsed() > Duration::from_secs(30) {
                bail!("llm-probe did not attach the stand-in libraries");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    let v = engine.go()?;
    engine.finish()?;
    if let Some(mut c) = agent {
        // SAFETY: signal to our own child.
        unsafe { libc::kill(c.id() as i32, libc::SIGINT) };
        let _ = c.wait();
    }
    Ok((
        v["launch_ns_per_call"]
            .as_f64()
            .context("launch_ns_per_call")?,
        v["alloc_free_ns_per_pair"]
            .as_f64()
            .context("alloc_free_ns_per_pair")?,
    ))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

pub fn uprobe_cost(probe: &Path, rounds: usize) -> Result<()> {
    step("CUDA uprobe cost: stand-in cuLaunchKernel and cuMemAlloc_v2+cuMemFree_v2, without/with llm-probe");
    let fc = fake_cuda::build()?;
    let (mut base, mut traced) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        let b = once(&fc, None)?;
        let t = once(&fc, Some(probe))?;
        println!(
            "  round {round}: launch {:.1} → {:.1} ns/call; alloc+free {:.1} → {:.1} ns/pair",
            b.0, t.0, b.1, t.1
        );
        base.push(b);
        traced.push(t);
    }
    let m = |v: &[(f64, f64)], i: usize| {
        median(v.iter().map(|x| if i == 0 { x.0 } else { x.1 }).collect())
    };
    let launch = m(&traced, 0) - m(&base, 0);
    let pair = m(&traced, 1) - m(&base, 1);
    println!(
        "cuda: {CALLS} calls per round, median of {rounds}: +{launch:.0} ns per cuLaunchKernel (goal ≤ \
         500: {}), +{pair:.0} ns per cuMemAlloc_v2+cuMemFree_v2 pair",
        if launch <= 500.0 { "met" } else { "NOT met" }
    );
    Ok(())
}
