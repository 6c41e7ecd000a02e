//! The browser-facing TLS of the agents (the console proxy's page and WebSocket, the storage VM's
//! transfer server): a certificate that can be replaced while the server runs.
//!
//! Invariants:
//! * the certificate is chosen at each handshake ([`ServerCert`] resolves it), so a new one takes
//!   effect for the next connection and never touches established ones (a live console session or
//!   upload keeps its TLS session);
//! * a certificate is installed only when its key matches and it parses; a bad one is refused and
//!   the current one stays; an older serial never replaces a newer one;
//! * [`is_tls`] only peeks: a listener serves TLS and plain HTTP on one port (TLS when the first
//!   byte is a handshake record), so a certificate can arrive after the listener started.

use std::sync::{Arc, PoisonError, RwLock};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

/// Why a certificate was refused.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// The PEM holds no certificate, or does not parse.
    #[error("the certificate does not parse: {0}")]
    Certificate(String),
    /// The key does not parse or is of an unsupported kind.
    #[error("the private key does not parse: {0}")]
    Key(String),
    /// The key is not the certificate's.
    #[error("the private key does not match the certificate")]
    Mismatch,
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Parses certificates (PEM, one or more).
pub fn parse_chain(chain_pem: &str) -> Result<Vec<CertificateDer<'static>>, CertError> {
    let chain = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CertError::Certificate(e.to_string()))?;
    if chain.is_empty() {
        return Err(CertError::Certificate("no certificate in the PEM".into()));
    }
    Ok(chain)
}

/// Parses and checks a certificate chain and its key (PEM).
pub fn certified_key(chain_pem: &str, key_pem: &str) -> Result<CertifiedKey, CertError> {
    let chain = parse_chain(chain_pem)?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| CertError::Key(e.to_string()))?;
    let ck = CertifiedKey::from_der(chain, key, &provider()).map_err(|e| match e {
        rustls::Error::InconsistentKeys(_) => CertError::Mismatch,
        other => CertError::Key(other.to_string()),
    })?;
    Ok(ck)
}

/// The server certificate of a listener, replaceable at run time.
#[derive(Debug, Default)]
pub struct ServerCert {
    current: RwLock<Option<(u64, Arc<CertifiedKey>)>>,
}

impl ServerCert {
    /// An empty one (no TLS until a certificate is set).
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Installs `chain_pem`/`key_pem` as certificate `serial`; an older serial than the current
    /// one is ignored (`Ok(false)`).
    pub fn set_pem(&self, chain_pem: &str, key_pem: &str, serial: u64) -> Result<bool, CertError> {
        let ck = Arc::new(certified_key(chain_pem, key_pem)?);
        let mut cur = self.current.write().unwrap_or_else(PoisonError::into_inner);
        if cur.as_ref().is_some_and(|(s, _)| *s > serial) {
            return Ok(false);
        }
        *cur = Some((serial, ck));
        Ok(true)
    }

    /// Whether a certificate is installed.
    pub fn is_set(&self) -> bool {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .is_some()
    }

    /// The serial of the installed certificate.
    pub fn serial(&self) -> Option<u64> {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            .map(|(s, _)| *s)
    }

    /// A server configuration that asks this for its certificate at every handshake (HTTP/1.1).
    pub fn server_config(self: &Arc<Self>) -> Result<Arc<rustls::ServerConfig>, rustls::Error> {
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_cert_resolver(self.clone());
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }
}

impl ResolvesServerCert for ServerCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            .map(|(_, ck)| ck.clone())
    }
}

/// Whether the connection starts with a TLS handshake record (peeks; consumes nothing). A
/// client that sends nothing within `within` reads as plain (its request times out there).
pub async fn is_tls(tcp: &tokio::net::TcpStream, within: std::time::Duration) -> bool {
    let mut first = [0u8; 1];
    matches!(
        tokio::time::timeout(within, tcp.peek(&mut first)).await,
        Ok(Ok(1)) if first[0] == 0x16
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(name: &str) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec![name.to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        (cert.pem(), key.serialize_pem())
    }

    #[test]
    fn installs_matching_newer_certificates_only() {
        let c = ServerCert::new();
        assert!(!c.is_set());
        let (a_cert, a_key) = pair("a.example.org");
        let (b_cert, b_key) = pair("b.example.org");
        assert!(matches!(c.set_pem(&a_cert, &b_key, 1), Err(CertError::Mismatch)));
        assert!(matches!(
            c.set_pem("nonsense", &a_key, 1),
            Err(CertError::Certificate(_))
        ));
        assert!(matches!(
            c.set_pem(&a_cert, "nonsense", 1),
            Err(CertError::Key(_))
        ));
        assert!(!c.is_set());
        assert!(c.set_pem(&a_cert, &a_key, 2).unwrap());
        assert!(!c.set_pem(&b_cert, &b_key, 1).unwrap(), "older serial ignored");
        assert_eq!(c.serial(), Some(2));
        assert!(c.set_pem(&b_cert, &b_key, 3).unwrap());
        assert!(c.server_config().is_ok());
    }
}
