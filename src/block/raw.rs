//! `raw`: the format driver that passes requests to its `file` child,
//! optionally through an `offset`/`size` window. Like QEMU's, it fires
//! the blkdebug events `read_aio` and `write_aio` on its child, which is
//! what makes `raw` over `blkdebug` inject errors.

use std::sync::Arc;

use super::child::ChildEdge;
use super::perm::{self, PERM_RESIZE, PERM_WRITE, Perms};
use super::{BlkdebugEvent, BlockDriver, BlockStatus, Node, NodeChild, WriteFlags};
use crate::error::{Error, Result};

/// The raw format.
pub struct RawDriver {
    file: ChildEdge,
    offset: u64,
    size: Option<u64>,
}

impl RawDriver {
    /// A raw node over `file`, exposing `[offset, offset + size)`.
    pub fn new(file: Arc<Node>, offset: u64, size: Option<u64>) -> Result<RawDriver> {
        let file_len = file.len()?;
        let s = size.unwrap_or(file_len.saturating_sub(offset));
        if offset.checked_add(s).is_none_or(|end| end > file_len) {
            return Err(Error::generic(format!(
                "The sum of offset ({offset}) and size ({s}) has to be smaller or equal to the  actual size of the containing file ({file_len})"
            )));
        }
        Ok(RawDriver {
            file: ChildEdge::new(file),
            offset,
            size,
        })
    }

    fn file(&self) -> Arc<Node> {
        self.file.get()
    }
}

impl BlockDriver for RawDriver {
    fn child_perm(&self, _child: &NodeChild, p: Perms, writable: bool) -> Perms {
        // QEMU's raw_child_perm: without offset or size raw is a filter;
        // with them its file holds data, but write and resize are taken
        // only when a parent takes them.
        if self.offset == 0 && self.size.is_none() {
            return perm::filter_perms(p);
        }
        let mut d = perm::storage_perms(p, false, true, writable);
        d.perm &= !(PERM_WRITE | PERM_RESIZE);
        d.perm |= p.perm & (PERM_WRITE | PERM_RESIZE);
        d
    }

    fn driver_name(&self) -> &'static str {
        "raw"
    }

    fn len(&self) -> Result<u64> {
        match self.size {
            Some(s) => Ok(s),
            None => Ok(self.file().len()?.saturating_sub(self.offset)),
        }
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let file = self.file();
        file.debug_event(BlkdebugEvent::ReadAio);
        file.pread(self.offset + offset, buf)
    }

    fn write(&self, offset: u64, buf: &[u8]) -> Result<()> {
        let file = self.file();
        file.debug_event(BlkdebugEvent::WriteAio);
        file.pwrite(self.offset + offset, buf)
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<()> {
        self.file()
            .pwrite_zeroes(self.offset + offset, len, may_unmap)
    }

    // The flags go down with the request, as QEMU's raw format passes
    // them (so FUA and FAST_ZERO reach an NBD server under it).
    fn write_with(&self, offset: u64, buf: &[u8], flags: WriteFlags) -> Result<()> {
        let file = self.file();
        file.debug_event(BlkdebugEvent::WriteAio);
        file.pwrite_with(self.offset + offset, buf, flags)
    }

    fn write_zeroes_with(
        &self,
        offset: u64,
        len: u64,
        may_unmap: bool,
        flags: WriteFlags,
    ) -> Result<()> {
        self.file()
            .pwrite_zeroes_with(self.offset + offset, len, may_unmap, flags)
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.file().pdiscard(self.offset + offset, len)
    }

    fn can_discard(&self) -> bool {
        self.file().driver().can_discard()
    }

    fn flush(&self) -> Result<()> {
        self.file().flush()
    }

    fn start_writeback(&self, offset: u64, len: u64) {
        self.file().start_writeback(self.offset + offset, len)
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus> {
        self.file().block_status(self.offset + offset, len)
    }

    fn children(&self) -> Vec<NodeChild> {
        vec![NodeChild {
            role: "file",
            node: self.file(),
        }]
    }

    fn replace_child(&self, old: &Arc<Node>, new: &Arc<Node>) {
        self.file.replace(old, new)
    }

    fn cluster_size(&self) -> Option<u64> {
        self.file().cluster_size()
    }

    fn filename(&self) -> String {
        self.file().filename()
    }

    fn open_options(&self) -> Option<serde_json::Value> {
        if self.offset != 0 || self.size.is_some() {
            return None;
        }
        Some(serde_json::json!({"driver": "raw", "file": self.file().driver().open_options()?}))
    }

    fn supports_zero_unmap(&self) -> bool {
        self.file().driver().supports_zero_unmap()
    }

    fn resolve(&self, req: super::resolve::Request, r: &mut super::resolve::Resolved) -> bool {
        // The generic layer checked the range against this node's size.
        self.file().resolve_into(
            super::resolve::Request {
                offset: self.offset + req.offset,
                ..req
            },
            r,
        )
    }

    fn copy_range_from(
        &self,
        offset: u64,
        len: u64,
        sink: &mut super::copy_range::CopySink<'_>,
    ) -> Result<bool> {
        let file = self.file();
        file.debug_event(BlkdebugEvent::ReadAio);
        file.copy_source(self.offset + offset, len, sink)
    }

    fn copy_range_to(
        &self,
        offset: u64,
        src: &std::fs::File,
        src_offset: u64,
        len: u64,
    ) -> Result<bool> {
        let file = self.file();
        file.debug_event(BlkdebugEvent::WriteAio);
        file.copy_from_file(self.offset + offset, src, src_offset, len)
    }
}
