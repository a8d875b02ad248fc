//! QMP for C hosts: run one command and get QEMU's reply
//! (`bj_qmp_execute`; events come as QMP JSON in every `BjEvent`'s
//! `json`), or serve QEMU's monitor on a UNIX socket the host names
//! (`bj_qmp_server_new`), so that a C hypervisor gets the monitor without
//! writing one.
//!
//! A server's threads (acceptor, per client a reader and an event
//! forwarder) share the context (`BjContext` holds it in an `Arc`);
//! `bj_qmp_server_free` joins them all before it returns, so afterwards
//! nothing of the server runs, no descriptor of it is open, and its quit
//! callback has been released.

use std::ffi::{c_char, c_void};
use std::path::Path;

use super::context::{BjContext, ctx_arg};
use super::events::BjDestroyFn;
use super::{BjError, Versioned, arg_str, ffi, ffi_void, malloc_str, reserved_zero, versioned};
use crate::qmp::{QmpServer, QmpServerOptions, socket};

/// Execute one QMP command (`{"execute": "...", "arguments": {...},
/// "id": ...}`) on the context, as a monitor in command mode would (no
/// greeting or negotiation), and return the reply as JSON text: `{"return":
/// ...}` or `{"error": {"class": ..., "desc": ...}}`, with the request's
/// `id`. Text that is not JSON gets QEMU's parse error reply. Free with
/// `bj_free`. NULL only for a NULL context or command (with `errp` set).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bj_qmp_execute(
    ctx: *mut BjContext,
    json: *const c_char,
    errp: *mut *mut BjError,
) -> *mut c_char {
    ffi(errp, std::ptr::null_mut(), || {
        // SAFETY: NULL or live context.
        let c = unsafe { ctx_arg(ctx) }?;
        // SAFETY: NULL or a NUL-terminated string.
        let text = unsafe { arg_str(json, "json") }?;
        let reply = match serde_json::from_str::<serde_json::Value>(text) {
            Ok(v) => crate::qmp::execute(&c.ctx, &v),
            Err(_) => {
                // The session reports parse errors in QEMU's words.
                let mut s = crate::qmp::Session::new(&c.ctx);
                s.feed(br#"{"execute":"qmp_capabilities"}"#);
                let mut r = s.feed(text.as_bytes());
                r.pop().unwrap_or_else(|| {
                    serde_json::json!({"error": {"class": "GenericError",
                        "desc": "JSON parse error, unexpected end of input"}})
                })
            }
        };
        Ok(malloc_str(&reply.to_string()))
    })
}

/// Told that a client executed `quit`.
pub type BjQmpQuitFn = Option<unsafe extern "C" fn(opaque: *mut c_void)>;

/// How `bj_qmp_server_new` serves. Zero-initialise, set `size` and
/// `path`; zero means QEMU's default everywhere (compact output, nobody
/// told about `quit`).
#[repr(C)]
pub struct BjQmpServerOptions {
    /// `sizeof(BjQmpServerOptions)`.
    pub size: u32,
    /// Path of the UNIX socket to listen on (required). Its mode is what
    /// the process umask leaves, as QEMU's; whatever is at the path is
    /// unlinked first, as QEMU does (a directory makes the call fail with
    /// `Failed to unlink socket PATH: Is a directory`). `bj_qmp_server_free`
    /// removes it again if the path still names it, as QEMU unlinks its own
    /// socket when it closes. Copied: need not outlive the call.
    pub path: *const c_char,
    /// QEMU's `pretty=on`: replies and events indented by four spaces.
    pub pretty: bool,
    /// Called once a client executed `quit` (after its reply was sent),
    /// at most once per server; from then on the server executes no more
    /// commands, and the host is expected to shut down (or at least free
    /// the server). Runs on a library thread with no library lock held;
    /// it may call `bj_` functions except `bj_qmp_server_free` and
    /// `bj_context_free` (e.g. write to a pipe your main loop polls).
    /// NULL: nobody is told.
    pub quit: BjQmpQuitFn,
    /// `quit`'s argument.
    pub quit_opaque: *mut c_void,
    /// Called once with `quit_opaque` when `quit` can never run again:
    /// at `bj_qmp_server_free`, or before `bj_qmp_server_new` returns NULL
    /// (but not when `opts` is NULL or `opts->size` is wrong: such a
    /// struct cannot be trusted). May be NULL.
    pub quit_free: BjDestroyFn,
    /// Reserved; must be zero.
    pub reserved: [u64; 8],
}

// SAFETY: repr(C), `size: u32` first.
unsafe impl Versioned for BjQmpServerOptions {
    const C_NAME: &'static str = "BjQmpServerOptions";
}

/// A QMP server (opaque).
pub struct BjQmpServer {
    server: QmpServer,
}

/// The host's quit callback; `free` runs when this is dropped.
struct CQuit {
    f: BjQmpQuitFn,
    opaque: *mut c_void,
    free: BjDestroyFn,
}

// SAFETY: the host registers `opaque` for use on a library thread (the
// quit callback) and in `free`; that is the documented contract of
// BjQmpServerOptions.
unsafe impl Send for CQuit {}
// SAFETY: the callback runs at most once per server, so shared
// references never call it concurrently.
unsafe impl Sync for CQuit {}

impl CQuit {
    fn call(&self) {
        if let Some(f) = self.f {
            // SAFETY: the host's callback with its own opaque.
            unsafe { f(self.opaque) }
        }
    }
}

impl Drop for CQuit {
    fn drop(&mut self) {
        if let Some(d) = self.free {
            // SAFETY: the host's free, called exactly once, when the
            // callback can no longer run.
            unsafe { d(self.opaque) }
        }
    }
}

/// Serve QEMU's monitor (QMP) on a UNIX socket at `opts->path`, over the
/// context: any number of clients, each greeted and negotiated as QEMU
/// does, events sent to every negotiated client, the events a command
/// caused sent before its reply. Returns NULL with `*errp` set on failure
/// (NULL `ctx`, `opts` or `opts->path`, a wrong `opts->size`, non-zero
/// reserved words, a path that cannot be bound). Free with
/// `bj_qmp_server_free` before freeing the context.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bj_qmp_server_new(
    ctx: *mut BjContext,
    opts: *const BjQmpServerOptions,
    errp: *mut *mut BjError,
) -> *mut BjQmpServer {
    ffi(errp, std::ptr::null_mut(), || {
        // SAFETY: NULL or a BjQmpServerOptions of some version.
        let o = unsafe { versioned(opts, "opts") }?;
        // From here on every failure releases the host's opaque (drop).
        let quit = CQuit {
            f: o.quit,
            opaque: o.quit_opaque,
            free: o.quit_free,
        };
        // SAFETY: NULL or live context.
        let c = unsafe { ctx_arg(ctx) }?;
        reserved_zero(&o.reserved, "opts")?;
        // SAFETY: NULL or a NUL-terminated string.
        let path = unsafe { arg_str(o.path, "opts->path") }?;
        let (listener, file) = socket::bind(Path::new(path))?;
        let on_quit: Option<crate::qmp::server::QuitHandler> =
            if quit.f.is_some() || quit.free.is_some() {
                Some(Box::new(move || quit.call()))
            } else {
                None
            };
        let server = QmpServer::start(
            c.ctx.clone(),
            listener,
            QmpServerOptions {
                pretty: o.pretty,
                on_quit,
                // Removed by the server (also if starting fails).
                socket_file: Some(file),
            },
        )?;
        Ok(Box::into_raw(Box::new(BjQmpServer { server })))
    })
}

/// Stop the server and free it: no new connection (the socket file is
/// removed if the path still names it), no more commands, the events
/// already queued are sent (for a second at most to a client that does not
/// read), every client is disconnected and every thread joined; then the
/// quit callback's `quit_free` runs. Jobs the clients started go on. Sets
/// `*srvp` to NULL; NULL and `*srvp == NULL` are fine. Must not be called
/// from the server's quit callback.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bj_qmp_server_free(srvp: *mut *mut BjQmpServer) {
    ffi_void((), || {
        if srvp.is_null() {
            return;
        }
        // SAFETY: non-NULL pointer to the caller's handle variable.
        let slot = unsafe { &mut *srvp };
        if slot.is_null() {
            return;
        }
        // SAFETY: a server pointer only comes from bj_qmp_server_new.
        let mut b = unsafe { Box::from_raw(*slot) };
        *slot = std::ptr::null_mut();
        b.server.shutdown();
        drop(b);
    })
}
