//! Snapshot backups and restores: a disk copied into a store as an image holding only what is
//! needed. The disk comes from an NBD export (libvirt's pull-mode backup, or `qemu-nbd`) or from
//! an image file on a store (a volume on primary storage no running guest has attached, or a
//! snapshot chain being restored, read through [`chain`]). A backup is a qcow2 image of, for a
//! full backup, the allocated extents (`base:allocation`; of an image file its data clusters),
//! for an incremental one the extents dirty since the previous checkpoint
//! (`qemu:dirty-bitmap:…`) over the previous snapshot as its backing file. A restore writes the
//! whole chain flattened, as a self-contained qcow2 or a raw file.
//!
//! Invariants:
//! * only the needed extents are read (rounded out to 64 KiB clusters); [`Backup::bytes_read`]
//!   counts what came from the source;
//! * the image is written front to back ([`qcow2::Layout`]; a raw file at its guest offsets) into
//!   `<name>.part`, hashed as it is written, flushed, and renamed to its name only when complete;
//!   a failure removes the part file, so nothing that looks complete is left half written (a
//!   restore over an existing volume replaces it only at that rename);
//! * an incremental image names its predecessor by file name only: the chain lives in one
//!   directory (`snapshots/<account>/<volume>/`), and a restore reads the chain from there.

pub mod chain;
pub mod qcow2;

use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use sha2::Digest as _;

use crate::nbd::NbdClient;
use crate::store::Store;

pub use chain::{Chain, Format};

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

/// A finished backup or restore.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backup {
    /// The image's path in the store.
    pub file: String,
    /// The disk's virtual size.
    pub virtual_size: u64,
    /// The image's size.
    pub physical_size: u64,
    /// Bytes read from the source.
    pub bytes_read: u64,
    /// SHA-256 of the image (hex).
    pub sha256: String,
}

impl From<Backup> for systemvm_proto::agent::SnapshotBackedUp {
    fn from(b: Backup) -> Self {
        Self {
            file: b.file,
            virtual_size: b.virtual_size,
            physical_size: b.physical_size,
            bytes_read: b.bytes_read,
            sha256: b.sha256,
        }
    }
}

/// Deadline of each NBD read.
const NBD_TIMEOUT: Duration = Duration::from_secs(60);

/// Where the bytes come from.
enum Source<'a> {
    Nbd(&'a mut NbdClient),
    Image(&'a Chain, &'a [chain::Run]),
}

impl Source<'_> {
    fn max_read(&self) -> u64 {
        match self {
            Source::Nbd(nbd) => u64::from(nbd.export().max_read()),
            Source::Image(..) => BLOCK,
        }
    }

    async fn read_ranges(
        &mut self,
        ranges: &[(u64, u32)],
        out: &tokio::sync::mpsc::Sender<Bytes>,
    ) -> anyhow::Result<u64> {
        match self {
            Source::Nbd(nbd) => nbd.read_ranges(ranges, READ_DEPTH, out).await,
            Source::Image(chain, runs) => chain.read_ranges(runs, ranges, READ_DEPTH, out).await,
        }
    }
}

/// What is written.
enum Output {
    /// A qcow2 image laid out in advance.
    Qcow2(qcow2::Layout),
    /// A raw file of the disk's size, data at its guest offsets.
    Raw { clusters: Vec<u64> },
}

impl Output {
    /// Runs of guest clusters to copy: (first cluster, count, file offset).
    fn runs(&self) -> Vec<(u64, u64, u64)> {
        match self {
            Output::Qcow2(l) => l.runs(),
            Output::Raw { clusters } => {
                let mut out: Vec<(u64, u64, u64)> = Vec::new();
                for &c in clusters {
                    match out.last_mut() {
                        Some(r) if r.0 + r.1 == c => r.1 += 1,
                        _ => out.push((c, 1, c * qcow2::CLUSTER)),
                    }
                }
                out
            }
        }
    }

    fn file_size(&self, virtual_size: u64) -> u64 {
        match self {
            Output::Qcow2(l) => l.file_size(),
            Output::Raw { .. } => virtual_size,
        }
    }
}

/// Writes `output` from `source` into `dir/name` on `store` through `<name>.part`.
async fn write_image(
    store: &Store,
    source: &mut Source<'_>,
    output: &Output,
    dir: &str,
    name: &str,
    size: u64,
) -> anyhow::Result<Backup> {
    let dir = dir.trim_end_matches('/');
    if !dir.is_empty() {
        store.create_dir_all(dir).await?;
    }
    let file = if dir.is_empty() {
        name.to_owned()
    } else {
        format!("{dir}/{name}")
    };
    let part = format!("{file}.part");
    let (bytes_read, sha256) = match write(store, source, output, &part, size).await {
        Ok(r) => r,
        Err(e) => {
            let _ = store.remove_file(&part).await;
            return Err(e);
        }
    };
    if let Err(e) = store.rename(&part, &file).await {
        let _ = store.remove_file(&part).await;
        return Err(e.into());
    }
    Ok(Backup {
        file,
        virtual_size: size,
        physical_size: output.file_size(size),
        bytes_read,
        sha256,
    })
}

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
    let output = Output::Qcow2(layout);
    let result = write_image(
        store,
        &mut Source::Nbd(&mut nbd),
        &output,
        &spec.dir,
        &spec.name,
        size,
    )
    .await;
    nbd.disconnect().await;
    result
}

/// Copies the image `chain` (a volume file, or a snapshot with its chain) into `dir/name` on
/// `store` flattened: only its data clusters are read and written; `format` says what is
/// written (a self-contained qcow2, or raw).
pub async fn copy_image(
    chain: &mut Chain,
    store: &Store,
    dir: &str,
    name: &str,
    format: Format,
) -> anyhow::Result<Backup> {
    let size = chain.virtual_size();
    let runs = chain.runs().await?;
    let clusters: Vec<u64> = runs.iter().flat_map(|r| r.first..r.first + r.count).collect();
    let output = match format {
        Format::Qcow2 => Output::Qcow2(qcow2::Layout::new(size, clusters, None)?),
        Format::Raw => Output::Raw { clusters },
    };
    write_image(store, &mut Source::Image(chain, &runs), &output, dir, name, size).await
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
    source: &mut Source<'_>,
    output: &Output,
    part: &str,
    size: u64,
) -> anyhow::Result<(u64, String)> {
    let f = store.create(part).await?;
    let max = source.max_read().min(BLOCK) / qcow2::CLUSTER * qcow2::CLUSTER;
    let raw = matches!(output, Output::Raw { .. });
    // (guest offset, length) to read and the host offset each goes to, in file order.
    let mut ranges: Vec<(u64, u32)> = Vec::new();
    let mut hosts: Vec<u64> = Vec::new();
    for (first, count, host) in output.runs() {
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
        let meta = match output {
            Output::Qcow2(layout) => Bytes::from(layout.metadata()),
            Output::Raw { .. } => Bytes::new(),
        };
        async move {
            let mut sha = sha2::Sha256::new();
            // Raw: the file offset hashed up to (data blocks come in file order).
            let mut hashed = 0u64;
            sha.update(&meta);
            if !meta.is_empty() {
                store.write_at(&f, 0, meta).await?;
            }
            let mut writes = tokio::task::JoinSet::new();
            for host in hosts {
                let Some(data) = rx.recv().await else {
                    anyhow::bail!("the export's data ended early");
                };
                // The last cluster of a disk whose size is not a cluster multiple is padded.
                let padded = (data.len() as u64).div_ceil(qcow2::CLUSTER) * qcow2::CLUSTER;
                let block = if raw || padded == data.len() as u64 {
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
                if raw {
                    // The holes between a raw file's data read as zeroes: hashed as such.
                    hash_zeroes(&mut sha, host.saturating_sub(hashed));
                    hashed = host + block.len() as u64;
                }
                sha.update(&block);
            }
            while let Some(r) = writes.join_next().await {
                r??;
            }
            if raw && hashed < size {
                // The file is the disk's size even when its end is a hole.
                hash_zeroes(&mut sha, size - hashed);
                store.write_at(&f, size - 1, Bytes::from_static(&[0])).await?;
            }
            store.flush(&f).await?;
            Ok::<_, anyhow::Error>(hex::encode(sha.finalize()))
        }
    };
    let (read, sha) = tokio::join!(
        async {
            let r = source.read_ranges(&ranges, &tx).await;
            drop(tx);
            r
        },
        writer
    );
    Ok((read?, sha?))
}

/// Feeds `n` zero bytes to `sha`.
fn hash_zeroes(sha: &mut sha2::Sha256, mut n: u64) {
    static ZEROES: [u8; 64 << 10] = [0; 64 << 10];
    while n > 0 {
        let k = n.min(ZEROES.len() as u64) as usize;
        sha.update(&ZEROES[..k]);
        n -= k as u64;
    }
}
