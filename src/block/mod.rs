//! The block layer: nodes that read and write bytes at offsets.
//!
//! A [`BlockDriver`] implements one format or protocol (`file`, `raw`,
//! `null-co`, `blkdebug`, `host`); a [`Node`] wraps it with what QEMU's
//! generic block layer adds (`block/io.c`): bounds and read-only checks,
//! in-flight accounting for drain, the blkdebug events the generic layer
//! fires (`pwritev`, `pwritev_done`, `pwritev_zero`, `flush_to_os`,
//! `flush_to_disk`), and skipping a flush when nothing was written since
//! the last one. All I/O is positional and takes `&self`: any number of
//! threads may issue requests on one node at once.
//!
//! Nodes form a graph through their children (`file`, `image`); the
//! [`graph::Graph`] of a context names them and drains them.

pub mod backend;
pub mod blkdebug;
pub mod chain;
pub mod child;
pub mod copy_range;
pub mod file;
pub mod graph;
pub mod host;
pub mod null;
pub mod options;
pub mod qcow2;
pub mod raw;
mod writeback;

use parking_lot::{Condvar, Mutex};
use std::sync::{Arc, Weak};

use crate::bitmap::named::NodeBitmaps;
use crate::engine::Job;
use crate::error::{Error, Result};
use crate::sync::{AtomicBool, AtomicU8, AtomicU64, Ordering};

pub use blkdebug::BlkdebugEvent;

/// What a range of a node holds (QEMU's `BDRV_BLOCK_*` flags).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockStatus {
    /// Data is stored for the range (reads go to storage).
    pub data: bool,
    /// The range reads as zeroes.
    pub zero: bool,
    /// This layer decides the content (as opposed to a backing file).
    pub allocated: bool,
    /// Length of the range with this status, at least 1 byte and at most
    /// the length asked for.
    pub len: u64,
}

impl BlockStatus {
    /// Data allocated in this layer.
    pub fn data(len: u64) -> Self {
        BlockStatus {
            data: true,
            zero: false,
            allocated: true,
            len,
        }
    }

    /// A range that reads as zeroes (a hole, or known zeroes).
    pub fn zero(len: u64) -> Self {
        BlockStatus {
            data: false,
            zero: true,
            allocated: true,
            len,
        }
    }
}

/// Zero a range by writing zero buffers, for drivers without a cheaper way.
pub fn write_zero_buffers(
    offset: u64,
    len: u64,
    mut write: impl FnMut(u64, &[u8]) -> Result<()>,
) -> Result<()> {
    // In .bss: no allocation per call, and the pages are shared zeroes.
    static ZEROES: [u8; 1 << 20] = [0; 1 << 20];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(ZEROES.len() as u64) as usize;
        write(offset + done, &ZEROES[..n])?;
        done += n as u64;
    }
    Ok(())
}

/// A child link of a node: the role (`file`, `image`, `backing`) and node.
#[derive(Clone)]
pub struct NodeChild {
    /// QEMU's child name.
    pub role: &'static str,
    /// The child.
    pub node: Arc<Node>,
}

/// One format or protocol driver. Implementations must be thread-safe;
/// the [`Node`] wrapper has already checked bounds and permissions.
pub trait BlockDriver: std::any::Any + Send + Sync + 'static {
    /// The `driver` name (`file`, `raw`, …).
    fn driver_name(&self) -> &'static str;

    /// Size in bytes.
    fn len(&self) -> Result<u64>;

    /// True for a zero-length node.
    fn is_empty(&self) -> Result<bool> {
        Ok(self.len()? == 0)
    }

    /// Read `buf.len()` bytes at `offset`.
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()>;

    /// Write `buf` at `offset`.
    fn write(&self, offset: u64, buf: &[u8]) -> Result<()>;

    /// Make `len` bytes at `offset` read as zero; `may_unmap` allows
    /// deallocating them. The default writes zero buffers.
    fn write_zeroes(&self, offset: u64, len: u64, _may_unmap: bool) -> Result<()> {
        write_zero_buffers(offset, len, |o, b| self.write(o, b))
    }

    /// Discard a range (a hint; may do nothing).
    fn discard(&self, _offset: u64, _len: u64) -> Result<()> {
        Ok(())
    }

    /// Whether the driver can discard at all (QEMU: it has a discard
    /// callback); discards of nodes that cannot are dropped early.
    fn can_discard(&self) -> bool {
        false
    }

    /// Make written data stable.
    fn flush(&self) -> Result<()>;

    /// Start writing `[offset, offset + len)` back to stable storage now,
    /// without waiting (see the `writeback` module). A hint: the default does
    /// nothing, and only a flush makes data stable.
    fn start_writeback(&self, _offset: u64, _len: u64) {}

    /// Status of the range starting at `offset` (at most `len` bytes).
    fn block_status(&self, _offset: u64, len: u64) -> Result<BlockStatus> {
        Ok(BlockStatus::data(len))
    }

    /// Writes past the end extend the node (a file under a format that
    /// allocates at its end, as QEMU's protocol nodes grow). Default: no.
    fn can_grow(&self) -> bool {
        false
    }

    /// The backing node, for formats that have one.
    fn backing(&self) -> Option<Arc<Node>> {
        None
    }

    /// Children of this node.
    fn children(&self) -> Vec<NodeChild> {
        Vec::new()
    }

    /// For filters (QEMU's `bdrv_filter_bs`): the child whose data this
    /// node shows unchanged. A mirror may replace a node reached from its
    /// source through filters only.
    fn filtered_child(&self) -> Option<Arc<Node>> {
        None
    }

    /// Whether [`BlockDriver::replace_child`] can move this node's edges.
    fn can_replace_child(&self) -> bool {
        false
    }

    /// Point this node's edges to `old` at `new` (QEMU's
    /// `bdrv_replace_node`, seen from one parent). Called with the nodes
    /// drained, and only when [`BlockDriver::can_replace_child`] is true.
    fn replace_child(&self, _old: &Arc<Node>, _new: &Arc<Node>) {}

    /// A blkdebug event fired on this node by a parent or the generic
    /// layer. Only blkdebug acts on it.
    fn debug_event(&self, _event: BlkdebugEvent) {}

    /// Cluster size, for drivers that have one.
    fn cluster_size(&self) -> Option<u64> {
        None
    }

    /// The file name shown in queries.
    fn filename(&self) -> String {
        String::new()
    }

    /// True when write-zeroes with unmap is cheap (holes).
    fn supports_zero_unmap(&self) -> bool {
        false
    }

    /// Source side of copy offload: hand the file holding `[offset,
    /// offset + len)` to `sink` (see [`copy_range`]). The default cannot.
    fn copy_range_from(
        &self,
        _offset: u64,
        _len: u64,
        _sink: &mut copy_range::CopySink<'_>,
    ) -> Result<bool> {
        Ok(false)
    }

    /// Target side of copy offload: copy `len` bytes of `src` at
    /// `src_offset` to `offset`. The default cannot.
    fn copy_range_to(
        &self,
        _offset: u64,
        _src: &std::fs::File,
        _src_offset: u64,
        _len: u64,
    ) -> Result<bool> {
        Ok(false)
    }
}

/// A filter on a node's guest writes (QEMU's mirror_top in write-blocking
/// mode): guest writes that reach the node through a backend go through
/// it instead of straight to the node.
pub trait WriteFilter: Send + Sync {
    /// Write `buf` at `offset` to `node` (and wherever else the filter
    /// wants); the result is what the guest sees.
    fn pwrite(&self, node: &Node, offset: u64, buf: &[u8]) -> Result<()>;
    /// Write-zeroes through the filter.
    fn pwrite_zeroes(&self, node: &Node, offset: u64, len: u64, may_unmap: bool) -> Result<()>;
    /// Discard through the filter.
    fn pdiscard(&self, node: &Node, offset: u64, len: u64) -> Result<()>;
}

/// Who may be quiesced when a node is drained.
#[derive(Default)]
struct Parents {
    backends: Vec<Weak<backend::BackendShared>>,
    /// Jobs using the node; `true` for the job's main node (QEMU puts an
    /// op blocker there), `false` for other nodes it uses (a target).
    jobs: Vec<(Weak<Job>, bool)>,
}

/// A node of the graph: a driver plus QEMU's generic block layer.
pub struct Node {
    name: String,
    auto_named: bool,
    read_only: bool,
    drv: Box<dyn BlockDriver>,
    /// Write generation and last flushed generation: a flush with nothing
    /// written since the last one is skipped, as QEMU does.
    write_gen: AtomicU64,
    flushed_gen: AtomicU64,
    in_flight: Mutex<u64>,
    idle: Condvar,
    parents: Mutex<Parents>,
    /// `detect-zeroes`: 0 off, 1 on, 2 unmap.
    detect_zeroes: AtomicU8,
    /// `discard=unmap`: discards reach the driver (and dirty bitmaps).
    discard: AtomicBool,
    bitmaps: NodeBitmaps,
    filter: arc_swap::ArcSwapOption<Box<dyn WriteFilter>>,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("name", &self.name)
            .field("driver", &self.drv.driver_name())
            .finish_non_exhaustive()
    }
}

/// Decrements the in-flight count when a request ends, however it ends.
struct InFlight<'a>(&'a Node);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        let mut n = self.0.lock_in_flight();
        *n -= 1;
        if *n == 0 {
            self.0.idle.notify_all();
        }
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
        Arc::new(Node {
            name,
            auto_named,
            read_only,
            drv,
            write_gen: AtomicU64::new(0),
            flushed_gen: AtomicU64::new(0),
            in_flight: Mutex::new(0),
            idle: Condvar::new(),
            parents: Mutex::new(Parents::default()),
            detect_zeroes: AtomicU8::new(0),
            discard: AtomicBool::new(false),
            bitmaps: NodeBitmaps::default(),
            filter: arc_swap::ArcSwapOption::empty(),
        })
    }

    /// The filter guest writes go through, if any.
    pub fn write_filter(&self) -> Option<Arc<Box<dyn WriteFilter>>> {
        self.filter.load_full()
    }

    /// Install (or with `None`, remove) the guest-write filter.
    pub fn set_write_filter(&self, f: Option<Box<dyn WriteFilter>>) {
        self.filter.store(f.map(Arc::new));
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

    fn lock_in_flight(&self) -> parking_lot::MutexGuard<'_, u64> {
        self.in_flight.lock()
    }

    fn begin(&self) -> InFlight<'_> {
        *self.lock_in_flight() += 1;
        InFlight(self)
    }

    /// Requests currently being processed on this node.
    pub fn in_flight(&self) -> u64 {
        *self.lock_in_flight()
    }

    /// Wait until no request is in flight.
    pub fn wait_idle(&self) {
        let mut n = self.lock_in_flight();
        while *n > 0 {
            self.idle.wait(&mut n);
        }
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<()> {
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

    fn check_writable(&self) -> Result<()> {
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
            return self.pwrite_zeroes(offset, buf.len() as u64, detect == 2);
        }
        self.debug_event(BlkdebugEvent::Pwritev);
        // Relaxed: the generation only has to differ from the flushed one;
        // the flush that reads it is ordered by the I/O itself.
        self.write_gen.fetch_add(1, Ordering::Relaxed);
        let r = self.drv.write(offset, buf);
        self.debug_event(BlkdebugEvent::PwritevDone);
        // After the write, also a failed one (it may have written part):
        // a copier that sees the bit reads the new data.
        self.bitmaps.set_dirty(offset, buf.len() as u64);
        r
    }

    /// Make a range read as zeroes.
    pub fn pwrite_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<()> {
        let _f = self.begin();
        self.check_writable()?;
        self.check_write_range(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        self.debug_event(BlkdebugEvent::PwritevZero);
        // Relaxed: see pwrite.
        self.write_gen.fetch_add(1, Ordering::Relaxed);
        let r = self.drv.write_zeroes(offset, len, may_unmap);
        self.debug_event(BlkdebugEvent::PwritevDone);
        self.bitmaps.set_dirty(offset, len);
        r
    }

    /// Discard a range.
    pub fn pdiscard(&self, offset: u64, len: u64) -> Result<()> {
        let _f = self.begin();
        self.check_writable()?;
        self.check_range(offset, len)?;
        // Relaxed: written once before the node is shared.
        if len == 0 || !self.discard.load(Ordering::Relaxed) || !self.drv.can_discard() {
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

    // ---- parents (for drain) ----------------------------------------------

    pub(crate) fn attach_backend(&self, b: &Arc<backend::BackendShared>) {
        let mut p = self.parents.lock();
        p.backends.retain(|w| w.strong_count() > 0);
        p.backends.push(Arc::downgrade(b));
    }

    pub(crate) fn detach_backend(&self, b: &Arc<backend::BackendShared>) {
        let mut p = self.parents.lock();
        p.backends
            .retain(|w| w.strong_count() > 0 && !std::ptr::eq(w.as_ptr(), Arc::as_ptr(b)));
    }

    /// Record that `job` uses this node (QEMU's `block_job_add_bdrv`): a
    /// drain of the node pauses the job; `main` marks the job's main node.
    /// Detached when the job is freed.
    pub fn attach_job(self: &Arc<Self>, job: &Arc<Job>, main: bool) {
        {
            let mut p = self.parents.lock();
            p.jobs.retain(|(w, _)| w.strong_count() > 0);
            p.jobs.push((Arc::downgrade(job), main));
        }
        let node = Arc::downgrade(self);
        // The address only identifies the entry to remove; it is never
        // dereferenced, so it travels as an integer.
        let jaddr = Arc::as_ptr(job) as usize;
        job.on_free(move || {
            if let Some(n) = node.upgrade() {
                let mut p = n.parents.lock();
                p.jobs
                    .retain(|(w, _)| w.strong_count() > 0 && w.as_ptr() as usize != jaddr);
            }
        });
    }

    /// The job whose main node this is, if any (QEMU's op blocker).
    pub fn main_job(&self) -> Option<Arc<Job>> {
        let p = self.parents.lock();
        p.jobs
            .iter()
            .filter(|(_, main)| *main)
            .find_map(|(w, _)| w.upgrade())
    }

    /// Any job that uses this node (QEMU's op blockers of block jobs).
    pub fn any_job(&self) -> Option<Arc<Job>> {
        let p = self.parents.lock();
        p.jobs.iter().find_map(|(w, _)| w.upgrade())
    }

    /// QEMU's op blocker of block jobs, for commands that would use or
    /// change this node: refused while any job uses it.
    pub fn check_not_busy(&self) -> Result<()> {
        match self.any_job() {
            Some(j) => Err(Error::generic(format!(
                "Node '{}' is busy: block device is in use by block job: {}",
                self.name(),
                j.job_type()
            ))),
            None => Ok(()),
        }
    }

    /// A job uses this node other than as its main node (e.g. a target).
    pub fn has_job_user(&self) -> bool {
        let p = self.parents.lock();
        p.jobs
            .iter()
            .any(|(w, main)| !*main && w.strong_count() > 0)
    }

    pub(crate) fn parent_backends(&self) -> Vec<Arc<backend::BackendShared>> {
        let p = self.parents.lock();
        p.backends.iter().filter_map(Weak::upgrade).collect()
    }

    /// Jobs attached to this node.
    pub fn parent_jobs(&self) -> Vec<Arc<Job>> {
        let p = self.parents.lock();
        p.jobs.iter().filter_map(|(w, _)| w.upgrade()).collect()
    }
}
