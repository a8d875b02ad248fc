//! `blockdev-backup` with guest writes: our side of
//! `benches/backup_incremental.py` and `benches/backup_under_writes.py`.
//! Opens SRC and DST as nodes `src` and `dst` (raw or qcow2 over a file),
//! attaches a guest device (BlockBackend) to `src`, and prints one JSON
//! line.
//!
//! - `incremental`: `block-dirty-bitmap-add src b0` (granularity
//!   `--granularity`), then one guest write of `--io-size` bytes at each
//!   offset of `--offsets` (a file of `OFFSET FILL_BYTE` lines), then
//!   `blockdev-backup sync=bitmap bitmap=b0 bitmap-mode=on-success` to
//!   `dst`. `seconds`: from just before the job is created to
//!   `BLOCK_JOB_COMPLETED`; `cpu-seconds`: getrusage of this process over
//!   the same interval; `bitmap-count-after`: b0's dirty bytes once the job
//!   is gone (0 when on-success cleared what was copied).
//! - `under-writes`: a paced guest writer (the sequence of
//!   `examples/common`, as in `mirror_under_writes`) runs `--baseline-secs`
//!   without a job, then during `blockdev-backup sync=full` (start to
//!   `BLOCK_JOB_COMPLETED`: every write goes through the copy-before-write
//!   filter), then `--after-secs` after it; latency p50/p99 per phase.
//!   The target is not checked here (the bench checks it: it holds the
//!   source as it was when the job started); `issued_at_start` is the
//!   number of writes issued when `blockdev-backup` returned.
//!
//! ```text
//! cargo build --release --example backup_bench
//! target/release/examples/backup_bench incremental --src s.raw --dst d.raw --offsets offs.txt
//! target/release/examples/backup_bench under-writes --src s.raw --dst d.raw --rate-mib 50
//! ```

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use blockjob::Context;
use blockjob::block::backend::BackendOptions;
use blockjob::block_jobs::backup::BackupOptions;
use blockjob::engine::Job;
use blockjob::events::{EventData, Subscription};
use blockjob::qapi::{BitmapSyncMode, JobStatus, MirrorSyncMode};
use clap::{Args as ClapArgs, Parser, Subcommand};
use common::{STOP, WriterOptions, cpu_time, phase_stats, start_writer};
use serde_json::{Value, json};

const PHASES: [&str; 3] = ["baseline", "job", "after"];

#[derive(Parser, Debug)]
#[command(about = "blockdev-backup under guest writes; prints one JSON line")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Dirty bitmap + guest writes, then an incremental (sync=bitmap) backup.
    Incremental(Incremental),
    /// A full backup while a paced guest writer runs; latency per phase.
    UnderWrites(UnderWrites),
}

#[derive(ClapArgs, Debug)]
struct Nodes {
    /// Source image.
    #[arg(long, required_unless_present = "print_offsets")]
    src: Option<PathBuf>,
    /// Target image (same virtual size).
    #[arg(long, required_unless_present = "print_offsets")]
    dst: Option<PathBuf>,
    /// Format of both images: raw or qcow2.
    #[arg(long, default_value = "raw")]
    format: String,
    /// Give up waiting for the job after this many seconds.
    #[arg(long, default_value_t = 600.0)]
    timeout_secs: f64,
    /// Only print the first N (offset, fill byte) pairs of the write
    /// sequence for an image of `--size` bytes and exit (under-writes).
    #[arg(long)]
    print_offsets: Option<usize>,
}

#[derive(ClapArgs, Debug)]
struct Incremental {
    #[command(flatten)]
    nodes: Nodes,
    /// The guest writes: `OFFSET FILL_BYTE` per line.
    #[arg(long)]
    offsets: PathBuf,
    /// Bytes per guest write.
    #[arg(long, default_value_t = 65536)]
    io_size: usize,
    /// Granularity of bitmap b0.
    #[arg(long, default_value_t = 65536)]
    granularity: u32,
}

#[derive(ClapArgs, Debug)]
struct UnderWrites {
    #[command(flatten)]
    nodes: Nodes,
    /// Guest write rate, MiB/s.
    #[arg(long, default_value_t = 50.0)]
    rate_mib: f64,
    /// Bytes per guest write (also the offset alignment).
    #[arg(long, default_value_t = 65536)]
    io_size: u64,
    /// Seed of the write sequence.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Seconds of guest writes before the job starts.
    #[arg(long, default_value_t = 3.0)]
    baseline_secs: f64,
    /// Seconds of guest writes after BLOCK_JOB_COMPLETED.
    #[arg(long, default_value_t = 1.0)]
    after_secs: f64,
    /// Backup speed limit, bytes/s (0 = unlimited).
    #[arg(long, default_value_t = 0)]
    speed: i64,
    /// Backup `x-perf` `max-workers` (copies outstanding at once; 0: the
    /// default, 64).
    #[arg(long, default_value_t = 0)]
    max_workers: i64,
    /// Print each guest write slower than this many µs to stderr.
    #[arg(long)]
    trace_slow_us: Option<u64>,
    /// Image size for `--print-offsets`.
    #[arg(long, default_value_t = 1 << 30)]
    size: u64,
}

type Res<T> = Result<T, Box<dyn std::error::Error>>;

fn node(name: &str, format: &str, path: &Path) -> Res<Value> {
    if format != "raw" && format != "qcow2" {
        return Err(format!("--format {format}: raw or qcow2").into());
    }
    Ok(json!({"driver":format,"node-name":name,"file":{"driver":"file","filename":path}}))
}

/// Open `src` and `dst` as nodes of those names.
fn open(n: &Nodes) -> Res<Context> {
    let ctx = Context::new();
    let (src, dst) = (n.src.as_deref().unwrap(), n.dst.as_deref().unwrap());
    ctx.blockdev_add(&node("src", &n.format, src)?)?;
    ctx.blockdev_add(&node("dst", &n.format, dst)?)?;
    Ok(ctx)
}

/// Wait for the job's BLOCK_JOB_COMPLETED (an error in it fails), then for
/// the job to be gone; the event's (offset, len) and when it came.
fn wait_completed(
    events: &Subscription,
    job: &Arc<Job>,
    t0: Instant,
    timeout: Duration,
) -> Res<(u64, u64, Instant)> {
    loop {
        let left = timeout.saturating_sub(t0.elapsed());
        if left.is_zero() {
            let _ = job.user_cancel(true);
            return Err(format!("no BLOCK_JOB_COMPLETED after {timeout:?}").into());
        }
        let Some(ev) = events.next_timeout(left) else {
            continue;
        };
        match &ev.data {
            EventData::BlockJobCompleted { progress, error } => {
                let t = Instant::now();
                if job.wait_status(Duration::from_secs(60), |s| s == JobStatus::Null)
                    != Some(JobStatus::Null)
                {
                    return Err("job did not reach null after BLOCK_JOB_COMPLETED".into());
                }
                if let Some(e) = error {
                    return Err(format!("job failed: {e}").into());
                }
                return Ok((progress.offset, progress.len, t));
            }
            EventData::BlockJobCancelled(_) => return Err("job cancelled".into()),
            _ => {}
        }
    }
}

fn main() {
    let cli = Cli::parse();
    let r = match &cli.cmd {
        Cmd::Incremental(a) => incremental(a),
        Cmd::UnderWrites(a) => {
            if let Some(n) = a.nodes.print_offsets {
                common::print_offsets(n, a.seed, a.size, a.io_size);
                return;
            }
            under_writes(a)
        }
    };
    match r {
        Ok(v) => println!("{v}"),
        Err(e) => {
            println!("{}", json!({"error": e.to_string()}));
            std::process::exit(1);
        }
    }
}

fn read_offsets(path: &Path) -> Res<Vec<(u64, u8)>> {
    let text = std::fs::read_to_string(path)?;
    let mut out = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let mut it = line.split_whitespace();
        let (Some(o), Some(b)) = (it.next(), it.next()) else {
            return Err(format!("{}: bad line {line:?}", path.display()).into());
        };
        out.push((o.parse()?, b.parse()?));
    }
    Ok(out)
}

fn incremental(a: &Incremental) -> Res<Value> {
    let writes = read_offsets(&a.offsets)?;
    let ctx = open(&a.nodes)?;
    let events = ctx.subscribe();
    let blk = ctx.blk_new("src", BackendOptions::default())?;
    ctx.block_dirty_bitmap_add("src", "b0", Some(a.granularity), None, None)?;

    let mut buf = vec![0u8; a.io_size];
    let tw = Instant::now();
    for &(off, byte) in &writes {
        buf.fill(byte);
        blk.pwrite(off, &buf)
            .map_err(|e| format!("guest write at {off}: {e:?}"))?;
    }
    let write_secs = tw.elapsed().as_secs_f64();
    let dirty_before = bitmap_count(&ctx, "b0")?;

    let mut o = BackupOptions::new("src", "dst", MirrorSyncMode::Bitmap);
    o.job_id = Some("b".into());
    o.bitmap = Some("b0".into());
    o.bitmap_mode = Some(BitmapSyncMode::OnSuccess);
    let cpu0 = cpu_time();
    let t0 = Instant::now();
    let job = ctx.blockdev_backup(o)?;
    let timeout = Duration::from_secs_f64(a.nodes.timeout_secs);
    let (offset, len, t1) = wait_completed(&events, &job, t0, timeout)?;
    let cpu = cpu_time() - cpu0;
    let secs = (t1 - t0).as_secs_f64();
    drop(job);
    let after = bitmap_count(&ctx, "b0")?;
    drop(blk);
    drop(ctx);
    Ok(json!({
        "impl": "ours",
        "writes": writes.len(),
        "write-seconds": write_secs,
        "dirty-before": dirty_before,
        "seconds": secs,
        "cpu-seconds": cpu,
        "offset": offset,
        "len": len,
        "bitmap-count-after": after,
    }))
}

fn bitmap_count(ctx: &Context, name: &str) -> Res<u64> {
    ctx.query_dirty_bitmaps("src")?
        .into_iter()
        .find(|b| b.name.as_deref() == Some(name))
        .map(|b| b.count)
        .ok_or_else(|| format!("no bitmap {name}").into())
}

fn under_writes(a: &UnderWrites) -> Res<Value> {
    if a.rate_mib <= 0.0 || a.io_size == 0 {
        return Err("--rate-mib and --io-size must be positive".into());
    }
    let ctx = open(&a.nodes)?;
    let events = ctx.subscribe();
    let blk = Arc::new(ctx.blk_new("src", BackendOptions::default())?);
    let size = blk.len()?;
    if size < a.io_size {
        return Err("image smaller than one write".into());
    }

    let t_start = Instant::now();
    let writer = start_writer(
        blk.clone(),
        WriterOptions {
            seed: a.seed,
            io_size: a.io_size,
            rate_mib: a.rate_mib,
            trace_slow: a.trace_slow_us.map(Duration::from_micros),
            phases: PHASES,
        },
        size,
    );
    std::thread::sleep(Duration::from_secs_f64(a.baseline_secs));

    let mut o = BackupOptions::new("src", "dst", MirrorSyncMode::Full);
    o.job_id = Some("b".into());
    o.speed = a.speed;
    if a.max_workers > 0 {
        o.perf.max_workers = a.max_workers;
    }
    writer.phase.store(1, Ordering::SeqCst);
    let cpu0 = cpu_time();
    let t_job = Instant::now();
    let mut issued_at_start = 0;
    let r = ctx
        .blockdev_backup(o)
        .map_err(|e| e.into())
        .and_then(|job| {
            // The filter is in: writes from here on go through it.
            issued_at_start = writer.issued.load(Ordering::SeqCst);
            let timeout = Duration::from_secs_f64(a.nodes.timeout_secs);
            wait_completed(&events, &job, t_job, timeout)
        });
    let cpu = cpu_time() - cpu0;
    let t_done = Instant::now();
    if r.is_ok() {
        writer.phase.store(2, Ordering::SeqCst);
        std::thread::sleep(Duration::from_secs_f64(a.after_secs));
    }
    let t_stop = Instant::now();
    writer.phase.store(STOP, Ordering::SeqCst);
    let samples = writer
        .handle
        .join()
        .map_err(|_| "writer panicked")?
        .map_err(|e| e.to_string())?;
    let (offset, len, t_completed) = r?;
    drop(blk);
    drop(ctx);

    let secs = [
        (t_job - t_start).as_secs_f64(),
        (t_done - t_job).as_secs_f64(),
        (t_stop - t_done).as_secs_f64(),
    ];
    let mut lat = serde_json::Map::new();
    for ((name, secs), s) in PHASES.iter().zip(secs).zip(samples) {
        lat.insert(name.to_string(), phase_stats(s, secs, a.io_size));
    }
    Ok(json!({
        "impl": "ours",
        "rate_mib": a.rate_mib,
        "io_size": a.io_size,
        "size": size,
        "job_seconds": (t_completed - t_job).as_secs_f64(),
        "cpu_seconds": cpu,
        "offset": offset,
        "len": len,
        // Writes issued when blockdev-backup returned (the filter in
        // place): the point in time lies between the last baseline write
        // and these.
        "issued_at_start": issued_at_start,
        "lat_us": lat,
    }))
}
