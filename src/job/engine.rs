//! The engine behind [`Job`]: registry, status transitions, verbs, pause
//! points, completion and transactions. See the module doc of `job` for
//! the locking rules; every function here says which locks it expects.

use std::collections::HashMap;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::ReentrantMutex;

use super::ratelimit::{BLOCK_JOB_SLICE, RateLimit};
use super::tables::{is_completed, is_ready, transition_allowed, verb_allowed};
use super::{
    JOB_INTERNAL, JOB_MANUAL_DISMISS, JOB_MANUAL_FINALIZE, Job, JobDriver, JobOptions, Outcome,
    Progress, check_flags, id_wellformed,
};
use crate::error::{Error, ErrorClass, Result, strerror};
use crate::events::{EventBus, EventData, JobProgressData};
use crate::qapi::{
    BlockDeviceIoStatus, BlockErrorAction, BlockJobInfo, BlockdevOnError, IoOperationType, JobInfo,
    JobStatus, JobVerb,
};

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
        // A panic with this lock held is a bug in the engine; carrying on
        // with the state as it is beats poisoning every later call (which
        // would turn one bug into a crash of the host).
        self.reg.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn wait<'a>(&self, cv: &Condvar, g: Guard<'a>) -> Guard<'a> {
        cv.wait(g).unwrap_or_else(|p| p.into_inner())
    }

    fn wait_timeout<'a>(&self, cv: &Condvar, g: Guard<'a>, d: Duration) -> Guard<'a> {
        match cv.wait_timeout(g, d) {
            Ok((g, _)) => g,
            Err(p) => p.into_inner().0,
        }
    }

    /// Run `f` on the job's state; `None` once the job is gone (`null`).
    pub(crate) fn with_state<T>(&self, job: &Job, f: impl FnOnce(&mut JobState) -> T) -> Option<T> {
        let mut g = self.lock();
        g.states.get_mut(&job.key).map(f)
    }

    // ---- creation -----------------------------------------------------------

    /// Create a job (QEMU's `job_create` + `block_job_create`'s speed step).
    /// Emits `JOB_STATUS_CHANGE created`; on a bad speed the job fails early
    /// (`created` → `null`), as QEMU does.
    pub fn create(
        self: &Arc<Self>,
        opts: JobOptions,
        driver: Box<dyn JobDriver>,
    ) -> Result<Arc<Job>> {
        check_flags(opts.flags)?;
        let internal = opts.flags & JOB_INTERNAL != 0;
        let _c = self.control();
        let mut g = self.lock();
        self.reap(&mut g);
        match &opts.id {
            Some(id) => {
                if internal {
                    return Err(Error::generic("Cannot specify job ID for internal job"));
                }
                if !id_wellformed(id) {
                    return Err(Error::generic(format!("Invalid job ID '{id}'")));
                }
                if Self::find_locked(&g, id).is_some() {
                    return Err(Error::generic(format!("Job ID '{id}' already in use")));
                }
            }
            None if !internal => return Err(Error::generic("An explicit job ID is required")),
            None => {}
        }
        if let Some(t) = &opts.txn {
            match g.txns.get(&t.key) {
                Some(txn) if Arc::ptr_eq(&t.engine, self) => {
                    if txn.aborting {
                        // Its members were cancelled together; a new job
                        // cannot join a group that has already failed.
                        return Err(Error::generic("Transaction has been aborted"));
                    }
                }
                _ => return Err(Error::generic("Transaction belongs to another context")),
            }
        }
        g.next_key += 1;
        let key = g.next_key;
        let job = Arc::new(Job {
            key,
            id: opts.id.clone(),
            job_type: driver.job_type(),
            block: opts.block,
            auto_finalize: opts.flags & JOB_MANUAL_FINALIZE == 0,
            auto_dismiss: opts.flags & JOB_MANUAL_DISMISS == 0,
            driver,
            engine: self.clone(),
            wake: Condvar::new(),
            progress: parking_lot::Mutex::new(Progress::default()),
            on_free: parking_lot::Mutex::new(Vec::new()),
            outcome: parking_lot::Mutex::new(None),
        });
        let txn = match &opts.txn {
            Some(t) => t.key,
            None => {
                g.next_key += 1;
                let k = g.next_key;
                g.txns.insert(
                    k,
                    Txn {
                        jobs: Vec::new(),
                        aborting: false,
                        handles: 0,
                    },
                );
                k
            }
        };
        g.states.insert(
            key,
            JobState {
                job: job.clone(),
                status: JobStatus::Undefined,
                pause_count: 1,
                user_paused: false,
                paused: true,
                busy: false,
                kicked: false,
                timer_pending: false,
                cancelled: false,
                force_cancel: false,
                started: false,
                deferred: false,
                exit_done: false,
                ret: 0,
                err: None,
                txn: Some(txn),
                speed: 0,
                limit: RateLimit::default(),
                iostatus: BlockDeviceIoStatus::Ok,
                thread: None,
            },
        );
        g.order.insert(0, key);
        if let Some(t) = g.txns.get_mut(&txn) {
            t.jobs.insert(0, key);
        }
        self.transition(&mut g, key, JobStatus::Created);
        if opts.block {
            let res;
            (g, res) = self.set_speed_inner(g, &job, opts.speed);
            if let Err(e) = res {
                // QEMU's job_early_fail: created → null, then the error.
                self.do_dismiss(&mut g, key);
                self.unlock(g);
                return Err(e);
            }
        }
        self.unlock(g);
        Ok(job)
    }

    // ---- lookup and queries -------------------------------------------------

    fn find_locked(g: &Registry, id: &str) -> Option<Arc<Job>> {
        g.order
            .iter()
            .filter_map(|k| g.states.get(k))
            .find(|s| s.job.id.as_deref() == Some(id))
            .map(|s| s.job.clone())
    }

    /// The live job with this id.
    pub fn find(&self, id: &str) -> Option<Arc<Job>> {
        Self::find_locked(&self.lock(), id)
    }

    /// QMP's `block-job-*` lookup: `Block job 'ID' not found`
    /// (DeviceNotActive) unless a block job has this id.
    pub fn find_block_job(&self, id: &str) -> Result<Arc<Job>> {
        match self.find(id) {
            Some(j) if j.block => Ok(j),
            _ => Err(Error::with_class(
                ErrorClass::DeviceNotActive,
                format!("Block job '{id}' not found"),
            )),
        }
    }

    /// QMP's `job-*` lookup: `Job not found`.
    pub fn find_job(&self, id: &str) -> Result<Arc<Job>> {
        self.find(id).ok_or_else(|| Error::generic("Job not found"))
    }

    /// Every live job, newest first (internal ones included).
    pub fn jobs(&self) -> Vec<Arc<Job>> {
        let g = self.lock();
        g.order
            .iter()
            .filter_map(|k| g.states.get(k))
            .map(|s| s.job.clone())
            .collect()
    }

    /// The job's status; `null` once it is gone.
    pub fn status(&self, job: &Job) -> JobStatus {
        self.with_state(job, |s| s.status)
            .unwrap_or(JobStatus::Null)
    }

    fn block_info(st: &JobState) -> BlockJobInfo {
        let job = &st.job;
        let p = job.progress();
        BlockJobInfo {
            job_type: job.job_type,
            device: job.id_str().to_string(),
            len: p.total,
            offset: p.current,
            busy: st.busy,
            paused: st.pause_count > 0,
            speed: st.speed,
            io_status: st.iostatus,
            ready: is_ready(st.status),
            status: st.status,
            auto_finalize: job.auto_finalize,
            auto_dismiss: job.auto_dismiss,
            error: if st.ret != 0 {
                Some(match &st.err {
                    Some(e) => e.message().to_string(),
                    None => strerror(-st.ret),
                })
            } else {
                None
            },
            actively_synced: None,
        }
    }

    fn job_info(st: &JobState) -> JobInfo {
        let p = st.job.progress();
        JobInfo {
            id: st.job.id_str().to_string(),
            job_type: st.job.job_type,
            status: st.status,
            current_progress: p.current,
            total_progress: p.total,
            error: st.err.as_ref().map(|e| e.message().to_string()),
        }
    }

    /// `query-block-jobs` for one job.
    pub fn query_block_job(&self, job: &Job) -> Result<BlockJobInfo> {
        if job.is_internal() {
            return Err(Error::generic("Cannot query QEMU internal jobs"));
        }
        if !job.block {
            return Err(Error::generic(format!(
                "Job '{}' is not a block job",
                job.id_str()
            )));
        }
        let info = {
            let g = self.lock();
            match g.states.get(&job.key) {
                Some(st) => Self::block_info(st),
                None => {
                    return Err(Error::with_class(
                        ErrorClass::DeviceNotActive,
                        format!("Block job '{}' not found", job.id_str()),
                    ));
                }
            }
        };
        // Driver hooks never run under the registry lock.
        Ok(BlockJobInfo {
            actively_synced: job.driver.actively_synced(job),
            ..info
        })
    }

    /// `query-jobs` for one job.
    pub fn query_job(&self, job: &Job) -> Result<JobInfo> {
        if job.is_internal() {
            return Err(Error::generic("Cannot query QEMU internal jobs"));
        }
        let g = self.lock();
        match g.states.get(&job.key) {
            Some(st) => Ok(Self::job_info(st)),
            None => Err(Error::generic("Job not found")),
        }
    }

    /// `query-block-jobs`: block jobs, newest first, internal ones skipped.
    pub fn query_block_jobs(&self) -> Vec<BlockJobInfo> {
        let jobs: Vec<(BlockJobInfo, Arc<Job>)> = {
            let g = self.lock();
            g.order
                .iter()
                .filter_map(|k| g.states.get(k))
                .filter(|s| s.job.block && !s.job.is_internal())
                .map(|s| (Self::block_info(s), s.job.clone()))
                .collect()
        };
        jobs.into_iter()
            .map(|(info, job)| BlockJobInfo {
                actively_synced: job.driver.actively_synced(&job),
                ..info
            })
            .collect()
    }

    /// `query-jobs`: all jobs, newest first, internal ones skipped.
    pub fn query_jobs(&self) -> Vec<JobInfo> {
        let g = self.lock();
        g.order
            .iter()
            .filter_map(|k| g.states.get(k))
            .filter(|s| !s.job.is_internal())
            .map(Self::job_info)
            .collect()
    }

    // ---- transitions and events ---------------------------------------------

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

    // ---- waking the job thread ----------------------------------------------

    /// QEMU's `job_enter_cond`: wake the job thread unless it is running,
    /// not started, or finished; `cond` may further restrict it.
    fn enter_cond(&self, g: &mut Registry, key: u64, cond: Option<fn(&JobState) -> bool>) {
        let Some(st) = g.states.get_mut(&key) else {
            return;
        };
        if !st.started || st.deferred || st.busy {
            return;
        }
        if let Some(c) = cond
            && !c(st)
        {
            return;
        }
        st.timer_pending = false;
        st.busy = true;
        st.kicked = true;
        st.job.wake.notify_all();
        self.changed.notify_all();
    }

    /// Wake the job if it sleeps, yields or is paused.
    pub fn enter(&self, job: &Job) {
        let mut g = self.lock();
        self.enter_cond(&mut g, job.key, None);
    }

    /// On the job thread: stop being busy until kicked or until `deadline`.
    fn do_yield<'a>(&self, job: &Job, mut g: Guard<'a>, deadline: Option<Instant>) -> Guard<'a> {
        if let Some(st) = g.states.get_mut(&job.key) {
            st.busy = false;
            st.timer_pending = deadline.is_some();
        }
        self.changed.notify_all();
        loop {
            let Some(st) = g.states.get_mut(&job.key) else {
                return g;
            };
            if st.kicked {
                break;
            }
            match deadline {
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        break;
                    }
                    g = self.wait_timeout(&job.wake, g, d - now);
                }
                None => g = self.wait(&job.wake, g),
            }
        }
        if let Some(st) = g.states.get_mut(&job.key) {
            st.kicked = false;
            st.busy = true;
            st.timer_pending = false;
        }
        self.changed.notify_all();
        g
    }

    fn should_pause(st: &JobState) -> bool {
        st.pause_count > 0
    }

    /// QEMU's `job_pause_point`, on the job thread.
    pub(crate) fn pause_point(&self, job: &Job) {
        {
            let g = self.lock();
            match g.states.get(&job.key) {
                Some(st) if Self::should_pause(st) && !st.force_cancel => {}
                _ => return,
            }
        }
        job.driver.pause(job);
        let mut g = self.lock();
        let pause_now = g
            .states
            .get(&job.key)
            .is_some_and(|st| Self::should_pause(st) && !st.force_cancel);
        if pause_now {
            let status = g.states[&job.key].status;
            let to = if status == JobStatus::Ready {
                JobStatus::Standby
            } else {
                JobStatus::Paused
            };
            self.transition(&mut g, job.key, to);
            if let Some(st) = g.states.get_mut(&job.key) {
                st.paused = true;
            }
            g = self.do_yield(job, g, None);
            if let Some(st) = g.states.get_mut(&job.key) {
                st.paused = false;
            }
            self.transition(&mut g, job.key, status);
        }
        drop(g);
        job.driver.resume(job);
    }

    /// QEMU's `job_sleep_ns` (`Some`) and `job_yield` (`None`).
    pub(crate) fn sleep(&self, job: &Job, d: Option<Duration>) {
        {
            let mut g = self.lock();
            let Some(st) = g.states.get(&job.key) else {
                return;
            };
            if st.force_cancel {
                return;
            }
            if !Self::should_pause(st) {
                let deadline = d.map(|d| Instant::now() + d);
                g = self.do_yield(job, g, deadline);
            }
            drop(g);
        }
        self.pause_point(job);
    }

    // ---- start and exit -----------------------------------------------------

    /// QEMU's `job_start`: spawn the thread, `created` → `running`.
    pub fn start(self: &Arc<Self>, job: &Arc<Job>) -> Result<()> {
        let _c = self.control();
        let mut g = self.lock();
        let Some(st) = g.states.get_mut(&job.key) else {
            return Err(Error::generic(format!(
                "Job '{}' in state 'null' cannot be started",
                job.id_str()
            )));
        };
        if st.started || st.status != JobStatus::Created {
            return Err(Error::generic(format!(
                "Job '{}' has already been started",
                job.id_str()
            )));
        }
        st.started = true;
        st.pause_count -= 1;
        st.busy = true;
        st.paused = false;
        let name = format!("job:{}", job.id_str());
        let j = job.clone();
        match std::thread::Builder::new()
            .name(name)
            .spawn(move || job_thread(j))
        {
            Ok(h) => {
                st.thread = Some(h);
                self.transition(&mut g, job.key, JobStatus::Running);
                Ok(())
            }
            Err(e) => {
                // No thread: the job ends at once with the spawn error, as
                // if `run` had failed before doing anything.
                self.transition(&mut g, job.key, JobStatus::Running);
                if let Some(st) = g.states.get_mut(&job.key) {
                    st.ret = -libc::EAGAIN;
                    st.err = Some(Error::from(e).prepend("Cannot start job thread: "));
                    st.deferred = true;
                    st.exit_done = true;
                }
                let g = self.job_exit(g, job.key);
                self.unlock(g);
                Ok(())
            }
        }
    }

    /// Process every exit whose `run` is over (QEMU's pending `job_exit`
    /// bottom halves). Caller holds `control`.
    fn run_pending_exits<'a>(&'a self, mut g: Guard<'a>) -> Guard<'a> {
        loop {
            let next = g
                .order
                .iter()
                .copied()
                .find(|k| g.states.get(k).is_some_and(|s| s.deferred && !s.exit_done));
            let Some(key) = next else { return g };
            if let Some(st) = g.states.get_mut(&key) {
                st.exit_done = true;
            }
            g = self.job_exit(g, key);
        }
    }

    /// QEMU's `job_exit`. Caller holds `control`.
    fn job_exit<'a>(&'a self, mut g: Guard<'a>, key: u64) -> Guard<'a> {
        if let Some(st) = g.states.get_mut(&key) {
            // Not quiescent yet, but drain must not wait for the completion
            // callbacks (they may drain nodes themselves).
            st.busy = false;
        }
        self.changed.notify_all();
        self.job_completed(g, key)
    }

    /// QEMU's `job_update_rc`: a forced cancel becomes `ECANCELED`; any
    /// failure gets an error text and moves to `aborting`.
    fn update_rc(&self, g: &mut Registry, key: u64) {
        let Some(st) = g.states.get_mut(&key) else {
            return;
        };
        if st.ret == 0 && st.force_cancel {
            st.ret = -libc::ECANCELED;
        }
        if st.ret != 0 {
            if st.err.is_none() {
                st.err = Some(Error::from_errno(-st.ret));
            }
            self.transition(g, key, JobStatus::Aborting);
        }
    }

    /// QEMU's `job_completed`. Caller holds `control`.
    fn job_completed<'a>(&'a self, mut g: Guard<'a>, key: u64) -> Guard<'a> {
        debug_assert!(g.states.get(&key).is_some_and(|s| !is_completed(s.status)));
        self.update_rc(&mut g, key);
        let ret = g.states.get(&key).map_or(0, |s| s.ret);
        if ret != 0 {
            self.txn_abort(g, key)
        } else {
            self.txn_success(g, key)
        }
    }

    fn txn_of(g: &Registry, key: u64) -> Option<u64> {
        g.states.get(&key).and_then(|s| s.txn)
    }

    /// Members of `key`'s transaction, in list order (newest first).
    fn txn_members(g: &Registry, key: u64) -> Vec<u64> {
        Self::txn_of(g, key)
            .and_then(|t| g.txns.get(&t))
            .map(|t| t.jobs.clone())
            .unwrap_or_default()
    }

    fn status_of(g: &Registry, key: u64) -> JobStatus {
        g.states.get(&key).map_or(JobStatus::Null, |s| s.status)
    }

    /// QEMU's `job_completed_txn_success`.
    fn txn_success<'a>(&'a self, mut g: Guard<'a>, key: u64) -> Guard<'a> {
        self.transition(&mut g, key, JobStatus::Waiting);
        let members = Self::txn_members(&g, key);
        if members
            .iter()
            .any(|m| !is_completed(Self::status_of(&g, *m)))
        {
            return g;
        }
        for m in &members {
            self.transition_to_pending(&mut g, *m);
        }
        let manual = members
            .iter()
            .any(|m| g.states.get(m).is_some_and(|s| !s.job.auto_finalize));
        if !manual {
            g = self.do_finalize(g, key);
        }
        g
    }

    fn transition_to_pending(&self, g: &mut Registry, key: u64) {
        self.transition(g, key, JobStatus::Pending);
        let Some(st) = g.states.get(&key) else {
            return;
        };
        if !st.job.auto_finalize
            && st.job.block
            && let Some(id) = &st.job.id
        {
            self.bus.emit(EventData::BlockJobPending {
                job_type: st.job.job_type,
                id: id.clone(),
            });
        }
    }

    /// QEMU's `job_do_finalize`: prepare every member, then commit them
    /// all, or abort the transaction at the first failure.
    fn do_finalize<'a>(&'a self, mut g: Guard<'a>, key: u64) -> Guard<'a> {
        let mut rc = 0;
        for m in Self::txn_members(&g, key) {
            let r;
            (g, r) = self.prepare(g, m);
            if r != 0 {
                rc = r;
                break;
            }
        }
        if rc != 0 {
            return self.txn_abort(g, key);
        }
        for m in Self::txn_members(&g, key) {
            g = self.finalize_single(g, m);
        }
        g
    }

    fn prepare<'a>(&'a self, g: Guard<'a>, key: u64) -> (Guard<'a>, i32) {
        let Some(st) = g.states.get(&key) else {
            return (g, 0);
        };
        if st.ret != 0 {
            let r = st.ret;
            return (g, r);
        }
        let job = st.job.clone();
        drop(g);
        let res = guarded(|| job.driver.prepare(&job)).and_then(|r| r);
        let mut g = self.lock();
        if let Err(e) = res {
            if let Some(st) = g.states.get_mut(&key) {
                st.ret = -e.errno().unwrap_or(libc::EIO);
                st.err = Some(e);
            }
            self.update_rc(&mut g, key);
        }
        let r = g.states.get(&key).map_or(0, |s| s.ret);
        (g, r)
    }

    /// QEMU's `job_finalize_single`: commit or abort, clean, the final
    /// event, leave the transaction, conclude.
    fn finalize_single<'a>(&'a self, mut g: Guard<'a>, key: u64) -> Guard<'a> {
        if !g.states.contains_key(&key) {
            self.txn_del(&mut g, key);
            return g;
        }
        debug_assert!(is_completed(Self::status_of(&g, key)));
        self.update_rc(&mut g, key);
        let (job, ret) = {
            let st = &g.states[&key];
            (st.job.clone(), st.ret)
        };
        drop(g);
        let _ = guarded(|| {
            if ret == 0 {
                job.driver.commit(&job)
            } else {
                job.driver.abort(&job)
            }
        });
        let _ = guarded(|| job.driver.clean(&job));
        let mut g = self.lock();
        if let Some(st) = g.states.get(&key)
            && st.started
            && let Some(p) = Self::progress_data(st)
        {
            if st.force_cancel {
                self.bus.emit(EventData::BlockJobCancelled(p));
            } else {
                let error = if st.ret < 0 {
                    Some(
                        st.err
                            .as_ref()
                            .map_or_else(|| strerror(-st.ret), |e| e.message().to_string()),
                    )
                } else {
                    None
                };
                self.bus
                    .emit(EventData::BlockJobCompleted { progress: p, error });
            }
        }
        self.txn_del(&mut g, key);
        self.conclude(&mut g, key);
        g
    }

    /// QEMU's `job_completed_txn_abort`: the first failing member cancels
    /// the others (forced), waits for each and finalises all of them.
    fn txn_abort<'a>(&'a self, mut g: Guard<'a>, key: u64) -> Guard<'a> {
        let Some(txn) = Self::txn_of(&g, key) else {
            return g;
        };
        match g.txns.get_mut(&txn) {
            Some(t) if !t.aborting => {
                t.aborting = true;
                // Hold the transaction while its members leave it.
                t.handles += 1;
            }
            _ => return g,
        }
        for other in Self::txn_members(&g, key) {
            if other != key {
                g = self.cancel_async(g, other, true);
            }
        }
        loop {
            let first = g.txns.get(&txn).and_then(|t| t.jobs.first().copied());
            let Some(other) = first else { break };
            if !is_completed(Self::status_of(&g, other)) {
                g = self.wait_completed_locked(g, other);
            }
            g = self.finalize_single(g, other);
            // finalize_single always removes `other` from the transaction,
            // so this loop ends.
        }
        if let Some(t) = g.txns.get_mut(&txn) {
            t.handles -= 1;
            if t.handles == 0 && t.jobs.is_empty() {
                g.txns.remove(&txn);
            }
        }
        g
    }

    fn txn_del(&self, g: &mut Registry, key: u64) {
        let txn = g.states.get_mut(&key).and_then(|s| s.txn.take());
        let txn = match txn {
            Some(t) => t,
            // A job without state left its transaction already, unless it
            // vanished mid-way: make sure no list still names it.
            None => match g.txns.iter().find(|(_, t)| t.jobs.contains(&key)) {
                Some((k, _)) => *k,
                None => return,
            },
        };
        if let Some(t) = g.txns.get_mut(&txn) {
            t.jobs.retain(|k| *k != key);
            if t.jobs.is_empty() && t.handles == 0 {
                g.txns.remove(&txn);
            }
        }
    }

    fn conclude(&self, g: &mut Registry, key: u64) {
        self.transition(g, key, JobStatus::Concluded);
        let Some(st) = g.states.get(&key) else {
            return;
        };
        if st.job.auto_dismiss || !st.started {
            self.do_dismiss(g, key);
        }
    }

    /// QEMU's `job_do_dismiss` and the final unref: the job goes to `null`
    /// and leaves the registry. Its `on_free` hooks run here (registry lock
    /// held: they may only take leaf locks); the `Job` itself is dropped
    /// later, outside every lock, because dropping it may run host code.
    fn do_dismiss(&self, g: &mut Registry, key: u64) {
        if let Some(st) = g.states.get_mut(&key) {
            st.busy = false;
            st.paused = false;
            st.deferred = true;
        }
        self.txn_del(g, key);
        self.transition(g, key, JobStatus::Null);
        let Some(mut st) = g.states.remove(&key) else {
            return;
        };
        g.order.retain(|k| *k != key);
        *st.job.outcome.lock() = Some(Outcome {
            ret: st.ret,
            err: st.err.clone(),
            force_cancel: st.force_cancel,
        });
        if let Some(h) = st.thread.take() {
            g.zombies.push((key, h));
        }
        let hooks: Vec<_> = st.job.on_free.lock().drain(..).collect();
        for h in hooks {
            h();
        }
        g.graveyard.push(st.job);
        self.changed.notify_all();
    }

    /// QEMU's `job_cancel_async`.
    fn cancel_async<'a>(&'a self, g: Guard<'a>, key: u64, force: bool) -> Guard<'a> {
        let Some(job) = g.states.get(&key).map(|s| s.job.clone()) else {
            return g;
        };
        drop(g);
        let force = guarded(|| job.driver.cancel(&job, force)).unwrap_or(true);
        let mut g = self.lock();
        let Some(st) = g.states.get_mut(&key) else {
            return g;
        };
        if st.user_paused {
            // Cancelling a user-paused job resumes it; a block job's
            // user_resume resets its I/O status.
            if st.job.block {
                st.iostatus = BlockDeviceIoStatus::Ok;
            }
            st.user_paused = false;
            debug_assert!(st.pause_count > 0);
            st.pause_count = st.pause_count.saturating_sub(1);
        }
        // A soft cancel after `run` returned is ignored.
        if force || !st.deferred {
            st.cancelled = true;
            st.force_cancel |= force;
        }
        g
    }

    /// QEMU's `job_cancel`. Caller holds `control`.
    fn cancel_locked<'a>(&'a self, mut g: Guard<'a>, key: u64, force: bool) -> Guard<'a> {
        match g.states.get(&key).map(|s| s.status) {
            None => return g,
            Some(JobStatus::Concluded) => {
                self.do_dismiss(&mut g, key);
                return g;
            }
            Some(_) => {}
        }
        g = self.cancel_async(g, key, force);
        let Some(st) = g.states.get(&key) else {
            return g;
        };
        if !st.started {
            if !is_completed(st.status) {
                g = self.job_completed(g, key);
            }
        } else if st.deferred {
            // Only a forced cancel reaches a job whose run is over.
            if st.force_cancel && st.exit_done {
                g = self.txn_abort(g, key);
            }
        } else {
            self.enter_cond(&mut g, key, None);
        }
        g
    }

    /// Wait (holding `control`) until the job is completed, processing
    /// exits meanwhile (QEMU's `AIO_WAIT_WHILE` in `job_finish_sync`).
    fn wait_completed_locked<'a>(&'a self, mut g: Guard<'a>, key: u64) -> Guard<'a> {
        loop {
            g = self.run_pending_exits(g);
            let Some(st) = g.states.get(&key) else {
                return g;
            };
            if is_completed(st.status) {
                return g;
            }
            if !st.started {
                if st.cancelled {
                    // A never-started member of an aborting transaction.
                    g = self.job_completed(g, key);
                    continue;
                }
                // Nothing will ever run it: do not wait forever.
                return g;
            }
            self.enter_cond(&mut g, key, None);
            g = self.wait(&self.changed, g);
        }
    }

    /// QEMU's `job_finish_sync` result: `ECANCELED` for a cancelled job,
    /// the job's error if it failed.
    fn finish_result(g: &Registry, job: &Job) -> Result<()> {
        let outcome = match g.states.get(&job.key) {
            Some(st) => Outcome {
                ret: st.ret,
                err: st.err.clone(),
                force_cancel: st.force_cancel,
            },
            None => match job.outcome.lock().clone() {
                Some(o) => o,
                None => return Ok(()),
            },
        };
        if outcome.force_cancel && outcome.ret == 0 {
            return Err(Error::from_errno(libc::ECANCELED));
        }
        if outcome.ret != 0 {
            return Err(outcome
                .err
                .unwrap_or_else(|| Error::from_errno(-outcome.ret))
                .with_errno(-outcome.ret));
        }
        Ok(())
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

    fn reap(&self, g: &mut Registry) {
        let (done, live): (Vec<_>, Vec<_>) =
            g.zombies.drain(..).partition(|(_, h)| h.is_finished());
        g.zombies = live;
        for (_, h) in done {
            let _ = h.join();
        }
    }

    // ---- verbs --------------------------------------------------------------

    fn pause_locked(&self, g: &mut Registry, key: u64) {
        let Some(st) = g.states.get_mut(&key) else {
            return;
        };
        st.pause_count += 1;
        if !st.paused {
            self.enter_cond(g, key, None);
        }
    }

    fn resume_locked(&self, g: &mut Registry, key: u64) {
        let Some(st) = g.states.get_mut(&key) else {
            return;
        };
        debug_assert!(st.pause_count > 0);
        st.pause_count = st.pause_count.saturating_sub(1);
        if st.pause_count > 0 {
            return;
        }
        // A sleeping job wakes from its timer; only kick one that waits.
        self.enter_cond(g, key, Some(|s| !s.timer_pending));
    }

    pub(crate) fn user_pause(&self, job: &Arc<Job>) -> Result<()> {
        let _c = self.control();
        let mut g = self.lock();
        Self::apply_verb(&g, job, JobVerb::Pause)?;
        let st = g.states.get_mut(&job.key).expect("verb check passed");
        if st.user_paused {
            return Err(Error::generic("Job is already paused"));
        }
        st.user_paused = true;
        self.pause_locked(&mut g, job.key);
        self.unlock(g);
        Ok(())
    }

    pub(crate) fn user_resume(&self, job: &Arc<Job>) -> Result<()> {
        let _c = self.control();
        let mut g = self.lock();
        let paused = g
            .states
            .get(&job.key)
            .is_some_and(|s| s.user_paused && s.pause_count > 0);
        if !paused {
            return Err(Error::generic("Can't resume a job that was not paused"));
        }
        Self::apply_verb(&g, job, JobVerb::Resume)?;
        let st = g.states.get_mut(&job.key).expect("verb check passed");
        if job.block {
            st.iostatus = BlockDeviceIoStatus::Ok;
        }
        st.user_paused = false;
        self.resume_locked(&mut g, job.key);
        self.unlock(g);
        Ok(())
    }

    pub(crate) fn user_cancel(&self, job: &Arc<Job>, force: bool) -> Result<()> {
        let _c = self.control();
        let g = self.lock();
        Self::apply_verb(&g, job, JobVerb::Cancel)?;
        let g = self.cancel_locked(g, job.key, force);
        self.unlock(g);
        Ok(())
    }

    pub(crate) fn block_job_cancel(&self, job: &Arc<Job>, force: bool) -> Result<()> {
        let _c = self.control();
        let g = self.lock();
        if !force && g.states.get(&job.key).is_some_and(|s| s.user_paused) {
            return Err(Error::generic(format!(
                "The block job for device '{}' is currently paused",
                job.id_str()
            )));
        }
        Self::apply_verb(&g, job, JobVerb::Cancel)?;
        let g = self.cancel_locked(g, job.key, force);
        self.unlock(g);
        Ok(())
    }

    fn complete_inner<'a>(&'a self, g: Guard<'a>, job: &Arc<Job>) -> (Guard<'a>, Result<()>) {
        if let Err(e) = Self::apply_verb(&g, job, JobVerb::Complete) {
            return (g, Err(e));
        }
        let cancelled = g.states.get(&job.key).is_some_and(|s| s.cancelled);
        if cancelled || !job.driver.supports_complete() {
            return (
                g,
                Err(Error::generic(format!(
                    "The active block job '{}' cannot be completed",
                    job.id_str()
                ))),
            );
        }
        drop(g);
        let res = guarded(|| job.driver.complete(job)).and_then(|r| r);
        let mut g = self.lock();
        if res.is_ok() && g.states.get(&job.key).is_some_and(|s| !s.paused) {
            // A paused (standby) job completes once it is resumed.
            self.enter_cond(&mut g, job.key, None);
        }
        (g, res)
    }

    pub(crate) fn complete(&self, job: &Arc<Job>) -> Result<()> {
        let _c = self.control();
        let g = self.lock();
        let (g, res) = self.complete_inner(g, job);
        self.unlock(g);
        res
    }

    pub(crate) fn finalize(&self, job: &Arc<Job>) -> Result<()> {
        let _c = self.control();
        let g = self.lock();
        Self::apply_verb(&g, job, JobVerb::Finalize)?;
        let g = self.do_finalize(g, job.key);
        self.unlock(g);
        Ok(())
    }

    pub(crate) fn dismiss(&self, job: &Arc<Job>) -> Result<()> {
        let _c = self.control();
        let mut g = self.lock();
        Self::apply_verb(&g, job, JobVerb::Dismiss)?;
        self.do_dismiss(&mut g, job.key);
        self.unlock(g);
        Ok(())
    }

    fn set_speed_inner<'a>(
        &'a self,
        g: Guard<'a>,
        job: &Job,
        speed: i64,
    ) -> (Guard<'a>, Result<()>) {
        if let Err(e) = Self::apply_verb(&g, job, JobVerb::SetSpeed) {
            return (g, Err(e));
        }
        if speed < 0 {
            return (
                g,
                Err(Error::generic(
                    "Parameter 'speed' expects a non-negative value",
                )),
            );
        }
        let speed = speed as u64;
        let mut g = g;
        let old = {
            let st = g.states.get_mut(&job.key).expect("verb check passed");
            let old = st.speed;
            st.limit.set_speed(speed, BLOCK_JOB_SLICE);
            st.speed = speed;
            old
        };
        drop(g);
        let _ = guarded(|| job.driver.set_speed(job, speed));
        let mut g = self.lock();
        if speed == 0 || speed > old {
            // Faster (or unlimited): wake a job sleeping on its rate limit.
            self.enter_cond(&mut g, job.key, Some(|s| s.timer_pending));
        }
        (g, Ok(()))
    }

    pub(crate) fn set_speed(&self, job: &Arc<Job>, speed: i64) -> Result<()> {
        if !job.block {
            return Err(Error::generic(format!(
                "Job '{}' is not a block job",
                job.id_str()
            )));
        }
        let _c = self.control();
        let g = self.lock();
        let (g, res) = self.set_speed_inner(g, job, speed);
        self.unlock(g);
        res
    }

    pub(crate) fn cancel_sync(&self, job: &Arc<Job>, force: bool) -> Result<()> {
        let _c = self.control();
        let g = self.lock();
        let g = self.cancel_locked(g, job.key, force);
        let g = self.wait_completed_locked(g, job.key);
        let res = Self::finish_result(&g, job);
        self.unlock(g);
        res
    }

    pub(crate) fn complete_sync(&self, job: &Arc<Job>) -> Result<()> {
        let _c = self.control();
        let g = self.lock();
        let (g, res) = self.complete_inner(g, job);
        if let Err(e) = res {
            self.unlock(g);
            return Err(e);
        }
        let g = self.wait_completed_locked(g, job.key);
        let res = Self::finish_result(&g, job);
        self.unlock(g);
        res
    }

    pub(crate) fn finish_sync(&self, job: &Arc<Job>) -> Result<()> {
        let _c = self.control();
        let g = self.lock();
        let g = self.wait_completed_locked(g, job.key);
        let res = Self::finish_result(&g, job);
        self.unlock(g);
        res
    }

    pub(crate) fn wait_status(
        &self,
        job: &Job,
        timeout: Duration,
        pred: impl Fn(JobStatus) -> bool,
    ) -> Option<JobStatus> {
        let deadline = Instant::now() + timeout;
        let mut g = self.lock();
        loop {
            let s = Self::status_of(&g, job.key);
            if pred(s) {
                return Some(s);
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            g = self.wait_timeout(&self.changed, g, deadline - now);
        }
    }

    // ---- helpers for the job thread ------------------------------------------

    pub(crate) fn transition_to_ready(&self, job: &Job) -> Result<()> {
        let mut g = self.lock();
        let status = Self::status_of(&g, job.key);
        if !transition_allowed(status, JobStatus::Ready) {
            return Err(Error::generic(format!(
                "Job '{}' in state '{}' cannot become ready",
                job.id_str(),
                status
            )));
        }
        self.transition(&mut g, job.key, JobStatus::Ready);
        if let Some(p) = g.states.get(&job.key).and_then(Self::progress_data) {
            self.bus.emit(EventData::BlockJobReady(p));
        }
        self.unlock(g);
        Ok(())
    }

    pub(crate) fn error_action(
        &self,
        job: &Job,
        on_err: BlockdevOnError,
        is_read: bool,
        errno: i32,
    ) -> BlockErrorAction {
        let action = on_err.action_for(errno);
        let mut g = self.lock();
        if let Some(id) = &job.id {
            self.bus.emit(EventData::BlockJobError {
                device: id.clone(),
                operation: IoOperationType::from_is_read(is_read),
                action,
            });
        }
        if action == BlockErrorAction::Stop {
            if let Some(st) = g.states.get_mut(&job.key)
                && !st.user_paused
            {
                st.user_paused = true;
                self.pause_locked(&mut g, job.key);
            }
            if let Some(st) = g.states.get_mut(&job.key)
                && st.iostatus == BlockDeviceIoStatus::Ok
            {
                st.iostatus = BlockDeviceIoStatus::for_errno(errno);
            }
        }
        self.unlock(g);
        action
    }

    pub(crate) fn iostatus_reset(&self, job: &Job) -> Result<()> {
        let mut g = self.lock();
        let Some(st) = g.states.get_mut(&job.key) else {
            return Err(Error::generic("Job not found"));
        };
        if st.iostatus == BlockDeviceIoStatus::Ok {
            return Ok(());
        }
        if !(st.user_paused && st.pause_count > 0) {
            return Err(Error::generic(format!(
                "Job '{}' must be paused to reset its I/O status",
                job.id_str()
            )));
        }
        st.iostatus = BlockDeviceIoStatus::Ok;
        Ok(())
    }

    pub(crate) fn ratelimit_processed(&self, job: &Job, bytes: u64) {
        let mut g = self.lock();
        if let Some(st) = g.states.get_mut(&job.key) {
            st.limit.calculate_delay(bytes, Instant::now());
        }
    }

    pub(crate) fn ratelimit_sleep(&self, job: &Job) {
        loop {
            let delay = {
                let mut g = self.lock();
                match g.states.get_mut(&job.key) {
                    Some(st) => st.limit.calculate_delay(0, Instant::now()),
                    None => return,
                }
            };
            self.sleep(job, Some(delay));
            if delay.is_zero() || job.is_cancelled() {
                return;
            }
        }
    }

    // ---- drain (used by the block layer) --------------------------------------

    /// An internal pause (QEMU's `job_pause`): counted, not user-visible.
    pub fn pause(&self, job: &Job) {
        let mut g = self.lock();
        self.pause_locked(&mut g, job.key);
    }

    /// Undo one internal pause (QEMU's `job_resume`).
    pub fn resume(&self, job: &Job) {
        let mut g = self.lock();
        if g.states.get(&job.key).is_some_and(|s| s.pause_count > 0) {
            self.resume_locked(&mut g, job.key);
        }
    }

    /// Wait until the job runs no driver code that could issue requests:
    /// it is paused, sleeping, yielded, or its `run` is over (QEMU's
    /// `child_job_drained_poll`).
    pub fn wait_quiescent(&self, job: &Job) {
        let mut g = self.lock();
        loop {
            match g.states.get(&job.key) {
                None => return,
                Some(st) if !st.busy || st.deferred || is_completed(st.status) => return,
                Some(_) => g = self.wait(&self.changed, g),
            }
        }
    }

    /// Tests: wait until the job is at a stable point (its thread waits,
    /// or its run and exit are over), processing pending exits.
    #[cfg(test)]
    pub(crate) fn settle(&self, job: &Job) {
        let _c = self.control();
        let mut g = self.lock();
        loop {
            g = self.run_pending_exits(g);
            match g.states.get(&job.key) {
                None => break,
                Some(st) if !st.busy || (st.deferred && st.exit_done) => break,
                Some(_) => g = self.wait(&self.changed, g),
            }
        }
        self.unlock(g);
    }

    // ---- shutdown --------------------------------------------------------------

    /// Cancel every job (forced) and wait for all job threads: QEMU's
    /// `job_cancel_sync_all` at exit. Must not be called from a job thread.
    pub fn shutdown(&self) {
        {
            let _c = self.control();
            // Cancel the newest job until none is left (a job with manual
            // dismiss takes two rounds: cancelled, then dismissed); stop if a
            // job does not go away (a bug), rather than spin.
            let mut last: Option<(u64, u32)> = None;
            loop {
                let next = {
                    let g = self.lock();
                    g.order
                        .first()
                        .and_then(|k| g.states.get(k))
                        .map(|s| s.job.clone())
                };
                let Some(job) = next else { break };
                let rounds = match last {
                    Some((k, n)) if k == job.key => n + 1,
                    _ => 1,
                };
                if rounds > 2 {
                    debug_assert!(false, "job {:?} survived cancel_sync", job.id);
                    break;
                }
                last = Some((job.key, rounds));
                let _ = self.cancel_sync(&job, true);
            }
        }
        // Job threads take `control` to finish; join only after releasing it.
        let threads: Vec<(u64, JoinHandle<()>)> = {
            let mut g = self.lock();
            let mut t: Vec<_> = g.zombies.drain(..).collect();
            for (k, st) in g.states.iter_mut() {
                if let Some(h) = st.thread.take() {
                    t.push((*k, h));
                }
            }
            let dead = std::mem::take(&mut g.graveyard);
            drop(g);
            drop(dead);
            t
        };
        // A job's own thread cannot join itself.
        let me = CURRENT_JOB.with(|c| c.get());
        for (k, h) in threads {
            if k != me {
                let _ = h.join();
            }
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

fn job_thread(job: Arc<Job>) {
    CURRENT_JOB.with(|c| c.set(job.key));
    let engine = job.engine.clone();
    engine.pause_point(&job);
    let result = guarded(|| job.driver.run(&job)).and_then(|r| r);
    let (ret, err) = match result {
        Ok(()) => (0, None),
        Err(e) => (-e.errno().unwrap_or(libc::EIO), Some(e)),
    };
    {
        let mut g = engine.lock();
        if let Some(st) = g.states.get_mut(&job.key) {
            st.ret = ret;
            st.err = err;
            st.deferred = true;
            st.busy = true;
        }
        engine.changed.notify_all();
    }
    // The registry keeps the job until it reaches null; this thread lets go
    // now, so that the job is freed by the last user, not by this thread.
    drop(job);
    let _c = engine.control();
    let g = engine.lock();
    let g = engine.run_pending_exits(g);
    engine.unlock(g);
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
