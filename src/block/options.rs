//! blockdev-add options: QEMU's JSON, checked the way QEMU's QAPI input
//! visitor checks it (same member order, same error texts), into a tree of
//! [`NodeSpec`]s that the graph then opens.

use serde_json::Value;

use super::blkdebug::{BlkdebugEvent, BlkdebugIoType, InjectError, SetState};
use super::nbd::{NbdOptions, Preconnected};
use crate::error::{Error, Result};
use crate::qapi::keyval;
use crate::qapi::visitor::{Obj, type_err};

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
        /// `locking`
        locking: super::perm::Locking,
        /// `driver` is `host_device`.
        host_device: bool,
        /// `aio`
        aio: super::file::Aio,
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
    /// `copy-before-write`.
    CopyBeforeWrite {
        /// `file`: the node whose old data is copied.
        file: ChildRef,
        /// `target`: where it goes.
        target: ChildRef,
        /// `bitmap`: `(node, name)`; copy only what it marks.
        bitmap: Option<(String, String)>,
        /// `on-cbw-error`.
        on_cbw_error: Option<String>,
        /// `cbw-timeout` in seconds (0: none).
        cbw_timeout: u32,
        /// `min-cluster-size`.
        min_cluster_size: u64,
    },
    /// `blklogwrites`: records what reaches `file` in `log`.
    Blklogwrites {
        /// `file`: the node written through.
        file: ChildRef,
        /// `log`: where the entries go.
        log: ChildRef,
        /// The other options.
        opts: super::blklogwrites::BlklogwritesOptions,
    },
    /// `snapshot-access`.
    SnapshotAccess {
        /// `file`: the `copy-before-write` node.
        file: ChildRef,
    },
    /// `nbd`: a client of an NBD server.
    Nbd {
        /// The driver's options.
        opts: Box<NbdOptions>,
        /// The connection, when it was made before the graph lock was
        /// taken (blockdev-add does so; see `Graph::blockdev_add`).
        conn: Preconnected,
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
    /// `cache.direct` (`None`: inherited from the parent, else off).
    pub cache_direct: Option<bool>,
    /// `cache.no-flush` (`None`: inherited from the parent, else off).
    pub cache_no_flush: Option<bool>,
    /// `detect-zeroes`
    pub detect_zeroes: DetectZeroes,
    /// `force-share`: every parent shares every permission (read-only
    /// nodes only; children inherit it).
    pub force_share: bool,
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

/// A required child reference: a node name, or an inline node.
fn req_child<'a>(o: &mut Obj<'a>, key: &'a str) -> Result<ChildRef> {
    let name = o.name(key);
    match o.get(key) {
        None => Err(o.missing(key)),
        Some(Value::String(s)) => Ok(ChildRef::Existing(s.clone())),
        Some(v @ Value::Object(_)) => Ok(ChildRef::New(Box::new(parse_at(v, &name)?))),
        Some(_) => Err(type_err(&name, "BlockdevRef")),
    }
}

/// `backing`: a node, `null`, or absent.
fn opt_backing<'a>(o: &mut Obj<'a>, key: &'a str) -> Result<BackingSpec> {
    let name = o.name(key);
    match o.get(key) {
        None => Ok(BackingSpec::FromHeader),
        Some(Value::Null) => Ok(BackingSpec::None),
        Some(Value::String(s)) => Ok(BackingSpec::Child(ChildRef::Existing(s.clone()))),
        Some(v @ Value::Object(_)) => Ok(BackingSpec::Child(ChildRef::New(Box::new(parse_at(
            v, &name,
        )?)))),
        Some(_) => Err(type_err(&name, "BlockdevRefOrNull")),
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
    let mut cache_direct = None;
    let mut cache_no_flush = None;
    if let Some(mut c) = o.opt_obj("cache")? {
        cache_direct = c.opt_bool("direct")?;
        cache_no_flush = c.opt_bool("no-flush")?;
        c.finish()?;
    }
    // QEMU 10: `active` (inactive nodes are for migration; accepted).
    let _active = o.opt_bool("active")?;
    let read_only = o.opt_bool("read-only")?.unwrap_or(false);
    let _auto_read_only = o.opt_bool("auto-read-only")?;
    let force_share = o.opt_bool("force-share")?.unwrap_or(false);
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
            let locking = match o.opt_enum("locking", &["auto", "on", "off"])?.as_deref() {
                Some("on") => super::perm::Locking::On,
                Some("off") => super::perm::Locking::Off,
                _ => super::perm::Locking::Auto,
            };
            let aio = match o
                .opt_enum("aio", &["threads", "native", "io_uring"])?
                .as_deref()
            {
                Some("native") => super::file::Aio::Native,
                Some("io_uring") => super::file::Aio::IoUring,
                _ => super::file::Aio::Threads,
            };
            let _ = o.opt_int("aio-max-batch")?;
            let _ = o.opt_bool("drop-cache")?;
            let _ = o.opt_bool("x-check-cache-dropped")?;
            DriverSpec::File {
                filename,
                locking,
                host_device: driver == "host_device",
                aio,
            }
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
            file: req_child(&mut o, "file")?,
            offset: o.opt_int("offset")?,
            size: o.opt_int("size")?,
        },
        "qcow2" => {
            let file = req_child(&mut o, "file")?;
            let backing = opt_backing(&mut o, "backing")?;
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
            let image = req_child(&mut o, "image")?;
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
                    .map(|(i, v)| parse_inject(v, &format!("{}[{i}]", o.name("inject-error"))))
                    .collect::<Result<_>>()?,
            };
            let set_state = match o.opt_list("set-state")? {
                None => Vec::new(),
                Some(list) => list
                    .iter()
                    .enumerate()
                    .map(|(i, v)| parse_set_state(v, &format!("{}[{i}]", o.name("set-state"))))
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
        "copy-before-write" => {
            let file = req_child(&mut o, "file")?;
            let target = req_child(&mut o, "target")?;
            let bitmap = match o.opt_obj("bitmap")? {
                None => None,
                Some(mut b) => {
                    let node = b.req_str("node")?;
                    let name = b.req_str("name")?;
                    b.finish()?;
                    Some((node, name))
                }
            };
            let on_cbw_error =
                o.opt_enum("on-cbw-error", &["break-guest-write", "break-snapshot"])?;
            let cbw_timeout = o.opt_u32("cbw-timeout")?.unwrap_or(0);
            let min_cluster_size = o.opt_u64("min-cluster-size")?.unwrap_or(0);
            DriverSpec::CopyBeforeWrite {
                file,
                target,
                bitmap,
                on_cbw_error,
                cbw_timeout,
                min_cluster_size,
            }
        }
        "snapshot-access" => DriverSpec::SnapshotAccess {
            file: req_child(&mut o, "file")?,
        },
        "blklogwrites" => DriverSpec::Blklogwrites {
            file: req_child(&mut o, "file")?,
            log: req_child(&mut o, "log")?,
            opts: super::blklogwrites::BlklogwritesOptions {
                log_sector_size: o.opt_u32("log-sector-size")?,
                log_append: o.opt_bool("log-append")?.unwrap_or(false),
                log_super_update_interval: opt_uint64(&mut o, "log-super-update-interval")?,
            },
        },
        "nbd" => DriverSpec::Nbd {
            opts: Box::new(NbdOptions::parse(&mut o)?),
            conn: Preconnected::default(),
        },
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
        force_share,
        driver: spec,
    })
}

/// A `uint64` member with the text QEMU's visitor gives for anything but
/// an unsigned number (recorded with qemu-storage-daemon 10 for
/// blklogwrites).
fn opt_uint64<'a>(o: &mut Obj<'a>, key: &'a str) -> Result<Option<u64>> {
    let name = o.name(key);
    match o.get(key) {
        None => Ok(None),
        Some(Value::Number(n)) if n.is_u64() => Ok(n.as_u64()),
        Some(_) => Err(Error::generic(format!("Parameter '{name}' expects uint64"))),
    }
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

// ---- blockdev-add from a command line ------------------------------------------

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
    "abstract",
    "tight",
    "numeric",
    "ipv4",
    "ipv6",
    "keep-alive",
    "mptcp",
    "log-append",
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
    "reconnect-delay",
    "open-timeout",
    "to",
    "keep-alive-count",
    "keep-alive-idle",
    "keep-alive-interval",
    "log-sector-size",
    "log-super-update-interval",
];

/// blockdev-add's typed JSON from a keyval `--blockdev`: the boolean and
/// integer members converted, `backing=` (empty) meaning null, as QEMU's
/// keyval visitor does for these members. Other values stay strings.
pub fn blockdev_from_keyval(text: &str) -> Result<Value, String> {
    let mut v = Value::Object(keyval::keyval_parse(text, Some("driver"))?);
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
                    keyval::parse_bool(s)
                        .ok_or_else(|| format!("Parameter '{path}' expects 'on' or 'off'"))?,
                );
            } else if INT_MEMBERS.contains(&member) {
                *v = Value::from(
                    keyval::parse_int(s)
                        .ok_or_else(|| format!("Parameter '{path}' expects integer"))?,
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

    #[test]
    fn blockdev_from_keyval_types_members() {
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
        // nbd: numbers typed, the port kept a string (QAPI's `str`).
        let v = blockdev_from_keyval(
            "driver=nbd,node-name=n,server.type=inet,server.host=h,server.port=10809,\
             reconnect-delay=5,open-timeout=2",
        )
        .unwrap();
        assert_eq!(
            v,
            json!({"driver":"nbd","node-name":"n","server":{"type":"inet","host":"h",
                "port":"10809"},"reconnect-delay":5,"open-timeout":2})
        );
        assert!(parse(&v).is_ok());
        // blklogwrites from a command line: its numbers and flag typed.
        let v = blockdev_from_keyval(
            "driver=blklogwrites,node-name=l,file=f,log=g,log-sector-size=4096,\
             log-super-update-interval=16,log-append=off",
        )
        .unwrap();
        assert_eq!(
            v,
            json!({"driver":"blklogwrites","node-name":"l","file":"f","log":"g",
                "log-sector-size":4096,"log-super-update-interval":16,"log-append":false})
        );
        assert!(parse(&v).is_ok());
    }
}
