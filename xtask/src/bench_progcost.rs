//! What each kernel program costs per run, in each probe configuration: the kernel's own BPF
//! statistics (`kernel.bpf_stats_enabled`: run time and run count per program, read with
//! `bpftool prog show -j`) while `llm-bench server` is saturated, traced by port. Exact where the
//! throughput comparison of `--only overhead` drowns in this VM's ±20 % round-to-round noise. The
//! statistics add two clock reads per run (≈ 40 ns here) to every figure; they are switched off
//! again at the end.

use std::{collections::BTreeMap, fmt::Write as _, process::Command};

use anyhow::{bail, Context as _, Result};
use serde_json::Value;

use crate::{
    bench::{bench_server, client, start_probe_with, CAPTURE_PATHS},
    step,
};

/// A loaded program's name, run time (ns) and run count.
pub(crate) type Program = (String, u64, u64);

/// Every BPF program loaded now, by id.
pub(crate) fn programs() -> Result<BTreeMap<u64, Program>> {
    let out = Command::new("bpftool")
        .args(["prog", "show", "-j"])
        .output()
        .context("running bpftool (Debian package bpftool; cargo xtask setup installs it)")?;
    if !out.status.success() {
        bail!(
            "bpftool prog show: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let list: Vec<Value> = serde_json::from_slice(&out.stdout).context("bpftool's JSON")?;
    Ok(list
        .iter()
        .filter_map(|p| {
            Some((
                p["id"].as_u64()?,
                (
                    p["name"].as_str().unwrap_or("?").to_owned(),
                    p["run_time_ns"].as_u64().unwrap_or(0),
                    p["run_cnt"].as_u64().unwrap_or(0),
                ),
            ))
        })
        .collect())
}

/// Run time (ns) so far of every loaded program whose id is not in `before`: the probe's, when
/// `before` was taken before it started.
pub(crate) fn run_ns_since(before: &std::collections::BTreeSet<u64>) -> Result<f64> {
    Ok(programs()?
        .iter()
        .filter(|(id, _)| !before.contains(id))
        .map(|(_, (_, ns, _))| *ns as f64)
        .sum())
}

pub(crate) fn set_stats(on: bool) -> Result<()> {
    std::fs::write(
        "/proc/sys/kernel/bpf_stats_enabled",
        if on { "1" } else { "0" },
    )
    .context("writing /proc/sys/kernel/bpf_stats_enabled")
}

pub fn program_cost(probe: &std::path::Path, seconds: u64) -> Result<()> {
    let (_server, port) = bench_server(16, 0)?;
    step(&format!(
        "program cost: ns per run of each kernel program (kernel BPF statistics) over {seconds} s \
         of the saturated SSE server, per probe configuration: {}",
        CAPTURE_PATHS.join(", ")
    ));
    let _ = client(port, 8, 1)?; // warm-up
    let before = programs()?;
    set_stats(true)?;
    let result = (|| -> Result<()> {
        for path in CAPTURE_PATHS {
            let (p, _listen) = start_probe_with(probe, port, path)?;
            let w = client(port, 8, seconds)?;
            let mut line = format!("  {path}: {:.0} req/s;", w["rps"].as_f64().unwrap_or(0.0));
            let mut total = 0.0;
            let requests = w["requests"].as_f64().unwrap_or(0.0).max(1.0);
            for (id, (name, ns, n)) in programs()? {
                if before.contains_key(&id) || n == 0 {
                    continue;
                }
                let _ = write!(line, " {name} {:.0} ns x {n};", ns as f64 / n as f64);
                total += ns as f64;
            }
            println!(
                "{line} BPF time (every process's runs) {:.1} us per request",
                total / requests / 1e3
            );
            drop(p);
        }
        Ok(())
    })();
    set_stats(false)?;
    result
}
