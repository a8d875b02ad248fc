//! `BjError`: QEMU's `Error` for C. Each error is its own allocation, so
//! errors are naturally per thread and per call.

use std::ffi::{CString, c_char};

use crate::error::Error;

/// An error: class (`BJ_ERROR_CLASS_*`), errno (0 when none) and message.
pub struct BjError {
    class: i32,
    errno: i32,
    message: CString,
}

pub(crate) fn set(errp: *mut *mut BjError, e: Error) {
    if errp.is_null() {
        return;
    }
    // SAFETY: `errp` is non-NULL and, by the API contract, points to a
    // writable `BjError *`.
    let slot = unsafe { &mut *errp };
    if !slot.is_null() {
        // The first error wins, as with QEMU's error_propagate.
        return;
    }
    let message =
        CString::new(e.message().replace('\0', "?")).unwrap_or_else(|_| CString::from(c"error"));
    let b = Box::new(BjError {
        class: e.class().index(),
        errno: e.errno().unwrap_or(0),
        message,
    });
    *slot = Box::into_raw(b);
}

/// Take an error a C callback set, if any.
pub(crate) fn take(err: *mut BjError) -> Option<Error> {
    if err.is_null() {
        return None;
    }
    // SAFETY: `err` came from `set` (Box::into_raw) via a callback's errp;
    // ownership returns to Rust here exactly once.
    let b = unsafe { Box::from_raw(err) };
    let class = crate::error::ErrorClass::ALL
        .get(b.class as usize)
        .copied()
        .unwrap_or(crate::error::ErrorClass::GenericError);
    let e = Error::with_class(class, b.message.to_string_lossy().into_owned());
    Some(if b.errno != 0 {
        e.with_errno(b.errno)
    } else {
        e
    })
}

/// Free an error and set `*errp` to NULL. NULL and `*errp == NULL` are fine.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bj_error_free(errp: *mut *mut BjError) {
    super::ffi_void((), || {
        if errp.is_null() {
            return;
        }
        // SAFETY: non-NULL pointer to the caller's `BjError *`.
        let slot = unsafe { &mut *errp };
        if !slot.is_null() {
            // SAFETY: a BjError pointer only ever comes from Box::into_raw.
            drop(unsafe { Box::from_raw(*slot) });
            *slot = std::ptr::null_mut();
        }
    })
}

/// The message (QEMU's `error_get_pretty`). Valid until the error is freed.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bj_error_get_pretty(err: *const BjError) -> *const c_char {
    if err.is_null() {
        return c"".as_ptr();
    }
    // SAFETY: a live error handle.
    unsafe { &*err }.message.as_ptr()
}

/// The class (`BJ_ERROR_CLASS_*`); GenericError for NULL.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bj_error_get_class(err: *const BjError) -> i32 {
    if err.is_null() {
        return 0;
    }
    // SAFETY: a live error handle.
    unsafe { &*err }.class
}

/// The positive errno of the error, or 0 when it has none.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bj_error_get_errno(err: *const BjError) -> i32 {
    if err.is_null() {
        return 0;
    }
    // SAFETY: a live error handle.
    unsafe { &*err }.errno
}

/// Create an error (for host callbacks that report one through `errp`).
/// `class` is `BJ_ERROR_CLASS_*`, `errno_` positive or 0.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bj_error_setg(
    errp: *mut *mut BjError,
    class: i32,
    errno_: i32,
    message: *const c_char,
) {
    super::ffi_void((), || {
        // SAFETY: NULL or a NUL-terminated string, per the contract.
        let msg = unsafe { super::arg_str(message, "message") }.unwrap_or("error");
        let class = crate::error::ErrorClass::ALL
            .get(class as usize)
            .copied()
            .unwrap_or(crate::error::ErrorClass::GenericError);
        let e = Error::with_class(class, msg);
        set(errp, if errno_ > 0 { e.with_errno(errno_) } else { e });
    })
}
