//! CUDA driver (libcuda) and runtime (libcudart) entry points of traced processes, from uprobes the
//! agent attaches by library file (so a library dlopen-ed after attach is covered). The API id is
//! the attach cookie (`probe_common::cuda::api`).
//!
//! - Launches (`cuda_launch`, entry only): counted in the calling thread's `CUDA_THREADS` entry,
//!   never on the ring buffer. A runtime launch that reaches an exported driver launch is counted
//!   once: the runtime entry stamps the thread; the thread's next driver launch is the runtime's own
//!   call (counted as `nested`) when its return address lies in the process's libcudart code
//!   (`CUDART_TEXT`), or, while that range is not known, when it comes within `NEST_WINDOW_NS`
//!   and deeper on the stack.
//! - Memory calls (`cuda_mem_enter` / `cuda_mem_return`): arguments saved at entry (with the call
//!   site for allocating calls), one `CudaMemEvent` at return with the result and the value written
//!   through the output pointer.
//! - Syncs (`cuda_sync_enter` / `cuda_sync_return`): one `CudaSyncEvent` at return with the blocked
//!   time and the thread's launch counters (step boundaries).
//!
//! Pending calls are keyed by thread and level (runtime 0, driver 1): a driver call made while the
//! same thread is inside a runtime call of the same family is marked `nested`.

use aya_ebpf::{
    bindings::BPF_F_USER_STACK,
    helpers::{
        bpf_ktime_get_ns, bpf_probe_read_user,
        generated::{bpf_get_attach_cookie, bpf_get_stack},
    },
    macros::{map, uprobe, uretprobe},
    maps::{HashMap, PerCpuArray},
    programs::{ProbeContext, RetProbeContext},
    EbpfContext,
};
use probe_common::{
    counter,
    cuda::{api, MAX_CUDA_THREADS, NEST_WINDOW_NS},
    CudaMemEvent, CudaSyncEvent, CudaThread, CudartText, EventHeader, EventKind, MAX_PENDING,
    MAX_TARGETS, STACK_DEPTH,
};

use crate::{bump, current_tgid_tid, emit, is_target};

/// Code ranges of each traced process's libcudart (key: tgid), from the agent. See `CudartText`.
#[map]
static CUDART_TEXT: HashMap<u32, CudartText> = HashMap::with_max_entries(MAX_TARGETS, 0);

/// Launch counters per traced thread (key: thread id). See `CudaThread`.
#[map]
static CUDA_THREADS: HashMap<u32, CudaThread> = HashMap::with_max_entries(MAX_CUDA_THREADS, 0);

/// Memory/sync calls between entry and return (key: thread id << 1 | level).
#[map]
pub(crate) static CUDA_PENDING: HashMap<u64, CudaMemEvent> =
    HashMap::with_max_entries(MAX_PENDING, 0);

/// Where an entry record is assembled before it is copied into `CUDA_PENDING` (208 bytes is too
/// much for the 512-byte BPF stack next to the helpers' frames).
#[map]
static CUDA_SCRATCH: PerCpuArray<CudaMemEvent> = PerCpuArray::with_max_entries(1, 0);

#[inline(always)]
fn cookie<C: EbpfContext>(ctx: &C) -> u32 {
    // SAFETY: plain helper call on the program's own context.
    unsafe { bpf_get_attach_cookie(ctx.as_ptr()) as u32 }
}

#[inline(always)]
fn now() -> u64 {
    // SAFETY: plain helper call.
    unsafe { bpf_ktime_get_ns() }
}

/// Stack pointer at the probed instruction (function entry: it points at the return address).
#[inline(always)]
fn stack_pointer(ctx: &ProbeContext) -> u64 {
    // SAFETY: reads a field of the probe's pt_regs context; the verifier checks the offset.
    #[cfg(bpf_target_arch = "aarch64")]
    unsafe {
        (*ctx.regs).sp
    }
    #[cfg(not(bpf_target_arch = "aarch64"))]
    unsafe {
        (*ctx.regs).rsp
    }
}

/// The caller's return address at function entry (x86-64: at the stack pointer; arm64: the link
/// register), present whether or not the caller keeps frame pointers.
#[inline(always)]
fn return_address(ctx: &ProbeContext) -> u64 {
    #[cfg(bpf_target_arch = "aarch64")]
    {
        // SAFETY: as above.
        unsafe { (*ctx.regs).regs[30] }
    }
    #[cfg(not(bpf_target_arch = "aarch64"))]
    {
        // SAFETY: user-memory read through the helper, which fails cleanly on a bad address.
        unsafe { bpf_probe_read_user(stack_pointer(ctx) as *const u64) }.unwrap_or(0)
    }
}

/// This thread's counters, created on first use by a traced process. A thread id reused by another
/// process replaces the stale entry.
#[inline(always)]
fn thread_entry(tgid: u32, tid: u32) -> Option<*mut CudaThread> {
    if let Some(p) = CUDA_THREADS.get_ptr_mut(tid) {
        // SAFETY: map value pointer returned by the kernel; only this thread writes it.
        if unsafe { (*p).tgid } == tgid {
            return Some(p);
        }
    }
    if !is_target(tgid) {
        return None;
    }
    let fresh = CudaThread {
        tgid,
        ..CudaThread::default()
    };
    if CUDA_THREADS.insert(tid, fresh, 0).is_err() {
        bump(counter::EVENTS_SEEN);
        bump(counter::LOST_MAP_FULL);
        return None;
    }
    CUDA_THREADS.get_ptr_mut(tid)
}

#[uprobe]
pub fn cuda_launch(ctx: ProbeContext) -> u32 {
    let id = cookie(&ctx);
    if !api::is_launch(id) {
        return 0;
    }
    let (tgid, tid) = current_tgid_tid();
    let Some(t) = thread_entry(tgid, tid) else {
        return 0;
    };
    // SAFETY: this thread's own map value (see `thread_entry`).
    let t = unsafe { &mut *t };
    // Re-read through a volatile so that the compiler keeps this bound check next to the index: it
    // knows `id < LAUNCH_COUNT` from above and would drop it, but the verifier tracks the index
    // register, not that earlier comparison.
    // SAFETY: reading a local.
    let slot = unsafe { core::ptr::read_volatile(&raw const id) } as usize;
    if slot >= api::LAUNCH_COUNT as usize {
        return 0;
    }
    if api::is_runtime(id) {
        t.rt_launch_ns = now();
        t.rt_launch_sp = stack_pointer(&ctx);
        t.launches[slot] += 1;
        if t.step_start_ns == 0 {
            t.step_start_ns = t.rt_launch_ns;
        }
        return 0;
    }
    if t.rt_launch_ns != 0 {
        // Nested: called from the runtime's own code when its range is known; else soon after the
        // thread's runtime entry and deeper on its stack (stacks grow down).
        // SAFETY: map value read.
        let nested = if let Some(text) = unsafe { CUDART_TEXT.get(tgid) } {
            let ra = return_address(&ctx);
            let r = &text.ranges;
            (ra >= r[0][0] && ra < r[0][1])
                || (ra >= r[1][0] && ra < r[1][1])
                || (ra >= r[2][0] && ra < r[2][1])
                || (ra >= r[3][0] && ra < r[3][1])
        } else {
            now().wrapping_sub(t.rt_launch_ns) < NEST_WINDOW_NS
                && stack_pointer(&ctx) < t.rt_launch_sp
        };
        t.rt_launch_ns = 0;
        if nested {
            t.nested += 1;
            return 0;
        }
    }
    t.launches[slot] += 1;
    if t.step_start_ns == 0 {
        t.step_start_ns = now();
    }
    0
}

#[inline(always)]
const fn level(id: u32) -> u64 {
    if api::is_runtime(id) {
        0
    } else {
        1
    }
}

/// Save a memory or sync call's arguments until it returns.
#[inline(always)]
fn save_entry(ctx: &ProbeContext, kind: EventKind, want_stack: bool) -> u32 {
    let id = cookie(ctx);
    let (tgid, tid) = current_tgid_tid();
    if !is_target(tgid) {
        return 0;
    }
    let key = (u64::from(tid) << 1) | level(id);
    // A driver call while this thread is inside a runtime call: the runtime's own call. (Entries
    // are deleted when their thread exits; the tgid test guards against one left by a thread that
    // died before the sched program was attached.)
    // SAFETY: map value read.
    let nested = level(id) == 1
        && unsafe { CUDA_PENDING.get(u64::from(tid) << 1) }.is_some_and(|p| p.header.tgid == tgid);
    let Some(e) = CUDA_SCRATCH.get_ptr_mut(0) else {
        return 0;
    };
    // SAFETY: per-CPU scratch slot; BPF programs are not preempted mid-run on a CPU.
    let e = unsafe { &mut *e };
    e.header = EventHeader {
        kind: kind as u32,
        tgid,
        tid,
        _pad: 0,
        ts_ns: 0,
    };
    e.api = id;
    e.result = 0;
    e.addr = ctx.arg::<u64>(0).unwrap_or(0);
    e.size = ctx.arg::<u64>(1).unwrap_or(0);
    e.aux = ctx.arg::<u64>(2).unwrap_or(0);
    e.aux2 = ctx.arg::<u64>(3).unwrap_or(0);
    e.enter_ns = now();
    e.nested = u32::from(nested);
    e.nframes = 0;
    if want_stack && !nested {
        // SAFETY: the helper writes at most the given size into the map value.
        let n = unsafe {
            bpf_get_stack(
                ctx.as_ptr(),
                e.stack.as_mut_ptr().cast(),
                (STACK_DEPTH * 8) as u32,
                u64::from(BPF_F_USER_STACK),
            )
        };
        // Frame 0 of the walk is the probed function itself; the caller's return address
        // replaces it (the frame-pointer walk from here skips the immediate caller).
        e.stack[0] = return_address(ctx);
        e.nframes = if n > 8 { (n / 8) as u32 } else { 1 };
    }
    if CUDA_PENDING.insert(key, &*e, 0).is_err() {
        bump(counter::EVENTS_SEEN);
        bump(counter::LOST_MAP_FULL);
    }
    0
}

#[uprobe]
pub fn cuda_mem_enter(ctx: ProbeContext) -> u32 {
    let id = cookie(&ctx);
    if !api::is_mem(id) {
        return 0;
    }
    save_entry(&ctx, EventKind::CudaMem, api::writes_out_ptr(id))
}

#[uretprobe]
pub fn cuda_mem_return(ctx: RetProbeContext) -> u32 {
    let id = cookie(&ctx);
    let (tgid, tid) = current_tgid_tid();
    let key = (u64::from(tid) << 1) | level(id);
    let Some(e) = CUDA_PENDING.get_ptr_mut(key) else {
        return 0;
    };
    // SAFETY: map value of this thread's pending call.
    let e = unsafe { &mut *e };
    if e.api == id && e.header.tgid == tgid {
        e.result = ctx.ret::<i32>();
        e.header.ts_ns = now();
        if e.result == 0 && api::writes_out_ptr(id) {
            // SAFETY: user-memory reads through the helper, which fails cleanly.
            e.addr = unsafe { bpf_probe_read_user(e.addr as *const u64) }.unwrap_or(0);
            if id == api::CU_MEM_ALLOC_PITCH {
                // cuMemAllocPitch_v2(dptr, size_t *pPitch, width, height, elementSize).
                let pitch = unsafe { bpf_probe_read_user(e.size as *const u64) }.unwrap_or(0);
                e.aux = pitch;
                e.size = pitch.wrapping_mul(e.aux2);
            }
        }
        if id == api::CU_MEM_CREATE
            || (api::is_mem(id) && !api::writes_out_ptr(id) && id != api::CU_MEM_MAP)
        {
            // Property pointers and stream handles mean nothing to the agent.
            e.aux = 0;
            e.aux2 = 0;
        }
        emit(e);
    }
    let _ = CUDA_PENDING.remove(key);
    0
}

#[uprobe]
pub fn cuda_sync_enter(ctx: ProbeContext) -> u32 {
    if !api::is_sync(cookie(&ctx)) {
        return 0;
    }
    save_entry(&ctx, EventKind::CudaSync, false)
}

#[uretprobe]
pub fn cuda_sync_return(ctx: RetProbeContext) -> u32 {
    let id = cookie(&ctx);
    let (tgid, tid) = current_tgid_tid();
    let key = (u64::from(tid) << 1) | level(id);
    // SAFETY: map value read (copied out below).
    let Some(p) = (unsafe { CUDA_PENDING.get(key) }) else {
        return 0;
    };
    let (api_seen, enter_ns, nested, owner) = (p.api, p.enter_ns, p.nested, p.header.tgid);
    let _ = CUDA_PENDING.remove(key);
    if api_seen != id || owner != tgid {
        return 0;
    }
    let mut ev = CudaSyncEvent {
        header: EventHeader {
            kind: EventKind::CudaSync as u32,
            tgid,
            tid,
            _pad: 0,
            ts_ns: now(),
        },
        api: id,
        result: ctx.ret::<i32>(),
        enter_ns,
        kernel_launches: 0,
        graph_launches: 0,
        nested,
        _pad: 0,
        step_start_ns: 0,
    };
    if let Some(t) = CUDA_THREADS.get_ptr_mut(tid) {
        // SAFETY: this thread's own map value.
        let t = unsafe { &mut *t };
        let l = &t.launches;
        ev.kernel_launches = l[0] + l[1] + l[2] + l[3] + l[4] + l[5] + l[6] + l[7];
        ev.graph_launches = l[8] + l[9] + l[10];
        if nested == 0 {
            ev.step_start_ns = t.step_start_ns;
            t.step_start_ns = 0;
        }
    }
    emit(&ev);
    0
}
