//! Which targets' /proc/PID/maps are worth reading again. Every other second the CUDA and OpenSSL
//! housekeeping look for libraries a target mapped since the last look (a `dlopen` not predicted
//! at attach). Reading maps makes the kernel render every mapping of the target (a torch process
//! has thousands) under the target's mm locks: under vLLM those reads were ≈ 18 % of the agent's
//! CPU samples. A library brings executable mappings, so the look first compares the target's
//! executable mapped size (`VmExe` + `VmLib` of /proc/PID/status, a few counters read without
//! walking the mappings) with the last one; maps are read only when it changed, when the target
//! is new here, or when [`BACKSTOP_LOOKS`] looks went by without a read (a library mapped while
//! another of the same size went away leaves the sum as it was).

use rustc_hash::FxHashMap;

use crate::discover;

/// Looks (every other second) after which maps are read whatever the size says: ≈ 1 minute.
pub(super) const BACKSTOP_LOOKS: u32 = 30;

#[derive(Default)]
pub(super) struct MapsWatch {
    /// pid → (executable mapped KiB at the last read, looks since that read).
    last: FxHashMap<u32, (Option<u64>, u32)>,
}

impl MapsWatch {
    /// Of `pids` (the live targets), those whose maps should be read now.
    pub fn due(&mut self, pids: &[u32]) -> Vec<u32> {
        self.due_by(pids, discover::exec_mapped_kib)
    }

    /// [`Self::due`] with the size read by `size` (a unreadable size: `None`, always due).
    fn due_by(&mut self, pids: &[u32], size: impl Fn(u32) -> Option<u64>) -> Vec<u32> {
        self.last.retain(|pid, _| pids.contains(pid));
        let mut out = Vec::new();
        for &pid in pids {
            let now = size(pid);
            let due = match self.last.get_mut(&pid) {
                Some((before, looks)) if now.is_some() && *before == now => {
                    *looks += 1;
                    *looks >= BACKSTOP_LOOKS
                }
                _ => true,
            };
            if due {
                self.last.insert(pid, (now, 0));
                out.push(pid);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use super::*;

    #[test]
    fn maps_are_read_when_new_changed_unreadable_or_after_the_backstop() {
        let mut w = MapsWatch::default();
        let size = Cell::new(Some(1000));
        let by = |w: &mut MapsWatch, pids: &[u32]| w.due_by(pids, |_| size.get());
        assert_eq!(by(&mut w, &[7]), vec![7], "a new target is read");
        assert!(by(&mut w, &[7]).is_empty(), "nothing changed");
        size.set(Some(1400));
        assert_eq!(by(&mut w, &[7]), vec![7], "a library was mapped");
        assert!(by(&mut w, &[7]).is_empty());
        for _ in 0..BACKSTOP_LOOKS - 2 {
            assert!(by(&mut w, &[7]).is_empty());
        }
        assert_eq!(by(&mut w, &[7]), vec![7], "the backstop");
        assert!(by(&mut w, &[7]).is_empty());
        size.set(None);
        assert_eq!(
            by(&mut w, &[7]),
            vec![7],
            "an unreadable size is read every time"
        );
        assert_eq!(by(&mut w, &[7]), vec![7]);
        // A target that left is forgotten, and read as new if its pid comes back.
        size.set(Some(1000));
        assert_eq!(by(&mut w, &[7, 8]), vec![7, 8]);
        assert!(by(&mut w, &[8]).is_empty());
        assert_eq!(by(&mut w, &[7, 8]), vec![7]);
    }
}
