//! The job engine: QEMU's `job.c` (and the block-job parts of
//! `blockjob.c`) on plain threads.
//!
//! A job is a [`JobDriver`] plus the engine's bookkeeping. Its `run` executes
//! on a thread of its own; everything else — verbs, completion, transactions,
//! finalisation — runs on whichever thread asks, serialised the way QEMU's
//! main loop serialises them.
//!
//! # Locks and threads
//! - `control` (reentrant) plays QEMU's main loop: verbs, a job's exit
//!   processing, transaction commit/abort and the driver callbacks
//!   `prepare`/`commit`/`abort`/`clean`/`complete`/`cancel` run under it.
//!   Reentrant, so a driver callback may call verbs on the same thread.
//! - `reg` (the registry mutex) plays QEMU's job mutex: every job's status,
//!   counters and flags live behind it, events are emitted while holding it
//!   (which keeps events in state-change order), and no driver or host code
//!   ever runs while it is held. Lock order: `control` before `reg`.
//! - A job's thread waits on its own condvar (`Job::wake`) when it sleeps,
//!   yields or pauses; any waiter for a state change waits on `changed`.
//! - When `run` returns, the job's exit (QEMU's `job_exit` bottom half) is
//!   queued; the job thread then takes `control` and processes it. A thread
//!   that already holds `control` and waits for a job (cancel-sync,
//!   transaction abort) processes pending exits itself, as QEMU's
//!   `AIO_WAIT_WHILE` runs bottom halves, so holding `control` while waiting
//!   cannot deadlock.

pub mod backoff;
pub mod progress_meter;
pub mod ratelimit;
pub mod tables;

mod registry;

use crate::locks::Condvar;
use std::sync::Arc;
use std::time::Duration;

pub(crate) use registry::panic_text;
pub use registry::{Engine, JobTxn};

use crate::error::{Error, Result};
use crate::qapi::{
    BlockDeviceIoStatus, BlockErrorAction, BlockJobInfo, BlockdevOnError, JobInfo, JobStatus,
    JobType, MirrorCopyMode,
};

/// `block-job-change` arguments past `id` and `type` (QEMU's
/// `BlockJobChangeOptions`): what a job may change while it runs. Members
/// of another type's branch keep their zero value, as in QEMU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JobChange {
    /// `copy-mode` (type `mirror`); `background` for other types.
    pub copy_mode: MirrorCopyMode,
}

impl Default for JobChange {
    fn default() -> Self {
        JobChange {
            copy_mode: MirrorCopyMode::Background,
        }
    }
}

/// Creation flag: an internal job (no id, no events, not listed).
pub const JOB_INTERNAL: u32 = 0x01;
/// Creation flag: wait for `finalize` (QMP `auto-finalize: false`).
pub const JOB_MANUAL_FINALIZE: u32 = 0x02;
/// Creation flag: wait for `dismiss` (QMP `auto-dismiss: false`).
pub const JOB_MANUAL_DISMISS: u32 = 0x04;
/// All valid flags.
pub const JOB_FLAGS_ALL: u32 = JOB_INTERNAL | JOB_MANUAL_FINALIZE | JOB_MANUAL_DISMISS;

/// A job's behaviour. Only `job_type` and `run` are required; the defaults
/// are those of a QEMU driver that leaves the hook out.
///
/// Threads: `run`, `pause` and `resume` run on the job's thread; the other
/// hooks run on whichever thread issued the verb or finished the job, with
/// the engine's control lock held (so never two at once), and never with
/// the registry lock held.
pub trait JobDriver: Send + Sync + 'static {
    /// The job type reported in events and queries.
    fn job_type(&self) -> JobType;

    /// The job's work. Call [`Job::pause_point`] (or sleep/yield) often,
    /// and return early when [`Job::is_cancelled`].
    fn run(&self, job: &Arc<Job>) -> Result<()>;

    /// Called at a pause point before the job pauses (e.g. wait for
    /// in-flight requests).
    fn pause(&self, _job: &Job) {}

    /// Called after the job leaves a pause point.
    fn resume(&self, _job: &Job) {}

    /// Whether `complete` is supported (QEMU: the driver has `.complete`).
    fn supports_complete(&self) -> bool {
        false
    }

    /// The user asked to complete a ready job.
    fn complete(&self, _job: &Job) -> Result<()> {
        Ok(())
    }

    /// A cancel was requested; return the effective `force`. The default is
    /// that of a driver without `.cancel`: every cancel is forced.
    fn cancel(&self, _job: &Job, _force: bool) -> bool {
        true
    }

    /// The speed changed (block jobs).
    fn set_speed(&self, _job: &Job, _speed: u64) {}

    /// Whether QEMU drains nodes while it finalizes this job (a backup
    /// takes its filter out in its cleanup). That drain lets the other,
    /// cancelled members of a failing transaction finish first, so their
    /// `aborting` comes before this job's completion event; the engine
    /// waits for them to match.
    fn finalize_drains(&self) -> bool {
        false
    }

    /// `block-job-change`, after the verb was admitted. The default is
    /// that of a driver without `.change`.
    fn change(&self, _job: &Job, _opts: &JobChange) -> Result<()> {
        Err(Error::generic("Job type does not support change"))
    }

    /// First step of a successful transaction; an error aborts it.
    fn prepare(&self, _job: &Job) -> Result<()> {
        Ok(())
    }

    /// The transaction succeeded.
    fn commit(&self, _job: &Job) {}

    /// The transaction failed or was cancelled.
    fn abort(&self, _job: &Job) {}

    /// After `commit` or `abort`, always.
    fn clean(&self, _job: &Job) {}

    /// Extra query field of mirror jobs (`actively-synced`).
    fn actively_synced(&self, _job: &Job) -> Option<bool> {
        None
    }
}

/// What to create: the options QEMU's `job_create`/`block_job_create` take.
#[derive(Clone, Default)]
pub struct JobOptions {
    /// Job id; required unless `JOB_INTERNAL`.
    pub id: Option<String>,
    /// `JOB_*` flags.
    pub flags: u32,
    /// A block job: sends `BLOCK_JOB_*` events, has an I/O status and a
    /// speed, and is listed by `query-block-jobs`.
    pub block: bool,
    /// Initial speed (block jobs); negative is refused as QEMU refuses it.
    pub speed: i64,
    /// The transaction to join; a private one when `None`.
    pub txn: Option<Arc<JobTxn>>,
}

/// Progress counters (`offset`/`len` in block-job queries).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Progress {
    /// Work done; never decreases.
    pub current: u64,
    /// Estimated total; may move both ways.
    pub total: u64,
}

/// A job. Shared by the registry, the job's thread and any handles.
pub struct Job {
    key: u64,
    id: Option<String>,
    job_type: JobType,
    block: bool,
    auto_finalize: bool,
    auto_dismiss: bool,
    driver: Box<dyn JobDriver>,
    engine: Arc<Engine>,
    /// The job thread waits here while sleeping, yielding or paused; paired
    /// with the engine's registry mutex.
    wake: Condvar,
    progress: crate::locks::Mutex<Progress>,
    /// Samples of `progress` for rates and the ETA (locked after
    /// `progress`, never the other way round).
    meter: crate::locks::Mutex<progress_meter::ProgressMeter>,
    /// Bytes of progress done without copying data (holes, zeroes,
    /// ranges with nothing to copy). Relaxed: a statistic, read alone.
    skipped: std::sync::atomic::AtomicU64,
    /// Called once when the job reaches `null` (block layer detaches here).
    on_free: crate::locks::Mutex<Vec<Box<dyn FnOnce() + Send>>>,
    /// The result, kept when the job leaves the registry at `null`.
    outcome: crate::locks::Mutex<Option<Outcome>>,
    /// An `ignore` failure waits to be healed (see [`Job::range_done`]):
    /// lets the success path skip the registry lock.
    retry_armed: crate::sync::AtomicBool,
}

/// How a job ended: what QEMU's `job_finish_sync` reads after the fact.
#[derive(Debug, Clone)]
pub(crate) struct Outcome {
    pub(crate) ret: i32,
    pub(crate) err: Option<Error>,
    pub(crate) force_cancel: bool,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Job")
            .field("id", &self.id)
            .field("type", &self.job_type)
            .finish_non_exhaustive()
    }
}

impl Job {
    /// The id (`None` for internal jobs).
    pub fn id(&self) -> Option<&str> {
        self.id.as_deref()
    }

    /// The id for messages: empty for internal jobs.
    pub fn id_str(&self) -> &str {
        self.id.as_deref().unwrap_or("")
    }

    /// The job type.
    pub fn job_type(&self) -> JobType {
        self.job_type
    }

    /// The driver, for drivers that need to reach their own state.
    pub fn driver(&self) -> &dyn JobDriver {
        self.driver.as_ref()
    }

    /// True for internal jobs.
    pub fn is_internal(&self) -> bool {
        self.id.is_none()
    }

    /// True for block jobs.
    pub fn is_block_job(&self) -> bool {
        self.block
    }

    /// `auto-finalize` as created.
    pub fn auto_finalize(&self) -> bool {
        self.auto_finalize
    }

    /// `auto-dismiss` as created.
    pub fn auto_dismiss(&self) -> bool {
        self.auto_dismiss
    }

    /// The engine this job belongs to.
    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    /// Run `f` once when the job is freed (reaches `null`), with the
    /// engine's registry lock held (so `f` must not call the engine). Hooks
    /// run in reverse order of registration, as values are dropped: one
    /// registered first runs after everything registered later.
    pub fn on_free(&self, f: impl FnOnce() + Send + 'static) {
        self.on_free.lock().push(Box::new(f));
    }

    // ---- status and verbs ------------------------------------------------

    /// Current status (`null` once dismissed).
    pub fn status(&self) -> JobStatus {
        self.engine.status(self)
    }

    /// Start the job's thread (QEMU's `job_start`).
    pub fn start(self: &Arc<Self>) -> Result<()> {
        self.engine.start(self)
    }

    /// `job-pause`: a user pause (counted once).
    pub fn user_pause(self: &Arc<Self>) -> Result<()> {
        self.engine.user_pause(self)
    }

    /// `job-resume`: undo the user pause; resets a block job's I/O status.
    pub fn user_resume(self: &Arc<Self>) -> Result<()> {
        self.engine.user_resume(self)
    }

    /// `job-cancel` (force = true) or QEMU's `job_user_cancel`.
    pub fn user_cancel(self: &Arc<Self>, force: bool) -> Result<()> {
        self.engine.user_cancel(self, force)
    }

    /// `block-job-cancel`: refuses a soft cancel of a user-paused job.
    pub fn block_job_cancel(self: &Arc<Self>, force: bool) -> Result<()> {
        self.engine.block_job_cancel(self, force)
    }

    /// `job-complete`.
    pub fn complete(self: &Arc<Self>) -> Result<()> {
        self.engine.complete(self)
    }

    /// `job-finalize`.
    pub fn finalize(self: &Arc<Self>) -> Result<()> {
        self.engine.finalize(self)
    }

    /// `job-dismiss`.
    pub fn dismiss(self: &Arc<Self>) -> Result<()> {
        self.engine.dismiss(self)
    }

    /// `block-job-set-speed`.
    pub fn set_speed(self: &Arc<Self>, speed: i64) -> Result<()> {
        self.engine.set_speed(self, speed)
    }

    /// `block-job-change`.
    pub fn change(self: &Arc<Self>, opts: &JobChange) -> Result<()> {
        self.engine.change(self, opts)
    }

    /// Cancel and wait until the job is completed (QEMU's `job_cancel_sync`).
    /// Returns the job's result (`ECANCELED` when it was cancelled).
    pub fn cancel_sync(self: &Arc<Self>, force: bool) -> Result<()> {
        self.engine.cancel_sync(self, force)
    }

    /// Complete and wait (QEMU's `job_complete_sync`).
    pub fn complete_sync(self: &Arc<Self>) -> Result<()> {
        self.engine.complete_sync(self)
    }

    /// Wait until the job is completed (`waiting` or later), processing
    /// its exit if needed. Returns the job's result.
    pub fn wait_completed(self: &Arc<Self>) -> Result<()> {
        self.engine.finish_sync(self)
    }

    /// Wait until `pred` holds for the job's status, or `timeout` passes.
    pub fn wait_status(
        &self,
        timeout: Duration,
        pred: impl Fn(JobStatus) -> bool,
    ) -> Option<JobStatus> {
        self.engine.wait_status(self, timeout, pred)
    }

    /// `query-block-jobs` entry.
    pub fn query_block_job(&self) -> Result<BlockJobInfo> {
        self.engine.query_block_job(self)
    }

    /// `query-jobs` entry.
    pub fn query_job(&self) -> Result<JobInfo> {
        self.engine.query_job(self)
    }

    /// A user pause is in effect (also after a `stop` error).
    pub fn is_user_paused(&self) -> bool {
        self.engine
            .with_state(self, |s| s.user_paused)
            .unwrap_or(false)
    }

    /// The block job's I/O status.
    pub fn iostatus(&self) -> BlockDeviceIoStatus {
        self.engine
            .with_state(self, |s| s.iostatus)
            .unwrap_or(BlockDeviceIoStatus::Ok)
    }

    /// QEMU's `block_job_iostatus_reset`: back to `ok` (only allowed while
    /// user-paused, as QEMU asserts; otherwise an error).
    pub fn iostatus_reset(&self) -> Result<()> {
        self.engine.iostatus_reset(self)
    }

    // ---- helpers for the job's own thread ---------------------------------

    /// Pause here if a pause was requested (QEMU's `job_pause_point`).
    pub fn pause_point(&self) {
        self.engine.pause_point(self)
    }

    /// Sleep up to `ns` nanoseconds, waking early on kick/cancel/pause, then
    /// pass a pause point (QEMU's `job_sleep_ns`).
    pub fn sleep_ns(&self, ns: u64) {
        self.engine.sleep(self, Some(Duration::from_nanos(ns)))
    }

    /// Wait until kicked (complete, cancel, …), then pass a pause point
    /// (QEMU's `job_yield`).
    pub fn yield_now(&self) {
        self.engine.sleep(self, None)
    }

    /// Wake the job if it sleeps, yields or is paused (QEMU's `job_enter`).
    pub fn enter(&self) {
        self.engine.enter(self)
    }

    /// A forced cancel was requested (QEMU's `job_is_cancelled`).
    pub fn is_cancelled(&self) -> bool {
        self.engine
            .with_state(self, |s| s.force_cancel)
            .unwrap_or(true)
    }

    /// Any cancel was requested (QEMU's `job_cancel_requested`).
    pub fn cancel_requested(&self) -> bool {
        self.engine
            .with_state(self, |s| s.cancelled)
            .unwrap_or(true)
    }

    /// Status is `ready` or `standby`.
    pub fn is_ready(&self) -> bool {
        tables::is_ready(self.status())
    }

    /// `running` → `ready`, with `BLOCK_JOB_READY` (QEMU's
    /// `job_transition_to_ready`).
    pub fn transition_to_ready(&self) -> Result<()> {
        self.engine.transition_to_ready(self)
    }

    /// The block-job error policy (QEMU's `block_job_error_action`):
    /// emits `BLOCK_JOB_ERROR`, and for `stop` pauses the job (user-visible)
    /// and sets its I/O status. `errno` is positive.
    pub fn error_action(
        &self,
        on_err: BlockdevOnError,
        is_read: bool,
        errno: i32,
    ) -> BlockErrorAction {
        self.engine.error_action(self, on_err, is_read, errno)
    }

    /// [`Job::error_action`] for a failed request on `[offset, offset +
    /// len)` that the job retries unless the action is `report`. For
    /// `ignore` it first waits out the retry backoff ([`backoff`]: 1 ms
    /// doubling to 1 s, started over once what failed has been done),
    /// on whichever thread calls it; a forced cancel or a pause request
    /// ends the wait at once. `stop` and `report` do not wait.
    pub fn range_error_action(
        &self,
        on_err: BlockdevOnError,
        is_read: bool,
        errno: i32,
        offset: u64,
        len: u64,
    ) -> BlockErrorAction {
        self.engine
            .range_error_action(self, on_err, is_read, errno, offset, len)
    }

    /// A request on `[offset, offset + len)` succeeded: heals a range that
    /// failed under `ignore` (see [`Job::range_error_action`]). Cheap when
    /// nothing failed.
    pub fn range_done(&self, offset: u64, len: u64) {
        // Relaxed: a hint. It is set under the registry lock before a
        // failed range is handed back for its retry, and the retry's
        // success is ordered after that hand-over by the lock the job
        // hands ranges over with; a success that misses it concerns
        // another range.
        if self.retry_armed.load(crate::sync::Ordering::Relaxed) {
            self.engine.range_done(self, offset, len);
        }
    }

    /// Current progress.
    pub fn progress(&self) -> Progress {
        *self.progress.lock()
    }

    /// `done` more units of work were completed.
    pub fn progress_update(&self, done: u64) {
        let mut p = self.progress.lock();
        p.current = p.current.saturating_add(done);
        if p.current > p.total {
            p.total = p.current;
        }
        self.meter.lock().record(std::time::Instant::now(), *p);
    }

    /// `remaining` units are left (total = current + remaining).
    pub fn progress_set_remaining(&self, remaining: u64) {
        let mut p = self.progress.lock();
        p.total = p.current.saturating_add(remaining);
        self.meter.lock().record(std::time::Instant::now(), *p);
    }

    /// The total grows by `delta`.
    pub fn progress_increase_remaining(&self, delta: u64) {
        let mut p = self.progress.lock();
        p.total = p.total.saturating_add(delta);
        self.meter.lock().record(std::time::Instant::now(), *p);
    }

    /// Of the work done, `n` units needed no data copied (holes and
    /// zeroes written as such, ranges with nothing to copy). Call it
    /// besides [`Job::progress_update`], which counts them as done.
    pub fn progress_skipped(&self, n: u64) {
        self.skipped
            .fetch_add(n, std::sync::atomic::Ordering::Relaxed);
    }

    /// Copy and dirty rates, ETA and convergence now (see
    /// [`progress_meter`]), with the bytes skipped so far.
    pub fn progress_rates(&self) -> (progress_meter::Rates, u64) {
        let p = *self.progress.lock();
        let rates = self.meter.lock().rates(std::time::Instant::now(), p);
        // Relaxed: a statistic (see the field).
        let skipped = self.skipped.load(std::sync::atomic::Ordering::Relaxed);
        (rates, skipped)
    }

    /// Current speed (bytes/s, 0 = unlimited).
    pub fn speed(&self) -> u64 {
        self.engine.with_state(self, |s| s.speed).unwrap_or(0)
    }

    /// Account processed bytes against the rate limit.
    pub fn ratelimit_processed(&self, bytes: u64) {
        self.engine.ratelimit_processed(self, bytes)
    }

    /// Sleep as long as the rate limit asks (at least once, so this is also
    /// a pause point).
    pub fn ratelimit_sleep(&self) {
        self.engine.ratelimit_sleep(self)
    }
}

pub(crate) fn check_flags(flags: u32) -> Result<()> {
    if flags & !JOB_FLAGS_ALL != 0 {
        return Err(Error::generic(format!("Invalid job flags 0x{flags:x}")));
    }
    Ok(())
}

#[cfg(test)]
mod tests;
