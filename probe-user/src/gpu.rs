//! GPU device stats: one sample per device, from a `GpuInventory` — NVML in production
//! (`crate::nvml`), `FakeInventory` in tests, so the sampler and the families are tested without a
//! GPU. Exported by `crate::metrics::gpu` with dcgm-exporter's label keys.

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
    /// The NVML library, or one of its calls, failed.
    #[error("NVML: {0}")]
    Nvml(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// NVML loaded but reports no device.
    #[error("NVML found no GPU")]
    NoDevice,
    /// A test's fake inventory was told to fail.
    #[error("fake inventory: {0}")]
    Fake(&'static str),
}

/// A source of GPU samples: NVML in production, `FakeInventory` in tests.
pub trait GpuInventory: Send {
    fn sample(&mut self) -> Result<Vec<GpuSample>, GpuError>;
}

/// Test double: returns whatever the test put in `samples` (shared, so a test can change it).
#[derive(Clone)]
pub struct FakeInventory {
    pub samples: std::sync::Arc<std::sync::Mutex<Result<Vec<GpuSample>, &'static str>>>,
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
            Ok(s) => s.clone().map_err(GpuError::Fake),
            Err(_) => Err(GpuError::Fake("poisoned")),
        }
    }
}
