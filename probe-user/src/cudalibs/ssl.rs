//! The same resolver, for OpenSSL: the files whose `SSL_read`/`SSL_write` a traced process runs.
//!
//! - `libssl.so*` mapped now (Python's `_ssl` links `libssl.so.3` or `.so.1.1` dynamically);
//! - the executable itself, when it exports `SSL_read` (Node links OpenSSL statically and exports
//!   its API; the symbol test is left to the attach, which reads the symbol table anyway);
//! - predicted: the `libssl.so.3` / `libssl.so.1.1` the target root's `/etc/ld.so.cache` names,
//!   for a process that imports `ssl` after the probe attached (a uprobe on the file fires in a
//!   later mapping of it).
//!
//! Paths are resolved and opened under the target's root exactly as for CUDA (`open_in_root`):
//! one open per file, used for its identity, its symbols and the uprobe.

use std::path::{Path, PathBuf};

use super::{
    read_exe, read_ld_so_cache_matching, read_maps, resolve_in_root, under_root, CudaLib, Found,
    LibKind, Source,
};

/// The sonames a loader resolves for `import ssl` / Node's `tls` when OpenSSL is shared.
const SONAMES: [&str; 2] = ["libssl.so.3", "libssl.so.1.1"];

/// `libssl.so`, `libssl.so.3`, `libssl.so.1.1`, … — not `libssl3.so` (NSS) nor `libssl_*`.
pub fn is_libssl(name: &[u8]) -> bool {
    name == b"libssl.so" || name.starts_with(b"libssl.so.")
}

/// The OpenSSL files of process `pid`: mapped, its executable, predicted; deduplicated.
pub fn find_ssl_libs(pid: u32) -> Vec<CudaLib> {
    let proc_dir = PathBuf::from(format!("/proc/{pid}"));
    find_ssl_libs_in(&proc_dir.join("root"), &proc_dir, true)
}

/// Only what `pid` maps now (the periodic rescan: a process that loaded `libssl` from a path the
/// prediction did not cover).
pub fn mapped_ssl_libs(pid: u32) -> Vec<CudaLib> {
    let proc_dir = PathBuf::from(format!("/proc/{pid}"));
    find_ssl_libs_in(&proc_dir.join("root"), &proc_dir, false)
}

/// [`find_ssl_libs`] with the root and proc directories given; `predict` adds the executable and
/// the ld.so.cache entries.
pub fn find_ssl_libs_in(root: &Path, proc_dir: &Path, predict: bool) -> Vec<CudaLib> {
    let mut found = Found::new(root);
    let maps = read_maps(proc_dir);
    let mut seen = std::collections::HashSet::new();
    for m in &maps {
        let is_ssl = m
            .path
            .file_name()
            .is_some_and(|n| is_libssl(std::os::unix::ffi::OsStrExt::as_bytes(n)));
        if !is_ssl || !seen.insert(m.path.as_path()) {
            continue;
        }
        let host = match resolve_in_root(root, &m.path) {
            Ok(inside) => under_root(root, &inside),
            Err(e) => {
                log::debug!("{}: {e}; trying map_files", m.path.display());
                proc_dir.join("map_files").join(&m.range)
            }
        };
        found.add(LibKind::Ssl, host, m.path.clone(), Source::Mapped, false);
    }
    if !predict {
        return found.libs;
    }
    if let Some(exe) = read_exe(root, proc_dir) {
        found.add(LibKind::Ssl, exe.host, exe.shown, Source::Mapped, true);
    }
    for (_, path) in read_ld_so_cache_matching(root, |soname| SONAMES.contains(&soname)) {
        found.add_inside(root, LibKind::Ssl, Path::new(&path), Source::LdSoCache);
    }
    found.libs
}
