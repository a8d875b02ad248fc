//! Mirror: complete, cancel, errors, and integrity under guest writes.

mod common;

use std::sync::Arc;
use std::time::Duration;

use blockjob::Context;
use blockjob::block::backend::BackendOptions;
use blockjob::block_jobs::mirror::MirrorOptions;
use blockjob::engine::JobChange;
use blockjob::events::EventData;
use blockjob::qapi::{JobStatus, MirrorCopyMode, MirrorSyncMode};
use serde_json::json;

const MIB: u64 = 1 << 20;

fn image(dir: &std::path::Path, name: &str, size: u64, fill: Option<u8>) -> std::path::PathBuf {
    let p = dir.join(name);
    let f = std::fs::File::create(&p).unwrap();
    f.set_len(size).unwrap();
    if let Some(b) = fill {
        use std::os::unix::fs::FileExt;
        let chunk = vec![b; MIB as usize];
        for off in (0..size).step_by(MIB as usize * 2) {
            f.write_all_at(&chunk[..MIB.min(size - off) as usize], off)
                .unwrap();
        }
    }
    p
}

fn raw(name: &str, path: &std::path::Path) -> serde_json::Value {
    json!({"driver":"raw","node-name":name,"file":{"driver":"file","filename":path}})
}

fn summary(ev: &blockjob::events::Event) -> String {
    match &ev.data {
        EventData::JobStatusChange { status, .. } => format!("JSC:{status}"),
        EventData::BlockJobReady(_) => "READY".into(),
        EventData::BlockJobCompleted { error: None, .. } => "COMPLETED".into(),
        EventData::BlockJobCompleted { error: Some(e), .. } => format!("COMPLETED({e})"),
        EventData::BlockJobCancelled(_) => "CANCELLED".into(),
        EventData::BlockJobError {
            operation, action, ..
        } => format!("ERR({operation},{action})"),
        other => other.name().into(),
    }
}

#[test]
fn mirror_complete_pivots_and_copies() {
    let dir = tempfile::tempdir().unwrap();
    let src = image(dir.path(), "src.raw", 32 * MIB, Some(0x5a));
    let dst = image(dir.path(), "dst.raw", 32 * MIB, None);
    let ctx = Context::new();
    let ev = ctx.subscribe();
    ctx.blockdev_add(&raw("src", &src)).unwrap();
    ctx.blockdev_add(&raw("dst", &dst)).unwrap();
    let blk = ctx
        .blk_new(
            "src",
            BackendOptions {
                name: "drive0".into(),
                ..Default::default()
            },
        )
        .unwrap();
    let job = ctx
        .blockdev_mirror(MirrorOptions::new("drive0", "dst", MirrorSyncMode::Full))
        .unwrap();
    assert_eq!(job.id(), Some("drive0"));
    assert_eq!(
        job.wait_status(Duration::from_secs(30), |s| s == JobStatus::Ready),
        Some(JobStatus::Ready)
    );
    let info = job.query_block_job().unwrap();
    assert_eq!(info.offset, info.len);
    assert_eq!(info.actively_synced, Some(false));
    job.complete().unwrap();
    job.wait_status(Duration::from_secs(30), |s| s == JobStatus::Null)
        .unwrap();
    let s: Vec<String> = std::iter::from_fn(|| ev.try_next())
        .map(|e| summary(&e))
        .collect();
    assert_eq!(
        s,
        [
            "JSC:created",
            "JSC:running",
            "JSC:ready",
            "READY",
            "JSC:waiting",
            "JSC:pending",
            "COMPLETED",
            "JSC:concluded",
            "JSC:null"
        ]
    );
    assert_eq!(std::fs::read(&src).unwrap(), std::fs::read(&dst).unwrap());
    // Pivoted: the guest now writes to the target.
    assert_eq!(blk.node().name(), "dst");
    blk.pwrite(0, &[1; 512]).unwrap();
    assert_eq!(&std::fs::read(&dst).unwrap()[..512], &[1; 512]);
    assert_eq!(std::fs::read(&src).unwrap()[0], 0x5a);
}

#[test]
fn guest_writes_during_mirror_end_identical() {
    // (copy mode at start, switched to write-blocking while it runs)
    for (mode, switch) in [
        (MirrorCopyMode::Background, false),
        (MirrorCopyMode::WriteBlocking, false),
        (MirrorCopyMode::Background, true),
    ] {
        for seed in 1..=3u64 {
            let dir = tempfile::tempdir_in("/dev/shm").unwrap();
            let size = 64 * MIB;
            let src = image(dir.path(), "src.raw", size, Some(0x11));
            let dst = image(dir.path(), "dst.raw", size, None);
            let ctx = Context::new();
            ctx.blockdev_add(&raw("src", &src)).unwrap();
            ctx.blockdev_add(&raw("dst", &dst)).unwrap();
            let blk = Arc::new(ctx.blk_new("src", BackendOptions::default()).unwrap());
            let mut o = MirrorOptions::new("src", "dst", MirrorSyncMode::Full);
            o.job_id = Some("m".into());
            o.copy_mode = mode;
            o.granularity = 64 << 10;
            let job = ctx.blockdev_mirror(o).unwrap();
            let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let writers: Vec<_> = (0..2u64)
                .map(|t| {
                    let blk = blk.clone();
                    let stop = stop.clone();
                    std::thread::spawn(move || {
                        let mut x = seed * 7919 + t;
                        let mut n = 0;
                        // Background mode need not converge under a steady
                        // stream of writes (as in QEMU): there the writers
                        // stop after a burst. Write-blocking must converge,
                        // so there they write until READY, also when the
                        // job switched to it half-way.
                        let burst = mode == MirrorCopyMode::Background && !switch;
                        while (burst && n < 3000)
                            || (!burst && !stop.load(std::sync::atomic::Ordering::SeqCst))
                            || n < 200
                        {
                            x = x
                                .wrapping_mul(6364136223846793005)
                                .wrapping_add(1442695040888963407);
                            let len = 512 * (1 + (x >> 40) % 64);
                            let off = ((x >> 8) % (size - len)) / 512 * 512;
                            blk.pwrite(off, &vec![(x >> 56) as u8; len as usize])
                                .unwrap();
                            n += 1;
                        }
                        n
                    })
                })
                .collect();
            if switch {
                std::thread::sleep(Duration::from_millis(20 * seed));
                job.change(&JobChange {
                    copy_mode: MirrorCopyMode::WriteBlocking,
                })
                .unwrap();
            }
            job.wait_status(Duration::from_secs(60), |s| s == JobStatus::Ready)
                .unwrap_or_else(|| panic!("{mode:?} switch {switch} seed {seed}: never ready"));
            stop.store(true, std::sync::atomic::Ordering::SeqCst);
            for w in writers {
                w.join().unwrap();
            }
            job.complete().unwrap();
            job.wait_status(Duration::from_secs(60), |s| s == JobStatus::Null)
                .unwrap();
            common::require_tool("qemu-img");
            let compare = std::process::Command::new("qemu-img")
                .args(["compare", "-q", "-f", "raw", "-F", "raw"])
                .args([&src, &dst])
                .status()
                .unwrap();
            let a = std::fs::read(&src).unwrap();
            let b = std::fs::read(&dst).unwrap();
            assert_eq!(compare.success(), a == b, "qemu-img compare disagrees");
            if a != b {
                let first = a.iter().zip(&b).position(|(x, y)| x != y).unwrap();
                let last = a.len()
                    - 1
                    - a.iter()
                        .rev()
                        .zip(b.iter().rev())
                        .position(|(x, y)| x != y)
                        .unwrap();
                let ndiff = a.iter().zip(&b).filter(|(x, y)| x != y).count();
                panic!(
                    "{mode:?} switch {switch} seed {seed}: source and target differ: first {first} last {last}, {ndiff} bytes; src {:x} dst {:x}",
                    a[first], b[first]
                );
            }
        }
    }
}

/// A fully allocated image of `size` bytes on /dev/shm.
fn full_image(dir: &std::path::Path, name: &str, size: u64) -> std::path::PathBuf {
    use std::os::unix::fs::FileExt;
    let p = dir.join(name);
    let f = std::fs::File::create(&p).unwrap();
    for off in (0..size).step_by(MIB as usize) {
        f.write_all_at(&vec![(off >> 20) as u8 | 1; MIB as usize], off)
            .unwrap();
    }
    p
}

#[test]
fn speed_limits_the_copy_and_set_speed_lifts_it() {
    let dir = tempfile::tempdir_in("/dev/shm").unwrap();
    let size = 16 * MIB;
    let src = full_image(dir.path(), "src.raw", size);
    let dst = image(dir.path(), "dst.raw", size, None);
    let ctx = Context::new();
    ctx.blockdev_add(&raw("src", &src)).unwrap();
    ctx.blockdev_add(&raw("dst", &dst)).unwrap();
    // 16 MiB at 8 MiB/s: about 2 s; the first time slice may burst, so
    // anything under 1 s means the limit is not applied.
    let mut o = MirrorOptions::new("src", "dst", MirrorSyncMode::Full);
    o.job_id = Some("slow".into());
    o.speed = (8 * MIB) as i64;
    let t0 = std::time::Instant::now();
    let job = ctx.blockdev_mirror(o).unwrap();
    assert_eq!(job.query_block_job().unwrap().speed, 8 * MIB);
    job.wait_status(Duration::from_secs(60), |s| s == JobStatus::Ready)
        .expect("ready");
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_secs(1),
        "16 MiB at 8 MiB/s took {took:?}"
    );
    job.complete_sync().unwrap();

    // 64 MiB at 1 MiB/s would need a minute; lifting the limit lets it
    // finish at once. (Bytes are charged when dispatched, as in QEMU, so
    // a small buf-size keeps the first burst small.)
    let size = 64 * MIB;
    let src = full_image(dir.path(), "src64.raw", size);
    let dst = image(dir.path(), "dst64.raw", size, None);
    let ctx = Context::new();
    ctx.blockdev_add(&raw("src", &src)).unwrap();
    ctx.blockdev_add(&raw("dst", &dst)).unwrap();
    let mut o = MirrorOptions::new("src", "dst", MirrorSyncMode::Full);
    o.job_id = Some("lifted".into());
    o.speed = MIB as i64;
    o.buf_size = MIB as i64;
    let job = ctx.blockdev_mirror(o).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let before = job.query_block_job().unwrap();
    assert!(before.offset < size / 2, "{before:?}");
    assert_eq!(
        job.set_speed(-1).unwrap_err().to_string(),
        "Parameter 'speed' expects a non-negative value"
    );
    job.set_speed(0).unwrap();
    assert_eq!(job.query_block_job().unwrap().speed, 0);
    job.wait_status(Duration::from_secs(8), |s| s == JobStatus::Ready)
        .expect("ready soon after set-speed 0");
    job.complete_sync().unwrap();
    assert_eq!(std::fs::read(&src).unwrap(), std::fs::read(&dst).unwrap());
}

/// The copy path (copy_file_range between plain files, through buffers
/// otherwise) keeps what the block layer promises: dirty bitmaps on the
/// target and its file node record the copy, and a target with
/// `detect-zeroes` still sees zeroes (allocated zeroes in the source
/// become holes on the target).
#[test]
fn copies_keep_bitmaps_and_detect_zeroes() {
    use std::os::unix::fs::{FileExt, MetadataExt};
    let dir = tempfile::tempdir_in("/dev/shm").unwrap();
    let size = 8 * MIB;
    // Data in the first 4 MiB, allocated zeroes in the last 4 MiB.
    let src = dir.path().join("src.raw");
    let f = std::fs::File::create(&src).unwrap();
    f.write_all_at(&vec![0x42; 4 * MIB as usize], 0).unwrap();
    f.write_all_at(&vec![0; 4 * MIB as usize], 4 * MIB).unwrap();
    drop(f);

    // Plain target: bitmaps on both target nodes count the 8 MiB copied.
    let dst = image(dir.path(), "dst.raw", size, None);
    let ctx = Context::new();
    ctx.blockdev_add(&raw("src", &src)).unwrap();
    ctx.blockdev_add(&json!({"driver":"raw","node-name":"dst",
        "file":{"driver":"file","node-name":"dst-file","filename":dst}}))
        .unwrap();
    ctx.block_dirty_bitmap_add("dst", "top", None, None, None)
        .unwrap();
    ctx.block_dirty_bitmap_add("dst-file", "proto", None, None, None)
        .unwrap();
    let mut o = MirrorOptions::new("src", "dst", MirrorSyncMode::Full);
    o.job_id = Some("m".into());
    let job = ctx.blockdev_mirror(o).unwrap();
    job.wait_status(Duration::from_secs(30), |s| s == JobStatus::Ready)
        .expect("ready");
    for node in ["dst", "dst-file"] {
        let b = ctx.query_dirty_bitmaps(node).unwrap();
        assert_eq!(b[0].count, size, "{node}: {b:?}");
    }
    job.complete_sync().unwrap();
    assert_eq!(std::fs::read(&src).unwrap(), std::fs::read(&dst).unwrap());
    drop(ctx);

    // detect-zeroes=unmap on the target: the zero half becomes a hole.
    let dst2 = image(dir.path(), "dst2.raw", size, None);
    let ctx = Context::new();
    ctx.blockdev_add(&raw("src", &src)).unwrap();
    ctx.blockdev_add(&json!({"driver":"raw","node-name":"dst",
        "detect-zeroes":"unmap","discard":"unmap",
        "file":{"driver":"file","filename":dst2,"discard":"unmap"}}))
        .unwrap();
    let mut o = MirrorOptions::new("src", "dst", MirrorSyncMode::Full);
    o.job_id = Some("m".into());
    let job = ctx.blockdev_mirror(o).unwrap();
    job.wait_status(Duration::from_secs(30), |s| s == JobStatus::Ready)
        .expect("ready");
    job.complete_sync().unwrap();
    assert_eq!(std::fs::read(&src).unwrap(), std::fs::read(&dst2).unwrap());
    let allocated = std::fs::metadata(&dst2).unwrap().blocks() * 512;
    assert_eq!(allocated, 4 * MIB, "only the data half is allocated");
}

/// A guest write already in flight when a write-blocking mirror starts
/// still reaches the target: the job puts its filter node in, and later
/// its active writes, in drained sections, as QEMU inserts its filter
/// node, so the write finishes first (and is marked dirty).
#[test]
fn write_in_flight_when_a_write_blocking_mirror_starts_is_not_lost() {
    use common::gated::{GatedMemory, Hold};
    let ctx = Context::new();
    let size = 4 * MIB as usize;
    let (src, gate) = GatedMemory::new(size, 0x11, Hold::Write);
    ctx.add_host_node("src", false, Box::new(src)).unwrap();
    let (dst, dst_gate) = GatedMemory::new(size, 0, Hold::Write);
    dst_gate.release();
    ctx.add_host_node("dst", false, Box::new(dst)).unwrap();
    let blk = Arc::new(ctx.blk_new("src", BackendOptions::default()).unwrap());
    let writer = {
        let blk = blk.clone();
        std::thread::spawn(move || blk.pwrite(MIB, &[0xab; 4096]).unwrap())
    };
    gate.wait_held();
    let mut o = MirrorOptions::new("src", "dst", MirrorSyncMode::Full);
    o.job_id = Some("m".into());
    o.copy_mode = MirrorCopyMode::WriteBlocking;
    let job = ctx.blockdev_mirror(o).unwrap();
    let ready = job.wait_status(Duration::from_secs(10), |s| s == JobStatus::Ready);
    // Let the held write go (if the job did not wait for it, it lands in
    // the source only now, after the copy).
    gate.release();
    writer.join().unwrap();
    assert!(ready.is_some(), "never ready");
    job.complete().unwrap();
    job.wait_status(Duration::from_secs(10), |s| s == JobStatus::Null)
        .unwrap();
    // Pivoted: the guest reads the target, which must have the write.
    let mut buf = vec![0; 4096];
    blk.pread(MIB, &mut buf).unwrap();
    assert!(
        buf.iter().all(|&b| b == 0xab),
        "the in-flight write was lost"
    );
}

/// The child of `node` (its only one), by name.
fn child_name(ctx: &Context, node: &str) -> String {
    let n = ctx.graph().find_node(node).unwrap();
    let c = n.children();
    assert_eq!(c.len(), 1, "{node}: one child expected");
    c[0].node.name().to_string()
}

#[test]
fn replaces_moves_every_parent_of_a_node_below_a_filter() {
    // fa (file) <- implicit raw <- dbg (blkdebug, the guest's) and x
    // (raw): mirroring dbg with replaces=<the raw> moves dbg and x onto
    // the target; the raw, opened implicitly, goes.
    let dir = tempfile::tempdir().unwrap();
    let src = image(dir.path(), "src.raw", 8 * MIB, Some(0x5a));
    let dst = image(dir.path(), "dst.raw", 8 * MIB, None);
    let ctx = Context::new();
    ctx.blockdev_add(&json!({"driver":"file","node-name":"fa","filename":src}))
        .unwrap();
    ctx.blockdev_add(&json!({"driver":"blkdebug","node-name":"dbg",
        "image":{"driver":"raw","file":"fa"}}))
        .unwrap();
    let inner = child_name(&ctx, "dbg");
    ctx.blockdev_add(&json!({"driver":"raw","node-name":"x","file":inner}))
        .unwrap();
    ctx.blockdev_add(&raw("dst", &dst)).unwrap();
    let blk = ctx
        .blk_new(
            "dbg",
            BackendOptions {
                name: "drive0".into(),
                ..Default::default()
            },
        )
        .unwrap();
    let mut o = MirrorOptions::new("drive0", "dst", MirrorSyncMode::Full);
    o.replaces = Some(inner.clone());
    let job = ctx.blockdev_mirror(o).unwrap();
    assert_eq!(
        job.wait_status(Duration::from_secs(30), |s| s == JobStatus::Ready),
        Some(JobStatus::Ready)
    );
    // Written while the job mirrors: it must reach the target.
    blk.pwrite(0, &[0x77; 512]).unwrap();
    job.complete().unwrap();
    job.wait_status(Duration::from_secs(30), |s| s == JobStatus::Null)
        .unwrap();
    // The guest stays on the filter; both parents now use the target.
    assert_eq!(blk.node().name(), "dbg");
    assert_eq!(child_name(&ctx, "dbg"), "dst");
    assert_eq!(child_name(&ctx, "x"), "dst");
    assert!(
        ctx.graph().find_node(&inner).is_none(),
        "implicit node kept"
    );
    assert!(
        ctx.graph().find_node("fa").is_some(),
        "monitor's node dropped"
    );
    let (s, d) = (std::fs::read(&src).unwrap(), std::fs::read(&dst).unwrap());
    assert_eq!(s, d);
    assert_eq!(&d[..512], &[0x77; 512]);
    // Guest writes after the pivot land in the target only.
    blk.pwrite(4096, &[0x66; 512]).unwrap();
    assert_eq!(&std::fs::read(&dst).unwrap()[4096..4608], &[0x66; 512]);
    assert_eq!(std::fs::read(&src).unwrap()[4096], 0x5a);
}

#[test]
fn replaces_moves_every_parent_of_the_node_qcow2_edges_too() {
    // As qemu-storage-daemon 10 does it (recorded): while ra is the backing
    // node of q, QEMU's backing blocker refuses to replace it; a q added
    // while the job is READY is one more parent, and `complete` moves q's
    // backing edge to the target with the others.
    common::require_tool("qemu-img");
    let dir = tempfile::tempdir().unwrap();
    let src = image(dir.path(), "src.raw", 4 * MIB, Some(0x5a));
    let dst = image(dir.path(), "dst.raw", 4 * MIB, None);
    let q = dir.path().join("q.qcow2");
    common::chain::tool(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", q.to_str().unwrap(), "4M"],
    );
    let ctx = Context::new();
    ctx.blockdev_add(&raw("ra", &src)).unwrap();
    ctx.blockdev_add(&json!({"driver":"blkdebug","node-name":"dbg","image":"ra"}))
        .unwrap();
    ctx.blockdev_add(&raw("dst", &dst)).unwrap();
    let add_q = || {
        ctx.blockdev_add(&json!({"driver":"qcow2","node-name":"q",
            "file":{"driver":"file","filename":q},"backing":"ra"}))
            .unwrap();
    };
    let mirror = || {
        let mut o = MirrorOptions::new("dbg", "dst", MirrorSyncMode::Full);
        o.job_id = Some("job0".into());
        o.replaces = Some("ra".into());
        ctx.blockdev_mirror(o)
    };
    add_q();
    assert_eq!(
        mirror().err().unwrap().message(),
        "Node 'ra' is busy: node is used as backing hd of 'q'"
    );
    assert!(ctx.query_block_jobs().is_empty());
    assert_eq!(ctx.graph().nodes().len(), 7, "nothing left behind");
    ctx.blockdev_del("q").unwrap();
    let job = mirror().unwrap();
    assert_eq!(
        job.wait_status(Duration::from_secs(30), |s| s == JobStatus::Ready),
        Some(JobStatus::Ready)
    );
    add_q();
    job.complete().unwrap();
    job.wait_status(Duration::from_secs(30), |s| s == JobStatus::Null)
        .unwrap();
    assert_eq!(child_name(&ctx, "dbg"), "dst");
    let qn = ctx.graph().find_node("q").unwrap();
    assert_eq!(qn.backing().unwrap().name(), "dst");
    // q reads its backing file's data through the moved edge.
    let mut b = [0u8; 512];
    qn.pread(0, &mut b).unwrap();
    assert_eq!(b, [0x5a; 512]);
    assert!(
        ctx.graph().find_node("ra").is_some(),
        "monitor's node dropped"
    );
}

/// The `x-` members of job info: a mirror throttled below what a guest
/// dirties is said not to converge (with both rates measured), then with
/// the guest gone and the limit lifted it reaches READY, in sync (ETA 0).
/// Through QMP too, as members after QEMU's.
#[test]
fn rates_say_when_a_mirror_will_not_converge() {
    let dir = tempfile::tempdir_in("/dev/shm").unwrap();
    let size = 8 * MIB;
    let src = full_image(dir.path(), "src.raw", size);
    let dst = image(dir.path(), "dst.raw", size, None);
    let ctx = Context::new();
    ctx.blockdev_add(&raw("src", &src)).unwrap();
    ctx.blockdev_add(&raw("dst", &dst)).unwrap();
    let blk = Arc::new(ctx.blk_new("src", BackendOptions::default()).unwrap());
    let mut o = MirrorOptions::new("src", "dst", MirrorSyncMode::Full);
    o.job_id = Some("m".into());
    o.granularity = 64 << 10;
    o.buf_size = 256 << 10;
    o.speed = (MIB / 2) as i64;
    let job = ctx.blockdev_mirror(o).unwrap();
    // A guest writing random 64 KiB clusters all over at up to 16 MiB/s:
    // what is left settles at nearly all of the disk.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (blk, stop) = (blk.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut x: u64 = 99;
            let buf = vec![0x77u8; 64 << 10];
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let off = (x >> 16) % (size / (64 << 10)) * (64 << 10);
                blk.pwrite(off, &buf).unwrap();
                std::thread::sleep(Duration::from_millis(4));
            }
        })
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let diverging = loop {
        let i = job.query_block_job().unwrap();
        if i.x.converging == Some(false) {
            break i;
        }
        assert!(std::time::Instant::now() < deadline, "never said: {i:?}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        diverging.x.dirty_rate * 100 >= diverging.x.copy_rate * 95,
        "{diverging:?}"
    );
    assert!(diverging.x.dirty_rate > 0 && diverging.x.eta.is_none());
    let v = blockjob::qmp::execute(&ctx, &json!({"execute": "query-block-jobs"}));
    let j = &v["return"][0];
    for k in ["x-copy-rate", "x-dirty-rate", "x-skipped", "x-converging"] {
        assert!(j.get(k).is_some(), "{k} in {j}");
    }
    assert_eq!(j["x-converging"], false);
    let v = blockjob::qmp::execute(&ctx, &json!({"execute": "query-jobs"}));
    assert!(v["return"][0]["x-copy-rate"].is_u64(), "{v}");

    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.join().unwrap();
    job.set_speed(0).unwrap();
    job.wait_status(Duration::from_secs(30), |s| s == JobStatus::Ready)
        .expect("ready");
    let ready = job.query_block_job().unwrap();
    assert_eq!(ready.x.eta, Some(0), "{ready:?}");
    assert_eq!(ready.x.converging, Some(true));
    assert_eq!(ready.x.skipped, 0, "all data: {ready:?}");
    job.complete_sync().unwrap();
    drop(blk);
    assert_eq!(std::fs::read(&src).unwrap(), std::fs::read(&dst).unwrap());
}

/// Holes are progress without data: `x-skipped` counts exactly them.
#[test]
fn holes_count_as_skipped() {
    let dir = tempfile::tempdir_in("/dev/shm").unwrap();
    let size = 16 * MIB;
    // Data in every other MiB: 8 MiB of holes.
    let src = image(dir.path(), "src.raw", size, Some(0x33));
    let dst = image(dir.path(), "dst.raw", size, None);
    let ctx = Context::new();
    ctx.blockdev_add(&raw("src", &src)).unwrap();
    ctx.blockdev_add(&raw("dst", &dst)).unwrap();
    let mut o = MirrorOptions::new("src", "dst", MirrorSyncMode::Full);
    o.job_id = Some("h".into());
    let job = ctx.blockdev_mirror(o).unwrap();
    job.wait_status(Duration::from_secs(30), |s| s == JobStatus::Ready)
        .expect("ready");
    let i = job.query_block_job().unwrap();
    assert_eq!((i.offset, i.len), (size, size));
    assert_eq!(i.x.skipped, 8 * MIB, "{i:?}");
    job.complete_sync().unwrap();
}
