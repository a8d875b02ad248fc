//! Crash consistency, proven rather than hoped (issue #17): every qcow2
//! image of a job runs over a recording `blklogwrites` node, and the
//! checker (`common::crash`) rebuilds the files as a power cut would have
//! left them at every flush point and at sampled points between flushes
//! (any subset of the unflushed writes, torn ones too). Every state must
//! pass `qemu-img check` (leaked clusters allowed, corruption never); for
//! stream and commit the guest view of the chain's top must be the
//! original in every state (QEMU's guarantee); after a mirror or active
//! commit completed, its target must hold the original too. The number
//! of states checked per job is printed (`--nocapture`).

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use blockjob::Context;
use blockjob::block::backend::BackendOptions;
use common::chain::{s, tool};
use common::crash::{self, Entry, Op, Recorded, Rng};
use common::oracle::{Ours, Side};
use common::qmp::Daemon;
use serde_json::{Value, json};

/// Sampled states per job (`CRASH_SAMPLES` overrides it for a longer run).
fn samples() -> usize {
    std::env::var("CRASH_SAMPLES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(24)
}

/// The recording nodes' sector size: 4096, or `CRASH_SECTOR`.
fn sector_size() -> u64 {
    std::env::var("CRASH_SECTOR")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(4096)
}

/// At most this many states per job besides the samples.
const MAX_FLUSH_POINTS: usize = 32;

fn qemu_img(dir: &Path, args: &[&str]) {
    common::require_tool("qemu-img");
    let out = std::process::Command::new("qemu-img")
        .current_dir(dir)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "qemu-img {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// base (4 MiB: 0x01, then 0x11 in its last MiB) <- mid (0x02 at 1 MiB,
/// 1 MiB) <- top (0x03 at 3 MiB, 512 KiB), 64 KiB clusters, relative
/// backing names (so a state's copies in another directory form a chain).
fn chain(dir: &Path) {
    qemu_img(dir, &["create", "-q", "-f", "qcow2", "base.qcow2", "4M"]);
    for (img, back) in [("mid.qcow2", "base.qcow2"), ("top.qcow2", "mid.qcow2")] {
        qemu_img(
            dir,
            &[
                "create", "-q", "-f", "qcow2", "-b", back, "-F", "qcow2", img,
            ],
        );
    }
    for (img, cmds) in [
        ("base.qcow2", vec!["write -P 1 0 3M", "write -P 17 3M 1M"]),
        (
            "mid.qcow2",
            vec!["write -P 2 1M 1M", "write -P 4 2176k 64k"],
        ),
        ("top.qcow2", vec!["write -P 3 3M 512k"]),
    ] {
        for c in cmds {
            tool("qemu-io", &["-c", c, s(&dir.join(img))]);
        }
    }
}

/// The guest view of `img` as a raw file `out`.
fn view(img: &Path, out: &Path) {
    tool("qemu-img", &["convert", "-U", "-O", "raw", s(img), s(out)]);
}

/// A qcow2 node over a recording node over `dir/name` (log `name.log`).
///
/// Sectors of 4 KiB: a write is atomic per 4 KiB (what disks with 4 KiB
/// physical sectors give, and the page the kernel writes back), torn
/// between them. With 512-byte sectors a header rewrite that spans two of
/// them can be torn in the middle of the backing file name, ours as
/// QEMU's (see the README, Crash consistency).
fn logged(dir: &Path, name: &str, backing: Value) -> Value {
    let stem = name.trim_end_matches(".qcow2");
    json!({"driver": "qcow2", "node-name": stem, "backing": backing,
        "file": {"driver": "blklogwrites", "node-name": format!("{stem}-log"),
            "log-sector-size": sector_size(),
            "file": {"driver": "file", "filename": dir.join(name)},
            "log": {"driver": "file", "filename": dir.join(format!("{name}.log"))}}})
}

/// top <- mid <- base, each over its recording node, added one by one
/// (QEMU refuses an inline backing node with a `file` of its own: the
/// header's name would be its `filename` too).
fn add_logged_chain(o: &mut dyn Side, dir: &Path) {
    cmd(o, "blockdev-add", logged(dir, "base.qcow2", Value::Null));
    cmd(o, "blockdev-add", logged(dir, "mid.qcow2", json!("base")));
    cmd(o, "blockdev-add", logged(dir, "top.qcow2", json!("mid")));
}

fn cmd(o: &mut dyn Side, name: &str, args: Value) -> Value {
    o.cmd(name, args.clone())
        .unwrap_or_else(|e| panic!("{name} {args}: {e}"))
}

/// Wait for `event` (30 s at most, polling the event stream).
fn wait_event(o: &mut dyn Side, event: &str) -> Value {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while std::time::Instant::now() < deadline {
        if let Some(e) = o.event_within(Duration::from_secs(1))
            && e["event"] == event
        {
            return e;
        }
    }
    panic!("no {event} within 60 s")
}

/// Wait until job `id` is gone (its JOB_STATUS_CHANGE to null).
fn wait_gone(o: &mut dyn Side, id: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while std::time::Instant::now() < deadline {
        if let Some(e) = o.event_within(Duration::from_secs(1))
            && e["event"] == "JOB_STATUS_CHANGE"
            && e["data"]["id"] == id
            && e["data"]["status"] == "null"
        {
            return;
        }
    }
    panic!("job {id} still there after 60 s")
}

/// CLOCK_MONOTONIC now, in the unit of the log entries' stamps.
fn now_ns() -> u64 {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).unwrap();
    t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64
}

/// Snapshot the images, run `job` on a context with every image over a
/// recording node, close everything, read the logs.
fn record(dir: &Path, names: &[&str], job: impl FnOnce(&mut Ours)) -> Vec<Recorded> {
    let mut files: Vec<Recorded> = names.iter().map(|n| Recorded::before(dir, n)).collect();
    {
        let mut o = Ours::new();
        job(&mut o);
        o.ctx.shutdown();
    }
    for f in &mut files {
        f.finish(dir);
    }
    files
}

/// The same on qemu-storage-daemon with QEMU's blklogwrites (quit closes
/// every image).
fn record_qemu(dir: &Path, names: &[&str], job: impl FnOnce(&mut Daemon)) -> Vec<Recorded> {
    let mut files: Vec<Recorded> = names.iter().map(|n| Recorded::before(dir, n)).collect();
    {
        let mut d = Daemon::start();
        job(&mut d);
    }
    for f in &mut files {
        f.finish(dir);
    }
    files
}

fn report(job: &str, files: &[Recorded], checked: usize) {
    let entries: usize = files.iter().map(|f| f.entries.len()).sum();
    let flushes: usize = files
        .iter()
        .flat_map(|f| &f.entries)
        .filter(|e| matches!(e.op, Op::Flush))
        .count();
    println!(
        "crash states: {job}: {checked} states checked ({entries} logged requests, {flushes} flushes)"
    );
    if std::env::var_os("CRASH_LOGS").is_some() {
        println!("{}", crash::describe(files));
    }
}

/// A temporary directory with the chain base <- mid <- top in `img/`, and
/// top's guest view before any job in `orig.raw` next to it.
fn chain_fixture() -> (tempfile::TempDir, PathBuf, PathBuf) {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("img");
    std::fs::create_dir(&dir).unwrap();
    chain(&dir);
    let orig = t.path().join("orig.raw");
    view(&dir.join("top.qcow2"), &orig);
    (t, dir, orig)
}

/// Every flush point and `sampled` states between flushes keep top's guest
/// view at `orig`; the count is reported as `job`'s.
fn check_top_view(job: &str, files: &[Recorded], orig: &Path, sampled: usize) {
    let mut rng = Rng::new(crash::seed());
    let states = crash::crash_states(files, &mut rng, sampled, sampled + MAX_FLUSH_POINTS);
    let n = crash::check_all(files, &states, |_| {
        vec![("top.qcow2".into(), orig.to_path_buf())]
    });
    report(job, files, n);
}

#[test]
fn stream_keeps_the_guest_view_in_every_crash_state() {
    let (_t, dir, orig) = chain_fixture();
    let files = record(&dir, &["base.qcow2", "mid.qcow2", "top.qcow2"], |o| {
        add_logged_chain(o, &dir);
        cmd(
            o,
            "block-stream",
            json!({"job-id": "s0", "device": "top",
            "base-node": "base", "backing-file": "base.qcow2"}),
        );
        wait_gone(o, "s0");
        cmd(o, "blockdev-del", json!({"node-name": "top"}));
    });
    // The job did its work: top now sits on base directly.
    assert_eq!(
        common::chain::backing_chain(&dir.join("top.qcow2")).len(),
        2,
        "top -> base after the stream"
    );
    check_top_view("stream", &files, &orig, samples());
}

/// With 512-byte sectors the header's backing name lies past the first
/// sector (QEMU's feature table pushes it there) while its length is in
/// the first: a header rewritten in one write can be torn between them,
/// every such tear is among the states, and none may name a file that is
/// not there.
#[test]
fn stream_relinks_safely_with_512_byte_sectors() {
    let (_t, dir, orig) = chain_fixture();
    let files = record(&dir, &["base.qcow2", "mid.qcow2", "top.qcow2"], |o| {
        for (name, backing) in [
            ("base.qcow2", Value::Null),
            ("mid.qcow2", json!("base")),
            ("top.qcow2", json!("mid")),
        ] {
            let mut v = logged(&dir, name, backing);
            v["file"]["log-sector-size"] = json!(512);
            cmd(o, "blockdev-add", v);
        }
        cmd(
            o,
            "block-stream",
            json!({"job-id": "s0", "device": "top",
            "base-node": "base", "backing-file": "base.qcow2"}),
        );
        wait_gone(o, "s0");
    });
    assert_eq!(files[2].sector, 512);
    // Not sampled: the flush points and every tear are the point here.
    check_top_view("stream, 512-byte sectors", &files, &orig, 0);
}

/// The same stream on qemu-storage-daemon, its log written by QEMU's own
/// blklogwrites, replayed by the same checker (one file is written, so
/// QEMU's entries need no stamps). QEMU 10.0 writes the new backing link
/// into the header before it writes back the L2 entries of the clusters
/// it copied (they follow the first flush): a power cut between that
/// flush and the L2 write leaves a top that reads base's data where mid's
/// was. The checker finds that state; ours flushes the image before the
/// header changes (`stream_keeps_the_guest_view_in_every_crash_state`).
#[test]
fn qemu_stream_replayed_by_the_same_checker_writes_its_header_too_early() {
    let (_t, dir, orig) = chain_fixture();
    let files = record_qemu(&dir, &["base.qcow2", "mid.qcow2", "top.qcow2"], |d| {
        add_logged_chain(d, &dir);
        cmd(
            d,
            "block-stream",
            json!({"job-id": "s0", "device": "top",
            "base-node": "base", "backing-file": "base.qcow2"}),
        );
        wait_gone(d, "s0");
        cmd(d, "blockdev-del", json!({"node-name": "top"}));
    });
    assert_eq!(
        common::chain::backing_chain(&dir.join("top.qcow2")).len(),
        2,
        "top -> base after QEMU's stream"
    );
    let top = &files[2];
    assert!(
        top.entries.iter().all(|e| e.ts == 0),
        "QEMU's entries carry no stamp"
    );
    // The order in QEMU's log: the header (offset 0) before the first
    // flush, a metadata write after it.
    let first_flush = top
        .entries
        .iter()
        .position(|e| matches!(e.op, Op::Flush))
        .expect("a flush");
    let header_at = top
        .entries
        .iter()
        .position(|e| matches!(e.op, Op::Write { offset: 0, .. }))
        .expect("a header write");
    assert!(header_at < first_flush, "{}", crash::describe(&files));
    let mut rng = Rng::new(crash::seed());
    let states = crash::crash_states(&files, &mut rng, samples(), samples() + MAX_FLUSH_POINTS);
    let failed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        crash::check_all(&files, &states, |_| {
            vec![("top.qcow2".into(), orig.clone())]
        })
    }))
    .expect_err("QEMU 10.0's stream leaves a crash state with the wrong guest view");
    let text = failed.downcast_ref::<String>().cloned().unwrap_or_default();
    assert!(
        text.contains(
            "flush point 0 (file top.qcow2): top.qcow2: guest view is not the expected one"
        ),
        "{text}"
    );
    let bad = text
        .lines()
        .filter(|l| l.contains("guest view is not"))
        .count();
    println!(
        "crash states: stream on qemu-storage-daemon: {} states checked, {bad} with the wrong guest view",
        states.len()
    );
}

#[test]
fn intermediate_commit_keeps_the_guest_view_in_every_crash_state() {
    let (_t, dir, orig) = chain_fixture();
    let files = record(&dir, &["base.qcow2", "mid.qcow2", "top.qcow2"], |o| {
        add_logged_chain(o, &dir);
        cmd(
            o,
            "block-commit",
            json!({"job-id": "c0", "device": "top",
            "top-node": "mid", "base-node": "base", "backing-file": "base.qcow2"}),
        );
        wait_gone(o, "c0");
        cmd(o, "blockdev-del", json!({"node-name": "top"}));
    });
    assert_eq!(
        common::chain::backing_chain(&dir.join("top.qcow2")).len(),
        2,
        "top -> base after the commit"
    );
    check_top_view("intermediate commit", &files, &orig, samples());
}

/// Active commit and mirror end with the guest on their target: once the
/// job completed, the target must hold the guest view in every state.
fn check_pivot(job: &str, files: &[Recorded], source: &str, target: &str, orig: &Path, done: u64) {
    let mut rng = Rng::new(crash::seed());
    let states = crash::crash_states(files, &mut rng, samples(), samples() + MAX_FLUSH_POINTS);
    let after = states.iter().filter(|s| s.at_ts >= done).count();
    assert!(after > 0, "some states lie after the completion");
    let n = crash::check_all(files, &states, |st| {
        let mut v = vec![(source.to_string(), orig.to_path_buf())];
        if st.at_ts >= done {
            v.push((target.to_string(), orig.to_path_buf()));
        }
        v
    });
    report(job, files, n);
}

#[test]
fn active_commit_keeps_the_guest_view_in_every_crash_state() {
    let (_t, dir, orig) = chain_fixture();
    let mut done = 0;
    let files = record(&dir, &["base.qcow2", "mid.qcow2", "top.qcow2"], |o| {
        add_logged_chain(o, &dir);
        cmd(
            o,
            "block-commit",
            json!({"job-id": "c0", "device": "top",
            "base-node": "base"}),
        );
        wait_event(o, "BLOCK_JOB_READY");
        cmd(o, "block-job-complete", json!({"device": "c0"}));
        wait_event(o, "BLOCK_JOB_COMPLETED");
        done = now_ns();
        wait_gone(o, "c0");
        // Closing the context closes every image.
    });
    check_pivot(
        "active commit",
        &files,
        "top.qcow2",
        "base.qcow2",
        &orig,
        done,
    );
}

#[test]
fn mirror_with_replaces_keeps_the_guest_view_in_every_crash_state() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("img");
    std::fs::create_dir(&dir).unwrap();
    chain(&dir);
    qemu_img(&dir, &["create", "-q", "-f", "qcow2", "tgt.qcow2", "4M"]);
    let orig = t.path().join("orig.raw");
    view(&dir.join("top.qcow2"), &orig);
    let mut done = 0;
    let names = ["base.qcow2", "mid.qcow2", "top.qcow2", "tgt.qcow2"];
    let files = record(&dir, &names, |o| {
        add_logged_chain(o, &dir);
        cmd(o, "blockdev-add", logged(&dir, "tgt.qcow2", Value::Null));
        cmd(
            o,
            "blockdev-mirror",
            json!({"job-id": "m0", "device": "top",
            "target": "tgt", "sync": "full", "replaces": "top"}),
        );
        wait_event(o, "BLOCK_JOB_READY");
        cmd(o, "block-job-complete", json!({"device": "m0"}));
        wait_event(o, "BLOCK_JOB_COMPLETED");
        done = now_ns();
        wait_gone(o, "m0");
        // Closing the context closes every image.
    });
    check_pivot(
        "mirror (replaces)",
        &files,
        "top.qcow2",
        "tgt.qcow2",
        &orig,
        done,
    );
}

/// Persistent bitmaps: the image opened (with `old`, a bitmap of QEMU's,
/// marked in use), two added, written to, merged, cleared, and all written
/// out at close. `sector`: the recording node's; `samples` as in
/// [`crash::crash_states`].
fn bitmap_updates(sector: u64, old: bool, samples: usize, job: &str) {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("img");
    std::fs::create_dir(&dir).unwrap();
    qemu_img(&dir, &["create", "-q", "-f", "qcow2", "disk.qcow2", "4M"]);
    tool(
        "qemu-io",
        &["-c", "write -P 1 0 1M", s(&dir.join("disk.qcow2"))],
    );
    if old {
        qemu_img(&dir, &["bitmap", "--add", "disk.qcow2", "old"]);
    }
    let files = record(&dir, &["disk.qcow2"], |o| {
        let mut v = logged(&dir, "disk.qcow2", Value::Null);
        v["file"]["log-sector-size"] = json!(sector);
        cmd(o, "blockdev-add", v);
        let g = o.ctx.blk_new("disk", BackendOptions::default()).unwrap();
        cmd(
            o,
            "block-dirty-bitmap-add",
            json!({"node": "disk", "name": "b0",
            "persistent": true, "granularity": 65536}),
        );
        for (i, off) in [0u64, 1 << 20, 3 << 20].into_iter().enumerate() {
            g.pwrite(off, &vec![i as u8 + 5; 65536]).unwrap();
        }
        cmd(
            o,
            "block-dirty-bitmap-add",
            json!({"node": "disk", "name": "b1",
            "persistent": true}),
        );
        cmd(
            o,
            "block-dirty-bitmap-merge",
            json!({"node": "disk", "target": "b1",
            "bitmaps": ["b0"]}),
        );
        cmd(
            o,
            "block-dirty-bitmap-clear",
            json!({"node": "disk", "name": "b0"}),
        );
        g.pwrite(2 << 20, &[9u8; 65536]).unwrap();
        g.flush().unwrap();
        drop(g);
        // Closing writes both bitmaps out.
        cmd(o, "blockdev-del", json!({"node-name": "disk"}));
    });
    // The bitmaps reached the image.
    let info = tool(
        "qemu-img",
        &["info", "--output=json", s(&dir.join("disk.qcow2"))],
    );
    let info: Value = serde_json::from_str(&info).unwrap();
    let mut names: Vec<&str> = info["format-specific"]["data"]["bitmaps"]
        .as_array()
        .expect("bitmaps in the image")
        .iter()
        .map(|b| b["name"].as_str().unwrap())
        .collect();
    names.sort();
    let want: &[&str] = if old {
        &["b0", "b1", "old"]
    } else {
        &["b0", "b1"]
    };
    assert_eq!(names, want);
    let mut rng = Rng::new(crash::seed());
    let states = crash::crash_states(&files, &mut rng, samples, samples + MAX_FLUSH_POINTS);
    let n = crash::check_all(&files, &states, |_| Vec::new());
    report(job, &files, n);
}

#[test]
fn persistent_bitmap_updates_keep_the_image_consistent_in_every_crash_state() {
    bitmap_updates(sector_size(), true, samples(), "persistent bitmaps");
}

/// With 512-byte sectors the header rewrite that adds the bitmaps
/// extension spans two sectors (the autoclear bits in the first, the
/// extension in the second): every tear of it is among the states.
#[test]
fn persistent_bitmap_write_out_survives_torn_header_writes() {
    bitmap_updates(512, false, 0, "persistent bitmaps, 512-byte sectors");
}

/// Guest writes into an overlay with 512-byte clusters, spread so that
/// they need more L2 tables (32 KiB of guest data each) than imago caches
/// (128): tables are evicted, and written back, while writes go on. Every
/// state must pass `qemu-img check`, and every guest block must read as
/// it was (the backing file's) or as written, never as anything else: an
/// L2 entry durable before its data would read zeroes there.
#[test]
fn guest_writes_under_l2_eviction_keep_old_or_new_data() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("img");
    std::fs::create_dir(&dir).unwrap();
    qemu_img(&dir, &["create", "-q", "-f", "qcow2", "base.qcow2", "8M"]);
    tool(
        "qemu-io",
        &["-c", "write -P 17 0 8M", s(&dir.join("base.qcow2"))],
    );
    qemu_img(
        &dir,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=512",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
        ],
    );
    let before = t.path().join("before.raw");
    view(&dir.join("top.qcow2"), &before);
    let files = record(&dir, &["base.qcow2", "top.qcow2"], |o| {
        cmd(o, "blockdev-add", logged(&dir, "base.qcow2", Value::Null));
        cmd(o, "blockdev-add", logged(&dir, "top.qcow2", json!("base")));
        let g = o.ctx.blk_new("top", BackendOptions::default()).unwrap();
        // 4 KiB every 32 KiB: 256 writes, each in an L2 table of its own.
        for (i, off) in (0..8u64 << 20).step_by(32 << 10).enumerate() {
            g.pwrite(off, &[i as u8 | 0x80; 4096]).unwrap();
            if i % 64 == 63 {
                g.flush().unwrap();
            }
        }
        drop(g);
    });
    let after = t.path().join("after.raw");
    view(&dir.join("top.qcow2"), &after);
    let (before, after) = (
        std::fs::read(&before).unwrap(),
        std::fs::read(&after).unwrap(),
    );
    assert_ne!(before, after);
    let mut rng = Rng::new(crash::seed());
    let states = crash::crash_states(&files, &mut rng, samples(), samples() + MAX_FLUSH_POINTS);
    let n = crash::check_all_with(
        &files,
        &states,
        |_| Vec::new(),
        |_, d| {
            let v = crash::guest_view(d, "top.qcow2")?;
            crash::each_block_old_or_new(&v, &before, &after, 512)
        },
    );
    report("guest writes, L2 tables evicted", &files, n);
}

/// The checker itself: a log that makes an overlay's L2 entry durable
/// before the cluster it points at must be flagged; the same writes with
/// the data flushed first must pass. The writes are those of a real
/// allocation (qemu-io writing into an overlay the data its backing file
/// already holds, so the guest view must not change), split into data
/// and metadata by where the cluster lies in the file.
#[test]
fn flags_metadata_before_data() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("img");
    std::fs::create_dir(&dir).unwrap();
    qemu_img(&dir, &["create", "-q", "-f", "qcow2", "base.qcow2", "1M"]);
    tool(
        "qemu-io",
        &["-c", "write -P 7 0 1M", s(&dir.join("base.qcow2"))],
    );
    qemu_img(
        &dir,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
        ],
    );
    let orig = t.path().join("orig.raw");
    view(&dir.join("top.qcow2"), &orig);
    let before = std::fs::read(dir.join("top.qcow2")).unwrap();
    tool(
        "qemu-io",
        &["-c", "write -P 7 64k 64k", s(&dir.join("top.qcow2"))],
    );
    let after = std::fs::read(dir.join("top.qcow2")).unwrap();
    // Where the new cluster's data lies in the file.
    let map = tool(
        "qemu-img",
        &["map", "--output=json", s(&dir.join("top.qcow2"))],
    );
    let map: Vec<Value> = serde_json::from_str(&map).unwrap();
    let data_at = map
        .iter()
        .find(|m| m["start"] == 65536 && m["depth"] == 0)
        .and_then(|m| m["offset"].as_u64())
        .expect("the cluster is allocated in top");
    let is_data = |off: usize| (data_at..data_at + 65536).contains(&(off as u64));
    // Every changed (or new) sector, as one write each.
    let mut data = Vec::new();
    let mut meta = Vec::new();
    for (k, chunk) in after.chunks(512).enumerate() {
        let old = before.get(k * 512..(k + 1) * 512);
        if old != Some(chunk) {
            let w = Op::Write {
                offset: (k * 512) as u64,
                data: chunk.to_vec(),
            };
            if is_data(k * 512) {
                &mut data
            } else {
                &mut meta
            }
            .push(w);
        }
    }
    assert!(!data.is_empty() && !meta.is_empty());
    let entries = |first: &[Op], second: &[Op]| -> Vec<Entry> {
        first
            .iter()
            .cloned()
            .chain([Op::Flush])
            .chain(second.iter().cloned())
            .chain([Op::Flush])
            .enumerate()
            .map(|(i, op)| Entry {
                ts: i as u64 + 1,
                op,
            })
            .collect()
    };
    let run = |log: Vec<Entry>, samples: usize| -> Result<usize, String> {
        std::fs::write(dir.join("top.qcow2"), &before).unwrap();
        let mut base = Recorded::before(&dir, "base.qcow2");
        let mut top = Recorded::before(&dir, "top.qcow2");
        crash::write_log(&dir.join("top.qcow2.log"), &log);
        top.finish(&dir_after(&dir, &after));
        base.entries = Vec::new();
        let files = [base, top];
        let mut rng = Rng::new(crash::seed());
        let states = crash::crash_states(&files, &mut rng, samples, 40);
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            crash::check_all(&files, &states, |_| {
                vec![("top.qcow2".into(), orig.clone())]
            })
        }))
        .map_err(|e| {
            e.downcast_ref::<String>()
                .cloned()
                .unwrap_or_else(|| "panic".into())
        })
    };
    let bad = run(entries(&meta, &data), 20).expect_err("metadata before data must be flagged");
    assert!(
        bad.contains("flush point 0 (file top.qcow2): top.qcow2: "),
        "{bad}"
    );
    // The same writes with the data flushed first pass at every flush
    // point. (Not sampled: the metadata sectors, written here as one
    // unflushed batch, would show a refcount/L2 order this test does not
    // model; QEMU orders them with flushes of its own.)
    let good = run(entries(&data, &meta), 0).expect("data flushed before its metadata passes");
    assert_eq!(good, 4, "before, two flush points, after");
}

/// A directory holding `top.qcow2` as it is after the writes (what
/// `Recorded::finish` compares the replayed log with).
fn dir_after(dir: &Path, after: &[u8]) -> PathBuf {
    let d = dir.join("after");
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(d.join("top.qcow2"), after).unwrap();
    std::fs::copy(dir.join("top.qcow2.log"), d.join("top.qcow2.log")).unwrap();
    d
}

/// blockdev-add of blklogwrites: QEMU's option checks and texts.
#[test]
fn blklogwrites_options_are_checked_as_qemu_checks_them() {
    let t = tempfile::tempdir().unwrap();
    let img = t.path().join("a.img");
    let log = t.path().join("a.log");
    std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
    std::fs::write(&log, b"").unwrap();
    let ctx = Context::new();
    let add = |extra: Value| {
        let mut v = json!({"driver": "blklogwrites", "node-name": "l",
            "file": {"driver": "file", "filename": img},
            "log": {"driver": "file", "filename": log}});
        for (k, x) in extra.as_object().unwrap() {
            v[k] = x.clone();
        }
        let r = ctx
            .blockdev_add(&v)
            .map(|_| ())
            .map_err(|e| e.message().to_string());
        if r.is_ok() {
            ctx.blockdev_del("l").unwrap();
        }
        r
    };
    assert_eq!(
        add(json!({"log-sector-size": 1000})).unwrap_err(),
        "Invalid log sector size 1000"
    );
    assert_eq!(
        add(json!({"log-append": true, "log-sector-size": 512})).unwrap_err(),
        "log-append and log-sector-size are mutually exclusive"
    );
    assert_eq!(
        add(json!({"log-super-update-interval": 0})).unwrap_err(),
        "Invalid log superblock update interval 0"
    );
    let missing = ctx
        .blockdev_add(&json!({"driver": "blklogwrites", "node-name": "l",
            "file": {"driver": "file", "filename": img}}))
        .unwrap_err();
    assert_eq!(missing.message(), "Parameter 'log' is missing");
    // A log of something else is refused on append.
    std::fs::write(&log, vec![1u8; 512]).unwrap();
    assert_eq!(
        add(json!({"log-append": true})).unwrap_err(),
        "Invalid log superblock magic"
    );
    // Written, then appended to: two runs' entries in one log, in order.
    std::fs::write(&log, b"").unwrap();
    for (pass, append) in [(1u8, false), (2, true)] {
        let mut v = json!({"driver": "raw", "node-name": "r", "file": {
            "driver": "blklogwrites", "log-append": append,
            "file": {"driver": "file", "filename": img},
            "log": {"driver": "file", "filename": log}}});
        if !append {
            v["file"]["log-super-update-interval"] = json!(1);
        }
        // The previous pass closed these files, but another test of this
        // binary may be spawning `qemu-img` right now: until its child
        // execs, it shares every open file description of this process,
        // the previous pass's too, and with them their OFD locks (QEMU's
        // own locks have the same window in a process that forks).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while let Err(e) = ctx.blockdev_add(&v) {
            assert!(
                e.message().starts_with("Failed to get") && std::time::Instant::now() < deadline,
                "{e:?}"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let g = ctx.blk_new("r", BackendOptions::default()).unwrap();
        // Unaligned: widened to whole sectors in the log.
        g.pwrite(100, &[pass; 10]).unwrap();
        g.flush().unwrap();
        drop(g);
        ctx.blockdev_del("r").unwrap();
    }
    let entries = crash::read_log(&log);
    let ops: Vec<String> = entries
        .iter()
        .map(|e| match &e.op {
            Op::Write { offset, data } => format!("W{offset}+{}:{}", data.len(), data[100]),
            Op::Discard { .. } => "D".into(),
            Op::Flush => "F".into(),
        })
        .collect();
    assert_eq!(ops, ["W0+512:1", "F", "W0+512:2", "F"]);
    assert!(
        entries.windows(2).all(|w| w[0].ts <= w[1].ts),
        "stamps in order"
    );
}

/// blklogwrites' refusals, side by side with qemu-storage-daemon's: the
/// same blockdev-add on both, the same class and text.
#[test]
fn blklogwrites_refusals_are_qemus() {
    let t = tempfile::tempdir().unwrap();
    let img = t.path().join("a.img");
    let log = t.path().join("a.log");
    let junk = t.path().join("junk.log");
    std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
    std::fs::write(&log, b"").unwrap();
    std::fs::write(&junk, vec![1u8; 4096]).unwrap();
    let cases: Vec<(&str, Value)> = vec![
        ("bad sector size", json!({"log-sector-size": 1000})),
        ("sector size too small", json!({"log-sector-size": 16})),
        ("sector size not a uint32", json!({"log-sector-size": -1})),
        (
            "append and sector size",
            json!({"log-append": true, "log-sector-size": 512}),
        ),
        ("interval 0", json!({"log-super-update-interval": 0})),
        (
            "interval not a number",
            json!({"log-super-update-interval": "x"}),
        ),
        ("append not a bool", json!({"log-append": 1})),
        ("no log", json!({"log": null})),
        ("unknown member", json!({"log-bogus": 1})),
        (
            "append to junk",
            json!({"log-append": true,
            "log": {"driver": "file", "filename": junk}}),
        ),
        ("fine", json!({})),
        ("fine, appended", json!({"log-append": true})),
    ];
    let run = |side: &mut dyn Side| -> Vec<String> {
        cases
            .iter()
            .map(|(label, extra)| {
                let mut v = json!({"driver": "blklogwrites", "node-name": "l",
                    "file": {"driver": "file", "filename": img},
                    "log": {"driver": "file", "filename": log}});
                for (k, x) in extra.as_object().unwrap() {
                    if x.is_null() {
                        v.as_object_mut().unwrap().remove(k);
                    } else {
                        v[k] = x.clone();
                    }
                }
                let r = side.cmd("blockdev-add", v);
                if r.is_ok() {
                    side.cmd("blockdev-del", json!({"node-name": "l"})).unwrap();
                }
                format!(
                    "{label}: {}",
                    r.map(|_| "ok".to_string()).unwrap_or_else(|e| e)
                )
            })
            .collect()
    };
    let qemu = run(&mut Daemon::start());
    let ours = run(&mut Ours::new());
    assert_eq!(ours, qemu);
}

/// QEMU's own persistent-bitmap write-out (a new image: two bitmaps
/// added, merged, cleared, stored at close), recorded with 512-byte
/// sectors by QEMU's blklogwrites and replayed by the same checker. QEMU
/// 10.0 rewrites the header cluster in one write that sets the bitmaps
/// autoclear bit (first sector) and adds the extension (second): torn
/// between them the image is one QEMU refuses to open. Ours clears and
/// sets the bit in writes of their own
/// (`persistent_bitmap_write_out_survives_torn_header_writes`).
#[test]
fn qemu_bitmap_write_out_replayed_by_the_same_checker_tears_its_header() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("img");
    std::fs::create_dir(&dir).unwrap();
    qemu_img(&dir, &["create", "-q", "-f", "qcow2", "disk.qcow2", "4M"]);
    tool(
        "qemu-io",
        &["-c", "write -P 1 0 1M", s(&dir.join("disk.qcow2"))],
    );
    let files = record_qemu(&dir, &["disk.qcow2"], |d| {
        let mut v = logged(&dir, "disk.qcow2", Value::Null);
        v["file"]["log-sector-size"] = json!(512);
        cmd(d, "blockdev-add", v);
        cmd(
            d,
            "block-dirty-bitmap-add",
            json!({"node": "disk", "name": "b0",
            "persistent": true, "granularity": 65536}),
        );
        cmd(
            d,
            "block-dirty-bitmap-add",
            json!({"node": "disk", "name": "b1",
            "persistent": true}),
        );
        cmd(
            d,
            "block-dirty-bitmap-merge",
            json!({"node": "disk", "target": "b1",
            "bitmaps": ["b0"]}),
        );
        cmd(
            d,
            "block-dirty-bitmap-clear",
            json!({"node": "disk", "name": "b0"}),
        );
        cmd(d, "blockdev-del", json!({"node-name": "disk"}));
    });
    // Not sampled: the flush points and the tears decide.
    let mut rng = Rng::new(crash::seed());
    let states = crash::crash_states(&files, &mut rng, 0, MAX_FLUSH_POINTS);
    let failed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        crash::check_all(&files, &states, |_| Vec::new())
    }))
    .expect_err("QEMU 10.0's bitmap write-out tears with 512-byte sectors");
    let text = failed.downcast_ref::<String>().cloned().unwrap_or_default();
    assert!(
        text.contains("torn, sectors 0b1: disk.qcow2: qemu-img check exited Some(1)")
            && text.contains("found bitmaps extension with zero bitmaps"),
        "{text}"
    );
    let bad = text.lines().filter(|l| l.contains("zero bitmaps")).count();
    println!(
        "crash states: persistent bitmaps on qemu-storage-daemon, 512-byte sectors: {} states checked, {bad} QEMU cannot open",
        states.len()
    );
}
