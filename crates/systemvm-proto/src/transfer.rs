//! Transfer tickets: what core signs so a browser can upload straight to a storage VM, and the
//! download links (`extractTemplate`) a storage VM serves. Format: `docs/transfers.md`.
//!
//! Both are sealed with core's transfer keys (a key set apart from the console-token keys, pushed
//! only to storage VMs), each under its own context, so an upload ticket never opens as a
//! download link or a console token, and the reverse.
//!
//! Upload (CloudStack's `getUploadParamsForTemplate` contract): `metadata` is the sealed
//! [`UploadTicket`], `expires` the ticket's expiry as text, `signature` a MAC over
//! `metadata ‖ postURL ‖ expires` ([`upload_signature_input`]). The storage VM opens the
//! metadata, checks the signature in constant time, the expiry, the URL's id against the ticket,
//! and that the id was never uploaded before.
//!
//! Invariants: a ticket and a link carry their expiry inside the sealed text (a changed
//! `X-expires` header fails the signature); tickets name the install (store, directory, epoch),
//! so a storage VM writes only where core said, under the install's fencing epoch.

use serde::{Deserialize, Serialize};

/// Sealing context of upload tickets.
pub const UPLOAD_CONTEXT: &[u8] = b"mold-upload-ticket-v1";
/// MAC context of upload signatures.
pub const UPLOAD_SIGNATURE_CONTEXT: &[u8] = b"mold-upload-signature-v1";
/// Sealing context of download links.
pub const EXTRACT_CONTEXT: &[u8] = b"mold-extract-link-v1";

/// What core allows one upload to do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UploadTicket {
    /// The template's (or ISO's) id: the job id and the last path segment of `post_url`.
    pub id: String,
    /// The URL the browser posts to (the signature covers it).
    pub post_url: String,
    /// The store to install into.
    pub store_url: String,
    /// Install directory (`template/tmpl/ACCOUNT/ID`).
    pub path: String,
    /// Declared format (QCOW2, RAW, VHD, OVA, ISO).
    pub format: String,
    /// Expected checksum of the uploaded bytes, `{ALGO}hex`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checksum: Option<String>,
    /// Description for `template.properties`.
    #[serde(default)]
    pub description: String,
    /// Largest upload accepted, in bytes: the lower of `max.template.iso.size` and what the
    /// account's secondary-storage limit leaves.
    pub max_bytes: u64,
    /// Why `max_bytes` is what it is (`max.template.iso.size` or the account limit), for the
    /// refusal's text.
    #[serde(default)]
    pub limit_reason: String,
    /// Expiry, Unix seconds.
    pub expires: u64,
    /// Expiry as the `expires` text the client sends back in `X-expires`.
    pub expires_text: String,
    /// The install's fencing epoch.
    #[serde(default)]
    pub epoch: u64,
    /// The storage VM the upload goes to: another one (even on the same store, with the same
    /// keys) refuses the ticket, so one ticket makes at most one upload.
    #[serde(default)]
    pub vm_id: String,
}

/// A download link of an installed template or ISO.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExtractLink {
    /// The template's id.
    pub id: String,
    /// The store holding the file.
    pub store_url: String,
    /// The installed file's path in the store.
    pub file: String,
    /// The name the download is saved as.
    pub name: String,
    /// Expiry, Unix seconds.
    pub expires: u64,
    /// The storage VM the link is for (cross-zone copies): only a client presenting that VM's
    /// peer certificate ([`crate::agent::peer_name`]) may use it; `None`: any browser.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer: Option<String>,
    /// The file's SHA-256 (hex), when core knows it: served as the strong `ETag`, so an
    /// interrupted download resumes with `If-Range` only on the same bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
}

/// The bytes an upload signature covers: `metadata ‖ postURL ‖ expires`, CloudStack's order.
pub fn upload_signature_input(metadata: &str, post_url: &str, expires: &str) -> Vec<u8> {
    [metadata.as_bytes(), post_url.as_bytes(), expires.as_bytes()].concat()
}

/// Why an upload's credentials are refused. Messages are safe to show to the browser.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TicketError {
    /// A header is missing or empty.
    #[error("missing {0} header")]
    Missing(&'static str),
    /// The metadata or signature is not ours, or was changed.
    #[error("invalid upload signature or metadata")]
    Forged,
    /// The ticket is for another upload id.
    #[error("upload ticket is for another upload")]
    OtherUpload,
    /// The ticket expired.
    #[error("upload ticket expired")]
    Expired,
}

#[cfg(feature = "token")]
mod sealing {
    use super::*;
    use crate::console::{KeySet, TokenSealError};

    impl UploadTicket {
        /// Seals the ticket: `(metadata, signature)` for `getUploadParamsFor*`.
        pub fn seal(&self, keys: &KeySet) -> Result<(String, String), TokenSealError> {
            let metadata = keys.seal_json(UPLOAD_CONTEXT, self)?;
            let signature = keys.mac(
                UPLOAD_SIGNATURE_CONTEXT,
                &upload_signature_input(&metadata, &self.post_url, &self.expires_text),
            )?;
            Ok((metadata, signature))
        }

        /// Opens and checks an upload's `X-metadata`, `X-signature` and `X-expires` for upload
        /// `id` at Unix time `now`.
        pub fn open(
            keys: &KeySet,
            id: &str,
            metadata: &str,
            signature: &str,
            expires: &str,
            now: u64,
        ) -> Result<UploadTicket, TicketError> {
            if metadata.is_empty() {
                return Err(TicketError::Missing("X-metadata"));
            }
            if signature.is_empty() {
                return Err(TicketError::Missing("X-signature"));
            }
            if expires.is_empty() {
                return Err(TicketError::Missing("X-expires"));
            }
            let ticket: UploadTicket = keys
                .open_json(UPLOAD_CONTEXT, metadata)
                .map_err(|_| TicketError::Forged)?;
            keys.verify_mac(
                UPLOAD_SIGNATURE_CONTEXT,
                &upload_signature_input(metadata, &ticket.post_url, expires),
                signature,
            )
            .map_err(|_| TicketError::Forged)?;
            if ticket.expires_text != expires {
                return Err(TicketError::Forged);
            }
            if ticket.id != id {
                return Err(TicketError::OtherUpload);
            }
            if now >= ticket.expires {
                return Err(TicketError::Expired);
            }
            Ok(ticket)
        }
    }

    impl ExtractLink {
        /// Seals the link into the token of its URL.
        pub fn seal(&self, keys: &KeySet) -> Result<String, TokenSealError> {
            keys.seal_json(EXTRACT_CONTEXT, self)
        }

        /// Opens a link token; `None` when it is forged, altered or expired at `now`.
        pub fn open(keys: &KeySet, token: &str, now: u64) -> Option<ExtractLink> {
            let link: ExtractLink = keys.open_json(EXTRACT_CONTEXT, token).ok()?;
            (now < link.expires).then_some(link)
        }
    }
}

#[cfg(all(test, feature = "token"))]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::console::KeySet;

    fn ticket() -> UploadTicket {
        UploadTicket {
            id: "t1".into(),
            post_url: "https://10-0-0-5.example.org/upload/t1".into(),
            store_url: "nfs://10.0.0.9/export".into(),
            path: "template/tmpl/a/t1".into(),
            format: "QCOW2".into(),
            checksum: None,
            description: "d".into(),
            max_bytes: 1 << 30,
            limit_reason: "max.template.iso.size".into(),
            expires: 2_000,
            expires_text: "1970-01-01T00:33:20+0000".into(),
            epoch: 3,
            vm_id: "s-1".into(),
        }
    }

    #[test]
    fn tickets_open_only_unchanged_in_time_for_their_id() {
        let keys = KeySet::generate().unwrap();
        let t = ticket();
        let (m, s) = t.seal(&keys).unwrap();
        let open = |id: &str, m: &str, s: &str, e: &str, now| UploadTicket::open(&keys, id, m, s, e, now);
        assert_eq!(open("t1", &m, &s, &t.expires_text, 1_000).unwrap(), t);
        assert_eq!(
            open("t2", &m, &s, &t.expires_text, 1_000),
            Err(TicketError::OtherUpload)
        );
        assert_eq!(
            open("t1", &m, &s, &t.expires_text, 2_000),
            Err(TicketError::Expired)
        );
        assert_eq!(
            open("t1", &m, &s, "2099-01-01T00:00:00+0000", 1_000),
            Err(TicketError::Forged)
        );
        let mut bad = s.clone().into_bytes();
        bad[10] = if bad[10] == b'A' { b'B' } else { b'A' };
        let bad = String::from_utf8(bad).unwrap();
        assert_eq!(
            open("t1", &m, &bad, &t.expires_text, 1_000),
            Err(TicketError::Forged)
        );
        assert_eq!(
            open("t1", "", &s, &t.expires_text, 1_000),
            Err(TicketError::Missing("X-metadata"))
        );
        // Another key set (another cloud, or a retired key) opens nothing.
        let other = KeySet::generate().unwrap();
        assert_eq!(
            UploadTicket::open(&other, "t1", &m, &s, &t.expires_text, 1_000),
            Err(TicketError::Forged)
        );
        // A ticket is not a download link, nor a console token.
        assert!(ExtractLink::open(&keys, &m, 1_000).is_none());
        assert!(keys.open(&m).is_err());
    }

    #[test]
    fn links_open_until_they_expire() {
        let keys = KeySet::generate().unwrap();
        let link = ExtractLink {
            id: "t1".into(),
            store_url: "nfs://h/e".into(),
            file: "template/tmpl/a/t1/x.qcow2".into(),
            name: "x.qcow2".into(),
            expires: 100,
            peer: None,
            sha256: None,
        };
        let token = link.seal(&keys).unwrap();
        assert_eq!(ExtractLink::open(&keys, &token, 99), Some(link));
        assert!(ExtractLink::open(&keys, &token, 100).is_none());
        let mut bad = token.into_bytes();
        let last = bad.len() - 3;
        bad[last] = if bad[last] == b'A' { b'B' } else { b'A' };
        assert!(ExtractLink::open(&keys, &String::from_utf8(bad).unwrap(), 1).is_none());
    }

    proptest! {
        #[test]
        fn arbitrary_credentials_never_panic(m in ".{0,300}", s in ".{0,200}", e in ".{0,40}") {
            let keys = KeySet::generate().unwrap();
            prop_assert!(UploadTicket::open(&keys, "t1", &m, &s, &e, 0).is_err());
            prop_assert!(ExtractLink::open(&keys, &m, 0).is_none());
        }
    }
}
