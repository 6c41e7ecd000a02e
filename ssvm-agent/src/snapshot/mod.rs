//! Snapshot backups: a disk exported over NBD (libvirt's pull-mode backup, or `qemu-nbd`) copied
//! into the store as a qcow2 image holding only what the backup needs: for a full backup the
//! allocated extents (`base:allocation`), for an incremental one the extents dirty since the
//! previous checkpoint (`qemu:dirty-bitmap:…`) over the previous snapshot as its backing file.
//!
//! Invariants:
//! * only the needed extents are read (rounded out to 64 KiB clusters); [`Backup::bytes_read`]
//!   counts what came from the export;
//! * the image is written front to back ([`qcow2::Layout`]) into `<name>.part`, hashed as it is
//!   written, flushed, and renamed to its name only when complete; a failure removes the part
//!   file, so nothing that looks like a snapshot is left half written;
//! * an incremental image names its predecessor by file name only: the chain lives in one
//!   directory (`snapshots/<account>/<volume>/`), and a restore reads the chain from there.

pub mod qcow2;

use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use sha2::Digest as _;

use crate::nbd::NbdClient;
use crate::store::Store;

/// What to copy from the export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Extents {
    /// Every allocated extent (`base:allocation`).
    Allocated,
    /// The extents dirty in this metadata context (`qemu:dirty-bitmap:NAME`), over `backing`
    /// (the previous snapshot's file name, in the same directory).
    Dirty {
        /// The dirty-bitmap context.
        context: String,
        /// The previous snapshot's file name.
        backing: String,
    },
}

/// Where the disk is and where its backup goes.
#[derive(Debug, Clone)]
pub struct BackupSpec {
    /// The NBD server, `host:port`.
    pub nbd: String,
    /// The export name (libvirt: the disk's target, e.g. `vda`).
    pub export: String,
    /// Full or incremental.
    pub extents: Extents,
    /// Directory in the store (`snapshots/<account>/<volume>`).
    pub dir: String,
    /// The image's file name (`<snapshot>.qcow2`).
    pub name: String,
}

/// A finished backup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backup {
    /// The image's path in the store.
    pub file: String,
    /// The disk's virtual size.
    pub virtual_size: u64,
    /// The image's size.
    pub physical_size: u64,
    /// Bytes read from the export.
    pub bytes_read: u64,
    /// SHA-256 of the image (hex).
    pub sha256: String,
}

/// Deadline of each NBD read.
const NBD_TIMEOUT: Duration = Duration::from_secs(60);

/// Copies the export into the store as described by `spec`.
pub async fn backup(store: &Store, spec: &BackupSpec) -> anyhow::Result<Backup> {
    let context = match &spec.extents {
        Extents::Allocated => "base:allocation".to_owned(),
        Extents::Dirty { context, backing } => {
            // An incremental without its predecessor would restore nothing.
            let prev = format!("{}/{backing}", spec.dir.trim_end_matches('/'));
            anyhow::ensure!(
                store.metadata(&prev).await?.is_some(),
                "the previous snapshot's image {prev} is not in the store"
            );
            context.clone()
        }
    };
    let mut nbd = NbdClient::connect(&spec.nbd, &spec.export, &[&context], NBD_TIMEOUT)
        .await
        .with_context(|| format!("failed to open export {} on {}", spec.export, spec.nbd))?;
    let size = nbd.export().size;
    let extents = nbd.extents(&context, 0, size).await?;
    let wanted: Vec<(u64, u64)> = extents
        .iter()
        .filter(|(_, _, flags)| match spec.extents {
            Extents::Allocated => {
                flags & systemvm_nbd::STATE_HOLE == 0 && flags & systemvm_nbd::STATE_ZERO == 0
            }
            Extents::Dirty { .. } => flags & systemvm_nbd::STATE_DIRTY != 0,
        })
        .map(|(o, l, _)| (*o, *l))
        .collect();
    let backing = match &spec.extents {
        Extents::Allocated => None,
        Extents::Dirty { backing, .. } => Some(backing.as_str()),
    };
    let layout = qcow2::Layout::new(size, qcow2::clusters_of(&wanted), backing)?;
    store.create_dir_all(&spec.dir).await?;
    let file = format!("{}/{}", spec.dir.trim_end_matches('/'), spec.name);
    let part = format!("{file}.part");
    let result = write(store, &mut nbd, &layout, &part, size).await;
    nbd.disconnect().await;
    let (bytes_read, sha256) = match result {
        Ok(r) => r,
        Err(e) => {
            let _ = store.remove_file(&part).await;
            return Err(e);
        }
    };
    store.rename(&part, &file).await?;
    Ok(Backup {
        file,
        virtual_size: size,
        physical_size: layout.file_size(),
        bytes_read,
        sha256,
    })
}

/// NBD reads in flight at once.
const READ_DEPTH: usize = 8;
/// Store writes in flight at once.
const WRITE_DEPTH: usize = 4;
/// Size of each read and write.
const BLOCK: u64 = 4 << 20;

/// Writes the image into `part`: metadata, then each run of clusters read from the export,
/// reads pipelined on the connection, hashing in file order, writes several at a time.
async fn write(
    store: &Store,
    nbd: &mut NbdClient,
    layout: &qcow2::Layout,
    part: &str,
    size: u64,
) -> anyhow::Result<(u64, String)> {
    let f = store.create(part).await?;
    let max = u64::from(nbd.export().max_read()).min(BLOCK) / qcow2::CLUSTER * qcow2::CLUSTER;
    // (guest offset, length) to read and the host offset each goes to, in file order.
    let mut ranges: Vec<(u64, u32)> = Vec::new();
    let mut hosts: Vec<u64> = Vec::new();
    for (first, count, host) in layout.runs() {
        let start = first * qcow2::CLUSTER;
        let end = (start + count * qcow2::CLUSTER).min(size);
        let mut at = start;
        while at < end {
            let len = (end - at).min(max);
            ranges.push((at, u32::try_from(len).unwrap_or(u32::MAX)));
            hosts.push(host + (at - start));
            at += len;
        }
    }
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Bytes>(READ_DEPTH);
    let writer = {
        let store = store.clone();
        let f = f.clone();
        let meta = Bytes::from(layout.metadata());
        async move {
            let mut sha = sha2::Sha256::new();
            sha.update(&meta);
            store.write_at(&f, 0, meta).await?;
            let mut writes = tokio::task::JoinSet::new();
            for host in hosts {
                let Some(data) = rx.recv().await else {
                    anyhow::bail!("the export's data ended early");
                };
                // The last cluster of a disk whose size is not a cluster multiple is padded.
                let padded = (data.len() as u64).div_ceil(qcow2::CLUSTER) * qcow2::CLUSTER;
                let block = if padded == data.len() as u64 {
                    data
                } else {
                    let mut b = data.to_vec();
                    b.resize(usize::try_from(padded).unwrap_or(0), 0);
                    Bytes::from(b)
                };
                while writes.len() >= WRITE_DEPTH {
                    if let Some(r) = writes.join_next().await {
                        r??;
                    }
                }
                // The write goes first; the hash runs while it is in flight.
                let (store, f, bytes) = (store.clone(), f.clone(), block.clone());
                writes.spawn(async move { store.write_at(&f, host, bytes).await });
                sha.update(&block);
            }
            while let Some(r) = writes.join_next().await {
                r??;
            }
            store.flush(&f).await?;
            Ok::<_, anyhow::Error>(hex::encode(sha.finalize()))
        }
    };
    let (read, sha) = tokio::join!(
        async {
            let r = nbd.read_ranges(&ranges, READ_DEPTH, &tx).await;
            drop(tx);
            r
        },
        writer
    );
    Ok((read?, sha?))
}
