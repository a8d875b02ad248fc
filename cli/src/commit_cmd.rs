//! `blockjob commit IMAGE`: QEMU's block-commit as a one-shot command.
//! The data of the layers from `top` down to (not including) `base` is
//! merged into `base`. Intermediate commit (top below IMAGE) runs to the
//! end and relinks the layer above top onto base. Active commit (top is
//! IMAGE) mirrors IMAGE into base, becomes READY, and is completed there
//! (the guest moves onto base) or, with `--no-complete`, cancelled there
//! (base keeps the data, IMAGE stays the active layer). The job is driven
//! by [`crate::drive`].

use std::sync::Arc;

use blockjob::block::chain;
use blockjob::block_jobs::commit::CommitOptions;
use blockjob::{Context, Result};
use clap::Args;
use serde_json::json;

use crate::drive::{Control, OnError, on_error, print_stats, run_job, signed, size_arg};
use crate::image::{Format, Image, absolute, chain_text, find_layer};
use crate::size::human;

/// Arguments of `blockjob commit` (QEMU's block-commit names).
#[derive(Args, Debug, Clone)]
#[command(after_help = "\
QMP equivalent: {\"execute\": \"block-commit\", \"arguments\": {\"device\": IMAGE, \"top\": FILE, \"base\": FILE}},
then block-job-complete at BLOCK_JOB_READY for an active commit (block-job-cancel with --no-complete).
An active commit leaves all headers as they were: afterwards base holds the guest view.

Examples:
  blockjob commit top.qcow2 --top mid.qcow2        # merge mid.qcow2 into base.qcow2; top -> base.qcow2
  blockjob commit top.qcow2                        # active commit: the whole chain into its bottom, pivot")]
pub struct CommitArgs {
    /// The active layer: a qcow2 path, or json:{blockdev-add options}.
    pub image: String,
    /// `top`: the file name of the highest layer to commit (a layer of
    /// IMAGE's chain). Default: IMAGE itself (active commit).
    #[arg(long, value_name = "FILE")]
    pub top: Option<String>,
    /// `base`: the file name of the layer to commit into (below top).
    /// Default: the bottom of the chain.
    #[arg(long, value_name = "FILE")]
    pub base: Option<String>,
    /// `backing-file`: the name to write into the header of the layer
    /// above top for base (intermediate commit only; default: base's file
    /// name).
    #[arg(long, value_name = "NAME")]
    pub backing_file: Option<String>,
    /// `job-id`.
    #[arg(long, default_value = "commit0")]
    pub job_id: String,
    /// `speed` in bytes per second (K/M/G suffixes); 0 = unlimited.
    #[arg(long, value_parser = size_arg, default_value = "0")]
    pub speed: u64,
    /// `on-error` (errors reading the committed layers or writing base).
    #[arg(long, value_enum, default_value = "report")]
    pub on_error: OnError,
    /// Active commit: cancel at READY instead of completing (base holds
    /// IMAGE's data as of then; no pivot, IMAGE stays the active layer).
    #[arg(long)]
    pub no_complete: bool,
    #[command(flatten)]
    pub ctl: Control,
}

/// Open IMAGE with its chain, commit, report what changed.
pub fn run(a: &CommitArgs) -> Result<()> {
    let ctx = Context::new();
    let events = ctx.subscribe();
    let img = Image::parse(&a.image)?;
    let (opts, name) = img.blockdev_options(Format::Qcow2, "image");
    let image = ctx.blockdev_add(&opts)?;
    let layers = chain::layers(&image);

    let mut o = CommitOptions::new(&name);
    o.job_id = Some(a.job_id.clone());
    // QEMU matches `top` and `base` against the chain's file names: pass
    // the chain's own spelling of a file given here, or its absolute path
    // (and QEMU's error when it is not in the chain).
    let top = match &a.top {
        Some(t) => match find_layer(&layers, t) {
            Some(n) => {
                o.top = Some(n.filename());
                Some(n)
            }
            None => {
                o.top = Some(absolute(t));
                None
            }
        },
        None => Some(image.clone()),
    };
    let below_top = top.as_ref().map(chain::layers).unwrap_or_default();
    let mut base = below_top.last().cloned();
    if let Some(b) = &a.base {
        base = None;
        match (find_layer(below_top.get(1..).unwrap_or_default(), b), &top) {
            (Some(n), _) => {
                o.base = Some(n.filename());
                base = Some(n);
            }
            // top and base the same layer: QEMU's refusal of exactly that.
            (None, Some(t)) if find_layer(std::slice::from_ref(t), b).is_some() => {
                o.base_node = Some(t.name().to_string());
            }
            (None, _) => o.base = Some(absolute(b)),
        }
    }
    o.backing_file = a.backing_file.clone();
    o.speed = signed(a.speed, "speed")?;
    o.on_error = on_error(a.on_error);
    o.auto_finalize = a.ctl.auto_finalize;
    o.auto_dismiss = a.ctl.auto_dismiss;
    let active = top.as_ref().is_some_and(|t| Arc::ptr_eq(t, &image));

    if !a.ctl.quiet {
        eprintln!("{}: chain {}", a.job_id, chain_text(&layers));
    }
    let (r, display) = run_job(&a.ctl, &a.job_id, a.no_complete, &events, || {
        ctx.block_commit(o)
    });
    let out = r?;
    let base_name = base.as_ref().map(|b| b.filename()).unwrap_or_default();
    display.note(&format!(
        "{}: committed {} in {:.2} s ({}/s){}",
        a.job_id,
        human(out.bytes),
        out.seconds,
        human(out.rate()),
        out.ready_seconds
            .map(|r| format!(", ready after {r:.2} s"))
            .unwrap_or_default()
    ));
    display.note(&if !active {
        format!("chain now {}", chain_text(&chain::layers(&image)))
    } else if out.pivoted {
        format!(
            "{base_name} now holds the guest view of {}; pivoted to it (the layers above it are no longer needed)",
            image.filename()
        )
    } else {
        format!(
            "cancelled at READY without pivot: {base_name} holds the data as of then; {} stays the active layer",
            image.filename()
        )
    });
    print_stats(
        &a.ctl,
        &display,
        &out,
        json!({"ready-seconds": out.ready_seconds, "pivoted": out.pivoted, "base": base_name}),
    );
    Ok(())
}
