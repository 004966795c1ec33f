//! CUDA uprobes end to end, without a GPU: the stand-in `libcuda.so.1` / `libcudart.so.12` built
//! from tests/fixtures/cuda/*.c export the real names and signatures; `fake_engine` dlopens them
//! only after the probe attached (found through its `LD_LIBRARY_PATH`, which the probe must
//! predict), replays prefill bursts, graph decode steps, syncs, a freed pool, a leak from
//! `leak_kv_scratch`, bad frees, VMM reserve/create/map/unmap and allocations from 4 threads, and
//! prints what it did. Every count the probe exports must equal it exactly. Needs root (CI runs as
//! root).

use std::{
    io::{Read as _, Write as _},
    time::Duration,
};

use probe_common::cuda::api::{self, NAMES};
use serde_json::Value;
use tests::{
    fake_cuda::{self, FakeEngine},
    metric_sum, output_ok, probe_bin, require_root, wait_for, Probe,
};

fn calls(truth: &Value, api: &str) -> f64 {
    truth["calls"][api].as_f64().unwrap_or(0.0)
}

/// The names of the APIs whose id passes `keep`, in id order.
fn names(keep: impl Fn(u32) -> bool) -> impl Iterator<Item = &'static str> {
    (0..api::COUNT)
        .filter(move |&id| keep(id))
        .map(|id| NAMES[id as usize])
}

#[test]
fn cuda_calls_ledger_and_memleak_match_the_engine() {
    if !require_root("cuda_calls_ledger_and_memleak_match_the_engine") {
        return;
    }
    let fc = fake_cuda::build().expect("building the stand-in CUDA libraries");
    // A 2.5 s pause between dlopen and the first call: the probe's maps rescan (every 2 s) tells
    // the kernel where libcudart's code is, so runtime→driver launches are matched by return
    // address (the timing fallback used before that is not asserted by any test: a preempted
    // runtime→driver call can defeat it).
    let mut engine = FakeEngine::start(&fc, "full", &["2500"], 2000).expect("fake engine");
    let pid = engine.pid.to_string();
    let probe = Probe::start(&[
        "--pid".into(),
        pid.clone(),
        "--kv-pool-min-age".into(),
        "0s".into(),
        "--leak-age".into(),
        "0s".into(),
    ]);
    // Both libraries are predicted from the engine's LD_LIBRARY_PATH before it loads them.
    fake_cuda::wait_attached(&probe);
    let log = probe.proc.log_text();
    assert!(
        log.contains("LdLibraryPath"),
        "prediction not logged:\n{log}"
    );

    let truth = engine.go().expect("scenario");
    eprintln!("engine truth: {truth}");
    // Launch counters are folded every second and at scrape; ring records within 10 ms.
    std::thread::sleep(Duration::from_millis(1500));
    let m = probe.metrics();
    let by_api = |name: &str, api: &str| metric_sum(&m, name, &[("api", api)]);
    let mut mismatches = Vec::new();
    let mut check = |what: String, got: f64, want: f64| {
        if (got - want).abs() > 1e-9 {
            mismatches.push(format!("{what}: probe {got}, engine {want}"));
        }
    };

    for api in names(|id| api::is_launch(id) && !api::is_graph_launch(id)) {
        let got = by_api("llm_cuda_kernel_launches_total", api);
        check(format!("launches {api}"), got, calls(&truth, api));
    }
    for api in names(api::is_graph_launch) {
        let got = by_api("llm_cuda_graph_launches_total", api);
        check(format!("graph launches {api}"), got, calls(&truth, api));
    }
    check(
        "all kernel launches".into(),
        metric_sum(&m, "llm_cuda_kernel_launches_total", &[]),
        truth["kernel_launches"].as_f64().unwrap(),
    );
    // Each runtime launch reached the exported driver launch once: counted once, nested once.
    let runtime_launches: f64 = names(|id| api::is_launch(id) && api::is_runtime(id))
        .map(|api| calls(&truth, api))
        .sum();
    check(
        "nested launches".into(),
        by_api("llm_probe_cuda_nested_calls_total", "launch"),
        runtime_launches,
    );
    for api in names(api::is_sync) {
        let got = by_api("llm_cuda_sync_wait_seconds_count", api);
        check(format!("syncs {api}"), got, calls(&truth, api));
    }
    // Every sync slept sync_us: the probe's mean wait is at least that, and not far above.
    let (n, sum) = (
        metric_sum(&m, "llm_cuda_sync_wait_seconds_count", &[]),
        metric_sum(&m, "llm_cuda_sync_wait_seconds_sum", &[]),
    );
    let want_s = truth["sync_us"].as_f64().unwrap() / 1e6;
    assert!(
        sum / n >= want_s && sum / n < want_s * 2.0,
        "mean sync wait {} s for {want_s} s sleeps",
        sum / n
    );

    // Allocations: the calls that write a device pointer or a physical handle (a reservation is
    // address space, not memory).
    for api in names(|id| api::writes_out_ptr(id) && id != api::CU_MEM_ADDRESS_RESERVE) {
        check(
            format!("allocs {api}"),
            by_api("llm_cuda_alloc_total", api),
            calls(&truth, api),
        );
    }
    // The two bad cuMemFree_v2 calls (double, unknown) free nothing.
    for (id, bad) in [
        (api::CU_MEM_FREE, 2.0),
        (api::CU_MEM_FREE_ASYNC, 0.0),
        (api::CU_MEM_FREE_ASYNC_PTSZ, 0.0),
        (api::CUDA_FREE, 0.0),
        (api::CUDA_FREE_ASYNC, 0.0),
        (api::CU_MEM_RELEASE, 0.0),
    ] {
        let api = NAMES[id as usize];
        check(
            format!("frees {api}"),
            by_api("llm_cuda_free_total", api),
            calls(&truth, api) - bad,
        );
    }
    for reason in ["double", "unknown"] {
        check(
            format!("{reason} frees"),
            metric_sum(&m, "llm_probe_cuda_bad_frees_total", &[("reason", reason)]),
            truth[format!("{reason}_frees")].as_f64().unwrap(),
        );
    }
    let pid_l = [("pid", pid.as_str())];
    check(
        "live bytes".into(),
        metric_sum(&m, "llm_gpu_memory_live_bytes", &pid_l),
        truth["live_bytes"].as_f64().unwrap(),
    );
    check(
        "fragmentation".into(),
        (metric_sum(&m, "llm_gpu_memory_fragmentation_ratio", &pid_l) * 1e6).round(),
        (truth["vmm"]["fragmentation_ratio"].as_f64().unwrap() * 1e6).round(),
    );
    check(
        "KV pool (largest reservation's mapped bytes)".into(),
        metric_sum(&m, "llm_kv_cache_pool_bytes", &pid_l),
        truth["vmm"]["mapped"].as_f64().unwrap(),
    );
    assert!(
        mismatches.is_empty(),
        "probe and engine disagree:\n  {}\nmetrics:\n{}",
        mismatches.join("\n  "),
        m.lines()
            .filter(|l| l.starts_with("llm_cuda") || l.starts_with("llm_probe_cuda"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    // Steps: every sync that follows launches closes one; nothing was served, so all are decode.
    let steps = metric_sum(&m, "llm_engine_step_seconds_count", &[("phase", "decode")]);
    assert!(steps >= 28.0, "engine steps seen: {steps}");
    assert_eq!(
        metric_sum(&m, "llm_engine_step_seconds_count", &[("phase", "prefill")]),
        0.0
    );

    // memleak: the leak is found by its function's name, with its exact bytes and count.
    let out = output_ok(
        "llm-probe memleak",
        std::process::Command::new(probe_bin())
            .args(["memleak", "--pid", &pid, "--url"])
            .arg(format!("http://{}", probe.addr))
            .args(["--older-than", "0s", "--json"]),
    );
    let report: Value = serde_json::from_slice(&out.stdout).expect("memleak --json");
    let leak_fn = truth["leak_function"].as_str().unwrap();
    let site = report["sites"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| {
            s["frames"]
                .as_array()
                .unwrap()
                .iter()
                .any(|f| f.as_str().unwrap_or("").contains(leak_fn))
        })
        .unwrap_or_else(|| panic!("no call site names {leak_fn}: {report:#}"));
    assert_eq!(
        site["bytes"].as_f64(),
        truth["leak_bytes"].as_f64(),
        "{site:#}"
    );
    assert_eq!(
        site["count"].as_f64(),
        truth["leak_calls"].as_f64(),
        "{site:#}"
    );
    let frag = &report["fragmentation"];
    let r = frag["reservations"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["reserved_bytes"] == truth["vmm"]["reserved"])
        .unwrap_or_else(|| panic!("no 64 MiB reservation: {frag:#}"));
    assert_eq!(r["mapped_bytes"], truth["vmm"]["mapped"], "{r:#}");
    assert_eq!(r["holes"], truth["vmm"]["holes"], "{r:#}");
    assert_eq!(
        r["largest_free_extent"], truth["vmm"]["largest_free_extent"],
        "{r:#}"
    );
    let text = std::process::Command::new(probe_bin())
        .args(["memleak", "--pid", &pid, "--url"])
        .arg(format!("http://{}", probe.addr))
        .args(["--older-than", "0s"])
        .output()
        .expect("llm-probe memleak");
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains(leak_fn),
        "human report lacks {leak_fn}:\n{text}"
    );
    eprintln!("{text}");

    // The process exits: its pid series go away.
    engine.finish().expect("engine exit");
    wait_for("pid series removed", Duration::from_secs(5), || {
        !probe.metrics().contains(&format!("pid=\"{pid}\""))
    });
}

/// Steps and requests meet: `fake_engine serve` answers every POST with one eager prefill step
/// (50 launches + a sync) before the first token and 5 decode steps (graph launch + sync), each
/// followed by a token. The probe sees the request on the socket, holds the steps that end while it
/// waits for its first token, and must call exactly one step per request `prefill`.
#[test]
fn the_step_before_each_first_token_is_prefill() {
    if !require_root("the_step_before_each_first_token_is_prefill") {
        return;
    }
    let fc = fake_cuda::build().expect("building the stand-in CUDA libraries");
    let port = tests::free_port();
    let mut engine =
        FakeEngine::start(&fc, "serve", &[&port.to_string()], 2000).expect("fake engine");
    let probe = Probe::start(&["--pid".into(), engine.pid.to_string()]);
    fake_cuda::wait_attached(&probe);
    let info = engine.go().expect("serve");
    let decode_per_request = info["decode_steps_per_request"].as_f64().unwrap();
    let requests = 3;
    for _ in 0..requests {
        post_stream(port);
    }
    wait_for("requests recorded", Duration::from_secs(5), || {
        metric_sum(&probe.metrics(), "llm_requests_total", &[]) >= f64::from(requests)
    });
    let m = probe.metrics();
    let steps = |phase| metric_sum(&m, "llm_engine_step_seconds_count", &[("phase", phase)]);
    assert_eq!(steps("prefill"), f64::from(requests), "{m}");
    assert_eq!(
        steps("decode"),
        f64::from(requests) * decode_per_request,
        "{m}"
    );
    assert_eq!(
        metric_sum(&m, "llm_ttft_seconds_count", &[]),
        f64::from(requests)
    );
    engine.finish().expect("engine exit");
}

/// One streamed chat request to `fake_engine serve`, read to its end.
fn post_stream(port: u16) {
    let body = r#"{"model":"fake","stream":true}"#;
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    write!(
        s,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).expect("response");
    assert!(out.contains("[DONE]"), "{out}");
}

/// Ground truth for the engine stage's GPU wait: `fake_engine serve` with each synchronize call
/// sleeping `SYNC_MS` (the stand-in's `clock_nanosleep` to an absolute deadline: never shorter).
/// Between a request's read and its first token the engine makes exactly one synchronize call (the
/// prefill step's); the decode steps' syncs come after the first token, one in each gap. Each
/// request's `gpu_ns` must show that one call and its length within max(1 ms, 5 %) above
/// `SYNC_MS`, inside the engine stage; its `decode_ns.gpu_sync` the 5 decode calls likewise.
#[test]
fn the_engine_stage_shows_its_wait_on_the_gpu() {
    if !require_root("the_engine_stage_shows_its_wait_on_the_gpu") {
        return;
    }
    const SYNC_MS: f64 = 40.0;
    let fc = fake_cuda::build().expect("building the stand-in CUDA libraries");
    let port = tests::free_port();
    let mut engine = FakeEngine::start(&fc, "serve", &[&port.to_string()], 40_000).expect("engine");
    let probe = Probe::start(&["--pid".into(), engine.pid.to_string()]);
    fake_cuda::wait_attached(&probe);
    engine.go().expect("serve");
    // `llm-probe trace` records the requests and their steps meanwhile.
    let out = std::env::temp_dir().join(format!("llm-probe-gpu-trace-{}.json", std::process::id()));
    let (url, path) = (format!("http://{}", probe.addr), out.clone());
    let recorder = std::thread::spawn(move || {
        std::process::Command::new(probe_bin())
            .args(["trace", "--url", &url, "--duration", "4s", "-o"])
            .arg(&path)
            .output()
            .expect("llm-probe trace")
    });
    std::thread::sleep(Duration::from_millis(1200));
    let requests = 4;
    for _ in 0..requests {
        post_stream(port);
    }
    wait_for("requests recorded", Duration::from_secs(5), || {
        metric_sum(&probe.metrics(), "llm_requests_total", &[]) >= f64::from(requests)
    });
    let done = recorder.join().expect("recorder");
    assert!(
        done.status.success(),
        "llm-probe trace: {}",
        String::from_utf8_lossy(&done.stderr)
    );
    let trace: Value = serde_json::from_slice(&std::fs::read(&out).expect("trace file")).unwrap();
    let _ = std::fs::remove_file(&out);
    let step_slices = |name: &str| {
        trace["traceEvents"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|e| e["cat"] == "gpu" && e["name"] == name)
            .map(|e| e["dur"].as_f64().unwrap_or(0.0) / 1e3)
            .collect::<Vec<f64>>()
    };
    let (prefill, decode) = (step_slices("prefill step"), step_slices("decode step"));
    eprintln!(
        "trace: prefill steps {prefill:?} ms, {} decode steps",
        decode.len()
    );
    assert_eq!(
        (prefill.len(), decode.len()),
        (4, 20),
        "one prefill and 5 decode steps each"
    );
    assert!(
        prefill.iter().chain(&decode).all(|&d| d >= SYNC_MS),
        "every step holds its {SYNC_MS} ms sync: {prefill:?} {decode:?}"
    );
    let (code, page) = tests::http_get(&probe.addr, "/api/v1/requests").expect("GET");
    assert_eq!(code, 200, "{page}");
    let page: Value = serde_json::from_str(&page).expect("JSON");
    let list = page["requests"].as_array().expect("requests");
    assert_eq!(list.len(), requests as usize, "{page}");
    let ms = |v: &Value| v.as_f64().unwrap_or(f64::NAN) / 1e6;
    for r in list {
        let (wait, engine_ms) = (ms(&r["gpu_ns"]["sync_wait"]), ms(&r["stages_ns"]["engine"]));
        eprintln!(
            "ttft {:.3} ms: engine stage {engine_ms:.3} ms, GPU wait {wait:.3} ms in {} sync(s)",
            ms(&r["ttft_ns"]),
            r["gpu_ns"]["syncs"]
        );
        assert_eq!(r["gpu_ns"]["syncs"], 1, "only the prefill sync: {r}");
        let allowed = (SYNC_MS * 0.05).max(1.0);
        assert!(
            wait >= SYNC_MS && wait <= SYNC_MS + allowed,
            "GPU wait {wait:.3} ms, the stand-in slept {SYNC_MS} ms: {r}"
        );
        assert!(
            wait <= engine_ms,
            "the wait lies inside the engine stage: {r}"
        );
        // Decode: each of the 5 gaps holds one decode step's synchronize call.
        let (dwait, dengine) = (
            ms(&r["decode_ns"]["gpu_sync"]),
            ms(&r["decode_ns"]["engine"]),
        );
        eprintln!("decode: engine {dengine:.3} ms, GPU wait {dwait:.3} ms");
        let steps = r["gaps_ns"].as_array().map_or(0, Vec::len) as f64;
        assert_eq!(steps, 5.0, "{r}");
        assert!(
            dwait >= steps * SYNC_MS && dwait <= steps * (SYNC_MS + allowed) && dwait <= dengine,
            "decode GPU wait {dwait:.3} ms for {steps} syncs of {SYNC_MS} ms: {r}"
        );
    }
    let m = probe.metrics();
    assert_eq!(
        metric_sum(&m, "llm_ttft_gpu_wait_seconds_count", &[]),
        f64::from(requests),
        "{m}"
    );
    let sum = metric_sum(&m, "llm_ttft_gpu_wait_seconds_sum", &[]);
    assert!(
        (sum * 1e3 - SYNC_MS * f64::from(requests)).abs() <= f64::from(requests) * 2.0,
        "{sum} s"
    );
    let decode = metric_sum(&m, "llm_tbt_gpu_wait_seconds_total", &[]);
    assert!(
        (decode * 1e3 - 5.0 * SYNC_MS * f64::from(requests)).abs()
            <= 5.0 * f64::from(requests) * 2.0,
        "{decode} s"
    );
    engine.finish().expect("engine exit");
}

/// `--cuda-launch-probes driver`: the runtime's launch entry points are left alone; every runtime
/// launch reaches the stand-in driver's exported launch, so each is still counted once, under the
/// driver's name, and nothing is nested. Also `--cuda-probe-scope process` (uprobes scoped to the
/// traced process): the ledger's live bytes must still be exact.
#[test]
fn driver_only_launch_probes_and_per_process_scope() {
    if !require_root("driver_only_launch_probes_and_per_process_scope") {
        return;
    }
    let fc = fake_cuda::build().expect("building the stand-in CUDA libraries");
    let mut engine = FakeEngine::start(&fc, "full", &[], 100).expect("fake engine");
    let probe = Probe::start(&[
        "--pid".into(),
        engine.pid.to_string(),
        "--cuda-launch-probes".into(),
        "driver".into(),
        "--cuda-probe-scope".into(),
        "process".into(),
    ]);
    fake_cuda::wait_attached(&probe);
    let truth = engine.go().expect("scenario");
    let m = probe.metrics();
    let launches = |api| metric_sum(&m, "llm_cuda_kernel_launches_total", &[("api", api)]);
    let graphs = |api| metric_sum(&m, "llm_cuda_graph_launches_total", &[("api", api)]);
    assert_eq!(
        metric_sum(&m, "llm_cuda_kernel_launches_total", &[]),
        truth["kernel_launches"].as_f64().unwrap(),
        "{m}"
    );
    assert_eq!(
        launches("cuLaunchKernel"),
        calls(&truth, "cuLaunchKernel") + calls(&truth, "cudaLaunchKernel")
    );
    assert_eq!(
        graphs("cuGraphLaunch"),
        calls(&truth, "cuGraphLaunch") + calls(&truth, "cudaGraphLaunch")
    );
    assert_eq!(launches("cudaLaunchKernel"), 0.0);
    assert_eq!(
        metric_sum(
            &m,
            "llm_probe_cuda_nested_calls_total",
            &[("api", "launch")]
        ),
        0.0
    );
    wait_for("ledger records drained", Duration::from_secs(5), || {
        metric_sum(
            &probe.metrics(),
            "llm_gpu_memory_live_bytes",
            &[("pid", &engine.pid.to_string())],
        ) == truth["live_bytes"].as_f64().unwrap()
    });
    engine.finish().expect("engine exit");
}
