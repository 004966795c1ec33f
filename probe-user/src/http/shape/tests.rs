use proptest::prelude::*;

use super::*;

/// Feeds `events` in order; checks each outcome against `classify`; returns how many were
/// classified from the shape.
fn run(events: &[Vec<u8>]) -> usize {
    let mut shapes = Shapes::default();
    let mut fast = 0;
    for ev in events {
        let fitted = shapes.fits(ev);
        fast += usize::from(fitted);
        let got = shapes.classify(ev);
        let want = classify(ev);
        match (&got, &want) {
            (Ok(g), Ok(w)) => assert_eq!(g, w, "{}", String::from_utf8_lossy(ev)),
            (Err(_), Err(_)) => {}
            _ => panic!("{}: {got:?} vs {want:?}", String::from_utf8_lossy(ev)),
        }
        assert!(shapes.held() <= 2 * MAX_SHAPE + 256, "bounded");
    }
    fast
}

fn chat(id: &str, delta: &str, finish: &str) -> Vec<u8> {
    format!(
        r#"{{"id":"{id}","object":"chat.completion.chunk","created":1718000000,"model":"m","choices":[{{"index":0,"delta":{delta},"logprobs":null,"finish_reason":{finish}}}]}}"#
    )
    .into_bytes()
}

#[test]
fn a_chat_stream_is_classified_from_its_shape_after_two_events() {
    let mut evs = vec![chat(
        "chatcmpl-a",
        r#"{"role":"assistant","content":""}"#,
        "null",
    )];
    for t in ["Hello", " world", "", "!", " é ✓", "tok5"] {
        evs.push(chat(
            "chatcmpl-a",
            &format!(r#"{{"content":"{t}"}}"#),
            "null",
        ));
    }
    evs.push(chat("chatcmpl-a", "{}", r#""stop""#));
    // The role chunk and the first content chunk are parsed; the shape is learnt at the
    // second content chunk; the other four fit it; the last chunk does not.
    assert_eq!(run(&evs), 4);
    let mut shapes = Shapes::default();
    let out: Vec<Classified> = evs.iter().map(|e| shapes.classify(e).unwrap()).collect();
    assert!(
        !out[3].content && out[3].token,
        "an empty text is a token without content"
    );
    assert!(out[4].content && out[4].id.is_some());
}

#[test]
fn only_generated_text_makes_a_shape() {
    // The id differs per event: never learnt (its text is hashed, not tested for emptiness).
    let evs: Vec<Vec<u8>> = (0..6)
        .map(|i| chat(&format!("chatcmpl-{i}"), r#"{"content":"x"}"#, "null"))
        .collect();
    assert_eq!(run(&evs), 0);
    // `object` differs (one of them an error): never learnt.
    let evs: Vec<Vec<u8>> = ["chunk", "error", "chunk", "error"]
        .iter()
        .map(|o| format!(r#"{{"object":"{o}","choices":[]}}"#).into_bytes())
        .collect();
    assert_eq!(run(&evs), 0);
    // A number differs: not a string, never learnt.
    let evs: Vec<Vec<u8>> = (0..6)
        .map(|i| format!(r#"{{"eval_count":{i},"response":"a"}}"#).into_bytes())
        .collect();
    assert_eq!(run(&evs), 0);
    // Ollama's and the completions API's text, TGI's token text: learnt.
    let ollama: Vec<Vec<u8>> = ["a", "bb", "c", "dd"]
        .iter()
        .map(|t| format!(r#"{{"model":"m","response":"{t}","done":false}}"#).into_bytes())
        .collect();
    assert_eq!(run(&ollama), 2);
    let tgi: Vec<Vec<u8>> = ["a", "bb", "c", "dd"]
        .iter()
        .map(|t| {
            format!(r#"{{"token":{{"id":5,"text":"{t}","special":false}},"generated_text":null}}"#)
                .into_bytes()
        })
        .collect();
    assert_eq!(run(&tgi), 2);
}

#[test]
fn text_that_is_not_plain_is_parsed() {
    let mut evs = vec![
        chat("c", r#"{"content":"a"}"#, "null"),
        chat("c", r#"{"content":"b"}"#, "null"),
    ];
    // Escapes, a quote that would end the string early, a raw control byte, bad UTF-8.
    for t in [r"\n", r#"\""#, r"\u00e9", "\u{1}", r#"a","role":"x"#] {
        evs.push(chat("c", &format!(r#"{{"content":"{t}"}}"#), "null"));
    }
    let mut bad = chat("c", r#"{"content":"zz"}"#, "null");
    let at = bad.windows(2).position(|w| w == b"zz").unwrap();
    bad[at] = 0xff;
    evs.push(bad);
    assert_eq!(run(&evs), 0);
}

/// A streamed event of one of several dialects around a text `t` (JSON-escaped or raw).
fn dialect(kind: u8, t: &str) -> Vec<u8> {
    match kind % 6 {
        0 => chat("chatcmpl-p", &format!(r#"{{"content":{t}}}"#), "null"),
        1 => chat(
            "chatcmpl-p",
            &format!(r#"{{"reasoning_content":{t}}}"#),
            "null",
        ),
        2 => format!(r#"{{"id":"cmpl-p","choices":[{{"index":0,"text":{t}}}]}}"#).into_bytes(),
        3 => {
            format!(r#"{{"model":"m","created_at":"x","response":{t},"done":false}}"#).into_bytes()
        }
        4 => format!(r#"{{"type":"response.output_text.delta","delta":{t}}}"#).into_bytes(),
        _ => format!(r#"{{"error":{{"message":{t}}},"object":"error"}}"#).into_bytes(),
    }
}

proptest! {
    /// Whatever the stream, every event's classification is `classify`'s; and the shape is
    /// used (checked over all the cases: `FAST`).
    #[test]
    fn same_as_classify(
        kind in 0u8..6,
        events in proptest::collection::vec(
            (any::<bool>(), prop_oneof![3 => "[a-z é✓]{0,8}", 1 => ".{0,12}"], any::<u8>()),
            1..24,
        )
    ) {
        let evs: Vec<Vec<u8>> = events
            .iter()
            .map(|(raw, text, switch)| {
                let t = if *raw {
                    // Unescaped: may not be JSON at all.
                    format!("\"{text}\"")
                } else {
                    serde_json::to_string(text).unwrap()
                };
                // Now and then a different dialect in the same stream.
                dialect(if switch % 7 == 0 { kind + 1 } else { kind }, &t)
            })
            .collect();
        let fast = run(&evs);
        FAST.fetch_add(fast, std::sync::atomic::Ordering::Relaxed);
        TOTAL.fetch_add(evs.len(), std::sync::atomic::Ordering::Relaxed);
    }
}

static FAST: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
static TOTAL: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

#[test]
fn the_random_streams_use_the_shape() {
    same_as_classify();
    let (fast, total) = (
        FAST.load(std::sync::atomic::Ordering::Relaxed),
        TOTAL.load(std::sync::atomic::Ordering::Relaxed),
    );
    eprintln!("{fast} of {total} random events classified from their shape");
    assert!(fast * 10 >= total * 4, "{fast} of {total}");
}
