//! The workload: prefill bursts, graph-replayed decode steps, memory traffic and a leak, all on
//! one non-blocking stream of device 0's primary context.

use std::ffi::{c_char, c_void, CStr};
use std::ptr;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use cudarc::driver::sys::{
    CUcontext, CUdevice, CUdevice_attribute, CUdeviceptr, CUevent, CUfunction, CUgraph,
    CUgraphExec, CUstream, CUstreamCaptureMode, CUstream_flags,
};

use crate::cu::{self, CuError};
use crate::ptx;
use crate::report::{MsStats, NsStats, Report};
use crate::vmm::Vmm;
use crate::Args;

pub const MIB: usize = 1 << 20;
/// Plain allocations are this big.
pub const PLAIN_BYTES: usize = MIB;
/// Stream-ordered allocations: count and size.
pub const ASYNC_ALLOCS: usize = 20;
pub const ASYNC_BYTES: usize = 256 << 10;
/// The leak is made in this many calls of [`llm_cuda_leak_on_purpose`].
pub const LEAK_CALLS: u64 = 8;
pub const LEAK_FUNCTION: &str = "llm_cuda_leak_on_purpose";

/// Allocates `bytes` of device memory with `cuMemAlloc_v2` and never frees it: the deliberate leak a
/// probe should attribute to this (unmangled, never inlined) function. Returns the device pointer,
/// or 0 when the allocation failed. A context must be current on the calling thread.
#[inline(never)]
#[no_mangle]
pub extern "C" fn llm_cuda_leak_on_purpose(bytes: usize) -> u64 {
    let mut dptr: CUdeviceptr = 0;
    // SAFETY: out-pointer to a live local; the caller has a current context.
    match unsafe { cu!(cuMemAlloc_v2(&raw mut dptr, bytes)) } {
        Ok(()) => dptr,
        Err(e) => {
            eprintln!("{LEAK_FUNCTION}: {e}");
            0
        }
    }
}

/// Device 0, its primary context (current on this thread), a stream and two timing events.
struct Gpu {
    dev: CUdevice,
    name: String,
    cc: (i32, i32),
    stream: CUstream,
    start: CUevent,
    end: CUevent,
}

fn init() -> Result<Gpu, CuError> {
    let mut dev: CUdevice = 0;
    let mut name = [0 as c_char; 256];
    let (mut major, mut minor) = (0i32, 0i32);
    let mut ctx: CUcontext = ptr::null_mut();
    let mut stream: CUstream = ptr::null_mut();
    let mut start: CUevent = ptr::null_mut();
    let mut end: CUevent = ptr::null_mut();
    // SAFETY: cuInit succeeded (probe_driver); out-pointers to live locals; `name` is 256 bytes.
    unsafe {
        cu!(cuDeviceGet(&raw mut dev, 0))?;
        cu!(cuDeviceGetName(name.as_mut_ptr(), name.len() as i32, dev))?;
        cu!(cuDeviceGetAttribute(
            &raw mut major,
            CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR,
            dev
        ))?;
        cu!(cuDeviceGetAttribute(
            &raw mut minor,
            CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR,
            dev
        ))?;
        cu!(cuDevicePrimaryCtxRetain(&raw mut ctx, dev))?;
        cu!(cuCtxSetCurrent(ctx))?;
        // Not the legacy NULL stream: that one cannot be captured.
        cu!(cuStreamCreate(
            &raw mut stream,
            CUstream_flags::CU_STREAM_NON_BLOCKING as u32
        ))?;
        cu!(cuEventCreate(&raw mut start, 0))?;
        cu!(cuEventCreate(&raw mut end, 0))?;
    }
    // SAFETY: the driver NUL-terminates within the buffer.
    let name = unsafe { CStr::from_ptr(name.as_ptr()) }
        .to_string_lossy()
        .into_owned();
    Ok(Gpu {
        dev,
        name,
        cc: (major, minor),
        stream,
        start,
        end,
    })
}

/// One single-thread launch of `spin(cycles)` on `stream` (captured or executed).
fn launch(func: CUfunction, stream: CUstream, cycles: u64) -> Result<(), CuError> {
    let mut cycles = cycles;
    let mut params = [(&raw mut cycles).cast::<c_void>()];
    // SAFETY: `func` takes one u64; the driver copies the parameter before returning.
    unsafe {
        cu!(cuLaunchKernel(
            func,
            1,
            1,
            1,
            1,
            1,
            1,
            0,
            stream,
            params.as_mut_ptr(),
            ptr::null_mut()
        ))
    }
}

/// `cuStreamSynchronize`, returning the host nanoseconds spent in the call.
fn timed_sync(stream: CUstream) -> Result<u64, CuError> {
    let t = Instant::now();
    // SAFETY: `stream` is live.
    let r = unsafe { cu!(cuStreamSynchronize(stream)) };
    let ns = u64::try_from(t.elapsed().as_nanos())
        .unwrap_or(u64::MAX)
        .max(1);
    r.map(|()| ns)
}

fn record(ev: CUevent, stream: CUstream) -> Result<(), CuError> {
    // SAFETY: both handles are live.
    unsafe { cu!(cuEventRecord(ev, stream)) }
}

/// GPU milliseconds between the two (completed) events.
fn elapsed_ms(gpu: &Gpu) -> Result<f64, CuError> {
    let mut ms = 0f32;
    // SAFETY: both events were recorded and have completed (the stream was synchronised).
    unsafe { cu!(cuEventElapsedTime(&raw mut ms, gpu.start, gpu.end)) }?;
    Ok(f64::from(ms))
}

/// Prefill: per burst, `launches` eager launches bracketed by events, then one timed sync.
fn prefill(gpu: &Gpu, func: CUfunction, args: &Args) -> Result<(Vec<f64>, Vec<u64>), CuError> {
    let (mut gpu_ms, mut waits) = (Vec::new(), Vec::new());
    for _ in 0..args.prefill_bursts {
        record(gpu.start, gpu.stream)?;
        for _ in 0..args.prefill_launches {
            launch(func, gpu.stream, args.spin_cycles)?;
        }
        record(gpu.end, gpu.stream)?;
        waits.push(timed_sync(gpu.stream)?);
        gpu_ms.push(elapsed_ms(gpu)?);
    }
    Ok((gpu_ms, waits))
}

/// A captured, instantiated graph of `graph_kernels` spin launches.
struct Graph {
    graph: CUgraph,
    exec: CUgraphExec,
}

fn capture(gpu: &Gpu, func: CUfunction, args: &Args) -> Result<Graph, CuError> {
    let mut graph: CUgraph = ptr::null_mut();
    let mut exec: CUgraphExec = ptr::null_mut();
    // SAFETY: the stream is live and not the legacy stream; out-pointers to live locals.
    unsafe {
        cu!(cuStreamBeginCapture_v2(
            gpu.stream,
            CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_GLOBAL
        ))?;
        let launched =
            (0..args.graph_kernels).try_for_each(|_| launch(func, gpu.stream, args.spin_cycles));
        // End the capture even when a launch failed, so the stream is usable for the error path.
        let ended = cu!(cuStreamEndCapture(gpu.stream, &raw mut graph));
        launched?;
        ended?;
        cu!(cuGraphInstantiateWithFlags(&raw mut exec, graph, 0))?;
    }
    Ok(Graph { graph, exec })
}

/// Decode: `steps` × (event, `cuGraphLaunch`, event, timed sync).
fn decode(gpu: &Gpu, graph: &Graph, steps: u64) -> Result<(Vec<f64>, Vec<u64>), CuError> {
    let (mut gpu_ms, mut waits) = (Vec::new(), Vec::new());
    for _ in 0..steps {
        record(gpu.start, gpu.stream)?;
        // SAFETY: `exec` is an instantiated graph; the stream is live.
        unsafe { cu!(cuGraphLaunch(graph.exec, gpu.stream)) }?;
        record(gpu.end, gpu.stream)?;
        waits.push(timed_sync(gpu.stream)?);
        gpu_ms.push(elapsed_ms(gpu)?);
    }
    Ok((gpu_ms, waits))
}

/// `n` × `cuMemAlloc_v2(PLAIN_BYTES)`, then all freed with `cuMemFree_v2`.
fn plain_allocs(n: u64) -> Result<(), CuError> {
    let mut ptrs = Vec::new();
    // SAFETY: a context is current; each pointer is freed exactly once.
    unsafe {
        for _ in 0..n {
            let mut p: CUdeviceptr = 0;
            cu!(cuMemAlloc_v2(&raw mut p, PLAIN_BYTES))?;
            ptrs.push(p);
        }
        for p in ptrs {
            cu!(cuMemFree_v2(p))?;
        }
    }
    Ok(())
}

/// `ASYNC_ALLOCS` stream-ordered allocations then frees, drained by one timed sync.
fn async_allocs(stream: CUstream) -> Result<u64, CuError> {
    let mut ptrs = Vec::new();
    // SAFETY: the stream is live; each pointer is freed exactly once, in stream order.
    unsafe {
        for _ in 0..ASYNC_ALLOCS {
            let mut p: CUdeviceptr = 0;
            cu!(cuMemAllocAsync(&raw mut p, ASYNC_BYTES, stream))?;
            ptrs.push(p);
        }
        for p in ptrs {
            cu!(cuMemFreeAsync(p, stream))?;
        }
    }
    timed_sync(stream)
}

/// Leaks `mib` MiB in [`LEAK_CALLS`] calls of [`llm_cuda_leak_on_purpose`]; returns bytes leaked.
fn leak(mib: u64) -> Result<u64> {
    if mib == 0 {
        return Ok(0);
    }
    let each = (mib as usize * MIB) / LEAK_CALLS as usize;
    anyhow::ensure!(
        each > 0,
        "--leak-mib {mib} is too small for {LEAK_CALLS} calls"
    );
    for _ in 0..LEAK_CALLS {
        let p = llm_cuda_leak_on_purpose(std::hint::black_box(each));
        anyhow::ensure!(p != 0, "{LEAK_FUNCTION}({each}) failed");
    }
    Ok(each as u64 * LEAK_CALLS)
}

/// Runs everything, holds, cleans up and returns the report. `cuInit` has already succeeded.
pub fn run(args: &Args) -> Result<Report> {
    let gpu = init().context("device 0 / primary context")?;
    eprintln!("device 0: {} (sm_{}{})", gpu.name, gpu.cc.0, gpu.cc.1);

    let kernel =
        ptx::load(gpu.cc.0, gpu.cc.1, !args.no_nvrtc).context("loading the spin kernel")?;
    match &kernel.nvrtc_error {
        None => eprintln!(
            "kernel: compiled with NVRTC {}",
            kernel.nvrtc_version.as_deref().unwrap_or("?")
        ),
        Some(why) => eprintln!("kernel: embedded PTX (NVRTC not used: {why})"),
    }

    let launch_bench_ns_per_call = launch_bench(&gpu, kernel.func, args.launch_bench)?;
    let (prefill_gpu_ms, prefill_waits) = prefill(&gpu, kernel.func, args).context("prefill")?;
    eprintln!(
        "prefill: {} bursts x {} launches, GPU ms {prefill_gpu_ms:?}",
        args.prefill_bursts, args.prefill_launches
    );

    let graph = capture(&gpu, kernel.func, args).context("graph capture")?;
    let (decode_gpu_ms, decode_waits) = decode(&gpu, &graph, args.steps).context("decode")?;
    let decode_gpu = MsStats::of(&decode_gpu_ms);
    eprintln!(
        "decode: {} steps x graph of {} kernels, GPU ms p50 {:.3}",
        args.steps, args.graph_kernels, decode_gpu.p50
    );

    plain_allocs(args.allocs).context("plain allocations")?;
    let async_wait = async_allocs(gpu.stream).context("stream-ordered allocations")?;
    let vmm = Vmm::setup(gpu.dev).context("VMM")?;
    let leak_bytes = leak(args.leak_mib)?;
    let vmm_summary = vmm.summary();
    let live_bytes_at_hold = leak_bytes + vmm_summary.mapped;
    eprintln!(
        "memory: {} x 1 MiB alloc/free, {ASYNC_ALLOCS} x 256 KiB async, VMM {} B granularity ({} mapped), leaked {leak_bytes} B",
        args.allocs, vmm_summary.granularity, vmm_summary.mapped
    );

    let calls_at_hold = cu::snapshot();
    let pid = std::process::id();
    eprintln!(
        "hold: pid {pid}, {live_bytes_at_hold} device bytes live, holding {} s",
        args.hold_secs
    );
    if args.hold_secs > 0 {
        thread::sleep(Duration::from_secs(args.hold_secs));
    }

    // Cleanup: everything but the leak (which the context teardown reclaims).
    vmm.cleanup().context("VMM cleanup")?;
    // SAFETY: every handle was created above and is destroyed once; nothing uses them afterwards.
    unsafe {
        cu!(cuGraphExecDestroy(graph.exec))?;
        cu!(cuGraphDestroy(graph.graph))?;
        cu!(cuEventDestroy_v2(gpu.start))?;
        cu!(cuEventDestroy_v2(gpu.end))?;
        cu!(cuStreamDestroy_v2(gpu.stream))?;
        cu!(cuModuleUnload(kernel.module))?;
        cu!(cuDevicePrimaryCtxRelease_v2(gpu.dev))?;
    }
    eprintln!("cleanup done");

    let mut sync_waits = prefill_waits.clone();
    sync_waits.extend_from_slice(&decode_waits);
    sync_waits.push(async_wait);
    Ok(Report {
        device: gpu.name,
        compute_capability: format!("{}.{}", gpu.cc.0, gpu.cc.1),
        nvrtc: kernel.source == ptx::KernelSource::Nvrtc,
        kernel_source: kernel.source.as_str(),
        nvrtc_version: kernel.nvrtc_version,
        nvrtc_error: kernel.nvrtc_error,
        calls: cu::snapshot(),
        calls_at_hold,
        kernel_launches: args.prefill_bursts * args.prefill_launches,
        captured_launches: args.graph_kernels,
        graph_launches: args.steps,
        graph_kernel_executions: args.steps * args.graph_kernels,
        syncs: cu::calls_of("cuStreamSynchronize"),
        sync_wait_ns: NsStats::of(&sync_waits),
        prefill_sync_wait_ns: prefill_waits,
        decode_sync_wait_ns: NsStats::of(&decode_waits),
        prefill_gpu_ms,
        decode_gpu_ms: decode_gpu,
        spin_cycles: args.spin_cycles,
        live_bytes_at_hold,
        leak_bytes,
        leak_calls: if leak_bytes > 0 { LEAK_CALLS } else { 0 },
        leak_function: LEAK_FUNCTION,
        vmm: vmm_summary,
        hold_secs: args.hold_secs,
        pid,
        launch_bench_ns_per_call,
    })
}

/// `--launch-bench N`: host ns per `cuLaunchKernel` of `spin(0)`, launches timed in batches of 256
/// with an untimed sync after each batch.
fn launch_bench(gpu: &Gpu, func: CUfunction, n: u64) -> Result<Option<f64>> {
    if n == 0 {
        return Ok(None);
    }
    let mut launch_ns = 0u128;
    let mut done = 0u64;
    while done < n {
        let batch = (n - done).min(256);
        let t = Instant::now();
        for _ in 0..batch {
            launch(func, gpu.stream, 0).context("launch bench")?;
        }
        launch_ns += t.elapsed().as_nanos();
        timed_sync(gpu.stream).context("launch bench sync")?;
        done += batch;
    }
    let per = launch_ns as f64 / n as f64;
    eprintln!("launch bench: {n} cuLaunchKernel, {per:.0} ns each (host)");
    Ok(Some(per))
}
