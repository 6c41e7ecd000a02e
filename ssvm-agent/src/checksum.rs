//! CloudStack checksums (`{ALGO}hex`) and the streaming hasher that verifies them.
//!
//! CloudStack stores a template's checksum as `{ALGO}hex`, where `ALGO` is a Java
//! `MessageDigest` name (`MD5`, `SHA-1`, `SHA-224`, `SHA-256`, `SHA-384`, `SHA-512`); a value
//! without braces is a bare MD5 digest (the pre-4.14 form).
//!
//! Invariants:
//! - a [`Checksum`] always holds a known algorithm and exactly [`ChecksumAlgo::hex_len`]
//!   lowercase hexadecimal digits: parsing rejects every other shape, so nothing downstream
//!   re-validates it;
//! - [`Checksum`]'s `Display` always uses the braced form (`{MD5}…` too), which parses back to
//!   the same value;
//! - [`Checksum::matches`] compares digests in constant time (no early exit on the first
//!   differing byte);
//! - the digest is computed over the bytes as downloaded, before any decompression: the caller
//!   feeds [`Hasher`] the wire bytes.

use std::fmt;
use std::str::FromStr;

use md5::Digest as _;
use subtle::ConstantTimeEq as _;

/// A digest algorithm CloudStack accepts in a template checksum.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ChecksumAlgo {
    /// MD5 (the default when the checksum has no `{ALGO}` prefix).
    Md5,
    /// SHA-1.
    Sha1,
    /// SHA-224.
    Sha224,
    /// SHA-256.
    Sha256,
    /// SHA-384.
    Sha384,
    /// SHA-512.
    Sha512,
}

impl ChecksumAlgo {
    /// Every algorithm, weakest first.
    pub const ALL: [ChecksumAlgo; 6] = [
        ChecksumAlgo::Md5,
        ChecksumAlgo::Sha1,
        ChecksumAlgo::Sha224,
        ChecksumAlgo::Sha256,
        ChecksumAlgo::Sha384,
        ChecksumAlgo::Sha512,
    ];

    /// The Java `MessageDigest` name (`MD5`, `SHA-1`, `SHA-256`, …).
    pub fn java_name(self) -> &'static str {
        match self {
            ChecksumAlgo::Md5 => "MD5",
            ChecksumAlgo::Sha1 => "SHA-1",
            ChecksumAlgo::Sha224 => "SHA-224",
            ChecksumAlgo::Sha256 => "SHA-256",
            ChecksumAlgo::Sha384 => "SHA-384",
            ChecksumAlgo::Sha512 => "SHA-512",
        }
    }

    /// Length of the digest in bytes.
    pub fn digest_len(self) -> usize {
        match self {
            ChecksumAlgo::Md5 => 16,
            ChecksumAlgo::Sha1 => 20,
            ChecksumAlgo::Sha224 => 28,
            ChecksumAlgo::Sha256 => 32,
            ChecksumAlgo::Sha384 => 48,
            ChecksumAlgo::Sha512 => 64,
        }
    }

    /// Length of the digest in hexadecimal digits.
    pub fn hex_len(self) -> usize {
        self.digest_len() * 2
    }
}

impl fmt::Display for ChecksumAlgo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.java_name())
    }
}

impl FromStr for ChecksumAlgo {
    type Err = ChecksumParseError;

    /// Accepts the Java names case-insensitively, with or without the dash (`sha256`,
    /// `Sha-256`), and Java's alias `SHA` for SHA-1.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let normalized: String = s
            .chars()
            .filter(|c| *c != '-')
            .map(|c| c.to_ascii_uppercase())
            .collect();
        match normalized.as_str() {
            "MD5" => Ok(ChecksumAlgo::Md5),
            "SHA" | "SHA1" => Ok(ChecksumAlgo::Sha1),
            "SHA224" => Ok(ChecksumAlgo::Sha224),
            "SHA256" => Ok(ChecksumAlgo::Sha256),
            "SHA384" => Ok(ChecksumAlgo::Sha384),
            "SHA512" => Ok(ChecksumAlgo::Sha512),
            _ => Err(ChecksumParseError::UnknownAlgorithm(s.to_owned())),
        }
    }
}

/// Why a checksum string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChecksumParseError {
    /// The string is empty (or only whitespace).
    #[error("empty checksum")]
    Empty,
    /// `{` without a closing `}`.
    #[error("checksum has an opening brace but no closing brace")]
    UnclosedBrace,
    /// The name between the braces is not a supported digest.
    #[error("unknown checksum algorithm {0:?}")]
    UnknownAlgorithm(String),
    /// The digest has the wrong number of hex digits for its algorithm.
    #[error("a {algo} checksum has {expected} hex digits, not {actual}")]
    WrongLength {
        /// The algorithm named (or MD5 by default).
        algo: ChecksumAlgo,
        /// [`ChecksumAlgo::hex_len`].
        expected: usize,
        /// Digits found.
        actual: usize,
    },
    /// The digest contains a character that is not a hex digit.
    #[error("checksum digest is not hexadecimal")]
    NotHex,
}

/// A checksum as CloudStack stores it: an algorithm and its lowercase hex digest.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Checksum {
    /// Digest algorithm.
    pub algo: ChecksumAlgo,
    /// Lowercase hexadecimal digest, exactly `algo.hex_len()` digits.
    pub hex: String,
}

impl Checksum {
    /// Builds a checksum from an algorithm and a hex digest (any case), checking the length
    /// and the digits.
    pub fn new(algo: ChecksumAlgo, hex: &str) -> Result<Self, ChecksumParseError> {
        let actual = hex.chars().count();
        if actual != algo.hex_len() {
            return Err(ChecksumParseError::WrongLength {
                algo,
                expected: algo.hex_len(),
                actual,
            });
        }
        if !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(ChecksumParseError::NotHex);
        }
        Ok(Checksum {
            algo,
            hex: hex.to_ascii_lowercase(),
        })
    }

    /// Builds a checksum from raw digest bytes. `None` when the length does not fit `algo`.
    pub fn from_digest(algo: ChecksumAlgo, digest: &[u8]) -> Option<Self> {
        (digest.len() == algo.digest_len()).then(|| Checksum {
            algo,
            hex: hex::encode(digest),
        })
    }

    /// The digest as bytes.
    pub fn digest(&self) -> Vec<u8> {
        // The invariant guarantees valid hex; an empty vector can only come from a value built
        // by hand with a bad `hex` field, and it then matches nothing.
        hex::decode(&self.hex).unwrap_or_default()
    }

    /// Whether `other_hex` (a bare hex digest, any case) is this digest. The comparison of the
    /// digest bytes runs in constant time; a string of the wrong length or with non-hex
    /// characters never matches.
    pub fn matches(&self, other_hex: &str) -> bool {
        let Ok(other) = hex::decode(other_hex) else {
            return false;
        };
        let mine = self.digest();
        if mine.len() != self.algo.digest_len() || other.len() != mine.len() {
            return false;
        }
        bool::from(mine.as_slice().ct_eq(other.as_slice()))
    }

    /// Whether `other` has the same algorithm and digest (digest compared in constant time).
    pub fn matches_checksum(&self, other: &Checksum) -> bool {
        self.algo == other.algo && self.matches(&other.hex)
    }
}

impl FromStr for Checksum {
    type Err = ChecksumParseError;

    /// Parses `{ALGO}hex` or a bare MD5 hex digest. Surrounding whitespace is ignored; the hex
    /// digits may be in any case.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if s.is_empty() {
            return Err(ChecksumParseError::Empty);
        }
        let (algo, digest) = match s.strip_prefix('{') {
            Some(rest) => {
                let (name, digest) = rest.split_once('}').ok_or(ChecksumParseError::UnclosedBrace)?;
                (name.trim().parse::<ChecksumAlgo>()?, digest.trim())
            }
            None => (ChecksumAlgo::Md5, s),
        };
        Checksum::new(algo, digest)
    }
}

impl fmt::Display for Checksum {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{{{}}}{}", self.algo, self.hex)
    }
}

/// Streaming digest over one of the [`ChecksumAlgo`]s.
#[derive(Clone)]
pub struct Hasher {
    inner: HasherInner,
}

#[derive(Clone)]
enum HasherInner {
    Md5(md5::Md5),
    Sha1(sha1::Sha1),
    Sha224(sha2::Sha224),
    Sha256(sha2::Sha256),
    Sha384(sha2::Sha384),
    Sha512(sha2::Sha512),
}

impl fmt::Debug for Hasher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Hasher")
            .field("algo", &self.algo())
            .finish_non_exhaustive()
    }
}

impl Hasher {
    /// A fresh hasher for `algo`.
    pub fn new(algo: ChecksumAlgo) -> Self {
        let inner = match algo {
            ChecksumAlgo::Md5 => HasherInner::Md5(md5::Md5::new()),
            ChecksumAlgo::Sha1 => HasherInner::Sha1(sha1::Sha1::new()),
            ChecksumAlgo::Sha224 => HasherInner::Sha224(sha2::Sha224::new()),
            ChecksumAlgo::Sha256 => HasherInner::Sha256(sha2::Sha256::new()),
            ChecksumAlgo::Sha384 => HasherInner::Sha384(sha2::Sha384::new()),
            ChecksumAlgo::Sha512 => HasherInner::Sha512(sha2::Sha512::new()),
        };
        Hasher { inner }
    }

    /// The algorithm this hasher computes.
    pub fn algo(&self) -> ChecksumAlgo {
        match self.inner {
            HasherInner::Md5(_) => ChecksumAlgo::Md5,
            HasherInner::Sha1(_) => ChecksumAlgo::Sha1,
            HasherInner::Sha224(_) => ChecksumAlgo::Sha224,
            HasherInner::Sha256(_) => ChecksumAlgo::Sha256,
            HasherInner::Sha384(_) => ChecksumAlgo::Sha384,
            HasherInner::Sha512(_) => ChecksumAlgo::Sha512,
        }
    }

    /// Feeds bytes.
    pub fn update(&mut self, data: &[u8]) {
        match &mut self.inner {
            HasherInner::Md5(h) => h.update(data),
            HasherInner::Sha1(h) => h.update(data),
            HasherInner::Sha224(h) => h.update(data),
            HasherInner::Sha256(h) => h.update(data),
            HasherInner::Sha384(h) => h.update(data),
            HasherInner::Sha512(h) => h.update(data),
        }
    }

    /// The checksum of everything fed.
    pub fn finalize(self) -> Checksum {
        let algo = self.algo();
        let hex = match self.inner {
            HasherInner::Md5(h) => hex::encode(h.finalize().as_slice()),
            HasherInner::Sha1(h) => hex::encode(h.finalize().as_slice()),
            HasherInner::Sha224(h) => hex::encode(h.finalize().as_slice()),
            HasherInner::Sha256(h) => hex::encode(h.finalize().as_slice()),
            HasherInner::Sha384(h) => hex::encode(h.finalize().as_slice()),
            HasherInner::Sha512(h) => hex::encode(h.finalize().as_slice()),
        };
        Checksum { algo, hex }
    }
}

impl std::io::Write for Hasher {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.update(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const ABC: [(ChecksumAlgo, &str); 6] = [
        (ChecksumAlgo::Md5, "900150983cd24fb0d6963f7d28e17f72"),
        (ChecksumAlgo::Sha1, "a9993e364706816aba3e25717850c26c9cd0d89d"),
        (
            ChecksumAlgo::Sha224,
            "23097d223405d8228642a477bda255b32aadbce4bda0b3f7e36c9da7",
        ),
        (
            ChecksumAlgo::Sha256,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
        ),
        (
            ChecksumAlgo::Sha384,
            "cb00753f45a35e8bb5a03d699ac65007272c32ab0eded1631a8b605a43ff5bed8086072ba1e7cc2358baeca134c825a7",
        ),
        (
            ChecksumAlgo::Sha512,
            "ddaf35a193617abacc417349ae20413112e6fa4e89a97ea20a9eeee64b55d39a2192992a274fc1a836ba3c23a3feebbd454d4423643ce80e2a9ac94fa54ca49f",
        ),
    ];

    #[test]
    fn known_vectors_abc() {
        for (algo, want) in ABC {
            let mut h = Hasher::new(algo);
            assert_eq!(h.algo(), algo);
            h.update(b"a");
            h.update(b"");
            h.update(b"bc");
            let got = h.finalize();
            assert_eq!(got.algo, algo);
            assert_eq!(got.hex, want, "{algo}");
            assert_eq!(got.hex.len(), algo.hex_len());
            assert!(got.matches(want));
            assert!(got.matches(&want.to_ascii_uppercase()));
        }
    }

    #[test]
    fn empty_input_digest() {
        let h = Hasher::new(ChecksumAlgo::Sha256);
        assert_eq!(
            h.finalize().hex,
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[test]
    fn io_write_feeds_the_digest() {
        let mut h = Hasher::new(ChecksumAlgo::Md5);
        std::io::copy(&mut &b"abc"[..], &mut h).unwrap();
        assert_eq!(h.finalize().hex, ABC[0].1);
    }

    #[test]
    fn java_names_and_lengths() {
        let names: Vec<String> = ChecksumAlgo::ALL.iter().map(|a| a.to_string()).collect();
        assert_eq!(
            names,
            ["MD5", "SHA-1", "SHA-224", "SHA-256", "SHA-384", "SHA-512"]
        );
        let lens: Vec<usize> = ChecksumAlgo::ALL.iter().map(|a| a.hex_len()).collect();
        assert_eq!(lens, [32, 40, 56, 64, 96, 128]);
    }

    #[test]
    fn algorithm_names_are_lenient() {
        for (s, want) in [
            ("md5", ChecksumAlgo::Md5),
            ("SHA-1", ChecksumAlgo::Sha1),
            ("sha1", ChecksumAlgo::Sha1),
            ("SHA", ChecksumAlgo::Sha1),
            ("Sha-224", ChecksumAlgo::Sha224),
            ("SHA256", ChecksumAlgo::Sha256),
            ("sha-256", ChecksumAlgo::Sha256),
            ("SHA-384", ChecksumAlgo::Sha384),
            ("sha512", ChecksumAlgo::Sha512),
        ] {
            assert_eq!(s.parse::<ChecksumAlgo>().unwrap(), want, "{s}");
        }
        for s in ["", "SHA-3", "SHA3-256", "CRC32", "SHA-512/256", "md4"] {
            assert!(s.parse::<ChecksumAlgo>().is_err(), "{s}");
        }
    }

    #[test]
    fn parse_braced_and_bare() {
        let md5 = "900150983CD24FB0D6963F7D28E17F72";
        let c: Checksum = md5.parse().unwrap();
        assert_eq!(c.algo, ChecksumAlgo::Md5);
        assert_eq!(c.hex, md5.to_ascii_lowercase());
        assert_eq!(c.to_string(), format!("{{MD5}}{}", md5.to_ascii_lowercase()));

        let c: Checksum = format!("{{sha256}}{}", ABC[3].1).parse().unwrap();
        assert_eq!(c.algo, ChecksumAlgo::Sha256);
        assert_eq!(c.to_string(), format!("{{SHA-256}}{}", ABC[3].1));

        let c: Checksum = format!("  {{SHA-512}}{}\n", ABC[5].1).parse().unwrap();
        assert_eq!(c.algo, ChecksumAlgo::Sha512);
    }

    #[test]
    fn parse_errors_say_what_is_wrong() {
        assert_eq!("".parse::<Checksum>(), Err(ChecksumParseError::Empty));
        assert_eq!("  ".parse::<Checksum>(), Err(ChecksumParseError::Empty));
        assert_eq!(
            "{SHA-256abc".parse::<Checksum>(),
            Err(ChecksumParseError::UnclosedBrace)
        );
        assert_eq!(
            format!("{{SHA3}}{}", ABC[3].1).parse::<Checksum>(),
            Err(ChecksumParseError::UnknownAlgorithm("SHA3".into()))
        );
        // A SHA-256 digest without braces is read as MD5, and is then too long.
        assert_eq!(
            ABC[3].1.parse::<Checksum>(),
            Err(ChecksumParseError::WrongLength {
                algo: ChecksumAlgo::Md5,
                expected: 32,
                actual: 64
            })
        );
        assert_eq!(
            format!("{{SHA-1}}{}", ABC[0].1).parse::<Checksum>(),
            Err(ChecksumParseError::WrongLength {
                algo: ChecksumAlgo::Sha1,
                expected: 40,
                actual: 32
            })
        );
        assert_eq!(
            "{MD5}".parse::<Checksum>(),
            Err(ChecksumParseError::WrongLength {
                algo: ChecksumAlgo::Md5,
                expected: 32,
                actual: 0
            })
        );
        assert_eq!(
            "900150983cd24fb0d6963f7d28e17f7g".parse::<Checksum>(),
            Err(ChecksumParseError::NotHex)
        );
        // Multi-byte characters are counted as characters, not bytes.
        let err = "é".repeat(16).parse::<Checksum>().unwrap_err();
        assert!(matches!(err, ChecksumParseError::WrongLength { actual: 16, .. }));
        let msg = ChecksumParseError::WrongLength {
            algo: ChecksumAlgo::Sha256,
            expected: 64,
            actual: 3,
        }
        .to_string();
        assert_eq!(msg, "a SHA-256 checksum has 64 hex digits, not 3");
    }

    #[test]
    fn matches_rejects_other_digests_and_garbage() {
        let c: Checksum = ABC[0].1.parse().unwrap();
        assert!(c.matches(ABC[0].1));
        assert!(!c.matches("900150983cd24fb0d6963f7d28e17f73"));
        assert!(!c.matches("900150983cd24fb0d6963f7d28e17f"));
        assert!(!c.matches(""));
        assert!(!c.matches("zz"));
        assert!(!c.matches(&format!("{}00", ABC[0].1)));
        let other: Checksum = format!("{{SHA-1}}{}", ABC[1].1).parse().unwrap();
        assert!(!c.matches_checksum(&other));
        assert!(c.matches_checksum(&c.clone()));
        let broken = Checksum {
            algo: ChecksumAlgo::Md5,
            hex: "not hex".into(),
        };
        assert!(!broken.matches(""));
    }

    #[test]
    fn from_digest_checks_length() {
        assert!(Checksum::from_digest(ChecksumAlgo::Sha1, &[0; 20]).is_some());
        assert!(Checksum::from_digest(ChecksumAlgo::Sha1, &[0; 16]).is_none());
    }

    fn algo() -> impl Strategy<Value = ChecksumAlgo> {
        prop::sample::select(ChecksumAlgo::ALL.to_vec())
    }

    proptest! {
        #[test]
        fn display_parse_round_trip(a in algo(), bytes in prop::collection::vec(any::<u8>(), 64)) {
            let c = Checksum::from_digest(a, &bytes[..a.digest_len()]).unwrap();
            let back: Checksum = c.to_string().parse().unwrap();
            prop_assert_eq!(&back, &c);
            prop_assert!(back.matches(&c.hex));
            prop_assert_eq!(back.digest(), bytes[..a.digest_len()].to_vec());
        }

        #[test]
        fn parse_never_panics(s in ".{0,200}") {
            let _ = s.parse::<Checksum>();
        }

        #[test]
        fn chunking_does_not_change_the_digest(
            a in algo(),
            data in prop::collection::vec(any::<u8>(), 0..2000),
            cut in 0usize..2000,
        ) {
            let cut = cut.min(data.len());
            let mut whole = Hasher::new(a);
            whole.update(&data);
            let mut split = Hasher::new(a);
            split.update(&data[..cut]);
            split.update(&data[cut..]);
            prop_assert_eq!(whole.finalize(), split.finalize());
        }
    }
}
