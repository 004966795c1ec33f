//! The JSON line the workload prints, and the statistics in it.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::vmm::VmmSummary;

/// Nearest-rank percentile (`p` in 0..=100) of unsorted values; `None` when empty.
pub fn percentile<T: Copy + PartialOrd>(values: &[T], p: f64) -> Option<T> {
    if values.is_empty() {
        return None;
    }
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    let rank = ((p.clamp(0.0, 100.0) / 100.0) * v.len() as f64).ceil() as usize;
    Some(v[rank.max(1) - 1])
}

/// Host wall time spent inside `cuStreamSynchronize` calls (0 when there were none).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct NsStats {
    pub p50: u64,
    pub max: u64,
    pub sum: u64,
}

impl NsStats {
    pub fn of(v: &[u64]) -> Self {
        Self {
            p50: percentile(v, 50.0).unwrap_or(0),
            max: v.iter().copied().max().unwrap_or(0),
            sum: v.iter().sum(),
        }
    }
}

/// Event-timed GPU milliseconds (0 when there were none).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct MsStats {
    pub p50: f64,
    pub max: f64,
    pub sum: f64,
}

impl MsStats {
    pub fn of(v: &[f64]) -> Self {
        Self {
            p50: percentile(v, 50.0).unwrap_or(0.0),
            max: v.iter().copied().fold(0.0, f64::max),
            sum: v.iter().sum(),
        }
    }
}

/// Everything the workload did, as ground truth for the probe.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub device: String,
    pub compute_capability: String,
    /// True when the kernel was compiled by NVRTC (false: embedded PTX).
    pub nvrtc: bool,
    /// `"nvrtc"` or `"embedded-ptx"`.
    pub kernel_source: &'static str,
    pub nvrtc_version: Option<String>,
    /// Why NVRTC was not used; `null` when it was.
    pub nvrtc_error: Option<String>,
    /// Every API called over the whole run (cleanup after the hold included), with its count.
    pub calls: BTreeMap<String, u64>,
    /// The same, as of the start of the hold (what a probe can have seen while the process lives).
    pub calls_at_hold: BTreeMap<String, u64>,
    /// Eager `cuLaunchKernel` calls executed on the stream (prefill: bursts × launches).
    pub kernel_launches: u64,
    /// `cuLaunchKernel` calls made while capturing the graph (recorded into it, not executed then).
    pub captured_launches: u64,
    pub graph_launches: u64,
    /// Kernels the GPU ran from graphs (graph launches × graph kernels).
    pub graph_kernel_executions: u64,
    /// `cuStreamSynchronize` calls: one per prefill burst, one per decode step, one draining the
    /// stream-ordered frees.
    pub syncs: u64,
    /// Over all `syncs`.
    pub sync_wait_ns: NsStats,
    pub prefill_sync_wait_ns: Vec<u64>,
    pub decode_sync_wait_ns: NsStats,
    pub prefill_gpu_ms: Vec<f64>,
    pub decode_gpu_ms: MsStats,
    pub spin_cycles: u64,
    /// Device bytes live (allocated, not freed) at the hold: the leak plus the mapped VMM handles.
    pub live_bytes_at_hold: u64,
    pub leak_bytes: u64,
    pub leak_calls: u64,
    pub leak_function: &'static str,
    pub vmm: VmmSummary,
    pub hold_secs: u64,
    pub pid: u32,
    /// Host ns per cuLaunchKernel in the `--launch-bench` loop (null when not run).
    pub launch_bench_ns_per_call: Option<f64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        assert_eq!(percentile::<u64>(&[], 50.0), None);
        assert_eq!(percentile(&[7u64], 50.0), Some(7));
        assert_eq!(percentile(&[4u64, 1, 3, 2], 50.0), Some(2));
        assert_eq!(percentile(&[5u64, 1, 4, 2, 3], 50.0), Some(3));
        assert_eq!(percentile(&[5u64, 1, 4, 2, 3], 100.0), Some(5));
        assert_eq!(percentile(&[5u64, 1, 4, 2, 3], 0.0), Some(1));
        assert_eq!(percentile(&[0.5f64, 0.25, 1.0], 50.0), Some(0.5));
    }

    #[test]
    fn stats_of_samples() {
        assert_eq!(
            NsStats::of(&[]),
            NsStats {
                p50: 0,
                max: 0,
                sum: 0
            }
        );
        assert_eq!(
            NsStats::of(&[30, 10, 20]),
            NsStats {
                p50: 20,
                max: 30,
                sum: 60
            }
        );
        let ms = MsStats::of(&[0.5, 0.25, 1.0]);
        assert_eq!((ms.p50, ms.max, ms.sum), (0.5, 1.0, 1.75));
    }

    #[test]
    fn json_shape() {
        let calls: BTreeMap<String, u64> = [
            ("cuLaunchKernel".to_owned(), 3),
            ("cuMemAlloc_v2".to_owned(), 2),
        ]
        .into();
        let r = Report {
            device: "NVIDIA H100 80GB HBM3".into(),
            compute_capability: "9.0".into(),
            nvrtc: true,
            kernel_source: "nvrtc",
            nvrtc_version: Some("12.8".into()),
            nvrtc_error: None,
            calls: calls.clone(),
            calls_at_hold: calls,
            kernel_launches: 2,
            captured_launches: 1,
            graph_launches: 4,
            graph_kernel_executions: 4,
            syncs: 6,
            sync_wait_ns: NsStats::of(&[1, 2, 3]),
            prefill_sync_wait_ns: vec![1],
            decode_sync_wait_ns: NsStats::of(&[2, 3]),
            prefill_gpu_ms: vec![0.5],
            decode_gpu_ms: MsStats::of(&[0.1, 0.2]),
            spin_cycles: 1000,
            live_bytes_at_hold: 3 << 21,
            leak_bytes: 0,
            leak_calls: 0,
            leak_function: "llm_cuda_leak_on_purpose",
            vmm: VmmSummary {
                granularity: 2 << 20,
                base: 0x7f00_0000_0000,
                reserved: 128 << 20,
                mapped: 6 << 20,
                holes: 1,
                largest_free_extent: 116 << 20,
            },
            hold_secs: 0,
            pid: 42,
            launch_bench_ns_per_call: None,
        };
        let line = serde_json::to_string(&r).unwrap();
        assert!(!line.contains('\n'));
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        for key in [
            "device",
            "nvrtc",
            "calls",
            "kernel_launches",
            "graph_launches",
            "syncs",
            "sync_wait_ns",
            "prefill_gpu_ms",
            "decode_gpu_ms",
            "live_bytes_at_hold",
            "leak_bytes",
            "leak_function",
            "vmm",
            "pid",
        ] {
            assert!(v.get(key).is_some(), "missing {key} in {line}");
        }
        assert_eq!(v["calls"]["cuLaunchKernel"], 3);
        assert_eq!(v["sync_wait_ns"]["p50"], 2);
        assert_eq!(v["sync_wait_ns"]["max"], 3);
        assert_eq!(v["sync_wait_ns"]["sum"], 6);
        assert!(v["decode_gpu_ms"]["p50"].is_f64());
        assert_eq!(v["nvrtc_error"], serde_json::Value::Null);
        for key in [
            "granularity",
            "reserved",
            "mapped",
            "holes",
            "largest_free_extent",
        ] {
            assert!(v["vmm"][key].is_u64(), "vmm.{key}");
        }
        assert_eq!(v["leak_function"], "llm_cuda_leak_on_purpose");
    }
}
