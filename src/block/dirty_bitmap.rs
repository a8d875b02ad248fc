//! The dirty bitmaps of nodes: QEMU's `block-dirty-bitmap-*` commands
//! with QEMU's arguments, defaults and error texts (recorded from
//! qemu-storage-daemon 10; all errors are GenericError).
//!
//! A node keeps its bitmaps in a lock-free snapshot list: every write to
//! the node reads it without a lock and sets the bits of every recording
//! bitmap after the write (also after a failed one, as QEMU does: it may
//! have written part). Changes to the list are serialised by a mutex and
//! publish a new list.
//!
//! Persistent bitmaps live in the node's image as well: a driver that can
//! keep them (qcow2) implements [`PersistentBitmaps`]. It hands over the
//! bitmaps it found in the image when the node is created, is asked
//! before a new persistent bitmap is added, removes one from the image
//! when the bitmap is removed, and writes them all back when the node
//! closes (or on [`store_persistent`]). Invariant: a node's persistent
//! bitmaps are exactly the ones its driver holds, in the same order.
//!
//! QEMU's states that forbid commands are kept per bitmap: busy (a job or
//! export uses it), readonly (loaded from an image the node cannot write)
//! and inconsistent (found `in-use` in the image: not saved after its
//! last use, so its bits are unknown; it records nothing and only
//! remove accepts it). Which command refuses which state is QEMU's
//! `bdrv_dirty_bitmap_check` flags, recorded from qemu-storage-daemon 10.

use std::sync::Arc;

use arc_swap::ArcSwap;
use serde::Serialize;

use super::Node;
use super::graph::Graph;
use crate::bitmap::DirtyBitmap;
use crate::error::{Error, Result};
use crate::sync::{AtomicBool, Mutex, Ordering};

/// QEMU's longest bitmap name.
pub const BITMAP_NAME_MAX: usize = 1023;

/// One named (or anonymous) bitmap of a node.
pub struct BdrvDirtyBitmap {
    name: Option<String>,
    bits: DirtyBitmap,
    /// Records writes (QEMU's enabled, shown as `recording`). Relaxed:
    /// read on every write with no ordering needed beyond the list
    /// snapshot; a write racing with enable/disable may or may not be
    /// recorded, as in QEMU.
    recording: AtomicBool,
    /// In use by a job or an export. Relaxed: checked by commands that are
    /// serialised by the node's bitmap mutex.
    busy: AtomicBool,
    /// Frozen by a backup (QEMU's bitmap with a successor): it records
    /// nothing, its successor takes the writes until the backup ends.
    successor: crate::locks::Mutex<Option<Arc<BdrvDirtyBitmap>>>,
    /// `successor` is set, read without its lock on every write. Relaxed:
    /// set before the successor starts recording in the same drained
    /// section the backup starts in; a write racing with the freeze lands
    /// in one of the two.
    frozen_flag: AtomicBool,
    /// Kept in the node's image (written back when the node closes).
    persistent: bool,
    /// Loaded from an image the node cannot write: commands that change
    /// the bits refuse it (QEMU's readonly bitmap).
    readonly: bool,
    /// Found `in-use` in the image: its bits are lost (QEMU's
    /// inconsistent bitmap). Never recording.
    inconsistent: bool,
}

impl std::fmt::Debug for BdrvDirtyBitmap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BdrvDirtyBitmap")
            .field("name", &self.name)
            .field("bits", &self.bits)
            .finish_non_exhaustive()
    }
}

/// One entry of a node's `dirty-bitmaps` in `query-named-block-nodes`
/// (QEMU's `BlockDirtyInfo`), keys in QEMU's order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BlockDirtyInfo {
    /// Absent for anonymous bitmaps.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Enabled: records writes.
    pub recording: bool,
    /// Stored in the image (qcow2).
    pub persistent: bool,
    /// In use by a job or an export.
    pub busy: bool,
    /// Bytes per bit.
    pub granularity: u64,
    /// Dirty bits × granularity.
    pub count: u64,
    /// Present (true) only for a bitmap found `in-use` in its image, as
    /// in QEMU.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub inconsistent: bool,
}

/// Which states a command refuses (QEMU's `BDRV_BITMAP_*` check flags).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BitmapCheck {
    /// Busy, readonly or inconsistent: clear, merge into.
    Default,
    /// Busy or inconsistent: enable, disable, merge from.
    AllowReadonly,
    /// Busy or readonly: remove (an inconsistent bitmap can be removed).
    Remove,
}

/// A format that keeps bitmaps in its image (qcow2): QEMU's driver
/// callbacks for persistent bitmaps. Every method but
/// [`loaded`](Self::loaded) is called under the node's bitmap lock.
pub trait PersistentBitmaps: Send + Sync {
    /// The bitmaps found in the image at open, in the node's order
    /// (newest first), handed over once when the node `node_name` is
    /// created.
    fn loaded(&self, node_name: &str) -> Vec<Arc<BdrvDirtyBitmap>>;

    /// Can a new persistent bitmap `name` of `granularity` be stored?
    /// (QEMU's `bdrv_co_can_store_new_dirty_bitmap`, without its
    /// `Can't make bitmap … persistent in …: ` prefix.)
    fn can_store_new(&self, name: &str, granularity: u64) -> Result<()>;

    /// Keep a new persistent bitmap (stored when the node closes).
    fn register(&self, bitmap: &Arc<BdrvDirtyBitmap>);

    /// Remove a persistent bitmap from the image, and forget it.
    fn remove(&self, bitmap: &Arc<BdrvDirtyBitmap>) -> Result<()>;

    /// Write every persistent bitmap back to the image and forget them
    /// all (QEMU's store with release, as when it inactivates a node). On
    /// failure nothing is forgotten.
    fn store_and_release(&self) -> Result<()>;
}

impl BdrvDirtyBitmap {
    /// The name (`None` for an anonymous bitmap).
    pub fn name(&self) -> Option<&str> {
        self.name.as_deref()
    }

    /// The bits.
    pub fn bits(&self) -> &DirtyBitmap {
        &self.bits
    }

    /// Records writes.
    pub fn is_recording(&self) -> bool {
        self.recording.load(Ordering::Relaxed)
    }

    /// Start or stop recording writes (jobs that mark their own bitmap).
    pub fn set_recording(&self, on: bool) {
        self.recording.store(on, Ordering::Relaxed);
    }

    /// In use by a job or an export, or frozen by a backup.
    pub fn is_busy(&self) -> bool {
        self.busy.load(Ordering::Relaxed) || self.is_frozen()
    }

    /// A backup froze it (it has a successor).
    pub fn is_frozen(&self) -> bool {
        self.frozen_fast()
    }

    fn frozen_fast(&self) -> bool {
        // Relaxed: see the field.
        self.frozen_flag.load(Ordering::Relaxed)
    }

    /// Mark in use (QEMU's `bdrv_dirty_bitmap_set_busy`).
    pub fn set_busy(&self, busy: bool) {
        self.busy.store(busy, Ordering::Relaxed);
    }

    /// An anonymous bitmap on no node (yet), recording nothing: a job's
    /// own, listed on a node with [`NodeBitmaps::attach`].
    pub fn detached(size: u64, granularity: u64) -> Result<Arc<BdrvDirtyBitmap>> {
        Ok(Arc::new(BdrvDirtyBitmap {
            name: None,
            bits: DirtyBitmap::new(size, granularity)?,
            recording: AtomicBool::new(false),
            busy: AtomicBool::new(false),
            successor: Default::default(),
            frozen_flag: AtomicBool::new(false),
            persistent: false,
            readonly: false,
            inconsistent: false,
        }))
    }

    /// Kept in the node's image.
    pub fn is_persistent(&self) -> bool {
        self.persistent
    }

    /// Loaded from an image the node cannot write.
    pub fn is_readonly(&self) -> bool {
        self.readonly
    }

    /// Found `in-use` in its image: the bits are lost.
    pub fn is_inconsistent(&self) -> bool {
        self.inconsistent
    }

    /// A named persistent bitmap as a format loads it from its image:
    /// `recording` as the image says (an inconsistent bitmap never
    /// records), `readonly` when the node cannot write the image.
    pub fn loaded(
        name: String,
        bits: DirtyBitmap,
        recording: bool,
        readonly: bool,
        inconsistent: bool,
    ) -> Arc<BdrvDirtyBitmap> {
        Arc::new(BdrvDirtyBitmap {
            name: Some(name),
            bits,
            recording: AtomicBool::new(recording && !inconsistent),
            busy: AtomicBool::new(false),
            persistent: true,
            readonly,
            inconsistent,
            successor: Default::default(),
            frozen_flag: AtomicBool::new(false),
        })
    }

    /// The query entry.
    pub fn info(&self) -> BlockDirtyInfo {
        BlockDirtyInfo {
            name: self.name.clone(),
            recording: self.is_recording(),
            persistent: self.persistent,
            busy: self.is_busy(),
            granularity: self.bits.granularity(),
            count: self.bits.count(),
            inconsistent: self.inconsistent,
        }
    }

    /// QEMU's `bdrv_dirty_bitmap_check`: the first state `check` refuses,
    /// in QEMU's order (busy, readonly, inconsistent), with its text.
    pub fn check(&self, check: BitmapCheck) -> Result<()> {
        let name = self.name.as_deref().unwrap_or("");
        let (readonly, inconsistent) = match check {
            BitmapCheck::Default => (true, true),
            BitmapCheck::AllowReadonly => (false, true),
            BitmapCheck::Remove => (true, false),
        };
        if self.is_busy() {
            return Err(Error::generic(format!(
                "Bitmap '{name}' is currently in use by another operation and cannot be used"
            )));
        }
        if readonly && self.readonly {
            return Err(Error::generic(format!(
                "Bitmap '{name}' is readonly and cannot be modified"
            )));
        }
        if inconsistent && self.inconsistent {
            return Err(Error::generic(format!(
                "Bitmap '{name}' is inconsistent and cannot be used"
            )));
        }
        Ok(())
    }
}

/// The bitmaps of one node.
#[derive(Default)]
pub struct NodeBitmaps {
    /// Newest first. Read without a lock on every write.
    list: ArcSwap<Vec<Arc<BdrvDirtyBitmap>>>,
    /// Serialises changes to the list and the commands on bitmaps.
    lock: Mutex<()>,
}

impl NodeBitmaps {
    /// The bitmaps of a node whose driver found persistent bitmaps in its
    /// image (newest first).
    pub fn with_loaded(bitmaps: Vec<Arc<BdrvDirtyBitmap>>) -> Self {
        NodeBitmaps {
            list: ArcSwap::from_pointee(bitmaps),
            lock: Mutex::new(()),
        }
    }

    /// Mark `[offset, offset + len)` dirty in every recording bitmap (a
    /// frozen one's successor records for it).
    pub fn set_dirty(&self, offset: u64, len: u64) {
        let list = self.list.load();
        for b in list.iter() {
            // Relaxed: see the field. A frozen bitmap is not recording
            // (its flag is only what queries show).
            if b.recording.load(Ordering::Relaxed) && !b.frozen_fast() {
                b.bits.set_range(offset, len);
            }
        }
    }

    /// Freeze `b` for a backup (QEMU's `bdrv_dirty_bitmap_create_successor`):
    /// an anonymous bitmap, recording as `b` did, takes its writes from
    /// now on; `b` keeps its bits, shows as busy and refuses commands.
    pub fn create_successor(&self, b: &Arc<BdrvDirtyBitmap>) -> Result<Arc<BdrvDirtyBitmap>> {
        if b.is_busy() {
            return Err(Error::generic(
                "Cannot create a successor for a bitmap that is in-use by an operation",
            ));
        }
        let s = self.add_anonymous(b.bits.size(), b.bits.granularity(), b.is_recording())?;
        *b.successor.lock() = Some(s.clone());
        b.frozen_flag.store(true, Ordering::Relaxed);
        Ok(s)
    }

    /// End the freeze keeping what the backup leaves (QEMU's
    /// `bdrv_dirty_bitmap_abdicate`): `b` becomes its successor.
    pub fn abdicate(&self, b: &Arc<BdrvDirtyBitmap>) {
        self.end_freeze(b, true);
    }

    /// End the freeze keeping everything (QEMU's
    /// `bdrv_reclaim_dirty_bitmap`): the successor's bits join `b`'s.
    pub fn reclaim(&self, b: &Arc<BdrvDirtyBitmap>) {
        self.end_freeze(b, false);
    }

    fn end_freeze(&self, b: &Arc<BdrvDirtyBitmap>, replace: bool) {
        let Some(s) = b.successor.lock().take() else {
            return;
        };
        if replace {
            b.bits.clear();
        }
        b.bits.merge_from(&s.bits);
        self.remove_anonymous(&s);
        b.frozen_flag.store(false, Ordering::Relaxed);
    }

    /// All bitmaps, newest first.
    pub fn list(&self) -> Vec<Arc<BdrvDirtyBitmap>> {
        self.list.load().as_ref().clone()
    }

    /// Add an anonymous bitmap (a job's own, e.g. the mirror's on its
    /// filter node, listed without a name as QEMU lists it). `recording`:
    /// whether the node's writes mark it, or only its owner does.
    pub fn add_anonymous(
        &self,
        size: u64,
        granularity: u64,
        recording: bool,
    ) -> Result<Arc<BdrvDirtyBitmap>> {
        let b = BdrvDirtyBitmap::detached(size, granularity)?;
        b.set_recording(recording);
        self.attach(b.clone());
        Ok(b)
    }

    /// List an anonymous bitmap made elsewhere (newest first).
    pub fn attach(&self, b: Arc<BdrvDirtyBitmap>) {
        let _g = self.guard();
        let mut list = self.list();
        list.insert(0, b);
        self.list.store(Arc::new(list));
    }

    /// Remove a bitmap added with [`Self::add_anonymous`] or
    /// [`Self::attach`].
    pub fn remove_anonymous(&self, b: &Arc<BdrvDirtyBitmap>) {
        let _g = self.guard();
        let list: Vec<_> = self
            .list()
            .into_iter()
            .filter(|x| !Arc::ptr_eq(x, b))
            .collect();
        self.list.store(Arc::new(list));
    }

    pub(crate) fn find(&self, name: &str) -> Option<Arc<BdrvDirtyBitmap>> {
        self.list
            .load()
            .iter()
            .find(|b| b.name.as_deref() == Some(name))
            .cloned()
    }

    fn guard(&self) -> impl Sized + '_ {
        // Protects no data of its own (the list is swapped atomically).
        self.lock.lock()
    }
}

/// QEMU's default: the cluster size clamped to [4 KiB, 64 KiB], or 64 KiB.
pub fn default_granularity(node: &Node) -> u64 {
    node.cluster_size()
        .map_or(64 << 10, |c| c.clamp(4 << 10, 64 << 10))
}

/// `bdrv_lookup_bs` for the commands other than add: `Node 'X' not found`.
fn lookup_node(graph: &Graph, node: &str) -> Result<Arc<Node>> {
    graph
        .lookup(node)
        .map_err(|_| Error::generic(format!("Node '{node}' not found")))
}

/// QEMU's `block_dirty_bitmap_lookup`.
pub fn lookup(graph: &Graph, node: &str, name: &str) -> Result<(Arc<Node>, Arc<BdrvDirtyBitmap>)> {
    let n = lookup_node(graph, node)?;
    let b = n
        .bitmaps()
        .find(name)
        .ok_or_else(|| Error::generic(format!("Dirty bitmap '{name}' not found")))?;
    Ok((n, b))
}

/// `block-dirty-bitmap-add`. `granularity` None = the node's default.
pub fn add(
    graph: &Graph,
    node: &str,
    name: &str,
    granularity: Option<u32>,
    persistent: Option<bool>,
    disabled: Option<bool>,
) -> Result<Arc<BdrvDirtyBitmap>> {
    if name.is_empty() {
        return Err(Error::generic("Bitmap name cannot be empty"));
    }
    let n = graph.lookup(node)?;
    let granularity = match granularity {
        Some(g) if g < 512 || !g.is_power_of_two() => {
            return Err(Error::generic(
                "Granularity must be power of 2 and at least 512",
            ));
        }
        Some(g) => u64::from(g),
        None => default_granularity(&n),
    };
    let bm = n.bitmaps();
    let _g = bm.guard();
    let persistent = persistent == Some(true);
    if persistent {
        // QEMU's bdrv_can_store_new_dirty_bitmap.
        let Some(store) = n.driver().persistent_bitmaps() else {
            return Err(Error::generic(format!(
                "Can't store persistent bitmaps to {}: Operation not supported",
                device_or_node_name(graph, &n)
            )));
        };
        if bm.find(name).is_some() {
            return Err(Error::generic(format!("Bitmap already exists: {name}")));
        }
        store.can_store_new(name, granularity).map_err(|e| {
            e.prepend(format!(
                "Can't make bitmap '{name}' persistent in '{}': ",
                device_or_node_name(graph, &n)
            ))
        })?;
    }
    if bm.find(name).is_some() {
        return Err(Error::generic(format!("Bitmap already exists: {name}")));
    }
    // Bytes, as QEMU's strlen.
    if name.len() > BITMAP_NAME_MAX {
        return Err(Error::generic(format!("Bitmap name too long: {name}")));
    }
    let b = Arc::new(BdrvDirtyBitmap {
        name: Some(name.to_string()),
        bits: DirtyBitmap::new(n.len()?, granularity)?,
        recording: AtomicBool::new(disabled != Some(true)),
        busy: AtomicBool::new(false),
        successor: Default::default(),
        frozen_flag: AtomicBool::new(false),
        persistent,
        readonly: false,
        inconsistent: false,
    });
    if persistent && let Some(store) = n.driver().persistent_bitmaps() {
        store.register(&b);
    }
    let mut list = bm.list();
    list.insert(0, b.clone());
    bm.list.store(Arc::new(list));
    Ok(b)
}

/// QEMU's `bdrv_get_device_or_node_name`.
fn device_or_node_name(graph: &Graph, n: &Arc<Node>) -> String {
    let dev = graph.device_name(n);
    if dev.is_empty() {
        n.name().to_string()
    } else {
        dev
    }
}

/// `block-dirty-bitmap-remove`: a persistent bitmap leaves the image too.
pub fn remove(graph: &Graph, node: &str, name: &str) -> Result<()> {
    let (n, b) = lookup(graph, node, name)?;
    let bm = n.bitmaps();
    let _g = bm.guard();
    b.check(BitmapCheck::Remove)?;
    if b.persistent
        && let Some(store) = n.driver().persistent_bitmaps()
    {
        store.remove(&b)?;
    }
    let list: Vec<_> = bm
        .list()
        .into_iter()
        .filter(|x| !Arc::ptr_eq(x, &b))
        .collect();
    bm.list.store(Arc::new(list));
    Ok(())
}

/// `block-dirty-bitmap-clear`.
pub fn clear(graph: &Graph, node: &str, name: &str) -> Result<()> {
    let (n, b) = lookup(graph, node, name)?;
    let _g = n.bitmaps().guard();
    b.check(BitmapCheck::Default)?;
    b.bits.clear();
    Ok(())
}

/// `block-dirty-bitmap-enable` / `-disable`.
pub fn set_recording(graph: &Graph, node: &str, name: &str, recording: bool) -> Result<()> {
    let (n, b) = lookup(graph, node, name)?;
    let _g = n.bitmaps().guard();
    b.check(BitmapCheck::AllowReadonly)?;
    b.recording.store(recording, Ordering::Relaxed);
    Ok(())
}

/// A source of `block-dirty-bitmap-merge`: a name on the target's node,
/// or a bitmap on any node (QEMU's `BlockDirtyBitmapOrStr`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BitmapRef {
    /// A bitmap of the target's node.
    Name(String),
    /// `{"node": …, "name": …}`.
    Node {
        /// The node.
        node: String,
        /// The bitmap.
        name: String,
    },
}

/// `block-dirty-bitmap-merge`: OR the sources into `target`. All or
/// nothing: every source is checked before the target changes. An empty
/// list merges nothing (QEMU 10.0 crashes on it).
pub fn merge(graph: &Graph, node: &str, target: &str, bitmaps: &[BitmapRef]) -> Result<()> {
    let (n, dst) = lookup(graph, node, target)?;
    dst.check(BitmapCheck::Default)?;
    let mut sources = Vec::with_capacity(bitmaps.len());
    for r in bitmaps {
        let src = match r {
            BitmapRef::Name(name) => lookup(graph, node, name)?.1,
            BitmapRef::Node { node, name } => lookup(graph, node, name)?.1,
        };
        src.check(BitmapCheck::AllowReadonly)?;
        if src.bits.size() != dst.bits.size() {
            return Err(Error::generic(format!(
                "Bitmaps are of different sizes (destination size is {}, source size is {}) and can't be merged",
                dst.bits.size(),
                src.bits.size()
            )));
        }
        sources.push(src);
    }
    let _g = n.bitmaps().guard();
    for src in sources {
        if !Arc::ptr_eq(&src, &dst) {
            dst.bits.merge_from(&src.bits);
        }
    }
    Ok(())
}

/// Mark a bitmap in use (or not) by a job or export of the host.
pub fn set_busy(graph: &Graph, node: &str, name: &str, busy: bool) -> Result<()> {
    let (n, b) = lookup(graph, node, name)?;
    let _g = n.bitmaps().guard();
    b.set_busy(busy);
    Ok(())
}

/// The `dirty-bitmaps` of a node, newest first.
pub fn query(graph: &Graph, node: &str) -> Result<Vec<BlockDirtyInfo>> {
    let n = lookup_node(graph, node)?;
    Ok(n.bitmaps().list().iter().map(|b| b.info()).collect())
}

/// `x-debug-block-dirty-bitmap-sha256`: QEMU's hash of the bits (see
/// [`DirtyBitmap::sha256_hex`]); no state is refused, as in QEMU.
pub fn sha256(graph: &Graph, node: &str, name: &str) -> Result<String> {
    let (_, b) = lookup(graph, node, name)?;
    Ok(b.bits.sha256_hex())
}

/// Write the persistent bitmaps of every node back to their images and
/// release them from the nodes (QEMU stores them so when it closes or
/// inactivates a node). For a process about to end without dropping its
/// nodes: afterwards the nodes track no persistent bitmap, so call it
/// when no more writes come. Every node is tried; the first error is
/// returned.
pub fn store_persistent(graph: &Graph) -> Result<()> {
    let mut first = Ok(());
    for n in graph.nodes() {
        let Some(store) = n.driver().persistent_bitmaps() else {
            continue;
        };
        let bm = n.bitmaps();
        let _g = bm.guard();
        let r = store.store_and_release();
        if r.is_ok() {
            let list: Vec<_> = bm.list().into_iter().filter(|b| !b.persistent).collect();
            bm.list.store(Arc::new(list));
        }
        // On failure the bitmaps stay (in the node and, in-use, in the
        // image): closing the node tries again.
        if let Err(e) = r {
            let e = e.prepend(format!(
                "Lost persistent bitmaps during inactivation of node '{}': ",
                device_or_node_name(graph, &n)
            ));
            if first.is_ok() {
                first = Err(e);
            }
        }
    }
    first
}
