//! An NBD client for the storage VM (snapshot backups read libvirt's pull-mode exports with it):
//! the no-I/O protocol of `systemvm-nbd` over a TCP connection, one request in flight.
//!
//! Invariants: every read from and write to the server has a deadline ([`NbdClient::timeout`]);
//! a read returns exactly the bytes asked for (holes as zeroes) or an error, never a short
//! buffer; extents cover exactly the range asked for, in order, without gaps.

use std::time::Duration;

use anyhow::Context as _;
use bytes::{Bytes, BytesMut};
use systemvm_nbd::{Chunk, ClientHandshake, Export, Request, Transmission};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

/// Room made for each read from the server (more when a reply chunk is longer).
const READ_AHEAD: usize = 256 << 10;

/// An extent: (offset, length, status flags of its context).
pub type Extent = (u64, u64, u32);

/// A connected NBD client.
#[derive(Debug)]
pub struct NbdClient {
    stream: TcpStream,
    proto: Transmission,
    /// Deadline of each read and write on the connection.
    pub timeout: Duration,
}

impl NbdClient {
    /// Connects to `addr` (`host:port`) and opens `export`, asking for metadata `contexts`.
    pub async fn connect(
        addr: &str,
        export: &str,
        contexts: &[&str],
        timeout: Duration,
    ) -> anyhow::Result<Self> {
        let mut stream = tokio::time::timeout(timeout, TcpStream::connect(addr))
            .await
            .with_context(|| format!("connecting to the NBD server {addr} timed out"))?
            .with_context(|| format!("failed to connect to the NBD server {addr}"))?;
        stream.set_nodelay(true)?;
        let mut handshake = ClientHandshake::new(export, contexts);
        let mut buf = vec![0u8; 64 << 10];
        let export = loop {
            let n = tokio::time::timeout(timeout, stream.read(&mut buf))
                .await
                .context("the NBD handshake timed out")??;
            if n == 0 {
                anyhow::bail!("the NBD server closed the connection during the handshake");
            }
            let done = handshake.feed(&buf[..n])?;
            let out = handshake.take_output();
            if !out.is_empty() {
                tokio::time::timeout(timeout, stream.write_all(&out))
                    .await
                    .context("the NBD handshake timed out")??;
            }
            if let Some(export) = done {
                break export;
            }
        };
        Ok(NbdClient {
            stream,
            proto: Transmission::new(export),
            timeout,
        })
    }

    /// What the handshake agreed on.
    pub fn export(&self) -> &Export {
        self.proto.export()
    }

    async fn send(&mut self, request: Request) -> anyhow::Result<u64> {
        let (cookie, bytes) = self.proto.request(request)?;
        tokio::time::timeout(self.timeout, self.stream.write_all(&bytes))
            .await
            .context("writing to the NBD server timed out")??;
        Ok(cookie)
    }

    /// Reads once from the server and returns the reply pieces that completes.
    async fn receive(&mut self) -> anyhow::Result<Vec<systemvm_nbd::Reply>> {
        // Straight into the decoder's buffer: a reply's data is not copied on its way.
        let input = self.proto.input(READ_AHEAD);
        let n = tokio::time::timeout(self.timeout, self.stream.read_buf(input))
            .await
            .context("the NBD server did not answer in time")??;
        if n == 0 {
            anyhow::bail!("the NBD server closed the connection");
        }
        Ok(self.proto.replies()?)
    }

    /// The reply chunks of `cookie` until its last one.
    async fn replies(
        &mut self,
        cookie: u64,
        mut each: impl FnMut(Chunk) -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        loop {
            for reply in self.receive().await? {
                anyhow::ensure!(reply.cookie == cookie, "a reply to another request");
                if let Some(chunk) = reply.chunk {
                    if let Chunk::Error { code, message } = &chunk {
                        anyhow::bail!("the NBD server failed the request: error {code} {message}");
                    }
                    each(chunk)?;
                }
                if reply.done {
                    return Ok(());
                }
            }
        }
    }

    /// Reads `len` bytes at `offset` (at most [`Export::max_read`]).
    pub async fn read(&mut self, offset: u64, len: u32) -> anyhow::Result<Bytes> {
        let (tx, mut rx) = tokio::sync::mpsc::channel(1);
        self.read_ranges(&[(offset, len)], 1, &tx).await?;
        rx.recv().await.context("the read ended without data")
    }

    /// Reads `ranges` (offset, length each at most [`Export::max_read`]) with up to `depth`
    /// requests in flight, sending each range's bytes to `out` in the order of `ranges` (holes as
    /// zeroes). Returns the bytes read; stops at the first error, or when `out` is closed.
    pub async fn read_ranges(
        &mut self,
        ranges: &[(u64, u32)],
        depth: usize,
        out: &tokio::sync::mpsc::Sender<Bytes>,
    ) -> anyhow::Result<u64> {
        use std::collections::{HashMap, VecDeque};
        // Per request in flight: its buffer, where it starts, the bytes filled, whether done.
        struct Pending {
            len: usize,
            offset: u64,
            filled: u64,
            /// Data chunks (offset, bytes); holes stay zeroes.
            parts: Vec<(u64, Bytes)>,
            done: bool,
        }
        impl Pending {
            /// The request's bytes: the one chunk that covers it, else the chunks over zeroes.
            fn assemble(mut self) -> Bytes {
                if let [(at, data)] = self.parts.as_slice()
                    && *at == self.offset
                    && data.len() == self.len
                {
                    return self.parts.pop().map(|(_, d)| d).unwrap_or_default();
                }
                let mut buf = BytesMut::zeroed(self.len);
                for (at, data) in self.parts {
                    let start = (at - self.offset) as usize;
                    buf[start..start + data.len()].copy_from_slice(&data);
                }
                buf.freeze()
            }
        }
        let depth = depth.max(1);
        let mut next = 0usize;
        let mut order: VecDeque<u64> = VecDeque::new();
        let mut pending: HashMap<u64, Pending> = HashMap::new();
        let mut total = 0u64;
        while next < ranges.len() || !order.is_empty() {
            while next < ranges.len() && order.len() < depth {
                let (offset, len) = ranges[next];
                let cookie = self.send(Request::Read { offset, len }).await?;
                order.push_back(cookie);
                pending.insert(
                    cookie,
                    Pending {
                        len: len as usize,
                        offset,
                        filled: 0,
                        parts: Vec::new(),
                        done: false,
                    },
                );
                next += 1;
            }
            // Hand over what is complete, in order.
            while let Some(p) = order.front().and_then(|c| pending.get(c)).filter(|p| p.done) {
                anyhow::ensure!(
                    p.filled == p.len as u64,
                    "the NBD server answered {} of {} bytes at {}",
                    p.filled,
                    p.len,
                    p.offset
                );
                let Some(cookie) = order.pop_front() else { break };
                let Some(p) = pending.remove(&cookie) else { break };
                total += p.len as u64;
                if out.send(p.assemble()).await.is_err() {
                    return Ok(total);
                }
            }
            if order.is_empty() {
                continue;
            }
            for reply in self.receive().await? {
                let p = pending
                    .get_mut(&reply.cookie)
                    .context("a reply to a request not in flight")?;
                match reply.chunk {
                    Some(Chunk::Data { offset: at, data }) => {
                        p.filled += data.len() as u64;
                        p.parts.push((at, data));
                    }
                    Some(Chunk::Hole { len, .. }) => p.filled += u64::from(len),
                    Some(Chunk::Error { code, message }) => {
                        anyhow::bail!(
                            "the NBD server failed a read at {}: error {code} {message}",
                            p.offset
                        )
                    }
                    Some(other) => anyhow::bail!("unexpected reply to a read: {other:?}"),
                    None => {}
                }
                if reply.done {
                    p.done = true;
                }
            }
        }
        Ok(total)
    }

    /// The extents of context `context` over `len` bytes from `offset` (several requests when the
    /// server answers less than asked).
    pub async fn extents(&mut self, context: &str, offset: u64, len: u64) -> anyhow::Result<Vec<Extent>> {
        let id = self
            .export()
            .context(context)
            .with_context(|| format!("the NBD server did not agree to context {context}"))?;
        let end = offset + len;
        let mut out: Vec<Extent> = Vec::new();
        let mut at = offset;
        while at < end {
            let ask = u32::try_from(end - at).unwrap_or(0xffff_f000);
            let cookie = self.send(Request::BlockStatus { offset: at, len: ask }).await?;
            let mut raw = Vec::new();
            self.replies(cookie, |chunk| {
                if let Chunk::BlockStatus { context, extents } = chunk
                    && context == id
                {
                    raw = extents;
                }
                Ok(())
            })
            .await?;
            let got = systemvm_nbd::extents_from(at, end - at, &raw);
            let covered: u64 = got.iter().map(|e| e.1).sum();
            anyhow::ensure!(covered > 0, "the NBD server described no extent at {at}");
            for e in got {
                match out.last_mut() {
                    Some(last) if last.2 == e.2 && last.0 + last.1 == e.0 => last.1 += e.1,
                    _ => out.push(e),
                }
            }
            at += covered;
        }
        Ok(out)
    }

    /// Ends the session.
    pub async fn disconnect(mut self) {
        if let Ok(cookie_bytes) = self.proto.request(Request::Disconnect) {
            let _ = tokio::time::timeout(self.timeout, self.stream.write_all(&cookie_bytes.1)).await;
        }
        let _ = self.stream.shutdown().await;
    }
}
