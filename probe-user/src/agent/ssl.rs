//! OpenSSL probe housekeeping, once a second: attach for traced processes not looked at yet
//! (children forked since), detach for the ones that exited, and every other second attach
//! `libssl` files a target mapped since (a lazy `import ssl` from a path not predicted), for the
//! targets whose executable mappings changed (`maps_watch.rs`).

use super::targets::Targets;
use crate::kernel::Kernel;

/// Attach `pid`'s OpenSSL files (mapped, executable, predicted) and note the result.
pub(super) fn attach(kernel: &mut Kernel, targets: &mut Targets, pid: u32) {
    kernel.attach_ssl_for(pid, true);
    let covered = kernel.ssl_covers(pid);
    if !covered {
        log::info!(
            "pid {pid}: no OpenSSL library mapped or predicted; its TLS connections (if any) \
             cannot be read"
        );
    }
    targets.set_ssl(pid, true, covered);
}

/// One housekeeping tick; `rescan`: the targets whose maps are read this tick.
pub(super) fn tick(kernel: &mut Kernel, targets: &mut Targets, rescan: &[u32]) {
    if !kernel.ssl_loaded() {
        return;
    }
    for pid in targets.dead_with_ssl() {
        let n = kernel.detach_ssl_for(pid);
        log::debug!("pid {pid} is gone: {n} TLS probe links detached");
        targets.set_ssl(pid, false, false);
    }
    for pid in targets.without_ssl() {
        attach(kernel, targets, pid);
    }
    for &pid in rescan {
        let new = kernel.attach_ssl_for(pid, false);
        if !new.is_empty() {
            log::warn!(
                "pid {pid} loaded {new:?}, which was not predicted at attach: TLS traffic \
                 before now was not read"
            );
            targets.set_ssl(pid, true, true);
        }
    }
}
