//! User-creatable objects: QEMU's `/objects` container, which `object-add`,
//! `object-del` and `--object` fill and which block drivers and exports
//! look ids up in (`tls-creds=tls0`). Only `tls-creds-x509` exists here,
//! and only NBD uses it, so the registry lives beside it; the [`Graph`]
//! holds one (so block-layer open code reaches it without the context)
//! and the context hands out the same one.
//!
//! Objects are `Arc`s: deleting one only unlinks it, and connections that
//! hold it keep it, which is QEMU's reference counting (QEMU's
//! `object-del` of credentials an NBD server uses succeeds).
//!
//! [`Graph`]: ../../block/graph/struct.Graph.html

use std::collections::BTreeMap;
use std::sync::Arc;

use super::tls_creds::{Endpoint, TlsCreds};
use crate::error::{Error, Result};
use crate::locks::Mutex;

/// One user-created object.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum UserObject {
    /// `tls-creds-x509`.
    TlsCredsX509(Arc<TlsCreds>),
}

impl UserObject {
    /// QOM's type name.
    pub fn qom_type(&self) -> &'static str {
        match self {
            UserObject::TlsCredsX509(_) => "tls-creds-x509",
        }
    }
}

/// The `/objects` container of one context.
#[derive(Debug, Default)]
pub struct Objects {
    map: Mutex<BTreeMap<String, UserObject>>,
}

impl Objects {
    /// An empty container.
    pub fn new() -> Objects {
        Objects::default()
    }

    /// Adds the object `make` builds under `id`. As in QEMU, the id is
    /// claimed before the object is completed (so a duplicate id is
    /// reported before, say, a missing file), and nothing is added if
    /// `make` fails.
    pub fn add_with(&self, id: &str, make: impl FnOnce() -> Result<UserObject>) -> Result<()> {
        // Held across `make` (which reads a few small files) so that two
        // monitors adding the same id cannot both succeed.
        let mut map = self.map.lock();
        if map.contains_key(id) {
            return Err(Error::generic(format!(
                "attempt to add duplicate property '{id}' to object (type 'container')"
            )));
        }
        let obj = make()?;
        map.insert(id.to_string(), obj);
        Ok(())
    }

    /// `object-del`: unlinks the object; its users keep their reference.
    pub fn del(&self, id: &str) -> Result<()> {
        match self.map.lock().remove(id) {
            Some(_) => Ok(()),
            None => Err(Error::generic(format!("object '{id}' not found"))),
        }
    }

    /// The object with this id.
    pub fn get(&self, id: &str) -> Option<UserObject> {
        self.map.lock().get(id).cloned()
    }

    /// Every id, sorted.
    pub fn ids(&self) -> Vec<String> {
        self.map.lock().keys().cloned().collect()
    }

    /// The TLS credentials `id` for an `endpoint`, with QEMU's texts
    /// (`No TLS credentials with id 'x'`, `Expected TLS credentials for a
    /// client endpoint`): what an NBD client's `tls-creds` and an NBD
    /// server's `tls-creds` resolve through.
    pub fn tls_creds(&self, id: &str, endpoint: Endpoint) -> Result<Arc<TlsCreds>> {
        let creds = match self.get(id) {
            Some(UserObject::TlsCredsX509(c)) => c,
            None => {
                return Err(Error::generic(format!("No TLS credentials with id '{id}'")));
            }
        };
        creds.check_endpoint(endpoint)?;
        Ok(creds)
    }
}
