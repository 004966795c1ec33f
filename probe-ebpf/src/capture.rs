//! Copying the bytes of one socket read/write out of the traced thread into a ring-buffer record.
//! Shared by both capture paths (`http.rs`: syscall tracepoints; `sockio.rs`: `sock:`
//! tracepoints): they differ in where the buffer and the times come from, not in what is copied.

use core::{ffi::c_void, slice};

use aya_ebpf::helpers::generated::bpf_probe_read_user;
use probe_common::{
    counter, DataEvent, EventHeader, PendingIo, DIR_EGRESS, MAX_CAPTURE, MAX_IOV, SYSCALL_READ,
    SYSCALL_RECVFROM, SYSCALL_SENDTO, SYSCALL_SSL_READ, SYSCALL_SSL_WRITE, SYSCALL_WRITE,
    TAIL_CAPTURE,
};

use crate::{bump, submit_flags, EVENTS, SCRATCH};

const HEADER: usize = core::mem::size_of::<DataEvent>();
/// Offsets inside `struct user_msghdr` (include/linux/socket.h): msg_iov, msg_iovlen.
const MSGHDR_IOV: u64 = 16;
const MSGHDR_IOVLEN: u64 = 24;

/// The iovec array and count of a caller's `struct user_msghdr`, or `None` (counted) when it
/// cannot be read.
#[inline(always)]
pub fn msghdr_iov(msg: u64) -> Option<(u64, u32)> {
    // SAFETY: reads of the caller's msghdr through the checked helper.
    let iov = unsafe { aya_ebpf::helpers::bpf_probe_read_user((msg + MSGHDR_IOV) as *const u64) };
    let len =
        unsafe { aya_ebpf::helpers::bpf_probe_read_user((msg + MSGHDR_IOVLEN) as *const u64) };
    match (iov, len) {
        (Ok(iov), Ok(len)) => Some((iov, len as u32)),
        _ => {
            bump(counter::LOST_READ_USER);
            None
        }
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

/// Whether `syscall` moves one buffer (not an iovec array).
#[inline(always)]
fn one_buffer(syscall: u32) -> bool {
    matches!(
        syscall,
        SYSCALL_READ
            | SYSCALL_WRITE
            | SYSCALL_RECVFROM
            | SYSCALL_SENDTO
            | SYSCALL_SSL_READ
            | SYSCALL_SSL_WRITE
    )
}

/// Capture up to `MAX_CAPTURE` of the `ret` bytes the syscall moved, and for a longer egress
/// write up to `TAIL_CAPTURE` of its last bytes after them. Returns (head length, tail length).
#[inline(always)]
fn capture(base: *mut u8, p: &PendingIo, ret: usize) -> (usize, usize) {
    let plain = one_buffer(p.syscall);
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
    // Nothing past `ret` is copied: a reader's buffer beyond the bytes it received may be pages
    // never touched (grpcio reads into fresh slices), and the helper then fails the whole copy.
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
        let room = if ret - off < MAX_CAPTURE - off {
            ret - off
        } else {
            MAX_CAPTURE - off
        };
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

/// A data record's fields other than the bytes: whose call, when, what it returned. `kind`: an
/// `EventKind` carried in a `DataEvent` — `Data` (a server connection), `IpcData` (another socket
/// of a traced process) or `TlsData` (plaintext of the `SSL *` in `ssl`).
#[derive(Clone, Copy)]
pub struct Meta {
    pub tgid: u32,
    pub tid: u32,
    pub ts_ns: u64,
    pub ret: i64,
    pub arrival_ns: u64,
    pub ssl: u64,
    pub kind: u32,
}

impl Meta {
    /// The record's header for the call `p`, `cap` head and `tail` tail bytes captured.
    #[inline(always)]
    fn event(&self, p: &PendingIo, cap: usize, tail: usize) -> DataEvent {
        DataEvent {
            header: EventHeader {
                kind: self.kind,
                tgid: self.tgid,
                tid: self.tid,
                _pad: 0,
                ts_ns: self.ts_ns,
            },
            fd: p.fd,
            dir: p.dir,
            ret: self.ret,
            cap_len: cap as u32,
            syscall: p.syscall as u16,
            tail_len: tail as u16,
            arrival_ns: self.arrival_ns,
            thread: p.thread,
            ssl: self.ssl,
        }
    }
}

/// Payload room of a record reserved in place in the ring (`emit_small`): an SSE event of a chat
/// stream (≈ 190 bytes for OpenAI's shape, ≈ 250 for vLLM's) fits.
pub const SMALL_CAPTURE: usize = 256;

/// A data record reserved in place: the `DataEvent`, then room for `SMALL_CAPTURE` bytes. The
/// ring holds the whole size; the agent reads `cap_len` of it.
#[repr(C, align(8))]
pub struct SmallRecord {
    bytes: [u8; HEADER + SMALL_CAPTURE],
}

/// The data record of a single-buffer call that moved 1..=`SMALL_CAPTURE` bytes, reserved in the
/// ring and filled there: the bytes are read from the caller straight into the record, with no
/// copy through the scratch slot and no second copy by `bpf_ringbuf_output` (issue 12's "reserve
/// the ring record in place"). `ret_again` is the same result as `m.ret`, read again by the caller
/// from memory the compiler cannot see into, so that the range test on `m.ret` cannot let it drop
/// the mask the verifier needs on the length. False (nothing sent) for any other call, which
/// `emit_data` then sends.
#[inline(always)]
pub fn emit_small(p: &PendingIo, m: &Meta, ret_again: i64) -> bool {
    let plain = one_buffer(p.syscall);
    if !plain || p.buf == 0 || m.ret <= 0 || m.ret > SMALL_CAPTURE as i64 {
        return false;
    }
    bump(counter::EVENTS_SEEN);
    // Asked before the reserve, whose bytes the query would count already.
    let flags = submit_flags(size_of::<SmallRecord>() as u64);
    let Some(mut entry) = EVENTS.reserve::<SmallRecord>(0) else {
        bump(counter::LOST_RINGBUF_FULL);
        return true;
    };
    let base = entry.as_mut_ptr().cast::<u8>();
    // 1..=SMALL_CAPTURE by the test above; the mask restates it for the verifier.
    let len = ((ret_again as usize).wrapping_sub(1) & (SMALL_CAPTURE - 1)) + 1;
    // SAFETY: HEADER + len ≤ size_of::<SmallRecord>() by the mask; the helper checks `p.buf`.
    let rc = unsafe {
        bpf_probe_read_user(
            base.add(HEADER).cast::<c_void>(),
            len as u32,
            p.buf as *const c_void,
        )
    };
    let cap = if rc == 0 {
        len
    } else {
        bump(counter::LOST_READ_USER);
        bump(counter::TRUNCATED);
        0
    };
    let ev = m.event(p, cap, 0);
    // SAFETY: the reserved record is 8-aligned and larger than `DataEvent`.
    unsafe { base.cast::<DataEvent>().write(ev) };
    entry.submit(flags);
    true
}

/// Build and deliver the data record of one read/write: `m.ret` from the syscall (or socket
/// call), the payload copied from `p`'s buffer when `p.buf` is set and bytes moved.
#[inline(always)]
pub fn emit_data(p: &PendingIo, m: &Meta) {
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
        return;
    };
    let base = scratch.cast::<u8>();
    let ret = m.ret;
    let (cap, tail) = if ret > 0 && p.buf != 0 {
        capture(base, p, ret as usize)
    } else {
        (0, 0)
    };
    if ret > 0 && ret as usize > cap + tail {
        bump(counter::TRUNCATED);
    }
    let ev = m.event(p, cap, tail);
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
