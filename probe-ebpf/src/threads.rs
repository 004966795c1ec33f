//! Where the threads of traced processes spend their time: on a CPU, runnable but waiting for one
//! (run-queue delay: CPU starvation, noisy neighbours, too few cores), or blocked (futex/GIL,
//! I/O, waiting on another process). From `sched:sched_switch` (the CPU changes hands) and
//! `sched:sched_wakeup` (a blocked thread becomes runnable); `sched.rs` closes a thread's entry
//! when it exits. (`sched_wakeup_new` is not needed: a thread is counted from its first switch.)
//!
//! These fire for every task on the machine, so each program tests one map first: the current
//! process against `TARGETS` (`sched_switch`'s outgoing thread is the current task), or the
//! thread id against `THREADS` (incoming and woken threads). A thread enters `THREADS` the first
//! time it leaves a CPU; until then its time is not counted.

use aya_ebpf::{
    helpers::bpf_ktime_get_ns,
    macros::{map, tracepoint},
    maps::HashMap,
    programs::TracePointContext,
};
use probe_common::{
    tracepoint as tp, ThreadClock, ThreadTime, MAX_THREADS, THREAD_BLOCKED, THREAD_EXITED,
    THREAD_ON_CPU, THREAD_RUNNABLE,
};

use crate::{current_tgid_tid, field, is_target};

/// Thread id → its scheduler time (read and pruned by the agent).
#[map]
pub static THREADS: HashMap<u32, ThreadTime> = HashMap::with_max_entries(MAX_THREADS, 0);

/// `prev_state` bits that name a sleeping state; none set means the thread was preempted (or
/// yielded) and stays runnable (include/linux/sched.h, TASK_REPORT).
const TASK_REPORT_MASK: i64 = 0xff;

/// Close the interval `t` has been in since `since_ns` and start `state` at `now`.
#[inline(always)]
pub fn enter(t: &mut ThreadTime, state: u32, now: u64) {
    let spent = now.saturating_sub(t.since_ns);
    match t.state {
        THREAD_ON_CPU => t.on_cpu_ns += spent,
        THREAD_RUNNABLE => t.runnable_ns += spent,
        THREAD_BLOCKED => t.blocked_ns += spent,
        _ => return,
    }
    t.state = state;
    t.since_ns = now;
}

/// The clock of thread `tid` of `tgid`, running now (it is in a syscall), at `now`; all zero when
/// the thread is not known. One map lookup.
#[inline(always)]
pub fn clock(tgid: u32, tid: u32, now: u64) -> ThreadClock {
    // SAFETY: a map value read at once; a concurrent update of the same thread cannot happen (the
    // thread is running here) except by `sched_wakeup` of a blocked thread, which it is not.
    match unsafe { THREADS.get(tid) } {
        Some(t) if t.tgid == tgid && t.state == THREAD_ON_CPU => ThreadClock {
            on_cpu_ns: t.on_cpu_ns + now.saturating_sub(t.since_ns),
            runnable_ns: t.runnable_ns,
            blocked_ns: t.blocked_ns,
        },
        _ => ThreadClock::default(),
    }
}

#[tracepoint]
pub fn sched_switch(ctx: TracePointContext) -> u32 {
    // SAFETY: plain helper call.
    let now = unsafe { bpf_ktime_get_ns() };
    let (tgid, tid) = current_tgid_tid();
    if is_target(tgid) && tid != 0 {
        let prev_state: i64 = field(&ctx, tp::SWITCH_PREV_STATE.offset);
        let next = if prev_state & TASK_REPORT_MASK == 0 {
            THREAD_RUNNABLE
        } else {
            THREAD_BLOCKED
        };
        match THREADS.get_ptr_mut(tid) {
            // SAFETY: a map value; concurrent updates of one thread's entry are benign races
            // on plain counters.
            Some(t) if unsafe { (*t).tgid == tgid && (*t).state != THREAD_EXITED } => {
                enter(unsafe { &mut *t }, next, now);
            }
            // New, or a reused thread id whose old entry the agent has not pruned yet.
            _ => {
                let t = ThreadTime {
                    tgid,
                    state: next,
                    since_ns: now,
                    ..ThreadTime::default()
                };
                // A full map (MAX_THREADS) leaves the thread uncounted; the agent sees the map at
                // capacity and says so.
                let _ = THREADS.insert(tid, t, 0);
            }
        }
    }
    let next_pid: i32 = field(&ctx, tp::SWITCH_NEXT_PID.offset);
    if let Some(t) = THREADS.get_ptr_mut(next_pid as u32) {
        // SAFETY: as above.
        enter(unsafe { &mut *t }, THREAD_ON_CPU, now);
    }
    0
}

#[tracepoint]
pub fn sched_wakeup(ctx: TracePointContext) -> u32 {
    let pid: i32 = field(&ctx, tp::WAKEUP_PID.offset);
    if let Some(t) = THREADS.get_ptr_mut(pid as u32) {
        // SAFETY: plain helper call; the map value as above.
        unsafe {
            if (*t).state == THREAD_BLOCKED {
                enter(&mut *t, THREAD_RUNNABLE, bpf_ktime_get_ns());
            }
        }
    }
    0
}
