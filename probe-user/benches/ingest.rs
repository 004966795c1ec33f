//! Aggregator ingestion on one core: recorded kernel records (request reads, SSE chunk writes,
//! closes) through decode → HTTP/SSE parse → request state → metric updates, exactly the agent's
//! `Ingest::handle`. Goal: ≥ 1 M events/s (1 µs per event, all in).
//!
//! Run: `cargo bench -p probe-user --bench ingest` (prints events/s; see docs/BENCHMARKS.md).
use std::{
    hint::black_box,
    sync::{Arc, Mutex},
    time::Instant,
};

use probe_common::EventHeader;
use probe_user::{
    agent::{Ingest, Targets},
    health::Health,
    http::{ConnId, ConnTracker, Gap, ParseErrorKind, RequestMeta, RequestRecord},
    metrics::{ProbeMetrics, RequestMetrics},
    record::{decode, encode_data, Event},
    requests::Recent,
};
use prometheus_client::registry::Registry;

const CONNS: u32 = 64;
const EVENTS_PER_STREAM: usize = 256;

/// Tokens of the varying input: a stream's text changes from event to event, as a model's does.
const TOKENS: [&str; 8] = [" token", " the", ",", " model", "s", " of", " é", " 42"];

/// The recorded streams; each SSE chunk's text is `tokens[event index % len]`.
fn recorded(tokens: &[&str]) -> Vec<Vec<u8>> {
    let framed: Vec<String> = tokens
        .iter()
        .map(|t| {
            let chunk = format!(
                r#"{{"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"llama-3-8b","choices":[{{"index":0,"delta":{{"content":"{t}"}},"logprobs":null,"finish_reason":null}}]}}"#
            );
            let event = format!("data: {chunk}\n\n");
            format!("{:x}\r\n{event}\r\n", event.len())
        })
        .collect();
    let body = r#"{"model":"llama-3-8b","stream":true,"max_tokens":256,"messages":[{"role":"user","content":"hello"}]}"#;
    let request = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let head =
        "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n";
    let mut out = Vec::new();
    let mut ts = 1_000_000u64;
    let mut rec = |fd: u32, egress: bool, bytes: &[u8], ts: u64| {
        let h = EventHeader {
            kind: 0,
            tgid: 42,
            tid: 42,
            _pad: 0,
            ts_ns: ts,
        };
        out.push(encode_data(h, fd, egress, bytes.len() as i64, bytes));
    };
    for fd in 0..CONNS {
        rec(100 + fd, false, request.as_bytes(), ts);
        ts += 1000;
        rec(100 + fd, true, head.as_bytes(), ts);
    }
    for i in 0..EVENTS_PER_STREAM {
        for fd in 0..CONNS {
            ts += 1000;
            rec(100 + fd, true, framed[i % framed.len()].as_bytes(), ts);
        }
    }
    for fd in 0..CONNS {
        ts += 1000;
        rec(100 + fd, true, b"e\r\ndata: [DONE]\n\n\r\n0\r\n\r\n", ts);
    }
    out
}

/// Observer that does nothing: isolates decode + HTTP/SSE parsing + connection state.
struct Null;
impl probe_user::http::Observer for Null {
    fn request_started(&mut self, _: ConnId, _: &RequestMeta, _: u64) {}
    fn first_token(&mut self, _: ConnId, _: &RequestMeta, _: u64) {}
    fn token_gap(&mut self, _: ConnId, _: &RequestMeta, _: Gap) {}
    fn request_finished(&mut self, r: RequestRecord) {
        black_box(r);
    }
    fn parse_error(&mut self, _: ConnId, _: ParseErrorKind) {}
}

fn parse_only(records: &[Vec<u8>]) -> f64 {
    let mut rates = Vec::new();
    for _ in 0..15 {
        let mut tracker = ConnTracker::new();
        let t = Instant::now();
        for r in records {
            if let Ok(Event::Data {
                header,
                fd,
                egress,
                ret,
                payload,
                ..
            }) = decode(black_box(r))
            {
                let conn = ConnId {
                    tgid: header.tgid,
                    fd,
                };
                if egress {
                    tracker.on_egress(conn, header.ts_ns, ret as u64, payload, &mut Null);
                } else {
                    tracker.on_ingress(conn, header.ts_ns, ret as u64, payload, &mut Null);
                }
            }
        }
        rates.push(records.len() as f64 / t.elapsed().as_secs_f64());
    }
    rates.sort_by(f64::total_cmp);
    rates[rates.len() / 2]
}

fn main() {
    // The same text in every event (the input of the earlier rows in docs/BENCHMARKS.md), then
    // text that changes from event to event.
    for (input, tokens) in [("same text", &TOKENS[..1]), ("varying text", &TOKENS[..])] {
        println!("input: {input}");
        run(&recorded(tokens));
    }
}

fn run(records: &[Vec<u8>]) {
    let parse = parse_only(records);
    println!(
        "ingest (decode + HTTP/SSE parse + connection state, no metrics): median {:.2} M events/s = {:.0} ns/event",
        parse / 1e6,
        1e9 / parse
    );
    let mut targets = Targets::new(Arc::new(Mutex::new(Health::default())));
    let mut rates = Vec::new();
    for _ in 0..15 {
        let mut registry = Registry::default();
        let requests = RequestMetrics::new(&mut registry);
        let probe = ProbeMetrics::new(&mut registry);
        let mut ingest = Ingest::new(requests, probe, Arc::new(Mutex::new(Recent::default())));
        let t = Instant::now();
        for r in records {
            ingest.handle(black_box(r), &mut targets);
        }
        let dt = t.elapsed().as_secs_f64();
        assert_eq!(ingest.tracker.in_flight(), 0, "every stream finished");
        rates.push(records.len() as f64 / dt);
    }
    rates.sort_by(f64::total_cmp);
    let median = rates[rates.len() / 2];
    println!(
        "ingest: {} records/iteration ({CONNS} streams x {EVENTS_PER_STREAM} SSE chunks), median {:.2} M events/s = {:.0} ns/event (min {:.2}, max {:.2} M/s); goal >= 1 M events/s: {}",
        records.len(),
        median / 1e6,
        1e9 / median,
        rates[0] / 1e6,
        rates[rates.len() - 1] / 1e6,
        if median >= 1e6 { "met" } else { "NOT met" }
    );
}
