//! Response side of a connection: status lines, framing and body analysis, each response
//! matched to the oldest request still waiting for one.

use super::{ensure_started, next, step_budget, Conn, Egress, Ingress, Mode, Req, ReqSink};
use crate::http::{
    body::{Fed, Piece, Seg},
    classify::EventSink,
    h2, request,
    response::{self, Analyzer, ForRequest, MAX_RESPONSE_HEAD},
    ConnId, Moment, Observer, ParseErrorKind, ReadArrival, RequestMeta,
};

impl Conn {
    pub(super) fn egress(
        &mut self,
        id: ConnId,
        ts: u64,
        io: Moment,
        mut seg: Seg<'_>,
        next_seq: &mut u64,
        obs: &mut impl Observer,
    ) {
        // A server that speaks first with its SETTINGS (h2c, before the client preface is read).
        let fresh = matches!(self.ingress, Ingress::Fresh) && matches!(self.egress, Egress::Fresh);
        if fresh && self.accepted && h2::is_server_preface(seg.data) {
            self.start_h2();
        }
        if self.h2.is_some() {
            return self.h2_bytes(
                true,
                (id, ReadArrival::one(ts), io),
                seg.data,
                seg.missing,
                next_seq,
                obs,
            );
        }
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
                    } else if !self.accepted && h2::looks_like_frames(seg.data) {
                        return self.kill(id, ts, Some(ParseErrorKind::H2Midstream), obs);
                    } else if self.accepted || request::looks_not_http(seg.data) {
                        return self.kill(id, ts, Some(ParseErrorKind::NotHttp), obs);
                    } else {
                        // Picked up in the middle of a response.
                        Egress::Syncing
                    }
                }
                Egress::Idle if seg.data.is_empty() => {
                    seg = Seg::EMPTY;
                    self.lose_front(id, ts, ParseErrorKind::TruncatedCapture, obs)
                }
                Egress::Idle => Egress::Head { buf: Vec::new() },
                Egress::Head { buf } => {
                    match self.response_head(id, ts, buf, &mut seg, next_seq, obs) {
                        Some(next) => next,
                        None => return,
                    }
                }
                Egress::Body {
                    mut framer,
                    mut analyzer,
                } => {
                    let Some(req) = self.queue.front_mut() else {
                        seg = Seg::EMPTY;
                        self.egress = Egress::Syncing;
                        continue;
                    };
                    let mut sink = ReqSink {
                        id,
                        req,
                        obs: &mut *obs,
                        io: Some(io),
                    };
                    let fed = framer.feed(seg, &mut |p| match p {
                        Piece::Bytes(b) => analyzer.bytes(b, ts, &mut sink),
                        Piece::Gap(n) => analyzer.gap(n, ts, &mut sink),
                        Piece::ChunkEnd => analyzer.chunk_end_after_gap(),
                    });
                    match fed {
                        Fed::More => {
                            seg = Seg::EMPTY;
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
                            seg = Seg::EMPTY;
                            Egress::Lost { last_ts: ts }
                        }
                    }
                }
                Egress::Lost { last_ts } => {
                    if at_write_start && seg.data.starts_with(b"HTTP/1.") {
                        self.finish_front(id, None, last_ts, obs);
                        Egress::Idle
                    } else {
                        seg = Seg::EMPTY;
                        Egress::Lost { last_ts: ts }
                    }
                }
                Egress::Syncing => {
                    if at_write_start && seg.data.starts_with(b"HTTP/1.") {
                        Egress::Idle
                    } else {
                        seg = Seg::EMPTY;
                        Egress::Syncing
                    }
                }
            };
        }
    }

    /// Adds a write's bytes to a response head being read; `None` when the connection stopped
    /// being HTTP.
    pub(super) fn response_head(
        &mut self,
        id: ConnId,
        ts: u64,
        mut buf: Vec<u8>,
        seg: &mut Seg<'_>,
        next_seq: &mut u64,
        obs: &mut impl Observer,
    ) -> Option<Egress> {
        let old = buf.len();
        let take = (MAX_RESPONSE_HEAD + 1)
            .saturating_sub(old)
            .min(seg.data.len());
        buf.extend_from_slice(seg.data.get(..take).unwrap_or_default());
        let req = self.queue.front().map_or(
            ForRequest {
                endpoint: None,
                is_head: false,
                streams: false,
            },
            |r| ForRequest {
                endpoint: r.meta.endpoint,
                is_head: r.is_head,
                streams: r.meta.stream == Some(true),
            },
        );
        let status = response::parse_head(&buf, req);
        if let response::HeadStatus::Complete(head, n) = status {
            seg.advance(n.saturating_sub(old) as u64);
            return self.response_parsed(id, head, ts, next_seq, obs);
        }
        let cut_off = seg.missing > 0;
        *seg = Seg::EMPTY;
        let within = buf.len() <= MAX_RESPONSE_HEAD;
        let kind = match status {
            response::HeadStatus::Partial if within && !cut_off => {
                return Some(Egress::Head { buf })
            }
            response::HeadStatus::Partial if within => ParseErrorKind::TruncatedCapture,
            _ => ParseErrorKind::BadResponse,
        };
        if self.queue.is_empty() && !buf.starts_with(b"HTTP/") {
            // Not a response at all, and nothing waits for one: the tail of something we are not
            // following.
            return Some(Egress::Syncing);
        }
        Some(self.lose_front(id, ts, kind, obs))
    }

    /// A response head was parsed. `None`: the connection stopped being HTTP (101).
    pub(super) fn response_parsed(
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
            Some(framer) => Some(Egress::Body {
                framer,
                analyzer: Analyzer::new(head.kind, head.status),
            }),
        }
    }

    /// The front request's response cannot be framed: report why and wait for close or resync.
    pub(super) fn lose_front(
        &mut self,
        id: ConnId,
        ts: u64,
        kind: ParseErrorKind,
        obs: &mut impl Observer,
    ) -> Egress {
        if let Some(req) = self.queue.front_mut() {
            ReqSink {
                id,
                req,
                obs,
                io: None,
            }
            .parse_error(kind);
            Egress::Lost { last_ts: ts }
        } else {
            obs.parse_error(id, kind);
            Egress::Syncing
        }
    }
}
