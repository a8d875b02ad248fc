//! Early writeback (`Node::start_writeback`), the hint that lets mirror,
//! stream and commit have the device write while they copy instead of all
//! at the flush. Observed with cachestat(2), which counts a file's dirty
//! pages: after the hint they are gone within seconds, where the kernel
//! would otherwise leave them dirty for `dirty_expire_centisecs` (30 s by
//! default). The files live under /var/tmp: on tmpfs nothing is ever
//! written back, so there is nothing to observe.

#![cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]

mod common;

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use blockjob::Context;
use blockjob::block::Node;
use serde_json::{Value, json};

const MIB: u64 = 1 << 20;
const PAGE: u64 = 4096;

#[repr(C)]
struct CachestatRange {
    off: u64,
    len: u64,
}

#[repr(C)]
#[derive(Default, Debug)]
struct Cachestat {
    nr_cache: u64,
    nr_dirty: u64,
    nr_writeback: u64,
    nr_evicted: u64,
    nr_recently_evicted: u64,
}

/// Dirty and under-writeback pages of the whole file.
#[allow(unsafe_code)]
fn dirty_pages(path: &Path) -> (u64, u64) {
    let f = std::fs::File::open(path).unwrap();
    let range = CachestatRange { off: 0, len: 0 };
    let mut st = Cachestat::default();
    // cachestat is 451 in the generic syscall table (Linux 6.5+), which
    // x86_64 and aarch64 share; the libc crate has no constant for it.
    // SAFETY: the kernel reads `range` and writes `st`, both live, properly
    // sized #[repr(C)] structs of the kernel's layout; the fd is open for
    // the duration of the call.
    let r = unsafe {
        libc::syscall(
            451,
            f.as_raw_fd(),
            &range as *const CachestatRange,
            &mut st as *mut Cachestat,
            0u32,
        )
    };
    assert_eq!(
        r,
        0,
        "cachestat failed: {} (this test needs Linux 6.5+)",
        std::io::Error::last_os_error()
    );
    (st.nr_dirty, st.nr_writeback)
}

fn disk_dir() -> tempfile::TempDir {
    let d = tempfile::tempdir_in("/var/tmp").unwrap();
    let fs = nix::sys::statfs::statfs(d.path()).unwrap();
    assert_ne!(
        fs.filesystem_type(),
        nix::sys::statfs::TMPFS_MAGIC,
        "/var/tmp is tmpfs here: nothing is ever written back there"
    );
    d
}

const LEN: u64 = 16 * MIB;
/// The write must leave at least this many pages dirty for a test to mean
/// anything.
const MIN_DIRTY: u64 = LEN / PAGE / 2;

/// Write LEN bytes through `node`, check the file holds at least MIN_DIRTY
/// dirty pages, give the hint, and return how many dirty or
/// under-writeback pages are left after waiting up to `wait` for no more
/// than `enough`.
fn write_hint_and_wait(node: &Node, file: &Path, enough: u64, wait: Duration) -> u64 {
    node.pwrite(0, &vec![0x5a; LEN as usize]).unwrap();
    let (dirty, _) = dirty_pages(file);
    assert!(
        dirty >= MIN_DIRTY,
        "precondition: the write left only {dirty} dirty pages"
    );
    node.start_writeback(0, LEN);
    let deadline = Instant::now() + wait;
    loop {
        let (d, w) = dirty_pages(file);
        if d + w <= enough || Instant::now() >= deadline {
            return d + w;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A LEN-byte raw file in `dir` opened as a raw node, with `file_opts`
/// added to its file node.
fn raw_node(ctx: &Context, dir: &Path, name: &str, file_opts: Value) -> (Arc<Node>, PathBuf) {
    let p = dir.join(format!("{name}.raw"));
    std::fs::File::create(&p).unwrap().set_len(LEN).unwrap();
    let mut file = json!({"driver": "file", "filename": p});
    if let (Some(f), Some(e)) = (file.as_object_mut(), file_opts.as_object()) {
        f.extend(e.clone());
    }
    let node = ctx
        .blockdev_add(&json!({"driver": "raw", "node-name": name, "file": file}))
        .unwrap();
    (node, p)
}

#[test]
fn the_hint_writes_a_raw_files_dirty_pages_back_at_once() {
    let dir = disk_dir();
    let ctx = Context::new();
    let (node, p) = raw_node(&ctx, dir.path(), "a", json!({}));
    // Ranges past the end, overflowing ones and empty ones are ignored.
    node.start_writeback(LEN, 1);
    node.start_writeback(u64::MAX, 2);
    node.start_writeback(0, 0);
    let left = write_hint_and_wait(&node, &p, 0, Duration::from_secs(10));
    assert_eq!(
        left, 0,
        "pages still dirty or under writeback after the hint"
    );
}

#[test]
fn cache_no_flush_keeps_the_hint_from_writing() {
    // The control: the same write without the hint taking effect stays
    // dirty (so the test above measures the hint, not the kernel's own
    // writeback).
    let dir = disk_dir();
    let ctx = Context::new();
    let (node, p) = raw_node(&ctx, dir.path(), "b", json!({"cache": {"no-flush": true}}));
    let left = write_hint_and_wait(&node, &p, 0, Duration::from_secs(1));
    assert!(
        left >= MIN_DIRTY,
        "only {left} pages left dirty without the hint taking effect"
    );
}

#[test]
fn qcow2_passes_the_hint_to_where_its_data_lies() {
    let dir = disk_dir();
    let p = dir.path().join("c.qcow2");
    common::chain::tool(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", p.to_str().unwrap(), "16M"],
    );
    let ctx = Context::new();
    let node = ctx
        .blockdev_add(&json!({"driver": "qcow2", "node-name": "c",
                              "file": {"driver": "file", "filename": p}}))
        .unwrap();
    // Metadata (L2 table, refcounts) may stay dirty until the flush:
    // allow 256 KiB of the 16 MiB.
    let left = write_hint_and_wait(&node, &p, 64, Duration::from_secs(10));
    assert!(left <= 64, "{left} pages still dirty after the hint");
}
