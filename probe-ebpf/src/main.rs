//! llm-probe's kernel programs. Maps and shared helpers live here; each probe family has its file:
//! `sockio.rs` (the traced server's socket I/O from `sock:` tracepoints, the default capture path)
//! and `http.rs` (the same from syscall tracepoints, the fallback), both copying through
//! `capture.rs`; `arrival.rs` (when request bytes reach the socket), `sched.rs` (process tree of
//! the targets), `threads.rs` (on-CPU / runnable / blocked time of their threads), `cuda.rs`
//! (CUDA driver/runtime uprobes), `ssl.rs` (OpenSSL plaintext uprobes).
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]
// `atomic_xadd` (`slot_add`): the BPF target lacks atomic read-modify-write methods.
#![cfg_attr(target_arch = "bpf", feature(core_intrinsics))]
#![cfg_attr(target_arch = "bpf", allow(internal_features))]
// On the host (a `cargo build --workspace`) this is an empty program; the real build targets
// bpfel-unknown-none through probe-user/build.rs.
#![cfg_attr(not(target_arch = "bpf"), allow(dead_code, unused_imports))]

mod arrival;
mod capture;
mod cuda;
mod http;
mod sched;
mod sockio;
mod ssl;
mod threads;

use aya_ebpf::{
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns},
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf},
    programs::TracePointContext,
    EbpfContext,
};
use probe_common::{
    counter, ConnEvent, ConnKey, EventHeader, EventKind, PendingIo, MAX_CAPTURE, MAX_CONNS,
    MAX_PENDING, MAX_TARGETS, RING_BYTES, TARGET_SLOTS, WAKEUP_BYTES,
};

/// A `probe_common::floor` value, set by the agent at load (`--bench-floor`). Read-only data:
/// the verifier knows its value and drops the code it rules out (a floor's programs translate to
/// a few instructions); under `floor::OFF` the test stays, a load and a compare.
#[no_mangle]
static BENCH_FLOOR: u32 = probe_common::floor::OFF;

/// The benchmark floor in force (`BENCH_FLOOR`).
#[inline(always)]
pub fn bench_floor() -> u32 {
    // SAFETY: a plain read of a global; volatile so that the compiler does not fold the
    // initial value in (the agent rewrites it at load).
    unsafe { core::ptr::read_volatile(&raw const BENCH_FLOOR) }
}

/// Processes being traced (tgid → 1). Seeded by the agent, extended by `sched.rs` on fork.
#[map]
static TARGETS: HashMap<u32, u32> = HashMap::with_max_entries(MAX_TARGETS, 0);

/// A filter in front of `TARGETS`, slot `probe_common::target_slot(tgid)`: 1 when a traced
/// process may map to it. Set before a `TARGETS` insert (by the agent, and by `sched.rs` on
/// fork), cleared only by the agent, for slots no traced process maps to any more. Every program
/// runs for the whole machine; this makes an untraced process's early exit an array read.
#[map]
static TGID_SLOTS: Array<u32> = Array::with_max_entries(TARGET_SLOTS, 0);

/// Server-side sockets of traced processes: accepted ones (added in the kernel) and the ones that
/// were open before attach (added by the agent from /proc). Values: `probe_common::CONN_*` (the
/// `sock:` path keeps the connection's `struct sock *` here). LRU so that a missed close can never
/// fill the map for good.
#[map]
static CONNS: LruHashMap<ConnKey, u64> = LruHashMap::with_max_entries(MAX_CONNS, 0);

/// Arguments of a read/write in flight, keyed by thread id, from sys_enter to sys_exit. A plain
/// preallocated hash: LRU update+delete cost 2.9 % of all CPU samples in the overhead benchmark.
/// A thread's next syscall overwrites its entry, so only threads that die inside a traced syscall
/// leave one behind; a full map is counted (`LOST_MAP_FULL`).
#[map]
static PENDING: HashMap<u32, PendingIo> = HashMap::with_max_entries(MAX_PENDING, 0);

/// Every record for the agent. Wakeups are batched (see `submit_flags`).
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(RING_BYTES, 0);

/// Per-CPU counters indexed by `probe_common::counter::*`, summed by the agent at scrape time.
#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::COUNT, 0);

/// Scratch space for a data record: header + payload. Three times `MAX_CAPTURE` of payload room lets
/// the verifier accept `offset & (MAX_CAPTURE-1)` + `length & (2*MAX_CAPTURE-1)` (masks it can follow).
pub const SCRATCH_BYTES: usize = 128 + 3 * MAX_CAPTURE;
const _: () = assert!(size_of::<probe_common::DataEvent>() + 3 * MAX_CAPTURE <= SCRATCH_BYTES);
#[repr(C, align(8))]
pub struct Scratch {
    pub bytes: [u8; SCRATCH_BYTES],
}
#[map]
static SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);

#[inline(always)]
fn current_tgid_tid() -> (u32, u32) {
    let id = bpf_get_current_pid_tgid();
    ((id >> 32) as u32, id as u32)
}

/// True when `tgid` is traced. Called first thing in every program.
#[inline(always)]
fn is_target(tgid: u32) -> bool {
    maybe_target(tgid) && in_targets(tgid)
}

/// The `TARGETS` lookup alone, for a caller that passed `maybe_target` already.
#[inline(always)]
fn in_targets(tgid: u32) -> bool {
    // SAFETY: the value is only tested for presence, never read.
    unsafe { TARGETS.get(tgid).is_some() }
}

/// False when `tgid` is certainly not traced (its `TGID_SLOTS` slot is clear).
#[inline(always)]
fn maybe_target(tgid: u32) -> bool {
    TGID_SLOTS
        .get(probe_common::target_slot(tgid))
        .is_some_and(|v| *v != 0)
}

/// Mark `tgid`'s slot before it enters `TARGETS` (a plain store of 1: no race to lose).
#[inline(always)]
fn mark_target_slot(tgid: u32) {
    if let Some(v) = TGID_SLOTS.get_ptr_mut(probe_common::target_slot(tgid)) {
        // SAFETY: an array slot; every writer stores 1 here, only the agent stores 0.
        unsafe { *v = 1 };
    }
}

/// Slots of a counted address filter (`arrival::SOCK_SLOTS`, `threads::TASK_SLOTS`): an array
/// of `u64` counters in front of a hash map keyed by a kernel address, slot `addr_slot(addr)`
/// holding how many of the map's keys were added under it and not removed (0: none). Only the
/// kernel writes one, with atomic adds: +1 after an insert that added its key, −1 after the key
/// left, so a slot's count is never below its keys' and a miss in the map becomes an array read
/// (which the verifier inlines). A count that stays too high (a key that left unseen) only keeps
/// its slot open.
const ADDR_SLOTS: u32 = 1 << 16;

/// The counted-filter slot of a kernel address: its high bits mixed by a multiplicative hash
/// (objects of one slab share their low bits).
#[inline(always)]
fn addr_slot(addr: u64) -> u32 {
    ((addr >> 6).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 48) as u32 & (ADDR_SLOTS - 1)
}

/// Add `delta` (`u64::MAX`: −1) to `addr`'s slot in `slots`.
#[inline(always)]
fn slot_add(slots: &Array<u64>, addr: u64, delta: u64) {
    if let Some(p) = slots.get_ptr_mut(addr_slot(addr)) {
        // SAFETY: an array value, 8-aligned, updated by every CPU only through atomic adds (the
        // BPF target has no `AtomicU64::fetch_add`; the intrinsic is the instruction it lowers
        // to; the host build, an empty program, takes the method).
        #[cfg(target_arch = "bpf")]
        unsafe {
            core::intrinsics::atomic_xadd::<u64, u64, { core::intrinsics::AtomicOrdering::Relaxed }>(
                p, delta,
            )
        };
        #[cfg(not(target_arch = "bpf"))]
        unsafe { core::sync::atomic::AtomicU64::from_ptr(p) }
            .fetch_add(delta, core::sync::atomic::Ordering::Relaxed);
    }
}

/// False when no key of the map behind `slots` can be `addr`.
#[inline(always)]
fn slot_open(slots: &Array<u64>, addr: u64) -> bool {
    slots.get(addr_slot(addr)).is_some_and(|n| *n != 0)
}

#[inline(always)]
fn bump(index: u32) {
    if let Some(p) = COUNTERS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, and BPF programs are not preempted on the same CPU mid-update.
        unsafe { *p += 1 };
    }
}

/// Wake the agent once, when the bytes waiting cross `WAKEUP_BYTES`; otherwise it drains on its
/// timer. Waking on every record above the threshold (until the agent runs) cost an irq_work per
/// record under load.
#[inline(always)]
fn submit_flags(len: u64) -> u64 {
    let avail = EVENTS.query(u64::from(BPF_RB_AVAIL_DATA));
    if avail < WAKEUP_BYTES && avail + len >= WAKEUP_BYTES {
        u64::from(BPF_RB_FORCE_WAKEUP)
    } else {
        u64::from(BPF_RB_NO_WAKEUP)
    }
}

/// The header of a record of `kind` from the current task, stamped now.
#[inline(always)]
fn header_now(kind: EventKind, tgid: u32, tid: u32) -> EventHeader {
    EventHeader {
        kind: kind as u32,
        tgid,
        tid,
        _pad: 0,
        // SAFETY: plain helper call.
        ts_ns: unsafe { bpf_ktime_get_ns() },
    }
}

/// Deliver a fixed-size record, counting it as seen and, when the ring is full, as lost.
#[inline(always)]
fn emit<T>(record: &T) {
    bump(counter::EVENTS_SEEN);
    if EVENTS
        .output::<T>(record, submit_flags(core::mem::size_of::<T>() as u64))
        .is_err()
    {
        bump(counter::LOST_RINGBUF_FULL);
    }
}

/// A fixed-offset field of a tracepoint record. The offsets are `probe_common::tracepoint`'s,
/// checked by the agent against the running kernel's format files before a program that reads
/// them is attached.
#[inline(always)]
fn field<T: Copy>(ctx: &TracePointContext, off: usize) -> T {
    // SAFETY: an offset inside the record (checked as above); the verifier checks ctx accesses.
    unsafe { *ctx.as_ptr().cast::<u8>().add(off).cast::<T>() }
}

/// An accept or close of a tracked connection, stamped now.
#[inline(always)]
fn emit_conn(kind: EventKind, tgid: u32, tid: u32, fd: u32) {
    emit(&ConnEvent {
        header: header_now(kind, tgid, tid),
        fd,
        _pad: 0,
    });
}

#[cfg(not(target_arch = "bpf"))]
fn main() {}

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[cfg(target_arch = "bpf")]
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
