//! VHD: dynamic disks carry a footer copy (`conectix`) at offset 0, which must have a valid
//! checksum and must not describe a differencing disk; a footer must end the file too. Fixed
//! disks look raw from the head and are recognised by their footer in the last 512 bytes.
//! Virtual size: the footer's current size.
//!
//! Invariants: a footer counts only with a valid checksum; a differencing disk (which would make
//! a hypervisor open a parent file) is refused wherever its footer is; a fixed disk's data must
//! hold the size its footer declares.

use super::{ImageFormat, InspectError, Inspector, be32, be64};

pub(super) const VHD_FOOTER_LEN: usize = 512;
pub(super) const VHD_COOKIE: &[u8] = b"conectix";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum VhdType {
    Fixed,
    Dynamic,
}

#[derive(Debug, Clone, Copy)]
pub(super) struct VhdFooter {
    pub(super) disk_type: VhdType,
    pub(super) current_size: u64,
}

/// One's complement of the byte sum of the footer, its checksum field (64..68) excluded.
pub(super) fn vhd_checksum_ok(footer: &[u8]) -> bool {
    let Some(stored) = be32(footer, 64) else {
        return false;
    };
    let sum = footer
        .iter()
        .enumerate()
        .filter(|(i, _)| !(64..68).contains(i))
        .fold(0u32, |sum, (_, b)| sum.wrapping_add(u32::from(*b)));
    !sum == stored
}

/// Parses a 512-byte VHD footer whose cookie the caller has checked.
pub(super) fn vhd_footer(footer: &[u8]) -> Result<VhdFooter, InspectError> {
    if footer.len() != VHD_FOOTER_LEN || !footer.starts_with(VHD_COOKIE) {
        return Err(InspectError::VhdBadFooter("no conectix cookie"));
    }
    if !vhd_checksum_ok(footer) {
        return Err(InspectError::VhdBadFooter("checksum mismatch"));
    }
    let disk_type = match be32(footer, 60) {
        Some(2) => VhdType::Fixed,
        Some(3) => VhdType::Dynamic,
        Some(4) => return Err(InspectError::VhdDifferencing),
        _ => return Err(InspectError::VhdBadFooter("unknown disk type")),
    };
    let current_size = be64(footer, 48).ok_or(InspectError::VhdBadFooter("too short"))?;
    Ok(VhdFooter {
        disk_type,
        current_size,
    })
}

impl Inspector {
    /// A declared VHD with a raw-looking head: its size, from the footer that must end the file.
    pub(super) fn fixed_vhd_size(&self) -> Result<u64, InspectError> {
        let raw = InspectError::Mismatch {
            declared: ImageFormat::Vhd,
            detected: ImageFormat::Raw,
        };
        if self.tail.len() < VHD_FOOTER_LEN || !self.tail.starts_with(VHD_COOKIE) {
            return Err(raw);
        }
        let footer = vhd_footer(&self.tail)?;
        if footer.disk_type != VhdType::Fixed {
            return Err(InspectError::VhdBadFooter(
                "a dynamic disk without the footer copy at the start",
            ));
        }
        let data_len = self.total - VHD_FOOTER_LEN as u64;
        if footer.current_size > data_len {
            return Err(InspectError::Truncated);
        }
        Ok(footer.current_size)
    }
}

#[cfg(test)]
mod tests {
    use crate::testutil::*;
    use crate::*;

    #[test]
    fn vhd_fixed_is_recognised_by_its_footer() {
        let img = vhd_fixed(40_960);
        let len = img.len();
        assert_eq!(inspect(ImageFormat::Vhd, &img), ok(ImageFormat::Vhd, 40_960, len));
        // Declared RAW, the footer gives it away.
        assert_eq!(
            inspect(ImageFormat::Raw, &img),
            mismatch(ImageFormat::Raw, ImageFormat::Vhd)
        );
        // Short fixed VHD (smaller than the ISO probe).
        let img = vhd_fixed(1024);
        assert_eq!(inspect(ImageFormat::Vhd, &img), ok(ImageFormat::Vhd, 1024, 1536));
        // Missing data.
        let mut img = vhd_fixed(1024);
        img.drain(..512);
        assert_eq!(inspect(ImageFormat::Vhd, &img), Err(InspectError::Truncated));
    }

    #[test]
    fn vhd_dynamic_and_differencing() {
        let img = vhd_dynamic(3, 8 << 30);
        let len = img.len();
        assert_eq!(
            inspect(ImageFormat::Vhd, &img),
            ok(ImageFormat::Vhd, 8 << 30, len)
        );
        assert_eq!(
            inspect(ImageFormat::Raw, &img),
            mismatch(ImageFormat::Raw, ImageFormat::Vhd)
        );
        let img = vhd_dynamic(4, 8 << 30);
        assert_eq!(
            inspect(ImageFormat::Vhd, &img),
            Err(InspectError::VhdDifferencing)
        );
        assert_eq!(fails_after(ImageFormat::Vhd, &img), Some(512));
        // Differencing disk with only a footer at the end.
        let mut img = raw(40_000);
        img.extend(vhd_footer_block(4, 40_000));
        assert_eq!(
            inspect(ImageFormat::Vhd, &img),
            Err(InspectError::VhdDifferencing)
        );
        // Dynamic footer only at the end.
        let mut img = raw(40_000);
        img.extend(vhd_footer_block(3, 40_000));
        assert!(matches!(
            inspect(ImageFormat::Vhd, &img),
            Err(InspectError::VhdBadFooter(_))
        ));
        // Truncated: the final footer is missing.
        let img = vhd_dynamic(3, 1 << 30);
        assert_eq!(
            inspect(ImageFormat::Vhd, &img[..2048]),
            Err(InspectError::Truncated)
        );
        assert_eq!(
            inspect(ImageFormat::Vhd, &img[..100]),
            Err(InspectError::Truncated)
        );
    }

    #[test]
    fn vhd_bad_checksum() {
        let mut img = vhd_dynamic(3, 1 << 30);
        img[50] ^= 1;
        assert_eq!(
            inspect(ImageFormat::Vhd, &img),
            Err(InspectError::VhdBadFooter("checksum mismatch"))
        );
        let mut img = vhd_fixed(4096);
        let at = img.len() - 500;
        img[at] ^= 1;
        assert_eq!(
            inspect(ImageFormat::Vhd, &img),
            Err(InspectError::VhdBadFooter("checksum mismatch"))
        );
        // Raw declared, bogus footer: just raw data.
        let len = img.len();
        assert_eq!(
            inspect(ImageFormat::Raw, &img),
            ok(ImageFormat::Raw, len as u64, len)
        );
    }

    #[test]
    fn qemu_img_vhd() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        qemu_img(d, &["create", "-q", "-f", "vpc", "dyn.vhd", "64M"]);
        let want = qemu_virtual_size(d, "dyn.vhd", "vpc");
        let len = std::fs::metadata(d.join("dyn.vhd")).unwrap().len();
        assert_eq!(
            inspect_file(ImageFormat::Vhd, &d.join("dyn.vhd")),
            Ok(Inspection {
                format: ImageFormat::Vhd,
                virtual_size: want,
                physical_size: len
            })
        );
        assert_eq!(
            inspect_file(ImageFormat::Qcow2, &d.join("dyn.vhd")),
            mismatch(ImageFormat::Qcow2, ImageFormat::Vhd)
        );

        qemu_img(
            d,
            &[
                "create",
                "-q",
                "-f",
                "vpc",
                "-o",
                "subformat=fixed",
                "fixed.vhd",
                "64M",
            ],
        );
        let want = qemu_virtual_size(d, "fixed.vhd", "vpc");
        let len = std::fs::metadata(d.join("fixed.vhd")).unwrap().len();
        assert_eq!(
            inspect_file(ImageFormat::Vhd, &d.join("fixed.vhd")),
            Ok(Inspection {
                format: ImageFormat::Vhd,
                virtual_size: want,
                physical_size: len
            })
        );
        assert_eq!(
            inspect_file(ImageFormat::Raw, &d.join("fixed.vhd")),
            mismatch(ImageFormat::Raw, ImageFormat::Vhd)
        );

        qemu_img(d, &["create", "-q", "-f", "raw", "disk.raw", "1M"]);
        assert_eq!(
            inspect_file(ImageFormat::Raw, &d.join("disk.raw")).map(|i| i.virtual_size),
            Ok(1 << 20)
        );
        assert_eq!(
            inspect_file(ImageFormat::Vhd, &d.join("disk.raw")),
            mismatch(ImageFormat::Vhd, ImageFormat::Raw)
        );
    }
}
