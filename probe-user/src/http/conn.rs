//! Per-connection state machine: turns what the server reads (requests) and writes (responses)
//! on each socket into timed requests, reported to an `Observer` as they progress.
//!
//! Each connection keeps a FIFO of requests whose responses are not complete; responses are
//! matched to its front (HTTP/1.1 pipelining answers in order). Connections opened before the
//! probe attached are picked up mid-stream and synchronise on the next message boundary.

use std::collections::{BTreeMap, HashMap, VecDeque};

use super::{
    body::{ChunkDecoder, Fed, Framer, Piece, Seg},
    events::Classified,
    request::{self, BodyFraming, MAX_BODY_SNIFF, MAX_HEAD_BYTES},
    response::{self, Analyzer, EventSink, ForRequest, MAX_RESPONSE_HEAD},
    ConnId, Observer, Outcome, ParseErrorKind, RequestMeta, RequestRecord, MAX_GAPS_KEPT,
};

/// Requests queued on one connection awaiting responses. Real clients pipeline rarely and
/// shallowly; past this the connection is out of step or hostile, and we stop queueing.
pub const MAX_PIPELINED: usize = 64;
/// Connections with state at once; the least recently used is evicted past this. Bounds memory
/// at roughly this many times a connection's buffers (heads ≤ 16 KiB, sniff ≤ 64 KiB).
pub const MAX_CONNS_TRACKED: usize = 65536;

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
    Head { buf: Vec<u8>, arrival_ns: u64, from_sync: bool },
    /// A body being read for request `seq` (`None`: the request was not queued).
    Body { seq: Option<u64>, framer: Framer, sniff: Vec<u8>, sniffing: bool, truncated: bool },
    /// Looking for the next request line.
    Syncing,
}

#[derive(Debug)]
enum Egress {
    Fresh,
    Idle,
    Head { buf: Vec<u8> },
    Body { framer: Framer, analyzer: Analyzer },
    /// The front request's response lost its framing: it ends at close, or where a write starts
    /// with the next status line.
    Lost { last_ts: u64 },
    /// No response in progress, looking for a write that starts with a status line.
    Syncing,
}

#[derive(Debug)]
struct Req {
    seq: u64,
    meta: RequestMeta,
    arrival_ns: u64,
    is_head: bool,
    /// The body fields are in `meta` (and `request_started` was called if timed).
    started: bool,
    status: Option<u16>,
    first_token_ns: Option<u64>,
    last_content_ns: u64,
    content_events: u64,
    gaps_ns: Vec<u64>,
    prompt_tokens: Option<u64>,
    completion_tokens: Option<u64>,
    stream_error: bool,
    truncated_reported: bool,
}

impl Req {
    fn new(seq: u64, meta: RequestMeta, arrival_ns: u64, is_head: bool) -> Self {
        Self {
            seq,
            meta,
            arrival_ns,
            is_head,
            started: false,
            status: None,
            first_token_ns: None,
            last_content_ns: 0,
            content_events: 0,
            gaps_ns: Vec::new(),
            prompt_tokens: None,
            completion_tokens: None,
            stream_error: false,
            truncated_reported: false,
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
}

/// Tracks every connection of the traced servers. See the module docs.
#[derive(Debug)]
pub struct ConnTracker {
    conns: HashMap<ConnId, Conn>,
    /// `Conn::tick` → connection, oldest first, for eviction.
    lru: BTreeMap<u64, ConnId>,
    tick: u64,
    next_seq: u64,
    max_conns: usize,
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

    fn with_max_conns(max_conns: usize) -> Self {
        Self { conns: HashMap::new(), lru: BTreeMap::new(), tick: 0, next_seq: 0, max_conns: max_conns.max(1) }
    }

    /// Bytes the server read. `len` = bytes the syscall moved; `data` = the captured prefix.
    pub fn on_ingress(&mut self, conn: ConnId, ts_ns: u64, len: u64, data: &[u8], obs: &mut impl Observer) {
        if self.touch(conn, ts_ns, false, obs) {
            if let Some(c) = self.conns.get_mut(&conn) {
                c.ingress(conn, ts_ns, Seg::new(data, len), &mut self.next_seq, obs);
            }
        }
    }

    /// Bytes the server wrote (same `len`/`data` convention).
    pub fn on_egress(&mut self, conn: ConnId, ts_ns: u64, len: u64, data: &[u8], obs: &mut impl Observer) {
        if self.touch(conn, ts_ns, false, obs) {
            if let Some(c) = self.conns.get_mut(&conn) {
                c.egress(conn, ts_ns, Seg::new(data, len), &mut self.next_seq, obs);
            }
        }
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
        self.touch(conn, ts_ns, true, obs);
    }

    /// The process exited: its connections' in-flight requests end as `ServerReset`.
    pub fn on_process_exit(&mut self, tgid: u32, ts_ns: u64, obs: &mut impl Observer) {
        let mut ids: Vec<ConnId> = self.conns.keys().filter(|c| c.tgid == tgid).copied().collect();
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
        self.lru.remove(&c.tick);
        Some(c)
    }

    /// Finds or creates a connection's state and marks it most recently used; `accepted` says a
    /// state created now follows an accept. False for connections no longer parsed.
    fn touch(&mut self, id: ConnId, ts: u64, accepted: bool, obs: &mut impl Observer) -> bool {
        self.tick += 1;
        let tick = self.tick;
        if let Some(old) = self.conns.get(&id).map(|c| c.tick) {
            self.lru.remove(&old);
        } else {
            while self.conns.len() >= self.max_conns {
                let Some((_, victim)) = self.lru.pop_first() else { break };
                if let Some(c) = self.conns.remove(&victim) {
                    c.reset_all(victim, ts, obs);
                }
            }
            self.conns.insert(id, Conn::new(accepted));
        }
        self.lru.insert(tick, id);
        self.conns.get_mut(&id).is_some_and(|c| {
            c.tick = tick;
            c.mode == Mode::Active
        })
    }
}

/// Fills in a request's body fields if that has not happened yet (its response began, or it ended,
/// before its body was read), and reports it started.
fn ensure_started(id: ConnId, req: &mut Req, ingress: &Ingress, obs: &mut impl Observer) {
    if req.started {
        return;
    }
    req.started = true;
    let sniff = match ingress {
        Ingress::Body { seq: Some(s), sniff, .. } if *s == req.seq => sniff.as_slice(),
        _ => &[],
    };
    request::apply_body(&mut req.meta, sniff, false);
    if req.timed() {
        obs.request_started(id, &req.meta, req.arrival_ns);
    }
}

fn finish(id: ConnId, mut req: Req, ingress: &Ingress, outcome: Outcome, end_ns: u64, obs: &mut impl Observer) {
    if !req.timed() {
        return;
    }
    ensure_started(id, &mut req, ingress, obs);
    obs.request_finished(RequestRecord {
        conn: id,
        meta: req.meta,
        status: req.status,
        outcome,
        arrival_ns: req.arrival_ns,
        first_token_ns: req.first_token_ns,
        end_ns,
        content_events: req.content_events,
        gaps_ns: req.gaps_ns,
        prompt_tokens: req.prompt_tokens,
        completion_tokens: req.completion_tokens,
    });
}

/// Applies a response's events to the request it answers.
struct ReqSink<'a, O: Observer> {
    id: ConnId,
    req: &'a mut Req,
    obs: &'a mut O,
}

impl<O: Observer> EventSink for ReqSink<'_, O> {
    fn event(&mut self, ev: Classified, ts: u64) {
        let r = &mut *self.req;
        r.stream_error |= ev.error;
        r.prompt_tokens = ev.prompt_tokens.or(r.prompt_tokens);
        r.completion_tokens = ev.completion_tokens.or(r.completion_tokens);
        if !ev.content {
            return;
        }
        r.content_events += 1;
        if r.first_token_ns.is_none() {
            r.first_token_ns = Some(ts);
            if r.timed() {
                self.obs.first_token(self.id, &r.meta, ts.saturating_sub(r.arrival_ns));
            }
        } else {
            let gap = ts.saturating_sub(r.last_content_ns);
            if r.gaps_ns.len() < MAX_GAPS_KEPT {
                r.gaps_ns.push(gap);
            }
            if r.timed() {
                self.obs.token_gap(self.id, &r.meta, gap);
            }
        }
        r.last_content_ns = ts;
    }

    fn stream_error(&mut self) {
        self.req.stream_error = true;
    }

    fn parse_error(&mut self, kind: ParseErrorKind) {
        if kind == ParseErrorKind::TruncatedCapture {
            if self.req.truncated_reported {
                return;
            }
            self.req.truncated_reported = true;
        }
        self.obs.parse_error(self.id, kind);
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
        }
    }

    fn ingress(&mut self, id: ConnId, ts: u64, mut seg: Seg<'_>, next_seq: &mut u64, obs: &mut impl Observer) {
        let mut budget = step_budget(&seg);
        while !seg.is_empty() && self.mode == Mode::Active && budget > 0 {
            budget -= 1;
            self.ingress = match std::mem::replace(&mut self.ingress, Ingress::Syncing) {
                Ingress::Fresh => {
                    if seg.data.is_empty() {
                        Ingress::Syncing
                    } else if request::could_start_request(seg.data) {
                        Ingress::Head { buf: Vec::new(), arrival_ns: ts, from_sync: false }
                    } else if self.accepted || request::looks_not_http(seg.data) {
                        return self.kill(id, ts, Some(ParseErrorKind::NotHttp), obs);
                    } else {
                        // Picked up mid-stream (the middle of a body): quietly wait for a request line.
                        Ingress::Syncing
                    }
                }
                Ingress::Idle => Ingress::Head { buf: Vec::new(), arrival_ns: ts, from_sync: false },
                Ingress::Head { mut buf, arrival_ns, from_sync } => {
                    let old = buf.len();
                    let take = (MAX_HEAD_BYTES + 1).saturating_sub(old).min(seg.data.len());
                    buf.extend_from_slice(seg.data.get(..take).unwrap_or_default());
                    match request::parse_head(&buf) {
                        request::HeadStatus::Complete(head, n) => {
                            seg.advance(n.saturating_sub(old) as u64);
                            self.request_parsed(id, head, arrival_ns, next_seq, obs)
                        }
                        request::HeadStatus::TooLarge => {
                            return self.kill(id, ts, Some(ParseErrorKind::HeadTooLarge), obs);
                        }
                        request::HeadStatus::Partial if buf.len() > MAX_HEAD_BYTES => {
                            return self.kill(id, ts, Some(ParseErrorKind::HeadTooLarge), obs);
                        }
                        request::HeadStatus::Partial if seg.missing > 0 => {
                            // The rest of the head was not captured. Queue an untimed stand-in so
                            // the response still pairs with the right request.
                            obs.parse_error(id, ParseErrorKind::TruncatedCapture);
                            self.enqueue(Req::new(next(next_seq), RequestMeta::default(), arrival_ns, false), id, obs);
                            seg = Seg { data: &[], missing: 0 };
                            Ingress::Syncing
                        }
                        request::HeadStatus::Partial => {
                            seg = Seg { data: &[], missing: 0 };
                            Ingress::Head { buf, arrival_ns, from_sync }
                        }
                        request::HeadStatus::Invalid => {
                            // A false start found while resynchronising is not worth reporting.
                            if !from_sync {
                                obs.parse_error(id, ParseErrorKind::BadRequest);
                            }
                            seg.advance(1);
                            Ingress::Syncing
                        }
                    }
                }
                Ingress::Body { seq, mut framer, mut sniff, sniffing, mut truncated } => {
                    let fed = framer.feed(seg, &mut |p| match p {
                        Piece::Bytes(b) if sniffing => {
                            let room = MAX_BODY_SNIFF.saturating_sub(sniff.len());
                            truncated |= b.len() > room;
                            sniff.extend_from_slice(b.get(..room.min(b.len())).unwrap_or_default());
                        }
                        Piece::Bytes(_) => {}
                        Piece::Gap(_) => truncated = true,
                    });
                    match fed {
                        Fed::More => {
                            seg = Seg { data: &[], missing: 0 };
                            if sniffing && sniff.len() >= MAX_BODY_SNIFF {
                                // The cap is reached: the fields we can know are known now.
                                self.body_done(id, seq, &sniff, false, obs);
                            }
                            Ingress::Body { seq, framer, sniff, sniffing, truncated }
                        }
                        Fed::Done { used } => {
                            seg.advance(used);
                            self.body_done(id, seq, &sniff, !truncated, obs);
                            Ingress::Idle
                        }
                        Fed::Lost(kind) => {
                            obs.parse_error(id, kind);
                            seg = Seg { data: &[], missing: 0 };
                            self.body_done(id, seq, &sniff, false, obs);
                            Ingress::Syncing
                        }
                    }
                }
                Ingress::Syncing => match request::find_request_start(seg.data) {
                    Some(i) => {
                        seg.advance(i as u64);
                        Ingress::Head { buf: Vec::new(), arrival_ns: ts, from_sync: true }
                    }
                    None => {
                        seg = Seg { data: &[], missing: 0 };
                        Ingress::Syncing
                    }
                },
            };
        }
    }

    /// A request head was parsed: queue the request and read its body.
    fn request_parsed(
        &mut self,
        id: ConnId,
        head: request::RequestHead,
        arrival_ns: u64,
        next_seq: &mut u64,
        obs: &mut impl Observer,
    ) -> Ingress {
        let seq = next(next_seq);
        let meta = RequestMeta { endpoint: head.endpoint, request_id: head.request_id, ..RequestMeta::default() };
        let timed = meta.endpoint.is_some();
        let queued = self.enqueue(Req::new(seq, meta, arrival_ns, head.is_head), id, obs).then_some(seq);
        let framer = match head.body {
            BodyFraming::None => {
                self.body_done(id, queued, &[], true, obs);
                return Ingress::Idle;
            }
            BodyFraming::Length(n) => Framer::Length { remaining: n },
            BodyFraming::Chunked => Framer::Chunked(ChunkDecoder::default()),
        };
        Ingress::Body { seq: queued, framer, sniff: Vec::new(), sniffing: timed && queued.is_some(), truncated: false }
    }

    /// Queues a request unless the connection already has `MAX_PIPELINED` waiting.
    fn enqueue(&mut self, req: Req, id: ConnId, obs: &mut impl Observer) -> bool {
        if self.queue.len() >= MAX_PIPELINED {
            obs.parse_error(id, ParseErrorKind::BadRequest);
            return false;
        }
        self.queue.push_back(req);
        true
    }

    /// The body of request `seq` is read (or as much of it as we will look at).
    fn body_done(&mut self, id: ConnId, seq: Option<u64>, sniff: &[u8], complete: bool, obs: &mut impl Observer) {
        let Some(req) = seq.and_then(|s| self.queue.iter_mut().rev().find(|r| r.seq == s)) else {
            return;
        };
        if req.started {
            return;
        }
        req.started = true;
        request::apply_body(&mut req.meta, sniff, complete);
        if req.timed() {
            obs.request_started(id, &req.meta, req.arrival_ns);
        }
    }

    fn egress(&mut self, id: ConnId, ts: u64, mut seg: Seg<'_>, next_seq: &mut u64, obs: &mut impl Observer) {
        let total = seg.data.len() as u64 + seg.missing;
        let mut budget = step_budget(&seg);
        while !seg.is_empty() && self.mode == Mode::Active && budget > 0 {
            budget -= 1;
            let at_write_start = seg.data.len() as u64 + seg.missing == total;
            self.egress = match std::mem::replace(&mut self.egress, Egress::Syncing) {
                Egress::Fresh => {
                    if seg.data.is_empty() {
                        Egress::Syncing
                    } else if response::could_start_response(seg.data) {
                        Egress::Head { buf: Vec::new() }
                    } else if self.accepted || request::looks_not_http(seg.data) {
                        return self.kill(id, ts, Some(ParseErrorKind::NotHttp), obs);
                    } else {
                        // Picked up in the middle of a response.
                        Egress::Syncing
                    }
                }
                Egress::Idle if seg.data.is_empty() => {
                    seg = Seg { data: &[], missing: 0 };
                    self.lose_front(id, ts, ParseErrorKind::TruncatedCapture, obs)
                }
                Egress::Idle => Egress::Head { buf: Vec::new() },
                Egress::Head { mut buf } => {
                    let old = buf.len();
                    let take = (MAX_RESPONSE_HEAD + 1).saturating_sub(old).min(seg.data.len());
                    buf.extend_from_slice(seg.data.get(..take).unwrap_or_default());
                    let req = self.queue.front().map_or(
                        ForRequest { endpoint: None, is_head: false, streams: false },
                        |r| ForRequest { endpoint: r.meta.endpoint, is_head: r.is_head, streams: r.meta.stream == Some(true) },
                    );
                    match response::parse_head(&buf, req) {
                        response::HeadStatus::Complete(head, n) => {
                            seg.advance(n.saturating_sub(old) as u64);
                            match self.response_parsed(id, head, ts, next_seq, obs) {
                                Some(next) => next,
                                None => return,
                            }
                        }
                        response::HeadStatus::Partial if buf.len() <= MAX_RESPONSE_HEAD && seg.missing == 0 => {
                            seg = Seg { data: &[], missing: 0 };
                            Egress::Head { buf }
                        }
                        status => {
                            seg = Seg { data: &[], missing: 0 };
                            let kind = match status {
                                response::HeadStatus::Partial if buf.len() <= MAX_RESPONSE_HEAD => {
                                    ParseErrorKind::TruncatedCapture
                                }
                                _ => ParseErrorKind::BadResponse,
                            };
                            if self.queue.is_empty() && !buf.starts_with(b"HTTP/") {
                                // Not a response at all, and nothing waits for one: the tail of
                                // something we are not following.
                                Egress::Syncing
                            } else {
                                self.lose_front(id, ts, kind, obs)
                            }
                        }
                    }
                }
                Egress::Body { mut framer, mut analyzer } => {
                    let Some(req) = self.queue.front_mut() else {
                        seg = Seg { data: &[], missing: 0 };
                        self.egress = Egress::Syncing;
                        continue;
                    };
                    let mut sink = ReqSink { id, req, obs: &mut *obs };
                    let fed = framer.feed(seg, &mut |p| match p {
                        Piece::Bytes(b) => analyzer.bytes(b, ts, &mut sink),
                        Piece::Gap(_) => analyzer.gap(ts, &mut sink),
                    });
                    match fed {
                        Fed::More => {
                            seg = Seg { data: &[], missing: 0 };
                            Egress::Body { framer, analyzer }
                        }
                        Fed::Done { used } => {
                            seg.advance(used);
                            analyzer.finish(ts, &mut sink);
                            self.finish_front(id, None, ts, obs);
                            Egress::Idle
                        }
                        Fed::Lost(kind) => {
                            sink.parse_error(kind);
                            seg = Seg { data: &[], missing: 0 };
                            Egress::Lost { last_ts: ts }
                        }
                    }
                }
                Egress::Lost { last_ts } => {
                    if at_write_start && seg.data.starts_with(b"HTTP/1.") {
                        self.finish_front(id, None, last_ts, obs);
                        Egress::Idle
                    } else {
                        seg = Seg { data: &[], missing: 0 };
                        Egress::Lost { last_ts: ts }
                    }
                }
                Egress::Syncing => {
                    if at_write_start && seg.data.starts_with(b"HTTP/1.") {
                        Egress::Idle
                    } else {
                        seg = Seg { data: &[], missing: 0 };
                        Egress::Syncing
                    }
                }
            };
        }
    }

    /// A response head was parsed. `None`: the connection stopped being HTTP (101).
    fn response_parsed(
        &mut self,
        id: ConnId,
        head: response::ResponseHead,
        ts: u64,
        next_seq: &mut u64,
        obs: &mut impl Observer,
    ) -> Option<Egress> {
        if head.status == 101 {
            // Switching Protocols (WebSocket, h2c): the request ends here, the rest is not HTTP.
            if let Some(front) = self.queue.front_mut() {
                front.status = Some(101);
            }
            self.finish_front(id, None, ts, obs);
            self.kill(id, ts, None, obs);
            return None;
        }
        if head.status < 200 {
            return Some(Egress::Idle); // 100 Continue, 103 Early Hints: the final response follows
        }
        if self.queue.is_empty() {
            // Its request was read before we attached, or was dropped. Frame it all the same.
            if !self.unmatched_reported {
                self.unmatched_reported = true;
                obs.parse_error(id, ParseErrorKind::UnmatchedResponse);
            }
            let mut stand_in = Req::new(next(next_seq), RequestMeta::default(), ts, false);
            stand_in.started = true;
            self.queue.push_back(stand_in);
        }
        let front = self.queue.front_mut()?;
        ensure_started(id, front, &self.ingress, obs);
        front.status = Some(head.status);
        match head.framer {
            None => {
                self.finish_front(id, None, ts, obs);
                Some(Egress::Idle)
            }
            Some(framer) => Some(Egress::Body { framer, analyzer: Analyzer::new(head.kind, head.status) }),
        }
    }

    /// The front request's response cannot be framed: report why and wait for close or resync.
    fn lose_front(&mut self, id: ConnId, ts: u64, kind: ParseErrorKind, obs: &mut impl Observer) -> Egress {
        match self.queue.front_mut() {
            Some(req) => {
                ReqSink { id, req, obs }.parse_error(kind);
                Egress::Lost { last_ts: ts }
            }
            None => {
                obs.parse_error(id, kind);
                Egress::Syncing
            }
        }
    }

    /// Ends the front request; `outcome` `None` means by its status.
    fn finish_front(&mut self, id: ConnId, outcome: Option<Outcome>, end_ns: u64, obs: &mut impl Observer) {
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
            Egress::Body { framer: Framer::UntilClose, mut analyzer } => {
                if let Some(req) = self.queue.front_mut() {
                    analyzer.finish(ts, &mut ReqSink { id, req, obs: &mut *obs });
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

#[cfg(test)]
#[path = "conn_tests.rs"]
mod tests;
