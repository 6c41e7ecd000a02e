//! A minimal blocking RFC 6455 client: the upgrade request, a frame reader that reads payload bytes
//! straight into the caller's buffer, and a writer that sends each write as one masked binary frame.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher as _, Hasher as _};
use std::io::{self, Read, Write};

use anyhow::{Context as _, bail, ensure};
use systemvm_proto::ws::{self, FrameHeader, MAX_CONTROL_PAYLOAD, MAX_HEADER_LEN, Opcode};

/// Longest HTTP response head accepted for the upgrade.
const MAX_RESPONSE_HEAD: usize = 16 * 1024;

/// Sends the upgrade request for `path_query` on `host` (the `Host` header) and checks for a
/// `101 Switching Protocols`. Returns the bytes the server sent after the response head (the start of
/// the WebSocket stream).
pub(crate) fn handshake<S: Read + Write>(
    stream: &mut S,
    host: &str,
    path_query: &str,
) -> anyhow::Result<Vec<u8>> {
    let key = base64(&random_bytes::<16>());
    let request = format!(
        "GET {path_query} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: binary\r\n\r\n"
    );
    stream
        .write_all(request.as_bytes())
        .context("failed to send the WebSocket upgrade request")?;
    let mut got = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    let head_end = loop {
        if let Some(i) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        ensure!(
            got.len() < MAX_RESPONSE_HEAD,
            "WebSocket upgrade response head too long"
        );
        let n = read_retry(stream, &mut chunk).context("failed to read the WebSocket upgrade response")?;
        if n == 0 {
            bail!(
                "server closed the connection during the WebSocket upgrade (got {:?})",
                String::from_utf8_lossy(&got)
            );
        }
        got.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&got[..head_end]).into_owned();
    let status = head.lines().next().unwrap_or_default();
    let code = status.split_whitespace().nth(1).unwrap_or_default();
    if code != "101" {
        bail!("WebSocket upgrade refused: {status:?}");
    }
    Ok(got[head_end..].to_vec())
}

/// Reads the payload of binary frames from the server as one byte stream.
///
/// Frame headers are read into a small buffer (one read of at most 14 bytes per header; the few
/// payload bytes that come along are served from it); payload reads go straight from the socket into
/// the caller's buffer. Ping and pong frames are skipped; a close frame ends the stream with an error
/// carrying the code and the reason.
pub(crate) struct FrameReader<R> {
    inner: R,
    head: Vec<u8>,
    start: usize,
    end: usize,
    /// Payload bytes of the current data frame not yet returned.
    remaining: u64,
}

impl<R: Read> FrameReader<R> {
    /// A reader over `inner`; `already_read` are stream bytes read with the HTTP response.
    pub(crate) fn new(inner: R, already_read: &[u8]) -> Self {
        let mut head = vec![0u8; MAX_HEADER_LEN.max(already_read.len())];
        head[..already_read.len()].copy_from_slice(already_read);
        FrameReader {
            inner,
            head,
            start: 0,
            end: already_read.len(),
            remaining: 0,
        }
    }

    /// Reads more header bytes; `false` on end of stream.
    fn fill_head(&mut self) -> io::Result<bool> {
        if self.start > 0 {
            self.head.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        // Never more than one header's worth, so payload lands in the caller's buffer instead. A
        // header that does not parse yet is shorter than MAX_HEADER_LEN, so there is room.
        let n = read_retry(&mut self.inner, &mut self.head[self.end..MAX_HEADER_LEN])?;
        self.end += n;
        Ok(n > 0)
    }

    /// Reads exactly `out.len()` payload bytes of a control frame.
    fn read_control_payload(&mut self, out: &mut [u8]) -> io::Result<()> {
        let from_head = out.len().min(self.end - self.start);
        out[..from_head].copy_from_slice(&self.head[self.start..self.start + from_head]);
        self.start += from_head;
        let rest = &mut out[from_head..];
        self.inner.read_exact(rest).map_err(|e| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "server closed the connection inside a control frame",
                )
            } else {
                e
            }
        })
    }

    fn begin(&mut self, header: FrameHeader) -> io::Result<()> {
        if header.mask.is_some() {
            return Err(invalid("server sent a masked frame"));
        }
        match header.opcode {
            Opcode::Binary | Opcode::Continuation => {
                self.remaining = header.len;
                Ok(())
            }
            Opcode::Text => Err(invalid("server sent a text frame; expected binary frames")),
            Opcode::Ping | Opcode::Pong => {
                let mut skip = [0u8; MAX_CONTROL_PAYLOAD];
                let len = usize::try_from(header.len)
                    .unwrap_or(MAX_CONTROL_PAYLOAD)
                    .min(MAX_CONTROL_PAYLOAD);
                self.read_control_payload(&mut skip[..len])
            }
            Opcode::Close => {
                let mut payload = [0u8; MAX_CONTROL_PAYLOAD];
                let len = usize::try_from(header.len)
                    .unwrap_or(MAX_CONTROL_PAYLOAD)
                    .min(MAX_CONTROL_PAYLOAD);
                self.read_control_payload(&mut payload[..len])?;
                let msg = match ws::parse_close(&payload[..len]) {
                    Some((code, reason)) => {
                        format!("server closed the WebSocket: code {code}, reason {reason:?}")
                    }
                    None => "server closed the WebSocket without a code".to_owned(),
                };
                Err(io::Error::new(io::ErrorKind::ConnectionAborted, msg))
            }
        }
    }
}

impl<R: Read> Read for FrameReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            if self.remaining > 0 {
                let want = usize::try_from(self.remaining)
                    .unwrap_or(usize::MAX)
                    .min(buf.len());
                let buffered = self.end - self.start;
                let n = if buffered > 0 {
                    let n = want.min(buffered);
                    buf[..n].copy_from_slice(&self.head[self.start..self.start + n]);
                    self.start += n;
                    n
                } else {
                    let n = read_retry(&mut self.inner, &mut buf[..want])?;
                    if n == 0 {
                        return Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "server closed the connection inside a WebSocket frame",
                        ));
                    }
                    n
                };
                self.remaining -= n as u64;
                return Ok(n);
            }
            match FrameHeader::parse(&self.head[self.start..self.end]) {
                Ok(Some((header, len))) => {
                    self.start += len;
                    self.begin(header)?;
                }
                Ok(None) => {
                    if !self.fill_head()? {
                        if self.start == self.end {
                            return Ok(0);
                        }
                        return Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "server closed the connection inside a WebSocket frame header",
                        ));
                    }
                }
                Err(e) => return Err(invalid(&format!("bad WebSocket frame from the server: {e}"))),
            }
        }
    }
}

/// Sends each `write` as one masked binary frame.
pub(crate) struct FrameWriter<W> {
    inner: W,
    rng: u64,
    scratch: Vec<u8>,
}

impl<W: Write> FrameWriter<W> {
    pub(crate) fn new(inner: W) -> Self {
        FrameWriter {
            inner,
            rng: u64::from_le_bytes(random_bytes::<8>()) | 1,
            scratch: Vec::new(),
        }
    }

    fn next_mask(&mut self) -> [u8; 4] {
        // xorshift64: masks only need to be unpredictable to the page, not here; any will do.
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        let b = self.rng.to_le_bytes();
        [b[0], b[1], b[2], b[3]]
    }

    fn send(&mut self, opcode: Opcode, payload: &[u8]) -> io::Result<()> {
        let mask = self.next_mask();
        let mut head = [0u8; MAX_HEADER_LEN];
        let head_len = FrameHeader {
            fin: true,
            opcode,
            mask: Some(mask),
            len: payload.len() as u64,
        }
        .encode(&mut head);
        self.scratch.clear();
        self.scratch.extend_from_slice(&head[..head_len]);
        self.scratch.extend_from_slice(payload);
        ws::apply_mask(&mut self.scratch[head_len..], mask, 0);
        self.inner.write_all(&self.scratch)
    }

    /// Sends a close frame (1000, normal closure).
    pub(crate) fn close(&mut self) -> io::Result<()> {
        self.send(
            Opcode::Close,
            &ws::close_payload(ws::close_code::NORMAL, "benchmark done"),
        )?;
        self.inner.flush()
    }
}

impl<W: Write> Write for FrameWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.send(Opcode::Binary, buf)?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// `read`, retried when interrupted by a signal.
pub(crate) fn read_retry<R: Read + ?Sized>(r: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        match r.read(buf) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            other => return other,
        }
    }
}

fn invalid(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.to_owned())
}

/// Random bytes from std's per-process random hash keys (no extra dependency; not for secrets).
fn random_bytes<const N: usize>() -> [u8; N] {
    let mut out = [0u8; N];
    for (i, chunk) in out.chunks_mut(8).enumerate() {
        let mut h = RandomState::new().build_hasher();
        h.write_usize(i);
        let v = h.finish().to_le_bytes();
        chunk.copy_from_slice(&v[..chunk.len()]);
    }
    out
}

/// Standard base64 with padding.
fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::io::Cursor;

    use super::*;

    fn server_frame(opcode: Opcode, fin: bool, payload: &[u8]) -> Vec<u8> {
        let mut head = [0u8; MAX_HEADER_LEN];
        let n = FrameHeader {
            fin,
            opcode,
            mask: None,
            len: payload.len() as u64,
        }
        .encode(&mut head);
        let mut out = head[..n].to_vec();
        out.extend_from_slice(payload);
        out
    }

    /// A reader that returns at most `chunk` bytes per call, like a socket under load.
    struct Trickle<R> {
        inner: R,
        chunk: usize,
    }

    impl<R: Read> Read for Trickle<R> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = buf.len().min(self.chunk);
            self.inner.read(&mut buf[..n])
        }
    }

    fn payload(len: usize, seed: u32) -> Vec<u8> {
        (0..len as u32)
            .map(|i| (i.wrapping_mul(31).wrapping_add(seed) >> 3) as u8)
            .collect()
    }

    #[test]
    fn reads_payload_across_frames_and_skips_pings() {
        let (a, b, c) = (payload(100, 1), payload(70_000, 2), payload(300, 3));
        let mut stream = server_frame(Opcode::Binary, true, &a);
        stream.extend(server_frame(Opcode::Ping, true, b"hi"));
        stream.extend(server_frame(Opcode::Binary, false, &b));
        stream.extend(server_frame(Opcode::Binary, true, &[]));
        stream.extend(server_frame(Opcode::Pong, true, b""));
        stream.extend(server_frame(Opcode::Continuation, true, &c));
        let want: Vec<u8> = [a, b, c].concat();
        // Some stream bytes arrive with the HTTP response.
        for (pre, chunk, dest) in [
            (0, 1, 7),
            (5, 3, 1),
            (20, 4096, 65_536),
            (0, 1 << 20, 1 << 20),
            (2, 13, 99),
        ] {
            let mut r = FrameReader::new(
                Trickle {
                    inner: Cursor::new(stream[pre..].to_vec()),
                    chunk,
                },
                &stream[..pre],
            );
            let mut got = Vec::new();
            let mut buf = vec![0u8; dest];
            loop {
                let n = r.read(&mut buf).unwrap();
                if n == 0 {
                    break;
                }
                got.extend_from_slice(&buf[..n]);
            }
            assert!(got == want, "pre {pre} chunk {chunk} dest {dest}");
        }
    }

    #[test]
    fn read_exact_lands_in_the_destination() {
        let body = payload(200_000, 9);
        let mut stream = Vec::new();
        for piece in body.chunks(65_536) {
            stream.extend(server_frame(Opcode::Binary, true, piece));
        }
        let mut r = FrameReader::new(Cursor::new(stream), &[]);
        let mut big = vec![0u8; 200_000];
        r.read_exact(&mut big).unwrap();
        assert!(big == body);
        assert_eq!(r.read(&mut big).unwrap(), 0);
    }

    #[test]
    fn close_frame_reports_code_and_reason() {
        let mut stream = server_frame(Opcode::Binary, true, b"RFB");
        stream.extend(server_frame(
            Opcode::Close,
            true,
            &ws::close_payload(4001, "console token already used"),
        ));
        let mut r = FrameReader::new(Cursor::new(stream), &[]);
        let mut buf = [0u8; 16];
        assert_eq!(r.read(&mut buf).unwrap(), 3);
        let err = r.read(&mut buf).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionAborted);
        assert_eq!(
            err.to_string(),
            "server closed the WebSocket: code 4001, reason \"console token already used\""
        );
    }

    #[test]
    fn refuses_bad_streams() {
        let mut buf = [0u8; 16];
        let masked = vec![0x82, 0x81, 1, 2, 3, 4, 5];
        let mut r = FrameReader::new(Cursor::new(masked), &[]);
        assert!(r.read(&mut buf).unwrap_err().to_string().contains("masked"));

        let text = server_frame(Opcode::Text, true, b"x");
        assert!(
            FrameReader::new(Cursor::new(text), &[])
                .read(&mut buf)
                .unwrap_err()
                .to_string()
                .contains("text")
        );

        let mut cut = server_frame(Opcode::Binary, true, &[7; 40]);
        cut.truncate(30);
        let mut r = FrameReader::new(Cursor::new(cut), &[]);
        let mut big = [0u8; 64];
        let mut got = 0;
        let err = loop {
            match r.read(&mut big) {
                Ok(n) => got += n,
                Err(e) => break e,
            }
        };
        assert_eq!((got, err.kind()), (28, io::ErrorKind::UnexpectedEof));

        let mut r = FrameReader::new(Cursor::new(vec![0x82, 126, 1]), &[]);
        assert_eq!(r.read(&mut buf).unwrap_err().kind(), io::ErrorKind::UnexpectedEof);

        let mut r = FrameReader::new(Cursor::new(vec![0xc2, 0]), &[]);
        assert!(r.read(&mut buf).unwrap_err().to_string().contains("reserved"));
    }

    #[test]
    fn writer_sends_masked_binary_frames() {
        let mut w = FrameWriter::new(Vec::new());
        let msg = payload(1000, 4);
        w.write_all(&msg).unwrap();
        w.write_all(b"\x03\x00").unwrap();
        w.close().unwrap();
        let out = w.inner;
        let mut pos = 0;
        let mut frames = Vec::new();
        while pos < out.len() {
            let (h, n) = FrameHeader::parse(&out[pos..]).unwrap().unwrap();
            let len = h.len as usize;
            let mut body = out[pos + n..pos + n + len].to_vec();
            ws::apply_mask(&mut body, h.mask.expect("client frames are masked"), 0);
            frames.push((h.opcode, body));
            pos += n + len;
        }
        assert_eq!(frames.len(), 3);
        assert_eq!(frames[0], (Opcode::Binary, msg));
        assert_eq!(frames[1], (Opcode::Binary, b"\x03\x00".to_vec()));
        assert_eq!(frames[2].0, Opcode::Close);
        assert_eq!(
            ws::parse_close(&frames[2].1),
            Some((1000, "benchmark done".into()))
        );
    }

    #[test]
    fn upgrade() {
        struct Duplex {
            input: Cursor<Vec<u8>>,
            output: Vec<u8>,
        }
        impl Read for Duplex {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                self.input.read(buf)
            }
        }
        impl Write for Duplex {
            fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
                self.output.write(buf)
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let ok =
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n\x82\x0cRFB 003.008\n".to_vec();
        let mut s = Duplex {
            input: Cursor::new(ok),
            output: Vec::new(),
        };
        let rest = handshake(&mut s, "127.0.0.1:8080", "/websockify?token=abc").unwrap();
        assert_eq!(rest, b"\x82\x0cRFB 003.008\n");
        let req = String::from_utf8(s.output).unwrap();
        assert!(req.starts_with("GET /websockify?token=abc HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n"));
        assert!(req.contains("Sec-WebSocket-Protocol: binary\r\n"));
        let key = req
            .lines()
            .find_map(|l| l.strip_prefix("Sec-WebSocket-Key: "))
            .unwrap();
        assert_eq!(key.len(), 24);
        assert!(key.ends_with("=="));

        let refused = b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n".to_vec();
        let mut s = Duplex {
            input: Cursor::new(refused),
            output: Vec::new(),
        };
        let err = handshake(&mut s, "h", "/").unwrap_err().to_string();
        assert!(err.contains("404 Not Found"), "{err}");

        let mut s = Duplex {
            input: Cursor::new(b"HTTP/1.1 101".to_vec()),
            output: Vec::new(),
        };
        assert!(handshake(&mut s, "h", "/").is_err());
    }

    #[test]
    fn base64_known_answers() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
        // RFC 6455 §1.3 sample nonce.
        assert_eq!(base64(b"the sample nonce"), "dGhlIHNhbXBsZSBub25jZQ==");
    }
}
