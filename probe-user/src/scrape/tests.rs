//! The bridge against real sockets: a tokio listener on 127.0.0.1 serving pages the test changes.

use std::{
    fmt::Write as _,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex, PoisonError,
    },
    time::{Duration, Instant},
};

use prometheus_client::{encoding::text::encode, registry::Registry};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

use super::Bridge;
use crate::{
    engine::{
        promtext::{self, Line},
        EngineUrl,
    },
    metrics::engine::EngineMetrics,
};

#[derive(Clone, Debug)]
enum Reply {
    /// 200 with Content-Length.
    Page(String),
    /// 200, chunked in 7-byte chunks.
    Chunked(String),
    /// 200 without length: the body ends when the connection closes.
    UntilClose(String),
    Status(u16),
    /// Close the connection without answering.
    Close,
    /// Answer the page after this long.
    Slow(Duration, String),
}

struct Server {
    url: EngineUrl,
    reply: Arc<Mutex<Reply>>,
    hits: Arc<AtomicUsize>,
}

impl Server {
    async fn start(reply: Reply) -> Self {
        let listener = match TcpListener::bind("127.0.0.1:0").await {
            Ok(l) => l,
            Err(e) => panic!("bind: {e}"),
        };
        let port = match listener.local_addr() {
            Ok(a) => a.port(),
            Err(e) => panic!("local_addr: {e}"),
        };
        let reply = Arc::new(Mutex::new(reply));
        let hits = Arc::new(AtomicUsize::new(0));
        let (r, h) = (reply.clone(), hits.clone());
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                h.fetch_add(1, Ordering::SeqCst);
                let now = r.lock().unwrap_or_else(PoisonError::into_inner).clone();
                tokio::spawn(answer(stream, now));
            }
        });
        Self {
            url: parse(&format!("http://127.0.0.1:{port}/metrics")),
            reply,
            hits,
        }
    }

    fn set(&self, reply: Reply) {
        *self.reply.lock().unwrap_or_else(PoisonError::into_inner) = reply;
    }

    fn worker(&self, engine: &str) -> String {
        format!("{}/{engine}", self.url.host_port())
    }
}

async fn answer(mut stream: TcpStream, reply: Reply) {
    let mut req = Vec::new();
    let mut buf = [0u8; 1024];
    while !req.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => req.extend_from_slice(&buf[..n]),
        }
    }
    let head = String::from_utf8_lossy(&req);
    assert!(head.starts_with("GET /metrics HTTP/1.1\r\n"), "{head}");
    assert!(head.contains("\r\nConnection: close\r\n"), "{head}");
    let out = match reply {
        Reply::Page(body) => format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .into_bytes(),
        Reply::Chunked(body) => {
            let mut out = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
            for c in body.as_bytes().chunks(7) {
                out.extend_from_slice(format!("{:x}\r\n", c.len()).as_bytes());
                out.extend_from_slice(c);
                out.extend_from_slice(b"\r\n");
            }
            out.extend_from_slice(b"0\r\n\r\n");
            out
        }
        Reply::UntilClose(body) => format!("HTTP/1.1 200 OK\r\n\r\n{body}").into_bytes(),
        Reply::Status(code) => {
            format!("HTTP/1.1 {code} Oops\r\nContent-Length: 4\r\n\r\noops").into_bytes()
        }
        Reply::Close => return,
        Reply::Slow(delay, body) => {
            tokio::time::sleep(delay).await;
            format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
            .into_bytes()
        }
    };
    let _ = stream.write_all(&out).await;
    let _ = stream.shutdown().await;
}

fn parse(url: &str) -> EngineUrl {
    match url.parse() {
        Ok(u) => u,
        Err(e) => panic!("{url}: {e}"),
    }
}

struct Rig {
    registry: Registry,
    bridge: Bridge,
}

impl Rig {
    fn new(urls: Vec<EngineUrl>, timeout: Duration, max_page: usize) -> Self {
        let mut registry = Registry::default();
        let metrics = EngineMetrics::new(&mut registry);
        let bridge = Bridge::with_limits(urls, metrics, timeout, max_page);
        Self { registry, bridge }
    }

    fn render(&self) -> String {
        let mut text = String::new();
        if let Err(e) = encode(&mut text, &self.registry) {
            panic!("encode: {e}");
        }
        text
    }

    /// The value of the exported series `name` whose labels include all of `labels`.
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let text = self.render();
        let found = promtext::lines(&text).find_map(|l| match l {
            Line::Sample(s)
                if s.name == name && labels.iter().all(|(k, v)| s.label(k) == Some(*v)) =>
            {
                Some(s.value)
            }
            _ => None,
        });
        found
    }

    fn count(&self, name: &str) -> usize {
        let text = self.render();
        let n = promtext::lines(&text)
            .filter(|l| matches!(l, Line::Sample(s) if s.name == name))
            .count();
        n
    }

    fn errors(&self, url: &EngineUrl) -> Option<f64> {
        self.value(
            "llm_probe_engine_scrape_errors_total",
            &[("url", &url.to_string())],
        )
    }
}

const SECOND: Duration = Duration::from_secs(1);

fn vllm(kv: [f64; 2], waiting: [f64; 2], preempted: [f64; 2]) -> String {
    let mut page = String::from("# TYPE vllm:kv_cache_usage_perc gauge\n");
    for e in 0..2 {
        let _ = write!(
            page,
            "vllm:kv_cache_usage_perc{{engine=\"{e}\",model_name=\"m\"}} {}\n\
             vllm:num_requests_waiting{{engine=\"{e}\",model_name=\"m\"}} {}\n\
             vllm:num_requests_running{{engine=\"{e}\",model_name=\"m\"}} 2.0\n\
             vllm:num_preemptions_total{{engine=\"{e}\",model_name=\"m\"}} {}\n",
            kv[e], waiting[e], preempted[e]
        );
    }
    page
}

#[tokio::test]
async fn exports_then_withdraws_gauges_on_failure_and_recovers() {
    let server = Server::start(Reply::Page(vllm([0.25, 0.75], [1.0, 4.0], [3.0, 0.0]))).await;
    let mut rig = Rig::new(vec![server.url.clone()], SECOND, 1 << 20);
    assert_eq!(
        rig.errors(&server.url),
        Some(0.0),
        "error counter exists from the start"
    );

    rig.bridge.poll_once().await;
    let w0 = server.worker("0");
    let w1 = server.worker("1");
    let kv = |rig: &Rig, w: &str| rig.value("llm_kv_cache_utilization", &[("worker_id", w)]);
    assert_eq!(kv(&rig, &w0), Some(0.25));
    assert_eq!(kv(&rig, &w1), Some(0.75));
    assert_eq!(
        rig.value("llm_engine_queue_depth", &[("worker_id", &w1)]),
        Some(4.0)
    );
    assert_eq!(
        rig.value("llm_engine_batch_size", &[("worker_id", &w0)]),
        Some(2.0)
    );
    let preempted = [("worker_id", w0.as_str()), ("reason", "engine")];
    assert_eq!(rig.value("llm_preemption_total", &preempted), Some(3.0));
    assert_eq!(rig.bridge.max_kv_utilization(), Some(0.75));
    assert_eq!(rig.bridge.max_queue_depth(), Some(4.0));
    assert!(rig.bridge.failing().is_empty());

    server.set(Reply::Status(500));
    rig.bridge.poll_once().await;
    assert_eq!(rig.count("llm_kv_cache_utilization"), 0);
    assert_eq!(rig.count("llm_engine_queue_depth"), 0);
    assert_eq!(rig.count("llm_engine_batch_size"), 0);
    assert_eq!(
        rig.value("llm_preemption_total", &preempted),
        Some(3.0),
        "counters stay"
    );
    assert_eq!(rig.errors(&server.url), Some(1.0));
    assert_eq!(rig.bridge.max_kv_utilization(), None);
    assert_eq!(rig.bridge.max_queue_depth(), None);
    let failing = rig.bridge.failing();
    assert_eq!(failing.len(), 1);
    assert_eq!(failing[0].0, server.url.to_string());
    assert!(failing[0].1.contains("500"), "{failing:?}");

    rig.bridge.poll_once().await;
    assert_eq!(
        rig.errors(&server.url),
        Some(2.0),
        "every failed scrape counts"
    );

    server.set(Reply::Chunked(vllm([0.5, 0.125], [0.0, 0.0], [4.0, 0.0])));
    rig.bridge.poll_once().await;
    assert_eq!(kv(&rig, &w0), Some(0.5));
    assert_eq!(rig.value("llm_preemption_total", &preempted), Some(4.0));
    assert!(rig.bridge.failing().is_empty());
    assert_eq!(rig.errors(&server.url), Some(2.0));
    assert_eq!(server.hits.load(Ordering::SeqCst), 4);
}

#[tokio::test]
async fn counters_export_deltas_and_survive_restarts() {
    let page = |n: f64| format!("vllm:num_preemptions_total{{engine=\"0\"}} {n}\n");
    let server = Server::start(Reply::UntilClose(page(5.0))).await;
    let mut rig = Rig::new(vec![server.url.clone()], SECOND, 1 << 20);
    let w0 = server.worker("0");
    let labels = [("worker_id", w0.as_str()), ("reason", "engine")];
    let mut seen = Vec::new();
    for total in [5.0, 8.0, 8.0, 3.0, 3.0, 10.0] {
        server.set(Reply::UntilClose(page(total)));
        rig.bridge.poll_once().await;
        seen.push(rig.value("llm_preemption_total", &labels));
    }
    // 5, +3, +0, restart (3 < 8: +3), +0, +7.
    let want = [5.0, 8.0, 8.0, 11.0, 11.0, 18.0].map(Some);
    assert_eq!(seen, want);
    // A failure in between loses nothing: the engine's total is remembered.
    server.set(Reply::Close);
    rig.bridge.poll_once().await;
    server.set(Reply::UntilClose(page(12.0)));
    rig.bridge.poll_once().await;
    assert_eq!(rig.value("llm_preemption_total", &labels), Some(20.0));
}

#[tokio::test]
async fn vanished_worker_or_metric_takes_its_gauge() {
    let server = Server::start(Reply::Page(vllm([0.1, 0.2], [1.0, 2.0], [0.0, 0.0]))).await;
    let mut rig = Rig::new(vec![server.url.clone()], SECOND, 1 << 20);
    rig.bridge.poll_once().await;
    assert_eq!(rig.count("llm_kv_cache_utilization"), 2);
    server.set(Reply::Page(
        "vllm:num_requests_waiting{engine=\"0\"} 3\n".to_owned(),
    ));
    rig.bridge.poll_once().await;
    assert_eq!(rig.count("llm_kv_cache_utilization"), 0);
    assert_eq!(rig.count("llm_engine_batch_size"), 0);
    assert_eq!(rig.count("llm_engine_queue_depth"), 1);
    let w0 = server.worker("0");
    assert_eq!(
        rig.value("llm_engine_queue_depth", &[("worker_id", &w0)]),
        Some(3.0)
    );
    assert_eq!(rig.bridge.max_kv_utilization(), None);
    assert_eq!(rig.bridge.max_queue_depth(), Some(3.0));
}

#[tokio::test]
async fn every_kind_of_failure_counts_and_withdraws() {
    let good = "tgi_queue_size 4\ntgi_batch_current_size 8\n".to_owned();
    let server = Server::start(Reply::Page(good.clone())).await;
    let timeout = Duration::from_millis(200);
    let mut rig = Rig::new(vec![server.url.clone()], timeout, 256);
    let host = server.url.host_port();
    let cases: Vec<(Reply, &str)> = vec![
        (Reply::Status(503), "503"),
        (Reply::Close, "closed"),
        (Reply::Slow(Duration::from_secs(5), good.clone()), "within"),
        (Reply::Page("x".repeat(300)), "larger than 256"),
        (
            Reply::Chunked("tgi_queue_size 1\n".repeat(20)),
            "larger than 256",
        ),
        (
            Reply::UntilClose("tgi_queue_size 1\n".repeat(20)),
            "larger than 256",
        ),
        (
            Reply::Page("<html><body>Not Found</body></html>\n".to_owned()),
            "no known engine metric",
        ),
        (
            Reply::Page("tgi_queue_size 4\ntgi_batch_cur".to_owned()),
            "still good",
        ),
    ];
    let mut errors = 0.0;
    for (reply, want) in cases {
        server.set(Reply::Page(good.clone()));
        rig.bridge.poll_once().await;
        assert_eq!(
            rig.value("llm_engine_queue_depth", &[("worker_id", &host)]),
            Some(4.0)
        );
        assert_eq!(rig.bridge.max_queue_depth(), Some(4.0));

        server.set(reply.clone());
        let started = Instant::now();
        rig.bridge.poll_once().await;
        assert!(
            started.elapsed() < timeout * 5,
            "{reply:?} took {:?}",
            started.elapsed()
        );
        if want == "still good" {
            // A truncated page keeps what parsed and drops the cut line.
            assert_eq!(
                rig.value("llm_engine_queue_depth", &[("worker_id", &host)]),
                Some(4.0)
            );
            assert_eq!(rig.count("llm_engine_batch_size"), 0);
            continue;
        }
        errors += 1.0;
        assert_eq!(rig.count("llm_engine_queue_depth"), 0, "{reply:?}");
        assert_eq!(rig.count("llm_engine_batch_size"), 0, "{reply:?}");
        assert_eq!(rig.errors(&server.url), Some(errors), "{reply:?}");
        let failing = rig.bridge.failing();
        assert!(
            failing.len() == 1 && failing[0].1.contains(want),
            "{reply:?}: {failing:?}"
        );
    }
}

#[tokio::test]
async fn urls_are_scraped_concurrently_and_independently() {
    let a = Server::start(Reply::Page("sglang:num_queue_reqs 2\n".to_owned())).await;
    let b = Server::start(Reply::Slow(SECOND * 10, String::new())).await;
    // Nothing listens here: a connect error.
    let dead = {
        let l = match TcpListener::bind("127.0.0.1:0").await {
            Ok(l) => l,
            Err(e) => panic!("bind: {e}"),
        };
        let port = l.local_addr().map_or(1, |a| a.port());
        drop(l);
        parse(&format!("http://127.0.0.1:{port}/metrics"))
    };
    let timeout = Duration::from_millis(300);
    let mut rig = Rig::new(
        vec![a.url.clone(), b.url.clone(), dead.clone()],
        timeout,
        1 << 20,
    );
    let started = Instant::now();
    rig.bridge.poll_once().await;
    assert!(
        started.elapsed() < timeout * 3,
        "took {:?}",
        started.elapsed()
    );
    assert_eq!(rig.bridge.max_queue_depth(), Some(2.0));
    let failing = rig.bridge.failing();
    assert_eq!(failing.len(), 2, "{failing:?}");
    assert!(failing[0].0 == b.url.to_string() && failing[0].1.contains("within"));
    assert!(failing[1].0 == dead.to_string() && failing[1].1.contains("connect"));
    assert_eq!(rig.errors(&a.url), Some(0.0));
    assert_eq!(rig.errors(&b.url), Some(1.0));
    assert_eq!(rig.errors(&dead), Some(1.0));
}

#[tokio::test]
async fn poll_is_send_and_fine_without_urls() {
    fn send<T: Send>(t: T) -> T {
        t
    }
    // The agent runs the bridge in `tokio::spawn`, which needs a `Send` future.
    let mut rig = Rig::new(vec![], SECOND, 1);
    send(rig.bridge.poll_once()).await;
    assert!(rig.bridge.failing().is_empty());
    assert_eq!(rig.bridge.max_kv_utilization(), None);
}
