//! Image arguments: a path (opened with `--*-format` over a `file` node),
//! an NBD export by qemu-img's URLs (`nbd://HOST[:PORT]/EXPORT`,
//! `nbd+unix:///EXPORT?socket=PATH`, the legacy `nbd:unix:PATH[:exportname=E]`
//! and `nbd:HOST:PORT[:exportname=E]`; the format goes over an `nbd` node
//! as over a `file` node), or `json:{...}`, QEMU's blockdev options as
//! they would be given to `blockdev-add` (so `blkdebug` can be put in
//! front); and layers of a backing chain named by file name (`--base`,
//! `--top`).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use blockjob::block::Node;
use blockjob::{Error, Result};
use clap::ValueEnum;
use serde_json::{Value, json};

/// Image formats the command opens from a path.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// Raw image or block device.
    Raw,
    /// qcow2 image; its backing chain is opened from the header.
    Qcow2,
}

/// One side of the mirror, as given on the command line.
#[derive(Debug, Clone)]
pub enum Image {
    /// A path to a file or block device.
    Path(PathBuf),
    /// An NBD export: the `nbd` node's blockdev-add options.
    Nbd(Value),
    /// blockdev-add options.
    Json(Value),
}

/// `%XX` escapes of a URL part decoded (export names may contain any byte).
fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// The `nbd` node options of a qemu-img NBD file name, `None` if `arg` is
/// not one; the error is qemu-img's for a malformed one.
pub fn nbd_url(arg: &str) -> Option<Result<Value>> {
    let bad = || Error::generic(format!("Could not open '{arg}': No valid URL specified"));
    let node = |server: Value, export: Option<String>| {
        let mut v = json!({"driver": "nbd", "server": server});
        if let Some(e) = export.filter(|e| !e.is_empty()) {
            v["export"] = json!(e);
        }
        v
    };
    if let Some(rest) = arg.strip_prefix("nbd:") {
        if rest.starts_with("//") {
            // `nbd://` is the URL form below.
        } else {
            // Legacy: nbd:unix:PATH[:exportname=E] or nbd:HOST:PORT[:exportname=E].
            let (addr, export) = match rest.split_once(":exportname=") {
                Some((a, e)) => (a, Some(e.to_string())),
                None => (rest, None),
            };
            let server = match addr.strip_prefix("unix:") {
                Some(path) if !path.is_empty() => json!({"type": "unix", "path": path}),
                Some(_) => return Some(Err(bad())),
                None => match addr.rsplit_once(':') {
                    Some((h, p)) if !h.is_empty() && !p.is_empty() => {
                        json!({"type": "inet", "host": h, "port": p})
                    }
                    _ => return Some(Err(bad())),
                },
            };
            return Some(Ok(node(server, export)));
        }
    }
    let (scheme, rest) = arg.split_once("://")?;
    let transport = match scheme {
        "nbd" | "nbd+tcp" => "tcp",
        "nbd+unix" => "unix",
        _ => return None,
    };
    let (rest, query) = match rest.split_once('?') {
        Some((r, q)) => (r, Some(q)),
        None => (rest, None),
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (rest, ""),
    };
    let Some(export) = percent_decode(path) else {
        return Some(Err(bad()));
    };
    let server = if transport == "unix" {
        // Only `socket=PATH`, and no host.
        match query.and_then(|q| q.strip_prefix("socket=")) {
            Some(p) if authority.is_empty() && !p.contains('&') && !p.is_empty() => {
                match percent_decode(p) {
                    Some(p) => json!({"type": "unix", "path": p}),
                    None => return Some(Err(bad())),
                }
            }
            _ => return Some(Err(bad())),
        }
    } else {
        if query.is_some() || authority.is_empty() {
            return Some(Err(bad()));
        }
        let (host, port) = match authority.strip_prefix('[') {
            // [IPv6]:port
            Some(v6) => match v6.split_once(']') {
                Some((h, "")) => (h, "10809"),
                Some((h, p)) => match p.strip_prefix(':') {
                    Some(p) => (h, p),
                    None => return Some(Err(bad())),
                },
                None => return Some(Err(bad())),
            },
            None => match authority.rsplit_once(':') {
                Some((h, p)) => (h, p),
                None => (authority, "10809"),
            },
        };
        if host.is_empty() || port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
            return Some(Err(bad()));
        }
        json!({"type": "inet", "host": host, "port": port})
    };
    Some(Ok(node(server, Some(export))))
}

impl Image {
    /// Parse a SRC/DST argument.
    pub fn parse(arg: &str) -> Result<Image> {
        if let Some(nbd) = nbd_url(arg) {
            return nbd.map(Image::Nbd);
        }
        match arg.strip_prefix("json:") {
            Some(text) => {
                let v: Value = serde_json::from_str(text)
                    .map_err(|e| Error::generic(format!("Could not parse '{arg}': {e}")))?;
                if !v.is_object() {
                    return Err(Error::generic(format!(
                        "Could not parse '{arg}': blockdev options must be a JSON object"
                    )));
                }
                Ok(Image::Json(v))
            }
            None if arg.is_empty() => Err(Error::generic("An image path must not be empty")),
            None => Ok(Image::Path(PathBuf::from(arg))),
        }
    }

    /// The path, when the image is a plain path.
    pub fn path(&self) -> Option<&Path> {
        match self {
            Image::Path(p) => Some(p),
            Image::Nbd(_) | Image::Json(_) => None,
        }
    }

    /// blockdev-add options naming the top node `node_name` (kept if the
    /// JSON names it already); returns them and the top node's name.
    pub fn blockdev_options(&self, format: Format, node_name: &str) -> (Value, String) {
        match self {
            Image::Path(p) => {
                let driver = match format {
                    Format::Raw => "raw",
                    Format::Qcow2 => "qcow2",
                };
                // A block device is a `host_device`, as QEMU's tools probe.
                let proto = match blockjob::block::file::is_block_device(&p.to_string_lossy()) {
                    true => "host_device",
                    false => "file",
                };
                (
                    json!({"driver": driver, "node-name": node_name,
                           "file": {"driver": proto, "filename": p}}),
                    node_name.to_string(),
                )
            }
            Image::Nbd(nbd) => {
                let driver = match format {
                    Format::Raw => "raw",
                    Format::Qcow2 => "qcow2",
                };
                (
                    json!({"driver": driver, "node-name": node_name, "file": nbd}),
                    node_name.to_string(),
                )
            }
            Image::Json(v) => {
                let mut v = v.clone();
                let name = match v.get("node-name").and_then(Value::as_str) {
                    Some(n) => n.to_string(),
                    None => {
                        v["node-name"] = json!(node_name);
                        node_name.to_string()
                    }
                };
                (v, name)
            }
        }
    }
}

/// Create `path` as a sparse file of `size` bytes if it does not exist.
/// Returns whether it was created.
pub fn create_if_missing(path: &Path, size: u64) -> Result<bool> {
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
    {
        Ok(f) => {
            f.set_len(size)?;
            Ok(true)
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(Error::from(e).prepend(format!("Could not create '{}': ", path.display()))),
    }
}

/// Format the empty file `path` as a qcow2 image of `size` bytes whose
/// header names `backing` (file name, format).
pub fn create_qcow2(
    ctx: &blockjob::Context,
    path: &Path,
    size: u64,
    backing: Option<(&str, &str)>,
) -> Result<()> {
    const NODE: &str = "new-image-file";
    let file = ctx.blockdev_add(&json!({"driver": "file", "node-name": NODE, "filename": path}))?;
    let r = blockjob::block::qcow2::create(&file, size, backing, None);
    drop(file);
    ctx.blockdev_del(NODE)?;
    r.map_err(|e| e.prepend(format!("Could not create '{}': ", path.display())))
}

/// The format to name in a qcow2 header for `node` as backing file.
pub fn backing_format(node: &Node) -> &'static str {
    match node.driver_name() {
        "qcow2" => "qcow2",
        _ => "raw",
    }
}

/// `name` made absolute against the current directory (QEMU gets the
/// `base`/`top` file names absolute from management tools).
pub fn absolute(name: &str) -> String {
    std::path::absolute(name).map_or_else(|_| name.to_string(), |p| p.display().to_string())
}

/// The layer of `layers` whose image file is `name`: the same string, the
/// same absolute path, or the same file (symbolic links, `..`).
pub fn find_layer(layers: &[Arc<Node>], name: &str) -> Option<Arc<Node>> {
    let abs = absolute(name);
    let canon = std::fs::canonicalize(name).ok();
    let by = |f: &dyn Fn(&str) -> bool| layers.iter().find(|n| f(&n.filename())).cloned();
    by(&|f| f == name)
        .or_else(|| by(&|f| f == abs))
        .or_else(|| {
            let c = canon.as_ref()?;
            by(&|f| std::fs::canonicalize(f).is_ok_and(|p| &p == c))
        })
}

/// The backing file `node`'s image names now: the qcow2 header as it is
/// on disk, or else the backing node's file name.
pub fn backing_file_name(node: &Node) -> Option<String> {
    let file = node.children().into_iter().find(|c| c.role == "file");
    match file.map(|f| blockjob::block::qcow2::header::read_node_header(&f.node)) {
        Some(Ok(h)) => h.backing_file,
        _ => node.backing().map(|b| b.filename()),
    }
}

/// The file names of `layers`, top first: `a -> b -> c`.
pub fn chain_text(layers: &[Arc<Node>]) -> String {
    layers
        .iter()
        .map(|n| n.filename())
        .collect::<Vec<_>>()
        .join(" -> ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_and_json() {
        let (v, n) = Image::parse("/x.img")
            .unwrap()
            .blockdev_options(Format::Raw, "source");
        assert_eq!(n, "source");
        assert_eq!(
            v,
            json!({"driver":"raw","node-name":"source","file":{"driver":"file","filename":"/x.img"}})
        );
        let img = Image::parse(r#"json:{"driver":"null-co","size":1024}"#).unwrap();
        assert!(img.path().is_none());
        let (v, n) = img.blockdev_options(Format::Raw, "target");
        assert_eq!(n, "target");
        assert_eq!(v["node-name"], "target");
        let (_, n) = Image::parse(r#"json:{"driver":"null-co","node-name":"mine"}"#)
            .unwrap()
            .blockdev_options(Format::Raw, "target");
        assert_eq!(n, "mine");
        assert!(Image::parse("json:{").is_err());
        let (v, _) = Image::parse("nbd+unix:///d%20x?socket=/run/s.sock")
            .unwrap()
            .blockdev_options(Format::Raw, "target");
        assert_eq!(
            v,
            json!({"driver":"raw","node-name":"target","file":{"driver":"nbd",
                "server":{"type":"unix","path":"/run/s.sock"},"export":"d x"}})
        );
        assert!(Image::parse("json:[1]").is_err());
        assert!(Image::parse("").is_err());
        let (v, _) = Image::parse("/x.qcow2")
            .unwrap()
            .blockdev_options(Format::Qcow2, "image");
        assert_eq!(v["driver"], "qcow2");
        assert_eq!(absolute("/a/b"), "/a/b");
        assert!(absolute("rel").ends_with("/rel") && absolute("rel").starts_with('/'));
    }
}

#[cfg(test)]
mod nbd_url_tests {
    use super::*;

    fn ok(arg: &str) -> Value {
        nbd_url(arg).unwrap().unwrap()
    }

    fn err(arg: &str) -> String {
        nbd_url(arg).unwrap().unwrap_err().message().to_string()
    }

    /// The forms qemu-img 10 accepts, and its text for those it refuses.
    #[test]
    fn qemu_img_nbd_file_names() {
        assert_eq!(
            ok("nbd://127.0.0.1/e"),
            json!({"driver":"nbd","server":{"type":"inet","host":"127.0.0.1","port":"10809"},
                "export":"e"})
        );
        assert_eq!(
            ok("nbd+tcp://h:10900"),
            json!({"driver":"nbd","server":{"type":"inet","host":"h","port":"10900"}})
        );
        assert_eq!(
            ok("nbd://[::1]:5/x")["server"],
            json!({"type":"inet","host":"::1","port":"5"})
        );
        assert_eq!(
            ok("nbd:unix:/tmp/s.sock:exportname=e"),
            json!({"driver":"nbd","server":{"type":"unix","path":"/tmp/s.sock"},"export":"e"})
        );
        assert_eq!(
            ok("nbd:localhost:10809"),
            json!({"driver":"nbd","server":{"type":"inet","host":"localhost","port":"10809"}})
        );
        for bad in [
            "nbd+unix:///disk",
            "nbd://h:x/disk",
            "nbd+unix://host/disk?socket=/x",
            "nbd+unix:///d?socket=/tmp/s&x=1",
            "nbd://h/d?x=1",
        ] {
            assert_eq!(
                err(bad),
                format!("Could not open '{bad}': No valid URL specified")
            );
        }
        assert!(nbd_url("/path/nbd.img").is_none());
        assert!(nbd_url("http://x/y").is_none());
    }
}
