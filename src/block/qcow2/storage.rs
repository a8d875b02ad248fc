//! imago's storage trait over one of our nodes, so that a qcow2 image's
//! I/O goes through our graph: its `file` child may be a `blkdebug` node,
//! and a backing layer is whatever node we link (a `raw` view of it). The
//! storage reads the node through the qcow2 node's edge, so moving the
//! edge (a filter put above the file or the backing node) moves imago's
//! I/O with it, without reopening the image.
//!
//! imago clears every autoclear bit of the header when it opens an image
//! for writing (it knows none of the features they vouch for). A storage
//! made [`NodeStorage::keeping_autoclear`] puts the bits we do maintain
//! back into that header write, so the bitmaps extension never looks
//! invalid on disk, not even for a moment.

use std::fmt;
use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use imago::Storage;
use imago::io_buffers::{IoVector, IoVectorMut};
use imago::storage::drivers::CommonStorageHelper;

use crate::block::Node;
use crate::block::child::ChildEdge;
use crate::error::Error;

/// The node behind an edge as imago storage.
pub struct NodeStorage {
    edge: Arc<ChildEdge>,
    helper: CommonStorageHelper,
    /// Autoclear bits to keep set in writes of the header.
    keep_autoclear: u64,
}

/// Where the autoclear bits are in a v3 header.
const AUTOCLEAR: std::ops::Range<u64> = 88..96;

impl NodeStorage {
    /// Storage on whatever node `edge` points at.
    pub fn new(edge: Arc<ChildEdge>) -> Self {
        NodeStorage {
            edge,
            helper: CommonStorageHelper::default(),
            keep_autoclear: 0,
        }
    }

    /// Keep the autoclear bits `bits` set whenever imago writes the
    /// header (it rewrites the header only when it opens the image, and
    /// then with every autoclear bit clear).
    pub fn keeping_autoclear(mut self, bits: u64) -> Self {
        self.keep_autoclear = bits;
        self
    }

    /// Storage on `node` alone (no edge anyone else can move).
    pub fn on(node: Arc<Node>) -> Self {
        Self::new(Arc::new(ChildEdge::new(node)))
    }

    /// The node the storage reads and writes now.
    pub fn node(&self) -> Arc<Node> {
        self.edge.get()
    }
}

impl fmt::Debug for NodeStorage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NodeStorage")
            .field("node", &self.node().name())
            .finish()
    }
}

impl fmt::Display for NodeStorage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.node().name())
    }
}

/// Our errors into imago's: the errno survives, so that a failed read
/// deep in a chain still reaches the job's error policy as EIO or ENOSPC.
pub fn to_io(e: Error) -> io::Error {
    match e.errno() {
        Some(errno) => io::Error::from_raw_os_error(errno),
        None => io::Error::other(e.message().to_string()),
    }
}

/// imago's errors into ours (an errno where there is one).
pub fn from_io(e: io::Error) -> Error {
    if let Some(errno) = e.raw_os_error() {
        return Error::from_errno(errno);
    }
    // imago wraps errors in context ("Backing file: ..."): look through.
    let mut src: Option<&(dyn std::error::Error + 'static)> = e.get_ref().map(|r| r as _);
    while let Some(inner) = src {
        if let Some(ioe) = inner.downcast_ref::<io::Error>()
            && let Some(errno) = ioe.raw_os_error()
        {
            return Error::from_errno(errno);
        }
        src = inner.source();
    }
    Error::errno_msg(libc::EIO, e.to_string())
}

// The `pure_*` methods are `unsafe fn` in imago's trait: imago promises to
// serialise overlapping requests itself, and a storage may rely on that.
// Ours does not rely on anything: every call below is an ordinary safe,
// positional and thread-safe request on a node.
#[allow(unsafe_code)]
impl Storage for NodeStorage {
    fn size(&self) -> io::Result<u64> {
        self.node().len().map_err(to_io)
    }

    fn get_filename(&self) -> Option<PathBuf> {
        let f = self.node().filename();
        (!f.is_empty()).then(|| PathBuf::from(f))
    }

    fn resolve_relative_path<P: AsRef<std::path::Path>>(&self, relative: P) -> io::Result<PathBuf> {
        let base = PathBuf::from(self.node().filename());
        Ok(match base.parent() {
            Some(dir) => dir.join(relative),
            None => relative.as_ref().to_path_buf(),
        })
    }

    unsafe fn pure_readv(&self, bufv: IoVectorMut<'_>, offset: u64) -> io::Result<()> {
        let mut off = offset;
        for mut slice in bufv.into_inner() {
            let b: &mut [u8] = &mut slice;
            self.node().pread(off, b).map_err(to_io)?;
            off += b.len() as u64;
        }
        Ok(())
    }

    unsafe fn pure_writev(&self, bufv: IoVector<'_>, offset: u64) -> io::Result<()> {
        let len = bufv.len();
        if self.keep_autoclear != 0 && offset <= AUTOCLEAR.start && offset + len >= AUTOCLEAR.end {
            // A header write: gather it, and set the bits to keep.
            let mut buf = Vec::with_capacity(len as usize);
            for slice in bufv.into_inner() {
                buf.extend_from_slice(&slice);
            }
            let at = (AUTOCLEAR.start - offset) as usize;
            let field: [u8; 8] = buf[at..at + 8].try_into().expect("8 bytes");
            let bits = u64::from_be_bytes(field) | self.keep_autoclear;
            buf[at..at + 8].copy_from_slice(&bits.to_be_bytes());
            return self.node().pwrite(offset, &buf).map_err(to_io);
        }
        let mut off = offset;
        for slice in bufv.into_inner() {
            let b: &[u8] = &slice;
            self.node().pwrite(off, b).map_err(to_io)?;
            off += b.len() as u64;
        }
        Ok(())
    }

    unsafe fn pure_write_zeroes(&self, offset: u64, length: u64) -> io::Result<()> {
        self.node()
            .pwrite_zeroes(offset, length, true)
            .map_err(to_io)
    }

    unsafe fn pure_write_allocated_zeroes(&self, offset: u64, length: u64) -> io::Result<()> {
        self.node()
            .pwrite_zeroes(offset, length, false)
            .map_err(to_io)
    }

    unsafe fn pure_discard(&self, offset: u64, length: u64) -> io::Result<()> {
        self.node().pdiscard(offset, length).map_err(to_io)
    }

    fn flush(&self) -> io::Result<()> {
        // Our nodes buffer nothing above the kernel; stable storage is
        // `sync`'s job.
        Ok(())
    }

    fn sync(&self) -> io::Result<()> {
        self.node().flush().map_err(to_io)
    }

    unsafe fn invalidate_cache(&self) -> io::Result<()> {
        Ok(())
    }

    fn get_storage_helper(&self) -> &CommonStorageHelper {
        &self.helper
    }
}
