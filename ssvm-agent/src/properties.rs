//! `template.properties`, byte-compatible with CloudStack secondary storage.
//!
//! CloudStack's `createtmplt.sh` writes `filename`, `description`, `checksum`, `hvm` and
//! `size`; `TemplateLocation` then adds `id`, `public`, `uniquename`, `virtualsize` and, per
//! installed format, `<fmt>=true`, `<fmt>.filename`, `<fmt>.size` and `<fmt>.virtualsize`, and
//! stores the whole as a Java Properties file. [`TemplateProperties::to_java_properties`]
//! writes the same keys with `java.util.Properties.store` escaping, and
//! [`parse_java_properties`] reads any file `java.util.Properties.load` reads.
//!
//! Invariants:
//! - writing then parsing gives back every key and value exactly (escaping is lossless for
//!   any Unicode text, written as ASCII with `\uXXXX` escapes);
//! - [`TemplateProperties::from_map`] accepts exactly the installs CloudStack's
//!   `TemplateLocation.load` treats as complete: `uniquename` and `virtualsize` present and at
//!   least one valid format entry (`<fmt>.filename` set, `<fmt>.size` > 0,
//!   `<fmt>.virtualsize` > 0); fields CloudStack does not require get defaults rather than
//!   failing, because an incomplete install is deleted.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use crate::checksum::Checksum;
use crate::inspect::ImageFormat;

/// Name of the file in a template's directory.
pub const TEMPLATE_PROPERTIES: &str = "template.properties";

/// The content of a template's `template.properties`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TemplateProperties {
    /// CloudStack template id (`id`).
    pub id: String,
    /// Unique name (`uniquename`).
    pub unique_name: String,
    /// Display text (`description`).
    pub description: String,
    /// Installed format (`<fmt>=true`).
    pub format: ImageFormat,
    /// Image file name in the template directory (`filename`, `<fmt>.filename`).
    pub filename: String,
    /// Physical size in bytes (`size`, `<fmt>.size`).
    pub size: u64,
    /// Virtual size in bytes (`virtualsize`, `<fmt>.virtualsize`).
    pub virtual_size: u64,
    /// Checksum as registered (`checksum`; omitted when `None`).
    pub checksum: Option<Checksum>,
    /// Whether the template needs hardware virtualisation (`hvm`).
    pub hvm: bool,
    /// Whether the template is public (`public`).
    pub public: bool,
}

/// Why a directory's properties do not describe a complete install.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IncompleteInstall {
    /// No `uniquename` key.
    #[error("template.properties has no uniquename")]
    NoUniqueName,
    /// No `virtualsize` key.
    #[error("template.properties has no virtualsize")]
    NoVirtualSize,
    /// No `<fmt>` key for any known format.
    #[error("template.properties has no format entry")]
    NoFormatEntry,
    /// Format entries exist, none of them valid; this is the first one.
    #[error("template.properties has no valid format entry: {format} {reason}")]
    InvalidFormatEntry {
        /// Format of the first invalid entry.
        format: ImageFormat,
        /// What is wrong with it.
        reason: &'static str,
    },
}

/// Syntax error in a Java Properties file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PropertiesError {
    /// `\u` not followed by four hex digits.
    #[error("line {line}: malformed \\uxxxx escape")]
    MalformedUnicodeEscape {
        /// 1-based line where the logical line starts.
        line: usize,
    },
    /// `\uXXXX` escapes that leave a UTF-16 surrogate unpaired.
    #[error("line {line}: unpaired utf-16 surrogate in a \\u escape")]
    UnpairedSurrogate {
        /// 1-based line where the logical line starts.
        line: usize,
    },
}

/// Failure to read a `template.properties` file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LoadTemplatePropertiesError {
    /// The file is not a valid Java Properties file.
    #[error(transparent)]
    Syntax(#[from] PropertiesError),
    /// The file describes an incomplete install.
    #[error(transparent)]
    Incomplete(#[from] IncompleteInstall),
}

impl TemplateProperties {
    /// The file content: a `#` line, a `#<now_comment>` line (CloudStack writes the date,
    /// e.g. `Mon Nov 23 10:15:42 UTC 2026`), then the CloudStack keys.
    pub fn to_java_properties(&self, now_comment: &str) -> String {
        let fmt = self.format.properties_key();
        let size = self.size.to_string();
        let virtual_size = self.virtual_size.to_string();
        let checksum = self.checksum.as_ref().map(ToString::to_string);
        let mut entries: Vec<(String, &str)> = vec![
            ("filename".into(), self.filename.as_str()),
            ("description".into(), self.description.as_str()),
        ];
        if let Some(checksum) = &checksum {
            entries.push(("checksum".into(), checksum.as_str()));
        }
        entries.extend([
            ("hvm".into(), bool_str(self.hvm)),
            ("size".into(), size.as_str()),
            ("id".into(), self.id.as_str()),
            ("public".into(), bool_str(self.public)),
            ("uniquename".into(), self.unique_name.as_str()),
            ("virtualsize".into(), virtual_size.as_str()),
            (fmt.into(), "true"),
            (format!("{fmt}.filename"), self.filename.as_str()),
            (format!("{fmt}.size"), size.as_str()),
            (format!("{fmt}.virtualsize"), virtual_size.as_str()),
        ]);
        write_java_properties(entries.iter().map(|(k, v)| (k.as_str(), *v)), now_comment)
    }

    /// Reads the properties of an install, as CloudStack's `TemplateLocation.load` does.
    ///
    /// The format is the first valid entry in CloudStack's order (QCOW2, RAW, VHD, ISO, OVA).
    /// `filename`, `size` and `virtualsize` come from the top-level keys when they are usable
    /// (CloudStack reports those), else from the format entry. Missing `id`, `description`
    /// become empty, missing `hvm`/`public` false (Java's `Boolean.parseBoolean`), and an
    /// empty or unparsable `checksum` becomes `None`.
    pub fn from_map(map: &BTreeMap<String, String>) -> Result<TemplateProperties, IncompleteInstall> {
        let get = |key: &str| map.get(key).map(String::as_str);
        let unique_name = get("uniquename").ok_or(IncompleteInstall::NoUniqueName)?;
        let top_virtual_size = get("virtualsize").ok_or(IncompleteInstall::NoVirtualSize)?;

        let mut first_invalid = None;
        let mut valid = None;
        for format in ImageFormat::ALL {
            let key = format.properties_key();
            if get(key).is_none() {
                continue;
            }
            match format_entry(map, key) {
                Ok(entry) => {
                    valid = Some((format, entry));
                    break;
                }
                Err(reason) => {
                    if first_invalid.is_none() {
                        first_invalid = Some(IncompleteInstall::InvalidFormatEntry { format, reason });
                    }
                }
            }
        }
        let (format, entry) = valid.ok_or(first_invalid.unwrap_or(IncompleteInstall::NoFormatEntry))?;

        let filename = get("filename")
            .filter(|f| !f.is_empty())
            .unwrap_or(entry.filename)
            .to_owned();
        let size = positive(get("size")).unwrap_or(entry.size);
        let virtual_size = positive(Some(top_virtual_size)).unwrap_or(entry.virtual_size);
        let checksum = get("checksum").and_then(|c| c.parse::<Checksum>().ok());
        Ok(TemplateProperties {
            id: get("id").unwrap_or_default().to_owned(),
            unique_name: unique_name.to_owned(),
            description: get("description").unwrap_or_default().to_owned(),
            format,
            filename,
            size,
            virtual_size,
            checksum,
            hvm: java_bool(get("hvm")),
            public: java_bool(get("public")),
        })
    }

    /// Parses a `template.properties` file and checks that it describes a complete install.
    pub fn from_java_properties(text: &str) -> Result<TemplateProperties, LoadTemplatePropertiesError> {
        Ok(TemplateProperties::from_map(&parse_java_properties(text)?)?)
    }
}

struct FormatEntry<'a> {
    filename: &'a str,
    size: u64,
    virtual_size: u64,
}

fn format_entry<'a>(map: &'a BTreeMap<String, String>, key: &str) -> Result<FormatEntry<'a>, &'static str> {
    let filename = map
        .get(&format!("{key}.filename"))
        .map(String::as_str)
        .filter(|f| !f.is_empty())
        .ok_or("has no filename")?;
    let size = positive(map.get(&format!("{key}.size")).map(String::as_str)).ok_or("has no positive size")?;
    let virtual_size = positive(map.get(&format!("{key}.virtualsize")).map(String::as_str))
        .ok_or("has no positive virtualsize")?;
    Ok(FormatEntry {
        filename,
        size,
        virtual_size,
    })
}

/// A decimal value > 0 (Java's `Long.parseLong` syntax, surrounding whitespace tolerated).
fn positive(value: Option<&str>) -> Option<u64> {
    let value = value?.trim();
    let value = value.strip_prefix('+').unwrap_or(value);
    value.parse::<u64>().ok().filter(|n| *n > 0)
}

fn java_bool(value: Option<&str>) -> bool {
    value.is_some_and(|v| v.eq_ignore_ascii_case("true"))
}

fn bool_str(value: bool) -> &'static str {
    if value { "true" } else { "false" }
}

/// Writes entries as `java.util.Properties.store(out, "")` does: a `#` line, a
/// `#<now_comment>` line, then `key=value` lines in the given order, escaped, `\n`-terminated.
pub fn write_java_properties<'a>(
    entries: impl IntoIterator<Item = (&'a str, &'a str)>,
    now_comment: &str,
) -> String {
    let mut out = String::from("#\n");
    write_comment(&mut out, now_comment);
    for (key, value) in entries {
        escape(&mut out, key, true);
        out.push('=');
        escape(&mut out, value, false);
        out.push('\n');
    }
    out
}

/// `Properties.writeComments`: each line of the comment behind a `#` (a line already starting
/// with `#` or `!` is kept as is), non-ASCII as `\uXXXX`.
fn write_comment(out: &mut String, comment: &str) {
    let normalized = comment.replace("\r\n", "\n").replace('\r', "\n");
    for (i, line) in normalized.split('\n').enumerate() {
        if i == 0 || !(line.starts_with('#') || line.starts_with('!')) {
            out.push('#');
        }
        for c in line.chars() {
            if c.is_ascii() && !c.is_ascii_control() {
                out.push(c);
            } else {
                push_unicode_escapes(out, c);
            }
        }
        out.push('\n');
    }
}

/// `Properties.saveConvert` with `escUnicode`: escapes `\`, `=`, `:`, `#`, `!`, tab, line
/// breaks, form feed, spaces (all of them in keys, a leading one in values) and every
/// character outside printable ASCII as `\uXXXX` (UTF-16 code units, upper-case hex).
fn escape(out: &mut String, text: &str, is_key: bool) {
    for (i, c) in text.chars().enumerate() {
        match c {
            '\\' => out.push_str("\\\\"),
            ' ' if i == 0 || is_key => out.push_str("\\ "),
            '\t' => out.push_str("\\t"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\u{c}' => out.push_str("\\f"),
            '=' | ':' | '#' | '!' => {
                out.push('\\');
                out.push(c);
            }
            ' '..='~' => out.push(c),
            _ => push_unicode_escapes(out, c),
        }
    }
}

fn push_unicode_escapes(out: &mut String, c: char) {
    let mut units = [0u16; 2];
    for unit in c.encode_utf16(&mut units) {
        let _ = write!(out, "\\u{unit:04X}");
    }
}

/// Parses a Java Properties file as `java.util.Properties.load` does: `#` and `!` comment
/// lines, blank lines, `key=value`, `key:value` or `key value` (whitespace around the
/// separator ignored), backslash escapes (`\t`, `\n`, `\r`, `\f`, `\uXXXX`, `\x` for any
/// other `x`), and lines continued by an odd number of trailing backslashes. A later key
/// replaces an earlier one. The text is taken as decoded (Java reads ISO-8859-1 bytes;
/// CloudStack writes ASCII only).
pub fn parse_java_properties(text: &str) -> Result<BTreeMap<String, String>, PropertiesError> {
    let mut map = BTreeMap::new();
    let mut lines = natural_lines(text).enumerate().peekable();
    while let Some((index, line)) = lines.next() {
        let line_no = index + 1;
        let line = trim_leading_whitespace(line);
        if line.is_empty() || line.starts_with('#') || line.starts_with('!') {
            continue;
        }
        let mut logical: Vec<char> = Vec::new();
        let mut current = line;
        loop {
            logical.extend(current.chars());
            if !ends_with_odd_backslashes(current) {
                break;
            }
            logical.pop();
            match lines.next() {
                Some((_, next)) => current = trim_leading_whitespace(next),
                None => break,
            }
        }
        let (key, value) = split_key_value(&logical);
        map.insert(unescape(key, line_no)?, unescape(value, line_no)?);
    }
    Ok(map)
}

/// Lines ended by `\n`, `\r` or `\r\n`.
fn natural_lines(text: &str) -> impl Iterator<Item = &str> {
    let mut rest = Some(text);
    std::iter::from_fn(move || {
        let text = rest?;
        match text.find(['\n', '\r']) {
            Some(end) => {
                let skip = if text[end..].starts_with("\r\n") { 2 } else { 1 };
                rest = Some(&text[end + skip..]);
                Some(&text[..end])
            }
            None => {
                rest = None;
                (!text.is_empty()).then_some(text)
            }
        }
    })
}

fn is_properties_whitespace(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\u{c}')
}

fn trim_leading_whitespace(line: &str) -> &str {
    line.trim_start_matches(is_properties_whitespace)
}

fn ends_with_odd_backslashes(line: &str) -> bool {
    line.chars().rev().take_while(|c| *c == '\\').count() % 2 == 1
}

/// Splits a logical line at the first unescaped `=`, `:` or whitespace (`Properties.load0`).
fn split_key_value(line: &[char]) -> (&[char], &[char]) {
    let mut key_end = line.len();
    let mut value_start = line.len();
    let mut has_separator = false;
    let mut preceding_backslash = false;
    for (i, &c) in line.iter().enumerate() {
        if !preceding_backslash && (c == '=' || c == ':') {
            key_end = i;
            value_start = i + 1;
            has_separator = true;
            break;
        }
        if !preceding_backslash && is_properties_whitespace(c) {
            key_end = i;
            value_start = i + 1;
            break;
        }
        preceding_backslash = c == '\\' && !preceding_backslash;
    }
    while let Some(&c) = line.get(value_start) {
        if is_properties_whitespace(c) {
            value_start += 1;
        } else if !has_separator && (c == '=' || c == ':') {
            has_separator = true;
            value_start += 1;
        } else {
            break;
        }
    }
    (&line[..key_end], &line[value_start..])
}

/// `Properties.loadConvert`: resolves the escapes of a key or value.
fn unescape(text: &[char], line: usize) -> Result<String, PropertiesError> {
    let mut units: Vec<u16> = Vec::with_capacity(text.len());
    let mut chars = text.iter().copied();
    while let Some(c) = chars.next() {
        let c = if c == '\\' {
            match chars.next() {
                None => break,
                Some('u') => {
                    let mut unit = 0u16;
                    for _ in 0..4 {
                        let digit = chars
                            .next()
                            .and_then(|d| d.to_digit(16))
                            .ok_or(PropertiesError::MalformedUnicodeEscape { line })?;
                        unit = unit * 16 + digit as u16;
                    }
                    units.push(unit);
                    continue;
                }
                Some('t') => '\t',
                Some('n') => '\n',
                Some('r') => '\r',
                Some('f') => '\u{c}',
                Some(other) => other,
            }
        } else {
            c
        };
        let mut buf = [0u16; 2];
        units.extend_from_slice(c.encode_utf16(&mut buf));
    }
    String::from_utf16(&units).map_err(|_| PropertiesError::UnpairedSurrogate { line })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checksum::ChecksumAlgo;
    use proptest::prelude::*;

    const CLOUDSTACK_FILE: &str = "#
#Mon Nov 23 10:15:42 UTC 2026
filename=5d1c8b1e-2f0a-3d8c-9f1e-1b7f2c9d0e4a.qcow2
description=CentOS 7
checksum={SHA-256}9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08
hvm=true
size=1073741824
qcow2=true
id=201
public=true
qcow2.filename=5d1c8b1e-2f0a-3d8c-9f1e-1b7f2c9d0e4a.qcow2
uniquename=201-2-9c2b8a1d-centos7
virtualsize=8589934592
qcow2.virtualsize=8589934592
qcow2.size=1073741824
";

    fn centos() -> TemplateProperties {
        TemplateProperties {
            id: "201".into(),
            unique_name: "201-2-9c2b8a1d-centos7".into(),
            description: "CentOS 7".into(),
            format: ImageFormat::Qcow2,
            filename: "5d1c8b1e-2f0a-3d8c-9f1e-1b7f2c9d0e4a.qcow2".into(),
            size: 1_073_741_824,
            virtual_size: 8_589_934_592,
            checksum: Some(Checksum {
                algo: ChecksumAlgo::Sha256,
                hex: "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08".into(),
            }),
            hvm: true,
            public: true,
        }
    }

    #[test]
    fn parses_a_cloudstack_file() {
        let map = parse_java_properties(CLOUDSTACK_FILE).unwrap();
        assert_eq!(map.len(), 13);
        assert_eq!(map["description"], "CentOS 7");
        assert_eq!(TemplateProperties::from_map(&map).unwrap(), centos());
        assert_eq!(
            TemplateProperties::from_java_properties(CLOUDSTACK_FILE).unwrap(),
            centos()
        );
        let crlf = CLOUDSTACK_FILE.replace('\n', "\r\n");
        assert_eq!(TemplateProperties::from_java_properties(&crlf).unwrap(), centos());
    }

    #[test]
    fn writes_cloudstack_keys_in_order() {
        let text = centos().to_java_properties("Mon Nov 23 10:15:42 UTC 2026");
        assert_eq!(
            text,
            "#
#Mon Nov 23 10:15:42 UTC 2026
filename=5d1c8b1e-2f0a-3d8c-9f1e-1b7f2c9d0e4a.qcow2
description=CentOS 7
checksum={SHA-256}9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08
hvm=true
size=1073741824
id=201
public=true
uniquename=201-2-9c2b8a1d-centos7
virtualsize=8589934592
qcow2=true
qcow2.filename=5d1c8b1e-2f0a-3d8c-9f1e-1b7f2c9d0e4a.qcow2
qcow2.size=1073741824
qcow2.virtualsize=8589934592
"
        );
        assert_eq!(TemplateProperties::from_java_properties(&text).unwrap(), centos());
    }

    #[test]
    fn every_format_round_trips() {
        for format in ImageFormat::ALL {
            let props = TemplateProperties {
                format,
                checksum: None,
                hvm: false,
                public: false,
                filename: format!("t.{}", format.extension()),
                ..centos()
            };
            let text = props.to_java_properties("now");
            assert!(text.contains(&format!("\n{}=true\n", format.properties_key())));
            assert!(!text.contains("checksum"));
            assert_eq!(TemplateProperties::from_java_properties(&text).unwrap(), props);
        }
    }

    #[test]
    fn escapes_like_java() {
        let out = write_java_properties(
            [
                ("a key", " lead=x:y#z!w\\"),
                ("k", "tab\there\nnl\rcr\u{c}ff trailing "),
                ("é", "日本 😀 \u{1}"),
                ("#k!", ""),
            ],
            "Mon Nov 23 10:15:42 UTC 2026",
        );
        assert_eq!(
            out,
            "#\n#Mon Nov 23 10:15:42 UTC 2026\n\
             a\\ key=\\ lead\\=x\\:y\\#z\\!w\\\\\n\
             k=tab\\there\\nnl\\rcr\\fff trailing \n\
             \\u00E9=\\u65E5\\u672C \\uD83D\\uDE00 \\u0001\n\
             \\#k\\!=\n"
        );
        let map = parse_java_properties(&out).unwrap();
        assert_eq!(map["a key"], " lead=x:y#z!w\\");
        assert_eq!(map["k"], "tab\there\nnl\rcr\u{c}ff trailing ");
        assert_eq!(map["é"], "日本 😀 \u{1}");
        assert_eq!(map["#k!"], "");
    }

    #[test]
    fn comment_lines_are_commented() {
        let out = write_java_properties([], "one\ntwo\r\n!three\rfour é");
        assert_eq!(out, "#\n#one\n#two\n!three\n#four \\u00E9\n");
        assert!(parse_java_properties(&out).unwrap().is_empty());
    }

    #[test]
    fn parses_java_syntax() {
        let text = "\
# comment
! also a comment
   \t
  spaced   =   value with trailing spaces   
colon:value
white space
key\\ with\\ spaces = v
empty
empty2=
multi = first \\
        second \\
   # not a comment
odd\\\\
next=line
cont=a\\
\\
c
dup=1
dup=2
uni=\\u0041\\u00e9\\uD83D\\uDE00
esc=\\a\\t\\=\\
";
        let map = parse_java_properties(text).unwrap();
        let get = |k: &str| map.get(k).map(String::as_str);
        assert_eq!(get("spaced"), Some("value with trailing spaces   "));
        assert_eq!(get("colon"), Some("value"));
        assert_eq!(get("white"), Some("space"));
        assert_eq!(get("key with spaces"), Some("v"));
        assert_eq!(get("empty"), Some(""));
        assert_eq!(get("empty2"), Some(""));
        assert_eq!(get("multi"), Some("first second # not a comment"));
        assert_eq!(get("odd\\"), Some(""));
        assert_eq!(get("next"), Some("line"));
        assert_eq!(get("cont"), Some("ac"));
        assert_eq!(get("dup"), Some("2"));
        assert_eq!(get("uni"), Some("Aé😀"));
        assert_eq!(get("esc"), Some("a\t="));
        assert_eq!(map.len(), 13);
    }

    #[test]
    fn blank_line_ends_a_continuation() {
        let map = parse_java_properties("a=1\\\n\nb=2\n").unwrap();
        assert_eq!(map["a"], "1");
        assert_eq!(map["b"], "2");
    }

    #[test]
    fn syntax_errors() {
        assert_eq!(
            parse_java_properties("a=1\nb=\\u12"),
            Err(PropertiesError::MalformedUnicodeEscape { line: 2 })
        );
        assert_eq!(
            parse_java_properties("a=\\uzzzz"),
            Err(PropertiesError::MalformedUnicodeEscape { line: 1 })
        );
        assert_eq!(
            parse_java_properties("\n\na=\\uD800"),
            Err(PropertiesError::UnpairedSurrogate { line: 3 })
        );
    }

    #[test]
    fn incomplete_installs() {
        let base = parse_java_properties(CLOUDSTACK_FILE).unwrap();
        let without = |keys: &[&str]| {
            let mut map = base.clone();
            for k in keys {
                map.remove(*k);
            }
            TemplateProperties::from_map(&map)
        };
        assert_eq!(without(&["uniquename"]), Err(IncompleteInstall::NoUniqueName));
        assert_eq!(without(&["virtualsize"]), Err(IncompleteInstall::NoVirtualSize));
        assert_eq!(without(&["qcow2"]), Err(IncompleteInstall::NoFormatEntry));
        assert_eq!(
            without(&["qcow2.filename"]),
            Err(IncompleteInstall::InvalidFormatEntry {
                format: ImageFormat::Qcow2,
                reason: "has no filename"
            })
        );
        assert_eq!(
            without(&["qcow2.size"]),
            Err(IncompleteInstall::InvalidFormatEntry {
                format: ImageFormat::Qcow2,
                reason: "has no positive size"
            })
        );
        let mut map = base.clone();
        map.insert("qcow2.virtualsize".into(), "0".into());
        assert!(matches!(
            TemplateProperties::from_map(&map),
            Err(IncompleteInstall::InvalidFormatEntry { .. })
        ));
        // A valid entry of another format rescues the install.
        map.insert("vhd".into(), "true".into());
        map.insert("vhd.filename".into(), "x.vhd".into());
        map.insert("vhd.size".into(), "10".into());
        map.insert("vhd.virtualsize".into(), "20".into());
        map.remove("filename");
        map.remove("size");
        map.insert("virtualsize".into(), "garbage".into());
        let props = TemplateProperties::from_map(&map).unwrap();
        assert_eq!(props.format, ImageFormat::Vhd);
        assert_eq!(props.filename, "x.vhd");
        assert_eq!(props.size, 10);
        assert_eq!(props.virtual_size, 20);
        assert_eq!(
            TemplateProperties::from_java_properties("uniquename=x\nvirtualsize=1\n"),
            Err(LoadTemplatePropertiesError::Incomplete(
                IncompleteInstall::NoFormatEntry
            ))
        );
        assert_eq!(
            IncompleteInstall::InvalidFormatEntry {
                format: ImageFormat::Qcow2,
                reason: "has no filename"
            }
            .to_string(),
            "template.properties has no valid format entry: QCOW2 has no filename"
        );
    }

    #[test]
    fn lenient_on_what_cloudstack_does_not_require() {
        let text = "uniquename=u\nvirtualsize=5\niso=true\niso.filename=a.iso\niso.size=5\niso.virtualsize=5\nchecksum=nonsense\nhvm=TRUE\n";
        let props = TemplateProperties::from_java_properties(text).unwrap();
        assert_eq!(props.id, "");
        assert_eq!(props.description, "");
        assert_eq!(props.checksum, None);
        assert!(props.hvm);
        assert!(!props.public);
        assert_eq!(props.filename, "a.iso");
        // Legacy bare MD5.
        let text = format!("{text}checksum=900150983cd24fb0d6963f7d28e17f72\n");
        let props = TemplateProperties::from_java_properties(&text).unwrap();
        assert_eq!(props.checksum.map(|c| c.algo), Some(ChecksumAlgo::Md5));
    }

    fn format() -> impl Strategy<Value = ImageFormat> {
        prop::sample::select(ImageFormat::ALL.to_vec())
    }

    proptest! {
        #[test]
        fn any_text_round_trips(entries in prop::collection::btree_map(".{0,12}", ".{0,24}", 0..8), comment in ".{0,30}") {
            let text = write_java_properties(entries.iter().map(|(k, v)| (k.as_str(), v.as_str())), &comment);
            prop_assert!(text.is_ascii());
            prop_assert_eq!(parse_java_properties(&text).unwrap(), entries);
        }

        #[test]
        fn template_properties_round_trip(
            id in "[0-9]{1,6}",
            unique_name in ".{1,20}",
            description in ".{0,40}",
            format in format(),
            filename in ".{1,20}",
            size in 1u64..,
            virtual_size in 1u64..,
            digest in prop::option::of(prop::collection::vec(any::<u8>(), 32)),
            hvm in any::<bool>(),
            public in any::<bool>(),
        ) {
            let props = TemplateProperties {
                id, unique_name, description, format, filename, size, virtual_size,
                checksum: digest.map(|d| Checksum::from_digest(ChecksumAlgo::Sha256, &d).unwrap()),
                hvm, public,
            };
            let text = props.to_java_properties("Mon Nov 23 10:15:42 UTC 2026");
            prop_assert_eq!(TemplateProperties::from_java_properties(&text).unwrap(), props);
        }

        #[test]
        fn parser_never_panics(text in "(.|\n|\r|\\\\){0,200}") {
            let _ = parse_java_properties(&text);
        }
    }
}
