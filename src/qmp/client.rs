//! One monitor client: a reader thread that executes its requests through
//! a [`Session`] and writes the replies, and (once capabilities are
//! negotiated) a forwarder thread that writes the events emitted
//! meanwhile, both to the one socket.
//!
//! Ordering, without timers: the client's event subscription is only ever
//! drained under its output lock, and whatever is popped there is written
//! before the lock is released. The forwarder waits for "something is
//! queued" without popping, then takes the lock, pops everything queued
//! and writes it. The reader, after a command returned, takes the lock,
//! pops and writes everything queued, then writes the reply. Emitting is
//! synchronous (the bus pushes into every subscription before `emit`
//! returns), so every event a command caused is queued by the time the
//! command returns, and goes out before its reply, as QEMU sends it.
//!
//! Invariants:
//! - Every message is QEMU's JSON text (`crate::qapi::json::write`)
//!   followed by `\r\n`; a batch (events, then a reply) is one write.
//! - Events emitted before `qmp_capabilities` returned are not the
//!   client's; every later one is. The subscription starts before that
//!   command's reply is written, under the output lock, and what it
//!   queues meanwhile goes out after the reply.
//! - A client that goes away (EOF or a failed write, even mid-line or
//!   mid-command) ends only its own two threads: the reader shuts the
//!   socket down, closes the subscription and joins the forwarder.
//! - Once the server stops taking commands, what a client sends is read
//!   and dropped; its events keep flowing until the server closes it.
//! - Output is buffered per client and written without blocking the
//!   reader, so a client may send a large batch before reading its
//!   replies (QEMU's monitor buffers its output too). The reader waits
//!   (poll) for input or, while output is held, for room to write it.
//!   Held output is bounded: past [`OUT_CAP`] unwritten bytes the reader
//!   blocks writing and stops reading, so a client that sends without
//!   reading is slowed to its own pace. The forwarder always writes what
//!   it takes, blocking. A client's event queue is bounded by
//!   [`EVENT_CAP`]: a client that lets more pile up (it reads nothing
//!   while jobs emit) is disconnected, rather than the daemon holding
//!   its events without bound (QEMU's monitor does). Before that, from
//!   [`COALESCE_FROM`] events behind, a repeat of the last queued event
//!   is not queued again, so a storm of one error (a mirror retrying a
//!   failing read under `ignore`) reaches a slow client once, and a
//!   client that does not read reaches the limit only through distinct
//!   events.
//! - A write to a vanished client fails with EPIPE and never raises
//!   SIGPIPE, which would kill a C host that did not ignore it: std's
//!   `UnixStream` sends with `MSG_NOSIGNAL` on Linux, and server threads
//!   block SIGPIPE as well so that this holds whatever std does.

use crate::locks::Mutex;
use std::cell::Cell;
use std::io::{self, Read};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::thread::{self, JoinHandle};

use std::os::fd::{AsFd, AsRawFd};

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::socket::{MsgFlags, send};
use serde_json::Value;

use super::server::Monitor;
use super::{Session, greeting};
use crate::events::{Notify, Subscription};

/// Unwritten output a client may have before its reader stops reading
/// (a megabyte of garbage costs QEMU's texts about 9 MB of replies).
pub(crate) const OUT_CAP: usize = 16 << 20;

/// Events a client may have waiting before it is disconnected: 2 MiB of
/// queue per client (the events themselves are shared by all clients).
/// Far more than a job's status changes; a mirror repeating a read error
/// under `on-source-error=ignore` emits over 100 000 a second, which a
/// client that reads keeps up with, and one that does not reaches in
/// seconds.
pub(crate) const EVENT_CAP: usize = 256 << 10;

/// Events a client may have waiting before a repeat of the last one is
/// not queued again (a storm of one `BLOCK_JOB_ERROR` reaches a client
/// that fell behind once; QEMU's single thread paces its own storms by
/// writing them out, ours would outrun any reader).
pub(crate) const COALESCE_FROM: usize = 1024;

/// After a value this large, the output buffer's memory is given back.
const OUT_KEEP: usize = 1 << 20;

/// Block SIGPIPE in the calling thread (see the module doc; a blocked
/// SIGPIPE stays pending on this thread and goes with it).
pub(super) fn block_sigpipe() {
    let mut set = SigSet::empty();
    set.add(Signal::SIGPIPE);
    // Cannot fail for a valid signal set.
    let _ = set.thread_block();
}

/// What the output lock protects.
struct Out {
    pretty: bool,
    /// The event subscription, from negotiation on.
    queue: Option<Arc<Subscription>>,
    /// A write failed: the client is gone, nothing more is written.
    broken: bool,
    /// Output taken for the client; written up to `sent`.
    pending: Vec<u8>,
    sent: usize,
}

impl Out {
    fn unsent(&self) -> usize {
        self.pending.len() - self.sent
    }
}

/// Hangs up on a client whose event queue overflowed (its forwarder may
/// be blocked writing to it: the shutdown fails that write).
struct HangUp(UnixStream);

impl Notify for HangUp {
    fn notify(&self) {
        let _ = self.0.shutdown(Shutdown::Both);
    }
}

/// The subscription as the closing side sees it (a separate lock, so
/// closing never waits behind a write to a client that does not read).
#[derive(Default)]
struct Events {
    /// No subscription may start any more.
    closed: bool,
    sub: Option<Arc<Subscription>>,
}

/// One connection.
pub(super) struct Client {
    pub(super) id: u64,
    stream: UnixStream,
    out: Mutex<Out>,
    events: Mutex<Events>,
    forwarder: Mutex<Option<JoinHandle<()>>>,
}

impl Client {
    pub(super) fn new(id: u64, stream: UnixStream, pretty: bool) -> Client {
        Client {
            id,
            stream,
            out: Mutex::new(Out {
                pretty,
                queue: None,
                broken: false,
                pending: Vec::new(),
                sent: 0,
            }),
            events: Mutex::new(Events::default()),
            forwarder: Mutex::new(None),
        }
    }

    /// Every event queued for the client, then `reply`, taken for
    /// output in that order and written as far as the socket takes it
    /// now (`wait`: all of it, blocking; so too past [`OUT_CAP`]).
    fn send(&self, reply: Option<&Value>, wait: bool) -> io::Result<()> {
        let mut out = self.out.lock();
        self.send_locked(&mut out, reply, wait)
    }

    fn send_locked(&self, out: &mut Out, reply: Option<&Value>, wait: bool) -> io::Result<()> {
        if out.broken {
            return Err(io::ErrorKind::BrokenPipe.into());
        }
        let pretty = out.pretty;
        let push = |pending: &mut Vec<u8>, v: &Value| {
            pending.extend_from_slice(crate::qapi::json::write(v, pretty).as_bytes());
            pending.extend_from_slice(b"\r\n");
        };
        if let Some(q) = &out.queue {
            while let Some(ev) = q.try_next() {
                push(&mut out.pending, &ev.to_qmp_value());
            }
        }
        if let Some(r) = reply {
            push(&mut out.pending, r);
        }
        let wait = wait || out.unsent() > OUT_CAP;
        self.flush_locked(out, wait)
    }

    /// Write held output: what the socket takes without blocking, or
    /// (`wait`) all of it.
    fn flush(&self, wait: bool) -> io::Result<()> {
        let mut out = self.out.lock();
        if out.broken {
            return Err(io::ErrorKind::BrokenPipe.into());
        }
        self.flush_locked(&mut out, wait)
    }

    fn flush_locked(&self, out: &mut Out, wait: bool) -> io::Result<()> {
        // MSG_NOSIGNAL: EPIPE, never SIGPIPE (see the module doc).
        let flags = if wait {
            MsgFlags::MSG_NOSIGNAL
        } else {
            MsgFlags::MSG_NOSIGNAL | MsgFlags::MSG_DONTWAIT
        };
        while out.unsent() > 0 {
            match send(self.stream.as_raw_fd(), &out.pending[out.sent..], flags) {
                Ok(n) => out.sent += n,
                Err(Errno::EINTR) => {}
                Err(Errno::EAGAIN) if !wait => break,
                Err(e) => {
                    out.broken = true;
                    // Wakes the reader if the forwarder found the client gone.
                    let _ = self.stream.shutdown(Shutdown::Both);
                    return Err(e.into());
                }
            }
        }
        if out.unsent() == 0 {
            out.pending.clear();
            out.sent = 0;
            if out.pending.capacity() > OUT_KEEP {
                out.pending.shrink_to(OUT_KEEP);
            }
        } else if out.sent > out.pending.len() / 2 {
            // Amortised: each byte is moved at most once more.
            out.pending.drain(..out.sent);
            out.sent = 0;
        }
        Ok(())
    }

    /// Output is held, waiting for room in the socket.
    fn output_held(&self) -> bool {
        let out = self.out.lock();
        !out.broken && out.unsent() > 0
    }

    /// Start the client's event subscription, write the reply to
    /// `qmp_capabilities`, start the forwarder. Subscribed before the
    /// reply is out (a client that read it sees every later event, as
    /// QEMU switches modes inside the command); under the output lock,
    /// so that nothing queued meanwhile goes out before the reply.
    fn reply_and_subscribe(self: &Arc<Self>, mon: &Arc<Monitor>, reply: &Value) -> io::Result<()> {
        let hang_up = Arc::new(HangUp(self.stream.try_clone()?));
        let mut out = self.out.lock();
        let sub = {
            let mut ev = self.events.lock();
            if ev.closed {
                // The server is closing: no events for a newcomer.
                None
            } else {
                let sub = Arc::new(mon.ctx.subscribe_bounded(EVENT_CAP, COALESCE_FROM, hang_up));
                ev.sub = Some(sub.clone());
                Some(sub)
            }
        };
        self.send_locked(&mut out, Some(reply), false)?;
        let Some(sub) = sub else {
            return Ok(());
        };
        out.queue = Some(sub.clone());
        mon.forwarder_started();
        let (m, c) = (mon.clone(), self.clone());
        match thread::Builder::new()
            .name("bj-qmp-events".into())
            .spawn(move || forward(m, c, sub))
        {
            Ok(h) => {
                *self.forwarder.lock() = Some(h);
                Ok(())
            }
            Err(e) => {
                // Without a forwarder the client would miss events:
                // hang up instead.
                mon.forwarder_ended();
                out.queue = None;
                Err(e)
            }
        }
    }

    /// No subscription from now on; the forwarder writes what is queued
    /// and ends.
    pub(super) fn close_events(&self) {
        let mut ev = self.events.lock();
        ev.closed = true;
        if let Some(s) = ev.sub.take() {
            s.close();
        }
    }

    /// Shut the socket down: blocked reads return EOF, writes fail.
    pub(super) fn disconnect(&self) {
        let _ = self.stream.shutdown(Shutdown::Both);
    }

    /// Wait for the forwarder, if it was started and nobody joined it yet.
    pub(super) fn join_forwarder(&self) {
        let h = self.forwarder.lock().take();
        if let Some(h) = h {
            let _ = h.join();
        }
    }
}

thread_local! {
    /// On a reader thread: the address of its monitor.
    static READER_OF: Cell<usize> = const { Cell::new(0) };
}

/// Whether the calling thread is one of `mon`'s readers.
pub(super) fn reader_of(mon: &Arc<Monitor>) -> bool {
    READER_OF.with(|r| r.get()) == Arc::as_ptr(mon) as usize
}

/// The reader thread: greeting, then requests until the client goes away
/// or the server closes it; then the client's own cleanup.
pub(super) fn serve(mon: Arc<Monitor>, client: Arc<Client>) {
    block_sigpipe();
    READER_OF.with(|r| r.set(Arc::as_ptr(&mon) as usize));
    // A panicking command must not skip the cleanup below.
    let _ = catch_unwind(AssertUnwindSafe(|| {
        if client.send(Some(&greeting()), false).is_ok() {
            read_requests(&mon, &client);
            // A client that stopped sending may still read: what is held
            // for it goes out (until it reads or the server closes it).
            let _ = client.flush(true);
        }
    }));
    client.disconnect();
    client.close_events();
    client.join_forwarder();
    mon.remove(client.id);
}

fn read_requests(mon: &Arc<Monitor>, client: &Arc<Client>) {
    let mut session = Session::new(&mon.ctx);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        // Input, or room for held output.
        let events = if client.output_held() {
            PollFlags::POLLIN | PollFlags::POLLOUT
        } else {
            PollFlags::POLLIN
        };
        let mut fds = [PollFd::new(client.stream.as_fd(), events)];
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) | Err(Errno::EINTR) => {}
            Err(_) => return,
        }
        let ready = fds[0].revents().unwrap_or(PollFlags::empty());
        if ready.contains(PollFlags::POLLOUT) && client.flush(false).is_err() {
            return;
        }
        if !ready.intersects(PollFlags::POLLIN | PollFlags::POLLHUP | PollFlags::POLLERR) {
            continue;
        }
        let n = match (&client.stream).read(&mut buf) {
            Ok(0) => return,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return,
        };
        if mon.commands_stopped() {
            // Nothing more will run: read and drop until the server
            // closes us.
            continue;
        }
        session.push(&buf[..n]);
        loop {
            let negotiated = session.in_command_mode();
            // Under the monitor's command gate: once `stop_commands`
            // returned, no command runs any more.
            // What the command leaves for after its reply (QEMU's bottom
            // halves, e.g. a hard `block-export-del`'s disconnects and
            // event) runs once the reply is written.
            let run = mon.execute(|| crate::events::collect_after_reply(|| session.next_reply()));
            let (reply, later) = match run {
                Some((Some(reply), later)) => (reply, later),
                // Stopped, or no whole request left.
                _ => break,
            };
            let sent = if !negotiated && session.in_command_mode() {
                client.reply_and_subscribe(mon, &reply)
            } else {
                client.send(Some(&reply), false)
            };
            for f in later {
                f();
            }
            if sent.is_err() {
                return;
            }
            if session.quit_requested() {
                mon.quit();
            }
        }
    }
}

/// Decrements the monitor's forwarder count when the forwarder ends,
/// however it ends.
struct Running(Arc<Monitor>);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.forwarder_ended();
    }
}

/// The forwarder thread: write events as they are queued.
fn forward(mon: Arc<Monitor>, client: Arc<Client>, sub: Arc<Subscription>) {
    block_sigpipe();
    let _running = Running(mon);
    while sub.wait_queued() {
        if client.send(None, true).is_err() {
            return;
        }
    }
    // Closed: what the reader left held goes out too.
    let _ = client.flush(true);
}
