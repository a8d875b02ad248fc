//! Mirror under concurrent guest writes: our side of
//! `benches/mirror_under_writes.py`.
//!
//! Opens SRC and DST as raw nodes, attaches a guest device (BlockBackend) to
//! SRC and runs a paced writer on it: `io-size` byte writes at `rate-mib`
//! MiB/s to aligned offsets from a seeded splitmix64 sequence (the bench's
//! QEMU side generates the same sequence in Python). After `baseline-secs`
//! of writes without a job it starts `blockdev-mirror sync=full` SRC -> DST
//! and measures the time to `BLOCK_JOB_READY` and the progress offset at
//! READY (`offset - image size` = bytes copied twice). After READY the writer keeps
//! going for `after-secs`, then stops; the job is completed and the target
//! compared with the source. Prints one JSON line.
//!
//! ```text
//! cargo build --release --example mirror_under_writes
//! target/release/examples/mirror_under_writes --src S --dst D --rate-mib 50 \
//!     --io-size 65536 --copy-mode background --seed 1 --baseline-secs 3 --timeout-secs 60
//! ```

mod common;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use blockjob::Context;
use blockjob::block::backend::BackendOptions;
use blockjob::block_jobs::mirror::MirrorOptions;
use blockjob::events::EventData;
use blockjob::qapi::{JobStatus, MirrorCopyMode, MirrorSyncMode};
use clap::Parser;
use common::{STOP, WriterOptions, phase_stats, raw, start_writer};
use serde_json::{Value, json};

const PHASES: [&str; 3] = ["baseline", "job", "after_ready"];

#[derive(Parser, Debug)]
#[command(about = "Mirror SRC to DST under a paced guest writer; prints one JSON line")]
struct Args {
    /// Source image (raw, fully allocated).
    #[arg(long, required_unless_present = "print_offsets")]
    src: Option<PathBuf>,
    /// Target image (raw, same size).
    #[arg(long, required_unless_present = "print_offsets")]
    dst: Option<PathBuf>,
    /// Guest write rate, MiB/s.
    #[arg(long, default_value_t = 50.0)]
    rate_mib: f64,
    /// Bytes per guest write (also the offset alignment).
    #[arg(long, default_value_t = 65536)]
    io_size: u64,
    /// `background` or `write-blocking`.
    #[arg(long, default_value = "background")]
    copy_mode: String,
    /// Seed of the write sequence.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Seconds of guest writes before the job starts.
    #[arg(long, default_value_t = 3.0)]
    baseline_secs: f64,
    /// Seconds of guest writes after READY, before the writer stops.
    #[arg(long, default_value_t = 1.0)]
    after_secs: f64,
    /// Give up waiting for READY under writes after this many seconds
    /// (then the writer stops and the job is let converge).
    #[arg(long, default_value_t = 60.0)]
    timeout_secs: f64,
    /// Mirror granularity (0 = default).
    #[arg(long, default_value_t = 0)]
    granularity: u64,
    /// Mirror speed limit, bytes/s (0 = unlimited).
    #[arg(long, default_value_t = 0)]
    speed: i64,
    /// Mirror buf-size (0 = default).
    #[arg(long, default_value_t = 0)]
    buf_size: i64,
    /// Only print the first N (offset, fill byte) pairs of the write
    /// sequence for an image of `--size` bytes, one per line, and exit.
    #[arg(long)]
    print_offsets: Option<usize>,
    /// Print each guest write slower than this many µs to stderr (time
    /// since the writer started, phase, offset, latency).
    #[arg(long)]
    trace_slow_us: Option<u64>,
    /// Image size for `--print-offsets`.
    #[arg(long, default_value_t = 1 << 30)]
    size: u64,
}

fn files_identical(a: &Path, b: &Path) -> std::io::Result<bool> {
    let (mut fa, mut fb) = (std::fs::File::open(a)?, std::fs::File::open(b)?);
    if fa.metadata()?.len() != fb.metadata()?.len() {
        return Ok(false);
    }
    let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    loop {
        let n = fa.read(&mut ba)?;
        if n == 0 {
            return Ok(true);
        }
        fb.read_exact(&mut bb[..n])?;
        if ba[..n] != bb[..n] {
            return Ok(false);
        }
    }
}

/// Bytes this process has read with read-like system calls
/// (`/proc/self/io` rchar): the guest only writes, so during the job these
/// are the job's source reads.
fn rchar() -> Option<u64> {
    let io = std::fs::read_to_string("/proc/self/io").ok()?;
    io.lines()
        .find_map(|l| l.strip_prefix("rchar:"))
        .and_then(|v| v.trim().parse().ok())
}

fn main() {
    let a = Args::parse();
    if let Some(n) = a.print_offsets {
        common::print_offsets(n, a.seed, a.size, a.io_size);
        return;
    }
    if let Err(e) = run(&a) {
        eprintln!("mirror_under_writes: {e}");
        std::process::exit(1);
    }
}

fn run(a: &Args) -> Result<(), Box<dyn std::error::Error>> {
    let mode: MirrorCopyMode = a.copy_mode.parse()?;
    let (src, dst) = (a.src.as_deref().unwrap(), a.dst.as_deref().unwrap());
    if a.rate_mib <= 0.0 || a.io_size == 0 {
        return Err("--rate-mib and --io-size must be positive".into());
    }

    let ctx = Context::new();
    let events = ctx.subscribe();
    ctx.blockdev_add(&raw("src", src))?;
    ctx.blockdev_add(&raw("dst", dst))?;
    let blk = Arc::new(ctx.blk_new("src", BackendOptions::default())?);
    let size = blk.len()?;
    if size < a.io_size {
        return Err("image smaller than one write".into());
    }

    let rchar_start = rchar();
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

    let mut o = MirrorOptions::new("src", "dst", MirrorSyncMode::Full);
    o.job_id = Some("m".into());
    o.copy_mode = mode;
    o.granularity = a.granularity;
    o.buf_size = a.buf_size;
    o.speed = a.speed;
    writer.phase.store(1, Ordering::SeqCst);
    let rchar_job = rchar();
    let t_job = Instant::now();
    let job = ctx.blockdev_mirror(o)?;
    if a.trace_slow_us.is_some() {
        eprintln!(
            "job started: t={:.6}s (blockdev-mirror took {}us)",
            (t_job - t_start).as_secs_f64(),
            t_job.elapsed().as_micros()
        );
    }

    // Wait for READY under writes.
    let timeout = Duration::from_secs_f64(a.timeout_secs);
    let mut ready: Option<(Duration, u64, u64)> = None;
    let mut failure: Option<String> = None;
    while ready.is_none() && failure.is_none() {
        let left = timeout.saturating_sub(t_job.elapsed());
        if left.is_zero() {
            break;
        }
        let Some(ev) = events.next_timeout(left) else {
            continue;
        };
        match &ev.data {
            EventData::BlockJobReady(p) => ready = Some((t_job.elapsed(), p.len, p.offset)),
            EventData::BlockJobCompleted { error, .. } => {
                failure = Some(
                    error
                        .clone()
                        .unwrap_or_else(|| "completed before READY".into()),
                )
            }
            EventData::BlockJobCancelled(_) => failure = Some("cancelled".into()),
            _ => {}
        }
    }
    let t_ready = Instant::now();
    let rchar_ready = rchar();
    if a.trace_slow_us.is_some() {
        eprintln!("READY: t={:.6}s", (t_ready - t_start).as_secs_f64());
    }
    let info = job.query_block_job()?;
    let actively_synced = info.actively_synced;
    if ready.is_some() {
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
    if let Some(f) = failure {
        return Err(format!("job failed before READY: {f}").into());
    }

    // Without READY under writes: the writer has stopped, let the job
    // converge (untimed but reported) so that it can still be verified.
    let mut ready_after_stop_s = Value::Null;
    let (len, offset_at_ready) = match ready {
        Some((_, len, off)) => (json!(len), json!(off)),
        None => {
            let deadline = Instant::now() + Duration::from_secs(300);
            loop {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err("no READY even after the writer stopped".into());
                }
                match events.next_timeout(left).as_deref().map(|e| &e.data) {
                    Some(EventData::BlockJobReady(_)) => break,
                    Some(EventData::BlockJobCompleted { error, .. }) => {
                        return Err(format!("job failed: {error:?}").into());
                    }
                    _ => {}
                }
            }
            ready_after_stop_s = json!(t_stop.elapsed().as_secs_f64());
            (json!(info.len), Value::Null)
        }
    };

    job.complete()?;
    if job.wait_status(Duration::from_secs(120), |s| s == JobStatus::Null) != Some(JobStatus::Null)
    {
        return Err("job did not finish after complete".into());
    }
    let mut completed_error = None;
    while let Some(ev) = events.try_next() {
        if let EventData::BlockJobCompleted { error, .. } = &ev.data {
            completed_error = error.clone();
        }
    }
    if let Some(e) = completed_error {
        return Err(format!("job completed with error: {e}").into());
    }
    drop(job);
    drop(blk);
    drop(ctx);
    let identical = files_identical(src, dst)?;

    let mut it = samples.into_iter();
    let secs = [
        (t_job - t_start).as_secs_f64(),
        (t_ready - t_job).as_secs_f64(),
        (t_stop - t_ready).as_secs_f64(),
    ];
    let mut lat = serde_json::Map::new();
    for (name, secs) in PHASES.iter().zip(secs) {
        lat.insert(
            name.to_string(),
            phase_stats(it.next().unwrap(), secs, a.io_size),
        );
    }
    let out = json!({
        "impl": "ours",
        "copy_mode": mode.as_str(),
        "rate_mib": a.rate_mib,
        "io_size": a.io_size,
        "ready_delay_s": ready.map(|(d, _, _)| (d.as_secs_f64() * 1000.0).round() / 1000.0),
        "len": len,
        "offset_at_ready": offset_at_ready,
        // The first pass of sync=full over a fully allocated source copies
        // exactly the image; the event's len has grown by the re-dirtied
        // bytes by then, so compare with the image size, not with len.
        "size": size,
        "copied_twice": ready.map(|(_, _, off)| off as i64 - size as i64),
        "offset_at_timeout": if ready.is_none() { json!(info.offset) } else { Value::Null },
        "ready_after_stop_s": ready_after_stop_s,
        "actively_synced": actively_synced,
        // Source bytes read between blockdev-mirror and READY (or the
        // timeout), and during the baseline (noise: should be ~0).
        "src_read_job": rchar_ready.zip(rchar_job).map(|(b, a)| b - a),
        "rchar_baseline": rchar_job.zip(rchar_start).map(|(b, a)| b - a),
        "lat_us": lat,
        "identical": identical,
    });
    println!("{out}");
    Ok(())
}
