//! QMP for C hosts: run a command, get QEMU's reply (events come as QMP
//! JSON in every `BjEvent`'s `json`).

use std::ffi::c_char;

use super::context::{BjContext, ctx_arg};
use super::{BjError, arg_str, ffi, malloc_str};

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
