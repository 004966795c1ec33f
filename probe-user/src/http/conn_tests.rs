//! Tests for `conn.rs`: whole exchanges fed as the kernel would report them.

use super::*;
use crate::http::Endpoint;

#[derive(Default, Debug)]
struct Rec {
    started: Vec<(RequestMeta, u64)>,
    ttfts: Vec<u64>,
    gaps: Vec<u64>,
    finished: Vec<RequestRecord>,
    errors: Vec<ParseErrorKind>,
    untracked: Vec<ConnId>,
}

impl Observer for Rec {
    fn request_started(&mut self, _: ConnId, meta: &RequestMeta, arrival_ns: u64) {
        self.started.push((meta.clone(), arrival_ns));
    }
    fn first_token(&mut self, _: ConnId, _: &RequestMeta, ttft_ns: u64) {
        self.ttfts.push(ttft_ns);
    }
    fn token_gap(&mut self, _: ConnId, _: &RequestMeta, gap_ns: u64) {
        self.gaps.push(gap_ns);
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
    fn only(&self) -> &RequestRecord {
        assert_eq!(self.finished.len(), 1, "{self:#?}");
        &self.finished[0]
    }
}

const C: ConnId = ConnId { tgid: 7, fd: 12 };

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
    let mut out = format!("HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nTransfer-Encoding: chunked\r\n\r\n");
    for it in items {
        out.push_str(&format!("{:x}\r\n{it}\r\n", it.len()));
    }
    out.push_str("0\r\n\r\n");
    out.into_bytes()
}

fn sse(events: &[&str]) -> Vec<String> {
    events.iter().map(|e| format!("data: {e}\n\n")).collect()
}

fn delta(text: &str) -> String {
    format!(r#"{{"id":"c1","object":"chat.completion.chunk","model":"llama-3-8b","choices":[{{"index":0,"delta":{{"content":"{text}"}},"finish_reason":null}}]}}"#)
}

const ROLE: &str = r#"{"id":"c1","choices":[{"index":0,"delta":{"role":"assistant"},"finish_reason":null}]}"#;
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
    let at = resp.windows(needle.len()).position(|w| w == needle.as_bytes()).unwrap_or(usize::MAX);
    at + resp[at..].windows(2).position(|w| w == b"\n\n").unwrap_or(0) + 1
}

#[test]
fn chat_stream_split_at_every_byte() {
    let req = post("/v1/chat/completions", CHAT_BODY);
    let resp = chat_stream_response();
    let done = [completing_byte(&resp, "Hel"), completing_byte(&resp, "lo"), completing_byte(&resp, "!")];
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
        assert_eq!(r.gaps_ns, vec![ts(done[1]) - ts(done[0]), ts(done[2]) - ts(done[1])], "cut {cut}");
        assert_eq!(r.end_ns, if b.is_empty() { 200 } else { 300 }, "cut {cut}");
        assert_eq!((r.prompt_tokens, r.completion_tokens), (Some(9), Some(3)), "cut {cut}");
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
    assert_eq!(r.first_token_ns, Some(1000 + completing_byte(&resp, "Hel") as u64));
    assert_eq!(r.end_ns, 1000 + resp.len() as u64 - 1);
    assert_eq!(r.meta, meta);
}

#[test]
fn several_events_in_one_write_give_zero_gaps() {
    let (a, b, c) = (delta("a"), delta("b"), delta("c"));
    let resp = chunked("200 OK", "text/event-stream", &[sse(&[ROLE, &a, &b, &c]).concat(), sse(&["[DONE]"]).concat()]);
    let mut t = ConnTracker::new();
    let mut rec = Rec::default();
    let req = post("/v1/chat/completions", CHAT_BODY);
    t.on_ingress(C, 5, req.len() as u64, &req, &mut rec);
    t.on_egress(C, 50, resp.len() as u64, &resp, &mut rec);
    let r = rec.only();
    assert_eq!((r.content_events, r.first_token_ns, r.gaps_ns.clone()), (3, Some(50), vec![0, 0]));
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
    let rec = exchange(&post("/v1/chat/completions", CHAT_BODY), &chunked("200 OK", "text/event-stream", &items));
    let r = rec.only();
    assert_eq!((r.outcome, r.content_events), (Outcome::StreamError, 1));
    let items = sse(&[r#"{"error":{"message":"boom","code":500}}"#]);
    let rec = exchange(&post("/v1/chat/completions", CHAT_BODY), &chunked("200 OK", "text/event-stream", &items));
    assert_eq!((rec.only().outcome, rec.only().first_token_ns), (Outcome::StreamError, None));
}

#[test]
fn tgi_generate_stream() {
    let ev = |i: u32, text: &str, special: bool, last: bool| {
        let details = if last { r#"{"finish_reason":"eos_token","generated_tokens":3}"# } else { "null" };
        let gen = if last { "\"full\"" } else { "null" };
        format!(
            r#"{{"index":{i},"token":{{"id":{i},"text":"{text}","logprob":-0.5,"special":{special}}},"generated_text":{gen},"details":{details}}}"#
        )
    };
    let items: Vec<String> =
        [ev(1, "a", false, false), ev(2, "b", false, false), ev(3, "</s>", true, true)].iter().map(|e| format!("data:{e}\n\n")).collect();
    let rec = exchange(
        &post("/generate_stream", r#"{"inputs":"hi","parameters":{"max_new_tokens":3}}"#),
        &chunked("200 OK", "text/event-stream", &items),
    );
    let r = rec.only();
    assert_eq!(r.meta.endpoint, Some(Endpoint::GenerateStream));
    assert_eq!((r.meta.stream, r.meta.max_tokens), (Some(true), Some(3)));
    assert_eq!((r.content_events, r.completion_tokens, r.outcome), (2, Some(3), Outcome::Ok));
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
    let req = post("/api/chat", r#"{"model":"qwen","messages":[{"role":"user","content":"hi"}]}"#);
    let mut t = ConnTracker::new();
    let mut rec = Rec::default();
    t.on_ingress(C, 1, req.len() as u64, &req, &mut rec);
    let resp = chunked("200 OK", "application/x-ndjson", &lines);
    let split = resp.len() / 2;
    t.on_egress(C, 5, split as u64, &resp[..split], &mut rec);
    t.on_egress(C, 9, (resp.len() - split) as u64, &resp[split..], &mut rec);
    let r = rec.only();
    assert_eq!((r.meta.model.as_deref(), r.meta.stream), (Some("qwen"), Some(true)));
    assert_eq!((r.content_events, r.prompt_tokens, r.completion_tokens), (2, Some(11), Some(2)));
    assert_eq!(r.outcome, Outcome::Ok);
}

#[test]
fn non_streaming_json_with_usage() {
    let body = r#"{"id":"c","choices":[{"index":0,"message":{"role":"assistant","content":"Hello!"},"finish_reason":"stop"}],"usage":{"prompt_tokens":5,"completion_tokens":2}}"#;
    let head = format!("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n", body.len());
    let mut t = ConnTracker::new();
    let mut rec = Rec::default();
    let req = post("/v1/chat/completions", r#"{"model":"m","messages":[]}"#);
    t.on_ingress(C, 10, req.len() as u64, &req, &mut rec);
    t.on_egress(C, 30, head.len() as u64, head.as_bytes(), &mut rec);
    t.on_egress(C, 40, 20, &body.as_bytes()[..20], &mut rec);
    t.on_egress(C, 50, (body.len() - 20) as u64, &body.as_bytes()[20..], &mut rec);
    let r = rec.only();
    assert_eq!((r.content_events, r.first_token_ns, r.end_ns), (1, Some(40), 50));
    assert_eq!((r.prompt_tokens, r.completion_tokens, r.outcome), (Some(5), Some(2), Outcome::Ok));
    assert_eq!(r.meta.stream, None);
}

#[test]
fn content_length_with_truncated_capture() {
    let mut body = String::from(r#"{"object":"list","data":[{"embedding":["#);
    while body.len() < 10_000 {
        body.push_str("0.0123,");
    }
    body.push_str("1]}],\"usage\":{\"prompt_tokens\":4}}");
    let resp = format!("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len());
    let mut t = ConnTracker::new();
    let mut rec = Rec::default();
    let req = post("/v1/embeddings", r#"{"model":"e5","input":"x"}"#);
    t.on_ingress(C, 10, req.len() as u64, &req, &mut rec);
    // The kernel captured 4096 of the write's bytes.
    t.on_egress(C, 20, resp.len() as u64, &resp.as_bytes()[..4096], &mut rec);
    assert_eq!(rec.errors, vec![ParseErrorKind::TruncatedCapture]);
    assert_eq!((rec.only().outcome, rec.only().end_ns, rec.only().content_events), (Outcome::Ok, 20, 0));
    // Framing stayed in step: the next exchange on the connection is timed.
    let req2 = post("/v1/chat/completions", CHAT_BODY);
    t.on_ingress(C, 30, req2.len() as u64, &req2, &mut rec);
    let resp2 = chat_stream_response();
    t.on_egress(C, 40, resp2.len() as u64, &resp2, &mut rec);
    assert_eq!(rec.finished.len(), 2);
    assert_eq!((rec.finished[1].content_events, rec.finished[1].first_token_ns), (3, Some(40)));
    assert_eq!(rec.errors.len(), 1);
}

#[test]
fn truncated_request_body_still_finds_model() {
    let prompt = "x".repeat(9000);
    let body = format!(r#"{{"model":"big","stream":true,"messages":[{{"role":"user","content":"{prompt}"}}]}}"#);
    let req = post("/v1/chat/completions", &body);
    let mut t = ConnTracker::new();
    let mut rec = Rec::default();
    t.on_ingress(C, 10, req.len() as u64, &req[..4096], &mut rec);
    assert_eq!(rec.started.len(), 1);
    assert_eq!((rec.started[0].0.model.as_deref(), rec.started[0].0.stream), (Some("big"), Some(true)));
    assert!(rec.errors.is_empty());
}

#[test]
fn pipelined_requests_in_one_read() {
    let mut reqs = post("/v1/completions", r#"{"model":"a","prompt":"x"}"#);
    reqs.extend(post("/v1/chat/completions", r#"{"model":"b","messages":[]}"#));
    let json = |text: &str| {
        let b = format!(r#"{{"choices":[{{"text":"{text}"}}]}}"#);
        format!("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{b}", b.len())
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
    assert_eq!(exchange(&req, &resp("503 Service Unavailable")).only().outcome, Outcome::ServerError);
    assert_eq!(exchange(&req, &resp("400 Bad Request")).only().outcome, Outcome::ClientError);
    assert_eq!(exchange(&req, &resp("200 OK")).only().outcome, Outcome::StreamError);
    let rec = exchange(&req, b"HTTP/1.1 502 Bad Gateway\r\nContent-Type: text/html\r\nContent-Length: 5\r\n\r\n<h1/>");
    assert_eq!((rec.only().outcome, rec.only().status), (Outcome::ServerError, Some(502)));
    assert!(rec.errors.is_empty());
}

/// A request and the first part of a streaming response, cut after the first content event.
fn half_stream(t: &mut ConnTracker, rec: &mut Rec) {
    let req = post("/v1/chat/completions", CHAT_BODY);
    t.on_ingress(C, 10, req.len() as u64, &req, rec);
    let resp = chat_stream_response();
    let cut = completing_byte(&resp, "Hel") + 1;
    t.on_egress(C, 20, cut as u64, &resp[..cut], rec);
}

#[test]
fn client_abort_mid_stream() {
    let mut t = ConnTracker::new();
    let mut rec = Rec::default();
    half_stream(&mut t, &mut rec);
    t.on_peer_closed(C, 30, &mut rec);
    let r = rec.only();
    assert_eq!((r.outcome, r.end_ns, r.content_events, r.status), (Outcome::ClientAbort, 30, 1, Some(200)));
    // The server goes on writing until it notices; nothing more is reported.
    let more = sse(&[&delta("z")]).concat();
    t.on_egress(C, 40, more.len() as u64, more.as_bytes(), &mut rec);
    t.on_close(C, 50, &mut rec);
    assert_eq!((rec.finished.len(), rec.errors.len(), t.open_connections()), (1, 0, 0));

    let mut t = ConnTracker::new();
    let mut rec = Rec::default();
    half_stream(&mut t, &mut rec);
    t.on_io_error(C, 25, 11, &mut rec); // EAGAIN: not a client event
    assert!(rec.finished.is_empty());
    t.on_io_error(C, 26, 32, &mut rec); // EPIPE
    assert_eq!((rec.only().outcome, rec.only().end_ns), (Outcome::ClientAbort, 26));
}

#[test]
fn server_close_mid_stream() {
    let mut t = ConnTracker::new();
    let mut rec = Rec::default();
    half_stream(&mut t, &mut rec);
    t.on_close(C, 30, &mut rec);
    let r = rec.only();
    assert_eq!((r.outcome, r.end_ns, r.content_events), (Outcome::ServerReset, 30, 1));
    assert_eq!(t.open_connections(), 0);
}

#[test]
fn keep_alive_end_is_quiet() {
    let rec = {
        let mut t = ConnTracker::new();
        let mut rec = Rec::default();
        let req = post("/v1/chat/completions", CHAT_BODY);
        t.on_ingress(C, 1, req.len() as u64, &req, &mut rec);
        let resp = chat_stream_response();
        t.on_egress(C, 2, resp.len() as u64, &resp, &mut rec);
        t.on_peer_closed(C, 3, &mut rec);
        t.on_close(C, 4, &mut rec);
        rec
    };
    assert_eq!(rec.only().outcome, Outcome::Ok);
    assert!(rec.errors.is_empty());
}

#[test]
fn read_until_close_completes_at_close() {
    let mut t = ConnTracker::new();
    let mut rec = Rec::default();
    let req = post("/v1/completions", r#"{"model":"m","prompt":"p","stream":true}"#);
    t.on_ingress(C, 1, req.len() as u64, &req, &mut rec);
    let resp = format!("HTTP/1.0 200 OK\r\nContent-Type: text/event-stream\r\n\r\n{}", sse(&[r#"{"choices":[{"text":"a"}]}"#]).concat());
    t.on_egress(C, 2, resp.len() as u64, resp.as_bytes(), &mut rec);
    assert!(rec.finished.is_empty());
    t.on_close(C, 3, &mut rec);
    let r = rec.only();
    assert_eq!((r.outcome, r.end_ns, r.content_events, r.first_token_ns), (Outcome::Ok, 3, 1, Some(2)));
}

#[test]
fn bad_chunk_ends_at_close() {
    let mut t = ConnTracker::new();
    let mut rec = Rec::default();
    let req = post("/v1/chat/completions", CHAT_BODY);
    t.on_ingress(C, 1, req.len() as u64, &req, &mut rec);
    let resp = "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\ndata: x\r\n";
    t.on_egress(C, 2, resp.len() as u64, resp.as_bytes(), &mut rec);
    t.on_egress(C, 3, 3, b"1\r\n", &mut rec);
    assert_eq!(rec.errors, vec![ParseErrorKind::BadChunk]);
    t.on_close(C, 4, &mut rec);
    assert_eq!((rec.only().outcome, rec.only().end_ns), (Outcome::Ok, 4));
}

#[test]
fn lost_sse_framing_resyncs_on_next_status_line() {
    let mut t = ConnTracker::new();
    let mut rec = Rec::default();
    half_stream(&mut t, &mut rec);
    // A write whose chunk framing was not captured.
    t.on_egress(C, 30, 9000, b"\r\n20\r\ndata: {\"choices\"", &mut rec);
    t.on_egress(C, 31, 5000, b"more", &mut rec);
    assert_eq!(rec.errors, vec![ParseErrorKind::TruncatedCapture]);
    let req = post("/v1/chat/completions", CHAT_BODY);
    t.on_ingress(C, 40, req.len() as u64, &req, &mut rec);
    let resp = chat_stream_response();
    t.on_egress(C, 50, resp.len() as u64, &resp, &mut rec);
    assert_eq!(rec.finished.len(), 2);
    assert_eq!((rec.finished[0].outcome, rec.finished[0].end_ns), (Outcome::Ok, 31));
    assert_eq!((rec.finished[1].content_events, rec.finished[1].first_token_ns), (3, Some(50)));
    assert_eq!(rec.errors.len(), 1);
}

#[test]
fn non_llm_paths_are_not_timed_but_keep_pipelining() {
    let mut reqs = get("/health");
    reqs.extend(post("/v1/chat/completions", CHAT_BODY));
    reqs.extend(get("/metrics"));
    let mut t = ConnTracker::new();
    let mut rec = Rec::default();
    t.on_ingress(C, 10, reqs.len() as u64, &reqs, &mut rec);
    assert_eq!((t.in_flight(), rec.started.len()), (3, 1));
    let mut resps = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok".to_vec();
    resps.extend(chat_stream_response());
    resps.extend(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n4\r\n# x\n\r\n0\r\n\r\n");
    t.on_egress(C, 20, resps.len() as u64, &resps, &mut rec);
    let r = rec.only();
    assert_eq!((r.meta.endpoint, r.content_events), (Some(Endpoint::ChatCompletions), 3));
    assert_eq!((t.in_flight(), rec.ttfts.len()), (0, 1));
    assert!(rec.errors.is_empty());
    // A CORS preflight to an LLM path is not an inference request.
    let rec = exchange(b"OPTIONS /v1/chat/completions HTTP/1.1\r\n\r\n", b"HTTP/1.1 204 No Content\r\n\r\n");
    assert!(rec.finished.is_empty() && rec.started.is_empty());
}

#[test]
fn garbage_is_not_http() {
    for first in [&b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"[..], b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", b"\x00\x00\x12\x04\x00"] {
        let mut t = ConnTracker::new();
        let mut rec = Rec::default();
        t.on_ingress(C, 1, first.len() as u64, first, &mut rec);
        t.on_ingress(C, 2, 5, b"POST ", &mut rec);
        t.on_egress(C, 3, 4, b"\x17\x03\x03\x00", &mut rec);
        assert_eq!((rec.errors.clone(), rec.untracked.clone()), (vec![ParseErrorKind::NotHttp], vec![C]));
        assert_eq!((t.in_flight(), rec.finished.len()), (0, 0));
        t.on_close(C, 4, &mut rec);
        assert_eq!(t.open_connections(), 0);
    }
    // After an accept the first bytes must be a request: text that is not one is not HTTP either.
    let mut t = ConnTracker::new();
    let mut rec = Rec::default();
    t.on_accept(C, 1, &mut rec);
    t.on_ingress(C, 2, 8, b"SSH-2.0-", &mut rec);
    assert_eq!(rec.errors, vec![ParseErrorKind::NotHttp]);
}

#[test]
fn malformed_request_resynchronises() {
    let mut t = ConnTracker::new();
    let mut rec = Rec::default();
    let bad = b"POST /v1/chat/completions HTTP/1.1\r\nBad Header\r\n\r\n";
    t.on_ingress(C, 1, bad.len() as u64, bad, &mut rec);
    assert_eq!(rec.errors, vec![ParseErrorKind::BadRequest]);
    let req = post("/v1/chat/completions", CHAT_BODY);
    t.on_ingress(C, 2, req.len() as u64, &req, &mut rec);
    let resp = chat_stream_response();
    t.on_egress(C, 3, resp.len() as u64, &resp, &mut rec);
    assert_eq!((rec.only().arrival_ns, rec.only().content_events), (2, 3));
}

#[test]
fn oversize_head() {
    let big_cookie = format!("Cookie: {}\r\n", "a".repeat(request::MAX_HEAD_BYTES));
    let many_headers = "X-Filler: aaaaaaaaaaaaaaaa\r\n".repeat(200);
    for extra in [big_cookie, many_headers] {
        let mut t = ConnTracker::new();
        let mut rec = Rec::default();
        let head = format!("POST /v1/chat/completions HTTP/1.1\r\n{extra}\r\n");
        for piece in head.as_bytes().chunks(4096) {
            t.on_ingress(C, 1, piece.len() as u64, piece, &mut rec);
        }
        assert_eq!((rec.errors.clone(), rec.untracked.clone()), (vec![ParseErrorKind::HeadTooLarge], vec![C]));
        assert_eq!(t.in_flight(), 0);
    }
}

#[test]
fn mid_stream_join_of_keep_alive_connection() {
    let mut t = ConnTracker::new();
    let mut rec = Rec::default();
    // Attached in the middle of a streamed response (and of its request body before that).
    t.on_ingress(C, 1, 20, br#"": "hi"}]}"#, &mut rec);
    let tail = b"1f\r\ndata: {\"choices\":[{\"delta\":{}}]}\r\n\r\n0\r\n\r\n";
    t.on_egress(C, 2, tail.len() as u64, tail, &mut rec);
    assert!(rec.errors.is_empty() && rec.finished.is_empty());
    let req = post("/v1/chat/completions", CHAT_BODY);
    t.on_ingress(C, 10, req.len() as u64, &req, &mut rec);
    let resp = chat_stream_response();
    t.on_egress(C, 20, resp.len() as u64, &resp, &mut rec);
    let r = rec.only();
    assert_eq!((r.arrival_ns, r.content_events, r.first_token_ns, r.outcome), (10, 3, Some(20), Outcome::Ok));
    assert!(rec.errors.is_empty());
}

#[test]
fn unmatched_response_reported_once() {
    let mut t = ConnTracker::new();
    let mut rec = Rec::default();
    let resp = chat_stream_response();
    t.on_egress(C, 1, resp.len() as u64, &resp, &mut rec);
    t.on_egress(C, 2, resp.len() as u64, &resp, &mut rec);
    assert_eq!(rec.errors, vec![ParseErrorKind::UnmatchedResponse]);
    assert!(rec.finished.is_empty());
    assert_eq!(t.in_flight(), 0);
}

#[test]
fn continue_head_and_no_body_statuses() {
    let req = post("/v1/chat/completions", CHAT_BODY);
    let mut resp = b"HTTP/1.1 100 Continue\r\n\r\n".to_vec();
    resp.extend(chat_stream_response());
    assert_eq!(exchange(&req, &resp).only().content_events, 3);
    let mut t = ConnTracker::new();
    let mut rec = Rec::default();
    let mut reqs = b"HEAD /v1/models HTTP/1.1\r\n\r\n".to_vec();
    reqs.extend(post("/v1/chat/completions", CHAT_BODY));
    t.on_ingress(C, 1, reqs.len() as u64, &reqs, &mut rec);
    let mut resps = b"HTTP/1.1 200 OK\r\nContent-Length: 500\r\n\r\n".to_vec();
    resps.extend(b"HTTP/1.1 204 No Content\r\n\r\n");
    t.on_egress(C, 2, resps.len() as u64, &resps, &mut rec);
    assert_eq!((rec.only().status, rec.only().outcome, t.in_flight()), (Some(204), Outcome::Ok, 0));
}

#[test]
fn chunked_request_body() {
    let body = r#"{"model":"chunky","stream":false,"priority":5}"#;
    let (a, b) = body.split_at(10);
    let req = format!("POST /v1/completions HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{a}\r\n{:x}\r\n{b}\r\n0\r\n\r\n", a.len(), b.len());
    let mut t = ConnTracker::new();
    let mut rec = Rec::default();
    t.on_ingress(C, 1, req.len() as u64, req.as_bytes(), &mut rec);
    let (meta, _) = &rec.started[0];
    assert_eq!((meta.model.as_deref(), meta.stream, meta.priority), (Some("chunky"), Some(false), Some(5)));
    // The next request on the connection parses.
    let req2 = post("/v1/completions", body);
    t.on_ingress(C, 2, req2.len() as u64, &req2, &mut rec);
    assert_eq!((rec.started.len(), t.in_flight(), rec.errors.len()), (2, 2, 0));
}

#[test]
fn pipelining_is_bounded() {
    let mut t = ConnTracker::new();
    let mut rec = Rec::default();
    let req = get("/health");
    for i in 0..(MAX_PIPELINED as u64 + 3) {
        t.on_ingress(C, i, req.len() as u64, &req, &mut rec);
    }
    assert_eq!(t.in_flight(), MAX_PIPELINED);
    assert_eq!(rec.errors, vec![ParseErrorKind::BadRequest; 3]);
}

#[test]
fn process_exit_accept_and_eviction_reset() {
    let mut t = ConnTracker::new();
    let mut rec = Rec::default();
    half_stream(&mut t, &mut rec);
    let other = ConnId { tgid: 8, fd: 1 };
    let req = post("/v1/chat/completions", CHAT_BODY);
    t.on_ingress(other, 11, req.len() as u64, &req, &mut rec);
    t.on_process_exit(7, 99, &mut rec);
    assert_eq!((rec.only().outcome, rec.only().end_ns), (Outcome::ServerReset, 99));
    assert_eq!((t.open_connections(), t.in_flight()), (1, 1));
    t.on_accept(other, 100, &mut rec);
    assert_eq!((rec.finished.len(), rec.finished[1].outcome), (2, Outcome::ServerReset));
    assert_eq!((t.open_connections(), t.in_flight()), (1, 0));

    let mut t = ConnTracker::with_max_conns(2);
    let mut rec = Rec::default();
    for fd in 0..3u32 {
        t.on_ingress(ConnId { tgid: 1, fd }, u64::from(fd), req.len() as u64, &req, &mut rec);
    }
    assert_eq!((t.open_connections(), t.in_flight()), (2, 2));
    assert_eq!((rec.only().conn.fd, rec.only().outcome), (0, Outcome::ServerReset));
}
