//! `copy-on-read`: the filter a stream job puts above the image it fills
//! (QEMU's `block/copy-on-read.c` with its `bottom` option). Reads of data
//! that only the layers below the image hold, down to the base, copy that
//! data into the image first, so the image ends up holding what it shows;
//! the stream job drives the same copy ([`CorShared::populate`]) over the
//! whole image. Copies and guest writes hold their clusters in one
//! [`RangeLock`]: a guest write that got to a cluster first is never
//! overwritten with older data from below.

use std::sync::Arc;

use serde_json::{Value, json};

use super::aligned::AlignedBuf;
use super::child::ChildEdge;
use super::perm::{PERM_CONSISTENT_READ, PERM_RESIZE, PERM_WRITE, PERM_WRITE_UNCHANGED, Perms};
use super::range_lock::RangeLock;
use super::{BlockDriver, BlockStatus, Node, NodeChild, WriteFlags, chain};
use crate::error::Result;

/// What the filter and the job that inserted it share.
pub struct CorShared {
    file: ChildEdge,
    /// The lowest layer not copied from (`None`: copy the whole chain).
    base: Option<Arc<Node>>,
    ranges: RangeLock,
    cluster: u64,
}

impl CorShared {
    /// Copy-on-read state for `file`, copying what the layers above
    /// `base` hold.
    pub fn new(file: Arc<Node>, base: Option<Arc<Node>>) -> Arc<CorShared> {
        let cluster = file.cluster_size().unwrap_or(64 << 10);
        Arc::new(CorShared {
            file: ChildEdge::new(file),
            base,
            ranges: RangeLock::default(),
            cluster,
        })
    }

    /// Copy what the layers below the image (down to base) hold at
    /// `offset` into the image, holding the range, unless the image
    /// already has it there. Returns how many bytes this step covered (one
    /// allocation status, at most `len`) and whether it copied them.
    /// `buf` is made (page-aligned, for O_DIRECT nodes) or grown only
    /// when a copy needs it.
    pub fn populate(
        &self,
        buf: &mut Option<AlignedBuf>,
        offset: u64,
        len: u64,
    ) -> Result<(u64, bool)> {
        let top = self.file.get();
        let _g = self.ranges.lock(offset, offset + len);
        let st = top.block_status(offset, len)?;
        let n = st.len;
        if st.allocated {
            return Ok((n, false));
        }
        let Some(below) = chain::next_layer(&top) else {
            return Ok((n, false));
        };
        let (copy, n) = chain::is_allocated_above(&below, self.base.as_ref(), offset, n)?;
        if copy {
            if buf.as_ref().is_none_or(|b| (b.len() as u64) < n) {
                *buf = Some(AlignedBuf::zeroed(n as usize, 4096));
            }
            let buf = &mut buf.as_mut().expect("made just above")[..n as usize];
            top.pread(offset, buf)?;
            top.pwrite(offset, buf)?;
            // Written back now rather than all at the flush that ends the
            // job (see block::writeback).
            top.start_writeback(offset, n);
        }
        Ok((n, copy))
    }

    /// Run `f` holding the clusters `[offset, offset + len)` touches: a
    /// partial-cluster write copies the rest of its cluster from below.
    fn guarded<T>(&self, offset: u64, len: u64, f: impl FnOnce() -> T) -> T {
        let start = offset / self.cluster * self.cluster;
        let end = (offset + len).div_ceil(self.cluster) * self.cluster;
        let _g = self.ranges.lock(start, end.max(start + 1));
        f()
    }
}

/// The filter driver.
pub struct CopyOnRead {
    shared: Arc<CorShared>,
    /// Named by the user (`filter-node-name`): QEMU then names its file
    /// `json:{…}` instead of taking its child's.
    explicit: bool,
}

impl CopyOnRead {
    /// The filter over `shared`'s image.
    pub fn new(shared: Arc<CorShared>, explicit: bool) -> Self {
        CopyOnRead { shared, explicit }
    }

    fn file(&self) -> Arc<Node> {
        self.shared.file.get()
    }
}

impl BlockDriver for CopyOnRead {
    fn driver_name(&self) -> &'static str {
        "copy-on-read"
    }

    fn len(&self) -> Result<u64> {
        self.file().len()
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let file = self.file();
        let cs = self.shared.cluster;
        let end = (offset + buf.len() as u64)
            .div_ceil(cs)
            .saturating_mul(cs)
            .min(file.len()?);
        let mut pos = offset / cs * cs;
        let mut scratch = None;
        while pos < end {
            pos += self.shared.populate(&mut scratch, pos, end - pos)?.0;
        }
        file.pread(offset, buf)
    }

    fn write(&self, offset: u64, buf: &[u8]) -> Result<()> {
        self.write_with(offset, buf, WriteFlags::default())
    }

    fn write_with(&self, offset: u64, buf: &[u8], flags: WriteFlags) -> Result<()> {
        self.shared.guarded(offset, buf.len() as u64, || {
            self.file().pwrite_with(offset, buf, flags)
        })
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
        self.shared.guarded(offset, len, || {
            self.file()
                .pwrite_zeroes_with(offset, len, may_unmap, flags)
        })
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.shared
            .guarded(offset, len, || self.file().pdiscard(offset, len))
    }

    fn can_discard(&self) -> bool {
        self.file().accepts_discard()
    }

    fn can_grow(&self) -> bool {
        self.file().driver().can_grow()
    }

    fn flush(&self) -> Result<()> {
        self.file().flush()
    }

    fn start_writeback(&self, offset: u64, len: u64) {
        self.file().start_writeback(offset, len)
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus> {
        self.file().block_status(offset, len)
    }

    fn children(&self) -> Vec<NodeChild> {
        vec![NodeChild {
            role: "file",
            node: self.file(),
        }]
    }

    fn filtered_child(&self) -> Option<Arc<Node>> {
        Some(self.file())
    }

    fn child_perm(&self, _child: &NodeChild, p: Perms, _writable: bool) -> Perms {
        // QEMU's cor_child_perm: write-unchanged is taken for the
        // copy-ups and shared, everything else passes through.
        const PASS: u64 = PERM_CONSISTENT_READ | PERM_WRITE | PERM_RESIZE;
        Perms::new(
            (p.perm & PASS) | PERM_WRITE_UNCHANGED,
            (p.shared & PASS) | PERM_WRITE_UNCHANGED,
        )
    }

    fn replace_child(&self, old: &Arc<Node>, new: &Arc<Node>) {
        self.shared.file.replace(old, new)
    }

    fn cluster_size(&self) -> Option<u64> {
        self.file().cluster_size()
    }

    fn filename(&self) -> String {
        let file = self.file();
        match file.driver().open_options() {
            Some(child) if self.explicit => {
                let v = json!({"driver": "copy-on-read", "file": child});
                format!("json:{}", crate::qapi::json::to_string(&v))
            }
            _ => file.filename(),
        }
    }

    fn open_options(&self) -> Option<Value> {
        Some(json!({"driver": "copy-on-read", "file": self.file().driver().open_options()?}))
    }

    fn supports_zero_unmap(&self) -> bool {
        self.file().driver().supports_zero_unmap()
    }
}
