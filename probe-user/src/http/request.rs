//! Request side: recognising a request line, parsing the head with `httparse`, mapping the path
//! to an `Endpoint`, and sniffing the few JSON body fields that describe the request (`model`,
//! `stream`, `max_tokens`, `priority`). Prompt and message text is skipped, never copied.

use std::borrow::Cow;

use serde::Deserialize;
use serde_json::value::RawValue;

use super::{Endpoint, RequestMeta, MAX_FIELD_LEN};

/// Longest request head (request line + headers) we buffer. Real LLM clients send well under
/// 2 KiB; 16 KiB matches common server limits (uvicorn/h11 caps at 16 KiB by default), so a longer
/// head would be rejected by the server anyway.
pub const MAX_HEAD_BYTES: usize = 16 * 1024;
/// Captured body bytes kept per request to find `model`/`stream`/…: those sit near the start of
/// the JSON in every client we know; the prompt after them may be megabytes.
pub const MAX_BODY_SNIFF: usize = 64 * 1024;
/// Header slots for `httparse`: far above what HTTP clients send (~10) while the array stays a few
/// KiB on the stack. A head with more headers counts as too large, like one over `MAX_HEAD_BYTES`.
const MAX_HEADERS: usize = 128;
/// Captured bytes inspected to decide whether a connection's first bytes are binary.
const BINARY_SNIFF_BYTES: usize = 64;

const METHODS: [&[u8]; 9] = [
    b"GET ", b"POST ", b"PUT ", b"DELETE ", b"HEAD ", b"OPTIONS ", b"PATCH ", b"TRACE ", b"CONNECT ",
];

/// Maps a request target to the endpoint we time. Exact paths only: query string and fragment
/// are dropped, absolute-form targets (`http://host/path`) reduced to their path.
pub fn endpoint_for_path(target: &str) -> Option<Endpoint> {
    let path = target.split(['?', '#']).next().unwrap_or_default();
    let path = match path.strip_prefix("http://").or_else(|| path.strip_prefix("https://")) {
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
    METHODS.iter().any(|m| if rest.len() >= m.len() { rest.starts_with(m) } else { m.starts_with(rest) })
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
                Some(target) => target.first().is_none_or(|b| matches!(b, b'/' | b'*' | b'h')),
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
    let endpoint = if method == "POST" { req.path.and_then(endpoint_for_path) } else { None };
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
            let Some(n) = std::str::from_utf8(h.value).ok().and_then(|v| v.trim().parse::<u64>().ok()) else {
                return HeadStatus::Invalid;
            };
            if length.is_some_and(|l| l != n) {
                return HeadStatus::Invalid;
            }
            length = Some(n);
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = Some(last_coding_is_chunked(h.value));
        } else if h.name.eq_ignore_ascii_case("x-request-id") {
            head.request_id = std::str::from_utf8(h.value).ok().map(|v| cut_field(v.trim()));
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
    value.rsplit(|&b| b == b',').next().is_some_and(|c| c.trim_ascii().eq_ignore_ascii_case(b"chunked"))
}

/// Cuts `s` to at most `MAX_FIELD_LEN` bytes at a char boundary.
pub(crate) fn cut_field(s: &str) -> String {
    let mut end = s.len().min(MAX_FIELD_LEN);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.get(..end).unwrap_or_default().to_owned()
}

/// The body fields we keep, from whichever parse found them.
#[derive(Debug, Default, PartialEq, Eq)]
struct Fields {
    model: Option<String>,
    stream: Option<bool>,
    max_tokens: Option<u64>,
    priority: Option<i64>,
}

impl Fields {
    /// Reads one top-level field from its raw JSON text; wrong types are ignored, not errors.
    fn set(&mut self, key: &str, raw: &str) {
        let raw = raw.trim();
        match key {
            "model" => {
                if let Ok(s) = serde_json::from_str::<Cow<'_, str>>(raw) {
                    self.model = Some(cut_field(&s));
                }
            }
            "stream" => self.stream = raw.parse::<bool>().ok().or(self.stream),
            // The first of these the body has wins; llama.cpp's `n_predict: -1` means unlimited.
            "max_tokens" | "max_completion_tokens" | "n_predict" | "max_new_tokens" => {
                self.max_tokens = self.max_tokens.or(raw.parse::<u64>().ok());
            }
            "priority" => self.priority = raw.parse::<i64>().ok().or(self.priority),
            _ => {}
        }
    }
}

/// Only the fields we need, borrowed raw; every other key (the prompt) is skipped unparsed.
#[derive(Deserialize, Default)]
#[serde(default)]
struct Sniff<'a> {
    #[serde(borrow)]
    model: Option<&'a RawValue>,
    #[serde(borrow)]
    stream: Option<&'a RawValue>,
    #[serde(borrow)]
    max_tokens: Option<&'a RawValue>,
    #[serde(borrow)]
    max_completion_tokens: Option<&'a RawValue>,
    #[serde(borrow)]
    n_predict: Option<&'a RawValue>,
    #[serde(borrow)]
    priority: Option<&'a RawValue>,
    /// TGI: `parameters.max_new_tokens`.
    #[serde(borrow)]
    parameters: Option<&'a RawValue>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct Parameters<'a> {
    #[serde(borrow)]
    max_new_tokens: Option<&'a RawValue>,
}

/// Fills `meta` from the captured body. `complete` is false when bytes were not captured or the
/// sniff cap cut the body: then a tolerant scan of the top-level keys replaces the JSON parse.
pub(crate) fn apply_body(meta: &mut RequestMeta, body: &[u8], complete: bool) {
    let mut f = Fields::default();
    let parsed = complete && parse_fields(body, &mut f);
    if !parsed {
        f = Fields::default();
        scan_fields(body, &mut f);
    }
    meta.model = f.model;
    meta.max_tokens = f.max_tokens;
    meta.priority = f.priority;
    meta.stream = match meta.endpoint {
        Some(Endpoint::GenerateStream) => Some(true),
        // Ollama streams unless the request says `"stream": false`.
        Some(Endpoint::OllamaGenerate | Endpoint::OllamaChat) => Some(f.stream.unwrap_or(true)),
        _ => f.stream,
    };
}

fn parse_fields(body: &[u8], f: &mut Fields) -> bool {
    let Ok(s) = serde_json::from_slice::<Sniff<'_>>(body) else {
        return false;
    };
    let pairs = [
        ("model", s.model),
        ("stream", s.stream),
        ("max_tokens", s.max_tokens),
        ("max_completion_tokens", s.max_completion_tokens),
        ("n_predict", s.n_predict),
        ("priority", s.priority),
    ];
    for (key, raw) in pairs {
        if let Some(raw) = raw {
            f.set(key, raw.get());
        }
    }
    if let Some(p) = s.parameters.and_then(|raw| serde_json::from_str::<Parameters<'_>>(raw.get()).ok()) {
        if let Some(raw) = p.max_new_tokens {
            f.set("max_new_tokens", raw.get());
        }
    }
    true
}

/// Walks the top-level object of a possibly truncated JSON body and reads the scalar values of
/// the keys we want (and `parameters.max_new_tokens`). Stops quietly where the bytes end or stop
/// being JSON. Keys are recognised only at depth 1, so a `"model"` inside a message's text (where
/// its quotes would be escaped) or inside a nested object is never taken.
fn scan_fields(body: &[u8], f: &mut Fields) {
    let i = skip_ws(body, 0);
    if body.get(i) == Some(&b'{') {
        // Where the capture ends the walk ends; whatever was read so far stays in `f`.
        let _ = scan_object(body, i + 1, f, true);
    }
}

/// Scans object members from `i` (just after `{`); returns the index after `}`.
fn scan_object(b: &[u8], mut i: usize, f: &mut Fields, top: bool) -> Option<usize> {
    loop {
        i = skip_ws(b, i);
        match b.get(i)? {
            b'}' => return Some(i + 1),
            b',' => i += 1,
            b'"' => {
                let key_end = skip_string(b, i)?;
                let key = b.get(i + 1..key_end - 1)?;
                i = skip_ws(b, key_end);
                if b.get(i)? != &b':' {
                    return None;
                }
                i = skip_ws(b, i + 1);
                if top && key == b"parameters" && b.get(i) == Some(&b'{') {
                    let mut inner = Fields::default();
                    let end = scan_object(b, i + 1, &mut inner, false);
                    f.max_tokens = f.max_tokens.or(inner.max_tokens);
                    i = end?;
                    continue;
                }
                let end = skip_value(b, i)?;
                let wanted = if top {
                    matches!(key, b"model" | b"stream" | b"max_tokens" | b"max_completion_tokens" | b"n_predict" | b"priority")
                } else {
                    key == b"max_new_tokens"
                };
                // A number that runs to the end of the capture may be cut short: skip it.
                if wanted && end < b.len() {
                    if let (Ok(k), Ok(v)) = (std::str::from_utf8(key), std::str::from_utf8(b.get(i..end)?)) {
                        f.set(k, v);
                    }
                }
                i = end;
            }
            _ => return None,
        }
    }
}

fn skip_ws(b: &[u8], mut i: usize) -> usize {
    while b.get(i).is_some_and(|c| c.is_ascii_whitespace()) {
        i += 1;
    }
    i
}

/// From the opening quote at `i`, the index after the closing quote.
fn skip_string(b: &[u8], i: usize) -> Option<usize> {
    let mut j = i + 1;
    loop {
        j += memchr::memchr2(b'"', b'\\', b.get(j..)?)?;
        if b.get(j)? == &b'\\' {
            j += 2;
        } else {
            return Some(j + 1);
        }
    }
}

/// From the first byte of a value at `i`, the index after it. Containers are skipped by bracket
/// depth (strings inside them skipped whole); `None` if the value is cut off.
fn skip_value(b: &[u8], i: usize) -> Option<usize> {
    match b.get(i)? {
        b'"' => skip_string(b, i),
        b'{' | b'[' => {
            let mut depth = 0usize;
            let mut j = i;
            loop {
                match b.get(j)? {
                    b'"' => j = skip_string(b, j)?,
                    b'{' | b'[' => {
                        depth += 1;
                        j += 1;
                    }
                    b'}' | b']' => {
                        depth -= 1;
                        j += 1;
                        if depth == 0 {
                            return Some(j);
                        }
                    }
                    _ => j += 1,
                }
            }
        }
        _ => {
            let len = b.get(i..)?.iter().position(|c| matches!(c, b',' | b'}' | b']') || c.is_ascii_whitespace());
            Some(i + len.unwrap_or(b.len() - i))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints() {
        assert_eq!(endpoint_for_path("/v1/chat/completions"), Some(Endpoint::ChatCompletions));
        assert_eq!(endpoint_for_path("/chat/completions?x=1"), Some(Endpoint::ChatCompletions));
        assert_eq!(endpoint_for_path("/v1/completions"), Some(Endpoint::Completions));
        assert_eq!(endpoint_for_path("/v1/embeddings"), Some(Endpoint::Embeddings));
        assert_eq!(endpoint_for_path("/v1/responses"), Some(Endpoint::Responses));
        assert_eq!(endpoint_for_path("/generate"), Some(Endpoint::Generate));
        assert_eq!(endpoint_for_path("/generate_stream"), Some(Endpoint::GenerateStream));
        assert_eq!(endpoint_for_path("/api/generate"), Some(Endpoint::OllamaGenerate));
        assert_eq!(endpoint_for_path("/api/chat"), Some(Endpoint::OllamaChat));
        assert_eq!(endpoint_for_path("/completion"), Some(Endpoint::LlamaCompletion));
        assert_eq!(endpoint_for_path("/completions"), Some(Endpoint::LlamaCompletion));
        assert_eq!(endpoint_for_path("http://h:8000/v1/completions"), Some(Endpoint::Completions));
        for p in ["/health", "/metrics", "/v1/models", "/v1/chat/completions/", "/embeddings", ""] {
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
        assert_eq!(find_request_start(b"junk\nmore\nPOST /v1 HTTP/1.1"), Some(10));
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
        let HeadStatus::Complete(h, n) = parse_head(raw) else { panic!("not complete") };
        assert_eq!(n, raw.len() - 2);
        assert_eq!(h.endpoint, Some(Endpoint::ChatCompletions));
        assert_eq!(h.body, BodyFraming::Length(12));
        assert_eq!(h.request_id.as_deref(), Some("abc-1"));
        assert_eq!(parse_head(b"POST /v1/chat/completions HTTP/1.1\r\nHost"), HeadStatus::Partial);
        assert_eq!(parse_head(b"\x00\x01garbage\r\n\r\n"), HeadStatus::Invalid);
        assert_eq!(parse_head(b"POST / HTTP/1.1\r\nContent-Length: x\r\n\r\n"), HeadStatus::Invalid);
        let chunked = b"POST /generate HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\nContent-Length: 3\r\n\r\n";
        let HeadStatus::Complete(h, _) = parse_head(chunked) else { panic!("not complete") };
        assert_eq!(h.body, BodyFraming::Chunked);
        let get = b"GET /v1/chat/completions HTTP/1.1\r\n\r\n";
        let HeadStatus::Complete(h, _) = parse_head(get) else { panic!("not complete") };
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

    fn meta_for(endpoint: Endpoint, body: &str, complete: bool) -> RequestMeta {
        let mut m = RequestMeta { endpoint: Some(endpoint), ..RequestMeta::default() };
        apply_body(&mut m, body.as_bytes(), complete);
        m
    }

    #[test]
    fn body_fields() {
        let body = r#"{"messages":[{"role":"user","content":"say \"model\": \"evil\""}],"model":"llama-3","stream":true,"max_completion_tokens":50,"priority":-3}"#;
        let m = meta_for(Endpoint::ChatCompletions, body, true);
        assert_eq!(m.model.as_deref(), Some("llama-3"));
        assert_eq!((m.stream, m.max_tokens, m.priority), (Some(true), Some(50), Some(-3)));
        let tgi = r#"{"inputs":"hi","parameters":{"max_new_tokens":20,"model":"x"}}"#;
        let m = meta_for(Endpoint::GenerateStream, tgi, true);
        assert_eq!((m.model, m.stream, m.max_tokens), (None, Some(true), Some(20)));
        let m = meta_for(Endpoint::OllamaChat, r#"{"model":"qwen","messages":[]}"#, true);
        assert_eq!(m.stream, Some(true));
        let m = meta_for(Endpoint::OllamaGenerate, r#"{"model":"qwen","stream":false}"#, true);
        assert_eq!(m.stream, Some(false));
        let m = meta_for(Endpoint::LlamaCompletion, r#"{"prompt":"x","n_predict":-1}"#, true);
        assert_eq!(m.max_tokens, None);
        let m = meta_for(Endpoint::ChatCompletions, &format!(r#"{{"model":"{}"}}"#, "m".repeat(300)), true);
        assert_eq!(m.model.map(|s| s.len()), Some(MAX_FIELD_LEN));
    }

    #[test]
    fn truncated_body_scan() {
        let body = r#"{"model": "gpt-x", "stream" : true, "messages":[{"content":"\"model\": \"no\", {\"stream\": false"}], "max_tokens": 12"#;
        let m = meta_for(Endpoint::ChatCompletions, body, false);
        assert_eq!(m.model.as_deref(), Some("gpt-x"));
        assert_eq!(m.stream, Some(true));
        // The number runs to the end of the capture and may be cut: not taken.
        assert_eq!(m.max_tokens, None);
        let nested = r#"{"metadata":{"model":"inner"},"parameters":{"max_new_tokens":7},"messages":[{"content":"abc"#;
        let m = meta_for(Endpoint::Generate, nested, false);
        assert_eq!((m.model, m.max_tokens), (None, Some(7)));
        let m = meta_for(Endpoint::ChatCompletions, r#"{"messages":[{"content":"xx"#, false);
        assert_eq!(m.model, None);
        // Invalid JSON on a complete body falls back to the scan too.
        let m = meta_for(Endpoint::ChatCompletions, r#"{"model":"a","stream":false,}"#, true);
        assert_eq!((m.model.as_deref(), m.stream), (Some("a"), Some(false)));
    }
}
