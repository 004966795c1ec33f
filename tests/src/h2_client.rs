//! The reference client over HTTP/2: the `h2` crate (hyper's HTTP/2, no code shared with the
//! probe's parser), prior-knowledge h2c or `h2` negotiated by ALPN over TLS (tokio-rustls). The
//! response body is read by the same event reader as HTTP/1.1 (`client::ResponseReader`), each
//! event timed by the kernel's receive stamp of the last socket read before `h2` handed its DATA
//! over (`SO_TIMESTAMPNS` on the socket under the HTTP/2 connection). gRPC calls (`grpc`) send
//! the request body as one length-prefixed message and count each response message as a content
//! event.

use std::{
    collections::VecDeque,
    io,
    os::fd::AsRawFd as _,
    pin::Pin,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    task::{ready, Context, Poll},
};

use bytes::Bytes;
use probe_common::clock::monotonic_ns;
use rustls::pki_types::ServerName;
use tokio::{
    io::{AsyncRead, AsyncWrite, Interest, ReadBuf},
    net::TcpStream,
};

use crate::client::{enable_rx_timestamps, recv_event, Req, ResponseReader, Sample};

/// A socket that remembers the receive stamp of its last read and when its latest writes began.
struct Stamped {
    sock: TcpStream,
    stamp: Arc<AtomicU64>,
    writes: Writes,
}

/// When the connection's latest writes began (the clock read just before each `write`), at most
/// [`WRITES_KEPT`]. `h2` queues a request's frames and its connection task writes them later (on
/// a busy runtime, milliseconds later): a request starts at the first write after it was queued,
/// as the HTTP/1.1 client's starts just before its `write`.
type Writes = Arc<Mutex<VecDeque<u64>>>;
const WRITES_KEPT: usize = 256;

fn record_write(writes: &Writes, began: u64) {
    let mut w = writes.lock().expect("write stamps");
    if w.len() == WRITES_KEPT {
        w.pop_front();
    }
    w.push_back(began);
}

/// The first write that began at or after `queued`, if one is still kept.
fn first_write_after(writes: &Writes, queued: u64) -> Option<u64> {
    let w = writes.lock().expect("write stamps");
    w.iter().copied().find(|&t| t >= queued)
}

impl AsyncRead for Stamped {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        loop {
            ready!(me.sock.poll_read_ready(cx))?;
            let fd = me.sock.as_raw_fd();
            let dst = buf.initialize_unfilled();
            match me
                .sock
                .try_io(Interest::READABLE, || recv_event(fd, dst, false))
            {
                Ok((n, stamp)) => {
                    me.stamp
                        .store(stamp.unwrap_or_else(monotonic_ns), Ordering::Relaxed);
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl AsyncWrite for Stamped {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let me = self.get_mut();
        loop {
            ready!(me.sock.poll_write_ready(cx))?;
            let began = monotonic_ns();
            match me.sock.try_write(buf) {
                Ok(n) => {
                    record_write(&me.writes, began);
                    return Poll::Ready(Ok(n));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().sock).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().sock).poll_shutdown(cx)
    }
}

/// An HTTP/2 connection; clones share it (concurrent streams).
#[derive(Clone)]
pub struct H2Conn {
    send: h2::client::SendRequest<Bytes>,
    stamp: Arc<AtomicU64>,
    writes: Writes,
    authority: String,
    tls: bool,
}

impl H2Conn {
    /// Connects to `addr`: h2c with prior knowledge, or TLS with ALPN `h2` (refused otherwise).
    pub async fn connect(addr: &str, tls: bool) -> anyhow::Result<Self> {
        let sock = TcpStream::connect(addr).await?;
        sock.set_nodelay(true)?;
        enable_rx_timestamps(&sock)?;
        let stamp = Arc::new(AtomicU64::new(0));
        let writes = Writes::default();
        let io = Stamped {
            sock,
            stamp: stamp.clone(),
            writes: writes.clone(),
        };
        let send = if tls {
            let mut cfg = (*crate::tls_client::config()).clone();
            cfg.alpn_protocols = vec![b"h2".to_vec()];
            let name = ServerName::try_from("localhost")?.to_owned();
            let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
                .connect(name, io)
                .await?;
            anyhow::ensure!(
                tls.get_ref().1.alpn_protocol() == Some(&b"h2"[..]),
                "the server did not choose h2 by ALPN"
            );
            let (send, conn) = h2::client::handshake(tls).await?;
            tokio::spawn(conn);
            send
        } else {
            let (send, conn) = h2::client::handshake(io).await?;
            tokio::spawn(conn);
            send
        };
        Ok(Self {
            send,
            stamp,
            writes,
            authority: addr.to_owned(),
            tls,
        })
    }

    /// One request on its own stream. With `abort_after`, the stream is cancelled
    /// (`RST_STREAM` CANCEL) after that many content events.
    pub async fn exchange(&self, req: &Req) -> Sample {
        self.call(req, false).await
    }

    /// A gRPC server-streaming call to method `req.path` with `req.body` as its one request
    /// message; `abort_after` cancels it after that many response messages.
    pub async fn grpc(&self, req: &Req) -> Sample {
        self.call(req, true).await
    }

    /// Runs one call within `req.timeout`; errors and the timeout end up in the sample.
    async fn call(&self, req: &Req, grpc: bool) -> Sample {
        let mut s = Sample {
            request_id: req.request_id.clone(),
            ..Sample::default()
        };
        let run = async {
            if grpc {
                self.grpc_inner(req, &mut s).await
            } else {
                self.exchange_inner(req, &mut s).await
            }
        };
        match tokio::time::timeout(req.timeout, run).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => s.error = Some(format!("{e:#}")),
            Err(_) => s.error = Some("timeout".into()),
        }
        s
    }

    /// Opens a stream for `req` (POST to its path, its request id) with `body` as the whole
    /// request body; `s.start_ns` is when the connection's first write after the stream was
    /// queued began (see [`Writes`]).
    async fn send(
        &self,
        req: &Req,
        content_type: &str,
        body: Bytes,
        s: &mut Sample,
    ) -> anyhow::Result<http::Response<h2::RecvStream>> {
        let scheme = if self.tls { "https" } else { "http" };
        let mut request = http::Request::builder()
            .method("POST")
            .uri(format!("{scheme}://{}{}", self.authority, req.path))
            .header("content-type", content_type)
            .header("x-request-id", &req.request_id);
        if content_type == "application/grpc" {
            request = request.header("te", "trailers");
        }
        let mut send = self.send.clone().ready().await?;
        let queued = monotonic_ns();
        s.start_ns = queued;
        let (response, mut body_out) = send.send_request(request.body(())?, false)?;
        body_out.send_data(body, true)?;
        let response = response.await?;
        // The answer's head came back, so the write that carried the request has been made.
        s.start_ns = first_write_after(&self.writes, queued).unwrap_or(queued);
        Ok(response)
    }

    async fn grpc_inner(&self, req: &Req, s: &mut Sample) -> anyhow::Result<()> {
        let mut msg = vec![0u8];
        msg.extend_from_slice(&u32::try_from(req.body.len())?.to_be_bytes());
        msg.extend_from_slice(req.body.as_bytes());
        let response = self
            .send(req, "application/grpc", Bytes::from(msg), s)
            .await?;
        s.status = response.status().as_u16();
        let status_of = |h: &http::HeaderMap| {
            h.get("grpc-status")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok())
        };
        // A trailers-only answer carries its status in the head.
        s.grpc_status = status_of(response.headers());
        let mut body = response.into_body();
        let (mut pending, mut last) = (Vec::new(), None);
        while let Some(chunk) = body.data().await {
            let chunk = chunk?;
            let _ = body.flow_control().release_capacity(chunk.len());
            let now = self.stamp.load(Ordering::Relaxed);
            pending.extend_from_slice(&chunk);
            while pending.len() >= 5 {
                let n = u32::from_be_bytes([pending[1], pending[2], pending[3], pending[4]]);
                let end = 5 + n as usize;
                if pending.len() < end {
                    break;
                }
                pending.drain(..end);
                s.content_events += 1;
                s.token_events += 1;
                match last {
                    None => s.ttft_ns = Some(now - s.start_ns),
                    Some(prev) => s.gaps_ns.push(now - prev),
                }
                last = Some(now);
                if req.abort_after.is_some_and(|k| s.content_events >= k) {
                    s.aborted = true;
                    s.duration_ns = now - s.start_ns;
                    return Ok(()); // dropping the body cancels the stream
                }
            }
        }
        if let Some(t) = body.trailers().await? {
            s.grpc_status = status_of(&t).or(s.grpc_status);
        }
        s.duration_ns = monotonic_ns() - s.start_ns;
        Ok(())
    }

    async fn exchange_inner(&self, req: &Req, s: &mut Sample) -> anyhow::Result<()> {
        let body = Bytes::from(req.body.clone());
        let response = self.send(req, "application/json", body, s).await?;
        let (parts, mut body) = response.into_parts();
        let ctype = parts
            .headers
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        // The HTTP/1.1 reader with a head of the same status and type: a body read to its end.
        let head = format!(
            "HTTP/1.1 {}\r\ncontent-type: {ctype}\r\n\r\n",
            parts.status.as_u16()
        );
        let mut reader = ResponseReader::default();
        let now = self.stamp.load(Ordering::Relaxed);
        reader.feed(head.as_bytes(), now, s, req)?;
        while let Some(chunk) = body.data().await {
            let chunk = chunk?;
            let _ = body.flow_control().release_capacity(chunk.len());
            let now = self.stamp.load(Ordering::Relaxed);
            if reader.feed(&chunk, now, s, req)? {
                return Ok(()); // an abort: dropping the body cancels the stream
            }
        }
        reader.at_eof(s)
    }
}
