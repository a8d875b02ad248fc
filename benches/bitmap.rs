//! Dirty-bitmap benchmarks: each operation of the lock-free hierarchical
//! bitmap beside a `Mutex<BitVec>` doing the same work, in one criterion
//! group, so the ratio shows in one run. The bitmap covers 1 TiB at
//! 64 KiB granularity (16 Mi bits), the size the targets are stated for.
//!
//! Run: `cargo bench --bench bitmap`.

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

use bitvec::prelude::*;
use blockjob::bitmap::DirtyBitmap;
use criterion::{Criterion, criterion_group, criterion_main};

const K: u64 = 1024;
const T: u64 = 1 << 40;
const GRAN: u64 = 64 * K;
const BITS: usize = (T / GRAN) as usize;

/// The baseline: a plain bit vector behind a mutex.
struct Locked(Mutex<BitVec<u64, Lsb0>>);

impl Locked {
    fn new() -> Self {
        Locked(Mutex::new(bitvec![u64, Lsb0; 0; BITS]))
    }
    fn set_range(&self, offset: u64, len: u64) {
        let (f, l) = (
            (offset / GRAN) as usize,
            ((offset + len - 1) / GRAN) as usize,
        );
        self.0.lock().unwrap()[f..=l].fill(true);
    }
    fn next_dirty(&self, offset: u64) -> Option<u64> {
        let b = self.0.lock().unwrap();
        b[(offset / GRAN) as usize..]
            .first_one()
            .map(|i| offset + i as u64 * GRAN)
    }
    fn take_next(&self, offset: u64, max: u64) -> Option<(u64, u64)> {
        let mut b = self.0.lock().unwrap();
        let from = (offset / GRAN) as usize;
        let first = from + b[from..].first_one()?;
        let run = b[first..].first_zero().unwrap_or(BITS - first);
        let n = run.min((max / GRAN) as usize).max(1);
        b[first..first + n].fill(false);
        Some((first as u64 * GRAN, n as u64 * GRAN))
    }
    fn count(&self) -> usize {
        self.0.lock().unwrap().count_ones()
    }
}

fn bench_memory() {
    let b = DirtyBitmap::new(T, GRAN).unwrap();
    eprintln!(
        "memory: 1 TiB at 64 KiB granularity = {} bytes ({:.3} MiB); BitVec: {} bytes",
        b.memory(),
        b.memory() as f64 / (1 << 20) as f64,
        BITS / 8
    );
}

fn set_one_64k(c: &mut Criterion) {
    bench_memory();
    let mut g = c.benchmark_group("set_64KiB");
    let word = AtomicU64::new(0);
    g.bench_function("single_fetch_or", |b| {
        let mut i = 0u64;
        b.iter(|| {
            i = i.wrapping_add(1);
            black_box(word.fetch_or(1 << (i % 64), Ordering::SeqCst))
        })
    });
    let bm = DirtyBitmap::new(T, GRAN).unwrap();
    let mut off = 0u64;
    g.bench_function("hbitmap", |b| {
        b.iter(|| {
            off = (off + 7919 * GRAN) % T;
            bm.set_range(black_box(off), GRAN)
        })
    });
    let base = Locked::new();
    let mut off = 0u64;
    g.bench_function("mutex_bitvec", |b| {
        b.iter(|| {
            off = (off + 7919 * GRAN) % T;
            base.set_range(black_box(off), GRAN)
        })
    });
    g.finish();
}

fn set_one_1m(c: &mut Criterion) {
    let mut g = c.benchmark_group("set_1MiB");
    let bm = DirtyBitmap::new(T, GRAN).unwrap();
    let mut off = 0u64;
    g.bench_function("hbitmap", |b| {
        b.iter(|| {
            off = (off + 7919 * (1 << 20)) % (T - (1 << 20));
            bm.set_range(black_box(off), 1 << 20)
        })
    });
    let base = Locked::new();
    let mut off = 0u64;
    g.bench_function("mutex_bitvec", |b| {
        b.iter(|| {
            off = (off + 7919 * (1 << 20)) % (T - (1 << 20));
            base.set_range(black_box(off), 1 << 20)
        })
    });
    g.finish();
}

/// Take the next 1 MiB dirty area of a bitmap with 1 MiB dirty every
/// 64 MiB, and set it again so the state stays the same.
fn take_next(c: &mut Criterion) {
    let mut g = c.benchmark_group("take_next_area");
    let stride = 64 << 20;
    let bm = DirtyBitmap::new(T, GRAN).unwrap();
    let base = Locked::new();
    for off in (0..T).step_by(stride) {
        bm.set_range(off, 1 << 20);
        base.set_range(off, 1 << 20);
    }
    let mut pos = 0u64;
    g.bench_function("hbitmap", |b| {
        b.iter(|| {
            let (o, l) = bm.take_next_area(pos, 1 << 20).unwrap_or((0, 0));
            bm.set_range(o, l.max(1));
            pos = (o + l) % T;
        })
    });
    let mut pos = 0u64;
    g.bench_function("mutex_bitvec", |b| {
        b.iter(|| {
            let (o, l) = base.take_next(pos, 1 << 20).unwrap_or((0, GRAN));
            base.set_range(o, l);
            pos = (o + l) % T;
        })
    });
    g.finish();
}

fn next_dirty_at_end(c: &mut Criterion) {
    let mut g = c.benchmark_group("next_dirty_1TiB_one_bit_at_end");
    let bm = DirtyBitmap::new(T, GRAN).unwrap();
    bm.set_range(T - GRAN, 1);
    g.bench_function("hbitmap", |b| {
        b.iter(|| black_box(bm.next_dirty(black_box(0))))
    });
    let base = Locked::new();
    base.set_range(T - GRAN, 1);
    g.bench_function("mutex_bitvec", |b| {
        b.iter(|| black_box(base.next_dirty(black_box(0))))
    });
    g.finish();
}

fn dirty_count(c: &mut Criterion) {
    let mut g = c.benchmark_group("dirty_count_1TiB");
    let bm = DirtyBitmap::new(T, GRAN).unwrap();
    let base = Locked::new();
    for off in (0..T).step_by(1 << 30) {
        bm.set_range(off, 1 << 20);
        base.set_range(off, 1 << 20);
    }
    g.bench_function("hbitmap", |b| b.iter(|| black_box(bm.count())));
    g.bench_function("mutex_bitvec", |b| b.iter(|| black_box(base.count())));
    g.finish();
}

/// Two threads each set 64 KiB ranges in the same 1 GiB region (so they
/// share summary words); time per set, whole run.
fn contended_set(c: &mut Criterion) {
    let mut g = c.benchmark_group("set_64KiB_2_threads");
    g.measurement_time(Duration::from_secs(5));
    fn run<S: Send + Sync + 'static>(s: Arc<S>, iters: u64, set: fn(&S, u64)) -> Duration {
        let barrier = Arc::new(Barrier::new(3));
        let threads: Vec<_> = (0..2u64)
            .map(|t| {
                let s = s.clone();
                let barrier = barrier.clone();
                std::thread::spawn(move || {
                    barrier.wait();
                    let mut off = t * 8191 * GRAN;
                    for _ in 0..iters {
                        off = (off + 7919 * GRAN) % (1 << 30);
                        set(&s, off);
                    }
                })
            })
            .collect();
        barrier.wait();
        let start = Instant::now();
        for t in threads {
            t.join().unwrap();
        }
        // Per set: both threads did `iters` sets in this time.
        start.elapsed() / 2
    }
    let bm = Arc::new(DirtyBitmap::new(T, GRAN).unwrap());
    g.bench_function("hbitmap", |b| {
        b.iter_custom(|iters| run(bm.clone(), iters, |s, off| s.set_range(off, GRAN)))
    });
    let base = Arc::new(Locked::new());
    g.bench_function("mutex_bitvec", |b| {
        b.iter_custom(|iters| run(base.clone(), iters, |s, off| s.set_range(off, GRAN)))
    });
    g.finish();
}

criterion_group!(
    benches,
    set_one_64k,
    set_one_1m,
    take_next,
    next_dirty_at_end,
    dirty_count,
    contended_set
);
criterion_main!(benches);
