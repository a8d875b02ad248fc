//! `BjContext`: the C handle of a [`Context`], plus the host's event queue.

use crate::locks::Mutex;
use std::sync::Arc;

use nix::sys::eventfd::{EfdFlags, EventFd};

use super::{BjError, arg_ref, ffi, ffi_void};
use crate::context::Context;
use crate::error::{Error, Result};
use crate::events::{Notify, Subscription};

/// Writes the host's eventfd after each queued event.
pub(crate) struct FdNotify(pub(crate) EventFd);

impl Notify for FdNotify {
    fn notify(&self) {
        // The counter saturates far beyond anything we write; a failed
        // write can only be EAGAIN at the maximum, when it is readable
        // anyway.
        let _ = self.0.write(1);
    }
}

pub(crate) struct HostQueue {
    pub(crate) sub: Subscription,
    pub(crate) fd: Arc<FdNotify>,
}

/// A context (opaque). Its QMP servers share it: their threads use it
/// until the server is freed.
pub struct BjContext {
    pub(crate) ctx: Arc<Context>,
    pub(crate) queue: Mutex<Option<HostQueue>>,
}

impl BjContext {
    pub(crate) fn queue(&self) -> crate::locks::MutexGuard<'_, Option<HostQueue>> {
        self.queue.lock()
    }
}

/// # Safety
/// `p` is NULL or a live context.
pub(crate) unsafe fn ctx_arg<'a>(p: *const BjContext) -> Result<&'a BjContext> {
    // SAFETY: forwarded contract.
    unsafe { arg_ref(p, "ctx") }
}

/// Create a context: an empty graph, no jobs, no event consumers.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bj_context_new(errp: *mut *mut BjError) -> *mut BjContext {
    ffi(errp, std::ptr::null_mut(), || {
        Ok(Box::into_raw(Box::new(BjContext {
            ctx: Arc::new(Context::new()),
            queue: Mutex::new(None),
        })))
    })
}

/// Free a context: force-cancel every job and wait for it, deliver the
/// remaining events to handlers, stop the event thread, close the queue's
/// eventfd, release every node. Sets `*ctxp` to NULL. Must not be called
/// from a job callback or an event handler. Free the context's QMP
/// servers (`bj_qmp_server_free`) first: a server still running keeps
/// the context's memory alive and its clients keep using it.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bj_context_free(ctxp: *mut *mut BjContext) {
    ffi_void((), || {
        if ctxp.is_null() {
            return;
        }
        // SAFETY: non-NULL pointer to the caller's handle variable.
        let slot = unsafe { &mut *ctxp };
        if slot.is_null() {
            return;
        }
        // SAFETY: a context pointer only comes from bj_context_new.
        let b = unsafe { Box::from_raw(*slot) };
        *slot = std::ptr::null_mut();
        b.ctx.shutdown();
        drop(b);
    })
}

/// Enable the event queue and return its eventfd (non-blocking, CLOEXEC;
/// owned by the context). Events emitted from now on are queued, without
/// limit, until taken with `bj_event_next`. Calling it again returns the
/// same fd. Protocol: when the fd is readable, call `bj_event_queue_ack`,
/// then `bj_event_next` until it returns NULL. Returns -errno on failure.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bj_event_queue_enable(
    ctx: *mut BjContext,
    errp: *mut *mut BjError,
) -> i32 {
    ffi(errp, -libc::EINVAL, || {
        // SAFETY: NULL or live context.
        let c = unsafe { ctx_arg(ctx) }?;
        let mut q = c.queue();
        if let Some(q) = q.as_ref() {
            return Ok(fd_of(&q.fd));
        }
        let fd = EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
            .map_err(|e| Error::from(e).prepend("Cannot create eventfd: "))?;
        let fd = Arc::new(FdNotify(fd));
        let sub = c.ctx.bus().subscribe_with(Some(fd.clone()));
        let raw = fd_of(&fd);
        *q = Some(HostQueue { sub, fd });
        Ok(raw)
    })
}

fn fd_of(fd: &FdNotify) -> i32 {
    use std::os::fd::{AsFd, AsRawFd};
    fd.0.as_fd().as_raw_fd()
}

/// The queue's eventfd, or -1 when the queue is not enabled.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bj_event_queue_get_fd(ctx: *mut BjContext) -> i32 {
    ffi_void(-1, || {
        // SAFETY: NULL or live context.
        let Ok(c) = (unsafe { ctx_arg(ctx) }) else {
            return -1;
        };
        c.queue().as_ref().map_or(-1, |q| fd_of(&q.fd))
    })
}

/// Reset the eventfd's counter (read it). Call before draining the queue.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bj_event_queue_ack(ctx: *mut BjContext) {
    ffi_void((), || {
        // SAFETY: NULL or live context.
        if let Ok(c) = unsafe { ctx_arg(ctx) }
            && let Some(q) = c.queue().as_ref()
        {
            let _ = q.fd.0.read();
        }
    })
}

/// Stop queueing events; queued events are dropped and the fd closed.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bj_event_queue_disable(ctx: *mut BjContext) {
    ffi_void((), || {
        // SAFETY: NULL or live context.
        if let Ok(c) = unsafe { ctx_arg(ctx) } {
            let q = c.queue().take();
            drop(q);
        }
    })
}

/// Wait until every request in flight anywhere is done (QEMU's
/// `bdrv_drain_all`); jobs pause at their next pause point meanwhile and
/// go on afterwards.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bj_drain_all(ctx: *mut BjContext) {
    ffi_void((), || {
        // SAFETY: NULL or live context.
        if let Ok(c) = unsafe { ctx_arg(ctx) } {
            c.ctx.drain_all();
        }
    })
}

/// Begin a drained section over everything (VM stop): guest requests
/// wait at their backends, jobs pause; returns when nothing is in flight.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bj_drain_all_begin(ctx: *mut BjContext) {
    ffi_void((), || {
        // SAFETY: NULL or live context.
        if let Ok(c) = unsafe { ctx_arg(ctx) } {
            c.ctx.drain_all_begin();
        }
    })
}

/// End the innermost `bj_drain_all_begin`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bj_drain_all_end(ctx: *mut BjContext, errp: *mut *mut BjError) -> bool {
    ffi(errp, false, || {
        // SAFETY: NULL or live context.
        let c = unsafe { ctx_arg(ctx) }?;
        c.ctx.drain_all_end()?;
        Ok(true)
    })
}
