//! The fake CUDA stand-ins on their own, without the probe and without root: the libraries export
//! exactly the names the probe attaches to (one symbol, one address), and `fake_engine`'s ground
//! truth adds up. The CUDA probe's tests trust both.

use std::{
    collections::{BTreeMap, BTreeSet},
    ffi::{c_void, CString},
    path::Path,
    time::{Duration, Instant},
};

use probe_common::cuda::api::{self, NAMES};
use serde_json::Value;
use tests::fake_cuda::{self, FakeCuda, FakeEngine};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * 1024;

/// Exported code address of `name` in the library loaded as `handle`, if any.
fn sym(handle: *mut c_void, name: &str) -> Option<usize> {
    let c = CString::new(name).expect("symbol name");
    // SAFETY: `handle` is a live dlopen handle and `c` a NUL-terminated string.
    let p = unsafe { libc::dlsym(handle, c.as_ptr()) };
    (!p.is_null()).then_some(p as usize)
}

fn open(path: &Path) -> *mut c_void {
    let c = CString::new(path.as_os_str().as_encoded_bytes()).expect("library path");
    // SAFETY: plain dlopen of a library we built; RTLD_LOCAL keeps its symbols out of our scope.
    let h = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
    assert!(!h.is_null(), "dlopen {}", path.display());
    h
}

#[test]
fn stand_ins_export_exactly_the_probe_names() {
    let fc = fake_cuda::build().expect("build the fake CUDA libraries");
    let again = fake_cuda::build().expect("second build");
    assert_eq!(fc.lib_dir, again.lib_dir, "the build is cached by content");
    assert!(fc.engine.is_file() && fc.libcuda().is_file() && fc.libcudart().is_file());

    let (drv, rt) = (open(&fc.libcuda()), open(&fc.libcudart()));
    let mut seen: BTreeMap<usize, &str> = BTreeMap::new();
    for (id, &name) in (0..).zip(&NAMES) {
        let (home, other) = if api::is_runtime(id) {
            (rt, drv)
        } else {
            (drv, rt)
        };
        let addr = sym(home, name)
            .unwrap_or_else(|| panic!("{name} is not exported by its stand-in library"));
        assert!(
            sym(other, name).is_none(),
            "{name} is exported by both libraries"
        );
        // Two names at one address would make one uprobe hit count as two APIs.
        if let Some(prev) = seen.insert(addr, name) {
            panic!("{name} and {prev} share the address {addr:#x}");
        }
    }
    assert!(sym(drv, "cuInit").is_some(), "cuInit");
    // The engine (a PIE, which dlopen refuses) exports its leak's caller chain and nothing under a
    // CUDA name, and does not link the stand-ins.
    let (exported, needed) = elf_dynamic(&fc.engine);
    for name in ["leak_kv_scratch", "run_decode_loop"] {
        assert!(exported.contains(name), "fake_engine must export {name}");
    }
    let cuda: Vec<_> = exported.iter().filter(|n| n.starts_with("cu")).collect();
    assert!(cuda.is_empty(), "fake_engine exports {cuda:?}");
    assert!(
        !needed.iter().any(|n| n.contains("libcuda")),
        "fake_engine links {needed:?}"
    );
}

/// Defined `.dynsym` names and `DT_NEEDED` entries of a little-endian ELF64 file.
fn elf_dynamic(path: &Path) -> (BTreeSet<String>, Vec<String>) {
    let b = std::fs::read(path).expect("read ELF");
    assert!(
        b.starts_with(b"\x7fELF") && b[4] == 2 && b[5] == 1,
        "ELF64 LE: {}",
        path.display()
    );
    let u16_at = |o: usize| u16::from_le_bytes(b[o..o + 2].try_into().expect("2 bytes")) as usize;
    let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes")) as usize;
    let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes")) as usize;
    let cstr = |o: usize| {
        let end = b[o..].iter().position(|&c| c == 0).expect("NUL") + o;
        String::from_utf8_lossy(&b[o..end]).into_owned()
    };
    let (shoff, shentsize, shnum) = (u64_at(0x28), u16_at(0x3a), u16_at(0x3c));
    let section = |i: usize| {
        let h = shoff + i * shentsize;
        // (type, offset, size, link, entsize)
        (
            u32_at(h + 4),
            u64_at(h + 24),
            u64_at(h + 32),
            u32_at(h + 40),
            u64_at(h + 56),
        )
    };
    let (mut names, mut needed) = (BTreeSet::new(), Vec::new());
    for i in 0..shnum {
        let (ty, off, size, link, entsize) = section(i);
        let strtab = section(link).1;
        match ty {
            // SHT_DYNSYM: Elf64_Sym { name: u32, info: u8, other: u8, shndx: u16, value, size }
            11 => {
                for s in (off..off + size).step_by(entsize.max(24)) {
                    if u16_at(s + 6) != 0 {
                        names.insert(cstr(strtab + u32_at(s)));
                    }
                }
            }
            // SHT_DYNAMIC: Elf64_Dyn { tag: i64, val: u64 }; DT_NEEDED = 1
            6 => {
                for d in (off..off + size).step_by(16) {
                    if u64_at(d) == 1 {
                        needed.push(cstr(strtab + u64_at(d + 8)));
                    }
                }
            }
            _ => {}
        }
    }
    (names, needed)
}

fn u(v: &Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("{key} missing or not an integer in {v}"))
}

#[test]
fn full_scenario_truth_adds_up() {
    let fc = fake_cuda::build().expect("build the fake CUDA libraries");
    let sync_us = 2000;
    let mut engine = FakeEngine::start(&fc, "full", &[], sync_us).expect("start fake_engine");
    let t0 = Instant::now();
    let truth = engine.go().expect("run the full scenario");
    let took = t0.elapsed();
    let pid = engine.pid;
    engine.finish().expect("fake_engine exits cleanly");
    eprintln!("full truth ({took:?}): {truth}");

    assert_eq!(u(&truth, "pid"), u64::from(pid));
    assert_eq!(u(&truth, "unexpected_results"), 0, "{truth}");

    // Every API was called, as many times as the scenario says.
    let expected: BTreeMap<&str, u64> = [
        ("cuLaunchKernel", 3 * 200),
        ("cuLaunchKernel_ptsz", 1),
        ("cuLaunchKernelEx", 1),
        ("cuLaunchKernelEx_ptsz", 1),
        ("cuLaunchCooperativeKernel", 1),
        ("cuLaunchCooperativeKernel_ptsz", 1),
        ("cudaLaunchKernel", 3 * 50),
        ("cudaLaunchKernel_ptsz", 1),
        ("cuGraphLaunch", 20),
        ("cuGraphLaunch_ptsz", 1),
        ("cudaGraphLaunch", 5),
        // Freed pool 100, leak 8, double-free victim 1, threads 4 × 250.
        ("cuMemAlloc_v2", 100 + 8 + 1 + 1000),
        ("cuMemAllocPitch_v2", 1),
        ("cuMemAllocManaged", 1),
        ("cuMemAllocAsync", 10),
        ("cuMemAllocAsync_ptsz", 10),
        ("cuMemAllocFromPoolAsync", 5),
        ("cuMemAllocFromPoolAsync_ptsz", 5),
        // Freed pool 100, victim 2 (once too many), unknown 1, threads 4 × 125.
        ("cuMemFree_v2", 100 + 2 + 1 + 500),
        ("cuMemFreeAsync", 10 + 5),
        ("cuMemFreeAsync_ptsz", 10 + 5),
        ("cuMemAddressReserve", 2),
        ("cuMemAddressFree", 1),
        ("cuMemCreate", 4),
        ("cuMemRelease", 1),
        ("cuMemMap", 4),
        ("cuMemUnmap", 1),
        ("cudaMalloc", 10 + 1),
        ("cudaMallocAsync", 10),
        ("cudaFree", 10),
        ("cudaFreeAsync", 10),
        ("cuStreamSynchronize", 3 + 20),
        ("cuStreamSynchronize_ptsz", 1),
        ("cuCtxSynchronize", 1),
        ("cuEventSynchronize", 1),
        ("cudaStreamSynchronize", 5),
        ("cudaDeviceSynchronize", 1),
    ]
    .into_iter()
    .collect();
    assert_eq!(
        expected.keys().copied().collect::<BTreeSet<_>>(),
        NAMES.into_iter().collect::<BTreeSet<_>>(),
        "the expectations cover the probe's API list"
    );
    let calls: BTreeMap<&str, u64> = truth["calls"]
        .as_object()
        .expect("calls")
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_u64().expect("count")))
        .collect();
    assert_eq!(calls, expected);

    // The totals are the sums of their APIs, by probe-common's kinds.
    let sum = |kind: fn(u32) -> bool| -> u64 {
        (0..api::COUNT)
            .filter(|&id| kind(id))
            .map(|id| calls[NAMES[id as usize]])
            .sum()
    };
    let kernel = sum(|id| api::is_launch(id) && !api::is_graph_launch(id));
    assert_eq!(u(&truth, "kernel_launches"), kernel);
    assert_eq!(u(&truth, "kernel_launches"), 3 * 250 + 5 + 1);
    assert_eq!(u(&truth, "graph_launches"), sum(api::is_graph_launch));
    assert_eq!(u(&truth, "graph_launches"), 20 + 5 + 1);
    assert_eq!(u(&truth, "syncs"), sum(api::is_sync));
    assert_eq!(u(&truth, "syncs"), 23 + 5 + 4);
    let allocs: u64 = NAMES
        .iter()
        .filter(|n| n.starts_with("cuMemAlloc") || n.starts_with("cudaMalloc"))
        .map(|n| calls[n])
        .sum();
    let frees: u64 = NAMES
        .iter()
        .filter(|n| n.starts_with("cuMemFree") || n.starts_with("cudaFree"))
        .map(|n| calls[n])
        .sum();
    assert_eq!(u(&truth, "allocs"), allocs);
    assert_eq!(u(&truth, "frees"), frees);

    // Syncs really wait, and the leak's calls are 50 ms apart.
    assert_eq!(u(&truth, "sync_us"), u64::from(sync_us));
    let sync_ns = u(&truth, "sync_ns_total");
    assert!(
        sync_ns >= u(&truth, "syncs") * u64::from(sync_us) * 1000,
        "syncs took {sync_ns} ns in all"
    );
    assert!(
        took >= Duration::from_millis(7 * 50) + Duration::from_nanos(sync_ns),
        "the scenario took {took:?}"
    );

    // What is still allocated: pitched 1024 × 10, managed 3 MiB, cudaMalloc 5 MiB, the leak,
    // half of the threads' 4 KiB blocks, and the VMM handles not released (h0, h1, h3).
    assert_eq!(u(&truth, "leak_bytes"), 8 * 4 * MIB);
    assert_eq!(truth["leak_function"], "leak_kv_scratch");
    let vmm = &truth["vmm"];
    assert_eq!(u(vmm, "created_live"), 3 * 2 * MIB);
    assert_eq!(
        u(&truth, "live_bytes"),
        1024 * 10 + 3 * MIB + 5 * MIB + u(&truth, "leak_bytes") + 4 * 125 * 4 * KIB + 6 * MIB
    );
    assert_eq!(u(&truth, "live_bytes"), 50_292_736);
    assert_eq!(u(&truth, "double_frees"), 1);
    assert_eq!(u(&truth, "unknown_frees"), 1);

    // VMM: a 64 MiB reservation with 2 MiB mapped at 0, 2 and 10 MiB (6 MiB was unmapped):
    // free extents [4, 10) and [12, 64) MiB.
    assert_eq!(u(vmm, "reserved"), 64 * MIB);
    assert_eq!(u(vmm, "mapped"), 6 * MIB);
    assert_eq!(u(vmm, "free_bytes"), u(vmm, "reserved") - u(vmm, "mapped"));
    assert_eq!(u(vmm, "holes"), 2);
    assert_eq!(u(vmm, "largest_free_extent"), 52 * MIB);
    let ratio = vmm["fragmentation_ratio"].as_f64().expect("ratio");
    let want = 1.0 - (52.0 / 58.0);
    assert!(
        (ratio - want).abs() < 1e-12,
        "fragmentation_ratio {ratio}, want {want}"
    );
}

#[test]
fn bench_numbers_are_sane() {
    let fc = fake_cuda::build().expect("build the fake CUDA libraries");
    let mut engine = FakeEngine::start(&fc, "bench", &["100000"], 0).expect("start fake_engine");
    let v = engine.go().expect("run the bench");
    engine.finish().expect("fake_engine exits cleanly");
    eprintln!("bench: {v}");
    assert_eq!(u(&v, "n"), 100_000);
    assert_eq!(u(&v, "unexpected_results"), 0);
    let launch = v["launch_ns_per_call"]
        .as_f64()
        .expect("launch_ns_per_call");
    let pair = v["alloc_free_ns_per_pair"]
        .as_f64()
        .expect("alloc_free_ns_per_pair");
    // Without a probe these are a few ns and a few tens of ns; the bounds only catch nonsense.
    assert!(launch > 0.0 && launch < 10_000.0, "launch {launch} ns");
    assert!(pair > 0.0 && pair < 100_000.0, "alloc+free {pair} ns");
}

#[test]
fn idle_and_missing_libraries() {
    let fc = fake_cuda::build().expect("build the fake CUDA libraries");
    let mut engine = FakeEngine::start(&fc, "idle", &[], 0).expect("start fake_engine");
    assert_eq!(engine.go().expect("idle"), serde_json::json!({}));
    engine.finish().expect("fake_engine exits cleanly");

    // Without the stand-ins on LD_LIBRARY_PATH the engine says so, and `go` fails with it.
    let broken = FakeCuda {
        lib_dir: std::env::temp_dir().join("no-such-fake-cuda-dir"),
        engine: fc.engine.clone(),
    };
    let mut engine = FakeEngine::start(&broken, "idle", &[], 0).expect("start fake_engine");
    let err = engine.go().expect_err("no libcuda.so.1 to load");
    assert!(format!("{err:#}").contains("libcuda.so.1"), "{err:#}");
    engine
        .finish()
        .expect("fake_engine exits cleanly after an error");

    // Dropping an engine that was never told to go kills it.
    let engine = FakeEngine::start(&fc, "full", &[], 0).expect("start fake_engine");
    let pid = engine.pid;
    drop(engine);
    // SAFETY: signal 0 only checks for existence; the child was reaped by the drop.
    let alive = unsafe { libc::kill(pid as i32, 0) } == 0;
    assert!(!alive, "fake_engine {pid} survived its drop");
}
