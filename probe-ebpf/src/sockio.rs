//! Server-side socket I/O of traced processes from `sock:` tracepoints — the default capture path.
//! All three programs are raw tracepoints (`TP_PROTO` arguments; see `sock_recv_data`).
//!
//! The syscall path (`http.rs`) enables `syscalls:sys_{enter,exit}_*`, and any enabled syscall
//! tracepoint puts *every* task on the machine on the syscall slow path: bystanders paid +32 % on
//! `getppid` and +145 % on a `write` to /dev/null (docs/BENCHMARKS.md). These tracepoints fire only
//! inside socket calls:
//! - `sock:sock_recv_length` / `sock:sock_send_length` (end of `sock_recvmsg`/`sock_sendmsg`, in
//!   the calling thread) give the socket and the bytes moved; the fd, the buffer and the syscall
//!   come from the thread's saved user registers (`bpf_task_pt_regs`, x86-64 ABI in
//!   `probe_common::regs`). The buffer is read before the syscall returns, as on the syscall path.
//! - `tcp:tcp_sendmsg_locked` (before TCP queues the first byte) stamps a response write: the
//!   bytes reach the peer inside the call, and a woken reader can preempt the writer before the
//!   call ends, so the end is too late (the syscall path stamps at entry for the same reason).
//!
//! Other sockets of a traced process (IPC to the engine's other processes, outbound calls) are
//! reported by time, direction, size, the calling thread's clock and their first bytes
//! (`IpcData`, searched by the agent for request ids only): the hand-off points that split a
//! request's time between the front end and the engine (docs/attribution.md).
//!
//! Connections: no accept or close syscall is seen. A socket that became ESTABLISHED on a port a
//! traced server listens on (`arrival::SERVER_SOCKS`) is admitted on its first read or write
//! (an `Accept` record then goes first); `CONNS` keeps its `struct sock *` so that a reused fd is
//! told apart. `arrival.rs` reports the close when the server's own close moves the socket to
//! FIN_WAIT1 or LAST_ACK.

use aya_ebpf::{
    bindings::{BPF_NOEXIST, BPF_RB_NO_WAKEUP},
    helpers::{
        bpf_get_current_task_btf, bpf_ktime_get_ns, bpf_probe_read_kernel, bpf_task_pt_regs,
    },
    macros::{map, raw_tracepoint},
    maps::{HashMap, LruHashMap, PerCpuArray},
    programs::RawTracePointContext,
};
use probe_common::{
    counter, floor, regs, ConnKey, DataEvent, EventKind, PendingIo, ThreadClock, CONN_IGNORED,
    CONN_SK_UNKNOWN, DIR_EGRESS, DIR_INGRESS, MAX_CONNS, MAX_PENDING, SYSCALL_OTHER, SYSCALL_READ,
    SYSCALL_READV, SYSCALL_RECVFROM, SYSCALL_RECVMSG, SYSCALL_SENDMSG, SYSCALL_SENDTO,
    SYSCALL_WRITE, SYSCALL_WRITEV,
};

use crate::{
    arrival::{add_server_sock, emit_arrivals, is_server_sock, ARRIVAL},
    bump,
    capture::{emit_data, emit_small, msghdr_iov, Meta},
    current_tgid_tid, emit_conn, header_now, in_targets, is_target, maybe_target, threads, CONNS,
    EVENTS,
};

const EAGAIN: i32 = 11;
const EINTR: i32 = 4;
/// include/linux/socket.h
const MSG_PEEK: i32 = 2;

/// Thread id → when its socket send started queueing bytes (first `tcp_sendmsg_locked` of the
/// call) and the thread's clock then, consumed by `sock_send_data` at the end of the same call —
/// for threads without a `THREADS` entry (thread states off; a thread not yet switched out), whose
/// entry holds the stamp otherwise (`threads::stamp_send`: a field write instead of a hash
/// insert, lookup and delete per send).
#[map]
static SEND_START: HashMap<u32, SendStart> = HashMap::with_max_entries(MAX_PENDING, 0);

/// When a send began, and the sending thread's clock then.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct SendStart {
    ts_ns: u64,
    thread: ThreadClock,
}

/// A call's description and result on their way to the capture code (see `capture_via_slot`).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct IoDesc {
    io: PendingIo,
    ret: i64,
    /// The record's `EventKind`.
    kind: u32,
    _pad: u32,
}

/// One slot per CPU for `IoDesc`.
#[map]
static IO_DESC: PerCpuArray<IoDesc> = PerCpuArray::with_max_entries(1, 0);

/// `struct sock *` → the connection it was admitted as, for reporting its close.
#[map]
pub static SOCK_CONN: LruHashMap<u64, ConnKey> = LruHashMap::with_max_entries(MAX_CONNS, 0);

/// The calling thread's syscall as its saved user registers show it: `[dx, si, di, orig_ax]` =
/// third, second, first argument and the syscall number.
#[inline(always)]
fn user_regs() -> Option<[u64; 4]> {
    // SAFETY: helper calls; the pt_regs pointer is read only through the checked helper.
    unsafe {
        let task = bpf_get_current_task_btf();
        let regs = bpf_task_pt_regs(task) as u64;
        if regs == 0 {
            return None;
        }
        bpf_probe_read_kernel((regs + regs::PT_REGS_DX as u64) as *const [u64; 4]).ok()
    }
}

/// Where the syscall in `r` keeps its buffer, as the capture code wants it.
#[inline(always)]
fn describe(r: &[u64; 4], dir: u32, sk: u64) -> PendingIo {
    let [count, arg1, fd, nr] = *r;
    let mut p = PendingIo {
        buf: arg1,
        iovcnt: 0,
        fd: fd as u32,
        syscall: SYSCALL_OTHER,
        dir,
        sk,
        enter_ns: 0,
        thread: ThreadClock::default(),
    };
    let (plain, iov, msg) = if dir == DIR_EGRESS {
        (
            match nr {
                regs::NR_WRITE => SYSCALL_WRITE,
                regs::NR_SENDTO => SYSCALL_SENDTO,
                _ => SYSCALL_OTHER,
            },
            nr == regs::NR_WRITEV,
            nr == regs::NR_SENDMSG,
        )
    } else {
        (
            match nr {
                regs::NR_READ => SYSCALL_READ,
                regs::NR_RECVFROM => SYSCALL_RECVFROM,
                _ => SYSCALL_OTHER,
            },
            nr == regs::NR_READV,
            nr == regs::NR_RECVMSG,
        )
    };
    if plain != SYSCALL_OTHER {
        p.syscall = plain;
    } else if iov {
        p.syscall = if dir == DIR_EGRESS {
            SYSCALL_WRITEV
        } else {
            SYSCALL_READV
        };
        p.iovcnt = count as u32;
    } else if msg {
        p.syscall = if dir == DIR_EGRESS {
            SYSCALL_SENDMSG
        } else {
            SYSCALL_RECVMSG
        };
        match msghdr_iov(arg1) {
            Some((v, n)) => {
                p.buf = v;
                p.iovcnt = n;
            }
            None => p.buf = 0,
        }
    } else {
        // sendfile, splice, sendmmsg, recvmmsg, io_uring: the bytes are counted, not read.
        p.buf = 0;
    }
    p
}

/// Copy `p`, the record's time and `ret` through a per-CPU map slot and capture from the copy.
/// The verifier knows nothing of map contents, so the capture code is verified once, not once
/// per kind of buffer (`describe`'s branches) and time source (egress failed with E2BIG, over a
/// million instructions processed, without this); and the compiler cannot drop the length masks
/// the verifier needs by proving them redundant from what it knows of `ret` (it did: "R2 min
/// value is negative").
/// `ssl` ≠ 0: plaintext of that `SSL *` (`ssl.rs`), which copies through here for the same reasons.
/// `kind` goes through the slot too (one verified path for every kind of record).
#[expect(clippy::too_many_arguments, reason = "one record's fields")]
#[inline(always)]
pub(crate) fn capture_via_slot(
    mut p: PendingIo,
    ts_ns: u64,
    tgid: u32,
    tid: u32,
    ret: i64,
    arrival: u64,
    ssl: u64,
    kind: EventKind,
) {
    let Some(slot) = IO_DESC.get_ptr_mut(0) else {
        return;
    };
    p.enter_ns = ts_ns;
    // SAFETY: this CPU's slot; BPF programs are not preempted on their CPU mid-run. The volatile
    // read keeps the compiler from forwarding the stored value (which would defeat the point).
    let d = unsafe {
        slot.write(IoDesc {
            io: p,
            ret,
            kind: kind as u32,
            _pad: 0,
        });
        core::ptr::read_volatile(slot)
    };
    let m = Meta {
        tgid,
        tid,
        ts_ns: d.io.enter_ns,
        ret: d.ret,
        arrival_ns: arrival,
        ssl,
        kind: d.kind,
    };
    // SAFETY: the same slot's `ret`, read again (see `emit_small`).
    let ret_again = unsafe { core::ptr::read_volatile(&raw const (*slot).ret) };
    if !emit_small(&d.io, &m, ret_again) {
        emit_data(&d.io, &m);
    }
}

/// What a socket call of a traced process is to the capture.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Admit {
    /// A server connection: capture it.
    Capture,
    /// A server connection the agent gave up on (not HTTP), or one the maps could not hold.
    Skip,
    /// Not a server connection: IPC or an outbound call, reported by size only.
    Other,
}

/// Whether I/O on `fd` (socket `sk`) of `tgid` is captured, admitting a new server-side
/// connection on its first I/O and retiring a connection whose fd now names another socket.
#[inline(always)]
fn admit(tgid: u32, tid: u32, fd: u32, sk: u64) -> Admit {
    let key = ConnKey { tgid, fd };
    // SAFETY: value copied out at once.
    let known = unsafe { CONNS.get(key) }.copied();
    match known {
        Some(v) if v == sk => return Admit::Capture,
        Some(v) if v == sk | CONN_IGNORED => return Admit::Skip,
        Some(CONN_SK_UNKNOWN) => {
            // Open before attach (seeded by the agent from /proc): learn its socket now.
            let _ = CONNS.insert(key, sk, 0);
            let _ = SOCK_CONN.insert(sk, key, 0);
            add_server_sock(sk);
            return Admit::Capture;
        }
        _ => {}
    }
    if !is_server_sock(sk) {
        if known.is_some() {
            // The fd was a connection and is now another kind of socket: that connection ended.
            let _ = CONNS.remove(key);
            emit_conn(EventKind::Close, tgid, tid, fd);
        }
        return Admit::Other;
    }
    if CONNS.insert(key, sk, 0).is_err() {
        // Accounted as a lost event, so that seen = delivered + lost stays exact.
        bump(counter::EVENTS_SEEN);
        bump(counter::LOST_MAP_FULL);
        return Admit::Skip;
    }
    let _ = SOCK_CONN.insert(sk, key, 0);
    // A record under a reused fd: the agent finishes the state of the connection it replaced.
    emit_conn(EventKind::Accept, tgid, tid, fd);
    Admit::Capture
}

/// The end of `sock_recvmsg`: bytes the server read, stamped now (the syscall path's exit time).
/// A raw tracepoint, as all three programs here: `TP_PROTO(struct sock *sk, int ret, int flags)`.
/// Raw tracepoint programs are skipped only when nested in themselves (a classic one whenever any
/// other program runs on that CPU: a lost request) and format no trace record.
#[raw_tracepoint(tracepoint = "sock_recv_length")]
pub fn sock_recv_data(ctx: RawTracePointContext) -> u32 {
    if crate::bench_floor() != floor::OFF {
        return 0;
    }
    let (tgid, tid) = current_tgid_tid();
    if !is_target(tgid) {
        return 0;
    }
    let ret = ctx.arg::<u64>(1) as i32;
    let flags = ctx.arg::<u64>(2) as i32;
    // Nothing to move on a non-blocking socket, or a peek that leaves the bytes for the read.
    if ret == -EAGAIN || ret == -EINTR || flags & MSG_PEEK != 0 {
        return 0;
    }
    let sk: u64 = ctx.arg(0);
    let Some(r) = user_regs() else {
        return 0;
    };
    let fd = r[2] as u32;
    let kind = match admit(tgid, tid, fd, sk) {
        Admit::Capture => EventKind::Data,
        Admit::Skip => return 0,
        // IPC or an outbound call: its bytes go to the agent only to be searched for request ids.
        Admit::Other if ret > 0 => EventKind::IpcData,
        Admit::Other => return 0,
    };
    let mut p = describe(&r, DIR_INGRESS, sk);
    let mut arrival_ns = 0;
    if kind == EventKind::Data {
        // SAFETY: value copied out before the entry is removed.
        if let Some(a) = unsafe { ARRIVAL.get(sk) }.copied() {
            let _ = ARRIVAL.remove(sk);
            arrival_ns = a.ts_ns[0];
            if ret > 0 {
                emit_arrivals(&a, sk, ret as u32, tgid, tid, fd);
            }
        }
    }
    // SAFETY: plain helper call.
    let now = unsafe { bpf_ktime_get_ns() };
    let mut who = tid;
    if let Some(t) = threads::own_entry(tgid, tid) {
        p.thread = threads::clock_of(t, now);
        who = on_behalf(t, kind, tgid, now, &mut p);
    }
    capture_via_slot(p, now, tgid, who, i64::from(ret), arrival_ns, 0, kind);
    0
}

/// Marks the current thread's entry `t` as serving when `kind` is a client connection's record;
/// for an IPC record, dates it with the clock of the serving thread that last woke this one or,
/// failing that, that this one last woke, or failing both, of its process's main thread, when
/// there is one (`threads::waker_clock`), and returns that thread's id — the record's thread —
/// else this thread's, `tid`.
#[inline(always)]
fn on_behalf(
    t: &mut probe_common::ThreadTime,
    kind: EventKind,
    tgid: u32,
    ts: u64,
    p: &mut PendingIo,
) -> u32 {
    if kind == EventKind::Data {
        if t.serving == 0 {
            t.serving = 1;
        }
    } else if let Some((waker, clock)) = threads::waker_clock(t, tgid, ts) {
        p.thread = clock;
        return waker;
    }
    t.tid
}

/// TCP is about to queue the first bytes of a send: the time a response write is dated by.
/// `TP_PROTO(const struct sock *sk, const struct msghdr *msg, const struct sk_buff *skb,
/// int size_goal)`; nothing of it is read.
#[raw_tracepoint(tracepoint = "tcp_sendmsg_locked")]
pub fn tcp_send_start(_ctx: RawTracePointContext) -> u32 {
    if crate::bench_floor() != floor::OFF {
        return 0;
    }
    let (tgid, tid) = current_tgid_tid();
    // An untraced process leaves at its slot; a traced thread stamps its own THREADS entry when
    // it has one (no map update, no TARGETS lookup: only traced threads have one); else, for a
    // traced process, SEND_START holds the stamp.
    if !maybe_target(tgid) || threads::stamp_send(tgid, tid) || !in_targets(tgid) {
        return 0;
    }
    // SAFETY: plain helper call.
    let now = unsafe { bpf_ktime_get_ns() };
    // NOEXIST: a long send loops here once per segment; the first one counts.
    let start = SendStart {
        ts_ns: now,
        thread: threads::clock(tgid, tid, now),
    };
    let _ = SEND_START.insert(tid, start, u64::from(BPF_NOEXIST));
    0
}

/// The end of `sock_sendmsg`: bytes the server wrote, dated by `tcp_send_start`.
/// `TP_PROTO(struct sock *sk, int ret, int flags)`.
#[raw_tracepoint(tracepoint = "sock_send_length")]
pub fn sock_send_data(ctx: RawTracePointContext) -> u32 {
    let f = crate::bench_floor();
    if f == floor::HOOKS {
        return 0;
    }
    let (tgid, tid) = current_tgid_tid();
    if !maybe_target(tgid) {
        return 0;
    }
    if f == floor::RECORDS {
        if in_targets(tgid) {
            bare_record(tgid, tid, ctx.arg::<u64>(1) as i32);
        }
        return 0;
    }
    // A stamp in the thread's THREADS entry marks a traced thread; without one, test the process.
    let mut own = threads::own_entry(tgid, tid);
    let start = match own.as_deref_mut().and_then(threads::take_send) {
        Some((ts_ns, thread)) => Some(SendStart { ts_ns, thread }),
        None => {
            if !in_targets(tgid) {
                return 0;
            }
            // SAFETY: value copied out before the entry is removed.
            let s = unsafe { SEND_START.get(tid) }.copied();
            if s.is_some() {
                let _ = SEND_START.remove(tid);
            }
            s
        }
    };
    let ret = ctx.arg::<u64>(1) as i32;
    if ret == -EAGAIN || ret == -EINTR {
        return 0;
    }
    let sk: u64 = ctx.arg(0);
    let Some(r) = user_regs() else {
        return 0;
    };
    let fd = r[2] as u32;
    let kind = match admit(tgid, tid, fd, sk) {
        Admit::Capture => EventKind::Data,
        Admit::Skip => return 0,
        // IPC or an outbound call (bytes searched for request ids only), dated like a client
        // write.
        Admit::Other if ret > 0 => EventKind::IpcData,
        Admit::Other => return 0,
    };
    let mut p = describe(&r, DIR_EGRESS, sk);
    // Not TCP (no start stamp; a unix socket: vLLM's ZMQ): the end of the call is the best time
    // there is.
    let ts = match start {
        Some(s) => {
            p.thread = s.thread;
            s.ts_ns
        }
        None => {
            // SAFETY: plain helper call.
            let now = unsafe { bpf_ktime_get_ns() };
            if let Some(t) = own.as_deref_mut() {
                p.thread = threads::clock_of(t, now);
            }
            now
        }
    };
    let who = own.map_or(tid, |t| on_behalf(t, kind, tgid, ts, &mut p));
    capture_via_slot(p, ts, tgid, who, i64::from(ret), 0, 0, kind);
    0
}

/// `floor::RECORDS`: the send's bare record — its time, thread and result, no payload, no clock,
/// reserved in place and never waking the agent (its timer drains it).
#[inline(always)]
fn bare_record(tgid: u32, tid: u32, ret: i32) {
    bump(counter::EVENTS_SEEN);
    let Some(mut entry) = EVENTS.reserve::<DataEvent>(0) else {
        bump(counter::LOST_RINGBUF_FULL);
        return;
    };
    entry.write(DataEvent {
        header: header_now(EventKind::IpcData, tgid, tid),
        fd: 0,
        dir: DIR_EGRESS,
        ret: i64::from(ret),
        cap_len: 0,
        syscall: SYSCALL_OTHER as u16,
        tail_len: 0,
        arrival_ns: 0,
        thread: ThreadClock::default(),
        ssl: 0,
    });
    entry.submit(u64::from(BPF_RB_NO_WAKEUP));
}
