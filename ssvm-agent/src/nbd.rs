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

/// An extent: (offset, length, status flags of its context).
pub type Extent = (u64, u64, u32);

/// A connected NBD client.
#[derive(Debug)]
pub struct NbdClient {
    stream: TcpStream,
    proto: Transmission,
    buf: Vec<u8>,
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
        let mut buf = vec![0u8; 64 * 1024];
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
            buf,
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

    /// The reply chunks of `cookie` until its last one.
    async fn replies(
        &mut self,
        cookie: u64,
        mut each: impl FnMut(Chunk) -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        loop {
            let n = tokio::time::timeout(self.timeout, self.stream.read(&mut self.buf))
                .await
                .context("the NBD server did not answer in time")??;
            if n == 0 {
                anyhow::bail!("the NBD server closed the connection");
            }
            for reply in self.proto.feed(&self.buf[..n])? {
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
        let cookie = self.send(Request::Read { offset, len }).await?;
        let mut out = BytesMut::zeroed(len as usize);
        let mut filled = 0u64;
        self.replies(cookie, |chunk| {
            match chunk {
                Chunk::Data { offset: at, data } => {
                    let start = (at - offset) as usize;
                    out[start..start + data.len()].copy_from_slice(&data);
                    filled += data.len() as u64;
                }
                // Zeroes are there already.
                Chunk::Hole { len, .. } => filled += u64::from(len),
                other => anyhow::bail!("unexpected reply to a read: {other:?}"),
            }
            Ok(())
        })
        .await?;
        anyhow::ensure!(
            filled == u64::from(len),
            "the NBD server answered {filled} of {len} bytes"
        );
        Ok(out.freeze())
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
