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

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use blockjob::Context;
use blockjob::block::backend::{BackendOptions, BlockBackend};
use blockjob::block_jobs::mirror::MirrorOptions;
use blockjob::events::EventData;
use blockjob::qapi::{JobStatus, MirrorCopyMode, MirrorSyncMode};
use clap::Parser;
use serde_json::{Value, json};

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

/// The write sequence, shared with the Python side: splitmix64; each draw
/// `r` gives offset `(r % (size / io_size)) * io_size` and fill byte
/// `(r >> 56) | 1` (never zero, so no write is a zero write).
struct WriteSeq {
    state: u64,
    blocks: u64,
    io_size: u64,
}

impl WriteSeq {
    fn new(seed: u64, size: u64, io_size: u64) -> Self {
        WriteSeq {
            state: seed,
            blocks: size / io_size,
            io_size,
        }
    }

    fn next(&mut self) -> (u64, u8) {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        let r = z ^ (z >> 31);
        ((r % self.blocks) * self.io_size, ((r >> 56) as u8) | 1)
    }
}

const PHASES: [&str; 3] = ["baseline", "job", "after_ready"];
const STOP: usize = 3;

struct Writer {
    phase: Arc<AtomicUsize>,
    handle: std::thread::JoinHandle<Result<Vec<Vec<u64>>, String>>,
}

/// Start the paced writer: write i is issued at `start + i * interval`
/// (immediately if late), each timed on its own; samples (ns) per phase.
fn start_writer(blk: Arc<BlockBackend>, a: &Args, size: u64) -> Writer {
    let phase = Arc::new(AtomicUsize::new(0));
    let ph = phase.clone();
    let mut seq = WriteSeq::new(a.seed, size, a.io_size);
    let io_size = a.io_size as usize;
    let trace_slow = a.trace_slow_us.map(Duration::from_micros);
    let interval = Duration::from_secs_f64(a.io_size as f64 / (a.rate_mib * (1 << 20) as f64));
    let handle = std::thread::Builder::new()
        .name("guest-writer".into())
        .spawn(move || {
            let mut samples = vec![Vec::new(), Vec::new(), Vec::new()];
            let mut buf = vec![0u8; io_size];
            let start = Instant::now();
            let mut i: u32 = 0;
            loop {
                let next = start + interval * i;
                let now = Instant::now();
                if next > now {
                    std::thread::sleep(next - now);
                }
                // The phase at issue time (the stop may have come while
                // sleeping).
                let p = ph.load(Ordering::SeqCst);
                if p >= STOP {
                    break;
                }
                let (off, byte) = seq.next();
                buf.fill(byte);
                let t0 = Instant::now();
                blk.pwrite(off, &buf)
                    .map_err(|e| format!("guest write at {off}: {e:?}"))?;
                let lat = t0.elapsed();
                samples[p].push(lat.as_nanos() as u64);
                if trace_slow.is_some_and(|t| lat > t) {
                    eprintln!(
                        "slow write: t={:.6}s phase={} offset={off} lat={}us",
                        (t0 - start).as_secs_f64(),
                        PHASES[p],
                        lat.as_micros()
                    );
                }
                i += 1;
            }
            Ok(samples)
        })
        .expect("spawn writer");
    Writer { phase, handle }
}

/// Nearest-rank percentile of sorted samples, in µs.
fn pct_us(sorted: &[u64], p: f64) -> Value {
    if sorted.is_empty() {
        return Value::Null;
    }
    let rank = ((p / 100.0 * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    json!((sorted[rank - 1] as f64 / 100.0).round() / 10.0)
}

fn phase_stats(mut s: Vec<u64>, secs: f64, io_size: u64) -> Value {
    s.sort_unstable();
    json!({
        "p50": pct_us(&s, 50.0),
        "p99": pct_us(&s, 99.0),
        "max": pct_us(&s, 100.0),
        "n": s.len(),
        "secs": (secs * 1000.0).round() / 1000.0,
        "mib_s": if secs > 0.0 {
            json!(((s.len() as u64 * io_size) as f64 / (1 << 20) as f64 / secs * 10.0).round() / 10.0)
        } else {
            Value::Null
        },
    })
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

fn raw(name: &str, path: &Path) -> Value {
    json!({"driver":"raw","node-name":name,"file":{"driver":"file","filename":path}})
}

fn main() {
    let a = Args::parse();
    if let Some(n) = a.print_offsets {
        let mut seq = WriteSeq::new(a.seed, a.size, a.io_size);
        for _ in 0..n {
            let (off, b) = seq.next();
            println!("{off} {b}");
        }
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
    let writer = start_writer(blk.clone(), a, size);
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
