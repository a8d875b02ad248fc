//! The block layer: nodes that read and write bytes at offsets, the graph
//! they form, and the guest backends on top of them.
//!
//! A [`BlockDriver`] implements one format, protocol or filter (`file`,
//! `raw`, `null-co`, `blkdebug`, `blklogwrites`, `qcow2`, `copy-on-read`, `host`, and the
//! jobs' own filters); a [`Node`] wraps it with what QEMU's generic block
//! layer adds. All I/O is positional and takes `&self`: any number of
//! threads may issue requests on one node at once.
//!
//! Nodes form a graph through their children (`file`, `image`,
//! `backing`); every edge is a [`child::ChildEdge`] that can move, so a
//! filter can be put above any node and taken out again ([`replace`]).
//! The [`graph::Graph`] of a context names the nodes, opens them from
//! blockdev-add options ([`open`]) and drains them ([`drain`]). Besides
//! other nodes, a node's parents are guest backends ([`backend`]) and
//! users the layer knows only as [`parents::NodeUser`] (jobs): this layer
//! never imports the job engine or the jobs.
//!
//! # Locks
//! Taken in this order, never the other way round; no lock is held while
//! a driver does I/O, and none while a user (job) or backend is quiesced:
//! 1. the graph's registry (`Graph::inner`): names, backends, drain-all;
//! 2. a node's parents (`Node::parents`): backends and users, cloned out
//!    before anything is called on them;
//! 3. a backend's gate (`BackendShared::gate`): its quiesce count, requests
//!    in flight and I/O status; and a node's in-flight count
//!    (`Node::in_flight`). Neither is held while the other is taken.
//! 4. a node's bitmap list lock (`NodeBitmaps::lock`): serialises changes
//!    to the list and the `block-dirty-bitmap-*` commands; requests read
//!    the list without it.
//!
//! Edges (`ChildEdge`) and a backend's node pointer are read-write locks
//! held only to clone an `Arc`; they move only inside drained sections. A
//! driver's own locks (qcow2's layer) are taken under the graph's registry
//! lock when it asks a node for its children; a driver never takes a graph
//! or parents lock while holding its own.

#[allow(unsafe_code)]
pub mod aligned;
pub mod backend;
pub mod blkdebug;
#[allow(unsafe_code)]
mod blkdev;
pub mod blklogwrites;
pub mod block_copy;
pub mod chain;
pub mod child;
pub mod copy_before_write;
pub mod copy_on_read;
pub mod copy_range;
mod direct;
pub mod dirty_bitmap;
pub mod drain;
mod driver;
pub mod file;
pub mod graph;
pub mod host;
pub mod nbd;
mod node;
pub mod null;
pub mod open;
pub mod options;
pub mod parents;
pub mod perm;
pub mod qcow2;
pub mod range_lock;
pub mod raw;
pub mod replace;
pub mod resolve;
pub mod snapshot;
pub mod snapshot_access;
#[allow(unsafe_code)]
pub(crate) mod uring;
mod writeback;

pub use blkdebug::BlkdebugEvent;
pub use driver::{BlockDriver, BlockStatus, NodeChild, WriteFlags, write_zero_buffers};
pub use node::Node;
pub use parents::{BlockOp, NodeUser, UserKind};
