//! Guest backends for C: a device's I/O with its own error policy,
//! I/O status, `BLOCK_IO_ERROR`, and drained sections.

use std::ffi::{c_char, c_void};

use super::context::{BjContext, ctx_arg};
use super::{
    BjError, Versioned, arg_opt_str, arg_ref, arg_str, buf_mut, buf_ref, ffi, ffi_void, io_range,
    reserved_zero, versioned,
};
use crate::block::WriteFlags;
use crate::block::backend::{BackendOptions, BlockBackend, GuestIoError};
use crate::error::{Error, Result};
use crate::qapi::{BlockErrorAction, BlockdevOnError};

/// Options of `bj_blk_new`. Zero-initialise, set `size`, fill what you
/// need; NULL options mean all defaults.
#[repr(C)]
pub struct BjBlockBackendOptions {
    /// `sizeof(BjBlockBackendOptions)`.
    pub size: u32,
    /// Device name (NULL or "" for an anonymous backend).
    pub name: *const c_char,
    /// QOM path for `BLOCK_IO_ERROR` (NULL: "").
    pub qom_path: *const c_char,
    /// `rerror`, `BJ_BLOCKDEV_ON_ERROR_*` (0 = report; `auto` = report).
    pub rerror: i32,
    /// `werror`, `BJ_BLOCKDEV_ON_ERROR_*` (`auto` = enospc).
    pub werror: i32,
    /// Keep an I/O status (QEMU devices that support it do).
    pub iostatus_enabled: bool,
    /// Reserved; must be zero.
    pub reserved: [u64; 8],
}

// SAFETY: repr(C), `size: u32` first.
unsafe impl Versioned for BjBlockBackendOptions {
    const C_NAME: &'static str = "BjBlockBackendOptions";
}

/// A guest backend (opaque).
pub struct BjBlockBackend {
    blk: BlockBackend,
}

fn policy(v: i32, what: &str) -> Result<BlockdevOnError> {
    BlockdevOnError::from_index(v).ok_or_else(|| {
        Error::generic(format!(
            "Invalid argument: {what} {v} is not a BlockdevOnError"
        ))
        .with_errno(libc::EINVAL)
    })
}

/// Attach a guest backend to a node (or device) `node_name`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bj_blk_new(
    ctx: *mut BjContext,
    node_name: *const c_char,
    opts: *const BjBlockBackendOptions,
    errp: *mut *mut BjError,
) -> *mut BjBlockBackend {
    ffi(errp, std::ptr::null_mut(), || {
        // SAFETY: NULL or live context / C string.
        let c = unsafe { ctx_arg(ctx) }?;
        // SAFETY: as above.
        let node = unsafe { arg_str(node_name, "node_name") }?;
        let o = if opts.is_null() {
            BackendOptions::default()
        } else {
            // SAFETY: non-NULL here; a BjBlockBackendOptions of some version.
            let o = unsafe { versioned(opts, "opts") }?;
            reserved_zero(&o.reserved, "opts")?;
            BackendOptions {
                // SAFETY: NULL or NUL-terminated strings.
                name: unsafe { arg_opt_str(o.name, "opts->name") }?
                    .unwrap_or("")
                    .to_string(),
                // SAFETY: as above.
                qom_path: unsafe { arg_opt_str(o.qom_path, "opts->qom_path") }?
                    .unwrap_or("")
                    .to_string(),
                rerror: policy(o.rerror, "rerror")?,
                werror: policy(o.werror, "werror")?,
                iostatus_enabled: o.iostatus_enabled,
                perms: None,
                device_errors: true,
            }
        };
        let blk = c.ctx.blk_new(node, o)?;
        Ok(Box::into_raw(Box::new(BjBlockBackend { blk })))
    })
}

/// Detach and free a backend; sets `*blkp` to NULL. Drained sections it
/// began are ended.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bj_blk_free(blkp: *mut *mut BjBlockBackend) {
    ffi_void((), || {
        if blkp.is_null() {
            return;
        }
        // SAFETY: pointer to the caller's handle variable.
        let slot = unsafe { &mut *blkp };
        if !slot.is_null() {
            // SAFETY: a backend pointer comes from Box::into_raw.
            drop(unsafe { Box::from_raw(*slot) });
            *slot = std::ptr::null_mut();
        }
    })
}

/// # Safety
/// `p` is NULL or a live backend.
unsafe fn blk_arg<'a>(p: *const BjBlockBackend) -> Result<&'a BlockBackend> {
    // SAFETY: forwarded contract.
    Ok(&unsafe { arg_ref(p, "blk") }?.blk)
}

/// Run a guest request and map its outcome for C: 0 on success or when
/// the error was ignored; -errno (and `*errp`) when it must be reported
/// or the VM must stop. `*action` gets the action taken, -1 if none.
fn guest_io(
    action: *mut i32,
    errp: *mut *mut BjError,
    f: impl FnOnce() -> Result<Result<(), GuestIoError>>,
) -> i32 {
    let mut taken = -1;
    let mut ret = -libc::EINVAL;
    ffi(errp, (), || match f()? {
        Ok(()) => {
            ret = 0;
            Ok(())
        }
        Err(GuestIoError { error, action: a }) => {
            taken = a.index();
            if a == BlockErrorAction::Ignore {
                ret = 0;
                Ok(())
            } else {
                ret = -error.errno().unwrap_or(libc::EIO);
                Err(error)
            }
        }
    });
    if !action.is_null() {
        // SAFETY: non-NULL pointer to the caller's int32_t.
        unsafe { *action = taken };
    }
    ret
}

/// Guest read of `bytes` at `offset` into `buf`. Returns 0 (also when the
/// error policy ignored a failure) or -errno; `*action` (may be NULL) is
/// the `BJ_BLOCK_ERROR_ACTION_*` taken, or -1 when the request succeeded.
/// For `stop`, hold the request, stop the VM, and retry after resuming.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bj_blk_pread(
    blk: *mut BjBlockBackend,
    offset: i64,
    buf: *mut c_void,
    bytes: i64,
    action: *mut i32,
    errp: *mut *mut BjError,
) -> i32 {
    guest_io(action, errp, || {
        // SAFETY: NULL or live backend.
        let b = unsafe { blk_arg(blk) }?;
        let (off, len) = io_range(offset, bytes)?;
        // SAFETY: the caller provides `bytes` writable bytes at `buf`.
        Ok(b.pread(off, unsafe { buf_mut(buf, len) }?))
    })
}

/// Guest write; see `bj_blk_pread` for the return convention.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bj_blk_pwrite(
    blk: *mut BjBlockBackend,
    offset: i64,
    buf: *const c_void,
    bytes: i64,
    action: *mut i32,
    errp: *mut *mut BjError,
) -> i32 {
    // SAFETY: the caller's guarantees are this function's, passed on.
    unsafe { bj_blk_pwrite_flags(blk, offset, buf, bytes, 0, action, errp) }
}

/// Guest write-zeroes; see `bj_blk_pread` for the return convention.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bj_blk_pwrite_zeroes(
    blk: *mut BjBlockBackend,
    offset: i64,
    bytes: i64,
    may_unmap: bool,
    action: *mut i32,
    errp: *mut *mut BjError,
) -> i32 {
    let flags = if may_unmap { BJ_REQ_MAY_UNMAP } else { 0 };
    // SAFETY: the caller's guarantees are this function's, passed on.
    unsafe { bj_blk_pwrite_zeroes_flags(blk, offset, bytes, flags, action, errp) }
}

/// `flags` of `bj_blk_pwrite_flags` and `bj_blk_pwrite_zeroes_flags`:
/// the write is stable when the call returns (QEMU's `BDRV_REQ_FUA`; an
/// NBD node sends `NBD_CMD_FLAG_FUA`, other nodes flush after it).
pub const BJ_REQ_FUA: u32 = 1;
/// Zero writes only: the range may be deallocated (`BDRV_REQ_MAY_UNMAP`).
pub const BJ_REQ_MAY_UNMAP: u32 = 2;
/// Zero writes only: fail with `-ENOTSUP` (nothing written) where zeroing
/// is not cheap, instead of writing zero buffers (`BDRV_REQ_NO_FALLBACK`;
/// an NBD node sends `NBD_CMD_FLAG_FAST_ZERO`).
pub const BJ_REQ_NO_FALLBACK: u32 = 4;

fn write_flags(flags: u32, allowed: u32) -> Result<WriteFlags> {
    if flags & !allowed != 0 {
        return Err(Error::generic(format!(
            "invalid request flags 0x{:x}",
            flags & !allowed
        )));
    }
    Ok(WriteFlags {
        fua: flags & BJ_REQ_FUA != 0,
        no_fallback: flags & BJ_REQ_NO_FALLBACK != 0,
    })
}

/// Guest write with `flags` (`BJ_REQ_FUA`); see `bj_blk_pread` for the
/// return convention. Unknown flags: `-EINVAL` and an error.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bj_blk_pwrite_flags(
    blk: *mut BjBlockBackend,
    offset: i64,
    buf: *const c_void,
    bytes: i64,
    flags: u32,
    action: *mut i32,
    errp: *mut *mut BjError,
) -> i32 {
    guest_io(action, errp, || {
        // SAFETY: NULL or live backend.
        let b = unsafe { blk_arg(blk) }?;
        let (off, len) = io_range(offset, bytes)?;
        let f = write_flags(flags, BJ_REQ_FUA)?;
        // SAFETY: the caller provides `bytes` readable bytes at `buf`.
        Ok(b.pwrite_with(off, unsafe { buf_ref(buf, len) }?, f))
    })
}

/// Guest write-zeroes with `flags` (`BJ_REQ_FUA`, `BJ_REQ_MAY_UNMAP`,
/// `BJ_REQ_NO_FALLBACK`); see `bj_blk_pread` for the return convention.
/// Unknown flags: `-EINVAL` and an error.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bj_blk_pwrite_zeroes_flags(
    blk: *mut BjBlockBackend,
    offset: i64,
    bytes: i64,
    flags: u32,
    action: *mut i32,
    errp: *mut *mut BjError,
) -> i32 {
    guest_io(action, errp, || {
        // SAFETY: NULL or live backend.
        let b = unsafe { blk_arg(blk) }?;
        let (off, len) = io_range(offset, bytes)?;
        let f = write_flags(flags, BJ_REQ_FUA | BJ_REQ_MAY_UNMAP | BJ_REQ_NO_FALLBACK)?;
        Ok(b.pwrite_zeroes_with(off, len as u64, flags & BJ_REQ_MAY_UNMAP != 0, f))
    })
}

/// Guest discard; see `bj_blk_pread` for the return convention.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bj_blk_pdiscard(
    blk: *mut BjBlockBackend,
    offset: i64,
    bytes: i64,
    action: *mut i32,
    errp: *mut *mut BjError,
) -> i32 {
    guest_io(action, errp, || {
        // SAFETY: NULL or live backend.
        let b = unsafe { blk_arg(blk) }?;
        let (off, len) = io_range(offset, bytes)?;
        Ok(b.pdiscard(off, len as u64))
    })
}

/// Guest flush; see `bj_blk_pread` for the return convention.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bj_blk_flush(
    blk: *mut BjBlockBackend,
    action: *mut i32,
    errp: *mut *mut BjError,
) -> i32 {
    guest_io(action, errp, || {
        // SAFETY: NULL or live backend.
        Ok(unsafe { blk_arg(blk) }?.flush())
    })
}

/// Size of the attached node, or -errno.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bj_blk_getlength(
    blk: *mut BjBlockBackend,
    errp: *mut *mut BjError,
) -> i64 {
    ffi(errp, -(libc::EINVAL as i64), || {
        // SAFETY: NULL or live backend.
        let b = unsafe { blk_arg(blk) }?;
        Ok(b.len()? as i64)
    })
}

/// The device's I/O status (`BJ_BLOCK_DEVICE_IO_STATUS_*`), -1 for NULL.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bj_blk_get_iostatus(blk: *mut BjBlockBackend) -> i32 {
    ffi_void(-1, || {
        // SAFETY: NULL or live backend.
        match unsafe { blk_arg(blk) } {
            Ok(b) => b.iostatus().index(),
            Err(_) => -1,
        }
    })
}

/// Reset the device's I/O status to ok (do it when the VM resumes).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bj_blk_iostatus_reset(blk: *mut BjBlockBackend) {
    ffi_void((), || {
        // SAFETY: NULL or live backend.
        if let Ok(b) = unsafe { blk_arg(blk) } {
            b.iostatus_reset();
        }
    })
}

/// Begin a drained section on the backend's node: new guest requests
/// wait, jobs using the node pause; returns when nothing is in flight
/// (it waits for requests, never for a job to finish).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bj_blk_drain_begin(
    blk: *mut BjBlockBackend,
    errp: *mut *mut BjError,
) -> bool {
    ffi(errp, false, || {
        // SAFETY: NULL or live backend.
        unsafe { blk_arg(blk) }?.drain_begin();
        Ok(true)
    })
}

/// End the innermost drained section begun with `bj_blk_drain_begin`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bj_blk_drain_end(
    blk: *mut BjBlockBackend,
    errp: *mut *mut BjError,
) -> bool {
    ffi(errp, false, || {
        // SAFETY: NULL or live backend.
        unsafe { blk_arg(blk) }?.drain_end()?;
        Ok(true)
    })
}
