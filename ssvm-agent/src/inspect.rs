//! Image format inspection in the download stream: QCOW2, RAW, VHD, ISO 9660 and OVA.
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

use std::fmt;
use std::str::FromStr;

/// How many leading bytes the inspector keeps.
pub const HEAD_LEN: usize = 64 * 1024;
/// How many leading bytes decide between ISO 9660 and RAW (`CD001` at 0x8001).
pub const ISO_PROBE_LEN: usize = ISO_MAGIC_OFFSET + ISO_MAGIC.len();
/// Largest OVF descriptor accepted in an OVA.
pub const MAX_OVF_LEN: u64 = 4 * 1024 * 1024;

const ISO_MAGIC_OFFSET: usize = 0x8001;
const ISO_MAGIC: &[u8] = b"CD001";
const VHD_FOOTER_LEN: usize = 512;
const VHD_COOKIE: &[u8] = b"conectix";
const TAR_BLOCK: usize = 512;
const MAX_TAR_META_LEN: u64 = 64 * 1024;

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
            Stage::Raw => {
                if self.tail.len() == VHD_FOOTER_LEN
                    && self.tail.starts_with(VHD_COOKIE)
                    && vhd_checksum_ok(&self.tail)
                {
                    return Err(InspectError::Mismatch {
                        declared: self.declared,
                        detected: ImageFormat::Vhd,
                    });
                }
                self.total
            }
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

    fn fixed_vhd_size(&self) -> Result<u64, InspectError> {
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
fn qcow2_header(head: &[u8]) -> Result<Option<u64>, InspectError> {
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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum VhdType {
    Fixed,
    Dynamic,
}

#[derive(Debug, Clone, Copy)]
struct VhdFooter {
    disk_type: VhdType,
    current_size: u64,
}

/// One's complement of the byte sum of the footer, its checksum field (64..68) excluded.
fn vhd_checksum_ok(footer: &[u8]) -> bool {
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
fn vhd_footer(footer: &[u8]) -> Result<VhdFooter, InspectError> {
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

/// Streaming walk over the ustar archive of an OVA.
#[derive(Debug, Default)]
struct TarWalker {
    /// Bytes of the header block being assembled.
    header: Vec<u8>,
    state: TarState,
    /// Name from a pax `path` record or a GNU long name, for the next entry.
    pending_path: Option<String>,
    /// Size from a pax `size` record, for the next entry.
    pending_size: Option<u64>,
    /// Whether the `.ovf` descriptor's header has been seen (its body may still be streaming).
    descriptor_seen: bool,
    /// Virtual size, once the descriptor is parsed.
    virtual_size: Option<u64>,
}

#[derive(Debug, Default)]
enum TarState {
    #[default]
    Header,
    Body {
        remaining: u64,
        padding: u64,
        sink: Sink,
    },
    /// After the end-of-archive block: the rest is ignored.
    End,
}

#[derive(Debug)]
enum Sink {
    Skip,
    Descriptor(Vec<u8>),
    PaxHeader(Vec<u8>),
    GnuLongName(Vec<u8>),
}

impl TarWalker {
    fn feed(&mut self, mut data: &[u8]) -> Result<(), InspectError> {
        while !data.is_empty() {
            match &mut self.state {
                TarState::End => return Ok(()),
                TarState::Header => {
                    let n = (TAR_BLOCK - self.header.len()).min(data.len());
                    self.header.extend_from_slice(&data[..n]);
                    data = &data[n..];
                    if self.header.len() == TAR_BLOCK {
                        let block = std::mem::take(&mut self.header);
                        self.on_header(&block)?;
                    }
                }
                TarState::Body {
                    remaining,
                    padding,
                    sink,
                } => {
                    if *remaining > 0 {
                        let n = usize::try_from(*remaining).unwrap_or(usize::MAX).min(data.len());
                        match sink {
                            Sink::Skip => {}
                            Sink::Descriptor(buf) | Sink::PaxHeader(buf) | Sink::GnuLongName(buf) => {
                                buf.extend_from_slice(&data[..n]);
                            }
                        }
                        *remaining -= n as u64;
                        data = &data[n..];
                        if *remaining == 0 {
                            let sink = std::mem::replace(sink, Sink::Skip);
                            self.on_body(sink)?;
                        }
                    } else {
                        let n = usize::try_from(*padding).unwrap_or(usize::MAX).min(data.len());
                        *padding -= n as u64;
                        data = &data[n..];
                        if *padding == 0 {
                            self.state = TarState::Header;
                        }
                    }
                }
            }
        }
        Ok(())
    }

    fn finish(&self) -> Result<u64, InspectError> {
        match &self.state {
            TarState::Header if self.header.is_empty() => {}
            TarState::End => {}
            TarState::Header | TarState::Body { .. } => return Err(InspectError::Truncated),
        }
        self.virtual_size.ok_or(InspectError::OvaNoDescriptor)
    }

    fn on_header(&mut self, block: &[u8]) -> Result<(), InspectError> {
        if block.iter().all(|b| *b == 0) {
            // End of archive. The descriptor's body, if any, is complete by now (a header
            // follows it), so `virtual_size` is set whenever the descriptor was seen.
            if !self.descriptor_seen {
                return Err(InspectError::OvaNoDescriptor);
            }
            self.state = TarState::End;
            return Ok(());
        }
        let stored =
            tar_number(&block[148..156]).ok_or(InspectError::OvaBadArchive("bad header checksum field"))?;
        let unsigned: u64 = block
            .iter()
            .enumerate()
            .map(|(i, b)| {
                if (148..156).contains(&i) {
                    32
                } else {
                    u64::from(*b)
                }
            })
            .sum();
        let signed: i64 = block
            .iter()
            .enumerate()
            .map(|(i, b)| {
                if (148..156).contains(&i) {
                    32
                } else {
                    i64::from(*b as i8)
                }
            })
            .sum();
        if stored != unsigned && i64::try_from(stored).ok() != Some(signed) {
            return Err(InspectError::OvaBadArchive("header checksum mismatch"));
        }
        if &block[257..262] != b"ustar" {
            return Err(InspectError::OvaBadArchive("not a ustar archive"));
        }
        let header_size =
            tar_number(&block[124..136]).ok_or(InspectError::OvaBadArchive("bad size field"))?;
        let typeflag = block[156];
        let (size, sink) = match typeflag {
            b'x' | b'L' => {
                if header_size > MAX_TAR_META_LEN {
                    return Err(InspectError::OvaBadArchive("extended header too large"));
                }
                let buf = Vec::with_capacity(header_size as usize);
                let sink = if typeflag == b'x' {
                    Sink::PaxHeader(buf)
                } else {
                    Sink::GnuLongName(buf)
                };
                (header_size, sink)
            }
            b'g' | b'K' => (header_size, Sink::Skip),
            _ => self.on_entry(block, typeflag, header_size)?,
        };
        let padding = (TAR_BLOCK as u64 - size % TAR_BLOCK as u64) % TAR_BLOCK as u64;
        self.state = TarState::Body {
            remaining: size,
            padding,
            sink,
        };
        if size == 0 {
            if let TarState::Body { sink, .. } = &mut self.state {
                let sink = std::mem::replace(sink, Sink::Skip);
                self.on_body(sink)?;
            }
            self.state = TarState::Header;
        }
        Ok(())
    }

    /// A real entry (file, directory, link…): checks it and says how to consume its body:
    /// the first `.ovf` file is collected as the descriptor, every other entry is skipped.
    fn on_entry(
        &mut self,
        block: &[u8],
        typeflag: u8,
        header_size: u64,
    ) -> Result<(u64, Sink), InspectError> {
        let size = self.pending_size.take().unwrap_or(header_size);
        let name = match self.pending_path.take() {
            Some(path) => path,
            None => {
                let name = c_string(&block[0..100]);
                let prefix = c_string(&block[345..500]);
                if prefix.is_empty() {
                    name
                } else {
                    format!("{prefix}/{name}")
                }
            }
        };
        let unsafe_entry = |reason| InspectError::OvaUnsafeEntry {
            name: name.clone(),
            reason,
        };
        match typeflag {
            b'0' | 0 | b'7' | b'5' => {}
            b'1' | b'2' => return Err(unsafe_entry("links are not allowed")),
            b'3' | b'4' | b'6' => return Err(unsafe_entry("special files are not allowed")),
            _ => return Err(InspectError::OvaBadArchive("unsupported entry type")),
        }
        if name.is_empty() {
            return Err(InspectError::OvaBadArchive("entry without a name"));
        }
        if name.starts_with('/') {
            return Err(unsafe_entry("absolute path"));
        }
        if name.split(['/', '\\']).any(|part| part == "..") {
            return Err(unsafe_entry("parent directory component"));
        }
        let is_ovf = typeflag != b'5'
            && name
                .rsplit('/')
                .next()
                .is_some_and(|base| base.len() > 4 && base.to_ascii_lowercase().ends_with(".ovf"));
        if !is_ovf {
            // Manifest, certificate, disk, directory…: streamed past, never buffered.
            return Ok((size, Sink::Skip));
        }
        if self.descriptor_seen {
            return Err(InspectError::OvaMultipleDescriptors);
        }
        self.descriptor_seen = true;
        if size > MAX_OVF_LEN {
            return Err(InspectError::OvaDescriptorTooLarge {
                size,
                limit: MAX_OVF_LEN,
            });
        }
        Ok((size, Sink::Descriptor(Vec::with_capacity(size as usize))))
    }

    fn on_body(&mut self, sink: Sink) -> Result<(), InspectError> {
        match sink {
            Sink::Skip => {}
            Sink::Descriptor(xml) => self.virtual_size = Some(ovf_virtual_size(&xml)?),
            Sink::GnuLongName(name) => self.pending_path = Some(c_string(&name)),
            Sink::PaxHeader(records) => {
                for (key, value) in pax_records(&records)? {
                    match key {
                        "path" => self.pending_path = Some(value.to_owned()),
                        "size" => {
                            let size = value
                                .parse()
                                .map_err(|_| InspectError::OvaBadArchive("bad pax size"))?;
                            self.pending_size = Some(size);
                        }
                        _ => {}
                    }
                }
            }
        }
        Ok(())
    }
}

/// A NUL-terminated header field as text.
fn c_string(field: &[u8]) -> String {
    let end = field.iter().position(|b| *b == 0).unwrap_or(field.len());
    String::from_utf8_lossy(&field[..end]).into_owned()
}

/// A numeric tar header field: octal digits (space or NUL padded), or GNU base-256 when the
/// first byte has its high bit set.
fn tar_number(field: &[u8]) -> Option<u64> {
    let (&first, rest) = field.split_first()?;
    if first & 0x80 != 0 {
        if first & 0x40 != 0 {
            return None; // negative
        }
        return rest.iter().try_fold(u64::from(first & 0x3f), |n, b| {
            n.checked_mul(256)?.checked_add(u64::from(*b))
        });
    }
    let text = field.trim_ascii_start();
    let digits = text.iter().take_while(|b| (b'0'..=b'7').contains(*b)).count();
    if !text[digits..].iter().all(|b| *b == b' ' || *b == 0) {
        return None;
    }
    text[..digits]
        .iter()
        .try_fold(0u64, |n, b| n.checked_mul(8)?.checked_add(u64::from(b - b'0')))
}

/// Records of a pax extended header: `"<len> <key>=<value>\n"`.
fn pax_records(mut data: &[u8]) -> Result<Vec<(&str, &str)>, InspectError> {
    let bad = InspectError::OvaBadArchive("malformed pax header");
    let mut records = Vec::new();
    while !data.is_empty() {
        let space = data.iter().position(|b| *b == b' ').ok_or(bad.clone())?;
        let len: usize = std::str::from_utf8(&data[..space])
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or(bad.clone())?;
        if len <= space + 1 || len > data.len() || data[len - 1] != b'\n' {
            return Err(bad);
        }
        let record = std::str::from_utf8(&data[space + 1..len - 1]).map_err(|_| bad.clone())?;
        let (key, value) = record.split_once('=').ok_or(bad.clone())?;
        records.push((key, value));
        data = &data[len..];
    }
    Ok(records)
}

/// Sum of the capacities of the disks in the `DiskSection` of an OVF descriptor.
fn ovf_virtual_size(xml: &[u8]) -> Result<u64, InspectError> {
    use quick_xml::events::Event;

    let bad = |what: String| InspectError::OvaBadDescriptor(what);
    let text = std::str::from_utf8(xml).map_err(|_| bad("not utf-8".into()))?;
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut reader = quick_xml::Reader::from_str(text);
    let mut depth = 0usize;
    let mut disk_section: Option<usize> = None;
    let mut total = 0u64;
    let mut disks = 0usize;
    loop {
        let event = reader.read_event().map_err(|e| bad(e.to_string()))?;
        match event {
            Event::Start(element) => {
                depth += 1;
                let name = element.local_name();
                if disk_section.is_none() && name.as_ref() == b"DiskSection" {
                    disk_section = Some(depth);
                } else if disk_section.map(|d| d + 1) == Some(depth) && name.as_ref() == b"Disk" {
                    total = add_disk(total, &element, &reader)?;
                    disks += 1;
                }
            }
            Event::Empty(element)
                if disk_section == Some(depth) && element.local_name().as_ref() == b"Disk" =>
            {
                total = add_disk(total, &element, &reader)?;
                disks += 1;
            }
            Event::End(_) => {
                if disk_section == Some(depth) {
                    disk_section = None;
                }
                depth = depth.saturating_sub(1);
            }
            Event::Eof => break,
            _ => {}
        }
    }
    if depth != 0 {
        return Err(bad("unclosed element".into()));
    }
    if disks == 0 {
        return Err(bad("no disk in the DiskSection".into()));
    }
    Ok(total)
}

fn add_disk(
    total: u64,
    disk: &quick_xml::events::BytesStart<'_>,
    reader: &quick_xml::Reader<&[u8]>,
) -> Result<u64, InspectError> {
    let bad = |what: String| InspectError::OvaBadDescriptor(what);
    let mut capacity = None;
    let mut units = None;
    for attribute in disk.attributes() {
        let attribute = attribute.map_err(|e| bad(e.to_string()))?;
        let value = attribute
            .decode_and_unescape_value(reader.decoder())
            .map_err(|e| bad(e.to_string()))?;
        match attribute.key.local_name().as_ref() {
            b"capacity" => capacity = Some(value.into_owned()),
            b"capacityAllocationUnits" => units = Some(value.into_owned()),
            _ => {}
        }
    }
    let capacity = capacity.ok_or_else(|| bad("disk without capacity".into()))?;
    let count: u64 = capacity
        .trim()
        .parse()
        .map_err(|_| bad(format!("disk capacity {capacity:?} is not a number")))?;
    let unit = match &units {
        Some(units) => allocation_unit(units)
            .ok_or_else(|| bad(format!("unknown capacity allocation units {units:?}")))?,
        None => 1,
    };
    count
        .checked_mul(unit)
        .and_then(|bytes| total.checked_add(bytes))
        .ok_or_else(|| bad("disk capacity overflows".into()))
}

/// Bytes per unit of a DMTF programmatic unit such as `byte * 2^30` (also the legacy
/// `KiloBytes`, `MegaBytes`, `GigaBytes`, `TeraBytes`).
fn allocation_unit(units: &str) -> Option<u64> {
    let units = units.trim().to_ascii_lowercase();
    match units.as_str() {
        "kilobytes" => return Some(1 << 10),
        "megabytes" => return Some(1 << 20),
        "gigabytes" => return Some(1 << 30),
        "terabytes" => return Some(1 << 40),
        _ => {}
    }
    let mut factors = units.split('*').map(str::trim);
    if !matches!(factors.next(), Some("byte" | "bytes")) {
        return None;
    }
    factors.try_fold(1u64, |unit, factor| {
        let factor = match factor.split_once('^') {
            Some((base, exponent)) => {
                let base: u64 = base.trim().parse().ok()?;
                let exponent: u32 = exponent.trim().parse().ok()?;
                base.checked_pow(exponent)?
            }
            None => factor.parse().ok()?,
        };
        unit.checked_mul(factor)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const CHUNKS: [usize; 4] = [1, 7, 4096, usize::MAX];

    fn run(declared: ImageFormat, data: &[u8], chunk: usize) -> Result<Inspection, InspectError> {
        let mut inspector = Inspector::new(declared);
        for piece in data.chunks(chunk.clamp(1, data.len().max(1))) {
            inspector.update(piece)?;
        }
        inspector.finish()
    }

    /// Runs with every chunk size of [`CHUNKS`], checks they agree, and returns the verdict.
    fn inspect(declared: ImageFormat, data: &[u8]) -> Result<Inspection, InspectError> {
        let whole = run(declared, data, usize::MAX);
        for chunk in CHUNKS {
            assert_eq!(run(declared, data, chunk), whole, "chunk size {chunk}");
        }
        whole
    }

    fn ok(format: ImageFormat, virtual_size: u64, physical_size: usize) -> Result<Inspection, InspectError> {
        Ok(Inspection {
            format,
            virtual_size,
            physical_size: physical_size as u64,
        })
    }

    fn mismatch(declared: ImageFormat, detected: ImageFormat) -> Result<Inspection, InspectError> {
        Err(InspectError::Mismatch { declared, detected })
    }

    /// The number of leading bytes after which `update` first fails, if it does.
    fn fails_after(declared: ImageFormat, data: &[u8]) -> Option<usize> {
        let mut inspector = Inspector::new(declared);
        for (i, byte) in data.iter().enumerate() {
            if inspector.update(std::slice::from_ref(byte)).is_err() {
                return Some(i + 1);
            }
        }
        None
    }

    // ---- builders -------------------------------------------------------------------------

    fn qcow2(version: u32, backing_file_offset: u64, features: u64, size: u64) -> Vec<u8> {
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

    fn vhd_footer_block(disk_type: u32, size: u64) -> Vec<u8> {
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

    fn vhd_fixed(size: u64) -> Vec<u8> {
        let mut v: Vec<u8> = (0..size).map(|i| (i % 251) as u8 | 1).collect();
        v.extend(vhd_footer_block(2, size));
        v
    }

    fn vhd_dynamic(disk_type: u32, size: u64) -> Vec<u8> {
        let footer = vhd_footer_block(disk_type, size);
        let mut v = footer.clone();
        let mut header = vec![0u8; 1024];
        header[0..8].copy_from_slice(b"cxsparse");
        v.extend(header);
        v.extend(vec![0xffu8; 512]); // BAT: every block unallocated
        v.extend(footer);
        v
    }

    fn iso(len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        v[0x8000] = 1;
        v[0x8001..0x8006].copy_from_slice(b"CD001");
        v[0x8006] = 1;
        v
    }

    fn raw(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 31 % 253) as u8).collect()
    }

    fn tar_header(name: &str, size: u64, typeflag: u8) -> Vec<u8> {
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

    fn tar_entry(tar: &mut Vec<u8>, name: &str, typeflag: u8, body: &[u8]) {
        tar.extend(tar_header(name, body.len() as u64, typeflag));
        tar.extend_from_slice(body);
        tar.resize(tar.len().div_ceil(512) * 512, 0);
    }

    fn tar_end(tar: &mut Vec<u8>) {
        tar.extend(vec![0u8; 1024]);
    }

    const OVF: &str = r#"<?xml version="1.0" encoding="UTF-8"?>
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
    const OVF_SIZE: u64 = 8 * (1 << 30) + 512 * (1 << 20);

    fn ova_with(ovf: &str) -> Vec<u8> {
        let mut tar = Vec::new();
        tar_entry(&mut tar, "appliance.ovf", b'0', ovf.as_bytes());
        tar_entry(&mut tar, "disk1.vmdk", b'0', &raw(1000));
        tar_entry(&mut tar, "disk2.vmdk", b'0', &raw(600));
        tar_end(&mut tar);
        tar
    }

    fn ova() -> Vec<u8> {
        ova_with(OVF)
    }

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

    // ---- qcow2 ----------------------------------------------------------------------------

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

    // ---- vhd ------------------------------------------------------------------------------

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

    // ---- iso and raw ----------------------------------------------------------------------

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

    // ---- ova ------------------------------------------------------------------------------

    #[test]
    fn ova_sums_the_disks() {
        let img = ova();
        let len = img.len();
        assert_eq!(
            inspect(ImageFormat::Ova, &img),
            ok(ImageFormat::Ova, OVF_SIZE, len)
        );
        assert_eq!(
            inspect(ImageFormat::Raw, &img),
            mismatch(ImageFormat::Raw, ImageFormat::Ova)
        );
        // Without the end-of-archive blocks.
        assert_eq!(
            inspect(ImageFormat::Ova, &img[..len - 1024]),
            ok(ImageFormat::Ova, OVF_SIZE, len - 1024)
        );
        // Cut inside an entry.
        assert_eq!(
            inspect(ImageFormat::Ova, &img[..len - 1100]),
            Err(InspectError::Truncated)
        );
        assert_eq!(
            inspect(ImageFormat::Ova, &img[..700]),
            Err(InspectError::Truncated)
        );
    }

    #[test]
    fn ova_descriptor_errors_come_early() {
        let img = ova_with(&OVF.replace("byte * 2^20", "furlong"));
        let tar_ovf_end = 512 + OVF.len().div_ceil(512) * 512;
        let at = fails_after(ImageFormat::Ova, &img).unwrap();
        assert!(at <= tar_ovf_end, "{at}");
        assert!(matches!(
            inspect(ImageFormat::Ova, &img),
            Err(InspectError::OvaBadDescriptor(_))
        ));
    }

    #[test]
    fn ova_descriptor_variants() {
        let plain = r#"<Envelope><DiskSection><Disk capacity="1000"/></DiskSection></Envelope>"#;
        let len = ova_with(plain).len();
        assert_eq!(
            inspect(ImageFormat::Ova, &ova_with(plain)),
            ok(ImageFormat::Ova, 1000, len)
        );
        let prefixed = r#"<o:Envelope xmlns:o="http://schemas.dmtf.org/ovf/envelope/2"><o:DiskSection><o:Disk o:capacity="3" o:capacityAllocationUnits="byte*2^10*1000"/><o:Disk o:capacity="2" o:capacityAllocationUnits="GigaBytes"/></o:DiskSection></o:Envelope>"#;
        let len = ova_with(prefixed).len();
        assert_eq!(
            inspect(ImageFormat::Ova, &ova_with(prefixed)),
            ok(ImageFormat::Ova, 3 * 1024 * 1000 + 2 * (1 << 30), len)
        );
        for bad in [
            r#"<Envelope><DiskSection></DiskSection></Envelope>"#,
            r#"<Envelope><Disk capacity="5"/></Envelope>"#,
            r#"<Envelope><DiskSection><Disk capacity="${size}"/></DiskSection></Envelope>"#,
            r#"<Envelope><DiskSection><Disk/></DiskSection></Envelope>"#,
            r#"<Envelope><DiskSection><Disk capacity="18446744073709551615" capacityAllocationUnits="byte * 2^10"/></DiskSection></Envelope>"#,
            r#"<Envelope><DiskSection><Disk capacity="1"></Disk></Envelope>"#,
            r#"<Envelope><DiskSection><Disk capacity="1"/>"#,
            "\u{0}\u{1}not xml <<<",
        ] {
            assert!(
                matches!(
                    inspect(ImageFormat::Ova, &ova_with(bad)),
                    Err(InspectError::OvaBadDescriptor(_))
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn ova_structure_refusals() {
        let o = ImageFormat::Ova;
        // An empty archive (all zeros) has no ustar magic: it is raw.
        assert_eq!(inspect(o, &[0u8; 1024]), mismatch(o, ImageFormat::Raw));
        // Only metadata before the end of the archive.
        let mut tar = Vec::new();
        tar_entry(&mut tar, "PaxHeaders/x", b'x', b"12 path=a.b\n");
        tar_end(&mut tar);
        assert_eq!(inspect(o, &tar), Err(InspectError::OvaNoDescriptor));
        // Links and traversal, after the descriptor and before it.
        for (name, typeflag) in [
            ("link", b'2'),
            ("hard", b'1'),
            ("../evil", b'0'),
            ("/etc/passwd", b'0'),
            ("a/../../b", b'0'),
            ("dev", b'3'),
            ("../evil.ovf", b'0'),
            ("evil.ovf", b'2'),
        ] {
            let mut tar = Vec::new();
            tar_entry(&mut tar, "a.ovf", b'0', OVF.as_bytes());
            tar_entry(&mut tar, name, typeflag, b"");
            tar_end(&mut tar);
            assert!(
                matches!(inspect(o, &tar), Err(InspectError::OvaUnsafeEntry { .. })),
                "{name}"
            );
            let mut tar = Vec::new();
            tar_entry(&mut tar, "a.mf", b'0', b"SHA256(a.ovf)= 00\n");
            tar_entry(&mut tar, name, typeflag, b"");
            let refused_at = tar.len();
            tar_entry(&mut tar, "a.ovf", b'0', OVF.as_bytes());
            tar_end(&mut tar);
            assert!(
                matches!(inspect(o, &tar), Err(InspectError::OvaUnsafeEntry { .. })),
                "{name} before the descriptor"
            );
            assert_eq!(fails_after(o, &tar), Some(refused_at), "{name}");
        }
        // Too large a descriptor: refused from its header.
        let mut tar = tar_header("big.ovf", MAX_OVF_LEN + 1, b'0');
        tar.extend(vec![b' '; 1024]);
        assert_eq!(
            inspect(o, &tar),
            Err(InspectError::OvaDescriptorTooLarge {
                size: MAX_OVF_LEN + 1,
                limit: MAX_OVF_LEN
            })
        );
        assert_eq!(fails_after(o, &tar), Some(512));
        // Also when the descriptor comes after other entries.
        let mut tar = Vec::new();
        tar_entry(&mut tar, "big.mf", b'0', b"SHA256(big.ovf)= 00\n");
        tar.extend(tar_header("big.ovf", MAX_OVF_LEN + 1, b'0'));
        let refused_at = tar.len();
        tar.extend(vec![b' '; 1024]);
        assert_eq!(
            inspect(o, &tar),
            Err(InspectError::OvaDescriptorTooLarge {
                size: MAX_OVF_LEN + 1,
                limit: MAX_OVF_LEN
            })
        );
        assert_eq!(fails_after(o, &tar), Some(refused_at));
        // Bad header checksum in the second entry.
        let mut tar = Vec::new();
        tar_entry(&mut tar, "a.ovf", b'0', OVF.as_bytes());
        let second = tar.len();
        tar_entry(&mut tar, "disk.vmdk", b'0', b"data");
        tar[second + 5] ^= 1;
        assert_eq!(
            inspect(o, &tar),
            Err(InspectError::OvaBadArchive("header checksum mismatch"))
        );
    }

    const MF: &[u8] = b"SHA256(x.ovf)= 0123\nSHA256(disk1.vmdk)= 4567\n";

    #[test]
    fn ova_descriptor_after_the_manifest() {
        let o = ImageFormat::Ova;
        // `tar cf x.ova x.mf x.ovf disk1.vmdk disk2.vmdk`
        let mut tar = Vec::new();
        tar_entry(&mut tar, "x.mf", b'0', MF);
        tar_entry(&mut tar, "x.ovf", b'0', OVF.as_bytes());
        tar_entry(&mut tar, "disk1.vmdk", b'0', &raw(1000));
        tar_entry(&mut tar, "disk2.vmdk", b'0', &raw(600));
        tar_end(&mut tar);
        let n = tar.len();
        assert_eq!(inspect(o, &tar), ok(o, OVF_SIZE, n));
        // Manifest and certificate first, descriptor in a directory, upper-case extension,
        // no end-of-archive blocks.
        let mut tar = Vec::new();
        tar_entry(&mut tar, "x.cert", b'0', b"-----BEGIN CERTIFICATE-----\n");
        tar_entry(&mut tar, "x.mf", b'0', MF);
        tar_entry(&mut tar, "vm/", b'5', b"");
        tar_entry(&mut tar, "vm/X.OVF", b'0', OVF.as_bytes());
        tar_entry(&mut tar, "vm/disk1.vmdk", b'0', &raw(1000));
        let n = tar.len();
        assert_eq!(inspect(o, &tar), ok(o, OVF_SIZE, n));
        // A descriptor error is reported once the descriptor is in.
        let bad = OVF.replace("byte * 2^20", "furlong");
        let mut tar = Vec::new();
        tar_entry(&mut tar, "x.mf", b'0', MF);
        tar_entry(&mut tar, "x.ovf", b'0', bad.as_bytes());
        let descriptor_end = tar.len();
        tar_entry(&mut tar, "disk1.vmdk", b'0', &raw(1000));
        tar_end(&mut tar);
        assert!(matches!(inspect(o, &tar), Err(InspectError::OvaBadDescriptor(_))));
        assert!(fails_after(o, &tar).is_some_and(|at| at > 1024 && at <= descriptor_end));
    }

    #[test]
    fn ova_descriptor_after_the_disks() {
        let o = ImageFormat::Ova;
        // `tar cf x.ova *`: disks sort before the manifest and the descriptor. The first disk
        // is larger than the head the inspector keeps.
        let mut tar = Vec::new();
        tar_entry(&mut tar, "disk1.vmdk", b'0', &raw(HEAD_LEN + 5000));
        tar_entry(&mut tar, "disk2.vmdk", b'0', &raw(600));
        tar_entry(&mut tar, "x.mf", b'0', MF);
        tar_entry(&mut tar, "x.ovf", b'0', OVF.as_bytes());
        tar_end(&mut tar);
        let n = tar.len();
        assert_eq!(inspect(o, &tar), ok(o, OVF_SIZE, n));
        // Without the end-of-archive blocks.
        assert_eq!(inspect(o, &tar[..n - 1024]), ok(o, OVF_SIZE, n - 1024));
        // Cut inside the descriptor.
        assert_eq!(inspect(o, &tar[..n - 1100]), Err(InspectError::Truncated));
        // A skipped entry is not buffered: a disk of the largest octal size (8 GiB - 1)
        // followed by a little data is just truncated.
        let mut tar = Vec::new();
        tar.extend(tar_header("disk1.vmdk", (1 << 33) - 1, b'0'));
        tar.extend(raw(10_000));
        assert_eq!(inspect(o, &tar), Err(InspectError::Truncated));
        // The disk's pax size is honoured before the descriptor.
        let mut tar = Vec::new();
        tar_entry(&mut tar, "PaxHeaders/d", b'x', b"12 size=600\n");
        tar.extend(tar_header("disk1.vmdk", 0, b'0'));
        tar.extend(raw(600));
        tar.resize(tar.len().div_ceil(512) * 512, 0);
        tar_entry(&mut tar, "x.ovf", b'0', OVF.as_bytes());
        tar_end(&mut tar);
        let n = tar.len();
        assert_eq!(inspect(o, &tar), ok(o, OVF_SIZE, n));
    }

    #[test]
    fn ova_with_two_descriptors_is_refused() {
        let o = ImageFormat::Ova;
        for (first, second) in [("a.ovf", "b.ovf"), ("x.ovf", "sub/x.OVF"), ("x.ovf", "x.ovf")] {
            let mut tar = Vec::new();
            tar_entry(&mut tar, "x.mf", b'0', MF);
            tar_entry(&mut tar, first, b'0', OVF.as_bytes());
            tar_entry(&mut tar, "disk1.vmdk", b'0', &raw(1000));
            let refused_at = tar.len() + 512;
            tar_entry(&mut tar, second, b'0', OVF.as_bytes());
            tar_end(&mut tar);
            assert_eq!(
                inspect(o, &tar),
                Err(InspectError::OvaMultipleDescriptors),
                "{second}"
            );
            // Refused from the second descriptor's header.
            assert_eq!(fails_after(o, &tar), Some(refused_at), "{second}");
        }
        // Even when the first one is broken the second is never read: the first's error wins.
        let mut tar = Vec::new();
        tar_entry(&mut tar, "a.ovf", b'0', b"<Envelope>");
        tar_entry(&mut tar, "b.ovf", b'0', OVF.as_bytes());
        assert!(matches!(inspect(o, &tar), Err(InspectError::OvaBadDescriptor(_))));
        assert_eq!(
            InspectError::OvaMultipleDescriptors.to_string(),
            "OVA has more than one descriptor"
        );
        // A directory named like a descriptor is not one.
        let mut tar = Vec::new();
        tar_entry(&mut tar, "d.ovf/", b'5', b"");
        tar_entry(&mut tar, "x.ovf", b'0', OVF.as_bytes());
        tar_end(&mut tar);
        let n = tar.len();
        assert_eq!(inspect(o, &tar), ok(o, OVF_SIZE, n));
    }

    #[test]
    fn ova_without_descriptor_is_refused() {
        let o = ImageFormat::Ova;
        let mut tar = Vec::new();
        tar_entry(&mut tar, "x.mf", b'0', MF);
        tar_entry(&mut tar, "disk1.vmdk", b'0', &raw(HEAD_LEN + 5000));
        tar_entry(&mut tar, "x.ovf.bak", b'0', OVF.as_bytes());
        tar_entry(&mut tar, ".ovf", b'0', OVF.as_bytes());
        let end = tar.len();
        // The stream just stops: `finish` decides.
        assert_eq!(inspect(o, &tar), Err(InspectError::OvaNoDescriptor));
        assert_eq!(fails_after(o, &tar), None);
        let mut inspector = Inspector::new(o);
        assert_eq!(inspector.update(&tar), Ok(()));
        assert_eq!(inspector.finish(), Err(InspectError::OvaNoDescriptor));
        // The end-of-archive block decides.
        tar_end(&mut tar);
        assert_eq!(inspect(o, &tar), Err(InspectError::OvaNoDescriptor));
        assert_eq!(fails_after(o, &tar), Some(end + 512));
        // A descriptor after the end of the archive does not count.
        tar_entry(&mut tar, "x.ovf", b'0', OVF.as_bytes());
        assert_eq!(inspect(o, &tar), Err(InspectError::OvaNoDescriptor));
    }

    #[test]
    fn ova_with_pax_and_gnu_long_names() {
        let o = ImageFormat::Ova;
        let mut tar = Vec::new();
        let long = format!("{}/appliance.ovf", "d".repeat(120));
        let record = format!(" path={long}\n");
        let mut len = record.len() + 3;
        if format!("{len}{record}").len() != len {
            len += 1;
        }
        tar_entry(
            &mut tar,
            "PaxHeaders/x",
            b'x',
            format!("{len}{record}").as_bytes(),
        );
        tar_entry(&mut tar, "placeholder", b'0', OVF.as_bytes());
        // A disk with a GNU long name.
        let mut name = "e".repeat(150).into_bytes();
        name.push(0);
        tar_entry(&mut tar, "././@LongLink", b'L', &name);
        tar_entry(&mut tar, "disk", b'0', &raw(700));
        tar_end(&mut tar);
        let n = tar.len();
        assert_eq!(inspect(o, &tar), ok(o, OVF_SIZE, n));

        // A pax header that renames the only `.ovf` entry: no descriptor.
        let mut tar = Vec::new();
        tar_entry(&mut tar, "PaxHeaders/x", b'x', b"18 path=disk.vmdk\n");
        tar_entry(&mut tar, "a.ovf", b'0', OVF.as_bytes());
        assert_eq!(inspect(o, &tar), Err(InspectError::OvaNoDescriptor));
        // A pax header that names a later entry as the descriptor.
        let mut tar = Vec::new();
        tar_entry(&mut tar, "x.mf", b'0', b"SHA256(x.ovf)= 00\n");
        tar_entry(&mut tar, "PaxHeaders/x", b'x', b"14 path=x.ovf\n");
        tar_entry(&mut tar, "placeholder", b'0', OVF.as_bytes());
        tar_entry(&mut tar, "disk1.vmdk", b'0', &raw(1000));
        tar_end(&mut tar);
        let n = tar.len();
        assert_eq!(inspect(o, &tar), ok(o, OVF_SIZE, n));

        // pax size overrides the header size.
        let mut tar = Vec::new();
        tar_entry(&mut tar, "a.ovf", b'0', OVF.as_bytes());
        tar_entry(&mut tar, "PaxHeaders/d", b'x', b"12 size=600\n");
        tar.extend(tar_header("disk.vmdk", 0, b'0'));
        tar.extend(raw(600));
        tar.resize(tar.len().div_ceil(512) * 512, 0);
        tar_end(&mut tar);
        let n = tar.len();
        assert_eq!(inspect(o, &tar), ok(o, OVF_SIZE, n));

        let mut tar = Vec::new();
        tar_entry(&mut tar, "PaxHeaders/x", b'x', b"99 path=a.ovf\n");
        assert_eq!(
            inspect(o, &tar),
            Err(InspectError::OvaBadArchive("malformed pax header"))
        );
    }

    #[test]
    fn tar_numbers() {
        assert_eq!(tar_number(b"00000001750\0"), Some(1000));
        assert_eq!(tar_number(b"     1750 \0\0"), Some(1000));
        assert_eq!(tar_number(b"\0\0\0\0"), Some(0));
        assert_eq!(tar_number(b"0008"), None);
        assert_eq!(tar_number(b"\x80\0\0\0\0\0\0\x02\0\0\0\0"), Some(2 << 32));
        assert_eq!(tar_number(b"\xff\xff"), None);
        assert_eq!(
            tar_number(b"\x80\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff"),
            None
        );
        assert_eq!(tar_number(b""), None);
    }

    #[test]
    fn allocation_units() {
        assert_eq!(allocation_unit("byte"), Some(1));
        assert_eq!(allocation_unit("byte * 2^30"), Some(1 << 30));
        assert_eq!(allocation_unit("Byte*2^20"), Some(1 << 20));
        assert_eq!(allocation_unit("byte * 10^3"), Some(1000));
        assert_eq!(allocation_unit("byte * 1024"), Some(1024));
        assert_eq!(allocation_unit("MegaBytes"), Some(1 << 20));
        assert_eq!(allocation_unit("byte * 2^64"), None);
        assert_eq!(allocation_unit("bit"), None);
        assert_eq!(allocation_unit("byte * x"), None);
    }

    // ---- qemu-img -------------------------------------------------------------------------

    /// Runs qemu-img (required on the test machine) in `dir`.
    fn qemu_img(dir: &std::path::Path, args: &[&str]) {
        let status = std::process::Command::new("qemu-img")
            .args(args)
            .current_dir(dir)
            .stdout(std::process::Stdio::null())
            .status()
            .expect("qemu-img must be installed to run this test");
        assert!(status.success(), "qemu-img {args:?}");
    }

    fn qemu_virtual_size(dir: &std::path::Path, file: &str, format: &str) -> u64 {
        let out = std::process::Command::new("qemu-img")
            .args(["info", "--output=json", "-f", format, file])
            .current_dir(dir)
            .output()
            .expect("qemu-img must be installed to run this test");
        let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        info["virtual-size"].as_u64().unwrap()
    }

    fn inspect_file(declared: ImageFormat, path: &std::path::Path) -> Result<Inspection, InspectError> {
        let data = std::fs::read(path).unwrap();
        let mut inspector = Inspector::new(declared);
        for chunk in data.chunks(65_536) {
            inspector.update(chunk)?;
        }
        inspector.finish()
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

    // ---- properties -----------------------------------------------------------------------

    /// Valid samples of every format, for mutation.
    fn samples() -> Vec<Vec<u8>> {
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
    fn ova_descriptor_last() -> Vec<u8> {
        let mut tar = Vec::new();
        tar_entry(&mut tar, "disk1.vmdk", b'0', &raw(700));
        tar_entry(&mut tar, "x.mf", b'0', MF);
        tar_entry(&mut tar, "x.ovf", b'0', OVF.as_bytes());
        tar_end(&mut tar);
        tar
    }

    fn chunked(data: Vec<u8>, cuts: Vec<usize>) -> Vec<Vec<u8>> {
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

    fn run_pieces(declared: ImageFormat, pieces: &[Vec<u8>]) -> Result<Inspection, InspectError> {
        let mut inspector = Inspector::new(declared);
        for piece in pieces {
            inspector.update(piece)?;
        }
        inspector.finish()
    }

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

        #[test]
        fn arbitrary_ovf_never_panics(text in ".{0,400}") {
            let _ = ovf_virtual_size(text.as_bytes());
            let _ = allocation_unit(&text);
        }
    }
}
