//! Request side of a connection: request heads and bodies, queued in arrival order.

use super::{next, step_budget, BodyRead, Conn, HeadRead, Ingress, Mode, Req, MAX_PIPELINED};
use crate::http::{
    body::{ChunkDecoder, Fed, Framer, Piece, Seg},
    h2,
    request::{self, BodyFraming, MAX_BODY_SNIFF, MAX_HEAD_BYTES},
    sniff, ConnId, Moment, Observer, ParseErrorKind, ReadArrival, RequestMeta,
};

impl Conn {
    pub(super) fn ingress(
        &mut self,
        id: ConnId,
        arrival: ReadArrival,
        io: Moment,
        mut seg: Seg<'_>,
        next_seq: &mut u64,
        obs: &mut impl Observer,
    ) {
        let ts = arrival.first_ns;
        if let Some(read) = self.h2_preface_start(seg.data) {
            // The preface's first bytes were taken for an HTTP/1 head ("P"): they go first.
            self.start_h2();
            if !read.is_empty() {
                self.h2_bytes(false, (id, arrival, io), &read, 0, next_seq, obs);
            }
        }
        if self.h2.is_some() {
            return self.h2_bytes(
                false,
                (id, arrival, io),
                seg.data,
                seg.missing,
                next_seq,
                obs,
            );
        }
        let mut budget = step_budget(&seg);
        let whole = seg.data.len();
        while !seg.is_empty() && self.mode == Mode::Active && budget > 0 {
            budget -= 1;
            // A head is dated by the arrival of its first byte (`left`: the read's bytes from it).
            let fresh_head = |from_sync, left: usize| HeadRead {
                buf: Vec::new(),
                arrival_ns: arrival.at(whole - left),
                read: io,
                from_sync,
            };
            self.ingress = match std::mem::replace(&mut self.ingress, Ingress::Syncing) {
                Ingress::Fresh => {
                    if seg.data.is_empty() {
                        Ingress::Syncing
                    } else if request::could_start_request(seg.data) {
                        Ingress::Head(fresh_head(false, seg.data.len()))
                    } else if !self.accepted && h2::looks_like_frames(seg.data) {
                        return self.kill(id, ts, Some(ParseErrorKind::H2Midstream), obs);
                    } else if self.accepted || request::looks_not_http(seg.data) {
                        return self.kill(id, ts, Some(ParseErrorKind::NotHttp), obs);
                    } else {
                        // Picked up mid-stream (the middle of a body): wait for a request line.
                        Ingress::Syncing
                    }
                }
                Ingress::Idle => Ingress::Head(fresh_head(false, seg.data.len())),
                Ingress::Head(head) => {
                    match self.request_head(id, ts, head, &mut seg, next_seq, obs) {
                        Some(next) => next,
                        None => return,
                    }
                }
                Ingress::Body(body) => self.request_body(id, body, &mut seg, obs),
                Ingress::Syncing => {
                    if let Some(i) = request::find_request_start(seg.data) {
                        seg.advance(i as u64);
                        Ingress::Head(fresh_head(true, seg.data.len()))
                    } else {
                        seg = Seg::EMPTY;
                        Ingress::Syncing
                    }
                }
            };
        }
    }

    /// Whether this read starts HTTP/2 (the client preface on a fresh connection, or the rest of
    /// it after a head buffer that holds its first byte); `Some` holds the bytes read before.
    fn h2_preface_start(&self, data: &[u8]) -> Option<Vec<u8>> {
        match &self.ingress {
            Ingress::Fresh => h2::starts_with_preface(data).then(Vec::new),
            Ingress::Head(h) if self.queue.is_empty() && h.buf == b"P" => {
                let mut all = h.buf.clone();
                all.extend_from_slice(data.get(..h2::PREFACE.len()).unwrap_or(data));
                h2::starts_with_preface(&all).then(|| h.buf.clone())
            }
            _ => None,
        }
    }

    /// Adds a read's bytes to a request head; `None` when the connection was given up.
    fn request_head(
        &mut self,
        id: ConnId,
        ts: u64,
        mut head: HeadRead,
        seg: &mut Seg<'_>,
        next_seq: &mut u64,
        obs: &mut impl Observer,
    ) -> Option<Ingress> {
        let old = head.buf.len();
        let take = (MAX_HEAD_BYTES + 1).saturating_sub(old).min(seg.data.len());
        head.buf
            .extend_from_slice(seg.data.get(..take).unwrap_or_default());
        match request::parse_head(&head.buf) {
            request::HeadStatus::Complete(parsed, n) => {
                seg.advance(n.saturating_sub(old) as u64);
                Some(self.request_parsed(id, parsed, (head.arrival_ns, head.read), next_seq, obs))
            }
            request::HeadStatus::TooLarge => {
                self.kill(id, ts, Some(ParseErrorKind::HeadTooLarge), obs);
                None
            }
            request::HeadStatus::Partial if head.buf.len() > MAX_HEAD_BYTES => {
                self.kill(id, ts, Some(ParseErrorKind::HeadTooLarge), obs);
                None
            }
            request::HeadStatus::Partial if seg.missing > 0 => {
                // The rest of the head was not captured. Queue an untimed stand-in so the
                // response still pairs with the right request.
                obs.parse_error(id, ParseErrorKind::TruncatedCapture);
                let stand_in = Req::new(
                    next(next_seq),
                    RequestMeta::default(),
                    head.arrival_ns,
                    false,
                );
                self.enqueue(stand_in, id, obs);
                *seg = Seg::EMPTY;
                Some(Ingress::Syncing)
            }
            request::HeadStatus::Partial => {
                *seg = Seg::EMPTY;
                Some(Ingress::Head(head))
            }
            request::HeadStatus::Invalid => {
                // A false start found while resynchronising is not worth reporting.
                if !head.from_sync {
                    obs.parse_error(id, ParseErrorKind::BadRequest);
                }
                // Look for the next request line from the byte after this false one.
                seg.advance(1);
                Some(Ingress::Syncing)
            }
        }
    }

    /// A request head was parsed: queue the request and read its body.
    fn request_parsed(
        &mut self,
        id: ConnId,
        head: request::RequestHead,
        (arrival_ns, read): (u64, Moment),
        next_seq: &mut u64,
        obs: &mut impl Observer,
    ) -> Ingress {
        let seq = next(next_seq);
        let meta = RequestMeta {
            endpoint: head.endpoint,
            request_id: head.request_id,
            ..RequestMeta::default()
        };
        let timed = meta.endpoint.is_some();
        let mut req = Req::new(seq, meta, arrival_ns, head.is_head);
        req.read = read;
        let queued = self.enqueue(req, id, obs).then_some(seq);
        let framer = match head.body {
            BodyFraming::None => {
                self.body_done(id, queued, &[], true, obs);
                return Ingress::Idle;
            }
            BodyFraming::Length(n) => Framer::Length { remaining: n },
            BodyFraming::Chunked => Framer::Chunked(ChunkDecoder::default()),
        };
        Ingress::Body(BodyRead {
            seq: queued,
            framer,
            sniff: Vec::new(),
            sniffing: timed && queued.is_some(),
            truncated: false,
        })
    }

    /// Frames a request body, keeping its first `MAX_BODY_SNIFF` captured bytes.
    fn request_body(
        &mut self,
        id: ConnId,
        mut body: BodyRead,
        seg: &mut Seg<'_>,
        obs: &mut impl Observer,
    ) -> Ingress {
        let BodyRead {
            framer,
            sniff,
            sniffing,
            truncated,
            ..
        } = &mut body;
        let fed = framer.feed(*seg, &mut |p| match p {
            Piece::Bytes(b) if *sniffing => {
                let room = MAX_BODY_SNIFF.saturating_sub(sniff.len());
                *truncated |= b.len() > room;
                sniff.extend_from_slice(b.get(..room.min(b.len())).unwrap_or_default());
            }
            Piece::Bytes(_) | Piece::ChunkEnd => {}
            Piece::Gap(_) => *truncated = true,
        });
        match fed {
            Fed::More => {
                *seg = Seg::EMPTY;
                if body.sniffing && body.sniff.len() >= MAX_BODY_SNIFF {
                    // The cap is reached: the fields we can know are known now, and the buffer
                    // goes (a client stalling after 64 KiB must not keep it).
                    self.body_done(id, body.seq, &body.sniff, false, obs);
                    body.sniff = Vec::new();
                    body.sniffing = false;
                }
                Ingress::Body(body)
            }
            Fed::Done { used } => {
                seg.advance(used);
                self.body_done(id, body.seq, &body.sniff, !body.truncated, obs);
                Ingress::Idle
            }
            Fed::Lost(kind) => {
                obs.parse_error(id, kind);
                *seg = Seg::EMPTY;
                self.body_done(id, body.seq, &body.sniff, false, obs);
                Ingress::Syncing
            }
        }
    }

    /// Queues a request unless the connection already has `MAX_PIPELINED` waiting.
    pub(super) fn enqueue(&mut self, req: Req, id: ConnId, obs: &mut impl Observer) -> bool {
        if self.queue.len() >= MAX_PIPELINED {
            obs.parse_error(id, ParseErrorKind::BadRequest);
            return false;
        }
        self.queue.push_back(req);
        true
    }

    /// The body of request `seq` is read (or as much of it as we will look at): report it started.
    pub(super) fn body_done(
        &mut self,
        id: ConnId,
        seq: Option<u64>,
        sniff: &[u8],
        complete: bool,
        obs: &mut impl Observer,
    ) {
        let Some(req) = seq.and_then(|s| self.queue.iter_mut().rev().find(|r| r.seq == s)) else {
            return;
        };
        if req.started {
            return;
        }
        req.started = true;
        sniff::apply_body(&mut req.meta, sniff, complete);
        if req.timed() {
            obs.request_started(id, &req.meta, req.arrival_ns);
        }
    }
}
