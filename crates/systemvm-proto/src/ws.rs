//! RFC 6455 WebSocket frame headers, without I/O.
//!
//! The console proxy relays a byte stream, so it needs frames, not messages: a server frame is a
//! 2–10 byte header written in front of the relay buffer (no payload copy), and a client frame's
//! payload is unmasked in place. Untrusted headers yield [`WsError`], never a panic.

/// Frame opcodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Opcode {
    /// Continuation of a fragmented message.
    Continuation,
    /// UTF-8 text.
    Text,
    /// Binary data.
    Binary,
    /// Connection close.
    Close,
    /// Ping.
    Ping,
    /// Pong.
    Pong,
}

impl Opcode {
    fn from_bits(b: u8) -> Option<Self> {
        Some(match b {
            0 => Opcode::Continuation,
            1 => Opcode::Text,
            2 => Opcode::Binary,
            8 => Opcode::Close,
            9 => Opcode::Ping,
            10 => Opcode::Pong,
            _ => return None,
        })
    }
    fn bits(self) -> u8 {
        match self {
            Opcode::Continuation => 0,
            Opcode::Text => 1,
            Opcode::Binary => 2,
            Opcode::Close => 8,
            Opcode::Ping => 9,
            Opcode::Pong => 10,
        }
    }
    /// Whether this is a control opcode (close, ping, pong).
    pub fn is_control(self) -> bool {
        matches!(self, Opcode::Close | Opcode::Ping | Opcode::Pong)
    }
}

/// Close status codes used by the proxy (1000–1015 from RFC 6455, 4000–4999 private use).
pub mod close_code {
    /// Normal closure.
    pub const NORMAL: u16 = 1000;
    /// The endpoint is going away (shutdown).
    pub const GOING_AWAY: u16 = 1001;
    /// Protocol error.
    pub const PROTOCOL: u16 = 1002;
    /// Data the endpoint cannot accept (e.g. text frames).
    pub const UNSUPPORTED: u16 = 1003;
    /// A message too big to process.
    pub const TOO_BIG: u16 = 1009;
    /// An unexpected condition on the server.
    pub const INTERNAL: u16 = 1011;
    /// The console token was refused (malformed, forged, unknown key, expired, replayed).
    pub const TOKEN_REFUSED: u16 = 4001;
    /// The token is valid but not for this client (origin or address).
    pub const FORBIDDEN: u16 = 4003;
    /// The session had no keyboard, mouse or clipboard input from the browser for the idle timeout.
    pub const IDLE: u16 = 4008;
    /// The VNC server could not be reached.
    pub const TARGET_UNREACHABLE: u16 = 4010;
    /// The VNC server refused the proxy or its credentials.
    pub const TARGET_AUTH: u16 = 4011;
    /// The VNC server or the browser broke the RFB protocol.
    pub const RFB_PROTOCOL: u16 = 4012;
    /// The proxy is at its session limit.
    pub const BUSY: u16 = 4029;
}

/// Longest control-frame payload (RFC 6455 §5.5).
pub const MAX_CONTROL_PAYLOAD: usize = 125;

/// Longest frame header: 2 + 8 (length) + 4 (mask).
pub const MAX_HEADER_LEN: usize = 14;

/// Why a frame header is unacceptable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WsError {
    /// RSV bits set without a negotiated extension.
    #[error("reserved bits set")]
    ReservedBits,
    /// An opcode RFC 6455 does not define.
    #[error("unknown opcode {0}")]
    UnknownOpcode(u8),
    /// A control frame that is fragmented or longer than 125 bytes.
    #[error("invalid control frame")]
    BadControlFrame,
    /// A 64-bit length with the top bit set.
    #[error("invalid payload length")]
    BadLength,
}

/// A parsed frame header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHeader {
    /// Last frame of its message.
    pub fin: bool,
    /// The opcode.
    pub opcode: Opcode,
    /// Masking key (client-to-server frames carry one).
    pub mask: Option<[u8; 4]>,
    /// Payload length in bytes.
    pub len: u64,
}

impl FrameHeader {
    /// Parses a header from the front of `buf`: `Ok(None)` until enough bytes are there, otherwise
    /// the header and its length in bytes.
    pub fn parse(buf: &[u8]) -> Result<Option<(FrameHeader, usize)>, WsError> {
        let [b0, b1, ..] = *buf else { return Ok(None) };
        if b0 & 0x70 != 0 {
            return Err(WsError::ReservedBits);
        }
        let opcode = Opcode::from_bits(b0 & 0x0f).ok_or(WsError::UnknownOpcode(b0 & 0x0f))?;
        let fin = b0 & 0x80 != 0;
        let masked = b1 & 0x80 != 0;
        let (len, mut pos) = match b1 & 0x7f {
            126 => match buf.get(2..4) {
                Some(b) => (u64::from(u16::from_be_bytes([b[0], b[1]])), 4),
                None => return Ok(None),
            },
            127 => match buf.get(2..10) {
                Some(b) => {
                    let mut a = [0u8; 8];
                    a.copy_from_slice(b);
                    let len = u64::from_be_bytes(a);
                    if len >> 63 != 0 {
                        return Err(WsError::BadLength);
                    }
                    (len, 10)
                }
                None => return Ok(None),
            },
            n => (u64::from(n), 2),
        };
        if opcode.is_control() && (!fin || len > MAX_CONTROL_PAYLOAD as u64) {
            return Err(WsError::BadControlFrame);
        }
        let mask = if masked {
            let Some(m) = buf.get(pos..pos + 4) else {
                return Ok(None);
            };
            pos += 4;
            Some([m[0], m[1], m[2], m[3]])
        } else {
            None
        };
        Ok(Some((
            FrameHeader {
                fin,
                opcode,
                mask,
                len,
            },
            pos,
        )))
    }

    /// Writes the header into `out` and returns its length.
    pub fn encode(&self, out: &mut [u8; MAX_HEADER_LEN]) -> usize {
        out[0] = (u8::from(self.fin) << 7) | self.opcode.bits();
        let mask_bit = if self.mask.is_some() { 0x80 } else { 0 };
        let mut pos = if self.len < 126 {
            out[1] = mask_bit | self.len as u8;
            2
        } else if let Ok(len) = u16::try_from(self.len) {
            out[1] = mask_bit | 126;
            out[2..4].copy_from_slice(&len.to_be_bytes());
            4
        } else {
            out[1] = mask_bit | 127;
            out[2..10].copy_from_slice(&self.len.to_be_bytes());
            10
        };
        if let Some(m) = self.mask {
            out[pos..pos + 4].copy_from_slice(&m);
            pos += 4;
        }
        pos
    }
}

/// XORs `data` with `mask`, where `data` starts `offset` bytes into the frame's payload.
pub fn apply_mask(data: &mut [u8], mask: [u8; 4], offset: u64) {
    let shift = (offset % 4) as usize;
    let rotated = [
        mask[shift],
        mask[(shift + 1) % 4],
        mask[(shift + 2) % 4],
        mask[(shift + 3) % 4],
    ];
    let wide = u64::from_ne_bytes([
        rotated[0], rotated[1], rotated[2], rotated[3], rotated[0], rotated[1], rotated[2], rotated[3],
    ]);
    let mut chunks = data.chunks_exact_mut(8);
    for chunk in &mut chunks {
        let mut a = [0u8; 8];
        a.copy_from_slice(chunk);
        chunk.copy_from_slice(&(u64::from_ne_bytes(a) ^ wide).to_ne_bytes());
    }
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= rotated[i % 4];
    }
}

/// The payload of a Close frame: code, then the reason cut to fit 125 bytes at a character boundary.
pub fn close_payload(code: u16, reason: &str) -> Vec<u8> {
    let mut end = reason.len().min(MAX_CONTROL_PAYLOAD - 2);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let mut out = Vec::with_capacity(2 + end);
    out.extend_from_slice(&code.to_be_bytes());
    out.extend_from_slice(&reason.as_bytes()[..end]);
    out
}

/// Reads a Close frame's payload: `None` for an empty payload, else the code and reason.
pub fn parse_close(payload: &[u8]) -> Option<(u16, String)> {
    let [a, b, rest @ ..] = payload else { return None };
    Some((
        u16::from_be_bytes([*a, *b]),
        String::from_utf8_lossy(rest).into_owned(),
    ))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn known_frames() {
        // RFC 6455 §5.7: a single-frame masked text message "Hello".
        let frame = [0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58];
        let (h, n) = FrameHeader::parse(&frame).unwrap().unwrap();
        assert_eq!((h.fin, h.opcode, h.len, n), (true, Opcode::Text, 5, 6));
        let mut payload = frame[6..].to_vec();
        apply_mask(&mut payload, h.mask.unwrap(), 0);
        assert_eq!(payload, b"Hello");
        // 256 bytes binary, unmasked: 16-bit length.
        assert_eq!(
            FrameHeader::parse(&[0x82, 0x7e, 0x01, 0x00])
                .unwrap()
                .unwrap()
                .0
                .len,
            256
        );
        // Incomplete headers.
        assert_eq!(FrameHeader::parse(&[0x82]), Ok(None));
        assert_eq!(FrameHeader::parse(&[0x82, 0x7f, 0, 0]), Ok(None));
        assert_eq!(FrameHeader::parse(&[0x82, 0x81, 1, 2]), Ok(None));
    }

    #[test]
    fn bad_frames() {
        assert_eq!(FrameHeader::parse(&[0xc2, 0]), Err(WsError::ReservedBits));
        assert_eq!(FrameHeader::parse(&[0x83, 0]), Err(WsError::UnknownOpcode(3)));
        assert_eq!(FrameHeader::parse(&[0x09, 0]), Err(WsError::BadControlFrame));
        assert_eq!(
            FrameHeader::parse(&[0x89, 126, 0, 200]),
            Err(WsError::BadControlFrame)
        );
        assert_eq!(
            FrameHeader::parse(&[0x82, 127, 0x80, 0, 0, 0, 0, 0, 0, 0]),
            Err(WsError::BadLength)
        );
    }

    #[test]
    fn close_payloads() {
        let p = close_payload(4001, &"é".repeat(100));
        assert!(p.len() <= MAX_CONTROL_PAYLOAD);
        let (code, reason) = parse_close(&p).unwrap();
        assert_eq!(code, 4001);
        assert!(reason.chars().all(|c| c == 'é'));
        assert_eq!(parse_close(&[]), None);
    }

    proptest! {
        #[test]
        fn header_roundtrip(fin: bool, op in 0usize..3, mask: Option<[u8; 4]>, len in prop_oneof![0u64..200, 0u64..70_000, 0u64..1 << 40]) {
            let opcode = [Opcode::Continuation, Opcode::Text, Opcode::Binary][op];
            let h = FrameHeader { fin, opcode, mask, len };
            let mut buf = [0u8; MAX_HEADER_LEN];
            let n = h.encode(&mut buf);
            prop_assert_eq!(FrameHeader::parse(&buf[..n]).unwrap(), Some((h, n)));
            for short in 0..n {
                prop_assert_eq!(FrameHeader::parse(&buf[..short]).unwrap(), None);
            }
        }

        #[test]
        fn mask_in_pieces_equals_mask_whole(data in proptest::collection::vec(any::<u8>(), 0..100), mask: [u8; 4], cut in 0usize..100) {
            let mut whole = data.clone();
            apply_mask(&mut whole, mask, 0);
            let cut = cut.min(data.len());
            let mut pieces = data.clone();
            let (a, b) = pieces.split_at_mut(cut);
            apply_mask(a, mask, 0);
            apply_mask(b, mask, cut as u64);
            prop_assert_eq!(&whole, &pieces);
            for (i, (x, y)) in data.iter().zip(&whole).enumerate() {
                prop_assert_eq!(x ^ mask[i % 4], *y);
            }
        }

        #[test]
        fn parse_never_panics(data in proptest::collection::vec(any::<u8>(), 0..20)) {
            let _ = FrameHeader::parse(&data);
        }
    }
}
