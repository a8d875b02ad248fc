//! A node: a driver plus what QEMU's generic block layer (`block/io.c`)
//! adds around every request: bounds and read-only checks, in-flight
//! accounting for drain, the blkdebug events the generic layer fires
//! (`pwritev`, `pwritev_done`, `pwritev_zero`, `flush_to_os`,
//! `flush_to_disk`), `detect-zeroes`, dropping discards the node does not
//! pass on, marking the node's recording dirty bitmaps after each write,
//! and skipping a flush when nothing was written since the last one.

use std::sync::Arc;

use crate::locks::{Condvar, Mutex};

use super::dirty_bitmap::NodeBitmaps;
use super::parents::Parents;
use super::{BlkdebugEvent, BlockDriver, BlockStatus, NodeChild, WriteFlags, options};
use crate::error::{Error, Result};
use crate::sync::{AtomicBool, AtomicU8, AtomicU64, Ordering};

/// A node of the graph: a driver plus QEMU's generic block layer.
pub struct Node {
    name: String,
    auto_named: bool,
    read_only: bool,
    pub(super) drv: Box<dyn BlockDriver>,
    /// Write generation and last flushed generation: a flush with nothing
    /// written since the last one is skipped, as QEMU does.
    pub(super) write_gen: AtomicU64,
    flushed_gen: AtomicU64,
    in_flight: Mutex<InFlightCount>,
    idle: Condvar,
    pub(super) parents: Mutex<Parents>,
    /// `detect-zeroes`: 0 off, 1 on, 2 unmap.
    pub(super) detect_zeroes: AtomicU8,
    /// `discard=unmap`: discards reach the driver (and dirty bitmaps).
    discard: AtomicBool,
    /// Zero writes may deallocate (`BDRV_REQ_MAY_UNMAP` survives this
    /// node): false for a node opened with `discard=ignore`, as QEMU drops
    /// the flag on a node without `BDRV_O_UNMAP`. Nodes a job creates
    /// (filters) pass it on.
    keeps_unmap: AtomicBool,
    pub(super) bitmaps: NodeBitmaps,
    /// `force-share=on`: every parent shares everything on this node.
    force_share: AtomicBool,
    /// `cache.direct` (bit 0) and `cache.no-flush` (bit 1), for queries.
    cache: AtomicU8,
    /// Read-only as far as permissions go (QEMU's `bdrv_is_writable`):
    /// `read-only`, or a backing file opened implicitly, which QEMU opens
    /// read-only and reopens read-write only for a commit into it.
    perm_read_only: AtomicBool,
    /// The cumulative permissions of the node's parents, as last set by
    /// [`super::graph::Graph::refresh_perms`].
    pub(super) perms: Mutex<super::perm::Perms>,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("name", &self.name)
            .field("driver", &self.drv.driver_name())
            .finish_non_exhaustive()
    }
}

/// Requests in flight on a node, and threads waiting for none to be.
#[derive(Debug, Default)]
struct InFlightCount {
    requests: u64,
    waiters: u32,
}

/// Decrements the in-flight count when a request ends, however it ends.
pub(super) struct InFlight<'a>(&'a Node);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        let mut n = self.0.lock_in_flight();
        n.requests -= 1;
        // Only a waiter needs the wake-up (a system call otherwise, on
        // every request that leaves the node idle).
        if n.requests == 0 && n.waiters > 0 {
            self.0.idle.notify_all();
        }
    }
}

/// A request counted in flight beyond the call that began it (a
/// [`super::resolve::Resolved`] request, completed on another thread).
pub(super) struct InFlightOwned(Arc<Node>);

impl Drop for InFlightOwned {
    fn drop(&mut self) {
        drop(InFlight(&self.0));
    }
}

impl Node {
    /// Wrap a driver as a node.
    pub fn new(
        name: String,
        auto_named: bool,
        read_only: bool,
        drv: Box<dyn BlockDriver>,
    ) -> Arc<Node> {
        // Bitmaps the format found in its image are the node's from the
        // start, before any write can miss them.
        let loaded = drv
            .persistent_bitmaps()
            .map(|p| p.loaded(&name))
            .unwrap_or_default();
        Arc::new(Node {
            name,
            auto_named,
            read_only,
            drv,
            write_gen: AtomicU64::new(0),
            flushed_gen: AtomicU64::new(0),
            in_flight: Mutex::new(InFlightCount::default()),
            idle: Condvar::new(),
            parents: Mutex::new(Parents::default()),
            detect_zeroes: AtomicU8::new(0),
            discard: AtomicBool::new(false),
            keeps_unmap: AtomicBool::new(true),
            bitmaps: NodeBitmaps::with_loaded(loaded),
            force_share: AtomicBool::new(false),
            cache: AtomicU8::new(0),
            perm_read_only: AtomicBool::new(read_only),
            perms: Mutex::new(super::perm::Perms::NONE),
        })
    }

    /// The node's dirty bitmaps.
    pub fn bitmaps(&self) -> &NodeBitmaps {
        &self.bitmaps
    }

    /// Set `detect-zeroes` and `discard` (with `discard=unmap`, discards
    /// reach the driver and detected zeroes may deallocate).
    pub fn set_write_options(&self, mode: options::DetectZeroes, discard_unmap: bool) {
        let v = match mode {
            options::DetectZeroes::Off => 0,
            options::DetectZeroes::On => 1,
            options::DetectZeroes::Unmap if discard_unmap => 2,
            options::DetectZeroes::Unmap => 1,
        };
        // Relaxed: set once right after creation, before the node is shared.
        self.detect_zeroes.store(v, Ordering::Relaxed);
        // Relaxed: as above.
        self.discard.store(discard_unmap, Ordering::Relaxed);
        // Relaxed: as above.
        self.keeps_unmap.store(discard_unmap, Ordering::Relaxed);
    }

    /// Set `cache.direct` and `cache.no-flush` as opened (right after
    /// creation, before the node is shared): what queries show.
    pub(super) fn set_cache(&self, direct: bool, no_flush: bool) {
        // Relaxed: set before the node is shared.
        self.cache.store(
            u8::from(direct) | u8::from(no_flush) << 1,
            Ordering::Relaxed,
        );
    }

    /// `cache.direct` and `cache.no-flush` of the node.
    pub fn cache(&self) -> (bool, bool) {
        // Relaxed: written once before the node was shared.
        let c = self.cache.load(Ordering::Relaxed);
        (c & 1 != 0, c & 2 != 0)
    }

    /// Set `force-share` (right after creation, before the node is shared).
    pub(super) fn set_force_share(&self, on: bool) {
        // Relaxed: set before the node is shared.
        self.force_share.store(on, Ordering::Relaxed);
    }

    /// `force-share=on`.
    pub fn force_share(&self) -> bool {
        // Relaxed: set once before the node is shared.
        self.force_share.load(Ordering::Relaxed)
    }

    /// Whether the node may be written as far as permissions go (QEMU's
    /// `bdrv_is_writable`): a format node that is writable writes its
    /// metadata, so it takes write and resize on its file.
    pub fn perm_writable(&self) -> bool {
        // Relaxed: changed only by a reopen, which refreshes the graph's
        // permissions under the graph lock afterwards.
        !self.perm_read_only.load(Ordering::Relaxed)
    }

    /// QEMU's `bdrv_reopen_set_read_only` as permissions see it; callers
    /// refresh the graph's permissions afterwards.
    pub fn set_perm_read_only(&self, ro: bool) {
        // Relaxed: see perm_writable.
        self.perm_read_only.store(ro, Ordering::Relaxed);
    }

    /// The cumulative permissions of this node's parents (what it takes
    /// and shares on behalf of all of them).
    pub fn perms(&self) -> super::perm::Perms {
        *self.perms.lock()
    }

    /// The node name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// True when the name was generated (`#block…`), i.e. the node was
    /// created inline as a child and is not owned by the monitor.
    pub fn is_auto_named(&self) -> bool {
        self.auto_named
    }

    /// The driver name.
    pub fn driver_name(&self) -> &'static str {
        self.drv.driver_name()
    }

    /// The driver.
    pub fn driver(&self) -> &dyn BlockDriver {
        self.drv.as_ref()
    }

    /// Read-only node.
    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    /// The backing node (qcow2), if any.
    pub fn backing(&self) -> Option<Arc<Node>> {
        self.drv.backing()
    }

    /// Children links.
    pub fn children(&self) -> Vec<NodeChild> {
        self.drv.children()
    }

    /// Size in bytes.
    pub fn len(&self) -> Result<u64> {
        self.drv.len()
    }

    /// True for a zero-length node.
    pub fn is_empty(&self) -> Result<bool> {
        Ok(self.len()? == 0)
    }

    /// Cluster size, if the format has one.
    pub fn cluster_size(&self) -> Option<u64> {
        self.drv.cluster_size()
    }

    /// The file name shown in queries.
    pub fn filename(&self) -> String {
        self.drv.filename()
    }

    fn lock_in_flight(&self) -> crate::locks::MutexGuard<'_, InFlightCount> {
        self.in_flight.lock()
    }

    pub(super) fn begin(&self) -> InFlight<'_> {
        self.lock_in_flight().requests += 1;
        InFlight(self)
    }

    /// [`Self::begin`] for a request that outlives the call.
    pub(super) fn begin_owned(self: &Arc<Self>) -> InFlightOwned {
        std::mem::forget(self.begin());
        InFlightOwned(self.clone())
    }

    /// Requests currently being processed on this node.
    pub fn in_flight(&self) -> u64 {
        self.lock_in_flight().requests
    }

    /// Wait until no request is in flight.
    pub fn wait_idle(&self) {
        let mut n = self.lock_in_flight();
        while n.requests > 0 {
            n.waiters += 1;
            n = self.idle.wait(n);
            n.waiters -= 1;
        }
    }

    pub(super) fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        let size = self.drv.len()?;
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok(()),
            _ => Err(Error::from_errno(libc::EIO)),
        }
    }

    /// Writes may also extend a node that can grow.
    fn check_write_range(&self, offset: u64, len: u64) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= i64::MAX as u64 && self.drv.can_grow() => Ok(()),
            _ => self.check_range(offset, len),
        }
    }

    pub(super) fn check_writable(&self) -> Result<()> {
        if self.read_only {
            return Err(Error::from_errno(libc::EPERM));
        }
        Ok(())
    }

    /// Fire a blkdebug event on this node (QEMU's `bdrv_debug_event`).
    pub fn debug_event(&self, event: BlkdebugEvent) {
        self.drv.debug_event(event);
    }

    /// Read `buf.len()` bytes at `offset`.
    pub fn pread(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let _f = self.begin();
        self.check_range(offset, buf.len() as u64)?;
        if buf.is_empty() {
            return Ok(());
        }
        self.drv.read(offset, buf)
    }

    /// Write `buf` at `offset`.
    pub fn pwrite(&self, offset: u64, buf: &[u8]) -> Result<()> {
        self.pwrite_with(offset, buf, WriteFlags::default())
    }

    /// Write `buf` at `offset` with [`WriteFlags`] (FUA).
    pub fn pwrite_with(&self, offset: u64, buf: &[u8], flags: WriteFlags) -> Result<()> {
        let _f = self.begin();
        self.check_writable()?;
        self.check_write_range(offset, buf.len() as u64)?;
        if buf.is_empty() {
            return Ok(());
        }
        // Relaxed: written once before the node is shared (see setter).
        let detect = self.detect_zeroes.load(Ordering::Relaxed);
        if detect != 0 && buf.iter().all(|b| *b == 0) {
            drop(_f);
            let flags = WriteFlags {
                no_fallback: false,
                ..flags
            };
            return self.pwrite_zeroes_with(offset, buf.len() as u64, detect == 2, flags);
        }
        self.debug_event(BlkdebugEvent::Pwritev);
        // Relaxed: the generation only has to differ from the flushed one;
        // the flush that reads it is ordered by the I/O itself.
        self.write_gen.fetch_add(1, Ordering::Relaxed);
        let r = self.drv.write_with(offset, buf, flags);
        self.debug_event(BlkdebugEvent::PwritevDone);
        // After the write, also a failed one (it may have written part):
        // a copier that sees the bit reads the new data.
        self.bitmaps.set_dirty(offset, buf.len() as u64);
        r
    }

    /// Make a range read as zeroes.
    pub fn pwrite_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<()> {
        self.pwrite_zeroes_with(offset, len, may_unmap, WriteFlags::default())
    }

    /// Make a range read as zeroes, with [`WriteFlags`] (FUA; with
    /// `no_fallback`, `ENOTSUP` where zeroing is not cheap, and then
    /// nothing was written).
    pub fn pwrite_zeroes_with(
        &self,
        offset: u64,
        len: u64,
        may_unmap: bool,
        flags: WriteFlags,
    ) -> Result<()> {
        let _f = self.begin();
        self.check_writable()?;
        self.check_write_range(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        self.debug_event(BlkdebugEvent::PwritevZero);
        // Relaxed: see pwrite.
        self.write_gen.fetch_add(1, Ordering::Relaxed);
        // Relaxed: set before the node is shared (see set_write_options).
        let may_unmap = may_unmap && self.keeps_unmap.load(Ordering::Relaxed);
        let r = self.drv.write_zeroes_with(offset, len, may_unmap, flags);
        self.debug_event(BlkdebugEvent::PwritevDone);
        // A fast zero that was refused changed nothing.
        if !(flags.no_fallback && r.as_ref().is_err_and(|e| e.errno() == Some(libc::ENOTSUP))) {
            self.bitmaps.set_dirty(offset, len);
        }
        r
    }

    /// Whether discards reach this node's driver (`discard=unmap` and a
    /// driver that discards); others are dropped before they are tracked.
    pub fn accepts_discard(&self) -> bool {
        // Relaxed: written once before the node is shared.
        self.discard.load(Ordering::Relaxed) && self.drv.can_discard()
    }

    /// Discard a range.
    pub fn pdiscard(&self, offset: u64, len: u64) -> Result<()> {
        let _f = self.begin();
        self.check_writable()?;
        self.check_range(offset, len)?;
        if len == 0 || !self.accepts_discard() {
            // QEMU drops such a discard before it is tracked: nothing
            // happens, no bitmap records it.
            return Ok(());
        }
        // Relaxed: see pwrite.
        self.write_gen.fetch_add(1, Ordering::Relaxed);
        let r = self.drv.discard(offset, len);
        self.bitmaps.set_dirty(offset, len);
        r
    }

    /// Start writeback of a range written through this node, so that the
    /// next flush has less to wait for (a hint; see the `writeback` module). Ranges
    /// outside the node are ignored.
    pub fn start_writeback(&self, offset: u64, len: u64) {
        let _f = self.begin();
        if self.check_range(offset, len).is_ok() && len > 0 {
            self.drv.start_writeback(offset, len);
        }
    }

    /// Flush; skipped when nothing was written since the last flush.
    pub fn flush(&self) -> Result<()> {
        let _f = self.begin();
        // Relaxed: a flush racing with a write may or may not cover it,
        // exactly as with QEMU's write_gen; the caller orders its own
        // writes before its flush.
        let gen_now = self.write_gen.load(Ordering::Relaxed);
        if gen_now == self.flushed_gen.load(Ordering::Relaxed) {
            return Ok(());
        }
        if let Some(c) = self.drv.children().first() {
            c.node.debug_event(BlkdebugEvent::FlushToOs);
            c.node.debug_event(BlkdebugEvent::FlushToDisk);
        }
        self.drv.flush()?;
        // Relaxed: monotonic bookkeeping only; see above.
        self.flushed_gen.fetch_max(gen_now, Ordering::Relaxed);
        Ok(())
    }

    /// Block status of the range at `offset` (at most `len` bytes, clamped
    /// to the end of the node).
    pub fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus> {
        let _f = self.begin();
        let size = self.drv.len()?;
        if offset >= size {
            return Err(Error::from_errno(libc::EIO));
        }
        let len = len.min(size - offset);
        if len == 0 {
            return Ok(BlockStatus::data(0));
        }
        let mut st = self.drv.block_status(offset, len)?;
        st.len = st.len.clamp(1, len);
        Ok(st)
    }
}
