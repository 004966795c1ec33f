//! When request bytes reach a traced server's socket, as opposed to when the server reads them.
//! A busy event loop reads late (up to 15 ms at 64 concurrent streams on llama-cpp-python,
//! measured); users feel that wait, so it belongs in TTFT.
//!
//! Three `sock:` tracepoints (fentry is refused on some hardened kernels; these are not):
//! - `inet_sock_set_state`: a socket becoming ESTABLISHED with a local port that a traced server
//!   listens on is a server-side connection → `SERVER_SOCKS`. On the `sock:` capture path it also
//!   reports the server's close of an admitted connection (`sockio.rs`): FIN_WAIT1 and LAST_ACK
//!   are entered only by the server's own close/shutdown, in its thread, after its last write.
//! - `sk_data_ready` (TCP queued data, not a bare ACK): stamp the oldest unread data per socket.
//! - `sock_recv_length` (end of `sock_recvmsg`, in the reading thread): names the socket of the
//!   read in flight so that `http.rs` can consume the stamp at syscall exit.
//!
//! The first two run in softirq context, often in the *sender's* task, so unlike every other
//! program they cannot filter by tgid: they filter by port / known socket first instead.

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::bpf_ktime_get_ns,
    macros::{map, raw_tracepoint, tracepoint},
    maps::{HashMap, LruHashMap},
    programs::{RawTracePointContext, TracePointContext},
};
use probe_common::{tracepoint as tp, EventKind, CONN_IGNORED, MAX_CONNS, MAX_LISTEN_PORTS};

use crate::{current_tgid_tid, emit_conn, field, is_target, sockio::SOCK_CONN, CONNS, PENDING};

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

/// Server-side sockets (`struct sock *` → 1) of the ports above.
#[map]
pub static SERVER_SOCKS: LruHashMap<u64, u32> = LruHashMap::with_max_entries(MAX_CONNS, 0);

/// `struct sock *` → arrival time of its oldest unread data.
#[map]
pub static ARRIVAL: LruHashMap<u64, u64> = LruHashMap::with_max_entries(MAX_CONNS, 0);

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
        TCP_ESTABLISHED => {
            let _ = SERVER_SOCKS.insert(sk, 1, 0);
        }
        TCP_FIN_WAIT1 | TCP_LAST_ACK => server_closed(sk),
        TCP_CLOSE => {
            let _ = SERVER_SOCKS.remove(sk);
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
    let sk: u64 = ctx.arg(0);
    // SAFETY: presence test only.
    if unsafe { SERVER_SOCKS.get(sk) }.is_none() {
        return 0;
    }
    // SAFETY: plain helper call.
    let now = unsafe { bpf_ktime_get_ns() };
    // NOEXIST keeps the oldest stamp while earlier data is still unread.
    let _ = ARRIVAL.insert(sk, now, u64::from(BPF_NOEXIST));
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
    let _ = SERVER_SOCKS.insert(sk, 1, 0);
    0
}
