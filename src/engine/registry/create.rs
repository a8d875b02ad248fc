//! Creating and starting jobs, and the job thread.

use super::*;
use crate::qapi::ids::id_wellformed;

impl Engine {
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
            progress: crate::locks::Mutex::new(Progress::default()),
            meter: crate::locks::Mutex::new(Default::default()),
            skipped: Default::default(),
            on_free: crate::locks::Mutex::new(Vec::new()),
            outcome: crate::locks::Mutex::new(None),
            retry_armed: AtomicBool::new(false),
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
                backoff: Backoff::default(),
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

    pub(super) fn reap(&self, g: &mut Registry) {
        let (done, live): (Vec<_>, Vec<_>) =
            g.zombies.drain(..).partition(|(_, h)| h.is_finished());
        g.zombies = live;
        for (_, h) in done {
            let _ = h.join();
        }
    }

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
}

/// The body of a job's thread (QEMU's `job_co_entry`).
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
