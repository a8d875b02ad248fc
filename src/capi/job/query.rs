//! Queries: one block job as a struct, and QEMU's `query-block-jobs` /
//! `query-jobs` as QMP JSON.

use std::ffi::c_char;

use std::ffi::CString;

use super::{BjJob, job_ref};
use crate::capi::context::{BjContext, ctx_arg};
use crate::capi::{BjError, ffi, ffi_void, malloc_str};
use crate::error::{Error, Result};

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
    /// Progress per second over the last 10 s (`x-copy-rate`).
    pub copy_rate: i64,
    /// Growth of the total per second once work began, e.g. a guest
    /// re-dirtying what a mirror must copy again (`x-dirty-rate`).
    pub dirty_rate: i64,
    /// Bytes of progress that needed no data copied: holes, zeroes,
    /// ranges with nothing to copy (`x-skipped`).
    pub skipped: i64,
    /// Seconds to completion at the net rate (copy minus dirty); -1 when
    /// unknown or never (`x-eta`).
    pub eta: i64,
    /// 1 converging, 0 the dirty rate is at or above the copy rate with
    /// work left (will not converge), -1 not known yet (`x-converging`).
    pub converging: i32,
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
            copy_rate: i.x.copy_rate as i64,
            dirty_rate: i.x.dirty_rate as i64,
            skipped: i.x.skipped as i64,
            eta: i.x.eta.map_or(-1, |s| s as i64),
            converging: i.x.converging.map_or(-1, i32::from),
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
