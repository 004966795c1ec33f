//! The probe's own health, `llm_probe_*`: programs attached, records delivered and lost, capture
//! gaps, targets, connections, build info. The kernel's per-CPU counters are not copied into
//! families: `KernelCollector` reads them at scrape time through a `CounterSource` (as
//! `ebpf_exporter` reads its maps), so a scrape shows the kernel's numbers of that moment.

use std::{
    fmt,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric as _},
    metrics::{counter::ConstCounter, counter::Counter, family::Family, gauge::Gauge, MetricType},
    registry::Registry,
};

use super::{BuildLabels, ProgramLabels, ReasonLabels};

/// Every `reason` of `llm_probe_events_lost_total`, all exported so absent means zero, not unknown.
pub const LOST_REASONS: [&str; 4] = ["ringbuf_full", "map_full", "unknown_kind", "malformed"];

/// The kernel's counters, summed over CPUs (`probe_common::counter::*`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelCounters {
    /// Records the programs produced: delivered + lost.
    pub seen: u64,
    pub lost_ringbuf_full: u64,
    pub lost_map_full: u64,
    pub read_user_failed: u64,
    pub truncated: u64,
    pub iov_skipped: u64,
    pub thread_repairs: u64,
}

impl KernelCounters {
    /// Records lost in the kernel (never reached the agent).
    pub const fn lost(&self) -> u64 {
        self.lost_ringbuf_full + self.lost_map_full
    }
}

/// Where `KernelCollector` reads the kernel's counters (the agent implements it over the maps).
pub trait CounterSource: Send + Sync + 'static {
    fn read(&self) -> KernelCounters;
    /// Runs the kernel skipped, per attached program (`kernel::misses`).
    fn misses(&self) -> Vec<(&'static str, u64)> {
        Vec::new()
    }
}

/// Records that reached the agent but could not be decoded, by reason; shared between the ingest
/// loop (which counts) and the collector (which exports them with the kernel's losses).
#[derive(Debug, Default)]
pub struct DecodeLosses {
    pub unknown_kind: AtomicU64,
    pub malformed: AtomicU64,
}

impl DecodeLosses {
    /// Count one record lost for `reason` (`record::DecodeError::reason`).
    pub fn count(&self, reason: &str) {
        let c = match reason {
            "unknown_kind" => &self.unknown_kind,
            _ => &self.malformed,
        };
        c.fetch_add(1, Ordering::Relaxed);
    }
}

/// Families kept in the registry. Cheap to clone.
#[derive(Clone)]
pub struct ProbeMetrics {
    pub attached: Family<ProgramLabels, Gauge>,
    /// Records delivered to the agent (`llm_probe_events_total`).
    pub events: Counter,
    pub decode_losses: Arc<DecodeLosses>,
    pub targets: Gauge,
    pub connections: Gauge,
    pub build_info: Family<BuildLabels, Gauge>,
    /// TLS connections seen (`llm_probe_tls_connections_total`).
    pub tls_connections: Counter,
    /// TLS plaintext tied to no connection, by direction (`llm_probe_tls_unmatched_total`).
    pub tls_unmatched: Family<DirectionLabels, Counter>,
}

/// `direction` of `llm_probe_tls_unmatched_total`: `read` or `write`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct DirectionLabels {
    pub direction: &'static str,
}

impl ProbeMetrics {
    pub fn new(registry: &mut Registry) -> Self {
        let m = Self {
            attached: Family::default(),
            events: Counter::default(),
            decode_losses: Arc::default(),
            targets: Gauge::default(),
            connections: Gauge::default(),
            build_info: Family::default(),
            tls_connections: Counter::default(),
            tls_unmatched: Family::default(),
        };
        registry.register(
            "llm_probe_tls_connections",
            "Connections whose bytes are TLS records (their plaintext is read from OpenSSL)",
            m.tls_connections.clone(),
        );
        registry.register(
            "llm_probe_tls_unmatched",
            "TLS plaintext (SSL_read/SSL_write) that could be tied to no connection, dropped",
            m.tls_unmatched.clone(),
        );
        for direction in ["read", "write"] {
            let _ = m
                .tls_unmatched
                .get_or_create(&DirectionLabels { direction });
        }
        registry.register(
            "llm_probe_attached",
            "1 when the named kernel program is attached",
            m.attached.clone(),
        );
        registry.register(
            "llm_probe_events",
            "Kernel records delivered to the agent",
            m.events.clone(),
        );
        registry.register(
            "llm_probe_targets",
            "Processes traced now",
            m.targets.clone(),
        );
        registry.register(
            "llm_probe_connections",
            "Server-side connections with parser state",
            m.connections.clone(),
        );
        registry.register(
            "llm_probe_build_info",
            "Build information (value 1)",
            m.build_info.clone(),
        );
        m.build_info
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION"),
                aya: "0.14",
            })
            .set(1);
        m
    }

    /// Register the scrape-time collector of the kernel's counters.
    pub fn collect_kernel(&self, registry: &mut Registry, source: Box<dyn CounterSource>) {
        registry.register_collector(Box::new(KernelCollector {
            source,
            decode: self.decode_losses.clone(),
        }));
    }
}

/// `llm_probe_cpu_seconds_total` with the agent's CPU time so far (read by the agent's collector).
pub fn encode_cpu(mut enc: DescriptorEncoder, seconds: f64) -> fmt::Result {
    let c = ConstCounter::new(seconds);
    c.encode(enc.encode_descriptor(
        "llm_probe_cpu_seconds",
        "CPU time (user + system) the agent itself used; per record: its rate over \
         rate(llm_probe_events_total)",
        None,
        c.metric_type(),
    )?)
}

/// `llm_probe_events_seen_total`, `llm_probe_events_lost_total{reason}` and
/// `llm_probe_capture_incomplete_total{reason}`, read from the kernel at each scrape.
pub struct KernelCollector {
    source: Box<dyn CounterSource>,
    decode: Arc<DecodeLosses>,
}

impl fmt::Debug for KernelCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KernelCollector").finish_non_exhaustive()
    }
}

/// One counter family with a `reason` label.
fn reasons(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    values: &[(&'static str, u64)],
) -> fmt::Result {
    let mut family = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
    for &(reason, v) in values {
        ConstCounter::new(v).encode(family.encode_family(&ReasonLabels { reason })?)?;
    }
    Ok(())
}

impl Collector for KernelCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        let k = self.source.read();
        let seen = ConstCounter::new(k.seen);
        seen.encode(enc.encode_descriptor(
            "llm_probe_events_seen",
            "Kernel records produced (delivered + lost)",
            None,
            seen.metric_type(),
        )?)?;
        let lost = [
            ("ringbuf_full", k.lost_ringbuf_full),
            ("map_full", k.lost_map_full),
            (
                "unknown_kind",
                self.decode.unknown_kind.load(Ordering::Relaxed),
            ),
            ("malformed", self.decode.malformed.load(Ordering::Relaxed)),
        ];
        debug_assert!(lost.iter().map(|l| l.0).eq(LOST_REASONS));
        reasons(
            &mut enc,
            "llm_probe_events_lost",
            "Kernel records lost, by reason",
            &lost,
        )?;
        let mut family = enc.encode_descriptor(
            "llm_probe_program_misses",
            "Runs of a kernel program the kernel skipped because it would have nested in another \
             BPF program's run on that CPU: records or thread-state changes missing",
            None,
            MetricType::Counter,
        )?;
        for (program, v) in self.source.misses() {
            ConstCounter::new(v).encode(family.encode_family(&ProgramLabels { program })?)?;
        }
        let repairs = ConstCounter::new(k.thread_repairs);
        repairs.encode(enc.encode_descriptor(
            "llm_probe_thread_state_repairs",
            "Times a running traced thread's state entry said runnable or blocked (a scheduler \
             event was not seen); repaired then: dated from the task's own last switch-in where \
             the kernel's BTF allows, otherwise the time since its last change stays where it was",
            None,
            repairs.metric_type(),
        )?)?;
        reasons(
            &mut enc,
            "llm_probe_capture_incomplete",
            "Delivered records whose payload is incomplete: truncated at 4 KiB, iovecs past the \
             walked limit, or user memory that could not be read",
            &[
                ("truncated", k.truncated),
                ("iov_skipped", k.iov_skipped),
                ("read_user_failed", k.read_user_failed),
            ],
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixed(KernelCounters);
    impl CounterSource for Fixed {
        fn read(&self) -> KernelCounters {
            self.0
        }
        fn misses(&self) -> Vec<(&'static str, u64)> {
            vec![("sched_switch", 0), ("sock_recv_data", 7)]
        }
    }

    #[derive(Debug)]
    struct Cpu;
    impl Collector for Cpu {
        fn encode(&self, enc: DescriptorEncoder) -> fmt::Result {
            encode_cpu(enc, 1.25)
        }
    }

    #[test]
    fn the_agents_cpu_is_a_counter_in_seconds() {
        let mut r = Registry::default();
        r.register_collector(Box::new(Cpu));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &r).unwrap();
        assert!(
            text.contains("# TYPE llm_probe_cpu_seconds counter"),
            "{text}"
        );
        assert!(text.contains("llm_probe_cpu_seconds_total 1.25"), "{text}");
    }

    /// The collector exports what the source says at scrape time, under the families' names.
    #[test]
    fn kernel_counters_are_read_at_scrape_time() {
        let mut r = Registry::default();
        let m = ProbeMetrics::new(&mut r);
        m.collect_kernel(
            &mut r,
            Box::new(Fixed(KernelCounters {
                seen: 10,
                lost_ringbuf_full: 3,
                lost_map_full: 1,
                read_user_failed: 2,
                truncated: 5,
                iov_skipped: 4,
                thread_repairs: 6,
            })),
        );
        m.decode_losses.count("malformed");
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &r).unwrap();
        for line in [
            "llm_probe_events_seen_total 10",
            "llm_probe_events_lost_total{reason=\"ringbuf_full\"} 3",
            "llm_probe_events_lost_total{reason=\"map_full\"} 1",
            "llm_probe_events_lost_total{reason=\"unknown_kind\"} 0",
            "llm_probe_events_lost_total{reason=\"malformed\"} 1",
            "llm_probe_capture_incomplete_total{reason=\"truncated\"} 5",
            "llm_probe_capture_incomplete_total{reason=\"iov_skipped\"} 4",
            "llm_probe_capture_incomplete_total{reason=\"read_user_failed\"} 2",
            "llm_probe_program_misses_total{program=\"sched_switch\"} 0",
            "llm_probe_program_misses_total{program=\"sock_recv_data\"} 7",
            "llm_probe_thread_state_repairs_total 6",
        ] {
            assert!(out.lines().any(|l| l == line), "{line} missing from\n{out}");
        }
    }
}
