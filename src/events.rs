//! Events: QEMU's event names and data, one ordered stream per context.
//!
//! Invariants:
//! - Every event gets its sequence number and timestamp under the bus lock
//!   and is handed to every sink under that same lock, so all sinks see the
//!   same order and sequence numbers are contiguous (no gap = nothing lost).
//! - Sinks are unbounded FIFO queues: emitting never blocks and never
//!   drops. A sink whose subscription is gone is removed. (A plain
//!   mutex + condvar queue rather than a channel crate: channel senders
//!   create a `std::thread::Thread` handle for the sending thread, which
//!   for a host's main thread is never freed and shows up in leak checks.)
//! - Nothing outside this module runs while the bus lock is held; emitting
//!   is safe under any other library lock (the job engine emits with its
//!   state lock held, which is what keeps events in state-change order).

use crate::locks::{Condvar, Mutex, MutexGuard};
use serde::Serialize;
use serde_json::{Value, json};
use std::collections::VecDeque;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::qapi::{BlockErrorAction, IoOperationType, JobStatus, JobType};

/// QMP's event timestamp (wall clock).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Timestamp {
    /// Seconds since the epoch.
    pub seconds: i64,
    /// Microseconds within the second.
    pub microseconds: i64,
}

impl Timestamp {
    /// Now, from the wall clock as QEMU's `g_get_real_time`.
    pub fn now() -> Self {
        let d = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        Timestamp {
            seconds: d.as_secs() as i64,
            microseconds: i64::from(d.subsec_micros()),
        }
    }
}

/// Progress fields shared by the `BLOCK_JOB_*` events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobProgressData {
    /// Job type.
    pub job_type: JobType,
    /// Job id (QEMU calls it `device` in these events).
    pub device: String,
    /// Progress total.
    pub len: u64,
    /// Progress done.
    pub offset: u64,
    /// Rate limit.
    pub speed: u64,
}

/// The data of one event; each variant is one QMP event.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum EventData {
    /// `JOB_STATUS_CHANGE`: a job changed status.
    JobStatusChange {
        /// Job id.
        id: String,
        /// New status.
        status: JobStatus,
    },
    /// `BLOCK_JOB_READY`: the job is in sync and can be completed.
    BlockJobReady(JobProgressData),
    /// `BLOCK_JOB_PENDING`: the job waits for `finalize` (auto-finalize off).
    BlockJobPending {
        /// Job type.
        job_type: JobType,
        /// Job id.
        id: String,
    },
    /// `BLOCK_JOB_COMPLETED`: the job finished; `error` when it failed.
    BlockJobCompleted {
        /// Progress and identity.
        progress: JobProgressData,
        /// The failure text (`Input/output error`, …).
        error: Option<String>,
    },
    /// `BLOCK_JOB_CANCELLED`: the job was cancelled.
    BlockJobCancelled(JobProgressData),
    /// `BLOCK_JOB_ERROR`: a job request failed and the job's policy applied.
    BlockJobError {
        /// Job id.
        device: String,
        /// Read or write.
        operation: IoOperationType,
        /// The action taken.
        action: BlockErrorAction,
    },
    /// `BLOCK_IO_ERROR`: a guest request failed and the device policy applied.
    BlockIoError {
        /// QOM path of the guest device.
        qom_path: String,
        /// Device (backend) name.
        device: String,
        /// Node the request was submitted to.
        node_name: Option<String>,
        /// Read or write.
        operation: IoOperationType,
        /// The action taken.
        action: BlockErrorAction,
        /// Present when the device has an I/O status: the error was ENOSPC.
        nospace: Option<bool>,
        /// `strerror` text of the failure.
        reason: String,
    },
    /// `BLOCK_EXPORT_DELETED`: a block export is gone (its clients
    /// disconnected, its node released).
    BlockExportDeleted {
        /// Export id.
        id: String,
    },
}

impl EventData {
    /// The QMP event name.
    pub fn name(&self) -> &'static str {
        match self {
            EventData::JobStatusChange { .. } => "JOB_STATUS_CHANGE",
            EventData::BlockJobReady(_) => "BLOCK_JOB_READY",
            EventData::BlockJobPending { .. } => "BLOCK_JOB_PENDING",
            EventData::BlockJobCompleted { .. } => "BLOCK_JOB_COMPLETED",
            EventData::BlockJobCancelled(_) => "BLOCK_JOB_CANCELLED",
            EventData::BlockJobError { .. } => "BLOCK_JOB_ERROR",
            EventData::BlockIoError { .. } => "BLOCK_IO_ERROR",
            EventData::BlockExportDeleted { .. } => "BLOCK_EXPORT_DELETED",
        }
    }

    /// The QMP `data` object with QEMU's field names.
    pub fn to_json(&self) -> Value {
        fn progress(p: &JobProgressData) -> serde_json::Map<String, Value> {
            let v = json!({
                "type": p.job_type,
                "device": p.device,
                "len": p.len,
                "offset": p.offset,
                "speed": p.speed,
            });
            match v {
                Value::Object(m) => m,
                _ => unreachable!("json! of an object literal is an object"),
            }
        }
        match self {
            EventData::JobStatusChange { id, status } => json!({"id": id, "status": status}),
            EventData::BlockJobReady(p) | EventData::BlockJobCancelled(p) => {
                Value::Object(progress(p))
            }
            EventData::BlockJobPending { job_type, id } => json!({"type": job_type, "id": id}),
            EventData::BlockJobCompleted { progress: p, error } => {
                let mut m = progress(p);
                if let Some(e) = error {
                    m.insert("error".into(), Value::String(e.clone()));
                }
                Value::Object(m)
            }
            EventData::BlockJobError {
                device,
                operation,
                action,
            } => json!({"device": device, "operation": operation, "action": action}),
            EventData::BlockIoError {
                qom_path,
                device,
                node_name,
                operation,
                action,
                nospace,
                reason,
            } => {
                let mut m = serde_json::Map::new();
                m.insert("qom-path".into(), json!(qom_path));
                m.insert("device".into(), json!(device));
                if let Some(n) = node_name {
                    m.insert("node-name".into(), json!(n));
                }
                m.insert("operation".into(), json!(operation));
                m.insert("action".into(), json!(action));
                if let Some(n) = nospace {
                    m.insert("nospace".into(), json!(n));
                }
                m.insert("reason".into(), json!(reason));
                Value::Object(m)
            }
            EventData::BlockExportDeleted { id } => json!({ "id": id }),
        }
    }
}

/// One emitted event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// Per-context sequence number, from 1, contiguous.
    pub seq: u64,
    /// Wall-clock time of emission.
    pub timestamp: Timestamp,
    /// Name and data.
    pub data: EventData,
}

impl Event {
    /// The QMP event name.
    pub fn name(&self) -> &'static str {
        self.data.name()
    }

    /// The event as QMP sends it on a monitor.
    pub fn to_qmp_value(&self) -> Value {
        json!({
            "timestamp": self.timestamp,
            "event": self.name(),
            "data": self.data.to_json(),
        })
    }

    /// The event as one line of QMP JSON (no newline).
    pub fn to_qmp_json(&self) -> String {
        self.to_qmp_value().to_string()
    }
}

/// Something that wants to know an event is queued (the host's eventfd).
pub trait Notify: Send + Sync {
    /// Called after each event is queued, with the bus lock held: must be
    /// quick and must not call into the library.
    fn notify(&self);
}

/// One subscriber's queue.
struct Queue {
    items: Mutex<QueueState>,
    cv: Condvar,
    /// Events queued at most; one more overflows the queue.
    limit: usize,
    /// From this many queued on, an event equal to the last one queued
    /// (a repeating error) is not queued again.
    coalesce_from: usize,
    /// Told once, when the queue overflows.
    on_overflow: Option<Arc<dyn Notify>>,
}

impl Default for Queue {
    fn default() -> Self {
        Queue {
            items: Mutex::default(),
            cv: Condvar::new(),
            limit: usize::MAX,
            coalesce_from: usize::MAX,
            on_overflow: None,
        }
    }
}

#[derive(Default)]
struct QueueState {
    events: VecDeque<Arc<Event>>,
    closed: bool,
    overflowed: bool,
}

impl Queue {
    fn lock(&self) -> MutexGuard<'_, QueueState> {
        self.items.lock()
    }

    fn push(&self, ev: Arc<Event>) {
        let mut q = self.lock();
        if q.closed {
            return;
        }
        if q.events.len() >= self.coalesce_from
            && q.events.back().is_some_and(|last| last.data == ev.data)
        {
            return;
        }
        if q.events.len() >= self.limit {
            // The receiver fell too far behind: no more events for it.
            q.overflowed = true;
            q.closed = true;
            drop(q);
            self.cv.notify_all();
            if let Some(n) = &self.on_overflow {
                n.notify();
            }
            return;
        }
        q.events.push_back(ev);
        drop(q);
        self.cv.notify_one();
    }

    fn close(&self) {
        self.lock().closed = true;
        self.cv.notify_all();
    }
}

struct Sink {
    id: u64,
    queue: Arc<Queue>,
    notify: Option<Arc<dyn Notify>>,
}

struct BusInner {
    next_seq: u64,
    next_sink: u64,
    sinks: Vec<Sink>,
}

/// The per-context event stream.
pub struct EventBus {
    inner: Mutex<BusInner>,
}

impl Default for EventBus {
    fn default() -> Self {
        EventBus {
            inner: Mutex::new(BusInner {
                next_seq: 1,
                next_sink: 1,
                sinks: Vec::new(),
            }),
        }
    }
}

/// Work a monitor command leaves for after its reply (see
/// [`after_reply`]).
pub type AfterReply = Box<dyn FnOnce() + Send>;

thread_local! {
    /// Set while this thread executes a monitor command whose reply is
    /// still to be written.
    static AFTER_REPLY: std::cell::RefCell<Option<Vec<AfterReply>>> =
        const { std::cell::RefCell::new(None) };
}

/// Run `f` once the reply of the monitor command this thread is
/// executing has been written, or now when there is none (a library or C
/// call). QEMU finishes some commands in a bottom half that runs after
/// the monitor replied (`block-export-del` with clients still connected
/// replies, then disconnects them and emits `BLOCK_EXPORT_DELETED`); the
/// events such work emits then come after the reply, as QEMU sends them.
pub fn after_reply(f: impl FnOnce() + Send + 'static) {
    let f: AfterReply = Box::new(f);
    let f = AFTER_REPLY.with(|q| match q.borrow_mut().as_mut() {
        Some(v) => {
            v.push(f);
            None
        }
        None => Some(f),
    });
    if let Some(f) = f {
        f();
    }
}

/// Run a monitor command, collecting what it leaves for after its reply
/// ([`after_reply`]); the caller runs those, in order, once the reply is
/// out.
pub fn collect_after_reply<T>(cmd: impl FnOnce() -> T) -> (T, Vec<AfterReply>) {
    let outer = AFTER_REPLY.with(|q| q.replace(Some(Vec::new())));
    // Restored also when `cmd` panics (the monitor catches that).
    struct Restore(Option<Option<Vec<AfterReply>>>);
    impl Drop for Restore {
        fn drop(&mut self) {
            if let Some(outer) = self.0.take() {
                let _ = AFTER_REPLY.with(|q| q.replace(outer));
            }
        }
    }
    let mut restore = Restore(Some(outer));
    let r = cmd();
    let outer = restore.0.take().expect("set above");
    let mine = AFTER_REPLY.with(|q| q.replace(outer)).unwrap_or_default();
    (r, mine)
}

impl EventBus {
    /// A new bus with no sinks.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn lock(&self) -> crate::locks::MutexGuard<'_, BusInner> {
        self.inner.lock()
    }

    /// Emit an event to every sink; returns its sequence number.
    pub fn emit(&self, data: EventData) -> u64 {
        let mut inner = self.lock();
        let seq = inner.next_seq;
        inner.next_seq += 1;
        let ev = Arc::new(Event {
            seq,
            timestamp: Timestamp::now(),
            data,
        });
        for s in &inner.sinks {
            s.queue.push(ev.clone());
            if let Some(n) = &s.notify {
                n.notify();
            }
        }
        seq
    }

    /// The sequence number of the last event emitted (0 if none).
    pub fn last_seq(&self) -> u64 {
        self.lock().next_seq - 1
    }

    /// Subscribe: every event emitted from now on, in order.
    pub fn subscribe(self: &Arc<Self>) -> Subscription {
        self.subscribe_with(None)
    }

    /// Subscribe with a notifier called after each event is queued.
    pub fn subscribe_with(self: &Arc<Self>, notify: Option<Arc<dyn Notify>>) -> Subscription {
        self.subscribe_queue(Queue::default(), notify)
    }

    /// Subscribe with at most `limit` events queued: the event that would
    /// be one more closes the subscription instead (nothing is reordered:
    /// [`Subscription::overflowed`] says it ended so), and `on_overflow`
    /// is told, once, with the bus lock held. With `coalesce_from` or
    /// more queued, an event equal to the last one queued (name and data:
    /// a repeating `BLOCK_JOB_ERROR`) is not queued again: a receiver
    /// that fell behind sees a storm of one event once.
    pub fn subscribe_bounded(
        self: &Arc<Self>,
        limit: usize,
        coalesce_from: usize,
        on_overflow: Arc<dyn Notify>,
    ) -> Subscription {
        let queue = Queue {
            limit,
            coalesce_from,
            on_overflow: Some(on_overflow),
            ..Queue::default()
        };
        self.subscribe_queue(queue, None)
    }

    fn subscribe_queue(
        self: &Arc<Self>,
        queue: Queue,
        notify: Option<Arc<dyn Notify>>,
    ) -> Subscription {
        let queue = Arc::new(queue);
        let mut inner = self.lock();
        let id = inner.next_sink;
        inner.next_sink += 1;
        inner.sinks.push(Sink {
            id,
            queue: queue.clone(),
            notify,
        });
        Subscription {
            id,
            queue,
            bus: Arc::downgrade(self),
        }
    }

    fn unsubscribe(&self, id: u64) {
        let mut inner = self.lock();
        if let Some(pos) = inner.sinks.iter().position(|s| s.id == id) {
            let s = inner.sinks.remove(pos);
            s.queue.close();
        }
    }
}

/// An ordered stream of events; unsubscribes when dropped.
pub struct Subscription {
    id: u64,
    queue: Arc<Queue>,
    bus: Weak<EventBus>,
}

impl Subscription {
    /// The next event if one is queued.
    pub fn try_next(&self) -> Option<Arc<Event>> {
        self.queue.lock().events.pop_front()
    }

    /// Wait for the next event; `None` once closed and empty.
    pub fn next_blocking(&self) -> Option<Arc<Event>> {
        let mut q = self.queue.lock();
        loop {
            if let Some(ev) = q.events.pop_front() {
                return Some(ev);
            }
            if q.closed {
                return None;
            }
            q = self.queue.cv.wait(q);
        }
    }

    /// Wait until an event is queued, without taking it: true when one
    /// is, false once the subscription is closed and empty. For a reader
    /// that pops under a lock of its own (a QMP client's output lock),
    /// so that it never holds an event it has not written yet.
    pub fn wait_queued(&self) -> bool {
        let mut q = self.queue.lock();
        loop {
            if !q.events.is_empty() {
                return true;
            }
            if q.closed {
                return false;
            }
            q = self.queue.cv.wait(q);
        }
    }

    /// Wait up to `timeout` for the next event.
    pub fn next_timeout(&self, timeout: Duration) -> Option<Arc<Event>> {
        let deadline = Instant::now() + timeout;
        let mut q = self.queue.lock();
        loop {
            if let Some(ev) = q.events.pop_front() {
                return Some(ev);
            }
            let now = Instant::now();
            if q.closed || now >= deadline {
                return None;
            }
            q = self.queue.cv.wait_timeout(q, deadline - now);
        }
    }

    /// Whether the subscription overflowed its limit (and was closed).
    pub fn overflowed(&self) -> bool {
        self.queue.lock().overflowed
    }

    /// Number of queued events.
    pub fn len(&self) -> usize {
        self.queue.lock().events.len()
    }

    /// True when nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Stop receiving: later events are not queued; already queued ones
    /// stay readable.
    pub fn close(&self) {
        match self.bus.upgrade() {
            Some(bus) => bus.unsubscribe(self.id),
            None => self.queue.close(),
        }
    }
}

/// Closes a subscription from another thread (its receiver then drains
/// what was queued and ends).
pub struct SubscriptionCloser {
    id: u64,
    bus: Weak<EventBus>,
}

impl SubscriptionCloser {
    /// Stop queueing events for the subscription.
    pub fn close(&self) {
        if let Some(bus) = self.bus.upgrade() {
            bus.unsubscribe(self.id);
        }
    }
}

impl Subscription {
    /// A handle that closes this subscription from elsewhere.
    pub fn closer(&self) -> SubscriptionCloser {
        SubscriptionCloser {
            id: self.id,
            bus: self.bus.clone(),
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn after_reply_work_waits_for_the_reply_only_inside_a_command() {
        use std::sync::atomic::{AtomicU32, Ordering::SeqCst};
        static RAN: AtomicU32 = AtomicU32::new(0);
        // Outside a command: at once.
        after_reply(|| {
            RAN.fetch_add(1, SeqCst);
        });
        assert_eq!(RAN.load(SeqCst), 1);
        // Inside: collected, in order, and the scope ends with the command.
        let ((), later) = collect_after_reply(|| {
            after_reply(|| {
                RAN.fetch_add(10, SeqCst);
            });
            after_reply(|| {
                RAN.fetch_add(100, SeqCst);
            });
        });
        assert_eq!(RAN.load(SeqCst), 1);
        assert_eq!(later.len(), 2);
        for f in later {
            f();
        }
        assert_eq!(RAN.load(SeqCst), 111);
        after_reply(|| {
            RAN.fetch_add(1000, SeqCst);
        });
        assert_eq!(RAN.load(SeqCst), 1111);
    }

    fn jsc(id: &str, status: JobStatus) -> EventData {
        EventData::JobStatusChange {
            id: id.into(),
            status,
        }
    }

    #[test]
    fn sequence_is_contiguous_and_every_sink_sees_the_same_order() {
        let bus = EventBus::new();
        let a = bus.subscribe();
        let b = bus.subscribe();
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let bus = bus.clone();
                std::thread::spawn(move || {
                    for _ in 0..1000 {
                        bus.emit(jsc(&format!("j{t}"), JobStatus::Running));
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let sa: Vec<u64> = std::iter::from_fn(|| a.try_next()).map(|e| e.seq).collect();
        let sb: Vec<u64> = std::iter::from_fn(|| b.try_next()).map(|e| e.seq).collect();
        assert_eq!(sa, (1..=4000).collect::<Vec<_>>());
        assert_eq!(sa, sb);
        assert_eq!(bus.last_seq(), 4000);
    }

    #[test]
    fn a_bounded_subscription_closes_at_its_limit_and_says_so() {
        struct Count(std::sync::atomic::AtomicUsize);
        impl Notify for Count {
            fn notify(&self) {
                // Relaxed: a counter read after the emitting thread's
                // bus lock was released (the lock orders it).
                self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        }
        let bus = EventBus::new();
        let told = Arc::new(Count(Default::default()));
        let sub = bus.subscribe_bounded(3, usize::MAX, told.clone());
        let all = bus.subscribe();
        for _ in 0..5 {
            bus.emit(jsc("j", JobStatus::Running));
        }
        // Three queued, the fourth overflowed; told once.
        assert!(sub.overflowed());
        assert_eq!(sub.len(), 3);
        assert_eq!(told.0.load(std::sync::atomic::Ordering::Relaxed), 1);
        let seqs: Vec<u64> = std::iter::from_fn(|| sub.next_blocking())
            .map(|e| e.seq)
            .collect();
        assert_eq!(seqs, vec![1, 2, 3]);
        // Other subscribers lose nothing.
        assert_eq!(all.len(), 5);
        assert!(!all.overflowed());
    }

    #[test]
    fn a_receiver_that_fell_behind_gets_a_repeating_event_once() {
        struct Never;
        impl Notify for Never {
            fn notify(&self) {
                panic!("overflowed");
            }
        }
        let bus = EventBus::new();
        let sub = bus.subscribe_bounded(100, 2, Arc::new(Never));
        let running = || jsc("j", JobStatus::Running);
        // Below the threshold repeats are kept.
        bus.emit(running());
        bus.emit(running());
        // From it on, only a change is queued.
        for _ in 0..1000 {
            bus.emit(running());
        }
        bus.emit(jsc("j", JobStatus::Paused));
        bus.emit(running());
        for _ in 0..1000 {
            bus.emit(running());
        }
        let got: Vec<_> = std::iter::from_fn(|| sub.try_next())
            .map(|e| e.seq)
            .collect();
        assert_eq!(got, vec![1, 2, 1003, 1004]);
        // Drained: repeats are queued again.
        bus.emit(running());
        bus.emit(running());
        assert_eq!(sub.len(), 2);
    }

    #[test]
    fn dropped_subscription_is_removed() {
        let bus = EventBus::new();
        let a = bus.subscribe();
        drop(a);
        bus.emit(jsc("x", JobStatus::Created));
        assert!(bus.lock().sinks.is_empty());
    }

    #[test]
    fn wait_queued_takes_nothing_and_ends_when_closed_and_empty() {
        let bus = EventBus::new();
        let s = Arc::new(bus.subscribe());
        let waiter = {
            let s = s.clone();
            std::thread::spawn(move || s.wait_queued())
        };
        bus.emit(jsc("x", JobStatus::Created));
        assert!(waiter.join().unwrap());
        assert_eq!(s.len(), 1, "wait_queued must not pop");
        s.close();
        // Closed but not empty: still true until the queue is drained.
        assert!(s.wait_queued());
        assert!(s.try_next().is_some());
        assert!(!s.wait_queued());
    }

    #[test]
    fn closing_wakes_a_blocked_reader_after_the_queue_drains() {
        let bus = EventBus::new();
        let s = bus.subscribe();
        let closer = s.closer();
        bus.emit(jsc("x", JobStatus::Created));
        let t = std::thread::spawn(move || {
            let mut n = 0;
            while s.next_blocking().is_some() {
                n += 1;
            }
            n
        });
        std::thread::sleep(Duration::from_millis(20));
        bus.emit(jsc("x", JobStatus::Running));
        closer.close();
        bus.emit(jsc("x", JobStatus::Paused));
        assert_eq!(t.join().unwrap(), 2);
    }

    #[test]
    fn qmp_json_has_qemu_shape() {
        let bus = EventBus::new();
        let s = bus.subscribe();
        bus.emit(EventData::BlockJobCompleted {
            progress: JobProgressData {
                job_type: JobType::Mirror,
                device: "job0".into(),
                len: 10,
                offset: 3,
                speed: 0,
            },
            error: Some("Input/output error".into()),
        });
        let v = s.try_next().unwrap().to_qmp_value();
        assert_eq!(v["event"], "BLOCK_JOB_COMPLETED");
        assert_eq!(v["data"]["error"], "Input/output error");
        assert_eq!(v["data"]["type"], "mirror");
        assert!(v["timestamp"]["seconds"].as_i64().unwrap() > 1_600_000_000);
        assert!(v["timestamp"]["microseconds"].as_i64().unwrap() < 1_000_000);
    }
}
