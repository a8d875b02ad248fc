//! `blockjob mirror SRC DST`: one mirror job, driven the way an operator
//! drives QEMU's: complete on `BLOCK_JOB_READY` (or cancel with
//! `--no-complete`), resume after an error stop, finalize and dismiss
//! when auto-finalize/auto-dismiss are off.

use std::sync::Arc;
use std::time::{Duration, Instant};

use blockjob::events::EventData;
use blockjob::job::Job;
use blockjob::jobs::mirror::MirrorOptions;
use blockjob::qapi::{BlockDeviceIoStatus, BlockdevOnError, JobStatus, MirrorCopyMode};
use blockjob::{Context, Error, Result};
use clap::{Args, ValueEnum};
use serde_json::json;

use crate::image::{Format, Image, create_if_missing};
use crate::progress::Display;
use crate::size::{human, parse_size};

/// `sync` values a mirror accepts.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Sync {
    /// The top layer (everything, while there are no backing files).
    Top,
    /// Everything the guest sees.
    Full,
    /// Only what is written while the job runs.
    None,
}

/// Error policies (`on-source-error`, `on-target-error`).
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum OnError {
    /// Fail the job.
    Report,
    /// Retry the range later.
    Ignore,
    /// Stop on ENOSPC, report otherwise.
    Enospc,
    /// Stop (the command resumes after --resume-delay).
    Stop,
    /// QEMU's `auto` (report for jobs).
    Auto,
}

/// `copy-mode` values.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum CopyMode {
    /// Guest writes only dirty the bitmap.
    Background,
    /// Guest writes reach the target before they complete.
    WriteBlocking,
}

fn size_arg(s: &str) -> std::result::Result<u64, String> {
    parse_size(s)
}

/// Arguments of `blockjob mirror` (QEMU's blockdev-mirror names).
#[derive(Args, Debug, Clone)]
pub struct MirrorArgs {
    /// Source: a path, or json:{blockdev-add options}.
    pub src: String,
    /// Target: a path, or json:{blockdev-add options}.
    pub dst: String,
    /// Format of SRC when it is a path.
    #[arg(long, value_enum, default_value = "raw")]
    pub source_format: Format,
    /// Format of DST when it is a path.
    #[arg(long, value_enum, default_value = "raw")]
    pub target_format: Format,
    /// Create DST (sparse, the source's size) if it does not exist.
    #[arg(long)]
    pub create: bool,
    /// `job-id`.
    #[arg(long, default_value = "job0")]
    pub job_id: String,
    /// `sync`.
    #[arg(long, value_enum, default_value = "full")]
    pub sync: Sync,
    /// `granularity` (bytes; K/M/G suffixes); default: the target's cluster size or 64K.
    #[arg(long, value_parser = size_arg)]
    pub granularity: Option<u64>,
    /// `buf-size` (bytes; K/M/G suffixes); default 16M.
    #[arg(long, value_parser = size_arg)]
    pub buf_size: Option<u64>,
    /// `speed` in bytes per second (K/M/G suffixes); 0 = unlimited.
    #[arg(long, value_parser = size_arg, default_value = "0")]
    pub speed: u64,
    /// `on-source-error`.
    #[arg(long, value_enum, default_value = "report")]
    pub on_source_error: OnError,
    /// `on-target-error`.
    #[arg(long, value_enum, default_value = "report")]
    pub on_target_error: OnError,
    /// `copy-mode`.
    #[arg(long, value_enum, default_value = "background")]
    pub copy_mode: CopyMode,
    /// `auto-finalize` (when false, the command finalizes at PENDING).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub auto_finalize: bool,
    /// `auto-dismiss` (when false, the command dismisses at CONCLUDED).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub auto_dismiss: bool,
    /// `unmap`: zeroes may become holes on the target.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub unmap: bool,
    /// Cancel at READY instead of completing (the target keeps the
    /// source's content at that moment; the source stays in use).
    #[arg(long)]
    pub no_complete: bool,
    /// Print every event as a QMP JSON line on stdout.
    #[arg(long)]
    pub events: bool,
    /// Print one JSON line of measurements on stdout at the end.
    #[arg(long)]
    pub stats: bool,
    /// No progress display.
    #[arg(long, short)]
    pub quiet: bool,
    /// Seconds to wait before resuming a job stopped by an error policy.
    #[arg(long, default_value_t = 1.0)]
    pub resume_delay: f64,
    /// Give up (force-cancel) after the job stopped this many times.
    #[arg(long, default_value_t = 3)]
    pub max_resumes: u32,
}

fn on_error(e: OnError) -> BlockdevOnError {
    match e {
        OnError::Report => BlockdevOnError::Report,
        OnError::Ignore => BlockdevOnError::Ignore,
        OnError::Enospc => BlockdevOnError::Enospc,
        OnError::Stop => BlockdevOnError::Stop,
        OnError::Auto => BlockdevOnError::Auto,
    }
}

/// What happened, for the caller and `--stats`.
#[derive(Debug, Clone)]
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
    /// The job pivoted (completed after READY).
    pub pivoted: bool,
}

fn cpu_time() -> f64 {
    use nix::sys::resource::{UsageWho, getrusage};
    getrusage(UsageWho::RUSAGE_SELF).map_or(0.0, |u| {
        let t = |tv: nix::sys::time::TimeVal| tv.tv_sec() as f64 + tv.tv_usec() as f64 * 1e-6;
        t(u.user_time()) + t(u.system_time())
    })
}

/// Set up the nodes and run the mirror to its end. A target this call
/// created is removed again when the command fails.
pub fn run(a: &MirrorArgs) -> Result<Outcome> {
    let mut created = None;
    let r = run_inner(a, &mut created);
    if let (Err(_), Some(path)) = (&r, created) {
        let _ = std::fs::remove_file(path);
    }
    r
}

/// Refuse to mirror a file onto itself (QEMU's image locking refuses it;
/// we do not lock images).
fn check_distinct(src: &Image, dst: &Image) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    if let (Some(s), Some(d)) = (src.path(), dst.path())
        && let (Ok(ms), Ok(md)) = (std::fs::metadata(s), std::fs::metadata(d))
        && (ms.dev(), ms.ino()) == (md.dev(), md.ino())
    {
        return Err(Error::generic(format!(
            "'{}' and '{}' are the same file",
            s.display(),
            d.display()
        )));
    }
    Ok(())
}

fn run_inner(a: &MirrorArgs, created: &mut Option<std::path::PathBuf>) -> Result<Outcome> {
    let ctx = Context::new();
    let events = ctx.subscribe();
    let src = Image::parse(&a.src)?;
    let dst = Image::parse(&a.dst)?;
    check_distinct(&src, &dst)?;
    let (src_opts, src_name) = src.blockdev_options(a.source_format, "source");
    let source = ctx.blockdev_add(&src_opts)?;
    if a.create {
        let Some(path) = dst.path() else {
            return Err(Error::generic("--create needs DST to be a path"));
        };
        if create_if_missing(path, source.len()?)? {
            *created = Some(path.to_path_buf());
        }
    }
    let (dst_opts, dst_name) = dst.blockdev_options(a.target_format, "target");
    ctx.blockdev_add(&dst_opts)?;

    let mut o = MirrorOptions::new(
        &src_name,
        &dst_name,
        match a.sync {
            Sync::Top => blockjob::qapi::MirrorSyncMode::Top,
            Sync::Full => blockjob::qapi::MirrorSyncMode::Full,
            Sync::None => blockjob::qapi::MirrorSyncMode::None,
        },
    );
    o.job_id = Some(a.job_id.clone());
    o.granularity = a.granularity.unwrap_or(0);
    o.buf_size = signed(a.buf_size.unwrap_or(0), "buf-size")?;
    o.speed = signed(a.speed, "speed")?;
    o.on_source_error = on_error(a.on_source_error);
    o.on_target_error = on_error(a.on_target_error);
    o.copy_mode = match a.copy_mode {
        CopyMode::Background => MirrorCopyMode::Background,
        CopyMode::WriteBlocking => MirrorCopyMode::WriteBlocking,
    };
    o.auto_finalize = a.auto_finalize;
    o.auto_dismiss = a.auto_dismiss;
    o.unmap = a.unmap;

    let mut display = Display::new(a.quiet);
    let cpu0 = cpu_time();
    let started = Instant::now();
    let job = ctx.blockdev_mirror(o)?;
    let r = drive(a, &job, &events, &mut display, started);
    display.finish();
    let mut out = r?;
    out.cpu_seconds = cpu_time() - cpu0;
    if a.stats {
        display.stdout_line(
            &json!({
                "bytes": out.bytes,
                "len": out.len,
                "seconds": out.seconds,
                "ready-seconds": out.ready_seconds,
                "cpu-seconds": out.cpu_seconds,
                "job-errors": out.job_errors,
                "pivoted": out.pivoted,
            })
            .to_string(),
        );
    }
    Ok(out)
}

fn signed(v: u64, what: &str) -> Result<i64> {
    i64::try_from(v).map_err(|_| Error::generic(format!("Invalid parameter '{what}'")))
}

/// The event loop of one job: react like an operator, keep the display
/// current, return at `JOB_STATUS_CHANGE` to `null`.
fn drive(
    a: &MirrorArgs,
    job: &Arc<Job>,
    events: &blockjob::events::Subscription,
    display: &mut Display,
    started: Instant,
) -> Result<Outcome> {
    let id = a.job_id.as_str();
    let mut out = Outcome {
        bytes: 0,
        len: 0,
        seconds: 0.0,
        ready_seconds: None,
        cpu_seconds: 0.0,
        job_errors: 0,
        pivoted: false,
    };
    let mut failure: Option<String> = None;
    let mut cancelled = false;
    let mut completing = false;
    let mut stops = 0u32;
    let mut resume_at: Option<Instant> = None;
    let resume_delay = Duration::from_secs_f64(a.resume_delay.clamp(0.0, 3600.0));
    loop {
        if let Ok(info) = job.query_block_job() {
            display.update(&info, started);
        }
        if resume_at.is_some_and(|t| Instant::now() >= t) {
            resume_at = None;
            display.note(&format!("{id}: resuming"));
            job.user_resume()?;
        }
        let Some(ev) = events.next_timeout(Duration::from_millis(100)) else {
            continue;
        };
        if a.events {
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
                if stops > a.max_resumes {
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
                if a.no_complete {
                    display.note(&format!("{id}: ready; cancelling (--no-complete)"));
                    job.user_cancel(false)?;
                } else {
                    completing = true;
                    job.complete()?;
                }
            }
            EventData::BlockJobPending { .. } if !a.auto_finalize => job.finalize()?,
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
            } if !a.auto_dismiss => job.dismiss()?,
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
    display.note(&format!(
        "{id}: {} {} in {:.2} s ({}/s){}",
        if out.pivoted {
            "completed, pivoted to the target:"
        } else {
            "completed without pivot:"
        },
        human(out.bytes),
        out.seconds,
        human((out.bytes as f64 / out.seconds.max(1e-9)) as u64),
        out.ready_seconds
            .map(|r| format!(", ready after {r:.2} s"))
            .unwrap_or_default()
    ));
    Ok(out)
}
