//! When request bytes reach a traced server's socket, as opposed to when the server reads them.
//! A busy event loop reads late (up to 15 ms at 64 concurrent streams on llama-cpp-python,
//! measured); users feel that wait, so it belongs in TTFT.
//!
//! Three `sock:` tracepoints (fentry is refused on some hardened kernels; these are not):
//! - `inet_sock_set_state`: a socket becoming ESTABLISHED with a local port that a traced server
//!   listens on is a server-side connection → `SERVER_SOCKS`. On the `sock:` capture path it also
//!   reports the server's close of an admitted connection (`sockio.rs`): FIN_WAIT1 and LAST_ACK
//!   are entered only by the server's own close/shutdown, in its thread, after its last write.
//! - `sk_data_ready` (TCP queued data, not a bare ACK): stamp each arrival of unread data per
//!   socket with the TCP sequence number it ends before, so that a read made of several arrivals
//!   is dated by part (`ArrivalEvent`).
//! - `sock_recv_length` (end of `sock_recvmsg`, in the reading thread): names the socket of the
//!   read in flight so that `http.rs` can consume the stamp at syscall exit.
//!
//! The first two run in softirq context, often in the *sender's* task, so unlike every other
//! program they cannot filter by tgid: they filter by port / known socket first instead, the
//! socket through the `SOCK_SLOTS` array in front of the `SERVER_SOCKS` hash.

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::{bpf_ktime_get_ns, bpf_probe_read_kernel},
    macros::{map, raw_tracepoint, tracepoint},
    maps::{Array, HashMap, LruHashMap},
    programs::{RawTracePointContext, TracePointContext},
};
use probe_common::{
    floor, tracepoint as tp, ArrivalEvent, EventKind, CONN_IGNORED, MAX_ARRIVAL_MARKS, MAX_CONNS,
    MAX_LISTEN_PORTS, TCP_LAYOUT_COPIED_SEQ, TCP_LAYOUT_LEN, TCP_LAYOUT_RCV_NXT,
};

use crate::{
    current_tgid_tid, emit, emit_conn, field, header_now, is_target, slot_add, slot_open,
    sockio::SOCK_CONN, ADDR_SLOTS, CONNS, PENDING,
};

/// include/net/tcp_states.h
const TCP_ESTABLISHED: i32 = 1;
const TCP_FIN_WAIT1: i32 = 4;
const TCP_CLOSE: i32 = 7;
const TCP_LAST_ACK: i32 = 9;
const TCP_LISTEN: i32 = 10;
const IPPROTO_TCP: u16 = 6;

/// Local ports of traced servers (port → 1), kept by the agent from /proc.
#[map]
static LISTEN_PORTS: HashMap<u16, u32> = HashMap::with_max_entries(MAX_LISTEN_PORTS, 0);

/// Server-side sockets (`struct sock *` → 1) of the ports above. Entries come and go only
/// through `add_server_sock` and `remove_server_sock`, which keep `SOCK_SLOTS` in step.
#[map]
static SERVER_SOCKS: LruHashMap<u64, u32> = LruHashMap::with_max_entries(MAX_CONNS, 0);

/// The counted filter (`crate::slot_add`) in front of `SERVER_SOCKS`. `sk_data_ready` runs for
/// every socket on the machine with data, the load generator's and every other process's, and
/// leaves at this array read instead of a hash miss. An entry the LRU evicts leaves its +1 (a
/// slot that stays open). One window is left: the −1 of a key removed on one CPU landing before
/// the +1 of its insert on another, for the nanoseconds between an insert and its count, when a
/// socket's close races its own ESTABLISHED.
#[map]
static SOCK_SLOTS: Array<u64> = Array::with_max_entries(ADDR_SLOTS, 0);

/// Admit `sk` as a server-side socket (nothing changes when it is one already).
#[inline(always)]
pub fn add_server_sock(sk: u64) {
    if SERVER_SOCKS.insert(sk, 1, u64::from(BPF_NOEXIST)).is_ok() {
        slot_add(&SOCK_SLOTS, sk, 1);
    }
}

#[inline(always)]
fn remove_server_sock(sk: u64) {
    if SERVER_SOCKS.remove(sk).is_ok() {
        slot_add(&SOCK_SLOTS, sk, u64::MAX);
    }
}

/// Whether `sk` is a server-side socket: the filter, then the map.
#[inline(always)]
pub fn is_server_sock(sk: u64) -> bool {
    // SAFETY: presence test only.
    slot_open(&SOCK_SLOTS, sk) && unsafe { SERVER_SOCKS.get(sk) }.is_some()
}

/// When a socket's unread data reached it, by part (`probe_common::ArrivalEvent`): the first
/// `n` arrivals since its last read, each with `tcp_sock.rcv_nxt` then (the sequence number its
/// data ends before; 0 when `TCP_LAYOUT` is not known). Arrivals past the last slot replace it.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Arrival {
    pub n: u32,
    _pad: u32,
    pub seqs: [u32; MAX_ARRIVAL_MARKS],
    pub ts_ns: [u64; MAX_ARRIVAL_MARKS],
}

/// `struct sock *` → arrival of its unread data.
#[map]
pub static ARRIVAL: LruHashMap<u64, Arrival> = LruHashMap::with_max_entries(MAX_CONNS, 0);

/// Byte offsets in `struct tcp_sock` (`probe_common::TCP_LAYOUT_*`; 0: unknown), from BTF by the
/// agent.
#[map]
pub static TCP_LAYOUT: Array<u64> = Array::with_max_entries(TCP_LAYOUT_LEN, 0);

/// The `u32` of TCP socket `sk` at the `TCP_LAYOUT` offset `which`, when known.
#[inline(always)]
fn tcp_u32(sk: u64, which: u32) -> Option<u32> {
    let off = *TCP_LAYOUT.get(which)?;
    if off == 0 {
        return None;
    }
    // SAFETY: the helper reads kernel memory and fails cleanly; `sk` is a live TCP socket (the
    // tracepoint's own argument).
    unsafe { bpf_probe_read_kernel((sk + off) as *const u32) }.ok()
}

/// Sends the parts of a read of `ret` bytes from `sk` whose data came in several arrivals
/// (`ArrivalEvent`), just before its data record; nothing when one arrival brought it all or the
/// TCP layout is not known.
#[inline(always)]
pub fn emit_arrivals(a: &Arrival, sk: u64, ret: u32, tgid: u32, tid: u32, fd: u32) {
    if a.n < 2 || a.seqs[0] == 0 {
        return;
    }
    // After the read: the sequence number of its first byte is `copied_seq - ret`.
    let Some(copied) = tcp_u32(sk, TCP_LAYOUT_COPIED_SEQ) else {
        return;
    };
    let start = copied.wrapping_sub(ret);
    let mut ev = ArrivalEvent {
        header: header_now(EventKind::Arrivals, tgid, tid),
        fd,
        n: a.n.min(MAX_ARRIVAL_MARKS as u32),
        ends: [0; MAX_ARRIVAL_MARKS],
        ts_ns: a.ts_ns,
    };
    for i in 0..MAX_ARRIVAL_MARKS {
        // Bytes of the read that had arrived by then: before its start (a part an earlier read
        // took) is none, past its end is all.
        let got = a.seqs[i].wrapping_sub(start) as i32;
        ev.ends[i] = (got.max(0) as u32).min(ret);
    }
    emit(&ev);
}

#[tracepoint]
pub fn inet_sock_set_state(ctx: TracePointContext) -> u32 {
    let sport: u16 = field(&ctx, tp::SET_STATE_SPORT.offset);
    let newstate: i32 = field(&ctx, tp::SET_STATE_NEWSTATE.offset);
    if field::<u16>(&ctx, tp::SET_STATE_PROTOCOL.offset) != IPPROTO_TCP {
        return 0;
    }
    if newstate == TCP_LISTEN {
        // listen() runs in the caller's thread: a traced process (a child forked after attach,
        // a server that binds late) starts listening. Its connections are server-side from now.
        let (tgid, _) = current_tgid_tid();
        if is_target(tgid) {
            let _ = LISTEN_PORTS.insert(sport, 1, 0);
        }
        return 0;
    }
    // SAFETY: presence test only.
    if unsafe { LISTEN_PORTS.get(sport) }.is_none() {
        return 0;
    }
    let sk: u64 = field(&ctx, tp::SET_STATE_SKADDR.offset);
    match newstate {
        TCP_ESTABLISHED => add_server_sock(sk),
        TCP_FIN_WAIT1 | TCP_LAST_ACK => server_closed(sk),
        TCP_CLOSE => {
            remove_server_sock(sk);
            let _ = ARRIVAL.remove(sk);
            let _ = SOCK_CONN.remove(sk);
        }
        _ => {}
    }
    0
}

/// The server closed (or shut down) connection `sk`: report it under the fd it was admitted as,
/// unless that fd names another socket by now. Only `sock:`-path connections are in `SOCK_CONN`.
#[inline(always)]
fn server_closed(sk: u64) {
    // SAFETY: value copied out at once.
    let Some(key) = (unsafe { SOCK_CONN.get(sk) }).copied() else {
        return;
    };
    let _ = SOCK_CONN.remove(sk);
    // SAFETY: value copied out at once.
    let current = unsafe { CONNS.get(key) }.copied();
    if current != Some(sk) && current != Some(sk | CONN_IGNORED) {
        return;
    }
    let _ = CONNS.remove(key);
    let (_, tid) = current_tgid_tid();
    emit_conn(EventKind::Close, key.tgid, tid, key.fd);
}

/// A raw tracepoint (`TP_PROTO(const struct sock *sk)`): it runs in softirq, often nested in
/// another program's run on that CPU, where a classic tracepoint program would be skipped (the
/// kernel's global `bpf_prog_active`) and the arrival lost.
#[raw_tracepoint(tracepoint = "sk_data_ready")]
pub fn sk_data_ready(ctx: RawTracePointContext) -> u32 {
    if crate::bench_floor() != floor::OFF {
        return 0;
    }
    let sk: u64 = ctx.arg(0);
    if !is_server_sock(sk) {
        return 0;
    }
    // SAFETY: plain helper call.
    let now = unsafe { bpf_ktime_get_ns() };
    let seq = tcp_u32(sk, TCP_LAYOUT_RCV_NXT).unwrap_or(0);
    // Unread data already there: this arrival is its next part (or replaces the last slot's).
    if let Some(a) = ARRIVAL.get_ptr_mut(sk) {
        // SAFETY: a valid map value; the socket's receive path runs under its lock, one CPU at
        // a time.
        unsafe {
            let n = (*a).n;
            let slot = if (n as usize) < MAX_ARRIVAL_MARKS {
                (*a).n = n + 1;
                n as usize
            } else {
                MAX_ARRIVAL_MARKS - 1
            };
            // The mask restates the bound for the verifier.
            let i = slot & (MAX_ARRIVAL_MARKS - 1);
            (*a).seqs[i] = seq;
            (*a).ts_ns[i] = now;
        }
        return 0;
    }
    let mut first = Arrival {
        n: 1,
        _pad: 0,
        seqs: [0; MAX_ARRIVAL_MARKS],
        ts_ns: [0; MAX_ARRIVAL_MARKS],
    };
    first.seqs[0] = seq;
    first.ts_ns[0] = now;
    let _ = ARRIVAL.insert(sk, first, u64::from(BPF_NOEXIST));
    0
}

#[tracepoint]
pub fn sock_recv_length(ctx: TracePointContext) -> u32 {
    let (tgid, tid) = current_tgid_tid();
    if !is_target(tgid) {
        return 0;
    }
    // A pending entry exists only for reads on tracked server-side connections.
    let Some(p) = PENDING.get_ptr_mut(tid) else {
        return 0;
    };
    let sk: u64 = field(&ctx, tp::RECV_LENGTH_SK.offset);
    // SAFETY: this thread's own pending entry, written by its own sys_enter program.
    unsafe { (*p).sk = sk };
    // Connections accepted before attach are learned here, on their first read.
    add_server_sock(sk);
    0
}
