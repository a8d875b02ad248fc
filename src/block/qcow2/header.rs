//! The qcow2 header fields imago does not let us change: the backing link,
//! the autoclear bits and the bitmaps extension.
//!
//! imago keeps its header private and changes the backing file only in
//! memory, so when a stream or commit job finishes we patch cluster 0
//! ourselves, laid out as QEMU's `qcow2_update_header` does. Close the image
//! in imago first, call [`set_backing`], then reopen it. The persistent
//! bitmaps ([`super::bitmaps`]) rewrite their extension and autoclear bit
//! with [`update_node_header`] and [`write_autoclear`]; imago writes the
//! header only when it opens an image (and then only the fields it owns
//! after that), so these patches stay.
//!
//! Errors carry QEMU's words (`qcow2_do_open`, `qcow2_read_extensions`,
//! `qcow2_change_backing_file`), so messages match what `qemu-img` prints
//! after its `Could not open '…': ` or `Could not change the backing file
//! to '…': ` prefix.

use std::fs::File;
use std::os::unix::fs::FileExt;

use crate::error::{Error, Result};

const MAGIC: &[u8; 4] = b"QFI\xfb";
const EXT_END: u32 = 0;
const EXT_BACKING_FORMAT: u32 = 0xE279_2ACA;
/// QEMU's MIN_CLUSTER_BITS and MAX_CLUSTER_BITS.
const CLUSTER_BITS: std::ops::RangeInclusive<u32> = 9..=21;
/// v2 has no `header_length` field; its fixed header ends here.
const V2_HEADER_LENGTH: u32 = 72;
/// The smallest v3 header, and all the fixed fields we read.
const V3_MIN_HEADER_LENGTH: u32 = 104;
/// QEMU keeps the backing name in a 1024-byte C buffer.
const MAX_BACKING_NAME: usize = 1023;
/// QEMU keeps the backing format in a 16-byte C buffer.
const MAX_BACKING_FORMAT: usize = 15;
/// Autoclear bit `data-file-raw`: the external data file alone is the whole
/// disk, which a backing file would contradict, so QEMU refuses one.
const AUTOCLEAR_DATA_FILE_RAW: u64 = 1 << 1;

/// The fields of a qcow2 header that the block layer needs to know.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Qcow2Header {
    /// 2 (`compat=0.10`) or 3 (`compat=1.1`).
    pub version: u32,
    /// Bytes per cluster (512 to 2 MiB).
    pub cluster_size: u64,
    /// Virtual disk size in bytes.
    pub size: u64,
    /// `None` when there is no backing file (an empty name counts as none,
    /// as in QEMU).
    pub backing_file: Option<String>,
    /// The backing-format header extension, as stored.
    pub backing_format: Option<String>,
    /// Where the header extensions start: 72 for v2.
    pub header_length: u32,
    /// Feature bits a reader must understand; 0 for v2.
    pub incompatible_features: u64,
    /// Feature bits a reader may ignore; 0 for v2.
    pub compatible_features: u64,
    /// Feature bits a writer that does not know them must clear; 0 for v2.
    pub autoclear_features: u64,
    /// Refcount width is `1 << refcount_order` bits; 4 for v2.
    pub refcount_order: u32,
    /// Where the refcount table starts.
    pub refcount_table_offset: u64,
    /// Clusters the refcount table occupies.
    pub refcount_table_clusters: u32,
    /// Every header extension but the backing format and the end marker,
    /// in order: `(type, data)`.
    pub extensions: Vec<(u32, Vec<u8>)>,
}

/// Byte offset of `autoclear_features` in a v3 header.
pub(crate) const AUTOCLEAR_OFFSET: u64 = 88;

/// Reads and checks the header of the qcow2 image `f`.
pub fn read_header(f: &File) -> Result<Qcow2Header> {
    Ok(parse(f)?.header)
}

/// Points the image `f` at a new backing file, or at none, in place, as
/// `qemu-img rebase -u` does.
///
/// `Some((name, fmt))` stores `name` and, if `fmt` is given, a backing-format
/// extension (for v2 images too, like QEMU). `None`, or an empty name as with
/// `qemu-img rebase -u -b ''`, removes the link and the format. All other
/// header extensions are kept in their order.
///
/// Errors as in QEMU: `Invalid argument` (EINVAL) for a name over 1023 bytes
/// or an image with `data-file-raw`, `No space left in the file header`
/// (ENOSPC) when the header would outgrow cluster 0; the file is not touched
/// then.
pub fn set_backing(f: &File, backing: Option<(&str, Option<&str>)>) -> Result<()> {
    let parsed = parse(f)?;
    let backing = backing.filter(|(name, _)| !name.is_empty());
    check_backing(&parsed, backing)?;

    let buf = rebuild(
        &parsed,
        &parsed.others,
        backing,
        parsed.header.autoclear_features,
    )?;
    f.write_all_at(&buf, 0)?;
    f.sync_data()?;
    Ok(())
}

/// [`set_backing`] on the image in `node`, through the node (so that
/// every layer under the image, a recording `blklogwrites` node say, sees
/// the header write), then flushes the node.
pub fn set_node_backing(
    node: &crate::block::Node,
    backing: Option<(&str, Option<&str>)>,
) -> Result<()> {
    let parsed = parse_node(node)?;
    let backing = backing.filter(|(name, _)| !name.is_empty());
    check_backing(&parsed, backing)?;
    if let Some((name, fmt)) = backing
        && relink_in_two_steps(node, &parsed, name, fmt)?
    {
        return Ok(());
    }
    let buf = rebuild(
        &parsed,
        &parsed.others,
        backing,
        parsed.header.autoclear_features,
    )?;
    node.pwrite(0, &buf)?;
    node.flush()
}

/// Move the backing link from one file to another so that a power cut
/// at any point, even one that tears a write between two sectors, leaves
/// the old link or the new one: the new name goes where the old header
/// does not look (after everything it uses), is made durable, and then
/// one 12-byte write of the offset and length (within one sector) switches
/// to it. Rewriting the header in one write, as QEMU does, can tear
/// between the sector with the length and the one with the name when the
/// extensions push the name past the first 512 bytes (a stream's checker
/// found names cut to the old length). Only when nothing else in the
/// header changes: same backing format, a link there before, room left in
/// cluster 0; `Ok(false)` otherwise. The name then does not follow the
/// extensions directly (QEMU reads it from its offset wherever it is; the
/// next full rewrite packs it again).
fn relink_in_two_steps(
    node: &crate::block::Node,
    parsed: &Parsed,
    name: &str,
    fmt: Option<&str>,
) -> Result<bool> {
    let same_format = parsed.header.backing_format.as_deref() == fmt;
    let at = parsed.used_end as u64;
    if parsed.header.backing_file.is_none()
        || !same_format
        || at + name.len() as u64 > parsed.header.cluster_size
    {
        return Ok(false);
    }
    node.pwrite(at, name.as_bytes())?;
    node.flush()?;
    let mut link = [0u8; 12];
    link[..8].copy_from_slice(&at.to_be_bytes());
    link[8..].copy_from_slice(&(name.len() as u32).to_be_bytes());
    node.pwrite(8, &link)?;
    node.flush()?;
    Ok(true)
}

/// QEMU's checks of a new backing link (`qcow2_change_backing_file`).
fn check_backing(parsed: &Parsed, backing: Option<(&str, Option<&str>)>) -> Result<()> {
    if let Some((name, fmt)) = backing {
        // A NUL would cut the name short when QEMU reads it back as a C
        // string.
        if name.len() > MAX_BACKING_NAME
            || name.contains('\0')
            || parsed.header.autoclear_features & AUTOCLEAR_DATA_FILE_RAW != 0
        {
            return Err(Error::from_errno(libc::EINVAL));
        }
        // QEMU would open such an image only with the format cut short, or
        // not at all; qemu-img refuses unknown formats with this text.
        if let Some(fmt) = fmt
            && (fmt.is_empty() || fmt.len() > MAX_BACKING_FORMAT || fmt.contains('\0'))
        {
            return Err(Error::generic(format!("Invalid format name: '{fmt}'")));
        }
    }
    Ok(())
}

/// Cluster 0 as it would be with the extensions `others` (backing format
/// and end marker aside), the backing link `backing` and `autoclear`:
/// what to write at offset 0, including zeroes over whatever the old
/// extensions and name used past the new end (QEMU zeroes the whole
/// cluster). `ENOSPC` when it would outgrow cluster 0.
fn rebuild(
    parsed: &Parsed,
    others: &[(u32, Vec<u8>)],
    backing: Option<(&str, Option<&str>)>,
    autoclear: u64,
) -> Result<Vec<u8>> {
    // Build the whole new header area in memory before writing anything.
    let mut buf = parsed.fixed.clone();
    if parsed.header.version >= 3 {
        let at = AUTOCLEAR_OFFSET as usize;
        buf[at..at + 8].copy_from_slice(&autoclear.to_be_bytes());
    }
    for (kind, data) in others {
        push_extension(&mut buf, *kind, data);
    }
    if let Some((_, Some(fmt))) = backing {
        push_extension(&mut buf, EXT_BACKING_FORMAT, fmt.as_bytes());
    }
    push_extension(&mut buf, EXT_END, &[]);
    // The name goes right after the end marker, unpadded, as QEMU puts it.
    let (offset, size) = match backing {
        Some((name, _)) => {
            let offset = buf.len() as u64;
            buf.extend_from_slice(name.as_bytes());
            (offset, name.len() as u32)
        }
        None => (0, 0),
    };
    if buf.len() as u64 > parsed.header.cluster_size {
        // qemu-img rebase words this errno of qcow2_update_header so.
        return Err(Error::errno_msg(
            libc::ENOSPC,
            "No space left in the file header",
        ));
    }
    buf[8..16].copy_from_slice(&offset.to_be_bytes());
    buf[16..20].copy_from_slice(&size.to_be_bytes());
    // Zero what the old extensions and name used past the new end, so no
    // stale bytes are left in cluster 0 (QEMU zeroes the whole cluster).
    if buf.len() < parsed.used_end {
        buf.resize(parsed.used_end, 0);
    }
    Ok(buf)
}

/// Rewrites cluster 0 of the image in `node` with its extensions and
/// autoclear bits changed by `change` (the backing link is kept), then
/// flushes the node. For v3 images only (v2 has no autoclear field).
pub fn update_node_header(
    node: &crate::block::Node,
    change: impl FnOnce(&mut Vec<(u32, Vec<u8>)>, &mut u64),
) -> Result<()> {
    let parsed = parse_node(node)?;
    let mut others = parsed.others.clone();
    let mut autoclear = parsed.header.autoclear_features;
    change(&mut others, &mut autoclear);
    let backing = parsed
        .header
        .backing_file
        .as_deref()
        .map(|n| (n, parsed.header.backing_format.as_deref()));
    let buf = rebuild(&parsed, &others, backing, autoclear)?;
    node.pwrite(0, &buf)?;
    node.flush()
}

/// Writes the autoclear bits of the v3 image in `node` in place and
/// flushes the node: QEMU's way to say "the bitmaps extension is being
/// rewritten" (bit clear) and "it is valid again" (bit set).
pub fn write_autoclear(node: &crate::block::Node, autoclear: u64) -> Result<()> {
    node.pwrite(AUTOCLEAR_OFFSET, &autoclear.to_be_bytes())?;
    node.flush()
}

/// A parsed header and what [`set_backing`] needs to rebuild cluster 0.
struct Parsed {
    header: Qcow2Header,
    /// Bytes `0..header_length`, kept as they are: they include fields we do
    /// not interpret (compression type, fields of future versions).
    fixed: Vec<u8>,
    /// Every extension but the backing format and the end marker, in order.
    others: Vec<(u32, Vec<u8>)>,
    /// End of the used part of cluster 0 (extensions and backing name).
    used_end: usize,
}

/// The checks of QEMU's `qcow2_do_open` up to the backing name, in its order,
/// so the first error is the one QEMU reports.
fn parse(f: &File) -> Result<Parsed> {
    parse_from(|buf| read_zero_filled(f, 0, buf))
}

/// The header of the image in `node`, read through the node (so a
/// blkdebug node under a qcow2 sees the read, as in QEMU).
pub fn read_node_header(node: &crate::block::Node) -> Result<Qcow2Header> {
    Ok(parse_node(node)?.header)
}

fn parse_node(node: &crate::block::Node) -> Result<Parsed> {
    parse_from(|buf| {
        // Past the end reads as zeroes, as in read_zero_filled.
        let n = (buf.len() as u64).min(node.len()?) as usize;
        node.pread(0, &mut buf[..n])?;
        buf[n..].fill(0);
        Ok(())
    })
}

/// [`parse`] over any way to read the start of the image into a buffer.
fn parse_from(read_start: impl Fn(&mut [u8]) -> Result<()>) -> Result<Parsed> {
    let mut fixed = [0u8; V3_MIN_HEADER_LENGTH as usize];
    read_start(&mut fixed).map_err(|e| e.prepend("Could not read qcow2 header: "))?;
    if &fixed[0..4] != MAGIC {
        return Err(Error::generic("Image is not in qcow2 format"));
    }
    let version = be32(&fixed, 4);
    if !(2..=3).contains(&version) {
        return Err(Error::generic(format!(
            "Unsupported qcow2 version {version}"
        )));
    }
    let cluster_bits = be32(&fixed, 20);
    if !CLUSTER_BITS.contains(&cluster_bits) {
        return Err(Error::generic(format!(
            "Unsupported cluster size: 2^{cluster_bits}"
        )));
    }
    let cluster_size = 1usize << cluster_bits;
    let (header_length, incompatible, compatible, autoclear, refcount_order) = if version == 2 {
        (V2_HEADER_LENGTH, 0, 0, 0, 4)
    } else {
        let header_length = be32(&fixed, 100);
        if header_length < V3_MIN_HEADER_LENGTH {
            return Err(Error::generic("qcow2 header too short"));
        }
        (
            header_length,
            be64(&fixed, 72),
            be64(&fixed, 80),
            be64(&fixed, 88),
            be32(&fixed, 96),
        )
    };
    if header_length as usize > cluster_size {
        return Err(Error::generic("qcow2 header exceeds cluster size"));
    }
    let backing_offset = be64(&fixed, 8);
    if backing_offset > cluster_size as u64 {
        return Err(Error::generic("Invalid backing file offset"));
    }
    let backing_offset = backing_offset as usize;

    // Extensions and name live in cluster 0 (checked above and below).
    let mut cluster = vec![0u8; cluster_size];
    read_start(&mut cluster)?;

    // Extensions end where the backing name starts, else with the cluster.
    let ext_end = if backing_offset != 0 {
        backing_offset
    } else {
        cluster_size
    };
    let mut pos = header_length as usize;
    let mut others = Vec::new();
    let mut backing_format = None;
    while pos < ext_end {
        if ext_end - pos < 8 {
            return Err(Error::generic("Header extension too large"));
        }
        let kind = be32(&cluster, pos);
        let len = be32(&cluster, pos + 4) as usize;
        pos += 8;
        if len > ext_end - pos {
            return Err(Error::generic("Header extension too large"));
        }
        let data = &cluster[pos..pos + len];
        match kind {
            EXT_END => break,
            // QEMU checks it where it finds it: its errors come before
            // those of extensions after it.
            super::bitmaps::EXT_BITMAPS => {
                super::bitmaps::check_extension(data, autoclear, cluster_size as u64)?;
                others.push((kind, data.to_vec()));
            }
            EXT_BACKING_FORMAT => {
                if len > MAX_BACKING_FORMAT {
                    return Err(Error::generic(format!(
                        "ERROR: ext_backing_format: len={len} too large (>={})",
                        MAX_BACKING_FORMAT + 1
                    )));
                }
                backing_format = Some(c_string(data, "Backing format")?);
            }
            _ => others.push((kind, data.to_vec())),
        }
        pos += len.next_multiple_of(8);
    }
    // Padding of a last extension may run past the cluster; never write there.
    let mut used_end = pos.min(cluster_size);

    let mut backing_file = None;
    if backing_offset != 0 {
        let len = be32(&fixed, 16) as usize;
        if len > MAX_BACKING_NAME.min(cluster_size - backing_offset) {
            return Err(Error::generic("Backing file name too long"));
        }
        used_end = used_end.max(backing_offset + len);
        let name = c_string(
            &cluster[backing_offset..backing_offset + len],
            "Backing file name",
        )?;
        backing_file = Some(name).filter(|n| !n.is_empty());
    }

    Ok(Parsed {
        header: Qcow2Header {
            version,
            cluster_size: cluster_size as u64,
            size: be64(&fixed, 24),
            backing_file,
            backing_format,
            header_length,
            incompatible_features: incompatible,
            compatible_features: compatible,
            autoclear_features: autoclear,
            refcount_order,
            refcount_table_offset: be64(&fixed, 48),
            refcount_table_clusters: be32(&fixed, 56),
            extensions: others.clone(),
        },
        fixed: cluster[..header_length as usize].to_vec(),
        others,
        used_end,
    })
}

/// Reads like QEMU's file driver, where bytes past EOF read as zeros: a
/// short file then fails the same check with the same words as in QEMU.
fn read_zero_filled(f: &File, offset: u64, buf: &mut [u8]) -> Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match f.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    buf[done..].fill(0);
    Ok(())
}

/// Appends one extension: type, length, data padded to 8 bytes.
fn push_extension(buf: &mut Vec<u8>, kind: u32, data: &[u8]) {
    buf.extend_from_slice(&kind.to_be_bytes());
    buf.extend_from_slice(&(data.len() as u32).to_be_bytes());
    buf.extend_from_slice(data);
    buf.resize(buf.len().next_multiple_of(8), 0);
}

/// QEMU reads names into C strings, so they end at the first NUL.
fn c_string(bytes: &[u8], what: &str) -> Result<String> {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    String::from_utf8(bytes[..end].to_vec())
        .map_err(|_| Error::generic(format!("{what} is not valid UTF-8")))
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

#[cfg(test)]
mod tests {
    //! Bad input: our error must be the one real `qemu-img` prints, and the
    //! file must stay byte for byte as it was.

    use super::*;
    use std::path::Path;
    use std::process::Command;

    fn qemu_img(args: &[&str]) -> std::process::Output {
        Command::new("qemu-img")
            .args(args)
            .output()
            .expect("qemu-img is installed")
    }

    /// A v3 image with a raw backing file, in a fresh directory.
    fn image(dir: &Path, extra: &[&str]) -> String {
        let base = dir.join("base.raw");
        let top = dir.join("top.qcow2");
        let (base, top) = (base.to_str().unwrap(), top.to_str().unwrap());
        assert!(
            qemu_img(&["create", "-q", "-f", "raw", base, "1M"])
                .status
                .success()
        );
        let mut args = vec!["create", "-q", "-f", "qcow2", "-b", base, "-F", "raw"];
        args.extend_from_slice(extra);
        args.extend_from_slice(&[top, "1M"]);
        assert!(qemu_img(&args).status.success());
        top.to_string()
    }

    fn patch(path: &str, at: u64, bytes: &[u8]) {
        let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
        f.write_all_at(bytes, at).unwrap();
    }

    /// What `qemu-img info` says after `Could not open '<path>': `.
    fn qemu_open_error(path: &str) -> String {
        let out = qemu_img(&["info", "-f", "qcow2", path]);
        assert!(!out.status.success());
        let text = String::from_utf8(out.stderr).unwrap();
        let prefix = format!("qemu-img: Could not open '{path}': ");
        text.trim_end()
            .strip_prefix(&prefix)
            .unwrap_or_else(|| panic!("unexpected qemu-img output: {text}"))
            .to_string()
    }

    /// What `qemu-img rebase -u` says after `Could not change the backing
    /// file to '<name>': `, run on a copy.
    fn qemu_rebase_error(path: &str, name: &str) -> String {
        let copy = format!("{path}.copy");
        std::fs::copy(path, &copy).unwrap();
        let out = qemu_img(&[
            "rebase", "-u", "-f", "qcow2", "-b", name, "-F", "raw", &copy,
        ]);
        assert!(!out.status.success());
        let text = String::from_utf8(out.stderr).unwrap();
        let prefix = format!("qemu-img: Could not change the backing file to '{name}': ");
        text.trim_end()
            .strip_prefix(&prefix)
            .unwrap_or_else(|| panic!("unexpected qemu-img output: {text}"))
            .to_string()
    }

    /// Both entry points fail on `path` with QEMU's open error; nothing is written.
    fn assert_refused_like_qemu(path: &str, expected: &str) {
        assert_eq!(qemu_open_error(path), expected);
        let before = std::fs::read(path).unwrap();
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .unwrap();
        assert_eq!(read_header(&f).unwrap_err().message(), expected);
        let err = set_backing(&f, Some(("other.raw", Some("raw")))).unwrap_err();
        assert_eq!(err.message(), expected);
        assert_eq!(std::fs::read(path).unwrap(), before);
    }

    #[test]
    fn raw_file_is_not_qcow2() {
        let dir = tempfile::tempdir().unwrap();
        let raw = dir.path().join("disk.raw");
        let raw = raw.to_str().unwrap();
        assert!(
            qemu_img(&["create", "-q", "-f", "raw", raw, "1M"])
                .status
                .success()
        );
        patch(raw, 0, b"not a qcow2 image");
        assert_refused_like_qemu(raw, "Image is not in qcow2 format");
    }

    #[test]
    fn truncated_images_fail_as_in_qemu() {
        let dir = tempfile::tempdir().unwrap();
        let top = image(dir.path(), &[]);
        // Cut inside the v3 fields: header_length reads as 0.
        std::fs::File::options()
            .write(true)
            .open(&top)
            .unwrap()
            .set_len(50)
            .unwrap();
        assert_refused_like_qemu(&top, "qcow2 header too short");
        // Cut inside the v2 fields: cluster_bits reads as 0.
        std::fs::File::options()
            .write(true)
            .open(&top)
            .unwrap()
            .set_len(12)
            .unwrap();
        patch(&top, 4, &2u32.to_be_bytes());
        assert_refused_like_qemu(&top, "Unsupported cluster size: 2^0");
    }

    #[test]
    fn corrupt_header_fields_fail_as_in_qemu() {
        let dir = tempfile::tempdir().unwrap();
        let top = image(dir.path(), &[]);
        let good = std::fs::read(&top).unwrap();
        let cases: [(u64, &[u8], &str); 5] = [
            (4, &4u32.to_be_bytes(), "Unsupported qcow2 version 4"),
            (16, &1024u32.to_be_bytes(), "Backing file name too long"),
            // Name starts 6 bytes before the end of cluster 0.
            (8, &65530u64.to_be_bytes(), "Backing file name too long"),
            (8, &70000u64.to_be_bytes(), "Invalid backing file offset"),
            (
                100,
                &0x20000u32.to_be_bytes(),
                "qcow2 header exceeds cluster size",
            ),
        ];
        for (at, bytes, expected) in cases {
            std::fs::write(&top, &good).unwrap();
            patch(&top, at, bytes);
            assert_refused_like_qemu(&top, expected);
        }
        // A backing-format extension (at 112 in QEMU 10's layout) that is too long.
        std::fs::write(&top, &good).unwrap();
        assert_eq!(be32(&good, 112), EXT_BACKING_FORMAT);
        patch(&top, 116, &16u32.to_be_bytes());
        assert_refused_like_qemu(&top, "ERROR: ext_backing_format: len=16 too large (>=16)");
    }

    /// Refusals of set_backing itself: same errno and text as qemu-img
    /// rebase -u, and the image is unchanged.
    fn assert_set_refused(path: &str, name: &str, errno: i32) {
        let before = std::fs::read(path).unwrap();
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .unwrap();
        let err = set_backing(&f, Some((name, Some("raw")))).unwrap_err();
        assert_eq!(err.errno(), Some(errno));
        assert_eq!(err.message(), qemu_rebase_error(path, name));
        assert_eq!(std::fs::read(path).unwrap(), before);
    }

    #[test]
    fn name_over_1023_bytes_is_invalid() {
        let dir = tempfile::tempdir().unwrap();
        let top = image(dir.path(), &[]);
        assert_set_refused(&top, &"a".repeat(1024), libc::EINVAL);
    }

    #[test]
    fn name_beyond_cluster_0_does_not_fit() {
        let dir = tempfile::tempdir().unwrap();
        let top = image(dir.path(), &["-o", "cluster_size=512"]);
        assert_set_refused(&top, &"b".repeat(1000), libc::ENOSPC);
    }

    #[test]
    fn data_file_raw_takes_no_backing() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data.raw");
        let top = dir.path().join("top.qcow2");
        let opts = format!("data_file={},data_file_raw=on", data.display());
        let top = top.to_str().unwrap();
        assert!(
            qemu_img(&["create", "-q", "-f", "qcow2", "-o", &opts, top, "1M"])
                .status
                .success()
        );
        assert_set_refused(top, "base.raw", libc::EINVAL);
    }

    #[test]
    fn bad_format_name_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let top = image(dir.path(), &[]);
        let before = std::fs::read(&top).unwrap();
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&top)
            .unwrap();
        for fmt in ["", "abcdefghijklmnop"] {
            let err = set_backing(&f, Some(("base.raw", Some(fmt)))).unwrap_err();
            assert_eq!(err.message(), format!("Invalid format name: '{fmt}'"));
        }
        assert_eq!(std::fs::read(&top).unwrap(), before);
    }
}
