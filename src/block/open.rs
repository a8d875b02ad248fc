//! Opening nodes from blockdev-add options: a [`NodeSpec`] tree becomes
//! driver instances wrapped in nodes, children first, with QEMU's checks
//! and texts; a qcow2 image without an explicit `backing` opens the chain
//! its header names (implicit, auto-named nodes).

use std::sync::{Arc, Weak};

use super::blkdebug::BlkdebugDriver;
use super::blklogwrites::BlkLogWrites;
use super::copy_before_write::{self, CbwOptions, CopyBeforeWrite, OnCbwError};
use super::file::{FileDriver, FileOptions};
use super::graph::{Graph, GraphInner};
use super::nbd::NbdDriver;
use super::null::{NULL_DEFAULT_SIZE, NullDriver};
use super::options::{BackingSpec, ChildRef, DriverSpec, NodeSpec};
use super::qcow2::Qcow2Driver;
use super::raw::RawDriver;
use super::snapshot_access::SnapshotAccess;
use super::{BlockDriver, Node};
use crate::error::{Error, Result};
use crate::nbd::objects::Objects;

/// Work on a node once it exists.
type AfterOpen = Box<dyn FnOnce(&Arc<Node>)>;

impl Graph {
    pub(super) fn check_names(
        inner: &GraphInner,
        spec: &NodeSpec,
        taken: &mut Vec<String>,
    ) -> Result<()> {
        if let Some(n) = &spec.node_name {
            Self::check_new_name(inner, n, taken)?;
            taken.push(n.clone());
        }
        let children = match &spec.driver {
            DriverSpec::Raw { file, .. } => vec![file],
            DriverSpec::Blkdebug { image, .. } => vec![image],
            DriverSpec::CopyBeforeWrite { file, target, .. } => vec![file, target],
            DriverSpec::SnapshotAccess { file } => vec![file],
            DriverSpec::Blklogwrites { file, log, .. } => vec![file, log],
            DriverSpec::Qcow2 { file, backing } => match backing {
                BackingSpec::Child(b) => vec![file, b],
                BackingSpec::None | BackingSpec::FromHeader => vec![file],
            },
            DriverSpec::File { .. } | DriverSpec::Null { .. } | DriverSpec::Nbd { .. } => vec![],
        };
        for c in children {
            if let ChildRef::New(c) = c {
                Self::check_names(inner, c, taken)?;
            }
        }
        Ok(())
    }

    fn resolve_child(
        &self,
        inner: &mut GraphInner,
        c: &ChildRef,
        parent: Inherit,
        as_backing: bool,
        created: &mut Vec<Arc<Node>>,
    ) -> Result<Arc<Node>> {
        match c {
            // An inline child inherits the parent's discard mode,
            // read-only flag and force-share, as QEMU's children inherit
            // open flags, and the `cache.*` options it does not set
            // itself (QEMU's `bdrv_inherited_options`).
            ChildRef::New(spec) => {
                let mut child = (**spec).clone();
                child.read_only |= parent.read_only;
                child.force_share |= parent.force_share;
                child.cache_direct.get_or_insert(parent.cache_direct);
                child.cache_no_flush.get_or_insert(parent.cache_no_flush);
                self.open_spec(inner, &child, parent.discard, as_backing, created)
            }
            ChildRef::Existing(name) => {
                if let Some(b) = inner
                    .backends
                    .iter()
                    .filter_map(Weak::upgrade)
                    .find(|b| b.name() == name)
                {
                    return Ok(b.node());
                }
                inner
                    .nodes
                    .iter()
                    .find(|e| e.node.name() == name)
                    .map(|e| e.node.clone())
                    .ok_or_else(|| {
                        Error::generic(format!(
                            "Cannot find device='{name}' nor node-name='{name}'"
                        ))
                    })
            }
        }
    }

    pub(super) fn open_spec(
        &self,
        inner: &mut GraphInner,
        spec: &NodeSpec,
        inherited_discard: bool,
        as_backing: bool,
        created: &mut Vec<Arc<Node>>,
    ) -> Result<Arc<Node>> {
        // QEMU opens a backing file read-only unless told otherwise (and
        // reopens it read-write only for a commit into it); our drivers
        // keep a writable fd, so a commit needs no reopen, but the
        // permissions, and so the locks, are those of a read-only node.
        let perm_ro = spec.read_only || as_backing;
        let discard = spec.discard_unmap.unwrap_or(inherited_discard);
        let cache_direct = spec.cache_direct.unwrap_or(false);
        let cache_no_flush = spec.cache_no_flush.unwrap_or(false);
        let inherit = Inherit {
            discard,
            read_only: spec.read_only,
            force_share: spec.force_share,
            cache_direct,
            cache_no_flush,
        };
        if spec.force_share && !spec.read_only {
            return Err(Error::generic(
                "force-share=on can only be used with read-only images",
            ));
        }
        // Where the node goes in `created` (opening order): after its
        // children, unless the driver says otherwise.
        let mut slot = usize::MAX;
        // Work on the new node once it exists (a filter listing its
        // bitmaps on it).
        let mut after: Option<AfterOpen> = None;
        let drv: Box<dyn BlockDriver> = match &spec.driver {
            DriverSpec::File {
                filename,
                locking,
                host_device,
                aio,
            } => Box::new(FileDriver::open(FileOptions {
                filename: filename.clone(),
                locking: *locking,
                host_device: *host_device,
                aio: *aio,
                read_only: spec.read_only,
                discard_unmap: discard,
                direct: cache_direct,
                no_flush: cache_no_flush,
            })?),
            DriverSpec::Null {
                name,
                size,
                latency_ns,
                read_zeroes,
            } => {
                let size = match size {
                    None => NULL_DEFAULT_SIZE,
                    // QEMU aborts the whole process here; we refuse instead.
                    Some(s) if *s < 0 => {
                        return Err(Error::generic(format!(
                            "Value '{s}' is out of range for parameter 'size'"
                        )));
                    }
                    Some(s) => (*s as u64).div_ceil(512) * 512,
                };
                let latency = match latency_ns {
                    None => 0,
                    Some(l) if *l < 0 => return Err(Error::generic("latency-ns is invalid")),
                    Some(l) => *l as u64,
                };
                Box::new(NullDriver {
                    name,
                    size,
                    latency: std::time::Duration::from_nanos(latency),
                    read_zeroes: *read_zeroes,
                })
            }
            DriverSpec::Raw { file, offset, size } => {
                let child = self.resolve_child(inner, file, inherit, false, created)?;
                let offset = match offset {
                    Some(o) if *o < 0 => {
                        return Err(Error::generic("offset cannot be negative"));
                    }
                    o => o.unwrap_or(0) as u64,
                };
                let size = match size {
                    Some(s) if *s < 0 => return Err(Error::generic("size cannot be negative")),
                    s => s.map(|s| s as u64),
                };
                Box::new(RawDriver::new(child, offset, size)?)
            }
            DriverSpec::Qcow2 { file, backing } => {
                let file = self.resolve_child(inner, file, inherit, false, created)?;
                super::perm::lock_for_format(&file, !perm_ro)?;
                // QEMU registers a format node after its file and before its
                // backing chain: this node takes this place in the list.
                slot = created.len();
                let backing = match backing {
                    BackingSpec::None => None,
                    BackingSpec::Child(c) => {
                        Some(self.resolve_child(inner, c, inherit, true, created)?)
                    }
                    BackingSpec::FromHeader => {
                        self.open_header_backing(inner, &file, inherit, created)?
                    }
                };
                Box::new(Qcow2Driver::open(file, !spec.read_only, backing)?)
            }
            DriverSpec::Blkdebug {
                image,
                align,
                inject,
                set_state,
            } => {
                if let Some(a) = align
                    && (*a < 0
                        || (*a != 0 && (*a as u64).count_ones() != 1)
                        || *a >= i32::MAX as i64)
                {
                    return Err(Error::generic(format!(
                        "Cannot meet constraints with align {a}"
                    )));
                }
                let child = self.resolve_child(inner, image, inherit, false, created)?;
                Box::new(
                    BlkdebugDriver::new(child, inject.clone(), set_state.clone())
                        .with_align(*align),
                )
            }
            DriverSpec::CopyBeforeWrite {
                file,
                target,
                bitmap,
                on_cbw_error,
                cbw_timeout,
                min_cluster_size,
            } => {
                let file = self.resolve_child(inner, file, inherit, false, created)?;
                // The target is written: it inherits neither read-only
                // nor force-share.
                let to_target = Inherit {
                    read_only: false,
                    force_share: false,
                    ..inherit
                };
                let target = self.resolve_child(inner, target, to_target, false, created)?;
                let bitmap = match bitmap {
                    None => None,
                    Some((node, name)) => Some(Self::find_bitmap(inner, node, name)?),
                };
                let cluster = copy_before_write::cluster_size(&target, *min_cluster_size)?;
                let (drv, shared) = CopyBeforeWrite::new(CbwOptions {
                    file,
                    target,
                    cluster,
                    max_chunk: 0,
                    on_cbw_error: match on_cbw_error.as_deref() {
                        Some("break-snapshot") => OnCbwError::BreakSnapshot,
                        _ => OnCbwError::BreakGuestWrite,
                    },
                    discard_source: false,
                    bitmap,
                    timeout: (*cbw_timeout > 0)
                        .then(|| std::time::Duration::from_secs(u64::from(*cbw_timeout))),
                })?;
                after = Some(Box::new(move |n| {
                    CopyBeforeWrite::attach_bitmaps(&shared, n)
                }));
                Box::new(drv)
            }
            DriverSpec::SnapshotAccess { file } => {
                let file = self.resolve_child(inner, file, inherit, false, created)?;
                Box::new(SnapshotAccess::new(file))
            }
            DriverSpec::Blklogwrites { file, log, opts } => {
                let file = self.resolve_child(inner, file, inherit, false, created)?;
                let log = self.resolve_child(inner, log, inherit, false, created)?;
                Box::new(BlkLogWrites::open(file, log, opts)?)
            }
            DriverSpec::Nbd { opts, conn } => match conn.take() {
                Some(d) => Box::new(d),
                None => Box::new(NbdDriver::open(opts, spec.read_only, self.objects())?),
            },
        };
        let (name, auto) = match &spec.node_name {
            Some(n) => (n.clone(), false),
            None => (Self::auto_name(inner), true),
        };
        let node = Node::new(name, auto, spec.read_only, drv);
        node.set_write_options(spec.detect_zeroes, discard);
        node.set_force_share(spec.force_share);
        node.set_cache(cache_direct, cache_no_flush);
        node.set_perm_read_only(perm_ro);
        if let Some(f) = after {
            f(&node);
        }
        created.insert(slot.min(created.len()), node.clone());
        Ok(node)
    }

    /// A named dirty bitmap of an existing node (a `copy-before-write`
    /// node's `bitmap`), with QEMU's texts.
    fn find_bitmap(
        inner: &GraphInner,
        node: &str,
        name: &str,
    ) -> Result<Arc<super::dirty_bitmap::BdrvDirtyBitmap>> {
        let n = inner
            .nodes
            .iter()
            .find(|e| e.node.name() == node)
            .map(|e| e.node.clone())
            .ok_or_else(|| Error::generic(format!("Node '{node}' not found")))?;
        n.bitmaps()
            .find(name)
            .ok_or_else(|| Error::generic(format!("Dirty bitmap '{name}' not found")))
    }

    /// Open the backing file a qcow2 header names (QEMU's implicit
    /// backing: auto-named nodes, the name relative to the image's
    /// directory, the format from the header or probed).
    fn open_header_backing(
        &self,
        inner: &mut GraphInner,
        file: &Arc<Node>,
        inherit: Inherit,
        created: &mut Vec<Arc<Node>>,
    ) -> Result<Option<Arc<Node>>> {
        let hdr = super::qcow2::header::read_node_header(file)?;
        let Some(name) = hdr.backing_file else {
            return Ok(None);
        };
        let path = resolve_backing_path(&file.filename(), &name);
        let format = match hdr.backing_format {
            Some(f) => f,
            None => probe_format(&path),
        };
        let driver = match format.as_str() {
            "qcow2" | "raw" => format,
            other => {
                return Err(Error::generic(format!(
                    "Could not open backing file: Unknown driver '{other}'"
                )));
            }
        };
        let file = ChildRef::New(Box::new(implicit_spec(
            DriverSpec::File {
                host_device: super::file::is_block_device(&path),
                filename: path.clone(),
                locking: Default::default(),
                aio: Default::default(),
            },
            inherit,
        )));
        let spec = implicit_spec(
            if driver == "raw" {
                DriverSpec::Raw {
                    file,
                    offset: None,
                    size: None,
                }
            } else {
                DriverSpec::Qcow2 {
                    file,
                    backing: BackingSpec::FromHeader,
                }
            },
            inherit,
        );
        self.open_spec(inner, &spec, false, true, created)
            .map(Some)
            .map_err(|e| e.prepend("Could not open backing file: "))
    }
}

/// Connects the `nbd` nodes of a spec tree ahead of opening it, outside
/// the graph lock (a network wait under a lock that a server in this
/// process also takes could deadlock). `read_only`: the parent's, which an
/// inline child inherits.
pub(super) fn preconnect(spec: &NodeSpec, parent_read_only: bool, objects: &Objects) -> Result<()> {
    let read_only = spec.read_only || parent_read_only;
    let children = match &spec.driver {
        DriverSpec::Nbd { opts, conn } => {
            conn.put(NbdDriver::open(opts, read_only, objects)?);
            return Ok(());
        }
        DriverSpec::Raw { file, .. } | DriverSpec::SnapshotAccess { file } => vec![file],
        DriverSpec::Blkdebug { image, .. } => vec![image],
        DriverSpec::Qcow2 { file, backing } => match backing {
            BackingSpec::Child(b) => vec![file, b],
            BackingSpec::None | BackingSpec::FromHeader => vec![file],
        },
        DriverSpec::CopyBeforeWrite { file, .. } => vec![file],
        DriverSpec::Blklogwrites { file, log, .. } => vec![file, log],
        DriverSpec::File { .. } | DriverSpec::Null { .. } => vec![],
    };
    for c in children {
        if let ChildRef::New(c) = c {
            preconnect(c, read_only, objects)?;
        }
    }
    Ok(())
}

/// A backing file name as QEMU resolves it: absolute as it is, relative
/// to the directory of the image that names it.
pub fn resolve_backing_path(image: &str, backing: &str) -> String {
    let b = std::path::Path::new(backing);
    if b.is_absolute() {
        return backing.to_string();
    }
    match std::path::Path::new(image).parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.join(b).to_string_lossy().into_owned(),
        _ => backing.to_string(),
    }
}

/// qcow2 when the file starts with qcow2's magic, else raw (QEMU probes).
fn probe_format(path: &str) -> String {
    use std::io::Read;
    let mut magic = [0u8; 4];
    let is_qcow2 = std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok()
        && magic == *b"QFI\xfb";
    if is_qcow2 { "qcow2" } else { "raw" }.to_string()
}

/// What a child opened with its parent takes from it: the discard mode,
/// read-only, force-share and the cache options (QEMU's inherited open
/// flags and options).
#[derive(Debug, Clone, Copy)]
pub(super) struct Inherit {
    discard: bool,
    read_only: bool,
    force_share: bool,
    cache_direct: bool,
    cache_no_flush: bool,
}

/// A node opened implicitly (no name, default options but what a backing
/// file takes from its overlay: read-only, force-share, cache).
fn implicit_spec(driver: DriverSpec, from: Inherit) -> NodeSpec {
    NodeSpec {
        node_name: None,
        read_only: from.read_only,
        discard_unmap: None,
        cache_direct: Some(from.cache_direct),
        cache_no_flush: Some(from.cache_no_flush),
        detect_zeroes: Default::default(),
        force_share: from.force_share,
        driver,
    }
}
