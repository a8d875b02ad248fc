//! `blockjob daemon`: qemu-storage-daemon's command line and QMP over UNIX
//! sockets, checked against real `qemu-storage-daemon` where the two
//! should agree (greeting shape, accepted `--blockdev` texts, error lines).

#[path = "../../tests/common/mod.rs"]
mod common;

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use common::qmp::Qmp;
use serde_json::{Value, json};

const OURS: &str = env!("CARGO_BIN_EXE_blockjob");
const QSD: &str = "qemu-storage-daemon";

/// `OURS daemon ARGS` or `qemu-storage-daemon ARGS`.
fn command(qsd: bool, args: &[String]) -> Command {
    let mut c = if qsd {
        common::require_tool(QSD);
        Command::new(QSD)
    } else {
        let mut c = Command::new(OURS);
        c.arg("daemon");
        c
    };
    c.args(args);
    c
}

fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}

/// `--chardev` and `--monitor` for a socket at `path`.
fn monitor_args(path: &Path, id: &str) -> Vec<String> {
    vec![
        "--chardev".into(),
        format!("socket,id={id},path={},server=on,wait=off", path.display()),
        "--monitor".into(),
        id.into(),
    ]
}

/// Wait for a child for `max` at most (killed after that).
fn wait_for(child: &mut Child, max: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + max;
    loop {
        if let Ok(Some(st)) = child.try_wait() {
            return Some(st);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Run to completion (5 s at most) with stdin closed.
fn run_to_exit(mut c: Command) -> Output {
    let mut child = c
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let t = std::thread::spawn(move || {
        let mut o = Vec::new();
        let _ = out.read_to_end(&mut o);
        o
    });
    let mut e = Vec::new();
    let _ = err.read_to_end(&mut e);
    let status = wait_for(&mut child, Duration::from_secs(5)).expect("the command did not exit");
    Output {
        status,
        stdout: t.join().unwrap(),
        stderr: e,
    }
}

/// A running daemon (ours or QEMU's); killed on drop if still running.
struct Daemon {
    child: Child,
    stderr: PathBuf,
}

impl Daemon {
    fn start(qsd: bool, args: &[String], dir: &Path) -> Daemon {
        let stderr = dir.join(if qsd { "qsd.stderr" } else { "ours.stderr" });
        let child = command(qsd, args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .unwrap();
        Daemon { child, stderr }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn signal(&self, sig: &str) {
        let st = Command::new("kill")
            .args([sig, &self.pid().to_string()])
            .status()
            .unwrap();
        assert!(st.success());
    }

    fn wait(&mut self, max: Duration) -> ExitStatus {
        wait_for(&mut self.child, max).unwrap_or_else(|| panic!("daemon did not exit"))
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            eprintln!("daemon stderr:\n{}", self.stderr());
        }
    }
}

/// The structure of a JSON value: objects' keys and arrays' element
/// shapes, leaves by type.
fn shape(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(m.iter().map(|(k, v)| (k.clone(), shape(v))).collect()),
        Value::Array(a) => Value::Array(a.iter().map(shape).collect()),
        Value::String(_) => json!("string"),
        Value::Number(_) => json!("number"),
        Value::Bool(_) => json!("bool"),
        Value::Null => json!(null),
    }
}

fn wait_gone(path: &Path) -> bool {
    let deadline = Instant::now() + Duration::from_secs(5);
    while path.exists() {
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    true
}

#[test]
fn greeting_negotiation_two_monitors_and_socket_mode() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a.sock"), dir.path().join("b.sock"));
    let mut args = monitor_args(&a, "ma");
    args.extend(s(&[
        "--chardev",
        &format!("socket,id=mb,path={},server=on,wait=off", b.display()),
        "--monitor",
        "chardev=mb,mode=control,pretty=on",
    ]));
    let _d = Daemon::start(false, &args, dir.path());

    // The greeting, as one CRLF-terminated line shaped like QEMU's.
    let mut c = Qmp::connect_raw(&a);
    let line = c.recv_line().expect("greeting");
    assert!(line.ends_with("}\r\n"), "{line:?}");
    let ours: Value = serde_json::from_str(&line).unwrap();
    c.greeting = ours.clone();
    let qdir = tempfile::tempdir().unwrap();
    let qsock = qdir.path().join("q.sock");
    let _q = Daemon::start(true, &monitor_args(&qsock, "m"), qdir.path());
    let mut q = Qmp::connect_raw(&qsock);
    let theirs = q.read_greeting();
    assert_eq!(shape(&ours), shape(&theirs));
    assert_eq!(
        ours["QMP"]["version"]["qemu"],
        theirs["QMP"]["version"]["qemu"]
    );

    // Negotiation first, once; the same answers as QEMU.
    for cl in [&mut c, &mut q] {
        let r = cl.command("query-jobs", json!({}));
        assert_eq!(r["error"]["class"], "CommandNotFound", "{r}");
        assert_eq!(
            r["error"]["desc"],
            "Expecting capabilities negotiation with 'qmp_capabilities'"
        );
        assert_eq!(
            cl.command("qmp_capabilities", json!({})),
            json!({"return": {}})
        );
        let r = cl.command("qmp_capabilities", json!({}));
        assert_eq!(r["error"]["class"], "CommandNotFound");
        assert_eq!(cl.ok("query-jobs", json!({})), json!([]));
    }

    // The second monitor at the same time, pretty-printed as QEMU does.
    let mut raw = UnixStream::connect(&b).unwrap();
    raw.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    raw.write_all(b"{\"execute\":\"qmp_capabilities\"}\n{\"execute\":\"query-jobs\"}\n")
        .unwrap();
    let mut got = Vec::new();
    let want: &[u8] =
        b"{\r\n    \"return\": {\r\n    }\r\n}\r\n{\r\n    \"return\": [\r\n    ]\r\n}\r\n";
    let mut buf = [0u8; 4096];
    while !got.ends_with(want) {
        let n = raw.read(&mut buf).unwrap();
        assert!(n > 0, "{}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    assert!(got.starts_with(b"{\r\n    \"QMP\": {\r\n"));

    // The mode the umask leaves, as QSD's.
    let qmode = std::fs::symlink_metadata(&qsock)
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(qmode, 0o777 & !umask());
    for p in [&a, &b] {
        let m = std::fs::symlink_metadata(p).unwrap();
        assert!(m.file_type().is_socket());
        assert_eq!(m.permissions().mode() & 0o777, qmode, "{}", p.display());
    }
}

/// This process's umask (read, not changed: tests run in threads).
fn umask() -> u32 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("Umask:")).unwrap();
    u32::from_str_radix(line["Umask:".len()..].trim(), 8).unwrap()
}

/// `/proc/PID/stat`'s session id.
fn session_of(pid: u32) -> u32 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // After "pid (comm) ": state ppid pgrp session.
    let rest = stat.rsplit_once(')').unwrap().1;
    rest.split_whitespace().nth(3).unwrap().parse().unwrap()
}

#[test]
fn socket_mode_follows_the_umask_and_a_stale_file_is_replaced_as_by_qsd() {
    for qsd in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("m.sock");
        // What a crashed daemon (or anything else) left at the path.
        std::fs::write(&sock, b"stale").unwrap();
        let args = monitor_args(&sock, "m");
        // umask 002: a management group may connect.
        let inner = command(qsd, &args);
        let mut c = Command::new("sh");
        c.arg("-c")
            .arg("umask 002; exec \"$@\"")
            .arg("sh")
            .arg(inner.get_program())
            .args(inner.get_args())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = c.spawn().unwrap();
        let deadline = Instant::now() + Duration::from_secs(15);
        while !std::fs::symlink_metadata(&sock).is_ok_and(|m| m.file_type().is_socket()) {
            assert!(Instant::now() < deadline, "qsd={qsd}: no socket");
            assert!(child.try_wait().unwrap().is_none(), "qsd={qsd}: exited");
            std::thread::sleep(Duration::from_millis(5));
        }
        let mode = std::fs::symlink_metadata(&sock)
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o775, "qsd={qsd}");
        let mut q = Qmp::connect(&sock);
        assert_eq!(q.ok("query-jobs", json!({})), json!([]));
        let _ = child.kill();
        let _ = child.wait();
    }
}

#[test]
fn mirror_between_blockdev_nodes_completes_over_qmp() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src,1.img");
    let dst = dir.path().join("dst.img");
    let data: Vec<u8> = (0..8u32 << 20).map(|i| (i / 4096 * 7 + i) as u8).collect();
    std::fs::write(&src, &data).unwrap();
    std::fs::File::create(&dst)
        .unwrap()
        .set_len(data.len() as u64)
        .unwrap();
    let sock = dir.path().join("qmp.sock");
    let mut args = s(&[
        "--blockdev",
        // keyval, with QEMU's ",," for the comma in the name.
        &format!(
            "file,node-name=src,filename={}",
            src.display().to_string().replace(',', ",,")
        ),
        "--blockdev",
        &json!({"driver":"file","node-name":"dst","filename":dst}).to_string(),
    ]);
    args.extend(monitor_args(&sock, "m"));
    let _d = Daemon::start(false, &args, dir.path());
    let mut c = Qmp::connect(&sock);
    // The events the command caused come before its reply, as in QEMU.
    c.send_raw(
        format!(
            "{}\n",
            json!({"execute": "blockdev-mirror",
                   "arguments": {"job-id":"m0","device":"src","target":"dst","sync":"full"}})
        )
        .as_bytes(),
    );
    let mut evs = Vec::new();
    let reply = loop {
        let v = c.recv().expect("a reply");
        if v.get("event").is_none() {
            break v;
        }
        evs.push(v);
    };
    assert_eq!(reply, json!({"return": {}}));
    assert!(evs.len() >= 2, "{evs:?}");
    if evs.last().is_none_or(|e| e["event"] != "BLOCK_JOB_READY") {
        evs.extend(c.until_event("BLOCK_JOB_READY"));
    }
    let statuses: Vec<_> = evs
        .iter()
        .filter(|e| e["event"] == "JOB_STATUS_CHANGE")
        .map(|e| e["data"]["status"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(statuses, ["created", "running", "ready"], "{evs:?}");
    assert!(evs.iter().all(|e| e["timestamp"]["seconds"].is_u64()));
    let jobs = c.ok("query-block-jobs", json!({}));
    assert_eq!(jobs[0]["device"], "m0");
    assert_eq!(jobs[0]["ready"], true);
    c.ok("block-job-complete", json!({"device":"m0"}));
    let evs = c.until_event("BLOCK_JOB_COMPLETED");
    let done = evs.last().unwrap();
    assert_eq!(done["data"]["device"], "m0");
    assert!(done["data"].get("error").is_none(), "{done}");
    c.until_event("JOB_STATUS_CHANGE"); // concluded
    let evs = c.until_event("JOB_STATUS_CHANGE");
    assert_eq!(evs.last().unwrap()["data"]["status"], "null");
    assert_eq!(c.ok("query-jobs", json!({})), json!([]));
    assert!(std::fs::read(&dst).unwrap() == data, "target differs");
}

#[test]
fn clients_come_and_go_while_a_job_runs() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("qmp.sock");
    let mut args = s(&[
        "--blockdev",
        "driver=null-co,node-name=src,size=67108864",
        "--blockdev",
        "null-co,node-name=dst,size=67108864",
    ]);
    args.extend(monitor_args(&sock, "m"));
    let _d = Daemon::start(false, &args, dir.path());
    let mut a = Qmp::connect(&sock);
    let mut b = Qmp::connect(&sock);
    a.ok(
        "blockdev-mirror",
        json!({"job-id":"j","device":"src","target":"dst","sync":"full","speed":33554432}),
    );

    // One disconnects mid-line, one right after sending a command, one
    // before negotiating, one in the middle of reading the greeting.
    let mut mid_line = Qmp::connect(&sock);
    mid_line.send_raw(b"{\"execute\": \"query-block-");
    drop(mid_line);
    let mut mid_cmd = Qmp::connect(&sock);
    mid_cmd.send_raw(b"{\"execute\":\"query-named-block-nodes\"}\n{\"execute\":\"query-jobs\"}\n");
    drop(mid_cmd);
    drop(Qmp::connect_raw(&sock));
    let mut half = UnixStream::connect(&sock).unwrap();
    let mut one = [0u8; 1];
    half.read_exact(&mut one).unwrap();
    drop(half);

    // The job goes on; both remaining clients see its events.
    let jobs = b.ok("query-block-jobs", json!({}));
    assert_eq!(jobs[0]["device"], "j", "{jobs}");
    a.until_event("BLOCK_JOB_READY");
    b.until_event("BLOCK_JOB_READY");
    b.ok("block-job-complete", json!({"device":"j"}));
    for c in [&mut a, &mut b] {
        let evs = c.until_event("BLOCK_JOB_COMPLETED");
        assert!(evs.last().unwrap()["data"].get("error").is_none());
    }
    // And a new client still works.
    let mut c = Qmp::connect(&sock);
    assert_eq!(c.ok("query-version", json!({}))["qemu"]["major"], 10);
    assert_eq!(a.ok("query-jobs", json!({})), json!([]));
}

#[test]
fn sigterm_cancels_jobs_and_cleans_up() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("qmp.sock");
    let pidfile = dir.path().join("d.pid");
    let mut args = s(&[
        "--blockdev",
        "driver=null-co,node-name=src,size=1073741824",
        "--blockdev",
        "driver=null-co,node-name=dst,size=1073741824",
        "--pidfile",
        pidfile.to_str().unwrap(),
    ]);
    args.extend(monitor_args(&sock, "m"));
    let mut d = Daemon::start(false, &args, dir.path());
    let mut c = Qmp::connect(&sock);
    let pid: u32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(pid, d.pid());
    c.ok(
        "blockdev-mirror",
        json!({"job-id":"j","device":"src","target":"dst","sync":"full","speed":1048576}),
    );
    c.until_event("JOB_STATUS_CHANGE"); // created
    c.until_event("JOB_STATUS_CHANGE"); // running
    d.signal("-TERM");
    let rest = c.drain();
    let names: Vec<_> = rest.iter().filter_map(|e| e["event"].as_str()).collect();
    assert!(names.contains(&"BLOCK_JOB_CANCELLED"), "{rest:?}");
    assert_eq!(rest.last().unwrap()["data"]["status"], "null", "{rest:?}");
    let st = d.wait(Duration::from_secs(10));
    assert_eq!(st.code(), Some(0), "{}", d.stderr());
    assert!(!sock.exists(), "socket left behind");
    assert!(!pidfile.exists(), "pid file left behind");

    // SIGINT and `quit` end it the same way.
    let mut d = Daemon::start(false, &args, dir.path());
    Qmp::connect(&sock);
    d.signal("-INT");
    assert_eq!(d.wait(Duration::from_secs(10)).code(), Some(0));
    assert!(!sock.exists() && !pidfile.exists());
    let mut d = Daemon::start(false, &args, dir.path());
    let mut c = Qmp::connect(&sock);
    assert_eq!(c.command("quit", json!({})), json!({"return": {}}));
    assert_eq!(d.wait(Duration::from_secs(10)).code(), Some(0));
    assert!(!sock.exists() && !pidfile.exists());
}

fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // "pid (comm) S ...": a zombie is not running (nobody may reap it here).
        Ok(stat) => !stat
            .rsplit_once(')')
            .is_some_and(|(_, r)| r.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

#[test]
fn daemonize_with_pidfile() {
    let dir = tempfile::tempdir().unwrap();
    // Relative paths: the daemon moves to / once ready and must still
    // remove them at exit.
    let mut c = command(
        false,
        &s(&[
            "--daemonize",
            "--pidfile",
            "d.pid",
            "--blockdev",
            "driver=null-co,node-name=n0",
            "--chardev",
            "socket,id=m,path=qmp.sock,server=on,wait=off",
            "--monitor",
            "m",
        ]),
    );
    c.current_dir(dir.path());
    let out = run_to_exit(c);
    assert!(out.status.success(), "{out:?}");
    assert!(out.stdout.is_empty() && out.stderr.is_empty(), "{out:?}");
    // Ready before the parent exited: socket and pid file are there.
    let sock = dir.path().join("qmp.sock");
    let pidfile = dir.path().join("d.pid");
    let pid: u32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(alive(pid));
    // Detached from the caller's session (a closing terminal's hangup
    // cannot reach it), with QSD's umask 027 for its socket.
    let me = session_of(std::process::id());
    assert_ne!(session_of(pid), me);
    assert_eq!(session_of(pid), pid);
    let mode = std::fs::symlink_metadata(&sock)
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o750);
    let mut q = Qmp::connect(&sock);
    let nodes = q.ok("query-named-block-nodes", json!({}));
    assert_eq!(nodes[0]["node-name"], "n0");
    assert_eq!(q.command("quit", json!({})), json!({"return": {}}));
    assert!(q.drain().is_empty());
    let deadline = Instant::now() + Duration::from_secs(10);
    while alive(pid) {
        assert!(Instant::now() < deadline, "daemon {pid} still running");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(wait_gone(&sock) && wait_gone(&pidfile));

    // A failing daemon: the parent reports its error and exits 1.
    let mut c = command(
        false,
        &s(&["--daemonize", "--blockdev", "driver=nope,node-name=x"]),
    );
    c.current_dir(dir.path());
    let out = run_to_exit(c);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "blockjob: --blockdev driver=nope,node-name=x: Parameter 'driver' does not accept value 'nope'\n"
    );
}

/// One line on stderr, exit 1; the text without the program name.
fn refused(qsd: bool, args: &[String], dir: &Path) -> String {
    let mut c = command(qsd, args);
    c.current_dir(dir);
    let out = run_to_exit(c);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(1), "{qsd} {args:?}: {err}");
    assert_eq!(err.lines().count(), 1, "{qsd} {args:?}: {err}");
    let prefix = if qsd {
        "qemu-storage-daemon: "
    } else {
        "blockjob: "
    };
    err.trim_end()
        .strip_prefix(prefix)
        .unwrap_or_else(|| panic!("{err}"))
        .to_string()
}

#[test]
fn bad_command_lines_fail_like_qsd() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("q.sock");
    let chardev = format!("socket,id=m,path={},server=on,wait=off", sock.display());
    let cases: Vec<Vec<String>> = vec![
        s(&["--foo"]),
        s(&["-x"]),
        s(&["extra"]),
        s(&["--blockdev"]),
        s(&["--pidfile"]),
        s(&["--daemonize=yes"]),
        s(&["--blockdev", "driver=nope,node-name=a"]),
        s(&["--blockdev", "node-name=a"]),
        s(&["--blockdev", "driver=null-co,node-name=a,size=abc"]),
        s(&["--blockdev", "driver=null-co,node-name=a,size=1M"]),
        s(&["--blockdev", "driver=null-co,node-name=a,read-only=maybe"]),
        s(&[
            "--blockdev",
            "driver=null-co,node-name=a,cache.direct=off,cache=x",
        ]),
        s(&["--blockdev", "driver=null-co,node-name=a,a..b=1"]),
        s(&["--blockdev", "driver=null-co,node-name"]),
        s(&["--blockdev", "driver=null-co,node-name=a,x-y=1"]),
        s(&["--blockdev", "driver=null-co,node-name=a,,b"]),
        s(&[
            "--blockdev",
            "driver=raw,node-name=r,file.driver=blkdebug,file.image.driver=null-co,\
             file.inject-error.1.event=read_aio",
        ]),
        s(&[
            "--blockdev",
            "driver=raw,node-name=r,file.driver=blkdebug,file.image.driver=null-co,\
             file.inject-error.0.event=read_aio,file.inject-error.0.errno=x",
        ]),
        s(&[
            "--blockdev",
            r#"{"driver":"null-co","node-name":"a","size":"x"}"#,
        ]),
        s(&[
            "--blockdev",
            "driver=file,node-name=a,filename=/nonexistent/x",
        ]),
        s(&[
            "--blockdev",
            "driver=null-co,node-name=a",
            "--blockdev",
            "driver=null-co,node-name=a",
        ]),
        s(&["--monitor", "nope"]),
        s(&["--chardev", "foo,id=m"]),
        s(&["--chardev", "socket,path=/tmp/x.sock,server=on,wait=off"]),
        s(&[
            "--chardev",
            "socket,id=m,path=/nonexistent/q.sock,server=on,wait=off",
        ]),
        s(&["--chardev", &chardev, "--monitor", "m,pretty=maybe"]),
        s(&["--chardev", &chardev, "--monitor", "m,mode=readline"]),
        s(&["--chardev", &chardev, "--monitor", "m,pretty"]),
        s(&["--chardev", &chardev, "--monitor", "m", "--monitor", "m"]),
        s(&["--pidfile", "/nonexistent/p"]),
        // Exports, NBD nodes and objects exist now: QEMU's texts.
        s(&["--export", "type=nbd"]),
        s(&["--blockdev", "driver=nbd,node-name=n,server.type=unix"]),
        s(&["--object", "x"]),
    ];
    for args in &cases {
        let theirs = refused(true, args, dir.path());
        let _ = std::fs::remove_file(&sock);
        let ours = refused(false, args, dir.path());
        assert_eq!(ours, theirs, "{args:?}");
        assert!(!sock.exists(), "{args:?} left the socket behind");
    }

    // What we refuse where QEMU would go on: clearly, in one line.
    for (args, want) in [
        (
            s(&[
                "--chardev",
                "socket,id=m,host=localhost,port=4444,server=on,wait=off",
            ]),
            "only UNIX socket servers",
        ),
        (
            s(&["--chardev", "socket,id=m,path=/tmp/x.sock,server=on"]),
            "wait=on is not supported",
        ),
        (s(&["--chardev", "file,id=m,path=/tmp/x"]), "not supported"),
    ] {
        let e = refused(false, &args, dir.path());
        assert!(e.contains(want), "{args:?}: {e}");
    }

    // -V and --help exit 0.
    let out = run_to_exit(command(false, &s(&["-V"])));
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("blockjob version 10.0.2 (blockjob "));
    let out = run_to_exit(command(false, &s(&["--help"])));
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("--blockdev"));
}

/// `(node-name, drv, ro)` of the named nodes.
fn named_nodes(c: &mut Qmp) -> BTreeSet<(String, String, bool)> {
    c.ok("query-named-block-nodes", json!({}))
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| !n["node-name"].as_str().unwrap().starts_with('#'))
        .map(|n| {
            (
                n["node-name"].as_str().unwrap().to_string(),
                n["drv"].as_str().unwrap().to_string(),
                n["ro"].as_bool().unwrap(),
            )
        })
        .collect()
}

#[test]
fn blockdev_texts_accepted_by_qsd_are_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display().to_string();
    for f in ["a,b.img", "c.img"] {
        std::fs::File::create(dir.path().join(f))
            .unwrap()
            .set_len(1 << 20)
            .unwrap();
    }
    let st = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(dir.path().join("q.qcow2"))
        .arg("1M")
        .status()
        .expect("qemu-img");
    assert!(st.success());
    let texts = [
        format!("driver=file,node-name=f1,filename={d}/a,,b.img"),
        r#"{"driver":"null-co","node-name":"n1","size":1048576}"#.to_string(),
        "null-co,node-name=n2,size=0x100000,read-zeroes=on,".to_string(),
        "driver=null-co,node-name=n3,size=1048576,node-name=n4,latency-ns= +5,auto-read-only=false"
            .to_string(),
        format!(
            "driver=raw,node-name=r1,read-only=on,discard=unmap,detect-zeroes=unmap,\
             file.driver=file,file.node-name=f2,file.filename={d}/c.img,file.cache.direct=off,\
             file.cache.no-flush=off"
        ),
        "driver=raw,node-name=r2,offset=512,size=0x200,file.driver=blkdebug,file.node-name=d1,\
         file.image.driver=null-co,file.image.size=1048576,file.inject-error.0.event=read_aio,\
         file.inject-error.0.errno=5,file.inject-error.0.once=on,\
         file.inject-error.1.event=write_aio,file.inject-error.1.sector=010,\
         file.inject-error.1.immediately=y"
            .to_string(),
        format!(
            "driver=qcow2,node-name=q1,backing=,lazy-refcounts=off,\
             file.driver=file,file.filename={d}/q.qcow2"
        ),
    ];
    let mut results = Vec::new();
    for qsd in [true, false] {
        let sock = dir.path().join(if qsd { "qsd.sock" } else { "ours.sock" });
        let mut args = Vec::new();
        for t in &texts {
            args.push("--blockdev".to_string());
            args.push(t.clone());
        }
        args.extend(monitor_args(&sock, "m"));
        let mut daemon = Daemon::start(qsd, &args, dir.path());
        let mut c = Qmp::connect(&sock);
        results.push(named_nodes(&mut c));
        assert_eq!(c.command("quit", json!({})), json!({"return": {}}));
        assert_eq!(
            daemon.wait(Duration::from_secs(10)).code(),
            Some(0),
            "{}",
            daemon.stderr()
        );
    }
    // Including `ro`: an inline `file` child of a read-only node is
    // read-only too, in QEMU and here.
    assert_eq!(results[1], results[0]);
    assert!(results[0].iter().any(|(n, _, _)| n == "n4"));
}

/// What `qemu-img info` lists under `bitmaps` for `img`.
fn image_bitmaps(img: &Path) -> Value {
    let out = Command::new("qemu-img")
        .args(["info", "-U", "--output=json", img.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success());
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    v["format-specific"]["data"]["bitmaps"].clone()
}

#[test]
fn persistent_bitmaps_are_stored_at_exit_like_qsd() {
    common::require_tool("qemu-img");
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("qmp.sock");
    let mut listed = Vec::new();
    for qsd in [true, false] {
        let img = dir.path().join(format!("{qsd}.qcow2"));
        let st = Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", img.to_str().unwrap(), "16M"])
            .status()
            .unwrap();
        assert!(st.success());
        let mut args = s(&[
            "--blockdev",
            &format!(
                "driver=qcow2,node-name=n,file.driver=file,file.filename={}",
                img.display()
            ),
        ]);
        args.extend(monitor_args(&sock, "m"));

        // quit closes the image: the bitmap is stored, not in use.
        let mut d = Daemon::start(qsd, &args, dir.path());
        let mut c = Qmp::connect(&sock);
        c.ok(
            "block-dirty-bitmap-add",
            json!({"node": "n", "name": "b", "persistent": true, "granularity": 4096}),
        );
        c.ok(
            "block-dirty-bitmap-add",
            json!({"node": "n", "name": "off", "persistent": true, "disabled": true}),
        );
        assert_eq!(c.command("quit", json!({})), json!({"return": {}}));
        assert_eq!(
            d.wait(Duration::from_secs(10)).code(),
            Some(0),
            "{}",
            d.stderr()
        );
        let stored = image_bitmaps(&img);

        // Killed with the image open: what it had loaded stays in use.
        let mut d = Daemon::start(qsd, &args, dir.path());
        let mut c = Qmp::connect(&sock);
        let nodes = c.ok("query-named-block-nodes", json!({}));
        let n = nodes
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["node-name"] == "n");
        let loaded = n.unwrap()["dirty-bitmaps"].clone();
        d.signal("-KILL");
        d.wait(Duration::from_secs(10));
        let _ = std::fs::remove_file(&sock);
        listed.push((stored, loaded, image_bitmaps(&img)));
    }
    assert_eq!(listed[0], listed[1]);
    let (stored, loaded, crashed) = &listed[0];
    // New bitmaps go to the directory newest first.
    assert_eq!(
        *stored,
        json!([{"flags": [], "name": "off", "granularity": 65536},
               {"flags": ["auto"], "name": "b", "granularity": 4096}])
    );
    assert_eq!(loaded.as_array().unwrap().len(), 2);
    assert_eq!(crashed[1]["flags"], json!(["in-use", "auto"]));
}

/// `nbdinfo --json URL`, retried until the daemon listens (10 s).
fn nbdinfo_json(url: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = Command::new("nbdinfo")
            .args(["--json", url])
            .output()
            .expect("nbdinfo (libnbd-bin; .ci/run installs it)");
        if out.status.success() {
            return serde_json::from_slice(&out.stdout).expect("nbdinfo's JSON");
        }
        assert!(
            Instant::now() < deadline,
            "nbdinfo {url}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A free TCP port on 127.0.0.1 (bound and released).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The daemon's `--object`, `--nbd-server` and `--export`: the same
/// accepted command lines serve the same export to `nbdinfo --json` (unix
/// and TCP, TLS, `max-connections=1` without multi-conn), and the same
/// bad lines fail with the same line.
#[test]
fn nbd_server_export_and_object_command_lines_match_qsd() {
    common::require_tool("nbdinfo");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let img = d.join("disk.raw");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(4 << 20)
        .unwrap();
    let pki = d.join("pki");
    common::tls::make_pki(&pki, "test CA");
    let sock = d.join("nbd.sock");
    let blockdev = format!("driver=file,node-name=f,filename={}", img.display());
    let port = free_port();
    let unix = format!("addr.type=unix,addr.path={}", sock.display());
    let configs: Vec<(Vec<String>, String)> = vec![
        (
            vec![
                "--blockdev".into(),
                blockdev.clone(),
                "--nbd-server".into(),
                format!("{unix},max-connections=4,handshake-max-seconds=0"),
                "--export".into(),
                "type=nbd,id=e0,node-name=f,name=disk,description=hello,writable=on".into(),
            ],
            format!("nbd+unix:///disk?socket={}", sock.display()),
        ),
        (
            vec![
                "--blockdev".into(),
                blockdev.clone(),
                "--nbd-server".into(),
                format!("addr.type=inet,addr.host=127.0.0.1,addr.port={port},max-connections=1"),
                "--export".into(),
                "nbd,id=e0,node-name=f,allocation-depth=on".into(),
            ],
            format!("nbd://127.0.0.1:{port}/f"),
        ),
        (
            vec![
                "--object".into(),
                format!(
                    "tls-creds-x509,id=t0,dir={},endpoint=server,verify-peer=on",
                    pki.display()
                ),
                "--blockdev".into(),
                blockdev.clone(),
                "--nbd-server".into(),
                format!("{unix},tls-creds=t0"),
                "--export".into(),
                "type=nbd,id=e0,node-name=f,writable=off".into(),
            ],
            format!(
                "nbds+unix:///f?socket={}&tls-certificates={}",
                sock.display(),
                pki.display()
            ),
        ),
    ];
    for ((args, url), multi_conn) in configs.iter().zip([true, false, true]) {
        let mut views = Vec::new();
        for qsd in [true, false] {
            let _ = std::fs::remove_file(&sock);
            let mut daemon = Daemon::start(qsd, args, d);
            views.push(nbdinfo_json(url));
            daemon.signal("-TERM");
            daemon.wait(Duration::from_secs(10));
            // TCP: the port is free again before the next daemon binds.
        }
        let (theirs, ours) = (&views[0], &views[1]);
        assert_eq!(ours["exports"].as_array().unwrap().len(), 1, "{ours}");
        for key in [
            "export-name",
            "description",
            "export-size",
            "is_read_only",
            "can_multi_conn",
            "can_flush",
            "can_fua",
            "can_trim",
            "can_zero",
            "can_fast_zero",
            "can_cache",
            "can_df",
            "contexts",
            "block_size_minimum",
            "block_size_preferred",
            "block_size_maximum",
        ] {
            assert_eq!(
                ours["exports"][0][key], theirs["exports"][0][key],
                "{args:?}: {key}\nours: {ours}\nqsd: {theirs}"
            );
        }
        // max-connections=1 turns multi-conn off (QEMU's multi-conn=auto).
        assert_eq!(ours["exports"][0]["can_multi_conn"], multi_conn, "{ours}");
        for key in ["protocol", "TLS", "structured"] {
            assert_eq!(ours[key], theirs[key], "{args:?}: {key}");
        }
    }
    let _ = std::fs::remove_file(&sock);

    // Bad lines: QSD's line, word for word.
    let bd = |rest: &[&str]| {
        let mut v = vec!["--blockdev".to_string(), blockdev.clone()];
        v.extend(rest.iter().map(|x| x.to_string()));
        v
    };
    let srv = unix.clone();
    let cases: Vec<Vec<String>> = vec![
        s(&["--nbd-server", "addr.type=unix"]),
        s(&["--nbd-server", "addr.type=inet,addr.host=127.0.0.1"]),
        s(&["--nbd-server", "addr.path=/x"]),
        s(&["--nbd-server", "max-connections=2"]),
        s(&["--nbd-server", &format!("{srv},max-connections=x")]),
        s(&["--nbd-server", &format!("{srv},max-connections=-1")]),
        s(&["--nbd-server", &format!("{srv},max-connections=4294967296")]),
        s(&["--nbd-server", &format!("{srv},handshake-max-seconds=x")]),
        s(&["--nbd-server", &format!("{srv},addr.to=x")]),
        s(&["--nbd-server", &format!("{srv},addr.tight=maybe")]),
        s(&["--nbd-server", &format!("{srv},addr.host=h")]),
        s(&[
            "--nbd-server",
            "addr.type=inet,addr.host=127.0.0.1,addr.port=0,addr.to=x",
        ]),
        s(&[
            "--nbd-server",
            "addr.type=inet,addr.host=127.0.0.1,addr.port=0,addr.to=-1",
        ]),
        s(&[
            "--nbd-server",
            "addr.type=inet,addr.host=127.0.0.1,addr.port=0,addr.path=/x",
        ]),
        s(&[
            "--nbd-server",
            "addr.type=inet,addr.host=127.0.0.1,addr.port=0,addr.ipv4=x",
        ]),
        s(&[
            "--nbd-server",
            "addr.type=inet,addr.host=127.0.0.1,addr.port=0,addr.to=65536",
        ]),
        s(&["--nbd-server", &format!("{srv},bogus=1")]),
        s(&[
            "--nbd-server",
            "addr.type=unix,addr.path=/nonexistent/dir/s",
        ]),
        s(&[
            "--nbd-server",
            "addr.type=inet,addr.host=127.0.0.1,addr.port=nope",
        ]),
        s(&["--nbd-server", &format!("{srv},tls-creds=t0")]),
        s(&["--nbd-server", &srv, "--nbd-server", &srv]),
        s(&["--export", "type=nbd,id=e0,node-name=f"]),
        bd(&["--export", "type=nbd,id=e0,node-name=f"]),
        bd(&[
            "--nbd-server",
            &srv,
            "--export",
            "type=nbd,id=e0,node-name=zz",
        ]),
        bd(&[
            "--nbd-server",
            &srv,
            "--export",
            "type=nbd,id=0e,node-name=f",
        ]),
        bd(&["--nbd-server", &srv, "--export", "type=nbd,node-name=f"]),
        bd(&["--nbd-server", &srv, "--export", "type=nbd,id=e0"]),
        bd(&[
            "--nbd-server",
            &srv,
            "--export",
            "type=nbd,id=e0,node-name=f,writable=maybe",
        ]),
        bd(&[
            "--nbd-server",
            &srv,
            "--export",
            "type=nbd,id=e0,node-name=f,bitmaps.0=nope",
        ]),
        bd(&[
            "--nbd-server",
            &srv,
            "--export",
            "type=bogus,id=e0,node-name=f",
        ]),
        bd(&[
            "--nbd-server",
            &srv,
            "--export",
            "type=nbd,id=e0,node-name=f,bogus=1",
        ]),
        bd(&[
            "--nbd-server",
            &srv,
            "--export",
            "type=nbd,id=e0,node-name=f",
            "--export",
            "type=nbd,id=e0,node-name=f,name=other",
        ]),
        bd(&[
            "--nbd-server",
            &srv,
            "--export",
            "type=nbd,id=e0,node-name=f",
            "--export",
            "type=nbd,id=e1,node-name=f,name=f",
        ]),
        s(&["--object", "tls-creds-x509,id=t0"]),
        s(&["--object", "tls-creds-x509,dir=/tmp"]),
        s(&[
            "--object",
            "tls-creds-x509,id=t0,dir=/nonexistent,endpoint=server",
        ]),
        s(&["--object", "tls-creds-x509,id=t0,dir=/tmp,endpoint=bogus"]),
        s(&[
            "--object",
            "tls-creds-x509,id=t0,dir=/tmp,verify-peer=maybe",
        ]),
        s(&["--object", "bogus,id=t0"]),
        s(&[
            "--object",
            &format!("tls-creds-x509,id=t0,dir={},endpoint=client", pki.display()),
            "--nbd-server",
            &format!("{srv},tls-creds=t0"),
        ]),
    ];
    let mut wrong = Vec::new();
    for args in &cases {
        let theirs = refused(true, args, d);
        let _ = std::fs::remove_file(&sock);
        let ours = refused(false, args, d);
        let _ = std::fs::remove_file(&sock);
        if ours != theirs {
            wrong.push(format!("{args:?}\n  ours: {ours}\n  qsd:  {theirs}"));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

/// Where `BLOCK_EXPORT_DELETED` comes relative to `block-export-del`'s
/// reply, byte-level on one monitor, both daemons: without clients before
/// the reply; `hard` with a client connected after it (QEMU replies, then
/// disconnects the client and emits the event).
#[test]
fn export_deleted_comes_where_qemu_sends_it() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("d.raw");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let mut seen = Vec::new();
    for qsd in [true, false] {
        let tag = if qsd { "qsd" } else { "ours" };
        let mon = dir.path().join(format!("{tag}.qmp"));
        let nbd = dir.path().join(format!("{tag}.nbd"));
        let mut d = Daemon::start(qsd, &monitor_args(&mon, "m"), dir.path());
        let mut q = Qmp::connect(&mon);
        q.ok(
            "blockdev-add",
            json!({"driver": "raw", "node-name": "d",
                "file": {"driver": "file", "filename": img}}),
        );
        q.ok(
            "nbd-server-start",
            json!({"addr": {"type": "unix", "data": {"path": nbd}}}),
        );
        // The order of what the monitor sends after a command, up to its
        // reply and (at most 2 s) the event after it.
        let order = |q: &mut Qmp, cmd: Value| -> Vec<String> {
            q.send_raw(format!("{cmd}\n").as_bytes());
            let mut out = Vec::new();
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                assert!(Instant::now() < deadline, "{out:?}");
                let m = q.recv().expect("message");
                if let Some(e) = m.get("event") {
                    out.push(e.as_str().unwrap().to_string());
                    if out.last().unwrap() == "BLOCK_EXPORT_DELETED"
                        && out.contains(&"reply".into())
                    {
                        return out;
                    }
                } else {
                    assert!(m.get("return").is_some(), "{m}");
                    out.push("reply".into());
                    if out.contains(&"BLOCK_EXPORT_DELETED".into()) {
                        return out;
                    }
                }
            }
        };
        q.ok(
            "block-export-add",
            json!({"type": "nbd", "id": "e1", "node-name": "d"}),
        );
        let safe = order(
            &mut q,
            json!({"execute": "block-export-del", "arguments": {"id": "e1"}}),
        );
        q.ok(
            "block-export-add",
            json!({"type": "nbd", "id": "e2", "node-name": "d"}),
        );
        // A client that stays: qemu-io reading commands from a pipe,
        // connected once it answered a read.
        let mut client = Command::new("qemu-io")
            .args(["-r", "-f", "raw"])
            .arg(format!("nbd+unix:///d?socket={}", nbd.display()))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut stdin = client.stdin.take().unwrap();
        stdin.write_all(b"read 0 512\n").unwrap();
        let mut out = std::io::BufReader::new(client.stdout.take().unwrap());
        let mut line = String::new();
        std::io::BufRead::read_line(&mut out, &mut line).unwrap();
        assert!(line.contains("read 512/512"), "qemu-io: {line:?}");
        let hard = order(
            &mut q,
            json!({"execute": "block-export-del", "arguments": {"id": "e2", "mode": "hard"}}),
        );
        drop(stdin);
        let _ = client.wait();
        seen.push((tag, safe, hard));
        q.ok("nbd-server-stop", json!({}));
        drop(q);
        d.signal("-TERM");
        d.wait(Duration::from_secs(10));
    }
    assert_eq!(seen[1].1, seen[0].1, "safe, no client: ours vs QEMU");
    assert_eq!(seen[1].2, seen[0].2, "hard, a client: ours vs QEMU");
    // As recorded from qemu-storage-daemon 10.0.2.
    assert_eq!(seen[0].1, ["BLOCK_EXPORT_DELETED", "reply"]);
    assert_eq!(seen[0].2, ["reply", "BLOCK_EXPORT_DELETED"]);
}
