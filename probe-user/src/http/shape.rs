//! A stream's event shape: the events of one streamed response are the same JSON document but
//! for the text of one string (`"content":"…"` in every `OpenAI` chat chunk), so once that shape is
//! known an event whose bytes are the shape's prefix, a plain string body and the shape's suffix
//! gets the same classification as the event the shape was learnt from — without parsing it
//! (docs/design.md, "Content classification").
//!
//! Exact, not a guess: the shape is taken only around the string value of a key whose text
//! `classify` reads for emptiness alone (`CONTENT_KEYS`); the body must hold no `"`, `\` or
//! control character and be valid UTF-8, so the document lexes exactly as the one learnt from
//! with that one string changed; the two outcomes (empty, not empty) come from `classify` itself,
//! run on the shape with an empty and a one-character body when it is learnt. Anything else goes
//! to `classify`. Bounded: the shape and the previous event are kept only for events of at most
//! `MAX_SHAPE` bytes, and the previous event only until a shape is learnt.

use super::classify::{classify, Classified};

/// Longest event whose shape is learnt (`OpenAI` chat chunks are 150–400 bytes).
pub(crate) const MAX_SHAPE: usize = 512;
/// Keys whose string value `classify` reads only for being empty or not (and for starting with
/// a quote): generated text in every dialect it knows. Never `id`, `object`, `type`.
const CONTENT_KEYS: [&[u8]; 8] = [
    b"content",
    b"text",
    b"response",
    b"delta",
    b"generated_text",
    b"reasoning_content",
    b"reasoning",
    b"thinking",
];

#[derive(Debug)]
struct Shape {
    /// The prefix (through the string's opening quote) then the suffix (from its closing quote).
    bytes: Vec<u8>,
    prefix: usize,
    empty: Classified,
    full: Classified,
}

/// One stream's shape, learnt from two events in a row. Boxed: a pointer in every parser, the
/// rest allocated at a stream's first event.
#[derive(Debug, Default)]
pub(crate) struct Shapes(Option<Box<Learnt>>);

#[derive(Debug, Default)]
struct Learnt {
    prev: Vec<u8>,
    shape: Option<Shape>,
    /// Pairs of events in a row that gave no shape (a stream whose events differ elsewhere:
    /// a counter, a number); at `GIVE_UP` the stream stops trying.
    failed: u8,
}

/// Failed attempts after which a stream's events are only parsed.
const GIVE_UP: u8 = 8;

impl Shapes {
    /// `classify(json)`, from the shape when the event fits it.
    pub fn classify(&mut self, json: &[u8]) -> Result<Classified, serde_json::Error> {
        let l = self.0.get_or_insert_default();
        if let Some(c) = l.shape.as_ref().and_then(|s| s.fits(json)) {
            return Ok(c);
        }
        // Not the shape (none yet, another stream's id, text with escapes, the last event):
        // parsed, and a new shape learnt from it and the previous event when they have one.
        let out = classify(json);
        l.prev_learn(json, out.is_ok());
        out
    }

    /// Bytes held (the agent's per-connection memory).
    pub fn held(&self) -> usize {
        self.0.as_ref().map_or(0, |l| {
            size_of::<Learnt>()
                + l.prev.capacity()
                + l.shape.as_ref().map_or(0, |s| s.bytes.capacity())
        })
    }

    #[cfg(test)]
    fn fits(&self, json: &[u8]) -> bool {
        self.0
            .as_ref()
            .and_then(|l| l.shape.as_ref())
            .and_then(|s| s.fits(json))
            .is_some()
    }
}

impl Learnt {
    fn prev_learn(&mut self, json: &[u8], ok: bool) {
        // The same bytes again (a repeated token) tell nothing new: nothing to learn or copy.
        if self.failed >= GIVE_UP || (ok && self.prev == json) {
            return;
        }
        if ok && !self.prev.is_empty() {
            match learn(&self.prev, json) {
                Some(s) => {
                    self.shape = Some(s);
                    self.failed = 0;
                }
                None => self.failed += 1,
            }
        }
        // The previous event is kept when it is short and parsed (at most `MAX_SHAPE` bytes).
        self.prev.clear();
        if ok && json.len() <= MAX_SHAPE {
            self.prev.extend_from_slice(json);
        }
    }
}

impl Shape {
    /// The classification of `json` when it is the prefix, a plain string body and the suffix.
    fn fits(&self, json: &[u8]) -> Option<Classified> {
        let (prefix, suffix) = self.bytes.split_at(self.prefix);
        let body_len = json.len().checked_sub(self.bytes.len())?;
        if !json.starts_with(prefix) || !json.ends_with(suffix) {
            return None;
        }
        let body = &json[prefix.len()..prefix.len() + body_len];
        plain(body).then_some(if body.is_empty() {
            self.empty
        } else {
            self.full
        })
    }
}

/// A string body that needs no unescaping and cannot end the string early: valid UTF-8, no `"`,
/// `\` or control character.
fn plain(body: &[u8]) -> bool {
    !body.iter().any(|&b| b == b'"' || b == b'\\' || b < 0x20) && std::str::from_utf8(body).is_ok()
}

/// The shape of two events that differ only inside one string value of a `CONTENT_KEYS` key.
/// Both have been classified without error.
fn learn(a: &[u8], b: &[u8]) -> Option<Shape> {
    if a.len() > MAX_SHAPE || b.len() > MAX_SHAPE || a == b {
        return None;
    }
    let same_start = a.iter().zip(b).take_while(|(x, y)| x == y).count();
    // The string `a` is inside where `b` first differs, and where it closes.
    let open = open_string_at(a, same_start)?;
    let close = open
        + 1
        + a[open + 1..]
            .iter()
            .position(|&c| c == b'"' || c == b'\\')?;
    if a[close] != b'"' || !plain(&a[open + 1..close]) || !value_of_content_key(a, open) {
        return None;
    }
    let (prefix, suffix) = (&a[..=open], &a[close..]);
    if b.len() < prefix.len() + suffix.len() || !b.ends_with(suffix) {
        return None;
    }
    if !plain(&b[prefix.len()..b.len() - suffix.len()]) {
        return None;
    }
    let with = |body: &[u8]| classify(&[prefix, body, suffix].concat()).ok();
    Some(Shape {
        bytes: [prefix, suffix].concat(),
        prefix: prefix.len(),
        empty: with(b"")?,
        full: with(b"x")?,
    })
}

/// The index of the opening quote of the string that position `at` of `json` lies in (or
/// closes), `None` when `at` is outside every string.
fn open_string_at(json: &[u8], at: usize) -> Option<usize> {
    let mut open = None;
    let mut i = 0;
    while i < at.min(json.len()) {
        match (open, json[i]) {
            (Some(_), b'\\') => i += 1,
            (Some(_), b'"') => open = None,
            (None, b'"') => open = Some(i),
            _ => {}
        }
        i += 1;
    }
    // `at` past an escape's backslash is still inside the string; a string that closed exactly
    // at `at` is not.
    open
}

/// Whether the string opening at `open` is the value of a `CONTENT_KEYS` key: `"key"`, blanks,
/// `:`, blanks before it.
fn value_of_content_key(json: &[u8], open: usize) -> bool {
    let blank = |b: &u8| matches!(b, b' ' | b'\t' | b'\r' | b'\n');
    let before = &json[..open];
    let Some(colon) = before.iter().rposition(|b| !blank(b)) else {
        return false;
    };
    if before[colon] != b':' {
        return false;
    }
    let Some(key_end) = before[..colon].iter().rposition(|b| !blank(b)) else {
        return false;
    };
    if before[key_end] != b'"' {
        return false;
    }
    let key_start = before[..key_end].iter().rposition(|&b| b == b'"');
    key_start.is_some_and(|s| {
        // The key's opening quote must not be escaped text of another string: the key is plain
        // ASCII letters and `_`, and the byte before its quote is `{`, `,` or a blank.
        let key = &before[s + 1..key_end];
        key.iter().all(|b| b.is_ascii_lowercase() || *b == b'_')
            && s.checked_sub(1)
                .is_some_and(|p| matches!(before[p], b'{' | b',') || blank(&before[p]))
            && CONTENT_KEYS.contains(&key)
    })
}

#[cfg(test)]
mod tests;
