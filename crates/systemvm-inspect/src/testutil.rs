//! Test helpers of the inspector: running it over any chunking, verdict shorthands, builders of
//! every format (QCOW2 and VHD headers, ISO, raw noise, ustar archives, OVAs) and qemu-img.

use super::*;

pub(super) const CHUNKS: [usize; 4] = [1, 7, 4096, usize::MAX];

pub(super) fn run(declared: ImageFormat, data: &[u8], chunk: usize) -> Result<Inspection, InspectError> {
    let mut inspector = Inspector::new(declared);
    for piece in data.chunks(chunk.clamp(1, data.len().max(1))) {
        inspector.update(piece)?;
    }
    inspector.finish()
}

/// Runs with every chunk size of [`CHUNKS`], checks they agree, and returns the verdict.
pub(super) fn inspect(declared: ImageFormat, data: &[u8]) -> Result<Inspection, InspectError> {
    let whole = run(declared, data, usize::MAX);
    for chunk in CHUNKS {
        assert_eq!(run(declared, data, chunk), whole, "chunk size {chunk}");
    }
    whole
}

pub(super) fn ok(
    format: ImageFormat,
    virtual_size: u64,
    physical_size: usize,
) -> Result<Inspection, InspectError> {
    Ok(Inspection {
        format,
        virtual_size,
        physical_size: physical_size as u64,
    })
}

pub(super) fn mismatch(declared: ImageFormat, detected: ImageFormat) -> Result<Inspection, InspectError> {
    Err(InspectError::Mismatch { declared, detected })
}

/// The number of leading bytes after which `update` first fails, if it does.
pub(super) fn fails_after(declared: ImageFormat, data: &[u8]) -> Option<usize> {
    let mut inspector = Inspector::new(declared);
    for (i, byte) in data.iter().enumerate() {
        if inspector.update(std::slice::from_ref(byte)).is_err() {
            return Some(i + 1);
        }
    }
    None
}

// ---- builders -------------------------------------------------------------------------

pub(super) fn qcow2(version: u32, backing_file_offset: u64, features: u64, size: u64) -> Vec<u8> {
    let mut h = vec![0u8; 4096];
    h[0..4].copy_from_slice(b"QFI\xfb");
    h[4..8].copy_from_slice(&version.to_be_bytes());
    h[8..16].copy_from_slice(&backing_file_offset.to_be_bytes());
    if backing_file_offset != 0 {
        h[16..20].copy_from_slice(&9u32.to_be_bytes());
        h[512..521].copy_from_slice(b"base.img\0");
    }
    h[20..24].copy_from_slice(&16u32.to_be_bytes());
    h[24..32].copy_from_slice(&size.to_be_bytes());
    h[36..40].copy_from_slice(&1u32.to_be_bytes());
    h[40..48].copy_from_slice(&0x30000u64.to_be_bytes());
    h[48..56].copy_from_slice(&0x10000u64.to_be_bytes());
    h[56..60].copy_from_slice(&1u32.to_be_bytes());
    if version == 3 {
        h[72..80].copy_from_slice(&features.to_be_bytes());
        h[96..100].copy_from_slice(&4u32.to_be_bytes());
        h[100..104].copy_from_slice(&112u32.to_be_bytes());
    }
    h
}

pub(super) fn vhd_footer_block(disk_type: u32, size: u64) -> Vec<u8> {
    let mut f = vec![0u8; 512];
    f[0..8].copy_from_slice(b"conectix");
    f[8..12].copy_from_slice(&2u32.to_be_bytes());
    f[12..16].copy_from_slice(&0x0001_0000u32.to_be_bytes());
    let data_offset = if disk_type == 2 { u64::MAX } else { 512 };
    f[16..24].copy_from_slice(&data_offset.to_be_bytes());
    f[28..32].copy_from_slice(b"test");
    f[40..48].copy_from_slice(&size.to_be_bytes());
    f[48..56].copy_from_slice(&size.to_be_bytes());
    f[60..64].copy_from_slice(&disk_type.to_be_bytes());
    let sum = f.iter().fold(0u32, |s, b| s.wrapping_add(u32::from(*b)));
    f[64..68].copy_from_slice(&(!sum).to_be_bytes());
    f
}

pub(super) fn vhd_fixed(size: u64) -> Vec<u8> {
    let mut v: Vec<u8> = (0..size).map(|i| (i % 251) as u8 | 1).collect();
    v.extend(vhd_footer_block(2, size));
    v
}

pub(super) fn vhd_dynamic(disk_type: u32, size: u64) -> Vec<u8> {
    let footer = vhd_footer_block(disk_type, size);
    let mut v = footer.clone();
    let mut header = vec![0u8; 1024];
    header[0..8].copy_from_slice(b"cxsparse");
    v.extend(header);
    v.extend(vec![0xffu8; 512]); // BAT: every block unallocated
    v.extend(footer);
    v
}

pub(super) fn iso(len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    v[0x8000] = 1;
    v[0x8001..0x8006].copy_from_slice(b"CD001");
    v[0x8006] = 1;
    v
}

pub(super) fn raw(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 31 % 253) as u8).collect()
}

pub(super) fn tar_header(name: &str, size: u64, typeflag: u8) -> Vec<u8> {
    let mut h = vec![0u8; 512];
    h[..name.len()].copy_from_slice(name.as_bytes());
    h[100..108].copy_from_slice(b"0000644\0");
    h[108..116].copy_from_slice(b"0000000\0");
    h[116..124].copy_from_slice(b"0000000\0");
    h[124..136].copy_from_slice(format!("{size:011o}\0").as_bytes());
    h[136..148].copy_from_slice(b"00000000000\0");
    h[156] = typeflag;
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    h[148..156].copy_from_slice(b"        ");
    let sum: u32 = h.iter().map(|b| u32::from(*b)).sum();
    h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    h
}

pub(super) fn tar_entry(tar: &mut Vec<u8>, name: &str, typeflag: u8, body: &[u8]) {
    tar.extend(tar_header(name, body.len() as u64, typeflag));
    tar.extend_from_slice(body);
    tar.resize(tar.len().div_ceil(512) * 512, 0);
}

pub(super) fn tar_end(tar: &mut Vec<u8>) {
    tar.extend(vec![0u8; 1024]);
}

pub(super) const OVF: &str = r#"<?xml version="1.0" encoding="UTF-8"?>
<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1" xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1">
  <References>
<File ovf:href="disk1.vmdk" ovf:id="file1" ovf:size="1000"/>
<File ovf:href="disk2.vmdk" ovf:id="file2" ovf:size="600"/>
  </References>
  <DiskSection>
<Info>Virtual disk information</Info>
<Disk ovf:capacity="8" ovf:capacityAllocationUnits="byte * 2^30" ovf:diskId="vmdisk1" ovf:fileRef="file1" ovf:format="http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized"/>
<Disk ovf:capacity="512" ovf:capacityAllocationUnits="byte * 2^20" ovf:diskId="vmdisk2" ovf:fileRef="file2"></Disk>
  </DiskSection>
  <VirtualSystem ovf:id="vm">
<Info>A virtual machine</Info>
<Disk ovf:capacity="999999"/>
  </VirtualSystem>
</Envelope>
"#;
pub(super) const OVF_SIZE: u64 = 8 * (1 << 30) + 512 * (1 << 20);

pub(super) fn ova_with(ovf: &str) -> Vec<u8> {
    let mut tar = Vec::new();
    tar_entry(&mut tar, "appliance.ovf", b'0', ovf.as_bytes());
    tar_entry(&mut tar, "disk1.vmdk", b'0', &raw(1000));
    tar_entry(&mut tar, "disk2.vmdk", b'0', &raw(600));
    tar_end(&mut tar);
    tar
}

pub(super) fn ova() -> Vec<u8> {
    ova_with(OVF)
}

pub(super) const MF: &[u8] = b"SHA256(x.ovf)= 0123\nSHA256(disk1.vmdk)= 4567\n";

/// Runs qemu-img (required on the test machine) in `dir`.
pub(super) fn qemu_img(dir: &std::path::Path, args: &[&str]) {
    let status = std::process::Command::new("qemu-img")
        .args(args)
        .current_dir(dir)
        .stdout(std::process::Stdio::null())
        .status()
        .expect("qemu-img must be installed to run this test");
    assert!(status.success(), "qemu-img {args:?}");
}

pub(super) fn qemu_virtual_size(dir: &std::path::Path, file: &str, format: &str) -> u64 {
    let out = std::process::Command::new("qemu-img")
        .args(["info", "--output=json", "-f", format, file])
        .current_dir(dir)
        .output()
        .expect("qemu-img must be installed to run this test");
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    info["virtual-size"].as_u64().unwrap()
}

pub(super) fn inspect_file(
    declared: ImageFormat,
    path: &std::path::Path,
) -> Result<Inspection, InspectError> {
    let data = std::fs::read(path).unwrap();
    let mut inspector = Inspector::new(declared);
    for chunk in data.chunks(65_536) {
        inspector.update(chunk)?;
    }
    inspector.finish()
}

/// Valid samples of every format, for mutation.
pub(super) fn samples() -> Vec<Vec<u8>> {
    vec![
        qcow2(2, 0, 0, 1 << 30),
        qcow2(3, 0, 0, 1 << 30),
        vhd_dynamic(3, 1 << 30),
        vhd_fixed(2048),
        iso(ISO_PROBE_LEN + 10),
        ova(),
        raw(600),
        ova_descriptor_last(),
    ]
}

/// An OVA as `tar cf x.ova *` makes it: disk, manifest, then the descriptor.
pub(super) fn ova_descriptor_last() -> Vec<u8> {
    let mut tar = Vec::new();
    tar_entry(&mut tar, "disk1.vmdk", b'0', &raw(700));
    tar_entry(&mut tar, "x.mf", b'0', MF);
    tar_entry(&mut tar, "x.ovf", b'0', OVF.as_bytes());
    tar_end(&mut tar);
    tar
}

pub(super) fn chunked(data: Vec<u8>, cuts: Vec<usize>) -> Vec<Vec<u8>> {
    let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % (data.len() + 1)).collect();
    cuts.sort_unstable();
    let mut pieces = Vec::new();
    let mut start = 0;
    for cut in cuts.into_iter().chain([data.len()]) {
        pieces.push(data[start..cut].to_vec());
        start = cut;
    }
    pieces
}

pub(super) fn run_pieces(declared: ImageFormat, pieces: &[Vec<u8>]) -> Result<Inspection, InspectError> {
    let mut inspector = Inspector::new(declared);
    for piece in pieces {
        inspector.update(piece)?;
    }
    inspector.finish()
}
