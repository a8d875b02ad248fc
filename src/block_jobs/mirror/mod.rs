//! The mirror job (QEMU's `blockdev-mirror`): copy a node to a target
//! while the guest keeps writing, reach READY, then pivot the guest to the
//! target on `complete` (or leave a consistent copy on a soft cancel).
//!
//! Layout: this file checks the arguments as QEMU does, puts the
//! `mirror_top` filter above the source and creates the job, and takes the
//! filter out again (pivoting on `complete`); `run` is the job thread's
//! loop (QEMU's `mirror_run`); `copy` holds the copy operations, the worker
//! threads that run them, the in-flight ranges and the buffers; `filter`
//! is `mirror_top`, and `active` its write-blocking mode.
//!
//! # No stale data on the target
//! 1. A granule is copied by at most one operation at a time, and a
//!    write-blocking guest write to a granule waits for (and blocks) the
//!    copy of it: both hold the granule in the in-flight set.
//! 2. The job clears a granule's dirty bit before it reads it; a guest
//!    write sets the bit after its data is in the source. So a write that
//!    lands after the read started leaves its bit set, and the granule is
//!    copied again later; the last copy of every granule reads data at
//!    least as new as the last write that dirtied it.
//! 3. The job reaches READY (and completes) only with no dirty bit and
//!    nothing in flight, and completes inside a drained section of the
//!    source, so no guest write can slip in between the last check and
//!    the pivot.

mod active;
mod copy;
mod filter;
mod ring;
mod run;

#[doc(hidden)]
pub use ring::ring_copies;

use crate::locks::Mutex;
use std::sync::Arc;

use self::filter::{MirrorTop, TopShared};
use super::block_job::{self, add_node, block_job_create, job_flags, reserve_perms};
use crate::block::drain::DrainSection;
use crate::block::graph::Graph;
use crate::block::perm::{
    PERM_CONSISTENT_READ, PERM_RESIZE, PERM_WRITE, PERM_WRITE_UNCHANGED, Perms,
};
use crate::block::replace::can_replace;
use crate::block::{BlockOp, Node, UserKind, chain, dirty_bitmap};
use crate::engine::{Engine, Job, JobChange, JobDriver};
use crate::error::{Error, Result, strerror};
use crate::qapi::{BlockdevOnError, JobType, MirrorCopyMode, MirrorSyncMode};
use crate::sync::{AtomicBool, Ordering};

/// QEMU's default buffer: 16 requests of 1 MiB.
pub const DEFAULT_BUF_SIZE: u64 = 16 << 20;
/// At most this many copy operations in flight.
pub const MAX_IN_FLIGHT: usize = 16;
/// I/O worker threads per mirror: two per CPU, between 2 and
/// [`MAX_IN_FLIGHT`]. Operations beyond that wait in the queue, so up to
/// `MAX_IN_FLIGHT` are still outstanding. On page-cache-backed files the copy
/// is CPU-bound and more threads than that only contend for the inode lock
/// (1 GiB, 2 CPUs, tmpfs, buffered path: 2-4 workers 2.0-2.3 GiB/s at
/// 0.8 s CPU, 16 workers 1.5-1.8 GiB/s at 1.0-1.1 s CPU); two per CPU still
/// lets one thread wait on a slow device while another copies.
pub fn io_workers() -> usize {
    (2 * cpus()).clamp(2, MAX_IN_FLIGHT)
}

/// CPUs this process may run on, read once: `available_parallelism` reads
/// cgroup files on every call, and the copy path asks per operation.
fn cpus() -> usize {
    static CPUS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *CPUS.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// In-kernel copies (`copy_file_range`) at once: one per two CPUs, at
/// least one. Concurrent in-kernel copies into one file mostly contend for
/// its inode lock: 1 GiB on 2 CPUs, 4 rounds each (MiB/s / CPU s), one
/// slot against sixteen: tmpfs in place 2094-3590 / 0.30-0.50 against
/// 2124-3646 / 0.49-0.88, tmpfs sparse 1602-2403 / 0.43-0.65 against
/// 1258-1971 / 0.94-1.41, ext4 in place 1300-1544 / 0.31-0.35 against
/// 1292-1572 / 0.49-0.74, ext4 sparse 881-1183 / 0.36-0.72 against
/// 840-1102 / 0.74-1.24. The other workers meanwhile zero, discard, or
/// wait.
pub fn offload_slots() -> usize {
    (cpus() / 2).max(1)
}

/// An in-kernel copy covers up to this much (at most a quarter of
/// `buf-size`, so that several stay in flight, and never less than a
/// buffered copy). It needs no buffer, and fewer, larger requests mean
/// fewer hand-overs between threads: 1 GiB on tmpfs, 2 CPUs, 1 MiB
/// against 4 MiB and 16 MiB requests (via `--buf-size`), MiB/s / CPU s:
/// 2280-2761 / 0.39-0.49 against 2681-2884 / 0.36-0.39 and
/// 2799-2974 / 0.33-0.35.
pub(crate) const OFFLOAD_IO_BYTES: u64 = 4 << 20;

/// A copy operation covers at most this (or `buf_size / 16`, if larger).
pub const MAX_IO_BYTES: u64 = 1 << 20;

/// `blockdev-mirror` arguments, with QEMU's names and defaults.
#[derive(Debug, Clone)]
pub struct MirrorOptions {
    /// `job-id`; default: the source's device name.
    pub job_id: Option<String>,
    /// `device`: the source node (or device) name.
    pub device: String,
    /// `target`: the target node name.
    pub target: String,
    /// `sync`: `full`, `top` (= full without a backing file), `none`.
    pub sync: MirrorSyncMode,
    /// `granularity`: bytes per dirty bit; 0 = the target's default.
    pub granularity: u64,
    /// `buf-size`: bytes of copy buffers; 0 = 16 MiB.
    pub buf_size: i64,
    /// `speed`: bytes per second, 0 = unlimited.
    pub speed: i64,
    /// `on-source-error` (default report).
    pub on_source_error: BlockdevOnError,
    /// `on-target-error` (default report).
    pub on_target_error: BlockdevOnError,
    /// `copy-mode` (default background).
    pub copy_mode: MirrorCopyMode,
    /// `auto-finalize` (default true).
    pub auto_finalize: bool,
    /// `auto-dismiss` (default true).
    pub auto_dismiss: bool,
    /// `unmap`: zero ranges may be deallocated on the target (default true).
    pub unmap: bool,
    /// `replaces`: the node the target replaces on completion (default
    /// the source): the source or a node below it through filters.
    pub replaces: Option<String>,
    /// `filter-node-name`: the name of the `mirror_top` node (default:
    /// an automatic one).
    pub filter_node_name: Option<String>,
}

impl MirrorOptions {
    /// Options with QEMU's defaults for everything optional.
    pub fn new(device: &str, target: &str, sync: MirrorSyncMode) -> Self {
        MirrorOptions {
            job_id: None,
            device: device.into(),
            target: target.into(),
            sync,
            granularity: 0,
            buf_size: 0,
            speed: 0,
            on_source_error: BlockdevOnError::Report,
            on_target_error: BlockdevOnError::Report,
            copy_mode: MirrorCopyMode::Background,
            auto_finalize: true,
            auto_dismiss: true,
            unmap: true,
            replaces: None,
            filter_node_name: None,
        }
    }
}

/// The parameters the job runs with, after QEMU's checks and defaults.
#[derive(Debug, Clone)]
pub(crate) struct Params {
    pub granularity: u64,
    pub buf_size: u64,
    pub max_io: u64,
    pub sync: MirrorSyncMode,
    pub on_source_error: BlockdevOnError,
    pub on_target_error: BlockdevOnError,
    pub unmap: bool,
}

/// The mirror's driver state, shared by the job and the filter.
pub(crate) struct Mirror {
    pub graph: Arc<Graph>,
    pub source: Arc<Node>,
    pub target: Arc<Node>,
    /// The `mirror_top` node above the source, and what it shares with us.
    pub filter: Arc<Node>,
    pub top: Arc<TopShared>,
    /// `mirror`, or `commit` for an active commit.
    pub job_type: JobType,
    /// Copy only what the layers above this node hold (`sync=top`: the
    /// source's backing node; active commit: the base). `None`: the whole
    /// guest view.
    pub base: Option<Arc<Node>>,
    pub params: Params,
    /// `copy-mode` is write-blocking (it can only go up:
    /// `block-job-change`). Orderings: the change and the run's start meet
    /// under `running`'s lock (see `change`), which orders the flag between
    /// them; every other reader may see the switch one pass late.
    pub write_blocking: AtomicBool,
    /// Active writes are on the filter (they go in once, at start or at
    /// the change, whichever sees the run first). Only a swap's
    /// atomicity matters: exactly one installer wins.
    pub filter_on: AtomicBool,
    /// Copy with `copy_file_range` (cleared when the nodes cannot).
    pub copy_offload: AtomicBool,
    /// An in-kernel copy has succeeded: operations may be sized for it.
    /// Until then they are sized as QEMU's, so that where the kernel cannot
    /// copy (a blkdebug node, another driver) requests and the errors they
    /// report come in QEMU's numbers.
    pub offload_proven: AtomicBool,
    /// `replaces`: the node name the target takes the place of, looked up
    /// again at `complete` (QEMU's loose coupling); `None`: the source.
    pub replaces: Option<String>,
    /// The node `complete` found for `replaces`.
    pub to_replace: Mutex<Option<Arc<Node>>>,
    /// `block-job-complete` was accepted. Ordered by the engine: the verb
    /// stores it before kicking the job, and the kick and the job's
    /// wake-up pass through the engine's registry lock.
    pub should_complete: AtomicBool,
    /// The target is kept in sync by active writes (query field): a report
    /// of a moment, nothing is ordered by it.
    pub actively_synced: AtomicBool,
    /// The run in progress: its copy machinery (for pause and the filter).
    pub running: Mutex<Option<Arc<copy::Copier>>>,
    /// The drained section the job completed in, ended in `clean`.
    pub drained: Mutex<Option<DrainSection>>,
    /// The filter is out of the graph (QEMU's `mirror_exit_common` ran).
    /// `prepare` and `abort` run one after the other under the engine's
    /// control lock; the swap only makes the second a no-op.
    pub exited: AtomicBool,
}

impl Mirror {
    /// Copies go through the kernel now (one has succeeded and none has
    /// been refused since): operations may be sized for it, and target
    /// operations take turns with them.
    pub(crate) fn offloading(&self) -> bool {
        // Relaxed: hints; an operation sized for offload that cannot be
        // offloaded after all is copied through the buffer in pieces.
        self.offload_proven.load(Ordering::Relaxed) && self.copy_offload.load(Ordering::Relaxed)
    }
    /// QEMU's `mirror_exit_common`, once: with `pivot`, every parent of
    /// the node to replace (the source, or `replaces`) moves to the target
    /// (QEMU pivots in its prepare step too: a pivot that cannot happen
    /// fails the job with EPERM); then the filter leaves the graph, its
    /// parents (the guest) moving to what it filtered — the target after
    /// a pivot.
    fn exit(&self, pivot: bool) -> Result<()> {
        // Relaxed: see the field.
        if self.exited.swap(true, Ordering::Relaxed) {
            return Ok(());
        }
        let mut r = Ok(());
        if pivot {
            let to_replace = self
                .to_replace
                .lock()
                .clone()
                .unwrap_or_else(|| self.source.clone());
            if can_replace(&self.source, &to_replace) {
                self.graph.replace_node(&to_replace, &self.target);
            } else {
                r = Err(Error::errno_msg(libc::EPERM, strerror(libc::EPERM)));
            }
        }
        self.graph.remove_filter(&self.filter);
        if let Some(b) = self.top.bitmap.get() {
            self.filter.bitmaps().remove_anonymous(b);
        }
        if pivot && (self.job_type == JobType::Commit || !self.replaces_source()) {
            // What left the guest's graph (committed layers, a replaced
            // node below the source) goes if it was opened implicitly, as
            // QEMU drops its references.
            self.graph.drop_orphans();
        }
        r
    }

    /// `replaces` is the source itself (or absent).
    fn replaces_source(&self) -> bool {
        self.to_replace
            .lock()
            .as_ref()
            .is_none_or(|n| Arc::ptr_eq(n, &self.source))
    }
}

impl JobDriver for Arc<Mirror> {
    fn job_type(&self) -> JobType {
        self.job_type
    }

    fn run(&self, job: &Arc<Job>) -> Result<()> {
        run::run(self, job)
    }

    fn pause(&self, _job: &Job) {
        // QEMU's mirror_pause: no request of ours in flight while paused.
        if let Some(c) = self.running.lock().clone() {
            c.wait_all();
        }
    }

    fn supports_complete(&self) -> bool {
        true
    }

    fn complete(&self, job: &Job) -> Result<()> {
        if !job.is_ready() {
            return Err(Error::generic(format!(
                "The active block job '{}' cannot be completed",
                job.id_str()
            )));
        }
        if let Some(name) = &self.replaces {
            let n = self
                .graph
                .find_node(name)
                .ok_or_else(|| Error::generic(format!("Node name '{name}' not found")))?;
            *self.to_replace.lock() = Some(n);
        }
        // Relaxed: the engine kicks the job after this returns (see the
        // field).
        self.should_complete.store(true, Ordering::Relaxed);
        Ok(())
    }

    fn change(&self, _job: &Job, opts: &JobChange) -> Result<()> {
        // Active commit runs on this driver but has no `.change` in QEMU.
        if self.job_type != JobType::Mirror {
            return Err(Error::generic("Job type does not support change"));
        }
        let mode = |wb: bool| {
            if wb {
                MirrorCopyMode::WriteBlocking
            } else {
                MirrorCopyMode::Background
            }
        };
        // QEMU's mirror_change, in its order.
        // Relaxed: only `change` (under the engine's control lock) writes
        // the flag.
        if mode(self.write_blocking.load(Ordering::Relaxed)) == opts.copy_mode {
            return Ok(());
        }
        if opts.copy_mode != MirrorCopyMode::WriteBlocking {
            return Err(Error::generic(format!(
                "Change to copy mode '{}' is not implemented",
                opts.copy_mode
            )));
        }
        // Relaxed: `run` loads the flag holding `running`'s lock, and we
        // take that lock below after this store: if `run` got the lock
        // first, we find its copier there and install; if we did, its
        // load is ordered after this store and it installs. Either way
        // active writes go in (at most once: `filter_on`).
        if let Err(cur) =
            self.write_blocking
                .compare_exchange(false, true, Ordering::Relaxed, Ordering::Relaxed)
        {
            return Err(Error::generic(format!(
                "Expected current copy mode 'background', got '{}'",
                mode(cur)
            )));
        }
        // A running job takes active writes now, with the filter drained
        // as at start: a guest write half-way finishes and marks the bitmap
        // first. Before the run starts, `run` puts them in.
        let section = self.graph.drained_begin(std::slice::from_ref(&self.filter));
        if let Some(c) = self.running.lock().as_ref() {
            active::install(self, c);
        }
        self.graph.drained_end(section);
        Ok(())
    }

    fn cancel(&self, job: &Job, force: bool) -> bool {
        // Before READY every cancel is a forced cancel.
        force || !job.is_ready()
    }

    fn prepare(&self, job: &Job) -> Result<()> {
        // Success: pivot only for `complete`, not for a soft cancel.
        // Relaxed: the job finished after `complete` (see the field).
        let r = self.exit(self.should_complete.load(Ordering::Relaxed));
        // QEMU's mirror_exit_common ends with block_job_remove_all_bdrv.
        block_job::remove_all_nodes(&self.graph, job);
        r
    }

    fn abort(&self, job: &Job) {
        // Failed, cancelled, or a transaction member failed: the filter
        // goes, nothing pivots (a no-op after `prepare` did it).
        let _ = self.exit(false);
        block_job::remove_all_nodes(&self.graph, job);
    }

    fn clean(&self, _job: &Job) {
        let d = self.drained.lock().take();
        if let Some(d) = d {
            self.graph.drained_end(d);
        }
    }

    fn actively_synced(&self, _job: &Job) -> Option<bool> {
        // A member of QEMU's mirror job info only, not of active commit.
        // Relaxed: a report (see the field).
        (self.job_type == JobType::Mirror).then(|| self.actively_synced.load(Ordering::Relaxed))
    }
}

/// `blockdev-mirror`: check the arguments as QEMU does, create the job and
/// start it.
pub fn blockdev_mirror(
    graph: &Arc<Graph>,
    engine: &Arc<Engine>,
    o: MirrorOptions,
) -> Result<Arc<Job>> {
    let source = graph.lookup(&o.device)?;
    // QEMU's qmp_get_root_bs: a node below another node, or used by a
    // job (jobs are parents of their nodes), is not a root.
    if !graph.is_root(&source) {
        return Err(Error::generic("Need a root block node"));
    }
    let target = graph.lookup(&o.target)?;
    if o.granularity != 0 && !(512..=(64 << 20)).contains(&o.granularity) {
        return Err(Error::generic(
            "Parameter 'granularity' expects a value in range [512B, 64MB]",
        ));
    }
    if o.granularity & o.granularity.wrapping_sub(1) != 0 {
        return Err(Error::generic(
            "Parameter 'granularity' expects a power of 2",
        ));
    }
    graph.check_op(&source, BlockOp::MirrorSource)?;
    graph.check_op(&target, BlockOp::MirrorTarget)?;
    // QEMU checks `replaces` before the sync mode, buf-size and "into
    // itself" (those are mirror_start's).
    if let Some(name) = &o.replaces {
        check_replaces(graph, &source, name)?;
    }
    let sync = match o.sync {
        MirrorSyncMode::Incremental | MirrorSyncMode::Bitmap => {
            return Err(Error::generic(format!(
                "Sync mode '{}' not supported",
                o.sync
            )));
        }
        s => s,
    };
    // `top`: only what the source's own layer holds (QEMU: above its
    // backing node); without a backing node that is everything.
    let base = match sync {
        MirrorSyncMode::Top => chain::next_layer(&source),
        _ => None,
    };
    let granularity = match o.granularity {
        0 => dirty_bitmap::default_granularity(&target),
        g => g,
    };
    if o.buf_size < 0 {
        return Err(Error::generic("Invalid parameter 'buf-size'"));
    }
    let buf_size = match o.buf_size as u64 {
        0 => DEFAULT_BUF_SIZE,
        b => b,
    }
    .div_ceil(granularity)
        * granularity;
    if Arc::ptr_eq(&source, &target) {
        return Err(Error::generic("Can't mirror node into itself"));
    }
    let params = Params {
        granularity,
        buf_size,
        max_io: max_io(buf_size),
        sync,
        on_source_error: o.on_source_error,
        on_target_error: o.on_target_error,
        unmap: o.unmap,
    };
    let start = Start {
        job_id: o.job_id.as_deref(),
        replaces: o.replaces.as_deref(),
        filter_node_name: o.filter_node_name.as_deref(),
        speed: o.speed,
        flags: job_flags(o.auto_finalize, o.auto_dismiss),
        write_blocking: o.copy_mode == MirrorCopyMode::WriteBlocking,
    };
    start_job(
        graph,
        engine,
        source,
        target,
        JobType::Mirror,
        base,
        params,
        start,
    )
}

/// QEMU's `replaces` checks (`check_to_replace_node` and the size test), in
/// its order.
fn check_replaces(graph: &Graph, source: &Arc<Node>, name: &str) -> Result<()> {
    let to_replace = graph
        .find_node(name)
        .ok_or_else(|| Error::generic(format!("Failed to find node with node-name='{name}'")))?;
    graph.check_op(&to_replace, BlockOp::Replace)?;
    if !can_replace(source, &to_replace) {
        return Err(Error::generic(format!(
            "Cannot replace '{name}' by a node mirrored from '{}', because it cannot be \
             guaranteed that doing so would not lead to an abrupt change of visible data",
            source.name()
        )));
    }
    // Filters show their child's size, so this holds for ours; kept as
    // QEMU has it for filters that would not.
    if source.len()? != to_replace.len()? {
        return Err(Error::generic(
            "cannot replace image with a mirror image of different size",
        ));
    }
    Ok(())
}

/// The largest copy operation for a buffer of `buf_size`: a sixteenth of
/// it, at least 1 MiB, at most all of it (QEMU's rule).
fn max_io(buf_size: u64) -> u64 {
    (buf_size / MAX_IN_FLIGHT as u64)
        .max(MAX_IO_BYTES)
        .min(buf_size)
}

/// How to create the job.
struct Start<'a> {
    job_id: Option<&'a str>,
    replaces: Option<&'a str>,
    filter_node_name: Option<&'a str>,
    speed: i64,
    flags: u32,
    write_blocking: bool,
}

/// QEMU's `mirror_start_job` from the filter on: put `mirror_top` above
/// the source, give it the job's bitmap, create the job on it (also using
/// the source and the target) and start it. Whatever fails takes the
/// filter out again.
#[allow(clippy::too_many_arguments)] // QEMU's argument list
fn start_job(
    graph: &Arc<Graph>,
    engine: &Arc<Engine>,
    source: Arc<Node>,
    target: Arc<Node>,
    job_type: JobType,
    base: Option<Arc<Node>>,
    params: Params,
    st: Start<'_>,
) -> Result<Arc<Job>> {
    // The default id is the source's device name, taken before the filter
    // takes the device over.
    let job_id = st
        .job_id
        .map_or_else(|| graph.device_name(&source), String::from);
    let len = source.len()?;
    // QEMU's mirror_start_job permissions: the job reads the source and
    // lets others write it; the target is written and nobody else may
    // write or read it consistently, unless it is the source's own backing
    // (active commit: readable by all, written by the guest through the
    // chain; resized if smaller). An active commit's base is reopened
    // read-write and the layers between are not read by others.
    let target_is_backing = crate::block::chain::layers(&source)
        .iter()
        .skip(1)
        .any(|n| Arc::ptr_eq(n, &target));
    let mut target_perms = Perms::new(PERM_WRITE, PERM_WRITE_UNCHANGED);
    let mut layers = Vec::new();
    if target_is_backing {
        if len > target.len()? {
            target_perms.perm |= PERM_RESIZE;
        }
        target_perms.shared |= PERM_CONSISTENT_READ | PERM_WRITE;
        for n in crate::block::chain::layers(&source).into_iter().skip(1) {
            if Arc::ptr_eq(&n, &target) {
                break;
            }
            layers.push(n);
        }
    }
    let source_perm = if job_type == JobType::Commit {
        0
    } else {
        PERM_CONSISTENT_READ
    };
    let source_perms = Perms::new(
        source_perm,
        PERM_CONSISTENT_READ | PERM_WRITE | PERM_WRITE_UNCHANGED,
    );
    let layer_perms = Perms::new(0, PERM_WRITE | PERM_WRITE_UNCHANGED);
    let base_was_ro = target_is_backing && !target.perm_writable();
    target.set_perm_read_only(false);
    let mut want = vec![(&source, source_perms), (&target, target_perms)];
    want.extend(layers.iter().map(|n| (n, layer_perms)));
    let reserved = match reserve_perms(graph, &want) {
        Ok(r) => r,
        Err(e) => {
            if base_was_ro {
                target.set_perm_read_only(true);
                graph.release_perms();
            }
            return Err(e);
        }
    };
    let top = TopShared::new(source.clone());
    let filter = graph.insert_filter(
        &source,
        st.filter_node_name,
        false,
        Box::new(MirrorTop(top.clone())),
    )?;
    // QEMU's `bdrv_create_dirty_bitmap(mirror_top_bs)`, disabled: only
    // the filter marks it.
    let bitmap = match filter
        .bitmaps()
        .add_anonymous(len, params.granularity, false)
    {
        Ok(b) => b,
        Err(e) => {
            graph.remove_filter(&filter);
            return Err(e);
        }
    };
    let _ = top.bitmap.set(bitmap);
    let mirror = Arc::new(Mirror {
        graph: graph.clone(),
        source: source.clone(),
        target: target.clone(),
        filter: filter.clone(),
        top,
        job_type,
        base,
        params,
        write_blocking: AtomicBool::new(st.write_blocking),
        filter_on: AtomicBool::new(false),
        copy_offload: AtomicBool::new(true),
        offload_proven: AtomicBool::new(false),
        replaces: st.replaces.map(String::from),
        to_replace: Mutex::new(None),
        should_complete: AtomicBool::new(false),
        actively_synced: AtomicBool::new(false),
        running: Mutex::new(None),
        drained: Mutex::new(None),
        exited: AtomicBool::new(false),
    });
    let job = block_job_create(
        graph,
        engine,
        Some(&job_id),
        Some(&filter),
        Box::new(mirror.clone()),
        st.speed,
        st.flags,
        None,
    );
    let job = match job {
        Ok(j) => j,
        Err(e) => {
            let _ = mirror.exit(false);
            return Err(e);
        }
    };
    add_node(&job, &source, UserKind::Blocker, source_perms);
    add_node(&job, &target, UserKind::Backend, target_perms);
    for n in &layers {
        add_node(&job, n, UserKind::Blocker, layer_perms);
    }
    drop(reserved);
    job.start()?;
    Ok(job)
}

/// QEMU's `commit_active_start`: the mirror machinery copying what `top`
/// (the active layer) and the layers down to `base` hold into `base`;
/// `complete` then moves the guest onto `base`. `on-error` applies to
/// reads and writes alike; background copy mode, default granularity.
#[allow(clippy::too_many_arguments)] // QEMU's argument list
pub(crate) fn start_active_commit(
    graph: &Arc<Graph>,
    engine: &Arc<Engine>,
    job_id: Option<&str>,
    filter_node_name: Option<&str>,
    top: Arc<Node>,
    base: Arc<Node>,
    speed: i64,
    on_error: BlockdevOnError,
    flags: u32,
) -> Result<Arc<Job>> {
    let granularity = dirty_bitmap::default_granularity(&base);
    let buf_size = DEFAULT_BUF_SIZE.div_ceil(granularity) * granularity;
    let params = Params {
        granularity,
        buf_size,
        max_io: max_io(buf_size),
        sync: MirrorSyncMode::Full,
        on_source_error: on_error,
        on_target_error: on_error,
        unmap: true,
    };
    let start = Start {
        job_id,
        replaces: None,
        filter_node_name,
        speed,
        flags,
        write_blocking: false,
    };
    start_job(
        graph,
        engine,
        top,
        base.clone(),
        JobType::Commit,
        Some(base),
        params,
        start,
    )
}
