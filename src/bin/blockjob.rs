//! `blockjob`: command-line front end.
//!
//! `blockjob` (or `blockjob demo`) runs the built-in demonstration: a
//! host-defined copy job between two temporary raw images, with an
//! injected one-shot ENOSPC on the target through blkdebug and
//! `on-target-error=stop`. It prints every event as a QMP JSON line,
//! resumes the job once it stopped (as an operator would after freeing
//! space), completes it when ready, and verifies the copy byte for byte.

use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use blockjob::block::Node;
use blockjob::events::EventData;
use blockjob::job::{Job, JobDriver};
use blockjob::qapi::{BlockErrorAction, BlockdevOnError, JobStatus, JobType};
use blockjob::{Context, Error, Result};
use clap::{Parser, Subcommand};
use serde_json::json;

#[derive(Parser)]
#[command(
    name = "blockjob",
    version,
    about = "QEMU's block jobs, as a library and a tool"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Copy a temporary image with an injected error, printing events as
    /// QMP JSON lines (the default).
    Demo {
        /// Image size in MiB.
        #[arg(long, default_value_t = 64)]
        size_mib: u64,
        /// Keep the temporary directory.
        #[arg(long)]
        keep: bool,
    },
}

/// A copy job that treats errors the way QEMU's mirror does: a failed
/// chunk stays dirty; `report` fails the job, `ignore` retries the chunk
/// on a later pass, `stop` pauses the job until it is resumed.
struct CopyJob {
    src: Arc<Node>,
    dst: Arc<Node>,
    on_source_error: BlockdevOnError,
    on_target_error: BlockdevOnError,
    should_complete: AtomicBool,
}

const CHUNK: u64 = 1 << 20;

impl JobDriver for CopyJob {
    fn job_type(&self) -> JobType {
        JobType::Mirror
    }

    fn run(&self, job: &Arc<Job>) -> Result<()> {
        let len = self.src.len()?;
        let mut dirty: Vec<u64> = (0..len.div_ceil(CHUNK)).map(|i| i * CHUNK).collect();
        job.progress_set_remaining(len);
        let mut buf = vec![0u8; CHUNK as usize];
        loop {
            job.pause_point();
            if job.is_cancelled() {
                return Ok(());
            }
            if job.iostatus() != blockjob::qapi::BlockDeviceIoStatus::Ok {
                job.sleep_ns(1_000_000);
                continue;
            }
            let Some(&off) = dirty.first() else {
                if !job.is_ready() {
                    if let Err(e) = self.dst.flush() {
                        let errno = e.errno().unwrap_or(libc::EIO);
                        if job.error_action(self.on_target_error, false, errno)
                            == BlockErrorAction::Report
                        {
                            return Err(e);
                        }
                        continue;
                    }
                    job.transition_to_ready()?;
                }
                if self.should_complete.load(Ordering::SeqCst) || job.cancel_requested() {
                    return Ok(());
                }
                job.sleep_ns(10_000_000);
                continue;
            };
            let n = CHUNK.min(len - off) as usize;
            let b = &mut buf[..n];
            let copied = self
                .src
                .pread(off, b)
                .map_err(|e| (e, true, self.on_source_error))
                .and_then(|()| {
                    self.dst
                        .pwrite(off, b)
                        .map_err(|e| (e, false, self.on_target_error))
                });
            match copied {
                Ok(()) => {
                    dirty.remove(0);
                    job.progress_update(n as u64);
                    job.ratelimit_processed(n as u64);
                    job.ratelimit_sleep();
                }
                Err((e, is_read, policy)) => {
                    let errno = e.errno().unwrap_or(libc::EIO);
                    if job.error_action(policy, is_read, errno) == BlockErrorAction::Report {
                        return Err(e);
                    }
                }
            }
        }
    }

    fn supports_complete(&self) -> bool {
        true
    }

    fn complete(&self, _job: &Job) -> Result<()> {
        self.should_complete.store(true, Ordering::SeqCst);
        Ok(())
    }

    fn cancel(&self, job: &Job, force: bool) -> bool {
        force || !job.is_ready()
    }
}

fn write_source(path: &std::path::Path, size: u64) -> Result<()> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::create(path)?;
    f.set_len(size)?;
    // Data in every other MiB, holes in between.
    let mut chunk = vec![0u8; CHUNK as usize];
    for (i, off) in (0..size).step_by(CHUNK as usize).enumerate() {
        if i % 2 == 0 {
            for (j, b) in chunk.iter_mut().enumerate() {
                *b = (j as u64 ^ off ^ 0x5a) as u8;
            }
            f.write_all_at(&chunk[..CHUNK.min(size - off) as usize], off)?;
        }
    }
    f.sync_all()?;
    Ok(())
}

fn demo(size_mib: u64, keep: bool) -> Result<()> {
    let dir = tempfile::Builder::new().prefix("blockjob-demo").tempdir()?;
    let src = dir.path().join("src.raw");
    let dst = dir.path().join("dst.raw");
    let size = size_mib.max(1) << 20;
    write_source(&src, size)?;
    std::fs::File::create(&dst)?.set_len(size)?;
    eprintln!(
        "demo: copying {} MiB from {} to {} (one injected ENOSPC on the target, on-target-error=stop)",
        size_mib,
        src.display(),
        dst.display()
    );
    let ctx = Context::new();
    let events = ctx.subscribe();
    ctx.blockdev_add(&json!({"driver":"raw","node-name":"src",
        "file":{"driver":"file","filename":src}}))?;
    ctx.blockdev_add(
        &json!({"driver":"raw","node-name":"dst","file":{"driver":"blkdebug",
        "image":{"driver":"file","filename":dst},
        "inject-error":[{"event":"write_aio","errno":libc::ENOSPC,"sector":2048,"once":true}]}}),
    )?;
    let job = ctx.block_job_create(
        Some("job0"),
        Some("src"),
        Box::new(CopyJob {
            src: ctx.lookup("src")?,
            dst: ctx.lookup("dst")?,
            on_source_error: BlockdevOnError::Report,
            on_target_error: BlockdevOnError::Stop,
            should_complete: AtomicBool::new(false),
        }),
        0,
        0,
        None,
    )?;
    ctx.lookup("dst")?.attach_job(&job, false);
    job.start()?;
    let mut out = std::io::stdout().lock();
    let mut failed = None;
    loop {
        let Some(ev) = events.next_timeout(Duration::from_secs(60)) else {
            return Err(Error::generic("demo: no event for 60 s"));
        };
        let _ = writeln!(out, "{}", ev.to_qmp_json());
        match &ev.data {
            EventData::JobStatusChange {
                status: JobStatus::Paused,
                ..
            } if job.iostatus() != blockjob::qapi::BlockDeviceIoStatus::Ok => {
                let info = job.query_block_job()?;
                eprintln!(
                    "demo: job stopped (io-status {}), resuming it",
                    info.io_status
                );
                job.user_resume()?;
            }
            EventData::BlockJobReady(_) => job.complete()?,
            EventData::BlockJobCompleted { error, .. } => failed = error.clone(),
            EventData::JobStatusChange {
                status: JobStatus::Null,
                ..
            } => break,
            _ => {}
        }
    }
    drop(out);
    if let Some(e) = failed {
        return Err(Error::generic(format!("demo: the job failed: {e}")));
    }
    let same = std::fs::read(&src)? == std::fs::read(&dst)?;
    eprintln!(
        "demo: target {} the source",
        if same {
            "is identical to"
        } else {
            "DIFFERS from"
        }
    );
    if keep {
        let p = dir.keep();
        eprintln!("demo: kept {}", p.display());
    }
    if same {
        Ok(())
    } else {
        Err(Error::generic("demo: copy differs from the source"))
    }
}

fn main() {
    let cli = Cli::parse();
    let r = match cli.cmd.unwrap_or(Cmd::Demo {
        size_mib: 64,
        keep: false,
    }) {
        Cmd::Demo { size_mib, keep } => demo(size_mib, keep),
    };
    if let Err(e) = r {
        eprintln!("blockjob: {e}");
        std::process::exit(1);
    }
}
