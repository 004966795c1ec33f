//! The ledger's per-process report (`llm-probe memleak`, text and `--json`).
use std::fmt::Write as _;

use probe_common::cuda::api;
use serde::{Deserialize, Serialize};

use super::{Ledger, Proc, SITE_NONE, SITE_OVERFLOW};

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LeakReport {
    pub pid: u32,
    pub live_bytes: u64,
    pub live_allocations: u64,
    pub leak_suspect_bytes: u64,
    /// Age from which an allocation at a growing call site is a leak suspect.
    pub leak_age_s: f64,
    /// Only allocations at least this old are in `sites`.
    pub older_than_s: f64,
    /// Growth and churn window.
    pub window_s: f64,
    /// Live allocations at least `older_than_s` old, by call site, most bytes first.
    pub sites: Vec<SiteReport>,
    pub fragmentation: Fragmentation,
    /// Live plain allocations (not VMM handles) by power-of-two size class, ascending.
    pub size_classes: Vec<SizeClass>,
    pub churn: Churn,
    pub failed_calls: u64,
    pub double_frees: u64,
    pub unknown_frees: u64,
    /// Allocations, reservations and mappings not recorded because a per-process cap was hit.
    pub dropped: u64,
    /// What NVML says the process uses on all GPUs (the agent fills this in; `None` without NVML).
    #[serde(default)]
    pub nvml_used_bytes: Option<u64>,
    /// NVML's figure minus the ledger's: memory allocated before the probe attached, the CUDA
    /// context itself, and anything allocated by calls the probe does not see.
    #[serde(default)]
    pub unattributed_bytes: Option<u64>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SiteReport {
    /// Symbolized call stack, innermost (the CUDA call's caller) first; empty without a stack.
    pub frames: Vec<String>,
    pub bytes: u64,
    pub count: u64,
    pub oldest_age_s: f64,
    /// Change of the site's outstanding bytes (all ages) over the window.
    pub growth_bytes: i64,
    /// APIs of the reported allocations (`probe_common::cuda::api::NAMES`).
    pub apis: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Fragmentation {
    /// `Ledger::fragmentation_ratio`.
    pub ratio: Option<f64>,
    /// By address.
    pub reservations: Vec<ReservationReport>,
    /// Mappings outside any known reservation (reserved before the probe attached).
    pub unknown_mappings: u64,
    pub unknown_mapped_bytes: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ReservationReport {
    /// Start address, `0x…`.
    pub addr: String,
    pub reserved_bytes: u64,
    pub mapped_bytes: u64,
    /// Maximal unmapped gaps inside the reservation.
    pub holes: u64,
    pub largest_free_extent: u64,
    pub age_s: f64,
    /// The reservation `Ledger::kv_pool_bytes` reads.
    pub kv_pool: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SizeClass {
    /// `1MiB-2MiB` = [1 MiB, 2 MiB); `0B` for zero-byte allocations.
    pub label: String,
    pub count: u64,
    pub bytes: u64,
}

/// Allocation and free calls over the window (since the first record when no sample is that old).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Churn {
    pub window_s: f64,
    pub allocs: u64,
    pub frees: u64,
    pub allocs_per_s: f64,
    pub frees_per_s: f64,
}

#[derive(Clone, Copy)]
struct Agg {
    bytes: u64,
    count: u64,
    oldest_ns: u64,
    apis: u64,
}

fn secs(ns: u64) -> f64 {
    ns as f64 / 1e9
}

impl Ledger {
    /// The report of one process (all zeros for one the ledger has no state for). `sites` holds
    /// the `top` call sites by bytes of live allocations at least `older_than_ns` old.
    pub fn report(
        &self,
        pid: u32,
        now_ns: u64,
        older_than_ns: u64,
        top: usize,
        sym: &mut dyn Symbolize,
    ) -> LeakReport {
        let mut r = LeakReport {
            pid,
            older_than_s: secs(older_than_ns),
            leak_age_s: secs(self.cfg.leak_age_ns),
            window_s: secs(self.cfg.window_ns),
            ..LeakReport::default()
        };
        let Some(p) = self.procs.get(&pid) else {
            return r;
        };
        r.live_bytes = p.live_bytes;
        r.live_allocations = (p.allocs.len() + p.handles.len()) as u64;
        r.leak_suspect_bytes = self.leak_suspect_bytes(pid, now_ns);
        r.failed_calls = p.c.failed_calls;
        r.double_frees = p.c.double_frees;
        r.unknown_frees = p.c.unknown_frees;
        r.dropped = p.c.dropped;
        r.sites = site_reports(p, now_ns, older_than_ns, top, pid, sym);
        r.fragmentation = fragmentation(p, now_ns, self);
        r.size_classes = (0..p.class_count.len())
            .filter(|&c| p.class_count[c] > 0)
            .map(|c| SizeClass {
                label: class_label(c),
                count: p.class_count[c],
                bytes: p.class_bytes[c],
            })
            .collect();
        let (t0, a0, f0) = p
            .samples
            .front()
            .map_or((p.first_ns, 0, 0), |s| (s.ts_ns, s.allocs, s.frees));
        let span = secs(now_ns.saturating_sub(t0));
        let rate = |n: u64| if span > 0.0 { n as f64 / span } else { 0.0 };
        r.churn = Churn {
            window_s: span,
            allocs: p.c.allocs - a0,
            frees: p.c.frees - f0,
            allocs_per_s: rate(p.c.allocs - a0),
            frees_per_s: rate(p.c.frees - f0),
        };
        r
    }
}

fn site_reports(
    p: &Proc,
    now: u64,
    older_than: u64,
    top: usize,
    pid: u32,
    sym: &mut dyn Symbolize,
) -> Vec<SiteReport> {
    let mut aggs: Vec<Option<Agg>> = vec![None; p.sites.len()];
    for l in p.lives() {
        if now.saturating_sub(l.ts_ns) < older_than {
            continue;
        }
        let a = aggs[l.site as usize].get_or_insert(Agg {
            bytes: 0,
            count: 0,
            oldest_ns: l.ts_ns,
            apis: 0,
        });
        a.bytes += l.bytes;
        a.count += 1;
        a.oldest_ns = a.oldest_ns.min(l.ts_ns);
        a.apis |= 1 << l.api;
    }
    let mut ids: Vec<(usize, Agg)> = aggs
        .into_iter()
        .enumerate()
        .filter_map(|(i, a)| a.map(|a| (i, a)))
        .collect();
    ids.sort_by(|(i, a), (j, b)| {
        b.bytes
            .cmp(&a.bytes)
            .then(b.count.cmp(&a.count))
            .then(i.cmp(j))
    });
    ids.truncate(top);
    ids.into_iter()
        .map(|(i, a)| {
            let site = &p.sites[i];
            let frames = match i as u32 {
                SITE_NONE => Vec::new(),
                SITE_OVERFLOW => vec!["[call sites over limit]".to_string()],
                _ => sym.symbolize(pid, &site.stack),
            };
            SiteReport {
                frames,
                bytes: a.bytes,
                count: a.count,
                oldest_age_s: secs(now.saturating_sub(a.oldest_ns)),
                growth_bytes: p.growth(site),
                apis: (0..api::COUNT)
                    .filter(|&b| a.apis & (1 << b) != 0)
                    .map(|b| api::NAMES[b as usize].to_string())
                    .collect(),
            }
        })
        .collect()
}

fn fragmentation(p: &Proc, now: u64, ledger: &Ledger) -> Fragmentation {
    let kv = p
        .kv_pool(now, ledger.cfg.kv_pool_min_age_ns)
        .map(|(a, _)| a);
    Fragmentation {
        ratio: p.fragmentation_ratio(),
        reservations: p
            .reservations
            .iter()
            .map(|(&a, r)| {
                let (holes, largest, _) = r.gaps(a);
                ReservationReport {
                    addr: format!("{a:#x}"),
                    reserved_bytes: r.len,
                    mapped_bytes: r.mapped,
                    holes,
                    largest_free_extent: largest,
                    age_s: secs(now.saturating_sub(r.created_ns)),
                    kv_pool: kv == Some(a),
                }
            })
            .collect(),
        unknown_mappings: p.unknown.maps.len() as u64,
        unknown_mapped_bytes: p.unknown.mapped,
    }
}

/// `B`, `KiB`, … label of 2^e.
fn pow2_label(e: usize) -> String {
    const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    format!("{}{}", 1u64 << (e % 10), UNITS[e / 10])
}

/// Class 0 holds 0-byte allocations, class k + 1 holds [2^k, 2^(k+1)).
pub(crate) fn class_label(c: usize) -> String {
    if c == 0 {
        "0B".to_string()
    } else {
        format!("{}-{}", pow2_label(c - 1), pow2_label(c))
    }
}

/// `512 B`, `1.5 KiB`, `2.0 MiB`, `1.23 GiB`.
pub fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if b < 1024 {
        return format!("{b} B");
    }
    let mut v = b as f64 / 1024.0;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    // Two decimals from GiB below 10: GPU memory totals differ in the second digit.
    if u >= 2 && v < 10.0 {
        format!("{v:.2} {}", UNITS[u])
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

fn signed_bytes(b: i64) -> String {
    let sign = if b < 0 { '-' } else { '+' };
    format!("{sign}{}", human_bytes(b.unsigned_abs()))
}

/// `1,234,567`.
fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::with_capacity(s.len() + s.len() / 3);
    for (i, ch) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

/// The report as text, memleak style: a summary line, one block per call site, then VMM
/// reservations, size classes and churn.
pub fn render_text(r: &LeakReport) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "pid {}: {} live in {} allocations; leak suspects {} (at least {:.0} s old, at call sites \
         that grew over {:.0} s)",
        r.pid,
        human_bytes(r.live_bytes),
        thousands(r.live_allocations),
        human_bytes(r.leak_suspect_bytes),
        r.leak_age_s,
        r.window_s,
    );
    if let (Some(n), Some(u)) = (r.nvml_used_bytes, r.unattributed_bytes) {
        let _ = writeln!(
            o,
            "NVML: {} used by the process; {} unattributed (allocated before attach, the CUDA \
             context, or through calls the probe does not see)",
            human_bytes(n),
            human_bytes(u),
        );
    }
    let _ = writeln!(
        o,
        "\nOutstanding allocations at least {:.0} s old, by call site:",
        r.older_than_s
    );
    if r.sites.is_empty() {
        o.push_str("    (none)\n");
    }
    for s in &r.sites {
        let _ = writeln!(
            o,
            "\n{} bytes in {} allocation{}, oldest {:.0} s, {} over {:.0} s [{}]",
            thousands(s.bytes),
            thousands(s.count),
            if s.count == 1 { "" } else { "s" },
            s.oldest_age_s,
            signed_bytes(s.growth_bytes),
            r.window_s,
            s.apis.join(", "),
        );
        if s.frames.is_empty() {
            o.push_str("        (no stack)\n");
        }
        for f in &s.frames {
            let _ = writeln!(o, "        {f}");
        }
    }
    let fr = &r.fragmentation;
    let ratio = fr.ratio.map_or("n/a".to_string(), |x| format!("{x:.3}"));
    let _ = writeln!(
        o,
        "\nVMM reservations: {}, fragmentation {ratio}",
        fr.reservations.len()
    );
    for v in &fr.reservations {
        let _ = writeln!(
            o,
            "    {}  reserved {}, mapped {}, {} holes, largest free {}, age {:.0} s{}",
            v.addr,
            human_bytes(v.reserved_bytes),
            human_bytes(v.mapped_bytes),
            v.holes,
            human_bytes(v.largest_free_extent),
            v.age_s,
            if v.kv_pool { "  [KV pool]" } else { "" },
        );
    }
    if fr.unknown_mappings > 0 {
        let _ = writeln!(
            o,
            "    outside known reservations: {} mappings, {}",
            fr.unknown_mappings,
            human_bytes(fr.unknown_mapped_bytes)
        );
    }
    o.push_str("\nLive allocations by size:\n");
    for c in &r.size_classes {
        let _ = writeln!(
            o,
            "    {:>14}  {:>9}  {}",
            c.label,
            thousands(c.count),
            human_bytes(c.bytes)
        );
    }
    let ch = &r.churn;
    let _ = writeln!(
        o,
        "\nChurn over {:.0} s: {} allocs ({:.1}/s), {} frees ({:.1}/s)",
        ch.window_s,
        thousands(ch.allocs),
        ch.allocs_per_s,
        thousands(ch.frees),
        ch.frees_per_s,
    );
    let _ = writeln!(
        o,
        "Failed calls {}, double frees {}, unknown frees {}, dropped {}",
        r.failed_calls, r.double_frees, r.unknown_frees, r.dropped
    );
    o
}

/// Turns the addresses of a call stack into printable frames.
pub trait Symbolize {
    /// One string per address, in the order given. The addresses are return addresses (what a
    /// stack walk yields), so implementations look up `addr - 1`, the call instruction, and report
    /// the offset of the return address itself. Never fails: an address that cannot be named is
    /// printed in hex.
    fn symbolize(&mut self, pid: u32, addrs: &[u64]) -> Vec<String>;

    /// `pid` exited: forget what was cached for it (its addresses may name other code later).
    fn forget(&mut self, pid: u32) {
        let _ = pid;
    }
}

/// Hex addresses only (tests, and `--no-symbols`).
#[derive(Clone, Copy, Debug, Default)]
pub struct NoSymbols;

impl Symbolize for NoSymbols {
    fn symbolize(&mut self, _pid: u32, addrs: &[u64]) -> Vec<String> {
        addrs.iter().map(|a| format!("{a:#x}")).collect()
    }
}
