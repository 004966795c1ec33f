use super::*;
use crate::http::sse::tests::Collect;

fn messages(sizes: &[usize]) -> Vec<u8> {
    let mut b = Vec::new();
    for &n in sizes {
        b.push(0);
        b.extend_from_slice(&(n as u32).to_be_bytes());
        b.extend(std::iter::repeat_n(b'x', n));
    }
    b
}

#[test]
fn messages_are_counted_whatever_the_split() {
    let b = messages(&[3, 0, 10, 1]);
    for cut in 0..=b.len() {
        let (mut r, mut c) = (MessageReader::default(), Collect::default());
        r.feed(&b[..cut], 1, &mut c);
        r.feed(&b[cut..], 2, &mut c);
        let content = c.events.iter().filter(|(e, _)| e.content).count();
        assert_eq!(content, 4, "cut {cut}");
        // A message is dated by the write that completes it.
        let last = c.events.last().map(|(_, ts)| *ts);
        assert_eq!(last, Some(if cut == b.len() { 1 } else { 2 }), "cut {cut}");
    }
}

#[test]
fn uncaptured_bytes_inside_a_message_are_skipped_exactly() {
    let b = messages(&[100, 2]);
    let (mut r, mut c) = (MessageReader::default(), Collect::default());
    r.feed(&b[..20], 1, &mut c);
    r.gap(85, 2, &mut c);
    r.feed(&b[105..], 3, &mut c);
    assert_eq!(
        c.events.iter().map(|(_, ts)| *ts).collect::<Vec<_>>(),
        vec![2, 3]
    );
    assert!(c.parse_errors.is_empty());
    // A prefix cut loses the framing, once.
    r.feed(&b[..2], 4, &mut c);
    r.gap(10, 5, &mut c);
    r.feed(&b, 6, &mut c);
    assert_eq!(c.events.len(), 2);
    assert_eq!(c.parse_errors, vec![ParseErrorKind::TruncatedCapture]);
}

#[test]
fn method_paths_are_a_bounded_checked_set() {
    let a = method_endpoint(b"/llm.Generator/Generate");
    assert_eq!(a, method_endpoint(b"/llm.Generator/Generate"));
    assert_eq!(a.as_str(), "/llm.Generator/Generate");
    for bad in [
        &b"llm.Generator/Generate"[..],
        b"/llm.Generator",
        b"/a/b/c",
        b"/a\"/b",
        b"/a/b\n",
        b"//b",
    ] {
        assert_eq!(method_endpoint(bad).as_str(), "grpc_other", "{bad:?}");
    }
    assert!(is_grpc(b"application/grpc"));
    assert!(is_grpc(b"application/grpc+proto"));
    assert!(!is_grpc(b"application/json"));
    assert_eq!(status_outcome(0), None);
    assert_eq!(status_outcome(13), Some(Outcome::ServerError));
    assert_eq!(status_outcome(3), Some(Outcome::ClientError));
}
