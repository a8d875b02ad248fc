//! The driver interface: what one format, protocol or filter implements
//! (QEMU's `BlockDriver`), and the small types its answers use.

use std::sync::Arc;

use super::copy_range;
use super::dirty_bitmap::PersistentBitmaps;
use super::perm::{self, Perms};
use super::resolve;
use super::{BlkdebugEvent, Node};
use crate::error::Result;

/// What a range of a node holds (QEMU's `BDRV_BLOCK_*` flags).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockStatus {
    /// Data is stored for the range (reads go to storage).
    pub data: bool,
    /// The range reads as zeroes.
    pub zero: bool,
    /// This layer decides the content (as opposed to a backing file).
    pub allocated: bool,
    /// Length of the range with this status, at least 1 byte and at most
    /// the length asked for.
    pub len: u64,
}

impl BlockStatus {
    /// Data allocated in this layer.
    pub fn data(len: u64) -> Self {
        BlockStatus {
            data: true,
            zero: false,
            allocated: true,
            len,
        }
    }

    /// A range that reads as zeroes (a hole, or known zeroes).
    pub fn zero(len: u64) -> Self {
        BlockStatus {
            data: false,
            zero: true,
            allocated: true,
            len,
        }
    }
}

/// Zero a range by writing zero buffers, for drivers without a cheaper way.
pub fn write_zero_buffers(
    offset: u64,
    len: u64,
    mut write: impl FnMut(u64, &[u8]) -> Result<()>,
) -> Result<()> {
    // In .bss: no allocation per call, and the pages are shared zeroes.
    static ZEROES: [u8; 1 << 20] = [0; 1 << 20];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(ZEROES.len() as u64) as usize;
        write(offset + done, &ZEROES[..n])?;
        done += n as u64;
    }
    Ok(())
}

/// What a write asks beyond its bytes (the `BdrvRequestFlags` QEMU
/// passes down with a write): durability, and whether zeroes may be
/// made the slow way. The default asks for neither.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriteFlags {
    /// Stable when the request returns (QEMU's `BDRV_REQ_FUA`, NBD's
    /// `NBD_CMD_FLAG_FUA`): a writethrough export's writes, a client's
    /// FUA passed on.
    pub fua: bool,
    /// Zeroes only where that is cheap: fail with `ENOTSUP` instead of
    /// writing zero buffers (QEMU's `BDRV_REQ_NO_FALLBACK`, NBD's
    /// `NBD_CMD_FLAG_FAST_ZERO`), so that a caller can decide to skip
    /// pre-zeroing rather than pay for it twice.
    pub no_fallback: bool,
}

impl WriteFlags {
    /// A write that must be stable when it returns.
    pub const FUA: WriteFlags = WriteFlags {
        fua: true,
        no_fallback: false,
    };
}

/// A child link of a node: the role (`file`, `image`, `backing`) and node.
#[derive(Clone)]
pub struct NodeChild {
    /// QEMU's child name.
    pub role: &'static str,
    /// The child.
    pub node: Arc<Node>,
}

/// One format or protocol driver. Implementations must be thread-safe;
/// the [`Node`] wrapper has already checked bounds and permissions.
pub trait BlockDriver: std::any::Any + Send + Sync + 'static {
    /// The `driver` name (`file`, `raw`, …).
    fn driver_name(&self) -> &'static str;

    /// Size in bytes.
    fn len(&self) -> Result<u64>;

    /// True for a zero-length node.
    fn is_empty(&self) -> Result<bool> {
        Ok(self.len()? == 0)
    }

    /// Read `buf.len()` bytes at `offset`.
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()>;

    /// Write `buf` at `offset`.
    fn write(&self, offset: u64, buf: &[u8]) -> Result<()>;

    /// Make `len` bytes at `offset` read as zero; `may_unmap` allows
    /// deallocating them. The default writes zero buffers.
    fn write_zeroes(&self, offset: u64, len: u64, _may_unmap: bool) -> Result<()> {
        write_zero_buffers(offset, len, |o, b| self.write(o, b))
    }

    /// Write with [`WriteFlags`]. The default is what QEMU's block layer
    /// does for a driver that cannot carry FUA: the write, then a flush
    /// of this node. Drivers that pass requests on (`raw`) or speak FUA
    /// themselves (`nbd`) override it.
    fn write_with(&self, offset: u64, buf: &[u8], flags: WriteFlags) -> Result<()> {
        self.write(offset, buf)?;
        if flags.fua {
            self.flush()?;
        }
        Ok(())
    }

    /// [`BlockDriver::write_zeroes`] with [`WriteFlags`]. The default
    /// refuses `no_fallback` with `ENOTSUP` (as QEMU's block layer for a
    /// driver that does not declare `BDRV_REQ_NO_FALLBACK`) and emulates
    /// FUA with a flush.
    fn write_zeroes_with(
        &self,
        offset: u64,
        len: u64,
        may_unmap: bool,
        flags: WriteFlags,
    ) -> Result<()> {
        if flags.no_fallback {
            return Err(crate::error::Error::from_errno(libc::ENOTSUP));
        }
        self.write_zeroes(offset, len, may_unmap)?;
        if flags.fua {
            self.flush()?;
        }
        Ok(())
    }

    /// Discard a range (a hint; may do nothing).
    fn discard(&self, _offset: u64, _len: u64) -> Result<()> {
        Ok(())
    }

    /// Whether the driver can discard at all (QEMU: it has a discard
    /// callback); discards of nodes that cannot are dropped early.
    fn can_discard(&self) -> bool {
        false
    }

    /// Make written data stable.
    fn flush(&self) -> Result<()>;

    /// Start writing `[offset, offset + len)` back to stable storage now,
    /// without waiting (see the `writeback` module). A hint: the default does
    /// nothing, and only a flush makes data stable.
    fn start_writeback(&self, _offset: u64, _len: u64) {}

    /// Status of the range starting at `offset` (at most `len` bytes).
    fn block_status(&self, _offset: u64, len: u64) -> Result<BlockStatus> {
        Ok(BlockStatus::data(len))
    }

    /// Writes past the end extend the node (a file under a format that
    /// allocates at its end, as QEMU's protocol nodes grow). Default: no.
    fn can_grow(&self) -> bool {
        false
    }

    /// The backing node, for formats that have one.
    fn backing(&self) -> Option<Arc<Node>> {
        None
    }

    /// Children of this node.
    fn children(&self) -> Vec<NodeChild> {
        Vec::new()
    }

    /// For filters (QEMU's `bdrv_filter_bs`): the child whose data this
    /// node shows unchanged. A mirror may replace a node reached from its
    /// source through filters only, and chains are walked through them.
    fn filtered_child(&self) -> Option<Arc<Node>> {
        None
    }

    /// What this node needs from `child` and lets others do on it, given
    /// its own cumulative permissions `p` (QEMU's `bdrv_child_perm`);
    /// `writable` is the node's read-write state. The default is QEMU's
    /// `bdrv_default_perms`: the filtered child of a filter gets the
    /// parents' permissions, a `backing` child is only read, any other
    /// child holds the format's data and metadata.
    fn child_perm(&self, child: &NodeChild, p: Perms, writable: bool) -> Perms {
        if self
            .filtered_child()
            .is_some_and(|f| Arc::ptr_eq(&f, &child.node))
        {
            perm::filter_perms(p)
        } else if child.role == "backing" {
            perm::cow_perms(p)
        } else {
            perm::storage_perms(p, true, true, writable)
        }
    }

    /// A protocol node takes the locks for `p` and checks them against
    /// other processes (QEMU's `raw_check_perm`), keeping what it held
    /// until [`Self::set_perm`] or [`Self::abort_perm`]. `p` already has
    /// `force-share` applied.
    fn check_perm(&self, _p: Perms) -> Result<()> {
        Ok(())
    }

    /// Keep only the locks of the permissions last checked (QEMU's
    /// `raw_set_perm`).
    fn set_perm(&self) {}

    /// Back to the locks held before the last check (`raw_abort_perm`).
    fn abort_perm(&self) {}

    /// Point this node's edges to `old` at `new` (QEMU's
    /// `bdrv_replace_node`, seen from one parent). Called with the nodes
    /// drained. Every driver with children moves them (their edges are
    /// [`super::child::ChildEdge`]s); the default, for drivers without, does nothing.
    fn replace_child(&self, _old: &Arc<Node>, _new: &Arc<Node>) {}

    /// A blkdebug event fired on this node by a parent or the generic
    /// layer. Only blkdebug acts on it.
    fn debug_event(&self, _event: BlkdebugEvent) {}

    /// Cluster size, for drivers that have one.
    fn cluster_size(&self) -> Option<u64> {
        None
    }

    /// Formats that keep dirty bitmaps in their image (qcow2): how the
    /// generic bitmap layer reaches them. The default keeps none.
    fn persistent_bitmaps(&self) -> Option<&dyn PersistentBitmaps> {
        None
    }

    /// The file name shown in queries.
    fn filename(&self) -> String {
        String::new()
    }

    /// The options that would open this node again as it is (QEMU's
    /// `full_open_options`), when they are known: what a `json:{…}` file
    /// name of a parent shows.
    fn open_options(&self) -> Option<serde_json::Value> {
        None
    }

    /// True when write-zeroes with unmap is cheap (holes).
    fn supports_zero_unmap(&self) -> bool {
        false
    }

    /// This layer's part of resolving a plain read or write to a file
    /// for asynchronous submission (see [`super::resolve`]): add what the
    /// request must hold and do afterwards to `r`, and pass it on (or
    /// land it on the file). The default declines: the request is made
    /// synchronously.
    fn resolve(&self, _req: resolve::Request, _r: &mut resolve::Resolved) -> bool {
        false
    }

    /// Source side of copy offload: hand the file holding `[offset,
    /// offset + len)` to `sink` (see [`copy_range`]). The default cannot.
    fn copy_range_from(
        &self,
        _offset: u64,
        _len: u64,
        _sink: &mut copy_range::CopySink<'_>,
    ) -> Result<bool> {
        Ok(false)
    }

    /// Target side of copy offload: copy `len` bytes of `src` at
    /// `src_offset` to `offset`. The default cannot.
    fn copy_range_to(
        &self,
        _offset: u64,
        _src: &std::fs::File,
        _src_offset: u64,
        _len: u64,
    ) -> Result<bool> {
        Ok(false)
    }
}
