//! `cache.direct=on` (`O_DIRECT`) for the `file` and `host_device`
//! drivers: the kernel takes only requests whose offset, length and buffer
//! address are multiples of the device's alignments, and refuses others
//! with EINVAL. QEMU's generic layer pads such requests; here the driver
//! does: an unaligned read goes through an aligned bounce buffer covering
//! whole blocks, an unaligned write reads the partial head and tail blocks
//! and writes whole blocks (read-modify-write), and an aligned request
//! from an unaligned buffer is only copied. Nothing unaligned reaches the
//! kernel.
//!
//! The alignments are probed at open as QEMU's `raw_probe_alignment`
//! does: a block device's logical block size (`BLKSSZGET`), otherwise the
//! smallest of 512…4096 bytes that a read at offset 0 accepts; then the
//! smallest memory alignment a read of a whole block accepts.

use std::fs::File;
use std::os::unix::fs::FileExt;

use super::aligned::AlignedBuf;
use crate::error::{Error, Result};
use crate::locks::{Condvar, Mutex};
use std::sync::Arc;

/// QEMU's `MAX_BLOCKSIZE`: the largest request alignment probed.
const MAX_BLOCKSIZE: usize = 4096;

/// The alignments of an `O_DIRECT` file and the lock that keeps a
/// read-modify-write from racing with other writes of its blocks.
#[derive(Debug)]
pub(crate) struct DirectIo {
    /// Offsets and lengths are multiples of this (QEMU's
    /// `request_alignment`).
    align: u64,
    /// Buffer addresses are multiples of this (`min_mem_alignment`).
    mem_align: usize,
    /// Aligned writes take it shared, read-modify-writes exclusively: a
    /// read-modify-write rewrites whole blocks, so a write into the same
    /// blocks between its read and its write would be lost.
    rmw: Arc<RmwLock>,
}

/// The lock of [`DirectIo::rmw`]. Not std's `RwLock`: an aligned write
/// submitted asynchronously (a resolved request, see `super::resolve`)
/// holds its share until the kernel completes it, on another thread.
/// Writers first: a waiting read-modify-write stops new shares.
#[derive(Debug, Default)]
struct RmwLock {
    /// (shares held, exclusive held, exclusive waiting)
    state: Mutex<(u64, bool, u64)>,
    cv: Condvar,
}

/// A share of the [`RmwLock`], released when dropped.
pub(crate) struct RmwShare(Arc<RmwLock>);

impl Drop for RmwShare {
    fn drop(&mut self) {
        let mut g = self.0.state.lock();
        g.0 -= 1;
        // Only a waiting read-modify-write needs the wake-up (a system
        // call otherwise, for every aligned write that finds none).
        if g.0 == 0 && g.2 > 0 {
            self.0.cv.notify_all();
        }
    }
}

/// The exclusive hold of the [`RmwLock`].
struct RmwExclusive<'a>(&'a RmwLock);

impl Drop for RmwExclusive<'_> {
    fn drop(&mut self) {
        self.0.state.lock().1 = false;
        self.0.cv.notify_all();
    }
}

impl RmwLock {
    fn share(self: &Arc<Self>) -> RmwShare {
        let mut g = self.state.lock();
        while g.1 || g.2 > 0 {
            g = self.cv.wait(g);
        }
        g.0 += 1;
        RmwShare(self.clone())
    }

    fn try_share(self: &Arc<Self>) -> Option<RmwShare> {
        let mut g = self.state.lock();
        if g.1 || g.2 > 0 {
            return None;
        }
        g.0 += 1;
        Some(RmwShare(self.clone()))
    }

    fn exclusive(&self) -> RmwExclusive<'_> {
        let mut g = self.state.lock();
        g.2 += 1;
        while g.1 || g.0 > 0 {
            g = self.cv.wait(g);
        }
        g.2 -= 1;
        g.1 = true;
        RmwExclusive(self)
    }
}

/// Whether a read of `len` bytes at offset 0 into `buf` is accepted
/// (QEMU's `raw_is_io_aligned`: anything but EINVAL counts as accepted).
fn accepted(file: &File, buf: &mut [u8]) -> bool {
    match file.read_at(buf, 0) {
        Ok(_) => true,
        Err(e) => e.raw_os_error() != Some(libc::EINVAL),
    }
}

impl DirectIo {
    /// Probe the alignments of `file`, opened with `O_DIRECT`;
    /// `logical_block` is a block device's logical block size.
    pub(crate) fn probe(file: &File, logical_block: Option<u64>) -> Result<DirectIo> {
        // QEMU probes up to max(MAX_BLOCKSIZE, page size); pages are
        // 4 KiB on the targets we build for, so both are 4096.
        let max_align = MAX_BLOCKSIZE;
        let mut buf = AlignedBuf::zeroed(2 * max_align, max_align);
        let align = match logical_block {
            Some(b) => Some(b),
            None => {
                let mut a = 512;
                loop {
                    if a > MAX_BLOCKSIZE {
                        break None;
                    }
                    if accepted(file, &mut buf[..a]) {
                        break Some(a as u64);
                    }
                    a <<= 1;
                }
            }
        };
        let mut mem_align = None;
        let mut a = 512;
        while a <= max_align {
            if accepted(file, &mut buf[a..a + max_align]) {
                mem_align = Some(a);
                break;
            }
            a <<= 1;
        }
        match (align, mem_align) {
            (Some(align), Some(mem_align)) => Ok(DirectIo {
                align,
                mem_align,
                rmw: Arc::default(),
            }),
            _ => Err(Error::generic("Could not find working O_DIRECT alignment")
                .append_hint("Try cache.direct=off")),
        }
    }

    /// The request alignment.
    pub(crate) fn align(&self) -> u64 {
        self.align
    }

    /// An aligned write from an aligned buffer that can go straight to the
    /// kernel now, holding its share of the write lock until it ends;
    /// `None` when it would need the bounce or read-modify-write path, or
    /// a read-modify-write is under way.
    pub(crate) fn plain_write(&self, offset: u64, len: u64, buf: usize) -> Option<RmwShare> {
        (self.plain_read(offset, len, buf)).then(|| self.rmw.try_share())?
    }

    /// Whether a read can go straight to the kernel.
    pub(crate) fn plain_read(&self, offset: u64, len: u64, buf: usize) -> bool {
        offset.is_multiple_of(self.align)
            && len.is_multiple_of(self.align)
            && buf.is_multiple_of(self.mem_align)
    }

    fn aligned(&self, offset: u64, len: usize) -> bool {
        offset.is_multiple_of(self.align) && (len as u64).is_multiple_of(self.align)
    }

    fn mem_aligned(&self, p: *const u8) -> bool {
        (p as usize).is_multiple_of(self.mem_align)
    }

    /// The whole blocks around `[offset, offset + len)`.
    fn around(&self, offset: u64, len: usize) -> (u64, u64) {
        let start = offset / self.align * self.align;
        let end = (offset + len as u64).div_ceil(self.align) * self.align;
        (start, end)
    }

    /// Read whole blocks at `offset` into an aligned buffer; what lies past
    /// the end of the file reads as zeroes (a file whose size is not a
    /// multiple of the block size ends inside its last block). Returns
    /// how many bytes the file held.
    fn read_blocks(&self, file: &File, offset: u64, buf: &mut [u8]) -> Result<usize> {
        let mut done = 0;
        while done < buf.len() {
            match file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        buf[done..].fill(0);
        Ok(done)
    }

    /// Read `buf.len()` bytes at `offset`; `plain` reads an aligned
    /// request straight into an aligned buffer.
    pub(crate) fn read(
        &self,
        file: &File,
        offset: u64,
        buf: &mut [u8],
        plain: impl FnOnce(&mut [u8]) -> Result<()>,
    ) -> Result<()> {
        if self.aligned(offset, buf.len()) && self.mem_aligned(buf.as_ptr()) {
            return plain(buf);
        }
        let (start, end) = self.around(offset, buf.len());
        let mut tmp = AlignedBuf::zeroed((end - start) as usize, self.mem_align);
        let got = self.read_blocks(file, start, &mut tmp)?;
        let skip = (offset - start) as usize;
        // The range was checked against the size: if the file ended
        // before it, the file shrank underneath us.
        if got < skip + buf.len() {
            return Err(Error::from_errno(libc::EIO));
        }
        buf.copy_from_slice(&tmp[skip..skip + buf.len()]);
        Ok(())
    }

    /// Write `buf` at `offset` with `plain`, which writes an aligned
    /// buffer at an aligned offset. In a regular file (`is_file`), a
    /// read-modify-write whose padding went past the end of the file cuts
    /// the file back to the end of the request, as a buffered write would
    /// have left it.
    pub(crate) fn write(
        &self,
        file: &File,
        offset: u64,
        buf: &[u8],
        is_file: bool,
        plain: impl FnOnce(u64, &[u8]) -> Result<()>,
    ) -> Result<()> {
        if self.aligned(offset, buf.len()) {
            let _shared = self.rmw.share();
            if self.mem_aligned(buf.as_ptr()) {
                return plain(offset, buf);
            }
            let mut tmp = AlignedBuf::zeroed(buf.len(), self.mem_align);
            tmp.copy_from_slice(buf);
            return plain(offset, &tmp);
        }
        let _exclusive = self.rmw.exclusive();
        // Under the exclusive lock no other write can grow the file.
        let size = if is_file {
            file.metadata().map_err(Error::from)?.len()
        } else {
            u64::MAX
        };
        let (start, end) = self.around(offset, buf.len());
        let mut tmp = AlignedBuf::zeroed((end - start) as usize, self.mem_align);
        let a = self.align as usize;
        let skip = (offset - start) as usize;
        // Only the partial blocks at either end need the old data.
        if skip != 0 {
            self.read_blocks(file, start, &mut tmp[..a])?;
        }
        let tail = end - self.align;
        let req_end = offset + buf.len() as u64;
        if req_end < end && (tail > start || skip == 0) {
            let at = (tail - start) as usize;
            self.read_blocks(file, tail, &mut tmp[at..])?;
        }
        tmp[skip..skip + buf.len()].copy_from_slice(buf);
        plain(start, &tmp)?;
        // Padding written past the old end grew the file beyond the
        // request: the file ends where the request does (or where it
        // ended before), as with a buffered write.
        if end > size && req_end < end {
            file.set_len(size.max(req_end)).map_err(Error::from)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::OpenOptionsExt;

    fn open_direct(p: &std::path::Path) -> File {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(p)
            .unwrap()
    }

    /// Unaligned reads and writes of every shape agree with the same
    /// operations on a plain buffer, and the file keeps its size.
    /// A share held elsewhere (a write on a ring) keeps a read-modify-
    /// write out until it ends; while one waits or runs, no new share is
    /// given without waiting.
    #[test]
    fn rmw_waits_for_shares_held_elsewhere() {
        let lock = Arc::new(RmwLock::default());
        let share = lock.try_share().expect("free");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::scope(|s| {
            s.spawn(|| {
                let _x = lock.exclusive();
                tx.send(()).unwrap();
                std::thread::sleep(std::time::Duration::from_millis(50));
            });
            assert!(
                rx.recv_timeout(std::time::Duration::from_millis(200))
                    .is_err(),
                "exclusive waits for the share"
            );
            assert!(
                lock.try_share().is_none(),
                "a waiting exclusive stops new shares"
            );
            drop(share);
            rx.recv_timeout(std::time::Duration::from_secs(10)).unwrap();
            assert!(lock.try_share().is_none(), "nor while it runs");
        });
        assert!(lock.try_share().is_some(), "free again");
        let _blocking = lock.share();
    }

    #[test]
    fn unaligned_requests_match_a_model() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.raw");
        let size = 64 * 1024 + 1000; // ends inside a block
        let mut model: Vec<u8> = (0..size).map(|i| (i * 7 % 251) as u8).collect();
        std::fs::write(&p, &model).unwrap();
        let f = open_direct(&p);
        let d = DirectIo::probe(&f, None).unwrap();
        assert!(d.align >= 512 && d.align <= 4096, "{d:?}");
        let plain_w = |o: u64, b: &[u8]| -> Result<()> {
            assert!(d.aligned(o, b.len()));
            f.write_all_at(b, o).map_err(Error::from)
        };
        let cases: &[(u64, usize)] = &[
            (0, 1),
            (1, 511),
            (511, 2),
            (100, 5000),
            (4096, 4096),
            (4095, 8194),
            (size as u64 - 10, 10),
            (size as u64 - 1500, 1500),
        ];
        for (i, &(off, len)) in cases.iter().enumerate() {
            let data: Vec<u8> = (0..len).map(|j| (j + i * 13) as u8 | 1).collect();
            d.write(&f, off, &data, true, plain_w).unwrap();
            model[off as usize..off as usize + len].copy_from_slice(&data);
            assert_eq!(f.metadata().unwrap().len(), size as u64, "{off} {len}");
            let mut back = vec![0u8; len];
            d.read(&f, off, &mut back, |b| {
                assert!(d.aligned(off, b.len()));
                assert!(d.mem_aligned(b.as_ptr()));
                f.read_exact_at(b, off).map_err(Error::from)
            })
            .unwrap();
            assert_eq!(back, data, "{off} {len}");
        }
        let mut all = vec![0u8; size];
        // A length that is not a multiple of the block size: bounced.
        d.read(&f, 0, &mut all, |_| panic!("unaligned length went down"))
            .unwrap();
        assert!(all == model);
    }
}
