//! The NVML-backed `GpuInventory`. NVML is loaded at run time (`nvml-wrapper` dlopens
//! libnvidia-ml.so.1): a machine without the driver gets one log line,
//! `llm_probe_attached{program="nvml"} 0`, and a GPU check that says "unavailable" — everything
//! else keeps working.

use std::collections::HashMap;

use nvml_wrapper::{
    bitmasks::event::EventTypes,
    enum_wrappers::device::{Clock, EccCounter, MemoryError, PcieUtilCounter, TemperatureSensor},
    enums::{device::UsedGpuMemory, event::XidError},
    Nvml,
};

use crate::gpu::{GpuError, GpuInventory, GpuSample};

impl From<nvml_wrapper::error::NvmlError> for GpuError {
    fn from(e: nvml_wrapper::error::NvmlError) -> Self {
        Self::Nvml(Box::new(e))
    }
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
            return Err(GpuError::NoDevice);
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
