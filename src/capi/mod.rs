//! The C ABI: the only place with `extern "C"`, `#[no_mangle]` and raw
//! pointers. Every entry point goes through `ffi` (or `ffi_void`),
//! which catches panics and turns `Result` into QEMU's convention: a
//! failure value (`false`, `NULL`, negative errno) plus `*errp` filled with
//! a [`BjError`] (class, errno, message). `errp` may be NULL; if `*errp` is
//! already set, the first error is kept.
//!
//! Pointers from C are checked for NULL; strings must be valid UTF-8.
//! Handles are opaque; every `_new`/`_create` has a `_free`/`_unref` that
//! takes `T **` and sets the caller's pointer to NULL.

#![allow(clippy::missing_safety_doc)]

pub mod backend;
pub mod backup;
pub mod bitmap;
pub mod chain;
pub mod context;
pub mod enums;
pub mod error;
pub mod events;
pub mod job;
pub mod mirror;
pub mod nbd;
pub mod node;
pub mod qmp;
pub mod transaction;

use std::ffi::{CStr, c_char, c_void};
use std::panic::{AssertUnwindSafe, catch_unwind};

pub use error::BjError;

use crate::error::{Error, Result};

/// Run `f`, reporting its error (or a panic) through `errp`.
pub(crate) fn ffi<T>(errp: *mut *mut BjError, fail: T, f: impl FnOnce() -> Result<T>) -> T {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => {
            error::set(errp, e);
            fail
        }
        Err(p) => {
            error::set(errp, Error::generic(crate::engine::panic_text(&p)));
            fail
        }
    }
}

/// Run `f` where C has no way to receive an error; a panic is swallowed
/// (it must never unwind into C) and `fail` returned.
pub(crate) fn ffi_void<T>(fail: T, f: impl FnOnce() -> T) -> T {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or(fail)
}

pub(crate) fn null_arg(name: &str) -> Error {
    Error::generic(format!("Invalid argument: '{name}' must not be NULL")).with_errno(libc::EINVAL)
}

/// Borrow a C string argument as UTF-8.
///
/// # Safety
/// `p` is NULL or points to a NUL-terminated string valid for `'a`.
pub(crate) unsafe fn arg_str<'a>(p: *const c_char, name: &str) -> Result<&'a str> {
    if p.is_null() {
        return Err(null_arg(name));
    }
    // SAFETY: non-NULL and, by the caller's contract, NUL-terminated and
    // alive for 'a.
    let s = unsafe { CStr::from_ptr(p) };
    s.to_str().map_err(|_| {
        Error::generic(format!("Invalid argument: '{name}' is not valid UTF-8"))
            .with_errno(libc::EINVAL)
    })
}

/// Like [`arg_str`], but NULL is `None`.
///
/// # Safety
/// As [`arg_str`].
pub(crate) unsafe fn arg_opt_str<'a>(p: *const c_char, name: &str) -> Result<Option<&'a str>> {
    if p.is_null() {
        Ok(None)
    } else {
        // SAFETY: forwarded contract.
        unsafe { arg_str(p, name) }.map(Some)
    }
}

/// Borrow a handle.
///
/// # Safety
/// `p` is NULL or a live handle of type `T` created by this library.
pub(crate) unsafe fn arg_ref<'a, T>(p: *const T, name: &str) -> Result<&'a T> {
    if p.is_null() {
        return Err(null_arg(name));
    }
    // SAFETY: non-NULL; the caller guarantees it is a live handle.
    Ok(unsafe { &*p })
}

/// A C struct that starts with `uint32_t size` = `sizeof` of its version.
///
/// # Safety
/// Implement only for `#[repr(C)]` structs whose first field is `size: u32`.
pub(crate) unsafe trait Versioned: Sized {
    /// Its C name, for messages.
    const C_NAME: &'static str;
}

/// Borrow a versioned struct from C after checking that it is not NULL
/// and that its `size` is ours (so a host built against another version
/// of the header gets an error, not a misread struct).
///
/// # Safety
/// `p` is NULL or points to at least `size_of::<u32>()` readable bytes
/// and, when its `size` field equals `size_of::<T>()`, to a whole `T`,
/// valid for `'a`.
pub(crate) unsafe fn versioned<'a, T: Versioned>(p: *const T, arg: &str) -> Result<&'a T> {
    if p.is_null() {
        return Err(null_arg(arg));
    }
    // SAFETY: non-NULL; by `Versioned`, the first field is the u32 size,
    // present in every version, so reading it is in bounds.
    let size = unsafe { (p as *const u32).read_unaligned() };
    if size as usize != std::mem::size_of::<T>() {
        return Err(Error::generic(format!(
            "Invalid argument: {arg}->size is {size}, expected sizeof({}) = {}",
            T::C_NAME,
            std::mem::size_of::<T>()
        ))
        .with_errno(libc::EINVAL));
    }
    // SAFETY: the struct has this version's size, so it is a whole `T`
    // (the caller's contract).
    Ok(unsafe { &*p })
}

/// Reserved words must be zero (room to grow without a new size).
pub(crate) fn reserved_zero(reserved: &[u64], arg: &str) -> Result<()> {
    if reserved.iter().any(|&r| r != 0) {
        return Err(
            Error::generic(format!("Invalid argument: {arg}->reserved must be zero"))
                .with_errno(libc::EINVAL),
        );
    }
    Ok(())
}

/// Check an I/O range from C: non-negative offset and length.
pub(crate) fn io_range(offset: i64, bytes: i64) -> Result<(u64, usize)> {
    if offset < 0 || bytes < 0 {
        return Err(
            Error::generic("Invalid argument: negative offset or length").with_errno(libc::EINVAL),
        );
    }
    let len = usize::try_from(bytes).map_err(|_| Error::from_errno(libc::EINVAL))?;
    Ok((offset as u64, len))
}

/// Borrow a C buffer of `len` bytes for writing (NULL only when `len` is 0).
///
/// # Safety
/// `buf` is NULL or valid for `len` writable bytes for `'a`, not aliased.
pub(crate) unsafe fn buf_mut<'a>(buf: *mut c_void, len: usize) -> Result<&'a mut [u8]> {
    if len == 0 {
        return Ok(&mut []);
    }
    if buf.is_null() {
        return Err(null_arg("buf"));
    }
    // SAFETY: non-NULL and, by the caller's contract, valid for `len`
    // writable bytes.
    Ok(unsafe { std::slice::from_raw_parts_mut(buf as *mut u8, len) })
}

/// Borrow a C buffer of `len` bytes for reading (NULL only when `len` is 0).
///
/// # Safety
/// `buf` is NULL or valid for `len` readable bytes for `'a`.
pub(crate) unsafe fn buf_ref<'a>(buf: *const c_void, len: usize) -> Result<&'a [u8]> {
    if len == 0 {
        return Ok(&[]);
    }
    if buf.is_null() {
        return Err(null_arg("buf"));
    }
    // SAFETY: non-NULL and, by the caller's contract, valid for `len`
    // readable bytes.
    Ok(unsafe { std::slice::from_raw_parts(buf as *const u8, len) })
}

/// A NUL-terminated copy of `s` in memory from `malloc`, for C to release
/// with `bj_free` (or `free`). Interior NULs are replaced.
pub(crate) fn malloc_str(s: &str) -> *mut c_char {
    let bytes: Vec<u8> = s.bytes().map(|b| if b == 0 { b'?' } else { b }).collect();
    // SAFETY: malloc with a non-zero size; the result is checked for NULL
    // before use.
    let p = unsafe { libc::malloc(bytes.len() + 1) } as *mut u8;
    if p.is_null() {
        return std::ptr::null_mut();
    }
    // SAFETY: `p` has room for len + 1 bytes; source and destination do
    // not overlap.
    unsafe {
        std::ptr::copy_nonoverlapping(bytes.as_ptr(), p, bytes.len());
        *p.add(bytes.len()) = 0;
    }
    p as *mut c_char
}

/// Free memory the library returned (strings from `bj_*` functions).
/// NULL is ignored.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bj_free(p: *mut c_void) {
    // SAFETY: the caller passes NULL or a pointer this library got from
    // malloc (see malloc_str); free accepts both.
    unsafe { libc::free(p) }
}

/// The library version, e.g. "0.1.0". Static; do not free.
#[unsafe(no_mangle)]
pub extern "C" fn bj_version() -> *const c_char {
    static V: &CStr =
        match CStr::from_bytes_with_nul(concat!(env!("CARGO_PKG_VERSION"), "\0").as_bytes()) {
            Ok(v) => v,
            Err(_) => c"unknown",
        };
    V.as_ptr()
}
