//! CUDA driver/runtime uprobes: API ids (the uprobe's attach cookie), the per-thread launch
//! counters, and the records of memory and sync calls.
//!
//! Launches are hot (thousands per engine step in eager mode), so they never reach the ring buffer:
//! each traced thread has a `CudaThread` entry whose counters the agent reads. Memory and sync calls
//! are rare and arrive as records at their return, with the entry's arguments and time.

use core::mem::size_of;

use crate::EventHeader;

/// One CUDA entry point the probe attaches to. The value is the uprobe's attach cookie and the
/// index into `NAMES`.
pub mod api {
    // Kernel launches (entry-only, counted per thread in `CudaThread::launches`).
    pub const CU_LAUNCH_KERNEL: u32 = 0;
    pub const CU_LAUNCH_KERNEL_PTSZ: u32 = 1;
    pub const CU_LAUNCH_KERNEL_EX: u32 = 2;
    pub const CU_LAUNCH_KERNEL_EX_PTSZ: u32 = 3;
    pub const CU_LAUNCH_COOPERATIVE_KERNEL: u32 = 4;
    pub const CU_LAUNCH_COOPERATIVE_KERNEL_PTSZ: u32 = 5;
    pub const CUDA_LAUNCH_KERNEL: u32 = 6;
    pub const CUDA_LAUNCH_KERNEL_PTSZ: u32 = 7;
    // Graph launches (entry-only, counted like kernel launches).
    pub const CU_GRAPH_LAUNCH: u32 = 8;
    pub const CU_GRAPH_LAUNCH_PTSZ: u32 = 9;
    pub const CUDA_GRAPH_LAUNCH: u32 = 10;
    /// Launch APIs are `0..LAUNCH_COUNT`; graph launches are `CU_GRAPH_LAUNCH..LAUNCH_COUNT`.
    pub const LAUNCH_COUNT: u32 = 11;
    // Memory (entry + return, `CudaMemEvent`).
    pub const CU_MEM_ALLOC: u32 = 11;
    pub const CU_MEM_ALLOC_PITCH: u32 = 12;
    pub const CU_MEM_ALLOC_MANAGED: u32 = 13;
    pub const CU_MEM_ALLOC_ASYNC: u32 = 14;
    pub const CU_MEM_ALLOC_ASYNC_PTSZ: u32 = 15;
    pub const CU_MEM_ALLOC_FROM_POOL_ASYNC: u32 = 16;
    pub const CU_MEM_ALLOC_FROM_POOL_ASYNC_PTSZ: u32 = 17;
    pub const CU_MEM_FREE: u32 = 18;
    pub const CU_MEM_FREE_ASYNC: u32 = 19;
    pub const CU_MEM_FREE_ASYNC_PTSZ: u32 = 20;
    pub const CU_MEM_ADDRESS_RESERVE: u32 = 21;
    pub const CU_MEM_ADDRESS_FREE: u32 = 22;
    pub const CU_MEM_CREATE: u32 = 23;
    pub const CU_MEM_RELEASE: u32 = 24;
    pub const CU_MEM_MAP: u32 = 25;
    pub const CU_MEM_UNMAP: u32 = 26;
    pub const CUDA_MALLOC: u32 = 27;
    pub const CUDA_MALLOC_ASYNC: u32 = 28;
    pub const CUDA_FREE: u32 = 29;
    pub const CUDA_FREE_ASYNC: u32 = 30;
    // Synchronisation (entry + return, `CudaSyncEvent`).
    pub const CU_STREAM_SYNCHRONIZE: u32 = 31;
    pub const CU_STREAM_SYNCHRONIZE_PTSZ: u32 = 32;
    pub const CU_CTX_SYNCHRONIZE: u32 = 33;
    pub const CU_EVENT_SYNCHRONIZE: u32 = 34;
    pub const CUDA_STREAM_SYNCHRONIZE: u32 = 35;
    pub const CUDA_DEVICE_SYNCHRONIZE: u32 = 36;
    pub const COUNT: u32 = 37;

    /// Exported symbol names, indexed by id.
    pub const NAMES: [&str; COUNT as usize] = [
        "cuLaunchKernel",
        "cuLaunchKernel_ptsz",
        "cuLaunchKernelEx",
        "cuLaunchKernelEx_ptsz",
        "cuLaunchCooperativeKernel",
        "cuLaunchCooperativeKernel_ptsz",
        "cudaLaunchKernel",
        "cudaLaunchKernel_ptsz",
        "cuGraphLaunch",
        "cuGraphLaunch_ptsz",
        "cudaGraphLaunch",
        "cuMemAlloc_v2",
        "cuMemAllocPitch_v2",
        "cuMemAllocManaged",
        "cuMemAllocAsync",
        "cuMemAllocAsync_ptsz",
        "cuMemAllocFromPoolAsync",
        "cuMemAllocFromPoolAsync_ptsz",
        "cuMemFree_v2",
        "cuMemFreeAsync",
        "cuMemFreeAsync_ptsz",
        "cuMemAddressReserve",
        "cuMemAddressFree",
        "cuMemCreate",
        "cuMemRelease",
        "cuMemMap",
        "cuMemUnmap",
        "cudaMalloc",
        "cudaMallocAsync",
        "cudaFree",
        "cudaFreeAsync",
        "cuStreamSynchronize",
        "cuStreamSynchronize_ptsz",
        "cuCtxSynchronize",
        "cuEventSynchronize",
        "cudaStreamSynchronize",
        "cudaDeviceSynchronize",
    ];

    /// Runtime (libcudart) entry points; the rest are driver (libcuda) ones.
    pub const fn is_runtime(id: u32) -> bool {
        matches!(
            id,
            CUDA_LAUNCH_KERNEL
                | CUDA_LAUNCH_KERNEL_PTSZ
                | CUDA_GRAPH_LAUNCH
                | CUDA_MALLOC
                | CUDA_MALLOC_ASYNC
                | CUDA_FREE
                | CUDA_FREE_ASYNC
                | CUDA_STREAM_SYNCHRONIZE
                | CUDA_DEVICE_SYNCHRONIZE
        )
    }
    pub const fn is_launch(id: u32) -> bool {
        id < LAUNCH_COUNT
    }
    pub const fn is_graph_launch(id: u32) -> bool {
        id >= CU_GRAPH_LAUNCH && id < LAUNCH_COUNT
    }
    pub const fn is_mem(id: u32) -> bool {
        id >= CU_MEM_ALLOC && id < CU_STREAM_SYNCHRONIZE
    }
    pub const fn is_sync(id: u32) -> bool {
        id >= CU_STREAM_SYNCHRONIZE && id < COUNT
    }
    /// Calls whose first argument is an output pointer the result is written to (device pointer,
    /// reserved address or physical handle); the record carries the value read at return.
    pub const fn writes_out_ptr(id: u32) -> bool {
        matches!(
            id,
            CU_MEM_ALLOC
                | CU_MEM_ALLOC_PITCH
                | CU_MEM_ALLOC_MANAGED
                | CU_MEM_ALLOC_ASYNC
                | CU_MEM_ALLOC_ASYNC_PTSZ
                | CU_MEM_ALLOC_FROM_POOL_ASYNC
                | CU_MEM_ALLOC_FROM_POOL_ASYNC_PTSZ
                | CU_MEM_ADDRESS_RESERVE
                | CU_MEM_CREATE
                | CUDA_MALLOC
                | CUDA_MALLOC_ASYNC
        )
    }
}

/// User frames kept per allocation: `stack[0]` is always the caller's return address (read from
/// the stack pointer at entry, so it is there without frame pointers); the rest come from the
/// frame-pointer walk of `bpf_get_stack` and are 0 past its end.
pub const STACK_DEPTH: usize = 16;

/// Fallback for a process whose runtime's code range is not known yet (`CudartText`): a driver
/// launch this soon after the same thread's runtime launch, deeper on its stack, is the runtime's
/// own call into the driver and is counted once (as the runtime API).
pub const NEST_WINDOW_NS: u64 = 1_000_000;

/// Executable mappings of `libcudart` in one process (map `CUDART_TEXT`, key tgid), written by the
/// agent from /proc/PID/maps: a driver launch whose return address lies in one of them was made by
/// the runtime. Unused slots are `[0, 0]`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CudartText {
    pub ranges: [[u64; 2]; 4],
}
const _: () = assert!(size_of::<CudartText>() == 64);

/// Traced threads that ever called a CUDA launch or memory API.
pub const MAX_CUDA_THREADS: u32 = 16 * 1024;

/// Per-thread launch counters (map `CUDA_THREADS`, keyed by thread id). Only the owning thread
/// writes its entry, so the increments need no atomics; the agent sums them per process.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CudaThread {
    pub tgid: u32,
    pub _pad: u32,
    /// Entry time of this thread's last runtime launch not yet matched by a driver launch.
    pub rt_launch_ns: u64,
    /// Driver launches made by a runtime launch (not counted in `launches`).
    pub nested: u64,
    /// Launches by API id (`api::CU_LAUNCH_KERNEL..api::LAUNCH_COUNT`), cumulative.
    pub launches: [u64; 12],
    /// Time of this thread's first launch since its last sync returned (0: none yet): a step's start.
    pub step_start_ns: u64,
    /// Stack pointer at this thread's last runtime launch entry (the nesting test's depth check).
    pub rt_launch_sp: u64,
}
const _: () = assert!(size_of::<CudaThread>() == 136);

/// A memory call, recorded at its return. Also the pending entry between entry and return (then
/// `addr`..`aux2` hold the raw arguments 0..3).
///
/// | api | addr | size | aux | aux2 |
/// |---|---|---|---|---|
/// | allocs, `cudaMalloc*` | device pointer | bytes | – | – |
/// | `cuMemAllocPitch_v2` | device pointer | pitch × height | pitch | height |
/// | frees | device pointer | – | – | – |
/// | `cuMemAddressReserve` | reserved address | bytes | alignment | requested address |
/// | `cuMemAddressFree` | address | bytes | – | – |
/// | `cuMemCreate` | physical handle | bytes | – | – |
/// | `cuMemRelease` | physical handle | – | – | – |
/// | `cuMemMap` | address | bytes | offset in handle | physical handle |
/// | `cuMemUnmap` | address | bytes | – | – |
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CudaMemEvent {
    /// `ts_ns` = return time.
    pub header: EventHeader,
    pub api: u32,
    /// `CUresult` / `cudaError_t` (0 = success).
    pub result: i32,
    pub addr: u64,
    pub size: u64,
    pub aux: u64,
    pub aux2: u64,
    pub enter_ns: u64,
    /// 1 when made while a runtime (libcudart) call of the same thread was in progress: the
    /// runtime's own call into the driver, already recorded by the runtime API.
    pub nested: u32,
    /// Valid entries in `stack` (0 for calls that do not allocate).
    pub nframes: u32,
    pub stack: [u64; STACK_DEPTH],
}
const _: () = assert!(size_of::<CudaMemEvent>() == 208);

/// A synchronisation call, recorded at its return, with the calling thread's launch counters then
/// (step boundaries: launches since this thread's previous sync).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CudaSyncEvent {
    /// `ts_ns` = return time.
    pub header: EventHeader,
    pub api: u32,
    pub result: i32,
    pub enter_ns: u64,
    /// Kernel launches of this thread so far (all kernel-launch APIs, nested ones excluded).
    pub kernel_launches: u64,
    /// Graph launches of this thread so far.
    pub graph_launches: u64,
    pub nested: u32,
    pub _pad: u32,
    /// The thread's first launch since its previous sync (0: no launch in between): with `ts_ns`,
    /// the span of one engine step.
    pub step_start_ns: u64,
}
const _: () = assert!(size_of::<CudaSyncEvent>() == 72);
