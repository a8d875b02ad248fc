//! QMP: QEMU's monitor protocol over our Rust API.
//!
//! [`Session`] is one monitor connection's protocol state: the greeting,
//! capabilities negotiation, requests split out of a byte stream (several
//! per read, or one across reads) by [`json_stream`] as QEMU's JSON
//! streamer splits them, replies with the request's `id`, and QEMU's error
//! classes and texts for malformed input. [`execute`] runs one
//! command object without a session (the C ABI's `bj_qmp_execute`).
//! Commands and their arguments are in [`commands`]. [`server`] serves
//! sessions to the clients of a listening UNIX socket (the daemon's
//! monitors, a C host's `bj_qmp_server_new`), bound with [`socket`].

mod client;
pub mod commands;
pub mod json_stream;
pub mod object;
pub mod server;
pub mod socket;

pub use server::{QmpServer, QmpServerOptions};

use serde_json::{Map, Value, json};

use crate::context::Context;
use crate::error::{Error, ErrorClass};

/// What QEMU 10 says it is in the greeting and `query-version`.
pub const VERSION: (u64, u64, u64) = (10, 0, 2);

/// The greeting a monitor sends first.
pub fn greeting() -> Value {
    json!({"QMP": {"version": version(), "capabilities": ["oob"]}})
}

/// `query-version`'s value (members in the order QEMU writes them).
pub fn version() -> Value {
    let (major, minor, micro) = VERSION;
    json!({"qemu": {"micro": micro, "minor": minor, "major": major},
        "package": concat!("blockjob ", env!("CARGO_PKG_VERSION"))})
}

/// An error reply; with an `id`, QEMU writes it first (its dictionary's
/// order: `{"id": …, "error": …}`, while a `return` comes before the `id`).
fn error_reply(e: &Error, id: Option<&Value>) -> Value {
    let mut r = Map::new();
    if let Some(id) = id {
        r.insert("id".into(), id.clone());
    }
    r.insert(
        "error".into(),
        json!({"class": e.class().to_string(), "desc": e.message()}),
    );
    Value::Object(r)
}

/// Whether a session has negotiated capabilities.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Only `qmp_capabilities` is accepted.
    Negotiation,
    /// Commands and events.
    Command,
}

/// One monitor connection.
pub struct Session<'a> {
    ctx: &'a Context,
    mode: Mode,
    /// The input so far, lexed once, cut into values.
    input: json_stream::JsonStream,
    quit: bool,
}

impl<'a> Session<'a> {
    /// A new connection (send [`greeting`] first).
    pub fn new(ctx: &'a Context) -> Self {
        Session {
            ctx,
            mode: Mode::Negotiation,
            input: json_stream::JsonStream::new(),
            quit: false,
        }
    }

    /// Capabilities are negotiated: events may be sent.
    pub fn in_command_mode(&self) -> bool {
        self.mode == Mode::Command
    }

    /// `quit` was executed.
    pub fn quit_requested(&self) -> bool {
        self.quit
    }

    /// Take bytes from the client; the replies to every request they
    /// complete, in order.
    pub fn feed(&mut self, bytes: &[u8]) -> Vec<Value> {
        self.push(bytes);
        std::iter::from_fn(|| self.next_reply()).collect()
    }

    /// Take bytes from the client without executing anything yet (see
    /// [`Session::next_reply`]).
    pub fn push(&mut self, bytes: &[u8]) {
        self.input.feed(bytes);
    }

    /// Execute the next complete request taken so far (or answer the
    /// next piece of malformed input): its reply, or `None` when what is
    /// left is not a whole request yet. One request at a time, so that a
    /// server can send the events a command caused before that command's
    /// reply and before the next command runs.
    pub fn next_reply(&mut self) -> Option<Value> {
        match self.input.pop()? {
            Ok(v) => Some(self.request(v)),
            Err(text) => Some(error_reply(&Error::generic(text), None)),
        }
    }

    /// One parsed request.
    pub fn request(&mut self, v: Value) -> Value {
        let Value::Object(req) = v else {
            return error_reply(&Error::generic("QMP input must be a JSON object"), None);
        };
        let id = req.get("id").cloned();
        match self.check_and_run(&req) {
            Ok(ret) => {
                let mut r = json!({ "return": ret });
                if let Some(id) = id {
                    r["id"] = id;
                }
                r
            }
            Err(e) => error_reply(&e, id.as_ref()),
        }
    }

    fn check_and_run(&mut self, req: &Map<String, Value>) -> Result<Value, Error> {
        let (name, args) = parse_request(req)?;
        match (self.mode, name.as_str()) {
            (Mode::Negotiation, "qmp_capabilities") => {
                commands::check_capabilities(&args)?;
                self.mode = Mode::Command;
                Ok(json!({}))
            }
            (Mode::Negotiation, _) => Err(Error::with_class(
                ErrorClass::CommandNotFound,
                "Expecting capabilities negotiation with 'qmp_capabilities'",
            )),
            (Mode::Command, "qmp_capabilities") => Err(Error::with_class(
                ErrorClass::CommandNotFound,
                "Capabilities negotiation is already complete, command ignored",
            )),
            (Mode::Command, "quit") => {
                commands::no_arguments(&args)?;
                self.quit = true;
                Ok(json!({}))
            }
            (Mode::Command, n) => commands::dispatch(self.ctx, n, &args),
        }
    }
}

/// QEMU's checks of the request object itself, in its order: each
/// member in turn (QEMU's order is its hash table's, ours the input's;
/// they agree when one member is wrong), then the command's name.
fn parse_request(req: &Map<String, Value>) -> Result<(String, Value), Error> {
    for (k, v) in req {
        match k.as_str() {
            "execute" | "exec-oob" if !v.is_string() => {
                return Err(Error::generic(format!(
                    "QMP input member '{k}' must be a string"
                )));
            }
            "arguments" if !v.is_object() => {
                return Err(Error::generic(
                    "QMP input member 'arguments' must be an object",
                ));
            }
            "execute" | "exec-oob" | "arguments" | "id" => {}
            _ => {
                return Err(Error::generic(format!(
                    "QMP input member '{k}' is unexpected"
                )));
            }
        }
    }
    let (name, oob) = match (req.get("execute"), req.get("exec-oob")) {
        (Some(_), Some(_)) => {
            return Err(Error::generic(
                "QMP input must have either 'execute' or 'exec-oob'",
            ));
        }
        (Some(n), None) => (n, false),
        (None, Some(n)) => (n, true),
        (None, None) => return Err(Error::generic("QMP input lacks member 'execute'")),
    };
    let key = if oob { "exec-oob" } else { "execute" };
    let Value::String(name) = name else {
        return Err(Error::generic(format!(
            "QMP input member '{key}' must be a string"
        )));
    };
    let args = match req.get("arguments") {
        None => Value::Object(Map::new()),
        Some(a @ Value::Object(_)) => a.clone(),
        Some(_) => {
            return Err(Error::generic(
                "QMP input member 'arguments' must be an object",
            ));
        }
    };
    if oob {
        return Err(Error::generic(format!(
            "The command {name} does not support OOB"
        )));
    }
    Ok((name.clone(), args))
}

/// Run one QMP command object (`{"execute": …, "arguments": …}`) on
/// `ctx`, as a monitor in command mode would: the reply object.
pub fn execute(ctx: &Context, request: &Value) -> Value {
    let mut s = Session::new(ctx);
    s.mode = Mode::Command;
    s.request(request.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negotiation_comes_first() {
        let ctx = Context::new();
        let mut s = Session::new(&ctx);
        let r = s.feed(br#"{"execute":"query-jobs"}"#);
        assert_eq!(r[0]["error"]["class"], "CommandNotFound");
        assert_eq!(
            r[0]["error"]["desc"],
            "Expecting capabilities negotiation with 'qmp_capabilities'"
        );
        let r = s.feed(br#"{"execute":"qmp_capabilities","id":7}"#);
        assert_eq!(r[0], json!({"return": {}, "id": 7}));
        let r = s.feed(br#"{"execute":"qmp_capabilities"}"#);
        assert_eq!(r[0]["error"]["class"], "CommandNotFound");
        let r = s.feed(br#"{"execute":"query-jobs"}"#);
        assert_eq!(r[0], json!({"return": []}));
    }

    #[test]
    fn several_requests_in_one_read_and_one_across_reads() {
        let ctx = Context::new();
        let mut s = Session::new(&ctx);
        let r = s.feed(
            b"{\"execute\":\"qmp_capabilities\"}\n{\"execute\":\"query-jobs\",\"id\":\"a\"} {\"exe",
        );
        assert_eq!(r.len(), 2);
        assert_eq!(r[1]["id"], "a");
        assert!(s.feed(b"cute\":\"query-block").is_empty());
        let r = s.feed(b"-jobs\"}");
        assert_eq!(r, vec![json!({"return": []})]);
    }

    #[test]
    fn malformed_input_gets_qemus_errors() {
        let ctx = Context::new();
        let mut s = Session::new(&ctx);
        s.feed(br#"{"execute":"qmp_capabilities"}"#);
        let desc = |s: &mut Session, input: &[u8]| -> String {
            let r = s.feed(input);
            r[0]["error"]["desc"].as_str().unwrap().to_string()
        };
        assert_eq!(desc(&mut s, b"[1]"), "QMP input must be a JSON object");
        assert_eq!(
            desc(&mut s, br#"{"id":1}"#),
            "QMP input lacks member 'execute'"
        );
        assert_eq!(
            desc(&mut s, br#"{"execute":1}"#),
            "QMP input member 'execute' must be a string"
        );
        assert_eq!(
            desc(&mut s, br#"{"execute":"query-jobs","arguments":[]}"#),
            "QMP input member 'arguments' must be an object"
        );
        assert_eq!(
            desc(&mut s, br#"{"execute":"query-jobs","x":1}"#),
            "QMP input member 'x' is unexpected"
        );
        assert_eq!(
            desc(&mut s, br#"{"execute":"nope"}"#),
            "The command nope has not been found"
        );
        assert!(desc(&mut s, b"{\"execute\" ] }\n").starts_with("JSON parse error"));
        // And the session still works.
        assert_eq!(
            s.feed(br#"{"execute":"query-jobs"}"#),
            vec![json!({"return": []})]
        );
    }
}
