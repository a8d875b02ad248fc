//! The `nbd` driver against real servers: qemu-nbd (UNIX and TCP),
//! qemu-storage-daemon's NBD export and nbdkit's `memory` plugin. Data
//! written through our client is checked with `qemu-img compare`, block
//! status against `qemu-img map` over the same export, blockdev-add's
//! refusals against qemu-storage-daemon's, and mirrors into and out of
//! NBD exports end identical (holes kept).

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::nbd::{Listen, Server, allocated, free_port, nbd_node, run};
use common::oracle::{Ours, Side};
use common::qmp::{Daemon, summarize};
use serde_json::{Value, json};

const MIB: u64 = 1 << 20;

/// A raw image with a recognisable pattern in some places and holes.
fn patterned(path: &Path, size: u64) {
    run(
        "qemu-img",
        &[
            "create",
            "-f",
            "raw",
            path.to_str().unwrap(),
            &size.to_string(),
        ],
    );
    run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x11 0 64k",
            "-c",
            "write -P 0x22 1M 300k",
            "-c",
            "write -P 0x33 3M 4k",
            path.to_str().unwrap(),
        ],
    );
}

fn read_node(ours: &Ours, name: &str, offset: u64, len: usize) -> Vec<u8> {
    let n = ours.ctx.lookup(name).unwrap();
    let mut b = vec![0xee; len];
    n.pread(offset, &mut b).unwrap();
    b
}

/// Reads the whole export through the node and writes a few ranges (odd
/// offsets and lengths included, a zeroed range, a discard), then checks
/// the server's image against the same edits made by qemu-io on a copy.
fn round_trip(listen: Listen, dir: &Path, img: &Path) {
    let expect = dir.join("expect.raw");
    std::fs::copy(img, &expect).unwrap();
    let server = Server::qemu_nbd(img, "raw", "disk", listen.clone());
    let mut ours = Ours::new();
    ours.cmd("blockdev-add", nbd_node("n", &listen, "disk", json!({})))
        .unwrap();
    let all = read_node(&ours, "n", 0, 4 * MIB as usize);
    assert_eq!(all, std::fs::read(img).unwrap(), "reads match the image");
    let n = ours.ctx.lookup("n").unwrap();
    assert_eq!(n.len().unwrap(), 4 * MIB);
    assert_eq!(n.filename(), listen.url("disk"));
    n.pwrite(12345, &[0x44; 70001]).unwrap();
    n.pwrite(2 * MIB, &[0x55; 3 << 19]).unwrap();
    n.pwrite_zeroes(65536 - 100, 5000, true).unwrap();
    n.pwrite_zeroes(1 << 20, 128 << 10, false).unwrap();
    n.flush().unwrap();
    ours.cmd("blockdev-del", json!({"node-name": "n"})).unwrap();
    server.stop();
    run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x44 12345 70001",
            "-c",
            "write -P 0x55 2M 1536k",
            "-c",
            "write -z 65436 5000",
            "-c",
            "write -z 1M 128k",
            expect.to_str().unwrap(),
        ],
    );
    run(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            expect.to_str().unwrap(),
            img.to_str().unwrap(),
        ],
    );
}

#[test]
fn read_write_round_trip_with_qemu_nbd_over_unix_and_tcp() {
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("u.raw");
    patterned(&img, 4 * MIB);
    round_trip(Listen::Unix(d.path().join("u.sock")), d.path(), &img);
    let img = d.path().join("t.raw");
    patterned(&img, 4 * MIB);
    round_trip(Listen::Tcp(free_port()), d.path(), &img);
}

/// `qemu-img map --output=json` of an export, as (start, length, data,
/// zero) runs with neighbours of equal status merged.
fn qemu_map(url: &str, extra: &[&str]) -> Vec<(u64, u64, bool, bool)> {
    let mut args = vec!["map", "--output=json"];
    args.extend_from_slice(extra);
    args.push(url);
    let v: Value = serde_json::from_str(&run("qemu-img", &args)).unwrap();
    merge(
        v.as_array()
            .unwrap()
            .iter()
            .map(|e| {
                (
                    e["start"].as_u64().unwrap(),
                    e["length"].as_u64().unwrap(),
                    e["data"].as_bool().unwrap(),
                    e["zero"].as_bool().unwrap(),
                )
            })
            .collect(),
    )
}

fn merge(v: Vec<(u64, u64, bool, bool)>) -> Vec<(u64, u64, bool, bool)> {
    let mut out: Vec<(u64, u64, bool, bool)> = Vec::new();
    for e in v {
        match out.last_mut() {
            Some(l) if l.2 == e.2 && l.3 == e.3 && l.0 + l.1 == e.0 => l.1 += e.1,
            _ => out.push(e),
        }
    }
    out
}

/// The same map through our node's block status.
fn our_map(ours: &Ours, name: &str) -> Vec<(u64, u64, bool, bool)> {
    let n = ours.ctx.lookup(name).unwrap();
    let size = n.len().unwrap();
    let mut v = Vec::new();
    let mut at = 0;
    while at < size {
        let st = n.block_status(at, size - at).unwrap();
        v.push((at, st.len, st.data, st.zero));
        at += st.len;
    }
    merge(v)
}

#[test]
fn block_status_matches_qemu_img_map() {
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("m.qcow2");
    run(
        "qemu-img",
        &["create", "-f", "qcow2", img.to_str().unwrap(), "8M"],
    );
    run(
        "qemu-io",
        &[
            "-c",
            "write -P 1 0 64k",
            "-c",
            "write -z 1M 1M",
            "-c",
            "write -P 2 3M 512k",
            "-c",
            "write -P 3 7M 1M",
            img.to_str().unwrap(),
        ],
    );
    let listen = Listen::Unix(d.path().join("m.sock"));
    let _server = Server::qemu_nbd(&img, "qcow2", "disk", listen.clone());
    let mut ours = Ours::new();
    ours.cmd("blockdev-add", nbd_node("n", &listen, "disk", json!({})))
        .unwrap();
    let want = qemu_map(&listen.url("disk"), &[]);
    assert_eq!(our_map(&ours, "n"), want);
    // Holes and data both show up (the map is not one run).
    assert!(
        want.iter().any(|e| e.2) && want.iter().any(|e| !e.2),
        "{want:?}"
    );
}

#[test]
fn dirty_bitmap_context_reports_as_qemu() {
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("b.qcow2");
    let p = img.to_str().unwrap();
    run("qemu-img", &["create", "-f", "qcow2", p, "4M"]);
    run("qemu-io", &["-c", "write 0 64k", p]);
    run("qemu-img", &["bitmap", "--add", p, "bm0"]);
    run("qemu-io", &["-c", "write 1M 64k", "-c", "write 2M 4k", p]);
    let listen = Listen::Tcp(free_port());
    let _server = qemu_nbd_bitmap(&img, &listen);
    let mut ours = Ours::new();
    let extra = json!({"read-only": true, "x-dirty-bitmap": "qemu:dirty-bitmap:bm0"});
    ours.cmd("blockdev-add", nbd_node("n", &listen, "disk", extra))
        .unwrap();
    let url = listen.url("disk");
    let image_opts = format!(
        "driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={},export=disk,\
         x-dirty-bitmap=qemu:dirty-bitmap:bm0",
        match listen {
            Listen::Tcp(p) => p,
            Listen::Unix(_) => unreachable!(),
        }
    );
    let want = qemu_map(&image_opts, &["--image-opts"]);
    assert_eq!(our_map(&ours, "n"), want);
    // Dirty ranges are the ones reported without data (QEMU's inversion).
    assert_eq!(
        want.iter()
            .filter(|e| !e.2)
            .map(|e| (e.0, e.1))
            .collect::<Vec<_>>(),
        vec![(MIB, 64 << 10), (2 * MIB, 64 << 10)],
        "{url}"
    );
    // A bitmap the server does not have: QEMU's text.
    let e = ours
        .cmd(
            "blockdev-add",
            nbd_node(
                "m",
                &listen,
                "disk",
                json!({"read-only": true, "x-dirty-bitmap": "qemu:dirty-bitmap:nope"}),
            ),
        )
        .unwrap_err();
    assert_eq!(e, "GenericError: Could not open image: Invalid argument");
}

/// qemu-nbd exporting a bitmap (read-only, as `-B` needs).
fn qemu_nbd_bitmap(img: &Path, listen: &Listen) -> KillOnDrop {
    let Listen::Tcp(port) = listen else {
        unreachable!()
    };
    let mut child = KillOnDrop(
        std::process::Command::new("qemu-nbd")
            .args([
                "-t",
                "-r",
                "-e",
                "4",
                "-x",
                "disk",
                "-f",
                "qcow2",
                "-B",
                "bm0",
                "-b",
                "127.0.0.1",
                "-p",
                &port.to_string(),
                img.to_str().unwrap(),
            ])
            .spawn()
            .unwrap(),
    );
    let _ = &mut child;
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", *port)).is_err() {
        assert!(Instant::now() < deadline, "qemu-nbd did not listen");
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

/// Kills the child when the test ends (also on panic).
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn nbdkit_memory_round_trip_and_status() {
    let d = tempfile::tempdir().unwrap();
    let listen = Listen::Unix(d.path().join("k.sock"));
    let _server = Server::nbdkit(&["memory", "size=16M"], listen.clone());
    let mut ours = Ours::new();
    ours.cmd("blockdev-add", nbd_node("k", &listen, "", json!({})))
        .unwrap();
    let n = ours.ctx.lookup("k").unwrap();
    assert_eq!(n.len().unwrap(), 16 * MIB);
    let data: Vec<u8> = (0..3 * MIB as usize + 777)
        .map(|i| (i * 7 % 251) as u8)
        .collect();
    n.pwrite(5 * MIB + 3, &data).unwrap();
    let mut back = vec![0; data.len()];
    n.pread(5 * MIB + 3, &mut back).unwrap();
    assert!(back == data, "read back what was written");
    // Unwritten memory is a hole that reads as zeroes, written is data.
    let st = n.block_status(0, 16 * MIB).unwrap();
    assert!(!st.data && st.zero && st.len <= 5 * MIB, "{st:?}");
    let st = n.block_status(6 * MIB, MIB).unwrap();
    assert!(st.data && !st.zero, "{st:?}");
    // Discard and zeroes turn it back into a hole.
    n.pwrite_zeroes(6 * MIB, MIB, true).unwrap();
    let st = n.block_status(6 * MIB, MIB).unwrap();
    assert!(st.zero, "{st:?}");
    let mut z = vec![1; 4096];
    n.pread(6 * MIB + 4096, &mut z).unwrap();
    assert!(z.iter().all(|b| *b == 0));
    // Many threads at once on one connection.
    std::thread::scope(|s| {
        for t in 0..8u8 {
            let n = n.clone();
            s.spawn(move || {
                for i in 0..32u64 {
                    let off = (u64::from(t) * 32 + i) * 65536;
                    n.pwrite(off, &[t + 1; 65536]).unwrap();
                    let mut b = vec![0; 65536];
                    n.pread(off, &mut b).unwrap();
                    assert!(b.iter().all(|x| *x == t + 1));
                }
            });
        }
    });
    ours.cmd("blockdev-del", json!({"node-name": "k"})).unwrap();
}

#[test]
fn qemu_storage_daemon_export_serves_our_client() {
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("q.raw");
    patterned(&img, 4 * MIB);
    let sock = d.path().join("q.sock");
    let mut qsd = Daemon::start();
    qsd.qmp.ok(
        "blockdev-add",
        json!({"driver":"raw","node-name":"disk","file":{"driver":"file","filename":img}}),
    );
    qsd.qmp.ok(
        "nbd-server-start",
        json!({"addr":{"type":"unix","data":{"path":sock}}}),
    );
    qsd.qmp.ok(
        "block-export-add",
        json!({"type":"nbd","id":"e0","node-name":"disk","name":"disk","writable":true}),
    );
    let listen = Listen::Unix(sock);
    let mut ours = Ours::new();
    ours.cmd("blockdev-add", nbd_node("n", &listen, "disk", json!({})))
        .unwrap();
    assert_eq!(
        read_node(&ours, "n", 0, 4 * MIB as usize),
        std::fs::read(&img).unwrap()
    );
    let n = ours.ctx.lookup("n").unwrap();
    n.pwrite(MIB + 1, b"hello").unwrap();
    n.flush().unwrap();
    assert_eq!(read_node(&ours, "n", MIB + 1, 5), b"hello");
    ours.cmd("blockdev-del", json!({"node-name": "n"})).unwrap();
    drop(qsd);
    let mut f = vec![0; 5];
    use std::os::unix::fs::FileExt;
    std::fs::File::open(&img)
        .unwrap()
        .read_exact_at(&mut f, MIB + 1)
        .unwrap();
    assert_eq!(f, b"hello");
}

/// The texts of refused blockdev-adds, on qemu-storage-daemon and ours.
#[test]
fn blockdev_add_errors_match_qemu() {
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("e.raw");
    patterned(&img, 4 * MIB);
    let listen = Listen::Unix(d.path().join("e.sock"));
    let _server = Server::qemu_nbd(&img, "raw", "disk", listen.clone());
    let ro = d.path().join("ro.sock");
    let _ro_server = {
        let mut c = std::process::Command::new("qemu-nbd");
        c.args(["-t", "-e", "4", "-r", "-x", "disk", "-f", "raw", "-k"])
            .arg(&ro)
            .arg(&img);
        let child = KillOnDrop(c.spawn().unwrap());
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::os::unix::net::UnixStream::connect(&ro).is_err() {
            assert!(Instant::now() < deadline);
            std::thread::sleep(Duration::from_millis(20));
        }
        child
    };
    let missing = d.path().join("missing.sock");
    let unix = listen.server();
    let cases = vec![
        json!({"driver":"nbd","node-name":"n","server":{"type":"unix","path":missing}}),
        json!({"driver":"nbd","node-name":"n","server":{"type":"inet","host":"127.0.0.1","port":"1"}}),
        json!({"driver":"nbd","node-name":"n","server":{"type":"inet","host":"127.0.0.1","port":"x"}}),
        json!({"driver":"nbd","node-name":"n"}),
        json!({"driver":"nbd","node-name":"n","server":"x"}),
        json!({"driver":"nbd","node-name":"n","server":{"path":"/x"}}),
        json!({"driver":"nbd","node-name":"n","server":{"type":"unix"}}),
        json!({"driver":"nbd","node-name":"n","server":{"type":"inet","host":"h"}}),
        json!({"driver":"nbd","node-name":"n","server":{"type":"inet","host":"h","port":5}}),
        json!({"driver":"nbd","node-name":"n","server":{"type":"unix","path":"/x","bogus":1}}),
        json!({"driver":"nbd","node-name":"n","server":unix,"export":5}),
        json!({"driver":"nbd","node-name":"n","server":unix,"export":"nope"}),
        json!({"driver":"nbd","node-name":"n","server":unix}),
        json!({"driver":"nbd","node-name":"n","server":unix,"export":"disk","tls-creds":"t0"}),
        json!({"driver":"nbd","node-name":"n","server":{"type":"unix","path":missing},"tls-creds":"t0"}),
        json!({"driver":"nbd","node-name":"n","server":unix,"export":"disk","reconnect-delay":-1}),
        json!({"driver":"nbd","node-name":"n","server":unix,"export":"disk","reconnect-delay":"5"}),
        json!({"driver":"nbd","node-name":"n","server":unix,"export":"disk","open-timeout":"a"}),
        json!({"driver":"nbd","node-name":"n","server":unix,"export":"disk","x-dirty-bitmap":5}),
        json!({"driver":"nbd","node-name":"n","server":unix,"export":"disk","x-dirty-bitmap":"qemu:dirty-bitmap:b"}),
        json!({"driver":"nbd","node-name":"n","server":{"type":"unix","path":ro},"export":"disk"}),
        json!({"driver":"nbd","server":unix,"export":"disk"}),
    ];
    let mut qemu = Daemon::start();
    let mut ours = Ours::new();
    let mut diffs = Vec::new();
    for c in &cases {
        let q = qemu.cmd("blockdev-add", c.clone());
        let o = ours.cmd("blockdev-add", c.clone());
        if q != o {
            diffs.push(format!("{c}\n  qemu: {q:?}\n  ours: {o:?}"));
        }
        if q.is_ok() {
            let _ = qemu.cmd("blockdev-del", json!({"node-name":"n"}));
            let _ = ours.cmd("blockdev-del", json!({"node-name":"n"}));
        }
    }
    // Both accept a read-only node of a read-only export and show the
    // same file name.
    let ok = json!({"driver":"nbd","node-name":"n","read-only":true,
        "server":{"type":"unix","path":ro},"export":"disk"});
    qemu.cmd("blockdev-add", ok.clone()).unwrap();
    ours.cmd("blockdev-add", ok).unwrap();
    let file = |s: &mut dyn Side| {
        let q = s.cmd("query-named-block-nodes", json!({})).unwrap();
        (
            q[0]["file"].clone(),
            q[0]["drv"].clone(),
            q[0]["image"]["virtual-size"].clone(),
        )
    };
    assert_eq!(file(&mut qemu), file(&mut ours));
    assert!(diffs.is_empty(), "{}", diffs.join("\n"));
}

/// blockdev-del closes the connection: a qemu-nbd that serves a single
/// client (no `-t`) exits once our node is gone.
#[test]
fn blockdev_del_closes_the_connection() {
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("c.raw");
    patterned(&img, 4 * MIB);
    let sock = d.path().join("c.sock");
    let mut child = KillOnDrop(
        std::process::Command::new("qemu-nbd")
            .args(["-x", "disk", "-f", "raw", "-k"])
            .arg(&sock)
            .arg(&img)
            .spawn()
            .unwrap(),
    );
    // Wait for the socket file (a probe connection would be its client).
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sock.exists() {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut ours = Ours::new();
    ours.cmd(
        "blockdev-add",
        nbd_node("n", &Listen::Unix(sock), "disk", json!({"open-timeout": 5})),
    )
    .unwrap();
    assert_eq!(read_node(&ours, "n", 0, 16), vec![0x11; 16]);
    assert!(child.0.try_wait().unwrap().is_none(), "still serving us");
    ours.cmd("blockdev-del", json!({"node-name": "n"})).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(st) = child.0.try_wait().unwrap() {
            assert!(st.success(), "{st}");
            break;
        }
        assert!(Instant::now() < deadline, "qemu-nbd still has a client");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs a mirror to its end on `side` (complete at READY): the events.
pub fn mirror_to_end(side: &mut dyn Side, args: Value) -> Vec<String> {
    side.cmd("blockdev-mirror", args).unwrap();
    let mut seen = Vec::new();
    loop {
        let ev = side
            .event_within(Duration::from_secs(60))
            .unwrap_or_else(|| panic!("no event; saw {seen:?}"));
        let s = summarize(&ev);
        if s == "READY" {
            side.cmd("block-job-complete", json!({"device": "job0"}))
                .unwrap();
        }
        let end = s == "JSC:null";
        seen.push(s);
        if end {
            return seen;
        }
    }
}

#[test]
fn mirror_from_local_qcow2_into_qemu_nbd_export() {
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("s.qcow2");
    let ps = src.to_str().unwrap();
    run("qemu-img", &["create", "-f", "qcow2", ps, "32M"]);
    run(
        "qemu-io",
        &[
            "-c",
            "write -P 7 0 5M",
            "-c",
            "write -P 9 17M 3M",
            "-c",
            "write -P 1 31M 1M",
            ps,
        ],
    );
    let tgt = d.path().join("t.raw");
    run(
        "qemu-img",
        &["create", "-f", "raw", tgt.to_str().unwrap(), "32M"],
    );
    let listen = Listen::Unix(d.path().join("t.sock"));
    let server = Server::qemu_nbd(&tgt, "raw", "disk", listen.clone());
    let mut ours = Ours::new();
    ours.cmd(
        "blockdev-add",
        json!({"driver":"qcow2","node-name":"src","file":{"driver":"file","filename":src}}),
    )
    .unwrap();
    ours.cmd("blockdev-add", nbd_node("tgt", &listen, "disk", json!({})))
        .unwrap();
    let evs = mirror_to_end(
        &mut ours,
        json!({"job-id":"job0","device":"src","target":"tgt","sync":"full"}),
    );
    assert!(evs.contains(&"COMPLETED".to_string()), "{evs:?}");
    ours.cmd("blockdev-del", json!({"node-name": "tgt"}))
        .unwrap();
    server.stop();
    run(
        "qemu-img",
        &["compare", "-U", "-F", "raw", ps, tgt.to_str().unwrap()],
    );
}

#[test]
fn mirror_from_nbd_source_keeps_holes() {
    let d = tempfile::tempdir().unwrap();
    // 64 MiB, every other MiB data: 50 % holes.
    let src = d.path().join("s.raw");
    let ps = src.to_str().unwrap();
    run("qemu-img", &["create", "-f", "raw", ps, "64M"]);
    let cmds: Vec<String> = (0..32)
        .map(|i| format!("write -P {} {}M 1M", i + 1, 2 * i))
        .collect();
    let mut args = vec!["-f", "raw"];
    for c in &cmds {
        args.extend(["-c", c.as_str()]);
    }
    args.push(ps);
    run("qemu-io", &args);
    let listen = Listen::Tcp(free_port());
    let _server = Server::qemu_nbd(&src, "raw", "disk", listen.clone());
    let tgt = d.path().join("t.raw");
    std::fs::File::create(&tgt)
        .unwrap()
        .set_len(64 * MIB)
        .unwrap();
    let mut ours = Ours::new();
    ours.cmd(
        "blockdev-add",
        nbd_node("src", &listen, "disk", json!({"read-only": true})),
    )
    .unwrap();
    ours.cmd(
        "blockdev-add",
        json!({"driver":"raw","node-name":"tgt","discard":"unmap",
            "file":{"driver":"file","filename":tgt}}),
    )
    .unwrap();
    let evs = mirror_to_end(
        &mut ours,
        json!({"job-id":"job0","device":"src","target":"tgt","sync":"full"}),
    );
    assert!(evs.contains(&"COMPLETED".to_string()), "{evs:?}");
    ours.cmd("blockdev-del", json!({"node-name": "tgt"}))
        .unwrap();
    run(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            ps,
            tgt.to_str().unwrap(),
        ],
    );
    // Only the data moved: about 32 MiB allocated, not 64.
    let a = allocated(&tgt);
    assert!(
        (32 * MIB..=34 * MIB).contains(&a),
        "target allocation {a} bytes"
    );
}
