//! The `nbd` block driver: a node whose data lives on an NBD server
//! (QEMU's `block/nbd.c`), over the wire protocol of [`crate::nbd`].
//!
//! **Negotiation** (on the opening thread, before the graph lock is
//! taken, see `Graph::blockdev_add`): fixed newstyle, `STARTTLS` when
//! `tls-creds` is given (the [`TlsUpgrade`] hook), `EXTENDED_HEADERS` or
//! else `STRUCTURED_REPLY`, `SET_META_CONTEXT` (`base:allocation`, or only
//! `qemu:dirty-bitmap:NAME` with `x-dirty-bitmap`, as QEMU), then `GO`
//! asking for `INFO_BLOCK_SIZE`, falling back to `EXPORT_NAME` for servers
//! without `GO`.
//!
//! **Transmission**: one connection, up to `MAX_IN_FLIGHT` (16) requests in
//! flight matched by cookie. Callers write whole requests under the
//! connection's writer lock and sleep on its table; one thread per node
//! (the *manager*) reads replies and hands them to the waiting callers,
//! and when the connection ends it reconnects. No lock is held across a
//! network wait except the writer lock while a request is being written
//! and nothing global at all, so a client of a server in its own process
//! cannot deadlock with it.
//!
//! **Faults** as QEMU: a connection that breaks (EOF, I/O error) puts
//! the node into *connecting*: with `reconnect-delay` N, requests (those
//! in flight included) wait up to N s from the break for a new
//! connection and are then sent again; after that, or with N = 0, they
//! fail with EIO at once while the manager keeps trying. A protocol
//! violation (bad magic, unknown cookie, a chunk out of its request's
//! range, an oversized length, a reply stalled in its middle for
//! [`STALL_TIMEOUT`]) ends the node's connection for good (QEMU's
//! `NBD_CLIENT_QUIT`): every request fails with EIO. Requests in flight
//! without any reply for [`IDLE_TIMEOUT`] count as a broken connection
//! (QEMU waits forever). Dropping the driver
//! (blockdev-del) shuts the socket down, joins the manager and closes the
//! fd.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::{BlockDriver, BlockStatus, WriteFlags};
use crate::error::{Error, Result, strerror};
use crate::locks::{Condvar, Mutex, RwLock};
use crate::nbd::objects::Objects;
use crate::nbd::proto::{
    self, BlockSize, Extent, ReadBe, ReplyHeader, Request, cflag, chunk, cmd, info, opt, rep, tflag,
};
use crate::nbd::tls_creds::Endpoint;
use crate::nbd::transport::{Closer, SocketAddress, Stream, Transport, write_parts};
use crate::qapi::visitor::{Obj, type_err};

/// Requests in flight on one connection (QEMU's `MAX_NBD_REQUESTS`).
const MAX_IN_FLIGHT: usize = 16;
/// How long a reply may stall once its first bytes arrived (and how long
/// each negotiation read and each write may block) before the connection
/// is declared broken. A server that is merely slow to *start* a reply is
/// waited for, as in QEMU.
pub const STALL_TIMEOUT: Duration = Duration::from_secs(10);
/// How long requests in flight may go without any reply before the
/// connection counts as broken (then reconnected, the requests replayed
/// under `reconnect-delay`). QEMU waits forever; a hung server would hang
/// the node's users. Generous, for servers flushing slow disks.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Bound of one TCP connection attempt.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest block status payload accepted (extents of one request with
/// `REQ_ONE`: one, but a server may send a few more).
const MAX_STATUS_PAYLOAD: u64 = 1 << 20;
/// The largest error chunk payload: error, length, message, offset.
const MAX_ERROR_PAYLOAD: u64 = 4 + 2 + proto::MAX_STRING as u64 + 8;
/// Length limit of requests without payload (zeroes, trim, block
/// status), before alignment: QEMU's `INT_MAX`-based limits.
const MAX_NO_PAYLOAD: u64 = (i32::MAX as u64) + 1;
/// First and last pause between reconnection attempts. QEMU waits 1 s
/// doubling to 16 s; we start sooner so a restarted server is back in use
/// within a fraction of a second, and cap lower so the node notices a
/// returning server within 2 s.
const RECONNECT_BACKOFF: (Duration, Duration) =
    (Duration::from_millis(100), Duration::from_secs(2));

// ---- options ------------------------------------------------------------

/// blockdev-add options of the `nbd` driver (QAPI `BlockdevOptionsNbd`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdOptions {
    /// `server`.
    pub server: SocketAddress,
    /// `export` (QEMU: the default export, `""`, when absent).
    pub export: Option<String>,
    /// `tls-creds`: the id of a TLS credentials object.
    pub tls_creds: Option<String>,
    /// `tls-hostname`: the name checked against the server's certificate.
    pub tls_hostname: Option<String>,
    /// `x-dirty-bitmap`: a meta context reported through block status
    /// instead of `base:allocation`.
    pub x_dirty_bitmap: Option<String>,
    /// `reconnect-delay` in seconds (0: requests fail at once after a
    /// disconnect).
    pub reconnect_delay: u32,
    /// `open-timeout` in seconds: how long the first connection is retried.
    pub open_timeout: u64,
}

/// `uint64` members: a JSON number, else QEMU's text for the nbd driver's
/// (string-typed) visitor.
fn opt_u64<'a>(o: &mut Obj<'a>, key: &'a str) -> Result<Option<u64>> {
    let name = o.name(key);
    match o.get(key) {
        None => Ok(None),
        Some(Value::Number(n)) if n.is_u64() => Ok(n.as_u64()),
        Some(_) => Err(Error::generic(format!("Parameter '{name}' expects uint64"))),
    }
}

/// `server`: QAPI `SocketAddress` (flat union on `type`).
fn parse_server<'a>(o: &mut Obj<'a>) -> Result<SocketAddress> {
    let name = o.name("server");
    let v = match o.get("server") {
        None => return Err(o.missing("server")),
        Some(v @ Value::Object(_)) => v,
        Some(_) => return Err(type_err(&name, "object")),
    };
    let mut s = Obj::new(v, &name)?;
    let kind = s
        .opt_enum("type", &["inet", "unix", "vsock", "fd"])?
        .ok_or_else(|| s.missing("type"))?;
    let addr = match kind.as_str() {
        "unix" => {
            let path = s.req_str("path")?;
            let _ = s.opt_bool("abstract")?;
            let _ = s.opt_bool("tight")?;
            SocketAddress::Unix { path: path.into() }
        }
        "inet" => {
            let host = s.req_str("host")?;
            let port = s.req_str("port")?;
            let _ = s.opt_bool("numeric")?;
            let _ = s.opt_u32("to")?;
            for k in ["ipv4", "ipv6", "keep-alive", "mptcp"] {
                let _ = s.opt_bool(k)?;
            }
            for k in ["keep-alive-count", "keep-alive-idle", "keep-alive-interval"] {
                let _ = s.opt_u32(k)?;
            }
            SocketAddress::Inet { host, port }
        }
        "vsock" => {
            let cid = s.req_str("cid")?;
            let port = s.req_str("port")?;
            s.finish()?;
            return Err(Error::generic(format!(
                "Failed to connect to '{cid}:{port}': vsock is not supported by blockjob"
            )));
        }
        _ => {
            let fd = s.req_str("str")?;
            s.finish()?;
            return Err(Error::generic(format!(
                "File descriptor '{fd}' is not supported by blockjob"
            )));
        }
    };
    s.finish()?;
    Ok(addr)
}

impl NbdOptions {
    /// The driver's members, in QAPI order, with QEMU's texts.
    pub(crate) fn parse<'a>(o: &mut Obj<'a>) -> Result<NbdOptions> {
        let server = parse_server(o)?;
        let export = o.opt_str("export")?;
        let tls_creds = o.opt_str("tls-creds")?;
        let tls_hostname = o.opt_str("tls-hostname")?;
        let x_dirty_bitmap = o.opt_str("x-dirty-bitmap")?;
        let reconnect_delay = o.opt_u32("reconnect-delay")?.unwrap_or(0);
        let open_timeout = opt_u64(o, "open-timeout")?.unwrap_or(0);
        Ok(NbdOptions {
            server,
            export,
            tls_creds,
            tls_hostname,
            x_dirty_bitmap,
            reconnect_delay,
            open_timeout,
        })
    }

    /// QEMU's file name of the node (`nbd_refresh_filename`).
    pub fn uri(&self) -> String {
        match (&self.server, &self.export) {
            (SocketAddress::Unix { path }, Some(e)) => {
                format!("nbd+unix:///{e}?socket={}", path.display())
            }
            (SocketAddress::Unix { path }, None) => {
                format!("nbd+unix://?socket={}", path.display())
            }
            // QEMU leaves IPv6 literals out of the URI (no brackets).
            (SocketAddress::Inet { host, .. }, _) if host.contains(':') => String::new(),
            (SocketAddress::Inet { host, port }, Some(e)) => format!("nbd://{host}:{port}/{e}"),
            (SocketAddress::Inet { host, port }, None) => format!("nbd://{host}:{port}"),
        }
    }

    /// The options as blockdev-add JSON (for `json:{…}` file names).
    pub fn to_json(&self) -> Value {
        let server = match &self.server {
            SocketAddress::Unix { path } => json!({"type": "unix", "path": path}),
            SocketAddress::Inet { host, port } => {
                json!({"type": "inet", "host": host, "port": port})
            }
        };
        let mut v = json!({"driver": "nbd", "server": server});
        if let Some(e) = &self.export {
            v["export"] = json!(e);
        }
        v
    }
}

/// An nbd node's connection made ahead of opening (before the graph lock
/// is taken, so that a server in this process can look its nodes up while
/// we negotiate with it). Clones share the slot.
#[derive(Clone, Default)]
pub struct Preconnected(Arc<Mutex<Option<NbdDriver>>>);

impl std::fmt::Debug for Preconnected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Preconnected")
    }
}

impl Preconnected {
    /// Keeps a driver for the open that follows.
    pub fn put(&self, d: NbdDriver) {
        *self.0.lock() = Some(d);
    }

    /// The driver made ahead, if any.
    pub fn take(&self) -> Option<NbdDriver> {
        self.0.lock().take()
    }
}

// ---- TLS hook -------------------------------------------------------------

/// Turns a negotiating plain stream into a TLS session once the server
/// acknowledged `NBD_OPT_STARTTLS`; the second argument is `tls-hostname`
/// (or the server's host name).
pub type TlsUpgrade =
    Arc<dyn Fn(Box<dyn Stream>, Option<&str>) -> io::Result<Box<dyn Stream>> + Send + Sync>;

/// The upgrade for a `tls-creds` id: a `tls-creds-x509` object with the
/// client endpoint (QEMU's texts for an unknown id or a server one). The
/// session keeps its own reference, so `object-del` does not break a
/// reconnection, as in QEMU.
fn tls_upgrade_for(objects: &Objects, id: &str) -> Result<TlsUpgrade> {
    let creds = objects.tls_creds(id, Endpoint::Client)?;
    Ok(Arc::new(move |plain, hostname| {
        crate::nbd::tls::client_upgrade(plain, &creds, hostname)
    }))
}

/// `NBD_OPT_STARTTLS`, then the upgrade: the stream negotiation continues on.
fn starttls(
    mut s: Box<dyn Stream>,
    upgrade: &TlsUpgrade,
    hostname: Option<&str>,
) -> Result<Box<dyn Stream>> {
    proto::write_option(&mut s, opt::STARTTLS, &[]).map_err(neg_err)?;
    let r = proto::read_option_reply(&mut s, opt::STARTTLS).map_err(neg_err)?;
    if r.kind != rep::ACK {
        return Err(option_error(&r)
            .unwrap_or_else(|| Error::generic("Server don't support STARTTLS option")));
    }
    upgrade(s, hostname).map_err(|e| Error::generic(format!("TLS handshake failed: {e}")))
}

// ---- negotiation ----------------------------------------------------------

/// What negotiation settled for a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Negotiated {
    size: u64,
    flags: u16,
    block: Option<BlockSize>,
    structured: bool,
    extended: bool,
    /// The id of the meta context block status asks for.
    meta: Option<u32>,
}

fn neg_err(e: io::Error) -> Error {
    let errno = e.raw_os_error().unwrap_or(libc::EIO);
    Error::errno_msg(
        errno,
        format!("Failed to negotiate with the NBD server: {e}"),
    )
}

/// QEMU's text for an error reply (`nbd_handle_reply_err`); `None` for
/// `NBD_REP_ERR_UNSUP`, which callers handle as "not supported".
fn option_error(r: &proto::OptionReply) -> Option<Error> {
    let o = r.option;
    let n = proto::opt_name(o);
    let msg = match r.kind {
        rep::ERR_UNSUP => return None,
        rep::ERR_POLICY => format!("Denied by server for option {o} ({n})"),
        rep::ERR_INVALID => format!("Invalid parameters for option {o} ({n})"),
        rep::ERR_PLATFORM => format!("Server lacks support for option {o} ({n})"),
        rep::ERR_TLS_REQD => format!("TLS negotiation required before option {o} ({n})"),
        rep::ERR_UNKNOWN => "Requested export not available".to_string(),
        rep::ERR_SHUTDOWN => format!("Server shutting down before option {o} ({n})"),
        rep::ERR_BLOCK_SIZE_REQD => {
            format!("Server requires INFO_BLOCK_SIZE for option {o} ({n})")
        }
        rep::ERR_TOO_BIG => format!("Server considers option {o} ({n}) too large"),
        k if k & rep::FLAG_ERROR != 0 => {
            format!("Unknown error code when asking for option {o} ({n})")
        }
        k => format!("Unexpected reply type {k} to option {o} ({n})"),
    };
    Some(Error::errno_msg(libc::EINVAL, msg))
}

/// Asks for one option that is answered by a single `ACK`: `Ok(true)` if
/// the server has it, `Ok(false)` for `ERR_UNSUP`.
fn simple_option(s: &mut dyn Stream, option: u32) -> Result<bool> {
    proto::write_option(s, option, &[]).map_err(neg_err)?;
    let r = proto::read_option_reply(s, option).map_err(neg_err)?;
    match r.kind {
        rep::ACK => Ok(true),
        _ => match option_error(&r) {
            None => Ok(false),
            Some(e) => Err(e),
        },
    }
}

/// `SET_META_CONTEXT` for one context: its id, or `None` when the server
/// has no such context (or no meta contexts at all).
fn set_meta_context(s: &mut dyn Stream, export: &str, context: &str) -> Result<Option<u32>> {
    let payload = proto::meta_context_payload(export, &[context]);
    proto::write_option(s, opt::SET_META_CONTEXT, &payload).map_err(neg_err)?;
    let mut id = None;
    loop {
        let r = proto::read_option_reply(s, opt::SET_META_CONTEXT).map_err(neg_err)?;
        match r.kind {
            rep::ACK => return Ok(id),
            rep::META_CONTEXT => {
                let mut p = proto::Payload::new(&r.data);
                let cid = p.u32().map_err(neg_err)?;
                let name = String::from_utf8_lossy(p.rest());
                if name != context || id.is_some() {
                    return Err(Error::errno_msg(
                        libc::EINVAL,
                        format!("Server replied with unexpected meta context '{name}'"),
                    ));
                }
                id = Some(cid);
            }
            _ => {
                return match option_error(&r) {
                    None => Ok(None),
                    Some(e) => Err(e),
                };
            }
        }
    }
}

/// `GO` with `INFO_BLOCK_SIZE`: `Ok(None)` when the server lacks `GO`.
fn go(s: &mut dyn Stream, export: &str) -> Result<Option<(u64, u16, Option<BlockSize>)>> {
    let payload = proto::go_payload(export, &[info::BLOCK_SIZE]);
    proto::write_option(s, opt::GO, &payload).map_err(neg_err)?;
    let (mut export_info, mut block) = (None, None);
    loop {
        let r = proto::read_option_reply(s, opt::GO).map_err(neg_err)?;
        match r.kind {
            rep::ACK => break,
            rep::INFO => {
                let mut p = proto::Payload::new(&r.data);
                match p.u16().map_err(neg_err)? {
                    info::EXPORT => {
                        let size = p.u64().map_err(neg_err)?;
                        let flags = p.u16().map_err(neg_err)?;
                        export_info = Some((size, flags));
                    }
                    info::BLOCK_SIZE => {
                        let b = BlockSize {
                            min: p.u32().map_err(neg_err)?,
                            preferred: p.u32().map_err(neg_err)?,
                            max: p.u32().map_err(neg_err)?,
                        };
                        b.validate().map_err(neg_err)?;
                        block = Some(b);
                    }
                    // Names and descriptions: nothing to do with them.
                    _ => {}
                }
            }
            _ => {
                return match option_error(&r) {
                    None => Ok(None),
                    Some(e) => Err(e),
                };
            }
        }
    }
    let (size, flags) = export_info.ok_or_else(|| {
        Error::errno_msg(libc::EINVAL, "server sent no export information for 'go'")
    })?;
    Ok(Some((size, flags, block)))
}

/// Connects and negotiates once. `on_socket` receives a closer for the
/// socket as soon as it exists, so a close can end a negotiation that
/// hangs.
fn connect(
    opts: &NbdOptions,
    tls: Option<&TlsUpgrade>,
    on_socket: &dyn Fn(Closer),
) -> Result<(Box<dyn Stream>, Negotiated)> {
    let sock = crate::nbd::transport::Socket::connect(&opts.server, Some(CONNECT_TIMEOUT))
        .map_err(|e| connect_error(&opts.server, e))?;
    if let Ok(c) = sock.closer() {
        on_socket(c);
    }
    let _ = sock.set_read_timeout(Some(STALL_TIMEOUT));
    let _ = sock.set_write_timeout(Some(STALL_TIMEOUT));
    let mut s: Box<dyn Stream> = Box::new(sock);
    let magic = s.be64().map_err(neg_err)?;
    if magic != proto::NBD_MAGIC {
        return Err(Error::errno_msg(
            libc::EINVAL,
            format!("Bad initial magic received: 0x{magic:x}"),
        ));
    }
    let magic = s.be64().map_err(neg_err)?;
    if magic != proto::IHAVEOPT {
        // Oldstyle servers: gone from QEMU's own server since 4.2.
        return Err(Error::errno_msg(
            libc::EINVAL,
            format!("Bad server magic received: 0x{magic:x}"),
        ));
    }
    let hflags = s.be16().map_err(neg_err)?;
    if hflags & proto::FLAG_FIXED_NEWSTYLE == 0 {
        return Err(Error::errno_msg(
            libc::EINVAL,
            "Server does not support fixed newstyle negotiation",
        ));
    }
    let no_zeroes = hflags & proto::FLAG_NO_ZEROES != 0;
    let mut cflags = proto::CLIENT_FIXED_NEWSTYLE;
    if no_zeroes {
        cflags |= proto::CLIENT_NO_ZEROES;
    }
    s.write_all(&cflags.to_be_bytes()).map_err(neg_err)?;
    // The TLS hook: everything after this point runs over the session.
    if let Some(up) = tls {
        let host = opts.tls_hostname.clone().or(match &opts.server {
            SocketAddress::Inet { host, .. } => Some(host.clone()),
            SocketAddress::Unix { .. } => None,
        });
        s = starttls(s, up, host.as_deref())?;
    }
    let export = opts.export.as_deref().unwrap_or("");
    let extended = simple_option(&mut *s, opt::EXTENDED_HEADERS)?;
    let structured = extended || simple_option(&mut *s, opt::STRUCTURED_REPLY)?;
    let mut meta = None;
    if structured {
        let context = match &opts.x_dirty_bitmap {
            Some(b) => b.as_str(),
            None => proto::CONTEXT_BASE_ALLOCATION,
        };
        meta = set_meta_context(&mut *s, export, context)?;
    }
    if opts.x_dirty_bitmap.is_some() && meta.is_none() {
        // QEMU's text (the detailed one is lost on its way out).
        return Err(Error::errno_msg(
            libc::EINVAL,
            "Could not open image: Invalid argument",
        ));
    }
    let (size, flags, block) = match go(&mut *s, export)? {
        Some(r) => r,
        None => {
            // Servers before GO: EXPORT_NAME ends negotiation, and an
            // unknown export is a closed connection.
            proto::write_option(&mut s, opt::EXPORT_NAME, export.as_bytes()).map_err(neg_err)?;
            let size = s
                .be64()
                .map_err(|_| Error::errno_msg(libc::EINVAL, "Requested export not available"))?;
            let flags = s.be16().map_err(neg_err)?;
            if !no_zeroes {
                s.skip(124).map_err(neg_err)?;
            }
            (size, flags, None)
        }
    };
    if size > i64::MAX as u64 {
        return Err(Error::errno_msg(libc::EINVAL, "Export size is too large"));
    }
    Ok((
        s,
        Negotiated {
            size,
            flags,
            block,
            structured,
            extended,
            meta,
        },
    ))
}

/// QEMU's text for a failed connect (`Failed to connect to 'ADDR': …`,
/// `address resolution failed for HOST:PORT: …`).
fn connect_error(addr: &SocketAddress, e: io::Error) -> Error {
    if let SocketAddress::Inet { host, port } = addr {
        let text = e.to_string();
        let lookup = text.strip_prefix("failed to lookup address information: ");
        if e.kind() == io::ErrorKind::InvalidInput || lookup.is_some() {
            let why = lookup.unwrap_or("Servname not supported for ai_socktype");
            return Error::errno_msg(
                libc::EINVAL,
                format!("address resolution failed for {host}:{port}: {why}"),
            );
        }
    }
    let errno = e.raw_os_error().unwrap_or(libc::EIO);
    let why = match e.raw_os_error() {
        Some(n) => strerror(n),
        None => e.to_string(),
    };
    Error::errno_msg(errno, format!("Failed to connect to '{addr}': {why}"))
}

// ---- transmission -----------------------------------------------------------

/// Why a request got no answer on its connection.
enum Lost {
    /// The connection ended; the request may be sent again on the next.
    Disconnected,
}

/// One request in flight.
struct Entry {
    kind: u16,
    offset: u64,
    len: u64,
    /// Read data (READ only), filled by the reader.
    data: Vec<u8>,
    /// Block status extents of the negotiated context.
    extents: Vec<Extent>,
    /// The server's error for it (first one wins).
    error: Option<Error>,
    done: bool,
    lost: bool,
}

#[derive(Default)]
struct Table {
    entries: HashMap<u64, Entry>,
    next_cookie: u64,
    /// The connection ended: no new entries, every waiter is woken.
    dead: bool,
}

/// One negotiated connection in the transmission phase.
struct Conn {
    neg: Negotiated,
    writer: Mutex<Box<dyn Write + Send>>,
    closer: Closer,
    table: Mutex<Table>,
    /// Signalled when an entry completes, a slot frees up or the
    /// connection dies.
    cv: Condvar,
}

/// How a connection ended, as the reader saw it.
enum End {
    /// EOF or an I/O error: reconnectable (QEMU's `-EIO`).
    Io,
    /// The server broke the protocol: never reconnect (QEMU's QUIT).
    Protocol(String),
}

impl From<io::Error> for End {
    fn from(e: io::Error) -> End {
        if e.kind() == io::ErrorKind::InvalidData {
            End::Protocol(e.to_string())
        } else {
            End::Io
        }
    }
}

fn protocol(msg: impl Into<String>) -> End {
    End::Protocol(msg.into())
}

/// Fills `buf` from `r`. `idle`: timeouts before the first byte are
/// asked about (a server slow to start a reply is waited for while `idle`
/// says `None`); any other timeout is a stall (one socket timeout is
/// [`STALL_TIMEOUT`] without a byte).
fn read_full(
    r: &mut dyn Read,
    buf: &mut [u8],
    idle: Option<&dyn Fn() -> Option<End>>,
) -> Result<(), End> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => return Err(End::Io),
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                match idle {
                    Some(f) if n == 0 => {
                        if let Some(end) = f() {
                            return Err(end);
                        }
                    }
                    _ => {
                        return Err(protocol(format!(
                            "reply stalled for {STALL_TIMEOUT:?} in its middle"
                        )));
                    }
                }
            }
            Err(_) => return Err(End::Io),
        }
    }
    Ok(())
}

impl Conn {
    fn new(neg: Negotiated, t: Transport) -> (Arc<Conn>, Box<dyn Read + Send>) {
        let conn = Arc::new(Conn {
            neg,
            writer: Mutex::new(t.writer),
            closer: t.closer,
            table: Mutex::new(Table::default()),
            cv: Condvar::default(),
        });
        (conn, t.reader)
    }

    /// Sends one request and waits for its whole reply.
    fn request(&self, req: Request, payload: Option<&[u8]>) -> Result<Entry, Lost> {
        let cookie = {
            let mut t = self.table.lock();
            while !t.dead && t.entries.len() >= MAX_IN_FLIGHT {
                t = self.cv.wait(t);
            }
            if t.dead {
                return Err(Lost::Disconnected);
            }
            t.next_cookie = t.next_cookie.wrapping_add(1);
            let cookie = t.next_cookie;
            let data = if req.kind == cmd::READ {
                vec![0; req.length as usize]
            } else {
                Vec::new()
            };
            t.entries.insert(
                cookie,
                Entry {
                    kind: req.kind,
                    offset: req.offset,
                    len: req.length,
                    data,
                    extents: Vec::new(),
                    error: None,
                    done: false,
                    lost: false,
                },
            );
            cookie
        };
        let header = Request { cookie, ..req }.encode(self.neg.extended);
        let sent = {
            let mut w = self.writer.lock();
            write_parts(&mut *w, &[&header, payload.unwrap_or(&[])]).and_then(|_| w.flush())
        };
        if sent.is_err() {
            // A half-written request poisons the stream: end it; the
            // reader fails every entry, this one included.
            self.closer.close();
        }
        let mut t = self.table.lock();
        loop {
            if t.entries.get(&cookie).is_some_and(|e| e.done) {
                let e = t.entries.remove(&cookie).expect("checked above");
                // A slot is free.
                self.cv.notify_all();
                return if e.lost {
                    Err(Lost::Disconnected)
                } else {
                    Ok(e)
                };
            }
            t = self.cv.wait(t);
        }
    }

    /// Fails every waiting request (the connection is gone).
    fn fail_all(&self) {
        let mut t = self.table.lock();
        t.dead = true;
        for e in t.entries.values_mut() {
            if !e.done {
                e.done = true;
                e.lost = true;
            }
        }
        drop(t);
        self.cv.notify_all();
        self.closer.close();
    }

    /// Reads replies until the connection ends.
    fn read_loop(&self, r: &mut dyn Read, closing: &dyn Fn() -> bool) -> End {
        // When the last reply (or the last idle moment) was.
        let last = std::cell::Cell::new(Instant::now());
        let idle = || {
            if closing() {
                return Some(End::Io);
            }
            if self.table.lock().entries.is_empty() {
                last.set(Instant::now());
                return None;
            }
            // Requests wait and nothing came for a long time: a server
            // that hangs is treated as gone (reconnect, replay).
            (last.get().elapsed() >= IDLE_TIMEOUT).then_some(End::Io)
        };
        loop {
            if let Err(e) = self.read_one(r, &idle) {
                return e;
            }
            last.set(Instant::now());
        }
    }

    fn read_one(&self, r: &mut dyn Read, idle: &dyn Fn() -> Option<End>) -> Result<(), End> {
        let ext = self.neg.extended;
        let mut hdr = [0u8; 32];
        read_full(r, &mut hdr[..4], Some(idle))?;
        let magic = u32::from_be_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
        let hlen = ReplyHeader::len_for_magic(magic, ext)
            .ok_or_else(|| protocol(format!("bad reply magic {magic:#x}")))?;
        read_full(r, &mut hdr[4..hlen], None)?;
        let h = ReplyHeader::read(&mut &hdr[..hlen], ext)?;
        let cookie = h.cookie();
        // The request it answers; the reader alone touches an entry's
        // buffers until it is done.
        let (kind, offset, len, mut data) = {
            let mut t = self.table.lock();
            let e = t
                .entries
                .get_mut(&cookie)
                .filter(|e| !e.done)
                .ok_or_else(|| protocol(format!("reply with unknown cookie {cookie}")))?;
            (e.kind, e.offset, e.len, std::mem::take(&mut e.data))
        };
        let mut error = None;
        let mut extents = Vec::new();
        let done = match h {
            ReplyHeader::Simple { error: err, .. } => {
                if err != 0 {
                    error = Some(proto::errno_from_nbd(err));
                } else if kind == cmd::READ {
                    if self.neg.structured {
                        return Err(protocol("simple reply to a read with structured replies"));
                    }
                    read_full(r, &mut data, None)?;
                }
                true
            }
            ReplyHeader::Chunk {
                flags,
                kind: ck,
                length,
                ..
            } => {
                if !self.neg.structured {
                    return Err(protocol("structured reply without negotiation"));
                }
                match ck {
                    chunk::NONE if length == 0 => {}
                    chunk::OFFSET_DATA if kind == cmd::READ => {
                        if length <= 8 || length - 8 > len {
                            return Err(protocol(format!("data chunk of {length} bytes")));
                        }
                        let mut o = [0u8; 8];
                        read_full(r, &mut o, None)?;
                        let at = u64::from_be_bytes(o);
                        let n = length - 8;
                        if at < offset || at - offset > len - n {
                            return Err(protocol("data chunk outside its request"));
                        }
                        let rel = (at - offset) as usize;
                        read_full(r, &mut data[rel..rel + n as usize], None)?;
                    }
                    chunk::OFFSET_HOLE if kind == cmd::READ && length == 12 => {
                        let mut p = [0u8; 12];
                        read_full(r, &mut p, None)?;
                        let (at, n) = proto::parse_offset_hole(&p)?;
                        let n = u64::from(n);
                        if at < offset || n > len || at - offset > len - n {
                            return Err(protocol("hole chunk outside its request"));
                        }
                        let rel = (at - offset) as usize;
                        data[rel..rel + n as usize].fill(0);
                    }
                    chunk::BLOCK_STATUS | chunk::BLOCK_STATUS_EXT
                        if kind == cmd::BLOCK_STATUS && (ck == chunk::BLOCK_STATUS_EXT) == ext =>
                    {
                        let p = payload(r, length, MAX_STATUS_PAYLOAD)?;
                        let (id, ex) = proto::parse_block_status(ck, &p)?;
                        if Some(id) != self.neg.meta {
                            return Err(protocol(format!("block status for context {id}")));
                        }
                        extents = ex;
                    }
                    k if k & chunk::FLAG_ERROR != 0 => {
                        let p = payload(r, length, MAX_ERROR_PAYLOAD)?;
                        let e = match k {
                            chunk::ERROR | chunk::ERROR_OFFSET => {
                                proto::parse_error_chunk(k, &p)?.0
                            }
                            // Unknown error types carry an error first.
                            _ => proto::err::EINVAL,
                        };
                        error = Some(proto::errno_from_nbd(e));
                    }
                    k => {
                        return Err(protocol(format!(
                            "unexpected chunk type {k} ({length} bytes) for command {kind}"
                        )));
                    }
                }
                flags & proto::REPLY_FLAG_DONE != 0
            }
        };
        let mut t = self.table.lock();
        let e = t
            .entries
            .get_mut(&cookie)
            .expect("only callers remove done entries");
        e.data = data;
        if e.extents.is_empty() {
            e.extents = extents;
        }
        if let (None, Some(errno)) = (&e.error, error) {
            e.error = Some(Error::from_errno(errno));
        }
        if done {
            e.done = true;
            drop(t);
            self.cv.notify_all();
        }
        Ok(())
    }
}

/// A chunk payload of at most `max` bytes.
fn payload(r: &mut dyn Read, length: u64, max: u64) -> Result<Vec<u8>, End> {
    if length > max {
        return Err(protocol(format!("chunk of {length} bytes exceeds {max}")));
    }
    let mut v = vec![0; length as usize];
    read_full(r, &mut v, None)?;
    Ok(v)
}

// ---- the node's link: connected, connecting, dead ------------------------------

enum Link {
    Up(Arc<Conn>),
    /// Disconnected at `since`; the manager is reconnecting. `attempt`
    /// ends a connection attempt in progress (for close).
    Connecting {
        since: Instant,
        attempt: Option<Closer>,
    },
    /// The server broke the protocol (what it did): requests fail for good.
    Dead(String),
    /// The node is being closed.
    Closed,
}

struct Shared {
    opts: NbdOptions,
    tls: Option<TlsUpgrade>,
    /// What the first connection negotiated; reconnections must agree on
    /// the size.
    first: Negotiated,
    link: Mutex<Link>,
    /// Signalled on every change of `link`.
    cv: Condvar,
}

impl Shared {
    fn set(&self, new: Link) {
        let mut l = self.link.lock();
        if !matches!(*l, Link::Closed) {
            *l = new;
        }
        drop(l);
        self.cv.notify_all();
    }

    fn closing(&self) -> bool {
        matches!(*self.link.lock(), Link::Closed)
    }

    /// The connection to send on: waits while reconnecting within
    /// `reconnect-delay`, EIO otherwise.
    fn connected(&self) -> Result<Arc<Conn>> {
        let delay = Duration::from_secs(self.opts.reconnect_delay.into());
        let mut l = self.link.lock();
        loop {
            match &*l {
                Link::Up(c) => return Ok(c.clone()),
                Link::Connecting { since, .. } => {
                    let left = (*since + delay).saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(Error::from_errno(libc::EIO));
                    }
                    l = self.cv.wait_timeout(l, left);
                }
                Link::Dead(_) | Link::Closed => return Err(Error::from_errno(libc::EIO)),
            }
        }
    }

    /// After `conn` was lost: waits until the link no longer names it.
    fn wait_replaced(&self, conn: &Arc<Conn>) {
        let mut l = self.link.lock();
        while matches!(&*l, Link::Up(c) if Arc::ptr_eq(c, conn)) {
            l = self.cv.wait(l);
        }
    }

    /// The manager thread: reads replies, and reconnects when the
    /// connection ends, until the node closes or the server breaks the
    /// protocol.
    fn manage(self: Arc<Self>, mut conn: Arc<Conn>, mut reader: Box<dyn Read + Send>) {
        loop {
            let closing = || self.closing();
            let end = conn.read_loop(&mut *reader, &closing);
            conn.fail_all();
            drop(reader);
            if self.closing() {
                return;
            }
            match end {
                End::Protocol(why) => {
                    self.set(Link::Dead(why));
                    return;
                }
                End::Io => self.set(Link::Connecting {
                    since: Instant::now(),
                    attempt: None,
                }),
            }
            match self.reconnect() {
                Some((c, r)) => {
                    conn = c;
                    reader = r;
                }
                None => return,
            }
        }
    }

    /// Tries to connect again until it works (`None`: closing).
    fn reconnect(&self) -> Option<(Arc<Conn>, Box<dyn Read + Send>)> {
        let mut pause = RECONNECT_BACKOFF.0;
        loop {
            let remember = |c: Closer| {
                if let Link::Connecting { attempt, .. } = &mut *self.link.lock() {
                    *attempt = Some(c);
                }
            };
            if self.closing() {
                return None;
            }
            let got = connect(&self.opts, self.tls.as_ref(), &remember).and_then(|(s, neg)| {
                if neg.size != self.first.size {
                    // QEMU refuses a reconnection to a resized export.
                    return Err(Error::generic("export size changed"));
                }
                s.into_transport()
                    .map(|t| (neg, t))
                    .map_err(|e| Error::generic(e.to_string()))
            });
            match got {
                Ok((neg, t)) => {
                    let (c, r) = Conn::new(neg, t);
                    let mut l = self.link.lock();
                    if matches!(*l, Link::Closed) {
                        c.fail_all();
                        return None;
                    }
                    *l = Link::Up(c.clone());
                    drop(l);
                    self.cv.notify_all();
                    return Some((c, r));
                }
                Err(_) => {
                    let mut l = self.link.lock();
                    if let Link::Connecting { attempt, .. } = &mut *l {
                        *attempt = None;
                    }
                    if matches!(*l, Link::Closed) {
                        return None;
                    }
                    // Woken early by a close.
                    let _l = self.cv.wait_timeout(l, pause);
                    pause = (pause * 2).min(RECONNECT_BACKOFF.1);
                }
            }
        }
    }
}

// ---- the driver -------------------------------------------------------------

/// The `nbd` driver.
pub struct NbdDriver {
    shared: Arc<Shared>,
    manager: Mutex<Option<JoinHandle<()>>>,
    read_only: bool,
    /// Request alignment (the server's minimum block size).
    align: u64,
    /// Largest read or write payload.
    max_payload: u64,
    /// Unaligned writes read-modify-write whole blocks under the write
    /// side; aligned requests take the read side.
    rmw: RwLock<()>,
}

impl std::fmt::Debug for NbdDriver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let link = match &*self.shared.link.lock() {
            Link::Up(_) => "connected".to_string(),
            Link::Connecting { .. } => "connecting".to_string(),
            Link::Dead(why) => format!("failed: {why}"),
            Link::Closed => "closed".to_string(),
        };
        f.debug_struct("NbdDriver")
            .field("uri", &self.shared.opts.uri())
            .field("link", &link)
            .finish()
    }
}

impl NbdDriver {
    /// Connects (retrying for `open-timeout` seconds), negotiates, and
    /// starts the node's manager thread.
    pub fn open(opts: &NbdOptions, read_only: bool, objects: &Objects) -> Result<NbdDriver> {
        let tls = match &opts.tls_creds {
            Some(id) => Some(tls_upgrade_for(objects, id)?),
            None => None,
        };
        let deadline = Instant::now() + Duration::from_secs(opts.open_timeout);
        let mut pause = RECONNECT_BACKOFF.0;
        let (stream, neg) = loop {
            match connect(opts, tls.as_ref(), &|_| {}) {
                Ok(r) => break r,
                // Only a failure to connect is retried; a server that
                // answers "no" means it.
                Err(e)
                    if e.message().starts_with("Failed to connect")
                        && Instant::now() + pause < deadline =>
                {
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(RECONNECT_BACKOFF.1);
                }
                Err(e) => return Err(e),
            }
        };
        if neg.flags & tflag::READ_ONLY != 0 && !read_only {
            return Err(Error::errno_msg(
                libc::EACCES,
                "Could not open image: Permission denied",
            ));
        }
        let align = match neg.block {
            Some(b) => u64::from(b.min),
            // QEMU: byte granularity needs structured replies to read
            // (a simple reply cannot describe holes in a partial block).
            None if neg.structured => 1,
            None => 512,
        };
        let max = neg
            .block
            .map_or(proto::MAX_BUFFER, |b| b.max.min(proto::MAX_BUFFER));
        let max_payload = (u64::from(max) / align * align).max(align);
        let t = stream
            .into_transport()
            .map_err(|e| Error::generic(e.to_string()))?;
        let (conn, reader) = Conn::new(neg, t);
        let shared = Arc::new(Shared {
            opts: opts.clone(),
            tls,
            first: neg,
            link: Mutex::new(Link::Up(conn.clone())),
            cv: Condvar::default(),
        });
        let s2 = shared.clone();
        let manager = std::thread::Builder::new()
            .name("nbd-client".into())
            .spawn(move || s2.manage(conn, reader))
            .map_err(|e| Error::generic(format!("cannot start the NBD reader: {e}")))?;
        Ok(NbdDriver {
            shared,
            manager: Mutex::new(Some(manager)),
            read_only,
            align,
            max_payload,
            rmw: RwLock::new(()),
        })
    }

    fn neg(&self) -> Negotiated {
        self.shared.first
    }

    fn has(&self, flag: u16) -> bool {
        self.neg().flags & flag != 0
    }

    /// One request, replayed on a new connection while the link waits for
    /// one (QEMU's `nbd_co_request` loop).
    fn call(
        &self,
        kind: u16,
        flags: u16,
        offset: u64,
        length: u64,
        data: Option<&[u8]>,
    ) -> Result<Entry> {
        let req = Request {
            flags,
            kind,
            cookie: 0,
            offset,
            length,
        };
        loop {
            let conn = self.shared.connected()?;
            match conn.request(req, data) {
                Ok(mut e) => {
                    return match e.error.take() {
                        Some(err) => Err(err),
                        None => Ok(e),
                    };
                }
                Err(Lost::Disconnected) => self.shared.wait_replaced(&conn),
            }
        }
    }

    fn aligned(&self, offset: u64, len: u64) -> bool {
        offset.is_multiple_of(self.align) && len.is_multiple_of(self.align)
    }

    fn read_aligned(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        for (i, piece) in buf.chunks_mut(self.max_payload as usize).enumerate() {
            let at = offset + i as u64 * self.max_payload;
            let e = self.call(cmd::READ, 0, at, piece.len() as u64, None)?;
            piece.copy_from_slice(&e.data);
        }
        Ok(())
    }

    fn write_aligned(&self, offset: u64, buf: &[u8], flags: u16) -> Result<()> {
        for (i, piece) in buf.chunks(self.max_payload as usize).enumerate() {
            let at = offset + i as u64 * self.max_payload;
            self.call(cmd::WRITE, flags, at, piece.len() as u64, Some(piece))?;
        }
        Ok(())
    }

    /// The request flag for FUA where the server takes it (every piece of
    /// a split request carries it, as QEMU sends them); `None` when FUA
    /// has to be a flush after the request.
    fn fua_flag(&self, flags: WriteFlags) -> (u16, bool) {
        match (flags.fua, self.has(tflag::SEND_FUA)) {
            (false, _) => (0, false),
            (true, true) => (cflag::FUA, false),
            (true, false) => (0, true),
        }
    }

    fn write_flagged(&self, offset: u64, buf: &[u8], flags: u16) -> Result<()> {
        if self.aligned(offset, buf.len() as u64) {
            let _g = self.rmw.read();
            return self.write_aligned(offset, buf, flags);
        }
        // Read-modify-write of whole blocks, alone: a concurrent write
        // into the same blocks would be lost.
        let _g = self.rmw.write();
        let (start, len) = self.widen(offset, buf.len() as u64);
        let mut tmp = vec![0; len as usize];
        self.read_aligned(start, &mut tmp)?;
        let rel = (offset - start) as usize;
        tmp[rel..rel + buf.len()].copy_from_slice(buf);
        self.write_aligned(start, &tmp, flags)
    }

    fn zeroes_flagged(
        &self,
        offset: u64,
        len: u64,
        may_unmap: bool,
        flags: WriteFlags,
    ) -> Result<()> {
        let (fua, _) = self.fua_flag(flags);
        let buffers = |o, l| super::write_zero_buffers(o, l, |o, b| self.write_flagged(o, b, fua));
        let fast = flags.no_fallback;
        if !self.has(tflag::SEND_WRITE_ZEROES) || (fast && !self.has(tflag::SEND_FAST_ZERO)) {
            // QEMU's client does not declare NO_FALLBACK to a server
            // without FAST_ZERO: refused before anything is sent.
            if fast {
                return Err(Error::from_errno(libc::ENOTSUP));
            }
            return buffers(offset, len);
        }
        // Unaligned head and tail as written zeroes, the middle as a request.
        let start = offset.next_multiple_of(self.align);
        let end = ((offset + len) / self.align * self.align).max(start);
        let whole = start == offset && end == offset + len && start < end;
        if fast && !whole {
            // Zero buffers for the unaligned edges are the slow way.
            return Err(Error::from_errno(libc::ENOTSUP));
        }
        if start >= offset + len || start == end {
            return buffers(offset, len);
        }
        buffers(offset, start - offset)?;
        {
            let _g = self.rmw.read();
            // NO_HOLE unless the caller allows deallocation (QEMU:
            // BDRV_REQ_MAY_UNMAP); FAST_ZERO for BDRV_REQ_NO_FALLBACK.
            let mut f = fua;
            if !may_unmap {
                f |= cflag::NO_HOLE;
            }
            if fast {
                f |= cflag::FAST_ZERO;
            }
            self.no_payload(cmd::WRITE_ZEROES, f, start, end - start)?;
        }
        buffers(end, offset + len - end)
    }

    /// The aligned range around `[offset, offset + len)`.
    fn widen(&self, offset: u64, len: u64) -> (u64, u64) {
        let start = offset / self.align * self.align;
        let end = (offset + len).div_ceil(self.align) * self.align;
        (start, end - start)
    }

    /// Requests without payload, split to the limits.
    fn no_payload(&self, kind: u16, flags: u16, offset: u64, len: u64) -> Result<()> {
        let max = MAX_NO_PAYLOAD / self.align * self.align;
        let mut done = 0;
        while done < len {
            let n = (len - done).min(max);
            self.call(kind, flags, offset + done, n, None)?;
            done += n;
        }
        Ok(())
    }
}

impl Drop for NbdDriver {
    fn drop(&mut self) {
        let old = std::mem::replace(&mut *self.shared.link.lock(), Link::Closed);
        self.shared.cv.notify_all();
        match old {
            Link::Up(c) => {
                // Polite: tell the server we go (best effort; the write
                // is bounded by the socket's timeout).
                let disc = Request {
                    flags: 0,
                    kind: cmd::DISC,
                    cookie: 0,
                    offset: 0,
                    length: 0,
                };
                let _ = c.writer.lock().write_all(&disc.encode(c.neg.extended));
                c.closer.close();
            }
            Link::Connecting {
                attempt: Some(a), ..
            } => a.close(),
            _ => {}
        }
        if let Some(h) = self.manager.lock().take() {
            let _ = h.join();
        }
    }
}

impl BlockDriver for NbdDriver {
    fn driver_name(&self) -> &'static str {
        "nbd"
    }

    fn len(&self) -> Result<u64> {
        Ok(self.neg().size)
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        if self.aligned(offset, buf.len() as u64) {
            return self.read_aligned(offset, buf);
        }
        let (start, len) = self.widen(offset, buf.len() as u64);
        let mut tmp = vec![0; len as usize];
        self.read_aligned(start, &mut tmp)?;
        let rel = (offset - start) as usize;
        buf.copy_from_slice(&tmp[rel..rel + buf.len()]);
        Ok(())
    }

    fn write(&self, offset: u64, buf: &[u8]) -> Result<()> {
        self.write_flagged(offset, buf, 0)
    }

    fn write_with(&self, offset: u64, buf: &[u8], flags: WriteFlags) -> Result<()> {
        let (fua, then_flush) = self.fua_flag(flags);
        self.write_flagged(offset, buf, fua)?;
        if then_flush {
            self.flush()?;
        }
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<()> {
        self.zeroes_flagged(offset, len, may_unmap, WriteFlags::default())
    }

    fn write_zeroes_with(
        &self,
        offset: u64,
        len: u64,
        may_unmap: bool,
        flags: WriteFlags,
    ) -> Result<()> {
        self.zeroes_flagged(offset, len, may_unmap, flags)?;
        if self.fua_flag(flags).1 {
            self.flush()?;
        }
        Ok(())
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        if !self.has(tflag::SEND_TRIM) {
            return Ok(());
        }
        // A hint: only the aligned part goes to the server.
        let start = offset.next_multiple_of(self.align);
        let end = (offset + len) / self.align * self.align;
        if end <= start {
            return Ok(());
        }
        let _g = self.rmw.read();
        self.no_payload(cmd::TRIM, 0, start, end - start)
    }

    fn can_discard(&self) -> bool {
        self.has(tflag::SEND_TRIM)
    }

    fn flush(&self) -> Result<()> {
        if !self.has(tflag::SEND_FLUSH) || self.read_only {
            return Ok(());
        }
        self.call(cmd::FLUSH, 0, 0, 0, None).map(|_| ())
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus> {
        if self.neg().meta.is_none() {
            return Ok(BlockStatus::data(len));
        }
        let start = offset / self.align * self.align;
        let max = MAX_NO_PAYLOAD / self.align * self.align;
        let size = self.neg().size;
        let want = (offset + len - start)
            .div_ceil(self.align)
            .saturating_mul(self.align)
            .min(max)
            .min(size - start);
        let e = self.call(cmd::BLOCK_STATUS, cflag::REQ_ONE, start, want, None)?;
        let Some(first) = e.extents.first() else {
            return Err(Error::errno_msg(
                libc::EIO,
                "server sent no block status for the request",
            ));
        };
        let covered = start + first.length;
        if covered <= offset {
            // An extent shorter than the unaligned head: nothing known.
            return Ok(BlockStatus::data(
                (self.align - offset % self.align).min(len),
            ));
        }
        // QEMU's mapping (also for `x-dirty-bitmap`, whose "dirty" bit is
        // the hole bit): no hole → data; zero bit → zero; allocated when
        // either (a protocol node).
        let flags = first.flags as u32;
        let data = flags & proto::STATE_HOLE == 0;
        let zero = flags & proto::STATE_ZERO != 0;
        Ok(BlockStatus {
            data,
            zero,
            allocated: data || zero,
            len: (covered - offset).min(len),
        })
    }

    fn filename(&self) -> String {
        self.shared.opts.uri()
    }

    fn open_options(&self) -> Option<Value> {
        Some(self.shared.opts.to_json())
    }

    fn supports_zero_unmap(&self) -> bool {
        self.has(tflag::SEND_WRITE_ZEROES)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(v: Value) -> Result<NbdOptions> {
        let mut o = Obj::new(&v, "")?;
        let r = NbdOptions::parse(&mut o)?;
        o.finish()?;
        Ok(r)
    }

    fn err(v: Value) -> String {
        parse(v).unwrap_err().message().to_string()
    }

    /// Texts recorded from qemu-storage-daemon 10.0 blockdev-add.
    #[test]
    fn option_errors_match_qemu() {
        assert_eq!(err(json!({})), "Parameter 'server' is missing");
        assert_eq!(
            err(json!({"server": "x"})),
            "Invalid parameter type for 'server', expected: object"
        );
        assert_eq!(
            err(json!({"server": {"path": "/x"}})),
            "Parameter 'server.type' is missing"
        );
        assert_eq!(
            err(json!({"server": {"type": "unix"}})),
            "Parameter 'server.path' is missing"
        );
        assert_eq!(
            err(json!({"server": {"type": "inet", "host": "h"}})),
            "Parameter 'server.port' is missing"
        );
        assert_eq!(
            err(json!({"server": {"type": "inet", "host": "h", "port": 5}})),
            "Invalid parameter type for 'server.port', expected: string"
        );
        assert_eq!(
            err(json!({"server": {"type": "unix", "path": "/x", "bogus": 1}})),
            "Parameter 'server.bogus' is unexpected"
        );
        let unix = json!({"type": "unix", "path": "/x"});
        assert_eq!(
            err(json!({"server": unix, "export": 5})),
            "Invalid parameter type for 'export', expected: string"
        );
        assert_eq!(
            err(json!({"server": unix, "x-dirty-bitmap": 5})),
            "Invalid parameter type for 'x-dirty-bitmap', expected: string"
        );
        for bad in [json!(-1), json!(4294967296u64)] {
            assert_eq!(
                err(json!({"server": unix, "reconnect-delay": bad})),
                "Parameter 'reconnect-delay' expects uint32_t"
            );
        }
        assert_eq!(
            err(json!({"server": unix, "reconnect-delay": "5"})),
            "Parameter 'reconnect-delay' expects uint64"
        );
        assert_eq!(
            err(json!({"server": unix, "open-timeout": "a"})),
            "Parameter 'open-timeout' expects uint64"
        );
    }

    #[test]
    fn file_names_are_qemus() {
        let mut o =
            parse(json!({"server": {"type": "unix", "path": "/s.sock"}, "export": "d"})).unwrap();
        assert_eq!(o.uri(), "nbd+unix:///d?socket=/s.sock");
        o.export = None;
        assert_eq!(o.uri(), "nbd+unix://?socket=/s.sock");
        let o = parse(
            json!({"server": {"type": "inet", "host": "127.0.0.1", "port": "10809"},
            "export": "d", "reconnect-delay": 3, "open-timeout": 2}),
        )
        .unwrap();
        assert_eq!(o.uri(), "nbd://127.0.0.1:10809/d");
        assert_eq!((o.reconnect_delay, o.open_timeout), (3, 2));
    }

    #[test]
    fn unknown_tls_creds_fail_before_connecting() {
        let o = parse(json!({"server": {"type": "unix", "path": "/nonexistent/s"},
            "tls-creds": "tls0"}))
        .unwrap();
        assert_eq!(
            NbdDriver::open(&o, false, &Objects::new())
                .unwrap_err()
                .message(),
            "No TLS credentials with id 'tls0'"
        );
    }

    #[test]
    fn connect_errors_are_qemus() {
        let o = parse(json!({"server": {"type": "unix", "path": "/nonexistent/s"}})).unwrap();
        assert_eq!(
            NbdDriver::open(&o, false, &Objects::new())
                .unwrap_err()
                .message(),
            "Failed to connect to '/nonexistent/s': No such file or directory"
        );
        let o =
            parse(json!({"server": {"type": "inet", "host": "127.0.0.1", "port": "x"}})).unwrap();
        assert_eq!(
            NbdDriver::open(&o, false, &Objects::new())
                .unwrap_err()
                .message(),
            "address resolution failed for 127.0.0.1:x: Servname not supported for ai_socktype"
        );
    }
}
