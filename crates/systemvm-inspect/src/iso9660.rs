//! ISO 9660: the primary volume descriptor's `CD001` at 0x8001. Virtual size: the file size.
//!
//! Invariant: the first [`ISO_PROBE_LEN`] bytes decide between ISO and RAW; nothing shorter is
//! an ISO.

/// How many leading bytes decide between ISO 9660 and RAW (`CD001` at 0x8001).
pub const ISO_PROBE_LEN: usize = ISO_MAGIC_OFFSET + ISO_MAGIC.len();
pub(super) const ISO_MAGIC_OFFSET: usize = 0x8001;
pub(super) const ISO_MAGIC: &[u8] = b"CD001";

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::*;
    use crate::*;

    #[test]
    fn iso_is_detected_at_0x8001() {
        let img = iso(40_000);
        assert_eq!(
            inspect(ImageFormat::Iso, &img),
            ok(ImageFormat::Iso, 40_000, 40_000)
        );
        for declared in [
            ImageFormat::Raw,
            ImageFormat::Qcow2,
            ImageFormat::Vhd,
            ImageFormat::Ova,
        ] {
            assert_eq!(inspect(declared, &img), mismatch(declared, ImageFormat::Iso));
            assert_eq!(fails_after(declared, &img), Some(ISO_PROBE_LEN));
        }
        // Too short to hold the descriptor: raw.
        assert_eq!(
            inspect(ImageFormat::Iso, &iso(40_000)[..ISO_PROBE_LEN - 1]),
            mismatch(ImageFormat::Iso, ImageFormat::Raw)
        );
    }
}
