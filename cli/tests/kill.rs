//! Process kills (issue #17, crash consistency): `kill -9` of `blockjob
//! stream|commit|mirror|backup` and of `blockjob daemon` at a seeded
//! random moment of each job, then the images are checked as a user
//! would after such a crash: `qemu-img check` finds no corruption (leaks
//! are allowed), the guest view is what it was, and the images open in
//! qemu-img and in our library alike. qemu-storage-daemon is killed the
//! same way and held to the same rules; where QEMU's images break, the
//! run is recorded (printed), not failed: ours must survive everything.
//!
//! The page cache survives a process kill, so what these runs find is
//! state a process keeps in memory and writes in the wrong order (qcow2
//! metadata, headers, bitmap flags), not lost device writes.
//!
//! Every run prints its seed; `KILL_SEED=N cargo test -p blockjob-cli
//! --test kill NAME -- --nocapture` repeats that run (the seed picks the
//! kill moment and, for the bitmap runs, the operations).

#[path = "../../tests/common/mod.rs"]
mod common;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, mpsc};
use std::time::{Duration, Instant};

use blockjob::block::backend::BackendOptions;
use common::chain::{s, tool};
use common::oracle::{Ours, Side as _};
use common::qmp::Qmp;
use serde_json::{Value, json};

const OURS: &str = env!("CARGO_BIN_EXE_blockjob");
const MIB: usize = 1 << 20;
const SIZE: usize = 16 * MIB;
/// Runs per job type of ours: half through the command, half through
/// the daemon.
const OURS_RUNS: u64 = 20;
/// Runs per job type of qemu-storage-daemon.
const QSD_RUNS: u64 = 5;
/// How long a job may take to start or a process to answer before the
/// test fails (a deadline for failures only).
const DEADLINE: Duration = Duration::from_secs(60);

/// splitmix64: a seed gives the same run again.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// The seeds of one side's runs: `KILL_SEED` alone, or `n` seeds from a
/// base that differs from one test run to the next (printed).
fn seeds(n: u64, what: &str) -> Vec<u64> {
    if let Ok(v) = std::env::var("KILL_SEED") {
        return vec![v.parse().expect("KILL_SEED is a number")];
    }
    let base = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    let mut r = Rng(base
        ^ what
            .bytes()
            .fold(0u64, |h, b| h.wrapping_mul(31).wrapping_add(b as u64)));
    (0..n).map(|_| r.next() >> 16).collect()
}

/// Who runs the job and gets killed.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Who {
    /// `blockjob stream|commit|mirror|backup`.
    Cli,
    /// `blockjob daemon`, driven over QMP.
    Daemon,
    /// qemu-storage-daemon, driven over the same QMP.
    Qsd,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    Stream,
    CommitIntermediate,
    CommitActive,
    MirrorReplaces,
    BackupFull,
    BackupIncremental,
}

impl Kind {
    /// `speed` in bytes per second: each job copies 8–14 MiB, so it runs
    /// for about half a second.
    fn speed(self) -> u64 {
        match self {
            Kind::Stream => 32 * MIB as u64,
            Kind::CommitIntermediate | Kind::BackupIncremental => 16 * MIB as u64,
            _ => 24 * MIB as u64,
        }
    }
}

fn qemu_img(args: &[&str]) -> std::process::Output {
    common::require_tool("qemu-img");
    Command::new("qemu-img").args(args).output().unwrap()
}

fn qemu_io(img: &Path, cmd: &str) {
    tool("qemu-io", &["-c", cmd, s(img)]);
}

fn create(img: &Path, backing: Option<&str>) {
    let mut a = vec!["create", "-q", "-f", "qcow2"];
    if let Some(b) = backing {
        a.extend(["-b", b, "-F", "qcow2"]);
    }
    a.extend([s(img), "16M"]);
    tool("qemu-img", &a);
}

/// The images of one job type, made by QEMU's tools; backing names are
/// relative, so a copy of the directory is the same chain.
fn template(kind: Kind) -> tempfile::TempDir {
    let t = tempfile::tempdir().unwrap();
    let p = |n: &str| t.path().join(n);
    match kind {
        Kind::Stream | Kind::CommitIntermediate | Kind::CommitActive => {
            create(&p("base.qcow2"), None);
            create(&p("mid.qcow2"), Some("base.qcow2"));
            create(&p("top.qcow2"), Some("mid.qcow2"));
            qemu_io(&p("base.qcow2"), "write -P 1 0 12M");
            for i in (0..16).step_by(2) {
                qemu_io(&p("mid.qcow2"), &format!("write -P 2 {i}M 1M"));
            }
            qemu_io(&p("top.qcow2"), "write -P 3 5M 1M");
            qemu_io(&p("top.qcow2"), "write -P 3 13M 1M");
        }
        Kind::MirrorReplaces | Kind::BackupFull => {
            create(&p("disk.qcow2"), None);
            qemu_io(&p("disk.qcow2"), "write -P 4 0 12M");
            create(&p("tgt.qcow2"), None);
        }
        Kind::BackupIncremental => {
            create(&p("disk.qcow2"), None);
            qemu_io(&p("disk.qcow2"), "write -P 4 0 12M");
            tool(
                "qemu-img",
                &[
                    "convert",
                    "-O",
                    "qcow2",
                    s(&p("disk.qcow2")),
                    s(&p("full.qcow2")),
                ],
            );
            tool(
                "qemu-img",
                &["bitmap", "--add", s(&p("disk.qcow2")), "nightly"],
            );
            // 8 MiB the bitmap marks: what the incremental backup copies.
            for i in (0..16).step_by(2) {
                qemu_io(&p("disk.qcow2"), &format!("write -P 5 {i}M 1M"));
            }
            create(&p("tgt.qcow2"), Some("full.qcow2"));
        }
    }
    t
}

fn copy_dir(from: &Path, to: &Path) {
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

/// The guest view of an image (qemu-img's reading), or why it failed.
fn flat(img: &Path) -> Result<Vec<u8>, String> {
    let out = img.with_extension("flat");
    let o = qemu_img(&["convert", "-O", "raw", s(img), s(&out)]);
    if !o.status.success() {
        return Err(format!(
            "qemu-img convert {}: {}",
            img.display(),
            String::from_utf8_lossy(&o.stderr)
        ));
    }
    let v = std::fs::read(&out).unwrap();
    std::fs::remove_file(out).unwrap();
    Ok(v)
}

/// `qemu-img check`: 0 (clean) or 3 (leaked clusters only).
fn check(img: &Path) -> Result<(), String> {
    let o = qemu_img(&["check", s(img)]);
    match o.status.code() {
        Some(0 | 3) => Ok(()),
        c => Err(format!(
            "qemu-img check {}: exit {c:?}\n{}{}",
            img.display(),
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )),
    }
}

/// `qemu-img info`'s bitmaps of an image: name -> flags.
fn bitmaps(img: &Path) -> Vec<(String, Vec<String>)> {
    let info: Value =
        serde_json::from_str(&tool("qemu-img", &["info", "--output=json", s(img)])).unwrap();
    let Some(list) = info["format-specific"]["data"]["bitmaps"].as_array() else {
        return Vec::new();
    };
    list.iter()
        .map(|b| {
            let flags = b["flags"].as_array().unwrap().iter();
            (
                b["name"].as_str().unwrap().to_string(),
                flags.map(|f| f.as_str().unwrap().to_string()).collect(),
            )
        })
        .collect()
}

/// Persistent bitmaps as our library shows them: name, `inconsistent`.
type OurBitmaps = Vec<(String, bool)>;

/// Open `img` (with its chain) read-only through our library: its guest
/// view, and its persistent bitmaps' names with `inconsistent`.
fn ours_open(img: &Path) -> Result<(Vec<u8>, OurBitmaps), String> {
    let mut o = Ours::new();
    o.cmd(
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "n", "read-only": true,
               "file": {"driver": "file", "filename": img}}),
    )?;
    let blk = o
        .ctx
        .blk_new("n", BackendOptions::default())
        .map_err(|e| e.to_string())?;
    let mut view = vec![0u8; blk.len().map_err(|e| e.to_string())? as usize];
    for (i, c) in view.chunks_mut(MIB).enumerate() {
        blk.pread((i * MIB) as u64, c)
            .map_err(|e| format!("read at {} MiB: {e:?}", i))?;
    }
    drop(blk);
    let nodes = o.cmd("query-named-block-nodes", json!({"flat": true}))?;
    let node = nodes
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node-name"] == "n")
        .cloned()
        .unwrap_or_default();
    let bms = node["dirty-bitmaps"]
        .as_array()
        .map(|l| {
            l.iter()
                .filter(|b| b["persistent"] == true)
                .map(|b| {
                    (
                        b["name"].as_str().unwrap_or("").to_string(),
                        b["inconsistent"] == true,
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    Ok((view, bms))
}

/// The image opens in qemu-img and in our library, which read the same
/// guest view: that view. Bitmaps in use at the crash are inconsistent
/// in our reading exactly where qemu-img shows `in-use`.
fn opens_alike(img: &Path) -> Result<Vec<u8>, String> {
    let theirs = flat(img)?;
    let (ours, our_bitmaps) =
        ours_open(img).map_err(|e| format!("ours: {}: {e}", img.display()))?;
    if ours != theirs {
        return Err(format!(
            "{}: our library reads another guest view than qemu-img",
            img.display()
        ));
    }
    let mut expect: Vec<(String, bool)> = bitmaps(img)
        .into_iter()
        .map(|(n, f)| (n, f.iter().any(|x| x == "in-use")))
        .collect();
    let mut got = our_bitmaps;
    expect.sort();
    got.sort();
    if got != expect {
        return Err(format!(
            "{}: our bitmaps (name, inconsistent) {got:?}, qemu-img's {expect:?}",
            img.display()
        ));
    }
    Ok(theirs)
}

fn same(what: &str, got: &[u8], want: &[u8]) -> Result<(), String> {
    if got == want {
        return Ok(());
    }
    let at = got.iter().zip(want).position(|(a, b)| a != b);
    Err(format!(
        "{what} changed (first difference at byte {at:?}, lengths {} / {})",
        got.len(),
        want.len()
    ))
}

/// What the events before the kill said about the job.
#[derive(Debug, Default, Clone, Copy)]
struct Seen {
    running: bool,
    ready: bool,
    /// BLOCK_JOB_COMPLETED without an error.
    completed: bool,
    /// COMPLETED or CANCELLED: the job had ended.
    ended: bool,
    /// Event timestamps (s): the first `running`, and the end.
    running_at: Option<f64>,
    ended_at: Option<f64>,
}

impl Seen {
    fn note(&mut self, ev: &Value) {
        let ts = ev["timestamp"]["seconds"].as_f64().unwrap_or(0.0)
            + ev["timestamp"]["microseconds"].as_f64().unwrap_or(0.0) / 1e6;
        match ev["event"].as_str().unwrap_or("") {
            "JOB_STATUS_CHANGE" if ev["data"]["status"] == "running" => {
                self.running = true;
                self.running_at.get_or_insert(ts);
            }
            "BLOCK_JOB_READY" => self.ready = true,
            "BLOCK_JOB_COMPLETED" => {
                self.ended = true;
                self.ended_at = Some(ts);
                self.completed = ev["data"]["error"].is_null();
            }
            "BLOCK_JOB_CANCELLED" => {
                self.ended = true;
                self.ended_at = Some(ts);
            }
            _ => {}
        }
    }

    /// How long the job ran, from its events.
    fn ran_for(&self) -> Option<Duration> {
        let (a, b) = (self.running_at?, self.ended_at?);
        (b >= a).then(|| Duration::from_secs_f64(b - a))
    }
    /// The kill landed while the job was running.
    fn mid_job(&self) -> bool {
        self.running && !self.ended
    }
}

/// The seeded kill moment after the job started: up to 1.15 times its
/// length, so that most kills land mid-job and some at its end. Ours: the
/// length measured by an uninterrupted run just before (`measured`; how
/// much the rate limit's first slice lets through varies with the load).
/// QEMU's rate limit lets a job run ahead of `speed` (its stream copies
/// 13 MiB at 32 MiB/s in about 0.3 s): its window is 0.8 times the
/// nominal length.
fn delay(kind: Kind, who: Who, seed: u64, measured: Option<Duration>) -> Duration {
    let fraction = Rng(seed).below(1000) as f64 / 1000.0;
    if let Some(m) = measured {
        return m.mul_f64(1.15 * fraction);
    }
    let bytes = match kind {
        Kind::Stream => 14 * MIB,
        Kind::CommitActive => 10 * MIB,
        Kind::MirrorReplaces | Kind::BackupFull => 12 * MIB,
        Kind::CommitIntermediate | Kind::BackupIncremental => 8 * MIB,
    } as f64;
    let nominal = bytes / kind.speed() as f64;
    let window = if who == Who::Qsd { 0.8 } else { 1.3 };
    Duration::from_secs_f64(nominal * window * fraction)
}

fn stderr_of(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("stderr")).unwrap_or_default()
}

/// A child process, SIGKILLed and reaped at the latest when dropped (a
/// run that fails midway leaves no process behind).
struct Proc(Child);

impl Proc {
    fn kill(&mut self) {
        // SIGKILL (a no-op on a process that has exited but is not reaped).
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `blockjob COMMAND …` on the run's images, killed `delay` after the
/// job started running.
fn run_cli(kind: Kind, d: &Path, delay: Duration) -> Seen {
    let p = |n: &str| d.join(n).to_str().unwrap().to_string();
    let speed = kind.speed().to_string();
    let mut args: Vec<String> = match kind {
        Kind::Stream => vec!["stream".into(), p("top.qcow2")],
        Kind::CommitIntermediate => {
            vec![
                "commit".into(),
                p("top.qcow2"),
                "--top".into(),
                p("mid.qcow2"),
            ]
        }
        Kind::CommitActive => vec!["commit".into(), p("top.qcow2")],
        Kind::MirrorReplaces => vec![
            "mirror".into(),
            format!("json:{}", source_graph(d)),
            p("tgt.qcow2"),
            "--target-format".into(),
            "qcow2".into(),
            "--replaces".into(),
            "disk".into(),
        ],
        Kind::BackupFull => {
            // The command creates its target.
            std::fs::remove_file(d.join("tgt.qcow2")).unwrap();
            vec![
                "backup".into(),
                p("disk.qcow2"),
                p("tgt.qcow2"),
                "--new-bitmap".into(),
                "nightly".into(),
            ]
        }
        Kind::BackupIncremental => {
            std::fs::remove_file(d.join("tgt.qcow2")).unwrap();
            vec![
                "backup".into(),
                p("disk.qcow2"),
                p("tgt.qcow2"),
                "--sync".into(),
                "incremental".into(),
                "--bitmap".into(),
                "nightly".into(),
                "--backing".into(),
                p("full.qcow2"),
            ]
        }
    };
    args.extend(["--speed".into(), speed, "--events".into(), "-q".into()]);
    let mut child = Proc(
        Command::new(OURS)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(d.join("stderr")).unwrap())
            .spawn()
            .unwrap(),
    );
    let (tx, rx) = mpsc::channel::<Value>();
    let out = child.0.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if let Ok(v) = serde_json::from_str::<Value>(&line) {
                let _ = tx.send(v);
            }
        }
    });
    let mut seen = Seen::default();
    let start = Instant::now();
    while !seen.running {
        match rx.recv_timeout(DEADLINE.saturating_sub(start.elapsed())) {
            Ok(ev) => seen.note(&ev),
            Err(e) => {
                child.kill();
                panic!(
                    "blockjob {args:?}: no running job ({e}); stderr:\n{}",
                    stderr_of(d)
                );
            }
        }
    }
    // The seeded moment: the time is the point here, not a condition
    // (a command that already ended is not waited for).
    let t0 = Instant::now();
    while t0.elapsed() < delay && matches!(child.0.try_wait(), Ok(None)) {
        // (saturating: the delay may pass between the check and here)
        std::thread::sleep(
            delay
                .saturating_sub(t0.elapsed())
                .min(Duration::from_millis(2)),
        );
    }
    child.kill();
    reader.join().unwrap();
    // Every event the command printed before it died.
    for ev in rx.try_iter() {
        seen.note(&ev);
    }
    seen
}

/// The mirror's source: blkdebug over the qcow2 disk, so that `replaces`
/// names a node below the device.
fn source_graph(d: &Path) -> Value {
    json!({"driver": "blkdebug", "node-name": "dbg",
           "image": qcow2("disk", &d.join("disk.qcow2"))})
}

fn qcow2(name: &str, img: &Path) -> Value {
    json!({"driver": "qcow2", "node-name": name,
           "file": {"driver": "file", "filename": img}})
}

/// Start `blockjob daemon` or qemu-storage-daemon with a QMP monitor in
/// `d`.
fn daemon(who: Who, d: &Path) -> (Proc, Qmp) {
    let sock = d.join("qmp.sock");
    let mut c = if who == Who::Qsd {
        common::require_tool("qemu-storage-daemon");
        Command::new("qemu-storage-daemon")
    } else {
        let mut c = Command::new(OURS);
        c.arg("daemon");
        c
    };
    let child = Proc(
        c.arg("--chardev")
            .arg(format!("socket,id=m,path={},server=on,wait=off", s(&sock)))
            .args(["--monitor", "chardev=m"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(d.join("stderr")).unwrap())
            .spawn()
            .unwrap(),
    );
    // (Killed by the drop of `child` if the connection fails.)
    let q = Qmp::connect(&sock);
    (child, q)
}

/// The same job over QMP, killed `delay` after it started running, or
/// (`None`) as soon as it says it ended; at READY the job is completed,
/// as the command does.
fn run_daemon(kind: Kind, who: Who, d: &Path, delay: Option<Duration>) -> Seen {
    let (mut child, mut q) = daemon(who, d);
    let speed = kind.speed();
    let j = |extra: Value| {
        let mut v = json!({"job-id": "j", "speed": speed});
        for (k, x) in extra.as_object().unwrap() {
            v[k] = x.clone();
        }
        v
    };
    let r = match kind {
        Kind::Stream | Kind::CommitIntermediate | Kind::CommitActive => {
            q.ok("blockdev-add", qcow2("top", &d.join("top.qcow2")));
            match kind {
                Kind::Stream => q.execute("block-stream", j(json!({"device": "top"}))),
                Kind::CommitIntermediate => q.execute(
                    "block-commit",
                    j(json!({"device": "top", "top": d.join("mid.qcow2")})),
                ),
                _ => q.execute("block-commit", j(json!({"device": "top"}))),
            }
        }
        Kind::MirrorReplaces => {
            q.ok("blockdev-add", source_graph(d));
            q.ok("blockdev-add", qcow2("tgt", &d.join("tgt.qcow2")));
            q.execute(
                "blockdev-mirror",
                j(json!({"device": "dbg", "target": "tgt", "sync": "full",
                         "replaces": "disk"})),
            )
        }
        Kind::BackupFull => {
            q.ok("blockdev-add", qcow2("disk", &d.join("disk.qcow2")));
            q.ok("blockdev-add", qcow2("tgt", &d.join("tgt.qcow2")));
            q.execute(
                "transaction",
                json!({"actions": [
                    {"type": "block-dirty-bitmap-add",
                     "data": {"node": "disk", "name": "nightly", "persistent": true}},
                    {"type": "blockdev-backup",
                     "data": j(json!({"device": "disk", "target": "tgt", "sync": "full"}))}]}),
            )
        }
        Kind::BackupIncremental => {
            q.ok("blockdev-add", qcow2("disk", &d.join("disk.qcow2")));
            let mut t = qcow2("tgt", &d.join("tgt.qcow2"));
            t["backing"] = Value::Null;
            q.ok("blockdev-add", t);
            q.execute(
                "blockdev-backup",
                j(
                    json!({"device": "disk", "target": "tgt", "sync": "incremental",
                         "bitmap": "nightly"}),
                ),
            )
        }
    };
    if let Err(e) = r {
        child.kill();
        panic!(
            "{who:?} {kind:?}: the job was refused: {e:?}\n{}",
            stderr_of(d)
        );
    }
    let mut seen = Seen::default();
    let start = Instant::now();
    let mut kill_at = None;
    loop {
        let now = Instant::now();
        let until = kill_at.unwrap_or(start + DEADLINE);
        if now >= until {
            if kill_at.is_none() {
                child.kill();
                panic!("{who:?} {kind:?}: no running job\n{}", stderr_of(d));
            }
            break;
        }
        let Some(ev) = q.next_event(until - now) else {
            continue;
        };
        seen.note(&ev);
        match delay {
            Some(delay) if seen.running && kill_at.is_none() => {
                kill_at = Some(Instant::now() + delay);
            }
            None if seen.ended => break,
            _ => {}
        }
        if ev["event"] == "BLOCK_JOB_READY" {
            q.ok("block-job-complete", json!({"device": "j"}));
        }
    }
    child.kill();
    // What the daemon sent before it died.
    for ev in q.drain_after_kill() {
        if ev.get("event").is_some() {
            seen.note(&ev);
        }
    }
    seen
}

/// After the kill: what must hold of the run's images.
/// Failures are `Err`; what QEMU does not promise either (and neither
/// side does) is a note in the `Ok`.
fn verify(
    kind: Kind,
    who: Who,
    d: &Path,
    pristine: &Pristine,
    seen: Seen,
) -> Result<Option<String>, String> {
    let mut note = None;
    let p = |n: &str| d.join(n);
    match kind {
        Kind::Stream | Kind::CommitIntermediate | Kind::CommitActive => {
            for n in ["base.qcow2", "mid.qcow2", "top.qcow2"] {
                check(&p(n))?;
            }
            same(
                "the guest view of top",
                &opens_alike(&p("top.qcow2"))?,
                &pristine.top,
            )?;
            let base = opens_alike(&p("base.qcow2"))?;
            // A commit writes base only with what the layers above hold:
            // once it says it is done (ready or completed), base holds it.
            if kind == Kind::CommitActive && seen.ready {
                same("base after READY", &base, &pristine.top)?;
            }
            if kind == Kind::CommitIntermediate && seen.completed {
                same("base after the commit completed", &base, &pristine.mid)?;
            }
        }
        Kind::MirrorReplaces | Kind::BackupFull | Kind::BackupIncremental => {
            check(&p("disk.qcow2"))?;
            let disk = opens_alike(&p("disk.qcow2"))?;
            same("the source's guest view", &disk, &pristine.top)?;
            if p("tgt.qcow2").exists() {
                check(&p("tgt.qcow2"))?;
                let tgt = opens_alike(&p("tgt.qcow2"))?;
                // The mirror flushes its target before it says READY.
                if kind == Kind::MirrorReplaces && seen.ready {
                    same("the target after READY", &tgt, &pristine.top)?;
                }
                // A backup that said it completed need not be on disk yet:
                // neither QEMU's job nor ours flushes its target (the
                // target's close does), so a kill before that loses the
                // metadata of what was copied. Noted, not failed.
                if kind != Kind::MirrorReplaces && seen.completed {
                    note = same("the backup after COMPLETED", &tgt, &pristine.top).err();
                }
            } else if who != Who::Cli {
                return Err("the target is gone".into());
            }
            let bms = bitmaps(&p("disk.qcow2"));
            verify_backup_bitmaps(kind, who, seen, &bms)?;
        }
    }
    Ok(note)
}

/// The source's persistent bitmaps after a backup's kill, as QEMU leaves
/// them: one loaded from the image is `in-use` on disk while the image is
/// open, so a kill before the close leaves it so (inconsistent); one added
/// in the session is in memory only until the close stores it.
fn verify_backup_bitmaps(
    kind: Kind,
    who: Who,
    seen: Seen,
    bms: &[(String, Vec<String>)],
) -> Result<(), String> {
    let flags = |f: &[&str]| f.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    // Only the command closes (stores) after the job ends; a daemon still
    // has the image open.
    let closing = who == Who::Cli && seen.ended;
    let ok = match kind {
        Kind::BackupFull => {
            bms.is_empty() || (closing && bms == [("nightly".to_string(), flags(&["auto"]))])
        }
        Kind::BackupIncremental => {
            bms == [("nightly".to_string(), flags(&["in-use", "auto"]))]
                || (closing && bms == [("nightly".to_string(), flags(&["auto"]))])
        }
        _ => bms.is_empty(),
    };
    if ok {
        Ok(())
    } else {
        Err(format!("the source's bitmaps after the kill: {bms:?}"))
    }
}

/// Guest views of the template's images.
struct Pristine {
    /// top.qcow2's (chains) or disk.qcow2's.
    top: Vec<u8>,
    /// mid.qcow2's (chains).
    mid: Vec<u8>,
}

/// ≥ 20 kills of ours (half command, half daemon) and 5 of QEMU's for
/// one job type.
fn kills(kind: Kind) {
    let t = template(kind);
    let top = if t.path().join("top.qcow2").exists() {
        "top.qcow2"
    } else {
        "disk.qcow2"
    };
    let pristine = Pristine {
        top: flat(&t.path().join(top)).unwrap(),
        mid: if top == "top.qcow2" {
            flat(&t.path().join("mid.qcow2")).unwrap()
        } else {
            Vec::new()
        },
    };
    assert_eq!(pristine.top.len(), SIZE);
    let mut qemu_broke = Vec::new();
    let mut notes = Vec::new();
    let mut summary = Vec::new();
    for (who, n) in [
        (Who::Cli, OURS_RUNS / 2),
        (Who::Daemon, OURS_RUNS / 2),
        (Who::Qsd, QSD_RUNS),
    ] {
        let seeds = seeds(n, &format!("{kind:?}{who:?}"));
        let mut mid = 0;
        // Ours: one uninterrupted run first, for the job's length now.
        let measured = (who != Who::Qsd).then(|| {
            let d = tempfile::tempdir().unwrap();
            copy_dir(t.path(), d.path());
            let seen = match who {
                Who::Cli => run_cli(kind, d.path(), DEADLINE),
                _ => run_daemon(kind, who, d.path(), None),
            };
            let len = seen
                .ran_for()
                .unwrap_or_else(|| panic!("{kind:?} {who:?}: no length from {seen:?}"));
            eprintln!("kill {kind:?} {who:?}: the job runs {len:?} uninterrupted");
            len
        });
        // A daemon keeps the images open after the job: one more run
        // kills it right after the job said it ended (no seed).
        let end_run = (who != Who::Cli).then_some(None);
        for seed in seeds.iter().copied().map(Some).chain(end_run) {
            let d = tempfile::tempdir().unwrap();
            copy_dir(t.path(), d.path());
            let delay = seed.map(|seed| delay(kind, who, seed, measured));
            let seen = match (who, delay) {
                (Who::Cli, Some(delay)) => run_cli(kind, d.path(), delay),
                _ => run_daemon(kind, who, d.path(), delay),
            };
            mid += seen.mid_job() as usize;
            let r = verify(kind, who, d.path(), &pristine, seen);
            let when = match (seed, delay) {
                (Some(seed), Some(delay)) => {
                    format!(
                        "KILL_SEED={seed} after {:.0} ms",
                        delay.as_secs_f64() * 1000.0
                    )
                }
                _ => "at the job's end".to_string(),
            };
            if seed.is_none() && !seen.completed {
                panic!("{kind:?} {who:?}: the job did not complete: {seen:?}");
            }
            eprintln!(
                "kill {kind:?} {who:?} {when}: {seen:?} -> {}",
                match &r {
                    Ok(None) => "ok".to_string(),
                    Ok(Some(n)) => format!("ok; note: {n}"),
                    Err(e) => e.clone(),
                }
            );
            match r {
                Ok(None) => {}
                Ok(Some(n)) => notes.push(format!("{who:?} {when}: {n}")),
                Err(e) if who == Who::Qsd => qemu_broke.push(format!("{when}: {e}")),
                Err(e) => panic!(
                    "{kind:?} {who:?} {when}: {e}\nstderr:\n{}",
                    stderr_of(d.path())
                ),
            }
        }
        let runs = seeds.len() + end_run.is_some() as usize;
        summary.push(format!("{who:?}: {runs} runs, {mid} mid-job"));
        // Most kills of ours must land while the job runs, or this tests
        // little (of QEMU's fewer runs, one is asked: its jobs' speed
        // varies more).
        let need = if who == Who::Qsd {
            1
        } else {
            seeds.len().div_ceil(2)
        };
        if seeds.len() >= 5 {
            assert!(
                mid >= need,
                "{kind:?} {who:?}: only {mid} of {} kills landed mid-job",
                seeds.len()
            );
        }
    }
    eprintln!("kill {kind:?}: {}", summary.join("; "));
    if !notes.is_empty() {
        eprintln!("kill {kind:?}: notes: {notes:#?}");
    }
    if !qemu_broke.is_empty() {
        eprintln!("kill {kind:?}: QEMU's images did not survive: {qemu_broke:#?}");
    }
}

#[test]
fn stream() {
    kills(Kind::Stream);
}

#[test]
fn commit_intermediate() {
    kills(Kind::CommitIntermediate);
}

#[test]
fn commit_active() {
    kills(Kind::CommitActive);
}

#[test]
fn mirror_replaces() {
    kills(Kind::MirrorReplaces);
}

#[test]
fn backup_full() {
    kills(Kind::BackupFull);
}

#[test]
fn backup_incremental() {
    kills(Kind::BackupIncremental);
}

/// One run of persistent-bitmap updates in a daemon: the image opened
/// with two persistent bitmaps (`b0` recording, `b1` disabled) and
/// exported over NBD; guest-like writes through our library's NBD client
/// (some flushed), `block-dirty-bitmap-add|clear|merge|remove` in a
/// seeded order; the last command is in flight when the daemon is
/// killed. After the kill: no corruption, every flushed write there
/// (unflushed ones there or not), the bitmaps on disk those of the
/// image at open minus the removed ones, all `in-use` (QEMU marks them so
/// while the image is open writable); the ones added are lost (stored
/// only at close). Whether the last command was answered before the kill.
fn bitmap_run(who: Who, t: &Path, seed: u64) -> Result<bool, String> {
    const CLUSTER: usize = 65536;
    const CLUSTERS: usize = SIZE / CLUSTER;
    let d = tempfile::tempdir().unwrap();
    copy_dir(t, d.path());
    let img = d.path().join("disk.qcow2");
    let (mut child, mut q) = daemon(who, d.path());
    let nbd = d.path().join("nbd.sock");
    q.ok("blockdev-add", qcow2("disk", &img));
    q.ok(
        "nbd-server-start",
        json!({"addr": {"type": "unix", "data": {"path": nbd}}}),
    );
    q.ok(
        "block-export-add",
        json!({"type": "nbd", "id": "e", "node-name": "disk", "writable": true}),
    );
    let mut writer = Ours::new();
    writer
        .cmd(
            "blockdev-add",
            json!({"driver": "nbd", "node-name": "w", "export": "disk",
                   "server": {"type": "unix", "path": nbd}}),
        )
        .unwrap();
    let blk = writer.ctx.blk_new("w", BackendOptions::default()).unwrap();

    let mut rng = Rng(seed);
    // The last flushed value of each cluster, and the values written
    // since.
    let mut flushed: Vec<u8> = (0..CLUSTERS).map(|c| if c < 128 { 6 } else { 0 }).collect();
    let mut pending: Vec<Vec<u8>> = vec![Vec::new(); CLUSTERS];
    let mut live = vec!["b0".to_string(), "b1".to_string()];
    let mut on_disk: BTreeSet<String> = live.iter().cloned().collect();
    let ops = 5 + rng.below(20);
    let mut last = None;
    for k in 0..=ops {
        let r = if k == ops {
            45 + rng.below(55)
        } else {
            rng.below(100)
        };
        let pick =
            |rng: &mut Rng, from: &[String]| from[rng.below(from.len() as u64) as usize].clone();
        let cmd = if r < 45 {
            let c = rng.below(CLUSTERS as u64) as usize;
            let n = (1 + rng.below(4) as usize).min(CLUSTERS - c);
            let v = 20 + (k % 200) as u8;
            blk.pwrite((c * CLUSTER) as u64, &vec![v; n * CLUSTER])
                .map_err(|e| format!("write: {e:?}"))?;
            for p in &mut pending[c..c + n] {
                p.push(v);
            }
            if rng.below(2) == 0 {
                blk.flush().map_err(|e| format!("flush: {e:?}"))?;
                for (f, p) in flushed.iter_mut().zip(&mut pending) {
                    if let Some(&v) = p.last() {
                        *f = v;
                    }
                    p.clear();
                }
            }
            continue;
        } else if r < 60 || live.is_empty() {
            let name = format!("a{k}");
            live.push(name.clone());
            (
                "block-dirty-bitmap-add",
                json!({"node": "disk", "name": name, "persistent": true}),
                None,
            )
        } else if r < 75 {
            let name = pick(&mut rng, &live);
            (
                "block-dirty-bitmap-clear",
                json!({"node": "disk", "name": name}),
                None,
            )
        } else if r < 90 && live.len() >= 2 {
            let target = pick(&mut rng, &live);
            let others: Vec<String> = live.iter().filter(|b| **b != target).cloned().collect();
            let mut sources = vec![pick(&mut rng, &others)];
            if others.len() > 1 && rng.below(2) == 0 {
                sources.push(pick(&mut rng, &others));
            }
            (
                "block-dirty-bitmap-merge",
                json!({"node": "disk", "target": target, "bitmaps": sources}),
                None,
            )
        } else {
            let name = pick(&mut rng, &live);
            live.retain(|b| *b != name);
            (
                "block-dirty-bitmap-remove",
                json!({"node": "disk", "name": name.clone()}),
                Some(name),
            )
        };
        let (name, args, removed) = cmd;
        if k < ops {
            q.ok(name, args);
            if let Some(b) = removed {
                on_disk.remove(&b);
            }
        } else {
            // In flight: guest writes (unflushed) from another thread and
            // the command sent, the daemon killed within 1 ms.
            let burst = Mutex::new(std::mem::take(&mut pending));
            // Relaxed: a stop request only; what the writer recorded is
            // under the mutex, and the scope's join orders the rest.
            let stop = AtomicBool::new(false);
            let mut wrng = Rng(seed ^ 0x5eed);
            std::thread::scope(|sc| {
                sc.spawn(|| {
                    while !stop.load(Ordering::Relaxed) {
                        let c = wrng.below(CLUSTERS as u64) as usize;
                        // Recorded before it is sent: it may land or not.
                        burst.lock().unwrap()[c].push(15);
                        if blk.pwrite((c * CLUSTER) as u64, &[15; CLUSTER]).is_err() {
                            break;
                        }
                    }
                });
                q.send_raw(format!("{}\n", json!({"execute": name, "arguments": args})).as_bytes());
                std::thread::sleep(Duration::from_micros(rng.below(1000)));
                child.kill();
                stop.store(true, Ordering::Relaxed);
            });
            pending = burst.into_inner().unwrap();
            last = Some((name, removed));
        }
    }
    let answered = q
        .drain_after_kill()
        .iter()
        .any(|m| m.get("return").is_some() || m.get("error").is_some());
    drop(blk);
    drop(writer);
    let (last_name, in_flight_remove) = last.unwrap();

    check(&img)?;
    let view = opens_alike(&img)?;
    for (c, chunk) in view.chunks(CLUSTER).enumerate() {
        let v = chunk[0];
        if chunk.iter().any(|&b| b != v) || (v != flushed[c] && !pending[c].contains(&v)) {
            return Err(format!(
                "cluster {c}: not its flushed value {} nor one written since {:?}",
                flushed[c], pending[c]
            ));
        }
    }
    let bms = bitmaps(&img);
    let names: BTreeSet<String> = bms.iter().map(|(n, _)| n.clone()).collect();
    let mut without = on_disk.clone();
    if let Some(b) = &in_flight_remove {
        without.remove(b);
    }
    if names != on_disk && names != without {
        return Err(format!(
            "bitmaps on disk {names:?}, expected {on_disk:?} (last command {last_name}, answered: {answered})"
        ));
    }
    for (n, f) in &bms {
        let want: &[&str] = if n == "b0" {
            &["in-use", "auto"]
        } else {
            &["in-use"]
        };
        if f != want {
            return Err(format!("bitmap {n}: flags {f:?}, expected {want:?}"));
        }
    }
    eprintln!(
        "kill Bitmaps {who:?} KILL_SEED={seed}: {} ops, last {last_name} (answered: {answered}) -> ok",
        ops + 1
    );
    Ok(!answered)
}

#[test]
fn persistent_bitmap_updates() {
    let t = tempfile::tempdir().unwrap();
    let img = t.path().join("disk.qcow2");
    create(&img, None);
    qemu_io(&img, "write -P 6 0 8M");
    tool("qemu-img", &["bitmap", "--add", s(&img), "b0"]);
    tool("qemu-img", &["bitmap", "--add", s(&img), "b1"]);
    tool("qemu-img", &["bitmap", "--disable", s(&img), "b1"]);
    let mut summary = Vec::new();
    let mut qemu_broke = Vec::new();
    // No command of ours edits bitmaps alone (`blockjob backup
    // --new-bitmap` is in backup_full): every run of ours is the daemon's.
    for (who, n) in [(Who::Daemon, OURS_RUNS), (Who::Qsd, QSD_RUNS)] {
        let seeds = seeds(n, &format!("Bitmaps{who:?}"));
        let mut in_flight = 0;
        for &seed in &seeds {
            match bitmap_run(who, t.path(), seed) {
                Ok(unanswered) => in_flight += unanswered as usize,
                Err(e) if who == Who::Qsd => {
                    eprintln!("kill Bitmaps Qsd KILL_SEED={seed}: {e}");
                    qemu_broke.push(format!("seed {seed}: {e}"));
                }
                Err(e) => panic!("Bitmaps {who:?} KILL_SEED={seed}: {e}"),
            }
        }
        summary.push(format!(
            "{who:?}: {} runs, {in_flight} killed before answering the last command",
            seeds.len()
        ));
    }
    eprintln!("kill Bitmaps: {}", summary.join("; "));
    if !qemu_broke.is_empty() {
        eprintln!("kill Bitmaps: QEMU's images did not survive: {qemu_broke:#?}");
    }
}
