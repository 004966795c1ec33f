//! Finding a listener on a port while the namespace holds many connections: the `sock_diag` query
//! (`discover::listening_in_own_netns`) against the /proc/net/tcp{,6} read it replaced
//! (`discover::listening_in_proc_net`), with 2,000 established loopback connections (4,000
//! sockets) open; median of 50 calls each, measured in the same run. A waiting agent makes one
//! such check a second; the full scan (`pids_listening_on`) one per network namespace.
//!
//! Run: `cargo bench -p probe-user --bench listeners`.
use std::{
    net::{TcpListener, TcpStream},
    time::Instant,
};

use probe_user::discover;

const CONNECTIONS: usize = 2_000;

fn median_us(mut f: impl FnMut() -> bool) -> f64 {
    let mut t: Vec<f64> = (0..50)
        .map(|_| {
            let s = Instant::now();
            assert!(f(), "the listener was not found");
            s.elapsed().as_secs_f64() * 1e6
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[t.len() / 2]
}

fn main() {
    // Two descriptors per connection and a few more.
    let want = (2 * CONNECTIONS + 64) as libc::rlim_t;
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls on a local struct.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut lim);
        lim.rlim_cur = lim.rlim_max.min(want.max(lim.rlim_cur));
        libc::setrlimit(libc::RLIMIT_NOFILE, &raw const lim);
    }
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let n = CONNECTIONS.min((lim.rlim_cur as usize).saturating_sub(64) / 2);
    let mut held = Vec::with_capacity(2 * n);
    for _ in 0..n {
        held.push(TcpStream::connect(("127.0.0.1", port)).expect("connect"));
        held.push(listener.accept().expect("accept").0);
    }
    let diag = median_us(|| discover::listening_in_own_netns(port));
    let proc = median_us(|| discover::listening_in_proc_net(port));
    let scan = median_us(|| discover::pids_listening_on(port).is_ok());
    println!(
        "listener check with {n} connections open: sock_diag {diag:.0} us, /proc/net/tcp \
         {proc:.0} us ({:.0}x); full process scan (sock_diag per namespace) {scan:.0} us",
        proc / diag.max(0.001)
    );
}
