//! The verbs (pause, resume, cancel, complete, finalize, dismiss,
//! set-speed) and the synchronous waits built on them.

use super::*;

/// How long `job-pause` waits for a sleeping or yielded job to reach its
/// pause point (see [`Engine::user_pause`]); it is woken at once, so this
/// only bounds a job that starts I/O before its pause point.
const IDLE_PAUSE_WAIT: Duration = Duration::from_millis(500);

impl Engine {
    pub(super) fn pause_locked(&self, g: &mut Registry, key: u64) {
        let Some(st) = g.states.get_mut(&key) else {
            return;
        };
        st.pause_count += 1;
        if !st.paused {
            self.enter_cond(g, key, None);
        }
        // A retry backoff waits on `changed` (see `range_error_action`).
        self.changed.notify_all();
    }

    pub(super) fn resume_locked(&self, g: &mut Registry, key: u64) {
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
        let idle = st.started && !st.busy && !st.deferred;
        self.pause_locked(&mut g, job.key);
        if idle {
            // QEMU enters a sleeping or yielded job from the monitor at once
            // (`aio_co_enter` runs the coroutine up to its next yield, its
            // pause point), so such a job is `paused`, its event sent,
            // before the command returns; one in the middle of I/O pauses
            // later, in QEMU as here. Our job runs on its own thread: wait
            // for it to get there, briefly (a pause with I/O to finish
            // first returns while the job is still busy, as QEMU's does).
            let deadline = Instant::now() + IDLE_PAUSE_WAIT;
            while g
                .states
                .get(&job.key)
                .is_some_and(|st| st.busy && !st.paused && !st.deferred)
            {
                let now = Instant::now();
                if now >= deadline {
                    break;
                }
                g = self.wait_timeout(&self.changed, g, deadline - now);
            }
        }
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

    pub(super) fn complete_inner<'a>(
        &'a self,
        g: Guard<'a>,
        job: &Arc<Job>,
    ) -> (Guard<'a>, Result<()>) {
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

    pub(super) fn set_speed_inner<'a>(
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

    /// QEMU's `block_job_change_locked`: the verb, then the driver (which
    /// may drain the job's nodes, so it runs without the registry lock).
    pub(crate) fn change(&self, job: &Arc<Job>, opts: &JobChange) -> Result<()> {
        let _c = self.control();
        let g = self.lock();
        Self::apply_verb(&g, job, JobVerb::Change)?;
        drop(g);
        guarded(|| job.driver.change(job, opts)).and_then(|r| r)
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
}
