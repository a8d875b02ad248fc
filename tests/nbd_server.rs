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
use std::sync::Mutex;
use std::time::{Duration, Instant};

use blockjob::Context;
use serde_json::{Value, json};

use common::cmd::{nbd_url, ok, run, s};
use common::oracle::{Ours, Side, del_export_when_idle, ours_nbd_server as ours_server};
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
    common::nbd::require_nbdkit();
    common::require_tool("nbdinfo");
    common::require_tool("nbdcopy");
}

fn url(sock: &Path, name: &str) -> String {
    nbd_url(sock, name)
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
    let ring_before = blockjob::export::completed_requests();
    let (mut q, qsock) = qsd_server(dir.path());
    let (mut o, osock) = ours_server(dir.path());
    for (side, (top, img)) in [(&mut q as &mut dyn Side, &qimages), (&mut o, &oimages)] {
        add_file(side, "top", "qcow2", top);
        // io_uring on both: our connection's ring serves the plain reads
        // and writes below, and the bitmap their after-write marks fill
        // is compared with QEMU's.
        side.cmd(
            "blockdev-add",
            json!({"driver": "raw", "node-name": "raw",
                   "file": {"driver": "file", "filename": img, "aio": "io_uring"}}),
        )
        .unwrap();
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
    assert!(
        blockjob::export::completed_requests() > ring_before,
        "the writes and the read went through the ring"
    );
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
    nbd_threads_named("bj-nbd")
}

/// Threads of this process whose name starts with `prefix`.
fn nbd_threads_named(prefix: &str) -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|c| c.starts_with(prefix))
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
    hostile_clients_on("threads");
}

/// The same on an `io_uring` node: plain reads and writes take the
/// connection's ring (a read past the end is declined there and refused
/// by a worker; a payload cut short ends the connection before anything
/// reaches the ring).
#[test]
fn hostile_clients_cost_only_their_connection_on_the_ring() {
    hostile_clients_on("io_uring");
}

fn hostile_clients_on(aio: &str) {
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
    o.cmd(
        "blockdev-add",
        json!({"driver": "raw", "node-name": "disk",
               "file": {"driver": "file", "filename": img, "aio": aio}}),
    )
    .unwrap();
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
    let ring_before = blockjob::export::completed_requests();
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
    assert_eq!(
        blockjob::export::completed_requests() - ring_before,
        u64::from(aio == "io_uring"),
        "{aio}: the good read on the ring, the bad one not"
    );
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

/// Whatever is at the socket path is replaced as QEMU replaces it (a
/// regular file too); a directory there is QEMU's error.
#[test]
fn a_file_at_the_socket_path_is_replaced_as_qemu() {
    let _g = serial();
    let dir = tempfile::tempdir().unwrap();
    let mut q = Daemon::start();
    let mut o = Ours::new();
    let mut seen = Vec::new();
    for (tag, side) in [("qsd", &mut q as &mut dyn Side), ("ours", &mut o)] {
        let file = dir.path().join(format!("{tag}.file"));
        std::fs::write(&file, b"not a socket").unwrap();
        let r1 = side.cmd(
            "nbd-server-start",
            json!({"addr": {"type": "unix", "data": {"path": file}}}),
        );
        let is_socket = {
            use std::os::unix::fs::FileTypeExt;
            std::fs::symlink_metadata(&file)
                .map(|m| m.file_type().is_socket())
                .unwrap_or(false)
        };
        side.cmd("nbd-server-stop", json!({})).unwrap();
        let d = dir.path().join(format!("{tag}.dir"));
        std::fs::create_dir(&d).unwrap();
        let r2 = side
            .cmd(
                "nbd-server-start",
                json!({"addr": {"type": "unix", "data": {"path": d}}}),
            )
            .map_err(|e| e.replace(tag, "X"));
        seen.push((r1, is_socket, r2));
    }
    assert_eq!(seen[1], seen[0], "ours, then qemu-storage-daemon's");
    assert_eq!(seen[0].0, Ok(json!({})));
    assert!(seen[0].1, "the file became the socket");
    assert_eq!(
        seen[0].2,
        Err(format!(
            "GenericError: Failed to unlink socket {}: Is a directory",
            dir.path().join("X.dir").display()
        ))
    );
}

/// With `aio=threads` the workers serve the client; with `io_uring` its
/// plain writes go on the connection's ring through the mirror's filter
/// (`export::nbd_aio`), which marks the job's bitmap when they complete.
#[test]
fn a_mirror_on_an_exported_node_sees_the_clients_writes() {
    for aio in ["threads", "io_uring"] {
        mirror_sees_the_clients_writes(aio);
    }
}

fn mirror_sees_the_clients_writes(aio: &str) {
    let _g = serial();
    let dir = tempfile::tempdir().unwrap();
    let img = raw_image(dir.path());
    let dst = dir.path().join("dst.raw");
    ok("qemu-img", &["create", "-f", "raw", s(&dst), "8M"]);
    let (mut o, sock) = ours_server(dir.path());
    o.cmd(
        "blockdev-add",
        json!({"driver": "raw", "node-name": "src",
               "file": {"driver": "file", "filename": img, "aio": aio}}),
    )
    .unwrap();
    add_file(&mut o, "dst", "raw", &dst);
    let ring_before = blockjob::export::completed_requests();
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
    let on_ring = blockjob::export::completed_requests() - ring_before;
    assert_eq!(
        on_ring > 0,
        aio == "io_uring",
        "aio={aio}: {on_ring} requests on the ring"
    );
    del_export_when_idle(&mut o, "e");
    o.cmd("blockdev-del", json!({"node-name": "src"})).unwrap();
    ok(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", s(&img), s(&dst)],
    );
    let _ = Value::Null;
}

// ---- a raw client on blockjob::nbd::proto ------------------------------------------

/// Reads one transmission reply (every chunk of it) for `cookie`:
/// the data read (holes as zeroes), the block status extents per context
/// id, and the error, if any.
#[derive(Debug, Default)]
struct Reply {
    data: Vec<u8>,
    extents: Vec<(u32, Vec<(u64, u64)>)>,
    error: Option<u32>,
    kinds: Vec<u16>,
}

fn read_reply(c: &mut UnixStream, cookie: u64, extended: bool, offset: u64, len: usize) -> Reply {
    use blockjob::nbd::proto::{self, ReplyHeader, chunk};
    let mut r = Reply::default();
    loop {
        let h = ReplyHeader::read(c, extended).unwrap();
        assert_eq!(h.cookie(), cookie);
        match h {
            ReplyHeader::Simple { error, .. } => {
                if error != 0 {
                    r.error = Some(error);
                } else {
                    r.data = vec![0; len];
                    c.read_exact(&mut r.data).unwrap();
                }
                return r;
            }
            ReplyHeader::Chunk {
                flags,
                kind,
                length,
                ..
            } => {
                let mut d = vec![0; length as usize];
                c.read_exact(&mut d).unwrap();
                r.kinds.push(kind);
                match kind {
                    chunk::NONE => {}
                    chunk::OFFSET_DATA => {
                        let at = u64::from_be_bytes(d[..8].try_into().unwrap()) - offset;
                        r.data.resize(len, 0);
                        r.data[at as usize..at as usize + d.len() - 8].copy_from_slice(&d[8..]);
                    }
                    chunk::OFFSET_HOLE => r.data.resize(len, 0),
                    chunk::BLOCK_STATUS | chunk::BLOCK_STATUS_EXT => {
                        let (id, ext) = proto::parse_block_status(kind, &d).unwrap();
                        r.extents
                            .push((id, ext.iter().map(|e| (e.length, e.flags)).collect()));
                    }
                    k if k & chunk::FLAG_ERROR != 0 => {
                        r.error = Some(proto::parse_error_chunk(kind, &d).unwrap().0);
                    }
                    k => panic!("unexpected chunk type {k}"),
                }
                if flags & proto::REPLY_FLAG_DONE != 0 {
                    return r;
                }
            }
        }
    }
}

/// One request and its reply, as a line: the chunk types, the error,
/// a digest of the data, the extents by context name.
fn round_trip(
    c: &mut UnixStream,
    extended: bool,
    contexts: &[(u32, String)],
    req: blockjob::nbd::proto::Request,
    payload: &[u8],
) -> String {
    let mut b = req.encode(extended);
    b.extend_from_slice(payload);
    c.write_all(&b).unwrap();
    let read_len = if req.kind == blockjob::nbd::proto::cmd::READ {
        req.length as usize
    } else {
        0
    };
    let r = read_reply(c, req.cookie, extended, req.offset, read_len);
    let name = |id: u32| {
        contexts
            .iter()
            .find(|(i, _)| *i == id)
            .map_or("?".to_string(), |(_, n)| n.clone())
    };
    let distinct: std::collections::BTreeSet<u8> = r.data.iter().copied().collect();
    format!(
        "cmd {} @{}+{}: error {:?}, {} bytes of {:?}, extents {:?}, chunks {:?}",
        req.kind,
        req.offset,
        req.length,
        r.error,
        r.data.len(),
        distinct,
        r.extents
            .iter()
            .map(|(id, e)| (name(*id), e.clone()))
            .collect::<Vec<_>>(),
        r.kinds
    )
}

/// An extended-headers session (`NBD_OPT_EXTENDED_HEADERS`, meta
/// contexts, `NBD_OPT_GO`, then reads, a write, `BLOCK_STATUS_EXT` with a
/// 64-bit length, an error) and a `NBD_OPT_EXPORT_NAME` session with
/// zero padding and simple replies, summarised line by line.
fn wire_script(sock: &Path) -> Vec<String> {
    use blockjob::nbd::proto::{self, Request, cmd, opt, rep};
    let mut lines = Vec::new();
    let mut c = handshake(sock);
    proto::write_option(&mut c, opt::EXTENDED_HEADERS, &[]).unwrap();
    let r = proto::read_option_reply(&mut c, opt::EXTENDED_HEADERS).unwrap();
    lines.push(format!("extended headers: reply {:#x}", r.kind));
    let ctx = proto::meta_context_payload(
        "disk",
        &[
            proto::CONTEXT_BASE_ALLOCATION,
            proto::CONTEXT_ALLOCATION_DEPTH,
        ],
    );
    proto::write_option(&mut c, opt::SET_META_CONTEXT, &ctx).unwrap();
    let mut contexts = Vec::new();
    loop {
        let r = proto::read_option_reply(&mut c, opt::SET_META_CONTEXT).unwrap();
        if r.kind == rep::ACK {
            break;
        }
        assert_eq!(r.kind, rep::META_CONTEXT, "{}", r.message());
        let id = u32::from_be_bytes(r.data[..4].try_into().unwrap());
        contexts.push((id, String::from_utf8(r.data[4..].to_vec()).unwrap()));
    }
    let mut names: Vec<&String> = contexts.iter().map(|(_, n)| n).collect();
    names.sort();
    lines.push(format!("contexts {names:?}"));
    proto::write_option(
        &mut c,
        opt::GO,
        &proto::go_payload("disk", &[proto::info::BLOCK_SIZE]),
    )
    .unwrap();
    loop {
        let r = proto::read_option_reply(&mut c, opt::GO).unwrap();
        if r.kind == rep::ACK {
            break;
        }
        assert_eq!(r.kind, rep::INFO, "{}", r.message());
        let item = u16::from_be_bytes(r.data[..2].try_into().unwrap());
        let mut d = r.data[2..].to_vec();
        if item == proto::info::EXPORT {
            // Not offered by ours (README): mask the payload-length flag.
            let f = u16::from_be_bytes(d[8..10].try_into().unwrap())
                & !proto::tflag::BLOCK_STAT_PAYLOAD;
            d[8..10].copy_from_slice(&f.to_be_bytes());
        }
        lines.push(format!("info {item}: {d:?}"));
    }
    let req = |kind, cookie, offset, length| Request {
        flags: 0,
        kind,
        cookie,
        offset,
        length,
    };
    let mut send = |r: Request, p: &[u8]| round_trip(&mut c, true, &contexts, r, p);
    lines.push(send(req(cmd::READ, 1, 0, 64 << 10), &[]));
    lines.push(send(req(cmd::READ, 2, (1 << 20) - 4096, 8192), &[]));
    lines.push(send(req(cmd::READ, 3, 4 << 20, 64 << 10), &[]));
    lines.push(send(req(cmd::WRITE, 4, 2 << 20, 4096), &[0x5a; 4096]));
    lines.push(send(req(cmd::READ, 5, 2 << 20, 4096), &[]));
    // The whole export, then a 64-bit length past its end (EINVAL, as
    // QEMU).
    lines.push(send(req(cmd::BLOCK_STATUS, 14, 0, 8 << 20), &[]));
    lines.push(send(req(cmd::BLOCK_STATUS, 6, 0, 1 << 33), &[]));
    lines.push(send(req(cmd::BLOCK_STATUS, 7, 3 << 20, 64 << 10), &[]));
    lines.push(send(req(cmd::READ, 8, 8 << 20, 512), &[]));
    lines.push(send(req(cmd::FLUSH, 9, 0, 0), &[]));
    c.write_all(&req(cmd::DISC, 10, 0, 0).encode(true)).unwrap();
    assert!(closed_by_server(&mut c));

    // NBD_OPT_EXPORT_NAME without NO_ZEROES: size, flags, 124 zeroes.
    let mut c = UnixStream::connect(sock).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut greet = [0u8; 18];
    c.read_exact(&mut greet).unwrap();
    c.write_all(&proto::CLIENT_FIXED_NEWSTYLE.to_be_bytes())
        .unwrap();
    proto::write_option(&mut c, opt::EXPORT_NAME, b"disk").unwrap();
    let mut hello = [0u8; 8 + 2 + 124];
    c.read_exact(&mut hello).unwrap();
    assert!(hello[10..].iter().all(|&b| b == 0));
    let flags =
        u16::from_be_bytes(hello[8..10].try_into().unwrap()) & !proto::tflag::BLOCK_STAT_PAYLOAD;
    lines.push(format!(
        "export-name: size {}, flags {flags:#x}",
        u64::from_be_bytes(hello[..8].try_into().unwrap())
    ));
    let mut send = |r: Request, p: &[u8]| round_trip(&mut c, false, &[], r, p);
    lines.push(send(req(cmd::READ, 11, 2 << 20, 4096), &[]));
    lines.push(send(req(cmd::READ, 12, 8 << 20, 512), &[]));
    c.write_all(&req(cmd::DISC, 13, 0, 0).encode(false))
        .unwrap();
    assert!(closed_by_server(&mut c));

    // An unknown name: the server closes without a reply.
    let mut c = handshake(sock);
    proto::write_option(&mut c, opt::EXPORT_NAME, b"nope").unwrap();
    let mut buf = [0u8; 1];
    lines.push(format!(
        "export-name nope: {:?}",
        c.read(&mut buf).map_err(|e| e.kind())
    ));
    lines
}

#[test]
fn extended_headers_and_export_name_round_trips_match_qemu() {
    let _g = serial();
    let dir = tempfile::tempdir().unwrap();
    let mut views = Vec::new();
    for qsd in [true, false] {
        let sub = dir.path().join(if qsd { "qsd" } else { "ours" });
        std::fs::create_dir(&sub).unwrap();
        let img = raw_image(&sub);
        let (mut side, sock): (Box<dyn Side>, PathBuf) = if qsd {
            let (d, s) = qsd_server(&sub);
            (Box::new(d), s)
        } else {
            let (o, s) = ours_server(&sub);
            (Box::new(o), s)
        };
        add_file(&mut *side, "disk", "raw", &img);
        side.cmd(
            "block-export-add",
            json!({"type": "nbd", "id": "e0", "node-name": "disk", "writable": true,
                   "allocation-depth": true}),
        )
        .unwrap();
        views.push(wire_script(&sock));
        side.cmd("nbd-server-stop", json!({})).unwrap();
    }
    assert_eq!(views[1], views[0], "ours, then qemu-storage-daemon's");
    // What the script must have seen, so that equal views mean something.
    let v = views[1].join("\n");
    assert!(v.contains("extended headers: reply 0x1"), "{v}");
    assert!(
        v.contains("\"base:allocation\", \"qemu:allocation-depth\""),
        "{v}"
    );
    assert!(v.contains("cmd 1 @2097152+4096: error None"), "{v}");
    assert!(
        v.contains("cmd 0 @2097152+4096: error None, 4096 bytes of {90}"),
        "{v}"
    );
    assert!(v.contains("cmd 0 @8388608+512: error Some(22)"), "{v}");
    assert!(v.contains("chunks [6"), "BLOCK_STATUS_EXT: {v}");
}

/// TCP: `port: "0"` (the system's choice, which we report) and a fixed
/// port; `qemu-img compare nbd://127.0.0.1:PORT/NAME` finds the image.
#[test]
fn tcp_listeners_serve_qemu_img() {
    let _g = serial();
    let dir = tempfile::tempdir().unwrap();
    let img = raw_image(dir.path());
    let mut o = Ours::new();
    add_file(&mut o, "disk", "raw", &img);
    let fixed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    for port in ["0".to_string(), fixed.to_string()] {
        o.cmd(
            "nbd-server-start",
            json!({"addr": {"type": "inet", "data": {"host": "127.0.0.1", "port": port}}}),
        )
        .unwrap();
        let got = o.ctx.exports().nbd_server_port().expect("a TCP port");
        if port == "0" {
            assert_ne!(got, 0);
        } else {
            assert_eq!(got, fixed);
        }
        o.cmd(
            "block-export-add",
            json!({"type": "nbd", "id": "e0", "node-name": "disk", "name": "img"}),
        )
        .unwrap();
        let url = format!("nbd://127.0.0.1:{got}/img");
        let out = ok(
            "qemu-img",
            &["compare", "-f", "raw", "-F", "raw", s(&img), &url],
        );
        assert!(out.contains("Images are identical."), "{out}");
        // A second server on the same port is refused with QEMU's text.
        let mut other = Ours::new();
        let e = other
            .cmd(
                "nbd-server-start",
                json!({"addr": {"type": "inet",
                                "data": {"host": "127.0.0.1", "port": got.to_string()}}}),
            )
            .unwrap_err();
        assert_eq!(
            e,
            "GenericError: Failed to find an available port: Address already in use"
        );
        o.cmd("nbd-server-stop", json!({})).unwrap();
        assert_eq!(nbd_threads(), 0);
        assert!(std::net::TcpStream::connect(("127.0.0.1", got)).is_err());
    }
}

/// `handshake-max-seconds: 0` is no limit: a client that waits longer
/// than 1 s (the limit the hostile-client test uses) before negotiating
/// is still served. (QEMU's default is 10 s.)
#[test]
fn handshake_max_seconds_zero_waits_for_slow_clients() {
    let _g = serial();
    let dir = tempfile::tempdir().unwrap();
    let img = raw_image(dir.path());
    let mut o = Ours::new();
    add_file(&mut o, "disk", "raw", &img);
    let sock = dir.path().join("h0.sock");
    o.cmd(
        "nbd-server-start",
        json!({"addr": {"type": "unix", "data": {"path": sock}},
               "handshake-max-seconds": 0}),
    )
    .unwrap();
    o.cmd(
        "block-export-add",
        json!({"type": "nbd", "id": "e0", "node-name": "disk"}),
    )
    .unwrap();
    let mut c = UnixStream::connect(&sock).unwrap();
    let mut greet = [0u8; 18];
    c.read_exact(&mut greet).unwrap();
    std::thread::sleep(Duration::from_millis(2500));
    c.write_all(&3u32.to_be_bytes()).unwrap();
    go(&mut c, "disk");
    c.write_all(&request(0, 1, 0, 512)).unwrap();
    let mut reply = [0u8; 16 + 512];
    c.read_exact(&mut reply).unwrap();
    assert_eq!(&reply[4..8], &[0, 0, 0, 0], "read error");
    assert!(reply[16..].iter().all(|&b| b == 0x11));
    // A stall during option haggling is not cut either.
    let mut c2 = handshake(&sock);
    std::thread::sleep(Duration::from_millis(1500));
    go(&mut c2, "disk");
    drop((c, c2));
    o.cmd("nbd-server-stop", json!({})).unwrap();
}

/// `block-export-del` (safe) while a client is bound to the export:
/// refused, with the export still listed; once the client left, it
/// succeeds and `BLOCK_EXPORT_DELETED` follows; `hard` with a client
/// disconnects it. Ours and qemu-storage-daemon, step by step.
#[test]
fn safe_export_del_waits_for_clients_as_qemu() {
    let _g = serial();
    let dir = tempfile::tempdir().unwrap();
    let mut views = Vec::new();
    for qsd in [true, false] {
        let sub = dir.path().join(if qsd { "qsd" } else { "ours" });
        std::fs::create_dir(&sub).unwrap();
        let img = raw_image(&sub);
        let (mut side, sock): (Box<dyn Side>, PathBuf) = if qsd {
            let (d, s) = qsd_server(&sub);
            (Box::new(d), s)
        } else {
            let (o, s) = ours_server(&sub);
            (Box::new(o), s)
        };
        let mut v = Vec::new();
        add_file(&mut *side, "disk", "raw", &img);
        let add = json!({"type": "nbd", "id": "e0", "node-name": "disk"});
        side.cmd("block-export-add", add.clone()).unwrap();
        let mut c = handshake(&sock);
        go(&mut c, "disk");
        v.push(show(side.cmd("block-export-del", json!({"id": "e0"}))));
        v.push(show(side.cmd("query-block-exports", json!({}))));
        v.push(json!(side.event_quick()));
        drop(c);
        // The server sees the EOF on its own time.
        del_export_when_idle(&mut *side, "e0");
        v.push(json!({"ok": {}}));
        let ev = side.event().expect("BLOCK_EXPORT_DELETED");
        v.push(json!([ev["event"], ev["data"]]));
        v.push(show(side.cmd("query-block-exports", json!({}))));
        // hard: the client is cut.
        side.cmd("block-export-add", add).unwrap();
        let mut c = handshake(&sock);
        go(&mut c, "disk");
        v.push(show(
            side.cmd("block-export-del", json!({"id": "e0", "mode": "hard"})),
        ));
        let ev = side.event().expect("BLOCK_EXPORT_DELETED");
        v.push(json!([ev["event"], ev["data"]]));
        v.push(json!({"closed": closed_by_server(&mut c)}));
        side.cmd("nbd-server-stop", json!({})).unwrap();
        views.push(v);
    }
    assert_eq!(views[1], views[0], "ours, then qemu-storage-daemon's");
    assert_eq!(
        views[1][0],
        json!({"err": "GenericError: export 'e0' still in use"})
    );
    assert_eq!(views[1][8], json!({"closed": true}));
}

fn show(r: Result<Value, String>) -> Value {
    match r {
        Ok(v) => json!({ "ok": v }),
        Err(e) => json!({ "err": e }),
    }
}

/// A connection serves as many requests at once as its client has in
/// flight (up to 16, QEMU's `NBD_MAX_REQUESTS`): each worker waits for its
/// own I/O, so 16 reads of a slow node wait in the driver together, one
/// worker each. (With a fixed 4 workers a guest at queue depth 16 on an
/// O_DIRECT device got 0.7x QEMU's IOPS; `benches/guest_io_under_job.py`.)
#[test]
fn every_request_in_flight_gets_a_worker() {
    let _g = serial();
    let dir = tempfile::tempdir().unwrap();
    let (mut o, sock) = ours_server(dir.path());
    o.cmd(
        "blockdev-add",
        json!({"driver": "null-co", "node-name": "slow", "size": 1 << 20,
            "read-zeroes": true, "latency-ns": 2_000_000_000u64}),
    )
    .unwrap();
    o.cmd(
        "block-export-add",
        json!({"type": "nbd", "id": "e", "node-name": "slow"}),
    )
    .unwrap();
    let workers = || nbd_threads_named("bj-nbd-worker");
    let before = workers();
    let mut c = handshake(&sock);
    go(&mut c, "slow");
    let reqs: Vec<u8> = (0..16u64)
        .flat_map(|i| request(0, 100 + i, i * 4096, 4096))
        .collect();
    c.write_all(&reqs).unwrap();
    // One worker per request while all 16 sleep in the driver (2 s; the
    // workers start as the requests are read).
    let t = Instant::now();
    let mut most = 0;
    while most < 16 && t.elapsed() < Duration::from_millis(1500) {
        most = most.max(workers() - before);
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(most, 16, "workers of the connection while 16 requests wait");
    let mut cookies = Vec::new();
    for _ in 0..16 {
        let mut h = [0u8; 16];
        c.read_exact(&mut h).unwrap();
        assert_eq!(u32::from_be_bytes(h[..4].try_into().unwrap()), 0x6744_6698);
        assert_eq!(u32::from_be_bytes(h[4..8].try_into().unwrap()), 0, "error");
        let mut data = [1u8; 4096];
        c.read_exact(&mut data).unwrap();
        assert!(data.iter().all(|b| *b == 0));
        cookies.push(u64::from_be_bytes(h[8..16].try_into().unwrap()));
    }
    cookies.sort();
    assert_eq!(cookies, (100..116).collect::<Vec<u64>>());
    drop(c);
    del_export_when_idle(&mut o, "e");
}
