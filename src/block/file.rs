//! `file` and `host_device`: raw files and block devices through
//! `pread`/`pwrite`; for files, holes found with `SEEK_DATA`/`SEEK_HOLE`,
//! zeroes and discards with `fallocate`; for block devices, the size from
//! `BLKGETSIZE64`, zeroes and discards with `BLKZEROOUT`/`BLKDISCARD`
//! (the `blkdev` module). `cache.direct=on` opens with `O_DIRECT` and
//! aligns every request (the `direct` module).

use crate::locks::Mutex;
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};

use nix::errno::Errno;
use nix::fcntl::{FallocateFlags, fallocate};
use nix::unistd::{Whence, lseek};

use super::direct::DirectIo;
use super::perm::{FileLock, Locking, Perms};
use super::{BlockDriver, BlockStatus, WriteFlags, write_zero_buffers};
use crate::error::{Error, Result};
use crate::sync::{AtomicBool, AtomicU64, Ordering};

/// Options of the `file` driver that change behaviour.
#[derive(Debug, Clone, Default)]
pub struct FileOptions {
    /// Path to open.
    pub filename: String,
    /// Open read-only.
    pub read_only: bool,
    /// `discard: "unmap"`: pass discards (and zero writes that may unmap)
    /// down as hole punches. QEMU's default is `ignore`.
    pub discard_unmap: bool,
    /// `cache.direct`: open with `O_DIRECT`.
    pub direct: bool,
    /// `cache.no-flush`: flushes do nothing.
    pub no_flush: bool,
    /// `locking`: take QEMU's lock bytes (see [`super::perm`]).
    pub locking: Locking,
    /// `driver`: `host_device` instead of `file` (each refuses the
    /// other's kind of file, as QEMU's).
    pub host_device: bool,
    /// `aio`.
    pub aio: Aio,
}

/// The `aio` option: how requests reach the kernel.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Aio {
    /// `threads`: synchronous system calls on the requesting thread (the
    /// jobs' and devices' own threads are the pool).
    #[default]
    Threads,
    /// `native`: QEMU's Linux AIO; requires `cache.direct=on`. Served
    /// by io_uring here (same requests, same errors; see the README's
    /// Differences).
    Native,
    /// `io_uring`: reads and writes through a ring per requesting thread
    /// (the `uring` module).
    IoUring,
}

/// Whether `path` names a block device: QEMU's protocol probing opens
/// such a path with `host_device` where no driver is given (a backing
/// file name, a path on a command line).
pub fn is_block_device(path: &str) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.file_type().is_block_device())
}

/// A file or block device.
#[derive(Debug)]
pub struct FileDriver {
    file: File,
    opts: FileOptions,
    block_device: bool,
    /// The size, read once at open (QEMU's total_sectors): bounds checks
    /// cost no system call. Grows when a write goes past it.
    size: AtomicU64,
    data_cache: Mutex<DataCache>,
    /// `FALLOC_FL_ZERO_RANGE` failed as unsupported once: do not try again
    /// (QEMU's `has_write_zeroes`; tmpfs has no ZERO_RANGE).
    no_zero_range: AtomicBool,
    /// Punching a hole and allocating it again is not supported here.
    no_punch_alloc: AtomicBool,
    /// The lock bytes held on `file` (released with it: OFD locks belong
    /// to the open file description).
    lock: FileLock,
    /// `O_DIRECT`: the alignments requests are padded to.
    direct: Option<DirectIo>,
    /// A block device's logical block size (the unit of `BLKZEROOUT`
    /// and `BLKDISCARD`); 1 for files.
    sector: u64,
}

/// The last data extent `SEEK_DATA`/`SEEK_HOLE` found (QEMU's block-status
/// cache). On tmpfs and some other filesystems `SEEK_HOLE` walks every page
/// up to the next hole, so asking again for each granule of a large data
/// extent is quadratic. Only data is cached: writes never turn data into a
/// hole, and a stale "data" answer is safe (the range reads as zeroes and
/// is copied as such); discards and zero writes, which can make holes,
/// drop the cache and bump `generation` so that a lookup racing with them
/// does not store what it found.
#[derive(Debug, Default)]
struct DataCache {
    extent: Option<(u64, u64)>,
    generation: u64,
}

impl FileDriver {
    /// Open the file as QEMU's file-posix does, with QEMU's error texts
    /// (in QEMU's order: open, `aio`, kind of file, alignment).
    pub fn open(opts: FileOptions) -> Result<FileDriver> {
        let driver = if opts.host_device {
            "host_device"
        } else {
            "file"
        };
        if opts.filename.is_empty() {
            return Err(Error::generic(format!(
                "The '{driver}' block driver requires a file name"
            )));
        }
        let mut oo = OpenOptions::new();
        oo.read(true).write(!opts.read_only);
        if opts.direct {
            oo.custom_flags(libc::O_DIRECT);
        }
        let file = oo
            .open(&opts.filename)
            .map_err(|e| Error::from(e).prepend(format!("Could not open '{}': ", opts.filename)))?;
        if opts.aio == Aio::Native && !opts.direct {
            return Err(Error::generic(
                "aio=native was specified, but it requires cache.direct=on, which was not specified.",
            ));
        }
        if opts.aio != Aio::Threads {
            super::uring::check()?;
        }
        let meta = file.metadata().map_err(Error::from)?;
        if meta.is_dir() {
            return Err(Error::errno_msg(
                libc::EISDIR,
                format!("Could not open '{}': Is a directory", opts.filename),
            ));
        }
        let ft = meta.file_type();
        let block_device = ft.is_block_device();
        if opts.host_device && !block_device && !ft.is_char_device() {
            return Err(Error::generic(format!(
                "'host_device' driver requires '{}' to be either a character or block device",
                opts.filename
            )));
        }
        if !opts.host_device && !ft.is_file() {
            return Err(Error::generic(format!(
                "'file' driver requires '{}' to be a regular file",
                opts.filename
            )));
        }
        let (size, sector) = if block_device {
            (
                super::blkdev::size(&file)?,
                super::blkdev::logical_block_size(&file)?,
            )
        } else if ft.is_char_device() {
            (
                lseek(file.as_raw_fd(), 0, Whence::SeekEnd).map_err(Error::from)? as u64,
                1,
            )
        } else {
            (meta.len(), 1)
        };
        let direct = if opts.direct {
            Some(DirectIo::probe(&file, block_device.then_some(sector))?)
        } else {
            None
        };
        Ok(FileDriver {
            file,
            block_device,
            size: AtomicU64::new(size),
            data_cache: Mutex::default(),
            no_zero_range: AtomicBool::new(false),
            no_punch_alloc: AtomicBool::new(false),
            lock: FileLock::new(opts.locking),
            direct,
            sector,
            opts,
        })
    }

    /// The request alignment: `O_DIRECT`'s, else 1 (QEMU's
    /// `request_alignment`).
    pub fn request_alignment(&self) -> u64 {
        self.direct.as_ref().map_or(1, DirectIo::align)
    }

    fn fd(&self) -> i32 {
        self.file.as_raw_fd()
    }

    /// The permissions whose lock bytes are held now.
    pub fn locked_perms(&self) -> Perms {
        self.lock.current()
    }

    fn cache(&self) -> crate::locks::MutexGuard<'_, DataCache> {
        self.data_cache.lock()
    }

    /// `[offset, offset + len)` may have become a hole: keep only the part
    /// of the cached extent outside it (the part after it when there are
    /// two, since the mirror and most scans move forward).
    fn invalidate_data_cache(&self, offset: u64, len: u64) {
        let mut c = self.cache();
        let end = offset.saturating_add(len);
        c.extent = c.extent.and_then(|(s, e)| {
            if end <= s || e <= offset {
                Some((s, e))
            } else if end < e {
                Some((end, e))
            } else if s < offset {
                Some((s, offset))
            } else {
                None
            }
        });
        c.generation += 1;
    }

    /// `SEEK_DATA`/`SEEK_HOLE` at `offset` (no cache).
    fn seek_status(&self, offset: u64, len: u64) -> BlockStatus {
        // Read before seeking: a hole made after this may be what the
        // seek missed (see DataCache).
        let generation = self.cache().generation;
        let off = offset as i64;
        match lseek(self.fd(), off, Whence::SeekData) {
            // No data after offset: a hole up to the end of the file.
            Err(Errno::ENXIO) => BlockStatus::zero(len),
            // SEEK_DATA unsupported: everything is data.
            Err(_) => BlockStatus::data(len),
            Ok(data) if data > off => BlockStatus::zero(((data - off) as u64).min(len)),
            Ok(_) => match lseek(self.fd(), off, Whence::SeekHole) {
                Ok(hole) if hole > off => {
                    let end = hole as u64;
                    let mut c = self.cache();
                    if c.generation == generation {
                        c.extent = Some((offset, end));
                    }
                    BlockStatus::data((end - offset).min(len))
                }
                _ => BlockStatus::data(len),
            },
        }
    }

    /// Write zeroes; true when it was done by deallocating (hole punch or
    /// `FALLOC_FL_ZERO_RANGE`), false when zero buffers were written.
    /// Without `buffers_ok` (a fast zero), `ENOTSUP` where only zero
    /// buffers would do.
    fn write_zeroes_uncached(
        &self,
        offset: u64,
        len: u64,
        may_unmap: bool,
        buffers_ok: bool,
    ) -> Result<bool> {
        if self.block_device {
            // BLKZEROOUT may write zeroes the slow way in the kernel: no
            // promise for a fast zero (QEMU refuses NO_FALLBACK there too).
            if !buffers_ok {
                return Err(Error::from_errno(libc::ENOTSUP));
            }
            self.zero_out_device(offset, len)?;
            return Ok(false);
        }
        if may_unmap && self.opts.discard_unmap && !self.block_device {
            match self.punch_hole(offset, len) {
                Ok(()) => return Ok(true),
                Err(e) if e.errno() == Some(Errno::EOPNOTSUPP as i32) => {}
                Err(e) => return Err(e),
            }
        }
        // Relaxed: a hint; a racing request just tries once more.
        if !self.block_device && !self.no_zero_range.load(Ordering::Relaxed) {
            match fallocate(
                self.fd(),
                FallocateFlags::FALLOC_FL_ZERO_RANGE,
                offset as i64,
                len as i64,
            ) {
                Ok(()) => return Ok(true),
                Err(Errno::EOPNOTSUPP) => self.no_zero_range.store(true, Ordering::Relaxed),
                Err(Errno::EINVAL) => {}
                Err(e) => return Err(e.into()),
            }
        }
        // Without ZERO_RANGE (tmpfs), QEMU punches a hole and allocates it
        // again: zeroed by the kernel, still allocated, no buffers copied.
        // Relaxed: a hint, as above.
        if !self.block_device && !self.no_punch_alloc.load(Ordering::Relaxed) {
            let r = self.punch_hole(offset, len).and_then(|()| {
                fallocate(
                    self.fd(),
                    FallocateFlags::empty(),
                    offset as i64,
                    len as i64,
                )
                .map_err(Error::from)
            });
            match r {
                Ok(()) => return Ok(true),
                Err(e) if e.errno() == Some(Errno::EOPNOTSUPP as i32) => {
                    self.no_punch_alloc.store(true, Ordering::Relaxed)
                }
                Err(e) => return Err(e),
            }
        }
        if !buffers_ok {
            return Err(Error::from_errno(libc::ENOTSUP));
        }
        // No cheap way: write zero buffers.
        write_zero_buffers(offset, len, |o, b| self.write(o, b))?;
        Ok(false)
    }

    /// `BLKZEROOUT` for the whole logical blocks of the range; the
    /// partial blocks at either end (and everything, where the device
    /// cannot) as written zeroes.
    fn zero_out_device(&self, offset: u64, len: u64) -> Result<()> {
        let end = offset + len;
        let start = offset.next_multiple_of(self.sector);
        let mid_end = (end / self.sector * self.sector).max(start);
        if mid_end > start {
            match super::blkdev::zero_out(&self.file, start, mid_end - start) {
                Ok(()) => {}
                Err(e)
                    if matches!(
                        e.errno(),
                        Some(libc::EOPNOTSUPP | libc::EINVAL | libc::ENOTTY)
                    ) =>
                {
                    return write_zero_buffers(offset, len, |o, b| self.write(o, b));
                }
                Err(e) => return Err(e),
            }
        }
        write_zero_buffers(offset, start.min(end) - offset, |o, b| self.write(o, b))?;
        if mid_end.max(start) < end {
            let t = mid_end.max(start);
            write_zero_buffers(t, end - t, |o, b| self.write(o, b))?;
        }
        Ok(())
    }

    /// `BLKDISCARD` for the whole logical blocks of the range (a discard
    /// is a hint: partial blocks are left alone).
    fn discard_device(&self, offset: u64, len: u64) -> Result<()> {
        let start = offset.next_multiple_of(self.sector);
        let end = (offset + len) / self.sector * self.sector;
        if end <= start {
            return Ok(());
        }
        match super::blkdev::discard(&self.file, start, end - start) {
            Err(e) if matches!(e.errno(), Some(libc::EOPNOTSUPP | libc::ENOTTY)) => Ok(()),
            r => r,
        }
    }

    fn read_plain(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        if self.opts.aio != Aio::Threads {
            return super::uring::read_exact_at(self.fd(), buf, offset);
        }
        match self.file.read_exact_at(buf, offset) {
            Ok(()) => Ok(()),
            // The range was checked against the size: a short read means
            // the file shrank underneath us.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                Err(Error::from_errno(libc::EIO))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// A write ended at `end`: past the old size, the file grew.
    fn grown_to(&self, end: u64) {
        // Relaxed: see len().
        self.size.fetch_max(end, Ordering::Relaxed);
    }

    fn punch_hole(&self, offset: u64, len: u64) -> Result<()> {
        fallocate(
            self.fd(),
            FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
            offset as i64,
            len as i64,
        )
        .map_err(Error::from)
    }
}

impl BlockDriver for FileDriver {
    fn check_perm(&self, p: Perms) -> Result<()> {
        self.lock.check(&self.file, p, &self.opts.filename)
    }

    fn set_perm(&self) {
        self.lock.commit(&self.file);
    }

    fn abort_perm(&self) {
        self.lock.abort(&self.file);
    }

    fn driver_name(&self) -> &'static str {
        if self.opts.host_device {
            "host_device"
        } else {
            "file"
        }
    }

    fn len(&self) -> Result<u64> {
        // Relaxed: a plain value; a writer that grew the file publishes
        // its data through the file, not through this counter.
        Ok(self.size.load(Ordering::Relaxed))
    }

    fn can_grow(&self) -> bool {
        !self.block_device
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        match &self.direct {
            Some(d) => d.read(&self.file, offset, buf, |b| self.read_plain(offset, b)),
            None => self.read_plain(offset, buf),
        }
    }

    fn write(&self, offset: u64, buf: &[u8]) -> Result<()> {
        let plain = |o: u64, b: &[u8]| match self.opts.aio {
            Aio::Threads => self.file.write_all_at(b, o).map_err(Error::from),
            _ => super::uring::write_all_at(self.fd(), b, o),
        };
        match &self.direct {
            Some(d) => d.write(&self.file, offset, buf, !self.block_device, plain)?,
            None => plain(offset, buf)?,
        }
        self.grown_to(offset + buf.len() as u64);
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<()> {
        self.write_zeroes_with(offset, len, may_unmap, WriteFlags::default())
    }

    fn write_zeroes_with(
        &self,
        offset: u64,
        len: u64,
        may_unmap: bool,
        flags: WriteFlags,
    ) -> Result<()> {
        let made_holes = self.write_zeroes_uncached(offset, len, may_unmap, !flags.no_fallback)?;
        self.grown_to(offset + len);
        // Hole punches and ZERO_RANGE (unwritten extents) can make holes;
        // after the fact, so that no lookup that raced with it is kept.
        // Zero buffers keep data data.
        if made_holes {
            self.invalidate_data_cache(offset, len);
        }
        if flags.fua {
            self.flush()?;
        }
        Ok(())
    }
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        if !self.opts.discard_unmap {
            return Ok(());
        }
        if self.block_device {
            return self.discard_device(offset, len);
        }
        match self.punch_hole(offset, len) {
            Err(e) if e.errno() == Some(Errno::EOPNOTSUPP as i32) => Ok(()),
            r => {
                self.invalidate_data_cache(offset, len);
                r
            }
        }
    }

    fn can_discard(&self) -> bool {
        true
    }

    fn flush(&self) -> Result<()> {
        if self.opts.no_flush {
            return Ok(());
        }
        self.file.sync_data().map_err(Error::from)
    }

    fn start_writeback(&self, offset: u64, len: u64) {
        // cache.no-flush: the user does not want data forced out;
        // O_DIRECT: nothing is left in the page cache.
        if !self.opts.no_flush && !self.opts.direct {
            super::writeback::start(&self.file, offset, len);
        }
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus> {
        if self.block_device {
            return Ok(BlockStatus::data(len));
        }
        if let Some((start, end)) = self.cache().extent
            && (start..end).contains(&offset)
        {
            return Ok(BlockStatus::data((end - offset).min(len)));
        }
        Ok(self.seek_status(offset, len))
    }

    fn filename(&self) -> String {
        self.opts.filename.clone()
    }

    fn open_options(&self) -> Option<serde_json::Value> {
        Some(serde_json::json!({"driver": self.driver_name(), "filename": self.opts.filename}))
    }

    fn resolve(&self, req: super::resolve::Request, r: &mut super::resolve::Resolved) -> bool {
        // aio=threads keeps its pool; an O_DIRECT request that needs a
        // bounce buffer or read-modify-write goes the synchronous way.
        if self.opts.aio == Aio::Threads {
            return false;
        }
        if let Some(d) = &self.direct {
            if req.write {
                match d.plain_write(req.offset, req.len, req.buf) {
                    Some(share) => r.hold(share),
                    None => return false,
                }
            } else if !d.plain_read(req.offset, req.len, req.buf) {
                return false;
            }
        }
        // FUA: the driver's default, a flush after the write.
        r.land(
            self.fd(),
            req.offset,
            req.write && req.fua && !self.opts.no_flush,
        );
        true
    }

    fn copy_range_from(
        &self,
        offset: u64,
        _len: u64,
        sink: &mut super::copy_range::CopySink<'_>,
    ) -> Result<bool> {
        // copy_file_range goes through the page cache: an O_DIRECT node
        // copies through (aligned) buffers instead.
        if self.direct.is_some() {
            return Ok(false);
        }
        sink(&self.file, offset)
    }

    fn copy_range_to(&self, offset: u64, src: &File, src_offset: u64, len: u64) -> Result<bool> {
        if self.direct.is_some() {
            return Ok(false);
        }
        super::copy_range::copy_file_range_all(&self.file, offset, src, src_offset, len)
    }

    fn supports_zero_unmap(&self) -> bool {
        self.opts.discard_unmap && !self.block_device
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(path: &std::path::Path, discard_unmap: bool) -> FileDriver {
        FileDriver::open(FileOptions {
            filename: path.to_str().unwrap().into(),
            discard_unmap,
            ..Default::default()
        })
        .unwrap()
    }

    #[test]
    fn errors_have_qemu_texts() {
        let e = FileDriver::open(FileOptions::default()).unwrap_err();
        assert_eq!(e.message(), "The 'file' block driver requires a file name");
        let e = FileDriver::open(FileOptions {
            filename: "/nonexistent/x.img".into(),
            ..Default::default()
        })
        .unwrap_err();
        assert_eq!(
            e.message(),
            "Could not open '/nonexistent/x.img': No such file or directory"
        );
        assert_eq!(e.errno(), Some(libc::ENOENT));
        let e = FileDriver::open(FileOptions {
            filename: "/tmp".into(),
            read_only: true,
            ..Default::default()
        })
        .unwrap_err();
        assert_eq!(e.message(), "Could not open '/tmp': Is a directory");
    }

    #[test]
    fn read_write_holes_and_zeroes() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.raw");
        let f = std::fs::File::create(&p).unwrap();
        f.set_len(4 << 20).unwrap();
        drop(f);
        let d = open(&p, true);
        assert_eq!(d.len().unwrap(), 4 << 20);
        // A fresh sparse file is one hole.
        let st = d.block_status(0, 4 << 20).unwrap();
        assert!(st.zero && !st.data, "{st:?}");
        d.write(1 << 20, &[0x5a; 65536]).unwrap();
        let st = d.block_status(0, 4 << 20).unwrap();
        assert!(st.zero);
        assert_eq!(st.len, 1 << 20);
        let st = d.block_status(1 << 20, 3 << 20).unwrap();
        assert!(st.data);
        assert!(st.len >= 65536 && st.len < 3 << 20, "{st:?}");
        let mut buf = vec![0u8; 65536];
        d.read(1 << 20, &mut buf).unwrap();
        assert!(buf.iter().all(|b| *b == 0x5a));
        d.write_zeroes(1 << 20, 65536, true).unwrap();
        d.read(1 << 20, &mut buf).unwrap();
        assert!(buf.iter().all(|b| *b == 0));
        let st = d.block_status(0, 4 << 20).unwrap();
        assert!(st.zero);
        d.flush().unwrap();
    }

    #[test]
    fn cached_data_extent_is_dropped_when_holes_are_made() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.raw");
        std::fs::File::create(&p).unwrap().set_len(8 << 20).unwrap();
        let d = open(&p, true);
        d.write(1 << 20, &vec![7u8; 4 << 20]).unwrap();
        // The first lookup caches the extent; later ones inside it agree.
        let st = d.block_status(1 << 20, 8 << 20).unwrap();
        assert!(st.data && st.len >= 4 << 20, "{st:?}");
        let st = d.block_status(3 << 20, 1 << 20).unwrap();
        assert!(st.data && st.len == 1 << 20, "{st:?}");
        assert!(d.cache().extent.is_some());
        // A discard punches a hole inside the cached extent.
        d.discard(2 << 20, 1 << 20).unwrap();
        let st = d.block_status(2 << 20, 1 << 20).unwrap();
        assert!(st.zero && !st.data, "{st:?}");
        // So does a zero write that may unmap.
        let st = d.block_status(4 << 20, 1 << 20).unwrap();
        assert!(st.data, "{st:?}");
        d.write_zeroes(4 << 20, 1 << 20, true).unwrap();
        let st = d.block_status(4 << 20, 1 << 20).unwrap();
        assert!(st.zero && !st.data, "{st:?}");
    }
    /// An O_DIRECT file never offers itself for `copy_file_range` (on some
    /// kernels the copy goes through the page cache), on either side.
    #[test]
    fn direct_files_do_not_offload_copies() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.raw");
        std::fs::File::create(&p).unwrap().set_len(1 << 20).unwrap();
        let d = FileDriver::open(FileOptions {
            filename: p.to_str().unwrap().into(),
            direct: true,
            ..Default::default()
        })
        .unwrap();
        assert!(d.request_alignment() >= 512);
        let mut called = false;
        let r = d.copy_range_from(0, 4096, &mut |_, _| {
            called = true;
            Ok(true)
        });
        assert_eq!(r, Ok(false));
        assert!(!called);
        let other = std::fs::File::open(&p).unwrap();
        assert_eq!(d.copy_range_to(0, &other, 0, 4096), Ok(false));
        // Buffered, the same file offers itself.
        let b = open(&p, false);
        assert_eq!(b.request_alignment(), 1);
        assert_eq!(b.copy_range_from(0, 4096, &mut |_, _| Ok(true)), Ok(true));
    }

    /// aio=io_uring and aio=native read and write what aio=threads does,
    /// buffered and O_DIRECT, and fail with the same errno.
    #[test]
    fn every_aio_mode_reads_writes_and_fails_alike() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("u.raw");
        std::fs::File::create(&p).unwrap().set_len(1 << 20).unwrap();
        let modes = [Aio::Threads, Aio::IoUring, Aio::Native];
        for (i, aio) in modes.into_iter().enumerate() {
            for direct in [false, true] {
                if aio == Aio::Native && !direct {
                    continue;
                }
                let o = |read_only| FileOptions {
                    filename: p.to_str().unwrap().into(),
                    aio,
                    direct,
                    read_only,
                    ..Default::default()
                };
                let d = FileDriver::open(o(false)).unwrap();
                let data: Vec<u8> = (0..70_000).map(|j| (j + i) as u8).collect();
                d.write(4097, &data).unwrap();
                let mut back = vec![0u8; data.len()];
                d.read(4097, &mut back).unwrap();
                assert!(back == data, "{aio:?} direct={direct}");
                let on_disk = std::fs::read(&p).unwrap();
                assert!(on_disk[4097..4097 + data.len()] == data[..]);
                // A write through a read-only descriptor: EBADF either way.
                let ro = FileDriver::open(o(true)).unwrap();
                let e = ro.write(0, &[1; 4096]).unwrap_err();
                assert_eq!(e.errno(), Some(libc::EBADF), "{aio:?}: {e:?}");
                // Past the end of the file: EIO (the file "shrank").
                let mut past = vec![0u8; 4096];
                let e = d.read_plain(1 << 20, &mut past).unwrap_err();
                assert_eq!(e.errno(), Some(libc::EIO), "{aio:?}: {e:?}");
            }
        }
    }

    /// A zero write that may not unmap keeps the range allocated, on
    /// tmpfs (no ZERO_RANGE: punch and allocate again) and on the root
    /// filesystem of the temporary directory (ZERO_RANGE on ext4), and
    /// reads back zeroes.
    #[test]
    fn zero_writes_without_unmap_stay_allocated() {
        let shm = std::path::Path::new("/dev/shm");
        let dirs = [
            tempfile::tempdir_in(shm).unwrap(),
            tempfile::tempdir().unwrap(),
        ];
        for dir in &dirs {
            let p = dir.path().join("z.raw");
            std::fs::File::create(&p).unwrap().set_len(4 << 20).unwrap();
            let d = open(&p, true);
            d.write(0, &vec![9u8; 2 << 20]).unwrap();
            let blocks = |p: &std::path::Path| {
                use std::os::unix::fs::MetadataExt;
                std::fs::metadata(p).unwrap().blocks() * 512
            };
            let before = blocks(&p);
            assert!(before >= 2 << 20, "{before}");
            // Inside the data, and past it into the hole.
            d.write_zeroes(1 << 20, 2 << 20, false).unwrap();
            let mut buf = vec![1u8; 2 << 20];
            d.read(1 << 20, &mut buf).unwrap();
            assert!(buf.iter().all(|b| *b == 0), "{}", p.display());
            assert!(blocks(&p) >= 3 << 20, "{}: {}", p.display(), blocks(&p));
        }
    }
}
