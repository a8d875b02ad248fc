//! A small QMP client and a `qemu-storage-daemon` launcher, to record
//! what real QEMU does and compare it with us.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// A QMP connection.
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    events: VecDeque<Value>,
    /// The greeting QEMU sent.
    pub greeting: Value,
}

/// `{"class": …, "desc": …}` of a refused command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QmpError {
    pub class: String,
    pub desc: String,
}

impl Qmp {
    /// Connect (retrying until the socket exists) and negotiate.
    pub fn connect(path: &Path) -> Qmp {
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
        let mut q = Qmp {
            reader: BufReader::new(stream),
            writer,
            events: VecDeque::new(),
            greeting: Value::Null,
        };
        q.greeting = q.read_line(Duration::from_secs(10)).expect("greeting");
        q.execute("qmp_capabilities", json!({}))
            .expect("qmp_capabilities");
        q
    }

    fn read_line(&mut self, timeout: Duration) -> Option<Value> {
        self.reader
            .get_ref()
            .set_read_timeout(Some(timeout.max(Duration::from_millis(1))))
            .unwrap();
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => panic!("QMP connection closed"),
            Ok(_) => Some(serde_json::from_str(&line).expect("QMP sends JSON lines")),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                None
            }
            Err(e) => panic!("QMP read: {e}"),
        }
    }

    /// Run a command; events arriving meanwhile are queued.
    pub fn execute(&mut self, cmd: &str, args: Value) -> Result<Value, QmpError> {
        let msg = if args.as_object().is_some_and(|o| o.is_empty()) {
            json!({"execute": cmd})
        } else {
            json!({"execute": cmd, "arguments": args})
        };
        if let Err(e) = writeln!(self.writer, "{msg}") {
            panic!("QMP write of {cmd}: {e} (did the daemon exit?)");
        }
        loop {
            let v = self
                .read_line(Duration::from_secs(30))
                .unwrap_or_else(|| panic!("no reply to {cmd}"));
            if v.get("event").is_some() {
                self.events.push_back(v);
                continue;
            }
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = v.get("error") {
                return Err(QmpError {
                    class: e["class"].as_str().unwrap_or("").into(),
                    desc: e["desc"].as_str().unwrap_or("").into(),
                });
            }
            panic!("unexpected QMP message {v}");
        }
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
            let v = self.read_line(left)?;
            if v.get("event").is_some() {
                return Some(v);
            }
        }
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
