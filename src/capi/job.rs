//! Jobs for C: host-defined jobs from a callback table, the helpers a
//! job's `run` uses, the verbs, queries, and transactions.
//!
//! A `BjJob *` is a counted reference. Callbacks receive a borrowed
//! `BjJob *` valid for the call; `bj_job_ref` keeps it longer.

use std::ffi::{CString, c_char, c_void};
use std::sync::Arc;

use super::context::{BjContext, ctx_arg};
use super::node::{BjNode, node_arc};
use super::{
    BjError, Versioned, arg_opt_str, arg_str, error, ffi, ffi_void, malloc_str, null_arg, versioned,
};
use crate::engine::{Job, JobChange, JobDriver, JobTxn};
use crate::error::{Error, Result};
use crate::qapi::{BlockdevOnError, JobType, MirrorCopyMode};

/// A job (opaque, reference-counted).
pub struct BjJob {
    _private: [u8; 0],
}

/// A transaction (opaque, reference-counted).
pub struct BjJobTxn {
    _private: [u8; 0],
}

/// A host-defined job type: QEMU's `JobDriver` as a callback table.
/// Zero-initialise, set `size = sizeof(BjJobDriver)`, `job_type` and
/// `run`; every other callback may be NULL (QEMU's default for a missing
/// hook). `run` runs on the job's own thread; the others on whichever
/// thread issued the verb or finished the job, one at a time.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct BjJobDriver {
    /// `sizeof(BjJobDriver)`.
    pub size: u32,
    /// `BJ_JOB_TYPE_*` reported in events and queries.
    pub job_type: i32,
    /// The work. Return 0 on success, -errno on failure (optionally with
    /// an error in `*errp` for a better message). Call
    /// `bj_job_pause_point`/`bj_job_sleep_ns` often and return early when
    /// `bj_job_is_cancelled`.
    pub run: Option<
        unsafe extern "C" fn(job: *mut BjJob, opaque: *mut c_void, errp: *mut *mut BjError) -> i32,
    >,
    /// Before the transaction commits; return -errno to abort it.
    pub prepare: Option<unsafe extern "C" fn(job: *mut BjJob, opaque: *mut c_void) -> i32>,
    /// The transaction succeeded.
    pub commit: Option<unsafe extern "C" fn(job: *mut BjJob, opaque: *mut c_void)>,
    /// The transaction failed or was cancelled.
    pub abort: Option<unsafe extern "C" fn(job: *mut BjJob, opaque: *mut c_void)>,
    /// After commit or abort.
    pub clean: Option<unsafe extern "C" fn(job: *mut BjJob, opaque: *mut c_void)>,
    /// At a pause point, before pausing.
    pub pause: Option<unsafe extern "C" fn(job: *mut BjJob, opaque: *mut c_void)>,
    /// After leaving a pause point.
    pub resume: Option<unsafe extern "C" fn(job: *mut BjJob, opaque: *mut c_void)>,
    /// `complete` was requested (ready jobs); NULL: the job cannot be
    /// completed. Return 0 or -errno (with `*errp`).
    pub complete: Option<
        unsafe extern "C" fn(job: *mut BjJob, opaque: *mut c_void, errp: *mut *mut BjError) -> i32,
    >,
    /// A cancel was requested; return the effective `force`. NULL: every
    /// cancel is a forced cancel (QEMU's default).
    pub cancel:
        Option<unsafe extern "C" fn(job: *mut BjJob, force: bool, opaque: *mut c_void) -> bool>,
    /// Called once with `opaque` when the job is freed: when it has
    /// reached `null` and the last reference is gone (your last
    /// `bj_job_unref`, or the library's own if that comes later); also when
    /// creation fails (but not when `drv` is NULL or `drv->size` is wrong:
    /// such a table cannot be trusted). `bj_context_free` frees every job.
    pub free: Option<unsafe extern "C" fn(opaque: *mut c_void)>,
    /// Reserved; must be zero.
    pub reserved: [*mut c_void; 8],
}

// SAFETY: repr(C), `size: u32` first.
unsafe impl Versioned for BjJobDriver {
    const C_NAME: &'static str = "BjJobDriver";
}

struct CJob {
    t: BjJobDriver,
    job_type: JobType,
    opaque: *mut c_void,
}

// SAFETY: the host's callbacks and `opaque` are documented to run on the
// job's thread and on verb threads (one at a time); the host promises
// `opaque` tolerates that.
unsafe impl Send for CJob {}
// SAFETY: as above.
unsafe impl Sync for CJob {}

impl Drop for CJob {
    fn drop(&mut self) {
        if let Some(f) = self.t.free {
            // SAFETY: the host's free, called exactly once.
            unsafe { f(self.opaque) }
        }
    }
}

fn jp(job: &Job) -> *mut BjJob {
    job as *const Job as *mut BjJob
}

impl JobDriver for CJob {
    fn job_type(&self) -> JobType {
        self.job_type
    }

    fn run(&self, job: &Arc<Job>) -> Result<()> {
        let f = self
            .t
            .run
            .ok_or_else(|| Error::generic("Job driver has no run"))?;
        let mut err: *mut BjError = std::ptr::null_mut();
        // SAFETY: host callback with a borrowed job handle valid for the call.
        let r = unsafe { f(jp(job), self.opaque, &mut err) };
        let e = error::take(err);
        if r < 0 {
            let errno = -r;
            return Err(match e {
                Some(e) => e.with_errno(errno),
                None => Error::from_errno(errno),
            });
        }
        Ok(())
    }

    fn pause(&self, job: &Job) {
        if let Some(f) = self.t.pause {
            // SAFETY: host callback.
            unsafe { f(jp(job), self.opaque) }
        }
    }

    fn resume(&self, job: &Job) {
        if let Some(f) = self.t.resume {
            // SAFETY: host callback.
            unsafe { f(jp(job), self.opaque) }
        }
    }

    fn supports_complete(&self) -> bool {
        self.t.complete.is_some()
    }

    fn complete(&self, job: &Job) -> Result<()> {
        let Some(f) = self.t.complete else {
            return Ok(());
        };
        let mut err: *mut BjError = std::ptr::null_mut();
        // SAFETY: host callback.
        let r = unsafe { f(jp(job), self.opaque, &mut err) };
        let e = error::take(err);
        if r < 0 {
            return Err(e.unwrap_or_else(|| Error::from_errno(-r)));
        }
        Ok(())
    }

    fn cancel(&self, job: &Job, force: bool) -> bool {
        match self.t.cancel {
            // SAFETY: host callback.
            Some(f) => unsafe { f(jp(job), force, self.opaque) },
            None => true,
        }
    }

    fn prepare(&self, job: &Job) -> Result<()> {
        match self.t.prepare {
            Some(f) => {
                // SAFETY: host callback.
                let r = unsafe { f(jp(job), self.opaque) };
                if r < 0 {
                    Err(Error::from_errno(-r))
                } else {
                    Ok(())
                }
            }
            None => Ok(()),
        }
    }

    fn commit(&self, job: &Job) {
        if let Some(f) = self.t.commit {
            // SAFETY: host callback.
            unsafe { f(jp(job), self.opaque) }
        }
    }

    fn abort(&self, job: &Job) {
        if let Some(f) = self.t.abort {
            // SAFETY: host callback.
            unsafe { f(jp(job), self.opaque) }
        }
    }

    fn clean(&self, job: &Job) {
        if let Some(f) = self.t.clean {
            // SAFETY: host callback.
            unsafe { f(jp(job), self.opaque) }
        }
    }
}

/// # Safety
/// `p` is NULL or a live job handle (or a job pointer a callback got).
unsafe fn job_ref<'a>(p: *const BjJob) -> Result<&'a Job> {
    // SAFETY: a BjJob pointer is a `Job` inside an `Arc`.
    unsafe { super::arg_ref(p as *const Job, "job") }
}

/// # Safety
/// As [`job_ref`].
unsafe fn job_arc(p: *const BjJob) -> Result<Arc<Job>> {
    if p.is_null() {
        return Err(null_arg("job"));
    }
    let p = p as *const Job;
    // SAFETY: the pointer is from Arc::into_raw (a handle) or points into
    // an Arc the engine keeps alive during callbacks; adding a count and
    // taking it back as an Arc leaves the caller's count untouched.
    unsafe {
        Arc::increment_strong_count(p);
        Ok(Arc::from_raw(p))
    }
}

/// Apply a verb to a job handle: `true`, or `false` with `*errp`.
///
/// # Safety
/// `job` is NULL or a live job handle.
unsafe fn job_verb(
    job: *mut BjJob,
    errp: *mut *mut BjError,
    f: impl FnOnce(&Arc<Job>) -> Result<()>,
) -> bool {
    ffi(errp, false, || {
        // SAFETY: forwarded contract.
        let j = unsafe { job_arc(job) }?;
        f(&j)?;
        Ok(true)
    })
}

/// Run `f` on a job pointer, or return `fail` for NULL (or a panic).
///
/// # Safety
/// `job` is NULL or a job pointer valid for this call.
unsafe fn with_job<T>(job: *mut BjJob, fail: T, f: impl FnOnce(&Job) -> T) -> T {
    // SAFETY: forwarded contract.
    match unsafe { job_ref(job) } {
        Ok(j) => ffi_void(fail, || f(j)),
        Err(_) => fail,
    }
}

fn handle(job: Arc<Job>) -> *mut BjJob {
    Arc::into_raw(job) as *mut BjJob
}

/// Build a `CJob` from the host's table; `free` runs if this fails.
///
/// # Safety
/// `drv` is NULL or points to a `BjJobDriver` of at least `size` bytes.
unsafe fn cjob(drv: *const BjJobDriver, opaque: *mut c_void) -> Result<CJob> {
    // SAFETY: NULL or a BjJobDriver of some version (the caller's contract).
    let t = *unsafe { versioned(drv, "drv") }?;
    let mut c = CJob {
        t,
        job_type: JobType::Backup,
        opaque,
    };
    // From here `c` owns `opaque`: returning an error drops it, calling free.
    let job_type = JobType::from_index(t.job_type).ok_or_else(|| {
        Error::generic(format!(
            "Invalid argument: job_type {} is not a JobType",
            t.job_type
        ))
        .with_errno(libc::EINVAL)
    })?;
    if t.run.is_none() {
        return Err(null_arg("drv->run"));
    }
    c.job_type = job_type;
    Ok(c)
}

/// # Safety
/// `p` is NULL or a live transaction handle.
unsafe fn txn_arc(p: *const BjJobTxn) -> Option<Arc<JobTxn>> {
    if p.is_null() {
        return None;
    }
    let p = p as *const JobTxn;
    // SAFETY: from Arc::into_raw in bj_job_txn_new; add a count for the clone.
    unsafe {
        Arc::increment_strong_count(p);
        Some(Arc::from_raw(p))
    }
}

/// Create a block job (QEMU's `block_job_create`) with a host-defined
/// driver. `job_id` NULL: the id of `node_name`'s device (the job then
/// fails with `Invalid job ID ''` if the node has none), unless
/// `BJ_JOB_INTERNAL`. `node_name` (may be NULL) is attached: draining it
/// pauses the job. A negative `speed` fails with QEMU's message after
/// emitting `created` and `null`. `flags`: `BJ_JOB_*`. `txn` may be NULL.
/// Returns a new reference; the job stays `created` until `bj_job_start`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bj_block_job_create(
    ctx: *mut BjContext,
    job_id: *const c_char,
    drv: *const BjJobDriver,
    txn: *mut BjJobTxn,
    node_name: *const c_char,
    speed: i64,
    flags: i32,
    opaque: *mut c_void,
    errp: *mut *mut BjError,
) -> *mut BjJob {
    ffi(errp, std::ptr::null_mut(), || {
        // SAFETY: as documented for each argument.
        let d = unsafe { cjob(drv, opaque) }?;
        // SAFETY: NULL or live context / strings / txn.
        let c = unsafe { ctx_arg(ctx) }?;
        // SAFETY: as above.
        let id = unsafe { arg_opt_str(job_id, "job_id") }?;
        // SAFETY: as above.
        let node = unsafe { arg_opt_str(node_name, "node_name") }?;
        let flags = u32::try_from(flags).map_err(|_| Error::generic("Invalid job flags"))?;
        // SAFETY: as above.
        let txn = unsafe { txn_arc(txn) };
        let job = c
            .ctx
            .block_job_create(id, node, Box::new(d), speed, flags, txn)?;
        Ok(handle(job))
    })
}

/// Create a job that is not a block job (QEMU's `job_create`): no
/// `BLOCK_JOB_*` events, no I/O status, not in `query-block-jobs`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bj_job_create(
    ctx: *mut BjContext,
    job_id: *const c_char,
    drv: *const BjJobDriver,
    txn: *mut BjJobTxn,
    flags: i32,
    opaque: *mut c_void,
    errp: *mut *mut BjError,
) -> *mut BjJob {
    ffi(errp, std::ptr::null_mut(), || {
        // SAFETY: as documented for each argument.
        let d = unsafe { cjob(drv, opaque) }?;
        // SAFETY: NULL or live context / strings / txn.
        let c = unsafe { ctx_arg(ctx) }?;
        // SAFETY: as above.
        let id = unsafe { arg_opt_str(job_id, "job_id") }?;
        let flags = u32::try_from(flags).map_err(|_| Error::generic("Invalid job flags"))?;
        // SAFETY: as above.
        let txn = unsafe { txn_arc(txn) };
        Ok(handle(c.ctx.job_create(id, Box::new(d), flags, txn)?))
    })
}

/// Attach another node the job uses (QEMU's `block_job_add_bdrv`), so that
/// draining it pauses the job and deleting it is refused.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bj_block_job_add_bdrv(
    job: *mut BjJob,
    node: *mut BjNode,
    errp: *mut *mut BjError,
) -> bool {
    ffi(errp, false, || {
        // SAFETY: NULL or live handles.
        let j = unsafe { job_arc(job) }?;
        // SAFETY: as above.
        let n = unsafe { node_arc(node) }?;
        crate::block_jobs::block_job::add_node(&j, &n, crate::block::UserKind::Backend);
        Ok(true)
    })
}

/// A new reference to the live job with this id, or NULL.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bj_job_find(ctx: *mut BjContext, id: *const c_char) -> *mut BjJob {
    ffi_void(std::ptr::null_mut(), || {
        // SAFETY: NULL or live context / string.
        let (Ok(c), Ok(id)) = (unsafe { ctx_arg(ctx) }, unsafe { arg_str(id, "id") }) else {
            return std::ptr::null_mut();
        };
        c.ctx.engine().find(id).map_or(std::ptr::null_mut(), handle)
    })
}

/// Take another reference; returns `job`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bj_job_ref(job: *mut BjJob) -> *mut BjJob {
    ffi_void(std::ptr::null_mut(), || {
        // SAFETY: NULL or live handle.
        match unsafe { job_arc(job) } {
            Ok(a) => handle(a),
            Err(_) => std::ptr::null_mut(),
        }
    })
}

/// Drop a reference and set `*jobp` to NULL. The job itself lives on until
/// it reaches `null`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bj_job_unref(jobp: *mut *mut BjJob) {
    ffi_void((), || {
        if jobp.is_null() {
            return;
        }
        // SAFETY: pointer to the caller's handle variable.
        let slot = unsafe { &mut *jobp };
        if !slot.is_null() {
            // SAFETY: the handle is one reference from Arc::into_raw.
            drop(unsafe { Arc::from_raw(*slot as *const Job) });
            *slot = std::ptr::null_mut();
        }
    })
}

/// Start the job's thread: `created` → `running`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bj_job_start(job: *mut BjJob, errp: *mut *mut BjError) -> bool {
    ffi(errp, false, || {
        // SAFETY: NULL or live handle.
        unsafe { job_arc(job) }?.start()?;
        Ok(true)
    })
}

/// `job-pause`: `Job is already paused` if user-paused.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bj_job_user_pause(job: *mut BjJob, errp: *mut *mut BjError) -> bool {
    // SAFETY: the caller passes NULL or a live handle.
    unsafe { job_verb(job, errp, |j| j.user_pause()) }
}

/// `job-resume`: `Can't resume a job that was not paused`; resets a
/// block job's I/O status.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bj_job_user_resume(job: *mut BjJob, errp: *mut *mut BjError) -> bool {
    // SAFETY: the caller passes NULL or a live handle.
    unsafe { job_verb(job, errp, |j| j.user_resume()) }
}

/// `job-complete`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bj_job_complete(job: *mut BjJob, errp: *mut *mut BjError) -> bool {
    // SAFETY: the caller passes NULL or a live handle.
    unsafe { job_verb(job, errp, |j| j.complete()) }
}

/// `job-finalize`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bj_job_finalize(job: *mut BjJob, errp: *mut *mut BjError) -> bool {
    // SAFETY: the caller passes NULL or a live handle.
    unsafe { job_verb(job, errp, |j| j.finalize()) }
}

/// `job-dismiss`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bj_job_dismiss(job: *mut BjJob, errp: *mut *mut BjError) -> bool {
    // SAFETY: the caller passes NULL or a live handle.
    unsafe { job_verb(job, errp, |j| j.dismiss()) }
}

/// QEMU's `job_user_cancel` (`job-cancel` passes force = true).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bj_job_user_cancel(
    job: *mut BjJob,
    force: bool,
    errp: *mut *mut BjError,
) -> bool {
    ffi(errp, false, || {
        // SAFETY: NULL or live handle.
        unsafe { job_arc(job) }?.user_cancel(force)?;
        Ok(true)
    })
}

/// `block-job-cancel`: a soft cancel of a user-paused job is refused
/// (`The block job for device 'ID' is currently paused`).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bj_block_job_cancel(
    job: *mut BjJob,
    force: bool,
    errp: *mut *mut BjError,
) -> bool {
    ffi(errp, false, || {
        // SAFETY: NULL or live handle.
        unsafe { job_arc(job) }?.block_job_cancel(force)?;
        Ok(true)
    })
}

/// `block-job-set-speed` (bytes/s, 0 = unlimited).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bj_block_job_set_speed(
    job: *mut BjJob,
    speed: i64,
    errp: *mut *mut BjError,
) -> bool {
    ffi(errp, false, || {
        // SAFETY: NULL or live handle.
        unsafe { job_arc(job) }?.set_speed(speed)?;
        Ok(true)
    })
}

/// `block-job-change` for a mirror: `copy_mode` is a
/// `BJ_MIRROR_COPY_MODE_*`. Switching a running mirror to write-blocking
/// takes effect at once; QEMU's refusals otherwise (back to background,
/// a job type without change).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bj_block_job_change_copy_mode(
    job: *mut BjJob,
    copy_mode: i32,
    errp: *mut *mut BjError,
) -> bool {
    ffi(errp, false, || {
        // SAFETY: NULL or live handle.
        let job = unsafe { job_arc(job) }?;
        let copy_mode =
            super::mirror::enum_arg(copy_mode, "copy_mode", MirrorCopyMode::from_index)?;
        job.change(&JobChange { copy_mode })?;
        Ok(true)
    })
}

fn sync_ret(r: Result<()>) -> (i32, Option<Error>) {
    match r {
        Ok(()) => (0, None),
        Err(e) => (-e.errno().unwrap_or(libc::EIO), Some(e)),
    }
}

/// Cancel and wait until the job is completed (QEMU's `job_cancel_sync`).
/// Returns 0, or -errno of the job's result (-ECANCELED when cancelled).
/// Do not call from a job callback or event handler.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bj_job_cancel_sync(job: *mut BjJob, force: bool) -> i32 {
    ffi_void(-libc::EINVAL, || {
        // SAFETY: NULL or live handle.
        let Ok(j) = (unsafe { job_arc(job) }) else {
            return -libc::EINVAL;
        };
        sync_ret(j.cancel_sync(force)).0
    })
}

/// Complete and wait (QEMU's `job_complete_sync`). Returns 0 or -errno,
/// with `*errp` on failure.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bj_job_complete_sync(job: *mut BjJob, errp: *mut *mut BjError) -> i32 {
    let mut ret = -libc::EINVAL;
    ffi(errp, (), || {
        // SAFETY: NULL or live handle.
        let j = unsafe { job_arc(job) }?;
        let (r, e) = sync_ret(j.complete_sync());
        ret = r;
        e.map_or(Ok(()), Err)
    });
    ret
}

/// Wait until the job is completed (`waiting` or later). Returns 0 or
/// -errno of its result.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bj_job_finish_sync(job: *mut BjJob, errp: *mut *mut BjError) -> i32 {
    let mut ret = -libc::EINVAL;
    ffi(errp, (), || {
        // SAFETY: NULL or live handle.
        let j = unsafe { job_arc(job) }?;
        let (r, e) = sync_ret(j.wait_completed());
        ret = r;
        e.map_or(Ok(()), Err)
    });
    ret
}

/// Wait up to `timeout_ms` for the job to reach `status`
/// (`BJ_JOB_STATUS_*`). Returns true if it did.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bj_job_wait_status(job: *mut BjJob, status: i32, timeout_ms: i64) -> bool {
    ffi_void(false, || {
        // SAFETY: NULL or live handle.
        let Ok(j) = (unsafe { job_ref(job) }) else {
            return false;
        };
        let Some(want) = crate::qapi::JobStatus::from_index(status) else {
            return false;
        };
        let t = std::time::Duration::from_millis(timeout_ms.max(0) as u64);
        j.wait_status(t, |s| s == want).is_some()
    })
}

/// Current status (`BJ_JOB_STATUS_*`); -1 for NULL.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bj_job_get_status(job: *mut BjJob) -> i32 {
    ffi_void(-1, || {
        // SAFETY: NULL or live handle.
        unsafe { job_ref(job) }.map_or(-1, |j| j.status().index())
    })
}

/// The job id as a new string (free with `bj_free`); NULL for internal jobs.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bj_job_get_id(job: *mut BjJob) -> *mut c_char {
    ffi_void(std::ptr::null_mut(), || {
        // SAFETY: NULL or live handle.
        match unsafe { job_ref(job) } {
            Ok(j) => j.id().map_or(std::ptr::null_mut(), malloc_str),
            Err(_) => std::ptr::null_mut(),
        }
    })
}

// ---- helpers for run() --------------------------------------------------------

/// Pause here if a pause was requested (QEMU's `job_pause_point`).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bj_job_pause_point(job: *mut BjJob) {
    // SAFETY: the caller passes NULL or a job pointer valid for this call.
    unsafe { with_job(job, (), |j| j.pause_point()) }
}

/// Sleep up to `ns`, waking early on cancel, pause or kick; then a
/// pause point (QEMU's `job_sleep_ns`).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bj_job_sleep_ns(job: *mut BjJob, ns: i64) {
    // SAFETY: the caller passes NULL or a job pointer valid for this call.
    unsafe { with_job(job, (), |j| j.sleep_ns(ns.max(0) as u64)) }
}

/// Wait until kicked (`bj_job_enter`, complete, cancel); then a pause
/// point (QEMU's `job_yield`).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bj_job_yield(job: *mut BjJob) {
    // SAFETY: the caller passes NULL or a job pointer valid for this call.
    unsafe { with_job(job, (), |j| j.yield_now()) }
}

/// Wake the job if it sleeps, yields or is paused (QEMU's `job_enter`).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bj_job_enter(job: *mut BjJob) {
    // SAFETY: the caller passes NULL or a job pointer valid for this call.
    unsafe { with_job(job, (), |j| j.enter()) }
}

/// A forced cancel was requested: stop now (QEMU's `job_is_cancelled`).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bj_job_is_cancelled(job: *mut BjJob) -> bool {
    // SAFETY: the caller passes NULL or a job pointer valid for this call.
    unsafe { with_job(job, true, |j| j.is_cancelled()) }
}

/// Any cancel was requested (QEMU's `job_cancel_requested`).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bj_job_cancel_requested(job: *mut BjJob) -> bool {
    // SAFETY: the caller passes NULL or a job pointer valid for this call.
    unsafe { with_job(job, true, |j| j.cancel_requested()) }
}

/// Status is ready or standby.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bj_job_is_ready(job: *mut BjJob) -> bool {
    // SAFETY: the caller passes NULL or a job pointer valid for this call.
    unsafe { with_job(job, false, |j| j.is_ready()) }
}

/// `done` more bytes of work were completed.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bj_job_progress_update(job: *mut BjJob, done: u64) {
    // SAFETY: the caller passes NULL or a job pointer valid for this call.
    unsafe { with_job(job, (), |j| j.progress_update(done)) }
}

/// `remaining` bytes are left (total = done + remaining).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bj_job_progress_set_remaining(job: *mut BjJob, remaining: u64) {
    // SAFETY: the caller passes NULL or a job pointer valid for this call.
    unsafe { with_job(job, (), |j| j.progress_set_remaining(remaining)) }
}

/// The total grows by `delta`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bj_job_progress_increase_remaining(job: *mut BjJob, delta: u64) {
    // SAFETY: the caller passes NULL or a job pointer valid for this call.
    unsafe { with_job(job, (), |j| j.progress_increase_remaining(delta)) }
}

/// Account `n` bytes against the job's speed.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bj_block_job_ratelimit_processed_bytes(job: *mut BjJob, n: u64) {
    // SAFETY: the caller passes NULL or a job pointer valid for this call.
    unsafe { with_job(job, (), |j| j.ratelimit_processed(n)) }
}

/// Sleep as long as the speed requires (always a pause point).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bj_block_job_ratelimit_sleep(job: *mut BjJob) {
    // SAFETY: the caller passes NULL or a job pointer valid for this call.
    unsafe { with_job(job, (), |j| j.ratelimit_sleep()) }
}

/// The job's I/O status (`BJ_BLOCK_DEVICE_IO_STATUS_*`).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bj_block_job_get_iostatus(job: *mut BjJob) -> i32 {
    // SAFETY: the caller passes NULL or a job pointer valid for this call.
    unsafe { with_job(job, -1, |j| j.iostatus().index()) }
}

/// `running` → `ready` with `BLOCK_JOB_READY` (QEMU's
/// `job_transition_to_ready`); refused from any other status.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bj_job_transition_to_ready(
    job: *mut BjJob,
    errp: *mut *mut BjError,
) -> bool {
    ffi(errp, false, || {
        // SAFETY: NULL or a job pointer valid for this call.
        unsafe { job_ref(job) }?.transition_to_ready()?;
        Ok(true)
    })
}

/// QEMU's `block_job_error_action`: the action for a failed request with
/// positive `error` (errno) under policy `on_err`
/// (`BJ_BLOCKDEV_ON_ERROR_*`). Emits `BLOCK_JOB_ERROR`; for stop, pauses
/// the job (user-visible) and sets its I/O status. Returns the
/// `BJ_BLOCK_ERROR_ACTION_*`, or -1 for bad arguments.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bj_block_job_error_action(
    job: *mut BjJob,
    on_err: i32,
    is_read: bool,
    error: i32,
    errp: *mut *mut BjError,
) -> i32 {
    ffi(errp, -1, || {
        // SAFETY: NULL or a job pointer valid for this call.
        let j = unsafe { job_ref(job) }?;
        let p = BlockdevOnError::from_index(on_err).ok_or_else(|| {
            Error::generic(format!(
                "Invalid argument: on_err {on_err} is not a BlockdevOnError"
            ))
            .with_errno(libc::EINVAL)
        })?;
        if error <= 0 {
            return Err(Error::generic(format!(
                "Invalid argument: error must be a positive errno, got {error}"
            ))
            .with_errno(libc::EINVAL));
        }
        Ok(j.error_action(p, is_read, error).index())
    })
}

/// Reset the block job's I/O status (only while user-paused, as QEMU).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bj_block_job_iostatus_reset(
    job: *mut BjJob,
    errp: *mut *mut BjError,
) -> bool {
    ffi(errp, false, || {
        // SAFETY: NULL or a job pointer valid for this call.
        unsafe { job_ref(job) }?.iostatus_reset()?;
        Ok(true)
    })
}

// ---- queries ------------------------------------------------------------------

/// One `query-block-jobs` entry as a struct (QEMU's `BlockJobInfo`).
/// Free with `bj_block_job_info_free`.
#[repr(C)]
pub struct BjBlockJobInfo {
    /// `BJ_JOB_TYPE_*`.
    pub job_type: i32,
    /// The job id.
    pub device: *mut c_char,
    /// Progress total.
    pub len: i64,
    /// Progress done.
    pub offset: i64,
    /// Running right now.
    pub busy: bool,
    /// A pause is requested.
    pub paused: bool,
    /// Speed, bytes/s.
    pub speed: i64,
    /// `BJ_BLOCK_DEVICE_IO_STATUS_*`.
    pub io_status: i32,
    /// Ready or standby.
    pub ready: bool,
    /// `BJ_JOB_STATUS_*`.
    pub status: i32,
    /// auto-finalize
    pub auto_finalize: bool,
    /// auto-dismiss
    pub auto_dismiss: bool,
    /// The error text if the job failed, else NULL.
    pub error: *mut c_char,
    /// Mirror only: 0/1; -1 when absent.
    pub actively_synced: i32,
}

/// Query a block job (QEMU's `block_job_query`).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bj_block_job_query(
    job: *mut BjJob,
    errp: *mut *mut BjError,
) -> *mut BjBlockJobInfo {
    ffi(errp, std::ptr::null_mut(), || {
        // SAFETY: NULL or live handle.
        let i = unsafe { job_ref(job) }?.query_block_job()?;
        let cs = |s: &str| {
            CString::new(s.replace('\0', "?"))
                .expect("NULs replaced")
                .into_raw()
        };
        Ok(Box::into_raw(Box::new(BjBlockJobInfo {
            job_type: i.job_type.index(),
            device: cs(&i.device),
            len: i.len as i64,
            offset: i.offset as i64,
            busy: i.busy,
            paused: i.paused,
            speed: i.speed as i64,
            io_status: i.io_status.index(),
            ready: i.ready,
            status: i.status.index(),
            auto_finalize: i.auto_finalize,
            auto_dismiss: i.auto_dismiss,
            error: i.error.as_deref().map_or(std::ptr::null_mut(), cs),
            actively_synced: i.actively_synced.map_or(-1, i32::from),
        })))
    })
}

/// Free a `BjBlockJobInfo` and set `*infop` to NULL.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bj_block_job_info_free(infop: *mut *mut BjBlockJobInfo) {
    ffi_void((), || {
        if infop.is_null() {
            return;
        }
        // SAFETY: pointer to the caller's variable.
        let slot = unsafe { &mut *infop };
        if slot.is_null() {
            return;
        }
        // SAFETY: from Box::into_raw in bj_block_job_query; its strings
        // from CString::into_raw (or NULL).
        let b = unsafe { Box::from_raw(*slot) };
        for p in [b.device, b.error] {
            if !p.is_null() {
                // SAFETY: see above.
                drop(unsafe { CString::from_raw(p) });
            }
        }
        *slot = std::ptr::null_mut();
    })
}

fn json_out<T: serde::Serialize>(v: &T) -> Result<*mut c_char> {
    let s = serde_json::to_string(v).map_err(|e| Error::generic(e.to_string()))?;
    Ok(malloc_str(&s))
}

/// `query-block-jobs` as QMP JSON (an array; free with `bj_free`).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bj_query_block_jobs(
    ctx: *mut BjContext,
    errp: *mut *mut BjError,
) -> *mut c_char {
    ffi(errp, std::ptr::null_mut(), || {
        // SAFETY: NULL or live context.
        json_out(&unsafe { ctx_arg(ctx) }?.ctx.query_block_jobs())
    })
}

/// `query-jobs` as QMP JSON (an array; free with `bj_free`).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bj_query_jobs(
    ctx: *mut BjContext,
    errp: *mut *mut BjError,
) -> *mut c_char {
    ffi(errp, std::ptr::null_mut(), || {
        // SAFETY: NULL or live context.
        json_out(&unsafe { ctx_arg(ctx) }?.ctx.query_jobs())
    })
}

/// One job's `query-block-jobs` entry as QMP JSON (free with `bj_free`).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bj_block_job_query_json(
    job: *mut BjJob,
    errp: *mut *mut BjError,
) -> *mut c_char {
    ffi(errp, std::ptr::null_mut(), || {
        // SAFETY: NULL or live handle.
        json_out(&unsafe { job_ref(job) }?.query_block_job()?)
    })
}

// ---- transactions ---------------------------------------------------------------

/// A new transaction (QEMU's `job_txn_new`): jobs created with it succeed
/// together or fail together.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bj_job_txn_new(
    ctx: *mut BjContext,
    errp: *mut *mut BjError,
) -> *mut BjJobTxn {
    ffi(errp, std::ptr::null_mut(), || {
        // SAFETY: NULL or live context.
        let c = unsafe { ctx_arg(ctx) }?;
        Ok(Arc::into_raw(c.ctx.txn_new()) as *mut BjJobTxn)
    })
}

/// Drop the creator's reference and set `*txnp` to NULL.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bj_job_txn_unref(txnp: *mut *mut BjJobTxn) {
    ffi_void((), || {
        if txnp.is_null() {
            return;
        }
        // SAFETY: pointer to the caller's handle variable.
        let slot = unsafe { &mut *txnp };
        if !slot.is_null() {
            // SAFETY: one reference from Arc::into_raw.
            drop(unsafe { Arc::from_raw(*slot as *const JobTxn) });
            *slot = std::ptr::null_mut();
        }
    })
}
