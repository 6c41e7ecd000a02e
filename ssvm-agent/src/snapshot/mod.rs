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
        Extents::Dirty { context, .. } => context.clone(),
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

/// Writes the image into `part`: metadata, then each run of clusters read from the export.
async fn write(
    store: &Store,
    nbd: &mut NbdClient,
    layout: &qcow2::Layout,
    part: &str,
    size: u64,
) -> anyhow::Result<(u64, String)> {
    let f = store.create(part).await?;
    let mut sha = sha2::Sha256::new();
    let meta = Bytes::from(layout.metadata());
    sha.update(&meta);
    store.write_at(&f, 0, meta).await?;
    let max = u64::from(nbd.export().max_read()).min(8 << 20) / qcow2::CLUSTER * qcow2::CLUSTER;
    let mut read = 0u64;
    for (first, count, host) in layout.runs() {
        let start = first * qcow2::CLUSTER;
        let end = (start + count * qcow2::CLUSTER).min(size);
        let mut at = start;
        while at < end {
            let len = (end - at).min(max);
            let data = nbd.read(at, u32::try_from(len).unwrap_or(u32::MAX)).await?;
            read += data.len() as u64;
            let mut block = data.to_vec();
            // The last cluster of a disk whose size is not a cluster multiple is padded.
            block.resize(
                usize::try_from(len.div_ceil(qcow2::CLUSTER) * qcow2::CLUSTER).unwrap_or(0),
                0,
            );
            sha.update(&block);
            store
                .write_at(&f, host + (at - start), Bytes::from(block))
                .await?;
            at += len;
        }
    }
    store.flush(&f).await?;
    Ok((read, hex::encode(sha.finalize())))
}
