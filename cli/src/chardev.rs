//! `--monitor` and `--chardev` of qemu-storage-daemon's command line:
//! `--monitor` is keyval with the implied key `chardev`; `--chardev` is
//! QemuOpts (a bare `server` means `server=on`). Only QMP monitors on
//! UNIX socket servers are supported.

use blockjob::qapi::keyval::{keyval_parse, parse_bool};
use serde_json::Value;

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
