//! A minimal blocking HTTP/1.1 GET for the CLI clients (`llm-probe health`): loopback or cluster
//! addresses in plain http, `Connection: close`, bounded body. Not used on any hot path.
use std::{
    io::{Read as _, Write as _},
    net::{TcpStream, ToSocketAddrs as _},
    time::Duration,
};

use anyhow::{bail, Context as _};

/// Largest answer read (a /health verdict is a few KiB).
const MAX_BODY: u64 = 4 * 1024 * 1024;

/// GET `path` from `base` (`http://host:port`): (status, body).
pub fn get(base: &str, path: &str) -> anyhow::Result<(u16, String)> {
    let rest = base
        .strip_prefix("http://")
        .context("only http:// URLs are supported")?;
    let authority = rest.split('/').next().unwrap_or(rest);
    let addr = if authority.contains(':') {
        authority.to_owned()
    } else {
        format!("{authority}:80")
    };
    let sock = addr
        .to_socket_addrs()?
        .next()
        .with_context(|| format!("cannot resolve {addr}"))?;
    let mut s = TcpStream::connect_timeout(&sock, Duration::from_secs(5))
        .with_context(|| format!("connecting to {addr}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    s.take(MAX_BODY).read_to_end(&mut raw)?;
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut resp = httparse::Response::new(&mut headers);
    let httparse::Status::Complete(head) = resp.parse(&raw)? else {
        bail!("truncated answer")
    };
    let status = resp.code.unwrap_or(0);
    let chunked = resp.headers.iter().any(|h| {
        h.name.eq_ignore_ascii_case("transfer-encoding")
            && String::from_utf8_lossy(h.value).contains("chunked")
    });
    let body = &raw[head..];
    let body = if chunked {
        dechunk(body)
    } else {
        body.to_vec()
    };
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = b.windows(2).position(|w| w == b"\r\n") {
        let size = std::str::from_utf8(&b[..eol])
            .ok()
            .and_then(|s| usize::from_str_radix(s.split(';').next().unwrap_or("").trim(), 16).ok());
        let Some(size) = size.filter(|&n| n > 0) else {
            break;
        };
        let Some(data) = b.get(eol + 2..eol + 2 + size) else {
            break;
        };
        out.extend_from_slice(data);
        b = b.get(eol + 4 + size..).unwrap_or(&[]);
    }
    out
}
