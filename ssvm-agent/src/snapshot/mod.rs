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
//! * a part file is continued only when its journal (`<name>.part.journal`, brought up to date
//!   at most every second, after the data below it is committed) was written for the same
//!   layout: a command sent again after the agent restarted resumes, anything else starts over;
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
    /// At most this many bytes a second from the export.
    pub max_rate: Option<u64>,
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
    /// Bytes of the image kept from an interrupted attempt (read back, not from the source).
    pub resumed: u64,
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
            resumed: b.resumed,
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
    (dir, name): (&str, &str),
    size: u64,
    max_rate: Option<u64>,
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
    let journal = journal_of(&part);
    let written = match write(store, source, output, &part, size, max_rate).await {
        Ok(r) => r,
        Err(e) => {
            let _ = store.remove_file(&journal).await;
            let _ = store.remove_file(&part).await;
            return Err(e);
        }
    };
    // Without its journal a part is never resumed; so the journal goes first.
    let _ = store.remove_file(&journal).await;
    if let Err(e) = store.rename(&part, &file).await {
        let _ = store.remove_file(&part).await;
        return Err(e.into());
    }
    Ok(Backup {
        file,
        virtual_size: size,
        physical_size: output.file_size(size),
        bytes_read: written.bytes_read,
        resumed: written.resumed,
        sha256: written.sha256,
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
        (&spec.dir, &spec.name),
        size,
        spec.max_rate,
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
    (dir, name): (&str, &str),
    format: Format,
    max_rate: Option<u64>,
) -> anyhow::Result<Backup> {
    let size = chain.virtual_size();
    let runs = chain.runs().await?;
    let clusters: Vec<u64> = runs.iter().flat_map(|r| r.first..r.first + r.count).collect();
    let output = match format {
        Format::Qcow2 => Output::Qcow2(qcow2::Layout::new(size, clusters, None)?),
        Format::Raw => Output::Raw { clusters },
    };
    write_image(
        store,
        &mut Source::Image(chain, &runs),
        &output,
        (dir, name),
        size,
        max_rate,
    )
    .await
}

/// NBD reads in flight at once.
const READ_DEPTH: usize = 8;
/// Store writes in flight at once.
const WRITE_DEPTH: usize = 4;
/// Size of each read and write.
const BLOCK: u64 = 4 << 20;

/// Progress of a part file, beside it as `<part>.journal`: the part's bytes below `done` are
/// written and committed, for the layout whose fingerprint this is. A command sent again after
/// the agent restarted (core does so for an interrupted backup) resumes from there.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct Journal {
    fingerprint: String,
    done: u64,
}

/// What the hash thread is given, in file order.
enum Hashed {
    Data(Bytes),
    Zeroes(u64),
}

/// Blocks queued for the hash thread.
const HASH_DEPTH: usize = 8;

/// How often, at most, the journal is brought up to date.
const JOURNAL_EVERY: Duration = Duration::from_secs(1);

/// The journal of part file `part`.
fn journal_of(part: &str) -> String {
    format!("{part}.journal")
}

/// What a finished [`write`] did.
struct Written {
    bytes_read: u64,
    resumed: u64,
    sha256: String,
}

/// Writes the image into `part`: metadata, then each run of clusters read from the source,
/// reads pipelined (one at a time, each when due, under `max_rate` bytes a second), hashing in
/// file order, writes several at a time and completed in file order (so the journal can say
/// "everything below here").
/// A part file whose journal matches this layout is continued, not started again.
async fn write(
    store: &Store,
    source: &mut Source<'_>,
    output: &Output,
    part: &str,
    size: u64,
    max_rate: Option<u64>,
) -> anyhow::Result<Written> {
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
    let meta = match output {
        Output::Qcow2(layout) => Bytes::from(layout.metadata()),
        Output::Raw { .. } => Bytes::new(),
    };
    let fingerprint = {
        let mut h = sha2::Sha256::new();
        h.update(if raw { b"raw" } else { b"q2v" });
        h.update(size.to_le_bytes());
        for ((at, len), host) in ranges.iter().zip(&hosts) {
            h.update(at.to_le_bytes());
            h.update(len.to_le_bytes());
            h.update(host.to_le_bytes());
        }
        h.update(&meta);
        hex::encode(h.finalize())
    };
    let journal = journal_of(part);
    let mut sha = sha2::Sha256::new();
    let (f, done) = match resumable(store, part, &journal, &fingerprint).await {
        Some((f, done)) => {
            // The hash of what is kept, read back.
            let mut at = 0;
            while at < done {
                let n = usize::try_from((done - at).min(BLOCK)).unwrap_or(0);
                let data = store.read_at(&f, at, n).await?;
                anyhow::ensure!(!data.is_empty(), "the part file {part} ended early");
                sha.update(&data);
                at += data.len() as u64;
            }
            tracing::info!(part, done, "Resuming an interrupted image");
            (f, done)
        }
        None => {
            let _ = store.remove_file(&journal).await;
            (store.create(part).await?, 0)
        }
    };
    // What is still to come: the ranges at or past the kept part (a kept part ends at a range).
    let keep = hosts.iter().take_while(|&&h| h < done).count();
    let (ranges, hosts) = (&ranges[keep..], hosts[keep..].to_vec());
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Bytes>(READ_DEPTH);
    // The hash runs on its own thread, off the write path; it sees the file's bytes in order.
    let (htx, mut hrx) = tokio::sync::mpsc::channel::<Hashed>(HASH_DEPTH);
    let hasher = tokio::task::spawn_blocking(move || {
        while let Some(item) = hrx.blocking_recv() {
            match item {
                Hashed::Data(d) => sha.update(&d),
                Hashed::Zeroes(n) => hash_zeroes(&mut sha, n),
            }
        }
        hex::encode(sha.finalize())
    });
    let writer = {
        let (store, f, journal) = (store.clone(), f.clone(), journal.clone());
        async move {
            let hash = |item| {
                let htx = htx.clone();
                async move {
                    htx.send(item)
                        .await
                        .map_err(|_| anyhow::anyhow!("the hash ended early"))
                }
            };
            // Raw: the file offset hashed up to (data blocks come in file order).
            let mut hashed = done;
            if done == 0 {
                hash(Hashed::Data(meta.clone())).await?;
                if !meta.is_empty() {
                    store.write_at(&f, 0, meta.clone()).await?;
                }
            }
            // The journal is brought up to date beside the writes (flush, then the journal), one
            // update at a time, each for writes already complete.
            let mut journaled = tokio::time::Instant::now();
            let mut journaling: Option<tokio::task::JoinHandle<anyhow::Result<()>>> = None;
            // Writes in flight, oldest first, with the file offset each ends at.
            let mut writes: std::collections::VecDeque<(
                u64,
                tokio::task::JoinHandle<Result<(), crate::store::StoreError>>,
            )> = std::collections::VecDeque::new();
            let mut frontier = done.max(meta.len() as u64);
            let mut in_journal = frontier;
            for host in hosts {
                let Some(data) = rx.recv().await else {
                    anyhow::bail!("the source's data ended early");
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
                while writes.len() >= WRITE_DEPTH || writes.front().is_some_and(|(_, w)| w.is_finished()) {
                    if let Some((end, w)) = writes.pop_front() {
                        w.await??;
                        frontier = end;
                    }
                }
                if journaling.as_ref().is_some_and(|j| j.is_finished())
                    && let Some(j) = journaling.take()
                {
                    j.await??;
                }
                if journaling.is_none() && frontier > in_journal && journaled.elapsed() >= JOURNAL_EVERY {
                    let (st, fj, path) = (store.clone(), f.clone(), journal.clone());
                    let j = serde_json::to_vec(&Journal {
                        fingerprint: fingerprint.clone(),
                        done: frontier,
                    })?;
                    journaling = Some(tokio::spawn(async move {
                        st.flush(&fj).await?;
                        st.write_file_atomic(&path, &j).await?;
                        Ok(())
                    }));
                    (journaled, in_journal) = (tokio::time::Instant::now(), frontier);
                }
                let (st, fw, bytes) = (store.clone(), f.clone(), block.clone());
                let end = host + block.len() as u64;
                writes.push_back((
                    end,
                    tokio::spawn(async move { st.write_at(&fw, host, bytes).await }),
                ));
                if raw && host > hashed {
                    // The holes between a raw file's data read as zeroes: hashed as such.
                    hash(Hashed::Zeroes(host - hashed)).await?;
                }
                hashed = end;
                hash(Hashed::Data(block)).await?;
            }
            for (_, w) in writes {
                w.await??;
            }
            if let Some(j) = journaling {
                j.await??;
            }
            if raw && hashed < size {
                // The file is the disk's size even when its end is a hole.
                hash(Hashed::Zeroes(size - hashed)).await?;
                store.write_at(&f, size - 1, Bytes::from_static(&[0])).await?;
            }
            drop(htx);
            store.flush(&f).await?;
            Ok::<_, anyhow::Error>(())
        }
    };
    let (read, wrote) = tokio::join!(
        async {
            let r = match max_rate.filter(|r| *r > 0) {
                None => source.read_ranges(ranges, &tx).await,
                // Held to the rate: each read starts when the bytes before it are due.
                Some(rate) => {
                    let started = tokio::time::Instant::now();
                    let mut read = 0u64;
                    let mut r = Ok(0);
                    for range in ranges {
                        let due = Duration::from_secs_f64(read as f64 / rate as f64);
                        tokio::time::sleep_until(started + due).await;
                        match source.read_ranges(std::slice::from_ref(range), &tx).await {
                            Ok(n) => read += n,
                            Err(e) => {
                                r = Err(e);
                                break;
                            }
                        }
                    }
                    r.map(|_| read)
                }
            };
            drop(tx);
            r
        },
        writer
    );
    let bytes_read = read?;
    // A failed write ends the hash early; its error is the one that matters.
    wrote?;
    let sha256 = hasher.await.context("the hash failed")?;
    Ok(Written {
        bytes_read,
        resumed: done,
        sha256,
    })
}

/// The part file to continue and how much of it is kept, when its journal is for this layout.
async fn resumable(
    store: &Store,
    part: &str,
    journal: &str,
    fingerprint: &str,
) -> Option<(crate::store::FileId, u64)> {
    let j: Journal = serde_json::from_slice(&store.read_file(journal, 4096).await.ok()?).ok()?;
    if j.fingerprint != fingerprint {
        return None;
    }
    let (f, len) = store.open_file(part).await.ok()?;
    (len >= j.done).then_some((f, j.done))
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
