//! blockdev-add options: QEMU's JSON, checked the way QEMU's QAPI input
//! visitor checks it (same member order, same error texts), into a tree of
//! [`NodeSpec`]s that the graph then opens.

use std::collections::BTreeSet;

use serde_json::{Map, Value};

use super::blkdebug::{BlkdebugEvent, BlkdebugIoType, InjectError, SetState};
use crate::error::{Error, Result};

/// A child given inline or by name.
#[derive(Debug, Clone)]
pub enum ChildRef {
    /// `"file": "name"`: an existing node (or a device name).
    Existing(String),
    /// `"file": {…}`: a node to create with the parent.
    New(Box<NodeSpec>),
}

/// A format's `backing` member.
#[derive(Debug, Clone)]
pub enum BackingSpec {
    /// Absent: open what the image header names.
    FromHeader,
    /// `null`: no backing layer.
    None,
    /// A node to use (by name or inline).
    Child(ChildRef),
}

/// `detect-zeroes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DetectZeroes {
    /// Writes are written as they are.
    #[default]
    Off,
    /// All-zero writes become write-zeroes.
    On,
    /// All-zero writes become write-zeroes that may unmap (with discard=unmap).
    Unmap,
}

/// Driver-specific options.
#[derive(Debug, Clone)]
pub enum DriverSpec {
    /// `file` / `host_device`.
    File {
        /// `filename`
        filename: String,
    },
    /// `null-co` / `null-aio`.
    Null {
        /// Which of the two.
        name: &'static str,
        /// `size` (default 1 GiB).
        size: Option<i64>,
        /// `latency-ns`.
        latency_ns: Option<i64>,
        /// `read-zeroes`.
        read_zeroes: bool,
    },
    /// `raw`.
    Raw {
        /// `file`
        file: ChildRef,
        /// `offset`
        offset: Option<i64>,
        /// `size`
        size: Option<i64>,
    },
    /// `qcow2`.
    Qcow2 {
        /// `file`
        file: ChildRef,
        /// `backing`
        backing: BackingSpec,
    },
    /// `blkdebug`.
    Blkdebug {
        /// `image`
        image: ChildRef,
        /// `align`
        align: Option<i64>,
        /// `inject-error`
        inject: Vec<InjectError>,
        /// `set-state`
        set_state: Vec<SetState>,
    },
}

/// One node to open.
#[derive(Debug, Clone)]
pub struct NodeSpec {
    /// `node-name`
    pub node_name: Option<String>,
    /// `read-only`
    pub read_only: bool,
    /// `discard`: `Some(true)` for "unmap", `Some(false)` for "ignore",
    /// `None` to inherit the parent's (QEMU's default: "ignore").
    pub discard_unmap: Option<bool>,
    /// `cache.direct`
    pub cache_direct: bool,
    /// `cache.no-flush`
    pub cache_no_flush: bool,
    /// `detect-zeroes`
    pub detect_zeroes: DetectZeroes,
    /// The driver part.
    pub driver: DriverSpec,
}

/// QEMU's `BlockdevDriver` values that exist but that we do not implement.
const QEMU_DRIVERS: &[&str] = &[
    "blkdebug",
    "blklogwrites",
    "blkreplay",
    "blkverify",
    "bochs",
    "cloop",
    "compress",
    "copy-before-write",
    "copy-on-read",
    "dmg",
    "file",
    "snapshot-access",
    "ftp",
    "ftps",
    "gluster",
    "host_cdrom",
    "host_device",
    "http",
    "https",
    "io_uring",
    "iscsi",
    "luks",
    "nbd",
    "nfs",
    "null-aio",
    "null-co",
    "nvme",
    "nvme-io_uring",
    "parallels",
    "preallocate",
    "qcow",
    "qcow2",
    "qed",
    "quorum",
    "raw",
    "rbd",
    "replication",
    "ssh",
    "throttle",
    "vdi",
    "vhdx",
    "virtio-blk-vfio-pci",
    "virtio-blk-vhost-user",
    "virtio-blk-vhost-vdpa",
    "vmdk",
    "vpc",
    "vvfat",
];

/// A JSON object being visited: tracks the member path for messages and
/// which members were consumed, so leftovers are "unexpected".
pub(crate) struct Obj<'a> {
    map: &'a Map<String, Value>,
    prefix: String,
    used: BTreeSet<&'a str>,
}

pub(crate) fn type_err(name: &str, expected: &str) -> Error {
    Error::generic(format!(
        "Invalid parameter type for '{name}', expected: {expected}"
    ))
}

impl<'a> Obj<'a> {
    pub(crate) fn new(v: &'a Value, name: &str) -> Result<Self> {
        match v {
            Value::Object(map) => Ok(Obj {
                map,
                prefix: if name.is_empty() {
                    String::new()
                } else {
                    format!("{name}.")
                },
                used: BTreeSet::new(),
            }),
            _ => Err(type_err(
                if name.is_empty() { "null" } else { name },
                "object",
            )),
        }
    }

    pub(crate) fn name(&self, key: &str) -> String {
        format!("{}{}", self.prefix, key)
    }

    pub(crate) fn get(&mut self, key: &'a str) -> Option<&'a Value> {
        let v = self.map.get(key);
        if v.is_some() {
            self.used.insert(key);
        }
        v
    }

    pub(crate) fn missing(&self, key: &str) -> Error {
        Error::generic(format!("Parameter '{}' is missing", self.name(key)))
    }

    pub(crate) fn opt_str(&mut self, key: &'a str) -> Result<Option<String>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(type_err(&self.name(key), "string")),
        }
    }

    pub(crate) fn req_str(&mut self, key: &'a str) -> Result<String> {
        self.opt_str(key)?.ok_or_else(|| self.missing(key))
    }

    pub(crate) fn opt_bool(&mut self, key: &'a str) -> Result<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(_) => Err(type_err(&self.name(key), "boolean")),
        }
    }

    pub(crate) fn opt_int(&mut self, key: &'a str) -> Result<Option<i64>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Number(n)) => n
                .as_i64()
                .map(Some)
                .ok_or_else(|| type_err(&self.name(key), "integer")),
            Some(_) => Err(type_err(&self.name(key), "integer")),
        }
    }

    pub(crate) fn req_int(&mut self, key: &'a str) -> Result<i64> {
        self.opt_int(key)?.ok_or_else(|| self.missing(key))
    }

    /// QEMU reports a bad enum value with the bare member name.
    pub(crate) fn opt_enum(&mut self, key: &'a str, allowed: &[&str]) -> Result<Option<String>> {
        match self.opt_str(key)? {
            None => Ok(None),
            Some(s) if allowed.contains(&s.as_str()) => Ok(Some(s)),
            Some(s) => Err(Error::generic(format!(
                "Parameter '{key}' does not accept value '{s}'"
            ))),
        }
    }

    pub(crate) fn opt_list(&mut self, key: &'a str) -> Result<Option<&'a Vec<Value>>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Array(a)) => Ok(Some(a)),
            Some(_) => Err(type_err(&self.name(key), "array")),
        }
    }

    pub(crate) fn opt_obj(&mut self, key: &'a str) -> Result<Option<Obj<'a>>> {
        let name = self.name(key);
        match self.get(key) {
            None => Ok(None),
            Some(v @ Value::Object(_)) => Ok(Some(Obj::new(v, &name)?)),
            Some(_) => Err(type_err(&name, "object")),
        }
    }

    pub(crate) fn req_child(&mut self, key: &'a str) -> Result<ChildRef> {
        let name = self.name(key);
        match self.get(key) {
            None => Err(self.missing(key)),
            Some(Value::String(s)) => Ok(ChildRef::Existing(s.clone())),
            Some(v @ Value::Object(_)) => Ok(ChildRef::New(Box::new(parse_at(v, &name)?))),
            Some(_) => Err(type_err(&name, "BlockdevRef")),
        }
    }

    /// `backing`: a node, `null`, or absent.
    pub(crate) fn opt_backing(&mut self, key: &'a str) -> Result<BackingSpec> {
        let name = self.name(key);
        match self.get(key) {
            None => Ok(BackingSpec::FromHeader),
            Some(Value::Null) => Ok(BackingSpec::None),
            Some(Value::String(s)) => Ok(BackingSpec::Child(ChildRef::Existing(s.clone()))),
            Some(v @ Value::Object(_)) => Ok(BackingSpec::Child(ChildRef::New(Box::new(
                parse_at(v, &name)?,
            )))),
            Some(_) => Err(type_err(&name, "BlockdevRefOrNull")),
        }
    }

    /// QEMU's `visit_check_struct`: members nobody asked for.
    pub(crate) fn finish(self) -> Result<()> {
        self.finish_ref()
    }

    /// [`Self::finish`] without giving the visitor up.
    pub(crate) fn finish_ref(&self) -> Result<()> {
        match self.map.keys().find(|k| !self.used.contains(k.as_str())) {
            Some(k) => Err(Error::generic(format!(
                "Parameter '{}' is unexpected",
                self.name(k)
            ))),
            None => Ok(()),
        }
    }
}

/// Parse blockdev-add options (a JSON object).
pub fn parse(v: &Value) -> Result<NodeSpec> {
    parse_at(v, "")
}

fn parse_at(v: &Value, name: &str) -> Result<NodeSpec> {
    let mut o = Obj::new(v, name)?;
    // Base members, in QAPI order.
    let driver = o.req_str("driver")?;
    if !QEMU_DRIVERS.contains(&driver.as_str()) {
        return Err(Error::generic(format!(
            "Parameter 'driver' does not accept value '{driver}'"
        )));
    }
    let node_name = o.opt_str("node-name")?;
    let discard = o.opt_enum("discard", &["ignore", "unmap"])?;
    let mut cache_direct = false;
    let mut cache_no_flush = false;
    if let Some(mut c) = o.opt_obj("cache")? {
        cache_direct = c.opt_bool("direct")?.unwrap_or(false);
        cache_no_flush = c.opt_bool("no-flush")?.unwrap_or(false);
        c.finish()?;
    }
    // QEMU 10: `active` (inactive nodes are for migration; accepted).
    let _active = o.opt_bool("active")?;
    let read_only = o.opt_bool("read-only")?.unwrap_or(false);
    let _auto_read_only = o.opt_bool("auto-read-only")?;
    let _force_share = o.opt_bool("force-share")?;
    let detect_zeroes = match o
        .opt_enum("detect-zeroes", &["off", "on", "unmap"])?
        .as_deref()
    {
        Some("on") => DetectZeroes::On,
        Some("unmap") => DetectZeroes::Unmap,
        _ => DetectZeroes::Off,
    };
    let spec = match driver.as_str() {
        "file" | "host_device" => {
            let filename = o.req_str("filename")?;
            let _ = o.opt_str("pr-manager")?;
            let _ = o.opt_enum("locking", &["auto", "on", "off"])?;
            let _ = o.opt_enum("aio", &["threads", "native", "io_uring"])?;
            let _ = o.opt_int("aio-max-batch")?;
            let _ = o.opt_bool("drop-cache")?;
            let _ = o.opt_bool("x-check-cache-dropped")?;
            DriverSpec::File { filename }
        }
        "null-co" | "null-aio" => DriverSpec::Null {
            name: if driver == "null-co" {
                "null-co"
            } else {
                "null-aio"
            },
            size: o.opt_int("size")?,
            latency_ns: o.opt_int("latency-ns")?,
            read_zeroes: o.opt_bool("read-zeroes")?.unwrap_or(false),
        },
        "raw" => DriverSpec::Raw {
            file: o.req_child("file")?,
            offset: o.opt_int("offset")?,
            size: o.opt_int("size")?,
        },
        "qcow2" => {
            let file = o.req_child("file")?;
            let backing = o.opt_backing("backing")?;
            // Tuning QEMU accepts; imago has its own caches.
            for k in [
                "lazy-refcounts",
                "pass-discard-request",
                "pass-discard-snapshot",
                "pass-discard-other",
                "discard-no-unref",
            ] {
                let _ = o.opt_bool(k)?;
            }
            let _ = o.get("overlap-check");
            for k in [
                "cache-size",
                "l2-cache-size",
                "l2-cache-entry-size",
                "refcount-cache-size",
                "cache-clean-interval",
            ] {
                let _ = o.opt_int(k)?;
            }
            for k in ["encrypt", "data-file"] {
                if o.get(k).is_some() {
                    return Err(Error::generic(format!(
                        "qcow2 '{k}' is not supported by blockjob"
                    )));
                }
            }
            DriverSpec::Qcow2 { file, backing }
        }
        "blkdebug" => {
            let image = o.req_child("image")?;
            if o.opt_str("config")?.is_some() {
                return Err(Error::generic(
                    "blkdebug 'config' files are not supported; use inject-error and set-state",
                ));
            }
            let align = o.opt_int("align")?;
            for k in [
                "max-transfer",
                "opt-write-zero",
                "max-write-zero",
                "opt-discard",
                "max-discard",
            ] {
                let _ = o.opt_int(k)?;
            }
            let inject = match o.opt_list("inject-error")? {
                None => Vec::new(),
                Some(list) => list
                    .iter()
                    .enumerate()
                    .map(|(i, v)| parse_inject(v, &format!("{}inject-error[{i}]", o.prefix)))
                    .collect::<Result<_>>()?,
            };
            let set_state = match o.opt_list("set-state")? {
                None => Vec::new(),
                Some(list) => list
                    .iter()
                    .enumerate()
                    .map(|(i, v)| parse_set_state(v, &format!("{}set-state[{i}]", o.prefix)))
                    .collect::<Result<_>>()?,
            };
            for k in ["take-child-perms", "share-child-perms"] {
                if let Some(l) = o.opt_list(k)? {
                    for v in l {
                        if !v.is_string() {
                            return Err(type_err(&o.name(k), "string"));
                        }
                    }
                }
            }
            DriverSpec::Blkdebug {
                image,
                align,
                inject,
                set_state,
            }
        }
        other => {
            return Err(Error::generic(format!(
                "Driver '{other}' is not supported by blockjob"
            )));
        }
    };
    o.finish()?;
    Ok(NodeSpec {
        node_name,
        read_only,
        discard_unmap: discard.as_deref().map(|d| d == "unmap"),
        cache_direct,
        cache_no_flush,
        detect_zeroes,
        driver: spec,
    })
}

fn parse_event(o: &mut Obj<'_>) -> Result<BlkdebugEvent> {
    let names: Vec<&str> = BlkdebugEvent::ALL.iter().map(|e| e.as_str()).collect();
    match o.opt_enum("event", &names)? {
        Some(s) => Ok(BlkdebugEvent::from_wire(&s).expect("checked above")),
        None => Err(o.missing("event")),
    }
}

fn parse_inject(v: &Value, name: &str) -> Result<InjectError> {
    let mut o = Obj::new(v, name)?;
    let event = parse_event(&mut o)?;
    let state = o.opt_int("state")?.unwrap_or(0);
    let names: Vec<&str> = BlkdebugIoType::ALL.iter().map(|e| e.as_str()).collect();
    let iotype = o
        .opt_enum("iotype", &names)?
        .map(|s| BlkdebugIoType::from_wire(&s).expect("checked above"));
    let errno = o.opt_int("errno")?.unwrap_or(libc::EIO as i64);
    let sector = o.opt_int("sector")?.unwrap_or(-1);
    let once = o.opt_bool("once")?.unwrap_or(false);
    let immediately = o.opt_bool("immediately")?.unwrap_or(false);
    o.finish()?;
    Ok(InjectError {
        event,
        state,
        iotype,
        errno,
        offset: if sector < 0 {
            None
        } else {
            (sector as u64).checked_mul(512)
        },
        once,
        immediately,
    })
}

fn parse_set_state(v: &Value, name: &str) -> Result<SetState> {
    let mut o = Obj::new(v, name)?;
    let event = parse_event(&mut o)?;
    let state = o.opt_int("state")?.unwrap_or(0);
    let new_state = o.req_int("new_state")?;
    o.finish()?;
    Ok(SetState {
        event,
        state,
        new_state,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn err(v: Value) -> String {
        parse(&v).unwrap_err().message().to_string()
    }

    /// Texts recorded from qemu-storage-daemon 10 blockdev-add.
    #[test]
    fn visitor_errors_match_qemu() {
        assert_eq!(
            err(json!({"driver":"nope","node-name":"x"})),
            "Parameter 'driver' does not accept value 'nope'"
        );
        assert_eq!(
            err(json!({"node-name":"f0","filename":"/x"})),
            "Parameter 'driver' is missing"
        );
        assert_eq!(
            err(json!({"driver":"file","node-name":"f0"})),
            "Parameter 'filename' is missing"
        );
        assert_eq!(
            err(json!({"driver":"file","node-name":"f0","filename":"/x","bogus":1})),
            "Parameter 'bogus' is unexpected"
        );
        assert_eq!(
            err(json!({"driver":"file","node-name":"f0","filename":5})),
            "Invalid parameter type for 'filename', expected: string"
        );
        assert_eq!(
            err(json!({"driver":"file","node-name":5,"filename":"/x"})),
            "Invalid parameter type for 'node-name', expected: string"
        );
        assert_eq!(
            err(json!({"driver":"file","node-name":"f","filename":"/x","read-only":"yes"})),
            "Invalid parameter type for 'read-only', expected: boolean"
        );
        assert_eq!(
            err(json!({"driver":"raw","node-name":"r0"})),
            "Parameter 'file' is missing"
        );
        assert_eq!(
            err(json!({"driver":"raw","node-name":"r0","file":5})),
            "Invalid parameter type for 'file', expected: BlockdevRef"
        );
        let dbg = |inject: Value| {
            err(json!({"driver":"raw","node-name":"r","file":{
                "driver":"blkdebug","image":{"driver":"file","filename":"/x"},
                "inject-error": inject}}))
        };
        assert_eq!(
            dbg(json!([{"event":"nope","errno":5}])),
            "Parameter 'event' does not accept value 'nope'"
        );
        assert_eq!(
            dbg(json!([{"event":"read_aio","errno":"5"}])),
            "Invalid parameter type for 'file.inject-error[0].errno', expected: integer"
        );
        assert_eq!(
            dbg(json!([{"errno":5}])),
            "Parameter 'file.inject-error[0].event' is missing"
        );
        assert_eq!(
            dbg(json!([{"event":"read_aio","iotype":"nope"}])),
            "Parameter 'iotype' does not accept value 'nope'"
        );
        assert_eq!(
            dbg(json!([{"event":"read_aio","bogus":1}])),
            "Parameter 'file.inject-error[0].bogus' is unexpected"
        );
        assert_eq!(
            dbg(json!({"event":"read_aio"})),
            "Invalid parameter type for 'file.inject-error', expected: array"
        );
        assert_eq!(
            err(json!({"driver":"null-co","node-name":"n","size":1u64 << 63})),
            "Invalid parameter type for 'size', expected: integer"
        );
        assert_eq!(
            err(json!({"driver":"null-co","node-name":"n","size":"1M"})),
            "Invalid parameter type for 'size', expected: integer"
        );
    }

    #[test]
    fn nested_tree_parses() {
        let s = parse(&json!({
            "driver":"raw","node-name":"src",
            "file":{"driver":"blkdebug","node-name":"dbg",
                "image":{"driver":"file","filename":"/x.img"},
                "inject-error":[{"event":"read_aio","errno":28,"sector":2048,"once":true}],
                "set-state":[{"event":"write_aio","new_state":2}]}
        }))
        .unwrap();
        let DriverSpec::Raw {
            file: ChildRef::New(dbg),
            ..
        } = s.driver
        else {
            panic!("raw over a new child")
        };
        let DriverSpec::Blkdebug {
            inject, set_state, ..
        } = dbg.driver
        else {
            panic!("blkdebug")
        };
        assert_eq!(inject[0].errno, 28);
        assert_eq!(inject[0].offset, Some(1 << 20));
        assert!(inject[0].once);
        assert_eq!(set_state[0].new_state, 2);
        let s = parse(&json!({"driver":"raw","node-name":"r","file":"f1"})).unwrap();
        assert!(
            matches!(s.driver, DriverSpec::Raw { file: ChildRef::Existing(ref n), .. } if n == "f1")
        );
    }
}
