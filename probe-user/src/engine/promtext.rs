//! A tolerant reader of the Prometheus text exposition format (version 0.0.4,
//! <https://prometheus.io/docs/instrumenting/exposition_formats/>) and the parts of `OpenMetrics`
//! 1.0 an engine page may carry (`# EOF`, float timestamps, exemplars after `#`).
//!
//! Only samples are returned: `# HELP` / `# TYPE` / other comments are skipped, since the bridge
//! knows the type of every metric it reads. A line that does not parse is reported as
//! [`Line::Malformed`] and the rest of the page is still read; nothing here can panic, whatever
//! the input (every slice is taken with `get` at an ASCII boundary found by scanning).

use std::borrow::Cow;

/// One sample line: `name{label="value",...} value [timestamp]`.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Sample<'a> {
    pub name: &'a str,
    /// Label pairs in page order; values are unescaped (`\\`, `\"`, `\n`).
    pub labels: Vec<(&'a str, Cow<'a, str>)>,
    pub value: f64,
}

impl Sample<'_> {
    /// The value of label `name`, if the line carries it.
    pub fn label(&self, name: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_ref())
    }
}

/// What one non-blank, non-comment line of a page is.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Line<'a> {
    Sample(Sample<'a>),
    /// A line that does not follow the format, or the page's last line when the page does not end
    /// with a newline: the format requires one, so that line may have been cut mid-value.
    Malformed,
}

/// The lines of `page` that are samples or malformed, in order, up to an `OpenMetrics` `# EOF`.
pub(crate) fn lines(page: &str) -> impl Iterator<Item = Line<'_>> {
    let complete = page.ends_with('\n');
    let mut pieces = page.split('\n').peekable();
    let mut done = false;
    std::iter::from_fn(move || loop {
        if done {
            return None;
        }
        let piece = pieces.next()?;
        let last = pieces.peek().is_none();
        let line = piece.trim();
        if line.is_empty() {
            continue;
        }
        if let Some(comment) = line.strip_prefix('#') {
            if comment.trim() == "EOF" {
                done = true;
                return None;
            }
            continue;
        }
        if last && !complete {
            return Some(Line::Malformed);
        }
        return Some(parse_line(line).map_or(Line::Malformed, Line::Sample));
    })
}

/// Parses one sample line (already trimmed, not a comment).
pub(crate) fn parse_line(line: &str) -> Option<Sample<'_>> {
    let mut cur = Cursor { s: line, pos: 0 };
    let name = cur.take_while(|b, first| is_name_byte(b, first, true))?;
    cur.skip_blanks();
    let labels = if cur.eat(b'{') {
        parse_labels(&mut cur)?
    } else {
        Vec::new()
    };
    cur.skip_blanks();
    let value = parse_value(cur.token()?)?;
    cur.skip_blanks();
    match cur.token() {
        // OpenMetrics puts an exemplar after `#`; it says nothing the bridge needs.
        None => {}
        Some(t) if t.starts_with('#') => {
            return Some(Sample {
                name,
                labels,
                value,
            })
        }
        Some(timestamp) => {
            // Milliseconds in 0.0.4, float seconds in OpenMetrics: either is accepted and
            // ignored, since the bridge stamps values with its own scrape time.
            timestamp.parse::<f64>().ok().filter(|t| t.is_finite())?;
            cur.skip_blanks();
            match cur.token() {
                None => {}
                Some(t) if t.starts_with('#') => {}
                Some(_) => return None,
            }
        }
    }
    Some(Sample {
        name,
        labels,
        value,
    })
}

/// `label="value"` pairs after `{`, through the closing `}`; a trailing comma is allowed.
fn parse_labels<'a>(cur: &mut Cursor<'a>) -> Option<Vec<(&'a str, Cow<'a, str>)>> {
    let mut labels = Vec::new();
    loop {
        cur.skip_blanks();
        if cur.eat(b'}') {
            return Some(labels);
        }
        let name = cur.take_while(|b, first| is_name_byte(b, first, false))?;
        cur.skip_blanks();
        if !cur.eat(b'=') {
            return None;
        }
        cur.skip_blanks();
        if !cur.eat(b'"') {
            return None;
        }
        labels.push((name, cur.quoted()?));
        cur.skip_blanks();
        if cur.eat(b',') {
            continue;
        }
        if cur.eat(b'}') {
            return Some(labels);
        }
        return None;
    }
}

/// Sample values as Go's `strconv.ParseFloat` reads them: decimals, exponents, `NaN`, `+Inf`,
/// `-Inf` (Rust's parser accepts the same spellings, case-insensitively).
fn parse_value(token: &str) -> Option<f64> {
    token.parse::<f64>().ok()
}

/// Metric names are `[a-zA-Z_:][a-zA-Z0-9_:]*`; label names the same without `:`.
fn is_name_byte(b: u8, first: bool, colon: bool) -> bool {
    b.is_ascii_alphabetic() || b == b'_' || (colon && b == b':') || (!first && b.is_ascii_digit())
}

struct Cursor<'a> {
    s: &'a str,
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn peek(&self) -> Option<u8> {
        self.s.as_bytes().get(self.pos).copied()
    }

    fn eat(&mut self, b: u8) -> bool {
        if self.peek() == Some(b) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    fn skip_blanks(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t')) {
            self.pos += 1;
        }
    }

    /// The longest non-empty run of ASCII bytes accepted by `ok(byte, is_first)`.
    fn take_while(&mut self, ok: impl Fn(u8, bool) -> bool) -> Option<&'a str> {
        let start = self.pos;
        while let Some(b) = self.peek() {
            if !ok(b, self.pos == start) {
                break;
            }
            self.pos += 1;
        }
        if self.pos == start {
            return None;
        }
        self.s.get(start..self.pos)
    }

    /// The next run of non-blank bytes, or `None` at the end of the line.
    fn token(&mut self) -> Option<&'a str> {
        let start = self.pos;
        while !matches!(self.peek(), None | Some(b' ' | b'\t')) {
            self.pos += 1;
        }
        if self.pos == start {
            return None;
        }
        // Blanks are ASCII, so both ends are char boundaries; `get` keeps that unchecked claim
        // from ever becoming a panic.
        self.s.get(start..self.pos)
    }

    /// A label value after its opening quote, through the closing one. Borrowed when it holds no
    /// escape. An escape other than `\\`, `\"` and `\n` is kept as written: Prometheus rejects it,
    /// but a page is worth more than one odd label.
    fn quoted(&mut self) -> Option<Cow<'a, str>> {
        let rest = self.s.get(self.pos..)?;
        let mut owned: Option<String> = None;
        let mut chars = rest.char_indices();
        while let Some((i, c)) = chars.next() {
            match c {
                '"' => {
                    self.pos += i + 1;
                    return Some(match owned {
                        Some(s) => Cow::Owned(s),
                        None => Cow::Borrowed(rest.get(..i)?),
                    });
                }
                '\\' => {
                    let buf = owned.get_or_insert_with(|| rest.get(..i).unwrap_or("").to_owned());
                    match chars.next()?.1 {
                        'n' => buf.push('\n'),
                        '"' => buf.push('"'),
                        '\\' => buf.push('\\'),
                        other => {
                            buf.push('\\');
                            buf.push(other);
                        }
                    }
                }
                _ => {
                    if let Some(buf) = owned.as_mut() {
                        buf.push(c);
                    }
                }
            }
        }
        // No closing quote on this line.
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(line: &str) -> Sample<'_> {
        match parse_line(line) {
            Some(s) => s,
            None => panic!("{line:?} did not parse"),
        }
    }

    #[test]
    fn plain_and_labelled() {
        let s = one("tgi_queue_size 3");
        assert_eq!(
            (s.name, s.value, s.labels.len()),
            ("tgi_queue_size", 3.0, 0)
        );
        let s = one(r#"vllm:num_requests_running{engine="0",model_name="m"} 2.0"#);
        assert_eq!(s.name, "vllm:num_requests_running");
        assert_eq!(s.label("engine"), Some("0"));
        assert_eq!(s.label("model_name"), Some("m"));
        assert_eq!(s.value, 2.0);
    }

    #[test]
    fn spacing_trailing_comma_and_timestamps() {
        let s = one("x { a = \"1\" , b=\"2\", } 4 1700000000000");
        assert_eq!(s.label("a"), Some("1"));
        assert_eq!(s.label("b"), Some("2"));
        assert_eq!(s.value, 4.0);
        assert_eq!(one("x{} 5").value, 5.0);
        assert_eq!(one("x{a=\"1\"}6").value, 6.0);
        assert_eq!(one("x 7 1700000000.5").value, 7.0);
        assert_eq!(one("x_total 8 # {trace_id=\"a\"} 1.0 1").value, 8.0);
        assert_eq!(one("x\t9\t").value, 9.0);
    }

    #[test]
    fn special_values() {
        assert!(one("x NaN").value.is_nan());
        assert_eq!(one("x +Inf").value, f64::INFINITY);
        assert_eq!(one("x -Inf").value, f64::NEG_INFINITY);
        assert_eq!(one("x 1e-3").value, 0.001);
        assert_eq!(one("x -0.5").value, -0.5);
    }

    #[test]
    fn escapes() {
        let s = one(r#"x{a="q\"uote",b="back\\slash",c="new\nline",d="odd\tx",e="é"} 1"#);
        assert_eq!(s.label("a"), Some("q\"uote"));
        assert_eq!(s.label("b"), Some("back\\slash"));
        assert_eq!(s.label("c"), Some("new\nline"));
        assert_eq!(s.label("d"), Some("odd\\tx"));
        assert_eq!(s.label("e"), Some("é"));
        // A `}` or `,` inside quotes is part of the value.
        assert_eq!(one(r#"x{a="},{"} 2"#).label("a"), Some("},{"));
    }

    #[test]
    fn malformed_lines() {
        for bad in [
            "x",
            "x{a=\"1\"}",
            "x{a=\"1\" 2",
            "x{a=1} 2",
            "x{a=\"1\"",
            "x{=\"1\"} 2",
            "x{a\"1\"} 2",
            "x{a=\"1\"b=\"2\"} 3",
            "x abc",
            "x 1 2 3",
            "x 1 notatime",
            "1x 2",
            "{a=\"1\"} 2",
            "x{a=\"unterminated\\\"} 2",
            "<html>",
            "x{a=\"1\"} 2 3 4",
        ] {
            assert_eq!(parse_line(bad), None, "{bad:?} parsed");
        }
    }

    #[test]
    fn page_comments_eof_and_cut_last_line() {
        let page = "# HELP x help\n# TYPE x gauge\n\nx 1\r\nbad line here\n  y 2  \n# EOF\nz 3\n";
        let got: Vec<_> = lines(page).collect();
        assert_eq!(got.len(), 3);
        assert!(matches!(&got[0], Line::Sample(s) if s.name == "x" && s.value == 1.0));
        assert_eq!(got[1], Line::Malformed);
        assert!(matches!(&got[2], Line::Sample(s) if s.name == "y" && s.value == 2.0));

        // Cut mid-value: `x 12` became `x 1`, which must not be read as 1.
        let got: Vec<_> = lines("y 2\nx 1").collect();
        assert_eq!(got.len(), 2);
        assert_eq!(got[1], Line::Malformed);
        // Cut right after a comment: nothing lost.
        assert_eq!(lines("y 2\n# HEL").count(), 1);
    }
}
