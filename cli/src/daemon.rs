//! `blockjob daemon`: qemu-storage-daemon's command line, serving QMP on
//! UNIX sockets with the library's [`QmpServer`]. This file owns only the
//! process: options, sockets, pid file, signals, `--daemonize`, exit.
//!
//! Startup follows QSD: options are processed in command-line order
//! (`--blockdev` through `blockdev-add`, `--chardev` binds its socket,
//! `--monitor` attaches to an earlier chardev), then the pid file is
//! written, then the daemon is ready (with `--daemonize` the parent exits
//! 0 only now). Any error prints one line, `blockjob: OPTION: text`, removes
//! what was created and exits 1.
//!
//! SIGTERM, SIGINT and SIGHUP are blocked in every thread and taken by a
//! `sigwait` thread; they, or `quit` on any monitor, wake the main thread,
//! which removes the sockets, stops every monitor from executing commands,
//! cancels every job (forced) and waits for them, flushes every node,
//! stops the monitors (their clients get the events queued until then),
//! removes the pid file and exits 0.
//!
//! `--daemonize` re-executes the binary with a pipe on its stdout instead
//! of `fork()` (the crate has no unsafe code outside the C ABI); the
//! child starts a session of its own (`setsid`: a closing terminal's
//! SIGHUP does not reach it) and sets umask 027, as QSD's daemon does,
//! writes one byte when it is ready, then moves stdin/stdout/stderr to
//! /dev/null and its working directory to `/` as QSD does; the parent
//! exits 0 on that byte, 1 if the child failed (its error went to the
//! shared stderr). QSD forks twice, so that its daemon does not lead its
//! session; ours does (it never opens a terminal, so it cannot acquire
//! one).

use std::collections::HashMap;
use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, mpsc};
use std::thread;

use blockjob::Context;
use blockjob::qapi::keyval::{keyval_parse, parse_bool, parse_int};
use blockjob::qmp::socket::{self, SocketFile};
use blockjob::qmp::{self, QmpServer, QmpServerOptions};
use nix::fcntl::{Flock, FlockArg};
use serde_json::{Map, Value, json};

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
    if daemon_child {
        // As QSD's daemon: a session of its own, so that no terminal's
        // hangup reaches it, and umask 027 for what it creates (its
        // sockets are 0750 whatever the caller's umask was). Cannot fail:
        // the re-executed child leads no process group.
        let _ = nix::unistd::setsid();
        nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o027));
    }
    // Before any thread exists, so that every thread inherits the mask.
    let signals = signals::block().unwrap_or_else(|e| fail(format!("cannot block signals: {e}")));

    let ctx = Arc::new(Context::new());
    let mut sockets: Vec<SocketFile> = Vec::new();
    let startup_fail = |sockets: &[SocketFile], msg: String| -> ! {
        for s in sockets {
            s.remove();
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
            Opt::NbdServer(text) => {
                if let Err(e) = nbd_server(&ctx, text) {
                    startup_fail(&sockets, format!("--nbd-server {text}: {e}"));
                }
            }
            Opt::Export(text) => {
                if let Err(e) = export(&ctx, text) {
                    startup_fail(&sockets, format!("--export {text}: {e}"));
                }
            }
            Opt::Object(text) => {
                if let Err(e) = blockjob::qmp::object::object_add_cmdline(&ctx, text) {
                    startup_fail(&sockets, format!("--object {text}: {}", e.message()));
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
                    let (l, file) = listen(&path)?;
                    sockets.push(file);
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

    // The value is the signal, 0 for `quit`.
    let (stop_tx, stop_rx) = mpsc::channel::<i32>();
    let mut servers = Vec::new();
    for (listener, pretty) in monitors {
        let tx = stop_tx.clone();
        let mut opts = QmpServerOptions::default();
        opts.pretty = pretty;
        opts.on_quit = Some(Box::new(move || {
            let _ = tx.send(0);
        }));
        match QmpServer::start(ctx.clone(), listener, opts) {
            Ok(s) => servers.push(s),
            Err(e) => startup_fail(&sockets, format!("cannot start a monitor: {e}")),
        }
    }
    let r = thread::Builder::new()
        .name("bj-signals".into())
        .spawn(move || {
            loop {
                let sig = signals.wait();
                if stop_tx.send(sig).is_err() {
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
    // First, while every listener is still open (see SocketFile::remove):
    // no one new connects from here on.
    for s in &sockets {
        s.remove();
    }
    stop(&ctx, servers);
    drop(chardevs);
    if let Some((path, _lock)) = pidfile {
        let _ = std::fs::remove_file(path);
    }
    std::process::exit(0)
}

/// A keyval member typed as QAPI's `bool` (`on`/`off`, QEMU's spellings).
fn kv_bool(m: &mut Map<String, Value>, key: &str, name: &str) -> Result<(), String> {
    if let Some(Value::String(v)) = m.get(key) {
        let b = parse_bool(v).ok_or_else(|| format!("Parameter '{name}' expects 'on' or 'off'"))?;
        m.insert(key.into(), Value::Bool(b));
    }
    Ok(())
}

/// A keyval member typed as QAPI's `uint32` (or `uint16` with
/// `bits` 16). As QEMU's visitors: a value that is no number at all is
/// refused under the member's full name (`addr.to`), one out of range
/// under its bare name (`to`).
fn kv_uint(m: &mut Map<String, Value>, key: &str, name: &str, bits: u32) -> Result<(), String> {
    if let Some(Value::String(v)) = m.get(key) {
        let n = parse_int(v).ok_or_else(|| format!("Parameter '{name}' expects integer"))?;
        if !(0..(1i64 << bits)).contains(&n) {
            return Err(format!("Parameter '{key}' expects uint{bits}_t"));
        }
        m.insert(key.into(), Value::from(n));
    }
    Ok(())
}

/// Runs a QMP command for a command-line option: its error text.
fn run_qmp(ctx: &Context, name: &str, args: Value) -> Result<(), String> {
    let r = blockjob::qmp::execute(ctx, &json!({"execute": name, "arguments": args}));
    match r.get("error") {
        Some(e) => Err(e["desc"].as_str().unwrap_or("error").to_string()),
        None => Ok(()),
    }
}

/// `--nbd-server`: QSD's `NbdServerOptions`, whose `addr` is the flat
/// `SocketAddress` (`addr.type=unix,addr.path=P`), run as
/// `nbd-server-start` with the legacy form QMP takes.
fn nbd_server(ctx: &Context, text: &str) -> Result<(), String> {
    let mut m = keyval_parse(text, None)?;
    let mut addr = match m.remove("addr") {
        Some(Value::Object(a)) => a,
        Some(_) => return Err("Invalid parameter type for 'addr', expected: object".into()),
        None => return Err("Parameter 'addr' is missing".into()),
    };
    let kind = match addr.remove("type") {
        Some(Value::String(t)) => t,
        _ => return Err("Parameter 'addr.type' is missing".into()),
    };
    // The flat SocketAddress's branches: (required, bools, uint16s, the
    // other members).
    let (required, bools, u16s, strings): (&[&str], &[&str], &[&str], &[&str]) = match kind.as_str()
    {
        "unix" => (&["path"], &["abstract", "tight"], &[], &["path"]),
        "inet" => (
            &["host", "port"],
            &["numeric", "ipv4", "ipv6", "keep-alive", "mptcp"],
            &["to"],
            &["host", "port"],
        ),
        // vsock and fd: refused by nbd-server-start with our text.
        _ => (&[], &[], &[], &[]),
    };
    for r in required {
        if !addr.contains_key(*r) {
            return Err(format!("Parameter 'addr.{r}' is missing"));
        }
    }
    for b in bools {
        kv_bool(&mut addr, b, &format!("addr.{b}"))?;
    }
    for n in u16s {
        kv_uint(&mut addr, n, &format!("addr.{n}"), 16)?;
    }
    // QEMU's visitor rejects members of another branch as unexpected,
    // under their command-line name.
    if matches!(kind.as_str(), "unix" | "inet")
        && let Some(k) = addr.keys().find(|k| {
            ![bools, u16s, strings]
                .iter()
                .any(|l| l.contains(&k.as_str()))
        })
    {
        return Err(format!("Parameter 'addr.{k}' is unexpected"));
    }
    kv_uint(&mut m, "max-connections", "max-connections", 32)?;
    kv_uint(&mut m, "handshake-max-seconds", "handshake-max-seconds", 32)?;
    m.insert("addr".into(), json!({"type": kind, "data": addr}));
    run_qmp(ctx, "nbd-server-start", Value::Object(m))
}

/// `--export`: `block-export-add` from keyval (`type` may be implied).
fn export(ctx: &Context, text: &str) -> Result<(), String> {
    let mut m = keyval_parse(text, Some("type"))?;
    for b in [
        "fixed-iothread",
        "writable",
        "writethrough",
        "allow-inactive",
        "allocation-depth",
    ] {
        kv_bool(&mut m, b, b)?;
    }
    run_qmp(ctx, "block-export-add", Value::Object(m))
}

/// No more commands on any monitor; cancel every job and wait, flush
/// every node; then close the monitors, whose clients get the events
/// queued until then.
fn stop(ctx: &Context, servers: Vec<QmpServer>) {
    // stop_commands waits for commands in progress: no job starts after.
    for s in &servers {
        s.stop_commands();
    }
    ctx.shutdown();
    for node in ctx.graph().nodes() {
        if let Err(e) = node.flush() {
            eprintln!("blockjob: Failed to flush node '{}': {e}", node.name());
        }
    }
    // The process exits without closing its nodes: store the persistent
    // bitmaps as closing them would (else they stay in-use on disk, and
    // the next open finds them inconsistent).
    if let Err(e) = ctx.store_persistent_dirty_bitmaps() {
        eprintln!("blockjob: {e}");
    }
    for mut s in servers {
        s.shutdown();
    }
}

/// Bind a monitor socket (its mode follows the umask, as QEMU's).
fn listen(path: &Path) -> Result<(UnixListener, SocketFile), String> {
    socket::bind(path).map_err(|e| e.message().to_string())
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
