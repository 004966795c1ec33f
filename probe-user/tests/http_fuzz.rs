//! Property tests for the HTTP connection tracker: arbitrary input never panics or times garbage,
//! and generated streaming exchanges are timed exactly, however their bytes are split into writes.
//! HTTP/1.1 first; then HTTP/2: random bytes, real frames out of order, splits and truncated
//! frames, and a generated h2c exchange of concurrent streams split into arbitrary reads.

use std::fmt::Write as _;

use loona_hpack::Encoder;
use probe_user::http::{
    conn::{h2::MAX_H2_STREAMS, MAX_PIPELINED},
    ConnId, ConnTracker, Gap, Observer, ParseErrorKind, RequestMeta, RequestRecord,
};
use proptest::prelude::*;

#[derive(Default, Debug)]
struct Rec {
    started: usize,
    first_tokens: usize,
    finished: Vec<RequestRecord>,
    errors: Vec<ParseErrorKind>,
}

impl Observer for Rec {
    fn request_started(&mut self, _: ConnId, meta: &RequestMeta, _: u64) {
        assert!(meta.endpoint.is_some(), "untimed request started: {meta:?}");
        self.started += 1;
    }
    fn first_token(&mut self, _: ConnId, meta: &RequestMeta, _: u64) {
        assert!(meta.endpoint.is_some());
        self.first_tokens += 1;
    }
    fn token_gap(&mut self, _: ConnId, meta: &RequestMeta, _: Gap) {
        assert!(meta.endpoint.is_some());
    }
    fn request_finished(&mut self, record: RequestRecord) {
        self.finished.push(record);
    }
    fn parse_error(&mut self, _: ConnId, kind: ParseErrorKind) {
        self.errors.push(kind);
    }
}

/// Fragments of real traffic, so random input reaches deep states and not only the garbage paths.
const FRAGMENTS: &[&str] = &[
    "POST /v1/chat/completions HTTP/1.1\r\nContent-Length: 27\r\n\r\n{\"model\":\"m\",\"stream\":true}",
    "POST /api/generate HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n{\"a\":\r\n2\r\n1}\r\n0\r\n\r\n",
    "GET /health HTTP/1.1\r\n\r\n",
    "HEAD /v1/models HTTP/1.1\r\n\r\n",
    "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n",
    "HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\n\r\n{\"response\":\"x\"}\n",
    "HTTP/1.1 100 Continue\r\n\r\n",
    "HTTP/1.1 503 Service Unavailable\r\nContent-Length: 3\r\n\r\nbad",
    "HTTP/1.1 101 Switching Protocols\r\n\r\n",
    "2a\r\ndata: {\"choices\":[{\"delta\":{\"content\":\"x\"}}]}\n\n\r\n",
    "data: {\"error\":\"boom\"}\n\nevent: error\n\n: ping\n\n",
    "0\r\n\r\n",
    "\r\n",
];

#[derive(Debug, Clone)]
enum Op {
    In(usize, Vec<u8>, u64),
    Out(usize, Vec<u8>, u64),
    PeerClosed(usize),
    IoError(usize, i32),
    Close(usize),
    Accept(usize),
    Exit(u32),
}

const IDS: [ConnId; 3] = [
    ConnId { tgid: 1, fd: 3 },
    ConnId { tgid: 1, fd: 4 },
    ConnId { tgid: 2, fd: 3 },
];

fn bytes() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..64),
        proptest::sample::select(FRAGMENTS).prop_map(|f| f.as_bytes().to_vec()),
        // A fragment cut somewhere: what a split write looks like.
        (
            proptest::sample::select(FRAGMENTS),
            any::<prop::sample::Index>()
        )
            .prop_map(|(f, i)| {
                let cut = i.index(f.len() + 1);
                f.as_bytes()[cut..].to_vec()
            }),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    let conn = 0..IDS.len();
    // Mostly fully captured; sometimes the kernel missed a tail.
    let missing = prop_oneof![8 => Just(0u64), 1 => 1..10_000u64];
    prop_oneof![
        8 => (conn.clone(), bytes(), missing.clone()).prop_map(|(c, b, m)| Op::In(c, b, m)),
        8 => (conn.clone(), bytes(), missing).prop_map(|(c, b, m)| Op::Out(c, b, m)),
        1 => conn.clone().prop_map(Op::PeerClosed),
        1 => (conn.clone(), prop_oneof![Just(11), Just(32), Just(104)]).prop_map(|(c, e)| Op::IoError(c, e)),
        1 => conn.clone().prop_map(Op::Close),
        1 => conn.prop_map(Op::Accept),
        1 => (1u32..3).prop_map(Op::Exit),
    ]
}

fn apply(t: &mut ConnTracker, rec: &mut Rec, ids: &[ConnId], op: Op, ts: u64) {
    match op {
        Op::In(c, b, m) => t.on_ingress(ids[c], ts, b.len() as u64 + m, &b, rec),
        Op::Out(c, b, m) => t.on_egress(ids[c], ts, b.len() as u64 + m, &b, rec),
        Op::PeerClosed(c) => t.on_peer_closed(ids[c], ts, rec),
        Op::IoError(c, e) => t.on_io_error(ids[c], ts, e, rec),
        Op::Close(c) => t.on_close(ids[c], ts, rec),
        Op::Accept(c) => t.on_accept(ids[c], ts, rec),
        Op::Exit(tgid) => t.on_process_exit(tgid, ts, rec),
    }
}

/// Closes every connection, then: nothing in flight, every timed request that started finished
/// exactly once, and no record is inconsistent.
fn all_finished(t: &mut ConnTracker, rec: &mut Rec, ids: &[ConnId]) -> Result<(), TestCaseError> {
    for &id in ids {
        t.on_close(id, u64::MAX, rec);
    }
    prop_assert_eq!(t.in_flight(), 0);
    prop_assert_eq!(rec.finished.len(), rec.started);
    for r in &rec.finished {
        prop_assert!(r.meta.endpoint.is_some());
        prop_assert!(r.content_events == 0 || r.first_token_ns.is_some());
        prop_assert!(r.first_token_ns.is_none_or(|f| f >= r.arrival_ns));
        prop_assert!(r.gaps_ns.len() as u64 <= r.content_events.saturating_sub(1));
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_input_never_panics_or_times_garbage(ops in proptest::collection::vec(op(), 0..80)) {
        let mut t = ConnTracker::new();
        let mut rec = Rec::default();
        for (i, op) in ops.into_iter().enumerate() {
            let ts = i as u64 * 1000;
            apply(&mut t, &mut rec, &IDS, op, ts);
            prop_assert!(t.in_flight() <= IDS.len() * MAX_PIPELINED);
            prop_assert!(t.open_connections() <= IDS.len());
            prop_assert!(rec.finished.len() <= rec.started);
        }
        all_finished(&mut t, &mut rec, &IDS)?;
    }
}

/// One streamed event of a generated exchange.
#[derive(Debug, Clone)]
enum Ev {
    Content(String),
    Role,
    Finish,
    KeepAlive,
}

fn event() -> impl Strategy<Value = Ev> {
    prop_oneof![
        6 => "[a-zA-Z0-9 .,!?]{1,40}".prop_map(Ev::Content),
        1 => Just(Ev::Role),
        1 => Just(Ev::Finish),
        1 => Just(Ev::KeepAlive),
    ]
}

/// Builds the response; returns it and, per content event, the index of its completing byte.
fn build_response(events: &[Ev], crlf: bool, chunked: bool) -> (Vec<u8>, Vec<usize>) {
    let nl = if crlf { "\r\n" } else { "\n" };
    let mut pieces: Vec<(String, Option<usize>)> = Vec::new();
    for ev in events {
        let text = match ev {
            Ev::Content(t) => {
                format!(r#"data: {{"choices":[{{"index":0,"delta":{{"content":"{t}"}}}}]}}{nl}"#)
            }
            Ev::Role => {
                format!(r#"data: {{"choices":[{{"index":0,"delta":{{"role":"assistant"}}}}]}}{nl}"#)
            }
            Ev::Finish => format!(
                r#"data: {{"choices":[{{"index":0,"delta":{{}},"finish_reason":"stop"}}]}}{nl}"#
            ),
            Ev::KeepAlive => format!(": keep-alive{nl}"),
        };
        // The first byte of the blank line completes the event.
        let done = matches!(ev, Ev::Content(_)).then_some(text.len());
        pieces.push((format!("{text}{nl}"), done));
    }
    pieces.push((format!("data: [DONE]{nl}{nl}"), None));
    let body_len: usize = pieces.iter().map(|(p, _)| p.len()).sum();
    let mut out = String::from("HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n");
    if chunked {
        out.push_str("Transfer-Encoding: chunked\r\n\r\n");
    } else {
        let _ = write!(out, "Content-Length: {body_len}\r\n\r\n");
    }
    let mut completing = Vec::new();
    for (p, done) in pieces {
        if chunked {
            let _ = write!(out, "{:x}\r\n", p.len());
        }
        if let Some(d) = done {
            completing.push(out.len() + d);
        }
        out.push_str(&p);
        if chunked {
            out.push_str("\r\n");
        }
    }
    if chunked {
        out.push_str("0\r\n\r\n");
    }
    (out.into_bytes(), completing)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn generated_stream_is_timed_exactly(
        events in proptest::collection::vec(event(), 0..24),
        crlf in any::<bool>(),
        chunked in any::<bool>(),
        req_cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..4),
        resp_cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..12),
        steps in proptest::collection::vec(1u64..1_000_000, 16),
    ) {
        let body = r#"{"model":"gen","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
        let req = format!("POST /v1/chat/completions HTTP/1.1\r\nContent-Length: {}\r\n\r\n{body}", body.len()).into_bytes();
        let (resp, completing) = build_response(&events, crlf, chunked);

        let mut t = ConnTracker::new();
        let mut rec = Rec::default();
        let id = IDS[0];
        let mut ts = 1_000u64;
        let mut arrival = None;
        for part in split(&req, &req_cuts) {
            arrival.get_or_insert(ts);
            t.on_ingress(id, ts, part.len() as u64, part, &mut rec);
            ts += 10;
        }
        let mut write_ts = Vec::new(); // (end index exclusive, ts)
        let mut end = 0;
        for (i, part) in split(&resp, &resp_cuts).into_iter().enumerate() {
            ts += steps[i % steps.len()];
            end += part.len();
            write_ts.push((end, ts));
            t.on_egress(id, ts, part.len() as u64, part, &mut rec);
        }
        let ts_of = |byte: usize| write_ts.iter().find(|(end, _)| byte < *end).map(|&(_, ts)| ts);

        prop_assert!(rec.errors.is_empty(), "{:?}", rec.errors);
        prop_assert_eq!(rec.finished.len(), 1);
        let r = &rec.finished[0];
        prop_assert_eq!(r.arrival_ns, arrival.unwrap_or_default());
        prop_assert_eq!(r.content_events, completing.len() as u64);
        prop_assert_eq!(r.first_token_ns, completing.first().and_then(|&b| ts_of(b)));
        prop_assert_eq!(r.gaps_ns.len(), completing.len().saturating_sub(1));
        let expected_gaps: Vec<u64> = completing
            .windows(2)
            .map(|w| ts_of(w[1]).unwrap_or_default() - ts_of(w[0]).unwrap_or_default())
            .collect();
        prop_assert_eq!(&r.gaps_ns, &expected_gaps);
        prop_assert_eq!(r.end_ns, ts);
        prop_assert_eq!(r.outcome, probe_user::http::Outcome::Ok);
        prop_assert_eq!(r.meta.model.as_deref(), Some("gen"));
        prop_assert_eq!(rec.first_tokens, usize::from(!completing.is_empty()));
        prop_assert_eq!(t.in_flight(), 0);
    }
}

/// Splits `data` at the given cut points (sorted, deduplicated), dropping empty pieces.
fn split<'a>(data: &'a [u8], cuts: &[prop::sample::Index]) -> Vec<&'a [u8]> {
    let mut at: Vec<usize> = cuts.iter().map(|i| i.index(data.len() + 1)).collect();
    at.push(0);
    at.push(data.len());
    at.sort_unstable();
    at.dedup();
    at.windows(2)
        .map(|w| &data[w[0]..w[1]])
        .filter(|p| !p.is_empty())
        .collect()
}

// HTTP/2.

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut f = (payload.len() as u32).to_be_bytes()[1..].to_vec();
    f.extend_from_slice(&[kind, flags]);
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

fn request_headers(enc: &mut Encoder<'_>, stream: u32, end: bool) -> Vec<u8> {
    let block = enc.encode([
        (&b":method"[..], &b"POST"[..]),
        (b":path", b"/v1/chat/completions"),
        (b"x-request-id", format!("r{stream}").as_bytes()),
    ]);
    frame(1, 4 | u8::from(end), stream, &block)
}

fn response_headers(enc: &mut Encoder<'_>, stream: u32, status: &[u8]) -> Vec<u8> {
    let block = enc.encode([
        (&b":status"[..], status),
        (b"content-type", b"text/event-stream"),
    ]);
    frame(1, 4, stream, &block)
}

fn content(stream: u32, end: bool) -> Vec<u8> {
    let ev = b"data: {\"choices\":[{\"delta\":{\"content\":\"x\"}}]}\n\n";
    frame(0, u8::from(end), stream, ev)
}

/// Frames of real exchanges (each header block from a fresh encoder, so reuse out of order is
/// the hostile case of a block that refers to a table entry the decoder does not have).
fn fragments() -> Vec<Vec<u8>> {
    let (mut c, mut s) = (Encoder::new(), Encoder::new());
    let mut preface = PREFACE.to_vec();
    preface.extend(frame(4, 0, 0, &[0, 3, 0, 0, 0, 100]));
    vec![
        preface,
        frame(4, 0, 0, &[0, 4, 0, 1, 0, 0]),
        request_headers(&mut c, 1, false),
        request_headers(&mut c, 3, true),
        frame(0, 1, 1, br#"{"model":"m","stream":true}"#),
        frame(0, 8 | 1, 1, &[2, b'{', b'}', 0, 0]),
        response_headers(&mut s, 1, b"200"),
        response_headers(&mut s, 3, b"503"),
        content(1, false),
        content(3, true),
        frame(3, 0, 1, &8u32.to_be_bytes()),
        frame(9, 4, 1, &[0x82]),
        frame(6, 0, 0, &[0; 8]),
        frame(7, 0, 0, &[0; 8]),
        frame(8, 0, 1, &[0, 0, 1, 0]),
        // gRPC: a call on stream 5, its head, messages (one cut in two), trailers.
        frame(
            1,
            4,
            5,
            &c.encode([
                (&b":method"[..], &b"POST"[..]),
                (b":path", b"/llm.Generator/Generate"),
                (b"content-type", b"application/grpc"),
            ]),
        ),
        frame(0, 1, 5, &[0, 0, 0, 0, 2, b'{', b'}']),
        frame(
            1,
            4,
            5,
            &s.encode([
                (&b":status"[..], &b"200"[..]),
                (b"content-type", b"application/grpc"),
            ]),
        ),
        frame(0, 0, 5, &[0, 0, 0, 0, 3, b'a', b'b', b'c', 0, 0, 0]),
        frame(0, 0, 5, &[0, 1, b'z']),
        frame(1, 5, 5, &s.encode([(&b"grpc-status"[..], &b"13"[..])])),
    ]
}

const H2_IDS: [ConnId; 2] = [ConnId { tgid: 1, fd: 3 }, ConnId { tgid: 1, fd: 4 }];

fn h2_bytes() -> impl Strategy<Value = Vec<u8>> {
    let frags = fragments();
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..48),
        proptest::sample::select(frags.clone()),
        // A fragment cut at both ends: a split read, a truncated frame.
        (
            proptest::sample::select(frags),
            any::<prop::sample::Index>(),
            any::<prop::sample::Index>()
        )
            .prop_map(|(f, a, b)| {
                let (a, b) = (a.index(f.len() + 1), b.index(f.len() + 1));
                f[a.min(b)..a.max(b)].to_vec()
            }),
    ]
}

fn h2_op() -> impl Strategy<Value = Op> {
    let conn = 0..H2_IDS.len();
    let missing = prop_oneof![8 => Just(0u64), 1 => 1..5_000u64];
    prop_oneof![
        8 => (conn.clone(), h2_bytes(), missing.clone()).prop_map(|(c, b, m)| Op::In(c, b, m)),
        8 => (conn.clone(), h2_bytes(), missing).prop_map(|(c, b, m)| Op::Out(c, b, m)),
        1 => conn.clone().prop_map(Op::PeerClosed),
        1 => conn.clone().prop_map(Op::Close),
        1 => conn.prop_map(Op::Accept),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn h2_garbage_never_panics_or_times_garbage(
        ops in proptest::collection::vec(h2_op(), 0..60),
        start_with_preface in any::<bool>(),
    ) {
        let mut t = ConnTracker::new();
        let mut rec = Rec::default();
        if start_with_preface {
            // Most ops then land on a connection already in HTTP/2.
            for id in H2_IDS {
                t.on_ingress(id, 0, PREFACE.len() as u64, PREFACE, &mut rec);
            }
        }
        for (i, op) in ops.into_iter().enumerate() {
            let ts = 1 + i as u64 * 1000;
            apply(&mut t, &mut rec, &H2_IDS, op, ts);
            prop_assert!(t.in_flight() <= H2_IDS.len() * MAX_H2_STREAMS);
            prop_assert!(rec.finished.len() <= rec.started);
        }
        all_finished(&mut t, &mut rec, &H2_IDS)?;
    }

    #[test]
    fn generated_h2_exchange_is_timed_exactly(
        events in proptest::collection::vec(1u64..6, 1..6),
        cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..8),
    ) {
        let (mut c, mut s) = (Encoder::new(), Encoder::new());
        let streams: Vec<u32> = (0..events.len() as u32).map(|i| 1 + 2 * i).collect();
        let mut client = PREFACE.to_vec();
        client.extend(frame(4, 0, 0, &[]));
        for &id in &streams {
            client.extend(request_headers(&mut c, id, false));
            client.extend(frame(0, 1, id, br#"{"model":"m","stream":true}"#));
        }
        let mut t = ConnTracker::new();
        let mut rec = Rec::default();
        let id = H2_IDS[0];
        t.on_accept(id, 0, &mut rec);
        let mut cut: Vec<usize> = cuts.iter().map(|i| i.index(client.len())).collect();
        cut.push(0);
        cut.push(client.len());
        cut.sort_unstable();
        cut.dedup();
        for w in cut.windows(2) {
            let b = &client[w[0]..w[1]];
            t.on_ingress(id, 10, b.len() as u64, b, &mut rec);
        }
        prop_assert_eq!(rec.started, streams.len());
        // Responses interleaved round-robin, one frame per write at ts 100, 200, …
        let mut ts = 0;
        let mut write = |t: &mut ConnTracker, rec: &mut Rec, b: &[u8]| {
            ts += 100;
            t.on_egress(id, ts, b.len() as u64, b, rec);
            ts
        };
        let mut first = vec![0u64; streams.len()];
        for (i, &sid) in streams.iter().enumerate() {
            write(&mut t, &mut rec, &response_headers(&mut s, sid, b"200"));
            first[i] = write(&mut t, &mut rec, &content(sid, events[i] == 1));
        }
        let mut sent = vec![1u64; streams.len()];
        while sent.iter().zip(&events).any(|(s, e)| s < e) {
            for (i, &sid) in streams.iter().enumerate() {
                if sent[i] < events[i] {
                    sent[i] += 1;
                    write(&mut t, &mut rec, &content(sid, sent[i] == events[i]));
                }
            }
        }
        prop_assert!(rec.errors.is_empty(), "{:?}", rec.errors);
        prop_assert_eq!(rec.finished.len(), streams.len());
        for r in &rec.finished {
            let sid: u32 = r.meta.request_id.as_deref().unwrap()[1..].parse().unwrap();
            let i = streams.iter().position(|&s| s == sid).unwrap();
            prop_assert_eq!(r.content_events, events[i]);
            prop_assert_eq!(r.first_token_ns, Some(first[i]));
            prop_assert_eq!(r.arrival_ns, 10);
            prop_assert_eq!(r.meta.model.as_deref(), Some("m"));
        }
    }
}

/// gRPC method labels are a bounded set: any number of distinct paths (a client can send any)
/// give at most `MAX_GRPC_METHODS` named labels plus `grpc_other`, and an admitted path keeps its
/// label. (Its own test process: the set is process-wide.)
#[test]
fn grpc_method_labels_are_bounded() {
    use probe_user::http::grpc::{method_endpoint, MAX_GRPC_METHODS};
    let first = method_endpoint(b"/a.B/First");
    let labels: std::collections::HashSet<&str> = (0..200)
        .map(|i| method_endpoint(format!("/svc.S/M{i}").as_bytes()).as_str())
        .collect();
    assert!(labels.len() <= MAX_GRPC_METHODS + 1, "{}", labels.len());
    assert!(labels.contains("grpc_other"));
    assert_eq!(method_endpoint(b"/a.B/First").as_str(), "/a.B/First");
    assert_eq!(method_endpoint(b"/a.B/First"), first);
}
