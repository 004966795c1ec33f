//! llm-probe's agent: loads the kernel programs, turns socket events into per-request timings
//! (TTFT, TBT, end-to-end, outcome, tokens) and exports them as Prometheus `llm_*` metrics.
//!
//! Three layers (CONTRIBUTING.md; `tests/layers.rs` enforces them):
//! - pure — values and bytes in, values out; no aya, no files, no sockets: `record`, `http`,
//!   `requests`, `attribution`, `cuda`, `engine`, `gpu`, `health`, `metrics`, `threads`;
//! - system — the outside world: `kernel` (aya, the only module that imports it), `discover`
//!   (targets in /proc), `cudalibs` (CUDA libraries inside a target's root), `symbolize`
//!   (blazesym), `nvml`, `webclient` (the one HTTP client), `scrape` (engine pages);
//! - wiring — `agent` joins both sides; `server` serves snapshots and never imports `agent`.

// Pure.
pub mod attribution;
pub mod cuda;
pub mod engine;
pub mod gpu;
pub mod health;
pub mod http;
pub mod metrics;
pub mod record;
pub mod requests;
pub mod threads;

// System.
pub mod cudalibs;
pub mod discover;
pub mod kernel;
pub mod nvml;
pub mod scrape;
pub mod symbolize;
pub mod webclient;

// Wiring.
pub mod agent;
pub mod server;
