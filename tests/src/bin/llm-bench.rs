//! `llm-bench`: the pieces of `cargo xtask bench` that need a server and a client on loopback.
//!
//! - `server PORT [--events N] [--gap-us U]`: a minimal keep-alive HTTP/1.1 server (tokio) that
//!   answers every request with a chunked SSE stream of N OpenAI-style chunks, one write each.
//! - `client ADDR --concurrency C --seconds S [--tls]`: saturating keep-alive client; prints JSON
//!   with requests/s and latency percentiles. `--tls`: over TLS (rustls; any certificate), against
//!   an HTTPS server such as `mock_llm.js --tls` (the request asks it for no timers: `burst`).
//! - `hold ADDR --streams N --seconds S`: opens N concurrent slow streams and holds them (RSS test).
use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use clap::{Parser, Subcommand};
use tokio::{
    io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
};

#[derive(Parser)]
#[command(about = "Loopback SSE server and clients for llm-probe's benchmarks")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    Server {
        port: u16,
        #[arg(long, default_value_t = 16)]
        events: usize,
        #[arg(long, default_value_t = 0)]
        gap_us: u64,
    },
    Client {
        addr: String,
        #[arg(long, default_value_t = 8)]
        concurrency: usize,
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        #[arg(long)]
        tls: bool,
    },
    Hold {
        addr: String,
        #[arg(long, default_value_t = 1000)]
        streams: usize,
        #[arg(long, default_value_t = 10)]
        seconds: u64,
    },
}

/// The streamed text, a token per event in turn: a model's text changes from event to event.
const TOKENS: [&str; 8] = [" token", " the", ",", " model", "s", " of", " é", " 42"];

/// One SSE event carrying `token`, as an HTTP/1.1 chunk.
fn chunk(token: &str) -> String {
    let event = format!(
        "data: {{\"id\":\"chatcmpl-bench\",\"object\":\"chat.completion.chunk\",\"created\":1,\
         \"model\":\"bench\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{token}\"}},\
         \"finish_reason\":null}}]}}\n\n"
    );
    format!("{:x}\r\n{event}\r\n", event.len())
}

async fn read_request(sock: &mut TcpStream, buf: &mut Vec<u8>) -> std::io::Result<bool> {
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            if buf.len() >= end + 4 + len {
                buf.drain(..end + 4 + len);
                return Ok(true);
            }
        }
        let mut tmp = [0u8; 8192];
        let n = sock.read(&mut tmp).await?;
        if n == 0 {
            return Ok(false);
        }
        buf.extend_from_slice(&tmp[..n]);
    }
}

async fn serve_conn(mut sock: TcpStream, events: usize, gap: Duration) -> std::io::Result<()> {
    sock.set_nodelay(true)?;
    let mut buf = Vec::new();
    let chunks: Vec<String> = TOKENS.iter().map(|t| chunk(t)).collect();
    while read_request(&mut sock, &mut buf).await? {
        sock.write_all(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n",
        )
        .await?;
        for i in 0..events {
            if i > 0 && !gap.is_zero() {
                tokio::time::sleep(gap).await;
            }
            sock.write_all(chunks[i % chunks.len()].as_bytes()).await?;
        }
        sock.write_all(b"e\r\ndata: [DONE]\n\n\r\n0\r\n\r\n")
            .await?;
    }
    Ok(())
}

async fn one_request<S: AsyncRead + AsyncWrite + Unpin>(
    sock: &mut S,
    body: &[u8],
    buf: &mut Vec<u8>,
) -> std::io::Result<()> {
    sock.write_all(body).await?;
    buf.clear();
    let mut tmp = vec![0u8; 16384];
    loop {
        let n = sock.read(&mut tmp).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&tmp[..n]);
        if buf.ends_with(b"0\r\n\r\n") {
            return Ok(());
        }
    }
}

fn request_bytes(addr: &str) -> Vec<u8> {
    let body = r#"{"model":"bench","stream":true,"max_tokens":16,"burst":true,"messages":[{"role":"user","content":"hi"}]}"#;
    format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Requests back to back on one connection until `stop`, their latencies (µs) in `lat`.
async fn saturate<S: AsyncRead + AsyncWrite + Unpin>(
    sock: &mut S,
    addr: &str,
    stop: &AtomicBool,
    lat: &mut Vec<u64>,
) {
    let req = request_bytes(addr);
    let mut buf = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        let t = Instant::now();
        if one_request(sock, &req, &mut buf).await.is_err() {
            break;
        }
        lat.push(t.elapsed().as_micros() as u64);
    }
}

fn pct(v: &mut [u64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_unstable();
    v[(((v.len() - 1) as f64) * p).round() as usize] as f64 / 1e3
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().cmd {
        Cmd::Server {
            port,
            events,
            gap_us,
        } => {
            let l = TcpListener::bind(("127.0.0.1", port)).await?;
            // tokio listens with a backlog of 1,024; thousands of clients connecting at once
            // (the long-streams test) would be refused. Linux lets listen() raise it in place.
            // SAFETY: a listening socket we own; listen() only changes its backlog.
            unsafe { libc::listen(std::os::fd::AsRawFd::as_raw_fd(&l), 8192) };
            eprintln!("llm-bench server on 127.0.0.1:{port}");
            loop {
                let (s, _) = l.accept().await?;
                tokio::spawn(serve_conn(s, events, Duration::from_micros(gap_us)));
            }
        }
        Cmd::Client {
            addr,
            concurrency,
            seconds,
            tls,
        } => {
            anyhow::ensure!(addr.starts_with("127."), "loopback only");
            let stop = Arc::new(AtomicBool::new(false));
            let mut tasks = Vec::new();
            for _ in 0..concurrency {
                let (addr, stop) = (addr.clone(), stop.clone());
                tasks.push(tokio::spawn(async move {
                    let mut lat = Vec::new();
                    let Ok(sock) = TcpStream::connect(&addr).await else {
                        return lat;
                    };
                    let _ = sock.set_nodelay(true);
                    if tls {
                        let connector =
                            tokio_rustls::TlsConnector::from(tests::tls_client::config());
                        let name = rustls::pki_types::ServerName::try_from("localhost")
                            .expect("a valid name");
                        let Ok(mut s) = connector.connect(name, sock).await else {
                            return lat;
                        };
                        saturate(&mut s, &addr, &stop, &mut lat).await;
                    } else {
                        let mut s = sock;
                        saturate(&mut s, &addr, &stop, &mut lat).await;
                    }
                    lat
                }));
            }
            let start = Instant::now();
            tokio::time::sleep(Duration::from_secs(seconds)).await;
            stop.store(true, Ordering::Relaxed);
            let mut all = Vec::new();
            for t in tasks {
                all.extend(t.await?);
            }
            let secs = start.elapsed().as_secs_f64();
            println!(
                "{}",
                serde_json::json!({
                    "requests": all.len(), "rps": all.len() as f64 / secs,
                    "p50_ms": pct(&mut all, 0.5), "p99_ms": pct(&mut all, 0.99),
                })
            );
        }
        Cmd::Hold {
            addr,
            streams,
            seconds,
        } => {
            anyhow::ensure!(addr.starts_with("127."), "loopback only");
            let mut socks = Vec::new();
            let req = request_bytes(&addr);
            for _ in 0..streams {
                let mut s = TcpStream::connect(&addr).await?;
                s.write_all(&req).await?;
                socks.push(s);
            }
            eprintln!("holding {streams} streams for {seconds} s");
            let deadline = Instant::now() + Duration::from_secs(seconds);
            let mut tmp = [0u8; 4096];
            while Instant::now() < deadline {
                for s in &mut socks {
                    let _ = tokio::time::timeout(Duration::from_millis(1), s.read(&mut tmp)).await;
                }
            }
            println!("{}", serde_json::json!({"streams": socks.len()}));
        }
    }
    Ok(())
}
