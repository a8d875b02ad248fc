//! The verbs on a job (QEMU's `job-*` and `block-job-*` commands and
//! their synchronous forms).

use super::{BjJob, job_arc, job_ref, job_verb};
use crate::capi::{BjError, ffi, ffi_void};
use crate::engine::JobChange;
use crate::error::{Error, Result};
use crate::qapi::MirrorCopyMode;

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
            crate::capi::mirror::enum_arg(copy_mode, "copy_mode", MirrorCopyMode::from_index)?;
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
