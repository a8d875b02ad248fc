//! One NBD client connection: fixed newstyle negotiation, then
//! transmission with requests read by this thread and served by a small
//! pool of workers, each reply written whole under the writer's lock.
//!
//! A hostile or broken client costs its connection, never the server:
//! every length from the wire is bounded before anything is allocated
//! (options by `proto::MAX_OPTION_LEN`, payloads by `proto::MAX_BUFFER`),
//! requests in flight are bounded in number and bytes, negotiation has a
//! deadline (`handshake-max-seconds`), and any read or write error ends
//! the connection after the requests in flight finished.

use std::io::{self, Read, Write};
use std::sync::Arc;
use std::thread;
use std::time::Instant;

use super::Export;
use super::nbd_server::ServerShared;
use crate::block::WriteFlags;
use crate::block::backend::GuestIoError;
use crate::locks::{Condvar, Mutex};
use crate::nbd::proto::{
    self, Buf, CONTEXT_ALLOCATION_DEPTH, CONTEXT_BASE_ALLOCATION, CONTEXT_DIRTY_BITMAP_PREFIX,
    Extent, Payload, ReadBe, Request, cflag, chunk, cmd, err, info, opt, rep, tflag,
};
use crate::nbd::transport::{BufferedRead, Stream, Transport, write_parts};

use super::nbd_aio::{self, Aio, Started};

/// Requests in flight per connection (QEMU's `NBD_MAX_REQUESTS`).
const MAX_REQUESTS: usize = 16;
/// Payload bytes in flight per connection (write data held by queued
/// requests); one request is always let through.
const MAX_INFLIGHT_BYTES: u64 = 64 << 20;
/// Worker threads a connection starts with; it grows up to one per
/// request in flight ([`MAX_REQUESTS`]) when requests wait for a worker,
/// because each worker waits for its own I/O: on an O_DIRECT device 4 KiB
/// random requests from a client at queue depth 16 served 13 100 IOPS by
/// 4 workers against QEMU's 18 900 (`benches/guest_io_under_job.py`).
const WORKERS: usize = 4;
/// Most extents in one block status reply (QEMU's
/// `NBD_MAX_BLOCK_STATUS_EXTENTS`).
const MAX_EXTENTS: usize = (1 << 20) / 8;

/// QEMU's meta context ids.
const ID_BASE_ALLOCATION: u32 = 0;
const ID_ALLOCATION_DEPTH: u32 = 1;
const ID_DIRTY_BITMAP: u32 = 2;

/// Structured / extended replies negotiated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Mode {
    Simple,
    Structured,
    Extended,
}

/// The meta contexts a client selected, for one export.
#[derive(Debug, Default, Clone)]
struct Contexts {
    export: String,
    base: bool,
    depth: bool,
    /// Indices into the export's bitmaps.
    bitmaps: Vec<usize>,
}

impl Contexts {
    fn any(&self) -> bool {
        self.base || self.depth || !self.bitmaps.is_empty()
    }
}

/// Negotiation reads and writes through this: every read is bounded by
/// the handshake deadline (the socket's read timeout is set to what is
/// left before each read), so a client cannot stretch it by trickling.
struct Deadline<'a> {
    s: &'a mut Box<dyn Stream>,
    until: Option<Instant>,
}

impl Read for Deadline<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if let Some(until) = self.until {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::ErrorKind::TimedOut.into());
            }
            self.s.socket().set_read_timeout(Some(left))?;
        }
        self.s.read(buf)
    }
}

impl Write for Deadline<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.s.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.s.flush()
    }
}

/// What negotiation ends with.
struct Negotiated {
    export: Arc<Export>,
    mode: Mode,
    contexts: Contexts,
}

/// Serves one connection to its end.
pub(super) fn serve(s: &Arc<ServerShared>, id: u64, stream: Box<dyn Stream>) {
    crate::nbd::transport::block_sigpipe();
    let mut stream = stream;
    let until = s.handshake.map(|d| Instant::now() + d);
    let _ = stream.socket().set_write_timeout(s.handshake);
    let neg = negotiate(s, id, &mut stream, until);
    let Ok(Some(n)) = neg else {
        stream.socket().shutdown();
        return;
    };
    if stream.socket().set_read_timeout(None).is_err()
        || stream.socket().set_write_timeout(None).is_err()
    {
        stream.socket().shutdown();
        return;
    }
    let Ok(t) = stream.into_transport() else {
        return;
    };
    transmit(t, n);
}

fn negotiate(
    s: &Arc<ServerShared>,
    id: u64,
    stream: &mut Box<dyn Stream>,
    until: Option<Instant>,
) -> io::Result<Option<Negotiated>> {
    let mut greet = Buf::default();
    greet
        .u64(proto::NBD_MAGIC)
        .u64(proto::IHAVEOPT)
        .u16(proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES);
    stream.write_all(&greet.0)?;
    let client_flags = Deadline { s: stream, until }.be32()?;
    if client_flags & !(proto::CLIENT_FIXED_NEWSTYLE | proto::CLIENT_NO_ZEROES) != 0 {
        return Ok(None);
    }
    let fixed = client_flags & proto::CLIENT_FIXED_NEWSTYLE != 0;
    let no_zeroes = client_flags & proto::CLIENT_NO_ZEROES != 0;
    let mut mode = Mode::Simple;
    let mut contexts = Contexts::default();
    let mut tls_done = false;
    loop {
        let (option, data) = proto::read_option(&mut Deadline { s: stream, until })?;
        let w: &mut dyn Write = stream;
        let tls_required = s.tls.is_some() && !tls_done;
        if tls_required && !matches!(option, opt::STARTTLS | opt::ABORT | opt::EXPORT_NAME) {
            reply_err(
                w,
                option,
                rep::ERR_TLS_REQD,
                &format!("Option 0x{option:x} not permitted before TLS"),
            )?;
            continue;
        }
        match option {
            opt::EXPORT_NAME => {
                if tls_required {
                    return Ok(None);
                }
                let Ok(name) = String::from_utf8(data) else {
                    return Ok(None);
                };
                let Some(export) = s.bind_export(id, &name) else {
                    return Ok(None);
                };
                let mut b = Buf::default();
                b.u64(export.size).u16(transmission_flags(&export, mode));
                if !no_zeroes {
                    b.bytes(&[0; 124]);
                }
                w.write_all(&b.0)?;
                return Ok(Some(negotiated(export, mode, contexts)));
            }
            _ if !fixed => return Ok(None),
            opt::ABORT => {
                // Best effort: the client may already be gone. Before TLS,
                // QEMU answers even this with ERR_TLS_REQD.
                let _ = if tls_required {
                    proto::write_option_reply(
                        w,
                        option,
                        rep::ERR_TLS_REQD,
                        b"Option 0x2 not permitted before TLS",
                    )
                } else {
                    proto::write_option_reply(w, option, rep::ACK, &[])
                };
                return Ok(None);
            }
            opt::LIST => {
                if !data.is_empty() {
                    reply_err(w, option, rep::ERR_INVALID, "no payload expected")?;
                    continue;
                }
                for e in s.table.all() {
                    let mut b = Buf::default();
                    b.string(&e.name);
                    if let Some(d) = &e.description {
                        b.bytes(d.as_bytes());
                    }
                    proto::write_option_reply(w, option, rep::SERVER, &b.0)?;
                }
                proto::write_option_reply(w, option, rep::ACK, &[])?;
            }
            opt::STARTTLS => {
                if !data.is_empty() {
                    reply_err(w, option, rep::ERR_INVALID, "no payload expected")?;
                    continue;
                }
                let Some(hook) = s.tls.clone() else {
                    reply_err(w, option, rep::ERR_POLICY, "TLS not configured")?;
                    continue;
                };
                if tls_done {
                    reply_err(w, option, rep::ERR_INVALID, "TLS already enabled")?;
                    continue;
                }
                proto::write_option_reply(w, option, rep::ACK, &[])?;
                // The hook replaces the stream: everything from here on,
                // negotiation and transmission, runs over TLS.
                let placeholder = Gone(stream.socket().try_clone()?);
                let plain = std::mem::replace(stream, Box::new(placeholder));
                *stream = hook.upgrade(plain)?;
                tls_done = true;
            }
            opt::INFO | opt::GO => match handle_info(s, id, w, option, &data, mode)? {
                Some(export) => {
                    return Ok(Some(negotiated(export, mode, contexts)));
                }
                None => continue,
            },
            opt::STRUCTURED_REPLY | opt::EXTENDED_HEADERS => {
                let want = if option == opt::STRUCTURED_REPLY {
                    Mode::Structured
                } else {
                    Mode::Extended
                };
                if !data.is_empty() {
                    reply_err(w, option, rep::ERR_INVALID, "no payload expected")?;
                } else if mode >= want {
                    let what = if want == Mode::Structured {
                        "structured reply"
                    } else {
                        "extended headers"
                    };
                    reply_err(
                        w,
                        option,
                        rep::ERR_INVALID,
                        &format!("{what} already negotiated"),
                    )?;
                } else {
                    proto::write_option_reply(w, option, rep::ACK, &[])?;
                    mode = want;
                }
            }
            opt::LIST_META_CONTEXT | opt::SET_META_CONTEXT => {
                if mode < Mode::Structured {
                    reply_err(
                        w,
                        option,
                        rep::ERR_INVALID,
                        &format!(
                            "request option '{}' when structured reply is not negotiated",
                            proto::opt_name(option)
                        ),
                    )?;
                    continue;
                }
                if let Some(c) = handle_meta(s, w, option, &data)? {
                    contexts = c;
                }
            }
            _ => {
                reply_err(
                    w,
                    option,
                    rep::ERR_UNSUP,
                    &format!("Unsupported option {option} ({})", proto::opt_name(option)),
                )?;
            }
        }
    }
}

/// A placeholder while the TLS hook owns the stream: reads and writes
/// fail, but the socket is there to be shut down if the hook fails.
struct Gone(crate::nbd::transport::Socket);

impl Read for Gone {
    fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
        Err(io::ErrorKind::NotConnected.into())
    }
}
impl Write for Gone {
    fn write(&mut self, _: &[u8]) -> io::Result<usize> {
        Err(io::ErrorKind::NotConnected.into())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
impl Stream for Gone {
    fn socket(&self) -> &crate::nbd::transport::Socket {
        &self.0
    }
    fn into_transport(self: Box<Self>) -> io::Result<Transport> {
        Err(io::ErrorKind::NotConnected.into())
    }
}

fn negotiated(export: Arc<Export>, mode: Mode, mut contexts: Contexts) -> Negotiated {
    // Contexts selected for another export do not carry over (QEMU).
    if contexts.export != export.name {
        contexts = Contexts::default();
    }
    Negotiated {
        export,
        mode,
        contexts,
    }
}

fn reply_err(w: &mut dyn Write, option: u32, kind: u32, msg: &str) -> io::Result<()> {
    proto::write_option_reply(w, option, kind, msg.as_bytes())
}

/// The flags a client of `export` sees: the export's, plus `SEND_DF` once
/// structured replies are on (QEMU).
fn transmission_flags(export: &Export, mode: Mode) -> u16 {
    let mut f = export.flags();
    if mode >= Mode::Structured {
        f |= tflag::SEND_DF;
    }
    f
}

/// `NBD_OPT_INFO`/`NBD_OPT_GO` (QEMU's `nbd_negotiate_handle_info`): the
/// export for GO once acknowledged, `None` to go on negotiating.
fn handle_info(
    s: &Arc<ServerShared>,
    id: u64,
    w: &mut dyn Write,
    option: u32,
    data: &[u8],
    mode: Mode,
) -> io::Result<Option<Arc<Export>>> {
    let mut p = Payload::new(data);
    let parsed = (|| -> io::Result<(String, Vec<u16>)> {
        let name = p.string()?;
        let n = p.u16()? as usize;
        if p.remaining() != n * 2 {
            return Err(io::ErrorKind::InvalidData.into());
        }
        let mut reqs = Vec::with_capacity(n);
        for _ in 0..n {
            reqs.push(p.u16()?);
        }
        Ok((name, reqs))
    })();
    let Ok((name, reqs)) = parsed else {
        reply_err(w, option, rep::ERR_INVALID, "Bad length received")?;
        return Ok(None);
    };
    let export = if option == opt::GO {
        s.bind_export(id, &name)
    } else {
        s.table.by_name(&name)
    };
    let Some(export) = export else {
        reply_err(
            w,
            option,
            rep::ERR_UNKNOWN,
            &format!("export '{name}' not present"),
        )?;
        return Ok(None);
    };
    if reqs.contains(&info::NAME) {
        let mut b = Buf::default();
        b.u16(info::NAME).bytes(export.name.as_bytes());
        proto::write_option_reply(w, option, rep::INFO, &b.0)?;
    }
    if let Some(d) = &export.description {
        let mut b = Buf::default();
        b.u16(info::DESCRIPTION).bytes(d.as_bytes());
        proto::write_option_reply(w, option, rep::INFO, &b.0)?;
    }
    // Always sent (QEMU): byte-granular, 4 KiB preferred, 32 MiB payloads.
    let mut b = Buf::default();
    b.u16(info::BLOCK_SIZE)
        .u32(1)
        .u32(4096)
        .u32(proto::MAX_BUFFER);
    proto::write_option_reply(w, option, rep::INFO, &b.0)?;
    let mut b = Buf::default();
    b.u16(info::EXPORT)
        .u64(export.size)
        .u16(transmission_flags(&export, mode));
    proto::write_option_reply(w, option, rep::INFO, &b.0)?;
    proto::write_option_reply(w, option, rep::ACK, &[])?;
    Ok((option == opt::GO).then_some(export))
}

/// `NBD_OPT_LIST_META_CONTEXT`/`SET_META_CONTEXT` (QEMU's
/// `nbd_negotiate_meta_queries`): the selection for SET.
fn handle_meta(
    s: &Arc<ServerShared>,
    w: &mut dyn Write,
    option: u32,
    data: &[u8],
) -> io::Result<Option<Contexts>> {
    let list = option == opt::LIST_META_CONTEXT;
    let mut p = Payload::new(data);
    let parsed = (|| -> io::Result<(String, Vec<String>)> {
        let name = p.string()?;
        let n = p.u32()?;
        let mut qs = Vec::new();
        for _ in 0..n {
            // Each query is at least its 4-byte length: `n` is bounded by
            // the payload, itself bounded by MAX_OPTION_LEN.
            qs.push(p.string()?);
        }
        if p.remaining() != 0 {
            return Err(io::ErrorKind::InvalidData.into());
        }
        Ok((name, qs))
    })();
    let Ok((name, queries)) = parsed else {
        reply_err(w, option, rep::ERR_INVALID, "Bad length received")?;
        return Ok(None);
    };
    let Some(export) = s.table.by_name(&name) else {
        reply_err(
            w,
            option,
            rep::ERR_UNKNOWN,
            &format!("export '{name}' not present"),
        )?;
        return Ok(None);
    };
    let mut c = Contexts {
        export: name,
        ..Default::default()
    };
    let all_bitmaps = |c: &mut Contexts| c.bitmaps = (0..export.bitmaps.len()).collect();
    if list && queries.is_empty() {
        c.base = true;
        c.depth = export.allocation_depth;
        all_bitmaps(&mut c);
    }
    for q in &queries {
        if let Some(rest) = q.strip_prefix("base:") {
            if rest == "allocation" || (list && rest.is_empty()) {
                c.base = true;
            }
        } else if let Some(rest) = q.strip_prefix("qemu:") {
            if list && rest.is_empty() {
                c.depth = export.allocation_depth;
                all_bitmaps(&mut c);
            } else if rest == "allocation-depth" {
                c.depth |= export.allocation_depth;
            } else if let Some(bm) = rest.strip_prefix("dirty-bitmap:") {
                if list && bm.is_empty() {
                    all_bitmaps(&mut c);
                } else if let Some(i) = export.bitmaps.iter().position(|b| b.name == bm)
                    && !c.bitmaps.contains(&i)
                {
                    c.bitmaps.push(i);
                }
            }
        }
    }
    c.bitmaps.sort_unstable();
    let send = |w: &mut dyn Write, id: u32, name: &str| -> io::Result<()> {
        let mut b = Buf::default();
        b.u32(id).bytes(name.as_bytes());
        proto::write_option_reply(w, option, rep::META_CONTEXT, &b.0)
    };
    if c.base {
        send(w, ID_BASE_ALLOCATION, CONTEXT_BASE_ALLOCATION)?;
    }
    if c.depth {
        send(w, ID_ALLOCATION_DEPTH, CONTEXT_ALLOCATION_DEPTH)?;
    }
    for &i in &c.bitmaps {
        send(
            w,
            ID_DIRTY_BITMAP + i as u32,
            &format!("{CONTEXT_DIRTY_BITMAP_PREFIX}{}", export.bitmaps[i].name),
        )?;
    }
    proto::write_option_reply(w, option, rep::ACK, &[])?;
    Ok((!list).then_some(c))
}

// ---- transmission ----------------------------------------------------------

/// One request handed to a worker.
pub(super) struct Job {
    req: Request,
    payload: Vec<u8>,
    /// An error decided while reading it (QEMU's checks), with its text.
    refused: Option<(u32, String)>,
}

impl Job {
    /// A request (with a write's payload) for a worker to serve.
    pub(super) fn new(req: Request, payload: Vec<u8>) -> Job {
        Job {
            req,
            payload,
            refused: None,
        }
    }
}

/// Bounds what is in flight: count and payload bytes.
struct Flight {
    state: Mutex<FlightState>,
    cv: Condvar,
}

#[derive(Default)]
struct FlightState {
    count: usize,
    bytes: u64,
    /// Threads waiting for room: a request that leaves wakes them only
    /// when there are any (a wake-up is a system call, once per request
    /// otherwise).
    waiting: usize,
}

impl FlightState {
    fn full(&self, bytes: u64) -> bool {
        self.count >= MAX_REQUESTS || (self.count > 0 && self.bytes + bytes > MAX_INFLIGHT_BYTES)
    }
}

impl Flight {
    /// Waits for room, then counts one more request: how many are in
    /// flight now.
    fn enter(&self, bytes: u64) -> usize {
        let mut g = self.state.lock();
        while g.full(bytes) {
            g.waiting += 1;
            g = self.cv.wait(g);
            g.waiting -= 1;
        }
        g.count += 1;
        g.bytes += bytes;
        g.count
    }
    /// [`Self::enter`] if there is room now.
    fn try_enter(&self, bytes: u64) -> Option<usize> {
        let mut g = self.state.lock();
        if g.full(bytes) {
            return None;
        }
        g.count += 1;
        g.bytes += bytes;
        Some(g.count)
    }
    fn leave(&self, bytes: u64) {
        let mut g = self.state.lock();
        g.count -= 1;
        g.bytes -= bytes;
        if g.waiting > 0 {
            self.cv.notify_all();
        }
    }
}

/// What the workers share.
pub(super) struct Conn {
    export: Arc<Export>,
    mode: Mode,
    contexts: Contexts,
    writer: Mutex<Box<dyn Write + Send>>,
    closer: crate::nbd::transport::Closer,
    flight: Flight,
}

fn transmit(t: Transport, n: Negotiated) {
    let Transport {
        mut reader,
        writer,
        closer,
        plain,
    } = t;
    // Waiting for the socket on the ring needs the socket's readiness to
    // mean "more to read" (not so under TLS).
    let n_plain = plain.then(|| closer.raw_fd());
    let conn = Arc::new(Conn {
        export: n.export,
        mode: n.mode,
        contexts: n.contexts,
        writer: Mutex::new(writer),
        closer,
        flight: Flight {
            state: Mutex::new(FlightState::default()),
            cv: Condvar::new(),
        },
    });
    let (tx, rx) = crossbeam_channel::unbounded::<Job>();
    let mut workers = Vec::new();
    let mut grow = |in_flight: usize| {
        while workers.len() < in_flight.clamp(WORKERS, MAX_REQUESTS) {
            match spawn_worker(&conn, &rx) {
                Ok(h) => workers.push(h),
                // Fewer workers only serve more slowly.
                Err(_) => break,
            }
        }
        !workers.is_empty()
    };
    let mut aio = None;
    if grow(0) {
        read_requests(&conn, &mut *reader, &tx, &mut grow, &mut aio, n_plain);
    }
    if let Some(Some(a)) = &mut aio {
        a.finish(&conn, &tx);
    }
    drop(tx);
    for h in workers {
        let _ = h.join();
    }
    conn.closer.close();
}

fn spawn_worker(
    conn: &Arc<Conn>,
    rx: &crossbeam_channel::Receiver<Job>,
) -> io::Result<thread::JoinHandle<()>> {
    let (c, rx) = (conn.clone(), rx.clone());
    thread::Builder::new()
        .name("bj-nbd-worker".into())
        .spawn(move || {
            crate::nbd::transport::block_sigpipe();
            while let Ok(job) = rx.recv() {
                let bytes = job.payload.len() as u64;
                if !c.handle(job) {
                    c.closer.close();
                }
                c.flight.leave(bytes);
            }
        })
}

/// Reads requests until the client disconnects, sends `NBD_CMD_DISC`, or
/// sends something that ends the connection.
/// `grow` is told how many requests are in flight once each is counted,
/// so that there are workers for them.
///
/// Plain reads and writes that resolve to a file go on the connection's
/// ring (`aio`, made on the first of them; `Some(None)` once that failed,
/// or under TLS, where `socket` is `None`): submitted as soon as each is
/// read, and answered by this thread while it waits for the socket
/// (`nbd_aio`).
fn read_requests(
    conn: &Arc<Conn>,
    r: &mut dyn BufferedRead,
    tx: &crossbeam_channel::Sender<Job>,
    grow: &mut dyn FnMut(usize) -> bool,
    aio: &mut Option<Option<Aio>>,
    socket: Option<std::os::fd::RawFd>,
) {
    let extended = conn.mode == Mode::Extended;
    loop {
        if let (Some(Some(a)), Some(fd)) = (aio.as_mut(), socket)
            && !nbd_aio::holds_header(r.buffered(), extended)
            && !a.wait_readable(conn, tx, fd)
        {
            return;
        }
        let Ok(req) = Request::read(&mut *r, extended) else {
            return;
        };
        if req.kind == cmd::DISC {
            return;
        }
        if socket.is_some()
            && Aio::candidate(&req)
            && conn.check(&req).is_ok()
            && let Some(a) = aio.get_or_insert_with(Aio::new)
        {
            let bytes = if req.kind == cmd::WRITE {
                req.length
            } else {
                0
            };
            if enter_flight(conn, Some(a), tx, bytes).is_none() {
                return;
            }
            match a.start(conn, &req, &mut *r) {
                // Into the kernel at once rather than with the requests
                // read after it (see `nbd_aio`).
                Started::Queued => {
                    if a.submit().is_err() {
                        return;
                    }
                    continue;
                }
                Started::Broken => {
                    conn.flight.leave(bytes);
                    return;
                }
                // Counted again below, with the worker's payload.
                Started::Declined => conn.flight.leave(bytes),
            }
        }
        let mut payload = Vec::new();
        let mut refused = None;
        let mut fatal = false;
        if req.kind == cmd::WRITE {
            if req.length > u64::from(proto::MAX_BUFFER) {
                // The payload cannot be skipped safely: answer, then close.
                refused = Some((
                    err::EINVAL,
                    format!(
                        "len ({}) is larger than max len ({})",
                        req.length,
                        proto::MAX_BUFFER
                    ),
                ));
                fatal = true;
            } else {
                match (*r).read_vec(req.length, proto::MAX_BUFFER.into()) {
                    Ok(v) => payload = v,
                    Err(_) => return,
                }
            }
        } else if req.flags & cflag::PAYLOAD_LEN != 0 {
            // Only extended block status may carry a payload, and we do not
            // advertise NBD_FLAG_BLOCK_STAT_PAYLOAD: a client sending one
            // anyway is refused; its payload is skipped when it is small.
            refused = Some((err::EINVAL, "unexpected payload".into()));
            if req.length > u64::from(proto::MAX_OPTION_LEN) || (*r).skip(req.length).is_err() {
                fatal = true;
            }
        }
        let Some(n) = enter_flight(
            conn,
            aio.as_mut().and_then(Option::as_mut),
            tx,
            payload.len() as u64,
        ) else {
            return;
        };
        grow(n);
        if tx
            .send(Job {
                req,
                payload,
                refused,
            })
            .is_err()
            || fatal
        {
            return;
        }
    }
}

/// Count a request in flight, waiting for room: requests on the ring make
/// room only when this thread answers them, so it does while it waits.
/// `None`: the ring failed (the connection ends).
fn enter_flight(
    conn: &Conn,
    mut aio: Option<&mut Aio>,
    tx: &crossbeam_channel::Sender<Job>,
    bytes: u64,
) -> Option<usize> {
    loop {
        if let Some(n) = conn.flight.try_enter(bytes) {
            return Some(n);
        }
        match aio.as_deref_mut() {
            Some(a) if a.in_flight() > 0 => {
                if !a.pump(conn, tx) {
                    return None;
                }
            }
            // Only workers' requests: they leave on their own.
            _ => return Some(conn.flight.enter(bytes)),
        }
    }
}

fn io_err(e: GuestIoError) -> (u32, String) {
    (
        proto::errno_to_nbd(e.error.errno().unwrap_or(libc::EIO)),
        e.error.message().to_string(),
    )
}

impl Conn {
    /// The device the export's requests go through.
    pub(super) fn blk(&self) -> &crate::block::backend::BlockBackend {
        &self.export.blk
    }

    /// Whether a write carries FUA down (see [`Self::write_flags`]).
    pub(super) fn write_flags_fua(&self, req: &Request) -> bool {
        self.write_flags(req).fua
    }

    /// Whether a read is answered with one data chunk: always in simple
    /// mode or with `DF`; otherwise when the whole range holds data (a
    /// hole gets a hole chunk, see [`Self::read`]).
    pub(super) fn reads_as_data(&self, req: &Request) -> bool {
        if self.mode < Mode::Structured || req.flags & cflag::DF != 0 {
            return true;
        }
        // Never waiting at a drained gate: this thread answers the ring's
        // requests, which the drain waits for.
        self.export
            .blk
            .try_block_status(req.offset, req.length)
            .is_some_and(|r| r.is_ok_and(|st| !st.zero && st.len >= req.length))
    }

    /// Ends the connection (the reader sees it closed).
    pub(super) fn close(&self) {
        self.closer.close();
    }

    /// A request answered outside the workers leaves the in-flight count.
    pub(super) fn leave(&self, bytes: u64) {
        self.flight.leave(bytes);
    }

    /// Serves one request; false when the connection must end (a write
    /// failed).
    fn handle(&self, job: Job) -> bool {
        let req = job.req;
        let res = match job.refused {
            Some(e) => Err(e),
            None => self.check(&req).and_then(|()| self.run(&req, &job.payload)),
        };
        match res {
            Ok(Reply::Done) => self.send_done(&req),
            Ok(Reply::Read(chunks, data)) => self.send_read(&req, &chunks, &data),
            Ok(Reply::Status(list)) => self.send_status(&req, list),
            Err((e, msg)) => self.send_error(&req, e, &msg),
        }
        .is_ok()
    }

    /// QEMU's request checks (`nbd_co_receive_request`), in its order.
    fn check(&self, req: &Request) -> Result<(), (u32, String)> {
        let e = &self.export;
        let writes = matches!(req.kind, cmd::WRITE | cmd::WRITE_ZEROES | cmd::TRIM);
        let known = matches!(
            req.kind,
            cmd::READ
                | cmd::WRITE
                | cmd::FLUSH
                | cmd::TRIM
                | cmd::CACHE
                | cmd::WRITE_ZEROES
                | cmd::BLOCK_STATUS
        );
        if !known {
            return Err((
                err::EINVAL,
                format!("invalid request type ({}) received", req.kind),
            ));
        }
        if writes && !e.writable {
            // QEMU 10 answers EINVAL here (recorded), not EPERM.
            return Err((err::EINVAL, "Export is read-only".into()));
        }
        if req.offset > e.size || req.length > e.size - req.offset {
            let errno = if matches!(req.kind, cmd::WRITE | cmd::WRITE_ZEROES) {
                err::ENOSPC
            } else {
                err::EINVAL
            };
            return Err((
                errno,
                format!(
                    "operation past EOF; From: {}, Len: {}, Size: {}",
                    req.offset, req.length, e.size
                ),
            ));
        }
        if req.kind == cmd::READ && req.length > u64::from(proto::MAX_BUFFER) {
            return Err((
                err::EINVAL,
                format!(
                    "len ({}) is larger than max len ({})",
                    req.length,
                    proto::MAX_BUFFER
                ),
            ));
        }
        let mut valid = cflag::FUA;
        match req.kind {
            cmd::READ if self.mode >= Mode::Structured => valid |= cflag::DF,
            cmd::WRITE_ZEROES => valid |= cflag::NO_HOLE | cflag::FAST_ZERO,
            cmd::BLOCK_STATUS => valid |= cflag::REQ_ONE,
            _ => {}
        }
        if req.flags & !valid != 0 {
            return Err((
                err::EINVAL,
                format!(
                    "unsupported flags for command {} (got 0x{:x})",
                    req.kind, req.flags
                ),
            ));
        }
        Ok(())
    }

    /// The flags a request carries down: FUA from the client, or on every
    /// write of a `writethrough` export (QEMU disables the export's write
    /// cache, so its block layer adds FUA); FAST_ZERO as `no_fallback`.
    fn write_flags(&self, req: &Request) -> WriteFlags {
        WriteFlags {
            fua: req.flags & cflag::FUA != 0 || self.export.writethrough,
            no_fallback: req.flags & cflag::FAST_ZERO != 0,
        }
    }

    fn run(&self, req: &Request, payload: &[u8]) -> Result<Reply, (u32, String)> {
        let blk = &self.export.blk;
        match req.kind {
            cmd::READ => self.read(req),
            cmd::WRITE => {
                blk.pwrite_with(req.offset, payload, self.write_flags(req))
                    .map_err(io_err)?;
                Ok(Reply::Done)
            }
            cmd::WRITE_ZEROES => {
                let may_unmap = req.flags & cflag::NO_HOLE == 0;
                // A fast zero the node cannot do cheaply comes back as
                // ENOTSUP, which the client takes as "write it yourself".
                blk.pwrite_zeroes_with(req.offset, req.length, may_unmap, self.write_flags(req))
                    .map_err(io_err)?;
                Ok(Reply::Done)
            }
            cmd::TRIM => {
                blk.pdiscard(req.offset, req.length).map_err(io_err)?;
                // A discard carries no FUA in the block layer: QEMU's
                // server flushes after it.
                if self.write_flags(req).fua {
                    blk.flush().map_err(io_err)?;
                }
                Ok(Reply::Done)
            }
            cmd::FLUSH => {
                blk.flush().map_err(io_err)?;
                Ok(Reply::Done)
            }
            // A prefetch hint: nothing to warm up in our layers (no cache
            // of our own between the client and the drivers).
            cmd::CACHE => Ok(Reply::Done),
            cmd::BLOCK_STATUS => self.block_status(req),
            _ => Err((err::EINVAL, "invalid request".into())),
        }
    }

    /// A read: one data chunk, or (structured, no `DF`) data and hole
    /// chunks along the block status, as QEMU's sparse read.
    fn read(&self, req: &Request) -> Result<Reply, (u32, String)> {
        let blk = &self.export.blk;
        let len = req.length as usize;
        let mut data = vec![0u8; len];
        let mut chunks = Vec::new();
        if self.mode >= Mode::Structured && req.flags & cflag::DF == 0 && len > 0 {
            let mut done = 0u64;
            while done < req.length {
                let st = blk
                    .block_status(req.offset + done, req.length - done)
                    .map_err(io_err)?;
                let n = st.len.min(req.length - done);
                let (a, b) = (done as usize, (done + n) as usize);
                if st.zero {
                    chunks.push((chunk::OFFSET_HOLE, a, b));
                } else {
                    blk.pread(req.offset + done, &mut data[a..b])
                        .map_err(io_err)?;
                    match chunks.last_mut() {
                        Some((chunk::OFFSET_DATA, _, end)) if *end == a => *end = b,
                        _ => chunks.push((chunk::OFFSET_DATA, a, b)),
                    }
                }
                done += n;
            }
        } else {
            blk.pread(req.offset, &mut data).map_err(io_err)?;
            chunks.push((chunk::OFFSET_DATA, 0, len));
        }
        Ok(Reply::Read(chunks, data))
    }

    fn block_status(&self, req: &Request) -> Result<Reply, (u32, String)> {
        if self.mode < Mode::Structured || !self.contexts.any() {
            return Err((err::EINVAL, "CMD_BLOCK_STATUS not negotiated".into()));
        }
        if req.length == 0 {
            return Err((err::EINVAL, "need non-zero length".into()));
        }
        let one = req.flags & cflag::REQ_ONE != 0;
        let max = if one { 1 } else { MAX_EXTENTS };
        let (off, len) = (req.offset, req.length);
        let mut out = Vec::new();
        let blk = &self.export.blk;
        if self.contexts.base {
            let ext = extents(off, len, max, |o, l| {
                let st = blk.block_status(o, l).map_err(io_err)?;
                let flags = if st.data { 0 } else { proto::STATE_HOLE }
                    | if st.zero { proto::STATE_ZERO } else { 0 };
                Ok((st.len, u64::from(flags)))
            })?;
            out.push((ID_BASE_ALLOCATION, ext));
        }
        if self.contexts.depth {
            let ext = extents(off, len, max, |o, l| {
                let (d, n) = blk.allocation_depth(o, l).map_err(io_err)?;
                Ok((n, u64::from(d)))
            })?;
            out.push((ID_ALLOCATION_DEPTH, ext));
        }
        for &i in &self.contexts.bitmaps {
            let bits = self.export.bitmaps[i].bitmap.bits();
            let ext = extents(off, len, max, |o, l| {
                let end = o + l;
                let dirty = bits.test(o);
                let next = if dirty {
                    bits.next_clean(o)
                } else {
                    bits.next_dirty(o)
                };
                let stop = next.map_or(end, |n| n.clamp(o + 1, end));
                Ok((
                    stop - o,
                    if dirty {
                        u64::from(proto::STATE_DIRTY)
                    } else {
                        0
                    },
                ))
            })?;
            out.push((ID_DIRTY_BITMAP + i as u32, ext));
        }
        Ok(Reply::Status(out))
    }

    // ---- replies (each written whole under the writer's lock) -------------

    fn write(&self, parts: &[&[u8]]) -> io::Result<()> {
        let mut w = self.writer.lock();
        write_parts(&mut *w, parts)?;
        w.flush()
    }

    /// Several whole replies in one write.
    pub(super) fn write_batch(&self, parts: &[&[u8]]) -> io::Result<()> {
        self.write(parts)
    }

    /// The reply to a request that succeeded without data.
    pub(super) fn done_reply(&self, req: &Request) -> Vec<u8> {
        if self.mode == Mode::Extended {
            proto::chunk_header(
                true,
                proto::REPLY_FLAG_DONE,
                chunk::NONE,
                req.cookie,
                req.offset,
                0,
            )
        } else {
            proto::simple_reply(0, req.cookie)
        }
    }

    /// What goes before a read's data when it is answered with one data
    /// chunk (in simple mode: the simple reply).
    pub(super) fn data_reply_header(&self, req: &Request) -> Vec<u8> {
        if self.mode == Mode::Simple {
            return proto::simple_reply(0, req.cookie);
        }
        self.data_chunk_header(req, proto::REPLY_FLAG_DONE, 0, req.length)
    }

    /// A data chunk's header for `len` bytes at `at` within the request.
    fn data_chunk_header(&self, req: &Request, flags: u16, at: u64, len: u64) -> Vec<u8> {
        let mut h = Buf(proto::chunk_header(
            self.mode == Mode::Extended,
            flags,
            chunk::OFFSET_DATA,
            req.cookie,
            req.offset,
            8 + len,
        ));
        h.u64(req.offset + at);
        h.0
    }

    fn send_done(&self, req: &Request) -> io::Result<()> {
        self.write(&[&self.done_reply(req)])
    }

    fn send_error(&self, req: &Request, e: u32, msg: &str) -> io::Result<()> {
        if self.mode >= Mode::Structured {
            let p = proto::error_chunk_payload(e, msg);
            let h = proto::chunk_header(
                self.mode == Mode::Extended,
                proto::REPLY_FLAG_DONE,
                chunk::ERROR,
                req.cookie,
                req.offset,
                p.len() as u64,
            );
            self.write(&[&h, &p])
        } else {
            self.write(&[&proto::simple_reply(e, req.cookie)])
        }
    }

    fn send_read(
        &self,
        req: &Request,
        chunks: &[(u16, usize, usize)],
        data: &[u8],
    ) -> io::Result<()> {
        if self.mode == Mode::Simple {
            return self.write(&[&self.data_reply_header(req), data]);
        }
        let ext = self.mode == Mode::Extended;
        let mut w = self.writer.lock();
        for (i, &(kind, a, b)) in chunks.iter().enumerate() {
            let flags = if i + 1 == chunks.len() {
                proto::REPLY_FLAG_DONE
            } else {
                0
            };
            let at = req.offset + a as u64;
            // Header and payload in one writev: no small packet ahead of
            // the data.
            if kind == chunk::OFFSET_HOLE {
                let mut h = Buf(proto::chunk_header(
                    ext, flags, kind, req.cookie, req.offset, 12,
                ));
                h.u64(at).u32((b - a) as u32);
                write_parts(&mut *w, &[&h.0])?;
            } else {
                let h = self.data_chunk_header(req, flags, a as u64, (b - a) as u64);
                write_parts(&mut *w, &[&h, &data[a..b]])?;
            }
        }
        w.flush()
    }

    fn send_status(&self, req: &Request, list: Vec<(u32, Vec<Extent>)>) -> io::Result<()> {
        let ext = self.mode == Mode::Extended;
        let kind = if ext {
            chunk::BLOCK_STATUS_EXT
        } else {
            chunk::BLOCK_STATUS
        };
        let mut w = self.writer.lock();
        let n = list.len();
        for (i, (id, extents)) in list.into_iter().enumerate() {
            let p = proto::block_status_payload(ext, id, &extents);
            let flags = if i + 1 == n {
                proto::REPLY_FLAG_DONE
            } else {
                0
            };
            let h = proto::chunk_header(ext, flags, kind, req.cookie, req.offset, p.len() as u64);
            write_parts(&mut *w, &[&h, &p])?;
        }
        w.flush()
    }
}

enum Reply {
    Done,
    /// Chunks (type, start, end within the data) and the data.
    Read(Vec<(u16, usize, usize)>, Vec<u8>),
    /// Per context: its id and extents.
    Status(Vec<(u32, Vec<Extent>)>),
}

/// Extents from `off` for at most `len` bytes: `next(offset, len)` gives
/// one run (length ≥ 1, flags); runs with equal flags merge, at most `max`
/// extents. (A compact request's length is 32 bits, so its extents fit
/// the compact reply's 32-bit lengths.)
fn extents(
    off: u64,
    len: u64,
    max: usize,
    mut next: impl FnMut(u64, u64) -> Result<(u64, u64), (u32, String)>,
) -> Result<Vec<Extent>, (u32, String)> {
    let mut out: Vec<Extent> = Vec::new();
    let mut done = 0;
    while done < len {
        let (n, flags) = next(off + done, len - done)?;
        let n = n.clamp(1, len - done);
        match out.last_mut() {
            Some(e) if e.flags == flags => e.length += n,
            _ => {
                if out.len() == max {
                    break;
                }
                out.push(Extent { length: n, flags });
            }
        }
        done += n;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extents_merge_and_stop_at_the_limit() {
        // Runs of 10 bytes alternating flags 0/1, then all 1s.
        let runs = |o: u64, _l: u64| Ok((10, if o < 40 { (o / 10) % 2 } else { 1 }));
        let e = extents(0, 100, 10, runs).unwrap();
        assert_eq!(
            e.iter().map(|e| (e.length, e.flags)).collect::<Vec<_>>(),
            vec![(10, 0), (10, 1), (10, 0), (70, 1)]
        );
        let e = extents(0, 100, 1, runs).unwrap();
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].length, 10);
    }
}
