//! A load client that measures what a user feels, independently of the probe: its own HTTP/1.1
//! framing and SSE/NDJSON handling (no code shared with probe-user), `CLOCK_MONOTONIC` timestamps
//! (probe-common's clock, the one the kernel stamps with). Content events are counted the way
//! benchmarking clients count them (vLLM's `benchmark_serving)`: an event with non-empty generated
//! text.
//!
//! When an event arrived is the kernel's receive timestamp of the bytes that end it
//! (`SO_TIMESTAMPNS`), not the moment this process got round to reading them: on a small VM a
//! client with 64 streams on one thread, or one the host deschedules, reads events late and
//! several at once, and that delay is the reference's noise, not the server's latency. Each read
//! stops at the end of the first event in the socket (peeked), so the stamp is that event's. A
//! read without a stamp falls back to the clock when the read returned and is counted
//! (`Sample::unstamped_reads`).

use std::{io, os::fd::AsRawFd as _, time::Duration};

use probe_common::clock::monotonic_ns;
use serde::Serialize;
use serde_json::Value;
use tokio::{io::AsyncWriteExt as _, net::TcpStream};

/// One request as the client saw it.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Sample {
    pub request_id: String,
    pub status: u16,
    pub start_ns: u64,
    pub ttft_ns: Option<u64>,
    pub gaps_ns: Vec<u64>,
    pub content_events: u64,
    /// Events that stand for one generated token by the probe's documented rule, text empty or
    /// not: a choice with a `text` string, or a chat `delta` with a `content` string that is not
    /// the role announcement (see `llm_generated_tokens_total` in docs/metrics.md).
    pub token_events: u64,
    pub duration_ns: u64,
    /// The client gave up on purpose after this many content events (abort tests).
    pub aborted: bool,
    pub error: Option<String>,
    /// Reads whose bytes carried no kernel receive timestamp (timed when the read returned).
    pub unstamped_reads: u64,
    /// A gRPC call's `grpc-status` (`h2_client::H2Conn::grpc`).
    pub grpc_status: Option<u32>,
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

/// Whether a streamed event counts as one token by the rule of `Sample::token_events`.
pub fn is_token_event(v: &Value) -> bool {
    v.get("choices")
        .and_then(Value::as_array)
        .is_some_and(|choices| {
            choices.iter().any(|c| {
                c["text"].is_string()
                    || (c["delta"]["content"].is_string() && c["delta"].get("role").is_none())
            })
        })
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
    enable_rx_timestamps(&sock)?;
    let msg = request_bytes(addr, req);
    s.start_ns = monotonic_ns();
    sock.write_all(&msg).await?;
    let mut buf = vec![0u8; 64 * 1024];
    let mut reader = ResponseReader::default();
    loop {
        let (n, stamp) = read_event(&sock, &mut buf).await?;
        let now = stamp.unwrap_or_else(|| {
            s.unstamped_reads += 1;
            monotonic_ns()
        });
        if n == 0 {
            return reader.at_eof(s);
        }
        if reader.feed(&buf[..n], now, s, req)? {
            return Ok(());
        }
    }
}

/// The request head as this client sends it, with its body.
pub(crate) fn request_bytes(addr: &str, req: &Req) -> Vec<u8> {
    let head = format!(
        "POST {} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nAccept: */*\r\n\
         X-Request-Id: {}\r\nContent-Length: {}\r\n\r\n",
        req.path,
        req.request_id,
        req.body.len()
    );
    let mut msg = head.into_bytes();
    msg.extend_from_slice(req.body.as_bytes());
    msg
}

/// A response read as it arrives: head, framing, events; each event timed by the `now` of the
/// bytes that completed it. Transport-free (clear text here, TLS in `tls_client`).
#[derive(Default)]
pub(crate) struct ResponseReader {
    head_buf: Vec<u8>,
    body: Option<Body>,
    sse: bool,
    pending: Vec<u8>,
    last_content: Option<u64>,
    /// The latest `now` fed so far.
    last_now: u64,
}

impl ResponseReader {
    /// The peer closed: fine for a body read until close.
    pub(crate) fn at_eof(&self, s: &mut Sample) -> anyhow::Result<()> {
        if self
            .body
            .as_ref()
            .is_some_and(|b| !b.chunked && b.content_length.is_none())
        {
            s.duration_ns = monotonic_ns() - s.start_ns;
            return Ok(());
        }
        anyhow::bail!("connection closed early")
    }

    /// Response bytes that arrived at `now`. Returns true when the response (or the client's
    /// planned abort) is complete.
    ///
    /// A connection's bytes arrive in order, so `now` is taken as no earlier than the request's
    /// start and the bytes fed before. The kernel stamps each segment on `CLOCK_REALTIME` and
    /// `recv_event` moves the stamp onto the monotonic clock with two clock reads of its own: two
    /// reads of one segment (an event ending inside it) came out up to 5 ns apart, backwards as
    /// often as not, and a negative gap panicked the harness (2026-12-07).
    pub(crate) fn feed(
        &mut self,
        mut bytes: &[u8],
        now: u64,
        s: &mut Sample,
        req: &Req,
    ) -> anyhow::Result<bool> {
        let now = now.max(self.last_now).max(s.start_ns);
        self.last_now = now;
        if self.body.is_none() {
            self.head_buf.extend_from_slice(bytes);
            let mut headers = [httparse::EMPTY_HEADER; 64];
            let mut resp = httparse::Response::new(&mut headers);
            let httparse::Status::Complete(len) = resp.parse(&self.head_buf)? else {
                return Ok(false);
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
                    self.sse = true;
                }
            }
            let rest = self.head_buf[len..].to_vec();
            b.push(&rest);
            self.body = Some(b);
            bytes = &[];
        }
        let b = self.body.as_mut().expect("set above");
        b.push(bytes);
        self.pending.extend_from_slice(&b.decoded);
        b.decoded.clear();
        if self.sse {
            // Events end with a blank line (SSE) or a newline (NDJSON).
            while let Some(pos) = self.pending.iter().position(|&c| c == b'\n') {
                let line: Vec<u8> = self.pending.drain(..=pos).collect();
                let line = String::from_utf8_lossy(&line);
                let line = line.trim();
                let data = line.strip_prefix("data:").map_or(line, str::trim);
                if data.is_empty() || data.starts_with(':') || data == "[DONE]" {
                    continue;
                }
                if let Ok(v) = serde_json::from_str::<Value>(data) {
                    if is_token_event(&v) {
                        s.token_events += 1;
                    }
                    if is_content(&v) {
                        s.content_events += 1;
                        match self.last_content {
                            None => s.ttft_ns = Some(now - s.start_ns),
                            Some(prev) => s.gaps_ns.push(now - prev),
                        }
                        self.last_content = Some(now);
                        if req.abort_after.is_some_and(|n| s.content_events >= n) {
                            s.aborted = true;
                            s.duration_ns = now - s.start_ns;
                            return Ok(true); // dropping the socket closes it mid-stream
                        }
                    }
                }
            }
        }
        if b.done {
            if !self.sse {
                if let Ok(v) = serde_json::from_slice::<Value>(&self.pending) {
                    if is_content(&v) {
                        s.content_events = 1;
                        s.ttft_ns = Some(now - s.start_ns);
                    }
                }
            }
            s.duration_ns = now - s.start_ns;
            return Ok(true);
        }
        Ok(false)
    }
}

/// A socket that asks for receive timestamps for as long as the process lives. The kernel stamps
/// received packets only while some socket wants stamps (a reference-counted switch whose enabling
/// is deferred to a work queue): when every client socket had closed between two requests, the
/// next request's first segments came in unstamped (2,614 unstamped reads in one vLLM round).
fn keep_rx_timestamps_on() {
    static KEEPER: std::sync::OnceLock<Option<std::net::UdpSocket>> = std::sync::OnceLock::new();
    KEEPER.get_or_init(|| {
        let s = std::net::UdpSocket::bind("127.0.0.1:0").ok()?;
        set_timestamps(s.as_raw_fd()).ok()?;
        Some(s)
    });
}

/// Ask the kernel to stamp every received segment and report the stamp with each read.
pub(crate) fn enable_rx_timestamps(sock: &TcpStream) -> io::Result<()> {
    keep_rx_timestamps_on();
    set_timestamps(sock.as_raw_fd())
}

fn set_timestamps(fd: i32) -> io::Result<()> {
    let on: libc::c_int = 1;
    // SAFETY: a valid socket, a c_int option value and its size.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_TIMESTAMPNS,
            (&raw const on).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Read up to the end of the first event waiting in the socket; returns the byte count and the
/// kernel's receive time of the last segment read, on `CLOCK_MONOTONIC`.
async fn read_event(sock: &TcpStream, buf: &mut [u8]) -> io::Result<(usize, Option<u64>)> {
    read_stamped(sock, buf, true).await
}

/// A read with the kernel's receive time of its last segment; `event`: stop at the end of the
/// first event (clear text only: TLS bytes cannot be split by content).
pub(crate) async fn read_stamped(
    sock: &TcpStream,
    buf: &mut [u8],
    event: bool,
) -> io::Result<(usize, Option<u64>)> {
    loop {
        sock.readable().await?;
        match sock.try_io(tokio::io::Interest::READABLE, || {
            recv_event(sock.as_raw_fd(), buf, event)
        }) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            r => return r,
        }
    }
}

/// Where the first event in `bytes` ends: after the first `\n` not preceded by `\r` (SSE and
/// NDJSON lines; HTTP and chunk framing end lines with `\r\n`).
pub fn first_event_end(bytes: &[u8]) -> Option<usize> {
    (0..bytes.len())
        .find(|&i| bytes[i] == b'\n' && (i == 0 || bytes[i - 1] != b'\r'))
        .map(|i| i + 1)
}

pub(crate) fn recv_event(fd: i32, buf: &mut [u8], event: bool) -> io::Result<(usize, Option<u64>)> {
    // SAFETY: `buf` is writable for its length.
    let peeked = unsafe {
        libc::recv(
            fd,
            buf.as_mut_ptr().cast(),
            buf.len(),
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    if peeked <= 0 {
        return if peeked == 0 {
            Ok((0, None))
        } else {
            Err(io::Error::last_os_error())
        };
    }
    let want = if event {
        first_event_end(&buf[..peeked as usize]).unwrap_or(peeked as usize)
    } else {
        peeked as usize
    };
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: want,
    };
    // Room for one `SCM_TIMESTAMPNS` control message (a timespec), 8-aligned.
    let mut control = [0u64; 8];
    // SAFETY: an all-zero msghdr is valid; the pointers set below outlive the call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &raw mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = size_of_val(&control);
    // SAFETY: `msg` points at live buffers of the sizes it states.
    let n = unsafe { libc::recvmsg(fd, &raw mut msg, libc::MSG_DONTWAIT) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let (real_now, mono_now) = realtime_and_monotonic();
    let mut stamp = None;
    // SAFETY: CMSG_* walk the control buffer the kernel filled, within `msg_controllen`.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&raw const msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_TIMESTAMPNS {
                let ts = libc::CMSG_DATA(c).cast::<libc::timespec>().read_unaligned();
                let real = ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64;
                // The stamp is CLOCK_REALTIME; move it onto the monotonic clock.
                stamp = Some(mono_now.saturating_sub(real_now.saturating_sub(real)));
            }
            c = libc::CMSG_NXTHDR(&raw const msg, c);
        }
    }
    Ok((n as usize, stamp))
}

/// A `CLOCK_REALTIME` reading and the `CLOCK_MONOTONIC` time at that instant, read as monotonic –
/// realtime – monotonic and retried while the two monotonic reads are more than 20 µs apart: a
/// thread preempted between two plain reads (vCPU steal) shifted the conversion by the time it
/// waited, which made consecutive stamps run backwards by up to 1.4 ms on a loaded 2-core VM.
fn realtime_and_monotonic() -> (u64, u64) {
    let mut best = (0, 0, u64::MAX);
    for _ in 0..8 {
        let before = monotonic_ns();
        let real = clock_ns(libc::CLOCK_REALTIME);
        let after = monotonic_ns();
        let spread = after - before;
        if spread < best.2 {
            best = (real, before + spread / 2, spread);
        }
        if spread <= 20_000 {
            break;
        }
    }
    (best.0, best.1)
}

fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid clock id and a timespec to fill.
    unsafe { libc::clock_gettime(clock, &raw mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

#[cfg(test)]
mod tests {
    use super::first_event_end;

    #[test]
    fn a_read_stops_after_the_first_event_line() {
        let chunked = b"5e\r\ndata: {\"x\":1}\n\n\r\n5e\r\ndata: {\"x\":2}\n\n\r\n";
        let end = first_event_end(chunked).expect("an event");
        assert_eq!(&chunked[..end], b"5e\r\ndata: {\"x\":1}\n");
        assert_eq!(first_event_end(&chunked[end..]), Some(1), "the blank line");
        assert_eq!(first_event_end(b"HTTP/1.1 200 OK\r\nA: b\r\n\r\n"), None);
        assert_eq!(
            first_event_end(b"{\"done\":false}\n{\"done\":true}\n"),
            Some(15)
        );
    }
}
