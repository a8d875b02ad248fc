//! Oracle sides with a guest writing to node `src` while jobs run: on
//! QEMU an NBD export of `src` written by `qemu-io` (the export's backend
//! moves above a job's filter as a guest device does); on ours a backend
//! (`Context::blk_new`) on `src`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use blockjob::block::backend::{BackendOptions, BlockBackend};
use serde_json::{Value, json};

use super::oracle::{Ours, Side};
use super::qmp::{Daemon, summarize};

const MIB: u64 = 1 << 20;

/// A side with a guest writing to a node (`src` unless attached
/// elsewhere), and a reader of other nodes.
pub trait Guest: Side {
    /// Attach the guest to `node` (before any job).
    fn attach_to(&mut self, dir: &Path, node: &str);
    /// Attach the guest to `src`.
    fn attach(&mut self, dir: &Path) {
        self.attach_to(dir, "src")
    }
    /// A `qemu-io` command of the guest (`write -P <byte> <offset>
    /// <len>`, `write -z …`, `read -P …`): `ok`, `pattern mismatch` or
    /// `error: <strerror>`.
    fn io(&mut self, cmd: &str) -> String;
    /// Detach the guest.
    fn detach(&mut self);
    /// The guest's write, which must succeed.
    fn write(&mut self, cmd: &str) {
        let r = self.io(cmd);
        assert_eq!(r, "ok", "guest {cmd}");
    }
    /// A read-only `qemu-io` command (`read -P …`) on `node`, the way
    /// [`Guest::io`] reports it.
    fn read_node(&mut self, node: &str, cmd: &str) -> String;
}

pub struct Qemu {
    d: Daemon,
    sock: Option<PathBuf>,
    guest: String,
    exported: Vec<String>,
    /// Where the NBD socket goes.
    tmp: tempfile::TempDir,
}

impl Qemu {
    /// A fresh `qemu-storage-daemon`, no guest yet.
    pub fn start() -> Qemu {
        Qemu {
            d: Daemon::start(),
            sock: None,
            guest: String::new(),
            exported: Vec::new(),
            tmp: tempfile::tempdir().unwrap(),
        }
    }

    fn server(&mut self) -> PathBuf {
        if self.sock.is_none() {
            let sock = self.tmp.path().join("nbd.sock");
            self.cmd(
                "nbd-server-start",
                json!({"addr": {"type": "unix", "data": {"path": sock}}}),
            )
            .unwrap();
            self.sock = Some(sock);
        }
        self.sock.clone().unwrap()
    }

    /// `qemu-io` on export `name`, summarized as [`Guest::io`] says.
    fn qemu_io(&self, name: &str, read_only: bool, cmd: &str) -> String {
        let url = format!(
            "nbd+unix:///{name}?socket={}",
            self.sock.as_ref().unwrap().display()
        );
        let mut args = vec!["-f", "raw"];
        if read_only {
            args.push("-r");
        }
        let out = Command::new("qemu-io")
            .args(&args)
            .args(["-c", cmd, &url])
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if text.contains("Pattern verification failed") {
            return "pattern mismatch".into();
        }
        match text.lines().find_map(|l| l.split_once(" failed: ")) {
            Some((_, e)) => format!("error: {e}"),
            None if out.status.success() => "ok".into(),
            None => format!("error: {text}"),
        }
    }
}

impl Side for Qemu {
    fn cmd(&mut self, name: &str, args: Value) -> Result<Value, String> {
        self.d.cmd(name, args)
    }
    fn event_within(&mut self, d: Duration) -> Option<Value> {
        self.d.event_within(d)
    }
}

impl Guest for Qemu {
    fn attach_to(&mut self, _dir: &Path, node: &str) {
        self.server();
        self.cmd(
            "block-export-add",
            json!({"type": "nbd", "id": "e", "node-name": node, "writable": true}),
        )
        .unwrap();
        self.guest = node.to_string();
    }
    fn io(&mut self, cmd: &str) -> String {
        self.qemu_io(&self.guest, false, cmd)
    }
    fn detach(&mut self) {
        super::oracle::del_export_when_idle(self, "e");
        // Gone once BLOCK_EXPORT_DELETED is out.
        while let Some(ev) = self.event_within(Duration::from_secs(10)) {
            if ev["event"] == "BLOCK_EXPORT_DELETED" {
                break;
            }
        }
    }
    fn read_node(&mut self, node: &str, cmd: &str) -> String {
        self.server();
        if !self.exported.iter().any(|n| n == node) {
            self.cmd(
                "block-export-add",
                json!({"type": "nbd", "id": format!("r-{node}"), "node-name": node}),
            )
            .unwrap();
            self.exported.push(node.to_string());
        }
        self.qemu_io(node, true, cmd)
    }
}

pub struct OursGuest {
    pub o: Ours,
    blk: Option<BlockBackend>,
}

impl OursGuest {
    /// A fresh context, no guest yet.
    pub fn new() -> OursGuest {
        OursGuest {
            o: Ours::new(),
            blk: None,
        }
    }
}

impl Side for OursGuest {
    fn cmd(&mut self, name: &str, args: Value) -> Result<Value, String> {
        self.o.cmd(name, args)
    }
    fn event_within(&mut self, d: Duration) -> Option<Value> {
        self.o.event_within(d)
    }
}

/// `12M`, `64k`, `4096` as bytes.
fn size(s: &str) -> u64 {
    let (n, m) = match s.as_bytes().last() {
        Some(b'M') => (&s[..s.len() - 1], MIB),
        Some(b'k') => (&s[..s.len() - 1], 1024),
        _ => (s, 1),
    };
    n.parse::<u64>().unwrap() * m
}

/// A `qemu-io` command as (verb, pattern byte or `None` for `-z`, offset,
/// length).
fn parse_io(cmd: &str) -> (&str, Option<u8>, u64, u64) {
    let w: Vec<&str> = cmd.split_whitespace().collect();
    match w[..] {
        [verb, "-P", p, off, len] => (verb, Some(p.parse().unwrap()), size(off), size(len)),
        ["write", "-z", off, len] => ("write", None, size(off), size(len)),
        ["read", off, len] => ("read", None, size(off), size(len)),
        _ => panic!("unsupported qemu-io command {cmd}"),
    }
}

/// An error as QEMU's side shows it: through NBD, which carries only
/// EPERM, EIO, ENOMEM, EINVAL, ENOSPC, EOVERFLOW, ENOTSUP and ESHUTDOWN;
/// QEMU's NBD server sends any other errno as EINVAL (a view's EACCES,
/// for one).
fn strerror(e: &blockjob::Error) -> String {
    const NBD: [i32; 8] = [
        libc::EPERM,
        libc::EIO,
        libc::ENOMEM,
        libc::EINVAL,
        libc::ENOSPC,
        libc::EOVERFLOW,
        libc::ENOTSUP,
        libc::ESHUTDOWN,
    ];
    match e.errno() {
        Some(n) if !NBD.contains(&n) => {
            format!(
                "error: {}",
                blockjob::Error::from_errno(libc::EINVAL).message()
            )
        }
        _ => format!("error: {}", e.message()),
    }
}

/// Run a parsed read: `ok`, `pattern mismatch` or the error.
fn check_read(r: blockjob::Result<()>, buf: &[u8], p: Option<u8>) -> String {
    match r {
        Err(e) => strerror(&e),
        Ok(()) if p.is_some_and(|p| buf.iter().any(|b| *b != p)) => "pattern mismatch".into(),
        Ok(()) => "ok".into(),
    }
}

impl Guest for OursGuest {
    fn attach_to(&mut self, _dir: &Path, node: &str) {
        self.blk = Some(self.o.ctx.blk_new(node, BackendOptions::default()).unwrap());
    }
    fn io(&mut self, cmd: &str) -> String {
        let blk = self.blk.as_ref().unwrap();
        let (verb, p, off, len) = parse_io(cmd);
        match (verb, p) {
            ("write", Some(p)) => match blk.pwrite(off, &vec![p; len as usize]) {
                Ok(()) => "ok".into(),
                Err(e) => strerror(&e.error),
            },
            ("write", None) => match blk.pwrite_zeroes(off, len, false) {
                Ok(()) => "ok".into(),
                Err(e) => strerror(&e.error),
            },
            _ => {
                let mut buf = vec![0u8; len as usize];
                let r = blk.pread(off, &mut buf).map_err(|e| e.error);
                check_read(r, &buf, p)
            }
        }
    }
    fn detach(&mut self) {
        self.blk = None;
    }
    fn read_node(&mut self, node: &str, cmd: &str) -> String {
        let n = self.o.ctx.lookup(node).unwrap();
        let (_, p, off, len) = parse_io(cmd);
        let mut buf = vec![0u8; len as usize];
        let r = n.pread(off, &mut buf);
        check_read(r, &buf, p)
    }
}

/// A 64 MiB raw image `name` in `dir`, sparse or filled with `fill`.
pub fn img(dir: &Path, name: &str, fill: Option<u8>) {
    let p = dir.join(name);
    let f = std::fs::File::create(&p).unwrap();
    f.set_len(64 * MIB).unwrap();
    if let Some(b) = fill {
        std::fs::write(&p, vec![b; 64 * MIB as usize]).unwrap();
    }
}

/// The source's bitmaps: name (or `anon`), count, busy, recording.
pub fn bitmaps(side: &mut dyn Guest, node: &str) -> String {
    let nodes = side
        .cmd("query-named-block-nodes", json!({"flat": true}))
        .unwrap();
    let n = nodes
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node-name"] == node)
        .cloned()
        .unwrap_or_default();
    n["dirty-bitmaps"]
        .as_array()
        .map(|l| {
            l.iter()
                .map(|b| {
                    format!(
                        "{}:{}:{}:{}",
                        b["name"].as_str().unwrap_or("anon"),
                        b["count"],
                        b["busy"],
                        b["recording"]
                    )
                })
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default()
}

/// `query-block-jobs`: type, offset, len, status, io-status, ready.
pub fn jobs(side: &mut dyn Guest) -> String {
    let v = side.cmd("query-block-jobs", json!({})).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|j| {
            format!(
                "{} {} {}/{} {} {} ready={}",
                j["device"].as_str().unwrap_or(""),
                j["type"].as_str().unwrap_or(""),
                j["offset"],
                j["len"],
                j["status"].as_str().unwrap_or(""),
                j["io-status"].as_str().unwrap_or(""),
                j["ready"]
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// Events until `null` of job `j` (or 30 s), summarized; QEMU's drain
/// pair dropped ([`drop_drain_pair`]).
pub fn events_until_null(side: &mut dyn Guest, out: &mut Vec<String>) {
    let mut evs = Vec::new();
    while let Some(ev) = side.event_within(Duration::from_secs(30)) {
        let null = ev["event"] == "JOB_STATUS_CHANGE" && ev["data"]["status"] == "null";
        let mut s = summarize(&ev);
        if ev["event"] == "BLOCK_JOB_COMPLETED" || ev["event"] == "BLOCK_JOB_CANCELLED" {
            s = format!("{s} {}/{}", ev["data"]["offset"], ev["data"]["len"]);
        }
        evs.push(s);
        if null {
            break;
        }
    }
    drop_drain_pair(&mut evs);
    out.push(format!("events: {}", evs.join(", ")));
}

/// QEMU drains the source when it inserts a backup's filter, with the job
/// already created, so its events start `created, running, paused,
/// running`; ours start `created, running` (our filter goes in before the
/// job exists). The `paused, running` right after the first `running` is
/// dropped.
pub fn drop_drain_pair(evs: &mut Vec<String>) {
    if let Some(i) = evs.iter().position(|e| e == "JSC:running")
        && evs.get(i + 1).map(String::as_str) == Some("JSC:paused")
        && evs.get(i + 2).map(String::as_str) == Some("JSC:running")
    {
        evs.drain(i + 1..i + 3);
    }
}

/// Run `play` on QEMU and on ours in fresh directories; the differences
/// (none expected) and both directories, for content checks.
pub fn compare(
    label: &str,
    play: &dyn Fn(&mut dyn Guest, &Path) -> Vec<String>,
) -> (tempfile::TempDir, tempfile::TempDir) {
    let d1 = tempfile::tempdir().unwrap();
    let d2 = tempfile::tempdir().unwrap();
    let mut qemu = Qemu::start();
    let q = play(&mut qemu, d1.path());
    drop(qemu);
    let mut ours = OursGuest::new();
    let o = play(&mut ours, d2.path());
    drop(ours);
    if std::env::var("BJ_SHOW").is_ok_and(|v| label.contains(&v)) {
        eprintln!(
            "{label}:\n  qemu: {}\n  ours: {}",
            q.join("\n  qemu: "),
            o.join("\n  ours: ")
        );
    }
    let mut d = String::new();
    for i in 0..q.len().max(o.len()) {
        let (a, b) = (q.get(i), o.get(i));
        if a != b {
            d.push_str(&format!("  qemu: {a:?}\n  ours: {b:?}\n"));
        }
    }
    assert!(d.is_empty(), "{label}: differences:\n{d}");
    (d1, d2)
}

/// File `name` holds the same bytes on both sides.
pub fn same_files(d1: &Path, d2: &Path, name: &str) {
    let (a, b) = (
        std::fs::read(d1.join(name)).unwrap(),
        std::fs::read(d2.join(name)).unwrap(),
    );
    assert_eq!(a.len(), b.len());
    if let Some(i) = a.iter().zip(&b).position(|(x, y)| x != y) {
        panic!("{name} differs at {i}: qemu {:#x}, ours {:#x}", a[i], b[i]);
    }
}
