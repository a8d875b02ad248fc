//! The operator's side of one block job, shared by `mirror`, `stream` and
//! `commit`: follow the job's events, complete it at `BLOCK_JOB_READY` (or
//! cancel it there with `--no-complete`), resume it after an error policy
//! stopped it, finalize and dismiss it when auto-finalize/auto-dismiss are
//! off, and keep the progress display current until the job is gone
//! (`JOB_STATUS_CHANGE` to `null`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use blockjob::engine::Job;
use blockjob::events::{EventData, Subscription};
use blockjob::qapi::{BlockDeviceIoStatus, BlockdevOnError, JobStatus};
use blockjob::{Error, Result};
use clap::{Args, ValueEnum};
use serde_json::{Map, Value, json};

use crate::progress::Display;
use crate::size::{human, parse_size};

/// Error policies (`on-error`, `on-source-error`, `on-target-error`).
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum OnError {
    /// Fail the job.
    Report,
    /// Go on (mirror, commit and backup retry the range, 1 ms doubling to
    /// 1 s between retries; stream fails at the end).
    Ignore,
    /// Stop on ENOSPC, report otherwise.
    Enospc,
    /// Stop (the command resumes after --resume-delay).
    Stop,
    /// QEMU's `auto` (for jobs the same as enospc).
    Auto,
}

/// The QAPI value of an `--on-*error` argument.
pub fn on_error(e: OnError) -> BlockdevOnError {
    match e {
        OnError::Report => BlockdevOnError::Report,
        OnError::Ignore => BlockdevOnError::Ignore,
        OnError::Enospc => BlockdevOnError::Enospc,
        OnError::Stop => BlockdevOnError::Stop,
        OnError::Auto => BlockdevOnError::Auto,
    }
}

/// clap parser for sizes with K/M/G suffixes.
pub fn size_arg(s: &str) -> std::result::Result<u64, String> {
    parse_size(s)
}

/// A size argument as QAPI's signed integer.
pub fn signed(v: u64, what: &str) -> Result<i64> {
    i64::try_from(v).map_err(|_| Error::generic(format!("Invalid parameter '{what}'")))
}

/// How the command drives its job and what it prints; the same flags for
/// every job command.
#[derive(Args, Debug, Clone)]
pub struct Control {
    /// `auto-finalize` (when false, the command finalizes at PENDING).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub auto_finalize: bool,
    /// `auto-dismiss` (when false, the command dismisses at CONCLUDED).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub auto_dismiss: bool,
    /// Print every event as a QMP JSON line on stdout.
    #[arg(long)]
    pub events: bool,
    /// Print one JSON line of measurements on stdout at the end.
    #[arg(long)]
    pub stats: bool,
    /// No progress display and no messages (errors still go to stderr).
    #[arg(long, short)]
    pub quiet: bool,
    /// Seconds to wait before resuming a job stopped by an error policy.
    #[arg(long, default_value_t = 1.0)]
    pub resume_delay: f64,
    /// Give up (force-cancel) after the job stopped this many times.
    #[arg(long, default_value_t = 3)]
    pub max_resumes: u32,
    /// What to suggest when the job does not converge (set by the
    /// command, e.g. mirror in background mode).
    #[arg(skip)]
    pub converge_hint: Option<&'static str>,
}

impl Default for Control {
    fn default() -> Self {
        Control {
            auto_finalize: true,
            auto_dismiss: true,
            events: false,
            stats: false,
            quiet: false,
            resume_delay: 1.0,
            max_resumes: 3,
            converge_hint: None,
        }
    }
}

/// What happened, for the caller and `--stats`.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    /// Bytes the job processed (progress `offset`).
    pub bytes: u64,
    /// Progress total.
    pub len: u64,
    /// From starting the job to its end (`BLOCK_JOB_COMPLETED`/`CANCELLED`).
    pub seconds: f64,
    /// From starting the job to `BLOCK_JOB_READY`.
    pub ready_seconds: Option<f64>,
    /// CPU time of this process over the same interval.
    pub cpu_seconds: f64,
    /// `BLOCK_JOB_ERROR` events seen.
    pub job_errors: u32,
    /// The job was completed after READY (mirror, active commit: pivoted).
    pub pivoted: bool,
}

impl Outcome {
    /// The `--stats` fields every job has.
    pub fn stats(&self) -> Map<String, Value> {
        let v = json!({
            "bytes": self.bytes,
            "len": self.len,
            "seconds": self.seconds,
            "cpu-seconds": self.cpu_seconds,
            "job-errors": self.job_errors,
        });
        match v {
            Value::Object(m) => m,
            _ => unreachable!("a JSON object literal"),
        }
    }

    /// Average rate in bytes per second.
    pub fn rate(&self) -> u64 {
        (self.bytes as f64 / self.seconds.max(1e-9)) as u64
    }
}

fn cpu_time() -> f64 {
    use nix::sys::resource::{UsageWho, getrusage};
    getrusage(UsageWho::RUSAGE_SELF).map_or(0.0, |u| {
        let t = |tv: nix::sys::time::TimeVal| tv.tv_sec() as f64 + tv.tv_usec() as f64 * 1e-6;
        t(u.user_time()) + t(u.system_time())
    })
}

/// Start a job with `start` and drive it to its end (see the module
/// comment). `no_complete`: cancel at READY instead of completing. The
/// display is returned finished, for the caller's last messages.
pub fn run_job(
    ctl: &Control,
    job_id: &str,
    no_complete: bool,
    events: &Subscription,
    start: impl FnOnce() -> Result<Arc<Job>>,
) -> (Result<Outcome>, Display) {
    let mut display = Display::new(ctl.quiet);
    let cpu0 = cpu_time();
    let started = Instant::now();
    let r = start().and_then(|job| {
        drive(
            ctl,
            job_id,
            no_complete,
            &job,
            events,
            &mut display,
            started,
        )
    });
    display.finish();
    let r = r.map(|mut out| {
        out.cpu_seconds = cpu_time() - cpu0;
        out
    });
    (r, display)
}

/// Print the `--stats` line (when asked for): the common fields plus
/// `extra`.
pub fn print_stats(ctl: &Control, display: &Display, out: &Outcome, extra: Value) {
    if !ctl.stats {
        return;
    }
    let mut m = out.stats();
    if let Value::Object(e) = extra {
        m.extend(e);
    }
    display.stdout_line(&Value::Object(m).to_string());
}

/// The event loop of one job: react like an operator, keep the display
/// current, return at `JOB_STATUS_CHANGE` to `null`.
fn drive(
    ctl: &Control,
    id: &str,
    no_complete: bool,
    job: &Arc<Job>,
    events: &Subscription,
    display: &mut Display,
    started: Instant,
) -> Result<Outcome> {
    let mut out = Outcome::default();
    let mut failure: Option<String> = None;
    let mut cancelled = false;
    let mut completing = false;
    let mut stops = 0u32;
    let mut resume_at: Option<Instant> = None;
    let resume_delay = Duration::from_secs_f64(ctl.resume_delay.clamp(0.0, 3600.0));
    // Said once per stretch of not converging.
    let mut diverging = false;
    loop {
        if let Ok(info) = job.query_block_job() {
            display.update(&info);
            let now_diverging = info.x.converging == Some(false);
            if now_diverging && !diverging {
                display.note(&format!(
                    "{id}: will not converge: the guest dirties {}/s, the job copies {}/s{}",
                    human(info.x.dirty_rate),
                    human(info.x.copy_rate),
                    ctl.converge_hint
                        .map_or(String::new(), |h| format!("; {h}"))
                ));
            }
            diverging = now_diverging;
        }
        if resume_at.is_some_and(|t| Instant::now() >= t) {
            resume_at = None;
            display.note(&format!("{id}: resuming"));
            job.user_resume()?;
        }
        let Some(ev) = events.next_timeout(Duration::from_millis(100)) else {
            continue;
        };
        if ctl.events {
            display.stdout_line(&ev.to_qmp_json());
        }
        match &ev.data {
            EventData::BlockJobError {
                operation, action, ..
            } => {
                out.job_errors += 1;
                display.note(&format!("{id}: {operation} error, action {action}"));
            }
            EventData::JobStatusChange {
                status: JobStatus::Paused,
                ..
            } if job.iostatus() != BlockDeviceIoStatus::Ok => {
                stops += 1;
                if stops > ctl.max_resumes {
                    display.note(&format!(
                        "{id}: stopped {stops} times (io-status {}); giving up",
                        job.iostatus()
                    ));
                    failure = Some(format!(
                        "the job stopped {stops} times after I/O errors (io-status {})",
                        job.iostatus()
                    ));
                    job.user_cancel(true)?;
                } else {
                    display.note(&format!(
                        "{id}: stopped after an I/O error (io-status {}); resuming in {:.1} s",
                        job.iostatus(),
                        resume_delay.as_secs_f64()
                    ));
                    resume_at = Some(Instant::now() + resume_delay);
                }
            }
            EventData::BlockJobReady(_) => {
                out.ready_seconds = Some(started.elapsed().as_secs_f64());
                if no_complete {
                    display.note(&format!("{id}: ready; cancelling (--no-complete)"));
                    job.user_cancel(false)?;
                } else {
                    completing = true;
                    job.complete()?;
                }
            }
            EventData::BlockJobPending { .. } if !ctl.auto_finalize => job.finalize()?,
            EventData::BlockJobCompleted { progress, error } => {
                out.seconds = started.elapsed().as_secs_f64();
                out.bytes = progress.offset;
                out.len = progress.len;
                if let Some(e) = error {
                    failure.get_or_insert_with(|| e.clone());
                } else {
                    out.pivoted = completing;
                }
            }
            EventData::BlockJobCancelled(p) => {
                out.seconds = started.elapsed().as_secs_f64();
                out.bytes = p.offset;
                out.len = p.len;
                cancelled = true;
            }
            EventData::JobStatusChange {
                status: JobStatus::Concluded,
                ..
            } if !ctl.auto_dismiss => job.dismiss()?,
            EventData::JobStatusChange {
                status: JobStatus::Null,
                ..
            } => break,
            _ => {}
        }
    }
    if let Some(e) = failure {
        return Err(Error::generic(e));
    }
    if cancelled {
        return Err(Error::generic(format!("Job '{id}' was cancelled")));
    }
    Ok(out)
}
