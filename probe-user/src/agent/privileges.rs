//! What the agent gives up once it is attached (docs/security.md): it keeps the capabilities it
//! needs for the rest of its life and drops every other one, from its effective, permitted,
//! inheritable and bounding sets.
//!
//! Kept: `CAP_BPF` (programs and maps), `CAP_PERFMON` (perf events for tracepoints and uprobes,
//! needed again for every new child and re-attach), `CAP_SYS_PTRACE` and `CAP_DAC_READ_SEARCH`
//! (targets' `/proc` files and their roots). Dropped: everything else — `CAP_SYS_ADMIN` (used
//! once, before this, to mount tracefs), `CAP_NET_*`, `CAP_SETUID`, `CAP_SYS_MODULE`, …

/// Capability numbers (include/uapi/linux/capability.h).
const CAP_DAC_READ_SEARCH: u32 = 2;
const CAP_SETPCAP: u32 = 8;
const CAP_SYS_PTRACE: u32 = 19;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;
/// Capabilities the agent keeps.
pub const KEPT: [u32; 4] = [CAP_DAC_READ_SEARCH, CAP_SYS_PTRACE, CAP_PERFMON, CAP_BPF];
/// `_LINUX_CAPABILITY_VERSION_3`: two 32-bit words per set.
const CAPABILITY_VERSION_3: u32 = 0x2008_0522;
/// Highest capability number any kernel defines today is 40; the bounding-set loop stops at the
/// first the kernel rejects.
const LAST_CAP_BOUND: u32 = 63;

#[repr(C)]
struct Header {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct Data {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// The kept set as the kernel's two 32-bit words.
fn kept_mask() -> [u32; 2] {
    let mut mask = [0u32; 2];
    for cap in KEPT {
        mask[(cap / 32) as usize] |= 1 << (cap % 32);
    }
    mask
}

/// Drop every capability but `KEPT`. Returns false when the kernel refused (the agent then keeps
/// running with what it had, and says so).
pub fn drop_unneeded() -> bool {
    let mut header = Header {
        version: CAPABILITY_VERSION_3,
        pid: 0,
    };
    let mut data = [Data::default(); 2];
    // SAFETY: a valid header and two data words, as capget(2) wants for version 3.
    if unsafe { libc::syscall(libc::SYS_capget, &raw mut header, data.as_mut_ptr()) } != 0 {
        log::warn!("capget failed: {}", std::io::Error::last_os_error());
        return false;
    }
    let has_setpcap = data[0].effective & (1 << CAP_SETPCAP) != 0;
    if has_setpcap {
        // The bounding set first: dropping from it needs CAP_SETPCAP, which goes next.
        for cap in 0..=LAST_CAP_BOUND {
            if KEPT.contains(&cap) {
                continue;
            }
            // SAFETY: plain prctl; EINVAL past the kernel's last capability ends the loop.
            if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, libc::c_ulong::from(cap), 0, 0, 0) } != 0
                && std::io::Error::last_os_error().raw_os_error() == Some(libc::EINVAL)
            {
                break;
            }
        }
    }
    let mask = kept_mask();
    for (d, m) in data.iter_mut().zip(mask) {
        d.effective &= m;
        d.permitted &= m;
        d.inheritable = 0;
    }
    // SAFETY: the same header and two data words, now reduced.
    if unsafe { libc::syscall(libc::SYS_capset, &raw mut header, data.as_ptr()) } != 0 {
        log::warn!(
            "dropping capabilities failed ({}); running with the ones it started with",
            std::io::Error::last_os_error()
        );
        return false;
    }
    log::info!(
        "capabilities reduced to CAP_BPF, CAP_PERFMON, CAP_SYS_PTRACE, CAP_DAC_READ_SEARCH \
         (of those it had)"
    );
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The mask is the kernel's `CapEff` layout: bits 2, 19, 38 and 39.
    #[test]
    fn kept_mask_in_kernel_words() {
        let m = kept_mask();
        let both = u64::from(m[0]) | (u64::from(m[1]) << 32);
        assert_eq!(both, 0x0000_00c0_0008_0004);
    }
}
