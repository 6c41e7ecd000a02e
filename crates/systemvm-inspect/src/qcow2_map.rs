//! QCOW2 mapping tables: the header fields a reader needs (cluster size, virtual size, L1 table,
//! backing file and its format) and the decoding of L1 and L2 tables into where each guest
//! cluster's data lives. No I/O: the caller reads the bytes these functions decode.
//!
//! Unlike the inspector's header check (which refuses backing files: a template must be
//! self-contained), this reads the images the storage VM restores and backs up — snapshot chains
//! and volumes on primary storage — whose backing file is part of the image.
//!
//! Invariants: every offset handed back is cluster-aligned and below 2^56; the L1 table is at
//! most [`MAX_L1_BYTES`]; images this decoder cannot read exactly (encrypted, external data file,
//! extended L2 entries, compressed clusters, clusters below 64 KiB, marked corrupt, unknown
//! incompatible features) are refused with the reason, never misread; no input panics.

/// Incompatible feature bits of QCOW2 v3.
const INCOMPAT_DIRTY: u64 = 1 << 0;
const INCOMPAT_CORRUPT: u64 = 1 << 1;
const INCOMPAT_DATA_FILE: u64 = 1 << 2;
const INCOMPAT_COMPRESSION_TYPE: u64 = 1 << 3;
const INCOMPAT_EXTENDED_L2: u64 = 1 << 4;
/// Header extension: the backing file's format.
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
/// Offset bits of L1 and L2 entries (bits 9 to 55).
const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const COMPRESSED: u64 = 1 << 62;
const ZERO: u64 = 1;
/// Largest L1 table read (QEMU's own limit).
pub const MAX_L1_BYTES: u64 = 32 << 20;
/// Longest backing file name (QEMU's own limit).
pub const MAX_BACKING_NAME: u32 = 1023;
/// Smallest cluster size read (bits): the storage VM works in 64 KiB clusters.
pub const MIN_CLUSTER_BITS: u32 = 16;
/// Largest cluster size (bits), as QEMU.
pub const MAX_CLUSTER_BITS: u32 = 21;

/// Why an image cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MapError {
    /// Fewer bytes than the structure needs.
    #[error("qcow2 image truncated: {0}")]
    Truncated(&'static str),
    /// Not a QCOW2 image, or a field out of range.
    #[error("invalid qcow2 image: {0}")]
    Invalid(&'static str),
    /// A QCOW2 feature this reader does not handle.
    #[error("unsupported qcow2 image: {0}")]
    Unsupported(&'static str),
}

/// What a reader needs from a QCOW2 header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// 2 or 3.
    pub version: u32,
    /// Cluster size (bits), 16 to 21.
    pub cluster_bits: u32,
    /// Virtual disk size in bytes.
    pub virtual_size: u64,
    /// Where the L1 table is.
    pub l1_offset: u64,
    /// Its entries.
    pub l1_entries: u32,
    /// Where the backing file name is and its length, when the image has one.
    pub backing: Option<(u64, u32)>,
    /// The backing file's format from the header extension (`qcow2`, `raw`), when recorded.
    pub backing_format: Option<String>,
}

impl Header {
    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Entries per L2 table.
    pub fn l2_entries(&self) -> u64 {
        self.cluster_size() / 8
    }

    /// Bytes of the L1 table.
    pub fn l1_bytes(&self) -> u64 {
        u64::from(self.l1_entries) * 8
    }
}

/// Where a guest cluster's data is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mapping {
    /// Not in this image: the backing file's data, or zeroes without one.
    Unallocated,
    /// Reads as zeroes (whatever the backing file holds).
    Zero,
    /// At this offset of the image file.
    Data(u64),
}

fn be32(b: &[u8], at: usize) -> Option<u32> {
    b.get(at..at + 4)
        .map(|s| u32::from_be_bytes([s[0], s[1], s[2], s[3]]))
}

fn be64(b: &[u8], at: usize) -> Option<u64> {
    b.get(at..at + 8).map(|s| {
        let mut a = [0u8; 8];
        a.copy_from_slice(s);
        u64::from_be_bytes(a)
    })
}

/// Decodes the header from the image's first bytes (`head`: at least the header and its
/// extensions; the first 64 KiB always suffice).
pub fn parse_header(head: &[u8]) -> Result<Header, MapError> {
    let field32 = |at| be32(head, at).ok_or(MapError::Truncated("header"));
    let field64 = |at| be64(head, at).ok_or(MapError::Truncated("header"));
    if head.get(..4) != Some(b"QFI\xfb".as_slice()) {
        return Err(if head.len() < 4 {
            MapError::Truncated("header")
        } else {
            MapError::Invalid("no QCOW2 signature")
        });
    }
    let version = field32(4)?;
    if version != 2 && version != 3 {
        return Err(MapError::Unsupported("version other than 2 or 3"));
    }
    let backing_offset = field64(8)?;
    let backing_len = field32(16)?;
    let cluster_bits = field32(20)?;
    if !(9..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
        return Err(MapError::Invalid("cluster size out of range"));
    }
    if cluster_bits < MIN_CLUSTER_BITS {
        return Err(MapError::Unsupported("clusters smaller than 64 KiB"));
    }
    let virtual_size = field64(24)?;
    if field32(32)? != 0 {
        return Err(MapError::Unsupported("encrypted image"));
    }
    let l1_entries = field32(36)?;
    let l1_offset = field64(40)?;
    let cluster = 1u64 << cluster_bits;
    let l2_entries = cluster / 8;
    // The L1 table must cover the disk, fit QEMU's limit and sit on a cluster boundary.
    let needed = virtual_size.div_ceil(cluster).div_ceil(l2_entries);
    if u64::from(l1_entries) < needed {
        return Err(MapError::Invalid("L1 table smaller than the disk"));
    }
    if u64::from(l1_entries) * 8 > MAX_L1_BYTES {
        return Err(MapError::Unsupported("L1 table larger than 32 MiB"));
    }
    if !l1_offset.is_multiple_of(cluster)
        || l1_offset & !OFFSET_MASK != 0
        || (l1_entries > 0 && l1_offset == 0)
    {
        return Err(MapError::Invalid("L1 table offset"));
    }
    let header_len = if version == 3 {
        let features = field64(72)?;
        if features & INCOMPAT_CORRUPT != 0 {
            return Err(MapError::Unsupported("image marked corrupt"));
        }
        if features & INCOMPAT_DATA_FILE != 0 {
            return Err(MapError::Unsupported("external data file"));
        }
        if features & INCOMPAT_EXTENDED_L2 != 0 {
            return Err(MapError::Unsupported("extended L2 entries"));
        }
        if features & !(INCOMPAT_DIRTY | INCOMPAT_COMPRESSION_TYPE) != 0 {
            return Err(MapError::Unsupported("unknown incompatible features"));
        }
        let len = field32(100)?;
        if len < 104 || u64::from(len) > cluster {
            return Err(MapError::Invalid("header length"));
        }
        len as usize
    } else {
        72
    };
    let backing = match backing_offset {
        0 => None,
        at => {
            if backing_len == 0 || backing_len > MAX_BACKING_NAME {
                return Err(MapError::Invalid("backing file name length"));
            }
            if at
                .checked_add(u64::from(backing_len))
                .is_none_or(|end| end > cluster)
            {
                return Err(MapError::Invalid("backing file name outside the first cluster"));
            }
            Some((at, backing_len))
        }
    };
    // Header extensions: type, length, data padded to 8 bytes, up to the end marker.
    let mut backing_format = None;
    let mut at = header_len;
    loop {
        let (Some(kind), Some(len)) = (be32(head, at), be32(head, at + 4)) else {
            if (at as u64) + 8 > cluster {
                return Err(MapError::Invalid("header extensions past the first cluster"));
            }
            return Err(MapError::Truncated("header extensions"));
        };
        if kind == 0 {
            break;
        }
        let start = at + 8;
        let end = start
            .checked_add(len as usize)
            .ok_or(MapError::Invalid("header extension length"))?;
        if end as u64 > cluster {
            return Err(MapError::Invalid("header extension past the first cluster"));
        }
        let data = head
            .get(start..end)
            .ok_or(MapError::Truncated("header extensions"))?;
        if kind == EXT_BACKING_FORMAT {
            let name =
                std::str::from_utf8(data).map_err(|_| MapError::Invalid("backing format is not UTF-8"))?;
            backing_format = Some(name.trim_end_matches('\0').to_owned());
        }
        at = start + (len as usize).div_ceil(8) * 8;
    }
    Ok(Header {
        version,
        cluster_bits,
        virtual_size,
        l1_offset,
        l1_entries,
        backing,
        backing_format,
    })
}

/// The backing file name from its bytes (at [`Header::backing`]): UTF-8 without NUL or control
/// characters.
pub fn backing_name(bytes: &[u8]) -> Result<String, MapError> {
    let name = std::str::from_utf8(bytes).map_err(|_| MapError::Invalid("backing file name is not UTF-8"))?;
    if name.is_empty() || name.chars().any(char::is_control) {
        return Err(MapError::Invalid("backing file name"));
    }
    Ok(name.to_owned())
}

fn entry_offset(entry: u64, h: &Header, what: &'static str) -> Result<u64, MapError> {
    let off = entry & OFFSET_MASK;
    if !off.is_multiple_of(h.cluster_size()) {
        return Err(MapError::Invalid(what));
    }
    Ok(off)
}

/// The L2 table offsets of an L1 table (`bytes`: [`Header::l1_bytes`] long); 0 = no table.
pub fn l1_table(bytes: &[u8], h: &Header) -> Result<Vec<u64>, MapError> {
    let n = h.l1_entries as usize;
    if bytes.len() < n * 8 {
        return Err(MapError::Truncated("L1 table"));
    }
    bytes[..n * 8]
        .chunks_exact(8)
        .map(|c| {
            let mut a = [0u8; 8];
            a.copy_from_slice(c);
            entry_offset(u64::from_be_bytes(a), h, "unaligned L2 table offset")
        })
        .collect()
}

/// The mappings of an L2 table (`bytes`: one cluster).
pub fn l2_table(bytes: &[u8], h: &Header) -> Result<Vec<Mapping>, MapError> {
    let n = usize::try_from(h.l2_entries()).map_err(|_| MapError::Invalid("cluster size"))?;
    if bytes.len() < n * 8 {
        return Err(MapError::Truncated("L2 table"));
    }
    bytes[..n * 8]
        .chunks_exact(8)
        .map(|c| {
            let mut a = [0u8; 8];
            a.copy_from_slice(c);
            let e = u64::from_be_bytes(a);
            if e & COMPRESSED != 0 {
                return Err(MapError::Unsupported("compressed clusters"));
            }
            if h.version == 3 && e & ZERO != 0 {
                return Ok(Mapping::Zero);
            }
            match entry_offset(e, h, "unaligned data cluster offset")? {
                0 => Ok(Mapping::Unallocated),
                off => Ok(Mapping::Data(off)),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A v3 header with 64 KiB clusters, `size`, L1 at 64 KiB, optional backing name.
    fn header(size: u64, backing: Option<&str>) -> Vec<u8> {
        let mut h = vec![0u8; 65536];
        h[..4].copy_from_slice(b"QFI\xfb");
        h[4..8].copy_from_slice(&3u32.to_be_bytes());
        h[20..24].copy_from_slice(&16u32.to_be_bytes());
        h[24..32].copy_from_slice(&size.to_be_bytes());
        let l1 = size.div_ceil(65536).div_ceil(8192).max(1) as u32;
        h[36..40].copy_from_slice(&l1.to_be_bytes());
        h[40..48].copy_from_slice(&65536u64.to_be_bytes());
        h[100..104].copy_from_slice(&104u32.to_be_bytes());
        if let Some(b) = backing {
            h[104..108].copy_from_slice(&EXT_BACKING_FORMAT.to_be_bytes());
            h[108..112].copy_from_slice(&5u32.to_be_bytes());
            h[112..117].copy_from_slice(b"qcow2");
            // end marker at 120, name at 128
            h[8..16].copy_from_slice(&128u64.to_be_bytes());
            h[16..20].copy_from_slice(&(b.len() as u32).to_be_bytes());
            h[128..128 + b.len()].copy_from_slice(b.as_bytes());
        }
        h
    }

    #[test]
    fn reads_a_header_with_its_backing_file() {
        let h = parse_header(&header(1 << 30, Some("s1.qcow2"))).unwrap();
        assert_eq!((h.version, h.cluster_bits, h.virtual_size), (3, 16, 1 << 30));
        assert_eq!((h.l1_offset, h.l1_entries), (65536, 2));
        assert_eq!(h.backing, Some((128, 8)));
        assert_eq!(h.backing_format.as_deref(), Some("qcow2"));
        let bytes = header(1 << 30, Some("s1.qcow2"));
        assert_eq!(backing_name(&bytes[128..136]).unwrap(), "s1.qcow2");
        let plain = parse_header(&header(5 << 20, None)).unwrap();
        assert_eq!((plain.backing, plain.backing_format), (None, None));
    }

    #[test]
    fn refuses_what_it_cannot_read_exactly() {
        let with = |at: usize, v: &[u8]| {
            let mut h = header(1 << 30, None);
            h[at..at + v.len()].copy_from_slice(v);
            parse_header(&h)
        };
        assert!(matches!(with(0, b"QFI\0"), Err(MapError::Invalid(_))));
        assert!(matches!(
            with(4, &1u32.to_be_bytes()),
            Err(MapError::Unsupported(_))
        ));
        assert!(matches!(
            with(20, &12u32.to_be_bytes()),
            Err(MapError::Unsupported(_))
        ));
        assert!(matches!(
            with(20, &30u32.to_be_bytes()),
            Err(MapError::Invalid(_))
        ));
        assert!(matches!(
            with(32, &1u32.to_be_bytes()),
            Err(MapError::Unsupported(_))
        ));
        assert!(matches!(with(36, &1u32.to_be_bytes()), Err(MapError::Invalid(_))));
        assert!(matches!(
            with(40, &100u64.to_be_bytes()),
            Err(MapError::Invalid(_))
        ));
        for bit in [1u64, 2, 4, 5, 40] {
            assert!(
                matches!(
                    with(72, &(1u64 << bit).to_be_bytes()),
                    Err(MapError::Unsupported(_))
                ),
                "feature bit {bit}"
            );
        }
        assert!(with(72, &(INCOMPAT_DIRTY | INCOMPAT_COMPRESSION_TYPE).to_be_bytes()).is_ok());
        assert!(matches!(
            parse_header(&header(1 << 30, None)[..50]),
            Err(MapError::Truncated(_))
        ));
        // A backing name past the first cluster.
        let mut h = header(1 << 30, Some("x"));
        h[8..16].copy_from_slice(&65535u64.to_be_bytes());
        h[16..20].copy_from_slice(&4u32.to_be_bytes());
        assert!(matches!(parse_header(&h), Err(MapError::Invalid(_))));
    }

    #[test]
    fn decodes_l2_entries() {
        let h = parse_header(&header(1 << 30, None)).unwrap();
        let mut t = vec![0u8; 65536];
        t[8..16].copy_from_slice(&((1u64 << 63) | 0x30000).to_be_bytes());
        t[16..24].copy_from_slice(&1u64.to_be_bytes());
        t[24..32].copy_from_slice(&(0x40000u64 | 1).to_be_bytes());
        let m = l2_table(&t, &h).unwrap();
        assert_eq!(m.len(), 8192);
        assert_eq!(
            &m[..5],
            &[
                Mapping::Unallocated,
                Mapping::Data(0x30000),
                Mapping::Zero,
                Mapping::Zero,
                Mapping::Unallocated
            ]
        );
        t[32..40].copy_from_slice(&(1u64 << 62).to_be_bytes());
        assert!(matches!(l2_table(&t, &h), Err(MapError::Unsupported(_))));
        t[32..40].copy_from_slice(&0x1200u64.to_be_bytes());
        assert!(matches!(l2_table(&t, &h), Err(MapError::Invalid(_))));
        assert!(matches!(l2_table(&t[..100], &h), Err(MapError::Truncated(_))));
        let l1 = l1_table(&[0, 0, 0, 0, 0, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0], &h).unwrap();
        assert_eq!(l1, vec![0x30000, 0]);
    }

    proptest! {
        #[test]
        fn no_input_panics_and_offsets_are_aligned(bytes in proptest::collection::vec(any::<u8>(), 0..512), table in proptest::collection::vec(any::<u8>(), 0..1024)) {
            let mut head = bytes.clone();
            if head.len() >= 4 {
                head[..4].copy_from_slice(b"QFI\xfb");
            }
            if let Ok(h) = parse_header(&head) {
                prop_assert!(h.cluster_bits >= MIN_CLUSTER_BITS && h.l1_offset % h.cluster_size() == 0);
                prop_assert!(h.l1_bytes() <= MAX_L1_BYTES);
                if let Ok(l1) = l1_table(&table, &h) {
                    prop_assert!(l1.iter().all(|o| o % h.cluster_size() == 0));
                }
                if let Ok(l2) = l2_table(&table, &h) {
                    let aligned = l2.iter().all(|m| match m {
                        Mapping::Data(o) => o % h.cluster_size() == 0 && *o < 1 << 56,
                        _ => true,
                    });
                    prop_assert!(aligned);
                }
            }
            let _ = backing_name(&bytes);
        }
    }
}
