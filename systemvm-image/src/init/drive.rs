//! Finding the NoCloud config drive: the block device holding an ISO 9660 volume labelled
//! `cidata` (a CD-ROM, or a virtio disk), recognised by its primary volume descriptor.
//!
//! Invariants: only the 2 KiB descriptor is read to decide; a device that cannot be read is
//! skipped, never an error.

use std::io::{Read as _, Seek as _, SeekFrom};
use std::path::{Path, PathBuf};

/// The label core gives the drive.
pub const LABEL: &str = "cidata";

/// Whether `sector16` (the 2 KiB at byte 32768 of a volume) is an ISO 9660 primary volume
/// descriptor whose volume id is `label`.
pub fn is_iso_labelled(sector16: &[u8], label: &str) -> bool {
    if sector16.len() < 72 || sector16[0] != 1 || &sector16[1..6] != b"CD001" {
        return false;
    }
    let id = &sector16[40..72];
    let text = String::from_utf8_lossy(id);
    text.trim_end_matches([' ', '\0']) == label
}

/// The block device under `/dev` labelled [`LABEL`], if one is present now.
pub fn find() -> Option<PathBuf> {
    let names = std::fs::read_dir("/sys/class/block").ok()?;
    let mut names: Vec<String> = names
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("sr") || n.starts_with("vd") || n.starts_with("sd"))
        .collect();
    names.sort();
    names
        .into_iter()
        .map(|n| Path::new("/dev").join(n))
        .find(|dev| read_sector16(dev).is_some_and(|s| is_iso_labelled(&s, LABEL)))
}

fn read_sector16(dev: &Path) -> Option<Vec<u8>> {
    let mut f = std::fs::File::open(dev).ok()?;
    f.seek(SeekFrom::Start(16 * 2048)).ok()?;
    let mut buf = vec![0u8; 2048];
    f.read_exact(&mut buf).ok()?;
    Some(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_the_descriptor() {
        let mut s = vec![0u8; 2048];
        s[0] = 1;
        s[1..6].copy_from_slice(b"CD001");
        s[40..72].copy_from_slice(format!("{:<32}", "cidata").as_bytes());
        assert!(is_iso_labelled(&s, "cidata"));
        assert!(!is_iso_labelled(&s, "other"));
        s[1] = b'X';
        assert!(!is_iso_labelled(&s, "cidata"));
        assert!(!is_iso_labelled(&[1, b'C'], "cidata"));
    }
}
