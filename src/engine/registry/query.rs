//! Lookup by id and the query results (`query-block-jobs`, `query-jobs`).

use super::*;
use crate::qapi::JobProgressExt;

impl Engine {
    pub(super) fn find_locked(g: &Registry, id: &str) -> Option<Arc<Job>> {
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

    pub(super) fn block_info(st: &JobState) -> BlockJobInfo {
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
            x: progress_ext(job),
        }
    }

    pub(super) fn job_info(st: &JobState) -> JobInfo {
        let p = st.job.progress();
        JobInfo {
            id: st.job.id_str().to_string(),
            job_type: st.job.job_type,
            status: st.status,
            current_progress: p.current,
            total_progress: p.total,
            error: st.err.as_ref().map(|e| e.message().to_string()),
            x: progress_ext(&st.job),
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
}

/// The `x-` members of a job's info.
fn progress_ext(job: &Job) -> JobProgressExt {
    let (r, skipped) = job.progress_rates();
    JobProgressExt {
        copy_rate: r.copy_rate,
        dirty_rate: r.dirty_rate,
        skipped,
        eta: r.eta,
        converging: r.converging,
    }
}
