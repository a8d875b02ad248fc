//! [`QmpServer`]: QEMU's monitor on a listening UNIX socket, for any
//! number of clients, over one [`Context`]. The daemon runs one per
//! `--monitor`; a C host gets one from `bj_qmp_server_new`.
//!
//! Threads: one acceptor, waiting (epoll) on the listener and on a wake-up
//! eventfd; per client a reader and, once negotiated, an event forwarder
//! (see `client.rs` for the ordering of events and replies).
//!
//! Life:
//! - `quit` on any client is answered, then the server executes no more
//!   commands (as QEMU, which exits) and calls the owner's `on_quit`, at
//!   most once, on that client's reader thread, with no library lock held.
//! - [`QmpServer::stop_commands`] closes the command gate: it waits for
//!   commands in progress; afterwards no command runs, while events keep
//!   flowing (the daemon cancels its jobs in between, and the clients see
//!   the events of that).
//! - [`QmpServer::shutdown`] (also on drop) stops commands, stops
//!   accepting (the listener is closed), lets every forwarder write what
//!   is queued (one second at most, for a client that does not read), shuts
//!   every client socket down and joins every thread. Afterwards nothing
//!   of the server runs and no descriptor of it is open. The socket file
//!   is removed only if the owner handed it over
//!   ([`QmpServerOptions::socket_file`]), as QEMU unlinks its own socket.
//! - A client going away ends its own threads only; its reader's handle
//!   is reaped by the acceptor at the next connection, or by `shutdown`.

use crate::locks::{Condvar, Mutex, RwLock};
use std::collections::HashMap;
use std::io;
use std::os::unix::net::{UnixListener, UnixStream};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};

use super::client::{self, Client};
use super::socket::SocketFile;
use crate::context::Context;
use crate::error::{Error, Result};

/// Called when a client executed `quit`.
pub type QuitHandler = Box<dyn Fn() + Send + Sync>;

/// How a [`QmpServer`] serves. `Default` is compact output and nobody
/// told about `quit`.
#[derive(Default)]
#[non_exhaustive]
pub struct QmpServerOptions {
    /// QEMU's `pretty=on`: replies and events indented by four spaces.
    pub pretty: bool,
    /// Told (once) that a client executed `quit`; the owner is expected
    /// to shut the server down. Runs on the client's reader thread: it
    /// must not call [`QmpServer::shutdown`] or drop the server.
    pub on_quit: Option<QuitHandler>,
    /// The listener's socket file, to remove when the server stops
    /// accepting (before the listener closes, see [`SocketFile::remove`]).
    pub socket_file: Option<SocketFile>,
}

/// How long `shutdown` lets forwarders write what is queued before
/// cutting off clients that do not read.
const FLUSH_GRACE: Duration = Duration::from_secs(1);

/// After a failed `accept` (out of descriptors, memory): pause before
/// retrying, unless woken for shutdown.
const ACCEPT_BACKOFF_MS: u8 = 50;

/// epoll tokens.
const LISTENER: u64 = 0;
const WAKE: u64 = 1;

/// The clients and the threads to join.
#[derive(Default)]
struct Registry {
    /// Shutting down: no new client.
    closing: bool,
    next_id: u64,
    clients: HashMap<u64, Arc<Client>>,
    /// Reader threads, running or finished but not joined yet.
    readers: Vec<JoinHandle<()>>,
}

/// What the server's threads share.
pub(super) struct Monitor {
    pub(super) ctx: Arc<Context>,
    pretty: bool,
    on_quit: Option<QuitHandler>,
    /// The command gate: true once no command may run. Readers execute
    /// under the read lock.
    stopped: RwLock<bool>,
    registry: Mutex<Registry>,
    /// Signalled when a client comes or goes.
    clients_changed: Condvar,
    /// Forwarders running.
    forwarders: Mutex<usize>,
    forwarders_done: Condvar,
}

impl Monitor {
    /// Run `f` (one request) unless commands are stopped.
    pub(super) fn execute<T>(&self, f: impl FnOnce() -> T) -> Option<T> {
        let stopped = self.stopped.read();
        if *stopped { None } else { Some(f()) }
    }

    pub(super) fn commands_stopped(&self) -> bool {
        *self.stopped.read()
    }

    /// Close the gate; true if this call closed it.
    fn stop_commands(&self) -> bool {
        let mut stopped = self.stopped.write();
        !std::mem::replace(&mut *stopped, true)
    }

    /// A client executed `quit` (and its reply is out).
    pub(super) fn quit(&self) {
        if self.stop_commands()
            && let Some(f) = &self.on_quit
        {
            // The owner's code must not unwind into the reader.
            let _ = catch_unwind(AssertUnwindSafe(f));
        }
    }

    pub(super) fn forwarder_started(&self) {
        *self.forwarders.lock() += 1;
    }

    pub(super) fn forwarder_ended(&self) {
        let mut n = self.forwarders.lock();
        *n -= 1;
        if *n == 0 {
            self.forwarders_done.notify_all();
        }
    }

    /// Wait until no forwarder runs, until `deadline` at most.
    fn wait_forwarders(&self, deadline: Instant) {
        let mut n = self.forwarders.lock();
        while *n > 0 {
            let now = Instant::now();
            if now >= deadline {
                return;
            }
            n = self.forwarders_done.wait_timeout(n, deadline - now);
        }
    }

    /// A reader is done with its client.
    pub(super) fn remove(&self, id: u64) {
        self.registry.lock().clients.remove(&id);
        self.clients_changed.notify_all();
    }

    /// Register a new connection and start its reader; false when the
    /// server is closing.
    fn add_client(self: &Arc<Self>, stream: UnixStream) -> bool {
        let finished = {
            let mut reg = self.registry.lock();
            if reg.closing {
                return false;
            }
            let id = reg.next_id;
            reg.next_id += 1;
            let c = Arc::new(Client::new(id, stream, self.pretty));
            let (m, c2) = (self.clone(), c.clone());
            // If no thread can be started, the connection is dropped.
            if let Ok(h) = thread::Builder::new()
                .name("bj-qmp-client".into())
                .spawn(move || client::serve(m, c2))
            {
                reg.clients.insert(id, c);
                reg.readers.push(h);
            }
            let (done, running): (Vec<_>, Vec<_>) = std::mem::take(&mut reg.readers)
                .into_iter()
                .partition(|h| h.is_finished());
            reg.readers = running;
            done
        };
        self.clients_changed.notify_all();
        for h in finished {
            let _ = h.join();
        }
        true
    }
}

/// A QMP monitor serving a listening socket (see the module doc).
pub struct QmpServer {
    mon: Arc<Monitor>,
    wake: Arc<EventFd>,
    acceptor: Option<JoinHandle<()>>,
    socket_file: Option<SocketFile>,
}

impl QmpServer {
    /// Serve `listener` (bound, listening) on `ctx`. Starts the acceptor
    /// thread; each client gets QEMU's greeting. On failure the socket
    /// file, if handed over, is removed.
    pub fn start(
        ctx: Arc<Context>,
        listener: UnixListener,
        mut opts: QmpServerOptions,
    ) -> Result<QmpServer> {
        let socket_file = opts.socket_file.take();
        // Shared with the acceptor, so that on failure the file is
        // removed while the listener is still open.
        let listener = Arc::new(listener);
        match Self::start_acceptor(ctx, listener.clone(), opts) {
            Ok((mon, wake, acceptor)) => Ok(QmpServer {
                mon,
                wake,
                acceptor: Some(acceptor),
                socket_file,
            }),
            Err(e) => {
                if let Some(f) = socket_file {
                    f.remove();
                }
                Err(e)
            }
        }
    }

    fn start_acceptor(
        ctx: Arc<Context>,
        listener: Arc<UnixListener>,
        opts: QmpServerOptions,
    ) -> Result<(Arc<Monitor>, Arc<EventFd>, JoinHandle<()>)> {
        let os = |what: &str, e: Errno| Error::from(e).prepend(what);
        listener
            .set_nonblocking(true)
            .map_err(|e| Error::from(e).prepend("Cannot set up the monitor socket: "))?;
        let wake = Arc::new(
            EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
                .map_err(|e| os("Cannot create eventfd: ", e))?,
        );
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)
            .map_err(|e| os("Cannot create epoll: ", e))?;
        epoll
            .add(&*listener, EpollEvent::new(EpollFlags::EPOLLIN, LISTENER))
            .and_then(|()| epoll.add(&*wake, EpollEvent::new(EpollFlags::EPOLLIN, WAKE)))
            .map_err(|e| os("Cannot watch the monitor socket: ", e))?;
        let mon = Arc::new(Monitor {
            ctx,
            pretty: opts.pretty,
            on_quit: opts.on_quit,
            stopped: RwLock::new(false),
            registry: Mutex::new(Registry::default()),
            clients_changed: Condvar::new(),
            forwarders: Mutex::new(0),
            forwarders_done: Condvar::new(),
        });
        let m = mon.clone();
        let acceptor = thread::Builder::new()
            .name("bj-qmp-accept".into())
            .spawn(move || accept_loop(&m, &listener, &epoll))
            .map_err(|e| Error::from(e).prepend("Cannot start the monitor thread: "))?;
        Ok((mon, wake, acceptor))
    }

    /// Execute no command from now on (waits for those in progress);
    /// events keep flowing to the clients.
    pub fn stop_commands(&self) {
        self.mon.stop_commands();
    }

    /// Clients connected now.
    pub fn clients(&self) -> usize {
        self.mon.registry.lock().clients.len()
    }

    /// Stop serving (see the module doc); returns when every thread of
    /// the server has ended. Idempotent.
    pub fn shutdown(&mut self) {
        let Some(acceptor) = self.acceptor.take() else {
            return;
        };
        self.mon.stop_commands();
        self.mon.registry.lock().closing = true;
        // While the acceptor still holds the listener open.
        if let Some(f) = self.socket_file.take() {
            f.remove();
        }
        // A failed write can only be a full counter: readable anyway.
        let _ = self.wake.write(1);
        let _ = acceptor.join();
        let clients: Vec<Arc<Client>> =
            self.mon.registry.lock().clients.values().cloned().collect();
        for c in &clients {
            c.close_events();
        }
        self.mon.wait_forwarders(Instant::now() + FLUSH_GRACE);
        for c in &clients {
            c.disconnect();
        }
        for c in &clients {
            c.join_forwarder();
        }
        let readers = std::mem::take(&mut self.mon.registry.lock().readers);
        // Only if the owner broke the rule and shuts down from `on_quit`,
        // on one of our readers: that one ends by itself once this
        // returns. (`thread::current()` only then: on a host's thread it
        // would allocate a handle that is never freed.)
        let me = client::reader_of(&self.mon).then(|| thread::current().id());
        for h in readers {
            if Some(h.thread().id()) != me {
                let _ = h.join();
            }
        }
    }

    /// Wait until exactly `n` clients are connected, `timeout` at most;
    /// whether that happened.
    #[cfg(test)]
    fn wait_clients(&self, n: usize, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut reg = self.mon.registry.lock();
        while reg.clients.len() != n {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            reg = self.mon.clients_changed.wait_timeout(reg, deadline - now);
        }
        true
    }
}

impl Drop for QmpServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Accept connections until woken for shutdown.
fn accept_loop(mon: &Arc<Monitor>, listener: &UnixListener, epoll: &Epoll) {
    client::block_sigpipe();
    let mut ready = [EpollEvent::empty(); 2];
    loop {
        match epoll.wait(&mut ready, EpollTimeout::NONE) {
            Ok(_) => {}
            Err(Errno::EINTR) => continue,
            // Cannot happen with a valid epoll; serve no new clients.
            Err(_) => return,
        }
        if mon.registry.lock().closing {
            return;
        }
        loop {
            match listener.accept() {
                Ok((stream, _)) => {
                    // Accepted sockets do not inherit O_NONBLOCK on
                    // Linux; say so anyway, the reader blocks.
                    if stream.set_nonblocking(false).is_err() {
                        continue;
                    }
                    if !mon.add_client(stream) {
                        return;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => {
                    backoff(listener, epoll);
                    break;
                }
            }
        }
    }
}

/// The connection stays queued while we lack the resources to take it:
/// stop watching the listener for a moment (waking early only for
/// shutdown), then watch it again.
fn backoff(listener: &UnixListener, epoll: &Epoll) {
    let mut off = EpollEvent::new(EpollFlags::empty(), LISTENER);
    let _ = epoll.modify(listener, &mut off);
    let mut ready = [EpollEvent::empty(); 1];
    let _ = epoll.wait(&mut ready, EpollTimeout::from(ACCEPT_BACKOFF_MS));
    let mut on = EpollEvent::new(EpollFlags::EPOLLIN, LISTENER);
    let _ = epoll.modify(listener, &mut on);
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};
    use std::io::{BufRead, BufReader, Read, Write};
    use std::path::{Path, PathBuf};
    use std::sync::mpsc;

    /// A deadline for failures only: nothing waits for it to pass.
    const TIMEOUT: Duration = Duration::from_secs(30);

    /// A raw test client.
    struct Peer {
        r: BufReader<UnixStream>,
        w: UnixStream,
        /// The last lines read, for failure messages.
        seen: std::collections::VecDeque<String>,
        /// Events read before a reply, not yet taken by `until`.
        events: std::collections::VecDeque<Value>,
    }

    impl Peer {
        fn connect(path: &Path) -> Peer {
            let s = UnixStream::connect(path).unwrap();
            s.set_read_timeout(Some(TIMEOUT)).unwrap();
            Peer {
                w: s.try_clone().unwrap(),
                r: BufReader::new(s),
                seen: Default::default(),
                events: Default::default(),
            }
        }

        /// The next message; None at EOF.
        fn msg(&mut self) -> Option<Value> {
            let mut line = String::new();
            match self.r.read_line(&mut line) {
                Ok(0) => None,
                Ok(_) => {
                    assert!(line.ends_with("}\r\n"), "{line:?}");
                    if self.seen.len() == 4 {
                        self.seen.pop_front();
                    }
                    self.seen.push_back(line.clone());
                    Some(serde_json::from_str(&line).unwrap())
                }
                Err(e) => panic!("read: {e} (after {:?})", self.seen),
            }
        }

        fn send(&mut self, v: &Value) {
            writeln!(self.w, "{v}").unwrap();
        }

        fn greeting(&mut self) {
            let g = self.msg().unwrap();
            assert!(g.get("QMP").is_some(), "{g}");
        }

        fn negotiated(path: &Path) -> Peer {
            let mut p = Peer::connect(path);
            p.greeting();
            p.send(&json!({"execute": "qmp_capabilities"}));
            assert_eq!(p.msg().unwrap(), json!({"return": {}}));
            p
        }

        /// Send a command: the events before its reply (also kept for
        /// `until`), and the reply.
        fn cmd(&mut self, cmd: &str, args: Value) -> (Vec<Value>, Value) {
            self.send(&json!({"execute": cmd, "arguments": args}));
            let mut evs = Vec::new();
            loop {
                let v = self
                    .msg()
                    .unwrap_or_else(|| panic!("EOF waiting for {cmd}"));
                if v.get("event").is_some() {
                    self.events.push_back(v.clone());
                    evs.push(v);
                } else {
                    return (evs, v);
                }
            }
        }

        /// Events up to the first for which `stop` holds (included).
        fn until(&mut self, stop: impl Fn(&Value) -> bool) -> Vec<Value> {
            let mut evs = Vec::new();
            loop {
                let v = match self.events.pop_front() {
                    Some(v) => v,
                    None => self.msg().expect("EOF waiting for an event"),
                };
                assert!(v.get("event").is_some(), "{v}");
                let done = stop(&v);
                evs.push(v);
                if done {
                    return evs;
                }
            }
        }
    }

    fn jsc(v: &Value, id: &str, status: &str) -> bool {
        v["event"] == "JOB_STATUS_CHANGE" && v["data"]["id"] == id && v["data"]["status"] == status
    }

    fn context() -> Arc<Context> {
        let ctx = Arc::new(Context::new());
        for n in ["src", "dst"] {
            ctx.blockdev_add(&json!({"driver": "null-co", "node-name": n, "size": 64 << 20}))
                .unwrap();
        }
        ctx
    }

    fn serve(
        ctx: &Arc<Context>,
        mut opts: QmpServerOptions,
    ) -> (tempfile::TempDir, PathBuf, QmpServer) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let (l, file) = crate::qmp::socket::bind(&path).unwrap();
        opts.socket_file = Some(file);
        let s = QmpServer::start(ctx.clone(), l, opts).unwrap();
        (dir, path, s)
    }

    /// A slow mirror, so that it is still running when the test acts.
    fn mirror(id: &str) -> Value {
        json!({"job-id": id, "device": "src", "target": "dst", "sync": "full",
               "speed": 1 << 20})
    }

    #[test]
    fn the_events_a_command_caused_come_before_its_reply() {
        let ctx = context();
        let (_d, path, mut server) = serve(&ctx, QmpServerOptions::default());
        let mut a = Peer::negotiated(&path);
        let mut watcher = Peer::negotiated(&path);
        for i in 0..20 {
            let id = format!("j{i}");
            // `created` and `running` are emitted inside the command.
            // Fresh nodes each time: a job releases its nodes a moment
            // after its last event (a race of the job engine, not the
            // monitor's).
            for n in ["src", "dst"] {
                let args =
                    json!({"driver": "null-co", "node-name": format!("{n}{i}"), "size": 1 << 20});
                assert_eq!(a.cmd("blockdev-add", args).1, json!({"return": {}}));
            }
            let mut args = mirror(&id);
            args["device"] = json!(format!("src{i}"));
            args["target"] = json!(format!("dst{i}"));
            let (evs, reply) = a.cmd("blockdev-mirror", args);
            assert_eq!(reply, json!({"return": {}}));
            let mine: Vec<_> = evs.iter().filter(|e| e["data"]["id"] == id).collect();
            // (More may have come while the reply was on its way.)
            assert!(
                mine.len() >= 2 && jsc(mine[0], &id, "created") && jsc(mine[1], &id, "running"),
                "events before the reply: {evs:?}"
            );
            let (_, reply) = a.cmd("block-job-cancel", json!({"device": id, "force": true}));
            assert_eq!(reply, json!({"return": {}}));
            a.until(|e| jsc(e, &id, "null"));
        }
        // A client that only listens got every one of them, in order.
        let evs = watcher.until(|e| jsc(e, "j19", "null"));
        let created: Vec<_> = evs
            .iter()
            .filter(|e| e["data"]["status"] == "created")
            .map(|e| e["data"]["id"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(
            created,
            (0..20).map(|i| format!("j{i}")).collect::<Vec<_>>()
        );
        server.shutdown();
        drop(server);
        assert_eq!(
            Arc::strong_count(&ctx),
            1,
            "a server thread outlived shutdown"
        );
    }

    #[test]
    fn a_client_that_goes_away_ends_only_its_own_threads() {
        let ctx = context();
        let (_d, path, mut server) = serve(&ctx, QmpServerOptions::default());
        let mut a = Peer::negotiated(&path);
        assert!(server.wait_clients(1, TIMEOUT));

        // Mid-command: a job is started and the client leaves without
        // reading the reply (nor the one after it).
        let mut b = Peer::negotiated(&path);
        b.w.write_all(
            format!(
                "{}\n{{\"execute\":\"query-jobs\"}}\n",
                json!({"execute": "blockdev-mirror", "arguments": mirror("j")})
            )
            .as_bytes(),
        )
        .unwrap();
        drop(b);
        // Mid-line, before negotiating, and before reading the greeting.
        let mut c = Peer::negotiated(&path);
        c.w.write_all(b"{\"execute\": \"query-block-").unwrap();
        drop(c);
        let mut d = Peer::connect(&path);
        d.greeting();
        drop(d);
        drop(Peer::connect(&path));
        assert!(
            server.wait_clients(1, TIMEOUT),
            "{} clients",
            server.clients()
        );

        // The job goes on, and the remaining client sees its events.
        let evs = a.until(|e| jsc(e, "j", "running"));
        assert!(jsc(&evs[0], "j", "created"), "{evs:?}");
        let (_, jobs) = a.cmd("query-block-jobs", json!({}));
        assert_eq!(jobs["return"][0]["device"], "j", "{jobs}");
        assert_eq!(*server.mon.forwarders.lock(), 1);
        a.cmd("block-job-cancel", json!({"device": "j", "force": true}));
        a.until(|e| jsc(e, "j", "null"));
        server.shutdown();
        assert_eq!(*server.mon.forwarders.lock(), 0);
        drop(server);
        assert_eq!(
            Arc::strong_count(&ctx),
            1,
            "a server thread outlived shutdown"
        );
    }

    #[test]
    fn events_before_negotiation_are_not_the_clients() {
        let ctx = context();
        let (_d, path, _server) = serve(&ctx, QmpServerOptions::default());
        let mut a = Peer::negotiated(&path);
        let mut late = Peer::connect(&path);
        late.greeting();
        a.cmd("blockdev-mirror", mirror("j"));
        a.cmd("block-job-cancel", json!({"device": "j", "force": true}));
        a.until(|e| jsc(e, "j", "null"));
        // Every event of the job was emitted before `late` negotiated.
        late.send(&json!({"execute": "qmp_capabilities"}));
        assert_eq!(late.msg().unwrap(), json!({"return": {}}));
        let (evs, reply) = late.cmd("query-jobs", json!({}));
        assert_eq!((evs, reply), (vec![], json!({"return": []})));
    }

    #[test]
    fn quit_is_answered_then_reported_and_shutdown_flushes_and_closes() {
        let ctx = context();
        let (tx, rx) = mpsc::channel();
        let opts = QmpServerOptions {
            on_quit: Some(Box::new(move || {
                let _ = tx.send(());
            })),
            ..Default::default()
        };
        let (_d, path, mut server) = serve(&ctx, opts);
        let mut a = Peer::negotiated(&path);
        let mut b = Peer::negotiated(&path);
        a.cmd("blockdev-mirror", mirror("j"));
        b.until(|e| jsc(e, "j", "running"));
        let (_, reply) = a.cmd("quit", json!({}));
        assert_eq!(reply, json!({"return": {}}));
        rx.recv_timeout(TIMEOUT).expect("on_quit was called");
        // Commands are over: this one is never answered.
        b.send(&json!({"execute": "query-jobs"}));
        // What the owner does at quit: cancel the jobs (their events are
        // queued for the clients), then shut the server down.
        ctx.shutdown();
        server.shutdown();
        // Both clients get the events queued until then, then EOF.
        for p in [&mut a, &mut b] {
            let rest: Vec<Value> = std::iter::from_fn(|| p.msg()).collect();
            assert!(rest.iter().all(|v| v.get("event").is_some()), "{rest:?}");
            assert!(
                rest.iter().any(|e| e["event"] == "BLOCK_JOB_CANCELLED"),
                "{rest:?}"
            );
            assert!(jsc(rest.last().unwrap(), "j", "null"), "{rest:?}");
        }
        assert!(rx.try_recv().is_err(), "on_quit called twice");
        // The socket file is gone, and nothing of the server is left.
        assert!(!path.exists());
        assert!(UnixStream::connect(&path).is_err());
        drop(server);
        assert_eq!(
            Arc::strong_count(&ctx),
            1,
            "a server thread outlived shutdown"
        );
    }

    #[test]
    fn a_client_may_send_a_batch_before_reading_its_replies() {
        let ctx = context();
        let (_d, path, _server) = serve(&ctx, QmpServerOptions::default());
        let mut p = Peer::negotiated(&path);
        // Megabytes of replies, far more than the socket buffers: the
        // monitor must keep reading while they wait for the client.
        const N: usize = 100_000;
        let mut batch = b"1 ".repeat(N);
        batch.extend_from_slice(b"{\"execute\":\"query-jobs\",\"id\":\"end\"}\n");
        // Fails (instead of hanging) if the monitor stops reading.
        p.w.set_write_timeout(Some(TIMEOUT)).unwrap();
        p.w.write_all(&batch).unwrap();
        for i in 0..N {
            let r = p.msg().expect("EOF");
            assert_eq!(
                r["error"]["desc"], "QMP input must be a JSON object",
                "reply {i}: {r}"
            );
        }
        assert_eq!(p.msg().unwrap(), json!({"return": [], "id": "end"}));
    }

    #[test]
    fn a_client_that_lets_events_pile_up_is_disconnected_others_are_not() {
        use crate::events::EventData;
        use crate::qapi::JobStatus;
        let ctx = context();
        let (_d, path, server) = serve(&ctx, QmpServerOptions::default());
        // Never reads after negotiating.
        let mut slow = Peer::negotiated(&path);
        let mut fast = Peer::negotiated(&path);
        assert!(server.wait_clients(2, TIMEOUT));
        let n = client::EVENT_CAP * 2;
        // The reading client reads as fast as it can; the emitter waits
        // for it every batch (a burst faster than any reader is not what
        // this is about), never for the other one.
        const BATCH: usize = 1000;
        let (tx, rx) = mpsc::channel();
        let reader = thread::spawn(move || {
            let mut got = 0;
            loop {
                let v = fast.msg().expect("EOF on the reading client");
                got += 1;
                if got % BATCH == 0 {
                    let _ = tx.send(got);
                }
                if v["data"]["id"] == "last" {
                    return (fast, got);
                }
            }
        });
        for i in 0..n {
            let id = if i + 1 == n {
                "last".to_string()
            } else {
                format!("j{i}")
            };
            ctx.bus().emit(EventData::JobStatusChange {
                id,
                status: JobStatus::Running,
            });
            if (i + 1) % BATCH == 0 {
                assert_eq!(rx.recv_timeout(TIMEOUT), Ok(i + 1));
            }
        }
        let (mut fast, got) = reader.join().unwrap();
        assert_eq!(got, n, "the reading client lost events");
        assert!(
            server.wait_clients(1, TIMEOUT),
            "{} clients",
            server.clients()
        );
        // The reading client is still served.
        let (evs, reply) = fast.cmd("query-jobs", json!({}));
        assert_eq!((evs, reply), (vec![], json!({"return": []})));
        // The other got a prefix of the events, in order, then EOF (the
        // hang-up may cut the last one short).
        let mut rest = String::new();
        slow.r.read_to_string(&mut rest).unwrap();
        let lines: Vec<&str> = rest.split_inclusive("\r\n").collect();
        let whole = lines.iter().take_while(|l| l.ends_with("\r\n"));
        let mut seen = 0;
        for l in whole {
            let v: Value = serde_json::from_str(l).unwrap();
            assert_eq!(v["data"]["id"], format!("j{seen}"), "{v}");
            seen += 1;
        }
        assert!(seen < n, "{seen} events");
    }
}
