//! Early writeback: ask the kernel to start writing a file range to its
//! device now (`sync_file_range(SYNC_FILE_RANGE_WRITE)`), without waiting
//! for it.
//!
//! A job that copies a whole image and then flushes otherwise leaves all
//! of it dirty in the page cache until that flush, and the flush then
//! writes everything while the copy sits idle. Started as each range is
//! copied, the device writes while the job copies the next ranges, and the
//! flush finds little left to do (1 GiB on ext4 here, copy then fdatasync:
//! 0.29-0.43 s copying + 0.53-0.67 s flushing; with writeback started per
//! 1 MiB, 0.50-0.53 s copying + 0.00-0.09 s flushing).
//!
//! It is a hint and changes nothing a reader or a flush sees: a failed
//! writeback is recorded on the file and reported by the next `fsync`
//! (`sync_file_range` does not consume that error), so errors here are
//! dropped. On tmpfs and for `O_DIRECT` files there is nothing to write and
//! the call returns at once.

use std::fs::File;
use std::os::fd::AsRawFd;

/// Start writeback of `[offset, offset + len)` of `file`.
#[allow(unsafe_code)]
pub(crate) fn start(file: &File, offset: u64, len: u64) {
    let (Ok(offset), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
        return;
    };
    // SAFETY: sync_file_range only reads its integer arguments; the fd is
    // open for as long as `file` is borrowed, so it cannot be closed and
    // reused underneath the call. Nothing is written to our memory.
    let _ = unsafe {
        libc::sync_file_range(file.as_raw_fd(), offset, len, libc::SYNC_FILE_RANGE_WRITE)
    };
}
