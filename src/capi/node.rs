//! Nodes for C: blockdev-add/-del from JSON, node handles for job I/O, and
//! host nodes whose I/O the host performs through callbacks.

use std::ffi::{c_char, c_void};
use std::sync::Arc;

use super::context::{BjContext, ctx_arg};
use super::enums::{BJ_BLOCK_ALLOCATED, BJ_BLOCK_DATA, BJ_BLOCK_ZERO};
use super::{
    BjError, Versioned, arg_ref, arg_str, buf_mut, buf_ref, ffi, ffi_void, io_range, null_arg,
    versioned,
};
use crate::block::Node;
use crate::block::host::HostIo;
use crate::error::{Error, Result};

/// A node handle (opaque, reference-counted; a handle keeps the node
/// alive even after blockdev-del).
pub struct BjNode {
    _private: [u8; 0],
}

fn into_handle(n: Arc<Node>) -> *mut BjNode {
    Arc::into_raw(n) as *mut BjNode
}

/// # Safety
/// `p` is NULL or a live node handle.
pub(crate) unsafe fn node_arg<'a>(p: *const BjNode) -> Result<&'a Node> {
    // SAFETY: a BjNode pointer is an `Arc<Node>` from into_handle.
    unsafe { arg_ref(p as *const Node, "node") }
}

/// # Safety
/// `p` is NULL or a live node handle.
pub(crate) unsafe fn node_arc(p: *const BjNode) -> Result<Arc<Node>> {
    if p.is_null() {
        return Err(null_arg("node"));
    }
    let p = p as *const Node;
    // SAFETY: `p` came from Arc::into_raw; we add a reference for the
    // clone we return and keep the caller's.
    unsafe {
        Arc::increment_strong_count(p);
        Ok(Arc::from_raw(p))
    }
}

fn neg_errno(e: &Error) -> i32 {
    -e.errno_or_einval()
}

/// blockdev-add: create nodes from QEMU's JSON, e.g.
/// `{"driver":"raw","node-name":"src","file":{"driver":"file","filename":"/x.img"}}`.
/// Errors carry QEMU's texts.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bj_blockdev_add(
    ctx: *mut BjContext,
    json: *const c_char,
    errp: *mut *mut BjError,
) -> bool {
    ffi(errp, false, || {
        // SAFETY: NULL or live context / C string.
        let c = unsafe { ctx_arg(ctx) }?;
        // SAFETY: as above.
        let json = unsafe { arg_str(json, "json") }?;
        c.ctx.blockdev_add_json(json)?;
        Ok(true)
    })
}

/// blockdev-del.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bj_blockdev_del(
    ctx: *mut BjContext,
    node_name: *const c_char,
    errp: *mut *mut BjError,
) -> bool {
    ffi(errp, false, || {
        // SAFETY: NULL or live context / C string.
        let c = unsafe { ctx_arg(ctx) }?;
        // SAFETY: as above.
        let name = unsafe { arg_str(node_name, "node_name") }?;
        c.ctx.blockdev_del(name)?;
        Ok(true)
    })
}

/// A new handle on the node (or device) with this name; NULL and
/// `Cannot find device='X' nor node-name='X'` when there is none.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bj_node_find(
    ctx: *mut BjContext,
    name: *const c_char,
    errp: *mut *mut BjError,
) -> *mut BjNode {
    ffi(errp, std::ptr::null_mut(), || {
        // SAFETY: NULL or live context / C string.
        let c = unsafe { ctx_arg(ctx) }?;
        // SAFETY: as above.
        let name = unsafe { arg_str(name, "name") }?;
        Ok(into_handle(c.ctx.lookup(name)?))
    })
}

/// Release a node handle and set `*nodep` to NULL.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bj_node_unref(nodep: *mut *mut BjNode) {
    ffi_void((), || {
        if nodep.is_null() {
            return;
        }
        // SAFETY: pointer to the caller's handle variable.
        let slot = unsafe { &mut *nodep };
        if !slot.is_null() {
            // SAFETY: the handle is one reference from Arc::into_raw.
            drop(unsafe { Arc::from_raw(*slot as *const Node) });
            *slot = std::ptr::null_mut();
        }
    })
}

/// The node name as a new string (free with `bj_free`), or NULL for a
/// NULL handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bj_node_get_name(node: *const BjNode) -> *mut c_char {
    ffi_void(std::ptr::null_mut(), || {
        // SAFETY: NULL or live handle.
        match unsafe { node_arg(node) } {
            Ok(n) => super::malloc_str(n.name()),
            Err(_) => std::ptr::null_mut(),
        }
    })
}

/// Size in bytes, or -errno.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bj_node_get_length(node: *const BjNode, errp: *mut *mut BjError) -> i64 {
    let mut ret = -libc::EINVAL as i64;
    ffi(errp, (), || {
        // SAFETY: NULL or live handle.
        let n = unsafe { node_arg(node) }?;
        match n.len() {
            Ok(l) => {
                ret = l as i64;
                Ok(())
            }
            Err(e) => {
                ret = -(e.errno_or_einval() as i64);
                Err(e)
            }
        }
    });
    ret
}

/// Run one node request, mapping errors to -errno plus `*errp`.
fn node_io(errp: *mut *mut BjError, f: impl FnOnce() -> Result<()>) -> i32 {
    let mut ret = -libc::EINVAL;
    ffi(errp, (), || match f() {
        Ok(()) => {
            ret = 0;
            Ok(())
        }
        Err(e) => {
            ret = neg_errno(&e);
            Err(e)
        }
    });
    ret
}

/// Read `bytes` at `offset` into `buf` (job I/O: no guest error policy).
/// Returns 0 or -errno.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bj_node_pread(
    node: *const BjNode,
    offset: i64,
    buf: *mut c_void,
    bytes: i64,
    errp: *mut *mut BjError,
) -> i32 {
    node_io(errp, || {
        // SAFETY: NULL or live handle.
        let n = unsafe { node_arg(node) }?;
        let (off, len) = io_range(offset, bytes)?;
        // SAFETY: the caller provides `bytes` writable bytes at `buf`.
        n.pread(off, unsafe { buf_mut(buf, len) }?)
    })
}

/// Write `bytes` from `buf` at `offset`. Returns 0 or -errno.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bj_node_pwrite(
    node: *const BjNode,
    offset: i64,
    buf: *const c_void,
    bytes: i64,
    errp: *mut *mut BjError,
) -> i32 {
    node_io(errp, || {
        // SAFETY: NULL or live handle.
        let n = unsafe { node_arg(node) }?;
        let (off, len) = io_range(offset, bytes)?;
        // SAFETY: the caller provides `bytes` readable bytes at `buf`.
        n.pwrite(off, unsafe { buf_ref(buf, len) }?)
    })
}

/// Make `bytes` at `offset` read as zeroes. Returns 0 or -errno.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bj_node_pwrite_zeroes(
    node: *const BjNode,
    offset: i64,
    bytes: i64,
    may_unmap: bool,
    errp: *mut *mut BjError,
) -> i32 {
    node_io(errp, || {
        // SAFETY: NULL or live handle.
        let n = unsafe { node_arg(node) }?;
        let (off, len) = io_range(offset, bytes)?;
        n.pwrite_zeroes(off, len as u64, may_unmap)
    })
}

/// Discard a range. Returns 0 or -errno.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bj_node_pdiscard(
    node: *const BjNode,
    offset: i64,
    bytes: i64,
    errp: *mut *mut BjError,
) -> i32 {
    node_io(errp, || {
        // SAFETY: NULL or live handle.
        let n = unsafe { node_arg(node) }?;
        let (off, len) = io_range(offset, bytes)?;
        n.pdiscard(off, len as u64)
    })
}

/// Flush. Returns 0 or -errno.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bj_node_flush(node: *const BjNode, errp: *mut *mut BjError) -> i32 {
    node_io(errp, || {
        // SAFETY: NULL or live handle.
        unsafe { node_arg(node) }?.flush()
    })
}

/// Block status of the range at `offset`: returns `BJ_BLOCK_*` flags and
/// sets `*pnum` to the length they hold for, or returns -errno.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bj_node_block_status(
    node: *const BjNode,
    offset: i64,
    bytes: i64,
    pnum: *mut i64,
    errp: *mut *mut BjError,
) -> i32 {
    let mut flags = 0;
    let r = node_io(errp, || {
        // SAFETY: NULL or live handle.
        let n = unsafe { node_arg(node) }?;
        let (off, len) = io_range(offset, bytes)?;
        let st = n.block_status(off, len as u64)?;
        flags = (i32::from(st.data) * BJ_BLOCK_DATA)
            | (i32::from(st.zero) * BJ_BLOCK_ZERO)
            | (i32::from(st.allocated) * BJ_BLOCK_ALLOCATED);
        if !pnum.is_null() {
            // SAFETY: non-NULL pointer to the caller's int64_t.
            unsafe { *pnum = st.len as i64 };
        }
        Ok(())
    });
    if r < 0 { r } else { flags }
}

/// Callbacks of a host node. Return 0 or -errno (`get_length`: the size
/// or -errno). `pread`, `get_length` are required, `pwrite` unless the
/// node is read-only; the others may be NULL. Called from any library
/// thread, concurrently.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct BjHostNodeOps {
    /// `sizeof(BjHostNodeOps)`, so the struct can grow.
    pub size: u32,
    /// Size in bytes, or -errno.
    pub get_length: Option<unsafe extern "C" fn(opaque: *mut c_void) -> i64>,
    /// Read `bytes` at `offset`.
    pub pread: Option<
        unsafe extern "C" fn(opaque: *mut c_void, offset: i64, buf: *mut c_void, bytes: i64) -> i32,
    >,
    /// Write `bytes` at `offset`.
    pub pwrite: Option<
        unsafe extern "C" fn(
            opaque: *mut c_void,
            offset: i64,
            buf: *const c_void,
            bytes: i64,
        ) -> i32,
    >,
    /// Zero a range (NULL: zero buffers are written).
    pub pwrite_zeroes: Option<
        unsafe extern "C" fn(opaque: *mut c_void, offset: i64, bytes: i64, may_unmap: bool) -> i32,
    >,
    /// Discard a range.
    pub pdiscard: Option<unsafe extern "C" fn(opaque: *mut c_void, offset: i64, bytes: i64) -> i32>,
    /// Flush.
    pub flush: Option<unsafe extern "C" fn(opaque: *mut c_void) -> i32>,
    /// `BJ_BLOCK_*` flags of the range at `offset`, `*pnum` = its length.
    pub block_status: Option<
        unsafe extern "C" fn(opaque: *mut c_void, offset: i64, bytes: i64, pnum: *mut i64) -> i32,
    >,
    /// Called once when the node is freed (also when creation fails).
    pub free: Option<unsafe extern "C" fn(opaque: *mut c_void)>,
    /// Reserved; must be zero.
    pub reserved: [*mut c_void; 8],
}

// SAFETY: repr(C), `size: u32` first.
unsafe impl Versioned for BjHostNodeOps {
    const C_NAME: &'static str = "BjHostNodeOps";
}

struct CHostIo {
    ops: BjHostNodeOps,
    opaque: *mut c_void,
}

// SAFETY: the host promises its callbacks and `opaque` may be used from
// any thread, concurrently (documented on BjHostNodeOps).
unsafe impl Send for CHostIo {}
// SAFETY: as above.
unsafe impl Sync for CHostIo {}

impl Drop for CHostIo {
    fn drop(&mut self) {
        if let Some(f) = self.ops.free {
            // SAFETY: the host's free, called exactly once.
            unsafe { f(self.opaque) }
        }
    }
}

fn host_ret(r: i32) -> std::result::Result<(), i32> {
    if r < 0 { Err(-r) } else { Ok(()) }
}

impl HostIo for CHostIo {
    fn len(&self) -> std::result::Result<u64, i32> {
        let f = self.ops.get_length.ok_or(libc::ENOTSUP)?;
        // SAFETY: host callback with its opaque.
        let r = unsafe { f(self.opaque) };
        if r < 0 {
            Err((-r) as i32)
        } else {
            Ok(r as u64)
        }
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> std::result::Result<(), i32> {
        let f = self.ops.pread.ok_or(libc::ENOTSUP)?;
        // SAFETY: host callback; `buf` is valid for its length.
        host_ret(unsafe {
            f(
                self.opaque,
                offset as i64,
                buf.as_mut_ptr() as *mut c_void,
                buf.len() as i64,
            )
        })
    }

    fn write(&self, offset: u64, buf: &[u8]) -> std::result::Result<(), i32> {
        let f = self.ops.pwrite.ok_or(libc::EPERM)?;
        // SAFETY: host callback; `buf` is valid for its length.
        host_ret(unsafe {
            f(
                self.opaque,
                offset as i64,
                buf.as_ptr() as *const c_void,
                buf.len() as i64,
            )
        })
    }

    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_unmap: bool,
    ) -> Option<std::result::Result<(), i32>> {
        let f = self.ops.pwrite_zeroes?;
        // SAFETY: host callback.
        Some(host_ret(unsafe {
            f(self.opaque, offset as i64, len as i64, may_unmap)
        }))
    }

    fn discard(&self, offset: u64, len: u64) -> std::result::Result<(), i32> {
        match self.ops.pdiscard {
            // SAFETY: host callback.
            Some(f) => host_ret(unsafe { f(self.opaque, offset as i64, len as i64) }),
            None => Ok(()),
        }
    }

    fn can_discard(&self) -> bool {
        self.ops.pdiscard.is_some()
    }

    fn flush(&self) -> std::result::Result<(), i32> {
        match self.ops.flush {
            // SAFETY: host callback.
            Some(f) => host_ret(unsafe { f(self.opaque) }),
            None => Ok(()),
        }
    }

    fn block_status(&self, offset: u64, len: u64) -> std::result::Result<(bool, bool, u64), i32> {
        let Some(f) = self.ops.block_status else {
            return Ok((true, false, len));
        };
        let mut pnum: i64 = len as i64;
        // SAFETY: host callback; `pnum` is a valid out pointer.
        let r = unsafe { f(self.opaque, offset as i64, len as i64, &mut pnum) };
        if r < 0 {
            return Err(-r);
        }
        let n = if pnum > 0 {
            (pnum as u64).min(len)
        } else {
            len
        };
        Ok((r & BJ_BLOCK_DATA != 0, r & BJ_BLOCK_ZERO != 0, n))
    }
}

/// Add a node whose I/O the host performs. `ops` is copied; `ops->size`
/// must be `sizeof(BjHostNodeOps)`. `ops->free` is called once with
/// `opaque` when the node is freed, or before this returns if it fails
/// (unless `ops` is NULL or its size is wrong). Returns a new node handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bj_node_add_host(
    ctx: *mut BjContext,
    node_name: *const c_char,
    read_only: bool,
    ops: *const BjHostNodeOps,
    opaque: *mut c_void,
    errp: *mut *mut BjError,
) -> *mut BjNode {
    ffi(errp, std::ptr::null_mut(), || {
        // SAFETY: NULL or a BjHostNodeOps of some version.
        let t = unsafe { versioned(ops, "ops") }?;
        let io = CHostIo { ops: *t, opaque };
        // From here, dropping `io` releases `opaque` via `free`.
        if io.ops.get_length.is_none() {
            return Err(null_arg("ops->get_length"));
        }
        if io.ops.pread.is_none() {
            return Err(null_arg("ops->pread"));
        }
        if io.ops.pwrite.is_none() && !read_only {
            return Err(null_arg("ops->pwrite"));
        }
        // SAFETY: NULL or live context / C string.
        let c = unsafe { ctx_arg(ctx) }?;
        // SAFETY: as above.
        let name = unsafe { arg_str(node_name, "node_name") }?;
        Ok(into_handle(c.ctx.add_host_node(
            name,
            read_only,
            Box::new(io),
        )?))
    })
}
