//! `llm-cuda-workload`: a GPU ground truth for llm-probe.
//!
//! Drives device 0 through the CUDA driver API the way an inference server does — bursts of eager
//! kernel launches (prefill), CUDA-graph replays (decode), each followed by a stream sync — plus
//! plain, stream-ordered and VMM memory traffic and a deliberate leak from a named function. Every
//! driver call is counted per API name (see [`cu`] for the exported symbols they reach) and the
//! counts and timings are printed as one JSON line on stdout; progress goes to stderr.
//!
//! Exit codes: 0 done, 1 a CUDA call failed, 2 `no CUDA driver: <reason>` (libcuda.so.1 does not
//! load, is the stub library, or there is no device).

#[macro_use]
mod cu;
mod ptx;
mod report;
mod vmm;
mod workload;

use std::process::ExitCode;

use clap::Parser;

/// Command line.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "llm-cuda-workload",
    about = "CUDA ground-truth workload for llm-probe (device 0)"
)]
pub struct Args {
    /// Prefill bursts (each: launches, then one cuStreamSynchronize).
    #[arg(long, default_value_t = 3)]
    pub prefill_bursts: u64,
    /// cuLaunchKernel calls per prefill burst.
    #[arg(long, default_value_t = 200)]
    pub prefill_launches: u64,
    /// Kernels captured into the decode graph.
    #[arg(long, default_value_t = 8)]
    pub graph_kernels: u64,
    /// Decode steps (cuGraphLaunch + cuStreamSynchronize each).
    #[arg(long, default_value_t = 50)]
    pub steps: u64,
    /// Plain 1 MiB `cuMemAlloc_v2` allocations (all freed).
    #[arg(long, default_value_t = 100)]
    pub allocs: u64,
    /// MiB leaked through `llm_cuda_leak_on_purpose`, in 8 calls.
    #[arg(long, default_value_t = 64)]
    pub leak_mib: u64,
    /// Seconds to keep everything (leak and VMM mappings included) alive before cleanup.
    #[arg(long, default_value_t = 0)]
    pub hold_secs: u64,
    /// SM clock cycles each spin kernel busy-waits (~10 us at 2 GHz by default).
    #[arg(long, default_value_t = 20_000)]
    pub spin_cycles: u64,
    /// Skip NVRTC and load the embedded PTX.
    #[arg(long)]
    pub no_nvrtc: bool,
    /// Before the rest: time this many host-side cuLaunchKernel calls of an empty spin (in batches
    /// of 256, each followed by an untimed sync so the launch queue never fills), for the probe's
    /// per-launch cost on a real driver. 0 = skip.
    #[arg(long, default_value_t = 0)]
    pub launch_bench: u64,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match cu::probe_driver() {
        Ok(_) => {}
        Err(cu::ProbeError::NoDriver(reason)) => {
            eprintln!("no CUDA driver: {reason}");
            return ExitCode::from(2);
        }
        Err(cu::ProbeError::Failed(e)) => {
            eprintln!("error: {e}");
            return ExitCode::from(1);
        }
    }
    match workload::run(&args) {
        Ok(report) => match serde_json::to_string(&report) {
            Ok(line) => {
                println!("{line}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: serialising the report: {e}");
                ExitCode::from(1)
            }
        },
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The workload's shape: (prefill bursts, launches per burst, graph kernels, steps, allocs,
    /// leaked MiB, hold seconds).
    fn shape(a: &Args) -> (u64, u64, u64, u64, u64, u64, u64) {
        (
            a.prefill_bursts,
            a.prefill_launches,
            a.graph_kernels,
            a.steps,
            a.allocs,
            a.leak_mib,
            a.hold_secs,
        )
    }

    #[test]
    fn defaults_match_the_spec() {
        let a = Args::try_parse_from(["llm-cuda-workload"]).unwrap();
        assert_eq!(shape(&a), (3, 200, 8, 50, 100, 64, 0));
        assert_eq!(a.spin_cycles, 20_000);
        assert!(!a.no_nvrtc);
    }

    #[test]
    fn flags_parse() {
        let a = Args::try_parse_from([
            "x",
            "--prefill-bursts",
            "2",
            "--prefill-launches",
            "10",
            "--graph-kernels",
            "3",
            "--steps",
            "5",
            "--allocs",
            "4",
            "--leak-mib",
            "8",
            "--hold-secs",
            "1",
            "--spin-cycles",
            "100",
            "--no-nvrtc",
        ])
        .unwrap();
        assert_eq!(shape(&a), (2, 10, 3, 5, 4, 8, 1));
        assert_eq!(a.spin_cycles, 100);
        assert!(a.no_nvrtc);
        assert!(Args::try_parse_from(["x", "--steps", "-1"]).is_err());
    }
}
