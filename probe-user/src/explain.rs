//! `llm-probe explain`: the slowest recent requests (by time to first token) of a running agent,
//! each with where its TTFT went: the stages, the engine stage's wait on the GPU (`gpu_sync`, when
//! the CUDA probes are live) and the thread states of `/api/v1/requests` (docs/attribution.md).

use std::fmt::Write as _;

use serde_json::Value;

#[derive(clap::Args)]
pub struct Args {
    /// The running agent.
    #[arg(long, default_value_t = format!("http://{}", probe_user::server::DEFAULT_LISTEN))]
    pub url: String,
    /// How many requests to show, slowest TTFT first (of the last 1,000 the agent kept).
    #[arg(long, default_value_t = 10)]
    pub top: usize,
    /// Show only the request with this X-Request-Id (exit status 1 when it is not among them).
    #[arg(long = "request-id", value_name = "ID")]
    pub request_id: Option<String>,
}

const HEADER: [&str; 15] = [
    "REQUEST",
    "MODEL",
    "STATUS",
    "TTFT",
    "socket_queue",
    "frontend",
    "engine",
    "gpu_sync",
    "output",
    "HANDOFF",
    "on_cpu",
    "runnable",
    "blocked",
    "TOKENS",
    "E2E",
];

pub fn run(a: &Args) -> anyhow::Result<()> {
    let page = crate::ask_json(&a.url, "/api/v1/requests?limit=1000")?;
    let requests = page["requests"].as_array().cloned().unwrap_or_default();
    let rows = select(&requests, a.top, a.request_id.as_deref());
    if rows.is_empty() {
        if let Some(id) = &a.request_id {
            anyhow::bail!("no recent request has X-Request-Id {id:?}");
        }
        println!("no finished requests with a first token yet");
        return Ok(());
    }
    print!("{}", table(&rows));
    if a.request_id.is_some() {
        print!("{}", detail(rows[0]));
    }
    println!(
        "\ntimes in ms. socket_queue: the request waited in the server's socket before it was \
         read; frontend: read -> hand-off to the engine process; engine: -> its output back; \
         output: -> first token written (single-process servers: all in engine). HANDOFF: how \
         the hand-off and return were found: id (the request's own id in the engine's IPC \
         bytes: exact), time (the nearest IPC times: a bound when requests overlap), none (no \
         IPC). on_cpu, runnable (waiting for a CPU), blocked: the thread that read the request \
         and wrote the token, over frontend + engine + output; '-' = not split \
         (docs/attribution.md)."
    );
    Ok(())
}

/// The requests to show: the one with `id`, or the `top` with the longest TTFT (those with one).
fn select<'a>(requests: &'a [Value], top: usize, id: Option<&str>) -> Vec<&'a Value> {
    let mut rows: Vec<&Value> = requests
        .iter()
        .filter(|r| r["ttft_ns"].is_u64())
        .filter(|r| id.is_none_or(|id| r["request_id"] == id))
        .collect();
    rows.sort_by_key(|r| std::cmp::Reverse(r["ttft_ns"].as_u64()));
    rows.truncate(top.max(1));
    rows
}

fn ms(v: &Value) -> String {
    v.as_u64()
        .map_or_else(|| "-".to_owned(), |ns| format!("{:.1}", ns as f64 / 1e6))
}

/// Aligned columns; label text from the hostile side (ids, model names) is cut to 40 chars and
/// its control characters replaced.
fn table(rows: &[&Value]) -> String {
    let clean = |s: &str| -> String {
        s.chars()
            .take(40)
            .map(|c| if c.is_control() { '?' } else { c })
            .collect()
    };
    let mut lines: Vec<[String; 15]> = vec![HEADER.map(str::to_owned)];
    for r in rows {
        let name = r["request_id"].as_str().map_or_else(
            || format!("pid {} fd {} #{}", r["pid"], r["fd"], r["seq"]),
            &clean,
        );
        let t = &r["threads_ns"]["server"];
        let st = &r["stages_ns"];
        lines.push([
            name,
            clean(r["model"].as_str().unwrap_or("-")),
            r["status"]
                .as_u64()
                .map_or_else(|| "-".to_owned(), |s| s.to_string()),
            ms(&r["ttft_ns"]),
            ms(&st["socket_queue"]),
            ms(&st["frontend"]),
            ms(&st["engine"]),
            ms(&r["gpu_ns"]["sync_wait"]),
            ms(&st["output"]),
            r["hand_off"].as_str().unwrap_or("-").to_owned(),
            ms(&t["on_cpu"]),
            ms(&t["runnable"]),
            ms(&t["blocked"]),
            r["tokens"].to_string(),
            ms(&r["duration_ns"]),
        ]);
    }
    let width: Vec<usize> = (0..HEADER.len())
        .map(|i| {
            lines
                .iter()
                .map(|l| l[i].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for l in &lines {
        let cells: Vec<String> = l
            .iter()
            .zip(&width)
            .enumerate()
            .map(|(i, (c, w))| {
                if i < 2 {
                    format!("{c:<w$}")
                } else {
                    format!("{c:>w$}")
                }
            })
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// One request's stages by the serving thread's states, and its decode split, as lines under
/// the table (`--request-id`): what the table's thread columns hold for the whole span, per
/// stage; nothing for parts the agent did not split.
fn detail(r: &Value) -> String {
    let mut out = String::new();
    let th = &r["threads_ns"];
    let st = &r["stages_ns"];
    let staged: Vec<&str> = ["frontend", "engine", "output"]
        .into_iter()
        .filter(|s| th[*s].is_object())
        .collect();
    if !staged.is_empty() {
        out.push_str(
            "\nby stage, the serving thread (ms): stage, time, on_cpu, runnable, blocked\n",
        );
        for s in staged {
            let t = &th[s];
            let _ = writeln!(
                out,
                "  {s:<9} {:>9} {:>9} {:>9} {:>9}",
                ms(&st[s]),
                ms(&t["on_cpu"]),
                ms(&t["runnable"]),
                ms(&t["blocked"])
            );
        }
    }
    let e = &r["engine_ns"];
    if e.is_object() {
        let t = &e["threads"];
        let states = if t.is_object() {
            let whose = if e["tid"] == e["pid"] {
                "its main thread".to_owned()
            } else {
                format!("its thread {}", e["tid"])
            };
            format!(
                "{whose} on_cpu {} / runnable {} / blocked {} ms",
                ms(&t["on_cpu"]),
                ms(&t["runnable"]),
                ms(&t["blocked"])
            )
        } else {
            "its thread states not split (no one thread's clock at both ends)".to_owned()
        };
        let _ = writeln!(
            out,
            "\nengine, from the engine process (pid {}): to it {} ms, in it {} ms, back {} ms; \
             {states}",
            e["pid"],
            ms(&e["to_engine"]),
            ms(&e["in_engine"]),
            ms(&e["from_engine"]),
        );
    }
    let d = &r["decode_ns"];
    if d.is_object() {
        let _ = writeln!(
            out,
            "\ndecode (first token -> last): engine {} ms, output {} ms; gaps split \
             at their own id: {}; the writing thread on_cpu {} / runnable {} / blocked {} / \
             unknown {} ms",
            ms(&d["engine"]),
            ms(&d["output"]),
            d["by_id"]
                .as_u64()
                .map_or_else(|| "-".to_owned(), |n| n.to_string()),
            ms(&d["threads"]["on_cpu"]),
            ms(&d["threads"]["runnable"]),
            ms(&d["threads"]["blocked"]),
            ms(&d["threads"]["unknown"]),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn slowest_first_with_stages_and_unsplit_dashes() {
        let reqs = vec![
            json!({"request_id": "a", "model": "m", "status": 200, "ttft_ns": 5_000_000u64,
                   "stages_ns": {"socket_queue": 1_000_000u64, "frontend": 0, "engine": 4_000_000u64, "output": 0},
                   "threads_ns": {"server": {"on_cpu": 3_000_000u64, "runnable": 0, "blocked": 1_000_000u64}},
                   "gpu_ns": {"sync_wait": 2_500_000u64, "syncs": 1},
                   "tokens": 3, "duration_ns": 9_000_000u64}),
            json!({"request_id": "b\u{1b}[31m", "model": null, "status": 200, "ttft_ns": 9_000_000u64,
                   "stages_ns": {"socket_queue": 0, "frontend": 2_000_000u64, "engine": 6_000_000u64, "output": 1_000_000u64}, "hand_off": "id", "threads_ns": null,
                   "tokens": 1, "duration_ns": 9_500_000u64}),
            json!({"request_id": "c", "ttft_ns": null, "tokens": 0}),
        ];
        let rows = select(&reqs, 10, None);
        assert_eq!(rows.len(), 2, "requests without a first token are left out");
        let t = table(&rows);
        let lines: Vec<&str> = t.lines().collect();
        assert!(
            lines[0].starts_with("REQUEST") && lines[0].contains("socket_queue"),
            "{t}"
        );
        assert!(
            lines[1].starts_with("b?[31m"),
            "slowest first, control chars replaced: {t}"
        );
        assert!(lines[1].contains("9.0") && lines[1].contains(" - "), "{t}");
        assert!(
            lines[2].starts_with("a ") && lines[2].contains("3.0") && lines[2].contains("2.5"),
            "{t}"
        );
        assert!(
            lines[0].contains("HANDOFF") && lines[1].contains(" id "),
            "how the hand-off was found: {t}"
        );
        assert_eq!(select(&reqs, 10, Some("a")).len(), 1);
        assert_eq!(
            detail(rows[1]),
            "",
            "nothing split per stage, no decode: no detail"
        );
        assert!(select(&reqs, 10, Some("zzz")).is_empty());
        assert_eq!(select(&reqs, 1, None).len(), 1);
    }

    #[test]
    fn one_request_in_detail_by_stage_and_decode() {
        let r = json!({"request_id": "x", "ttft_ns": 70_000_000u64, "gaps_ns": [5, 6, 7],
            "stages_ns": {"socket_queue": 0, "frontend": 21_500_000u64, "engine": 40_000_000u64, "output": 8_500_000u64},
            "threads_ns": {"server": {"on_cpu": 1, "runnable": 2, "blocked": 3},
                "frontend": {"on_cpu": 20_000_000u64, "runnable": 1_400_000u64, "blocked": 100_000u64},
                "engine": {"on_cpu": 0, "runnable": 0, "blocked": 40_000_000u64},
                "output": null},
            "engine_ns": {"pid": 42, "to_engine": 500_000u64, "in_engine": 39_000_000u64,
                "from_engine": 500_000u64,
                "threads": {"on_cpu": 9_000_000u64, "runnable": 30_000_000u64, "blocked": 0},
                "tid": 43},
            "decode_ns": {"engine": 120_000_000u64, "output": 60_000_000u64, "by_id": 3,
                "threads": {"on_cpu": 1_000_000u64, "runnable": 0, "blocked": 179_000_000u64, "unknown": 0}}});
        let d = detail(&r);
        let lines: Vec<&str> = d.lines().collect();
        assert!(lines[1].starts_with("by stage"), "{d}");
        assert_eq!(
            lines[2].split_whitespace().collect::<Vec<_>>(),
            ["frontend", "21.5", "20.0", "1.4", "0.1"],
            "{d}"
        );
        assert!(lines[3].trim_start().starts_with("engine"), "{d}");
        assert!(!d.contains("output  "), "an unsplit stage is left out: {d}");
        assert!(
            d.contains("engine process (pid 42): to it 0.5 ms, in it 39.0 ms, back 0.5 ms")
                && d.contains("its thread 43 on_cpu 9.0 / runnable 30.0 / blocked 0.0 ms"),
            "{d}"
        );
        let mut main = r.clone();
        main["engine_ns"]["tid"] = json!(42);
        assert!(detail(&main).contains("its main thread on_cpu 9.0"), "{d}");
        let mut two = r.clone();
        two["engine_ns"]["threads"] = serde_json::Value::Null;
        assert!(detail(&two).contains("not split (no one thread"), "{d}");
        assert!(
            d.contains("(first token -> last): engine 120.0 ms, output 60.0 ms")
                && d.contains("own id: 3")
                && d.contains("blocked 179.0"),
            "{d}"
        );
    }
}
