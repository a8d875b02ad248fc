//! Image arguments: a path (opened with `--*-format` over a `file` node)
//! or `json:{...}`, QEMU's blockdev options as they would be given to
//! `blockdev-add` (so `blkdebug` can be put in front); and layers of a
//! backing chain named by file name (`--base`, `--top`).

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
    /// blockdev-add options.
    Json(Value),
}

impl Image {
    /// Parse a SRC/DST argument.
    pub fn parse(arg: &str) -> Result<Image> {
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
            Image::Json(_) => None,
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
                (
                    json!({"driver": driver, "node-name": node_name,
                           "file": {"driver": "file", "filename": p}}),
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
