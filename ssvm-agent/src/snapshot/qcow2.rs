//! A qcow2 (version 3) image laid out in advance from the list of guest clusters that hold data,
//! so that it is written front to back in one pass: all metadata first (header, L1 table,
//! refcount table and blocks, L2 tables), then the data clusters in guest order. No I/O.
//!
//! Invariants: 64 KiB clusters, 16-bit refcounts, every cluster of the file counted exactly once
//! (refcount 1, so every L1 and L2 entry carries `QCOW_OFLAG_COPIED`), consecutive guest
//! clusters get consecutive host clusters; a guest cluster not listed is unallocated (it reads
//! from the backing file when there is one, else as zeroes). `qemu-img check` finds nothing
//! to repair in what [`Layout::metadata`] describes once the data clusters are written.

/// Cluster size (bits).
pub const CLUSTER_BITS: u32 = 16;
/// Cluster size.
pub const CLUSTER: u64 = 1 << CLUSTER_BITS;
const L2_ENTRIES: u64 = CLUSTER / 8;
const REFCOUNTS_PER_BLOCK: u64 = CLUSTER / 2;
const COPIED: u64 = 1 << 63;
const HEADER_LEN: u32 = 104;
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;

/// Why an image cannot be laid out.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    /// A listed cluster lies past the virtual size, or the list is not strictly increasing.
    #[error("cluster {0} is out of order or past the end of the disk")]
    Cluster(u64),
    /// The backing file name does not fit the header cluster.
    #[error("backing file name too long")]
    Backing,
}

/// Where everything of the image goes.
#[derive(Debug, Clone)]
pub struct Layout {
    virtual_size: u64,
    /// Guest cluster indices holding data, increasing.
    clusters: Vec<u64>,
    backing: Option<String>,
    l1_entries: u64,
    l1_clusters: u64,
    rt_clusters: u64,
    rb_clusters: u64,
    /// L1 indices that have an L2 table, increasing.
    l2_tables: Vec<u64>,
}

fn div_ceil(a: u64, b: u64) -> u64 {
    a.div_ceil(b)
}

impl Layout {
    /// The layout of a disk of `virtual_size` bytes whose data is in guest clusters `clusters`
    /// (strictly increasing), over `backing` (a file name beside the image) when given.
    pub fn new(virtual_size: u64, clusters: Vec<u64>, backing: Option<&str>) -> Result<Self, LayoutError> {
        let total_guest = div_ceil(virtual_size, CLUSTER);
        let mut prev: Option<u64> = None;
        for &c in &clusters {
            if c >= total_guest || prev.is_some_and(|p| c <= p) {
                return Err(LayoutError::Cluster(c));
            }
            prev = Some(c);
        }
        if let Some(b) = backing
            && (b.is_empty() || u64::from(HEADER_LEN) + 8 + 16 + b.len() as u64 > CLUSTER)
        {
            return Err(LayoutError::Backing);
        }
        let l1_entries = div_ceil(total_guest, L2_ENTRIES).max(1);
        let l1_clusters = div_ceil(l1_entries * 8, CLUSTER);
        let mut l2_tables: Vec<u64> = clusters.iter().map(|c| c / L2_ENTRIES).collect();
        l2_tables.dedup();
        let fixed = 1 + l1_clusters + l2_tables.len() as u64 + clusters.len() as u64;
        let (mut rt, mut rb) = (1u64, 1u64);
        loop {
            let total = fixed + rt + rb;
            let rb2 = div_ceil(total, REFCOUNTS_PER_BLOCK);
            let rt2 = div_ceil(rb2 * 8, CLUSTER);
            if (rb2, rt2) == (rb, rt) {
                break;
            }
            (rb, rt) = (rb2, rt2);
        }
        Ok(Layout {
            virtual_size,
            clusters,
            backing: backing.map(str::to_owned),
            l1_entries,
            l1_clusters,
            rt_clusters: rt,
            rb_clusters: rb,
            l2_tables,
        })
    }

    fn l1_offset(&self) -> u64 {
        CLUSTER
    }

    fn rt_offset(&self) -> u64 {
        self.l1_offset() + self.l1_clusters * CLUSTER
    }

    fn rb_offset(&self) -> u64 {
        self.rt_offset() + self.rt_clusters * CLUSTER
    }

    fn l2_offset(&self) -> u64 {
        self.rb_offset() + self.rb_clusters * CLUSTER
    }

    /// Where the data clusters begin (the length of [`Layout::metadata`]).
    pub fn data_offset(&self) -> u64 {
        self.l2_offset() + self.l2_tables.len() as u64 * CLUSTER
    }

    /// The whole file's length once every data cluster is written.
    pub fn file_size(&self) -> u64 {
        self.data_offset() + self.clusters.len() as u64 * CLUSTER
    }

    /// The data clusters, increasing.
    pub fn clusters(&self) -> &[u64] {
        &self.clusters
    }

    /// Runs of consecutive guest clusters: (first guest cluster, count, host offset).
    pub fn runs(&self) -> Vec<(u64, u64, u64)> {
        let mut out: Vec<(u64, u64, u64)> = Vec::new();
        for (i, &c) in self.clusters.iter().enumerate() {
            let host = self.data_offset() + i as u64 * CLUSTER;
            match out.last_mut() {
                Some(run) if run.0 + run.1 == c => run.1 += 1,
                _ => out.push((c, 1, host)),
            }
        }
        out
    }

    /// The file's first [`Layout::data_offset`] bytes: header, L1 table, refcount table and
    /// blocks, L2 tables.
    pub fn metadata(&self) -> Vec<u8> {
        let mut m = vec![0u8; usize::try_from(self.data_offset()).unwrap_or(usize::MAX)];
        let put32 =
            |m: &mut [u8], at: u64, v: u32| m[at as usize..at as usize + 4].copy_from_slice(&v.to_be_bytes());
        let put64 =
            |m: &mut [u8], at: u64, v: u64| m[at as usize..at as usize + 8].copy_from_slice(&v.to_be_bytes());
        // Header (version 3).
        put32(&mut m, 0, 0x5146_49fb);
        put32(&mut m, 4, 3);
        put32(&mut m, 20, CLUSTER_BITS);
        put64(&mut m, 24, self.virtual_size);
        put32(&mut m, 36, u32::try_from(self.l1_entries).unwrap_or(u32::MAX));
        put64(&mut m, 40, self.l1_offset());
        put64(&mut m, 48, self.rt_offset());
        put32(&mut m, 56, u32::try_from(self.rt_clusters).unwrap_or(u32::MAX));
        put32(&mut m, 96, 4);
        put32(&mut m, 100, HEADER_LEN);
        let mut at = u64::from(HEADER_LEN);
        if let Some(b) = &self.backing {
            // Header extension: the backing file's format, then the end marker, then the name.
            put32(&mut m, at, EXT_BACKING_FORMAT);
            put32(&mut m, at + 4, 5);
            m[at as usize + 8..at as usize + 13].copy_from_slice(b"qcow2");
            at += 16;
            at += 8;
            put64(&mut m, 8, at);
            put32(&mut m, 16, u32::try_from(b.len()).unwrap_or(u32::MAX));
            m[at as usize..at as usize + b.len()].copy_from_slice(b.as_bytes());
        }
        // L1: one entry per L2 table.
        for (i, &l1) in self.l2_tables.iter().enumerate() {
            let l2 = self.l2_offset() + i as u64 * CLUSTER;
            put64(&mut m, self.l1_offset() + l1 * 8, l2 | COPIED);
        }
        // Refcount table and blocks: every cluster of the file, once.
        for b in 0..self.rb_clusters {
            put64(&mut m, self.rt_offset() + b * 8, self.rb_offset() + b * CLUSTER);
        }
        let total = self.file_size() / CLUSTER;
        for c in 0..total {
            let at = self.rb_offset() + c * 2;
            m[at as usize..at as usize + 2].copy_from_slice(&1u16.to_be_bytes());
        }
        // L2 entries of the data clusters.
        for (i, &c) in self.clusters.iter().enumerate() {
            let table = self.l2_tables.binary_search(&(c / L2_ENTRIES)).unwrap_or(0) as u64;
            let entry = self.l2_offset() + table * CLUSTER + (c % L2_ENTRIES) * 8;
            put64(&mut m, entry, (self.data_offset() + i as u64 * CLUSTER) | COPIED);
        }
        m
    }
}

/// The guest clusters that extents (offset, length) touch, increasing, without repeats.
pub fn clusters_of(extents: &[(u64, u64)]) -> Vec<u64> {
    let mut out: Vec<u64> = Vec::new();
    for &(offset, len) in extents {
        if len == 0 {
            continue;
        }
        let first = offset / CLUSTER;
        let last = (offset + len - 1) / CLUSTER;
        for c in first..=last {
            if out.last().is_none_or(|l| *l < c) {
                out.push(c);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lays_out_metadata_then_data_in_guest_order() {
        let l = Layout::new(8 << 30, vec![0, 1, 2, 9000, 9001], None).unwrap();
        // 8 GiB: 16 L1 entries (one cluster), two L2 tables (L1 index 0 and 1).
        assert_eq!(l.l1_entries, 16);
        assert_eq!(l.l2_tables, vec![0, 1]);
        assert_eq!(l.data_offset(), CLUSTER * (1 + 1 + 1 + 1 + 2));
        assert_eq!(l.file_size(), l.data_offset() + 5 * CLUSTER);
        assert_eq!(
            l.runs(),
            vec![(0, 3, l.data_offset()), (9000, 2, l.data_offset() + 3 * CLUSTER)]
        );
        let m = l.metadata();
        assert_eq!(m.len() as u64, l.data_offset());
        assert_eq!(&m[..4], b"QFI\xfb");
    }

    #[test]
    fn refuses_bad_cluster_lists() {
        assert!(Layout::new(1 << 20, vec![16], None).is_err(), "past the end");
        assert!(Layout::new(1 << 20, vec![3, 3], None).is_err());
        assert!(Layout::new(1 << 20, vec![4, 2], None).is_err());
        assert!(Layout::new(1 << 20, vec![], Some(&"x".repeat(70_000))).is_err());
        assert!(Layout::new(1 << 20, vec![], None).is_ok(), "an empty disk");
    }

    #[test]
    fn extents_round_to_clusters() {
        assert_eq!(
            clusters_of(&[(0, 1), (100, 10), (CLUSTER - 1, 2), (5 * CLUSTER, CLUSTER)]),
            vec![0, 1, 5]
        );
        assert_eq!(clusters_of(&[(0, 0)]), Vec::<u64>::new());
    }
}
