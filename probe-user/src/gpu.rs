//! GPU device stats from NVML, behind a trait so that tests use a fake (STYLE.md §13).
//!
//! NVML is loaded at run time (`nvml-wrapper` dlopens libnvidia-ml.so.1): a machine without the
//! driver gets one log line, `llm_probe_attached{program="nvml"} 0`, and a GPU check that says
//! "unavailable" — everything else keeps working. Labels use dcgm-exporter's keys (`gpu`, `UUID`,
//! `pci_bus_id`, `modelName`, `Hostname`) so dashboards can join the two.

use std::{collections::HashMap, sync::atomic::AtomicU64};

use nvml_wrapper::{
    bitmasks::event::EventTypes,
    enum_wrappers::device::{Clock, EccCounter, MemoryError, PcieUtilCounter, TemperatureSensor},
    enums::{device::UsedGpuMemory, event::XidError},
    Nvml,
};
use prometheus_client::{
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

use crate::metrics::PidLabels;

/// One device, one sampling instant. `None` where the device does not report the figure.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct GpuSample {
    pub index: u32,
    pub uuid: String,
    pub pci_bus_id: String,
    pub name: String,
    /// Fraction of the last sample period in which a kernel ran (NVML `utilization.gpu`), 0–1.
    pub utilization: Option<f64>,
    pub memory_used_bytes: Option<u64>,
    pub memory_total_bytes: Option<u64>,
    pub temperature_celsius: Option<f64>,
    pub power_watts: Option<f64>,
    pub sm_clock_hertz: Option<f64>,
    pub pcie_tx_bytes_per_second: Option<f64>,
    pub pcie_rx_bytes_per_second: Option<f64>,
    /// Volatile (since driver load) ECC error totals.
    pub ecc_corrected_total: Option<u64>,
    pub ecc_uncorrected_total: Option<u64>,
    /// GPM SM activity (Hopper and newer), 0–1, over the interval since the previous sample.
    pub sm_activity: Option<f64>,
    /// Critical XID events seen since the probe started (None when the device cannot report them).
    pub xid_errors_total: Option<u64>,
    /// (pid, used bytes) of the compute processes on this device.
    pub processes: Vec<(u32, u64)>,
}

#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    #[error("NVML: {0}")]
    Nvml(#[from] nvml_wrapper::error::NvmlError),
    #[error("{0}")]
    Other(String),
}

/// A source of GPU samples: NVML in production, `FakeInventory` in tests.
pub trait GpuInventory: Send {
    fn sample(&mut self) -> Result<Vec<GpuSample>, GpuError>;
}

/// The NVML-backed inventory. `Nvml` is leaked once so that GPM samples (which borrow it) can be
/// kept between calls; there is one per process.
pub struct NvmlInventory {
    nvml: &'static Nvml,
    gpm_prev: HashMap<u32, nvml_wrapper::gpm::GpmSample<'static>>,
    /// One XID event set per device that supports critical-XID events (registration consumes the
    /// set on failure, so they are not shared), with the count seen so far.
    xid: HashMap<u32, (nvml_wrapper::EventSet<'static>, u64)>,
}

impl NvmlInventory {
    pub fn new() -> Result<Self, GpuError> {
        let nvml = Nvml::init()?;
        let count = nvml.device_count()?;
        if count == 0 {
            return Err(GpuError::Other("NVML found no GPU".into()));
        }
        let nvml: &'static Nvml = Box::leak(Box::new(nvml));
        let mut xid = HashMap::new();
        for index in 0..count {
            let Ok(d) = nvml.device_by_index(index) else {
                continue;
            };
            let xid_ok = d
                .supported_event_types()
                .is_ok_and(|t| t.contains(EventTypes::CRITICAL_XID_ERROR));
            if !xid_ok {
                continue;
            }
            let registered = nvml
                .create_event_set()
                .map_err(|e| e.to_string())
                .and_then(|set| {
                    d.register_events(EventTypes::CRITICAL_XID_ERROR, set)
                        .map_err(|e| e.error.to_string())
                });
            match registered {
                Ok(set) => {
                    xid.insert(index, (set, 0));
                }
                Err(e) => log::info!("GPU {index}: XID events not available: {e}"),
            }
        }
        Ok(Self {
            nvml,
            gpm_prev: HashMap::new(),
            xid,
        })
    }

    /// Drain pending XID events without blocking; returns the running count for `index`.
    fn drain_xid(&mut self, index: u32) -> Option<u64> {
        let (set, count) = self.xid.get_mut(&index)?;
        while let Ok(ev) = set.wait(0) {
            *count += 1;
            if let Some(XidError::Value(code)) = ev.event_data {
                log::warn!("GPU {index}: XID {code} (see NVIDIA's XID catalog)");
            }
        }
        Some(*count)
    }
}

fn opt<T>(r: Result<T, nvml_wrapper::error::NvmlError>) -> Option<T> {
    r.ok()
}

impl GpuInventory for NvmlInventory {
    fn sample(&mut self) -> Result<Vec<GpuSample>, GpuError> {
        let mut out = Vec::new();
        for index in 0..self.nvml.device_count()? {
            let d = self.nvml.device_by_index(index)?;
            let mem = opt(d.memory_info());
            let mut processes: Vec<(u32, u64)> = d
                .running_compute_processes()
                .unwrap_or_default()
                .into_iter()
                .filter_map(|p| match p.used_gpu_memory {
                    UsedGpuMemory::Used(b) => Some((p.pid, b)),
                    UsedGpuMemory::Unavailable => None,
                })
                .collect();
            processes.sort_unstable();
            let mut sm_activity = None;
            if opt(d.gpm_support()).unwrap_or(false) {
                if let Ok(now) = d.gpm_sample() {
                    if let Some(prev) = self.gpm_prev.get(&index) {
                        let ids = [nvml_wrapper::enums::gpm::GpmMetricId::SmUtil];
                        if let Ok(res) =
                            nvml_wrapper::gpm::gpm_metrics_get(self.nvml, prev, &now, &ids)
                        {
                            sm_activity = res.into_iter().flatten().next().map(|r| r.value / 100.0);
                        }
                    }
                    self.gpm_prev.insert(index, now);
                }
            }
            let xid_errors_total = self.drain_xid(index);
            out.push(GpuSample {
                xid_errors_total,
                index,
                uuid: d.uuid().unwrap_or_default(),
                pci_bus_id: d.pci_info().map(|p| p.bus_id).unwrap_or_default(),
                name: d.name().unwrap_or_default(),
                utilization: opt(d.utilization_rates()).map(|u| f64::from(u.gpu) / 100.0),
                memory_used_bytes: mem.as_ref().map(|m| m.used),
                memory_total_bytes: mem.as_ref().map(|m| m.total),
                temperature_celsius: opt(d.temperature(TemperatureSensor::Gpu)).map(f64::from),
                // NVML reports milliwatts, MHz and KB/s.
                power_watts: opt(d.power_usage()).map(|mw| f64::from(mw) / 1e3),
                sm_clock_hertz: opt(d.clock_info(Clock::SM)).map(|mhz| f64::from(mhz) * 1e6),
                pcie_tx_bytes_per_second: opt(d.pcie_throughput(PcieUtilCounter::Send))
                    .map(|kb| f64::from(kb) * 1024.0),
                pcie_rx_bytes_per_second: opt(d.pcie_throughput(PcieUtilCounter::Receive))
                    .map(|kb| f64::from(kb) * 1024.0),
                ecc_corrected_total: opt(
                    d.total_ecc_errors(MemoryError::Corrected, EccCounter::Volatile)
                ),
                ecc_uncorrected_total: opt(
                    d.total_ecc_errors(MemoryError::Uncorrected, EccCounter::Volatile)
                ),
                sm_activity,
                processes,
            });
        }
        Ok(out)
    }
}

/// Test double: returns whatever the test put in `samples` (shared, so a test can change it).
#[derive(Clone)]
pub struct FakeInventory {
    pub samples: std::sync::Arc<std::sync::Mutex<Result<Vec<GpuSample>, String>>>,
}

impl Default for FakeInventory {
    fn default() -> Self {
        Self {
            samples: std::sync::Arc::new(std::sync::Mutex::new(Ok(Vec::new()))),
        }
    }
}

impl GpuInventory for FakeInventory {
    fn sample(&mut self) -> Result<Vec<GpuSample>, GpuError> {
        match self.samples.lock() {
            Ok(s) => s.clone().map_err(GpuError::Other),
            Err(_) => Err(GpuError::Other("fake poisoned".into())),
        }
    }
}

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

type F64Gauge = Gauge<f64, AtomicU64>;

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

pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

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

        *fake.samples.lock().unwrap() = Err("driver gone".into());
        assert!(inv.sample().is_err());
        m.clear();
        assert!(!render(&r).contains("llm_gpu_utilization{"));
    }
}
