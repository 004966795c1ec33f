//! CUDA ledger ingestion on one core: recorded kernel records (allocations with 12-frame call
//! stacks from 32 call sites, their frees, and sync returns) through decode → `CudaState` (ledger,
//! steps, metric updates), exactly the agent's path for those records. Goal: ≥ 5 M events/s.
//!
//! Run: `cargo bench -p probe-user --bench ledger` (prints events/s; see docs/BENCHMARKS.md).
use std::{hint::black_box, time::Instant};

use probe_common::{cuda::api, CudaMemEvent, CudaSyncEvent, EventHeader, EventKind};
use probe_user::{
    cuda::{
        ledger::{Ledger, LedgerConfig},
        state::CudaState,
    },
    metrics::cuda::CudaMetrics,
    record::{decode, Event},
};
use prometheus_client::registry::Registry;

const LIVE: u64 = 10_000;
const SITES: u64 = 32;

fn bytes_of<T>(v: &T) -> Vec<u8> {
    // SAFETY: probe-common records are repr(C) integers without padding.
    unsafe { std::slice::from_raw_parts(std::ptr::from_ref(v).cast::<u8>(), size_of::<T>()) }
        .to_vec()
}

/// 1 M records: per 10 records 4 allocations and 5 frees of the oldest (allocating instead while
/// fewer than LIVE are live, so about LIVE stay live) and 1
/// sync, as in a caching allocator under churn.
fn recorded() -> Vec<Vec<u8>> {
    let mut out = Vec::with_capacity(1_000_000);
    let mut ts = 1_000_000_000u64;
    let (mut next, mut oldest, mut launches) = (0u64, 0u64, 0u64);
    while out.len() < 1_000_000 {
        ts += 1_000;
        let header = |kind: EventKind| EventHeader {
            kind: kind as u32,
            tgid: 42,
            tid: 43,
            _pad: 0,
            ts_ns: ts,
        };
        if out.len() % 10 == 9 {
            launches += 20;
            out.push(bytes_of(&CudaSyncEvent {
                header: header(EventKind::CudaSync),
                api: api::CUDA_STREAM_SYNCHRONIZE,
                enter_ns: ts - 500,
                kernel_launches: launches,
                step_start_ns: ts - 5_000,
                ..CudaSyncEvent::default()
            }));
        } else if next - oldest < LIVE || out.len() % 10 < 4 {
            let mut e = CudaMemEvent {
                header: header(EventKind::CudaMem),
                api: api::CUDA_MALLOC,
                addr: 0x7f00_0000_0000 + next * 4096,
                size: 4096 * (1 + next % 64),
                enter_ns: ts - 800,
                nframes: 12,
                ..CudaMemEvent::default()
            };
            for (i, f) in e.stack.iter_mut().take(12).enumerate() {
                *f = 0x5555_0000_0000 + (next % SITES) * 0x100 + i as u64 * 0x10_000;
            }
            next += 1;
            out.push(bytes_of(&e));
        } else {
            out.push(bytes_of(&CudaMemEvent {
                header: header(EventKind::CudaMem),
                api: api::CUDA_FREE,
                addr: 0x7f00_0000_0000 + oldest * 4096,
                enter_ns: ts - 300,
                ..CudaMemEvent::default()
            }));
            oldest += 1;
        }
    }
    out
}

fn main() {
    let records = recorded();
    let n = records.len() as f64;
    for round in 0..3 {
        let mut state = CudaState::new(
            CudaMetrics::new(&mut Registry::default()),
            LedgerConfig::default(),
        );
        let t = Instant::now();
        for r in &records {
            match decode(black_box(r)) {
                Ok(Event::CudaMem(e)) => state.on_mem(&e),
                Ok(Event::CudaSync(e)) => state.on_sync(&e, false),
                _ => unreachable!("recorded CUDA records only"),
            }
        }
        let full = t.elapsed().as_secs_f64();
        let mut ledger = Ledger::new(LedgerConfig::default());
        let t = Instant::now();
        for r in &records {
            if let Ok(Event::CudaMem(e)) = decode(black_box(r)) {
                black_box(ledger.apply(&e));
            }
        }
        let apply = t.elapsed().as_secs_f64();
        println!(
            "ledger ingest round {round}: full path {:.2} M events/s ({:.0} ns/event); decode+apply \
             only {:.2} M events/s; live {} B",
            n / full / 1e6,
            full / n * 1e9,
            n / apply / 1e6,
            state.ledger.live_bytes(42),
        );
    }
}
