//! Stream and commit for C (QEMU's `block-stream` and `block-commit`).

use std::ffi::c_char;
use std::sync::Arc;

use super::context::{BjContext, ctx_arg};
use super::mirror::enum_arg;
use super::{BjError, Versioned, arg_opt_str, arg_str, ffi, reserved_zero, versioned};
use crate::block_jobs::commit::CommitOptions;
use crate::block_jobs::stream::StreamOptions;
use crate::engine::Job;
use crate::qapi::BlockdevOnError;

/// `block-stream` arguments. Zero-initialise, set `size` and `device`;
/// NULL and zero mean QEMU's defaults (flatten the whole chain, report,
/// auto-finalize and auto-dismiss on).
#[repr(C)]
pub struct BjStreamOptions {
    /// `sizeof(BjStreamOptions)`.
    pub size: u32,
    /// `job-id` (NULL: the device name; required for nodes without one).
    pub job_id: *const c_char,
    /// `device`: the top node or device.
    pub device: *const c_char,
    /// `base`: file name of the lowest layer to keep.
    pub base: *const c_char,
    /// `base-node`: node name of the lowest layer to keep.
    pub base_node: *const c_char,
    /// `bottom`: node name of the lowest layer to copy from.
    pub bottom: *const c_char,
    /// `backing-file`: the name to write into the top image's header.
    pub backing_file: *const c_char,
    /// `speed` in bytes/s; 0 = unlimited.
    pub speed: i64,
    /// `on-error`: `BJ_BLOCKDEV_ON_ERROR_*`.
    pub on_error: i32,
    /// Set `auto-finalize: false`.
    pub manual_finalize: bool,
    /// Set `auto-dismiss: false`.
    pub manual_dismiss: bool,
    /// `filter-node-name`: the name of the job's filter node (NULL:
    /// automatic). Took the first reserved word, so callers built before it
    /// pass NULL.
    pub filter_node_name: *const c_char,
    /// Reserved; must be zero.
    pub reserved: [u64; 7],
}

// SAFETY: repr(C), `size: u32` first.
unsafe impl Versioned for BjStreamOptions {
    const C_NAME: &'static str = "BjStreamOptions";
}

/// `block-commit` arguments. Zero-initialise, set `size` and `device`;
/// NULL and zero mean QEMU's defaults (top = the active layer, base = the
/// bottom of the chain, report, auto-finalize and auto-dismiss on).
#[repr(C)]
pub struct BjCommitOptions {
    /// `sizeof(BjCommitOptions)`.
    pub size: u32,
    /// `job-id` (NULL: the device name; required for nodes without one).
    pub job_id: *const c_char,
    /// `device`: the active layer (node or device).
    pub device: *const c_char,
    /// `top`: file name of the highest layer to commit.
    pub top: *const c_char,
    /// `top-node`: node name of the highest layer to commit.
    pub top_node: *const c_char,
    /// `base`: file name of the layer to commit into.
    pub base: *const c_char,
    /// `base-node`: node name of the layer to commit into.
    pub base_node: *const c_char,
    /// `backing-file`: the name to write into the overlay's header.
    pub backing_file: *const c_char,
    /// `speed` in bytes/s; 0 = unlimited.
    pub speed: i64,
    /// `on-error`: `BJ_BLOCKDEV_ON_ERROR_*`.
    pub on_error: i32,
    /// Set `auto-finalize: false`.
    pub manual_finalize: bool,
    /// Set `auto-dismiss: false`.
    pub manual_dismiss: bool,
    /// `filter-node-name`: the name of the job's filter node (NULL:
    /// automatic). Took the first reserved word, so callers built before it
    /// pass NULL.
    pub filter_node_name: *const c_char,
    /// Reserved; must be zero.
    pub reserved: [u64; 7],
}

// SAFETY: repr(C), `size: u32` first.
unsafe impl Versioned for BjCommitOptions {
    const C_NAME: &'static str = "BjCommitOptions";
}

/// An optional C string argument as an owned string.
///
/// # Safety
/// `p` is NULL or a NUL-terminated string.
unsafe fn opt(p: *const c_char, what: &str) -> crate::error::Result<Option<String>> {
    // SAFETY: the caller's promise.
    Ok(unsafe { arg_opt_str(p, what) }?.map(String::from))
}

/// `block-stream`: check the arguments as QEMU does, create the job,
/// start it, and return a new reference to it.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bj_block_stream(
    ctx: *mut BjContext,
    opts: *const BjStreamOptions,
    errp: *mut *mut BjError,
) -> *mut super::job::BjJob {
    ffi(errp, std::ptr::null_mut(), || {
        // SAFETY: NULL or live context.
        let c = unsafe { ctx_arg(ctx) }?;
        // SAFETY: NULL or a BjStreamOptions of some version.
        let o = unsafe { versioned(opts, "opts") }?;
        reserved_zero(&o.reserved, "opts")?;
        // SAFETY (all strings below): NULL or NUL-terminated.
        let mut s = StreamOptions::new(unsafe { arg_str(o.device, "opts->device") }?);
        s.job_id = unsafe { opt(o.job_id, "opts->job_id") }?;
        s.base = unsafe { opt(o.base, "opts->base") }?;
        s.base_node = unsafe { opt(o.base_node, "opts->base_node") }?;
        s.bottom = unsafe { opt(o.bottom, "opts->bottom") }?;
        s.backing_file = unsafe { opt(o.backing_file, "opts->backing_file") }?;
        s.filter_node_name = unsafe { opt(o.filter_node_name, "opts->filter_node_name") }?;
        s.speed = o.speed;
        s.on_error = enum_arg(o.on_error, "opts->on_error", BlockdevOnError::from_index)?;
        s.auto_finalize = !o.manual_finalize;
        s.auto_dismiss = !o.manual_dismiss;
        let job: Arc<Job> = c.ctx.block_stream(s)?;
        Ok(Arc::into_raw(job) as *mut super::job::BjJob)
    })
}

/// `block-commit`: check the arguments as QEMU does, create the job,
/// start it, and return a new reference to it. A commit of the active
/// layer becomes ready and is completed like a mirror.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bj_block_commit(
    ctx: *mut BjContext,
    opts: *const BjCommitOptions,
    errp: *mut *mut BjError,
) -> *mut super::job::BjJob {
    ffi(errp, std::ptr::null_mut(), || {
        // SAFETY: NULL or live context.
        let c = unsafe { ctx_arg(ctx) }?;
        // SAFETY: NULL or a BjCommitOptions of some version.
        let o = unsafe { versioned(opts, "opts") }?;
        reserved_zero(&o.reserved, "opts")?;
        // SAFETY (all strings below): NULL or NUL-terminated.
        let mut m = CommitOptions::new(unsafe { arg_str(o.device, "opts->device") }?);
        m.job_id = unsafe { opt(o.job_id, "opts->job_id") }?;
        m.top = unsafe { opt(o.top, "opts->top") }?;
        m.top_node = unsafe { opt(o.top_node, "opts->top_node") }?;
        m.base = unsafe { opt(o.base, "opts->base") }?;
        m.base_node = unsafe { opt(o.base_node, "opts->base_node") }?;
        m.backing_file = unsafe { opt(o.backing_file, "opts->backing_file") }?;
        m.filter_node_name = unsafe { opt(o.filter_node_name, "opts->filter_node_name") }?;
        m.speed = o.speed;
        m.on_error = enum_arg(o.on_error, "opts->on_error", BlockdevOnError::from_index)?;
        m.auto_finalize = !o.manual_finalize;
        m.auto_dismiss = !o.manual_dismiss;
        let job: Arc<Job> = c.ctx.block_commit(m)?;
        Ok(Arc::into_raw(job) as *mut super::job::BjJob)
    })
}
