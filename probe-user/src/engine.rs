//! What an inference engine's own Prometheus page says, engine-neutrally: `EngineUrl` (an
//! `--engine-metrics` URL), the Prometheus-text parser (`promtext`) and the normalisation of vLLM,
//! `SGLang`, TGI and llama.cpp pages into `WorkerSample`s (`normalize`). Pure; `crate::scrape`
//! fetches the pages and exports the samples.

mod normalize;
pub mod promtext;

use std::{fmt, str::FromStr};

pub use normalize::{normalize_counted, worker_id, PageStats, DEFAULT_REASON, WORKER_LABELS};

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(
        "{url:?}: https is not supported (llm-probe has no TLS client); \
         serve the engine's metrics over plain http://"
    )]
    Tls { url: String },
    #[error("{url:?}: scheme {scheme:?} is not supported; use http://")]
    UnsupportedScheme { url: String, scheme: String },
    #[error("{url:?} is not an engine metrics URL: {reason} (expected http://host[:port][/path])")]
    InvalidUrl { url: String, reason: &'static str },
    #[error(
        "page has no known engine metric ({samples} samples, {malformed} malformed lines): \
         not a vLLM, SGLang, TGI or llama.cpp metrics page?"
    )]
    NoKnownMetrics { samples: usize, malformed: usize },
}

/// A plain-http engine metrics URL, as given on the command line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EngineUrl {
    original: String,
    /// As written, with brackets for IPv6 (`[::1]`), lower-cased.
    host: String,
    port: u16,
    /// Path and query, starting with `/`.
    path: String,
}

impl EngineUrl {
    /// `host:port`, the port always explicit: the worker id for pages without a worker label.
    pub fn host_port(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }

    pub fn path(&self) -> &str {
        &self.path
    }

    /// The host as written (IPv6 in brackets), lower-cased.
    pub fn host(&self) -> &str {
        &self.host
    }

    pub fn port(&self) -> u16 {
        self.port
    }
}

impl fmt::Display for EngineUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.original)
    }
}

impl FromStr for EngineUrl {
    type Err = EngineError;

    /// `http://host[:port][/path]`; port 80 and path `/metrics` (where vLLM, `SGLang`, TGI and
    /// llama.cpp all serve their page) when left out.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let invalid = |reason| EngineError::InvalidUrl {
            url: s.to_owned(),
            reason,
        };
        let Some((scheme, rest)) = s.split_once("://") else {
            return Err(invalid("no http:// scheme"));
        };
        if !scheme.eq_ignore_ascii_case("http") {
            let ok = |b: u8| b.is_ascii_alphanumeric() || b"+-.".contains(&b);
            if scheme.is_empty() || !scheme.bytes().all(ok) {
                return Err(invalid("no http:// scheme"));
            }
            if scheme.eq_ignore_ascii_case("https") {
                return Err(EngineError::Tls { url: s.to_owned() });
            }
            return Err(EngineError::UnsupportedScheme {
                url: s.to_owned(),
                scheme: scheme.to_ascii_lowercase(),
            });
        }
        // The path goes into the request line verbatim: no blanks or controls may hide in it.
        if rest.bytes().any(|b| b.is_ascii_control() || b == b' ') {
            return Err(invalid("blank or control character"));
        }
        let rest = rest.split('#').next().unwrap_or("");
        let split = rest.find(['/', '?']).unwrap_or(rest.len());
        let (authority, path) = rest.split_at(split);
        if authority.contains('@') {
            return Err(invalid("credentials in URLs are not supported"));
        }
        let (host, port) = split_host_port(authority).ok_or_else(|| invalid("bad host or port"))?;
        let path = match path {
            "" => "/metrics".to_owned(),
            p if p.starts_with('?') => format!("/{p}"),
            p => p.to_owned(),
        };
        Ok(Self {
            original: s.to_owned(),
            host: host.to_ascii_lowercase(),
            port,
            path,
        })
    }
}

/// `host`, `host:port`, `[v6]`, `[v6]:port`; port 80 when absent; port 0 rejected.
fn split_host_port(authority: &str) -> Option<(&str, u16)> {
    let (host, port) = if authority.starts_with('[') {
        let end = authority.find(']')?;
        let host = authority.get(..=end)?;
        let inner = host.get(1..end)?;
        if inner.is_empty()
            || !inner
                .bytes()
                .all(|b| b.is_ascii_hexdigit() || b":.".contains(&b))
        {
            return None;
        }
        match authority.get(end + 1..)? {
            "" => (host, None),
            p => (host, Some(p.strip_prefix(':')?)),
        }
    } else {
        let (host, port) = match authority.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        };
        let ok = |b: u8| b.is_ascii_alphanumeric() || b"-._".contains(&b);
        if host.is_empty() || !host.bytes().all(ok) {
            return None;
        }
        (host, port)
    };
    let port = match port {
        None => 80,
        Some(p) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => p.parse().ok()?,
        Some(_) => return None,
    };
    (port != 0).then_some((host, port))
}

/// What one page says, per worker.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct WorkerSample {
    pub worker_id: String,
    pub kv_cache_utilization: Option<f64>,
    pub queue_depth: Option<f64>,
    pub batch_size: Option<f64>,
    /// (reason, the engine's running total).
    pub preemptions: Vec<(String, f64)>,
}

/// Pure: parses a Prometheus text page and normalises it, one entry per worker in page order.
/// `default_worker` (the URL's `host:port`) is the worker id when a sample has no worker label,
/// and qualifies it when it has one (see [`worker_id`]). Malformed lines are skipped; a page
/// without a single usable known metric is an error.
pub fn normalize(page: &str, default_worker: &str) -> Result<Vec<WorkerSample>, EngineError> {
    normalize::normalize_counted(page, default_worker).map(|(w, _)| w)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> EngineUrl {
        s.parse().unwrap_or_else(|e| panic!("{s:?}: {e}"))
    }

    #[test]
    fn url_parsing() {
        let u = parse("http://localhost:8000/metrics");
        assert_eq!(
            (u.host_port().as_str(), u.path()),
            ("localhost:8000", "/metrics")
        );
        assert_eq!(u.to_string(), "http://localhost:8000/metrics");
        let u = parse("http://10.0.0.7/metrics");
        assert_eq!((u.host_port().as_str(), u.port()), ("10.0.0.7:80", 80));
        assert_eq!(parse("http://sglang:30000").path(), "/metrics");
        assert_eq!(parse("HTTP://Host:1/").host_port(), "host:1");
        assert_eq!(parse("http://h:1/").path(), "/");
        assert_eq!(parse("http://h:1/m?x=1#frag").path(), "/m?x=1");
        assert_eq!(parse("http://h:1?x=1").path(), "/?x=1");
        let u = parse("http://[::1]:9000/m");
        assert_eq!((u.host_port().as_str(), u.host()), ("[::1]:9000", "[::1]"));
        assert_eq!(parse("http://[fe80::1]/m").host(), "[fe80::1]");
    }

    #[test]
    fn url_errors_say_why() {
        let err = |s: &str| match s.parse::<EngineUrl>() {
            Ok(u) => panic!("{s:?} parsed as {u:?}"),
            Err(e) => e,
        };
        assert!(matches!(err("https://h/metrics"), EngineError::Tls { .. }));
        assert!(err("https://h/metrics").to_string().contains("TLS"));
        assert!(matches!(
            err("ftp://h/x"),
            EngineError::UnsupportedScheme { .. }
        ));
        for bad in [
            "",
            "garbage",
            "localhost:8000/metrics",
            "://h",
            "http://",
            "http:///metrics",
            "http://:80/",
            "http://h:0/",
            "http://h:65536/",
            "http://h:/x",
            "http://h:8a/",
            "http://h:-1/",
            "http://u:p@h/",
            "http://h/a b",
            "http://h/a\nb",
            "http://h h/",
            "http://[::1/",
            "http://[]/",
            "http://[::1]x/",
            "http://ho$t/",
            "<html>://x",
        ] {
            let e = err(bad);
            assert!(
                matches!(e, EngineError::InvalidUrl { .. }),
                "{bad:?}: {e:?}"
            );
            assert!(e.to_string().contains("expected http://"), "{e}");
        }
    }
}
