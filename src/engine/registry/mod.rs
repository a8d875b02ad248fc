//! The engine behind [`Job`]: the registry of job states, the two locks,
//! and the one place a status changes and a verb is admitted. The rest is
//! split by concern: `create` (creation, start, the job thread), `thread`
//! (pause points, sleeps, helpers for `run`), `completion` (exit,
//! transactions, dismiss, cancel), `verbs`, `query`, `drain` (internal
//! pauses and shutdown). See the module doc of `engine` for the locking
//! rules.

mod completion;
mod create;
mod drain;
mod query;
mod thread;
mod verbs;

use crate::locks::{Condvar, Mutex, MutexGuard};
use std::collections::HashMap;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::ReentrantMutex;

use super::backoff::Backoff;
use super::ratelimit::{BLOCK_JOB_SLICE, RateLimit};
use super::tables::{is_completed, is_ready, transition_allowed, verb_allowed};
use super::{
    JOB_INTERNAL, JOB_MANUAL_DISMISS, JOB_MANUAL_FINALIZE, Job, JobChange, JobDriver, JobOptions,
    Outcome, Progress, check_flags,
};
use crate::error::{Error, ErrorClass, Result, strerror};
use crate::events::{EventBus, EventData, JobProgressData};
use crate::qapi::{
    BlockDeviceIoStatus, BlockErrorAction, BlockJobInfo, BlockdevOnError, IoOperationType, JobInfo,
    JobStatus, JobVerb,
};
use crate::sync::{AtomicBool, Ordering};

type Guard<'a> = MutexGuard<'a, Registry>;

/// A job's mutable state; lives in the registry behind its mutex.
pub(crate) struct JobState {
    pub(crate) job: Arc<Job>,
    pub(crate) status: JobStatus,
    /// Outstanding pause requests from any source (user, drain, error stop).
    pub(crate) pause_count: u32,
    /// One of the pause requests is the user's (or an error `stop`).
    pub(crate) user_paused: bool,
    /// The job thread sits in a pause point.
    pub(crate) paused: bool,
    /// The job thread is running (not sleeping, yielded or paused).
    pub(crate) busy: bool,
    /// A wake-up for the job thread is pending (QEMU's re-entry).
    pub(crate) kicked: bool,
    /// The job thread sleeps with a deadline (QEMU's sleep timer).
    pub(crate) timer_pending: bool,
    pub(crate) cancelled: bool,
    pub(crate) force_cancel: bool,
    pub(crate) started: bool,
    /// `run` returned; the exit waits to be processed.
    pub(crate) deferred: bool,
    pub(crate) exit_done: bool,
    pub(crate) ret: i32,
    pub(crate) err: Option<Error>,
    pub(crate) txn: Option<u64>,
    pub(crate) speed: u64,
    pub(crate) limit: RateLimit,
    pub(crate) iostatus: BlockDeviceIoStatus,
    /// The spacing of `ignore` retries.
    pub(crate) backoff: Backoff,
    pub(crate) thread: Option<JoinHandle<()>>,
}

struct Txn {
    /// Members, newest first (QEMU inserts at the head).
    jobs: Vec<u64>,
    aborting: bool,
    /// External handles ([`JobTxn`]) still alive.
    handles: usize,
}

/// All jobs of one context.
#[derive(Default)]
pub(crate) struct Registry {
    states: HashMap<u64, JobState>,
    /// Live jobs, newest first (QEMU's job list order).
    order: Vec<u64>,
    txns: HashMap<u64, Txn>,
    next_key: u64,
    /// Threads of jobs that reached `null`, joined later.
    zombies: Vec<(u64, JoinHandle<()>)>,
    /// Jobs that reached `null`, dropped once the lock is released.
    graveyard: Vec<Arc<Job>>,
}

/// A transaction handle (QEMU's `JobTxn`): jobs created with it succeed or
/// fail together.
pub struct JobTxn {
    key: u64,
    engine: Arc<Engine>,
}

impl JobTxn {
    /// A new, empty transaction.
    pub fn new(engine: &Arc<Engine>) -> Arc<JobTxn> {
        let mut g = engine.lock();
        g.next_key += 1;
        let key = g.next_key;
        g.txns.insert(
            key,
            Txn {
                jobs: Vec::new(),
                aborting: false,
                handles: 1,
            },
        );
        Arc::new(JobTxn {
            key,
            engine: engine.clone(),
        })
    }
}

impl Drop for JobTxn {
    fn drop(&mut self) {
        let mut g = self.engine.lock();
        if let Some(t) = g.txns.get_mut(&self.key) {
            t.handles -= 1;
            if t.handles == 0 && t.jobs.is_empty() {
                g.txns.remove(&self.key);
            }
        }
    }
}

/// The job engine of one context.
pub struct Engine {
    control: ReentrantMutex<()>,
    reg: Mutex<Registry>,
    /// Signalled on every status, busy or exit change; waiters re-check.
    changed: Condvar,
    bus: Arc<EventBus>,
}

impl Engine {
    /// An engine that emits on `bus`.
    pub fn new(bus: Arc<EventBus>) -> Arc<Engine> {
        Arc::new(Engine {
            control: ReentrantMutex::new(()),
            reg: Mutex::new(Registry::default()),
            changed: Condvar::new(),
            bus,
        })
    }

    /// The event bus.
    pub fn bus(&self) -> &Arc<EventBus> {
        &self.bus
    }

    fn lock(&self) -> Guard<'_> {
        self.reg.lock()
    }

    fn wait<'a>(&self, cv: &Condvar, mut g: Guard<'a>) -> Guard<'a> {
        g = cv.wait(g);
        g
    }

    fn wait_timeout<'a>(&self, cv: &Condvar, mut g: Guard<'a>, d: Duration) -> Guard<'a> {
        g = cv.wait_timeout(g, d);
        g
    }

    /// Run `f` on the job's state; `None` once the job is gone (`null`).
    pub(crate) fn with_state<T>(&self, job: &Job, f: impl FnOnce(&mut JobState) -> T) -> Option<T> {
        let mut g = self.lock();
        g.states.get_mut(&job.key).map(f)
    }

    /// The only place a status changes (QEMU's `job_state_transition`).
    fn transition(&self, g: &mut Registry, key: u64, to: JobStatus) {
        let Some(st) = g.states.get_mut(&key) else {
            return;
        };
        let from = st.status;
        debug_assert!(
            transition_allowed(from, to),
            "illegal job transition {from} -> {to}"
        );
        st.status = to;
        if from != to
            && let Some(id) = &st.job.id
        {
            self.bus.emit(EventData::JobStatusChange {
                id: id.clone(),
                status: to,
            });
        }
        self.changed.notify_all();
    }

    /// The only place a verb is admitted (QEMU's `job_apply_verb`).
    fn apply_verb(g: &Registry, job: &Job, verb: JobVerb) -> Result<()> {
        let status = g
            .states
            .get(&job.key)
            .map(|s| s.status)
            .unwrap_or(JobStatus::Null);
        if verb_allowed(verb, status) {
            Ok(())
        } else {
            Err(Error::generic(format!(
                "Job '{}' in state '{}' cannot accept command verb '{}'",
                job.id_str(),
                status,
                verb
            ))
            .with_errno(libc::EPERM))
        }
    }

    fn progress_data(st: &JobState) -> Option<JobProgressData> {
        let job = &st.job;
        if !job.block {
            return None;
        }
        let id = job.id.as_ref()?;
        let p = job.progress();
        Some(JobProgressData {
            job_type: job.job_type,
            device: id.clone(),
            len: p.total,
            offset: p.current,
            speed: st.speed,
        })
    }

    fn status_of(g: &Registry, key: u64) -> JobStatus {
        g.states.get(&key).map_or(JobStatus::Null, |s| s.status)
    }

    /// Release the registry. Jobs that reached `null` meanwhile stay in the
    /// graveyard until the outermost [`Control`] is released: dropping a job
    /// may run host code (its driver's destructor), which must never run
    /// under a library lock.
    fn unlock(&self, g: Guard<'_>) {
        drop(g);
    }

    /// Take the control lock (QEMU's main-loop serialisation).
    fn control(&self) -> Control<'_> {
        Control {
            engine: self,
            guard: Some(self.control.lock()),
        }
    }
}

/// A held control lock. When the outermost one on this thread is
/// released, the jobs that reached `null` are dropped, outside every lock.
struct Control<'a> {
    engine: &'a Engine,
    guard: Option<parking_lot::ReentrantMutexGuard<'a, ()>>,
}

impl Drop for Control<'_> {
    fn drop(&mut self) {
        drop(self.guard.take());
        if !self.engine.control.is_owned_by_current_thread() {
            let dead = std::mem::take(&mut self.engine.lock().graveyard);
            drop(dead);
        }
    }
}

thread_local! {
    /// The key of the job whose thread this is (0 elsewhere). Avoids
    /// `std::thread::current()`, whose lazily created handle of the main
    /// thread is never freed.
    static CURRENT_JOB: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// Run a driver hook, turning a panic into an error instead of unwinding
/// through the engine's bookkeeping.
fn guarded<T>(f: impl FnOnce() -> T) -> Result<T> {
    catch_unwind(AssertUnwindSafe(f)).map_err(|p| Error::generic(panic_text(&p)))
}

pub(crate) fn panic_text(p: &Box<dyn std::any::Any + Send>) -> String {
    let msg = if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "panic".to_string()
    };
    format!("internal error: {msg}")
}
