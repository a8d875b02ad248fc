//! Persistent dirty bitmaps in qcow2 against real QEMU 10.
//!
//! The same QMP runs on a live `qemu-storage-daemon` and on our dispatcher,
//! each on its own copy of the same image (QEMU's guest writes go through
//! an NBD export, ours through a backend), and the two must agree: the
//! replies (errors word for word), `query-named-block-nodes`'
//! `dirty-bitmaps`, `x-debug-block-dirty-bitmap-sha256` of every bitmap,
//! and, once both closed their image, what `qemu-img info` lists (names,
//! granularities, flags). Then each side opens the other's image and
//! finds the same bits; `qemu-img check` stays clean on what we wrote.
//!
//! Also: bitmaps written by `qemu-img bitmap`, read-only and inconsistent
//! bitmaps (after a real `kill -9` of either process), images QEMU
//! refuses, images whose extension a program without bitmap support left
//! behind, implicit backing layers, a stream over an image with bitmaps,
//! small clusters and every refcount width (our own cluster allocator).

mod common;

use std::io::{BufRead, BufReader};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use blockjob::block::backend::{BackendOptions, BlockBackend};
use common::chain::{overlay, s, tool};
use common::oracle::{Ours, Side};
use common::qmp::{Daemon, Qmp};
use serde_json::{Value, json};

const MIB: u64 = 1 << 20;

/// A qcow2 image made by qemu-img (`opts`: its `-o` options).
fn qcow2(dir: &Path, name: &str, size: &str, opts: &str) -> PathBuf {
    let p = dir.join(name);
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    if !opts.is_empty() {
        args.extend(["-o", opts]);
    }
    args.extend([s(&p), size]);
    tool("qemu-img", &args);
    p
}

/// A copy of `img` named `name` beside it.
fn copy(img: &Path, name: &str) -> PathBuf {
    let p = img.with_file_name(name);
    std::fs::copy(img, &p).unwrap();
    p
}

fn qcow2_node(name: &str, img: &Path, read_only: bool) -> Value {
    json!({"driver": "qcow2", "node-name": name, "read-only": read_only,
           "file": {"driver": "file", "filename": s(img)}})
}

/// A node's `dirty-bitmaps` (`[]` when QEMU leaves the member out).
fn bitmaps(side: &mut dyn Side, node: &str) -> Value {
    let nodes = side.cmd("query-named-block-nodes", json!({})).unwrap();
    nodes
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node-name"] == node)
        .unwrap_or_else(|| panic!("no node {node}"))
        .get("dirty-bitmaps")
        .cloned()
        .unwrap_or(json!([]))
}

/// Every named bitmap of `node` with its hash: `{name: sha256}`.
fn hashes(side: &mut dyn Side, node: &str) -> Value {
    let mut out = serde_json::Map::new();
    for b in bitmaps(side, node).as_array().unwrap() {
        let name = b["name"].as_str().unwrap();
        let h = side
            .cmd(
                "x-debug-block-dirty-bitmap-sha256",
                json!({"node": node, "name": name}),
            )
            .unwrap();
        out.insert(name.to_string(), h["sha256"].clone());
    }
    Value::Object(out)
}

/// What `qemu-img info` lists under `bitmaps` (`Null`: none).
fn info_bitmaps(img: &Path) -> Value {
    let info: Value =
        serde_json::from_str(&tool("qemu-img", &["info", "-U", "--output=json", s(img)])).unwrap();
    info["format-specific"]["data"]["bitmaps"].clone()
}

/// `qemu-img check --output=json` and its exit status.
fn check(img: &Path) -> (i32, Value) {
    let out = Command::new("qemu-img")
        .args(["check", "--output=json", s(img)])
        .output()
        .unwrap();
    let v = serde_json::from_slice(&out.stdout).unwrap_or_else(|_| {
        panic!(
            "qemu-img check {}: {}",
            img.display(),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code().unwrap_or(-1), v)
}

fn assert_clean(img: &Path) {
    let (code, v) = check(img);
    assert_eq!(code, 0, "qemu-img check {}: {v}", img.display());
    assert_eq!(v["check-errors"], 0, "{v}");
    assert!(
        v.get("leaks").is_none() && v.get("corruptions").is_none(),
        "{v}"
    );
}

/// QEMU and us, each with its own copies of the images; QEMU's guest
/// writes go through NBD exports.
struct Pair {
    q: Daemon,
    o: Ours,
    nbd: PathBuf,
    blks: Vec<(String, BlockBackend)>,
    _sock_dir: tempfile::TempDir,
}

impl Pair {
    fn new() -> Pair {
        let mut q = Daemon::start();
        let sock_dir = tempfile::tempdir().unwrap();
        let nbd = sock_dir.path().join("nbd.sock");
        q.qmp.ok(
            "nbd-server-start",
            json!({"addr": {"type": "unix", "data": {"path": s(&nbd)}}}),
        );
        Pair {
            q,
            o: Ours::new(),
            nbd,
            blks: Vec::new(),
            _sock_dir: sock_dir,
        }
    }

    /// Run a command on both; the replies must be equal.
    fn both(&mut self, cmd: &str, args: Value) -> Result<Value, String> {
        let theirs = self.q.cmd(cmd, args.clone());
        let ours = self.o.cmd(cmd, args.clone());
        assert_eq!(ours, theirs, "{cmd} {args}");
        ours
    }

    fn ok(&mut self, cmd: &str, args: Value) {
        self.both(cmd, args.clone())
            .unwrap_or_else(|e| panic!("{cmd} {args}: {e}"));
    }

    /// Open a node on both: QEMU on `theirs`, us on `ours`.
    fn open(&mut self, name: &str, theirs: &Path, ours: &Path, read_only: bool) {
        self.q
            .cmd("blockdev-add", qcow2_node(name, theirs, read_only))
            .unwrap();
        self.o
            .cmd("blockdev-add", qcow2_node(name, ours, read_only))
            .unwrap();
    }

    /// Make `node` writable by the guest on both sides.
    fn attach(&mut self, node: &str) {
        self.q.qmp.ok(
            "block-export-add",
            json!({"type": "nbd", "id": node, "node-name": node, "writable": true}),
        );
        let blk = self.o.ctx.blk_new(node, BackendOptions::default()).unwrap();
        self.blks.push((node.to_string(), blk));
    }

    /// The same guest write on both sides.
    fn write(&mut self, node: &str, offset: u64, len: u64) {
        let url = format!("nbd+unix:///{node}?socket={}", s(&self.nbd));
        let cmd = format!("write -P 0x5a {offset} {len}");
        tool("qemu-io", &["-f", "raw", &url, "-c", &cmd]);
        let blk = &self.blks.iter().find(|(n, _)| n == node).unwrap().1;
        blk.pwrite(offset, &vec![0x5a; len as usize]).unwrap();
    }

    /// Both sides show the same bitmaps with the same bits: the hashes.
    fn same_bitmaps(&mut self, node: &str) -> Value {
        let theirs = bitmaps(&mut self.q, node);
        assert_eq!(
            bitmaps(&mut self.o, node),
            theirs,
            "dirty-bitmaps of {node}"
        );
        let h = hashes(&mut self.q, node);
        assert_eq!(hashes(&mut self.o, node), h, "hashes of {node}");
        json!({"bitmaps": theirs, "sha256": h})
    }

    /// Close everything: QEMU quits, we drop our context.
    fn close(self) {
        drop(self.blks);
        drop(self.q);
        drop(self.o);
    }
}

/// `v` (a [`Pair::same_bitmaps`] result) with its bitmaps in name order
/// and without `exclude`: what must survive a close and reopen, where the
/// order becomes the directory's.
fn by_name(v: &Value, exclude: &[&str]) -> Value {
    let mut v = v.clone();
    let list = v["bitmaps"].as_array_mut().unwrap();
    list.retain(|b| !exclude.contains(&b["name"].as_str().unwrap()));
    list.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
    for name in exclude {
        v["sha256"].as_object_mut().unwrap().remove(*name);
    }
    v
}

/// Each side opens both images of a node after they were closed: QEMU's
/// and ours must show the same, on either side, and what was `expected`
/// before the close (in name order, `exclude` aside).
fn cross_check(node: &str, ours: &Path, theirs: &Path, expected: &Value, exclude: &[&str]) {
    let mut views = Vec::new();
    // One side after the other: each marks the bitmaps in use while open.
    let sides: [Box<dyn FnOnce() -> Box<dyn Side>>; 2] = [
        Box::new(|| Box::new(Daemon::start())),
        Box::new(|| Box::new(Ours::new())),
    ];
    for side in sides {
        let mut side = side();
        for (name, img) in [("mine", ours), ("qemus", theirs)] {
            side.cmd("blockdev-add", qcow2_node(name, img, false))
                .unwrap();
            views.push(json!({"bitmaps": bitmaps(&mut *side, name),
                              "sha256": hashes(&mut *side, name)}));
        }
    }
    for v in &views[1..] {
        assert_eq!(
            v, &views[0],
            "{node}: QEMU's view of our image vs the others"
        );
    }
    assert_eq!(
        by_name(&views[0], &[]),
        by_name(expected, exclude),
        "{node}"
    );
}

#[test]
fn bitmaps_we_write_are_qemus() {
    let dir = tempfile::tempdir().unwrap();
    let a = qcow2(dir.path(), "a.qcow2", "64M", "");
    // A size that is no multiple of 64 granules, and small clusters.
    let odd = qcow2(dir.path(), "odd.qcow2", "104858112", "cluster_size=4096");
    let (qa, qodd) = (copy(&a, "qa.qcow2"), copy(&odd, "qodd.qcow2"));
    let mut p = Pair::new();
    p.open("q", &qa, &a, false);
    p.open("odd", &qodd, &odd, false);
    p.attach("q");
    p.attach("odd");

    p.ok(
        "block-dirty-bitmap-add",
        json!({"node": "q", "name": "b-default", "persistent": true}),
    );
    p.ok(
        "block-dirty-bitmap-add",
        json!({"node": "q", "name": "b-512", "persistent": true, "granularity": 512,
               "disabled": true}),
    );
    p.ok(
        "block-dirty-bitmap-add",
        json!({"node": "q", "name": "b-1m", "persistent": true, "granularity": MIB}),
    );
    p.ok(
        "block-dirty-bitmap-add",
        json!({"node": "q", "name": "transient"}),
    );
    p.ok(
        "block-dirty-bitmap-add",
        json!({"node": "odd", "name": "o", "persistent": true}),
    );
    p.ok(
        "block-dirty-bitmap-add",
        json!({"node": "odd", "name": "o-512", "persistent": true, "granularity": 512}),
    );
    for (off, len) in [
        (0, 65536),
        (MIB + 512, 4096),
        (10 * MIB, 3 * MIB),
        (63 * MIB, MIB),
    ] {
        p.write("q", off, len);
    }
    p.write("odd", 100 * MIB, 512);
    p.write("odd", 104858112 - 512, 512);
    p.same_bitmaps("q");
    p.same_bitmaps("odd");

    p.ok(
        "block-dirty-bitmap-merge",
        json!({"node": "q", "target": "b-512", "bitmaps": ["b-default"]}),
    );
    p.ok(
        "block-dirty-bitmap-clear",
        json!({"node": "q", "name": "b-1m"}),
    );
    p.ok(
        "block-dirty-bitmap-enable",
        json!({"node": "q", "name": "b-512"}),
    );
    p.ok(
        "block-dirty-bitmap-disable",
        json!({"node": "q", "name": "b-default"}),
    );
    p.write("q", 20 * MIB, 131072);
    p.write("q", 5 * MIB, 512);
    // A persistent bitmap removed leaves the image at once (QEMU's
    // `qemu-img info` sees it gone while the node is open).
    p.ok(
        "block-dirty-bitmap-remove",
        json!({"node": "q", "name": "b-1m"}),
    );
    assert_eq!(info_bitmaps(&a), info_bitmaps(&qa));
    p.ok(
        "block-dirty-bitmap-add",
        json!({"node": "q", "name": "b-1m", "persistent": true, "granularity": 4 * MIB}),
    );
    let long = "n".repeat(1023);
    p.ok(
        "block-dirty-bitmap-add",
        json!({"node": "q", "name": long, "persistent": true, "granularity": 2147483648u64}),
    );
    p.write("q", 30 * MIB, 65536);
    let q_state = p.same_bitmaps("q");
    let odd_state = p.same_bitmaps("odd");
    // While open, the image says in-use for what it had at open (nothing
    // here: every bitmap is new, so the directory is empty or unchanged).
    assert_eq!(info_bitmaps(&a), info_bitmaps(&qa));
    p.close();

    // Closed: the same directory on both, flags included.
    let listed = info_bitmaps(&a);
    assert_eq!(listed, info_bitmaps(&qa));
    assert_eq!(listed.as_array().unwrap().len(), 4, "{listed}");
    assert_eq!(info_bitmaps(&odd), info_bitmaps(&qodd));
    assert_clean(&a);
    assert_clean(&odd);

    // Each side finds the same bits in either image.
    cross_check("q", &a, &qa, &q_state, &["transient"]);
    cross_check("odd", &odd, &qodd, &odd_state, &[]);
    // Opened writable and closed again by both: unchanged, clean.
    assert_eq!(info_bitmaps(&a), info_bitmaps(&qa));
    assert_eq!(info_bitmaps(&a), listed);
    assert_clean(&a);
    assert_clean(&qa);
}

#[test]
fn qemu_img_bitmaps_load_with_the_same_bits() {
    let dir = tempfile::tempdir().unwrap();
    let img = qcow2(dir.path(), "a.qcow2", "64M", "");
    let i = s(&img);
    let bm = |args: &[&str]| {
        let mut v = vec!["bitmap"];
        v.extend_from_slice(args);
        tool("qemu-img", &v);
    };
    let io = |cmd: &str| {
        tool("qemu-io", &["-c", cmd, i]);
    };
    bm(&["--add", i, "first"]);
    bm(&["--add", "-g", "128k", "--disable", i, "second"]);
    io("write 0 1M");
    io("write 10M 64k");
    bm(&["--add", i, "third"]);
    io("write 30M 512k");
    bm(&["--disable", i, "third"]);
    io("write 40M 64k");
    bm(&["--add", "-g", "512", "--disable", i, "merged"]);
    bm(&["--merge", "third", i, "merged"]);
    bm(&["--merge", "first", i, "merged"]);
    bm(&["--add", i, "cleared"]);
    io("write 50M 1M");
    bm(&["--clear", i, "cleared"]);
    bm(&["--enable", i, "second"]);
    io("write 60M 64k");
    let before = info_bitmaps(&img);
    assert_eq!(before.as_array().unwrap().len(), 5);

    let theirs = copy(&img, "q.qcow2");
    let mut p = Pair::new();
    p.open("n", &theirs, &img, false);
    let opened = p.same_bitmaps("n");
    // In use while open, on both.
    assert_eq!(info_bitmaps(&img), info_bitmaps(&theirs));
    assert!(
        info_bitmaps(&img)
            .as_array()
            .unwrap()
            .iter()
            .all(|b| b["flags"].as_array().unwrap().contains(&json!("in-use")))
    );
    p.attach("n");
    p.write("n", 2 * MIB, 65536);
    p.write("n", 61 * MIB, 512);
    let written = p.same_bitmaps("n");
    assert_ne!(opened, written);
    p.close();
    assert_eq!(info_bitmaps(&img), info_bitmaps(&theirs));
    assert_eq!(info_bitmaps(&img), before);
    assert_clean(&img);

    cross_check("n", &img, &theirs, &written, &[]);
}

#[test]
fn adding_persistent_bitmaps_is_refused_like_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let v3 = qcow2(d, "v3.qcow2", "64M", "");
    let v2 = qcow2(d, "v2.qcow2", "64M", "compat=0.10");
    let ro = qcow2(d, "ro.qcow2", "64M", "");
    let big = qcow2(d, "big.qcow2", "4T", "");
    let raw = d.join("r.raw");
    std::fs::File::create(&raw)
        .unwrap()
        .set_len(64 * MIB)
        .unwrap();
    let mut p = Pair::new();
    for (name, img, ro) in [
        ("q", &v3, false),
        ("v2", &v2, false),
        ("ro", &ro, true),
        ("big", &big, false),
    ] {
        let theirs = copy(img, &format!("q-{name}.qcow2"));
        p.open(name, &theirs, img, ro);
    }
    p.ok(
        "blockdev-add",
        json!({"driver": "raw", "node-name": "r",
               "file": {"driver": "file", "node-name": "rf", "filename": s(&raw)}}),
    );
    let add = |p: &mut Pair, node: &str, name: &str, extra: Value| {
        let mut a = json!({"node": node, "name": name, "persistent": true});
        for (k, v) in extra.as_object().unwrap() {
            a[k] = v.clone();
        }
        p.both("block-dirty-bitmap-add", a)
    };
    assert!(add(&mut p, "q", "b", json!({})).is_ok());
    assert_eq!(
        add(&mut p, "q", "b", json!({})).unwrap_err(),
        "GenericError: Bitmap already exists: b"
    );
    let too_long = "x".repeat(1024);
    assert!(
        add(&mut p, "q", &too_long, json!({}))
            .unwrap_err()
            .ends_with("': Name length exceeds maximum (1023 characters)")
    );
    assert_eq!(
        add(&mut p, "v2", "b", json!({})).unwrap_err(),
        "GenericError: Can't make bitmap 'b' persistent in 'v2': Cannot store dirty bitmaps in qcow2 v2 files"
    );
    for node in ["r", "rf"] {
        assert_eq!(
            add(&mut p, node, "b", json!({})).unwrap_err(),
            format!(
                "GenericError: Can't store persistent bitmaps to {node}: Operation not supported"
            )
        );
    }
    assert_eq!(
        add(&mut p, "big", "b", json!({"granularity": 512})).unwrap_err(),
        "GenericError: Can't make bitmap 'b' persistent in 'big': Too much space will be occupied by the bitmap. Use larger granularity"
    );
    assert!(add(&mut p, "big", "b", json!({})).is_ok());
    // QEMU accepts one on a read-only node, and loses it at close.
    assert!(add(&mut p, "ro", "b", json!({})).is_ok());
    assert!(add(&mut p, "q", "g31", json!({"granularity": 2147483648u64})).is_ok());
    for node in ["q", "v2", "ro", "big", "r"] {
        p.same_bitmaps(node);
    }
    // blockdev-del closes the node: stored (lost for the read-only one,
    // as QEMU loses it).
    for node in ["ro", "q", "big"] {
        p.ok("blockdev-del", json!({"node-name": node}));
    }
    assert_eq!(info_bitmaps(&v3).as_array().unwrap().len(), 2);
    assert_eq!(info_bitmaps(&v3), info_bitmaps(&d.join("q-q.qcow2")));
    p.close();
    assert_eq!(info_bitmaps(&ro), Value::Null);
    assert_eq!(info_bitmaps(&ro), info_bitmaps(&d.join("q-ro.qcow2")));
    assert_eq!(info_bitmaps(&big), info_bitmaps(&d.join("q-big.qcow2")));
    assert_eq!(info_bitmaps(&v3), info_bitmaps(&d.join("q-q.qcow2")));
    assert_clean(&v3);
    assert_clean(&big);
}

/// An image with two bitmaps recorded by QEMU: `first` (auto, 17 granules
/// dirty) and `second` (disabled, granularity 128 KiB).
fn image_with_bitmaps(dir: &Path) -> PathBuf {
    let img = qcow2(dir, "base.qcow2", "64M", "");
    tool("qemu-img", &["bitmap", "--add", s(&img), "first"]);
    tool(
        "qemu-img",
        &[
            "bitmap",
            "--add",
            "-g",
            "128k",
            "--disable",
            s(&img),
            "second",
        ],
    );
    tool(
        "qemu-io",
        &["-c", "write 0 1M", "-c", "write 10M 64k", s(&img)],
    );
    img
}

/// Commands on `first` and `second` that QEMU refuses or allows
/// depending on their state; both sides must answer alike.
fn exercise_states(p: &mut Pair, node: &str) -> Vec<Result<Value, String>> {
    let mut r = Vec::new();
    for cmd in [
        "block-dirty-bitmap-clear",
        "block-dirty-bitmap-enable",
        "block-dirty-bitmap-disable",
        "x-debug-block-dirty-bitmap-sha256",
    ] {
        for name in ["first", "second"] {
            r.push(p.both(cmd, json!({"node": node, "name": name})));
        }
    }
    r.push(p.both(
        "block-dirty-bitmap-merge",
        json!({"node": node, "target": "first", "bitmaps": ["second"]}),
    ));
    p.ok("block-dirty-bitmap-add", json!({"node": node, "name": "t"}));
    r.push(p.both(
        "block-dirty-bitmap-merge",
        json!({"node": node, "target": "t", "bitmaps": ["first"]}),
    ));
    r.push(p.both(
        "block-dirty-bitmap-add",
        json!({"node": node, "name": "first", "persistent": true}),
    ));
    p.same_bitmaps(node);
    r.push(p.both(
        "block-dirty-bitmap-remove",
        json!({"node": node, "name": "second"}),
    ));
    p.same_bitmaps(node);
    r
}

#[test]
fn readonly_bitmaps_match_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let img = image_with_bitmaps(dir.path());
    let theirs = copy(&img, "q.qcow2");
    let bytes = std::fs::read(&img).unwrap();
    let mut p = Pair::new();
    p.open("n", &theirs, &img, true);
    p.same_bitmaps("n");
    let r = exercise_states(&mut p, "n");
    assert_eq!(
        r[0],
        Err("GenericError: Bitmap 'first' is readonly and cannot be modified".into())
    );
    assert!(r[2].is_ok(), "enable of a readonly bitmap: {:?}", r[2]);
    p.close();
    // Nothing was written.
    assert_eq!(std::fs::read(&img).unwrap(), bytes);
}

/// Open `img` writable in a qemu-storage-daemon, then kill it: its
/// bitmaps are left in-use.
fn qemu_crash_with(img: &Path) {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("qmp.sock");
    let mut child = Command::new("qemu-storage-daemon")
        .arg("--chardev")
        .arg(format!("socket,id=m,path={},server=on,wait=off", s(&sock)))
        .args(["--monitor", "chardev=m"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut qmp = Qmp::connect(&sock);
    qmp.ok("blockdev-add", qcow2_node("n", img, false));
    qmp.ok(
        "block-dirty-bitmap-add",
        json!({"node": "n", "name": "lost", "persistent": true}),
    );
    child.kill().unwrap();
    child.wait().unwrap();
}

#[test]
fn inconsistent_bitmaps_match_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let img = image_with_bitmaps(dir.path());
    qemu_crash_with(&img);
    let flags: Vec<Value> = info_bitmaps(&img)
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["flags"].clone())
        .collect();
    // The bitmap added before the crash was in memory only.
    assert_eq!(flags, [json!(["in-use", "auto"]), json!(["in-use"])]);
    let theirs = copy(&img, "q.qcow2");
    let mut p = Pair::new();
    p.open("n", &theirs, &img, false);
    let state = p.same_bitmaps("n");
    assert_eq!(state["bitmaps"][0]["inconsistent"], true, "{state}");
    assert_eq!(state["bitmaps"][1]["recording"], false, "{state}");
    let r = exercise_states(&mut p, "n");
    assert_eq!(
        r[0],
        Err("GenericError: Bitmap 'first' is inconsistent and cannot be used".into())
    );
    assert!(r.last().unwrap().is_ok(), "remove: {:?}", r.last());
    // Removed at once from both images.
    assert_eq!(info_bitmaps(&img), info_bitmaps(&theirs));
    p.close();
    // What is left stays in-use: its bits are still unknown.
    assert_eq!(info_bitmaps(&img), info_bitmaps(&theirs));
    assert_eq!(
        info_bitmaps(&img),
        json!([{"flags": ["in-use", "auto"], "name": "first", "granularity": 65536}])
    );
    assert_clean(&img);
}

/// Run by [`crash_leaves_bitmaps_in_use`] in a child process: open
/// `BJ_CRASH_IMAGE` writable, add a bitmap, write, say `ready`, wait to
/// be killed.
#[test]
#[ignore = "a child process of crash_leaves_bitmaps_in_use"]
fn crash_child() {
    let Ok(img) = std::env::var("BJ_CRASH_IMAGE") else {
        return;
    };
    let mut o = Ours::new();
    o.cmd("blockdev-add", qcow2_node("n", Path::new(&img), false))
        .unwrap();
    o.cmd(
        "block-dirty-bitmap-add",
        json!({"node": "n", "name": "lost", "persistent": true}),
    )
    .unwrap();
    let blk = o.ctx.blk_new("n", BackendOptions::default()).unwrap();
    blk.pwrite(3 * MIB, &[1; 4096]).unwrap();
    println!("ready");
    loop {
        std::thread::sleep(std::time::Duration::from_secs(1));
    }
}

#[test]
fn crash_leaves_bitmaps_in_use() {
    let dir = tempfile::tempdir().unwrap();
    let img = image_with_bitmaps(dir.path());
    let mut child: Child = Command::new(std::env::current_exe().unwrap())
        .args(["--ignored", "--exact", "crash_child", "--nocapture"])
        .env("BJ_CRASH_IMAGE", &img)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let out = child.stdout.take().unwrap();
    let ready = BufReader::new(out)
        .lines()
        .map_while(Result::ok)
        .any(|l| l == "ready");
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(ready, "the child never got ready");

    // As after QEMU's crash: what was loaded is in-use, the new one lost.
    let crashed = copy(&img, "crashed.qcow2");
    let sub = dir.path().join("qemu");
    std::fs::create_dir(&sub).unwrap();
    let q_crashed = image_with_bitmaps(&sub);
    qemu_crash_with(&q_crashed);
    assert_eq!(info_bitmaps(&img), info_bitmaps(&q_crashed));
    // Nothing was allocated before the crash.
    assert_clean(&img);

    let mut p = Pair::new();
    p.open("n", &q_crashed, &crashed, false);
    let state = p.same_bitmaps("n");
    assert!(
        state["bitmaps"]
            .as_array()
            .unwrap()
            .iter()
            .all(|b| b["inconsistent"] == true),
        "{state}"
    );
    p.close();
}

/// Where the bitmaps extension and the first directory entry are.
fn layout(img: &Path) -> (u64, u64, u64) {
    let b = std::fs::read(img).unwrap();
    let be32 = |at: usize| u32::from_be_bytes(b[at..at + 4].try_into().unwrap()) as usize;
    let be64 = |at: usize| u64::from_be_bytes(b[at..at + 8].try_into().unwrap());
    let mut pos = be32(100);
    loop {
        let (kind, len) = (be32(pos), be32(pos + 4));
        assert_ne!(kind, 0, "no bitmaps extension");
        if kind == 0x2385_2875 {
            let dir = be64(pos + 24);
            return (pos as u64, dir, be64(dir as usize));
        }
        pos += 8 + len.next_multiple_of(8);
    }
}

#[test]
fn images_qemu_refuses_are_refused_alike_and_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let base = qcow2(dir.path(), "base.qcow2", "64M", "");
    tool("qemu-img", &["bitmap", "--add", s(&base), "first"]);
    tool("qemu-io", &["-c", "write 0 1M", s(&base)]);
    let (ext, dir_off, table) = layout(&base);
    let entry = {
        let f = std::fs::File::open(&base).unwrap();
        let mut b = [0u8; 8];
        f.read_exact_at(&mut b, table).unwrap();
        u64::from_be_bytes(b)
    };
    // (what, where, the bytes written there)
    let be32 = |v: u32| v.to_be_bytes().to_vec();
    let be64 = |v: u64| v.to_be_bytes().to_vec();
    let cases: Vec<(&str, u64, Vec<u8>)> = vec![
        ("unknown flag", dir_off + 12, be32(6)),
        ("reserved flag", dir_off + 12, be32(34)),
        ("unknown type", dir_off + 16, vec![2]),
        ("granularity 2^8", dir_off + 17, vec![8]),
        ("granularity 2^32", dir_off + 17, vec![32]),
        ("extension length", ext + 4, be32(16)),
        ("reserved field", ext + 12, be32(1)),
        ("no bitmaps", ext + 8, be32(0)),
        ("one bitmap missing", ext + 8, be32(2)),
        ("directory unaligned", ext + 24, be64(dir_off + 8)),
        ("directory too big", ext + 16, be64(1024 * 65535 + 8)),
        ("directory empty", ext + 16, be64(0)),
        ("table entry reserved bit", table, be64(entry | 2)),
        ("table entry unaligned", table, be64(entry + 512)),
        ("table size", dir_off + 8, be32(2)),
        ("table size 0", dir_off + 8, be32(0)),
        ("extra data", dir_off + 20, be32(8)),
        ("empty name", dir_off + 18, vec![0, 0]),
    ];

    let mut q = Daemon::start();
    let mut o = Ours::new();
    for (what, at, bytes) in cases {
        let img = copy(&base, "broken.qcow2");
        let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
        f.write_all_at(&bytes, at).unwrap();
        let bytes = std::fs::read(&img).unwrap();
        for ro in [false, true] {
            let theirs = q.cmd("blockdev-add", qcow2_node("n", &img, ro));
            let ours = o.cmd("blockdev-add", qcow2_node("n", &img, ro));
            assert!(theirs.is_err(), "{what}: QEMU opened it");
            assert_eq!(ours, theirs, "{what}");
            assert_eq!(std::fs::read(&img).unwrap(), bytes, "{what}: we wrote");
        }
    }
}

#[test]
fn stale_and_odd_extensions_match_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let base = qcow2(dir.path(), "base.qcow2", "64M", "");
    tool("qemu-img", &["bitmap", "--add", s(&base), "first"]);
    tool("qemu-io", &["-c", "write 0 1M", s(&base)]);
    let (_, dir_off, table) = layout(&base);
    // A program without bitmap support cleared the autoclear bit: QEMU
    // ignores the bitmaps and drops the extension when it writes; the
    // clusters leak.
    let stale = copy(&base, "stale.qcow2");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&stale)
        .unwrap()
        .write_all_at(&0u64.to_be_bytes(), 88)
        .unwrap();
    // A table entry saying "all ones" (QEMU reads it, never writes it).
    let ones = copy(&base, "ones.qcow2");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&ones)
        .unwrap()
        .write_all_at(&1u64.to_be_bytes(), table)
        .unwrap();
    // A bitmap in use whose table is broken: nobody reads its data.
    let in_use = copy(&base, "inuse.qcow2");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&in_use)
        .unwrap()
        .write_all_at(&3u32.to_be_bytes(), dir_off + 12)
        .unwrap();
    for img in [&stale, &ones, &in_use] {
        let theirs = copy(img, "q.qcow2");
        let mut p = Pair::new();
        p.open("n", &theirs, img, false);
        p.same_bitmaps("n");
        p.close();
        assert_eq!(
            info_bitmaps(img),
            info_bitmaps(&theirs),
            "{}",
            img.display()
        );
        let (ours, qemus) = (check(img), check(&theirs));
        assert_eq!(ours.0, qemus.0);
        assert_eq!(ours.1["leaks"], qemus.1["leaks"]);
        assert_eq!(ours.1["corruptions"], qemus.1["corruptions"]);
    }
}

#[test]
fn backing_layers_and_streams_keep_their_bitmaps() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let base = qcow2(d, "base.qcow2", "4M", "");
    tool("qemu-img", &["bitmap", "--add", s(&base), "b"]);
    tool("qemu-io", &["-c", "write -P 1 0 1M", s(&base)]);
    let top = d.join("top.qcow2");
    overlay(&top, &base, "qcow2");
    tool("qemu-img", &["bitmap", "--add", s(&top), "t"]);
    tool("qemu-io", &["-c", "write -P 2 2M 64k", s(&top)]);
    let base_listed = info_bitmaps(&base);
    let top_listed = info_bitmaps(&top);

    // The implicit backing layer has its bitmap, with QEMU's view of it.
    let (qbase, qtop) = (copy(&base, "qbase.qcow2"), d.join("qtop.qcow2"));
    overlay(&qtop, &qbase, "qcow2");
    tool("qemu-img", &["bitmap", "--add", s(&qtop), "t"]);
    tool("qemu-io", &["-c", "write -P 2 2M 64k", s(&qtop)]);
    let mut q = Daemon::start();
    let mut o = Ours::new();
    q.cmd("blockdev-add", qcow2_node("top", &qtop, false))
        .unwrap();
    o.cmd("blockdev-add", qcow2_node("top", &top, false))
        .unwrap();
    let backing = |side: &mut dyn Side| -> Value {
        let nodes = side.cmd("query-named-block-nodes", json!({})).unwrap();
        let b = nodes
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["drv"] == "qcow2" && n["file"].as_str().unwrap().ends_with("base.qcow2"))
            .unwrap()
            .clone();
        let name = b["node-name"].as_str().unwrap().to_string();
        json!({"bitmaps": b["dirty-bitmaps"], "sha256": hashes(side, &name)})
    };
    assert_eq!(backing(&mut o), backing(&mut q));
    assert_eq!(bitmaps(&mut o, "top"), bitmaps(&mut q, "top"));
    assert_eq!(hashes(&mut o, "top"), hashes(&mut q, "top"));

    // Stream the base into the top: the header is rewritten and imago
    // reopened under the bitmaps; they survive, valid.
    for side in [&mut q as &mut dyn Side, &mut o] {
        side.cmd("block-stream", json!({"job-id": "s", "device": "top"}))
            .unwrap();
        while side
            .event()
            .is_some_and(|e| e["event"] != "BLOCK_JOB_COMPLETED")
        {}
    }
    // QEMU's stream copies with copy-on-read writes that bypass dirty
    // tracking; ours go through the node and mark the copied megabyte too
    // (README: a larger next incremental backup, never a missed write).
    let (theirs, ours) = (bitmaps(&mut q, "top"), bitmaps(&mut o, "top"));
    assert_eq!(theirs[0]["count"], 65536);
    assert_eq!(ours[0]["count"], 65536 + MIB);
    drop(q);
    drop(o);
    assert_eq!(info_bitmaps(&top), top_listed);
    assert_eq!(info_bitmaps(&top), info_bitmaps(&qtop));
    assert_eq!(common::chain::backing_chain(&top), [None]);
    // Our implicit backing layer is writable (README): its bitmap was
    // in use while open and is stored back unchanged.
    assert_eq!(info_bitmaps(&base), base_listed);
    assert_clean(&top);
    assert_clean(&base);
}

#[test]
fn small_clusters_and_every_refcount_width() {
    let dir = tempfile::tempdir().unwrap();
    for (i, opts) in [
        "cluster_size=512",
        "cluster_size=512,refcount_bits=1",
        "cluster_size=512,refcount_bits=64",
        "cluster_size=2M,refcount_bits=8",
    ]
    .into_iter()
    .enumerate()
    {
        let img = qcow2(dir.path(), &format!("{i}.qcow2"), "64M", opts);
        // Data first, so that the bitmaps go where refcount blocks (and,
        // with 512-byte clusters, a larger refcount table) are missing.
        tool("qemu-io", &["-c", "write -P 3 0 12M", s(&img)]);
        let theirs = copy(&img, &format!("q{i}.qcow2"));
        let mut p = Pair::new();
        p.open("n", &theirs, &img, false);
        p.attach("n");
        for (k, g) in [512u64, 4096, 65536].into_iter().enumerate() {
            p.ok(
                "block-dirty-bitmap-add",
                json!({"node": "n", "name": format!("b{k}"), "persistent": true,
                       "granularity": g}),
            );
        }
        for off in (0..64).step_by(3) {
            p.write("n", off * MIB + 512 * off, 1024);
        }
        let state = p.same_bitmaps("n");
        p.close();
        assert_clean(&img);
        assert_eq!(info_bitmaps(&img), info_bitmaps(&theirs), "{opts}");
        cross_check(opts, &img, &theirs, &state, &[]);
        assert_clean(&img);
    }
}

/// Our cluster allocator alone, judged by `qemu-img check`: clusters
/// allocated and counted but referenced by nothing are exactly the leaks
/// it reports, with no corruption, also where refcount blocks are missing
/// and the refcount table must grow; freed again, the image is clean.
#[test]
fn allocator_grows_refcount_structures() {
    use blockjob::block::qcow2::{header::read_node_header, refcount::Refcounts};
    let dir = tempfile::tempdir().unwrap();
    // 512-byte clusters: a table cluster has 64 entries, so it covers
    // 2 MiB with 64-bit refcounts, 8 MiB with 16-bit ones (the table must
    // grow for our 20 MiB), 128 MiB with 1-bit ones (new blocks only).
    for (opts, grows) in [
        ("cluster_size=512,refcount_bits=64", true),
        ("cluster_size=512,refcount_bits=1", false),
        ("cluster_size=512", true),
    ] {
        let img = qcow2(dir.path(), "alloc.qcow2", "64M", opts);
        tool("qemu-io", &["-c", "write -P 7 0 1M", s(&img)]);
        let ctx = blockjob::Context::new();
        let file = ctx
            .blockdev_add(&json!({"driver": "file", "node-name": "f", "filename": s(&img)}))
            .unwrap();
        let hdr = read_node_header(&file).unwrap();
        let mut rc = Refcounts::load(&file, &hdr).unwrap();
        let mut got = Vec::new();
        // Single clusters, and runs of a few (tables, directories).
        for i in 0..20000u64 {
            let n = 1 + i % 3;
            got.push((rc.alloc(n).unwrap(), n));
        }
        // Written, as their users write them (qemu-img check looks at the
        // clusters inside the file only).
        for (off, n) in &got {
            file.pwrite(*off, &vec![0xa5; *n as usize * 512]).unwrap();
        }
        rc.commit().unwrap();
        let grown = read_node_header(&file).unwrap();
        assert_eq!(
            grown.refcount_table_clusters > hdr.refcount_table_clusters,
            grows,
            "{opts}: table growth"
        );
        let (code, v) = check(&img);
        let allocated: u64 = got.iter().map(|(_, n)| n).sum();
        assert_eq!(code, 3, "{opts}: {v}");
        assert_eq!(v["leaks"], allocated, "{opts}: {v}");
        assert!(v.get("corruptions").is_none(), "{opts}: {v}");
        // Runs do not overlap.
        got.sort();
        for w in got.windows(2) {
            assert!(w[0].0 + w[0].1 * 512 <= w[1].0, "{opts}: overlap {w:?}");
        }
        for (off, n) in &got {
            rc.free(*off, n * 512).unwrap();
        }
        rc.commit().unwrap();
        assert_clean(&img);
        drop(ctx);
        // QEMU still reads the data and allocates fine around ours.
        tool(
            "qemu-io",
            &["-c", "write -P 8 2M 4M", "-c", "read -P 7 0 1M", s(&img)],
        );
        assert_clean(&img);
    }
}
