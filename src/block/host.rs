//! `host`: a node whose I/O the embedding host performs (through C
//! callbacks in the C API, or any [`HostIo`] in Rust).

use super::{BlockDriver, BlockStatus, write_zero_buffers};
use crate::error::{Error, Result};

/// I/O supplied by the host. Errors are positive errno values.
/// Called from any thread, concurrently.
pub trait HostIo: Send + Sync + 'static {
    /// Size in bytes.
    fn len(&self) -> Result<u64, i32>;
    /// True for a zero-length node.
    fn is_empty(&self) -> Result<bool, i32> {
        Ok(self.len()? == 0)
    }
    /// Read into `buf` at `offset`.
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), i32>;
    /// Write `buf` at `offset`.
    fn write(&self, offset: u64, buf: &[u8]) -> Result<(), i32>;
    /// Make a range read as zeroes; `None` when the host has no such
    /// operation (zero buffers are written instead).
    fn write_zeroes(&self, _offset: u64, _len: u64, _may_unmap: bool) -> Option<Result<(), i32>> {
        None
    }
    /// Discard a range (default: nothing).
    fn discard(&self, _offset: u64, _len: u64) -> Result<(), i32> {
        Ok(())
    }
    /// Whether `discard` does anything (default: no).
    fn can_discard(&self) -> bool {
        false
    }
    /// Flush (default: nothing).
    fn flush(&self) -> Result<(), i32> {
        Ok(())
    }
    /// `(data, zero, len)` for the range at `offset` (default: all data).
    fn block_status(&self, _offset: u64, len: u64) -> Result<(bool, bool, u64), i32> {
        Ok((true, false, len))
    }
}

/// The host driver.
pub struct HostDriver {
    io: Box<dyn HostIo>,
}

impl HostDriver {
    /// Wrap host I/O.
    pub fn new(io: Box<dyn HostIo>) -> Self {
        HostDriver { io }
    }
}

fn errno(e: i32) -> Error {
    // A host returning a nonsensical errno still gets a failure.
    Error::from_errno(if e > 0 { e } else { libc::EIO })
}

impl BlockDriver for HostDriver {
    fn driver_name(&self) -> &'static str {
        "host"
    }

    fn len(&self) -> Result<u64> {
        self.io.len().map_err(errno)
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.io.read(offset, buf).map_err(errno)
    }

    fn write(&self, offset: u64, buf: &[u8]) -> Result<()> {
        self.io.write(offset, buf).map_err(errno)
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<()> {
        match self.io.write_zeroes(offset, len, may_unmap) {
            Some(r) => r.map_err(errno),
            None => write_zero_buffers(offset, len, |o, b| self.write(o, b)),
        }
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.io.discard(offset, len).map_err(errno)
    }

    fn can_discard(&self) -> bool {
        self.io.can_discard()
    }

    fn flush(&self) -> Result<()> {
        self.io.flush().map_err(errno)
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus> {
        let (data, zero, n) = self.io.block_status(offset, len).map_err(errno)?;
        Ok(BlockStatus {
            data,
            zero,
            allocated: data || zero,
            len: n,
        })
    }

    fn filename(&self) -> String {
        "host://".into()
    }
}
