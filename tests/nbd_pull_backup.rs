//! Pull-mode incremental backup, as libvirt does it: a dirty bitmap
//! records the guest's writes since the last backup; at backup time a
//! `copy-before-write` filter freezes the disk (`snapshot-access` reads
//! the frozen view), the bitmap is disabled and a new one takes over, and
//! the view is exported over NBD with the bitmap. A client asks
//! `qemu:dirty-bitmap:b0` for the dirty extents (`nbdinfo --map`) and
//! reads only those, while the guest keeps writing through the filter.
//!
//! Played on qemu-storage-daemon and on ours (in this process, served to
//! the same external tools): the same map, the same frozen data, the same
//! guest view, and the map must be exactly what the guest wrote before the
//! backup.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::guest::img;
use common::oracle::{Ours, Side, del_export_when_idle};
use common::qmp::Daemon;
use serde_json::{Value, json};

const MIB: u64 = 1 << 20;

fn tool(argv: &[&str]) -> String {
    common::require_tool(argv[0]);
    let out = Command::new(argv[0]).args(&argv[1..]).output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{argv:?}: {text}");
    text
}

fn url(sock: &Path, export: &str) -> String {
    format!("nbd+unix:///{export}?socket={}", sock.display())
}

/// `qemu-io` through an export: `ok` or what failed.
fn io(sock: &Path, export: &str, read_only: bool, cmd: &str) -> String {
    let mut args = vec!["qemu-io", "-f", "raw"];
    if read_only {
        args.push("-r");
    }
    let u = url(sock, export);
    args.extend(["-c", cmd, &u]);
    common::require_tool("qemu-io");
    let out = Command::new("qemu-io").args(&args[1..]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    if text.contains("Pattern verification failed") {
        "pattern mismatch".into()
    } else if out.status.success() && !text.contains("failed") {
        "ok".into()
    } else {
        format!("error: {text}{}", String::from_utf8_lossy(&out.stderr))
    }
}

/// The extents of a meta context as (offset, length, type) via `nbdinfo`.
fn map(sock: &Path, export: &str, context: &str) -> Vec<(u64, u64, u64)> {
    let text = tool(&[
        "nbdinfo",
        "--json",
        &format!("--map={context}"),
        &url(sock, export),
    ]);
    let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
    v.as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["offset"].as_u64().unwrap(),
                e["length"].as_u64().unwrap(),
                e["type"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// The guest's writes before the backup (pattern, offset, length): what
/// the incremental must hold.
const BEFORE: &[(u8, u64, u64)] = &[
    (0x11, MIB, 64 << 10),
    (0x12, 5 * MIB, 128 << 10),
    (0x13, 20 * MIB, 64 << 10),
];

fn play(side: &mut dyn Side, dir: &Path, sock: &Path) -> Vec<String> {
    let mut out = Vec::new();
    img(dir, "disk.img", Some(7));
    img(dir, "tmp.img", None);
    let ok = |side: &mut dyn Side, cmd: &str, args: Value| {
        side.cmd(cmd, args.clone())
            .unwrap_or_else(|e| panic!("{cmd} {args}: {e}"))
    };
    ok(
        side,
        "blockdev-add",
        json!({"driver": "raw", "node-name": "disk",
               "file": {"driver": "file", "filename": dir.join("disk.img")}}),
    );
    ok(
        side,
        "nbd-server-start",
        json!({"addr": {"type": "unix", "data": {"path": sock}}}),
    );
    // Last night's backup added b0; the guest writes.
    ok(
        side,
        "block-dirty-bitmap-add",
        json!({"node": "disk", "name": "b0"}),
    );
    ok(
        side,
        "block-export-add",
        json!({"type": "nbd", "id": "guest", "node-name": "disk", "writable": true}),
    );
    for (p, off, len) in BEFORE {
        assert_eq!(
            io(sock, "disk", false, &format!("write -P {p} {off} {len}")),
            "ok"
        );
    }
    del_export_when_idle(side, "guest");
    while let Some(e) = side.event_within(std::time::Duration::from_secs(10)) {
        if e["event"] == "BLOCK_EXPORT_DELETED" {
            break;
        }
    }

    // Backup time: freeze, switch bitmaps, export the view with b0.
    ok(
        side,
        "blockdev-add",
        json!({"driver": "raw", "node-name": "tmp",
               "file": {"driver": "file", "filename": dir.join("tmp.img")}}),
    );
    ok(
        side,
        "blockdev-add",
        json!({"driver": "copy-before-write", "node-name": "cbw", "file": "disk", "target": "tmp"}),
    );
    ok(
        side,
        "blockdev-add",
        json!({"driver": "snapshot-access", "node-name": "view", "file": "cbw"}),
    );
    ok(
        side,
        "transaction",
        json!({"actions": [
            {"type": "block-dirty-bitmap-disable", "data": {"node": "disk", "name": "b0"}},
            {"type": "block-dirty-bitmap-add", "data": {"node": "disk", "name": "b1"}}]}),
    );
    ok(
        side,
        "block-export-add",
        json!({"type": "nbd", "id": "backup", "node-name": "view", "name": "backup",
               "bitmaps": [{"node": "disk", "name": "b0"}]}),
    );
    // The guest goes on, through the filter.
    ok(
        side,
        "block-export-add",
        json!({"type": "nbd", "id": "guest", "node-name": "cbw", "name": "guest",
               "writable": true}),
    );
    for cmd in [
        "write -P 34 5M 64k",
        "write -P 35 30M 64k",
        "write -P 36 1M 4k",
    ] {
        assert_eq!(io(sock, "guest", false, cmd), "ok", "{cmd}");
    }

    // The client: dirty extents from the bitmap, then only those read.
    let dirty: Vec<(u64, u64)> = map(sock, "backup", "qemu:dirty-bitmap:b0")
        .into_iter()
        .filter(|e| e.2 & 1 != 0)
        .map(|e| (e.0, e.1))
        .collect();
    out.push(format!("dirty extents {dirty:?}"));
    let want: Vec<(u64, u64)> = BEFORE.iter().map(|&(_, o, l)| (o, l)).collect();
    assert_eq!(
        dirty, want,
        "the map is what the guest wrote before the backup"
    );
    for &(p, off, len) in BEFORE {
        // The view keeps the data of backup time, whatever the guest did since.
        let r = io(sock, "backup", true, &format!("read -P {p} {off} {len}"));
        out.push(format!("view {off}+{len} = {p}: {r}"));
        assert_eq!(r, "ok");
    }
    let total: u64 = dirty.iter().map(|e| e.1).sum();
    out.push(format!("bytes to read {total}"));
    // The base allocation of the view, for completeness.
    out.push(format!(
        "base:allocation extents {}",
        map(sock, "backup", "base:allocation").len()
    ));
    // The guest sees its own writes.
    for (cmd, want) in [("read -P 34 5M 64k", "ok"), ("read -P 18 5M+64k 64k", "ok")] {
        let cmd = cmd.replace("5M+64k", &(5 * MIB + (64 << 10)).to_string());
        let r = io(sock, "guest", true, &cmd);
        out.push(format!("guest {cmd}: {r}"));
        assert_eq!(r, want);
    }
    del_export_when_idle(side, "backup");
    del_export_when_idle(side, "guest");
    ok(side, "nbd-server-stop", json!({}));
    out
}

fn sock_in(dir: &Path) -> PathBuf {
    dir.join("nbd.sock")
}

#[test]
fn pull_mode_incremental_backup_matches_qemu() {
    let qd = tempfile::tempdir().unwrap();
    let mut q = Daemon::start();
    let theirs = play(&mut q, qd.path(), &sock_in(qd.path()));
    let od = tempfile::tempdir().unwrap();
    let mut o = Ours::new();
    let ours = play(&mut o, od.path(), &sock_in(od.path()));
    assert_eq!(ours, theirs);
}
