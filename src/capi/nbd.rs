//! NBD exports for C: QEMU's `nbd-server-start`/`-stop`,
//! `block-export-add`/`-del` (type `nbd`), `query-block-exports`, and the
//! `tls-creds-x509` objects a TLS server needs (`object-add`/`-del`), so
//! that a C hypervisor can serve its nodes to another host: the source or
//! the destination of a storage migration.
//!
//! Every function is the QMP command of the same name with QEMU's checks
//! and texts (the library runs one code path for both); events
//! (`BLOCK_EXPORT_DELETED`) arrive as every other event does. The server's
//! threads are the context's: `bj_nbd_server_stop` (or `bj_context_free`)
//! disconnects the clients and joins them all.

use std::ffi::c_char;

use serde_json::{Map, Value};

use super::bitmap::BjBitmapRef;
use super::context::{BjContext, ctx_arg};
use super::mirror::enum_arg;
use super::{
    BjError, Versioned, arg_opt_str, arg_str, ffi, malloc_str, null_arg, reserved_zero, versioned,
};
use crate::block::dirty_bitmap::BitmapRef;
use crate::error::{Error, Result};
use crate::export::{BlockExportOptions, BlockExportRemoveMode, NbdServerOptions};
use crate::nbd::transport::SocketAddress;

fn invalid(msg: &str) -> Error {
    Error::generic(format!("Invalid argument: {msg}")).with_errno(libc::EINVAL)
}

// ---- the server -----------------------------------------------------------------

/// `nbd-server-start` arguments. Zero-initialise, set `size` and either
/// `path` (a UNIX socket) or `host` and `port` (TCP); zero means QEMU's
/// default everywhere (no TLS, no connection limit, 10 s to negotiate).
#[repr(C)]
pub struct BjNbdServerOptions {
    /// `sizeof(BjNbdServerOptions)`.
    pub size: u32,
    /// `addr` of type `unix`: the socket's path (NULL: TCP). The socket is
    /// created with the mode the umask leaves, as QEMU's; it is removed
    /// when the server stops.
    pub path: *const c_char,
    /// `addr` of type `inet`: host name or address (with `path` NULL).
    pub host: *const c_char,
    /// `addr` of type `inet`: port number or service name; `"0"` lets the
    /// system choose (see `bj_nbd_server_get_port`).
    pub port: *const c_char,
    /// `tls-creds`: the id of a `tls-creds-x509` object with endpoint
    /// `server` (NULL: plain NBD; clients asking for TLS are refused).
    pub tls_creds: *const c_char,
    /// `tls-authz`: accepted and unused, as QEMU without `tls-creds`.
    pub tls_authz: *const c_char,
    /// `max-connections`: at most this many clients at once (0: no limit).
    /// With 1, exports do not advertise multi-conn.
    pub max_connections: u32,
    /// Take `handshake_max_seconds` (otherwise QEMU's default, 10).
    pub has_handshake_max_seconds: bool,
    /// `handshake-max-seconds`: a client that has not finished
    /// negotiating by then is disconnected; 0: no limit.
    pub handshake_max_seconds: u32,
    /// Reserved; must be zero.
    pub reserved: [u64; 8],
}

// SAFETY: repr(C), `size: u32` first.
unsafe impl Versioned for BjNbdServerOptions {
    const C_NAME: &'static str = "BjNbdServerOptions";
}

/// The Rust options from C's, checked.
///
/// # Safety
/// `opts` is NULL or a `BjNbdServerOptions` of some version whose strings
/// are NULL or NUL-terminated.
unsafe fn server_options(opts: *const BjNbdServerOptions) -> Result<NbdServerOptions> {
    // SAFETY: forwarded contract.
    let o = unsafe { versioned(opts, "opts") }?;
    reserved_zero(&o.reserved, "opts")?;
    // SAFETY: NULL or NUL-terminated strings (all of them below).
    let path = unsafe { arg_opt_str(o.path, "opts->path") }?;
    // SAFETY: as above.
    let host = unsafe { arg_opt_str(o.host, "opts->host") }?;
    // SAFETY: as above.
    let port = unsafe { arg_opt_str(o.port, "opts->port") }?;
    let addr = match (path, host, port) {
        (Some(p), None, None) => SocketAddress::Unix { path: p.into() },
        (None, Some(h), Some(p)) => SocketAddress::Inet {
            host: h.into(),
            port: p.into(),
        },
        _ => {
            return Err(invalid(
                "set either opts->path, or opts->host and opts->port",
            ));
        }
    };
    let mut n = NbdServerOptions::new(addr);
    // SAFETY: as above.
    n.tls_creds = unsafe { arg_opt_str(o.tls_creds, "opts->tls_creds") }?.map(String::from);
    // SAFETY: as above.
    n.tls_authz = unsafe { arg_opt_str(o.tls_authz, "opts->tls_authz") }?.map(String::from);
    n.max_connections = o.max_connections;
    if o.has_handshake_max_seconds {
        n.handshake_max_seconds = o.handshake_max_seconds;
    }
    Ok(n)
}

/// `nbd-server-start`: listen at `opts`' address and serve the exports
/// added later. QEMU's refusals: `NBD server already running`, `No TLS
/// credentials with id 'X'`, `Failed to bind socket to PATH: …`, ….
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bj_nbd_server_start(
    ctx: *mut BjContext,
    opts: *const BjNbdServerOptions,
    errp: *mut *mut BjError,
) -> bool {
    ffi(errp, false, || {
        // SAFETY: NULL or live context.
        let c = unsafe { ctx_arg(ctx) }?;
        // SAFETY: NULL or a BjNbdServerOptions of some version.
        let n = unsafe { server_options(opts) }?;
        c.ctx.exports().nbd_server_start(n)?;
        Ok(true)
    })
}

/// `nbd-server-stop`: delete every export (`hard`: their clients are
/// disconnected; `BLOCK_EXPORT_DELETED` each, newest first), stop
/// listening (a UNIX socket is removed) and join every server thread
/// before returning. `NBD server not running` when it does not run.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bj_nbd_server_stop(ctx: *mut BjContext, errp: *mut *mut BjError) -> bool {
    ffi(errp, false, || {
        // SAFETY: NULL or live context.
        let c = unsafe { ctx_arg(ctx) }?;
        c.ctx.exports().nbd_server_stop()?;
        Ok(true)
    })
}

/// The TCP port the server listens on (what the system chose for port
/// `"0"`), or -1 with `*errp` set: `NBD server not running`, or a server
/// on a UNIX socket.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bj_nbd_server_get_port(
    ctx: *mut BjContext,
    errp: *mut *mut BjError,
) -> i32 {
    ffi(errp, -1, || {
        // SAFETY: NULL or live context.
        let c = unsafe { ctx_arg(ctx) }?;
        let e = c.ctx.exports();
        if !e.nbd_server_running() {
            return Err(Error::generic("NBD server not running"));
        }
        e.nbd_server_port()
            .map(i32::from)
            .ok_or_else(|| Error::generic("NBD server is not listening on TCP"))
    })
}

// ---- exports --------------------------------------------------------------------

/// `block-export-add` arguments for an NBD export. Zero-initialise, set
/// `size`, `id` and `node_name`; zero means QEMU's default everywhere
/// (read-only, named as the node, no bitmaps).
#[repr(C)]
pub struct BjBlockExportOptions {
    /// `sizeof(BjBlockExportOptions)`.
    pub size: u32,
    /// `id`: the export's id (QEMU's identifier rules).
    pub id: *const c_char,
    /// `node-name`: the node exported.
    pub node_name: *const c_char,
    /// `name`: the NBD export name clients ask for (NULL: the node name).
    pub name: *const c_char,
    /// `description`: shown to clients (NULL: none).
    pub description: *const c_char,
    /// `writable`: clients may write (through the node graph, as a
    /// guest's writes: bitmaps and mirrors see them).
    pub writable: bool,
    /// `writethrough`: each write is flushed before it completes.
    pub writethrough: bool,
    /// `allocation-depth`: offer the `qemu:allocation-depth` context.
    pub allocation_depth: bool,
    /// `bitmaps`: `nbitmaps` dirty bitmaps offered as
    /// `qemu:dirty-bitmap:NAME` (an entry's `node` NULL: searched from the
    /// exported node down its chain). They are busy while exported.
    pub bitmaps: *const BjBitmapRef,
    /// Entries in `bitmaps`.
    pub nbitmaps: usize,
    /// Reserved; must be zero.
    pub reserved: [u64; 8],
}

// SAFETY: repr(C), `size: u32` first.
unsafe impl Versioned for BjBlockExportOptions {
    const C_NAME: &'static str = "BjBlockExportOptions";
}

/// The Rust options from C's, checked.
///
/// # Safety
/// `opts` is NULL or a `BjBlockExportOptions` of some version whose
/// strings are NULL or NUL-terminated and whose `bitmaps` is NULL or
/// `nbitmaps` entries.
unsafe fn export_options(opts: *const BjBlockExportOptions) -> Result<BlockExportOptions> {
    // SAFETY: forwarded contract.
    let o = unsafe { versioned(opts, "opts") }?;
    reserved_zero(&o.reserved, "opts")?;
    // SAFETY: NULL or NUL-terminated strings (all of them below).
    let id = unsafe { arg_str(o.id, "opts->id") }?;
    // SAFETY: as above.
    let node_name = unsafe { arg_str(o.node_name, "opts->node_name") }?;
    let mut e = BlockExportOptions {
        id: id.into(),
        node_name: node_name.into(),
        writable: o.writable,
        writethrough: o.writethrough,
        allocation_depth: o.allocation_depth,
        ..Default::default()
    };
    // SAFETY: as above.
    e.name = unsafe { arg_opt_str(o.name, "opts->name") }?.map(String::from);
    // SAFETY: as above.
    e.description = unsafe { arg_opt_str(o.description, "opts->description") }?.map(String::from);
    if o.bitmaps.is_null() && o.nbitmaps > 0 {
        return Err(null_arg("opts->bitmaps"));
    }
    let refs: &[BjBitmapRef] = if o.nbitmaps == 0 {
        &[]
    } else {
        // SAFETY: non-NULL, `nbitmaps` entries by the contract.
        unsafe { std::slice::from_raw_parts(o.bitmaps, o.nbitmaps) }
    };
    for (i, r) in refs.iter().enumerate() {
        // SAFETY: NULL or NUL-terminated strings.
        let name = unsafe { arg_str(r.name, &format!("opts->bitmaps[{i}].name")) }?.to_string();
        // SAFETY: as above.
        e.bitmaps.push(
            match unsafe { arg_opt_str(r.node, &format!("opts->bitmaps[{i}].node")) }? {
                None => BitmapRef::Name(name),
                Some(n) => BitmapRef::Node {
                    node: n.to_string(),
                    name,
                },
            },
        );
    }
    Ok(e)
}

/// `block-export-add` with `type: nbd`: serve a node under an NBD name.
/// QEMU's refusals: `NBD server not running`, `Block export id 'X' is
/// already in use`, `NBD server already has export named 'X'`, `Cannot
/// find device=X nor node-name=X`, `Bitmap 'X' is not found`, ….
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bj_block_export_add(
    ctx: *mut BjContext,
    opts: *const BjBlockExportOptions,
    errp: *mut *mut BjError,
) -> bool {
    ffi(errp, false, || {
        // SAFETY: NULL or live context.
        let c = unsafe { ctx_arg(ctx) }?;
        // SAFETY: NULL or a BjBlockExportOptions of some version.
        let e = unsafe { export_options(opts) }?;
        c.ctx.exports().block_export_add(&e)?;
        Ok(true)
    })
}

/// `block-export-del`: `mode` is `BJ_BLOCK_EXPORT_REMOVE_MODE_SAFE`
/// (refused with `export 'X' still in use` while clients are connected)
/// or `_HARD` (the clients are disconnected first; returns once they are
/// gone). `BLOCK_EXPORT_DELETED` follows. `Export 'X' is not found` for
/// an unknown id.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bj_block_export_del(
    ctx: *mut BjContext,
    id: *const c_char,
    mode: i32,
    errp: *mut *mut BjError,
) -> bool {
    ffi(errp, false, || {
        // SAFETY: NULL or live context.
        let c = unsafe { ctx_arg(ctx) }?;
        // SAFETY: NULL or a NUL-terminated string.
        let id = unsafe { arg_str(id, "id") }?;
        let mode = enum_arg(mode, "mode", |m| match m {
            super::enums::BJ_BLOCK_EXPORT_REMOVE_MODE_SAFE => Some(BlockExportRemoveMode::Safe),
            super::enums::BJ_BLOCK_EXPORT_REMOVE_MODE_HARD => Some(BlockExportRemoveMode::Hard),
            _ => None,
        })?;
        c.ctx.exports().block_export_del(id, mode)?;
        Ok(true)
    })
}

/// `query-block-exports` as QMP JSON (an array of `{"id", "type",
/// "node-name", "shutting-down"}`, newest first; free with `bj_free`).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bj_query_block_exports(
    ctx: *mut BjContext,
    errp: *mut *mut BjError,
) -> *mut c_char {
    ffi(errp, std::ptr::null_mut(), || {
        // SAFETY: NULL or live context.
        let c = unsafe { ctx_arg(ctx) }?;
        let list = c.ctx.exports().query_block_exports();
        let s = serde_json::to_string(&list).map_err(|e| Error::generic(e.to_string()))?;
        Ok(malloc_str(&s))
    })
}

// ---- TLS credentials ------------------------------------------------------------

/// `object-add` of a `tls-creds-x509` object. Zero-initialise, set
/// `size`, `id`, `dir` and (for a server) `endpoint`; zero means QEMU's
/// default everywhere (client endpoint, peer verified, sanity check on).
#[repr(C)]
pub struct BjTlsCredsX509Options {
    /// `sizeof(BjTlsCredsX509Options)`.
    pub size: u32,
    /// `id`: the object's id, named by `tls_creds` elsewhere.
    pub id: *const c_char,
    /// `dir`: the credentials directory (`ca-cert.pem`; a server's
    /// `server-cert.pem`/`server-key.pem`, a client's
    /// `client-cert.pem`/`client-key.pem`).
    pub dir: *const c_char,
    /// `endpoint`: `BJ_QCRYPTO_TLS_CREDS_ENDPOINT_*` (0: client).
    pub endpoint: i32,
    /// Set `verify-peer: false` (a server then takes clients without a
    /// certificate; a client does not check the server's).
    pub no_verify_peer: bool,
    /// Set `sanity-check: false`.
    pub no_sanity_check: bool,
    /// `priority`: accepted and not applied (see the README).
    pub priority: *const c_char,
    /// Reserved; must be zero.
    pub reserved: [u64; 8],
}

// SAFETY: repr(C), `size: u32` first.
unsafe impl Versioned for BjTlsCredsX509Options {
    const C_NAME: &'static str = "BjTlsCredsX509Options";
}

/// `object-add` with `qom-type: tls-creds-x509`: load the certificates
/// now (QEMU's texts for missing or bad files; `attempt to add duplicate
/// property 'X' to object (type 'container')` for a used id).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bj_tls_creds_x509_add(
    ctx: *mut BjContext,
    opts: *const BjTlsCredsX509Options,
    errp: *mut *mut BjError,
) -> bool {
    ffi(errp, false, || {
        // SAFETY: NULL or live context.
        let c = unsafe { ctx_arg(ctx) }?;
        // SAFETY: NULL or a BjTlsCredsX509Options of some version.
        let o = unsafe { versioned(opts, "opts") }?;
        reserved_zero(&o.reserved, "opts")?;
        // SAFETY: NULL or NUL-terminated strings (all of them below).
        let id = unsafe { arg_str(o.id, "opts->id") }?;
        // SAFETY: as above.
        let dir = unsafe { arg_opt_str(o.dir, "opts->dir") }?;
        // SAFETY: as above.
        let priority = unsafe { arg_opt_str(o.priority, "opts->priority") }?;
        let endpoint = enum_arg(o.endpoint, "opts->endpoint", |e| match e {
            super::enums::BJ_QCRYPTO_TLS_CREDS_ENDPOINT_CLIENT => Some("client"),
            super::enums::BJ_QCRYPTO_TLS_CREDS_ENDPOINT_SERVER => Some("server"),
            _ => None,
        })?;
        // The QMP command's own path: the same checks and texts.
        let mut m = Map::new();
        m.insert("qom-type".into(), "tls-creds-x509".into());
        m.insert("id".into(), id.into());
        m.insert("verify-peer".into(), (!o.no_verify_peer).into());
        if let Some(d) = dir {
            m.insert("dir".into(), d.into());
        }
        m.insert("endpoint".into(), endpoint.into());
        if let Some(p) = priority {
            m.insert("priority".into(), p.into());
        }
        m.insert("sanity-check".into(), (!o.no_sanity_check).into());
        crate::qmp::object::object_add(&c.ctx, &Value::Object(m), false)?;
        Ok(true)
    })
}

/// `object-del`: remove the object `id`. A server started with these
/// credentials keeps them (as in QEMU). QEMU's `object 'X' not found`
/// for an unknown id.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bj_object_del(
    ctx: *mut BjContext,
    id: *const c_char,
    errp: *mut *mut BjError,
) -> bool {
    ffi(errp, false, || {
        // SAFETY: NULL or live context.
        let c = unsafe { ctx_arg(ctx) }?;
        // SAFETY: NULL or a NUL-terminated string.
        let id = unsafe { arg_str(id, "id") }?;
        c.ctx.objects().del(id)?;
        Ok(true)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capi::enums::*;

    #[test]
    fn remove_mode_and_endpoint_constants_follow_qapi_order() {
        assert_eq!(
            BlockExportRemoveMode::from_wire("safe"),
            Some(BlockExportRemoveMode::Safe)
        );
        assert_eq!(BJ_BLOCK_EXPORT_REMOVE_MODE_SAFE, 0);
        assert_eq!(BJ_BLOCK_EXPORT_REMOVE_MODE_HARD, 1);
        // QAPI QCryptoTLSCredsEndpoint: client, server.
        assert_eq!(BJ_QCRYPTO_TLS_CREDS_ENDPOINT_CLIENT, 0);
        assert_eq!(BJ_QCRYPTO_TLS_CREDS_ENDPOINT_SERVER, 1);
    }
}
