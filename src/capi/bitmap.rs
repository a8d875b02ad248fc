//! Dirty bitmaps for C: QEMU's `block-dirty-bitmap-*` commands, and bitmap
//! handles for host jobs that read or consume a bitmap (the internal API
//! QEMU's own jobs use).

use std::ffi::c_char;
use std::sync::Arc;

use super::context::{BjContext, ctx_arg};
use super::{BjError, arg_opt_str, arg_ref, arg_str, ffi, ffi_void, malloc_str, null_arg};
use crate::block::dirty_bitmap::{BdrvDirtyBitmap, BitmapRef};
use crate::error::{Error, Result};

/// A bitmap handle (opaque, reference-counted).
pub struct BjDirtyBitmap {
    _private: [u8; 0],
}

/// A source of `bj_block_dirty_bitmap_merge`: `node` NULL means the
/// target's node (QEMU's plain-string form).
#[repr(C)]
pub struct BjBitmapRef {
    /// Node or device name, or NULL.
    pub node: *const c_char,
    /// Bitmap name.
    pub name: *const c_char,
}

/// Run `f(ctx, node, name)` with the usual argument checks.
///
/// # Safety
/// `ctx` is NULL or live; `node` and `name` NULL or NUL-terminated.
unsafe fn with_node_name(
    ctx: *mut BjContext,
    node: *const c_char,
    name: *const c_char,
    errp: *mut *mut BjError,
    f: impl FnOnce(&BjContext, &str, &str) -> Result<()>,
) -> bool {
    ffi(errp, false, || {
        // SAFETY: forwarded contract.
        let c = unsafe { ctx_arg(ctx) }?;
        // SAFETY: forwarded contract.
        let node = unsafe { arg_str(node, "node") }?;
        // SAFETY: forwarded contract.
        let name = unsafe { arg_str(name, "name") }?;
        f(c, node, name)?;
        Ok(true)
    })
}

/// `block-dirty-bitmap-add`. `granularity` 0 means the node's default
/// (its cluster size clamped to 4–64 KiB, else 64 KiB); otherwise a power
/// of two from 512 to 2^31.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bj_block_dirty_bitmap_add(
    ctx: *mut BjContext,
    node: *const c_char,
    name: *const c_char,
    granularity: i64,
    persistent: bool,
    disabled: bool,
    errp: *mut *mut BjError,
) -> bool {
    // SAFETY: the caller passes NULL or valid arguments.
    unsafe {
        with_node_name(ctx, node, name, errp, |c, node, name| {
            let g = match granularity {
                0 => None,
                g => Some(
                    u32::try_from(g)
                        .map_err(|_| Error::generic("Parameter 'granularity' expects uint32_t"))?,
                ),
            };
            c.ctx
                .block_dirty_bitmap_add(node, name, g, Some(persistent), Some(disabled))
        })
    }
}

/// `block-dirty-bitmap-remove`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bj_block_dirty_bitmap_remove(
    ctx: *mut BjContext,
    node: *const c_char,
    name: *const c_char,
    errp: *mut *mut BjError,
) -> bool {
    // SAFETY: the caller passes NULL or valid arguments.
    unsafe {
        with_node_name(ctx, node, name, errp, |c, n, b| {
            c.ctx.block_dirty_bitmap_remove(n, b)
        })
    }
}

/// `block-dirty-bitmap-clear`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bj_block_dirty_bitmap_clear(
    ctx: *mut BjContext,
    node: *const c_char,
    name: *const c_char,
    errp: *mut *mut BjError,
) -> bool {
    // SAFETY: the caller passes NULL or valid arguments.
    unsafe {
        with_node_name(ctx, node, name, errp, |c, n, b| {
            c.ctx.block_dirty_bitmap_clear(n, b)
        })
    }
}

/// `block-dirty-bitmap-enable`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bj_block_dirty_bitmap_enable(
    ctx: *mut BjContext,
    node: *const c_char,
    name: *const c_char,
    errp: *mut *mut BjError,
) -> bool {
    // SAFETY: the caller passes NULL or valid arguments.
    unsafe {
        with_node_name(ctx, node, name, errp, |c, n, b| {
            c.ctx.block_dirty_bitmap_enable(n, b)
        })
    }
}

/// `block-dirty-bitmap-disable`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bj_block_dirty_bitmap_disable(
    ctx: *mut BjContext,
    node: *const c_char,
    name: *const c_char,
    errp: *mut *mut BjError,
) -> bool {
    // SAFETY: the caller passes NULL or valid arguments.
    unsafe {
        with_node_name(ctx, node, name, errp, |c, n, b| {
            c.ctx.block_dirty_bitmap_disable(n, b)
        })
    }
}

/// Mark a bitmap in use by one of your jobs or exports (QEMU's
/// `bdrv_dirty_bitmap_set_busy`): remove, clear, enable, disable and merge
/// then refuse it.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bj_block_dirty_bitmap_set_busy(
    ctx: *mut BjContext,
    node: *const c_char,
    name: *const c_char,
    busy: bool,
    errp: *mut *mut BjError,
) -> bool {
    // SAFETY: the caller passes NULL or valid arguments.
    unsafe {
        with_node_name(ctx, node, name, errp, |c, n, b| {
            c.ctx.block_dirty_bitmap_set_busy(n, b, busy)
        })
    }
}

/// `block-dirty-bitmap-merge`: OR `nbitmaps` sources into `target` of
/// `node`, all or nothing.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bj_block_dirty_bitmap_merge(
    ctx: *mut BjContext,
    node: *const c_char,
    target: *const c_char,
    bitmaps: *const BjBitmapRef,
    nbitmaps: usize,
    errp: *mut *mut BjError,
) -> bool {
    // SAFETY: the caller passes NULL or valid arguments.
    unsafe {
        with_node_name(ctx, node, target, errp, |c, node, target| {
            if bitmaps.is_null() && nbitmaps > 0 {
                return Err(null_arg("bitmaps"));
            }
            let refs: &[BjBitmapRef] = if nbitmaps == 0 {
                &[]
            } else {
                // SAFETY: non-NULL, `nbitmaps` entries by the contract.
                std::slice::from_raw_parts(bitmaps, nbitmaps)
            };
            let mut srcs = Vec::with_capacity(refs.len());
            for (i, r) in refs.iter().enumerate() {
                // SAFETY: NULL or NUL-terminated strings.
                let name = arg_str(r.name, &format!("bitmaps[{i}].name"))?.to_string();
                // SAFETY: as above.
                srcs.push(match arg_opt_str(r.node, &format!("bitmaps[{i}].node"))? {
                    None => BitmapRef::Name(name),
                    Some(n) => BitmapRef::Node {
                        node: n.to_string(),
                        name,
                    },
                });
            }
            c.ctx.block_dirty_bitmap_merge(node, target, &srcs)
        })
    }
}

/// A node's `dirty-bitmaps` as QMP JSON (the list that
/// `query-named-block-nodes` shows, newest first; free with `bj_free`).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bj_block_dirty_bitmap_query(
    ctx: *mut BjContext,
    node: *const c_char,
    errp: *mut *mut BjError,
) -> *mut c_char {
    ffi(errp, std::ptr::null_mut(), || {
        // SAFETY: NULL or live context / C string.
        let c = unsafe { ctx_arg(ctx) }?;
        // SAFETY: as above.
        let node = unsafe { arg_str(node, "node") }?;
        let list = c.ctx.query_dirty_bitmaps(node)?;
        let s = serde_json::to_string(&list).map_err(|e| Error::generic(e.to_string()))?;
        Ok(malloc_str(&s))
    })
}

// ---- handles --------------------------------------------------------------------

/// # Safety
/// `p` is NULL or a live bitmap handle.
unsafe fn bitmap_arg<'a>(p: *const BjDirtyBitmap) -> Result<&'a BdrvDirtyBitmap> {
    // SAFETY: a BjDirtyBitmap pointer is an `Arc<BdrvDirtyBitmap>` from
    // Arc::into_raw.
    unsafe { arg_ref(p as *const BdrvDirtyBitmap, "bitmap") }
}

/// A handle on bitmap `name` of `node` (QEMU's `block_dirty_bitmap_lookup`);
/// release with `bj_dirty_bitmap_unref`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bj_block_dirty_bitmap_lookup(
    ctx: *mut BjContext,
    node: *const c_char,
    name: *const c_char,
    errp: *mut *mut BjError,
) -> *mut BjDirtyBitmap {
    ffi(errp, std::ptr::null_mut(), || {
        // SAFETY: NULL or live context / C strings.
        let c = unsafe { ctx_arg(ctx) }?;
        // SAFETY: as above.
        let node = unsafe { arg_str(node, "node") }?;
        // SAFETY: as above.
        let name = unsafe { arg_str(name, "name") }?;
        let b = c.ctx.block_dirty_bitmap_lookup(node, name)?;
        Ok(Arc::into_raw(b) as *mut BjDirtyBitmap)
    })
}

/// Release a bitmap handle and set `*bitmapp` to NULL.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bj_dirty_bitmap_unref(bitmapp: *mut *mut BjDirtyBitmap) {
    ffi_void((), || {
        if bitmapp.is_null() {
            return;
        }
        // SAFETY: pointer to the caller's handle variable.
        let slot = unsafe { &mut *bitmapp };
        if !slot.is_null() {
            // SAFETY: one reference from Arc::into_raw.
            drop(unsafe { Arc::from_raw(*slot as *const BdrvDirtyBitmap) });
            *slot = std::ptr::null_mut();
        }
    })
}

/// Dirty bytes (dirty granules × granularity), or -1 for NULL.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bj_dirty_bitmap_count(bitmap: *const BjDirtyBitmap) -> i64 {
    ffi_void(-1, || {
        // SAFETY: NULL or live handle.
        unsafe { bitmap_arg(bitmap) }.map_or(-1, |b| b.bits().count() as i64)
    })
}

/// Mark `[offset, offset + bytes)` dirty (lock-free).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bj_dirty_bitmap_set(
    bitmap: *const BjDirtyBitmap,
    offset: i64,
    bytes: i64,
    errp: *mut *mut BjError,
) -> bool {
    ffi(errp, false, || {
        // SAFETY: NULL or live handle.
        let b = unsafe { bitmap_arg(bitmap) }?;
        let (off, len) = super::io_range(offset, bytes)?;
        b.bits().set_range(off, len as u64);
        Ok(true)
    })
}

/// Mark `[offset, offset + bytes)` clean.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bj_dirty_bitmap_reset(
    bitmap: *const BjDirtyBitmap,
    offset: i64,
    bytes: i64,
    errp: *mut *mut BjError,
) -> bool {
    ffi(errp, false, || {
        // SAFETY: NULL or live handle.
        let b = unsafe { bitmap_arg(bitmap) }?;
        let (off, len) = super::io_range(offset, bytes)?;
        b.bits().reset_range(off, len as u64);
        Ok(true)
    })
}

/// Find the first dirty area at or after `offset`, at most `max_bytes`
/// long: true with `*area_offset`/`*area_bytes` set, or false when there
/// is none (or on error, with `*errp`). With `take`, the area is
/// atomically cleared as it is returned (a concurrent set is either in it
/// or stays dirty).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bj_dirty_bitmap_next_dirty_area(
    bitmap: *const BjDirtyBitmap,
    offset: i64,
    max_bytes: i64,
    take: bool,
    area_offset: *mut i64,
    area_bytes: *mut i64,
    errp: *mut *mut BjError,
) -> bool {
    ffi(errp, false, || {
        // SAFETY: NULL or live handle.
        let b = unsafe { bitmap_arg(bitmap) }?;
        let (off, max) = super::io_range(offset, max_bytes)?;
        if area_offset.is_null() || area_bytes.is_null() {
            return Err(null_arg("area_offset/area_bytes"));
        }
        let found = if take {
            b.bits().take_next_area(off, max as u64)
        } else {
            b.bits().next_dirty_area(off, max as u64)
        };
        let Some((o, l)) = found else {
            return Ok(false);
        };
        // SAFETY: non-NULL out pointers to the caller's int64_t.
        unsafe {
            *area_offset = o as i64;
            *area_bytes = l as i64;
        }
        Ok(true)
    })
}
