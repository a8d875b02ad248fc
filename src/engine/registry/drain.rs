//! Internal pauses for drained sections, and shutdown.

use super::*;

impl Engine {
    /// True on `job`'s own thread (a drain there must not wait for it).
    pub fn is_current_job(&self, job: &Job) -> bool {
        CURRENT_JOB.with(|c| c.get()) == job.key
    }

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
