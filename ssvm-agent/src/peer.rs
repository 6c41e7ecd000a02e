//! The channel between storage VMs (cross-zone copies): mutual TLS where each side proves itself
//! with the peer certificate core's CA issued it when it connected
//! ([`systemvm_proto::agent::PeerIdentity`], named [`peer_name`] of its VM id).
//!
//! Invariants:
//! * only core's CA (the `--ca` file the agent verifies core with) is trusted on this channel, in
//!   both directions; no system roots, no way to turn verification off;
//! * the transfer server answers a handshake for this VM's peer name with the peer certificate
//!   and requires a client certificate from core's CA ([`Peers::server_config_for`]); a download link
//!   sealed for a peer ([`systemvm_proto::transfer::ExtractLink::peer`]) is served only to a
//!   client whose certificate carries that peer's name ([`presented`]);
//! * the client side dials the address core named, verifies the server's certificate for the
//!   source VM's peer name and presents its own ([`Peers::client`]); until core sent an identity
//!   there is none to present and the copy waits (a transient failure).

use std::sync::{Arc, PoisonError, RwLock};

use anyhow::Context as _;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use systemvm_agent_client::tls::{CertError, certified_key};
use systemvm_proto::agent::{PeerIdentity, PeerSource, peer_name};

/// This storage VM's side of the channel between storage VMs.
pub struct Peers {
    name: Option<String>,
    roots: Option<Arc<rustls::RootCertStore>>,
    identity: Arc<Identity>,
    server: Option<Arc<rustls::ServerConfig>>,
}

impl std::fmt::Debug for Peers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Peers")
            .field("name", &self.name)
            .field("ready", &self.is_ready())
            .finish()
    }
}

/// The current peer certificate: what the server presents and the client shows.
#[derive(Debug, Default)]
struct Identity {
    current: RwLock<Option<Current>>,
}

#[derive(Debug, Clone)]
struct Current {
    certified: Arc<CertifiedKey>,
    chain_pem: String,
    key_pem: String,
}

impl ResolvesServerCert for Identity {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            .map(|c| c.certified.clone())
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl Peers {
    /// No channel (an agent without core): nothing is trusted, nothing presented.
    pub fn none() -> Arc<Self> {
        Arc::new(Peers {
            name: None,
            roots: None,
            identity: Arc::default(),
            server: None,
        })
    }

    /// The channel of VM `vm_id`, trusting the CA in `ca_pem_file` (core's).
    pub fn new(vm_id: &str, ca_pem_file: &std::path::Path) -> anyhow::Result<Arc<Self>> {
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(ca_pem_file)
            .with_context(|| format!("failed to read {}", ca_pem_file.display()))?
        {
            roots
                .add(cert.with_context(|| format!("failed to parse {}", ca_pem_file.display()))?)
                .with_context(|| format!("unusable CA in {}", ca_pem_file.display()))?;
        }
        let roots = Arc::new(roots);
        let identity: Arc<Identity> = Arc::default();
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
            .build()
            .context("failed to set up client verification")?;
        let mut server = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(identity.clone());
        server.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(Peers {
            name: Some(peer_name(vm_id)),
            roots: Some(roots),
            identity,
            server: Some(Arc::new(server)),
        }))
    }

    /// Installs the identity core sent; a bad one is refused and the current one stays.
    pub fn set(&self, identity: &PeerIdentity) -> Result<(), CertError> {
        let certified = Arc::new(certified_key(&identity.chain_pem, identity.key_pem.expose())?);
        *self
            .identity
            .current
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Some(Current {
            certified,
            chain_pem: identity.chain_pem.clone(),
            key_pem: identity.key_pem.expose().to_owned(),
        });
        Ok(())
    }

    /// Whether core sent an identity (the server answers peers, the client can dial them).
    pub fn is_ready(&self) -> bool {
        self.server.is_some()
            && self
                .identity
                .current
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .is_some()
    }

    /// The TLS configuration for a handshake naming `sni`: `Some` when it is this VM's peer name
    /// and an identity is installed.
    pub fn server_config_for(&self, sni: Option<&str>) -> Option<Arc<rustls::ServerConfig>> {
        let name = self.name.as_deref()?;
        if !sni.is_some_and(|s| s.eq_ignore_ascii_case(name)) || !self.is_ready() {
            return None;
        }
        self.server.clone()
    }

    /// A client for copying from `source`: it dials `source.address`, verifies the server for
    /// `source.vm_id`'s peer name against core's CA and presents this VM's certificate; no
    /// redirects, no proxy. Fails (transiently) while core sent no identity.
    pub async fn client(
        &self,
        source: &PeerSource,
        connect_timeout: std::time::Duration,
    ) -> anyhow::Result<reqwest::Client> {
        let roots = self
            .roots
            .clone()
            .context("this storage VM has no link to core, so it cannot copy from another")?;
        let current = self
            .identity
            .current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
            .context("no peer certificate from core yet")?;
        let chain = CertificateDer::pem_slice_iter(current.chain_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .context("peer certificate")?;
        let key = PrivateKeyDer::from_pem_slice(current.key_pem.as_bytes()).context("peer key")?;
        let mut tls = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)?;
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        let addr = tokio::net::lookup_host(&source.address)
            .await
            .with_context(|| format!("cannot resolve the source storage VM {}", source.address))?
            .next()
            .with_context(|| format!("no address for the source storage VM {}", source.address))?;
        reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .resolve(&peer_name(&source.vm_id), addr)
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(connect_timeout)
            .tcp_nodelay(true)
            .no_proxy()
            .user_agent(concat!("ssvm-agent/", env!("CARGO_PKG_VERSION")))
            .build()
            .context("failed to build the peer client")
    }
}

/// Whether a client certificate (already verified against core's CA by the handshake) names
/// storage VM `vm_id`.
pub fn presented(cert: &CertificateDer<'_>, vm_id: &str) -> bool {
    let Ok(name) = ServerName::try_from(peer_name(vm_id)) else {
        return false;
    };
    webpki::EndEntityCert::try_from(cert).is_ok_and(|ee| ee.verify_is_valid_for_subject_name(&name).is_ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ca() -> (rcgen::Issuer<'static, rcgen::KeyPair>, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let cert = p.self_signed(&key).unwrap();
        (rcgen::Issuer::new(p, key), cert.pem())
    }

    fn leaf(issuer: &rcgen::Issuer<'static, rcgen::KeyPair>, name: &str) -> PeerIdentity {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::new(vec![name.to_owned()]).unwrap();
        p.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = p.signed_by(&key, issuer).unwrap();
        PeerIdentity {
            chain_pem: cert.pem(),
            key_pem: systemvm_proto::Secret(key.serialize_pem()),
        }
    }

    #[test]
    fn answers_its_own_name_only_once_it_has_an_identity() {
        let (issuer, ca_pem) = ca();
        let dir = tempfile::tempdir().unwrap();
        let ca_file = dir.path().join("ca.pem");
        std::fs::write(&ca_file, ca_pem).unwrap();
        let peers = Peers::new("VM-A", &ca_file).unwrap();
        let own = peer_name("vm-a");
        assert!(peers.server_config_for(Some(&own)).is_none(), "no identity yet");
        peers.set(&leaf(&issuer, &own)).unwrap();
        assert!(peers.server_config_for(Some(&own)).is_some());
        assert!(peers.server_config_for(Some("a-b-c-d.example.org")).is_none());
        assert!(peers.server_config_for(None).is_none());
        let bad = PeerIdentity {
            chain_pem: "nonsense".into(),
            key_pem: systemvm_proto::Secret("nonsense".into()),
        };
        assert!(peers.set(&bad).is_err());
        assert!(peers.is_ready(), "a bad identity keeps the current one");
    }

    #[test]
    fn presented_names_the_vm() {
        let (issuer, _) = ca();
        let id = leaf(&issuer, &peer_name("vm-b"));
        let der = CertificateDer::pem_slice_iter(id.chain_pem.as_bytes())
            .next()
            .unwrap()
            .unwrap();
        assert!(presented(&der, "vm-b"));
        assert!(presented(&der, "VM-B"));
        assert!(!presented(&der, "vm-c"));
        assert!(!presented(&CertificateDer::from(vec![1, 2, 3]), "vm-b"));
    }
}
