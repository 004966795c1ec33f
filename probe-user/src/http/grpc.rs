//! gRPC over HTTP/2 (the gRPC "HTTP/2 protocol" document): a response body is a sequence of
//! length-prefixed messages (1 byte compressed flag, 4 bytes big-endian length, the message); the
//! call's status is `grpc-status` in the trailers (or in a trailers-only response). Each response
//! message of a server-streaming call is one content event (what SSE's `data:` event is to the
//! `OpenAI` API), dated by the write that completes it. Message bytes are never buffered or read:
//! only their lengths.
//!
//! The method path (`/package.Service/Method`) is the request's endpoint label: a bounded set of
//! `MAX_GRPC_METHODS` paths, admitted in the order first seen, each checked to be a well-formed
//! path (letters, digits, `_`, `.`, one `/` between service and method); everything past the set
//! or malformed is `grpc_other`.

use std::sync::Mutex;

use super::{
    classify::{Classified, EventSink},
    Endpoint, Outcome, ParseErrorKind,
};

/// Distinct gRPC method paths labelled by name; past this, `grpc_other`.
pub const MAX_GRPC_METHODS: usize = 32;
/// Longest method path labelled by name.
const MAX_METHOD_LEN: usize = 128;

/// The admitted method paths, in admission order. Leaked once each: at most
/// `MAX_GRPC_METHODS` × `MAX_METHOD_LEN` bytes for the life of the process.
static METHODS: Mutex<Vec<&'static str>> = Mutex::new(Vec::new());

/// Whether `path` is `/service/method` with a service and a method of safe characters.
fn well_formed(path: &[u8]) -> bool {
    let Some(rest) = path.strip_prefix(b"/") else {
        return false;
    };
    let mut parts = rest.split(|&b| b == b'/');
    let ok = |p: Option<&[u8]>| {
        p.is_some_and(|p| {
            !p.is_empty()
                && p.iter()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.'))
        })
    };
    path.len() <= MAX_METHOD_LEN && ok(parts.next()) && ok(parts.next()) && parts.next().is_none()
}

/// The endpoint of a gRPC call to `path`.
pub fn method_endpoint(path: &[u8]) -> Endpoint {
    if !well_formed(path) {
        return Endpoint::Grpc(0);
    }
    let Ok(path) = std::str::from_utf8(path) else {
        return Endpoint::Grpc(0);
    };
    let Ok(mut methods) = METHODS.lock() else {
        return Endpoint::Grpc(0);
    };
    if let Some(i) = methods.iter().position(|m| *m == path) {
        return Endpoint::Grpc(i as u8 + 1);
    }
    if methods.len() >= MAX_GRPC_METHODS {
        return Endpoint::Grpc(0);
    }
    methods.push(Box::leak(path.to_owned().into_boxed_str()));
    Endpoint::Grpc(methods.len() as u8)
}

/// The label of method slot `slot` (0: `grpc_other`).
pub(crate) fn method_label(slot: u8) -> &'static str {
    let name = METHODS
        .lock()
        .ok()
        .and_then(|m| m.get(usize::from(slot).wrapping_sub(1)).copied());
    name.unwrap_or("grpc_other")
}

/// Whether a `content-type` is gRPC's (`application/grpc`, `application/grpc+proto`, …).
pub(crate) fn is_grpc(content_type: &[u8]) -> bool {
    content_type.len() >= 16 && content_type[..16].eq_ignore_ascii_case(b"application/grpc")
}

/// How a call with this `grpc-status` ended (`None`: 0, OK — the HTTP status decides). Codes a
/// client causes (invalid argument, not found, already exists, permission denied, failed
/// precondition, out of range, unauthenticated) are client errors; CANCELLED is the client going
/// away; the rest (unknown, deadline exceeded, resource exhausted, aborted, unimplemented,
/// internal, unavailable, data loss) are the server's.
pub(crate) fn status_outcome(code: u32) -> Option<Outcome> {
    match code {
        0 => None,
        1 => Some(Outcome::ClientAbort),
        3 | 5 | 6 | 7 | 9 | 11 | 16 => Some(Outcome::ClientError),
        _ => Some(Outcome::ServerError),
    }
}

/// Reads a gRPC body's message framing.
#[derive(Debug, Default)]
pub(crate) struct MessageReader {
    prefix: [u8; 5],
    have: usize,
    /// Bytes of the current message still to come (after its prefix).
    left: u64,
    /// Framing was lost to uncaptured prefix bytes: nothing more is counted.
    lost: bool,
}

impl MessageReader {
    pub fn feed(&mut self, mut data: &[u8], ts: u64, sink: &mut impl EventSink) {
        while !data.is_empty() && !self.lost {
            if self.left > 0 {
                let take = self.left.min(data.len() as u64);
                self.left -= take;
                data = &data[take as usize..];
                if self.left == 0 {
                    message(ts, sink);
                }
                continue;
            }
            let n = (5 - self.have).min(data.len());
            self.prefix[self.have..self.have + n].copy_from_slice(&data[..n]);
            self.have += n;
            data = &data[n..];
            if self.have == 5 {
                self.have = 0;
                let p = self.prefix;
                self.left = u64::from(u32::from_be_bytes([p[1], p[2], p[3], p[4]]));
                if self.left == 0 {
                    message(ts, sink);
                }
            }
        }
    }

    /// `n` body bytes were not captured: inside a message they are skipped exactly; a prefix cut
    /// loses the framing (counted once).
    pub fn gap(&mut self, n: u64, ts: u64, sink: &mut impl EventSink) {
        if self.lost {
            return;
        }
        if self.have == 0 && n <= self.left {
            self.left -= n;
            if self.left == 0 {
                message(ts, sink);
            }
            return;
        }
        self.lost = true;
        sink.parse_error(ParseErrorKind::TruncatedCapture);
    }
}

fn message(ts: u64, sink: &mut impl EventSink) {
    let ev = Classified {
        content: true,
        token: true,
        ..Classified::default()
    };
    sink.event(ev, ts);
}

#[cfg(test)]
mod tests;
