//! Mirror throughput: a 256 MiB raw image on /dev/shm (the temp dir when
//! there is no /dev/shm) mirrored to a target overwritten in place, with
//! QEMU's defaults, from `blockdev-mirror` to the end of the job (the
//! target is flushed before READY; the job completes at READY). Two
//! sources: fully allocated, and 50 % holes (2 MiB data, 2 MiB hole).
//! Beside it, the physical reference in the same group: a 1 MiB
//! pread/pwrite loop plus fdatasync over the same files.
//!
//! Run: `cargo bench --bench mirror`. The side-by-side comparison with
//! QEMU is `benches/compare_mirror.py`.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use blockjob::Context;
use blockjob::block_jobs::mirror::MirrorOptions;
use blockjob::qapi::{JobStatus, MirrorSyncMode};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use serde_json::json;

const MIB: u64 = 1 << 20;
const SIZE: u64 = 256 * MIB;

fn bench_dir() -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        tempfile::tempdir_in(shm).expect("temp dir in /dev/shm")
    } else {
        tempfile::tempdir().expect("temp dir")
    }
}

/// A source: random-looking data everywhere, or in every other 2 MiB.
fn source(dir: &Path, name: &str, holes: bool) -> PathBuf {
    let p = dir.join(name);
    let f = File::create(&p).unwrap();
    f.set_len(SIZE).unwrap();
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut buf = vec![0u8; MIB as usize];
    for off in (0..SIZE).step_by(MIB as usize) {
        if holes && (off / (2 * MIB)) % 2 == 1 {
            continue;
        }
        for w in buf.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            w.copy_from_slice(&x.to_le_bytes());
        }
        f.write_all_at(&buf, off).unwrap();
    }
    p
}

/// A fully allocated target of the same size.
fn target(dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(name);
    let f = File::create(&p).unwrap();
    let buf = vec![0xa5u8; MIB as usize];
    for off in (0..SIZE).step_by(MIB as usize) {
        f.write_all_at(&buf, off).unwrap();
    }
    p
}

fn mirror_once(src: &Path, dst: &Path) {
    let ctx = Context::new();
    ctx.blockdev_add(&json!({"driver":"raw","node-name":"src",
        "file":{"driver":"file","filename":src}}))
        .unwrap();
    ctx.blockdev_add(&json!({"driver":"raw","node-name":"dst",
        "file":{"driver":"file","filename":dst}}))
        .unwrap();
    let mut o = MirrorOptions::new("src", "dst", MirrorSyncMode::Full);
    o.job_id = Some("m".into());
    let job = ctx.blockdev_mirror(o).unwrap();
    let long = Duration::from_secs(120);
    job.wait_status(long, |s| s == JobStatus::Ready)
        .expect("ready");
    job.complete().unwrap();
    job.wait_status(long, |s| s == JobStatus::Null)
        .expect("done");
}

fn copy_loop(src: &Path, dst: &Path) {
    let (s, d) = (
        File::open(src).unwrap(),
        File::options().write(true).open(dst).unwrap(),
    );
    let mut buf = vec![0u8; MIB as usize];
    for off in (0..SIZE).step_by(MIB as usize) {
        s.read_exact_at(&mut buf, off).unwrap();
        d.write_all_at(&buf, off).unwrap();
    }
    d.sync_data().unwrap();
}

fn bench_mirror(c: &mut Criterion) {
    let dir = bench_dir();
    let dst = target(dir.path(), "dst.raw");
    for (name, holes) in [("full", false), ("holes50", true)] {
        let src = source(dir.path(), &format!("{name}.raw"), holes);
        let mut g = c.benchmark_group(format!("mirror_256MiB_{name}"));
        g.throughput(Throughput::Bytes(SIZE));
        g.sample_size(10);
        g.measurement_time(Duration::from_secs(10));
        // Whether the mirror ran last (a name filter may skip either).
        let mirrored = std::cell::Cell::new(false);
        g.bench_function("blockjob_mirror", |b| {
            b.iter(|| mirror_once(&src, &dst));
            mirrored.set(true);
        });
        g.bench_function("pread_pwrite_1MiB_loop", |b| {
            b.iter(|| copy_loop(&src, &dst));
            mirrored.set(false);
        });
        g.finish();
        if mirrored.get() {
            // Not assert_eq!: a failure would print 256 MiB twice.
            assert!(
                std::fs::read(&src).unwrap() == std::fs::read(&dst).unwrap(),
                "the mirror must copy"
            );
        }
    }
}

criterion_group!(benches, bench_mirror);
criterion_main!(benches);
