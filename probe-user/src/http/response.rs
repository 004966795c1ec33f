//! Response side: the status line and headers (`httparse`), the body's framing (RFC 9112 §6.3)
//! and kind, and the analyzer that turns body bytes into content events: SSE, NDJSON, or one JSON
//! document read at the end.

use super::{
    body::{ChunkDecoder, Framer},
    classify::{classify, EventSink},
    grpc::MessageReader,
    request::last_coding_is_chunked,
    sse::{NdjsonParser, SseParser},
    Endpoint, ParseErrorKind,
};

/// Longest response head we buffer. Inference servers send a handful of short headers; the same
/// 16 KiB bound as requests (`request::MAX_HEAD_BYTES`) keeps a garbled stream from growing it.
pub(crate) const MAX_RESPONSE_HEAD: usize = 16 * 1024;
/// Captured bytes of a non-streaming JSON body kept to parse at its end: a chat completion with
/// usage is a few KiB; past this we only frame the body (embeddings of large batches can be MBs).
pub(crate) const MAX_JSON_BODY: usize = 256 * 1024;
/// Header slots for `httparse`; servers send ~10.
const MAX_HEADERS: usize = 64;

/// How the body is read for content.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BodyKind {
    Sse,
    Ndjson,
    Json,
    /// gRPC length-prefixed messages (HTTP/2 only).
    Grpc,
    /// Not inspected: untimed requests, compressed or non-JSON bodies.
    Opaque,
}

/// What the request tells the response parser.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ForRequest {
    pub endpoint: Option<Endpoint>,
    /// HEAD: the response has no body whatever its headers say.
    pub is_head: bool,
    /// The request asked to stream (or streams by default).
    pub streams: bool,
}

#[derive(Debug)]
pub(crate) struct ResponseHead {
    pub status: u16,
    /// `None`: no body.
    pub framer: Option<Framer>,
    pub kind: BodyKind,
}

#[derive(Debug)]
pub(crate) enum HeadStatus {
    Partial,
    Complete(ResponseHead, usize),
    Invalid,
}

/// Whether `data` can start a status line (`HTTP/1.`), or is a prefix of one.
pub(crate) fn could_start_response(data: &[u8]) -> bool {
    const PREFIX: &[u8] = b"HTTP/1.";
    if data.len() >= PREFIX.len() {
        data.starts_with(PREFIX)
    } else {
        PREFIX.starts_with(data)
    }
}

pub(crate) fn parse_head(buf: &[u8], req: ForRequest) -> HeadStatus {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut headers);
    let len = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return HeadStatus::Partial,
        Err(_) => return HeadStatus::Invalid,
    };
    let Some(status) = resp.code else {
        return HeadStatus::Invalid;
    };
    let mut length = None;
    let mut chunked = None;
    let mut content_type: &[u8] = b"";
    let mut encoded = false;
    for h in resp.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            let n = std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok());
            match (n, length) {
                (None, _) => return HeadStatus::Invalid,
                (Some(n), Some(l)) if n != l => return HeadStatus::Invalid,
                (n, _) => length = n,
            }
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = Some(last_coding_is_chunked(h.value));
        } else if h.name.eq_ignore_ascii_case("content-type") {
            content_type = h.value;
        } else if h.name.eq_ignore_ascii_case("content-encoding") {
            encoded = !h.value.trim_ascii().eq_ignore_ascii_case(b"identity");
        }
    }
    // RFC 9112 §6.3: HEAD responses, 1xx, 204 and 304 have no body; Transfer-Encoding overrides
    // Content-Length; a non-chunked final coding, or neither header, reads until close.
    let framer = if req.is_head || status < 200 || status == 204 || status == 304 {
        None
    } else {
        match (chunked, length) {
            (Some(true), _) => Some(Framer::Chunked(ChunkDecoder::default())),
            (Some(false), _) | (None, None) => Some(Framer::UntilClose),
            (None, Some(0)) => None,
            (None, Some(n)) => Some(Framer::Length { remaining: n }),
        }
    };
    let kind = if encoded || req.endpoint.is_none() {
        BodyKind::Opaque
    } else {
        body_kind(content_type, req)
    };
    HeadStatus::Complete(
        ResponseHead {
            status,
            framer,
            kind,
        },
        len,
    )
}

pub(crate) fn body_kind(content_type: &[u8], req: ForRequest) -> BodyKind {
    let media = content_type
        .split(|&b| b == b';')
        .next()
        .unwrap_or_default()
        .trim_ascii();
    let is = |m: &[u8]| media.eq_ignore_ascii_case(m);
    let ollama = matches!(
        req.endpoint,
        Some(Endpoint::OllamaGenerate | Endpoint::OllamaChat)
    );
    if is(b"text/event-stream") {
        BodyKind::Sse
    } else if is(b"application/x-ndjson")
        || is(b"application/jsonl")
        || is(b"application/ndjson")
        || (is(b"application/json") && ollama && req.streams)
    {
        BodyKind::Ndjson
    } else if media.is_empty() || media.windows(4).any(|w| w.eq_ignore_ascii_case(b"json")) {
        BodyKind::Json
    } else {
        BodyKind::Opaque
    }
}

/// A non-streaming JSON body, buffered to be parsed at its end.
#[derive(Debug, Default)]
pub(crate) struct JsonBody {
    buf: Vec<u8>,
    /// When the first body byte was written: a client sees the content from then.
    first_ts: Option<u64>,
    /// Bytes were not captured or did not fit.
    truncated: bool,
}

#[derive(Debug)]
enum Inner {
    Sse(SseParser),
    Ndjson(NdjsonParser),
    Json(JsonBody),
    Grpc(MessageReader),
    Opaque,
}

#[derive(Debug)]
pub(crate) struct Analyzer {
    inner: Inner,
    /// Error responses often carry HTML or plain text whatever their Content-Type: their parse
    /// failures are not counted.
    quiet: bool,
}

impl Analyzer {
    pub fn new(kind: BodyKind, status: u16) -> Self {
        let inner = match kind {
            BodyKind::Sse => Inner::Sse(SseParser::default()),
            BodyKind::Ndjson => Inner::Ndjson(NdjsonParser::default()),
            BodyKind::Json => Inner::Json(JsonBody::default()),
            BodyKind::Grpc => Inner::Grpc(MessageReader::default()),
            BodyKind::Opaque => Inner::Opaque,
        };
        Self {
            inner,
            quiet: !(200..300).contains(&status),
        }
    }

    /// Bytes held by its buffers.
    pub fn buffered(&self) -> usize {
        match &self.inner {
            Inner::Sse(p) => p.buffered(),
            Inner::Ndjson(p) => p.buffered(),
            Inner::Json(j) => j.buf.capacity(),
            Inner::Grpc(_) | Inner::Opaque => 0,
        }
    }

    /// Give its buffers back (the memory budget is spent). Returns whether content in progress
    /// was dropped: a partial event, or a JSON body (whose usage then goes unread).
    pub fn shed(&mut self) -> bool {
        match &mut self.inner {
            Inner::Sse(p) => p.shed(),
            Inner::Ndjson(p) => p.shed(),
            Inner::Json(j) => {
                let lost = !j.buf.is_empty();
                j.truncated |= lost;
                j.buf = Vec::new();
                lost
            }
            Inner::Grpc(_) | Inner::Opaque => false,
        }
    }

    pub fn bytes(&mut self, data: &[u8], ts: u64, sink: &mut impl EventSink) {
        match &mut self.inner {
            Inner::Sse(p) => p.feed(data, ts, sink),
            Inner::Ndjson(p) => p.feed(data, ts, sink),
            Inner::Json(j) => {
                j.first_ts.get_or_insert(ts);
                if j.buf.len().saturating_add(data.len()) > MAX_JSON_BODY {
                    j.truncated = true;
                } else if !j.truncated {
                    j.buf.extend_from_slice(data);
                }
            }
            Inner::Grpc(r) => r.feed(data, ts, sink),
            Inner::Opaque => {}
        }
    }

    /// `n` body bytes were written but not captured.
    pub fn gap(&mut self, n: u64, ts: u64, sink: &mut impl EventSink) {
        match &mut self.inner {
            Inner::Grpc(r) => r.gap(n, ts, sink),
            Inner::Sse(p) => {
                p.gap(ts, sink);
                sink.parse_error(ParseErrorKind::TruncatedCapture);
            }
            Inner::Ndjson(p) => {
                p.gap(ts, sink);
                sink.parse_error(ParseErrorKind::TruncatedCapture);
            }
            Inner::Json(j) => {
                j.first_ts.get_or_insert(ts);
                j.truncated = true;
            }
            Inner::Opaque => {}
        }
    }

    /// A chunk's data ended in uncaptured bytes: streams resynchronise there (see `Piece::ChunkEnd`).
    pub fn chunk_end_after_gap(&mut self) {
        match &mut self.inner {
            Inner::Sse(p) => p.resync(),
            Inner::Ndjson(p) => p.resync(),
            Inner::Json(_) | Inner::Grpc(_) | Inner::Opaque => {}
        }
    }

    /// The body ended (by its framing, or at close for read-until-close bodies).
    pub fn finish(&mut self, ts: u64, sink: &mut impl EventSink) {
        match &mut self.inner {
            // An SSE event without its blank line is discarded at end of stream (WHATWG).
            Inner::Sse(_) | Inner::Grpc(_) | Inner::Opaque => {}
            Inner::Ndjson(p) => p.finish(ts, sink),
            Inner::Json(j) => {
                let Some(first_ts) = j.first_ts else {
                    return;
                };
                let buf = std::mem::take(&mut j.buf);
                match classify(&buf) {
                    Ok(ev) => sink.event(ev, first_ts),
                    Err(_) if self.quiet => {}
                    Err(_) if j.truncated => sink.parse_error(ParseErrorKind::TruncatedCapture),
                    Err(_) => sink.parse_error(ParseErrorKind::BadEvent),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::sse::tests::Collect;

    const CHAT: ForRequest = ForRequest {
        endpoint: Some(Endpoint::ChatCompletions),
        is_head: false,
        streams: true,
    };

    fn head(raw: &str, req: ForRequest) -> ResponseHead {
        match parse_head(raw.as_bytes(), req) {
            HeadStatus::Complete(h, n) => {
                assert_eq!(n, raw.len());
                h
            }
            other => panic!("{raw:?}: {other:?}"),
        }
    }

    #[test]
    fn framing_rules() {
        let h = head("HTTP/1.1 200 OK\r\nContent-Type: text/event-stream; charset=utf-8\r\nTransfer-Encoding: chunked\r\n\r\n", CHAT);
        assert!(matches!(h.framer, Some(Framer::Chunked(_))));
        assert_eq!((h.status, h.kind), (200, BodyKind::Sse));
        let h = head(
            "HTTP/1.1 200 OK\r\nContent-Length: 10\r\ncontent-type: application/json\r\n\r\n",
            CHAT,
        );
        assert!(matches!(h.framer, Some(Framer::Length { remaining: 10 })));
        assert_eq!(h.kind, BodyKind::Json);
        let h = head(
            "HTTP/1.0 200 OK\r\nContent-Type: text/event-stream\r\n\r\n",
            CHAT,
        );
        assert!(matches!(h.framer, Some(Framer::UntilClose)));
        let h = head("HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n", CHAT);
        assert!(h.framer.is_none());
        let h = head(
            "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n",
            ForRequest {
                is_head: true,
                ..CHAT
            },
        );
        assert!(h.framer.is_none());
        let h = head("HTTP/1.1 100 Continue\r\n\r\n", CHAT);
        assert!(h.framer.is_none());
        let h = head(
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Encoding: gzip\r\n\r\n",
            CHAT,
        );
        assert_eq!(h.kind, BodyKind::Opaque);
        let h = head(
            "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\n",
            ForRequest {
                endpoint: None,
                ..CHAT
            },
        );
        assert_eq!(h.kind, BodyKind::Opaque);
        let ollama = ForRequest {
            endpoint: Some(Endpoint::OllamaChat),
            is_head: false,
            streams: true,
        };
        assert_eq!(
            head(
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n",
                ollama
            )
            .kind,
            BodyKind::Ndjson
        );
        let ollama_once = ForRequest {
            streams: false,
            ..ollama
        };
        assert_eq!(
            head(
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n",
                ollama_once
            )
            .kind,
            BodyKind::Json
        );
        assert_eq!(
            head(
                "HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\n\r\n",
                CHAT
            )
            .kind,
            BodyKind::Ndjson
        );
        assert_eq!(
            head("HTTP/1.1 500 x\r\nContent-Type: text/html\r\n\r\n", CHAT).kind,
            BodyKind::Opaque
        );
        assert!(matches!(
            parse_head(
                b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
                CHAT
            ),
            HeadStatus::Invalid
        ));
        assert!(matches!(
            parse_head(b"HTTP/1.1 200 OK\r\nContent", CHAT),
            HeadStatus::Partial
        ));
        assert!(matches!(
            parse_head(b"data: {}\r\n\r\n", CHAT),
            HeadStatus::Invalid
        ));
    }

    #[test]
    fn response_start() {
        assert!(could_start_response(b"HTTP/1.1 200"));
        assert!(could_start_response(b"HT"));
        assert!(!could_start_response(b"HTTP/2 200"));
        assert!(!could_start_response(b"data: x"));
    }

    #[test]
    fn json_body_at_end() {
        let mut a = Analyzer::new(BodyKind::Json, 200);
        let mut c = Collect::default();
        a.bytes(br#"{"choices":[{"message":{"content":"hi"}}],"#, 5, &mut c);
        a.bytes(
            br#""usage":{"prompt_tokens":1,"completion_tokens":2}}"#,
            6,
            &mut c,
        );
        a.finish(6, &mut c);
        assert_eq!(c.events.len(), 1);
        let (ev, ts) = c.events[0];
        assert_eq!((ev.content, ts, ev.completion_tokens), (true, 5, Some(2)));

        let mut a = Analyzer::new(BodyKind::Json, 200);
        let mut c = Collect::default();
        a.bytes(br#"{"choices":[{"message":{"content":"hi"#, 5, &mut c);
        a.gap(1, 5, &mut c);
        a.finish(5, &mut c);
        assert_eq!(c.parse_errors, vec![ParseErrorKind::TruncatedCapture]);

        let mut a = Analyzer::new(BodyKind::Json, 200);
        let mut c = Collect::default();
        a.bytes(b"<html>", 5, &mut c);
        a.finish(5, &mut c);
        assert_eq!(c.parse_errors, vec![ParseErrorKind::BadEvent]);

        let mut a = Analyzer::new(BodyKind::Json, 502);
        let mut c = Collect::default();
        a.bytes(b"Bad Gateway", 5, &mut c);
        a.finish(5, &mut c);
        assert!(c.parse_errors.is_empty());
    }
}
