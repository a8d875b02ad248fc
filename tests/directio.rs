//! `cache.direct=on` (O_DIRECT) and `host_device` on real block devices:
//! loop devices over files (one with 4096-byte logical sectors), QEMU's
//! refusals compared with qemu-storage-daemon, unaligned requests
//! (read-modify-write), `BLKDISCARD`/`BLKZEROOUT`/`BLKGETSIZE64`, and every
//! job on O_DIRECT nodes, a mirror without the page cache.

mod common;

use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use blockjob::Context;
use blockjob::block_jobs::backup::BackupOptions;
use blockjob::block_jobs::commit::CommitOptions;
use blockjob::block_jobs::mirror::MirrorOptions;
use blockjob::block_jobs::stream::StreamOptions;
use blockjob::qapi::{JobStatus, MirrorSyncMode};
use common::qmp::Daemon;
use serde_json::{Value, json};

const MIB: u64 = 1 << 20;

/// A loop device over a file, detached on drop (also when the test
/// fails).
struct Loop {
    dev: String,
}

impl Loop {
    fn attach(file: &Path, sector_size: Option<u32>) -> Loop {
        common::require_tool("losetup");
        let mut c = Command::new("losetup");
        c.arg("-f").arg("--show");
        if let Some(s) = sector_size {
            c.arg("--sector-size").arg(s.to_string());
        }
        let out = c.arg(file).output().expect("run losetup");
        assert!(
            out.status.success(),
            "losetup: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Loop {
            dev: String::from_utf8(out.stdout).unwrap().trim().to_string(),
        }
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.dev).status();
    }
}

fn patterned(path: &Path, size: u64) -> Vec<u8> {
    let data: Vec<u8> = (0..size).map(|i| (i / 512 * 7 + i % 251) as u8).collect();
    std::fs::write(path, &data).unwrap();
    data
}

fn wait_end(job: &blockjob::engine::Job) {
    job.wait_status(Duration::from_secs(120), |s| s == JobStatus::Null)
        .expect("job did not end");
}

fn step(r: Result<Value, (String, String)>) -> Result<(), (String, String)> {
    r.map(|_| ())
}

/// Every refusal of this issue, and the accepted neighbours, as QEMU 10
/// answers them.
#[test]
fn refusals_match_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("a.raw");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(4 * MIB)
        .unwrap();
    let lo_file = dir.path().join("lo.raw");
    std::fs::File::create(&lo_file)
        .unwrap()
        .set_len(4 * MIB)
        .unwrap();
    let lo = Loop::attach(&lo_file, None);
    let img = img.to_str().unwrap();
    let missing = dir.path().join("missing").to_str().unwrap().to_string();
    let dev = lo.dev.as_str();
    let cases: Vec<Value> = vec![
        json!({"driver":"file","node-name":"n","filename":img,"aio":"native"}),
        json!({"driver":"file","node-name":"n","filename":img,"aio":"native",
               "cache":{"direct":false}}),
        json!({"driver":"file","node-name":"n","filename":missing,"aio":"native"}),
        json!({"driver":"file","node-name":"n","filename":img,"aio":"native",
               "cache":{"direct":true}}),
        json!({"driver":"file","node-name":"n","filename":img,"aio":"io_uring"}),
        json!({"driver":"file","node-name":"n","filename":img,"aio":"threads",
               "cache":{"direct":true,"no-flush":true}}),
        json!({"driver":"file","node-name":"n","filename":dev}),
        json!({"driver":"file","node-name":"n","filename":dev,"aio":"native"}),
        json!({"driver":"host_device","node-name":"n","filename":img}),
        json!({"driver":"host_device","node-name":"n","filename":img,"aio":"native"}),
        json!({"driver":"host_device","node-name":"n","filename":missing}),
        json!({"driver":"host_device","node-name":"n","filename":dev}),
        json!({"driver":"host_device","node-name":"n","filename":dev,"aio":"native",
               "cache":{"direct":true}}),
        json!({"driver":"host_device","node-name":"n","filename":"/dev/null"}),
    ];
    let mut d = Daemon::start();
    let ctx = Context::new();
    let mut accepted = 0;
    for args in &cases {
        let theirs = step(
            d.qmp
                .execute("blockdev-add", args.clone())
                .map_err(|e| (e.class, e.desc)),
        );
        let ours = step(
            ctx.blockdev_add(args)
                .map(|_| Value::Null)
                .map_err(|e| (e.class().to_string(), e.message().to_string())),
        );
        assert_eq!(ours, theirs, "{args}");
        if theirs.is_ok() {
            accepted += 1;
            d.qmp.ok("blockdev-del", json!({"node-name":"n"}));
            ctx.blockdev_del("n").unwrap();
        }
    }
    // The list tests both sides: 6 accepted, 8 refused by QEMU.
    assert_eq!(accepted, 6);
}

/// A 4096-byte-sector loop device with O_DIRECT: every unaligned request
/// is padded (the kernel would refuse it with EINVAL), the size comes
/// from the device, block status says data, zeroes and discards reach
/// the device.
#[test]
fn host_device_4k_direct_handles_unaligned_requests() {
    let dir = tempfile::tempdir().unwrap();
    let backing = dir.path().join("lo4k.raw");
    let mut model = patterned(&backing, 8 * MIB);
    let lo = Loop::attach(&backing, Some(4096));
    let ctx = Context::new();
    let node = ctx
        .blockdev_add(
            &json!({"driver":"host_device","node-name":"d","filename":lo.dev,
            "cache":{"direct":true},"discard":"unmap","aio":"native"}),
        )
        .unwrap();
    assert_eq!(node.driver_name(), "host_device");
    assert_eq!(node.len().unwrap(), 8 * MIB);
    let st = node.block_status(0, 8 * MIB).unwrap();
    assert!(st.data && !st.zero && st.len == 8 * MIB, "{st:?}");
    // Reads and writes of odd shapes, from buffers at odd addresses.
    let cases: &[(u64, usize)] = &[
        (0, 512),
        (512, 512),
        (1, 1),
        (4095, 2),
        (4096 * 3 + 100, 10_000),
        (MIB - 7, 4096 * 4 + 14),
        (8 * MIB - 300, 300),
        (2 * MIB, 64 << 10),
    ];
    for (i, &(off, len)) in cases.iter().enumerate() {
        let mut back = vec![0u8; len + 1];
        node.pread(off, &mut back[1..]).unwrap();
        assert!(
            back[1..] == model[off as usize..off as usize + len],
            "read {off}+{len}"
        );
        let data: Vec<u8> = (0..len + 3).map(|j| (j * 31 + i) as u8 | 0x80).collect();
        node.pwrite(off, &data[3..]).unwrap();
        model[off as usize..off as usize + len].copy_from_slice(&data[3..]);
    }
    // Zeroes: an unaligned range (head and tail written, the middle by
    // BLKZEROOUT).
    node.pwrite_zeroes(5 * MIB + 1000, 3 * 4096 + 5, false)
        .unwrap();
    model[5 * MIB as usize + 1000..5 * MIB as usize + 1000 + 3 * 4096 + 5].fill(0);
    node.flush().unwrap();
    let mut all = vec![0u8; 8 * MIB as usize];
    node.pread(0, &mut all).unwrap();
    assert!(all == model, "the device differs from the model");
    // What the device holds is what the backing file holds.
    drop(node);
    ctx.blockdev_del("d").unwrap();
    let f = std::fs::OpenOptions::new()
        .read(true)
        .open(&lo.dev)
        .unwrap();
    let mut dev = vec![0u8; 8 * MIB as usize];
    f.read_exact_at(&mut dev, 0).unwrap();
    assert!(dev == model, "the block device differs from the model");
}

/// `discard=unmap` on a loop device sends BLKDISCARD: the loop driver
/// punches the range out of its backing file.
#[test]
fn host_device_discard_reaches_the_device() {
    let dir = tempfile::tempdir().unwrap();
    let backing = dir.path().join("lo.raw");
    patterned(&backing, 8 * MIB);
    let lo = Loop::attach(&backing, None);
    let allocated = || std::fs::metadata(&backing).unwrap().blocks() * 512;
    let before = allocated();
    assert!(before >= 8 * MIB, "{before}");
    let ctx = Context::new();
    let node = ctx
        .blockdev_add(
            &json!({"driver":"host_device","node-name":"d","filename":lo.dev,
            "discard":"unmap"}),
        )
        .unwrap();
    node.pdiscard(MIB, 4 * MIB).unwrap();
    node.flush().unwrap();
    let after = allocated();
    assert!(after <= before - 4 * MIB, "{before} -> {after}");
    let mut buf = vec![1u8; 4 * MIB as usize];
    node.pread(MIB, &mut buf).unwrap();
    assert!(buf.iter().all(|b| *b == 0));
}

fn fincore_bytes(p: &Path) -> u64 {
    common::require_tool("fincore");
    let out = Command::new("fincore")
        .args(["--bytes", "--noheadings", "--output", "RES"])
        .arg(p)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    String::from_utf8(out.stdout)
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

fn direct_raw(name: &str, path: &Path) -> Value {
    json!({"driver":"raw","node-name":name,"file":{"driver":"file","filename":path,
        "cache":{"direct":true},"aio":"native"}})
}

/// Written, made stable and dropped from the page cache: the file has no
/// page cached afterwards.
fn uncached(p: &Path) {
    let f = std::fs::OpenOptions::new().read(true).open(p).unwrap();
    f.sync_all().unwrap();
    nix::fcntl::posix_fadvise(
        std::os::fd::AsRawFd::as_raw_fd(&f),
        0,
        0,
        nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
    )
    .unwrap();
    assert_eq!(fincore_bytes(p), 0, "{}", p.display());
}

/// A mirror between O_DIRECT files copies through aligned buffers, never
/// `copy_file_range` (which reads the source through the page cache):
/// afterwards neither file has a page in the cache.
#[test]
fn mirror_between_direct_nodes_bypasses_the_page_cache() {
    let dir = tempfile::tempdir().unwrap();
    let (src, dst) = (dir.path().join("src.raw"), dir.path().join("dst.raw"));
    let data = patterned(&src, 16 * MIB + 1536);
    std::fs::File::create(&dst)
        .unwrap()
        .set_len(16 * MIB + 1536)
        .unwrap();
    uncached(&src);
    uncached(&dst);
    let ctx = Context::new();
    ctx.blockdev_add(&direct_raw("src", &src)).unwrap();
    ctx.blockdev_add(&direct_raw("dst", &dst)).unwrap();
    let mut o = MirrorOptions::new("src", "dst", MirrorSyncMode::Full);
    o.job_id = Some("m".into());
    let job = ctx.blockdev_mirror(o).unwrap();
    job.wait_status(Duration::from_secs(120), |s| s == JobStatus::Ready)
        .expect("mirror not ready");
    job.complete().unwrap();
    wait_end(&job);
    ctx.blockdev_del("src").ok();
    drop(ctx);
    assert_eq!(fincore_bytes(&src), 0, "source pages in the page cache");
    assert_eq!(fincore_bytes(&dst), 0, "target pages in the page cache");
    assert!(std::fs::read(&dst).unwrap() == data);
}

/// Mirror onto a 4096-byte-sector block device with O_DIRECT, from a file
/// whose size is not a multiple of 4096.
#[test]
fn mirror_onto_4k_host_device() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    let data = patterned(&src, 6 * MIB + 512);
    let backing = dir.path().join("lo4k.raw");
    std::fs::File::create(&backing)
        .unwrap()
        .set_len(8 * MIB)
        .unwrap();
    let lo = Loop::attach(&backing, Some(4096));
    let ctx = Context::new();
    ctx.blockdev_add(&direct_raw("src", &src)).unwrap();
    ctx.blockdev_add(
        &json!({"driver":"raw","node-name":"dst","size":6 * MIB + 512,
        "file":{"driver":"host_device","filename":lo.dev,"cache":{"direct":true}}}),
    )
    .unwrap();
    let mut o = MirrorOptions::new("src", "dst", MirrorSyncMode::Full);
    o.job_id = Some("m".into());
    let job = ctx.blockdev_mirror(o).unwrap();
    job.wait_status(Duration::from_secs(120), |s| s == JobStatus::Ready)
        .expect("mirror not ready");
    job.complete().unwrap();
    wait_end(&job);
    drop(ctx);
    let dev = std::fs::read(&backing).unwrap();
    assert!(dev[..data.len()] == data[..]);
}

/// Backup (full) from and onto O_DIRECT nodes.
#[test]
fn backup_on_direct_nodes() {
    let dir = tempfile::tempdir().unwrap();
    let (src, tgt) = (dir.path().join("src.raw"), dir.path().join("tgt.raw"));
    let data = patterned(&src, 8 * MIB);
    std::fs::File::create(&tgt)
        .unwrap()
        .set_len(8 * MIB)
        .unwrap();
    let ctx = Context::new();
    ctx.blockdev_add(&direct_raw("src", &src)).unwrap();
    ctx.blockdev_add(&direct_raw("tgt", &tgt)).unwrap();
    let mut o = BackupOptions::new("src", "tgt", MirrorSyncMode::Full);
    o.job_id = Some("b".into());
    let job = ctx.blockdev_backup(o).unwrap();
    wait_end(&job);
    drop(ctx);
    assert!(std::fs::read(&tgt).unwrap() == data);
}

fn qcow2_direct(name: &str, path: &Path, backing: Option<&str>) -> Value {
    // io_uring: the jobs' registered buffers reach the kernel this way.
    let mut v = json!({"driver":"qcow2","node-name":name,"file":{"driver":"file",
        "filename":path,"cache":{"direct":true},"aio":"io_uring"}});
    v["backing"] = backing.map_or(Value::Null, |b| json!(b));
    v
}

fn direct_chain(ctx: &Context, dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let (base, mid, top) = common::chain::chain(dir);
    ctx.blockdev_add(&qcow2_direct("base", &base, None))
        .unwrap();
    ctx.blockdev_add(&qcow2_direct("mid", &mid, Some("base")))
        .unwrap();
    ctx.blockdev_add(&qcow2_direct("top", &top, Some("mid")))
        .unwrap();
    (base, mid, top)
}

/// Stream and commit over qcow2 layers whose files are O_DIRECT with
/// `aio=io_uring` (qcow2's metadata I/O is unaligned: it is padded below).
#[test]
fn stream_and_commit_on_direct_nodes() {
    let dir = tempfile::tempdir().unwrap();
    let ctx = Context::new();
    let (_, _, top) = direct_chain(&ctx, dir.path());
    let before = common::chain::flat(&top);
    let mut o = StreamOptions::new("top");
    o.job_id = Some("s".into());
    let job = ctx.block_stream(o).unwrap();
    wait_end(&job);
    drop(ctx);
    assert!(common::chain::flat(&top) == before);
    assert_eq!(common::chain::backing_chain(&top), vec![None]);

    let dir = tempfile::tempdir().unwrap();
    let ctx = Context::new();
    let (base, _, top) = direct_chain(&ctx, dir.path());
    let before = common::chain::flat(&top);
    let mut o = CommitOptions::new("top");
    o.job_id = Some("c".into());
    o.top_node = Some("mid".into());
    o.base_node = Some("base".into());
    let job = ctx.block_commit(o).unwrap();
    wait_end(&job);
    drop(ctx);
    assert!(common::chain::flat(&top) == before);
    assert_eq!(common::chain::backing_chain(&top).len(), 2);
    let _ = base;
}

/// Image locking holds in every `aio` mode: while a guest device writes
/// through our node, QEMU's `qemu-io` cannot open the image for writing,
/// and it can again once the node is gone.
#[test]
fn locking_holds_with_every_aio_mode() {
    use blockjob::block::backend::BackendOptions;
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("l.raw");
    std::fs::File::create(&img).unwrap().set_len(MIB).unwrap();
    let qemu_io_write = || {
        common::require_tool("qemu-io");
        Command::new("qemu-io")
            .args(["-f", "raw", "-c", "write 0 512"])
            .arg(&img)
            .output()
            .unwrap()
    };
    for (aio, direct) in [("threads", false), ("io_uring", false), ("native", true)] {
        let ctx = Context::new();
        ctx.blockdev_add(
            &json!({"driver":"raw","node-name":"r","file":{"driver":"file",
            "filename":img,"aio":aio,"cache":{"direct":direct}}}),
        )
        .unwrap();
        let blk = ctx
            .blk_new(
                "r",
                BackendOptions {
                    name: "dev".into(),
                    ..Default::default()
                },
            )
            .unwrap();
        blk.pwrite(0, &[7; 4096]).unwrap();
        let out = qemu_io_write();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("Failed to get \"write\" lock"),
            "{aio}: qemu-io was not refused: {out:?}"
        );
        drop(blk);
        drop(ctx);
        let out = qemu_io_write();
        assert!(out.status.success(), "{aio}: {out:?}");
    }
}

/// The cache modes every node shows in `query-named-block-nodes`, as
/// (driver, file name, direct, no-flush), sorted: auto-generated node
/// names differ between the sides.
fn cache_modes(side: &mut dyn common::oracle::Side) -> Vec<(String, String, bool, bool)> {
    let nodes = side.cmd("query-named-block-nodes", json!({})).unwrap();
    let mut v: Vec<_> = nodes
        .as_array()
        .unwrap()
        .iter()
        .map(|n| {
            (
                n["drv"].as_str().unwrap().to_string(),
                n["file"].as_str().unwrap().to_string(),
                n["cache"]["direct"].as_bool().unwrap(),
                n["cache"]["no-flush"].as_bool().unwrap(),
            )
        })
        .collect();
    v.sort();
    v
}

/// `cache.*` is inherited as QEMU's children inherit it: an inline child
/// takes what it does not set itself, a backing chain opened from a
/// qcow2 header takes its overlay's; queries show each node's own.
#[test]
fn cache_options_are_inherited_as_in_qemu() {
    use common::oracle::{Ours, Side};
    let dir = tempfile::tempdir().unwrap();
    let (_, mid, top) = common::chain::chain(dir.path());
    let raw = dir.path().join("r.raw");
    std::fs::File::create(&raw).unwrap().set_len(MIB).unwrap();
    let adds = [
        json!({"driver":"raw","node-name":"r","cache":{"direct":true},
               "file":{"driver":"file","filename":raw}}),
        json!({"driver":"qcow2","node-name":"t","cache":{"no-flush":true},
               "file":{"driver":"file","filename":top,"cache":{"direct":true}}}),
        json!({"driver":"qcow2","node-name":"m","read-only":true,"force-share":true,
               "cache":{"direct":true},
               "file":{"driver":"file","filename":mid,"cache":{"direct":false}}}),
    ];
    // One side after the other: both lock the images they write.
    let mut d = Daemon::start();
    for a in &adds {
        d.cmd("blockdev-add", a.clone()).unwrap();
    }
    let theirs = cache_modes(&mut d);
    drop(d);
    let mut ours = Ours::new();
    for a in &adds {
        ours.cmd("blockdev-add", a.clone()).unwrap();
    }
    assert!(
        theirs.iter().any(|c| c.2) && theirs.iter().any(|c| !c.2),
        "{theirs:?}"
    );
    assert_eq!(cache_modes(&mut ours), theirs);
}
