//! The image format inspector of ssvm-agent (qcow2, VHD, ISO 9660, OVA/tar, OVF) on arbitrary
//! bytes cut into arbitrary chunks: no panics, and the verdict does not depend on the chunking.
//!
//! Input: a selector byte (declared format; the top bit wraps the rest as the `.ovf` entry of a
//! tar, so the OVF descriptor parser is reached too), a count byte, that many chunk-size bytes,
//! then the image.
#![no_main]

use libfuzzer_sys::fuzz_target;
use systemvm_inspect::{ImageFormat, InspectError, Inspection, Inspector, detect, probe};

/// Feeds `data` in chunks whose sizes cycle through `cuts` (one chunk when empty).
fn verdict(format: ImageFormat, data: &[u8], cuts: &[u8]) -> Result<Inspection, InspectError> {
    let mut inspector = Inspector::new(format);
    let mut rest = data;
    let mut k = 0;
    while !rest.is_empty() {
        let n = match cuts.get(k % cuts.len().max(1)) {
            Some(&c) => (usize::from(c) * 131 % 2053 + 1).min(rest.len()),
            None => rest.len(),
        };
        k += 1;
        let (chunk, tail) = rest.split_at(n);
        rest = tail;
        if inspector.update(chunk).is_err() {
            // Sticky: `finish` reports it again.
            break;
        }
    }
    inspector.finish()
}

/// A ustar archive holding `body` as `disk.ovf`.
fn tar_with_ovf(body: &[u8]) -> Vec<u8> {
    let mut header = [0u8; 512];
    header[..8].copy_from_slice(b"disk.ovf");
    header[100..107].copy_from_slice(b"0000644");
    header[108..115].copy_from_slice(b"0000000");
    header[116..123].copy_from_slice(b"0000000");
    header[124..135].copy_from_slice(format!("{:011o}", body.len()).as_bytes());
    header[136..147].copy_from_slice(b"00000000000");
    header[156] = b'0';
    header[257..263].copy_from_slice(b"ustar\0");
    header[263..265].copy_from_slice(b"00");
    header[148..156].copy_from_slice(b"        ");
    let sum: u32 = header.iter().map(|&b| u32::from(b)).sum();
    header[148..155].copy_from_slice(format!("{sum:06o}\0").as_bytes());
    let mut out = header.to_vec();
    out.extend_from_slice(body);
    out.resize(out.len().div_ceil(512) * 512 + 1024, 0);
    out
}

fuzz_target!(|input: &[u8]| {
    let Some((&selector, rest)) = input.split_first() else {
        return;
    };
    let Some((&count, rest)) = rest.split_first() else {
        return;
    };
    let (cuts, image) = rest.split_at(usize::from(count % 16).min(rest.len()));
    let format = ImageFormat::ALL[usize::from(selector & 0x7f) % ImageFormat::ALL.len()];
    let data = if selector & 0x80 != 0 {
        tar_with_ovf(image)
    } else {
        image.to_vec()
    };
    let _ = probe(&data, true);
    let _ = probe(&data, false);
    let _ = detect(&data);
    let whole = verdict(format, &data, &[]);
    let chunked = verdict(format, &data, cuts);
    assert_eq!(whole, chunked, "the verdict depends on the chunking ({cuts:?})");
    if let Ok(inspection) = &whole {
        assert_eq!(inspection.physical_size, data.len() as u64);
    }
});
