//! llm-probe's agent: loads the kernel programs, turns socket events into per-request timings
//! (TTFT, TBT, end-to-end, outcome, tokens) and exports them as Prometheus `llm_*` metrics.
pub mod agent;
pub mod attach;
pub mod client;
pub mod cuda;
pub mod ebpf;
pub mod engine;
pub mod events;
pub mod gpu;
pub mod health;
pub mod http;
pub mod metrics;
pub mod requests;
pub mod server;
