//! After `run`: QEMU's job exit, transactions (success, finalize, abort),
//! conclude and dismiss, and cancellation. Everything here runs with the
//! control lock held.

use super::*;

impl Engine {
    /// Process every exit whose `run` is over (QEMU's pending `job_exit`
    /// bottom halves). Caller holds `control`.
    pub(super) fn run_pending_exits<'a>(&'a self, mut g: Guard<'a>) -> Guard<'a> {
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
    pub(super) fn job_exit<'a>(&'a self, mut g: Guard<'a>, key: u64) -> Guard<'a> {
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
    pub(super) fn update_rc(&self, g: &mut Registry, key: u64) {
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
    pub(super) fn job_completed<'a>(&'a self, mut g: Guard<'a>, key: u64) -> Guard<'a> {
        debug_assert!(g.states.get(&key).is_some_and(|s| !is_completed(s.status)));
        self.update_rc(&mut g, key);
        let ret = g.states.get(&key).map_or(0, |s| s.ret);
        if ret != 0 {
            self.txn_abort(g, key)
        } else {
            self.txn_success(g, key)
        }
    }

    pub(super) fn txn_of(g: &Registry, key: u64) -> Option<u64> {
        g.states.get(&key).and_then(|s| s.txn)
    }

    /// Members of `key`'s transaction, in list order (newest first).
    pub(super) fn txn_members(g: &Registry, key: u64) -> Vec<u64> {
        Self::txn_of(g, key)
            .and_then(|t| g.txns.get(&t))
            .map(|t| t.jobs.clone())
            .unwrap_or_default()
    }

    /// QEMU's `job_completed_txn_success`.
    pub(super) fn txn_success<'a>(&'a self, mut g: Guard<'a>, key: u64) -> Guard<'a> {
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

    pub(super) fn transition_to_pending(&self, g: &mut Registry, key: u64) {
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
    pub(super) fn do_finalize<'a>(&'a self, mut g: Guard<'a>, key: u64) -> Guard<'a> {
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

    pub(super) fn prepare<'a>(&'a self, g: Guard<'a>, key: u64) -> (Guard<'a>, i32) {
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
    pub(super) fn finalize_single<'a>(&'a self, mut g: Guard<'a>, key: u64) -> Guard<'a> {
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
    pub(super) fn txn_abort<'a>(&'a self, mut g: Guard<'a>, key: u64) -> Guard<'a> {
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
            // See `JobDriver::finalize_drains`.
            if g.states
                .get(&other)
                .is_some_and(|s| s.job.driver().finalize_drains())
            {
                for m in Self::txn_members(&g, other) {
                    if !is_completed(Self::status_of(&g, m)) {
                        g = self.wait_completed_locked(g, m);
                    }
                }
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

    pub(super) fn txn_del(&self, g: &mut Registry, key: u64) {
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

    pub(super) fn conclude(&self, g: &mut Registry, key: u64) {
        self.transition(g, key, JobStatus::Concluded);
        let Some(st) = g.states.get(&key) else {
            return;
        };
        if st.job.auto_dismiss || !st.started {
            self.do_dismiss(g, key);
        }
    }

    /// QEMU's `job_do_dismiss` and the final unref: the job goes to `null`
    /// and leaves the registry. Its `on_free` hooks run here, first
    /// (registry lock held: they must not call the engine); the `Job` itself is dropped
    /// later, outside every lock, because dropping it may run host code.
    pub(super) fn do_dismiss(&self, g: &mut Registry, key: u64) {
        // The hooks run before `null` is announced: whoever sees the event
        // also sees what freeing the job released (QEMU frees the job's
        // nodes in the same main-loop step that emits it).
        let hooks: Vec<_> = match g.states.get(&key) {
            Some(st) => st.job.on_free.lock().drain(..).collect(),
            None => Vec::new(),
        };
        for h in hooks.into_iter().rev() {
            h();
        }
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
        g.graveyard.push(st.job);
        self.changed.notify_all();
    }

    /// QEMU's `job_cancel_async`.
    pub(super) fn cancel_async<'a>(&'a self, g: Guard<'a>, key: u64, force: bool) -> Guard<'a> {
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
        // A retry backoff waits on `changed` (see `range_error_action`).
        self.changed.notify_all();
        g
    }

    /// QEMU's `job_cancel`. Caller holds `control`.
    pub(super) fn cancel_locked<'a>(
        &'a self,
        mut g: Guard<'a>,
        key: u64,
        force: bool,
    ) -> Guard<'a> {
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
    pub(super) fn wait_completed_locked<'a>(&'a self, mut g: Guard<'a>, key: u64) -> Guard<'a> {
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
    pub(super) fn finish_result(g: &Registry, job: &Job) -> Result<()> {
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
}
