//! `blockjob mirror SRC DST`: one mirror job (QEMU's blockdev-mirror),
//! driven the way an operator drives QEMU's ([`crate::drive`]): complete
//! on `BLOCK_JOB_READY` (or cancel with `--no-complete`), resume after an
//! error stop, finalize and dismiss when auto-finalize/auto-dismiss are
//! off. `--create` makes DST first, as drive-mirror's `absolute-paths`
//! mode would.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use blockjob::block::Node;
use blockjob::block_jobs::mirror::MirrorOptions;
use blockjob::qapi::{MirrorCopyMode, MirrorSyncMode};
use blockjob::{Context, Error, Result};
use clap::{Args, ValueEnum};
use serde_json::json;

use crate::drive::{Control, OnError, Outcome, on_error, print_stats, run_job, signed, size_arg};
use crate::image::{Format, Image, absolute, backing_format, create_if_missing};
use crate::size::human;

/// `sync` values a mirror accepts.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Sync {
    /// What the source's own layer holds (not its backing files).
    Top,
    /// Everything the guest sees.
    Full,
    /// Only what is written while the job runs.
    None,
}

/// `copy-mode` values.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum CopyMode {
    /// Guest writes only dirty the bitmap.
    Background,
    /// Guest writes reach the target before they complete.
    WriteBlocking,
}

/// Arguments of `blockjob mirror` (QEMU's blockdev-mirror names).
#[derive(Args, Debug, Clone)]
pub struct MirrorArgs {
    /// Source: a path, or json:{blockdev-add options}.
    pub src: String,
    /// Target: a path, or json:{blockdev-add options}.
    pub dst: String,
    /// Format of SRC when it is a path (qcow2 opens its backing chain).
    #[arg(long, value_enum, default_value = "raw")]
    pub source_format: Format,
    /// Format of DST when it is a path.
    #[arg(long, value_enum, default_value = "raw")]
    pub target_format: Format,
    /// Create DST if it does not exist: a sparse raw file of the source's
    /// size, or with --target-format qcow2 a qcow2 image of that size
    /// (backed by the source's backing file with --sync top, by the source
    /// with --sync none, as drive-mirror creates it). Removed again if the
    /// command fails.
    #[arg(long)]
    pub create: bool,
    /// `job-id`.
    #[arg(long, default_value = "job0")]
    pub job_id: String,
    /// `sync`.
    #[arg(long, value_enum, default_value = "full")]
    pub sync: Sync,
    /// `granularity` (bytes; K/M/G suffixes); default: the target's cluster size or 64K.
    #[arg(long, value_parser = size_arg)]
    pub granularity: Option<u64>,
    /// `buf-size` (bytes; K/M/G suffixes); default 16M.
    #[arg(long, value_parser = size_arg)]
    pub buf_size: Option<u64>,
    /// `speed` in bytes per second (K/M/G suffixes); 0 = unlimited.
    #[arg(long, value_parser = size_arg, default_value = "0")]
    pub speed: u64,
    /// `on-source-error`.
    #[arg(long, value_enum, default_value = "report")]
    pub on_source_error: OnError,
    /// `on-target-error`.
    #[arg(long, value_enum, default_value = "report")]
    pub on_target_error: OnError,
    /// `copy-mode`.
    #[arg(long, value_enum, default_value = "background")]
    pub copy_mode: CopyMode,
    /// `unmap`: zeroes may become holes on the target (a DST given as a
    /// path is then opened with discard=unmap, so that they do).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub unmap: bool,
    /// `replaces`: the node name (of SRC's json: options) the target takes
    /// the place of on completion: SRC's node or one below it through
    /// blkdebug filters. Default: SRC's node.
    #[arg(long)]
    pub replaces: Option<String>,
    /// Cancel at READY instead of completing (the target keeps the
    /// source's content at that moment; the source stays in use).
    #[arg(long)]
    pub no_complete: bool,
    #[command(flatten)]
    pub ctl: Control,
}

/// Set up the nodes and run the mirror to its end. A target this call
/// created is removed again when the command fails.
pub fn run(a: &MirrorArgs) -> Result<Outcome> {
    let mut created = None;
    let r = run_inner(a, &mut created);
    if let (Err(_), Some(path)) = (&r, created) {
        let _ = std::fs::remove_file(path);
    }
    r
}

/// Refuse to mirror a file onto itself (QEMU's image locking refuses it;
/// we do not lock images).
fn check_distinct(src: &Image, dst: &Image) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    if let (Some(s), Some(d)) = (src.path(), dst.path())
        && let (Ok(ms), Ok(md)) = (std::fs::metadata(s), std::fs::metadata(d))
        && (ms.dev(), ms.ino()) == (md.dev(), md.ino())
    {
        return Err(Error::generic(format!(
            "'{}' and '{}' are the same file",
            s.display(),
            d.display()
        )));
    }
    Ok(())
}

fn run_inner(a: &MirrorArgs, created: &mut Option<PathBuf>) -> Result<Outcome> {
    let ctx = Context::new();
    let events = ctx.subscribe();
    let src = Image::parse(&a.src)?;
    let dst = Image::parse(&a.dst)?;
    check_distinct(&src, &dst)?;
    let (src_opts, src_name) = src.blockdev_options(a.source_format, "source");
    let source = ctx.blockdev_add(&src_opts)?;
    if a.create {
        let Some(path) = dst.path() else {
            return Err(Error::generic("--create needs DST to be a path"));
        };
        let len = source.len()?;
        match a.target_format {
            Format::Raw => {
                if create_if_missing(path, len)? {
                    *created = Some(path.to_path_buf());
                }
            }
            Format::Qcow2 => {
                if create_if_missing(path, 0)? {
                    *created = Some(path.to_path_buf());
                    let backing = match a.sync {
                        Sync::Top => source.backing(),
                        Sync::None => src.path().map(|_| source.clone()),
                        Sync::Full => None,
                    };
                    create_qcow2(&ctx, path, len, backing.as_ref())?;
                }
            }
        }
    }
    let (mut dst_opts, dst_name) = dst.blockdev_options(a.target_format, "target");
    if a.unmap && !matches!(dst, Image::Json(_)) {
        // `--unmap` says zeroes may become holes on the target; a node
        // opened with QEMU's default discard=ignore would write them out
        // instead (`qemu-img convert` opens its target this way too, a
        // path or an NBD URL). A `json:` target says for itself.
        dst_opts["discard"] = serde_json::json!("unmap");
    }
    ctx.blockdev_add(&dst_opts)?;

    let mut o = MirrorOptions::new(
        &src_name,
        &dst_name,
        match a.sync {
            Sync::Top => MirrorSyncMode::Top,
            Sync::Full => MirrorSyncMode::Full,
            Sync::None => MirrorSyncMode::None,
        },
    );
    o.job_id = Some(a.job_id.clone());
    o.granularity = a.granularity.unwrap_or(0);
    o.buf_size = signed(a.buf_size.unwrap_or(0), "buf-size")?;
    o.speed = signed(a.speed, "speed")?;
    o.on_source_error = on_error(a.on_source_error);
    o.on_target_error = on_error(a.on_target_error);
    o.copy_mode = match a.copy_mode {
        CopyMode::Background => MirrorCopyMode::Background,
        CopyMode::WriteBlocking => MirrorCopyMode::WriteBlocking,
    };
    o.auto_finalize = a.ctl.auto_finalize;
    o.auto_dismiss = a.ctl.auto_dismiss;
    o.unmap = a.unmap;
    o.replaces = a.replaces.clone();

    let mut ctl = a.ctl.clone();
    if matches!(a.copy_mode, CopyMode::Background) {
        ctl.converge_hint = Some(
            "try --copy-mode write-blocking (guest writes then reach the target as they happen)",
        );
    }
    let (r, display) = run_job(&ctl, &a.job_id, a.no_complete, &events, || {
        ctx.blockdev_mirror(o)
    });
    let out = r?;
    display.note(&format!(
        "{}: {} {} in {:.2} s ({}/s){}",
        a.job_id,
        if out.pivoted {
            "completed, pivoted to the target:"
        } else {
            "completed without pivot:"
        },
        human(out.bytes),
        out.seconds,
        human(out.rate()),
        out.ready_seconds
            .map(|r| format!(", ready after {r:.2} s"))
            .unwrap_or_default()
    ));
    print_stats(
        &a.ctl,
        &display,
        &out,
        json!({"ready-seconds": out.ready_seconds, "pivoted": out.pivoted}),
    );
    Ok(out)
}

/// Format the empty file `path` as a qcow2 image of `size` bytes over
/// `backing` (its absolute file name and format go into the header, as
/// drive-mirror's absolute-paths mode writes them: DST may be in another
/// directory than the source).
fn create_qcow2(ctx: &Context, path: &Path, size: u64, backing: Option<&Arc<Node>>) -> Result<()> {
    let link = backing.map(|b| (absolute(&b.filename()), backing_format(b)));
    crate::image::create_qcow2(
        ctx,
        path,
        size,
        link.as_ref().map(|(n, f)| (n.as_str(), *f)),
    )
}
