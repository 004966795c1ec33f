//! Where the threads of traced processes spend their time: on a CPU, runnable but waiting for one
//! (run-queue delay: CPU starvation, noisy neighbours, too few cores), or blocked (futex/GIL,
//! I/O, waiting on another process). From the raw tracepoints `sched_switch` (the CPU changes
//! hands) and `sched_wakeup` (a blocked thread becomes runnable); `sched.rs` closes a thread's
//! entry when it exits. `sched_waking` (in the waker's context, unlike `sched_wakeup`, which a
//! wake-up queued to an idle CPU fires there) notes which thread of the same process woke a
//! thread: the serving thread whose clock an IPC thread's hand-off is dated with
//! (`waker_clock`; failing one, the process's main thread's). (`sched_wakeup_new` is not
//! needed: a thread is counted from its first switch.)
//!
//! Raw tracepoints, not the classic ones: a classic tracepoint program is skipped whenever any
//! other kprobe/tracepoint program is running on that CPU (the kernel's global `bpf_prog_active`,
//! also held during the agent's own map syscalls), and one skipped switch-in left a running
//! thread marked runnable (its time counted as run-queue delay, its clock unknown). A raw
//! tracepoint program is skipped only if it is nested in itself. Their arguments are the
//! tracepoint's `TP_PROTO` ones (`task_struct` pointers), so entries are keyed by the task's
//! address, which the syscall programs also know (`bpf_get_current_task`); the thread id is kept
//! in the value for the agent.
//!
//! These fire for every task on the machine, so each program tests one map first: the current
//! process against `TARGETS` (`sched_switch`'s outgoing thread is the current task), or the
//! task against `THREADS` (incoming and woken threads). A thread enters `THREADS` the first
//! time it leaves a CPU; until then its time is not counted.

use aya_ebpf::{
    helpers::{bpf_get_current_task, bpf_ktime_get_ns, bpf_probe_read_kernel},
    macros::{map, raw_tracepoint},
    maps::{Array, HashMap, PerCpuArray},
    programs::RawTracePointContext,
};
use probe_common::{
    counter, floor, ThreadClock, ThreadTime, MAX_THREADS, TASK_LAYOUT_GROUP_LEADER,
    TASK_LAYOUT_LAST_ARRIVAL, TASK_LAYOUT_LEN, THREAD_BLOCKED, THREAD_EXITED, THREAD_ON_CPU,
    THREAD_RUNNABLE,
};

use crate::{bump, current_tgid_tid, is_target, slot_add, slot_open, ADDR_SLOTS};

/// Task address (`struct task_struct *`) → its scheduler time (read and pruned by the agent).
#[map]
pub static THREADS: HashMap<u64, ThreadTime> = HashMap::with_max_entries(MAX_THREADS, 0);

/// The counted filter (`crate::slot_add`) in front of `THREADS`: +1 when a live traced thread's
/// entry is added (its first switch-out), −1 when it exits (`exited`). `sched_switch` (the
/// incoming task), `sched_waking` and `sched_wakeup` look up tasks of the whole machine there,
/// and an untraced task leaves at this array read instead of a hash miss. A thread whose exit
/// was not seen (its process left the target set first) keeps its slot open; the count is never
/// below the live entries', and neither a switch-in nor a wake-up of a traced thread can come
/// between its entry and its +1 (both are made in its own switch-out, under the run queue's lock).
#[map]
static TASK_SLOTS: Array<u64> = Array::with_max_entries(ADDR_SLOTS, 0);

/// Whether `task` may have a `THREADS` entry.
#[inline(always)]
fn maybe_thread(task: u64) -> bool {
    slot_open(&TASK_SLOTS, task)
}

/// The current thread (`tid`) exits: the entry at its address is closed for the agent's last
/// read, and when it is its own, its slot count dropped. (Another thread's entry there is one
/// whose exit was not seen; it is closed all the same, so that the agent prunes it, and its +1
/// keeps the slot open.)
#[inline(always)]
pub fn exited(tid: u32, now: u64) {
    let task = current_task();
    if let Some(t) = THREADS.get_ptr_mut(task) {
        // SAFETY: a map value (benign races as above).
        let t = unsafe { &mut *t };
        if t.state != THREAD_EXITED {
            enter(t, THREAD_EXITED, now);
            if t.tid == tid {
                slot_add(&TASK_SLOTS, task, u64::MAX);
            }
        }
    }
}

/// Byte offsets in this kernel's `struct task_struct`, set by the agent from its BTF
/// (`probe_common::TASK_LAYOUT_*`; 0: unknown).
#[map]
pub static TASK_LAYOUT: Array<u64> = Array::with_max_entries(TASK_LAYOUT_LEN, 0);

/// Per CPU: `bpf_ktime_get_ns()` minus the run-queue clock that `sched_info` times are in, taken
/// at the switch-out of a thread whose switch-in was seen (0: not measured yet).
#[map]
static CLOCK_SKEW: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// A new skew sample may sit this far above the one kept and still replace it (the clocks drift
/// slowly); a sample further above comes from a switch-in that was not seen when it happened.
const SKEW_DRIFT_NS: i64 = 50_000;

/// `prev_state` bits that name a sleeping state (include/linux/sched.h, TASK_REPORT); none set
/// (or a preemption) means the thread stays runnable.
const TASK_REPORT: u64 = 0x7f;

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

/// The current task's address (the key of `THREADS`).
#[inline(always)]
pub fn current_task() -> u64 {
    // SAFETY: plain helper call.
    unsafe { bpf_get_current_task() }
}

/// The clock of the current thread (`tid` of `tgid`, running now: it is in a syscall) at `now`;
/// all zero when the thread is not known. One map lookup.
///
/// An entry that says runnable or blocked is wrong here: a switch-in or wake-up was not seen (a
/// race of the scheduler programs on two CPUs). It is repaired — the thread is on a CPU from
/// `now` — and counted (`counter::THREAD_REPAIRS`); the time since its last change stays in the
/// state it named.
#[inline(always)]
pub fn clock(tgid: u32, tid: u32, now: u64) -> ThreadClock {
    match own_entry(tgid, tid) {
        Some(t) => clock_of(t, now),
        None => ThreadClock::default(),
    }
}

/// The current thread's `THREADS` entry, when it has one that is its own.
#[inline(always)]
pub fn own_entry(tgid: u32, tid: u32) -> Option<&'static mut ThreadTime> {
    let t = THREADS.get_ptr_mut(current_task())?;
    // SAFETY: a map value; the running thread's own entry (the scheduler programs' benign races
    // as above).
    let t = unsafe { &mut *t };
    (t.tgid == tgid && t.tid == tid).then_some(t)
}

/// Stamp the start of the current thread's socket send in its own entry (the first call of a
/// send counts; `take_send` clears it). False when the thread has no entry — an untraced thread,
/// thread states off, or a traced thread that has not left a CPU yet — and the caller tests the
/// process and keeps the stamp in a map instead. An entry exists only for threads of traced
/// processes, so finding it is the process filter too (one lookup instead of two).
#[inline(always)]
pub fn stamp_send(tgid: u32, tid: u32) -> bool {
    let Some(t) = own_entry(tgid, tid) else {
        return false;
    };
    if t.send_start_ns == 0 {
        // SAFETY: plain helper call.
        let now = unsafe { bpf_ktime_get_ns() };
        t.send_clock = clock_of(t, now);
        t.send_start_ns = now;
    }
    true
}

/// The send stamp (time, clock) in the current thread's entry `t`, cleared; `None` when it has
/// none (then the thread may still be traced: the caller tests the process).
#[inline(always)]
pub fn take_send(t: &mut ThreadTime) -> Option<(u64, ThreadClock)> {
    if t.send_start_ns == 0 {
        return None;
    }
    let stamp = (t.send_start_ns, t.send_clock);
    t.send_start_ns = 0;
    Some(stamp)
}

/// For an IPC call at `ts` of the current thread (entry `t`, of `tgid`) that does not serve
/// client connections: the id and clock at `ts` of the thread of its process that last woke it,
/// when that one serves, else of the thread it last woke, when that one serves — the thread whose
/// work the call carries on (vLLM's event loop wakes one ZMQ I/O thread to send each request; the
/// other I/O thread receives EngineCore's outputs and wakes the loop for each) — else of its
/// process's main thread, when the caller is another thread (an engine process whose helper
/// threads do its socket I/O for a main thread that computes: vLLM's `EngineCore`). `None`
/// otherwise, or when that thread's entry changed state after `ts` or is stale (its clock then is
/// not known). That entry is read while its thread runs elsewhere: a torn read can only fail the
/// agent's check that a split adds up.
#[inline(always)]
pub fn waker_clock(t: &ThreadTime, tgid: u32, ts: u64) -> Option<(u32, ThreadClock)> {
    if t.serving != 0 {
        return None;
    }
    // The thread that handed this one work, else the one it hands results to (the thread it
    // last woke: vLLM's output-receiving ZMQ thread is never woken by the loop, it wakes it).
    clock_at(t.waker, tgid, ts, true)
        .or_else(|| clock_at(t.wakee, tgid, ts, true))
        .or_else(|| clock_at(main_thread()?, tgid, ts, false))
}

/// The task address of the current process's main thread (`task->group_leader`) when the current
/// thread is another one; `None` for the main thread itself or without the BTF offset.
#[inline(always)]
fn main_thread() -> Option<u64> {
    let off = *TASK_LAYOUT.get(TASK_LAYOUT_GROUP_LEADER)?;
    if off == 0 {
        return None;
    }
    let task = current_task();
    // SAFETY: the helper reads kernel memory and fails cleanly; `task` is the running task.
    let leader = unsafe { bpf_probe_read_kernel((task + off) as *const u64) }.ok()?;
    (leader != 0 && leader != task).then_some(leader)
}

/// The id and clock at `ts` of the thread of task address `task`, when it is a thread of `tgid`
/// (and serves, if `serving`) whose entry can say (see `waker_clock`).
#[inline(always)]
fn clock_at(task: u64, tgid: u32, ts: u64, serving: bool) -> Option<(u32, ThreadClock)> {
    if task == 0 {
        return None;
    }
    // SAFETY: a map value copied out at once.
    let w = unsafe { *THREADS.get_ptr(task)? };
    if w.tgid != tgid || (serving && w.serving == 0) || ts < w.since_ns {
        return None;
    }
    // Waiting per its entry, yet switched in since: a switch-in no program saw (the entry is
    // repaired only when its own thread reads it). Its clock is not known: no waker's clock.
    // The task's `last_arrival` moved since its switch-out says so exactly; without the value of
    // then, the skew-dated test stands in. Without `last_arrival` (no BTF offset) it is not
    // checked.
    if w.state != THREAD_ON_CPU && switched_in_since(task, &w) {
        return None;
    }
    let d = ts - w.since_ns;
    let mut c = ThreadClock {
        on_cpu_ns: w.on_cpu_ns,
        runnable_ns: w.runnable_ns,
        blocked_ns: w.blocked_ns,
        repairs: w.repairs,
        _pad: 0,
    };
    match w.state {
        THREAD_ON_CPU => c.on_cpu_ns += d,
        THREAD_RUNNABLE => c.runnable_ns += d,
        THREAD_BLOCKED => c.blocked_ns += d,
        _ => return None,
    }
    Some((w.tid, c))
}

/// `t`'s clock at `now`, `t` being the running thread's entry (see `clock`).
#[inline(always)]
pub fn clock_of(t: &mut ThreadTime, now: u64) -> ThreadClock {
    match t.state {
        THREAD_ON_CPU => {}
        THREAD_RUNNABLE | THREAD_BLOCKED => repair_switch_in(current_task(), t, now),
        _ => return ThreadClock::default(),
    }
    ThreadClock {
        on_cpu_ns: t.on_cpu_ns + now.saturating_sub(t.since_ns),
        runnable_ns: t.runnable_ns,
        blocked_ns: t.blocked_ns,
        repairs: t.repairs,
        _pad: 0,
    }
}

/// `t` was found in a state its thread could not be in: counted for all threads and in the
/// entry, whose clocks on either side of it are then not split (the agent compares the counts).
#[inline(always)]
fn repaired(t: &mut ThreadTime) {
    bump(counter::THREAD_REPAIRS);
    t.repairs = t.repairs.wrapping_add(1);
}

/// `t`, the entry of `task` running now, says runnable or blocked: its switch-in was not seen
/// (no tracepoint fires in the context of some tasks, docs/attribution.md). Counted for all
/// threads, and dated from the task's own `last_arrival` when it can be: the time before stays in
/// the state the entry named, the time after is on-CPU. A runnable entry dated so is exact and
/// keeps its clocks splittable. A blocked one is not — its wake-up was not seen either, so how
/// much of the wait was runnable is unknown — nor is an undated one (on-CPU from `now`): both are
/// counted in the entry, as `repaired` does.
#[inline(always)]
fn repair_switch_in(task: u64, t: &mut ThreadTime, now: u64) {
    let dated = unseen_switch_in(task, t.since_ns, now);
    if dated.is_some() && t.state == THREAD_RUNNABLE {
        bump(counter::THREAD_REPAIRS);
    } else {
        repaired(t);
    }
    enter(t, THREAD_ON_CPU, dated.unwrap_or(now));
}

/// The run-queue clock of `task`'s last switch-in (`sched_info.last_arrival`), when known.
#[inline(always)]
fn last_arrival(task: u64) -> Option<u64> {
    let off = *TASK_LAYOUT.get(TASK_LAYOUT_LAST_ARRIVAL)?;
    if off == 0 {
        return None;
    }
    // SAFETY: the helper reads kernel memory and fails cleanly; `task` is a live task (the
    // running one).
    let at = unsafe { bpf_probe_read_kernel((task + off) as *const u64) }.ok()?;
    (at != 0).then_some(at)
}

/// Whether waiting `task` (entry `w`) was switched in after its entry's last change: its
/// `last_arrival` differs from the one its switch-out kept. An entry that kept none (it entered
/// its state at a wake-up, or before the switch-out kept one) is dated by this CPU's skew, which
/// can only be trusted beyond the skew's error (`SKEW_DRIFT_NS`, and the CPUs' rq clocks differ).
#[inline(always)]
fn switched_in_since(task: u64, w: &ThreadTime) -> bool {
    if w.arrival != 0 {
        return last_arrival(task).is_some_and(|at| at != w.arrival);
    }
    unseen_switch_in(task, w.since_ns, u64::MAX)
        .is_some_and(|at| at - w.since_ns > SKEW_DRIFT_NS as u64)
}

/// When the running `task` was switched in, from its `last_arrival` and this CPU's skew, if that
/// falls between its entry's last change (`since_ns`) and `now`.
#[inline(always)]
fn unseen_switch_in(task: u64, since_ns: u64, now: u64) -> Option<u64> {
    let skew = *CLOCK_SKEW.get(0)?;
    if skew == 0 {
        return None;
    }
    let at = last_arrival(task)?.wrapping_add(skew);
    (since_ns <= at && at <= now).then_some(at)
}

/// Learn this CPU's skew from `task` leaving it after a seen switch-in at `since_ns`: its
/// `last_arrival` is the run-queue clock read a little earlier in the same `__schedule`. The
/// smallest sample wins, but one up to `SKEW_DRIFT_NS` above replaces it too.
/// Returns the `last_arrival` read (0: not known), kept in the entry (`ThreadTime::arrival`).
#[inline(always)]
fn calibrate(task: u64, since_ns: u64) -> u64 {
    let Some(at) = last_arrival(task) else {
        return 0;
    };
    let Some(skew) = CLOCK_SKEW.get_ptr_mut(0) else {
        return at;
    };
    let sample = since_ns.wrapping_sub(at);
    // SAFETY: this CPU's slot; programs do not preempt each other on a CPU mid-update.
    let skew = unsafe { &mut *skew };
    if *skew == 0 || (sample.wrapping_sub(*skew) as i64) < SKEW_DRIFT_NS {
        *skew = sample;
    }
    at
}

/// `TP_PROTO(bool preempt, struct task_struct *prev, struct task_struct *next,
/// unsigned int prev_state)` (Linux 5.18+; older kernels refuse the attach: no thread states).
#[raw_tracepoint(tracepoint = "sched_switch")]
pub fn sched_switch(ctx: RawTracePointContext) -> u32 {
    if crate::bench_floor() != floor::OFF {
        return 0;
    }
    let (tgid, tid) = current_tgid_tid();
    // Read once a thread of the switch is known to be traced (both ends share it): the clock
    // is not free in a VM, and most switches on a node are of untraced tasks.
    let mut now = 0;
    if is_target(tgid) && tid != 0 {
        // SAFETY: plain helper call.
        now = unsafe { bpf_ktime_get_ns() };
        let preempt: u64 = ctx.arg(0);
        let prev: u64 = ctx.arg(1);
        let prev_state: u64 = ctx.arg(3);
        let next = if preempt & 1 != 0 || prev_state & TASK_REPORT == 0 {
            THREAD_RUNNABLE
        } else {
            THREAD_BLOCKED
        };
        match THREADS.get_ptr_mut(prev) {
            // SAFETY: a map value; concurrent updates of one thread's entry are benign races
            // on plain counters.
            Some(t) if unsafe { (*t).tgid == tgid && (*t).tid == tid } => {
                // SAFETY: as above.
                let t = unsafe { &mut *t };
                // An exited entry is the thread's last switch-out, after `sched_process_exit`
                // closed it: it stays closed for the agent's last read. (Replacing it, as a new
                // thread's, left a dead thread runnable, then on a CPU once another task took
                // its address: its time grew for good.)
                if t.state != THREAD_EXITED {
                    if t.state == THREAD_ON_CPU {
                        t.arrival = calibrate(prev, t.since_ns);
                    } else {
                        // Leaving a CPU it was not known to be on: its last switch-in was not
                        // seen.
                        repair_switch_in(prev, t, now);
                        t.arrival = last_arrival(prev).unwrap_or(0);
                    }
                    enter(t, next, now);
                }
            }
            // New, or a reused task address whose old entry the agent has not pruned yet.
            _ => {
                let t = ThreadTime {
                    tgid,
                    tid,
                    state: next,
                    since_ns: now,
                    arrival: last_arrival(prev).unwrap_or(0),
                    ..ThreadTime::default()
                };
                // A full map (MAX_THREADS) leaves the thread uncounted; the agent sees the map at
                // capacity and says so.
                if THREADS.insert(prev, t, 0).is_ok() {
                    slot_add(&TASK_SLOTS, prev, 1);
                }
            }
        }
    }
    let next_task: u64 = ctx.arg(2);
    if !maybe_thread(next_task) {
        return 0;
    }
    if let Some(t) = THREADS.get_ptr_mut(next_task) {
        if now == 0 {
            // SAFETY: plain helper call.
            now = unsafe { bpf_ktime_get_ns() };
        }
        // SAFETY: as above.
        let t = unsafe { &mut *t };
        if t.state == THREAD_ON_CPU {
            // Already on a CPU: its last switch-out was not seen.
            repaired(t);
        }
        // An exited thread's entry stays as it is (`enter`): another task took its address.
        enter(t, THREAD_ON_CPU, now);
    }
    0
}

/// `TP_PROTO(struct task_struct *p)`, in the waker's context: a traced thread woken by another
/// thread of its process keeps the waker's task address (`ThreadTime::waker`), and the waker
/// the woken one's (`ThreadTime::wakee`). One `THREADS`
/// lookup for every wake-up on the machine, a miss for untraced tasks. A wake-up from an
/// interrupt names the interrupted task: when that is another thread of the process, an IPC
/// call may name a thread that did not hand it the work, and its split fails the agent's
/// same-thread test (no split, never a wrong one).
#[raw_tracepoint(tracepoint = "sched_waking")]
pub fn sched_waking(ctx: RawTracePointContext) -> u32 {
    if crate::bench_floor() != floor::OFF {
        return 0;
    }
    let task: u64 = ctx.arg(0);
    if !maybe_thread(task) {
        return 0;
    }
    let Some(t) = THREADS.get_ptr_mut(task) else {
        return 0;
    };
    let waker = current_task();
    let (tgid, _) = current_tgid_tid();
    // SAFETY: the map value as above.
    if unsafe { (*t).tgid } != tgid || waker == task {
        return 0;
    }
    // SAFETY: as above.
    unsafe { (*t).waker = waker };
    // The waker runs now: an entry of its that says otherwise missed a switch-in, and another
    // thread's call dated on its clock (`waker_clock`) would take the stale state. Repaired here
    // as its own calls repair it.
    if let Some(w) = THREADS.get_ptr_mut(waker) {
        // SAFETY: as above.
        let w = unsafe { &mut *w };
        if w.tgid == tgid {
            w.wakee = task;
            if w.state == THREAD_RUNNABLE || w.state == THREAD_BLOCKED {
                // SAFETY: plain helper call.
                repair_switch_in(waker, w, unsafe { bpf_ktime_get_ns() });
            }
        }
    }
    0
}

/// `TP_PROTO(struct task_struct *p)`.
#[raw_tracepoint(tracepoint = "sched_wakeup")]
pub fn sched_wakeup(ctx: RawTracePointContext) -> u32 {
    if crate::bench_floor() != floor::OFF {
        return 0;
    }
    let task: u64 = ctx.arg(0);
    if !maybe_thread(task) {
        return 0;
    }
    if let Some(t) = THREADS.get_ptr_mut(task) {
        // SAFETY: plain helper call; the map value as above.
        unsafe {
            if (*t).state == THREAD_BLOCKED {
                enter(&mut *t, THREAD_RUNNABLE, bpf_ktime_get_ns());
            }
        }
    }
    0
}
