//! The staging store: one interface over a local directory (`file:///PATH`) and an NFSv3 export
//! (`nfs://HOST[:PORT]/EXPORT[?mountport=N]`, reached by the userspace client `nfs3_client`; no
//! kernel mount).
//!
//! Code map:
//! - [`url`]: [`StoreUrl`] parsing and display.
//! - `local`: the local directory backend (positional I/O in `spawn_blocking`).
//! - `nfs`: the NFSv3 backend (AUTH_UNIX, unprivileged source port, a pool of connections).
//!
//! Invariants:
//! - Paths are relative to the store root and `/`-separated; absolute paths, empty components, `.`
//!   and `..` are refused with [`StoreError::InvalidPath`] before anything touches the store.
//! - Every backend call runs under [`StoreOptions::op_timeout`]. A call that times out fails with
//!   [`StoreError::Timeout`]; it never blocks the caller longer, and never blocks the runtime.
//! - [`Store::health`] turns [`Health::Unhealthy`] on a store-level failure (timeout, connection or
//!   RPC failure, server I/O error, full or read-only store) and back to [`Health::Healthy`] on the
//!   next call the store answers. Answers such as "not found" are not failures of the store.
//! - A [`Store`] is cheap to clone and shared between tasks; a [`FileId`] may be written at
//!   different offsets from several tasks at once.

mod local;
mod nfs;
pub mod url;

use std::fmt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

pub use bytes::Bytes;
use serde::Serialize;
use tracing::{info, warn};
pub use url::{DEFAULT_NFS_PORT, StoreUrl};

/// Why a store operation failed. Messages name the store and the path where one is involved.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The store URL does not parse.
    #[error("invalid store url {url:?}: {reason}")]
    InvalidUrl {
        /// The URL as given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A path is not a relative, `/`-separated path without `.` or `..` components.
    #[error("invalid store path {path:?}: {reason}")]
    InvalidPath {
        /// The path as given.
        path: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The path (or one of its parent directories) does not exist.
    #[error("{store}: {path:?} not found")]
    NotFound {
        /// The store URL.
        store: String,
        /// The path in the store.
        path: String,
    },
    /// Something is in the way (e.g. a file where a directory should be created).
    #[error("{store}: {path:?} already exists")]
    AlreadyExists {
        /// The store URL.
        store: String,
        /// The path in the store.
        path: String,
    },
    /// A path component that must be a directory is not.
    #[error("{store}: {path:?} is not a directory")]
    NotADirectory {
        /// The store URL.
        store: String,
        /// The path in the store.
        path: String,
    },
    /// A file operation was asked of a directory.
    #[error("{store}: {path:?} is a directory")]
    IsADirectory {
        /// The store URL.
        store: String,
        /// The path in the store.
        path: String,
    },
    /// [`Store::read_file`]: the file is larger than the caller's limit.
    #[error("{store}: {path:?} has {size} bytes, more than the limit of {max}")]
    TooLarge {
        /// The store URL.
        store: String,
        /// The path in the store.
        path: String,
        /// The file's size.
        size: u64,
        /// The caller's limit.
        max: usize,
    },
    /// The store did not answer within [`StoreOptions::op_timeout`].
    #[error("{store}: {op} {path:?} timed out after {after:?}")]
    Timeout {
        /// The store URL.
        store: String,
        /// The operation (`write`, `lookup`, `wait for a free connection`, …).
        op: &'static str,
        /// The path in the store ("" for the store itself).
        path: String,
        /// The deadline that passed.
        after: Duration,
    },
    /// The store cannot be reached or mounted.
    #[error("{store}: cannot connect: {reason}")]
    Connect {
        /// The store URL.
        store: String,
        /// Why.
        reason: String,
    },
    /// An RPC failed below the NFS level (connection lost, authentication refused, garbled reply).
    #[error("{store}: {op} {path:?} failed: {reason}")]
    Rpc {
        /// The store URL.
        store: String,
        /// The NFS operation.
        op: &'static str,
        /// The path in the store.
        path: String,
        /// Why.
        reason: String,
    },
    /// The NFS server answered with an error status.
    #[error("{store}: {op} {path:?} failed: {status}")]
    Nfs {
        /// The store URL.
        store: String,
        /// The NFS operation.
        op: &'static str,
        /// The path in the store.
        path: String,
        /// The NFS status (`NFS3ERR_…`) or what was wrong with the answer.
        status: String,
    },
    /// [`Store::flush`]: the NFS server restarted since unstable writes were sent, so they may be lost.
    #[error("{store}: {path:?}: server restarted; data must be rewritten")]
    ServerRestarted {
        /// The store URL.
        store: String,
        /// The path in the store.
        path: String,
    },
    /// The file was removed or replaced (by a rename over it) since it was opened: NFS3ERR_STALE.
    #[error("{store}: {path:?} was removed or replaced while in use (stale file handle)")]
    Stale {
        /// The store URL.
        store: String,
        /// The path in the store.
        path: String,
    },
    /// The store is out of space (or over a quota or file size limit): the write did not happen.
    #[error("{store}: no space left on the store: {op} {path:?} failed: {reason}")]
    NoSpace {
        /// The store URL.
        store: String,
        /// The operation.
        op: &'static str,
        /// The path in the store.
        path: String,
        /// What the store said (ENOSPC, EDQUOT, EFBIG or the NFS status).
        reason: String,
    },
    /// A local file system call failed.
    #[error("{store}: {op} {path:?} failed: {source}")]
    Io {
        /// The store URL.
        store: String,
        /// The operation.
        op: &'static str,
        /// The path in the store.
        path: String,
        /// The system error.
        #[source]
        source: std::io::Error,
    },
    /// A [`FileId`] was used with a store it does not belong to.
    #[error("{store}: {path:?} was opened in another store")]
    ForeignFile {
        /// The store URL.
        store: String,
        /// The path the file id was opened with.
        path: String,
    },
}

impl StoreError {
    /// Whether this is [`StoreError::NotFound`].
    pub fn is_not_found(&self) -> bool {
        matches!(self, StoreError::NotFound { .. })
    }

    /// Whether this is [`StoreError::NoSpace`].
    pub fn is_no_space(&self) -> bool {
        matches!(self, StoreError::NoSpace { .. })
    }

    /// Whether this is [`StoreError::Timeout`].
    pub fn is_timeout(&self) -> bool {
        matches!(self, StoreError::Timeout { .. })
    }
}

/// How a store is used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreOptions {
    /// Deadline of every single call to the store (an NFS RPC, a local file system call).
    pub op_timeout: Duration,
    /// NFS: at most this many TCP connections, opened lazily; calls beyond wait for a free one.
    pub connections: usize,
    /// NFS: AUTH_UNIX user id (0 works with ganesha's `No_Root_Squash`).
    pub uid: u32,
    /// NFS: AUTH_UNIX group id.
    pub gid: u32,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            op_timeout: Duration::from_secs(30),
            connections: 4,
            uid: 0,
            gid: 0,
        }
    }
}

/// What [`Store::metadata`] tells about a path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Metadata {
    /// A directory (otherwise a file).
    pub is_dir: bool,
    /// Size in bytes.
    pub size: u64,
}

/// One entry of [`Store::list_dir`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DirEntry {
    /// File name, without the directory.
    pub name: String,
    /// A directory (otherwise a file).
    pub is_dir: bool,
    /// Size in bytes.
    pub size: u64,
}

/// Space of the file system behind a store, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Capacity {
    /// Size of the file system.
    pub total: u64,
    /// Space in use.
    pub used: u64,
    /// Space this client may still use.
    pub available: u64,
}

/// Whether the store answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum Health {
    /// The last call was answered.
    Healthy,
    /// Calls fail since `since` (Unix seconds in JSON); `error` is the latest failure.
    Unhealthy {
        /// The latest failure.
        error: String,
        /// When the store became unhealthy.
        #[serde(serialize_with = "unix_seconds")]
        since: SystemTime,
    },
}

impl Health {
    /// Whether this is [`Health::Healthy`].
    pub fn is_healthy(&self) -> bool {
        matches!(self, Health::Healthy)
    }
}

fn unix_seconds<S: serde::Serializer>(time: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(
        time.duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
    )
}

/// The health of one store, updated by its backend after every call.
#[derive(Debug)]
struct HealthCell {
    store: String,
    state: Mutex<Health>,
}

impl HealthCell {
    fn new(store: String) -> HealthCell {
        HealthCell {
            store,
            state: Mutex::new(Health::Healthy),
        }
    }

    fn get(&self) -> Health {
        self.state.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// The store answered a call.
    fn ok(&self) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if let Health::Unhealthy { since, .. } = &*state {
            let down = since.elapsed().unwrap_or_default();
            info!(store = %self.store, down_for = ?down, "store is healthy again");
            *state = Health::Healthy;
        }
    }

    /// A call failed in a way that says the store is not working.
    fn fail(&self, error: &dyn fmt::Display) {
        let message = error.to_string();
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        match &mut *state {
            Health::Healthy => {
                warn!(store = %self.store, error = %message, "store is unhealthy");
                *state = Health::Unhealthy {
                    error: message,
                    since: SystemTime::now(),
                };
            }
            Health::Unhealthy { error, .. } => *error = message,
        }
    }
}

/// Checks a store path; `""` (the root) is allowed only when `root_ok`.
fn check_path(path: &str, root_ok: bool) -> Result<(), StoreError> {
    let bad = |reason| {
        Err(StoreError::InvalidPath {
            path: path.to_owned(),
            reason,
        })
    };
    if path.is_empty() {
        return if root_ok {
            Ok(())
        } else {
            bad("the store root is not allowed here")
        };
    }
    if path.starts_with('/') {
        return bad("must be relative to the store root");
    }
    if path.contains('\0') {
        return bad("contains a nul byte");
    }
    for component in path.split('/') {
        match component {
            "" => return bad("has an empty component"),
            "." | ".." => return bad("has a '.' or '..' component"),
            _ => {}
        }
    }
    Ok(())
}

/// Splits a checked, non-root path into its parent ("" for the root) and its last component.
fn split_parent(path: &str) -> (&str, &str) {
    path.rsplit_once('/').unwrap_or(("", path))
}

/// A file opened by [`Store::create`] or [`Store::open_file`]: cheap to clone and share between tasks.
#[derive(Clone)]
pub struct FileId {
    /// [`Inner::id`] of the store that opened it.
    store: u64,
    path: Arc<str>,
    handle: Handle,
}

#[derive(Clone)]
enum Handle {
    Local(local::LocalFile),
    Nfs(nfs::NfsFile),
}

impl FileId {
    /// The path the file was opened with.
    pub fn path(&self) -> &str {
        &self.path
    }
}

impl fmt::Debug for FileId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FileId")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

/// A store; see the module documentation. Cheap to clone (an [`Arc`] inside).
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    /// Tells the stores of this process apart, so a [`FileId`] is used only with its own.
    id: u64,
    url: StoreUrl,
    name: String,
    health: Arc<HealthCell>,
    backend: Backend,
}

enum Backend {
    Local(local::LocalStore),
    Nfs(nfs::NfsStore),
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Store")
            .field("url", &self.inner.name)
            .finish_non_exhaustive()
    }
}

/// Numbers temporary names of [`Store::write_file_atomic`].
static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);
/// Numbers the stores opened by this process.
static STORE_COUNTER: AtomicU64 = AtomicU64::new(0);

impl Store {
    /// Opens a store. A local store's directory is created if missing; an NFS export is mounted
    /// (under the deadline) to check that it works, and its transfer sizes are read.
    pub async fn open(url: &StoreUrl, opts: StoreOptions) -> Result<Store, StoreError> {
        let name = url.to_string();
        let health = Arc::new(HealthCell::new(name.clone()));
        let backend = match url {
            StoreUrl::Local(root) => Backend::Local(
                local::LocalStore::open(name.clone(), root.clone(), &opts, health.clone()).await?,
            ),
            StoreUrl::Nfs {
                host,
                port,
                export,
                mount_port,
            } => {
                let target = nfs::Target {
                    host: host.clone(),
                    port: *port,
                    export: export.clone(),
                    mount_port: *mount_port,
                };
                Backend::Nfs(nfs::NfsStore::open(name.clone(), target, &opts, health.clone()).await?)
            }
        };
        Ok(Store {
            inner: Arc::new(Inner {
                id: STORE_COUNTER.fetch_add(1, Ordering::Relaxed),
                url: url.clone(),
                name,
                health,
                backend,
            }),
        })
    }

    /// The store's URL: the one it was opened with, or the one [`Store::known_as`] gave.
    pub fn url(&self) -> &StoreUrl {
        &self.inner.url
    }

    /// The same store under another URL, the one core knows it by, when this process reaches it
    /// at another address (NAT; a VM on QEMU's user network). The connection is unchanged; the
    /// URL names the store in reports, journals and commands. Only before the store is shared:
    /// a store already cloned keeps its URL.
    pub fn known_as(mut self, url: StoreUrl) -> Store {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.name = url.to_string();
            inner.url = url;
        }
        self
    }

    /// Whether the store answers; see [`Health`].
    pub fn health(&self) -> Health {
        self.inner.health.get()
    }

    /// Creates a directory and its missing parents; existing directories are fine.
    pub async fn create_dir_all(&self, path: &str) -> Result<(), StoreError> {
        check_path(path, true)?;
        match &self.inner.backend {
            Backend::Local(b) => b.create_dir_all(path).await,
            Backend::Nfs(b) => b.create_dir_all(path).await,
        }
    }

    /// Creates a file, or truncates an existing one to 0 bytes. The parent directory must exist.
    pub async fn create(&self, path: &str) -> Result<FileId, StoreError> {
        check_path(path, false)?;
        let handle = match &self.inner.backend {
            Backend::Local(b) => Handle::Local(b.create(path).await?),
            Backend::Nfs(b) => Handle::Nfs(b.create(path).await?),
        };
        Ok(FileId {
            store: self.inner.id,
            path: path.into(),
            handle,
        })
    }

    /// Opens an existing file for reading and writing, with its size (to resume a transfer).
    pub async fn open_file(&self, path: &str) -> Result<(FileId, u64), StoreError> {
        check_path(path, false)?;
        let (handle, size) = match &self.inner.backend {
            Backend::Local(b) => {
                let (f, size) = b.open_file(path).await?;
                (Handle::Local(f), size)
            }
            Backend::Nfs(b) => {
                let (f, size) = b.open_file(path).await?;
                (Handle::Nfs(f), size)
            }
        };
        Ok((
            FileId {
                store: self.inner.id,
                path: path.into(),
                handle,
            },
            size,
        ))
    }

    fn foreign(&self, file: &FileId) -> StoreError {
        StoreError::ForeignFile {
            store: self.inner.name.clone(),
            path: file.path.to_string(),
        }
    }

    /// The file's handle if this store opened it.
    fn handle<'f>(&self, file: &'f FileId) -> Result<&'f Handle, StoreError> {
        if file.store == self.inner.id {
            Ok(&file.handle)
        } else {
            Err(self.foreign(file))
        }
    }

    /// Writes `data` at `offset`. Several tasks may write one file at different offsets at once.
    /// NFS: split into WRITEs of at most 1 MiB spread over the connections, UNSTABLE until
    /// [`Store::flush`].
    pub async fn write_at(&self, file: &FileId, offset: u64, data: Bytes) -> Result<(), StoreError> {
        match (&self.inner.backend, self.handle(file)?) {
            (Backend::Local(b), Handle::Local(f)) => b.write_at(f, &file.path, offset, data).await,
            (Backend::Nfs(b), Handle::Nfs(f)) => b.write_at(f, &file.path, offset, data).await,
            // Not reached: a store opens handles of its own kind only.
            _ => Err(self.foreign(file)),
        }
    }

    /// Makes the written data durable: NFS COMMIT (an error if the server restarted since the
    /// writes: they must be written again), local `fsync`.
    pub async fn flush(&self, file: &FileId) -> Result<(), StoreError> {
        match (&self.inner.backend, self.handle(file)?) {
            (Backend::Local(b), Handle::Local(f)) => b.flush(f, &file.path).await,
            (Backend::Nfs(b), Handle::Nfs(f)) => b.flush(f, &file.path).await,
            // Not reached: a store opens handles of its own kind only.
            _ => Err(self.foreign(file)),
        }
    }

    /// Reads up to `len` bytes at `offset`; fewer only at the end of the file. NFS: READs of at
    /// most 1 MiB, in parallel over the connections.
    pub async fn read_at(&self, file: &FileId, offset: u64, len: usize) -> Result<Bytes, StoreError> {
        match (&self.inner.backend, self.handle(file)?) {
            (Backend::Local(b), Handle::Local(f)) => b.read_at(f, &file.path, offset, len).await,
            (Backend::Nfs(b), Handle::Nfs(f)) => b.read_at(f, &file.path, offset, len).await,
            // Not reached: a store opens handles of its own kind only.
            _ => Err(self.foreign(file)),
        }
    }

    /// What is at `path` ("" is the root), or `None` if nothing is.
    pub async fn metadata(&self, path: &str) -> Result<Option<Metadata>, StoreError> {
        check_path(path, true)?;
        match &self.inner.backend {
            Backend::Local(b) => b.metadata(path).await,
            Backend::Nfs(b) => b.metadata(path).await,
        }
    }

    /// The entries of a directory ("" is the root), sorted by name, without `.` and `..`.
    /// Names that are not UTF-8 are left out (with a warning): no path could name them.
    pub async fn list_dir(&self, path: &str) -> Result<Vec<DirEntry>, StoreError> {
        check_path(path, true)?;
        let mut entries = match &self.inner.backend {
            Backend::Local(b) => b.list_dir(path).await?,
            Backend::Nfs(b) => b.list_dir(path).await?,
        };
        entries.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(entries)
    }

    /// Renames a file or directory, atomically replacing an existing target file.
    pub async fn rename(&self, from: &str, to: &str) -> Result<(), StoreError> {
        check_path(from, false)?;
        check_path(to, false)?;
        match &self.inner.backend {
            Backend::Local(b) => b.rename(from, to).await,
            Backend::Nfs(b) => b.rename(from, to).await,
        }
    }

    /// Removes a file; [`StoreError::NotFound`] if there is none.
    pub async fn remove_file(&self, path: &str) -> Result<(), StoreError> {
        check_path(path, false)?;
        match &self.inner.backend {
            Backend::Local(b) => b.remove_file(path).await,
            Backend::Nfs(b) => b.remove_file(path).await,
        }
    }

    /// Removes an empty directory; [`StoreError::NotFound`] if there is none.
    pub async fn remove_dir(&self, path: &str) -> Result<(), StoreError> {
        check_path(path, false)?;
        match &self.inner.backend {
            Backend::Local(b) => b.remove_dir(path).await,
            Backend::Nfs(b) => b.remove_dir(path).await,
        }
    }

    /// Replaces a (small) file all at once: writes a temporary file in the same directory, makes it
    /// durable, then renames it over `path`. Readers see the old or the new content, never a part.
    pub async fn write_file_atomic(&self, path: &str, data: &[u8]) -> Result<(), StoreError> {
        check_path(path, false)?;
        let (parent, name) = split_parent(path);
        let n = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
        // Agents on other hosts write into the same store: a random part keeps the names apart.
        let mut salt = [0u8; 4];
        let _ = getrandom::fill(&mut salt);
        let temp_name = format!(".{name}.tmp-{}-{n}-{}", std::process::id(), hex::encode(salt));
        let temp = if parent.is_empty() {
            temp_name
        } else {
            format!("{parent}/{temp_name}")
        };
        let result = async {
            let file = self.create(&temp).await?;
            if !data.is_empty() {
                self.write_at(&file, 0, Bytes::copy_from_slice(data)).await?;
            }
            self.flush(&file).await?;
            drop(file);
            self.rename(&temp, path).await
        }
        .await;
        if result.is_err() {
            // Best effort: the temporary file is garbage now.
            let _ = self.remove_file(&temp).await;
            return result;
        }
        if let Backend::Local(b) = &self.inner.backend {
            b.sync_dir(parent).await?;
        }
        Ok(())
    }

    /// Reads a whole (small) file; [`StoreError::TooLarge`] if it has more than `max_len` bytes.
    /// A file replaced while it is read (a [`Store::write_file_atomic`] elsewhere: on NFS the old
    /// handle goes stale) is read again, up to three times.
    pub async fn read_file(&self, path: &str, max_len: usize) -> Result<Vec<u8>, StoreError> {
        let mut tries = 0;
        loop {
            match self.read_file_once(path, max_len).await {
                Err(StoreError::Stale { .. }) if tries < 3 => tries += 1,
                other => return other,
            }
        }
    }

    async fn read_file_once(&self, path: &str, max_len: usize) -> Result<Vec<u8>, StoreError> {
        let (file, size) = self.open_file(path).await?;
        let too_large = |size| StoreError::TooLarge {
            store: self.inner.name.clone(),
            path: path.to_owned(),
            size,
            max: max_len,
        };
        let len = match usize::try_from(size) {
            Ok(len) if len <= max_len => len,
            _ => return Err(too_large(size)),
        };
        // One byte more than the size tells whether the file grew past the limit meanwhile.
        let data = self.read_at(&file, 0, len.saturating_add(1)).await?;
        if data.len() > max_len {
            return Err(too_large(data.len() as u64));
        }
        Ok(data.to_vec())
    }

    /// Size, used and available space of the file system behind the store.
    pub async fn capacity(&self) -> Result<Capacity, StoreError> {
        match &self.inner.backend {
            Backend::Local(b) => b.capacity().await,
            Backend::Nfs(b) => b.capacity().await,
        }
    }
}

/// The local path of `path` under `root`.
fn local_path(root: &std::path::Path, path: &str) -> PathBuf {
    if path.is_empty() {
        root.to_path_buf()
    } else {
        root.join(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checks_paths() {
        for good in [
            "a",
            "a/b",
            "template/tmpl/2/201/x.qcow2",
            ".hidden",
            "a..b",
            "...",
            "a b",
        ] {
            assert!(check_path(good, false).is_ok(), "{good}");
        }
        assert!(check_path("", true).is_ok());
        let bad = [
            ("", "store root"),
            ("/a", "relative"),
            ("a/", "empty component"),
            ("a//b", "empty component"),
            ("./a", "'.'"),
            ("a/./b", "'.'"),
            ("..", "'..'"),
            ("a/../../etc", "'..'"),
            ("a\0b", "nul"),
        ];
        for (path, reason) in bad {
            match check_path(path, false) {
                Err(StoreError::InvalidPath { path: p, reason: r }) => {
                    assert_eq!(p, path);
                    assert!(r.contains(reason), "{path:?}: {r}");
                }
                other => panic!("{path:?}: {other:?}"),
            }
        }
        assert_eq!(split_parent("a/b/c"), ("a/b", "c"));
        assert_eq!(split_parent("c"), ("", "c"));
    }

    #[test]
    fn health_serializes_for_json() {
        assert_eq!(
            serde_json::to_string(&Health::Healthy).unwrap(),
            r#"{"state":"healthy"}"#
        );
        let h = Health::Unhealthy {
            error: "boom".into(),
            since: SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000),
        };
        assert_eq!(
            serde_json::to_string(&h).unwrap(),
            r#"{"state":"unhealthy","error":"boom","since":1700000000}"#
        );
    }

    #[test]
    fn health_cell_keeps_the_first_failure_time() {
        let cell = HealthCell::new("file:///x".into());
        assert!(cell.get().is_healthy());
        cell.fail(&"first");
        let Health::Unhealthy { since, .. } = cell.get() else {
            panic!("not unhealthy")
        };
        std::thread::sleep(Duration::from_millis(5));
        cell.fail(&"second");
        assert_eq!(
            cell.get(),
            Health::Unhealthy {
                error: "second".into(),
                since
            }
        );
        cell.ok();
        assert!(cell.get().is_healthy());
    }

    #[test]
    fn default_options() {
        let o = StoreOptions::default();
        assert_eq!(
            (o.op_timeout, o.connections, o.uid, o.gid),
            (Duration::from_secs(30), 4, 0, 0)
        );
    }

    fn assert_send_sync<T: Send + Sync + Clone>() {}

    #[test]
    fn store_and_file_ids_are_shareable() {
        assert_send_sync::<Store>();
        assert_send_sync::<FileId>();
    }

    async fn local_store(dir: &tempfile::TempDir) -> Store {
        let url: StoreUrl = format!("file://{}/store", dir.path().display()).parse().unwrap();
        Store::open(&url, StoreOptions::default()).await.unwrap()
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn local_store_concurrent_writes_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let store = local_store(&dir).await;
        assert!(dir.path().join("store").is_dir(), "open creates the root");
        store.create_dir_all("a/b/c").await.unwrap();
        store.create_dir_all("a/b").await.unwrap();
        let file = store.create("a/b/c/data.bin").await.unwrap();
        assert_eq!(file.path(), "a/b/c/data.bin");
        let chunk = 256 * 1024;
        let mut tasks = tokio::task::JoinSet::new();
        // Out of order, from several tasks at once.
        for i in (0..16u8).rev() {
            let (store, file) = (store.clone(), file.clone());
            tasks.spawn(async move {
                let data = Bytes::from(pattern(chunk, i));
                store.write_at(&file, u64::from(i) * chunk as u64, data).await
            });
        }
        while let Some(r) = tasks.join_next().await {
            r.unwrap().unwrap();
        }
        store.flush(&file).await.unwrap();
        let all = store.read_at(&file, 0, 16 * chunk).await.unwrap();
        let want: Vec<u8> = (0..16u8).flat_map(|i| pattern(chunk, i)).collect();
        assert!(all == want, "content differs");
        let on_disk = std::fs::read(dir.path().join("store/a/b/c/data.bin")).unwrap();
        assert!(on_disk == want, "content on disk differs");
        // Short read at the end of the file, empty past it.
        let tail = store.read_at(&file, 16 * chunk as u64 - 10, 100).await.unwrap();
        assert_eq!(&tail[..], &want[want.len() - 10..]);
        assert!(store.read_at(&file, 1 << 40, 100).await.unwrap().is_empty());
        // Reopen for resume.
        let (again, size) = store.open_file("a/b/c/data.bin").await.unwrap();
        assert_eq!(size, 16 * chunk as u64);
        store
            .write_at(&again, size, Bytes::from_static(b"tail"))
            .await
            .unwrap();
        store.flush(&again).await.unwrap();
        assert_eq!(
            store.metadata("a/b/c/data.bin").await.unwrap(),
            Some(Metadata {
                is_dir: false,
                size: size + 4
            })
        );
        // Create truncates.
        let truncated = store.create("a/b/c/data.bin").await.unwrap();
        store.flush(&truncated).await.unwrap();
        assert_eq!(
            store.metadata("a/b/c/data.bin").await.unwrap().map(|m| m.size),
            Some(0)
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn local_store_names_and_errors() {
        let dir = tempfile::tempdir().unwrap();
        let store = local_store(&dir).await;
        store.create_dir_all("d/sub").await.unwrap();
        store.write_file_atomic("d/one.txt", b"one").await.unwrap();
        store.write_file_atomic("d/two.txt", b"").await.unwrap();
        store.write_file_atomic("top.txt", b"top").await.unwrap();
        assert_eq!(store.read_file("d/one.txt", 3).await.unwrap(), b"one");
        assert_eq!(store.read_file("d/two.txt", 0).await.unwrap(), b"");
        assert_eq!(store.read_file("top.txt", 100).await.unwrap(), b"top");
        match store.read_file("d/one.txt", 2).await {
            Err(StoreError::TooLarge { size: 3, max: 2, .. }) => {}
            other => panic!("{other:?}"),
        }
        let listed = store.list_dir("d").await.unwrap();
        assert_eq!(
            listed,
            vec![
                DirEntry {
                    name: "one.txt".into(),
                    is_dir: false,
                    size: 3
                },
                DirEntry {
                    name: "sub".into(),
                    is_dir: true,
                    size: listed[1].size
                },
                DirEntry {
                    name: "two.txt".into(),
                    is_dir: false,
                    size: 0
                },
            ],
            "no temporary files left behind"
        );
        let root: Vec<String> = store
            .list_dir("")
            .await
            .unwrap()
            .into_iter()
            .map(|e| e.name)
            .collect();
        assert_eq!(root, ["d", "top.txt"]);
        // Replace atomically: the target exists.
        store.write_file_atomic("d/one.txt", b"uno").await.unwrap();
        store.rename("d/one.txt", "d/two.txt").await.unwrap();
        assert_eq!(store.read_file("d/two.txt", 10).await.unwrap(), b"uno");
        assert_eq!(store.metadata("d/one.txt").await.unwrap(), None);
        assert!(store.metadata("d/sub").await.unwrap().is_some_and(|m| m.is_dir));
        assert!(store.metadata("").await.unwrap().is_some_and(|m| m.is_dir));
        store.remove_file("d/two.txt").await.unwrap();
        store.remove_dir("d/sub").await.unwrap();

        let not_found = [
            store.remove_file("d/two.txt").await.unwrap_err(),
            store.open_file("nope").await.unwrap_err(),
            store.read_file("d/nope", 10).await.unwrap_err(),
            store.create("nope/x").await.unwrap_err(),
            store.rename("nope", "x").await.unwrap_err(),
            store.list_dir("nope").await.unwrap_err(),
        ];
        for e in not_found {
            assert!(e.is_not_found(), "{e}");
            assert!(e.to_string().contains("not found"), "{e}");
            assert!(e.to_string().starts_with("file:///"), "{e}");
        }
        assert!(matches!(
            store.metadata("top.txt/x").await,
            Err(StoreError::NotADirectory { .. })
        ));
        assert!(matches!(
            store.open_file("d").await,
            Err(StoreError::IsADirectory { .. })
        ));
        assert!(matches!(
            store.create("../x").await,
            Err(StoreError::InvalidPath { .. })
        ));
        assert!(matches!(
            store.metadata("/etc").await,
            Err(StoreError::InvalidPath { .. })
        ));
        assert!(
            store.health().is_healthy(),
            "answers like not-found are no failures"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn local_store_capacity_and_foreign_files() {
        let dir = tempfile::tempdir().unwrap();
        let store = local_store(&dir).await;
        let cap = store.capacity().await.unwrap();
        assert!(
            cap.total > 0 && cap.available <= cap.total && cap.used <= cap.total,
            "{cap:?}"
        );
        let other_dir = tempfile::tempdir().unwrap();
        let other = local_store(&other_dir).await;
        let file = other.create("x").await.unwrap();
        let err = store
            .write_at(&file, 0, Bytes::from_static(b"x"))
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::ForeignFile { .. }), "{err:?}");
        assert!(
            err.to_string().ends_with("\"x\" was opened in another store"),
            "{err}"
        );
        other.write_at(&file, 0, Bytes::from_static(b"x")).await.unwrap();
        assert_eq!(store.url(), &StoreUrl::Local(dir.path().join("store")));
        // A file where the root should be.
        std::fs::write(dir.path().join("file"), b"").unwrap();
        let url: StoreUrl = format!("file://{}/file", dir.path().display()).parse().unwrap();
        let err = Store::open(&url, StoreOptions::default()).await.unwrap_err();
        assert!(err.to_string().contains("file"), "{err}");
    }
}
