//! The only module that touches aya: loads the embedded kernel object, attaches every program,
//! and owns the maps the agent writes (`TARGETS`, `CONNS`, `LISTEN_PORTS`) and reads (`COUNTERS`,
//! and the CUDA maps in `cuda`). Degrades instead of dying: a program that fails to attach is
//! logged and reported as `llm_probe_attached{program} 0`; only the socket path is required.

pub mod cuda;

use aya::{
    maps::{HashMap, MapData, PerCpuArray, RingBuf},
    programs::TracePoint,
    Ebpf, EbpfError,
};
use probe_common::{counter, tracepoint, ConnKey};

use crate::metrics::probe::KernelCounters;

/// The ring buffer the kernel programs write records into (read by the agent's ingest loop).
pub type Ring = RingBuf<MapData>;

/// The kernel object built by build.rs (empty when built with `AYA_BUILD_SKIP=1`).
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/probe"));

/// (program = tracepoint name, tracepoint category, required). `required` programs are the socket path
/// without which no request can be timed; the others degrade one feature each.
pub const PROGRAMS: &[(&str, &str, bool)] = &[
    ("sys_enter_read", "syscalls", true),
    ("sys_exit_read", "syscalls", true),
    ("sys_enter_readv", "syscalls", false),
    ("sys_exit_readv", "syscalls", false),
    ("sys_enter_recvfrom", "syscalls", true),
    ("sys_exit_recvfrom", "syscalls", true),
    ("sys_enter_recvmsg", "syscalls", false),
    ("sys_exit_recvmsg", "syscalls", false),
    ("sys_enter_write", "syscalls", true),
    ("sys_exit_write", "syscalls", true),
    ("sys_enter_writev", "syscalls", false),
    ("sys_exit_writev", "syscalls", false),
    ("sys_enter_sendto", "syscalls", true),
    ("sys_exit_sendto", "syscalls", true),
    ("sys_enter_sendmsg", "syscalls", false),
    ("sys_exit_sendmsg", "syscalls", false),
    ("sys_exit_accept", "syscalls", false),
    ("sys_exit_accept4", "syscalls", true),
    ("sys_enter_close", "syscalls", true),
    ("task_newtask", "task", false),
    ("sched_process_exit", "sched", false),
    // Without these three, request arrival falls back to the server's first read.
    ("inet_sock_set_state", "sock", false),
    ("sk_data_ready", "sock", false),
    ("sock_recv_length", "sock", false),
];

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(
        "this llm-probe was built without its kernel programs (AYA_BUILD_SKIP); rebuild with \
         `cargo xtask build`"
    )]
    NoObject,
    #[error("loading the eBPF object failed (are you root, or do you have CAP_BPF+CAP_PERFMON?)")]
    Load(#[from] EbpfError),
    #[error("the eBPF object lacks map {0}")]
    MissingMap(&'static str),
    #[error("map {0}: {1}")]
    Map(&'static str, #[source] aya::maps::MapError),
    #[error("no required program could be attached: {}", .0.join(", "))]
    NothingAttached(Vec<&'static str>),
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
    targets: HashMap<MapData, u32, u32>,
    conns: HashMap<MapData, ConnKey, u32>,
    listen_ports: HashMap<MapData, u16, u32>,
    counters: PerCpuArray<MapData, u64>,
    pub attached: Vec<Attached>,
    /// CUDA uprobe state (`cuda`); `None` when its programs failed to load.
    cuda: Option<cuda::CudaProbes>,
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
    pub fn load() -> Result<(Self, Ring), LoadError> {
        if OBJECT.is_empty() {
            return Err(LoadError::NoObject);
        }
        raise_memlock();
        ensure_tracefs();
        let mut ebpf = Ebpf::load(OBJECT)?;
        let mut attached = Vec::with_capacity(PROGRAMS.len());
        for &(name, category, _) in PROGRAMS {
            let result = (|| -> Result<(), AttachError> {
                check_layout(category, name).map_err(AttachError::Layout)?;
                let prog = ebpf.program_mut(name).ok_or(AttachError::Missing)?;
                let tp: &mut TracePoint = prog.try_into().map_err(AttachError::Kind)?;
                tp.load().map_err(AttachError::Load)?;
                tp.attach(category, name).map_err(AttachError::Attach)?;
                Ok(())
            })();
            if let Err(e) = &result {
                log::warn!("program {name} ({category}:{name}) not attached: {e}");
            }
            attached.push(Attached {
                program: name,
                ok: result.is_ok(),
                error: result.err(),
            });
        }
        let missing: Vec<_> = PROGRAMS
            .iter()
            .zip(&attached)
            .filter(|((_, _, required), a)| *required && !a.ok)
            .map(|((name, _, _), _)| *name)
            .collect();
        if !missing.is_empty() {
            return Err(LoadError::NothingAttached(missing));
        }
        let ring = take::<Ring>(&mut ebpf, "EVENTS")?;
        let targets = take(&mut ebpf, "TARGETS")?;
        let conns = take(&mut ebpf, "CONNS")?;
        let listen_ports = take(&mut ebpf, "LISTEN_PORTS")?;
        let counters = take(&mut ebpf, "COUNTERS")?;
        let cuda = cuda::CudaProbes::load(&mut ebpf)
            .inspect_err(|e| log::warn!("CUDA probes unavailable: {e:#}"))
            .ok();
        Ok((
            Self {
                ebpf,
                targets,
                conns,
                listen_ports,
                counters,
                attached,
                cuda,
            },
            ring,
        ))
    }

    pub fn add_target(&mut self, tgid: u32) -> Result<(), LoadError> {
        self.targets
            .insert(tgid, 1, 0)
            .map_err(|e| LoadError::Map("TARGETS", e))
    }

    pub fn remove_target(&mut self, tgid: u32) {
        let _ = self.targets.remove(&tgid);
    }

    pub fn track_conn(&mut self, tgid: u32, fd: u32) -> Result<(), LoadError> {
        self.conns
            .insert(ConnKey { tgid, fd }, 1, 0)
            .map_err(|e| LoadError::Map("CONNS", e))
    }

    /// Ports whose sockets get arrival stamps (the ports traced servers listen on).
    pub fn add_listen_port(&mut self, port: u16) -> Result<(), LoadError> {
        self.listen_ports
            .insert(port, 1, 0)
            .map_err(|e| LoadError::Map("LISTEN_PORTS", e))
    }

    /// Stop capturing a connection (it carries something that is not HTTP/1.x).
    pub fn untrack_conn(&mut self, tgid: u32, fd: u32) {
        let _ = self.conns.remove(&ConnKey { tgid, fd });
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
