//! `blockdev-backup` (QEMU's `block/backup.c` on threads): a point-in-time
//! copy of a node. A `copy-before-write` filter goes above the source
//! when the job is created, so the target ends up holding the source as it
//! was then, however the guest writes meanwhile; the job copies what the
//! sync mode asks for (`full`: everything; `top`: what the source's own
//! layer holds; `bitmap`/`incremental`: what a dirty bitmap marks; `none`:
//! nothing, only what the guest overwrites) through the filter's copy
//! state, with a pool of worker threads and at most `max-workers` copies
//! outstanding, as QEMU's block-copy runs its tasks.
//!
//! A bitmap given to the job is frozen for its duration (a successor
//! records new writes); at the end `bitmap-mode` decides: `on-success`
//! keeps only what was not copied when the job succeeded, `always` does so
//! also when it failed, `never` keeps everything.
//!
//! Errors go through `on-source-error`/`on-target-error` once per copy
//! round: `report` fails the job, `stop` pauses it and `ignore` goes on,
//! both retrying what failed (`ignore` after the engine's retry backoff,
//! `engine::backoff`).

use std::collections::VecDeque;
use std::sync::{Arc, Weak};
use std::thread::JoinHandle;

use super::block_job::{add_node, block_job_create, job_flags};
use crate::block::block_copy::{BlockCopy, CopyError};
use crate::block::copy_before_write::{self, CbwOptions, CbwShared, CopyBeforeWrite, OnCbwError};
use crate::block::dirty_bitmap::{BdrvDirtyBitmap, BitmapCheck};
use crate::block::graph::Graph;
use crate::block::{BlockOp, Node, UserKind, chain};
use crate::engine::{Engine, Job, JobDriver, JobTxn};
use crate::error::{Error, Result};
use crate::locks::{Condvar, Mutex};
use crate::qapi::{BitmapSyncMode, BlockErrorAction, BlockdevOnError, JobType, MirrorSyncMode};
use crate::sync::{AtomicBool, Ordering};

/// QEMU's `x-perf` options of a backup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackupPerf {
    /// `use-copy-range` (accepted; we copy through the kernel where the
    /// nodes allow it either way).
    pub use_copy_range: bool,
    /// `max-workers`: copies outstanding at once (default 64).
    pub max_workers: i64,
    /// `max-chunk`: the largest copy (0: QEMU's default).
    pub max_chunk: i64,
    /// `min-cluster-size` (0: none).
    pub min_cluster_size: u64,
}

impl Default for BackupPerf {
    fn default() -> Self {
        BackupPerf {
            use_copy_range: false,
            max_workers: 64,
            max_chunk: 0,
            min_cluster_size: 0,
        }
    }
}

/// `blockdev-backup` arguments, with QEMU's names and defaults.
#[derive(Debug, Clone)]
pub struct BackupOptions {
    /// `job-id`; default: the device name.
    pub job_id: Option<String>,
    /// `device`: the source node (or device).
    pub device: String,
    /// `target`: the target node.
    pub target: String,
    /// `sync`.
    pub sync: MirrorSyncMode,
    /// `speed` in bytes/s (0: unlimited).
    pub speed: i64,
    /// `bitmap`: a dirty bitmap of the source.
    pub bitmap: Option<String>,
    /// `bitmap-mode`.
    pub bitmap_mode: Option<BitmapSyncMode>,
    /// `compress` (qcow2 targets).
    pub compress: bool,
    /// `on-source-error` (default report).
    pub on_source_error: BlockdevOnError,
    /// `on-target-error` (default report).
    pub on_target_error: BlockdevOnError,
    /// `auto-finalize` (default true).
    pub auto_finalize: bool,
    /// `auto-dismiss` (default true).
    pub auto_dismiss: bool,
    /// `filter-node-name`: the `copy-before-write` node's name.
    pub filter_node_name: Option<String>,
    /// `discard-source`: discard on the source what was copied.
    pub discard_source: bool,
    /// `x-perf`.
    pub perf: BackupPerf,
}

impl BackupOptions {
    /// QEMU's defaults for everything optional.
    pub fn new(device: &str, target: &str, sync: MirrorSyncMode) -> Self {
        BackupOptions {
            job_id: None,
            device: device.into(),
            target: target.into(),
            sync,
            speed: 0,
            bitmap: None,
            bitmap_mode: None,
            compress: false,
            on_source_error: BlockdevOnError::Report,
            on_target_error: BlockdevOnError::Report,
            auto_finalize: true,
            auto_dismiss: true,
            filter_node_name: None,
            discard_source: false,
            perf: BackupPerf::default(),
        }
    }
}

/// What the workers share with the job thread.
#[derive(Default)]
struct PoolState {
    queue: VecDeque<(u64, u64)>,
    /// Copies queued or running.
    outstanding: usize,
    /// The first failure of this round, and the range that failed.
    error: Option<(CopyError, (u64, u64))>,
    stop: bool,
}

/// Worker threads running the job's copies.
struct Pool {
    bcs: Arc<BlockCopy>,
    /// Told of every copy done, to heal the `ignore` backoff.
    job: Weak<Job>,
    state: Mutex<PoolState>,
    work: Condvar,
    changed: Condvar,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl Pool {
    fn start(bcs: Arc<BlockCopy>, job: &Arc<Job>, n: usize) -> Result<Arc<Pool>> {
        let p = Arc::new(Pool {
            bcs,
            job: Arc::downgrade(job),
            state: Mutex::new(PoolState::default()),
            work: Condvar::new(),
            changed: Condvar::new(),
            threads: Mutex::new(Vec::new()),
        });
        for i in 0..n {
            let me = p.clone();
            let t = std::thread::Builder::new()
                .name(format!("backup-io{i}"))
                .spawn(move || me.worker());
            match t {
                Ok(t) => p.threads.lock().push(t),
                Err(e) => {
                    p.shutdown();
                    return Err(Error::from(e).prepend("Cannot start backup I/O threads: "));
                }
            }
        }
        Ok(p)
    }

    fn worker(&self) {
        loop {
            let (o, l) = {
                let mut s = self.state.lock();
                loop {
                    if let Some(t) = s.queue.pop_front() {
                        break t;
                    }
                    if s.stop {
                        return;
                    }
                    s = self.work.wait(s);
                }
            };
            let r = self.bcs.copy_claimed(o, l);
            if r.is_ok()
                && let Some(j) = self.job.upgrade()
            {
                j.range_done(o, l);
            }
            let mut s = self.state.lock();
            s.outstanding -= 1;
            if let Err(e) = r {
                s.error.get_or_insert((e, (o, l)));
            }
            drop(s);
            self.changed.notify_all();
        }
    }

    fn push(&self, o: u64, l: u64) {
        let mut s = self.state.lock();
        s.queue.push_back((o, l));
        s.outstanding += 1;
        drop(s);
        self.work.notify_one();
    }

    fn outstanding(&self) -> usize {
        self.state.lock().outstanding
    }

    /// The job thread's wait for a free slot (QEMU's
    /// `aio_task_pool_wait_slot`): `known` is how many copies it believes
    /// outstanding (all it started, less the ends it has seen). Returns at
    /// once when one of them has ended since (their number is lower now),
    /// else when one ends; then whether a copy of this round failed and
    /// how many are outstanding, read under one lock, so a failure is
    /// never missed by a caller that goes on to start the next copy.
    fn wait_slot(&self, known: usize) -> (bool, usize) {
        let mut s = self.state.lock();
        while s.outstanding > 0 && s.outstanding >= known {
            s = self.changed.wait(s);
        }
        (s.error.is_some(), s.outstanding)
    }

    /// Wait until no copy is outstanding; the round's failure, if any,
    /// with the range that failed.
    fn drain(&self) -> Option<(CopyError, (u64, u64))> {
        let mut s = self.state.lock();
        while s.outstanding > 0 {
            s = self.changed.wait(s);
        }
        s.error.take()
    }

    /// Wait until no copy is outstanding, keeping a failure for the job
    /// thread to handle.
    fn drain_keep_error(&self) {
        let mut s = self.state.lock();
        while s.outstanding > 0 {
            s = self.changed.wait(s);
        }
    }

    fn shutdown(&self) {
        self.state.lock().stop = true;
        self.work.notify_all();
        let threads = std::mem::take(&mut *self.threads.lock());
        for t in threads {
            let _ = t.join();
        }
    }
}

/// What a backup holds of the graph: released when the job is freed, so
/// a host that keeps its job handle does not keep the nodes open.
struct Parts {
    graph: Arc<Graph>,
    filter: Arc<Node>,
    cbw: Arc<CbwShared>,
    /// The bitmap the job reads or writes, frozen for its duration.
    bitmap: Option<(Arc<Node>, Arc<BdrvDirtyBitmap>, BitmapSyncMode)>,
}

/// The backup job's driver state.
struct Backup {
    parts: Mutex<Option<Arc<Parts>>>,
    sync: MirrorSyncMode,
    on_source_error: BlockdevOnError,
    on_target_error: BlockdevOnError,
    max_workers: usize,
    /// The run's workers (for pause: nothing of ours in flight then).
    pool: Mutex<Option<Arc<Pool>>>,
    /// The filter is out of the graph.
    exited: AtomicBool,
}

impl Backup {
    fn parts(&self) -> Option<Arc<Parts>> {
        self.parts.lock().clone()
    }

    /// QEMU's `backup_cleanup_sync_bitmap`.
    fn cleanup_bitmap(&self, ok: bool) {
        let Some(p) = self.parts() else {
            return;
        };
        let Some((node, b, mode)) = &p.bitmap else {
            return;
        };
        let sync = (ok || *mode == BitmapSyncMode::Always) && *mode != BitmapSyncMode::Never;
        if sync {
            node.bitmaps().abdicate(b);
        } else {
            node.bitmaps().reclaim(b);
        }
        if !ok && *mode == BitmapSyncMode::Always {
            // Failed but synced: what was not copied stays dirty.
            b.bits().merge_from(p.cbw.block_copy().bitmap().bits());
        }
    }

    /// The copy rounds (not for `sync=none`).
    fn copy_all(&self, job: &Job, bcs: &BlockCopy, pool: &Pool) -> Result<()> {
        let mut cursor = 0;
        let mut failure_seen = false;
        // Copies outstanding as far as this thread has looked: QEMU's job
        // coroutine learns of a task's end only when it yields, so it
        // starts copies while its pool has room by its own count, and
        // checks the pool's status after each wait for a slot. A copy that
        // ended (or failed) meanwhile changes nothing until then, however
        // quickly a loaded machine lets it end.
        let mut known = pool.outstanding();
        loop {
            job.ratelimit_sleep();
            if job.is_cancelled() {
                pool.drain();
                return Ok(());
            }
            if !failure_seen
                && known < self.max_workers
                && let Some((o, l)) = bcs.claim(cursor, bcs.max_chunk())
            {
                pool.push(o, l);
                known += 1;
                cursor = o + l;
                job.ratelimit_processed(l);
                continue;
            }
            if !failure_seen && known > 0 {
                (failure_seen, known) = pool.wait_slot(known);
                continue;
            }
            // A failure was seen, or the pass is over: let the started
            // copies finish.
            failure_seen = false;
            let failed = pool.drain();
            known = 0;
            if let Some((e, (offset, len))) = failed {
                let policy = if e.is_read {
                    self.on_source_error
                } else {
                    self.on_target_error
                };
                let errno = e.error.errno().unwrap_or(libc::EIO);
                let action = job.range_error_action(policy, e.is_read, errno, offset, len);
                if action == BlockErrorAction::Report {
                    return Err(e.error);
                }
                // `stop` paused the job (the next pause point waits for
                // the resume); both retry what failed, `ignore` after
                // the backoff.
                cursor = 0;
                continue;
            }
            // A failed copy before a guest write made its clusters dirty
            // again behind the cursor: one more pass finds them.
            if cursor == 0 {
                return Ok(());
            }
            cursor = 0;
        }
    }

    /// Take the filter out, once.
    fn exit(&self) {
        // Relaxed: commit/abort and clean run one after the other under
        // the engine's control lock; the swap only makes a second a no-op.
        if !self.exited.swap(true, Ordering::Relaxed)
            && let Some(p) = self.parts()
        {
            p.graph.remove_filter(&p.filter);
        }
    }
}

impl JobDriver for Arc<Backup> {
    fn job_type(&self) -> JobType {
        JobType::Backup
    }

    fn run(&self, job: &Arc<Job>) -> Result<()> {
        if self.sync == MirrorSyncMode::None {
            // The filter copies what the guest overwrites; the job only
            // waits for its cancel.
            while !job.is_cancelled() {
                job.yield_now();
            }
            return Ok(());
        }
        let Some(parts) = self.parts() else {
            return Ok(());
        };
        let bcs = parts.cbw.block_copy();
        let workers = super::mirror::io_workers().min(self.max_workers);
        let pool = Pool::start(bcs.clone(), job, workers)?;
        *self.pool.lock() = Some(pool.clone());
        let r = self.copy_all(job, bcs, &pool);
        *self.pool.lock() = None;
        pool.shutdown();
        r
    }

    fn pause(&self, _job: &Job) {
        // QEMU's drain of a backup: no copy of ours in flight while paused.
        if let Some(p) = self.pool.lock().clone() {
            p.drain_keep_error();
        }
    }

    fn commit(&self, _job: &Job) {
        self.cleanup_bitmap(true);
    }

    fn abort(&self, _job: &Job) {
        self.cleanup_bitmap(false);
    }

    fn clean(&self, _job: &Job) {
        self.exit();
    }

    fn finalize_drains(&self) -> bool {
        true
    }
}

/// `blockdev-backup`: create the job ([`backup_create`]) and start it.
pub fn blockdev_backup(
    graph: &Arc<Graph>,
    engine: &Arc<Engine>,
    o: BackupOptions,
    txn: Option<Arc<JobTxn>>,
) -> Result<Arc<Job>> {
    let job = backup_create(graph, engine, o, txn)?;
    job.start()?;
    Ok(job)
}

/// A backup job, created but not started (a transaction starts it when
/// it commits, or cancels it): QEMU's checks in QEMU's order
/// (`do_backup_common`, `backup_job_create`), then the filter and the job.
pub fn backup_create(
    graph: &Arc<Graph>,
    engine: &Arc<Engine>,
    o: BackupOptions,
    txn: Option<Arc<JobTxn>>,
) -> Result<Arc<Job>> {
    let bs = graph.lookup(&o.device)?;
    let target = graph.lookup(&o.target)?;
    let mut sync = o.sync;
    let mut bitmap_mode = o.bitmap_mode;
    if matches!(sync, MirrorSyncMode::Bitmap | MirrorSyncMode::Incremental) && o.bitmap.is_none() {
        return Err(Error::generic(format!(
            "must provide a valid bitmap name for '{sync}' sync mode"
        )));
    }
    if sync == MirrorSyncMode::Incremental {
        if bitmap_mode.is_some_and(|m| m != BitmapSyncMode::OnSuccess) {
            return Err(Error::generic(
                "Bitmap sync mode must be 'on-success' when using sync mode 'incremental'",
            ));
        }
        bitmap_mode = Some(BitmapSyncMode::OnSuccess);
        sync = MirrorSyncMode::Bitmap;
    }
    let mut sync_bitmap = None;
    if let Some(name) = &o.bitmap {
        let b = bs
            .bitmaps()
            .find(name)
            .ok_or_else(|| Error::generic(format!("Bitmap '{name}' could not be found")))?;
        let Some(mode) = bitmap_mode else {
            return Err(Error::generic(
                "Bitmap sync mode must be given when providing a bitmap",
            ));
        };
        b.check(BitmapCheck::AllowReadonly)?;
        if sync == MirrorSyncMode::None {
            return Err(Error::generic(
                "sync mode 'none' does not produce meaningful bitmap outputs",
            ));
        }
        if mode == BitmapSyncMode::Never && sync != MirrorSyncMode::Bitmap {
            return Err(Error::generic(format!(
                "Bitmap sync mode 'never' has no meaningful effect when combined with sync mode '{sync}'"
            )));
        }
        sync_bitmap = Some((b, mode));
    }
    if o.bitmap.is_none() && bitmap_mode.is_some() {
        return Err(Error::generic(
            "Cannot specify bitmap sync mode without a bitmap",
        ));
    }
    // backup_job_create
    if Arc::ptr_eq(&bs, &target) {
        return Err(Error::generic("Source and target cannot be the same"));
    }
    if o.compress {
        // No driver of ours writes compressed clusters; QEMU names the
        // target's device ("" for a node without one).
        return Err(Error::generic(format!(
            "Compression is not supported for this drive {}",
            graph.device_name(&target)
        )));
    }
    graph.check_op(&bs, BlockOp::BackupSource)?;
    graph.check_op(&target, BlockOp::BackupTarget)?;
    if !(1..=i32::MAX as i64).contains(&o.perf.max_workers) {
        return Err(Error::generic(format!(
            "max-workers must be between 1 and {}",
            i32::MAX
        )));
    }
    if o.perf.max_chunk < 0 {
        return Err(Error::generic(
            "max-chunk must be zero (which means no limit) or positive",
        ));
    }
    if let Some((b, mode)) = &sync_bitmap
        && *mode != BitmapSyncMode::Never
    {
        b.check(BitmapCheck::Default)?;
    }
    if bs.len()? != target.len()? {
        return Err(Error::generic(
            "Source and target image have different sizes",
        ));
    }
    let cluster = copy_before_write::cluster_size(&target, o.perf.min_cluster_size)
        .map_err(|e| e.prepend("Could not create node: "))?;
    let job_id = o.job_id.clone().unwrap_or_else(|| graph.device_name(&bs));
    let (drv, cbw) = CopyBeforeWrite::new(CbwOptions {
        file: bs.clone(),
        target: target.clone(),
        cluster,
        max_chunk: o.perf.max_chunk as u64,
        on_cbw_error: OnCbwError::BreakGuestWrite,
        discard_source: o.discard_source,
        bitmap: None,
        timeout: None,
    })?;
    // What the job copies, before the filter copies anything.
    let bcs = cbw.block_copy().clone();
    init_copy_bitmap(&bs, sync, sync_bitmap.as_ref().map(|(b, _)| b), &bcs)?;
    let frozen = match &sync_bitmap {
        Some((b, mode)) => {
            bs.bitmaps().create_successor(b)?;
            Some((bs.clone(), b.clone(), *mode))
        }
        None => None,
    };
    let unfreeze = |frozen: &Option<(Arc<Node>, Arc<BdrvDirtyBitmap>, BitmapSyncMode)>| {
        if let Some((n, b, _)) = frozen {
            n.bitmaps().reclaim(b);
        }
    };
    let filter = match graph.insert_filter(&bs, o.filter_node_name.as_deref(), false, Box::new(drv))
    {
        Ok(f) => f,
        Err(e) => {
            unfreeze(&frozen);
            return Err(e.prepend("Could not create node: "));
        }
    };
    CopyBeforeWrite::attach_bitmaps(&cbw, &filter);
    let max_chunk = o.perf.max_chunk as u64;
    if max_chunk != 0 && max_chunk < cluster {
        unfreeze(&frozen);
        graph.remove_filter(&filter);
        return Err(Error::generic(format!(
            "Required max-chunk ({max_chunk}) is less than backup cluster size ({cluster})"
        )));
    }
    let backup = Arc::new(Backup {
        parts: Mutex::new(Some(Arc::new(Parts {
            graph: graph.clone(),
            filter: filter.clone(),
            cbw: cbw.clone(),
            bitmap: frozen.clone(),
        }))),
        sync,
        on_source_error: o.on_source_error,
        on_target_error: o.on_target_error,
        max_workers: o.perf.max_workers as usize,
        pool: Mutex::new(None),
        exited: AtomicBool::new(false),
    });
    let job = match block_job_create(
        graph,
        engine,
        Some(&job_id),
        Some(&filter),
        Box::new(backup.clone()),
        o.speed,
        job_flags(o.auto_finalize, o.auto_dismiss),
        txn,
    ) {
        Ok(j) => j,
        Err(e) => {
            unfreeze(&frozen);
            backup.exit();
            return Err(e);
        }
    };
    let held = backup.clone();
    job.on_free(move || drop(held.parts.lock().take()));
    // QEMU's backup_job_create: the job takes nothing on its target
    // itself; the copy-before-write filter writes it (see its child_perm).
    add_node(
        &job,
        &target,
        UserKind::Blocker,
        crate::block::perm::Perms::NONE,
    );
    job.progress_set_remaining(bcs.bitmap().bits().count());
    let weak = Arc::downgrade(&job);
    bcs.set_progress(Some(Box::new(move |n, zeroes| {
        if let Some(j) = weak.upgrade() {
            j.progress_update(n);
            if zeroes {
                j.progress_skipped(n);
            }
        }
    })));
    Ok(job)
}

/// What the job copies, by sync mode: everything (`full`, `none`: the
/// filter copies what is overwritten), what the source's own layer holds
/// (`top`), or the bitmap's bits (`bitmap`).
fn init_copy_bitmap(
    source: &Arc<Node>,
    sync: MirrorSyncMode,
    bitmap: Option<&Arc<BdrvDirtyBitmap>>,
    bcs: &BlockCopy,
) -> Result<()> {
    let bits = bcs.bitmap().bits();
    match sync {
        MirrorSyncMode::Bitmap => {
            bits.clear();
            if let Some(b) = bitmap {
                bits.merge_from(b.bits());
            }
        }
        MirrorSyncMode::Top => {
            // Only what is above the backing file.
            let below = chain::next_layer(source);
            let len = bcs.len();
            let mut off = 0;
            while off < len {
                let (alloc, n) = chain::is_allocated_above(source, below.as_ref(), off, len - off)?;
                if !alloc {
                    // Whole clusters only: a partly allocated one is copied.
                    let c = bcs.cluster_size();
                    let (s, e) = (off.div_ceil(c) * c, (off + n) / c * c);
                    if e > s {
                        bits.reset_range(s, e - s);
                    }
                }
                off += n;
            }
        }
        MirrorSyncMode::Full | MirrorSyncMode::None | MirrorSyncMode::Incremental => {}
    }
    Ok(())
}
