//! VMM state of a process: reserved VA ranges (`cuMemAddressReserve`/`cuMemAddressFree`), the
//! mappings of physical handles inside them (`cuMemMap`/`cuMemUnmap`), fragmentation and the KV
//! pool. Reserved VA is not memory; the handles' bytes are counted with the allocations.
use std::collections::BTreeMap;

use probe_common::cuda::api;

use super::{warn_once, Applied, Proc, MAX_VMM_PER_PID};

#[derive(Clone, Copy)]
pub(super) struct Mapping {
    pub(super) len: u64,
}

/// A reserved VA range and the mappings inside it (disjoint, by start address).
pub(super) struct Reservation {
    pub(super) len: u64,
    pub(super) created_ns: u64,
    pub(super) mapped: u64,
    pub(super) maps: BTreeMap<u64, Mapping>,
}

impl Reservation {
    pub(super) fn new(len: u64, created_ns: u64) -> Self {
        Self {
            len,
            created_ns,
            mapped: 0,
            maps: BTreeMap::new(),
        }
    }

    /// Removes the mappings overlapping `[a, e)` (CUDA unmaps whole mappings only); returns how
    /// many. Mappings are disjoint, so the last one starting before `e` either overlaps or ends
    /// at or before `a`, as do all earlier ones.
    pub(super) fn remove_overlapping(&mut self, a: u64, e: u64) -> usize {
        let mut n = 0;
        while let Some(k) = self
            .maps
            .range(..e)
            .next_back()
            .filter(|(&s, m)| s.saturating_add(m.len) > a)
            .map(|(&s, _)| s)
        {
            if let Some(m) = self.maps.remove(&k) {
                self.mapped = self.mapped.saturating_sub(m.len);
            }
            n += 1;
        }
        n
    }

    /// (holes, largest free extent, free bytes) between `start` and `start + len`.
    pub(super) fn gaps(&self, start: u64) -> (u64, u64, u64) {
        let end = start.saturating_add(self.len);
        let (mut holes, mut largest, mut cur) = (0, 0, start);
        for (&s, m) in &self.maps {
            if s > cur {
                holes += 1;
                largest = largest.max(s - cur);
            }
            cur = cur.max(s.saturating_add(m.len));
        }
        if end > cur {
            holes += 1;
            largest = largest.max(end - cur);
        }
        (holes, largest, self.len.saturating_sub(self.mapped))
    }
}

/// `Some(Dropped)` (counted in `dropped`, warned about once) when a process is at its VMM entry cap.
fn at_vmm_cap(entries: usize, dropped: &mut u64, warned: &mut u8, api: u32) -> Option<Applied> {
    if entries < MAX_VMM_PER_PID {
        return None;
    }
    warn_once(
        warned,
        4,
        "VMM reservations and mappings per process at the cap",
    );
    *dropped += 1;
    Some(Applied::Dropped { api })
}

impl Proc {
    pub(super) fn reserve(&mut self, addr: u64, len: u64, ts: u64, warned: &mut u8) -> Applied {
        if addr == 0 || len == 0 {
            return Applied::Ignored;
        }
        // Keep reservations disjoint: one overlapping the new range was freed unseen.
        let end = addr.saturating_add(len);
        while let Some(k) = self
            .reservations
            .range(..end)
            .next_back()
            .filter(|(&s, r)| s.saturating_add(r.len) > addr)
            .map(|(&s, _)| s)
        {
            self.drop_reservation(k);
        }
        let cap = at_vmm_cap(
            self.vmm_entries,
            &mut self.c.dropped,
            warned,
            api::CU_MEM_ADDRESS_RESERVE,
        );
        if let Some(dropped) = cap {
            return dropped;
        }
        self.reservations.insert(addr, Reservation::new(len, ts));
        self.vmm_entries += 1;
        Applied::Vmm
    }

    pub(super) fn drop_reservation(&mut self, addr: u64) {
        if let Some(r) = self.reservations.remove(&addr) {
            self.vmm_entries -= 1 + r.maps.len();
        }
    }

    pub(super) fn map(&mut self, addr: u64, len: u64, warned: &mut u8) -> Applied {
        if len == 0 {
            return Applied::Ignored;
        }
        let (res, len) = match self
            .reservations
            .range_mut(..=addr)
            .next_back()
            .filter(|(&s, r)| addr < s.saturating_add(r.len))
        {
            Some((&s, r)) => {
                let len = len.min(s.saturating_add(r.len) - addr);
                (r, len)
            }
            None => (&mut self.unknown, len),
        };
        // Mapping over mapped VA fails in the driver; one here means an unmap was lost.
        self.vmm_entries -= res.remove_overlapping(addr, addr.saturating_add(len));
        let cap = at_vmm_cap(
            self.vmm_entries,
            &mut self.c.dropped,
            warned,
            api::CU_MEM_MAP,
        );
        if let Some(dropped) = cap {
            return dropped;
        }
        res.maps.insert(addr, Mapping { len });
        res.mapped = res.mapped.saturating_add(len);
        self.vmm_entries += 1;
        Applied::Vmm
    }

    pub(super) fn unmap(&mut self, addr: u64, len: u64) -> Applied {
        let end = addr.saturating_add(len);
        let mut removed = self.unknown.remove_overlapping(addr, end);
        for (&s, r) in self.reservations.range_mut(..end).rev() {
            if s.saturating_add(r.len) <= addr {
                break; // reservations are disjoint: none earlier reaches addr
            }
            removed += r.remove_overlapping(addr, end);
        }
        self.vmm_entries -= removed;
        Applied::Vmm
    }

    pub(super) fn fragmentation_ratio(&self) -> Option<f64> {
        let (mut largest, mut free) = (0, 0);
        for (&a, r) in &self.reservations {
            let (_, l, f) = r.gaps(a);
            largest = largest.max(l);
            free = f.saturating_add(free);
        }
        (free > 0).then(|| 1.0 - largest as f64 / free as f64)
    }

    /// The reservation taken for the KV pool: the largest by mapped bytes among those at least
    /// `min_age` old (lowest address on a tie), if it has mapped bytes.
    pub(super) fn kv_pool(&self, now: u64, min_age: u64) -> Option<(u64, &Reservation)> {
        let mut best: Option<(u64, &Reservation)> = None;
        for (&a, r) in &self.reservations {
            if now.saturating_sub(r.created_ns) >= min_age
                && r.mapped > 0
                && best.is_none_or(|(_, b)| r.mapped > b.mapped)
            {
                best = Some((a, r));
            }
        }
        best
    }
}
