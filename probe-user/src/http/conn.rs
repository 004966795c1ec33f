//! Per-connection state machine: turns what the server reads (requests) and writes (responses)
//! on each socket into timed requests, reported to an `Observer` as they progress.
//!
//! Each connection keeps a FIFO of requests whose responses are not complete; responses are
//! matched to its front (HTTP/1.1 pipelining answers in order). Connections opened before the
//! probe attached are picked up mid-stream and synchronise on the next message boundary.

use std::collections::VecDeque;

use rustc_hash::FxHashMap;

use super::{
    body::{Framer, Seg},
    response::Analyzer,
    ConnId, Moment, Observer, Outcome, ParseErrorKind, ReadArrival, RequestMeta,
};
use evict::touch;
use sink::{ensure_started, finish, ReqSink};

/// Requests queued on one connection awaiting responses. Real clients pipeline rarely and
/// shallowly; past this the connection is out of step or hostile, and we stop queueing.
pub const MAX_PIPELINED: usize = 64;
/// Connections with state at once; the least recently used is evicted past this. Bounds memory
/// at roughly this many times a connection's buffers (heads ≤ 16 KiB, sniff ≤ 64 KiB).
pub const MAX_CONNS_TRACKED: usize = 65536;
/// Bytes all connections' parser buffers may hold together by default (`--memory-budget`): each
/// buffer has its own bound (request head 16 KiB, body sniff 64 KiB, response head 16 KiB, event
/// line 256 KiB, JSON body 256 KiB, 4,096 gaps), but not their sum over thousands of connections.
/// Past the budget a connection that grows gives back what it can without losing its request
/// (the body sniff, an event in progress, a JSON body, the gap list), counted in
/// `llm_probe_budget_dropped_total{what}`. Heads are not given back: 16 KiB each at most.
pub const DEFAULT_MEMORY_BUDGET: usize = 32 << 20;

/// Errnos that do not mean the client went away (EINTR, EBADF, EAGAIN, ENOMEM, EFAULT, EINVAL):
/// retries, or our fd tracking being stale.
const TRANSIENT_ERRNOS: [i32; 6] = [4, 9, 11, 12, 14, 22];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Active,
    /// Not HTTP/1.x or unparseable: ignored until closed (the kernel was asked to untrack it).
    Dead,
    /// The client went away: nothing more on it is timed.
    Drained,
}

#[derive(Debug)]
enum Ingress {
    /// Nothing read yet.
    Fresh,
    /// Between requests.
    Idle,
    Head(HeadRead),
    Body(BodyRead),
    /// Looking for the next request line.
    Syncing,
}

/// A request head being read.
#[derive(Debug)]
struct HeadRead {
    buf: Vec<u8>,
    /// The timestamp of the ingress record holding its first byte: when those bytes reached the
    /// socket (the agent dates ingress by arrival when the kernel knows it), else the read.
    arrival_ns: u64,
    /// The read that returned its first byte.
    read: Moment,
    /// Found while resynchronising: may be a false start.
    from_sync: bool,
}

/// A request body being read.
#[derive(Debug)]
struct BodyRead {
    /// The request it belongs to (`None`: the request was not queued).
    seq: Option<u64>,
    framer: Framer,
    /// Its first captured bytes, up to `MAX_BODY_SNIFF`, for timed requests.
    sniff: Vec<u8>,
    sniffing: bool,
    /// Bytes were not captured or did not fit.
    truncated: bool,
}

#[derive(Debug)]
enum Egress {
    Fresh,
    Idle,
    Head {
        buf: Vec<u8>,
    },
    Body {
        framer: Framer,
        analyzer: Analyzer,
    },
    /// The front request's response lost its framing: it ends at close, or where a write starts
    /// with the next status line.
    Lost {
        last_ts: u64,
    },
    /// No response in progress, looking for a write that starts with a status line.
    Syncing,
}

#[derive(Debug)]
#[expect(
    clippy::struct_excessive_bools,
    reason = "independent facts about one request"
)]
struct Req {
    seq: u64,
    meta: RequestMeta,
    arrival_ns: u64,
    is_head: bool,
    /// The body fields are in `meta` (and `request_started` was called if timed).
    started: bool,
    status: Option<u16>,
    first_token_ns: Option<u64>,
    /// See `RequestRecord::read` and `first_token_at`.
    read: Moment,
    first_token_at: Option<Moment>,
    /// The last content write so far (the start of the next gap).
    last_content: Moment,
    content_events: u64,
    /// Events that stand for a generated token, with or without text (`Classified::token`).
    token_events: u64,
    gaps_ns: Vec<u64>,
    prompt_tokens: Option<u64>,
    completion_tokens: Option<u64>,
    /// See `RequestRecord::response_id`.
    response_id: Option<u64>,
    stream_error: bool,
    truncated_reported: bool,
    /// The memory budget took its gap list: gaps are no longer kept (the TBT histogram still
    /// sees every gap).
    gaps_dropped: bool,
}

impl Req {
    fn new(seq: u64, meta: RequestMeta, arrival_ns: u64, is_head: bool) -> Self {
        Self {
            seq,
            meta: RequestMeta { seq, ..meta },
            arrival_ns,
            is_head,
            started: false,
            status: None,
            first_token_ns: None,
            read: Moment::default(),
            first_token_at: None,
            last_content: Moment::default(),
            content_events: 0,
            token_events: 0,
            gaps_ns: Vec::new(),
            prompt_tokens: None,
            completion_tokens: None,
            response_id: None,
            stream_error: false,
            truncated_reported: false,
            gaps_dropped: false,
        }
    }

    fn timed(&self) -> bool {
        self.meta.endpoint.is_some()
    }

    fn by_status(&self) -> Outcome {
        match self.status {
            None => Outcome::ServerReset,
            Some(s) if s >= 500 => Outcome::ServerError,
            Some(s) if s >= 400 => Outcome::ClientError,
            Some(_) if self.stream_error => Outcome::StreamError,
            Some(_) => Outcome::Ok,
        }
    }
}

#[derive(Debug)]
struct Conn {
    tick: u64,
    mode: Mode,
    /// We saw the accept, so the first bytes must start a message.
    accepted: bool,
    ingress: Ingress,
    egress: Egress,
    queue: VecDeque<Req>,
    unmatched_reported: bool,
    /// Its `buffered()` bytes as last counted into the tracker's total.
    accounted: usize,
    /// The tick its entry in the tracker's eviction queue carries.
    queued: u64,
    /// An HTTP/2 connection's framing and streams (`h2.rs`); its requests are in `queue`.
    h2: Option<Box<h2::H2>>,
}

/// Tracks every connection of the traced servers. See the module docs.
#[derive(Debug)]
pub struct ConnTracker {
    /// `FxHash`: keys are small trusted integers (tgid, fd), and `SipHash` showed up at 3 % of the
    /// ingest profile.
    conns: FxHashMap<ConnId, Conn>,
    /// Bumped on every event; `Conn::tick` holds the value at its last use.
    tick: u64,
    /// Eviction order when `max_conns` is reached, without an ordered-index update per event
    /// (second chance, as the CLOCK page-replacement algorithm): each connection is queued once
    /// with the tick it had then (`Conn::queued`). At eviction the front entry is the victim if
    /// its connection was not used since it was queued; otherwise it is queued again with its
    /// newer tick. A connection in use is never the victim while an idle one is queued; every
    /// requeue is paid for by a use, so eviction is O(1) amortized (it was a scan of every
    /// connection, 65,536 at the cap, per new connection). Entries of closed connections are
    /// dropped when met, or by a compaction once the queue is over twice the connections.
    lru: VecDeque<(u64, ConnId)>,
    next_seq: u64,
    max_conns: usize,
    /// Bytes all parser buffers may hold (see `DEFAULT_MEMORY_BUDGET`), and hold now.
    budget: usize,
    used: usize,
    /// The moment of the record being fed (`set_io`), taken by the next `on_*` call.
    io: Option<Moment>,
    /// The parts of the read being fed (`set_arrival_parts`), taken by the next `on_*` call.
    arrival_parts: Option<ReadArrival>,
}

impl Default for ConnTracker {
    fn default() -> Self {
        Self::new()
    }
}

impl ConnTracker {
    pub fn new() -> Self {
        Self::with_max_conns(MAX_CONNS_TRACKED)
    }

    /// A tracker whose parser buffers hold at most about `bytes` together.
    pub fn with_budget(bytes: usize) -> Self {
        Self {
            budget: bytes,
            ..Self::new()
        }
    }

    fn with_max_conns(max_conns: usize) -> Self {
        Self {
            conns: FxHashMap::default(),
            tick: 0,
            lru: VecDeque::new(),
            next_seq: 0,
            max_conns: max_conns.max(1),
            budget: DEFAULT_MEMORY_BUDGET,
            used: 0,
            io: None,
            arrival_parts: None,
        }
    }

    /// Bytes the parser buffers of all connections hold now.
    pub fn buffered(&self) -> usize {
        self.used
    }

    /// The thread and clock of the record the next `on_ingress`/`on_egress` call feeds (its
    /// read or write time in `ts_ns`; ingress calls are dated by arrival). Without it a call's
    /// moment is its `ts_ns` with no thread.
    pub fn set_io(&mut self, io: Moment) {
        self.io = Some(io);
    }

    /// When the parts of the read the next `on_ingress` call feeds reached the socket (see
    /// [`ReadArrival`]; its `ts_ns` is when the first did): a request that begins behind other
    /// bytes of the read is dated by its part. Without it, by `ts_ns`.
    pub fn set_arrival_parts(&mut self, arrival: ReadArrival) {
        self.arrival_parts = Some(arrival);
    }

    /// Bytes the server read. `len` = bytes the syscall moved; `data` = the captured prefix.
    pub fn on_ingress(
        &mut self,
        conn: ConnId,
        ts_ns: u64,
        len: u64,
        data: &[u8],
        obs: &mut impl Observer,
    ) {
        self.on_bytes(false, conn, ts_ns, Seg::new(data, len), obs);
    }

    /// Bytes the server wrote (same `len`/`data` convention).
    pub fn on_egress(
        &mut self,
        conn: ConnId,
        ts_ns: u64,
        len: u64,
        data: &[u8],
        obs: &mut impl Observer,
    ) {
        self.on_bytes(true, conn, ts_ns, Seg::new(data, len), obs);
    }

    /// [`Self::on_egress`] of a write longer than its capture, with the kernel's capture of its
    /// last bytes (`tail`, which may overlap `data` when the write is shorter than both). The
    /// tail is parsed only where the response's framing reached it through the uncaptured middle
    /// (inside chunk data or a Content-Length body): then the end of a response written in one
    /// big write with its closing events and terminator is seen, not taken for an abort.
    pub fn on_egress_with_tail(
        &mut self,
        conn: ConnId,
        ts_ns: u64,
        len: u64,
        data: &[u8],
        tail: &[u8],
        obs: &mut impl Observer,
    ) {
        if tail.is_empty() {
            return self.on_egress(conn, ts_ns, len, data, obs);
        }
        let beyond_data = len.saturating_sub(data.len() as u64);
        let fresh = tail
            .len()
            .min(usize::try_from(beyond_data).unwrap_or(usize::MAX));
        let tail = &tail[tail.len() - fresh..];
        self.on_bytes(true, conn, ts_ns, Seg::new(data, len - fresh as u64), obs);
        let in_body = || {
            self.conns
                .get(&conn)
                .is_some_and(|c| matches!(c.egress, Egress::Body { .. }))
        };
        if !tail.is_empty() && in_body() {
            self.on_bytes(true, conn, ts_ns, Seg::new(tail, tail.len() as u64), obs);
        }
    }

    fn on_bytes(
        &mut self,
        egress: bool,
        conn: ConnId,
        ts_ns: u64,
        seg: Seg<'_>,
        obs: &mut impl Observer,
    ) {
        let io = self.io.take().unwrap_or(Moment {
            ts_ns,
            ..Moment::default()
        });
        let arrival = self
            .arrival_parts
            .take()
            .filter(|a| a.first_ns == ts_ns)
            .unwrap_or(ReadArrival::one(ts_ns));
        let (conns, lru, used) = (&mut self.conns, &mut self.lru, &mut self.used);
        let Some(c) = touch(
            conns,
            lru,
            &mut self.tick,
            used,
            self.max_conns,
            conn,
            ts_ns,
            false,
            obs,
        ) else {
            return;
        };
        if egress {
            c.egress(conn, ts_ns, io, seg, &mut self.next_seq, obs);
        } else {
            c.ingress(conn, arrival, io, seg, &mut self.next_seq, obs);
        }
        // One event adds at most one capture (4 KiB) to one connection, so checking the
        // connection that grew keeps the total within the budget plus one capture.
        let mut now = c.buffered();
        *used = used.saturating_sub(c.accounted) + now;
        if *used > self.budget && now > 0 {
            c.shed(conn, obs);
            let after = c.buffered();
            *used = used.saturating_sub(now - after.min(now));
            now = after;
        }
        c.accounted = now;
    }

    /// A read returned 0: the client closed its side.
    pub fn on_peer_closed(&mut self, conn: ConnId, ts_ns: u64, obs: &mut impl Observer) {
        if let Some(c) = self.conns.get_mut(&conn) {
            c.client_gone(conn, ts_ns, obs);
        }
    }

    /// A write or read failed with `errno`: the client went away (EPIPE, ECONNRESET, …).
    pub fn on_io_error(&mut self, conn: ConnId, ts_ns: u64, errno: i32, obs: &mut impl Observer) {
        if TRANSIENT_ERRNOS.contains(&errno) {
            return;
        }
        if let Some(c) = self.conns.get_mut(&conn) {
            c.client_gone(conn, ts_ns, obs);
        }
    }

    /// The server closed the socket.
    pub fn on_close(&mut self, conn: ConnId, ts_ns: u64, obs: &mut impl Observer) {
        if let Some(c) = self.remove(conn) {
            c.closed(conn, ts_ns, obs);
        }
    }

    /// A new connection was accepted on this fd: stale state under the same id is finished first.
    pub fn on_accept(&mut self, conn: ConnId, ts_ns: u64, obs: &mut impl Observer) {
        if let Some(c) = self.remove(conn) {
            c.reset_all(conn, ts_ns, obs);
        }
        touch(
            &mut self.conns,
            &mut self.lru,
            &mut self.tick,
            &mut self.used,
            self.max_conns,
            conn,
            ts_ns,
            true,
            obs,
        );
    }

    /// The process exited: its connections' in-flight requests end as `ServerReset`.
    pub fn on_process_exit(&mut self, tgid: u32, ts_ns: u64, obs: &mut impl Observer) {
        let mut ids: Vec<ConnId> = self
            .conns
            .keys()
            .filter(|c| c.tgid == tgid)
            .copied()
            .collect();
        ids.sort_unstable();
        for id in ids {
            if let Some(c) = self.remove(id) {
                c.reset_all(id, ts_ns, obs);
            }
        }
    }

    pub fn open_connections(&self) -> usize {
        self.conns.len()
    }

    /// Requests currently in flight (received, not finished).
    pub fn in_flight(&self) -> usize {
        self.conns.values().map(|c| c.queue.len()).sum()
    }

    fn remove(&mut self, id: ConnId) -> Option<Conn> {
        let c = self.conns.remove(&id)?;
        self.used = self.used.saturating_sub(c.accounted);
        Some(c)
    }
}

/// Upper bound on state-machine steps for one syscall's bytes: every step consumes bytes or is
/// one of a few transitions between consuming steps. Only a bug could reach it; it turns such a
/// bug into lost parsing instead of a hung agent.
fn step_budget(seg: &Seg<'_>) -> usize {
    seg.data.len().saturating_mul(4).saturating_add(64)
}

impl Conn {
    fn new(accepted: bool) -> Self {
        Self {
            tick: 0,
            mode: Mode::Active,
            accepted,
            ingress: Ingress::Fresh,
            egress: Egress::Fresh,
            queue: VecDeque::new(),
            unmatched_reported: false,
            accounted: 0,
            queued: 0,
            h2: None,
        }
    }

    /// Bytes its parser buffers hold (capacities): what the memory budget counts.
    fn buffered(&self) -> usize {
        let ingress = match &self.ingress {
            Ingress::Head(h) => h.buf.capacity(),
            Ingress::Body(b) => b.sniff.capacity(),
            _ => 0,
        };
        let egress = match &self.egress {
            Egress::Head { buf } => buf.capacity(),
            Egress::Body { analyzer, .. } => analyzer.buffered(),
            _ => 0,
        };
        let gaps: usize = self.queue.iter().map(|r| r.gaps_ns.capacity() * 8).sum();
        ingress + egress + gaps + self.h2.as_ref().map_or(0, |h| h.buffered())
    }

    /// The memory budget is spent: give back what can go without losing a request, saying what.
    fn shed(&mut self, id: ConnId, obs: &mut impl Observer) {
        if let Ingress::Body(b) = &mut self.ingress {
            if b.sniffing {
                let sniff = std::mem::take(&mut b.sniff);
                b.sniffing = false;
                b.truncated = true;
                let seq = b.seq;
                // The fields the captured part of the body holds are known now.
                self.body_done(id, seq, &sniff, false, obs);
                obs.budget_dropped(id, "request_body");
            }
        }
        if let Egress::Body { analyzer, .. } = &mut self.egress {
            if analyzer.buffered() > 0 && analyzer.shed() {
                obs.budget_dropped(id, "response_body");
            }
        }
        if self.h2.as_mut().is_some_and(|h| h.shed()) {
            obs.budget_dropped(id, "h2_buffers");
        }
        for r in &mut self.queue {
            if r.gaps_ns.capacity() > 0 {
                r.gaps_ns = Vec::new();
                r.gaps_dropped = true;
                obs.budget_dropped(id, "gaps");
            }
        }
    }

    /// Ends the front request; `outcome` `None` means by its status.
    fn finish_front(
        &mut self,
        id: ConnId,
        outcome: Option<Outcome>,
        end_ns: u64,
        obs: &mut impl Observer,
    ) {
        if let Some(req) = self.queue.pop_front() {
            let outcome = outcome.unwrap_or_else(|| req.by_status());
            finish(id, req, &self.ingress, outcome, end_ns, obs);
        }
    }

    fn finish_all(&mut self, id: ConnId, outcome: Outcome, end_ns: u64, obs: &mut impl Observer) {
        while !self.queue.is_empty() {
            self.finish_front(id, Some(outcome), end_ns, obs);
        }
    }

    /// The client closed or reset the connection: what is in flight was abandoned by it.
    fn client_gone(&mut self, id: ConnId, ts: u64, obs: &mut impl Observer) {
        self.finish_all(id, Outcome::ClientAbort, ts, obs);
        if self.mode == Mode::Active {
            self.mode = Mode::Drained;
        }
        self.ingress = Ingress::Syncing;
        self.egress = Egress::Syncing;
    }

    /// The server closed the socket. A response read until close is complete now.
    fn closed(mut self, id: ConnId, ts: u64, obs: &mut impl Observer) {
        match std::mem::replace(&mut self.egress, Egress::Syncing) {
            Egress::Body {
                framer: Framer::UntilClose,
                mut analyzer,
            } => {
                if let Some(req) = self.queue.front_mut() {
                    analyzer.finish(
                        ts,
                        &mut ReqSink {
                            id,
                            req,
                            obs: &mut *obs,
                            io: None,
                        },
                    );
                    self.finish_front(id, None, ts, obs);
                }
            }
            Egress::Lost { .. } => self.finish_front(id, None, ts, obs),
            _ => {}
        }
        self.finish_all(id, Outcome::ServerReset, ts, obs);
    }

    /// The connection is going away under us (eviction, fd reuse, process exit).
    fn reset_all(mut self, id: ConnId, ts: u64, obs: &mut impl Observer) {
        self.finish_all(id, Outcome::ServerReset, ts, obs);
    }

    /// Stops parsing this connection for good and asks the kernel to stop capturing it.
    fn kill(&mut self, id: ConnId, ts: u64, kind: Option<ParseErrorKind>, obs: &mut impl Observer) {
        if let Some(kind) = kind {
            obs.parse_error(id, kind);
        }
        obs.untrack(id);
        self.finish_all(id, Outcome::ServerReset, ts, obs);
        self.mode = Mode::Dead;
        self.ingress = Ingress::Syncing;
        self.egress = Egress::Syncing;
    }
}

fn next(seq: &mut u64) -> u64 {
    let s = *seq;
    *seq = seq.wrapping_add(1);
    s
}

mod egress;
mod evict;
pub mod h2;
mod ingress;
mod sink;
#[cfg(test)]
mod tests;
