//! Block exports (QEMU's `block/export/`): a node served to clients
//! outside the process, here over NBD ([`nbd_server`]). This module is
//! the registry behind `block-export-add`/`-del`, `query-block-exports`
//! and `nbd-server-start`/`-stop`, with QEMU's checks, texts and
//! `BLOCK_EXPORT_DELETED`.
//!
//! An export does its I/O through a guest-style [`BlockBackend`] on its
//! node, so everything a guest device gets applies to its clients' writes:
//! dirty bitmaps and active mirrors see them, copy-before-write copies
//! before them, drains wait for them, a mirror's pivot moves the export
//! to the new node, and `blockdev-del` of the node says `Node X is in
//! use`.
//!
//! Invariants:
//! - An export is in the table (found by clients' `NBD_OPT_GO`) exactly
//!   while it is listed by `query-block-exports`; it leaves the table
//!   before its clients are disconnected, and a connection binds to an
//!   export under the server's connection lock, so after a delete's
//!   sweep no connection can still reach it.
//! - `BLOCK_EXPORT_DELETED` is emitted once per export, after its last
//!   client is gone and its backend dropped.
//! - The NBD server's threads (acceptor, connections, their workers) are
//!   all joined by `nbd-server-stop` and by [`Exports::shutdown`].

mod nbd_aio;
#[doc(hidden)]
pub use nbd_aio::completed_requests;
mod nbd_conn;
pub mod nbd_server;

use std::sync::Arc;

use serde::Serialize;

use crate::block::Node;
use crate::block::backend::{BackendOptions, BlockBackend};
use crate::block::dirty_bitmap::{BdrvDirtyBitmap, BitmapCheck, BitmapRef};
use crate::block::graph::Graph;
use crate::block::perm::Perms;
use crate::error::{Error, Result};
use crate::events::{EventBus, EventData};
use crate::locks::{Mutex, RwLock};
use crate::nbd::proto::{self, tflag};
use crate::nbd::tls_creds::{Endpoint, TlsCreds};
use crate::qapi::ids::id_wellformed;

pub use nbd_server::{NbdServerOptions, TlsHook};

/// TLS for the server from a credentials object.
struct ServerTls(Arc<TlsCreds>);

impl TlsHook for ServerTls {
    fn upgrade(
        &self,
        plain: Box<dyn crate::nbd::transport::Stream>,
    ) -> std::io::Result<Box<dyn crate::nbd::transport::Stream>> {
        crate::nbd::tls::server_upgrade(plain, &self.0)
    }
}

/// `block-export-del`'s `mode` (QAPI `BlockExportRemoveMode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BlockExportRemoveMode {
    /// Refused while clients are connected (`export 'X' still in use`).
    #[default]
    Safe,
    /// Disconnect the clients, then remove.
    Hard,
}

impl BlockExportRemoveMode {
    /// From the QMP string.
    pub fn from_wire(s: &str) -> Option<Self> {
        match s {
            "safe" => Some(Self::Safe),
            "hard" => Some(Self::Hard),
            _ => None,
        }
    }
}

/// `block-export-add` with `type: nbd` (QAPI `BlockExportOptions` +
/// `BlockExportOptionsNbd`).
#[derive(Debug, Clone, Default)]
pub struct BlockExportOptions {
    /// Export id (QEMU's id rules).
    pub id: String,
    /// The node exported.
    pub node_name: String,
    /// Clients may write (default: read-only).
    pub writable: bool,
    /// Every write is flushed before it completes (QEMU: the export's
    /// write cache off).
    pub writethrough: bool,
    /// `fixed-iothread`: accepted, as QEMU accepts it without `iothread`;
    /// we have no iothreads to move to.
    pub fixed_iothread: bool,
    /// `iothread`: we have no iothread objects, so any name is refused
    /// with QEMU's text for an unknown one.
    pub iothread: Option<String>,
    /// The NBD export name (default: the node name).
    pub name: Option<String>,
    /// Shown to `NBD_OPT_LIST` and `NBD_OPT_GO` clients.
    pub description: Option<String>,
    /// Bitmaps offered as `qemu:dirty-bitmap:NAME`.
    pub bitmaps: Vec<BitmapRef>,
    /// Offer `qemu:allocation-depth`.
    pub allocation_depth: bool,
}

/// One entry of `query-block-exports` (QAPI `BlockExportInfo`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BlockExportInfo {
    /// Export id.
    pub id: String,
    /// Always `nbd`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The node the export's backend is attached to now.
    #[serde(rename = "node-name")]
    pub node_name: String,
    /// Being deleted (ours are deleted before the command returns, so
    /// always false).
    #[serde(rename = "shutting-down")]
    pub shutting_down: bool,
}

/// One exported bitmap.
pub(crate) struct ExportBitmap {
    /// Its name (the context is `qemu:dirty-bitmap:` + name).
    pub name: String,
    pub bitmap: Arc<BdrvDirtyBitmap>,
}

/// An NBD export: a backend on the node, its NBD name and what it offers.
pub struct Export {
    pub(crate) id: String,
    pub(crate) name: String,
    pub(crate) description: Option<String>,
    pub(crate) writable: bool,
    pub(crate) writethrough: bool,
    pub(crate) size: u64,
    pub(crate) blk: BlockBackend,
    pub(crate) bitmaps: Vec<ExportBitmap>,
    pub(crate) allocation_depth: bool,
    /// Decided when the export is created, from the server's limit.
    pub(crate) multi_conn: bool,
}

impl std::fmt::Debug for Export {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Export")
            .field("id", &self.id)
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl Export {
    /// The export id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The NBD export name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The transmission flags every client of this export gets (before
    /// the per-connection ones), as QEMU 10's `nbd_export_create` sets
    /// them: multi-conn unless the server takes one client only
    /// (`max-connections=1`; QEMU's `multi-conn=auto`), trim and (fast)
    /// zeroes when writable.
    pub(crate) fn flags(&self) -> u16 {
        let mut f = tflag::HAS_FLAGS | tflag::SEND_FLUSH | tflag::SEND_FUA | tflag::SEND_CACHE;
        if self.writable {
            f |= tflag::SEND_TRIM | tflag::SEND_WRITE_ZEROES | tflag::SEND_FAST_ZERO;
        } else {
            f |= tflag::READ_ONLY;
        }
        if self.multi_conn {
            f |= tflag::CAN_MULTI_CONN;
        }
        f
    }
}

impl Drop for Export {
    fn drop(&mut self) {
        for b in &self.bitmaps {
            b.bitmap.set_busy(false);
        }
    }
}

/// The exports of a context, by insertion (QEMU lists and closes them
/// newest first).
#[derive(Default)]
pub(crate) struct ExportTable {
    list: RwLock<Vec<Arc<Export>>>,
}

impl ExportTable {
    /// The export clients know as `name`.
    pub(crate) fn by_name(&self, name: &str) -> Option<Arc<Export>> {
        self.list.read().iter().find(|e| e.name == name).cloned()
    }

    /// Every export, oldest first (the order `NBD_OPT_LIST` gives).
    pub(crate) fn all(&self) -> Vec<Arc<Export>> {
        self.list.read().clone()
    }
}

struct Inner {
    server: Option<nbd_server::NbdServer>,
}

/// The block exports of one context and its NBD server.
pub struct Exports {
    graph: Arc<Graph>,
    bus: Arc<EventBus>,
    table: Arc<ExportTable>,
    /// Serialises the commands (QEMU: the BQL).
    inner: Mutex<Inner>,
}

impl Exports {
    /// No exports, no server.
    pub fn new(graph: Arc<Graph>, bus: Arc<EventBus>) -> Arc<Exports> {
        Arc::new(Exports {
            graph,
            bus,
            table: Arc::default(),
            inner: Mutex::new(Inner { server: None }),
        })
    }

    /// `nbd-server-start`.
    pub fn nbd_server_start(&self, mut opts: NbdServerOptions) -> Result<()> {
        let mut inner = self.inner.lock();
        if inner.server.is_some() {
            return Err(Error::generic("NBD server already running"));
        }
        // `tls-creds` names a tls-creds-x509 object of this context; the
        // server keeps its own reference (QEMU lets object-del go on).
        if let (Some(id), None) = (&opts.tls_creds, &opts.tls) {
            let creds = self.graph.objects().tls_creds(id, Endpoint::Server)?;
            opts.tls = Some(Arc::new(ServerTls(creds)));
        }
        inner.server = Some(nbd_server::NbdServer::start(opts, self.table.clone())?);
        Ok(())
    }

    /// Whether the NBD server runs.
    pub fn nbd_server_running(&self) -> bool {
        self.inner.lock().server.is_some()
    }

    /// The TCP port the server listens on (for `port: "0"`).
    pub fn nbd_server_port(&self) -> Option<u16> {
        self.inner.lock().server.as_ref().and_then(|s| s.port())
    }

    /// `nbd-server-stop`: every export goes (hard: clients are
    /// disconnected; `BLOCK_EXPORT_DELETED` for each, newest first, as
    /// QEMU), then the server stops and its threads are joined.
    pub fn nbd_server_stop(&self) -> Result<()> {
        let mut inner = self.inner.lock();
        let Some(mut server) = inner.server.take() else {
            return Err(Error::generic("NBD server not running"));
        };
        let ids: Vec<String> = self
            .table
            .all()
            .iter()
            .rev()
            .map(|e| e.id.clone())
            .collect();
        for id in ids {
            let _ = self.delete_locked(&server, &id, BlockExportRemoveMode::Hard, false);
        }
        server.stop();
        Ok(())
    }

    /// `block-export-add` (type `nbd`), QEMU's checks in QEMU's order.
    pub fn block_export_add(&self, o: &BlockExportOptions) -> Result<()> {
        let inner = self.inner.lock();
        if !id_wellformed(&o.id) {
            return Err(Error::generic("Invalid block export id"));
        }
        if self.table.list.read().iter().any(|e| e.id == o.id) {
            return Err(Error::generic(format!(
                "Block export id '{}' is already in use",
                o.id
            )));
        }
        let node = self.graph.lookup_node(&o.node_name)?;
        if let Some(t) = &o.iothread {
            return Err(Error::generic(format!("iothread \"{t}\" not found")));
        }
        if o.writable && node.is_read_only() {
            return Err(Error::generic("Cannot export read-only node as writable"));
        }
        let Some(server) = &inner.server else {
            return Err(Error::generic("NBD server not running"));
        };
        let multi_conn = server.max_connections() != 1;
        let name = o.name.clone().unwrap_or_else(|| o.node_name.clone());
        if name.len() > proto::MAX_STRING {
            return Err(Error::generic(format!("export name '{name}' too long")));
        }
        if let Some(d) = &o.description
            && d.len() > proto::MAX_STRING
        {
            return Err(Error::generic(format!("description '{d}' too long")));
        }
        if self.table.by_name(&name).is_some() {
            return Err(Error::generic(format!(
                "NBD server already has export named '{name}'"
            )));
        }
        let size = node.len()?;
        let mut bitmaps: Vec<ExportBitmap> = Vec::new();
        for r in &o.bitmaps {
            let (bm_name, bm) = self.find_bitmap(&node, r)?;
            bm.check(BitmapCheck::AllowReadonly)?;
            if !o.writable && !node.is_read_only() && bm.is_recording() {
                return Err(Error::generic(format!(
                    "Enabled bitmap '{bm_name}' incompatible with readonly export"
                )));
            }
            if bitmaps.iter().any(|b| Arc::ptr_eq(&b.bitmap, &bm)) {
                continue;
            }
            bitmaps.push(ExportBitmap {
                name: bm_name,
                bitmap: bm,
            });
        }
        let blk = self.graph.blk_new(
            &o.node_name,
            BackendOptions {
                device_errors: false,
                iostatus_enabled: false,
                // QEMU's blk_exp_add + nbd_export_create: read, write if
                // writable; everything shared but resize.
                perms: Some(Perms::nbd_export(o.writable)),
                ..Default::default()
            },
        )?;
        // Busy from here on; the export's drop releases them.
        for b in &bitmaps {
            b.bitmap.set_busy(true);
        }
        let export = Arc::new(Export {
            id: o.id.clone(),
            name,
            description: o.description.clone(),
            writable: o.writable,
            writethrough: o.writethrough,
            size,
            blk,
            bitmaps,
            allocation_depth: o.allocation_depth,
            multi_conn,
        });
        self.table.list.write().push(export);
        Ok(())
    }

    /// QEMU's bitmap lookup for an export: a name is searched on the node
    /// and down its chain (past filters and backing links), a
    /// `{node, name}` on that node.
    fn find_bitmap(
        &self,
        node: &Arc<Node>,
        r: &BitmapRef,
    ) -> Result<(String, Arc<BdrvDirtyBitmap>)> {
        match r {
            BitmapRef::Name(name) => {
                let mut cur = Some(node.clone());
                while let Some(n) = cur {
                    if let Some(b) = n.bitmaps().find(name) {
                        return Ok((name.clone(), b));
                    }
                    cur = n.backing().or_else(|| n.driver().filtered_child());
                }
                Err(Error::generic(format!("Bitmap '{name}' is not found")))
            }
            BitmapRef::Node { node, name } => {
                let n = self.graph.lookup_node(node)?;
                n.bitmaps()
                    .find(name)
                    .map(|b| (name.clone(), b))
                    .ok_or_else(|| Error::generic(format!("Bitmap '{name}' is not found")))
            }
        }
    }

    /// `block-export-del`.
    pub fn block_export_del(&self, id: &str, mode: BlockExportRemoveMode) -> Result<()> {
        let inner = self.inner.lock();
        if !self.table.list.read().iter().any(|e| e.id == id) {
            return Err(Error::generic(format!("Export '{id}' is not found")));
        }
        match &inner.server {
            Some(s) => self.delete_locked(s, id, mode, true),
            // Exports exist only while the server runs.
            None => Err(Error::generic(format!("Export '{id}' is not found"))),
        }
    }

    /// `nbd-server-remove` (deprecated in QEMU): `block-export-del` of the
    /// export clients know as `name`.
    pub fn nbd_server_remove(&self, name: &str, mode: BlockExportRemoveMode) -> Result<()> {
        let id = {
            let _inner = self.inner.lock();
            match self.table.by_name(name) {
                Some(e) => e.id.clone(),
                None => return Err(Error::generic(format!("Export '{name}' is not found"))),
            }
        };
        self.block_export_del(&id, mode)
    }

    /// Removes export `id`; `later`: a hard delete with clients connected
    /// finishes after the command's reply (see below).
    fn delete_locked(
        &self,
        server: &nbd_server::NbdServer,
        id: &str,
        mode: BlockExportRemoveMode,
        later: bool,
    ) -> Result<()> {
        let export = {
            let list = self.table.list.read();
            match list.iter().find(|e| e.id == id) {
                Some(e) => e.clone(),
                None => return Err(Error::generic(format!("Export '{id}' is not found"))),
            }
        };
        if mode == BlockExportRemoveMode::Safe && server.clients_of(&export) > 0 {
            return Err(Error::generic(format!("export '{id}' still in use")));
        }
        self.table.list.write().retain(|e| !Arc::ptr_eq(e, &export));
        if later && server.clients_of(&export) > 0 {
            // QEMU replies first, then its clients go and the event
            // follows (recorded with qemu-storage-daemon; without clients
            // the event comes before the reply, as below).
            server.close_clients_of(&export);
            let (shared, bus, id) = (server.shared(), self.bus.clone(), id.to_string());
            crate::events::after_reply(move || {
                shared.wait_clients_gone(&export);
                drop(export);
                bus.emit(EventData::BlockExportDeleted { id });
            });
            return Ok(());
        }
        server.disconnect_clients_of(&export);
        // The connections are gone and dropped their references: the
        // backend and the bitmaps go now.
        drop(export);
        self.bus
            .emit(EventData::BlockExportDeleted { id: id.to_string() });
        Ok(())
    }

    /// `query-block-exports`, newest first as QEMU lists them.
    pub fn query_block_exports(&self) -> Vec<BlockExportInfo> {
        self.table
            .all()
            .iter()
            .rev()
            .map(|e| BlockExportInfo {
                id: e.id.clone(),
                kind: "nbd".into(),
                node_name: e.blk.node().name().to_string(),
                shutting_down: false,
            })
            .collect()
    }

    /// Stop everything (the context goes away): as `nbd-server-stop`
    /// when the server runs.
    pub fn shutdown(&self) {
        let _ = self.nbd_server_stop();
    }
}
