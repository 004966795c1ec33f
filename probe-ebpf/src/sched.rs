//! Process tree of the targets: children forked after attach are traced too (vLLM's API server and
//! engine core are separate processes), and exits are reported. Field offsets are
//! `probe_common::tracepoint`'s, checked by the agent against the running kernel's format files.

use aya_ebpf::{macros::tracepoint, programs::TracePointContext};
use probe_common::{counter, tracepoint as tp, EventKind, ProcEvent};

use crate::{
    bump, cuda::CUDA_PENDING, current_tgid_tid, emit, field, header_now, is_target,
    mark_target_slot, threads, TARGETS,
};

/// include/uapi/linux/sched.h
const CLONE_THREAD: u64 = 0x0001_0000;

fn proc_event(kind: EventKind, tgid: u32, tid: u32, other: u32) -> ProcEvent {
    ProcEvent {
        header: header_now(kind, tgid, tid),
        other,
        _pad: 0,
    }
}

/// `task:task_newtask` runs in the parent; a new thread group (no CLONE_THREAD) is a new process.
#[tracepoint]
pub fn task_newtask(ctx: TracePointContext) -> u32 {
    let (tgid, tid) = current_tgid_tid();
    if !is_target(tgid) {
        return 0;
    }
    let flags: u64 = field(&ctx, tp::NEWTASK_CLONE_FLAGS.offset);
    if flags & CLONE_THREAD != 0 {
        return 0;
    }
    let child: i32 = field(&ctx, tp::NEWTASK_PID.offset);
    let child = child as u32;
    mark_target_slot(child);
    if TARGETS.insert(child, 1, 0).is_err() {
        bump(counter::EVENTS_SEEN);
        bump(counter::LOST_MAP_FULL);
    }
    emit(&proc_event(EventKind::Fork, tgid, tid, child));
    0
}

/// `sched:sched_process_exit` fires per thread; `group_dead` marks the last one of the process.
#[tracepoint]
pub fn sched_process_exit(ctx: TracePointContext) -> u32 {
    let (tgid, tid) = current_tgid_tid();
    if !is_target(tgid) {
        return 0;
    }
    // A thread that dies inside a probed CUDA call (the process killed during a sync) leaves its
    // pending entry; a later thread with the same id would read it as its own.
    let _ = CUDA_PENDING.remove(u64::from(tid) << 1);
    let _ = CUDA_PENDING.remove((u64::from(tid) << 1) | 1);
    // The thread's scheduler time ends here; the agent reads the entry once more, then drops it.
    // SAFETY: plain helper call.
    threads::exited(tid, unsafe { aya_ebpf::helpers::bpf_ktime_get_ns() });
    let group_dead: u8 = field(&ctx, tp::EXIT_GROUP_DEAD.offset);
    if group_dead == 0 {
        return 0;
    }
    let _ = TARGETS.remove(tgid);
    emit(&proc_event(EventKind::Exit, tgid, tid, 0));
    0
}
