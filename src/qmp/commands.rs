//! The QMP commands: arguments checked the way QEMU's QAPI visitor checks
//! them (members in QEMU's declaration order, `Parameter 'x' is missing`,
//! `Invalid parameter type for 'x', expected: …`, `Parameter 'x' is
//! unexpected`), then the Rust call.

use std::sync::Arc;

use serde_json::{Value, json};

use crate::block::Node;
use crate::block::dirty_bitmap::{self as named, BitmapRef};
use crate::block::graph::Graph;
use crate::block::snapshot::{NewImageMode, SnapshotSync};
use crate::block_jobs::backup::{BackupOptions, BackupPerf};
use crate::block_jobs::commit::CommitOptions;
use crate::block_jobs::mirror::MirrorOptions;
use crate::block_jobs::stream::StreamOptions;
use crate::context::Context;
use crate::engine::{Job, JobChange};
use crate::error::{Error, ErrorClass, Result};
use crate::export::{BlockExportOptions, BlockExportRemoveMode, NbdServerOptions};
use crate::nbd::transport::SocketAddress;
use crate::qapi::visitor::{Obj, type_err};
use crate::qapi::{BitmapSyncMode, BlockdevOnError, JobType, MirrorCopyMode, MirrorSyncMode};
use crate::transaction::{Action, ActionCompletionMode};

/// Every command, as `query-commands` lists them.
pub const COMMANDS: &[&str] = &[
    "qmp_capabilities",
    "query-version",
    "query-commands",
    "quit",
    "blockdev-add",
    "blockdev-del",
    "query-named-block-nodes",
    "blockdev-mirror",
    "blockdev-backup",
    "blockdev-snapshot",
    "blockdev-snapshot-sync",
    "transaction",
    "block-stream",
    "block-commit",
    "block-job-set-speed",
    "block-job-change",
    "block-job-pause",
    "block-job-resume",
    "block-job-cancel",
    "block-job-complete",
    "block-job-finalize",
    "block-job-dismiss",
    "job-pause",
    "job-resume",
    "job-cancel",
    "job-complete",
    "job-finalize",
    "job-dismiss",
    "query-block-jobs",
    "query-jobs",
    "block-dirty-bitmap-add",
    "block-dirty-bitmap-remove",
    "block-dirty-bitmap-clear",
    "block-dirty-bitmap-enable",
    "block-dirty-bitmap-disable",
    "block-dirty-bitmap-merge",
    "x-debug-block-dirty-bitmap-sha256",
    "nbd-server-start",
    "nbd-server-stop",
    "nbd-server-add",
    "nbd-server-remove",
    "block-export-add",
    "block-export-del",
    "query-block-exports",
    "object-add",
    "object-del",
];

/// `qmp_capabilities`' arguments: `enable`, a list of capabilities.
pub fn check_capabilities(args: &Value) -> Result<()> {
    let mut o = Obj::new(args, "")?;
    if let Some(list) = o.opt_list("enable")? {
        for v in list {
            match v.as_str() {
                Some("oob") => {}
                Some(other) => {
                    return Err(Error::generic(format!(
                        "Parameter 'enable' does not accept value '{other}'"
                    )));
                }
                None => return Err(type_err("enable[0]", "string")),
            }
        }
    }
    o.finish()
}

/// A command without arguments.
pub fn no_arguments(args: &Value) -> Result<()> {
    Obj::new(args, "")?.finish()
}

/// An optional enum member with QEMU's text for a bad value.
fn opt_wire<T>(
    o: &mut Obj<'_>,
    key: &'static str,
    parse: fn(&str) -> Option<T>,
) -> Result<Option<T>> {
    match o.opt_str(key)? {
        None => Ok(None),
        Some(s) => parse(&s).map(Some).ok_or_else(|| {
            Error::generic(format!("Parameter '{key}' does not accept value '{s}'"))
        }),
    }
}

fn on_error(o: &mut Obj<'_>, key: &'static str) -> Result<BlockdevOnError> {
    Ok(opt_wire(o, key, BlockdevOnError::from_wire)?.unwrap_or(BlockdevOnError::Report))
}

fn ok<T>(r: Result<T>) -> Result<Value> {
    r.map(|_| json!({}))
}

/// Run command `name` with `args` (an object).
pub fn dispatch(ctx: &Context, name: &str, args: &Value) -> Result<Value> {
    let engine = ctx.engine();
    // The job is looked up after every argument was visited, as QEMU's
    // generated code does.
    let block_job = |o: &mut Obj<'_>, key: &'static str| -> Result<Arc<Job>> {
        let id = o.req_str(key)?;
        o.finish_ref()?;
        engine.find_block_job(&id)
    };
    let job = |o: &mut Obj<'_>| -> Result<Arc<Job>> {
        let id = o.req_str("id")?;
        o.finish_ref()?;
        engine.find_job(&id)
    };
    // blockdev-add takes the whole object as node options.
    if name == "blockdev-add" {
        return ok(ctx.blockdev_add(args));
    }
    // So does object-add (QEMU 10's flat ObjectOptions).
    match name {
        "object-add" => return ok(super::object::object_add(ctx, args, false)),
        "object-del" => return ok(super::object::object_del(ctx, args)),
        _ => {}
    }
    let mut o = Obj::new(args, "")?;
    let o = &mut o;
    let r = match name {
        "query-version" => Ok(super::version()),
        "query-commands" => Ok(Value::Array(
            COMMANDS.iter().map(|c| json!({ "name": c })).collect(),
        )),
        "query-block-jobs" => Ok(serde_json::to_value(ctx.query_block_jobs()).unwrap_or_default()),
        "query-jobs" => Ok(serde_json::to_value(ctx.query_jobs()).unwrap_or_default()),
        "query-named-block-nodes" => {
            let flat = o.opt_bool("flat")?.unwrap_or(false);
            Ok(Value::Array(
                ctx.graph()
                    .nodes()
                    .iter()
                    .map(|n| node_info(ctx.graph(), n, flat))
                    .collect(),
            ))
        }
        "blockdev-del" => {
            let name = o.req_str("node-name")?;
            o.finish_ref()?;
            ok(ctx.blockdev_del(&name))
        }
        "blockdev-mirror" => ok(blockdev_mirror(ctx, o)),
        "blockdev-backup" => ok(blockdev_backup(o).and_then(|b| ctx.blockdev_backup(b))),
        "block-stream" => ok(block_stream(ctx, o)),
        "block-commit" => ok(block_commit(ctx, o)),
        "block-job-set-speed" => {
            let id = o.req_str("device")?;
            let speed = o.req_int("speed")?;
            o.finish_ref()?;
            ok(engine.find_block_job(&id)?.set_speed(speed))
        }
        "block-job-change" => {
            let opts = block_job_change(o)?;
            ok(engine.find_block_job(&opts.0)?.change(&opts.1))
        }
        "block-job-pause" => block_job(o, "device").and_then(|j| ok(j.user_pause())),
        "block-job-resume" => block_job(o, "device").and_then(|j| ok(j.user_resume())),
        "block-job-cancel" => {
            let id = o.req_str("device")?;
            let force = o.opt_bool("force")?.unwrap_or(false);
            o.finish_ref()?;
            ok(engine.find_block_job(&id)?.block_job_cancel(force))
        }
        "block-job-complete" => block_job(o, "device").and_then(|j| ok(j.complete())),
        "block-job-finalize" => block_job(o, "id").and_then(|j| ok(j.finalize())),
        "block-job-dismiss" => block_job(o, "id").and_then(|j| ok(j.dismiss())),
        "job-pause" => job(o).and_then(|j| ok(j.user_pause())),
        "job-resume" => job(o).and_then(|j| ok(j.user_resume())),
        // job-cancel is always a forced cancel.
        "job-cancel" => job(o).and_then(|j| ok(j.user_cancel(true))),
        "job-complete" => job(o).and_then(|j| ok(j.complete())),
        "job-finalize" => job(o).and_then(|j| ok(j.finalize())),
        "job-dismiss" => job(o).and_then(|j| ok(j.dismiss())),
        "block-dirty-bitmap-add"
        | "block-dirty-bitmap-remove"
        | "block-dirty-bitmap-clear"
        | "block-dirty-bitmap-enable"
        | "block-dirty-bitmap-disable"
        | "block-dirty-bitmap-merge"
        | "blockdev-snapshot"
        | "blockdev-snapshot-sync" => {
            let a = action(name, o)?;
            o.finish_ref()?;
            ok(ctx.run_action(a))
        }
        "transaction" => {
            let (actions, mode) = transaction(o)?;
            ok(ctx.transaction(actions, mode))
        }
        "nbd-server-start" => {
            ok(nbd_server_start(o).and_then(|n| ctx.exports().nbd_server_start(n)))
        }
        "nbd-server-stop" => {
            o.finish_ref()?;
            ok(ctx.exports().nbd_server_stop())
        }
        "block-export-add" => {
            ok(block_export_add(o).and_then(|e| ctx.exports().block_export_add(&e)))
        }
        "block-export-del" => {
            let id = o.req_str("id")?;
            let mode = opt_wire(o, "mode", BlockExportRemoveMode::from_wire)?.unwrap_or_default();
            o.finish_ref()?;
            ok(ctx.exports().block_export_del(&id, mode))
        }
        "nbd-server-add" => ok(nbd_server_add(ctx, o)),
        "nbd-server-remove" => {
            let name = o.req_str("name")?;
            let mode = opt_wire(o, "mode", BlockExportRemoveMode::from_wire)?.unwrap_or_default();
            o.finish_ref()?;
            ok(ctx.exports().nbd_server_remove(&name, mode))
        }
        "query-block-exports" => {
            Ok(serde_json::to_value(ctx.exports().query_block_exports()).unwrap_or_default())
        }
        "x-debug-block-dirty-bitmap-sha256" => {
            let node = o.req_str("node")?;
            let bname = o.req_str("name")?;
            o.finish_ref()?;
            named::sha256(ctx.graph(), &node, &bname).map(|h| json!({ "sha256": h }))
        }
        _ => {
            return Err(Error::with_class(
                ErrorClass::CommandNotFound,
                format!("The command {name} has not been found"),
            ));
        }
    }?;
    o.finish_ref()?;
    Ok(r)
}

/// `nbd-server-start`'s arguments in QEMU's member order; `addr` is
/// QEMU's `SocketAddressLegacy` (`{"type": "unix", "data": {"path"}}` or
/// `{"type": "inet", "data": {"host", "port"}}`).
fn nbd_server_start(o: &mut Obj<'_>) -> Result<NbdServerOptions> {
    let handshake = o.opt_u32("handshake-max-seconds")?;
    let tls_creds = o.opt_str("tls-creds")?;
    let tls_authz = o.opt_str("tls-authz")?;
    let max_connections = o.opt_u32("max-connections")?.unwrap_or(0);
    let mut a = o.opt_obj("addr")?.ok_or_else(|| o.missing("addr"))?;
    let kind = opt_wire(&mut a, "type", |s| {
        ["inet", "unix", "vsock", "fd"]
            .contains(&s)
            .then(|| s.to_string())
    })?
    .ok_or_else(|| a.missing("type"))?;
    let mut d = a.opt_obj("data")?.ok_or_else(|| a.missing("data"))?;
    let addr = match kind.as_str() {
        "unix" => {
            let path = d.req_str("path")?;
            let _abstract = d.opt_bool("abstract")?;
            let _tight = d.opt_bool("tight")?;
            SocketAddress::Unix { path: path.into() }
        }
        "inet" => {
            let host = d.req_str("host")?;
            let port = d.req_str("port")?;
            let _numeric = d.opt_bool("numeric")?;
            let _to = d.opt_u16("to")?;
            let _ipv4 = d.opt_bool("ipv4")?;
            let _ipv6 = d.opt_bool("ipv6")?;
            let _keep_alive = d.opt_bool("keep-alive")?;
            let _mptcp = d.opt_bool("mptcp")?;
            SocketAddress::Inet { host, port }
        }
        other => {
            return Err(Error::generic(format!(
                "NBD server addresses of type '{other}' are not supported by blockjob"
            )));
        }
    };
    d.finish()?;
    a.finish()?;
    o.finish_ref()?;
    let mut n = NbdServerOptions::new(addr);
    n.tls_creds = tls_creds;
    n.tls_authz = tls_authz;
    n.max_connections = max_connections;
    if let Some(h) = handshake {
        n.handshake_max_seconds = h;
    }
    Ok(n)
}

/// `block-export-add`'s arguments in QEMU's member order (the common
/// members, then `BlockExportOptionsNbd`'s).
fn block_export_add(o: &mut Obj<'_>) -> Result<BlockExportOptions> {
    let kind = opt_wire(o, "type", |s| {
        ["nbd", "vhost-user-blk", "fuse", "vduse-blk"]
            .contains(&s)
            .then(|| s.to_string())
    })?
    .ok_or_else(|| o.missing("type"))?;
    let mut e = BlockExportOptions {
        id: o.req_str("id")?,
        fixed_iothread: o.opt_bool("fixed-iothread")?.unwrap_or(false),
        iothread: o.opt_str("iothread")?,
        node_name: o.req_str("node-name")?,
        writable: o.opt_bool("writable")?.unwrap_or(false),
        writethrough: o.opt_bool("writethrough")?.unwrap_or(false),
        ..Default::default()
    };
    let _allow_inactive = o.opt_bool("allow-inactive")?;
    if kind != "nbd" {
        return Err(Error::generic(format!(
            "Export type '{kind}' is not supported by blockjob"
        )));
    }
    e.name = o.opt_str("name")?;
    e.description = o.opt_str("description")?;
    if let Some(list) = o.opt_list("bitmaps")? {
        e.bitmaps = list
            .iter()
            .enumerate()
            .map(|(i, v)| bitmap_ref(v, i))
            .collect::<Result<Vec<_>>>()?;
    }
    e.allocation_depth = o.opt_bool("allocation-depth")?.unwrap_or(false);
    o.finish_ref()?;
    Ok(e)
}

/// `nbd-server-add` (deprecated in QEMU): an NBD export whose id and
/// name are `name` (default: `device`), read-only when the node is.
fn nbd_server_add(ctx: &Context, o: &mut Obj<'_>) -> Result<()> {
    let name = o.opt_str("name")?;
    let description = o.opt_str("description")?;
    let device = o.req_str("device")?;
    let writable = o.opt_bool("writable")?.unwrap_or(false);
    let bitmap = o.opt_str("bitmap")?;
    o.finish_ref()?;
    let node = ctx.graph().lookup(&device)?;
    let name = name.unwrap_or_else(|| device.clone());
    ctx.exports().block_export_add(&BlockExportOptions {
        id: name.clone(),
        node_name: node.name().to_string(),
        writable: writable && !node.is_read_only(),
        name: Some(name),
        description,
        bitmaps: bitmap.map(BitmapRef::Name).into_iter().collect(),
        ..Default::default()
    })
}

/// `transaction`'s arguments: the actions (each `{"type", "data"}`, the
/// data visited as its command's arguments under `actions[i].data`) and
/// `properties.completion-mode`.
fn transaction(o: &mut Obj<'_>) -> Result<(Vec<Action>, ActionCompletionMode)> {
    let list = o.opt_list("actions")?.ok_or_else(|| o.missing("actions"))?;
    let mut actions = Vec::with_capacity(list.len());
    for (i, v) in list.iter().enumerate() {
        let mut a = Obj::new(v, &format!("actions[{i}]"))?;
        let kind = a.req_str("type")?;
        if !is_action(&kind) {
            return Err(Error::generic(format!(
                "Parameter 'type' does not accept value '{kind}'"
            )));
        }
        let mut data = a.opt_obj("data")?.ok_or_else(|| a.missing("data"))?;
        actions.push(action(&kind, &mut data)?);
        data.finish()?;
        a.finish()?;
    }
    let mut mode = ActionCompletionMode::Individual;
    if let Some(mut p) = o.opt_obj("properties")? {
        if let Some(m) = opt_wire(&mut p, "completion-mode", ActionCompletionMode::from_wire)? {
            mode = m;
        }
        p.finish()?;
    }
    o.finish_ref()?;
    Ok((actions, mode))
}

/// QEMU 10's `TransactionActionKind`s we run: `abort` and the commands
/// of the same names.
fn is_action(kind: &str) -> bool {
    kind == "abort"
        || (kind.starts_with("block-dirty-bitmap-") && COMMANDS.contains(&kind))
        || matches!(
            kind,
            "blockdev-backup" | "blockdev-snapshot" | "blockdev-snapshot-sync"
        )
}

/// The arguments of an action (or of its command), in QEMU's member order.
fn action(kind: &str, o: &mut Obj<'_>) -> Result<Action> {
    Ok(match kind {
        "abort" => Action::Abort,
        "block-dirty-bitmap-add" => Action::BitmapAdd {
            node: o.req_str("node")?,
            name: o.req_str("name")?,
            granularity: o.opt_u32("granularity")?,
            persistent: o.opt_bool("persistent")?,
            disabled: o.opt_bool("disabled")?,
        },
        "block-dirty-bitmap-merge" => {
            let node = o.req_str("node")?;
            let target = o.req_str("target")?;
            let list = o.opt_list("bitmaps")?.ok_or_else(|| o.missing("bitmaps"))?;
            let bitmaps = list
                .iter()
                .enumerate()
                .map(|(i, v)| bitmap_ref(v, i))
                .collect::<Result<Vec<_>>>()?;
            Action::BitmapMerge {
                node,
                target,
                bitmaps,
            }
        }
        "blockdev-backup" => Action::BlockdevBackup(blockdev_backup(o)?),
        "blockdev-snapshot" => Action::BlockdevSnapshot {
            node: o.req_str("node")?,
            overlay: o.req_str("overlay")?,
        },
        "blockdev-snapshot-sync" => Action::BlockdevSnapshotSync(SnapshotSync {
            device: o.opt_str("device")?,
            node_name: o.opt_str("node-name")?,
            snapshot_file: o.req_str("snapshot-file")?,
            snapshot_node_name: o.opt_str("snapshot-node-name")?,
            format: o.opt_str("format")?,
            mode: opt_wire(o, "mode", NewImageMode::from_wire)?
                .unwrap_or(NewImageMode::AbsolutePaths),
        }),
        // The four that name one bitmap.
        _ => {
            let node = o.req_str("node")?;
            let name = o.req_str("name")?;
            match kind {
                "block-dirty-bitmap-remove" => Action::BitmapRemove { node, name },
                "block-dirty-bitmap-clear" => Action::BitmapClear { node, name },
                _ => Action::BitmapRecording {
                    node,
                    name,
                    enable: kind == "block-dirty-bitmap-enable",
                },
            }
        }
    })
}

fn bitmap_ref(v: &Value, i: usize) -> Result<BitmapRef> {
    // (`i` names an object element's members, as QEMU does.)
    match v {
        Value::String(s) => Ok(BitmapRef::Name(s.clone())),
        Value::Object(_) => {
            let mut o = Obj::new(v, &format!("bitmaps[{i}]"))?;
            let node = o.req_str("node")?;
            let name = o.req_str("name")?;
            o.finish()?;
            Ok(BitmapRef::Node { node, name })
        }
        // QEMU names a bad list element 'null' here.
        _ => Err(type_err("null", "BlockDirtyBitmapOrStr")),
    }
}

/// The common tail of the job commands.
fn auto_flags(o: &mut Obj<'_>) -> Result<(bool, bool)> {
    Ok((
        o.opt_bool("auto-finalize")?.unwrap_or(true),
        o.opt_bool("auto-dismiss")?.unwrap_or(true),
    ))
}

fn blockdev_mirror(ctx: &Context, o: &mut Obj<'_>) -> Result<Arc<Job>> {
    let job_id = o.opt_str("job-id")?;
    let device = o.req_str("device")?;
    let target = o.req_str("target")?;
    let replaces = o.opt_str("replaces")?;
    let sync = opt_wire(o, "sync", MirrorSyncMode::from_wire)?.ok_or_else(|| o.missing("sync"))?;
    let mut m = MirrorOptions::new(&device, &target, sync);
    m.job_id = job_id;
    m.replaces = replaces;
    m.speed = o.opt_int("speed")?.unwrap_or(0);
    m.granularity = o.opt_u32("granularity")?.unwrap_or(0) as u64;
    m.buf_size = o.opt_int("buf-size")?.unwrap_or(0);
    m.on_source_error = on_error(o, "on-source-error")?;
    m.on_target_error = on_error(o, "on-target-error")?;
    m.filter_node_name = o.opt_str("filter-node-name")?;
    m.copy_mode =
        opt_wire(o, "copy-mode", MirrorCopyMode::from_wire)?.unwrap_or(MirrorCopyMode::Background);
    (m.auto_finalize, m.auto_dismiss) = auto_flags(o)?;
    o.finish_ref()?;
    ctx.blockdev_mirror(m)
}

/// `blockdev-backup`'s arguments, in QEMU's order (`BackupCommon`, then
/// `target`).
pub(crate) fn blockdev_backup(o: &mut Obj<'_>) -> Result<BackupOptions> {
    let job_id = o.opt_str("job-id")?;
    let device = o.req_str("device")?;
    let sync = opt_wire(o, "sync", MirrorSyncMode::from_wire)?.ok_or_else(|| o.missing("sync"))?;
    let mut b = BackupOptions::new(&device, "", sync);
    b.job_id = job_id;
    b.speed = o.opt_int("speed")?.unwrap_or(0);
    b.bitmap = o.opt_str("bitmap")?;
    b.bitmap_mode = opt_wire(o, "bitmap-mode", BitmapSyncMode::from_wire)?;
    b.compress = o.opt_bool("compress")?.unwrap_or(false);
    b.on_source_error = on_error(o, "on-source-error")?;
    b.on_target_error = on_error(o, "on-target-error")?;
    (b.auto_finalize, b.auto_dismiss) = auto_flags(o)?;
    b.filter_node_name = o.opt_str("filter-node-name")?;
    b.discard_source = o.opt_bool("discard-source")?.unwrap_or(false);
    if let Some(mut p) = o.opt_obj("x-perf")? {
        let d = BackupPerf::default();
        b.perf = BackupPerf {
            use_copy_range: p.opt_bool("use-copy-range")?.unwrap_or(d.use_copy_range),
            max_workers: p.opt_int("max-workers")?.unwrap_or(d.max_workers),
            max_chunk: p.opt_int("max-chunk")?.unwrap_or(d.max_chunk),
            min_cluster_size: p.opt_u64("min-cluster-size")?.unwrap_or(0),
        };
        p.finish()?;
    }
    b.target = o.req_str("target")?;
    o.finish_ref()?;
    Ok(b)
}

/// `block-job-change`'s arguments: `id`, and QEMU's union on `type`
/// (only `mirror` has members: `copy-mode`, required).
fn block_job_change(o: &mut Obj<'_>) -> Result<(String, JobChange)> {
    let id = o.req_str("id")?;
    let job_type = opt_wire(o, "type", JobType::from_wire)?.ok_or_else(|| o.missing("type"))?;
    let mut change = JobChange::default();
    if job_type == JobType::Mirror {
        change.copy_mode = opt_wire(o, "copy-mode", MirrorCopyMode::from_wire)?
            .ok_or_else(|| o.missing("copy-mode"))?;
    }
    o.finish_ref()?;
    Ok((id, change))
}

fn block_stream(ctx: &Context, o: &mut Obj<'_>) -> Result<Arc<Job>> {
    let job_id = o.opt_str("job-id")?;
    let mut s = StreamOptions::new(&o.req_str("device")?);
    s.job_id = job_id;
    s.base = o.opt_str("base")?;
    s.base_node = o.opt_str("base-node")?;
    s.backing_file = o.opt_str("backing-file")?;
    let _mask = o.opt_bool("backing-mask-protocol")?;
    s.bottom = o.opt_str("bottom")?;
    s.speed = o.opt_int("speed")?.unwrap_or(0);
    s.on_error = on_error(o, "on-error")?;
    s.filter_node_name = o.opt_str("filter-node-name")?;
    (s.auto_finalize, s.auto_dismiss) = auto_flags(o)?;
    o.finish_ref()?;
    ctx.block_stream(s)
}

fn block_commit(ctx: &Context, o: &mut Obj<'_>) -> Result<Arc<Job>> {
    let job_id = o.opt_str("job-id")?;
    let mut c = CommitOptions::new(&o.req_str("device")?);
    c.job_id = job_id;
    c.base_node = o.opt_str("base-node")?;
    c.base = o.opt_str("base")?;
    c.top_node = o.opt_str("top-node")?;
    c.top = o.opt_str("top")?;
    c.backing_file = o.opt_str("backing-file")?;
    let _mask = o.opt_bool("backing-mask-protocol")?;
    c.speed = o.opt_int("speed")?.unwrap_or(0);
    c.on_error = on_error(o, "on-error")?;
    c.filter_node_name = o.opt_str("filter-node-name")?;
    (c.auto_finalize, c.auto_dismiss) = auto_flags(o)?;
    o.finish_ref()?;
    ctx.block_commit(c)
}

/// `query-named-block-nodes`' BlockDeviceInfo, the members we can fill.
/// Unless `flat`, the image info nests the chain below the node (backing
/// files and filtered children, as QEMU's `bdrv_filter_or_cow_bs` walks
/// it) and `backing_file_depth` counts its steps; flat, it is 0.
fn node_info(graph: &Graph, n: &Arc<Node>, flat: bool) -> Value {
    let mut v = json!({
        "node-name": n.name(),
        "drv": n.driver_name(),
        "file": n.filename(),
        "ro": n.is_read_only(),
        "encrypted": false,
        "detect_zeroes": "off",
        "bps": 0, "bps_rd": 0, "bps_wr": 0, "iops": 0, "iops_rd": 0, "iops_wr": 0,
        "write_threshold": 0,
        "backing_file_depth": 0,
        "cache": {"writeback": true, "direct": n.cache().0, "no-flush": n.cache().1},
        "active": true,
    });
    // An optional member in QEMU: absent when the node has no bitmaps.
    let bitmaps = named::query(graph, n.name()).unwrap_or_default();
    if !bitmaps.is_empty() {
        v["dirty-bitmaps"] = serde_json::to_value(bitmaps).unwrap_or_default();
    }
    if let Some(b) = n.backing() {
        v["backing_file"] = json!(b.filename());
    }
    let mut image = image_info(n);
    if !flat {
        // Each level's image info nests the next one's.
        let mut levels = Vec::new();
        let mut cur = n.clone();
        while let Some(next) = cur.backing().or_else(|| cur.driver().filtered_child()) {
            levels.push(image_info(&next));
            cur = next;
        }
        v["backing_file_depth"] = json!(levels.len());
        let mut below: Option<Value> = None;
        for mut level in levels.into_iter().rev() {
            if let Some(b) = below.take() {
                level["backing-image"] = b;
            }
            below = Some(level);
        }
        if let Some(b) = below {
            image["backing-image"] = b;
        }
    }
    v["image"] = image;
    v
}

/// One level of a node's `image` member (QEMU's `ImageInfo`).
fn image_info(n: &Arc<Node>) -> Value {
    let mut image = json!({
        "filename": n.filename(),
        "format": n.driver_name(),
        "virtual-size": n.len().unwrap_or(0),
        "dirty-flag": false,
    });
    // QEMU: the allocated size of the file behind the node, when it has one.
    if let Ok(meta) = std::fs::metadata(n.filename()) {
        use std::os::unix::fs::MetadataExt;
        image["actual-size"] = json!(meta.blocks() * 512);
    }
    if let Some(b) = n.backing() {
        image["backing-filename"] = json!(b.filename());
    } else if let Some((name, _)) = (n.driver() as &dyn std::any::Any)
        .downcast_ref::<crate::block::qcow2::Qcow2Driver>()
        .and_then(|q| q.header_backing())
    {
        // Opened without its backing layer (`"backing": null`): QEMU shows
        // what the header names.
        image["backing-filename"] = json!(name);
    }
    if let Some(cs) = n.cluster_size() {
        image["cluster-size"] = json!(cs);
    }
    image
}
