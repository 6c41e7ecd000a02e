//! The QCOW2 mapping decoder the storage VM reads snapshot chains and volumes with
//! (`systemvm_inspect::qcow2_map`) on arbitrary headers and tables: no panics, and what it
//! accepts holds its promises (cluster-aligned offsets, bounded L1, names inside the header).
//!
//! Input: two bytes giving the header's length, the header (after the `QFI\xfb` signature, which
//! is prepended so the fields are reached), then the table bytes (read as L1 and as L2).
#![no_main]

use libfuzzer_sys::fuzz_target;
use systemvm_inspect::qcow2_map::{self, Mapping};

fuzz_target!(|input: &[u8]| {
    let Some((len, rest)) = input.split_at_checked(2) else {
        return;
    };
    let n = usize::from(u16::from_be_bytes([len[0], len[1]])).min(rest.len());
    let (head, table) = rest.split_at(n);
    let mut bytes = b"QFI\xfb".to_vec();
    bytes.extend_from_slice(head);
    let Ok(h) = qcow2_map::parse_header(&bytes) else {
        return;
    };
    let cluster = h.cluster_size();
    assert!(h.l1_offset % cluster == 0 && h.l1_bytes() <= qcow2_map::MAX_L1_BYTES);
    if let Some((at, len)) = h.backing {
        assert!(at + u64::from(len) <= cluster && len <= qcow2_map::MAX_BACKING_NAME);
        if let Some(name) = bytes.get(at as usize..(at + u64::from(len)) as usize) {
            let _ = qcow2_map::backing_name(name);
        }
    }
    if let Ok(l1) = qcow2_map::l1_table(table, &h) {
        assert!(l1.iter().all(|o| o % cluster == 0));
    }
    if let Ok(l2) = qcow2_map::l2_table(table, &h) {
        assert!(l2.iter().all(|m| match m {
            Mapping::Data(o) => o % cluster == 0 && *o < 1 << 56,
            _ => true,
        }));
    }
});
