//! Reading a disk image on a store as the guest sees it: a qcow2 image with its backing chain
//! (snapshot chains on secondary storage, volumes on primary storage), or a raw file. The
//! tables are decoded by `systemvm_inspect::qcow2_map`; this module does the reads.
//!
//! Invariants: everything is resolved in 64 KiB units (images with smaller clusters are refused
//! by the decoder); a backing file is looked up beside the image that names it (a relative name
//! is relative to that directory; of an absolute one only the file name counts, as primary
//! storage keeps a volume's template next to it), never elsewhere on the store; a chain is at
//! most [`MAX_DEPTH`] images deep; a read past a layer's end reads zeroes; only data clusters are
//! read, so [`Chain::read_ranges`] counts exactly the bytes it fetched.

use std::sync::Arc;

use anyhow::Context as _;
use bytes::{Bytes, BytesMut};
use futures_util::StreamExt as _;
use systemvm_inspect::qcow2_map::{self, Header, MapError, Mapping};

use crate::store::{FileId, Store};

/// The unit of resolution (the storage VM's cluster size).
pub const UNIT: u64 = 1 << 16;
/// Deepest backing chain followed.
pub const MAX_DEPTH: usize = 64;
/// Bytes read for a header (the first cluster of a 64 KiB-cluster image).
const HEAD: usize = 1 << 16;

/// An image's format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// QCOW2 (version 2 or 3).
    Qcow2,
    /// Raw bytes.
    Raw,
}

impl Format {
    /// CloudStack's name (`QCOW2`, `RAW`), case-insensitively.
    pub fn parse(name: &str) -> anyhow::Result<Self> {
        match name.to_ascii_uppercase().as_str() {
            "QCOW2" => Ok(Format::Qcow2),
            "RAW" => Ok(Format::Raw),
            other => anyhow::bail!("unsupported image format {other:?} (QCOW2 or RAW)"),
        }
    }
}

enum Kind {
    Raw,
    Qcow2 {
        header: Header,
        l1: Vec<u64>,
        /// The last L2 table read (L1 index, mappings): reads go in guest order.
        cached: Option<(usize, Arc<Vec<Mapping>>)>,
    },
}

struct Layer {
    path: String,
    file: FileId,
    len: u64,
    virtual_size: u64,
    kind: Kind,
}

/// Where one run of data units is: `count` units from guest unit `first`, in layer `layer` at
/// `host` onward.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    /// First guest unit.
    pub first: u64,
    /// Units.
    pub count: u64,
    /// The layer (0 = the image itself, then its backing files).
    pub layer: usize,
    /// Offset of the first unit in that layer's file.
    pub host: u64,
}

/// An image and its backing chain, opened for reading.
pub struct Chain {
    store: Store,
    layers: Vec<Layer>,
}

fn map_err(path: &str) -> impl Fn(MapError) -> anyhow::Error + '_ {
    move |e| anyhow::anyhow!("{path}: {e}")
}

impl Chain {
    /// Opens `path` on `store` as `format`, following backing files.
    pub async fn open(store: &Store, path: &str, format: Format) -> anyhow::Result<Chain> {
        let mut layers = Vec::new();
        let mut next = Some((path.to_owned(), Some(format)));
        while let Some((path, format)) = next.take() {
            anyhow::ensure!(
                layers.len() < MAX_DEPTH,
                "backing chain of {} deeper than {MAX_DEPTH} images",
                layers.first().map_or(path.as_str(), |l: &Layer| l.path.as_str())
            );
            let (file, len) = store
                .open_file(&path)
                .await
                .with_context(|| format!("cannot open image {path}"))?;
            let head = store.read_at(&file, 0, HEAD).await?;
            let format = match format {
                Some(f) => f,
                None if head.starts_with(b"QFI\xfb") => Format::Qcow2,
                None => Format::Raw,
            };
            let layer = match format {
                Format::Raw => Layer {
                    path,
                    file,
                    len,
                    virtual_size: len,
                    kind: Kind::Raw,
                },
                Format::Qcow2 => {
                    let header = qcow2_map::parse_header(&head).map_err(map_err(&path))?;
                    if let Some((at, n)) = header.backing {
                        let name = head
                            .get(at as usize..(at + u64::from(n)) as usize)
                            .context("backing file name past the header")?;
                        let name = qcow2_map::backing_name(name).map_err(map_err(&path))?;
                        let fmt = match header.backing_format.as_deref() {
                            None => None,
                            Some(f) => Some(Format::parse(f)?),
                        };
                        next = Some((beside(&path, &name)?, fmt));
                    }
                    let l1_bytes = usize::try_from(header.l1_bytes()).unwrap_or(usize::MAX);
                    let raw = if l1_bytes == 0 {
                        Bytes::new()
                    } else {
                        store.read_at(&file, header.l1_offset, l1_bytes).await?
                    };
                    let l1 = qcow2_map::l1_table(&raw, &header).map_err(map_err(&path))?;
                    Layer {
                        path,
                        file,
                        len,
                        virtual_size: header.virtual_size,
                        kind: Kind::Qcow2 {
                            header,
                            l1,
                            cached: None,
                        },
                    }
                }
            };
            layers.push(layer);
        }
        Ok(Chain {
            store: store.clone(),
            layers,
        })
    }

    /// The disk's virtual size (the top image's).
    pub fn virtual_size(&self) -> u64 {
        self.layers.first().map_or(0, |l| l.virtual_size)
    }

    /// The files of the chain, top first.
    pub fn files(&self) -> Vec<String> {
        self.layers.iter().map(|l| l.path.clone()).collect()
    }

    /// Where guest unit `unit` of layer `i` is.
    async fn lookup(&mut self, i: usize, unit: u64) -> anyhow::Result<Mapping> {
        let store = self.store.clone();
        let layer = &mut self.layers[i];
        if unit * UNIT >= layer.virtual_size {
            // A backing file shorter than the image reads as zeroes past its end.
            return Ok(Mapping::Zero);
        }
        match &mut layer.kind {
            Kind::Raw => Ok(if unit * UNIT < layer.len {
                Mapping::Data(unit * UNIT)
            } else {
                Mapping::Zero
            }),
            Kind::Qcow2 { header, l1, cached } => {
                let shift = header.cluster_bits - 16;
                let cluster = unit >> shift;
                let within = (unit & ((1 << shift) - 1)) * UNIT;
                let l1i = usize::try_from(cluster / header.l2_entries()).unwrap_or(usize::MAX);
                let l2i = usize::try_from(cluster % header.l2_entries()).unwrap_or(0);
                let Some(&table) = l1.get(l1i) else {
                    return Ok(Mapping::Unallocated);
                };
                if table == 0 {
                    return Ok(Mapping::Unallocated);
                }
                let entries = match cached {
                    Some((at, t)) if *at == l1i => t.clone(),
                    _ => {
                        let len = usize::try_from(header.cluster_size()).unwrap_or(usize::MAX);
                        let bytes = store.read_at(&layer.file, table, len).await?;
                        let t = Arc::new(qcow2_map::l2_table(&bytes, header).map_err(map_err(&layer.path))?);
                        *cached = Some((l1i, t.clone()));
                        t
                    }
                };
                Ok(match entries.get(l2i).copied().unwrap_or(Mapping::Unallocated) {
                    Mapping::Data(off) => Mapping::Data(off + within),
                    m => m,
                })
            }
        }
    }

    /// The runs of guest units holding data, through the chain (a unit that reads as zeroes is
    /// no run).
    pub async fn runs(&mut self) -> anyhow::Result<Vec<Run>> {
        let units = self.virtual_size().div_ceil(UNIT);
        let mut out: Vec<Run> = Vec::new();
        for unit in 0..units {
            let mut found = None;
            for i in 0..self.layers.len() {
                match self.lookup(i, unit).await? {
                    Mapping::Unallocated => continue,
                    Mapping::Zero => break,
                    Mapping::Data(host) => {
                        found = Some((i, host));
                        break;
                    }
                }
            }
            let Some((layer, host)) = found else { continue };
            match out.last_mut() {
                Some(r)
                    if r.layer == layer && r.first + r.count == unit && r.host + r.count * UNIT == host =>
                {
                    r.count += 1;
                }
                _ => out.push(Run {
                    first: unit,
                    count: 1,
                    layer,
                    host,
                }),
            }
        }
        Ok(out)
    }

    /// Reads guest `ranges` (offset, length; inside `runs`) with up to `depth` reads in flight,
    /// sending each range's bytes to `out` in order. Returns the bytes read from the store.
    pub async fn read_ranges(
        &self,
        runs: &[Run],
        ranges: &[(u64, u32)],
        depth: usize,
        out: &tokio::sync::mpsc::Sender<Bytes>,
    ) -> anyhow::Result<u64> {
        let size = self.virtual_size();
        let mut reads = futures_util::stream::iter(ranges.iter().copied())
            .map(|(offset, len)| self.read_range(runs, offset, len, size))
            .buffered(depth.max(1));
        let mut total = 0;
        while let Some(r) = reads.next().await {
            let (data, read) = r?;
            total += read;
            if out.send(data).await.is_err() {
                break;
            }
        }
        Ok(total)
    }

    /// One guest range: its pieces from the layers holding them, zeroes elsewhere.
    async fn read_range(
        &self,
        runs: &[Run],
        offset: u64,
        len: u32,
        size: u64,
    ) -> anyhow::Result<(Bytes, u64)> {
        let end = (offset + u64::from(len)).min(size);
        let mut buf = BytesMut::zeroed(usize::try_from(end.saturating_sub(offset)).unwrap_or(0));
        let mut read = 0u64;
        // The first run that ends after `offset`.
        let start = runs.partition_point(|r| (r.first + r.count) * UNIT <= offset);
        for r in &runs[start..] {
            let (rs, re) = (r.first * UNIT, ((r.first + r.count) * UNIT).min(size));
            if rs >= end {
                break;
            }
            let (from, to) = (rs.max(offset), re.min(end));
            if from >= to {
                continue;
            }
            let layer = &self.layers[r.layer];
            let host = r.host + (from - rs);
            // A raw layer (or a qcow2 file cut short) may end inside the range: the rest is zeroes.
            let want = (to - from).min(layer.len.saturating_sub(host));
            if want == 0 {
                continue;
            }
            let data = self
                .store
                .read_at(&layer.file, host, usize::try_from(want).unwrap_or(0))
                .await
                .with_context(|| format!("reading {}", layer.path))?;
            let at = usize::try_from(from - offset).unwrap_or(0);
            let n = data.len().min(buf.len() - at);
            buf[at..at + n].copy_from_slice(&data[..n]);
            read += n as u64;
        }
        Ok((buf.freeze(), read))
    }
}

/// The path of backing file `name` of the image at `path`: beside it.
fn beside(path: &str, name: &str) -> anyhow::Result<String> {
    let file = name.rsplit('/').next().unwrap_or(name);
    let relative = !name.starts_with('/');
    anyhow::ensure!(
        !file.is_empty() && file != "." && file != ".." && (!relative || !name.contains('/')),
        "backing file {name:?} of {path} is not beside it"
    );
    Ok(match path.rsplit_once('/') {
        Some((dir, _)) => format!("{dir}/{file}"),
        None => file.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backing_files_are_found_beside_the_image() {
        assert_eq!(
            beside("snapshots/2/v/s2.qcow2", "s1.qcow2").unwrap(),
            "snapshots/2/v/s1.qcow2"
        );
        assert_eq!(beside("vol.qcow2", "base").unwrap(), "base");
        // Primary storage names the template by its mount path: only the file name counts.
        assert_eq!(
            beside("vm/v.qcow2", "/mnt/pool-uuid/tmpl-uuid").unwrap(),
            "vm/tmpl-uuid"
        );
        for bad in ["../x", "a/b", "/mnt/..", "/", "."] {
            assert!(beside("d/v.qcow2", bad).is_err(), "{bad}");
        }
    }
}
