//! `copy-before-write`: the filter a backup puts above its source (QEMU's
//! `block/copy-before-write.c`). Before a write (or write-zeroes, or
//! discard) reaches a cluster whose old data has not reached the target
//! yet, the filter copies that cluster to the target ([`BlockCopy`]); the
//! target so ends up holding the source as it was when the filter went in,
//! however the guest writes meanwhile.
//!
//! Its node carries QEMU's three anonymous bitmaps, as `query-named-block-
//! nodes` shows them: the copy bitmap (clusters still to copy), the *done*
//! bitmap (clusters this filter copied before a write) and the *access*
//! bitmap (clusters the frozen view can still be read from).
//!
//! When a copy fails, `on-cbw-error` decides: `break-guest-write` (the
//! default) fails the guest's write, `break-snapshot` lets it through and
//! gives up the point-in-time view.

use std::sync::Arc;

use super::block_copy::{BlockCopy, CopyError};
use super::child::ChildEdge;
use super::dirty_bitmap::BdrvDirtyBitmap;
use super::{BlockDriver, BlockStatus, Node, NodeChild};
use crate::error::{Error, Result};
use crate::locks::Mutex;
use crate::qapi::qapi_enum;

qapi_enum! {
    /// What a failed copy before a write does (QEMU's `OnCbwError`).
    pub enum OnCbwError {
        /// The guest's write fails with the copy's error.
        BreakGuestWrite = "break-guest-write",
        /// The guest's write goes on; the point-in-time view is broken.
        BreakSnapshot = "break-snapshot",
    }
}

/// The filter's state, shared with the job that created it.
pub struct CbwShared {
    file: Arc<ChildEdge>,
    target: Arc<Node>,
    bcs: Arc<BlockCopy>,
    /// Clusters copied before a guest write.
    done: Arc<BdrvDirtyBitmap>,
    /// Clusters the frozen view may be read from (all, until broken).
    access: Arc<BdrvDirtyBitmap>,
    on_cbw_error: OnCbwError,
    /// The copy error that broke the snapshot (`break-snapshot`).
    snapshot_error: Mutex<Option<Error>>,
}

impl CbwShared {
    /// The copy state.
    pub fn block_copy(&self) -> &Arc<BlockCopy> {
        &self.bcs
    }

    /// The target node.
    pub fn target(&self) -> &Arc<Node> {
        &self.target
    }

    /// The error that broke the point-in-time view, if one did.
    pub fn snapshot_error(&self) -> Option<Error> {
        self.snapshot_error.lock().clone()
    }

    fn source(&self) -> Arc<Node> {
        self.file.get()
    }

    /// The copy before a write to `[offset, offset + len)`.
    fn before_write(&self, offset: u64, len: u64) -> Result<()> {
        if self.snapshot_error.lock().is_some() {
            // Broken already: nothing is copied any more.
            return Ok(());
        }
        let r = self.bcs.copy_before_write(offset, len, |o, l| {
            self.done.bits().set_range(o, l);
        });
        match r {
            Ok(()) => Ok(()),
            Err(CopyError { error, .. }) => match self.on_cbw_error {
                OnCbwError::BreakGuestWrite => Err(error),
                OnCbwError::BreakSnapshot => {
                    self.access.bits().clear();
                    self.snapshot_error.lock().get_or_insert(error);
                    Ok(())
                }
            },
        }
    }
}

/// How the filter is made.
pub struct CbwOptions {
    /// The source, below the filter.
    pub file: Arc<Node>,
    /// Where old data goes.
    pub target: Arc<Node>,
    /// The copy granularity (at least 64 KiB and the target's cluster).
    pub cluster: u64,
    /// Largest copy (0: QEMU's default).
    pub max_chunk: u64,
    /// `on-cbw-error`.
    pub on_cbw_error: OnCbwError,
    /// `discard-source`.
    pub discard_source: bool,
}

/// QEMU's block-copy cluster size: 64 KiB, or the target's cluster size
/// if larger, or `min_cluster_size` if larger still (a power of 2).
pub fn cluster_size(target: &Node, min_cluster_size: u64) -> Result<u64> {
    if min_cluster_size != 0 && !min_cluster_size.is_power_of_two() {
        return Err(Error::generic(
            "Cannot create block-copy-state: min-cluster-size needs to be a power of 2",
        ));
    }
    Ok((64u64 << 10)
        .max(target.cluster_size().unwrap_or(0))
        .max(min_cluster_size))
}

/// The filter driver.
pub struct CopyBeforeWrite(Arc<CbwShared>);

impl CopyBeforeWrite {
    /// A filter over `o.file` copying to `o.target`, and what it shares.
    /// Its bitmaps go on the filter node once it exists
    /// ([`CopyBeforeWrite::attach_bitmaps`]); until then every cluster is
    /// dirty in a detached copy bitmap of the same shape.
    pub fn new(o: CbwOptions) -> Result<(Self, Arc<CbwShared>)> {
        let len = o.file.len()?;
        let file = Arc::new(ChildEdge::new(o.file));
        let anon = |all: bool| -> Result<Arc<BdrvDirtyBitmap>> {
            let b = BdrvDirtyBitmap::detached(len, o.cluster)?;
            if all {
                b.bits().set_range(0, len);
            }
            Ok(b)
        };
        let copy = anon(true)?;
        let bcs = BlockCopy::new(file.clone(), o.target.clone(), copy, o.cluster, o.max_chunk)?;
        bcs.set_discard_source(o.discard_source);
        let shared = Arc::new(CbwShared {
            file,
            target: o.target,
            bcs,
            done: anon(false)?,
            access: anon(true)?,
            on_cbw_error: o.on_cbw_error,
            snapshot_error: Mutex::new(None),
        });
        Ok((CopyBeforeWrite(shared.clone()), shared))
    }

    /// List the three bitmaps on the filter node as QEMU does (newest
    /// first: access, done, copy).
    pub fn attach_bitmaps(shared: &CbwShared, node: &Node) {
        let b = node.bitmaps();
        b.attach(shared.bcs.bitmap().clone());
        b.attach(shared.done.clone());
        b.attach(shared.access.clone());
    }
}

impl BlockDriver for CopyBeforeWrite {
    fn driver_name(&self) -> &'static str {
        "copy-before-write"
    }

    fn len(&self) -> Result<u64> {
        self.0.source().len()
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.0.source().pread(offset, buf)
    }

    fn write(&self, offset: u64, buf: &[u8]) -> Result<()> {
        self.0.before_write(offset, buf.len() as u64)?;
        self.0.source().pwrite(offset, buf)
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<()> {
        self.0.before_write(offset, len)?;
        self.0.source().pwrite_zeroes(offset, len, may_unmap)
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.0.before_write(offset, len)?;
        self.0.source().pdiscard(offset, len)
    }

    fn can_discard(&self) -> bool {
        self.0.source().accepts_discard()
    }

    fn can_grow(&self) -> bool {
        self.0.source().driver().can_grow()
    }

    fn flush(&self) -> Result<()> {
        self.0.source().flush()
    }

    fn start_writeback(&self, offset: u64, len: u64) {
        self.0.source().start_writeback(offset, len)
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus> {
        self.0.source().block_status(offset, len)
    }

    fn children(&self) -> Vec<NodeChild> {
        vec![
            NodeChild {
                role: "file",
                node: self.0.source(),
            },
            NodeChild {
                role: "target",
                node: self.0.target.clone(),
            },
        ]
    }

    fn filtered_child(&self) -> Option<Arc<Node>> {
        Some(self.0.source())
    }

    fn replace_child(&self, old: &Arc<Node>, new: &Arc<Node>) {
        // The target edge stays: the copy state writes to it directly.
        self.0.file.replace(old, new)
    }

    fn cluster_size(&self) -> Option<u64> {
        self.0.source().cluster_size()
    }

    fn filename(&self) -> String {
        self.0.source().filename()
    }

    fn supports_zero_unmap(&self) -> bool {
        self.0.source().driver().supports_zero_unmap()
    }
}
