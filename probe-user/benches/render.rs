//! `/metrics` render time with ~5k series (32 models x 9 endpoints of TTFT histograms plus request
//! counters), p50/p99 over 500 renders. Goal: p99 <= 10 ms.
//!
//! Run: `cargo bench -p probe-user --bench render`.
use std::time::Instant;

use probe_user::{
    http::{Endpoint, Outcome},
    metrics::{ReqLabels, RequestMetrics, StatusLabels},
};
use prometheus_client::registry::Registry;

fn main() {
    let mut registry = Registry::default();
    let m = RequestMetrics::new(&mut registry);
    for model in 0..32 {
        for e in Endpoint::ALL {
            let model = format!("model-{model}");
            let l = ReqLabels {
                model: model.clone(),
                endpoint: e.as_str(),
            };
            m.ttft.get_or_create(&l).observe(0.2);
            let s = StatusLabels {
                model,
                endpoint: e.as_str(),
                status: Outcome::Ok.as_str(),
            };
            m.requests.get_or_create(&s).inc();
        }
    }
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &registry).expect("encode");
    let series = out.lines().filter(|l| !l.starts_with('#')).count();
    let mut times = Vec::new();
    for _ in 0..500 {
        let t = Instant::now();
        let mut s = String::with_capacity(out.len());
        prometheus_client::encoding::text::encode(&mut s, &registry).expect("encode");
        times.push(t.elapsed().as_secs_f64() * 1e3);
        std::hint::black_box(s);
    }
    times.sort_by(f64::total_cmp);
    let p = |q: f64| times[((times.len() - 1) as f64 * q) as usize];
    println!(
        "render: {series} series, {} KiB; p50 {:.2} ms, p99 {:.2} ms; goal p99 <= 10 ms: {}",
        out.len() / 1024,
        p(0.5),
        p(0.99),
        if p(0.99) <= 10.0 { "met" } else { "NOT met" }
    );
}
