//! A monitor's input as QEMU reads it: an incremental JSON lexer, a
//! streamer that cuts the token stream into top-level values, and a
//! parser for each value, with QEMU's recovery, limits and error texts.
//!
//! Behaviour (QEMU 10's `json-lexer.c`, `json-streamer.c`,
//! `json-parser.c`, described in our words):
//! - Each byte is examined once, whatever the read sizes: [`JsonStream::feed`]
//!   keeps the lexer state between calls and never looks back.
//! - Tokens: the six structural characters, strings in double or single
//!   quotes (bytes 0x20..=0xFD, any byte after a backslash in that range),
//!   numbers (JSON's grammar), keywords `[a-z]+`; space, tab, CR and LF
//!   separate them. Any other byte where a token may start or continue is
//!   an error: the token so far with that byte is reported as `JSON parse
//!   error, stray '…'`, and the lexer skips bytes until a structural
//!   character, an ASCII control other than tab, or 0xFE/0xFF (those are
//!   looked at again from the start state). So a run of garbage costs one
//!   error per resynchronisation point, not one per byte.
//! - The streamer counts braces and brackets; a value is complete when
//!   both counts are back to zero or one went negative (a stray closer is
//!   parsed with what came before and fails).
//! - Limits, checked per token before it is kept, each an error that
//!   drops the value so far (the tokens after it start a new value): the
//!   value's token bytes plus the new token's plus one over 64 MiB (`JSON
//!   token size limit exceeded`), more than 2 Mi tokens (`JSON token count
//!   limit exceeded`), open braces + brackets over 1024 (`JSON nesting
//!   depth limit exceeded`). A single token growing past 64 MiB is cut off
//!   by the lexer with the size error. Memory per stream is therefore
//!   bounded by about twice 64 MiB however the input looks.
//! - The parser's texts: `expecting value`, `premature EOI`, `key is not a
//!   string in object`, `missing : in object pair`, `expected separator
//!   in dict`/`list`, `duplicate key`, `invalid keyword 'x'`, `invalid
//!   escape sequence in string`, `\uXXXX is not a valid Unicode
//!   character`, `invalid UTF-8 sequence in string` (QEMU's modified
//!   UTF-8: overlong forms, surrogates and noncharacters are refused,
//!   `C0 80` is U+0000), all after `JSON parse error, `.
//!
//! Difference: a number beyond a double (`1e400`) reads as the largest
//! double of its sign; QEMU reads an infinity, which it then prints as
//! `inf` (not JSON).

use std::collections::VecDeque;

use serde_json::{Map, Number, Value};

/// QEMU's `MAX_TOKEN_SIZE`: bytes of one value's tokens, and of one token.
pub(crate) const MAX_TOKEN_SIZE: usize = 64 << 20;
/// QEMU's `MAX_TOKEN_COUNT`: tokens of one value.
pub(crate) const MAX_TOKEN_COUNT: usize = 2 << 20;
/// QEMU's `MAX_NESTING`: open braces and brackets.
pub(crate) const MAX_NESTING: i64 = 1 << 10;

/// Above this, the buffers are given back after a value (a 64 MiB request
/// must not pin 64 MiB per client for the life of the connection).
const KEEP_CAPACITY: usize = 64 << 10;

/// What a complete piece of input gave: a value, or the text of its
/// error (QEMU's, `GenericError` class).
pub type Parsed = Result<Value, String>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    LCurly,
    RCurly,
    LSquare,
    RSquare,
    Colon,
    Comma,
    Integer,
    Float,
    Keyword,
    String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Start,
    Recovery,
    DqString,
    DqEscape,
    SqString,
    SqEscape,
    Zero,
    Sign,
    Digits,
    Mantissa,
    MantissaDigits,
    ExpE,
    ExpSign,
    ExpDigits,
    Keyword,
}

/// One transition of the lexer.
enum Step {
    /// Take the byte into the token, go on in this state.
    Take(State),
    /// Take the byte, the token is complete.
    TakeEmit(Kind),
    /// The token ended before this byte: emit it, look at the byte again
    /// from the start state.
    Emit(Kind),
    /// Whitespace between tokens: drop the byte.
    Skip,
    /// Take the byte, the token is a lexical error.
    Error,
    /// Recovery: drop the byte.
    Drop,
    /// Recovery ends before this byte: look at it again from the start.
    Resync,
}

fn step(state: State, b: u8) -> Step {
    use Step::*;
    let digit = b.is_ascii_digit();
    match state {
        State::Recovery => match b {
            b'\t' => Drop,
            0..=0x1f | 0xfe | 0xff | b'[' | b']' | b'{' | b'}' | b':' | b',' => Resync,
            _ => Drop,
        },
        State::DqEscape | State::SqEscape => match b {
            0x20..=0xfd if state == State::DqEscape => Take(State::DqString),
            0x20..=0xfd => Take(State::SqString),
            _ => Error,
        },
        State::DqString => match b {
            b'\\' => Take(State::DqEscape),
            b'"' => TakeEmit(Kind::String),
            0x20..=0xfd => Take(State::DqString),
            _ => Error,
        },
        State::SqString => match b {
            b'\\' => Take(State::SqEscape),
            b'\'' => TakeEmit(Kind::String),
            0x20..=0xfd => Take(State::SqString),
            _ => Error,
        },
        State::Zero => match b {
            b'0'..=b'9' => Error,
            b'.' => Take(State::Mantissa),
            _ => Emit(Kind::Integer),
        },
        State::ExpDigits if digit => Take(State::ExpDigits),
        State::ExpDigits => Emit(Kind::Float),
        State::ExpSign if digit => Take(State::ExpDigits),
        State::ExpE => match b {
            b'-' | b'+' => Take(State::ExpSign),
            b'0'..=b'9' => Take(State::ExpDigits),
            _ => Error,
        },
        State::MantissaDigits => match b {
            b'0'..=b'9' => Take(State::MantissaDigits),
            b'e' | b'E' => Take(State::ExpE),
            _ => Emit(Kind::Float),
        },
        State::Mantissa if digit => Take(State::MantissaDigits),
        State::Digits => match b {
            b'0'..=b'9' => Take(State::Digits),
            b'e' | b'E' => Take(State::ExpE),
            b'.' => Take(State::Mantissa),
            _ => Emit(Kind::Integer),
        },
        State::Sign => match b {
            b'0' => Take(State::Zero),
            b'1'..=b'9' => Take(State::Digits),
            _ => Error,
        },
        State::Keyword if b.is_ascii_lowercase() => Take(State::Keyword),
        State::Keyword => Emit(Kind::Keyword),
        State::Start => match b {
            b'"' => Take(State::DqString),
            b'\'' => Take(State::SqString),
            b'0' => Take(State::Zero),
            b'1'..=b'9' => Take(State::Digits),
            b'-' => Take(State::Sign),
            b'{' => TakeEmit(Kind::LCurly),
            b'}' => TakeEmit(Kind::RCurly),
            b'[' => TakeEmit(Kind::LSquare),
            b']' => TakeEmit(Kind::RSquare),
            b',' => TakeEmit(Kind::Comma),
            b':' => TakeEmit(Kind::Colon),
            b'a'..=b'z' => Take(State::Keyword),
            b' ' | b'\t' | b'\r' | b'\n' => Skip,
            _ => Error,
        },
        State::ExpSign | State::Mantissa => Error,
    }
}

/// A kept token: its kind and where its bytes are in the value's buffer.
#[derive(Debug, Clone, Copy)]
struct Token {
    kind: Kind,
    start: usize,
    end: usize,
}

/// The incremental lexer + streamer of one connection (see the module
/// doc). Feed bytes, take what they completed.
pub struct JsonStream {
    state: State,
    /// The kept tokens' bytes, then the bytes of the token being lexed.
    buf: Vec<u8>,
    /// Where the token being lexed starts in `buf` (= the kept tokens'
    /// total size, QEMU's `token_size`).
    tok_start: usize,
    tokens: Vec<Token>,
    braces: i64,
    brackets: i64,
    out: VecDeque<Parsed>,
}

impl Default for JsonStream {
    fn default() -> Self {
        JsonStream::new()
    }
}

impl JsonStream {
    /// An empty stream.
    pub fn new() -> Self {
        JsonStream {
            state: State::Start,
            buf: Vec::new(),
            tok_start: 0,
            tokens: Vec::new(),
            braces: 0,
            brackets: 0,
            out: VecDeque::new(),
        }
    }

    /// Take bytes; what they complete is queued for [`JsonStream::pop`].
    pub fn feed(&mut self, bytes: &[u8]) {
        let mut i = 0;
        while i < bytes.len() {
            if matches!(self.state, State::DqString | State::SqString) {
                // The bulk of a big request: take a run of plain string
                // bytes at once, up to the byte the per-byte lexer would
                // cut the token at.
                let quote = if self.state == State::DqString {
                    b'"'
                } else {
                    b'\''
                };
                let room = MAX_TOKEN_SIZE + 1 - (self.buf.len() - self.tok_start);
                let rest = &bytes[i..bytes.len().min(i + room)];
                let run = rest
                    .iter()
                    .position(|&b| b == quote || b == b'\\' || !(0x20..=0xfd).contains(&b))
                    .unwrap_or(rest.len());
                if run > 0 {
                    self.buf.extend_from_slice(&rest[..run]);
                    i += run;
                    self.check_token_size();
                    continue;
                }
            }
            self.byte(bytes[i]);
            i += 1;
        }
    }

    /// The next complete value or error, in input order.
    pub fn pop(&mut self) -> Option<Parsed> {
        self.out.pop_front()
    }

    /// Bytes held for an incomplete value (tests and accounting).
    pub fn held(&self) -> usize {
        self.buf.len()
    }

    fn byte(&mut self, b: u8) {
        loop {
            match step(self.state, b) {
                Step::Take(s) => {
                    self.buf.push(b);
                    self.state = s;
                }
                Step::TakeEmit(k) => {
                    self.buf.push(b);
                    self.token(Some(k));
                    self.state = State::Start;
                }
                Step::Emit(k) => {
                    self.token(Some(k));
                    self.state = State::Start;
                    continue;
                }
                Step::Skip | Step::Drop => {}
                Step::Error => {
                    self.buf.push(b);
                    self.token(None);
                    self.state = State::Recovery;
                }
                Step::Resync => {
                    self.state = State::Start;
                    continue;
                }
            }
            break;
        }
        self.check_token_size();
    }

    /// The lexer's own cut: a token longer than the limit is handed on
    /// as it is, which the streamer refuses by size.
    fn check_token_size(&mut self) {
        if self.buf.len() - self.tok_start > MAX_TOKEN_SIZE {
            self.fail("JSON token size limit exceeded".into());
            self.state = State::Start;
        }
    }

    /// A token ended (`None`: a lexical error): QEMU's
    /// `json_message_process_token`.
    fn token(&mut self, kind: Option<Kind>) {
        let Some(kind) = kind else {
            let text = &self.buf[self.tok_start..];
            // QEMU prints the token as a C string.
            let text = &text[..text.iter().position(|&b| b == 0).unwrap_or(text.len())];
            let msg = format!("JSON parse error, stray '{}'", lossy(text));
            return self.fail(msg);
        };
        match kind {
            Kind::LCurly => self.braces += 1,
            Kind::RCurly => self.braces -= 1,
            Kind::LSquare => self.brackets += 1,
            Kind::RSquare => self.brackets -= 1,
            _ => {}
        }
        let len = self.buf.len() - self.tok_start;
        if self.tok_start + len + 1 > MAX_TOKEN_SIZE {
            return self.fail("JSON token size limit exceeded".into());
        }
        if self.tokens.len() + 1 > MAX_TOKEN_COUNT {
            return self.fail("JSON token count limit exceeded".into());
        }
        if self.brackets + self.braces > MAX_NESTING {
            return self.fail("JSON nesting depth limit exceeded".into());
        }
        self.tokens.push(Token {
            kind,
            start: self.tok_start,
            end: self.buf.len(),
        });
        self.tok_start = self.buf.len();
        if (self.braces > 0 || self.brackets > 0) && self.braces >= 0 && self.brackets >= 0 {
            return;
        }
        let parsed = Parser {
            buf: &self.buf,
            tokens: &self.tokens,
            pos: 0,
        }
        .parse();
        self.out.push_back(parsed);
        self.reset();
    }

    fn fail(&mut self, msg: String) {
        self.out.push_back(Err(msg));
        self.reset();
    }

    /// Drop the value so far (and the token being lexed).
    fn reset(&mut self) {
        self.braces = 0;
        self.brackets = 0;
        self.tokens.clear();
        self.buf.clear();
        self.tok_start = 0;
        if self.buf.capacity() > KEEP_CAPACITY {
            self.buf.shrink_to(KEEP_CAPACITY);
        }
        if self.tokens.capacity() > KEEP_CAPACITY {
            self.tokens.shrink_to(KEEP_CAPACITY);
        }
    }
}

/// QEMU's `mod_utf8_codepoint`: the code point at the start of `s` (bytes
/// past its end read as NUL) and how many bytes it took; -1 when invalid.
fn mod_utf8_codepoint(s: &[u8]) -> (i32, usize) {
    const MIN_CP: [i32; 5] = [0x80, 0x800, 0x10000, 0x20_0000, 0x400_0000];
    let Some(&first) = s.first() else {
        return (-1, 0);
    };
    if first == 0 {
        return (-1, 0);
    }
    let first = u32::from(first);
    if first < 0x80 {
        return (first as i32, 1);
    }
    if first >= 0xfe || first & 0x40 == 0 {
        // Impossible byte, or a continuation byte first.
        return (-1, 1);
    }
    let len = (first as u8).leading_ones() as usize;
    let mut cp = (first & (0x7f >> len)) as i32;
    for i in 1..len {
        let b = s.get(i).copied().unwrap_or(0);
        if b & 0xc0 != 0x80 {
            // Continuation byte missing: stop before it.
            return (-1, i);
        }
        cp = (cp << 6) | i32::from(b & 0x3f);
    }
    let valid = cp <= 0x10ffff
        && !((0xfdd0..=0xfdef).contains(&cp) || cp & 0xfffe == 0xfffe)
        && !(0xd800..=0xdfff).contains(&cp)
        && !(cp < MIN_CP[len - 2] && !(cp == 0 && len == 2));
    (if valid { cp } else { -1 }, len)
}

/// Whether QEMU's `mod_utf8_encode` takes `cp`.
fn valid_codepoint(cp: i32) -> bool {
    (0..=0x10ffff).contains(&cp)
        && !((0xfdd0..=0xfdef).contains(&cp) || cp & 0xfffe == 0xfffe)
        && !(0xd800..=0xdfff).contains(&cp)
}

/// Bytes as QEMU's JSON writer shows them: each invalid sequence one
/// U+FFFD, stepping as its decoder steps.
fn lossy(mut s: &[u8]) -> String {
    let mut out = String::with_capacity(s.len());
    while !s.is_empty() {
        let (cp, n) = mod_utf8_codepoint(s);
        out.push(
            u32::try_from(cp)
                .ok()
                .and_then(char::from_u32)
                .unwrap_or('\u{fffd}'),
        );
        s = &s[n.max(1)..];
    }
    out
}

/// QEMU's `cvt4hex`: four hex digits at the start of `s`, or -1.
fn cvt4hex(s: &[u8]) -> i32 {
    let mut cp = 0;
    for i in 0..4 {
        match s.get(i).and_then(|&b| (b as char).to_digit(16)) {
            Some(d) => cp = (cp << 4) | d as i32,
            None => return -1,
        }
    }
    cp
}

/// The parser over one value's tokens; the first error wins, as in QEMU.
struct Parser<'a> {
    buf: &'a [u8],
    tokens: &'a [Token],
    pos: usize,
}

type PResult<T> = Result<T, String>;

fn err<T>(msg: impl std::fmt::Display) -> PResult<T> {
    Err(format!("JSON parse error, {msg}"))
}

impl Parser<'_> {
    fn parse(mut self) -> Parsed {
        self.value()
    }

    fn peek(&self) -> Option<Token> {
        self.tokens.get(self.pos).copied()
    }

    fn pop(&mut self) -> Option<Token> {
        let t = self.peek();
        self.pos += 1;
        t
    }

    fn text(&self, t: Token) -> &[u8] {
        &self.buf[t.start..t.end]
    }

    fn value(&mut self) -> PResult<Value> {
        let Some(t) = self.peek() else {
            return err("premature EOI");
        };
        match t.kind {
            Kind::LCurly => self.object(),
            Kind::LSquare => self.array(),
            Kind::Integer | Kind::Float | Kind::String => self.literal(),
            Kind::Keyword => self.keyword(),
            _ => err("expecting value"),
        }
    }

    fn object(&mut self) -> PResult<Value> {
        self.pop();
        let mut map = Map::new();
        let Some(peek) = self.peek() else {
            return err("premature EOI");
        };
        if peek.kind == Kind::RCurly {
            self.pop();
            return Ok(Value::Object(map));
        }
        loop {
            self.pair(&mut map)?;
            match self.pop() {
                None => return err("premature EOI"),
                Some(t) if t.kind == Kind::RCurly => return Ok(Value::Object(map)),
                Some(t) if t.kind == Kind::Comma => {}
                Some(_) => return err("expected separator in dict"),
            }
        }
    }

    fn pair(&mut self, map: &mut Map<String, Value>) -> PResult<()> {
        if self.peek().is_none() {
            return err("premature EOI");
        }
        let Value::String(key) = self.value()? else {
            return err("key is not a string in object");
        };
        match self.pop() {
            None => return err("premature EOI"),
            Some(t) if t.kind != Kind::Colon => return err("missing : in object pair"),
            Some(_) => {}
        }
        let value = self.value()?;
        if map.contains_key(&key) {
            return err("duplicate key");
        }
        map.insert(key, value);
        Ok(())
    }

    fn array(&mut self) -> PResult<Value> {
        self.pop();
        let mut list = Vec::new();
        let Some(peek) = self.peek() else {
            return err("premature EOI");
        };
        if peek.kind == Kind::RSquare {
            self.pop();
            return Ok(Value::Array(list));
        }
        loop {
            list.push(self.value()?);
            match self.pop() {
                None => return err("premature EOI"),
                Some(t) if t.kind == Kind::RSquare => return Ok(Value::Array(list)),
                Some(t) if t.kind == Kind::Comma => {}
                Some(_) => return err("expected separator in list"),
            }
        }
    }

    fn keyword(&mut self) -> PResult<Value> {
        let t = self.pop().expect("peeked");
        match self.text(t) {
            b"true" => Ok(Value::Bool(true)),
            b"false" => Ok(Value::Bool(false)),
            b"null" => Ok(Value::Null),
            // [a-z]+: ASCII.
            other => err(format_args!(
                "invalid keyword '{}'",
                String::from_utf8_lossy(other)
            )),
        }
    }

    fn literal(&mut self) -> PResult<Value> {
        let t = self.pop().expect("peeked");
        let text = self.text(t);
        match t.kind {
            Kind::String => parse_string(text).map(Value::String),
            _ => {
                // Lexed as a JSON number: ASCII.
                let s = std::str::from_utf8(text).unwrap_or_default();
                if t.kind == Kind::Integer {
                    if let Ok(i) = s.parse::<i64>() {
                        return Ok(Value::Number(i.into()));
                    }
                    if let Ok(u) = s.parse::<u64>() {
                        return Ok(Value::Number(u.into()));
                    }
                }
                // Beyond a double: QEMU's strtod gives an infinity, which
                // JSON cannot carry; the largest double is the nearest.
                let f = s.parse::<f64>().unwrap_or(0.0).clamp(f64::MIN, f64::MAX);
                Ok(Number::from_f64(f).map_or(Value::Null, Value::Number))
            }
        }
    }
}

/// QEMU's `parse_string`: a lexed string token (quotes included).
fn parse_string(token: &[u8]) -> PResult<String> {
    let quote = token[0];
    let mut out = String::with_capacity(token.len());
    let mut p = 1;
    while p < token.len() && token[p] != quote {
        let b = token[p];
        if b == b'\\' {
            let beg = p;
            p += 1;
            let c = token.get(p).copied().unwrap_or(0);
            p += 1;
            let simple = match c {
                b'"' => Some('"'),
                b'\'' => Some('\''),
                b'\\' => Some('\\'),
                b'/' => Some('/'),
                b'b' => Some('\u{8}'),
                b'f' => Some('\u{c}'),
                b'n' => Some('\n'),
                b'r' => Some('\r'),
                b't' => Some('\t'),
                b'u' => None,
                _ => return err("invalid escape sequence in string"),
            };
            if let Some(ch) = simple {
                out.push(ch);
                continue;
            }
            let mut cp = cvt4hex(&token[p..]);
            p += 4;
            if (0xd800..=0xdbff).contains(&cp) && token[p.min(token.len())..].starts_with(b"\\u") {
                cp = 0x10000 + ((cp & 0x3ff) << 10);
                let trailing = cvt4hex(&token[p + 2..]);
                if (0xdc00..=0xdfff).contains(&trailing) {
                    cp |= trailing & 0x3ff;
                    p += 6;
                } else {
                    cp = -1;
                }
            }
            match u32::try_from(cp).ok().and_then(char::from_u32) {
                Some(ch) if valid_codepoint(cp) => out.push(ch),
                _ => {
                    // QEMU prints what the escape took, up to the token's end.
                    let shown = &token[beg..p.min(token.len())];
                    return err(format_args!(
                        "{} is not a valid Unicode character",
                        String::from_utf8_lossy(shown)
                    ));
                }
            }
            continue;
        }
        if b < 0x80 {
            // The common case: plain ASCII, taken in runs.
            let run = token[p..]
                .iter()
                .position(|&c| c >= 0x80 || c == b'\\' || c == quote)
                .unwrap_or(token.len() - p);
            // ASCII is UTF-8.
            out.push_str(std::str::from_utf8(&token[p..p + run]).unwrap_or_default());
            p += run;
            continue;
        }
        let (cp, n) = mod_utf8_codepoint(&token[p..]);
        match u32::try_from(cp).ok().and_then(char::from_u32) {
            Some(ch) => out.push(ch),
            None => return err("invalid UTF-8 sequence in string"),
        }
        p += n;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn all(input: &[u8]) -> Vec<Parsed> {
        let mut s = JsonStream::new();
        s.feed(input);
        std::iter::from_fn(|| s.pop()).collect()
    }

    fn errors(input: &[u8]) -> Vec<String> {
        all(input).into_iter().filter_map(|r| r.err()).collect()
    }

    #[test]
    fn values_across_and_within_reads() {
        let mut s = JsonStream::new();
        s.feed(b"{\"a\": [1, -2.5e3, \"x\\u00e9\\ud83d\\ude00\", true, null]} 'q\"'");
        assert_eq!(
            s.pop(),
            Some(Ok(
                json!({"a": [1, -2500.0, "x\u{e9}\u{1f600}", true, null]})
            ))
        );
        // A scalar ends only where the next byte shows it ended.
        assert_eq!(s.pop(), Some(Ok(json!("q\""))));
        s.feed(b"12");
        assert_eq!(s.pop(), None);
        s.feed(b"3 {\"b\"");
        assert_eq!(s.pop(), Some(Ok(json!(123))));
        s.feed(b":18446744073709551615}");
        assert_eq!(s.pop(), Some(Ok(json!({"b": u64::MAX}))));
        assert_eq!(s.held(), 0);
    }

    #[test]
    fn qemus_parser_texts() {
        let cases: &[(&[u8], &str)] = &[
            (b"{\"execute\":}", "JSON parse error, expecting value"),
            (b"]", "JSON parse error, expecting value"),
            (b"{1:2}", "JSON parse error, key is not a string in object"),
            (b"{\"a\" 1}", "JSON parse error, missing : in object pair"),
            (
                b"{\"a\":1 \"b\":2}",
                "JSON parse error, expected separator in dict",
            ),
            (b"[1 2]", "JSON parse error, expected separator in list"),
            (b"{\"a\":1,\"a\":2}", "JSON parse error, duplicate key"),
            (b"nul ", "JSON parse error, invalid keyword 'nul'"),
            (
                b"\"\\x\"",
                "JSON parse error, invalid escape sequence in string",
            ),
            (
                b"\"\\ud800\"",
                "JSON parse error, \\ud800 is not a valid Unicode character",
            ),
            (
                b"\"\\uzz\"",
                "JSON parse error, \\uzz\" is not a valid Unicode character",
            ),
            (
                b"\"\xc3\x28\"",
                "JSON parse error, invalid UTF-8 sequence in string",
            ),
            (
                b"\"\xed\xa0\x80\"",
                "JSON parse error, invalid UTF-8 sequence in string",
            ),
            (
                b"\"\xc0\xaf\"",
                "JSON parse error, invalid UTF-8 sequence in string",
            ),
            (b"\x01", "JSON parse error, stray '\u{1}'"),
            (b"\"abc\n", "JSON parse error, stray '\"abc\n'"),
            (b"01", "JSON parse error, stray '01'"),
            (b"\xff", "JSON parse error, stray '\u{fffd}'"),
        ];
        for (input, text) in cases {
            assert_eq!(errors(input), vec![text.to_string()], "{input:?}");
        }
        // Modified UTF-8's NUL.
        assert_eq!(all(b"\"a\xc0\x80\""), vec![Ok(json!("a\u{0}"))]);
    }

    #[test]
    fn garbage_costs_one_error_per_resynchronisation() {
        // One error for the run, then the request after it.
        let r = all(b"xyz@#$ \xc3 {\"execute\":\"q\"}");
        assert_eq!(
            r,
            vec![
                Err("JSON parse error, invalid keyword 'xyz'".into()),
                Err("JSON parse error, stray '@'".into()),
                Ok(json!({"execute": "q"})),
            ]
        );
        // A megabyte of bytes that never resynchronise: one error.
        assert_eq!(errors(&[b'@'; 1 << 20]).len(), 1);
        // Structural characters resynchronise: one per bad token.
        assert_eq!(errors(b"@,@,@").len(), 5);
    }

    #[test]
    fn nesting_limit_and_what_follows() {
        let ok = [b"[".repeat(1024), b"]".repeat(1024)].concat();
        assert_eq!(all(&ok).len(), 1);
        assert!(all(&ok)[0].is_ok());
        let deep = [b"[".repeat(1025), b"]".repeat(1025)].concat();
        let r = errors(&deep);
        // The 1025th opener fails; the closers then fail one by one.
        assert_eq!(r[0], "JSON nesting depth limit exceeded");
        assert_eq!(r.len(), 1 + 1025);
        assert!(
            r[1..]
                .iter()
                .all(|e| e == "JSON parse error, expecting value")
        );
        // A closer of the other kind ends the value (and fails it).
        assert_eq!(errors(b"[} {]").len(), 2);
    }

    #[test]
    fn size_and_count_limits() {
        // A string token past 64 MiB is cut by the lexer.
        let mut s = JsonStream::new();
        s.feed(b"\"");
        s.feed(&vec![b'a'; MAX_TOKEN_SIZE]);
        assert_eq!(s.pop(), Some(Err("JSON token size limit exceeded".into())));
        assert!(s.held() <= KEEP_CAPACITY);
        // A value whose tokens total the limit: its closer fails, and
        // what follows is a new value.
        let mut big = b"[\"".to_vec();
        big.extend(std::iter::repeat_n(b'a', MAX_TOKEN_SIZE - 4));
        big.extend_from_slice(b"\"] 7 ");
        assert_eq!(
            all(&big),
            vec![Err("JSON token size limit exceeded".into()), Ok(json!(7))]
        );
        // One byte less is a value.
        let mut fits = b"[\"".to_vec();
        fits.extend(std::iter::repeat_n(b'a', MAX_TOKEN_SIZE - 5));
        fits.extend_from_slice(b"\"]");
        assert!(all(&fits)[0].is_ok());
        // Too many tokens: 2 Mi - 1 are kept, the next one fails.
        let mut many = b"[".to_vec();
        many.extend(b"0,".repeat(MAX_TOKEN_COUNT / 2));
        assert_eq!(errors(&many), vec!["JSON token count limit exceeded"]);
    }

    fn replies(chunks: &[&[u8]]) -> Vec<Parsed> {
        let mut s = JsonStream::new();
        let mut out = Vec::new();
        for c in chunks {
            s.feed(c);
            out.extend(std::iter::from_fn(|| s.pop()));
        }
        out
    }

    proptest! {
        #[test]
        fn any_split_gives_the_same_replies(
            input in proptest::collection::vec(
                prop_oneof![
                    Just(b"{\"execute\": \"query-jobs\", \"id\": 1}".to_vec()),
                    Just(b"[1, 2.5e-3, \"\\u00e9\xc3\xa9\"]".to_vec()),
                    Just(b"'sq\"' true nul".to_vec()),
                    Just(b"}]:,".to_vec()),
                    Just(b"[[{".to_vec()),
                    proptest::collection::vec(any::<u8>(), 0..24),
                ],
                0..12,
            ),
            cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..8),
        ) {
            let input: Vec<u8> = input.concat();
            let whole = replies(&[&input]);
            let mut at: Vec<usize> = cuts.iter().map(|i| i.index(input.len() + 1)).collect();
            at.sort_unstable();
            let mut chunks = Vec::new();
            let mut prev = 0;
            for a in at {
                chunks.push(&input[prev..a]);
                prev = a;
            }
            chunks.push(&input[prev..]);
            prop_assert_eq!(replies(&chunks), whole);
        }
    }
}
