//! `cargo xtask setup`: install what a fresh machine lacks, idempotently, saying what it does.
//! The eBPF toolchain recipe: stable rustc with `RUSTC_BOOTSTRAP=1` and `-Z build-std=core` needs
//! `rust-src`, and bpf-linker must be built against rustc's own libLLVM (same LLVM major), which
//! `cargo install bpf-linker --no-default-features --features llvm-N` finds through `LLVM_PREFIX`.
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _, Result};

use crate::{cache_dir, run, step};

/// Pinned so that every machine builds the same engine (llama.cpp is compiled from source).
const PY_PACKAGES: &[&str] = &[
    "llama-cpp-python[server]==0.3.36",
    "gguf==0.19.0",
    "numpy",
    // tests/fixtures/deploy/check_deploy.py validates the Kubernetes manifests offline.
    "kubernetes-validate",
    "pyyaml",
    // tests/fixtures/servers/grpc_llm.py: the gRPC server-streaming test service (a wheel).
    "grpcio==1.85.3",
];
const BPF_LINKER_VERSION: &str = "0.13.0";

fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn have(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// LLVM major version of the active rustc (`rustc -vV` → `LLVM version: 22.1.2`).
fn rustc_llvm_major() -> Result<u32> {
    let v = output(Command::new("rustc").arg("-vV"))?;
    let line = v
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .context("rustc -vV has no LLVM version")?;
    line.split('.')
        .next()
        .unwrap_or("")
        .trim()
        .parse()
        .context("parsing the LLVM major")
}

pub fn rust_src() -> Result<()> {
    let installed = output(Command::new("rustup").args(["component", "list", "--installed"]))?;
    if installed.lines().any(|l| l.starts_with("rust-src")) {
        step("rust-src: present");
        return Ok(());
    }
    step("rust-src: installing (rustup component add rust-src)");
    run(Command::new("rustup").args(["component", "add", "rust-src"]))
}

pub fn bpf_linker() -> Result<()> {
    let major = rustc_llvm_major()?;
    let stamp = cache_dir().join("bpf-linker.llvm");
    let current = std::fs::read_to_string(&stamp).unwrap_or_default();
    let version_ok = Command::new("bpf-linker")
        .arg("--version")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(BPF_LINKER_VERSION));
    if version_ok && current.trim() == major.to_string() {
        step(&format!(
            "bpf-linker {BPF_LINKER_VERSION} (LLVM {major}): present"
        ));
        return Ok(());
    }
    let sysroot = PathBuf::from(output(Command::new("rustc").args(["--print", "sysroot"]))?.trim());
    let lib = std::fs::read_dir(sysroot.join("lib"))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&format!("libLLVM.so.{major}")))
        })
        .with_context(|| format!("no libLLVM.so.{major}* in {}/lib", sysroot.display()))?;
    let prefix = cache_dir().join(format!("llvm-{major}"));
    std::fs::create_dir_all(prefix.join("lib"))?;
    let link = prefix.join("lib/libLLVM.so");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(&lib, &link)?;
    step(&format!(
        "bpf-linker: building {BPF_LINKER_VERSION} against rustc's LLVM {major} ({}) — about 3 minutes",
        lib.display()
    ));
    run(Command::new("cargo")
        .args([
            "install",
            "bpf-linker",
            "--version",
            BPF_LINKER_VERSION,
            "--force",
            "--no-default-features",
            "--features",
        ])
        .arg(format!("llvm-{major}"))
        .env("LLVM_PREFIX", &prefix))?;
    std::fs::write(&stamp, major.to_string())?;
    Ok(())
}

fn apt_install(packages: &[&str]) -> Result<()> {
    step(&format!("apt: installing {}", packages.join(" ")));
    run(Command::new("apt-get").args(["update", "-qq"]))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(packages)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

pub fn system_packages() -> Result<()> {
    let mut missing = Vec::new();
    if !have("node") {
        missing.push("nodejs");
    }
    if !have("python3") {
        missing.extend(["python3", "python3-venv"]);
    }
    // llama-cpp-python fetches cmake and ninja from PyPI itself; it needs a C/C++ compiler.
    if !have("cc") || !have("c++") {
        missing.extend(["build-essential"]);
    }
    // A real Prometheus and promtool for the rules and dashboard tests.
    if !have("promtool") || !std::path::Path::new("/usr/bin/prometheus").exists() {
        missing.push("prometheus");
    }
    // A real Alertmanager and amtool for the alert-routing test.
    if !have("amtool") || !std::path::Path::new("/usr/bin/prometheus-alertmanager").exists() {
        missing.push("prometheus-alertmanager");
    }
    // The adversarial tests: curl and openssl (HTTPS endpoint), ip (a network namespace as a
    // client off loopback), unshare (a target in its own mount namespace).
    for (tool, package) in [
        ("curl", "curl"),
        ("openssl", "openssl"),
        ("ip", "iproute2"),
        ("unshare", "util-linux"),
        // The image: built with buildah, run with podman on runc (tests/tests/image.rs).
        ("buildah", "buildah"),
        ("podman", "podman"),
        ("runc", "runc"),
        // Per-program cost in `cargo xtask bench --only progcost`.
        ("bpftool", "bpftool"),
    ] {
        if !have(tool) {
            missing.push(package);
        }
    }
    if missing.is_empty() {
        step(
            "system packages (node, python3, C/C++ compiler, prometheus, alertmanager, curl, \
             openssl, iproute2, util-linux, buildah, podman, runc, bpftool): present",
        );
        return Ok(());
    }
    apt_install(&missing)?;
    // The packages enable system services; the tests start their own instances on loopback.
    for (package, binary) in [
        ("prometheus", "/usr/bin/prometheus"),
        (
            "prometheus-alertmanager",
            "/usr/bin/prometheus-alertmanager",
        ),
    ] {
        if missing.contains(&package) {
            let _ = Command::new("systemctl")
                .args(["disable", "--now", package])
                .output();
            let _ = Command::new("pkill").args(["-f", binary]).output();
        }
    }
    Ok(())
}

/// `python3 -m venv DIR`, installing Debian's python3-venv first when the module is missing.
pub fn create_venv(dir: &Path) -> Result<()> {
    step(&format!("python venv: creating {}", dir.display()));
    if run(Command::new("python3").args(["-m", "venv"]).arg(dir)).is_err() {
        apt_install(&["python3-venv"])?;
        run(Command::new("python3").args(["-m", "venv"]).arg(dir))?;
    }
    Ok(())
}

pub fn venv() -> Result<PathBuf> {
    let dir = cache_dir().join("venv");
    let py = dir.join("bin/python");
    let check = || {
        Command::new(&py)
            .args([
                "-c",
                "import llama_cpp.server, gguf, numpy, kubernetes_validate, yaml, grpc",
            ])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if py.exists() && check() {
        step("python venv with llama-cpp-python, kubernetes-validate and grpcio: present");
        return Ok(py);
    }
    if !py.exists() {
        create_venv(&dir)?;
    }
    step(
        "python venv: installing llama-cpp-python (compiles llama.cpp: about 6 minutes on 2 cores)",
    );
    let jobs = std::thread::available_parallelism().map_or(2, std::num::NonZero::get);
    run(Command::new(dir.join("bin/pip"))
        .args(["install", "--progress-bar", "off"])
        .args(PY_PACKAGES)
        .env("CMAKE_BUILD_PARALLEL_LEVEL", jobs.to_string()))?;
    if !check() {
        bail!("llama-cpp-python installed but does not import");
    }
    Ok(py)
}

pub fn tiny_model(py: &Path, root: &Path) -> Result<PathBuf> {
    let model = cache_dir().join(crate::TINY_MODEL);
    if model.exists() {
        step("tiny GGUF model: present");
        return Ok(model);
    }
    step("tiny GGUF model: writing a random-weight llama");
    run(Command::new(py)
        .arg(root.join("tests/fixtures/engine/make_tiny_gguf.py"))
        .arg(&model))?;
    Ok(model)
}
