use std::fmt::Write as _;
use std::{
    fs,
    os::unix::fs::{symlink, MetadataExt},
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
};

use proptest::prelude::*;

use super::*;
use super::{ldcache::*, runpath::read_search_paths};

/// A directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("llm-probe-libs-{tag}-{}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A fake target: `root` is its `/`, `proc` its `/proc/PID`.
struct Fake {
    _dir: TempDir,
    root: PathBuf,
    proc: PathBuf,
}

impl Fake {
    fn new(tag: &str) -> Self {
        let dir = TempDir::new(tag);
        let root = dir.0.join("root");
        let proc = dir.0.join("proc");
        fs::create_dir_all(&root).unwrap();
        fs::create_dir_all(&proc).unwrap();
        Self {
            _dir: dir,
            root,
            proc,
        }
    }

    fn host(&self, inside: &str) -> PathBuf {
        self.root.join(inside.trim_start_matches('/'))
    }

    fn file(&self, inside: &str, bytes: &[u8]) -> PathBuf {
        let host = self.host(inside);
        fs::create_dir_all(host.parent().unwrap()).unwrap();
        fs::write(&host, bytes).unwrap();
        host
    }

    fn lib(&self, inside: &str) -> PathBuf {
        self.file(inside, &elf_object(None, None))
    }

    fn link(&self, inside: &str, target: &str) {
        let host = self.host(inside);
        fs::create_dir_all(host.parent().unwrap()).unwrap();
        symlink(target, host).unwrap();
    }

    fn maps(&self, paths: &[(&str, &str)]) {
        let mut text =
            String::from("55d0c0000000-55d0c0021000 rw-p 00000000 00:00 0          [heap]\n");
        for (i, (perms, path)) in paths.iter().enumerate() {
            let start = 0x7f00_0000_0000_u64 + (i as u64) * 0x10_0000;
            let _ = writeln!(
                text,
                "{start:x}-{:x} {perms} 00000000 fd:01 {}                      {path}",
                start + 0x1000,
                1000 + i
            );
        }
        fs::write(self.proc.join("maps"), text).unwrap();
    }

    fn environ(&self, vars: &[&str]) {
        let mut bytes = Vec::new();
        for v in vars {
            bytes.extend_from_slice(v.as_bytes());
            bytes.push(0);
        }
        fs::write(self.proc.join("environ"), bytes).unwrap();
    }

    /// `exe` links to a path in the target's view, as the kernel's magic link reads.
    fn exe(&self, inside: &str) {
        symlink(inside, self.proc.join("exe")).unwrap();
    }

    fn find(&self) -> Vec<CudaLib> {
        find_cuda_libs_in(&self.root, &self.proc)
    }
}

fn summary(libs: &[CudaLib]) -> Vec<(LibKind, String, Source)> {
    libs.iter()
        .map(|l| (l.kind, l.shown.display().to_string(), l.how))
        .collect()
}

/// A minimal 64-bit little-endian shared object for this machine: one `PT_LOAD` at a vaddr that
/// differs from its file offset (so the `DT_STRTAB` translation is exercised) and a `PT_DYNAMIC`
/// with `DT_STRTAB` and optional `DT_RPATH` / `DT_RUNPATH`.
fn elf_object(rpath: Option<&str>, runpath: Option<&str>) -> Vec<u8> {
    const VADDR: u64 = 0x40_0000;
    const EHDR: usize = 64;
    const PHDR: usize = 56;
    let mut strtab = vec![0_u8];
    let mut dyns: Vec<(i64, u64)> = Vec::new();
    for (tag, s) in [(elf::DT_RPATH, rpath), (elf::DT_RUNPATH, runpath)] {
        if let Some(s) = s {
            dyns.push((tag, strtab.len() as u64));
            strtab.extend_from_slice(s.as_bytes());
            strtab.push(0);
        }
    }
    let dyn_off = EHDR + 2 * PHDR;
    let dyn_len = (dyns.len() + 2) * 16;
    let str_off = dyn_off + dyn_len;
    dyns.insert(0, (elf::DT_STRTAB, VADDR + str_off as u64));
    dyns.push((elf::DT_NULL, 0));
    let total = str_off + strtab.len();

    let mut b = Vec::with_capacity(total);
    b.extend_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1, 1, 0]);
    b.extend_from_slice(&[0; 8]);
    b.extend_from_slice(&3_u16.to_le_bytes()); // ET_DYN
    b.extend_from_slice(&HOST_MACHINE.unwrap_or(elf::EM_X86_64).to_le_bytes());
    b.extend_from_slice(&1_u32.to_le_bytes()); // EV_CURRENT
    b.extend_from_slice(&0_u64.to_le_bytes()); // e_entry
    b.extend_from_slice(&(EHDR as u64).to_le_bytes()); // e_phoff
    b.extend_from_slice(&0_u64.to_le_bytes()); // e_shoff
    b.extend_from_slice(&0_u32.to_le_bytes()); // e_flags
    for half in [EHDR as u16, PHDR as u16, 2, 64, 0, 0] {
        b.extend_from_slice(&half.to_le_bytes());
    }
    let phdr = |b: &mut Vec<u8>, p_type: u32, off: u64, len: u64| {
        b.extend_from_slice(&p_type.to_le_bytes());
        b.extend_from_slice(&4_u32.to_le_bytes()); // PF_R
        for v in [off, VADDR + off, VADDR + off, len, len, 8] {
            b.extend_from_slice(&v.to_le_bytes());
        }
    };
    phdr(&mut b, elf::PT_LOAD, 0, total as u64);
    phdr(&mut b, elf::PT_DYNAMIC, dyn_off as u64, dyn_len as u64);
    for (tag, val) in dyns {
        b.extend_from_slice(&tag.to_le_bytes());
        b.extend_from_slice(&val.to_le_bytes());
    }
    b.extend_from_slice(&strtab);
    assert_eq!(b.len(), total);
    b
}

/// The 24-byte entries and string table of a new-format cache, strings relative to its header.
fn new_cache(entries: &[(&str, &str)]) -> Vec<u8> {
    let strings_start = NEW_HEADER_LEN + entries.len() * NEW_ENTRY_LEN;
    let mut strings = Vec::new();
    let mut table = Vec::new();
    for (key, value) in entries {
        let k = strings_start + strings.len();
        strings.extend_from_slice(key.as_bytes());
        strings.push(0);
        let v = strings_start + strings.len();
        strings.extend_from_slice(value.as_bytes());
        strings.push(0);
        table.extend_from_slice(&0x0303_i32.to_ne_bytes()); // FLAG_ELF_LIBC6 | FLAG_X8664_LIB64
        table.extend_from_slice(&(k as u32).to_ne_bytes());
        table.extend_from_slice(&(v as u32).to_ne_bytes());
        table.extend_from_slice(&0_u32.to_ne_bytes());
        table.extend_from_slice(&0_u64.to_ne_bytes());
    }
    let mut b = NEW_MAGIC.to_vec();
    b.extend_from_slice(&(entries.len() as u32).to_ne_bytes());
    b.extend_from_slice(&(strings.len() as u32).to_ne_bytes());
    b.push(NEW_FLAGS_ENDIAN_OURS);
    b.extend_from_slice(&[0; 3]);
    b.extend_from_slice(&[0; 16]); // extension_offset, unused[3]
    assert_eq!(b.len(), NEW_HEADER_LEN);
    b.extend_from_slice(&table);
    b.extend_from_slice(&strings);
    b
}

/// An old-format cache (`old` entries, strings after the table) with `new` embedded after its
/// table, as glibc's ldconfig writes in "compat" mode.
fn compat_cache(old: &[(&str, &str)], new: Option<&[(&str, &str)]>) -> Vec<u8> {
    let mut b = OLD_MAGIC.to_vec();
    b.push(0);
    b.extend_from_slice(&(old.len() as u32).to_ne_bytes());
    let table_end = OLD_HEADER_LEN + old.len() * OLD_ENTRY_LEN;
    let embedded = new.map(new_cache).unwrap_or_default();
    let pad = table_end.next_multiple_of(8) - table_end;
    // Old strings come after the embedded new cache; offsets are relative to the table's end.
    let mut strings = Vec::new();
    let first = pad + embedded.len();
    for (key, value) in old {
        let k = first + strings.len();
        strings.extend_from_slice(key.as_bytes());
        strings.push(0);
        let v = first + strings.len();
        strings.extend_from_slice(value.as_bytes());
        strings.push(0);
        b.extend_from_slice(&1_i32.to_ne_bytes());
        b.extend_from_slice(&(k as u32).to_ne_bytes());
        b.extend_from_slice(&(v as u32).to_ne_bytes());
    }
    b.resize(table_end + pad, 0);
    b.extend_from_slice(&embedded);
    b.extend_from_slice(&strings);
    b
}

fn owned(entries: &[(&str, &str)]) -> Vec<(String, String)> {
    entries
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

#[test]
fn parses_this_machines_ld_so_cache() {
    let Ok(bytes) = fs::read("/etc/ld.so.cache") else {
        eprintln!("skipped: this machine has no /etc/ld.so.cache");
        return;
    };
    let entries = parse_ld_so_cache(&bytes);
    let libc = entries.iter().find(|(soname, _)| soname == "libc.so.6");
    let Some((_, path)) = libc else {
        panic!(
            "libc.so.6 not among {} entries of /etc/ld.so.cache",
            entries.len()
        );
    };
    assert!(
        Path::new(path).exists(),
        "ld.so.cache names {path}, which does not exist"
    );
}

#[test]
fn parses_new_format() {
    let entries = [
        ("libcuda.so.1", "/usr/lib/x86_64-linux-gnu/libcuda.so.1"),
        ("libc.so.6", "/lib/x86_64-linux-gnu/libc.so.6"),
    ];
    assert_eq!(parse_ld_so_cache(&new_cache(&entries)), owned(&entries));
    assert!(parse_ld_so_cache(&new_cache(&[])).is_empty());
}

#[test]
fn parses_old_format_followed_by_new() {
    let old = [("libold.so.1", "/old/libold.so.1")];
    let new = [
        ("libcuda.so.1", "/usr/lib64/libcuda.so.1"),
        ("libm.so.6", "/lib64/libm.so.6"),
    ];
    // One old entry: the table ends at 28, so the new cache starts padded at 32.
    assert_eq!(
        parse_ld_so_cache(&compat_cache(&old, Some(&new))),
        owned(&new)
    );
    // Two old entries end the table at 40, already aligned.
    let old2 = [("a.so", "/a.so"), ("b.so", "/b.so")];
    assert_eq!(
        parse_ld_so_cache(&compat_cache(&old2, Some(&new))),
        owned(&new)
    );
    // Old only: its own entries.
    assert_eq!(parse_ld_so_cache(&compat_cache(&old2, None)), owned(&old2));
}

#[test]
fn rejects_a_cache_of_the_other_byte_order_and_garbage() {
    let mut bytes = new_cache(&[("libcuda.so.1", "/x/libcuda.so.1")]);
    bytes[28] = (bytes[28] & !NEW_FLAGS_ENDIAN_MASK) | (5 - NEW_FLAGS_ENDIAN_OURS);
    assert!(parse_ld_so_cache(&bytes).is_empty());
    // Endianness unset (ldconfig before glibc 2.33) is accepted.
    bytes[28] &= !NEW_FLAGS_ENDIAN_MASK;
    assert_eq!(parse_ld_so_cache(&bytes).len(), 1);
    assert!(parse_ld_so_cache(b"").is_empty());
    assert!(parse_ld_so_cache(NEW_MAGIC).is_empty());
    assert!(parse_ld_so_cache(b"ld.so-1.7.0\0\xff\xff\xff\xff").is_empty());
    // nlibs far beyond the data: only what fits is read, and nothing fits.
    let mut huge = new_cache(&[]);
    huge[20..24].copy_from_slice(&u32::MAX.to_ne_bytes());
    assert!(parse_ld_so_cache(&huge).is_empty());
}

proptest! {
    #[test]
    fn garbage_ld_so_cache_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = parse_ld_so_cache(&bytes);
    }

    #[test]
    fn garbage_after_a_magic_never_panics(
        old in any::<bool>(),
        rest in proptest::collection::vec(any::<u8>(), 0..512),
    ) {
        let mut bytes = if old { OLD_MAGIC.to_vec() } else { NEW_MAGIC.to_vec() };
        bytes.extend_from_slice(&rest);
        let _ = parse_ld_so_cache(&bytes);
    }

    #[test]
    fn corrupted_real_caches_never_panic(
        at in any::<prop::sample::Index>(),
        value in any::<u8>(),
        compat in any::<bool>(),
    ) {
        let new = [("libcuda.so.1", "/usr/lib64/libcuda.so.1")];
        let mut bytes = if compat {
            compat_cache(&[("x.so", "/x.so")], Some(&new))
        } else {
            new_cache(&new)
        };
        let i = at.index(bytes.len());
        bytes[i] = value;
        let _ = parse_ld_so_cache(&bytes);
    }

    #[test]
    fn garbage_maps_lines_never_panic(line in proptest::collection::vec(any::<u8>(), 0..200)) {
        let _ = parse_maps_line(&line);
    }
}

#[test]
fn resolves_absolute_symlinks_inside_the_root() {
    let fake = Fake::new("resolve");
    fake.lib("/real/lib/libcuda.so.1");
    // An absolute link that, followed on the host, would leave the fake root.
    fake.link("/usr/lib/libcuda.so.1", "/real/lib/libcuda.so.1");
    fake.link("/lib", "usr/lib");
    fake.link("/up", "../../../../../real");
    let got = resolve_in_root(&fake.root, Path::new("/lib/libcuda.so.1")).unwrap();
    assert_eq!(got, Path::new("/real/lib/libcuda.so.1"));
    // `..` at the root stays at the root.
    let got = resolve_in_root(&fake.root, Path::new("/up/lib/../lib/./libcuda.so.1")).unwrap();
    assert_eq!(got, Path::new("/real/lib/libcuda.so.1"));
    assert_eq!(
        resolve_in_root(&fake.root, Path::new("/")).unwrap(),
        Path::new("/")
    );
    assert!(resolve_in_root(&fake.root, Path::new("/real/missing")).is_err());

    fake.link("/loop/a", "/loop/b");
    fake.link("/loop/b", "a");
    let err = resolve_in_root(&fake.root, Path::new("/loop/a")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ELOOP));
}

#[test]
fn mapped_libraries_come_first_and_deleted_ones_are_skipped() {
    let fake = Fake::new("mapped");
    fake.lib("/usr/lib/x86_64-linux-gnu/libcuda.so.550.54.15");
    fake.lib("/venv/nvidia/cuda_runtime/lib/libcudart.so.12");
    fake.lib("/old/libcuda.so.1");
    fake.maps(&[
        ("r--p", "/usr/lib/x86_64-linux-gnu/libcuda.so.550.54.15"),
        ("r-xp", "/usr/lib/x86_64-linux-gnu/libcuda.so.550.54.15"),
        ("r-xp", "/venv/nvidia/cuda_runtime/lib/libcudart.so.12"),
        ("r-xp", "/old/libcuda.so.1 (deleted)"),
        ("rw-s", "/dev/nvidia0"),
    ]);
    // The cache names the mapped driver through its soname link: one entry, Mapped.
    fake.link(
        "/usr/lib/x86_64-linux-gnu/libcuda.so.1",
        "libcuda.so.550.54.15",
    );
    fake.file(
        "/etc/ld.so.cache",
        &new_cache(&[("libcuda.so.1", "/usr/lib/x86_64-linux-gnu/libcuda.so.1")]),
    );
    let libs = fake.find();
    assert_eq!(
        summary(&libs),
        [
            (
                LibKind::Driver,
                "/usr/lib/x86_64-linux-gnu/libcuda.so.550.54.15".into(),
                Source::Mapped
            ),
            (
                LibKind::Runtime,
                "/venv/nvidia/cuda_runtime/lib/libcudart.so.12".into(),
                Source::Mapped
            ),
        ]
    );
    let md = fs::metadata(fake.host("/usr/lib/x86_64-linux-gnu/libcuda.so.550.54.15")).unwrap();
    assert_eq!((libs[0].dev, libs[0].ino), (md.dev(), md.ino()));
    assert_eq!(
        libs[0].path,
        fake.host("/usr/lib/x86_64-linux-gnu/libcuda.so.550.54.15")
    );
}

#[test]
fn predicts_from_ld_library_path() {
    let fake = Fake::new("ldpath");
    fake.lib("/opt/cuda/lib64/libcuda.so.1");
    fake.lib("/opt/cuda/lib64/libcudart.so.12.4.127");
    fake.link("/opt/cuda/lib64/libcudart.so.12", "libcudart.so.12.4.127");
    fake.link("/opt/cuda/lib64/libcudart.so", "libcudart.so.12");
    fake.lib("/opt/cuda/lib64/libcudart_static.a");
    fake.environ(&[
        "PATH=/usr/bin",
        "LD_LIBRARY_PATH=/nonexistent::/opt/cuda/lib64",
        "HOME=/root",
    ]);
    assert_eq!(
        summary(&fake.find()),
        [
            (
                LibKind::Driver,
                "/opt/cuda/lib64/libcuda.so.1".into(),
                Source::LdLibraryPath
            ),
            (
                LibKind::Runtime,
                "/opt/cuda/lib64/libcudart.so.12.4.127".into(),
                Source::LdLibraryPath
            ),
        ]
    );
}

#[test]
fn predicts_from_runpath_with_origin_of_the_executable_and_of_mapped_objects() {
    let fake = Fake::new("runpath");
    fake.file("/app/bin/app", &elf_object(None, Some("$ORIGIN/../lib")));
    fake.exe("/app/bin/app");
    fake.lib("/app/lib/libcuda.so.1");
    let torch = "/py/site-packages/torch/lib/libtorch_cuda.so";
    fake.file(
        torch,
        &elf_object(
            None,
            Some("${ORIGIN}/../../nvidia/cuda_runtime/lib:$ORIGIN"),
        ),
    );
    fake.lib("/py/site-packages/nvidia/cuda_runtime/lib/libcudart.so.12");
    // Data files and devices are mapped too; they are neither read nor opened as objects.
    fake.file("/models/weights.safetensors", b"not an object");
    fake.maps(&[
        ("r-xp", "/app/bin/app"),
        ("r--p", torch),
        ("r-xp", torch),
        ("r--s", "/models/weights.safetensors"),
    ]);
    assert_eq!(
        summary(&fake.find()),
        [
            (
                LibKind::Driver,
                "/app/lib/libcuda.so.1".into(),
                Source::RunPath
            ),
            (
                LibKind::Runtime,
                "/py/site-packages/nvidia/cuda_runtime/lib/libcudart.so.12".into(),
                Source::RunPath
            ),
        ]
    );
}

#[test]
fn rpath_comes_before_ld_library_path_and_is_ignored_beside_runpath() {
    let fake = Fake::new("rpath");
    fake.file("/bin/app", &elf_object(Some("/r1"), None));
    fake.exe("/bin/app");
    fake.file("/lib/both.so", &elf_object(Some("/r2"), Some("/u2")));
    fake.maps(&[("r-xp", "/bin/app"), ("r-xp", "/lib/both.so")]);
    fake.environ(&["LD_LIBRARY_PATH=/l1"]);
    for dir in ["/r1", "/r2", "/l1", "/u2"] {
        fake.lib(&format!("{dir}/libcuda.so.1"));
    }
    assert_eq!(
        summary(&fake.find()),
        [
            (LibKind::Driver, "/r1/libcuda.so.1".into(), Source::RunPath),
            (
                LibKind::Driver,
                "/l1/libcuda.so.1".into(),
                Source::LdLibraryPath
            ),
            (LibKind::Driver, "/u2/libcuda.so.1".into(), Source::RunPath),
        ]
    );
}

#[test]
fn cache_then_default_dirs_inside_the_root_only_for_this_machine() {
    let fake = Fake::new("cache");
    fake.lib("/usr/local/cuda/compat/libcuda.so.1");
    // A 32-bit driver, listed in the cache of a multiarch system: never loaded by our targets.
    let mut i386 = elf_object(None, None);
    i386[4] = elf::ELFCLASS32;
    fake.file("/usr/lib/i386-linux-gnu/libcuda.so.1", &i386);
    // A text file with the soname (a linker script, a broken install).
    fake.file("/broken/libcuda.so.1", b"INPUT(-lcuda)");
    fake.file(
        "/etc/ld.so.cache",
        &new_cache(&[
            ("libcuda.so.1", "/usr/local/cuda/compat/libcuda.so.1"),
            ("libcuda.so.1", "/usr/lib/i386-linux-gnu/libcuda.so.1"),
            ("libcuda.so.1", "/broken/libcuda.so.1"),
            ("libcudart.so.11.0", "/usr/lib64/libcudart.so.11.0"),
            ("libc.so.6", "/usr/lib64/libc.so.6"),
        ]),
    );
    fake.lib("/usr/lib64/libcudart.so.11.0");
    fake.lib("/usr/lib64/libcuda.so.1");
    fake.lib("/usr/lib64/libcudart.so.13");
    // Merged /usr with an absolute link: followed inside the root, scanned once.
    fake.link("/lib64", "/usr/lib64");
    assert_eq!(
        summary(&fake.find()),
        [
            (
                LibKind::Driver,
                "/usr/local/cuda/compat/libcuda.so.1".into(),
                Source::LdSoCache
            ),
            (
                LibKind::Runtime,
                "/usr/lib64/libcudart.so.11.0".into(),
                Source::LdSoCache
            ),
            (
                LibKind::Driver,
                "/usr/lib64/libcuda.so.1".into(),
                Source::DefaultDir
            ),
            (
                LibKind::Runtime,
                "/usr/lib64/libcudart.so.13".into(),
                Source::DefaultDir
            ),
        ]
    );
}

#[test]
fn dedupes_by_inode_and_follows_absolute_links_inside_the_root() {
    let fake = Fake::new("dedupe");
    let real = fake.lib("/a/libcuda.so.1");
    fs::create_dir_all(fake.host("/b")).unwrap();
    fs::hard_link(&real, fake.host("/b/libcuda.so.1")).unwrap();
    // `/c/libcuda.so.1` → `/real/libcuda.so.1`: absolute, so it must resolve in the root (there is
    // no /real on the host side, or if there is, it is not this file).
    fake.lib("/real/libcuda.so.1");
    fake.link("/c/libcuda.so.1", "/real/libcuda.so.1");
    fake.environ(&["LD_LIBRARY_PATH=/a:/b:/c:/real"]);
    let libs = fake.find();
    assert_eq!(
        summary(&libs),
        [
            (
                LibKind::Driver,
                "/a/libcuda.so.1".into(),
                Source::LdLibraryPath
            ),
            (
                LibKind::Driver,
                "/real/libcuda.so.1".into(),
                Source::LdLibraryPath
            ),
        ]
    );
    assert_eq!(libs[1].path, fake.host("/real/libcuda.so.1"));
}

#[test]
fn missing_pieces_give_an_empty_list() {
    let fake = Fake::new("empty");
    assert!(fake.find().is_empty());
    let gone = Path::new("/nonexistent/llm-probe");
    assert!(find_cuda_libs_in(gone, gone).is_empty());
}

#[test]
fn reads_runpath_of_a_cc_built_object() {
    let dir = TempDir::new("cc");
    let (src, out) = (dir.0.join("t.c"), dir.0.join("libt.so"));
    fs::write(&src, "int t(void) { return 1; }\n").unwrap();
    let built = Command::new("cc")
        .args([
            "-shared",
            "-fPIC",
            "-Wl,-rpath,$ORIGIN/../lib",
            "-Wl,--enable-new-dtags",
            "-o",
        ])
        .arg(&out)
        .arg(&src)
        .output();
    match built {
        Ok(o) if o.status.success() => {}
        Ok(o) => {
            eprintln!("skipped: cc failed: {}", String::from_utf8_lossy(&o.stderr));
            return;
        }
        Err(e) => {
            eprintln!("skipped: no cc: {e}");
            return;
        }
    }
    let (rpath, runpath) = read_search_paths(&out).expect("cc's output has a dynamic section");
    assert!(rpath.is_empty(), "{rpath:?}");
    assert_eq!(runpath, ["$ORIGIN/../lib"]);

    // And it counts as a mapped object's RUNPATH.
    let fake = Fake::new("ccmapped");
    fake.file("/pkg/torch/libt.so", &fs::read(&out).unwrap());
    fake.lib("/pkg/lib/libcudart.so.12");
    fake.maps(&[("r-xp", "/pkg/torch/libt.so")]);
    assert_eq!(
        summary(&fake.find()),
        [(
            LibKind::Runtime,
            "/pkg/lib/libcudart.so.12".into(),
            Source::RunPath
        )]
    );
}

#[test]
fn this_process_has_no_mapped_cuda_and_does_not_panic() {
    let libs = find_cuda_libs(std::process::id());
    eprintln!("this process: {libs:?}");
    assert!(libs.iter().all(|l| l.how != Source::Mapped), "{libs:?}");
    assert!(libs.iter().all(|l| l.path.is_file()), "{libs:?}");
}

#[test]
fn parses_maps_lines() {
    let m = parse_maps_line(
        b"7f1c2a000000-7f1c2a200000 r-xp 00001000 fd:01 393217                     /opt/my dir/libcuda.so.1",
    )
    .unwrap();
    assert_eq!(
        (m.range.as_str(), m.exec),
        ("7f1c2a000000-7f1c2a200000", true)
    );
    assert_eq!(m.path, Path::new("/opt/my dir/libcuda.so.1"));
    assert!(parse_maps_line(b"7ffd-7ffe r--p 00000000 00:00 0                  [vvar]").is_none());
    assert!(parse_maps_line(b"7ffd-7ffe rw-p 00000000 00:00 0").is_none());
    assert!(parse_maps_line(b"7ffd-7ffe r-xp 0 fd:01 5 /x/libcuda.so.1 (deleted)").is_none());
    assert!(
        !parse_maps_line(b"1-2 r--p 0 fd:01 5 /x/libcuda.so.1")
            .unwrap()
            .exec
    );
}

#[test]
fn expands_origin_and_leaves_out_what_it_cannot() {
    let o = Some(Path::new("/app/lib"));
    let e = |s| expand_origin(s, o);
    assert_eq!(
        e("$ORIGIN/../nvidia"),
        Some(PathBuf::from("/app/lib/../nvidia"))
    );
    assert_eq!(e("${ORIGIN}"), Some(PathBuf::from("/app/lib")));
    assert_eq!(e("/usr/lib"), Some(PathBuf::from("/usr/lib")));
    assert_eq!(e("$ORIGINAL/x"), None);
    assert_eq!(e("/usr/$LIB"), None);
    assert_eq!(e("$PLATFORM/x"), None);
    assert_eq!(e(""), None);
    assert_eq!(e("relative/dir"), None);
    assert_eq!(expand_origin("$ORIGIN", None), None);
}

#[test]
fn names_of_cuda_libraries() {
    for name in [
        "libcudart.so.12",
        "libcudart.so.11.0",
        "libcudart.so.13",
        "libcudart.so.12.4.127",
    ] {
        assert!(is_versioned_cudart(name), "{name}");
    }
    for name in [
        "libcudart.so",
        "libcudart.so.",
        "libcudart.so.12.",
        "libcudart.so.x",
        "libcudart_static.a",
    ] {
        assert!(!is_versioned_cudart(name), "{name}");
    }
    let kind = |n: &str| mapped_kind(OsStr::new(n));
    assert_eq!(kind("libcuda.so.1"), Some(LibKind::Driver));
    assert_eq!(kind("libcuda.so"), Some(LibKind::Driver));
    assert_eq!(kind("libcuda.so.550.54.15"), Some(LibKind::Driver));
    assert_eq!(kind("libcudart.so.12"), Some(LibKind::Runtime));
    assert_eq!(kind("libcudadebugger.so.1"), None);
    assert_eq!(kind("libcudnn.so.9"), None);
}

/// A target swaps its library path between a file in its root and paths that lead out of it
/// (an absolute link to a host library, `..` climbing past its root, a `/proc` magic link) while
/// the agent opens it: every open that succeeds is the file inside the root, never the host's.
#[test]
fn a_swapped_symlink_never_opens_a_file_outside_the_root() {
    use std::sync::{atomic::AtomicBool, Arc};

    let fake = Fake::new("swap");
    let dir = fake.host("/usr/lib");
    fs::create_dir_all(&dir).unwrap();
    let inside = dir.join("libcuda.so.real");
    fs::write(&inside, b"\x7fELF inside the target").unwrap();
    let want = fs::metadata(&inside).unwrap();
    // A host file the target must not reach: this test's own executable.
    let host_file = std::env::current_exe().unwrap();
    let outside = fs::metadata(&host_file).unwrap();
    let link = dir.join("libcuda.so.1");
    let escapes = [
        host_file.clone(),
        PathBuf::from(format!("../../../../../../..{}", host_file.display())),
        PathBuf::from(format!("/proc/self/root{}", host_file.display())),
    ];
    let stop = Arc::new(AtomicBool::new(false));
    let swapper = {
        let (stop, link, escapes) = (stop.clone(), link.clone(), escapes.clone());
        std::thread::spawn(move || {
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                let tmp = link.with_extension("tmp");
                let target = if i % 2 == 0 {
                    PathBuf::from("libcuda.so.real")
                } else {
                    escapes[(i / 2) % escapes.len()].clone()
                };
                let _ = fs::remove_file(&tmp);
                let _ = symlink(&target, &tmp);
                let _ = fs::rename(&tmp, &link);
                i += 1;
            }
        })
    };
    let root_dir = File::open(&fake.root).unwrap();
    let (mut opened, mut refused) = (0, 0);
    // At least 5,000 opens, and more (for up to 20 s) until both outcomes were seen: on a busy
    // 2-core machine the swapper thread may not run at all during the first 5,000.
    let start = std::time::Instant::now();
    let mut n = 0;
    while n < 5_000
        || ((opened == 0 || refused == 0) && start.elapsed() < std::time::Duration::from_secs(20))
    {
        n += 1;
        // The resolver's view of the path may be stale by now: open what the path says.
        match open_in_root(&root_dir, &fake.root, Path::new("/usr/lib/libcuda.so.1")) {
            Ok(f) => {
                let md = f.metadata().unwrap();
                assert_ne!(
                    (md.dev(), md.ino()),
                    (outside.dev(), outside.ino()),
                    "opened the host's file"
                );
                assert_eq!((md.dev(), md.ino()), (want.dev(), want.ino()));
                opened += 1;
            }
            Err(_) => refused += 1,
        }
    }
    stop.store(true, Ordering::Relaxed);
    swapper.join().unwrap();
    assert!(
        opened > 0 && refused > 0,
        "opened {opened}, refused {refused}"
    );
}
