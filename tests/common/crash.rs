//! The crash-consistency checker: rebuilds image files as they would be
//! after a power cut, from their contents before a run and the logs that
//! `blklogwrites` nodes under them wrote (dm-log-writes' format, so logs of
//! QEMU's blklogwrites read the same), and checks every such state.
//!
//! The model of a power cut: a write that completed before a flush of its
//! file began is on disk after that flush; a write not yet followed by a
//! flush of its file may or may not be on disk, independently of every
//! other such write, and a write is atomic only per sector of its log
//! (`log-sector-size`; a multi-sector write may be torn). The logs of several files merge into one order by
//! the CLOCK_MONOTONIC completion time our entries carry (QEMU's logs have
//! none: one file at a time for those).
//!
//! The states checked ([`crash_states`]):
//! - at every flush point, everything before it on disk (every file);
//! - every way to tear the first (up to) 4 sectors of each header write,
//!   and of a sample of the other writes, on top of everything before it;
//! - sampled points between flushes (seeded, the seed printed): what was
//!   flushed, plus a random subset of what was not, some of it torn.
//!
//! "A header never points at data that was not yet durable" is what the
//! subset states test: a header, L1/L2 or refcount update written before
//! the data it points at was flushed shows, in a state that has the update
//! but not the data, as a guest view that is not the original or as a
//! `qemu-img check` failure (see `flags_metadata_before_data` in
//! `tests/crash_consistency.rs`, which feeds the checker such an order).

use std::path::{Path, PathBuf};
use std::process::Command;

const LOG_FLUSH: u64 = 1;
const LOG_DISCARD: u64 = 4;
const LOG_MARK: u64 = 8;
const MAGIC: u64 = 0x006a_7366_7773_6872;

/// One logged request.
#[derive(Debug, Clone)]
pub enum Op {
    /// Bytes written at an offset (write-zeroes logs zero bytes).
    Write { offset: u64, data: Vec<u8> },
    /// A discarded range (reads as zeroes if it reached the disk).
    Discard { offset: u64, len: u64 },
    /// Everything before is on disk.
    Flush,
}

/// An entry: its completion time (0 in QEMU's logs) and request.
#[derive(Debug, Clone)]
pub struct Entry {
    pub ts: u64,
    pub op: Op,
}

fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

/// Parse a dm-log-writes log: its sector size (the unit a write may be
/// torn in) and entries.
pub fn read_log_sectors(path: &Path) -> (usize, Vec<Entry>) {
    let log = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    if log.is_empty() {
        // Nothing was ever written (both drivers write the superblock
        // with the first flush).
        return (512, Vec::new());
    }
    assert!(log.len() >= 32, "{}: no superblock", path.display());
    assert_eq!(le64(&log, 0), MAGIC, "{}: bad magic", path.display());
    assert_eq!(le64(&log, 8), 1, "{}: bad version", path.display());
    let n = le64(&log, 16);
    let ss = u32::from_le_bytes(log[24..28].try_into().unwrap()) as usize;
    let mut at = ss;
    let mut out = Vec::new();
    for i in 0..n {
        assert!(
            at + ss <= log.len(),
            "{}: entry {i} truncated",
            path.display()
        );
        let e = &log[at..at + ss];
        let (sector, nr, flags) = (le64(e, 0), le64(e, 8), le64(e, 16));
        let ts = le64(e, 32);
        at += ss;
        let op = if flags & LOG_FLUSH != 0 {
            Op::Flush
        } else if flags & LOG_DISCARD != 0 {
            Op::Discard {
                offset: sector * ss as u64,
                len: nr * ss as u64,
            }
        } else if flags & LOG_MARK != 0 {
            at += nr as usize * ss;
            continue;
        } else {
            let len = nr as usize * ss;
            let data = log[at..at + len].to_vec();
            at += len;
            Op::Write {
                offset: sector * ss as u64,
                data,
            }
        };
        out.push(Entry { ts, op });
    }
    (ss, out)
}

/// Parse a dm-log-writes log's entries.
pub fn read_log(path: &Path) -> Vec<Entry> {
    read_log_sectors(path).1
}

/// Write a log in the same format (for synthetic logs in tests).
pub fn write_log(path: &Path, entries: &[Entry]) {
    const SS: usize = 512;
    let mut log = vec![0u8; SS];
    log[0..8].copy_from_slice(&MAGIC.to_le_bytes());
    log[8..16].copy_from_slice(&1u64.to_le_bytes());
    log[16..24].copy_from_slice(&(entries.len() as u64).to_le_bytes());
    log[24..28].copy_from_slice(&(SS as u32).to_le_bytes());
    for e in entries {
        let mut s = vec![0u8; SS];
        let (offset, len, flags, data) = match &e.op {
            Op::Write { offset, data } => (*offset, data.len() as u64, 0, Some(data)),
            Op::Discard { offset, len } => (*offset, *len, LOG_DISCARD, None),
            Op::Flush => (0, 0, LOG_FLUSH, None),
        };
        assert!(offset % SS as u64 == 0 && len % SS as u64 == 0);
        s[0..8].copy_from_slice(&(offset / SS as u64).to_le_bytes());
        s[8..16].copy_from_slice(&(len / SS as u64).to_le_bytes());
        s[16..24].copy_from_slice(&flags.to_le_bytes());
        s[32..40].copy_from_slice(&e.ts.to_le_bytes());
        log.extend_from_slice(&s);
        if let Some(d) = data {
            log.extend_from_slice(d);
        }
    }
    std::fs::write(path, log).unwrap();
}

/// One image file of a run: its name in the chain's directory, its bytes
/// before the run and its log.
pub struct Recorded {
    pub name: String,
    pub initial: Vec<u8>,
    pub entries: Vec<Entry>,
    /// Is a qcow2 image (`qemu-img check` applies).
    pub qcow2: bool,
    /// The log's sector size: what a write is atomic in.
    pub sector: usize,
}

impl Recorded {
    /// The file `dir/name` as it is now (before the run), its log to come
    /// at `dir/name.log` (an empty file is made for the node to open).
    pub fn before(dir: &Path, name: &str) -> Recorded {
        let initial = std::fs::read(dir.join(name)).unwrap();
        std::fs::write(dir.join(format!("{name}.log")), b"").unwrap();
        Recorded {
            name: name.to_string(),
            qcow2: initial.starts_with(b"QFI\xfb"),
            initial,
            entries: Vec::new(),
            sector: 512,
        }
    }

    /// Read the log once the node that wrote it is gone, and check that
    /// replaying all of it gives the file as it is: nothing reached the
    /// file without passing the log.
    pub fn finish(&mut self, dir: &Path) {
        (self.sector, self.entries) = read_log_sectors(&dir.join(format!("{}.log", self.name)));
        let all: Vec<Pick> = (0..self.entries.len()).map(Pick::Whole).collect();
        let rebuilt = self.apply(&all);
        let now = std::fs::read(dir.join(&self.name)).unwrap();
        assert!(
            rebuilt == now,
            "{}: replaying its log ({} entries) does not give the file as it is ({} vs {} bytes): a write bypassed the log",
            self.name,
            self.entries.len(),
            rebuilt.len(),
            now.len()
        );
    }

    fn apply(&self, picks: &[Pick]) -> Vec<u8> {
        let mut f = self.initial.clone();
        let put = |f: &mut Vec<u8>, off: usize, data: &[u8]| {
            if f.len() < off + data.len() {
                f.resize(off + data.len(), 0);
            }
            f[off..off + data.len()].copy_from_slice(data);
        };
        for p in picks {
            let (i, sectors) = match p {
                Pick::Whole(i) => (*i, None),
                Pick::Torn(i, s) => (*i, Some(s)),
            };
            match &self.entries[i].op {
                Op::Write { offset, data } => match sectors {
                    None => put(&mut f, *offset as usize, data),
                    Some(s) => {
                        let ss = self.sector;
                        for &k in s {
                            put(
                                &mut f,
                                *offset as usize + k * ss,
                                &data[k * ss..(k + 1) * ss],
                            );
                        }
                    }
                },
                Op::Discard { offset, len } => {
                    let zero = vec![0u8; *len as usize];
                    put(&mut f, *offset as usize, &zero);
                }
                Op::Flush => {}
            }
        }
        f
    }
}

/// An entry applied whole, or only some of its sectors.
#[derive(Debug, Clone)]
enum Pick {
    Whole(usize),
    Torn(usize, Vec<usize>),
}

/// A crash state: for each file, the entries on disk.
pub struct State {
    pub label: String,
    picks: Vec<Vec<Pick>>,
    /// Completion time of the last event counted in (global order).
    pub at_ts: u64,
}

/// splitmix64: a seeded generator that needs no crate.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// The seed: `CRASH_SEED` if set, else the time; printed either way.
pub fn seed() -> u64 {
    let s = std::env::var("CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    eprintln!("crash states: CRASH_SEED={s}");
    s
}

/// The crash states of a run: every flush point (everything before it
/// applied), and `samples` sampled points with a random subset of the
/// unflushed writes (torn ones among them), at most `max` states in all
/// (flush points evenly thinned if there are more).
pub fn crash_states(files: &[Recorded], rng: &mut Rng, samples: usize, max: usize) -> Vec<State> {
    // The global order: (time, file, index); ties keep each log's order.
    let mut events: Vec<(u64, usize, usize)> = files
        .iter()
        .enumerate()
        .flat_map(|(f, r)| r.entries.iter().enumerate().map(move |(i, e)| (e.ts, f, i)))
        .collect();
    events.sort();
    let is_flush = |&(_, f, i): &(u64, usize, usize)| matches!(files[f].entries[i].op, Op::Flush);
    // The state with the first `n` events of the global order in it.
    let prefix = |n: usize| -> Vec<Vec<Pick>> {
        let mut picks = vec![Vec::new(); files.len()];
        for &(_, f, i) in &events[..n] {
            picks[f].push(Pick::Whole(i));
        }
        picks
    };
    let mut out = Vec::new();
    out.push(State {
        label: "before the run".into(),
        picks: vec![Vec::new(); files.len()],
        at_ts: 0,
    });
    let flush_points: Vec<usize> = (0..events.len())
        .filter(|&n| is_flush(&events[n]))
        .collect();
    let budget = max.saturating_sub(samples + 2).max(1);
    let step = flush_points.len().div_ceil(budget).max(1);
    for (k, &n) in flush_points.iter().enumerate() {
        if k % step != 0 && k + 1 != flush_points.len() {
            continue;
        }
        let (ts, f, _) = events[n];
        out.push(State {
            label: format!("flush point {k} (file {})", files[f].name),
            picks: prefix(n + 1),
            at_ts: ts,
        });
    }
    out.push(State {
        label: "after the run".into(),
        picks: prefix(events.len()),
        at_ts: u64::MAX,
    });
    // Every way to tear the first (up to) 4 sectors of a write, the rest
    // of it applied, on top of everything before it: all of them for
    // writes of the header (offset 0, where a tear hurts most), the others
    // evenly thinned to `max / 2` states.
    let (mut header_tears, mut tears) = (Vec::new(), Vec::new());
    for (n, &(_, f, i)) in events.iter().enumerate() {
        if let Op::Write { offset, data } = &files[f].entries[i].op {
            let sectors = data.len() / files[f].sector;
            let torn = sectors.min(4);
            if torn >= 2 {
                let list = if *offset == 0 {
                    &mut header_tears
                } else {
                    &mut tears
                };
                list.extend((1..(1u32 << torn) - 1).map(|mask| (n, sectors, mask)));
            }
        }
    }
    let step = tears.len().div_ceil((max / 2).max(1)).max(1);
    let chosen = header_tears.iter().chain(tears.iter().step_by(step));
    for &(n, sectors, mask) in chosen {
        let (ts, f, i) = events[n];
        let mut picks = prefix(n);
        let keep = (0..sectors)
            .filter(|&k| k >= 4 || mask & (1 << k) != 0)
            .collect();
        picks[f].push(Pick::Torn(i, keep));
        out.push(State {
            label: format!("event {n} ({}) torn, sectors {mask:#b}", files[f].name),
            picks,
            at_ts: ts,
        });
    }
    for s in 0..samples {
        if events.is_empty() {
            break;
        }
        let n = 1 + rng.below(events.len() as u64) as usize;
        // Per file: everything up to its last flush among the first n
        // events is on disk; after it, each write is there or not.
        let mut picks = vec![Vec::new(); files.len()];
        let mut pending: Vec<Vec<usize>> = vec![Vec::new(); files.len()];
        for &(_, f, i) in &events[..n] {
            match files[f].entries[i].op {
                Op::Flush => {
                    picks[f].extend(pending[f].drain(..).map(Pick::Whole));
                }
                _ => pending[f].push(i),
            }
        }
        let mut dropped = 0;
        for (f, p) in pending.into_iter().enumerate() {
            for i in p {
                match rng.below(4) {
                    0 | 1 => picks[f].push(Pick::Whole(i)),
                    2 => dropped += 1,
                    _ => {
                        let sectors = match &files[f].entries[i].op {
                            Op::Write { data, .. } => data.len() / files[f].sector,
                            _ => 1,
                        };
                        let keep: Vec<usize> = (0..sectors).filter(|_| rng.below(2) == 0).collect();
                        if sectors > 1 {
                            picks[f].push(Pick::Torn(i, keep));
                        } else if !keep.is_empty() {
                            picks[f].push(Pick::Whole(i));
                        }
                    }
                }
            }
        }
        out.push(State {
            label: format!(
                "sample {s}: event {n} of {}, {dropped} unflushed writes left out",
                events.len()
            ),
            picks,
            at_ts: events[n - 1].0,
        });
    }
    out
}

/// What a state must satisfy, besides every qcow2 image passing
/// `qemu-img check` (leaks allowed).
pub struct Expect<'a> {
    /// The image whose guest view is checked (a file name in the dir).
    pub view_of: &'a str,
    /// The guest view it must have (a raw file).
    pub view: &'a Path,
}

/// Each `block`-sized piece of `view` equals the same piece of `before`
/// or of `after` (a write that did not reach the disk, or did, never
/// anything else): `Err` names the first that is neither.
pub fn each_block_old_or_new(
    view: &[u8],
    before: &[u8],
    after: &[u8],
    block: usize,
) -> Result<(), String> {
    for (i, v) in view.chunks(block).enumerate() {
        let r = i * block..i * block + v.len();
        if v != &before[r.clone()] && v != &after[r.clone()] {
            return Err(format!(
                "bytes {:#x}..{:#x} are neither what they were nor what was written",
                r.start, r.end
            ));
        }
    }
    Ok(())
}

/// The guest view of `dir/image` as raw bytes (`qemu-img convert`).
pub fn guest_view(dir: &Path, image: &str) -> Result<Vec<u8>, String> {
    let raw = dir.join("view.raw");
    let out = Command::new("qemu-img")
        .args(["convert", "-O", "raw"])
        .arg(dir.join(image))
        .arg(&raw)
        .output()
        .unwrap();
    if !out.status.success() {
        return Err(format!(
            "qemu-img convert {image}: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let v = std::fs::read(&raw).unwrap();
    std::fs::remove_file(&raw).unwrap();
    Ok(v)
}

/// Write a state's files into `dir`.
pub fn materialise(files: &[Recorded], st: &State, dir: &Path) {
    for (f, r) in files.iter().enumerate() {
        std::fs::write(dir.join(&r.name), r.apply(&st.picks[f])).unwrap();
    }
}

/// Check one state; `Err` with what failed.
pub fn check_state(
    files: &[Recorded],
    st: &State,
    dir: &Path,
    expect: &[Expect],
) -> Result<(), String> {
    materialise(files, st, dir);
    for r in files.iter().filter(|r| r.qcow2) {
        let out = Command::new("qemu-img")
            .args(["check", "-q"])
            .arg(dir.join(&r.name))
            .output()
            .unwrap();
        // 0: clean; 3: leaked clusters only. 1: could not check; 2: corrupt.
        if !matches!(out.status.code(), Some(0 | 3)) {
            return Err(format!(
                "{}: qemu-img check exited {:?}: {}{}",
                r.name,
                out.status.code(),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
    }
    for e in expect {
        let out = Command::new("qemu-img")
            .args(["compare", "-q", "-F", "raw"])
            .arg(dir.join(e.view_of))
            .arg(e.view)
            .output()
            .unwrap();
        if out.status.code() != Some(0) {
            return Err(format!(
                "{}: guest view is not the expected one (qemu-img compare exited {:?}): {}",
                e.view_of,
                out.status.code(),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
    }
    Ok(())
}

/// The logs in short: `W offset+len`, `D offset+len`, `F`, per file.
pub fn describe(files: &[Recorded]) -> String {
    let mut out = String::new();
    for r in files {
        let ops: Vec<String> = r
            .entries
            .iter()
            .take(200)
            .map(|e| match &e.op {
                Op::Write { offset, data } => format!("W{offset:#x}+{:#x}", data.len()),
                Op::Discard { offset, len } => format!("D{offset:#x}+{len:#x}"),
                Op::Flush => "F".into(),
            })
            .collect();
        out += &format!("{}: {}\n", r.name, ops.join(" "));
    }
    out
}

/// Check every state; panics listing the failures (with the seed printed
/// before). Returns the number of states checked. `expect` says per state
/// what its guest views must be.
pub fn check_all(
    files: &[Recorded],
    states: &[State],
    expect: impl Fn(&State) -> Vec<(String, PathBuf)>,
) -> usize {
    check_all_with(files, states, expect, |_, _| Ok(()))
}

/// [`check_all`] with one more check per state, run on the state's
/// directory after the others passed.
pub fn check_all_with(
    files: &[Recorded],
    states: &[State],
    expect: impl Fn(&State) -> Vec<(String, PathBuf)>,
    extra: impl Fn(&State, &Path) -> Result<(), String>,
) -> usize {
    let dir = tempfile::Builder::new()
        .prefix("crash-state")
        .tempdir_in(if Path::new("/dev/shm").is_dir() {
            "/dev/shm"
        } else {
            "/tmp"
        })
        .unwrap();
    let mut failures = Vec::new();
    for st in states {
        let want = expect(st);
        let ex: Vec<Expect> = want
            .iter()
            .map(|(n, p)| Expect {
                view_of: n,
                view: p,
            })
            .collect();
        if let Err(e) = check_state(files, st, dir.path(), &ex).and_then(|()| extra(st, dir.path()))
        {
            failures.push(format!("{}: {e}", st.label));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} crash states failed:\n{}\nthe logs:\n{}",
        failures.len(),
        states.len(),
        failures.join("\n"),
        describe(files)
    );
    states.len()
}
