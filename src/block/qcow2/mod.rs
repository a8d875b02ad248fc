//! `qcow2`: images and backing chains through the `imago` crate.
//!
//! imago reads and writes one image's clusters and metadata; everything
//! around it stays ours. Its storage is our `file` child node (so a
//! `blkdebug` node can sit under a qcow2, as in QEMU's tests), and its
//! backing layer is a `raw` view of our backing node (so a chain is a chain
//! of our nodes: block-status walks it, stream and commit relink it, and a
//! partial-cluster write copies the rest of the cluster from our backing
//! node through imago's copy-on-write).
//!
//! Both edges can move (a filter put above the file or the backing node):
//! imago's storages read through the edges. Relinking (stream, commit)
//! happens in drained sections: the driver reopens its imago image with
//! the new backing layer, after the header's backing link was rewritten
//! on disk ([`header`]).
//!
//! Persistent dirty bitmaps ([`persistent`], in the format of
//! [`bitmaps`]) are ours too: imago neither reads nor keeps them. Their
//! clusters are allocated by [`refcount`] while imago is quiescent (its
//! caches written back under the layer's write lock), and imago reopens
//! the image afterwards to see the new refcounts; at close they are
//! stored after imago's last flush.

pub mod bitmaps;
pub mod header;
pub mod persistent;
pub mod refcount;
pub mod storage;

use crate::locks::{RwLock, RwLockReadGuard};
use std::sync::Arc;

use imago::qcow2::Qcow2;
use imago::raw::Raw;
use imago::{
    DenyImplicitOpenGate, FormatAccess, FormatCreateBuilder, FormatDriverBuilder, ShallowMapping,
};

use self::persistent::Persist;
use self::storage::{NodeStorage, from_io};
use super::child::ChildEdge;
use super::dirty_bitmap::{BdrvDirtyBitmap, PersistentBitmaps};
use super::{BlkdebugEvent, BlockDriver, BlockStatus, Node, NodeChild};
use crate::error::{Error, Result};

type Access = FormatAccess<NodeStorage>;
type Image = Qcow2<NodeStorage, Arc<Access>>;

/// The imago image and the backing node it reads through.
struct Layer {
    /// Shared only with the thread that writes it back at close.
    access: Arc<Access>,
    backing: Option<Arc<ChildEdge>>,
}

/// The qcow2 format.
pub struct Qcow2Driver {
    file: Arc<ChildEdge>,
    writable: bool,
    cluster_size: u64,
    /// Read-locked by every request, write-locked to discard (imago wants
    /// `&mut` there) and to relink the backing node.
    layer: RwLock<Layer>,
    /// The file child is a blkdebug node (the only driver blkdebug events
    /// reach): only then do reads look up their mapping to fire one.
    file_is_blkdebug: bool,
    /// What the header says: `(name, format)` (read at open, rewritten by
    /// [`change_backing`]).
    header_backing: crate::locks::Mutex<Option<(String, Option<String>)>>,
    /// The persistent bitmaps. Its lock also serialises our rewrites of
    /// the header (bitmaps, backing link); taken before `layer`.
    persist: Arc<Persist>,
}

/// imago's view of a backing node: `raw` over the edge to it.
fn backing_view(edge: &Arc<ChildEdge>) -> Result<Arc<Access>> {
    let raw = Raw::builder(NodeStorage::new(edge.clone()))
        .write(false)
        .open(DenyImplicitOpenGate::default())
        .map_err(from_io)?;
    Ok(Arc::new(FormatAccess::new(raw)))
}

/// Run `f` on a thread of ours and wait for it. imago's write path (in
/// debug builds) asks std for the current thread's handle; on a C host's
/// main thread std allocates that handle once and never frees it, which
/// valgrind reports as possibly lost. So imago's writes outside I/O
/// requests (opening an image writable rewrites its header when it has
/// autoclear bits, as every image with bitmaps has; flushing; closing) go
/// through here. (`thread::scope` would ask for the current thread's
/// handle too.)
fn on_imago_thread<T: Send + 'static>(
    name: &str,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(f)
        .map_err(Error::from)?
        .join()
        .unwrap_or_else(|_| Err(Error::generic(format!("internal error: {name} panicked"))))
}

/// Open the image in imago; `keep_autoclear`: the autoclear bits imago
/// must leave set (see [`storage`]).
fn open_image(
    file: &Arc<ChildEdge>,
    writable: bool,
    backing: Option<&Arc<ChildEdge>>,
    keep_autoclear: u64,
) -> Result<Access> {
    let (file, backing) = (file.clone(), backing.cloned());
    on_imago_thread("qcow2-open", move || {
        let backing = backing.as_ref().map(backing_view).transpose()?;
        let storage = NodeStorage::new(file.clone()).keeping_autoclear(keep_autoclear);
        let image = Image::builder(storage)
            .write(writable)
            .backing(backing)
            .open(DenyImplicitOpenGate::default())
            .map_err(|e| open_error(&file.get(), e))?;
        Ok(FormatAccess::new(image))
    })
}

/// QEMU's texts for images imago refuses.
fn open_error(file: &Node, e: std::io::Error) -> Error {
    let text = e.to_string();
    if text.contains("magic") || text.contains("Not a qcow2") {
        return Error::generic("Image is not in qcow2 format");
    }
    from_io(e).prepend(format!("Could not open '{}': ", file.filename()))
}

impl Qcow2Driver {
    /// Open the image in `file`. `backing`: the backing node, or `None`
    /// for no backing layer (the header's link is then not followed; see
    /// [`Qcow2Driver::header_backing`] for what it says).
    ///
    /// The image's persistent bitmaps are read first (an image whose
    /// bitmaps QEMU refuses is refused before anything is written); opened
    /// writable, they are then marked in-use on disk, as QEMU does.
    pub fn open(file: Arc<Node>, writable: bool, backing: Option<Arc<Node>>) -> Result<Self> {
        let hdr = header::read_node_header(&file)?;
        let file_is_blkdebug = file.driver_name() == "blkdebug";
        let file = Arc::new(ChildEdge::new(file));
        let persist = Arc::new(Persist::load(file.clone(), &hdr, writable)?);
        let backing = backing.map(|b| Arc::new(ChildEdge::new(b)));
        let access = open_image(&file, writable, backing.as_ref(), persist.keep_autoclear())?;
        if writable {
            persist.activate()?;
        }
        Ok(Qcow2Driver {
            persist,
            file_is_blkdebug,
            file,
            writable,
            cluster_size: hdr.cluster_size,
            layer: RwLock::new(Layer {
                access: Arc::new(access),
                backing,
            }),
            header_backing: crate::locks::Mutex::new(
                hdr.backing_file.map(|name| (name, hdr.backing_format)),
            ),
        })
    }

    /// The backing link the header holds: `(file name, format)`.
    pub fn header_backing(&self) -> Option<(String, Option<String>)> {
        self.header_backing.lock().clone()
    }

    fn layer(&self) -> RwLockReadGuard<'_, Layer> {
        self.layer.read()
    }

    /// Put `backing` under this image (or nothing), in memory only: the
    /// caller rewrites the header link first (stream, commit). Call it in
    /// a drained section: the image is reopened.
    pub fn relink(&self, backing: Option<Arc<Node>>) -> Result<()> {
        let mut l = self.layer.write();
        l.access.flush().map_err(from_io)?;
        let backing = backing.map(|b| Arc::new(ChildEdge::new(b)));
        let access = Arc::new(open_image(
            &self.file,
            self.writable,
            backing.as_ref(),
            self.persist.keep_autoclear(),
        )?);
        *l = Layer { access, backing };
        Ok(())
    }

    /// Run `f` with imago quiescent (its caches written back, no request
    /// in flight), then reopen the image in imago so that it reads the
    /// refcounts `f` may have changed. Call with the persist lock held.
    fn with_imago_quiesced(&self, f: impl FnOnce() -> Result<()>) -> Result<()> {
        let mut l = self.layer.write();
        let access = l.access.clone();
        on_imago_thread("qcow2-flush", move || access.flush().map_err(from_io))?;
        let r = f();
        let reopened = open_image(
            &self.file,
            self.writable,
            l.backing.as_ref(),
            self.persist.keep_autoclear(),
        );
        match reopened {
            Ok(access) => l.access = Arc::new(access),
            // The old instance stays, with a stale view of the refcounts:
            // an allocation of its could take a cluster of ours. Opening
            // the image it has open fails only on I/O errors, and then the
            // image is in trouble anyway; say so.
            Err(e) => {
                return Err(e.prepend("Could not reopen the image after updating its bitmaps: "));
            }
        }
        r
    }

    /// The `file` child.
    pub fn file(&self) -> Arc<Node> {
        self.file.get()
    }
}

/// Point the qcow2 image `node` at `backing` (or at nothing), on disk and
/// in the graph — the end of a stream or commit (QEMU's
/// `bdrv_change_backing_file` + `bdrv_set_backing_hd`). The header names
/// `backing_file`, or the new backing node's file name, with its format.
/// Call it with `node` drained.
pub fn change_backing(
    node: &Arc<Node>,
    backing: Option<&Arc<Node>>,
    backing_file: Option<&str>,
) -> Result<()> {
    let drv = (node.driver() as &dyn std::any::Any)
        .downcast_ref::<Qcow2Driver>()
        .ok_or_else(|| {
            Error::generic(format!(
                "Cannot change the backing file of '{}': not a qcow2 image",
                node.name()
            ))
        })?;
    let link = backing.map(|b| {
        let name = backing_file.map_or_else(|| b.filename(), str::to_string);
        let fmt = match b.driver_name() {
            "file" | "host_device" => "raw",
            other => other,
        };
        (name, fmt)
    });
    let file = drv.file();
    // Our header rewrites one at a time (the bitmaps rewrite it too).
    let _header = drv.persist.lock();
    // Everything the image holds is durable before the header changes
    // (imago's cached metadata written out and the file synced): a header
    // that drops a backing layer must never reach the disk before the
    // clusters that replace it (a stream's copies), or a power cut would
    // show the guest zeroes there. The image is reopened after.
    drv.flush()?;
    let new = link.as_ref().map(|(n, fmt)| (n.as_str(), Some(*fmt)));
    let r = if file.is_read_only() {
        // A file node opened read-only refuses writes; the image was made
        // writable for the job (QEMU reopens it), so write it by its path.
        let path = file.filename();
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| Error::from(e).prepend(format!("Could not open '{path}': ")))
            .and_then(|f| header::set_backing(&f, new))
    } else {
        // Through the node, so that every layer under the image sees it.
        header::set_node_backing(&file, new)
    };
    r.map_err(|e| {
        let name = link.as_ref().map_or("", |(n, _)| n.as_str());
        e.prepend(format!("Could not change the backing file to '{name}': "))
    })?;
    *drv.header_backing.lock() = link.map(|(n, fmt)| (n, Some(fmt.to_string())));
    drv.relink(backing.cloned())
}

impl Drop for Qcow2Driver {
    fn drop(&mut self) {
        // imago writes its cached metadata back when dropped: written back
        // on a thread of ours first (see `on_imago_thread`), so imago's own
        // drop finds nothing to write.
        let access = self.layer.get_mut().access.clone();
        let persist = self.persist.clone();
        let r = on_imago_thread("qcow2-close", move || {
            access.flush().map_err(from_io)?;
            // After imago's last write: it will not allocate again.
            let mut st = persist.lock();
            if let Err(e) = persist.store(&mut st, true) {
                // Nobody to return it to; QEMU reports it so too.
                eprintln!(
                    "blockjob: Lost persistent bitmaps during inactivation of node '{}': {}",
                    st.node_name(),
                    e.message()
                );
            }
            Ok(())
        });
        if let Err(e) = r {
            // Nobody to return it to: the node is going away.
            eprintln!("blockjob: qcow2 flush at close failed: {e}");
        }
    }
}

/// Create a qcow2 image in `file` (an empty, writable node) of `size`
/// bytes, optionally over a backing file (`qemu-img create -f qcow2 -b
/// NAME -F FMT`).
pub fn create(
    file: &Arc<Node>,
    size: u64,
    backing: Option<(&str, &str)>,
    cluster_size: Option<u64>,
) -> Result<()> {
    let mut b = Qcow2::<NodeStorage>::create_builder(NodeStorage::on(file.clone())).size(size);
    if let Some((name, fmt)) = backing {
        b = b.backing(name.to_string(), fmt.to_string());
    }
    if let Some(cs) = cluster_size {
        b = b.cluster_size(cs as usize);
    }
    b.create().map_err(from_io)?;
    file.flush()
}

impl BlockDriver for Qcow2Driver {
    fn driver_name(&self) -> &'static str {
        "qcow2"
    }

    fn len(&self) -> Result<u64> {
        Ok(self.layer().access.size())
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let l = self.layer();
        // QEMU's qcow2 fires read_aio on its file for data it holds (not
        // for metadata, not for reads that fall through to the backing
        // file), which is what makes blkdebug under a qcow2 fail the data
        // read of a chunk. The first byte decides for the request.
        if self.file_is_blkdebug
            && let Ok((ShallowMapping::Raw { .. }, _)) = l.access.get_shallow_mapping(offset, 1)
        {
            self.file().debug_event(BlkdebugEvent::ReadAio);
        }
        l.access.read(buf, offset).map_err(from_io)
    }

    fn write(&self, offset: u64, buf: &[u8]) -> Result<()> {
        self.file().debug_event(BlkdebugEvent::WriteAio);
        self.layer().access.write(buf, offset).map_err(from_io)
    }

    fn write_zeroes(&self, offset: u64, len: u64, _may_unmap: bool) -> Result<()> {
        self.layer()
            .access
            .write_zeroes(offset, len)
            .map_err(from_io)
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        // As QEMU's qcow2: a discarded range reads as zeroes afterwards,
        // not as the backing file's data.
        let mut l = self.layer.write();
        // Nothing else holds the Arc while we hold the write lock (the
        // close-time clone exists only in drop).
        let access = Arc::get_mut(&mut l.access)
            .ok_or_else(|| Error::generic("qcow2 image is being closed"))?;
        access.discard_to_zero(offset, len).map_err(from_io)
    }

    fn can_discard(&self) -> bool {
        true
    }

    fn flush(&self) -> Result<()> {
        let l = self.layer();
        l.access.flush().map_err(from_io)?;
        l.access.sync().map_err(from_io)
    }

    fn start_writeback(&self, offset: u64, len: u64) {
        // The data this layer holds there, where it lies in its file;
        // metadata is left to the flush (it may change again).
        let l = self.layer();
        let end = offset.saturating_add(len);
        let mut off = offset;
        while off < end {
            let Ok((mapping, n)) = l.access.get_shallow_mapping(off, end - off) else {
                return;
            };
            if n == 0 {
                return;
            }
            if let ShallowMapping::Raw {
                storage, offset, ..
            } = mapping
            {
                storage.node().start_writeback(offset, n);
            }
            off += n;
        }
    }

    /// This layer's allocation (`allocated`), and what the whole chain
    /// below reads there (`data`/`zero`), like QEMU's block-status of a
    /// node above no base.
    fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus> {
        let l = self.layer();
        let (mapping, mlen) = l.access.get_shallow_mapping(offset, len).map_err(from_io)?;
        let mlen = mlen.clamp(1, len);
        Ok(match mapping {
            ShallowMapping::Raw { .. } | ShallowMapping::Special { .. } => BlockStatus::data(mlen),
            ShallowMapping::Zero { explicit: true, .. } => BlockStatus::zero(mlen),
            ShallowMapping::Indirect { .. } => match l.backing.as_ref().map(|b| b.get()) {
                Some(b) if offset < b.len()? => {
                    let st = b.block_status(offset, mlen)?;
                    BlockStatus {
                        allocated: false,
                        ..st
                    }
                }
                // Past the end of a shorter backing file: zeroes.
                _ => BlockStatus {
                    data: false,
                    zero: true,
                    allocated: false,
                    len: mlen,
                },
            },
            // Unallocated without a backing layer, or past the end.
            _ => BlockStatus {
                data: false,
                zero: true,
                allocated: false,
                len: mlen,
            },
        })
    }

    fn backing(&self) -> Option<Arc<Node>> {
        self.layer().backing.as_ref().map(|b| b.get())
    }

    fn children(&self) -> Vec<NodeChild> {
        let mut v = vec![NodeChild {
            role: "file",
            node: self.file(),
        }];
        if let Some(b) = self.backing() {
            v.push(NodeChild {
                role: "backing",
                node: b,
            });
        }
        v
    }

    fn replace_child(&self, old: &Arc<Node>, new: &Arc<Node>) {
        self.file.replace(old, new);
        if let Some(b) = &self.layer().backing {
            b.replace(old, new);
        }
    }

    fn cluster_size(&self) -> Option<u64> {
        Some(self.cluster_size)
    }

    fn persistent_bitmaps(&self) -> Option<&dyn PersistentBitmaps> {
        Some(self)
    }

    fn filename(&self) -> String {
        self.file().filename()
    }

    fn open_options(&self) -> Option<serde_json::Value> {
        // A backing link other than the header's would need a `backing`
        // member; the jobs' filters sit above images opened plainly.
        Some(serde_json::json!({"driver": "qcow2", "file": self.file().driver().open_options()?}))
    }
}

impl PersistentBitmaps for Qcow2Driver {
    fn loaded(&self, node_name: &str) -> Vec<Arc<BdrvDirtyBitmap>> {
        self.persist.lock().hand_over(node_name)
    }

    fn can_store_new(&self, name: &str, granularity: u64) -> Result<()> {
        self.persist.can_store_new(name, granularity)
    }

    fn register(&self, bitmap: &Arc<BdrvDirtyBitmap>) {
        self.persist.lock().register(bitmap);
    }

    fn remove(&self, bitmap: &Arc<BdrvDirtyBitmap>) -> Result<()> {
        let mut st = self.persist.lock();
        let name = bitmap.name().unwrap_or_default();
        if self.writable {
            self.with_imago_quiesced(|| self.persist.remove_from_image(&mut st, name))?;
        }
        st.forget(bitmap);
        Ok(())
    }

    fn store_and_release(&self) -> Result<()> {
        let mut st = self.persist.lock();
        if st.is_empty() {
            return Ok(());
        }
        self.with_imago_quiesced(|| self.persist.store(&mut st, true))
    }
}
