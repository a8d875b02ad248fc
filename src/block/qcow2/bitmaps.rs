//! The bitmaps extension of qcow2 on disk (QEMU's `docs/interop/qcow2.txt`,
//! "Bitmaps extension" and "Bitmaps"): reading it with QEMU's checks and
//! error texts (`qcow2_read_extensions`, `bitmap_list_load`,
//! `check_dir_entry`, `bitmap_table_load`), loading a bitmap's bits, and
//! writing bitmaps back.
//!
//! Layout: a header extension (type `0x23852875`, 24 bytes) points at the
//! bitmap directory, one variable-size entry per bitmap; an entry points
//! at the bitmap's table, one 64-bit entry per cluster of bitmap data
//! (offset 0: the cluster reads as zeroes, or as ones with bit 0 set;
//! else where the cluster is); the data is the bits as QEMU serializes
//! them, little-endian 64-bit words (bit `i` is bit `i % 8` of byte
//! `i / 8`). The extension counts only while autoclear bit 0 is set.
//!
//! Everything here is plain I/O on the image's `file` node; the caller
//! ([`super::persistent`]) decides when, and keeps imago out of the way
//! while clusters are allocated ([`super::refcount`]).

use super::header::Qcow2Header;
use super::refcount::Refcounts;
use crate::bitmap::DirtyBitmap;
use crate::block::Node;
use crate::error::{Error, Result};

/// Header extension type of the bitmaps extension.
pub(crate) const EXT_BITMAPS: u32 = 0x2385_2875;
/// Autoclear bit 0: the bitmaps extension is valid.
pub(crate) const AUTOCLEAR_BITMAPS: u64 = 1;
/// Bitmap entry flag: not saved since last used (QEMU's `in-use`).
pub(crate) const FLAG_IN_USE: u32 = 1 << 0;
/// Bitmap entry flag: records writes (QEMU's `auto`, i.e. enabled).
pub(crate) const FLAG_AUTO: u32 = 1 << 1;

/// QEMU's limit on bitmaps in one image (`QCOW2_MAX_BITMAPS`).
pub(crate) const MAX_BITMAPS: u64 = 65535;
/// QEMU's limit on the directory (`QCOW2_MAX_BITMAP_DIRECTORY_SIZE`).
pub(crate) const MAX_DIRECTORY_SIZE: u64 = 1024 * MAX_BITMAPS;
// QEMU's limits on one bitmap (`BME_*`).
const MAX_TABLE_SIZE: u64 = 0x800_0000;
const MAX_PHYS_SIZE: u64 = 0x2000_0000;
const MIN_GRANULARITY_BITS: u32 = 9;
const MAX_GRANULARITY_BITS: u32 = 31;
const MAX_NAME_SIZE: usize = 1023;
/// Flags QEMU does not know (`extra_data_compatible` included): it
/// refuses such a bitmap, and so do we.
const RESERVED_FLAGS: u32 = !(FLAG_IN_USE | FLAG_AUTO);
/// The only bitmap type: dirty tracking.
const TYPE_DIRTY_TRACKING: u8 = 1;
const TABLE_ENTRY_RESERVED: u64 = 0xff00_0000_0000_01fe;
const TABLE_ENTRY_OFFSET: u64 = 0x00ff_ffff_ffff_fe00;
const TABLE_ENTRY_ALL_ONES: u64 = 1;
/// Fixed part of a directory entry.
const ENTRY_HEADER: usize = 24;
/// Size of the extension's data.
const EXT_SIZE: usize = 24;

/// The image facts the checks need.
#[derive(Debug, Clone, Copy)]
pub struct Geometry {
    /// Bytes per cluster.
    pub cluster_size: u64,
    /// Virtual size: what every bitmap covers.
    pub size: u64,
}

impl Geometry {
    /// The geometry of the image whose header is `hdr`.
    pub fn of(hdr: &Qcow2Header) -> Self {
        Geometry {
            cluster_size: hdr.cluster_size,
            size: hdr.size,
        }
    }

    /// Clusters of data of a bitmap of `granularity` (QEMU's table size:
    /// its serialization is whole 64-bit words).
    fn table_size(&self, granularity: u64) -> u64 {
        let words = self.size.div_ceil(granularity).div_ceil(64);
        (words * 8).div_ceil(self.cluster_size)
    }
}

/// The extension's fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BitmapsExt {
    /// Entries in the directory.
    pub nb_bitmaps: u32,
    /// Bytes of the directory.
    pub dir_size: u64,
    /// Where the directory starts (cluster-aligned).
    pub dir_offset: u64,
}

impl BitmapsExt {
    /// The extension's data as stored.
    pub fn to_bytes(self) -> Vec<u8> {
        let mut v = Vec::with_capacity(EXT_SIZE);
        v.extend_from_slice(&self.nb_bitmaps.to_be_bytes());
        v.extend_from_slice(&0u32.to_be_bytes());
        v.extend_from_slice(&self.dir_size.to_be_bytes());
        v.extend_from_slice(&self.dir_offset.to_be_bytes());
        v
    }
}

/// What the header says about bitmaps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Extension {
    /// No bitmaps extension.
    Absent,
    /// An extension without autoclear bit 0: written by a program that
    /// does not know bitmaps, so every bitmap in it is inconsistent, and
    /// QEMU ignores them (and drops the extension when it writes).
    Stale,
    /// A valid extension.
    Valid(BitmapsExt),
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// The bitmaps extension of `hdr` (the header parser checked it already,
/// in QEMU's order among the other extensions).
pub fn parse_extension(hdr: &Qcow2Header) -> Result<Extension> {
    // As QEMU, the last one counts if there are several.
    match hdr.extensions.iter().rev().find(|(t, _)| *t == EXT_BITMAPS) {
        None => Ok(Extension::Absent),
        Some((_, data)) => check_extension(data, hdr.autoclear_features, hdr.cluster_size),
    }
}

/// The data of a bitmaps extension, checked as QEMU's
/// `qcow2_read_extensions` checks it, with its texts.
pub fn check_extension(data: &[u8], autoclear: u64, cluster_size: u64) -> Result<Extension> {
    if data.len() != EXT_SIZE {
        return Err(Error::generic("bitmaps_ext: Invalid extension length"));
    }
    if autoclear & AUTOCLEAR_BITMAPS == 0 {
        return Ok(Extension::Stale);
    }
    let ext = BitmapsExt {
        nb_bitmaps: be32(data, 0),
        dir_size: be64(data, 8),
        dir_offset: be64(data, 16),
    };
    if be32(data, 4) != 0 {
        return Err(Error::generic("bitmaps_ext: Reserved field is not zero"));
    }
    if u64::from(ext.nb_bitmaps) > MAX_BITMAPS {
        return Err(Error::generic(format!(
            "bitmaps_ext: Image has {} bitmaps, exceeding the QEMU supported maximum of {MAX_BITMAPS}",
            ext.nb_bitmaps
        )));
    }
    if ext.nb_bitmaps == 0 {
        return Err(Error::generic("found bitmaps extension with zero bitmaps"));
    }
    if !ext.dir_offset.is_multiple_of(cluster_size) {
        return Err(Error::generic(
            "bitmaps_ext: invalid bitmap directory offset",
        ));
    }
    if ext.dir_size > MAX_DIRECTORY_SIZE {
        return Err(Error::generic(format!(
            "bitmaps_ext: bitmap directory size ({}) exceeds the maximum supported size ({MAX_DIRECTORY_SIZE})",
            ext.dir_size
        )));
    }
    Ok(Extension::Valid(ext))
}

/// The warning QEMU prints for [`Extension::Stale`].
pub fn stale_warning(version: u32) -> &'static str {
    if version < 3 {
        "This qcow2 v2 image contains bitmaps, but they may have been modified by a program \
         without persistent bitmap support; so now they must all be considered inconsistent"
    } else {
        "a program lacking bitmap support modified this file, so all bitmaps are now \
         considered inconsistent"
    }
}

/// One bitmap directory entry (its type is always dirty tracking and it
/// has no extra data: the loader refuses others, as QEMU does).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirEntry {
    /// Where the bitmap table starts (0 while a new bitmap has none).
    pub table_offset: u64,
    /// Entries of the bitmap table.
    pub table_size: u32,
    /// Bit 0: in-use (not saved since last used); bit 1: auto (records
    /// writes).
    pub flags: u32,
    /// Granularity is `1 << granularity_bits` bytes.
    pub granularity_bits: u32,
    /// The name (unique in the directory).
    pub name: String,
}

/// Bytes a directory entry with a `name_len`-byte name takes.
pub fn entry_size(name_len: usize) -> u64 {
    (ENTRY_HEADER + name_len).next_multiple_of(8) as u64
}

/// QEMU's `check_dir_entry`.
fn entry_ok(geo: &Geometry, e: &DirEntry, kind: u8, name_size: usize) -> bool {
    let fail = e.table_size == 0
        || e.table_offset == 0
        || !e.table_offset.is_multiple_of(geo.cluster_size)
        || u64::from(e.table_size) > MAX_TABLE_SIZE
        || e.granularity_bits > MAX_GRANULARITY_BITS
        || e.granularity_bits < MIN_GRANULARITY_BITS
        || e.flags & RESERVED_FLAGS != 0
        || name_size > MAX_NAME_SIZE
        || kind != TYPE_DIRTY_TRACKING;
    if fail {
        return false;
    }
    let phys = u64::from(e.table_size) * geo.cluster_size;
    if phys > MAX_PHYS_SIZE {
        return false;
    }
    // A bitmap saved properly covers the whole disk; one in use may be
    // out of date (e.g. saved before a resize), which is fine.
    e.flags & FLAG_IN_USE != 0
        || u128::from(geo.size) <= (u128::from(phys) * 8) << e.granularity_bits
}

/// A name as QEMU reads it (a C string of at most `name_size` bytes).
fn c_name(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

/// Read and check the directory `ext` points at (QEMU's
/// `bitmap_list_load`, its checks in its order and its texts).
pub fn read_directory(file: &Node, geo: &Geometry, ext: &BitmapsExt) -> Result<Vec<DirEntry>> {
    if ext.dir_size == 0 {
        return Err(Error::generic("Requested bitmap directory size is zero"));
    }
    if ext.dir_size > MAX_DIRECTORY_SIZE {
        return Err(Error::generic("Requested bitmap directory size is too big"));
    }
    let mut dir = vec![0u8; ext.dir_size as usize];
    file.pread(ext.dir_offset, &mut dir)
        .map_err(|e| e.prepend("Failed to read bitmap directory: "))?;
    let broken = || Error::generic("Broken bitmap directory");
    let mut entries = Vec::new();
    let mut pos = 0usize;
    while pos < dir.len() {
        if pos + ENTRY_HEADER > dir.len() {
            return Err(broken());
        }
        if entries.len() as u64 + 1 > u64::from(ext.nb_bitmaps) {
            return Err(Error::generic(
                "More bitmaps found than specified in header extension",
            ));
        }
        let e = &dir[pos..];
        let name_size = usize::from(u16::from_be_bytes([e[18], e[19]]));
        let extra_size = be32(e, 20) as usize;
        let size = (ENTRY_HEADER + name_size + extra_size).next_multiple_of(8);
        if size > dir.len() - pos {
            return Err(broken());
        }
        if extra_size != 0 {
            return Err(Error::generic("Bitmap extra data is not supported"));
        }
        let name_bytes = &e[ENTRY_HEADER..ENTRY_HEADER + name_size];
        let entry = DirEntry {
            table_offset: be64(e, 0),
            table_size: be32(e, 8),
            flags: be32(e, 12),
            granularity_bits: u32::from(e[17]),
            name: c_name(name_bytes),
        };
        if !entry_ok(geo, &entry, e[16], name_size) {
            return Err(Error::generic(format!(
                "Bitmap '{}' doesn't satisfy the constraints",
                entry.name
            )));
        }
        entries.push(entry);
        pos += size;
    }
    if entries.len() as u64 != u64::from(ext.nb_bitmaps) {
        return Err(Error::generic(
            "Less bitmaps found than specified in header extension",
        ));
    }
    Ok(entries)
}

/// The directory as stored: entries padded to 8 bytes, zeroes in the
/// padding.
pub fn serialize_directory(entries: &[DirEntry]) -> Vec<u8> {
    let mut v = Vec::new();
    for e in entries {
        let start = v.len();
        v.extend_from_slice(&e.table_offset.to_be_bytes());
        v.extend_from_slice(&e.table_size.to_be_bytes());
        v.extend_from_slice(&e.flags.to_be_bytes());
        v.push(TYPE_DIRTY_TRACKING);
        v.push(e.granularity_bits as u8);
        v.extend_from_slice(&(e.name.len() as u16).to_be_bytes());
        v.extend_from_slice(&0u32.to_be_bytes());
        v.extend_from_slice(e.name.as_bytes());
        v.resize(start + entry_size(e.name.len()) as usize, 0);
    }
    v
}

/// The extension for a directory of `entries` stored at `dir_offset`.
pub fn extension_for(entries: &[DirEntry], dir_offset: u64) -> BitmapsExt {
    BitmapsExt {
        nb_bitmaps: entries.len() as u32,
        dir_size: entries.iter().map(|e| entry_size(e.name.len())).sum(),
        dir_offset,
    }
}

/// QEMU's `check_table_entry`.
fn table_entry_ok(entry: u64, cluster_size: u64) -> bool {
    if entry & TABLE_ENTRY_RESERVED != 0 {
        return false;
    }
    let offset = entry & TABLE_ENTRY_OFFSET;
    offset == 0 || (entry & TABLE_ENTRY_ALL_ONES == 0 && offset.is_multiple_of(cluster_size))
}

/// The bitmap table of `e`, every entry checked (`EINVAL` otherwise).
fn read_table(file: &Node, geo: &Geometry, e: &DirEntry) -> Result<Vec<u64>> {
    let mut buf = vec![0u8; e.table_size as usize * 8];
    file.pread(e.table_offset, &mut buf)?;
    let table: Vec<u64> = buf.chunks_exact(8).map(|c| be64(c, 0)).collect();
    if table.iter().any(|t| !table_entry_ok(*t, geo.cluster_size)) {
        return Err(Error::from_errno(libc::EINVAL));
    }
    Ok(table)
}

/// The bits of the bitmap `e` describes (QEMU's `load_bitmap`): empty for
/// an in-use bitmap, whose data is not to be trusted.
pub fn load_bits(file: &Node, geo: &Geometry, e: &DirEntry) -> Result<DirtyBitmap> {
    let granularity = 1u64 << e.granularity_bits;
    let bits = DirtyBitmap::new(geo.size, granularity)?;
    if e.flags & FLAG_IN_USE != 0 {
        return Ok(bits);
    }
    let table = read_table(file, geo, e).map_err(|err| {
        err.prepend(format!(
            "Could not read bitmap_table table from image for bitmap '{}': ",
            e.name
        ))
    })?;
    let read_err =
        |err: Error| err.prepend(format!("Could not read bitmap '{}' from image: ", e.name));
    let tab_size = geo.table_size(granularity);
    if tab_size != table.len() as u64 || tab_size > MAX_TABLE_SIZE {
        return Err(read_err(Error::from_errno(libc::EINVAL)));
    }
    // One cluster of data holds this many words, covering `bits_per`
    // granules.
    let words_per = (geo.cluster_size / 8) as usize;
    let bits_per = geo.cluster_size * 8;
    let mut buf = vec![0u8; geo.cluster_size as usize];
    for (i, entry) in table.iter().enumerate() {
        let offset = entry & TABLE_ENTRY_OFFSET;
        if offset == 0 {
            if entry & TABLE_ENTRY_ALL_ONES != 0 {
                let first = i as u64 * bits_per;
                bits.set_range(first * granularity, bits_per * granularity);
            }
            continue;
        }
        file.pread(offset, &mut buf).map_err(read_err)?;
        bits.deserialize_words_or(i * words_per, &buf);
    }
    Ok(bits)
}

/// QEMU's `check_constraints_on_bitmap`: can a bitmap `name` of
/// `granularity` be stored in this image?
pub fn check_constraints(geo: &Geometry, name: &str, granularity: u64) -> Result<()> {
    let bits = granularity.trailing_zeros();
    if bits > MAX_GRANULARITY_BITS {
        return Err(Error::generic(format!(
            "Granularity exceeds maximum ({} bytes)",
            1u64 << MAX_GRANULARITY_BITS
        )));
    }
    if bits < MIN_GRANULARITY_BITS {
        return Err(Error::generic(format!(
            "Granularity is under minimum ({} bytes)",
            1u64 << MIN_GRANULARITY_BITS
        )));
    }
    let bytes = geo.size.div_ceil(granularity).div_ceil(8);
    if bytes > MAX_PHYS_SIZE
        || u128::from(bytes) > u128::from(MAX_TABLE_SIZE) * u128::from(geo.cluster_size)
    {
        return Err(Error::generic(
            "Too much space will be occupied by the bitmap. Use larger granularity",
        ));
    }
    if name.len() > MAX_NAME_SIZE {
        return Err(Error::generic(format!(
            "Name length exceeds maximum ({MAX_NAME_SIZE} characters)"
        )));
    }
    Ok(())
}

/// Write `bits` into newly allocated clusters (QEMU's `store_bitmap`):
/// data clusters for the parts with a bit set, then the table. Returns the
/// table's offset and size. The clusters are counted in `rc` only:
/// committing them is the caller's.
pub fn write_bits(
    rc: &mut Refcounts<'_>,
    file: &Node,
    geo: &Geometry,
    name: &str,
    bits: &DirtyBitmap,
) -> Result<(u64, u32)> {
    let tab_size = geo.table_size(bits.granularity());
    if tab_size > MAX_TABLE_SIZE || tab_size * geo.cluster_size > MAX_PHYS_SIZE {
        return Err(Error::generic(format!("Bitmap '{name}' is too big")));
    }
    let words_per = (geo.cluster_size / 8) as usize;
    let mut buf = vec![0u8; geo.cluster_size as usize];
    let mut table = Vec::with_capacity(tab_size as usize);
    let alloc_err =
        |e: Error| e.prepend(format!("Failed to allocate clusters for bitmap '{name}': "));
    for i in 0..tab_size as usize {
        let first = i * words_per;
        if !bits.any_in_words(first, words_per) {
            table.push(0u64);
            continue;
        }
        let off = rc.alloc(1).map_err(alloc_err)?;
        // Words past the last one serialize as zeroes: the unused tail
        // of the last cluster is zero, as the format asks.
        bits.serialize_words(first, &mut buf);
        file.pwrite(off, &buf)
            .map_err(|e| e.prepend(format!("Failed to write bitmap '{name}' to file: ")))?;
        table.push(off);
    }
    let mut tbuf = Vec::with_capacity(table.len() * 8);
    for t in &table {
        tbuf.extend_from_slice(&t.to_be_bytes());
    }
    let table_offset = rc.alloc_bytes(tbuf.len() as u64).map_err(alloc_err)?;
    // Whole clusters: no stale bytes after the table.
    tbuf.resize(tbuf.len().next_multiple_of(geo.cluster_size as usize), 0);
    file.pwrite(table_offset, &tbuf)
        .map_err(|e| e.prepend(format!("Failed to write bitmap '{name}' to file: ")))?;
    Ok((table_offset, tab_size as u32))
}

/// Drop the clusters of the bitmap `e` (QEMU's `free_bitmap_clusters`):
/// its data and its table. A table that does not pass the checks is left
/// alone (its clusters leak, as in QEMU): freeing what it points at could
/// free clusters something else uses.
pub fn free_bitmap(
    rc: &mut Refcounts<'_>,
    file: &Node,
    geo: &Geometry,
    e: &DirEntry,
) -> Result<()> {
    if e.table_offset == 0 {
        return Ok(());
    }
    let table = read_table(file, geo, e)?;
    for t in table {
        let off = t & TABLE_ENTRY_OFFSET;
        if off != 0 {
            rc.free(off, geo.cluster_size)?;
        }
    }
    rc.free(e.table_offset, u64::from(e.table_size) * 8)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(name: &str, flags: u32) -> DirEntry {
        DirEntry {
            table_offset: 0x30000,
            table_size: 1,
            flags,
            granularity_bits: 16,
            name: name.into(),
        }
    }

    #[test]
    fn directory_layout() {
        let d = serialize_directory(&[entry("first", FLAG_AUTO), entry("a".repeat(9).as_str(), 0)]);
        // 24 + 5 -> 32, 24 + 9 -> 40.
        assert_eq!(d.len(), 72);
        assert_eq!(&d[0..8], &0x30000u64.to_be_bytes());
        assert_eq!(&d[8..12], &1u32.to_be_bytes());
        assert_eq!(&d[12..16], &2u32.to_be_bytes());
        assert_eq!((d[16], d[17]), (1, 16));
        assert_eq!(&d[18..20], &5u16.to_be_bytes());
        assert_eq!(&d[20..24], &[0; 4]);
        assert_eq!(&d[24..29], b"first");
        assert_eq!(&d[29..32], &[0; 3]);
        let ext = extension_for(&[entry("first", 0), entry("aaaaaaaaa", 0)], 0x10000);
        assert_eq!(ext.dir_size, 72);
        assert_eq!(ext.nb_bitmaps, 2);
        assert_eq!(ext.to_bytes().len(), 24);
    }

    #[test]
    fn entry_constraints() {
        let geo = Geometry {
            cluster_size: 65536,
            size: 1 << 30,
        };
        assert!(entry_ok(&geo, &entry("a", FLAG_AUTO), 1, 1));
        assert!(!entry_ok(&geo, &entry("a", FLAG_AUTO), 2, 1));
        assert!(!entry_ok(&geo, &entry("a", 4), 1, 1));
        // A table too small for the disk: only an in-use bitmap may have one.
        let mut small = entry("a", 0);
        small.granularity_bits = 9;
        assert!(!entry_ok(&geo, &small, 1, 1));
        small.flags = FLAG_IN_USE;
        assert!(entry_ok(&geo, &small, 1, 1));
        // One data cluster covers 2^19 granules.
        assert_eq!(geo.table_size(65536), 1);
        assert_eq!(geo.table_size(2048), 1);
        assert_eq!(geo.table_size(512), 4);
    }

    #[test]
    fn table_entries() {
        assert!(table_entry_ok(0, 512));
        assert!(table_entry_ok(1, 512));
        assert!(table_entry_ok(0x10000, 512));
        assert!(!table_entry_ok(0x10001, 512));
        assert!(!table_entry_ok(0x10200, 65536));
        assert!(!table_entry_ok(2, 512));
        assert!(!table_entry_ok(1 << 56, 512));
    }
}
