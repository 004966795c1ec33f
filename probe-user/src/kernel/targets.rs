//! The traced processes in the kernel: `TARGETS` (tgid → 1), and the `TGID_SLOTS` filter in front
//! of it (`probe_common::target_slot`). Every program runs for every task on the machine and tests
//! the filter first, so an untraced process's event leaves at an array read rather than a hash
//! lookup (docs/design.md, *In the kernel*).
//!
//! A slot is set before its process enters `TARGETS` (here, and by the kernel on fork), so the
//! filter never hides a traced process. Slots are cleared only here, when no process in `TARGETS`
//! maps to them any more (`sync`, each housekeeping tick). One race is left: a process forked in
//! the kernel between the read of `TARGETS` and the clear of its slot, by a parent other than
//! the one that exited, whose tgid shares that slot (`TARGET_SLOTS` apart). Its slot is set again
//! at the next tick, and its events in between (at most a second, from its birth) are not seen.

use aya::maps::{Array, HashMap, MapData};
use probe_common::target_slot;
use rustc_hash::FxHashSet;

use super::LoadError;

pub(super) struct TargetMaps {
    targets: HashMap<MapData, u32, u32>,
    slots: Array<MapData, u32>,
    /// The slots set to 1 in `slots`, as this side last wrote or found them.
    set: FxHashSet<u32>,
}

impl TargetMaps {
    pub(super) fn new(targets: HashMap<MapData, u32, u32>, slots: Array<MapData, u32>) -> Self {
        TargetMaps {
            targets,
            slots,
            set: FxHashSet::default(),
        }
    }

    pub(super) fn add(&mut self, tgid: u32) -> Result<(), LoadError> {
        self.mark(target_slot(tgid))?;
        self.targets
            .insert(tgid, 1, 0)
            .map_err(|e| LoadError::Map("TARGETS", e))
    }

    pub(super) fn remove(&mut self, tgid: u32) {
        let _ = self.targets.remove(&tgid);
    }

    /// Make the filter match `TARGETS`: set the slots of processes the kernel added on fork (it
    /// set them too; this records them), clear those no traced process maps to.
    pub(super) fn sync(&mut self) {
        // A key that could not be read would look like a process that left: change nothing.
        let tgids = match self.targets.keys().collect::<Result<Vec<u32>, _>>() {
            Ok(t) => t,
            Err(e) => {
                log::warn!("reading TARGETS: {e}; the process filter is left as it is");
                return;
            }
        };
        let (set, clear) = plan(&self.set, &tgids);
        for slot in set {
            if let Err(e) = self.mark(slot) {
                log::warn!("{e}");
            }
        }
        for slot in clear {
            if self.slots.set(slot, 0, 0).is_ok() {
                self.set.remove(&slot);
            }
        }
    }

    fn mark(&mut self, slot: u32) -> Result<(), LoadError> {
        self.slots
            .set(slot, 1, 0)
            .map_err(|e| LoadError::Map("TGID_SLOTS", e))?;
        self.set.insert(slot);
        Ok(())
    }
}

/// The slots to set (those of `tgids` not in `set`) and to clear (those in `set` that none of
/// `tgids` maps to), each in ascending order.
fn plan(set: &FxHashSet<u32>, tgids: &[u32]) -> (Vec<u32>, Vec<u32>) {
    let wanted: FxHashSet<u32> = tgids.iter().map(|&t| target_slot(t)).collect();
    let mut add: Vec<u32> = wanted.difference(set).copied().collect();
    let mut clear: Vec<u32> = set.difference(&wanted).copied().collect();
    add.sort_unstable();
    clear.sort_unstable();
    (add, clear)
}

#[cfg(test)]
mod tests {
    use probe_common::TARGET_SLOTS;

    use super::*;

    #[test]
    fn a_slot_stays_set_while_any_traced_process_maps_to_it() {
        let set: FxHashSet<u32> = [5, 9].into_iter().collect();
        // 9 + TARGET_SLOTS shares slot 9 with the process that exited; 7 was forked in the kernel.
        let (add, clear) = plan(&set, &[5, 9 + TARGET_SLOTS, 7]);
        assert_eq!(add, vec![7]);
        assert!(clear.is_empty());
        let (add, clear) = plan(&set, &[5]);
        assert!(add.is_empty());
        assert_eq!(clear, vec![9]);
        let (add, clear) = plan(&set, &[]);
        assert!(add.is_empty());
        assert_eq!(clear, vec![5, 9]);
    }
}
