//! Builds the kernel programs (`probe-ebpf`) for the BPF target and leaves the object in `OUT_DIR`,
//! where `ebpf.rs` embeds it. Needs `bpf-linker` and `rust-src` (`cargo xtask setup` installs both)
//! and `RUSTC_BOOTSTRAP=1` on a stable toolchain (set in .cargo/config.toml) for `-Z build-std=core`.
use std::{env, fs, path::PathBuf};

use anyhow::Context as _;
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let out = PathBuf::from(env::var_os("OUT_DIR").context("OUT_DIR not set")?);
    println!("cargo:rerun-if-env-changed=AYA_BUILD_SKIP");
    if env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true")) {
        // Pure-logic work (docs, clippy, parser tests) without the BPF toolchain: embed an empty
        // object; `llm-probe run` then says the binary was built without its kernel programs.
        fs::write(out.join("probe"), []).context("writing placeholder object")?;
        return Ok(());
    }
    // The toolchain that runs `cargo build --target bpfel-unknown-none` for the eBPF crate.
    println!("cargo:rerun-if-env-changed=LLM_PROBE_BPF_TOOLCHAIN");
    let toolchain = env::var("LLM_PROBE_BPF_TOOLCHAIN").unwrap_or_else(|_| "stable".to_owned());
    aya_build::build_ebpf(
        [Package {
            name: "probe-ebpf",
            root_dir: "../probe-ebpf",
            ..Default::default()
        }],
        Toolchain::Custom(&toolchain),
    )
}
