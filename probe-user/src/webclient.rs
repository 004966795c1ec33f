//! The agent's one HTTP client: a minimal HTTP/1.1 GET, for engine metric pages (`crate::scrape`)
//! and the CLI's questions to a running agent (`llm-probe health`, `llm-probe memleak`).
//!
//! Hand-written on `TcpStream` rather than hyper's client: the workspace builds hyper without its
//! `client` feature, and the whole need is one request per connection with `Connection: close`,
//! plain http, and three body framings (RFC 9112 §6.3: chunked, Content-Length, until close).
//! The response head is parsed by `httparse`, which the crate already uses for traffic.

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

/// What can go wrong fetching a page.
#[derive(Debug, thiserror::Error)]
pub enum WebError {
    #[error("connect: {0}")]
    Connect(std::io::Error),
    #[error("read/write: {0}")]
    Io(std::io::Error),
    #[error("no complete response within {0:?}")]
    Timeout(std::time::Duration),
    #[error("body larger than {limit} bytes")]
    BodyTooLarge { limit: usize },
    #[error("bad HTTP response: {0}")]
    BadResponse(&'static str),
}

/// Where to send the request: `host` as written in a URL (IPv6 in brackets), and the port.
#[derive(Clone, Copy, Debug)]
pub struct Server<'a> {
    pub host: &'a str,
    pub port: u16,
}

impl Server<'_> {
    /// The Host header value (RFC 9110 §7.2: port omitted when it is the default).
    fn authority(&self) -> String {
        if self.port == 80 {
            self.host.to_owned()
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// The host for `connect`, without IPv6 brackets.
    fn connect_host(&self) -> &str {
        self.host.trim_start_matches('[').trim_end_matches(']')
    }
}

/// A response: its status and its body (lossily decoded as UTF-8).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub body: String,
}

/// Largest response head accepted: engines send a few hundred bytes of headers; this only stops a
/// peer that streams header bytes forever.
const MAX_HEAD_BYTES: usize = 64 * 1024;
/// Headers parsed per response, for the same reason (httparse needs a fixed array).
const MAX_HEADERS: usize = 64;
/// Longest chunk-size line (hex size plus extensions) accepted; real ones are under 20 bytes.
const MAX_CHUNK_LINE_BYTES: usize = 1024;
/// Bytes asked of the socket per read.
const READ_BYTES: usize = 16 * 1024;

/// GET `path` from `server`, at most `max_body` bytes of body, within `timeout` (connect through
/// the last body byte).
pub async fn get(
    server: Server<'_>,
    path: &str,
    max_body: usize,
    timeout: std::time::Duration,
) -> Result<Response, WebError> {
    match tokio::time::timeout(timeout, get_inner(server, path, max_body)).await {
        Ok(r) => r,
        Err(_) => Err(WebError::Timeout(timeout)),
    }
}

async fn get_inner(server: Server<'_>, path: &str, max_body: usize) -> Result<Response, WebError> {
    let mut stream = TcpStream::connect((server.connect_host(), server.port))
        .await
        .map_err(WebError::Connect)?;
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: llm-probe/{}\r\n\
         Accept: text/plain;version=0.0.4;q=1,*/*;q=0.1\r\nAccept-Encoding: identity\r\n\
         Connection: close\r\n\r\n",
        path,
        server.authority(),
        env!("CARGO_PKG_VERSION"),
    );
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(WebError::Io)?;

    let mut buf = Vec::with_capacity(READ_BYTES);
    let mut chunk = vec![0u8; READ_BYTES];
    let (status, framing, body_start) = loop {
        if let Some(head) = parse_head(&buf, max_body)? {
            break head;
        }
        if buf.len() > MAX_HEAD_BYTES {
            return Err(WebError::BadResponse("response head too large"));
        }
        let n = stream.read(&mut chunk).await.map_err(WebError::Io)?;
        if n == 0 {
            return Err(WebError::BadResponse(
                "connection closed before the response head",
            ));
        }
        buf.extend_from_slice(chunk.get(..n).unwrap_or_default());
    };
    buf.drain(..body_start);

    let mut body = Body::new(framing, max_body);
    loop {
        if body.feed(&mut buf)? {
            break;
        }
        let n = stream.read(&mut chunk).await.map_err(WebError::Io)?;
        if n == 0 {
            body.finish_at_close()?;
            break;
        }
        buf.extend_from_slice(chunk.get(..n).unwrap_or_default());
    }
    // Lossy: one stray byte in a HELP text should not cost the whole page; real samples are ASCII.
    Ok(Response {
        status,
        body: String::from_utf8_lossy(&body.out).into_owned(),
    })
}

#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Framing {
    Length(usize),
    Chunked,
    Close,
}

/// Parses a complete response head: (status, framing, head length); `None` while more bytes are
/// needed. Informational (1xx) responses are skipped.
pub(crate) fn parse_head(
    buf: &[u8],
    max_body: usize,
) -> Result<Option<(u16, Framing, usize)>, WebError> {
    let mut offset = 0;
    loop {
        let rest = buf.get(offset..).unwrap_or_default();
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut resp = httparse::Response::new(&mut headers);
        let len = match resp.parse(rest) {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(_) => return Err(WebError::BadResponse("malformed response head")),
        };
        let code = resp.code.unwrap_or(0);
        if (100..200).contains(&code) && code != 101 {
            offset += len;
            continue;
        }
        let mut framing = Framing::Close;
        for h in resp.headers.iter() {
            let value = std::str::from_utf8(h.value).unwrap_or("").trim();
            if h.name.eq_ignore_ascii_case("transfer-encoding") {
                // RFC 9112 §6.3: chunked must be the last coding; anything else (gzip) we did
                // not ask for and cannot decode.
                let last = value.rsplit(',').next().unwrap_or("").trim();
                if !last.eq_ignore_ascii_case("chunked") || value.split(',').count() > 1 {
                    return Err(WebError::BadResponse("unsupported transfer coding"));
                }
                framing = Framing::Chunked;
            } else if h.name.eq_ignore_ascii_case("content-length") && framing != Framing::Chunked {
                let n: usize = value
                    .parse()
                    .map_err(|_| WebError::BadResponse("bad Content-Length"))?;
                if n > max_body {
                    return Err(WebError::BodyTooLarge { limit: max_body });
                }
                framing = Framing::Length(n);
            } else if h.name.eq_ignore_ascii_case("content-encoding")
                && !value.eq_ignore_ascii_case("identity")
            {
                return Err(WebError::BadResponse(
                    "compressed body (asked for identity)",
                ));
            }
        }
        return Ok(Some((code, framing, offset + len)));
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    Size,
    Data(usize),
    DataEnd,
}

/// Incremental body decoder: `feed` consumes what it can from the front of the buffer.
pub(crate) struct Body {
    framing: Framing,
    chunk: ChunkState,
    max: usize,
    pub out: Vec<u8>,
}

impl Body {
    pub fn new(framing: Framing, max: usize) -> Self {
        Self {
            framing,
            chunk: ChunkState::Size,
            max,
            out: Vec::new(),
        }
    }

    fn push(&mut self, bytes: &[u8]) -> Result<(), WebError> {
        if self.out.len() + bytes.len() > self.max {
            return Err(WebError::BodyTooLarge { limit: self.max });
        }
        self.out.extend_from_slice(bytes);
        Ok(())
    }

    /// Consumes bytes from `buf`; true once the body is complete.
    pub fn feed(&mut self, buf: &mut Vec<u8>) -> Result<bool, WebError> {
        match self.framing {
            Framing::Length(n) => {
                let take = n.saturating_sub(self.out.len()).min(buf.len());
                let bytes: Vec<u8> = buf.drain(..take).collect();
                self.push(&bytes)?;
                Ok(self.out.len() >= n)
            }
            Framing::Close => {
                let bytes = std::mem::take(buf);
                self.push(&bytes)?;
                Ok(false)
            }
            Framing::Chunked => self.feed_chunked(buf),
        }
    }

    fn feed_chunked(&mut self, buf: &mut Vec<u8>) -> Result<bool, WebError> {
        let mut pos = 0;
        let done = loop {
            let rest = buf.get(pos..).unwrap_or_default();
            match self.chunk {
                ChunkState::Size => {
                    let Some(nl) = rest.iter().position(|&b| b == b'\n') else {
                        if rest.len() > MAX_CHUNK_LINE_BYTES {
                            return Err(WebError::BadResponse("chunk size line too long"));
                        }
                        break false;
                    };
                    let line = rest.get(..nl).unwrap_or_default();
                    let size = parse_chunk_size(line)?;
                    pos += nl + 1;
                    if size == 0 {
                        // The last chunk: trailers, if any, carry nothing we need and the server
                        // closes the connection after them.
                        break true;
                    }
                    if self.out.len().saturating_add(size) > self.max {
                        return Err(WebError::BodyTooLarge { limit: self.max });
                    }
                    self.chunk = ChunkState::Data(size);
                }
                ChunkState::Data(left) => {
                    if rest.is_empty() {
                        break false;
                    }
                    let take = left.min(rest.len());
                    let bytes = rest.get(..take).unwrap_or_default().to_vec();
                    self.push(&bytes)?;
                    pos += take;
                    self.chunk = if take == left {
                        ChunkState::DataEnd
                    } else {
                        ChunkState::Data(left - take)
                    };
                }
                ChunkState::DataEnd => match rest {
                    [b'\r', b'\n', ..] => {
                        pos += 2;
                        self.chunk = ChunkState::Size;
                    }
                    // Bare LF, as lenient parsers accept.
                    [b'\n', ..] => {
                        pos += 1;
                        self.chunk = ChunkState::Size;
                    }
                    [] | [b'\r'] => break false,
                    _ => return Err(WebError::BadResponse("chunk data overruns its size")),
                },
            }
        };
        buf.drain(..pos.min(buf.len()));
        Ok(done)
    }

    /// The peer closed the connection: fine for a close-delimited body, a cut body otherwise.
    pub fn finish_at_close(&self) -> Result<(), WebError> {
        match self.framing {
            Framing::Close => Ok(()),
            Framing::Length(_) | Framing::Chunked => {
                Err(WebError::BadResponse("connection closed mid-body"))
            }
        }
    }
}

/// `1a2b[;ext=...]` with optional `\r`; at most 15 hex digits, so no overflow (2^60).
fn parse_chunk_size(line: &[u8]) -> Result<usize, WebError> {
    let bad = || WebError::BadResponse("bad chunk size");
    let text = std::str::from_utf8(line).map_err(|_| bad())?;
    let digits = text.split(';').next().unwrap_or("").trim();
    if digits.is_empty() || digits.len() > 15 {
        return Err(bad());
    }
    usize::from_str_radix(digits, 16).map_err(|_| bad())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(framing: Framing, max: usize, pieces: &[&[u8]]) -> Result<Vec<u8>, WebError> {
        let mut body = Body::new(framing, max);
        let mut buf = Vec::new();
        for p in pieces {
            buf.extend_from_slice(p);
            if body.feed(&mut buf)? {
                return Ok(body.out);
            }
        }
        body.finish_at_close()?;
        Ok(body.out)
    }

    #[test]
    fn chunked_across_arbitrary_splits() {
        let wire: &[u8] = b"5\r\nhello\r\n7;ext=1\r\n, world\r\n0\r\nTrailer: x\r\n\r\n";
        for cut1 in 0..wire.len() {
            for cut2 in cut1..wire.len() {
                let got = decode(
                    Framing::Chunked,
                    100,
                    &[&wire[..cut1], &wire[cut1..cut2], &wire[cut2..]],
                );
                assert_eq!(
                    got.ok().as_deref(),
                    Some(&b"hello, world"[..]),
                    "{cut1} {cut2}"
                );
            }
        }
    }

    #[test]
    fn chunked_errors() {
        let too_big = decode(Framing::Chunked, 4, &[b"5\r\nhello\r\n0\r\n\r\n"]);
        assert!(matches!(too_big, Err(WebError::BodyTooLarge { limit: 4 })));
        let cut = decode(Framing::Chunked, 100, &[b"5\r\nhel"]);
        assert!(matches!(cut, Err(WebError::BadResponse(_))));
        let overrun = decode(Framing::Chunked, 100, &[b"2\r\nhello\r\n0\r\n\r\n"]);
        assert!(matches!(overrun, Err(WebError::BadResponse(_))));
        let not_hex = decode(Framing::Chunked, 100, &[b"zz\r\n"]);
        assert!(matches!(not_hex, Err(WebError::BadResponse(_))));
        let huge = decode(Framing::Chunked, 100, &[b"ffffffffffffffffff\r\n"]);
        assert!(matches!(huge, Err(WebError::BadResponse(_))));
        let endless = vec![b'1'; MAX_CHUNK_LINE_BYTES + 1];
        assert!(decode(Framing::Chunked, 100, &[&endless]).is_err());
    }

    #[test]
    fn length_and_close_framing() {
        let ok = decode(Framing::Length(5), 10, &[b"hel", b"lo"]);
        assert_eq!(ok.ok().as_deref(), Some(&b"hello"[..]));
        assert!(decode(Framing::Length(5), 10, &[b"hel"]).is_err());
        let ok = decode(Framing::Close, 10, &[b"hel", b"lo"]);
        assert_eq!(ok.ok().as_deref(), Some(&b"hello"[..]));
        let too_big = decode(Framing::Close, 4, &[b"hel", b"lo"]);
        assert!(matches!(too_big, Err(WebError::BodyTooLarge { .. })));
    }

    #[test]
    fn heads() {
        let h = |s: &str| parse_head(s.as_bytes(), 100);
        assert!(matches!(h("HTTP/1.1 200 OK\r\nContent-Le"), Ok(None)));
        assert!(matches!(
            h("HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc"),
            Ok(Some((200, Framing::Length(3), 38)))
        ));
        assert!(matches!(
            h("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n"),
            Ok(Some((200, Framing::Chunked, _)))
        ));
        assert!(matches!(
            h("HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n\r\n"),
            Ok(Some((200, Framing::Close, 44)))
        ));
        assert!(matches!(
            h("HTTP/1.1 500 Oops\r\n\r\n"),
            Ok(Some((500, Framing::Close, 21)))
        ));
        assert!(matches!(
            h("HTTP/1.1 200 OK\r\nContent-Length: 101\r\n\r\n"),
            Err(WebError::BodyTooLarge { limit: 100 })
        ));
        assert!(h("HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n").is_err());
        assert!(h("HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\n\r\n").is_err());
        assert!(h("HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n").is_err());
        assert!(h("<html>\r\n\r\n").is_err());
    }
}
