//! Dirty bitmaps against a live `qemu-storage-daemon`: the same
//! block-dirty-bitmap-* commands (accepted or refused with the same text),
//! the same guest writes (QEMU through an NBD export of the node, ours
//! through a backend), and the same `dirty-bitmaps` query afterwards:
//! names, recording, busy, granularity and count, newest first.

mod common;

use std::path::Path;
use std::process::Command;

use blockjob::Context;
use blockjob::block::backend::{BackendOptions, BlockBackend};
use blockjob::block::dirty_bitmap::BitmapRef;
use common::qmp::Daemon;
use serde_json::{Value, json};

const MIB: u64 = 1 << 20;

/// Our side of one command, from QMP-shaped arguments.
fn ours(ctx: &Context, cmd: &str, a: &Value) -> Result<(), String> {
    let s = |k: &str| a[k].as_str().unwrap_or_default().to_string();
    let r = match cmd {
        "block-dirty-bitmap-add" => ctx.block_dirty_bitmap_add(
            &s("node"),
            &s("name"),
            a.get("granularity").map(|g| g.as_u64().unwrap() as u32),
            a.get("persistent").and_then(Value::as_bool),
            a.get("disabled").and_then(Value::as_bool),
        ),
        "block-dirty-bitmap-remove" => ctx.block_dirty_bitmap_remove(&s("node"), &s("name")),
        "block-dirty-bitmap-clear" => ctx.block_dirty_bitmap_clear(&s("node"), &s("name")),
        "block-dirty-bitmap-enable" => ctx.block_dirty_bitmap_enable(&s("node"), &s("name")),
        "block-dirty-bitmap-disable" => ctx.block_dirty_bitmap_disable(&s("node"), &s("name")),
        "block-dirty-bitmap-merge" => {
            let refs: Vec<BitmapRef> = a["bitmaps"]
                .as_array()
                .unwrap()
                .iter()
                .map(|b| match b {
                    Value::String(n) => BitmapRef::Name(n.clone()),
                    o => BitmapRef::Node {
                        node: o["node"].as_str().unwrap().into(),
                        name: o["name"].as_str().unwrap().into(),
                    },
                })
                .collect();
            ctx.block_dirty_bitmap_merge(&s("node"), &s("target"), &refs)
        }
        _ => unreachable!("{cmd}"),
    };
    r.map_err(|e| format!("{}: {}", e.class(), e.message()))
}

fn theirs(d: &mut Daemon, cmd: &str, a: &Value) -> Result<(), String> {
    d.qmp
        .execute(cmd, a.clone())
        .map(|_| ())
        .map_err(|e| format!("{}: {}", e.class, e.desc))
}

fn qemu_bitmaps(d: &mut Daemon, node: &str) -> Value {
    let nodes = d.qmp.execute("query-named-block-nodes", json!({})).unwrap();
    nodes
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node-name"] == node)
        .and_then(|n| n.get("dirty-bitmaps").cloned())
        .unwrap_or(json!([]))
}

enum Io {
    Write(u64, u64),
    Zero(u64, u64),
    Discard(u64, u64),
}

fn qemu_io(sock: &Path, io: &Io) {
    let cmd = match io {
        Io::Write(o, l) => format!("write {o} {l}"),
        Io::Zero(o, l) => format!("write -z {o} {l}"),
        Io::Discard(o, l) => format!("discard {o} {l}"),
    };
    let out = Command::new("qemu-io")
        .args(["-f", "raw"])
        .arg(format!("nbd+unix:///n0?socket={}", sock.display()))
        .args(["-c", &cmd])
        .output()
        .expect("run qemu-io");
    assert!(out.status.success(), "qemu-io {cmd}: {out:?}");
}

fn our_io(blk: &BlockBackend, io: &Io) {
    match io {
        Io::Write(o, l) => blk.pwrite(*o, &vec![0x5a; *l as usize]),
        Io::Zero(o, l) => blk.pwrite_zeroes(*o, *l, false),
        Io::Discard(o, l) => blk.pdiscard(*o, *l),
    }
    .unwrap();
}

#[test]
fn dirty_bitmaps_match_qemu() {
    common::require_tool("qemu-io");
    let dir = tempfile::tempdir().unwrap();
    let qimg = dir.path().join("q.raw");
    let oimg = dir.path().join("o.raw");
    let small = dir.path().join("small.raw");
    for (p, size) in [(&qimg, 64 * MIB), (&oimg, 64 * MIB), (&small, 32 * MIB)] {
        std::fs::File::create(p).unwrap().set_len(size).unwrap();
    }
    let nbd = dir.path().join("nbd.sock");
    let raw = |name: &str, path: &Path| json!({"driver":"raw","node-name":name,"file":{"driver":"file","filename":path}});
    let null = json!({"driver":"null-co","node-name":"nul","size":64 * MIB});

    let mut d = Daemon::start();
    d.qmp.execute("blockdev-add", raw("n0", &qimg)).unwrap();
    d.qmp.execute("blockdev-add", raw("small", &small)).unwrap();
    d.qmp.execute("blockdev-add", null.clone()).unwrap();
    d.qmp
        .execute(
            "nbd-server-start",
            json!({"addr":{"type":"unix","data":{"path":nbd}}}),
        )
        .unwrap();
    d.qmp
        .execute(
            "block-export-add",
            json!({"type":"nbd","id":"e0","node-name":"n0","writable":true}),
        )
        .unwrap();

    let ctx = Context::new();
    ctx.blockdev_add(&raw("n0", &oimg)).unwrap();
    ctx.blockdev_add(&raw("small", &small)).unwrap();
    ctx.blockdev_add(&null).unwrap();
    let blk = ctx.blk_new("n0", BackendOptions::default()).unwrap();

    let long = "b".repeat(1024);
    let ok_long = "c".repeat(1023);
    enum Step {
        Cmd(&'static str, Value),
        Guest(Io),
        Query(&'static str),
    }
    use Step::*;
    let steps = vec![
        Cmd("block-dirty-bitmap-add", json!({"node":"n0","name":"b0"})),
        Cmd("block-dirty-bitmap-add", json!({"node":"n0","name":"b0"})),
        Cmd("block-dirty-bitmap-add", json!({"node":"n0","name":""})),
        Cmd(
            "block-dirty-bitmap-add",
            json!({"node":"nosuch","name":"x"}),
        ),
        Cmd(
            "block-dirty-bitmap-add",
            json!({"node":"n0","name":"g4k","granularity":4096}),
        ),
        Cmd(
            "block-dirty-bitmap-add",
            json!({"node":"n0","name":"g512","granularity":512}),
        ),
        Cmd(
            "block-dirty-bitmap-add",
            json!({"node":"n0","name":"gbig","granularity":1u64 << 31}),
        ),
        Cmd(
            "block-dirty-bitmap-add",
            json!({"node":"n0","name":"bad","granularity":1000}),
        ),
        Cmd(
            "block-dirty-bitmap-add",
            json!({"node":"n0","name":"bad","granularity":0}),
        ),
        Cmd(
            "block-dirty-bitmap-add",
            json!({"node":"n0","name":"bad","granularity":256}),
        ),
        Cmd(
            "block-dirty-bitmap-add",
            json!({"node":"n0","name":"dis","disabled":true}),
        ),
        Cmd(
            "block-dirty-bitmap-add",
            json!({"node":"n0","name":"pers","persistent":true}),
        ),
        Cmd(
            "block-dirty-bitmap-add",
            json!({"node":"n0","name":"pf","persistent":false}),
        ),
        Cmd("block-dirty-bitmap-add", json!({"node":"n0","name":long})),
        Cmd(
            "block-dirty-bitmap-add",
            json!({"node":"n0","name":ok_long}),
        ),
        Cmd("block-dirty-bitmap-add", json!({"node":"nul","name":"bn"})),
        Cmd("block-dirty-bitmap-add", json!({"node":"small","name":"s"})),
        Query("n0"),
        Guest(Io::Write(0, 4096)),
        Guest(Io::Write(65535, 2)),
        Guest(Io::Zero(MIB, 128 << 10)),
        Guest(Io::Discard(2 * MIB, 128 << 10)),
        Guest(Io::Write(64 * MIB - 100, 100)),
        Query("n0"),
        Cmd(
            "block-dirty-bitmap-disable",
            json!({"node":"n0","name":"b0"}),
        ),
        Cmd(
            "block-dirty-bitmap-disable",
            json!({"node":"n0","name":"b0"}),
        ),
        Guest(Io::Write(4 * MIB, 4096)),
        Query("n0"),
        Cmd(
            "block-dirty-bitmap-enable",
            json!({"node":"n0","name":"b0"}),
        ),
        Guest(Io::Write(5 * MIB, 4096)),
        Cmd(
            "block-dirty-bitmap-clear",
            json!({"node":"n0","name":"g4k"}),
        ),
        Query("n0"),
        Cmd(
            "block-dirty-bitmap-merge",
            json!({"node":"n0","target":"g4k","bitmaps":["b0","g512"]}),
        ),
        Cmd(
            "block-dirty-bitmap-merge",
            json!({"node":"n0","target":"dis","bitmaps":["b0"]}),
        ),
        Cmd(
            "block-dirty-bitmap-merge",
            json!({"node":"n0","target":"b0","bitmaps":["b0"]}),
        ),
        Cmd(
            "block-dirty-bitmap-merge",
            json!({"node":"n0","target":"pf","bitmaps":[{"node":"n0","name":"g512"}]}),
        ),
        Cmd(
            "block-dirty-bitmap-merge",
            json!({"node":"n0","target":"pf","bitmaps":[{"node":"small","name":"s"}]}),
        ),
        Cmd(
            "block-dirty-bitmap-merge",
            json!({"node":"n0","target":"pf","bitmaps":["b0","nosrc"]}),
        ),
        Cmd(
            "block-dirty-bitmap-merge",
            json!({"node":"n0","target":"pf","bitmaps":[{"node":"nosuch","name":"o"}]}),
        ),
        Cmd(
            "block-dirty-bitmap-merge",
            json!({"node":"n0","target":"notarget","bitmaps":["b0"]}),
        ),
        Cmd(
            "block-dirty-bitmap-merge",
            json!({"node":"nosuch","target":"b0","bitmaps":["b0"]}),
        ),
        Query("n0"),
        Cmd(
            "block-dirty-bitmap-remove",
            json!({"node":"n0","name":"g512"}),
        ),
        Cmd(
            "block-dirty-bitmap-remove",
            json!({"node":"n0","name":"g512"}),
        ),
        Cmd(
            "block-dirty-bitmap-remove",
            json!({"node":"nosuch","name":"b0"}),
        ),
        Cmd("block-dirty-bitmap-clear", json!({"node":"n0","name":"x"})),
        Cmd("block-dirty-bitmap-enable", json!({"node":"n0","name":"x"})),
        Cmd("block-dirty-bitmap-disable", json!({"node":"n0","name":""})),
        Cmd(
            "block-dirty-bitmap-clear",
            json!({"node":"nosuch","name":"x"}),
        ),
        Query("n0"),
        Query("nul"),
        Query("small"),
    ];
    let mut diffs = Vec::new();
    for step in &steps {
        match step {
            Cmd(cmd, args) => {
                let q = theirs(&mut d, cmd, args);
                let o = ours(&ctx, cmd, args);
                if q != o {
                    diffs.push(format!("{cmd} {args}\n  qemu: {q:?}\n  ours: {o:?}"));
                }
            }
            Guest(io) => {
                qemu_io(&nbd, io);
                our_io(&blk, io);
            }
            Query(node) => {
                let q = qemu_bitmaps(&mut d, node);
                let o = serde_json::to_value(ctx.query_dirty_bitmaps(node).unwrap()).unwrap();
                if std::env::var_os("BJ_SHOW").is_some() {
                    eprintln!("query {node}: {q}");
                }
                if q != o {
                    diffs.push(format!("query {node}\n  qemu: {q}\n  ours: {o}"));
                }
            }
        }
    }
    assert!(diffs.is_empty(), "{}", diffs.join("\n"));
}
