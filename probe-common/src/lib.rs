//! Records shared by llm-probe's kernel programs (`probe-ebpf`) and its agent (`probe-user`).
//!
//! Everything that crosses the kernel boundary lives here and only here. Every struct is
//! `#[repr(C)]`, has no implicit padding, and has its size pinned by a `const` assertion so that a
//! change on one side cannot silently disagree with the other.
#![no_std]

use core::mem::size_of;

/// First field of every ring-buffer record. `kind` selects the decoder (`EventKind`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventHeader {
    pub kind: u32,
    pub tgid: u32,
    pub tid: u32,
    pub _pad: u32,
    /// `bpf_ktime_get_ns()`: CLOCK_MONOTONIC, stamped in the kernel (for data records: syscall
    /// entry for egress, syscall exit for ingress).
    pub ts_ns: u64,
}
const _: () = assert!(size_of::<EventHeader>() == 24);

/// Values of `EventHeader::kind`. Unknown kinds are counted by the agent, never panicked on.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// Bytes the server read from (`Ingress`) or wrote to (`Egress`) a tracked socket: `DataEvent`.
    Data = 1,
    /// A tracked socket was accepted (`ConnEvent`).
    Accept = 2,
    /// A tracked socket was closed by the server (`ConnEvent`).
    Close = 3,
    /// A traced process forked a child process (`ProcEvent`, `other` = child tgid).
    Fork = 4,
    /// A traced process exited (`ProcEvent`).
    Exit = 5,
    /// A CUDA memory call returned: allocation, free, VMM reserve/create/map/unmap (`CudaMemEvent`).
    CudaMem = 6,
    /// A CUDA synchronisation call returned (`CudaSyncEvent`).
    CudaSync = 7,
    /// Plaintext a traced process passed through OpenSSL's `SSL_read`/`SSL_write` (`DataEvent`
    /// with `ssl` set and `fd` unknown): the agent ties the `SSL *` to a connection.
    TlsData = 9,
    /// A traced process moved bytes on a socket that is not a client connection of its server
    /// (IPC to another process of the engine, or an outbound call; `sock:` path only):
    /// `DataEvent` with the first bytes moved, which the agent searches for request ids (latency
    /// attribution's hand-off matching) and keeps nothing else of. (8 was size-only IPC.)
    IpcData = 10,
    /// When each part of a server read's bytes reached the socket (`ArrivalEvent`), sent just
    /// before the read's `DataEvent` when they came in more than one arrival.
    Arrivals = 11,
}

impl EventKind {
    pub const fn from_u32(v: u32) -> Option<Self> {
        match v {
            1 => Some(Self::Data),
            2 => Some(Self::Accept),
            3 => Some(Self::Close),
            4 => Some(Self::Fork),
            5 => Some(Self::Exit),
            6 => Some(Self::CudaMem),
            7 => Some(Self::CudaSync),
            9 => Some(Self::TlsData),
            10 => Some(Self::IpcData),
            11 => Some(Self::Arrivals),
            _ => None,
        }
    }
}

/// Direction of a `DataEvent`, seen from the traced server.
pub const DIR_INGRESS: u32 = 0;
pub const DIR_EGRESS: u32 = 1;

/// Bytes captured per read/write syscall. Bounds the copy done in the traced thread and the
/// ring-buffer space per event; request heads, SSE/NDJSON events and small JSON bodies fit. A
/// longer transfer is delivered with `len > cap_len` so that framing can still skip it.
/// Must be a power of two (the kernel side masks offsets with `MAX_CAPTURE - 1`).
pub const MAX_CAPTURE: usize = 4096;
const _: () = assert!(MAX_CAPTURE.is_power_of_two());

/// Last bytes also captured of a response write longer than `MAX_CAPTURE`, after the first
/// `MAX_CAPTURE` (`DataEvent::tail_len`). A server that writes its last big event, the closing
/// events and the chunked terminator in one write (Node corks `res.write` + `res.end()` into one
/// writev) ends its response inside the uncaptured part; the tail lets framing see the end. 256
/// bytes hold a chunk's CRLF, a usage event, `data: [DONE]` and `0\r\n\r\n`.
pub const TAIL_CAPTURE: usize = 256;
const _: () = assert!(TAIL_CAPTURE.is_power_of_two() && TAIL_CAPTURE < MAX_CAPTURE);

/// iovecs walked per readv/writev/recvmsg/sendmsg call. Node's http module corks a chunked write
/// into 4 iovecs (size, CRLF, data, CRLF) and `res.end()` adds the last chunk and the `0\r\n\r\n`
/// terminator to the same writev (9 iovecs seen with strace); 16 covers 4 corked chunks. The
/// verifier walks every iteration: all programs load in 0.9 s of kernel time at 16 and 3.2 s at
/// 32 (measured on Linux 6.18). Bytes in further iovecs arrive as a truncated capture
/// (`len > cap_len`), counted in `counter::IOV_SKIPPED`.
pub const MAX_IOV: u32 = 16;

/// Fixed part of a data record; `cap_len` payload bytes follow it in the ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DataEvent {
    pub header: EventHeader,
    pub fd: u32,
    /// `DIR_INGRESS` or `DIR_EGRESS`.
    pub dir: u32,
    /// The syscall's return value: bytes moved, 0 for end-of-file, or `-errno`.
    pub ret: i64,
    /// Payload bytes that follow this struct (≤ `MAX_CAPTURE`, ≤ `ret`): the first bytes moved.
    pub cap_len: u32,
    /// The `SYSCALL_*` value that produced the event (for the syscall mix in diagnostics).
    pub syscall: u16,
    /// 0, or `TAIL_CAPTURE`: that many of the last bytes moved follow the `cap_len` payload bytes
    /// (egress writes longer than `MAX_CAPTURE` that moved every byte asked for).
    pub tail_len: u16,
    /// Ingress only: when the oldest unread bytes of this read reached the socket (the
    /// `sock:sk_data_ready` tracepoint), or 0 when unknown. A server whose event loop is busy reads a
    /// request late; users feel that wait, so request arrival uses this, not the read time.
    pub arrival_ns: u64,
    /// The calling thread's scheduler clock at `header.ts_ns` (all zero: unknown), so that the
    /// agent can split the time between two records of one thread into on-CPU, runnable and
    /// blocked (latency attribution).
    pub thread: ThreadClock,
    /// `TlsData` records: the `SSL *` the plaintext went through (per process); 0 on socket
    /// records.
    pub ssl: u64,
}
const _: () = assert!(size_of::<DataEvent>() == 96);

/// Arrivals an `ArrivalEvent` carries (the first, then the newest: a later arrival past the last
/// slot replaces the one there, an upper bound for the bytes of both).
pub const MAX_ARRIVAL_MARKS: usize = 4;

/// When the bytes of one server read reached the socket, by part: the read's bytes before offset
/// `ends[i]` that are not before `ends[i - 1]` came with the arrival at `ts_ns[i]` (from TCP
/// sequence numbers: `tcp_sock.rcv_nxt` at each `sk_data_ready`, `copied_seq` after the read).
/// Sent only when the read's bytes came in more than one arrival, just before its `DataEvent`
/// (same thread and fd), whose `arrival_ns` is `ts_ns[0]`. A request that begins past the read's
/// first byte (after HTTP/2 connection frames, behind a pipelined request) is dated by its part.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ArrivalEvent {
    pub header: EventHeader,
    pub fd: u32,
    /// Marks used (2 ..= `MAX_ARRIVAL_MARKS`).
    pub n: u32,
    /// Offsets in the read, non-decreasing, each ≤ the bytes read.
    pub ends: [u32; MAX_ARRIVAL_MARKS],
    pub ts_ns: [u64; MAX_ARRIVAL_MARKS],
}
const _: () = assert!(size_of::<ArrivalEvent>() == 24 + 8 + 16 + 32);
const _: () = assert!(MAX_ARRIVAL_MARKS.is_power_of_two());

/// Indexes in the kernel's `TCP_LAYOUT` map of the byte offsets (from BTF; 0: unknown) of
/// `tcp_sock.rcv_nxt` and `tcp_sock.copied_seq`.
pub const TCP_LAYOUT_RCV_NXT: u32 = 0;
pub const TCP_LAYOUT_COPIED_SEQ: u32 = 1;
pub const TCP_LAYOUT_LEN: u32 = 2;

/// A thread's scheduler totals at one moment: `ThreadTime`'s counters with the interval it is in
/// added up to that moment. All zero when the thread is not known (thread states not attached,
/// or the thread has not left a CPU since attach). Differences between two clocks of one thread
/// split the time between them exactly into the three states.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ThreadClock {
    pub on_cpu_ns: u64,
    pub runnable_ns: u64,
    pub blocked_ns: u64,
    /// `ThreadTime::repairs` then: a split between two clocks whose counts differ would be wrong
    /// (a scheduler event of the thread was not seen in between), and is not made.
    pub repairs: u32,
    pub _pad: u32,
}
const _: () = assert!(size_of::<ThreadClock>() == 32);

impl ThreadClock {
    pub const fn is_known(&self) -> bool {
        self.on_cpu_ns | self.runnable_ns | self.blocked_ns != 0
    }
}

/// Accept and close of a tracked socket.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnEvent {
    pub header: EventHeader,
    pub fd: u32,
    pub _pad: u32,
}
const _: () = assert!(size_of::<ConnEvent>() == 32);

/// Fork (child tgid in `other`) and exit (`other` = exit code) of a traced process.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProcEvent {
    pub header: EventHeader,
    pub other: u32,
    pub _pad: u32,
}
const _: () = assert!(size_of::<ProcEvent>() == 32);

/// Key of the tracked-socket map: a server-side TCP connection of a traced process.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ConnKey {
    pub tgid: u32,
    pub fd: u32,
}
const _: () = assert!(size_of::<ConnKey>() == 8);

/// Syscall arguments saved at `sys_enter_*`, consumed at `sys_exit_*`, keyed by thread id.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PendingIo {
    /// Plain buffer (read/write/recvfrom/sendto) or the `struct iovec *` array.
    pub buf: u64,
    /// Number of iovecs; 0 means `buf` is a plain buffer.
    pub iovcnt: u32,
    pub fd: u32,
    pub syscall: u32,
    pub dir: u32,
    /// `struct sock *` of the socket, set by the `sock_recv_length` tracepoint during the syscall
    /// (syscall path) or known from the tracepoint itself (`sock:` path).
    pub sk: u64,
    /// `bpf_ktime_get_ns()` at syscall entry. Egress records carry this time: the bytes reach the
    /// peer inside the syscall, and the writer can be preempted by the woken reader before its
    /// syscall exit (seen as a 2 ms skew on loopback).
    pub enter_ns: u64,
    /// The thread's clock at the time the record is dated by (egress: entry; ingress: the read).
    pub thread: ThreadClock,
}
const _: () = assert!(size_of::<PendingIo>() == 72);

/// Scheduler time of one thread of a traced process (`THREADS` map, task address → this), kept
/// by the `sched_switch` / `sched_wakeup` / `sched_waking` programs: where the thread has been since it was first
/// seen. The agent reads the map; the time in the current state since `since_ns` is not yet added.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ThreadTime {
    pub tgid: u32,
    pub tid: u32,
    /// `THREAD_*`.
    pub state: u32,
    /// Times this entry was found in a state the thread could not be in (`counter::THREAD_REPAIRS`
    /// counts them for all threads): a switch-in or wake-up was not seen, and the time since the
    /// entry's last change stayed in the state it named.
    pub repairs: u32,
    /// `bpf_ktime_get_ns()` when the thread entered `state`.
    pub since_ns: u64,
    pub on_cpu_ns: u64,
    /// Runnable, waiting for a CPU (run-queue delay).
    pub runnable_ns: u64,
    /// Sleeping or waiting (futex, I/O, the other process).
    pub blocked_ns: u64,
    /// When the thread's socket send in progress began queueing bytes (its first
    /// `tcp_sendmsg_locked`; 0: none), and the thread's clock then — the time a response write is
    /// dated by, kept here instead of a map of its own so that a send costs no map update
    /// (probe-ebpf/src/sockio.rs). Written and cleared by the thread itself; the agent ignores it.
    pub send_start_ns: u64,
    pub send_clock: ThreadClock,
    /// The task address (`THREADS` key) of the thread of the same process that last woke this one
    /// (`sched_waking`, in the waker's context; 0: none seen). An IPC call made by a thread that
    /// serves no client connection is dated with its waker's clock when the waker does: vLLM's
    /// event-loop thread hands a request to ZMQ's I/O thread by waking it (docs/attribution.md).
    pub waker: u64,
    /// The task address of the thread of the same process this one last woke (0: none seen).
    /// The other way round: vLLM's ZMQ thread that receives EngineCore's outputs (ZMQ runs two
    /// I/O threads there) is not woken by the event loop, but wakes it for each output.
    pub wakee: u64,
    /// 1 once the thread has read or written a client connection of its server (`sock:` path).
    pub serving: u32,
    pub _pad: u32,
    /// The task's `sched_info.last_arrival` (run-queue clock of its last switch-in) read when
    /// the entry last left on-CPU (0: not known). Another thread's call dated on this one's clock
    /// (`waker`, `wakee`) compares it with the task's current value: a change is a switch-in no
    /// program saw. Exact, unlike comparing run-queue and `bpf_ktime_get_ns` times, whose skew
    /// is learnt per CPU and can be off by more than a short time slice.
    pub arrival: u64,
}
const _: () = assert!(size_of::<ThreadTime>() == 120);

/// Values of `ThreadTime::state`.
pub const THREAD_ON_CPU: u32 = 0;
pub const THREAD_RUNNABLE: u32 = 1;
pub const THREAD_BLOCKED: u32 = 2;
/// The thread exited; its entry waits for the agent's last read.
pub const THREAD_EXITED: u32 = 3;
/// Index in the kernel's `TASK_LAYOUT` map of the byte offset of
/// `task_struct.sched_info.last_arrival` (the run-queue clock of the task's last switch-in), set
/// by the agent from the running kernel's BTF; 0 there means unknown.
pub const TASK_LAYOUT_LAST_ARRIVAL: u32 = 0;
/// Index in `TASK_LAYOUT` of the byte offset of `task_struct.group_leader` (the process's main
/// thread), whose clock dates an engine's IPC calls made by its helper threads.
pub const TASK_LAYOUT_GROUP_LEADER: u32 = 1;
/// Entries of `TASK_LAYOUT`.
pub const TASK_LAYOUT_LEN: u32 = 2;
/// Threads of traced processes whose scheduler time is kept (vLLM: a few hundred).
pub const MAX_THREADS: u32 = 16 * 1024;

/// Values of `DataEvent::syscall` and `PendingIo::syscall`.
pub const SYSCALL_READ: u32 = 0;
pub const SYSCALL_READV: u32 = 1;
pub const SYSCALL_RECVFROM: u32 = 2;
pub const SYSCALL_RECVMSG: u32 = 3;
pub const SYSCALL_WRITE: u32 = 4;
pub const SYSCALL_WRITEV: u32 = 5;
pub const SYSCALL_SENDTO: u32 = 6;
pub const SYSCALL_SENDMSG: u32 = 7;
pub const SYSCALL_ACCEPT: u32 = 8;
pub const SYSCALL_ACCEPT4: u32 = 9;
pub const SYSCALL_CLOSE: u32 = 10;
/// Socket I/O seen by the `sock:` capture path from a syscall whose buffer it does not read
/// (sendfile, splice, sendmmsg, recvmmsg, io_uring): delivered with `cap_len` 0 so that framing
/// still counts the bytes.
pub const SYSCALL_OTHER: u32 = 11;
/// Plaintext from OpenSSL's `SSL_read`/`SSL_read_ex` and `SSL_write`/`SSL_write_ex`
/// (`EventKind::TlsData`).
pub const SYSCALL_SSL_READ: u32 = 12;
pub const SYSCALL_SSL_WRITE: u32 = 13;
pub const SYSCALL_NAMES: [&str; 14] = [
    "read",
    "readv",
    "recvfrom",
    "recvmsg",
    "write",
    "writev",
    "sendto",
    "sendmsg",
    "accept",
    "accept4",
    "close",
    "other",
    "ssl_read",
    "ssl_write",
];

/// Values of the tracked-connection map `CONNS` (`ConnKey` → u64). The syscall capture path only
/// tests presence and stores `CONN_SK_UNKNOWN`; the `sock:` path stores the connection's
/// `struct sock *` once it has seen it, so that a reused fd is told from the connection it
/// replaced, and marks a connection the agent gave up on by setting `CONN_IGNORED` on it (kernel
/// pointers are 8-aligned, so bit 0 is free).
pub const CONN_SK_UNKNOWN: u64 = 0;
pub const CONN_IGNORED: u64 = 1;

/// The x86-64 syscall ABI as the `sock:` capture path reads it from the task's saved user
/// registers (`bpf_task_pt_regs`): offsets in `struct pt_regs` (arch/x86/include/asm/ptrace.h)
/// and syscall numbers (arch/x86/entry/syscalls/syscall_64.tbl). The agent uses that path only
/// on x86-64.
pub mod regs {
    /// `dx`, `si`, `di`, `orig_ax`: four consecutive 8-byte slots from this offset.
    pub const PT_REGS_DX: usize = 12 * 8;
    /// Bytes read from `PT_REGS_DX`: third, second and first argument, syscall number.
    pub const PT_REGS_SPAN: usize = 4 * 8;
    pub const NR_READ: u64 = 0;
    pub const NR_WRITE: u64 = 1;
    pub const NR_READV: u64 = 19;
    pub const NR_WRITEV: u64 = 20;
    pub const NR_SENDTO: u64 = 44;
    pub const NR_RECVFROM: u64 = 45;
    pub const NR_SENDMSG: u64 = 46;
    pub const NR_RECVMSG: u64 = 47;
}

/// Indexes of the per-CPU counter array `COUNTERS` (summed by the agent at scrape time).
pub mod counter {
    /// Records the kernel tried to deliver (delivered + lost).
    pub const EVENTS_SEEN: u32 = 0;
    /// Ring buffer full: `bpf_ringbuf_output` failed.
    pub const LOST_RINGBUF_FULL: u32 = 1;
    /// A pending-syscall or connection map had no room for a new entry.
    pub const LOST_MAP_FULL: u32 = 2;
    /// `bpf_probe_read_user` of the payload failed (page not resident, bad pointer).
    pub const LOST_READ_USER: u32 = 3;
    /// Payload longer than `MAX_CAPTURE`: delivered truncated (not lost; counted for visibility).
    pub const TRUNCATED: u32 = 4;
    /// iovecs beyond `MAX_IOV` not captured.
    pub const IOV_SKIPPED: u32 = 5;
    /// A running thread's `THREADS` entry said runnable or blocked (a scheduler event was not
    /// seen); repaired at that moment (probe-ebpf/src/threads.rs).
    pub const THREAD_REPAIRS: u32 = 6;
    pub const COUNT: u32 = 7;
}

/// Benchmark floors of the `sock:` capture path (`llm-probe run --bench-floor`; the value of the
/// programs' `BENCH_FLOOR` global, set at load): what capture costs a traced server before it does
/// any of its work (docs/BENCHMARKS.md, *The floor*). Nothing is measured under a floor.
pub mod floor {
    /// Normal capture.
    pub const OFF: u32 = 0;
    /// Every `sock:` and scheduler program returns at its first instruction: the cost of having
    /// them attached at all.
    pub const HOOKS: u32 = 1;
    /// As `HOOKS`, except that every send of a traced process writes one bare record (a header,
    /// no payload, no thread clock): the least a capture that dates each write can do.
    pub const RECORDS: u32 = 2;
}

/// Wake the agent only once this many bytes wait in the ring buffer; below it the agent drains on a
/// timer. Batching wakeups keeps the cost in the traced thread near the bare uprobe/tracepoint cost
/// (an adaptive wakeup per event costs ~1.4 µs there). Must stay well below `RING_BYTES`.
pub const WAKEUP_BYTES: u64 = 64 * 1024;
/// Ring buffer size. 8 MiB holds ~2 s of a 64-stream server at 100 tokens/s per stream even if
/// the agent stalls, and is a power-of-two multiple of the page size as the kernel requires.
pub const RING_BYTES: u32 = 8 * 1024 * 1024;
/// Concurrent syscalls in flight across all traced threads (one entry per thread in a syscall).
pub const MAX_PENDING: u32 = 16 * 1024;
/// Tracked server-side connections across all traced processes.
pub const MAX_CONNS: u32 = 64 * 1024;
/// Traced processes (the attach targets and their descendants).
pub const MAX_TARGETS: u32 = 1024;
/// Slots of the kernel's `TGID_SLOTS` filter in front of `TARGETS`: a slot per `tgid` modulo
/// this (a power of two). A slot is 1 when a traced process may map to it, so an untraced
/// process's event leaves at an array read (which the verifier inlines) instead of a hash lookup.
pub const TARGET_SLOTS: u32 = 1 << 16;
const _: () = assert!(TARGET_SLOTS.is_power_of_two());

/// The `TGID_SLOTS` slot of `tgid`.
#[inline(always)]
pub const fn target_slot(tgid: u32) -> u32 {
    tgid & (TARGET_SLOTS - 1)
}
/// TCP ports the traced servers listen on (for socket-arrival stamping and admission). Engines
/// hold many besides their API port: each vLLM worker listens on about 13 (gloo's), so 64 ran out
/// at tensor parallelism 5.
pub const MAX_LISTEN_PORTS: u32 = 1024;

pub mod cuda;

/// OpenSSL entry points the TLS uprobes attach to; the value of `SHAPES` is the attach cookie.
pub mod ssl {
    /// The `_ex` form: returns 1 and writes the byte count through its fourth argument.
    pub const EX: u32 = 1;
    /// Plaintext going out (`SSL_write*`); otherwise coming in.
    pub const WRITE: u32 = 2;
    /// Every probed symbol and its shape.
    pub const SHAPES: [(&str, u32); 4] = [
        ("SSL_read", 0),
        ("SSL_read_ex", EX),
        ("SSL_write", WRITE),
        ("SSL_write_ex", WRITE | EX),
    ];
}
pub mod tracepoint;

/// The clock of every kernel timestamp (`bpf_ktime_get_ns` is `CLOCK_MONOTONIC`), read from user
/// space: the agent's housekeeping and the test clients compare their own times with the kernel's.
#[cfg(feature = "clock")]
pub mod clock {
    /// `CLOCK_MONOTONIC` in nanoseconds.
    pub fn monotonic_ns() -> u64 {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: valid pointer to a local timespec; CLOCK_MONOTONIC cannot fail.
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut ts) };
        ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
    }
}
pub use cuda::{CudaMemEvent, CudaSyncEvent, CudaThread, CudartText, STACK_DEPTH};

#[cfg(feature = "user")]
mod user {
    // SAFETY: every type below is `#[repr(C)]`, `Copy`, made only of integers, and has no padding
    // (sizes pinned above), so any bit pattern is a valid value.
    unsafe impl aya::Pod for super::ConnKey {}
    unsafe impl aya::Pod for super::PendingIo {}
    unsafe impl aya::Pod for super::EventHeader {}
    unsafe impl aya::Pod for super::ThreadTime {}
    unsafe impl aya::Pod for super::CudaThread {}
    unsafe impl aya::Pod for super::CudaMemEvent {}
    unsafe impl aya::Pod for super::CudartText {}
}
