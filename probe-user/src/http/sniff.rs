//! The few JSON body fields that describe a request (`model`, `stream`, `max_tokens`,
//! `priority`), read from the captured prefix of its body. Prompt and message text is skipped,
//! never copied.

use std::borrow::Cow;

use serde::Deserialize;
use serde_json::value::RawValue;

use super::{request::cut_field, Endpoint, RequestMeta};

/// The body fields we keep, from whichever parse found them.
#[derive(Debug, Default, PartialEq, Eq)]
struct Fields {
    model: Option<String>,
    stream: Option<bool>,
    max_tokens: Option<u64>,
    priority: Option<i64>,
}

impl Fields {
    /// Reads one top-level field from its raw JSON text; wrong types are ignored, not errors.
    fn set(&mut self, key: &str, raw: &str) {
        let raw = raw.trim();
        match key {
            "model" => {
                if let Ok(s) = serde_json::from_str::<Cow<'_, str>>(raw) {
                    self.model = Some(cut_field(&s));
                }
            }
            "stream" => self.stream = raw.parse::<bool>().ok().or(self.stream),
            // The first of these the body has wins; llama.cpp's `n_predict: -1` means unlimited.
            "max_tokens" | "max_completion_tokens" | "n_predict" | "max_new_tokens" => {
                self.max_tokens = self.max_tokens.or(raw.parse::<u64>().ok());
            }
            "priority" => self.priority = raw.parse::<i64>().ok().or(self.priority),
            _ => {}
        }
    }
}

/// Only the fields we need, borrowed raw; every other key (the prompt) is skipped unparsed.
#[derive(Deserialize, Default)]
#[serde(default)]
struct Sniff<'a> {
    #[serde(borrow)]
    model: Option<&'a RawValue>,
    #[serde(borrow)]
    stream: Option<&'a RawValue>,
    #[serde(borrow)]
    max_tokens: Option<&'a RawValue>,
    #[serde(borrow)]
    max_completion_tokens: Option<&'a RawValue>,
    #[serde(borrow)]
    n_predict: Option<&'a RawValue>,
    #[serde(borrow)]
    priority: Option<&'a RawValue>,
    /// TGI: `parameters.max_new_tokens`.
    #[serde(borrow)]
    parameters: Option<&'a RawValue>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct Parameters<'a> {
    #[serde(borrow)]
    max_new_tokens: Option<&'a RawValue>,
}

/// Fills `meta` from the captured body. `complete` is false when bytes were not captured or the
/// sniff cap cut the body: then a tolerant scan of the top-level keys replaces the JSON parse.
pub(crate) fn apply_body(meta: &mut RequestMeta, body: &[u8], complete: bool) {
    let mut f = Fields::default();
    let parsed = complete && parse_fields(body, &mut f);
    if !parsed {
        f = Fields::default();
        scan_fields(body, &mut f);
    }
    meta.model = f.model;
    meta.max_tokens = f.max_tokens;
    meta.priority = f.priority;
    meta.stream = match meta.endpoint {
        Some(Endpoint::GenerateStream) => Some(true),
        // Ollama streams unless the request says `"stream": false`.
        Some(Endpoint::OllamaGenerate | Endpoint::OllamaChat) => Some(f.stream.unwrap_or(true)),
        _ => f.stream,
    };
}

fn parse_fields(body: &[u8], f: &mut Fields) -> bool {
    let Ok(s) = serde_json::from_slice::<Sniff<'_>>(body) else {
        return false;
    };
    let pairs = [
        ("model", s.model),
        ("stream", s.stream),
        ("max_tokens", s.max_tokens),
        ("max_completion_tokens", s.max_completion_tokens),
        ("n_predict", s.n_predict),
        ("priority", s.priority),
    ];
    for (key, raw) in pairs {
        if let Some(raw) = raw {
            f.set(key, raw.get());
        }
    }
    if let Some(p) = s
        .parameters
        .and_then(|raw| serde_json::from_str::<Parameters<'_>>(raw.get()).ok())
    {
        if let Some(raw) = p.max_new_tokens {
            f.set("max_new_tokens", raw.get());
        }
    }
    true
}

/// Walks the top-level object of a possibly truncated JSON body and reads the scalar values of
/// the keys we want (and `parameters.max_new_tokens`). Stops quietly where the bytes end or stop
/// being JSON. Keys are recognised only at depth 1, so a `"model"` inside a message's text (where
/// its quotes would be escaped) or inside a nested object is never taken.
fn scan_fields(body: &[u8], f: &mut Fields) {
    let i = skip_ws(body, 0);
    if body.get(i) == Some(&b'{') {
        // Where the capture ends the walk ends; whatever was read so far stays in `f`.
        let _ = scan_object(body, i + 1, f, true);
    }
}

/// Scans object members from `i` (just after `{`); returns the index after `}`.
fn scan_object(b: &[u8], mut i: usize, f: &mut Fields, top: bool) -> Option<usize> {
    loop {
        i = skip_ws(b, i);
        match b.get(i)? {
            b'}' => return Some(i + 1),
            b',' => i += 1,
            b'"' => {
                let key_end = skip_string(b, i)?;
                let key = b.get(i + 1..key_end - 1)?;
                i = skip_ws(b, key_end);
                if b.get(i)? != &b':' {
                    return None;
                }
                i = skip_ws(b, i + 1);
                if top && key == b"parameters" && b.get(i) == Some(&b'{') {
                    let mut inner = Fields::default();
                    let end = scan_object(b, i + 1, &mut inner, false);
                    f.max_tokens = f.max_tokens.or(inner.max_tokens);
                    i = end?;
                    continue;
                }
                let end = skip_value(b, i)?;
                let wanted = if top {
                    matches!(
                        key,
                        b"model"
                            | b"stream"
                            | b"max_tokens"
                            | b"max_completion_tokens"
                            | b"n_predict"
                            | b"priority"
                    )
                } else {
                    key == b"max_new_tokens"
                };
                // A number that runs to the end of the capture may be cut short: skip it.
                if wanted && end < b.len() {
                    if let (Ok(k), Ok(v)) = (
                        std::str::from_utf8(key),
                        std::str::from_utf8(b.get(i..end)?),
                    ) {
                        f.set(k, v);
                    }
                }
                i = end;
            }
            _ => return None,
        }
    }
}

fn skip_ws(b: &[u8], mut i: usize) -> usize {
    while b.get(i).is_some_and(u8::is_ascii_whitespace) {
        i += 1;
    }
    i
}

/// From the opening quote at `i`, the index after the closing quote.
fn skip_string(b: &[u8], i: usize) -> Option<usize> {
    let mut j = i + 1;
    loop {
        j += memchr::memchr2(b'"', b'\\', b.get(j..)?)?;
        if b.get(j)? == &b'\\' {
            j += 2;
        } else {
            return Some(j + 1);
        }
    }
}

/// From the first byte of a value at `i`, the index after it. Containers are skipped by bracket
/// depth (strings inside them skipped whole); `None` if the value is cut off.
fn skip_value(b: &[u8], i: usize) -> Option<usize> {
    match b.get(i)? {
        b'"' => skip_string(b, i),
        b'{' | b'[' => {
            let mut depth = 0usize;
            let mut j = i;
            loop {
                match b.get(j)? {
                    b'"' => j = skip_string(b, j)?,
                    b'{' | b'[' => {
                        depth += 1;
                        j += 1;
                    }
                    b'}' | b']' => {
                        depth -= 1;
                        j += 1;
                        if depth == 0 {
                            return Some(j);
                        }
                    }
                    _ => j += 1,
                }
            }
        }
        _ => {
            let len = b
                .get(i..)?
                .iter()
                .position(|c| matches!(c, b',' | b'}' | b']') || c.is_ascii_whitespace());
            Some(i + len.unwrap_or(b.len() - i))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::MAX_FIELD_LEN;

    fn meta_for(endpoint: Endpoint, body: &str, complete: bool) -> RequestMeta {
        let mut m = RequestMeta {
            endpoint: Some(endpoint),
            ..RequestMeta::default()
        };
        apply_body(&mut m, body.as_bytes(), complete);
        m
    }

    #[test]
    fn body_fields() {
        let body = r#"{"messages":[{"role":"user","content":"say \"model\": \"evil\""}],"model":"llama-3","stream":true,"max_completion_tokens":50,"priority":-3}"#;
        let m = meta_for(Endpoint::ChatCompletions, body, true);
        assert_eq!(m.model.as_deref(), Some("llama-3"));
        assert_eq!(
            (m.stream, m.max_tokens, m.priority),
            (Some(true), Some(50), Some(-3))
        );
        let tgi = r#"{"inputs":"hi","parameters":{"max_new_tokens":20,"model":"x"}}"#;
        let m = meta_for(Endpoint::GenerateStream, tgi, true);
        assert_eq!(
            (m.model, m.stream, m.max_tokens),
            (None, Some(true), Some(20))
        );
        let m = meta_for(
            Endpoint::OllamaChat,
            r#"{"model":"qwen","messages":[]}"#,
            true,
        );
        assert_eq!(m.stream, Some(true));
        let m = meta_for(
            Endpoint::OllamaGenerate,
            r#"{"model":"qwen","stream":false}"#,
            true,
        );
        assert_eq!(m.stream, Some(false));
        let m = meta_for(
            Endpoint::LlamaCompletion,
            r#"{"prompt":"x","n_predict":-1}"#,
            true,
        );
        assert_eq!(m.max_tokens, None);
        let m = meta_for(
            Endpoint::ChatCompletions,
            &format!(r#"{{"model":"{}"}}"#, "m".repeat(300)),
            true,
        );
        assert_eq!(m.model.map(|s| s.len()), Some(MAX_FIELD_LEN));
    }

    #[test]
    fn truncated_body_scan() {
        let body = r#"{"model": "gpt-x", "stream" : true, "messages":[{"content":"\"model\": \"no\", {\"stream\": false"}], "max_tokens": 12"#;
        let m = meta_for(Endpoint::ChatCompletions, body, false);
        assert_eq!(m.model.as_deref(), Some("gpt-x"));
        assert_eq!(m.stream, Some(true));
        // The number runs to the end of the capture and may be cut: not taken.
        assert_eq!(m.max_tokens, None);
        let nested = r#"{"metadata":{"model":"inner"},"parameters":{"max_new_tokens":7},"messages":[{"content":"abc"#;
        let m = meta_for(Endpoint::Generate, nested, false);
        assert_eq!((m.model, m.max_tokens), (None, Some(7)));
        let m = meta_for(
            Endpoint::ChatCompletions,
            r#"{"messages":[{"content":"xx"#,
            false,
        );
        assert_eq!(m.model, None);
        // Invalid JSON on a complete body falls back to the scan too.
        let m = meta_for(
            Endpoint::ChatCompletions,
            r#"{"model":"a","stream":false,}"#,
            true,
        );
        assert_eq!((m.model.as_deref(), m.stream), (Some("a"), Some(false)));
    }
}
