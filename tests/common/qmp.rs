//! A small QMP client and a `qemu-storage-daemon` launcher, to record
//! what real QEMU does and compare it with us.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// How long a read waits before the test fails (a deadline for failures
/// only: nothing waits for it to pass).
const READ_TIMEOUT: Duration = Duration::from_secs(30);

/// A QMP connection (to QEMU's daemon or ours).
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    /// Bytes of a line not complete yet (a read timed out in its middle).
    partial: String,
    events: VecDeque<Value>,
    /// The greeting the server sent (`Null` until read).
    pub greeting: Value,
}

/// `{"class": …, "desc": …}` of a refused command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QmpError {
    pub class: String,
    pub desc: String,
}

/// What one read gave.
enum Read {
    Line(String),
    Eof,
    Timeout,
}

impl Qmp {
    /// Connect (retrying until the socket exists, 10 s at most); nothing
    /// is read yet.
    pub fn connect_raw(path: &Path) -> Qmp {
        let deadline = Instant::now() + Duration::from_secs(10);
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => panic!("connect {}: {e}", path.display()),
            }
        };
        let writer = stream.try_clone().unwrap();
        Qmp {
            reader: BufReader::new(stream),
            writer,
            partial: String::new(),
            events: VecDeque::new(),
            greeting: Value::Null,
        }
    }

    /// Connect, read the greeting, negotiate.
    pub fn connect(path: &Path) -> Qmp {
        let mut q = Qmp::connect_raw(path);
        q.read_greeting();
        q.execute("qmp_capabilities", json!({}))
            .expect("qmp_capabilities");
        q
    }

    /// Read the greeting (also kept in `greeting`).
    pub fn read_greeting(&mut self) -> Value {
        let line = self
            .recv_line()
            .expect("the connection closed before the greeting");
        let g: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"));
        assert!(g.get("QMP").is_some(), "not a greeting: {g}");
        self.greeting = g.clone();
        g
    }

    fn read(&mut self, timeout: Duration) -> Read {
        self.reader
            .get_ref()
            .set_read_timeout(Some(timeout.max(Duration::from_millis(1))))
            .unwrap();
        match self.reader.read_line(&mut self.partial) {
            Ok(0) if self.partial.is_empty() => Read::Eof,
            Ok(_) if self.partial.ends_with('\n') => Read::Line(std::mem::take(&mut self.partial)),
            Ok(_) => panic!("QMP connection closed mid-line: {:?}", self.partial),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                Read::Timeout
            }
            Err(e) => panic!("QMP read: {e}"),
        }
    }

    /// The next line exactly as sent (CRLF included); None at EOF.
    pub fn recv_line(&mut self) -> Option<String> {
        match self.read(READ_TIMEOUT) {
            Read::Line(l) => Some(l),
            Read::Eof => None,
            Read::Timeout => panic!("nothing from the QMP server within {READ_TIMEOUT:?}"),
        }
    }

    /// One line as a message; None for a repeated greeting, which QEMU
    /// sometimes sends to an early client (skipped, with a note).
    fn parse(&self, line: &str) -> Option<Value> {
        let v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line:?}"));
        if v.get("QMP").is_some() && !self.greeting.is_null() {
            eprintln!("note: the QMP server sent its greeting again; skipped");
            return None;
        }
        Some(v)
    }

    /// The next message (reply or event, queued events first); None at
    /// EOF.
    pub fn recv(&mut self) -> Option<Value> {
        if let Some(e) = self.events.pop_front() {
            return Some(e);
        }
        loop {
            let line = self.recv_line()?;
            if let Some(v) = self.parse(&line) {
                return Some(v);
            }
        }
    }

    /// Send bytes as they are.
    pub fn send_raw(&mut self, bytes: &[u8]) {
        if let Err(e) = self.writer.write_all(bytes) {
            panic!("QMP write: {e} (did the daemon exit?)");
        }
    }

    /// Run a command: its whole reply object (events meanwhile are
    /// queued).
    pub fn command(&mut self, cmd: &str, args: Value) -> Value {
        let msg = if args.as_object().is_some_and(|o| o.is_empty()) {
            json!({"execute": cmd})
        } else {
            json!({"execute": cmd, "arguments": args})
        };
        self.send_raw(format!("{msg}\n").as_bytes());
        loop {
            let line = self
                .recv_line()
                .unwrap_or_else(|| panic!("EOF waiting for the reply to {cmd}"));
            let Some(v) = self.parse(&line) else {
                continue;
            };
            if v.get("event").is_some() {
                self.events.push_back(v);
                continue;
            }
            if v.get("return").is_some() || v.get("error").is_some() {
                return v;
            }
            panic!("unexpected QMP message {v}");
        }
    }

    /// Run a command: its `return`, or its error.
    pub fn execute(&mut self, cmd: &str, args: Value) -> Result<Value, QmpError> {
        let r = self.command(cmd, args);
        if let Some(e) = r.get("error") {
            return Err(QmpError {
                class: e["class"].as_str().unwrap_or("").into(),
                desc: e["desc"].as_str().unwrap_or("").into(),
            });
        }
        Ok(r["return"].clone())
    }

    /// The `return` of a command that must succeed.
    pub fn ok(&mut self, cmd: &str, args: Value) -> Value {
        self.execute(cmd, args.clone())
            .unwrap_or_else(|e| panic!("{cmd} {args}: {e:?}"))
    }

    /// The next event, waiting up to `timeout`.
    pub fn next_event(&mut self, timeout: Duration) -> Option<Value> {
        if let Some(e) = self.events.pop_front() {
            return Some(e);
        }
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            match self.read(left) {
                Read::Line(l) => {
                    if let Some(v) = self.parse(&l)
                        && v.get("event").is_some()
                    {
                        return Some(v);
                    }
                }
                Read::Eof => panic!("QMP connection closed"),
                Read::Timeout => return None,
            }
        }
    }

    /// Wait for event `name`: every event up to it (included).
    pub fn until_event(&mut self, name: &str) -> Vec<Value> {
        let mut seen = Vec::new();
        loop {
            let ev = self
                .recv()
                .unwrap_or_else(|| panic!("EOF waiting for {name}; saw {seen:?}"));
            assert!(ev.get("event").is_some(), "not an event: {ev}");
            let done = ev["event"] == name;
            seen.push(ev);
            if done {
                return seen;
            }
        }
    }

    /// Every message until EOF (queued events first).
    pub fn drain(&mut self) -> Vec<Value> {
        std::iter::from_fn(|| self.recv()).collect()
    }

    /// Every complete message a server sent before it was killed (queued
    /// events first): read until EOF, a connection reset (it died with a
    /// command of ours unread) or a line cut short.
    pub fn drain_after_kill(&mut self) -> Vec<Value> {
        let mut out: Vec<Value> = self.events.drain(..).collect();
        self.reader
            .get_ref()
            .set_read_timeout(Some(READ_TIMEOUT))
            .unwrap();
        while let Ok(n) = self.reader.read_line(&mut self.partial) {
            if n == 0 || !self.partial.ends_with('\n') {
                break;
            }
            let line = std::mem::take(&mut self.partial);
            if let Some(v) = self.parse(&line) {
                out.push(v);
            }
        }
        out
    }
}

/// A running `qemu-storage-daemon` with one QMP monitor; killed on drop.
/// If the test panics, the daemon's exit status and stderr are printed.
pub struct Daemon {
    child: Child,
    pub qmp: Qmp,
    dir: tempfile::TempDir,
}

impl Daemon {
    /// Start `qemu-storage-daemon` with a monitor on a private socket.
    pub fn start() -> Daemon {
        super::require_tool("qemu-storage-daemon");
        let dir = tempfile::tempdir().unwrap();
        let sock: PathBuf = dir.path().join("qmp.sock");
        let child = Command::new("qemu-storage-daemon")
            .arg("--chardev")
            .arg(format!(
                "socket,id=m,path={},server=on,wait=off",
                sock.display()
            ))
            .arg("--monitor")
            .arg("chardev=m")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("stderr")).unwrap())
            .spawn()
            .expect("start qemu-storage-daemon");
        let qmp = Qmp::connect(&sock);
        Daemon { child, qmp, dir }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let status = self.child.try_wait();
            let stderr =
                std::fs::read_to_string(self.dir.path().join("stderr")).unwrap_or_default();
            eprintln!("qemu-storage-daemon: status {status:?}, stderr:\n{stderr}");
            let _ = self.child.kill();
            let _ = self.child.wait();
            return;
        }
        // The daemon may have died (QEMU 10.0 has crashes of its own, e.g.
        // on an empty bitmap merge): report it, do not panic in drop.
        if let Ok(Some(status)) = self.child.try_wait() {
            let stderr =
                std::fs::read_to_string(self.dir.path().join("stderr")).unwrap_or_default();
            eprintln!("qemu-storage-daemon had exited: {status}; stderr:\n{stderr}");
            return;
        }
        let quit = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.qmp.execute("quit", json!({}))
        }));
        if quit.is_err() {
            let _ = self.child.kill();
            let _ = self.child.wait();
            return;
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The short form of an event used in traces: `JSC:running`,
/// `ERR(read,stop)`, `READY`, `COMPLETED`, `COMPLETED(text)`, `CANCELLED`,
/// `PENDING`.
pub fn summarize(ev: &Value) -> String {
    let d = &ev["data"];
    match ev["event"].as_str().unwrap_or("") {
        "JOB_STATUS_CHANGE" => format!("JSC:{}", d["status"].as_str().unwrap_or("")),
        "BLOCK_JOB_ERROR" => format!(
            "ERR({},{})",
            d["operation"].as_str().unwrap_or(""),
            d["action"].as_str().unwrap_or("")
        ),
        "BLOCK_JOB_READY" => "READY".into(),
        "BLOCK_JOB_PENDING" => "PENDING".into(),
        "BLOCK_JOB_CANCELLED" => "CANCELLED".into(),
        "BLOCK_JOB_COMPLETED" => match d["error"].as_str() {
            Some(e) => format!("COMPLETED({e})"),
            None => "COMPLETED".into(),
        },
        other => other.to_string(),
    }
}
