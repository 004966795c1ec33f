//! Connection lifecycle: aborts, closes, resets, resynchronisation and limits.

use super::*;
use crate::http::request;

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
    assert_eq!(
        (r.outcome, r.end_ns, r.content_events, r.status),
        (Outcome::ClientAbort, 30, 1, Some(200))
    );
    // The server goes on writing until it notices; nothing more is reported.
    let more = sse(&[&delta("z")]).concat();
    t.on_egress(C, 40, more.len() as u64, more.as_bytes(), &mut rec);
    t.on_close(C, 50, &mut rec);
    assert_eq!(
        (rec.finished.len(), rec.errors.len(), t.open_connections()),
        (1, 0, 0)
    );

    let mut t = ConnTracker::new();
    let mut rec = Rec::default();
    half_stream(&mut t, &mut rec);
    t.on_io_error(C, 25, 11, &mut rec); // EAGAIN: not a client event
    assert!(rec.finished.is_empty());
    t.on_io_error(C, 26, 32, &mut rec); // EPIPE
    assert_eq!(
        (rec.only().outcome, rec.only().end_ns),
        (Outcome::ClientAbort, 26)
    );
}

#[test]
fn server_close_mid_stream() {
    let mut t = ConnTracker::new();
    let mut rec = Rec::default();
    half_stream(&mut t, &mut rec);
    t.on_close(C, 30, &mut rec);
    let r = rec.only();
    assert_eq!(
        (r.outcome, r.end_ns, r.content_events),
        (Outcome::ServerReset, 30, 1)
    );
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
    let req = post(
        "/v1/completions",
        r#"{"model":"m","prompt":"p","stream":true}"#,
    );
    t.on_ingress(C, 1, req.len() as u64, &req, &mut rec);
    let resp = format!(
        "HTTP/1.0 200 OK\r\nContent-Type: text/event-stream\r\n\r\n{}",
        sse(&[r#"{"choices":[{"text":"a"}]}"#]).concat()
    );
    t.on_egress(C, 2, resp.len() as u64, resp.as_bytes(), &mut rec);
    assert!(rec.finished.is_empty());
    t.on_close(C, 3, &mut rec);
    let r = rec.only();
    assert_eq!(
        (r.outcome, r.end_ns, r.content_events, r.first_token_ns),
        (Outcome::Ok, 3, 1, Some(2))
    );
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
    assert_eq!(
        (rec.finished[0].outcome, rec.finished[0].end_ns),
        (Outcome::Ok, 31)
    );
    assert_eq!(
        (
            rec.finished[1].content_events,
            rec.finished[1].first_token_ns
        ),
        (3, Some(50))
    );
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
    assert_eq!(
        (r.meta.endpoint, r.content_events),
        (Some(Endpoint::ChatCompletions), 3)
    );
    assert_eq!((t.in_flight(), rec.ttfts.len()), (0, 1));
    assert!(rec.errors.is_empty());
    // A CORS preflight to an LLM path is not an inference request.
    let rec = exchange(
        b"OPTIONS /v1/chat/completions HTTP/1.1\r\n\r\n",
        b"HTTP/1.1 204 No Content\r\n\r\n",
    );
    assert!(rec.finished.is_empty() && rec.started.is_empty());
}

#[test]
fn garbage_is_not_http() {
    for first in [
        &b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"[..],
        b"\x00\x00\x12\x04\x00",
    ] {
        let mut t = ConnTracker::new();
        let mut rec = Rec::default();
        t.on_ingress(C, 1, first.len() as u64, first, &mut rec);
        t.on_ingress(C, 2, 5, b"POST ", &mut rec);
        t.on_egress(C, 3, 4, b"\x17\x03\x03\x00", &mut rec);
        assert_eq!(
            (rec.errors.clone(), rec.untracked.clone()),
            (vec![ParseErrorKind::NotHttp], vec![C])
        );
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
        assert_eq!(
            (rec.errors.clone(), rec.untracked.clone()),
            (vec![ParseErrorKind::HeadTooLarge], vec![C])
        );
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
    assert_eq!(
        (r.arrival_ns, r.content_events, r.first_token_ns, r.outcome),
        (10, 3, Some(20), Outcome::Ok)
    );
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
    assert_eq!(
        (rec.only().status, rec.only().outcome, t.in_flight()),
        (Some(204), Outcome::Ok, 0)
    );
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
    assert_eq!(
        (meta.model.as_deref(), meta.stream, meta.priority),
        (Some("chunky"), Some(false), Some(5))
    );
    // The next request on the connection parses.
    let req2 = post("/v1/completions", body);
    t.on_ingress(C, 2, req2.len() as u64, &req2, &mut rec);
    assert_eq!(
        (rec.started.len(), t.in_flight(), rec.errors.len()),
        (2, 2, 0)
    );
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
    assert_eq!(
        (rec.only().outcome, rec.only().end_ns),
        (Outcome::ServerReset, 99)
    );
    assert_eq!((t.open_connections(), t.in_flight()), (1, 1));
    t.on_accept(other, 100, &mut rec);
    assert_eq!(
        (rec.finished.len(), rec.finished[1].outcome),
        (2, Outcome::ServerReset)
    );
    assert_eq!((t.open_connections(), t.in_flight()), (1, 0));

    let mut t = ConnTracker::with_max_conns(2);
    let mut rec = Rec::default();
    for fd in 0..3u32 {
        t.on_ingress(
            ConnId { tgid: 1, fd },
            u64::from(fd),
            req.len() as u64,
            &req,
            &mut rec,
        );
    }
    assert_eq!((t.open_connections(), t.in_flight()), (2, 2));
    assert_eq!(
        (rec.only().conn.fd, rec.only().outcome),
        (0, Outcome::ServerReset)
    );
}

/// At the cap, a connection not used since it was queued is evicted before any that was (second
/// chance); closed connections leave nothing behind in the eviction order.
#[test]
fn eviction_takes_the_least_recently_used() {
    let mut t = ConnTracker::with_max_conns(100);
    let mut rec = Rec::default();
    let c = |fd| ConnId { tgid: 1, fd };
    for fd in 0..100 {
        t.on_accept(c(fd), u64::from(fd), &mut rec);
    }
    // Use every connection but 37 again, in reverse order; close 5 and reopen them.
    for fd in (0..100).rev().filter(|&fd| fd != 37) {
        t.on_ingress(c(fd), 200, 1, b"G", &mut rec);
    }
    for fd in 90..95 {
        t.on_close(c(fd), 300, &mut rec);
        t.on_accept(c(fd), 301, &mut rec);
    }
    t.on_accept(c(1000), 400, &mut rec);
    assert_eq!(t.open_connections(), 100);
    assert!(
        !t.conns.contains_key(&c(37)),
        "37 was the only one never used again"
    );
    // The next victims are connections not used since they were (re)queued: the reopened ones.
    for (i, fd) in (1001..1006).enumerate() {
        t.on_accept(c(fd), 401 + i as u64, &mut rec);
    }
    assert!((90..95).all(|fd| !t.conns.contains_key(&c(fd))));
    assert!((0..90)
        .filter(|&fd| fd != 37)
        .all(|fd| t.conns.contains_key(&c(fd))));
    // Churn at the cap keeps the queue bounded.
    for fd in 2000..12_000 {
        t.on_accept(c(fd), 500, &mut rec);
        t.on_close(c(fd), 501, &mut rec);
    }
    assert!(
        t.lru.len() <= 2 * t.conns.len() + 1025,
        "{} queued",
        t.lru.len()
    );
}

#[test]
fn read_and_first_token_moments_reach_the_record() {
    use crate::http::{Moment, ThreadClock};
    let at = |ts_ns, on_cpu_ns| Moment {
        ts_ns,
        tid: 9,
        clock: ThreadClock {
            on_cpu_ns,
            ..ThreadClock::default()
        },
    };
    let mut t = ConnTracker::new();
    let mut rec = Rec::default();
    let req = post("/v1/chat/completions", CHAT_BODY);
    // Bytes arrived at 10, read at 15 (the ingress call is dated by arrival).
    t.set_io(at(15, 1));
    t.on_ingress(C, 10, req.len() as u64, &req, &mut rec);
    let resp = chat_stream_response();
    let cut = completing_byte(&resp, "Hel") + 1;
    // The headers and role event at 20 carry no content; the first content event is at 30.
    t.set_io(at(20, 6));
    t.on_egress(C, 20, 40, &resp[..40], &mut rec);
    t.set_io(at(30, 16));
    t.on_egress(C, 30, (cut - 40) as u64, &resp[40..cut], &mut rec);
    // The second content event, written at 35: a gap whose ends are both moments of thread 9.
    let cut2 = completing_byte(&resp, "lo") + 1;
    t.set_io(at(35, 19));
    t.on_egress(C, 35, (cut2 - cut) as u64, &resp[cut..cut2], &mut rec);
    // A call without `set_io` has no thread: the moment set before is not reused.
    t.on_egress(C, 40, (resp.len() - cut2) as u64, &resp[cut2..], &mut rec);
    let r = rec.only();
    assert_eq!(
        (r.arrival_ns, r.read, r.first_token_ns),
        (10, at(15, 1), Some(30))
    );
    assert_eq!(r.first_token_at, Some(at(30, 16)));
    let no_thread = Moment {
        ts_ns: 40,
        ..Moment::default()
    };
    assert_eq!(
        rec.gap_ends
            .iter()
            .map(|g| (g.from, g.to))
            .collect::<Vec<_>>(),
        [(at(30, 16), at(35, 19)), (at(35, 19), no_thread)]
    );
}

#[test]
fn a_request_is_dated_by_the_arrival_of_its_first_byte() {
    use crate::http::ReadArrival;
    let mut t = ConnTracker::new();
    let mut rec = Rec::default();
    // Three requests in one read (at 20): the first and the start of the second reached the
    // socket at 10, the rest of the second at 14, the third at 16.
    let one = post("/v1/chat/completions", CHAT_BODY);
    let n = one.len() as u32;
    let three = [one.clone(), one.clone(), one.clone()].concat();
    let parts = [(n + 5, 10), (2 * n, 14), (3 * n, 16)];
    t.set_arrival_parts(ReadArrival::parts(10, 20, parts));
    t.on_ingress(C, 10, three.len() as u64, &three, &mut rec);
    // Parts of another read are not used (their first arrival is not this read's).
    t.set_arrival_parts(ReadArrival::parts(11, 40, [(1, 11), (n, 39)]));
    t.on_ingress(C, 30, one.len() as u64, &one, &mut rec);
    // Times outside first ..= read are kept within it; past every part, the last part's.
    let two = [one.clone(), one.clone()].concat();
    t.set_arrival_parts(ReadArrival::parts(50, 60, [(1, 40), (n - 1, 70)]));
    t.on_ingress(C, 50, two.len() as u64, &two, &mut rec);
    assert_eq!(
        rec.started.iter().map(|s| s.1).collect::<Vec<_>>(),
        [10, 10, 16, 30, 50, 60]
    );
}
