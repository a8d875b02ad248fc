//! Running out of space for real: a target (or a commit's base) on a small
//! tmpfs that a filler file leaves too little room on. Mirror, backup and
//! commit (intermediate, and active through the command), through the `blockjob` command and through `blockjob daemon`
//! over QMP: with `enospc`/`stop` the job pauses with iostatus `nospace`
//! after `BLOCK_JOB_ERROR` (write, stop); the filler is deleted, the job
//! resumes and the result is identical to the source. With `report` the
//! job fails with "No space left on device" and the source is untouched.
//! The daemon's events, iostatus and progress at the stop are compared
//! with qemu-storage-daemon's on the same kind of tmpfs.
//!
//! Needs root (mount); each tmpfs is unmounted when the test ends, also
//! on failure.

#[path = "../../tests/common/mod.rs"]
mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::guest::drop_drain_pair;
use common::qmp::{Qmp, summarize};
use serde_json::{Value, json};

const OURS: &str = env!("CARGO_BIN_EXE_blockjob");
const MIB: u64 = 1 << 20;
/// Source size; the tmpfs leaves room for two thirds of it.
const SRC_MIB: u64 = 48;
const FS_MIB: u64 = 64;
const FILLER_MIB: u64 = 32;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A tmpfs of `size` MiB mounted on a fresh directory, unmounted on drop.
struct Tmpfs {
    dir: PathBuf,
    _parent: tempfile::TempDir,
}

impl Tmpfs {
    fn new(mib: u64) -> Tmpfs {
        let parent = tempfile::tempdir().unwrap();
        let dir = parent.path().join("fs");
        std::fs::create_dir(&dir).unwrap();
        let out = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={mib}M"),
                "tmpfs",
                s(&dir),
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "mount tmpfs (these tests need root): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs {
            dir,
            _parent: parent,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// A file of `mib` MiB of written data (tmpfs allocates it).
    fn fill(&self, mib: u64) -> PathBuf {
        let p = self.path("filler");
        let mut f = std::fs::File::create(&p).unwrap();
        let chunk = vec![0x5au8; MIB as usize];
        for _ in 0..mib {
            f.write_all(&chunk).unwrap();
        }
        p
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(&self.dir)
            .status()
            .is_ok_and(|st| st.success());
        if !ok {
            // Still in use (a child of a failed test): detach it anyway.
            let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
        }
    }
}

/// `mib` MiB of data that is nowhere zero (so every byte is copied).
fn source(path: &Path, mib: u64) -> Vec<u8> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let data: Vec<u8> = (0..mib * MIB / 8)
        .flat_map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x | 0x0101_0101_0101_0101).to_le_bytes()
        })
        .collect();
    std::fs::write(path, &data).unwrap();
    data
}

fn qemu_img(args: &[&str]) -> std::process::Output {
    common::require_tool("qemu-img");
    Command::new("qemu-img").args(args).output().unwrap()
}

fn identical(a: &Path, b: &Path) -> bool {
    let o = qemu_img(&["compare", "-U", s(a), s(b)]);
    o.status.success()
}

/// Collapse runs of the same event (how many requests were in flight when
/// the space ran out is timing; that each failed is not).
fn collapse(evs: Vec<String>) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for e in evs {
        if out.last() != Some(&e) || !e.starts_with("ERR") {
            out.push(e);
        }
    }
    out
}

// ---- the command ---------------------------------------------------------

struct CliRun {
    events: Vec<String>,
    status: std::process::ExitStatus,
    stderr: String,
}

/// Run `blockjob ARGS --events`; at the first `BLOCK_JOB_ERROR` with action
/// stop, delete `filler` (the command resumes after `--resume-delay`).
fn cli(args: &[&str], filler: &Path) -> CliRun {
    let mut child = Command::new(OURS)
        .args(args)
        .arg("--events")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = child.stderr.take().unwrap();
    let err_thread = std::thread::spawn(move || {
        let mut v = String::new();
        let _ = err.read_to_string(&mut v);
        v
    });
    // A watchdog: a hung command is killed, so the read below ends.
    let pid = child.id();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let watchdog = std::thread::spawn(move || {
        if done_rx.recv_timeout(Duration::from_secs(90)).is_err() {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
        }
    });
    let mut events = Vec::new();
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        let line = line.unwrap();
        let ev: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
        if ev["event"] == "BLOCK_JOB_ERROR" && ev["data"]["action"] == "stop" && filler.exists() {
            std::fs::remove_file(filler).unwrap();
        }
        events.push(summarize(&ev));
    }
    let status = child.wait().unwrap();
    let _ = done_tx.send(());
    watchdog.join().unwrap();
    CliRun {
        events: collapse(events),
        status,
        stderr: err_thread.join().unwrap(),
    }
}

fn strs(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}

#[test]
fn cli_mirror_stops_when_full_and_finishes_after_space_is_freed() {
    let work = tempfile::tempdir().unwrap();
    let fs = Tmpfs::new(FS_MIB);
    let src = work.path().join("src.raw");
    source(&src, SRC_MIB);
    let filler = fs.fill(FILLER_MIB);
    let dst = fs.path("dst.raw");
    let r = cli(
        &[
            "mirror",
            s(&src),
            s(&dst),
            "--create",
            "--on-target-error",
            "enospc",
            "--max-resumes",
            "1",
        ],
        &filler,
    );
    assert!(r.status.success(), "{}", r.stderr);
    assert_eq!(
        r.events,
        strs(&[
            "JSC:created",
            "JSC:running",
            "ERR(write,stop)",
            "JSC:paused",
            "JSC:running",
            "JSC:ready",
            "READY",
            "JSC:waiting",
            "JSC:pending",
            "COMPLETED",
            "JSC:concluded",
            "JSC:null",
        ])
    );
    assert!(identical(&src, &dst), "target differs from the source");
}

#[test]
fn cli_backup_stops_when_full_and_finishes_after_space_is_freed() {
    let work = tempfile::tempdir().unwrap();
    let fs = Tmpfs::new(FS_MIB);
    let src = work.path().join("src.raw");
    source(&src, SRC_MIB);
    let filler = fs.fill(FILLER_MIB);
    let dst = fs.path("backup.qcow2");
    let r = cli(
        &[
            "backup",
            s(&src),
            s(&dst),
            "--on-target-error",
            "stop",
            "--max-resumes",
            "1",
        ],
        &filler,
    );
    assert!(r.status.success(), "{}", r.stderr);
    assert_eq!(
        r.events,
        strs(&[
            "JSC:created",
            "JSC:running",
            "ERR(write,stop)",
            "JSC:paused",
            "JSC:running",
            "JSC:waiting",
            "JSC:pending",
            "COMPLETED",
            "JSC:concluded",
            "JSC:null",
        ])
    );
    assert!(identical(&src, &dst), "backup differs from the source");
    let check = qemu_img(&["check", "-U", s(&dst)]);
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stdout)
    );
}

/// base (qcow2, empty, 40 MiB, on `fs`) <- mid (40 MiB of data) <- top
/// (empty); mid and top in `dir`. Returns (base, mid, top).
fn commit_chain(dir: &Path, fs: &Tmpfs) -> (PathBuf, PathBuf, PathBuf) {
    let (base, mid, top) = (
        fs.path("base.qcow2"),
        dir.join("mid.qcow2"),
        dir.join("top.qcow2"),
    );
    let ok = |o: std::process::Output| {
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr))
    };
    ok(qemu_img(&["create", "-q", "-f", "qcow2", s(&base), "40M"]));
    for (img, back) in [(&mid, &base), (&top, &mid)] {
        ok(qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            s(back),
            "-F",
            "qcow2",
            s(img),
        ]));
    }
    common::require_tool("qemu-io");
    let o = Command::new("qemu-io")
        .args(["-c", "write -P 7 0 40M", s(&mid)])
        .output()
        .unwrap();
    ok(o);
    // The guest's view before the commit, for the comparison after.
    ok(qemu_img(&[
        "convert",
        "-O",
        "raw",
        s(&top),
        s(&dir.join("view.raw")),
    ]));
    (base, mid, top)
}

#[test]
fn cli_commit_into_a_full_base_stops_and_finishes_after_space_is_freed() {
    let work = tempfile::tempdir().unwrap();
    let fs = Tmpfs::new(48);
    let (base, mid, top) = commit_chain(work.path(), &fs);
    let filler = fs.fill(24);
    let r = cli(
        &[
            "commit",
            s(&top),
            "--top",
            s(&mid),
            "--base",
            s(&base),
            "--on-error",
            "enospc",
            "--max-resumes",
            "1",
        ],
        &filler,
    );
    assert!(r.status.success(), "{}", r.stderr);
    assert_eq!(
        r.events,
        strs(&[
            "JSC:created",
            "JSC:running",
            "ERR(write,stop)",
            "JSC:paused",
            "JSC:running",
            "JSC:waiting",
            "JSC:pending",
            "COMPLETED",
            "JSC:concluded",
            "JSC:null",
        ])
    );
    // Base holds what top showed; top now backs onto base.
    let view = work.path().join("view.raw");
    assert!(
        identical(&view, &base),
        "base differs from the guest's view"
    );
    assert!(identical(&view, &top), "the guest's view changed");
    let info = qemu_img(&["info", "-U", "--output=json", s(&top)]);
    let info: Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(info["backing-filename"], json!(s(&base)));
}

/// Active commit (the mirror machinery, job type commit): everything
/// above base into base on the full tmpfs; completed at READY, the
/// guest view (the saved one) is base's.
#[test]
fn cli_active_commit_into_a_full_base_stops_and_finishes_after_space_is_freed() {
    let work = tempfile::tempdir().unwrap();
    let fs = Tmpfs::new(48);
    let (base, _mid, top) = commit_chain(work.path(), &fs);
    let filler = fs.fill(24);
    let r = cli(
        &[
            "commit",
            s(&top),
            "--base",
            s(&base),
            "--on-error",
            "enospc",
            "--max-resumes",
            "1",
        ],
        &filler,
    );
    assert!(r.status.success(), "{}", r.stderr);
    assert_eq!(
        r.events,
        strs(&[
            "JSC:created",
            "JSC:running",
            "ERR(write,stop)",
            "JSC:paused",
            "JSC:running",
            "JSC:ready",
            "READY",
            "JSC:waiting",
            "JSC:pending",
            "COMPLETED",
            "JSC:concluded",
            "JSC:null",
        ])
    );
    assert!(
        identical(&work.path().join("view.raw"), &base),
        "base differs from the guest's view"
    );
}

fn hash(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap()
}

#[test]
fn cli_report_fails_cleanly_and_leaves_the_source() {
    // Mirror and backup: the target fills, the command fails with QEMU's
    // text, the source is byte for byte what it was.
    for (cmd, extra) in [
        ("mirror", &["--create", "--on-target-error", "report"][..]),
        ("backup", &["--on-target-error", "report"][..]),
    ] {
        let work = tempfile::tempdir().unwrap();
        let fs = Tmpfs::new(FS_MIB);
        let src = work.path().join("src.raw");
        let before = source(&src, SRC_MIB);
        let filler = fs.fill(FILLER_MIB);
        let dst = fs.path("dst.img");
        let mut args = vec![cmd, s(&src), s(&dst)];
        args.extend_from_slice(extra);
        let r = cli(&args, &filler);
        assert_eq!(r.status.code(), Some(1), "{cmd}: {}", r.stderr);
        assert_eq!(
            r.stderr.lines().last(),
            Some("blockjob: No space left on device"),
            "{cmd}"
        );
        let evs = &r.events;
        assert_eq!(
            evs[..3],
            strs(&["JSC:created", "JSC:running", "ERR(write,report)"]),
            "{cmd}"
        );
        assert_eq!(
            evs[3..],
            strs(&[
                "JSC:aborting",
                "COMPLETED(No space left on device)",
                "JSC:concluded",
                "JSC:null"
            ]),
            "{cmd}"
        );
        assert!(hash(&src) == before, "{cmd}: the source changed");
        if cmd == "mirror" {
            assert!(!dst.exists(), "mirror --create removes its target");
        }
        assert!(filler.exists());
    }
}

#[test]
fn cli_commit_report_leaves_the_chain() {
    let work = tempfile::tempdir().unwrap();
    let fs = Tmpfs::new(48);
    let (base, mid, top) = commit_chain(work.path(), &fs);
    let filler = fs.fill(24);
    let (mid_before, top_before) = (hash(&mid), hash(&top));
    let r = cli(
        &[
            "commit",
            s(&top),
            "--top",
            s(&mid),
            "--base",
            s(&base),
            "--on-error",
            "report",
        ],
        &filler,
    );
    assert_eq!(r.status.code(), Some(1), "{}", r.stderr);
    assert_eq!(
        r.stderr.lines().last(),
        Some("blockjob: No space left on device")
    );
    assert_eq!(
        r.events,
        strs(&[
            "JSC:created",
            "JSC:running",
            "ERR(write,report)",
            "JSC:aborting",
            "COMPLETED(No space left on device)",
            "JSC:concluded",
            "JSC:null",
        ])
    );
    assert!(hash(&mid) == mid_before, "mid changed");
    assert!(hash(&top) == top_before, "top changed");
    let info = qemu_img(&["info", "-U", "--output=json", s(&top)]);
    let info: Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(info["backing-filename"], json!(s(&mid)), "top still on mid");
}

// ---- the daemon, and qemu-storage-daemon -------------------------------

/// Our daemon or qemu-storage-daemon with a monitor on a private socket;
/// killed on drop (its stderr printed if the test failed).
struct Daemon {
    child: Child,
    qsd: bool,
    stderr: PathBuf,
    qmp: Qmp,
}

impl Daemon {
    fn start(qsd: bool, dir: &Path) -> Daemon {
        let sock = dir.join("qmp.sock");
        let stderr = dir.join("daemon.stderr");
        let mut c = if qsd {
            common::require_tool("qemu-storage-daemon");
            Command::new("qemu-storage-daemon")
        } else {
            let mut c = Command::new(OURS);
            c.arg("daemon");
            c
        };
        let child = c
            .args([
                "--chardev",
                &format!("socket,id=m,path={},server=on,wait=off", sock.display()),
                "--monitor",
                "chardev=m",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .unwrap();
        let qmp = Qmp::connect(&sock);
        Daemon {
            child,
            qsd,
            stderr,
            qmp,
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "{}: status {:?}, stderr:\n{}",
                if self.qsd {
                    "qemu-storage-daemon"
                } else {
                    "blockjob daemon"
                },
                self.child.try_wait(),
                std::fs::read_to_string(&self.stderr).unwrap_or_default()
            );
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum JobKind {
    Mirror,
    Backup,
    Commit,
}

/// What one daemon did: the events (runs of errors collapsed, QEMU's
/// backup drain pair dropped; the completion with its offset and len), `query-block-jobs`' iostatus, status and
/// offset at the stop, and whether the result is the source's data (or,
/// for `report`, the source is untouched).
#[derive(Debug, PartialEq)]
struct Played {
    events: Vec<String>,
    at_stop: Option<(String, String, u64)>,
    result_ok: bool,
}

/// One job on one daemon against a full tmpfs.
fn play(qsd: bool, kind: JobKind, policy: &str) -> Played {
    let work = tempfile::tempdir().unwrap();
    let (fs, filler);
    let mut d;
    let (src, dst, before);
    match kind {
        JobKind::Mirror | JobKind::Backup => {
            fs = Tmpfs::new(FS_MIB);
            src = work.path().join("src.raw");
            before = source(&src, SRC_MIB);
            filler = fs.fill(FILLER_MIB);
            dst = fs.path("dst.raw");
            std::fs::File::create(&dst)
                .unwrap()
                .set_len(SRC_MIB * MIB)
                .unwrap();
            d = Daemon::start(qsd, work.path());
            d.qmp.ok(
                "blockdev-add",
                json!({"driver":"file","node-name":"src","filename":src}),
            );
            d.qmp.ok(
                "blockdev-add",
                json!({"driver":"file","node-name":"dst","filename":dst}),
            );
            let cmd = if kind == JobKind::Mirror {
                "blockdev-mirror"
            } else {
                "blockdev-backup"
            };
            d.qmp.ok(
                cmd,
                json!({"job-id":"j","device":"src","target":"dst","sync":"full",
                    "on-target-error":policy}),
            );
        }
        JobKind::Commit => {
            fs = Tmpfs::new(48);
            let (base, mid, top) = commit_chain(work.path(), &fs);
            filler = fs.fill(24);
            before = hash(&mid);
            d = Daemon::start(qsd, work.path());
            d.qmp.ok(
                "blockdev-add",
                json!({"driver":"qcow2","node-name":"top",
                    "file":{"driver":"file","filename":top}}),
            );
            d.qmp.ok(
                "block-commit",
                json!({"job-id":"j","device":"top","top":mid,"base":base,"on-error":policy}),
            );
            // The guest's view before; base must hold it after.
            (src, dst) = (work.path().join("view.raw"), base);
            let _ = (mid, top);
        }
    }
    let mut events = Vec::new();
    let mut at_stop = None;
    let mut stopped = false;
    loop {
        let ev = d
            .qmp
            .next_event(Duration::from_secs(60))
            .expect("an event within 60 s");
        let mut sum = summarize(&ev);
        if ev["event"] == "BLOCK_JOB_COMPLETED" {
            // Where a failed job got to is QEMU's too.
            sum = format!("{sum} {}/{}", ev["data"]["offset"], ev["data"]["len"]);
        }
        if ev["event"] == "BLOCK_JOB_ERROR" && ev["data"]["action"] == "stop" {
            stopped = true;
        }
        if sum == "JSC:paused" && stopped && at_stop.is_none() {
            let jobs = d.qmp.ok("query-block-jobs", json!({}));
            let j = &jobs[0];
            at_stop = Some((
                j["io-status"].as_str().unwrap_or("").to_string(),
                j["status"].as_str().unwrap_or("").to_string(),
                j["offset"].as_u64().unwrap_or(0),
            ));
            std::fs::remove_file(&filler).unwrap();
            d.qmp.ok("block-job-resume", json!({"device":"j"}));
        }
        if sum == "READY" {
            d.qmp.ok("block-job-complete", json!({"device":"j"}));
        }
        let null = sum == "JSC:null";
        events.push(sum);
        if null {
            break;
        }
    }
    let _ = d.qmp.execute("quit", json!({}));
    let deadline = Instant::now() + Duration::from_secs(10);
    while d.child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    drop(d);
    let mut events = collapse(events);
    drop_drain_pair(&mut events);
    let result_ok = if policy == "report" {
        let src_now = if kind == JobKind::Commit {
            hash(&work.path().join("mid.qcow2"))
        } else {
            hash(&src)
        };
        src_now == before
    } else {
        identical(&src, &dst)
    };
    drop(fs);
    Played {
        events,
        at_stop,
        result_ok,
    }
}

fn daemon_matches_qsd(kind: JobKind, policy: &str) {
    let ours = play(false, kind, policy);
    let qemu = play(true, kind, policy);
    assert_eq!(ours, qemu, "{kind:?} {policy}: ours (left) against QEMU");
    assert!(ours.result_ok, "{kind:?} {policy}: result");
    match policy {
        "report" => assert!(
            ours.events
                .iter()
                .any(|e| e.starts_with("COMPLETED(No space left on device) ")),
            "{:?}",
            ours.events
        ),
        _ => {
            let (io, status, _) = ours.at_stop.clone().expect("the job stopped");
            assert_eq!((io.as_str(), status.as_str()), ("nospace", "paused"));
            assert!(ours.events.contains(&"ERR(write,stop)".to_string()));
        }
    }
}

#[test]
fn daemon_mirror_enospc_matches_qsd() {
    daemon_matches_qsd(JobKind::Mirror, "enospc");
}

#[test]
fn daemon_backup_stop_matches_qsd() {
    daemon_matches_qsd(JobKind::Backup, "stop");
}

#[test]
fn daemon_commit_enospc_matches_qsd() {
    daemon_matches_qsd(JobKind::Commit, "enospc");
}

#[test]
fn daemon_report_matches_qsd() {
    for kind in [JobKind::Mirror, JobKind::Backup, JobKind::Commit] {
        daemon_matches_qsd(kind, "report");
    }
}
