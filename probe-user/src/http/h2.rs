//! HTTP/2 framing (RFC 9113 §4 and §6) as one direction of a connection carries it: the client
//! preface, frame heads, DATA payloads handed on piece by piece (padding removed, uncaptured bytes
//! counted, never buffered) and header blocks (HEADERS or `PUSH_PROMISE` with their CONTINUATIONs)
//! gathered whole for the HPACK decoder. Everything else is skipped by its length.
//!
//! Bounded: a header block may hold `MAX_HEADER_BLOCK` bytes and other frames are never buffered
//! beyond their first 4 bytes (`RST_STREAM`'s error code). Framing that cannot be followed (bytes
//! of a frame head or header block not captured, a malformed frame, a block over the bound) ends
//! the direction: `feed` returns the reason once and nothing more is read.

/// The client connection preface (RFC 9113 §3.4).
pub(crate) const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Longest header block gathered (HEADERS + CONTINUATION): request and response heads of LLM APIs
/// are a few hundred bytes; 64 KiB is four times the default `SETTINGS_MAX_FRAME_SIZE`.
pub(crate) const MAX_HEADER_BLOCK: usize = 64 * 1024;

const DATA: u8 = 0;
const HEADERS: u8 = 1;
const RST_STREAM: u8 = 3;
const SETTINGS: u8 = 4;
const PUSH_PROMISE: u8 = 5;
const CONTINUATION: u8 = 9;

const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;

/// What one direction's frames say, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Item<'a> {
    /// DATA payload bytes of `stream` (padding removed), in pieces as they arrive.
    Data { stream: u32, bytes: &'a [u8] },
    /// `n` DATA payload bytes that were moved but not captured.
    DataGap { stream: u32, n: u64 },
    /// The end of a DATA frame.
    DataEnd { stream: u32, end_stream: bool },
    /// A whole header block. `promise`: a `PUSH_PROMISE`'s (decoded only to keep HPACK in step).
    Headers {
        stream: u32,
        end_stream: bool,
        promise: bool,
        block: &'a [u8],
        /// Where the block's first frame head begins in the read that carried its last byte (0
        /// when it began in an earlier read).
        read_off: usize,
    },
    /// `RST_STREAM` with its error code.
    Reset { stream: u32, code: u32 },
}

/// Why a direction's framing was given up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Lost {
    /// Frame-head or header-block bytes were not captured.
    Truncated,
    /// Not HTTP/2: a wrong preface, a frame that breaks the rules, a block over the bound.
    Malformed,
}

/// Whether `data` is (or begins) the client preface. A lone "P" is left to HTTP/1 (POST, PUT,
/// PATCH): its head buffer is checked again with the next read (`conn/ingress.rs`).
pub(crate) fn starts_with_preface(data: &[u8]) -> bool {
    if data.len() >= PREFACE.len() {
        data.starts_with(PREFACE)
    } else {
        data.len() >= 2 && PREFACE.starts_with(data)
    }
}

/// Whether a server's first write is its connection preface: a SETTINGS frame on stream 0 whose
/// length is a whole number of settings (RFC 9113 §3.4, §6.5).
pub(crate) fn is_server_preface(data: &[u8]) -> bool {
    let Some(h) = data.get(..9) else {
        return false;
    };
    let len = u32::from_be_bytes([0, h[0], h[1], h[2]]);
    h[3] == SETTINGS && h[4] == 0 && h[5..9] == [0; 4] && len.is_multiple_of(6) && len <= 16_384
}

/// Whether bytes seen first on a connection picked up mid-stream are HTTP/2 frames: frame heads
/// of known types, within the default maximum frame size, on stream 0 exactly when their type
/// says, back to back through `data` (the last frame may run past it).
pub(crate) fn looks_like_frames(data: &[u8]) -> bool {
    let mut at = 0usize;
    let mut frames = 0;
    while let Some(h) = data
        .get(at..at + 9)
        .and_then(|h| <&[u8; 9]>::try_from(h).ok())
    {
        let h = Head::parse(h);
        // 2 PRIORITY, 6 PING, 7 GOAWAY, 8 WINDOW_UPDATE.
        let ok = h.len <= 16_384
            && match h.kind {
                SETTINGS | 6 | 7 => h.stream == 0,
                8 => true,
                DATA | HEADERS | 2 | RST_STREAM | PUSH_PROMISE | CONTINUATION => h.stream != 0,
                _ => false,
            };
        if !ok {
            return false;
        }
        frames += 1;
        at += 9 + h.len as usize;
    }
    frames > 0
}

#[derive(Debug, Clone, Copy)]
struct Head {
    len: u32,
    kind: u8,
    flags: u8,
    stream: u32,
}

impl Head {
    fn parse(b: &[u8; 9]) -> Self {
        Self {
            len: u32::from_be_bytes([0, b[0], b[1], b[2]]),
            kind: b[3],
            flags: b[4],
            stream: u32::from_be_bytes([b[5], b[6], b[7], b[8]]) & 0x7fff_ffff,
        }
    }
}

/// The frame whose payload is being read.
#[derive(Debug)]
struct Cur {
    head: Head,
    /// Payload bytes read so far.
    off: u32,
    /// DATA: padding length (known once byte 0 of a padded frame is read).
    pad: Option<u32>,
}

/// A header block waiting for its CONTINUATION frames.
#[derive(Debug)]
struct Pending {
    stream: u32,
    end_stream: bool,
    promise: bool,
    read_off: usize,
}

/// One direction's frame reader. See the module docs.
#[derive(Debug)]
pub(crate) struct FrameReader {
    /// Bytes of the client preface still expected (the client-to-server direction only).
    preface_left: usize,
    head: [u8; 9],
    head_have: usize,
    /// Where the frame head being read (then the current frame) began in the read (0 when in an
    /// earlier read).
    head_read_off: usize,
    cur: Option<Cur>,
    /// The payload of a frame read whole (HEADERS, CONTINUATION, `PUSH_PROMISE`, `RST_STREAM`),
    /// then the header block being gathered.
    buf: Vec<u8>,
    pending: Option<Pending>,
    lost: bool,
}

impl FrameReader {
    /// `client`: the direction that starts with the preface.
    pub fn new(client: bool) -> Self {
        Self {
            preface_left: if client { PREFACE.len() } else { 0 },
            head: [0; 9],
            head_have: 0,
            head_read_off: 0,
            cur: None,
            buf: Vec::new(),
            pending: None,
            lost: false,
        }
    }

    /// Bytes its buffers hold.
    pub fn buffered(&self) -> usize {
        self.buf.capacity()
    }

    /// Reads one syscall's bytes (`data` captured, then `missing` not), handing items to `f`.
    pub fn feed(
        &mut self,
        mut data: &[u8],
        mut missing: u64,
        f: &mut impl FnMut(Item<'_>),
    ) -> Result<(), Lost> {
        if self.lost {
            return Ok(());
        }
        let r = self.feed_inner(&mut data, &mut missing, f);
        if r.is_err() {
            self.lost = true;
            self.buf = Vec::new();
        }
        r
    }

    fn feed_inner(
        &mut self,
        data: &mut &[u8],
        missing: &mut u64,
        f: &mut impl FnMut(Item<'_>),
    ) -> Result<(), Lost> {
        let whole = data.len();
        while !data.is_empty() || *missing > 0 {
            if self.preface_left > 0 {
                let at = PREFACE.len() - self.preface_left;
                let n = self.preface_left.min(data.len());
                if n == 0 {
                    return Err(Lost::Truncated);
                }
                if data[..n] != PREFACE[at..at + n] {
                    return Err(Lost::Malformed);
                }
                self.preface_left -= n;
                *data = &data[n..];
                continue;
            }
            let Some(cur) = self.cur.as_mut() else {
                if data.is_empty() {
                    return Err(Lost::Truncated);
                }
                self.head_read_off = if self.head_have == 0 {
                    whole - data.len()
                } else {
                    0
                };
                let n = (9 - self.head_have).min(data.len());
                self.head[self.head_have..self.head_have + n].copy_from_slice(&data[..n]);
                self.head_have += n;
                *data = &data[n..];
                if self.head_have == 9 {
                    self.head_have = 0;
                    self.start(Head::parse(&self.head))?;
                    self.end_if_done(f)?;
                }
                continue;
            };
            let left = cur.head.len - cur.off;
            let taken = left.min(u32::try_from(data.len()).unwrap_or(u32::MAX));
            if taken > 0 {
                let (piece, rest) = data.split_at(taken as usize);
                *data = rest;
                self.payload(piece, f)?;
            } else {
                let n = u64::from(left).min(*missing);
                *missing -= n;
                self.gap(n as u32, f)?;
            }
            self.end_if_done(f)?;
        }
        Ok(())
    }

    /// A frame head was read: check it against the rules that matter for following the stream.
    fn start(&mut self, head: Head) -> Result<(), Lost> {
        let continuation = head.kind == CONTINUATION;
        match &self.pending {
            Some(p) if !continuation || head.stream != p.stream => return Err(Lost::Malformed),
            None if continuation => return Err(Lost::Malformed),
            _ => {}
        }
        let stream_frame = matches!(head.kind, DATA | HEADERS | RST_STREAM | PUSH_PROMISE);
        if stream_frame && head.stream == 0 {
            return Err(Lost::Malformed);
        }
        if head.kind == RST_STREAM && head.len != 4 {
            return Err(Lost::Malformed);
        }
        self.cur = Some(Cur {
            head,
            off: 0,
            pad: None,
        });
        Ok(())
    }

    fn gathers(kind: u8) -> bool {
        matches!(kind, HEADERS | CONTINUATION | PUSH_PROMISE | RST_STREAM)
    }

    fn payload(&mut self, piece: &[u8], f: &mut impl FnMut(Item<'_>)) -> Result<(), Lost> {
        let Some(cur) = self.cur.as_mut() else {
            return Ok(());
        };
        let h = cur.head;
        let start = cur.off;
        cur.off += piece.len() as u32;
        if Self::gathers(h.kind) {
            if self.buf.len() + piece.len() > MAX_HEADER_BLOCK {
                return Err(Lost::Malformed);
            }
            self.buf.extend_from_slice(piece);
            return Ok(());
        }
        if h.kind != DATA {
            return Ok(());
        }
        let mut piece = piece;
        let mut at = start;
        if h.flags & PADDED != 0 && cur.pad.is_none() {
            let Some((&pad, rest)) = piece.split_first() else {
                return Ok(());
            };
            if u32::from(pad) >= h.len {
                return Err(Lost::Malformed);
            }
            cur.pad = Some(u32::from(pad));
            piece = rest;
            at += 1;
        }
        let data_end = h.len - cur.pad.unwrap_or(0);
        let keep = data_end.saturating_sub(at).min(piece.len() as u32) as usize;
        if keep > 0 {
            f(Item::Data {
                stream: h.stream,
                bytes: &piece[..keep],
            });
        }
        Ok(())
    }

    fn gap(&mut self, n: u32, f: &mut impl FnMut(Item<'_>)) -> Result<(), Lost> {
        let Some(cur) = self.cur.as_mut() else {
            return Ok(());
        };
        cur.off += n;
        match cur.head.kind {
            k if Self::gathers(k) => Err(Lost::Truncated),
            DATA => {
                // An uncaptured pad-length byte: the padding is unknown, the rest counts as data.
                f(Item::DataGap {
                    stream: cur.head.stream,
                    n: u64::from(n),
                });
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// Ends the current frame once its payload is read whole.
    fn end_if_done(&mut self, f: &mut impl FnMut(Item<'_>)) -> Result<(), Lost> {
        match &self.cur {
            Some(c) if c.off >= c.head.len => {}
            _ => return Ok(()),
        }
        let Some(Cur { head: h, .. }) = self.cur.take() else {
            return Ok(());
        };
        let end_stream = h.flags & END_STREAM != 0;
        match h.kind {
            DATA => f(Item::DataEnd {
                stream: h.stream,
                end_stream,
            }),
            RST_STREAM => {
                // Exactly 4 payload bytes (checked in `start`).
                let code = self
                    .buf
                    .get(..4)
                    .and_then(|b| <[u8; 4]>::try_from(b).ok())
                    .map_or(0, u32::from_be_bytes);
                self.buf.clear();
                f(Item::Reset {
                    stream: h.stream,
                    code,
                });
            }
            HEADERS | PUSH_PROMISE => {
                let frame = std::mem::take(&mut self.buf);
                let block = fragment(h, &frame).ok_or(Lost::Malformed)?;
                self.buf = frame;
                self.buf.drain(..block.0);
                self.buf.truncate(block.1 - block.0);
                self.pending = Some(Pending {
                    stream: h.stream,
                    end_stream,
                    promise: h.kind == PUSH_PROMISE,
                    read_off: self.head_read_off,
                });
                if h.flags & END_HEADERS != 0 {
                    self.block_done(f);
                }
            }
            CONTINUATION if h.flags & END_HEADERS != 0 => self.block_done(f),
            _ => {}
        }
        Ok(())
    }

    fn block_done(&mut self, f: &mut impl FnMut(Item<'_>)) {
        if let Some(p) = self.pending.take() {
            f(Item::Headers {
                stream: p.stream,
                end_stream: p.end_stream,
                promise: p.promise,
                block: &self.buf,
                read_off: p.read_off,
            });
        }
        self.buf.clear();
        if self.buf.capacity() > 4096 {
            self.buf = Vec::new();
        }
    }
}

/// The header block fragment's range in a HEADERS or `PUSH_PROMISE` payload: padding, the priority
/// fields and the promised stream id removed. `None`: the payload is too short for its flags.
fn fragment(h: Head, payload: &[u8]) -> Option<(usize, usize)> {
    let mut start = 0;
    let mut end = payload.len();
    if h.flags & PADDED != 0 {
        let pad = usize::from(*payload.first()?);
        start = 1;
        end = end.checked_sub(pad)?;
    }
    if h.kind == HEADERS && h.flags & PRIORITY != 0 {
        start += 5;
    }
    if h.kind == PUSH_PROMISE {
        start += 4;
    }
    (start <= end).then_some((start, end))
}

#[cfg(test)]
pub(crate) mod tests;
