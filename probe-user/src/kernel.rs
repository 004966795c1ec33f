//! The only module that touches aya: loads the embedded kernel object, attaches every program,
//! and owns the maps the agent writes (`TARGETS`, `CONNS`, `LISTEN_PORTS`) and reads (`COUNTERS`,
//! and the CUDA maps in `cuda`). Degrades instead of dying: a program that fails to attach is
//! logged and reported as `llm_probe_attached{program} 0`; only the socket path is required.

mod choice;
pub mod cuda;
mod layout;
mod misses;
pub mod ssl;
mod targets;
mod threads;

use aya::{
    maps::{HashMap, MapData, PerCpuArray, RingBuf},
    programs::{RawTracePoint, TracePoint},
    Ebpf, EbpfError,
};
use probe_common::{counter, tracepoint, ConnKey, CONN_IGNORED, CONN_SK_UNKNOWN};

use crate::metrics::probe::KernelCounters;
pub use choice::{BenchFloor, CaptureChoice};

/// The ring buffer the kernel programs write records into (read by the agent's ingest loop).
pub type Ring = RingBuf<MapData>;

/// The kernel object built by build.rs (empty when built with `AYA_BUILD_SKIP=1`).
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/probe"));

/// One tracepoint program: its name in the object, the tracepoint it attaches to, whether it is a
/// raw tracepoint program (`TP_PROTO` arguments, no record layout to check), and whether requests
/// can be timed without it (`required`: the socket capture of its path).
#[derive(Clone, Copy, Debug)]
pub struct Program {
    pub name: &'static str,
    pub category: &'static str,
    pub event: &'static str,
    pub raw: bool,
    pub required: bool,
}

const fn prog(name: &'static str, category: &'static str, required: bool) -> Program {
    Program {
        name,
        category,
        event: name,
        raw: false,
        required,
    }
}

/// A raw tracepoint program: skipped by the kernel only when nested in itself, where a classic
/// one is skipped whenever any kprobe/tracepoint program runs on that CPU (probe-ebpf/src/
/// threads.rs); and cheaper (no trace record is formatted).
const fn raw(name: &'static str, category: &'static str) -> Program {
    Program {
        raw: true,
        ..prog(name, category, false)
    }
}

/// Socket capture from `sock:`/`tcp:` tracepoints (raw), which fire only inside socket calls:
/// processes that are not traced pay nothing for their syscalls (probe-ebpf/src/sockio.rs). Needs x86-64,
/// `sock_{send,recv}_length` (Linux 6.3), `tcp_sendmsg_locked` (6.6) and `bpf_task_pt_regs`.
pub const SOCK_PATH: &[Program] = &[
    Program {
        name: "sock_recv_data",
        category: "sock",
        event: "sock_recv_length",
        raw: true,
        required: true,
    },
    Program {
        name: "sock_send_data",
        category: "sock",
        event: "sock_send_length",
        raw: true,
        required: true,
    },
    Program {
        name: "tcp_send_start",
        category: "tcp",
        event: "tcp_sendmsg_locked",
        raw: true,
        required: true,
    },
];

/// Socket capture from syscall tracepoints: loads on every kernel we target, but while attached
/// every syscall of every process on the machine takes the slow path (docs/BENCHMARKS.md).
pub const SYSCALL_PATH: &[Program] = &[
    prog("sys_enter_read", "syscalls", true),
    prog("sys_exit_read", "syscalls", true),
    prog("sys_enter_readv", "syscalls", false),
    prog("sys_exit_readv", "syscalls", false),
    prog("sys_enter_recvfrom", "syscalls", true),
    prog("sys_exit_recvfrom", "syscalls", true),
    prog("sys_enter_recvmsg", "syscalls", false),
    prog("sys_exit_recvmsg", "syscalls", false),
    prog("sys_enter_write", "syscalls", true),
    prog("sys_exit_write", "syscalls", true),
    prog("sys_enter_writev", "syscalls", false),
    prog("sys_exit_writev", "syscalls", false),
    prog("sys_enter_sendto", "syscalls", true),
    prog("sys_exit_sendto", "syscalls", true),
    prog("sys_enter_sendmsg", "syscalls", false),
    prog("sys_exit_sendmsg", "syscalls", false),
    prog("sys_exit_accept", "syscalls", false),
    prog("sys_exit_accept4", "syscalls", true),
    prog("sys_enter_close", "syscalls", true),
    // Names the socket of a read in flight, for its arrival stamp.
    prog("sock_recv_length", "sock", false),
];

/// Programs of both paths.
pub const COMMON: &[Program] = &[
    prog("task_newtask", "task", false),
    prog("sched_process_exit", "sched", false),
    // Without these two, request arrival falls back to the server's first read (and the sock
    // path learns no new connection).
    prog("inet_sock_set_state", "sock", false),
    raw("sk_data_ready", "sock"),
];

/// Thread states (on-CPU / runnable / blocked) of the traced processes, and the thread clocks of
/// latency attribution (`--thread-states`); `sched_waking` names the thread of the process that
/// woke another (an IPC thread's hand-off dated on the serving thread's clock).
pub const THREAD_STATES: &[Program] = &[
    raw("sched_switch", "sched"),
    raw("sched_wakeup", "sched"),
    raw("sched_waking", "sched"),
];

/// The socket capture path in use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CapturePath {
    Sock,
    Syscalls,
}

impl CapturePath {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Sock => "sock",
            Self::Syscalls => "syscalls",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(
        "this llm-probe was built without its kernel programs (AYA_BUILD_SKIP); rebuild with \
         `cargo xtask build`"
    )]
    NoObject,
    #[error(
        "loading the eBPF object failed (root, or CAP_BPF + CAP_PERFMON, are needed; in a \
         container that has them, \"Operation not permitted\" comes from the seccomp profile: \
         CRI-O's and podman's default allows bpf(2) only with CAP_SYS_ADMIN, use seccomp \
         Unconfined there, see deploy/kubernetes/daemonset.yaml)"
    )]
    Load(#[from] EbpfError),
    #[error("the eBPF object lacks map {0}")]
    MissingMap(&'static str),
    #[error("map {0}: {1}")]
    Map(&'static str, #[source] aya::maps::MapError),
    #[error("no required program could be attached: {}", .0.join(", "))]
    NothingAttached(Vec<&'static str>),
    #[error(
        "--capture sock: the sock: capture path did not load here ({0}); use --capture auto \
         or syscalls"
    )]
    SockPathRefused(String),
}

/// Why one tracepoint program is not attached.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error("program missing from the object")]
    Missing,
    #[error("not a tracepoint program: {0}")]
    Kind(#[source] aya::programs::ProgramError),
    #[error("load: {0}")]
    Load(#[source] aya::programs::ProgramError),
    #[error("attach: {0}")]
    Attach(#[source] aya::programs::ProgramError),
    #[error("the kernel's record layout differs from the program's: {0}")]
    Layout(String),
    #[error("turned off (--thread-states off)")]
    Off,
}

/// Result of attaching one program.
#[derive(Debug)]
pub struct Attached {
    pub program: &'static str,
    pub ok: bool,
    pub error: Option<AttachError>,
}

/// The loaded object. Dropping it detaches every program (aya owns the links).
pub struct Kernel {
    /// Owns the programs and their links (the CUDA uprobes are attached later, per library).
    ebpf: Ebpf,
    targets: targets::TargetMaps,
    conns: HashMap<MapData, ConnKey, u64>,
    listen_ports: HashMap<MapData, u16, u32>,
    counters: PerCpuArray<MapData, u64>,
    /// Per-thread scheduler time (`threads`); `None` if the object lacks it.
    threads: Option<HashMap<MapData, u64, probe_common::ThreadTime>>,
    pub attached: Vec<Attached>,
    /// The socket capture path in use.
    pub capture: CapturePath,
    /// Programs of the `sock:` path that failed before the agent fell back to syscalls (reported
    /// as `llm_probe_attached 0`, not counted against health: capture works).
    pub refused: Vec<Attached>,
    /// CUDA uprobe state (`cuda`); `None` when its programs failed to load.
    cuda: Option<cuda::CudaProbes>,
    /// OpenSSL uprobe state (`ssl`); `None` when its programs failed to load.
    ssl: Option<ssl::SslProbes>,
}

fn take<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, LoadError>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf.take_map(name).ok_or(LoadError::MissingMap(name))?;
    T::try_from(map).map_err(|e| LoadError::Map(name, e))
}

impl Kernel {
    /// Load and attach. Returns the kernel handle and the ring buffer (read by the agent's task).
    pub fn load(
        choice: CaptureChoice,
        thread_states: bool,
        floor: BenchFloor,
    ) -> Result<(Self, Ring), LoadError> {
        if OBJECT.is_empty() {
            return Err(LoadError::NoObject);
        }
        raise_memlock();
        ensure_tracefs();
        let mut ebpf = aya::EbpfLoader::new()
            .override_global("BENCH_FLOOR", &floor.value(), true)
            .load(OBJECT)?;
        let mut refused = Vec::new();
        let mut capture = CapturePath::Syscalls;
        let mut attached = Vec::new();
        if choice != CaptureChoice::Syscalls {
            let sock = if cfg!(target_arch = "x86_64") {
                attach_all(&mut ebpf, SOCK_PATH)
            } else {
                Vec::new()
            };
            if !sock.is_empty() && sock.iter().all(|a| a.ok) {
                capture = CapturePath::Sock;
                attached = sock;
            } else {
                let why = if sock.is_empty() {
                    "it reads x86-64 registers".to_string()
                } else {
                    sock.iter()
                        .filter_map(|a| a.error.as_ref().map(|e| format!("{}: {e}", a.program)))
                        .collect::<Vec<_>>()
                        .join("; ")
                };
                for p in SOCK_PATH {
                    // Detaches what did attach: no half path stays behind.
                    let tp = ebpf
                        .program_mut(p.name)
                        .and_then(|prog| <&mut RawTracePoint>::try_from(prog).ok());
                    if let Some(tp) = tp {
                        let _ = tp.unload();
                    }
                }
                if choice == CaptureChoice::Sock {
                    return Err(LoadError::SockPathRefused(why));
                }
                log::warn!(
                    "socket capture: the sock: path did not load ({why}); falling back to \
                     syscall tracepoints, which slow every syscall of every process on this \
                     machine while attached"
                );
                refused = sock;
            }
        }
        if capture == CapturePath::Syscalls {
            attached = attach_all(&mut ebpf, SYSCALL_PATH);
        }
        log::info!(
            "socket capture path: {} ({})",
            capture.as_str(),
            attached
                .iter()
                .filter(|a| a.ok)
                .map(|a| a.program)
                .collect::<Vec<_>>()
                .join(", ")
        );
        attached.extend(attach_all(&mut ebpf, COMMON));
        if thread_states {
            attached.extend(attach_all(&mut ebpf, THREAD_STATES));
        } else {
            log::info!(
                "thread states off: no sched_switch/sched_wakeup/sched_waking programs, no thread splits"
            );
            refused.extend(THREAD_STATES.iter().map(|p| Attached {
                program: p.name,
                ok: false,
                error: Some(AttachError::Off),
            }));
        }
        let all: Vec<&Program> = SOCK_PATH.iter().chain(SYSCALL_PATH).chain(COMMON).collect();
        let missing: Vec<_> = attached
            .iter()
            .filter(|a| !a.ok && all.iter().any(|p| p.name == a.program && p.required))
            .map(|a| a.program)
            .collect();
        if !missing.is_empty() {
            return Err(LoadError::NothingAttached(missing));
        }
        let ring = take::<Ring>(&mut ebpf, "EVENTS")?;
        let targets =
            targets::TargetMaps::new(take(&mut ebpf, "TARGETS")?, take(&mut ebpf, "TGID_SLOTS")?);
        let conns = take(&mut ebpf, "CONNS")?;
        let listen_ports = take(&mut ebpf, "LISTEN_PORTS")?;
        let counters = take(&mut ebpf, "COUNTERS")?;
        layout::set_layouts(&mut ebpf);
        let threads = take(&mut ebpf, "THREADS")
            .inspect_err(|e| log::warn!("thread states unavailable: {e}"))
            .ok();
        let cuda = cuda::CudaProbes::load(&mut ebpf)
            .inspect_err(|e| log::warn!("CUDA probes unavailable: {e:#}"))
            .ok();
        let ssl = ssl::SslProbes::load(&mut ebpf)
            .inspect_err(|e| log::warn!("TLS (OpenSSL) probes unavailable: {e}"))
            .ok();
        Ok((
            Self {
                ebpf,
                targets,
                conns,
                listen_ports,
                counters,
                threads,
                attached,
                capture,
                refused,
                cuda,
                ssl,
            },
            ring,
        ))
    }

    pub fn add_target(&mut self, tgid: u32) -> Result<(), LoadError> {
        self.targets.add(tgid)
    }

    pub fn remove_target(&mut self, tgid: u32) {
        self.targets.remove(tgid);
    }

    /// Bring the kernel's process filter up to date with `TARGETS` (forks and exits the kernel
    /// handled itself); once per housekeeping tick.
    pub fn sync_targets(&mut self) {
        self.targets.sync();
    }

    pub fn track_conn(&mut self, tgid: u32, fd: u32) -> Result<(), LoadError> {
        self.conns
            .insert(ConnKey { tgid, fd }, CONN_SK_UNKNOWN, 0)
            .map_err(|e| LoadError::Map("CONNS", e))
    }

    /// Ports whose sockets get arrival stamps (the ports traced servers listen on).
    pub fn add_listen_port(&mut self, port: u16) -> Result<(), LoadError> {
        self.listen_ports
            .insert(port, 1, 0)
            .map_err(|e| LoadError::Map("LISTEN_PORTS", e))
    }

    /// Stop capturing a connection (it carries something that is not HTTP/1.x). On the `sock:`
    /// path the entry stays, marked, so that the connection is not admitted again on its next
    /// read; a new connection under the same fd replaces it.
    pub fn untrack_conn(&mut self, tgid: u32, fd: u32) {
        let key = ConnKey { tgid, fd };
        match self.conns.get(&key, 0) {
            Ok(sk) if sk > CONN_IGNORED => {
                let _ = self.conns.insert(key, sk | CONN_IGNORED, 0);
            }
            _ => {
                let _ = self.conns.remove(&key);
            }
        }
    }

    pub fn counters(&self) -> KernelCounters {
        let sum = |i: u32| -> u64 {
            self.counters
                .get(&i, 0)
                .map_or(0, |v| v.iter().copied().sum())
        };
        KernelCounters {
            seen: sum(counter::EVENTS_SEEN),
            lost_ringbuf_full: sum(counter::LOST_RINGBUF_FULL),
            lost_map_full: sum(counter::LOST_MAP_FULL),
            read_user_failed: sum(counter::LOST_READ_USER),
            truncated: sum(counter::TRUNCATED),
            iov_skipped: sum(counter::IOV_SKIPPED),
            thread_repairs: sum(counter::THREAD_REPAIRS),
        }
    }
}

/// Largest tracepoint format file read; real ones are under 2 KiB.
const MAX_FORMAT_BYTES: u64 = 64 * 1024;

/// `(name, offset, size)` of every field in a tracepoint's format text
/// (`field:unsigned int fd;\toffset:16;\tsize:8;\tsigned:0;`).
pub fn format_fields(text: &str) -> Vec<(&str, usize, usize)> {
    text.lines()
        .filter_map(|line| {
            let decl = line.trim().strip_prefix("field:")?.split(';').next()?;
            // The name is the declaration's last word, without an array suffix.
            let name = decl.rsplit([' ', '*']).next()?.split('[').next()?;
            let num = |key: &str| -> Option<usize> {
                line.split(';')
                    .find_map(|p| p.trim().strip_prefix(key))?
                    .trim()
                    .parse()
                    .ok()
            };
            Some((name, num("offset:")?, num("size:")?))
        })
        .collect()
}

/// Check that the running kernel lays out the fields program `event` reads where the program
/// reads them (`probe_common::tracepoint`); a program reading the wrong bytes would record wrong
/// pids or sockets rather than fail. Syscall records: the first argument or the return value in
/// an 8-byte slot at `SYSCALL_ARGS_OFFSET`. A format file that cannot be read is not a mismatch
/// (attach reports a missing tracefs itself).
fn check_layout(category: &str, event: &str) -> Result<(), String> {
    use std::io::Read as _;
    let Some(dir) = TRACEFS
        .iter()
        .map(|t| {
            std::path::Path::new(t)
                .join("events")
                .join(category)
                .join(event)
        })
        .find(|d| d.is_dir())
    else {
        return Ok(());
    };
    let mut text = String::new();
    if std::fs::File::open(dir.join("format"))
        .and_then(|f| f.take(MAX_FORMAT_BYTES).read_to_string(&mut text))
        .is_err()
    {
        return Ok(());
    }
    let fields = format_fields(&text);
    let has = |offset: usize, size: usize| fields.iter().any(|&(_, o, s)| o == offset && s == size);
    if category == "syscalls" {
        if has(tracepoint::SYSCALL_ARGS_OFFSET, 8) {
            return Ok(());
        }
        return Err(format!(
            "no 8-byte field at offset {} in {category}:{event}",
            tracepoint::SYSCALL_ARGS_OFFSET
        ));
    }
    for f in tracepoint::FIELDS
        .iter()
        .filter(|f| f.category == category && f.event == event)
    {
        let found = fields.iter().find(|(n, ..)| *n == f.name);
        if found.is_none_or(|&(_, o, s)| o != f.offset || s != f.size) {
            return Err(format!(
                "{category}:{event} field {} is {:?} (offset, size) here, the program reads ({}, {})",
                f.name,
                found.map(|&(_, o, s)| (o, s)),
                f.offset,
                f.size
            ));
        }
    }
    Ok(())
}

/// Where the kernel's own tracefs mount point is, and the older one under debugfs.
const TRACEFS: [&str; 2] = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"];

/// Load and attach each of `programs`, checking its record layout first; failures are logged and
/// returned, never fatal here.
fn attach_all(ebpf: &mut Ebpf, programs: &[Program]) -> Vec<Attached> {
    programs
        .iter()
        .map(|p| {
            let result = (|| -> Result<(), AttachError> {
                let prog = ebpf.program_mut(p.name).ok_or(AttachError::Missing)?;
                if p.raw {
                    let tp: &mut RawTracePoint = prog.try_into().map_err(AttachError::Kind)?;
                    tp.load().map_err(AttachError::Load)?;
                    tp.attach(p.event).map_err(AttachError::Attach)?;
                    return Ok(());
                }
                check_layout(p.category, p.event).map_err(AttachError::Layout)?;
                let tp: &mut TracePoint = prog.try_into().map_err(AttachError::Kind)?;
                tp.load().map_err(AttachError::Load)?;
                tp.attach(p.category, p.event)
                    .map_err(AttachError::Attach)?;
                Ok(())
            })();
            if let Err(e) = &result {
                log::warn!(
                    "program {} ({}:{}) not attached: {e}",
                    p.name,
                    p.category,
                    p.event
                );
            }
            Attached {
                program: p.name,
                ok: result.is_ok(),
                error: result.err(),
            }
        })
        .collect()
}

/// Tracepoint programs are attached by the ids tracefs lists (`events/<category>/<name>/id`).
/// Hosts usually mount it (systemd does); a minimal VM or a fresh container may not. Then mount
/// it at the kernel's own mount point, as `mount -t tracefs nodev /sys/kernel/tracing` would
/// (needs `CAP_SYS_ADMIN`; without it the attach errors below say "tracefs not found").
fn ensure_tracefs() {
    if TRACEFS
        .iter()
        .any(|p| std::path::Path::new(p).join("events").is_dir())
    {
        return;
    }
    // SAFETY: NUL-terminated literals and a null data pointer, as mount(2) allows for tracefs.
    let rc = unsafe {
        libc::mount(
            c"nodev".as_ptr(),
            c"/sys/kernel/tracing".as_ptr(),
            c"tracefs".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc == 0 {
        log::info!("tracefs was not mounted: mounted it at /sys/kernel/tracing");
    } else {
        log::warn!(
            "tracefs is not mounted and mounting it at /sys/kernel/tracing failed ({}):              tracepoint programs cannot attach; mount it (mount -t tracefs nodev              /sys/kernel/tracing) or give the agent the host's",
            std::io::Error::last_os_error()
        );
    }
}

/// Kernels before 5.11 charge BPF maps to `RLIMIT_MEMLOCK`; newer ones use memcg and ignore it.
fn raise_memlock() {
    let rlim = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: plain syscall with a valid pointer to a local.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &raw const rlim) } != 0 {
        log::debug!("setrlimit(RLIMIT_MEMLOCK) failed; fine on kernels ≥ 5.11");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The parser reads the format files of this kernel family (text as in Linux 6.18).
    #[test]
    fn format_fields_of_real_format_text() {
        let text = "name: sched_process_exit\nID: 321\nformat:\n\
            \tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;\n\
            \tfield:char comm[16];\toffset:8;\tsize:16;\tsigned:0;\n\
            \tfield:pid_t pid;\toffset:24;\tsize:4;\tsigned:1;\n\
            \tfield:bool group_dead;\toffset:32;\tsize:1;\tsigned:0;\n\
            \tfield:const void * skaddr;\toffset:8;\tsize:8;\tsigned:0;\n\
            \nprint fmt: \"comm=%s pid=%d\"\n";
        let f = format_fields(text);
        assert!(f.contains(&("group_dead", 32, 1)), "{f:?}");
        assert!(f.contains(&("comm", 8, 16)), "{f:?}");
        assert!(f.contains(&("skaddr", 8, 8)), "{f:?}");
        assert!(f.contains(&("common_type", 0, 2)), "{f:?}");
        assert!(format_fields("garbage\nfield:\n").is_empty());
    }

    /// Every fixed field the programs read is where this kernel puts it (when tracefs is there).
    #[test]
    fn this_kernel_matches_the_programs() {
        for f in tracepoint::FIELDS {
            assert_eq!(check_layout(f.category, f.event), Ok(()), "{f:?}");
        }
        assert_eq!(check_layout("syscalls", "sys_enter_read"), Ok(()));
        assert_eq!(check_layout("syscalls", "sys_exit_read"), Ok(()));
    }
}
