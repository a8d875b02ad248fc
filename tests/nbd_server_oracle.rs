//! The NBD server's QMP face against qemu-storage-daemon: the same script
//! of export and server commands on both, replies and events compared
//! (QEMU's texts for every refusal, pinned as recorded from QSD 10).

mod common;

use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;

use serde_json::{Value, json};

use common::oracle::{Ours, Side, canonical};
use common::qmp::Daemon;

/// Runs the script on one side: each command's result and the events
/// that came with it, as lines (socket paths replaced by `SOCK`).
fn script(side: &mut dyn Side, dir: &Path, tag: &str) -> Vec<String> {
    let sock = dir.join(format!("{tag}.sock"));
    let img = dir.join(format!("{tag}.raw"));
    let ro = dir.join(format!("{tag}-ro.raw"));
    for p in [&img, &ro] {
        let st = Command::new("qemu-img")
            .args(["create", "-f", "raw", p.to_str().unwrap(), "8M"])
            .output()
            .unwrap();
        assert!(st.status.success());
    }
    let addr = json!({"type": "unix", "data": {"path": sock}});
    let long = "x".repeat(4097);
    let steps: Vec<(&str, Value)> = vec![
        (
            "blockdev-add",
            json!({"driver": "raw", "node-name": "n0", "file": {"driver": "file", "filename": img}}),
        ),
        (
            "blockdev-add",
            json!({"driver": "raw", "node-name": "ro", "read-only": true, "file": {"driver": "file", "filename": ro}}),
        ),
        (
            "block-dirty-bitmap-add",
            json!({"node": "n0", "name": "b0"}),
        ),
        (
            "block-dirty-bitmap-add",
            json!({"node": "n0", "name": "off", "disabled": true}),
        ),
        ("nbd-server-stop", json!({})),
        (
            "block-export-add",
            json!({"type": "nbd", "id": "e0", "node-name": "n0"}),
        ),
        (
            "block-export-add",
            json!({"type": "nbd", "id": "1bad", "node-name": "zz"}),
        ),
        (
            "block-export-add",
            json!({"type": "nbd", "id": "e0", "node-name": "zz"}),
        ),
        ("nbd-server-add", json!({"device": "zz"})),
        ("nbd-server-add", json!({"device": "n0"})),
        ("nbd-server-start", json!({})),
        (
            "nbd-server-start",
            json!({"addr": {"type": "unix", "path": "/x"}}),
        ),
        (
            "nbd-server-start",
            json!({"addr": addr, "max-connections": -1}),
        ),
        (
            "nbd-server-start",
            json!({"addr": addr, "handshake-max-seconds": -1}),
        ),
        ("nbd-server-start", json!({"addr": addr, "tls-creds": "t0"})),
        // `to` is a uint16: QEMU names the member alone when it is out of
        // range, the whole path when it is no number.
        (
            "nbd-server-start",
            json!({"addr": {"type": "inet", "data": {"host": "127.0.0.1", "port": "0", "to": 70000}}}),
        ),
        (
            "nbd-server-start",
            json!({"addr": {"type": "inet", "data": {"host": "127.0.0.1", "port": "0", "to": -1}}}),
        ),
        (
            "nbd-server-start",
            json!({"addr": {"type": "inet", "data": {"host": "127.0.0.1", "port": "0", "to": "x"}}}),
        ),
        (
            "nbd-server-start",
            json!({"addr": {"type": "unix", "data": {"path": "/nonexistent/dir/s"}}}),
        ),
        ("nbd-server-start", json!({"addr": addr})),
        ("nbd-server-start", json!({"addr": addr})),
        (
            "block-export-add",
            json!({"type": "nbd", "node-name": "n0"}),
        ),
        ("block-export-add", json!({"type": "nbd", "id": "e4"})),
        (
            "block-export-add",
            json!({"type": "nbd", "id": "e0", "node-name": "n0", "bitmaps": ["nope"]}),
        ),
        (
            "block-export-add",
            json!({"type": "nbd", "id": "e0", "node-name": "n0", "bitmaps": ["b0"]}),
        ),
        (
            "block-export-add",
            json!({"type": "nbd", "id": "e0", "node-name": "n0", "name": long}),
        ),
        (
            "block-export-add",
            json!({"type": "nbd", "id": "e0", "node-name": "n0", "description": long}),
        ),
        (
            "block-export-add",
            json!({"type": "nbd", "id": "e0", "node-name": "n0", "iothread": "io0"}),
        ),
        (
            "block-export-add",
            json!({"type": "nbd", "id": "w", "node-name": "ro", "writable": true}),
        ),
        (
            "block-export-add",
            json!({"type": "nbd", "id": "e0", "node-name": "n0", "writable": true, "bitmaps": ["b0", "off"], "fixed-iothread": true}),
        ),
        (
            "block-export-add",
            json!({"type": "nbd", "id": "e0", "node-name": "ro"}),
        ),
        (
            "block-export-add",
            json!({"type": "nbd", "id": "e1", "node-name": "ro", "name": "n0"}),
        ),
        (
            "block-export-add",
            json!({"type": "nbd", "id": "e1", "node-name": "ro", "description": "d", "allocation-depth": true}),
        ),
        (
            "block-dirty-bitmap-remove",
            json!({"node": "n0", "name": "off"}),
        ),
        ("query-block-exports", json!({})),
        ("blockdev-del", json!({"node-name": "n0"})),
        ("block-export-del", json!({"id": "nope"})),
        ("block-export-del", json!({"id": "e1", "mode": "bogus"})),
        ("block-export-del", json!({"id": "e1"})),
        ("block-export-del", json!({"id": "e1"})),
        (
            "nbd-server-add",
            json!({"device": "ro", "name": "legacy", "writable": true}),
        ),
        ("nbd-server-add", json!({"device": "ro", "name": "legacy"})),
        ("query-block-exports", json!({})),
        ("nbd-server-remove", json!({"name": "nope"})),
        ("nbd-server-remove", json!({"name": "legacy"})),
        (
            "block-export-add",
            json!({"type": "nbd", "id": "e2", "node-name": "ro"}),
        ),
        ("CONNECT", json!("ro")),
        ("block-export-del", json!({"id": "e2"})),
        ("query-block-exports", json!({})),
        ("block-export-del", json!({"id": "e2", "mode": "hard"})),
        ("query-block-exports", json!({})),
        ("nbd-server-stop", json!({})),
        ("query-block-exports", json!({})),
        (
            "block-dirty-bitmap-remove",
            json!({"node": "n0", "name": "off"}),
        ),
        ("blockdev-del", json!({"node-name": "n0"})),
        ("nbd-server-stop", json!({})),
    ];
    let mut out = Vec::new();
    let mut client: Option<UnixStream> = None;
    for (name, args) in steps {
        if name == "CONNECT" {
            // A client that negotiated (GO) to the export and stays.
            let u = format!(
                "nbd+unix:///{}?socket={}",
                args.as_str().unwrap(),
                sock.display()
            );
            let _ = u;
            client = Some(connect_go(&sock, args.as_str().unwrap()));
            continue;
        }
        let r = side.cmd(name, args.clone());
        let mut line = format!(
            "{name} -> {}",
            match r {
                Ok(v) => canonical(&v),
                Err(e) => e,
            }
        );
        while let Some(ev) = side.event_quick() {
            line.push_str(&format!(
                " | {} {}",
                ev["event"].as_str().unwrap(),
                canonical(&ev["data"])
            ));
        }
        out.push(line.replace(sock.to_str().unwrap(), "SOCK"));
    }
    drop(client);
    out
}

/// A raw client: greeting, fixed newstyle, `NBD_OPT_GO` to `name`.
fn connect_go(sock: &Path, name: &str) -> UnixStream {
    use std::io::{Read, Write};
    let mut c = UnixStream::connect(sock).unwrap();
    let mut greet = [0u8; 18];
    c.read_exact(&mut greet).unwrap();
    c.write_all(&3u32.to_be_bytes()).unwrap();
    let mut p = Vec::new();
    p.extend_from_slice(&(name.len() as u32).to_be_bytes());
    p.extend_from_slice(name.as_bytes());
    p.extend_from_slice(&0u16.to_be_bytes());
    let mut o = Vec::new();
    o.extend_from_slice(&0x4948_4156_454f_5054u64.to_be_bytes());
    o.extend_from_slice(&7u32.to_be_bytes());
    o.extend_from_slice(&(p.len() as u32).to_be_bytes());
    o.extend_from_slice(&p);
    c.write_all(&o).unwrap();
    loop {
        let mut h = [0u8; 20];
        c.read_exact(&mut h).unwrap();
        let kind = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
        let mut d = vec![0; len as usize];
        c.read_exact(&mut d).unwrap();
        assert_eq!(kind & (1 << 31), 0, "GO refused");
        if kind == 1 {
            return c;
        }
    }
}

#[test]
fn export_commands_reply_as_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let mut q = Daemon::start();
    let mut o = Ours::new();
    let qemu = script(&mut q, dir.path(), "qsd");
    let ours = script(&mut o, dir.path(), "ours");
    for (i, (a, b)) in ours.iter().zip(&qemu).enumerate() {
        assert_eq!(a, b, "step {i} differs");
    }
    assert_eq!(ours.len(), qemu.len());
    // Pinned: the texts this server must keep (recorded from QSD 10).
    let all = qemu.join("\n");
    for t in [
        "GenericError: NBD server not running",
        "GenericError: NBD server already running",
        "GenericError: Invalid block export id",
        "GenericError: Cannot find device='' nor node-name='zz'",
        "GenericError: Cannot find device='zz' nor node-name='zz'",
        "GenericError: Parameter 'addr.data' is missing",
        "GenericError: Parameter 'max-connections' expects uint32_t",
        "GenericError: No TLS credentials with id 't0'",
        "GenericError: Failed to bind socket to /nonexistent/dir/s: No such file or directory",
        "GenericError: Bitmap 'nope' is not found",
        "GenericError: Enabled bitmap 'b0' incompatible with readonly export",
        "GenericError: iothread \"io0\" not found",
        "GenericError: Cannot export read-only node as writable",
        "GenericError: Block export id 'e0' is already in use",
        "GenericError: NBD server already has export named 'n0'",
        "GenericError: Bitmap 'off' is currently in use by another operation and cannot be used",
        "GenericError: Node n0 is in use",
        "GenericError: Export 'nope' is not found",
        "GenericError: Parameter 'mode' does not accept value 'bogus'",
        "GenericError: export 'e2' still in use",
        "BLOCK_EXPORT_DELETED {\"id\":\"e0\"}",
    ] {
        assert!(all.contains(t), "QEMU no longer says {t:?}:\n{all}");
    }
}
