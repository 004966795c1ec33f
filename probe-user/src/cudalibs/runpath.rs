//! `DT_RPATH` / `DT_RUNPATH` of an ELF object, read through a `ReadCache` so that only the headers,
//! the dynamic segment and its strings are read (not a 1 GiB `libtorch_cuda.so`).

use std::{fs::File, path::Path};

use object::{
    elf,
    read::elf::{Dyn, FileHeader, ProgramHeader},
    Endianness, FileKind, ReadCache, ReadRef,
};

/// Largest `PT_DYNAMIC` segment we read; real ones are a few hundred bytes to a few KiB.
const MAX_DYNAMIC_BYTES: u64 = 1 << 20;

/// `DT_RPATH` and `DT_RUNPATH` strings of the ELF object at `path`, unexpanded; `None` if it is
/// not an ELF object or cannot be read. Only the headers, the dynamic segment and the strings are
/// read: `libtorch_cuda.so` is over 1 GiB.
pub(crate) fn read_search_paths(path: &Path) -> Option<(Vec<String>, Vec<String>)> {
    let file = File::open(path).ok()?;
    let cache = ReadCache::new(file);
    let paths = match FileKind::parse(&cache) {
        Ok(FileKind::Elf64) => dynamic_paths::<elf::FileHeader64<Endianness>, _>(&cache),
        Ok(FileKind::Elf32) => dynamic_paths::<elf::FileHeader32<Endianness>, _>(&cache),
        _ => None,
    };
    if paths.is_none() {
        log::debug!("{}: no readable ELF dynamic section", path.display());
    }
    paths
}

fn dynamic_paths<'data, Elf, R>(data: R) -> Option<(Vec<String>, Vec<String>)>
where
    Elf: FileHeader<Endian = Endianness>,
    R: ReadRef<'data>,
{
    let header = Elf::parse(data).ok()?;
    let endian = header.endian().ok()?;
    let phdrs = header.program_headers(endian, data).ok()?;
    let Some(dynamic_phdr) = phdrs.iter().find(|p| p.p_type(endian) == elf::PT_DYNAMIC) else {
        // A static executable: no search paths, but nothing wrong either.
        return Some((Vec::new(), Vec::new()));
    };
    if dynamic_phdr.p_filesz(endian).into() > MAX_DYNAMIC_BYTES {
        return None;
    }
    let dynamic = dynamic_phdr.dynamic(endian, data).ok()??;

    let (mut strtab, mut rpath, mut runpath) = (None, Vec::new(), Vec::new());
    for d in dynamic {
        match d.tag(endian) {
            elf::DT_NULL => break,
            elf::DT_STRTAB => strtab = Some(d.val(endian)),
            elf::DT_RPATH => rpath.push(d.val(endian)),
            elf::DT_RUNPATH => runpath.push(d.val(endian)),
            _ => {}
        }
    }
    if rpath.is_empty() && runpath.is_empty() {
        return Some((Vec::new(), Vec::new()));
    }
    // DT_STRTAB holds an address: find the PT_LOAD segment that maps it from the file.
    let strtab = strtab?;
    let strtab_offset = phdrs.iter().find_map(|p| {
        let vaddr: u64 = p.p_vaddr(endian).into();
        let filesz: u64 = p.p_filesz(endian).into();
        let inside = p.p_type(endian) == elf::PT_LOAD && strtab >= vaddr && strtab - vaddr < filesz;
        // The target wrote these numbers: an offset past u64 is a lie, not a wrap.
        inside
            .then(|| p.p_offset(endian).into().checked_add(strtab - vaddr))
            .flatten()
    })?;
    let len = data.len().ok()?;
    let string = |offset: u64| -> Option<String> {
        let start = strtab_offset.checked_add(offset)?;
        let bytes = data.read_bytes_at_until(start..len, 0).ok()?;
        String::from_utf8(bytes.to_vec()).ok()
    };
    Some((
        rpath.into_iter().filter_map(string).collect(),
        runpath.into_iter().filter_map(string).collect(),
    ))
}
