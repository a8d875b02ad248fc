//! `blockjob`: the command-line front end.
//!
//! - `blockjob` or `blockjob demo`: mirror a temporary 1 GiB image (data
//!   and holes) through a transient injected read error, verify the copy.
//! - `blockjob mirror SRC DST`: QEMU's blockdev-mirror as a one-shot
//!   command with a progress bar.
//!
//! Exit status: 0 on success, 1 when the job or its setup fails (one line
//! on stderr with QEMU's text), 2 for bad usage.

mod demo;
mod image;
mod mirror_cmd;
mod progress;
mod size;

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
}

fn main() {
    let cli = Cli::parse();
    let r = match cli.cmd {
        None => demo::run(&demo::DemoArgs::default()),
        Some(Cmd::Demo(a)) => demo::run(&a),
        Some(Cmd::Mirror(a)) => mirror_cmd::run(&a).map(|_| ()),
    };
    if let Err(e) = r {
        eprintln!("blockjob: {e}");
        std::process::exit(1);
    }
}
