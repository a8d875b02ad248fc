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
//! - A write to a vanished client fails with EPIPE and never raises
//!   SIGPIPE, which would kill a C host that did not ignore it: std's
//!   `UnixStream` sends with `MSG_NOSIGNAL` on Linux, and server threads
//!   block SIGPIPE as well so that this holds whatever std does.

use crate::locks::Mutex;
use std::cell::Cell;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::thread::{self, JoinHandle};

use nix::sys::signal::{SigSet, Signal};
use serde_json::Value;

use super::server::Monitor;
use super::{Session, greeting};
use crate::events::Subscription;

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
            }),
            events: Mutex::new(Events::default()),
            forwarder: Mutex::new(None),
        }
    }

    /// Every event queued for the client, then `reply`, in one write.
    fn send(&self, reply: Option<&Value>) -> io::Result<()> {
        let mut out = self.out.lock();
        self.send_locked(&mut out, reply)
    }

    fn send_locked(&self, out: &mut Out, reply: Option<&Value>) -> io::Result<()> {
        if out.broken {
            return Err(io::ErrorKind::BrokenPipe.into());
        }
        let mut text = String::new();
        let mut push = |v: &Value| {
            text.push_str(&crate::qapi::json::write(v, out.pretty));
            text.push_str("\r\n");
        };
        if let Some(q) = &out.queue {
            while let Some(ev) = q.try_next() {
                push(&ev.to_qmp_value());
            }
        }
        if let Some(r) = reply {
            push(r);
        }
        if text.is_empty() {
            return Ok(());
        }
        (&self.stream).write_all(text.as_bytes()).inspect_err(|_| {
            out.broken = true;
            // Wakes the reader if the forwarder found the client gone.
            let _ = self.stream.shutdown(Shutdown::Both);
        })
    }

    /// Start the client's event subscription, write the reply to
    /// `qmp_capabilities`, start the forwarder. Subscribed before the
    /// reply is out (a client that read it sees every later event, as
    /// QEMU switches modes inside the command); under the output lock,
    /// so that nothing queued meanwhile goes out before the reply.
    fn reply_and_subscribe(self: &Arc<Self>, mon: &Arc<Monitor>, reply: &Value) -> io::Result<()> {
        let mut out = self.out.lock();
        let sub = {
            let mut ev = self.events.lock();
            if ev.closed {
                // The server is closing: no events for a newcomer.
                None
            } else {
                let sub = Arc::new(mon.ctx.subscribe());
                ev.sub = Some(sub.clone());
                Some(sub)
            }
        };
        self.send_locked(&mut out, Some(reply))?;
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
        if client.send(Some(&greeting())).is_ok() {
            read_requests(&mon, &client);
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
            let reply = match mon.execute(|| session.next_reply()) {
                Some(Some(reply)) => reply,
                // Stopped, or no whole request left.
                _ => break,
            };
            let sent = if !negotiated && session.in_command_mode() {
                client.reply_and_subscribe(mon, &reply)
            } else {
                client.send(Some(&reply))
            };
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
        if client.send(None).is_err() {
            break;
        }
    }
}
