//! Copy offload (QEMU's `bdrv_co_copy_range`): copy a range from one node
//! to another without passing the bytes through a user-space buffer, when
//! both ends are plain files (`copy_file_range(2)`; on a filesystem with
//! reflinks it may share extents, on others the kernel copies page-cache
//! pages directly).
//!
//! The request descends both graphs through the generic layer, so every
//! node on the way does its bookkeeping (bounds, permissions, requests in
//! flight, write generation for flush, dirty bitmaps, blkdebug events): the
//! source side walks down to a file and hands it to the target side, which
//! walks down to its file and copies. A node that cannot take part (a
//! `blkdebug` that must see each request, a target with `detect-zeroes`, a
//! host node) answers "not offloaded" and the caller copies through a
//! buffer instead, which also keeps error attribution (read or write)
//! exact.

use std::fs::File;

use super::{BlkdebugEvent, Node};
use crate::error::Result;
use crate::sync::Ordering;

/// Where the source's bytes are: a file and the offset in it.
pub type CopySink<'a> = dyn FnMut(&File, u64) -> Result<bool> + 'a;

impl Node {
    /// Copy `len` bytes at `offset` of this node to `dst` at `dst_offset`
    /// without a buffer. `Ok(false)`: not possible here (nothing was
    /// written); copy through a buffer instead.
    pub fn copy_range_to(
        &self,
        offset: u64,
        dst: &Node,
        dst_offset: u64,
        len: u64,
    ) -> Result<bool> {
        self.copy_source(offset, len, &mut |file, file_offset| {
            dst.copy_from_file(dst_offset, file, file_offset, len)
        })
    }

    /// The source side of a copy: check and account the request here, and
    /// let the driver find the file that holds the range.
    pub(crate) fn copy_source(
        &self,
        offset: u64,
        len: u64,
        sink: &mut CopySink<'_>,
    ) -> Result<bool> {
        let _f = self.begin();
        self.check_range(offset, len)?;
        if len == 0 {
            return Ok(true);
        }
        self.drv.copy_range_from(offset, len, sink)
    }

    /// The target side of a copy: write `len` bytes at `offset` from
    /// `src` at `src_offset`, with a write's bookkeeping.
    pub(crate) fn copy_from_file(
        &self,
        offset: u64,
        src: &File,
        src_offset: u64,
        len: u64,
    ) -> Result<bool> {
        let _f = self.begin();
        self.check_writable()?;
        self.check_range(offset, len)?;
        // Relaxed: written once before the node is shared (see pwrite).
        if self.detect_zeroes.load(Ordering::Relaxed) != 0 {
            // Zero detection needs the bytes.
            return Ok(false);
        }
        self.debug_event(BlkdebugEvent::Pwritev);
        // Relaxed: see pwrite.
        self.write_gen.fetch_add(1, Ordering::Relaxed);
        let r = self.drv.copy_range_to(offset, src, src_offset, len);
        self.debug_event(BlkdebugEvent::PwritevDone);
        if !matches!(r, Ok(false)) {
            // Written, or failed after writing part of it: as in pwrite.
            self.bitmaps.set_dirty(offset, len);
        }
        r
    }
}

/// `copy_file_range` from `src` at `src_offset` into `dst` at `offset`.
/// `Ok(false)` when the kernel or filesystem cannot (nothing was copied).
pub(crate) fn copy_file_range_all(
    dst: &File,
    offset: u64,
    src: &File,
    src_offset: u64,
    len: u64,
) -> Result<bool> {
    use nix::errno::Errno;
    let mut done = 0u64;
    while done < len {
        let mut off_in = (src_offset + done) as i64;
        let mut off_out = (offset + done) as i64;
        let want = (len - done).min(1 << 30) as usize;
        match nix::fcntl::copy_file_range(src, Some(&mut off_in), dst, Some(&mut off_out), want) {
            Ok(0) => return Err(crate::error::Error::from_errno(libc::EIO)),
            Ok(n) => done += n as u64,
            Err(Errno::EINTR) => {}
            // Not for these files (other filesystems, special files,
            // O_DIRECT alignment, an old kernel): the caller copies.
            Err(
                Errno::EXDEV | Errno::EINVAL | Errno::EOPNOTSUPP | Errno::ENOSYS | Errno::EBADF,
            ) if done == 0 => {
                return Ok(false);
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(true)
}
