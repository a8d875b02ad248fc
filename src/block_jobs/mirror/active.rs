//! Write-blocking mode (QEMU's active mirroring): guest writes to the
//! source go to the target too before they complete, so the job converges
//! whatever the write rate.
//!
//! As in QEMU, the job's bitmap does not record writes in this mode; this
//! filter marks it itself. A guest write holds its granules in the
//! in-flight set (waiting for a copy of them to finish, and keeping new
//! copies out), writes the source, then writes the same data to the
//! target, and leaves the bitmap as it was: a clean granule written on
//! both sides stays clean. A head or tail in a granule that is already
//! dirty is not written to the target (it could not be marked clean: the
//! rest of the granule still differs); whole granules the write covers
//! are cleared. If the target write fails, the range is dirty and
//! on-target-error applies; the guest sees the source write's result.
//! When the job does not copy to the target (failed, cancelled), guest
//! writes just mark the bitmap.
//!
//! The `mirror_top` filter hands guest writes to these from the moment
//! they are installed, which happens with the filter drained: a write that
//! started before (and so is marked by the filter in background mode)
//! finishes first, and its mark is seen by the first pass.

use std::sync::Arc;

use super::Mirror;
use super::copy::Copier;
use crate::block::Node;
use crate::error::Result;
use crate::sync::Ordering;

/// Guest writes in write-blocking mode.
pub(crate) struct ActiveWrites {
    mirror: Arc<Mirror>,
    copier: Arc<Copier>,
}

impl ActiveWrites {
    /// Copy to the target only while the job is healthy (QEMU: no error,
    /// not cancelled, write-blocking mode).
    fn copy_to_target(&self) -> bool {
        self.copier.error().is_none()
            // Relaxed: it only goes up (see the field).
            && self.mirror.write_blocking.load(Ordering::Relaxed)
            && !self.copier.job_cancelled()
    }

    fn through(
        &self,
        node: &Node,
        offset: u64,
        len: u64,
        to_source: impl FnOnce(&Node) -> Result<()>,
        to_target: impl FnOnce(&Node, u64, u64) -> Result<()>,
    ) -> Result<()> {
        let bits = self.copier.bitmap.bits();
        if !self.copy_to_target() || len == 0 {
            let r = to_source(node);
            // After the write, even a failed one (it may have written part).
            // Relaxed: a report (see the field).
            self.mirror.actively_synced.store(false, Ordering::Relaxed);
            bits.set_range(offset, len);
            return r;
        }
        self.copier.begin_active_write(offset, len);
        let mut redirty = None;
        let r = to_source(node);
        if r.is_ok() {
            let g = self.mirror.params.granularity;
            let (mut start, mut end) = (offset, offset + len);
            // Skip a head or tail that lies in an already dirty granule.
            if start % g != 0 && bits.test(start) {
                start = start.div_ceil(g) * g;
            }
            if end % g != 0 && end > start && bits.test(end - 1) {
                end = end / g * g;
            }
            if end > start {
                let (first, last) = (start.div_ceil(g) * g, end / g * g);
                if last > first {
                    bits.reset_range(first, last - first);
                }
                // Progress counts active writes as QEMU's does (its
                // BLOCK_JOB_READY offset and len include them).
                let job = self.copier.job();
                job.progress_increase_remaining(end - start);
                match to_target(&self.mirror.target, start, end - start) {
                    Ok(()) => job.progress_update(end - start),
                    Err(e) => {
                        self.copier.policy(false, e, None);
                        redirty = Some((start, end - start));
                    }
                }
            }
        }
        self.copier.end_active_write(offset, len, redirty);
        r
    }
}

impl ActiveWrites {
    /// A guest write of `buf` at `offset` to `node` (the source).
    pub fn pwrite(&self, node: &Node, offset: u64, buf: &[u8]) -> Result<()> {
        self.through(
            node,
            offset,
            buf.len() as u64,
            |n| n.pwrite(offset, buf),
            |t, o, l| t.pwrite(o, &buf[(o - offset) as usize..(o - offset + l) as usize]),
        )
    }

    /// A guest write-zeroes.
    pub fn pwrite_zeroes(&self, node: &Node, offset: u64, len: u64, may_unmap: bool) -> Result<()> {
        self.through(
            node,
            offset,
            len,
            |n| n.pwrite_zeroes(offset, len, may_unmap),
            |t, o, l| t.pwrite_zeroes(o, l, may_unmap),
        )
    }

    /// A guest discard.
    pub fn pdiscard(&self, node: &Node, offset: u64, len: u64) -> Result<()> {
        self.through(
            node,
            offset,
            len,
            |n| n.pdiscard(offset, len),
            |t, o, l| t.pdiscard(o, l),
        )
    }
}

/// Hand guest writes to active writes from now on. Once per run: `run`
/// and `block-job-change` may both get here; call with the filter drained.
pub(super) fn install(m: &Arc<Mirror>, c: &Arc<Copier>) {
    // Relaxed: the swap's atomicity picks the one installer (see the
    // field); `remove` runs on the run's thread after its own install.
    if m.filter_on.swap(true, Ordering::Relaxed) {
        return;
    }
    m.top.active.store(Some(Arc::new(ActiveWrites {
        mirror: m.clone(),
        copier: c.clone(),
    })));
}

/// Back to background mode (the run is over).
pub(super) fn remove(m: &Mirror) {
    m.top.active.store(None);
    // Relaxed: under `running`'s lock, which orders it before a later
    // change's install (see the field).
    m.filter_on.store(false, Ordering::Relaxed);
}
