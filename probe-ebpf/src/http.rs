//! Server-side socket I/O of traced processes, from syscall tracepoints (kprobes are not available on
//! every kernel we target; `syscalls:sys_{enter,exit}_*` are). Format offsets come from
//! /sys/kernel/tracing/events/syscalls/*/format: arguments are 8-byte slots from offset 16, and the
//! exit tracepoint's `long ret` is at offset 16.

use aya_ebpf::{
    helpers::bpf_ktime_get_ns, macros::tracepoint, programs::TracePointContext, EbpfContext,
};
use probe_common::{
    counter, ConnKey, EventKind, PendingIo, ThreadClock, CONN_SK_UNKNOWN, DIR_EGRESS, DIR_INGRESS,
    SYSCALL_ACCEPT, SYSCALL_ACCEPT4, SYSCALL_READ, SYSCALL_READV, SYSCALL_RECVFROM,
    SYSCALL_RECVMSG, SYSCALL_SENDMSG, SYSCALL_SENDTO, SYSCALL_WRITE, SYSCALL_WRITEV,
};

use crate::{
    arrival::{emit_arrivals, ARRIVAL},
    bump,
    capture::{emit_data, msghdr_iov, Meta},
    current_tgid_tid, emit_conn, is_target, threads, CONNS, PENDING,
};

const EAGAIN: i64 = 11;
const EINTR: i64 = 4;

#[inline(always)]
fn arg(ctx: &TracePointContext, i: usize) -> u64 {
    // SAFETY: syscall tracepoint contexts hold at least six 8-byte argument slots from offset 16
    // (the exit context holds `ret` in the first); the verifier checks ctx accesses.
    unsafe {
        *ctx.as_ptr()
            .cast::<u8>()
            .add(probe_common::tracepoint::SYSCALL_ARGS_OFFSET + 8 * i)
            .cast::<u64>()
    }
}

#[inline(always)]
fn tracked(tgid: u32, fd: u32) -> bool {
    // SAFETY: presence test only.
    unsafe { CONNS.get(ConnKey { tgid, fd }).is_some() }
}

/// How a syscall passes its buffer.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Buf {
    Plain,
    Iov,
    MsgHdr,
}

#[inline(always)]
fn on_enter(ctx: &TracePointContext, syscall: u32, dir: u32, kind: Buf) {
    let (tgid, tid) = current_tgid_tid();
    if !is_target(tgid) {
        return;
    }
    let fd = arg(ctx, 0) as u32;
    if !tracked(tgid, fd) {
        return;
    }
    let mut buf = arg(ctx, 1);
    let mut iovcnt = 0u32;
    match kind {
        Buf::Plain => {}
        Buf::Iov => iovcnt = arg(ctx, 2) as u32,
        Buf::MsgHdr => match msghdr_iov(buf) {
            Some((iov, n)) => {
                buf = iov;
                iovcnt = n;
            }
            None => buf = 0,
        },
    }
    // SAFETY: plain helper call.
    let now = unsafe { bpf_ktime_get_ns() };
    let pending = PendingIo {
        buf,
        iovcnt,
        fd,
        syscall,
        dir,
        sk: 0,
        enter_ns: now,
        // Egress records are dated by the entry: the thread's clock then.
        thread: if dir == DIR_EGRESS {
            threads::clock(tgid, tid, now)
        } else {
            ThreadClock::default()
        },
    };
    if PENDING.insert(tid, pending, 0).is_err() {
        bump(counter::EVENTS_SEEN);
        bump(counter::LOST_MAP_FULL);
    }
}

#[inline(always)]
fn on_exit(ctx: &TracePointContext) {
    let (tgid, tid) = current_tgid_tid();
    if !is_target(tgid) {
        return;
    }
    // SAFETY: the entry is copied out before it is removed.
    let Some(mut p) = (unsafe { PENDING.get(tid) }).copied() else {
        return;
    };
    let _ = PENDING.remove(tid);
    let ret = arg(ctx, 0) as i64;
    if ret == -EAGAIN || ret == -EINTR {
        // Non-blocking socket with nothing to move: no event (epoll servers do this constantly).
        return;
    }
    let mut arrival_ns = 0;
    if p.sk != 0 {
        // SAFETY: value copied out before the entry is removed.
        if let Some(a) = unsafe { ARRIVAL.get(p.sk) }.copied() {
            arrival_ns = a.ts_ns[0];
            if ret > 0 && p.dir != DIR_EGRESS {
                emit_arrivals(&a, p.sk, ret as u32, tgid, tid, p.fd);
            }
        }
        let _ = ARRIVAL.remove(p.sk);
    }
    let ts_ns = if p.dir == DIR_EGRESS {
        p.enter_ns
    } else {
        // SAFETY: plain helper call.
        let now = unsafe { bpf_ktime_get_ns() };
        p.thread = threads::clock(tgid, tid, now);
        now
    };
    emit_data(
        &p,
        &Meta {
            tgid,
            tid,
            ts_ns,
            ret,
            arrival_ns,
            ssl: 0,
            kind: EventKind::Data as u32,
        },
    );
}

macro_rules! io_probe {
    ($enter:ident, $exit:ident, $syscall:expr, $dir:expr, $kind:expr) => {
        #[tracepoint]
        pub fn $enter(ctx: TracePointContext) -> u32 {
            on_enter(&ctx, $syscall, $dir, $kind);
            0
        }
        #[tracepoint]
        pub fn $exit(ctx: TracePointContext) -> u32 {
            on_exit(&ctx);
            0
        }
    };
}

io_probe!(
    sys_enter_read,
    sys_exit_read,
    SYSCALL_READ,
    DIR_INGRESS,
    Buf::Plain
);
io_probe!(
    sys_enter_readv,
    sys_exit_readv,
    SYSCALL_READV,
    DIR_INGRESS,
    Buf::Iov
);
io_probe!(
    sys_enter_recvfrom,
    sys_exit_recvfrom,
    SYSCALL_RECVFROM,
    DIR_INGRESS,
    Buf::Plain
);
io_probe!(
    sys_enter_recvmsg,
    sys_exit_recvmsg,
    SYSCALL_RECVMSG,
    DIR_INGRESS,
    Buf::MsgHdr
);
io_probe!(
    sys_enter_write,
    sys_exit_write,
    SYSCALL_WRITE,
    DIR_EGRESS,
    Buf::Plain
);
io_probe!(
    sys_enter_writev,
    sys_exit_writev,
    SYSCALL_WRITEV,
    DIR_EGRESS,
    Buf::Iov
);
io_probe!(
    sys_enter_sendto,
    sys_exit_sendto,
    SYSCALL_SENDTO,
    DIR_EGRESS,
    Buf::Plain
);
io_probe!(
    sys_enter_sendmsg,
    sys_exit_sendmsg,
    SYSCALL_SENDMSG,
    DIR_EGRESS,
    Buf::MsgHdr
);

#[inline(always)]
fn on_accept(ctx: &TracePointContext, _syscall: u32) {
    let (tgid, tid) = current_tgid_tid();
    if !is_target(tgid) {
        return;
    }
    let ret = arg(ctx, 0) as i64;
    if ret < 0 {
        return;
    }
    let fd = ret as u32;
    if CONNS
        .insert(ConnKey { tgid, fd }, CONN_SK_UNKNOWN, 0)
        .is_err()
    {
        // The connection cannot be traced: account for it as a lost event, so that
        // seen = delivered + lost stays exact.
        bump(counter::EVENTS_SEEN);
        bump(counter::LOST_MAP_FULL);
    }
    emit_conn(EventKind::Accept, tgid, tid, fd);
}

#[tracepoint]
pub fn sys_exit_accept(ctx: TracePointContext) -> u32 {
    on_accept(&ctx, SYSCALL_ACCEPT);
    0
}

#[tracepoint]
pub fn sys_exit_accept4(ctx: TracePointContext) -> u32 {
    on_accept(&ctx, SYSCALL_ACCEPT4);
    0
}

#[tracepoint]
pub fn sys_enter_close(ctx: TracePointContext) -> u32 {
    let (tgid, tid) = current_tgid_tid();
    if !is_target(tgid) {
        return 0;
    }
    let fd = arg(&ctx, 0) as u32;
    let key = ConnKey { tgid, fd };
    if CONNS.remove(key).is_err() {
        return 0;
    }
    emit_conn(EventKind::Close, tgid, tid, fd);
    0
}
