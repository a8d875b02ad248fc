//! `blockjob`: the command-line front end.
//!
//! - `blockjob` or `blockjob demo`: mirror a temporary 1 GiB image (data
//!   and holes) through a transient injected read error, verify the copy.
//! - `blockjob mirror SRC DST`: QEMU's blockdev-mirror as a one-shot
//!   command with a progress bar.
//! - `blockjob stream IMAGE`: QEMU's block-stream (pull the backing
//!   files' data into IMAGE, shorten its chain).
//! - `blockjob backup SRC DST`: QEMU's blockdev-backup (full or
//!   incremental from a persistent bitmap, into a new qcow2 backed by the
//!   previous backup).
//! - `blockjob commit IMAGE`: QEMU's block-commit (merge layers down into
//!   a backing file; active commit completes at READY).
//! - `blockjob daemon [options]`: a QMP daemon taking qemu-storage-daemon's
//!   command line (`--blockdev`, `--chardev`, `--monitor`, `--pidfile`,
//!   `--daemonize`); its exit status is QSD's (0, or 1 with one line).
//!
//! Exit status: 0 on success, 1 when the job or its setup fails (one line
//! on stderr with QEMU's text), 2 for bad usage.

mod backup_cmd;
mod chardev;
mod commit_cmd;
mod daemon;
mod daemon_args;
mod demo;
mod drive;
mod image;
mod mirror_cmd;
mod progress;
mod size;
mod stream_cmd;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "blockjob",
    version,
    about = "QEMU's block jobs, as a library and a tool"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Mirror a temporary image through an injected error and verify it
    /// (the default).
    Demo(demo::DemoArgs),
    /// Mirror SRC to DST (QEMU's blockdev-mirror), completing at READY.
    Mirror(Box<mirror_cmd::MirrorArgs>),
    /// Copy the backing files' data into IMAGE (QEMU's block-stream) and
    /// drop them from its chain.
    Stream(Box<stream_cmd::StreamArgs>),
    /// Merge layers of IMAGE's chain down into a backing file (QEMU's
    /// block-commit); an active commit completes at READY.
    Commit(Box<commit_cmd::CommitArgs>),
    /// Back SRC up to DST (QEMU's blockdev-backup): full, or incremental
    /// from a persistent bitmap (`blockjob backup --help` shows the
    /// nightly routine).
    Backup(Box<backup_cmd::BackupArgs>),
    /// Serve QMP like qemu-storage-daemon, with its command line
    /// (`blockjob daemon --help`).
    #[command(disable_help_flag = true)]
    Daemon {
        /// qemu-storage-daemon's options.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<std::ffi::OsString>,
    },
}

fn main() {
    // The daemon parses its own (QSD's) command line.
    let mut raw = std::env::args_os();
    if raw.nth(1).is_some_and(|a| a == "daemon") {
        daemon::run(raw.collect());
    }
    let cli = Cli::parse();
    let r = match cli.cmd {
        None => demo::run(&demo::DemoArgs::default()),
        Some(Cmd::Demo(a)) => demo::run(&a),
        Some(Cmd::Mirror(a)) => mirror_cmd::run(&a).map(|_| ()),
        Some(Cmd::Stream(a)) => stream_cmd::run(&a),
        Some(Cmd::Commit(a)) => commit_cmd::run(&a),
        Some(Cmd::Backup(a)) => backup_cmd::run(&a),
        Some(Cmd::Daemon { args }) => daemon::run(args),
    };
    if let Err(e) = r {
        // With its hint lines, as qemu-img prints a lock conflict.
        eprintln!("blockjob: {}", e.pretty());
        std::process::exit(1);
    }
}
