//! Request ids in IPC bytes: which IPC message carried a request to the engine and which one
//! brought its first output back, so that overlapping requests get their own hand-off and return
//! instead of the nearest IPC times (docs/attribution.md, "Matching by request id").
//!
//! An OpenAI-style server streams its request id back to the client (`"id": "chatcmpl-…"`), and
//! the engine's IPC messages carry the same id: vLLM's API server sends `chatcmpl-<uuid>-<8 hex>`
//! in each `EngineCoreRequest` and gets it back in every `EngineCoreOutput`; `SGLang` streams its
//! request's `rid` (a bare uuid4 hex, 32 characters) as the id and its tokenizer and detokenizer
//! pass the same `rid` to and from the scheduler. The kernel hands the agent the first bytes of
//! each IPC call (`EventKind::IpcData`); this module looks in them for tokens that start with
//! `chatcmpl-` or `cmpl-` and for bare 32-character lowercase hex words, keeps a hash of each such
//! token (and of the first three and the two longest prefixes of a `cmpl-` token that end before
//! a `-`, so that an engine's suffixed internal id matches the id it streams) with the time of the
//! first send and the first receive that carried it, and of the
//! latest `RECENT_BACKS` receives (the decode gaps' returns) — and nothing else of the bytes.
//! Bounded: `IDS_PER_MESSAGE` tokens per message, `KEYS_KEPT` hashes per process (oldest
//! dropped), `ID_PROCESSES` processes.

use std::collections::VecDeque;

use rustc_hash::FxHashMap;

pub use crate::http::id_hash;
use crate::http::Moment;

/// Id tokens looked at per IPC message; more are ignored.
pub const IDS_PER_MESSAGE: usize = 64;
/// Id hashes kept per process (each ≈ 150 bytes with its times).
pub const KEYS_KEPT: usize = 2048;
/// Processes whose ids are kept.
pub const ID_PROCESSES: usize = 32;
/// Longest id token taken (OpenAI-style ids are 30–60 characters).
const MAX_ID: usize = 128;
/// What every id token contains (`chatcmpl-` is found through it too).
const MARK: &[u8] = b"cmpl-";
/// Length of a bare id: a uuid4 in hex (`SGLang`'s `rid`).
const BARE_ID: usize = 32;
/// Latest receives kept per id: a decode gap takes the last one inside it, and a gap of a
/// streaming request rarely holds more than one or two (the engine's outputs it merged).
pub const RECENT_BACKS: usize = 4;

/// When an id was first seen going to the engine and first seen coming back, and its latest
/// receives.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IdTimes {
    pub sent: Option<Moment>,
    pub back: Option<Moment>,
    /// Times (ns) of the latest `RECENT_BACKS` receives that carried the id, in no order; 0: none.
    recent: [u64; RECENT_BACKS],
}

impl IdTimes {
    /// The last receive that carried the id in `[from, to]`, of the latest `RECENT_BACKS`.
    pub fn last_back_in(&self, from: u64, to: u64) -> Option<u64> {
        self.recent
            .iter()
            .copied()
            .filter(|&t| t != 0 && from <= t && t <= to)
            .max()
    }

    fn note_back(&mut self, ts_ns: u64) {
        if let Some(oldest) = self.recent.iter_mut().min_by_key(|t| **t) {
            if ts_ns > *oldest {
                *oldest = ts_ns;
            }
        }
    }
}

#[derive(Debug, Default)]
struct Seen {
    order: VecDeque<u64>,
    at: FxHashMap<u64, IdTimes>,
}

impl Seen {
    fn note(&mut self, k: u64, at: Moment, egress: bool) {
        if !self.at.contains_key(&k) {
            if self.order.len() >= KEYS_KEPT {
                if let Some(old) = self.order.pop_front() {
                    self.at.remove(&old);
                }
            }
            self.order.push_back(k);
        }
        let t = self.at.entry(k).or_default();
        if egress {
            if t.sent.is_none_or(|s| at.ts_ns < s.ts_ns) {
                t.sent = Some(at);
            }
            return;
        }
        if t.back.is_none_or(|b| at.ts_ns < b.ts_ns) {
            t.back = Some(at);
        }
        t.note_back(at.ts_ns);
    }
}

/// Id hashes seen in each traced process's IPC, with their first send and receive.
#[derive(Debug, Default)]
pub struct IdIndex {
    procs: FxHashMap<u32, Seen>,
}

impl IdIndex {
    /// One IPC message of `tgid` at `at` whose first bytes are `payload`.
    pub fn record(&mut self, tgid: u32, at: Moment, egress: bool, payload: &[u8]) {
        if self.procs.len() >= ID_PROCESSES && !self.procs.contains_key(&tgid) {
            return;
        }
        // Most IPC messages carry no id: nothing is allocated, cleared or entered for them.
        let procs = &mut self.procs;
        id_keys(payload, |k| {
            procs.entry(tgid).or_default().note(k, at, egress);
        });
    }

    /// The times of id `hash` in `tgid`'s IPC.
    pub fn get(&self, tgid: u32, hash: u64) -> Option<IdTimes> {
        self.procs.get(&tgid)?.at.get(&hash).copied()
    }

    /// The times of id `hash` in every process but `except` that saw it (the engine's side of a
    /// front's request: at most `ID_PROCESSES` lookups).
    pub fn elsewhere(&self, except: u32, hash: u64) -> impl Iterator<Item = (u32, IdTimes)> + '_ {
        self.procs
            .iter()
            .filter(move |(&tgid, _)| tgid != except)
            .filter_map(move |(&tgid, seen)| Some((tgid, *seen.at.get(&hash)?)))
    }

    pub fn forget(&mut self, tgid: u32) {
        self.procs.remove(&tgid);
    }
}

const fn is_id_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'-' || b == b'_'
}

/// Hands `out` the hashes of the id tokens in `bytes`, at most `IDS_PER_MESSAGE` tokens: first
/// the `cmpl-` tokens (`cmpl_keys`), then the bare ones (`bare_keys`).
fn id_keys(bytes: &[u8], mut out: impl FnMut(u64)) {
    let tokens = cmpl_keys(bytes, &mut out);
    bare_keys(bytes, IDS_PER_MESSAGE - tokens, &mut out);
}

const fn is_hex(b: u8) -> bool {
    matches!(b, b'0'..=b'9' | b'a'..=b'f')
}

/// A bare id: exactly `BARE_ID` lowercase hex digits with no id character on either side (so
/// the hex inside `chatcmpl-<hex>-1` is not one). Hands `out` the hash of each of the first
/// `budget`; returns how many.
///
/// Strided: any `BARE_ID` consecutive bytes hold exactly one index ≡ `BARE_ID - 1` (mod
/// `BARE_ID`), so only the bytes there are tested until one is hex; its hex run is then taken
/// whole. Most IPC bytes are not hex runs (msgpack, pickles, token ids): a 4 KiB message costs
/// 128 tests instead of 4,096 (this loop was ≈ 16 % of the agent's CPU under vLLM).
fn bare_keys(bytes: &[u8], budget: usize, out: &mut impl FnMut(u64)) -> usize {
    let mut n = 0;
    let mut probe = BARE_ID - 1;
    while probe < bytes.len() {
        if !is_hex(bytes[probe]) {
            probe += BARE_ID;
            continue;
        }
        let mut start = probe;
        while start > 0 && is_hex(bytes[start - 1]) {
            start -= 1;
        }
        let mut end = probe + 1;
        while end < bytes.len() && is_hex(bytes[end]) {
            end += 1;
        }
        let free_before = start == 0 || !is_id_byte(bytes[start - 1]);
        let free_after = end == bytes.len() || !is_id_byte(bytes[end]);
        if end - start == BARE_ID && free_before && free_after {
            if n == budget {
                break;
            }
            out(id_hash(&bytes[start..end]));
            n += 1;
        }
        // `bytes[end]` is not hex, so the next run starts past it and covers the first probe
        // index there.
        probe = (end + 1) / BARE_ID * BARE_ID + BARE_ID - 1;
    }
    n
}

/// The `cmpl-` tokens: from `chatcmpl-` or `cmpl-` over id characters (letters, digits, `-`,
/// `_`); its hash and those of its prefixes that end before a `-` past the mark are handed to
/// `out`: the first three such prefixes and the two longest (vLLM's internal id is the external
/// one and `-<8 hex>`, or for a completion `-<prompt index>-<8 hex>`, and an external id taken from
/// an `X-Request-Id` header is often a uuid with four dashes of its own); at most 6 per token.
/// Returns how many tokens.
fn cmpl_keys(bytes: &[u8], out: &mut impl FnMut(u64)) -> usize {
    let mut from = 0;
    let mut tokens = 0;
    while let Some(i) = memchr::memmem::find(&bytes[from..], MARK).map(|i| i + from) {
        if tokens == IDS_PER_MESSAGE {
            break;
        }
        let start = if i >= 4 && &bytes[i - 4..i] == b"chat" {
            i - 4
        } else {
            i
        };
        let body = i + MARK.len();
        let mut end = body;
        while end < bytes.len() && end - start < MAX_ID && is_id_byte(bytes[end]) {
            end += 1;
        }
        from = end.max(body);
        if end == body {
            continue; // nothing after the mark
        }
        tokens += 1;
        // The last two cuts past the first three: (second longest, longest).
        let mut longest: [Option<usize>; 2] = [None, None];
        for (n, cut) in (body + 1..end).filter(|&j| bytes[j] == b'-').enumerate() {
            if n < 3 {
                out(id_hash(&bytes[start..cut]));
            } else {
                longest = [longest[1], Some(cut)];
            }
        }
        for cut in longest.into_iter().flatten() {
            out(id_hash(&bytes[start..cut]));
        }
        out(id_hash(&bytes[start..end]));
    }
    tokens
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// `bare_keys` as it was written first: every byte in turn.
    fn bare_keys_bytewise(bytes: &[u8], budget: usize) -> Vec<u64> {
        let mut out = Vec::new();
        let mut run = 0;
        for i in 0..=bytes.len() {
            let b = bytes.get(i).copied();
            if b.is_some_and(is_hex) {
                run += 1;
                continue;
            }
            let start = i - run;
            let free_before = start == 0 || !is_id_byte(bytes[start - 1]);
            if run == BARE_ID && free_before && b.is_none_or(|b| !is_id_byte(b)) {
                if out.len() == budget {
                    break;
                }
                out.push(id_hash(&bytes[start..i]));
            }
            run = 0;
        }
        out
    }

    proptest! {
        /// Runs of hex of lengths around `BARE_ID`, id and other bytes between them, at every
        /// alignment: the strided scan finds what the byte-wise one finds, in the same order.
        #[test]
        fn the_strided_scan_finds_what_the_bytewise_one_does(
            parts in proptest::collection::vec(
                (0usize..4, 28usize..36, 0usize..3),
                0..24,
            ),
            lead in 0usize..40,
            budget in 0usize..6,
        ) {
            let mut bytes = vec![b'\x93'; lead];
            for (i, (sep, len, kind)) in parts.iter().enumerate() {
                bytes.extend(std::iter::repeat_n([b' ', b'-', b'g', b'\xd9'][*sep], 1 + i % 2));
                let hex = b"0123456789abcdef";
                match kind {
                    0 => bytes.extend((0..*len).map(|j| hex[(j * 7 + i) % 16])),
                    1 => bytes.extend((0..*len).map(|j| b"9fA_"[(j + i) % 4])),
                    _ => bytes.extend((0..*len).map(|j| (j * 31 + i) as u8)),
                }
            }
            let mut got = Vec::new();
            let n = bare_keys(&bytes, budget, &mut |k| got.push(k));
            prop_assert_eq!(n, got.len());
            prop_assert_eq!(got, bare_keys_bytewise(&bytes, budget));
        }
    }

    fn at(ts_ns: u64) -> Moment {
        Moment {
            ts_ns,
            ..Moment::default()
        }
    }

    fn keys(b: &[u8]) -> Vec<u64> {
        let mut out = Vec::new();
        id_keys(b, |k| out.push(k));
        out
    }

    #[test]
    fn suffixed_internal_ids_match_the_streamed_id() {
        // msgpack: a str8 marker and length byte, then vLLM's internal id.
        let msg = b"\x93\xd9\x31chatcmpl-0a1b2c3d4e5f-9f8e7d6c\xc0";
        let k = keys(msg);
        assert!(k.contains(&id_hash(b"chatcmpl-0a1b2c3d4e5f")), "{k:?}");
        assert!(k.contains(&id_hash(b"chatcmpl-0a1b2c3d4e5f-9f8e7d6c")));
        assert!(!k.contains(&id_hash(b"chatcmpl")));
        assert_eq!(keys(br#"{"id":"cmpl-7"}"#), vec![id_hash(b"cmpl-7")]);
        // An id from a uuid `X-Request-Id` header (vLLM streams `chatcmpl-<header>` and suffixes
        // it inside): the prefix before the last dash, past the first three.
        let streamed = b"chatcmpl-00000000-0000-4000-8000-000000000001";
        let msg = [b"\x93\xd9\x3a".as_slice(), streamed, b"-9f8e7d6c\xc0"].concat();
        let k = keys(&msg);
        assert!(k.contains(&id_hash(streamed)), "{k:?}");
        assert_eq!(k.len(), 6, "the first 3 prefixes, the 2 longest, the token");
        // A completion's: `cmpl-<header>-<prompt index>-<8 hex>`.
        let streamed = b"cmpl-00000000-0000-4000-8000-000000000001";
        let msg = [b"\xd9\x3c".as_slice(), streamed, b"-0-9f8e7d6c\xc0"].concat();
        let k = keys(&msg);
        assert!(k.contains(&id_hash(streamed)), "{k:?}");
        assert_eq!(k.len(), 6, "the first 3 prefixes, the 2 longest, the token");
    }

    #[test]
    fn bare_uuid_hex_ids_are_tokens_of_their_own() {
        let rid = "0123456789abcdef0123456789abcdef";
        // SGLang's pickled request (protocol 5: SHORT_BINUNICODE, length byte, text, MEMOIZE).
        let pickled = [
            b"\x8c\x03rid\x94\x8c\x20".as_slice(),
            rid.as_bytes(),
            b"\x94",
        ]
        .concat();
        assert_eq!(keys(&pickled), vec![id_hash(rid.as_bytes())]);
        assert_eq!(
            keys(format!(r#"{{"rid":"{rid}"}}"#).as_bytes()),
            vec![id_hash(rid.as_bytes())]
        );
        // Not one: inside a longer word or id, 31 or 33 digits, upper case.
        for not in [
            format!("chatcmpl-{rid}-1"),
            format!("x{rid}"),
            format!("{rid}_"),
            rid[1..].to_owned(),
            format!("{rid}0"),
            rid.to_uppercase(),
        ] {
            let k = keys(not.as_bytes());
            assert!(!k.contains(&id_hash(rid.as_bytes())), "{not}: {k:?}");
        }
        // Both kinds in one message, and the per-message bound covers both.
        let both = format!("chatcmpl-7 {rid} ");
        assert_eq!(keys(both.as_bytes()).len(), 2);
        let many = (0..100)
            .map(|i| format!("{i:032x}"))
            .collect::<Vec<_>>()
            .join(" ");
        assert_eq!(keys(many.as_bytes()).len(), IDS_PER_MESSAGE);
    }

    #[test]
    fn nothing_without_an_id_and_bounded_with_many() {
        assert!(keys(b"no ids here, cmpl- alone, chat").is_empty());
        let many: Vec<u8> = (0..200)
            .flat_map(|i| format!("chatcmpl-{i}-a-b-c-d-e-f ").into_bytes())
            .collect();
        let k = keys(&many);
        assert_eq!(
            k.len(),
            IDS_PER_MESSAGE * 6,
            "the first 3 prefixes, the 2 longest, the token; 64 tokens"
        );
        // A token cut at MAX_ID bytes still counts.
        let long = [b"chatcmpl-".as_slice(), &[b'a'; 300]].concat();
        assert_eq!(keys(&long).len(), 1);
    }

    #[test]
    fn first_send_and_first_receive_are_kept() {
        let mut ix = IdIndex::default();
        let id = b"chatcmpl-abc";
        ix.record(7, at(200), true, b"..chatcmpl-abc-1..");
        ix.record(7, at(100), true, b"..chatcmpl-abc-1.."); // late record, earlier time
        ix.record(7, at(500), false, b"chatcmpl-abc-1 chatcmpl-def-2");
        ix.record(7, at(900), false, b"chatcmpl-abc-1");
        let t = ix.get(7, id_hash(id)).expect("seen");
        assert_eq!(t.sent.map(|m| m.ts_ns), Some(100));
        assert_eq!(t.back.map(|m| m.ts_ns), Some(500));
        assert!(ix.get(8, id_hash(id)).is_none());
        // The decode gaps' returns: the last receive inside a window.
        assert_eq!(t.last_back_in(0, 1000), Some(900));
        assert_eq!(t.last_back_in(0, 899), Some(500));
        assert_eq!(t.last_back_in(501, 899), None);
        ix.forget(7);
        assert!(ix.get(7, id_hash(id)).is_none());
    }

    #[test]
    fn the_latest_receives_are_kept() {
        let mut ix = IdIndex::default();
        // Out of order, more than are kept: the latest RECENT_BACKS stay.
        for ts in [50, 10, 70, 30, 60, 20, 40] {
            ix.record(1, at(ts), false, b"cmpl-a");
        }
        let t = ix.get(1, id_hash(b"cmpl-a")).expect("seen");
        assert_eq!(t.back.map(|m| m.ts_ns), Some(10), "the first receive stays");
        assert_eq!(t.last_back_in(0, 100), Some(70));
        assert_eq!(t.last_back_in(0, 55), Some(50));
        assert_eq!(t.last_back_in(0, 35), None, "30 and older are not kept");
        // Sends do not count as receives.
        ix.record(1, at(80), true, b"cmpl-a");
        assert_eq!(
            ix.get(1, id_hash(b"cmpl-a")).unwrap().last_back_in(75, 100),
            None
        );
    }

    #[test]
    fn memory_is_bounded() {
        let mut ix = IdIndex::default();
        for i in 0..(KEYS_KEPT + 10) {
            ix.record(1, at(i as u64), true, format!("cmpl-{i}").as_bytes());
        }
        assert!(ix.get(1, id_hash(b"cmpl-0")).is_none(), "oldest dropped");
        assert!(ix
            .get(1, id_hash(format!("cmpl-{}", KEYS_KEPT + 9).as_bytes()))
            .is_some());
        for p in 0..(ID_PROCESSES as u32 + 5) {
            ix.record(100 + p, at(1), true, b"cmpl-x");
        }
        assert_eq!(ix.procs.len(), ID_PROCESSES);
    }
}
