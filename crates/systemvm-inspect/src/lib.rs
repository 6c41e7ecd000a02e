//! Image format inspection in the download stream: QCOW2, RAW, VHD, ISO 9660 and OVA.
//!
//! Its own crate (used by ssvm-agent as `ssvm_agent::inspect`) so the inspector of untrusted
//! images builds, is property-tested and is fuzzed without the agent's I/O stack.
//!
//! [`Inspector`] is fed the (decompressed) image bytes in chunks of any size, checks that the
//! content is the format the template was registered with, refuses the images that would let
//! a hypervisor reach outside the file, and measures the virtual size that goes into
//! `template.properties`.
//!
//! Checks:
//! - QCOW2 (`QFI\xfb`): version 2 or 3, no backing file, cluster size 512 B to 2 MiB, not
//!   encrypted; version 3: header length ≥ 104, no external data file, not marked corrupt, no
//!   incompatible feature unknown to us (only dirty, compression type and extended L2 pass).
//!   Virtual size: the header's `size`.
//! - VHD: dynamic disks carry a footer copy (`conectix`) at offset 0, which must have a valid
//!   checksum and must not describe a differencing disk; a footer must end the file too. Fixed
//!   disks look raw from the head and are recognised by their footer in the last 512 bytes.
//!   Virtual size: the footer's current size.
//! - ISO 9660: `CD001` at 0x8001. Virtual size: the file size.
//! - OVA: a ustar archive holding exactly one `.ovf` descriptor (at most [`MAX_OVF_LEN`]
//!   bytes), at any position, as CloudStack's `OVAProcessor` finds it: the entries before it
//!   (manifest `.mf`, certificate `.cert`, disks, as `tar cf x.ova *` orders them) are skipped
//!   as they stream by, without being buffered. A second `.ovf` entry is refused, and so is an
//!   archive that ends without any. Links, devices and names that are absolute or contain `..`
//!   are refused wherever they appear. Virtual size: the sum of the `<Disk>` capacities of the
//!   descriptor's `DiskSection`.
//! - RAW: anything that carries no known signature (a fixed VHD's footer at the end counts as
//!   a signature). Virtual size: the file size.
//!
//! A stream that carries the signature of another format is a mismatch even when it also
//! matches the declared one (polyglots are refused), and images of formats CloudStack does
//! not register here (VMDK, VHDX, VDI, QED, LUKS) are refused whatever the declared format.
//!
//! [`qcow2_map`] decodes QCOW2 mapping tables (header, L1, L2) for the storage VM's snapshot
//! reader: there a backing file is part of the image.
//!
//! One module per format: `qcow2` (header checks), `vhd` (footers, fixed and dynamic disks),
//! `iso9660` (the volume descriptor signature), `raw` (what carries no signature), `ova` (the
//! streaming tar walk and the OVF descriptor); this module holds the format names, the errors,
//! the signature probe and the streaming [`Inspector`] that dispatches the bytes to them.
//!
//! Invariants:
//! - memory is bounded: the first [`HEAD_LEN`] bytes, the last 512, the OVF descriptor and at
//!   most 64 KiB of tar extended headers;
//! - every error is reported by the first `update` call whose bytes decide it (a format
//!   mismatch by at most [`ISO_PROBE_LEN`] bytes, except a fixed VHD or a RAW image, which
//!   is known only at the end; an OVA without descriptor at its end-of-archive block, or by
//!   `finish` when the stream has none), and is sticky: later calls and `finish` return it
//!   again;
//! - the verdict does not depend on how the stream is cut into chunks;
//! - no input makes the inspector panic.

#![forbid(unsafe_code)]

mod iso9660;
mod ova;
mod qcow2;
pub mod qcow2_map;
mod raw;
#[cfg(test)]
mod testutil;
mod vhd;

use std::fmt;
use std::str::FromStr;

pub use self::iso9660::ISO_PROBE_LEN;
use self::iso9660::{ISO_MAGIC, ISO_MAGIC_OFFSET};
pub use self::ova::MAX_OVF_LEN;
use self::ova::TarWalker;
use self::qcow2::qcow2_header;
use self::vhd::{VHD_COOKIE, VHD_FOOTER_LEN, VhdType, vhd_footer};

/// How many leading bytes the inspector keeps.
pub const HEAD_LEN: usize = 64 * 1024;

/// An image format CloudStack registers templates in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ImageFormat {
    /// QEMU copy-on-write v2/v3.
    Qcow2,
    /// Raw disk image.
    Raw,
    /// Microsoft VHD (fixed or dynamic).
    Vhd,
    /// ISO 9660 CD image.
    Iso,
    /// Open Virtual Appliance (tar with an OVF descriptor).
    Ova,
}

impl ImageFormat {
    /// Every format, in CloudStack's `Storage.ImageFormat` order.
    pub const ALL: [ImageFormat; 5] = [
        ImageFormat::Qcow2,
        ImageFormat::Raw,
        ImageFormat::Vhd,
        ImageFormat::Iso,
        ImageFormat::Ova,
    ];

    /// CloudStack's name: `QCOW2`, `RAW`, `VHD`, `ISO`, `OVA`.
    pub fn name(self) -> &'static str {
        match self {
            ImageFormat::Qcow2 => "QCOW2",
            ImageFormat::Raw => "RAW",
            ImageFormat::Vhd => "VHD",
            ImageFormat::Iso => "ISO",
            ImageFormat::Ova => "OVA",
        }
    }

    /// File extension of an installed image, CloudStack's `ImageFormat.getFileExtension()`:
    /// `qcow2`, `raw`, `vhd`, `iso`, `ova`.
    pub fn extension(self) -> &'static str {
        self.properties_key()
    }

    /// Prefix of the per-format keys of `template.properties` (`qcow2=true`,
    /// `qcow2.filename`, …): the lowercase name, which CloudStack also takes from
    /// `getFileExtension()`.
    pub fn properties_key(self) -> &'static str {
        match self {
            ImageFormat::Qcow2 => "qcow2",
            ImageFormat::Raw => "raw",
            ImageFormat::Vhd => "vhd",
            ImageFormat::Iso => "iso",
            ImageFormat::Ova => "ova",
        }
    }
}

impl fmt::Display for ImageFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A format name that is not one of [`ImageFormat`]'s.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown image format {0:?} (expected QCOW2, RAW, VHD, ISO or OVA)")]
pub struct UnknownImageFormat(pub String);

impl FromStr for ImageFormat {
    type Err = UnknownImageFormat;

    /// CloudStack names, case-insensitively.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ImageFormat::ALL
            .into_iter()
            .find(|f| f.name().eq_ignore_ascii_case(s.trim()))
            .ok_or_else(|| UnknownImageFormat(s.to_owned()))
    }
}

/// Why an image was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InspectError {
    /// The content is another CloudStack format than the declared one.
    #[error("declared format {declared} but the content is {detected}")]
    Mismatch {
        /// Format the template was registered with.
        declared: ImageFormat,
        /// Format found in the content.
        detected: ImageFormat,
    },
    /// The content is an image format this agent does not register (VMDK, VHDX, …).
    #[error("declared format {declared} but the content is {detected}")]
    ForeignFormat {
        /// Format the template was registered with.
        declared: ImageFormat,
        /// What was found, e.g. "a VMDK image".
        detected: &'static str,
    },
    /// No byte at all.
    #[error("the image is empty")]
    Empty,
    /// The stream ended inside a structure the format requires.
    #[error("the image is truncated")]
    Truncated,
    /// QCOW2 with a backing file (it would read another file of the host).
    #[error("qcow2 image refers to a backing file")]
    Qcow2BackingFile,
    /// QCOW2 whose data lives in an external file.
    #[error("qcow2 image uses an external data file")]
    Qcow2ExternalDataFile,
    /// QCOW2 with the corrupt bit set.
    #[error("qcow2 image is marked corrupt")]
    Qcow2Corrupt,
    /// QCOW2 with incompatible feature bits this agent does not know.
    #[error("qcow2 image has unknown incompatible features {0:#x}")]
    Qcow2UnsupportedFeatures(u64),
    /// Encrypted QCOW2 (method 1 AES, 2 LUKS).
    #[error("qcow2 image is encrypted (method {0})")]
    Qcow2Encrypted(u32),
    /// Malformed QCOW2 header.
    #[error("bad qcow2 header: {0}")]
    Qcow2BadHeader(&'static str),
    /// Differencing VHD (it has a parent disk).
    #[error("vhd image is a differencing disk with a parent")]
    VhdDifferencing,
    /// Malformed VHD footer.
    #[error("bad vhd footer: {0}")]
    VhdBadFooter(&'static str),
    /// The OVA archive ended (end-of-archive block or end of the stream) without any `.ovf`
    /// entry.
    #[error("ova archive has no ovf descriptor")]
    OvaNoDescriptor,
    /// The OVA holds a second `.ovf` entry (which one would be deployed is ambiguous).
    #[error("OVA has more than one descriptor")]
    OvaMultipleDescriptors,
    /// The OVF descriptor exceeds [`MAX_OVF_LEN`].
    #[error("ova descriptor is {size} bytes, more than the limit of {limit}")]
    OvaDescriptorTooLarge {
        /// Size in the tar header.
        size: u64,
        /// [`MAX_OVF_LEN`].
        limit: u64,
    },
    /// The OVF descriptor is not usable XML or declares no usable disk.
    #[error("bad ovf descriptor: {0}")]
    OvaBadDescriptor(String),
    /// The tar structure of the OVA is malformed or unsupported.
    #[error("bad ova archive: {0}")]
    OvaBadArchive(&'static str),
    /// An OVA entry that extraction must not create.
    #[error("ova entry {name:?} is refused: {reason}")]
    OvaUnsafeEntry {
        /// Entry name.
        name: String,
        /// Why it is refused.
        reason: &'static str,
    },
}

/// What an inspected image is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Inspection {
    /// The (declared and verified) format.
    pub format: ImageFormat,
    /// Size of the disk the image holds, in bytes (the file size for RAW and ISO, the sum of
    /// the disks for OVA).
    pub virtual_size: u64,
    /// Bytes inspected, i.e. the size of the image file.
    pub physical_size: u64,
}

/// What the head of a stream says about its format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probe {
    /// More bytes are needed.
    Undecided,
    /// One of the CloudStack formats. `Raw` includes fixed VHDs, which only their last 512
    /// bytes reveal.
    Format(ImageFormat),
    /// Another disk image format, e.g. "a VMDK image".
    Foreign(&'static str),
}

/// Signatures, in priority order: the first one that matches wins, and a signature that the
/// bytes seen so far neither confirm nor exclude keeps the probe undecided, which makes the
/// verdict independent of how much of the head is available.
const SIGNATURES: &[(usize, &[u8], Probe)] = &[
    (0, b"QFI\xfb", Probe::Format(ImageFormat::Qcow2)),
    (0, b"conectix", Probe::Format(ImageFormat::Vhd)),
    (0, b"KDMV", Probe::Foreign("a VMDK image")),
    (0, b"COWD", Probe::Foreign("a VMDK image")),
    (0, b"# Disk DescriptorFile", Probe::Foreign("a VMDK descriptor")),
    (0, b"vhdxfile", Probe::Foreign("a VHDX image")),
    (0, b"QED\0", Probe::Foreign("a QED image")),
    (0, b"LUKS\xba\xbe", Probe::Foreign("a LUKS volume")),
    (64, b"\x7f\x10\xda\xbe", Probe::Foreign("a VDI image")),
    (257, b"ustar", Probe::Format(ImageFormat::Ova)),
];

/// Probes the first bytes of an image. `complete` says that `head` is the whole image, which
/// makes the answer definitive (never [`Probe::Undecided`]).
pub fn probe(head: &[u8], complete: bool) -> Probe {
    for &(offset, magic, verdict) in SIGNATURES {
        let available = head.len().saturating_sub(offset).min(magic.len());
        let seen = head.get(offset..offset + available).unwrap_or_default();
        if seen != &magic[..available] {
            continue;
        }
        if available == magic.len() {
            return verdict;
        }
        if !complete {
            return Probe::Undecided;
        }
    }
    match head.get(ISO_MAGIC_OFFSET..ISO_PROBE_LEN) {
        Some(magic) if magic == ISO_MAGIC => Probe::Format(ImageFormat::Iso),
        Some(_) => Probe::Format(ImageFormat::Raw),
        None if complete => Probe::Format(ImageFormat::Raw),
        None => Probe::Undecided,
    }
}

/// The CloudStack format the first bytes of a stream show, if they decide it: `None` while
/// undecided (an ISO needs [`ISO_PROBE_LEN`] bytes) and for foreign formats. A fixed VHD is
/// reported as `Raw`.
pub fn detect(head: &[u8]) -> Option<ImageFormat> {
    match probe(head, false) {
        Probe::Format(format) => Some(format),
        Probe::Undecided | Probe::Foreign(_) => None,
    }
}

/// Streaming inspector of one image.
#[derive(Debug)]
pub struct Inspector {
    declared: ImageFormat,
    total: u64,
    /// The first `HEAD_LEN` bytes.
    head: Vec<u8>,
    /// The last `VHD_FOOTER_LEN` bytes.
    tail: Vec<u8>,
    stage: Stage,
    failed: Option<InspectError>,
}

#[derive(Debug)]
enum Stage {
    /// The head does not decide the format yet; `head` holds every byte seen.
    Probing,
    /// `virtual_size` once the header is validated.
    Qcow2 {
        virtual_size: Option<u64>,
    },
    /// Dynamic VHD; `virtual_size` once the footer copy at offset 0 is validated.
    VhdDynamic {
        virtual_size: Option<u64>,
    },
    /// Declared VHD with a raw-looking head: a fixed VHD if the footer ends the file.
    VhdFixed,
    Raw,
    Iso,
    Ova(Box<TarWalker>),
}

impl Inspector {
    /// An inspector for an image registered as `declared`.
    pub fn new(declared: ImageFormat) -> Self {
        Inspector {
            declared,
            total: 0,
            head: Vec::new(),
            tail: Vec::with_capacity(VHD_FOOTER_LEN),
            stage: Stage::Probing,
            failed: None,
        }
    }

    /// The declared format.
    pub fn declared(&self) -> ImageFormat {
        self.declared
    }

    /// Bytes fed so far.
    pub fn bytes_seen(&self) -> u64 {
        self.total
    }

    /// Feeds the next bytes of the image. Fails as soon as the bytes seen decide that the
    /// image is refused; the error is then returned again by every later call.
    pub fn update(&mut self, chunk: &[u8]) -> Result<(), InspectError> {
        if let Some(error) = &self.failed {
            return Err(error.clone());
        }
        let result = self.feed(chunk);
        if let Err(error) = &result {
            self.failed = Some(error.clone());
        }
        result
    }

    /// Ends the stream and gives the verdict.
    pub fn finish(mut self) -> Result<Inspection, InspectError> {
        if let Some(error) = self.failed {
            return Err(error);
        }
        if self.total == 0 {
            return Err(InspectError::Empty);
        }
        if matches!(self.stage, Stage::Probing) {
            // Still probing: `head` is the whole image.
            let verdict = probe(&self.head, true);
            self.enter(verdict, &[])?;
        }
        let physical_size = self.total;
        let virtual_size = match &self.stage {
            Stage::Probing => return Err(InspectError::Truncated),
            Stage::Qcow2 { virtual_size } => virtual_size.ok_or(InspectError::Truncated)?,
            Stage::VhdDynamic { virtual_size } => {
                let size = virtual_size.ok_or(InspectError::Truncated)?;
                if self.total < 2 * VHD_FOOTER_LEN as u64 || !self.tail.starts_with(VHD_COOKIE) {
                    return Err(InspectError::Truncated);
                }
                size
            }
            Stage::VhdFixed => self.fixed_vhd_size()?,
            Stage::Raw => self.raw_size()?,
            Stage::Iso => self.total,
            Stage::Ova(walker) => walker.finish()?,
        };
        Ok(Inspection {
            format: self.declared,
            virtual_size,
            physical_size,
        })
    }

    fn feed(&mut self, chunk: &[u8]) -> Result<(), InspectError> {
        if chunk.is_empty() {
            return Ok(());
        }
        self.total = self.total.saturating_add(chunk.len() as u64);
        self.push_tail(chunk);
        let take = HEAD_LEN.saturating_sub(self.head.len()).min(chunk.len());
        self.head.extend_from_slice(&chunk[..take]);
        match &mut self.stage {
            Stage::Probing => match probe(&self.head, false) {
                Probe::Undecided => Ok(()),
                verdict => self.enter(verdict, &chunk[take..]),
            },
            Stage::Ova(walker) => walker.feed(chunk),
            _ => self.check_head(),
        }
    }

    /// Leaves the probing stage for `verdict`. `head` then holds the stream up to the
    /// current chunk, whose bytes beyond the head are `rest`.
    fn enter(&mut self, verdict: Probe, rest: &[u8]) -> Result<(), InspectError> {
        let declared = self.declared;
        let detected = match verdict {
            Probe::Undecided => return Ok(()),
            Probe::Foreign(detected) => {
                return Err(InspectError::ForeignFormat { declared, detected });
            }
            Probe::Format(detected) => detected,
        };
        self.stage = match (declared, detected) {
            (ImageFormat::Vhd, ImageFormat::Raw) => Stage::VhdFixed,
            (ImageFormat::Qcow2, ImageFormat::Qcow2) => Stage::Qcow2 { virtual_size: None },
            (ImageFormat::Vhd, ImageFormat::Vhd) => Stage::VhdDynamic { virtual_size: None },
            (ImageFormat::Raw, ImageFormat::Raw) => Stage::Raw,
            (ImageFormat::Iso, ImageFormat::Iso) => Stage::Iso,
            (ImageFormat::Ova, ImageFormat::Ova) => {
                let mut walker = Box::new(TarWalker::default());
                walker.feed(&self.head)?;
                walker.feed(rest)?;
                Stage::Ova(walker)
            }
            (declared, detected) => return Err(InspectError::Mismatch { declared, detected }),
        };
        self.check_head()
    }

    /// Validates the headers that live in `head` as soon as their bytes are in.
    fn check_head(&mut self) -> Result<(), InspectError> {
        match &mut self.stage {
            Stage::Qcow2 {
                virtual_size: size @ None,
            } => *size = qcow2_header(&self.head)?,
            Stage::VhdDynamic {
                virtual_size: size @ None,
            } => {
                if let Some(footer) = self.head.get(..VHD_FOOTER_LEN) {
                    let footer = vhd_footer(footer)?;
                    if footer.disk_type != VhdType::Dynamic {
                        return Err(InspectError::VhdBadFooter(
                            "the footer copy at the start describes a fixed disk",
                        ));
                    }
                    *size = Some(footer.current_size);
                }
            }
            _ => {}
        }
        Ok(())
    }

    fn push_tail(&mut self, chunk: &[u8]) {
        if chunk.len() >= VHD_FOOTER_LEN {
            self.tail.clear();
            self.tail
                .extend_from_slice(&chunk[chunk.len() - VHD_FOOTER_LEN..]);
        } else {
            let excess = (self.tail.len() + chunk.len()).saturating_sub(VHD_FOOTER_LEN);
            self.tail.drain(..excess);
            self.tail.extend_from_slice(chunk);
        }
    }
}

fn be32(bytes: &[u8], at: usize) -> Option<u32> {
    let field = bytes.get(at..at + 4)?;
    Some(u32::from_be_bytes(field.try_into().ok()?))
}

fn be64(bytes: &[u8], at: usize) -> Option<u64> {
    let field = bytes.get(at..at + 8)?;
    Some(u64::from_be_bytes(field.try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::testutil::*;
    use super::*;
    use proptest::prelude::*;

    // ---- formats --------------------------------------------------------------------------

    #[test]
    fn format_names() {
        for (s, f) in [
            ("qcow2", ImageFormat::Qcow2),
            ("QCOW2", ImageFormat::Qcow2),
            ("Raw", ImageFormat::Raw),
            ("vhd", ImageFormat::Vhd),
            ("ISO", ImageFormat::Iso),
            ("ova", ImageFormat::Ova),
        ] {
            assert_eq!(s.parse::<ImageFormat>().unwrap(), f);
            assert_eq!(f.name().parse::<ImageFormat>().unwrap(), f);
            assert_eq!(f.to_string(), f.name());
            assert_eq!(f.properties_key(), f.name().to_ascii_lowercase());
        }
        for s in ["", "vmdk", "qcow", "VHDX", "img"] {
            assert!(s.parse::<ImageFormat>().is_err(), "{s}");
        }
        let ext: Vec<_> = ImageFormat::ALL.iter().map(|f| f.extension()).collect();
        assert_eq!(ext, ["qcow2", "raw", "vhd", "iso", "ova"]);
    }

    #[test]
    fn mismatch_message() {
        let e = InspectError::Mismatch {
            declared: ImageFormat::Qcow2,
            detected: ImageFormat::Iso,
        };
        assert_eq!(e.to_string(), "declared format QCOW2 but the content is ISO");
        let e = InspectError::ForeignFormat {
            declared: ImageFormat::Raw,
            detected: "a VMDK image",
        };
        assert_eq!(
            e.to_string(),
            "declared format RAW but the content is a VMDK image"
        );
    }

    #[test]
    fn detect_and_probe() {
        assert_eq!(detect(b"QFI\xfb"), Some(ImageFormat::Qcow2));
        assert_eq!(detect(b"QFI"), None);
        assert_eq!(probe(b"QFI", true), Probe::Format(ImageFormat::Raw));
        assert_eq!(detect(&vhd_dynamic(3, 1 << 20)), Some(ImageFormat::Vhd));
        assert_eq!(detect(&iso(40_000)), Some(ImageFormat::Iso));
        assert_eq!(detect(&iso(40_000)[..ISO_PROBE_LEN - 1]), None);
        assert_eq!(detect(&raw(ISO_PROBE_LEN)), Some(ImageFormat::Raw));
        assert_eq!(detect(&vhd_fixed(40_000)), Some(ImageFormat::Raw));
        assert_eq!(detect(&ova()), Some(ImageFormat::Ova));
        assert_eq!(probe(b"KDMV\x01\0\0\0", false), Probe::Foreign("a VMDK image"));
        assert_eq!(detect(b"KDMV\x01\0\0\0"), None);
        assert_eq!(probe(b"", true), Probe::Format(ImageFormat::Raw));
        assert_eq!(probe(b"", false), Probe::Undecided);
    }

    #[test]
    fn foreign_formats_are_refused() {
        for (magic, what) in [
            (&b"KDMV"[..], "a VMDK image"),
            (b"# Disk DescriptorFile\nversion=1\n", "a VMDK descriptor"),
            (b"vhdxfile", "a VHDX image"),
            (b"QED\0", "a QED image"),
            (b"LUKS\xba\xbe", "a LUKS volume"),
        ] {
            let mut img = raw(50_000);
            img[..magic.len()].copy_from_slice(magic);
            for declared in ImageFormat::ALL {
                assert_eq!(
                    inspect(declared, &img),
                    Err(InspectError::ForeignFormat {
                        declared,
                        detected: what
                    })
                );
            }
        }
        let mut img = raw(50_000);
        img[64..68].copy_from_slice(b"\x7f\x10\xda\xbe");
        assert!(matches!(
            inspect(ImageFormat::Raw, &img),
            Err(InspectError::ForeignFormat {
                detected: "a VDI image",
                ..
            })
        ));
    }

    #[test]
    fn polyglots_are_refused() {
        let mut img = iso(40_000);
        img[..4].copy_from_slice(b"QFI\xfb");
        assert_eq!(
            inspect(ImageFormat::Iso, &img),
            mismatch(ImageFormat::Iso, ImageFormat::Qcow2)
        );
        let mut img = iso(40_000);
        img[257..262].copy_from_slice(b"ustar");
        assert_eq!(
            inspect(ImageFormat::Iso, &img),
            mismatch(ImageFormat::Iso, ImageFormat::Ova)
        );
    }

    // ---- properties -----------------------------------------------------------------------

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn arbitrary_bytes_never_panic(
            data in prop::collection::vec(any::<u8>(), 0..3000),
            cuts in prop::collection::vec(any::<usize>(), 0..20),
        ) {
            let pieces = chunked(data.clone(), cuts);
            for declared in ImageFormat::ALL {
                let whole = run(declared, &data, usize::MAX);
                prop_assert_eq!(run_pieces(declared, &pieces), whole);
            }
        }

        #[test]
        fn mutated_samples_never_panic(
            sample in 0usize..8,
            mutations in prop::collection::vec((any::<usize>(), any::<u8>()), 0..8),
            truncate in prop::option::of(any::<usize>()),
            cuts in prop::collection::vec(any::<usize>(), 0..20),
        ) {
            let mut data = samples().swap_remove(sample);
            for (at, value) in mutations {
                let len = data.len();
                data[at % len] = value;
            }
            if let Some(t) = truncate {
                data.truncate(t % (data.len() + 1));
            }
            let pieces = chunked(data.clone(), cuts);
            for declared in ImageFormat::ALL {
                let whole = run(declared, &data, usize::MAX);
                prop_assert_eq!(run_pieces(declared, &pieces), whole);
            }
        }
    }
}
