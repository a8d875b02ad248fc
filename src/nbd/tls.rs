//! TLS sessions as [`Stream`]s, and `NBD_OPT_STARTTLS` on both sides.
//!
//! During negotiation a [`TlsStream`] is driven by one thread over the
//! blocking socket (its read/write timeouts apply as on a plain socket).
//! For transmission, [`Stream::into_transport`] must yield a reader and a
//! writer that two threads use at once, but a rustls connection is one
//! state machine that both directions mutate. So the halves share it:
//!
//! - the connection and the socket sit under one mutex, the socket is
//!   switched to non-blocking, and every rustls call and socket read or
//!   write happens with the lock held but never blocks;
//! - a half that cannot progress (no plaintext and no bytes on the socket;
//!   or the socket's send buffer full) drops the lock and waits in
//!   poll(2), so the other half is never held up by a sleeping one;
//! - only the reader takes bytes off the socket, so the reader's poll for
//!   `POLLIN` cannot miss data (level-triggered readiness on a socket
//!   nobody else drains); the writer only needs `POLLOUT`. TLS output the
//!   reader produces (a TLS 1.3 key-update answer, an alert) is flushed by
//!   whichever half holds the lock next, and the reader also waits for
//!   `POLLOUT` while such output is pending, so it never stalls.
//! - a writer's `write` returns only once its bytes were handed to the
//!   kernel, like a plain socket's `write_all` (callers do not `flush`).
//!
//! The poll timeout is the socket's read (or write) timeout, so a
//! deadline set on the socket before the split still bounds each call,
//! as it does for the plain transport.

use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::Arc;
use std::time::Duration;

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use rustls::pki_types::ServerName;
use rustls::{ClientConnection, Connection, ServerConnection};

use super::proto::{self, opt, rep};
use super::tls_creds::{Config, Endpoint, TlsCreds, cert_error_text};
use super::transport::{Closer, Socket, Stream, Transport};
use crate::error::{Error, Result};
use crate::locks::Mutex;

/// rustls's limit on TLS bytes queued before `write_tls`; a writer that
/// fills it flushes and goes on. 1 MiB keeps big NBD payloads to a few
/// lock round trips without unbounded memory.
const BUFFER_LIMIT: usize = 1 << 20;

/// A TLS session over a socket, in the negotiation phase.
pub struct TlsStream {
    conn: Connection,
    sock: Socket,
}

impl std::fmt::Debug for TlsStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsStream")
            .field("sock", &self.sock)
            .finish()
    }
}

/// Turns a rustls failure (inside an `io::Error` or bare) into the text
/// QEMU's GnuTLS reports for the same problem.
fn tls_error(e: io::Error) -> io::Error {
    let text = match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
        Some(rustls::Error::NoCertificatesPresented) => {
            // QEMU's server says this when a client brings no certificate.
            "Verify failed: No certificate was found.".to_string()
        }
        Some(r) => cert_error_text(r),
        None => return e,
    };
    io::Error::new(e.kind(), text)
}

fn rustls_io(e: rustls::Error) -> io::Error {
    tls_error(io::Error::new(io::ErrorKind::InvalidData, e))
}

impl TlsStream {
    /// Runs the handshake to completion on the blocking socket.
    fn handshake(conn: Connection, sock: Socket) -> io::Result<TlsStream> {
        let mut s = TlsStream { conn, sock };
        while s.conn.is_handshaking() {
            s.conn.complete_io(&mut s.sock).map_err(tls_error)?;
        }
        s.flush_tls()?;
        Ok(s)
    }

    fn flush_tls(&mut self) -> io::Result<()> {
        while self.conn.wants_write() {
            self.conn.write_tls(&mut self.sock)?;
        }
        Ok(())
    }
}

impl Read for TlsStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            match self.conn.reader().read(buf) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                // As in the transport below: the end of the stream.
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(0),
                Err(e) => return Err(e),
            }
            // Blocking read (the socket's timeout applies); 0 at the end
            // of the stream is recorded by rustls and reported above.
            self.conn.read_tls(&mut self.sock)?;
            if let Err(e) = self.conn.process_new_packets() {
                let _ = self.flush_tls();
                return Err(rustls_io(e));
            }
            // Answers to what arrived (alerts, key updates) go out now.
            self.flush_tls()?;
        }
    }
}

impl Write for TlsStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.conn.writer().write(buf)?;
        self.flush_tls()?;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.flush_tls()
    }
}

impl Stream for TlsStream {
    fn socket(&self) -> &Socket {
        &self.sock
    }

    fn into_transport(self: Box<Self>) -> io::Result<Transport> {
        let TlsStream { mut conn, sock } = *self;
        let (read_timeout, write_timeout) = timeouts(&sock)?;
        conn.set_buffer_limit(Some(BUFFER_LIMIT));
        set_nonblocking(&sock, true)?;
        let poll_sock = sock.try_clone()?;
        let closer = Closer::new(sock.try_clone()?);
        let shared = Arc::new(Shared {
            inner: Mutex::new(Inner { conn, sock }),
            poll_sock,
        });
        Ok(Transport {
            reader: Box::new(io::BufReader::with_capacity(
                256 << 10,
                TlsReader {
                    shared: shared.clone(),
                    timeout: read_timeout,
                },
            )),
            writer: Box::new(TlsWriter {
                shared,
                timeout: write_timeout,
            }),
            closer,
            // rustls may hold decrypted bytes the socket no longer shows.
            plain: false,
        })
    }
}

fn timeouts(sock: &Socket) -> io::Result<(Option<Duration>, Option<Duration>)> {
    Ok(match sock {
        Socket::Unix(s) => (s.read_timeout()?, s.write_timeout()?),
        Socket::Tcp(s) => (s.read_timeout()?, s.write_timeout()?),
    })
}

fn set_nonblocking(sock: &Socket, on: bool) -> io::Result<()> {
    match sock {
        Socket::Unix(s) => s.set_nonblocking(on),
        Socket::Tcp(s) => s.set_nonblocking(on),
    }
}

fn fd(sock: &Socket) -> BorrowedFd<'_> {
    match sock {
        Socket::Unix(s) => s.as_fd(),
        Socket::Tcp(s) => s.as_fd(),
    }
}

/// The session both halves share during transmission.
struct Shared {
    inner: Mutex<Inner>,
    /// A second handle on the socket to poll without the lock.
    poll_sock: Socket,
}

struct Inner {
    conn: Connection,
    sock: Socket,
}

impl Inner {
    /// Hands queued TLS bytes to the kernel until done or it would block.
    /// `Ok(true)`: everything went out.
    fn flush_nonblocking(&mut self) -> io::Result<bool> {
        while self.conn.wants_write() {
            match self.conn.write_tls(&mut self.sock) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    }
}

impl Shared {
    /// Waits outside the lock until the socket is ready for `events`.
    fn wait(&self, events: PollFlags, timeout: Option<Duration>) -> io::Result<()> {
        let t = match timeout {
            None => PollTimeout::NONE,
            Some(d) => PollTimeout::try_from(d).unwrap_or(PollTimeout::MAX),
        };
        let mut fds = [PollFd::new(fd(&self.poll_sock), events)];
        match poll(&mut fds, t) {
            Ok(0) => Err(io::Error::new(
                io::ErrorKind::WouldBlock,
                "Resource temporarily unavailable",
            )),
            Ok(_) => Ok(()),
            Err(nix::errno::Errno::EINTR) => Ok(()),
            Err(e) => Err(io::Error::from(e)),
        }
    }
}

/// The reading half.
struct TlsReader {
    shared: Arc<Shared>,
    timeout: Option<Duration>,
}

impl Read for TlsReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            let mut events = PollFlags::POLLIN;
            {
                let mut g = self.shared.inner.lock();
                let inner = &mut *g;
                // Pending output of ours (answers to what we read) first;
                // a failure to send is the writer's to report, not a
                // reason to lose plaintext already received.
                if let Ok(false) = inner.flush_nonblocking() {
                    events |= PollFlags::POLLOUT;
                }
                match inner.conn.reader().read(buf) {
                    Ok(n) => return Ok(n),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                        // The socket ended without close_notify: what a
                        // shut-down socket (our closer) or a peer that
                        // just closed looks like; NBD frames its messages,
                        // so report it as the end of the stream, as a
                        // plain socket does.
                        return Ok(0);
                    }
                    Err(e) => return Err(e),
                }
                match inner.conn.read_tls(&mut inner.sock) {
                    Ok(_) => {
                        // 0 (end of stream) too: rustls records it and the
                        // reader above reports it on the next turn.
                        if let Err(e) = inner.conn.process_new_packets() {
                            // Best effort: tell the peer why (the alert).
                            let _ = inner.flush_nonblocking();
                            return Err(rustls_io(e));
                        }
                        continue;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(e),
                }
            }
            self.shared.wait(events, self.timeout)?;
        }
    }
}

/// The writing half.
struct TlsWriter {
    shared: Arc<Shared>,
    timeout: Option<Duration>,
}

impl TlsWriter {
    /// Flushes everything queued, waiting for the socket outside the lock.
    fn flush_all(&self) -> io::Result<()> {
        loop {
            if self.shared.inner.lock().flush_nonblocking()? {
                return Ok(());
            }
            self.shared.wait(PollFlags::POLLOUT, self.timeout)?;
        }
    }
}

impl Write for TlsWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            let n = {
                let mut g = self.shared.inner.lock();
                let inner = &mut *g;
                let n = inner.conn.writer().write(buf)?;
                let _ = inner.flush_nonblocking()?;
                n
            };
            if n > 0 {
                self.flush_all()?;
                return Ok(n);
            }
            // rustls's queue is at its limit: drain it, then retry.
            self.flush_all()?;
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        self.flush_all()
    }
}

// ---- upgrades --------------------------------------------------------------

/// The plain socket under a negotiation stream. STARTTLS comes before
/// anything else wraps the socket, so the stream is the plain socket and
/// holds no buffered bytes.
fn into_socket(stream: Box<dyn Stream>) -> io::Result<Socket> {
    let sock = stream.socket().try_clone()?;
    // The old handle goes; the clone is the same connection. Nothing is
    // buffered in a plain `Socket`, so no bytes are lost.
    drop(stream);
    Ok(sock)
}

/// Server side: runs the TLS handshake on `stream` (after NBD_REP_ACK to
/// STARTTLS was sent) and returns the session.
pub fn server_upgrade(stream: Box<dyn Stream>, creds: &TlsCreds) -> io::Result<Box<dyn Stream>> {
    let Config::Server(cfg) = &creds.config else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "Expected TLS credentials for a server endpoint",
        ));
    };
    let sock = into_socket(stream)?;
    let conn = ServerConnection::new(cfg.clone()).map_err(rustls_io)?;
    Ok(Box::new(TlsStream::handshake(conn.into(), sock)?))
}

/// Client side: runs the TLS handshake on `stream` (after the server's
/// NBD_REP_ACK to STARTTLS). `hostname` is what the server's certificate
/// must name (`tls-hostname`, else the TCP host; `None` for a UNIX socket
/// without `tls-hostname`, which QEMU refuses when `verify-peer` is on).
pub fn client_upgrade(
    stream: Box<dyn Stream>,
    creds: &TlsCreds,
    hostname: Option<&str>,
) -> io::Result<Box<dyn Stream>> {
    let Config::Client(cfg) = &creds.config else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "Expected TLS credentials for a client endpoint",
        ));
    };
    let name = match hostname {
        Some(h) => ServerName::try_from(h.to_string()).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("Certificate does not match the hostname {h}"),
            )
        })?,
        None if creds.verify_peer() => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "No hostname for certificate validation",
            ));
        }
        // Not verified: any name does; it only goes out as SNI.
        None => ServerName::try_from("localhost").expect("a valid DNS name"),
    };
    let sock = into_socket(stream)?;
    let conn = ClientConnection::new(cfg.clone(), name).map_err(rustls_io)?;
    TlsStream::handshake(conn.into(), sock)
        .map(|s| Box::new(s) as Box<dyn Stream>)
        .map_err(|e| match (hostname, e.get_ref().map(|i| i.to_string())) {
            // QEMU's text names the host the certificate did not match.
            (Some(h), Some(t)) if t.contains("NotValidForName") => io::Error::new(
                e.kind(),
                format!("Certificate does not match the hostname {h}"),
            ),
            _ => e,
        })
}

/// A client's `NBD_OPT_STARTTLS`: asks, expects `NBD_REP_ACK`, upgrades.
/// Refusals get QEMU's client texts (`Server don't support STARTTLS
/// option`, `Denied by server for option 5 (starttls)`, …; QEMU prints the
/// server's message as a hint, which is not part of the error).
pub fn client_starttls(
    mut stream: Box<dyn Stream>,
    creds: &TlsCreds,
    hostname: Option<&str>,
) -> Result<Box<dyn Stream>> {
    creds.check_endpoint(Endpoint::Client)?;
    proto::write_option(&mut stream, opt::STARTTLS, &[])?;
    let reply = proto::read_option_reply(&mut stream, opt::STARTTLS)
        .map_err(|e| Error::from(e).prepend("Failed to read option reply: "))?;
    let o = opt::STARTTLS;
    let name = proto::opt_name(o);
    let text = match reply.kind {
        rep::ACK if reply.data.is_empty() => {
            return client_upgrade(stream, creds, hostname)
                .map_err(|e| Error::generic(e.to_string()));
        }
        rep::ACK => format!("Start TLS response was not zero {}", reply.data.len()),
        rep::ERR_UNSUP => "Server don't support STARTTLS option".to_string(),
        rep::ERR_POLICY => format!("Denied by server for option {o} ({name})"),
        rep::ERR_INVALID => format!("Invalid parameters for option {o} ({name})"),
        rep::ERR_PLATFORM => format!("Server lacks the support for option {o} ({name})"),
        rep::ERR_TLS_REQD => format!("TLS negotiation required before option {o} ({name})"),
        rep::ERR_SHUTDOWN => format!("Server shutting down before option {o} ({name})"),
        k if reply.is_error() => {
            format!("Unknown error code when asking for option {o} ({name})") + &format!(": {k:#x}")
        }
        k => format!(
            "Server answered option {o} ({name}) with unexpected reply {k} ({})",
            rep_name(k)
        ),
    };
    // QEMU sends NBD_OPT_ABORT before giving up; best effort.
    let _ = proto::write_option(&mut stream, opt::ABORT, &[]);
    Err(Error::generic(text))
}

fn rep_name(kind: u32) -> &'static str {
    match kind {
        rep::ACK => "ack",
        rep::SERVER => "server",
        rep::INFO => "info",
        rep::META_CONTEXT => "meta context",
        _ => "<unknown>",
    }
}

/// A server's answer to `NBD_OPT_STARTTLS` (already read, with payload
/// `data`): `NBD_REP_ACK`, then the handshake. A payload is refused as
/// QEMU does (`NBD_REP_ERR_INVALID`, then the connection ends).
pub fn server_starttls(
    mut stream: Box<dyn Stream>,
    creds: &TlsCreds,
    data: &[u8],
) -> io::Result<Box<dyn Stream>> {
    if !data.is_empty() {
        let msg = "option 'starttls' has unexpected length";
        proto::write_option_reply(&mut stream, opt::STARTTLS, rep::ERR_INVALID, msg.as_bytes())?;
        return Err(io::Error::new(io::ErrorKind::InvalidData, msg));
    }
    proto::write_option_reply(&mut stream, opt::STARTTLS, rep::ACK, &[])?;
    server_upgrade(stream, creds)
}

/// What a server that requires TLS does with an option read before TLS.
pub enum PreTls {
    /// It was STARTTLS: go on negotiating on this TLS session.
    Tls(Box<dyn Stream>),
    /// Refused with `NBD_REP_ERR_TLS_REQD`: read the next option.
    Refused(Box<dyn Stream>),
    /// `NBD_OPT_ABORT` (answered) or `NBD_OPT_EXPORT_NAME` (which cannot
    /// be answered with an error): close the connection.
    Close,
}

/// QEMU's server before TLS: only STARTTLS goes on, every other option
/// gets `NBD_REP_ERR_TLS_REQD` "Option 0xN not permitted before TLS";
/// ABORT is answered so and ends the connection, EXPORT_NAME ends it.
pub fn server_pre_tls_option(
    mut stream: Box<dyn Stream>,
    creds: &TlsCreds,
    option: u32,
    data: &[u8],
) -> io::Result<PreTls> {
    match option {
        opt::STARTTLS => Ok(PreTls::Tls(server_starttls(stream, creds, data)?)),
        opt::EXPORT_NAME => Ok(PreTls::Close),
        _ => {
            let msg = format!("Option {option:#x} not permitted before TLS");
            let r =
                proto::write_option_reply(&mut stream, option, rep::ERR_TLS_REQD, msg.as_bytes());
            if option == opt::ABORT {
                // The client may hang up before reading the answer to its
                // ABORT (QEMU's does): EPIPE here is no error, as in QEMU.
                return Ok(PreTls::Close);
            }
            r?;
            Ok(PreTls::Refused(stream))
        }
    }
}

#[cfg(test)]
pub(crate) mod test_pki {
    //! Certificates for tests, made as QEMU's documentation makes them
    //! (GnuTLS's certtool; .ci/run installs gnutls-bin).
    use std::path::Path;
    use std::process::Command;

    fn certtool(dir: &Path, args: &[&str]) {
        let out = Command::new("certtool")
            .current_dir(dir)
            .args(args)
            .output()
            .expect("certtool is required (apt-get install -y gnutls-bin; .ci/run does it)");
        assert!(
            out.status.success(),
            "certtool {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// A CA and a server (CN and DNS name `localhost`, IP 127.0.0.1) and
    /// a client certificate signed by it, in QEMU's file names; `ca` is
    /// the CA's name (two CAs of one name would be told apart by their
    /// signatures only).
    pub(crate) fn make(dir: &Path, ca: &str) {
        std::fs::create_dir_all(dir).unwrap();
        let w = |f: &str, s: &str| std::fs::write(dir.join(f), s).unwrap();
        w(
            "ca.info",
            &format!("cn = {ca}\nca\ncert_signing_key\nexpiration_days = 3650\n"),
        );
        w(
            "server.info",
            "organization = test\ncn = localhost\ndns_name = localhost\nip_address = 127.0.0.1\n\
             tls_www_server\nencryption_key\nsigning_key\nexpiration_days = 3650\n",
        );
        w(
            "client.info",
            "organization = test\ncn = client\ntls_www_client\nencryption_key\nsigning_key\n\
             expiration_days = 3650\n",
        );
        for k in ["ca-key.pem", "server-key.pem", "client-key.pem"] {
            certtool(
                dir,
                &[
                    "--generate-privkey",
                    "--key-type=rsa",
                    "--bits=2048",
                    "--outfile",
                    k,
                ],
            );
        }
        certtool(
            dir,
            &[
                "--generate-self-signed",
                "--load-privkey=ca-key.pem",
                "--template=ca.info",
                "--outfile=ca-cert.pem",
            ],
        );
        for who in ["server", "client"] {
            certtool(
                dir,
                &[
                    "--generate-certificate",
                    "--load-ca-certificate=ca-cert.pem",
                    "--load-ca-privkey=ca-key.pem",
                    &format!("--load-privkey={who}-key.pem"),
                    &format!("--template={who}.info"),
                    &format!("--outfile={who}-cert.pem"),
                ],
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nbd::tls_creds::TlsCredsOptions;
    use std::os::unix::net::UnixStream;
    use std::path::Path;

    fn creds(dir: &Path, endpoint: Endpoint, verify_peer: bool) -> TlsCreds {
        let mut o = TlsCredsOptions::new("t");
        o.dir = Some(dir.to_path_buf());
        o.endpoint = endpoint;
        o.verify_peer = verify_peer;
        TlsCreds::load(o).unwrap()
    }

    type Outcome = io::Result<Box<dyn Stream>>;

    /// Handshakes a connected pair; the server's outcome and the client's.
    fn pair(
        server: TlsCreds,
        client: TlsCreds,
        hostname: Option<&'static str>,
    ) -> (Outcome, Outcome) {
        let (a, b) = UnixStream::pair().unwrap();
        let s = std::thread::spawn(move || server_upgrade(Box::new(Socket::Unix(a)), &server));
        let c = client_upgrade(Box::new(Socket::Unix(b)), &client, hostname);
        // A failed client drops its socket, so the server's handshake ends.
        let c = c.and_then(|mut c| {
            // TLS 1.3: the server judges the client's certificate after the
            // client finished; a round trip shows the verdict.
            c.write_all(b"?")?;
            Ok(c)
        });
        (s.join().unwrap(), c)
    }

    /// A deterministic byte stream (xorshift) to check data end to end.
    fn pattern(seed: u64, buf: &mut [u8], state: &mut u64) {
        if *state == 0 {
            *state = seed;
        }
        for b in buf {
            *state ^= *state << 13;
            *state ^= *state >> 7;
            *state ^= *state << 17;
            *b = *state as u8;
        }
    }

    #[test]
    fn halves_move_many_mib_both_ways_at_once_and_close_unblocks_the_reader() {
        let d = tempfile::tempdir().unwrap();
        test_pki::make(d.path(), "Test CA");
        let (s, c) = pair(
            creds(d.path(), Endpoint::Server, true),
            creds(d.path(), Endpoint::Client, true),
            Some("localhost"),
        );
        let (mut s, c) = (s.unwrap(), c.unwrap());
        let mut q = [0u8; 1];
        s.read_exact(&mut q).unwrap();
        assert_eq!(&q, b"?");
        let ts = s.into_transport().unwrap();
        let tc = c.into_transport().unwrap();
        // Far more than both socket buffers: each side's writer blocks on
        // a full socket while its reader must go on draining the other
        // direction; a design where a waiting half held the session would
        // deadlock here.
        const TOTAL: usize = 24 << 20;
        let send = |mut w: Box<dyn Write + Send>, seed: u64| {
            std::thread::spawn(move || {
                let mut st = 0;
                let mut sent = 0;
                let mut i = 0usize;
                while sent < TOTAL {
                    // Uneven sizes: small headers and big payloads.
                    let n = [28, 4096, 65536, 1 << 20, 7][i % 5].min(TOTAL - sent);
                    let mut buf = vec![0u8; n];
                    pattern(seed, &mut buf, &mut st);
                    w.write_all(&buf).unwrap();
                    sent += n;
                    i += 1;
                }
                w
            })
        };
        let recv = |mut r: Box<dyn Read + Send>, seed: u64| {
            std::thread::spawn(move || {
                let mut st = 0;
                let mut got = 0;
                let mut buf = vec![0u8; 100_000];
                let mut want = vec![0u8; 100_000];
                while got < TOTAL {
                    let n = r.read(&mut buf[..(TOTAL - got).min(100_000)]).unwrap();
                    assert!(n > 0, "stream ended after {got} bytes");
                    pattern(seed, &mut want[..n], &mut st);
                    assert!(buf[..n] == want[..n], "corrupt data at {got}");
                    got += n;
                }
                r
            })
        };
        let w1 = send(ts.writer, 1);
        let w2 = send(tc.writer, 2);
        let r1 = recv(tc.reader, 1);
        let r2 = recv(ts.reader, 2);
        let _w1 = w1.join().unwrap();
        let _w2 = w2.join().unwrap();
        let _r1 = r1.join().unwrap();
        let mut r2 = r2.join().unwrap();
        // The server's reader now waits for more; the closer ends it.
        let h = std::thread::spawn(move || r2.read(&mut [0u8; 1]));
        ts.closer.close();
        assert_eq!(h.join().unwrap().unwrap(), 0);
        tc.closer.close();
    }

    #[test]
    fn verification_failures_read_as_qemu_reports_them() {
        let d = tempfile::tempdir().unwrap();
        let other = tempfile::tempdir().unwrap();
        test_pki::make(d.path(), "Test CA");
        test_pki::make(other.path(), "Other CA");
        // A client trusting another CA.
        let (_, c) = pair(
            creds(d.path(), Endpoint::Server, false),
            creds(other.path(), Endpoint::Client, true),
            Some("localhost"),
        );
        assert_eq!(
            c.err().unwrap().to_string(),
            "The certificate hasn't got a known issuer"
        );
        // The server's certificate names localhost, not this.
        let (_, c) = pair(
            creds(d.path(), Endpoint::Server, false),
            creds(d.path(), Endpoint::Client, true),
            Some("wrong.example"),
        );
        assert_eq!(
            c.err().unwrap().to_string(),
            "Certificate does not match the hostname wrong.example"
        );
        // No hostname on a UNIX socket: QEMU refuses before trying.
        let (_, c) = pair(
            creds(d.path(), Endpoint::Server, false),
            creds(d.path(), Endpoint::Client, true),
            None,
        );
        assert_eq!(
            c.err().unwrap().to_string(),
            "No hostname for certificate validation"
        );
        // verify-peer=off on the client: any server certificate, any name.
        let (s, c) = pair(
            creds(d.path(), Endpoint::Server, false),
            creds(other.path(), Endpoint::Client, false),
            None,
        );
        assert!(s.is_ok() && c.is_ok());
        // A client without a certificate against verify-peer=on.
        let bare = tempfile::tempdir().unwrap();
        std::fs::copy(
            d.path().join("ca-cert.pem"),
            bare.path().join("ca-cert.pem"),
        )
        .unwrap();
        let (s, c) = pair(
            creds(d.path(), Endpoint::Server, true),
            creds(bare.path(), Endpoint::Client, true),
            Some("localhost"),
        );
        assert_eq!(
            s.err().unwrap().to_string(),
            "Verify failed: No certificate was found."
        );
        // The client learns it when it reads (TLS 1.3 ends its handshake
        // first), or already in its handshake when the server hung up
        // before the client finished (a loaded machine); no data either way.
        if let Ok(mut c) = c {
            assert!(c.read(&mut [0u8; 1]).is_err());
        }
        // A client certificate from another CA.
        let (s, _) = pair(
            creds(d.path(), Endpoint::Server, true),
            {
                let mut o = TlsCredsOptions::new("t");
                let mixed = tempfile::tempdir().unwrap().keep();
                for f in ["client-cert.pem", "client-key.pem"] {
                    std::fs::copy(other.path().join(f), mixed.join(f)).unwrap();
                }
                std::fs::copy(d.path().join("ca-cert.pem"), mixed.join("ca-cert.pem")).unwrap();
                o.dir = Some(mixed.clone());
                o.sanity_check = false;
                let c = TlsCreds::load(o).unwrap();
                std::fs::remove_dir_all(mixed).unwrap();
                c
            },
            Some("localhost"),
        );
        assert_eq!(
            s.err().unwrap().to_string(),
            "The certificate hasn't got a known issuer"
        );
    }

    #[test]
    fn starttls_both_sides_and_refusals_with_qemu_texts() {
        let d = tempfile::tempdir().unwrap();
        test_pki::make(d.path(), "Test CA");
        let sc = creds(d.path(), Endpoint::Server, true);
        let cc = creds(d.path(), Endpoint::Client, true);
        let (a, b) = UnixStream::pair().unwrap();
        let srv = std::thread::spawn(move || {
            let mut s: Box<dyn Stream> = Box::new(Socket::Unix(a));
            // GO before TLS is refused; then STARTTLS goes on.
            let (o, data) = proto::read_option(&mut s).unwrap();
            let PreTls::Refused(mut s) = server_pre_tls_option(s, &sc, o, &data).unwrap() else {
                panic!("GO before TLS was not refused")
            };
            let (o, data) = proto::read_option(&mut s).unwrap();
            let PreTls::Tls(mut s) = server_pre_tls_option(s, &sc, o, &data).unwrap() else {
                panic!("STARTTLS did not upgrade")
            };
            let (o, _) = proto::read_option(&mut s).unwrap();
            proto::write_option_reply(&mut s, o, rep::ACK, b"").unwrap();
        });
        let mut c: Box<dyn Stream> = Box::new(Socket::Unix(b));
        proto::write_option(&mut c, opt::GO, &proto::go_payload("", &[])).unwrap();
        let r = proto::read_option_reply(&mut c, opt::GO).unwrap();
        assert_eq!(r.kind, rep::ERR_TLS_REQD);
        assert_eq!(r.message(), "Option 0x7 not permitted before TLS");
        let mut c = client_starttls(c, &cc, Some("localhost")).unwrap();
        proto::write_option(&mut c, opt::ABORT, &[]).unwrap();
        assert_eq!(
            proto::read_option_reply(&mut c, opt::ABORT).unwrap().kind,
            rep::ACK
        );
        srv.join().unwrap();

        // Refusals as QEMU's client words them.
        for (kind, text) in [
            (rep::ERR_UNSUP, "Server don't support STARTTLS option"),
            (rep::ERR_POLICY, "Denied by server for option 5 (starttls)"),
            (
                rep::ERR_INVALID,
                "Invalid parameters for option 5 (starttls)",
            ),
            (
                rep::SERVER,
                "Server answered option 5 (starttls) with unexpected reply 2 (server)",
            ),
        ] {
            let (a, b) = UnixStream::pair().unwrap();
            let srv = std::thread::spawn(move || {
                let mut s = Socket::Unix(a);
                proto::read_option(&mut s).unwrap();
                proto::write_option_reply(&mut s, opt::STARTTLS, kind, b"TLS not configured")
                    .unwrap();
                // The client gives up with NBD_OPT_ABORT.
                proto::read_option(&mut s).unwrap().0
            });
            let e = client_starttls(Box::new(Socket::Unix(b)), &cc, Some("localhost"))
                .err()
                .unwrap();
            assert_eq!(e.to_string(), text);
            assert_eq!(srv.join().unwrap(), opt::ABORT);
        }
        // Credentials for the wrong side.
        let e = client_starttls(
            Box::new(Socket::Unix(UnixStream::pair().unwrap().0)),
            &creds(d.path(), Endpoint::Server, true),
            None,
        )
        .err()
        .unwrap();
        assert_eq!(
            e.to_string(),
            "Expected TLS credentials for a client endpoint"
        );
    }
}
