//! WebSocket framing over the raw upgraded socket.
//!
//! The relay treats the WebSocket as a byte stream: frame boundaries carry no meaning for RFB.
//! [`WsReader`] yields client payload bytes as they arrive (unmasked in place in its read buffer, so a
//! large frame never has to be held whole); [`WsWriter`] writes one binary frame per relay chunk as a
//! small header plus the caller's buffer in one vectored write, without copying the payload, each
//! write within a deadline (a browser that stops reading is not waited for forever).

use std::io::{self, IoSlice};
use std::time::Duration;

use systemvm_proto::ws::{self, FrameHeader, MAX_HEADER_LEN, Opcode, WsError, close_code};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Size of the browser-side read buffer: noVNC sends messages of at most 10 KiB.
pub const READ_BUF: usize = 16 * 1024;

/// Why reading from the browser failed.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// The socket failed.
    #[error("browser connection failed: {0}")]
    Io(#[from] io::Error),
    /// The browser broke RFC 6455.
    #[error("WebSocket protocol error: {0}")]
    Protocol(&'static str),
    /// An invalid frame header.
    #[error("WebSocket protocol error: {0}")]
    Frame(#[from] WsError),
    /// Text frames carry no RFB.
    #[error("text frames are not supported")]
    Text,
}

impl TransportError {
    /// The close code to answer this error with.
    pub fn close_code(&self) -> u16 {
        match self {
            TransportError::Io(_) => close_code::GOING_AWAY,
            TransportError::Text => close_code::UNSUPPORTED,
            TransportError::Protocol(_) | TransportError::Frame(_) => close_code::PROTOCOL,
        }
    }
}

/// What the browser sent.
#[derive(Debug, PartialEq, Eq)]
pub enum WsIn<'a> {
    /// Payload bytes of a binary message (any part of it).
    Data(&'a [u8]),
    /// A ping to answer with this payload.
    Ping(Vec<u8>),
    /// A pong (keep-alive answer).
    Pong,
    /// A close frame, with its code and reason when present.
    Close(Option<(u16, String)>),
}

#[derive(Debug, Clone, Copy)]
struct Current {
    opcode: Opcode,
    mask: [u8; 4],
    remaining: u64,
    offset: u64,
}

/// Reads client frames from the browser socket.
pub struct WsReader<R> {
    io: R,
    buf: Box<[u8]>,
    start: usize,
    end: usize,
    current: Option<Current>,
    /// Inside a fragmented binary message (continuations allowed).
    in_message: bool,
    control: Vec<u8>,
}

impl<R: AsyncRead + Unpin> WsReader<R> {
    /// A reader over `io`; `already_read` are bytes the HTTP layer read past the upgrade request.
    pub fn new(io: R, already_read: &[u8]) -> Self {
        let mut buf = vec![0u8; READ_BUF.max(already_read.len())].into_boxed_slice();
        buf[..already_read.len()].copy_from_slice(already_read);
        WsReader {
            io,
            buf,
            start: 0,
            end: already_read.len(),
            current: None,
            in_message: false,
            control: Vec::new(),
        }
    }

    /// The next piece of input; `Ok(None)` when the browser closed the socket without a close frame.
    pub async fn next(&mut self) -> Result<Option<WsIn<'_>>, TransportError> {
        loop {
            let Some(mut cur) = self.current else {
                match FrameHeader::parse(&self.buf[self.start..self.end])? {
                    Some((header, len)) => {
                        self.start += len;
                        self.begin(header)?;
                        continue;
                    }
                    None => {
                        if !self.fill().await? {
                            return Ok(None);
                        }
                        continue;
                    }
                }
            };
            if cur.remaining > 0 && self.start == self.end && !self.fill().await? {
                return Err(TransportError::Protocol("connection closed inside a frame"));
            }
            let n = usize::try_from(cur.remaining)
                .unwrap_or(usize::MAX)
                .min(self.end - self.start);
            let range = self.start..self.start + n;
            ws::apply_mask(&mut self.buf[range.clone()], cur.mask, cur.offset);
            self.start += n;
            cur.remaining -= n as u64;
            cur.offset += n as u64;
            self.current = (cur.remaining > 0).then_some(cur);
            if cur.opcode.is_control() {
                self.control.extend_from_slice(&self.buf[range]);
                if cur.remaining == 0 {
                    let payload = std::mem::take(&mut self.control);
                    return Ok(Some(match cur.opcode {
                        Opcode::Ping => WsIn::Ping(payload),
                        Opcode::Pong => WsIn::Pong,
                        _ => WsIn::Close(ws::parse_close(&payload)),
                    }));
                }
            } else if n > 0 {
                return Ok(Some(WsIn::Data(&self.buf[range])));
            }
        }
    }

    fn begin(&mut self, header: FrameHeader) -> Result<(), TransportError> {
        let mask = header
            .mask
            .ok_or(TransportError::Protocol("client frames must be masked"))?;
        match header.opcode {
            Opcode::Text => return Err(TransportError::Text),
            Opcode::Binary if self.in_message => {
                return Err(TransportError::Protocol("new message inside a fragmented one"));
            }
            Opcode::Continuation if !self.in_message => {
                return Err(TransportError::Protocol("continuation without a message"));
            }
            Opcode::Binary | Opcode::Continuation => self.in_message = !header.fin,
            Opcode::Close | Opcode::Ping | Opcode::Pong => {}
        }
        let current = Current {
            opcode: header.opcode,
            mask,
            remaining: header.len,
            offset: 0,
        };
        // An empty data frame carries nothing; an empty control frame still has to be reported, which
        // `next` does when it consumes zero payload bytes.
        self.current = (header.len > 0 || header.opcode.is_control()).then_some(current);
        Ok(())
    }

    /// Reads more bytes; `false` on end of stream.
    async fn fill(&mut self) -> io::Result<bool> {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        } else if self.end == self.buf.len() {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        let n = self.io.read(&mut self.buf[self.end..]).await?;
        self.end += n;
        Ok(n > 0)
    }
}

/// Time a close frame gets after a write toward the browser timed out (it rarely fits then).
pub const STALLED_CLOSE_GRACE: Duration = Duration::from_millis(500);

/// Writes server frames to the browser socket.
///
/// Invariant: every write has a deadline. A frame that the socket does not take within it fails
/// with [`io::ErrorKind::TimedOut`] (the browser stopped reading); a frame cut off that way is never
/// followed by another one, and [`WsWriter::close`] after it only shuts the socket down.
pub struct WsWriter<W> {
    io: W,
    /// Longest wait for one frame (and for the shutdown).
    deadline: Duration,
    /// A write timed out: the browser is not reading.
    stalled: bool,
    /// Part of a frame was written and the rest never was: no frame may follow.
    torn: bool,
}

impl<W: AsyncWrite + Unpin> WsWriter<W> {
    /// A writer over `io` whose writes each get `deadline`.
    pub fn new(io: W, deadline: Duration) -> Self {
        WsWriter {
            io,
            deadline,
            stalled: false,
            torn: false,
        }
    }

    /// Whether a write timed out (the browser stopped reading).
    pub fn stalled(&self) -> bool {
        self.stalled
    }

    /// Sends `payload` as one binary frame: header and payload in vectored writes, no copy.
    pub async fn send_binary(&mut self, payload: &[u8]) -> io::Result<()> {
        self.send(Opcode::Binary, payload).await
    }

    /// Sends a control or data frame within the write deadline.
    pub async fn send(&mut self, opcode: Opcode, payload: &[u8]) -> io::Result<()> {
        let deadline = self.deadline;
        self.send_within(opcode, payload, deadline).await
    }

    async fn send_within(&mut self, opcode: Opcode, payload: &[u8], deadline: Duration) -> io::Result<()> {
        if self.torn {
            return Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "an earlier frame to the browser was cut off",
            ));
        }
        match tokio::time::timeout(deadline, self.write_frame(opcode, payload)).await {
            Ok(result) => result,
            Err(_) => {
                self.stalled = true;
                Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("the browser took no data for {} ms", deadline.as_millis()),
                ))
            }
        }
    }

    async fn write_frame(&mut self, opcode: Opcode, payload: &[u8]) -> io::Result<()> {
        let mut head = [0u8; MAX_HEADER_LEN];
        let head_len = FrameHeader {
            fin: true,
            opcode,
            mask: None,
            len: payload.len() as u64,
        }
        .encode(&mut head);
        let (mut head, mut payload) = (&head[..head_len], payload);
        while !head.is_empty() || !payload.is_empty() {
            let n = if head.is_empty() {
                self.io.write(payload).await?
            } else {
                self.io
                    .write_vectored(&[IoSlice::new(head), IoSlice::new(payload)])
                    .await?
            };
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            self.torn = true;
            let from_head = n.min(head.len());
            head = &head[from_head..];
            payload = &payload[n - from_head..];
        }
        self.torn = false;
        self.io.flush().await
    }

    /// Sends a close frame with a code and a reason (cut to fit) and shuts the write side down,
    /// each within the deadline. After a timed-out write the close frame gets
    /// [`STALLED_CLOSE_GRACE`] and is skipped when a frame was cut off.
    pub async fn close(&mut self, code: u16, reason: &str) -> io::Result<()> {
        let grace = if self.stalled {
            STALLED_CLOSE_GRACE.min(self.deadline)
        } else {
            self.deadline
        };
        let sent = self
            .send_within(Opcode::Close, &ws::close_payload(code, reason), grace)
            .await;
        let shut = match tokio::time::timeout(grace, self.io.shutdown()).await {
            Ok(result) => result,
            Err(_) => Err(io::ErrorKind::TimedOut.into()),
        };
        sent.and(shut)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client_frame(opcode: u8, fin: bool, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
        let op = match opcode {
            0 => Opcode::Continuation,
            1 => Opcode::Text,
            2 => Opcode::Binary,
            8 => Opcode::Close,
            9 => Opcode::Ping,
            _ => Opcode::Pong,
        };
        let mut head = [0u8; MAX_HEADER_LEN];
        let n = FrameHeader {
            fin,
            opcode: op,
            mask: Some(mask),
            len: payload.len() as u64,
        }
        .encode(&mut head);
        let mut out = head[..n].to_vec();
        let mut body = payload.to_vec();
        ws::apply_mask(&mut body, mask, 0);
        out.extend_from_slice(&body);
        out
    }

    async fn collect(bytes: Vec<u8>, chunk: usize) -> (Vec<u8>, Vec<String>, Option<String>) {
        let (mut tx, rx) = tokio::io::duplex(64);
        let writer = tokio::spawn(async move {
            for c in bytes.chunks(chunk) {
                tx.write_all(c).await.unwrap();
            }
        });
        let mut reader = WsReader::new(rx, &[]);
        let (mut data, mut events, mut error) = (Vec::new(), Vec::new(), None);
        loop {
            match reader.next().await {
                Ok(Some(WsIn::Data(d))) => data.extend_from_slice(d),
                Ok(Some(other)) => events.push(format!("{other:?}")),
                Ok(None) => break,
                Err(e) => {
                    error = Some(e.to_string());
                    break;
                }
            }
        }
        writer.await.unwrap();
        (data, events, error)
    }

    #[tokio::test]
    async fn reads_fragmented_and_control_frames_in_any_chunking() {
        let big: Vec<u8> = (0..70_000u32).map(|i| (i * 7) as u8).collect();
        let mut stream = client_frame(2, false, b"RFB 003.008\n", [1, 2, 3, 4]);
        stream.extend(client_frame(9, true, b"hi", [5, 6, 7, 8]));
        stream.extend(client_frame(0, true, &big, [9, 9, 1, 2]));
        stream.extend(client_frame(10, true, b"", [0, 0, 0, 1]));
        stream.extend(client_frame(2, true, b"", [3, 3, 3, 3]));
        stream.extend(client_frame(
            8,
            true,
            &ws::close_payload(1000, "bye"),
            [7, 7, 7, 7],
        ));
        let mut want = b"RFB 003.008\n".to_vec();
        want.extend_from_slice(&big);
        for chunk in [1, 5, 4096, 1 << 20] {
            let (data, events, error) = collect(stream.clone(), chunk).await;
            assert_eq!(error, None);
            assert!(data == want, "chunk {chunk}");
            assert_eq!(
                events,
                vec!["Ping([104, 105])", "Pong", "Close(Some((1000, \"bye\")))"]
            );
        }
    }

    #[tokio::test]
    async fn refuses_bad_frames() {
        let unmasked = vec![0x82, 0x01, 0x00];
        assert_eq!(
            collect(unmasked, 64).await.2.unwrap(),
            "WebSocket protocol error: client frames must be masked"
        );
        let text = client_frame(1, true, b"x", [1, 1, 1, 1]);
        assert_eq!(
            collect(text, 64).await.2.unwrap(),
            "text frames are not supported"
        );
        let orphan = client_frame(0, true, b"x", [1, 1, 1, 1]);
        assert!(collect(orphan, 64).await.2.unwrap().contains("continuation"));
        let mut cut = client_frame(2, true, b"abcdef", [1, 1, 1, 1]);
        cut.truncate(9);
        assert!(collect(cut, 64).await.2.unwrap().contains("inside a frame"));
    }

    #[tokio::test]
    async fn writes_frames_clients_can_read() {
        let (a, mut b) = tokio::io::duplex(1 << 20);
        let mut w = WsWriter::new(a, Duration::from_secs(5));
        let payload = vec![42u8; 300];
        w.send_binary(&payload).await.unwrap();
        w.close(4001, "console token already used").await.unwrap();
        let mut got = Vec::new();
        b.read_to_end(&mut got).await.unwrap();
        let (h, n) = FrameHeader::parse(&got).unwrap().unwrap();
        assert_eq!((h.opcode, h.len, h.mask, n), (Opcode::Binary, 300, None, 4));
        assert_eq!(&got[n..n + 300], &payload[..]);
        let rest = &got[n + 300..];
        let (h, n) = FrameHeader::parse(rest).unwrap().unwrap();
        assert_eq!(h.opcode, Opcode::Close);
        assert_eq!(
            ws::parse_close(&rest[n..]),
            Some((4001, "console token already used".into()))
        );
    }

    #[tokio::test]
    async fn a_write_the_browser_does_not_take_times_out() {
        let deadline = Duration::from_millis(200);
        // A 4 KiB pipe nobody reads: the frame cannot all go in.
        let (a, b) = tokio::io::duplex(4096);
        let mut w = WsWriter::new(a, deadline);
        let started = std::time::Instant::now();
        let err = w.send_binary(&[7u8; 64 * 1024]).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(started.elapsed() >= deadline && started.elapsed() < deadline * 5);
        assert!(w.stalled());
        // The frame was cut off: nothing may follow it, and closing does not wait again for long.
        assert_eq!(
            w.send_binary(b"x").await.unwrap_err().kind(),
            io::ErrorKind::BrokenPipe
        );
        let closing = std::time::Instant::now();
        let _ = w.close(1001, "browser stopped reading").await;
        assert!(
            closing.elapsed() < deadline * 3,
            "close took {:?}",
            closing.elapsed()
        );
        drop(b);

        // Stalled before a byte of the frame went out: the close frame is still tried (briefly) and
        // goes out once there is room.
        let (a, mut b) = tokio::io::duplex(16);
        let mut w = WsWriter::new(a, deadline);
        w.send_binary(&[1u8; 14]).await.unwrap();
        assert_eq!(
            w.send_binary(&[2u8; 64]).await.unwrap_err().kind(),
            io::ErrorKind::TimedOut
        );
        let mut first = [0u8; 16];
        b.read_exact(&mut first).await.unwrap();
        w.close(1001, "gone").await.unwrap();
        let mut rest = Vec::new();
        b.read_to_end(&mut rest).await.unwrap();
        let (h, n) = FrameHeader::parse(&rest).unwrap().unwrap();
        assert_eq!(h.opcode, Opcode::Close);
        assert_eq!(ws::parse_close(&rest[n..]), Some((1001, "gone".into())));
    }
}
