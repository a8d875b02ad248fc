//! QEMU's JSON writer (`qobject/json-writer.c`) as a serde_json
//! formatter: `", "` and `": "` between members, or with `pretty` a new
//! line (`\r\n`, as QEMU's monitor sends it) and four spaces per level,
//! also inside empty objects and arrays; strings with every character
//! outside printable ASCII as `\uXXXX` (upper-case hex, surrogate pairs
//! beyond the BMP). Monitors write replies and events with it, and QEMU's
//! `json:{…}` node file names use its compact form.

use std::io;

use serde::Serialize;
use serde_json::ser::{CharEscape, Formatter};

/// The formatter; `pretty` as a monitor's `pretty=on`.
#[derive(Debug, Clone, Copy, Default)]
pub struct QemuFormatter {
    pretty: bool,
    level: usize,
}

impl QemuFormatter {
    /// A formatter for compact (`pretty` false) or indented output.
    pub fn new(pretty: bool) -> Self {
        QemuFormatter { pretty, level: 0 }
    }

    fn newline<W: ?Sized + io::Write>(&self, w: &mut W) -> io::Result<()> {
        if self.pretty {
            w.write_all(b"\r\n")?;
            for _ in 0..self.level {
                w.write_all(b"    ")?;
            }
        }
        Ok(())
    }

    fn open<W: ?Sized + io::Write>(&mut self, w: &mut W, c: &[u8]) -> io::Result<()> {
        self.level += 1;
        w.write_all(c)
    }

    fn close<W: ?Sized + io::Write>(&mut self, w: &mut W, c: &[u8]) -> io::Result<()> {
        self.level -= 1;
        self.newline(w)?;
        w.write_all(c)
    }

    fn member<W: ?Sized + io::Write>(&mut self, w: &mut W, first: bool) -> io::Result<()> {
        if !first {
            w.write_all(if self.pretty { b"," } else { b", " })?;
        }
        self.newline(w)
    }
}

impl Formatter for QemuFormatter {
    fn begin_object<W: ?Sized + io::Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.open(w, b"{")
    }

    fn end_object<W: ?Sized + io::Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.close(w, b"}")
    }

    fn begin_object_key<W: ?Sized + io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> io::Result<()> {
        self.member(w, first)
    }

    fn begin_object_value<W: ?Sized + io::Write>(&mut self, w: &mut W) -> io::Result<()> {
        w.write_all(b": ")
    }

    fn begin_array<W: ?Sized + io::Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.open(w, b"[")
    }

    fn end_array<W: ?Sized + io::Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.close(w, b"]")
    }

    fn begin_array_value<W: ?Sized + io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> io::Result<()> {
        self.member(w, first)
    }

    fn write_string_fragment<W: ?Sized + io::Write>(
        &mut self,
        w: &mut W,
        fragment: &str,
    ) -> io::Result<()> {
        for c in fragment.chars() {
            if (' '..='~').contains(&c) {
                w.write_all(&[c as u8])?;
            } else {
                let mut units = [0u16; 2];
                for u in c.encode_utf16(&mut units) {
                    write!(w, "\\u{u:04X}")?;
                }
            }
        }
        Ok(())
    }

    fn write_char_escape<W: ?Sized + io::Write>(
        &mut self,
        w: &mut W,
        escape: CharEscape,
    ) -> io::Result<()> {
        match escape {
            CharEscape::Quote => w.write_all(b"\\\""),
            CharEscape::ReverseSolidus => w.write_all(b"\\\\"),
            CharEscape::Solidus => w.write_all(b"/"),
            CharEscape::Backspace => w.write_all(b"\\b"),
            CharEscape::FormFeed => w.write_all(b"\\f"),
            CharEscape::LineFeed => w.write_all(b"\\n"),
            CharEscape::CarriageReturn => w.write_all(b"\\r"),
            CharEscape::Tab => w.write_all(b"\\t"),
            CharEscape::AsciiControl(b) => write!(w, "\\u{b:04X}"),
        }
    }
}

/// `v` as QEMU writes it, compact or pretty.
pub fn write(v: &impl Serialize, pretty: bool) -> String {
    let mut out = Vec::new();
    let mut ser = serde_json::Serializer::with_formatter(&mut out, QemuFormatter::new(pretty));
    // Serialising a JSON value into memory cannot fail, and the formatter
    // writes only ASCII.
    if v.serialize(&mut ser).is_err() {
        return String::new();
    }
    String::from_utf8(out).unwrap_or_default()
}

/// `v` in QEMU's compact form.
pub fn to_string(v: &impl Serialize) -> String {
    write(v, false)
}

#[cfg(test)]
mod tests {
    use super::write;
    use serde_json::json;

    #[test]
    fn qemu_json_text() {
        assert_eq!(
            write(&json!({"return": {}, "id": [1, "é"]}), false),
            r#"{"return": {}, "id": [1, "\u00E9"]}"#
        );
        assert_eq!(
            write(&json!({"return": {}}), true),
            "{\r\n    \"return\": {\r\n    }\r\n}"
        );
        assert_eq!(
            write(&json!({"a": {"b": [1, 2]}, "c": []}), true),
            "{\r\n    \"a\": {\r\n        \"b\": [\r\n            1,\r\n            2\r\n        ]\r\n    },\r\n    \"c\": [\r\n    ]\r\n}"
        );
        assert_eq!(write(&json!("\u{1F600}"), false), r#""\uD83D\uDE00""#);
        assert_eq!(
            write(&json!("a\"\\/\u{8}\u{c}\n\r\t\u{1}"), false),
            r#""a\"\\/\b\f\n\r\t\u0001""#
        );
        assert_eq!(write(&json!([]), false), "[]");
        assert_eq!(
            write(&json!({"x": null, "y": 1.5, "z": true}), false),
            r#"{"x": null, "y": 1.5, "z": true}"#
        );
    }
}
