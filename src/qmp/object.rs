//! `object-add` / `object-del` and qemu-storage-daemon's `--object`:
//! QEMU 10's flat `ObjectOptions` (`qom-type`, `id`, then the type's
//! members in its schema's order), visited as QEMU's QAPI visitor does,
//! into the context's [`Objects`](crate::nbd::objects::Objects).
//! Only `tls-creds-x509` is known; any other `qom-type` is refused as a
//! value the enum does not have.

use std::sync::Arc;

use serde_json::Value;

use crate::context::Context;
use crate::error::{Error, Result};
use crate::nbd::objects::UserObject;
use crate::nbd::tls_creds::{Endpoint, TlsCreds, TlsCredsOptions};
use crate::qapi::ids::id_wellformed;
use crate::qapi::keyval::{keyval_parse, parse_bool};
use crate::qapi::visitor::Obj;

/// Reads a boolean member: JSON `true`/`false` from QMP, `on`/`off`
/// (QEMU's `qapi_bool_parse` words) from a command line.
fn opt_bool(o: &mut Obj<'_>, key: &'static str, keyval: bool) -> Result<Option<bool>> {
    if !keyval {
        return o.opt_bool(key);
    }
    match o.opt_str(key)? {
        None => Ok(None),
        Some(s) => parse_bool(&s).map(Some).ok_or_else(|| {
            Error::generic(format!("Parameter '{}' expects 'on' or 'off'", o.name(key)))
        }),
    }
}

/// `object-add` with QMP arguments (`keyval`: the values are the strings
/// of a command line).
pub fn object_add(ctx: &Context, args: &Value, keyval: bool) -> Result<()> {
    let mut o = Obj::new(args, "")?;
    let qom_type = o.req_str("qom-type")?;
    if qom_type != "tls-creds-x509" {
        return Err(Error::generic(format!(
            "Parameter 'qom-type' does not accept value '{qom_type}'"
        )));
    }
    let id = o.req_str("id")?;
    if !id_wellformed(&id) {
        return Err(Error::generic("Parameter 'id' expects an identifier"));
    }
    // TlsCredsProperties, then TlsCredsX509Properties, in schema order.
    let mut opts = TlsCredsOptions::new(id.clone());
    if let Some(v) = opt_bool(&mut o, "verify-peer", keyval)? {
        opts.verify_peer = v;
    }
    opts.dir = o.opt_str("dir")?.map(Into::into);
    if let Some(e) = o.opt_str("endpoint")? {
        opts.endpoint = Endpoint::from_wire(&e).ok_or_else(|| {
            Error::generic(format!("Parameter 'endpoint' does not accept value '{e}'"))
        })?;
    }
    opts.priority = o.opt_str("priority")?;
    if let Some(v) = opt_bool(&mut o, "sanity-check", keyval)? {
        opts.sanity_check = v;
    }
    let passwordid = o.opt_str("passwordid")?;
    o.finish()?;
    ctx.objects().add_with(&id, || {
        if opts.dir.is_none() {
            return Err(Error::generic("Missing 'dir' property value"));
        }
        // There are no `secret` objects, so an encrypted key's password
        // can never be found (QEMU's text for an unknown secret).
        if let Some(p) = passwordid {
            return Err(Error::generic(format!("No secret with id '{p}'")));
        }
        Ok(UserObject::TlsCredsX509(Arc::new(TlsCreds::load(opts)?)))
    })
}

/// `object-del`.
pub fn object_del(ctx: &Context, args: &Value) -> Result<()> {
    let mut o = Obj::new(args, "")?;
    let id = o.req_str("id")?;
    o.finish()?;
    ctx.objects().del(&id)
}

/// qemu-storage-daemon's `--object`: JSON when it starts with `{`, else
/// keyval with `qom-type` implied for the first value
/// (`tls-creds-x509,id=tls0,dir=/etc/pki/qemu,endpoint=server`).
pub fn object_add_cmdline(ctx: &Context, text: &str) -> Result<()> {
    if text.starts_with('{') {
        let v: Value = serde_json::from_str(text).map_err(|e| Error::generic(e.to_string()))?;
        return object_add(ctx, &v, false);
    }
    let map = keyval_parse(text, Some("qom-type")).map_err(Error::generic)?;
    object_add(ctx, &Value::Object(map), true)
}
