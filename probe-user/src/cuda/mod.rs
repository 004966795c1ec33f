//! CUDA driver/runtime probes, user side: find the CUDA libraries a target maps or would load
//! (`libs`), keep a ledger of device memory per process (`ledger`), name call sites (`symbolize`),
//! and group launches into engine steps (`steps`).
//!
//! Data path: uprobe → `CudaMemEvent` / `CudaSyncEvent` (ring buffer) and per-thread launch
//! counters (`CUDA_THREADS` map) → ledger / steps → `llm_cuda_*`, `llm_gpu_memory_*` metrics.
pub mod launches;
pub mod ldcache;
pub mod ledger;
pub mod libs;
mod libs_elf;
pub mod metrics;
pub mod state;
pub mod steps;
pub mod symbolize;
pub mod uprobes;
