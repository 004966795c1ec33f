//! A load client that measures what a user feels, independently of the probe: its own HTTP/1.1
//! framing and SSE/NDJSON handling (no code shared with probe-user), `CLOCK_MONOTONIC` timestamps
//! (probe-common's clock, the one the kernel stamps with) taken as each read returns. Content
//! events are counted the way benchmarking clients count them (vLLM's `benchmark_serving)`: an
//! event with non-empty generated text.

use std::time::Duration;

use probe_common::clock::monotonic_ns;
use serde::Serialize;
use serde_json::Value;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
};

/// One request as the client saw it.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Sample {
    pub request_id: String,
    pub status: u16,
    pub start_ns: u64,
    pub ttft_ns: Option<u64>,
    pub gaps_ns: Vec<u64>,
    pub content_events: u64,
    pub duration_ns: u64,
    /// The client gave up on purpose after this many content events (abort tests).
    pub aborted: bool,
    pub error: Option<String>,
}

#[derive(Clone, Debug)]
pub struct Req {
    pub path: String,
    pub body: String,
    pub request_id: String,
    /// Close the connection after this many content events (a client abort).
    pub abort_after: Option<u64>,
    pub timeout: Duration,
}

/// True when a streamed JSON event carries generated content.
pub fn is_content(v: &Value) -> bool {
    let nonempty = |x: &Value| x.as_str().is_some_and(|s| !s.is_empty());
    if let Some(choices) = v.get("choices").and_then(Value::as_array) {
        return choices.iter().any(|c| {
            nonempty(&c["text"])
                || nonempty(&c["delta"]["content"])
                || nonempty(&c["delta"]["reasoning_content"])
                || c["delta"]["tool_calls"]
                    .as_array()
                    .is_some_and(|a| !a.is_empty())
                || nonempty(&c["message"]["content"])
        });
    }
    if v.get("token").is_some() {
        return nonempty(&v["token"]["text"]) && v["token"]["special"] != Value::Bool(true);
    }
    nonempty(&v["response"]) || nonempty(&v["message"]["content"]) || nonempty(&v["content"])
}

/// Incremental de-chunker + event splitter over the response body.
#[derive(Default)]
struct Body {
    chunked: bool,
    raw: Vec<u8>,
    decoded: Vec<u8>,
    done: bool,
    content_length: Option<usize>,
    seen: usize,
}

impl Body {
    fn push(&mut self, bytes: &[u8]) {
        if !self.chunked {
            self.seen += bytes.len();
            self.decoded.extend_from_slice(bytes);
            if self.content_length.is_some_and(|n| self.seen >= n) {
                self.done = true;
            }
            return;
        }
        self.raw.extend_from_slice(bytes);
        loop {
            let Some(eol) = self.raw.windows(2).position(|w| w == b"\r\n") else {
                return;
            };
            let line = String::from_utf8_lossy(&self.raw[..eol]).to_string();
            let size_str = line.split(';').next().unwrap_or("").trim();
            let Ok(size) = usize::from_str_radix(size_str, 16) else {
                self.done = true;
                return;
            };
            if size == 0 {
                self.done = true;
                return;
            }
            if self.raw.len() < eol + 2 + size + 2 {
                return;
            }
            self.decoded
                .extend_from_slice(&self.raw[eol + 2..eol + 2 + size]);
            self.raw.drain(..eol + 2 + size + 2);
        }
    }
}

/// Run one request on a fresh connection.
pub async fn run(addr: &str, req: &Req) -> Sample {
    let mut s = Sample {
        request_id: req.request_id.clone(),
        ..Sample::default()
    };
    match tokio::time::timeout(req.timeout, run_inner(addr, req, &mut s)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => s.error = Some(format!("{e:#}")),
        Err(_) => s.error = Some("timeout".into()),
    }
    s
}

async fn run_inner(addr: &str, req: &Req, s: &mut Sample) -> anyhow::Result<()> {
    let mut sock = TcpStream::connect(addr).await?;
    sock.set_nodelay(true)?;
    let head = format!(
        "POST {} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nAccept: */*\r\n\
         X-Request-Id: {}\r\nContent-Length: {}\r\n\r\n",
        req.path,
        req.request_id,
        req.body.len()
    );
    let mut msg = head.into_bytes();
    msg.extend_from_slice(req.body.as_bytes());
    s.start_ns = monotonic_ns();
    sock.write_all(&msg).await?;
    let mut buf = vec![0u8; 64 * 1024];
    let mut head_buf = Vec::new();
    let mut body: Option<Body> = None;
    let mut sse = false;
    let mut pending = Vec::<u8>::new();
    let mut last_content: Option<u64> = None;
    loop {
        let n = sock.read(&mut buf).await?;
        let now = monotonic_ns();
        if n == 0 {
            if body
                .as_ref()
                .is_some_and(|b| !b.chunked && b.content_length.is_none())
            {
                break; // read-until-close body
            }
            anyhow::bail!("connection closed early");
        }
        let mut bytes = &buf[..n];
        if body.is_none() {
            head_buf.extend_from_slice(bytes);
            let mut headers = [httparse::EMPTY_HEADER; 64];
            let mut resp = httparse::Response::new(&mut headers);
            let httparse::Status::Complete(len) = resp.parse(&head_buf)? else {
                continue;
            };
            s.status = resp.code.unwrap_or(0);
            let mut b = Body::default();
            for h in resp.headers.iter() {
                let v = String::from_utf8_lossy(h.value).to_ascii_lowercase();
                if h.name.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked") {
                    b.chunked = true;
                }
                if h.name.eq_ignore_ascii_case("content-length") {
                    b.content_length = v.trim().parse().ok();
                }
                if h.name.eq_ignore_ascii_case("content-type")
                    && (v.contains("event-stream") || v.contains("ndjson"))
                {
                    sse = true;
                }
            }
            let rest = head_buf[len..].to_vec();
            body = Some(b);
            bytes = &[];
            let b = body.as_mut().expect("just set");
            b.push(&rest);
        }
        let b = body.as_mut().expect("set above");
        b.push(bytes);
        pending.extend_from_slice(&b.decoded);
        b.decoded.clear();
        if sse {
            // Events end with a blank line (SSE) or a newline (NDJSON).
            while let Some(pos) = pending.iter().position(|&c| c == b'\n') {
                let line: Vec<u8> = pending.drain(..=pos).collect();
                let line = String::from_utf8_lossy(&line);
                let line = line.trim();
                let data = line.strip_prefix("data:").map_or(line, str::trim);
                if data.is_empty() || data.starts_with(':') || data == "[DONE]" {
                    continue;
                }
                if let Ok(v) = serde_json::from_str::<Value>(data) {
                    if is_content(&v) {
                        s.content_events += 1;
                        match last_content {
                            None => s.ttft_ns = Some(now - s.start_ns),
                            Some(prev) => s.gaps_ns.push(now - prev),
                        }
                        last_content = Some(now);
                        if req.abort_after.is_some_and(|n| s.content_events >= n) {
                            s.aborted = true;
                            s.duration_ns = now - s.start_ns;
                            return Ok(()); // dropping the socket closes it mid-stream
                        }
                    }
                }
            }
        }
        if b.done {
            if !sse {
                if let Ok(v) = serde_json::from_slice::<Value>(&pending) {
                    if is_content(&v) {
                        s.content_events = 1;
                        s.ttft_ns = Some(now - s.start_ns);
                    }
                }
            }
            s.duration_ns = now - s.start_ns;
            return Ok(());
        }
    }
    s.duration_ns = monotonic_ns() - s.start_ns;
    Ok(())
}
