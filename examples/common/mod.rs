//! What the bench examples share (`mod common;` in each; Cargo builds no
//! example from this directory, it has no `main.rs`): the paced guest
//! writer and its write sequence (the Python side of the benches,
//! `benches/mirror_under_writes.py`, generates the same sequence), latency
//! percentiles, the process's CPU time and raw node options.

// Each example uses part of this module.
#![allow(dead_code)]

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use blockjob::block::backend::BlockBackend;
use serde_json::{Value, json};

/// The write sequence, shared with the Python side: splitmix64; each draw
/// `r` gives offset `(r % (size / io_size)) * io_size` and fill byte
/// `(r >> 56) | 1` (never zero, so no write is a zero write).
pub struct WriteSeq {
    state: u64,
    blocks: u64,
    io_size: u64,
}

impl WriteSeq {
    pub fn new(seed: u64, size: u64, io_size: u64) -> Self {
        WriteSeq {
            state: seed,
            blocks: size / io_size,
            io_size,
        }
    }

    pub fn next(&mut self) -> (u64, u8) {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        let r = z ^ (z >> 31);
        ((r % self.blocks) * self.io_size, ((r >> 56) as u8) | 1)
    }
}

/// Print the first `n` (offset, fill byte) pairs of the sequence, one per
/// line (`--print-offsets`: the Python side checks it generates the same).
pub fn print_offsets(n: usize, seed: u64, size: u64, io_size: u64) {
    let mut seq = WriteSeq::new(seed, size, io_size);
    for _ in 0..n {
        let (off, b) = seq.next();
        println!("{off} {b}");
    }
}

/// The writer's phases: 0, 1, 2 (their names are the caller's), then
/// [`STOP`].
pub const STOP: usize = 3;

/// What the paced writer does.
pub struct WriterOptions {
    /// Seed of the write sequence.
    pub seed: u64,
    /// Bytes per write (also the offset alignment).
    pub io_size: u64,
    /// Writes per second × io_size, in MiB/s.
    pub rate_mib: f64,
    /// Print each write slower than this to stderr.
    pub trace_slow: Option<Duration>,
    /// Names of phases 0, 1, 2 (for the trace).
    pub phases: [&'static str; 3],
}

/// A running paced writer.
pub struct Writer {
    /// The phase writes are counted in; [`STOP`] ends the writer.
    pub phase: Arc<AtomicUsize>,
    /// Writes issued so far (counted just before each starts): write i is
    /// draw i of the sequence, so writes `issued..` have not started yet.
    pub issued: Arc<AtomicUsize>,
    /// Latencies (ns) per phase, or the first write error.
    pub handle: std::thread::JoinHandle<Result<Vec<Vec<u64>>, String>>,
}

/// Start the paced writer: write i is issued at `start + i * interval`
/// (immediately if late), each timed on its own; samples (ns) per phase,
/// the phase read at issue time.
pub fn start_writer(blk: Arc<BlockBackend>, o: WriterOptions, size: u64) -> Writer {
    let phase = Arc::new(AtomicUsize::new(0));
    let ph = phase.clone();
    let issued = Arc::new(AtomicUsize::new(0));
    let n_issued = issued.clone();
    let mut seq = WriteSeq::new(o.seed, size, o.io_size);
    let io_size = o.io_size as usize;
    let interval = Duration::from_secs_f64(o.io_size as f64 / (o.rate_mib * (1 << 20) as f64));
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
                // SeqCst: a reader that sees the count after some event
                // knows every later write started after that event.
                n_issued.fetch_add(1, Ordering::SeqCst);
                let t0 = Instant::now();
                blk.pwrite(off, &buf)
                    .map_err(|e| format!("guest write at {off}: {e:?}"))?;
                let lat = t0.elapsed();
                samples[p].push(lat.as_nanos() as u64);
                if o.trace_slow.is_some_and(|t| lat > t) {
                    eprintln!(
                        "slow write: t={:.6}s phase={} offset={off} lat={}us",
                        (t0 - start).as_secs_f64(),
                        o.phases[p],
                        lat.as_micros()
                    );
                }
                i += 1;
            }
            Ok(samples)
        })
        .expect("spawn writer");
    Writer {
        phase,
        issued,
        handle,
    }
}

/// Nearest-rank percentile of sorted samples, in µs.
pub fn pct_us(sorted: &[u64], p: f64) -> Value {
    if sorted.is_empty() {
        return Value::Null;
    }
    let rank = ((p / 100.0 * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    json!((sorted[rank - 1] as f64 / 100.0).round() / 10.0)
}

/// p50/p99/max (µs), count, duration and achieved MiB/s of one phase.
pub fn phase_stats(mut s: Vec<u64>, secs: f64, io_size: u64) -> Value {
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

/// User + system CPU seconds of this process so far.
pub fn cpu_time() -> f64 {
    use nix::sys::resource::{UsageWho, getrusage};
    getrusage(UsageWho::RUSAGE_SELF).map_or(0.0, |u| {
        let t = |tv: nix::sys::time::TimeVal| tv.tv_sec() as f64 + tv.tv_usec() as f64 * 1e-6;
        t(u.user_time()) + t(u.system_time())
    })
}

/// blockdev-add options of a raw node over a file.
pub fn raw(name: &str, path: &Path) -> Value {
    json!({"driver":"raw","node-name":name,"file":{"driver":"file","filename":path}})
}
