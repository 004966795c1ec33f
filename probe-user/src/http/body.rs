//! Message-body framing shared by requests and responses: Content-Length, the chunked transfer
//! coding (RFC 9112 §7.1) and read-until-close (RFC 9112 §6.3 rule 8).
//!
//! Input arrives as `Seg`s: the bytes the kernel captured, followed by bytes the syscall moved but
//! the kernel did not capture (it copies at most 4096 bytes per syscall). Framing must still count
//! the missing bytes, so a Content-Length body is skipped exactly; inside chunked framing a gap is
//! harmless only while it stays within one chunk's data.

use super::ParseErrorKind;

/// Hex digits accepted in a chunk size: 15 keeps the value below 2^60, far above any real chunk,
/// and rules out overflow without checked arithmetic in the digit loop.
const MAX_CHUNK_SIZE_DIGITS: u8 = 15;

/// One syscall's worth of bytes: `data` as captured, then `missing` uncaptured bytes.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Seg<'a> {
    pub data: &'a [u8],
    pub missing: u64,
}

impl<'a> Seg<'a> {
    /// Nothing left: what a state sets when it has consumed the whole syscall.
    pub const EMPTY: Seg<'static> = Seg {
        data: &[],
        missing: 0,
    };

    /// Splits a syscall's `len` into its captured prefix and the missing tail. `len` below the
    /// captured length (a confused event) is treated as fully captured.
    pub fn new(data: &'a [u8], len: u64) -> Self {
        Self {
            data,
            missing: len.saturating_sub(data.len() as u64),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty() && self.missing == 0
    }

    /// Drops `n` bytes from the front: captured bytes first, then missing ones.
    pub fn advance(&mut self, n: u64) {
        let from_data = n.min(self.data.len() as u64) as usize;
        self.data = self.data.get(from_data..).unwrap_or_default();
        self.missing = self.missing.saturating_sub(n - from_data as u64);
    }
}

/// A run of body payload handed to the content layer.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Piece<'a> {
    Bytes(&'a [u8]),
    /// Payload bytes that were moved but not captured.
    Gap(u64),
    /// A chunk's data ended inside uncaptured bytes. Streaming servers write whole events per
    /// chunk, so the content layer may take this as an event boundary to resynchronise on.
    ChunkEnd,
}

/// What feeding a segment did.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Fed {
    /// Everything was consumed; the body goes on.
    More,
    /// The body ended after `used` bytes of the segment; the rest belongs to the next message.
    Done { used: u64 },
    /// Framing was lost (`BadChunk` for malformed framing, `TruncatedCapture` for framing bytes
    /// that were not captured); the segment is consumed and nothing more can be framed.
    Lost(ParseErrorKind),
}

#[derive(Debug)]
pub(crate) enum Framer {
    Length { remaining: u64 },
    Chunked(ChunkDecoder),
    UntilClose,
}

impl Framer {
    /// Feeds one segment, passing payload pieces to `sink`.
    pub fn feed(&mut self, seg: Seg<'_>, sink: &mut impl FnMut(Piece<'_>)) -> Fed {
        match self {
            Self::UntilClose => {
                emit(seg, u64::MAX, sink);
                Fed::More
            }
            Self::Length { remaining } => {
                let total = seg.data.len() as u64 + seg.missing;
                let used = emit(seg, *remaining, sink);
                *remaining -= used;
                if *remaining == 0 {
                    Fed::Done { used }
                } else {
                    debug_assert_eq!(used, total);
                    Fed::More
                }
            }
            Self::Chunked(dec) => dec.feed(seg, sink),
        }
    }
}

/// Passes at most `limit` bytes of `seg` to `sink`; returns how many.
fn emit(seg: Seg<'_>, limit: u64, sink: &mut impl FnMut(Piece<'_>)) -> u64 {
    let take = limit.min(seg.data.len() as u64) as usize;
    let data = seg.data.get(..take).unwrap_or_default();
    if !data.is_empty() {
        sink(Piece::Bytes(data));
    }
    let gap = seg.missing.min(limit - take as u64);
    if gap > 0 {
        sink(Piece::Gap(gap));
    }
    take as u64 + gap
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    /// Reading the hex size; `digits` so far.
    Size {
        value: u64,
        digits: u8,
    },
    /// After the size: chunk extensions or whitespace, skipped up to the line's LF.
    SizeLineRest {
        value: u64,
    },
    Data {
        remaining: u64,
    },
    /// Expecting the CR (or a bare LF, tolerated) that ends a chunk's data.
    DataEnd,
    /// Got the CR, expecting LF.
    DataEndLf,
    /// After the last chunk: trailer fields until an empty line.
    Trailer {
        line_empty: bool,
    },
    Done,
}

#[derive(Debug)]
pub(crate) struct ChunkDecoder {
    state: ChunkState,
}

impl Default for ChunkDecoder {
    fn default() -> Self {
        Self {
            state: ChunkState::Size {
                value: 0,
                digits: 0,
            },
        }
    }
}

impl ChunkDecoder {
    fn feed(&mut self, seg: Seg<'_>, sink: &mut impl FnMut(Piece<'_>)) -> Fed {
        let mut i = 0usize;
        let data = seg.data;
        while i < data.len() {
            if let ChunkState::Data { remaining } = self.state {
                let take = (remaining.min((data.len() - i) as u64)) as usize;
                if let Some(run) = data.get(i..i + take) {
                    sink(Piece::Bytes(run));
                }
                i += take;
                let left = remaining - take as u64;
                self.state = if left == 0 {
                    ChunkState::DataEnd
                } else {
                    ChunkState::Data { remaining: left }
                };
                continue;
            }
            let b = data.get(i).copied().unwrap_or(0);
            i += 1;
            if let Err(kind) = self.step(b) {
                return Fed::Lost(kind);
            }
            if self.state == ChunkState::Done {
                return Fed::Done { used: i as u64 };
            }
        }
        if seg.missing == 0 {
            return Fed::More;
        }
        // Uncaptured bytes are fine inside one chunk's data, and at its end: servers write a chunk
        // per write (size line, data, CRLF), so when a write's missing tail is the rest of the
        // data plus one or two bytes, those are the CR and LF that end the chunk. Anything more
        // would be the next chunk's size line, which cannot be known.
        let to_data_end = match self.state {
            ChunkState::Data { remaining } => remaining,
            ChunkState::DataEnd | ChunkState::DataEndLf => 0,
            _ => return Fed::Lost(ParseErrorKind::TruncatedCapture),
        };
        let crlf_left = match self.state {
            ChunkState::DataEndLf => 1,
            _ => 2,
        };
        if seg.missing <= to_data_end {
            sink(Piece::Gap(seg.missing));
            let left = to_data_end - seg.missing;
            self.state = if left == 0 {
                sink(Piece::ChunkEnd);
                ChunkState::DataEnd
            } else {
                ChunkState::Data { remaining: left }
            };
            return Fed::More;
        }
        let past = seg.missing - to_data_end;
        if past > crlf_left {
            return Fed::Lost(ParseErrorKind::TruncatedCapture);
        }
        if to_data_end > 0 {
            sink(Piece::Gap(to_data_end));
            sink(Piece::ChunkEnd);
        }
        self.state = if past == crlf_left {
            ChunkState::Size {
                value: 0,
                digits: 0,
            }
        } else {
            ChunkState::DataEndLf
        };
        Fed::More
    }

    /// Advances the framing state by one byte outside chunk data.
    fn step(&mut self, b: u8) -> Result<(), ParseErrorKind> {
        self.state = match self.state {
            ChunkState::Size { value, digits } => match hex_value(b) {
                Some(d) if digits < MAX_CHUNK_SIZE_DIGITS => ChunkState::Size {
                    value: (value << 4) | u64::from(d),
                    digits: digits + 1,
                },
                None if digits > 0 && matches!(b, b';' | b' ' | b'\t' | b'\r') => {
                    ChunkState::SizeLineRest { value }
                }
                None if digits > 0 && b == b'\n' => Self::after_size_line(value),
                _ => return Err(ParseErrorKind::BadChunk),
            },
            ChunkState::SizeLineRest { value } => {
                if b == b'\n' {
                    Self::after_size_line(value)
                } else {
                    ChunkState::SizeLineRest { value }
                }
            }
            ChunkState::DataEnd => match b {
                b'\r' => ChunkState::DataEndLf,
                b'\n' => ChunkState::Size {
                    value: 0,
                    digits: 0,
                },
                _ => return Err(ParseErrorKind::BadChunk),
            },
            ChunkState::DataEndLf => match b {
                b'\n' => ChunkState::Size {
                    value: 0,
                    digits: 0,
                },
                _ => return Err(ParseErrorKind::BadChunk),
            },
            ChunkState::Trailer { line_empty } => match b {
                b'\n' if line_empty => ChunkState::Done,
                b'\n' => ChunkState::Trailer { line_empty: true },
                b'\r' => ChunkState::Trailer { line_empty },
                _ => ChunkState::Trailer { line_empty: false },
            },
            // `feed` handles data runs and stops at Done.
            state @ (ChunkState::Data { .. } | ChunkState::Done) => state,
        };
        Ok(())
    }

    fn after_size_line(value: u64) -> ChunkState {
        if value == 0 {
            ChunkState::Trailer { line_empty: true }
        } else {
            ChunkState::Data { remaining: value }
        }
    }
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(framer: &mut Framer, parts: &[(&[u8], u64)]) -> (Vec<u8>, u64, Vec<Fed>) {
        let mut out = Vec::new();
        let mut gaps = 0;
        let mut results = Vec::new();
        for (data, missing) in parts {
            let r = framer.feed(
                Seg {
                    data,
                    missing: *missing,
                },
                &mut |p| match p {
                    Piece::Bytes(b) => out.extend_from_slice(b),
                    Piece::Gap(n) => gaps += n,
                    Piece::ChunkEnd => out.push(b'|'),
                },
            );
            results.push(r);
        }
        (out, gaps, results)
    }

    #[test]
    fn chunked_decodes_with_extensions_and_trailers() {
        let body = b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: 1\r\n\r\nNEXT";
        let mut f = Framer::Chunked(ChunkDecoder::default());
        let (out, _, res) = run(&mut f, &[(body, 0)]);
        assert_eq!(out, b"hello world");
        assert_eq!(
            res,
            vec![Fed::Done {
                used: (body.len() - 4) as u64
            }]
        );
    }

    #[test]
    fn chunked_split_at_every_byte() {
        let body: &[u8] = b"a\r\n0123456789\r\n3\r\nabc\r\n0\r\n\r\n";
        for cut in 0..=body.len() {
            let mut f = Framer::Chunked(ChunkDecoder::default());
            let (a, b) = body.split_at(cut);
            let parts: Vec<(&[u8], u64)> = [a, b]
                .into_iter()
                .filter(|p| !p.is_empty())
                .map(|p| (p, 0))
                .collect();
            let (out, _, res) = run(&mut f, &parts);
            assert_eq!(out, b"0123456789abc", "cut {cut}");
            assert_eq!(
                res.last(),
                Some(&Fed::Done {
                    used: parts.last().map_or(0, |p| p.0.len() as u64)
                }),
                "cut {cut}"
            );
        }
    }

    #[test]
    fn bad_chunk_size_is_lost() {
        let mut f = Framer::Chunked(ChunkDecoder::default());
        let (_, _, res) = run(&mut f, &[(b"zz\r\n", 0)]);
        assert_eq!(res, vec![Fed::Lost(ParseErrorKind::BadChunk)]);
        let mut f = Framer::Chunked(ChunkDecoder::default());
        let (_, _, res) = run(&mut f, &[(b"2\r\nabX", 0)]);
        assert_eq!(res, vec![Fed::Lost(ParseErrorKind::BadChunk)]);
        let mut f = Framer::Chunked(ChunkDecoder::default());
        let (_, _, res) = run(&mut f, &[(b"ffffffffffffffff\r\n", 0)]);
        assert_eq!(res, vec![Fed::Lost(ParseErrorKind::BadChunk)]);
    }

    #[test]
    fn gap_inside_chunk_data_is_kept_in_step() {
        let mut f = Framer::Chunked(ChunkDecoder::default());
        let (out, gaps, res) = run(&mut f, &[(b"10\r\nabcd", 12), (b"\r\n0\r\n\r\n", 0)]);
        assert_eq!(out, b"abcd|", "the chunk's data ended in the gap");
        assert_eq!(gaps, 12);
        assert_eq!(res, vec![Fed::More, Fed::Done { used: 7 }]);
    }

    /// A 6,000-byte chunk written in one write of which the kernel captured 4,096 bytes: the
    /// missing tail is the rest of the data and the CRLF, and the next chunk frames normally.
    #[test]
    fn a_write_past_the_capture_ending_its_chunk_keeps_framing() {
        let head = b"1770\r\n";
        let data = vec![b'x'; 4096 - head.len()];
        let first: Vec<u8> = head.iter().chain(&data).copied().collect();
        let missing = 6000 - data.len() as u64 + 2;
        let mut f = Framer::Chunked(ChunkDecoder::default());
        let (out, gaps, res) = run(&mut f, &[(&first, missing), (b"3\r\nabc\r\n0\r\n\r\n", 0)]);
        assert_eq!(out.len(), data.len() + 1 + 3, "data, the chunk end, abc");
        assert_eq!(out[data.len()], b'|');
        assert_eq!(gaps, 6000 - data.len() as u64);
        assert_eq!(res, vec![Fed::More, Fed::Done { used: 13 }]);
        // Only the CR missing: the LF comes captured in the next write.
        let mut f = Framer::Chunked(ChunkDecoder::default());
        let (_, _, res) = run(&mut f, &[(b"4\r\nab", 3), (b"\n0\r\n\r\n", 0)]);
        assert_eq!(res, vec![Fed::More, Fed::Done { used: 6 }]);
        // A missing CRLF after data that ended in the capture.
        let mut f = Framer::Chunked(ChunkDecoder::default());
        let (_, _, res) = run(&mut f, &[(b"2\r\nab", 2), (b"0\r\n\r\n", 0)]);
        assert_eq!(res, vec![Fed::More, Fed::Done { used: 5 }]);
    }

    #[test]
    fn gap_across_chunk_framing_is_lost() {
        let mut f = Framer::Chunked(ChunkDecoder::default());
        let (_, _, res) = run(&mut f, &[(b"4\r\nab", 10)]);
        assert_eq!(res, vec![Fed::Lost(ParseErrorKind::TruncatedCapture)]);
    }

    #[test]
    fn content_length_counts_missing_bytes() {
        let mut f = Framer::Length { remaining: 10 };
        let (out, gaps, res) = run(&mut f, &[(b"abc", 4), (b"xyz", 0)]);
        assert_eq!(out, b"abcxyz");
        assert_eq!(gaps, 4);
        assert_eq!(res, vec![Fed::More, Fed::Done { used: 3 }]);
        let mut f = Framer::Length { remaining: 5 };
        let (_, gaps, res) = run(&mut f, &[(b"ab", 100)]);
        assert_eq!(gaps, 3);
        assert_eq!(res, vec![Fed::Done { used: 5 }]);
    }

    #[test]
    fn seg_advance_crosses_into_missing() {
        let mut s = Seg::new(b"abc", 10);
        assert_eq!(s.missing, 7);
        s.advance(5);
        assert!(s.data.is_empty());
        assert_eq!(s.missing, 5);
        s.advance(100);
        assert!(s.is_empty());
    }
}
