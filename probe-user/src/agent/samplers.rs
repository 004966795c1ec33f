//! The agent's samplers: GPUs on a thread of their own (NVML calls block), and the engines' own
//! metrics pages. Each gets what it reads — an inventory, the live pids — from the agent, so the
//! loops run in tests with `FakeInventory`.

use std::time::Duration;

use tokio::sync::watch;

use crate::{
    cuda::state::SharedCuda,
    gpu::{GpuError, GpuInventory, GpuSample},
    health::{GpuView, SharedHealth},
    metrics::{gpu::GpuMetrics, ProbeMetrics, ProgramLabels},
    scrape::Bridge,
};

/// One GPU sampling loop's state: the inventory and what it exports to.
pub(super) struct GpuSampler {
    pub inventory: Box<dyn GpuInventory>,
    pub families: GpuMetrics,
    pub health: SharedHealth,
    pub cuda: SharedCuda,
    /// Live traced pids (their per-process GPU memory is exported).
    pub live: watch::Receiver<Vec<u32>>,
    pub host: String,
    prev: Vec<GpuSample>,
}

impl GpuSampler {
    pub fn new(
        inventory: Box<dyn GpuInventory>,
        families: GpuMetrics,
        health: SharedHealth,
        cuda: SharedCuda,
        live: watch::Receiver<Vec<u32>>,
        host: String,
    ) -> Self {
        Self {
            inventory,
            families,
            health,
            cuda,
            live,
            host,
            prev: Vec::new(),
        }
    }

    /// One sample of every device into the families, the CUDA ledger and the health view.
    pub fn tick(&mut self) {
        let traced = self.live.borrow().clone();
        match self.inventory.sample() {
            Ok(samples) => {
                self.families
                    .update(&samples, &self.host, &traced, &self.prev);
                if let Ok(mut c) = self.cuda.lock() {
                    c.set_nvml_usage(samples.iter().flat_map(|s| s.processes.clone()));
                }
                if let Ok(mut h) = self.health.lock() {
                    h.gpus = Some(Ok(samples
                        .iter()
                        .map(|s| GpuView {
                            index: s.index,
                            utilization: s.utilization,
                        })
                        .collect()));
                }
                self.prev = samples;
            }
            Err(e) => {
                log::warn!("GPU sample failed: {e}");
                self.families.clear();
                self.prev.clear();
                if let Ok(mut h) = self.health.lock() {
                    h.gpus = Some(Err(format!("sample failed: {e}")));
                }
            }
        }
    }
}

/// Start sampling every `interval` on a thread of its own, or — when the inventory could not be
/// opened — say so once: one log line, `llm_probe_attached{program="nvml"} 0` and a GPU check
/// that says "unavailable"; everything else keeps working.
pub(super) fn start_gpu_sampler(
    inventory: Result<Box<dyn GpuInventory>, GpuError>,
    interval: Duration,
    probe: &ProbeMetrics,
    make: impl FnOnce(Box<dyn GpuInventory>) -> GpuSampler,
    health: &SharedHealth,
) {
    let nvml = ProgramLabels { program: "nvml" };
    let inventory = match inventory {
        Ok(inv) => inv,
        Err(e) => {
            log::info!("GPU metrics off: {e} (no NVIDIA driver on this machine?)");
            probe.attached.get_or_create(&nvml).set(0);
            if let Ok(mut h) = health.lock() {
                h.gpus = Some(Err(format!("unavailable: {e}")));
            }
            return;
        }
    };
    probe.attached.get_or_create(&nvml).set(1);
    let mut sampler = make(inventory);
    let spawned = std::thread::Builder::new()
        .name("nvml".into())
        .spawn(move || loop {
            sampler.tick();
            std::thread::sleep(interval);
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

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use prometheus_client::registry::Registry;

    use super::*;
    use crate::{
        cuda::{ledger::LedgerConfig, state::CudaState},
        gpu::FakeInventory,
        health::Health,
        metrics::cuda::CudaMetrics,
    };

    fn render(r: &Registry) -> String {
        let mut s = String::new();
        prometheus_client::encoding::text::encode(&mut s, r).unwrap();
        s
    }

    /// The sampler loop with a fake inventory: devices and traced processes reach the families,
    /// the health view and the ledger's NVML figure; a failure withdraws the device series.
    #[test]
    fn sampler_ticks_through_a_fake_inventory() {
        let mut r = Registry::default();
        let families = GpuMetrics::new(&mut r);
        let health = Arc::new(Mutex::new(Health::default()));
        let cuda = Arc::new(Mutex::new(CudaState::new(
            CudaMetrics::new(&mut r),
            LedgerConfig::default(),
        )));
        let (live_tx, live) = watch::channel(vec![42]);
        let fake = FakeInventory::default();
        *fake.samples.lock().unwrap() = Ok(vec![GpuSample {
            index: 0,
            uuid: "GPU-a".into(),
            utilization: Some(0.5),
            processes: vec![(42, 6 << 30), (43, 1 << 30)],
            ..GpuSample::default()
        }]);
        let mut s = GpuSampler::new(
            Box::new(fake.clone()),
            families,
            health.clone(),
            cuda.clone(),
            live,
            "node1".into(),
        );
        s.tick();
        let text = render(&r);
        assert!(text.contains("llm_gpu_utilization{"), "{text}");
        assert!(
            text.contains("llm_gpu_process_memory_used_bytes{pid=\"42\"} 6442450944"),
            "{text}"
        );
        assert!(!text.contains("pid=\"43\""), "{text}");
        assert_eq!(
            health.lock().unwrap().gpus,
            Some(Ok(vec![GpuView {
                index: 0,
                utilization: Some(0.5)
            }]))
        );
        assert_eq!(
            cuda.lock().unwrap().report(42, 0, 0, 1).nvml_used_bytes,
            Some(6 << 30)
        );
        // Pid 43 becomes traced: its memory is exported from the next tick.
        live_tx.send_replace(vec![42, 43]);
        s.tick();
        assert!(render(&r).contains("pid=\"43\""));
        *fake.samples.lock().unwrap() = Err("driver gone");
        s.tick();
        let text = render(&r);
        assert!(!text.contains("llm_gpu_utilization{"), "{text}");
        assert!(matches!(health.lock().unwrap().gpus, Some(Err(_))));
    }
}
