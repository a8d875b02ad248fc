//! The byte streams NBD runs over: UNIX and TCP sockets (QAPI's
//! `SocketAddress`), and, after `NBD_OPT_STARTTLS`, a TLS session over
//! one. Negotiation reads and writes one [`Stream`]; transmission splits
//! it into a [`Transport`] so one thread reads replies (or requests) while
//! others write, and a [`Closer`] that any thread may use to end the
//! connection (which unblocks both halves).

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream, ToSocketAddrs};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::Duration;

/// Where a server listens or a client connects (QAPI `SocketAddress`, the
/// `unix` and `inet` kinds).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SocketAddress {
    /// A UNIX socket path.
    Unix {
        /// The socket's path.
        path: PathBuf,
    },
    /// A TCP host and port (QAPI keeps the port a string: a number or a
    /// service name).
    Inet {
        /// Host name or address.
        host: String,
        /// Port number or service name.
        port: String,
    },
}

impl std::fmt::Display for SocketAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SocketAddress::Unix { path } => write!(f, "{}", path.display()),
            SocketAddress::Inet { host, port } if host.contains(':') => {
                write!(f, "[{host}]:{port}")
            }
            SocketAddress::Inet { host, port } => write!(f, "{host}:{port}"),
        }
    }
}

/// QAPI keeps an inet port a string; we take numbers only.
fn inet_port(port: &str) -> io::Result<u16> {
    port.parse().map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("Port '{port}' is not a number"),
        )
    })
}

/// What a host that resolves to no usable address gives.
fn unresolved(host: &str, port: u16) -> io::Error {
    io::Error::new(
        io::ErrorKind::NotFound,
        format!("address resolution failed for {host}:{port}"),
    )
}

/// A UNIX socket's default send buffer (about 200 KiB) makes a client's
/// 1 MiB write wait for the peer several times; TCP on loopback grows its
/// own. (On the server's side it measured no better, so it is not used
/// there.)
/// Ask for 4 MiB each way (the kernel caps it at `net.core.wmem_max` /
/// `rmem_max`); a refusal leaves the defaults, which only cost speed.
pub fn widen_buffers(s: &UnixStream) {
    use nix::sys::socket::{setsockopt, sockopt};
    let _ = setsockopt(s, sockopt::SndBuf, &(4 << 20));
    let _ = setsockopt(s, sockopt::RcvBuf, &(4 << 20));
}

/// A connected socket of either kind.
#[derive(Debug)]
pub enum Socket {
    /// UNIX domain.
    Unix(UnixStream),
    /// TCP (with `TCP_NODELAY`: NBD headers are small and latency-bound).
    Tcp(TcpStream),
}

impl Socket {
    /// Connects to `addr`; `timeout` bounds each TCP connection attempt.
    pub fn connect(addr: &SocketAddress, timeout: Option<Duration>) -> io::Result<Socket> {
        match addr {
            SocketAddress::Unix { path } => {
                let s = UnixStream::connect(path)?;
                widen_buffers(&s);
                Ok(Socket::Unix(s))
            }
            SocketAddress::Inet { host, port } => {
                let port = inet_port(port)?;
                let mut last = unresolved(host, port);
                for a in (host.as_str(), port).to_socket_addrs()? {
                    let s = match timeout {
                        Some(t) => TcpStream::connect_timeout(&a, t),
                        None => TcpStream::connect(a),
                    };
                    match s {
                        Ok(s) => {
                            s.set_nodelay(true)?;
                            return Ok(Socket::Tcp(s));
                        }
                        Err(e) => last = e,
                    }
                }
                Err(last)
            }
        }
    }

    /// A second handle on the same connection.
    pub fn try_clone(&self) -> io::Result<Socket> {
        Ok(match self {
            Socket::Unix(s) => Socket::Unix(s.try_clone()?),
            Socket::Tcp(s) => Socket::Tcp(s.try_clone()?),
        })
    }

    /// A [`Closer`] for this connection: lets another thread end a
    /// connection that is still being negotiated.
    pub fn closer(&self) -> io::Result<Closer> {
        Ok(Closer(self.try_clone()?))
    }

    /// Shuts both directions down: blocked reads and writes on every
    /// handle of the connection return.
    pub fn shutdown(&self) {
        let _ = match self {
            Socket::Unix(s) => s.shutdown(Shutdown::Both),
            Socket::Tcp(s) => s.shutdown(Shutdown::Both),
        };
    }

    /// Bounds every read (`None`: block forever); used for the handshake
    /// deadline and the client's open timeout.
    pub fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Socket::Unix(s) => s.set_read_timeout(t),
            Socket::Tcp(s) => s.set_read_timeout(t),
        }
    }

    /// Bounds every write.
    pub fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Socket::Unix(s) => s.set_write_timeout(t),
            Socket::Tcp(s) => s.set_write_timeout(t),
        }
    }
}

impl Read for Socket {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Socket::Unix(s) => s.read(buf),
            Socket::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Socket {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Socket::Unix(s) => s.write(buf),
            Socket::Tcp(s) => s.write(buf),
        }
    }
    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Socket::Unix(s) => s.write_vectored(bufs),
            Socket::Tcp(s) => s.write_vectored(bufs),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Writes one message made of `parts` with as few system calls as the
/// writer allows (`writev` on sockets): a header, then data, go out
/// together instead of as a small packet and a large one.
pub fn write_parts(w: &mut dyn Write, parts: &[&[u8]]) -> io::Result<()> {
    let mut slices: Vec<io::IoSlice<'_>> = parts
        .iter()
        .filter(|p| !p.is_empty())
        .map(|p| io::IoSlice::new(p))
        .collect();
    let mut bufs = &mut slices[..];
    while !bufs.is_empty() {
        match w.write_vectored(bufs) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => io::IoSlice::advance_slices(&mut bufs, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Ends a connection from any thread.
#[derive(Debug)]
pub struct Closer(Socket);

impl Closer {
    /// A closer for the connection `socket` is a handle of (TLS sessions
    /// build their transport themselves).
    pub fn new(socket: Socket) -> Closer {
        Closer(socket)
    }

    /// Shuts the connection down (idempotent).
    pub fn close(&self) {
        self.0.shutdown();
    }

    /// The socket's descriptor (to wait for it to be readable).
    pub fn raw_fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsRawFd;
        match &self.0 {
            Socket::Unix(s) => s.as_raw_fd(),
            Socket::Tcp(s) => s.as_raw_fd(),
        }
    }
}

/// The reading half of a [`Transport`]: a reader that says how many bytes
/// it holds already (a server reading requests knows whether the next one
/// is there without waiting).
pub trait BufferedRead: Read + Send {
    /// Bytes that can be read without waiting.
    fn buffered(&self) -> usize;
}

impl<R: Read + Send> BufferedRead for io::BufReader<R> {
    fn buffered(&self) -> usize {
        self.buffer().len()
    }
}

/// A connection in the transmission phase, split for concurrent use.
pub struct Transport {
    /// The reading half (one reader thread).
    pub reader: Box<dyn BufferedRead>,
    /// The writing half (callers serialise whole messages on it).
    pub writer: Box<dyn Write + Send>,
    /// Ends the connection.
    pub closer: Closer,
    /// The reader reads the socket itself (no TLS): the socket being
    /// readable is what "more to read" means, so a thread can wait for it
    /// together with other things.
    pub plain: bool,
}

/// A connection during negotiation: read and written by one thread, and
/// turned into a [`Transport`] once negotiation ends. Plain sockets and
/// TLS sessions implement it.
pub trait Stream: Read + Write + Send {
    /// The socket underneath (for timeouts and shutdown).
    fn socket(&self) -> &Socket;
    /// Splits it for transmission.
    fn into_transport(self: Box<Self>) -> io::Result<Transport>;
}

impl Stream for Socket {
    fn socket(&self) -> &Socket {
        self
    }
    fn into_transport(self: Box<Self>) -> io::Result<Transport> {
        let reader = Box::new(io::BufReader::with_capacity(256 << 10, self.try_clone()?));
        let closer = Closer(self.try_clone()?);
        Ok(Transport {
            reader,
            writer: self,
            closer,
            plain: true,
        })
    }
}

/// The error of [`Listener::bind`] when what is at a UNIX path cannot be
/// unlinked (QEMU: `Failed to unlink socket PATH: …`), wrapping the
/// system's error.
#[derive(Debug)]
pub struct UnlinkFailed(pub io::Error);

impl std::fmt::Display for UnlinkFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for UnlinkFailed {}

/// A listening socket of either kind (the server's side of
/// [`SocketAddress`]). A UNIX socket is created with the process umask
/// deciding its mode, as QEMU's NBD server does (unlike QEMU's monitor
/// sockets, nothing narrows it), and unlinked again by [`Listener::remove`]
/// while it still names the socket this listener bound.
#[derive(Debug)]
pub enum Listener {
    /// UNIX domain, with the path it was bound at and the socket file's
    /// identity (device, inode).
    Unix(UnixListener, PathBuf, (u64, u64)),
    /// TCP.
    Tcp(TcpListener),
}

impl Listener {
    /// Binds and listens at `addr`. Whatever is at a UNIX path is unlinked
    /// first, as QEMU does (a directory cannot be: [`UnlinkFailed`]).
    /// TCP: every resolved address is tried in turn, the first that binds
    /// wins. Both are non-blocking (the server waits for them with epoll).
    pub fn bind(addr: &SocketAddress) -> io::Result<Listener> {
        use std::os::unix::fs::MetadataExt;
        let l = match addr {
            SocketAddress::Unix { path } => {
                match std::fs::remove_file(path) {
                    Err(e) if e.kind() != io::ErrorKind::NotFound => {
                        return Err(io::Error::new(e.kind(), UnlinkFailed(e)));
                    }
                    _ => {}
                }
                let l = UnixListener::bind(path)?;
                let m = std::fs::symlink_metadata(path)?;
                Listener::Unix(l, path.clone(), (m.dev(), m.ino()))
            }
            SocketAddress::Inet { host, port } => {
                let port = inet_port(port)?;
                let mut last = unresolved(host, port);
                let mut bound = None;
                for a in (host.as_str(), port).to_socket_addrs()? {
                    match TcpListener::bind(a) {
                        Ok(l) => {
                            bound = Some(l);
                            break;
                        }
                        Err(e) => last = e,
                    }
                }
                Listener::Tcp(bound.ok_or(last)?)
            }
        };
        match &l {
            Listener::Unix(u, ..) => u.set_nonblocking(true)?,
            Listener::Tcp(t) => t.set_nonblocking(true)?,
        }
        Ok(l)
    }

    /// The TCP port it listens on (for port 0: the one the kernel chose).
    pub fn local_port(&self) -> Option<u16> {
        match self {
            Listener::Tcp(t) => t.local_addr().ok().map(|a| a.port()),
            Listener::Unix(..) => None,
        }
    }

    /// Accepts one connection (`WouldBlock` when none is waiting). The
    /// socket blocks; TCP gets `TCP_NODELAY`.
    pub fn accept(&self) -> io::Result<Socket> {
        match self {
            Listener::Unix(l, ..) => {
                let (s, _) = l.accept()?;
                s.set_nonblocking(false)?;
                Ok(Socket::Unix(s))
            }
            Listener::Tcp(l) => {
                let (s, _) = l.accept()?;
                s.set_nonblocking(false)?;
                s.set_nodelay(true)?;
                Ok(Socket::Tcp(s))
            }
        }
    }

    /// Unlinks a UNIX socket's path if it still names the socket bound
    /// here (call it while still listening, so the inode cannot have been
    /// reused). Nothing for TCP.
    pub fn remove(&self) {
        use std::os::unix::fs::{FileTypeExt, MetadataExt};
        if let Listener::Unix(_, path, (dev, ino)) = self
            && let Ok(m) = std::fs::symlink_metadata(path)
            && m.file_type().is_socket()
            && m.dev() == *dev
            && m.ino() == *ino
        {
            let _ = std::fs::remove_file(path);
        }
    }
}

impl std::os::fd::AsFd for Listener {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        match self {
            Listener::Unix(l, ..) => l.as_fd(),
            Listener::Tcp(l) => l.as_fd(),
        }
    }
}

/// Blocks `SIGPIPE` on the calling thread: a write to a socket the peer
/// closed then fails with `EPIPE` instead of killing a C host that kept
/// the default disposition. Called by every thread that writes to a
/// socket.
pub fn block_sigpipe() {
    use nix::sys::signal::{SigSet, SigmaskHow, Signal, pthread_sigmask};
    let mut set = SigSet::empty();
    set.add(Signal::SIGPIPE);
    let _ = pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&set), None);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transport_halves_work_concurrently_and_close_unblocks_the_reader() {
        let (a, b) = UnixStream::pair().unwrap();
        let t = Box::new(Socket::Unix(a)).into_transport().unwrap();
        let mut peer = Socket::Unix(b);
        let Transport {
            mut reader,
            mut writer,
            closer,
            plain,
        } = t;
        assert!(plain, "a plain socket's reader reads the socket");
        let h = std::thread::spawn(move || {
            let mut got = [0u8; 4];
            reader.read_exact(&mut got).unwrap();
            // Blocks until the closer shuts the socket down.
            let mut more = [0u8; 1];
            (got, reader.read(&mut more).unwrap())
        });
        writer.write_all(b"ping").unwrap();
        let mut buf = [0u8; 4];
        peer.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"ping");
        peer.write_all(b"pong").unwrap();
        std::thread::sleep(Duration::from_millis(50));
        closer.close();
        let (got, n) = h.join().unwrap();
        assert_eq!(&got, b"pong");
        assert_eq!(n, 0);
    }

    #[test]
    fn inet_needs_a_numeric_port_and_addresses_print_as_qemu() {
        let a = SocketAddress::Inet {
            host: "localhost".into(),
            port: "nbd".into(),
        };
        assert!(Socket::connect(&a, None).is_err());
        let v6 = SocketAddress::Inet {
            host: "::1".into(),
            port: "10809".into(),
        };
        assert_eq!(v6.to_string(), "[::1]:10809");
    }
}
