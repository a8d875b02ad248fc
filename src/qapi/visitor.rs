//! QEMU's QAPI input visitor over a JSON object, as far as our commands
//! and blockdev-add need it: members read by name in the schema's order,
//! QEMU's texts for a missing member, a member of the wrong type and a
//! member nobody asked for (`Parameter 'x' is missing`, `Invalid parameter
//! type for 'x', expected: integer`, `Parameter 'x' is unexpected`), with
//! the dotted path of nested members.

use std::collections::BTreeSet;

use serde_json::{Map, Value};

use crate::error::{Error, Result};

/// A JSON object being visited: tracks the member path for messages and
/// which members were consumed, so leftovers are "unexpected".
pub(crate) struct Obj<'a> {
    map: &'a Map<String, Value>,
    prefix: String,
    used: BTreeSet<&'a str>,
}

pub(crate) fn type_err(name: &str, expected: &str) -> Error {
    Error::generic(format!(
        "Invalid parameter type for '{name}', expected: {expected}"
    ))
}

impl<'a> Obj<'a> {
    pub(crate) fn new(v: &'a Value, name: &str) -> Result<Self> {
        match v {
            Value::Object(map) => Ok(Obj {
                map,
                prefix: if name.is_empty() {
                    String::new()
                } else {
                    format!("{name}.")
                },
                used: BTreeSet::new(),
            }),
            _ => Err(type_err(
                if name.is_empty() { "null" } else { name },
                "object",
            )),
        }
    }

    pub(crate) fn name(&self, key: &str) -> String {
        format!("{}{}", self.prefix, key)
    }

    pub(crate) fn get(&mut self, key: &'a str) -> Option<&'a Value> {
        let v = self.map.get(key);
        if v.is_some() {
            self.used.insert(key);
        }
        v
    }

    pub(crate) fn missing(&self, key: &str) -> Error {
        Error::generic(format!("Parameter '{}' is missing", self.name(key)))
    }

    pub(crate) fn opt_str(&mut self, key: &'a str) -> Result<Option<String>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(type_err(&self.name(key), "string")),
        }
    }

    pub(crate) fn req_str(&mut self, key: &'a str) -> Result<String> {
        self.opt_str(key)?.ok_or_else(|| self.missing(key))
    }

    pub(crate) fn opt_bool(&mut self, key: &'a str) -> Result<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(_) => Err(type_err(&self.name(key), "boolean")),
        }
    }

    pub(crate) fn opt_int(&mut self, key: &'a str) -> Result<Option<i64>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Number(n)) => n
                .as_i64()
                .map(Some)
                .ok_or_else(|| type_err(&self.name(key), "integer")),
            Some(_) => Err(type_err(&self.name(key), "integer")),
        }
    }

    pub(crate) fn req_int(&mut self, key: &'a str) -> Result<i64> {
        self.opt_int(key)?.ok_or_else(|| self.missing(key))
    }

    /// QEMU reports a bad enum value with the bare member name.
    pub(crate) fn opt_enum(&mut self, key: &'a str, allowed: &[&str]) -> Result<Option<String>> {
        match self.opt_str(key)? {
            None => Ok(None),
            Some(s) if allowed.contains(&s.as_str()) => Ok(Some(s)),
            Some(s) => Err(Error::generic(format!(
                "Parameter '{key}' does not accept value '{s}'"
            ))),
        }
    }

    /// An optional `uint32` member (QEMU's visitor: a number, else
    /// `Parameter 'x' expects uint64`; out of range: `... expects
    /// uint32_t`, negative numbers included, taken as uint64 first).
    pub(crate) fn opt_u32(&mut self, key: &'a str) -> Result<Option<u32>> {
        let name = self.name(key);
        match self.get(key) {
            None => Ok(None),
            Some(Value::Number(n)) if n.is_u64() || n.is_i64() => n
                .as_u64()
                .and_then(|v| u32::try_from(v).ok())
                .map(Some)
                .ok_or_else(|| Error::generic(format!("Parameter '{name}' expects uint32_t"))),
            Some(_) => Err(Error::generic(format!("Parameter '{name}' expects uint64"))),
        }
    }

    /// An optional `uint16` member. QEMU's texts: not a number, `Parameter
    /// 'a.b.x' expects uint64` (the full path); out of range, negative
    /// numbers included, `Parameter 'x' expects uint16_t` (the member's
    /// own name: `visit_type_uintN` words it).
    pub(crate) fn opt_u16(&mut self, key: &'a str) -> Result<Option<u16>> {
        let name = self.name(key);
        match self.get(key) {
            None => Ok(None),
            Some(Value::Number(n)) if n.is_u64() || n.is_i64() => n
                .as_u64()
                .and_then(|v| u16::try_from(v).ok())
                .map(Some)
                .ok_or_else(|| Error::generic(format!("Parameter '{key}' expects uint16_t"))),
            Some(_) => Err(Error::generic(format!("Parameter '{name}' expects uint64"))),
        }
    }

    /// An optional `uint64` or `size` member.
    pub(crate) fn opt_u64(&mut self, key: &'a str) -> Result<Option<u64>> {
        let name = self.name(key);
        match self.get(key) {
            None => Ok(None),
            Some(Value::Number(n)) if n.is_u64() => Ok(n.as_u64()),
            Some(_) => Err(type_err(&name, "uint64")),
        }
    }

    pub(crate) fn opt_list(&mut self, key: &'a str) -> Result<Option<&'a Vec<Value>>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Array(a)) => Ok(Some(a)),
            Some(_) => Err(type_err(&self.name(key), "array")),
        }
    }

    pub(crate) fn opt_obj(&mut self, key: &'a str) -> Result<Option<Obj<'a>>> {
        let name = self.name(key);
        match self.get(key) {
            None => Ok(None),
            Some(v @ Value::Object(_)) => Ok(Some(Obj::new(v, &name)?)),
            Some(_) => Err(type_err(&name, "object")),
        }
    }

    /// QEMU's `visit_check_struct`: members nobody asked for.
    pub(crate) fn finish(self) -> Result<()> {
        self.finish_ref()
    }

    /// [`Self::finish`] without giving the visitor up.
    pub(crate) fn finish_ref(&self) -> Result<()> {
        match self.map.keys().find(|k| !self.used.contains(k.as_str())) {
            Some(k) => Err(Error::generic(format!(
                "Parameter '{}' is unexpected",
                self.name(k)
            ))),
            None => Ok(()),
        }
    }
}
