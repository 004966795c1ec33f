//! Any string a client or an engine page can send becomes a label value that cannot break the
//! exposition format: checked on the value itself and on a page encoded with it, whose every
//! sample line must still split into name, labels and value.

use probe_user::metrics::{label_value, RequestMetrics, StatusLabels, MAX_LABEL_LEN};
use prometheus_client::{encoding::text::encode, registry::Registry};
use proptest::prelude::*;

fn safe(c: char) -> bool {
    c.is_ascii_alphanumeric() || "_.:/@+-=".contains(c)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn any_string_becomes_a_safe_label(raw in any::<String>()) {
        let v = label_value(&raw);
        prop_assert!(!v.is_empty() && v.len() <= MAX_LABEL_LEN);
        prop_assert!(v.chars().all(safe), "{v:?}");
        // Safe input is kept as it is.
        if !raw.is_empty() && raw.len() <= MAX_LABEL_LEN && raw.chars().all(safe) {
            prop_assert_eq!(&v, &raw);
        }
    }

    #[test]
    fn a_page_with_any_model_still_parses(raw in any::<String>()) {
        let mut r = Registry::default();
        let m = RequestMetrics::new(&mut r);
        m.requests
            .get_or_create(&StatusLabels {
                model: label_value(&raw),
                endpoint: "/v1/chat/completions",
                status: "ok",
            })
            .inc();
        let mut page = String::new();
        encode(&mut page, &r).expect("encodes");
        let line = page
            .lines()
            .find(|l| l.starts_with("llm_requests_total{"))
            .expect("the sample is on one line");
        // name{k="v",...} value: exactly the quotes the three labels need, then the value.
        prop_assert_eq!(line.matches('"').count(), 6, "{}", line);
        prop_assert!(line.ends_with("} 1"), "{}", line);
    }
}
