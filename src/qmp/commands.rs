//! The QMP commands: arguments checked the way QEMU's QAPI visitor checks
//! them (members in QEMU's declaration order, `Parameter 'x' is missing`,
//! `Invalid parameter type for 'x', expected: …`, `Parameter 'x' is
//! unexpected`), then the Rust call.

use std::sync::Arc;

use serde_json::{Value, json};

use crate::block::Node;
use crate::block::dirty_bitmap::{self as named, BitmapRef};
use crate::block::graph::Graph;
use crate::block_jobs::commit::CommitOptions;
use crate::block_jobs::mirror::MirrorOptions;
use crate::block_jobs::stream::StreamOptions;
use crate::context::Context;
use crate::engine::{Job, JobChange};
use crate::error::{Error, ErrorClass, Result};
use crate::qapi::visitor::{Obj, type_err};
use crate::qapi::{BlockdevOnError, JobType, MirrorCopyMode, MirrorSyncMode};

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

/// An optional `uint32` member (QEMU's visitor: a number, else
/// `Parameter 'x' expects uint64`; too large: `... expects uint32_t`).
fn opt_u32(o: &mut Obj<'_>, key: &'static str) -> Result<Option<u32>> {
    match o.get(key) {
        None => Ok(None),
        // Integers: in range or "uint32_t" (negative ones too: QEMU takes
        // them as uint64 first); anything else is not a uint64.
        Some(Value::Number(n)) if n.is_u64() || n.is_i64() => n
            .as_u64()
            .and_then(|v| u32::try_from(v).ok())
            .map(Some)
            .ok_or_else(|| Error::generic(format!("Parameter '{key}' expects uint32_t"))),
        Some(_) => Err(Error::generic(format!("Parameter '{key}' expects uint64"))),
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
        "block-dirty-bitmap-add" => {
            let node = o.req_str("node")?;
            let bname = o.req_str("name")?;
            let granularity = opt_u32(o, "granularity")?;
            let persistent = o.opt_bool("persistent")?;
            let disabled = o.opt_bool("disabled")?;
            o.finish_ref()?;
            ok(named::add(
                ctx.graph(),
                &node,
                &bname,
                granularity,
                persistent,
                disabled,
            ))
        }
        "block-dirty-bitmap-remove"
        | "block-dirty-bitmap-clear"
        | "block-dirty-bitmap-enable"
        | "block-dirty-bitmap-disable" => {
            let node = o.req_str("node")?;
            let bname = o.req_str("name")?;
            o.finish_ref()?;
            let g = ctx.graph();
            ok(match name {
                "block-dirty-bitmap-remove" => named::remove(g, &node, &bname),
                "block-dirty-bitmap-clear" => named::clear(g, &node, &bname),
                "block-dirty-bitmap-enable" => named::set_recording(g, &node, &bname, true),
                _ => named::set_recording(g, &node, &bname, false),
            })
        }
        "block-dirty-bitmap-merge" => {
            let node = o.req_str("node")?;
            let target = o.req_str("target")?;
            let list = o.opt_list("bitmaps")?.ok_or_else(|| o.missing("bitmaps"))?;
            let refs = list
                .iter()
                .enumerate()
                .map(|(i, v)| bitmap_ref(v, i))
                .collect::<Result<Vec<_>>>()?;
            o.finish_ref()?;
            ok(named::merge(ctx.graph(), &node, &target, &refs))
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
    m.granularity = opt_u32(o, "granularity")?.unwrap_or(0) as u64;
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
        "cache": {"writeback": true, "direct": false, "no-flush": false},
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
    }
    if let Some(cs) = n.cluster_size() {
        image["cluster-size"] = json!(cs);
    }
    image
}
