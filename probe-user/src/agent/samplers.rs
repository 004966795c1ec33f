//! The agent's samplers: NVML on a thread of its own, and the engines' own metrics pages.

use std::time::Duration;

use crate::{
    cuda::state::SharedCuda,
    engine::Bridge,
    gpu::{self, GpuInventory, GpuMetrics, NvmlInventory},
    health::{GpuView, SharedHealth},
    metrics::{Metrics, ProgramLabels},
};

/// NVML on a thread of its own (its calls block): one log line and `llm_probe_attached{program=
/// "nvml"} 0` when unavailable, else a sample every `interval` into the `llm_gpu_*` families and
/// the health view.
pub(super) fn start_gpu_sampler(
    interval: Duration,
    gm: GpuMetrics,
    metrics: Metrics,
    health: SharedHealth,
    cuda: SharedCuda,
) {
    let spawned = std::thread::Builder::new()
        .name("nvml".into())
        .spawn(move || {
            let nvml = ProgramLabels { program: "nvml" };
            let mut inv = match NvmlInventory::new() {
                Ok(inv) => inv,
                Err(e) => {
                    log::info!("GPU metrics off: {e} (no NVIDIA driver on this machine?)");
                    metrics.attached.get_or_create(&nvml).set(0);
                    if let Ok(mut h) = health.lock() {
                        h.gpus = Some(Err(format!("unavailable: {e}")));
                    }
                    return;
                }
            };
            metrics.attached.get_or_create(&nvml).set(1);
            let host = gpu::hostname();
            let mut prev = Vec::new();
            loop {
                let traced = crate::health::alive_targets(&health);
                match inv.sample() {
                    Ok(samples) => {
                        gm.update(&samples, &host, &traced, &prev);
                        if let Ok(mut c) = cuda.lock() {
                            c.set_nvml_usage(samples.iter().flat_map(|s| s.processes.clone()));
                        }
                        if let Ok(mut h) = health.lock() {
                            h.gpus = Some(Ok(samples
                                .iter()
                                .map(|s| GpuView {
                                    index: s.index,
                                    utilization: s.utilization,
                                })
                                .collect()));
                        }
                        prev = samples;
                    }
                    Err(e) => {
                        log::warn!("NVML sample failed: {e}");
                        gm.clear();
                        prev.clear();
                        if let Ok(mut h) = health.lock() {
                            h.gpus = Some(Err(format!("sample failed: {e}")));
                        }
                    }
                }
                std::thread::sleep(interval);
            }
        });
    if let Err(e) = spawned {
        log::warn!("cannot start the NVML thread: {e}");
    }
}

/// Scrape the engines' own metrics pages every `interval` and feed the health view.
pub(super) async fn run_bridge(mut bridge: Bridge, interval: Duration, health: SharedHealth) {
    let mut tick = tokio::time::interval(interval);
    loop {
        tick.tick().await;
        bridge.poll_once().await;
        if let Ok(mut h) = health.lock() {
            h.kv_cache_max = bridge.max_kv_utilization();
            h.engine_queue_max = bridge.max_queue_depth();
            h.engine_failures = bridge.failing();
        }
    }
}
