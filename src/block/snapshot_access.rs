//! `snapshot-access` (QEMU's `block/snapshot-access.c`): a read-only view
//! of the point in time a `copy-before-write` node froze, for image
//! fleecing. Put over the filter (`"file": "<cbw node>"`), it reads what
//! the source held when the filter went in, however the guest writes
//! through the filter since; exported (NBD), it is what a backup
//! application pulls. Discarding through it tells the filter those
//! clusters are done with.
//!
//! Over any other node it opens, as QEMU's does, and every request fails
//! with `Operation not supported`.

use std::sync::Arc;

use super::child::ChildEdge;
use super::copy_before_write::{CbwShared, CopyBeforeWrite};
use super::{BlockDriver, BlockStatus, Node, NodeChild};
use crate::error::{Error, Result};

/// The driver.
pub struct SnapshotAccess {
    file: Arc<ChildEdge>,
    cbw: Option<Arc<CbwShared>>,
}

impl SnapshotAccess {
    /// A view over `file` (a `copy-before-write` node, to be useful).
    pub fn new(file: Arc<Node>) -> Self {
        let cbw = (file.driver() as &dyn std::any::Any)
            .downcast_ref::<CopyBeforeWrite>()
            .map(CopyBeforeWrite::shared);
        SnapshotAccess {
            file: Arc::new(ChildEdge::new(file)),
            cbw,
        }
    }

    fn cbw(&self) -> Result<&CbwShared> {
        self.cbw
            .as_deref()
            .ok_or_else(|| Error::from_errno(libc::ENOTSUP))
    }
}

impl BlockDriver for SnapshotAccess {
    fn driver_name(&self) -> &'static str {
        "snapshot-access"
    }

    fn len(&self) -> Result<u64> {
        self.file.get().len()
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.cbw()?.snapshot_read(offset, buf)
    }

    fn write(&self, _offset: u64, _buf: &[u8]) -> Result<()> {
        Err(Error::from_errno(libc::ENOTSUP))
    }

    fn write_zeroes(&self, _offset: u64, _len: u64, _may_unmap: bool) -> Result<()> {
        Err(Error::from_errno(libc::ENOTSUP))
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.cbw()?.snapshot_discard(offset, len)
    }

    fn can_discard(&self) -> bool {
        true
    }

    fn can_grow(&self) -> bool {
        false
    }

    fn flush(&self) -> Result<()> {
        Ok(())
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus> {
        self.cbw()?.snapshot_block_status(offset, len)
    }

    fn children(&self) -> Vec<NodeChild> {
        vec![NodeChild {
            role: "file",
            node: self.file.get(),
        }]
    }

    fn replace_child(&self, old: &Arc<Node>, new: &Arc<Node>) {
        self.file.replace(old, new)
    }

    fn filename(&self) -> String {
        self.file.get().filename()
    }
}
