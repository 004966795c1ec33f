//! Runs `llm-cuda-workload` with small arguments on the real GPU and checks its JSON line against
//! what was asked for. Without a GPU the workload exits 2 (`no CUDA driver: <reason>`) and the
//! tests print `skipped: …` — but only after checking that the reason is true: if this process can
//! load `libcuda.so.1` itself, the only acceptable reasons are "no device" and "stub library".

use std::process::{Command, Stdio};

use serde_json::Value;

const B: u64 = 2; // --prefill-bursts
const K: u64 = 10; // --prefill-launches
const M: u64 = 3; // --graph-kernels
const N: u64 = 5; // --steps
const ALLOCS: u64 = 4;
const LEAK_MIB: u64 = 8;

fn args() -> Vec<String> {
    [
        ("--prefill-bursts", B),
        ("--prefill-launches", K),
        ("--graph-kernels", M),
        ("--steps", N),
        ("--allocs", ALLOCS),
        ("--leak-mib", LEAK_MIB),
        ("--spin-cycles", 2000),
    ]
    .iter()
    .flat_map(|(k, v)| [(*k).to_owned(), v.to_string()])
    .collect()
}

/// Runs the workload; `None` (after printing `skipped: …`) when there is honestly no driver.
fn run(extra: &[&str]) -> Option<(Value, u32)> {
    let child = Command::new(env!("CARGO_BIN_EXE_llm-cuda-workload"))
        .args(args())
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn llm-cuda-workload");
    let pid = child.id();
    let out = child
        .wait_with_output()
        .expect("wait for llm-cuda-workload");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if out.status.code() == Some(2) {
        let reason = stderr
            .lines()
            .find_map(|l| l.strip_prefix("no CUDA driver: "))
            .unwrap_or_else(|| {
                panic!("exit 2 without a `no CUDA driver:` line; stderr:\n{stderr}")
            });
        // SAFETY: loading the driver library runs its initialisers only.
        let loads_here = unsafe { libloading::Library::new("libcuda.so.1") }.is_ok();
        if loads_here {
            assert!(
                [
                    "CUDA_ERROR_NO_DEVICE",
                    "CUDA_ERROR_STUB_LIBRARY",
                    "returned 0 devices"
                ]
                .iter()
                .any(|r| reason.contains(r)),
                "libcuda.so.1 loads in the test, yet the workload skipped with: {reason}"
            );
        } else {
            assert!(
                reason.starts_with("cannot load libcuda.so.1"),
                "unexpected no-driver reason: {reason}"
            );
        }
        println!("skipped: no CUDA driver ({reason})");
        return None;
    }
    assert!(
        out.status.success(),
        "workload failed ({}); stderr:\n{stderr}",
        out.status
    );
    assert!(!stderr.contains("panicked"), "stderr:\n{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        lines.len(),
        1,
        "expected one JSON line on stdout, got:\n{stdout}"
    );
    eprintln!("{stderr}");
    println!("{}", lines[0]);
    Some((serde_json::from_str(lines[0]).expect("stdout is JSON"), pid))
}

fn calls(v: &Value, key: &str, api: &str) -> u64 {
    v[key][api].as_u64().unwrap_or(0)
}

fn check(v: &Value, pid: u32) {
    let c = |api| calls(v, "calls", api);
    let h = |api| calls(v, "calls_at_hold", api);
    assert!(!v["device"].as_str().unwrap().is_empty());
    assert_eq!(v["pid"], u64::from(pid));

    // Launches, graphs, syncs, events.
    assert_eq!(c("cuInit"), 1);
    assert_eq!(c("cuLaunchKernel"), B * K + M);
    assert_eq!(v["kernel_launches"], B * K);
    assert_eq!(v["captured_launches"], M);
    assert_eq!(v["graph_launches"], N);
    assert_eq!(c("cuGraphLaunch"), N);
    assert_eq!(v["graph_kernel_executions"], N * M);
    assert_eq!(
        (
            c("cuStreamBeginCapture_v2"),
            c("cuStreamEndCapture"),
            c("cuGraphInstantiateWithFlags")
        ),
        (1, 1, 1)
    );
    assert_eq!(v["syncs"], B + N + 1);
    assert_eq!(c("cuStreamSynchronize"), B + N + 1);
    assert_eq!(c("cuEventRecord"), 2 * (B + N));
    assert_eq!(c("cuEventElapsedTime"), B + N);

    let waits = &v["sync_wait_ns"];
    assert!(waits["sum"].as_u64().unwrap() > 0, "{waits}");
    assert!(waits["max"].as_u64().unwrap() >= waits["p50"].as_u64().unwrap());
    assert_eq!(
        v["prefill_sync_wait_ns"].as_array().unwrap().len() as u64,
        B
    );
    let prefill = v["prefill_gpu_ms"].as_array().unwrap();
    assert_eq!(prefill.len() as u64, B);
    assert!(
        prefill.iter().all(|ms| ms.as_f64().unwrap() > 0.0),
        "{prefill:?}"
    );
    assert!(v["decode_gpu_ms"]["p50"].as_f64().unwrap() > 0.0);

    // Memory.
    assert_eq!(
        c("cuMemAlloc_v2"),
        ALLOCS + 8,
        "plain allocations + 8 leak calls"
    );
    assert_eq!(c("cuMemFree_v2"), ALLOCS);
    assert_eq!((c("cuMemAllocAsync"), c("cuMemFreeAsync")), (20, 20));
    assert_eq!(v["leak_bytes"], LEAK_MIB << 20);
    assert_eq!(v["leak_calls"], 8);
    assert_eq!(v["leak_function"], "llm_cuda_leak_on_purpose");

    let vmm = &v["vmm"];
    let g = vmm["granularity"].as_u64().unwrap();
    assert!(g > 0);
    assert_eq!(vmm["reserved"], 64 * g);
    assert_eq!(vmm["mapped"], 3 * g);
    assert_eq!(vmm["holes"], 1);
    assert_eq!(vmm["largest_free_extent"], 58 * g);
    assert_eq!(v["live_bytes_at_hold"], (LEAK_MIB << 20) + 3 * g);
    assert_eq!(
        (c("cuMemCreate"), c("cuMemMap"), c("cuMemSetAccess")),
        (4, 4, 4)
    );
    assert_eq!(
        (h("cuMemUnmap"), h("cuMemRelease"), h("cuMemAddressFree")),
        (1, 1, 0)
    );
    assert_eq!(
        (c("cuMemUnmap"), c("cuMemRelease"), c("cuMemAddressFree")),
        (4, 4, 1)
    );

    assert_eq!(v["nvrtc"].as_bool().unwrap(), v["kernel_source"] == "nvrtc");
    assert_eq!(v["nvrtc"].as_bool().unwrap(), v["nvrtc_error"].is_null());
}

#[test]
fn workload_matches_the_request() {
    let Some((v, pid)) = run(&[]) else { return };
    check(&v, pid);
    if v["nvrtc"] == true {
        assert_eq!(calls(&v, "calls", "nvrtcCompileProgram"), 1);
    }
}

#[test]
fn embedded_ptx_fallback_works() {
    let Some((v, pid)) = run(&["--no-nvrtc"]) else {
        return;
    };
    check(&v, pid);
    assert_eq!(v["kernel_source"], "embedded-ptx");
    assert_eq!(calls(&v, "calls", "nvrtcCompileProgram"), 0);
    assert_eq!(calls(&v, "calls", "cuModuleLoadData"), 1);
}
