//! What a job's own thread does: wake-ups, pause points, sleeps, and the
//! helpers a driver's `run` calls (ready, error action, rate limit).

use super::*;

impl Engine {
    /// QEMU's `job_enter_cond`: wake the job thread unless it is running,
    /// not started, or finished; `cond` may further restrict it.
    pub(super) fn enter_cond(
        &self,
        g: &mut Registry,
        key: u64,
        cond: Option<fn(&JobState) -> bool>,
    ) {
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
    pub(super) fn do_yield<'a>(
        &self,
        job: &Job,
        mut g: Guard<'a>,
        deadline: Option<Instant>,
    ) -> Guard<'a> {
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

    pub(super) fn should_pause(st: &JobState) -> bool {
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
        let action = crate::error_policy::job_action(on_err, errno);
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
                st.iostatus = crate::error_policy::iostatus_for(errno);
            }
        }
        self.unlock(g);
        action
    }

    pub(crate) fn range_error_action(
        &self,
        job: &Job,
        on_err: BlockdevOnError,
        is_read: bool,
        errno: i32,
        offset: u64,
        len: u64,
    ) -> BlockErrorAction {
        let action = self.error_action(job, on_err, is_read, errno);
        if action != BlockErrorAction::Ignore {
            return action;
        }
        let mut g = self.lock();
        let Some(st) = g.states.get_mut(&job.key) else {
            return action;
        };
        let until = st.backoff.failed(offset, len, Instant::now());
        // Relaxed: see `Job::range_done` (written under this lock).
        job.retry_armed.store(true, Ordering::Relaxed);
        // Pause requests and cancels notify `changed`: a cancel always
        // wins over the retry, and a pause (a drain, the user) is not held
        // up by it; the job retries after it resumes.
        while let Some(st) = g.states.get_mut(&job.key) {
            if st.force_cancel || st.pause_count > 0 {
                st.backoff.interrupted();
                break;
            }
            let now = Instant::now();
            if now >= until {
                break;
            }
            g = self.wait_timeout(&self.changed, g, until - now);
        }
        self.unlock(g);
        action
    }

    pub(crate) fn range_done(&self, job: &Job, offset: u64, len: u64) {
        let mut g = self.lock();
        if let Some(st) = g.states.get_mut(&job.key) {
            st.backoff.succeeded(offset, len);
            // Relaxed: see `Job::range_done` (written under this lock).
            job.retry_armed.store(st.backoff.armed(), Ordering::Relaxed);
        }
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
}
