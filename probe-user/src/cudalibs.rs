//! Find every CUDA library file a target process maps now or would load later.
//!
//! `PyTorch` (through libcudart) `dlopen`s `libcuda.so.1` lazily, at first CUDA use, which can be
//! after our uprobes were attached. A uprobe attached to a file (its inode) also fires in a later
//! mapping of that same file, so besides the files mapped now we predict which file the target's
//! dynamic loader would pick, following glibc's search order for a name without a slash
//! (`ld.so(8)`, `elf/dl-load.c:_dl_map_object`): `DT_RPATH` (only without `DT_RUNPATH`),
//! `LD_LIBRARY_PATH`, `DT_RUNPATH`, `/etc/ld.so.cache`, then the default directories. Every
//! existing candidate is kept, not only the first: attaching to an unused file costs nothing, and
//! the loader's choice depends on details we don't model (which object calls `dlopen`, hwcaps).
//!
//! Every path is taken from the target's view and resolved under its root (`/proc/PID/root`),
//! absolute symlinks included, so a container's libraries are found in the container.
//! Nothing here fails: a missing or unreadable piece is logged at debug level and skipped.

mod ldcache;
mod runpath;
pub mod ssl;

pub use ldcache::{parse_ld_so_cache, parse_ld_so_cache_where};
use std::{
    collections::HashSet,
    ffi::{OsStr, OsString},
    fs::{self, File},
    io::{self, Read},
    os::{
        fd::{AsRawFd as _, FromRawFd as _},
        unix::{
            ffi::OsStrExt,
            fs::{FileExt as _, MetadataExt, OpenOptionsExt as _},
        },
    },
    path::{Component, Path, PathBuf},
};

use object::elf;

/// Which CUDA library a file is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LibKind {
    /// The driver API, `libcuda.so.1` (`cuLaunchKernel`, `cuMemAlloc_v2`, …).
    Driver,
    /// The runtime API, `libcudart.so.<major>` (`cudaLaunchKernel`, `cudaMalloc`, …).
    Runtime,
    /// Not CUDA: OpenSSL's `libssl`, or an executable that exports its API (`ssl`).
    Ssl,
}

/// Why we think a library is (or will be) loaded by the target.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Source {
    /// Mapped now (`/proc/PID/maps`).
    Mapped,
    /// Found in a directory of the target's `LD_LIBRARY_PATH`.
    LdLibraryPath,
    /// Found in a `DT_RUNPATH` (or `DT_RPATH`) directory of the executable or of a mapped object.
    RunPath,
    /// Named by the target root's `/etc/ld.so.cache`.
    LdSoCache,
    /// Found in one of the loader's default directories.
    DefaultDir,
}

/// One CUDA library file of a target process.
#[derive(Clone, Debug)]
pub struct CudaLib {
    pub kind: LibKind,
    /// The file, opened once (see `open_in_root`): its identity, its ELF check, its symbols and
    /// the uprobes (through `/proc/self/fd/N`) all come from this descriptor, never from a path
    /// opened again.
    pub file: std::sync::Arc<File>,
    /// A path this (host) process can open: for a process in another mount namespace it is
    /// `/proc/PID/root/<path inside>`. Symlinks are already resolved: it names the file itself.
    pub path: PathBuf,
    /// The path as the target process sees it (for logs).
    pub shown: PathBuf,
    /// Identity of the file (`fstat` of `file`); results are deduplicated on `(dev, ino)`.
    pub dev: u64,
    pub ino: u64,
    pub how: Source,
}

/// The driver's soname, the only name the runtime `dlopen`s (CUDA driver API docs, "Driver
/// Entry Point Access"; libcudart's `dlopen("libcuda.so.1")`).
const DRIVER_SONAME: &str = "libcuda.so.1";

/// Directories glibc searches last, for x86-64 and aarch64 (`ld.so --help` "system search path"
/// on Debian/Ubuntu multiarch and on Fedora/RHEL `lib64` layouts).
const DEFAULT_DIRS: [&str; 8] = [
    "/lib64",
    "/usr/lib64",
    "/lib",
    "/usr/lib",
    "/lib/x86_64-linux-gnu",
    "/usr/lib/x86_64-linux-gnu",
    "/lib/aarch64-linux-gnu",
    "/usr/lib/aarch64-linux-gnu",
];

/// Symlinks followed while resolving one path: the kernel's `MAXSYMLINKS` (`include/linux/namei.h`).
const MAX_SYMLINK_HOPS: u32 = 40;

/// Mapped objects whose dynamic section we read: a `PyTorch` process maps a few hundred shared
/// objects, and only the headers are read (through a `ReadCache`), so this bounds the work to a
/// few hundred small reads.
const MAX_OBJECTS: usize = 256;

/// Largest `/etc/ld.so.cache` we read; a desktop distribution's is ~100 KiB.
const MAX_LD_SO_CACHE_BYTES: u64 = 16 << 20;

/// Largest `/proc/PID/environ` or `/proc/PID/maps` we read. The environment is bounded by the
/// kernel's argument limit (a quarter of the stack rlimit); maps of a big process are a few MiB.
const MAX_PROC_FILE_BYTES: u64 = 64 << 20;

/// Find the CUDA libraries process `pid` maps now or would load later: mapped ones first, then
/// predictions in the loader's search order, deduplicated by `(dev, ino)`.
pub fn find_cuda_libs(pid: u32) -> Vec<CudaLib> {
    let proc_dir = PathBuf::from(format!("/proc/{pid}"));
    find_cuda_libs_in(&proc_dir.join("root"), &proc_dir)
}

/// [`find_cuda_libs`] with the process's root directory (`/proc/PID/root`) and its proc directory
/// (`/proc/PID`, from which `maps`, `environ`, `exe` and `map_files/` are read) given.
pub fn find_cuda_libs_in(root: &Path, proc_dir: &Path) -> Vec<CudaLib> {
    let mut found = Found::new(root);
    let maps = read_maps(proc_dir);

    // Mapped now: the file a uprobe must cover today.
    let mut mapped_seen = HashSet::new();
    for m in &maps {
        if !mapped_seen.insert(m.path.as_path()) {
            continue;
        }
        let Some(kind) = m.path.file_name().and_then(mapped_kind) else {
            continue;
        };
        let host = match resolve_in_root(root, &m.path) {
            Ok(inside) => under_root(root, &inside),
            // A root we cannot walk (chroot seen from outside, unusual mounts): the kernel's
            // `map_files` link names the mapped file itself.
            Err(e) => {
                log::debug!("{}: {e}; trying map_files", m.path.display());
                proc_dir.join("map_files").join(&m.range)
            }
        };
        found.add(kind, host, m.path.clone(), Source::Mapped, false);
    }

    // Predictions, in the loader's order.
    let exe = read_exe(root, proc_dir);
    let origin_of_exe = exe
        .as_ref()
        .and_then(|e| e.shown.parent().map(Path::to_path_buf));
    let objects = dynamic_objects(root, proc_dir, exe.as_ref(), &maps);
    let mut dirs = SearchDirs::new(root);
    for o in &objects {
        // glibc ignores DT_RPATH in an object that has DT_RUNPATH (`elf/dl-load.c`).
        if o.runpath.is_empty() {
            for entry in &o.rpath {
                dirs.add_list(entry, o.origin.as_deref(), Source::RunPath);
            }
        }
    }
    if let Some(value) = read_ld_library_path(proc_dir) {
        // glibc expands `$ORIGIN` in LD_LIBRARY_PATH as the executable's directory and accepts
        // both ':' and ';' as separators (`elf/dl-load.c:_dl_init_paths`).
        for part in value.split(';') {
            dirs.add_list(part, origin_of_exe.as_deref(), Source::LdLibraryPath);
        }
    }
    for o in &objects {
        for entry in &o.runpath {
            dirs.add_list(entry, o.origin.as_deref(), Source::RunPath);
        }
    }
    for (dir, how) in std::mem::take(&mut dirs.list) {
        found.scan_dir(root, &dir, how);
    }

    for (soname, path) in read_ld_so_cache(root) {
        let kind = if soname == DRIVER_SONAME {
            LibKind::Driver
        } else if is_versioned_cudart(&soname) {
            LibKind::Runtime
        } else {
            continue;
        };
        found.add_inside(root, kind, Path::new(&path), Source::LdSoCache);
    }

    for dir in DEFAULT_DIRS {
        // On merged-/usr systems `/lib64` is a link to `usr/lib64`: each real directory once.
        if let Some(real) = dirs.admit(Path::new(dir)) {
            found.scan_dir(root, &real, Source::DefaultDir);
        }
    }
    found.libs
}

/// Open `inside` (a path in the target's view) with the kernel resolving every component within
/// the directory `root_dir` holds: absolute symlinks and `..` cannot leave it
/// (`RESOLVE_IN_ROOT`), and `/proc` magic links are refused (`RESOLVE_NO_MAGICLINKS`). The
/// resolver's own walk (`resolve_in_root`) decides which file is wanted; this open is the one
/// the agent then uses for everything, so a symlink swapped in between cannot point it at a
/// file outside the target's root. Kernels before 5.6 lack openat2 (ENOSYS): then the host
/// path is opened, and that window stays open (docs/security.md).
pub fn open_in_root(root_dir: &File, root: &Path, inside: &Path) -> io::Result<File> {
    let rel = inside.strip_prefix("/").unwrap_or(inside);
    let c_path = std::ffi::CString::new(rel.as_os_str().as_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: open_how is plain integers; zero is "no flags".
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (libc::O_RDONLY | libc::O_CLOEXEC) as u64;
    how.resolve = libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_MAGICLINKS;
    // SAFETY: valid NUL-terminated path, a valid open_how and its size, a directory fd we own.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            root_dir.as_raw_fd(),
            c_path.as_ptr(),
            &raw const how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    if fd >= 0 {
        // SAFETY: a descriptor the kernel just returned to us, owned by nobody else.
        return Ok(unsafe { File::from_raw_fd(fd as i32) });
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::ENOSYS) {
        return File::open(under_root(root, inside));
    }
    Err(err)
}

/// The libraries found so far and their identities.
struct Found {
    libs: Vec<CudaLib>,
    seen: HashSet<(u64, u64)>,
    /// The target's root (`/proc/PID/root`) as a path and as an open directory.
    root: PathBuf,
    root_dir: Option<File>,
}

impl Found {
    fn new(root: &Path) -> Self {
        let root_dir = fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY | libc::O_CLOEXEC)
            .open(root)
            .inspect_err(|e| log::debug!("{}: {e}", root.display()))
            .ok();
        Self {
            libs: Vec::new(),
            seen: HashSet::new(),
            root: root.to_path_buf(),
            root_dir,
        }
    }

    /// Open the file at `host`: inside the root through `open_in_root`; a `map_files` link (the
    /// kernel's own reference to a mapped file) as it is.
    fn open(&self, host: &Path) -> io::Result<File> {
        match (host.strip_prefix(&self.root), &self.root_dir) {
            (Ok(rel), Some(dir)) => open_in_root(dir, &self.root, &Path::new("/").join(rel)),
            _ => File::open(host),
        }
    }

    /// Add the file at `host` unless its identity is already known. Predicted files must be ELF
    /// objects for this machine: a 32-bit `libcuda.so.1` from `/usr/lib/i386-linux-gnu` (listed
    /// in ld.so.cache) is never loaded by a 64-bit process.
    fn add(&mut self, kind: LibKind, host: PathBuf, shown: PathBuf, how: Source, check_elf: bool) {
        let opened = self.open(&host).and_then(|f| Ok((f.metadata()?, f)));
        let (md, file) = match opened {
            Ok(x) => x,
            Err(e) => {
                log::debug!("{}: {e}", host.display());
                return;
            }
        };
        if !md.is_file() || self.seen.contains(&(md.dev(), md.ino())) {
            return;
        }
        if check_elf && !is_host_elf(&file) {
            log::debug!("{}: not an ELF object for this machine", host.display());
            return;
        }
        self.seen.insert((md.dev(), md.ino()));
        self.libs.push(CudaLib {
            kind,
            file: std::sync::Arc::new(file),
            path: host,
            shown,
            dev: md.dev(),
            ino: md.ino(),
            how,
        });
    }

    /// Add the file at `inside` (the target's view), resolving symlinks under `root`.
    fn add_inside(&mut self, root: &Path, kind: LibKind, inside: &Path, how: Source) {
        match resolve_in_root(root, inside) {
            Ok(real) => self.add(kind, under_root(root, &real), real, how, true),
            Err(e) => log::debug!("{}: {e}", inside.display()),
        }
    }

    /// Add the driver and every versioned runtime in directory `dir` (the target's view, already
    /// resolved).
    fn scan_dir(&mut self, root: &Path, dir: &Path, how: Source) {
        let host = under_root(root, dir);
        let entries = match fs::read_dir(&host) {
            Ok(entries) => entries,
            Err(e) => {
                log::debug!("{}: {e}", host.display());
                return;
            }
        };
        let mut runtimes: Vec<OsString> = entries
            .filter_map(Result::ok)
            .map(|e| e.file_name())
            .filter(|name| name.to_str().is_some_and(is_versioned_cudart))
            .collect();
        // Directory order is arbitrary; sorted, the soname link (`libcudart.so.12`) comes before
        // the file it names (`libcudart.so.12.4.127`), and results are reproducible.
        runtimes.sort();
        self.add_inside(root, LibKind::Driver, &dir.join(DRIVER_SONAME), how);
        for name in runtimes {
            self.add_inside(root, LibKind::Runtime, &dir.join(name), how);
        }
    }
}

/// The kind of a mapped file, by its file name: `libcuda.so`, `libcuda.so.1`,
/// `libcuda.so.<driver version>` are the driver; `libcudart.so*` the runtime.
pub(crate) fn mapped_kind(name: &OsStr) -> Option<LibKind> {
    let name = name.as_bytes();
    if name == b"libcuda.so" || name.starts_with(b"libcuda.so.") {
        Some(LibKind::Driver)
    } else if name.starts_with(b"libcudart.so") {
        Some(LibKind::Runtime)
    } else {
        None
    }
}

/// `libcudart.so.<digits>[.<digits>…]`: a versioned runtime (`libcudart.so.12`,
/// `libcudart.so.11.0`, `libcudart.so.12.4.127`), not the unversioned development link.
fn is_versioned_cudart(name: &str) -> bool {
    name.strip_prefix("libcudart.so.").is_some_and(|version| {
        version
            .split('.')
            .all(|part| !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit()))
    })
}

/// The ELF machine this agent runs on; `None` where we don't know it (then any ELF passes).
const HOST_MACHINE: Option<u16> = if cfg!(target_arch = "x86_64") {
    Some(elf::EM_X86_64)
} else if cfg!(target_arch = "aarch64") {
    Some(elf::EM_AARCH64)
} else {
    None
};

/// Whether `path` starts with a 64-bit little-endian ELF header for this machine's architecture
/// (CUDA supports no 32-bit or big-endian Linux targets).
fn is_host_elf(file: &File) -> bool {
    let mut header = [0_u8; 20];
    let read = file.read_exact_at(&mut header, 0);
    if read.is_err() || header[..4] != elf::ELFMAG || header[4] != elf::ELFCLASS64 {
        return false;
    }
    header[5] == elf::ELFDATA2LSB
        && HOST_MACHINE.is_none_or(|m| u16::from_le_bytes([header[18], header[19]]) == m)
}

/// `root` joined with `inside`, an absolute path in the target's view.
fn under_root(root: &Path, inside: &Path) -> PathBuf {
    root.join(inside.strip_prefix("/").unwrap_or(inside))
}

/// Resolve `path` (the target's view; relative means relative to its `/`) under `root`, following
/// symlinks one component at a time so that absolute links stay inside `root` (std's
/// `canonicalize` of a `/proc/PID/root/…` path would follow them on the host). Returns the
/// resolved path in the target's view: absolute, free of symlinks, `.` and `..`; the file must
/// exist. `..` at the root stays at the root, as in the kernel.
pub fn resolve_in_root(root: &Path, path: &Path) -> io::Result<PathBuf> {
    let mut done = PathBuf::from("/");
    // Components still to walk, the next one last.
    let mut todo: Vec<OsString> = Vec::new();
    push_components(&mut todo, path);
    let mut hops = 0;
    while let Some(part) = todo.pop() {
        if part == ".." {
            done.pop();
            continue;
        }
        let next = done.join(&part);
        let host = under_root(root, &next);
        let md = fs::symlink_metadata(&host)?;
        if !md.file_type().is_symlink() {
            done = next;
            continue;
        }
        hops += 1;
        if hops > MAX_SYMLINK_HOPS {
            return Err(io::Error::from_raw_os_error(libc::ELOOP));
        }
        let target = fs::read_link(&host)?;
        if target.is_absolute() {
            done = PathBuf::from("/");
        }
        push_components(&mut todo, &target);
    }
    Ok(done)
}

/// Push `path`'s normal and `..` components onto `todo` so that they pop in order.
fn push_components(todo: &mut Vec<OsString>, path: &Path) {
    let start = todo.len();
    for c in path.components() {
        match c {
            Component::Normal(s) => todo.push(s.to_os_string()),
            Component::ParentDir => todo.push(OsString::from("..")),
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    todo[start..].reverse();
}

/// One mapping of a file, from `/proc/PID/maps`.
pub(crate) struct Mapping {
    /// `start-end` in hex, the name of its `/proc/PID/map_files/` link.
    pub(crate) range: String,
    pub(crate) exec: bool,
    pub(crate) path: PathBuf,
}

/// The file-backed mappings of `/proc/PID/maps`, in order; deleted files are left out.
pub(crate) fn read_maps(proc_dir: &Path) -> Vec<Mapping> {
    let bytes = match read_bounded(&proc_dir.join("maps"), MAX_PROC_FILE_BYTES) {
        Ok(bytes) => bytes,
        Err(e) => {
            log::debug!("{}/maps: {e}", proc_dir.display());
            return Vec::new();
        }
    };
    bytes
        .split(|&b| b == b'\n')
        .filter_map(parse_maps_line)
        .collect()
}

/// `address perms offset dev inode   pathname` (`proc(5)`); the path is everything after the
/// padding that follows the inode, and may contain spaces.
fn parse_maps_line(line: &[u8]) -> Option<Mapping> {
    let mut rest = line;
    let mut fields = [&[][..]; 5];
    for field in &mut fields {
        let start = rest.iter().position(|&b| b != b' ')?;
        rest = &rest[start..];
        let end = rest.iter().position(|&b| b == b' ')?;
        *field = &rest[..end];
        rest = &rest[end..];
    }
    let path = &rest[rest.iter().position(|&b| b != b' ')?..];
    if path.first() != Some(&b'/') || path.ends_with(b" (deleted)") {
        return None;
    }
    Some(Mapping {
        range: String::from_utf8_lossy(fields[0]).into_owned(),
        exec: fields[1].get(2) == Some(&b'x'),
        path: PathBuf::from(OsStr::from_bytes(path)),
    })
}

/// The target's executable: its path in the target's view and a path we can open.
struct Exe {
    shown: PathBuf,
    host: PathBuf,
}

fn read_exe(root: &Path, proc_dir: &Path) -> Option<Exe> {
    let link = proc_dir.join("exe");
    let shown = match fs::read_link(&link) {
        Ok(shown) => shown,
        Err(e) => {
            log::debug!("{}: {e}", link.display());
            return None;
        }
    };
    if shown.as_os_str().as_bytes().ends_with(b" (deleted)") {
        return None;
    }
    match resolve_in_root(root, &shown) {
        Ok(real) => Some(Exe {
            host: under_root(root, &real),
            shown: real,
        }),
        // `exe` is a magic link to the file itself when the root cannot be walked.
        Err(_) => Some(Exe { shown, host: link }),
    }
}

/// An object whose search paths the loader would use.
struct DynObject {
    /// `$ORIGIN`: the object's directory in the target's view.
    origin: Option<PathBuf>,
    rpath: Vec<String>,
    runpath: Vec<String>,
}

/// The executable then the mapped executable objects, at most [`MAX_OBJECTS`], with their
/// `DT_RPATH`/`DT_RUNPATH`.
fn dynamic_objects(
    root: &Path,
    proc_dir: &Path,
    exe: Option<&Exe>,
    maps: &[Mapping],
) -> Vec<DynObject> {
    let mut seen = HashSet::new();
    let mut mapped: Vec<&Mapping> = maps
        .iter()
        .filter(|m| m.exec && Some(m.path.as_path()) != exe.map(|e| e.shown.as_path()))
        .filter(|m| seen.insert(m.path.as_path()))
        .collect();
    // The object that calls `dlopen("libcuda.so.1")` is CUDA-related (libcudart, libtorch_cuda,
    // libc10_cuda, NVIDIA's pip wheels): read those first should the cap cut the list.
    mapped.sort_by_key(|m| !likely_cuda_user(&m.path));

    let mut files: Vec<(PathBuf, PathBuf)> = Vec::new();
    if let Some(e) = exe {
        files.push((e.shown.clone(), e.host.clone()));
    }
    for m in mapped {
        let host = match resolve_in_root(root, &m.path) {
            Ok(real) => under_root(root, &real),
            Err(_) => proc_dir.join("map_files").join(&m.range),
        };
        files.push((m.path.clone(), host));
    }
    files.truncate(MAX_OBJECTS);

    files
        .into_iter()
        .filter_map(|(shown, host)| {
            // Regular files only: a mapped device (`/dev/nvidia0`) must not be opened.
            if !fs::metadata(&host).is_ok_and(|md| md.is_file()) {
                return None;
            }
            let (rpath, runpath) = runpath::read_search_paths(&host)?;
            Some(DynObject {
                origin: shown.parent().map(Path::to_path_buf),
                rpath,
                runpath,
            })
        })
        .collect()
}

fn likely_cuda_user(path: &Path) -> bool {
    let bytes = path.as_os_str().as_bytes();
    [&b"cuda"[..], b"nvidia", b"torch", b"c10"]
        .iter()
        .any(|needle| bytes.windows(needle.len()).any(|w| w == *needle))
}

/// Directories to search, in order, each once (by its resolved path).
struct SearchDirs<'a> {
    root: &'a Path,
    list: Vec<(PathBuf, Source)>,
    seen: HashSet<PathBuf>,
}

impl<'a> SearchDirs<'a> {
    fn new(root: &'a Path) -> Self {
        Self {
            root,
            list: Vec::new(),
            seen: HashSet::new(),
        }
    }

    /// Add each directory of the ':'-separated `list`, with `$ORIGIN` expanded to `origin`.
    fn add_list(&mut self, list: &str, origin: Option<&Path>, how: Source) {
        for entry in list.split(':') {
            let Some(dir) = expand_origin(entry, origin) else {
                log::debug!("search path entry {entry:?} left out");
                continue;
            };
            if let Some(real) = self.admit(&dir) {
                self.list.push((real, how));
            }
        }
    }

    /// `dir` resolved under the root, if it exists and was not admitted before.
    fn admit(&mut self, dir: &Path) -> Option<PathBuf> {
        match resolve_in_root(self.root, dir) {
            Ok(real) => self.seen.insert(real.clone()).then_some(real),
            Err(e) => {
                log::debug!("{}: {e}", dir.display());
                None
            }
        }
    }
}

/// Expand `$ORIGIN` / `${ORIGIN}` in a search path entry (`ld.so(8)` "Dynamic string tokens").
/// `None` for entries we don't follow: empty or relative ones (relative to the target's working
/// directory, which is rare and whose view from here is unreliable), ones with `$LIB` or
/// `$PLATFORM` (their expansion depends on the distribution and CPU), and `$ORIGIN` without an
/// origin.
fn expand_origin(entry: &str, origin: Option<&Path>) -> Option<PathBuf> {
    let mut out = String::new();
    let mut rest = entry;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        let tail = if let Some(t) = after.strip_prefix("{ORIGIN}") {
            t
        } else {
            // "$ORIGIN" only counts as the token when followed by '/' or the end.
            let t = after.strip_prefix("ORIGIN")?;
            if !(t.is_empty() || t.starts_with('/')) {
                return None;
            }
            t
        };
        out.push_str(origin?.to_str()?);
        rest = tail;
    }
    out.push_str(rest);
    let path = PathBuf::from(out);
    path.is_absolute().then_some(path)
}

/// The first `LD_LIBRARY_PATH` of `/proc/PID/environ` (the one `getenv` returns).
fn read_ld_library_path(proc_dir: &Path) -> Option<String> {
    let bytes = match read_bounded(&proc_dir.join("environ"), MAX_PROC_FILE_BYTES) {
        Ok(bytes) => bytes,
        Err(e) => {
            log::debug!("{}/environ: {e}", proc_dir.display());
            return None;
        }
    };
    bytes
        .split(|&b| b == 0)
        .find_map(|var| var.strip_prefix(b"LD_LIBRARY_PATH="))
        .map(|value| String::from_utf8_lossy(value).into_owned())
}

/// The `(soname, path)` entries of the target root's `/etc/ld.so.cache`.
fn read_ld_so_cache(root: &Path) -> Vec<(String, String)> {
    // Only the CUDA entries are copied out of it.
    read_ld_so_cache_matching(root, |soname| {
        soname == DRIVER_SONAME || is_versioned_cudart(soname)
    })
}

/// The `(soname, path)` entries of the target root's `/etc/ld.so.cache` whose soname `wanted`
/// accepts.
fn read_ld_so_cache_matching(root: &Path, wanted: impl Fn(&str) -> bool) -> Vec<(String, String)> {
    let path = Path::new("/etc/ld.so.cache");
    let read = resolve_in_root(root, path)
        .and_then(|real| read_bounded(&under_root(root, &real), MAX_LD_SO_CACHE_BYTES));
    match read {
        Ok(bytes) => parse_ld_so_cache_where(&bytes, wanted),
        Err(e) => {
            log::debug!("{}/etc/ld.so.cache: {e}", root.display());
            Vec::new()
        }
    }
}

fn read_bounded(path: &Path, limit: u64) -> io::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    File::open(path)?.take(limit).read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// What `pid` maps of CUDA now: the library paths (as the process sees them) and the executable
/// ranges of its runtime (for the kernel's nesting test). One read of `/proc/PID/maps`, through the
/// same parser as `find_cuda_libs`; the agent's periodic rescan.
#[derive(Default)]
pub struct MappedCuda {
    pub paths: Vec<PathBuf>,
    pub runtime_text: Vec<(u64, u64)>,
}

pub fn mapped_cuda(pid: u32) -> MappedCuda {
    let mut out = MappedCuda::default();
    for m in read_maps(Path::new(&format!("/proc/{pid}"))) {
        let Some(kind) = m.path.file_name().and_then(mapped_kind) else {
            continue;
        };
        if kind == LibKind::Runtime && m.exec {
            let range = m.range.split_once('-').and_then(|(a, b)| {
                Some((
                    u64::from_str_radix(a, 16).ok()?,
                    u64::from_str_radix(b, 16).ok()?,
                ))
            });
            out.runtime_text.extend(range);
        }
        out.paths.push(m.path);
    }
    out.paths.sort_unstable();
    out.paths.dedup();
    out
}

#[cfg(test)]
mod tests;
