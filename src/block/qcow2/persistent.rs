//! A qcow2 node's persistent dirty bitmaps: QEMU's `qcow2-bitmap.c`
//! semantics on top of [`super::bitmaps`] (the format) and
//! [`super::refcount`] (cluster allocation).
//!
//! A bitmap's life in the image, as QEMU lives it:
//! - open: every bitmap in the directory is loaded ([`Persist::load`]); one
//!   marked in-use was not saved after its last use (a crash), so its bits
//!   are lost: it is inconsistent. Opened writable, the others are then
//!   marked in-use on disk ([`Persist::activate`]): until they are stored
//!   again a crash leaves them inconsistent, never silently out of date.
//!   Opened read-only, they are readonly and nothing is written.
//! - add (persistent): checked ([`Persist::can_store_new`]), then kept in
//!   memory only.
//! - remove: leaves the directory at once, and its clusters are freed.
//! - close (or store and release): every consistent, writable bitmap is
//!   written to new clusters, a new directory lists them with in-use
//!   clear, the header points at it, and the old clusters are freed.
//!   Inconsistent bitmaps stay as they are (in-use), readonly ones too.
//!
//! Nothing is dropped behind the user's back: an image whose bitmaps QEMU
//! would refuse is refused at open with QEMU's text, before anything is
//! written; the autoclear bit that validates the extension stays set
//! while the extension is valid (imago clears it when it opens an image
//! for writing: [`Persist::keep_autoclear`] tells our storage to keep it).
//!
//! Locks: the state mutex is taken under the node's bitmap lock, and
//! before the driver's layer lock (the driver keeps imago quiescent while
//! refcounts change, and reopens it after).

use std::sync::Arc;

use super::bitmaps::{
    self, AUTOCLEAR_BITMAPS, BitmapsExt, DirEntry, EXT_BITMAPS, Extension, FLAG_AUTO, FLAG_IN_USE,
    Geometry, MAX_BITMAPS, MAX_DIRECTORY_SIZE,
};
use super::header::{self, Qcow2Header};
use super::refcount::Refcounts;
use crate::block::child::ChildEdge;
use crate::block::dirty_bitmap::BdrvDirtyBitmap;
use crate::error::{Error, Result};
use crate::locks::{Mutex, MutexGuard};
use crate::sync::{AtomicU64, Ordering};

/// The persistent bitmaps of one qcow2 node.
pub struct Persist {
    /// The image's file, through the qcow2 node's edge (I/O follows a
    /// filter put above it).
    file: Arc<ChildEdge>,
    writable: bool,
    version: u32,
    geo: Geometry,
    /// Autoclear bits imago must keep when it opens the image for
    /// writing: [`AUTOCLEAR_BITMAPS`] while the extension is valid.
    /// Relaxed: written under the state lock, and read when imago opens
    /// the image, which after a change happens under the same lock.
    keep: AtomicU64,
    state: Mutex<State>,
}

/// What changes (under the lock).
pub struct State {
    /// The node's name, for messages (set when the node is created).
    node_name: String,
    /// The extension on disk (`None`: there is none, or it is stale).
    ext: Option<BitmapsExt>,
    /// The directory on disk, in its order.
    dir: Vec<DirEntry>,
    /// The node's persistent bitmaps, newest first (the node's order).
    bitmaps: Vec<Arc<BdrvDirtyBitmap>>,
    /// A stale extension to drop when the image is first written.
    stale: bool,
}

impl Persist {
    /// Read the bitmaps of the image whose header is `hdr` (nothing is
    /// written): QEMU's checks of the extension, the directory and every
    /// consistent bitmap's table and data, failing with QEMU's text.
    pub fn load(file: Arc<ChildEdge>, hdr: &Qcow2Header, writable: bool) -> Result<Persist> {
        let geo = Geometry::of(hdr);
        let node = file.get();
        let (ext, stale) = match bitmaps::parse_extension(hdr)? {
            Extension::Absent => (None, false),
            Extension::Stale => {
                // QEMU's warning, then it ignores them.
                eprintln!(
                    "blockjob: warning: {}\nSome clusters may be leaked, run 'qemu-img check -r' on the image file to fix.",
                    bitmaps::stale_warning(hdr.version)
                );
                (None, true)
            }
            Extension::Valid(ext) => (Some(ext), false),
        };
        let dir = match &ext {
            Some(ext) => bitmaps::read_directory(&node, &geo, ext)?,
            None => Vec::new(),
        };
        let mut loaded: Vec<Arc<BdrvDirtyBitmap>> = Vec::with_capacity(dir.len());
        for e in &dir {
            // QEMU creates them one by one on the node: a second one of
            // the same name fails there.
            if loaded.iter().any(|b| b.name() == Some(e.name.as_str())) {
                return Err(Error::generic(format!("Bitmap already exists: {}", e.name)));
            }
            let bits = bitmaps::load_bits(&node, &geo, e)?;
            loaded.push(BdrvDirtyBitmap::loaded(
                e.name.clone(),
                bits,
                e.flags & FLAG_AUTO != 0,
                !writable,
                e.flags & FLAG_IN_USE != 0,
            ));
        }
        // Each one created goes first in the node's list, as in QEMU.
        loaded.reverse();
        Ok(Persist {
            file,
            writable,
            version: hdr.version,
            geo,
            keep: AtomicU64::new(if ext.is_some() { AUTOCLEAR_BITMAPS } else { 0 }),
            state: Mutex::new(State {
                node_name: String::new(),
                ext,
                dir,
                bitmaps: loaded,
                stale,
            }),
        })
    }

    /// The autoclear bits to keep when imago opens the image for writing.
    pub fn keep_autoclear(&self) -> u64 {
        self.keep.load(Ordering::Relaxed)
    }

    /// The state, locked.
    pub fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock()
    }

    /// After a writable open: mark the loaded bitmaps in-use on disk, as
    /// QEMU's `update_ext_header_and_dir_in_place` does (the autoclear
    /// bit cleared while the directory is rewritten, then set again), and
    /// drop a stale extension.
    pub fn activate(&self) -> Result<()> {
        let mut st = self.lock();
        let file = self.file.get();
        if st.stale {
            header::update_node_header(&file, |exts, _| {
                exts.retain(|(t, _)| *t != EXT_BITMAPS);
            })?;
            st.stale = false;
        }
        let Some(ext) = st.ext else {
            return Ok(());
        };
        if st.dir.iter().all(|e| e.flags & FLAG_IN_USE != 0) {
            return Ok(());
        }
        let mut dir = st.dir.clone();
        for e in &mut dir {
            e.flags |= FLAG_IN_USE;
        }
        let write = || -> Result<()> {
            let ac = header::read_node_header(&file)?.autoclear_features;
            header::write_autoclear(&file, ac & !AUTOCLEAR_BITMAPS)?;
            file.pwrite(ext.dir_offset, &bitmaps::serialize_directory(&dir))?;
            file.flush()?;
            header::write_autoclear(&file, ac | AUTOCLEAR_BITMAPS)
        };
        write().map_err(|e| e.prepend("Can't update bitmap directory: "))?;
        st.dir = dir;
        Ok(())
    }

    /// QEMU's `qcow2_co_can_store_new_dirty_bitmap` after its name check:
    /// can one more persistent bitmap `name` of `granularity` be kept?
    pub fn can_store_new(&self, name: &str, granularity: u64) -> Result<()> {
        if self.version < 3 {
            // Without autoclear bits a program that knows no bitmaps
            // could not say it changed the image.
            return Err(Error::generic(
                "Cannot store dirty bitmaps in qcow2 v2 files",
            ));
        }
        bitmaps::check_constraints(&self.geo, name, granularity)?;
        let st = self.lock();
        check_room(
            st.bitmaps.iter().map(|b| b.name().unwrap_or("").len()),
            name.len(),
        )
    }
}

/// Room in the directory for one more bitmap, with a `new`-byte name,
/// beside bitmaps with names of `lens` bytes (QEMU counts the node's
/// persistent bitmaps, not the directory).
fn check_room(lens: impl Iterator<Item = usize>, new: usize) -> Result<()> {
    let (mut count, mut dir_size) = (1u64, bitmaps::entry_size(new));
    for len in lens {
        count += 1;
        dir_size += bitmaps::entry_size(len);
    }
    if count > MAX_BITMAPS {
        return Err(Error::generic(
            "Maximum number of persistent bitmaps is already reached",
        ));
    }
    if dir_size > MAX_DIRECTORY_SIZE {
        return Err(Error::generic("Not enough space in the bitmap directory"));
    }
    Ok(())
}

impl State {
    /// The bitmaps found in the image, handed to the node `node_name`.
    pub fn hand_over(&mut self, node_name: &str) -> Vec<Arc<BdrvDirtyBitmap>> {
        self.node_name = node_name.to_string();
        self.bitmaps.clone()
    }

    /// The node's name, for messages.
    pub fn node_name(&self) -> &str {
        &self.node_name
    }

    /// A new persistent bitmap of the node (the newest).
    pub fn register(&mut self, b: &Arc<BdrvDirtyBitmap>) {
        self.bitmaps.insert(0, b.clone());
    }

    /// No persistent bitmap (nothing to store).
    pub fn is_empty(&self) -> bool {
        self.bitmaps.is_empty()
    }

    /// Forget a bitmap of the node.
    pub fn forget(&mut self, b: &Arc<BdrvDirtyBitmap>) {
        self.bitmaps.retain(|x| !Arc::ptr_eq(x, b));
    }
}

impl Persist {
    /// Point the header at a directory of `dir` (QEMU's
    /// `update_ext_header_and_dir`): the directory written to new
    /// clusters and counted, then the header changed (no extension and
    /// autoclear bit clear for an empty one), then the old directory's
    /// clusters freed in `rc` (committing that is the caller's).
    fn set_directory(
        &self,
        st: &mut State,
        rc: &mut Refcounts<'_>,
        dir: Vec<DirEntry>,
    ) -> Result<()> {
        let file = self.file.get();
        let new_ext = if dir.is_empty() {
            None
        } else {
            if dir.len() as u64 > MAX_BITMAPS {
                return Err(Error::from_errno(libc::EINVAL));
            }
            let mut bytes = bitmaps::serialize_directory(&dir);
            let offset = rc.alloc_bytes(bytes.len() as u64)?;
            bytes.resize(
                bytes.len().next_multiple_of(self.geo.cluster_size as usize),
                0,
            );
            file.pwrite(offset, &bytes)?;
            // Counted on disk before the header points at it.
            rc.commit()?;
            Some(bitmaps::extension_for(&dir, offset))
        };
        // In three durable steps, so that a power cut that tears the
        // header rewrite (the extension may straddle two sectors) leaves
        // an image QEMU opens: the bitmaps bit is cleared on its own (an
        // 8-byte write, within one sector), then the extensions change
        // while readers ignore the bitmaps extension, then the bit is set
        // again (QEMU's way to say "being rewritten" and "valid again").
        let ac = header::read_node_header(&file)?.autoclear_features;
        if ac & AUTOCLEAR_BITMAPS != 0 {
            header::write_autoclear(&file, ac & !AUTOCLEAR_BITMAPS)?;
        }
        header::update_node_header(&file, |exts, autoclear| {
            exts.retain(|(t, _)| *t != EXT_BITMAPS);
            if let Some(e) = new_ext {
                exts.push((EXT_BITMAPS, e.to_bytes()));
            }
            *autoclear &= !AUTOCLEAR_BITMAPS;
        })?;
        if new_ext.is_some() {
            header::write_autoclear(&file, ac | AUTOCLEAR_BITMAPS)?;
        }
        self.keep.store(
            if new_ext.is_some() {
                AUTOCLEAR_BITMAPS
            } else {
                0
            },
            Ordering::Relaxed,
        );
        let old = std::mem::replace(&mut st.ext, new_ext);
        st.dir = dir;
        if let Some(old) = old {
            rc.free(old.dir_offset, old.dir_size)?;
        }
        Ok(())
    }

    /// Remove the bitmap `name` from the image (QEMU's
    /// `qcow2_co_remove_persistent_dirty_bitmap`); not being there is no
    /// error. Call with imago quiescent.
    pub fn remove_from_image(&self, st: &mut State, name: &str) -> Result<()> {
        let Some(i) = st.dir.iter().position(|e| e.name == name) else {
            return Ok(());
        };
        let file = self.file.get();
        let hdr = header::read_node_header(&file)?;
        let mut rc = Refcounts::load(&file, &hdr)?;
        let mut dir = st.dir.clone();
        let gone = dir.remove(i);
        self.set_directory(st, &mut rc, dir)
            .map_err(|e| e.prepend("Failed to update bitmap extension: "))?;
        // As QEMU: what cannot be freed leaks, the removal stands.
        if bitmaps::free_bitmap(&mut rc, &file, &self.geo, &gone).is_err() {
            eprintln!(
                "blockjob: could not free the clusters of bitmap '{}'; run 'qemu-img check -r leaks'",
                gone.name
            );
        }
        rc.commit()
    }

    /// Write the node's bitmaps back (QEMU's
    /// `qcow2_store_persistent_dirty_bitmaps`), and with `release` forget
    /// them all once stored. Call with imago quiescent.
    pub fn store(&self, st: &mut State, release: bool) -> Result<()> {
        let mut dir = st.dir.clone();
        let mut old_tables = Vec::new();
        let mut to_store = Vec::new();
        let mut dir_size: u64 = dir.iter().map(|e| bitmaps::entry_size(e.name.len())).sum();
        for b in &st.bitmaps {
            if b.is_inconsistent() || b.is_readonly() {
                continue;
            }
            let name = b.name().unwrap_or_default();
            let granularity = b.bits().granularity();
            bitmaps::check_constraints(&self.geo, name, granularity).map_err(|e| {
                e.prepend(format!("Bitmap '{name}' doesn't satisfy the constraints: "))
            })?;
            let i = match dir.iter().position(|e| e.name == name) {
                None => {
                    if dir.len() as u64 + 1 > MAX_BITMAPS {
                        return Err(Error::generic("Too many persistent bitmaps"));
                    }
                    dir_size += bitmaps::entry_size(name.len());
                    if dir_size > MAX_DIRECTORY_SIZE {
                        return Err(Error::generic("Bitmap directory is too large"));
                    }
                    dir.push(DirEntry {
                        table_offset: 0,
                        table_size: 0,
                        flags: 0,
                        granularity_bits: 0,
                        name: name.to_string(),
                    });
                    dir.len() - 1
                }
                Some(i) => {
                    // Ours since open (in-use), or someone else's.
                    if dir[i].flags & FLAG_IN_USE == 0 {
                        return Err(Error::generic(format!(
                            "Bitmap '{name}' already exists in the image"
                        )));
                    }
                    old_tables.push(dir[i].clone());
                    i
                }
            };
            dir[i].flags = if b.is_recording() { FLAG_AUTO } else { 0 };
            dir[i].granularity_bits = granularity.trailing_zeros();
            to_store.push((i, b.clone()));
        }
        if !to_store.is_empty() {
            if !self.writable {
                return Err(Error::generic("No write access"));
            }
            let file = self.file.get();
            let hdr = header::read_node_header(&file)?;
            let mut rc = Refcounts::load(&file, &hdr)?;
            for (i, b) in &to_store {
                let (offset, size) =
                    bitmaps::write_bits(&mut rc, &file, &self.geo, &dir[*i].name, b.bits())?;
                dir[*i].table_offset = offset;
                dir[*i].table_size = size;
            }
            self.set_directory(st, &mut rc, dir)
                .map_err(|e| e.prepend("Failed to update bitmap extension: "))?;
            // The new directory is in place: the old clusters can go.
            for e in &old_tables {
                if bitmaps::free_bitmap(&mut rc, &file, &self.geo, e).is_err() {
                    eprintln!(
                        "blockjob: could not free the old clusters of bitmap '{}'; run 'qemu-img check -r leaks'",
                        e.name
                    );
                }
            }
            rc.commit()?;
        }
        if release {
            st.bitmaps.clear();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// QEMU's limits, recorded from qemu-storage-daemon 10 (65535 bitmaps
    /// with 6-byte names, then one more: "Can't make bitmap 'one-more'
    /// persistent in 'q': Maximum number of persistent bitmaps is already
    /// reached"; the prefix is the generic layer's). Too slow to replay
    /// live: QEMU took two minutes to add them.
    #[test]
    fn room_for_one_more() {
        let six = || std::iter::repeat_n(6, 65534);
        assert!(check_room(six(), 8).is_ok());
        assert_eq!(
            check_room(six().chain([6]), 8).unwrap_err().message(),
            "Maximum number of persistent bitmaps is already reached"
        );
        // Long names fill the 64 MiB directory first: 1023-byte names take
        // 1048 bytes each, 64034 of them fit.
        let long = |n| std::iter::repeat_n(1023, n);
        assert!(check_room(long(64033), 1023).is_ok());
        assert_eq!(
            check_room(long(64034), 1023).unwrap_err().message(),
            "Not enough space in the bitmap directory"
        );
    }
}
