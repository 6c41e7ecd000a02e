//! OVA: a ustar archive holding exactly one `.ovf` descriptor (at most [`MAX_OVF_LEN`] bytes), at
//! any position, as CloudStack's `OVAProcessor` finds it: the entries before it (manifest `.mf`,
//! certificate `.cert`, disks, as `tar cf x.ova *` orders them) are skipped as they stream by,
//! without being buffered. Virtual size: the sum of the `<Disk>` capacities of the descriptor's
//! `DiskSection`.
//!
//! Invariants:
//! - memory is bounded: one header block, the descriptor (at most [`MAX_OVF_LEN`]) and at most
//!   64 KiB of pax or GNU extended headers; entry bodies are never held;
//! - links, devices and names that are absolute or contain `..` are refused wherever they
//!   appear; a second `.ovf` entry is refused, and so is an archive that ends without any.

use super::InspectError;

/// Largest OVF descriptor accepted in an OVA.
pub const MAX_OVF_LEN: u64 = 4 * 1024 * 1024;
const TAR_BLOCK: usize = 512;
const MAX_TAR_META_LEN: u64 = 64 * 1024;

/// Streaming walk over the ustar archive of an OVA.
#[derive(Debug, Default)]
pub(super) struct TarWalker {
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
    pub(super) fn feed(&mut self, mut data: &[u8]) -> Result<(), InspectError> {
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

    pub(super) fn finish(&self) -> Result<u64, InspectError> {
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
    use crate::testutil::*;
    use crate::*;
    use proptest::prelude::*;

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

    proptest! {
        #[test]
        fn arbitrary_ovf_never_panics(text in ".{0,400}") {
            let _ = ovf_virtual_size(text.as_bytes());
            let _ = allocation_unit(&text);
        }
    }
}
