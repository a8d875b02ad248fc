//! `mirror_top`: the filter node a mirror (and an active commit) puts
//! above its source for as long as it exists, as QEMU does. Guest writes
//! reach the source through it: in background mode it marks the job's
//! bitmap after each write (the bitmap does not record on its own, as in
//! QEMU 10); in write-blocking mode the job hands it [`ActiveWrites`],
//! which also write the target. The bitmap lives on this node, so
//! `query-named-block-nodes` lists it there, without a name.

use std::sync::{Arc, OnceLock};

use arc_swap::ArcSwapOption;

use super::active::ActiveWrites;
use crate::block::child::ChildEdge;
use crate::block::dirty_bitmap::BdrvDirtyBitmap;
use crate::block::{BlockDriver, BlockStatus, Node, NodeChild};
use crate::error::Result;

/// What the filter and its mirror share.
pub(crate) struct TopShared {
    child: ChildEdge,
    /// The job's bitmap, once the job has made it.
    pub bitmap: OnceLock<Arc<BdrvDirtyBitmap>>,
    /// Write-blocking mode while the job runs: guest writes go through
    /// these. Swapped only with the node drained.
    pub active: ArcSwapOption<ActiveWrites>,
}

impl TopShared {
    pub fn new(source: Arc<Node>) -> Arc<TopShared> {
        Arc::new(TopShared {
            child: ChildEdge::new(source),
            bitmap: OnceLock::new(),
            active: ArcSwapOption::empty(),
        })
    }

    fn child(&self) -> Arc<Node> {
        self.child.get()
    }

    /// A background-mode write: to the source, then (also after a failure:
    /// it may have written part) the granules are dirty.
    fn passthrough(
        &self,
        offset: u64,
        len: u64,
        f: impl FnOnce(&Node) -> Result<()>,
    ) -> Result<()> {
        let r = f(&self.child());
        if let Some(b) = self.bitmap.get() {
            b.bits().set_range(offset, len);
        }
        r
    }
}

/// The filter driver.
pub(crate) struct MirrorTop(pub Arc<TopShared>);

impl BlockDriver for MirrorTop {
    fn driver_name(&self) -> &'static str {
        "mirror_top"
    }

    fn len(&self) -> Result<u64> {
        self.0.child().len()
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.0.child().pread(offset, buf)
    }

    fn write(&self, offset: u64, buf: &[u8]) -> Result<()> {
        match self.0.active.load_full() {
            Some(a) => a.pwrite(&self.0.child(), offset, buf),
            None => self
                .0
                .passthrough(offset, buf.len() as u64, |n| n.pwrite(offset, buf)),
        }
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<()> {
        match self.0.active.load_full() {
            Some(a) => a.pwrite_zeroes(&self.0.child(), offset, len, may_unmap),
            None => self
                .0
                .passthrough(offset, len, |n| n.pwrite_zeroes(offset, len, may_unmap)),
        }
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        match self.0.active.load_full() {
            Some(a) => a.pdiscard(&self.0.child(), offset, len),
            None => self.0.passthrough(offset, len, |n| n.pdiscard(offset, len)),
        }
    }

    /// Reads pass through; a background-mode write too, marking the
    /// job's bitmap when it ends (as `passthrough`). A write-blocking
    /// mirror must see the write: declined. The filter's in-flight hold
    /// keeps `block-job-change` (which switches in a drained section)
    /// from changing the mode under it.
    fn resolve(
        &self,
        req: crate::block::resolve::Request,
        r: &mut crate::block::resolve::Resolved,
    ) -> bool {
        if req.write {
            if self.0.active.load().is_some() {
                return false;
            }
            if let Some(b) = self.0.bitmap.get() {
                let (b, offset, len) = (b.clone(), req.offset, req.len);
                r.after_write(move || b.bits().set_range(offset, len));
            }
        }
        self.0.child().resolve_into(req, r)
    }

    fn can_discard(&self) -> bool {
        self.0.child().accepts_discard()
    }

    fn can_grow(&self) -> bool {
        self.0.child().driver().can_grow()
    }

    fn flush(&self) -> Result<()> {
        self.0.child().flush()
    }

    fn start_writeback(&self, offset: u64, len: u64) {
        self.0.child().start_writeback(offset, len)
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus> {
        self.0.child().block_status(offset, len)
    }

    fn children(&self) -> Vec<NodeChild> {
        vec![NodeChild {
            role: "backing",
            node: self.0.child(),
        }]
    }

    fn filtered_child(&self) -> Option<Arc<Node>> {
        Some(self.0.child())
    }

    fn replace_child(&self, old: &Arc<Node>, new: &Arc<Node>) {
        self.0.child.replace(old, new)
    }

    fn cluster_size(&self) -> Option<u64> {
        self.0.child().cluster_size()
    }

    fn filename(&self) -> String {
        self.0.child().filename()
    }

    fn supports_zero_unmap(&self) -> bool {
        self.0.child().driver().supports_zero_unmap()
    }
}
