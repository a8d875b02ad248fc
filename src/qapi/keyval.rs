//! QEMU's keyval syntax (`util/keyval.c`), the text form of QAPI objects
//! on command lines (`--blockdev driver=file,filename=a.img`,
//! `--monitor m,pretty=on`): `key=value` pairs, `,,` for a comma, dotted
//! keys for nested objects, numeric fragments for lists, and a first pair
//! that may omit its key. Values are strings; [`parse_bool`] and
//! [`parse_int`] are QEMU's conversions for members the schema types.

use serde_json::{Map, Value};

/// QEMU's `keyval_parse`: `key=value,...` into nested objects of strings
/// (lists where every key of an object is a number). `implied` is the key
/// of a first pair given without `key=`.
pub fn keyval_parse(s: &str, implied: Option<&str>) -> Result<Map<String, Value>, String> {
    let b = s.as_bytes();
    let mut root = Map::new();
    let mut i = 0;
    let mut first = true;
    while i < b.len() {
        let start = i;
        let mut j = i;
        while j < b.len() && b[j] != b'=' && b[j] != b',' {
            j += 1;
        }
        let key = if j < b.len() && b[j] == b'=' {
            i = j + 1;
            s[start..j].to_string()
        } else if first && j > start && implied.is_some() {
            // The value starts right here (QEMU's val-no-key).
            implied.unwrap_or_default().to_string()
        } else {
            return Err(format!("Expected '=' after parameter '{}'", &s[start..j]));
        };
        first = false;
        if key.split('.').any(|f| f.is_empty() || f.len() > 127) {
            return Err(format!("Invalid parameter '{key}'"));
        }
        let mut val = Vec::new();
        while i < b.len() {
            if b[i] == b',' {
                if b.get(i + 1) == Some(&b',') {
                    val.push(b',');
                    i += 2;
                    continue;
                }
                i += 1;
                break;
            }
            val.push(b[i]);
            i += 1;
        }
        // Only ASCII commas were removed: still UTF-8.
        let val = String::from_utf8(val).map_err(|_| "Invalid UTF-8".to_string())?;
        insert(&mut root, &key, val)?;
    }
    let mut out = Map::new();
    for (k, v) in root {
        let v = listify(v, &k)?;
        out.insert(k, v);
    }
    Ok(out)
}

fn insert(root: &mut Map<String, Value>, key: &str, val: String) -> Result<(), String> {
    let frags: Vec<&str> = key.split('.').collect();
    let (last, inner) = frags.split_last().expect("split yields one fragment");
    let mut cur = root;
    for (n, f) in inner.iter().enumerate() {
        let entry = cur
            .entry(f.to_string())
            .or_insert_with(|| Value::Object(Map::new()));
        cur = match entry {
            Value::Object(m) => m,
            _ => {
                return Err(format!(
                    "Parameters '{}.*' used inconsistently",
                    frags[..=n].join(".")
                ));
            }
        };
    }
    if let Some(Value::Object(_)) = cur.get(*last) {
        return Err(format!("Parameters '{key}.*' used inconsistently"));
    }
    // A repeated key: the last value wins, as in QEMU.
    cur.insert(last.to_string(), Value::String(val));
    Ok(())
}

fn index_of(k: &str) -> Option<usize> {
    if k.is_empty() || !k.bytes().all(|c| c.is_ascii_digit()) {
        return None;
    }
    k.parse().ok().filter(|&n: &usize| n <= i32::MAX as usize)
}

/// QEMU's `keyval_listify`: objects whose keys are all numbers become lists.
fn listify(v: Value, path: &str) -> Result<Value, String> {
    let Value::Object(m) = v else { return Ok(v) };
    let numbered = m.keys().filter(|k| index_of(k).is_some()).count();
    if numbered != 0 && numbered != m.len() {
        return Err(format!("Parameters '{path}.*' used inconsistently"));
    }
    let mut children = Vec::with_capacity(m.len());
    for (k, c) in m {
        let c = listify(c, &format!("{path}.{k}"))?;
        children.push((k, c));
    }
    if numbered == 0 {
        return Ok(Value::Object(children.into_iter().collect()));
    }
    let mut slots: Vec<Option<Value>> = vec![None; children.len()];
    for (k, c) in children {
        let n = index_of(&k).unwrap_or(usize::MAX);
        match slots.get_mut(n) {
            Some(slot @ None) => *slot = Some(c),
            _ => {
                // Past the end (a gap) or a duplicate ("0" and "00").
                let missing = slots.iter().position(Option::is_none).unwrap_or(0);
                return Err(format!("Parameter '{path}.{missing}' missing"));
            }
        }
    }
    Ok(Value::Array(
        slots.into_iter().map(Option::unwrap_or_default).collect(),
    ))
}

/// QEMU's `qapi_bool_parse`.
pub fn parse_bool(s: &str) -> Option<bool> {
    match s {
        "on" | "yes" | "true" | "y" => Some(true),
        "off" | "no" | "false" | "n" => Some(false),
        _ => None,
    }
}

/// QEMU's `qemu_strtoi64(s, NULL, 0, …)`: leading blanks, a sign, `0x`
/// hex or `0` octal, the whole string.
pub fn parse_int(s: &str) -> Option<i64> {
    let t = s.trim_start_matches([' ', '\t', '\n', '\r', '\x0b', '\x0c']);
    let (neg, t) = match t.as_bytes().first() {
        Some(b'-') => (true, &t[1..]),
        Some(b'+') => (false, &t[1..]),
        _ => (false, t),
    };
    let (radix, digits) = if let Some(h) = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        (16, h)
    } else if t.len() > 1 && t.starts_with('0') {
        (8, &t[1..])
    } else {
        (10, t)
    };
    if digits.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
        return None;
    }
    let mag = u64::from_str_radix(digits, radix).ok()?;
    if neg {
        0i64.checked_sub_unsigned(mag)
    } else {
        i64::try_from(mag).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integers_like_strtoi64() {
        assert_eq!(parse_int("010"), Some(8));
        assert_eq!(parse_int(" +5"), Some(5));
        assert_eq!(parse_int("-0x10"), Some(-16));
        assert_eq!(parse_int("5 "), None);
        assert_eq!(parse_int("1e3"), None);
        assert_eq!(parse_int(""), None);
        assert_eq!(parse_int("-9223372036854775808"), Some(i64::MIN));
        assert_eq!(parse_int("9223372036854775808"), None);
    }

    #[test]
    fn keyval_nesting_lists_and_errors() {
        let v = keyval_parse("a,b.c=1,l.0=x,l.1=y,e=,,", Some("k")).unwrap();
        assert_eq!(
            Value::Object(v),
            serde_json::json!({"k": "a", "b": {"c": "1"}, "l": ["x", "y"], "e": ","})
        );
        assert_eq!(
            keyval_parse("a", None).unwrap_err(),
            "Expected '=' after parameter 'a'"
        );
        assert_eq!(
            keyval_parse("x.=1", None).unwrap_err(),
            "Invalid parameter 'x.'"
        );
        assert_eq!(
            keyval_parse("l.1=y", None).unwrap_err(),
            "Parameter 'l.0' missing"
        );
        assert_eq!(parse_bool("yes"), Some(true));
        assert_eq!(parse_bool("n"), Some(false));
        assert_eq!(parse_bool("1"), None);
    }
}
