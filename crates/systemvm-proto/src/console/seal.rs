//! Sealing and opening console tokens with XChaCha20-Poly1305.
//!
//! Layout (before URL-safe base64 without padding):
//! ```text
//! 0      1          5                 29
//! | ver | key id BE | nonce (24 bytes) | ciphertext of claims JSON ‖ 16-byte tag |
//! ```
//! Associated data = the first five bytes, so neither the version nor the key id can be changed.
//! Nonces are random (192 bits: no coordination between issuers is needed).

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::{ConsoleTokenClaims, MAX_TOKEN_LEN};

/// The token format version this code writes and reads.
pub const TOKEN_VERSION: u8 = 1;

const HEADER_LEN: usize = 5;
const NONCE_LEN: usize = 24;
const TAG_LEN: usize = 16;

/// Why a token could not be opened. Messages are safe to show to the browser.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenSealError {
    /// Too long, not base64url, or too short to hold a header and tag.
    #[error("malformed token")]
    Malformed,
    /// A version byte this proxy does not read.
    #[error("unsupported token version {0}")]
    UnsupportedVersion(u8),
    /// A key id this proxy does not hold (retired or never known).
    #[error("unknown token key {0}")]
    UnknownKey(u32),
    /// Authentication failed: the token was altered or sealed with another key.
    #[error("token rejected: not issued by a trusted key")]
    Forged,
    /// The plaintext is not valid claims JSON (issuer bug).
    #[error("token claims unreadable")]
    BadClaims,
    /// Sealing needs a primary key.
    #[error("key set has no primary key")]
    NoPrimaryKey,
    /// The system random generator failed.
    #[error("random generator unavailable")]
    Random,
}

/// Why a key file could not be read.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    /// Not the expected JSON.
    #[error("key file is not valid: {0}")]
    Json(#[from] serde_json::Error),
    /// A key is not 32 bytes of base64url.
    #[error("key {0} is not 32 bytes of base64url")]
    BadKey(u32),
    /// Two keys with one id.
    #[error("key id {0} appears twice")]
    DuplicateId(u32),
    /// The primary id names no key.
    #[error("primary key {0} is not in the key set")]
    MissingPrimary(u32),
}

/// One token key: 32 random bytes with an id.
#[derive(Clone)]
pub struct TokenKey {
    id: u32,
    cipher: XChaCha20Poly1305,
    raw: [u8; 32],
}

impl TokenKey {
    /// A key from raw bytes.
    pub fn new(id: u32, raw: [u8; 32]) -> Self {
        TokenKey {
            id,
            cipher: XChaCha20Poly1305::new(&raw.into()),
            raw,
        }
    }

    /// A fresh random key.
    pub fn generate(id: u32) -> Result<Self, TokenSealError> {
        let mut raw = [0u8; 32];
        getrandom::fill(&mut raw).map_err(|_| TokenSealError::Random)?;
        Ok(Self::new(id, raw))
    }

    /// The key's id.
    pub fn id(&self) -> u32 {
        self.id
    }
}

impl std::fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenKey")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

/// The live token keys: one primary that seals, all of them open.
#[derive(Clone, Debug, Default)]
pub struct KeySet {
    keys: Vec<TokenKey>,
    primary: Option<u32>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyFile {
    primary: u32,
    keys: Vec<KeyFileEntry>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyFileEntry {
    id: u32,
    key: String,
}

impl KeySet {
    /// A key set with one fresh primary key.
    pub fn generate() -> Result<Self, TokenSealError> {
        let mut set = KeySet::default();
        set.rotate()?;
        Ok(set)
    }

    /// Adds a fresh key and makes it primary; older keys keep opening tokens until removed.
    pub fn rotate(&mut self) -> Result<u32, TokenSealError> {
        let id = self
            .keys
            .iter()
            .map(|k| k.id)
            .max()
            .map_or(1, |m| m.wrapping_add(1));
        self.keys.push(TokenKey::generate(id)?);
        self.primary = Some(id);
        Ok(id)
    }

    /// Drops a key: tokens sealed with it are refused from now on.
    pub fn retire(&mut self, id: u32) {
        self.keys.retain(|k| k.id != id);
        if self.primary == Some(id) {
            self.primary = None;
        }
    }

    /// Adds a key received from elsewhere (e.g. pushed by core); replaces a key with the same id.
    pub fn insert(&mut self, key: TokenKey, primary: bool) {
        self.keys.retain(|k| k.id != key.id);
        if primary {
            self.primary = Some(key.id);
        }
        self.keys.push(key);
    }

    /// The id of the key that seals, if any.
    pub fn primary_id(&self) -> Option<u32> {
        self.primary
    }

    /// The ids of all live keys.
    pub fn ids(&self) -> Vec<u32> {
        self.keys.iter().map(|k| k.id).collect()
    }

    /// Reads a key file (`{"primary": ID, "keys": [{"id": ID, "key": BASE64URL}]}`).
    pub fn from_json(text: &str) -> Result<Self, KeyFileError> {
        let file: KeyFile = serde_json::from_str(text)?;
        let mut set = KeySet::default();
        for entry in file.keys {
            if set.keys.iter().any(|k| k.id == entry.id) {
                return Err(KeyFileError::DuplicateId(entry.id));
            }
            let raw: [u8; 32] = URL_SAFE_NO_PAD
                .decode(entry.key.trim_end_matches('='))
                .ok()
                .and_then(|v| v.try_into().ok())
                .ok_or(KeyFileError::BadKey(entry.id))?;
            set.keys.push(TokenKey::new(entry.id, raw));
        }
        if !set.keys.iter().any(|k| k.id == file.primary) {
            return Err(KeyFileError::MissingPrimary(file.primary));
        }
        set.primary = Some(file.primary);
        Ok(set)
    }

    /// Writes the key file form read by [`KeySet::from_json`].
    pub fn to_json(&self) -> Result<String, TokenSealError> {
        let primary = self.primary.ok_or(TokenSealError::NoPrimaryKey)?;
        let file = KeyFile {
            primary,
            keys: self
                .keys
                .iter()
                .map(|k| KeyFileEntry {
                    id: k.id,
                    key: URL_SAFE_NO_PAD.encode(k.raw),
                })
                .collect(),
        };
        serde_json::to_string_pretty(&file).map_err(|_| TokenSealError::BadClaims)
    }

    /// Seals claims with the primary key.
    pub fn seal(&self, claims: &ConsoleTokenClaims) -> Result<String, TokenSealError> {
        self.seal_json(b"", claims)
    }

    /// Opens a token: checks format, version, key id and authenticity, and returns its claims.
    /// Time, origin, address and one-time use are checked by the caller.
    pub fn open(&self, token: &str) -> Result<ConsoleTokenClaims, TokenSealError> {
        self.open_json(b"", token)
    }

    /// Seals any JSON value with the primary key, bound to `context` (associated data after the
    /// header): a value sealed for one context never opens in another. Console tokens use the
    /// empty context.
    pub fn seal_json<T: Serialize>(&self, context: &[u8], value: &T) -> Result<String, TokenSealError> {
        let key = self.primary_key()?;
        let plain = serde_json::to_vec(value).map_err(|_| TokenSealError::BadClaims)?;
        let mut nonce = [0u8; NONCE_LEN];
        getrandom::fill(&mut nonce).map_err(|_| TokenSealError::Random)?;
        let header = header(TOKEN_VERSION, key.id);
        let aad = [&header[..], context].concat();
        let sealed = key
            .cipher
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: &plain,
                    aad: &aad,
                },
            )
            .map_err(|_| TokenSealError::BadClaims)?;
        let mut out = Vec::with_capacity(HEADER_LEN + NONCE_LEN + sealed.len());
        out.extend_from_slice(&header);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&sealed);
        Ok(URL_SAFE_NO_PAD.encode(out))
    }

    /// Opens what [`KeySet::seal_json`] sealed for `context`.
    pub fn open_json<T: DeserializeOwned>(&self, context: &[u8], token: &str) -> Result<T, TokenSealError> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(TokenSealError::Malformed);
        }
        let bytes = URL_SAFE_NO_PAD
            .decode(token.trim_end_matches('='))
            .map_err(|_| TokenSealError::Malformed)?;
        if bytes.len() < HEADER_LEN + NONCE_LEN + TAG_LEN {
            return Err(TokenSealError::Malformed);
        }
        let (head, rest) = bytes.split_at(HEADER_LEN);
        if head[0] != TOKEN_VERSION {
            return Err(TokenSealError::UnsupportedVersion(head[0]));
        }
        let key = self.key(u32::from_be_bytes([head[1], head[2], head[3], head[4]]))?;
        let (nonce, sealed) = rest.split_at(NONCE_LEN);
        let aad = [head, context].concat();
        let plain = key
            .cipher
            .decrypt(
                XNonce::from_slice(nonce),
                Payload {
                    msg: sealed,
                    aad: &aad,
                },
            )
            .map_err(|_| TokenSealError::Forged)?;
        serde_json::from_slice(&plain).map_err(|_| TokenSealError::BadClaims)
    }

    /// A MAC of `data` for `context` with the primary key: base64url of the key id (4 bytes, big
    /// endian) and HMAC-SHA256 over the context, a zero byte and the data.
    pub fn mac(&self, context: &[u8], data: &[u8]) -> Result<String, TokenSealError> {
        let key = self.primary_key()?;
        let mut out = key.id.to_be_bytes().to_vec();
        out.extend_from_slice(&hmac_sha256(&key.raw, context, data));
        Ok(URL_SAFE_NO_PAD.encode(out))
    }

    /// Checks a [`KeySet::mac`] in constant time, with whichever live key it names.
    pub fn verify_mac(&self, context: &[u8], data: &[u8], mac: &str) -> Result<(), TokenSealError> {
        if mac.len() > 128 {
            return Err(TokenSealError::Malformed);
        }
        let bytes = URL_SAFE_NO_PAD
            .decode(mac.trim_end_matches('='))
            .map_err(|_| TokenSealError::Malformed)?;
        if bytes.len() != 4 + 32 {
            return Err(TokenSealError::Malformed);
        }
        let key = self.key(u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))?;
        let want = hmac_sha256(&key.raw, context, data);
        if bool::from(subtle::ConstantTimeEq::ct_eq(&want[..], &bytes[4..])) {
            Ok(())
        } else {
            Err(TokenSealError::Forged)
        }
    }

    fn primary_key(&self) -> Result<&TokenKey, TokenSealError> {
        let primary = self.primary.ok_or(TokenSealError::NoPrimaryKey)?;
        self.keys
            .iter()
            .find(|k| k.id == primary)
            .ok_or(TokenSealError::NoPrimaryKey)
    }

    fn key(&self, id: u32) -> Result<&TokenKey, TokenSealError> {
        self.keys
            .iter()
            .find(|k| k.id == id)
            .ok_or(TokenSealError::UnknownKey(id))
    }
}

fn hmac_sha256(key: &[u8; 32], context: &[u8], data: &[u8]) -> [u8; 32] {
    use hmac::{KeyInit as _, Mac as _};
    let mut mac = <hmac::Hmac<sha2::Sha256>>::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(context);
    mac.update(&[0]);
    mac.update(data);
    mac.finalize().into_bytes().into()
}

/// A fresh random session id (128 bits, hex).
pub fn new_session_id() -> Result<String, TokenSealError> {
    let mut raw = [0u8; 16];
    getrandom::fill(&mut raw).map_err(|_| TokenSealError::Random)?;
    Ok(raw.iter().map(|b| format!("{b:02x}")).collect())
}

fn header(version: u8, key_id: u32) -> [u8; HEADER_LEN] {
    let id = key_id.to_be_bytes();
    [version, id[0], id[1], id[2], id[3]]
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::console::{ConsoleTarget, ViewerMode, VmRef};

    fn claims(host: String, port: u16, pw: Option<String>, name: String, nbf: u64) -> ConsoleTokenClaims {
        ConsoleTokenClaims {
            target: ConsoleTarget::Vnc {
                host,
                port,
                password: pw.map(crate::Secret),
            },
            vm: VmRef {
                id: "vm-1".into(),
                display_name: name,
            },
            session_id: "s-1".into(),
            not_before: nbf,
            expires: nbf + 60,
            client_ip: Some("192.0.2.7".parse().unwrap()),
            allowed_origins: vec!["https://ui.example".into()],
            viewer: ViewerMode::ViewOnly,
            keyboard_locale: Some("ja".into()),
        }
    }

    proptest! {
        #[test]
        fn roundtrip(host in "[a-z0-9.-]{1,40}", port: u16, pw in proptest::option::of("[ -~]{0,8}"),
                     name in "\\PC{0,40}", nbf in 0u64..1u64 << 40) {
            let keys = KeySet::generate().unwrap();
            let c = claims(host, port, pw, name, nbf);
            let token = keys.seal(&c).unwrap();
            prop_assert!(token.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
            prop_assert_eq!(keys.open(&token).unwrap(), c);
        }

        #[test]
        fn any_single_byte_change_is_refused(pos in 0usize..10_000, bit in 0u8..8) {
            let keys = KeySet::generate().unwrap();
            let token = keys.seal(&claims("h".into(), 1, None, "n".into(), 5)).unwrap();
            let mut raw = URL_SAFE_NO_PAD.decode(&token).unwrap();
            let pos = pos % raw.len();
            raw[pos] ^= 1 << bit;
            let err = keys.open(&URL_SAFE_NO_PAD.encode(&raw)).unwrap_err();
            prop_assert!(matches!(err, TokenSealError::Forged | TokenSealError::UnknownKey(_)
                | TokenSealError::UnsupportedVersion(_)), "{:?}", err);
        }

        #[test]
        fn garbage_never_panics(s in "\\PC{0,300}") {
            let keys = KeySet::generate().unwrap();
            prop_assert!(keys.open(&s).is_err());
        }
    }

    #[test]
    fn rotation_keeps_old_tokens_until_retired() {
        let mut keys = KeySet::generate().unwrap();
        let c = claims("h".into(), 1, None, "n".into(), 5);
        let old = keys.seal(&c).unwrap();
        let old_id = keys.ids()[0];
        let new_id = keys.rotate().unwrap();
        let new = keys.seal(&c).unwrap();
        assert_eq!(keys.open(&old).unwrap(), c);
        assert_eq!(keys.open(&new).unwrap(), c);
        keys.retire(old_id);
        assert_eq!(keys.open(&old), Err(TokenSealError::UnknownKey(old_id)));
        assert_eq!(keys.open(&new).unwrap(), c);
        assert_ne!(old_id, new_id);
    }

    #[test]
    fn other_key_set_is_forged() {
        let a = KeySet::generate().unwrap();
        let b = KeySet::generate().unwrap(); // same id 1, other bytes
        let token = a.seal(&claims("h".into(), 1, None, "n".into(), 5)).unwrap();
        assert_eq!(b.open(&token), Err(TokenSealError::Forged));
    }

    #[test]
    fn key_file_roundtrip_and_errors() {
        let mut keys = KeySet::generate().unwrap();
        keys.rotate().unwrap();
        let text = keys.to_json().unwrap();
        let back = KeySet::from_json(&text).unwrap();
        let token = keys.seal(&claims("h".into(), 1, None, "n".into(), 5)).unwrap();
        assert!(back.open(&token).is_ok());
        assert!(matches!(
            KeySet::from_json(r#"{"primary":1,"keys":[{"id":1,"key":"short"}]}"#),
            Err(KeyFileError::BadKey(1))
        ));
        assert!(matches!(
            KeySet::from_json(r#"{"primary":2,"keys":[]}"#),
            Err(KeyFileError::MissingPrimary(2))
        ));
        assert!(matches!(KeySet::from_json("{}"), Err(KeyFileError::Json(_))));
        assert!(!format!("{keys:?}").contains(&URL_SAFE_NO_PAD.encode(keys.keys[0].raw)));
    }

    #[test]
    fn version_and_length_checks() {
        let keys = KeySet::generate().unwrap();
        assert_eq!(
            keys.open(&"A".repeat(MAX_TOKEN_LEN + 1)),
            Err(TokenSealError::Malformed)
        );
        assert_eq!(keys.open("AAAA"), Err(TokenSealError::Malformed));
        let mut raw = vec![2u8, 0, 0, 0, 1];
        raw.extend_from_slice(&[0; 64]);
        assert_eq!(
            keys.open(&URL_SAFE_NO_PAD.encode(raw)),
            Err(TokenSealError::UnsupportedVersion(2))
        );
    }
}
