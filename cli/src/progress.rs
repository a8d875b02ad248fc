//! What the operator sees while a job runs: a progress bar (bytes, rate,
//! ETA, status) on a terminal, plain lines once a second otherwise. Both
//! go to stderr, so stdout carries only `--events` and `--stats` JSON.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use blockjob::qapi::BlockJobInfo;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::size::human;

/// The display of one job.
pub enum Display {
    /// indicatif bar on a terminal.
    Bar(ProgressBar),
    /// Periodic lines.
    Lines { last: Option<Instant>, quiet: bool },
}

const LINE_PERIOD: Duration = Duration::from_secs(1);

impl Display {
    /// A bar when stderr is a terminal (and not `quiet`), else lines.
    pub fn new(quiet: bool) -> Display {
        if !quiet && std::io::stderr().is_terminal() {
            let pb = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
            pb.set_style(
                ProgressStyle::with_template(
                    "{msg:>9} [{bar:32}] {binary_bytes}/{binary_total_bytes} \
                     {binary_bytes_per_sec} ETA {eta}",
                )
                .expect("a valid template")
                .progress_chars("=> "),
            );
            Display::Bar(pb)
        } else {
            Display::Lines { last: None, quiet }
        }
    }

    /// Show the job's state now (lines: at most once a second).
    pub fn update(&mut self, info: &BlockJobInfo, started: Instant) {
        match self {
            Display::Bar(pb) => {
                pb.set_length(info.len);
                pb.set_position(info.offset);
                pb.set_message(info.status.as_str().to_string());
            }
            Display::Lines { last, quiet } => {
                // Nothing to say before the job knows its length.
                if *quiet || info.len == 0 || last.is_some_and(|t| t.elapsed() < LINE_PERIOD) {
                    return;
                }
                *last = Some(Instant::now());
                let secs = started.elapsed().as_secs_f64().max(1e-9);
                let pct = info.offset as f64 * 100.0 / info.len as f64;
                eprintln!(
                    "{}: {} {} / {} ({pct:.0}%), {}/s",
                    info.device,
                    info.status,
                    human(info.offset),
                    human(info.len),
                    human((info.offset as f64 / secs) as u64)
                );
            }
        }
    }

    /// Print a message line without tearing the bar.
    pub fn note(&self, msg: &str) {
        match self {
            Display::Bar(pb) => pb.println(msg),
            Display::Lines { quiet: true, .. } => {}
            Display::Lines { .. } => eprintln!("{msg}"),
        }
    }

    /// Print to stdout without tearing the bar.
    pub fn stdout_line(&self, line: &str) {
        let write = || {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{line}");
            let _ = out.flush();
        };
        match self {
            Display::Bar(pb) => pb.suspend(write),
            Display::Lines { .. } => write(),
        }
    }

    /// Remove the bar.
    pub fn finish(&self) {
        if let Display::Bar(pb) = self {
            pb.finish_and_clear();
        }
    }
}
