//! QCOW2 (`QFI\xfb`): the header checks. Version 2 or 3, no backing file, cluster size 512 B to
//! 2 MiB, not encrypted; version 3: header length ≥ 104, no external data file, not marked
//! corrupt, no incompatible feature unknown to us (only dirty, compression type and extended L2
//! pass). Virtual size: the header's `size`.
//!
//! Invariants: a header is judged on the bytes of it that have arrived: an error as soon as a
//! field that decides it is in, the size only once the whole header is in and accepted; a QCOW2
//! image never reaches a hypervisor with a way to read another file of the host (backing file,
//! external data file).

use super::{InspectError, be32, be64};

/// Incompatible feature bits of QCOW2 v3.
const QCOW2_INCOMPAT_DIRTY: u64 = 1 << 0;
const QCOW2_INCOMPAT_CORRUPT: u64 = 1 << 1;
const QCOW2_INCOMPAT_DATA_FILE: u64 = 1 << 2;
const QCOW2_INCOMPAT_COMPRESSION_TYPE: u64 = 1 << 3;
const QCOW2_INCOMPAT_EXTENDED_L2: u64 = 1 << 4;
/// Every bit this agent knows; of them only dirty, compression type and extended L2 pass.
const QCOW2_INCOMPAT_KNOWN: u64 = QCOW2_INCOMPAT_DIRTY
    | QCOW2_INCOMPAT_CORRUPT
    | QCOW2_INCOMPAT_DATA_FILE
    | QCOW2_INCOMPAT_COMPRESSION_TYPE
    | QCOW2_INCOMPAT_EXTENDED_L2;

/// Validates a QCOW2 header as far as `head` goes: `Ok(None)` while more bytes are needed,
/// `Ok(Some(virtual size))` once the whole header is in and accepted.
pub(super) fn qcow2_header(head: &[u8]) -> Result<Option<u64>, InspectError> {
    let Some(version) = be32(head, 4) else {
        return Ok(None);
    };
    if version != 2 && version != 3 {
        return Err(InspectError::Qcow2BadHeader("unsupported version"));
    }
    let Some(backing_file_offset) = be64(head, 8) else {
        return Ok(None);
    };
    if backing_file_offset != 0 {
        return Err(InspectError::Qcow2BackingFile);
    }
    let Some(cluster_bits) = be32(head, 20) else {
        return Ok(None);
    };
    if !(9..=21).contains(&cluster_bits) {
        return Err(InspectError::Qcow2BadHeader("cluster size out of range"));
    }
    let (Some(size), Some(crypt_method)) = (be64(head, 24), be32(head, 32)) else {
        return Ok(None);
    };
    if crypt_method != 0 {
        return Err(InspectError::Qcow2Encrypted(crypt_method));
    }
    if version == 2 {
        // The version 2 header is 72 bytes long.
        return Ok((head.len() >= 72).then_some(size));
    }
    let Some(features) = be64(head, 72) else {
        return Ok(None);
    };
    if features & QCOW2_INCOMPAT_DATA_FILE != 0 {
        return Err(InspectError::Qcow2ExternalDataFile);
    }
    if features & QCOW2_INCOMPAT_CORRUPT != 0 {
        return Err(InspectError::Qcow2Corrupt);
    }
    let unknown = features & !QCOW2_INCOMPAT_KNOWN;
    if unknown != 0 {
        return Err(InspectError::Qcow2UnsupportedFeatures(unknown));
    }
    let Some(header_length) = be32(head, 100) else {
        return Ok(None);
    };
    if header_length < 104 {
        return Err(InspectError::Qcow2BadHeader("header length below 104 bytes"));
    }
    Ok(Some(size))
}

#[cfg(test)]
mod tests {
    use crate::testutil::*;
    use crate::*;

    #[test]
    fn qcow2_v2_and_v3_are_accepted() {
        let img = qcow2(2, 0, 0, 64 << 20);
        assert_eq!(
            inspect(ImageFormat::Qcow2, &img),
            ok(ImageFormat::Qcow2, 64 << 20, 4096)
        );
        let img = qcow2(3, 0, 0, 10 << 30);
        assert_eq!(
            inspect(ImageFormat::Qcow2, &img),
            ok(ImageFormat::Qcow2, 10 << 30, 4096)
        );
        // dirty, compression type and extended L2 are fine
        let img = qcow2(3, 0, 0b11001, 1 << 30);
        assert_eq!(
            inspect(ImageFormat::Qcow2, &img),
            ok(ImageFormat::Qcow2, 1 << 30, 4096)
        );
    }

    #[test]
    fn qcow2_refusals() {
        let q = ImageFormat::Qcow2;
        assert_eq!(
            inspect(q, &qcow2(2, 512, 0, 1 << 30)),
            Err(InspectError::Qcow2BackingFile)
        );
        assert_eq!(
            inspect(q, &qcow2(3, 512, 0, 1 << 30)),
            Err(InspectError::Qcow2BackingFile)
        );
        assert_eq!(
            inspect(q, &qcow2(3, 0, 1 << 2, 1 << 30)),
            Err(InspectError::Qcow2ExternalDataFile)
        );
        assert_eq!(
            inspect(q, &qcow2(3, 0, 1 << 1, 1 << 30)),
            Err(InspectError::Qcow2Corrupt)
        );
        assert_eq!(
            inspect(q, &qcow2(3, 0, 1 << 5 | 1, 1 << 30)),
            Err(InspectError::Qcow2UnsupportedFeatures(1 << 5))
        );
        assert_eq!(
            inspect(q, &qcow2(3, 0, 1 << 63, 1 << 30)),
            Err(InspectError::Qcow2UnsupportedFeatures(1 << 63))
        );
        assert!(matches!(
            inspect(q, &qcow2(1, 0, 0, 1)),
            Err(InspectError::Qcow2BadHeader(_))
        ));
        let mut img = qcow2(3, 0, 0, 1 << 30);
        img[20..24].copy_from_slice(&30u32.to_be_bytes());
        assert!(matches!(inspect(q, &img), Err(InspectError::Qcow2BadHeader(_))));
        let mut img = qcow2(3, 0, 0, 1 << 30);
        img[100..104].copy_from_slice(&72u32.to_be_bytes());
        assert!(matches!(inspect(q, &img), Err(InspectError::Qcow2BadHeader(_))));
        let mut img = qcow2(3, 0, 0, 1 << 30);
        img[32..36].copy_from_slice(&2u32.to_be_bytes());
        assert_eq!(inspect(q, &img), Err(InspectError::Qcow2Encrypted(2)));
        assert_eq!(
            inspect(q, &qcow2(3, 0, 0, 1)[..103]),
            Err(InspectError::Truncated)
        );
        assert_eq!(inspect(q, &qcow2(2, 0, 0, 1)[..71]), Err(InspectError::Truncated));
    }

    #[test]
    fn qcow2_errors_come_early() {
        let q = ImageFormat::Qcow2;
        assert_eq!(fails_after(q, &qcow2(3, 512, 0, 1 << 30)), Some(16));
        assert_eq!(fails_after(q, &qcow2(3, 0, 1 << 2, 1 << 30)), Some(80));
        let mut inspector = Inspector::new(q);
        assert_eq!(
            inspector.update(&qcow2(3, 512, 0, 1)),
            Err(InspectError::Qcow2BackingFile)
        );
        // sticky
        assert_eq!(inspector.update(b"more"), Err(InspectError::Qcow2BackingFile));
        assert_eq!(inspector.finish(), Err(InspectError::Qcow2BackingFile));
    }

    #[test]
    fn qcow2_declared_as_something_else() {
        let img = qcow2(3, 0, 0, 1 << 30);
        for declared in [
            ImageFormat::Raw,
            ImageFormat::Vhd,
            ImageFormat::Iso,
            ImageFormat::Ova,
        ] {
            assert_eq!(inspect(declared, &img), mismatch(declared, ImageFormat::Qcow2));
            assert_eq!(fails_after(declared, &img), Some(4));
        }
    }

    #[test]
    fn qemu_img_qcow2() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        qemu_img(d, &["create", "-q", "-f", "qcow2", "x.qcow2", "64M"]);
        let len = std::fs::metadata(d.join("x.qcow2")).unwrap().len();
        assert_eq!(
            inspect_file(ImageFormat::Qcow2, &d.join("x.qcow2")),
            Ok(Inspection {
                format: ImageFormat::Qcow2,
                virtual_size: 64 << 20,
                physical_size: len
            })
        );
        assert_eq!(
            inspect_file(ImageFormat::Raw, &d.join("x.qcow2")),
            mismatch(ImageFormat::Raw, ImageFormat::Qcow2)
        );
        qemu_img(
            d,
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                "compat=0.10",
                "v2.qcow2",
                "1G",
            ],
        );
        assert_eq!(
            inspect_file(ImageFormat::Qcow2, &d.join("v2.qcow2")).map(|i| i.virtual_size),
            Ok(1 << 30)
        );

        qemu_img(d, &["create", "-q", "-f", "qcow2", "base.qcow2", "64M"]);
        qemu_img(
            d,
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-b",
                "base.qcow2",
                "-F",
                "qcow2",
                "child.qcow2",
            ],
        );
        assert_eq!(
            inspect_file(ImageFormat::Qcow2, &d.join("child.qcow2")),
            Err(InspectError::Qcow2BackingFile)
        );

        qemu_img(
            d,
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                "data_file=data.raw",
                "ext.qcow2",
                "64M",
            ],
        );
        assert_eq!(
            inspect_file(ImageFormat::Qcow2, &d.join("ext.qcow2")),
            Err(InspectError::Qcow2ExternalDataFile)
        );
    }
}
