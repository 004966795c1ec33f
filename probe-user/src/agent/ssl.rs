//! OpenSSL probe housekeeping, once a second: attach for traced processes not looked at yet
//! (children forked since), detach for the ones that exited, and every other second attach
//! `libssl` files a target mapped since (a lazy `import ssl` from a path not predicted).

use super::targets::Targets;
use crate::kernel::Kernel;

#[derive(Default)]
pub(super) struct SslHousekeeping {
    ticks: u64,
}

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

impl SslHousekeeping {
    pub fn tick(&mut self, kernel: &mut Kernel, targets: &mut Targets) {
        if !kernel.ssl_loaded() {
            return;
        }
        self.ticks += 1;
        for pid in targets.dead_with_ssl() {
            let n = kernel.detach_ssl_for(pid);
            log::debug!("pid {pid} is gone: {n} TLS probe links detached");
            targets.set_ssl(pid, false, false);
        }
        for pid in targets.without_ssl() {
            attach(kernel, targets, pid);
        }
        if self.ticks.is_multiple_of(2) {
            for pid in targets.alive() {
                let new = kernel.attach_ssl_for(pid, false);
                if !new.is_empty() {
                    log::warn!(
                        "pid {pid} loaded {new:?}, which was not predicted at attach: TLS \
                         traffic before now was not read"
                    );
                    targets.set_ssl(pid, true, true);
                }
            }
        }
    }
}
