//! The tus 1.0 resumable-upload protocol's headers (<https://tus.io/protocols/resumable-upload>):
//! the subset this storage VM speaks is core protocol (HEAD, PATCH) plus the `creation`
//! extension (POST with `Upload-Length`). `tus-js-client` speaks it.
//!
//! Invariant: numbers are plain decimal `u64` (no sign, no spaces inside, at most 20 digits);
//! metadata is `key base64,key base64` with ASCII keys and at most [`MAX_METADATA_PAIRS`] pairs.

use base64::Engine as _;

/// The protocol version spoken (`Tus-Resumable`, `Tus-Version`).
pub const VERSION: &str = "1.0.0";
/// The extensions offered (`Tus-Extension`).
pub const EXTENSIONS: &str = "creation";
/// The PATCH body's content type.
pub const PATCH_CONTENT_TYPE: &str = "application/offset+octet-stream";
/// Most metadata pairs read from `Upload-Metadata`.
pub const MAX_METADATA_PAIRS: usize = 32;

/// Why a tus header is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TusError {
    /// `Tus-Resumable` is missing or names another version (HTTP 412).
    #[error("Tus-Resumable must be {VERSION}")]
    Version,
    /// A number header is missing or not a plain decimal number.
    #[error("{0} must be a non-negative decimal number")]
    BadNumber(&'static str),
    /// `Upload-Metadata` does not parse.
    #[error("Upload-Metadata is not valid: {0}")]
    BadMetadata(&'static str),
}

/// Checks `Tus-Resumable`.
pub fn check_version(value: Option<&str>) -> Result<(), TusError> {
    match value.map(str::trim) {
        Some(VERSION) => Ok(()),
        _ => Err(TusError::Version),
    }
}

/// Reads a number header (`Upload-Length`, `Upload-Offset`).
pub fn number(name: &'static str, value: Option<&str>) -> Result<u64, TusError> {
    let v = value.map(str::trim).ok_or(TusError::BadNumber(name))?;
    if v.is_empty() || v.len() > 20 || !v.bytes().all(|b| b.is_ascii_digit()) {
        return Err(TusError::BadNumber(name));
    }
    v.parse().map_err(|_| TusError::BadNumber(name))
}

/// Reads `Upload-Metadata`: `key base64value` pairs separated by commas (a key may have no value).
pub fn metadata(value: &str) -> Result<Vec<(String, Vec<u8>)>, TusError> {
    let mut out = Vec::new();
    for pair in value.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        if out.len() == MAX_METADATA_PAIRS {
            return Err(TusError::BadMetadata("too many pairs"));
        }
        let (key, val) = pair.split_once(' ').unwrap_or((pair, ""));
        if key.is_empty() || !key.bytes().all(|b| b.is_ascii_graphic() && b != b',') {
            return Err(TusError::BadMetadata("a key is not printable ASCII"));
        }
        let val = base64::engine::general_purpose::STANDARD
            .decode(val.trim())
            .map_err(|_| TusError::BadMetadata("a value is not base64"))?;
        out.push((key.to_owned(), val));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn reads_the_headers() {
        assert!(check_version(Some("1.0.0")).is_ok());
        assert_eq!(check_version(Some("0.2.2")), Err(TusError::Version));
        assert_eq!(check_version(None), Err(TusError::Version));
        assert_eq!(number("Upload-Offset", Some(" 42 ")).unwrap(), 42);
        for bad in [
            None,
            Some(""),
            Some("-1"),
            Some("+1"),
            Some("1 2"),
            Some("99999999999999999999999"),
        ] {
            assert!(number("Upload-Offset", bad).is_err(), "{bad:?}");
        }
        let m =
            metadata("filename ZGViaWFuLnFjb3cy,is_confidential, filetype YXBwbGljYXRpb24vb2N0ZXQtc3RyZWFt")
                .unwrap();
        assert_eq!(m[0], ("filename".into(), b"debian.qcow2".to_vec()));
        assert_eq!(m[1], ("is_confidential".into(), vec![]));
        assert_eq!(m.len(), 3);
        assert!(metadata("k !!!").is_err());
        assert!(metadata(&"k a2V5,".repeat(40)).is_err());
    }

    proptest! {
        #[test]
        fn arbitrary_headers_never_panic(s in ".{0,200}") {
            let _ = metadata(&s);
            let _ = number("Upload-Length", Some(&s));
            let _ = check_version(Some(&s));
        }

        #[test]
        fn numbers_round_trip(n in any::<u64>()) {
            prop_assert_eq!(number("Upload-Offset", Some(&n.to_string())).unwrap(), n);
        }
    }
}
