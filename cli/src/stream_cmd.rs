//! `blockjob stream IMAGE`: QEMU's block-stream as a one-shot command.
//! The data of IMAGE's backing files down to (not including) `base` is
//! copied into IMAGE, then IMAGE's header points at `base` (or at nothing
//! when the whole chain was streamed). The job is driven by
//! [`crate::drive`]; at the end the command says which backing file IMAGE
//! now names.

use blockjob::block::chain;
use blockjob::block_jobs::stream::StreamOptions;
use blockjob::{Context, Result};
use clap::Args;
use serde_json::json;

use crate::drive::{Control, OnError, on_error, print_stats, run_job, signed, size_arg};
use crate::image::{Format, Image, absolute, backing_file_name, chain_text, find_layer};
use crate::size::human;

/// Arguments of `blockjob stream` (QEMU's block-stream names).
#[derive(Args, Debug, Clone)]
#[command(after_help = "\
QMP equivalent: {\"execute\": \"block-stream\", \"arguments\": {\"device\": IMAGE, \"base\": FILE}}.
The guest view of IMAGE does not change; the layers above base stay on disk, unused.

Examples:
  blockjob stream top.qcow2                        # flatten: top.qcow2 no longer needs a backing file
  blockjob stream top.qcow2 --base base.qcow2      # pull mid.qcow2 into top.qcow2; top -> base.qcow2")]
pub struct StreamArgs {
    /// The image to stream into (the active layer): a qcow2 path, or
    /// json:{blockdev-add options}.
    pub image: String,
    /// `base`: the file name of the backing file to keep (a layer of
    /// IMAGE's chain); the layers above it are copied into IMAGE. Default:
    /// copy the whole chain, leaving IMAGE without a backing file.
    #[arg(long, value_name = "FILE")]
    pub base: Option<String>,
    /// `base-node`: like --base, by node name (with json: images).
    #[arg(long, value_name = "NAME")]
    pub base_node: Option<String>,
    /// `backing-file`: the name to write into IMAGE's header for the base
    /// (default: the base's file name). Needs --base or --base-node.
    #[arg(long, value_name = "NAME")]
    pub backing_file: Option<String>,
    /// `job-id`.
    #[arg(long, default_value = "stream0")]
    pub job_id: String,
    /// `speed` in bytes per second (K/M/G suffixes); 0 = unlimited.
    #[arg(long, value_parser = size_arg, default_value = "0")]
    pub speed: u64,
    /// `on-error` (errors reading the backing files or writing IMAGE).
    #[arg(long, value_enum, default_value = "report")]
    pub on_error: OnError,
    #[command(flatten)]
    pub ctl: Control,
}

/// Open IMAGE with its chain, stream, report the new backing file.
pub fn run(a: &StreamArgs) -> Result<()> {
    let ctx = Context::new();
    let events = ctx.subscribe();
    let img = Image::parse(&a.image)?;
    let (opts, name) = img.blockdev_options(Format::Qcow2, "image");
    let top = ctx.blockdev_add(&opts)?;
    let layers = chain::layers(&top);

    let mut o = StreamOptions::new(&name);
    o.job_id = Some(a.job_id.clone());
    // QEMU looks `base` up below the top by file name: pass the chain's own
    // spelling of the file, or the absolute path (and QEMU's error).
    o.base = a
        .base
        .as_deref()
        .map(|b| find_layer(&layers[1..], b).map_or_else(|| absolute(b), |n| n.filename()));
    o.base_node = a.base_node.clone();
    o.backing_file = a.backing_file.clone();
    o.speed = signed(a.speed, "speed")?;
    o.on_error = on_error(a.on_error);
    o.auto_finalize = a.ctl.auto_finalize;
    o.auto_dismiss = a.ctl.auto_dismiss;

    if !a.ctl.quiet {
        eprintln!("{}: chain {}", a.job_id, chain_text(&layers));
    }
    let (r, display) = run_job(&a.ctl, &a.job_id, false, &events, || ctx.block_stream(o));
    let out = r?;
    let backing = backing_file_name(&top);
    display.note(&format!(
        "{}: streamed {} in {:.2} s ({}/s); chain now {}",
        a.job_id,
        human(out.bytes),
        out.seconds,
        human(out.rate()),
        chain_text(&chain::layers(&top))
    ));
    display.note(&match &backing {
        Some(b) => format!("{} now has backing file {b}", top.filename()),
        None => format!("{} now has no backing file", top.filename()),
    });
    print_stats(&a.ctl, &display, &out, json!({ "backing-file": backing }));
    Ok(())
}
