//! CUDA housekeeping, once a second: fold launch counts, tick the ledger; attach the CUDA uprobes
//! for traced processes that have none yet (children forked since) and detach them for the ones
//! that exited; every other second a look at the maps of the targets whose executable mappings
//! changed (`maps_watch.rs`) for CUDA libraries that appeared without being predicted (a dlopen by
//! absolute path, say), which are resolved and attached then.

use std::path::PathBuf;

use rustc_hash::FxHashSet;

use super::{collector::fold_launches, targets::Targets};
use crate::{cuda::state::CudaState, cudalibs, kernel::Kernel};

#[derive(Default)]
pub(super) struct CudaHousekeeping {
    /// (pid, path) of CUDA libraries already seen in /proc/PID/maps.
    seen_maps: FxHashSet<(u32, PathBuf)>,
}

impl CudaHousekeeping {
    /// `rescan`: the targets whose maps are read this tick.
    pub fn tick(
        &mut self,
        kernel: &mut Kernel,
        cuda: &mut CudaState,
        targets: &mut Targets,
        rescan: &[u32],
        now_ns: u64,
    ) {
        fold_launches(kernel, cuda);
        cuda.tick(now_ns);
        if !kernel.cuda_loaded() {
            return;
        }
        for pid in targets.dead_with_cuda() {
            let n = kernel.detach_cuda_for(pid);
            log::debug!("pid {pid} is gone: {n} CUDA probe links detached");
            self.seen_maps.retain(|(p, _)| *p != pid);
            targets.set_cuda(pid, false);
        }
        for pid in targets.without_cuda() {
            kernel.attach_cuda_for(pid);
            targets.set_cuda(pid, true);
        }
        let alive = targets.alive();
        for &pid in &alive {
            cuda.gauge_if_nvml_sees(pid);
        }
        for &pid in rescan {
            self.rescan(kernel, pid);
        }
        cuda.metrics.libraries.set(kernel.cuda_files() as i64);
    }

    /// Attach CUDA libraries `pid` mapped since the last look that were not predicted.
    fn rescan(&mut self, kernel: &mut Kernel, pid: u32) {
        let mapped = cudalibs::mapped_cuda(pid);
        kernel.refresh_cudart_text(pid, &mapped.runtime_text);
        let new: Vec<PathBuf> = mapped
            .paths
            .into_iter()
            .filter(|p| !self.seen_maps.contains(&(pid, p.clone())))
            .collect();
        if new.is_empty() {
            return;
        }
        let attached = kernel.attach_cuda_for(pid);
        if !attached.is_empty() {
            log::warn!(
                "pid {pid} loaded {attached:?}, which was not predicted at attach: calls made \
                 through it before now were not seen"
            );
        }
        for p in new {
            self.seen_maps.insert((pid, p));
        }
    }
}
