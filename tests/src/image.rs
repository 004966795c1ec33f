//! The OCI image (deploy/container/Containerfile): staging its build context from the release
//! binary and building it with buildah. Used by `cargo xtask image` and by the image test, so that
//! the test runs exactly what users build.
//!
//! Storage: containers/storage with the `vfs` driver (works on every filesystem, no overlay
//! module needed), runtime `runc` (crun refuses hybrid cgroup setups such as this project's
//! VMs). Both are passed on every command so that no host configuration is assumed.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

/// Flags every buildah/podman command of ours takes.
pub const STORAGE: [&str; 2] = ["--storage-driver", "vfs"];
/// The image's repository name (`localhost/llm-probe` locally; `REGISTRY/llm-probe` once pushed).
pub const NAME: &str = "llm-probe";
/// The unprivileged default user of the image.
pub const USER_ID: u32 = 65532;
/// `org.opencontainers.image.source`: the workspace's `repository`.
pub const SOURCE: &str = "https://example.invalid/llm-probe";

/// The commit the image is built from (`git rev-parse HEAD`, with `-dirty` when the tree has
/// changes), or `unknown` outside a git checkout.
pub fn git_revision(workspace: &Path) -> String {
    let git = |args: &[&str]| {
        Command::new("git")
            .arg("-C")
            .arg(workspace)
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
    };
    match git(&["rev-parse", "HEAD"]) {
        Some(head) if git(&["status", "--porcelain"]).is_some_and(|s| s.is_empty()) => head,
        Some(head) => format!("{head}-dirty"),
        None => "unknown".into(),
    }
}

/// What a build produced.
#[derive(Debug, Clone)]
pub struct Built {
    /// `localhost/llm-probe:VERSION`.
    pub reference: String,
    /// The image ID (sha256 of its config): equal for equal inputs.
    pub id: String,
    /// Bytes of the image's layers as stored.
    pub size: u64,
}

/// Whether buildah and podman are installed (`cargo xtask setup` installs them on Debian).
pub fn tools_present() -> bool {
    ["buildah", "podman", "runc"].iter().all(|t| {
        Command::new(t)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    })
}

fn run(what: &str, cmd: &mut Command) -> Result<String, String> {
    let out = cmd
        .output()
        .map_err(|e| format!("{what}: cannot run {cmd:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{what} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// The shared libraries `ldd` resolves for `bin`, and its program interpreter.
fn shared_libs(bin: &Path) -> Result<Vec<PathBuf>, String> {
    let text = run("ldd", Command::new("ldd").arg(bin))?;
    let mut libs = Vec::new();
    for line in text.lines() {
        // `libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x…)` or `/lib64/ld-linux… (0x…)`.
        let path = line
            .split("=>")
            .nth(1)
            .unwrap_or(line)
            .split_whitespace()
            .next()
            .unwrap_or_default();
        if path.starts_with('/') {
            libs.push(PathBuf::from(path));
        } else if line.contains("=>") && !line.contains("linux-vdso") {
            return Err(format!(
                "ldd cannot resolve a library of {}: {line}",
                bin.display()
            ));
        }
    }
    Ok(libs)
}

/// Stage the build context in `context`: the Containerfile and `rootfs/` (the stripped binary,
/// its libraries at the paths ld.so looks them up, passwd/group).
pub fn stage(probe_bin: &Path, workspace: &Path, context: &Path) -> Result<(), String> {
    let _ = fs::remove_dir_all(context);
    let rootfs = context.join("rootfs");
    let io = |what: &str, e: std::io::Error| format!("{what}: {e}");
    fs::create_dir_all(rootfs.join("usr/bin")).map_err(|e| io("staging", e))?;
    fs::create_dir_all(rootfs.join("etc")).map_err(|e| io("staging", e))?;
    let bin = rootfs.join("usr/bin/llm-probe");
    run(
        "strip --strip-debug",
        Command::new("strip")
            .args(["--strip-debug", "-o"])
            .arg(&bin)
            .arg(probe_bin),
    )?;
    for lib in shared_libs(probe_bin)? {
        let rel = lib.strip_prefix("/").map_err(|_| "relative library path")?;
        let dst = rootfs.join(rel);
        if let Some(dir) = dst.parent() {
            fs::create_dir_all(dir).map_err(|e| io("staging", e))?;
        }
        // Copies the file a soname link points at, under the soname.
        fs::copy(&lib, &dst).map_err(|e| io(&lib.display().to_string(), e))?;
    }
    fs::write(
        rootfs.join("etc/passwd"),
        format!("root:x:0:0:root:/:/sbin/nologin\n{NAME}:x:{USER_ID}:{USER_ID}::/:/sbin/nologin\n"),
    )
    .map_err(|e| io("passwd", e))?;
    fs::write(
        rootfs.join("etc/group"),
        format!("root:x:0:\n{NAME}:x:{USER_ID}:\n"),
    )
    .map_err(|e| io("group", e))?;
    fs::copy(
        workspace.join("deploy/container/Containerfile"),
        context.join("Containerfile"),
    )
    .map_err(|e| io("Containerfile", e))?;
    Ok(())
}

/// Build the image from a staged `context`, labelled and annotated with `version` and
/// `revision` (a git commit), with every timestamp at the epoch.
pub fn build(context: &Path, version: &str, revision: &str, source: &str) -> Result<Built, String> {
    let reference = format!("localhost/{NAME}:{version}");
    let mut cmd = Command::new("buildah");
    cmd.args(STORAGE).args([
        "build",
        "--timestamp",
        "0",
        "--layers=false",
        "--identity-label=false",
        "--format",
        "oci",
        "-t",
        &reference,
    ]);
    for (key, value) in [
        ("org.opencontainers.image.title", NAME),
        ("org.opencontainers.image.version", version),
        ("org.opencontainers.image.revision", revision),
        ("org.opencontainers.image.source", source),
        ("org.opencontainers.image.licenses", "MIT OR Apache-2.0"),
        (
            "org.opencontainers.image.description",
            "LLM inference observability from eBPF (run with the DaemonSet's privileges)",
        ),
    ] {
        let kv = format!("{key}={value}");
        cmd.args(["--annotation", &kv, "--label", &kv]);
    }
    cmd.arg("-f")
        .arg(context.join("Containerfile"))
        .arg(context);
    run("buildah build", &mut cmd)?;
    let id = run(
        "buildah inspect",
        Command::new("buildah")
            .args(STORAGE)
            .args(["inspect", "--type", "image", "--format", "{{.FromImageID}}"])
            .arg(&reference),
    )?;
    let size = run(
        "podman image inspect",
        Command::new("podman")
            .args(STORAGE)
            .args(["image", "inspect", "--format", "{{.Size}}"])
            .arg(&reference),
    )?
    .parse()
    .map_err(|e| format!("image size: {e}"))?;
    Ok(Built {
        reference,
        id,
        size,
    })
}

/// Write `reference` as an OCI archive at `file`.
pub fn archive(reference: &str, file: &Path) -> Result<(), String> {
    let _ = fs::remove_file(file);
    run(
        "podman save",
        Command::new("podman")
            .args(STORAGE)
            .args(["save", "--format", "oci-archive", "-o"])
            .arg(file)
            .arg(reference),
    )
    .map(|_| ())
}

/// Push `reference` to `REGISTRY/llm-probe:VERSION` (any registry buildah can log in to).
pub fn push(reference: &str, registry: &str, version: &str) -> Result<String, String> {
    let dest = format!("{}/{NAME}:{version}", registry.trim_end_matches('/'));
    run(
        "buildah push",
        Command::new("buildah")
            .args(STORAGE)
            .args(["push", reference])
            .arg(format!("docker://{dest}")),
    )?;
    Ok(dest)
}
