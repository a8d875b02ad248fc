//! Transactions (QEMU's `JobTxn`): jobs created with one succeed or fail
//! together.

use std::sync::Arc;

use crate::capi::context::{BjContext, ctx_arg};
use crate::capi::{BjError, ffi, ffi_void};
use crate::engine::JobTxn;

/// A transaction (opaque, reference-counted).
pub struct BjJobTxn {
    _private: [u8; 0],
}

/// # Safety
/// `p` is NULL or a live transaction handle.
pub(crate) unsafe fn txn_arc(p: *const BjJobTxn) -> Option<Arc<JobTxn>> {
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
