//! Which sockets listen on a TCP port, from the kernel's `sock_diag` netlink interface
//! (`NETLINK_SOCK_DIAG`, an `inet_diag` dump asking for the LISTEN state alone). For that state the
//! kernel walks its listening hash and nothing else. /proc/net/tcp{,6} renders every socket of the
//! namespace, connections included, to show the few listeners: a waiting agent spent ≈ 40 % of
//! its CPU there, and a scan that reads a process's table per process pays that once per process.
//!
//! The answer is socket inodes, matched against the `socket:[N]` links of /proc/PID/fd. A kernel
//! without `inet_diag`/`tcp_diag`, or a namespace the agent may not enter, gives an error, and the
//! caller reads /proc instead.

use std::{collections::HashSet, fs::File, io, os::fd::AsRawFd as _};

use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_DUMP, NLM_F_REQUEST,
};
use netlink_packet_sock_diag::{
    constants::{AF_INET, AF_INET6, IPPROTO_TCP},
    inet::{ExtensionFlags, InetRequest, SocketId, StateFlags},
    SockDiagMessage,
};
use netlink_sys::{protocols::NETLINK_SOCK_DIAG, Socket, SocketAddr};

/// Most listening sockets taken from one dump (per family): a bound on what one answer may hold.
const MAX_LISTENERS: usize = 65_536;

/// Inodes of the TCP sockets listening on `port` (IPv4 and IPv6) in the calling thread's network
/// namespace.
pub fn listening_inodes(port: u16) -> io::Result<HashSet<u64>> {
    let socket = Socket::new(NETLINK_SOCK_DIAG)?;
    socket.connect(&SocketAddr::new(0, 0))?;
    let mut out = HashSet::new();
    for family in [AF_INET, AF_INET6] {
        dump(&socket, family, port, &mut out)?;
    }
    Ok(out)
}

/// [`listening_inodes`] in the network namespace `ns` (an open `/proc/PID/ns/net`), entered by a
/// thread of its own for the query (`setns(2)` moves only the calling thread; that thread then
/// ends). Needs `CAP_SYS_ADMIN` over the namespace: `PermissionDenied` without it (the agent
/// drops it once attached, so later scans read other namespaces from /proc).
pub fn listening_inodes_in(ns: &File, port: u16) -> io::Result<HashSet<u64>> {
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: plain syscall on a descriptor we hold open.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(io::Error::last_os_error());
            }
            listening_inodes(port)
        })
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("sock_diag thread panicked")))
    })
}

/// One dump of `family`'s listening TCP sockets; those on `port` go into `out`.
fn dump(socket: &Socket, family: u8, port: u16, out: &mut HashSet<u64>) -> io::Result<()> {
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    let mut request = NetlinkMessage::new(
        header,
        SockDiagMessage::InetRequest(InetRequest {
            family,
            protocol: IPPROTO_TCP,
            extensions: ExtensionFlags::empty(),
            states: StateFlags::LISTEN,
            socket_id: if family == AF_INET {
                SocketId::new_v4()
            } else {
                SocketId::new_v6()
            },
        })
        .into(),
    );
    request.finalize();
    let mut buf = vec![0; request.buffer_len()];
    request.serialize(&mut buf);
    socket.send(&buf, 0)?;
    let mut seen = 0usize;
    let mut rx = Vec::with_capacity(64 * 1024);
    loop {
        rx.clear();
        socket.recv(&mut rx, 0)?;
        let n = rx.len();
        if n == 0 {
            return Err(io::Error::other(
                "sock_diag: the dump ended without NLMSG_DONE",
            ));
        }
        let mut at = 0;
        while at < n {
            let msg = <NetlinkMessage<SockDiagMessage>>::deserialize(&rx[at..n])
                .map_err(|e| io::Error::other(format!("sock_diag: {e}")))?;
            let len = msg.header.length as usize;
            match msg.payload {
                NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(r)) => {
                    seen += 1;
                    if seen > MAX_LISTENERS {
                        return Err(io::Error::other(format!(
                            "sock_diag: more than {MAX_LISTENERS} listening sockets"
                        )));
                    }
                    if r.header.socket_id.source_port == port {
                        out.insert(u64::from(r.header.inode));
                    }
                }
                NetlinkPayload::Done(_) => return Ok(()),
                NetlinkPayload::Error(e) => {
                    return Err(e.to_io());
                }
                _ => {}
            }
            if len == 0 {
                break;
            }
            at += len;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::TcpListener;

    use super::*;

    #[test]
    fn finds_a_listener_by_port_and_no_connection() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let v6 = TcpListener::bind(("::1", port));
        // A connection to the port has the port as its local one too, and is not a listener.
        let _client = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        let (accepted, _) = listener.accept().unwrap();
        let inode = |fd: i32| {
            let link = std::fs::read_link(format!("/proc/self/fd/{fd}")).unwrap();
            let s = link.to_string_lossy().into_owned();
            s.trim_start_matches("socket:[")
                .trim_end_matches(']')
                .parse::<u64>()
                .unwrap()
        };
        let got = listening_inodes(port).unwrap();
        assert!(got.contains(&inode(listener.as_raw_fd())), "{got:?}");
        assert!(!got.contains(&inode(accepted.as_raw_fd())));
        if let Ok(v6) = &v6 {
            assert!(got.contains(&inode(v6.as_raw_fd())), "{got:?}");
        }
        drop((listener, v6));
        assert!(listening_inodes(port).unwrap().is_empty());
    }

    #[test]
    fn enters_a_namespace_by_its_file() {
        // The agent's own namespace through /proc/self/ns/net: the same answer as without.
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let ns = File::open("/proc/self/ns/net").unwrap();
        match listening_inodes_in(&ns, port) {
            Ok(got) => assert_eq!(got, listening_inodes(port).unwrap()),
            // Unprivileged runs may not enter even their own namespace.
            Err(e) => assert_eq!(e.raw_os_error(), Some(libc::EPERM), "{e}"),
        }
    }
}
