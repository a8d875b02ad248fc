//! `blockdev-backup` on our library: the target holds the source as it was
//! when the job started, however the guest writes meanwhile (one writer
//! between the job's bursts, and many writers racing the copy); `top`
//! copies only the source's own layer, `none` only what the guest
//! overwrites, `bitmap` what a bitmap marks, and the bitmap ends as
//! `bitmap-mode` says on success and on failure. The filter
//! (`copy-before-write`) is in the graph while the job runs and gone after.

mod common;

use std::sync::Arc;
use std::time::Duration;

use blockjob::Context;
use blockjob::block::backend::BackendOptions;
use blockjob::block_jobs::backup::BackupOptions;
use blockjob::events::{EventData, Subscription};
use blockjob::qapi::{BitmapSyncMode, JobStatus, MirrorSyncMode};
use common::chain::{chain, flat, s, tool};
use serde_json::json;

const MIB: u64 = 1 << 20;

fn wait_end(job: &blockjob::engine::Job) {
    job.wait_status(Duration::from_secs(60), |s| s == JobStatus::Null)
        .expect("job did not end");
}

/// A raw image of `mib` MiB, MiB `i` filled with byte `i + 1`.
fn patterned(path: &std::path::Path, mib: u64) -> Vec<u8> {
    let data: Vec<u8> = (0..mib)
        .flat_map(|i| std::iter::repeat_n(i as u8 + 1, MIB as usize))
        .collect();
    std::fs::write(path, &data).unwrap();
    data
}

fn file_node(ctx: &Context, name: &str, path: &std::path::Path) {
    ctx.blockdev_add(&json!({"driver":"file","node-name":name,"filename":path}))
        .unwrap();
}

/// BLOCK_JOB_COMPLETED's (error, offset, len).
fn completed(sub: &Subscription) -> (Option<String>, u64, u64) {
    std::iter::from_fn(|| sub.try_next())
        .find_map(|e| match &e.data {
            EventData::BlockJobCompleted { progress, error } => {
                Some((error.clone(), progress.offset, progress.len))
            }
            _ => None,
        })
        .expect("BLOCK_JOB_COMPLETED")
}

fn opts(sync: MirrorSyncMode) -> BackupOptions {
    let mut o = BackupOptions::new("src", "tgt", sync);
    o.job_id = Some("j".into());
    o
}

#[test]
fn full_backup_is_the_source_at_job_start_despite_guest_writes() {
    let dir = tempfile::tempdir().unwrap();
    let (src, tgt) = (dir.path().join("src.img"), dir.path().join("tgt.img"));
    let before = patterned(&src, 16);
    std::fs::write(&tgt, vec![0u8; 16 * MIB as usize]).unwrap();
    let ctx = Context::new();
    file_node(&ctx, "src", &src);
    file_node(&ctx, "tgt", &tgt);
    let blk = ctx.blk_new("src", BackendOptions::default()).unwrap();
    let sub = ctx.subscribe();

    // speed=1: the first copy goes out, then the job waits.
    let mut o = opts(MirrorSyncMode::Full);
    o.speed = 1;
    o.filter_node_name = Some("cbw".into());
    let job = ctx.blockdev_backup(o).unwrap();
    assert_eq!(
        blk.node().name(),
        "cbw",
        "the guest writes through the filter"
    );
    let f = ctx.graph().find_node("cbw").unwrap();
    assert_eq!(f.driver_name(), "copy-before-write");
    // Guest writes while most of the source has not been copied: a
    // cluster-unaligned one, one across a MiB boundary, a write-zeroes
    // and a discard.
    blk.pwrite(5 * MIB + 1000, &[0xee; 70_000]).unwrap();
    blk.pwrite(9 * MIB - 4096, &[0xdd; 8192]).unwrap();
    blk.pwrite_zeroes(12 * MIB, MIB, false).unwrap();
    blk.pdiscard(14 * MIB, 128 << 10).unwrap();
    // What the guest overwrote was copied first and counts as progress.
    assert!(job.progress().current >= 64 << 10);
    job.set_speed(0).unwrap();
    wait_end(&job);
    assert_eq!(completed(&sub), (None, 16 * MIB, 16 * MIB));
    assert!(ctx.graph().find_node("cbw").is_none(), "filter left");
    assert_eq!(blk.node().name(), "src");
    drop(blk);
    drop(ctx);
    assert!(
        std::fs::read(&tgt).unwrap() == before,
        "target is not the old source"
    );
    let now = std::fs::read(&src).unwrap();
    assert_eq!(now[5 * MIB as usize + 1000], 0xee, "guest write lost");
    assert_eq!(now[12 * MIB as usize], 0);
}

#[test]
fn racing_guest_writers_never_reach_the_backup() {
    // Four writers hit random clusters of a 32 MiB source while the job
    // copies with all its workers; every byte of the target must still be
    // the old one. Rounds make a lost race likely to show.
    for round in 0..4u64 {
        let dir = tempfile::tempdir().unwrap();
        let (src, tgt) = (dir.path().join("src.img"), dir.path().join("tgt.img"));
        let before = patterned(&src, 32);
        std::fs::write(&tgt, b"").unwrap();
        std::fs::File::options()
            .write(true)
            .open(&tgt)
            .unwrap()
            .set_len(32 * MIB)
            .unwrap();
        let ctx = Context::new();
        file_node(&ctx, "src", &src);
        file_node(&ctx, "tgt", &tgt);
        let blk = Arc::new(ctx.blk_new("src", BackendOptions::default()).unwrap());
        let job = ctx.blockdev_backup(opts(MirrorSyncMode::Full)).unwrap();
        std::thread::scope(|sc| {
            for w in 0..4u64 {
                let blk = blk.clone();
                sc.spawn(move || {
                    let mut x = round * 97 + w * 7919 + 1;
                    for _ in 0..200 {
                        x = x
                            .wrapping_mul(6364136223846793005)
                            .wrapping_add(1442695040888963407);
                        let off = (x >> 20) % (32 * MIB - 8192);
                        blk.pwrite(off, &[0xa0 + w as u8; 8192]).unwrap();
                    }
                });
            }
        });
        wait_end(&job);
        drop(blk);
        drop(ctx);
        let got = std::fs::read(&tgt).unwrap();
        if let Some(i) = got.iter().zip(&before).position(|(a, b)| a != b) {
            panic!("round {round}: target differs at {i}: {:#x}", got[i]);
        }
    }
}

#[test]
fn sync_top_copies_only_the_top_layer() {
    let dir = tempfile::tempdir().unwrap();
    let (_, _, top) = chain(dir.path());
    let tgt = dir.path().join("tgt.qcow2");
    tool("qemu-img", &["create", "-q", "-f", "qcow2", s(&tgt), "4M"]);
    let ctx = Context::new();
    ctx.blockdev_add(&json!({"driver":"qcow2","node-name":"src",
        "file":{"driver":"file","filename":top}}))
        .unwrap();
    ctx.blockdev_add(&json!({"driver":"qcow2","node-name":"tgt",
        "file":{"driver":"file","filename":tgt}}))
        .unwrap();
    let sub = ctx.subscribe();
    let job = ctx.blockdev_backup(opts(MirrorSyncMode::Top)).unwrap();
    wait_end(&job);
    let (err, off, len) = completed(&sub);
    assert_eq!(err, None);
    assert_eq!(off, len);
    assert!(len < 4 * MIB, "top copied more than its own layer: {len}");
    drop(ctx);
    // What top holds is on the target, at the same places; the rest is
    // unallocated there.
    let map = tool("qemu-img", &["map", "--output=json", s(&top)]);
    let tmap = tool("qemu-img", &["map", "--output=json", s(&tgt)]);
    let top_data: Vec<serde_json::Value> = serde_json::from_str(&map).unwrap();
    let tgt_data: Vec<serde_json::Value> = serde_json::from_str(&tmap).unwrap();
    let allocated = |m: &[serde_json::Value], depth: u64| -> u64 {
        m.iter()
            .filter(|e| e["depth"] == depth && e["data"] == true)
            .map(|e| e["length"].as_u64().unwrap())
            .sum()
    };
    assert_eq!(allocated(&tgt_data, 0), allocated(&top_data, 0));
    let t = flat(&top);
    let g = flat(&tgt);
    for e in top_data.iter().filter(|e| e["depth"] == 0) {
        let (o, l) = (
            e["start"].as_u64().unwrap() as usize,
            e["length"].as_u64().unwrap() as usize,
        );
        assert!(t[o..o + l] == g[o..o + l], "top's data at {o} not copied");
    }
}

#[test]
fn sync_none_copies_what_the_guest_overwrites_until_cancelled() {
    let dir = tempfile::tempdir().unwrap();
    let (src, tgt) = (dir.path().join("src.img"), dir.path().join("tgt.img"));
    let before = patterned(&src, 8);
    std::fs::write(&tgt, vec![0u8; 8 * MIB as usize]).unwrap();
    let ctx = Context::new();
    file_node(&ctx, "src", &src);
    file_node(&ctx, "tgt", &tgt);
    let blk = ctx.blk_new("src", BackendOptions::default()).unwrap();
    let sub = ctx.subscribe();
    let job = ctx.blockdev_backup(opts(MirrorSyncMode::None)).unwrap();
    blk.pwrite(3 * MIB + 10, &[0xee; 10]).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(
        job.status(),
        JobStatus::Running,
        "sync=none ended by itself"
    );
    assert_eq!(job.progress().current, 64 << 10);
    job.user_cancel(true).unwrap();
    wait_end(&job);
    let cancelled = std::iter::from_fn(|| sub.try_next())
        .any(|e| matches!(e.data, EventData::BlockJobCancelled { .. }));
    assert!(cancelled);
    drop(blk);
    drop(ctx);
    let got = std::fs::read(&tgt).unwrap();
    let c = (3 * MIB) as usize..(3 * MIB + (64 << 10)) as usize;
    assert!(
        got[c.clone()] == before[c],
        "overwritten cluster not copied"
    );
    assert!(
        got[..3 * MIB as usize].iter().all(|b| *b == 0),
        "copied more"
    );
}

/// A 4 MiB source with a bitmap `b0` marking three clusters the guest
/// wrote; the target fails its first write at `fail_at` when given.
fn bitmap_setup(dir: &std::path::Path, fail_at: Option<u64>) -> (Context, BackupOptions) {
    let (src, tgt) = (dir.join("src.img"), dir.join("tgt.img"));
    patterned(&src, 4);
    std::fs::write(&tgt, vec![0u8; 4 * MIB as usize]).unwrap();
    let ctx = Context::new();
    file_node(&ctx, "src", &src);
    match fail_at {
        None => file_node(&ctx, "tgt", &tgt),
        Some(sector) => {
            ctx.blockdev_add(&json!({"driver":"raw","node-name":"tgt","file":{
                "driver":"blkdebug","inject-error":[{"event":"write_aio","errno":5,
                    "sector":sector,"once":true}],
                "image":{"driver":"file","filename":tgt}}}))
                .unwrap();
        }
    }
    ctx.block_dirty_bitmap_add("src", "b0", None, None, None)
        .unwrap();
    let blk = ctx.blk_new("src", BackendOptions::default()).unwrap();
    for c in [0u64, 16, 40] {
        blk.pwrite(c * (64 << 10), &[9; 512]).unwrap();
    }
    let mut o = opts(MirrorSyncMode::Bitmap);
    o.bitmap = Some("b0".into());
    (ctx, o)
}

fn b0_count(ctx: &Context) -> u64 {
    ctx.query_dirty_bitmaps("src")
        .unwrap()
        .iter()
        .find(|b| b.name.as_deref() == Some("b0"))
        .unwrap()
        .count
}

#[test]
fn bitmap_modes_decide_what_the_bitmap_keeps() {
    // (mode, target fails, expected error, b0's count after)
    let c = 64 << 10;
    let cases = [
        (BitmapSyncMode::OnSuccess, false, None, 0),
        (BitmapSyncMode::Never, false, None, 3 * c),
        (BitmapSyncMode::Always, false, None, 0),
        (
            BitmapSyncMode::OnSuccess,
            true,
            Some("Input/output error"),
            3 * c,
        ),
        (
            BitmapSyncMode::Never,
            true,
            Some("Input/output error"),
            3 * c,
        ),
        // Always, failed: the cluster that failed stays dirty (and ours
        // copies one cluster at a time here, so only it).
        (BitmapSyncMode::Always, true, Some("Input/output error"), c),
    ];
    for (mode, fail, err, after) in cases {
        let dir = tempfile::tempdir().unwrap();
        // Cluster 40 fails (sector 40 * 128).
        let (ctx, mut o) = bitmap_setup(dir.path(), fail.then_some(40 * 128));
        o.bitmap_mode = Some(mode);
        let sub = ctx.subscribe();
        let job = ctx.blockdev_backup(o).unwrap();
        wait_end(&job);
        let (e, _, len) = completed(&sub);
        assert_eq!(e.as_deref(), err, "{mode:?} fail={fail}");
        assert_eq!(len, 3 * c);
        assert_eq!(b0_count(&ctx), after, "{mode:?} fail={fail}");
        // Only b0 is left on the source: the successor merged away.
        assert_eq!(ctx.query_dirty_bitmaps("src").unwrap().len(), 1);
    }
}

#[test]
fn a_frozen_bitmap_refuses_commands_and_its_successor_records() {
    let dir = tempfile::tempdir().unwrap();
    let (ctx, mut o) = bitmap_setup(dir.path(), None);
    o.bitmap_mode = Some(BitmapSyncMode::OnSuccess);
    o.speed = 1;
    let blk = ctx.blk_new("src", BackendOptions::default()).unwrap();
    let job = ctx.blockdev_backup(o).unwrap();
    let list = ctx.query_dirty_bitmaps("src").unwrap();
    assert_eq!(list.len(), 2);
    assert_eq!(list[0].name, None, "the successor is listed first");
    assert!(list[1].busy && list[1].recording);
    let busy = "Bitmap 'b0' is currently in use by another operation and cannot be used";
    assert_eq!(
        ctx.block_dirty_bitmap_clear("src", "b0")
            .unwrap_err()
            .message(),
        busy
    );
    assert_eq!(
        ctx.block_dirty_bitmap_disable("src", "b0")
            .unwrap_err()
            .message(),
        busy
    );
    // A write during the job lands in the successor (and survives).
    blk.pwrite(2 * MIB, &[1; 512]).unwrap();
    assert_eq!(b0_count(&ctx), 3 * (64 << 10), "the frozen bitmap changed");
    job.set_speed(0).unwrap();
    wait_end(&job);
    assert_eq!(b0_count(&ctx), 64 << 10, "on-success keeps the successor's");
    ctx.block_dirty_bitmap_clear("src", "b0").unwrap();
}

#[test]
fn bad_arguments_get_qemu_texts_and_leave_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let (ctx, _) = bitmap_setup(dir.path(), None);
    let small = dir.path().join("small.img");
    std::fs::write(&small, vec![0u8; MIB as usize]).unwrap();
    file_node(&ctx, "small", &small);
    let nodes = ctx.graph().nodes().len();
    type Edit = Box<dyn Fn(&mut BackupOptions)>;
    let cases: Vec<(Edit, &str)> = vec![
        (
            Box::new(|o| o.target = "src".into()),
            "Source and target cannot be the same",
        ),
        (
            Box::new(|o| o.target = "small".into()),
            "Source and target image have different sizes",
        ),
        (
            Box::new(|o| o.sync = MirrorSyncMode::Incremental),
            "must provide a valid bitmap name for 'incremental' sync mode",
        ),
        (
            Box::new(|o| o.bitmap = Some("nosuch".into())),
            "Bitmap 'nosuch' could not be found",
        ),
        (
            Box::new(|o| o.bitmap = Some("b0".into())),
            "Bitmap sync mode must be given when providing a bitmap",
        ),
        (
            Box::new(|o| o.bitmap_mode = Some(BitmapSyncMode::Always)),
            "Cannot specify bitmap sync mode without a bitmap",
        ),
        (
            Box::new(|o| {
                o.sync = MirrorSyncMode::Top;
                o.bitmap = Some("b0".into());
                o.bitmap_mode = Some(BitmapSyncMode::Never);
            }),
            "Bitmap sync mode 'never' has no meaningful effect when combined with sync mode 'top'",
        ),
        (
            Box::new(|o| {
                o.sync = MirrorSyncMode::None;
                o.bitmap = Some("b0".into());
                o.bitmap_mode = Some(BitmapSyncMode::Always);
            }),
            "sync mode 'none' does not produce meaningful bitmap outputs",
        ),
        (
            Box::new(|o| o.perf.max_workers = 0),
            "max-workers must be between 1 and 2147483647",
        ),
        (
            Box::new(|o| o.perf.max_chunk = 1000),
            "Required max-chunk (1000) is less than backup cluster size (65536)",
        ),
        (
            Box::new(|o| o.perf.min_cluster_size = 3000),
            "Could not create node: Cannot create block-copy-state: min-cluster-size needs to be a power of 2",
        ),
        (
            Box::new(|o| o.filter_node_name = Some("bad name".into())),
            "Could not create node: Invalid node-name: 'bad name'",
        ),
        (
            Box::new(|o| o.filter_node_name = Some("tgt".into())),
            "Could not create node: Duplicate nodes with node-name='tgt'",
        ),
        (
            Box::new(|o| o.job_id = Some("1bad".into())),
            "Invalid job ID '1bad'",
        ),
        (
            Box::new(|o| o.speed = -1),
            "Parameter 'speed' expects a non-negative value",
        ),
    ];
    for (edit, text) in cases {
        let mut o = BackupOptions::new("src", "tgt", MirrorSyncMode::Full);
        o.job_id = Some("j".into());
        o.bitmap = None;
        edit(&mut o);
        let e = ctx.blockdev_backup(o).unwrap_err();
        assert_eq!(e.message(), text);
        assert_eq!(ctx.graph().nodes().len(), nodes, "after: {text}");
        assert!(ctx.query_block_jobs().is_empty());
        let list = ctx.query_dirty_bitmaps("src").unwrap();
        assert_eq!(list.len(), 1, "after: {text}");
        assert!(!list[0].busy, "b0 left frozen after: {text}");
    }
    // And a valid job still runs after all that.
    let job = ctx.blockdev_backup(opts(MirrorSyncMode::Full)).unwrap();
    wait_end(&job);
}

/// src (8 MiB, MiB i filled with i + 1), tmp, and a fleecing setup over
/// them: `cbw` (the guest writes through it) and `acc` (the view).
fn fleecing(dir: &std::path::Path) -> (Context, Vec<u8>) {
    let (src, tmp) = (dir.join("src.img"), dir.join("tmp.img"));
    let before = patterned(&src, 8);
    std::fs::write(&tmp, vec![0u8; 8 * MIB as usize]).unwrap();
    let ctx = Context::new();
    file_node(&ctx, "src", &src);
    file_node(&ctx, "tmp", &tmp);
    ctx.blockdev_add(&json!({"driver":"copy-before-write","node-name":"cbw",
        "file":"src","target":"tmp"}))
        .unwrap();
    // discard=unmap: otherwise the block layer drops discards of the view
    // before they reach it (QEMU's BDRV_O_UNMAP).
    ctx.blockdev_add(
        &json!({"driver":"snapshot-access","node-name":"acc","file":"cbw",
        "discard":"unmap"}),
    )
    .unwrap();
    (ctx, before)
}

#[test]
fn snapshot_readers_racing_guest_writers_see_the_old_data() {
    let dir = tempfile::tempdir().unwrap();
    let (ctx, before) = fleecing(dir.path());
    let blk = Arc::new(ctx.blk_new("cbw", BackendOptions::default()).unwrap());
    let acc = ctx.graph().find_node("acc").unwrap();
    std::thread::scope(|sc| {
        for w in 0..3u64 {
            let blk = blk.clone();
            sc.spawn(move || {
                let mut x = w + 11;
                for _ in 0..300 {
                    x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
                    let off = (x >> 20) % (8 * MIB - 4096);
                    blk.pwrite(off, &[0xf0; 4096]).unwrap();
                }
            });
        }
        for r in 0..2u64 {
            let acc = acc.clone();
            let before = &before;
            sc.spawn(move || {
                let mut x = r + 5;
                let mut buf = vec![0u8; 96 << 10];
                for _ in 0..300 {
                    x = x.wrapping_mul(6364136223846793005).wrapping_add(3);
                    let off = (x >> 20) % (8 * MIB - buf.len() as u64);
                    acc.pread(off, &mut buf).unwrap();
                    let o = off as usize;
                    assert!(buf[..] == before[o..o + buf.len()], "view changed at {off}");
                }
            });
        }
    });
}

#[test]
fn discarding_the_view_gives_clusters_up() {
    let dir = tempfile::tempdir().unwrap();
    let (ctx, _) = fleecing(dir.path());
    let blk = ctx.blk_new("cbw", BackendOptions::default()).unwrap();
    let acc = ctx.graph().find_node("acc").unwrap();
    let counts = || -> Vec<u64> {
        ctx.query_dirty_bitmaps("cbw")
            .unwrap()
            .iter()
            .map(|b| b.count)
            .collect()
    };
    // access, done, copy
    assert_eq!(counts(), vec![8 * MIB, 0, 8 * MIB]);
    // Unaligned: only the whole clusters inside [1 MiB + 1, 2 MiB + 65535).
    acc.pdiscard(MIB + 1, MIB + 65534).unwrap();
    assert_eq!(counts(), vec![7 * MIB + 64 * 1024, 0, 7 * MIB + 64 * 1024]);
    let mut b = vec![0u8; 4096];
    let e = acc.pread(MIB + (64 << 10), &mut b).unwrap_err();
    assert_eq!(e.errno(), Some(libc::EACCES));
    // A guest write there copies nothing any more; elsewhere it does.
    blk.pwrite(MIB + (128 << 10), &[1; 512]).unwrap();
    assert_eq!(counts()[1], 0);
    blk.pwrite(4 * MIB, &[1; 512]).unwrap();
    assert_eq!(counts()[1], 64 << 10);
    acc.pread(4 * MIB, &mut b).unwrap();
    assert!(b.iter().all(|x| *x == 5), "the view lost its old data");
    // The view is read-only.
    assert_eq!(
        acc.pwrite(0, &[0; 512]).unwrap_err().errno(),
        Some(libc::ENOTSUP)
    );
    // blockdev-del: the filter is in use by the guest, then by the view
    // (QEMU's two texts).
    assert_eq!(
        ctx.blockdev_del("cbw").unwrap_err().message(),
        "Node cbw is in use"
    );
    drop(blk);
    assert_eq!(
        ctx.blockdev_del("cbw").unwrap_err().message(),
        "Block device cbw is in use"
    );
    drop(acc);
    ctx.blockdev_del("acc").unwrap();
    ctx.blockdev_del("cbw").unwrap();
}
