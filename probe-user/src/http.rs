//! HTTP/1.1 as seen from the server's sockets: request heads and the few JSON body fields we need
//! (`request.rs`), response framing and streaming events (`response.rs`), and the per-connection
//! state machine that turns both directions into timed requests (`conn.rs`); TLS plaintext tied
//! to its connection (`tls.rs`); HTTP/2 framing (`h2.rs`), its streams timed as requests by the
//! same state machine (`conn/h2.rs`).
//!
//! Pure logic: no aya types, no I/O, unit-tested without root. Payload bytes are inspected only to
//! find framing and the fields named in `RequestMeta`; no prompt or completion text is kept.

mod body;
mod classify;
pub mod conn;
pub mod grpc;
mod h2;
pub mod request;
pub mod response;
mod shape;
mod sniff;
mod sse;
pub mod tls;

pub use conn::ConnTracker;
pub use probe_common::ThreadClock;
use probe_common::MAX_ARRIVAL_MARKS;

/// Connection identity: the traced process and the server-side socket fd. Successive connections
/// that reuse an fd number are told apart by the accept and close records between them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId {
    pub tgid: u32,
    pub fd: u32,
}

/// LLM API endpoints we time, normalised to a bounded label. Any other path (the engine's
/// `/metrics`, `/health`, `/v1/models`, …) is parsed to keep pipelining in step but not timed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Endpoint {
    /// `/v1/chat/completions` (`OpenAI`, vLLM, `SGLang`, llama.cpp, TGI Messages API, Ollama).
    ChatCompletions,
    /// `/v1/completions`.
    Completions,
    /// `/v1/embeddings`.
    Embeddings,
    /// `/v1/responses`.
    Responses,
    /// TGI `/generate`, `SGLang` `/generate`.
    Generate,
    /// TGI `/generate_stream`.
    GenerateStream,
    /// Ollama `/api/generate`.
    OllamaGenerate,
    /// Ollama `/api/chat`.
    OllamaChat,
    /// llama.cpp server `/completion` (and `/completions`).
    LlamaCompletion,
    /// A gRPC method (`/package.Service/Method`): slot 1.. of the bounded set of paths labelled
    /// by name, 0 for `grpc_other` (`grpc.rs`).
    Grpc(u8),
}

impl Endpoint {
    pub const ALL: [Endpoint; 9] = [
        Self::ChatCompletions,
        Self::Completions,
        Self::Embeddings,
        Self::Responses,
        Self::Generate,
        Self::GenerateStream,
        Self::OllamaGenerate,
        Self::OllamaChat,
        Self::LlamaCompletion,
    ];

    /// Endpoints there can be: the HTTP paths and the gRPC method slots.
    pub const SLOTS: usize = Self::ALL.len() + 1 + grpc::MAX_GRPC_METHODS;

    /// Its index below `SLOTS` (per-endpoint tables).
    pub fn slot(self) -> usize {
        match self {
            Self::Grpc(i) => Self::ALL.len() + usize::from(i).min(grpc::MAX_GRPC_METHODS),
            e => Self::ALL.iter().position(|a| *a == e).unwrap_or(0),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Grpc(slot) => grpc::method_label(slot),
            Self::ChatCompletions => "/v1/chat/completions",
            Self::Completions => "/v1/completions",
            Self::Embeddings => "/v1/embeddings",
            Self::Responses => "/v1/responses",
            Self::Generate => "/generate",
            Self::GenerateStream => "/generate_stream",
            Self::OllamaGenerate => "/api/generate",
            Self::OllamaChat => "/api/chat",
            Self::LlamaCompletion => "/completion",
        }
    }
}

/// How a request ended. `as_str` values are the `status` label of `llm_requests_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// 2xx and the response completed.
    Ok,
    /// 4xx status.
    ClientError,
    /// 5xx status.
    ServerError,
    /// 2xx status, but the stream carried an error event (`{"error": …}`, `event: error`).
    StreamError,
    /// The client closed the connection before the response was complete.
    ClientAbort,
    /// The server closed the connection (or a write failed) before the response was complete.
    ServerReset,
}

impl Outcome {
    pub const ALL: [Outcome; 6] = [
        Self::Ok,
        Self::ClientError,
        Self::ServerError,
        Self::StreamError,
        Self::ClientAbort,
        Self::ServerReset,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::ClientError => "client_error",
            Self::ServerError => "server_error",
            Self::StreamError => "stream_error",
            Self::ClientAbort => "client_abort",
            Self::ServerReset => "server_reset",
        }
    }

    pub const fn is_error(self) -> bool {
        !matches!(self, Self::Ok)
    }
}

/// What the request told us about itself. Strings are bounded (`MAX_FIELD_LEN`) and are ids and
/// model names only — never prompt text.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RequestMeta {
    pub endpoint: Option<Endpoint>,
    pub model: Option<String>,
    pub stream: Option<bool>,
    pub max_tokens: Option<u64>,
    pub priority: Option<i64>,
    /// `X-Request-Id` header, so an operator can find one slow request.
    pub request_id: Option<String>,
    /// The request's number in the connection tracker: tells apart requests of one connection
    /// that are in flight together (HTTP/2 streams) in the `Observer` calls.
    pub seq: u64,
}

/// Longest model name or request id kept; longer values are cut at a char boundary.
pub const MAX_FIELD_LEN: usize = 128;
/// Gaps kept per request for `/api/v1/requests` (TBT histograms see every gap regardless): 8 KiB
/// per request, so the 4,096 finished requests of the log hold at most 32 MiB of gaps (the
/// in-flight ones count against the memory budget).
pub const MAX_GAPS_KEPT: usize = 1024;

/// One server read or write as the kernel saw it: its time, the thread that made it and that
/// thread's scheduler clock then (all zero when unknown). Latency attribution splits the time
/// between two moments of one thread into on-CPU, runnable and blocked.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Moment {
    pub ts_ns: u64,
    pub tid: u32,
    pub clock: ThreadClock,
}

/// When the bytes of one read reached the socket, by their offset in the read (the kernel's
/// `ArrivalEvent`): a request that begins past the read's first byte (behind HTTP/2 connection
/// frames, a pipelined request) is dated by the arrival that brought its first byte, not the
/// read's oldest one.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReadArrival {
    /// When the read's first bytes did (its date).
    pub first_ns: u64,
    /// `(end, ts)`, ends non-decreasing: bytes before offset `end` not covered by an earlier
    /// part came at `ts`. None: one arrival brought the read.
    parts: [(u32, u64); MAX_ARRIVAL_MARKS],
    n: usize,
}

impl ReadArrival {
    pub const fn one(first_ns: u64) -> Self {
        Self {
            first_ns,
            parts: [(0, 0); MAX_ARRIVAL_MARKS],
            n: 0,
        }
    }

    /// A read in `(end, ts)` parts; each part's time is kept within `first_ns ..= read_ns` and
    /// the ends are made non-decreasing (at most `MAX_ARRIVAL_MARKS` parts are kept).
    pub fn parts(first_ns: u64, read_ns: u64, parts: impl IntoIterator<Item = (u32, u64)>) -> Self {
        let mut me = Self::one(first_ns);
        let mut end = 0;
        for (e, ts) in parts.into_iter().take(MAX_ARRIVAL_MARKS) {
            end = end.max(e);
            me.parts[me.n] = (end, ts.clamp(first_ns, read_ns.max(first_ns)));
            me.n += 1;
        }
        me
    }

    /// When the read's last part arrived (its first when it came in one).
    pub fn last(&self) -> u64 {
        self.parts[..self.n]
            .last()
            .map_or(self.first_ns, |&(_, ts)| ts)
    }

    /// When the byte at offset `off` of the read arrived: its part's time (past every part: the
    /// last one's, an upper bound), or the read's first.
    pub fn at(&self, off: usize) -> u64 {
        let parts = &self.parts[..self.n];
        parts
            .iter()
            .find(|&&(end, _)| off < end as usize)
            .or(parts.last())
            .map_or(self.first_ns, |&(_, ts)| ts)
    }
}

/// The time between two successive content writes of a request: the two writes as moments
/// (`to.ts_ns` ≥ `from.ts_ns`), so that the thread that made both can have its time split, and
/// the request's response id (`RequestRecord::response_id`) when it streamed one by then.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Gap {
    pub from: Moment,
    pub to: Moment,
    pub id: Option<u64>,
}

impl Gap {
    pub const fn ns(&self) -> u64 {
        self.to.ts_ns.saturating_sub(self.from.ts_ns)
    }
}

/// One finished request, with the timings the probe measured. Timestamps are `CLOCK_MONOTONIC` ns.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestRecord {
    pub conn: ConnId,
    pub meta: RequestMeta,
    pub status: Option<u16>,
    pub outcome: Outcome,
    /// When the request's bytes reached the server's socket (the kernel's arrival stamp; the
    /// server's first read when the arrival programs are not attached).
    pub arrival_ns: u64,
    /// First response event carrying generated content.
    pub first_token_ns: Option<u64>,
    /// The server's read that returned the request's first bytes (`ts_ns` 0: not known).
    pub read: Moment,
    /// The write of the first content event (`None` without one); its `ts_ns` is
    /// `first_token_ns`.
    pub first_token_at: Option<Moment>,
    /// Last byte of the response written (or the abort/reset).
    pub end_ns: u64,
    /// Content-carrying events (SSE `data:` with choices/tokens, NDJSON lines with text).
    pub content_events: u64,
    /// Events that stand for a generated token, with text or without (vLLM sends one per token,
    /// also for tokens that decode to no text yet); at least `content_events`.
    pub token_events: u64,
    /// Gaps between successive content events, first `MAX_GAPS_KEPT`.
    pub gaps_ns: Vec<u64>,
    pub prompt_tokens: Option<u64>,
    pub completion_tokens: Option<u64>,
    /// Hash (`attribution::id_hash`) of the id the response streamed (`"id": "chatcmpl-…"`), from
    /// its first event that had one; the id itself is not kept.
    pub response_id: Option<u64>,
}

/// The hash a response's id is kept and matched by (`RequestRecord::response_id`, and the id
/// tokens latency attribution finds in IPC bytes): `FxHash` of the id's bytes.
pub fn id_hash(id: &[u8]) -> u64 {
    use std::hash::Hasher as _;
    let mut h = rustc_hash::FxHasher::default();
    h.write(id);
    h.write_u8(0xff);
    h.finish()
}

impl RequestRecord {
    /// Generated tokens: `usage.completion_tokens` when the server said, else one per token
    /// event (exact for vLLM while its API server keeps up; whoever merges tokens into one event —
    /// vLLM under load, llama-cpp-python — counts fewer).
    pub fn tokens(&self) -> u64 {
        self.completion_tokens.unwrap_or(self.token_events)
    }
}

/// Kinds of bad input, the `kind` label of `llm_probe_parse_errors_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ParseErrorKind {
    /// Bytes on a tracked socket that are not HTTP/1.x (TLS, HTTP/2, a binary protocol).
    NotHttp,
    /// Malformed request line or headers.
    BadRequest,
    /// Request head over `request::MAX_HEAD_BYTES`.
    HeadTooLarge,
    /// Malformed status line or response headers.
    BadResponse,
    /// Malformed chunked framing.
    BadChunk,
    /// A streaming event (SSE data, NDJSON line, JSON body) that is not valid JSON.
    BadEvent,
    /// A response with no request waiting for it.
    UnmatchedResponse,
    /// The kernel captured only a prefix of a large read/write, so framing inside was lost.
    TruncatedCapture,
    /// TLS records on a connection of a process whose OpenSSL calls are not probed (no libssl
    /// found, or a TLS library other than OpenSSL): nothing on it can be read.
    TlsUnreadable,
    /// HTTP/2 that cannot be followed: malformed frames, a header block that does not decode
    /// (HPACK out of step) or whose frame bytes were not captured. The connection is dropped.
    BadH2,
    /// An HTTP/2 connection picked up mid-stream (opened before the probe attached): without its
    /// HPACK state no header can be trusted, so it is not followed.
    H2Midstream,
}

impl ParseErrorKind {
    pub const ALL: [ParseErrorKind; 11] = [
        Self::NotHttp,
        Self::BadRequest,
        Self::HeadTooLarge,
        Self::BadResponse,
        Self::BadChunk,
        Self::BadEvent,
        Self::UnmatchedResponse,
        Self::TruncatedCapture,
        Self::TlsUnreadable,
        Self::BadH2,
        Self::H2Midstream,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::NotHttp => "not_http",
            Self::BadRequest => "bad_request",
            Self::HeadTooLarge => "head_too_large",
            Self::BadResponse => "bad_response",
            Self::BadChunk => "bad_chunk",
            Self::BadEvent => "bad_event",
            Self::UnmatchedResponse => "unmatched_response",
            Self::TruncatedCapture => "truncated_capture",
            Self::TlsUnreadable => "tls_unreadable",
            Self::BadH2 => "bad_h2",
            Self::H2Midstream => "h2_midstream",
        }
    }
}

/// Receives what the connection state machine learns, as it learns it. The metrics layer
/// implements it; tests implement it with a recorder.
pub trait Observer {
    /// A timed (LLM endpoint) request's head was parsed. `arrival_ns` is when its first byte
    /// reached the socket (see `RequestRecord::arrival_ns`).
    fn request_started(&mut self, conn: ConnId, meta: &RequestMeta, arrival_ns: u64);
    /// The first content event of a timed request was written.
    fn first_token(&mut self, conn: ConnId, meta: &RequestMeta, ttft_ns: u64);
    /// A further content event was written, `gap.ns()` after the previous one.
    fn token_gap(&mut self, conn: ConnId, meta: &RequestMeta, gap: Gap);
    /// A timed request ended (any outcome).
    fn request_finished(&mut self, record: RequestRecord);
    /// Input that could not be parsed; the connection resynchronises or stops being parsed.
    fn parse_error(&mut self, conn: ConnId, kind: ParseErrorKind);
    /// The connection carries something we will never parse: stop capturing it in the kernel.
    fn untrack(&mut self, conn: ConnId) {
        let _ = conn;
    }
    /// The memory budget made the parser give back `what` (`request_body`, `response_body`,
    /// `gaps`); the request itself is still timed.
    fn budget_dropped(&mut self, conn: ConnId, what: &'static str) {
        let _ = (conn, what);
    }
}
