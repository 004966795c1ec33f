//! Classifies one streamed JSON event (an SSE `data:` payload, an NDJSON line) or a whole
//! non-streaming JSON body: does it carry generated content, is it an error, what token counts does
//! it report.
//!
//! This runs once per generated token on the hot path, so it never builds a `serde_json::Value`:
//! fields are borrowed as `&RawValue` (a raw `""` is an empty string, no unescaping needed), the
//! `choices` array is walked by a visitor instead of collected, and everything else is skipped.

use serde::{
    de::{IgnoredAny, SeqAccess, Visitor},
    Deserialize, Deserializer,
};
use serde_json::value::RawValue;

use super::ParseErrorKind;

/// What one event told us.
#[expect(
    clippy::struct_excessive_bools,
    reason = "independent facts about one event"
)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Classified {
    /// Carries generated text, reasoning or tool-call tokens.
    pub content: bool,
    /// Stands for one generated token even when its text is empty: a choice with a `text` string
    /// (completions) or a chat `delta` with a `content` string that is not the role announcement,
    /// or a TGI `token` that is not special. vLLM sends one such event per token, also for tokens
    /// that decode to no text yet (a partial UTF-8 sequence, a random model's byte tokens).
    pub token: bool,
    /// `{"error": …}` (the `OpenAI` API, vLLM, TGI, Ollama), `"object": "error"` (older vLLM)
    /// or `"type": "error"` (Responses API).
    pub error: bool,
    /// Ollama's `"done": true`: nothing after it belongs to this answer.
    pub done: bool,
    pub prompt_tokens: Option<u64>,
    pub completion_tokens: Option<u64>,
    /// `super::id_hash` of the event's top-level `id` string (`chatcmpl-…`), when it has a plain
    /// one (no escapes, at most 128 bytes): latency attribution matches it in IPC bytes.
    pub id: Option<u64>,
}

/// Receives what a response body says, as the analyzer finds it.
pub(crate) trait EventSink {
    /// One event (or a whole JSON body); `ts` is when a client could have read it.
    fn event(&mut self, ev: Classified, ts: u64);
    /// An SSE `event: error`.
    fn stream_error(&mut self);
    fn parse_error(&mut self, kind: ParseErrorKind);
}

type Raw<'a> = Option<&'a RawValue>;

/// Top-level fields of every dialect we know. Fields whose type differs between dialects (Ollama's
/// `response` string vs the Responses API's `response` object, an error's `message` string vs
/// Ollama chat's `message` object) are kept raw and read by their first byte.
#[derive(Deserialize, Default)]
struct Event<'a> {
    /// `OpenAI` chat/completions, vLLM, `SGLang`, llama.cpp, TGI Messages API.
    #[serde(default)]
    choices: Choices,
    /// The response's id (`OpenAI` API: `chatcmpl-…`, `cmpl-…`).
    #[serde(borrow)]
    id: Raw<'a>,
    /// TGI `generate_stream`: `{"token": {"text": …, "special": …}}`.
    #[serde(borrow)]
    token: Raw<'a>,
    /// TGI `/generate` body and the last `generate_stream` event.
    #[serde(borrow)]
    generated_text: Raw<'a>,
    /// llama.cpp `/completion`.
    #[serde(borrow)]
    content: Raw<'a>,
    /// `SGLang` native `/generate`.
    #[serde(borrow)]
    text: Raw<'a>,
    /// Ollama `/api/generate` (string) or a Responses API event's response object.
    #[serde(borrow)]
    response: Raw<'a>,
    /// Ollama `/api/chat` (object) or an error's message (string).
    #[serde(borrow)]
    message: Raw<'a>,
    /// Responses API `response.*.delta` events.
    #[serde(borrow)]
    delta: Raw<'a>,
    #[serde(borrow)]
    error: Raw<'a>,
    #[serde(borrow)]
    object: Raw<'a>,
    #[serde(borrow, rename = "type")]
    kind: Raw<'a>,
    #[serde(borrow)]
    done: Raw<'a>,
    #[serde(borrow)]
    usage: Raw<'a>,
    /// TGI: `details.generated_tokens`.
    #[serde(borrow)]
    details: Raw<'a>,
    /// llama.cpp: `timings.prompt_n` / `timings.predicted_n`.
    #[serde(borrow)]
    timings: Raw<'a>,
    /// `SGLang`: `meta_info.prompt_tokens` / `meta_info.completion_tokens`.
    #[serde(borrow)]
    meta_info: Raw<'a>,
    #[serde(borrow)]
    tokens_predicted: Raw<'a>,
    #[serde(borrow)]
    tokens_evaluated: Raw<'a>,
    /// Ollama final line.
    #[serde(borrow)]
    eval_count: Raw<'a>,
    #[serde(borrow)]
    prompt_eval_count: Raw<'a>,
}

/// Whether any element of `choices` carries content, and whether any is a token slot (see
/// [`Classified::token`]); walked without collecting.
#[derive(Default)]
struct Choices {
    content: bool,
    token: bool,
}

impl<'de> Deserialize<'de> for Choices {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Choices;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a choices array")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Choices, A::Error> {
                let mut out = Choices::default();
                while let Some(choice) = seq.next_element::<Choice<'de>>()? {
                    out.content |= choice.has_content();
                    out.token |= choice.is_token();
                }
                Ok(out)
            }
            fn visit_unit<E>(self) -> Result<Choices, E> {
                Ok(Choices::default())
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Choices, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(Choices::default())
            }
        }
        d.deserialize_any(V)
    }
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct Choice<'a> {
    /// Completions API.
    #[serde(borrow)]
    text: Raw<'a>,
    /// Chat streaming. Always an object in the chat schema, so parsed in place (no second pass).
    #[serde(borrow)]
    delta: Option<Message<'a>>,
    /// Chat non-streaming.
    #[serde(borrow)]
    message: Option<Message<'a>>,
}

impl Choice<'_> {
    fn has_content(&self) -> bool {
        nonempty_str(self.text)
            || self.delta.as_ref().is_some_and(Message::has_content)
            || self.message.as_ref().is_some_and(Message::has_content)
    }

    fn is_token(&self) -> bool {
        self.text.is_some_and(|t| raw_starts_with(t, b'"'))
            || self.delta.as_ref().is_some_and(|d| {
                d.role.is_none() && d.content.is_some_and(|c| raw_starts_with(c, b'"'))
            })
    }
}

/// A chat `delta`/`message` (`OpenAI` API) or Ollama chat `message`.
#[derive(Deserialize, Default)]
#[serde(default)]
struct Message<'a> {
    /// Present on the chat stream's first event, the role announcement (no token).
    #[serde(borrow)]
    role: Raw<'a>,
    #[serde(borrow)]
    content: Raw<'a>,
    /// vLLM/SGLang/DeepSeek reasoning tokens (older and newer names).
    #[serde(borrow)]
    reasoning_content: Raw<'a>,
    #[serde(borrow)]
    reasoning: Raw<'a>,
    /// Ollama reasoning tokens.
    #[serde(borrow)]
    thinking: Raw<'a>,
    #[serde(borrow)]
    tool_calls: Raw<'a>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct Token<'a> {
    #[serde(borrow)]
    text: Raw<'a>,
    special: Option<bool>,
}

/// Token counts under every name we know; read leniently from raw numbers.
#[derive(Deserialize, Default)]
#[serde(default)]
struct Counts<'a> {
    /// `SGLang`'s `meta_info.id` (its `rid`): the request's id where the top level has none
    /// (read from `meta_info` only).
    #[serde(borrow)]
    id: Raw<'a>,
    #[serde(borrow)]
    prompt_tokens: Raw<'a>,
    #[serde(borrow)]
    completion_tokens: Raw<'a>,
    /// Responses API usage.
    #[serde(borrow)]
    input_tokens: Raw<'a>,
    #[serde(borrow)]
    output_tokens: Raw<'a>,
    /// TGI details.
    #[serde(borrow)]
    generated_tokens: Raw<'a>,
    /// llama.cpp timings.
    #[serde(borrow)]
    prompt_n: Raw<'a>,
    #[serde(borrow)]
    predicted_n: Raw<'a>,
}

impl Counts<'_> {
    fn prompt(&self) -> Option<u64> {
        raw_u64(self.prompt_tokens)
            .or(raw_u64(self.input_tokens))
            .or(raw_u64(self.prompt_n))
    }
    fn completion(&self) -> Option<u64> {
        raw_u64(self.completion_tokens)
            .or(raw_u64(self.output_tokens))
            .or(raw_u64(self.generated_tokens))
            .or(raw_u64(self.predicted_n))
    }
}

/// A Responses API `response` object (in `response.completed` / `response.failed`).
#[derive(Deserialize, Default)]
#[serde(default)]
struct ResponseObject<'a> {
    #[serde(borrow)]
    usage: Raw<'a>,
    #[serde(borrow)]
    error: Raw<'a>,
}

/// Classifies one JSON document. `Err` when it is not JSON or not an object.
pub(crate) fn classify(json: &[u8]) -> Result<Classified, serde_json::Error> {
    // One UTF-8 check up front lets serde_json skip its own per-string validation (`from_str`
    // is ~30% faster than `from_slice` on a typical chunk).
    let s = std::str::from_utf8(json).map_err(|_| serde::de::Error::custom("not UTF-8"))?;
    let ev: Event<'_> = serde_json::from_str(s)?;
    let mut out = Classified {
        id: ev.id.and_then(plain_id).map(super::id_hash),
        error: not_null(ev.error) || raw_is_str(ev.object, "error") || raw_is_str(ev.kind, "error"),
        done: ev.done.is_some_and(|r| raw_bytes(r) == b"true"),
        ..Classified::default()
    };

    // TGI streams put the whole text in `generated_text` of the last event next to its (special)
    // token, so `generated_text` counts only where there is no `token` (the `/generate` body).
    let (token_content, tgi_token) = match ev.token {
        Some(raw) => {
            let tok: Token<'_> = parse_object(raw).unwrap_or_default();
            let special = tok.special == Some(true);
            (nonempty_str(tok.text) && !special, !special)
        }
        None => (nonempty_str(ev.generated_text), false),
    };
    let mut response_obj = ResponseObject::default();
    let response_content = match ev.response {
        Some(raw) if raw_starts_with(raw, b'{') => {
            response_obj = parse_object(raw).unwrap_or_default();
            false
        }
        other => nonempty_str(other),
    };
    out.error |= not_null(response_obj.error);
    out.token = ev.choices.token || tgi_token;
    out.content = ev.choices.content
        || token_content
        || response_content
        || nonempty_str(ev.content)
        || nonempty_str(ev.text)
        || nonempty_str(ev.delta)
        || message_has_content(ev.message);

    // `meta_info` is parsed once, for its counts and (without a top-level id) SGLang's id.
    let meta = ev.meta_info.map(|r| (r, true));
    let others = [ev.usage, ev.details, ev.timings, response_obj.usage];
    for (raw, is_meta) in others.into_iter().flatten().map(|r| (r, false)).chain(meta) {
        if let Some(c) = parse_object::<Counts<'_>>(raw) {
            out.prompt_tokens = out.prompt_tokens.or(c.prompt());
            out.completion_tokens = out.completion_tokens.or(c.completion());
            if is_meta && out.id.is_none() {
                out.id = c.id.and_then(plain_id).map(super::id_hash);
            }
        }
    }
    out.prompt_tokens = out
        .prompt_tokens
        .or(raw_u64(ev.prompt_eval_count))
        .or(raw_u64(ev.tokens_evaluated));
    out.completion_tokens = out
        .completion_tokens
        .or(raw_u64(ev.eval_count))
        .or(raw_u64(ev.tokens_predicted));
    Ok(out)
}

/// Whether the captured start of an event that the capture cut (its JSON cannot be parsed) shows
/// generated text: a `content`, `text`, `response`, reasoning or thinking key whose string value
/// starts with a character. A role announcement (`"content":""`) or `null` does not count.
pub(crate) fn prefix_has_content(prefix: &[u8]) -> bool {
    const KEYS: [&[u8]; 6] = [
        b"\"content\"",
        b"\"text\"",
        b"\"response\"",
        b"\"reasoning_content\"",
        b"\"reasoning\"",
        b"\"thinking\"",
    ];
    let ws = |b: &u8| matches!(b, b' ' | b'\t' | b'\r' | b'\n');
    KEYS.iter().any(|key| {
        memchr::memmem::find_iter(prefix, key).any(|at| {
            let mut rest = prefix[at + key.len()..].iter().skip_while(|b| ws(b));
            rest.next() == Some(&b':') && {
                let mut value = rest.skip_while(|b| ws(b));
                value.next() == Some(&b'"') && value.next().is_some_and(|&b| b != b'"')
            }
        })
    })
}

/// A top-level `message` that is an object (Ollama chat) with content; error strings are not.
fn message_has_content(raw: Raw<'_>) -> bool {
    raw.and_then(parse_object::<Message<'_>>)
        .is_some_and(|m| m.has_content())
}

impl Message<'_> {
    fn has_content(&self) -> bool {
        nonempty_value(self.content)
            || nonempty_str(self.reasoning_content)
            || nonempty_str(self.reasoning)
            || nonempty_str(self.thinking)
            || nonempty_value(self.tool_calls)
    }
}

/// Parses a nested raw object; `None` for anything else or on a type mismatch inside.
fn parse_object<'a, T: Deserialize<'a>>(raw: &'a RawValue) -> Option<T> {
    if !raw_starts_with(raw, b'{') {
        return None;
    }
    serde_json::from_str(raw.get()).ok()
}

fn raw_bytes(raw: &RawValue) -> &[u8] {
    raw.get().trim_ascii().as_bytes()
}

/// The bytes of a JSON string without escapes, 1 to 128 bytes long.
fn plain_id(raw: &RawValue) -> Option<&[u8]> {
    let inner = raw_bytes(raw).strip_prefix(b"\"")?.strip_suffix(b"\"")?;
    (!inner.is_empty() && inner.len() <= 128 && !inner.contains(&b'\\')).then_some(inner)
}

fn raw_starts_with(raw: &RawValue, b: u8) -> bool {
    raw_bytes(raw).first() == Some(&b)
}

/// A JSON string with at least one character (`""` is two bytes raw).
fn nonempty_str(raw: Raw<'_>) -> bool {
    raw.is_some_and(|r| {
        let b = raw_bytes(r);
        b.len() > 2 && b.first() == Some(&b'"')
    })
}

/// A non-empty string or a non-empty array (`content` may be a list of parts, `tool_calls` a list).
fn nonempty_value(raw: Raw<'_>) -> bool {
    if nonempty_str(raw) {
        return true;
    }
    raw.is_some_and(|r| match raw_bytes(r).split_first() {
        Some((b'[', rest)) => rest.trim_ascii_start().first() != Some(&b']'),
        _ => false,
    })
}

fn not_null(raw: Raw<'_>) -> bool {
    raw.is_some_and(|r| raw_bytes(r) != b"null")
}

fn raw_is_str(raw: Raw<'_>, want: &str) -> bool {
    raw.is_some_and(|r| {
        raw_bytes(r)
            .strip_prefix(b"\"")
            .and_then(|b| b.strip_suffix(b"\""))
            == Some(want.as_bytes())
    })
}

/// A non-negative integer; floats like `12.0` are accepted, anything else is `None`.
fn raw_u64(raw: Raw<'_>) -> Option<u64> {
    let s = raw?.get().trim();
    s.parse::<u64>().ok().or_else(|| {
        let f = s.parse::<f64>().ok()?;
        (f.is_finite() && f >= 0.0 && f.fract() == 0.0 && f < 1e18).then_some(f as u64)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(s: &str) -> Classified {
        classify(s.as_bytes()).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn openai_chat_chunks() {
        let role = r#"{"id":"x","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]}"#;
        assert!(!c(role).content);
        assert!(!c(role).token, "the role announcement is no token");
        let role_only = r#"{"choices":[{"index":0,"delta":{"role":"assistant"}}]}"#;
        assert!(!c(role_only).content);
        let tok = r#"{"id":"x","choices":[{"index":0,"delta":{"content":"Hi"},"logprobs":null,"finish_reason":null}]}"#;
        assert!(c(tok).content);
        let reasoning = r#"{"choices":[{"delta":{"reasoning_content":"hm"}}]}"#;
        assert!(c(reasoning).content);
        let tools =
            r#"{"choices":[{"delta":{"tool_calls":[{"index":0,"function":{"arguments":"{"}}]}}]}"#;
        assert!(c(tools).content);
        let empty_tools = r#"{"choices":[{"delta":{"tool_calls":[ ]}}]}"#;
        assert!(!c(empty_tools).content);
        let finish = r#"{"choices":[{"index":0,"delta":{},"finish_reason":"stop"}],"usage":null}"#;
        assert!(!c(finish).content);
        let usage = r#"{"choices":[],"usage":{"prompt_tokens":12,"completion_tokens":34,"total_tokens":46}}"#;
        let u = c(usage);
        assert!(!u.content);
        assert_eq!((u.prompt_tokens, u.completion_tokens), (Some(12), Some(34)));
        let completions = r#"{"choices":[{"text":" the","index":0}]}"#;
        assert!(c(completions).content);
        let non_stream = r#"{"choices":[{"message":{"role":"assistant","content":"Hello"}}],"usage":{"prompt_tokens":1,"completion_tokens":2}}"#;
        assert!(c(non_stream).content);
    }

    #[test]
    fn the_response_id_is_kept_as_a_hash_only_when_plain() {
        let id = |s: &str| c(s).id;
        let h = Some(super::super::id_hash(b"chatcmpl-42ab"));
        assert_eq!(id(r#"{"id":"chatcmpl-42ab","choices":[]}"#), h);
        assert_eq!(id(r#"{"id": "chatcmpl-42ab" ,"choices":[]}"#), h);
        for odd in [
            r#"{"id":"a\"b"}"#,
            r#"{"id":""}"#,
            r#"{"id":7}"#,
            r#"{"choices":[]}"#,
        ] {
            assert_eq!(id(odd), None, "{odd}");
        }
        // SGLang's native /generate: the rid in meta_info; a top-level id wins.
        let rid = "0123456789abcdef0123456789abcdef";
        let native = format!(r#"{{"text":"a","meta_info":{{"id":"{rid}","prompt_tokens":3}}}}"#);
        assert_eq!(id(&native), Some(super::super::id_hash(rid.as_bytes())));
        assert_eq!(c(&native).prompt_tokens, Some(3));
        let both = format!(r#"{{"id":"chatcmpl-42ab","meta_info":{{"id":"{rid}"}}}}"#);
        assert_eq!(id(&both), h);
        let elsewhere = format!(r#"{{"text":"a","usage":{{"id":"{rid}"}}}}"#);
        assert_eq!(id(&elsewhere), None, "only meta_info's id counts");
    }

    #[test]
    fn cut_event_prefixes() {
        let yes = [
            &br#"{"id":"x","choices":[{"index":0,"delta":{"content":"Hel"#[..],
            br#"{"choices":[{"text": "a"#,
            br#"{"model":"m","response":"to"#,
            br#"{"choices":[{"delta":{"reasoning_content":"hm"#,
        ];
        for p in yes {
            assert!(prefix_has_content(p), "{}", String::from_utf8_lossy(p));
        }
        let no = [
            &br#"{"choices":[{"delta":{"role":"assistant","content":""}"#[..],
            br#"{"choices":[{"delta":{"content":null"#,
            br#"{"choices":[{"delta":{"content":"#,
            br#"{"usage":{"prompt_tokens":3"#,
            b"",
        ];
        for p in no {
            assert!(!prefix_has_content(p), "{}", String::from_utf8_lossy(p));
        }
    }

    /// vLLM streams one event per token, also for tokens that decode to no text yet.
    #[test]
    fn token_events_with_and_without_text() {
        let t = |s: &str| (c(s).content, c(s).token);
        let empty_delta = r#"{"choices":[{"index":0,"delta":{"content":""},"finish_reason":null,"token_ids":null}]}"#;
        assert_eq!(t(empty_delta), (false, true));
        let last = r#"{"choices":[{"index":0,"delta":{"content":""},"finish_reason":"length"}]}"#;
        assert_eq!(t(last), (false, true));
        let empty_text = r#"{"object":"text_completion","choices":[{"index":0,"text":"","finish_reason":null}]}"#;
        assert_eq!(t(empty_text), (false, true));
        assert_eq!(t(r#"{"choices":[{"text":"ab"}]}"#), (true, true));
        // llama-cpp-python's closing chat event and a usage-only event are no tokens.
        assert_eq!(
            t(r#"{"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}"#),
            (false, false)
        );
        assert_eq!(
            t(r#"{"choices":[],"usage":{"completion_tokens":3}}"#),
            (false, false)
        );
        assert_eq!(
            t(r#"{"choices":[{"delta":{"content":null}}]}"#),
            (false, false)
        );
        // TGI: a special token (</s>) is no generated token.
        assert_eq!(
            t(r#"{"token":{"id":5,"text":"","special":false}}"#),
            (false, true)
        );
        assert_eq!(
            t(r#"{"token":{"id":2,"text":"</s>","special":true}}"#),
            (false, false)
        );
    }

    #[test]
    fn errors() {
        assert!(c(r#"{"error":{"message":"boom","type":"BadRequestError","code":400}}"#).error);
        assert!(c(r#"{"object":"error","message":"boom","type":"x","code":500}"#).error);
        assert!(c(r#"{"error":"model not found"}"#).error);
        assert!(!c(r#"{"error":null,"choices":[]}"#).error);
        assert!(c(r#"{"type":"response.failed","response":{"error":{"code":"x"}}}"#).error);
    }

    #[test]
    fn tgi_ollama_llamacpp_sglang_responses() {
        let tgi = r#"{"index":1,"token":{"id":5,"text":" a","logprob":-0.1,"special":false},"generated_text":null,"details":null}"#;
        assert!(c(tgi).content);
        let tgi_last = r#"{"index":9,"token":{"id":2,"text":"</s>","special":true},"generated_text":"full","details":{"finish_reason":"eos_token","generated_tokens":9}}"#;
        let l = c(tgi_last);
        assert!(!l.content);
        assert_eq!(l.completion_tokens, Some(9));
        assert!(c(r#"{"generated_text":"hello","details":null}"#).content);
        let ollama = r#"{"model":"m","created_at":"t","response":"Hi","done":false}"#;
        assert!(c(ollama).content);
        let ollama_done =
            r#"{"model":"m","response":"","done":true,"prompt_eval_count":7,"eval_count":20}"#;
        let d = c(ollama_done);
        assert!(!d.content && d.done);
        assert_eq!((d.prompt_tokens, d.completion_tokens), (Some(7), Some(20)));
        assert!(
            c(r#"{"model":"m","message":{"role":"assistant","content":"x"},"done":false}"#).content
        );
        assert!(!c(r#"{"message":"an error message"}"#).content);
        let llama = r#"{"content":"","stop":true,"tokens_predicted":33,"timings":{"prompt_n":4,"predicted_n":33}}"#;
        let l = c(llama);
        assert_eq!(
            (l.content, l.prompt_tokens, l.completion_tokens),
            (false, Some(4), Some(33))
        );
        assert!(c(r#"{"content":"tok","stop":false}"#).content);
        assert!(
            c(r#"{"text":"abc","meta_info":{"prompt_tokens":3,"completion_tokens":1}}"#).content
        );
        assert!(c(r#"{"type":"response.output_text.delta","delta":"Hi"}"#).content);
        let done = r#"{"type":"response.completed","response":{"usage":{"input_tokens":5,"output_tokens":6},"error":null}}"#;
        let r = c(done);
        assert_eq!(
            (r.content, r.error, r.prompt_tokens, r.completion_tokens),
            (false, false, Some(5), Some(6))
        );
    }

    #[test]
    fn not_json_is_an_error() {
        assert!(classify(b"hello").is_err());
        assert!(classify(b"{\"choices\":[").is_err());
        assert!(classify(b"[1,2]").is_err());
    }

    /// The per-token cost budget is ~0.5 µs for a typical chunk; this prints what it is here.
    #[test]
    #[ignore = "timing only meaningful in release: cargo test --release -- --ignored classify_speed"]
    fn classify_speed() {
        let chunk = br#"{"id":"chatcmpl-8f1c2a9e4b7d4c0e9a1b2c3d4e5f6a7b","object":"chat.completion.chunk","created":1718000000,"model":"meta-llama/Meta-Llama-3-8B-Instruct","system_fingerprint":null,"choices":[{"index":0,"delta":{"content":" world"},"logprobs":null,"finish_reason":null}]}"#;
        let n = 200_000u32;
        let start = std::time::Instant::now();
        let mut hits = 0u32;
        for _ in 0..n {
            hits += u32::from(classify(std::hint::black_box(chunk)).is_ok_and(|c| c.content));
        }
        let per = start.elapsed() / n;
        assert_eq!(hits, n);
        eprintln!("classify: {} bytes in {per:?}", chunk.len());
    }

    #[test]
    fn counts_are_lenient() {
        assert_eq!(
            raw_u64(serde_json::from_str::<&RawValue>("12.0").ok()),
            Some(12)
        );
        assert_eq!(raw_u64(serde_json::from_str::<&RawValue>("-1").ok()), None);
        assert_eq!(
            raw_u64(serde_json::from_str::<&RawValue>("\"3\"").ok()),
            None
        );
    }
}
