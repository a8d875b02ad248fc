//! `blockjob daemon`'s command line: qemu-storage-daemon's options (the
//! ones we support) with its parsing rules and error texts.
//!
//! - The options themselves are parsed as QSD's `getopt_long` does:
//!   `--opt VALUE` or `--opt=VALUE`, unambiguous prefixes (`--pid`), `-V`,
//!   `-h`, `--` ends the options; anything else is refused with glibc's
//!   text (`unrecognized option '--foo'`, `invalid option -- 'x'`).
//! - `--blockdev` is JSON when it starts with `{`, otherwise QEMU's
//!   keyval syntax ([`keyval_parse`]): `key=value` pairs, `,,` for a
//!   comma, dotted keys for nested objects, numeric fragments for lists,
//!   the first pair may omit `driver=`. keyval values are strings; QEMU's
//!   visitor converts them by the QAPI schema, we convert the members of
//!   the drivers we support that are booleans or integers
//!   ([`blockdev_from_keyval`]), with QEMU's texts for bad values.
//! - `--monitor` is keyval with the implied key `chardev`; `--chardev` is
//!   QemuOpts (a bare `server` means `server=on`).

use serde_json::{Map, Value};

/// One option that QSD processes in command-line order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Opt {
    /// `--blockdev TEXT`.
    Blockdev(String),
    /// `--chardev TEXT`.
    Chardev(String),
    /// `--monitor TEXT`.
    Monitor(String),
}

/// A parsed command line.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct DaemonArgs {
    /// `--blockdev`, `--chardev`, `--monitor` in order.
    pub opts: Vec<Opt>,
    /// `--pidfile`.
    pub pidfile: Option<String>,
    /// `--daemonize`.
    pub daemonize: bool,
}

/// What the command line asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    /// Run the daemon.
    Run(DaemonArgs),
    /// `-h`/`--help`.
    Help,
    /// `-V`/`--version`.
    Version,
}

/// The help text (QSD's, for what we support).
pub const HELP: &str = "\
Usage: blockjob daemon [options]
QEMU storage daemon (blockjob)

  -h, --help             display this help and exit
  -V, --version          output version information and exit

  --blockdev [driver=]<driver>[,node-name=<N>][,discard=ignore|unmap]
             [,cache.direct=on|off][,cache.no-flush=on|off]
             [,read-only=on|off][,auto-read-only=on|off]
             [,force-share=on|off][,detect-zeroes=on|off|unmap]
             [,driver specific parameters...]
                         configure a block backend (or a JSON object)

  --chardev socket,id=<id>,path=<path>,server=on,wait=off
                         configure a character device backend
                         (UNIX sockets only)

  --daemonize            daemonize the process, and have the parent exit
                         once startup is complete

  --monitor [chardev=]name[,mode=control][,pretty=on|off]
                         configure a QMP monitor

  --pidfile <path>       write process ID to a file after startup

Not supported: --export, --nbd-server, --object, -T/--trace.
";

#[derive(Clone, Copy, PartialEq, Eq)]
enum Arg {
    None,
    Required,
}

/// QSD's long options (getopt_long table).
const LONG: &[(&str, Arg)] = &[
    ("help", Arg::None),
    ("trace", Arg::Required),
    ("version", Arg::None),
    ("blockdev", Arg::Required),
    ("chardev", Arg::Required),
    ("daemonize", Arg::None),
    ("export", Arg::Required),
    ("monitor", Arg::Required),
    ("nbd-server", Arg::Required),
    ("object", Arg::Required),
    ("pidfile", Arg::Required),
];

/// Parse the arguments after `daemon`.
pub fn parse_args(args: &[String]) -> Result<Parsed, String> {
    let mut out = DaemonArgs::default();
    let mut i = 0;
    while i < args.len() {
        let a = &args[i];
        i += 1;
        if a == "--" {
            if let Some(extra) = args.get(i) {
                return Err(format!("{extra}: Unexpected argument"));
            }
            break;
        }
        if let Some(long) = a.strip_prefix("--") {
            let (name, inline) = match long.split_once('=') {
                Some((n, v)) => (n, Some(v.to_string())),
                None => (long, None),
            };
            let (name, kind) = find_long(name)?;
            let value = match (kind, inline) {
                (Arg::None, Some(_)) => {
                    return Err(format!("option '--{name}' doesn't allow an argument"));
                }
                (Arg::None, None) => None,
                (Arg::Required, Some(v)) => Some(v),
                (Arg::Required, None) => match args.get(i) {
                    Some(v) => {
                        i += 1;
                        Some(v.clone())
                    }
                    None => return Err(format!("option '--{name}' requires an argument")),
                },
            };
            let value = value.unwrap_or_default();
            match name {
                "help" => return Ok(Parsed::Help),
                "version" => return Ok(Parsed::Version),
                "blockdev" => out.opts.push(Opt::Blockdev(value)),
                "chardev" => out.opts.push(Opt::Chardev(value)),
                "monitor" => out.opts.push(Opt::Monitor(value)),
                "daemonize" => out.daemonize = true,
                "pidfile" => out.pidfile = Some(value),
                other => {
                    return Err(format!(
                        "--{other} {value}: option '--{other}' is not supported by blockjob"
                    ));
                }
            }
        } else if a.len() > 1 && a.starts_with('-') {
            // A cluster of short options: -h, -V, -T ARG; the first one
            // decides (help and version exit, the rest are refused).
            let mut chars = a[1..].chars();
            return match chars.next() {
                Some('h') => Ok(Parsed::Help),
                Some('V') => Ok(Parsed::Version),
                Some('T') if chars.as_str().is_empty() && i >= args.len() => {
                    Err("option requires an argument -- 'T'".into())
                }
                Some('T') => Err("-T: option '--trace' is not supported by blockjob".into()),
                Some(other) => Err(format!("invalid option -- '{other}'")),
                None => Err(format!("{a}: Unexpected argument")),
            };
        } else {
            return Err(format!("{a}: Unexpected argument"));
        }
    }
    Ok(Parsed::Run(out))
}

/// glibc's long-option lookup: an exact name, or a unique prefix.
fn find_long(name: &str) -> Result<(&'static str, Arg), String> {
    if let Some(&(n, k)) = LONG.iter().find(|(n, _)| *n == name) {
        return Ok((n, k));
    }
    let hits: Vec<_> = LONG
        .iter()
        .filter(|(n, _)| !name.is_empty() && n.starts_with(name))
        .collect();
    match hits.as_slice() {
        [(n, k)] => Ok((n, *k)),
        [] => Err(format!("unrecognized option '--{name}'")),
        many => {
            let names: Vec<String> = many.iter().map(|(n, _)| format!("'--{n}'")).collect();
            Err(format!(
                "option '--{name}' is ambiguous; possibilities: {}",
                names.join(" ")
            ))
        }
    }
}

// ---- keyval ---------------------------------------------------------------------

/// QEMU's `keyval_parse`: `key=value,...` into nested objects of strings
/// (lists where every key of an object is a number). `implied` is the key
/// of a first pair given without `key=`.
pub fn keyval_parse(s: &str, implied: Option<&str>) -> Result<Map<String, Value>, String> {
    let b = s.as_bytes();
    let mut root = Map::new();
    let mut i = 0;
    let mut first = true;
    while i < b.len() {
        let start = i;
        let mut j = i;
        while j < b.len() && b[j] != b'=' && b[j] != b',' {
            j += 1;
        }
        let key = if j < b.len() && b[j] == b'=' {
            i = j + 1;
            s[start..j].to_string()
        } else if first && j > start && implied.is_some() {
            // The value starts right here (QEMU's val-no-key).
            implied.unwrap_or_default().to_string()
        } else {
            return Err(format!("Expected '=' after parameter '{}'", &s[start..j]));
        };
        first = false;
        if key.split('.').any(|f| f.is_empty() || f.len() > 127) {
            return Err(format!("Invalid parameter '{key}'"));
        }
        let mut val = Vec::new();
        while i < b.len() {
            if b[i] == b',' {
                if b.get(i + 1) == Some(&b',') {
                    val.push(b',');
                    i += 2;
                    continue;
                }
                i += 1;
                break;
            }
            val.push(b[i]);
            i += 1;
        }
        // Only ASCII commas were removed: still UTF-8.
        let val = String::from_utf8(val).map_err(|_| "Invalid UTF-8".to_string())?;
        insert(&mut root, &key, val)?;
    }
    let mut out = Map::new();
    for (k, v) in root {
        let v = listify(v, &k)?;
        out.insert(k, v);
    }
    Ok(out)
}

fn insert(root: &mut Map<String, Value>, key: &str, val: String) -> Result<(), String> {
    let frags: Vec<&str> = key.split('.').collect();
    let (last, inner) = frags.split_last().expect("split yields one fragment");
    let mut cur = root;
    for (n, f) in inner.iter().enumerate() {
        let entry = cur
            .entry(f.to_string())
            .or_insert_with(|| Value::Object(Map::new()));
        cur = match entry {
            Value::Object(m) => m,
            _ => {
                return Err(format!(
                    "Parameters '{}.*' used inconsistently",
                    frags[..=n].join(".")
                ));
            }
        };
    }
    if let Some(Value::Object(_)) = cur.get(*last) {
        return Err(format!("Parameters '{key}.*' used inconsistently"));
    }
    // A repeated key: the last value wins, as in QEMU.
    cur.insert(last.to_string(), Value::String(val));
    Ok(())
}

fn index_of(k: &str) -> Option<usize> {
    if k.is_empty() || !k.bytes().all(|c| c.is_ascii_digit()) {
        return None;
    }
    k.parse().ok().filter(|&n: &usize| n <= i32::MAX as usize)
}

/// QEMU's `keyval_listify`: objects whose keys are all numbers become lists.
fn listify(v: Value, path: &str) -> Result<Value, String> {
    let Value::Object(m) = v else { return Ok(v) };
    let numbered = m.keys().filter(|k| index_of(k).is_some()).count();
    if numbered != 0 && numbered != m.len() {
        return Err(format!("Parameters '{path}.*' used inconsistently"));
    }
    let mut children = Vec::with_capacity(m.len());
    for (k, c) in m {
        let c = listify(c, &format!("{path}.{k}"))?;
        children.push((k, c));
    }
    if numbered == 0 {
        return Ok(Value::Object(children.into_iter().collect()));
    }
    let mut slots: Vec<Option<Value>> = vec![None; children.len()];
    for (k, c) in children {
        let n = index_of(&k).unwrap_or(usize::MAX);
        match slots.get_mut(n) {
            Some(slot @ None) => *slot = Some(c),
            _ => {
                // Past the end (a gap) or a duplicate ("0" and "00").
                let missing = slots.iter().position(Option::is_none).unwrap_or(0);
                return Err(format!("Parameter '{path}.{missing}' missing"));
            }
        }
    }
    Ok(Value::Array(
        slots.into_iter().map(Option::unwrap_or_default).collect(),
    ))
}

/// Boolean members of the drivers we support (blockdev-add's schema).
const BOOL_MEMBERS: &[&str] = &[
    "read-only",
    "auto-read-only",
    "force-share",
    "direct",
    "no-flush",
    "drop-cache",
    "x-check-cache-dropped",
    "read-zeroes",
    "lazy-refcounts",
    "pass-discard-request",
    "pass-discard-snapshot",
    "pass-discard-other",
    "discard-no-unref",
    "once",
    "immediately",
];

/// Integer members of the drivers we support.
const INT_MEMBERS: &[&str] = &[
    "size",
    "latency-ns",
    "offset",
    "aio-max-batch",
    "cache-size",
    "l2-cache-size",
    "l2-cache-entry-size",
    "refcount-cache-size",
    "cache-clean-interval",
    "align",
    "max-transfer",
    "opt-write-zero",
    "max-write-zero",
    "opt-discard",
    "max-discard",
    "state",
    "new_state",
    "errno",
    "sector",
];

/// QEMU's `qapi_bool_parse`.
pub fn parse_bool(s: &str) -> Option<bool> {
    match s {
        "on" | "yes" | "true" | "y" => Some(true),
        "off" | "no" | "false" | "n" => Some(false),
        _ => None,
    }
}

/// QEMU's `qemu_strtoi64(s, NULL, 0, …)`: leading blanks, a sign, `0x`
/// hex or `0` octal, the whole string.
pub fn parse_int(s: &str) -> Option<i64> {
    let t = s.trim_start_matches([' ', '\t', '\n', '\r', '\x0b', '\x0c']);
    let (neg, t) = match t.as_bytes().first() {
        Some(b'-') => (true, &t[1..]),
        Some(b'+') => (false, &t[1..]),
        _ => (false, t),
    };
    let (radix, digits) = if let Some(h) = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        (16, h)
    } else if t.len() > 1 && t.starts_with('0') {
        (8, &t[1..])
    } else {
        (10, t)
    };
    if digits.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
        return None;
    }
    let mag = u64::from_str_radix(digits, radix).ok()?;
    if neg {
        0i64.checked_sub_unsigned(mag)
    } else {
        i64::try_from(mag).ok()
    }
}

/// blockdev-add's typed JSON from a keyval `--blockdev`: the boolean and
/// integer members converted, `backing=` (empty) meaning null, as QEMU's
/// keyval visitor does for these members. Other values stay strings.
pub fn blockdev_from_keyval(text: &str) -> Result<Value, String> {
    let mut v = Value::Object(keyval_parse(text, Some("driver"))?);
    type_members(&mut v, "", "")?;
    Ok(v)
}

fn type_members(v: &mut Value, path: &str, member: &str) -> Result<(), String> {
    let join = |k: &str| {
        if path.is_empty() {
            k.to_string()
        } else {
            format!("{path}.{k}")
        }
    };
    match v {
        Value::Object(m) => {
            for (k, c) in m.iter_mut() {
                type_members(c, &join(k), k)?;
            }
        }
        Value::Array(a) => {
            for (n, c) in a.iter_mut().enumerate() {
                type_members(c, &join(&n.to_string()), member)?;
            }
        }
        Value::String(s) => {
            if BOOL_MEMBERS.contains(&member) {
                *v = Value::Bool(
                    parse_bool(s)
                        .ok_or_else(|| format!("Parameter '{path}' expects 'on' or 'off'"))?,
                );
            } else if INT_MEMBERS.contains(&member) {
                *v = Value::from(
                    parse_int(s).ok_or_else(|| format!("Parameter '{path}' expects integer"))?,
                );
            } else if member == "backing" && s.is_empty() {
                *v = Value::Null;
            }
        }
        _ => {}
    }
    Ok(())
}

/// A `--blockdev` argument as blockdev-add's JSON.
pub fn blockdev_options(text: &str) -> Result<Value, String> {
    if text.starts_with('{') {
        let v: Value = serde_json::from_str(text).map_err(|e| {
            let s = e.to_string();
            let s = s.split(" at line ").next().unwrap_or(&s).to_string();
            format!("JSON parse error, {s}")
        })?;
        Ok(v)
    } else {
        blockdev_from_keyval(text)
    }
}

// ---- --monitor and --chardev ------------------------------------------------

/// A `--monitor`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MonitorOpts {
    /// The chardev it serves.
    pub chardev: String,
    /// `pretty=on`.
    pub pretty: bool,
}

/// Parse `--monitor [chardev=]name[,mode=control][,pretty=on|off][,id=ID]`.
pub fn parse_monitor(text: &str) -> Result<MonitorOpts, String> {
    let m = keyval_parse(text, Some("chardev"))?;
    let mut chardev = None;
    let mut pretty = false;
    let mut mode_control = true;
    for (k, v) in &m {
        let Value::String(s) = v else {
            return Err(format!(
                "Invalid parameter type for '{k}', expected: string"
            ));
        };
        match k.as_str() {
            "id" => {}
            "chardev" => chardev = Some(s.clone()),
            "pretty" => {
                pretty =
                    parse_bool(s).ok_or_else(|| format!("Parameter '{k}' expects 'on' or 'off'"))?
            }
            "mode" => match s.as_str() {
                "control" => mode_control = true,
                "readline" => mode_control = false,
                _ => return Err(format!("Parameter 'mode' does not accept value '{s}'")),
            },
            _ => return Err(format!("Parameter '{k}' is unexpected")),
        }
    }
    let chardev = chardev.ok_or("Parameter 'chardev' is missing")?;
    if !mode_control {
        return Err("Only QMP is supported".into());
    }
    Ok(MonitorOpts { chardev, pretty })
}

/// A `--chardev socket,...` listening on a UNIX socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChardevOpts {
    /// `id`.
    pub id: String,
    /// `path`.
    pub path: String,
}

/// QEMU's character device backends (the ones we refuse by name).
const CHAR_BACKENDS: &[&str] = &[
    "null",
    "socket",
    "udp",
    "msmouse",
    "wctablet",
    "memory",
    "ringbuf",
    "file",
    "stdio",
    "pipe",
    "pty",
    "serial",
    "tty",
    "parallel",
    "parport",
    "braille",
    "spicevmc",
    "spiceport",
    "qemu-vdagent",
    "dbus",
    "testdev",
    "vc",
    "mux",
];

/// QemuOpts' rule for an id: a letter, then letters, digits, `-`, `.`, `_`.
fn valid_id(s: &str) -> bool {
    let mut c = s.chars();
    c.next().is_some_and(|f| f.is_ascii_alphabetic())
        && c.all(|x| x.is_ascii_alphanumeric() || matches!(x, '-' | '.' | '_'))
}

/// Parse `--chardev socket,id=ID,path=PATH,server=on,wait=off`.
pub fn parse_chardev(text: &str) -> Result<ChardevOpts, String> {
    // QemuOpts: "backend" is implied; a bare key means key=on.
    let mut backend = None;
    let mut pairs: Vec<(String, String)> = Vec::new();
    let b = text.as_bytes();
    let mut i = 0;
    while i < b.len() {
        let mut item = Vec::new();
        while i < b.len() {
            if b[i] == b',' {
                if b.get(i + 1) == Some(&b',') {
                    item.push(b',');
                    i += 2;
                    continue;
                }
                i += 1;
                break;
            }
            item.push(b[i]);
            i += 1;
        }
        let item = String::from_utf8(item).map_err(|_| "Invalid UTF-8".to_string())?;
        match item.split_once('=') {
            None if backend.is_none() && pairs.is_empty() => backend = Some(item),
            None => pairs.push((item, "on".into())),
            Some((k, v)) => pairs.push((k.to_string(), v.to_string())),
        }
    }
    let mut id = None;
    let mut path = None;
    let mut server = false;
    let mut wait = true;
    for (k, v) in &pairs {
        let flag = || parse_bool(v).ok_or_else(|| format!("Parameter '{k}' expects 'on' or 'off'"));
        match k.as_str() {
            "backend" => backend = Some(v.clone()),
            "id" => {
                if !valid_id(v) {
                    return Err("Parameter 'id' expects an identifier".into());
                }
                id = Some(v.clone());
            }
            "path" => path = Some(v.clone()),
            "server" => server = flag()?,
            "wait" => wait = flag()?,
            "host" | "port" | "to" | "ipv4" | "ipv6" | "fd" | "abstract" | "tight" => {
                return Err(format!(
                    "'{k}' is not supported by blockjob: only UNIX socket servers \
                     (socket,id=ID,path=PATH,server=on,wait=off)"
                ));
            }
            "telnet" | "tn3270" | "websocket" | "reconnect" | "reconnect-ms" | "nodelay"
            | "delay" | "tls-creds" | "tls-authz" | "mux" | "logfile" | "logappend" => {
                return Err(format!("Parameter '{k}' is not supported by blockjob"));
            }
            _ => return Err(format!("Invalid parameter '{k}'")),
        }
    }
    let backend = backend.unwrap_or_default();
    if backend != "socket" {
        if CHAR_BACKENDS.contains(&backend.as_str()) {
            return Err(format!(
                "chardev backend '{backend}' is not supported by blockjob (only 'socket')"
            ));
        }
        return Err(format!("'{backend}' is not a valid char driver name"));
    }
    let id = id.ok_or("chardev: no id specified")?;
    let path = path
        .ok_or("chardev: socket: no path given (blockjob supports UNIX sockets only: path=PATH)")?;
    if !server {
        return Err("client sockets are not supported by blockjob; use server=on,wait=off".into());
    }
    if wait {
        return Err("wait=on is not supported by blockjob; use server=on,wait=off".into());
    }
    Ok(ChardevOpts { id, path })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn args(a: &[&str]) -> Result<Parsed, String> {
        parse_args(&a.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn getopt_rules() {
        let Parsed::Run(r) = args(&[
            "--blockdev=driver=null-co",
            "--chard",
            "socket,id=m",
            "--monitor",
            "m",
            "--daemonize",
            "--pidfile",
            "p",
        ])
        .unwrap() else {
            panic!()
        };
        assert_eq!(
            r.opts,
            vec![
                Opt::Blockdev("driver=null-co".into()),
                Opt::Chardev("socket,id=m".into()),
                Opt::Monitor("m".into())
            ]
        );
        assert!(r.daemonize);
        assert_eq!(r.pidfile.as_deref(), Some("p"));
        assert_eq!(args(&["-V"]), Ok(Parsed::Version));
        assert_eq!(args(&["--help"]), Ok(Parsed::Help));
        assert_eq!(
            args(&["--foo"]),
            Err("unrecognized option '--foo'".to_string())
        );
        assert_eq!(args(&["-x"]), Err("invalid option -- 'x'".to_string()));
        assert_eq!(
            args(&["extra"]),
            Err("extra: Unexpected argument".to_string())
        );
        assert_eq!(
            args(&["--blockdev"]),
            Err("option '--blockdev' requires an argument".to_string())
        );
        assert_eq!(
            args(&["--daemonize=1"]),
            Err("option '--daemonize' doesn't allow an argument".to_string())
        );
        assert!(
            args(&["--export", "x"])
                .unwrap_err()
                .contains("not supported")
        );
    }

    #[test]
    fn keyval() {
        let v = blockdev_from_keyval(
            "raw,node-name=a,,b,file.driver=blkdebug,file.image.driver=null-co,\
             file.image.size=0x100000,file.inject-error.0.event=read_aio,\
             file.inject-error.0.once=on,file.inject-error.1.event=write_aio,read-only=off,",
        )
        .unwrap();
        assert_eq!(
            v,
            json!({"driver":"raw","node-name":"a,b","file":{"driver":"blkdebug",
                "image":{"driver":"null-co","size":1048576},
                "inject-error":[{"event":"read_aio","once":true},{"event":"write_aio"}]},
                "read-only":false})
        );
        let e = |s: &str| blockdev_from_keyval(s).unwrap_err();
        assert_eq!(
            e("driver=null-co,size=1M"),
            "Parameter 'size' expects integer"
        );
        assert_eq!(
            e("driver=null-co,read-only=maybe"),
            "Parameter 'read-only' expects 'on' or 'off'"
        );
        assert_eq!(
            e("driver=null-co,cache.direct=off,cache=x"),
            "Parameters 'cache.*' used inconsistently"
        );
        assert_eq!(
            e("driver=null-co,cache=x,cache.direct=off"),
            "Parameters 'cache.*' used inconsistently"
        );
        assert_eq!(e("driver=null-co,a..b=1"), "Invalid parameter 'a..b'");
        assert_eq!(e("driver=null-co,=a"), "Invalid parameter ''");
        assert_eq!(
            e("driver=null-co,node-name"),
            "Expected '=' after parameter 'node-name'"
        );
        assert_eq!(
            e("driver=raw,file.inject-error.1.event=x"),
            "Parameter 'file.inject-error.0' missing"
        );
        assert_eq!(
            e("driver=raw,file.l.0.a=x,file.l.x.a=y"),
            "Parameters 'file.l.*' used inconsistently"
        );
        assert_eq!(
            blockdev_from_keyval("driver=null-co,node-name=a,node-name=b").unwrap()["node-name"],
            "b"
        );
        assert_eq!(
            blockdev_from_keyval("driver=qcow2,backing=").unwrap()["backing"],
            Value::Null
        );
    }

    #[test]
    fn integers_like_strtoi64() {
        assert_eq!(parse_int("010"), Some(8));
        assert_eq!(parse_int(" +5"), Some(5));
        assert_eq!(parse_int("-0x10"), Some(-16));
        assert_eq!(parse_int("5 "), None);
        assert_eq!(parse_int("1e3"), None);
        assert_eq!(parse_int(""), None);
        assert_eq!(parse_int("-9223372036854775808"), Some(i64::MIN));
        assert_eq!(parse_int("9223372036854775808"), None);
    }

    #[test]
    fn monitor_and_chardev() {
        assert_eq!(
            parse_monitor("m,pretty=on").unwrap(),
            MonitorOpts {
                chardev: "m".into(),
                pretty: true
            }
        );
        assert_eq!(
            parse_monitor("chardev=m,mode=readline").unwrap_err(),
            "Only QMP is supported"
        );
        assert_eq!(
            parse_monitor("m,pretty").unwrap_err(),
            "Expected '=' after parameter 'pretty'"
        );
        assert_eq!(
            parse_chardev("socket,id=m,path=/a,,b,server,wait=off").unwrap(),
            ChardevOpts {
                id: "m".into(),
                path: "/a,b".into()
            }
        );
        assert_eq!(
            parse_chardev("foo,id=m").unwrap_err(),
            "'foo' is not a valid char driver name"
        );
        assert_eq!(
            parse_chardev("socket,path=/x,server=on,wait=off").unwrap_err(),
            "chardev: no id specified"
        );
        assert!(parse_chardev("socket,id=m,host=localhost,port=1,server=on,wait=off").is_err());
        assert!(parse_chardev("socket,id=m,path=/x").is_err());
        assert!(parse_chardev("socket,id=m,path=/x,server=on").is_err());
        assert!(parse_chardev("file,id=m,path=/x").is_err());
    }
}
