//! Image locking against QEMU: the same graphs built on qemu-storage-daemon
//! and on `blockjob daemon` hold the same OFD lock bytes (read from
//! `/proc/locks`; NBD exports included), and QEMU's tools and ours refuse each other's
//! conflicting opens with QEMU's texts, both ways.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

struct Daemon {
    child: Child,
    r: BufReader<UnixStream>,
    w: UnixStream,
}

impl Daemon {
    fn start(ours: bool, dir: &Path, tag: &str) -> Daemon {
        let sock = dir.join(format!("{tag}.sock"));
        let _ = std::fs::remove_file(&sock);
        let mut cmd = if ours {
            let mut c = Command::new(env!("CARGO_BIN_EXE_blockjob"));
            c.arg("daemon");
            c
        } else {
            Command::new("qemu-storage-daemon")
        };
        let child = cmd
            .args([
                "--chardev",
                &format!("socket,id=m,path={},server=on,wait=off", sock.display()),
                "--monitor",
                "chardev=m",
            ])
            // Kept: a test that fails prints the daemon's stderr.
            .stderr(std::fs::File::create(dir.join(format!("{tag}.err"))).unwrap())
            .spawn()
            .expect("start daemon (apt-get install -y qemu-utils qemu-system-common)");
        let t = Instant::now();
        let s = loop {
            if let Ok(s) = UnixStream::connect(&sock) {
                break s;
            }
            assert!(t.elapsed() < Duration::from_secs(10), "daemon socket");
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut d = Daemon {
            child,
            r: BufReader::new(s.try_clone().unwrap()),
            w: s,
        };
        d.line();
        d.cmd("qmp_capabilities", json!({})).unwrap();
        d
    }

    fn line(&mut self) -> Value {
        let mut l = String::new();
        self.r.read_line(&mut l).unwrap();
        serde_json::from_str(&l).unwrap()
    }

    fn cmd(&mut self, c: &str, a: Value) -> Result<Value, String> {
        writeln!(self.w, "{}", json!({"execute": c, "arguments": a})).unwrap();
        loop {
            let v = self.line();
            if v.get("event").is_some() {
                continue;
            }
            return match v.get("error") {
                Some(e) => Err(e["desc"].as_str().unwrap().to_string()),
                None => Ok(v["return"].clone()),
            };
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn sh(c: &str) {
    let st = Command::new("sh")
        .args(["-c", c])
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(st.success(), "{c}");
}

/// The lock bytes (100..103, 200..203) held on `path` by anybody.
fn lock_bytes(path: &Path) -> Vec<u64> {
    let ino = std::fs::metadata(path).unwrap().ino();
    let mut out = std::collections::BTreeSet::new();
    for l in std::fs::read_to_string("/proc/locks").unwrap().lines() {
        let w: Vec<&str> = l.split_whitespace().collect();
        if w.len() < 8 || w[1] != "OFDLCK" {
            continue;
        }
        if w[5].rsplit(':').next().and_then(|i| i.parse::<u64>().ok()) != Some(ino) {
            continue;
        }
        let start: u64 = w[6].parse().unwrap();
        let end: u64 = if w[7] == "EOF" {
            300
        } else {
            w[7].parse().unwrap()
        };
        out.extend(start..=end.min(300));
    }
    out.into_iter().collect()
}

fn images(dir: &Path) {
    let d = dir.display();
    for f in std::fs::read_dir(dir).unwrap().flatten() {
        let p = f.path();
        if p.extension().is_some_and(|e| e == "qcow2" || e == "raw") {
            std::fs::remove_file(p).unwrap();
        }
    }
    sh(&format!(
        "qemu-img create -q -f raw {d}/a.raw 4M && qemu-io -f raw -c 'write -P 1 0 4M' {d}/a.raw"
    ));
    sh(&format!(
        "qemu-img create -q -f qcow2 {d}/base.qcow2 4M && qemu-io -c 'write -P 2 0 4M' {d}/base.qcow2"
    ));
    sh(&format!(
        "qemu-img create -q -f qcow2 -F qcow2 -b base.qcow2 {d}/mid.qcow2 && qemu-io -c 'write -P 3 0 2M' {d}/mid.qcow2"
    ));
    sh(&format!(
        "qemu-img create -q -f qcow2 -F qcow2 -b mid.qcow2 {d}/top.qcow2 && qemu-io -c 'write -P 4 0 1M' {d}/top.qcow2"
    ));
    sh(&format!("qemu-img create -q -f qcow2 {d}/tgt.qcow2 4M"));
    sh(&format!(
        "qemu-img create -q -f qcow2 {d}/b.qcow2 4M && qemu-io -c 'write -P 5 0 4M' {d}/b.qcow2"
    ));
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("bj-lock-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

const FILES: [&str; 6] = [
    "a.raw",
    "b.qcow2",
    "base.qcow2",
    "mid.qcow2",
    "top.qcow2",
    "tgt.qcow2",
];

/// Build `steps` on one daemon; the lock bytes per file while it runs.
fn held(ours: bool, dir: &Path, steps: &[(&str, Value)]) -> Vec<(String, Vec<u64>)> {
    images(dir);
    // The previous daemon's NBD socket, if it was killed while serving.
    let _ = std::fs::remove_file(dir.join("nbd.sock"));
    let mut d = Daemon::start(ours, dir, if ours { "ours" } else { "qsd" });
    for (c, a) in steps {
        if *c == "#wait" {
            // Until every job is gone (completed and dismissed).
            let t = Instant::now();
            while d.cmd("query-jobs", json!({})).unwrap() != json!([]) {
                assert!(t.elapsed() < Duration::from_secs(20), "jobs still there");
                std::thread::sleep(Duration::from_millis(20));
            }
            continue;
        }
        let mut a = a.clone();
        for k in ["top-node", "device"] {
            if a.get(k) != Some(&json!("#MID")) {
                continue;
            }
            let nodes = d.cmd("query-named-block-nodes", json!({})).unwrap();
            let mid = nodes
                .as_array()
                .unwrap()
                .iter()
                .find(|n| n["drv"] == "qcow2" && n["file"].as_str().unwrap().ends_with("mid.qcow2"))
                .unwrap()["node-name"]
                .clone();
            a[k] = mid;
        }
        d.cmd(c, a).unwrap_or_else(|e| panic!("{c}: {e}"));
    }
    std::thread::sleep(Duration::from_millis(100));
    FILES
        .iter()
        .map(|f| (f.to_string(), lock_bytes(&dir.join(f))))
        .collect()
}

#[test]
fn same_lock_bytes_as_qemu_storage_daemon() {
    let dir = tmp("oracle");
    let d = dir.display().to_string();
    let file = |n: &str| json!({"driver": "file", "filename": format!("{d}/{n}")});
    let q = |n: &str| json!({"driver": "qcow2", "node-name": n.split('.').next().unwrap(), "file": file(n)});
    let raw = |n: &str| json!({"driver": "raw", "node-name": "r", "file": file(n)});
    let add = |v: Value| ("blockdev-add", v);
    let nbd = json!({"addr": {"type": "unix", "data": {"path": format!("{d}/nbd.sock")}}});
    let export = |node: Value, name: &str, writable: bool| {
        vec![
            add(node),
            ("nbd-server-start", nbd.clone()),
            (
                "block-export-add",
                json!({"type": "nbd", "id": "e", "node-name": name, "writable": writable}),
            ),
        ]
    };
    let scenarios: Vec<(&str, Vec<(&str, Value)>)> = vec![
        (
            "file alone",
            vec![add(
                json!({"driver": "file", "node-name": "f", "filename": format!("{d}/a.raw")}),
            )],
        ),
        ("raw alone", vec![add(raw("a.raw"))]),
        (
            "raw offset",
            vec![add(
                json!({"driver": "raw", "node-name": "r", "offset": 512, "file": file("a.raw")}),
            )],
        ),
        ("qcow2 rw", vec![add(q("b.qcow2"))]),
        (
            "qcow2 ro",
            vec![add(
                json!({"driver": "qcow2", "node-name": "b", "read-only": true, "file": file("b.qcow2")}),
            )],
        ),
        (
            "qcow2 force-share",
            vec![add(
                json!({"driver": "qcow2", "node-name": "b", "read-only": true, "force-share": true, "file": file("b.qcow2")}),
            )],
        ),
        (
            "locking off",
            vec![add(
                json!({"driver": "qcow2", "node-name": "b", "file": {"driver": "file", "filename": format!("{d}/b.qcow2"), "locking": "off"}}),
            )],
        ),
        ("chain", vec![add(q("top.qcow2"))]),
        (
            "mirror",
            vec![
                add(q("b.qcow2")),
                add(q("tgt.qcow2")),
                (
                    "blockdev-mirror",
                    json!({"job-id": "j", "device": "b", "target": "tgt", "sync": "full", "speed": 1}),
                ),
            ],
        ),
        (
            "mirror raw source",
            vec![
                add(raw("a.raw")),
                add(q("tgt.qcow2")),
                (
                    "blockdev-mirror",
                    json!({"job-id": "j", "device": "r", "target": "tgt", "sync": "full", "speed": 1}),
                ),
            ],
        ),
        (
            "mirror raw target",
            vec![
                add(q("b.qcow2")),
                add(raw("a.raw")),
                (
                    "blockdev-mirror",
                    json!({"job-id": "j", "device": "b", "target": "r", "sync": "full", "speed": 1}),
                ),
            ],
        ),
        (
            "backup",
            vec![
                add(q("b.qcow2")),
                add(q("tgt.qcow2")),
                (
                    "blockdev-backup",
                    json!({"job-id": "j", "device": "b", "target": "tgt", "sync": "full", "speed": 1}),
                ),
            ],
        ),
        (
            "backup raw source",
            vec![
                add(raw("a.raw")),
                add(q("tgt.qcow2")),
                (
                    "blockdev-backup",
                    json!({"job-id": "j", "device": "r", "target": "tgt", "sync": "full", "speed": 1}),
                ),
            ],
        ),
        (
            "stream",
            vec![
                add(q("top.qcow2")),
                (
                    "block-stream",
                    json!({"job-id": "j", "device": "top", "speed": 1}),
                ),
            ],
        ),
        (
            "commit mid",
            vec![
                add(q("top.qcow2")),
                (
                    "block-commit",
                    json!({"job-id": "j", "device": "top", "top-node": "#MID", "speed": 1}),
                ),
            ],
        ),
        (
            "active commit",
            vec![
                add(q("top.qcow2")),
                (
                    "block-commit",
                    json!({"job-id": "j", "device": "top", "speed": 1}),
                ),
            ],
        ),
        // After the job: the base it wrote (and the top it streamed
        // into) is read-only again, as QEMU reopens it.
        (
            "commit mid, done",
            vec![
                add(q("top.qcow2")),
                (
                    "block-commit",
                    json!({"job-id": "j", "device": "top", "top-node": "#MID"}),
                ),
                ("#wait", json!({})),
            ],
        ),
        (
            "stream into mid, done",
            vec![
                add(q("top.qcow2")),
                ("block-stream", json!({"job-id": "j", "device": "#MID"})),
                ("#wait", json!({})),
            ],
        ),
        (
            "snapshot",
            vec![
                add(q("b.qcow2")),
                add(
                    json!({"driver": "qcow2", "node-name": "tgt", "backing": null, "file": file("tgt.qcow2")}),
                ),
                ("blockdev-snapshot", json!({"node": "b", "overlay": "tgt"})),
            ],
        ),
        (
            "blockdev-del",
            vec![
                add(q("b.qcow2")),
                ("blockdev-del", json!({"node-name": "b"})),
            ],
        ),
        (
            "NBD export writable on raw",
            export(raw("a.raw"), "r", true),
        ),
        (
            "NBD export read-only on raw",
            export(raw("a.raw"), "r", false),
        ),
        (
            "NBD export writable on qcow2",
            export(q("b.qcow2"), "b", true),
        ),
        (
            "NBD export read-only on qcow2",
            export(q("b.qcow2"), "b", false),
        ),
    ];
    let mut diffs = Vec::new();
    for (name, steps) in &scenarios {
        let theirs = held(false, &dir, steps);
        let ours = held(true, &dir, steps);
        if theirs != ours {
            diffs.push(format!("{name}: qsd {theirs:?}\n  ours {ours:?}"));
        }
    }
    assert!(diffs.is_empty(), "{}", diffs.join("\n"));
    // Something is locked at all (the comparison is not vacuous).
    let q = held(false, &dir, &scenarios[3].1);
    assert_eq!(q[1].1, vec![100, 101, 103, 201, 203]);
    // An export takes read (and write) and shares all but resize.
    let nbd = |name: &str| &scenarios.iter().find(|s| s.0 == name).unwrap().1;
    let e = held(false, &dir, nbd("NBD export writable on raw"));
    assert_eq!(e[0].1, vec![100, 101, 203]);
    let e = held(false, &dir, nbd("NBD export read-only on raw"));
    assert_eq!(e[0].1, vec![100, 203]);
    let _ = std::fs::remove_dir_all(&dir);
}

fn run(cmd: &str, args: &[&str]) -> (bool, String) {
    let o = Command::new(cmd).args(args).output().unwrap();
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// A tool's error lines without its program name prefix.
fn msg(stderr: &str) -> String {
    stderr
        .lines()
        .map(|l| {
            ["qemu-io: ", "qemu-img: ", "blockjob: "]
                .iter()
                .fold(l, |l, p| l.strip_prefix(p).unwrap_or(l))
                .to_string()
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn conflicting_opens_refused_both_ways() {
    let dir = tmp("cross");
    images(&dir);
    let img = dir.join("b.qcow2");
    let p = img.to_str().unwrap().to_string();
    let dst = dir.join("dst.qcow2");
    sh(&format!("qemu-img create -q -f qcow2 {} 4M", dst.display()));
    let hint = format!("Is another process using the image [{p}]?");
    let mut texts = Vec::new();
    for ours in [false, true] {
        let mut d = Daemon::start(ours, &dir, "holder");
        d.cmd(
            "blockdev-add",
            json!({"driver": "qcow2", "node-name": "b", "file": {"driver": "file", "filename": p}}),
        )
        .unwrap();
        let (ok, e) = run("qemu-io", &["-c", "write 0 4k", &p]);
        assert!(!ok);
        assert!(
            msg(&e).contains(&format!("Failed to get \"write\" lock\n{hint}")),
            "{e}"
        );
        let (ok, e) = run("qemu-img", &["info", &p]);
        assert!(!ok, "qemu-img info must be refused: {e}");
        assert!(
            msg(&e).contains(&format!("Failed to get shared \"write\" lock\n{hint}")),
            "{e}"
        );
        let (ok, _) = run("qemu-img", &["info", "-U", &p]);
        assert!(ok, "qemu-img info -U shares everything");
        // The exact texts of qemu-img's and our jobs' refusals, on the
        // held image and on a held chain (recorded with
        // qemu-storage-daemon holding them; the same with ours).
        let top = dir.join("top.qcow2").to_string_lossy().into_owned();
        d.cmd(
            "blockdev-add",
            json!({"driver": "qcow2", "node-name": "top", "file": {"driver": "file", "filename": top}}),
        )
        .unwrap();
        let top_hint = format!("Is another process using the image [{top}]?");
        let refused = |cmd: &str, args: &[&str], want: String| {
            let (ok, e) = run(cmd, args);
            assert!(!ok, "{cmd} {args:?} must be refused");
            assert_eq!(msg(&e).trim_end(), want, "{cmd} {args:?}");
            msg(&e)
        };
        let bj = env!("CARGO_BIN_EXE_blockjob");
        let write_lock = |hint: &str| format!("Failed to get \"write\" lock\n{hint}");
        let t = refused(
            "qemu-img",
            &["resize", &p, "8M"],
            format!("Could not open '{p}': {}", write_lock(&hint)),
        );
        texts.push(("resize", ours, t));
        let t = refused(
            "qemu-img",
            &["commit", &top],
            format!("Could not open '{top}': {}", write_lock(&top_hint)),
        );
        texts.push(("commit", ours, t));
        refused(bj, &["stream", &top], write_lock(&top_hint));
        refused(bj, &["commit", &top], write_lock(&top_hint));
        refused(
            bj,
            &["backup", &p, dst.to_str().unwrap()],
            write_lock(&hint),
        );
        d.cmd("blockdev-del", json!({"node-name": "top"})).unwrap();
        // Our CLI against the held image.
        let (ok, e) = run(
            env!("CARGO_BIN_EXE_blockjob"),
            &["mirror", &p, dst.to_str().unwrap()],
        );
        assert!(!ok, "blockjob mirror on a held image must be refused");
        // Refused with QEMU's text and hint (which permission is named
        // first depends on how the CLI opens its source).
        assert!(msg(&e).starts_with("Failed to get "), "{e}");
        assert!(msg(&e).ends_with(&format!(" lock\n{hint}")), "{e}");
        // A second daemon of the other kind.
        let mut other = Daemon::start(!ours, &dir, "second");
        let r = other.cmd(
            "blockdev-add",
            json!({"driver": "qcow2", "node-name": "b", "file": {"driver": "file", "filename": p}}),
        );
        let e = match r {
            Err(e) => e,
            // Seen once in CI, never reproduced: say whether the holder
            // was still running (QEMU itself sometimes dies) and what was
            // locked.
            Ok(v) => panic!(
                "holder ours={ours}: the second daemon opened the held image ({v}); \
                 lock bytes now: {:?}; holder exited: {:?}; holder's stderr: {:?}",
                lock_bytes(&img),
                d.child.try_wait(),
                std::fs::read_to_string(dir.join("holder.err")).unwrap_or_default()
            ),
        };
        texts.push(("blockdev-add", ours, e));
        drop(other);
        // Deleting the node releases every byte.
        d.cmd("blockdev-del", json!({"node-name": "b"})).unwrap();
        assert_eq!(
            lock_bytes(&img),
            Vec::<u64>::new(),
            "locks released on close"
        );
        let (ok, e) = run("qemu-io", &["-c", "write 0 4k", &p]);
        assert!(ok, "{e}");
    }
    // What QEMU's tools print is the same whichever daemon holds the image.
    for k in ["resize", "commit", "blockdev-add"] {
        let t: Vec<_> = texts.iter().filter(|t| t.0 == k).collect();
        assert_eq!(t[0].2, t[1].2, "{k}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Write permissions never work on a read-only node (QEMU's
/// `bdrv_node_refresh_perm`): a job's target, a copy-before-write target
/// and a writable export are refused with QEMU's texts, recorded from
/// qemu-storage-daemon and compared with ours.
#[test]
fn write_on_a_read_only_node_refused_as_qemu() {
    let dir = tmp("ro");
    images(&dir);
    let d = dir.display().to_string();
    let _ = std::fs::remove_file(dir.join("nbd.sock"));
    let steps: Vec<(&str, Value)> = vec![
        (
            "blockdev-add",
            json!({"driver": "qcow2", "node-name": "s", "file": {"driver": "file", "filename": format!("{d}/b.qcow2")}}),
        ),
        (
            "blockdev-add",
            json!({"driver": "qcow2", "node-name": "t", "read-only": true, "file": {"driver": "file", "filename": format!("{d}/tgt.qcow2")}}),
        ),
        (
            "blockdev-add",
            json!({"driver": "raw", "node-name": "r", "read-only": true, "file": {"driver": "file", "filename": format!("{d}/a.raw")}}),
        ),
        (
            "blockdev-mirror",
            json!({"job-id": "j", "device": "s", "target": "t", "sync": "full"}),
        ),
        (
            "blockdev-mirror",
            json!({"job-id": "j", "device": "s", "target": "r", "sync": "full"}),
        ),
        (
            "blockdev-backup",
            json!({"job-id": "j", "device": "s", "target": "t", "sync": "full"}),
        ),
        (
            "blockdev-backup",
            json!({"job-id": "j", "device": "s", "target": "r", "sync": "full"}),
        ),
        (
            "nbd-server-start",
            json!({"addr": {"type": "unix", "data": {"path": format!("{d}/nbd.sock")}}}),
        ),
        (
            "block-export-add",
            json!({"type": "nbd", "id": "e", "node-name": "r", "writable": true}),
        ),
        // Nothing was left behind: no job, no filter above s.
        ("query-jobs", json!({})),
    ];
    let mut results = Vec::new();
    for ours in [false, true] {
        let _ = std::fs::remove_file(dir.join("nbd.sock"));
        let mut dm = Daemon::start(ours, &dir, if ours { "ro-ours" } else { "ro-qsd" });
        let r: Vec<Result<Value, String>> =
            steps.iter().map(|(c, a)| dm.cmd(c, a.clone())).collect();
        results.push(r);
    }
    let want_err = |i: usize, text: &str| {
        assert_eq!(results[0][i], Err(text.to_string()), "qsd, step {i}");
    };
    want_err(3, "Block node is read-only");
    want_err(4, "Block node is read-only");
    want_err(5, "Could not create node: Block node is read-only");
    want_err(6, "Could not create node: Block node is read-only");
    want_err(8, "Cannot export read-only node as writable");
    assert_eq!(results[0][9], Ok(json!([])));
    assert_eq!(results[1], results[0], "ours vs qemu-storage-daemon");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A guest backend that asks write on a read-only node is refused the
/// same way (QEMU's `blk_insert_bs`); read only is fine.
#[test]
fn backend_asking_write_on_a_read_only_node_refused() {
    use blockjob::block::backend::BackendOptions;
    use blockjob::block::perm::Perms;
    let dir = tmp("ro-blk");
    images(&dir);
    let ctx = blockjob::Context::new();
    ctx.blockdev_add(
        &json!({"driver": "raw", "node-name": "r", "read-only": true,
        "file": {"driver": "file", "filename": dir.join("a.raw")}}),
    )
    .unwrap();
    let opts = |p: Perms| BackendOptions {
        perms: Some(p),
        ..Default::default()
    };
    let e = ctx
        .blk_new("r", opts(Perms::guest_device(false, false)))
        .unwrap_err();
    assert_eq!(e.message(), "Block node is read-only");
    // Nothing half-done: the file holds no lock bytes, and a reader fits.
    assert_eq!(lock_bytes(&dir.join("a.raw")), Vec::<u64>::new());
    let blk = ctx
        .blk_new("r", opts(Perms::guest_device(true, false)))
        .unwrap();
    // Consistent read held, write not shared (no share-rw).
    assert_eq!(lock_bytes(&dir.join("a.raw")), vec![100, 201]);
    drop(blk);
    drop(ctx);
    let _ = std::fs::remove_dir_all(&dir);
}
