//! HTTP/2 on a connection (prior-knowledge h2c, or `h2` negotiated by ALPN under TLS): each
//! stream is a request, queued with the HTTP/1 ones' `Req` so the connection's end, eviction and
//! the in-flight count treat both alike. Request heads come from the client's HPACK blocks,
//! bodies from its DATA frames (sniffed for the same fields as HTTP/1); responses from the
//! server's HEADERS and DATA, whose payload the HTTP/1 body analyzer reads (SSE, NDJSON, JSON).
//!
//! Timing is that of clear text: a stream arrives with the read holding its HEADERS frame; its
//! first token is the write of the DATA frame carrying its first content event.
//!
//! gRPC calls (`content-type: application/grpc…`) are requests too: the method path is the
//! endpoint, each response message a content event, `grpc-status` in the trailers the outcome
//! (`http/grpc.rs`).
//!
//! A connection joined mid-stream is not followed: the HPACK dynamic tables are unknown, so no
//! header could be trusted (it is counted as `not_http` at its first bytes, as before).

use loona_hpack::Decoder;
use rustc_hash::FxHashMap;

use super::{finish, next, Conn, Ingress, Mode, Req, ReqSink};
use crate::http::{
    grpc,
    h2::{FrameReader, Item, Lost},
    request::{cut_field, endpoint_for_path, MAX_BODY_SNIFF},
    response::{body_kind, Analyzer, BodyKind, ForRequest},
    ConnId, Moment, Observer, Outcome, ParseErrorKind, ReadArrival, RequestMeta,
};

/// Streams followed at once on one connection (servers allow 100–250 concurrent streams by
/// default); a stream past this is not timed, counted in `llm_probe_budget_dropped_total
/// {what="h2_stream"}`.
pub const MAX_H2_STREAMS: usize = 256;
/// HPACK dynamic table bound (the default `SETTINGS_HEADER_TABLE_SIZE` is 4 KiB): a peer that
/// announces more makes its blocks fail to decode, which ends the connection's parsing.
const MAX_HPACK_TABLE: usize = 64 * 1024;

/// One HTTP/2 connection's parsing state.
pub(super) struct H2 {
    rx: FrameReader,
    tx: FrameReader,
    rx_hpack: Decoder<'static>,
    tx_hpack: Decoder<'static>,
    streams: FxHashMap<u32, Stream>,
}

impl std::fmt::Debug for H2 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The HPACK decoders have no `Debug`.
        f.debug_struct("H2")
            .field("rx", &self.rx)
            .field("tx", &self.tx)
            .field("streams", &self.streams)
            .finish_non_exhaustive()
    }
}

#[derive(Debug)]
struct Stream {
    /// Its `Req` in the connection's queue.
    seq: u64,
    sniff: Vec<u8>,
    /// Body bytes were not captured or did not fit.
    truncated: bool,
    /// The response's head was read: its body analyzer.
    analyzer: Option<Analyzer>,
    /// A gRPC call: its body's messages are length-prefixed.
    grpc: bool,
}

impl H2 {
    pub(super) fn new() -> Self {
        let decoder = || {
            let mut d = Decoder::new();
            d.set_max_allowed_table_size(MAX_HPACK_TABLE);
            d
        };
        Self {
            rx: FrameReader::new(true),
            tx: FrameReader::new(false),
            rx_hpack: decoder(),
            tx_hpack: decoder(),
            streams: FxHashMap::default(),
        }
    }

    pub(super) fn buffered(&self) -> usize {
        let streams: usize = self
            .streams
            .values()
            .map(|s| s.sniff.capacity() + s.analyzer.as_ref().map_or(0, Analyzer::buffered))
            .sum();
        self.rx.buffered() + self.tx.buffered() + streams
    }

    /// Gives back request sniffs and response buffers (the memory budget is spent). Returns
    /// whether anything in progress was dropped.
    pub(super) fn shed(&mut self) -> bool {
        let mut lost = false;
        for s in self.streams.values_mut() {
            if s.sniff.capacity() > 0 {
                s.sniff = Vec::new();
                s.truncated = true;
                lost = true;
            }
            lost |= s.analyzer.as_mut().is_some_and(Analyzer::shed);
        }
        lost
    }
}

/// The fields of a header block that matter here.
#[derive(Default)]
struct Fields {
    method: Option<Vec<u8>>,
    path: Option<Vec<u8>>,
    status: Option<u16>,
    content_type: Vec<u8>,
    encoded: bool,
    request_id: Option<String>,
    grpc_status: Option<u32>,
}

/// Decodes a block, keeping only `Fields` (values are cut to bounded sizes; no other value is
/// kept). `None`: the block does not decode (HPACK out of step, or not HPACK).
fn decode(hpack: &mut Decoder<'static>, block: &[u8]) -> Option<Fields> {
    let mut f = Fields::default();
    let keep = |v: &[u8]| v.get(..v.len().min(256)).unwrap_or_default().to_vec();
    hpack
        .decode_with_cb(block, |name, value| match &*name {
            b":method" => f.method = Some(keep(&value)),
            b":path" => f.path = Some(keep(&value)),
            b":status" => {
                f.status = std::str::from_utf8(&value)
                    .ok()
                    .and_then(|s| s.parse().ok());
            }
            b"content-type" => f.content_type = keep(&value),
            b"content-encoding" => {
                f.encoded = !value.trim_ascii().eq_ignore_ascii_case(b"identity");
            }
            b"grpc-status" => {
                f.grpc_status = std::str::from_utf8(&value)
                    .ok()
                    .and_then(|s| s.trim().parse().ok());
            }
            b"x-request-id" => {
                f.request_id = std::str::from_utf8(&value)
                    .ok()
                    .map(|v| cut_field(v.trim()));
            }
            _ => {}
        })
        .ok()?;
    Some(f)
}

impl Conn {
    /// Starts HTTP/2 on a fresh connection (the client preface, or the server's SETTINGS).
    pub(super) fn start_h2(&mut self) {
        self.h2 = Some(Box::new(H2::new()));
        self.ingress = Ingress::Idle;
    }

    /// One read (`egress` false) or write of an HTTP/2 connection: the read's arrival (a
    /// write: its time, in one part).
    pub(super) fn h2_bytes(
        &mut self,
        egress: bool,
        (id, arrival, io): (ConnId, ReadArrival, Moment),
        data: &[u8],
        missing: u64,
        next_seq: &mut u64,
        obs: &mut impl Observer,
    ) {
        let Some(h2) = self.h2.as_mut().filter(|_| self.mode == Mode::Active) else {
            return;
        };
        let mut ended: Vec<(u64, Option<Outcome>)> = Vec::new();
        let mut bad = false;
        let reader = if egress { &mut h2.tx } else { &mut h2.rx };
        let ts = arrival.first_ns;
        let mut side = Side {
            id,
            arrival,
            io,
            hpack: if egress {
                &mut h2.tx_hpack
            } else {
                &mut h2.rx_hpack
            },
            streams: &mut h2.streams,
            queue: &mut self.queue,
            next_seq,
            obs: &mut *obs,
            ended: &mut ended,
            bad: &mut bad,
        };
        let fed = reader.feed(data, missing, &mut |item| {
            if egress {
                side.response_item(item);
            } else {
                side.request_item(item);
            }
        });
        for (seq, outcome) in ended {
            self.end_stream(id, seq, outcome, ts, obs);
        }
        match fed {
            Err(Lost::Truncated) => self.kill(id, ts, Some(ParseErrorKind::TruncatedCapture), obs),
            Err(Lost::Malformed) => self.kill(id, ts, Some(ParseErrorKind::BadH2), obs),
            Ok(()) if bad => self.kill(id, ts, Some(ParseErrorKind::BadH2), obs),
            Ok(()) => {}
        }
    }

    /// Finishes stream `seq`'s request (`outcome` `None`: by its status).
    fn end_stream(
        &mut self,
        id: ConnId,
        seq: u64,
        outcome: Option<Outcome>,
        ts: u64,
        obs: &mut impl Observer,
    ) {
        let Some(i) = self.queue.iter().position(|r| r.seq == seq) else {
            return;
        };
        if let Some(req) = self.queue.remove(i) {
            let outcome = outcome.unwrap_or_else(|| req.by_status());
            finish(id, req, &Ingress::Idle, outcome, ts, obs);
        }
    }
}

/// What one direction's items act on.
struct Side<'a, O: Observer> {
    id: ConnId,
    /// The read's arrival by part (a write: its time, in one part; `first_ns` dates the call).
    arrival: ReadArrival,
    io: Moment,
    hpack: &'a mut Decoder<'static>,
    streams: &'a mut FxHashMap<u32, Stream>,
    queue: &'a mut std::collections::VecDeque<Req>,
    next_seq: &'a mut u64,
    obs: &'a mut O,
    /// Streams that ended in this call, finished after the frames are read.
    ended: &'a mut Vec<(u64, Option<Outcome>)>,
    /// A header block did not decode: the connection cannot be followed.
    bad: &'a mut bool,
}

impl<O: Observer> Side<'_, O> {
    fn req(&mut self, seq: u64) -> Option<&mut Req> {
        self.queue.iter_mut().find(|r| r.seq == seq)
    }

    fn request_item(&mut self, item: Item<'_>) {
        match item {
            Item::Headers {
                stream,
                end_stream,
                block,
                read_off,
                ..
            } => {
                let Some(f) = decode(self.hpack, block) else {
                    *self.bad = true;
                    return;
                };
                if !self.streams.contains_key(&stream) {
                    // Dated by the arrival of its first frame's bytes: behind other bytes of
                    // the read (a fresh connection's preface and SETTINGS, a WINDOW_UPDATE,
                    // another stream's frames) they may have come later than the read's first.
                    let arrival = self.arrival.at(read_off);
                    self.new_stream(stream, &f, arrival);
                }
                if end_stream {
                    self.request_done(stream);
                }
            }
            Item::Data { stream, bytes } => {
                if let Some(s) = self.streams.get_mut(&stream) {
                    let room = MAX_BODY_SNIFF.saturating_sub(s.sniff.len());
                    s.truncated |= bytes.len() > room;
                    s.sniff
                        .extend_from_slice(bytes.get(..room.min(bytes.len())).unwrap_or_default());
                }
            }
            Item::DataGap { stream, .. } => {
                if let Some(s) = self.streams.get_mut(&stream) {
                    s.truncated = true;
                }
            }
            Item::DataEnd { stream, end_stream } => {
                if end_stream {
                    self.request_done(stream);
                }
            }
            // The client cancelled the stream.
            Item::Reset { stream, .. } => self.end(stream, Some(Outcome::ClientAbort)),
        }
    }

    fn new_stream(&mut self, stream: u32, f: &Fields, arrival_ns: u64) {
        if self.streams.len() >= MAX_H2_STREAMS {
            self.obs.budget_dropped(self.id, "h2_stream");
            return;
        }
        let post = f.method.as_deref() == Some(b"POST");
        let grpc = post && grpc::is_grpc(&f.content_type);
        let path = f.path.as_deref().unwrap_or_default();
        let endpoint = if grpc {
            Some(grpc::method_endpoint(path))
        } else {
            std::str::from_utf8(path)
                .ok()
                .filter(|_| post)
                .and_then(endpoint_for_path)
        };
        let meta = RequestMeta {
            endpoint,
            request_id: f.request_id.clone(),
            ..RequestMeta::default()
        };
        let seq = next(self.next_seq);
        let mut req = Req::new(seq, meta, arrival_ns, f.method.as_deref() == Some(b"HEAD"));
        req.read = self.io;
        self.queue.push_back(req);
        self.streams.insert(
            stream,
            Stream {
                seq,
                sniff: Vec::new(),
                truncated: false,
                analyzer: None,
                grpc,
            },
        );
    }

    /// The request's body is read (or its response began first): its fields are known.
    fn request_done(&mut self, stream: u32) {
        let Some(s) = self.streams.get_mut(&stream) else {
            return;
        };
        let (seq, sniff, complete) = (s.seq, std::mem::take(&mut s.sniff), !s.truncated);
        // A gRPC body's first message, without its length prefix (JSON-coded services name
        // their model there; protobuf yields nothing).
        let body = if s.grpc {
            sniff.get(5..).unwrap_or_default()
        } else {
            &sniff[..]
        };
        let (id, obs) = (self.id, &mut *self.obs);
        let Some(req) = self.queue.iter_mut().find(|r| r.seq == seq) else {
            return;
        };
        if req.started {
            return;
        }
        req.started = true;
        crate::http::sniff::apply_body(&mut req.meta, body, complete);
        if req.timed() {
            obs.request_started(id, &req.meta, req.arrival_ns);
        }
    }

    fn end(&mut self, stream: u32, outcome: Option<Outcome>) {
        if let Some(s) = self.streams.remove(&stream) {
            self.ended.push((s.seq, outcome));
        }
    }

    fn response_item(&mut self, item: Item<'_>) {
        match item {
            Item::Headers {
                stream,
                end_stream,
                promise,
                block,
                ..
            } => {
                let Some(f) = decode(self.hpack, block) else {
                    *self.bad = true;
                    return;
                };
                if !promise {
                    self.response_head(stream, &f);
                    if end_stream {
                        // gRPC's status is in the trailers (or a trailers-only response).
                        let outcome = f.grpc_status.and_then(grpc::status_outcome);
                        self.body_end(stream, outcome);
                    }
                }
            }
            Item::Data { stream, bytes } => self.body(stream, Ok(bytes)),
            Item::DataGap { stream, n } => self.body(stream, Err(n)),
            Item::DataEnd { stream, end_stream } => {
                if end_stream {
                    self.body_end(stream, None);
                }
            }
            Item::Reset { stream, .. } => self.end(stream, Some(Outcome::ServerReset)),
        }
    }

    /// A response HEADERS block: the head (1xx ones skipped), or trailers.
    fn response_head(&mut self, stream: u32, f: &Fields) {
        let Some(seq) = self.streams.get(&stream).map(|s| s.seq) else {
            return;
        };
        let Some(status) = f.status.filter(|s| *s >= 200) else {
            return;
        };
        if self
            .streams
            .get(&stream)
            .is_some_and(|s| s.analyzer.is_some())
        {
            return; // trailers
        }
        self.request_done(stream);
        let Some(req) = self.req(seq) else {
            return;
        };
        req.status = Some(status);
        let ask = ForRequest {
            endpoint: req.meta.endpoint,
            is_head: req.is_head,
            streams: req.meta.stream == Some(true),
        };
        let grpc = self.streams.get(&stream).is_some_and(|s| s.grpc);
        let kind = if f.encoded || ask.endpoint.is_none() {
            BodyKind::Opaque
        } else if grpc && grpc::is_grpc(&f.content_type) {
            BodyKind::Grpc
        } else {
            body_kind(&f.content_type, ask)
        };
        if let Some(s) = self.streams.get_mut(&stream) {
            s.analyzer = Some(Analyzer::new(kind, status));
        }
    }

    /// DATA of a response (`Err(n)`: `n` bytes not captured).
    fn body(&mut self, stream: u32, bytes: Result<&[u8], u64>) {
        let Some(s) = self.streams.get_mut(&stream) else {
            return;
        };
        let Some(analyzer) = s.analyzer.as_mut() else {
            return;
        };
        let Some(req) = self.queue.iter_mut().find(|r| r.seq == s.seq) else {
            return;
        };
        let mut sink = ReqSink {
            id: self.id,
            req,
            obs: &mut *self.obs,
            io: Some(self.io),
        };
        match bytes {
            Ok(b) => analyzer.bytes(b, self.arrival.first_ns, &mut sink),
            Err(n) => analyzer.gap(n, self.arrival.first_ns, &mut sink),
        }
    }

    /// The response's `END_STREAM`: its body is complete (`outcome` `None`: by its status).
    fn body_end(&mut self, stream: u32, outcome: Option<Outcome>) {
        if let Some(s) = self.streams.get_mut(&stream) {
            if let (Some(analyzer), Some(req)) = (
                s.analyzer.as_mut(),
                self.queue.iter_mut().find(|r| r.seq == s.seq),
            ) {
                analyzer.finish(
                    self.arrival.first_ns,
                    &mut ReqSink {
                        id: self.id,
                        req,
                        obs: &mut *self.obs,
                        io: Some(self.io),
                    },
                );
            }
        }
        self.end(stream, outcome);
    }
}

#[cfg(test)]
mod tests;
