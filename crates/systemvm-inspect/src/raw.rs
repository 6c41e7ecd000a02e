//! RAW: anything that carries no known signature (a fixed VHD's footer at the end counts as a
//! signature). Virtual size: the file size.
//!
//! Invariant: a stream that ends with a valid VHD footer is a VHD, not RAW, so a VHD is never
//! installed as a raw disk whose last sector a guest would see as data.

use super::vhd::{VHD_COOKIE, VHD_FOOTER_LEN, vhd_checksum_ok};
use super::{ImageFormat, InspectError, Inspector};

impl Inspector {
    /// A declared RAW image at its end: its size, unless the last 512 bytes are a VHD footer.
    pub(super) fn raw_size(&self) -> Result<u64, InspectError> {
        if self.tail.len() == VHD_FOOTER_LEN
            && self.tail.starts_with(VHD_COOKIE)
            && vhd_checksum_ok(&self.tail)
        {
            return Err(InspectError::Mismatch {
                declared: self.declared,
                detected: ImageFormat::Vhd,
            });
        }
        Ok(self.total)
    }
}

#[cfg(test)]
mod tests {
    use crate::testutil::*;
    use crate::*;

    #[test]
    fn raw_images() {
        let img = raw(100_000);
        assert_eq!(
            inspect(ImageFormat::Raw, &img),
            ok(ImageFormat::Raw, 100_000, 100_000)
        );
        assert_eq!(
            inspect(ImageFormat::Raw, &img[..10]),
            ok(ImageFormat::Raw, 10, 10)
        );
        for declared in [
            ImageFormat::Qcow2,
            ImageFormat::Iso,
            ImageFormat::Ova,
            ImageFormat::Vhd,
        ] {
            assert_eq!(inspect(declared, &img), mismatch(declared, ImageFormat::Raw));
        }
        assert_eq!(fails_after(ImageFormat::Iso, &img), Some(ISO_PROBE_LEN));
        for declared in ImageFormat::ALL {
            assert_eq!(inspect(declared, b""), Err(InspectError::Empty));
        }
    }
}
