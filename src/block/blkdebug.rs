//! `blkdebug`: error injection with QEMU's options and QEMU's semantics.
//!
//! Rules are *armed* by events, not matched per request (recorded against
//! QEMU 10): when an event fires on this node, the `inject-error` rules for
//! that event (in the current state) replace the set of armed rules; the
//! next request of a matching I/O type (covering `sector`, if given) fails
//! with the rule's errno. A `once` rule is removed when it fires; other
//! rules stay armed until another event that has inject rules fires.
//! `set-state` rules move the state machine (initial state 1) after the
//! event's inject rules were processed. Events come from the parent format
//! driver (`raw` fires `read_aio`/`write_aio` on its `file` child) and from
//! the generic layer (`pwritev`, `pwritev_zero`, `pwritev_done`,
//! `flush_to_os`, `flush_to_disk`); `none` fires once when the node opens.

use crate::locks::Mutex;
use std::sync::Arc;

use super::child::ChildEdge;
use super::{BlockDriver, BlockStatus, Node, NodeChild, WriteFlags};
use crate::error::{Error, Result};
use crate::qapi::qapi_enum;

qapi_enum! {
    /// QEMU's `BlkdebugEvent`, in QAPI order.
    pub enum BlkdebugEvent {
        /// l1_update
        L1Update = "l1_update",
        /// l1_grow_alloc_table
        L1GrowAllocTable = "l1_grow_alloc_table",
        /// l1_grow_write_table
        L1GrowWriteTable = "l1_grow_write_table",
        /// l1_grow_activate_table
        L1GrowActivateTable = "l1_grow_activate_table",
        /// l2_load
        L2Load = "l2_load",
        /// l2_update
        L2Update = "l2_update",
        /// l2_update_compressed
        L2UpdateCompressed = "l2_update_compressed",
        /// l2_alloc_cow_read
        L2AllocCowRead = "l2_alloc_cow_read",
        /// l2_alloc_write
        L2AllocWrite = "l2_alloc_write",
        /// read_aio: a format driver reads its file child
        ReadAio = "read_aio",
        /// read_backing_aio
        ReadBackingAio = "read_backing_aio",
        /// read_compressed
        ReadCompressed = "read_compressed",
        /// write_aio: a format driver writes its file child
        WriteAio = "write_aio",
        /// write_compressed
        WriteCompressed = "write_compressed",
        /// vmstate_load
        VmstateLoad = "vmstate_load",
        /// vmstate_save
        VmstateSave = "vmstate_save",
        /// cow_read
        CowRead = "cow_read",
        /// cow_write
        CowWrite = "cow_write",
        /// reftable_load
        ReftableLoad = "reftable_load",
        /// reftable_grow
        ReftableGrow = "reftable_grow",
        /// reftable_update
        ReftableUpdate = "reftable_update",
        /// refblock_load
        RefblockLoad = "refblock_load",
        /// refblock_update
        RefblockUpdate = "refblock_update",
        /// refblock_update_part
        RefblockUpdatePart = "refblock_update_part",
        /// refblock_alloc
        RefblockAlloc = "refblock_alloc",
        /// refblock_alloc_hookup
        RefblockAllocHookup = "refblock_alloc_hookup",
        /// refblock_alloc_write
        RefblockAllocWrite = "refblock_alloc_write",
        /// refblock_alloc_write_blocks
        RefblockAllocWriteBlocks = "refblock_alloc_write_blocks",
        /// refblock_alloc_write_table
        RefblockAllocWriteTable = "refblock_alloc_write_table",
        /// refblock_alloc_switch_table
        RefblockAllocSwitchTable = "refblock_alloc_switch_table",
        /// cluster_alloc
        ClusterAlloc = "cluster_alloc",
        /// cluster_alloc_bytes
        ClusterAllocBytes = "cluster_alloc_bytes",
        /// cluster_free
        ClusterFree = "cluster_free",
        /// flush_to_os
        FlushToOs = "flush_to_os",
        /// flush_to_disk
        FlushToDisk = "flush_to_disk",
        /// pwritev_rmw_head
        PwritevRmwHead = "pwritev_rmw_head",
        /// pwritev_rmw_after_head
        PwritevRmwAfterHead = "pwritev_rmw_after_head",
        /// pwritev_rmw_tail
        PwritevRmwTail = "pwritev_rmw_tail",
        /// pwritev_rmw_after_tail
        PwritevRmwAfterTail = "pwritev_rmw_after_tail",
        /// pwritev: the generic layer starts a write on this node
        Pwritev = "pwritev",
        /// pwritev_zero: the generic layer starts a zero write
        PwritevZero = "pwritev_zero",
        /// pwritev_done: a write finished
        PwritevDone = "pwritev_done",
        /// empty_image_prepare
        EmptyImagePrepare = "empty_image_prepare",
        /// l1_shrink_write_table
        L1ShrinkWriteTable = "l1_shrink_write_table",
        /// l1_shrink_free_l2_clusters
        L1ShrinkFreeL2Clusters = "l1_shrink_free_l2_clusters",
        /// cor_write
        CorWrite = "cor_write",
        /// cluster_alloc_space
        ClusterAllocSpace = "cluster_alloc_space",
        /// none: fires once when the node is opened
        None = "none",
    }
}

qapi_enum! {
    /// QEMU's `BlkdebugIOType`: which requests an armed rule fails.
    pub enum BlkdebugIoType {
        /// reads
        Read = "read",
        /// writes
        Write = "write",
        /// write-zeroes
        WriteZeroes = "write-zeroes",
        /// discards
        Discard = "discard",
        /// flushes
        Flush = "flush",
        /// block-status queries
        BlockStatus = "block-status",
    }
}

impl BlkdebugIoType {
    fn bit(self) -> u32 {
        1 << self.index()
    }

    /// QEMU's default mask: everything but block-status.
    pub fn default_mask() -> u32 {
        Self::Read.bit()
            | Self::Write.bit()
            | Self::WriteZeroes.bit()
            | Self::Discard.bit()
            | Self::Flush.bit()
    }
}

/// One `inject-error` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InjectError {
    /// The event that arms the rule.
    pub event: BlkdebugEvent,
    /// Only in this state (0 = any).
    pub state: i64,
    /// `iotype`; `None` = QEMU's default set.
    pub iotype: Option<BlkdebugIoType>,
    /// errno to fail with (default EIO; 0 or negative injects nothing).
    pub errno: i64,
    /// Byte offset a request must cover (`sector` × 512).
    pub offset: Option<u64>,
    /// Remove the rule after it fired once.
    pub once: bool,
    /// Accepted for compatibility; timing only in QEMU.
    pub immediately: bool,
}

/// One `set-state` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetState {
    /// The event.
    pub event: BlkdebugEvent,
    /// Only in this state (0 = any).
    pub state: i64,
    /// The state to move to.
    pub new_state: i64,
}

#[derive(Debug)]
enum Action {
    Inject(InjectError),
    SetState(SetState),
}

#[derive(Debug)]
struct Rule {
    id: u64,
    event: BlkdebugEvent,
    state: i64,
    action: Action,
}

#[derive(Debug, Default)]
struct Rules {
    /// All rules, newest-defined first per event (QEMU inserts at the head).
    rules: Vec<Rule>,
    /// Armed inject rules, by id, in arming order.
    armed: Vec<u64>,
    state: i64,
}

/// The blkdebug driver.
pub struct BlkdebugDriver {
    image: ChildEdge,
    rules: Mutex<Rules>,
    /// No options besides `image`: QEMU then names the node
    /// `blkdebug::<image's file name>`.
    plain: bool,
}

impl BlkdebugDriver {
    /// A blkdebug node over `image` with the given rules; fires `none`.
    pub fn new(image: Arc<Node>, inject: Vec<InjectError>, set_state: Vec<SetState>) -> Self {
        let plain = inject.is_empty() && set_state.is_empty();
        let mut rules = Rules {
            state: 1,
            ..Default::default()
        };
        let mut id = 0;
        for i in inject {
            id += 1;
            rules.rules.insert(
                0,
                Rule {
                    id,
                    event: i.event,
                    state: i.state,
                    action: Action::Inject(i),
                },
            );
        }
        for s in set_state {
            id += 1;
            rules.rules.insert(
                0,
                Rule {
                    id,
                    event: s.event,
                    state: s.state,
                    action: Action::SetState(s),
                },
            );
        }
        let d = BlkdebugDriver {
            image: ChildEdge::new(image),
            rules: Mutex::new(rules),
            plain,
        };
        d.debug_event(BlkdebugEvent::None);
        d
    }

    /// The node was opened with `align` (an option that shows in QEMU's
    /// file name for it).
    pub fn with_align(mut self, align: Option<i64>) -> Self {
        self.plain &= align.is_none();
        self
    }

    fn image(&self) -> Arc<Node> {
        self.image.get()
    }

    fn lock(&self) -> crate::locks::MutexGuard<'_, Rules> {
        self.rules.lock()
    }

    /// QEMU's `rule_check`: fail this request if an armed rule matches.
    fn check(&self, offset: u64, bytes: u64, iotype: BlkdebugIoType) -> Result<()> {
        let mut r = self.lock();
        let hit = r.armed.iter().copied().find(|id| {
            let Some(rule) = r.rules.iter().find(|x| x.id == *id) else {
                return false;
            };
            let Action::Inject(i) = &rule.action else {
                return false;
            };
            let covers = match i.offset {
                None => true,
                Some(o) => bytes > 0 && o >= offset && o < offset + bytes,
            };
            let mask = i.iotype.map_or(BlkdebugIoType::default_mask(), |t| t.bit());
            covers && mask & iotype.bit() != 0
        });
        let Some(id) = hit else { return Ok(()) };
        let pos = r
            .rules
            .iter()
            .position(|x| x.id == id)
            .expect("armed rule exists");
        let (errno, once) = match &r.rules[pos].action {
            Action::Inject(i) => (i.errno, i.once),
            Action::SetState(_) => unreachable!("only inject rules are armed"),
        };
        if errno <= 0 {
            return Ok(());
        }
        if once {
            r.armed.retain(|x| *x != id);
            r.rules.remove(pos);
        }
        Err(Error::from_errno(errno as i32))
    }
}

impl BlockDriver for BlkdebugDriver {
    fn driver_name(&self) -> &'static str {
        "blkdebug"
    }

    fn len(&self) -> Result<u64> {
        self.image().len()
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.check(offset, buf.len() as u64, BlkdebugIoType::Read)?;
        self.image().pread(offset, buf)
    }

    fn write(&self, offset: u64, buf: &[u8]) -> Result<()> {
        self.write_with(offset, buf, WriteFlags::default())
    }

    fn write_with(&self, offset: u64, buf: &[u8], flags: WriteFlags) -> Result<()> {
        self.check(offset, buf.len() as u64, BlkdebugIoType::Write)?;
        self.image().pwrite_with(offset, buf, flags)
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<()> {
        self.write_zeroes_with(offset, len, may_unmap, WriteFlags::default())
    }

    fn write_zeroes_with(
        &self,
        offset: u64,
        len: u64,
        may_unmap: bool,
        flags: WriteFlags,
    ) -> Result<()> {
        self.check(offset, len, BlkdebugIoType::WriteZeroes)?;
        self.image()
            .pwrite_zeroes_with(offset, len, may_unmap, flags)
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.check(offset, len, BlkdebugIoType::Discard)?;
        self.image().pdiscard(offset, len)
    }

    fn can_grow(&self) -> bool {
        self.image().driver().can_grow()
    }

    fn can_discard(&self) -> bool {
        self.image().driver().can_discard()
    }

    fn flush(&self) -> Result<()> {
        self.check(0, 0, BlkdebugIoType::Flush)?;
        self.image().flush()
    }

    fn start_writeback(&self, offset: u64, len: u64) {
        // Not a request of its own (no rule can match it): passed down.
        self.image().start_writeback(offset, len)
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus> {
        self.check(offset, len, BlkdebugIoType::BlockStatus)?;
        self.image().block_status(offset, len)
    }

    fn children(&self) -> Vec<NodeChild> {
        vec![NodeChild {
            role: "image",
            node: self.image(),
        }]
    }

    fn filtered_child(&self) -> Option<Arc<Node>> {
        // QEMU's blkdebug is a filter: what it shows is its image's data.
        Some(self.image())
    }

    fn replace_child(&self, old: &Arc<Node>, new: &Arc<Node>) {
        self.image.replace(old, new)
    }

    fn debug_event(&self, event: BlkdebugEvent) {
        let mut r = self.lock();
        let state = r.state;
        let mut new_state = state;
        let mut armed_now: Vec<u64> = Vec::new();
        for rule in r.rules.iter().filter(|x| x.event == event) {
            if rule.state != 0 && rule.state != state {
                continue;
            }
            match &rule.action {
                Action::Inject(_) => armed_now.insert(0, rule.id),
                Action::SetState(s) => new_state = s.new_state,
            }
        }
        if !armed_now.is_empty() {
            r.armed = armed_now;
        }
        r.state = new_state;
    }

    fn cluster_size(&self) -> Option<u64> {
        self.image().cluster_size()
    }

    fn filename(&self) -> String {
        let image = self.image().filename();
        if self.plain && !image.is_empty() && !image.starts_with("json:") {
            format!("blkdebug::{image}")
        } else {
            // QEMU shows `json:{...}` with its options in hash order; we
            // show the image's name.
            image
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::null::NullDriver;

    fn null() -> Arc<Node> {
        Node::new(
            "img".into(),
            false,
            false,
            Box::new(NullDriver {
                name: "null-co",
                size: 4 << 20,
                latency: Default::default(),
                read_zeroes: true,
            }),
        )
    }

    fn rule(event: BlkdebugEvent) -> InjectError {
        InjectError {
            event,
            state: 0,
            iotype: None,
            errno: 5,
            offset: None,
            once: false,
            immediately: false,
        }
    }

    fn rd(d: &BlkdebugDriver, off: u64, len: usize) -> bool {
        d.debug_event(BlkdebugEvent::ReadAio);
        d.read(off, &mut vec![0; len]).is_ok()
    }

    fn wr(d: &BlkdebugDriver, off: u64, len: usize) -> bool {
        d.debug_event(BlkdebugEvent::WriteAio);
        d.write(off, &vec![0; len]).is_ok()
    }

    /// The sequences below were recorded with qemu-io 10 (raw over blkdebug).
    #[test]
    fn persistent_read_rule_stays_armed_for_the_next_write() {
        let d = BlkdebugDriver::new(null(), vec![rule(BlkdebugEvent::ReadAio)], vec![]);
        assert!(wr(&d, 0, 4096));
        assert!(!rd(&d, 0, 4096));
        assert!(!wr(&d, 0, 4096));
    }

    #[test]
    fn once_rule_fires_once() {
        let mut r = rule(BlkdebugEvent::ReadAio);
        r.once = true;
        let d = BlkdebugDriver::new(null(), vec![r], vec![]);
        assert!(wr(&d, 0, 4096));
        assert!(!rd(&d, 0, 4096));
        assert!(wr(&d, 0, 4096));
        assert!(rd(&d, 0, 4096));
    }

    #[test]
    fn sector_must_be_covered_and_once_survives_misses() {
        let mut r = rule(BlkdebugEvent::ReadAio);
        r.offset = Some(2048 * 512);
        r.once = true;
        let d = BlkdebugDriver::new(null(), vec![r], vec![]);
        assert!(rd(&d, 0, 4096));
        assert!(rd(&d, 1020 << 10, 4096)); // ends exactly at 1 MiB
        assert!(!rd(&d, 1020 << 10, 8192)); // spans it
        assert!(rd(&d, 1 << 20, 4096)); // used up
    }

    #[test]
    fn iotype_can_differ_from_event() {
        let mut r = rule(BlkdebugEvent::ReadAio);
        r.iotype = Some(BlkdebugIoType::Write);
        let d = BlkdebugDriver::new(null(), vec![r], vec![]);
        assert!(rd(&d, 0, 4096));
        assert!(!wr(&d, 0, 4096));
        assert!(!wr(&d, 0, 4096));
        assert!(rd(&d, 0, 4096));
    }

    #[test]
    fn errno_zero_or_negative_injects_nothing() {
        let mut r = rule(BlkdebugEvent::ReadAio);
        r.errno = 0;
        let mut r2 = rule(BlkdebugEvent::ReadAio);
        r2.errno = -5;
        assert!(rd(&BlkdebugDriver::new(null(), vec![r], vec![]), 0, 512));
        assert!(rd(&BlkdebugDriver::new(null(), vec![r2], vec![]), 0, 512));
    }

    #[test]
    fn none_arms_at_open_and_enospc_is_reported() {
        let mut r = rule(BlkdebugEvent::None);
        r.errno = 28;
        r.once = true;
        let d = BlkdebugDriver::new(null(), vec![r], vec![]);
        let e = d.read(0, &mut [0; 512]).unwrap_err();
        assert_eq!(e.errno(), Some(libc::ENOSPC));
        assert_eq!(e.message(), "No space left on device");
        assert!(d.read(0, &mut [0; 512]).is_ok());
    }

    #[test]
    fn state_machine() {
        let mut r = rule(BlkdebugEvent::ReadAio);
        r.state = 2;
        let s = SetState {
            event: BlkdebugEvent::ReadAio,
            state: 1,
            new_state: 2,
        };
        let d = BlkdebugDriver::new(null(), vec![r], vec![s]);
        assert!(rd(&d, 0, 512));
        assert!(!rd(&d, 0, 512));
        assert!(!rd(&d, 0, 512));
    }

    #[test]
    fn block_status_only_with_explicit_iotype() {
        let d = BlkdebugDriver::new(null(), vec![rule(BlkdebugEvent::None)], vec![]);
        assert!(d.block_status(0, 512).is_ok());
        let mut r = rule(BlkdebugEvent::None);
        r.iotype = Some(BlkdebugIoType::BlockStatus);
        let d = BlkdebugDriver::new(null(), vec![r], vec![]);
        assert!(d.block_status(0, 512).is_err());
        assert!(d.read(0, &mut [0; 512]).is_ok());
    }
}
