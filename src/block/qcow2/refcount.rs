//! Cluster allocation in a qcow2 file for the metadata imago does not
//! know: the persistent bitmaps' directory, tables and data.
//!
//! imago keeps its allocator and refcount caches private, so we edit the
//! refcount structures on disk ourselves, while imago is quiescent: its
//! caches written back before, and the image reopened in imago after
//! (which reloads them), or closed for good. Nothing else writes the
//! image meanwhile. One [`Refcounts`] is one such session: it reads the
//! refcount table and the blocks it needs, changes them in memory and
//! writes them back in [`Refcounts::commit`].
//!
//! Allocation is first fit from the start of the file (so clusters freed
//! earlier are used again), as QEMU allocates. A refcount block that does
//! not exist yet is put inside the range it describes and counts itself;
//! a refcount table too small for a new block is replaced by a larger
//! one, after the end of everything allocated so far.
//!
//! Invariants, so that a crash at any point leaves at worst leaked
//! clusters (refcount 1, referenced by nothing: what `qemu-img check -r
//! leaks` repairs), never a referenced cluster counted as free:
//! - refcounts of new clusters reach the disk (`commit`) before the caller
//!   writes anything that references them (a directory, the header);
//! - the caller frees clusters only once nothing references them;
//! - a new refcount block is written before the table entry that links
//!   it, a new refcount table before the header points at it, and the old
//!   table is freed only after that.

use std::collections::BTreeMap;
use std::ops::Range;

use super::header::Qcow2Header;
use crate::block::Node;
use crate::error::{Error, Result};

/// Bits 9–63 of a refcount table entry: the block's offset.
const TABLE_OFFSET_MASK: u64 = !0x1ff;
/// Header fields: refcount table offset (u64) and clusters (u32).
const HEADER_TABLE_OFFSET: u64 = 48;
/// QEMU's limit on the refcount table (8 MiB).
const MAX_TABLE_BYTES: u64 = 8 << 20;

/// One refcount block, as read or created.
struct Block {
    offset: u64,
    data: Vec<u8>,
    dirty: bool,
}

/// One allocation session on a qcow2 file (see the module doc).
pub struct Refcounts<'a> {
    file: &'a Node,
    cluster_bits: u32,
    /// Width of an entry: `1 << order` bits.
    order: u32,
    table_offset: u64,
    table_clusters: u64,
    table: Vec<u64>,
    /// Entries changed (new blocks linked).
    table_dirty: bool,
    /// The table lives at a new place this session: written whole and the
    /// header pointed at it in `commit`.
    table_moved: bool,
    /// The table the header points at on disk, freed after the header
    /// points at its replacement.
    old_tables: Vec<(u64, u64)>,
    /// Blocks read or created, by table index.
    blocks: BTreeMap<u64, Block>,
    /// Clusters chosen but not yet counted: nothing else may take them.
    reserved: Vec<Range<u64>>,
    /// Where the next search for free clusters starts.
    next_free: u64,
}

/// Entry `i` of a refcount block of `1 << order`-bit entries (big-endian;
/// narrower than a byte: from the least significant bit, as QEMU).
fn entry_get(data: &[u8], i: u64, order: u32) -> u64 {
    let width = 1u64 << order;
    if width >= 8 {
        let n = (width / 8) as usize;
        let at = i as usize * n;
        data[at..at + n]
            .iter()
            .fold(0, |acc, b| (acc << 8) | u64::from(*b))
    } else {
        let bit = i * width;
        (u64::from(data[(bit / 8) as usize]) >> (bit % 8)) & ((1 << width) - 1)
    }
}

fn entry_set(data: &mut [u8], i: u64, order: u32, value: u64) {
    let width = 1u64 << order;
    if width >= 8 {
        let n = (width / 8) as usize;
        let at = i as usize * n;
        data[at..at + n].copy_from_slice(&value.to_be_bytes()[8 - n..]);
    } else {
        let bit = i * width;
        let shift = bit % 8;
        let mask = (((1u64 << width) - 1) << shift) as u8;
        let byte = &mut data[(bit / 8) as usize];
        *byte = (*byte & !mask) | (((value << shift) as u8) & mask);
    }
}

fn corrupt(what: String) -> Error {
    Error::errno_msg(libc::EIO, format!("qcow2 refcounts: {what}"))
}

impl<'a> Refcounts<'a> {
    /// Start a session on the image in `file`, whose header is `hdr`.
    pub fn load(file: &'a Node, hdr: &Qcow2Header) -> Result<Self> {
        let cs = hdr.cluster_size;
        let cluster_bits = cs.trailing_zeros();
        if hdr.refcount_order > 6 {
            return Err(corrupt(format!(
                "refcount order {} is invalid",
                hdr.refcount_order
            )));
        }
        let bytes = u64::from(hdr.refcount_table_clusters) * cs;
        if bytes == 0 || bytes > MAX_TABLE_BYTES || !hdr.refcount_table_offset.is_multiple_of(cs) {
            return Err(corrupt("the refcount table is invalid".into()));
        }
        let mut buf = vec![0u8; bytes as usize];
        file.pread(hdr.refcount_table_offset, &mut buf)?;
        let table = buf
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes(c.try_into().expect("8 bytes")))
            .collect();
        Ok(Refcounts {
            file,
            cluster_bits,
            order: hdr.refcount_order,
            table_offset: hdr.refcount_table_offset,
            table_clusters: u64::from(hdr.refcount_table_clusters),
            table,
            table_dirty: false,
            table_moved: false,
            old_tables: Vec::new(),
            blocks: BTreeMap::new(),
            reserved: Vec::new(),
            next_free: 0,
        })
    }

    fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Entries per refcount block.
    fn per_block(&self) -> u64 {
        (self.cluster_size() * 8) >> self.order
    }

    /// Block `k`, read from disk on first use; `None` when it does not
    /// exist (all its clusters are free).
    fn block(&mut self, k: u64) -> Result<Option<&mut Block>> {
        if !self.blocks.contains_key(&k) {
            let entry = self.table.get(k as usize).copied().unwrap_or(0);
            let offset = entry & TABLE_OFFSET_MASK;
            if offset == 0 {
                return Ok(None);
            }
            if !offset.is_multiple_of(self.cluster_size()) {
                return Err(corrupt(format!(
                    "refcount block {k} at {offset:#x} is not aligned"
                )));
            }
            let mut data = vec![0u8; self.cluster_size() as usize];
            self.file.pread(offset, &mut data)?;
            self.blocks.insert(
                k,
                Block {
                    offset,
                    data,
                    dirty: false,
                },
            );
        }
        Ok(self.blocks.get_mut(&k))
    }

    /// The refcount of `cluster`.
    pub fn get(&mut self, cluster: u64) -> Result<u64> {
        let (pb, order) = (self.per_block(), self.order);
        Ok(match self.block(cluster / pb)? {
            None => 0,
            Some(b) => entry_get(&b.data, cluster % pb, order),
        })
    }

    fn is_reserved(&self, cluster: u64) -> bool {
        self.reserved.iter().any(|r| r.contains(&cluster))
    }

    /// The first run of `n` free clusters at or after the search start,
    /// none of them reserved. Cluster 0 (the header) is never free.
    fn find_free(&mut self, n: u64) -> Result<u64> {
        let mut start = self.next_free.max(1);
        let mut c = start;
        while c < start + n {
            if self.is_reserved(c) || self.get(c)? != 0 {
                start = c + 1;
            }
            c += 1;
        }
        Ok(start)
    }

    /// Set the refcount of `cluster`, creating its block if needed.
    fn set(&mut self, cluster: u64, value: u64) -> Result<()> {
        let (pb, order) = (self.per_block(), self.order);
        let k = cluster / pb;
        self.ensure_block(k)?;
        let b = self.blocks.get_mut(&k).expect("ensured");
        entry_set(&mut b.data, cluster % pb, order, value);
        b.dirty = true;
        Ok(())
    }

    /// Make block `k` exist: a new block counts itself, from the first
    /// cluster of its own range that nobody reserved (all of them are
    /// free, or the block would exist), else from wherever is free.
    fn ensure_block(&mut self, k: u64) -> Result<()> {
        if self.block(k)?.is_some() {
            return Ok(());
        }
        if k >= self.table.len() as u64 {
            self.grow_table(k)?;
            // The new table's own refcounts may have created block k.
            if self.block(k)?.is_some() {
                return Ok(());
            }
        }
        let pb = self.per_block();
        let range = k * pb..(k + 1) * pb;
        // (Never cluster 0, the header, should block 0 be missing.)
        let inside = range.clone().find(|c| *c != 0 && !self.is_reserved(*c));
        let at = match inside {
            Some(c) => c,
            None => self.find_free(1)?,
        };
        self.blocks.insert(
            k,
            Block {
                offset: at << self.cluster_bits,
                data: vec![0u8; self.cluster_size() as usize],
                dirty: true,
            },
        );
        self.table[k as usize] = at << self.cluster_bits;
        self.table_dirty = true;
        if range.contains(&at) {
            let order = self.order;
            let b = self.blocks.get_mut(&k).expect("just inserted");
            entry_set(&mut b.data, at - k * pb, order, 1);
            Ok(())
        } else {
            self.reserved.push(at..at + 1);
            let r = self.set(at, 1);
            self.reserved.pop();
            r
        }
    }

    /// Replace the table by one with room for entry `k`, placed after
    /// everything allocated so far, with room for the blocks that count
    /// its own clusters.
    fn grow_table(&mut self, k: u64) -> Result<()> {
        let cs = self.cluster_size();
        let pb = self.per_block();
        let mut entries = (k + 1).max(self.table.len() as u64 * 2);
        let (at, clusters) = loop {
            let clusters = (entries * 8).div_ceil(cs);
            if clusters * cs > MAX_TABLE_BYTES {
                return Err(Error::errno_msg(
                    libc::EFBIG,
                    "qcow2 refcounts: the refcount table would exceed 8 MiB",
                ));
            }
            let at = self.find_free(clusters)?;
            // Blocks for the table's clusters are in their ranges or
            // shortly after: two entries of margin.
            let last_block = (at + clusters - 1) / pb + 2;
            if last_block < clusters * cs / 8 {
                break (at, clusters);
            }
            entries = last_block + 1;
        };
        let (old_offset, old_clusters) = (self.table_offset, self.table_clusters);
        self.table.resize((clusters * cs / 8) as usize, 0);
        self.table_offset = at << self.cluster_bits;
        self.table_clusters = clusters;
        self.next_free = self.next_free.max(at + clusters);
        if self.table_moved {
            // A table of this session, never written: just uncount it.
            let first = old_offset >> self.cluster_bits;
            for c in first..first + old_clusters {
                self.set(c, 0)?;
            }
        } else {
            self.old_tables.push((old_offset, old_clusters));
        }
        self.table_moved = true;
        self.table_dirty = true;
        self.reserved.push(at..at + clusters);
        let mut r = Ok(());
        for c in at..at + clusters {
            r = self.set(c, 1);
            if r.is_err() {
                break;
            }
        }
        self.reserved.pop();
        r
    }

    /// Allocate `n` contiguous clusters: their byte offset. Counted in
    /// memory only until [`commit`](Self::commit).
    pub fn alloc(&mut self, n: u64) -> Result<u64> {
        let start = self.find_free(n)?;
        self.next_free = start + n;
        self.reserved.push(start..start + n);
        let mut r = Ok(());
        for c in start..start + n {
            r = self.set(c, 1);
            if r.is_err() {
                break;
            }
        }
        self.reserved.pop();
        r.map(|()| start << self.cluster_bits)
    }

    /// Allocate clusters for `bytes` bytes (at least one cluster).
    pub fn alloc_bytes(&mut self, bytes: u64) -> Result<u64> {
        self.alloc(bytes.div_ceil(self.cluster_size()).max(1))
    }

    /// Drop one reference to each cluster of `[offset, offset + bytes)`.
    pub fn free(&mut self, offset: u64, bytes: u64) -> Result<()> {
        let first = offset >> self.cluster_bits;
        let end = (offset + bytes.max(1)).div_ceil(self.cluster_size());
        for c in first..end {
            let rc = self.get(c)?;
            if rc == 0 {
                return Err(corrupt(format!("cluster {c} is already free")));
            }
            self.set(c, rc - 1)?;
        }
        Ok(())
    }

    fn write_blocks(&mut self) -> Result<()> {
        let mut wrote = false;
        for b in self.blocks.values_mut().filter(|b| b.dirty) {
            self.file.pwrite(b.offset, &b.data)?;
            b.dirty = false;
            wrote = true;
        }
        if wrote {
            self.file.flush()?;
        }
        Ok(())
    }

    /// Write what changed, in the order the module doc gives: blocks,
    /// table, header, then the old table freed.
    pub fn commit(&mut self) -> Result<()> {
        self.write_blocks()?;
        if self.table_dirty {
            let mut buf = Vec::with_capacity(self.table.len() * 8);
            for e in &self.table {
                buf.extend_from_slice(&e.to_be_bytes());
            }
            self.file.pwrite(self.table_offset, &buf)?;
            self.file.flush()?;
            self.table_dirty = false;
        }
        if self.table_moved {
            let mut ptr = [0u8; 12];
            ptr[..8].copy_from_slice(&self.table_offset.to_be_bytes());
            ptr[8..].copy_from_slice(&(self.table_clusters as u32).to_be_bytes());
            self.file.pwrite(HEADER_TABLE_OFFSET, &ptr)?;
            self.file.flush()?;
            self.table_moved = false;
        }
        for (offset, clusters) in std::mem::take(&mut self.old_tables) {
            self.free(offset, clusters << self.cluster_bits)?;
        }
        self.write_blocks()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_of_every_width() {
        for order in 0..=6u32 {
            let width = 1u32 << order;
            let max = if width == 64 {
                u64::MAX
            } else {
                (1u64 << width) - 1
            };
            let mut data = vec![0u8; 64];
            let n = 64 * 8 / u64::from(width);
            for i in 0..n {
                entry_set(&mut data, i, order, (i * 7 + 1) & max);
            }
            for i in 0..n {
                assert_eq!(
                    entry_get(&data, i, order),
                    (i * 7 + 1) & max,
                    "order {order}"
                );
            }
            // Setting one entry leaves its neighbours alone.
            entry_set(&mut data, 3, order, 0);
            assert_eq!(entry_get(&data, 2, order), 15 & max);
            assert_eq!(entry_get(&data, 4, order), 29 & max);
        }
        // Sub-byte entries start at the least significant bit (QEMU).
        let mut data = vec![0u8; 1];
        entry_set(&mut data, 0, 0, 1);
        assert_eq!(data[0], 1);
        entry_set(&mut data, 1, 1, 3);
        assert_eq!(data[0], 0b1101);
        // 16-bit entries are big-endian.
        let mut data = vec![0u8; 4];
        entry_set(&mut data, 1, 4, 0x0102);
        assert_eq!(data, [0, 0, 1, 2]);
    }
}
