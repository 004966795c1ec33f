//! `llm_gpu_*`: one series per device with dcgm-exporter's label keys (`gpu`, `UUID`,
//! `pci_bus_id`, `modelName`, `Hostname`) so dashboards can join the two, and
//! `llm_gpu_process_memory_used_bytes{pid}` for traced processes. Updated by the agent's NVML
//! sampler from `crate::gpu::GpuSample`s.

use prometheus_client::{
    metrics::{counter::Counter, family::Family},
    registry::Registry,
};

use super::{F64Gauge, PidLabels};
use crate::gpu::GpuSample;

/// DCGM-compatible label set: `gpu`, `UUID`, `pci_bus_id`, `modelName`, `Hostname`.
pub type GpuLabels = Vec<(&'static str, String)>;

fn labels(s: &GpuSample, host: &str) -> GpuLabels {
    vec![
        ("gpu", s.index.to_string()),
        ("UUID", s.uuid.clone()),
        ("pci_bus_id", s.pci_bus_id.clone()),
        ("modelName", s.name.clone()),
        ("Hostname", host.to_owned()),
    ]
}

/// The `llm_gpu_*` families.
#[derive(Clone)]
pub struct GpuMetrics {
    pub utilization: Family<GpuLabels, F64Gauge>,
    pub memory_used: Family<GpuLabels, F64Gauge>,
    pub memory_total: Family<GpuLabels, F64Gauge>,
    pub temperature: Family<GpuLabels, F64Gauge>,
    pub power: Family<GpuLabels, F64Gauge>,
    pub sm_clock: Family<GpuLabels, F64Gauge>,
    pub pcie_tx: Family<GpuLabels, F64Gauge>,
    pub pcie_rx: Family<GpuLabels, F64Gauge>,
    pub ecc_corrected: Family<GpuLabels, Counter>,
    pub ecc_uncorrected: Family<GpuLabels, Counter>,
    pub xid: Family<GpuLabels, Counter>,
    pub sm_activity: Family<GpuLabels, F64Gauge>,
    pub process_memory: Family<PidLabels, F64Gauge>,
}

impl GpuMetrics {
    pub fn new(r: &mut Registry) -> Self {
        let m = Self {
            utilization: Family::default(),
            memory_used: Family::default(),
            memory_total: Family::default(),
            temperature: Family::default(),
            power: Family::default(),
            sm_clock: Family::default(),
            pcie_tx: Family::default(),
            pcie_rx: Family::default(),
            ecc_corrected: Family::default(),
            ecc_uncorrected: Family::default(),
            xid: Family::default(),
            sm_activity: Family::default(),
            process_memory: Family::default(),
        };
        r.register(
            "llm_gpu_utilization",
            "GPU busy fraction (NVML utilization.gpu), 0-1",
            m.utilization.clone(),
        );
        r.register(
            "llm_gpu_memory_used_bytes",
            "GPU memory used (NVML)",
            m.memory_used.clone(),
        );
        r.register(
            "llm_gpu_memory_total_bytes",
            "GPU memory total (NVML)",
            m.memory_total.clone(),
        );
        r.register(
            "llm_gpu_temperature_celsius",
            "GPU temperature",
            m.temperature.clone(),
        );
        r.register("llm_gpu_power_watts", "GPU power draw", m.power.clone());
        r.register("llm_gpu_sm_clock_hertz", "SM clock", m.sm_clock.clone());
        r.register(
            "llm_gpu_pcie_tx_bytes_per_second",
            "PCIe transmit throughput (NVML)",
            m.pcie_tx.clone(),
        );
        r.register(
            "llm_gpu_pcie_rx_bytes_per_second",
            "PCIe receive throughput (NVML)",
            m.pcie_rx.clone(),
        );
        r.register(
            "llm_gpu_ecc_corrected_errors",
            "Corrected ECC errors since driver load",
            m.ecc_corrected.clone(),
        );
        r.register(
            "llm_gpu_ecc_uncorrected_errors",
            "Uncorrected ECC errors since driver load",
            m.ecc_uncorrected.clone(),
        );
        r.register(
            "llm_gpu_xid_errors",
            "Critical XID events since the probe started",
            m.xid.clone(),
        );
        r.register(
            "llm_gpu_sm_activity",
            "SM activity from GPM (Hopper and newer), 0-1",
            m.sm_activity.clone(),
        );
        r.register(
            "llm_gpu_process_memory_used_bytes",
            "GPU memory used by a traced process (NVML running compute processes)",
            m.process_memory.clone(),
        );
        m
    }

    /// Export one round of samples. Series of devices or processes no longer present are removed
    /// (no stale gauges); counters advance by the device's delta.
    pub fn update(&self, samples: &[GpuSample], host: &str, traced: &[u32], prev: &[GpuSample]) {
        self.clear_absent(samples, prev, host);
        for s in samples {
            let l = labels(s, host);
            let set = |f: &Family<GpuLabels, F64Gauge>, v: Option<f64>| {
                if let Some(v) = v {
                    f.get_or_create(&l).set(v);
                } else {
                    f.remove(&l);
                }
            };
            set(&self.utilization, s.utilization);
            set(&self.memory_used, s.memory_used_bytes.map(|b| b as f64));
            set(&self.memory_total, s.memory_total_bytes.map(|b| b as f64));
            set(&self.temperature, s.temperature_celsius);
            set(&self.power, s.power_watts);
            set(&self.sm_clock, s.sm_clock_hertz);
            set(&self.pcie_tx, s.pcie_tx_bytes_per_second);
            set(&self.pcie_rx, s.pcie_rx_bytes_per_second);
            set(&self.sm_activity, s.sm_activity);
            let before = prev.iter().find(|p| p.uuid == s.uuid);
            for (fam, now, was) in [
                (
                    &self.ecc_corrected,
                    s.ecc_corrected_total,
                    before.and_then(|p| p.ecc_corrected_total),
                ),
                (
                    &self.ecc_uncorrected,
                    s.ecc_uncorrected_total,
                    before.and_then(|p| p.ecc_uncorrected_total),
                ),
                (
                    &self.xid,
                    s.xid_errors_total,
                    before.and_then(|p| p.xid_errors_total),
                ),
            ] {
                if let Some(now) = now {
                    let c = fam.get_or_create(&l);
                    c.inc_by(now.saturating_sub(was.unwrap_or(0)));
                }
            }
        }
        self.process_memory.clear();
        for s in samples {
            for &(pid, bytes) in s.processes.iter().filter(|(pid, _)| traced.contains(pid)) {
                self.process_memory
                    .get_or_create(&PidLabels {
                        pid: pid.to_string(),
                    })
                    .inc_by(bytes as f64);
            }
        }
    }

    /// Every per-device gauge family.
    fn gauges(&self) -> [&Family<GpuLabels, F64Gauge>; 9] {
        [
            &self.utilization,
            &self.memory_used,
            &self.memory_total,
            &self.temperature,
            &self.power,
            &self.sm_clock,
            &self.pcie_tx,
            &self.pcie_rx,
            &self.sm_activity,
        ]
    }

    fn clear_absent(&self, samples: &[GpuSample], prev: &[GpuSample], host: &str) {
        for p in prev
            .iter()
            .filter(|p| !samples.iter().any(|s| s.uuid == p.uuid))
        {
            let l = labels(p, host);
            for f in self.gauges() {
                f.remove(&l);
            }
        }
    }

    /// NVML went away: drop every device series.
    pub fn clear(&self) {
        for f in self.gauges() {
            f.clear();
        }
        self.process_memory.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::{FakeInventory, GpuInventory};

    fn sample(uuid: &str, util: f64, ecc: u64) -> GpuSample {
        GpuSample {
            index: 0,
            uuid: uuid.into(),
            pci_bus_id: "00000000:01:00.0".into(),
            name: "NVIDIA H100 80GB HBM3".into(),
            utilization: Some(util),
            memory_used_bytes: Some(10 << 30),
            memory_total_bytes: Some(80 << 30),
            temperature_celsius: Some(41.0),
            power_watts: Some(120.5),
            sm_clock_hertz: Some(1.98e9),
            ecc_corrected_total: Some(ecc),
            xid_errors_total: Some(1),
            processes: vec![(42, 6 << 30), (43, 1 << 30)],
            ..GpuSample::default()
        }
    }

    fn render(r: &Registry) -> String {
        let mut s = String::new();
        prometheus_client::encoding::text::encode(&mut s, r).unwrap();
        s
    }

    #[test]
    fn fake_inventory_through_the_families() {
        let mut r = Registry::default();
        let m = GpuMetrics::new(&mut r);
        let fake = FakeInventory::default();
        *fake.samples.lock().unwrap() = Ok(vec![sample("GPU-a", 0.75, 2)]);
        let mut inv: Box<dyn GpuInventory> = Box::new(fake.clone());
        let first = inv.sample().unwrap();
        m.update(&first, "node1", &[42], &[]);
        let text = render(&r);
        let labels = r#"gpu="0",UUID="GPU-a",pci_bus_id="00000000:01:00.0",modelName="NVIDIA H100 80GB HBM3",Hostname="node1""#;
        assert!(
            text.contains(&format!("llm_gpu_utilization{{{labels}}} 0.75")),
            "{text}"
        );
        assert!(
            text.contains(&format!(
                "llm_gpu_memory_total_bytes{{{labels}}} 85899345920"
            )),
            "{text}"
        );
        assert!(
            text.contains(&format!("llm_gpu_ecc_corrected_errors_total{{{labels}}} 2")),
            "{text}"
        );
        assert!(
            text.contains("llm_gpu_process_memory_used_bytes{pid=\"42\"} 6442450944"),
            "{text}"
        );
        assert!(
            !text.contains("pid=\"43\""),
            "only traced processes: {text}"
        );
        assert!(
            !text.contains("llm_gpu_sm_activity{"),
            "absent figures are not exported: {text}"
        );

        // The counter advances by the device's delta; a vanished GPU's gauges go away.
        *fake.samples.lock().unwrap() = Ok(vec![sample("GPU-b", 0.1, 0)]);
        let mut second = first.clone();
        second[0].ecc_corrected_total = Some(5);
        m.update(&second, "node1", &[42], &first);
        assert!(render(&r).contains(&format!("llm_gpu_ecc_corrected_errors_total{{{labels}}} 5")));
        let third = inv.sample().unwrap();
        m.update(&third, "node1", &[], &second);
        let text = render(&r);
        assert!(
            !text.contains("llm_gpu_utilization{gpu=\"0\",UUID=\"GPU-a\""),
            "{text}"
        );
        assert!(text.contains("UUID=\"GPU-b\""), "{text}");
        assert!(
            !text.contains("llm_gpu_process_memory_used_bytes{"),
            "{text}"
        );

        *fake.samples.lock().unwrap() = Err("driver gone");
        assert!(inv.sample().is_err());
        m.clear();
        assert!(!render(&r).contains("llm_gpu_utilization{"));
    }
}
