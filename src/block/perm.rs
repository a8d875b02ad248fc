//! Permissions and image locking, QEMU's way (`block.c`'s permission
//! system and `file-posix.c`'s lock bytes).
//!
//! Every parent of a node takes some permissions on it and shares some
//! with everybody else; a node's cumulative permissions are the union of
//! what its parents take and the intersection of what they share
//! ([`Graph::refresh_perms`](super::graph::Graph::refresh_perms)). A
//! driver turns its own cumulative permissions into what it needs from
//! each child ([`BlockDriver::child_perm`](super::BlockDriver::child_perm),
//! with QEMU's defaults for filters, backing files and a format's storage
//! below). At the bottom, a `file`/`host_device` node holds one shared read
//! lock (an open file description lock, so it belongs to the open file and
//! goes when the fd closes) per permission:
//!
//! - byte `100 + bit` for each permission it holds,
//! - byte `200 + bit` for each permission it does not share,
//!
//! and refuses a permission whose `200 + bit` another process holds
//! (`Failed to get "write" lock`), or to unshare one whose `100 + bit`
//! another holds (`Failed to get shared "write" lock`). The bits are
//! QEMU's `BLK_PERM_*`: consistent read 0x1, write 0x2, write unchanged
//! 0x4, resize 0x8 (`RAW_LOCK_PERM_BASE` 100, `RAW_LOCK_SHARED_BASE` 200).
//!
//! What QEMU 10 (qemu-storage-daemon) holds, read from `/proc/locks`, and
//! what we hold for the same graph (`cli/tests/locking.rs` builds each
//! graph on both daemons and compares the bytes per file):
//!
//! | graph                                   | file         | holds (100+)          | does not share (200+)   |
//! |-----------------------------------------|--------------|-----------------------|-------------------------|
//! | `file` alone, read-write or read-only   | it           | –                     | –                       |
//! | `raw` alone                             | it           | –                     | –                       |
//! | `raw` with `offset`/`size`              | it           | –                     | resize                  |
//! | `qcow2` alone, read-write               | it           | read, write, resize   | write, resize           |
//! | `qcow2` alone, read-only                | it           | read                  | write, resize           |
//! | `qcow2` with its backing chain          | top          | read, write, resize   | write, resize           |
//! |                                         | each backing | read                  | write, resize           |
//! | NBD export (writable) on `raw`          | it           | read, write           | resize                  |
//! | NBD export (read-only) on `raw`         | it           | read                  | resize                  |
//! | NBD export on `qcow2` (either)          | it           | read, write, resize   | write, resize           |
//! | mirror `qcow2` → `qcow2`                | source       | read, write, resize   | write, resize           |
//! |                                         | target       | read, write, resize   | read, write, resize     |
//! | mirror `raw` → `qcow2`                  | source       | read                  | resize                  |
//! | mirror `qcow2` → `raw`                  | target       | write                 | read, write, resize     |
//! | backup `qcow2` → `qcow2`                | source       | read, write, resize   | write, resize           |
//! |                                         | target       | read, write, resize   | write, resize           |
//! | backup `raw` → `qcow2`                  | source       | read                  | write, resize           |
//! | stream top (base, mid below)            | top          | read, write, w-unch., resize | write, resize    |
//! |                                         | mid, base    | read                  | write, resize           |
//! | commit mid → base (or active commit)    | top          | read, write, resize   | write, resize           |
//! |                                         | mid          | read                  | read, write, resize     |
//! |                                         | base         | read, write, resize   | write, resize           |
//! | commit mid → base, after the job        | base         | read                  | write, resize           |
//! | stream into mid (implicit), after it    | mid          | read                  | write, resize           |
//! | blockdev-snapshot (old top now backing) | old top      | read                  | write, resize           |
//! | `qcow2` read-only, `force-share=on`     | it           | read                  | –                       |
//! | `locking=off`, after `blockdev-del`     | it           | –                     | –                       |
//!
//! Write (or write unchanged) asked of a read-only node — `read-only`, or
//! a backing file opened implicitly and not reopened read-write by a
//! commit or stream — is refused before any byte is locked, with QEMU's
//! `Block node is read-only` (`blockdev-mirror` to a read-only target;
//! `blockdev-backup` says `Could not create node: Block node is
//! read-only`, as QEMU's copy-before-write filter does; a backend asking
//! write).
//!
//! Changes follow QEMU's `raw_check_perm`/`raw_set_perm`: every file of
//! the graph first locks the union of its old and new bytes and checks
//! the new set against other processes; only when all succeeded do they
//! drop what they no longer need, and on any conflict each goes back to
//! its old bytes and the graph change fails with nothing half-done.

use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd};
use std::sync::Arc;

use nix::fcntl::{FcntlArg, fcntl};

use crate::error::{Error, Result};
use crate::locks::Mutex;

use super::Node;
use super::graph::{Graph, GraphInner};

/// `BLK_PERM_CONSISTENT_READ`: reads return what was last written.
pub const PERM_CONSISTENT_READ: u64 = 0x1;
/// `BLK_PERM_WRITE`: writes that change what the node reads.
pub const PERM_WRITE: u64 = 0x2;
/// `BLK_PERM_WRITE_UNCHANGED`: writes that leave the data as it reads
/// (copy-on-read).
pub const PERM_WRITE_UNCHANGED: u64 = 0x4;
/// `BLK_PERM_RESIZE`: changing the node's size.
pub const PERM_RESIZE: u64 = 0x8;
/// `BLK_PERM_ALL`.
pub const PERM_ALL: u64 = 0xf;
/// QEMU's `DEFAULT_PERM_PASSTHROUGH`: what a filter forwards.
const PERM_PASSTHROUGH: u64 = PERM_ALL;

/// `RAW_LOCK_PERM_BASE`: byte 100 + bit is held for a permission taken.
pub const LOCK_PERM_BASE: i64 = 100;
/// `RAW_LOCK_SHARED_BASE`: byte 200 + bit is held for one not shared.
pub const LOCK_SHARED_BASE: i64 = 200;

/// QEMU's names of the permissions, by bit (`bdrv_perm_names`).
const PERM_NAMES: [&str; 4] = ["consistent read", "write", "write unchanged", "resize"];

/// Permissions a user takes on a node, and those it lets others take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Perms {
    /// Taken (`BLK_PERM_*` bits).
    pub perm: u64,
    /// Shared with every other user.
    pub shared: u64,
}

impl Perms {
    /// Takes nothing, shares everything (a node with no parents).
    pub const NONE: Perms = Perms {
        perm: 0,
        shared: PERM_ALL,
    };

    /// `perm` taken, `shared` shared.
    pub const fn new(perm: u64, shared: u64) -> Perms {
        Perms { perm, shared }
    }

    /// A guest device as QEMU's `blkconf_apply_backend_options` sets it
    /// up (virtio-blk, scsi-hd…): consistent read, write unless
    /// read-only; shares consistent read, write-unchanged and resize, and
    /// write only with `share-rw=on`.
    pub const fn guest_device(read_only: bool, share_rw: bool) -> Perms {
        let perm = PERM_CONSISTENT_READ | if read_only { 0 } else { PERM_WRITE };
        let shared = PERM_CONSISTENT_READ
            | PERM_WRITE_UNCHANGED
            | PERM_RESIZE
            | if share_rw { PERM_WRITE } else { 0 };
        Perms { perm, shared }
    }

    /// A block export (QEMU's `blk_exp_add`, plus the NBD server's
    /// `shared & ~RESIZE`: the size it announced must not change).
    pub const fn nbd_export(writable: bool) -> Perms {
        Perms {
            perm: PERM_CONSISTENT_READ | if writable { PERM_WRITE } else { 0 },
            shared: PERM_ALL & !PERM_RESIZE,
        }
    }

    /// Add another parent's permissions (union taken, intersection shared).
    pub fn add(&mut self, other: Perms) {
        self.perm |= other.perm;
        self.shared &= other.shared;
    }
}

/// QEMU's `bdrv_filter_default_perms`: a filter forwards what its parents
/// take and share.
pub fn filter_perms(p: Perms) -> Perms {
    Perms {
        perm: p.perm & PERM_PASSTHROUGH,
        shared: p.shared & PERM_PASSTHROUGH,
    }
}

/// QEMU's `bdrv_default_perms_for_cow`: a backing file is only read
/// (consistently if the parent needs it); it may be written and resized
/// by others only when the parent shares write.
pub fn cow_perms(p: Perms) -> Perms {
    let mut shared = if p.shared & PERM_WRITE != 0 {
        PERM_WRITE | PERM_RESIZE
    } else {
        0
    };
    shared |= PERM_CONSISTENT_READ | PERM_WRITE_UNCHANGED;
    Perms {
        perm: p.perm & PERM_CONSISTENT_READ,
        shared,
    }
}

/// QEMU's `bdrv_default_perms_for_storage` for a child holding a
/// format's `metadata` and/or `data`; `writable` is the format node's
/// own read-write state (metadata may be written even if no parent
/// writes).
pub fn storage_perms(p: Perms, metadata: bool, data: bool, writable: bool) -> Perms {
    let Perms {
        mut perm,
        mut shared,
    } = filter_perms(p);
    if metadata {
        if writable {
            perm |= PERM_WRITE | PERM_RESIZE;
        }
        // The metadata must stay consistent: nobody else writes or
        // resizes it.
        perm |= PERM_CONSISTENT_READ;
        shared &= !(PERM_WRITE | PERM_RESIZE);
    }
    if data {
        // The format may assume the size (metadata or fixed layout).
        shared &= !PERM_RESIZE;
        // Copied-up clusters are real writes on the storage.
        if perm & PERM_WRITE_UNCHANGED != 0 {
            perm |= PERM_WRITE;
        }
        // Writes may extend the storage past its end.
        if perm & PERM_WRITE != 0 {
            perm |= PERM_RESIZE;
        }
    }
    Perms { perm, shared }
}

/// `locking` of a `file` node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Locking {
    /// Lock where open file description locks exist (always on Linux).
    #[default]
    Auto,
    /// Lock.
    On,
    /// Never lock.
    Off,
}

/// The lock bytes a `file` node holds on its open file, and the
/// permissions they stand for.
#[derive(Debug)]
pub struct FileLock {
    enabled: bool,
    /// Committed permissions, and those being prepared (`raw_check_perm`
    /// until `raw_set_perm` or `raw_abort_perm`).
    state: Mutex<LockState>,
}

#[derive(Debug)]
struct LockState {
    cur: Perms,
    pending: Option<Perms>,
}

/// `F_OFD_SETLK` of one byte: a shared read lock or an unlock.
fn set_byte(fd: &impl AsFd, byte: i64, lock: bool) -> nix::Result<()> {
    let fl = flock(byte, if lock { libc::F_RDLCK } else { libc::F_UNLCK });
    fcntl(fd.as_fd().as_raw_fd(), FcntlArg::F_OFD_SETLK(&fl)).map(drop)
}

fn flock(byte: i64, kind: libc::c_int) -> libc::flock {
    let mut fl = zeroed_flock();
    fl.l_type = kind as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = byte;
    fl.l_len = 1;
    fl
}

/// An all-zero `flock`, built field by field (the crate forbids `unsafe`
/// here, and `libc::flock` has no `Default`).
fn zeroed_flock() -> libc::flock {
    libc::flock {
        l_type: 0,
        l_whence: 0,
        l_start: 0,
        l_len: 0,
        l_pid: 0,
    }
}

/// `F_OFD_GETLK` with a write lock: whether another open file description
/// holds a lock on `byte` (our own never conflict).
fn byte_taken(fd: &impl AsFd, byte: i64) -> nix::Result<bool> {
    let mut fl = flock(byte, libc::F_WRLCK);
    fcntl(fd.as_fd().as_raw_fd(), FcntlArg::F_OFD_GETLK(&mut fl))?;
    Ok(fl.l_type != libc::F_UNLCK as libc::c_short)
}

/// Hold exactly the bytes for `perm` taken and `unshared` not shared; with
/// `unlock` false, bytes outside them are kept (QEMU's
/// `raw_apply_lock_bytes`).
fn apply_bytes(fd: &impl AsFd, perm: u64, unshared: u64, unlock: bool) -> nix::Result<()> {
    for bit in 0..PERM_NAMES.len() {
        let m = 1u64 << bit;
        for (base, set) in [(LOCK_PERM_BASE, perm), (LOCK_SHARED_BASE, unshared)] {
            if set & m != 0 {
                set_byte(fd, base + bit as i64, true)?;
            } else if unlock {
                set_byte(fd, base + bit as i64, false)?;
            }
        }
    }
    Ok(())
}

/// QEMU's `raw_check_lock_bytes`: another process's locks against what
/// we want, with QEMU's texts.
fn check_bytes(fd: &impl AsFd, want: Perms) -> Result<()> {
    for (bit, name) in PERM_NAMES.iter().enumerate() {
        let m = 1u64 << bit;
        if want.perm & m != 0 && taken(fd, LOCK_SHARED_BASE + bit as i64)? {
            return Err(Error::generic(format!("Failed to get \"{name}\" lock")));
        }
    }
    for (bit, name) in PERM_NAMES.iter().enumerate() {
        let m = 1u64 << bit;
        if want.shared & m == 0 && taken(fd, LOCK_PERM_BASE + bit as i64)? {
            return Err(Error::generic(format!(
                "Failed to get shared \"{name}\" lock"
            )));
        }
    }
    Ok(())
}

fn taken(fd: &impl AsFd, byte: i64) -> Result<bool> {
    byte_taken(fd, byte).map_err(|e| {
        Error::errno_msg(
            e as i32,
            format!("Failed to get lock byte {byte}: {}", e.desc()),
        )
    })
}

impl FileLock {
    /// The lock state of a newly opened file: nothing held, everything
    /// shared. `locking=auto` locks: Linux always has OFD locks.
    pub fn new(locking: Locking) -> FileLock {
        FileLock {
            enabled: locking != Locking::Off,
            state: Mutex::new(LockState {
                cur: Perms::NONE,
                pending: None,
            }),
        }
    }

    /// Whether this file takes locks at all (`locking`).
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// The committed permissions.
    pub fn current(&self) -> Perms {
        self.state.lock().cur
    }

    /// QEMU's `raw_check_perm`: lock the union of the current and the new
    /// bytes, then check the new set against other processes. On failure
    /// the old bytes are restored and the error carries QEMU's hint
    /// `Is another process using the image [PATH]?` on its own line.
    pub fn check(&self, fd: &impl AsFd, new: Perms, path: &str) -> Result<()> {
        let mut st = self.state.lock();
        st.pending = Some(new);
        if !self.enabled {
            return Ok(());
        }
        let cur = st.cur;
        let r = apply_bytes(
            fd,
            cur.perm | new.perm,
            (!cur.shared | !new.shared) & PERM_ALL,
            false,
        )
        .map_err(|e| Error::errno_msg(e as i32, format!("Failed to lock byte: {}", e.desc())))
        .and_then(|()| check_bytes(fd, new));
        if let Err(e) = r {
            st.pending = None;
            // Back to exactly the old bytes (QEMU's RAW_PL_ABORT).
            let _ = apply_bytes(fd, cur.perm, !cur.shared & PERM_ALL, true);
            return Err(e.append_hint(format!("Is another process using the image [{path}]?")));
        }
        Ok(())
    }

    /// QEMU's `raw_set_perm`: keep only the new bytes.
    pub fn commit(&self, fd: &impl AsFd) {
        let mut st = self.state.lock();
        let Some(new) = st.pending.take() else { return };
        st.cur = new;
        if self.enabled {
            // Unlocking cannot conflict; an error here leaves extra bytes
            // held, which only ever refuses more (QEMU ignores it too).
            let _ = apply_bytes(fd, new.perm, !new.shared & PERM_ALL, true);
        }
    }

    /// QEMU's `raw_abort_perm`: back to the committed bytes.
    pub fn abort(&self, fd: &impl AsFd) {
        let mut st = self.state.lock();
        if st.pending.take().is_some() && self.enabled {
            let cur = st.cur;
            let _ = apply_bytes(fd, cur.perm, !cur.shared & PERM_ALL, true);
        }
    }
}

// ---- the graph's permissions ----------------------------------------------

/// Every node reachable from `roots`, parents before children (reverse
/// post-order of a depth-first walk over the children).
fn parents_first(roots: impl Iterator<Item = Arc<Node>>) -> Vec<Arc<Node>> {
    fn visit(n: &Arc<Node>, seen: &mut HashMap<usize, ()>, out: &mut Vec<Arc<Node>>) {
        if seen.insert(Arc::as_ptr(n) as usize, ()).is_some() {
            return;
        }
        for c in n.children() {
            visit(&c.node, seen, out);
        }
        out.push(n.clone());
    }
    let mut seen = HashMap::new();
    let mut out = Vec::new();
    for r in roots {
        visit(&r, &mut seen, &mut out);
    }
    out.reverse();
    out
}

/// Compute every node's cumulative permissions and move the lock bytes
/// there, all or nothing (QEMU's `bdrv_refresh_perms` over the graph).
fn refresh(nodes: &[Arc<Node>]) -> Result<()> {
    let order = parents_first(nodes.iter().cloned());
    let key = |n: &Arc<Node>| Arc::as_ptr(n) as usize;
    let mut acc: HashMap<usize, Perms> = HashMap::new();
    for n in &order {
        let mut p = Perms::NONE;
        for mut q in n.non_node_parent_perms() {
            if n.force_share() {
                q.shared = PERM_ALL;
            }
            p.add(q);
        }
        acc.insert(key(n), p);
    }
    for n in &order {
        let p = acc[&key(n)];
        for c in n.children() {
            let mut cp = n.driver().child_perm(&c, p, n.perm_writable());
            // QEMU's bdrv_child_perm: a force-share node shares everything.
            if c.node.force_share() {
                cp.shared = PERM_ALL;
            }
            if let Some(a) = acc.get_mut(&key(&c.node)) {
                a.add(cp);
            }
        }
    }
    let mut checked: Vec<&Arc<Node>> = Vec::new();
    for n in &order {
        // QEMU's bdrv_node_refresh_perm: write permissions never work
        // with read-only nodes (`read-only`, or a backing file opened
        // implicitly, until a job reopens it read-write).
        let e =
            if acc[&key(n)].perm & (PERM_WRITE | PERM_WRITE_UNCHANGED) != 0 && !n.perm_writable() {
                Err(Error::generic("Block node is read-only"))
            } else {
                n.driver().check_perm(acc[&key(n)])
            };
        if let Err(e) = e {
            for m in checked {
                m.driver().abort_perm();
            }
            return Err(e);
        }
        checked.push(n);
    }
    for n in order.iter() {
        n.driver().set_perm();
        *n.perms.lock() = acc[&key(n)];
    }
    Ok(())
}

impl Graph {
    /// Recompute the permissions of every node from its parents (other
    /// nodes, guest backends, jobs) and move the lock bytes of every file
    /// to them: each file locks its new bytes before any drops an old one,
    /// and on a conflict with another process every file keeps its old
    /// bytes and QEMU's error (`Failed to get "write" lock`, with the hint
    /// `Is another process using the image [PATH]?`) is returned. Call
    /// after every change of who uses which node; undo the change when it
    /// fails.
    pub fn refresh_perms(&self) -> Result<()> {
        let inner = self.lock();
        Self::refresh_perms_locked(&inner)
    }

    pub(super) fn refresh_perms_locked(inner: &GraphInner) -> Result<()> {
        let nodes: Vec<Arc<Node>> = inner.nodes.iter().map(|e| e.node.clone()).collect();
        refresh(&nodes)
    }

    /// After a change that only takes permissions away (a user or backend
    /// detached, a node deleted): nothing new is asked of other processes,
    /// so this only fails if another process took conflicting bytes in a
    /// race; the old (larger) set then stays locked, which is safe.
    pub fn release_perms(&self) {
        let _ = self.refresh_perms();
    }
}

/// Lock `file` right away for a format node about to open it (QEMU
/// attaches the child, and so takes its locks, before the format reads or
/// writes a byte): a read-write qcow2 writes its header at open, which
/// must not happen to an image another process holds.
pub fn lock_for_format(file: &Arc<Node>, writable: bool) -> Result<()> {
    let mut p = file.perms();
    let mut fmt = storage_perms(Perms::NONE, true, true, writable);
    if file.force_share() {
        fmt.shared = PERM_ALL;
    }
    p.add(fmt);
    file.driver().check_perm(p)?;
    file.driver().set_perm();
    *file.perms.lock() = p;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_perm_rules() {
        // qcow2 writable, no parents: its file takes read+write+resize and
        // shares neither write nor resize (the recorded table).
        let p = storage_perms(Perms::NONE, true, true, true);
        assert_eq!(
            p,
            Perms::new(
                PERM_CONSISTENT_READ | PERM_WRITE | PERM_RESIZE,
                PERM_CONSISTENT_READ | PERM_WRITE_UNCHANGED
            )
        );
        let ro = storage_perms(Perms::NONE, true, true, false);
        assert_eq!(ro.perm, PERM_CONSISTENT_READ);
        let cow = cow_perms(Perms::new(PERM_CONSISTENT_READ, PERM_ALL));
        assert_eq!(cow, Perms::new(PERM_CONSISTENT_READ, PERM_ALL));
    }
}
