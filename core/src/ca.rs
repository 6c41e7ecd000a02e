//! Core's own certificate authority: agents verify core's agent endpoint against it (`--ca PEM`).
//!
//! Invariants: the CA key (`DATA_DIR/ca-key.pem`) is written 0600 and the certificate
//! (`DATA_DIR/ca.pem`) 0644, each through a temp file and a rename, so a crash never leaves half a
//! CA; an existing CA is reused, never replaced (agents hold its certificate). The copy of the CA
//! key in the database (row `ca_key`) is encrypted with core's secrets key ([`crate::secrets`]);
//! one stored in clear (a database from before) is re-stored encrypted at start. The endpoint's
//! server certificate is issued afresh at every start (its key lives in memory only); its issuer
//! name and key id are rebuilt from the fixed CA parameters and the stored CA key, which is why
//! `ca_params` must never change for an existing CA.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

/// Creating, loading or using the CA failed.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// Reading or writing a CA file failed.
    #[error("failed to access {path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Generating or parsing a key or certificate failed.
    #[error("certificate error: {0}")]
    Cert(#[from] rcgen::Error),
    /// One of the two CA files exists without the other.
    #[error("{0} exists without its pair: restore it or remove both ca.pem and ca-key.pem")]
    HalfCa(PathBuf),
    /// rustls refused the server certificate.
    #[error("TLS configuration failed")]
    Tls(#[from] rustls::Error),
    /// The database failed.
    #[error("database error")]
    Db(#[from] sqlx::Error),
    /// The stored CA key does not decrypt with this core's secrets key.
    #[error(transparent)]
    Secrets(#[from] crate::secrets::SecretsError),
    /// The data dir holds another CA than the database (two fleets' CAs mixed up).
    #[error(
        "{0} is not the CA stored in the database: restore the matching data dir, or remove ca.pem and ca-key.pem to take the database's CA"
    )]
    Mismatch(PathBuf),
}

/// The CA's fixed parameters (see the module invariants).
fn ca_params() -> Result<CertificateParams, CaError> {
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    p.distinguished_name
        .push(DnType::CommonName, "systemvm-core agent CA");
    p.distinguished_name
        .push(DnType::OrganizationName, "Mold system-VM suite");
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p.not_before = rcgen::date_time_ymd(2025, 1, 1);
    p.not_after = rcgen::date_time_ymd(2125, 1, 1);
    Ok(p)
}

/// Writes `text` to `path` with `mode` through a temp file and a rename.
fn write_atomic(path: &Path, text: &str, mode: u32) -> Result<(), CaError> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let io = |source| CaError::Io {
        path: path.to_owned(),
        source,
    };
    let tmp = path.with_extension("pem.tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io)?;
    f.write_all(text.as_bytes()).map_err(io)?;
    f.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

/// Core's CA, loaded or created.
#[derive(Debug)]
pub struct Ca {
    /// `DATA_DIR/ca.pem`: what agents get as `--ca`.
    pub cert_path: PathBuf,
    key: KeyPair,
}

impl Ca {
    /// Loads the CA from `dir`, creating it on first start.
    pub fn load_or_create(dir: &Path) -> Result<Self, CaError> {
        let cert_path = dir.join("ca.pem");
        let key_path = dir.join("ca-key.pem");
        match (cert_path.exists(), key_path.exists()) {
            (true, true) => {
                let pem = std::fs::read_to_string(&key_path).map_err(|source| CaError::Io {
                    path: key_path.clone(),
                    source,
                })?;
                let key = KeyPair::from_pem(&pem)?;
                Ok(Self { cert_path, key })
            }
            (false, false) => {
                let key = KeyPair::generate()?;
                let cert = ca_params()?.self_signed(&key)?;
                write_atomic(&key_path, &key.serialize_pem(), 0o600)?;
                write_atomic(&cert_path, &cert.pem(), 0o644)?;
                tracing::info!(path = %cert_path.display(), "Created the agent CA");
                Ok(Self { cert_path, key })
            }
            (true, false) => Err(CaError::HalfCa(cert_path)),
            (false, true) => Err(CaError::HalfCa(key_path)),
        }
    }

    /// Loads the CA shared through the database (`core_keys` rows `ca_cert`, `ca_key`), so every
    /// core on one database (HA) serves the same CA: the database's CA is written to a data dir
    /// that has none; a data dir CA is stored in a database that has none; the first core to store
    /// one wins.
    pub async fn load_shared(
        dir: &Path,
        pool: &sqlx::AnyPool,
        secrets: &crate::secrets::SecretsKey,
    ) -> Result<Self, CaError> {
        let cert_path = dir.join("ca.pem");
        let key_path = dir.join("ca-key.pem");
        let stored = stored_ca(pool, secrets).await?;
        if let (Some((cert, key)), false, false) = (&stored, cert_path.exists(), key_path.exists()) {
            write_atomic(&key_path, key, 0o600)?;
            write_atomic(&cert_path, cert, 0o644)?;
            tracing::info!(path = %cert_path.display(), "Wrote the database's agent CA to the data dir");
        }
        let ca = Self::load_or_create(dir)?;
        let cert = std::fs::read_to_string(&cert_path).map_err(|source| CaError::Io {
            path: cert_path.clone(),
            source,
        })?;
        if stored.is_none() {
            let now = crate::util::now_cs();
            let key = secrets.seal(KEY_ROW, &ca.key.serialize_pem())?;
            for (name, value) in [("ca_cert", cert.clone()), (KEY_ROW, key)] {
                sqlx::query(
                    "INSERT INTO core_keys (name, value, created) VALUES ($1, $2, $3) ON CONFLICT (name) DO NOTHING",
                )
                .bind(name)
                .bind(value)
                .bind(now.clone())
                .execute(pool)
                .await?;
            }
        }
        match stored_ca(pool, secrets).await? {
            Some((db_cert, _)) if db_cert.trim() == cert.trim() => Ok(ca),
            _ => Err(CaError::Mismatch(cert_path)),
        }
    }

    /// Issues a server certificate for the agent endpoint and builds its TLS configuration.
    /// SANs: loopback addresses, `localhost`, this host's name, and `extra`.
    pub fn server_config(&self, extra: &[String]) -> Result<Arc<rustls::ServerConfig>, CaError> {
        let mut names: Vec<String> = vec!["localhost".into()];
        if let Some(h) = hostname() {
            names.push(h);
        }
        let mut ips: Vec<IpAddr> = vec![Ipv4Addr::LOCALHOST.into(), Ipv6Addr::LOCALHOST.into()];
        for e in extra {
            match e.parse::<IpAddr>() {
                Ok(ip) => ips.push(ip),
                Err(_) => names.push(e.clone()),
            }
        }
        let mut p = CertificateParams::new(names)?;
        p.subject_alt_names
            .extend(ips.into_iter().map(SanType::IpAddress));
        p.distinguished_name
            .push(DnType::CommonName, "systemvm-core agent endpoint");
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        p.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        let leaf_key = KeyPair::generate()?;
        let issuer = Issuer::new(ca_params()?, &self.key);
        let leaf = p.signed_by(&leaf_key, &issuer)?;
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into());
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(vec![leaf.der().clone()], key)?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }

    /// Issues a storage VM's peer certificate for `name` ([`systemvm_proto::agent::peer_name`]):
    /// client and server authentication, valid [`PEER_CERT_DAYS`] days (a storage VM gets a new
    /// one at every connection). Returns the certificate and its key, PEM; the key is never
    /// stored.
    pub fn issue_peer(&self, name: &str) -> Result<(String, String), CaError> {
        let mut p = CertificateParams::new(vec![name.to_owned()])?;
        p.distinguished_name.push(DnType::CommonName, name);
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        p.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        let now = time::OffsetDateTime::now_utc();
        p.not_before = now - time::Duration::hours(1);
        p.not_after = now + time::Duration::days(PEER_CERT_DAYS);
        let key = KeyPair::generate()?;
        let issuer = Issuer::new(ca_params()?, &self.key);
        let cert = p.signed_by(&key, &issuer)?;
        Ok((cert.pem(), key.serialize_pem()))
    }
}

/// How long a storage VM's peer certificate is valid.
pub const PEER_CERT_DAYS: i64 = 30;

/// The `core_keys` row of the CA key.
const KEY_ROW: &str = "ca_key";

/// The CA stored in the database: (certificate, key) PEM; a key stored in clear is re-stored
/// encrypted (compare-and-set on the text read).
async fn stored_ca(
    pool: &sqlx::AnyPool,
    secrets: &crate::secrets::SecretsKey,
) -> Result<Option<(String, String)>, CaError> {
    let get = |name: &'static str| {
        sqlx::query_scalar::<_, String>("SELECT value FROM core_keys WHERE name = $1")
            .bind(name)
            .fetch_optional(pool)
    };
    loop {
        let Some((cert, stored_key)) = get("ca_cert").await?.zip(get(KEY_ROW).await?) else {
            return Ok(None);
        };
        let pem = match secrets.open(KEY_ROW, &stored_key)? {
            crate::secrets::Opened::Sealed(pem) => return Ok(Some((cert, pem))),
            crate::secrets::Opened::Plain(pem) => pem,
        };
        let done = sqlx::query("UPDATE core_keys SET value = $1 WHERE name = $2 AND value = $3")
            .bind(secrets.seal(KEY_ROW, &pem)?)
            .bind(KEY_ROW)
            .bind(stored_key)
            .execute(pool)
            .await?;
        if done.rows_affected() == 1 {
            tracing::info!("Encrypted the agent CA key stored in clear with the secrets key");
            return Ok(Some((cert, pem)));
        }
    }
}

fn hostname() -> Option<String> {
    let h = std::fs::read_to_string("/proc/sys/kernel/hostname").ok()?;
    let h = h.trim();
    (!h.is_empty()).then(|| h.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_once_with_private_key_mode() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::load_or_create(dir.path()).unwrap();
        let first = std::fs::read_to_string(&ca.cert_path).unwrap();
        let mode = std::fs::metadata(dir.path().join("ca-key.pem"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        ca.server_config(&["agent.example".into(), "10.0.0.1".into()])
            .unwrap();
        let again = Ca::load_or_create(dir.path()).unwrap();
        assert_eq!(std::fs::read_to_string(&again.cert_path).unwrap(), first);
        again.server_config(&[]).unwrap();
        std::fs::remove_file(dir.path().join("ca-key.pem")).unwrap();
        assert!(matches!(Ca::load_or_create(dir.path()), Err(CaError::HalfCa(_))));
    }

    #[tokio::test]
    async fn cores_on_one_database_share_the_ca() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        let db = crate::db::Db::open(None, a.path()).await.unwrap();
        let secrets = crate::secrets::SecretsKey::from_bytes(a.path().join("secrets.key"), [5; 32]);
        let first = Ca::load_shared(a.path(), &db.pool, &secrets).await.unwrap();
        let second = Ca::load_shared(b.path(), &db.pool, &secrets).await.unwrap();
        assert_eq!(
            std::fs::read_to_string(&first.cert_path).unwrap(),
            std::fs::read_to_string(&second.cert_path).unwrap()
        );
        // A data dir with another CA is refused rather than silently serving two CAs.
        let c = tempfile::tempdir().unwrap();
        Ca::load_or_create(c.path()).unwrap();
        assert!(matches!(
            Ca::load_shared(c.path(), &db.pool, &secrets).await,
            Err(CaError::Mismatch(_))
        ));
    }

    async fn stored_key_text(pool: &sqlx::AnyPool) -> String {
        sqlx::query_scalar("SELECT value FROM core_keys WHERE name = 'ca_key'")
            .fetch_one(pool)
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn the_stored_ca_key_is_encrypted() {
        let a = tempfile::tempdir().unwrap();
        let db = crate::db::Db::open(None, a.path()).await.unwrap();
        let secrets = crate::secrets::SecretsKey::from_bytes(a.path().join("secrets.key"), [6; 32]);
        Ca::load_shared(a.path(), &db.pool, &secrets).await.unwrap();
        let pem = std::fs::read_to_string(a.path().join("ca-key.pem")).unwrap();
        let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
        let stored = stored_key_text(&db.pool).await;
        assert!(stored.starts_with(crate::secrets::SEALED_PREFIX), "{stored}");
        assert!(!stored.contains("PRIVATE KEY") && !stored.contains(&body[..40]));

        // A database from before: the key in clear is re-stored encrypted; a new data dir gets it.
        sqlx::query("UPDATE core_keys SET value = $1 WHERE name = 'ca_key'")
            .bind(pem.clone())
            .execute(&db.pool)
            .await
            .unwrap();
        let b = tempfile::tempdir().unwrap();
        Ca::load_shared(b.path(), &db.pool, &secrets).await.unwrap();
        assert_eq!(std::fs::read_to_string(b.path().join("ca-key.pem")).unwrap(), pem);
        assert!(
            stored_key_text(&db.pool)
                .await
                .starts_with(crate::secrets::SEALED_PREFIX)
        );

        // Another secrets key cannot read it.
        let other = crate::secrets::SecretsKey::from_bytes(b.path().join("secrets.key"), [7; 32]);
        let c = tempfile::tempdir().unwrap();
        assert!(matches!(
            Ca::load_shared(c.path(), &db.pool, &other).await,
            Err(CaError::Secrets(crate::secrets::SecretsError::WrongKey { .. }))
        ));
    }
}
