//! `blockjob backup SRC DST`: QEMU's blockdev-backup as a one-shot
//! command, made for the nightly routine: a full backup that also starts
//! a persistent dirty bitmap in SRC at the same point in time (one
//! transaction), then incremental backups from that bitmap into new qcow2
//! images, each backed by the previous backup, so the chain of backups
//! restores the disk at every point.
//!
//! DST is created when it does not exist (qcow2 by default, of SRC's size,
//! over `--backing`); it is opened without its backing chain, as a backup
//! target is (only the clusters the backup copies are written). The job is
//! driven by [`crate::drive`].

use std::path::Path;

use blockjob::block_jobs::backup::{BackupOptions, BackupPerf};
use blockjob::qapi::{BitmapSyncMode, MirrorSyncMode};
use blockjob::transaction::{Action, ActionCompletionMode};
use blockjob::{Context, Error, Result};
use clap::{Args, ValueEnum};
use serde_json::{Value, json};

use crate::drive::{Control, OnError, on_error, print_stats, run_job, signed, size_arg};
use crate::image::{Format, Image, absolute};
use crate::size::human;

/// `sync` values a backup accepts.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Sync {
    /// Everything the guest sees.
    Full,
    /// What SRC's own layer holds (not its backing files).
    Top,
    /// What the bitmap marks (`--bitmap`, with `--bitmap-mode`).
    Bitmap,
    /// What the bitmap marks; the bitmap is cleared on success.
    Incremental,
}

/// `bitmap-mode` values.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum BitmapMode {
    /// Clear what was copied, if the backup succeeded.
    OnSuccess,
    /// Leave the bitmap as it was.
    Never,
    /// Clear what was copied, even if the backup failed.
    Always,
}

/// Arguments of `blockjob backup` (QEMU's blockdev-backup names).
#[derive(Args, Debug, Clone)]
#[command(after_help = "\
QMP equivalent: {\"execute\": \"blockdev-backup\", \"arguments\": {\"device\": SRC, \"target\": DST, \"sync\": SYNC}}
(with --new-bitmap, a transaction of block-dirty-bitmap-add and blockdev-backup).

The nightly routine (SRC a qcow2 disk; persistent bitmaps live in it):
  blockjob backup disk.qcow2 full.qcow2 --new-bitmap nightly         # full backup + bitmap, one point in time
  blockjob backup disk.qcow2 inc1.qcow2 --sync incremental --bitmap nightly --backing full.qcow2
  blockjob backup disk.qcow2 inc2.qcow2 --sync incremental --bitmap nightly --backing inc1.qcow2
Restore the state of the second night: qemu-img convert -O raw inc2.qcow2 restored.img")]
pub struct BackupArgs {
    /// Source: a path (raw or qcow2, detected), or json:{blockdev-add options}.
    pub src: String,
    /// Target: a path (created if missing), or json:{blockdev-add options}.
    pub dst: String,
    /// Format of SRC when it is a path (default: qcow2 if it starts with
    /// qcow2's magic, else raw).
    #[arg(long, value_enum)]
    pub source_format: Option<Format>,
    /// Format of DST when it is a path (and of a DST this command creates).
    #[arg(long, value_enum, default_value = "qcow2")]
    pub target_format: Format,
    /// The backing file of a qcow2 DST this command creates: the previous
    /// backup of an incremental chain.
    #[arg(long, value_name = "FILE")]
    pub backing: Option<String>,
    /// `job-id`.
    #[arg(long, default_value = "backup0")]
    pub job_id: String,
    /// `sync`.
    #[arg(long, value_enum, default_value = "full")]
    pub sync: Sync,
    /// `bitmap`: a (persistent) dirty bitmap of SRC.
    #[arg(long, value_name = "NAME")]
    pub bitmap: Option<String>,
    /// `bitmap-mode` (default with --bitmap: on-success).
    #[arg(long, value_enum)]
    pub bitmap_mode: Option<BitmapMode>,
    /// Add a persistent bitmap NAME to SRC in the same transaction as the
    /// backup: it records every write after the backup's point in time.
    #[arg(long, value_name = "NAME")]
    pub new_bitmap: Option<String>,
    /// `speed` in bytes per second (K/M/G suffixes); 0 = unlimited.
    #[arg(long, value_parser = size_arg, default_value = "0")]
    pub speed: u64,
    /// `on-source-error`.
    #[arg(long, value_enum, default_value = "report")]
    pub on_source_error: OnError,
    /// `on-target-error`.
    #[arg(long, value_enum, default_value = "report")]
    pub on_target_error: OnError,
    /// `compress` (QEMU's error: not supported by our drivers).
    #[arg(long)]
    pub compress: bool,
    /// `x-perf.max-workers`: copies in flight at once.
    #[arg(long, default_value_t = 64)]
    pub max_workers: i64,
    /// `x-perf.max-chunk` (bytes; K/M/G suffixes); 0 = no limit.
    #[arg(long, value_parser = size_arg, default_value = "0")]
    pub max_chunk: u64,
    #[command(flatten)]
    pub ctl: Control,
}

/// Set up the nodes and run the backup to its end. A target this call
/// created is removed again when the command fails.
pub fn run(a: &BackupArgs) -> Result<()> {
    let mut created = None;
    let r = run_inner(a, &mut created);
    if let (Err(_), Some(path)) = (&r, created) {
        let _ = std::fs::remove_file(path);
    }
    r
}

/// qcow2 if the file starts with qcow2's magic.
fn detect(path: &Path) -> Format {
    use std::io::Read;
    let mut magic = [0u8; 4];
    let is_qcow2 = std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok()
        && magic == *b"QFI\xfb";
    if is_qcow2 { Format::Qcow2 } else { Format::Raw }
}

fn run_inner(a: &BackupArgs, created: &mut Option<std::path::PathBuf>) -> Result<()> {
    let ctx = Context::new();
    let events = ctx.subscribe();
    let src = Image::parse(&a.src)?;
    let dst = Image::parse(&a.dst)?;
    let format = a
        .source_format
        .or_else(|| src.path().map(detect))
        .unwrap_or(Format::Raw);
    let (opts, src_name) = src.blockdev_options(format, "src");
    let source = ctx.blockdev_add(&opts)?;
    if a.backing.is_some() && a.target_format != Format::Qcow2 {
        return Err(Error::generic("--backing needs a qcow2 target"));
    }
    if let Some(p) = dst.path()
        && !p.exists()
    {
        create_target(&ctx, p, a, source.len()?)?;
        *created = Some(p.to_path_buf());
    }
    let (mut topts, dst_name) = dst.blockdev_options(a.target_format, "dst");
    if a.target_format == Format::Qcow2 && dst.path().is_some() {
        // Only the clusters the backup copies are written: the backing
        // chain (older backups) is neither opened nor touched.
        topts["backing"] = Value::Null;
    }
    ctx.blockdev_add(&topts)?;

    let o = options(a, &src_name, &dst_name)?;
    if !a.ctl.quiet {
        eprintln!(
            "{}: {} -> {} ({:?}{})",
            a.job_id,
            source.filename(),
            a.dst,
            a.sync,
            a.bitmap
                .as_deref()
                .map_or_else(String::new, |b| format!(", bitmap {b}"))
        );
    }
    let (r, display) = run_job(&a.ctl, &a.job_id, false, &events, || match &a.new_bitmap {
        None => ctx.blockdev_backup(o),
        Some(name) => {
            ctx.transaction(
                vec![
                    Action::BitmapAdd {
                        node: src_name.clone(),
                        name: name.clone(),
                        granularity: None,
                        persistent: Some(true),
                        disabled: None,
                    },
                    Action::BlockdevBackup(o),
                ],
                ActionCompletionMode::Individual,
            )?;
            ctx.engine().find_job(&a.job_id)
        }
    });
    let out = r?;
    display.note(&format!(
        "{}: backed up {} in {:.2} s ({}/s)",
        a.job_id,
        human(out.bytes),
        out.seconds,
        human(out.rate())
    ));
    let bitmaps = ctx.query_dirty_bitmaps(&src_name)?;
    for b in bitmaps.iter().filter(|b| b.name.is_some()) {
        display.note(&format!(
            "bitmap {}: {} dirty{}",
            b.name.as_deref().unwrap_or(""),
            human(b.count),
            if b.persistent { ", persistent" } else { "" }
        ));
    }
    print_stats(
        &a.ctl,
        &display,
        &out,
        json!({ "bitmaps": serde_json::to_value(&bitmaps).unwrap_or_default() }),
    );
    Ok(())
}

/// The blockdev-backup options of the command line.
fn options(a: &BackupArgs, src: &str, dst: &str) -> Result<BackupOptions> {
    let sync = match a.sync {
        Sync::Full => MirrorSyncMode::Full,
        Sync::Top => MirrorSyncMode::Top,
        Sync::Bitmap => MirrorSyncMode::Bitmap,
        Sync::Incremental => MirrorSyncMode::Incremental,
    };
    let mut o = BackupOptions::new(src, dst, sync);
    o.job_id = Some(a.job_id.clone());
    o.speed = signed(a.speed, "speed")?;
    o.bitmap = a.bitmap.clone();
    o.bitmap_mode = match (a.bitmap_mode, &a.bitmap) {
        (Some(BitmapMode::OnSuccess), _) => Some(BitmapSyncMode::OnSuccess),
        (Some(BitmapMode::Never), _) => Some(BitmapSyncMode::Never),
        (Some(BitmapMode::Always), _) => Some(BitmapSyncMode::Always),
        // An operator naming a bitmap means the usual mode.
        (None, Some(_)) => Some(BitmapSyncMode::OnSuccess),
        (None, None) => None,
    };
    o.compress = a.compress;
    o.on_source_error = on_error(a.on_source_error);
    o.on_target_error = on_error(a.on_target_error);
    o.auto_finalize = a.ctl.auto_finalize;
    o.auto_dismiss = a.ctl.auto_dismiss;
    o.perf = BackupPerf {
        max_workers: a.max_workers,
        max_chunk: signed(a.max_chunk, "max-chunk")?,
        ..BackupPerf::default()
    };
    Ok(o)
}

/// Create DST: a sparse raw file, or a qcow2 image over `--backing`
/// (whose header names it by absolute path, with its format).
fn create_target(ctx: &Context, path: &Path, a: &BackupArgs, size: u64) -> Result<()> {
    match a.target_format {
        Format::Raw => {
            crate::image::create_if_missing(path, size)?;
            Ok(())
        }
        Format::Qcow2 => {
            crate::image::create_if_missing(path, 0)?;
            let backing = a.backing.as_deref().map(|b| {
                let fmt = match detect(Path::new(b)) {
                    Format::Qcow2 => "qcow2",
                    Format::Raw => "raw",
                };
                (absolute(b), fmt)
            });
            crate::image::create_qcow2(
                ctx,
                path,
                size,
                backing.as_ref().map(|(n, f)| (n.as_str(), *f)),
            )
        }
    }
}
