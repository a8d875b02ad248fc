//! The mirror job for C (QEMU's `blockdev-mirror`).

use std::ffi::c_char;
use std::sync::Arc;

use super::context::{BjContext, ctx_arg};
use super::{BjError, Versioned, arg_opt_str, arg_str, ffi, reserved_zero, versioned};
use crate::block_jobs::mirror::MirrorOptions;
use crate::engine::Job;
use crate::error::{Error, Result};
use crate::qapi::{BlockdevOnError, MirrorCopyMode, MirrorSyncMode};

/// `blockdev-mirror` arguments. Zero-initialise, set `size`, `device`,
/// `target`; zero means QEMU's default everywhere (sync top, report,
/// background, auto-finalize and auto-dismiss on, unmap on).
#[repr(C)]
pub struct BjMirrorOptions {
    /// `sizeof(BjMirrorOptions)`.
    pub size: u32,
    /// `job-id` (NULL: the source's device name).
    pub job_id: *const c_char,
    /// `device`: source node or device name.
    pub device: *const c_char,
    /// `target`: target node name.
    pub target: *const c_char,
    /// `sync`: `BJ_MIRROR_SYNC_MODE_*` (0 is `top`, which is `full`
    /// without a backing file).
    pub sync: i32,
    /// `granularity` in bytes; 0 = the target's default.
    pub granularity: i64,
    /// `buf-size` in bytes; 0 = 16 MiB.
    pub buf_size: i64,
    /// `speed` in bytes/s; 0 = unlimited.
    pub speed: i64,
    /// `on-source-error`: `BJ_BLOCKDEV_ON_ERROR_*`.
    pub on_source_error: i32,
    /// `on-target-error`: `BJ_BLOCKDEV_ON_ERROR_*`.
    pub on_target_error: i32,
    /// `copy-mode`: `BJ_MIRROR_COPY_MODE_*`.
    pub copy_mode: i32,
    /// Set `auto-finalize: false`.
    pub manual_finalize: bool,
    /// Set `auto-dismiss: false`.
    pub manual_dismiss: bool,
    /// Set `unmap: false`.
    pub no_unmap: bool,
    /// `replaces`: node name the target takes the place of on
    /// completion (NULL: the source). Took the first reserved word, so
    /// callers built before it pass NULL.
    pub replaces: *const c_char,
    /// `filter-node-name`: the name of the job's `mirror_top` filter node
    /// (NULL: automatic). Took the next reserved word.
    pub filter_node_name: *const c_char,
    /// Reserved; must be zero.
    pub reserved: [u64; 6],
}

pub(super) fn enum_arg<T>(v: i32, what: &str, f: impl Fn(i32) -> Option<T>) -> Result<T> {
    f(v).ok_or_else(|| {
        Error::generic(format!("Invalid argument: {what} {v} is out of range"))
            .with_errno(libc::EINVAL)
    })
}

// SAFETY: repr(C), `size: u32` first.
unsafe impl Versioned for BjMirrorOptions {
    const C_NAME: &'static str = "BjMirrorOptions";
}

/// `blockdev-mirror`: check the arguments as QEMU does, create the job,
/// start it, and return a new reference to it.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bj_blockdev_mirror(
    ctx: *mut BjContext,
    opts: *const BjMirrorOptions,
    errp: *mut *mut BjError,
) -> *mut super::job::BjJob {
    ffi(errp, std::ptr::null_mut(), || {
        // SAFETY: NULL or live context.
        let c = unsafe { ctx_arg(ctx) }?;
        // SAFETY: NULL or a BjMirrorOptions of some version.
        let o = unsafe { versioned(opts, "opts") }?;
        reserved_zero(&o.reserved, "opts")?;
        // SAFETY: NULL or NUL-terminated strings.
        let device = unsafe { arg_str(o.device, "opts->device") }?;
        // SAFETY: as above.
        let target = unsafe { arg_str(o.target, "opts->target") }?;
        let sync = enum_arg(o.sync, "opts->sync", MirrorSyncMode::from_index)?;
        let mut m = MirrorOptions::new(device, target, sync);
        // SAFETY: as above.
        m.job_id = unsafe { arg_opt_str(o.job_id, "opts->job_id") }?.map(String::from);
        m.granularity = u64::try_from(o.granularity).map_err(|_| {
            Error::generic("Parameter 'granularity' expects a value in range [512B, 64MB]")
        })?;
        m.buf_size = o.buf_size;
        m.speed = o.speed;
        m.on_source_error = enum_arg(
            o.on_source_error,
            "opts->on_source_error",
            BlockdevOnError::from_index,
        )?;
        m.on_target_error = enum_arg(
            o.on_target_error,
            "opts->on_target_error",
            BlockdevOnError::from_index,
        )?;
        m.copy_mode = enum_arg(o.copy_mode, "opts->copy_mode", MirrorCopyMode::from_index)?;
        m.auto_finalize = !o.manual_finalize;
        m.auto_dismiss = !o.manual_dismiss;
        m.unmap = !o.no_unmap;
        // SAFETY: NULL or a NUL-terminated string.
        m.replaces = unsafe { arg_opt_str(o.replaces, "opts->replaces") }?.map(String::from);
        // SAFETY: as above.
        m.filter_node_name =
            unsafe { arg_opt_str(o.filter_node_name, "opts->filter_node_name") }?.map(String::from);
        let job: Arc<Job> = c.ctx.blockdev_mirror(m)?;
        Ok(Arc::into_raw(job) as *mut super::job::BjJob)
    })
}
