//! Tests for `conn.rs`: whole exchanges fed as the kernel would report them. Streaming and body
//! analysis here, connection lifecycle in `lifecycle.rs`.

use std::fmt::Write as _;

use super::*;
use crate::http::{Endpoint, Gap, RequestRecord};

#[derive(Default, Debug)]
pub(super) struct Rec {
    pub(super) started: Vec<(RequestMeta, u64)>,
    pub(super) ttfts: Vec<u64>,
    pub(super) gaps: Vec<u64>,
    /// The two writes of each gap.
    pub(super) gap_ends: Vec<Gap>,
    pub(super) finished: Vec<RequestRecord>,
    pub(super) errors: Vec<ParseErrorKind>,
    pub(super) untracked: Vec<ConnId>,
}

impl Observer for Rec {
    fn request_started(&mut self, _: ConnId, meta: &RequestMeta, arrival_ns: u64) {
        self.started.push((meta.clone(), arrival_ns));
    }
    fn first_token(&mut self, _: ConnId, _: &RequestMeta, ttft_ns: u64) {
        self.ttfts.push(ttft_ns);
    }
    fn token_gap(&mut self, _: ConnId, _: &RequestMeta, gap: Gap) {
        self.gaps.push(gap.ns());
        self.gap_ends.push(gap);
    }
    fn request_finished(&mut self, record: RequestRecord) {
        self.finished.push(record);
    }
    fn parse_error(&mut self, _: ConnId, kind: ParseErrorKind) {
        self.errors.push(kind);
    }
    fn untrack(&mut self, conn: ConnId) {
        self.untracked.push(conn);
    }
}

impl Rec {
    pub(super) fn only(&self) -> &RequestRecord {
        assert_eq!(self.finished.len(), 1, "{self:#?}");
        &self.finished[0]
    }
}

pub(super) const C: ConnId = ConnId { tgid: 7, fd: 12 };

fn post(path: &str, body: &str) -> Vec<u8> {
    format!(
        "POST {path} HTTP/1.1\r\nHost: localhost:8000\r\nContent-Type: application/json\r\nX-Request-Id: req-1\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

fn get(path: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").into_bytes()
}

const CHAT_BODY: &str = r#"{"model":"llama-3-8b","messages":[{"role":"user","content":"hi"}],"stream":true,"max_tokens":64}"#;

/// A chunked response with one chunk per item.
fn chunked(status: &str, content_type: &str, items: &[String]) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nTransfer-Encoding: chunked\r\n\r\n"
    );
    for it in items {
        let _ = write!(out, "{:x}\r\n{it}\r\n", it.len());
    }
    out.push_str("0\r\n\r\n");
    out.into_bytes()
}

fn sse(events: &[&str]) -> Vec<String> {
    events.iter().map(|e| format!("data: {e}\n\n")).collect()
}

fn delta(text: &str) -> String {
    format!(
        r#"{{"id":"c1","object":"chat.completion.chunk","model":"llama-3-8b","choices":[{{"index":0,"delta":{{"content":"{text}"}},"finish_reason":null}}]}}"#
    )
}

const ROLE: &str =
    r#"{"id":"c1","choices":[{"index":0,"delta":{"role":"assistant"},"finish_reason":null}]}"#;
const USAGE: &str = r#"{"id":"c1","choices":[],"usage":{"prompt_tokens":9,"completion_tokens":3,"total_tokens":12}}"#;

fn chat_stream_response() -> Vec<u8> {
    let (a, b, c) = (delta("Hel"), delta("lo"), delta("!"));
    let mut items = sse(&[ROLE, &a, &b]);
    items.push(": keep-alive\n\n".to_owned());
    items.extend(sse(&[&c, USAGE, "[DONE]"]));
    chunked("200 OK", "text/event-stream", &items)
}

/// Index of the byte that completes the `n`th content event (its blank line's LF).
fn completing_byte(resp: &[u8], text: &str) -> usize {
    let needle = format!("\"content\":\"{text}\"");
    let at = resp
        .windows(needle.len())
        .position(|w| w == needle.as_bytes())
        .unwrap_or(usize::MAX);
    at + resp[at..]
        .windows(2)
        .position(|w| w == b"\n\n")
        .unwrap_or(0)
        + 1
}

#[test]
fn chat_stream_split_at_every_byte() {
    let req = post("/v1/chat/completions", CHAT_BODY);
    let resp = chat_stream_response();
    let done = [
        completing_byte(&resp, "Hel"),
        completing_byte(&resp, "lo"),
        completing_byte(&resp, "!"),
    ];
    for cut in 0..=resp.len() {
        let mut t = ConnTracker::new();
        let mut rec = Rec::default();
        t.on_ingress(C, 100, req.len() as u64, &req, &mut rec);
        let (a, b) = resp.split_at(cut);
        if !a.is_empty() {
            t.on_egress(C, 200, a.len() as u64, a, &mut rec);
        }
        if !b.is_empty() {
            t.on_egress(C, 300, b.len() as u64, b, &mut rec);
        }
        let ts = |i: usize| if i < cut { 200 } else { 300 };
        let r = rec.only();
        assert_eq!(r.content_events, 3, "cut {cut}");
        assert_eq!((r.status, r.outcome), (Some(200), Outcome::Ok), "cut {cut}");
        assert_eq!(r.first_token_ns, Some(ts(done[0])), "cut {cut}");
        assert_eq!(
            r.gaps_ns,
            vec![ts(done[1]) - ts(done[0]), ts(done[2]) - ts(done[1])],
            "cut {cut}"
        );
        assert_eq!(r.end_ns, if b.is_empty() { 200 } else { 300 }, "cut {cut}");
        assert_eq!(
            (r.prompt_tokens, r.completion_tokens),
            (Some(9), Some(3)),
            "cut {cut}"
        );
        assert_eq!(r.arrival_ns, 100);
        assert_eq!(rec.ttfts, vec![ts(done[0]) - 100], "cut {cut}");
        assert_eq!(rec.gaps, r.gaps_ns, "cut {cut}");
        assert!(rec.errors.is_empty(), "cut {cut}: {:?}", rec.errors);
        assert_eq!(t.in_flight(), 0);
    }
}

#[test]
fn byte_at_a_time_and_meta() {
    let req = post("/v1/chat/completions", CHAT_BODY);
    let resp = chat_stream_response();
    let mut t = ConnTracker::new();
    let mut rec = Rec::default();
    for (i, b) in req.iter().enumerate() {
        t.on_ingress(C, 10 + i as u64, 1, std::slice::from_ref(b), &mut rec);
        // The request starts once its body is read.
        assert_eq!(rec.started.len(), usize::from(i + 1 == req.len()));
    }
    assert_eq!(t.in_flight(), 1);
    let (meta, arrival) = rec.started[0].clone();
    assert_eq!(arrival, 10);
    assert_eq!(meta.endpoint, Some(Endpoint::ChatCompletions));
    assert_eq!(meta.model.as_deref(), Some("llama-3-8b"));
    assert_eq!((meta.stream, meta.max_tokens), (Some(true), Some(64)));
    assert_eq!(meta.request_id.as_deref(), Some("req-1"));
    for (i, b) in resp.iter().enumerate() {
        t.on_egress(C, 1000 + i as u64, 1, std::slice::from_ref(b), &mut rec);
    }
    let r = rec.only();
    assert_eq!(r.content_events, 3);
    assert_eq!(
        r.first_token_ns,
        Some(1000 + completing_byte(&resp, "Hel") as u64)
    );
    assert_eq!(r.end_ns, 1000 + resp.len() as u64 - 1);
    assert_eq!(r.meta, meta);
}

#[test]
fn several_events_in_one_write_give_zero_gaps() {
    let (d1, d2, d3) = (delta("a"), delta("b"), delta("c"));
    let resp = chunked(
        "200 OK",
        "text/event-stream",
        &[
            sse(&[ROLE, &d1, &d2, &d3]).concat(),
            sse(&["[DONE]"]).concat(),
        ],
    );
    let mut t = ConnTracker::new();
    let mut rec = Rec::default();
    let req = post("/v1/chat/completions", CHAT_BODY);
    t.on_ingress(C, 5, req.len() as u64, &req, &mut rec);
    t.on_egress(C, 50, resp.len() as u64, &resp, &mut rec);
    let r = rec.only();
    assert_eq!(
        (r.content_events, r.first_token_ns, r.gaps_ns.clone()),
        (3, Some(50), vec![0, 0])
    );
    assert_eq!(rec.gaps, vec![0, 0]);
    assert_eq!(rec.ttfts, vec![45]);
    // No usage chunk: tokens() falls back to content events.
    assert_eq!((r.completion_tokens, r.tokens()), (None, 3));
}

/// Runs one request and a response written in one piece at ts 20.
fn exchange(req: &[u8], resp: &[u8]) -> Rec {
    let mut t = ConnTracker::new();
    let mut rec = Rec::default();
    t.on_ingress(C, 10, req.len() as u64, req, &mut rec);
    t.on_egress(C, 20, resp.len() as u64, resp, &mut rec);
    assert_eq!(t.in_flight(), 0, "{rec:#?}");
    rec
}

#[test]
fn error_event_is_stream_error() {
    let a = delta("x");
    let mut items = sse(&[&a]);
    items.push("event: error\ndata: {\"error\":{\"message\":\"overloaded\"}}\n\n".to_owned());
    let rec = exchange(
        &post("/v1/chat/completions", CHAT_BODY),
        &chunked("200 OK", "text/event-stream", &items),
    );
    let r = rec.only();
    assert_eq!((r.outcome, r.content_events), (Outcome::StreamError, 1));
    let items = sse(&[r#"{"error":{"message":"boom","code":500}}"#]);
    let rec = exchange(
        &post("/v1/chat/completions", CHAT_BODY),
        &chunked("200 OK", "text/event-stream", &items),
    );
    assert_eq!(
        (rec.only().outcome, rec.only().first_token_ns),
        (Outcome::StreamError, None)
    );
}

#[test]
fn tgi_generate_stream() {
    let ev = |i: u32, text: &str, special: bool, last: bool| {
        let details = if last {
            r#"{"finish_reason":"eos_token","generated_tokens":3}"#
        } else {
            "null"
        };
        let gen = if last { "\"full\"" } else { "null" };
        format!(
            r#"{{"index":{i},"token":{{"id":{i},"text":"{text}","logprob":-0.5,"special":{special}}},"generated_text":{gen},"details":{details}}}"#
        )
    };
    let items: Vec<String> = [
        ev(1, "a", false, false),
        ev(2, "b", false, false),
        ev(3, "</s>", true, true),
    ]
    .iter()
    .map(|e| format!("data:{e}\n\n"))
    .collect();
    let rec = exchange(
        &post(
            "/generate_stream",
            r#"{"inputs":"hi","parameters":{"max_new_tokens":3}}"#,
        ),
        &chunked("200 OK", "text/event-stream", &items),
    );
    let r = rec.only();
    assert_eq!(r.meta.endpoint, Some(Endpoint::GenerateStream));
    assert_eq!((r.meta.stream, r.meta.max_tokens), (Some(true), Some(3)));
    assert_eq!(
        (r.content_events, r.completion_tokens, r.outcome),
        (2, Some(3), Outcome::Ok)
    );
}

#[test]
fn ollama_ndjson() {
    let lines: Vec<String> = [
        r#"{"model":"qwen","created_at":"t","message":{"role":"assistant","content":"Hi"},"done":false}"#,
        r#"{"model":"qwen","created_at":"t","message":{"role":"assistant","content":" there"},"done":false}"#,
        r#"{"model":"qwen","message":{"role":"assistant","content":""},"done":true,"prompt_eval_count":11,"eval_count":2}"#,
    ]
    .iter()
    .map(|l| format!("{l}\n"))
    .collect();
    let req = post(
        "/api/chat",
        r#"{"model":"qwen","messages":[{"role":"user","content":"hi"}]}"#,
    );
    let mut t = ConnTracker::new();
    let mut rec = Rec::default();
    t.on_ingress(C, 1, req.len() as u64, &req, &mut rec);
    let resp = chunked("200 OK", "application/x-ndjson", &lines);
    let split = resp.len() / 2;
    t.on_egress(C, 5, split as u64, &resp[..split], &mut rec);
    t.on_egress(C, 9, (resp.len() - split) as u64, &resp[split..], &mut rec);
    let r = rec.only();
    assert_eq!(
        (r.meta.model.as_deref(), r.meta.stream),
        (Some("qwen"), Some(true))
    );
    assert_eq!(
        (r.content_events, r.prompt_tokens, r.completion_tokens),
        (2, Some(11), Some(2))
    );
    assert_eq!(r.outcome, Outcome::Ok);
}

#[test]
fn non_streaming_json_with_usage() {
    let body = r#"{"id":"c","choices":[{"index":0,"message":{"role":"assistant","content":"Hello!"},"finish_reason":"stop"}],"usage":{"prompt_tokens":5,"completion_tokens":2}}"#;
    let head = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    let mut t = ConnTracker::new();
    let mut rec = Rec::default();
    let req = post("/v1/chat/completions", r#"{"model":"m","messages":[]}"#);
    t.on_ingress(C, 10, req.len() as u64, &req, &mut rec);
    t.on_egress(C, 30, head.len() as u64, head.as_bytes(), &mut rec);
    t.on_egress(C, 40, 20, &body.as_bytes()[..20], &mut rec);
    t.on_egress(
        C,
        50,
        (body.len() - 20) as u64,
        &body.as_bytes()[20..],
        &mut rec,
    );
    let r = rec.only();
    assert_eq!(
        (r.content_events, r.first_token_ns, r.end_ns),
        (1, Some(40), 50)
    );
    assert_eq!(
        (r.prompt_tokens, r.completion_tokens, r.outcome),
        (Some(5), Some(2), Outcome::Ok)
    );
    assert_eq!(r.meta.stream, None);
}

#[test]
fn content_length_with_truncated_capture() {
    let mut body = String::from(r#"{"object":"list","data":[{"embedding":["#);
    while body.len() < 10_000 {
        body.push_str("0.0123,");
    }
    body.push_str("1]}],\"usage\":{\"prompt_tokens\":4}}");
    let resp = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let mut t = ConnTracker::new();
    let mut rec = Rec::default();
    let req = post("/v1/embeddings", r#"{"model":"e5","input":"x"}"#);
    t.on_ingress(C, 10, req.len() as u64, &req, &mut rec);
    // The kernel captured 4096 of the write's bytes.
    t.on_egress(C, 20, resp.len() as u64, &resp.as_bytes()[..4096], &mut rec);
    assert_eq!(rec.errors, vec![ParseErrorKind::TruncatedCapture]);
    assert_eq!(
        (
            rec.only().outcome,
            rec.only().end_ns,
            rec.only().content_events
        ),
        (Outcome::Ok, 20, 0)
    );
    // Framing stayed in step: the next exchange on the connection is timed.
    let req2 = post("/v1/chat/completions", CHAT_BODY);
    t.on_ingress(C, 30, req2.len() as u64, &req2, &mut rec);
    let resp2 = chat_stream_response();
    t.on_egress(C, 40, resp2.len() as u64, &resp2, &mut rec);
    assert_eq!(rec.finished.len(), 2);
    assert_eq!(
        (
            rec.finished[1].content_events,
            rec.finished[1].first_token_ns
        ),
        (3, Some(40))
    );
    assert_eq!(rec.errors.len(), 1);
}

#[test]
fn truncated_request_body_still_finds_model() {
    let prompt = "x".repeat(9000);
    let body = format!(
        r#"{{"model":"big","stream":true,"messages":[{{"role":"user","content":"{prompt}"}}]}}"#
    );
    let req = post("/v1/chat/completions", &body);
    let mut t = ConnTracker::new();
    let mut rec = Rec::default();
    t.on_ingress(C, 10, req.len() as u64, &req[..4096], &mut rec);
    assert_eq!(rec.started.len(), 1);
    assert_eq!(
        (rec.started[0].0.model.as_deref(), rec.started[0].0.stream),
        (Some("big"), Some(true))
    );
    assert!(rec.errors.is_empty());
}

#[test]
fn pipelined_requests_in_one_read() {
    let mut reqs = post("/v1/completions", r#"{"model":"a","prompt":"x"}"#);
    reqs.extend(post(
        "/v1/chat/completions",
        r#"{"model":"b","messages":[]}"#,
    ));
    let json = |text: &str| {
        let b = format!(r#"{{"choices":[{{"text":"{text}"}}]}}"#);
        format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{b}",
            b.len()
        )
    };
    let resps = json("one") + &json("");
    let mut t = ConnTracker::new();
    let mut rec = Rec::default();
    t.on_ingress(C, 10, reqs.len() as u64, &reqs, &mut rec);
    assert_eq!((t.in_flight(), rec.started.len()), (2, 2));
    t.on_egress(C, 20, resps.len() as u64, resps.as_bytes(), &mut rec);
    assert_eq!(rec.finished.len(), 2);
    assert_eq!(rec.finished[0].meta.model.as_deref(), Some("a"));
    assert_eq!(rec.finished[0].content_events, 1);
    assert_eq!(rec.finished[1].meta.model.as_deref(), Some("b"));
    assert_eq!(rec.finished[1].content_events, 0);
    assert!(rec.errors.is_empty());
}

#[test]
fn status_outcomes() {
    let resp = |status: &str| {
        format!("HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: 15\r\n\r\n{{\"error\":\"no!\"}}").into_bytes()
    };
    let req = post("/v1/chat/completions", CHAT_BODY);
    assert_eq!(
        exchange(&req, &resp("503 Service Unavailable"))
            .only()
            .outcome,
        Outcome::ServerError
    );
    assert_eq!(
        exchange(&req, &resp("400 Bad Request")).only().outcome,
        Outcome::ClientError
    );
    assert_eq!(
        exchange(&req, &resp("200 OK")).only().outcome,
        Outcome::StreamError
    );
    let rec = exchange(
        &req,
        b"HTTP/1.1 502 Bad Gateway\r\nContent-Type: text/html\r\nContent-Length: 5\r\n\r\n<h1/>",
    );
    assert_eq!(
        (rec.only().outcome, rec.only().status),
        (Outcome::ServerError, Some(502))
    );
    assert!(rec.errors.is_empty());
}

mod lifecycle;

#[derive(Default)]
struct Budget {
    rec: Rec,
    dropped: Vec<&'static str>,
}

impl Observer for Budget {
    fn request_started(&mut self, c: ConnId, meta: &RequestMeta, arrival_ns: u64) {
        self.rec.request_started(c, meta, arrival_ns);
    }
    fn first_token(&mut self, c: ConnId, meta: &RequestMeta, ttft_ns: u64) {
        self.rec.first_token(c, meta, ttft_ns);
    }
    fn token_gap(&mut self, c: ConnId, meta: &RequestMeta, gap: Gap) {
        self.rec.token_gap(c, meta, gap);
    }
    fn request_finished(&mut self, record: RequestRecord) {
        self.rec.request_finished(record);
    }
    fn parse_error(&mut self, c: ConnId, kind: ParseErrorKind) {
        self.rec.parse_error(c, kind);
    }
    fn budget_dropped(&mut self, _: ConnId, what: &'static str) {
        self.dropped.push(what);
    }
}

/// 200 connections each stalled 40 KB into a 1 MB request body: without a budget their body
/// sniffs would hold 8 MB; with 1 MiB the total stays within the budget plus one capture, each
/// request still starts (its model read from what was kept), and the drops are reported.
#[test]
fn the_memory_budget_bounds_stalled_bodies() {
    let budget = 1 << 20;
    let mut t = ConnTracker::with_budget(budget);
    let mut obs = Budget::default();
    let head = "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n\
         {\"model\":\"m\",\"stream\":true,\"messages\":[{\"role\":\"user\",\"content\":\"";
    for fd in 0..200 {
        let c = ConnId { tgid: 7, fd };
        t.on_accept(c, 1, &mut obs);
        t.on_ingress(c, 2, head.len() as u64, head.as_bytes(), &mut obs);
        for _ in 0..10 {
            let filler = vec![b'a'; 4096];
            t.on_ingress(c, 3, 4096, &filler, &mut obs);
            assert!(t.buffered() <= budget + 4096 * 2, "{} bytes", t.buffered());
        }
    }
    assert!(!obs.dropped.is_empty());
    assert!(obs.dropped.iter().all(|w| *w == "request_body"));
    // A request starts when its body ends or its sniff is given up: every dropped sniff started
    // its request (the ones still within the budget are still reading).
    assert_eq!(
        obs.rec.started.len(),
        obs.dropped.len(),
        "each dropped sniff starts its request"
    );
    assert!(obs.dropped.len() > 150, "{} dropped", obs.dropped.len());
    assert!(obs
        .rec
        .started
        .iter()
        .all(|(m, _)| m.model.as_deref() == Some("m")));
    // Connections that close give their bytes back.
    for fd in 0..200 {
        t.on_close(ConnId { tgid: 7, fd }, 9, &mut obs);
    }
    assert_eq!(t.buffered(), 0);
}

/// The last write holds a big content event, the usage event, `[DONE]` and the terminator (Node
/// corks `res.write` + `res.end()` into one writev). Beyond the 4 KiB capture the end is unseen;
/// with the kernel's capture of the write's last bytes the response ends there, `ok`.
#[test]
fn a_coalesced_last_write_ends_by_its_tail() {
    let chunk = |e: &str| {
        let data = format!("data: {e}\n\n");
        format!("{:x}\r\n{data}\r\n", data.len())
    };
    let req = post("/v1/chat/completions", CHAT_BODY);
    let early = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n{}{}",
        chunk(ROLE),
        chunk(&delta("Hi"))
    );
    let last = format!(
        "{}{}{}0\r\n\r\n",
        chunk(&delta(&"x".repeat(6000))),
        chunk(USAGE),
        chunk("[DONE]")
    );
    let (early, last) = (early.as_bytes(), last.as_bytes());
    let cap = probe_common::MAX_CAPTURE;
    for with_tail in [true, false] {
        let mut t = ConnTracker::new();
        let mut rec = Rec::default();
        t.on_ingress(C, 100, req.len() as u64, &req, &mut rec);
        t.on_egress(C, 200, early.len() as u64, early, &mut rec);
        let tail = if with_tail {
            &last[last.len() - probe_common::TAIL_CAPTURE..]
        } else {
            &[][..]
        };
        t.on_egress_with_tail(C, 300, last.len() as u64, &last[..cap], tail, &mut rec);
        if with_tail {
            let r = rec.only();
            assert_eq!((r.outcome, r.end_ns), (Outcome::Ok, 300));
            assert_eq!(r.completion_tokens, Some(3), "the usage event in the tail");
            assert_eq!(
                r.content_events, 2,
                "the cut big event counts from its start"
            );
        } else {
            assert!(
                rec.finished.is_empty(),
                "without the tail the end is not seen"
            );
        }
    }
}
