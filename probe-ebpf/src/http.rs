//! Server-side socket I/O of traced processes, from syscall tracepoints (kprobes are not available on
//! every kernel we target; `syscalls:sys_{enter,exit}_*` are). Format offsets come from
//! /sys/kernel/tracing/events/syscalls/*/format: arguments are 8-byte slots from offset 16, and the
//! exit tracepoint's `long ret` is at offset 16.

use core::{ffi::c_void, slice};

use aya_ebpf::{
    helpers::{bpf_ktime_get_ns, generated::bpf_probe_read_user},
    macros::tracepoint,
    programs::TracePointContext,
    EbpfContext,
};
use probe_common::{
    counter, ConnEvent, ConnKey, DataEvent, EventHeader, EventKind, PendingIo, DIR_EGRESS,
    DIR_INGRESS, MAX_CAPTURE, MAX_IOV, SYSCALL_ACCEPT, SYSCALL_ACCEPT4, SYSCALL_READ,
    SYSCALL_READV, SYSCALL_RECVFROM, SYSCALL_RECVMSG, SYSCALL_SENDMSG, SYSCALL_SENDTO,
    SYSCALL_WRITE, SYSCALL_WRITEV, TAIL_CAPTURE,
};

use crate::{
    arrival::ARRIVAL, bump, current_tgid_tid, emit, header_now, is_target, submit_flags, CONNS,
    EVENTS, PENDING, SCRATCH,
};

const EAGAIN: i64 = 11;
const EINTR: i64 = 4;
const HEADER: usize = core::mem::size_of::<DataEvent>();
/// Offsets inside `struct user_msghdr` (include/linux/socket.h): msg_iov, msg_iovlen.
const MSGHDR_IOV: u64 = 16;
const MSGHDR_IOVLEN: u64 = 24;

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
        Buf::MsgHdr => {
            // SAFETY: reads of the caller's msghdr through the checked helper.
            let iov =
                unsafe { aya_ebpf::helpers::bpf_probe_read_user((buf + MSGHDR_IOV) as *const u64) };
            let len = unsafe {
                aya_ebpf::helpers::bpf_probe_read_user((buf + MSGHDR_IOVLEN) as *const u64)
            };
            match (iov, len) {
                (Ok(iov), Ok(len)) => {
                    buf = iov;
                    iovcnt = len as u32;
                }
                _ => {
                    bump(counter::LOST_READ_USER);
                    buf = 0;
                }
            }
        }
    }
    let pending = PendingIo {
        buf,
        iovcnt,
        fd,
        syscall,
        dir,
        sk: 0,
        // SAFETY: plain helper call.
        enter_ns: unsafe { bpf_ktime_get_ns() },
    };
    if PENDING.insert(tid, pending, 0).is_err() {
        bump(counter::EVENTS_SEEN);
        bump(counter::LOST_MAP_FULL);
    }
}

/// Copy `len` user bytes at `src` into the scratch record at payload offset `off`.
#[inline(always)]
fn read_into(base: *mut u8, off: usize, len: usize, src: u64) -> bool {
    let off = off & (MAX_CAPTURE - 1);
    let len = len & (2 * MAX_CAPTURE - 1);
    // SAFETY: HEADER + off + len < SCRATCH_BYTES by the masks above; the helper checks `src`.
    let rc = unsafe {
        bpf_probe_read_user(
            base.add(HEADER + off).cast::<c_void>(),
            len as u32,
            src as *const c_void,
        )
    };
    rc == 0
}

/// Copy `len` user bytes at `src` into the tail area (after a full `MAX_CAPTURE` head) at `off`.
#[inline(always)]
fn read_tail_into(base: *mut u8, off: usize, len: usize, src: u64) -> bool {
    let off = off & (TAIL_CAPTURE - 1);
    let len = len & (2 * TAIL_CAPTURE - 1);
    // SAFETY: HEADER + MAX_CAPTURE + off + len < SCRATCH_BYTES by the masks above; the helper
    // checks `src`.
    let rc = unsafe {
        bpf_probe_read_user(
            base.add(HEADER + MAX_CAPTURE + off).cast::<c_void>(),
            len as u32,
            src as *const c_void,
        )
    };
    rc == 0
}

/// Capture up to `MAX_CAPTURE` of the `ret` bytes the syscall moved, and for a longer egress
/// write up to `TAIL_CAPTURE` of its last bytes after them. Returns (head length, tail length).
#[inline(always)]
fn capture(base: *mut u8, p: &PendingIo, ret: usize) -> (usize, usize) {
    let plain = matches!(
        p.syscall,
        SYSCALL_READ | SYSCALL_WRITE | SYSCALL_RECVFROM | SYSCALL_SENDTO
    );
    let want_tail = p.dir == DIR_EGRESS && ret > MAX_CAPTURE;
    if plain {
        let n = if ret > MAX_CAPTURE { MAX_CAPTURE } else { ret };
        if !read_into(base, 0, n, p.buf) {
            bump(counter::LOST_READ_USER);
            return (0, 0);
        }
        let end = p.buf + ret as u64;
        if want_tail && read_tail_into(base, 0, TAIL_CAPTURE, end - TAIL_CAPTURE as u64) {
            return (n, TAIL_CAPTURE);
        }
        return (n, 0);
    }
    // Few branches per iteration on purpose: the verifier walks every iteration, and each extra
    // branch multiplies the states it must visit (32 iterations of a 4-branch body took > 60 s).
    // Bytes past `ret` are copied too (they are the caller's, not secrets of ours) and cut below.
    let mut off = 0usize;
    for i in 0..MAX_IOV {
        if i >= p.iovcnt || off >= MAX_CAPTURE || off >= ret {
            break;
        }
        // SAFETY: reads one `struct iovec { void *base; size_t len; }` through the checked helper.
        let Ok(iov) = (unsafe {
            aya_ebpf::helpers::bpf_probe_read_user((p.buf + u64::from(i) * 16) as *const [u64; 2])
        }) else {
            bump(counter::LOST_READ_USER);
            break;
        };
        let room = MAX_CAPTURE - off;
        let take = if (iov[1] as usize) < room {
            iov[1] as usize
        } else {
            room
        };
        if !read_into(base, off, take, iov[0]) {
            bump(counter::LOST_READ_USER);
            break;
        }
        off += take;
    }
    if off > ret {
        off = ret;
    }
    if off < ret && off < MAX_CAPTURE {
        bump(counter::IOV_SKIPPED);
    }
    if off > MAX_CAPTURE {
        off = MAX_CAPTURE;
    }
    if !want_tail || off != MAX_CAPTURE {
        return (off, 0);
    }
    (off, capture_iov_tail(base, p, ret as u64))
}

/// The tail of a long vectored write: the longest suffix of its iovecs that fits in
/// `TAIL_CAPTURE` (Node ends a response with small iovecs: CRLF, size lines, `[DONE]`, the
/// terminator), or the last bytes of the last iovec. A second walk over the iovecs, so that the
/// verifier sees two short loops one after the other instead of one loop with both jobs (that
/// one passed the 1M-instruction limit). 0 unless the syscall moved every byte asked for (a
/// partial write's last bytes were not written) and every read succeeded.
#[inline(always)]
fn capture_iov_tail(base: *mut u8, p: &PendingIo, ret: u64) -> usize {
    let mut asked = 0u64;
    let mut tail = 0usize;
    for i in 0..MAX_IOV {
        if i >= p.iovcnt {
            break;
        }
        // SAFETY: reads one `struct iovec` through the checked helper.
        let Ok(iov) = (unsafe {
            aya_ebpf::helpers::bpf_probe_read_user((p.buf + u64::from(i) * 16) as *const [u64; 2])
        }) else {
            return 0;
        };
        asked = asked.wrapping_add(iov[1]);
        let len = iov[1] as usize;
        // Append the whole iovec when it fits, else restart the tail with its last bytes.
        let fits = tail + len <= TAIL_CAPTURE;
        let take = if fits || len < TAIL_CAPTURE {
            len
        } else {
            TAIL_CAPTURE
        };
        let at = if fits { tail } else { 0 };
        if take > 0 && !read_tail_into(base, at, take, iov[0] + (len - take) as u64) {
            return 0;
        }
        tail = at + take;
    }
    if asked == ret && tail <= TAIL_CAPTURE {
        tail
    } else {
        0
    }
}

#[inline(always)]
fn on_exit(ctx: &TracePointContext) {
    let (tgid, tid) = current_tgid_tid();
    if !is_target(tgid) {
        return;
    }
    // SAFETY: the entry is copied out before it is removed.
    let Some(p) = (unsafe { PENDING.get(tid) }).copied() else {
        return;
    };
    let _ = PENDING.remove(tid);
    let ret = arg(ctx, 0) as i64;
    if ret == -EAGAIN || ret == -EINTR {
        // Non-blocking socket with nothing to move: no event (epoll servers do this constantly).
        return;
    }
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
        return;
    };
    let base = scratch.cast::<u8>();
    let (cap, tail) = if ret > 0 && p.buf != 0 {
        capture(base, &p, ret as usize)
    } else {
        (0, 0)
    };
    let mut arrival_ns = 0;
    if p.sk != 0 {
        // SAFETY: value copied out before the entry is removed.
        if let Some(t) = unsafe { ARRIVAL.get(p.sk) } {
            arrival_ns = *t;
        }
        let _ = ARRIVAL.remove(p.sk);
    }
    if ret > 0 && ret as usize > cap + tail {
        bump(counter::TRUNCATED);
    }
    let ev = DataEvent {
        header: EventHeader {
            kind: EventKind::Data as u32,
            tgid,
            tid,
            _pad: 0,
            ts_ns: if p.dir == DIR_EGRESS {
                p.enter_ns
            } else {
                // SAFETY: plain helper call.
                unsafe { bpf_ktime_get_ns() }
            },
        },
        fd: p.fd,
        dir: p.dir,
        ret,
        cap_len: cap as u32,
        syscall: p.syscall as u16,
        tail_len: tail as u16,
        arrival_ns,
    };
    // SAFETY: the scratch slot is 8-aligned and larger than `DataEvent`.
    unsafe { base.cast::<DataEvent>().write(ev) };
    // `cap` ≤ MAX_CAPTURE and `tail` ≤ TAIL_CAPTURE (then `cap` = MAX_CAPTURE: the tail follows
    // the head); the masks restate it in a form the verifier can follow.
    let len = HEADER + (cap & (2 * MAX_CAPTURE - 1)) + (tail & (2 * TAIL_CAPTURE - 1));
    // SAFETY: `len` < SCRATCH_BYTES (header + ≤ 2 * MAX_CAPTURE + 2 * TAIL_CAPTURE).
    let record = unsafe { slice::from_raw_parts(base, len) };
    bump(counter::EVENTS_SEEN);
    if EVENTS
        .output::<[u8]>(record, submit_flags(len as u64))
        .is_err()
    {
        bump(counter::LOST_RINGBUF_FULL);
    }
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
    if CONNS.insert(ConnKey { tgid, fd }, 1, 0).is_err() {
        // The connection cannot be traced: account for it as a lost event, so that
        // seen = delivered + lost stays exact.
        bump(counter::EVENTS_SEEN);
        bump(counter::LOST_MAP_FULL);
    }
    emit_conn(EventKind::Accept, tgid, tid, fd);
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
