//! What our `nbd` client puts on the wire when a request carries FUA or
//! NO_FALLBACK (NBD's `FUA` and `FAST_ZERO` flags), read from nbdkit's
//! `log` filter: sent when the server takes them, emulated (a flush after
//! the request) or refused (`ENOTSUP`, nothing sent) when it does not; and
//! passed through our export onto an `nbd` node exactly as
//! qemu-storage-daemon passes them (a proxy between `qemu-io` and nbdkit,
//! both daemons, the two logs compared).

mod common;

use std::path::Path;

use blockjob::block::WriteFlags;
use common::nbd::{Listen, Server, nbd_node, run};
use common::oracle::{Ours, Side, del_export_when_idle};
use common::qmp::Daemon;
use serde_json::json;

const FAST: WriteFlags = WriteFlags {
    fua: false,
    no_fallback: true,
};

/// The write-side requests of nbdkit's log (`Write`, `Zero`, `Trim`,
/// `Flush`), with their parameters but not their ids, in order.
fn wire_log(path: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(path).unwrap();
    text.lines()
        .filter_map(|l| {
            let rest = l.split_once(" connection=")?.1;
            let (_, req) = rest.split_once(' ')?;
            let req = req.strip_suffix(" ...")?;
            let op = req.split(' ').next()?;
            if !matches!(op, "Write" | "Zero" | "Trim" | "Flush") {
                return None;
            }
            Some(
                req.split(' ')
                    .filter(|w| !w.starts_with("id="))
                    .collect::<Vec<_>>()
                    .join(" "),
            )
        })
        .collect()
}

/// nbdkit's memory plugin behind the log filter and `filters` (which
/// change what the server offers), and our node `n` on it.
fn logged_server(dir: &Path, filters: &[&str]) -> (Server, Ours, std::path::PathBuf) {
    let log = dir.join("wire.log");
    let sock = dir.join("nbdkit.sock");
    let mut args = vec!["--filter=log".to_string()];
    args.extend(
        filters
            .iter()
            .map(|f| format!("--filter={}", f.split(' ').next().unwrap())),
    );
    args.push("memory".into());
    args.push("size=4M".into());
    args.push(format!("logfile={}", log.display()));
    for f in filters {
        args.extend(f.split(' ').skip(1).map(String::from));
    }
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let listen = Listen::Unix(sock);
    let server = Server::nbdkit(&a, listen.clone());
    let mut ours = Ours::new();
    // discard=unmap: a zero write that may deallocate keeps its flag (a
    // node with QEMU's default, discard=ignore, drops it).
    ours.cmd(
        "blockdev-add",
        nbd_node("n", &listen, "", json!({"discard": "unmap"})),
    )
    .unwrap();
    (server, ours, log)
}

#[test]
fn fua_and_fast_zero_go_on_the_wire_when_the_server_takes_them() {
    let dir = tempfile::tempdir().unwrap();
    let (server, mut ours, log) = logged_server(dir.path(), &[]);
    let n = ours.ctx.lookup("n").unwrap();
    n.pwrite(0, &[1; 4096]).unwrap();
    n.pwrite_with(4096, &[2; 4096], WriteFlags::FUA).unwrap();
    n.pwrite_zeroes_with(65536, 65536, true, FAST).unwrap();
    n.pwrite_zeroes_with(131072, 65536, false, WriteFlags::FUA)
        .unwrap();
    n.pwrite_zeroes(196608, 4096, true).unwrap();
    ours.cmd("blockdev-del", json!({"node-name": "n"})).unwrap();
    server.stop();
    assert_eq!(
        wire_log(&log),
        [
            "Write offset=0x0 count=0x1000 fua=0",
            "Write offset=0x1000 count=0x1000 fua=1",
            "Zero offset=0x10000 count=0x10000 trim=1 fua=0 fast=1",
            "Zero offset=0x20000 count=0x10000 trim=0 fua=1 fast=0",
            "Zero offset=0x30000 count=0x1000 trim=1 fua=0 fast=0",
        ]
    );
}

#[test]
fn without_server_support_fua_is_a_flush_after_and_fast_zero_is_refused_unsent() {
    let dir = tempfile::tempdir().unwrap();
    let (server, mut ours, log) = logged_server(
        dir.path(),
        // The fua filter's default mode hides FUA from the client.
        &["fua", "nozero zeromode=plugin fastzeromode=none"],
    );
    let n = ours.ctx.lookup("n").unwrap();
    n.pwrite_with(0, &[3; 4096], WriteFlags::FUA).unwrap();
    let e = n.pwrite_zeroes_with(65536, 65536, true, FAST).unwrap_err();
    assert_eq!(e.errno(), Some(libc::ENOTSUP), "{e}");
    // A refused fast zero changed nothing: the data is still there.
    n.pwrite(65536, &[4; 4096]).unwrap();
    n.pwrite_zeroes_with(65536 + 4096, 4096, true, FAST)
        .unwrap_err();
    let mut b = [0; 4096];
    n.pread(65536, &mut b).unwrap();
    assert_eq!(b, [4; 4096]);
    ours.cmd("blockdev-del", json!({"node-name": "n"})).unwrap();
    server.stop();
    assert_eq!(
        wire_log(&log),
        [
            "Write offset=0x0 count=0x1000 fua=0",
            "Flush",
            "Write offset=0x10000 count=0x1000 fua=0",
        ]
    );
}

#[test]
fn a_server_that_fails_a_fast_zero_gets_enotsup_to_the_caller() {
    let dir = tempfile::tempdir().unwrap();
    // Advertises FAST_ZERO but fails every fast zero (ENOTSUP).
    let (server, mut ours, log) =
        logged_server(dir.path(), &["nozero zeromode=plugin fastzeromode=slow"]);
    let n = ours.ctx.lookup("n").unwrap();
    let e = n.pwrite_zeroes_with(0, 65536, true, FAST).unwrap_err();
    assert_eq!(e.errno(), Some(libc::ENOTSUP), "{e}");
    n.pwrite_zeroes(0, 65536, true).unwrap();
    ours.cmd("blockdev-del", json!({"node-name": "n"})).unwrap();
    server.stop();
    assert_eq!(
        wire_log(&log),
        [
            "Zero offset=0x0 count=0x10000 trim=1 fua=0 fast=1",
            "Zero offset=0x0 count=0x10000 trim=1 fua=0 fast=0",
        ]
    );
}

/// A daemon between `qemu-io` and nbdkit: `raw` over an `nbd` node,
/// exported writable (and `writethrough`); qemu-io writes through the
/// export with and without FUA and NO_FALLBACK. What reached nbdkit.
fn proxy(side: &mut dyn Side, dir: &Path, tag: &str, writethrough: bool) -> Vec<String> {
    let log = dir.join(format!("{tag}.log"));
    let up = Listen::Unix(dir.join(format!("{tag}-up.sock")));
    let export_sock = dir.join(format!("{tag}-export.sock"));
    let logfile = format!("logfile={}", log.display());
    let server = Server::nbdkit(&["--filter=log", "memory", "size=4M", &logfile], up.clone());
    side.cmd("blockdev-add", nbd_node("up", &up, "", json!({})))
        .unwrap();
    side.cmd(
        "blockdev-add",
        json!({"driver": "raw", "node-name": "r", "file": "up"}),
    )
    .unwrap();
    side.cmd(
        "nbd-server-start",
        json!({"addr": {"type": "unix", "data": {"path": export_sock}}}),
    )
    .unwrap();
    side.cmd(
        "block-export-add",
        json!({"type": "nbd", "id": "e", "node-name": "r", "writable": true,
            "writethrough": writethrough}),
    )
    .unwrap();
    let url = format!("nbd+unix:///r?socket={}", export_sock.display());
    run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-t",
            "writeback",
            "-c",
            "write -P 1 0 4k",
            "-c",
            "write -f -P 2 4k 4k",
            "-c",
            "write -z -n 64k 64k",
            "-c",
            "write -z -u 128k 64k",
            "-c",
            "write -z -f 192k 64k",
            "-c",
            "flush",
            &url,
        ],
    );
    del_export_when_idle(side, "e");
    // The export goes away once its last client is gone.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while side.cmd("query-block-exports", json!({})).unwrap() != json!([]) {
        assert!(std::time::Instant::now() < deadline, "export not deleted");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    side.cmd("nbd-server-stop", json!({})).unwrap();
    side.cmd("blockdev-del", json!({"node-name": "r"})).unwrap();
    side.cmd("blockdev-del", json!({"node-name": "up"}))
        .unwrap();
    server.stop();
    // QEMU's nbd driver sends a FLUSH at every flush of the node, also
    // with nothing written since the last (blockdev-del of `r` and of `up`
    // each flush once more); ours skips those. Equal up to that.
    let mut wire = wire_log(&log);
    wire.dedup_by(|a, b| a == "Flush" && b == "Flush");
    wire
}

#[test]
fn an_export_on_an_nbd_node_passes_fua_and_fast_zero_on_as_qemu_does() {
    let dir = tempfile::tempdir().unwrap();
    for writethrough in [false, true] {
        let mut q = Daemon::start();
        let qemu = proxy(
            &mut q,
            dir.path(),
            &format!("qsd{writethrough}"),
            writethrough,
        );
        let mut o = Ours::new();
        let ours = proxy(
            &mut o,
            dir.path(),
            &format!("ours{writethrough}"),
            writethrough,
        );
        assert_eq!(ours, qemu, "writethrough={writethrough}");
        // What the comparison rests on, so that two empty logs cannot pass.
        assert!(qemu.iter().any(|l| l.contains("fast=1")), "{qemu:?}");
        assert!(
            qemu.iter()
                .any(|l| l.starts_with("Write") && l.contains("fua=1"))
        );
        assert_eq!(
            qemu.iter()
                .filter(|l| l.starts_with("Write") && l.ends_with("fua=0"))
                .count(),
            if writethrough { 0 } else { 1 },
            "{qemu:?}"
        );
    }
}
