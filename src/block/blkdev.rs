//! Linux block-device ioctls for `host_device` nodes: the size
//! (`BLKGETSIZE64`), the logical block size (`BLKSSZGET`), discards
//! (`BLKDISCARD`) and zeroing (`BLKZEROOUT`). libc has no safe wrapper for
//! them; each call below is one `ioctl` on a borrowed fd with a pointer
//! to a local value, the only `unsafe` of this module.

use std::fs::File;
use std::os::fd::AsRawFd;

use crate::error::{Error, Result};

// The request numbers from <linux/fs.h>: _IO(0x12, 119), _IO(0x12, 127)
// and _IOR(0x12, 114, size_t); libc exports only BLKSSZGET of these.
const BLKDISCARD: libc::Ioctl = 0x1277;
const BLKZEROOUT: libc::Ioctl = 0x127f;
const BLKGETSIZE64: libc::Ioctl = 0x8008_1272;

/// The device's size in bytes.
pub(crate) fn size(file: &File) -> Result<u64> {
    let mut v: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which
    // points to `v`, alive for the call; the fd stays open while `file`
    // is borrowed.
    let r = unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64, &mut v as *mut u64) };
    if r < 0 {
        return Err(Error::from(std::io::Error::last_os_error()));
    }
    Ok(v)
}

/// The logical block size: the unit of offsets and lengths the device
/// accepts for `O_DIRECT`, discards and zeroing.
pub(crate) fn logical_block_size(file: &File) -> Result<u64> {
    let mut v: libc::c_int = 0;
    // SAFETY: BLKSSZGET writes one int through the pointer, which points
    // to `v`, alive for the call; the fd stays open while `file` is
    // borrowed.
    let r = unsafe {
        libc::ioctl(
            file.as_raw_fd(),
            libc::BLKSSZGET,
            &mut v as *mut libc::c_int,
        )
    };
    if r < 0 {
        return Err(Error::from(std::io::Error::last_os_error()));
    }
    Ok(v.max(1) as u64)
}

fn range_ioctl(file: &File, req: libc::Ioctl, offset: u64, len: u64) -> Result<()> {
    let range: [u64; 2] = [offset, len];
    // SAFETY: BLKDISCARD and BLKZEROOUT only read two u64 (start, length)
    // through the pointer, which points to `range`, alive for the call;
    // the fd stays open while `file` is borrowed.
    let r = unsafe { libc::ioctl(file.as_raw_fd(), req, range.as_ptr()) };
    if r < 0 {
        return Err(Error::from(std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Discard `[offset, offset + len)` (aligned to the logical block size).
pub(crate) fn discard(file: &File, offset: u64, len: u64) -> Result<()> {
    range_ioctl(file, BLKDISCARD, offset, len)
}

/// Zero `[offset, offset + len)` (aligned to the logical block size); the
/// kernel uses the device's write-zeroes command or writes zeroes itself.
pub(crate) fn zero_out(file: &File, offset: u64, len: u64) -> Result<()> {
    range_ioctl(file, BLKZEROOUT, offset, len)
}
