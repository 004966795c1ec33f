//! Which processes to trace and which of their sockets are server-side HTTP connections, from
//! /proc (procfs crate). Runs unprivileged where /proc allows; the agent feeds the answers to the
//! kernel maps and the target set.

use std::{
    collections::{btree_map, BTreeMap, BTreeSet, HashMap, HashSet},
    fs::File,
    os::unix::fs::MetadataExt as _,
    sync::atomic::{AtomicBool, Ordering},
};

use procfs::{
    net::{TcpNetEntry, TcpState},
    process::{FDTarget, Process},
};

mod listeners;

#[derive(Debug, thiserror::Error)]
pub enum DiscoverError {
    #[error("no process is listening on TCP port {0}")]
    NoListener(u16),
    #[error("process {0} does not exist")]
    NoSuchProcess(u32),
    #[error("reading /proc: {0}")]
    Proc(#[from] procfs::ProcError),
}

/// TCP entries of the process's network namespace (`/proc/PID/net/tcp{,6}`), by socket inode.
fn tcp_by_inode(p: &Process) -> HashMap<u64, TcpNetEntry> {
    let mut out = HashMap::new();
    for table in [p.tcp(), p.tcp6()].into_iter().flatten() {
        for e in table {
            out.insert(e.inode, e);
        }
    }
    out
}

fn socket_fds(p: &Process) -> Vec<(u32, u64)> {
    let Ok(fds) = p.fd() else { return Vec::new() };
    fds.filter_map(Result::ok)
        .filter_map(|fd| match fd.target {
            FDTarget::Socket(inode) => Some((fd.fd as u32, inode)),
            _ => None,
        })
        .collect()
}

/// Which processes found by `--port` the operator means (`--target-comm`, `--target-cgroup`,
/// `--target-netns`): on a shared node another tenant's server may listen on the same port in
/// its own network namespace. Empty lists admit everything; given lists must each match.
/// Processes named by `--pid`, and children of targets, are not filtered.
#[derive(Clone, Debug, Default)]
pub struct Scope {
    /// Exact process names (`/proc/PID/comm`), any of them.
    pub comms: Vec<String>,
    /// cgroup path prefixes (any line of `/proc/PID/cgroup`), any of them.
    pub cgroups: Vec<String>,
    /// Network namespace links (`net:[4026531840]`, as `/proc/PID/ns/net` reads), or `host`
    /// for the agent's own.
    pub netns: Vec<String>,
}

/// Largest `/proc/PID/cgroup` read: a line per hierarchy, a few hundred bytes.
const MAX_CGROUP_BYTES: u64 = 64 * 1024;

/// Where a process lives: its name, network namespace and cgroup paths, for the scope and the log.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Whereabouts {
    pub comm: String,
    pub netns: String,
    pub cgroups: Vec<String>,
}

impl std::fmt::Display for Whereabouts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "comm {:?}, netns {}, cgroup {}",
            self.comm,
            self.netns,
            self.cgroups.join(",")
        )
    }
}

/// The network namespace link of `/proc/<pid>` (`self` for the agent's own), empty when unreadable.
fn netns(pid: &str) -> String {
    std::fs::read_link(format!("/proc/{pid}/ns/net"))
        .map(|l| l.display().to_string())
        .unwrap_or_default()
}

/// Name, network namespace and cgroups of `pid` (empty where unreadable).
pub fn whereabouts(pid: u32) -> Whereabouts {
    use std::io::Read as _;
    let mut text = String::new();
    let _ = std::fs::File::open(format!("/proc/{pid}/cgroup"))
        .and_then(|f| f.take(MAX_CGROUP_BYTES).read_to_string(&mut text));
    Whereabouts {
        comm: comm(pid),
        netns: netns(&pid.to_string()),
        cgroups: text
            .lines()
            .filter_map(|l| l.splitn(3, ':').nth(2))
            .map(str::to_owned)
            .collect(),
    }
}

impl Scope {
    pub fn is_empty(&self) -> bool {
        self.comms.is_empty() && self.cgroups.is_empty() && self.netns.is_empty()
    }

    /// Whether a process living at `w` is in scope.
    pub fn admits(&self, w: &Whereabouts) -> bool {
        (self.comms.is_empty() || self.comms.contains(&w.comm))
            && (self.cgroups.is_empty()
                || w.cgroups
                    .iter()
                    .any(|g| self.cgroups.iter().any(|p| g.starts_with(p.as_str()))))
            && (self.netns.is_empty()
                || self
                    .netns
                    .iter()
                    .any(|n| *n == w.netns || (n == "host" && w.netns == netns("self"))))
    }
}

/// Set once `sock_diag` has failed and the /proc tables stood in, so that it is logged once.
static SOCK_DIAG_FAILED: AtomicBool = AtomicBool::new(false);
/// Set once another network namespace could not be entered, so that it is logged once.
static SETNS_REFUSED: AtomicBool = AtomicBool::new(false);

/// `r`'s inodes, or `None` (logged the first time) when `sock_diag` failed.
fn or_log(r: std::io::Result<HashSet<u64>>) -> Option<HashSet<u64>> {
    r.map_err(|e| {
        if !SOCK_DIAG_FAILED.swap(true, Ordering::Relaxed) {
            log::warn!("sock_diag query for listening sockets failed ({e}); reading /proc/net/tcp");
        }
    })
    .ok()
}

/// The sockets listening on `port` in `p`'s network namespace, by inode, asked once per namespace
/// (`by_ns`, keyed by the namespace's inode); `None` where `sock_diag` failed there.
fn netns_listeners<'a>(
    p: &Process,
    port: u16,
    own_ns: Option<u64>,
    by_ns: &'a mut HashMap<u64, Option<HashSet<u64>>>,
) -> Option<&'a HashSet<u64>> {
    let ns = File::open(format!("/proc/{}/ns/net", p.pid)).ok()?;
    let ino = ns.metadata().ok()?.ino();
    by_ns
        .entry(ino)
        .or_insert_with(|| {
            if own_ns == Some(ino) {
                return or_log(listeners::listening_inodes(port));
            }
            match listeners::listening_inodes_in(&ns, port) {
                // Entering a namespace needs CAP_SYS_ADMIN, which the agent gives up once
                // attached (agent/privileges.rs): expected, and not a `sock_diag` failure.
                Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                    if !SETNS_REFUSED.swap(true, Ordering::Relaxed) {
                        log::info!(
                            "listeners in other network namespaces are read from /proc/PID/net/tcp \
                             from now on: entering a namespace ({e}) needs CAP_SYS_ADMIN"
                        );
                    }
                    None
                }
                r => or_log(r),
            }
        })
        .as_ref()
}

/// Processes that own a listening TCP socket on `port` (any address family), in any network
/// namespace. The listeners come from `sock_diag`, once per namespace; /proc/PID/net/tcp{,6} (every
/// socket of the namespace, rendered again for each process) only where that fails.
pub fn pids_listening_on(port: u16) -> Result<Vec<u32>, DiscoverError> {
    let mut pids = BTreeSet::new();
    let own_ns = std::fs::metadata("/proc/self/ns/net").ok().map(|m| m.ino());
    let mut by_ns = HashMap::new();
    for p in procfs::process::all_processes()?.filter_map(Result::ok) {
        let socks = socket_fds(&p);
        if socks.is_empty() {
            continue;
        }
        let listens = if let Some(inodes) = netns_listeners(&p, port, own_ns, &mut by_ns) {
            socks.iter().any(|(_, inode)| inodes.contains(inode))
        } else {
            let table = tcp_by_inode(&p);
            socks.iter().any(|(_, inode)| {
                table
                    .get(inode)
                    .is_some_and(|e| e.state == TcpState::Listen && e.local_address.port() == port)
            })
        };
        if listens {
            pids.insert(p.pid as u32);
        }
    }
    if pids.is_empty() {
        return Err(DiscoverError::NoListener(port));
    }
    Ok(pids.into_iter().collect())
}

/// Cheap check (one `sock_diag` query, no process scan): does anything in the probe's own network
/// namespace listen on `port`? Used to poll for a restarted server without scanning every
/// process's fds each second (that scan cost ~5 % of a core on a 2-core machine). Falls back to
/// /proc/net/tcp{,6} where `sock_diag` fails.
pub fn listening_in_own_netns(port: u16) -> bool {
    match or_log(listeners::listening_inodes(port)) {
        Some(inodes) => !inodes.is_empty(),
        None => listening_in_proc_net(port),
    }
}

/// [`listening_in_own_netns`] from /proc/net/tcp{,6}: the fallback, which renders every socket
/// of the namespace (public for the benchmark that compares the two).
pub fn listening_in_proc_net(port: u16) -> bool {
    [procfs::net::tcp(), procfs::net::tcp6()]
        .into_iter()
        .flatten()
        .flatten()
        .any(|e| e.state == TcpState::Listen && e.local_address.port() == port)
}

/// `roots` and every live descendant, found through each process's parent pid (one scan of
/// /proc), each as (pid, the root it descends from; the first such root for a pid under two).
pub fn with_descendants(roots: &[u32]) -> Result<Vec<(u32, u32)>, DiscoverError> {
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    for p in procfs::process::all_processes()?.filter_map(Result::ok) {
        if let Ok(stat) = p.stat() {
            children
                .entry(stat.ppid as u32)
                .or_default()
                .push(p.pid as u32);
        }
    }
    let mut seen: BTreeMap<u32, u32> = BTreeMap::new();
    for &root in roots {
        let mut stack = vec![root];
        while let Some(pid) = stack.pop() {
            if let btree_map::Entry::Vacant(e) = seen.entry(pid) {
                e.insert(root);
                stack.extend(children.get(&pid).into_iter().flatten());
            }
        }
    }
    Ok(seen.into_iter().collect())
}

/// Whether `pid` still runs. Only "no such process" counts as gone: any other failure to read
/// /proc (EMFILE when the agent's descriptors run out, EACCES) says nothing about the target, which
/// is then taken as alive rather than dropped.
pub fn alive(pid: u32) -> bool {
    // stat(2) needs no descriptor.
    match std::fs::metadata(format!("/proc/{pid}")) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return false,
        Err(_) => return true,
        Ok(_) => {}
    }
    match Process::new(pid as i32).and_then(|p| p.stat()) {
        Ok(s) => s.state != 'Z',
        Err(procfs::ProcError::NotFound(_)) => false,
        Err(_) => true,
    }
}

/// The process's executable mapped size in KiB: `VmExe` + `VmLib` of /proc/PID/status (the
/// kernel's `exec_vm` counter, read without walking the mappings). A library load changes it.
/// `None` when unreadable, or for a process without memory (a zombie, a kernel thread).
pub fn exec_mapped_kib(pid: u32) -> Option<u64> {
    let status = Process::new(pid as i32).and_then(|p| p.status()).ok()?;
    Some(status.vmexe? + status.vmlib?)
}

pub fn comm(pid: u32) -> String {
    Process::new(pid as i32)
        .and_then(|p| p.stat())
        .map(|s| s.comm)
        .unwrap_or_default()
}

/// The name of thread `tid` of `pid` (`/proc/PID/task/TID/comm`: at most 15 bytes; read
/// bounded all the same), or "" when it is gone.
pub fn thread_comm(pid: u32, tid: u32) -> String {
    use std::io::Read as _;
    let mut buf = [0u8; 64];
    let n = std::fs::File::open(format!("/proc/{pid}/task/{tid}/comm"))
        .and_then(|mut f| f.read(&mut buf))
        .unwrap_or(0);
    String::from_utf8_lossy(&buf[..n]).trim_end().to_owned()
}

/// What a scan of one process found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Sockets {
    /// Local ports the process listens on.
    pub listen_ports: Vec<u16>,
    /// fds of established connections accepted on one of `ports` (open before attach).
    pub server_conns: Vec<u32>,
}

/// Listening ports of `pid` and its established server-side connections. A connection is
/// server-side when its local port is one the process (or any of `extra_ports`) listens on.
pub fn scan_sockets(pid: u32, extra_ports: &[u16]) -> Result<Sockets, DiscoverError> {
    let p = Process::new(pid as i32).map_err(|_| DiscoverError::NoSuchProcess(pid))?;
    let socks = socket_fds(&p);
    let table = tcp_by_inode(&p);
    let mut ports: HashSet<u16> = extra_ports.iter().copied().collect();
    let mut listen_ports = BTreeSet::new();
    for (_, inode) in &socks {
        if let Some(e) = table.get(inode) {
            if e.state == TcpState::Listen {
                ports.insert(e.local_address.port());
                listen_ports.insert(e.local_address.port());
            }
        }
    }
    let server_conns = socks
        .iter()
        .filter(|(_, inode)| {
            table.get(inode).is_some_and(|e| {
                e.state == TcpState::Established && ports.contains(&e.local_address.port())
            })
        })
        .map(|(fd, _)| *fd)
        .collect();
    Ok(Sockets {
        listen_ports: listen_ports.into_iter().collect(),
        server_conns,
    })
}

#[cfg(test)]
mod scope_tests {
    use super::*;

    #[test]
    fn scope_matches_each_given_list() {
        let w = Whereabouts {
            comm: "python3".into(),
            netns: "net:[4026532000]".into(),
            cgroups: vec!["/kubepods/burstable/pod1234/abcd".into()],
        };
        assert!(Scope::default().admits(&w));
        let by_comm = Scope {
            comms: vec!["node".into(), "python3".into()],
            ..Scope::default()
        };
        assert!(by_comm.admits(&w));
        let by_cgroup = Scope {
            cgroups: vec!["/kubepods/burstable/pod1234".into()],
            ..by_comm.clone()
        };
        assert!(by_cgroup.admits(&w));
        let other_pod = Scope {
            cgroups: vec!["/kubepods/burstable/pod9999".into()],
            ..Scope::default()
        };
        assert!(!other_pod.admits(&w));
        let other_ns = Scope {
            netns: vec!["net:[1]".into()],
            ..Scope::default()
        };
        assert!(!other_ns.admits(&w));
        // This process is in the agent's own network namespace.
        let me = whereabouts(std::process::id());
        let host = Scope {
            netns: vec!["host".into()],
            ..Scope::default()
        };
        assert!(host.admits(&me), "{me}");
    }
}

/// This node's name, for the `Hostname` label of the GPU series (empty when unreadable).
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use std::{io::Read as _, net::TcpListener};

    use super::*;

    #[test]
    fn finds_own_listener_and_accepted_connection() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let _client = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        let (mut accepted, _) = listener.accept().unwrap();
        accepted.set_nonblocking(true).unwrap();
        let _ = accepted.read(&mut [0; 1]);
        let me = std::process::id();
        assert!(pids_listening_on(port).unwrap().contains(&me));
        let s = scan_sockets(me, &[]).unwrap();
        assert!(s.listen_ports.contains(&port));
        use std::os::fd::AsRawFd as _;
        assert!(s.server_conns.contains(&(accepted.as_raw_fd() as u32)));
        // The client end's local port is ephemeral, so it is not a server-side socket.
        assert_eq!(
            s.server_conns
                .iter()
                .filter(|&&fd| fd == accepted.as_raw_fd() as u32)
                .count(),
            1
        );
    }

    /// Needs root (`unshare -n`, `setns`): a listener in another network namespace is found
    /// through that namespace's `sock_diag`.
    #[test]
    fn finds_a_listener_in_another_network_namespace() {
        // SAFETY: plain getter.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: needs root (unshare -n)");
            return;
        }
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let script = format!(
            "import socket,sys,time\ns=socket.socket()\ns.bind(('0.0.0.0',{port}))\ns.listen()\n\
             print('up',flush=True)\ntime.sleep(30)"
        );
        let mut child = std::process::Command::new("unshare")
            .args(["-n", "python3", "-c", &script])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut up = [0u8; 3];
        child.stdout.take().unwrap().read_exact(&mut up).unwrap();
        let found = pids_listening_on(port);
        child.kill().unwrap();
        let _ = child.wait();
        assert_eq!(found.unwrap(), vec![child.id()]);
        assert!(!listening_in_own_netns(port));
    }

    #[test]
    fn executable_mapped_size_grows_with_a_library() {
        let me = std::process::id();
        let before = exec_mapped_kib(me).expect("own status");
        assert!(before > 0);
        // A fresh executable mapping, as a library's text is.
        // SAFETY: an anonymous mapping of our own, unmapped below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                1 << 20,
                libc::PROT_READ | libc::PROT_EXEC,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        let after = exec_mapped_kib(me).unwrap();
        // SAFETY: the mapping made above.
        unsafe { libc::munmap(p, 1 << 20) };
        assert_eq!(after, before + 1024);
        assert_eq!(exec_mapped_kib(u32::MAX), None);
    }

    #[test]
    fn no_listener_is_a_clear_error() {
        // Port 1 (tcpmux) is not served on test machines.
        assert!(matches!(
            pids_listening_on(1),
            Err(DiscoverError::NoListener(1))
        ));
    }

    #[test]
    fn descendants_include_children() {
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .unwrap();
        let all = with_descendants(&[std::process::id()]).unwrap();
        assert!(all.iter().any(|&(pid, _)| pid == child.id()));
        child.kill().unwrap();
        let _ = child.wait();
    }
}
