//! What reading TLS costs the traced server: a Node `https` server (`mock_llm.js --tls`, OpenSSL
//! in the node binary) at saturation under `llm-bench client --tls` (8 keep-alive connections,
//! 16 SSE events per request, no timers), in alternating rounds without llm-probe, with it but
//! without the OpenSSL uprobes (`--ssl-probes off`: the socket path only, TLS connections
//! untracked), and with everything (the default).

use std::{
    path::Path,
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result};
use serde_json::Value;

use crate::{
    bench::{client_with, median, wait_port, Kill, Probed},
    root, step,
};

const CONFIGS: [(&str, &str); 2] = [("sock-nossl", "no SSL probes"), ("sock", "SSL probes")];

pub fn tls_overhead(probe: &Path, rounds: usize, seconds: u64) -> Result<()> {
    let certs = tests::tls_client::self_signed_cert("bench");
    let (cert, key) = (&certs.cert, &certs.key);
    let port = tests::free_port();
    let _server = Kill(
        Command::new("node")
            .arg(root().join("tests/fixtures/servers/mock_llm.js"))
            .arg(port.to_string())
            .arg("--tls")
            .args([cert, key])
            .stdout(Stdio::null())
            .spawn()
            .context("starting node")?,
    );
    wait_port(port)?;
    step(&format!(
        "tls overhead: {rounds} rounds x ({seconds} s without llm-probe, then {seconds} s with it \
         {}), Node https, 8 keep-alive TLS connections, 16 SSE events each",
        CONFIGS.map(|c| c.1).join(", then ")
    ));
    let get = |v: &Value, k: &str| v[k].as_f64().unwrap_or(0.0);
    let tls = ["--tls"];
    let _ = client_with(port, 8, 1, &tls)?; // warm-up
    let (mut base_rps, mut base_p99) = (vec![], vec![]);
    let mut probed = vec![Probed::default(); CONFIGS.len()];
    let mut sent = vec![0.0; CONFIGS.len()];
    for r in 0..rounds {
        let b = client_with(port, 8, seconds, &tls)?;
        let mut line = format!(
            "  round {r}: without {:>6.0} req/s p99 {:>6.3} ms",
            get(&b, "rps"),
            get(&b, "p99_ms")
        );
        base_rps.push(get(&b, "rps"));
        base_p99.push(get(&b, "p99_ms"));
        for (i, (config, name)) in CONFIGS.iter().enumerate() {
            let run = (probe, port, *config, *name);
            let w = probed[i].round(run, seconds, "llm_requests_total", &mut line, || {
                client_with(port, 8, seconds, &tls)
            })?;
            sent[i] += get(&w, "requests");
        }
        println!("{line}");
    }
    let (br, bp) = (median(base_rps), median(base_p99));
    println!("tls overhead: median without llm-probe {br:.0} req/s p99 {bp:.3} ms");
    for (i, (_, name)) in CONFIGS.iter().enumerate() {
        let s = &probed[i];
        let (wr, wp) = (median(s.rps.clone()), median(s.p99.clone()));
        println!(
            "tls overhead, {name}: {wr:.0} req/s = {:.1} % of baseline, p99 {wp:.3} ms = {:+.1} %; \
             agent {:.0} % of one core (median); requests recorded {:.0} of {:.0} sent \
             (connections open before attach are picked up at their next request)",
            wr / br * 100.0,
            (wp / bp - 1.0) * 100.0,
            median(s.cpu.clone()),
            s.scraped,
            sent[i],
        );
    }
    Ok(())
}
