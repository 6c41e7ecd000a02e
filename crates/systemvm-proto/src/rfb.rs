//! The RFB (VNC) handshake, as sans-I/O state machines.
//!
//! The console proxy is an RFB *security proxy*: it completes the handshake with the hypervisor's VNC
//! server itself ([`ClientHandshake`], which knows the VNC password), then offers the browser RFB 3.8
//! with security type None only ([`ServerHandshake`]), so stock noVNC connects and never learns a
//! hypervisor credential. After both handshakes it relays bytes unchanged; [`InputFilter`] follows
//! the browser's messages to drop input and VM control (XVP, SetDesktopSize) on view-only sessions
//! and to tell input from the rest
//! (noVNC's steady FramebufferUpdateRequests) for the idle timeout.
//!
//! Each machine is fed whatever bytes arrived (`advance`) and answers with bytes to send and, at the
//! end, the result. Untrusted input yields [`RfbError`], never a panic; every length read from the
//! wire is capped.

use des::Des;
use des::cipher::{BlockEncrypt, KeyInit};

/// Longest failure reason or desktop name accepted from a peer.
pub const MAX_TEXT_LEN: u32 = 64 * 1024;

/// The version string the proxy offers to browsers.
pub const SERVER_VERSION: &[u8; 12] = b"RFB 003.008\n";

/// RFB protocol versions as negotiated (3.5 and other odd minors count as 3.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum RfbVersion {
    /// 3.3: the server picks the security type.
    V3_3,
    /// 3.7: the client picks; no SecurityResult after None.
    V3_7,
    /// 3.8: the client picks; SecurityResult always, with a reason on failure.
    V3_8,
}

impl RfbVersion {
    /// Parses a 12-byte ProtocolVersion message.
    pub fn parse(msg: &[u8]) -> Result<Self, RfbError> {
        let bad = || RfbError::BadVersion(String::from_utf8_lossy(msg).trim_end().chars().take(12).collect());
        if msg.len() != 12 || &msg[..4] != b"RFB " || msg[7] != b'.' || msg[11] != b'\n' {
            return Err(bad());
        }
        let num = |s: &[u8]| -> Option<u32> {
            if s.iter().all(u8::is_ascii_digit) {
                std::str::from_utf8(s).ok()?.parse().ok()
            } else {
                None
            }
        };
        let (major, minor) = (
            num(&msg[4..7]).ok_or_else(bad)?,
            num(&msg[8..11]).ok_or_else(bad)?,
        );
        match (major, minor) {
            (3, 7) => Ok(RfbVersion::V3_7),
            (3, 3..=6) => Ok(RfbVersion::V3_3),
            (3, m) if m >= 8 => Ok(RfbVersion::V3_8),
            // Apple's 3.889 and the 4.x/5.x versions some servers announce speak 3.8.
            (4 | 5, _) => Ok(RfbVersion::V3_8),
            _ => Err(bad()),
        }
    }

    /// The 12-byte ProtocolVersion message for this version.
    pub fn message(self) -> &'static [u8; 12] {
        match self {
            RfbVersion::V3_3 => b"RFB 003.003\n",
            RfbVersion::V3_7 => b"RFB 003.007\n",
            RfbVersion::V3_8 => b"RFB 003.008\n",
        }
    }
}

/// RFB security type numbers the proxy knows.
pub mod security {
    /// Security type 0 in RFB 3.3: failure, a reason follows.
    pub const INVALID: u8 = 0;
    /// No authentication.
    pub const NONE: u8 = 1;
    /// VNC Authentication (DES challenge-response).
    pub const VNC_AUTH: u8 = 2;
    /// VeNCrypt (TLS, X509 subtypes).
    pub const VENCRYPT: u8 = 19;
}

/// Why an RFB handshake failed. Messages are phrased for the person at the console.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RfbError {
    /// The peer's ProtocolVersion is not one we speak.
    #[error("unsupported RFB version {0:?}")]
    BadVersion(String),
    /// The server refused the connection before authentication.
    #[error("VNC server refused the connection: {0}")]
    ServerRefused(String),
    /// No offered security type is one the proxy can complete.
    #[error("VNC server offers no supported security type (offered {offered:?})")]
    NoSupportedSecurity {
        /// The types the server offered.
        offered: Vec<u8>,
    },
    /// The server wants a password and the token carries none.
    #[error("VNC server requires a password and none was provided")]
    PasswordRequired,
    /// The server rejected our authentication.
    #[error("VNC authentication failed: {0}")]
    AuthFailed(String),
    /// A length field is over the cap.
    #[error("RFB {what} too long ({len} bytes)")]
    TooLong {
        /// Which field.
        what: &'static str,
        /// Its announced length.
        len: u32,
    },
    /// The client chose a security type we did not offer.
    #[error("client chose security type {0}, only None (1) is offered")]
    BadClientChoice(u8),
    /// A client message type the input filter does not know.
    #[error("unknown RFB client message type {0}")]
    UnknownClientMessage(u8),
    /// The server sent bytes the protocol does not allow at this point.
    #[error("RFB protocol error: {0}")]
    Protocol(&'static str),
}

/// The ServerInit message: framebuffer size, pixel format, desktop name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerInit {
    /// Framebuffer width in pixels.
    pub width: u16,
    /// Framebuffer height in pixels.
    pub height: u16,
    /// The 16-byte PIXEL_FORMAT, passed through unchanged.
    pub pixel_format: [u8; 16],
    /// Desktop name bytes (UTF-8 on 3.8 servers, Latin-1 on some older ones).
    pub name: Vec<u8>,
}

impl ServerInit {
    /// Encodes the message, with `name` replacing the desktop name when given.
    pub fn encode(&self, name: Option<&str>) -> Vec<u8> {
        let name = name.map_or(&self.name[..], str::as_bytes);
        let name = &name[..name.len().min(MAX_TEXT_LEN as usize)];
        let mut out = Vec::with_capacity(24 + name.len());
        out.extend_from_slice(&self.width.to_be_bytes());
        out.extend_from_slice(&self.height.to_be_bytes());
        out.extend_from_slice(&self.pixel_format);
        out.extend_from_slice(&u32::try_from(name.len()).unwrap_or(0).to_be_bytes());
        out.extend_from_slice(name);
        out
    }
}

/// What one `advance` call produced.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Progress<T> {
    /// Bytes to send to the peer now (possibly empty).
    pub send: Vec<u8>,
    /// Set when the handshake is complete.
    pub done: Option<T>,
}

/// Reads big-endian integers and byte strings from the front of a buffer, all or nothing.
struct Input {
    buf: Vec<u8>,
    pos: usize,
}

impl Input {
    fn available(&self) -> usize {
        self.buf.len() - self.pos
    }
    fn peek(&self, n: usize) -> Option<&[u8]> {
        self.buf.get(self.pos..self.pos.checked_add(n)?)
    }
    fn take(&mut self, n: usize) -> Option<&[u8]> {
        let start = self.pos;
        let end = start.checked_add(n)?;
        if end > self.buf.len() {
            return None;
        }
        self.pos = end;
        Some(&self.buf[start..end])
    }
    fn u32_at(&self, off: usize) -> Option<u32> {
        let b = self.buf.get(self.pos + off..self.pos + off + 4)?;
        Some(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    /// A u32 length followed by that many bytes; `None` until all are here.
    fn text(&mut self, what: &'static str) -> Result<Option<String>, RfbError> {
        let Some(len) = self.u32_at(0) else {
            return Ok(None);
        };
        if len > MAX_TEXT_LEN {
            return Err(RfbError::TooLong { what, len });
        }
        if self.available() < 4 + len as usize {
            return Ok(None);
        }
        self.pos += 4;
        let bytes = self.take(len as usize).unwrap_or_default();
        Ok(Some(
            String::from_utf8_lossy(bytes).trim_end_matches('\0').to_owned(),
        ))
    }
    fn compact(&mut self) {
        if self.pos > 0 {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
    }
    /// Bytes received beyond the handshake.
    fn rest(&mut self) -> Vec<u8> {
        self.compact();
        std::mem::take(&mut self.buf)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ClientState {
    Version,
    SecurityTypes,
    Failure { auth: bool },
    VncChallenge,
    SecurityResult,
    ServerInit,
    Done,
}

/// The proxy's side of the handshake toward a VNC server (the proxy is the RFB client).
pub struct ClientHandshake {
    input: Input,
    state: ClientState,
    version: RfbVersion,
    password: Option<Vec<u8>>,
    shared: bool,
    chosen: u8,
}

/// The outcome of [`ClientHandshake`].
#[derive(Debug, PartialEq, Eq)]
pub struct ClientDone {
    /// The negotiated version.
    pub version: RfbVersion,
    /// The security type used.
    pub security: u8,
    /// The server's ServerInit.
    pub server_init: ServerInit,
    /// Bytes the server sent after ServerInit (start of the relay).
    pub rest: Vec<u8>,
}

impl ClientHandshake {
    /// A handshake that authenticates with `password` when the server asks for one, and asks the
    /// server to keep other clients connected when `shared` is true.
    pub fn new(password: Option<&str>, shared: bool) -> Self {
        ClientHandshake {
            input: Input {
                buf: Vec::with_capacity(64),
                pos: 0,
            },
            state: ClientState::Version,
            version: RfbVersion::V3_8,
            password: password.map(|p| p.as_bytes().to_vec()),
            shared,
            chosen: 0,
        }
    }

    /// Feeds bytes received from the server; returns what to send and, at the end, the result.
    pub fn advance(&mut self, data: &[u8]) -> Result<Progress<ClientDone>, RfbError> {
        if self.state == ClientState::Done {
            return Err(RfbError::Protocol("handshake already complete"));
        }
        self.input.buf.extend_from_slice(data);
        let mut out = Progress {
            send: Vec::new(),
            done: None,
        };
        loop {
            let before = (self.state, self.input.pos);
            self.step(&mut out)?;
            if out.done.is_some() || before == (self.state, self.input.pos) {
                break;
            }
        }
        self.input.compact();
        Ok(out)
    }

    fn step(&mut self, out: &mut Progress<ClientDone>) -> Result<(), RfbError> {
        match self.state {
            ClientState::Version => {
                let Some(msg) = self.input.take(12) else {
                    return Ok(());
                };
                self.version = RfbVersion::parse(msg)?;
                out.send.extend_from_slice(self.version.message());
                self.state = ClientState::SecurityTypes;
            }
            ClientState::SecurityTypes => match self.version {
                RfbVersion::V3_3 => {
                    let Some(t) = self.input.u32_at(0) else {
                        return Ok(());
                    };
                    self.input.pos += 4;
                    match t {
                        0 => self.state = ClientState::Failure { auth: false },
                        1 | 2 => self.choose(u8::try_from(t).unwrap_or(0), false, out)?,
                        other => {
                            return Err(RfbError::NoSupportedSecurity {
                                offered: vec![u8::try_from(other).unwrap_or(u8::MAX)],
                            });
                        }
                    }
                }
                RfbVersion::V3_7 | RfbVersion::V3_8 => {
                    let Some(&[count]) = self.input.peek(1) else {
                        return Ok(());
                    };
                    if count == 0 {
                        self.input.pos += 1;
                        self.state = ClientState::Failure { auth: false };
                        return Ok(());
                    }
                    let Some(list) = self.input.peek(1 + count as usize) else {
                        return Ok(());
                    };
                    let offered = list[1..].to_vec();
                    self.input.pos += 1 + count as usize;
                    let pick = pick_security(&offered, self.password.is_some())
                        .ok_or_else(|| no_supported(&offered, self.password.is_some()))?;
                    self.choose(pick, true, out)?;
                }
            },
            ClientState::Failure { auth } => {
                let Some(reason) = self.input.text("failure reason")? else {
                    return Ok(());
                };
                return Err(if auth {
                    RfbError::AuthFailed(reason)
                } else {
                    RfbError::ServerRefused(reason)
                });
            }
            ClientState::VncChallenge => {
                let Some(challenge) = self.input.take(16) else {
                    return Ok(());
                };
                let password = self.password.as_deref().ok_or(RfbError::PasswordRequired)?;
                out.send
                    .extend_from_slice(&vnc_auth_response(password, challenge));
                self.state = ClientState::SecurityResult;
            }
            ClientState::SecurityResult => {
                let Some(result) = self.input.u32_at(0) else {
                    return Ok(());
                };
                self.input.pos += 4;
                if result == 0 {
                    out.send.push(u8::from(self.shared));
                    self.state = ClientState::ServerInit;
                } else if self.version == RfbVersion::V3_8 {
                    self.state = ClientState::Failure { auth: true };
                } else {
                    return Err(RfbError::AuthFailed("no reason given".into()));
                }
            }
            ClientState::ServerInit => {
                let Some(name_len) = self.input.u32_at(20) else {
                    return Ok(());
                };
                if name_len > MAX_TEXT_LEN {
                    return Err(RfbError::TooLong {
                        what: "desktop name",
                        len: name_len,
                    });
                }
                let Some(msg) = self.input.take(24 + name_len as usize) else {
                    return Ok(());
                };
                let mut pixel_format = [0u8; 16];
                pixel_format.copy_from_slice(&msg[4..20]);
                let server_init = ServerInit {
                    width: u16::from_be_bytes([msg[0], msg[1]]),
                    height: u16::from_be_bytes([msg[2], msg[3]]),
                    pixel_format,
                    name: msg[24..].to_vec(),
                };
                self.state = ClientState::Done;
                out.done = Some(ClientDone {
                    version: self.version,
                    security: self.chosen,
                    server_init,
                    rest: self.input.rest(),
                });
            }
            ClientState::Done => {}
        }
        Ok(())
    }

    fn choose(&mut self, pick: u8, send: bool, out: &mut Progress<ClientDone>) -> Result<(), RfbError> {
        if send {
            out.send.push(pick);
        }
        self.chosen = pick;
        match pick {
            security::NONE if self.version == RfbVersion::V3_8 => self.state = ClientState::SecurityResult,
            security::NONE => {
                out.send.push(u8::from(self.shared));
                self.state = ClientState::ServerInit;
            }
            security::VNC_AUTH => {
                if self.password.is_none() {
                    return Err(RfbError::PasswordRequired);
                }
                self.state = ClientState::VncChallenge;
            }
            _ => return Err(RfbError::NoSupportedSecurity { offered: vec![pick] }),
        }
        Ok(())
    }
}

/// Picks a security type from the server's list: the server's order, among the types we can complete.
/// VNC Authentication needs a password; VeNCrypt slots in here when its TLS step is added.
fn pick_security(offered: &[u8], have_password: bool) -> Option<u8> {
    offered
        .iter()
        .copied()
        .find(|&t| t == security::NONE || (t == security::VNC_AUTH && have_password))
}

fn no_supported(offered: &[u8], have_password: bool) -> RfbError {
    if !have_password && offered.contains(&security::VNC_AUTH) {
        RfbError::PasswordRequired
    } else {
        RfbError::NoSupportedSecurity {
            offered: offered.to_vec(),
        }
    }
}

/// The VNC Authentication response: each 8-byte half of the challenge DES-encrypted with the password
/// (cut or zero-padded to 8 bytes, each byte's bits reversed, as RFB specifies).
pub fn vnc_auth_response(password: &[u8], challenge: &[u8]) -> [u8; 16] {
    let mut key = [0u8; 8];
    for (k, p) in key.iter_mut().zip(password) {
        *k = p.reverse_bits();
    }
    let cipher = Des::new(&key.into());
    let mut out = [0u8; 16];
    out[..challenge.len().min(16)].copy_from_slice(&challenge[..challenge.len().min(16)]);
    for half in out.chunks_exact_mut(8) {
        cipher.encrypt_block(half.into());
    }
    out
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ServerState {
    Version,
    Choice,
    ClientInit,
    Done,
}

/// The proxy's side of the handshake toward the browser (the proxy is the RFB server, offering
/// security type None only). Start by sending [`SERVER_VERSION`].
pub struct ServerHandshake {
    input: Input,
    state: ServerState,
    version: RfbVersion,
}

/// The outcome of [`ServerHandshake`].
#[derive(Debug, PartialEq, Eq)]
pub struct ServerDone {
    /// The version the client chose.
    pub version: RfbVersion,
    /// The client's shared flag.
    pub shared: bool,
    /// Bytes the client sent after ClientInit (its first messages).
    pub rest: Vec<u8>,
}

impl Default for ServerHandshake {
    fn default() -> Self {
        Self::new()
    }
}

impl ServerHandshake {
    /// A handshake waiting for the client's ProtocolVersion.
    pub fn new() -> Self {
        ServerHandshake {
            input: Input {
                buf: Vec::with_capacity(16),
                pos: 0,
            },
            state: ServerState::Version,
            version: RfbVersion::V3_8,
        }
    }

    /// Feeds bytes received from the client. After it reports done, send the ServerInit.
    pub fn advance(&mut self, data: &[u8]) -> Result<Progress<ServerDone>, RfbError> {
        if self.state == ServerState::Done {
            return Err(RfbError::Protocol("handshake already complete"));
        }
        self.input.buf.extend_from_slice(data);
        let mut out = Progress {
            send: Vec::new(),
            done: None,
        };
        loop {
            let before = (self.state, self.input.pos);
            match self.state {
                ServerState::Version => {
                    if let Some(msg) = self.input.take(12) {
                        self.version = RfbVersion::parse(msg)?;
                        if self.version == RfbVersion::V3_3 {
                            out.send
                                .extend_from_slice(&u32::from(security::NONE).to_be_bytes());
                            self.state = ServerState::ClientInit;
                        } else {
                            out.send.extend_from_slice(&[1, security::NONE]);
                            self.state = ServerState::Choice;
                        }
                    }
                }
                ServerState::Choice => {
                    if let Some(&[choice]) = self.input.take(1) {
                        if choice != security::NONE {
                            if self.version == RfbVersion::V3_8 {
                                let reason = b"only security type None is offered";
                                out.send.extend_from_slice(&1u32.to_be_bytes());
                                out.send.extend_from_slice(&(reason.len() as u32).to_be_bytes());
                                out.send.extend_from_slice(reason);
                            }
                            return Err(RfbError::BadClientChoice(choice));
                        }
                        if self.version == RfbVersion::V3_8 {
                            out.send.extend_from_slice(&0u32.to_be_bytes());
                        }
                        self.state = ServerState::ClientInit;
                    }
                }
                ServerState::ClientInit => {
                    if let Some(&[shared]) = self.input.take(1) {
                        self.state = ServerState::Done;
                        out.done = Some(ServerDone {
                            version: self.version,
                            shared: shared != 0,
                            rest: self.input.rest(),
                        });
                    }
                }
                ServerState::Done => {}
            }
            if out.done.is_some() || before == (self.state, self.input.pos) {
                break;
            }
        }
        self.input.compact();
        Ok(out)
    }
}

/// Splits the client-to-server byte stream (the messages after ClientInit) into RFB messages and
/// tells apart input events (KeyEvent, PointerEvent, ClientCutText, QEMU extended KeyEvent) and
/// VM control (XVP shutdown/reboot/reset, SetDesktopSize) from the rest: [`InputFilter::filter`]
/// drops both kinds (view-only sessions), [`InputFilter::observe`] counts input events (the idle
/// timeout; VM control is not keyboard or mouse input). Messages may span calls; one filter
/// follows one stream.
///
/// Invariants: both methods split the same way (one parser, `client_message_len`), so for any
/// bytes they count the same input events and fail at the same point; what `filter` passes holds
/// no input event and no VM control; an unknown message type or an oversized clipboard is an
/// [`RfbError`], never a panic or an unbounded buffer.
#[derive(Debug, Default)]
pub struct InputFilter {
    /// What to do with the next bytes of the current message.
    remaining: Remaining,
    /// The start of a message whose length is not known yet (held back, not emitted).
    held: Vec<u8>,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Remaining {
    /// At a message boundary.
    #[default]
    Boundary,
    /// Pass this many more bytes.
    Pass(usize),
    /// Drop this many more bytes.
    Drop(usize),
}

/// Longest header needed to know a client message's length (Fence: its length byte is at offset 8).
const MAX_HEAD: usize = 9;

impl InputFilter {
    /// Appends to `out` the bytes of `data` that belong to messages other than input events and
    /// VM control; returns how many input events begin in `data`.
    pub fn filter(&mut self, data: &[u8], out: &mut Vec<u8>) -> Result<usize, RfbError> {
        self.split(data, Some(out))
    }

    /// Follows `data` without copying anything; returns how many input events begin in it.
    pub fn observe(&mut self, data: &[u8]) -> Result<usize, RfbError> {
        self.split(data, None)
    }

    fn split(&mut self, mut data: &[u8], mut out: Option<&mut Vec<u8>>) -> Result<usize, RfbError> {
        let mut inputs = 0;
        while !data.is_empty() {
            match self.remaining {
                Remaining::Pass(n) | Remaining::Drop(n) => {
                    let k = n.min(data.len());
                    let pass = matches!(self.remaining, Remaining::Pass(_));
                    if pass && let Some(out) = out.as_deref_mut() {
                        out.extend_from_slice(&data[..k]);
                    }
                    self.remaining = match (n - k, pass) {
                        (0, _) => Remaining::Boundary,
                        (left, true) => Remaining::Pass(left),
                        (left, false) => Remaining::Drop(left),
                    };
                    data = &data[k..];
                }
                Remaining::Boundary => {
                    let held = self.held.len();
                    let take = (MAX_HEAD - held).min(data.len());
                    self.held.extend_from_slice(&data[..take]);
                    match client_message_len(&self.held)? {
                        None if self.held.len() < MAX_HEAD => {
                            // Need more bytes to know the length; keep what we have.
                            return Ok(inputs);
                        }
                        None => return Err(RfbError::Protocol("client message header unreadable")),
                        Some((len, kind)) => {
                            // The message is the held bytes plus bytes from `data` onwards.
                            if kind == MessageKind::Input {
                                inputs += 1;
                            }
                            let pass = kind == MessageKind::Other;
                            if pass && let Some(out) = out.as_deref_mut() {
                                out.extend_from_slice(&self.held[..held]);
                            }
                            self.held.clear();
                            let left = len.saturating_sub(held);
                            self.remaining = if pass {
                                Remaining::Pass(left)
                            } else {
                                Remaining::Drop(left)
                            };
                        }
                    }
                }
            }
        }
        Ok(inputs)
    }
}

/// What a client message is to a view-only session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MessageKind {
    /// Keyboard, mouse or clipboard input: dropped, and counted (the idle timeout).
    Input,
    /// Changes the VM itself (XVP power actions, SetDesktopSize): dropped, not counted.
    VmControl,
    /// Everything else (pixel format, encodings, update requests, fences, audio): passed.
    Other,
}

/// The total length of the client message starting at `head`, and its kind; `None` when more
/// header bytes are needed.
fn client_message_len(head: &[u8]) -> Result<Option<(usize, MessageKind)>, RfbError> {
    use MessageKind::{Input, Other, VmControl};
    let Some(&kind) = head.first() else {
        return Ok(None);
    };
    let u16_at = |i: usize| {
        head.get(i..i + 2)
            .map(|b| usize::from(u16::from_be_bytes([b[0], b[1]])))
    };
    let i32_at = |i: usize| {
        head.get(i..i + 4)
            .map(|b| i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    };
    Ok(Some(match kind {
        0 => (20, Other), // SetPixelFormat
        2 => match u16_at(2) {
            // SetEncodings
            Some(n) => (4 + 4 * n, Other),
            None => return Ok(None),
        },
        3 => (10, Other), // FramebufferUpdateRequest
        4 => (8, Input),  // KeyEvent
        5 => match head.get(1) {
            // PointerEvent; with the marker bit, ExtendedMouseButtons' 7-byte form (noVNC sends it
            // once the server announced the pseudo-encoding, and masks the bit off otherwise).
            Some(mask) if mask & 0x80 != 0 => (7, Input),
            Some(_) => (6, Input),
            None => return Ok(None),
        },
        6 => match i32_at(4) {
            // ClientCutText (extended: negative)
            Some(n) => {
                let n = n.unsigned_abs() as usize;
                if n > MAX_TEXT_LEN as usize * 16 {
                    return Err(RfbError::TooLong {
                        what: "clipboard",
                        len: u32::try_from(n).unwrap_or(u32::MAX),
                    });
                }
                (8 + n, Input)
            }
            None => return Ok(None),
        },
        150 => (10, Other), // EnableContinuousUpdates
        248 => match head.get(8) {
            // Fence
            Some(&n) => (9 + usize::from(n), Other),
            None => return Ok(None),
        },
        250 => (4, VmControl), // xvp: shutdown, reboot, reset
        251 => match head.get(6) {
            // SetDesktopSize
            Some(&n) => (8 + 16 * usize::from(n), VmControl),
            None => return Ok(None),
        },
        255 => match head.get(1) {
            // QEMU
            Some(0) => (12, Input), // extended key event
            Some(1) => match u16_at(2) {
                // audio
                Some(0 | 1) => (4, Other),
                Some(2) => (10, Other),
                Some(_) => return Err(RfbError::UnknownClientMessage(255)),
                None => return Ok(None),
            },
            Some(_) => return Err(RfbError::UnknownClientMessage(255)),
            None => return Ok(None),
        },
        other => return Err(RfbError::UnknownClientMessage(other)),
    }))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn server_init_bytes(name: &str) -> Vec<u8> {
        ServerInit {
            width: 720,
            height: 400,
            pixel_format: [7; 16],
            name: name.as_bytes().to_vec(),
        }
        .encode(None)
    }

    /// Drives a client handshake against a scripted server, feeding `chunk` bytes at a time.
    fn run_client(
        script: &[u8],
        password: Option<&str>,
        chunk: usize,
    ) -> (Vec<u8>, Result<Option<ClientDone>, RfbError>) {
        let mut hs = ClientHandshake::new(password, true);
        let mut sent = Vec::new();
        for piece in script.chunks(chunk.max(1)) {
            match hs.advance(piece) {
                Ok(p) => {
                    sent.extend_from_slice(&p.send);
                    if let Some(done) = p.done {
                        return (sent, Ok(Some(done)));
                    }
                }
                Err(e) => return (sent, Err(e)),
            }
        }
        (sent, Ok(None))
    }

    #[test]
    fn versions() {
        assert_eq!(RfbVersion::parse(b"RFB 003.008\n"), Ok(RfbVersion::V3_8));
        assert_eq!(RfbVersion::parse(b"RFB 003.007\n"), Ok(RfbVersion::V3_7));
        assert_eq!(RfbVersion::parse(b"RFB 003.005\n"), Ok(RfbVersion::V3_3));
        assert_eq!(RfbVersion::parse(b"RFB 003.889\n"), Ok(RfbVersion::V3_8));
        assert_eq!(RfbVersion::parse(b"RFB 004.001\n"), Ok(RfbVersion::V3_8));
        assert!(RfbVersion::parse(b"RFB 000.000\n").is_err());
        assert!(RfbVersion::parse(b"RFB 003.00x\n").is_err());
        assert!(RfbVersion::parse(b"SSH-2.0-Open").is_err());
    }

    #[test]
    fn none_3_8() {
        let mut script = b"RFB 003.008\n".to_vec();
        script.extend_from_slice(&[1, 1, 0, 0, 0, 0]);
        script.extend_from_slice(&server_init_bytes("QEMU"));
        script.extend_from_slice(&[0, 0, 0, 1]); // first server message bytes
        for chunk in [1, 3, 100] {
            let (sent, done) = run_client(&script, None, chunk);
            let done = done.unwrap().unwrap();
            assert_eq!(sent, b"RFB 003.008\n\x01\x01");
            assert_eq!(done.server_init.name, b"QEMU");
            assert_eq!(done.server_init.width, 720);
            assert_eq!(done.security, security::NONE);
            if chunk == 100 {
                assert_eq!(done.rest, vec![0, 0, 0, 1]);
            }
        }
    }

    /// The VNC Authentication vector QEMU and TigerVNC agree on: password "secret12".
    #[test]
    fn vnc_auth_3_8_and_known_answer() {
        let challenge: Vec<u8> = (0u8..16).collect();
        let expect = vnc_auth_response(b"secret12", &challenge);
        // Same key cut to 8 bytes.
        assert_eq!(expect, vnc_auth_response(b"secret12-and-more", &challenge));
        // Independent DES check: key bytes bit-reversed, ECB over each half.
        let key: Vec<u8> = b"secret12".iter().map(|b| b.reverse_bits()).collect();
        let des = Des::new_from_slice(&key).unwrap();
        let mut block = [0u8; 8];
        block.copy_from_slice(&challenge[..8]);
        des.encrypt_block((&mut block).into());
        assert_eq!(&expect[..8], &block);

        let mut script = b"RFB 003.008\n".to_vec();
        script.extend_from_slice(&[2, 19, 2]);
        script.extend_from_slice(&challenge);
        script.extend_from_slice(&[0, 0, 0, 0]);
        script.extend_from_slice(&server_init_bytes("vm"));
        let (sent, done) = run_client(&script, Some("secret12"), 5);
        assert!(done.unwrap().is_some());
        let mut want = b"RFB 003.008\n\x02".to_vec();
        want.extend_from_slice(&expect);
        want.push(1);
        assert_eq!(sent, want);
    }

    #[test]
    fn auth_failure_reason_3_8() {
        let mut script = b"RFB 003.008\n".to_vec();
        script.extend_from_slice(&[1, 2]);
        script.extend_from_slice(&[9; 16]);
        script.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 22]);
        script.extend_from_slice(b"Authentication failed\0");
        let (_, res) = run_client(&script, Some("wrong"), 7);
        assert_eq!(
            res.unwrap_err(),
            RfbError::AuthFailed("Authentication failed".into())
        );
    }

    #[test]
    fn refusals() {
        let mut script = b"RFB 003.008\n".to_vec();
        script.extend_from_slice(&[0, 0, 0, 0, 4]);
        script.extend_from_slice(b"busy");
        assert_eq!(
            run_client(&script, None, 2).1.unwrap_err(),
            RfbError::ServerRefused("busy".into())
        );

        let mut script = b"RFB 003.008\n".to_vec();
        script.extend_from_slice(&[1, 2]);
        assert_eq!(
            run_client(&script, None, 64).1.unwrap_err(),
            RfbError::PasswordRequired
        );

        let mut script = b"RFB 003.008\n".to_vec();
        script.extend_from_slice(&[1, 19]);
        assert_eq!(
            run_client(&script, Some("pw"), 64).1.unwrap_err(),
            RfbError::NoSupportedSecurity { offered: vec![19] }
        );

        let mut script = b"RFB 003.008\n".to_vec();
        script.extend_from_slice(&[1, 1, 0, 0, 0, 0, 0, 1, 0, 1]);
        script.extend_from_slice(&[0; 16]);
        script.extend_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(
            run_client(&script, None, 64).1,
            Err(RfbError::TooLong { .. })
        ));
    }

    #[test]
    fn rfb_3_3_and_3_7() {
        let mut script = b"RFB 003.003\n".to_vec();
        script.extend_from_slice(&[0, 0, 0, 2]);
        script.extend_from_slice(&[1; 16]);
        script.extend_from_slice(&[0, 0, 0, 0]);
        script.extend_from_slice(&server_init_bytes("old"));
        let (sent, done) = run_client(&script, Some("pw"), 3);
        assert_eq!(done.unwrap().unwrap().version, RfbVersion::V3_3);
        assert_eq!(&sent[..12], b"RFB 003.003\n");
        assert_eq!(sent.len(), 12 + 16 + 1, "no type byte on 3.3");

        let mut script = b"RFB 003.007\n".to_vec();
        script.extend_from_slice(&[1, 1]);
        script.extend_from_slice(&server_init_bytes("x"));
        let (sent, done) = run_client(&script, None, 1);
        assert!(done.unwrap().is_some());
        assert_eq!(
            sent, b"RFB 003.007\n\x01\x01",
            "no SecurityResult after None on 3.7"
        );

        let mut script = b"RFB 003.003\n".to_vec();
        script.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 3]);
        script.extend_from_slice(b"bye");
        assert_eq!(
            run_client(&script, None, 4).1.unwrap_err(),
            RfbError::ServerRefused("bye".into())
        );
    }

    #[test]
    fn server_side_3_8_as_novnc_does() {
        let mut hs = ServerHandshake::new();
        let p = hs.advance(b"RFB 003.008\n").unwrap();
        assert_eq!(p.send, vec![1, 1]);
        let p = hs.advance(&[1]).unwrap();
        assert_eq!(p.send, vec![0, 0, 0, 0]);
        let p = hs.advance(&[1, 3, 0]).unwrap();
        let done = p.done.unwrap();
        assert!(done.shared);
        assert_eq!(done.rest, vec![3, 0]);
        assert!(hs.advance(&[0]).is_err());
    }

    #[test]
    fn server_side_other_versions_and_bad_choice() {
        let mut hs = ServerHandshake::new();
        let p = hs.advance(b"RFB 003.003\n\x00").unwrap();
        assert_eq!(p.send, vec![0, 0, 0, 1]);
        assert!(!p.done.unwrap().shared);

        let mut hs = ServerHandshake::new();
        let p = hs.advance(b"RFB 003.007\n\x01\x01").unwrap();
        assert_eq!(p.send, vec![1, 1]);
        assert_eq!(p.done.unwrap().version, RfbVersion::V3_7);

        let mut hs = ServerHandshake::new();
        hs.advance(b"RFB 003.008\n").unwrap();
        assert_eq!(hs.advance(&[2]).unwrap_err(), RfbError::BadClientChoice(2));
    }

    #[test]
    fn server_init_rename() {
        let si = ServerInit {
            width: 1,
            height: 2,
            pixel_format: [0; 16],
            name: b"QEMU (vm)".to_vec(),
        };
        let bytes = si.encode(Some("web-01"));
        assert_eq!(&bytes[20..24], &6u32.to_be_bytes());
        assert_eq!(&bytes[24..], b"web-01");
    }

    fn msg_stream() -> (Vec<u8>, Vec<u8>) {
        // (all client messages, what a view-only filter must keep)
        let mut all = Vec::new();
        let mut keep = Vec::new();
        let mut push = |m: &[u8], k: bool| {
            all.extend_from_slice(m);
            if k {
                keep.extend_from_slice(m);
            }
        };
        let mut spf = vec![0u8; 20];
        spf[4] = 32;
        push(&spf, true);
        push(&[2, 0, 0, 2, 0, 0, 0, 0, 0xff, 0xff, 0xff, 0x21], true);
        push(&[3, 0, 0, 0, 0, 0, 2, 208, 1, 144], true);
        push(&[4, 1, 0, 0, 0, 0, 0, 0x61], false);
        push(&[5, 0, 0, 10, 0, 20], false);
        push(&[5, 0x81, 0, 10, 0, 20, 1], false);
        push(&[6, 0, 0, 0, 0, 0, 0, 3, b'a', b'b', b'c'], false);
        push(&[255, 0, 0, 1, 0, 0, 0, 0x61, 0, 0, 0, 30], false);
        push(&[248, 0, 0, 0, 0, 0, 0, 1, 2, 9, 9], true);
        // XVP reboot and SetDesktopSize (one screen): they change the VM, so view-only drops them.
        push(&[250, 0, 1, 3], false);
        let mut resize = vec![251, 0, 4, 0, 3, 0, 1, 0];
        resize.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0, 4, 0, 3, 0, 0, 0, 0, 0]);
        push(&resize, false);
        push(&[150, 1, 0, 0, 0, 0, 2, 208, 1, 144], true);
        (all, keep)
    }

    #[test]
    fn input_filter_drops_input_only() {
        let (all, keep) = msg_stream();
        for chunk in 1..all.len() {
            let mut f = InputFilter::default();
            let mut out = Vec::new();
            let mut inputs = 0;
            for piece in all.chunks(chunk) {
                inputs += f.filter(piece, &mut out).unwrap();
            }
            assert_eq!(out, keep, "chunk size {chunk}");
            assert_eq!(inputs, INPUTS_IN_STREAM, "chunk size {chunk}");
        }
        let mut f = InputFilter::default();
        assert_eq!(
            f.filter(&[77], &mut Vec::new()),
            Err(RfbError::UnknownClientMessage(77))
        );
    }

    #[test]
    fn view_only_drops_vm_control_without_counting_it_as_input() {
        // XVP shutdown, reboot, reset; SetDesktopSize with no and with two screens.
        let mut control = vec![
            vec![250, 0, 1, 2],
            vec![250, 0, 1, 3],
            vec![250, 0, 1, 4],
            vec![251, 0, 2, 128, 1, 224, 0, 0],
        ];
        let mut two = vec![251, 0, 7, 128, 2, 56, 2, 0];
        two.extend_from_slice(&[0u8; 32]);
        control.push(two);
        let fbur = [3u8, 1, 0, 0, 0, 0, 2, 208, 1, 144];
        for msg in &control {
            let mut stream = msg.clone();
            stream.extend_from_slice(&fbur);
            for chunk in 1..=stream.len() {
                let mut f = InputFilter::default();
                let mut out = Vec::new();
                let mut inputs = 0;
                for piece in stream.chunks(chunk) {
                    inputs += f.filter(piece, &mut out).unwrap();
                }
                assert_eq!(
                    (out.as_slice(), inputs),
                    (&fbur[..], 0),
                    "{msg:?} in chunks of {chunk}"
                );
                let mut o = InputFilter::default();
                assert_eq!(
                    o.observe(&stream),
                    Ok(0),
                    "{msg:?} is not keyboard or mouse input"
                );
            }
        }
    }

    /// The first two bytes (type, QEMU subtype) of each client message in `stream`; stops at an
    /// incomplete last message. Panics on a stream that does not parse.
    fn message_heads(mut stream: &[u8]) -> Vec<[u8; 2]> {
        let mut heads = Vec::new();
        while !stream.is_empty() {
            let head = &stream[..stream.len().min(MAX_HEAD)];
            let Some(parsed) = client_message_len(head).expect("the stream parses") else {
                break;
            };
            heads.push([stream[0], stream.get(1).copied().unwrap_or(0)]);
            stream = &stream[parsed.0.min(stream.len())..];
        }
        heads
    }

    /// Messages a view-only session never passes on: KeyEvent, PointerEvent, ClientCutText, QEMU
    /// extended KeyEvent (input), XVP and SetDesktopSize (VM control).
    fn view_only_forbids(head: [u8; 2]) -> bool {
        matches!(head[0], 4 | 5 | 6 | 250 | 251) || head == [255, 0]
    }

    /// What a view-only filter must do with a generated message.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Want {
        Pass,
        DropInput,
        DropControl,
    }

    fn bytes(n: impl Into<proptest::collection::SizeRange>) -> impl Strategy<Value = Vec<u8>> {
        proptest::collection::vec(any::<u8>(), n)
    }

    fn with_head(head: &[u8], body: Vec<u8>, want: Want) -> (Vec<u8>, Want) {
        let mut m = head.to_vec();
        m.extend(body);
        (m, want)
    }

    /// Any well-formed client message of the kinds noVNC and QEMU know.
    fn client_message() -> impl Strategy<Value = (Vec<u8>, Want)> {
        prop_oneof![
            bytes(19).prop_map(|b| with_head(&[0], b, Want::Pass)),
            (0u16..8).prop_flat_map(|n| bytes(4 * usize::from(n)).prop_map(move |b| {
                let [n0, n1] = n.to_be_bytes();
                with_head(&[2, 0, n0, n1], b, Want::Pass)
            })),
            bytes(9).prop_map(|b| with_head(&[3], b, Want::Pass)),
            bytes(7).prop_map(|b| with_head(&[4], b, Want::DropInput)),
            (any::<u8>(), bytes(5)).prop_map(|(mask, mut b)| {
                b.truncate(if mask & 0x80 != 0 { 5 } else { 4 });
                with_head(&[5, mask], b, Want::DropInput)
            }),
            (any::<bool>(), bytes(0..24)).prop_map(|(extended, text)| {
                let n = i32::try_from(text.len()).unwrap();
                let [a, b, c, d] = (if extended { -n } else { n }).to_be_bytes();
                with_head(&[6, 0, 0, 0, a, b, c, d], text, Want::DropInput)
            }),
            bytes(9).prop_map(|b| with_head(&[150], b, Want::Pass)),
            (bytes(7), 0u8..=64).prop_flat_map(|(flags, n)| bytes(usize::from(n)).prop_map(move |b| {
                let mut head = vec![248];
                head.extend_from_slice(&flags);
                head.push(n);
                with_head(&head, b, Want::Pass)
            })),
            bytes(3).prop_map(|b| with_head(&[250], b, Want::DropControl)),
            (bytes(5), 0u8..4).prop_flat_map(|(size, n)| bytes(16 * usize::from(n)).prop_map(move |b| {
                let mut head = vec![251];
                head.extend_from_slice(&size);
                head.extend_from_slice(&[n, 0]);
                with_head(&head, b, Want::DropControl)
            })),
            bytes(10).prop_map(|b| with_head(&[255, 0], b, Want::DropInput)),
            (0u8..2).prop_map(|op| (vec![255, 1, 0, op], Want::Pass)),
            bytes(6).prop_map(|b| with_head(&[255, 1, 0, 2], b, Want::Pass)),
        ]
    }

    /// Input events in [`msg_stream`]: key, pointer, extended pointer, clipboard, QEMU key.
    const INPUTS_IN_STREAM: usize = 5;

    #[test]
    fn observe_counts_input_and_passes_everything() {
        let (all, _) = msg_stream();
        for chunk in 1..all.len() {
            let mut f = InputFilter::default();
            let counts: Vec<usize> = all.chunks(chunk).map(|p| f.observe(p).unwrap()).collect();
            assert_eq!(
                counts.iter().sum::<usize>(),
                INPUTS_IN_STREAM,
                "chunk size {chunk}"
            );
        }
        // noVNC's idle traffic: FramebufferUpdateRequests (and a Fence) are not input.
        let mut f = InputFilter::default();
        let fbur = [3u8, 1, 0, 0, 0, 0, 2, 208, 1, 144];
        for _ in 0..100 {
            assert_eq!(f.observe(&fbur), Ok(0));
        }
        assert_eq!(f.observe(&[248, 0, 0, 0, 0, 0, 0, 1, 0]), Ok(0));
        // One message at a time, each input kind counts once.
        for msg in [
            &[4u8, 1, 0, 0, 0, 0, 0, 0x61][..],
            &[5, 1, 0, 10, 0, 20],
            &[5, 0x80, 0, 10, 0, 20, 0],
            &[6, 0, 0, 0, 0, 0, 0, 1, b'x'],
            &[6, 0, 0, 0, 0xff, 0xff, 0xff, 0xfc, 0, 0, 0, 1],
            &[255, 0, 0, 1, 0, 0, 0, 0x61, 0, 0, 0, 30],
        ] {
            assert_eq!(f.observe(msg), Ok(1), "{msg:?}");
        }
        assert_eq!(f.observe(&fbur), Ok(0), "the stream stayed in step");
        assert_eq!(f.observe(&[77]), Err(RfbError::UnknownClientMessage(77)));
    }

    proptest! {
        #[test]
        fn client_handshake_never_panics(data in proptest::collection::vec(any::<u8>(), 0..400),
                                         chunk in 1usize..50, pw: bool) {
            let mut hs = ClientHandshake::new(pw.then_some("pw"), true);
            for piece in data.chunks(chunk) {
                if hs.advance(piece).map(|p| p.done.is_some()).unwrap_or(true) { break; }
            }
        }

        #[test]
        fn server_handshake_never_panics(data in proptest::collection::vec(any::<u8>(), 0..64)) {
            let mut hs = ServerHandshake::new();
            let _ = hs.advance(&data);
        }

        #[test]
        fn input_filter_never_panics(data in proptest::collection::vec(any::<u8>(), 0..400), chunk in 1usize..40) {
            let mut f = InputFilter::default();
            let mut out = Vec::new();
            for piece in data.chunks(chunk) {
                if f.filter(piece, &mut out).is_err() { break; }
            }
            prop_assert!(out.len() <= data.len());
            // Whatever came in, what goes on holds no input or VM control (a last message may be cut).
            prop_assert!(message_heads(&out).into_iter().all(|h| !view_only_forbids(h)), "{:?}", out);
        }

        #[test]
        fn view_only_streams_carry_no_input_or_vm_control(
            messages in proptest::collection::vec(client_message(), 0..40),
            chunk in 1usize..64,
        ) {
            let all: Vec<u8> = messages.iter().flat_map(|(m, _)| m.clone()).collect();
            let keep: Vec<u8> = messages.iter().filter(|(_, w)| *w == Want::Pass).flat_map(|(m, _)| m.clone()).collect();
            let inputs = messages.iter().filter(|(_, w)| *w == Want::DropInput).count();
            let mut f = InputFilter::default();
            let mut out = Vec::new();
            let (mut dropped, mut seen) = (0, 0);
            let mut o = InputFilter::default();
            for piece in all.chunks(chunk) {
                dropped += f.filter(piece, &mut out).expect("well-formed messages");
                seen += o.observe(piece).expect("well-formed messages");
            }
            prop_assert_eq!(&out, &keep);
            prop_assert_eq!((dropped, seen), (inputs, inputs));
            prop_assert!(message_heads(&out).into_iter().all(|h| !view_only_forbids(h)));
            prop_assert_eq!(message_heads(&all).len(), messages.len());
        }

        #[test]
        fn observe_never_panics_and_agrees_with_filter(data in proptest::collection::vec(any::<u8>(), 0..400),
                                                       chunk in 1usize..40, other in 1usize..40) {
            // The same failure, however the bytes are split and whichever method reads them; without
            // one, the same input events (an error drops the count of the call it ends).
            let run = |chunk: usize, observe: bool| {
                let mut f = InputFilter::default();
                let mut out = Vec::new();
                let mut inputs = 0;
                for piece in data.chunks(chunk) {
                    let r = if observe { f.observe(piece) } else { f.filter(piece, &mut out) };
                    match r {
                        Ok(n) => inputs += n,
                        Err(e) => return (inputs, Some(e)),
                    }
                }
                (inputs, None)
            };
            let (seen, error) = run(chunk, true);
            prop_assert!(seen <= data.len());
            for (n, e) in [run(other, true), run(chunk, false)] {
                prop_assert_eq!(&e, &error);
                if error.is_none() {
                    prop_assert_eq!(n, seen);
                }
            }
        }
    }
}
