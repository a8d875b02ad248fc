//! `blockjob daemon`: qemu-storage-daemon's command line, serving QMP on
//! UNIX sockets over the library's [`Session`].
//!
//! Startup follows QSD: options are processed in command-line order
//! (`--blockdev` through `blockdev-add`, `--chardev` binds its socket,
//! `--monitor` attaches to an earlier chardev), then the pid file is
//! written, then the daemon is ready (with `--daemonize` the parent exits
//! 0 only now). Any error prints one line, `blockjob: OPTION: text`, removes
//! what was created and exits 1.
//!
//! Threads: one acceptor per monitor; per client a reader that feeds the
//! bytes to its `Session` and writes the replies, and, once capabilities
//! are negotiated, an event forwarder draining a subscription to the
//! event stream. Both write whole messages to the socket under one mutex.
//! A client that goes away (even mid-line or mid-command) ends only its
//! own two threads. SIGTERM, SIGINT and SIGHUP are blocked in every
//! thread and taken by a `sigwait` thread; they, or `quit` on any
//! monitor, wake the main thread, which cancels every job (forced) and
//! waits for them, flushes every node, lets the forwarders send what was
//! queued, removes the sockets and the pid file and exits 0.
//!
//! `--daemonize` re-executes the binary in a new process group with a
//! pipe on its stdout instead of `fork()` (the crate has no unsafe code
//! outside the C ABI): the child writes one byte when it is ready, then
//! moves stdin/stdout/stderr to /dev/null and its working directory to
//! `/` as QSD does; the parent exits 0 on that byte, 1 if the child
//! failed (its error went to the shared stderr).
//!
//! Output is QEMU's: `", "`/`": "` separators, non-ASCII as `\uXXXX`,
//! `pretty=on` indenting by four, every line ending in CRLF.

use parking_lot::{Condvar, Mutex, MutexGuard};
use std::collections::HashMap;
use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, mpsc};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use blockjob::Context;
use blockjob::events::SubscriptionCloser;
use blockjob::qmp::{self, Session};
use nix::fcntl::{Flock, FlockArg};
use nix::sys::stat::{Mode, umask};
use serde_json::Value;

use crate::chardev;
use crate::daemon_args::{self, Opt, Parsed};

/// Set in the environment of the re-executed child of `--daemonize`.
const CHILD_ENV: &str = "BLOCKJOB_DAEMONIZED_CHILD";

/// Print `blockjob: MSG` and exit 1.
fn fail(msg: impl std::fmt::Display) -> ! {
    eprintln!("blockjob: {msg}");
    std::process::exit(1)
}

/// strerror's text of an I/O error.
fn os_text(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(n) => nix::errno::Errno::from_raw(n).desc().to_string(),
        None => e.to_string(),
    }
}

/// `blockjob daemon ARGS…`: never returns.
pub fn run(args: Vec<OsString>) -> ! {
    let args: Vec<String> = args
        .into_iter()
        .map(|a| {
            a.into_string()
                .unwrap_or_else(|a| fail(format!("{}: invalid UTF-8", a.to_string_lossy())))
        })
        .collect();
    let a = match daemon_args::parse_args(&args) {
        Ok(Parsed::Help) => {
            print!("{}", daemon_args::HELP);
            std::process::exit(0)
        }
        Ok(Parsed::Version) => {
            let (ma, mi, mc) = qmp::VERSION;
            println!(
                "blockjob version {ma}.{mi}.{mc} (blockjob {})",
                env!("CARGO_PKG_VERSION")
            );
            println!(
                "QEMU's block jobs in Rust, speaking QMP as qemu-storage-daemon {ma}.{mi}.{mc} does"
            );
            std::process::exit(0)
        }
        Ok(Parsed::Run(a)) => a,
        Err(e) => fail(e),
    };
    let daemon_child = a.daemonize && std::env::var_os(CHILD_ENV).is_some();
    if a.daemonize && !daemon_child {
        daemonize_parent(&args);
    }
    // Before any thread exists, so that every thread inherits the mask.
    let signals = signals::block().unwrap_or_else(|e| fail(format!("cannot block signals: {e}")));

    let ctx = Arc::new(Context::new());
    let mut sockets: Vec<PathBuf> = Vec::new();
    let startup_fail = |sockets: &[PathBuf], msg: String| -> ! {
        for s in sockets {
            let _ = std::fs::remove_file(s);
        }
        fail(msg)
    };
    let mut chardevs: HashMap<String, Option<UnixListener>> = HashMap::new();
    let mut monitors: Vec<(UnixListener, bool)> = Vec::new();
    for opt in &a.opts {
        match opt {
            Opt::Blockdev(text) => {
                let r = blockjob::block::options::blockdev_options(text).and_then(|v| {
                    ctx.blockdev_add(&v)
                        .map(|_| ())
                        .map_err(|e| e.message().to_string())
                });
                if let Err(e) = r {
                    startup_fail(&sockets, format!("--blockdev {text}: {e}"));
                }
            }
            Opt::Chardev(text) => {
                let r = chardev::parse_chardev(text).and_then(|c| {
                    if chardevs.contains_key(&c.id) {
                        return Err(format!("Duplicate ID '{}' for chardev", c.id));
                    }
                    let path = std::path::absolute(&c.path).map_err(|e| {
                        format!("Failed to bind socket to {}: {}", c.path, os_text(&e))
                    })?;
                    let l = listen(&path)?;
                    sockets.push(path);
                    chardevs.insert(c.id, Some(l));
                    Ok(())
                });
                if let Err(e) = r {
                    startup_fail(&sockets, format!("--chardev {text}: {e}"));
                }
            }
            Opt::Monitor(text) => {
                let r =
                    chardev::parse_monitor(text).and_then(|m| match chardevs.get_mut(&m.chardev) {
                        None => Err(format!("chardev \"{}\" not found", m.chardev)),
                        Some(slot) => match slot.take() {
                            None => Err(format!("chardev '{}' is already in use", m.chardev)),
                            Some(l) => {
                                monitors.push((l, m.pretty));
                                Ok(())
                            }
                        },
                    });
                if let Err(e) = r {
                    startup_fail(&sockets, format!("--monitor {text}: {e}"));
                }
            }
        }
    }
    // The pid file is locked for the daemon's lifetime (the lock goes
    // with the process).
    let pidfile = a.pidfile.as_deref().map(|p| {
        write_pidfile(p)
            .unwrap_or_else(|e| startup_fail(&sockets, format!("cannot create PID file: {e}")))
    });

    let (stop_tx, stop_rx) = mpsc::channel();
    let shared = Arc::new(Shared {
        ctx,
        stop: stop_tx,
        stopping: AtomicBool::new(false),
        clients: Mutex::new(HashMap::new()),
        next_client: AtomicU64::new(1),
    });
    for (listener, pretty) in monitors {
        let s = shared.clone();
        let r = thread::Builder::new()
            .name("bj-qmp-accept".into())
            .spawn(move || accept_loop(s, listener, pretty));
        if let Err(e) = r {
            startup_fail(&sockets, format!("cannot start a monitor thread: {e}"));
        }
    }
    let tx = shared.stop.clone();
    let r = thread::Builder::new()
        .name("bj-signals".into())
        .spawn(move || {
            loop {
                let sig = signals.wait();
                if tx.send(sig).is_err() {
                    return;
                }
            }
        });
    if let Err(e) = r {
        startup_fail(&sockets, format!("cannot start the signal thread: {e}"));
    }
    if daemon_child {
        detach();
    }

    // Wait for SIGTERM/SIGINT/SIGHUP or `quit`.
    let _ = stop_rx.recv();
    shutdown(&shared);
    for s in &sockets {
        let _ = std::fs::remove_file(s);
    }
    if let Some((path, _lock)) = pidfile {
        let _ = std::fs::remove_file(path);
    }
    std::process::exit(0)
}

/// What the threads share.
struct Shared {
    ctx: Arc<Context>,
    /// Wakes the main thread to shut down (the value is the signal, 0 for `quit`).
    stop: mpsc::Sender<i32>,
    /// Set when shutting down: clients execute nothing more.
    stopping: AtomicBool,
    /// Clients' event forwarders (once negotiated), by client number.
    clients: Mutex<HashMap<u64, Option<Forwarder>>>,
    next_client: AtomicU64,
}

/// A client's event forwarder: its subscription's closer and its thread.
type Forwarder = (SubscriptionCloser, JoinHandle<()>);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock()
}

/// Cancel every job and wait, flush every node, let the forwarders send
/// the events already queued (a second at most).
fn shutdown(shared: &Shared) {
    shared.stopping.store(true, Ordering::SeqCst);
    // A job a client started while the first round ran is cancelled by
    // the next.
    for _ in 0..3 {
        shared.ctx.shutdown();
        if shared.ctx.query_jobs().is_empty() {
            break;
        }
    }
    for node in shared.ctx.graph().nodes() {
        if let Err(e) = node.flush() {
            eprintln!("blockjob: Failed to flush node '{}': {e}", node.name());
        }
    }
    let forwarders: Vec<Forwarder> = lock(&shared.clients)
        .drain()
        .filter_map(|(_, f)| f)
        .collect();
    let mut threads = Vec::new();
    for (closer, t) in forwarders {
        closer.close();
        threads.push(t);
    }
    let deadline = Instant::now() + Duration::from_secs(1);
    while threads.iter().any(|t| !t.is_finished()) && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(5));
    }
}

/// Bind a UNIX socket with mode 0600 (replacing a stale socket file, as
/// QEMU unlinks before binding).
fn listen(path: &Path) -> Result<UnixListener, String> {
    let bind_err = |e: &io::Error| {
        format!(
            "Failed to bind socket to {}: {}",
            path.display(),
            os_text(e)
        )
    };
    if let Ok(m) = std::fs::symlink_metadata(path)
        && m.file_type().is_socket()
    {
        let _ = std::fs::remove_file(path);
    }
    // No other thread runs yet: the umask change is seen by this bind only.
    let old = umask(Mode::from_bits_truncate(0o177));
    let r = UnixListener::bind(path);
    umask(old);
    let l = r.map_err(|e| bind_err(&e))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(|e| {
        let _ = std::fs::remove_file(path);
        bind_err(&e)
    })?;
    Ok(l)
}

/// Create, lock and fill the pid file; its absolute path (for removal
/// after `chdir("/")`) and the lock.
fn write_pidfile(path: &str) -> Result<(PathBuf, Flock<File>), String> {
    let create_err = |e: &io::Error| format!("Could not create '{path}': {}", os_text(e));
    let abs = std::path::absolute(path).map_err(|e| create_err(&e))?;
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&abs)
        .map_err(|e| create_err(&e))?;
    let f = Flock::lock(f, FlockArg::LockExclusiveNonblock)
        .map_err(|(_, e)| format!("Cannot lock pid file: {}", e.desc()))?;
    let write_err = |e: io::Error| format!("Failed to write pid file: {}", os_text(&e));
    f.set_len(0).map_err(write_err)?;
    (&*f)
        .write_all(format!("{}\n", std::process::id()).as_bytes())
        .map_err(write_err)?;
    Ok((abs, f))
}

/// `--daemonize` in the parent: start the daemon as a child and exit 0
/// once it is ready, 1 if it fails.
fn daemonize_parent(args: &[String]) -> ! {
    let exe = std::env::current_exe()
        .unwrap_or_else(|e| fail(format!("--daemonize: cannot find the executable: {e}")));
    let mut child = Command::new(exe)
        .arg("daemon")
        .args(args)
        .env(CHILD_ENV, "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .process_group(0)
        .spawn()
        .unwrap_or_else(|e| fail(format!("--daemonize: cannot start the daemon: {e}")));
    let mut ready = [1u8];
    if let Some(mut out) = child.stdout.take() {
        loop {
            match out.read(&mut ready) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                _ => break,
            }
        }
    }
    if ready[0] == 0 {
        std::process::exit(0);
    }
    let _ = child.wait();
    std::process::exit(1)
}

/// The daemonized child is ready: tell the parent, then leave the
/// terminal and the working directory as QSD does.
fn detach() {
    let mut out = io::stdout().lock();
    let _ = out.write_all(&[0]);
    let _ = out.flush();
    if let Ok(null) = OpenOptions::new().read(true).write(true).open("/dev/null") {
        for fd in 0..=2 {
            let _ = nix::unistd::dup2(null.as_raw_fd(), fd);
        }
    }
    let _ = std::env::set_current_dir("/");
}

fn accept_loop(shared: Arc<Shared>, listener: UnixListener, pretty: bool) {
    for conn in listener.incoming() {
        match conn {
            Ok(stream) => {
                let s = shared.clone();
                // If no thread can be started, the connection is dropped.
                let _ = thread::Builder::new()
                    .name("bj-qmp-client".into())
                    .spawn(move || serve(s, stream, pretty));
            }
            // Out of file descriptors and the like: try again shortly.
            Err(_) => thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// The write half of a client connection.
struct Out {
    stream: UnixStream,
    pretty: bool,
}

/// The sequence number of the last event sent to a client (`None` before
/// it negotiated): a reply waits until the events its command caused are
/// out, since QEMU sends those first.
#[derive(Default)]
struct Delivered {
    seq: Mutex<Option<u64>>,
    sent: Condvar,
}

impl Delivered {
    fn set(&self, seq: u64) {
        *lock(&self.seq) = Some(seq);
        self.sent.notify_all();
    }

    /// Wait (briefly: a forwarder that died must not stall replies) until
    /// every event up to `target` was sent.
    fn wait_for(&self, target: u64) {
        let deadline = Instant::now() + Duration::from_millis(500);
        let mut g = lock(&self.seq);
        while let Some(seq) = *g {
            let now = Instant::now();
            if seq >= target || now >= deadline {
                break;
            }
            self.sent.wait_for(&mut g, deadline - now);
        }
    }
}

fn send(out: &Mutex<Out>, v: &Value) -> io::Result<()> {
    let mut o = lock(out);
    let mut text = String::new();
    qemu_json(v, o.pretty, 0, &mut text);
    text.push_str("\r\n");
    o.stream.write_all(text.as_bytes())
}

/// One client, on its own thread.
fn serve(shared: Arc<Shared>, stream: UnixStream, pretty: bool) {
    let id = shared.next_client.fetch_add(1, Ordering::Relaxed);
    lock(&shared.clients).insert(id, None);
    let keep_forwarder = serve_requests(&shared, id, stream, pretty);
    if !keep_forwarder {
        let f = lock(&shared.clients).remove(&id).flatten();
        if let Some((closer, t)) = f {
            closer.close();
            let _ = t.join();
        }
    }
}

/// Read requests until the client goes away; true when the daemon is
/// stopping and the forwarder should still send the last events.
fn serve_requests(shared: &Arc<Shared>, id: u64, mut stream: UnixStream, pretty: bool) -> bool {
    let Ok(w) = stream.try_clone() else {
        return false;
    };
    let out = Arc::new(Mutex::new(Out { stream: w, pretty }));
    let delivered = Arc::new(Delivered::default());
    if send(&out, &qmp::greeting()).is_err() {
        return false;
    }
    let mut session = Session::new(&shared.ctx);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        };
        let mut rest = &buf[..n];
        while !rest.is_empty() {
            if shared.stopping.load(Ordering::SeqCst) {
                return true;
            }
            // Until negotiated, one line at a time: the event subscription
            // starts right after `qmp_capabilities`.
            let chunk = match rest.iter().position(|&b| b == b'\n') {
                Some(p) if !session.in_command_mode() => &rest[..=p],
                _ => rest,
            };
            rest = &rest[chunk.len()..];
            let negotiated = session.in_command_mode();
            let replies = session.feed(chunk);
            if !negotiated && session.in_command_mode() {
                start_forwarder(shared, id, &out, &delivered);
            } else if negotiated {
                delivered.wait_for(shared.ctx.bus().last_seq());
            }
            for r in &replies {
                if send(&out, r).is_err() {
                    let _ = stream.shutdown(Shutdown::Both);
                    return false;
                }
            }
            if session.quit_requested() {
                let _ = shared.stop.send(0);
                return true;
            }
        }
    }
    let _ = stream.shutdown(Shutdown::Both);
    false
}

/// Send every event from now on to the client.
fn start_forwarder(shared: &Shared, id: u64, out: &Arc<Mutex<Out>>, delivered: &Arc<Delivered>) {
    // Events up to here are not this client's.
    delivered.set(shared.ctx.bus().last_seq());
    let sub = shared.ctx.subscribe();
    let closer = sub.closer();
    let out = out.clone();
    let delivered = delivered.clone();
    let t = thread::Builder::new()
        .name("bj-qmp-events".into())
        .spawn(move || {
            while let Some(ev) = sub.next_blocking() {
                if send(&out, &ev.to_qmp_value()).is_err() {
                    // Wake the reader too.
                    let _ = lock(&out).stream.shutdown(Shutdown::Both);
                    break;
                }
                delivered.set(ev.seq);
            }
        });
    if let Ok(t) = t {
        match lock(&shared.clients).get_mut(&id) {
            Some(slot) => *slot = Some((closer, t)),
            // Shutting down already: this one ends with its subscription.
            None => closer.close(),
        }
    }
}

/// QEMU's JSON writer (`json-writer.c`): `", "` and `": "` separators, or
/// with `pretty` a newline and four spaces per level; strings with every
/// character outside printable ASCII as `\uXXXX`.
fn qemu_json(v: &Value, pretty: bool, level: usize, out: &mut String) {
    let newline = |out: &mut String, level: usize| {
        if pretty {
            out.push_str("\r\n");
            out.extend(std::iter::repeat_n("    ", level));
        }
    };
    match v {
        Value::Object(m) => {
            out.push('{');
            for (n, (k, c)) in m.iter().enumerate() {
                if n > 0 {
                    out.push(',');
                    if !pretty {
                        out.push(' ');
                    }
                }
                newline(out, level + 1);
                qemu_str(k, out);
                out.push_str(": ");
                qemu_json(c, pretty, level + 1, out);
            }
            if !m.is_empty() || pretty {
                newline(out, level);
            }
            out.push('}');
        }
        Value::Array(a) => {
            out.push('[');
            for (n, c) in a.iter().enumerate() {
                if n > 0 {
                    out.push(',');
                    if !pretty {
                        out.push(' ');
                    }
                }
                newline(out, level + 1);
                qemu_json(c, pretty, level + 1, out);
            }
            if !a.is_empty() || pretty {
                newline(out, level);
            }
            out.push(']');
        }
        Value::String(s) => qemu_str(s, out),
        other => out.push_str(&other.to_string()),
    }
}

fn qemu_str(s: &str, out: &mut String) {
    use std::fmt::Write as _;
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            ' '..='~' => out.push(c),
            _ => {
                let mut units = [0u16; 2];
                for u in c.encode_utf16(&mut units) {
                    let _ = write!(out, "\\u{u:04X}");
                }
            }
        }
    }
    out.push('"');
}

mod signals {
    //! QSD's termination signals (SIGTERM, SIGINT, SIGHUP), blocked in
    //! every thread and taken synchronously by `sigwait` on one thread: no
    //! asynchronous handler runs.

    use std::io;

    use nix::sys::signal::{SigSet, Signal};

    /// The blocked set.
    pub struct Set(SigSet);

    /// Block the signals in the calling thread (threads started later
    /// inherit the mask).
    pub fn block() -> io::Result<Set> {
        let mut set = SigSet::empty();
        for s in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
            set.add(s);
        }
        set.thread_block().map_err(io::Error::from)?;
        Ok(Set(set))
    }

    impl Set {
        /// Wait for one of the signals; its number.
        pub fn wait(&self) -> i32 {
            loop {
                if let Ok(sig) = self.0.wait() {
                    return sig as i32;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn j(v: Value, pretty: bool) -> String {
        let mut s = String::new();
        qemu_json(&v, pretty, 0, &mut s);
        s
    }

    #[test]
    fn qemu_json_text() {
        assert_eq!(
            j(json!({"return": {}, "id": [1, "é"]}), false),
            r#"{"return": {}, "id": [1, "\u00E9"]}"#
        );
        assert_eq!(
            j(json!({"return": {}}), true),
            "{\r\n    \"return\": {\r\n    }\r\n}"
        );
        assert_eq!(
            j(json!({"a": {"b": [1, 2]}}), true),
            "{\r\n    \"a\": {\r\n        \"b\": [\r\n            1,\r\n            2\r\n        ]\r\n    }\r\n}"
        );
        assert_eq!(j(json!("\u{1F600}"), false), r#""\uD83D\uDE00""#);
    }
}
