//! Block copy (QEMU's `block/block-copy.c`): the copy state a backup job
//! and its `copy-before-write` filter share. A *copy bitmap* says which
//! clusters of the source still have to reach the target; a copy takes
//! clusters out of it (so nothing copies them twice), holds them *in
//! flight* while it reads the source and writes the target, and puts them
//! back when it fails. Both users copy through here: the filter, right
//! before a guest write overwrites a cluster, and the job, cluster run by
//! cluster run until the bitmap is empty.
//!
//! # Invariants
//! - A cluster is in the copy bitmap, or in flight, or copied (or never
//!   needed): never two of these. Claims (test-and-clear of the bitmap)
//!   and the in-flight list change together under one lock.
//! - A guest write proceeds only when no cluster it touches is dirty or in
//!   flight: the filter first copies what it claimed itself, then waits for
//!   the copies others hold, and repeats if one of those failed (its
//!   clusters are dirty again). It never waits while holding claims of its
//!   own, so two overlapping guest writes cannot wait for each other.

use std::sync::Arc;

use super::Node;
use super::aligned::AlignedBuf;
use super::child::ChildEdge;
use super::dirty_bitmap::BdrvDirtyBitmap;
use crate::error::{Error, Result};
use crate::locks::{Condvar, Mutex};
use crate::sync::{AtomicBool, Ordering};

/// QEMU's largest copy request without copy offload (`BLOCK_COPY_MAX_BUFFER`).
pub const MAX_BUFFER: u64 = 1 << 20;

/// Copy buffers' alignment: a page, what any O_DIRECT device takes.
const BUF_ALIGN: usize = 4096;

/// A failed copy: the error, and whether reading the source failed (else
/// writing the target did).
#[derive(Debug, Clone)]
pub struct CopyError {
    /// What failed.
    pub error: Error,
    /// The source read failed (else the target write).
    pub is_read: bool,
}

/// Called with the bytes of a successful copy and whether they were
/// written as zeroes rather than copied as data.
type Progress = Box<dyn Fn(u64, bool) + Send + Sync>;

/// The shared copy state.
pub struct BlockCopy {
    source: Arc<ChildEdge>,
    target: Arc<Node>,
    cluster: u64,
    len: u64,
    /// Clusters still to copy (an anonymous bitmap on the filter node,
    /// which only this state changes).
    bitmap: Arc<BdrvDirtyBitmap>,
    /// Byte ranges being copied now.
    in_flight: Mutex<Vec<(u64, u64)>>,
    ended: Condvar,
    /// Called with the bytes of every successful copy (the job's progress).
    progress: Mutex<Option<Progress>>,
    /// Copy through the kernel (`copy_file_range`) while it works.
    offload: AtomicBool,
    /// The largest copy (a multiple of the cluster size).
    max_chunk: u64,
    /// Discard on the source what reached the target (QEMU's
    /// `discard-source`).
    discard_source: AtomicBool,
}

impl BlockCopy {
    /// Copy state from the node behind `source` to `target`, with
    /// `cluster`-sized clusters, all of them dirty until the caller says
    /// otherwise ([`BlockCopy::bitmap`]).
    pub fn new(
        source: Arc<ChildEdge>,
        target: Arc<Node>,
        bitmap: Arc<BdrvDirtyBitmap>,
        cluster: u64,
        max_chunk: u64,
    ) -> Result<Arc<BlockCopy>> {
        let len = source.get().len()?;
        let max_chunk = match max_chunk {
            0 => MAX_BUFFER.max(cluster),
            m => m / cluster * cluster,
        };
        Ok(Arc::new(BlockCopy {
            source,
            target,
            cluster,
            len,
            bitmap,
            in_flight: Mutex::new(Vec::new()),
            ended: Condvar::new(),
            progress: Mutex::new(None),
            offload: AtomicBool::new(true),
            max_chunk,
            discard_source: AtomicBool::new(false),
        }))
    }

    /// The copy bitmap.
    pub fn bitmap(&self) -> &Arc<BdrvDirtyBitmap> {
        &self.bitmap
    }

    /// The cluster size.
    pub fn cluster_size(&self) -> u64 {
        self.cluster
    }

    /// The source's length.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True for an empty source.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The largest copy.
    pub fn max_chunk(&self) -> u64 {
        self.max_chunk
    }

    /// The source node now.
    pub fn source(&self) -> Arc<Node> {
        self.source.get()
    }

    /// Discard on the source what reached the target.
    pub fn set_discard_source(&self, on: bool) {
        // Relaxed: set before any copy starts.
        self.discard_source.store(on, Ordering::Relaxed);
    }

    /// Where to report progress (bytes copied by anyone).
    pub fn set_progress(&self, f: Option<Progress>) {
        *self.progress.lock() = f;
    }

    /// Nothing is in flight.
    pub fn idle(&self) -> bool {
        self.in_flight.lock().is_empty()
    }

    /// Wait until nothing is in flight.
    pub fn wait_idle(&self) {
        let mut f = self.in_flight.lock();
        while !f.is_empty() {
            f = self.ended.wait(f);
        }
    }

    /// Take the next run of dirty clusters at or after `from` (at most
    /// `max` bytes, and never more than the largest copy) and hold it in
    /// flight: it must be finished with [`BlockCopy::copy_claimed`].
    pub fn claim(&self, from: u64, max: u64) -> Option<(u64, u64)> {
        let max = max.min(self.max_chunk).max(self.cluster);
        let mut f = self.in_flight.lock();
        let (off, len) = self.bitmap.bits().take_next_area(from, max)?;
        let len = len.min(self.len - off);
        f.push((off, off + len));
        Some((off, len))
    }

    /// Copy a claimed run, then release it: copied, or dirty again when
    /// it failed.
    pub fn copy_claimed(&self, offset: u64, len: u64) -> Result<(), CopyError> {
        self.copy_claimed_then(offset, len, |_, _| {})
    }

    /// [`Self::copy_claimed`], and `copied` runs once the data is on the
    /// target but before the run leaves the in-flight list: whoever waits
    /// for the copy (a guest write to the same clusters) wakes only after
    /// it, so a snapshot read can never see the run neither copied nor in
    /// flight while the guest already overwrites the source.
    fn copy_claimed_then(
        &self,
        offset: u64,
        len: u64,
        copied: impl FnOnce(u64, u64),
    ) -> Result<(), CopyError> {
        let r = self.copy(offset, len);
        let zeroes = r.as_ref().is_ok_and(|z| *z);
        let r = r.map(|_| ());
        // Relaxed: set before any copy starts.
        if r.is_ok() && self.discard_source.load(Ordering::Relaxed) {
            // A hint: the data is safe on the target either way.
            let _ = self.source.get().pdiscard(offset, len);
        }
        if r.is_err() {
            self.release(offset, len);
        } else {
            copied(offset, len);
            {
                let mut f = self.in_flight.lock();
                if let Some(i) = f.iter().position(|&(s, _)| s == offset) {
                    f.swap_remove(i);
                }
            }
            self.ended.notify_all();
        }
        if r.is_ok()
            && let Some(p) = self.progress.lock().as_ref()
        {
            p(len, zeroes);
        }
        r
    }

    /// Before a write to `[offset, offset + len)` of the source: copy every
    /// cluster it touches that has not reached the target yet, and wait
    /// for copies of them in flight (see the module doc). `copied` gets the
    /// runs this call copied itself.
    pub fn copy_before_write(
        &self,
        offset: u64,
        len: u64,
        mut copied: impl FnMut(u64, u64),
    ) -> Result<(), CopyError> {
        let start = offset / self.cluster * self.cluster;
        let end = (offset + len)
            .div_ceil(self.cluster)
            .saturating_mul(self.cluster)
            .min(self.len);
        if start >= end {
            return Ok(());
        }
        loop {
            let mine = self.claim_range(start, end);
            let mut failed = None;
            for &(o, l) in &mine {
                if failed.is_some() {
                    // Not copied: dirty again, for whoever comes next.
                    self.release(o, l);
                    continue;
                }
                if let Err(e) = self.copy_claimed_then(o, l, &mut copied) {
                    failed = Some(e);
                }
            }
            if let Some(e) = failed {
                return Err(e);
            }
            // Others' copies of our clusters: wait for them to end.
            let mut f = self.in_flight.lock();
            while f.iter().any(|&(s, e)| s < end && start < e) {
                f = self.ended.wait(f);
            }
            // One of them failed: its clusters are dirty again.
            if self
                .bitmap
                .bits()
                .next_dirty(start)
                .is_none_or(|d| d >= end)
            {
                return Ok(());
            }
        }
    }

    /// Give a claimed run back uncopied: dirty again.
    fn release(&self, offset: u64, len: u64) {
        {
            let mut f = self.in_flight.lock();
            self.bitmap.bits().set_range(offset, len);
            if let Some(i) = f.iter().position(|&(s, _)| s == offset) {
                f.swap_remove(i);
            }
        }
        self.ended.notify_all();
    }

    /// Claim every dirty run inside `[start, end)`.
    fn claim_range(&self, start: u64, end: u64) -> Vec<(u64, u64)> {
        let mut f = self.in_flight.lock();
        let bits = self.bitmap.bits();
        let mut out = Vec::new();
        let mut pos = start;
        while let Some(d) = bits.next_dirty(pos).filter(|&d| d < end) {
            let max = (end - d).min(self.max_chunk);
            let Some((o, l)) = bits.take_next_area(d, max) else {
                break;
            };
            let l = l.min(self.len - o);
            f.push((o, o + l));
            out.push((o, l));
            pos = o + l;
        }
        out
    }

    /// Read the source, write the target (through the kernel when both
    /// are files).
    /// True when the range was written as zeroes.
    fn copy(&self, offset: u64, len: u64) -> Result<bool, CopyError> {
        let source = self.source.get();
        // Zeroes are written as zeroes, without reading them (QEMU's
        // block-copy asks for the block status first too).
        if source
            .block_status(offset, len)
            .is_ok_and(|st| st.zero && st.len >= len)
        {
            return self.write_zeroes(offset, len).map(|()| true);
        }
        // Relaxed: a hint; a copy that cannot go through the kernel goes
        // through a buffer.
        if self.offload.load(Ordering::Relaxed) {
            match source.copy_range_to(offset, &self.target, offset, len) {
                Ok(true) => return Ok(false),
                Ok(false) => self.offload.store(false, Ordering::Relaxed),
                // Which side failed is known only through a buffer: copy
                // again that way (QEMU falls back the same way).
                Err(_) => self.offload.store(false, Ordering::Relaxed),
            }
        }
        // Aligned, so that an O_DIRECT node takes it without a bounce copy.
        let mut buf = AlignedBuf::zeroed(len as usize, BUF_ALIGN);
        source.pread(offset, &mut buf).map_err(|error| CopyError {
            error,
            is_read: true,
        })?;
        if buf.iter().all(|b| *b == 0) {
            return self.write_zeroes(offset, len).map(|()| true);
        }
        self.target
            .pwrite(offset, &buf)
            .map(|()| false)
            .map_err(|error| CopyError {
                error,
                is_read: false,
            })
    }

    /// Zeroes on the target, without unmap, as QEMU's block-copy writes
    /// them: a target over a backing file (an incremental backup's qcow2)
    /// must read them as zeroes, not fall through to the older backup.
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), CopyError> {
        self.target
            .pwrite_zeroes(offset, len, false)
            .map_err(|error| CopyError {
                error,
                is_read: false,
            })
    }
}
