//! Guest backends (QEMU's `BlockBackend` as a device sees it): a guest
//! device's requests go through here, so that drain, dirty tracking and
//! the device's own error policy (`rerror`/`werror`) apply.
//!
//! A failed request gets the action of the device's policy (`auto` means
//! QEMU's `-drive` defaults: `report` for reads, `enospc` for writes);
//! `stop` sets the device's I/O status (first error wins until reset);
//! every failure emits `BLOCK_IO_ERROR` before the request leaves the
//! backend, so a drain that waited for the request also saw its event.
//! The host stops its VM on `stop`, keeps the request and retries it after
//! resuming (as QEMU's devices do).

use crate::locks::{Condvar, Mutex, MutexGuard, RwLock};
use std::sync::Arc;

use super::drain::DrainSection;
use super::graph::Graph;
use super::parents::DrainParent;
use super::perm::Perms;
use super::resolve::{Request, Resolved};
use super::{BlockStatus, Node, WriteFlags};
use crate::error::{Error, Result};
use crate::error_policy;
use crate::events::{EventBus, EventData};
use crate::qapi::{BlockDeviceIoStatus, BlockErrorAction, BlockdevOnError, IoOperationType};

/// How a backend is created.
#[derive(Debug, Clone)]
pub struct BackendOptions {
    /// Device (backend) name; "" for an anonymous backend.
    pub name: String,
    /// QOM path of the guest device, reported in `BLOCK_IO_ERROR`.
    pub qom_path: String,
    /// Read error policy.
    pub rerror: BlockdevOnError,
    /// Write error policy.
    pub werror: BlockdevOnError,
    /// The device keeps an I/O status (then `BLOCK_IO_ERROR` has `nospace`).
    pub iostatus_enabled: bool,
    /// What the backend takes and shares on its node (QEMU's `blk_new`
    /// arguments); `None`: a guest device's defaults,
    /// [`Perms::guest_device`] (write unless the node is read-only, write
    /// not shared). An NBD export declares [`Perms::nbd_export`].
    pub perms: Option<Perms>,
    /// A failed request is a guest device's error: the policy applies and
    /// `BLOCK_IO_ERROR` is emitted. False for users that pass errors back
    /// themselves with no policy (an NBD export: QEMU's server returns
    /// the errno to its client and emits nothing).
    pub device_errors: bool,
}

impl Default for BackendOptions {
    fn default() -> Self {
        BackendOptions {
            name: String::new(),
            qom_path: String::new(),
            rerror: BlockdevOnError::Auto,
            werror: BlockdevOnError::Auto,
            iostatus_enabled: true,
            perms: None,
            device_errors: true,
        }
    }
}

/// A failed guest request: the error and the action the policy chose.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestIoError {
    /// What failed.
    pub error: Error,
    /// `ignore`: complete the guest request as if it succeeded; `report`:
    /// fail it; `stop`: hold it, stop the VM, retry after resume.
    pub action: BlockErrorAction,
}

struct Gate {
    quiesced: u32,
    in_flight: u64,
    /// Drains waiting for `in_flight` to reach 0 (only they need the
    /// wake-up then).
    draining: u32,
    iostatus: BlockDeviceIoStatus,
}

/// The shared part of a backend (also referenced by its node for drain).
pub struct BackendShared {
    opts: BackendOptions,
    node: RwLock<Arc<Node>>,
    gate: Mutex<Gate>,
    changed: Condvar,
    bus: Arc<EventBus>,
    drains: Mutex<Vec<DrainSection>>,
}

impl BackendShared {
    pub(crate) fn new(opts: BackendOptions, node: Arc<Node>, bus: Arc<EventBus>) -> Arc<Self> {
        let b = Arc::new(BackendShared {
            opts,
            node: RwLock::new(node.clone()),
            gate: Mutex::new(Gate {
                quiesced: 0,
                in_flight: 0,
                draining: 0,
                iostatus: BlockDeviceIoStatus::Ok,
            }),
            changed: Condvar::new(),
            bus,
            drains: Mutex::new(Vec::new()),
        });
        node.attach_backend(&b);
        b
    }

    /// What this backend takes and shares on `node` (its node).
    pub(crate) fn perms(&self, node: &Node) -> Perms {
        self.opts
            .perms
            .unwrap_or_else(|| Perms::guest_device(node.is_read_only(), false))
    }

    /// The device name.
    pub fn name(&self) -> &str {
        &self.opts.name
    }

    /// The node requests go to.
    pub fn node(&self) -> Arc<Node> {
        self.node.read().clone()
    }

    fn gate(&self) -> MutexGuard<'_, Gate> {
        self.gate.lock()
    }

    /// Point the backend at another node (QEMU's `bdrv_replace_node` for
    /// this parent: the mirror pivot). Requests already in flight finish on
    /// the old node; callers drain first.
    pub(crate) fn replace_node(self: &Arc<Self>, new: Arc<Node>) {
        let old = {
            let mut n = self.node.write();
            std::mem::replace(&mut *n, new.clone())
        };
        old.detach_backend(self);
        new.attach_backend(self);
    }

    /// One guest request: wait at the gate while drained, count it in
    /// flight, apply the policy to a failure (event included) before the
    /// request leaves the flight count.
    fn request<T>(
        &self,
        is_read: bool,
        f: impl FnOnce(&Node) -> Result<T>,
    ) -> Result<T, GuestIoError> {
        {
            let mut g = self.gate();
            while g.quiesced > 0 {
                g = self.changed.wait(g);
            }
            g.in_flight += 1;
        }
        self.counted(is_read, f)
    }

    /// [`Self::request`], or `None` at once while a drain holds the gate
    /// (for a thread that must not wait there: see `BlockBackend::try_block_status`).
    fn try_request<T>(
        &self,
        is_read: bool,
        f: impl FnOnce(&Node) -> Result<T>,
    ) -> Option<Result<T, GuestIoError>> {
        {
            let mut g = self.gate();
            if g.quiesced > 0 {
                return None;
            }
            g.in_flight += 1;
        }
        Some(self.counted(is_read, f))
    }

    /// A request already counted at the gate: run it, apply the policy to
    /// a failure, and leave the count.
    fn counted<T>(
        &self,
        is_read: bool,
        f: impl FnOnce(&Node) -> Result<T>,
    ) -> Result<T, GuestIoError> {
        let node = self.node();
        let res = f(&node).map_err(|error| {
            if self.opts.device_errors {
                self.error_action(&node, is_read, error)
            } else {
                GuestIoError {
                    error,
                    action: BlockErrorAction::Report,
                }
            }
        });
        let mut g = self.gate();
        g.in_flight -= 1;
        if g.in_flight == 0 && g.draining > 0 {
            self.changed.notify_all();
        }
        res
    }

    /// QEMU's `blk_get_error_action` + `blk_error_action`.
    fn error_action(&self, node: &Node, is_read: bool, error: Error) -> GuestIoError {
        let errno = error.errno().unwrap_or(libc::EIO);
        let policy = if is_read {
            self.opts.rerror
        } else {
            self.opts.werror
        };
        let action = error_policy::device_action(policy, is_read, errno);
        if action == BlockErrorAction::Stop && self.opts.iostatus_enabled {
            let mut g = self.gate();
            if g.iostatus == BlockDeviceIoStatus::Ok {
                g.iostatus = error_policy::iostatus_for(errno);
            }
        }
        self.bus.emit(EventData::BlockIoError {
            qom_path: self.opts.qom_path.clone(),
            device: self.opts.name.clone(),
            node_name: Some(node.name().to_string()),
            operation: IoOperationType::from_is_read(is_read),
            action,
            nospace: self.opts.iostatus_enabled.then_some(errno == libc::ENOSPC),
            reason: crate::error::strerror(errno),
        });
        GuestIoError { error, action }
    }
}

/// A request counted at the gate beyond the call that began it (a
/// resolved request, completed on another thread).
struct GateTicket(Arc<BackendShared>);

impl Drop for GateTicket {
    fn drop(&mut self) {
        let mut g = self.0.gate();
        g.in_flight -= 1;
        if g.in_flight == 0 && g.draining > 0 {
            self.0.changed.notify_all();
        }
    }
}

/// A drain holds the device's new requests at its gate and waits for those
/// in flight.
impl DrainParent for BackendShared {
    fn id(&self) -> usize {
        self as *const BackendShared as usize
    }

    fn drained_begin(&self) {
        self.gate().quiesced += 1;
    }

    fn drained_wait(&self) {
        let mut g = self.gate();
        while g.in_flight > 0 {
            g.draining += 1;
            g = self.changed.wait(g);
            g.draining -= 1;
        }
    }

    fn drained_end(&self) {
        let mut g = self.gate();
        g.quiesced = g.quiesced.saturating_sub(1);
        if g.quiesced == 0 {
            self.changed.notify_all();
        }
    }
}

/// A guest device's handle on a node. Dropping it detaches it.
pub struct BlockBackend {
    shared: Arc<BackendShared>,
    graph: Arc<Graph>,
}

impl std::fmt::Debug for BlockBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockBackend")
            .field("name", &self.shared.opts.name)
            .finish_non_exhaustive()
    }
}

impl BlockBackend {
    pub(crate) fn new(shared: Arc<BackendShared>, graph: Arc<Graph>) -> Self {
        BlockBackend { shared, graph }
    }

    /// Device name ("" when anonymous).
    pub fn name(&self) -> &str {
        self.shared.name()
    }

    /// The node requests go to.
    pub fn node(&self) -> Arc<Node> {
        self.shared.node()
    }

    /// Size of the attached node.
    pub fn len(&self) -> Result<u64> {
        self.node().len()
    }

    /// True when the attached node is empty.
    pub fn is_empty(&self) -> Result<bool> {
        Ok(self.len()? == 0)
    }

    /// Guest read.
    pub fn pread(&self, offset: u64, buf: &mut [u8]) -> Result<(), GuestIoError> {
        self.shared.request(true, |n| n.pread(offset, buf))
    }

    /// Guest write.
    pub fn pwrite(&self, offset: u64, buf: &[u8]) -> Result<(), GuestIoError> {
        self.shared.request(false, |n| {
            in_bounds(n, offset, buf.len() as u64)?;
            n.pwrite(offset, buf)
        })
    }

    /// A plain guest read or write resolved for asynchronous submission
    /// (see [`super::resolve`]), counted at the device's gate like a
    /// request in flight until it is dropped. `None` while a drain holds
    /// the gate (the request would wait there) or when a layer must see
    /// it: make it with [`Self::pread`]/[`Self::pwrite`] then, which also
    /// applies the error policy to a resolved request that failed.
    pub(crate) fn resolve(&self, req: Request) -> Option<Resolved> {
        {
            let mut g = self.shared.gate();
            if g.quiesced > 0 {
                return None;
            }
            g.in_flight += 1;
        }
        let ticket = GateTicket(self.shared.clone());
        let node = self.node();
        in_bounds(&node, req.offset, req.len).ok()?;
        let mut r = node.resolve(req)?;
        // Released after the nodes, as a request leaves the gate last.
        r.hold(ticket);
        Some(r)
    }

    /// Guest write with [`WriteFlags`] (FUA).
    pub fn pwrite_with(
        &self,
        offset: u64,
        buf: &[u8],
        flags: WriteFlags,
    ) -> Result<(), GuestIoError> {
        self.shared.request(false, |n| {
            in_bounds(n, offset, buf.len() as u64)?;
            n.pwrite_with(offset, buf, flags)
        })
    }

    /// Guest write-zeroes.
    pub fn pwrite_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_unmap: bool,
    ) -> Result<(), GuestIoError> {
        self.pwrite_zeroes_with(offset, len, may_unmap, WriteFlags::default())
    }

    /// Guest write-zeroes with [`WriteFlags`] (FUA; with `no_fallback`,
    /// `ENOTSUP` where zeroing is not cheap, and nothing was written).
    pub fn pwrite_zeroes_with(
        &self,
        offset: u64,
        len: u64,
        may_unmap: bool,
        flags: WriteFlags,
    ) -> Result<(), GuestIoError> {
        self.shared.request(false, |n| {
            in_bounds(n, offset, len)?;
            n.pwrite_zeroes_with(offset, len, may_unmap, flags)
        })
    }

    /// Guest discard.
    pub fn pdiscard(&self, offset: u64, len: u64) -> Result<(), GuestIoError> {
        self.shared.request(false, |n| {
            in_bounds(n, offset, len)?;
            n.pdiscard(offset, len)
        })
    }

    /// Guest flush.
    pub fn flush(&self) -> Result<(), GuestIoError> {
        self.shared.request(false, |n| n.flush())
    }

    /// Block status of `[offset, offset + len)` as a reader of this
    /// backend sees it: through the whole backing chain (QEMU's
    /// `blk_co_block_status_above` with no base), at most `len` bytes.
    /// Counted in flight like any request, so a drain waits for it.
    pub fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus, GuestIoError> {
        self.shared
            .request(true, |n| super::chain::status_above(n, offset, len))
    }

    /// [`Self::block_status`], or `None` at once while a drain holds the
    /// gate: for a thread that answers requests a drain waits for (an
    /// export's ring), which must not wait for the drain in turn.
    pub(crate) fn try_block_status(
        &self,
        offset: u64,
        len: u64,
    ) -> Option<Result<BlockStatus, GuestIoError>> {
        self.shared
            .try_request(true, |n| super::chain::status_above(n, offset, len))
    }

    /// The allocation depth at `offset` (QEMU's `qemu:allocation-depth`:
    /// 0 when no layer of the chain holds the range, 1 for the node
    /// itself, 2 for its backing layer, …) and for how many bytes (at
    /// most `len`) it holds.
    pub fn allocation_depth(&self, offset: u64, len: u64) -> Result<(u32, u64), GuestIoError> {
        self.shared
            .request(true, |n| super::chain::allocation_depth(n, offset, len))
    }

    /// The device's I/O status.
    pub fn iostatus(&self) -> BlockDeviceIoStatus {
        self.shared.gate().iostatus
    }

    /// Back to `ok` (QEMU's `blk_iostatus_reset`, done on `cont`).
    pub fn iostatus_reset(&self) {
        self.shared.gate().iostatus = BlockDeviceIoStatus::Ok;
    }

    /// Begin a drained section on this backend's node: new guest requests
    /// wait, jobs on the node pause; returns once nothing is in flight.
    pub fn drain_begin(&self) {
        let s = self.graph.drained_begin(&[self.node()]);
        self.shared.drains.lock().push(s);
    }

    /// End the innermost drained section begun on this backend.
    pub fn drain_end(&self) -> Result<()> {
        let s = self.shared.drains.lock().pop();
        match s {
            Some(s) => {
                self.graph.drained_end(s);
                Ok(())
            }
            None => Err(Error::generic(format!(
                "Backend '{}' is not drained",
                self.name()
            ))),
        }
    }
}

impl Drop for BlockBackend {
    fn drop(&mut self) {
        // End drained sections left open so no job stays paused forever.
        let left: Vec<DrainSection> = std::mem::take(&mut *self.shared.drains.lock());
        for s in left {
            self.graph.drained_end(s);
        }
        self.shared.node().detach_backend(&self.shared);
        self.graph.release_perms();
    }
}

/// QEMU's `blk_check_byte_request`: a guest request past the end fails
/// with EIO (a protocol node under it could otherwise grow).
fn in_bounds(n: &Node, offset: u64, len: u64) -> Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= n.len()? => Ok(()),
        _ => Err(Error::from_errno(libc::EIO)),
    }
}
