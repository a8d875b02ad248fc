//! The mirror's copies on one io_uring ring (read linked to write,
//! submitted in batches, reaped by one thread): with `aio=io_uring` on both
//! ends the copies go there (`ring_copies` counts them), the target ends
//! up as the source while a guest writes, and a copy that fails on the
//! ring (ENOSPC on a real, full tmpfs) is made again through the block
//! layer, so the job stops with the same events, I/O status and state as
//! with `aio=threads`, and goes on once there is room.
//!
//! The tests share the process-wide counters: they take turns.

mod common;

use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use blockjob::Context;
use blockjob::block::backend::BackendOptions;
use blockjob::block_jobs::mirror::{MirrorOptions, ring_copies};
use blockjob::events::{EventData, Subscription};
use blockjob::qapi::{BlockDeviceIoStatus, BlockdevOnError, JobStatus, MirrorSyncMode};
use common::tmpfs::Tmpfs;
use serde_json::{Value, json};

const MIB: u64 = 1 << 20;

static TURN: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn turn() -> std::sync::MutexGuard<'static, ()> {
    TURN.lock().unwrap_or_else(|e| e.into_inner())
}

/// Data in every `step`th MiB, with a pattern that differs per 512 bytes.
fn patterned(p: &Path, size: u64, step: usize) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::create(p).unwrap();
    f.set_len(size).unwrap();
    for mib in (0..size / MIB).step_by(step) {
        let data: Vec<u8> = (0..MIB)
            .map(|i| ((mib * MIB + i) / 512 * 13 + i % 7) as u8)
            .collect();
        f.write_all_at(&data, mib * MIB).unwrap();
    }
}

fn raw(name: &str, path: &Path, aio: &str, direct: bool) -> Value {
    json!({"driver":"raw","node-name":name,"file":{"driver":"file","filename":path,
        "aio":aio,"cache":{"direct":direct}}})
}

fn wait(job: &blockjob::engine::Job, want: JobStatus) {
    job.wait_status(Duration::from_secs(120), |s| s == want)
        .unwrap_or_else(|| panic!("job not {want:?}: {:?}", job.query_block_job()));
}

#[test]
fn copies_go_on_the_ring_while_a_guest_writes() {
    let _t = turn();
    let dir = tempfile::tempdir().unwrap();
    let (src, dst) = (dir.path().join("src.raw"), dir.path().join("dst.raw"));
    patterned(&src, 64 * MIB, 2);
    std::fs::File::create(&dst)
        .unwrap()
        .set_len(64 * MIB)
        .unwrap();
    let ctx = Context::new();
    ctx.blockdev_add(&raw("src", &src, "io_uring", true))
        .unwrap();
    ctx.blockdev_add(&raw("dst", &dst, "io_uring", true))
        .unwrap();
    let blk = Arc::new(ctx.blk_new("src", BackendOptions::default()).unwrap());
    let before = ring_copies();
    let mut o = MirrorOptions::new("src", "dst", MirrorSyncMode::Full);
    o.job_id = Some("m".into());
    // Small operations: many copies in flight on the ring at once.
    o.granularity = 65536;
    o.buf_size = 4 * MIB as i64;
    let job = ctx.blockdev_mirror(o).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (blk, stop) = (blk.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(Ordering::SeqCst) {
                // 4 KiB and 512-byte writes all over the disk: aligned
                // and read-modify-write requests beside the ring's.
                let off = (n * 7_340_033) % (64 * MIB - 8192);
                let len = if n.is_multiple_of(3) { 512 } else { 4096 };
                let off = off / 512 * 512;
                blk.pwrite(off, &vec![n as u8 | 1; len]).unwrap();
                n += 1;
            }
            n
        })
    };
    wait(&job, JobStatus::Ready);
    std::thread::sleep(Duration::from_millis(200));
    stop.store(true, Ordering::SeqCst);
    let writes = writer.join().unwrap();
    job.complete().unwrap();
    wait(&job, JobStatus::Null);
    drop(blk);
    drop(job);
    drop(ctx);
    let after = ring_copies();
    assert!(writes > 0);
    assert!(
        after.0 - before.0 >= 64 * MIB / 2 / (256 << 10),
        "the copies went on the ring: {before:?} -> {after:?}"
    );
    assert_eq!(after.1, before.1, "none failed there");
    assert!(
        std::fs::read(&src).unwrap() == std::fs::read(&dst).unwrap(),
        "the target is the source"
    );
}

/// Events of a kind a run may repeat (each failing request reports)
/// collapsed: the run's story.
fn story(sub: &Subscription) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    while let Some(e) = sub.try_next() {
        let s = match &e.data {
            EventData::JobStatusChange { status, .. } => format!("{status:?}"),
            EventData::BlockJobError {
                operation, action, ..
            } => format!("error {operation:?} {action:?}"),
            other => format!("{:?}", std::mem::discriminant(other)),
        };
        if out.last() != Some(&s) {
            out.push(s);
        }
    }
    out
}

/// Fill a filesystem up to `keep` bytes from its end.
fn fill(p: &Path, fs: &Path, keep: u64) {
    let st = nix::sys::statvfs::statvfs(fs).unwrap();
    let free = st.blocks_available() * st.fragment_size();
    std::fs::write(p, vec![0x11u8; (free - keep) as usize]).unwrap();
}

/// One run onto a full tmpfs: (its story until it stopped, ring copies
/// made again by a worker).
///
/// Which copies the ring makes is fixed, not raced: the copies
/// dispatched before the first `copy_file_range` attempt (EXDEV) turned
/// offload off go to workers, and those are at most `buf_size` (4 MiB)
/// from the start, while offload is off before any copy ends. The first
/// 12 MiB of the target are allocated before the tmpfs is filled, so
/// every copy that meets the full disk lies beyond them: on the ring.
fn run_out_of_space(aio: &str, work: &Path) -> (Vec<String>, u64) {
    let fs = Tmpfs::new(40);
    let src = work.join(format!("src-{aio}.raw"));
    patterned(&src, 32 * MIB, 1);
    let dst = fs.dir.join("dst.raw");
    let f = std::fs::File::create(&dst).unwrap();
    f.set_len(32 * MIB).unwrap();
    nix::fcntl::fallocate(
        f.as_raw_fd(),
        nix::fcntl::FallocateFlags::empty(),
        0,
        12 * MIB as i64,
    )
    .unwrap();
    drop(f);
    let filler = fs.dir.join("filler");
    fill(&filler, &fs.dir, 256 << 10);
    let ctx = Context::new();
    // The source on ext4, the target on tmpfs: no copy_file_range
    // between them (EXDEV), so the copies are the ring's with io_uring.
    ctx.blockdev_add(&raw("src", &src, aio, true)).unwrap();
    ctx.blockdev_add(&raw("dst", &dst, aio, false)).unwrap();
    let sub = ctx.subscribe();
    let before = ring_copies();
    let mut o = MirrorOptions::new("src", "dst", MirrorSyncMode::Full);
    o.job_id = Some("m".into());
    o.on_target_error = BlockdevOnError::Enospc;
    o.granularity = 65536;
    o.buf_size = 4 * MIB as i64;
    let job = ctx.blockdev_mirror(o).unwrap();
    wait(&job, JobStatus::Paused);
    // Let the requests in flight when it stopped end.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(job.iostatus(), BlockDeviceIoStatus::Nospace, "{aio}");
    assert_eq!(
        job.query_block_job().unwrap().io_status,
        BlockDeviceIoStatus::Nospace
    );
    let told = story(&sub);
    let redone = ring_copies().1 - before.1;
    // Room again: resumed, the job completes and the target is the
    // source.
    std::fs::remove_file(&filler).unwrap();
    job.user_resume().unwrap();
    wait(&job, JobStatus::Ready);
    job.complete().unwrap();
    wait(&job, JobStatus::Null);
    drop(job);
    drop(ctx);
    assert!(
        std::fs::read(&src).unwrap() == std::fs::read(&dst).unwrap(),
        "{aio}: the target is the source"
    );
    (told, redone)
}

#[test]
fn a_copy_failing_on_the_ring_stops_the_job_as_on_a_worker() {
    let _t = turn();
    let work = tempfile::tempdir().unwrap();
    let (threads, none) = run_out_of_space("threads", work.path());
    let (ring, redone) = run_out_of_space("io_uring", work.path());
    assert_eq!(none, 0, "aio=threads never reaches the ring");
    assert!(redone > 0, "the ring's ENOSPC went to a worker");
    assert!(
        threads.contains(&"error Write Stop".to_string()),
        "{threads:?}"
    );
    assert_eq!(ring, threads, "the same events with the ring");
}
