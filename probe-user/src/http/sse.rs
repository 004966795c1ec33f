//! Incremental line-oriented stream parsers: Server-Sent Events (WHATWG HTML §9.2.6, "Parsing an
//! event stream") and NDJSON (Ollama). Both are fed response body bytes as they are written and
//! report each complete event with the timestamp of the write that completed it.

use memchr::{memchr, memchr2};

use super::{
    classify::{prefix_has_content, Classified, EventSink},
    shape::Shapes,
    ParseErrorKind,
};

/// An event cut by the capture whose captured start shows generated text: reported as one
/// content token at the time of the write that carried it.
fn report_cut(prefix: &[u8], ts: u64, sink: &mut impl EventSink) {
    if prefix_has_content(prefix) {
        let ev = Classified {
            content: true,
            token: true,
            ..Classified::default()
        };
        sink.event(ev, ts);
    }
}

/// Longest SSE line or event data, and longest NDJSON line, we buffer. A token chunk is ~250 bytes;
/// even a final chunk with logprobs stays far below this. A longer one is counted as `BadEvent`.
pub(crate) const MAX_EVENT_BYTES: usize = 256 * 1024;

/// Appends `add` to `buf` unless that would pass `MAX_EVENT_BYTES`; returns false on overflow.
fn append_bounded(buf: &mut Vec<u8>, add: &[u8]) -> bool {
    if buf.len().saturating_add(add.len()) > MAX_EVENT_BYTES {
        return false;
    }
    buf.extend_from_slice(add);
    true
}

#[derive(Debug, Default)]
#[expect(
    clippy::struct_excessive_bools,
    reason = "independent flags of the WHATWG parser state"
)]
pub(crate) struct SseParser {
    /// The current line when it spans writes.
    line: Vec<u8>,
    line_overflow: bool,
    /// `data:` values of the event being built, joined with LF.
    data: Vec<u8>,
    has_data: bool,
    data_overflow: bool,
    /// The event's `event:` field is `error`.
    error_event: bool,
    /// The last byte was a CR: a LF right after it belongs to the same line ending.
    after_cr: bool,
    /// Bytes were lost: ignore everything up to the next blank line.
    skipping: bool,
    /// The UTF-8 BOM the spec allows at the very start has been handled.
    started: bool,
    /// The stream's event shape: most events classified without a parse.
    shapes: Shapes,
}

impl SseParser {
    pub fn feed(&mut self, mut bytes: &[u8], ts: u64, sink: &mut impl EventSink) {
        if !self.started && !bytes.is_empty() {
            self.started = true;
            bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
        }
        if self.after_cr && !bytes.is_empty() {
            self.after_cr = false;
            if bytes.first() == Some(&b'\n') {
                bytes = bytes.get(1..).unwrap_or_default();
            }
        }
        while !bytes.is_empty() {
            let Some(i) = memchr2(b'\n', b'\r', bytes) else {
                self.line_overflow |= !append_bounded(&mut self.line, bytes);
                return;
            };
            let (head, rest) = bytes.split_at(i);
            let mut rest = rest.get(1..).unwrap_or_default();
            if bytes.get(i) == Some(&b'\r') {
                match rest.first() {
                    Some(b'\n') => rest = rest.get(1..).unwrap_or_default(),
                    Some(_) => {}
                    None => self.after_cr = true,
                }
            }
            if self.line.is_empty() && !self.line_overflow {
                self.line_done(head, ts, sink);
            } else {
                let mut line = std::mem::take(&mut self.line);
                self.line_overflow |= !append_bounded(&mut line, head);
                self.line_done(&line, ts, sink);
                line.clear();
                self.line = line;
            }
            self.line_overflow = false;
            bytes = rest;
        }
    }

    /// Bytes of the stream were not captured: the event they belonged to is lost (its start is
    /// still reported as a content token when it shows generated text).
    pub fn gap(&mut self, ts: u64, sink: &mut impl EventSink) {
        if !self.skipping && !self.line_overflow {
            if let Some(value) = self.line.strip_prefix(b"data:") {
                report_cut(value, ts, sink);
            }
        }
        self.skip_event();
    }

    /// After a gap, the chunk that held the cut event ended: the next bytes start a new event.
    pub fn resync(&mut self) {
        if self.skipping {
            self.skipping = false;
            self.line.clear();
            self.line_overflow = false;
            self.after_cr = false;
            self.reset_event();
        }
    }

    /// Drop the event in progress and ignore everything up to the next blank line.
    fn skip_event(&mut self) {
        self.line.clear();
        self.line_overflow = false;
        self.after_cr = false;
        self.reset_event();
        self.skipping = true;
    }

    /// Bytes held by its buffers.
    pub fn buffered(&self) -> usize {
        self.line.capacity() + self.data.capacity() + self.shapes.held()
    }

    /// Give its buffers back (the memory budget is spent). Returns whether an event in progress
    /// was dropped with them (it is then skipped like a gap).
    pub fn shed(&mut self) -> bool {
        let lost = !self.line.is_empty() || self.has_data;
        if lost {
            self.skip_event();
        }
        self.line = Vec::new();
        self.data = Vec::new();
        self.shapes = Shapes::default();
        lost
    }

    fn reset_event(&mut self) {
        self.data.clear();
        self.has_data = false;
        self.data_overflow = false;
        self.error_event = false;
    }

    fn line_done(&mut self, line: &[u8], ts: u64, sink: &mut impl EventSink) {
        if self.skipping {
            if line.is_empty() {
                self.skipping = false;
                self.reset_event();
            }
            return;
        }
        if line.is_empty() {
            self.dispatch(ts, sink);
            return;
        }
        if self.line_overflow {
            self.data_overflow = true;
            self.has_data = true;
            return;
        }
        if line.first() == Some(&b':') {
            return; // comment / keep-alive
        }
        let (name, value) = match memchr(b':', line) {
            Some(i) => {
                let v = line.get(i + 1..).unwrap_or_default();
                (
                    line.get(..i).unwrap_or_default(),
                    v.strip_prefix(b" ").unwrap_or(v),
                )
            }
            None => (line, &b""[..]),
        };
        match name {
            b"data" => {
                let ok = (!self.has_data || append_bounded(&mut self.data, b"\n"))
                    && append_bounded(&mut self.data, value);
                self.data_overflow |= !ok;
                self.has_data = true;
            }
            b"event" => self.error_event = value == b"error",
            _ => {} // id, retry, unknown fields
        }
    }

    fn dispatch(&mut self, ts: u64, sink: &mut impl EventSink) {
        // The spec drops an event without data; an `event: error` is still worth noting.
        if self.error_event {
            sink.stream_error();
        }
        if self.has_data {
            if self.data_overflow {
                sink.parse_error(ParseErrorKind::BadEvent);
            } else if self.data != b"[DONE]" {
                match self.shapes.classify(&self.data) {
                    Ok(ev) => sink.event(ev, ts),
                    // The data of an error event may be plain text; the error is already noted.
                    Err(_) if self.error_event => {}
                    Err(_) => sink.parse_error(ParseErrorKind::BadEvent),
                }
            }
        }
        self.reset_event();
    }
}

#[derive(Debug, Default)]
pub(crate) struct NdjsonParser {
    line: Vec<u8>,
    overflow: bool,
    /// Bytes were lost: the current line is incomplete, ignore it.
    skipping: bool,
    /// `"done": true` was seen: the answer is over.
    done: bool,
    shapes: Shapes,
}

impl NdjsonParser {
    pub fn feed(&mut self, mut bytes: &[u8], ts: u64, sink: &mut impl EventSink) {
        while !bytes.is_empty() {
            let Some(i) = memchr(b'\n', bytes) else {
                self.overflow |= !append_bounded(&mut self.line, bytes);
                return;
            };
            let (head, rest) = bytes.split_at(i);
            if self.line.is_empty() && !self.overflow {
                self.line_done(head, ts, sink);
            } else {
                let mut line = std::mem::take(&mut self.line);
                self.overflow |= !append_bounded(&mut line, head);
                self.line_done(&line, ts, sink);
                line.clear();
                self.line = line;
            }
            bytes = rest.get(1..).unwrap_or_default();
        }
    }

    pub fn gap(&mut self, ts: u64, sink: &mut impl EventSink) {
        if !self.skipping && !self.overflow {
            report_cut(&self.line, ts, sink);
        }
        self.skip_line();
    }

    /// After a gap, the chunk that held the cut line ended: the next bytes start a new line.
    pub fn resync(&mut self) {
        if self.skipping {
            self.skipping = false;
            self.line.clear();
            self.overflow = false;
        }
    }

    fn skip_line(&mut self) {
        self.line.clear();
        self.overflow = false;
        self.skipping = true;
    }

    /// Bytes held by its buffers.
    pub fn buffered(&self) -> usize {
        self.line.capacity() + self.shapes.held()
    }

    /// Give the buffer back; returns whether a line in progress was dropped (skipped like a gap).
    pub fn shed(&mut self) -> bool {
        let lost = !self.line.is_empty();
        if lost {
            self.skip_line();
        }
        self.line = Vec::new();
        self.shapes = Shapes::default();
        lost
    }

    /// The body ended: a last line without a newline is still a line.
    pub fn finish(&mut self, ts: u64, sink: &mut impl EventSink) {
        let line = std::mem::take(&mut self.line);
        if !line.is_empty() || self.overflow {
            self.line_done(&line, ts, sink);
        }
    }

    fn line_done(&mut self, line: &[u8], ts: u64, sink: &mut impl EventSink) {
        let overflow = std::mem::take(&mut self.overflow);
        if std::mem::take(&mut self.skipping) {
            return;
        }
        let line = line.trim_ascii();
        if self.done || (line.is_empty() && !overflow) {
            return;
        }
        if overflow {
            sink.parse_error(ParseErrorKind::BadEvent);
            return;
        }
        match self.shapes.classify(line) {
            Ok(ev) => {
                self.done = ev.done;
                sink.event(ev, ts);
            }
            Err(_) => sink.parse_error(ParseErrorKind::BadEvent),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::http::classify::Classified;

    /// Collects what the parsers report.
    #[derive(Default, Debug)]
    pub(crate) struct Collect {
        pub events: Vec<(Classified, u64)>,
        pub errors: u32,
        pub parse_errors: Vec<ParseErrorKind>,
    }

    impl EventSink for Collect {
        fn event(&mut self, ev: Classified, ts: u64) {
            self.events.push((ev, ts));
        }
        fn stream_error(&mut self) {
            self.errors += 1;
        }
        fn parse_error(&mut self, kind: ParseErrorKind) {
            self.parse_errors.push(kind);
        }
    }

    fn content_ts(c: &Collect) -> Vec<u64> {
        c.events
            .iter()
            .filter(|(e, _)| e.content)
            .map(|&(_, ts)| ts)
            .collect()
    }

    const CHAT: &str = "data: {\"choices\":[{\"delta\":{\"role\":\"assistant\"}}]}\n\n\
                        data: {\"choices\":[{\"delta\":{\"content\":\"A\"}}]}\n\n\
                        : keep-alive\n\n\
                        data: {\"choices\":[{\"delta\":{\"content\":\"B\"}}]}\r\n\r\n\
                        data: {\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":2}}\r\r\
                        data: [DONE]\n\n";

    #[test]
    fn sse_events_in_one_write() {
        let mut p = SseParser::default();
        let mut c = Collect::default();
        p.feed(CHAT.as_bytes(), 7, &mut c);
        assert_eq!(content_ts(&c), vec![7, 7]);
        assert_eq!(c.events.len(), 4);
        assert_eq!(
            c.events.last().map(|(e, _)| e.completion_tokens),
            Some(Some(2))
        );
        assert!(c.parse_errors.is_empty());
    }

    #[test]
    fn sse_split_at_every_byte() {
        let bytes = CHAT.as_bytes();
        for cut in 0..=bytes.len() {
            let mut p = SseParser::default();
            let mut c = Collect::default();
            let (a, b) = bytes.split_at(cut);
            p.feed(a, 1, &mut c);
            p.feed(b, 2, &mut c);
            assert_eq!(c.events.len(), 4, "cut {cut}");
            assert!(c.parse_errors.is_empty(), "cut {cut}");
        }
    }

    #[test]
    fn sse_multiline_data_and_error_event() {
        let mut p = SseParser::default();
        let mut c = Collect::default();
        p.feed(
            b"event: error\ndata: {\"error\":\ndata: \"overloaded\"}\n\n",
            1,
            &mut c,
        );
        assert_eq!(c.errors, 1);
        assert!(c.events.first().is_some_and(|(e, _)| e.error));
        p.feed(
            b"event: error\ndata: plain text\n\ndata: nope\n\n",
            2,
            &mut c,
        );
        assert_eq!(c.errors, 2);
        assert_eq!(c.parse_errors, vec![ParseErrorKind::BadEvent]);
    }

    #[test]
    fn sse_gap_skips_to_next_event() {
        let mut p = SseParser::default();
        let mut c = Collect::default();
        p.feed(
            b"data: {\"choices\":[{\"delta\":{\"content\":\"A",
            1,
            &mut c,
        );
        // The cut event's start shows text: one content token at the write that carried it.
        p.gap(1, &mut c);
        p.feed(b"xx\"}}]}\n\ndata: {\"content\":\"B\"}\n\n", 2, &mut c);
        assert_eq!(content_ts(&c), vec![1, 2]);
        assert!(c.parse_errors.is_empty());
        // A cut role announcement, or a gap while already skipping, reports nothing.
        let mut c = Collect::default();
        p.feed(
            b"data: {\"choices\":[{\"delta\":{\"role\":\"assistant\",\"content\":\"\"",
            3,
            &mut c,
        );
        p.gap(3, &mut c);
        p.gap(4, &mut c);
        assert!(content_ts(&c).is_empty());
    }

    #[test]
    fn sse_overflow_is_bad_event() {
        let mut p = SseParser::default();
        let mut c = Collect::default();
        let big = vec![b'x'; MAX_EVENT_BYTES + 10];
        p.feed(b"data: ", 1, &mut c);
        p.feed(&big, 1, &mut c);
        p.feed(b"\n\ndata: {\"content\":\"B\"}\n\n", 2, &mut c);
        assert_eq!(c.parse_errors, vec![ParseErrorKind::BadEvent]);
        assert_eq!(content_ts(&c), vec![2]);
    }

    #[test]
    fn ndjson_lines_and_done() {
        let body = "{\"response\":\"a\",\"done\":false}\n{\"response\":\"b\",\"done\":false}\r\n\n{\"response\":\"\",\"done\":true,\"eval_count\":2,\"prompt_eval_count\":5}\n{\"response\":\"late\"}\n";
        for cut in 0..=body.len() {
            let mut p = NdjsonParser::default();
            let mut c = Collect::default();
            let (a, b) = body.as_bytes().split_at(cut);
            p.feed(a, 1, &mut c);
            p.feed(b, 2, &mut c);
            p.finish(3, &mut c);
            assert_eq!(content_ts(&c).len(), 2, "cut {cut}");
            assert_eq!(c.events.len(), 3, "cut {cut}");
            assert!(c.parse_errors.is_empty());
        }
        let mut p = NdjsonParser::default();
        let mut c = Collect::default();
        p.feed(b"not json\n{\"response\":\"x\"}", 1, &mut c);
        p.finish(4, &mut c);
        assert_eq!(c.parse_errors, vec![ParseErrorKind::BadEvent]);
        assert_eq!(content_ts(&c), vec![4]);
    }
}
