//! Stress: pause, resume, set-speed, complete and cancel at random moments
//! on mirrors in both copy modes, some with a guest writing, some with a
//! source that fails now and then. Every job must end (no deadlock: each
//! wait is bounded and a timeout fails with the job's state), a completed
//! job must leave an identical target, and after each round the process is
//! back to the threads and file descriptors it had before.
//!
//! One test in this file, so that no other test's threads are counted.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use blockjob::Context;
use blockjob::block::backend::BackendOptions;
use blockjob::block_jobs::mirror::MirrorOptions;
use blockjob::engine::JobChange;
use blockjob::qapi::{BlockdevOnError, JobStatus, MirrorCopyMode, MirrorSyncMode};
use serde_json::json;

const MIB: u64 = 1 << 20;
const SIZE: u64 = 16 * MIB;
const ROUNDS: u64 = 100;
const LONG: Duration = Duration::from_secs(30);

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn count_dir(path: &str) -> usize {
    std::fs::read_dir(path).unwrap().count()
}

/// Threads and fds return to `want` (threads exit asynchronously).
fn settle(want: (usize, usize), round: u64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let now = (count_dir("/proc/self/task"), count_dir("/proc/self/fd"));
        if now == want {
            return;
        }
        if Instant::now() > deadline {
            let fds: Vec<String> = std::fs::read_dir("/proc/self/fd")
                .unwrap()
                .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
                .map(|p| p.display().to_string())
                .collect();
            panic!("round {round}: (threads, fds) = {now:?}, expected {want:?}; fds: {fds:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn dir() -> tempfile::TempDir {
    if std::path::Path::new("/dev/shm").is_dir() {
        tempfile::tempdir_in("/dev/shm").unwrap()
    } else {
        tempfile::tempdir().unwrap()
    }
}

/// One round; true when the job completed with a pivot.
fn round(seed: u64, dir: &std::path::Path) -> bool {
    use std::os::unix::fs::FileExt;
    let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let src = dir.join(format!("src{seed}.raw"));
    let dst = dir.join(format!("dst{seed}.raw"));
    let f = std::fs::File::create(&src).unwrap();
    f.set_len(SIZE).unwrap();
    for off in (0..SIZE).step_by(MIB as usize * 2) {
        f.write_all_at(&vec![seed as u8 ^ (off >> 20) as u8; MIB as usize], off)
            .unwrap();
    }
    drop(f);
    std::fs::File::create(&dst).unwrap().set_len(SIZE).unwrap();

    let ctx = Context::new();
    // A third of the rounds: a source whose first read fails, with
    // `ignore` (the range is retried) or `stop` (resumed below). Only a
    // read: without `iotype` the armed error would hit whichever request
    // comes next, possibly a guest write racing with the job's read.
    let flaky = rng.below(3) == 0;
    // A third of the other rounds: both ends O_DIRECT with io_uring, so
    // that the copies go on the mirror's ring (tmpfs takes O_DIRECT since
    // Linux 6.6; copy_file_range is not used with it).
    let ring = !flaky && rng.below(3) == 0;
    let file = if ring {
        json!({"driver":"file","filename":src,"aio":"io_uring","cache":{"direct":true}})
    } else {
        json!({"driver":"file","filename":src})
    };
    let src_opts = if flaky {
        json!({"driver":"raw","node-name":"src","file":{"driver":"blkdebug","image":file,
            "inject-error":[{"event":"read_aio","iotype":"read","errno":5,"once":true}]}})
    } else {
        json!({"driver":"raw","node-name":"src","file":file})
    };
    ctx.blockdev_add(&src_opts).unwrap();
    let dst_file = if ring {
        json!({"driver":"file","filename":dst,"aio":"io_uring","cache":{"direct":true}})
    } else {
        json!({"driver":"file","filename":dst})
    };
    ctx.blockdev_add(&json!({"driver":"raw","node-name":"dst","file":dst_file}))
        .unwrap();
    let blk = Arc::new(ctx.blk_new("src", BackendOptions::default()).unwrap());
    let mut o = MirrorOptions::new("src", "dst", MirrorSyncMode::Full);
    o.job_id = Some("m".into());
    o.copy_mode = if rng.below(2) == 0 {
        MirrorCopyMode::Background
    } else {
        MirrorCopyMode::WriteBlocking
    };
    o.granularity = 4096 << rng.below(5);
    o.buf_size = (MIB << rng.below(4)) as i64;
    o.on_source_error = if rng.below(2) == 0 {
        BlockdevOnError::Ignore
    } else {
        BlockdevOnError::Stop
    };
    let job = ctx.blockdev_mirror(o).unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let writer = (rng.below(2) == 0).then(|| {
        let (blk, stop) = (blk.clone(), stop.clone());
        let mut r = Rng(seed ^ 0x5555);
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                let len = 512 * (1 + r.below(128));
                let off = r.below((SIZE - len) / 512) * 512;
                blk.pwrite(off, &vec![r.next() as u8; len as usize])
                    .unwrap();
                std::thread::sleep(Duration::from_micros(200));
            }
        })
    });

    // Random verbs (block-job-change among them); wrong-state refusals are
    // fine, panics and hangs are not.
    for _ in 0..(5 + rng.below(20)) {
        std::thread::sleep(Duration::from_micros(rng.below(3000)));
        let _ = match rng.below(8) {
            0 | 1 => job.user_pause(),
            2 | 3 => job.user_resume(),
            4 => job.set_speed((rng.below(4) * 8 * MIB) as i64),
            5 => job.iostatus_reset(),
            6 if rng.below(4) == 0 => job.user_cancel(rng.below(2) == 0),
            7 => job.change(&JobChange {
                copy_mode: MirrorCopyMode::WriteBlocking,
            }),
            _ => Ok(()),
        };
    }
    stop.store(true, Ordering::SeqCst);
    if let Some(w) = writer {
        w.join().unwrap();
    }
    // Bring the job home: unpause, unlimited speed, complete at READY.
    let _ = job.set_speed(0);
    while job.is_user_paused() {
        job.user_resume().unwrap();
    }
    let deadline = Instant::now() + LONG;
    let end = loop {
        let s = job.status();
        if matches!(s, JobStatus::Null | JobStatus::Concluded) {
            break s;
        }
        if s == JobStatus::Ready {
            let _ = job.complete();
        }
        if job.is_user_paused() {
            // Stopped by an error: resume (the fault was once).
            let _ = job.user_resume();
        }
        assert!(
            Instant::now() < deadline,
            "seed {seed}: job stuck: {:?}",
            job.query_block_job()
        );
        std::thread::sleep(Duration::from_millis(2));
    };
    let done = job.wait_status(LONG, |s| s == JobStatus::Null);
    assert_eq!(done, Some(JobStatus::Null), "seed {seed}: ended {end:?}");
    // No filter outlives the job (a late block-job-change must not put
    // one back): no `mirror_top` is left, the guest is on src or dst.
    let drivers: Vec<&str> = ctx
        .graph()
        .nodes()
        .iter()
        .map(|n| n.driver_name())
        .collect();
    assert!(
        !drivers.contains(&"mirror_top"),
        "seed {seed}: nodes left: {drivers:?}"
    );
    assert!(
        ["src", "dst"].contains(&blk.node().name()),
        "seed {seed}: the guest is on {}",
        blk.node().name()
    );
    // Completed with a pivot: the guest's device moved to the target, and
    // the target has everything.
    let pivoted = blk.node().name() == "dst";
    if pivoted {
        assert_eq!(
            std::fs::read(&src).unwrap(),
            std::fs::read(&dst).unwrap(),
            "seed {seed}: target differs after complete"
        );
    }
    drop(blk);
    drop(job);
    drop(ctx);
    std::fs::remove_file(&src).unwrap();
    std::fs::remove_file(&dst).unwrap();
    pivoted
}

#[test]
fn random_verbs_never_hang_or_leak() {
    let dir = dir();
    // This thread's io_uring ring (made at its first io_uring request,
    // e.g. a flush when a context ends, and kept like every thread's) is
    // made before counting.
    {
        let warm = dir.path().join("warm.raw");
        std::fs::write(&warm, vec![0u8; 4096]).unwrap();
        let ctx = Context::new();
        ctx.blockdev_add(&json!({"driver":"raw","node-name":"w",
            "file":{"driver":"file","filename":warm,"aio":"io_uring"}}))
            .unwrap();
        let blk = ctx.blk_new("w", BackendOptions::default()).unwrap();
        blk.pwrite(0, &[1u8; 512]).unwrap();
        drop(blk);
        drop(ctx);
        std::fs::remove_file(&warm).unwrap();
    }
    let before = (count_dir("/proc/self/task"), count_dir("/proc/self/fd"));
    let ring_before = blockjob::block_jobs::mirror::ring_copies();
    let mut pivots = 0;
    for seed in 1..=ROUNDS {
        pivots += u64::from(round(seed, dir.path()));
        settle(before, seed);
    }
    eprintln!("{pivots} of {ROUNDS} rounds completed with a pivot");
    let ring = blockjob::block_jobs::mirror::ring_copies();
    assert!(
        ring.0 > ring_before.0,
        "some rounds copied on the mirror's ring: {ring_before:?} -> {ring:?}"
    );
    // Both endings were exercised: completed with a pivot, and cancelled.
    assert!(
        0 < pivots && pivots < ROUNDS,
        "{pivots} of {ROUNDS} pivoted"
    );
}
