//! OpenSSL's plaintext in traced processes: uprobes on `SSL_read`, `SSL_read_ex`, `SSL_write`
//! and `SSL_write_ex` (libssl 1.1/3, or an executable that links OpenSSL statically and exports
//! them, as `node` does), which the agent attaches by file with the call's shape as the cookie
//! (`probe_common::ssl`).
//!
//! Entry (`ssl_enter`) keeps the `SSL *`, the buffer and, for the `_ex` forms, where the byte
//! count will be written, per thread; return (`ssl_return`) copies the bytes moved into a
//! `TlsData` record through the same capture code as socket I/O. Nothing here knows the
//! connection: with a memory BIO (Python's `ssl.SSLObject` under asyncio/uvloop, Node's TLS
//! sockets) the socket I/O happens outside the call, so the agent ties the `SSL *` to the
//! connection whose encrypted bytes the same thread read just before (docs/tls.md).
//!
//! Times follow the clear-text rules: a write is dated at its entry (the plaintext starts on its
//! way to the socket then; a socket BIO writes inside the call), a read at its return.

use aya_ebpf::{
    helpers::{bpf_ktime_get_ns, bpf_probe_read_user, generated::bpf_get_attach_cookie},
    macros::{map, uprobe, uretprobe},
    maps::HashMap,
    programs::{ProbeContext, RetProbeContext},
    EbpfContext,
};
use probe_common::{
    counter, ssl, EventKind, PendingIo, ThreadClock, DIR_EGRESS, DIR_INGRESS, MAX_PENDING,
    SYSCALL_SSL_READ, SYSCALL_SSL_WRITE,
};

use crate::{bump, current_tgid_tid, is_target, sockio::capture_via_slot, threads};

/// An `SSL_*` call between entry and return.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct SslCall {
    ssl: u64,
    buf: u64,
    /// `size_t *` the `_ex` forms write the byte count to; 0 for `SSL_read`/`SSL_write`.
    count_out: u64,
    enter_ns: u64,
    thread: ThreadClock,
    /// `probe_common::ssl::*` flags of the entry point (the attach cookie).
    shape: u32,
    _pad: u32,
}

/// Calls in flight, by thread id. A thread is inside one `SSL_*` call at a time (OpenSSL does
/// not call these recursively); an entry left by a thread that died in the call is overwritten by
/// the next thread with its id, and a full map is counted.
#[map]
static SSL_CALLS: HashMap<u32, SslCall> = HashMap::with_max_entries(MAX_PENDING, 0);

#[inline(always)]
fn now() -> u64 {
    // SAFETY: plain helper call.
    unsafe { bpf_ktime_get_ns() }
}

/// Entry of any of the four: `(SSL *s, void *buf, int|size_t num[, size_t *count])`.
#[uprobe]
pub fn ssl_enter(ctx: ProbeContext) -> u32 {
    let (tgid, tid) = current_tgid_tid();
    if !is_target(tgid) {
        return 0;
    }
    // SAFETY: plain helper call on the program's own context.
    let shape = unsafe { bpf_get_attach_cookie(ctx.as_ptr()) } as u32;
    let (Some(s), Some(buf)) = (ctx.arg::<u64>(0), ctx.arg::<u64>(1)) else {
        return 0;
    };
    let count_out = if shape & ssl::EX != 0 {
        ctx.arg::<u64>(3).unwrap_or(0)
    } else {
        0
    };
    let t = now();
    let call = SslCall {
        ssl: s,
        buf,
        count_out,
        enter_ns: t,
        thread: threads::clock(tgid, tid, t),
        shape,
        _pad: 0,
    };
    if SSL_CALLS.insert(tid, call, 0).is_err() {
        bump(counter::EVENTS_SEEN);
        bump(counter::LOST_MAP_FULL);
    }
    0
}

/// Return of any of the four: the bytes moved (`SSL_read`/`SSL_write`: the return value when
/// positive; the `_ex` forms: 1 and the count they wrote out) go out as one `TlsData` record.
#[uretprobe]
pub fn ssl_return(ctx: RetProbeContext) -> u32 {
    let (tgid, tid) = current_tgid_tid();
    // SAFETY: value copied out before the entry is removed.
    let Some(call) = (unsafe { SSL_CALLS.get(tid) }).copied() else {
        return 0;
    };
    let _ = SSL_CALLS.remove(tid);
    let ret = i64::from(ctx.ret::<i32>());
    let moved: i64 = if call.shape & ssl::EX == 0 {
        ret
    } else if ret == 1 && call.count_out != 0 {
        // SAFETY: user-memory read through the checked helper.
        match unsafe { bpf_probe_read_user(call.count_out as *const u64) } {
            Ok(n) if n <= i32::MAX as u64 => n as i64,
            _ => 0,
        }
    } else {
        0
    };
    // Failures (want-read/want-write, alerts, shutdown) move nothing the agent can use: the
    // socket calls around them carry the connection's end and errors.
    if moved <= 0 {
        return 0;
    }
    let write = call.shape & ssl::WRITE != 0;
    let (dir, syscall, ts, thread) = if write {
        (DIR_EGRESS, SYSCALL_SSL_WRITE, call.enter_ns, call.thread)
    } else {
        let t = now();
        (
            DIR_INGRESS,
            SYSCALL_SSL_READ,
            t,
            threads::clock(tgid, tid, t),
        )
    };
    let p = PendingIo {
        buf: call.buf,
        iovcnt: 0,
        fd: 0,
        syscall,
        dir,
        sk: 0,
        enter_ns: 0,
        thread,
    };
    capture_via_slot(p, ts, tgid, tid, moved, 0, call.ssl, EventKind::TlsData);
    0
}
