//! Events for C: a flat `BjEvent` with every field any event has (unused
//! ones NULL or -1), plus the event's QMP JSON text. Delivered to handlers
//! on the context's event thread, or queued for `bj_event_next`.

use std::ffi::{CString, c_char, c_void};
use std::sync::Arc;

use super::context::{BjContext, ctx_arg};
use super::enums::*;
use super::{BjError, ffi, ffi_void};
use crate::events::{Event, EventData};

/// One event. Strings are owned by the event: valid while the event lives
/// (during the handler call, or until `bj_event_free`).
#[repr(C)]
pub struct BjEvent {
    /// `BJ_EVENT_*`.
    pub kind: i32,
    /// QMP event name, e.g. "BLOCK_JOB_ERROR".
    pub name: *const c_char,
    /// Per-context sequence number, from 1, contiguous.
    pub seq: u64,
    /// Timestamp, seconds.
    pub timestamp_seconds: i64,
    /// Timestamp, microseconds.
    pub timestamp_microseconds: i64,
    /// `id` (JOB_STATUS_CHANGE, BLOCK_JOB_PENDING), else NULL.
    pub id: *const c_char,
    /// `device`: the job id in BLOCK_JOB_* events, the device name in
    /// BLOCK_IO_ERROR; else NULL.
    pub device: *const c_char,
    /// `type` (`BJ_JOB_TYPE_*`), or -1.
    pub job_type: i32,
    /// `status` of JOB_STATUS_CHANGE (`BJ_JOB_STATUS_*`), or -1.
    pub status: i32,
    /// `len` of BLOCK_JOB_* progress events, or -1.
    pub len: i64,
    /// `offset` of BLOCK_JOB_* progress events, or -1.
    pub offset: i64,
    /// `speed` of BLOCK_JOB_* progress events, or -1.
    pub speed: i64,
    /// `error` of BLOCK_JOB_COMPLETED when the job failed, else NULL.
    pub error: *const c_char,
    /// `operation` (`BJ_IO_OPERATION_TYPE_*`) of error events, or -1.
    pub operation: i32,
    /// `action` (`BJ_BLOCK_ERROR_ACTION_*`) of error events, or -1.
    pub action: i32,
    /// `node-name` of BLOCK_IO_ERROR, else NULL.
    pub node_name: *const c_char,
    /// `qom-path` of BLOCK_IO_ERROR, else NULL.
    pub qom_path: *const c_char,
    /// `nospace` of BLOCK_IO_ERROR: 0/1, or -1 when absent.
    pub nospace: i32,
    /// `reason` of BLOCK_IO_ERROR, else NULL.
    pub reason: *const c_char,
    /// The whole event as one line of QMP JSON.
    pub json: *const c_char,
}

/// The event plus the strings it points into. `repr(C)` with `c` first,
/// so a `*mut BjEvent` handed to C is also a `*mut OwnedEvent`.
#[repr(C)]
pub(crate) struct OwnedEvent {
    c: BjEvent,
    strings: Vec<CString>,
}

fn cstring(s: &str) -> CString {
    CString::new(s.replace('\0', "?")).expect("NULs were replaced")
}

fn fill_progress(
    c: &mut BjEvent,
    p: &crate::events::JobProgressData,
    keep: &mut dyn FnMut(&str) -> *const c_char,
) {
    c.job_type = p.job_type.index();
    c.device = keep(&p.device);
    c.len = p.len as i64;
    c.offset = p.offset as i64;
    c.speed = p.speed as i64;
}

pub(crate) fn to_c(ev: &Event) -> Box<OwnedEvent> {
    let mut strings: Vec<CString> = Vec::new();
    let mut keep = |s: &str| -> *const c_char {
        let c = cstring(s);
        // The CString's heap buffer does not move when the CString itself
        // moves into the Vec, so the pointer stays valid.
        let p = c.as_ptr();
        strings.push(c);
        p
    };
    let null = std::ptr::null();
    let mut c = BjEvent {
        kind: -1,
        name: null,
        seq: ev.seq,
        timestamp_seconds: ev.timestamp.seconds,
        timestamp_microseconds: ev.timestamp.microseconds,
        id: null,
        device: null,
        job_type: -1,
        status: -1,
        len: -1,
        offset: -1,
        speed: -1,
        error: null,
        operation: -1,
        action: -1,
        node_name: null,
        qom_path: null,
        nospace: -1,
        reason: null,
        json: null,
    };
    c.name = keep(ev.name());
    c.json = keep(&ev.to_qmp_json());
    match &ev.data {
        EventData::JobStatusChange { id, status } => {
            c.kind = BJ_EVENT_JOB_STATUS_CHANGE;
            c.id = keep(id);
            c.status = status.index();
        }
        EventData::BlockJobReady(p) => {
            c.kind = BJ_EVENT_BLOCK_JOB_READY;
            fill_progress(&mut c, p, &mut keep);
        }
        EventData::BlockJobPending { job_type, id } => {
            c.kind = BJ_EVENT_BLOCK_JOB_PENDING;
            c.job_type = job_type.index();
            c.id = keep(id);
        }
        EventData::BlockJobCompleted { progress: p, error } => {
            c.kind = BJ_EVENT_BLOCK_JOB_COMPLETED;
            fill_progress(&mut c, p, &mut keep);
            if let Some(e) = error {
                c.error = keep(e);
            }
        }
        EventData::BlockJobCancelled(p) => {
            c.kind = BJ_EVENT_BLOCK_JOB_CANCELLED;
            fill_progress(&mut c, p, &mut keep);
        }
        EventData::BlockJobError {
            device,
            operation,
            action,
        } => {
            c.kind = BJ_EVENT_BLOCK_JOB_ERROR;
            c.device = keep(device);
            c.operation = operation.index();
            c.action = action.index();
        }
        EventData::BlockIoError {
            qom_path,
            device,
            node_name,
            operation,
            action,
            nospace,
            reason,
        } => {
            c.kind = BJ_EVENT_BLOCK_IO_ERROR;
            c.qom_path = keep(qom_path);
            c.device = keep(device);
            if let Some(n) = node_name {
                c.node_name = keep(n);
            }
            c.operation = operation.index();
            c.action = action.index();
            c.nospace = nospace.map_or(-1, i32::from);
            c.reason = keep(reason);
        }
        EventData::BlockExportDeleted { id } => {
            c.kind = BJ_EVENT_BLOCK_EXPORT_DELETED;
            c.id = keep(id);
        }
    }
    Box::new(OwnedEvent { c, strings })
}

/// Take the next queued event, or NULL when the queue is empty (or not
/// enabled). Free it with `bj_event_free`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bj_event_next(ctx: *mut BjContext) -> *mut BjEvent {
    ffi_void(std::ptr::null_mut(), || {
        // SAFETY: NULL or live context.
        let Ok(c) = (unsafe { ctx_arg(ctx) }) else {
            return std::ptr::null_mut();
        };
        let q = c.queue();
        match q.as_ref().and_then(|q| q.sub.try_next()) {
            Some(ev) => Box::into_raw(to_c(&ev)) as *mut BjEvent,
            None => std::ptr::null_mut(),
        }
    })
}

/// Free an event from `bj_event_next` and set `*evp` to NULL.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bj_event_free(evp: *mut *mut BjEvent) {
    ffi_void((), || {
        if evp.is_null() {
            return;
        }
        // SAFETY: non-NULL pointer to the caller's `BjEvent *`.
        let slot = unsafe { &mut *evp };
        if !slot.is_null() {
            // SAFETY: queued events come from Box::into_raw of an
            // OwnedEvent whose first field is the BjEvent.
            drop(unsafe { Box::from_raw(*slot as *mut OwnedEvent) });
            *slot = std::ptr::null_mut();
        }
    })
}

/// An event handler: called for each event on the context's event thread.
pub type BjEventFn = Option<unsafe extern "C" fn(ev: *const BjEvent, opaque: *mut c_void)>;
/// Releases a handler's opaque data.
pub type BjDestroyFn = Option<unsafe extern "C" fn(opaque: *mut c_void)>;

struct CHandler {
    f: unsafe extern "C" fn(*const BjEvent, *mut c_void),
    opaque: *mut c_void,
    destroy: BjDestroyFn,
}

// SAFETY: the host registers `opaque` for use on the library's event
// thread and in `destroy`; that is the documented contract of
// bj_event_add_handler.
unsafe impl Send for CHandler {}
// SAFETY: the handler is only called from the single event thread; shared
// references never call it concurrently.
unsafe impl Sync for CHandler {}

impl Drop for CHandler {
    fn drop(&mut self) {
        if let Some(d) = self.destroy {
            // SAFETY: the host's destroy function, called exactly once, when
            // the handler can no longer run.
            unsafe { d(self.opaque) }
        }
    }
}

/// Call `fn(ev, opaque)` for every event from now on, one at a time, in
/// order, on the context's event thread (never inside your own call into
/// the library, never under a library lock). The handler may call any
/// `bj_` function except those that wait for events or jobs
/// (`bj_event_flush`, `bj_job_*_sync`, `bj_context_free`). `destroy` (may
/// be NULL) is called once when the handler can no longer run: after
/// `bj_event_remove_handler`, at `bj_context_free`, or at once if this call
/// fails. Returns the handler id (> 0), or 0 on error.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bj_event_add_handler(
    ctx: *mut BjContext,
    f: BjEventFn,
    opaque: *mut c_void,
    destroy: BjDestroyFn,
    errp: *mut *mut BjError,
) -> u64 {
    ffi(errp, 0, || {
        let Some(func) = f else {
            if let Some(d) = destroy {
                // SAFETY: the host's destroy, called once on failure.
                unsafe { d(opaque) };
            }
            return Err(super::null_arg("fn"));
        };
        let h = Arc::new(CHandler {
            f: func,
            opaque,
            destroy,
        });
        // SAFETY: NULL or live context.
        let c = match unsafe { ctx_arg(ctx) } {
            Ok(c) => c,
            Err(e) => {
                drop(h);
                return Err(e);
            }
        };
        let handler = h.clone();
        let id = c.ctx.add_event_handler(Arc::new(move |ev: &Event| {
            let owned = to_c(ev);
            // SAFETY: the host's handler with its own opaque; the event
            // outlives the call.
            unsafe { (handler.f)(&owned.c, handler.opaque) };
        }))?;
        drop(h);
        Ok(id)
    })
}

/// Remove a handler. From any thread but the event thread, it is
/// guaranteed not to be running when this returns.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bj_event_remove_handler(
    ctx: *mut BjContext,
    id: u64,
    errp: *mut *mut BjError,
) -> bool {
    ffi(errp, false, || {
        // SAFETY: NULL or live context.
        let c = unsafe { ctx_arg(ctx) }?;
        c.ctx.remove_event_handler(id)?;
        Ok(true)
    })
}

/// Wait until every event emitted so far has been passed to all handlers.
/// Refused inside a handler.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bj_event_flush(ctx: *mut BjContext, errp: *mut *mut BjError) -> bool {
    ffi(errp, false, || {
        // SAFETY: NULL or live context.
        let c = unsafe { ctx_arg(ctx) }?;
        c.ctx.flush_events()?;
        Ok(true)
    })
}
