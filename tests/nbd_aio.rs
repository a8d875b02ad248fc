//! The export's asynchronous data path (`export::nbd_aio`): plain reads
//! and writes of raw-over-file nodes with `aio=io_uring|native` go on the
//! connection's ring, many at once. What real clients (nbdcopy with many
//! requests in flight, qemu-io, qemu-img) read and write through it
//! matches the same operations on the file itself, with and without
//! `O_DIRECT` (where unaligned requests take the workers' read-modify-
//! write path); a request that fails on the ring (ENOSPC on a full tmpfs)
//! is made again by a worker and gets the error reply of the synchronous
//! path; `aio=threads` and qcow2 keep the workers.

mod common;

use std::path::Path;
use std::sync::Mutex;

use serde_json::json;

use common::cmd::{nbd_url as url, ok, run, s};
use common::oracle::{Ours, Side, del_export_when_idle, ours_nbd_server as server};
use common::tmpfs::Tmpfs;

/// One at a time: the ring's counter is process-wide.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn completed() -> u64 {
    blockjob::export::completed_requests()
}

/// A file of `mib` MiB of bytes that differ per 512-byte sector.
fn patterned(p: &Path, mib: usize, seed: u8) {
    let data: Vec<u8> = (0..mib << 20)
        .map(|i| {
            ((i / 512) as u8)
                .wrapping_mul(31)
                .wrapping_add(seed ^ (i as u8))
        })
        .collect();
    std::fs::write(p, data).unwrap();
}

fn export(o: &mut Ours, img: &Path, aio: &str, direct: bool) {
    export_node(
        o,
        json!({"driver": "raw", "node-name": "n",
               "file": {"driver": "file", "filename": img, "aio": aio,
                        "cache": {"direct": direct}}}),
    );
}

/// Add the node `node` describes and export it writable as export `e`.
fn export_node(o: &mut Ours, node: serde_json::Value) {
    let name = node["node-name"].clone();
    o.cmd("blockdev-add", node).unwrap();
    o.cmd(
        "block-export-add",
        json!({"type": "nbd", "id": "e", "node-name": name, "writable": true}),
    )
    .unwrap();
}

/// qemu-io writes a pattern through `url` and reads it back.
fn write_and_read_back(url: &str) {
    ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 9 0 64k",
            "-c",
            "read -P 9 0 64k",
            url,
        ],
    );
}

/// qemu-io commands mixing request sizes, aligned and unaligned.
const SCRIPT: &[&str] = &[
    "write -P 0x11 0 64k",
    "write -P 0x22 1M 4k",
    "write -P 0x33 3M 1M",
    "write -P 0x44 5000 3000",
    "write -P 0x55 7M 512",
    "write -z 6M 128k",
    "read -P 0x33 3M 1M",
    "read -P 0x22 1M 4k",
    "read -P 0x44 5000 3000",
];

fn qemu_io(target: &str, fmt: &str) -> String {
    let mut args = vec!["-f", fmt];
    for c in SCRIPT {
        args.extend(["-c", c]);
    }
    args.push(target);
    ok("qemu-io", &args)
}

#[test]
fn ring_requests_match_the_file_with_and_without_o_direct() {
    let _g = serial();
    common::nbd::require_nbdkit();
    common::require_tool("nbdcopy");
    common::require_tool("qemu-io");
    for (aio, direct) in [("io_uring", false), ("native", true), ("io_uring", true)] {
        let what = format!("aio={aio} cache.direct={direct}");
        // /var/tmp: a disk filesystem (O_DIRECT needs one; tmpfs refuses).
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let img = dir.path().join("img.raw");
        let model = dir.path().join("model.raw");
        let src = dir.path().join("src.raw");
        patterned(&img, 8, 1);
        patterned(&src, 8, 2);
        let (mut o, sock) = server(dir.path());
        export(&mut o, &img, aio, direct);
        let u = url(&sock, "n");
        let before = completed();
        // Many writes in flight at once (nbdcopy: 4 connections, 64
        // requests each), then read back the same way.
        ok("nbdcopy", &["--request-size=65536", "--flush", s(&src), &u]);
        ok(
            "qemu-img",
            &["compare", "-f", "raw", "-F", "raw", s(&src), &u],
        );
        let copied = completed() - before;
        // 128 writes of 64 KiB, and qemu-img's reads (2 MiB each).
        assert!(
            copied >= 128 + 4,
            "{what}: nbdcopy's writes and qemu-img's reads on the ring, {copied} completed there"
        );
        // Mixed sizes: the same script on the file and through the
        // export ends in the same bytes, and reads as it should.
        std::fs::copy(&src, &model).unwrap();
        qemu_io(s(&model), "raw");
        let before = completed();
        let through = qemu_io(&u, "raw");
        assert!(
            !through.contains("Pattern verification failed"),
            "{through}"
        );
        assert!(
            completed() > before,
            "{what}: the script's aligned requests went on the ring"
        );
        ok(
            "qemu-img",
            &["compare", "-f", "raw", "-F", "raw", s(&model), &u],
        );
        del_export_when_idle(&mut o, "e");
        o.cmd("blockdev-del", json!({"node-name": "n"})).unwrap();
        ok(
            "qemu-img",
            &["compare", "-f", "raw", "-F", "raw", s(&model), s(&img)],
        );
    }
}

/// Requests on the ring and requests for the workers (zero writes,
/// flushes) in flight together, more than the connection lets in at once:
/// the reader answers ring completions while it waits for room, so
/// everything completes and reads back.
#[test]
fn ring_and_worker_requests_share_the_connection() {
    let _g = serial();
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let img = dir.path().join("m.raw");
    patterned(&img, 8, 4);
    let (mut o, sock) = server(dir.path());
    export(&mut o, &img, "io_uring", true);
    let mut args: Vec<String> = vec!["-f".into(), "raw".into()];
    for i in 0..48u64 {
        let c = match i % 3 {
            0 => format!("aio_write -P {} {}k 4k", i + 1, i * 64),
            1 => format!("aio_write -z {}k 8k", i * 64),
            _ => format!("aio_read {}k 64k", i * 64 + 4096),
        };
        args.extend(["-c".into(), c]);
    }
    args.extend(["-c".into(), "aio_flush".into()]);
    for i in (0..48u64).step_by(3) {
        args.extend(["-c".into(), format!("read -P {} {}k 4k", i + 1, i * 64)]);
        args.extend(["-c".into(), format!("read -P 0 {}k 8k", (i + 1) * 64)]);
    }
    args.push(url(&sock, "n"));
    let before = completed();
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = ok("qemu-io", &argv);
    assert!(!out.contains("failed"), "{out}");
    assert!(
        completed() >= before + 16 + 16,
        "writes and reads on the ring"
    );
    del_export_when_idle(&mut o, "e");
}

/// `aio=threads` keeps its pool and qcow2 must see every request: none
/// of their requests go on a ring.
#[test]
fn threads_and_qcow2_stay_with_the_workers() {
    let _g = serial();
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let raw = dir.path().join("t.raw");
    patterned(&raw, 4, 3);
    let q = dir.path().join("q.qcow2");
    ok("qemu-img", &["create", "-f", "qcow2", s(&q), "4M"]);
    let (mut o, sock) = server(dir.path());
    export(&mut o, &raw, "threads", false);
    let before = completed();
    write_and_read_back(&url(&sock, "n"));
    del_export_when_idle(&mut o, "e");
    o.cmd("blockdev-del", json!({"node-name": "n"})).unwrap();
    export_node(
        &mut o,
        json!({"driver": "qcow2", "node-name": "q",
               "file": {"driver": "file", "filename": q, "aio": "io_uring"}}),
    );
    write_and_read_back(&url(&sock, "q"));
    assert_eq!(completed(), before, "nothing of threads or qcow2 on a ring");
    del_export_when_idle(&mut o, "e");
}

/// A write that fails on the ring (the filesystem is full) is made again
/// by a worker: the client gets the synchronous path's ENOSPC, nothing is
/// counted as completed on the ring, and once there is room again the
/// same write goes through the ring and reads back.
#[test]
fn a_failed_ring_write_gets_the_policy_path_error() {
    let _g = serial();
    let fs = Tmpfs::new(8);
    let img = fs.dir.join("sparse.raw");
    let f = std::fs::File::create(&img).unwrap();
    f.set_len(32 << 20).unwrap();
    drop(f);
    let filler = fs.dir.join("filler");
    // Leaves well under the 4 MiB the client writes.
    std::fs::write(&filler, vec![1u8; 7 << 20]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (mut o, sock) = server(dir.path());
    export(&mut o, &img, "io_uring", false);
    let u = url(&sock, "n");
    let before = completed();
    let (good, text) = run("qemu-io", &["-f", "raw", "-c", "write -P 0x5a 0 4M", &u]);
    assert!(
        !good || text.contains("No space left on device"),
        "the write must fail with ENOSPC: {text}"
    );
    assert!(text.contains("No space left on device"), "{text}");
    assert_eq!(
        completed(),
        before,
        "a failed request is not answered by the ring"
    );
    std::fs::remove_file(&filler).unwrap();
    ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x5a 0 4M",
            "-c",
            "read -P 0x5a 0 4M",
            &u,
        ],
    );
    assert!(completed() > before, "with room the write goes on the ring");
    del_export_when_idle(&mut o, "e");
    o.cmd("blockdev-del", json!({"node-name": "n"})).unwrap();
}

/// Drains while a client keeps the ring busy: starting and cancelling a
/// mirror of the exported node drains it each time, while nbdcopy reads
/// the export (64 requests in flight, each read first asking the block
/// status, as a structured read does). The reading thread must never
/// wait at the drained device's gate with requests on its ring (the
/// drain waits for them, and only that thread answers them).
#[test]
fn drains_do_not_wait_on_a_busy_ring() {
    let _g = serial();
    common::nbd::require_nbdkit();
    common::require_tool("nbdcopy");
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let img = dir.path().join("d.raw");
    let dst = dir.path().join("t.raw");
    patterned(&img, 16, 5);
    std::fs::write(&dst, vec![0u8; 16 << 20]).unwrap();
    let (mut o, sock) = server(dir.path());
    export(&mut o, &img, "io_uring", false);
    o.cmd(
        "blockdev-add",
        json!({"driver": "raw", "node-name": "t",
               "file": {"driver": "file", "filename": dst}}),
    )
    .unwrap();
    let u = url(&sock, "n");
    let stop = std::sync::atomic::AtomicBool::new(false);
    let before = completed();
    let done = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|sc| {
        // A deadlock would hang the test: fail it instead.
        sc.spawn(|| {
            let t = std::time::Instant::now();
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                if t.elapsed() > std::time::Duration::from_secs(120) {
                    eprintln!("drains_do_not_wait_on_a_busy_ring: stuck for 120 s (a drain waits for the ring)");
                    std::process::exit(101);
                }
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
        });
        let reader = sc.spawn(|| {
            let mut rounds = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                ok("nbdcopy", &["--request-size=65536", &u, "null:"]);
                rounds += 1;
            }
            rounds
        });
        for i in 0..20 {
            let id = format!("m{i}");
            o.cmd(
                "blockdev-mirror",
                json!({"job-id": id, "device": "n", "target": "t", "sync": "full",
                       "speed": 1 << 20}),
            )
            .unwrap();
            o.cmd("block-job-cancel", json!({"device": id, "force": true}))
                .unwrap();
            loop {
                let ev = o.event().expect("the job's end");
                if ev["event"] == "BLOCK_JOB_CANCELLED" {
                    break;
                }
            }
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let rounds = reader.join().unwrap();
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        assert!(rounds > 0);
    });
    assert!(completed() > before, "the reads went on the ring");
    del_export_when_idle(&mut o, "e");
}
