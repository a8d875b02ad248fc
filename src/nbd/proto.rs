//! The NBD wire protocol (the NetworkBlockDevice project's `doc/proto.md`),
//! written once for our client (`block::nbd`) and our server
//! (`export::nbd`): magics, option and command numbers, and the encoding
//! and decoding of every message either side sends. Fixed newstyle
//! negotiation only (oldstyle is long gone from QEMU); simple, structured
//! and extended headers.
//!
//! Decoding never trusts a length from the wire beyond the limits given
//! here: a hostile peer gets an `InvalidData` error, never an allocation
//! of its choosing.

use std::io::{self, Read, Write};

/// `NBDMAGIC`: the first eight bytes a server sends.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: newstyle negotiation, and the magic of every option request.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// The magic of every option reply.
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;

/// Handshake flags (server → client, 16 bits).
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// The server omits the 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flags (client → server, 32 bits).
pub const CLIENT_FIXED_NEWSTYLE: u32 = 1 << 0;
/// The client asks the server to omit the zero padding.
pub const CLIENT_NO_ZEROES: u32 = 1 << 1;

/// Option requests (`NBD_OPT_*`).
pub mod opt {
    #![allow(missing_docs)]
    pub const EXPORT_NAME: u32 = 1;
    pub const ABORT: u32 = 2;
    pub const LIST: u32 = 3;
    pub const STARTTLS: u32 = 5;
    pub const INFO: u32 = 6;
    pub const GO: u32 = 7;
    pub const STRUCTURED_REPLY: u32 = 8;
    pub const LIST_META_CONTEXT: u32 = 9;
    pub const SET_META_CONTEXT: u32 = 10;
    pub const EXTENDED_HEADERS: u32 = 11;
}

/// Option reply types (`NBD_REP_*`); errors have bit 31 set.
pub mod rep {
    #![allow(missing_docs)]
    pub const ACK: u32 = 1;
    pub const SERVER: u32 = 2;
    pub const INFO: u32 = 3;
    pub const META_CONTEXT: u32 = 4;
    pub const FLAG_ERROR: u32 = 1 << 31;
    pub const ERR_UNSUP: u32 = FLAG_ERROR | 1;
    pub const ERR_POLICY: u32 = FLAG_ERROR | 2;
    pub const ERR_INVALID: u32 = FLAG_ERROR | 3;
    pub const ERR_PLATFORM: u32 = FLAG_ERROR | 4;
    pub const ERR_TLS_REQD: u32 = FLAG_ERROR | 5;
    pub const ERR_UNKNOWN: u32 = FLAG_ERROR | 6;
    pub const ERR_SHUTDOWN: u32 = FLAG_ERROR | 7;
    pub const ERR_BLOCK_SIZE_REQD: u32 = FLAG_ERROR | 8;
    pub const ERR_TOO_BIG: u32 = FLAG_ERROR | 9;
    pub const ERR_EXT_HEADER_REQD: u32 = FLAG_ERROR | 10;
}

/// `NBD_INFO_*` items of `NBD_REP_INFO`.
pub mod info {
    #![allow(missing_docs)]
    pub const EXPORT: u16 = 0;
    pub const NAME: u16 = 1;
    pub const DESCRIPTION: u16 = 2;
    pub const BLOCK_SIZE: u16 = 3;
}

/// Transmission flags (`NBD_FLAG_*`, 16 bits, per export).
pub mod tflag {
    #![allow(missing_docs)]
    pub const HAS_FLAGS: u16 = 1 << 0;
    pub const READ_ONLY: u16 = 1 << 1;
    pub const SEND_FLUSH: u16 = 1 << 2;
    pub const SEND_FUA: u16 = 1 << 3;
    pub const ROTATIONAL: u16 = 1 << 4;
    pub const SEND_TRIM: u16 = 1 << 5;
    pub const SEND_WRITE_ZEROES: u16 = 1 << 6;
    pub const SEND_DF: u16 = 1 << 7;
    pub const CAN_MULTI_CONN: u16 = 1 << 8;
    pub const SEND_RESIZE: u16 = 1 << 9;
    pub const SEND_CACHE: u16 = 1 << 10;
    pub const SEND_FAST_ZERO: u16 = 1 << 11;
    pub const BLOCK_STAT_PAYLOAD: u16 = 1 << 12;
}

/// Commands (`NBD_CMD_*`).
pub mod cmd {
    #![allow(missing_docs)]
    pub const READ: u16 = 0;
    pub const WRITE: u16 = 1;
    pub const DISC: u16 = 2;
    pub const FLUSH: u16 = 3;
    pub const TRIM: u16 = 4;
    pub const CACHE: u16 = 5;
    pub const WRITE_ZEROES: u16 = 6;
    pub const BLOCK_STATUS: u16 = 7;
    pub const RESIZE: u16 = 8;
}

/// Command flags (`NBD_CMD_FLAG_*`).
pub mod cflag {
    #![allow(missing_docs)]
    pub const FUA: u16 = 1 << 0;
    pub const NO_HOLE: u16 = 1 << 1;
    pub const DF: u16 = 1 << 2;
    pub const REQ_ONE: u16 = 1 << 3;
    pub const FAST_ZERO: u16 = 1 << 4;
    pub const PAYLOAD_LEN: u16 = 1 << 5;
}

/// Request magics.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// The magic of a 32-byte request once extended headers are negotiated.
pub const EXTENDED_REQUEST_MAGIC: u32 = 0x21e4_1c71;
/// Reply magics.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// A structured reply chunk (20-byte header).
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
/// An extended reply chunk (32-byte header).
pub const EXTENDED_REPLY_MAGIC: u32 = 0x6e8a_278c;

/// Structured reply chunk flags.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;

/// Structured reply chunk types (`NBD_REPLY_TYPE_*`).
pub mod chunk {
    #![allow(missing_docs)]
    pub const NONE: u16 = 0;
    pub const OFFSET_DATA: u16 = 1;
    pub const OFFSET_HOLE: u16 = 2;
    pub const BLOCK_STATUS: u16 = 5;
    pub const BLOCK_STATUS_EXT: u16 = 6;
    pub const FLAG_ERROR: u16 = 1 << 15;
    pub const ERROR: u16 = FLAG_ERROR | 1;
    pub const ERROR_OFFSET: u16 = FLAG_ERROR | 2;
}

/// Block status flags of `base:allocation`.
pub const STATE_HOLE: u32 = 1 << 0;
/// Reads as zeroes.
pub const STATE_ZERO: u32 = 1 << 1;
/// `qemu:dirty-bitmap:NAME`: the extent is dirty.
pub const STATE_DIRTY: u32 = 1 << 0;

/// The meta context every server that does block status offers.
pub const CONTEXT_BASE_ALLOCATION: &str = "base:allocation";
/// QEMU's context prefix for exported dirty bitmaps.
pub const CONTEXT_DIRTY_BITMAP_PREFIX: &str = "qemu:dirty-bitmap:";
/// QEMU's allocation-depth context.
pub const CONTEXT_ALLOCATION_DEPTH: &str = "qemu:allocation-depth";

/// NBD error values (the protocol's own numbering, equal to Linux errno
/// for the ones defined).
pub mod err {
    #![allow(missing_docs)]
    pub const EPERM: u32 = 1;
    pub const EIO: u32 = 5;
    pub const ENOMEM: u32 = 12;
    pub const EINVAL: u32 = 22;
    pub const ENOSPC: u32 = 28;
    pub const EOVERFLOW: u32 = 75;
    pub const ENOTSUP: u32 = 95;
    pub const ESHUTDOWN: u32 = 108;
}

/// The largest payload (read or write) either side accepts: QEMU's
/// `NBD_MAX_BUFFER_SIZE`, 32 MiB. Requests above it are split by our
/// client and refused by our server.
pub const MAX_BUFFER: u32 = 32 << 20;
/// The largest option payload we read (export names are at most 4 KiB;
/// meta context lists are small): anything bigger is hostile.
pub const MAX_OPTION_LEN: u32 = 64 << 10;
/// The largest export name, as the protocol document and QEMU
/// (`NBD_MAX_STRING_SIZE`).
pub const MAX_STRING: usize = 4096;

/// The errno an NBD error value stands for, as QEMU's `nbd_errno_to_system_errno`
/// (unknown values are `EINVAL`).
pub fn errno_from_nbd(e: u32) -> i32 {
    match e {
        err::EPERM => libc::EPERM,
        err::EIO => libc::EIO,
        err::ENOMEM => libc::ENOMEM,
        err::ENOSPC => libc::ENOSPC,
        err::EOVERFLOW => libc::EOVERFLOW,
        err::ENOTSUP => libc::ENOTSUP,
        err::ESHUTDOWN => libc::ESHUTDOWN,
        _ => libc::EINVAL,
    }
}

/// The NBD error value for an errno, as QEMU's `system_errno_to_nbd_errno`
/// (`EROFS` and `EACCES` are `EPERM`, `EDQUOT`/`EFBIG` are `ENOSPC`,
/// anything unknown is `EINVAL`).
pub fn errno_to_nbd(errno: i32) -> u32 {
    match errno {
        0 => 0,
        libc::EPERM | libc::EROFS => err::EPERM,
        libc::EIO => err::EIO,
        libc::ENOMEM => err::ENOMEM,
        libc::ENOSPC | libc::EDQUOT | libc::EFBIG => err::ENOSPC,
        libc::EOVERFLOW => err::EOVERFLOW,
        libc::ENOTSUP => err::ENOTSUP,
        libc::ESHUTDOWN => err::ESHUTDOWN,
        _ => err::EINVAL,
    }
}

fn bad(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

/// Big-endian reads of exact widths.
pub trait ReadBe: Read {
    /// One `u16`.
    fn be16(&mut self) -> io::Result<u16> {
        let mut b = [0; 2];
        self.read_exact(&mut b)?;
        Ok(u16::from_be_bytes(b))
    }
    /// One `u32`.
    fn be32(&mut self) -> io::Result<u32> {
        let mut b = [0; 4];
        self.read_exact(&mut b)?;
        Ok(u32::from_be_bytes(b))
    }
    /// One `u64`.
    fn be64(&mut self) -> io::Result<u64> {
        let mut b = [0; 8];
        self.read_exact(&mut b)?;
        Ok(u64::from_be_bytes(b))
    }
    /// `len` bytes, refused above `max` (before anything is allocated).
    fn read_vec(&mut self, len: u64, max: u64) -> io::Result<Vec<u8>> {
        if len > max {
            return Err(bad(format!("length {len} exceeds the limit {max}")));
        }
        let mut v = vec![0; len as usize];
        self.read_exact(&mut v)?;
        Ok(v)
    }
    /// Reads and throws away `len` bytes.
    fn skip(&mut self, len: u64) -> io::Result<()> {
        let n = io::copy(&mut self.take(len), &mut io::sink())?;
        if n != len {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        Ok(())
    }
}

impl<R: Read + ?Sized> ReadBe for R {}

/// A byte buffer being assembled in wire order.
#[derive(Default, Debug, Clone)]
pub struct Buf(pub Vec<u8>);

impl Buf {
    /// Appends a `u16`.
    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    /// Appends a `u32`.
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    /// Appends a `u64`.
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    /// Appends raw bytes.
    pub fn bytes(&mut self, v: &[u8]) -> &mut Self {
        self.0.extend_from_slice(v);
        self
    }
    /// Appends a string with its 32-bit length in front.
    pub fn string(&mut self, s: &str) -> &mut Self {
        self.u32(s.len() as u32).bytes(s.as_bytes())
    }
}

/// A bounded reader over an option's payload: reads past the end are
/// `InvalidData`, not a read of the next message.
pub struct Payload<'a> {
    data: &'a [u8],
}

impl<'a> Payload<'a> {
    /// Reads over `data`.
    pub fn new(data: &'a [u8]) -> Self {
        Self { data }
    }
    /// What is left.
    pub fn rest(&self) -> &'a [u8] {
        self.data
    }
    /// Bytes left.
    pub fn remaining(&self) -> usize {
        self.data.len()
    }
    /// `n` bytes.
    pub fn take(&mut self, n: usize) -> io::Result<&'a [u8]> {
        if n > self.data.len() {
            return Err(bad("payload shorter than its contents"));
        }
        let (a, b) = self.data.split_at(n);
        self.data = b;
        Ok(a)
    }
    /// A `u16`.
    pub fn u16(&mut self) -> io::Result<u16> {
        Ok(u16::from_be_bytes(
            self.take(2)?.try_into().unwrap_or([0; 2]),
        ))
    }
    /// A `u32`.
    pub fn u32(&mut self) -> io::Result<u32> {
        Ok(u32::from_be_bytes(
            self.take(4)?.try_into().unwrap_or([0; 4]),
        ))
    }
    /// A `u64`.
    pub fn u64(&mut self) -> io::Result<u64> {
        Ok(u64::from_be_bytes(
            self.take(8)?.try_into().unwrap_or([0; 8]),
        ))
    }
    /// A string with a 32-bit length in front (at most [`MAX_STRING`] bytes, UTF-8).
    pub fn string(&mut self) -> io::Result<String> {
        let n = self.u32()? as usize;
        if n > MAX_STRING {
            return Err(bad(format!("string of {n} bytes is too long")));
        }
        String::from_utf8(self.take(n)?.to_vec()).map_err(|_| bad("string is not UTF-8"))
    }
}

// ---- negotiation ---------------------------------------------------------

/// Writes an option request: `IHAVEOPT`, the option, its payload.
pub fn write_option(w: &mut dyn Write, option: u32, data: &[u8]) -> io::Result<()> {
    let mut b = Buf::default();
    b.u64(IHAVEOPT)
        .u32(option)
        .u32(data.len() as u32)
        .bytes(data);
    w.write_all(&b.0)?;
    w.flush()
}

/// Reads an option request (server side): `(option, payload)`. The
/// payload is refused above [`MAX_OPTION_LEN`] (the caller answers such a
/// request with `NBD_REP_ERR_TOO_BIG` only if it can skip it; we close).
pub fn read_option(r: &mut dyn Read) -> io::Result<(u32, Vec<u8>)> {
    let magic = r.be64()?;
    if magic != IHAVEOPT {
        return Err(bad(format!("bad option magic {magic:#x}")));
    }
    let option = r.be32()?;
    let len = r.be32()?;
    let data = r.read_vec(len.into(), MAX_OPTION_LEN.into())?;
    Ok((option, data))
}

/// Writes one option reply.
pub fn write_option_reply(
    w: &mut dyn Write,
    option: u32,
    kind: u32,
    data: &[u8],
) -> io::Result<()> {
    let mut b = Buf::default();
    b.u64(OPT_REPLY_MAGIC)
        .u32(option)
        .u32(kind)
        .u32(data.len() as u32)
        .bytes(data);
    w.write_all(&b.0)?;
    w.flush()
}

/// One option reply as read by a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OptionReply {
    /// The option it answers.
    pub option: u32,
    /// `NBD_REP_*`.
    pub kind: u32,
    /// Its payload.
    pub data: Vec<u8>,
}

impl OptionReply {
    /// Is it an error reply?
    pub fn is_error(&self) -> bool {
        self.kind & rep::FLAG_ERROR != 0
    }
    /// The error's text, if the server sent one.
    pub fn message(&self) -> String {
        String::from_utf8_lossy(&self.data).into_owned()
    }
}

/// Reads one option reply (client side), checking it answers `option`.
pub fn read_option_reply(r: &mut dyn Read, option: u32) -> io::Result<OptionReply> {
    let magic = r.be64()?;
    if magic != OPT_REPLY_MAGIC {
        return Err(bad(format!("bad option reply magic {magic:#x}")));
    }
    let got = r.be32()?;
    let kind = r.be32()?;
    let len = r.be32()?;
    let data = r.read_vec(len.into(), MAX_OPTION_LEN.into())?;
    if got != option {
        return Err(bad(format!("reply to option {got}, expected {option}")));
    }
    Ok(OptionReply { option, kind, data })
}

/// What `NBD_INFO_EXPORT` says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportInfo {
    /// Export size in bytes.
    pub size: u64,
    /// Transmission flags ([`tflag`]).
    pub flags: u16,
}

/// `NBD_INFO_BLOCK_SIZE`: minimum, preferred and maximum block sizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSize {
    /// Requests must be aligned to this (a power of two, 1..=64 KiB).
    pub min: u32,
    /// Requests should be aligned to this.
    pub preferred: u32,
    /// Payloads must not exceed this.
    pub max: u32,
}

impl BlockSize {
    /// Checks the constraints the protocol puts on the three values.
    pub fn validate(&self) -> io::Result<()> {
        let pow2 = |v: u32| v != 0 && v.is_power_of_two();
        if !pow2(self.min) || self.min > 64 << 10 {
            return Err(bad(format!("invalid minimum block size {}", self.min)));
        }
        if !pow2(self.preferred) || self.preferred < self.min {
            return Err(bad(format!(
                "invalid preferred block size {}",
                self.preferred
            )));
        }
        if self.max < self.min || (!self.max.is_multiple_of(self.min) && self.max != u32::MAX) {
            return Err(bad(format!("invalid maximum block size {}", self.max)));
        }
        Ok(())
    }
}

/// Builds the payload of `NBD_OPT_INFO`/`NBD_OPT_GO`: the export name and
/// the info items requested.
pub fn go_payload(name: &str, infos: &[u16]) -> Vec<u8> {
    let mut b = Buf::default();
    b.string(name).u16(infos.len() as u16);
    for i in infos {
        b.u16(*i);
    }
    b.0
}

/// Builds the payload of `NBD_OPT_LIST_META_CONTEXT`/`SET_META_CONTEXT`.
pub fn meta_context_payload(name: &str, queries: &[&str]) -> Vec<u8> {
    let mut b = Buf::default();
    b.string(name).u32(queries.len() as u32);
    for q in queries {
        b.string(q);
    }
    b.0
}

// ---- transmission ---------------------------------------------------------

/// A request header, compact (28 bytes) or extended (32 bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// [`cflag`] bits.
    pub flags: u16,
    /// [`cmd`].
    pub kind: u16,
    /// Echoed in the reply; the client picks it.
    pub cookie: u64,
    /// Byte offset.
    pub offset: u64,
    /// Byte length (a 32-bit field unless extended headers are on).
    pub length: u64,
}

impl Request {
    /// The header's bytes.
    pub fn encode(&self, extended: bool) -> Vec<u8> {
        let mut b = Buf::default();
        if extended {
            b.u32(EXTENDED_REQUEST_MAGIC)
                .u16(self.flags)
                .u16(self.kind)
                .u64(self.cookie)
                .u64(self.offset)
                .u64(self.length);
        } else {
            b.u32(REQUEST_MAGIC)
                .u16(self.flags)
                .u16(self.kind)
                .u64(self.cookie)
                .u64(self.offset)
                .u32(self.length as u32);
        }
        b.0
    }

    /// Reads one header (server side).
    pub fn read(r: &mut dyn Read, extended: bool) -> io::Result<Request> {
        let magic = r.be32()?;
        let want = if extended {
            EXTENDED_REQUEST_MAGIC
        } else {
            REQUEST_MAGIC
        };
        if magic != want {
            return Err(bad(format!("bad request magic {magic:#x}")));
        }
        let flags = r.be16()?;
        let kind = r.be16()?;
        let cookie = r.be64()?;
        let offset = r.be64()?;
        let length = if extended {
            r.be64()?
        } else {
            r.be32()?.into()
        };
        Ok(Request {
            flags,
            kind,
            cookie,
            offset,
            length,
        })
    }
}

/// A reply header as read by the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyHeader {
    /// A simple reply: an error value (0: success), then for a successful
    /// read, the data.
    Simple {
        /// NBD error value.
        error: u32,
        /// The request's cookie.
        cookie: u64,
    },
    /// A structured (or extended) reply chunk; `length` bytes of payload follow.
    Chunk {
        /// [`REPLY_FLAG_DONE`].
        flags: u16,
        /// [`chunk`] type.
        kind: u16,
        /// The request's cookie.
        cookie: u64,
        /// The request's offset (extended headers only; else 0).
        offset: u64,
        /// Payload length.
        length: u64,
    },
}

impl ReplyHeader {
    /// The cookie it answers.
    pub fn cookie(&self) -> u64 {
        match *self {
            ReplyHeader::Simple { cookie, .. } | ReplyHeader::Chunk { cookie, .. } => cookie,
        }
    }

    /// Reads one header. `extended`: extended headers were negotiated
    /// (then every reply is an extended chunk).
    pub fn read(r: &mut dyn Read, extended: bool) -> io::Result<ReplyHeader> {
        let magic = r.be32()?;
        match magic {
            SIMPLE_REPLY_MAGIC if !extended => Ok(ReplyHeader::Simple {
                error: r.be32()?,
                cookie: r.be64()?,
            }),
            STRUCTURED_REPLY_MAGIC if !extended => Ok(ReplyHeader::Chunk {
                flags: r.be16()?,
                kind: r.be16()?,
                cookie: r.be64()?,
                offset: 0,
                length: r.be32()?.into(),
            }),
            EXTENDED_REPLY_MAGIC if extended => Ok(ReplyHeader::Chunk {
                flags: r.be16()?,
                kind: r.be16()?,
                cookie: r.be64()?,
                offset: r.be64()?,
                length: r.be64()?,
            }),
            m => Err(bad(format!("bad reply magic {m:#x}"))),
        }
    }
}

impl ReplyHeader {
    /// The whole header's size for a reply starting with `magic`, or
    /// `None` when that magic is not valid in this mode: lets a reader
    /// wait for the first bytes of a reply without a deadline and then
    /// read the rest of it under one.
    pub fn len_for_magic(magic: u32, extended: bool) -> Option<usize> {
        match magic {
            SIMPLE_REPLY_MAGIC if !extended => Some(16),
            STRUCTURED_REPLY_MAGIC if !extended => Some(20),
            EXTENDED_REPLY_MAGIC if extended => Some(32),
            _ => None,
        }
    }
}

/// Decodes an `OFFSET_HOLE` chunk payload: `(offset, length)` (the same
/// 12 bytes with compact and extended headers).
pub fn parse_offset_hole(data: &[u8]) -> io::Result<(u64, u32)> {
    let mut p = Payload::new(data);
    let offset = p.u64()?;
    let len = p.u32()?;
    if p.remaining() != 0 || len == 0 {
        return Err(bad("hole chunk of a bad length"));
    }
    Ok((offset, len))
}

/// Encodes an `OFFSET_HOLE` chunk payload.
pub fn offset_hole_payload(offset: u64, len: u32) -> Vec<u8> {
    let mut b = Buf::default();
    b.u64(offset).u32(len);
    b.0
}

/// QEMU's name of an option in its messages (`nbd_opt_lookup`, e.g.
/// `Unsupported option 8 (structured reply)`).
pub fn opt_name(option: u32) -> &'static str {
    match option {
        opt::EXPORT_NAME => "export name",
        opt::ABORT => "abort",
        opt::LIST => "list",
        // NBD_OPT_PEEK_EXPORT: withdrawn from the protocol, still named.
        4 => "peek export",
        opt::STARTTLS => "starttls",
        opt::INFO => "info",
        opt::GO => "go",
        opt::STRUCTURED_REPLY => "structured reply",
        opt::LIST_META_CONTEXT => "list meta context",
        opt::SET_META_CONTEXT => "set meta context",
        opt::EXTENDED_HEADERS => "extended headers",
        _ => "<unknown>",
    }
}

/// Encodes a simple reply header.
pub fn simple_reply(error: u32, cookie: u64) -> Vec<u8> {
    let mut b = Buf::default();
    b.u32(SIMPLE_REPLY_MAGIC).u32(error).u64(cookie);
    b.0
}

/// Encodes a structured (or, with `extended`, extended) chunk header.
/// `offset` is only on the wire with extended headers.
pub fn chunk_header(
    extended: bool,
    flags: u16,
    kind: u16,
    cookie: u64,
    offset: u64,
    length: u64,
) -> Vec<u8> {
    let mut b = Buf::default();
    if extended {
        b.u32(EXTENDED_REPLY_MAGIC)
            .u16(flags)
            .u16(kind)
            .u64(cookie)
            .u64(offset)
            .u64(length);
    } else {
        b.u32(STRUCTURED_REPLY_MAGIC)
            .u16(flags)
            .u16(kind)
            .u64(cookie)
            .u32(length as u32);
    }
    b.0
}

/// An error chunk's payload: the error, then an optional message.
pub fn error_chunk_payload(error: u32, message: &str) -> Vec<u8> {
    let msg = &message.as_bytes()[..message.len().min(MAX_STRING)];
    let mut b = Buf::default();
    b.u32(error).u16(msg.len() as u16).bytes(msg);
    b.0
}

/// One block status extent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Bytes covered.
    pub length: u64,
    /// The context's flags (or value, e.g. an allocation depth).
    pub flags: u64,
}

/// Encodes a `BLOCK_STATUS` (compact) or `BLOCK_STATUS_EXT` payload.
pub fn block_status_payload(extended: bool, context_id: u32, extents: &[Extent]) -> Vec<u8> {
    let mut b = Buf::default();
    b.u32(context_id);
    if extended {
        b.u32(extents.len() as u32);
        for e in extents {
            b.u64(e.length).u64(e.flags);
        }
    } else {
        for e in extents {
            b.u32(e.length as u32).u32(e.flags as u32);
        }
    }
    b.0
}

/// Decodes a block status chunk payload: `(context id, extents)`.
pub fn parse_block_status(kind: u16, data: &[u8]) -> io::Result<(u32, Vec<Extent>)> {
    let mut p = Payload::new(data);
    let id = p.u32()?;
    let mut out = Vec::new();
    match kind {
        chunk::BLOCK_STATUS => {
            if p.remaining() == 0 || !p.remaining().is_multiple_of(8) {
                return Err(bad("block status chunk of a bad length"));
            }
            while p.remaining() > 0 {
                let length = p.u32()?.into();
                let flags = p.u32()?.into();
                out.push(Extent { length, flags });
            }
        }
        chunk::BLOCK_STATUS_EXT => {
            let count = p.u32()? as usize;
            if count == 0 || p.remaining() != count.saturating_mul(16) {
                return Err(bad("extended block status chunk of a bad length"));
            }
            for _ in 0..count {
                let length = p.u64()?;
                let flags = p.u64()?;
                out.push(Extent { length, flags });
            }
        }
        k => return Err(bad(format!("chunk type {k} is not block status"))),
    }
    if out.iter().any(|e| e.length == 0) {
        return Err(bad("block status extent of length 0"));
    }
    Ok((id, out))
}

/// Decodes an error chunk payload: `(NBD error, message, offset)` (the
/// offset of `ERROR_OFFSET` only).
pub fn parse_error_chunk(kind: u16, data: &[u8]) -> io::Result<(u32, String, Option<u64>)> {
    let mut p = Payload::new(data);
    let error = p.u32()?;
    let n = p.u16()? as usize;
    let msg = String::from_utf8_lossy(p.take(n)?).into_owned();
    let offset = if kind == chunk::ERROR_OFFSET {
        Some(p.u64()?)
    } else {
        None
    };
    if p.remaining() != 0 {
        return Err(bad("error chunk longer than its contents"));
    }
    if error == 0 {
        return Err(bad("error chunk with error 0"));
    }
    Ok((error, msg, offset))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn request_round_trips_both_sizes() {
        let q = Request {
            flags: cflag::FUA,
            kind: cmd::WRITE,
            cookie: 0x1122_3344_5566_7788,
            offset: 1 << 40,
            length: 65536,
        };
        for ext in [false, true] {
            let b = q.encode(ext);
            assert_eq!(b.len(), if ext { 32 } else { 28 });
            assert_eq!(Request::read(&mut &b[..], ext).unwrap(), q);
            // The other size's magic is refused.
            assert!(Request::read(&mut &b[..], !ext).is_err());
        }
    }

    #[test]
    fn reply_headers_decode_and_refuse_the_wrong_mode() {
        let s = simple_reply(err::ENOSPC, 7);
        assert_eq!(
            ReplyHeader::read(&mut &s[..], false).unwrap(),
            ReplyHeader::Simple {
                error: err::ENOSPC,
                cookie: 7
            }
        );
        assert!(ReplyHeader::read(&mut &s[..], true).is_err());
        for ext in [false, true] {
            let c = chunk_header(ext, REPLY_FLAG_DONE, chunk::OFFSET_DATA, 9, 512, 4096);
            let h = ReplyHeader::read(&mut &c[..], ext).unwrap();
            assert_eq!(
                h,
                ReplyHeader::Chunk {
                    flags: REPLY_FLAG_DONE,
                    kind: chunk::OFFSET_DATA,
                    cookie: 9,
                    offset: if ext { 512 } else { 0 },
                    length: 4096
                }
            );
        }
    }

    #[test]
    fn block_status_round_trips() {
        let e = vec![
            Extent {
                length: 65536,
                flags: 0,
            },
            Extent {
                length: 1 << 20,
                flags: (STATE_HOLE | STATE_ZERO).into(),
            },
        ];
        for (ext, kind) in [
            (false, chunk::BLOCK_STATUS),
            (true, chunk::BLOCK_STATUS_EXT),
        ] {
            let p = block_status_payload(ext, 3, &e);
            assert_eq!(parse_block_status(kind, &p).unwrap(), (3, e.clone()));
            // Truncated by one byte: an error, not a short list.
            assert!(parse_block_status(kind, &p[..p.len() - 1]).is_err());
        }
    }

    #[test]
    fn error_chunk_round_trips() {
        let p = error_chunk_payload(err::EIO, "disk on fire");
        assert_eq!(
            parse_error_chunk(chunk::ERROR, &p).unwrap(),
            (err::EIO, "disk on fire".into(), None)
        );
        assert!(parse_error_chunk(chunk::ERROR, &error_chunk_payload(0, "")).is_err());
    }

    #[test]
    fn options_round_trip_and_oversized_ones_are_refused_unread() {
        let mut w = Vec::new();
        write_option(&mut w, opt::GO, &go_payload("disk", &[info::BLOCK_SIZE])).unwrap();
        let (o, d) = read_option(&mut &w[..]).unwrap();
        assert_eq!(o, opt::GO);
        let mut p = Payload::new(&d);
        assert_eq!(p.string().unwrap(), "disk");
        assert_eq!(p.u16().unwrap(), 1);
        assert_eq!(p.u16().unwrap(), info::BLOCK_SIZE);

        let mut huge = Buf::default();
        huge.u64(IHAVEOPT).u32(opt::GO).u32(u32::MAX);
        let e = read_option(&mut &huge.0[..]).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);

        let mut w = Vec::new();
        write_option_reply(&mut w, opt::GO, rep::ERR_UNKNOWN, b"no such export").unwrap();
        let r = read_option_reply(&mut &w[..], opt::GO).unwrap();
        assert!(r.is_error());
        assert_eq!(r.message(), "no such export");
        assert!(read_option_reply(&mut &w[..], opt::INFO).is_err());
    }

    #[test]
    fn header_lengths_and_holes() {
        for ext in [false, true] {
            let c = chunk_header(ext, 0, chunk::NONE, 1, 0, 0);
            let magic = u32::from_be_bytes(c[..4].try_into().unwrap());
            assert_eq!(ReplyHeader::len_for_magic(magic, ext), Some(c.len()));
            assert_eq!(ReplyHeader::len_for_magic(magic, !ext), None);
        }
        assert_eq!(
            ReplyHeader::len_for_magic(SIMPLE_REPLY_MAGIC, false),
            Some(simple_reply(0, 0).len())
        );
        let h = offset_hole_payload(4096, 512);
        assert_eq!(parse_offset_hole(&h).unwrap(), (4096, 512));
        assert!(parse_offset_hole(&h[..11]).is_err());
        assert!(parse_offset_hole(&offset_hole_payload(0, 0)).is_err());
    }

    #[test]
    fn errno_mapping_is_qemus() {
        assert_eq!(errno_to_nbd(libc::EROFS), err::EPERM);
        assert_eq!(errno_to_nbd(libc::EDQUOT), err::ENOSPC);
        assert_eq!(errno_to_nbd(libc::ENOENT), err::EINVAL);
        for e in [libc::EPERM, libc::EIO, libc::ENOSPC, libc::ENOTSUP] {
            assert_eq!(errno_from_nbd(errno_to_nbd(e)), e);
        }
        assert_eq!(errno_from_nbd(12345), libc::EINVAL);
    }

    #[test]
    fn block_size_constraints() {
        let ok = BlockSize {
            min: 512,
            preferred: 4096,
            max: 32 << 20,
        };
        ok.validate().unwrap();
        for b in [
            BlockSize { min: 3, ..ok },
            BlockSize { min: 1 << 17, ..ok },
            BlockSize { max: 100, ..ok },
        ] {
            assert!(b.validate().is_err(), "{b:?}");
        }
    }

    proptest! {
        /// No byte string makes a decoder panic or allocate past its limit.
        #[test]
        fn decoders_never_panic(data in proptest::collection::vec(any::<u8>(), 0..200)) {
            for ext in [false, true] {
                let _ = Request::read(&mut &data[..], ext);
                let _ = ReplyHeader::read(&mut &data[..], ext);
            }
            let _ = read_option(&mut &data[..]);
            let _ = read_option_reply(&mut &data[..], opt::GO);
            for k in [chunk::BLOCK_STATUS, chunk::BLOCK_STATUS_EXT] {
                let _ = parse_block_status(k, &data);
            }
            for k in [chunk::ERROR, chunk::ERROR_OFFSET] {
                let _ = parse_error_chunk(k, &data);
            }
            let _ = Payload::new(&data).string();
            let _ = parse_offset_hole(&data);
        }
    }
}
