//! Host-defined jobs: QEMU's `JobDriver` as a C callback table
//! ([`BjJobDriver`]), and creating block jobs and plain jobs with one.

use std::ffi::{c_char, c_void};
use std::sync::Arc;

use super::txn::{BjJobTxn, txn_arc};
use super::{BjJob, handle, job_arc, jp};
use crate::capi::context::{BjContext, ctx_arg};
use crate::capi::node::{BjNode, node_arc};
use crate::capi::{BjError, Versioned, arg_opt_str, error, ffi, null_arg, versioned};
use crate::engine::{Job, JobDriver};
use crate::error::{Error, Result};
use crate::qapi::JobType;

/// A host-defined job type: QEMU's `JobDriver` as a callback table.
/// Zero-initialise, set `size = sizeof(BjJobDriver)`, `job_type` and
/// `run`; every other callback may be NULL (QEMU's default for a missing
/// hook). `run` runs on the job's own thread; the others on whichever
/// thread issued the verb or finished the job, one at a time.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct BjJobDriver {
    /// `sizeof(BjJobDriver)`.
    pub size: u32,
    /// `BJ_JOB_TYPE_*` reported in events and queries.
    pub job_type: i32,
    /// The work. Return 0 on success, -errno on failure (optionally with
    /// an error in `*errp` for a better message). Call
    /// `bj_job_pause_point`/`bj_job_sleep_ns` often and return early when
    /// `bj_job_is_cancelled`.
    pub run: Option<
        unsafe extern "C" fn(job: *mut BjJob, opaque: *mut c_void, errp: *mut *mut BjError) -> i32,
    >,
    /// Before the transaction commits; return -errno to abort it.
    pub prepare: Option<unsafe extern "C" fn(job: *mut BjJob, opaque: *mut c_void) -> i32>,
    /// The transaction succeeded.
    pub commit: Option<unsafe extern "C" fn(job: *mut BjJob, opaque: *mut c_void)>,
    /// The transaction failed or was cancelled.
    pub abort: Option<unsafe extern "C" fn(job: *mut BjJob, opaque: *mut c_void)>,
    /// After commit or abort.
    pub clean: Option<unsafe extern "C" fn(job: *mut BjJob, opaque: *mut c_void)>,
    /// At a pause point, before pausing.
    pub pause: Option<unsafe extern "C" fn(job: *mut BjJob, opaque: *mut c_void)>,
    /// After leaving a pause point.
    pub resume: Option<unsafe extern "C" fn(job: *mut BjJob, opaque: *mut c_void)>,
    /// `complete` was requested (ready jobs); NULL: the job cannot be
    /// completed. Return 0 or -errno (with `*errp`).
    pub complete: Option<
        unsafe extern "C" fn(job: *mut BjJob, opaque: *mut c_void, errp: *mut *mut BjError) -> i32,
    >,
    /// A cancel was requested; return the effective `force`. NULL: every
    /// cancel is a forced cancel (QEMU's default).
    pub cancel:
        Option<unsafe extern "C" fn(job: *mut BjJob, force: bool, opaque: *mut c_void) -> bool>,
    /// Called once with `opaque` when the job is freed: when it has
    /// reached `null` and the last reference is gone (your last
    /// `bj_job_unref`, or the library's own if that comes later); also when
    /// creation fails (but not when `drv` is NULL or `drv->size` is wrong:
    /// such a table cannot be trusted). `bj_context_free` frees every job.
    pub free: Option<unsafe extern "C" fn(opaque: *mut c_void)>,
    /// Reserved; must be zero.
    pub reserved: [*mut c_void; 8],
}

// SAFETY: repr(C), `size: u32` first.
unsafe impl Versioned for BjJobDriver {
    const C_NAME: &'static str = "BjJobDriver";
}

struct CJob {
    t: BjJobDriver,
    job_type: JobType,
    opaque: *mut c_void,
}

// SAFETY: the host's callbacks and `opaque` are documented to run on the
// job's thread and on verb threads (one at a time); the host promises
// `opaque` tolerates that.
unsafe impl Send for CJob {}
// SAFETY: as above.
unsafe impl Sync for CJob {}

impl Drop for CJob {
    fn drop(&mut self) {
        if let Some(f) = self.t.free {
            // SAFETY: the host's free, called exactly once.
            unsafe { f(self.opaque) }
        }
    }
}

impl JobDriver for CJob {
    fn job_type(&self) -> JobType {
        self.job_type
    }

    fn run(&self, job: &Arc<Job>) -> Result<()> {
        let f = self
            .t
            .run
            .ok_or_else(|| Error::generic("Job driver has no run"))?;
        let mut err: *mut BjError = std::ptr::null_mut();
        // SAFETY: host callback with a borrowed job handle valid for the call.
        let r = unsafe { f(jp(job), self.opaque, &mut err) };
        let e = error::take(err);
        if r < 0 {
            let errno = -r;
            return Err(match e {
                Some(e) => e.with_errno(errno),
                None => Error::from_errno(errno),
            });
        }
        Ok(())
    }

    fn pause(&self, job: &Job) {
        if let Some(f) = self.t.pause {
            // SAFETY: host callback.
            unsafe { f(jp(job), self.opaque) }
        }
    }

    fn resume(&self, job: &Job) {
        if let Some(f) = self.t.resume {
            // SAFETY: host callback.
            unsafe { f(jp(job), self.opaque) }
        }
    }

    fn supports_complete(&self) -> bool {
        self.t.complete.is_some()
    }

    fn complete(&self, job: &Job) -> Result<()> {
        let Some(f) = self.t.complete else {
            return Ok(());
        };
        let mut err: *mut BjError = std::ptr::null_mut();
        // SAFETY: host callback.
        let r = unsafe { f(jp(job), self.opaque, &mut err) };
        let e = error::take(err);
        if r < 0 {
            return Err(e.unwrap_or_else(|| Error::from_errno(-r)));
        }
        Ok(())
    }

    fn cancel(&self, job: &Job, force: bool) -> bool {
        match self.t.cancel {
            // SAFETY: host callback.
            Some(f) => unsafe { f(jp(job), force, self.opaque) },
            None => true,
        }
    }

    fn prepare(&self, job: &Job) -> Result<()> {
        match self.t.prepare {
            Some(f) => {
                // SAFETY: host callback.
                let r = unsafe { f(jp(job), self.opaque) };
                if r < 0 {
                    Err(Error::from_errno(-r))
                } else {
                    Ok(())
                }
            }
            None => Ok(()),
        }
    }

    fn commit(&self, job: &Job) {
        if let Some(f) = self.t.commit {
            // SAFETY: host callback.
            unsafe { f(jp(job), self.opaque) }
        }
    }

    fn abort(&self, job: &Job) {
        if let Some(f) = self.t.abort {
            // SAFETY: host callback.
            unsafe { f(jp(job), self.opaque) }
        }
    }

    fn clean(&self, job: &Job) {
        if let Some(f) = self.t.clean {
            // SAFETY: host callback.
            unsafe { f(jp(job), self.opaque) }
        }
    }
}

/// Build a `CJob` from the host's table; `free` runs if this fails.
///
/// # Safety
/// `drv` is NULL or points to a `BjJobDriver` of at least `size` bytes.
unsafe fn cjob(drv: *const BjJobDriver, opaque: *mut c_void) -> Result<CJob> {
    // SAFETY: NULL or a BjJobDriver of some version (the caller's contract).
    let t = *unsafe { versioned(drv, "drv") }?;
    let mut c = CJob {
        t,
        job_type: JobType::Backup,
        opaque,
    };
    // From here `c` owns `opaque`: returning an error drops it, calling free.
    let job_type = JobType::from_index(t.job_type).ok_or_else(|| {
        Error::generic(format!(
            "Invalid argument: job_type {} is not a JobType",
            t.job_type
        ))
        .with_errno(libc::EINVAL)
    })?;
    if t.run.is_none() {
        return Err(null_arg("drv->run"));
    }
    c.job_type = job_type;
    Ok(c)
}

/// Create a block job (QEMU's `block_job_create`) with a host-defined
/// driver. `job_id` NULL: the id of `node_name`'s device (the job then
/// fails with `Invalid job ID ''` if the node has none), unless
/// `BJ_JOB_INTERNAL`. `node_name` (may be NULL) is attached: draining it
/// pauses the job. A negative `speed` fails with QEMU's message after
/// emitting `created` and `null`. `flags`: `BJ_JOB_*`. `txn` may be NULL.
/// Returns a new reference; the job stays `created` until `bj_job_start`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bj_block_job_create(
    ctx: *mut BjContext,
    job_id: *const c_char,
    drv: *const BjJobDriver,
    txn: *mut BjJobTxn,
    node_name: *const c_char,
    speed: i64,
    flags: i32,
    opaque: *mut c_void,
    errp: *mut *mut BjError,
) -> *mut BjJob {
    ffi(errp, std::ptr::null_mut(), || {
        // SAFETY: as documented for each argument.
        let d = unsafe { cjob(drv, opaque) }?;
        // SAFETY: NULL or live context / strings / txn.
        let c = unsafe { ctx_arg(ctx) }?;
        // SAFETY: as above.
        let id = unsafe { arg_opt_str(job_id, "job_id") }?;
        // SAFETY: as above.
        let node = unsafe { arg_opt_str(node_name, "node_name") }?;
        let flags = u32::try_from(flags).map_err(|_| Error::generic("Invalid job flags"))?;
        // SAFETY: as above.
        let txn = unsafe { txn_arc(txn) };
        let job = c
            .ctx
            .block_job_create(id, node, Box::new(d), speed, flags, txn)?;
        Ok(handle(job))
    })
}

/// Create a job that is not a block job (QEMU's `job_create`): no
/// `BLOCK_JOB_*` events, no I/O status, not in `query-block-jobs`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bj_job_create(
    ctx: *mut BjContext,
    job_id: *const c_char,
    drv: *const BjJobDriver,
    txn: *mut BjJobTxn,
    flags: i32,
    opaque: *mut c_void,
    errp: *mut *mut BjError,
) -> *mut BjJob {
    ffi(errp, std::ptr::null_mut(), || {
        // SAFETY: as documented for each argument.
        let d = unsafe { cjob(drv, opaque) }?;
        // SAFETY: NULL or live context / strings / txn.
        let c = unsafe { ctx_arg(ctx) }?;
        // SAFETY: as above.
        let id = unsafe { arg_opt_str(job_id, "job_id") }?;
        let flags = u32::try_from(flags).map_err(|_| Error::generic("Invalid job flags"))?;
        // SAFETY: as above.
        let txn = unsafe { txn_arc(txn) };
        Ok(handle(c.ctx.job_create(id, Box::new(d), flags, txn)?))
    })
}

/// Attach another node the job uses (QEMU's `block_job_add_bdrv`), so that
/// draining it pauses the job and deleting it is refused.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bj_block_job_add_bdrv(
    job: *mut BjJob,
    node: *mut BjNode,
    errp: *mut *mut BjError,
) -> bool {
    ffi(errp, false, || {
        // SAFETY: NULL or live handles.
        let j = unsafe { job_arc(job) }?;
        // SAFETY: as above.
        let n = unsafe { node_arc(node) }?;
        crate::block_jobs::block_job::add_node(
            &j,
            &n,
            crate::block::UserKind::Backend,
            crate::block::perm::Perms::NONE,
        );
        Ok(true)
    })
}
