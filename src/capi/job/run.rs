//! What a host-defined job's `run` calls on its own thread: pause points,
//! sleeps, progress, rate limit, readiness and the error policy.

use super::{BjJob, job_ref, with_job};
use crate::capi::{BjError, ffi};
use crate::error::Error;
use crate::qapi::BlockdevOnError;

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
