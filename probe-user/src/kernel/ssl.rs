//! Attaching the OpenSSL uprobes (probe-ebpf/src/ssl.rs) to the files `cudalibs::ssl` finds for
//! each traced process: `ssl_enter` and `ssl_return` at every symbol of
//! `probe_common::ssl::SHAPES` the file exports, the call's shape as the cookie.
//!
//! Always scoped to the traced process (a perf event per pid): libssl is mapped by every TLS
//! client and server on a node, and a host-wide uprobe would trap in all of them — a cost on
//! bystanders the socket path was rebuilt to avoid. The price is the one `--cuda-probe-scope
//! process` documents: a child is covered from the housekeeping tick after its fork, and a
//! process that `exec`s loses its probes. Links are detached when the process exits.

use std::{
    collections::{HashMap, HashSet},
    num::NonZeroU32,
    path::PathBuf,
};

use aya::{
    programs::{
        uprobe::{UProbeAttachLocation, UProbeAttachPoint, UProbeLinkId, UProbeScope},
        UProbe,
    },
    Ebpf,
};
use probe_common::ssl::SHAPES;

use super::{cuda::entry_points, Kernel};
use crate::cudalibs::{self, CudaLib};

const PROGRAMS: [&str; 2] = ["ssl_enter", "ssl_return"];

pub struct SslProbes {
    /// (device, inode, pid) attached.
    attached: HashSet<(u64, u64, u32)>,
    /// Links per process, detached when it exits.
    links: HashMap<u32, Vec<(&'static str, UProbeLinkId)>>,
}

fn uprobe<'e>(ebpf: &'e mut Ebpf, name: &str) -> Result<&'e mut UProbe, String> {
    ebpf.program_mut(name)
        .ok_or_else(|| format!("program {name} missing from the object"))?
        .try_into()
        .map_err(|e| format!("program {name}: {e}"))
}

impl SslProbes {
    /// Load (not attach) the two programs.
    pub fn load(ebpf: &mut Ebpf) -> Result<Self, String> {
        for name in PROGRAMS {
            uprobe(ebpf, name)?
                .load()
                .map_err(|e| format!("loading {name}: {e}"))?;
        }
        Ok(Self {
            attached: HashSet::new(),
            links: HashMap::new(),
        })
    }
}

/// What attaching one file for one process gave.
#[derive(Debug, Default)]
pub struct SslAttach {
    /// Symbols probed.
    pub symbols: Vec<&'static str>,
    pub errors: Vec<String>,
}

impl Kernel {
    /// Never attach the OpenSSL probes (`--ssl-probes off`).
    pub fn disable_ssl(&mut self) {
        self.ssl = None;
    }

    pub fn ssl_loaded(&self) -> bool {
        self.ssl.is_some()
    }

    /// Find and attach `pid`'s OpenSSL files (`full`: mapped, executable and predicted; else only
    /// what it maps now). Returns the files newly probed for it, as it sees them.
    pub fn attach_ssl_for(&mut self, pid: u32, full: bool) -> Vec<PathBuf> {
        if self.ssl.is_none() {
            return Vec::new();
        }
        let libs = if full {
            cudalibs::ssl::find_ssl_libs(pid)
        } else {
            cudalibs::ssl::mapped_ssl_libs(pid)
        };
        let mut new = Vec::new();
        for lib in &libs {
            let Some(fa) = self.attach_ssl_lib(lib, pid) else {
                continue;
            };
            for e in &fa.errors {
                log::warn!("TLS: {}: {e}", lib.shown.display());
            }
            if !fa.symbols.is_empty() {
                log::info!(
                    "TLS: {} probed in {} for pid {pid} ({:?})",
                    fa.symbols.join(", "),
                    lib.shown.display(),
                    lib.how
                );
                new.push(lib.shown.clone());
            }
        }
        new
    }

    /// Whether any OpenSSL file is probed for `pid`.
    pub fn ssl_covers(&self, pid: u32) -> bool {
        self.ssl
            .as_ref()
            .is_some_and(|s| s.links.get(&pid).is_some_and(|l| !l.is_empty()))
    }

    /// Attach the symbols `lib` exports for `pid`; `None` when it was tried before.
    fn attach_ssl_lib(&mut self, lib: &CudaLib, pid: u32) -> Option<SslAttach> {
        let ssl = self.ssl.as_mut()?;
        let scope = UProbeScope::OneProcess(NonZeroU32::new(pid)?);
        if !ssl.attached.insert((lib.dev, lib.ino, pid)) {
            return None;
        }
        let wanted: Vec<&'static str> = SHAPES.iter().map(|(n, _)| *n).collect();
        let mut out = SslAttach::default();
        let entries = match entry_points(&lib.file, &lib.path, &wanted) {
            Ok(e) => e,
            Err(e) => {
                out.errors.push(format!("{e:#}"));
                return Some(out);
            }
        };
        let attach_path = PathBuf::from(format!(
            "/proc/self/fd/{}",
            std::os::fd::AsRawFd::as_raw_fd(&*lib.file)
        ));
        for (name, shape) in SHAPES {
            // An executable without OpenSSL (the usual case) exports none: nothing to say.
            let Some(ep) = entries.iter().find(|e| e.name == name) else {
                continue;
            };
            if let Some(why) = ep.unprobeable {
                out.errors.push(format!("{name} cannot be probed: {why}"));
                continue;
            }
            let mut ok = true;
            for prog_name in PROGRAMS {
                let result = uprobe(&mut self.ebpf, prog_name).and_then(|prog| {
                    prog.attach(
                        UProbeAttachPoint {
                            location: UProbeAttachLocation::AbsoluteOffset(ep.offset),
                            cookie: Some(u64::from(shape)),
                        },
                        &attach_path,
                        scope,
                    )
                    .map_err(|e| format!("{prog_name}: {e}"))
                });
                match result {
                    Ok(link) => {
                        let ssl = self.ssl.as_mut().expect("checked above");
                        ssl.links.entry(pid).or_default().push((prog_name, link));
                    }
                    Err(e) => {
                        out.errors.push(format!("{name}: {e}"));
                        ok = false;
                    }
                }
            }
            if ok {
                out.symbols.push(name);
            }
        }
        Some(out)
    }

    /// Detach process `pid`'s OpenSSL probes (it exited). Returns how many links were removed.
    pub fn detach_ssl_for(&mut self, pid: u32) -> usize {
        let Some(ssl) = self.ssl.as_mut() else {
            return 0;
        };
        ssl.attached.retain(|&(_, _, p)| p != pid);
        let links = ssl.links.remove(&pid).unwrap_or_default();
        let n = links.len();
        for (prog_name, link) in links {
            if let Ok(prog) = uprobe(&mut self.ebpf, prog_name) {
                if let Err(e) = prog.detach(link) {
                    log::debug!("detaching {prog_name} of pid {pid}: {e}");
                }
            }
        }
        n
    }
}
