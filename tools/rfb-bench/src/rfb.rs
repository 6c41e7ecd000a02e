//! The RFB client side of the benchmark: handshake, pixel format, and FramebufferUpdate reading with
//! Raw payloads read straight into one reusable buffer.

use std::io::{self, Read, Write};

use anyhow::{Context as _, bail};
use systemvm_proto::rfb::ClientHandshake;

use crate::ws::read_retry;

/// Size of the buffer small reads (message and rectangle headers) go through.
const SMALL_BUF: usize = 512;
/// Size of the one buffer Raw rectangle payloads are read into (larger rectangles are read in pieces).
pub(crate) const FRAMEBUFFER_BUF: usize = 32 * 1024 * 1024;

/// Raw encoding.
const ENC_RAW: i32 = 0;
/// DesktopSize pseudo-encoding.
const ENC_DESKTOP_SIZE: i32 = -223;

/// Bytes per pixel of the format the client asks for.
const BYTES_PER_PIXEL: u64 = 4;

/// SetPixelFormat: 32 bpp, depth 24, little-endian, true colour, 8 bits per channel at shifts 16/8/0.
const SET_PIXEL_FORMAT: [u8; 20] = [
    0, 0, 0, 0, 32, 24, 0, 1, 0, 255, 0, 255, 0, 255, 16, 8, 0, 0, 0, 0,
];

/// Reads exact byte counts from a stream: small reads through a small buffer, large reads (Raw
/// payloads) straight into the caller's buffer.
pub(crate) struct MsgReader<R> {
    inner: R,
    buf: Vec<u8>,
    start: usize,
    end: usize,
    received: u64,
}

impl<R: Read> MsgReader<R> {
    pub(crate) fn new(inner: R) -> Self {
        MsgReader {
            inner,
            buf: vec![0u8; SMALL_BUF],
            start: 0,
            end: 0,
            received: 0,
        }
    }

    /// Bytes read from the underlying stream so far.
    pub(crate) fn received(&self) -> u64 {
        self.received
    }

    fn read_inner(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let n = read_retry(&mut self.inner, out).map_err(|e| {
            if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) {
                io::Error::new(io::ErrorKind::TimedOut, "timed out waiting for the server")
            } else {
                e
            }
        })?;
        if n == 0 && !out.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "server closed the connection",
            ));
        }
        self.received += n as u64;
        Ok(n)
    }

    /// Fills `out` completely.
    pub(crate) fn read_exact(&mut self, out: &mut [u8]) -> io::Result<()> {
        let k = out.len().min(self.end - self.start);
        out[..k].copy_from_slice(&self.buf[self.start..self.start + k]);
        self.start += k;
        let mut rest = &mut out[k..];
        while !rest.is_empty() {
            if rest.len() >= self.buf.len() {
                let n = self.read_inner(rest)?;
                rest = &mut rest[n..];
            } else {
                let mut small = std::mem::take(&mut self.buf);
                let got = self.read_inner(&mut small);
                self.buf = small;
                let n = got?;
                let k = n.min(rest.len());
                rest[..k].copy_from_slice(&self.buf[..k]);
                (self.start, self.end) = (k, n);
                rest = &mut rest[k..];
            }
        }
        Ok(())
    }

    /// Reads and discards `n` bytes.
    pub(crate) fn skip(&mut self, mut n: u64) -> io::Result<()> {
        let mut scratch = [0u8; 4096];
        while n > 0 {
            let k = usize::try_from(n).unwrap_or(usize::MAX).min(scratch.len());
            self.read_exact(&mut scratch[..k])?;
            n -= k as u64;
        }
        Ok(())
    }

    /// Whatever bytes are buffered or arrive next (at least one).
    pub(crate) fn read_some(&mut self) -> io::Result<Vec<u8>> {
        if self.start == self.end {
            let mut small = std::mem::take(&mut self.buf);
            let got = self.read_inner(&mut small);
            self.buf = small;
            (self.start, self.end) = (0, got?);
        }
        let out = self.buf[self.start..self.end].to_vec();
        self.start = self.end;
        Ok(out)
    }

    /// Puts bytes back in front of the stream (bytes the handshake read past its end).
    pub(crate) fn unread(&mut self, bytes: &[u8]) {
        let mut joined = bytes.to_vec();
        joined.extend_from_slice(&self.buf[self.start..self.end]);
        if joined.len() > self.buf.len() {
            self.buf.resize(joined.len(), 0);
        }
        self.buf[..joined.len()].copy_from_slice(&joined);
        (self.start, self.end) = (0, joined.len());
    }

    fn array<const N: usize>(&mut self) -> io::Result<[u8; N]> {
        let mut a = [0u8; N];
        self.read_exact(&mut a)?;
        Ok(a)
    }
}

/// What one FramebufferUpdate carried.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Update {
    /// Rectangles, pseudo-rectangles included.
    pub(crate) rects: u32,
    /// Pixels delivered in Raw rectangles.
    pub(crate) raw_pixels: u64,
}

/// An RFB client connection after the handshake.
pub(crate) struct Client<R, W> {
    rd: MsgReader<R>,
    wr: W,
    /// Framebuffer width (updated by DesktopSize).
    pub(crate) width: u16,
    /// Framebuffer height (updated by DesktopSize).
    pub(crate) height: u16,
    /// Where Raw payloads land; allocated once.
    fb: Vec<u8>,
}

impl<R: Read, W: Write> Client<R, W> {
    /// Runs the RFB 3.x handshake (security None, or VNC Authentication with `password`), then asks
    /// for the benchmark's pixel format and encodings (Raw, DesktopSize).
    pub(crate) fn connect(
        mut rd: MsgReader<R>,
        mut wr: W,
        password: Option<&str>,
        fb_size: usize,
    ) -> anyhow::Result<Self> {
        let mut hs = ClientHandshake::new(password, true);
        let done = loop {
            let data = rd
                .read_some()
                .context("RFB handshake: reading from the server failed")?;
            let progress = hs.advance(&data).context("RFB handshake failed")?;
            if !progress.send.is_empty() {
                wr.write_all(&progress.send)
                    .context("RFB handshake: writing to the server failed")?;
                wr.flush()?;
            }
            if let Some(done) = progress.done {
                break done;
            }
        };
        rd.unread(&done.rest);
        let mut setup = SET_PIXEL_FORMAT.to_vec();
        setup.extend_from_slice(&[2, 0, 0, 2]);
        setup.extend_from_slice(&ENC_RAW.to_be_bytes());
        setup.extend_from_slice(&ENC_DESKTOP_SIZE.to_be_bytes());
        wr.write_all(&setup)
            .context("failed to send SetPixelFormat and SetEncodings")?;
        wr.flush()?;
        Ok(Client {
            rd,
            wr,
            width: done.server_init.width,
            height: done.server_init.height,
            fb: vec![0u8; fb_size.max(1)],
        })
    }

    /// Bytes received from the server so far.
    pub(crate) fn received(&self) -> u64 {
        self.rd.received()
    }

    /// Sends a non-incremental FramebufferUpdateRequest for the whole screen.
    pub(crate) fn request_full(&mut self) -> io::Result<()> {
        let [w0, w1] = self.width.to_be_bytes();
        let [h0, h1] = self.height.to_be_bytes();
        self.wr.write_all(&[3, 0, 0, 0, 0, 0, w0, w1, h0, h1])?;
        self.wr.flush()
    }

    /// Reads server messages until a FramebufferUpdate has been read whole; Bell, ServerCutText and
    /// SetColourMapEntries before it are skipped.
    pub(crate) fn read_update(&mut self) -> anyhow::Result<Update> {
        loop {
            let [kind] = self.rd.array::<1>()?;
            match kind {
                0 => return self.framebuffer_update(),
                1 => {
                    // SetColourMapEntries: padding, first colour, count, 6 bytes per colour.
                    let [_, _, _, n0, n1] = self.rd.array::<5>()?;
                    self.rd.skip(6 * u64::from(u16::from_be_bytes([n0, n1])))?;
                }
                2 => {} // Bell
                3 => {
                    // ServerCutText: padding, length (negative: extended clipboard), text.
                    let [_, _, _, l0, l1, l2, l3] = self.rd.array::<7>()?;
                    self.rd
                        .skip(u64::from(i32::from_be_bytes([l0, l1, l2, l3]).unsigned_abs()))?;
                }
                other => bail!("unexpected RFB server message type {other}"),
            }
        }
    }

    fn framebuffer_update(&mut self) -> anyhow::Result<Update> {
        let [_, n0, n1] = self.rd.array::<3>()?;
        let nrects = u16::from_be_bytes([n0, n1]);
        let mut update = Update::default();
        for _ in 0..nrects {
            let h = self.rd.array::<12>()?;
            let (w, ht) = (u16::from_be_bytes([h[4], h[5]]), u16::from_be_bytes([h[6], h[7]]));
            let encoding = i32::from_be_bytes([h[8], h[9], h[10], h[11]]);
            update.rects += 1;
            match encoding {
                ENC_RAW => {
                    let pixels = u64::from(w) * u64::from(ht);
                    let mut left = pixels * BYTES_PER_PIXEL;
                    while left > 0 {
                        let n = usize::try_from(left).unwrap_or(usize::MAX).min(self.fb.len());
                        self.rd
                            .read_exact(&mut self.fb[..n])
                            .context("reading a Raw rectangle")?;
                        left -= n as u64;
                    }
                    update.raw_pixels += pixels;
                }
                ENC_DESKTOP_SIZE => {
                    self.width = w;
                    self.height = ht;
                }
                other => bail!(
                    "unexpected encoding {other} in a FramebufferUpdate (asked for Raw and DesktopSize)"
                ),
            }
        }
        Ok(update)
    }

    /// The write side, to close it.
    pub(crate) fn writer(&mut self) -> &mut W {
        &mut self.wr
    }

    #[cfg(test)]
    fn framebuffer(&self) -> &[u8] {
        &self.fb
    }
}

#[cfg(test)]
mod tests {
    use std::io::Cursor;

    use systemvm_proto::rfb::{ServerInit, vnc_auth_response};

    use super::*;

    fn rect(x: u16, y: u16, w: u16, h: u16, enc: i32) -> Vec<u8> {
        let mut out = Vec::new();
        for v in [x, y, w, h] {
            out.extend_from_slice(&v.to_be_bytes());
        }
        out.extend_from_slice(&enc.to_be_bytes());
        out
    }

    fn server_init(w: u16, h: u16) -> Vec<u8> {
        ServerInit {
            width: w,
            height: h,
            pixel_format: [0; 16],
            name: b"bench".to_vec(),
        }
        .encode(None)
    }

    /// A reader returning at most `chunk` bytes per call.
    struct Trickle {
        inner: Cursor<Vec<u8>>,
        chunk: usize,
    }

    impl Read for Trickle {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = buf.len().min(self.chunk);
            self.inner.read(&mut buf[..n])
        }
    }

    #[test]
    fn msg_reader_small_large_and_unread() {
        let data: Vec<u8> = (0..5000u32).map(|i| (i % 251) as u8).collect();
        for chunk in [1, 7, 600, 10_000] {
            let mut r = MsgReader::new(Trickle {
                inner: Cursor::new(data.clone()),
                chunk,
            });
            let first = r.read_some().unwrap();
            assert!(!first.is_empty() && data.starts_with(&first));
            r.unread(&first[1..]);
            let mut a = [0u8; 3];
            r.read_exact(&mut a).unwrap();
            assert_eq!(a, [1, 2, 3]);
            let mut big = vec![0u8; 2000];
            r.read_exact(&mut big).unwrap();
            assert_eq!(&big[..], &data[4..2004]);
            r.skip(996).unwrap();
            let mut rest = vec![0u8; 2000];
            r.read_exact(&mut rest).unwrap();
            assert_eq!(&rest[..], &data[3000..]);
            assert_eq!(r.received(), 5000);
            assert_eq!(
                r.read_exact(&mut a).unwrap_err().kind(),
                io::ErrorKind::UnexpectedEof
            );
        }
    }

    /// A scripted server: handshake with VNC authentication, then messages interleaved with updates.
    #[test]
    fn session_against_a_script() {
        let challenge = [5u8; 16];
        let mut script = b"RFB 003.008\n".to_vec();
        script.extend_from_slice(&[1, 2]);
        script.extend_from_slice(&challenge);
        script.extend_from_slice(&[0, 0, 0, 0]);
        script.extend_from_slice(&server_init(4, 2));
        // Bell, ServerCutText "hey", SetColourMapEntries with 2 colours, then the update.
        script.push(2);
        script.extend_from_slice(&[3, 0, 0, 0, 0, 0, 0, 3]);
        script.extend_from_slice(b"hey");
        script.extend_from_slice(&[1, 0, 0, 0, 0, 2]);
        script.extend_from_slice(&[9; 12]);
        // Update 1: two Raw rects covering 4x2.
        script.extend_from_slice(&[0, 0, 0, 2]);
        script.extend_from_slice(&rect(0, 0, 4, 1, 0));
        script.extend_from_slice(&[0xaa; 16]);
        script.extend_from_slice(&rect(0, 1, 4, 1, 0));
        script.extend_from_slice(&[0xbb; 16]);
        // Update 2: DesktopSize to 3x1, then a Raw rect; extended clipboard text before it.
        script.extend_from_slice(&[3, 0, 0, 0, 0xff, 0xff, 0xff, 0xfc, 1, 2, 3, 4]);
        script.extend_from_slice(&[0, 0, 0, 2]);
        script.extend_from_slice(&rect(0, 0, 3, 1, -223));
        script.extend_from_slice(&rect(0, 0, 3, 1, 0));
        script.extend_from_slice(&[0xcc; 12]);
        // Then something unexpected.
        script.push(77);

        for chunk in [1, 5, 64, 1 << 20] {
            let rd = MsgReader::new(Trickle {
                inner: Cursor::new(script.clone()),
                chunk,
            });
            let mut c = Client::connect(rd, Vec::new(), Some("secret12"), 8).unwrap();
            assert_eq!((c.width, c.height), (4, 2));
            c.request_full().unwrap();
            assert_eq!(
                c.read_update().unwrap(),
                Update {
                    rects: 2,
                    raw_pixels: 8
                }
            );
            // The 8-byte buffer held the last piece of the second rect.
            assert_eq!(c.framebuffer(), &[0xbb; 8]);
            c.request_full().unwrap();
            assert_eq!(
                c.read_update().unwrap(),
                Update {
                    rects: 2,
                    raw_pixels: 3
                }
            );
            assert_eq!((c.width, c.height), (3, 1));
            c.request_full().unwrap();
            let err = c.read_update().unwrap_err().to_string();
            assert_eq!(err, "unexpected RFB server message type 77");
            assert_eq!(c.received(), script.len() as u64);

            let mut want = b"RFB 003.008\n\x02".to_vec();
            want.extend_from_slice(&vnc_auth_response(b"secret12", &challenge));
            want.push(1); // shared
            want.extend_from_slice(&SET_PIXEL_FORMAT);
            want.extend_from_slice(&[2, 0, 0, 2, 0, 0, 0, 0, 0xff, 0xff, 0xff, 0x21]);
            want.extend_from_slice(&[3, 0, 0, 0, 0, 0, 0, 4, 0, 2]);
            want.extend_from_slice(&[3, 0, 0, 0, 0, 0, 0, 4, 0, 2]);
            want.extend_from_slice(&[3, 0, 0, 0, 0, 0, 0, 3, 0, 1]);
            assert_eq!(c.writer(), &want, "chunk {chunk}");
        }
    }

    #[test]
    fn unsupported_encoding_and_eof() {
        let mut script = b"RFB 003.008\n".to_vec();
        script.extend_from_slice(&[1, 1, 0, 0, 0, 0]);
        script.extend_from_slice(&server_init(2, 2));
        script.extend_from_slice(&[0, 0, 0, 1]);
        script.extend_from_slice(&rect(0, 0, 2, 2, 7));
        let rd = MsgReader::new(Cursor::new(script.clone()));
        let mut c = Client::connect(rd, Vec::new(), None, 64).unwrap();
        let err = c.read_update().unwrap_err().to_string();
        assert!(err.contains("unexpected encoding 7"), "{err}");

        // A Raw rect cut short.
        let mut cut = script[..script.len() - 12].to_vec();
        cut.extend_from_slice(&rect(0, 0, 2, 2, 0));
        cut.extend_from_slice(&[1; 10]);
        let mut c = Client::connect(MsgReader::new(Cursor::new(cut)), Vec::new(), None, 64).unwrap();
        let err = format!("{:#}", c.read_update().unwrap_err());
        assert!(err.contains("server closed the connection"), "{err}");
    }

    #[test]
    fn handshake_failure_is_reported() {
        let mut script = b"RFB 003.008\n".to_vec();
        script.extend_from_slice(&[1, 2]);
        let err = format!(
            "{:#}",
            Client::connect(MsgReader::new(Cursor::new(script)), Vec::new(), None, 8)
                .err()
                .unwrap()
        );
        assert!(err.contains("requires a password"), "{err}");
    }
}
