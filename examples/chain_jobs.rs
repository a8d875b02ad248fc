//! block-stream and block-commit on a qcow2 chain: our side of
//! `benches/compare_stream_commit.py`.
//!
//! Opens the chain of TOP (from the image headers, or with explicit node
//! names `base`, `mid`, `top` when `--base`/`--mid` give the lower files,
//! as the bench's QEMU side does), runs one job with job id `job0`, waits
//! for its end and prints one JSON line:
//!
//! ```text
//! {"op", "seconds", "ready-seconds", "cpu-seconds", "offset", "len", "error"}
//! ```
//!
//! `seconds`: from just before the job is created to `BLOCK_JOB_COMPLETED`
//! (opening the images and closing them afterwards are not counted);
//! `cpu-seconds`: getrusage of this process over the same interval;
//! `offset`/`len`: the progress in `BLOCK_JOB_COMPLETED`.
//!
//! Operations:
//! - `stream`: `block-stream` into TOP, down to `--base-node` (default:
//!   flatten the whole chain);
//! - `commit-intermediate`: `block-commit` of `--top-node` (default: the
//!   layer below TOP) into `--base-node` (default: the bottom);
//! - `commit-active`: `block-commit` of TOP into `--base-node` (default:
//!   the bottom); `job-complete` at `BLOCK_JOB_READY`.
//!
//! ```text
//! cargo build --release --example chain_jobs
//! target/release/examples/chain_jobs stream top.qcow2
//! target/release/examples/chain_jobs commit-intermediate top.qcow2 --base base.qcow2 --mid mid.qcow2
//! target/release/examples/chain_jobs commit-active top.qcow2 --base base.qcow2
//! ```

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use blockjob::Context;
use blockjob::block::chain;
use blockjob::block_jobs::commit::CommitOptions;
use blockjob::block_jobs::stream::StreamOptions;
use blockjob::events::EventData;
use blockjob::qapi::JobStatus;
use clap::{Parser, ValueEnum};
use common::cpu_time;
use serde_json::{Value, json};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Op {
    /// block-stream into TOP.
    Stream,
    /// block-commit of a layer below TOP.
    CommitIntermediate,
    /// block-commit of TOP (READY, then complete).
    CommitActive,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::Stream => "stream",
            Op::CommitIntermediate => "commit-intermediate",
            Op::CommitActive => "commit-active",
        }
    }
}

#[derive(Parser, Debug)]
#[command(about = "Run block-stream or block-commit on a qcow2 chain; prints one JSON line")]
struct Args {
    /// The job.
    #[arg(value_enum)]
    op: Op,
    /// The active layer (qcow2).
    top: PathBuf,
    /// Open the chain with explicit node names: this file is node `base`
    /// (default: the chain from TOP's headers).
    #[arg(long)]
    base: Option<PathBuf>,
    /// With `--base`: this file is node `mid`, between `base` and `top`.
    #[arg(long, requires = "base")]
    mid: Option<PathBuf>,
    /// `base-node` of the job (stream: the lowest layer kept; commit: the
    /// layer committed into).
    #[arg(long)]
    base_node: Option<String>,
    /// `top-node` of an intermediate commit (default: the layer below TOP).
    #[arg(long)]
    top_node: Option<String>,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 600.0)]
    timeout_secs: f64,
}

fn qcow2(name: &str, path: &std::path::Path, backing: Option<&str>) -> Value {
    let mut v = json!({"driver":"qcow2","node-name":name,
        "file":{"driver":"file","filename":path}});
    if let Some(b) = backing {
        v["backing"] = json!(b);
    }
    v
}

/// What the job did, for the JSON line.
#[derive(Default)]
struct Outcome {
    seconds: Option<f64>,
    ready_seconds: Option<f64>,
    cpu_seconds: Option<f64>,
    offset: Option<u64>,
    len: Option<u64>,
}

fn main() {
    let a = Args::parse();
    let mut out = Outcome::default();
    let r = run(&a, &mut out);
    let line = json!({
        "op": a.op.name(),
        "seconds": out.seconds,
        "ready-seconds": out.ready_seconds,
        "cpu-seconds": out.cpu_seconds,
        "offset": out.offset,
        "len": out.len,
        "error": r.as_ref().err().map(|e| e.to_string()),
    });
    println!("{line}");
    if r.is_err() {
        std::process::exit(1);
    }
}

fn run(a: &Args, out: &mut Outcome) -> Result<(), Box<dyn std::error::Error>> {
    let ctx = Context::new();
    match (&a.base, &a.mid) {
        (Some(base), mid) => {
            ctx.blockdev_add(&qcow2("base", base, None))?;
            if let Some(mid) = mid {
                ctx.blockdev_add(&qcow2("mid", mid, Some("base")))?;
            }
            let below = if mid.is_some() { "mid" } else { "base" };
            ctx.blockdev_add(&qcow2("top", &a.top, Some(below)))?;
        }
        (None, _) => {
            ctx.blockdev_add(&qcow2("top", &a.top, None))?;
        }
    }
    let layers = chain::layers(&ctx.lookup("top")?);
    if layers.len() < 2 {
        return Err(format!("{}: no backing file", a.top.display()).into());
    }
    let events = ctx.subscribe();

    let cpu0 = cpu_time();
    let t0 = Instant::now();
    let job = match a.op {
        Op::Stream => ctx.block_stream(StreamOptions {
            job_id: Some("job0".into()),
            base_node: a.base_node.clone(),
            ..StreamOptions::new("top")
        })?,
        Op::CommitIntermediate => {
            if layers.len() < 3 {
                return Err("an intermediate commit needs three layers".into());
            }
            ctx.block_commit(CommitOptions {
                job_id: Some("job0".into()),
                top_node: Some(
                    a.top_node
                        .clone()
                        .unwrap_or_else(|| layers[1].name().to_string()),
                ),
                base_node: a.base_node.clone(),
                ..CommitOptions::new("top")
            })?
        }
        Op::CommitActive => ctx.block_commit(CommitOptions {
            job_id: Some("job0".into()),
            base_node: a.base_node.clone(),
            ..CommitOptions::new("top")
        })?,
    };

    let timeout = Duration::from_secs_f64(a.timeout_secs);
    let error = loop {
        let left = timeout.saturating_sub(t0.elapsed());
        if left.is_zero() {
            let _ = job.user_cancel(true);
            return Err(format!("no BLOCK_JOB_COMPLETED after {} s", a.timeout_secs).into());
        }
        let Some(ev) = events.next_timeout(left) else {
            continue;
        };
        match &ev.data {
            EventData::BlockJobReady(_) if out.ready_seconds.is_none() => {
                out.ready_seconds = Some(t0.elapsed().as_secs_f64());
                job.complete()?;
            }
            EventData::BlockJobCompleted { progress, error: e } => {
                out.seconds = Some(t0.elapsed().as_secs_f64());
                out.cpu_seconds = Some(cpu_time() - cpu0);
                out.offset = Some(progress.offset);
                out.len = Some(progress.len);
                break e.clone();
            }
            EventData::BlockJobCancelled(_) => return Err("job cancelled".into()),
            _ => {}
        }
    };
    if job.wait_status(Duration::from_secs(60), |s| s == JobStatus::Null) != Some(JobStatus::Null) {
        return Err("job did not reach null after BLOCK_JOB_COMPLETED".into());
    }
    if let Some(e) = error {
        return Err(format!("job failed: {e}").into());
    }
    drop(job);
    drop(layers);
    drop(ctx);
    Ok(())
}
