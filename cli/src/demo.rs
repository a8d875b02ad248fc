//! `blockjob demo` (and `blockjob` alone): mirror a temporary image with
//! data and holes through a source that fails one read, with
//! `on-source-error=ignore`, then check the target byte for byte.

use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;

use blockjob::{Error, Result};
use clap::Args;
use serde_json::json;

use crate::drive::{Control, OnError};
use crate::image::Format;
use crate::mirror_cmd::{self, CopyMode, MirrorArgs, Sync};
use crate::size::{human, parse_size};

/// Arguments of `blockjob demo`.
#[derive(Args, Debug, Clone)]
pub struct DemoArgs {
    /// Image size (K/M/G suffixes).
    #[arg(long, value_parser = parse_size, default_value = "1G")]
    pub size: u64,
    /// Keep the temporary directory.
    #[arg(long)]
    pub keep: bool,
    /// No progress display.
    #[arg(long, short)]
    pub quiet: bool,
}

impl Default for DemoArgs {
    fn default() -> Self {
        DemoArgs {
            size: 1 << 30,
            keep: false,
            quiet: false,
        }
    }
}

/// Data extents of this size every `2 * EXTENT` bytes: half data, half holes.
const EXTENT: u64 = 4 << 20;
const IO: usize = 1 << 20;

fn pattern(off: u64, buf: &mut [u8]) {
    for (i, b) in buf.iter_mut().enumerate() {
        let x = off + i as u64;
        *b = (x ^ (x >> 9) ^ (x >> 20) ^ 0x5a) as u8;
    }
}

/// Write the source: data in every other extent; returns bytes of data.
fn write_source(path: &Path, size: u64) -> Result<u64> {
    let f = File::create(path)?;
    f.set_len(size)?;
    let mut buf = vec![0u8; IO];
    let mut data = 0;
    for start in (0..size).step_by(2 * EXTENT as usize) {
        let end = (start + EXTENT).min(size);
        for off in (start..end).step_by(IO) {
            let n = (end - off).min(IO as u64) as usize;
            pattern(off, &mut buf[..n]);
            f.write_all_at(&buf[..n], off)?;
            data += n as u64;
        }
    }
    f.sync_all()?;
    Ok(data)
}

/// The first offset where the files differ, if any.
fn first_difference(a: &Path, b: &Path) -> Result<Option<u64>> {
    let (fa, fb) = (File::open(a)?, File::open(b)?);
    let (la, lb) = (fa.metadata()?.len(), fb.metadata()?.len());
    let (mut ba, mut bb) = (vec![0u8; IO], vec![0u8; IO]);
    for off in (0..la.min(lb)).step_by(IO) {
        let n = (la.min(lb) - off).min(IO as u64) as usize;
        fa.read_exact_at(&mut ba[..n], off)?;
        fb.read_exact_at(&mut bb[..n], off)?;
        if let Some(i) = ba[..n].iter().zip(&bb[..n]).position(|(x, y)| x != y) {
            return Ok(Some(off + i as u64));
        }
    }
    Ok((la != lb).then_some(la.min(lb)))
}

fn allocated(path: &Path) -> Result<u64> {
    Ok(std::fs::metadata(path)?.blocks() * 512)
}

/// Run the demo.
pub fn run(a: &DemoArgs) -> Result<()> {
    let dir = tempfile::Builder::new().prefix("blockjob-demo").tempdir()?;
    let src = dir.path().join("source.raw");
    let dst = dir.path().join("target.raw");
    let size = a.size.max(1 << 20);
    let data = write_source(&src, size)?;
    eprintln!(
        "demo: source {} ({} data, {} holes) in {}",
        human(size),
        human(data),
        human(size - data),
        dir.path().display()
    );
    eprintln!(
        "demo: mirroring it to a new sparse target; the source fails its first read \
         (blkdebug, EIO), on-source-error=ignore"
    );
    let source = json!({"driver": "raw", "node-name": "source", "file": {
        "driver": "blkdebug",
        "image": {"driver": "file", "filename": src},
        "inject-error": [{"event": "read_aio", "errno": libc::EIO, "once": true}]}});
    let args = MirrorArgs {
        src: format!("json:{source}"),
        dst: dst.display().to_string(),
        source_format: Format::Raw,
        target_format: Format::Raw,
        create: true,
        job_id: "job0".into(),
        sync: Sync::Full,
        granularity: None,
        buf_size: None,
        speed: 0,
        on_source_error: OnError::Ignore,
        on_target_error: OnError::Report,
        copy_mode: CopyMode::Background,
        unmap: true,
        replaces: None,
        no_complete: false,
        ctl: Control {
            events: true,
            quiet: a.quiet,
            ..Control::default()
        },
    };
    let out = mirror_cmd::run(&args)?;
    let diff = first_difference(&src, &dst)?;
    let (src_alloc, dst_alloc) = (allocated(&src)?, allocated(&dst)?);
    eprintln!(
        "demo: {} read error(s) ignored and the range copied again; target {}",
        out.job_errors,
        match diff {
            None => "identical to the source".to_string(),
            Some(off) => format!("DIFFERS from the source at byte {off}"),
        }
    );
    eprintln!(
        "demo: allocated: source {}, target {}",
        human(src_alloc),
        human(dst_alloc)
    );
    if a.keep {
        let p = dir.keep();
        eprintln!("demo: kept {}", p.display());
    }
    if let Some(off) = diff {
        return Err(Error::generic(format!(
            "demo: the target differs from the source at byte {off}"
        )));
    }
    if out.job_errors == 0 {
        return Err(Error::generic(
            "demo: the injected read error did not happen",
        ));
    }
    Ok(())
}
