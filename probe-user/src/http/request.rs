//! Request side: recognising a request line, parsing the head with `httparse` and mapping the
//! path to an `Endpoint`. The body's JSON fields are read by `sniff.rs`.

use super::{Endpoint, MAX_FIELD_LEN};

/// Longest request head (request line + headers) we buffer. Real LLM clients send well under
/// 2 KiB; 16 KiB matches common server limits (uvicorn/h11 caps at 16 KiB by default), so a longer
/// head would be rejected by the server anyway.
pub const MAX_HEAD_BYTES: usize = 16 * 1024;
/// Captured body bytes kept per request to find `model`/`stream`/…: those sit near the start of
/// the JSON in every client we know; the prompt after them may be megabytes. (Read by `sniff.rs`.)
pub const MAX_BODY_SNIFF: usize = 64 * 1024;
/// Header slots for `httparse`: far above what HTTP clients send (~10) while the array stays a few
/// KiB on the stack. A head with more headers counts as too large, like one over `MAX_HEAD_BYTES`.
const MAX_HEADERS: usize = 128;
/// Captured bytes inspected to decide whether a connection's first bytes are binary.
const BINARY_SNIFF_BYTES: usize = 64;

const METHODS: [&[u8]; 9] = [
    b"GET ",
    b"POST ",
    b"PUT ",
    b"DELETE ",
    b"HEAD ",
    b"OPTIONS ",
    b"PATCH ",
    b"TRACE ",
    b"CONNECT ",
];

/// Maps a request target to the endpoint we time. Exact paths only: query string and fragment
/// are dropped, absolute-form targets (`http://host/path`) reduced to their path.
pub fn endpoint_for_path(target: &str) -> Option<Endpoint> {
    let path = target.split(['?', '#']).next().unwrap_or_default();
    let path = match path
        .strip_prefix("http://")
        .or_else(|| path.strip_prefix("https://"))
    {
        Some(rest) => rest.find('/').and_then(|i| rest.get(i..)).unwrap_or("/"),
        None => path,
    };
    Some(match path {
        "/v1/chat/completions" | "/chat/completions" => Endpoint::ChatCompletions,
        "/v1/completions" => Endpoint::Completions,
        "/v1/embeddings" => Endpoint::Embeddings,
        "/v1/responses" => Endpoint::Responses,
        "/generate" => Endpoint::Generate,
        "/generate_stream" => Endpoint::GenerateStream,
        "/api/generate" => Endpoint::OllamaGenerate,
        "/api/chat" => Endpoint::OllamaChat,
        "/completion" | "/completions" => Endpoint::LlamaCompletion,
        _ => return None,
    })
}

/// Whether `data` can be the start of a request line: a method token and a space, or a prefix of
/// one when the read ended early. Empty lines before a request are allowed (RFC 9112 §2.2).
pub(crate) fn could_start_request(data: &[u8]) -> bool {
    let start = data.iter().position(|b| !matches!(b, b'\r' | b'\n'));
    let Some(rest) = start.and_then(|i| data.get(i..)) else {
        return true;
    };
    METHODS.iter().any(|m| {
        if rest.len() >= m.len() {
            rest.starts_with(m)
        } else {
            m.starts_with(rest)
        }
    })
}

/// Where a request line may start in bytes seen while resynchronising: at the start of `data` or
/// right after a LF, a method, a space and the first byte of a target (`/`, `*`, or `h` of an
/// absolute URI). A candidate cut off by the end of `data` counts.
pub(crate) fn find_request_start(data: &[u8]) -> Option<usize> {
    let candidates = std::iter::once(0).chain(memchr::memchr_iter(b'\n', data).map(|i| i + 1));
    candidates.into_iter().find(|&i| {
        let rest = data.get(i..).unwrap_or_default();
        !rest.is_empty()
            && METHODS.iter().any(|m| match rest.strip_prefix(*m) {
                Some(target) => target
                    .first()
                    .is_none_or(|b| matches!(b, b'/' | b'*' | b'h')),
                None => rest.len() < m.len() && m.starts_with(rest),
            })
    })
}

/// First bytes that are certainly not HTTP/1.x: the HTTP/2 preface, or binary (a TLS record
/// starts with 0x16, most binary protocols with a NUL or a length byte).
pub(crate) fn looks_not_http(data: &[u8]) -> bool {
    if data.starts_with(b"PRI * HTTP/2") {
        return true;
    }
    data.iter()
        .take(BINARY_SNIFF_BYTES)
        .any(|&b| b == 0x7f || (b < 0x20 && !matches!(b, b'\t' | b'\n' | b'\r')))
}

/// How a request's body is framed (RFC 9112 §6.3: requests without either header have none).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BodyFraming {
    None,
    Length(u64),
    Chunked,
}

#[derive(Debug, PartialEq, Eq)]
pub(crate) struct RequestHead {
    pub endpoint: Option<Endpoint>,
    /// HEAD requests get a response without a body.
    pub is_head: bool,
    pub request_id: Option<String>,
    pub body: BodyFraming,
}

#[derive(Debug, PartialEq, Eq)]
pub(crate) enum HeadStatus {
    /// Need more bytes.
    Partial,
    /// A head of `len` bytes.
    Complete(RequestHead, usize),
    /// More than `MAX_HEADERS` headers.
    TooLarge,
    Invalid,
}

/// Parses a buffered request head. Only POST is timed: the LLM APIs are POST-only, and an
/// `OPTIONS` CORS preflight to the same path must not count as an inference request.
pub(crate) fn parse_head(buf: &[u8]) -> HeadStatus {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return HeadStatus::Partial,
        Err(httparse::Error::TooManyHeaders) => return HeadStatus::TooLarge,
        Err(_) => return HeadStatus::Invalid,
    };
    let method = req.method.unwrap_or_default();
    let endpoint = if method == "POST" {
        req.path.and_then(endpoint_for_path)
    } else {
        None
    };
    let mut head = RequestHead {
        endpoint,
        is_head: method == "HEAD",
        request_id: None,
        body: BodyFraming::None,
    };
    let mut length = None;
    let mut chunked = None;
    for h in req.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            let Some(n) = std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok())
            else {
                return HeadStatus::Invalid;
            };
            if length.is_some_and(|l| l != n) {
                return HeadStatus::Invalid;
            }
            length = Some(n);
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = Some(last_coding_is_chunked(h.value));
        } else if h.name.eq_ignore_ascii_case("x-request-id") {
            head.request_id = std::str::from_utf8(h.value)
                .ok()
                .map(|v| cut_field(v.trim()));
        }
    }
    head.body = match (chunked, length) {
        (Some(true), _) => BodyFraming::Chunked,
        // A request whose last transfer coding is not chunked cannot be framed (RFC 9112 §6.3).
        (Some(false), _) => return HeadStatus::Invalid,
        (None, Some(n)) if n > 0 => BodyFraming::Length(n),
        (None, _) => BodyFraming::None,
    };
    HeadStatus::Complete(head, len)
}

pub(crate) fn last_coding_is_chunked(value: &[u8]) -> bool {
    value
        .rsplit(|&b| b == b',')
        .next()
        .is_some_and(|c| c.trim_ascii().eq_ignore_ascii_case(b"chunked"))
}

/// Cuts `s` to at most `MAX_FIELD_LEN` bytes at a char boundary.
pub(crate) fn cut_field(s: &str) -> String {
    let mut end = s.len().min(MAX_FIELD_LEN);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.get(..end).unwrap_or_default().to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints() {
        assert_eq!(
            endpoint_for_path("/v1/chat/completions"),
            Some(Endpoint::ChatCompletions)
        );
        assert_eq!(
            endpoint_for_path("/chat/completions?x=1"),
            Some(Endpoint::ChatCompletions)
        );
        assert_eq!(
            endpoint_for_path("/v1/completions"),
            Some(Endpoint::Completions)
        );
        assert_eq!(
            endpoint_for_path("/v1/embeddings"),
            Some(Endpoint::Embeddings)
        );
        assert_eq!(
            endpoint_for_path("/v1/responses"),
            Some(Endpoint::Responses)
        );
        assert_eq!(endpoint_for_path("/generate"), Some(Endpoint::Generate));
        assert_eq!(
            endpoint_for_path("/generate_stream"),
            Some(Endpoint::GenerateStream)
        );
        assert_eq!(
            endpoint_for_path("/api/generate"),
            Some(Endpoint::OllamaGenerate)
        );
        assert_eq!(endpoint_for_path("/api/chat"), Some(Endpoint::OllamaChat));
        assert_eq!(
            endpoint_for_path("/completion"),
            Some(Endpoint::LlamaCompletion)
        );
        assert_eq!(
            endpoint_for_path("/completions"),
            Some(Endpoint::LlamaCompletion)
        );
        assert_eq!(
            endpoint_for_path("http://h:8000/v1/completions"),
            Some(Endpoint::Completions)
        );
        for p in [
            "/health",
            "/metrics",
            "/v1/models",
            "/v1/chat/completions/",
            "/embeddings",
            "",
        ] {
            assert_eq!(endpoint_for_path(p), None, "{p}");
        }
    }

    #[test]
    fn request_starts() {
        assert!(could_start_request(b"POST /v1"));
        assert!(could_start_request(b"PO"));
        assert!(could_start_request(b"\r\nGET /"));
        assert!(!could_start_request(b"POSTX"));
        assert!(!could_start_request(b"{\"model\""));
        assert_eq!(
            find_request_start(b"junk\nmore\nPOST /v1 HTTP/1.1"),
            Some(10)
        );
        assert_eq!(find_request_start(b"POST /x"), Some(0));
        assert_eq!(find_request_start(b"abc\nPOST"), Some(4));
        assert_eq!(find_request_start(b"a GET /x\nGETX"), None);
        assert!(looks_not_http(b"\x16\x03\x01\x00\xa5\x01"));
        assert!(looks_not_http(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"));
        assert!(!looks_not_http("\"text\": \"héllo\"}\r\n".as_bytes()));
    }

    #[test]
    fn head_parsing() {
        let raw = b"POST /v1/chat/completions?a=b HTTP/1.1\r\nHost: x\r\nContent-Length: 12\r\nX-Request-Id: abc-1\r\n\r\n{}";
        let HeadStatus::Complete(h, n) = parse_head(raw) else {
            panic!("not complete")
        };
        assert_eq!(n, raw.len() - 2);
        assert_eq!(h.endpoint, Some(Endpoint::ChatCompletions));
        assert_eq!(h.body, BodyFraming::Length(12));
        assert_eq!(h.request_id.as_deref(), Some("abc-1"));
        assert_eq!(
            parse_head(b"POST /v1/chat/completions HTTP/1.1\r\nHost"),
            HeadStatus::Partial
        );
        assert_eq!(parse_head(b"\x00\x01garbage\r\n\r\n"), HeadStatus::Invalid);
        assert_eq!(
            parse_head(b"POST / HTTP/1.1\r\nContent-Length: x\r\n\r\n"),
            HeadStatus::Invalid
        );
        let chunked = b"POST /generate HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\nContent-Length: 3\r\n\r\n";
        let HeadStatus::Complete(h, _) = parse_head(chunked) else {
            panic!("not complete")
        };
        assert_eq!(h.body, BodyFraming::Chunked);
        let get = b"GET /v1/chat/completions HTTP/1.1\r\n\r\n";
        let HeadStatus::Complete(h, _) = parse_head(get) else {
            panic!("not complete")
        };
        assert_eq!((h.endpoint, h.body), (None, BodyFraming::None));
    }

    #[test]
    fn cut_at_char_boundary() {
        let long = "é".repeat(100);
        let cut = cut_field(&long);
        assert!(cut.len() <= MAX_FIELD_LEN);
        assert_eq!(cut.len(), 128);
        assert_eq!(cut_field("abc"), "abc");
    }
}
