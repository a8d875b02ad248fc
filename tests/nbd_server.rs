//! The NBD server against real NBD clients: qemu-img, qemu-io, nbdinfo,
//! nbdcopy read and write our exports, and what they see is compared with
//! the image itself and with qemu-storage-daemon's export of the same
//! image. Also: many connections and requests in flight, hostile clients,
//! a mirror seeing writes made through an export, and no thread left
//! behind by `nbd-server-stop`.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use blockjob::Context;
use serde_json::{Value, json};

use common::oracle::{Ours, Side};
use common::qmp::Daemon;

/// The tests run one at a time: the machine is small, and the thread
/// check must see only its own server's threads.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// nbdinfo/nbdcopy (libnbd-bin) and nbdkit: installed when missing, as
/// `.ci/run` does; a test never skips for want of them.
fn need_nbd_tools() {
    let have = |t: &str| {
        Command::new("sh")
            .args(["-c", &format!("command -v {t}")])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    };
    if !(have("nbdinfo") && have("nbdcopy") && have("nbdkit")) {
        let sudo = if unsafe_free_is_root() { "" } else { "sudo " };
        let st = Command::new("sh")
            .args([
                "-c",
                &format!("{sudo}apt-get install -y -qq nbdkit libnbd-bin"),
            ])
            .status()
            .expect("run apt-get");
        assert!(st.success(), "apt-get install nbdkit libnbd-bin failed");
    }
    common::require_tool("nbdinfo");
    common::require_tool("nbdcopy");
}

fn unsafe_free_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .map(|s| {
            s.lines()
                .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

fn run(cmd: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new(cmd).args(args).output().expect(cmd);
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn ok(cmd: &str, args: &[&str]) -> String {
    let (success, out) = run(cmd, args);
    assert!(success, "{cmd} {args:?}: {out}");
    out
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn url(sock: &Path, name: &str) -> String {
    format!("nbd+unix:///{name}?socket={}", sock.display())
}

/// A raw image of 8 MiB: data, explicit zeroes and holes at
/// 64 KiB-aligned places.
fn raw_image(dir: &Path) -> PathBuf {
    let img = dir.join("disk.raw");
    ok("qemu-img", &["create", "-f", "raw", s(&img), "8M"]);
    ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x11 0 1M",
            "-c",
            "write -P 0x22 3M 64k",
            "-c",
            "write -P 0x33 5M 512k",
            "-c",
            "write -z 6M 1M",
            s(&img),
        ],
    );
    img
}

/// A qcow2 over a qcow2 backing file: data in both layers, zero clusters
/// in the top, unallocated ranges.
fn qcow2_chain(dir: &Path) -> (PathBuf, PathBuf) {
    let base = dir.join("base.qcow2");
    let top = dir.join("top.qcow2");
    ok("qemu-img", &["create", "-f", "qcow2", s(&base), "16M"]);
    ok(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0xaa 0 4M",
            "-c",
            "write -P 0xbb 8M 1M",
            s(&base),
        ],
    );
    ok(
        "qemu-img",
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            s(&base),
            "-F",
            "qcow2",
            s(&top),
        ],
    );
    ok(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0xcc 1M 1M",
            "-c",
            "write -z 2M 512k",
            "-c",
            "write -P 0xdd 12M 64k",
            s(&top),
        ],
    );
    (base, top)
}

/// Our context with an NBD server on `dir/ours.sock`.
fn ours_server(dir: &Path) -> (Ours, PathBuf) {
    let mut o = Ours::new();
    let sock = dir.join("ours.sock");
    o.cmd(
        "nbd-server-start",
        json!({"addr": {"type": "unix", "data": {"path": sock}}}),
    )
    .unwrap();
    (o, sock)
}

fn qsd_server(dir: &Path) -> (Daemon, PathBuf) {
    let mut d = Daemon::start();
    let sock = dir.join("qsd.sock");
    d.cmd(
        "nbd-server-start",
        json!({"addr": {"type": "unix", "data": {"path": sock}}}),
    )
    .unwrap();
    (d, sock)
}

fn add_file(side: &mut dyn Side, name: &str, fmt: &str, img: &Path) {
    side.cmd(
        "blockdev-add",
        json!({"driver": fmt, "node-name": name,
               "file": {"driver": "file", "filename": img}}),
    )
    .unwrap();
}

#[test]
fn qemu_img_reads_the_image_and_holes_stay_holes() {
    let _g = serial();
    need_nbd_tools();
    let dir = tempfile::tempdir().unwrap();
    let img = raw_image(dir.path());
    let (mut o, sock) = ours_server(dir.path());
    add_file(&mut o, "disk", "raw", &img);
    o.cmd(
        "block-export-add",
        json!({"type": "nbd", "id": "e", "node-name": "disk"}),
    )
    .unwrap();
    let u = url(&sock, "disk");
    ok(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", s(&img), &u],
    );
    // Convert to a sparse file: same bytes, and the holes are holes.
    let copy = dir.path().join("copy.raw");
    ok(
        "qemu-img",
        &["convert", "-f", "raw", "-O", "raw", &u, s(&copy)],
    );
    ok(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", s(&img), s(&copy)],
    );
    let map_of = |p: &Path| ok("qemu-img", &["map", "--output=json", "-f", "raw", s(p)]);
    assert_eq!(map_of(&copy), map_of(&img));
    // nbdcopy too (several connections, many requests in flight).
    let copy2 = dir.path().join("copy2.raw");
    std::fs::File::create(&copy2)
        .unwrap()
        .set_len(8 << 20)
        .unwrap();
    ok(
        "nbdcopy",
        &[
            "--connections=4",
            "--requests=64",
            "--request-size=65536",
            &u,
            s(&copy2),
        ],
    );
    ok(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", s(&img), s(&copy2)],
    );
    assert_eq!(map_of(&copy2), map_of(&img));
}

/// A command's success and output (refusals are compared too).
fn out(cmd: &str, args: &[&str]) -> String {
    let (success, text) = run(cmd, args);
    format!("{success}: {text}")
}

/// What a client sees of an export: qemu-img map over NBD, nbdinfo's
/// maps of every context.
fn views(sock: &Path, name: &str, bitmap: Option<&str>) -> Vec<String> {
    let u = url(sock, name);
    let mut v = vec![
        out("qemu-img", &["map", "--output=json", "-f", "raw", &u]),
        out("nbdinfo", &["--map", &u]),
        out("nbdinfo", &["--map=qemu:allocation-depth", &u]),
        out(
            "nbdinfo",
            &["--list", "--json", &u.replace(&format!("/{name}?"), "/?")],
        ),
    ];
    if let Some(b) = bitmap {
        v.push(out(
            "nbdinfo",
            &[&format!("--map=qemu:dirty-bitmap:{b}"), &u],
        ));
    }
    v.push(out("nbdinfo", &["--json", &u]));
    // URIs name the socket, which differs.
    v.iter().map(|t| t.replace(s(sock), "SOCK")).collect()
}

/// Equal views, or the first that differs, shown whole.
fn same(ours: Vec<String>, qemu: Vec<String>) {
    for (i, (o, q)) in ours.iter().zip(&qemu).enumerate() {
        assert_eq!(o, q, "view {i} differs:\nours:\n{o}\nqemu:\n{q}");
    }
    assert_eq!(ours.len(), qemu.len());
}

#[test]
fn maps_match_qemu_storage_daemon() {
    let _g = serial();
    need_nbd_tools();
    let dir = tempfile::tempdir().unwrap();
    // Each daemon serves its own copy, built by the same commands: both
    // write their images, which QEMU (and our locking) refuses on one.
    let images = |side: &str| {
        let d = dir.path().join(side);
        std::fs::create_dir(&d).unwrap();
        (qcow2_chain(&d).1, raw_image(&d))
    };
    let (qimages, oimages) = (images("qsd"), images("ours"));
    let (mut q, qsock) = qsd_server(dir.path());
    let (mut o, osock) = ours_server(dir.path());
    for (side, (top, img)) in [(&mut q as &mut dyn Side, &qimages), (&mut o, &oimages)] {
        add_file(side, "top", "qcow2", top);
        add_file(side, "raw", "raw", img);
        side.cmd(
            "block-dirty-bitmap-add",
            json!({"node": "top", "name": "b0", "granularity": 65536}),
        )
        .unwrap();
        side.cmd(
            "block-dirty-bitmap-disable",
            json!({"node": "top", "name": "b0"}),
        )
        .unwrap();
        side.cmd(
            "block-export-add",
            json!({"type": "nbd", "id": "t", "node-name": "top", "allocation-depth": true,
                   "bitmaps": ["b0"], "description": "the top"}),
        )
        .unwrap();
        // A recording bitmap on the writable export: the writes below
        // show in it.
        side.cmd(
            "block-dirty-bitmap-add",
            json!({"node": "raw", "name": "b1", "granularity": 65536}),
        )
        .unwrap();
        side.cmd(
            "block-export-add",
            json!({"type": "nbd", "id": "w", "node-name": "raw", "writable": true,
                   "bitmaps": ["b1"]}),
        )
        .unwrap();
    }
    same(
        views(&osock, "top", Some("b0")),
        views(&qsock, "top", Some("b0")),
    );
    same(
        views(&osock, "raw", Some("b1")),
        views(&qsock, "raw", Some("b1")),
    );
    // A write through the writable export lands, and both sides map it alike.
    for sock in [&osock, &qsock] {
        ok(
            "qemu-io",
            &[
                "-f",
                "raw",
                "-c",
                "write -P 0x5a 2M 128k",
                "-c",
                "write -z 7M 64k",
                &url(sock, "raw"),
            ],
        );
    }
    same(
        views(&osock, "raw", Some("b1")),
        views(&qsock, "raw", Some("b1")),
    );
    let (_, r) = run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "read -P 0x5a 2M 128k",
            &url(&osock, "raw"),
        ],
    );
    assert!(r.contains("read 131072/131072"), "{r}");
}

#[test]
fn read_only_exports_refuse_writes_as_qemu() {
    let _g = serial();
    let dir = tempfile::tempdir().unwrap();
    let img = raw_image(dir.path());
    let (mut q, qsock) = qsd_server(dir.path());
    let (mut o, osock) = ours_server(dir.path());
    let mut outs = Vec::new();
    for (side, sock) in [(&mut q as &mut dyn Side, &qsock), (&mut o, &osock)] {
        add_file(side, "disk", "raw", &img);
        side.cmd(
            "block-export-add",
            json!({"type": "nbd", "id": "e", "node-name": "disk"}),
        )
        .unwrap();
        let u = url(sock, "disk");
        let mut out = Vec::new();
        for c in [
            "write -P 1 0 4k",
            "write -z 0 4k",
            "discard 0 64k",
            "read -P 0x11 0 4k",
            "read 8M 512",
            "flush",
        ] {
            // qemu-io opens read-write unless -r: the server refuses.
            let (_, text) = run("qemu-io", &["-f", "raw", "-c", c, &u]);
            let text: Vec<&str> = text
                .lines()
                .filter(|l| !l.contains("bytes/sec") && !l.contains("ops/sec"))
                .collect();
            out.push(format!(
                "{c}: {}",
                text.join(" | ").replace(s(sock), "SOCK")
            ));
        }
        outs.push(out);
    }
    assert_eq!(outs[1], outs[0]);
    // qemu-io opens read-write and QEMU's client refuses a read-only
    // export up front; with -r it writes nothing. A client that writes
    // anyway gets EPERM from both servers.
    assert!(outs[0][0].contains("Permission denied"), "{:?}", outs[0]);
    for sock in [&qsock, &osock] {
        let mut c = handshake(sock);
        go(&mut c, "disk");
        let mut got = Vec::new();
        for (kind, cookie) in [(1u16, 1u64), (6, 2), (4, 3), (3, 4)] {
            c.write_all(&request(kind, cookie, 0, 4096)).unwrap();
            if kind == 1 {
                c.write_all(&[0u8; 4096]).unwrap();
            }
            let mut reply = [0u8; 16];
            c.read_exact(&mut reply).unwrap();
            got.push((
                u64::from_be_bytes(reply[8..16].try_into().unwrap()),
                u32::from_be_bytes(reply[4..8].try_into().unwrap()),
            ));
        }
        // write, write-zeroes, trim: EINVAL (QEMU 10's answer, not
        // EPERM); flush: fine; the write's payload was consumed.
        assert_eq!(
            got,
            vec![(1, 22), (2, 22), (3, 22), (4, 0)],
            "{}",
            sock.display()
        );
    }
}

fn nbd_threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|c| c.starts_with("bj-nbd"))
        .count()
}

/// Greeting, then fixed newstyle flags.
fn handshake(sock: &Path) -> UnixStream {
    let mut c = UnixStream::connect(sock).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut greet = [0u8; 18];
    c.read_exact(&mut greet).unwrap();
    assert_eq!(&greet[..8], b"NBDMAGIC");
    c.write_all(&3u32.to_be_bytes()).unwrap();
    c
}

fn opt(c: &mut UnixStream, option: u32, data: &[u8]) {
    let mut b = Vec::new();
    b.extend_from_slice(&0x4948_4156_454f_5054u64.to_be_bytes());
    b.extend_from_slice(&option.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    c.write_all(&b).unwrap();
}

/// Reads until the server closes (true) or 20 s pass (false).
fn closed_by_server(c: &mut UnixStream) -> bool {
    let mut buf = [0u8; 4096];
    loop {
        match c.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
    }
}

/// GO to `name`, simple replies.
fn go(c: &mut UnixStream, name: &str) {
    let mut p = Vec::new();
    p.extend_from_slice(&(name.len() as u32).to_be_bytes());
    p.extend_from_slice(name.as_bytes());
    p.extend_from_slice(&0u16.to_be_bytes());
    opt(c, 7, &p);
    // Replies until ACK (type 1).
    loop {
        let mut h = [0u8; 20];
        c.read_exact(&mut h).unwrap();
        let kind = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
        let mut d = vec![0; len as usize];
        c.read_exact(&mut d).unwrap();
        assert_eq!(
            kind & (1 << 31),
            0,
            "GO refused: {}",
            String::from_utf8_lossy(&d)
        );
        if kind == 1 {
            return;
        }
    }
}

fn request(kind: u16, cookie: u64, offset: u64, len: u32) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&0x2560_9513u32.to_be_bytes());
    b.extend_from_slice(&0u16.to_be_bytes());
    b.extend_from_slice(&kind.to_be_bytes());
    b.extend_from_slice(&cookie.to_be_bytes());
    b.extend_from_slice(&offset.to_be_bytes());
    b.extend_from_slice(&len.to_be_bytes());
    b
}

#[test]
fn hostile_clients_cost_only_their_connection() {
    let _g = serial();
    need_nbd_tools();
    let dir = tempfile::tempdir().unwrap();
    let img = raw_image(dir.path());
    let o = Ours::new();
    let ctx: &Context = &o.ctx;
    let sock = dir.path().join("h.sock");
    let r = blockjob::qmp::execute(
        ctx,
        &json!({"execute": "nbd-server-start", "arguments": {
            "addr": {"type": "unix", "data": {"path": sock}},
            "handshake-max-seconds": 1, "max-connections": 8}}),
    );
    assert_eq!(r, json!({"return": {}}));
    let mut o = o;
    add_file(&mut o, "disk", "raw", &img);
    o.cmd(
        "block-export-add",
        json!({"type": "nbd", "id": "e", "node-name": "disk", "writable": true}),
    )
    .unwrap();
    let alive = |sock: &Path| {
        let (ok_, out) = run("nbdinfo", &["--size", &url(sock, "disk")]);
        assert!(ok_, "server no longer serves: {out}");
        assert_eq!(out.trim(), "8388608");
    };

    // Garbage instead of the client flags and options.
    let mut c = UnixStream::connect(&sock).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    c.write_all(&[0xff; 64]).unwrap();
    assert!(closed_by_server(&mut c));
    alive(&sock);

    // An option claiming 4 GiB of payload: closed, nothing allocated.
    let mut c = handshake(&sock);
    let mut b = Vec::new();
    b.extend_from_slice(&0x4948_4156_454f_5054u64.to_be_bytes());
    b.extend_from_slice(&7u32.to_be_bytes());
    b.extend_from_slice(&u32::MAX.to_be_bytes());
    c.write_all(&b).unwrap();
    assert!(closed_by_server(&mut c));
    alive(&sock);

    // A stall in the handshake: closed after handshake-max-seconds.
    let t0 = Instant::now();
    let mut c = handshake(&sock);
    assert!(closed_by_server(&mut c));
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(10),
        "{took:?}"
    );
    alive(&sock);

    // A write claiming more than 32 MiB: an EINVAL reply, then closed.
    let mut c = handshake(&sock);
    go(&mut c, "disk");
    c.write_all(&request(1, 7, 0, 64 << 20)).unwrap();
    let mut reply = [0u8; 16];
    c.read_exact(&mut reply).unwrap();
    assert_eq!(u32::from_be_bytes(reply[4..8].try_into().unwrap()), 22);
    assert_eq!(u64::from_be_bytes(reply[8..16].try_into().unwrap()), 7);
    assert!(closed_by_server(&mut c));
    alive(&sock);

    // A read past the end: EINVAL, the connection goes on; then garbage.
    let mut c = handshake(&sock);
    go(&mut c, "disk");
    c.write_all(&request(0, 8, 8 << 20, 4096)).unwrap();
    c.read_exact(&mut reply).unwrap();
    assert_eq!(u32::from_be_bytes(reply[4..8].try_into().unwrap()), 22);
    c.write_all(&request(0, 9, 0, 512)).unwrap();
    c.read_exact(&mut reply).unwrap();
    assert_eq!(u32::from_be_bytes(reply[4..8].try_into().unwrap()), 0);
    let mut data = [0u8; 512];
    c.read_exact(&mut data).unwrap();
    assert!(data.iter().all(|&b| b == 0x11));
    c.write_all(b"not a request header at all......").unwrap();
    assert!(closed_by_server(&mut c));
    alive(&sock);

    // Disconnect in the middle of a write's payload.
    let mut c = handshake(&sock);
    go(&mut c, "disk");
    c.write_all(&request(1, 10, 0, 1 << 20)).unwrap();
    c.write_all(&[0u8; 1000]).unwrap();
    drop(c);
    alive(&sock);

    // Many clients that never finish negotiating: the limit holds them in
    // the queue, the deadline frees the slots, the next client is served.
    let stalled: Vec<UnixStream> = (0..8)
        .map(|_| UnixStream::connect(&sock).unwrap())
        .collect();
    alive(&sock);
    drop(stalled);

    // Max-connections 1 turns multi-conn off (QEMU's multi-conn=auto).
    let info = ok("nbdinfo", &["--json", &url(&sock, "disk")]);
    assert!(info.contains("\"can_multi_conn\": true"), "{info}");

    // Nothing of it outlives nbd-server-stop.
    assert!(nbd_threads() > 0);
    o.cmd("nbd-server-stop", json!({})).unwrap();
    assert_eq!(nbd_threads(), 0);
    assert!(!sock.exists(), "the socket was not removed");
}

#[test]
fn socket_mode_follows_the_umask_as_qemu() {
    let _g = serial();
    let dir = tempfile::tempdir().unwrap();
    let (mut q, qsock) = qsd_server(dir.path());
    let (mut o, osock) = ours_server(dir.path());
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    // Both created under this process's umask (QSD inherits it).
    assert_eq!(mode(&osock), mode(&qsock));
    assert_ne!(mode(&osock), 0o600);
    q.cmd("nbd-server-stop", json!({})).unwrap();
    o.cmd("nbd-server-stop", json!({})).unwrap();
    assert_eq!(osock.exists(), qsock.exists());
}

#[test]
fn a_mirror_on_an_exported_node_sees_the_clients_writes() {
    let _g = serial();
    let dir = tempfile::tempdir().unwrap();
    let img = raw_image(dir.path());
    let dst = dir.path().join("dst.raw");
    ok("qemu-img", &["create", "-f", "raw", s(&dst), "8M"]);
    let (mut o, sock) = ours_server(dir.path());
    add_file(&mut o, "src", "raw", &img);
    add_file(&mut o, "dst", "raw", &dst);
    o.cmd(
        "block-export-add",
        json!({"type": "nbd", "id": "e", "node-name": "src", "writable": true}),
    )
    .unwrap();
    // The exported node cannot go while exported (QEMU's text).
    assert_eq!(
        o.cmd("blockdev-del", json!({"node-name": "src"})),
        Err("GenericError: Node src is in use".into())
    );
    o.cmd(
        "blockdev-mirror",
        json!({"job-id": "m", "device": "src", "target": "dst", "sync": "full"}),
    )
    .unwrap();
    let u = url(&sock, "src");
    // Writes through the export while the mirror runs (and after READY).
    ok("qemu-io", &["-f", "raw", "-c", "write -P 0x77 4M 256k", &u]);
    loop {
        let ev = o.event().expect("mirror event");
        if ev["event"] == "BLOCK_JOB_READY" {
            break;
        }
    }
    ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x78 100k 8k",
            "-c",
            "write -z 5M 64k",
            &u,
        ],
    );
    o.cmd("block-job-complete", json!({"device": "m"})).unwrap();
    loop {
        let ev = o.event().expect("mirror event");
        if ev["event"] == "BLOCK_JOB_COMPLETED" {
            assert!(ev["data"].get("error").is_none(), "{ev}");
            break;
        }
    }
    // The export followed the pivot to dst; src and dst hold the same.
    assert_eq!(
        o.cmd("query-block-exports", json!({})).unwrap()[0]["node-name"],
        "dst"
    );
    ok("qemu-io", &["-f", "raw", "-c", "read -P 0x78 100k 8k", &u]);
    // A safe export-del is refused while the client that just exited is
    // still leaving (asynchronously, in QEMU too): try for a while.
    let mut tries = 0;
    while let Err(e) = o.cmd("block-export-del", json!({"id": "e"})) {
        assert!(e.ends_with("still in use") && tries < 100, "{e}");
        tries += 1;
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    o.cmd("blockdev-del", json!({"node-name": "src"})).unwrap();
    ok(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", s(&img), s(&dst)],
    );
    let _ = Value::Null;
}
