//! The NFSv3 backend of the store, on the userspace client `nfs3_client` (no kernel mount).
//!
//! Invariants:
//! - Every RPC goes through [`NfsStore::call`], which takes a connection from the pool, applies the
//!   deadline (connecting included), maps failures to [`StoreError`] and updates the store's health.
//! - A connection whose call timed out or failed below the NFS level is dropped, never reused;
//!   the pool opens a new one lazily. At most [`StoreOptions::connections`] connections exist, one
//!   call in flight on each (the client takes `&mut self`), so concurrent calls spread over them.
//! - Credentials are AUTH_UNIX with the configured uid/gid (ganesha refuses AUTH_NULL writes), and
//!   connections come from unprivileged source ports.
//! - READ and WRITE requests carry at most 1 MiB (and no more than the server's `rtmax`/`wtmax`):
//!   the client rejects fragmented replies, and 1 MiB measured fastest.
//! - Writes are UNSTABLE; [`NfsStore::flush`] sends one COMMIT, which covers only the writes
//!   answered before it was sent (a write answered later may have been processed after it, so it
//!   waits for the next COMMIT). A covered write whose verifier differs from the COMMIT's means the
//!   server restarted and may have dropped it: the flush fails with [`StoreError::ServerRestarted`]
//!   and the caller rewrites from its last good flush. Writes keep their verifier until a COMMIT
//!   covers them, so a restart between two flushes is always detected.
//! - Idle connections are checked before reuse: one the server closed is dropped, not used.

use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::try_join_all;
use nfs3_client::nfs3_types::nfs3::{
    COMMIT3args, CREATE3args, FSINFO3args, FSSTAT3args, GETATTR3args, LOOKUP3args, MKDIR3args, Nfs3Option,
    Nfs3Result, READ3args, READDIRPLUS3args, REMOVE3args, RENAME3args, RMDIR3args, WRITE3args, cookieverf3,
    createhow3, diropargs3, fattr3, filename3, ftype3, nfs_fh3, nfsstat3, sattr3, stable_how, writeverf3,
};
use nfs3_client::nfs3_types::rpc::{auth_unix, opaque_auth};
use nfs3_client::nfs3_types::xdr_codec::Opaque;
use nfs3_client::tokio::TokioConnector;
use nfs3_client::{Nfs3Client, Nfs3ConnectionBuilder, RpcError};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tracing::{debug, warn};

use super::{Capacity, DirEntry, HealthCell, Metadata, StoreError, StoreOptions, split_parent};

/// Largest READ or WRITE payload.
const MAX_IO: u32 = 1024 * 1024;
/// READDIRPLUS sizes: bytes of names and cookies, and of the whole reply (well below 1 MiB;
/// ganesha fills replies up to `maxcount` and ignores `dircount`).
const READDIR_DIRCOUNT: u32 = 32 * 1024;
const READDIR_MAXCOUNT: u32 = 128 * 1024;
/// Modes of what the store creates.
const FILE_MODE: u32 = 0o644;
const DIR_MODE: u32 = 0o755;

/// Where the export is, from the store URL.
pub(super) struct Target {
    pub(super) host: String,
    pub(super) port: u16,
    pub(super) export: String,
    pub(super) mount_port: Option<u16>,
}

/// The client's byte stream: a TCP stream shared with the pool, which peeks at idle connections.
///
/// Unlike the crate's own tokio wrapper it reports end of stream as an error: the client's
/// `read_exact` loop would otherwise spin on a closed connection until the deadline.
struct Io(Arc<TcpStream>);

impl nfs3_client::io::AsyncRead for Io {
    async fn async_read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            self.0.readable().await?;
            match self.0.try_read(buf) {
                Ok(0) if !buf.is_empty() => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the server closed the connection",
                    ));
                }
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
    }
}

impl nfs3_client::io::AsyncWrite for Io {
    async fn async_write(&mut self, buf: &[u8]) -> io::Result<usize> {
        loop {
            self.0.writable().await?;
            match self.0.try_write(buf) {
                Ok(0) if !buf.is_empty() => return Err(io::Error::from(io::ErrorKind::WriteZero)),
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
    }
}

type Client = Nfs3Client<Io>;

/// A pooled connection: the client and its stream (to check it before reuse).
struct Conn {
    client: Client,
    stream: Arc<TcpStream>,
}

impl Conn {
    /// An idle connection must have nothing to read: end of stream or stray bytes make it unusable.
    fn is_usable(&self) -> bool {
        let mut probe = [0u8; 1];
        matches!(self.stream.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
    }
}

/// The unstable-write bookkeeping of one open file: which answered unstable writes a COMMIT
/// covers, and whether the server kept them.
///
/// A COMMIT covers the unstable writes the server processed before it. The client knows that only
/// of the writes whose replies it had seen before it sent the COMMIT: a write answered after that
/// (even before the COMMIT's reply) may have been processed after the COMMIT, so it stays
/// outstanding for the next one. A covered write whose verifier differs from the COMMIT's means
/// the server restarted between the two and may have dropped the data. Outstanding writes carry
/// their verifier until a COMMIT covers them, so a restart is detected whichever COMMIT comes next.
#[derive(Debug, Default)]
struct Verifier {
    /// COMMITs sent so far on this file; the round a write was answered in is this count then.
    commits_sent: u64,
    /// The distinct (round, verifier) pairs of unstable writes not yet covered by a COMMIT.
    outstanding: Vec<(u64, writeverf3)>,
}

impl Verifier {
    /// An unstable write was answered with `verf`.
    fn note_unstable_write(&mut self, verf: writeverf3) {
        let entry = (self.commits_sent, verf);
        if !self.outstanding.contains(&entry) {
            self.outstanding.push(entry);
        }
    }

    /// A COMMIT is about to be sent: it covers the writes answered so far. Returns its token.
    fn begin_commit(&mut self) -> u64 {
        self.commits_sent += 1;
        self.commits_sent
    }

    /// The COMMIT of `token` was answered with `verf`: whether a write it covers may be lost.
    /// Covered writes are settled either way (lost ones must be rewritten by the caller); the
    /// writes answered after it was sent stay outstanding.
    fn committed(&mut self, token: u64, verf: writeverf3) -> bool {
        let mut lost = false;
        self.outstanding.retain(|(round, v)| {
            let covered = *round < token;
            lost |= covered && *v != verf;
            !covered
        });
        lost
    }
}

/// An open NFS file: its handle and unstable-write state.
#[derive(Clone)]
pub(super) struct NfsFile {
    fh: nfs_fh3,
    verifier: Arc<Mutex<Verifier>>,
}

impl NfsFile {
    fn new(fh: nfs_fh3) -> NfsFile {
        NfsFile {
            fh,
            verifier: Arc::new(Mutex::new(Verifier::default())),
        }
    }

    fn verifier(&self) -> std::sync::MutexGuard<'_, Verifier> {
        self.verifier.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// An NFS status that says the store itself is not working, rather than answering about a path.
fn is_store_failure(status: nfsstat3) -> bool {
    matches!(
        status,
        nfsstat3::NFS3ERR_IO
            | nfsstat3::NFS3ERR_SERVERFAULT
            | nfsstat3::NFS3ERR_NOSPC
            | nfsstat3::NFS3ERR_DQUOT
            | nfsstat3::NFS3ERR_ROFS
    )
}

/// The NFS status of a reply.
trait Status {
    fn status(&self) -> nfsstat3;
}

impl<T, E> Status for Nfs3Result<T, E> {
    fn status(&self) -> nfsstat3 {
        match self {
            Nfs3Result::Ok(_) => nfsstat3::NFS3_OK,
            Nfs3Result::Err((status, _)) => *status,
        }
    }
}

fn name(text: &str) -> filename3<'static> {
    filename3::from(text.as_bytes().to_vec())
}

fn metadata_of(attrs: &fattr3) -> Metadata {
    Metadata {
        is_dir: attrs.type_ == ftype3::NF3DIR,
        size: attrs.size,
    }
}

/// Splits `len` bytes from `offset` into (offset, start, end) pieces of at most `max` bytes.
fn pieces(offset: u64, len: usize, max: usize) -> impl Iterator<Item = (u64, usize, usize)> {
    (0..len).step_by(max.max(1)).map(move |start| {
        let end = (start + max).min(len);
        (offset + start as u64, start, end)
    })
}

/// The store on an NFSv3 export.
pub(super) struct NfsStore {
    name: String,
    addr: SocketAddr,
    timeout: Duration,
    credential: opaque_auth<'static>,
    root: nfs_fh3,
    rmax: usize,
    wmax: usize,
    permits: Semaphore,
    idle: Mutex<Vec<Conn>>,
    health: Arc<HealthCell>,
}

async fn resolve(host: &str, port: u16) -> io::Result<IpAddr> {
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(ip);
    }
    let mut addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, port)).await?.collect();
    // Prefer IPv4, as most NFS servers are reached.
    addrs.sort_by_key(|a| a.is_ipv6());
    addrs
        .first()
        .map(SocketAddr::ip)
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("{host} has no address")))
}

impl NfsStore {
    /// Mounts the export (which checks it works), then reads the transfer sizes.
    pub(super) async fn open(
        name: String,
        target: Target,
        opts: &StoreOptions,
        health: Arc<HealthCell>,
    ) -> Result<NfsStore, StoreError> {
        let credential = opaque_auth::auth_unix(&auth_unix {
            stamp: 0,
            machinename: Opaque::owned(b"ssvm-agent".to_vec()),
            uid: opts.uid,
            gid: opts.gid,
            gids: vec![opts.gid],
        });
        let connect_error = |reason: String| StoreError::Connect {
            store: name.clone(),
            reason,
        };
        let mount = async {
            let ip = resolve(&target.host, target.port)
                .await
                .map_err(|e| connect_error(format!("cannot resolve {}: {e}", target.host)))?;
            let mut builder = Nfs3ConnectionBuilder::new(TokioConnector, ip.to_string(), &target.export)
                .credential(credential.clone())
                .connect_from_privileged_port(false)
                .nfs3_port(target.port);
            if let Some(port) = target.mount_port {
                builder = builder.mount_port(port);
            }
            let conn = builder.mount().await.map_err(|e| {
                let via = match target.mount_port {
                    Some(port) => format!("mount port {port}"),
                    None => "the portmapper on port 111".to_owned(),
                };
                connect_error(format!("mount {} (via {via}): {e}", target.export))
            })?;
            Ok::<_, StoreError>((ip, conn.root_nfs_fh3()))
        };
        let (ip, root) = tokio::time::timeout(opts.op_timeout, mount).await.map_err(|_| {
            connect_error(format!(
                "mount {} timed out after {:?}",
                target.export, opts.op_timeout
            ))
        })??;
        // The mount's connections are dropped: calls use the pool's, straight to the NFS port.
        let mut store = NfsStore {
            name,
            addr: SocketAddr::new(ip, target.port),
            timeout: opts.op_timeout,
            credential,
            root,
            rmax: MAX_IO as usize,
            wmax: MAX_IO as usize,
            permits: Semaphore::new(opts.connections.max(1)),
            idle: Mutex::new(Vec::new()),
            health,
        };
        let args = FSINFO3args {
            fsroot: store.root.clone(),
        };
        let info = store
            .call("fsinfo", "", move |mut c| async move {
                let r = c.fsinfo(&args).await;
                (c, r)
            })
            .await?;
        let info = store.check("fsinfo", "", info)?;
        let clamp = |max: u32| MAX_IO.min(max).max(4096) as usize;
        (store.rmax, store.wmax) = (clamp(info.rtmax), clamp(info.wtmax));
        debug!(store = %store.name, rtmax = info.rtmax, wtmax = info.wtmax, "nfs export mounted");
        Ok(store)
    }

    async fn connect(&self) -> Result<Conn, StoreError> {
        let stream = TcpStream::connect(self.addr)
            .await
            .map_err(|e| StoreError::Connect {
                store: self.name.clone(),
                reason: format!("{}: {e}", self.addr),
            })?;
        // Requests are written whole; do not hold small ones back.
        let _ = stream.set_nodelay(true);
        let stream = Arc::new(stream);
        let client = Nfs3Client::new_with_auth(
            Io(stream.clone()),
            self.credential.clone(),
            opaque_auth::default(),
        );
        Ok(Conn { client, stream })
    }

    fn take_idle(&self) -> Option<Conn> {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        while let Some(conn) = idle.pop() {
            if conn.is_usable() {
                return Some(conn);
            }
            debug!(store = %self.name, "dropping an idle connection the server closed");
        }
        None
    }

    fn put_idle(&self, conn: Conn) {
        self.idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(conn);
    }

    /// Runs one RPC: `f` gets a connection and gives it back with the result. Applies the deadline
    /// to connecting and the call, drops connections that failed, and updates health.
    async fn call<T, F, Fut>(&self, op: &'static str, path: &str, f: F) -> Result<T, StoreError>
    where
        T: Status,
        F: FnOnce(Client) -> Fut,
        Fut: Future<Output = (Client, Result<T, RpcError>)>,
    {
        let timeout = |op| StoreError::Timeout {
            store: self.name.clone(),
            op,
            path: path.to_owned(),
            after: self.timeout,
        };
        // Waiting for a free connection has its own deadline; it says nothing about the server.
        let _permit = match tokio::time::timeout(self.timeout, self.permits.acquire()).await {
            Ok(Ok(permit)) => permit,
            // The semaphore is never closed.
            Ok(Err(_)) | Err(_) => return Err(timeout("wait for a free connection")),
        };
        let idle = self.take_idle();
        let attempt = async {
            let Conn { client, stream } = match idle {
                Some(conn) => conn,
                None => self.connect().await?,
            };
            let (client, result) = f(client).await;
            Ok::<_, StoreError>((Conn { client, stream }, result))
        };
        // On timeout the attempt, and with it the connection, is dropped here.
        let outcome = tokio::time::timeout(self.timeout, attempt).await;
        match outcome {
            Err(_elapsed) => {
                let e = timeout(op);
                self.health.fail(&e);
                Err(e)
            }
            Ok(Err(e)) => {
                self.health.fail(&e);
                Err(e)
            }
            Ok(Ok((conn, Err(rpc)))) => {
                if rpc.is_connection_reusable() {
                    self.put_idle(conn);
                }
                let e = StoreError::Rpc {
                    store: self.name.clone(),
                    op,
                    path: path.to_owned(),
                    reason: rpc.to_string(),
                };
                self.health.fail(&e);
                Err(e)
            }
            Ok(Ok((conn, Ok(reply)))) => {
                self.put_idle(conn);
                let status = reply.status();
                if is_store_failure(status) {
                    self.health.fail(&self.status_error(op, path, status));
                } else {
                    self.health.ok();
                }
                Ok(reply)
            }
        }
    }

    fn status_error(&self, op: &'static str, path: &str, status: nfsstat3) -> StoreError {
        let (store, path) = (self.name.clone(), path.to_owned());
        match status {
            nfsstat3::NFS3ERR_NOENT => StoreError::NotFound { store, path },
            nfsstat3::NFS3ERR_EXIST => StoreError::AlreadyExists { store, path },
            nfsstat3::NFS3ERR_NOTDIR => StoreError::NotADirectory { store, path },
            nfsstat3::NFS3ERR_ISDIR => StoreError::IsADirectory { store, path },
            nfsstat3::NFS3ERR_STALE => StoreError::Stale { store, path },
            nfsstat3::NFS3ERR_NOSPC | nfsstat3::NFS3ERR_DQUOT | nfsstat3::NFS3ERR_FBIG => {
                StoreError::NoSpace {
                    store,
                    op,
                    path,
                    reason: status.to_string(),
                }
            }
            other => StoreError::Nfs {
                store,
                op,
                path,
                status: other.to_string(),
            },
        }
    }

    /// The success value of a reply, or its status as an error.
    fn check<T, E>(&self, op: &'static str, path: &str, reply: Nfs3Result<T, E>) -> Result<T, StoreError> {
        match reply {
            Nfs3Result::Ok(ok) => Ok(ok),
            Nfs3Result::Err((status, _)) => Err(self.status_error(op, path, status)),
        }
    }

    fn bad_reply(&self, op: &'static str, path: &str, what: &str) -> StoreError {
        StoreError::Nfs {
            store: self.name.clone(),
            op,
            path: path.to_owned(),
            status: what.to_owned(),
        }
    }

    /// LOOKUP of one name in a directory: the handle and (if the server sent them) attributes.
    async fn lookup_in(
        &self,
        dir: &nfs_fh3,
        component: &str,
        path: &str,
    ) -> Result<(nfs_fh3, Option<fattr3>), StoreError> {
        let args = LOOKUP3args {
            what: diropargs3 {
                dir: dir.clone(),
                name: name(component),
            },
        };
        let reply = self
            .call("lookup", path, move |mut c| async move {
                let r = c.lookup(&args).await;
                (c, r)
            })
            .await?;
        let ok = self.check("lookup", path, reply)?;
        let attrs = match ok.obj_attributes {
            Nfs3Option::Some(a) => Some(a),
            Nfs3Option::None => None,
        };
        Ok((ok.object, attrs))
    }

    async fn getattr(&self, fh: &nfs_fh3, path: &str) -> Result<fattr3, StoreError> {
        let args = GETATTR3args { object: fh.clone() };
        let reply = self
            .call("getattr", path, move |mut c| async move {
                let r = c.getattr(&args).await;
                (c, r)
            })
            .await?;
        Ok(self.check("getattr", path, reply)?.obj_attributes)
    }

    /// The handle of a path ("" is the root) by LOOKUPs from the root, with its attributes.
    async fn resolve(&self, path: &str) -> Result<(nfs_fh3, fattr3), StoreError> {
        let mut fh = self.root.clone();
        let mut attrs = None;
        if !path.is_empty() {
            for component in path.split('/') {
                (fh, attrs) = self.lookup_in(&fh, component, path).await?;
            }
        }
        let attrs = match attrs {
            Some(a) => a,
            None => self.getattr(&fh, path).await?,
        };
        Ok((fh, attrs))
    }

    /// The handle of a directory.
    async fn resolve_dir(&self, path: &str) -> Result<nfs_fh3, StoreError> {
        let (fh, attrs) = self.resolve(path).await?;
        if attrs.type_ != ftype3::NF3DIR {
            return Err(self.status_error("lookup", path, nfsstat3::NFS3ERR_NOTDIR));
        }
        Ok(fh)
    }

    pub(super) async fn create_dir_all(&self, path: &str) -> Result<(), StoreError> {
        let mut fh = self.root.clone();
        if path.is_empty() {
            return Ok(());
        }
        for component in path.split('/') {
            fh = match self.lookup_in(&fh, component, path).await {
                Ok((child, attrs)) => {
                    let attrs = match attrs {
                        Some(a) => a,
                        None => self.getattr(&child, path).await?,
                    };
                    if attrs.type_ != ftype3::NF3DIR {
                        return Err(self.status_error("mkdir", path, nfsstat3::NFS3ERR_NOTDIR));
                    }
                    child
                }
                Err(StoreError::NotFound { .. }) => self.mkdir(&fh, component, path).await?,
                Err(e) => return Err(e),
            };
        }
        Ok(())
    }

    async fn mkdir(&self, dir: &nfs_fh3, component: &str, path: &str) -> Result<nfs_fh3, StoreError> {
        let args = MKDIR3args {
            where_: diropargs3 {
                dir: dir.clone(),
                name: name(component),
            },
            attributes: sattr3 {
                mode: Nfs3Option::Some(DIR_MODE),
                ..sattr3::default()
            },
        };
        let reply = self
            .call("mkdir", path, move |mut c| async move {
                let r = c.mkdir(&args).await;
                (c, r)
            })
            .await?;
        match self.check("mkdir", path, reply) {
            Ok(ok) => match ok.obj {
                Nfs3Option::Some(fh) => Ok(fh),
                Nfs3Option::None => Ok(self.lookup_in(dir, component, path).await?.0),
            },
            // Created by someone else meanwhile.
            Err(StoreError::AlreadyExists { .. }) => {
                let (fh, attrs) = self.lookup_in(dir, component, path).await?;
                match attrs {
                    Some(a) if a.type_ != ftype3::NF3DIR => {
                        Err(self.status_error("mkdir", path, nfsstat3::NFS3ERR_NOTDIR))
                    }
                    _ => Ok(fh),
                }
            }
            Err(e) => Err(e),
        }
    }

    pub(super) async fn create(&self, path: &str) -> Result<NfsFile, StoreError> {
        let (parent, file_name) = split_parent(path);
        let dir = self.resolve_dir(parent).await?;
        let args = CREATE3args {
            where_: diropargs3 {
                dir: dir.clone(),
                name: name(file_name),
            },
            // UNCHECKED with size 0: creates, or truncates an existing file.
            how: createhow3::UNCHECKED(sattr3 {
                mode: Nfs3Option::Some(FILE_MODE),
                size: Nfs3Option::Some(0),
                ..sattr3::default()
            }),
        };
        let reply = self
            .call("create", path, move |mut c| async move {
                let r = c.create(&args).await;
                (c, r)
            })
            .await?;
        let ok = self.check("create", path, reply)?;
        let fh = match ok.obj {
            Nfs3Option::Some(fh) => fh,
            Nfs3Option::None => self.lookup_in(&dir, file_name, path).await?.0,
        };
        Ok(NfsFile::new(fh))
    }

    pub(super) async fn open_file(&self, path: &str) -> Result<(NfsFile, u64), StoreError> {
        let (fh, attrs) = self.resolve(path).await?;
        if attrs.type_ == ftype3::NF3DIR {
            return Err(self.status_error("open", path, nfsstat3::NFS3ERR_ISDIR));
        }
        Ok((NfsFile::new(fh), attrs.size))
    }

    /// Writes one piece (≤ `wmax`), resending the rest after a short write.
    async fn write_piece(
        &self,
        file: &NfsFile,
        path: &str,
        mut offset: u64,
        mut data: Bytes,
    ) -> Result<(), StoreError> {
        while !data.is_empty() {
            let count = u32::try_from(data.len()).unwrap_or(u32::MAX);
            let (fh, payload) = (file.fh.clone(), data.clone());
            let reply = self
                .call("write", path, move |mut c| async move {
                    let args = WRITE3args {
                        file: fh,
                        offset,
                        count,
                        stable: stable_how::UNSTABLE,
                        data: Opaque::borrowed(&payload),
                    };
                    let r = c.write(&args).await;
                    (c, r)
                })
                .await?;
            let ok = self.check("write", path, reply)?;
            if ok.count == 0 {
                return Err(self.bad_reply("write", path, "the server wrote 0 bytes"));
            }
            if ok.committed == stable_how::UNSTABLE {
                file.verifier().note_unstable_write(ok.verf);
            }
            let written = ok.count.min(count) as usize;
            data = data.slice(written..);
            offset += written as u64;
        }
        Ok(())
    }

    pub(super) async fn write_at(
        &self,
        file: &NfsFile,
        path: &str,
        offset: u64,
        data: Bytes,
    ) -> Result<(), StoreError> {
        let writes = pieces(offset, data.len(), self.wmax)
            .map(|(at, start, end)| self.write_piece(file, path, at, data.slice(start..end)));
        try_join_all(writes).await?;
        Ok(())
    }

    pub(super) async fn flush(&self, file: &NfsFile, path: &str) -> Result<(), StoreError> {
        let args = COMMIT3args {
            file: file.fh.clone(),
            offset: 0,
            count: 0,
        };
        // INVARIANT: the token is taken before the COMMIT is sent, so it covers only the writes
        // answered before that.
        let token = file.verifier().begin_commit();
        let reply = self
            .call("commit", path, move |mut c| async move {
                let r = c.commit(&args).await;
                (c, r)
            })
            .await?;
        let ok = self.check("commit", path, reply)?;
        if file.verifier().committed(token, ok.verf) {
            let e = StoreError::ServerRestarted {
                store: self.name.clone(),
                path: path.to_owned(),
            };
            warn!(error = %e, "unstable writes may be lost");
            return Err(e);
        }
        Ok(())
    }

    /// Reads one piece (≤ `rmax`), continuing after short reads until `len` bytes or the end.
    async fn read_piece(
        &self,
        file: &NfsFile,
        path: &str,
        offset: u64,
        len: usize,
    ) -> Result<Vec<u8>, StoreError> {
        let mut out: Vec<u8> = Vec::new();
        while out.len() < len {
            let count = u32::try_from(len - out.len()).unwrap_or(u32::MAX);
            let args = READ3args {
                file: file.fh.clone(),
                offset: offset + out.len() as u64,
                count,
            };
            let reply = self
                .call("read", path, move |mut c| async move {
                    let r = c.read(&args).await;
                    (c, r)
                })
                .await?;
            let ok = self.check("read", path, reply)?;
            let data = ok.data.into_owned();
            if data.len() > count as usize {
                return Err(self.bad_reply("read", path, "the server sent more than asked"));
            }
            let done = ok.eof || data.is_empty();
            if out.is_empty() {
                out = data;
            } else {
                out.extend_from_slice(&data);
            }
            if done {
                break;
            }
        }
        Ok(out)
    }

    pub(super) async fn read_at(
        &self,
        file: &NfsFile,
        path: &str,
        offset: u64,
        len: usize,
    ) -> Result<Bytes, StoreError> {
        let reads = pieces(offset, len, self.rmax).map(|(at, start, end)| async move {
            let data = self.read_piece(file, path, at, end - start).await?;
            Ok::<_, StoreError>((data, end - start))
        });
        let mut parts = try_join_all(reads).await?.into_iter();
        let Some((first, wanted)) = parts.next() else {
            return Ok(Bytes::new());
        };
        if first.len() < wanted {
            return Ok(Bytes::from(first));
        }
        let mut out = first;
        for (part, wanted) in parts {
            let short = part.len() < wanted;
            out.extend_from_slice(&part);
            if short {
                break;
            }
        }
        Ok(Bytes::from(out))
    }

    pub(super) async fn metadata(&self, path: &str) -> Result<Option<Metadata>, StoreError> {
        match self.resolve(path).await {
            Ok((_, attrs)) => Ok(Some(metadata_of(&attrs))),
            Err(StoreError::NotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub(super) async fn list_dir(&self, path: &str) -> Result<Vec<DirEntry>, StoreError> {
        let dir = self.resolve_dir(path).await?;
        let mut entries = Vec::new();
        let (mut cookie, mut cookieverf) = (0, cookieverf3::default());
        loop {
            let args = READDIRPLUS3args {
                dir: dir.clone(),
                cookie,
                cookieverf,
                dircount: READDIR_DIRCOUNT,
                maxcount: READDIR_MAXCOUNT,
            };
            let reply = self
                .call("readdirplus", path, move |mut c| async move {
                    let r = c.readdirplus(&args).await;
                    (c, r)
                })
                .await?;
            let ok = self.check("readdirplus", path, reply)?;
            cookieverf = ok.cookieverf;
            let eof = ok.reply.eof;
            let batch = ok.reply.entries.into_inner();
            if batch.is_empty() && !eof {
                return Err(self.bad_reply("readdirplus", path, "an empty reply before the end"));
            }
            for entry in batch {
                cookie = entry.cookie;
                let Ok(entry_name) = String::from_utf8(entry.name.0.to_vec()) else {
                    warn!(store = %self.name, dir = %path, name = ?entry.name.0, "skipping a file name that is not UTF-8");
                    continue;
                };
                if entry_name == "." || entry_name == ".." {
                    continue;
                }
                let attrs = match entry.name_attributes {
                    Nfs3Option::Some(a) => a,
                    Nfs3Option::None => {
                        let full = if path.is_empty() {
                            entry_name.clone()
                        } else {
                            format!("{path}/{entry_name}")
                        };
                        match self.lookup_in(&dir, &entry_name, &full).await {
                            Ok((_, Some(a))) => a,
                            Ok((fh, None)) => self.getattr(&fh, &full).await?,
                            // Removed meanwhile.
                            Err(StoreError::NotFound { .. }) => continue,
                            Err(e) => return Err(e),
                        }
                    }
                };
                let meta = metadata_of(&attrs);
                entries.push(DirEntry {
                    name: entry_name,
                    is_dir: meta.is_dir,
                    size: meta.size,
                });
            }
            if eof {
                return Ok(entries);
            }
        }
    }

    pub(super) async fn rename(&self, from: &str, to: &str) -> Result<(), StoreError> {
        let (from_parent, from_name) = split_parent(from);
        let (to_parent, to_name) = split_parent(to);
        let from_dir = self.resolve_dir(from_parent).await?;
        let to_dir = if to_parent == from_parent {
            from_dir.clone()
        } else {
            self.resolve_dir(to_parent).await?
        };
        let args = RENAME3args {
            from: diropargs3 {
                dir: from_dir,
                name: name(from_name),
            },
            to: diropargs3 {
                dir: to_dir,
                name: name(to_name),
            },
        };
        let reply = self
            .call("rename", from, move |mut c| async move {
                let r = c.rename(&args).await;
                (c, r)
            })
            .await?;
        self.check("rename", from, reply)?;
        Ok(())
    }

    pub(super) async fn remove_file(&self, path: &str) -> Result<(), StoreError> {
        let (parent, file_name) = split_parent(path);
        let dir = self.resolve_dir(parent).await?;
        let args = REMOVE3args {
            object: diropargs3 {
                dir,
                name: name(file_name),
            },
        };
        let reply = self
            .call("remove", path, move |mut c| async move {
                let r = c.remove(&args).await;
                (c, r)
            })
            .await?;
        self.check("remove", path, reply)?;
        Ok(())
    }

    pub(super) async fn remove_dir(&self, path: &str) -> Result<(), StoreError> {
        let (parent, dir_name) = split_parent(path);
        let dir = self.resolve_dir(parent).await?;
        let args = RMDIR3args {
            object: diropargs3 {
                dir,
                name: name(dir_name),
            },
        };
        let reply = self
            .call("rmdir", path, move |mut c| async move {
                let r = c.rmdir(&args).await;
                (c, r)
            })
            .await?;
        self.check("rmdir", path, reply)?;
        Ok(())
    }

    pub(super) async fn capacity(&self) -> Result<Capacity, StoreError> {
        let args = FSSTAT3args {
            fsroot: self.root.clone(),
        };
        let reply = self
            .call("fsstat", "", move |mut c| async move {
                let r = c.fsstat(&args).await;
                (c, r)
            })
            .await?;
        let ok = self.check("fsstat", "", reply)?;
        Ok(Capacity {
            total: ok.tbytes,
            used: ok.tbytes.saturating_sub(ok.fbytes),
            available: ok.abytes,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_into_pieces() {
        let got: Vec<_> = pieces(100, 10, 4).collect();
        assert_eq!(got, [(100, 0, 4), (104, 4, 8), (108, 8, 10)]);
        assert_eq!(pieces(0, 0, 4).count(), 0);
        assert_eq!(pieces(0, 8, 4).count(), 2);
    }

    #[test]
    fn verifier_change_means_lost_writes() {
        let (a, b) = (writeverf3([1; 8]), writeverf3([2; 8]));
        let mut v = Verifier::default();
        // Same verifier throughout: fine.
        v.note_unstable_write(a);
        v.note_unstable_write(a);
        let t = v.begin_commit();
        assert!(!v.committed(t, a));
        // Restart between the writes and the commit.
        v.note_unstable_write(a);
        let t = v.begin_commit();
        assert!(v.committed(t, b));
        // Restart between two writes, commit verifier equals the newest.
        v.note_unstable_write(b);
        v.note_unstable_write(a);
        let t = v.begin_commit();
        assert!(v.committed(t, a));
        // A commit with nothing outstanding never fails, whatever the verifier.
        let t = v.begin_commit();
        assert!(!v.committed(t, b));
        // Restart right after a commit, before any write: nothing was lost.
        v.note_unstable_write(a);
        let t = v.begin_commit();
        assert!(!v.committed(t, a));
    }

    #[test]
    fn a_write_answered_after_the_commit_was_sent_is_not_covered_by_it() {
        let (a, b) = (writeverf3([1; 8]), writeverf3([2; 8]));
        let mut v = Verifier::default();
        v.note_unstable_write(a);
        let first = v.begin_commit();
        // Answered before the COMMIT's reply, but the server may have processed it after the COMMIT.
        v.note_unstable_write(a);
        assert!(!v.committed(first, a), "the write before the COMMIT was kept");
        // The server restarts; the next writes get a new verifier and so does the next COMMIT.
        v.note_unstable_write(b);
        let second = v.begin_commit();
        assert!(
            v.committed(second, b),
            "the write answered with the old verifier after the first COMMIT was sent may be lost"
        );
        // Settled: the next round starts clean.
        v.note_unstable_write(b);
        let third = v.begin_commit();
        assert!(!v.committed(third, b));
    }

    #[test]
    fn a_restart_between_checkpoints_is_always_detected() {
        // Every interleaving of writes (answered with the old verifier `a` or, after the restart,
        // `b`), a COMMIT sent at each position, answered with `a` or `b`: a write answered with a
        // verifier other than that of the COMMIT that covers it is reported, by that COMMIT or the next.
        let (a, b) = (writeverf3([1; 8]), writeverf3([2; 8]));
        for before in 0..4 {
            for after in 0..4 {
                for reply in [a, b] {
                    let mut v = Verifier::default();
                    for _ in 0..before {
                        v.note_unstable_write(a);
                    }
                    let first = v.begin_commit();
                    for _ in 0..after {
                        v.note_unstable_write(a);
                    }
                    let lost_first = v.committed(first, reply);
                    assert_eq!(lost_first, before > 0 && reply == b, "{before} {after} {reply:?}");
                    // Then the server is on `b`: a later COMMIT reports the writes with `a` that the
                    // first did not cover.
                    v.note_unstable_write(b);
                    let second = v.begin_commit();
                    assert_eq!(v.committed(second, b), after > 0, "{before} {after} {reply:?}");
                }
            }
        }
    }

    #[test]
    fn concurrent_commits_cover_what_each_saw() {
        let (a, b) = (writeverf3([1; 8]), writeverf3([2; 8]));
        let mut v = Verifier::default();
        v.note_unstable_write(a);
        let one = v.begin_commit();
        v.note_unstable_write(a);
        let two = v.begin_commit();
        // The second COMMIT's reply comes first and covers both writes.
        assert!(!v.committed(two, a));
        // The first one's reply then has nothing left to settle.
        assert!(!v.committed(one, b));
        assert!(v.outstanding.is_empty());
    }
}
