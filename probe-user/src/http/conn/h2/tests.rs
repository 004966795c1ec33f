//! HTTP/2 exchanges fed as the kernel reports them: h2c from the preface, the server speaking
//! first, concurrent streams, cancellation, resets, and what cannot be followed.

use loona_hpack::Encoder;

use super::super::tests::{Rec, C};
use crate::http::{
    h2::{tests::frame, PREFACE},
    ConnTracker, Endpoint, Outcome, ParseErrorKind, ReadArrival,
};

const DATA: u8 = 0;
const HEADERS: u8 = 1;
const RST: u8 = 3;
const SETTINGS: u8 = 4;
const END_STREAM: u8 = 1;
const END_HEADERS: u8 = 4;

fn settings() -> Vec<u8> {
    frame(SETTINGS, 0, 0, &[0, 3, 0, 0, 0, 100])
}

/// A client request's HEADERS (and body DATA when `body` is given).
fn request(
    enc: &mut Encoder<'_>,
    stream: u32,
    path: &str,
    id: &str,
    body: Option<&str>,
) -> Vec<u8> {
    let block = enc.encode([
        (&b":method"[..], &b"POST"[..]),
        (b":scheme", b"http"),
        (b":path", path.as_bytes()),
        (b":authority", b"localhost"),
        (b"content-type", b"application/json"),
        (b"x-request-id", id.as_bytes()),
    ]);
    let flags = END_HEADERS | if body.is_none() { END_STREAM } else { 0 };
    let mut b = frame(HEADERS, flags, stream, &block);
    if let Some(body) = body {
        b.extend(frame(DATA, END_STREAM, stream, body.as_bytes()));
    }
    b
}

fn response_head(
    enc: &mut Encoder<'_>,
    stream: u32,
    status: &str,
    ctype: &str,
    end: bool,
) -> Vec<u8> {
    let block = enc.encode([
        (&b":status"[..], status.as_bytes()),
        (b"content-type", ctype.as_bytes()),
    ]);
    frame(
        HEADERS,
        END_HEADERS | if end { END_STREAM } else { 0 },
        stream,
        &block,
    )
}

fn sse(stream: u32, text: &str, end: bool) -> Vec<u8> {
    let ev = format!("data: {{\"choices\":[{{\"delta\":{{\"content\":\"{text}\"}}}}]}}\n\n");
    frame(
        DATA,
        if end { END_STREAM } else { 0 },
        stream,
        ev.as_bytes(),
    )
}

fn input(t: &mut ConnTracker, rec: &mut Rec, ts: u64, b: &[u8]) {
    t.on_ingress(C, ts, b.len() as u64, b, rec);
}

fn output(t: &mut ConnTracker, rec: &mut Rec, ts: u64, b: &[u8]) {
    t.on_egress(C, ts, b.len() as u64, b, rec);
}

#[test]
fn h2c_streams_are_timed_like_http1_requests() {
    let (mut t, mut rec) = (ConnTracker::new(), Rec::default());
    let (mut cenc, mut senc) = (Encoder::new(), Encoder::new());
    t.on_accept(C, 0, &mut rec);
    // The server speaks first (Node does), then the client's preface and two concurrent streams.
    output(&mut t, &mut rec, 1, &settings());
    let mut b = PREFACE.to_vec();
    b.extend(settings());
    b.extend(request(
        &mut cenc,
        1,
        "/v1/chat/completions",
        "a",
        Some(r#"{"model":"m1","stream":true}"#),
    ));
    input(&mut t, &mut rec, 100, &b);
    input(
        &mut t,
        &mut rec,
        150,
        &request(
            &mut cenc,
            3,
            "/v1/completions",
            "b",
            Some(r#"{"model":"m2"}"#),
        ),
    );
    assert_eq!(rec.started.len(), 2);
    assert_eq!(t.in_flight(), 2);
    // Interleaved responses: stream 3 answers with one JSON body, stream 1 streams SSE.
    output(
        &mut t,
        &mut rec,
        200,
        &response_head(&mut senc, 1, "200", "text/event-stream", false),
    );
    output(&mut t, &mut rec, 300, &sse(1, "x", false));
    let mut j = response_head(&mut senc, 3, "200", "application/json", false);
    j.extend(frame(
        DATA,
        END_STREAM,
        3,
        br#"{"choices":[{"text":"hi"}],"usage":{"completion_tokens":2}}"#,
    ));
    output(&mut t, &mut rec, 350, &j);
    output(&mut t, &mut rec, 420, &sse(1, "y", false));
    let mut end = sse(1, "z", false);
    end.extend(frame(DATA, END_STREAM, 1, b"data: [DONE]\n\n"));
    output(&mut t, &mut rec, 500, &end);
    assert_eq!(rec.finished.len(), 2, "{rec:#?}");
    let b3 = &rec.finished[0];
    assert_eq!(
        (b3.meta.request_id.as_deref(), b3.meta.endpoint),
        (Some("b"), Some(Endpoint::Completions))
    );
    assert_eq!(
        (b3.first_token_ns, b3.completion_tokens, b3.outcome),
        (Some(350), Some(2), Outcome::Ok)
    );
    assert_eq!(b3.arrival_ns, 150);
    let a = &rec.finished[1];
    assert_eq!(a.meta.model.as_deref(), Some("m1"));
    assert_eq!(a.meta.stream, Some(true));
    assert_eq!(
        (a.arrival_ns, a.first_token_ns, a.end_ns),
        (100, Some(300), 500)
    );
    assert_eq!(a.gaps_ns, vec![120, 80]);
    assert_eq!((a.status, a.content_events), (Some(200), 3));
    assert!(rec.errors.is_empty(), "{:?}", rec.errors);
    assert_eq!(t.in_flight(), 0);
}

#[test]
fn a_stream_is_dated_by_the_arrival_of_its_headers() {
    let (mut t, mut rec) = (ConnTracker::new(), Rec::default());
    let mut cenc = Encoder::new();
    t.on_accept(C, 0, &mut rec);
    // A fresh connection whose server read late: the preface and SETTINGS reached the socket at
    // 100, the request written after them at 140, the client's SETTINGS ACK at 160, and one read
    // took all of it.
    let mut b = PREFACE.to_vec();
    b.extend(settings());
    let conn_frames = b.len() as u32;
    b.extend(request(&mut cenc, 1, "/v1/completions", "a", None));
    let with_request = b.len() as u32;
    b.extend(frame(SETTINGS, 1, 0, &[]));
    let parts = [
        (conn_frames, 100),
        (with_request, 140),
        (b.len() as u32, 160),
    ];
    t.set_arrival_parts(ReadArrival::parts(100, 170, parts));
    input(&mut t, &mut rec, 100, &b);
    // Two streams in one read, in two arrivals.
    let mut b = request(&mut cenc, 3, "/v1/completions", "b", None);
    let first = b.len() as u32;
    b.extend(request(&mut cenc, 5, "/v1/completions", "c", None));
    t.set_arrival_parts(ReadArrival::parts(
        200,
        240,
        [(first, 200), (b.len() as u32, 230)],
    ));
    input(&mut t, &mut rec, 200, &b);
    // Without a last arrival (unknown), the read's first.
    let mut b = settings();
    b.extend(request(&mut cenc, 7, "/v1/completions", "d", None));
    input(&mut t, &mut rec, 300, &b);
    assert_eq!(
        rec.started
            .iter()
            .map(|(m, at)| (m.request_id.clone().unwrap_or_default(), *at))
            .collect::<Vec<_>>(),
        [
            ("a".to_owned(), 140),
            ("b".to_owned(), 200),
            ("c".to_owned(), 230),
            ("d".to_owned(), 300)
        ]
    );
}

#[test]
fn resets_and_errors_end_their_stream_only() {
    let (mut t, mut rec) = (ConnTracker::new(), Rec::default());
    let (mut cenc, mut senc) = (Encoder::new(), Encoder::new());
    let mut b = PREFACE.to_vec();
    for s in [1, 3, 5] {
        b.extend(request(
            &mut cenc,
            s,
            "/v1/chat/completions",
            &format!("r{s}"),
            Some("{}"),
        ));
    }
    input(&mut t, &mut rec, 10, &b);
    output(
        &mut t,
        &mut rec,
        20,
        &response_head(&mut senc, 1, "200", "text/event-stream", false),
    );
    output(&mut t, &mut rec, 30, &sse(1, "x", false));
    // The client cancels stream 1; the server resets stream 3; stream 5 gets a 503.
    input(&mut t, &mut rec, 40, &frame(RST, 0, 1, &8u32.to_be_bytes()));
    output(&mut t, &mut rec, 50, &frame(RST, 0, 3, &2u32.to_be_bytes()));
    output(
        &mut t,
        &mut rec,
        60,
        &response_head(&mut senc, 5, "503", "application/json", true),
    );
    let got: Vec<_> = rec
        .finished
        .iter()
        .map(|r| (r.meta.request_id.clone().unwrap(), r.outcome))
        .collect();
    assert_eq!(
        got,
        vec![
            ("r1".into(), Outcome::ClientAbort),
            ("r3".into(), Outcome::ServerReset),
            ("r5".into(), Outcome::ServerError),
        ]
    );
    // A new stream after that is still followed; the client closing ends it as an abort.
    input(
        &mut t,
        &mut rec,
        70,
        &request(&mut cenc, 7, "/v1/chat/completions", "r7", None),
    );
    t.on_peer_closed(C, 80, &mut rec);
    assert_eq!(
        rec.finished.last().map(|r| r.outcome),
        Some(Outcome::ClientAbort)
    );
    assert!(rec.errors.is_empty());
}

#[test]
fn what_cannot_be_followed_drops_the_connection() {
    // A header block that is not HPACK (index 0 is invalid).
    let (mut t, mut rec) = (ConnTracker::new(), Rec::default());
    let mut b = PREFACE.to_vec();
    b.extend(frame(HEADERS, END_HEADERS, 1, &[0x80]));
    input(&mut t, &mut rec, 1, &b);
    assert_eq!(
        (rec.errors.clone(), rec.untracked.clone()),
        (vec![ParseErrorKind::BadH2], vec![C])
    );
    // A request head cut by the capture: HPACK is out of step from there.
    let (mut t, mut rec) = (ConnTracker::new(), Rec::default());
    let mut b = PREFACE.to_vec();
    b.extend(request(
        &mut Encoder::new(),
        1,
        "/v1/chat/completions",
        "a",
        None,
    ));
    t.on_ingress(C, 1, b.len() as u64 + 10, &b[..b.len() - 10], &mut rec);
    assert_eq!(rec.errors, vec![ParseErrorKind::TruncatedCapture]);
    assert!(rec
        .finished
        .iter()
        .all(|r| r.outcome == Outcome::ServerReset));
    // A wrong preface after the server's SETTINGS.
    let (mut t, mut rec) = (ConnTracker::new(), Rec::default());
    t.on_accept(C, 0, &mut rec);
    output(&mut t, &mut rec, 1, &settings());
    input(&mut t, &mut rec, 2, b"GET / HTTP/1.1\r\n\r\n");
    assert_eq!(rec.errors, vec![ParseErrorKind::BadH2]);
}

fn grpc_call(enc: &mut Encoder<'_>, stream: u32, id: &str) -> Vec<u8> {
    let block = enc.encode([
        (&b":method"[..], &b"POST"[..]),
        (b":scheme", b"http"),
        (b":path", b"/llm.Generator/Generate"),
        (b"content-type", b"application/grpc"),
        (b"te", b"trailers"),
        (b"x-request-id", id.as_bytes()),
    ]);
    let mut b = frame(HEADERS, END_HEADERS, stream, &block);
    let msg = br#"{"model":"m9","n":3}"#;
    let mut body = vec![0];
    body.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    body.extend_from_slice(msg);
    b.extend(frame(DATA, END_STREAM, stream, &body));
    b
}

fn grpc_message(text: &[u8]) -> Vec<u8> {
    let mut m = vec![0];
    m.extend_from_slice(&(text.len() as u32).to_be_bytes());
    m.extend_from_slice(text);
    m
}

fn trailers(enc: &mut Encoder<'_>, stream: u32, status: &str, head: bool) -> Vec<u8> {
    let mut fields = vec![];
    if head {
        fields.push((&b":status"[..], &b"200"[..]));
        fields.push((b"content-type", b"application/grpc"));
    }
    fields.push((b"grpc-status", status.as_bytes()));
    let block = enc.encode(fields);
    frame(HEADERS, END_HEADERS | END_STREAM, stream, &block)
}

#[test]
fn grpc_messages_are_tokens_and_grpc_status_the_outcome() {
    let (mut t, mut rec) = (ConnTracker::new(), Rec::default());
    let (mut cenc, mut senc) = (Encoder::new(), Encoder::new());
    let mut b = PREFACE.to_vec();
    for (s, id) in [(1, "ok"), (3, "internal"), (5, "not-found")] {
        b.extend(grpc_call(&mut cenc, s, id));
    }
    input(&mut t, &mut rec, 10, &b);
    assert_eq!(rec.started.len(), 3);
    assert_eq!(rec.started[0].0.model.as_deref(), Some("m9"));
    output(
        &mut t,
        &mut rec,
        20,
        &response_head(&mut senc, 1, "200", "application/grpc", false),
    );
    // Three messages: one whole, one split across two frames and writes, one empty.
    let m1 = grpc_message(b"tok1");
    let m2 = grpc_message(b"token two");
    output(&mut t, &mut rec, 30, &frame(DATA, 0, 1, &m1));
    output(&mut t, &mut rec, 40, &frame(DATA, 0, 1, &m2[..7]));
    output(&mut t, &mut rec, 55, &frame(DATA, 0, 1, &m2[7..]));
    output(&mut t, &mut rec, 70, &frame(DATA, 0, 1, &grpc_message(b"")));
    output(&mut t, &mut rec, 80, &trailers(&mut senc, 1, "0", false));
    // A stream that fails after its head, and a trailers-only answer.
    output(
        &mut t,
        &mut rec,
        90,
        &response_head(&mut senc, 3, "200", "application/grpc", false),
    );
    output(&mut t, &mut rec, 95, &trailers(&mut senc, 3, "13", false));
    output(&mut t, &mut rec, 99, &trailers(&mut senc, 5, "5", true));
    let ok = &rec.finished[0];
    assert_eq!(
        ok.meta.endpoint.map(Endpoint::as_str),
        Some("/llm.Generator/Generate")
    );
    assert_eq!((ok.outcome, ok.content_events), (Outcome::Ok, 3));
    assert_eq!((ok.first_token_ns, ok.end_ns), (Some(30), 80));
    assert_eq!(ok.gaps_ns, vec![25, 15]);
    let outcomes: Vec<_> = rec.finished.iter().map(|r| r.outcome).collect();
    assert_eq!(
        outcomes,
        vec![Outcome::Ok, Outcome::ServerError, Outcome::ClientError]
    );
    assert!(rec.errors.is_empty(), "{:?}", rec.errors);
}

#[test]
fn a_connection_joined_mid_stream_is_counted_as_such() {
    for egress in [false, true] {
        let (mut t, mut rec) = (ConnTracker::new(), Rec::default());
        let b = if egress {
            frame(DATA, 0, 3, b"data: {}\n\n")
        } else {
            request(&mut Encoder::new(), 9, "/v1/chat/completions", "x", None)
        };
        if egress {
            output(&mut t, &mut rec, 1, &b);
        } else {
            input(&mut t, &mut rec, 1, &b);
        }
        assert_eq!(rec.errors, vec![ParseErrorKind::H2Midstream]);
        assert_eq!(rec.untracked, vec![C]);
        assert!(rec.started.is_empty());
    }
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig {
        cases: 2048,
        ..proptest::prelude::ProptestConfig::default()
    })]

    /// Any header block, however hostile, decodes or fails: never a panic, never an unbounded
    /// value (the decoder is the one a connection keeps, so its table carries over).
    #[test]
    fn any_header_block_decodes_or_fails(blocks in proptest::collection::vec(
        proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64), 1..8)) {
        let mut d = super::H2::new().rx_hpack;
        for b in blocks {
            if let Some(f) = super::decode(&mut d, &b) {
                proptest::prop_assert!(f.content_type.len() <= 256);
                proptest::prop_assert!(f.path.as_ref().is_none_or(|p| p.len() <= 256));
                proptest::prop_assert!(f.request_id.as_ref().is_none_or(|r| r.len() <= 128));
            }
        }
    }
}
