//! The local directory backend of the store (`file:///PATH`).
//!
//! Invariants:
//! - Every file system call runs in `spawn_blocking` under the store's deadline, so a hung file
//!   system fails calls with a timeout instead of stalling the runtime (the stuck thread is left
//!   to finish on its own).
//! - Files are written and read with positional I/O (`pread`/`pwrite`) on one shared open file,
//!   so concurrent writers at different offsets need no lock.
//! - Paths given here are already checked by the store: relative, without `.` and `..`.

use std::fs::{File, OpenOptions};
use std::io::{self, ErrorKind};
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tracing::warn;

use super::{Capacity, DirEntry, HealthCell, Metadata, StoreError, StoreOptions, local_path};

/// An open local file.
#[derive(Clone)]
pub(super) struct LocalFile(Arc<File>);

/// A store in a local directory.
pub(super) struct LocalStore {
    name: String,
    root: PathBuf,
    timeout: Duration,
    health: Arc<HealthCell>,
}

/// Whether a local error says the store itself is not working (as opposed to an answer about a path).
fn is_store_failure(e: &io::Error) -> bool {
    const EIO: i32 = 5;
    matches!(
        e.kind(),
        ErrorKind::StorageFull
            | ErrorKind::ReadOnlyFilesystem
            | ErrorKind::QuotaExceeded
            | ErrorKind::StaleNetworkFileHandle
    ) || e.raw_os_error() == Some(EIO)
}

impl LocalStore {
    pub(super) async fn open(
        name: String,
        root: PathBuf,
        opts: &StoreOptions,
        health: Arc<HealthCell>,
    ) -> Result<LocalStore, StoreError> {
        let store = LocalStore {
            name,
            root,
            timeout: opts.op_timeout,
            health,
        };
        let root = store.root.clone();
        store
            .blocking("open store", "", move || {
                std::fs::create_dir_all(&root)?;
                if !std::fs::metadata(&root)?.is_dir() {
                    return Err(io::Error::from(ErrorKind::NotADirectory));
                }
                Ok(())
            })
            .await?;
        Ok(store)
    }

    fn path(&self, path: &str) -> PathBuf {
        local_path(&self.root, path)
    }

    fn map_error(&self, op: &'static str, path: &str, e: io::Error) -> StoreError {
        let (store, path) = (self.name.clone(), path.to_owned());
        match e.kind() {
            ErrorKind::NotFound => StoreError::NotFound { store, path },
            ErrorKind::AlreadyExists => StoreError::AlreadyExists { store, path },
            ErrorKind::NotADirectory => StoreError::NotADirectory { store, path },
            ErrorKind::IsADirectory => StoreError::IsADirectory { store, path },
            ErrorKind::StorageFull | ErrorKind::QuotaExceeded | ErrorKind::FileTooLarge => {
                StoreError::NoSpace {
                    store,
                    op,
                    path,
                    reason: e.to_string(),
                }
            }
            _ => StoreError::Io {
                store,
                op,
                path,
                source: e,
            },
        }
    }

    /// Runs `f` on a blocking thread under the deadline, maps its error and updates health.
    async fn blocking<T, F>(&self, op: &'static str, path: &str, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce() -> io::Result<T> + Send + 'static,
    {
        let task = tokio::task::spawn_blocking(f);
        match tokio::time::timeout(self.timeout, task).await {
            Err(_elapsed) => {
                let e = StoreError::Timeout {
                    store: self.name.clone(),
                    op,
                    path: path.to_owned(),
                    after: self.timeout,
                };
                self.health.fail(&e);
                Err(e)
            }
            Ok(Err(join)) => Err(self.map_error(op, path, io::Error::other(join.to_string()))),
            Ok(Ok(Ok(value))) => {
                self.health.ok();
                Ok(value)
            }
            Ok(Ok(Err(e))) => {
                if is_store_failure(&e) {
                    self.health.fail(&e);
                } else {
                    self.health.ok();
                }
                Err(self.map_error(op, path, e))
            }
        }
    }

    pub(super) async fn create_dir_all(&self, path: &str) -> Result<(), StoreError> {
        let p = self.path(path);
        self.blocking("create directory", path, move || {
            std::fs::create_dir_all(&p)?;
            // create_dir_all succeeds on an existing file only on some systems; be explicit.
            if std::fs::metadata(&p)?.is_dir() {
                Ok(())
            } else {
                Err(io::Error::from(ErrorKind::AlreadyExists))
            }
        })
        .await
    }

    pub(super) async fn create(&self, path: &str) -> Result<LocalFile, StoreError> {
        let p = self.path(path);
        self.blocking("create", path, move || {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(p)?;
            Ok(LocalFile(Arc::new(file)))
        })
        .await
    }

    pub(super) async fn open_file(&self, path: &str) -> Result<(LocalFile, u64), StoreError> {
        let p = self.path(path);
        self.blocking("open", path, move || {
            let file = match OpenOptions::new().read(true).write(true).open(&p) {
                Err(e) if e.kind() == ErrorKind::PermissionDenied => File::open(&p)?,
                other => other?,
            };
            let meta = file.metadata()?;
            if meta.is_dir() {
                return Err(io::Error::from(ErrorKind::IsADirectory));
            }
            Ok((LocalFile(Arc::new(file)), meta.len()))
        })
        .await
    }

    pub(super) async fn write_at(
        &self,
        file: &LocalFile,
        path: &str,
        offset: u64,
        data: Bytes,
    ) -> Result<(), StoreError> {
        let file = file.0.clone();
        self.blocking("write", path, move || file.write_all_at(&data, offset))
            .await
    }

    pub(super) async fn flush(&self, file: &LocalFile, path: &str) -> Result<(), StoreError> {
        let file = file.0.clone();
        self.blocking("fsync", path, move || file.sync_all()).await
    }

    pub(super) async fn read_at(
        &self,
        file: &LocalFile,
        path: &str,
        offset: u64,
        len: usize,
    ) -> Result<Bytes, StoreError> {
        let file = file.0.clone();
        self.blocking("read", path, move || {
            // Never allocate past the end of the file.
            let left = file.metadata()?.len().saturating_sub(offset);
            let len = len.min(usize::try_from(left).unwrap_or(usize::MAX));
            let mut buf = vec![0u8; len];
            let mut filled = 0;
            while filled < len {
                let n = file.read_at(&mut buf[filled..], offset + filled as u64)?;
                if n == 0 {
                    break;
                }
                filled += n;
            }
            buf.truncate(filled);
            Ok(Bytes::from(buf))
        })
        .await
    }

    pub(super) async fn metadata(&self, path: &str) -> Result<Option<super::Metadata>, StoreError> {
        let p = self.path(path);
        self.blocking("stat", path, move || match std::fs::metadata(p) {
            Ok(m) => Ok(Some(Metadata {
                is_dir: m.is_dir(),
                size: m.len(),
            })),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        })
        .await
    }

    pub(super) async fn list_dir(&self, path: &str) -> Result<Vec<DirEntry>, StoreError> {
        let p = self.path(path);
        let shown = path.to_owned();
        self.blocking("list", path, move || {
            let mut entries = Vec::new();
            for entry in std::fs::read_dir(&p)? {
                let entry = entry?;
                let name = match entry.file_name().into_string() {
                    Ok(name) => name,
                    Err(raw) => {
                        warn!(dir = %shown, name = ?raw, "skipping a file name that is not UTF-8");
                        continue;
                    }
                };
                // Follows symbolic links; a dangling one (or a file removed meanwhile) is skipped.
                let Ok(meta) = std::fs::metadata(entry.path()) else {
                    continue;
                };
                entries.push(DirEntry {
                    name,
                    is_dir: meta.is_dir(),
                    size: meta.len(),
                });
            }
            Ok(entries)
        })
        .await
    }

    pub(super) async fn rename(&self, from: &str, to: &str) -> Result<(), StoreError> {
        let (f, t) = (self.path(from), self.path(to));
        self.blocking("rename", from, move || std::fs::rename(f, t)).await
    }

    pub(super) async fn remove_file(&self, path: &str) -> Result<(), StoreError> {
        let p = self.path(path);
        self.blocking("remove", path, move || std::fs::remove_file(p))
            .await
    }

    pub(super) async fn remove_dir(&self, path: &str) -> Result<(), StoreError> {
        let p = self.path(path);
        self.blocking("remove directory", path, move || std::fs::remove_dir(p))
            .await
    }

    /// Makes a directory's entries durable (after a rename into it).
    pub(super) async fn sync_dir(&self, path: &str) -> Result<(), StoreError> {
        let p = self.path(path);
        self.blocking("fsync directory", path, move || File::open(p)?.sync_all())
            .await
    }

    pub(super) async fn capacity(&self) -> Result<Capacity, StoreError> {
        let root = self.root.clone();
        self.blocking("statvfs", "", move || capacity_of(&root)).await
    }
}

fn capacity_of(root: &Path) -> io::Result<Capacity> {
    let st = rustix::fs::statvfs(root).map_err(io::Error::from)?;
    let unit = if st.f_frsize > 0 { st.f_frsize } else { st.f_bsize };
    let total = st.f_blocks.saturating_mul(unit);
    let free = st.f_bfree.saturating_mul(unit);
    Ok(Capacity {
        total,
        used: total.saturating_sub(free),
        available: st.f_bavail.saturating_mul(unit),
    })
}
