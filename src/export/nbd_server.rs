//! The NBD server (QEMU's `nbd-server-start`): a listening socket, one
//! acceptor thread, and per client connection one thread that negotiates
//! and then reads requests, handing them to a small pool of workers
//! (`nbd_conn`).
//!
//! Threads: the acceptor waits (epoll) on the listener and on a wake-up
//! eventfd; it stops watching the listener while `max-connections`
//! clients are connected, and joins the threads of connections that
//! ended. `NbdServer::stop` closes every connection, joins every
//! thread, and unlinks the UNIX socket it bound.
//!
//! TLS: a server started with a [`TlsHook`] requires `NBD_OPT_STARTTLS`
//! before anything else and upgrades the connection's stream through the
//! hook; without one, `NBD_OPT_STARTTLS` gets `NBD_REP_ERR_POLICY` as
//! from QEMU without `tls-creds`.

use std::collections::HashMap;
use std::io;
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};

use super::{Export, ExportTable};
use crate::error::{Error, Result};
use crate::locks::{Condvar, Mutex};
use crate::nbd::transport::{Closer, Listener, SocketAddress, Stream};

/// Upgrades a connection to TLS after `NBD_OPT_STARTTLS` was acknowledged
/// (the handshake runs on the calling connection thread). The stream
/// returned replaces the plain one for the rest of negotiation and for
/// transmission.
pub trait TlsHook: Send + Sync {
    /// Runs the server side of the TLS handshake over `plain`.
    fn upgrade(&self, plain: Box<dyn Stream>) -> io::Result<Box<dyn Stream>>;
}

/// `nbd-server-start`'s arguments.
#[derive(Clone)]
pub struct NbdServerOptions {
    /// Where to listen.
    pub addr: SocketAddress,
    /// `tls-creds`: the id of a `tls-creds-x509` object (server endpoint);
    /// `Exports::nbd_server_start` turns it into [`NbdServerOptions::tls`].
    pub tls_creds: Option<String>,
    /// `tls-authz`: accepted and unused, as QEMU does without `tls-creds`.
    pub tls_authz: Option<String>,
    /// At most this many clients at once (0: no limit); further clients
    /// wait in the listen queue.
    pub max_connections: u32,
    /// A client that has not finished negotiating after this many seconds
    /// is disconnected (0: no limit). QEMU's default is 10.
    pub handshake_max_seconds: u32,
    /// The TLS session maker (requires clients to use STARTTLS).
    pub tls: Option<Arc<dyn TlsHook>>,
}

impl std::fmt::Debug for NbdServerOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdServerOptions")
            .field("addr", &self.addr)
            .field("max_connections", &self.max_connections)
            .field("handshake_max_seconds", &self.handshake_max_seconds)
            .field("tls", &self.tls.is_some())
            .finish_non_exhaustive()
    }
}

impl NbdServerOptions {
    /// QEMU's defaults at `addr`.
    pub fn new(addr: SocketAddress) -> Self {
        NbdServerOptions {
            addr,
            tls_creds: None,
            tls_authz: None,
            max_connections: 0,
            handshake_max_seconds: 10,
            tls: None,
        }
    }
}

/// A live connection.
struct ConnEntry {
    closer: Closer,
    /// The export it was bound to by `NBD_OPT_GO`/`EXPORT_NAME`.
    export: Option<Arc<Export>>,
    handle: Option<JoinHandle<()>>,
}

impl ConnEntry {
    fn serves(&self, export: &Arc<Export>) -> bool {
        self.export.as_ref().is_some_and(|e| Arc::ptr_eq(e, export))
    }
}

#[derive(Default)]
struct Conns {
    next_id: u64,
    live: HashMap<u64, ConnEntry>,
    /// Threads of ended connections, joined by the acceptor or `stop`.
    finished: Vec<JoinHandle<()>>,
    closing: bool,
}

/// What the acceptor and the connections share.
pub(crate) struct ServerShared {
    pub(crate) table: Arc<ExportTable>,
    pub(crate) handshake: Option<Duration>,
    pub(crate) tls: Option<Arc<dyn TlsHook>>,
    max_connections: u32,
    conns: Mutex<Conns>,
    changed: Condvar,
    wake: EventFd,
}

impl ServerShared {
    /// Binds connection `id` to the export named `name`, atomically with
    /// respect to deletes (see the module invariants of `export`).
    pub(crate) fn bind_export(&self, id: u64, name: &str) -> Option<Arc<Export>> {
        let mut c = self.conns.lock();
        if c.closing {
            return None;
        }
        let e = self.table.by_name(name)?;
        if let Some(entry) = c.live.get_mut(&id) {
            entry.export = Some(e.clone());
        }
        Some(e)
    }

    /// Waits until no connection serves `export` (see
    /// [`NbdServer::close_clients_of`]).
    pub(crate) fn wait_clients_gone(&self, export: &Arc<Export>) {
        let mut c = self.conns.lock();
        while c.live.values().any(|e| e.serves(export)) {
            c = self.changed.wait(c);
        }
    }

    /// Connection `id` ended; its thread is about to return.
    fn finished(&self, id: u64) {
        let mut c = self.conns.lock();
        if let Some(mut entry) = c.live.remove(&id) {
            entry.export = None;
            if let Some(h) = entry.handle.take() {
                c.finished.push(h);
            }
        }
        self.changed.notify_all();
        drop(c);
        // A full counter is readable anyway.
        let _ = self.wake.write(1);
    }
}

/// A running NBD server.
pub(crate) struct NbdServer {
    shared: Arc<ServerShared>,
    listener: Arc<Listener>,
    acceptor: Option<JoinHandle<()>>,
}

const LISTENER: u64 = 0;
const WAKE: u64 = 1;

impl NbdServer {
    pub(crate) fn start(opts: NbdServerOptions, table: Arc<ExportTable>) -> Result<NbdServer> {
        if let Some(id) = &opts.tls_creds
            && opts.tls.is_none()
        {
            return Err(Error::generic(format!("No TLS credentials with id '{id}'")));
        }
        let listener =
            Arc::new(Listener::bind(&opts.addr).map_err(|e| bind_error(&opts.addr, &e))?);
        let os = |what: &str, e: Errno| Error::from(e).prepend(what);
        let wake = EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
            .map_err(|e| os("Cannot create eventfd: ", e))?;
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)
            .map_err(|e| os("Cannot create epoll: ", e))?;
        epoll
            .add(&*listener, EpollEvent::new(EpollFlags::EPOLLIN, LISTENER))
            .and_then(|()| epoll.add(&wake, EpollEvent::new(EpollFlags::EPOLLIN, WAKE)))
            .map_err(|e| os("Cannot watch the NBD socket: ", e))?;
        let shared = Arc::new(ServerShared {
            table,
            handshake: (opts.handshake_max_seconds > 0)
                .then(|| Duration::from_secs(opts.handshake_max_seconds.into())),
            tls: opts.tls.clone(),
            max_connections: opts.max_connections,
            conns: Mutex::new(Conns::default()),
            changed: Condvar::new(),
            wake,
        });
        let (s, l) = (shared.clone(), listener.clone());
        let acceptor = thread::Builder::new()
            .name("bj-nbd-accept".into())
            .spawn(move || accept_loop(&s, &l, &epoll))
            .map_err(|e| {
                listener.remove();
                Error::from(e).prepend("Cannot start the NBD server thread: ")
            })?;
        Ok(NbdServer {
            shared,
            listener,
            acceptor: Some(acceptor),
        })
    }

    /// `max-connections` (0: no limit).
    pub(crate) fn max_connections(&self) -> u32 {
        self.shared.max_connections
    }

    /// The TCP port listened on.
    pub(crate) fn port(&self) -> Option<u16> {
        self.listener.local_port()
    }

    /// Clients bound to `export`.
    pub(crate) fn clients_of(&self, export: &Arc<Export>) -> usize {
        self.shared
            .conns
            .lock()
            .live
            .values()
            .filter(|c| c.serves(export))
            .count()
    }

    /// Disconnects every client of `export` and waits until their
    /// connections ended (requests in flight finish first).
    pub(crate) fn disconnect_clients_of(&self, export: &Arc<Export>) {
        self.close_clients_of(export);
        self.shared.wait_clients_gone(export);
    }

    /// Starts disconnecting every client of `export` without waiting.
    pub(crate) fn close_clients_of(&self, export: &Arc<Export>) {
        let c = self.shared.conns.lock();
        for entry in c.live.values().filter(|e| e.serves(export)) {
            entry.closer.close();
        }
    }

    /// What the connections share, to wait on after the server's
    /// handle is out of reach.
    pub(crate) fn shared(&self) -> Arc<ServerShared> {
        self.shared.clone()
    }

    /// Stops accepting, disconnects every client, joins every thread and
    /// unlinks the UNIX socket. Idempotent.
    pub(crate) fn stop(&mut self) {
        let Some(acceptor) = self.acceptor.take() else {
            return;
        };
        self.shared.conns.lock().closing = true;
        // While the listener is still open (see `Listener::remove`).
        self.listener.remove();
        let _ = self.shared.wake.write(1);
        let _ = acceptor.join();
        let mut c = self.shared.conns.lock();
        for entry in c.live.values() {
            entry.closer.close();
        }
        while !c.live.is_empty() {
            c = self.shared.changed.wait(c);
        }
        let finished = std::mem::take(&mut c.finished);
        drop(c);
        for h in finished {
            let _ = h.join();
        }
    }
}

impl Drop for NbdServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// QEMU's texts for a listener that cannot be set up.
fn bind_error(addr: &SocketAddress, e: &io::Error) -> Error {
    if let (SocketAddress::Unix { path }, Some(u)) = (
        addr,
        e.get_ref()
            .and_then(|i| i.downcast_ref::<crate::nbd::transport::UnlinkFailed>()),
    ) {
        let n = u.0.raw_os_error().unwrap_or(libc::EIO);
        let msg = format!(
            "Failed to unlink socket {}: {}",
            path.display(),
            nix::errno::Errno::from_raw(n).desc()
        );
        return Error::generic(msg).with_errno(n);
    }
    let text = match e.raw_os_error() {
        Some(n) => nix::errno::Errno::from_raw(n).desc().to_string(),
        None => e.to_string(),
    };
    let msg = match addr {
        SocketAddress::Unix { path } => {
            format!("Failed to bind socket to {}: {text}", path.display())
        }
        SocketAddress::Inet { host, port } if e.kind() == io::ErrorKind::InvalidInput => {
            format!(
                "address resolution failed for {host}:{port}: Servname not supported for ai_socktype"
            )
        }
        SocketAddress::Inet { .. } => format!("Failed to find an available port: {text}"),
    };
    match e.raw_os_error() {
        Some(n) => Error::generic(msg).with_errno(n),
        None => Error::generic(msg),
    }
}

fn accept_loop(s: &Arc<ServerShared>, listener: &Listener, epoll: &Epoll) {
    crate::nbd::transport::block_sigpipe();
    let mut ready = [EpollEvent::empty(); 2];
    let mut watching = true;
    loop {
        // Reap ended connections; watch the listener only below the limit.
        let (finished, full) = {
            let mut c = s.conns.lock();
            if c.closing {
                return;
            }
            let full = s.max_connections > 0 && c.live.len() >= s.max_connections as usize;
            (std::mem::take(&mut c.finished), full)
        };
        for h in finished {
            let _ = h.join();
        }
        if full == watching {
            watching = !full;
            let flags = if watching {
                EpollFlags::EPOLLIN
            } else {
                EpollFlags::empty()
            };
            let _ = epoll.modify(listener, &mut EpollEvent::new(flags, LISTENER));
        }
        match epoll.wait(&mut ready, EpollTimeout::NONE) {
            Ok(_) => {}
            Err(Errno::EINTR) => continue,
            // Cannot happen with a valid epoll; serve no new clients.
            Err(_) => return,
        }
        let _ = s.wake.read();
        if !watching {
            continue;
        }
        match listener.accept() {
            Ok(sock) => spawn_conn(s, sock),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            // Out of fds or memory: leave the client queued for a moment.
            Err(_) => thread::sleep(Duration::from_millis(100)),
        }
    }
}

fn spawn_conn(s: &Arc<ServerShared>, sock: crate::nbd::transport::Socket) {
    let Ok(closer) = sock.closer() else { return };
    // Held while spawning, so the thread's `finished` finds its handle.
    let mut c = s.conns.lock();
    if c.closing {
        return;
    }
    let id = c.next_id;
    c.next_id += 1;
    c.live.insert(
        id,
        ConnEntry {
            closer,
            export: None,
            handle: None,
        },
    );
    let shared = s.clone();
    let spawned = thread::Builder::new()
        .name("bj-nbd-conn".into())
        .spawn(move || {
            super::nbd_conn::serve(&shared, id, Box::new(sock));
            shared.finished(id);
        });
    match spawned {
        Ok(h) => {
            if let Some(e) = c.live.get_mut(&id) {
                e.handle = Some(h);
            }
        }
        Err(_) => {
            if let Some(e) = c.live.remove(&id) {
                e.closer.close();
            }
        }
    }
}
