//! `null-co` / `null-aio`: a node of a given size that stores nothing.
//! Reads leave the buffer as it is unless `read-zeroes` is set, as QEMU's.

use std::time::Duration;

use super::{BlockDriver, BlockStatus};
use crate::error::Result;

/// QEMU's default size: 1 GiB.
pub const NULL_DEFAULT_SIZE: u64 = 1 << 30;

/// The null driver.
#[derive(Debug, Clone)]
pub struct NullDriver {
    /// `null-co` or `null-aio`.
    pub name: &'static str,
    /// Size, rounded up to 512 bytes as QEMU does.
    pub size: u64,
    /// Delay of every request.
    pub latency: Duration,
    /// Reads return zeroes.
    pub read_zeroes: bool,
}

impl NullDriver {
    fn delay(&self) {
        if !self.latency.is_zero() {
            std::thread::sleep(self.latency);
        }
    }
}

impl BlockDriver for NullDriver {
    fn driver_name(&self) -> &'static str {
        self.name
    }

    fn len(&self) -> Result<u64> {
        Ok(self.size)
    }

    fn read(&self, _offset: u64, buf: &mut [u8]) -> Result<()> {
        self.delay();
        if self.read_zeroes {
            buf.fill(0);
        }
        Ok(())
    }

    fn write(&self, _offset: u64, _buf: &[u8]) -> Result<()> {
        self.delay();
        Ok(())
    }

    fn write_zeroes(&self, _offset: u64, _len: u64, _may_unmap: bool) -> Result<()> {
        self.delay();
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        Ok(())
    }

    fn block_status(&self, _offset: u64, len: u64) -> Result<BlockStatus> {
        Ok(if self.read_zeroes {
            BlockStatus::zero(len)
        } else {
            BlockStatus::data(len)
        })
    }

    fn filename(&self) -> String {
        format!("{}://", self.name)
    }

    fn supports_zero_unmap(&self) -> bool {
        true
    }
}
