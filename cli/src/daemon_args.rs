//! `blockjob daemon`'s command line: qemu-storage-daemon's options (the
//! ones we support) with its parsing rules and error texts.
//!
//! - The options themselves are parsed as QSD's `getopt_long` does:
//!   `--opt VALUE` or `--opt=VALUE`, unambiguous prefixes (`--pid`), `-V`,
//!   `-h`, `--` ends the options; anything else is refused with glibc's
//!   text (`unrecognized option '--foo'`, `invalid option -- 'x'`).
//! - `--blockdev` is JSON or QEMU's keyval syntax, converted by the
//!   library (`blockjob::block::options::blockdev_options`).
//! - `--monitor` and `--chardev` are parsed in `chardev`.

/// One option that QSD processes in command-line order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Opt {
    /// `--blockdev TEXT`.
    Blockdev(String),
    /// `--chardev TEXT`.
    Chardev(String),
    /// `--monitor TEXT`.
    Monitor(String),
    /// `--nbd-server TEXT` (keyval: `addr.type=unix,addr.path=P`, …).
    NbdServer(String),
    /// `--export TEXT` (keyval: `type=nbd,id=E,node-name=N,…`).
    Export(String),
    /// `--object TEXT`.
    Object(String),
}

/// A parsed command line.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct DaemonArgs {
    /// `--blockdev`, `--chardev`, `--monitor`, `--object` in order.
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

  --object tls-creds-x509,id=<id>,dir=<dir>[,endpoint=server|client]
           [,verify-peer=on|off][,sanity-check=on|off][,priority=<p>]
                         create a new object (or a JSON object); only
                         tls-creds-x509 (see the README's TLS section)

  --export [type=]nbd,id=<id>,node-name=<node-name>[,name=<export-name>]
           [,writable=on|off][,bitmap=<name>]
                         export the specified block node over NBD
                         (requires --nbd-server)

  --nbd-server addr.type=inet,addr.host=<host>,addr.port=<port>
               [,tls-creds=<id>][,tls-authz=<id>][,max-connections=<n>]
  --nbd-server addr.type=unix,addr.path=<path>
               [,tls-creds=<id>][,tls-authz=<id>][,max-connections=<n>]
                         start an NBD server for exporting block nodes

  --pidfile <path>       write process ID to a file after startup

Not supported: -T/--trace.
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
                "nbd-server" => out.opts.push(Opt::NbdServer(value)),
                "export" => out.opts.push(Opt::Export(value)),
                "object" => out.opts.push(Opt::Object(value)),
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

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(
            args(&["--obj", "tls-creds-x509,id=t"]),
            Ok(Parsed::Run(DaemonArgs {
                opts: vec![Opt::Object("tls-creds-x509,id=t".into())],
                ..Default::default()
            }))
        );
        // Parsed here; its options are checked when it is created
        // (QEMU's `Parameter 'qom-type' does not accept value 'x'`).
        assert_eq!(
            args(&["--object", "x"]),
            Ok(Parsed::Run(DaemonArgs {
                opts: vec![Opt::Object("x".into())],
                ..Default::default()
            }))
        );
        assert_eq!(
            args(&["--export", "type=nbd", "--nbd-server=addr.type=unix"]),
            Ok(Parsed::Run(DaemonArgs {
                opts: vec![
                    Opt::Export("type=nbd".into()),
                    Opt::NbdServer("addr.type=unix".into())
                ],
                ..Default::default()
            }))
        );
    }
}
