//! `blklogwrites`: a filter that records every write, write-zeroes,
//! discard and flush that reaches its `file` child in a `log` child, in
//! the on-disk format of Linux's dm-log-writes, as QEMU's driver of the
//! same name does (same options, same texts). A crash-consistency checker
//! replays the log to rebuild the file as it would be after a power cut
//! at any point (see `tests/common/crash.rs`); since the format is QEMU's,
//! the same checker reads logs that qemu-storage-daemon wrote.
//!
//! The log: sector 0 holds the superblock (magic, version, number of
//! entries, sector size; little-endian); entries follow from sector 1,
//! each one sector (`sector`, `nr_sectors`, `flags`, `data_len`, in log
//! sectors) followed by the data of a write or write-zeroes (a discard or
//! a flush has none). The superblock is rewritten after every flush, every
//! `log-super-update-interval` entries, and (unlike QEMU) when the node
//! closes, so a log is complete once its node is gone.
//!
//! Two things differ from QEMU, both for the checker:
//! - Requests are serialised (one lock around the file request and its
//!   entry), so the log's order is the order in which requests completed,
//!   and a flush entry follows exactly the writes that finished before the
//!   flush began. This is a test node; its speed does not matter.
//! - Each entry carries the CLOCK_MONOTONIC time (nanoseconds) at which
//!   its request completed in the entry sector's padding (bytes 32..40,
//!   which QEMU leaves zero and readers of the format ignore), so the logs
//!   of several images merge into one order of events.
//!
//! Requests not aligned to the log sector size are widened to it with a
//! read-modify-write of the file (QEMU's generic layer does so for the
//! driver's `request_alignment`); discards are narrowed to whole sectors.

use std::sync::Arc;

use crate::locks::Mutex;

use super::child::ChildEdge;
use super::perm::{self, Perms};
use super::{BlockDriver, BlockStatus, Node, NodeChild};
use crate::error::{Error, Result};

/// dm-log-writes' entry flags.
const LOG_FLUSH_FLAG: u64 = 1 << 0;
/// Forced unit access (never written by us or QEMU; accepted in a log).
const LOG_FUA_FLAG: u64 = 1 << 1;
/// A discard: no data follows the entry.
const LOG_DISCARD_FLAG: u64 = 1 << 2;
/// A mark (a named point; never written by us or QEMU).
const LOG_MARK_FLAG: u64 = 1 << 3;
const LOG_FLAG_MASK: u64 = LOG_FLUSH_FLAG | LOG_FUA_FLAG | LOG_DISCARD_FLAG | LOG_MARK_FLAG;
/// The superblock's magic.
const WRITE_LOG_MAGIC: u64 = 0x006a_7366_7773_6872;
/// The only version of the format.
const WRITE_LOG_VERSION: u64 = 1;
/// Size of the superblock's fields (the rest of sector 0 is zero).
const SUPER_SIZE: usize = 28;
/// Size of an entry's fields; our timestamp follows them.
const ENTRY_SIZE: usize = 32;

/// The driver's options (QEMU's `BlockdevOptionsBlklogwrites` besides
/// the children).
#[derive(Debug, Clone, Default)]
pub struct BlklogwritesOptions {
    /// `log-sector-size` (default 512).
    pub log_sector_size: Option<u32>,
    /// `log-append`: continue an existing log.
    pub log_append: bool,
    /// `log-super-update-interval` (default 4096 entries).
    pub log_super_update_interval: Option<u64>,
}

/// Where the next entry goes.
struct LogState {
    cur_log_sector: u64,
    nr_entries: u64,
    /// Entries counted in the superblock on disk.
    super_entries: u64,
}

/// The recording filter.
pub struct BlkLogWrites {
    file: ChildEdge,
    log: ChildEdge,
    sector_size: u64,
    update_interval: u64,
    /// Held across each request and its entry (see the module doc).
    state: Mutex<LogState>,
}

fn sector_size_valid(s: u64) -> bool {
    s.is_power_of_two() && s >= SUPER_SIZE as u64 && s >= ENTRY_SIZE as u64 && s < 1 << 24
}

fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// Now on CLOCK_MONOTONIC, in nanoseconds.
fn monotonic_ns() -> u64 {
    match nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC) {
        Ok(t) => t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64,
        // CLOCK_MONOTONIC always exists on Linux; 0 would only lose the
        // cross-image order, never the order within one log.
        Err(_) => 0,
    }
}

impl BlkLogWrites {
    /// Open over `file`, logging to `log`, with QEMU's checks and texts.
    pub fn open(file: Arc<Node>, log: Arc<Node>, o: &BlklogwritesOptions) -> Result<Self> {
        let (sector_size, cur_log_sector, nr_entries) = if o.log_append {
            if o.log_sector_size.is_some() {
                return Err(Error::generic(
                    "log-append and log-sector-size are mutually exclusive",
                ));
            }
            let mut sb = [0u8; SUPER_SIZE];
            if log.len()? == 0 {
                // An empty log: as if it had a superblock with no entries.
                sb[0..8].copy_from_slice(&WRITE_LOG_MAGIC.to_le_bytes());
                sb[8..16].copy_from_slice(&WRITE_LOG_VERSION.to_le_bytes());
                sb[24..28].copy_from_slice(&512u32.to_le_bytes());
            } else {
                log.pread(0, &mut sb)
                    .map_err(|e| e.prepend("Could not read log superblock: "))?;
            }
            if le64(&sb, 0) != WRITE_LOG_MAGIC {
                return Err(Error::generic("Invalid log superblock magic"));
            }
            let version = le64(&sb, 8);
            if version != WRITE_LOG_VERSION {
                return Err(Error::generic(format!("Unsupported log version {version}")));
            }
            let size = u64::from(u32::from_le_bytes(sb[24..28].try_into().expect("4")));
            let entries = le64(&sb, 16);
            if sector_size_valid(size) {
                (size, find_cur_log_sector(&log, size, entries)?, entries)
            } else {
                (size, 1, 0)
            }
        } else {
            (u64::from(o.log_sector_size.unwrap_or(512)), 1, 0)
        };
        if !sector_size_valid(sector_size) {
            return Err(Error::generic(format!(
                "Invalid log sector size {sector_size}"
            )));
        }
        let update_interval = o.log_super_update_interval.unwrap_or(4096);
        if update_interval == 0 {
            return Err(Error::generic(format!(
                "Invalid log superblock update interval {update_interval}"
            )));
        }
        Ok(BlkLogWrites {
            file: ChildEdge::new(file),
            log: ChildEdge::new(log),
            sector_size,
            update_interval,
            state: Mutex::new(LogState {
                cur_log_sector,
                nr_entries,
                super_entries: nr_entries,
            }),
        })
    }

    fn file(&self) -> Arc<Node> {
        self.file.get()
    }

    /// Append one entry (and `data`, or `zero_len` zero bytes) to the log.
    fn append(
        &self,
        st: &mut LogState,
        (offset, len): (u64, u64),
        flags: u64,
        data: Option<&[u8]>,
        zero_len: u64,
    ) -> Result<()> {
        let log = self.log.get();
        let ss = self.sector_size;
        let mut entry = vec![0u8; ss as usize];
        entry[0..8].copy_from_slice(&(offset / ss).to_le_bytes());
        entry[8..16].copy_from_slice(&(len / ss).to_le_bytes());
        entry[16..24].copy_from_slice(&flags.to_le_bytes());
        // data_len stays 0, as QEMU writes it; then our timestamp.
        entry[32..40].copy_from_slice(&monotonic_ns().to_le_bytes());
        if let Some(d) = data {
            entry.extend_from_slice(d);
        }
        let at = st.cur_log_sector * ss;
        st.nr_entries += 1;
        st.cur_log_sector += (entry.len() as u64).div_ceil(ss);
        log.pwrite(at, &entry)?;
        if zero_len > 0 {
            let at = st.cur_log_sector * ss;
            st.cur_log_sector += zero_len.div_ceil(ss);
            log.pwrite_zeroes(at, zero_len, false)?;
        }
        if flags & LOG_FLUSH_FLAG != 0 || st.nr_entries.is_multiple_of(self.update_interval) {
            self.write_super(st)?;
        }
        Ok(())
    }

    fn write_super(&self, st: &mut LogState) -> Result<()> {
        let log = self.log.get();
        let mut sb = vec![0u8; self.sector_size as usize];
        sb[0..8].copy_from_slice(&WRITE_LOG_MAGIC.to_le_bytes());
        sb[8..16].copy_from_slice(&WRITE_LOG_VERSION.to_le_bytes());
        sb[16..24].copy_from_slice(&st.nr_entries.to_le_bytes());
        sb[24..28].copy_from_slice(&(self.sector_size as u32).to_le_bytes());
        log.pwrite(0, &sb)?;
        log.flush()?;
        st.super_entries = st.nr_entries;
        Ok(())
    }

    /// The sector-aligned span around `[offset, offset + len)`.
    fn widen(&self, offset: u64, len: u64) -> (u64, u64) {
        let ss = self.sector_size;
        let start = offset / ss * ss;
        let end = (offset + len).div_ceil(ss) * ss;
        (start, end - start)
    }

    /// The file's bytes of `[start, start + buf.len())`, zeroes past its end.
    fn read_span(&self, file: &Node, start: u64, buf: &mut [u8]) -> Result<()> {
        let flen = file.len()?;
        let n = flen.saturating_sub(start).min(buf.len() as u64) as usize;
        buf[n..].fill(0);
        if n > 0 {
            file.pread(start, &mut buf[..n])?;
        }
        Ok(())
    }

    /// A write of `buf` at `offset` (zeroes when `buf` is `None`), widened
    /// to whole sectors, then logged.
    fn logged_write(&self, offset: u64, len: u64, buf: Option<&[u8]>, unmap: bool) -> Result<()> {
        let file = self.file();
        let mut st = self.state.lock();
        let (start, span) = self.widen(offset, len);
        if start == offset && span == len {
            match buf {
                Some(b) => file.pwrite(offset, b)?,
                None => file.pwrite_zeroes(offset, len, unmap)?,
            }
            return self.append(
                &mut st,
                (offset, len),
                0,
                buf,
                if buf.is_none() { len } else { 0 },
            );
        }
        let mut whole = vec![0u8; span as usize];
        self.read_span(&file, start, &mut whole)?;
        let at = (offset - start) as usize;
        match buf {
            Some(b) => whole[at..at + b.len()].copy_from_slice(b),
            None => whole[at..at + len as usize].fill(0),
        }
        file.pwrite(start, &whole)?;
        self.append(&mut st, (start, span), 0, Some(&whole), 0)
    }
}

/// Where the entry after the first `nr_entries` of a log starts (QEMU's
/// `blk_log_writes_find_cur_log_sector`, with its texts).
fn find_cur_log_sector(log: &Node, sector_size: u64, nr_entries: u64) -> Result<u64> {
    let mut cur = 1u64;
    for idx in 0..nr_entries {
        let mut e = [0u8; ENTRY_SIZE];
        log.pread(cur * sector_size, &mut e)
            .map_err(|err| err.prepend(format!("Failed to read log entry {idx}: ")))?;
        let flags = le64(&e, 16);
        if flags & !LOG_FLAG_MASK != 0 {
            return Err(Error::generic(format!(
                "Invalid flags 0x{flags:x} in log entry {idx}"
            )));
        }
        cur += 1;
        if flags & LOG_DISCARD_FLAG == 0 {
            cur += le64(&e, 8);
        }
    }
    Ok(cur)
}

impl Drop for BlkLogWrites {
    fn drop(&mut self) {
        // Entries after the last superblock update would be invisible to
        // a reader; QEMU leaves them so, we count them at close.
        let st = self.state.get_mut();
        if st.nr_entries != st.super_entries {
            let mut st = LogState {
                cur_log_sector: st.cur_log_sector,
                nr_entries: st.nr_entries,
                super_entries: st.super_entries,
            };
            if let Err(e) = self.write_super(&mut st) {
                // Nobody to return it to: the node is going away.
                eprintln!("blockjob: blklogwrites: could not update the log superblock: {e}");
            }
        }
    }
}

impl BlockDriver for BlkLogWrites {
    fn driver_name(&self) -> &'static str {
        "blklogwrites"
    }

    fn len(&self) -> Result<u64> {
        self.file().len()
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.file().pread(offset, buf)
    }

    fn write(&self, offset: u64, buf: &[u8]) -> Result<()> {
        self.logged_write(offset, buf.len() as u64, Some(buf), false)
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<()> {
        self.logged_write(offset, len, None, may_unmap)
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        let ss = self.sector_size;
        let start = offset.div_ceil(ss) * ss;
        let end = (offset + len) / ss * ss;
        if end <= start {
            return Ok(());
        }
        let file = self.file();
        let mut st = self.state.lock();
        file.pdiscard(start, end - start)?;
        self.append(&mut st, (start, end - start), LOG_DISCARD_FLAG, None, 0)
    }

    fn can_discard(&self) -> bool {
        self.file().driver().can_discard()
    }

    fn can_grow(&self) -> bool {
        self.file().driver().can_grow()
    }

    fn flush(&self) -> Result<()> {
        let file = self.file();
        let mut st = self.state.lock();
        file.flush()?;
        self.append(&mut st, (0, 0), LOG_FLUSH_FLAG, None, 0)
    }

    fn start_writeback(&self, offset: u64, len: u64) {
        // A hint, not a request: nothing to log.
        self.file().start_writeback(offset, len)
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus> {
        self.file().block_status(offset, len)
    }

    fn children(&self) -> Vec<NodeChild> {
        vec![
            NodeChild {
                role: "file",
                node: self.file(),
            },
            NodeChild {
                role: "log",
                node: self.log.get(),
            },
        ]
    }

    fn filtered_child(&self) -> Option<Arc<Node>> {
        Some(self.file())
    }

    fn child_perm(&self, child: &NodeChild, p: Perms, writable: bool) -> Perms {
        // QEMU's blk_log_writes_child_perm: the file gets what the parents
        // ask for; the log is written (metadata of this node).
        if child.role == "file" {
            perm::filter_perms(p)
        } else {
            perm::storage_perms(p, true, false, writable)
        }
    }

    fn replace_child(&self, old: &Arc<Node>, new: &Arc<Node>) {
        self.file.replace(old, new);
        self.log.replace(old, new);
    }

    fn cluster_size(&self) -> Option<u64> {
        self.file().cluster_size()
    }

    fn filename(&self) -> String {
        // The image's own name, so that a qcow2 above resolves relative
        // backing names and rewrites its header as over a plain file.
        self.file().filename()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sector_sizes() {
        assert!(sector_size_valid(512));
        assert!(sector_size_valid(4096));
        assert!(sector_size_valid(32));
        assert!(!sector_size_valid(16));
        assert!(!sector_size_valid(1000));
        assert!(!sector_size_valid(1 << 24));
    }
}
