//! The hot path, owned by one task: ring-buffer record → `record::decode` → `http::ConnTracker` →
//! `requests::RequestStats` (the `Observer`) → metric families; CUDA records to the ledger; fork
//! and exit records to the target set.

use probe_common::ArrivalEvent;

use super::targets::Targets;
use crate::{
    cuda::state::SharedCuda,
    http::{
        tls::{Route, TlsCounts, TlsJoin},
        ConnId, ConnTracker, Moment, Observer as _, ParseErrorKind, ReadArrival,
    },
    kernel::Ring,
    metrics::{ProbeMetrics, RequestMetrics},
    record::{decode, Event},
    requests::{RequestStats, SharedRecent},
};

/// Records handled per drain call: at ~1 µs each, a few milliseconds, after which the loop's other
/// work (housekeeping, scrapes, SIGTERM) gets a turn even under a flood.
pub const MAX_DRAIN_BATCH: u64 = 8192;

/// Everything the ingest loop owns: record → decode → connection state → request stats → metrics.
pub struct Ingest {
    pub tracker: ConnTracker,
    pub stats: RequestStats,
    pub probe: ProbeMetrics,
    /// CUDA ledger, steps and launches (`None`: records of that kind are only counted).
    pub cuda: Option<SharedCuda>,
    /// TLS connections and the `SSL *` each one's plaintext goes through.
    pub tls: TlsJoin,
    /// `tls.counts` as last exported.
    tls_exported: TlsCounts,
    /// Processes already warned about unreadable TLS (one log line each, not one per connection).
    tls_warned: std::collections::HashSet<u32>,
    /// The parts of the server read whose record comes next (the kernel sends them just before).
    arrivals: Option<ArrivalEvent>,
}

impl Ingest {
    pub fn new(requests: RequestMetrics, probe: ProbeMetrics, recent: SharedRecent) -> Self {
        Self {
            tracker: ConnTracker::new(),
            stats: RequestStats::new(requests, recent),
            probe,
            cuda: None,
            tls: TlsJoin::new(),
            tls_exported: TlsCounts::default(),
            tls_warned: std::collections::HashSet::new(),
            arrivals: None,
        }
    }

    /// Process one ring-buffer record.
    pub fn handle(&mut self, raw: &[u8], targets: &mut Targets) {
        let ev = match decode(raw) {
            Ok(ev) => ev,
            Err(e) => {
                log::debug!("undecodable record: {e}");
                self.probe.decode_losses.count(e.reason());
                return;
            }
        };
        match ev {
            Event::Arrivals(a) => self.arrivals = Some(a),
            Event::Data {
                header,
                fd,
                egress,
                ret,
                payload,
                tail,
                arrival_ns,
                thread,
                ssl,
                ..
            } => {
                // Ingress bytes are dated by their arrival at the socket when the kernel knows it:
                // a request that waited in the receive queue was waiting for the user too.
                let dated = !egress && arrival_ns != 0 && arrival_ns <= header.ts_ns;
                let mut ts = if dated { arrival_ns } else { header.ts_ns };
                // The parts of this socket read, sent just before it (same thread and fd).
                let parts = self
                    .arrivals
                    .take()
                    .filter(|a| dated && ssl.is_none() && (a.header.tid, a.fd) == (header.tid, fd))
                    .map(|a| {
                        let n = a.n as usize;
                        let parts = a.ends.into_iter().zip(a.ts_ns).take(n);
                        ReadArrival::parts(arrival_ns, header.ts_ns, parts)
                    });
                let conn = if let Some(ssl) = ssl {
                    // Plaintext: its connection from the join; a read dated by its ciphertext.
                    let Some((conn, arrival)) =
                        self.tls.on_plaintext(header.tgid, header.tid, ssl, egress)
                    else {
                        return;
                    };
                    if let Some(a) = arrival.filter(|&a| a <= header.ts_ns) {
                        ts = a;
                    }
                    conn
                } else {
                    let conn = ConnId {
                        tgid: header.tgid,
                        fd,
                    };
                    let readable = targets.tls_readable(header.tgid);
                    let read = (!egress && ret > 0).then_some(payload);
                    let route = self.tls.on_socket(conn, header.tid, read, ts, readable);
                    if route != Route::Plain {
                        if let Some(p) = parts.filter(|_| route == Route::Cipher) {
                            self.tls.last_arrival(conn, p.last());
                        }
                        self.on_ciphertext(conn, route, ret, egress, ts);
                        return;
                    }
                    conn
                };
                self.stats.now_ns = ts;
                self.tracker.set_io(Moment {
                    ts_ns: header.ts_ns,
                    tid: header.tid,
                    clock: thread,
                });
                let s = &mut self.stats;
                match (ret, egress) {
                    (n, true) if n > 0 => {
                        self.tracker
                            .on_egress_with_tail(conn, ts, n as u64, payload, tail, s);
                    }
                    (n, false) if n > 0 => {
                        if let Some(a) = parts {
                            self.tracker.set_arrival_parts(a);
                        }
                        self.tracker.on_ingress(conn, ts, n as u64, payload, s);
                    }
                    (0, false) => self.tracker.on_peer_closed(conn, ts, s),
                    (0, true) => {}
                    (n, _) => self.tracker.on_io_error(conn, ts, (-n) as i32, s),
                }
                if !self.stats.first_tokens.is_empty() {
                    if let Some(Ok(mut c)) = self.cuda.as_ref().map(|c| c.lock()) {
                        for &t in &self.stats.first_tokens {
                            c.on_first_token(t);
                        }
                    }
                    self.stats.first_tokens.clear();
                }
            }
            Event::Accept { header, fd } => {
                let conn = ConnId {
                    tgid: header.tgid,
                    fd,
                };
                self.tls.forget(conn);
                self.tracker.on_accept(conn, header.ts_ns, &mut self.stats);
            }
            Event::Close { header, fd } => {
                let conn = ConnId {
                    tgid: header.tgid,
                    fd,
                };
                self.tls.forget(conn);
                self.tracker.on_close(conn, header.ts_ns, &mut self.stats);
            }
            Event::Ipc {
                header,
                egress,
                thread,
                payload,
                ..
            } => {
                let at = Moment {
                    ts_ns: header.ts_ns,
                    tid: header.tid,
                    clock: thread,
                };
                self.stats.ipc.record(header.tgid, at, egress, payload);
            }
            Event::Fork { header, child } => {
                log::info!(
                    "traced process {} forked {child}; tracing it too",
                    header.tgid
                );
                targets.add(child, "fork");
                self.stats.gpu.join(child, header.tgid);
            }
            Event::CudaMem(ev) => {
                if let Some(Ok(mut c)) = self.cuda.as_ref().map(|c| c.lock()) {
                    c.on_mem(&ev);
                }
            }
            Event::CudaSync(ev) => {
                // A sync called inside another (the runtime's inside the driver's) is one wait.
                if ev.nested == 0 {
                    self.stats
                        .gpu
                        .record(ev.header.tgid, ev.enter_ns, ev.header.ts_ns);
                }
                let waiting = self.stats.queue_depth() > 0;
                if let Some(Ok(mut c)) = self.cuda.as_ref().map(|c| c.lock()) {
                    c.on_sync(&ev, waiting);
                }
            }
            Event::Exit { header } => {
                log::warn!("traced process {} exited", header.tgid);
                self.tracker
                    .on_process_exit(header.tgid, header.ts_ns, &mut self.stats);
                self.stats.ipc.forget(header.tgid);
                self.tls.forget_process(header.tgid);
                self.tls_warned.remove(&header.tgid);
                self.stats.gpu.forget(header.tgid);
                targets.exited(header.tgid);
                if let Some(Ok(mut c)) = self.cuda.as_ref().map(|c| c.lock()) {
                    c.forget(header.tgid);
                }
            }
        }
    }

    /// A socket record of a TLS connection: its bytes are ciphertext, but a read of 0 (the client
    /// closed) and errors end its requests as for clear text.
    fn on_ciphertext(&mut self, conn: ConnId, route: Route, ret: i64, egress: bool, ts: u64) {
        let s = &mut self.stats;
        if route == Route::Unreadable {
            // Bounded: a pid is forgotten when it exits; the set is cleared if it ever fills.
            if self.tls_warned.len() >= 4096 {
                self.tls_warned.clear();
            }
            if self.tls_warned.insert(conn.tgid) {
                log::warn!(
                    "pid {}: fd {} speaks TLS, and no OpenSSL library of the process is probed; \
                     its requests cannot be read (counted per connection in \
                     llm_probe_parse_errors_total{{kind=\"tls_unreadable\"}}; logged once)",
                    conn.tgid,
                    conn.fd
                );
            }
            s.parse_error(conn, ParseErrorKind::TlsUnreadable);
            s.untrack(conn);
            return;
        }
        match (ret, egress) {
            (0, false) => self.tracker.on_peer_closed(conn, ts, s),
            (n, _) if n < 0 => self.tracker.on_io_error(conn, ts, (-n) as i32, s),
            _ => {}
        }
    }

    /// Bring the `llm_probe_tls_*` counters up to the join's counts.
    fn export_tls(&mut self) {
        let (now, was) = (self.tls.counts, self.tls_exported);
        if now == was {
            return;
        }
        let unmatched = &self.probe.tls_unmatched;
        self.probe
            .tls_connections
            .inc_by(now.connections - was.connections);
        unmatched
            .get_or_create(&crate::metrics::probe::DirectionLabels { direction: "read" })
            .inc_by(now.unmatched_reads - was.unmatched_reads);
        unmatched
            .get_or_create(&crate::metrics::probe::DirectionLabels { direction: "write" })
            .inc_by(now.unmatched_writes - was.unmatched_writes);
        self.tls_exported = now;
    }

    /// What the ring holds now, at most `MAX_DRAIN_BATCH` records. Returns how many it handled
    /// (`MAX_DRAIN_BATCH`: more may be waiting).
    pub fn drain(&mut self, ring: &mut Ring, targets: &mut Targets) -> u64 {
        for (pid, root) in targets.take_tree_joins() {
            self.stats.gpu.join(pid, root);
        }
        let mut n = 0u64;
        while n < MAX_DRAIN_BATCH {
            let Some(item) = ring.next() else { break };
            self.handle(&item, targets);
            n += 1;
        }
        if n > 0 {
            self.probe.events.inc_by(n);
            self.export_tls();
        }
        n
    }
}
