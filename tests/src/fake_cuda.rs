//! Stand-ins for the CUDA driver and runtime, and an engine that drives them, for the CUDA probe's
//! tests on machines without a GPU.
//!
//! `tests/cuda/` holds three C files: `fake_cuda.c` (`libcuda.so.1`) and `fake_cudart.c`
//! (`libcudart.so.12`) export the real symbol names with the real C signatures; `fake_engine.c`
//! runs a scenario against them and prints its ground truth as one line of JSON. [`build`] compiles
//! them once per content into the cache; [`FakeEngine`] runs the engine through its stdin/stdout
//! protocol: `ready <pid>`, then `go` (the probe attaches before it; the libraries are loaded after
//! it), the JSON line, then `exit`.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, Stdio},
    sync::{
        mpsc::{self, Receiver, RecvTimeoutError},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};
use serde_json::Value;

/// The built stand-ins.
#[derive(Clone, Debug)]
pub struct FakeCuda {
    /// Holds `libcuda.so.1` and `libcudart.so.12` (what the engine's `LD_LIBRARY_PATH` names).
    pub lib_dir: PathBuf,
    /// The `fake_engine` executable.
    pub engine: PathBuf,
}

impl FakeCuda {
    pub fn libcuda(&self) -> PathBuf {
        self.lib_dir.join("libcuda.so.1")
    }

    pub fn libcudart(&self) -> PathBuf {
        self.lib_dir.join("libcudart.so.12")
    }
}

/// One compiler run: output file, source, flags before the source, libraries after it.
struct Step {
    out: &'static str,
    src: &'static str,
    flags: &'static [&'static str],
    libs: &'static [&'static str],
}

const STEPS: [Step; 3] = [
    Step {
        out: "libcuda.so.1",
        src: "fake_cuda.c",
        // Each entry point has its own body; -fno-ipa-icf keeps it so (two symbols at one address
        // would fire one uprobe for both). Every entry point opens with `endbr64; push %rbp`, as
        // CET-built libraries with frame pointers do (llm-probe probes the push, which the kernel
        // emulates; see docs/cuda.md).
        flags: &[
            "-O2",
            "-Wall",
            "-fno-omit-frame-pointer",
            "-fcf-protection=full",
            "-fno-ipa-icf",
            "-fPIC",
            "-shared",
            "-Wl,-soname,libcuda.so.1",
        ],
        libs: &["-pthread"],
    },
    Step {
        out: "libcudart.so.12",
        src: "fake_cudart.c",
        // Real calls into the driver (not jumps), as a real runtime makes them.
        flags: &[
            "-O2",
            "-Wall",
            "-fno-omit-frame-pointer",
            "-fno-optimize-sibling-calls",
            "-fPIC",
            "-shared",
            "-Wl,-soname,libcudart.so.12",
        ],
        libs: &["-ldl", "-pthread"],
    },
    Step {
        out: "fake_engine",
        src: "fake_engine.c",
        flags: &[
            "-O1",
            "-g",
            "-Wall",
            "-fno-omit-frame-pointer",
            "-rdynamic",
            "-pthread",
        ],
        libs: &["-ldl"],
    },
];

pub fn source_dir() -> PathBuf {
    crate::workspace_root().join("tests/cuda")
}

fn compiler() -> String {
    std::env::var("CC")
        .ok()
        .filter(|c| !c.trim().is_empty())
        .unwrap_or_else(|| "cc".to_owned())
}

/// FNV-1a, 64 bits: enough to tell builds of different sources apart.
fn fnv1a(hash: &mut u64, bytes: &[u8]) {
    for b in bytes {
        *hash ^= u64::from(*b);
        *hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    // A separator, so ("ab","c") and ("a","bc") differ.
    *hash ^= 0xff;
    *hash = hash.wrapping_mul(0x0100_0000_01b3);
}

fn complete(dir: &Path) -> bool {
    STEPS.iter().all(|s| dir.join(s.out).is_file())
}

/// Builds the stand-ins (once per content of the C sources, flags and compiler name) into
/// `cache_dir()/fake-cuda/<hash>/`, and says where they are.
pub fn build() -> anyhow::Result<FakeCuda> {
    static LOCK: Mutex<()> = Mutex::new(());
    let _guard = LOCK
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);

    let cc = compiler();
    let src_dir = source_dir();
    let mut hash = 0xcbf2_9ce4_8422_2325_u64;
    fnv1a(&mut hash, cc.as_bytes());
    for step in &STEPS {
        let path = src_dir.join(step.src);
        let text = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        fnv1a(&mut hash, step.out.as_bytes());
        for f in step.flags.iter().chain(step.libs) {
            fnv1a(&mut hash, f.as_bytes());
        }
        fnv1a(&mut hash, &text);
    }
    let root = crate::cache_dir().join("fake-cuda");
    let dir = root.join(format!("{hash:016x}"));
    let done = FakeCuda {
        lib_dir: dir.clone(),
        engine: dir.join("fake_engine"),
    };
    if complete(&dir) {
        return Ok(done);
    }

    // Build beside the final place and rename, so another process never sees half a build.
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let tmp = root.join(format!(".{hash:016x}.tmp-{}-{nanos}", std::process::id()));
    std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let result = compile_all(&cc, &src_dir, &tmp);
    if let Err(e) = result {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    if std::fs::rename(&tmp, &dir).is_err() {
        // Someone else finished first (or a stale partial directory is in the way).
        let _ = std::fs::remove_dir_all(&tmp);
        if !complete(&dir) {
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&tmp)?;
            compile_all(&cc, &src_dir, &tmp)?;
            std::fs::rename(&tmp, &dir)
                .with_context(|| format!("moving {} to {}", tmp.display(), dir.display()))?;
        }
    }
    anyhow::ensure!(
        complete(&dir),
        "fake CUDA build left {} incomplete",
        dir.display()
    );
    Ok(done)
}

fn compile_all(cc: &str, src_dir: &Path, out_dir: &Path) -> anyhow::Result<()> {
    for step in &STEPS {
        let mut cmd = Command::new(cc);
        cmd.args(step.flags)
            .arg("-o")
            .arg(out_dir.join(step.out))
            .arg(src_dir.join(step.src))
            .args(step.libs);
        let out = match cmd.output() {
            Ok(o) => o,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
                "C compiler `{cc}` not found: the fake CUDA libraries (tests/cuda/*.c) need one \
                 (install gcc, e.g. `apt-get install gcc`, or set CC)"
            ),
            Err(e) => return Err(e).with_context(|| format!("running {cmd:?}")),
        };
        if !out.status.success() {
            bail!(
                "{cmd:?} failed ({}):\n{}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    Ok(())
}

/// A running `fake_engine`, killed on drop.
pub struct FakeEngine {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    stderr: Arc<Mutex<Vec<String>>>,
    pub pid: u32,
}

/// How long the engine may take to say `ready`.
const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a scenario may take after `go` (`full` needs about half a second).
const GO_TIMEOUT: Duration = Duration::from_mins(1);
const EXIT_TIMEOUT: Duration = Duration::from_secs(10);

impl FakeEngine {
    /// Starts `fake_engine <scenario> <args>` with the stand-ins on `LD_LIBRARY_PATH` and syncs
    /// that take `sync_us` microseconds, and waits for its `ready` line. CUDA is not loaded yet.
    pub fn start(
        fc: &FakeCuda,
        scenario: &str,
        args: &[&str],
        sync_us: u32,
    ) -> anyhow::Result<Self> {
        let mut child = Command::new(&fc.engine)
            .arg(scenario)
            .args(args)
            .env("LD_LIBRARY_PATH", &fc.lib_dir)
            .env("FAKE_CUDA_SYNC_US", sync_us.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {}", fc.engine.display()))?;
        let pid = child.id();
        let stdout = child.stdout.take().context("engine stdout")?;
        let stderr_pipe = child.stderr.take().context("engine stderr")?;
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stderr = Arc::new(Mutex::new(Vec::new()));
        {
            let stderr = stderr.clone();
            let verbose = std::env::var_os("LLM_PROBE_TEST_VERBOSE").is_some();
            std::thread::spawn(move || {
                for line in BufReader::new(stderr_pipe).lines().map_while(Result::ok) {
                    if verbose {
                        eprintln!("[fake_engine] {line}");
                    }
                    if let Ok(mut l) = stderr.lock() {
                        if l.len() < 1000 {
                            l.push(line);
                        }
                    }
                }
            });
        }
        let mut engine = FakeEngine {
            stdin: child.stdin.take(),
            child,
            lines,
            stderr,
            pid,
        };
        let line = engine.next_line(READY_TIMEOUT, "its `ready` line")?;
        let said = line
            .strip_prefix("ready ")
            .and_then(|p| p.trim().parse::<u32>().ok());
        anyhow::ensure!(
            said == Some(pid),
            "fake_engine (pid {pid}) said {line:?} instead of `ready {pid}`{}",
            engine.stderr_note()
        );
        Ok(engine)
    }

    /// Lets the scenario run (the engine loads the libraries now) and returns its ground truth.
    pub fn go(&mut self) -> anyhow::Result<Value> {
        self.send("go")?;
        let line = self.next_line(GO_TIMEOUT, "the scenario's JSON line")?;
        let v: Value = serde_json::from_str(&line).with_context(|| {
            format!(
                "fake_engine printed {line:?}, not JSON{}",
                self.stderr_note()
            )
        })?;
        if let Some(e) = v.get("error") {
            bail!("fake_engine failed: {e}{}", self.stderr_note());
        }
        Ok(v)
    }

    /// Tells the engine to exit and waits for it (killing it if it does not).
    pub fn finish(mut self) -> anyhow::Result<()> {
        // It may have exited already (a closed pipe is then fine).
        let _ = self.send("exit");
        self.stdin = None;
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait()? {
                anyhow::ensure!(
                    status.success(),
                    "fake_engine exited with {status}{}",
                    self.stderr_note()
                );
                return Ok(());
            }
            if start.elapsed() > EXIT_TIMEOUT {
                let _ = self.child.kill();
                let _ = self.child.wait();
                bail!(
                    "fake_engine did not exit within {EXIT_TIMEOUT:?} of `exit`; killed{}",
                    self.stderr_note()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// What the engine wrote to stderr so far.
    pub fn stderr_text(&self) -> String {
        self.stderr.lock().map(|l| l.join("\n")).unwrap_or_default()
    }

    fn stderr_note(&self) -> String {
        let text = self.stderr_text();
        if text.is_empty() {
            String::new()
        } else {
            format!("\nfake_engine stderr:\n{text}")
        }
    }

    fn send(&mut self, line: &str) -> anyhow::Result<()> {
        let stdin = self.stdin.as_mut().context("engine stdin already closed")?;
        writeln!(stdin, "{line}")
            .and_then(|()| stdin.flush())
            .with_context(|| format!("writing {line:?} to fake_engine"))
    }

    fn next_line(&mut self, timeout: Duration, what: &str) -> anyhow::Result<String> {
        match self.lines.recv_timeout(timeout) {
            Ok(line) => Ok(line),
            Err(RecvTimeoutError::Timeout) => bail!(
                "fake_engine (pid {}) gave no {what} within {timeout:?}{}",
                self.pid,
                self.stderr_note()
            ),
            Err(RecvTimeoutError::Disconnected) => {
                // Give the stderr reader a moment to catch the last words.
                std::thread::sleep(Duration::from_millis(50));
                let status = self
                    .child
                    .try_wait()
                    .ok()
                    .flatten()
                    .map_or_else(|| "closed its stdout".to_owned(), |s| s.to_string());
                bail!(
                    "fake_engine (pid {}) ended before {what}: {status}{}",
                    self.pid,
                    self.stderr_note()
                )
            }
        }
    }
}

impl Drop for FakeEngine {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}
