//! The storage VM's transfer requests, no I/O: what an upload or a download asks for, read from
//! untrusted headers and bodies.
//!
//! - [`upload_headers`]: CloudStack's `X-signature`, `X-metadata`, `X-expires`.
//! - [`multipart`]: the one file part of a `multipart/form-data` upload, streamed (never held
//!   whole), with the checks a browser upload needs (exactly one file part, a plain file name,
//!   a complete body).
//! - [`tus`]: the tus 1.0 resumable-upload headers (`Upload-Length`, `Upload-Offset`,
//!   `Upload-Metadata`, `Tus-Resumable`).
//! - [`range`]: a download's `Range` header.
//!
//! Invariant: every function here takes untrusted input and returns an error instead of
//! panicking; each is property-tested and the whole request path has a fuzz target
//! (`fuzz/fuzz_targets/upload_request.rs`).
#![forbid(unsafe_code)]

pub mod multipart;
pub mod range;
pub mod tus;

use http::HeaderMap;

/// Longest `X-metadata` accepted (a sealed ticket is well under 2 KiB).
pub const MAX_METADATA_LEN: usize = 4096;

/// The upload credentials of a request, as sent.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UploadHeaders {
    /// `X-signature`.
    pub signature: String,
    /// `X-metadata`.
    pub metadata: String,
    /// `X-expires`.
    pub expires: String,
}

/// Reads `X-signature`, `X-metadata` and `X-expires` (header names are case-insensitive). A
/// header that is missing, not text, or too long reads as empty (the ticket check names it).
pub fn upload_headers(headers: &HeaderMap) -> UploadHeaders {
    let get = |name: &str, max: usize| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
            .filter(|v| v.len() <= max)
            .unwrap_or_default()
            .to_owned()
    };
    UploadHeaders {
        signature: get("x-signature", 256),
        metadata: get("x-metadata", MAX_METADATA_LEN),
        expires: get("x-expires", 64),
    }
}

/// Whether a client's file name is a plain name: no directory part, no `..`, no control
/// characters, at most 255 bytes. (The name is never used as a path; a name that tries to be
/// one is refused rather than guessed at.)
pub fn plain_file_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && name != "."
        && name != ".."
        && !name.contains(['/', '\\'])
        && !name.chars().any(char::is_control)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_upload_headers_case_insensitively() {
        let mut h = HeaderMap::new();
        h.insert("X-Signature", "sig".parse().unwrap());
        h.insert("x-METADATA", " meta ".parse().unwrap());
        h.insert("x-expires", "2026-12-02T10:00:00+0000".parse().unwrap());
        let u = upload_headers(&h);
        assert_eq!(u.signature, "sig");
        assert_eq!(u.metadata, "meta");
        assert_eq!(u.expires, "2026-12-02T10:00:00+0000");
        h.insert("x-metadata", "m".repeat(MAX_METADATA_LEN + 1).parse().unwrap());
        assert_eq!(upload_headers(&h).metadata, "");
        assert_eq!(upload_headers(&HeaderMap::new()), UploadHeaders::default());
    }

    #[test]
    fn file_names_are_plain() {
        assert!(plain_file_name("debian-12.qcow2"));
        assert!(plain_file_name("a b (1).iso"));
        for bad in [
            "",
            ".",
            "..",
            "../x",
            "a/b",
            "C:\\x.iso",
            "x\0y",
            "x\ny",
            &"n".repeat(256),
        ] {
            assert!(!plain_file_name(bad), "{bad:?}");
        }
    }
}
