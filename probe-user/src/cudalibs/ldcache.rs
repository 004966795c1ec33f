//! glibc's `/etc/ld.so.cache` (`elf/cache.c`, `sysdeps/generic/dl-cache.h`): soname → path, as the
//! dynamic loader looks names up. Pure and bounded: garbage gives an empty list, never a panic.

/// `struct cache_file` of glibc's `sysdeps/generic/dl-cache.h`: magic, `nlibs`, then 12-byte
/// `struct file_entry { int32 flags; uint32 key, value; }` whose strings are relative to the end
/// of the entries.
pub(crate) const OLD_MAGIC: &[u8] = b"ld.so-1.7.0";
pub(crate) const OLD_HEADER_LEN: usize = 16;
pub(crate) const OLD_ENTRY_LEN: usize = 12;
/// `struct cache_file_new`: magic and version, `nlibs`, `len_strings`, `flags`, padding,
/// `extension_offset`, `unused[3]`, then 24-byte `struct file_entry_new` (flags, key, value,
/// osversion, hwcap) whose strings are relative to the start of this header (glibc
/// `elf/dl-cache.c`: `cache_data = (const char *) cache_new`).
pub(crate) const NEW_MAGIC: &[u8] = b"glibc-ld.so.cache1.1";
pub(crate) const NEW_HEADER_LEN: usize = 48;
pub(crate) const NEW_ENTRY_LEN: usize = 24;
/// `flags` of the new header: the low two bits give the byte order `ldconfig` wrote
/// (`cache_file_new_flags_endian_*`: 0 unset, 1 invalid, 2 little, 3 big).
pub(crate) const NEW_FLAGS_ENDIAN_MASK: u8 = 3;
pub(crate) const NEW_FLAGS_ENDIAN_OURS: u8 = if cfg!(target_endian = "little") { 2 } else { 3 };

/// Longest string (soname or path) taken from a cache: `PATH_MAX`. A longer one is not a path;
/// without this, a crafted cache whose every entry points at one huge unterminated string would
/// make each entry copy it (a 1 MB cache took 640 MB).
pub(crate) const MAX_CACHE_STRING: usize = 4096;
/// Entries kept from one cache; a distribution's has ~2,000.
pub(crate) const MAX_CACHE_ENTRIES: usize = 16_384;

/// The `(soname, path)` entries of an `/etc/ld.so.cache` in glibc's format: the new
/// `glibc-ld.so.cache1.1` one, alone or after the old `ld.so-1.7.0` one (as glibc before 2.32
/// writes by default); an old-only cache is read too. Entries whose strings are not UTF-8, out of
/// bounds or over `MAX_CACHE_STRING` are skipped; at most `MAX_CACHE_ENTRIES` are kept; garbage
/// gives an empty list, never a panic.
pub fn parse_ld_so_cache(bytes: &[u8]) -> Vec<(String, String)> {
    parse_ld_so_cache_where(bytes, |_| true)
}

/// [`parse_ld_so_cache`], keeping only the entries whose soname `keep` accepts (checked before
/// anything is copied).
pub fn parse_ld_so_cache_where(bytes: &[u8], keep: impl Fn(&str) -> bool) -> Vec<(String, String)> {
    if bytes.starts_with(NEW_MAGIC) {
        return parse_new_cache(bytes, 0, &keep);
    }
    if !bytes.starts_with(OLD_MAGIC) {
        return Vec::new();
    }
    let Some(nlibs) = read_u32(bytes, 12) else {
        return Vec::new();
    };
    let Some(strings) = (nlibs as usize)
        .checked_mul(OLD_ENTRY_LEN)
        .and_then(|n| n.checked_add(OLD_HEADER_LEN))
        .filter(|&end| end <= bytes.len())
    else {
        return Vec::new();
    };
    // The new cache follows the old entries, aligned as `struct cache_file_new` (8 bytes:
    // glibc's ALIGN_CACHE).
    let embedded = strings.next_multiple_of(8);
    if bytes
        .get(embedded..)
        .is_some_and(|b| b.starts_with(NEW_MAGIC))
    {
        return parse_new_cache(bytes, embedded, &keep);
    }
    (0..nlibs as usize)
        .filter_map(|i| {
            let at = OLD_HEADER_LEN + i * OLD_ENTRY_LEN;
            let key = read_u32(bytes, at + 4)?;
            let value = read_u32(bytes, at + 8)?;
            entry(bytes, strings, key, value, &keep)
        })
        .take(MAX_CACHE_ENTRIES)
        .collect()
}

fn entry(
    bytes: &[u8],
    base: usize,
    key: u32,
    value: u32,
    keep: &impl Fn(&str) -> bool,
) -> Option<(String, String)> {
    let soname = cache_str(bytes, base, key)?;
    if !keep(soname) {
        return None;
    }
    Some((soname.to_owned(), cache_str(bytes, base, value)?.to_owned()))
}

fn parse_new_cache(
    bytes: &[u8],
    base: usize,
    keep: &impl Fn(&str) -> bool,
) -> Vec<(String, String)> {
    let Some(header) = bytes.get(base..).filter(|b| b.len() >= NEW_HEADER_LEN) else {
        return Vec::new();
    };
    let endian = header[28] & NEW_FLAGS_ENDIAN_MASK;
    if endian != 0 && endian != NEW_FLAGS_ENDIAN_OURS {
        // Written for the other byte order (or marked invalid): every offset would be wrong.
        return Vec::new();
    }
    let Some(nlibs) = read_u32(header, 20) else {
        return Vec::new();
    };
    // Entries that don't fit are garbage; bound the walk by the bytes present.
    let fit = (header.len() - NEW_HEADER_LEN) / NEW_ENTRY_LEN;
    (0..(nlibs as usize).min(fit))
        .filter_map(|i| {
            let at = NEW_HEADER_LEN + i * NEW_ENTRY_LEN;
            let key = read_u32(header, at + 4)?;
            let value = read_u32(header, at + 8)?;
            entry(header, 0, key, value, keep)
        })
        .take(MAX_CACHE_ENTRIES)
        .collect()
}

fn read_u32(bytes: &[u8], at: usize) -> Option<u32> {
    let b = bytes.get(at..at.checked_add(4)?)?;
    Some(u32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
}

/// The NUL-terminated UTF-8 string at `base + offset`, if it ends within `MAX_CACHE_STRING`.
fn cache_str(bytes: &[u8], base: usize, offset: u32) -> Option<&str> {
    let start = base.checked_add(offset as usize)?;
    let tail = bytes.get(start..)?;
    let len = tail
        .iter()
        .take(MAX_CACHE_STRING + 1)
        .position(|&b| b == 0)?;
    std::str::from_utf8(&tail[..len]).ok()
}

// Tests are long (fixture builders for ELF objects, caches and fake /proc trees): kept apart.
