//! Scenarios run twice: on a live qemu-storage-daemon and on our QMP
//! dispatcher (`blockjob::qmp::execute`, the code `blockjob daemon` and
//! `bj_qmp_execute` run), compared by their replies and events.

use std::time::Duration;

use blockjob::Context;
use blockjob::events::Subscription;
use serde_json::{Value, json};

use super::qmp::Daemon;

/// One side of the comparison: QMP commands in, events out.
pub trait Side {
    /// Run a command: its return value, or `Class: desc`.
    fn cmd(&mut self, name: &str, args: Value) -> Result<Value, String>;
    /// The next event within `d`.
    fn event_within(&mut self, d: Duration) -> Option<Value>;
    /// The next event (10 s at most).
    fn event(&mut self) -> Option<Value> {
        self.event_within(Duration::from_secs(10))
    }
    /// Events that come with or right after a command's reply.
    fn event_quick(&mut self) -> Option<Value> {
        self.event_within(Duration::from_millis(300))
    }
}

/// Safe `block-export-del` of an export whose clients have exited: the
/// server sees their EOF on its own threads, so for a moment it may still
/// count them (`export 'X' still in use`, as QEMU can until its main loop
/// has run); retried for up to 5 s, never longer.
pub fn del_export_when_idle(side: &mut dyn Side, id: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        match side.cmd("block-export-del", json!({ "id": id })) {
            Ok(_) => return,
            Err(e) if e == format!("GenericError: export '{id}' still in use") => {
                assert!(std::time::Instant::now() < deadline, "{e} for 5 s");
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("block-export-del {id}: {e}"),
        }
    }
}

impl Side for Daemon {
    fn cmd(&mut self, name: &str, args: Value) -> Result<Value, String> {
        self.qmp
            .execute(name, args)
            .map_err(|e| format!("{}: {}", e.class, e.desc))
    }
    fn event_within(&mut self, d: Duration) -> Option<Value> {
        self.qmp.next_event(d)
    }
}

/// Our side: a context, its events, and the QMP dispatcher.
pub struct Ours {
    pub ctx: Context,
    events: Subscription,
}

impl Ours {
    pub fn new() -> Ours {
        let ctx = Context::new();
        let events = ctx.subscribe();
        Ours { ctx, events }
    }
}

impl Side for Ours {
    fn cmd(&mut self, name: &str, args: Value) -> Result<Value, String> {
        let r = blockjob::qmp::execute(&self.ctx, &json!({"execute": name, "arguments": args}));
        match r.get("error") {
            Some(e) => Err(format!(
                "{}: {}",
                e["class"].as_str().unwrap_or("?"),
                e["desc"].as_str().unwrap_or("?")
            )),
            None => {
                let mut v = r["return"].clone();
                if matches!(name, "query-block-jobs" | "query-jobs") {
                    strip_extensions(&mut v);
                }
                Ok(v)
            }
        }
    }
    fn event_within(&mut self, d: Duration) -> Option<Value> {
        self.events.next_timeout(d).map(|e| e.to_qmp_value())
    }
}

/// Drops our `x-` members (rates, ETA) from each job of a query's list:
/// QEMU has none, and QEMU clients ignore them.
pub fn strip_extensions(v: &mut Value) {
    if let Value::Array(jobs) = v {
        for j in jobs {
            if let Value::Object(m) = j {
                m.retain(|k, _| !k.starts_with("x-"));
            }
        }
    }
}

/// JSON text with object keys sorted (QEMU's key order is a hash order).
pub fn canonical(v: &Value) -> String {
    match v {
        Value::Object(m) => {
            let mut keys: Vec<_> = m.keys().collect();
            keys.sort();
            let items: Vec<String> = keys
                .iter()
                .map(|k| format!("{}:{}", Value::String((*k).clone()), canonical(&m[*k])))
                .collect();
            format!("{{{}}}", items.join(","))
        }
        Value::Array(a) => format!(
            "[{}]",
            a.iter().map(canonical).collect::<Vec<_>>().join(",")
        ),
        other => other.to_string(),
    }
}

/// Our context with an NBD server on `dir/ours.sock` (and that path).
pub fn ours_nbd_server(dir: &std::path::Path) -> (Ours, std::path::PathBuf) {
    let mut o = Ours::new();
    let sock = dir.join("ours.sock");
    o.cmd(
        "nbd-server-start",
        serde_json::json!({"addr": {"type": "unix", "data": {"path": sock}}}),
    )
    .unwrap();
    (o, sock)
}
