//! Keys at rest: core's secrets key encrypts the keys core keeps in the database (the
//! console-token key set, the agent CA's private key), so a database dump alone can neither forge
//! console tokens nor impersonate core. Like CloudStack's `db.properties` key, the secrets key
//! lives outside the database: the file `DATA_DIR/secrets.key`, or `--secrets-key FILE`; two
//! cores on one database share one key file.
//!
//! A sealed value is the text `enc:v1:KID:BASE64URL(nonce ‖ ciphertext ‖ tag)`: XChaCha20-Poly1305
//! with a random 192-bit nonce; the associated data binds it to its row name and key id, so a
//! value moved to another row does not open. `KID` is a fingerprint of the secrets key, so a core
//! with another key file is told so, rather than seeing a decryption failure.
//!
//! Invariants:
//! * the key file is created once, 0600, written in full to a temporary file (`create_new`) and
//!   published by a hard link, so no reader ever sees half a key and no start replaces a key;
//! * a core never creates a key file for a database that already holds sealed values (it would
//!   only fail to open them): it stops and says to copy the first core's file;
//! * the key and the plaintexts never reach a log or an error.

use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};

/// The key file's name in the data dir.
pub const FILE: &str = "secrets.key";

/// What every sealed value starts with.
pub const SEALED_PREFIX: &str = "enc:v1:";

const NONCE_LEN: usize = 24;
const TAG_LEN: usize = 16;

/// Loading the secrets key, or sealing or opening a value, failed.
#[derive(Debug, thiserror::Error)]
pub enum SecretsError {
    /// Reading or writing the key file failed.
    #[error("failed to access the secrets key file {path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The key file does not hold a key.
    #[error("{0} is not a secrets key file (one line of 64 hexadecimal digits)")]
    BadFile(PathBuf),
    /// The database's values were sealed with another key.
    #[error(
        "the keys stored in the database are encrypted with another secrets key (key id {stored}) than {path} (key id {ours}): copy the secrets.key of the first core on this database to {path} (or point --secrets-key at it) and start again"
    )]
    WrongKey {
        /// This core's key file.
        path: PathBuf,
        /// Key id of the stored value.
        stored: String,
        /// Key id of this core's key.
        ours: String,
    },
    /// The database holds sealed values and this core has no key file.
    #[error(
        "the keys stored in the database are encrypted, and {0} does not exist: copy the secrets.key of the first core on this database there (or point --secrets-key at it) and start again"
    )]
    Missing(PathBuf),
    /// A sealed value does not open with the right key (altered, or moved from another row).
    #[error("the stored value {0} is damaged: it does not decrypt with this secrets key")]
    Damaged(String),
    /// The OS random generator failed.
    #[error("random generator failed")]
    Random,
}

/// A stored value, opened.
#[derive(PartialEq, Eq)]
pub enum Opened {
    /// It was sealed; the plaintext.
    Sealed(String),
    /// It was stored in plaintext (a database from before keys were encrypted): store it sealed.
    Plain(String),
}

impl std::fmt::Debug for Opened {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Sealed(_) => "Sealed(…)",
            Self::Plain(_) => "Plain(…)",
        })
    }
}

/// Core's secrets key.
#[derive(Clone)]
pub struct SecretsKey {
    path: PathBuf,
    id: String,
    cipher: XChaCha20Poly1305,
}

impl std::fmt::Debug for SecretsKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretsKey")
            .field("path", &self.path)
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

fn key_id(raw: &[u8; 32]) -> String {
    use sha2::Digest as _;
    let mut h = sha2::Sha256::new();
    h.update(b"systemvm-core secrets key id\0");
    h.update(raw);
    h.finalize()[..8].iter().map(|b| format!("{b:02x}")).collect()
}

fn parse_hex(text: &str) -> Option<[u8; 32]> {
    let t = text.trim();
    if t.len() != 64 || !t.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let mut raw = [0u8; 32];
    for (i, b) in raw.iter_mut().enumerate() {
        *b = u8::from_str_radix(t.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(raw)
}

impl SecretsKey {
    /// A key from its 32 bytes (`path`: where it is kept, for messages).
    pub fn from_bytes(path: impl Into<PathBuf>, raw: [u8; 32]) -> Self {
        Self {
            path: path.into(),
            id: key_id(&raw),
            cipher: XChaCha20Poly1305::new(&raw.into()),
        }
    }

    /// The key file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The key's fingerprint (in sealed values and messages; reveals nothing of the key).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Loads the key file at `path`; `Ok(None)` when there is none.
    pub fn load(path: &Path) -> Result<Option<Self>, SecretsError> {
        let io = |source| SecretsError::Io {
            path: path.to_owned(),
            source,
        };
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io(e)),
        };
        let raw = parse_hex(&text).ok_or_else(|| SecretsError::BadFile(path.to_owned()))?;
        let mode = std::fs::metadata(path).map_err(io)?.permissions().mode();
        if mode & 0o077 != 0 {
            tracing::warn!(path = %path.display(), mode = format!("{:o}", mode & 0o777), "The secrets key file is readable by others: chmod 600 it");
        }
        Ok(Some(Self::from_bytes(path, raw)))
    }

    /// Creates a new key file at `path` (0600); when another process created one meanwhile,
    /// that one is loaded.
    pub fn create(path: &Path) -> Result<Self, SecretsError> {
        let io = |source| SecretsError::Io {
            path: path.to_owned(),
            source,
        };
        let mut raw = [0u8; 32];
        getrandom::fill(&mut raw).map_err(|_| SecretsError::Random)?;
        let hex: String = raw.iter().map(|b| format!("{b:02x}")).collect();
        let name = path
            .file_name()
            .map_or_else(|| FILE.into(), |n| n.to_string_lossy().into_owned());
        let tmp = path.with_file_name(format!(".{name}.{}.tmp", std::process::id()));
        let _ = std::fs::remove_file(&tmp);
        let written = (|| {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(format!("{hex}\n").as_bytes())?;
            f.sync_all()?;
            // Published whole, and never over an existing file.
            std::fs::hard_link(&tmp, path)
        })();
        let _ = std::fs::remove_file(&tmp);
        match written {
            Ok(()) => {
                tracing::info!(path = %path.display(), "Created the secrets key (keep it with the data dir: the database's keys are encrypted with it)");
                Ok(Self::from_bytes(path, raw))
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                Self::load(path)?.ok_or_else(|| SecretsError::BadFile(path.to_owned()))
            }
            Err(e) => Err(io(e)),
        }
    }

    /// Loads the key file at `path`, creating it when the database `pool` holds no sealed value
    /// yet (a fresh database, or one from before keys were encrypted).
    pub async fn open_or_create(path: &Path, pool: &sqlx::AnyPool) -> Result<Self, OpenSecretsError> {
        if let Some(key) = Self::load(path)? {
            return Ok(key);
        }
        let sealed: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM core_keys WHERE value LIKE $1")
            .bind(format!("{SEALED_PREFIX}%"))
            .fetch_one(pool)
            .await?;
        if sealed > 0 {
            return Err(SecretsError::Missing(path.to_owned()).into());
        }
        Ok(Self::create(path)?)
    }

    fn aad(name: &str, id: &str) -> String {
        format!("systemvm-core core_keys/{name} {SEALED_PREFIX}{id}")
    }

    /// Seals `plain`, the value of row `name`.
    pub fn seal(&self, name: &str, plain: &str) -> Result<String, SecretsError> {
        let mut nonce = [0u8; NONCE_LEN];
        getrandom::fill(&mut nonce).map_err(|_| SecretsError::Random)?;
        let aad = Self::aad(name, &self.id);
        let sealed = self
            .cipher
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: plain.as_bytes(),
                    aad: aad.as_bytes(),
                },
            )
            .map_err(|_| SecretsError::Damaged(name.to_owned()))?;
        let mut bytes = Vec::with_capacity(NONCE_LEN + sealed.len());
        bytes.extend_from_slice(&nonce);
        bytes.extend_from_slice(&sealed);
        Ok(format!(
            "{SEALED_PREFIX}{}:{}",
            self.id,
            URL_SAFE_NO_PAD.encode(bytes)
        ))
    }

    /// Opens `stored`, the value of row `name`: sealed with this key, or plaintext (to re-store).
    pub fn open(&self, name: &str, stored: &str) -> Result<Opened, SecretsError> {
        let Some(rest) = stored.strip_prefix(SEALED_PREFIX) else {
            return Ok(Opened::Plain(stored.to_owned()));
        };
        let damaged = || SecretsError::Damaged(name.to_owned());
        let (id, body) = rest.split_once(':').ok_or_else(damaged)?;
        if id != self.id {
            return Err(SecretsError::WrongKey {
                path: self.path.clone(),
                stored: id.chars().take(32).collect(),
                ours: self.id.clone(),
            });
        }
        let bytes = URL_SAFE_NO_PAD.decode(body).map_err(|_| damaged())?;
        if bytes.len() < NONCE_LEN + TAG_LEN {
            return Err(damaged());
        }
        let (nonce, sealed) = bytes.split_at(NONCE_LEN);
        let aad = Self::aad(name, id);
        let plain = self
            .cipher
            .decrypt(
                XNonce::from_slice(nonce),
                Payload {
                    msg: sealed,
                    aad: aad.as_bytes(),
                },
            )
            .map_err(|_| damaged())?;
        String::from_utf8(plain)
            .map(Opened::Sealed)
            .map_err(|_| damaged())
    }
}

/// [`SecretsKey::open_or_create`] failed.
#[derive(Debug, thiserror::Error)]
pub enum OpenSecretsError {
    /// The key file.
    #[error(transparent)]
    Secrets(#[from] SecretsError),
    /// The database failed.
    #[error("database error")]
    Db(#[from] sqlx::Error),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seals_and_opens_bound_to_the_row() {
        let k = SecretsKey::from_bytes("/k", [7; 32]);
        let sealed = k.seal("console", "{\"primary\":1}").unwrap();
        assert!(
            sealed.starts_with(&format!("{SEALED_PREFIX}{}:", k.id())),
            "{sealed}"
        );
        assert!(!sealed.contains("primary"));
        assert_eq!(
            k.open("console", &sealed).unwrap(),
            Opened::Sealed("{\"primary\":1}".into())
        );
        // Fresh nonce each time.
        assert_ne!(sealed, k.seal("console", "{\"primary\":1}").unwrap());
        // Moved to another row, or altered: damaged.
        assert!(matches!(k.open("ca_key", &sealed), Err(SecretsError::Damaged(_))));
        let mut altered = sealed.clone().into_bytes();
        let last = altered.len() - 2;
        altered[last] = if altered[last] == b'A' { b'B' } else { b'A' };
        let altered = String::from_utf8(altered).unwrap();
        assert!(matches!(
            k.open("console", &altered),
            Err(SecretsError::Damaged(_))
        ));
        assert!(matches!(
            k.open("console", &format!("{SEALED_PREFIX}{}:", k.id())),
            Err(SecretsError::Damaged(_))
        ));
        // Plaintext rows (older databases) come back as such.
        assert_eq!(k.open("console", "plain").unwrap(), Opened::Plain("plain".into()));
    }

    #[test]
    fn another_key_is_named_as_such() {
        let a = SecretsKey::from_bytes("/a/secrets.key", [1; 32]);
        let b = SecretsKey::from_bytes("/b/secrets.key", [2; 32]);
        assert_ne!(a.id(), b.id());
        let e = b.open("console", &a.seal("console", "x").unwrap()).unwrap_err();
        assert!(matches!(&e, SecretsError::WrongKey { .. }));
        let text = e.to_string();
        assert!(
            text.contains("/b/secrets.key") && text.contains("copy the secrets.key"),
            "{text}"
        );
        // Neither the key nor the plaintext reaches Debug.
        let dbg = format!("{a:?} {:?}", Opened::Sealed("x-secret".into()));
        assert!(!dbg.contains("x-secret") && !dbg.contains("[1, 1"), "{dbg}");
    }

    #[test]
    fn key_file_created_once_0600() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE);
        assert!(SecretsKey::load(&path).unwrap().is_none());
        let k = SecretsKey::create(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.trim().len(), 64);
        // Loaded again: the same key; created again: the existing file wins, unchanged.
        let again = SecretsKey::load(&path).unwrap().unwrap();
        assert_eq!(again.id(), k.id());
        let second = SecretsKey::create(&path).unwrap();
        assert_eq!(second.id(), k.id());
        assert_eq!(std::fs::read_to_string(&path).unwrap(), text);
        // No temporary file is left behind.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        std::fs::write(&path, "not a key\n").unwrap();
        assert!(matches!(SecretsKey::load(&path), Err(SecretsError::BadFile(_))));
    }

    #[tokio::test]
    async fn no_new_key_for_a_database_with_sealed_values() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        let db = crate::db::Db::open(None, a.path()).await.unwrap();
        let first = SecretsKey::open_or_create(&a.path().join(FILE), &db.pool)
            .await
            .unwrap();
        sqlx::query("INSERT INTO core_keys (name, value, created) VALUES ('console', $1, 't')")
            .bind(first.seal("console", "x").unwrap())
            .execute(&db.pool)
            .await
            .unwrap();
        let missing = b.path().join(FILE);
        let e = SecretsKey::open_or_create(&missing, &db.pool).await.unwrap_err();
        assert!(
            matches!(e, OpenSecretsError::Secrets(SecretsError::Missing(_))),
            "{e}"
        );
        assert!(!missing.exists());
        // The first core's file, shared: the same key.
        let shared = SecretsKey::open_or_create(&a.path().join(FILE), &db.pool)
            .await
            .unwrap();
        assert_eq!(shared.id(), first.id());
    }
}
