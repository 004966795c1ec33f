use std::collections::HashMap;

use probe_common::cuda::api::*;
use probe_common::{CudaMemEvent, EventHeader, EventKind};
use proptest::prelude::*;

use super::*;

const PID: u32 = 100;
const S: u64 = 1_000_000_000;
const MIB: u64 = 1 << 20;

/// A successful, non-nested record of `PID` at `ts` seconds.
fn ev(api: u32, addr: u64, size: u64, ts_s: u64) -> CudaMemEvent {
    CudaMemEvent {
        header: EventHeader {
            kind: EventKind::CudaMem as u32,
            tgid: PID,
            tid: PID,
            _pad: 0,
            ts_ns: ts_s * S,
        },
        api,
        addr,
        size,
        ..CudaMemEvent::default()
    }
}

fn at(mut e: CudaMemEvent, stack: &[u64]) -> CudaMemEvent {
    e.stack[..stack.len()].copy_from_slice(stack);
    e.nframes = stack.len() as u32;
    e
}

fn ledger() -> Ledger {
    Ledger::new(LedgerConfig::default())
}

/// Names frames `fn_<hex>` so tests can see that the report went through the symbolizer.
struct FakeSyms;
impl Symbolize for FakeSyms {
    fn symbolize(&mut self, _pid: u32, addrs: &[u64]) -> Vec<String> {
        addrs.iter().map(|a| format!("fn_{a:x}")).collect()
    }
}

#[test]
fn alloc_free_live_bytes() {
    let mut l = ledger();
    assert_eq!(
        l.apply(&ev(CUDA_MALLOC, 0x1000, 100, 1)),
        Applied::Alloc {
            api: CUDA_MALLOC,
            bytes: 100
        }
    );
    l.apply(&ev(CU_MEM_ALLOC, 0x2000, 50, 1));
    l.apply(&ev(CU_MEM_ALLOC_MANAGED, 0x3000, 7, 1));
    l.apply(&ev(CU_MEM_ALLOC_ASYNC_PTSZ, 0x4000, 3, 1));
    assert_eq!(l.live_bytes(PID), 160);
    assert_eq!(l.live_allocations(PID), 4);
    assert_eq!(
        l.apply(&ev(CU_MEM_FREE, 0x1000, 0, 2)),
        Applied::Free {
            api: CU_MEM_FREE,
            bytes: 100
        }
    );
    assert_eq!(l.live_bytes(PID), 60);
    assert_eq!(l.live_bytes(PID + 1), 0);
    assert_eq!(l.pids(), [PID]);
    l.forget(PID);
    assert!(l.pids().is_empty());
    assert_eq!(l.live_bytes(PID), 0);
}

#[test]
fn double_unknown_and_null_frees() {
    let mut l = ledger();
    l.apply(&ev(CUDA_MALLOC, 0x1000, 100, 1));
    l.apply(&ev(CUDA_FREE, 0x1000, 0, 2));
    assert_eq!(
        l.apply(&ev(CUDA_FREE, 0x1000, 0, 3)),
        Applied::DoubleFree { api: CUDA_FREE }
    );
    assert_eq!(
        l.apply(&ev(CU_MEM_FREE_ASYNC, 0x9000, 0, 3)),
        Applied::UnknownFree {
            api: CU_MEM_FREE_ASYNC
        }
    );
    assert_eq!(l.apply(&ev(CUDA_FREE, 0, 0, 3)), Applied::Ignored);
    // Reused address: a free after the new allocation is a plain free again.
    l.apply(&ev(CUDA_MALLOC, 0x1000, 8, 4));
    assert!(matches!(
        l.apply(&ev(CUDA_FREE, 0x1000, 0, 5)),
        Applied::Free { bytes: 8, .. }
    ));
    let c = l.counters(PID).unwrap();
    assert_eq!((c.double_frees, c.unknown_frees), (1, 1));
    assert_eq!(l.live_bytes(PID), 0);
}

#[test]
fn freed_memory_is_bounded() {
    let mut l = ledger();
    for i in 0..(FREED_MEMORY as u64 + 10) {
        l.apply(&ev(CUDA_MALLOC, 0x1000 + i * 0x100, 1, 1));
        l.apply(&ev(CUDA_FREE, 0x1000 + i * 0x100, 0, 1));
    }
    // The oldest free is forgotten: unknown, not double.
    assert!(matches!(
        l.apply(&ev(CUDA_FREE, 0x1000, 0, 2)),
        Applied::UnknownFree { .. }
    ));
    let last = 0x1000 + (FREED_MEMORY as u64 + 9) * 0x100;
    assert!(matches!(
        l.apply(&ev(CUDA_FREE, last, 0, 2)),
        Applied::DoubleFree { .. }
    ));
    assert!(l.procs[&PID].freed.len() <= FREED_MEMORY);
}

#[test]
fn nested_and_failed_change_nothing() {
    let mut l = ledger();
    let mut e = ev(CU_MEM_ALLOC, 0x1000, 100, 1);
    e.nested = 1;
    assert_eq!(l.apply(&e), Applied::Nested { api: CU_MEM_ALLOC });
    assert_eq!(l.live_bytes(PID), 0);
    let mut e = ev(CUDA_MALLOC, 0x1000, 100, 1);
    e.result = 2; // cudaErrorMemoryAllocation
    assert_eq!(l.apply(&e), Applied::Failed { api: CUDA_MALLOC });
    assert_eq!(l.live_bytes(PID), 0);
    assert_eq!(l.counters(PID).unwrap().failed_calls, 1);
    assert_eq!(l.apply(&ev(CU_LAUNCH_KERNEL, 0, 0, 1)), Applied::Ignored);
    assert_eq!(l.apply(&ev(CUDA_MALLOC, 0, 0, 1)), Applied::Ignored);
}

#[test]
fn cuda_free_of_driver_pointer_and_pitch() {
    let mut l = ledger();
    let mut e = ev(CU_MEM_ALLOC_PITCH, 0x2000, 512 * 300, 1);
    (e.aux, e.aux2) = (512, 300);
    l.apply(&e);
    l.apply(&ev(CU_MEM_ALLOC, 0x1000, 4096, 1));
    assert_eq!(l.live_bytes(PID), 512 * 300 + 4096);
    let r = l.report(PID, 2 * S, 0, 10, &mut NoSymbols);
    let labels: Vec<_> = r.size_classes.iter().map(|c| c.label.as_str()).collect();
    assert_eq!(labels, ["4KiB-8KiB", "128KiB-256KiB"]);
    assert_eq!(
        l.apply(&ev(CUDA_FREE, 0x1000, 0, 2)),
        Applied::Free {
            api: CUDA_FREE,
            bytes: 4096
        }
    );
    assert_eq!(l.live_bytes(PID), 512 * 300);
}

#[test]
fn lost_free_is_replaced() {
    let mut l = ledger();
    l.apply(&ev(CUDA_MALLOC, 0x1000, 100, 1));
    l.apply(&ev(CUDA_MALLOC, 0x1000, 30, 2));
    assert_eq!(l.live_bytes(PID), 30);
    assert_eq!(l.live_allocations(PID), 1);
}

/// Reserve 64 MiB, create 4 × 2 MiB, map at 0, 2, 6, 10 MiB, unmap the one at 6 MiB.
fn vmm_scenario(l: &mut Ledger, base: u64, ts: u64) {
    let mut e = ev(CU_MEM_ADDRESS_RESERVE, base, 64 * MIB, ts);
    e.aux = 2 * MIB;
    assert_eq!(l.apply(&e), Applied::Vmm);
    for (i, off) in [0u64, 2, 6, 10].into_iter().enumerate() {
        let h = 0xa0 + i as u64;
        assert!(matches!(
            l.apply(&ev(CU_MEM_CREATE, h, 2 * MIB, ts)),
            Applied::Alloc { .. }
        ));
        let mut m = ev(CU_MEM_MAP, base + off * MIB, 2 * MIB, ts);
        (m.aux, m.aux2) = (0, h);
        assert_eq!(l.apply(&m), Applied::Vmm);
    }
    l.apply(&ev(CU_MEM_UNMAP, base + 6 * MIB, 2 * MIB, ts));
}

#[test]
fn vmm_mapped_holes_and_fragmentation() {
    let mut l = ledger();
    let base = 0x7f00_0000_0000;
    vmm_scenario(&mut l, base, 1);
    // Handles are live memory; reserved VA is not.
    assert_eq!(l.live_bytes(PID), 8 * MIB);
    let r = l.report(PID, 2 * S, 0, 10, &mut NoSymbols);
    let v = &r.fragmentation.reservations[0];
    // Mapped: [0,2) [2,4) [10,12) = 6 MiB. Gaps: [4,10) = 6 MiB and [12,64) = 52 MiB.
    assert_eq!(v.addr, "0x7f0000000000");
    assert_eq!(v.reserved_bytes, 64 * MIB);
    assert_eq!(v.mapped_bytes, 6 * MIB);
    assert_eq!(v.holes, 2);
    assert_eq!(v.largest_free_extent, 52 * MIB);
    let ratio = l.fragmentation_ratio(PID).unwrap();
    assert!((ratio - (1.0 - 52.0 / 58.0)).abs() < 1e-12, "{ratio}");
    assert_eq!(r.fragmentation.ratio, Some(ratio));
    // Release a handle: its bytes leave live bytes. Then free the reservation.
    assert!(matches!(
        l.apply(&ev(CU_MEM_RELEASE, 0xa2, 0, 3)),
        Applied::Free { bytes, .. } if bytes == 2 * MIB
    ));
    assert_eq!(l.live_bytes(PID), 6 * MIB);
    l.apply(&ev(CU_MEM_UNMAP, base, 4 * MIB, 3)); // covers the mappings at 0 and 2 MiB
    assert_eq!(
        l.report(PID, 3 * S, 0, 1, &mut NoSymbols)
            .fragmentation
            .reservations[0]
            .mapped_bytes,
        2 * MIB
    );
    l.apply(&ev(CU_MEM_ADDRESS_FREE, base, 64 * MIB, 4));
    assert_eq!(l.fragmentation_ratio(PID), None);
    assert_eq!(l.procs[&PID].vmm_entries, 0);
}

#[test]
fn mapping_outside_reservations_and_full_map() {
    let mut l = ledger();
    let mut m = ev(CU_MEM_MAP, 0x5000_0000, 2 * MIB, 1);
    m.aux2 = 0xa0;
    l.apply(&m);
    let r = l.report(PID, S, 0, 1, &mut NoSymbols);
    assert_eq!(r.fragmentation.unknown_mappings, 1);
    assert_eq!(r.fragmentation.unknown_mapped_bytes, 2 * MIB);
    assert_eq!(r.fragmentation.ratio, None);
    l.apply(&ev(CU_MEM_UNMAP, 0x5000_0000, 2 * MIB, 2));
    assert_eq!(
        l.report(PID, S, 0, 1, &mut NoSymbols)
            .fragmentation
            .unknown_mappings,
        0
    );
    // A fully mapped reservation has no free bytes: no ratio.
    l.apply(&ev(CU_MEM_ADDRESS_RESERVE, 0x6000_0000, 2 * MIB, 1));
    l.apply(&ev(CU_MEM_MAP, 0x6000_0000, 2 * MIB, 1));
    assert_eq!(l.fragmentation_ratio(PID), None);
}

#[test]
fn kv_pool_needs_min_age() {
    let mut l = ledger();
    vmm_scenario(&mut l, 0x7f00_0000_0000, 1); // 6 MiB mapped at t = 1 s
    assert_eq!(l.kv_pool_bytes(PID, 5 * S), None);
    // A younger reservation with more mapped bytes does not count until it is old enough.
    l.apply(&ev(CU_MEM_ADDRESS_RESERVE, 0x7e00_0000_0000, 32 * MIB, 8));
    l.apply(&ev(CU_MEM_MAP, 0x7e00_0000_0000, 16 * MIB, 8));
    assert_eq!(l.kv_pool_bytes(PID, 11 * S), Some(6 * MIB));
    assert_eq!(l.kv_pool_bytes(PID, 18 * S), Some(16 * MIB));
    let r = l.report(PID, 18 * S, 0, 1, &mut NoSymbols);
    let kv: Vec<_> = r
        .fragmentation
        .reservations
        .iter()
        .filter(|v| v.kv_pool)
        .collect();
    assert_eq!(kv.len(), 1);
    assert_eq!(kv[0].addr, "0x7e0000000000");
    assert_eq!(l.kv_pool_bytes(PID + 1, 18 * S), None);
}

#[test]
fn call_sites_group_allocations() {
    let mut l = ledger();
    let (a, b) = ([0x10, 0x20, 0x30], [0x40, 0x50]);
    for i in 0..3 {
        l.apply(&at(ev(CUDA_MALLOC, 0x1000 + i * 0x100, 10, 1), &a));
    }
    l.apply(&at(ev(CU_MEM_ALLOC, 0x9000, 100, 1), &b));
    l.apply(&at(ev(CU_MEM_CREATE, 0x9000, 1000, 1), &b)); // a handle: another namespace
    l.apply(&ev(CUDA_MALLOC, 0xa000, 5, 1)); // no stack
    assert_eq!(l.procs[&PID].sites.len(), 4); // none, overflow, a, b
    let r = l.report(PID, 2 * S, 0, 10, &mut FakeSyms);
    assert_eq!(r.sites.len(), 3);
    assert_eq!(r.sites[0].frames, ["fn_40", "fn_50"]);
    assert_eq!((r.sites[0].bytes, r.sites[0].count), (1100, 2));
    assert_eq!(r.sites[0].apis, ["cuMemAlloc_v2", "cuMemCreate"]);
    assert_eq!(r.sites[1].frames, ["fn_10", "fn_20", "fn_30"]);
    assert_eq!((r.sites[1].bytes, r.sites[1].count), (30, 3));
    assert_eq!(r.sites[1].apis, ["cudaMalloc"]);
    assert!(r.sites[2].frames.is_empty());
    assert_eq!(r.live_allocations, 6);
}

#[test]
fn leak_suspects_grow_startup_pool_does_not() {
    let cfg = LedgerConfig::default();
    let mut l = Ledger::new(cfg);
    let (pool, leak) = ([0x111], [0x222]);
    // Startup: a 100 MiB pool at t = 0 and the first leaked MiB.
    l.apply(&at(ev(CUDA_MALLOC, 0x1_0000_0000, 100 * MIB, 0), &pool));
    let mut next = 0x2_0000_0000;
    let mut leak_mib = |l: &mut Ledger, t: u64| {
        l.apply(&at(ev(CUDA_MALLOC, next, MIB, t), &leak));
        next += MIB;
    };
    leak_mib(&mut l, 0);
    // Before any tick every site counts as growing; only age filters.
    assert_eq!(l.leak_suspect_bytes(PID, 10 * S), 0);
    assert_eq!(l.leak_suspect_bytes(PID, 31 * S), 101 * MIB);
    for t in 1..=400 {
        if t % 10 == 0 {
            leak_mib(&mut l, t);
        }
        l.tick(t * S);
    }
    // The pool has been flat for a whole window: no longer a suspect. The leak grew 30 MiB over
    // the window; suspects are its allocations at least 30 s old (t ≤ 370: 38 of 41 MiB).
    let now = 400 * S;
    assert_eq!(l.leak_suspect_bytes(PID, now), 38 * MIB);
    let r = l.report(PID, now, 0, 10, &mut NoSymbols);
    assert_eq!(r.leak_suspect_bytes, 38 * MIB);
    let leak_site = r.sites.iter().find(|s| s.frames == ["0x222"]).unwrap();
    let pool_site = r.sites.iter().find(|s| s.frames == ["0x111"]).unwrap();
    assert_eq!(pool_site.growth_bytes, 0);
    // Samples every 300/16 s; the oldest kept one is at most a window old.
    assert!(
        (28 * MIB as i64..=30 * MIB as i64).contains(&leak_site.growth_bytes),
        "{}",
        leak_site.growth_bytes
    );
    assert!(r.churn.allocs > 0 && r.churn.frees == 0);
    assert!(
        r.churn.window_s <= 300.0 && r.churn.window_s > 280.0,
        "{:?}",
        r.churn
    );
    // Samples are bounded whatever the tick rate.
    let p = &l.procs[&PID];
    assert!(p.samples.len() <= SAMPLES_PER_WINDOW as usize + 1);
    assert!(p.sites.iter().all(|s| s.samples.len() <= p.samples.len()));
}

#[test]
fn report_orders_truncates_and_filters_by_age() {
    let mut l = ledger();
    l.apply(&at(ev(CUDA_MALLOC, 0x1000, 10, 0), &[0x1]));
    l.apply(&at(ev(CUDA_MALLOC, 0x2000, 300, 0), &[0x2]));
    l.apply(&at(ev(CUDA_MALLOC, 0x3000, 200, 0), &[0x3]));
    l.apply(&at(ev(CUDA_MALLOC, 0x4000, 1000, 95), &[0x4])); // young
    l.apply(&at(ev(CUDA_MALLOC, 0x5000, 50, 50), &[0x2]));
    let r = l.report(PID, 100 * S, 10 * S, 2, &mut NoSymbols);
    let frames: Vec<_> = r.sites.iter().map(|s| s.frames[0].as_str()).collect();
    assert_eq!(frames, ["0x2", "0x3"]);
    assert_eq!((r.sites[0].bytes, r.sites[0].count), (350, 2));
    assert_eq!(r.sites[0].oldest_age_s, 100.0);
    assert_eq!(r.older_than_s, 10.0);
    assert_eq!(r.live_bytes, 1560);
    let all = l.report(PID, 100 * S, 0, 100, &mut NoSymbols);
    assert_eq!(all.sites[0].frames, ["0x4"]);
    assert_eq!(all.sites.len(), 4);
    // No state: an empty report.
    let none = l.report(7, 100 * S, 0, 100, &mut NoSymbols);
    assert_eq!((none.pid, none.live_bytes, none.sites.len()), (7, 0, 0));
}

#[test]
fn render_text_and_json() {
    let mut l = ledger();
    l.apply(&at(ev(CUDA_MALLOC, 0x1000, 1_234_567, 0), &[0xabc, 0xdef]));
    vmm_scenario(&mut l, 0x7f00_0000_0000, 0);
    l.apply(&ev(CUDA_FREE, 0x9999, 0, 1));
    let r = l.report(PID, 45 * S, 0, 10, &mut FakeSyms);
    let text = render_text(&r);
    assert!(
        text.contains(
            "1,234,567 bytes in 1 allocation, oldest 45 s, +1.2 MiB over 300 s [cudaMalloc]"
        ),
        "{text}"
    );
    assert!(text.contains("        fn_abc\n        fn_def\n"), "{text}");
    assert!(
        text.contains("reserved 64.0 MiB, mapped 6.0 MiB, 2 holes, largest free 52.0 MiB"),
        "{text}"
    );
    assert!(text.contains("[KV pool]"), "{text}");
    assert!(text.contains("1MiB-2MiB"), "{text}");
    assert!(text.contains("unknown frees 1"), "{text}");
    assert!(
        text.contains("leak suspects 9.2 MiB (at least 30 s old"),
        "{text}"
    );
    let j = serde_json::to_value(&r).unwrap();
    assert_eq!(j["live_bytes"], 1_234_567 + 8 * MIB);
    // The handles (no stack, 8 MiB) come first.
    assert_eq!(j["sites"][1]["frames"][0], "fn_abc");
    assert_eq!(j["fragmentation"]["reservations"][0]["holes"], 2);
    assert_eq!(j["size_classes"][0]["label"], "1MiB-2MiB");
}

#[test]
fn humane_units() {
    assert_eq!(report::human_bytes(512), "512 B");
    assert_eq!(report::human_bytes(1536), "1.5 KiB");
    assert_eq!(report::human_bytes(2 * MIB), "2.0 MiB");
    assert_eq!(report::human_bytes(3 << 30), "3.00 GiB");
    assert_eq!(report::human_bytes(80 << 30), "80.0 GiB");
    assert_eq!(report::human_bytes(u64::MAX), "16.0 EiB");
    assert_eq!(report::class_label(0), "0B");
    assert_eq!(report::class_label(size_class(1)), "1B-2B");
    assert_eq!(report::class_label(size_class(3 * MIB)), "2MiB-4MiB");
    assert_eq!(report::class_label(size_class(u64::MAX)), "8EiB-16EiB");
}

#[test]
fn caps_bound_state() {
    let mut l = ledger();
    // Call sites: past the cap, new stacks share the overflow site.
    for i in 0..MAX_SITES_PER_PID as u64 + 5 {
        l.apply(&at(ev(CUDA_MALLOC, 0x1000 + i * 16, 1, 1), &[i + 1]));
    }
    assert_eq!(l.procs[&PID].sites.len(), MAX_SITES_PER_PID);
    let r = l.report(PID, 2 * S, 0, 1, &mut NoSymbols);
    assert_eq!(r.sites[0].frames, ["[call sites over limit]"]);
    // Sites 0 and 1 are reserved (no stack, overflow), so 7 stacks did not fit.
    assert_eq!(r.sites[0].count, 7);
    // Live allocations: past the cap, new ones are dropped and counted.
    let have = l.live_allocations(PID);
    let mut dropped = 0;
    for i in have..MAX_LIVE_PER_PID as u64 + 3 {
        if matches!(
            l.apply(&ev(CU_MEM_ALLOC, 0x10_0000_0000 + i * 16, 1, 1)),
            Applied::Dropped { .. }
        ) {
            dropped += 1;
        }
    }
    assert_eq!(dropped, 3);
    assert_eq!(l.live_allocations(PID), MAX_LIVE_PER_PID as u64);
    assert_eq!(l.counters(PID).unwrap().dropped, 3);
    // Replacing a live address at the cap is still allowed.
    assert!(matches!(
        l.apply(&ev(CU_MEM_ALLOC, 0x1000, 2, 1)),
        Applied::Alloc { .. }
    ));
}

#[test]
fn vmm_cap_bounds_mappings() {
    let mut l = ledger();
    l.apply(&ev(CU_MEM_ADDRESS_RESERVE, 0x1_0000_0000, 1 << 40, 1));
    let mut dropped = 0;
    for i in 0..MAX_VMM_PER_PID as u64 + 2 {
        if l.apply(&ev(CU_MEM_MAP, 0x1_0000_0000 + i * 4096, 4096, 1)) != Applied::Vmm {
            dropped += 1;
        }
    }
    assert_eq!(dropped, 3); // the reservation takes one entry
    assert_eq!(l.procs[&PID].vmm_entries, MAX_VMM_PER_PID);
}

#[derive(Clone, Debug)]
enum Op {
    Alloc {
        api: u32,
        slot: u8,
        size: u64,
        stack: u8,
    },
    Free {
        api: u32,
        slot: u8,
    },
    Create {
        slot: u8,
        size: u64,
    },
    Release {
        slot: u8,
    },
    Reserve {
        slot: u8,
        size: u64,
    },
    AddrFree {
        slot: u8,
    },
    Map {
        slot: u8,
        off: u64,
        size: u64,
    },
    Unmap {
        slot: u8,
        off: u64,
        size: u64,
    },
    Tick,
}

fn op() -> impl Strategy<Value = Op> {
    let alloc_api = prop::sample::select(vec![
        CU_MEM_ALLOC,
        CU_MEM_ALLOC_PITCH,
        CU_MEM_ALLOC_MANAGED,
        CU_MEM_ALLOC_ASYNC,
        CU_MEM_ALLOC_FROM_POOL_ASYNC_PTSZ,
        CUDA_MALLOC,
        CUDA_MALLOC_ASYNC,
    ]);
    let free_api = prop::sample::select(vec![
        CU_MEM_FREE,
        CU_MEM_FREE_ASYNC,
        CUDA_FREE,
        CUDA_FREE_ASYNC,
    ]);
    prop_oneof![
        4 => (alloc_api, 0u8..16, 0u64..1 << 30, 0u8..4)
            .prop_map(|(api, slot, size, stack)| Op::Alloc { api, slot, size, stack }),
        4 => (free_api, 0u8..17).prop_map(|(api, slot)| Op::Free { api, slot }),
        1 => (0u8..8, 0u64..1 << 24).prop_map(|(slot, size)| Op::Create { slot, size }),
        1 => (0u8..9).prop_map(|slot| Op::Release { slot }),
        1 => (0u8..4, 0u64..100).prop_map(|(slot, size)| Op::Reserve { slot, size }),
        1 => (0u8..4).prop_map(|slot| Op::AddrFree { slot }),
        2 => (0u8..5, 0u64..80, 0u64..8).prop_map(|(slot, off, size)| Op::Map { slot, off, size }),
        1 => (0u8..5, 0u64..80, 0u64..80).prop_map(|(slot, off, size)| Op::Unmap { slot, off, size }),
        1 => Just(Op::Tick),
    ]
}

proptest! {
    #[test]
    fn random_sequences_match_model(ops in prop::collection::vec((op(), any::<bool>(), any::<bool>()), 0..300)) {
        let mut l = ledger();
        let mut plain: HashMap<u64, u64> = HashMap::new();
        let mut handles: HashMap<u64, u64> = HashMap::new();
        // Slot 16 of frees / 8 of releases is address 0 (null).
        let ptr = |s: u8| if s == 16 { 0 } else { 0x1000 + u64::from(s) * 0x100 };
        let handle = |s: u8| if s == 8 { 0 } else { 0xa0 + u64::from(s) };
        let res = |s: u8| 0x7f00_0000_0000 + u64::from(s) * (64 * MIB);
        for (t, (op, failed, nested)) in ops.into_iter().enumerate() {
            let t = t as u64;
            let mut e = match op {
                Op::Alloc { api, slot, size, stack } => {
                    at(ev(api, ptr(slot), size, t), &[0x10, u64::from(stack)][..usize::from(stack % 3)])
                }
                Op::Free { api, slot } => ev(api, ptr(slot), 0, t),
                Op::Create { slot, size } => ev(CU_MEM_CREATE, handle(slot), size, t),
                Op::Release { slot } => ev(CU_MEM_RELEASE, handle(slot), 0, t),
                Op::Reserve { slot, size } => ev(CU_MEM_ADDRESS_RESERVE, res(slot), size * MIB, t),
                Op::AddrFree { slot } => ev(CU_MEM_ADDRESS_FREE, res(slot), 0, t),
                Op::Map { slot, off, size } => ev(CU_MEM_MAP, res(slot) + off * MIB, size * MIB, t),
                Op::Unmap { slot, off, size } => ev(CU_MEM_UNMAP, res(slot) + off * MIB, size * MIB, t),
                Op::Tick => {
                    l.tick(t * S);
                    continue;
                }
            };
            e.result = i32::from(failed);
            e.nested = u32::from(nested);
            l.apply(&e);
            if failed || nested || e.addr == 0 {
                continue;
            }
            match op {
                Op::Alloc { .. } if e.size > 0 => _ = plain.insert(e.addr, e.size),
                Op::Free { .. } => _ = plain.remove(&e.addr),
                Op::Create { .. } if e.size > 0 => _ = handles.insert(e.addr, e.size),
                Op::Release { .. } => _ = handles.remove(&e.addr),
                _ => {}
            }
        }
        let want: u64 = plain.values().sum::<u64>() + handles.values().sum::<u64>();
        prop_assert_eq!(l.live_bytes(PID), want);
        prop_assert_eq!(l.live_allocations(PID), (plain.len() + handles.len()) as u64);
        let now = 1000 * S;
        prop_assert!(l.leak_suspect_bytes(PID, now) <= want);
        if let Some(r) = l.fragmentation_ratio(PID) {
            prop_assert!((0.0..1.0).contains(&r), "{}", r);
        }
        let r = l.report(PID, now, 0, 100, &mut NoSymbols);
        prop_assert_eq!(r.sites.iter().map(|s| s.bytes).sum::<u64>(), want);
        let classes: u64 = r.size_classes.iter().map(|c| c.bytes).sum();
        prop_assert_eq!(classes, plain.values().sum::<u64>());
        if let Some(p) = l.procs.get(&PID) {
            let entries: usize = p.reservations.values().map(|r| 1 + r.maps.len()).sum::<usize>() + p.unknown.maps.len();
            prop_assert_eq!(p.vmm_entries, entries);
            for (&a, v) in &p.reservations {
                prop_assert_eq!(v.mapped, v.maps.values().map(|m| m.len).sum::<u64>());
                prop_assert!(v.maps.iter().all(|(&s, m)| s >= a && s + m.len <= a + v.len));
                prop_assert!(v.mapped <= v.len);
            }
        }
    }
}

/// The driver rejects a double or unknown free with an error: still a double / unknown free, not a
/// plain failure; a rejected free of a live pointer is a failure and the pointer stays live.
#[test]
fn rejected_frees_are_told_apart() {
    let mut l = ledger();
    l.apply(&ev(CU_MEM_ALLOC, 0x1000, 4096, 1));
    l.apply(&ev(CU_MEM_ALLOC, 0x2000, 4096, 1));
    assert!(matches!(
        l.apply(&ev(CU_MEM_FREE, 0x1000, 0, 2)),
        Applied::Free { bytes: 4096, .. }
    ));
    let rejected = |api, addr| {
        let mut e = ev(api, addr, 0, 3);
        e.result = 1; // CUDA_ERROR_INVALID_VALUE
        e
    };
    assert!(matches!(
        l.apply(&rejected(CU_MEM_FREE, 0x1000)),
        Applied::DoubleFree { .. }
    ));
    assert!(matches!(
        l.apply(&rejected(CUDA_FREE, 0xdead_0000)),
        Applied::UnknownFree { .. }
    ));
    assert!(matches!(
        l.apply(&rejected(CU_MEM_FREE, 0x2000)),
        Applied::Failed { .. }
    ));
    assert_eq!(l.live_bytes(PID), 4096);
    let c = l.counters(PID).unwrap();
    assert_eq!(
        (c.double_frees, c.unknown_frees, c.failed_calls, c.frees),
        (1, 1, 1, 1)
    );
}

/// A traced process may report any size: totals saturate instead of wrapping (or panicking).
#[test]
fn hostile_sizes_saturate() {
    let mut l = ledger();
    l.apply(&ev(CU_MEM_ALLOC, 0x1000, u64::MAX, 1));
    l.apply(&ev(CU_MEM_ALLOC, 0x2000, u64::MAX, 1));
    assert_eq!(l.live_bytes(PID), u64::MAX);
    l.apply(&ev(CU_MEM_FREE, 0x1000, 0, 2));
    l.apply(&ev(CU_MEM_FREE, 0x2000, 0, 2));
    assert_eq!(l.live_bytes(PID), 0);
    // A mapping as large as the address space, inside a reservation that claims it all.
    l.apply(&ev(CU_MEM_ADDRESS_RESERVE, 0x10_0000, u64::MAX, 3));
    l.apply(&ev(CU_MEM_MAP, 0x10_0000, u64::MAX, 3));
    l.apply(&ev(CU_MEM_MAP, 0x20_0000, u64::MAX, 3));
    let _ = l.fragmentation_ratio(PID);
}
