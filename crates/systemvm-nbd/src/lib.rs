//! The NBD client protocol, no I/O: the fixed-newstyle handshake toward a server (structured
//! replies, metadata contexts such as `base:allocation` and `qemu:dirty-bitmap:…`, `NBD_OPT_GO`)
//! and the transmission phase (requests encoded, simple and structured replies decoded from a
//! byte stream). The storage VM reads libvirt's pull-mode backup exports with it (snapshots).
//!
//! Both halves are fed whatever bytes arrived and say what to send or what they decoded, so they
//! are driven by any transport and tested without one. Protocol: the NBD project's `proto.md`.
//!
//! Invariants:
//! * nothing a server sends makes them panic or allocate without bound: option replies are capped
//!   at [`MAX_OPTION_REPLY`], reply chunks at [`MAX_CHUNK`], error messages at 4 KiB (the spec's
//!   limit); a longer length is an error before any byte of it is buffered;
//! * every decoded reply names a cookie the client has in flight, and a chunk's offsets and
//!   lengths lie inside the request it answers; anything else is [`NbdError::Protocol`];
//! * the handshake ends only with an export size and, when asked for, every metadata context the
//!   server agreed to (an unknown context id in a later reply is an error).

use std::collections::HashMap;

use bytes::{Buf as _, BufMut as _, Bytes, BytesMut};

/// `NBDMAGIC`.
pub const INIT_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`.
pub const OPT_MAGIC: u64 = 0x4948_4156_454f_5054;
/// Option reply magic.
pub const REP_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Request magic.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Simple reply magic.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Structured reply magic.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Largest option reply accepted (export lists and names are small).
pub const MAX_OPTION_REPLY: u32 = 64 * 1024;
/// Largest reply chunk payload accepted (a read is at most 32 MiB, plus its offset).
pub const MAX_CHUNK: u32 = (32 << 20) + 64;
/// Largest read asked for in one request.
pub const MAX_READ: u32 = 32 << 20;
/// Largest error message (the spec's limit).
const MAX_MESSAGE: usize = 4096;

const FLAG_FIXED_NEWSTYLE: u16 = 1;
const FLAG_NO_ZEROES: u16 = 2;
const OPT_GO: u32 = 7;
const OPT_STRUCTURED_REPLY: u32 = 8;
const OPT_SET_META_CONTEXT: u32 = 10;
const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const REP_META_CONTEXT: u32 = 4;
const INFO_EXPORT: u16 = 0;
const INFO_BLOCK_SIZE: u16 = 3;
const CMD_READ: u16 = 0;
const CMD_DISC: u16 = 2;
const CMD_BLOCK_STATUS: u16 = 7;
const REPLY_FLAG_DONE: u16 = 1;
const REPLY_NONE: u16 = 0;
const REPLY_OFFSET_DATA: u16 = 1;
const REPLY_OFFSET_HOLE: u16 = 2;
const REPLY_BLOCK_STATUS: u16 = 5;
const REPLY_ERROR: u16 = (1 << 15) + 1;
const REPLY_ERROR_OFFSET: u16 = (1 << 15) + 2;

/// `base:allocation` status: the extent is a hole (reads as zeroes unless [`STATE_ZERO`] is
/// clear and the server says otherwise).
pub const STATE_HOLE: u32 = 1;
/// `base:allocation` status: the extent reads as zeroes.
pub const STATE_ZERO: u32 = 2;
/// `qemu:dirty-bitmap:…` status: the extent changed since the bitmap was created.
pub const STATE_DIRTY: u32 = 1;

/// Why the protocol stopped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NbdError {
    /// The server broke the protocol (the text says how).
    #[error("NBD protocol error: {0}")]
    Protocol(String),
    /// The server refused an option (its reply type and message).
    #[error("the NBD server refused {option}: {message} (reply type {code:#x})")]
    Refused {
        /// The option.
        option: &'static str,
        /// Reply type (an `NBD_REP_ERR_*`).
        code: u32,
        /// The server's message.
        message: String,
    },
    /// The server lacks something the client needs.
    #[error("the NBD server does not support {0}")]
    Unsupported(&'static str),
}

fn protocol(msg: impl Into<String>) -> NbdError {
    NbdError::Protocol(msg.into())
}

/// What the handshake agreed on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Export {
    /// Size in bytes.
    pub size: u64,
    /// Transmission flags (`NBD_FLAG_*`).
    pub flags: u16,
    /// Block size constraints (minimum, preferred, maximum), when the server sent them.
    pub block_sizes: Option<(u32, u32, u32)>,
    /// Structured replies are on.
    pub structured: bool,
    /// The metadata contexts the server agreed to: (id, name).
    pub contexts: Vec<(u32, String)>,
}

impl Export {
    /// The id of context `name`, if the server agreed to it.
    pub fn context(&self, name: &str) -> Option<u32> {
        self.contexts.iter().find(|(_, n)| n == name).map(|(id, _)| *id)
    }

    /// The largest read to ask for: the server's maximum block size, at most [`MAX_READ`].
    pub fn max_read(&self) -> u32 {
        self.block_sizes
            .map_or(MAX_READ, |(_, _, max)| max.clamp(512, MAX_READ))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Greeting,
    Structured,
    MetaContext,
    Go,
    Done,
}

/// The client's handshake. Feed it what the server sent ([`ClientHandshake::feed`]), send what
/// [`ClientHandshake::take_output`] returns, until it yields the [`Export`].
#[derive(Debug)]
pub struct ClientHandshake {
    export: String,
    contexts: Vec<String>,
    phase: Phase,
    input: BytesMut,
    output: BytesMut,
    size: Option<(u64, u16)>,
    block_sizes: Option<(u32, u32, u32)>,
    structured: bool,
    agreed: Vec<(u32, String)>,
}

impl ClientHandshake {
    /// A handshake for export `export`, asking for metadata contexts `contexts` (none: no
    /// block status; structured replies are asked for in any case).
    pub fn new(export: &str, contexts: &[&str]) -> Self {
        ClientHandshake {
            export: export.to_owned(),
            contexts: contexts.iter().map(|c| (*c).to_owned()).collect(),
            phase: Phase::Greeting,
            input: BytesMut::new(),
            output: BytesMut::new(),
            size: None,
            block_sizes: None,
            structured: false,
            agreed: Vec::new(),
        }
    }

    /// Bytes to send to the server now.
    pub fn take_output(&mut self) -> Bytes {
        self.output.split().freeze()
    }

    /// Takes bytes from the server; `Ok(Some(export))` once the export is open (bytes after
    /// the handshake stay unread: there are none before the first request).
    pub fn feed(&mut self, data: &[u8]) -> Result<Option<Export>, NbdError> {
        self.input.extend_from_slice(data);
        loop {
            match self.phase {
                Phase::Done => return Err(protocol("data after the handshake ended")),
                Phase::Greeting => {
                    if self.input.len() < 18 {
                        return Ok(None);
                    }
                    let magic = self.input.get_u64();
                    let opt = self.input.get_u64();
                    let flags = self.input.get_u16();
                    if magic != INIT_MAGIC || opt != OPT_MAGIC {
                        return Err(protocol("not an NBD newstyle server"));
                    }
                    if flags & FLAG_FIXED_NEWSTYLE == 0 {
                        return Err(NbdError::Unsupported("the fixed newstyle handshake"));
                    }
                    let mut client = u32::from(FLAG_FIXED_NEWSTYLE);
                    if flags & FLAG_NO_ZEROES != 0 {
                        client |= u32::from(FLAG_NO_ZEROES);
                    }
                    self.output.put_u32(client);
                    self.option(OPT_STRUCTURED_REPLY, &[]);
                    self.phase = Phase::Structured;
                }
                Phase::Structured | Phase::MetaContext | Phase::Go => {
                    let Some((option, kind, payload)) = self.option_reply()? else {
                        return Ok(None);
                    };
                    if let Some(export) = self.on_reply(option, kind, payload)? {
                        return Ok(Some(export));
                    }
                }
            }
        }
    }

    fn option(&mut self, option: u32, data: &[u8]) {
        self.output.put_u64(OPT_MAGIC);
        self.output.put_u32(option);
        self.output.put_u32(u32::try_from(data.len()).unwrap_or(u32::MAX));
        self.output.put_slice(data);
    }

    /// One whole option reply from the input: (option, reply type, payload).
    fn option_reply(&mut self) -> Result<Option<(u32, u32, Bytes)>, NbdError> {
        if self.input.len() < 20 {
            return Ok(None);
        }
        let mut head = &self.input[..20];
        let magic = head.get_u64();
        let option = head.get_u32();
        let kind = head.get_u32();
        let len = head.get_u32();
        if magic != REP_MAGIC {
            return Err(protocol("bad option reply magic"));
        }
        if len > MAX_OPTION_REPLY {
            return Err(protocol(format!("option reply of {len} bytes")));
        }
        let len = len as usize;
        if self.input.len() < 20 + len {
            return Ok(None);
        }
        self.input.advance(20);
        Ok(Some((option, kind, self.input.split_to(len).freeze())))
    }

    fn expected_option(&self) -> u32 {
        match self.phase {
            Phase::Structured => OPT_STRUCTURED_REPLY,
            Phase::MetaContext => OPT_SET_META_CONTEXT,
            _ => OPT_GO,
        }
    }

    fn on_reply(&mut self, option: u32, kind: u32, mut payload: Bytes) -> Result<Option<Export>, NbdError> {
        if option != self.expected_option() {
            return Err(protocol(format!(
                "reply to option {option}, not to the one asked"
            )));
        }
        if kind & (1 << 31) != 0 {
            let message = String::from_utf8_lossy(&payload[..payload.len().min(MAX_MESSAGE)]).into_owned();
            return match self.phase {
                // Without structured replies there is no block status; reads still work.
                Phase::Structured if self.contexts.is_empty() => {
                    self.next_after_structured();
                    Ok(None)
                }
                Phase::Structured => Err(NbdError::Unsupported("structured replies")),
                Phase::MetaContext => Err(NbdError::Refused {
                    option: "NBD_OPT_SET_META_CONTEXT",
                    code: kind,
                    message,
                }),
                _ => Err(NbdError::Refused {
                    option: "NBD_OPT_GO",
                    code: kind,
                    message,
                }),
            };
        }
        match (self.phase, kind) {
            (Phase::Structured, REP_ACK) => {
                self.structured = true;
                self.next_after_structured();
                Ok(None)
            }
            (Phase::MetaContext, REP_META_CONTEXT) => {
                if payload.len() < 4 {
                    return Err(protocol("short metadata context reply"));
                }
                let id = payload.get_u32();
                let name =
                    String::from_utf8(payload.to_vec()).map_err(|_| protocol("context name not UTF-8"))?;
                if !self.contexts.contains(&name) {
                    return Err(protocol(format!("context {name:?} was not asked for")));
                }
                if self.agreed.iter().any(|(i, _)| *i == id) {
                    return Err(protocol(format!("context id {id} given twice")));
                }
                self.agreed.push((id, name));
                Ok(None)
            }
            (Phase::MetaContext, REP_ACK) => {
                if let Some(missing) = self
                    .contexts
                    .iter()
                    .find(|c| !self.agreed.iter().any(|(_, n)| n == *c))
                {
                    return Err(NbdError::Refused {
                        option: "NBD_OPT_SET_META_CONTEXT",
                        code: 0,
                        message: format!("the export has no {missing} context"),
                    });
                }
                self.go();
                Ok(None)
            }
            (Phase::Go, REP_INFO) => {
                if payload.len() < 2 {
                    return Err(protocol("short info reply"));
                }
                match payload.get_u16() {
                    INFO_EXPORT => {
                        if payload.len() != 10 {
                            return Err(protocol("bad NBD_INFO_EXPORT length"));
                        }
                        self.size = Some((payload.get_u64(), payload.get_u16()));
                    }
                    INFO_BLOCK_SIZE => {
                        if payload.len() != 12 {
                            return Err(protocol("bad NBD_INFO_BLOCK_SIZE length"));
                        }
                        self.block_sizes = Some((payload.get_u32(), payload.get_u32(), payload.get_u32()));
                    }
                    _ => {}
                }
                Ok(None)
            }
            (Phase::Go, REP_ACK) => {
                let (size, flags) = self
                    .size
                    .ok_or_else(|| protocol("NBD_OPT_GO ended without the export size"))?;
                self.phase = Phase::Done;
                Ok(Some(Export {
                    size,
                    flags,
                    block_sizes: self.block_sizes,
                    structured: self.structured,
                    contexts: std::mem::take(&mut self.agreed),
                }))
            }
            (_, kind) => Err(protocol(format!("unexpected option reply type {kind}"))),
        }
    }

    fn next_after_structured(&mut self) {
        if self.structured && !self.contexts.is_empty() {
            let mut data = BytesMut::new();
            put_name(&mut data, &self.export);
            data.put_u32(u32::try_from(self.contexts.len()).unwrap_or(u32::MAX));
            for c in &self.contexts {
                put_name(&mut data, c);
            }
            self.option(OPT_SET_META_CONTEXT, &data);
            self.phase = Phase::MetaContext;
        } else {
            self.go();
        }
    }

    fn go(&mut self) {
        let mut data = BytesMut::new();
        put_name(&mut data, &self.export);
        data.put_u16(1);
        data.put_u16(INFO_BLOCK_SIZE);
        self.option(OPT_GO, &data);
        self.phase = Phase::Go;
    }
}

fn put_name(b: &mut BytesMut, name: &str) {
    b.put_u32(u32::try_from(name.len()).unwrap_or(u32::MAX));
    b.put_slice(name.as_bytes());
}

/// A request of the transmission phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// Read `len` bytes at `offset`.
    Read {
        /// Offset.
        offset: u64,
        /// Length (at most the export's [`Export::max_read`]).
        len: u32,
    },
    /// The status of `len` bytes at `offset` in every agreed context.
    BlockStatus {
        /// Offset.
        offset: u64,
        /// Length.
        len: u32,
    },
    /// End the session (no reply).
    Disconnect,
}

/// One piece of a reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Chunk {
    /// Bytes of a read at `offset`.
    Data {
        /// Offset in the export.
        offset: u64,
        /// The bytes.
        data: Bytes,
    },
    /// A part of a read that reads as zeroes.
    Hole {
        /// Offset in the export.
        offset: u64,
        /// Length.
        len: u32,
    },
    /// Extents of a block status request in context `context`: (length, status flags).
    BlockStatus {
        /// The context id.
        context: u32,
        /// Consecutive extents from the request's offset.
        extents: Vec<(u32, u32)>,
    },
    /// The request failed (an errno value and the server's message).
    Error {
        /// NBD error (errno-like).
        code: u32,
        /// The message.
        message: String,
    },
}

/// A decoded reply piece for request `cookie`; `done` when it is the last one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// The request's cookie.
    pub cookie: u64,
    /// What it says (`None` for an empty final chunk).
    pub chunk: Option<Chunk>,
    /// The request is complete.
    pub done: bool,
}

/// The transmission phase: encodes requests, decodes replies for the requests in flight.
#[derive(Debug)]
pub struct Transmission {
    export: Export,
    next_cookie: u64,
    in_flight: HashMap<u64, Request>,
    input: BytesMut,
}

impl Transmission {
    /// The transmission phase of `export`.
    pub fn new(export: Export) -> Self {
        Transmission {
            export,
            next_cookie: 1,
            in_flight: HashMap::new(),
            input: BytesMut::new(),
        }
    }

    /// The export.
    pub fn export(&self) -> &Export {
        &self.export
    }

    /// Encodes `request`: its cookie and its bytes. A read or status past the end, or a read
    /// over [`Export::max_read`], is refused here.
    pub fn request(&mut self, request: Request) -> Result<(u64, Bytes), NbdError> {
        let (kind, offset, len) = match request {
            Request::Read { offset, len } => {
                if len == 0 || len > self.export.max_read() {
                    return Err(protocol(format!("read of {len} bytes")));
                }
                (CMD_READ, offset, len)
            }
            Request::BlockStatus { offset, len } => {
                if self.export.contexts.is_empty() {
                    return Err(NbdError::Unsupported("block status (no metadata context)"));
                }
                (CMD_BLOCK_STATUS, offset, len)
            }
            Request::Disconnect => (CMD_DISC, 0, 0),
        };
        if offset
            .checked_add(u64::from(len))
            .is_none_or(|end| end > self.export.size)
        {
            return Err(protocol("request past the end of the export"));
        }
        let cookie = self.next_cookie;
        self.next_cookie += 1;
        let mut b = BytesMut::with_capacity(28);
        b.put_u32(REQUEST_MAGIC);
        b.put_u16(0);
        b.put_u16(kind);
        b.put_u64(cookie);
        b.put_u64(offset);
        b.put_u32(len);
        if request != Request::Disconnect {
            self.in_flight.insert(cookie, request);
        }
        Ok((cookie, b.freeze()))
    }

    /// Requests not answered completely yet.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Takes bytes from the server and returns the reply pieces they complete.
    pub fn feed(&mut self, data: &[u8]) -> Result<Vec<Reply>, NbdError> {
        self.input.extend_from_slice(data);
        self.replies()
    }

    /// Where bytes from the server go without a copy: a reader appends to this buffer (it has
    /// room for at least `want` more bytes, and for a whole reply chunk once its header is in),
    /// then calls [`Transmission::replies`].
    pub fn input(&mut self, want: usize) -> &mut BytesMut {
        self.input.reserve(want);
        &mut self.input
    }

    /// The reply pieces completed by the bytes appended to [`Transmission::input`].
    pub fn replies(&mut self) -> Result<Vec<Reply>, NbdError> {
        let mut out = Vec::new();
        while let Some(reply) = self.next_reply()? {
            if reply.done {
                self.in_flight.remove(&reply.cookie);
            }
            out.push(reply);
        }
        Ok(out)
    }

    fn next_reply(&mut self) -> Result<Option<Reply>, NbdError> {
        if self.input.len() < 4 {
            return Ok(None);
        }
        let magic = (&self.input[..4]).get_u32();
        match magic {
            SIMPLE_REPLY_MAGIC => self.simple(),
            STRUCTURED_REPLY_MAGIC if self.export.structured => self.structured(),
            _ => Err(protocol(format!("bad reply magic {magic:#x}"))),
        }
    }

    fn request_of(&self, cookie: u64) -> Result<Request, NbdError> {
        self.in_flight
            .get(&cookie)
            .copied()
            .ok_or_else(|| protocol(format!("reply for cookie {cookie}, which is not in flight")))
    }

    fn simple(&mut self) -> Result<Option<Reply>, NbdError> {
        if self.input.len() < 16 {
            return Ok(None);
        }
        let mut head = &self.input[4..16];
        let error = head.get_u32();
        let cookie = head.get_u64();
        let request = self.request_of(cookie)?;
        let data_len = match request {
            Request::Read { len, .. } if error == 0 => len as usize,
            Request::BlockStatus { .. } if error == 0 => {
                return Err(protocol("a simple reply to a block status request"));
            }
            _ => 0,
        };
        if self.input.len() < 16 + data_len {
            self.input.reserve(16 + data_len - self.input.len());
            return Ok(None);
        }
        self.input.advance(16);
        let data = self.input.split_to(data_len).freeze();
        let chunk = if error != 0 {
            Chunk::Error {
                code: error,
                message: String::new(),
            }
        } else if let Request::Read { offset, .. } = request {
            Chunk::Data { offset, data }
        } else {
            return Err(protocol("unexpected simple reply"));
        };
        Ok(Some(Reply {
            cookie,
            chunk: Some(chunk),
            done: true,
        }))
    }

    fn structured(&mut self) -> Result<Option<Reply>, NbdError> {
        if self.input.len() < 20 {
            return Ok(None);
        }
        let mut head = &self.input[4..20];
        let flags = head.get_u16();
        let kind = head.get_u16();
        let cookie = head.get_u64();
        let len = head.get_u32();
        let request = self.request_of(cookie)?;
        if len > MAX_CHUNK {
            return Err(protocol(format!("reply chunk of {len} bytes")));
        }
        let len = len as usize;
        if self.input.len() < 20 + len {
            // Room for the whole chunk at once (its length is capped above), not by doubling.
            self.input.reserve(20 + len - self.input.len());
            return Ok(None);
        }
        self.input.advance(20);
        let mut p = self.input.split_to(len).freeze();
        let done = flags & REPLY_FLAG_DONE != 0;
        let (start, end) = match request {
            Request::Read { offset, len } | Request::BlockStatus { offset, len } => {
                (offset, offset + u64::from(len))
            }
            Request::Disconnect => (0, 0),
        };
        let chunk = match kind {
            REPLY_NONE => {
                if !p.is_empty() || !done {
                    return Err(protocol("NBD_REPLY_TYPE_NONE with data or not final"));
                }
                None
            }
            REPLY_OFFSET_DATA | REPLY_OFFSET_HOLE if !matches!(request, Request::Read { .. }) => {
                return Err(protocol("read data for a request that is not a read"));
            }
            REPLY_OFFSET_DATA => {
                if p.len() < 9 {
                    return Err(protocol("short NBD_REPLY_TYPE_OFFSET_DATA"));
                }
                let offset = p.get_u64();
                if offset < start || offset + p.len() as u64 > end {
                    return Err(protocol("read data outside the request"));
                }
                Some(Chunk::Data { offset, data: p })
            }
            REPLY_OFFSET_HOLE => {
                if p.len() != 12 {
                    return Err(protocol("bad NBD_REPLY_TYPE_OFFSET_HOLE length"));
                }
                let offset = p.get_u64();
                let hole = p.get_u32();
                if hole == 0 || offset < start || offset + u64::from(hole) > end {
                    return Err(protocol("a hole outside the request"));
                }
                Some(Chunk::Hole { offset, len: hole })
            }
            REPLY_BLOCK_STATUS => {
                if !matches!(request, Request::BlockStatus { .. }) {
                    return Err(protocol("block status for a request that is not one"));
                }
                if p.len() < 12 || !(p.len() - 4).is_multiple_of(8) {
                    return Err(protocol("bad NBD_REPLY_TYPE_BLOCK_STATUS length"));
                }
                let context = p.get_u32();
                if !self.export.contexts.iter().any(|(id, _)| *id == context) {
                    return Err(protocol(format!("block status for unknown context {context}")));
                }
                let mut extents = Vec::with_capacity(p.len() / 8);
                let mut covered = 0u64;
                while p.has_remaining() {
                    let l = p.get_u32();
                    let f = p.get_u32();
                    if l == 0 {
                        return Err(protocol("an empty extent"));
                    }
                    covered += u64::from(l);
                    extents.push((l, f));
                }
                // The last extent may run past the request, never past the export.
                if start + covered > self.export.size.max(end) {
                    return Err(protocol("extents past the end of the export"));
                }
                Some(Chunk::BlockStatus { context, extents })
            }
            REPLY_ERROR | REPLY_ERROR_OFFSET => {
                if p.len() < 6 {
                    return Err(protocol("short error chunk"));
                }
                let code = p.get_u32();
                let mlen = usize::from(p.get_u16());
                if mlen > MAX_MESSAGE || p.len() < mlen {
                    return Err(protocol("bad error message length"));
                }
                let message = String::from_utf8_lossy(&p[..mlen]).into_owned();
                Some(Chunk::Error { code, message })
            }
            other if other & (1 << 15) != 0 => Some(Chunk::Error {
                code: 5,
                message: format!("unknown error chunk type {other}"),
            }),
            other => return Err(protocol(format!("unknown reply chunk type {other}"))),
        };
        Ok(Some(Reply { cookie, chunk, done }))
    }
}

/// Extents of one context from consecutive [`Chunk::BlockStatus`] answers, cut to `len` bytes
/// from `offset`: (offset, length, flags), merged when neighbours share flags.
pub fn extents_from(offset: u64, len: u64, raw: &[(u32, u32)]) -> Vec<(u64, u64, u32)> {
    let end = offset.saturating_add(len);
    let mut out: Vec<(u64, u64, u32)> = Vec::new();
    let mut at = offset;
    for &(l, f) in raw {
        if at >= end {
            break;
        }
        let l = u64::from(l).min(end - at);
        match out.last_mut() {
            Some(last) if last.2 == f && last.0 + last.1 == at => last.1 += l,
            _ => out.push((at, l, f)),
        }
        at += l;
    }
    out
}

#[cfg(test)]
mod tests;
