//! Names for the call sites of device allocations: user-space return addresses of a traced process
//! → `func+0x12 (file:line)`, `func+0x12 [libfoo.so]`, `0x7f… [libfoo.so]` or `0x…`.
//!
//! Implements the ledger's `Symbolize` (`crate::cuda::ledger`, where `NoSymbols` gives hex only)
//! with blazesym, which reads the target's `/proc/<pid>/maps` and the mapped ELF/DWARF.

use std::ffi::OsStr;
use std::fmt::Write as _;
use std::panic::{self, AssertUnwindSafe};
use std::path::Path;

use blazesym::symbolize::source::{Process, Source};
use blazesym::symbolize::{Input, Sym, Symbolized, Symbolizer};
use rustc_hash::FxHashMap;

use crate::cuda::ledger::Symbolize;

/// Names cached per (pid, address). A report names at most `top` sites × 16 frames, and call sites
/// repeat between reports, so this covers many reports; past it the cache starts over.
const CACHE_MAX: usize = 64 * 1024;

/// blazesym's process symbolizer with a per-(pid, address) cache.
pub struct BlazeSymbolizer {
    inner: Symbolizer,
    cache: FxHashMap<(u32, u64), String>,
    /// Open the target's files through `/proc/<pid>/map_files/` (works across mount namespaces
    /// but needs `CAP_SYS_ADMIN`/`CAP_CHECKPOINT_RESTORE`); turned off for good once a lookup
    /// fails with it and succeeds through the paths named in `/proc/<pid>/maps`.
    map_files: bool,
}

// SAFETY: `Symbolizer` is `!Send` only because it holds `Rc`s (ELF/DWARF resolvers, mmaps) and
// boxed dispatch callbacks. The `Rc`s are created and cloned only inside the `Symbolizer` and never
// handed out: its results borrow from it, and `resolve` turns them into owned `String`s before
// returning, so no clone outlives a `&mut self` call and all of them move together with `self`.
// No dispatch callback is installed (`build` sets none). The agent keeps this in a
// `Mutex<CudaState>`, so it is also never used from two threads at once.
unsafe impl Send for BlazeSymbolizer {}

impl Default for BlazeSymbolizer {
    fn default() -> Self {
        Self::new()
    }
}

impl BlazeSymbolizer {
    pub fn new() -> Self {
        Self {
            inner: Self::build(),
            cache: FxHashMap::default(),
            map_files: true,
        }
    }

    fn build() -> Symbolizer {
        // One name per frame: the outer function. Inlined frames would need several lines each.
        Symbolizer::builder().enable_inlined_fns(false).build()
    }

    /// Drops the cached names of an exited process (its pid may be reused).
    pub fn forget(&mut self, pid: u32) {
        self.cache.retain(|&(p, _), _| p != pid);
    }

    /// Names for `lookups` (already `addr - 1`), `None` where blazesym has none.
    fn resolve(&mut self, pid: u32, lookups: &[u64]) -> Vec<Option<String>> {
        let mut names = self.resolve_with(pid, lookups, true);
        // DWARF that does not cover a function (seen with gcc -O1 -g: main resolved, two exported
        // functions beside it did not) hides the ELF symbol too; ask the symbol tables alone.
        let missing: Vec<usize> = (0..names.len()).filter(|&i| names[i].is_none()).collect();
        if !missing.is_empty() {
            let again: Vec<u64> = missing.iter().map(|&i| lookups[i]).collect();
            for (i, n) in missing
                .into_iter()
                .zip(self.resolve_with(pid, &again, false))
            {
                names[i] = n;
            }
        }
        names
    }

    fn resolve_with(&mut self, pid: u32, lookups: &[u64], debug_syms: bool) -> Vec<Option<String>> {
        let tries: &[bool] = if self.map_files {
            &[true, false]
        } else {
            &[false]
        };
        for &map_files in tries {
            let mut process = Process::new(pid.into());
            process.map_files = map_files;
            process.debug_syms = debug_syms;
            let src = Source::Process(process);
            // blazesym parses ELF/DWARF of files we do not control; a bug there must not take the
            // agent down, so a panic is turned into "no names" and the symbolizer rebuilt.
            let inner = &self.inner;
            let result = panic::catch_unwind(AssertUnwindSafe(|| {
                inner
                    .symbolize(&src, Input::AbsAddr(lookups))
                    .map(|syms| syms.iter().map(format_symbolized).collect::<Vec<_>>())
            }));
            match result {
                Ok(Ok(names)) => {
                    if !map_files && self.map_files {
                        log::info!(
                            "symbolizing through /proc/<pid>/maps paths: map_files is not readable"
                        );
                        self.map_files = false;
                    }
                    return names;
                }
                Ok(Err(e)) => log::debug!("symbolizing pid {pid} (map_files {map_files}): {e}"),
                Err(_) => {
                    log::warn!("blazesym panicked symbolizing pid {pid}; addresses left in hex");
                    self.inner = Self::build();
                    break;
                }
            }
        }
        vec![None; lookups.len()]
    }
}

impl Symbolize for BlazeSymbolizer {
    fn forget(&mut self, pid: u32) {
        BlazeSymbolizer::forget(self, pid);
    }

    fn symbolize(&mut self, pid: u32, addrs: &[u64]) -> Vec<String> {
        let mut out: Vec<Option<String>> = addrs
            .iter()
            .map(|&a| self.cache.get(&(pid, a)).cloned())
            .collect();
        // blazesym reads pid 0 as "this process"; 0 is no address.
        let todo: Vec<usize> = (0..addrs.len())
            .filter(|&i| out[i].is_none() && pid != 0 && addrs[i] != 0)
            .collect();
        if !todo.is_empty() {
            let lookups: Vec<u64> = todo.iter().map(|&i| addrs[i] - 1).collect();
            let names = self.resolve(pid, &lookups);
            let mut maps: Option<Vec<MapsEntry>> = None;
            if self.cache.len() + todo.len() > CACHE_MAX {
                self.cache.clear();
            }
            for (&i, name) in todo.iter().zip(names) {
                let addr = addrs[i];
                let name = name.or_else(|| {
                    let maps = maps.get_or_insert_with(|| read_maps(pid));
                    module_of(maps, addr).map(|m| format!("{addr:#x} [{m}]"))
                });
                if let Some(name) = &name {
                    self.cache.insert((pid, addr), name.clone());
                }
                out[i] = name;
            }
        }
        out.into_iter()
            .zip(addrs)
            .map(|(name, a)| name.unwrap_or_else(|| format!("{a:#x}")))
            .collect()
    }
}

/// `func+0x12 (file:line)`, or `func+0x12 [module]` without line information. The offset is
/// that of the return address (the lookup was one byte before it).
fn format_symbolized(s: &Symbolized<'_>) -> Option<String> {
    let Symbolized::Sym(Sym {
        name,
        module,
        offset,
        code_info,
        ..
    }) = s
    else {
        return None;
    };
    let mut out = format!("{name}+{:#x}", offset + 1);
    if let Some(ci) = code_info {
        let file = Path::new(&ci.file)
            .file_name()
            .unwrap_or(&ci.file)
            .to_string_lossy();
        match ci.line {
            Some(line) => _ = write!(out, " ({file}:{line})"),
            None => _ = write!(out, " ({file})"),
        }
    } else if let Some(m) = module {
        _ = write!(out, " [{}]", base_name(m));
    }
    Some(out)
}

fn base_name(p: &OsStr) -> String {
    Path::new(p)
        .file_name()
        .unwrap_or(p)
        .to_string_lossy()
        .into_owned()
}

struct MapsEntry {
    start: u64,
    end: u64,
    name: String,
}

/// File-backed ranges of `/proc/<pid>/maps` (empty when the process is gone).
fn read_maps(pid: u32) -> Vec<MapsEntry> {
    let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/maps")) else {
        return Vec::new();
    };
    text.lines()
        .filter_map(|line| {
            // start-end perms offset dev inode [path]
            let mut f = line.split_whitespace();
            let (start, end) = f.next()?.split_once('-')?;
            let path = f.nth(4)?;
            Some(MapsEntry {
                start: u64::from_str_radix(start, 16).ok()?,
                end: u64::from_str_radix(end, 16).ok()?,
                name: base_name(OsStr::new(path)),
            })
        })
        .collect()
}

fn module_of(maps: &[MapsEntry], addr: u64) -> Option<&str> {
    maps.iter()
        .find(|m| m.start <= addr && addr < m.end)
        .map(|m| m.name.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cuda::ledger::NoSymbols;

    #[inline(never)]
    #[no_mangle]
    extern "C" fn llm_probe_symbolize_target(x: u64) -> u64 {
        std::hint::black_box(x).wrapping_mul(3)
    }

    #[test]
    fn names_a_function_of_this_process() {
        assert_eq!(llm_probe_symbolize_target(2), 6);
        let addr = llm_probe_symbolize_target as *const () as usize as u64;
        let mut s = BlazeSymbolizer::new();
        // addr + 1 stands for a return address right after a call at the function's first byte.
        let names = s.symbolize(std::process::id(), &[addr + 1, 0x10]);
        assert!(
            names[0].starts_with("llm_probe_symbolize_target+0x1"),
            "got {names:?}"
        );
        assert_eq!(names[1], "0x10");
        // Cached: same answer without blazesym.
        assert_eq!(s.symbolize(std::process::id(), &[addr + 1])[0], names[0]);
    }

    #[test]
    fn is_send() {
        fn send<T: Send>() {}
        send::<BlazeSymbolizer>();
    }

    #[test]
    fn dead_process_gives_hex() {
        // Pids are below 2^22 on Linux (pid_max limit), so this one never exists.
        let mut s = BlazeSymbolizer::new();
        assert_eq!(s.symbolize(u32::MAX - 1, &[0x1234, 0]), ["0x1234", "0x0"]);
        assert_eq!(NoSymbols.symbolize(1, &[0xab]), ["0xab"]);
    }
}
