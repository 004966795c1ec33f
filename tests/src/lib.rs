//! Test harness: where the built pieces are, real servers started on loopback, the probe started
//! against them, and small HTTP helpers to read `/metrics`, `/health` and `/api/v1/requests`.
//!
//! Everything runs on 127.0.0.1 and is bounded in count and time.

pub mod client;
pub mod fake_cuda;
pub mod h2_client;
pub mod image;
pub mod prom;
pub mod tls_client;
pub mod traffic;
pub mod vllm;

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use serde_json::Value;

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// Where `cargo xtask setup` keeps the Python venv and the tiny model.
pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("LLM_PROBE_CACHE") {
        return PathBuf::from(d);
    }
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("/root"), PathBuf::from);
    home.join(".cache/llm-probe")
}

pub fn probe_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("LLM_PROBE_BIN") {
        return PathBuf::from(p);
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| workspace_root().join("target"), PathBuf::from);
    target.join("release/llm-probe")
}

pub fn python() -> PathBuf {
    cache_dir().join("venv/bin/python")
}

/// Must match xtask's `TINY_MODEL` (the file `cargo xtask setup` writes).
pub const TINY_MODEL: &str = "tiny-v2.gguf";

pub fn tiny_model() -> PathBuf {
    cache_dir().join(TINY_MODEL)
}

/// Root is needed to load eBPF programs. CI runs as root; elsewhere these tests say why they
/// did nothing — but under CI a missing privilege is a failure, not a skip.
pub fn require_root(test: &str) -> bool {
    // SAFETY: plain getter.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "{test}: needs root, and CI must run as root"
    );
    eprintln!("SKIP {test}: needs root to load eBPF programs (run `sudo cargo xtask test`)");
    false
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// Minimal HTTP/1.1 GET on loopback: (status, body).
pub fn http_get(addr: &str, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw).to_string();
    let status = text.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    // Bodies from hyper may be chunked; de-chunk if so.
    if text
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        let mut out = String::new();
        let mut rest = body.as_str();
        while let Some((size, after)) = rest.split_once("\r\n") {
            let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
            if n == 0 || after.len() < n {
                break;
            }
            out.push_str(&after[..n]);
            rest = after[n..].trim_start_matches("\r\n");
        }
        return Ok((status, out));
    }
    Ok((status, body))
}

/// Runs `cmd` (`what`, for the messages) to completion; panics with its stderr unless it succeeded.
pub fn output_ok(what: &str, cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {what} ({cmd:?}): {e}"));
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

pub fn wait_for(what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("timed out after {timeout:?} waiting for {what}");
}

/// A child process killed on drop, with its output collected for failure messages.
pub struct Proc {
    pub child: Child,
    pub name: String,
    pub log: Arc<Mutex<Vec<String>>>,
}

impl Proc {
    pub fn spawn(name: &str, cmd: &mut Command) -> Proc {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {name} ({cmd:?}): {e}"));
        let log = Arc::new(Mutex::new(Vec::new()));
        for pipe in [
            child
                .stdout
                .take()
                .map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
            child
                .stderr
                .take()
                .map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
        ]
        .into_iter()
        .flatten()
        {
            let log = log.clone();
            let verbose = std::env::var_os("LLM_PROBE_TEST_VERBOSE").is_some();
            let tag = name.to_owned();
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    if verbose {
                        eprintln!("[{tag}] {line}");
                    }
                    if let Ok(mut l) = log.lock() {
                        if l.len() > 5000 {
                            l.remove(0);
                        }
                        l.push(line);
                    }
                }
            });
        }
        Proc {
            child,
            name: name.to_owned(),
            log,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log_text(&self) -> String {
        self.log.lock().map(|l| l.join("\n")).unwrap_or_default()
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: plain syscall on our own child.
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }

    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.alive() {
            self.signal(libc::SIGTERM);
            let start = Instant::now();
            while self.alive() && start.elapsed() < Duration::from_secs(3) {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// A real engine: llama-cpp-python's OpenAI-compatible server with the tiny GGUF.
/// The engine's command line, shared by the tests, `cargo xtask demo` and `cargo xtask bench`:
/// llama-cpp-python's `OpenAI` server on loopback with the tiny model, one thread, and concurrent
/// requests queued (by default a new request interrupts the one streaming: `interrupt_requests`).
pub fn llama_command(port: u16) -> Command {
    let mut c = Command::new(python());
    c.args(["-m", "llama_cpp.server", "--model"])
        .arg(tiny_model())
        .args([
            "--host",
            "127.0.0.1",
            "--port",
            &port.to_string(),
            "--n_ctx",
            "2048",
            "--n_threads",
            "1",
            "--verbose",
            "false",
            "--interrupt_requests",
            "false",
        ]);
    c
}

pub fn start_llama(port: u16) -> Proc {
    let (py, model) = (python(), tiny_model());
    assert!(
        py.exists() && model.exists(),
        "{} or {} missing: run `cargo xtask setup` first",
        py.display(),
        model.display()
    );
    let p = Proc::spawn("llama-cpp-python", &mut llama_command(port));
    let addr = format!("127.0.0.1:{port}");
    wait_for(
        "llama-cpp-python to serve /v1/models",
        Duration::from_mins(1),
        || http_get(&addr, "/v1/models").is_ok_and(|(s, _)| s == 200),
    );
    p
}

/// The Node.js mock engine: `node mock_llm.js PORT`.
pub fn mock_llm_js() -> PathBuf {
    workspace_root().join("tests/fixtures/servers/mock_llm.js")
}

/// The gRPC server-streaming fixture (Python grpcio, in the venv `cargo xtask setup` makes).
pub fn grpc_llm_py() -> PathBuf {
    workspace_root().join("tests/fixtures/servers/grpc_llm.py")
}

/// The second stack: a Node.js `http` server with controlled delays ([`mock_llm_js`]).
pub fn start_node(port: u16) -> Proc {
    start_node_with(port, &[])
}

/// [`start_node`] with more arguments for the server (`--worker`: a worker process behind it).
pub fn start_node_with(port: u16, args: &[&str]) -> Proc {
    let p = Proc::spawn(
        "node",
        Command::new("node")
            .arg(mock_llm_js())
            .arg(port.to_string())
            .args(args),
    );
    let addr = format!("127.0.0.1:{port}");
    wait_for("node mock server", Duration::from_secs(20), || {
        http_get(&addr, "/health").is_ok_and(|(s, _)| s == 200)
    });
    p
}

/// The Node mock server on a free port with `llm-probe run --port` attached to it. Dropped probe
/// first, then the server.
pub struct NodeUnderProbe {
    pub probe: Probe,
    pub node: Proc,
    pub port: u16,
    /// `127.0.0.1:<port>`.
    pub addr: String,
}

/// [`start_node`] on a free port and a [`Probe`] on that port; `None` (after saying why) when
/// `test` cannot load eBPF programs ([`require_root`]).
pub fn node_under_probe(test: &str) -> Option<NodeUnderProbe> {
    node_under_probe_with(test, &[])
}

/// [`node_under_probe`] with `extra` arguments for the probe.
pub fn node_under_probe_with(test: &str, extra: &[&str]) -> Option<NodeUnderProbe> {
    node_with_args_under_probe(test, &[], extra)
}

/// [`node_under_probe`] with arguments for the server ([`start_node_with`]) and the probe.
pub fn node_with_args_under_probe(
    test: &str,
    node_args: &[&str],
    extra: &[&str],
) -> Option<NodeUnderProbe> {
    if !require_root(test) {
        return None;
    }
    let port = free_port();
    let node = start_node_with(port, node_args);
    let mut args = vec!["--port".to_owned(), port.to_string()];
    args.extend(extra.iter().map(|a| (*a).to_owned()));
    let probe = Probe::start(&args);
    Some(NodeUnderProbe {
        probe,
        node,
        port,
        addr: format!("127.0.0.1:{port}"),
    })
}

/// Environment variable naming the `--capture` path every probe the tests start uses (unset: the
/// agent's default, `auto`).
pub const CAPTURE_ENV: &str = "LLM_PROBE_TEST_CAPTURE";
/// Environment variable naming the `--thread-states` value every probe the tests start uses
/// (unset: the agent's default, `on`).
pub const THREAD_STATES_ENV: &str = "LLM_PROBE_TEST_THREAD_STATES";

/// `llm-probe run` against `target_args`, serving on a free port.
pub struct Probe {
    pub proc: Proc,
    pub addr: String,
}

impl Probe {
    /// The probe's count of thread-state entries found in a state their thread could not be in
    /// (`llm_probe_thread_state_repairs_total`): a switch-in or wake-up was not seen.
    pub fn thread_repairs(&self) -> u64 {
        let (_, text) = http_get(&self.addr, "/metrics").expect("the probe's /metrics");
        metric_sum(&text, "llm_probe_thread_state_repairs_total", &[]) as u64
    }

    pub fn start(target_args: &[String]) -> Probe {
        Self::start_on(target_args, &format!("127.0.0.1:{}", free_port()))
    }

    /// [`Probe::start`] with `--listen listen`; the harness talks to it on 127.0.0.1 at the same
    /// port (so `listen` is a loopback or wildcard address).
    pub fn start_on(target_args: &[String], listen: &str) -> Probe {
        let bin = probe_bin();
        assert!(
            bin.exists(),
            "{} missing: run `cargo xtask build`",
            bin.display()
        );
        let port = listen.rsplit(':').next().unwrap_or_default();
        let addr = format!("127.0.0.1:{port}");
        // `cargo xtask test` runs the accuracy tests once more on the fallback capture path.
        let mut capture: Vec<String> = match std::env::var(CAPTURE_ENV) {
            Ok(path) if !target_args.iter().any(|a| a == "--capture") => {
                vec!["--capture".into(), path]
            }
            _ => Vec::new(),
        };
        if let Ok(v) = std::env::var(THREAD_STATES_ENV) {
            if !target_args.iter().any(|a| a == "--thread-states") {
                capture.extend(["--thread-states".into(), v]);
            }
        }
        let proc = Proc::spawn(
            "llm-probe",
            Command::new(bin)
                .arg("run")
                .args(target_args)
                .args(&capture)
                .args(["--listen", listen])
                .env(
                    "RUST_LOG",
                    std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
                ),
        );
        let mut probe = Probe { proc, addr };
        let a = probe.addr.clone();
        let start = Instant::now();
        loop {
            if http_get(&a, "/health").is_ok() {
                break;
            }
            assert!(
                probe.proc.alive(),
                "llm-probe exited early:\n{}",
                probe.proc.log_text()
            );
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "llm-probe did not come up:\n{}",
                probe.proc.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        probe
    }

    pub fn metrics(&self) -> String {
        http_get(&self.addr, "/metrics")
            .map(|(_, b)| b)
            .unwrap_or_default()
    }

    pub fn health(&self) -> (u16, Value) {
        let (s, b) = http_get(&self.addr, "/health").expect("GET /health");
        (s, serde_json::from_str(&b).unwrap_or(Value::Null))
    }

    /// Finished requests the probe recorded: (`finished_total`, list).
    pub fn requests(&self) -> (u64, Vec<Value>) {
        let (_, b) = http_get(&self.addr, "/api/v1/requests").expect("GET /api/v1/requests");
        let v: Value = serde_json::from_str(&b).unwrap_or(Value::Null);
        (
            v["finished_total"].as_u64().unwrap_or(0),
            v["requests"].as_array().cloned().unwrap_or_default(),
        )
    }

    /// Wait until the probe has recorded at least `n` finished requests (its drain runs every 10 ms).
    pub fn wait_requests(&self, n: usize, timeout: Duration) -> Vec<Value> {
        let start = Instant::now();
        loop {
            let (_, list) = self.requests();
            if list.len() >= n || start.elapsed() > timeout {
                return list;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Sum of the samples of `name` whose labels contain every `k="v"` in `labels`.
pub fn metric_sum(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (n, lbl) = series.split_once('{').unwrap_or((series, ""));
            if n != name {
                return None;
            }
            let ok = labels
                .iter()
                .all(|(k, v)| lbl.contains(&format!("{k}=\"{v}\"")));
            ok.then(|| value.parse::<f64>().ok()).flatten()
        })
        .sum()
}

/// (on-CPU ns, run-queue wait ns) of thread `tid` of `pid`, as the kernel accounts them
/// (`/proc/PID/task/TID/schedstat`).
pub fn schedstat(pid: u32, tid: u32) -> (u64, u64) {
    let s = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/schedstat"))
        .unwrap_or_else(|e| panic!("schedstat of {pid}/{tid}: {e}"));
    let v: Vec<u64> = s
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    (v[0], v[1])
}

/// Every thread of process `pid` on `cpus` (`taskset -a -p -c`).
pub fn pin(pid: u32, cpus: &str) {
    let ok = Command::new("taskset")
        .args(["-a", "-p", "-c", cpus, &pid.to_string()])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(ok, "taskset -a -p -c {cpus} {pid}");
}

/// A busy loop pinned to CPU `cpu`, killed on drop: a noisy neighbour.
pub fn cpu_hog(cpu: u32) -> Proc {
    cpu_hog_niced(cpu, 0)
}

/// [`cpu_hog`] at nice `nice` (negative: a heavier neighbour, whose longer share of the CPU a
/// woken thread must wait behind; needs root).
pub fn cpu_hog_niced(cpu: u32, nice: i32) -> Proc {
    Proc::spawn(
        "hog",
        Command::new("nice").args([
            "-n",
            &nice.to_string(),
            "taskset",
            "-c",
            &cpu.to_string(),
            "sh",
            "-c",
            "while :; do :; done",
        ]),
    )
}

/// Host steal time of this VM (`/proc/stat` cpu line, 8th value), in clock ticks: how much the
/// hypervisor took from the timing tests' reference client.
pub fn steal_ticks() -> u64 {
    std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|s| s.lines().next().map(str::to_owned))
        .and_then(|l| l.split_whitespace().nth(8).and_then(|v| v.parse().ok()))
        .unwrap_or(0)
}

/// Peak resident memory of `pid` (`VmHWM`), in bytes.
pub fn vm_hwm(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .expect("VmHWM")
        * 1024
}

/// Raise this process's open-file limit to `n` (as root; children inherit it).
pub fn raise_nofile(n: u64) {
    let lim = libc::rlimit {
        rlim_cur: n,
        rlim_max: n,
    };
    // SAFETY: valid pointer to a local; raising our own limit as root (children inherit it).
    unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raw const lim) };
}
