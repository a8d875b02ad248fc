//! Jobs for C. A `BjJob *` is a counted reference to a job: the handle
//! functions are here; host-defined jobs from a callback table in
//! [`driver`], the verbs in [`verbs`], the helpers a job's own `run` uses
//! in [`run`], queries in [`query`], transactions in [`txn`]. Callbacks
//! receive a borrowed `BjJob *` valid for the call; `bj_job_ref` keeps it
//! longer.

pub mod driver;
pub mod query;
pub mod run;
pub mod txn;
pub mod verbs;

use std::ffi::c_char;
use std::sync::Arc;

use super::context::{BjContext, ctx_arg};
use super::{BjError, arg_str, ffi, ffi_void, malloc_str, null_arg};
use crate::engine::Job;
use crate::error::Result;

/// A job (opaque, reference-counted).
pub struct BjJob {
    _private: [u8; 0],
}

pub(crate) fn jp(job: &Job) -> *mut BjJob {
    job as *const Job as *mut BjJob
}

/// # Safety
/// `p` is NULL or a live job handle (or a job pointer a callback got).
pub(crate) unsafe fn job_ref<'a>(p: *const BjJob) -> Result<&'a Job> {
    // SAFETY: a BjJob pointer is a `Job` inside an `Arc`.
    unsafe { super::arg_ref(p as *const Job, "job") }
}

/// # Safety
/// As [`job_ref`].
pub(crate) unsafe fn job_arc(p: *const BjJob) -> Result<Arc<Job>> {
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
pub(crate) unsafe fn job_verb(
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
pub(crate) unsafe fn with_job<T>(job: *mut BjJob, fail: T, f: impl FnOnce(&Job) -> T) -> T {
    // SAFETY: forwarded contract.
    match unsafe { job_ref(job) } {
        Ok(j) => ffi_void(fail, || f(j)),
        Err(_) => fail,
    }
}

pub(crate) fn handle(job: Arc<Job>) -> *mut BjJob {
    Arc::into_raw(job) as *mut BjJob
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
