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
//! gives up the point-in-time view. `cbw-timeout` (seconds, 0: none)
//! makes a copy that took longer count as failed; unlike QEMU's, our
//! guest write still waits for the copy (a thread cannot abandon a
//! request it is in), so the timeout only decides what happens after.
//!
//! The frozen view is readable through a `snapshot-access` node over the
//! filter ([`super::snapshot_access`]): image fleecing. A cluster reads
//! from the target once the filter copied it there, from the source until
//! then; a guest write to a cluster waits for snapshot reads of it to end
//! before it changes the source. Discarding through the view gives
//! clusters up: they are no longer copied, and reading them fails.

use std::sync::Arc;

use std::time::{Duration, Instant};

use super::block_copy::{BlockCopy, CopyError};
use super::child::ChildEdge;
use super::dirty_bitmap::BdrvDirtyBitmap;
use super::perm::{self, PERM_ALL, PERM_CONSISTENT_READ, PERM_RESIZE, PERM_WRITE, Perms};
use super::range_lock::RangeLock;
use super::{BlockDriver, BlockStatus, Node, NodeChild, WriteFlags};
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
    /// A copy slower than this failed (`cbw-timeout`).
    timeout: Option<Duration>,
    /// The copy error that broke the snapshot (`break-snapshot`).
    snapshot_error: Mutex<Option<Error>>,
    /// Snapshot reads of the source hold their range: a guest write waits
    /// for them before it changes the source.
    reads: RangeLock,
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
        let started = Instant::now();
        let mut r = self.bcs.copy_before_write(offset, len, |o, l| {
            self.done.bits().set_range(o, l);
        });
        if r.is_ok()
            && let Some(t) = self.timeout
            && started.elapsed() > t
        {
            r = Err(CopyError {
                error: Error::from_errno(libc::ETIMEDOUT),
                is_read: false,
            });
        }
        // Snapshot reads that found these clusters not yet copied read
        // the source: let them finish before the guest changes it.
        let (start, end) = self.cluster_range(offset, len);
        drop(self.reads.lock(start, end));
        match r {
            Ok(()) => Ok(()),
            Err(CopyError { error, .. }) => match self.on_cbw_error {
                OnCbwError::BreakGuestWrite => Err(error),
                OnCbwError::BreakSnapshot => {
                    // The view refuses every read from now on (its bitmaps
                    // stay as they are, as QEMU's do).
                    self.snapshot_error.lock().get_or_insert(error);
                    Ok(())
                }
            },
        }
    }

    /// `[offset, offset + len)` widened to whole clusters (within the
    /// source).
    fn cluster_range(&self, offset: u64, len: u64) -> (u64, u64) {
        let c = self.bcs.cluster_size();
        let start = offset / c * c;
        let end = (offset + len)
            .div_ceil(c)
            .saturating_mul(c)
            .min(self.bcs.len());
        (start, end.max(start))
    }

    /// A read of the frozen view (QEMU's `cbw_co_preadv_snapshot`): each
    /// cluster from the target if this filter copied it there, else from
    /// the source; `Permission denied` for clusters outside the view.
    pub fn snapshot_read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let (start, end) = self.cluster_range(offset, buf.len() as u64);
        let _held = self.reads.lock(start, end);
        if self.snapshot_error.lock().is_some() {
            return Err(Error::from_errno(libc::EACCES));
        }
        let c = self.bcs.cluster_size();
        let mut pos = offset;
        let end = offset + buf.len() as u64;
        while pos < end {
            let next = ((pos / c + 1) * c).min(end);
            let cl = pos / c * c;
            if !self.access.bits().test(cl) {
                return Err(Error::from_errno(libc::EACCES));
            }
            // Runs of clusters with the same source of data in one request.
            let from_target = self.done.bits().test(cl);
            let mut run_end = next;
            while run_end < end
                && self.access.bits().test(run_end)
                && self.done.bits().test(run_end) == from_target
            {
                run_end = (run_end + c).min(end);
            }
            let b = &mut buf[(pos - offset) as usize..(run_end - offset) as usize];
            if from_target {
                self.target.pread(pos, b)?;
            } else {
                self.source().pread(pos, b)?;
            }
            pos = run_end;
        }
        Ok(())
    }

    /// The frozen view's block status: what the source says for clusters
    /// not copied, data for those on the target.
    pub fn snapshot_block_status(&self, offset: u64, len: u64) -> Result<BlockStatus> {
        let c = self.bcs.cluster_size();
        let cl = offset / c * c;
        let run = ((cl + c).min(self.bcs.len()) - offset).min(len).max(1);
        if self.done.bits().test(cl) {
            return Ok(BlockStatus::data(run));
        }
        let mut st = self.source().block_status(offset, run)?;
        st.len = st.len.min(run);
        Ok(st)
    }

    /// Give clusters of the view up (QEMU's `cbw_co_pdiscard_snapshot`):
    /// whole clusters inside the range are no longer copied nor readable,
    /// and what the target holds of them is discarded.
    pub fn snapshot_discard(&self, offset: u64, len: u64) -> Result<()> {
        let c = self.bcs.cluster_size();
        let start = offset.div_ceil(c) * c;
        let end = ((offset + len) / c * c).min(self.bcs.len());
        if start >= end {
            return Ok(());
        }
        let _held = self.reads.lock(start, end);
        self.access.bits().reset_range(start, end - start);
        self.bcs.bitmap().bits().reset_range(start, end - start);
        // A hint: the target may keep the data.
        let _ = self.target.pdiscard(start, end - start);
        Ok(())
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
    /// `bitmap`: copy only what it marks (None: everything).
    pub bitmap: Option<Arc<BdrvDirtyBitmap>>,
    /// `cbw-timeout` (None: none).
    pub timeout: Option<Duration>,
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
        if let Some(b) = &o.bitmap {
            copy.bits().clear();
            copy.bits().merge_from(b.bits());
        }
        // What may be read of the view: what is to be copied.
        let access = anon(false)?;
        access.bits().merge_from(copy.bits());
        let bcs = BlockCopy::new(file.clone(), o.target.clone(), copy, o.cluster, o.max_chunk)?;
        bcs.set_discard_source(o.discard_source);
        let shared = Arc::new(CbwShared {
            file,
            target: o.target,
            bcs,
            done: anon(false)?,
            access,
            on_cbw_error: o.on_cbw_error,
            timeout: o.timeout,
            snapshot_error: Mutex::new(None),
            reads: RangeLock::default(),
        });
        Ok((CopyBeforeWrite(shared.clone()), shared))
    }

    /// What the filter shares (with a `snapshot-access` node over it).
    pub fn shared(&self) -> Arc<CbwShared> {
        self.0.clone()
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
        self.write_with(offset, buf, WriteFlags::default())
    }

    fn write_with(&self, offset: u64, buf: &[u8], flags: WriteFlags) -> Result<()> {
        self.0.before_write(offset, buf.len() as u64)?;
        self.0.source().pwrite_with(offset, buf, flags)
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
        self.0.before_write(offset, len)?;
        self.0
            .source()
            .pwrite_zeroes_with(offset, len, may_unmap, flags)
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

    fn child_perm(&self, child: &NodeChild, p: Perms, _writable: bool) -> Perms {
        // QEMU's cbw_child_perm: the target is written, anything shared;
        // the source is read consistently and, while the snapshot must
        // hold, nobody else writes or resizes it (the backup job's own
        // backend is always a parent, so QEMU's "has parents" holds).
        if child.role == "target" {
            return Perms::new(PERM_WRITE, PERM_ALL);
        }
        let f = perm::filter_perms(p);
        Perms::new(
            f.perm | PERM_CONSISTENT_READ,
            f.shared & !(PERM_WRITE | PERM_RESIZE),
        )
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
