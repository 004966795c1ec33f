use super::*;

/// One frame's bytes (used by the connection tests too).
pub(crate) fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = len.to_be_bytes()[1..].to_vec();
    f.extend_from_slice(&[kind, flags]);
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// Items as owned values.
#[derive(Debug, PartialEq, Eq, Clone)]
enum Owned {
    Data(u32, Vec<u8>),
    Gap(u32),
    DataEnd(u32, bool),
    Headers(u32, bool, bool, Vec<u8>),
    Reset(u32, u32),
}

/// Feeds `chunks`, merging adjacent data pieces of one stream.
fn run(client: bool, chunks: &[(&[u8], u64)]) -> (Vec<Owned>, Result<(), Lost>) {
    let mut r = FrameReader::new(client);
    let mut out: Vec<Owned> = Vec::new();
    let mut res = Ok(());
    for (data, missing) in chunks {
        let got = r.feed(data, *missing, &mut |item| {
            let o = match item {
                Item::Data { stream, bytes } => {
                    if let Some(Owned::Data(s, b)) = out.last_mut() {
                        if *s == stream {
                            b.extend_from_slice(bytes);
                            return;
                        }
                    }
                    Owned::Data(stream, bytes.to_vec())
                }
                Item::DataGap { stream, .. } => Owned::Gap(stream),
                Item::DataEnd { stream, end_stream } => Owned::DataEnd(stream, end_stream),
                Item::Headers {
                    stream,
                    end_stream,
                    promise,
                    block,
                    ..
                } => Owned::Headers(stream, end_stream, promise, block.to_vec()),
                Item::Reset { stream, code } => Owned::Reset(stream, code),
            };
            out.push(o);
        });
        if got.is_err() {
            res = got;
        }
    }
    (out, res)
}

fn client_bytes() -> Vec<u8> {
    let mut b = PREFACE.to_vec();
    b.extend(frame(SETTINGS, 0, 0, &[0, 3, 0, 0, 0, 100]));
    // HEADERS with padding and priority, then a CONTINUATION.
    let mut h = vec![2u8];
    h.extend_from_slice(&[0, 0, 0, 0, 16]);
    h.extend_from_slice(b"abc");
    h.extend_from_slice(&[0, 0]);
    b.extend(frame(HEADERS, PADDED | PRIORITY, 1, &h));
    b.extend(frame(CONTINUATION, END_HEADERS, 1, b"def"));
    // Padded DATA, then plain DATA ending the stream.
    b.extend(frame(DATA, PADDED, 1, &[3, b'{', b'}', 0, 0, 0]));
    b.extend(frame(DATA, END_STREAM, 1, b"xy"));
    b.extend(frame(RST_STREAM, 0, 3, &8u32.to_be_bytes()));
    b.extend(frame(6, 0, 0, &[0; 8])); // PING: skipped
    b
}

fn expected() -> Vec<Owned> {
    vec![
        Owned::Headers(1, false, false, b"abcdef".to_vec()),
        Owned::Data(1, b"{}".to_vec()),
        Owned::DataEnd(1, false),
        Owned::Data(1, b"xy".to_vec()),
        Owned::DataEnd(1, true),
        Owned::Reset(3, 8),
    ]
}

#[test]
fn frames_are_read_whatever_the_split() {
    let b = client_bytes();
    assert_eq!(run(true, &[(&b, 0)]), (expected(), Ok(())));
    for cut in 1..b.len() {
        let (x, y) = b.split_at(cut);
        assert_eq!(
            run(true, &[(x, 0), (y, 0)]),
            (expected(), Ok(())),
            "cut {cut}"
        );
    }
    let bytes: Vec<(&[u8], u64)> = b.chunks(1).map(|c| (c, 0)).collect();
    assert_eq!(run(true, &bytes), (expected(), Ok(())));
}

#[test]
fn uncaptured_data_is_a_gap_and_framing_goes_on() {
    let mut b = frame(DATA, 0, 5, &[b'a'; 100]);
    b.extend(frame(DATA, END_STREAM, 5, b"z"));
    // The kernel captured the head and 10 payload bytes of a 110-byte write.
    let (items, res) = run(false, &[(&b[..19], 90), (&b[109..], 0)]);
    assert_eq!(res, Ok(()));
    assert_eq!(
        items,
        vec![
            Owned::Data(5, vec![b'a'; 10]),
            Owned::Gap(5),
            Owned::DataEnd(5, false),
            Owned::Data(5, b"z".to_vec()),
            Owned::DataEnd(5, true),
        ]
    );
}

#[test]
fn what_cannot_be_followed_is_lost_once() {
    // A frame head not captured.
    let b = frame(DATA, 0, 1, b"abc");
    assert_eq!(run(false, &[(&b[..4], 8)]).1, Err(Lost::Truncated));
    // A header block not captured: HPACK would be out of step.
    let h = frame(HEADERS, END_HEADERS, 1, &[0x82; 40]);
    let (items, res) = run(false, &[(&h[..20], 29), (&b, 0)]);
    assert_eq!((items, res), (vec![], Err(Lost::Truncated)));
    // Not the preface; a CONTINUATION out of place; DATA on stream 0; a bad pad length.
    assert_eq!(
        run(true, &[(b"GET / HTTP/1.1\r\n", 0)]).1,
        Err(Lost::Malformed)
    );
    for bad in [
        frame(CONTINUATION, END_HEADERS, 1, b"x"),
        frame(DATA, 0, 0, b"x"),
        frame(DATA, PADDED, 1, &[9, 1]),
        frame(RST_STREAM, 0, 1, &[0; 3]),
    ] {
        assert_eq!(run(false, &[(&bad, 0)]).1, Err(Lost::Malformed), "{bad:?}");
    }
    // A header block over the bound.
    let mut big = frame(HEADERS, 0, 1, &vec![0; 16_000]);
    for _ in 0..5 {
        big.extend(frame(CONTINUATION, 0, 1, &vec![0; 16_000]));
    }
    assert_eq!(run(false, &[(&big, 0)]).1, Err(Lost::Malformed));
}

#[test]
fn prefaces_are_recognised() {
    assert!(starts_with_preface(PREFACE));
    assert!(starts_with_preface(b"PRI * HT"));
    assert!(starts_with_preface(b"PR"));
    assert!(!starts_with_preface(b"P"));
    assert!(!starts_with_preface(b"POST / HTTP/1.1\r\n"));
    assert!(is_server_preface(&frame(
        SETTINGS,
        0,
        0,
        &[0, 3, 0, 0, 0, 100]
    )));
    assert!(is_server_preface(&frame(SETTINGS, 0, 0, &[])));
    assert!(!is_server_preface(&frame(SETTINGS, 1, 0, &[])));
    assert!(!is_server_preface(&frame(SETTINGS, 0, 0, &[0; 5])));
    assert!(!is_server_preface(b"HTTP/1.1 200 OK\r\n"));
}

#[test]
fn frames_seen_mid_stream_are_recognised() {
    let mut b = frame(HEADERS, END_HEADERS, 7, &[0x82, 0x84]);
    b.extend(frame(DATA, END_STREAM, 7, b"{}"));
    assert!(looks_like_frames(&b));
    // The last frame cut by the end of the read.
    assert!(looks_like_frames(&b[..b.len() - 1]));
    assert!(looks_like_frames(&frame(8, 0, 0, &[0, 0, 1, 0])));
    for not in [
        &b"POST / HTTP/1.1\r\n"[..],
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc",
        &frame(DATA, 0, 0, b"x"),
        &frame(SETTINGS, 0, 1, &[]),
        &frame(12, 0, 1, &[]),
        b"\x00\x00",
    ] {
        assert!(!looks_like_frames(not), "{not:?}");
    }
}
