//! The backup job for C (QEMU's `blockdev-backup`).

use std::ffi::c_char;
use std::sync::Arc;

use super::context::{BjContext, ctx_arg};
use super::job::txn::{BjJobTxn, txn_arc};
use super::mirror::enum_arg;
use super::{BjError, Versioned, arg_opt_str, arg_str, ffi, reserved_zero, versioned};
use crate::block_jobs::backup::{BackupOptions, BackupPerf};
use crate::engine::Job;
use crate::error::Result;
use crate::qapi::{BitmapSyncMode, BlockdevOnError, MirrorSyncMode};

/// `blockdev-backup` arguments. Zero-initialise, set `size`, `device`,
/// `target` and `sync`; zero means QEMU's default everywhere (report,
/// auto-finalize and auto-dismiss on, 64 workers). `bitmap_mode` counts
/// only with a `bitmap` (zero: `on-success`, the mode of incremental
/// backups).
#[repr(C)]
pub struct BjBackupOptions {
    /// `sizeof(BjBackupOptions)`.
    pub size: u32,
    /// `job-id` (NULL: the source's device name).
    pub job_id: *const c_char,
    /// `device`: source node or device name.
    pub device: *const c_char,
    /// `target`: target node name.
    pub target: *const c_char,
    /// `sync`: `BJ_MIRROR_SYNC_MODE_*` (0 is `top`: `full` for a source
    /// without a backing file).
    pub sync: i32,
    /// `speed` in bytes/s; 0 = unlimited.
    pub speed: i64,
    /// `bitmap`: a dirty bitmap of the source (NULL: none).
    pub bitmap: *const c_char,
    /// `bitmap-mode`: `BJ_BITMAP_SYNC_MODE_*` (with a bitmap only).
    pub bitmap_mode: i32,
    /// `compress`.
    pub compress: bool,
    /// `on-source-error`: `BJ_BLOCKDEV_ON_ERROR_*`.
    pub on_source_error: i32,
    /// `on-target-error`: `BJ_BLOCKDEV_ON_ERROR_*`.
    pub on_target_error: i32,
    /// Set `auto-finalize: false`.
    pub manual_finalize: bool,
    /// Set `auto-dismiss: false`.
    pub manual_dismiss: bool,
    /// `filter-node-name`: the `copy-before-write` node's name (NULL:
    /// automatic).
    pub filter_node_name: *const c_char,
    /// `discard-source`.
    pub discard_source: bool,
    /// `x-perf.max-workers` (0: 64).
    pub max_workers: i64,
    /// `x-perf.max-chunk` (0: no limit).
    pub max_chunk: i64,
    /// `x-perf.min-cluster-size` (0: none).
    pub min_cluster_size: u64,
    /// A job transaction to join (NULL: the job completes on its own).
    pub txn: *mut BjJobTxn,
    /// Reserved; must be zero.
    pub reserved: [u64; 6],
}

// SAFETY: repr(C), `size: u32` first.
unsafe impl Versioned for BjBackupOptions {
    const C_NAME: &'static str = "BjBackupOptions";
}

/// The Rust options from C's, checked, and the transaction to join.
///
/// # Safety
/// `opts` is NULL or a `BjBackupOptions` of some version whose strings are
/// NULL or NUL-terminated.
pub(super) unsafe fn backup_options(
    opts: *const BjBackupOptions,
) -> Result<(BackupOptions, *mut BjJobTxn)> {
    // SAFETY: forwarded contract.
    let o = unsafe { versioned(opts, "opts") }?;
    reserved_zero(&o.reserved, "opts")?;
    // SAFETY: NULL or NUL-terminated strings.
    let device = unsafe { arg_str(o.device, "opts->device") }?;
    // SAFETY: as above.
    let target = unsafe { arg_str(o.target, "opts->target") }?;
    let sync = enum_arg(o.sync, "opts->sync", MirrorSyncMode::from_index)?;
    let mut b = BackupOptions::new(device, target, sync);
    // SAFETY: as above.
    b.job_id = unsafe { arg_opt_str(o.job_id, "opts->job_id") }?.map(String::from);
    b.speed = o.speed;
    // SAFETY: as above.
    b.bitmap = unsafe { arg_opt_str(o.bitmap, "opts->bitmap") }?.map(String::from);
    if b.bitmap.is_some() {
        b.bitmap_mode = Some(enum_arg(
            o.bitmap_mode,
            "opts->bitmap_mode",
            BitmapSyncMode::from_index,
        )?);
    }
    b.compress = o.compress;
    b.on_source_error = enum_arg(
        o.on_source_error,
        "opts->on_source_error",
        BlockdevOnError::from_index,
    )?;
    b.on_target_error = enum_arg(
        o.on_target_error,
        "opts->on_target_error",
        BlockdevOnError::from_index,
    )?;
    b.auto_finalize = !o.manual_finalize;
    b.auto_dismiss = !o.manual_dismiss;
    // SAFETY: as above.
    b.filter_node_name =
        unsafe { arg_opt_str(o.filter_node_name, "opts->filter_node_name") }?.map(String::from);
    b.discard_source = o.discard_source;
    let d = BackupPerf::default();
    b.perf = BackupPerf {
        use_copy_range: false,
        max_workers: if o.max_workers == 0 {
            d.max_workers
        } else {
            o.max_workers
        },
        max_chunk: o.max_chunk,
        min_cluster_size: o.min_cluster_size,
    };
    Ok((b, o.txn))
}

/// `blockdev-backup`: check the arguments as QEMU does, put the
/// `copy-before-write` filter above the source, create the job, start it,
/// and return a new reference to it.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bj_blockdev_backup(
    ctx: *mut BjContext,
    opts: *const BjBackupOptions,
    errp: *mut *mut BjError,
) -> *mut super::job::BjJob {
    ffi(errp, std::ptr::null_mut(), || {
        // SAFETY: NULL or live context.
        let c = unsafe { ctx_arg(ctx) }?;
        // SAFETY: NULL or a BjBackupOptions of some version.
        let (b, txn) = unsafe { backup_options(opts) }?;
        // SAFETY: NULL or a live transaction handle.
        let txn = unsafe { txn_arc(txn) };
        let job: Arc<Job> =
            crate::block_jobs::backup::blockdev_backup(c.ctx.graph(), c.ctx.engine(), b, txn)?;
        Ok(Arc::into_raw(job) as *mut super::job::BjJob)
    })
}
