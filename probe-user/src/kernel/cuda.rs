//! Attaching the CUDA uprobes: the five programs of probe-ebpf/src/cuda.rs are loaded once, then
//! attached to every symbol of `probe_common::cuda::api::NAMES` in each library file found by
//! `crate::cudalibs` (by file offset, with the API id as the attach cookie). Two scopes (`--cuda-probe-scope`):
//! `host` (default) attaches each file once for every process that maps it, now or after a later
//! `dlopen`, `fork` or `exec`, and the programs filter by tgid — untraced processes using the same
//! file take the breakpoint and leave at the filter; `process` attaches per traced process (perf
//! event scoped to its pid), so untraced processes never trap, but a process is covered only from
//! the housekeeping tick after it was forked, and not after it `exec`s (measured: a process that
//! exec'ed after attach made its calls unseen); its links are detached when it exits.

use std::{
    collections::HashMap as StdHashMap,
    path::{Path, PathBuf},
};

use aya::{
    maps::{HashMap, MapData},
    programs::{
        uprobe::{UProbeAttachLocation, UProbeAttachPoint, UProbeLinkId, UProbeScope},
        UProbe,
    },
    Ebpf,
};
use object::{Object as _, ObjectSection as _, ObjectSegment as _, ObjectSymbol as _};
use probe_common::{cuda::api, CudaThread, CudartText};

use super::Kernel;
use crate::cudalibs::{self, CudaLib, LibKind};

/// Why the CUDA probes, or one library file's, could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum CudaProbeError {
    #[error("program {0} missing from the object")]
    MissingProgram(&'static str),
    #[error("map {0} missing from the object")]
    MissingMap(&'static str),
    #[error("program {0}: {1}")]
    Program(&'static str, #[source] aya::programs::ProgramError),
    #[error("map {0}: {1}")]
    Map(&'static str, #[source] aya::maps::MapError),
    #[error("reading {0}: {1}")]
    Read(PathBuf, #[source] std::io::Error),
    #[error("parsing {0}: {1}")]
    Elf(PathBuf, #[source] object::Error),
    #[error("{0}: {1} bytes is more than a CUDA library holds; not read")]
    TooLarge(PathBuf, u64),
}

/// The programs attached at each entry point, by API family. Launches get the entry program
/// only (they are counted in the kernel); memory and sync calls get entry and return.
const LAUNCH: &[&str] = &["cuda_launch"];
const MEM: &[&str] = &["cuda_mem_enter", "cuda_mem_return"];
const SYNC: &[&str] = &["cuda_sync_enter", "cuda_sync_return"];
const PROGRAMS: [&str; 5] = [
    "cuda_launch",
    "cuda_mem_enter",
    "cuda_mem_return",
    "cuda_sync_enter",
    "cuda_sync_return",
];

fn programs_for(id: u32) -> &'static [&'static str] {
    if api::is_launch(id) {
        LAUNCH
    } else if api::is_mem(id) {
        MEM
    } else {
        SYNC
    }
}

/// What attaching one library file gave.
#[derive(Clone, Debug)]
pub struct FileAttach {
    pub kind: LibKind,
    pub shown: PathBuf,
    /// Entry points probed in this file.
    pub symbols: Vec<&'static str>,
    /// Entry points of this library kind that the file does not export (older drivers lack some).
    pub missing: Vec<&'static str>,
    /// Attach failures (symbol: error).
    pub errors: Vec<String>,
    /// Entry points opening with `endbr64`, probed at the next instruction.
    pub past_endbr64: usize,
    /// Entry points whose probed instruction the kernel single-steps instead of emulating.
    pub single_stepped: usize,
}

pub struct CudaProbes {
    threads: HashMap<MapData, u32, CudaThread>,
    /// libcudart code ranges per traced process, for the kernel's nesting test.
    cudart_text: HashMap<MapData, u32, CudartText>,
    /// What was last written there, per process.
    text_written: StdHashMap<u32, CudartText>,
    /// Probe the runtime's launch entry points too (`--cuda-launch-probes all`); without them a
    /// runtime launch that reaches the driver is counted once, under the driver's name, at half the
    /// probe cost.
    pub runtime_launches: bool,
    /// Attach per traced process instead of once per file for every process (`--cuda-probe-scope`).
    pub per_process: bool,
    /// Files attached for at least one process, by (device, inode).
    files: StdHashMap<(u64, u64), FileAttach>,
    /// (device, inode, pid) attached.
    attached: std::collections::HashSet<(u64, u64, u32)>,
    /// Links per process, detached when it exits.
    links: StdHashMap<u32, Vec<(&'static str, UProbeLinkId)>>,
}

impl CudaProbes {
    /// Load (not attach) the CUDA programs and take the per-thread counter map.
    pub fn load(ebpf: &mut Ebpf) -> Result<Self, CudaProbeError> {
        for name in PROGRAMS {
            uprobe(ebpf, name)?
                .load()
                .map_err(|e| CudaProbeError::Program(name, e))?;
        }
        let threads = take_hash(ebpf, "CUDA_THREADS")?;
        let cudart_text = take_hash(ebpf, "CUDART_TEXT")?;
        Ok(Self {
            threads,
            cudart_text,
            text_written: StdHashMap::new(),
            runtime_launches: true,
            per_process: false,
            files: StdHashMap::new(),
            attached: std::collections::HashSet::new(),
            links: StdHashMap::new(),
        })
    }

    pub fn files(&self) -> impl Iterator<Item = &FileAttach> {
        self.files.values()
    }

    /// Every thread's launch counters (key: thread id).
    pub fn threads(&self) -> Vec<(u32, CudaThread)> {
        self.threads.iter().filter_map(Result::ok).collect()
    }

    pub fn forget_thread(&mut self, tid: u32) {
        let _ = self.threads.remove(&tid);
    }

    /// Tell the kernel where `pid`'s libcudart code is, if that changed (at most 4 ranges).
    fn update_cudart_text(&mut self, pid: u32, ranges: &[(u64, u64)]) {
        let mut text = CudartText::default();
        for (slot, range) in text.ranges.iter_mut().zip(ranges) {
            *slot = [range.0, range.1];
        }
        if self.text_written.get(&pid) == Some(&text) {
            return;
        }
        let result = if text == CudartText::default() {
            self.cudart_text.remove(&pid)
        } else {
            self.cudart_text.insert(pid, text, 0)
        };
        // Removing a key that was never there fails harmlessly; a failed insert is retried.
        match result {
            Err(e) if text != CudartText::default() => {
                log::debug!("CUDART_TEXT for pid {pid}: {e}");
            }
            _ => {
                self.text_written.insert(pid, text);
            }
        }
    }
}

fn take_hash<V: aya::Pod>(
    ebpf: &mut Ebpf,
    name: &'static str,
) -> Result<HashMap<MapData, u32, V>, CudaProbeError> {
    let map = ebpf
        .take_map(name)
        .ok_or(CudaProbeError::MissingMap(name))?;
    HashMap::try_from(map).map_err(|e| CudaProbeError::Map(name, e))
}

fn uprobe<'e>(ebpf: &'e mut Ebpf, name: &'static str) -> Result<&'e mut UProbe, CudaProbeError> {
    ebpf.program_mut(name)
        .ok_or(CudaProbeError::MissingProgram(name))?
        .try_into()
        .map_err(|e| CudaProbeError::Program(name, e))
}

/// Largest library file probed: libcuda.so is ~100 MB. A file past this (a sparse 2 GiB file on
/// a target's library path, say) is refused rather than read.
const MAX_LIBRARY_BYTES: u64 = 1 << 30;
/// Largest section read for symbols (`.dynsym`, `.symtab` and their strings): libcuda's are a few
/// hundred KiB. Only these sections and a few bytes at each entry point are read from the file.
const MAX_SYMBOL_SECTION_BYTES: u64 = 64 << 20;

/// File offsets of the wanted exported symbols (uprobes take offsets into the file).
fn symbol_offsets_in<'data, R: object::ReadRef<'data>>(
    data: R,
    path: &Path,
    wanted: &[&'static str],
) -> Result<Vec<(&'static str, u64)>, CudaProbeError> {
    let file = object::File::parse(data).map_err(|e| CudaProbeError::Elf(path.to_path_buf(), e))?;
    for section in file.sections() {
        let name = section.name().unwrap_or("");
        if matches!(name, ".dynsym" | ".dynstr" | ".symtab" | ".strtab")
            && section.size() > MAX_SYMBOL_SECTION_BYTES
        {
            return Err(CudaProbeError::TooLarge(path.to_path_buf(), section.size()));
        }
    }
    let mut addrs: StdHashMap<&str, u64> = StdHashMap::new();
    for sym in file.dynamic_symbols().chain(file.symbols()) {
        if sym.is_undefined() || sym.address() == 0 {
            continue;
        }
        if let Ok(name) = sym.name() {
            // Versioned names (`cuMemAlloc_v2@@libcuda.so.1`) are stored without the version.
            if let Some(w) = wanted.iter().find(|w| **w == name) {
                addrs.entry(w).or_insert(sym.address());
            }
        }
    }
    let mut out = Vec::new();
    for &w in wanted {
        let Some(&addr) = addrs.get(w) else { continue };
        let seg = file.segments().find(|s| {
            let (start, size) = (s.address(), s.size());
            // Checked: a hostile library can claim any segment bounds.
            addr >= start && start.checked_add(size).is_some_and(|end| addr < end)
        });
        if let Some(seg) = seg {
            let (file_off, _) = seg.file_range();
            if let Some(off) = (addr - seg.address()).checked_add(file_off) {
                out.push((w, off));
            }
        }
    }
    Ok(out)
}

/// `endbr64` marks an indirect-branch target for CET and does nothing else; user-space IBT is not
/// enabled on Linux. The kernel cannot emulate it, so a uprobe on it single-steps the instruction
/// out of line: 11.8 µs per hit in a Firecracker VM against 0.9 µs for the `push` that follows it,
/// which the kernel emulates (docs/BENCHMARKS.md). Registers and the stack are the same at the
/// next instruction, so the probes go there: the return address is still at the stack pointer.
/// `code` holds the bytes at file offset `off`.
fn past_endbr64(code: &[u8], off: u64) -> u64 {
    const ENDBR64: [u8; 4] = [0xf3, 0x0f, 0x1e, 0xfa];
    if cfg!(target_arch = "x86_64") && code.get(..4) == Some(&ENDBR64[..]) {
        off + 4
    } else {
        off
    }
}

/// Whether x86 uprobes emulate the instruction at `off` (push of a register, nop, call, jmp)
/// instead of single-stepping a copy of it, which costs several times more per hit in a VM.
fn emulated(data: &[u8], off: u64) -> bool {
    if !cfg!(target_arch = "x86_64") {
        return true;
    }
    let o = off as usize;
    matches!(
        (data.get(o), data.get(o + 1)),
        (Some(0x50..=0x57 | 0x90 | 0xe8 | 0xe9 | 0xeb), _) | (Some(0x41), Some(0x50..=0x57))
    )
}

/// x86 uprobes refuse an instruction with a LOCK (or segment-override) prefix: the attach
/// succeeds, but the probe is never installed in a process. Say so instead of counting nothing.
fn unprobeable(data: &[u8], off: u64) -> Option<&'static str> {
    if !cfg!(target_arch = "x86_64") {
        return None;
    }
    // Legacy prefixes come in any order before the opcode (at most 4 that matter here).
    for &b in data.get(off as usize..)?.iter().take(4) {
        match b {
            0xf0 => {
                return Some("its first instruction has a LOCK prefix, which x86 uprobes refuse")
            }
            0x26 | 0x2e | 0x36 | 0x3e => {
                return Some("its first instruction has a segment prefix, which x86 uprobes refuse")
            }
            0x64 | 0x65 | 0x66 | 0x67 | 0xf2 | 0xf3 => {}
            _ => return None,
        }
    }
    None
}

/// One entry point to probe (also OpenSSL's: `super::ssl`).
pub(super) struct EntryPoint {
    pub name: &'static str,
    /// File offset of the probed instruction.
    pub offset: u64,
    /// Why it cannot be probed.
    pub unprobeable: Option<&'static str>,
    /// Probed at the instruction after an `endbr64`.
    pub past_endbr64: bool,
    /// The kernel single-steps the probed instruction instead of emulating it.
    pub single_stepped: bool,
}

/// The wanted entry points of the library `file` (opened by the resolver; `path` names it in
/// messages): its symbol sections and 16 bytes at each entry point are read, nothing else
/// (`ReadCache`).
pub(super) fn entry_points(
    file: &std::fs::File,
    path: &Path,
    wanted: &[&'static str],
) -> Result<Vec<EntryPoint>, CudaProbeError> {
    let read_err = |e| CudaProbeError::Read(path.to_path_buf(), e);
    let len = file.metadata().map_err(read_err)?.len();
    if len > MAX_LIBRARY_BYTES {
        return Err(CudaProbeError::TooLarge(path.to_path_buf(), len));
    }
    let cache = object::ReadCache::new(file);
    let mut out = Vec::new();
    for (name, entry) in symbol_offsets_in(&cache, path, wanted)? {
        let window = |at: u64| {
            let n = len.saturating_sub(at).min(16);
            object::ReadRef::read_bytes_at(&cache, at, n).unwrap_or_default()
        };
        let offset = past_endbr64(window(entry), entry);
        let code = window(offset);
        let single_stepped = !emulated(code, 0);
        if single_stepped {
            log::debug!(
                "{}: {name} opens with {:02x?}, which the kernel single-steps (slower per hit)",
                path.display(),
                code.get(..4).unwrap_or_default()
            );
        }
        out.push(EntryPoint {
            name,
            offset,
            unprobeable: unprobeable(code, 0),
            past_endbr64: offset != entry,
            single_stepped,
        });
    }
    Ok(out)
}

impl Kernel {
    /// Attach every CUDA entry point `lib` exports, for process `pid`. `None` when the file was
    /// attached for it before (or the CUDA programs are not loaded, or `pid` is 0).
    pub fn attach_cuda_lib(&mut self, lib: &CudaLib, pid: u32) -> Option<FileAttach> {
        let cuda = self.cuda.as_mut()?;
        // Host scope: one set of links per file, kept until the agent exits (key pid 0).
        let (scope, pid) = if cuda.per_process {
            (
                UProbeScope::OneProcess(std::num::NonZeroU32::new(pid)?),
                pid,
            )
        } else {
            (UProbeScope::AllProcesses, 0)
        };
        if !cuda.attached.insert((lib.dev, lib.ino, pid)) {
            return None;
        }
        let runtime_launches = cuda.runtime_launches;
        let ids: Vec<u32> = (0..api::COUNT)
            .filter(|&id| api::is_runtime(id) == (lib.kind == LibKind::Runtime))
            .filter(|&id| runtime_launches || !(api::is_runtime(id) && api::is_launch(id)))
            .collect();
        let wanted: Vec<&'static str> = ids.iter().map(|&id| api::NAMES[id as usize]).collect();
        let mut fa = FileAttach {
            kind: lib.kind,
            shown: lib.shown.clone(),
            symbols: Vec::new(),
            missing: Vec::new(),
            errors: Vec::new(),
            past_endbr64: 0,
            single_stepped: 0,
        };
        let attach_path = PathBuf::from(format!(
            "/proc/self/fd/{}",
            std::os::fd::AsRawFd::as_raw_fd(&*lib.file)
        ));
        let entries = match entry_points(&lib.file, &lib.path, &wanted) {
            Ok(o) => o,
            Err(e) => {
                fa.errors.push(format!("{e:#}"));
                return Some(fa);
            }
        };
        for (&id, &name) in ids.iter().zip(&wanted) {
            let Some(ep) = entries.iter().find(|e| e.name == name) else {
                fa.missing.push(name);
                continue;
            };
            let (off, bad, skipped) = (ep.offset, ep.unprobeable, ep.past_endbr64);
            if let Some(why) = bad {
                fa.errors.push(format!("{name} cannot be probed: {why}"));
                continue;
            }
            fa.past_endbr64 += usize::from(skipped);
            fa.single_stepped += usize::from(ep.single_stepped);
            let mut ok = true;
            for &prog_name in programs_for(id) {
                let result = uprobe(&mut self.ebpf, prog_name).and_then(|prog| {
                    prog.attach(
                        UProbeAttachPoint {
                            location: UProbeAttachLocation::AbsoluteOffset(off),
                            cookie: Some(u64::from(id)),
                        },
                        // The resolver's descriptor, not its path: the uprobe goes on the inode
                        // whose symbols were read, whatever the path names now.
                        &attach_path,
                        scope,
                    )
                    .map_err(|e| CudaProbeError::Program(prog_name, e))
                });
                match result {
                    Ok(link) => {
                        let links = &mut self.cuda.as_mut().expect("checked above").links;
                        links.entry(pid).or_default().push((prog_name, link));
                    }
                    Err(e) => {
                        fa.errors.push(format!("{name} ({prog_name}): {e:#}"));
                        ok = false;
                    }
                }
            }
            if ok {
                fa.symbols.push(name);
            }
        }
        let cuda = self.cuda.as_mut().expect("checked above");
        cuda.files
            .entry((lib.dev, lib.ino))
            .or_insert_with(|| fa.clone());
        Some(fa)
    }

    /// Detach process `pid`'s CUDA probes (it exited). Returns how many links were removed.
    pub fn detach_cuda_for(&mut self, pid: u32) -> usize {
        let Some(cuda) = self.cuda.as_mut() else {
            return 0;
        };
        if cuda.text_written.remove(&pid).is_some() {
            let _ = cuda.cudart_text.remove(&pid);
        }
        cuda.attached.retain(|&(_, _, p)| p != pid);
        let links = cuda.links.remove(&pid).unwrap_or_default();
        let n = links.len();
        for (prog_name, link) in links {
            let prog: Option<&mut UProbe> = self
                .ebpf
                .program_mut(prog_name)
                .and_then(|p| p.try_into().ok());
            if let Some(Err(e)) = prog.map(|p| p.detach(link)) {
                log::debug!("detaching {prog_name} of pid {pid}: {e}");
            }
        }
        n
    }

    /// Refresh the kernel's view of where `pid`'s libcudart code is (no map write when unchanged).
    pub fn refresh_cudart_text(&mut self, pid: u32, ranges: &[(u64, u64)]) {
        if let Some(c) = self.cuda.as_mut() {
            c.update_cudart_text(pid, ranges);
        }
    }

    pub fn cuda_loaded(&self) -> bool {
        self.cuda.is_some()
    }

    /// `false`: leave `cudaLaunchKernel(_ptsz)` / `cudaGraphLaunch` unprobed (see `CudaProbes`).
    pub fn set_cuda_runtime_launches(&mut self, on: bool) {
        if let Some(c) = self.cuda.as_mut() {
            c.runtime_launches = on;
        }
    }

    /// `true`: uprobes scoped to each traced process (see the module doc).
    pub fn set_cuda_per_process(&mut self, on: bool) {
        if let Some(c) = self.cuda.as_mut() {
            c.per_process = on;
        }
    }
}

impl Kernel {
    /// Find (mapped now or predicted) and attach the CUDA libraries of `pid`. Returns the library
    /// files newly attached (as the process sees them).
    pub fn attach_cuda_for(&mut self, pid: u32) -> Vec<PathBuf> {
        if !self.cuda_loaded() {
            return Vec::new();
        }
        if let Some(c) = self.cuda.as_mut() {
            c.update_cudart_text(pid, &cudalibs::mapped_cuda(pid).runtime_text);
        }
        let libs = cudalibs::find_cuda_libs(pid);
        if libs.is_empty() {
            log::info!(
                "pid {pid}: no CUDA library mapped or found on its library path; CUDA probes idle \
                 for it (it will be attached if one is mapped later)"
            );
        }
        let mut new = Vec::new();
        for lib in &libs {
            let Some(fa) = self.attach_cuda_lib(lib, pid) else {
                continue;
            };
            new.push(lib.shown.clone());
            log::info!(
                "CUDA: {} entry points probed in {} (found for pid {pid}: {:?}, {:?}; {} past \
                 endbr64, {} single-stepped){}",
                fa.symbols.len(),
                lib.shown.display(),
                lib.kind,
                lib.how,
                fa.past_endbr64,
                fa.single_stepped,
                if fa.missing.is_empty() {
                    String::new()
                } else {
                    format!("; not exported there: {}", fa.missing.join(", "))
                }
            );
            for e in &fa.errors {
                log::warn!("CUDA: {}: {e}", lib.shown.display());
            }
        }
        new
    }

    pub fn cuda_files(&self) -> usize {
        self.cuda.as_ref().map_or(0, |c| c.files.len())
    }

    pub fn cuda_threads(&self) -> Vec<(u32, CudaThread)> {
        self.cuda
            .as_ref()
            .map(CudaProbes::threads)
            .unwrap_or_default()
    }

    pub fn forget_cuda_thread(&mut self, tid: u32) {
        if let Some(c) = self.cuda.as_mut() {
            c.forget_thread(tid);
        }
    }
}
