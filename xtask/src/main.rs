//! `cargo xtask …`: everything that runs llm-probe's pieces. The two commands a fresh machine needs:
//! `cargo xtask demo` (the main job on an embedded default) and `cargo xtask test` (every test).
mod bench;
mod bench_bystander;
mod bench_cuda;
mod bench_engine;
mod bench_progcost;
mod bench_tls;
mod demo;
mod image;
mod setup;
mod vllm;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "llm-probe tasks: setup, build, test, demo")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what this machine lacks: rust-src, bpf-linker (built against rustc's LLVM), node,
    /// a Python venv with llama-cpp-python, and the tiny test model. Idempotent.
    Setup,
    /// Setup (toolchain parts), then build target/release/llm-probe.
    Build,
    /// Build the OCI image (deploy/container/Containerfile) with buildah: the release binary and
    /// the libraries it links, as localhost/llm-probe:VERSION in containers/storage (vfs).
    /// Needs root, buildah and podman (`cargo xtask setup` installs them on Debian).
    Image {
        /// Also push it to REGISTRY/llm-probe:VERSION (e.g. registry.example.com/team), after
        /// `buildah login REGISTRY`; then set that name in deploy/kubernetes/kustomization.yaml.
        #[arg(long, value_name = "REGISTRY")]
        push: Option<String>,
        /// Write the image as an OCI archive too (for `podman load`, `skopeo copy`, air-gapped
        /// nodes).
        #[arg(long, value_name = "FILE")]
        archive: Option<PathBuf>,
    },
    /// Setup, build, then run every test (unit, root integration with real eBPF, end-to-end).
    Test {
        /// Extra arguments for the test binaries (e.g. a test-name filter).
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// Benchmarks (docs/BENCHMARKS.md): overhead with/without the probe in the same run, RSS with
    /// 1k streams, ingestion and /metrics render micro-benchmarks. Needs root.
    Bench {
        /// Only this one: micro, overhead, progcost (ns per run of each kernel program), engine
        /// (llama-cpp-python), vllm, rss, cuda, bystander, tls (an HTTPS server with and without
        /// the OpenSSL probes); run only when named: longstreams (4,096 streams of 4,100 events,
        /// minutes of full load) and floor (the overhead benchmark against the `sock:` path's
        /// floors: its programs attached and returning at once, and one bare record per write).
        #[arg(long)]
        only: Option<String>,
        /// Rounds of the overhead benchmark (each: without, then with the probe).
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// Seconds per overhead measurement.
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        /// Measure this llm-probe binary instead of the one the build makes (the load
        /// generators are still built): for an A/B of two builds, copy one build's
        /// target/release/llm-probe aside and run the benchmark once with each.
        #[arg(long, value_name = "PATH")]
        probe: Option<std::path::PathBuf>,
        /// Probe configurations the engine benchmarks (engine, vllm) compare with the baseline,
        /// each in every round, comma-separated: auto (the defaults), sock, sock-nothreads,
        /// syscalls, sock-nossl, sock-normal, slow-drain, untraced (the agent tracing nothing: what
        /// other processes pay), programs (the agent stopped once attached: the kernel side alone),
        /// floor-hooks, floor-records (the `sock:` path's floors, docs/BENCHMARKS.md).
        #[arg(long, value_delimiter = ',', default_value = "auto", value_parser = config_name)]
        configs: Vec<String>,
    },
    /// Start a real tiny engine (llama-cpp-python), put load on it, attach llm-probe, and print a
    /// live summary until Ctrl-C.
    Demo {
        /// Stop by itself after this many seconds (0 = run until Ctrl-C).
        #[arg(long, default_value_t = 0)]
        duration: u64,
        /// Where llm-probe serves /metrics.
        #[arg(long, default_value = "127.0.0.1:9464")]
        listen: String,
        /// The engine to serve: llama (llama-cpp-python, starts in seconds) or vllm (vLLM on
        /// this CPU, starts in 40-100 s; the probe also reads vLLM's own /metrics).
        #[arg(long, value_enum, default_value = "llama")]
        engine: demo::Engine,
    },
}

pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask/ has a parent")
        .to_path_buf()
}

pub use tests::{cache_dir, TINY_MODEL};

pub fn step(msg: &str) {
    eprintln!("\x1b[1m==>\x1b[0m {msg}");
}

pub fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("starting {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

/// A `--configs` entry: one of `bench::CONFIGS`.
fn config_name(s: &str) -> Result<String, String> {
    if bench::CONFIGS.iter().any(|(n, _, _)| *n == s) {
        Ok(s.to_owned())
    } else {
        let names: Vec<&str> = bench::CONFIGS.iter().map(|(n, _, _)| *n).collect();
        Err(format!(
            "not a probe configuration; one of: {}",
            names.join(", ")
        ))
    }
}

fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(root()).env("RUSTC_BOOTSTRAP", "1");
    c
}

fn setup_toolchain() -> Result<()> {
    std::fs::create_dir_all(cache_dir())?;
    setup::rust_src()?;
    setup::bpf_linker()
}

fn setup_all() -> Result<()> {
    setup_toolchain()?;
    setup::system_packages()?;
    let py = setup::venv()?;
    setup::tiny_model(&py, &root())?;
    let vpy = vllm::venv()?;
    vllm::tiny_model(&vpy)?;
    Ok(())
}

pub fn build() -> Result<PathBuf> {
    setup_toolchain()?;
    step("building llm-probe (release; the kernel programs are built by probe-user/build.rs)");
    run(cargo().args([
        "build",
        "--release",
        "-p",
        "probe-user",
        "-p",
        "tests",
        "--bins",
    ]))?;
    Ok(root().join("target/release/llm-probe"))
}

/// Run `cargo test`, forwarding its output, and add up its `test result:` lines:
/// (passed, failed, ignored).
fn cargo_test(cmd: &mut Command) -> Result<(u64, u64, u64)> {
    use std::io::BufRead as _;
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("starting cargo test")?;
    let mut sums = (0, 0, 0);
    if let Some(out) = child.stdout.take() {
        for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            println!("{line}");
            if let Some(rest) = line.strip_prefix("test result: ") {
                let num = |word: &str| -> u64 {
                    rest.split(';')
                        .find_map(|part| {
                            part.trim()
                                .trim_start_matches("ok. ")
                                .trim_start_matches("FAILED. ")
                                .strip_suffix(word)
                        })
                        .and_then(|n| n.trim().parse().ok())
                        .unwrap_or(0)
                };
                sums.0 += num(" passed");
                sums.1 += num(" failed");
                sums.2 += num(" ignored");
            }
        }
    }
    let status = child.wait()?;
    if !status.success() {
        println!(
            "tests: {} passed, {} failed, {} skipped",
            sums.0,
            sums.1.max(1),
            sums.2
        );
        bail!("cargo test failed ({status})");
    }
    Ok(sums)
}

/// Commits after this one keep their subjects within `MAX_SUBJECT` characters (CONTRIBUTING.md).
const SUBJECTS_CHECKED_AFTER: &str = "24665a4";
const MAX_SUBJECT: usize = 72;

/// Fail on a commit subject over `MAX_SUBJECT` characters; skipped (with a line saying so) where
/// there is no git history to read.
fn commit_subjects() -> Result<()> {
    let out = Command::new("git")
        .current_dir(root())
        .args([
            "log",
            "--format=%h %s",
            &format!("{SUBJECTS_CHECKED_AFTER}..HEAD"),
        ])
        .output();
    let Some(out) = out.ok().filter(|o| o.status.success()) else {
        step("commit subjects: no git history here, not checked");
        return Ok(());
    };
    let long: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| {
            l.split_once(' ')
                .is_some_and(|(_, s)| s.chars().count() > MAX_SUBJECT)
        })
        .map(str::to_owned)
        .collect();
    if !long.is_empty() {
        bail!(
            "commit subjects over {MAX_SUBJECT} characters (put the detail in the body):\n  {}",
            long.join("\n  ")
        );
    }
    step(&format!(
        "commit subjects: all within {MAX_SUBJECT} characters"
    ));
    Ok(())
}

fn is_root() -> bool {
    // SAFETY: plain getter.
    unsafe { libc::geteuid() == 0 }
}

fn main() -> Result<()> {
    match Cli::parse().task {
        Task::Setup => setup_all(),
        Task::Build => build().map(|p| step(&format!("built {}", p.display()))),
        Task::Test { args } => {
            setup_all()?;
            build()?;
            if !is_root() {
                step("not root: tests that load eBPF programs will say SKIP (CI runs as root)");
            }
            commit_subjects()?;
            step("unit and pure-logic tests");
            let mut total = cargo_test(
                cargo()
                    .args([
                        "test",
                        "--release",
                        "--workspace",
                        "--exclude",
                        "tests",
                        "--tests",
                        "--",
                    ])
                    .args(&args),
            )?;
            step("integration tests: real eBPF, real servers on 127.0.0.1 (one at a time)");
            let t = cargo_test(
                cargo()
                    .args([
                        "test",
                        "--release",
                        "-p",
                        "tests",
                        "--tests",
                        "--",
                        "--test-threads=1",
                    ])
                    .args(&args),
            )?;
            total = (total.0 + t.0, total.1 + t.1, total.2 + t.2);
            if args.is_empty() {
                // The default run above used the `sock:` capture path; the timing and outcome
                // tests run once more on the syscall fallback (`llm-probe run --capture syscalls`)
                // and on the `sock:` path without the scheduler programs, where a response write
                // is dated from a map of its own instead of the thread's THREADS entry
                // (probe-ebpf/src/sockio.rs).
                for (what, env, value, suites) in [
                    (
                        "on the syscall capture path",
                        tests::CAPTURE_ENV,
                        "syscalls",
                        &["node", "attribution", "llama", "vllm", "tls", "h2", "grpc"][..],
                    ),
                    (
                        "on the sock: path with --thread-states off",
                        tests::THREAD_STATES_ENV,
                        "off",
                        &["node", "llama"][..],
                    ),
                ] {
                    step(&format!("accuracy tests {what} ({})", suites.join(", ")));
                    let mut c = cargo();
                    c.env(env, value).args(["test", "--release", "-p", "tests"]);
                    for s in suites {
                        c.args(["--test", s]);
                    }
                    let t = cargo_test(c.args(["--", "--test-threads=1"]))?;
                    total = (total.0 + t.0, total.1 + t.1, total.2 + t.2);
                }
                step("demo smoke test: `cargo xtask demo --duration 8` on a free port");
                let port = std::net::TcpListener::bind("127.0.0.1:0")?
                    .local_addr()?
                    .port();
                let probe = root().join("target/release/llm-probe");
                let recorded =
                    demo::run(&probe, 8, &format!("127.0.0.1:{port}"), demo::Engine::Llama)?;
                if recorded == 0 {
                    total.1 += 1;
                    eprintln!("demo smoke test FAILED: llm-probe recorded no request");
                } else {
                    total.0 += 1;
                    step(&format!("demo smoke test: {recorded} requests recorded"));
                }
            }
            println!(
                "tests: {} passed, {} failed, {} skipped",
                total.0, total.1, total.2
            );
            if total.1 > 0 {
                bail!("{} tests failed", total.1);
            }
            Ok(())
        }
        Task::Bench {
            only,
            rounds,
            seconds,
            probe,
            configs,
        } => {
            if !is_root() {
                bail!("the benchmarks load eBPF programs: run them as root");
            }
            let built = build()?;
            let bin = match probe {
                Some(p) if !p.is_file() => bail!("--probe {}: no such file", p.display()),
                Some(p) => {
                    step(&format!(
                        "measuring {} (--probe), not {}",
                        p.display(),
                        built.display()
                    ));
                    p
                }
                None => built,
            };
            let want = |n: &str| only.as_deref().is_none_or(|o| o == n);
            if want("micro") {
                bench::micro()?;
            }
            if want("overhead") {
                bench::overhead(&bin, rounds, seconds, &bench::OVERHEAD_CONFIGS)?;
            }
            // A diagnosis of the overhead's floor: only when asked for by name.
            if only.as_deref() == Some("floor") {
                bench::overhead(&bin, rounds, seconds, &bench::FLOOR_CONFIGS)?;
            }
            if want("progcost") {
                bench_progcost::program_cost(&bin, seconds)?;
            }
            if want("engine") {
                bench_engine::engine_overhead(&bin, rounds, seconds.max(8), &configs)?;
            }
            if want("vllm") {
                bench_engine::vllm_overhead(&bin, rounds, seconds.max(8), &configs)?;
            }
            if want("rss") {
                bench::rss(&bin, 1000)?;
            }
            // Minutes of full load on two cores: only when asked for by name.
            if only.as_deref() == Some("longstreams") {
                bench::long_streams(&bin, 4096, 4100, 240)?;
            }
            if want("cuda") {
                bench_cuda::uprobe_cost(&bin, rounds)?;
            }
            if want("bystander") {
                bench_bystander::bystander(&bin, rounds)?;
            }
            if want("tls") {
                bench_tls::tls_overhead(&bin, rounds, seconds)?;
            }
            Ok(())
        }
        Task::Image { push, archive } => {
            if !is_root() {
                bail!("buildah with the vfs driver needs root here: sudo -E cargo xtask image");
            }
            let bin = build()?;
            image::image(&bin, push.as_deref(), archive.as_deref())
        }
        Task::Demo {
            duration,
            listen,
            engine,
        } => {
            if !is_root() {
                bail!("the demo loads eBPF programs: run it as root (sudo -E cargo xtask demo)");
            }
            setup_all()?;
            let bin = build()?;
            demo::run(&bin, duration, &listen, engine).map(|_| ())
        }
    }
}
