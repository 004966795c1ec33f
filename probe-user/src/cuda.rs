//! CUDA, user side and pure: a ledger of device memory per process (`ledger`), engine steps
//! (`steps`), launch counts (`launches`), and the state that joins them (`state`). The uprobes that
//! feed them are attached by `crate::kernel::cuda`; the libraries they sit in are found by
//! `crate::cudalibs`; call sites are named by `crate::symbolize`.
//!
//! Data path: uprobe → `CudaMemEvent` / `CudaSyncEvent` (ring buffer) and per-thread launch
//! counters (`CUDA_THREADS` map) → ledger / steps → `llm_cuda_*`, `llm_gpu_memory_*` metrics.
pub mod launches;
pub mod ledger;
pub mod state;
pub mod steps;
