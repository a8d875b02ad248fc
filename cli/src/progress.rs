//! What the operator sees while a job runs: a progress bar (bytes, rate,
//! ETA, status) on a terminal, plain lines once a second otherwise. Both
//! go to stderr, so stdout carries only `--events` and `--stats` JSON.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use blockjob::qapi::BlockJobInfo;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::size::human;

/// The job's rates as a person reads them: the copy rate, the guest's
/// dirty rate when there is one, and the ETA, or that the job will not
/// converge at these rates.
pub fn rates_text(info: &BlockJobInfo) -> String {
    let x = &info.x;
    let mut t = format!("{}/s", human(x.copy_rate));
    if x.dirty_rate > 0 {
        t += &format!(", dirty {}/s", human(x.dirty_rate));
    }
    match (x.converging, x.eta) {
        (Some(false), _) => t += ", will not converge",
        (_, Some(s)) => t += &format!(", ETA {}", eta_text(s)),
        _ => {}
    }
    t
}

/// Seconds as `45s`, `12m05s`, `3h02m`.
fn eta_text(s: u64) -> String {
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
    }
}

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
                // Rates and ETA are the job's own (x-copy-rate, x-eta):
                // they account for a guest dirtying what is left, where
                // indicatif's would only see the position move.
                ProgressStyle::with_template(
                    "{msg:>9} [{bar:32}] {binary_bytes}/{binary_total_bytes} {prefix}",
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
    pub fn update(&mut self, info: &BlockJobInfo) {
        match self {
            Display::Bar(pb) => {
                pb.set_length(info.len);
                pb.set_position(info.offset);
                pb.set_message(info.status.as_str().to_string());
                pb.set_prefix(rates_text(info));
            }
            Display::Lines { last, quiet } => {
                // Nothing to say before the job knows its length.
                if *quiet || info.len == 0 || last.is_some_and(|t| t.elapsed() < LINE_PERIOD) {
                    return;
                }
                *last = Some(Instant::now());
                let pct = info.offset as f64 * 100.0 / info.len as f64;
                eprintln!(
                    "{}: {} {} / {} ({pct:.0}%), {}",
                    info.device,
                    info.status,
                    human(info.offset),
                    human(info.len),
                    rates_text(info)
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

#[cfg(test)]
mod tests {
    use super::*;
    use blockjob::qapi::{BlockDeviceIoStatus, JobProgressExt, JobStatus, JobType};

    fn info(x: JobProgressExt) -> BlockJobInfo {
        BlockJobInfo {
            job_type: JobType::Mirror,
            device: "m".into(),
            len: 100,
            offset: 50,
            busy: true,
            paused: false,
            speed: 0,
            io_status: BlockDeviceIoStatus::Ok,
            ready: false,
            status: JobStatus::Running,
            auto_finalize: true,
            auto_dismiss: true,
            error: None,
            actively_synced: None,
            x,
        }
    }

    #[test]
    fn rates_read_as_a_person_plans() {
        let mib = 1 << 20;
        let x = |copy, dirty, eta, converging| JobProgressExt {
            copy_rate: copy,
            dirty_rate: dirty,
            skipped: 0,
            eta,
            converging,
        };
        assert_eq!(rates_text(&info(x(0, 0, None, None))), "0 B/s");
        assert_eq!(
            rates_text(&info(x(100 * mib, 0, Some(42), Some(true)))),
            "100.0 MiB/s, ETA 42s"
        );
        assert_eq!(
            rates_text(&info(x(100 * mib, 30 * mib, Some(725), Some(true)))),
            "100.0 MiB/s, dirty 30.0 MiB/s, ETA 12m05s"
        );
        assert_eq!(
            rates_text(&info(x(mib, 2 * mib, None, Some(false)))),
            "1.0 MiB/s, dirty 2.0 MiB/s, will not converge"
        );
        assert_eq!(eta_text(3600 * 3 + 120), "3h02m");
    }
}
