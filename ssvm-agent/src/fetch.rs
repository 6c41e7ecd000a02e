//! The HTTP(S) client for downloads: rustls with a configurable CA bundle, redirects up to a cap, and a
//! guard against server-side request forgery.
//!
//! Invariant: no request leaves for a loopback, link-local (cloud metadata), private or otherwise
//! internal address unless an allow-listed CIDR covers it. The check runs on every resolved address of
//! every hop (initial URL and each redirect), after DNS, so a name that resolves inside is refused too.
//!
//! The allow-list can change at runtime (core's `secstorage.allowed.internal.sites`): a client made
//! with [`client_with_allow_list`] reads its [`AllowList`] on every resolution and every redirect, so
//! a new list governs the next connection; no check ever sees half of an update.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use anyhow::Context as _;
use ipnet::IpNet;
use reqwest::dns::{Addrs, Name, Resolve, Resolving};

/// Default CA bundle (Debian's `ca-certificates`).
pub const DEFAULT_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// Settings of the download client.
#[derive(Clone, Debug)]
pub struct FetchConfig {
    /// PEM bundle of trusted CAs for https.
    pub ca_bundle: std::path::PathBuf,
    /// Internal ranges a download may reach anyway (e.g. a local mirror).
    pub allow_internal: Vec<IpNet>,
    /// Most redirects followed.
    pub max_redirects: usize,
    /// Time allowed to connect.
    pub connect_timeout: Duration,
}

impl Default for FetchConfig {
    fn default() -> Self {
        FetchConfig {
            ca_bundle: DEFAULT_CA_BUNDLE.into(),
            allow_internal: Vec::new(),
            max_redirects: 10,
            connect_timeout: Duration::from_secs(30),
        }
    }
}

/// The internal ranges downloads may reach, shared and swappable at runtime: readers take a snapshot
/// ([`AllowList::get`]), writers replace the whole list ([`AllowList::set`]).
#[derive(Clone, Debug, Default)]
pub struct AllowList(Arc<RwLock<Arc<Vec<IpNet>>>>);

impl AllowList {
    /// A list holding `nets`.
    pub fn new(nets: Vec<IpNet>) -> Self {
        AllowList(Arc::new(RwLock::new(Arc::new(nets))))
    }

    /// The current list.
    pub fn get(&self) -> Arc<Vec<IpNet>> {
        self.0.read().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Replaces the list; checks after this call see `nets`.
    pub fn set(&self, nets: Vec<IpNet>) {
        *self.0.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(nets);
    }
}

/// Why an address may not be fetched from.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "refusing to download from internal address {addr} ({range}); allow it with the setting secstorage.allowed.internal.sites (or ssvm-agent --allow-internal when run by hand)"
)]
pub struct InternalAddress {
    /// The refused address.
    pub addr: IpAddr,
    /// Which kind of internal range it is in.
    pub range: &'static str,
}

/// The internal range an address falls in, if any.
pub fn internal_range(ip: IpAddr) -> Option<&'static str> {
    match ip.to_canonical() {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            if v4.is_loopback() {
                Some("loopback")
            } else if v4.is_link_local() {
                Some("link-local / cloud metadata")
            } else if v4.is_private() {
                Some("private")
            } else if o[0] == 100 && (o[1] & 0xc0) == 64 {
                Some("carrier-grade NAT")
            } else if o[0] == 0 || v4.is_broadcast() || v4.is_multicast() || o[0] >= 240 {
                Some("reserved")
            } else if o[0] == 198 && (o[1] & 0xfe) == 18 {
                Some("benchmarking")
            } else {
                None
            }
        }
        IpAddr::V6(v6) => {
            let s = v6.segments();
            if v6.is_loopback() || v6.is_unspecified() {
                Some("loopback")
            } else if (s[0] & 0xffc0) == 0xfe80 {
                Some("link-local")
            } else if (s[0] & 0xfe00) == 0xfc00 {
                Some("unique local")
            } else if v6.is_multicast() {
                Some("multicast")
            } else {
                None
            }
        }
    }
}

/// Whether a download may reach `ip` under `allow`.
pub fn check_address(ip: IpAddr, allow: &[IpNet]) -> Result<(), InternalAddress> {
    let ip = ip.to_canonical();
    match internal_range(ip) {
        Some(range) if !allow.iter().any(|net| net.contains(&ip)) => Err(InternalAddress { addr: ip, range }),
        _ => Ok(()),
    }
}

/// A resolver that drops internal addresses, so no connection to them is ever made.
struct GuardedResolver {
    allow: AllowList,
}

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let allow = self.allow.get();
        Box::pin(async move {
            let host = name.as_str().to_owned();
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let mut refused = None;
            let ok: Vec<SocketAddr> = addrs
                .into_iter()
                .filter(|a| match check_address(a.ip(), &allow) {
                    Ok(()) => true,
                    Err(e) => {
                        refused = Some(e);
                        false
                    }
                })
                .collect();
            if ok.is_empty() {
                let err: Box<dyn std::error::Error + Send + Sync> = match refused {
                    Some(e) => Box::new(e),
                    None => format!("{host} has no addresses").into(),
                };
                return Err(err);
            }
            Ok(Box::new(ok.into_iter()) as Addrs)
        })
    }
}

/// Checks a URL before a request: scheme http(s), and a literal IP host against the guard
/// (names are checked by the resolver).
pub fn check_url(url: &reqwest::Url, allow: &[IpNet]) -> Result<(), String> {
    if url.scheme() != "http" && url.scheme() != "https" {
        return Err(format!(
            "unsupported URL scheme {:?}: use http or https",
            url.scheme()
        ));
    }
    match url.host() {
        Some(url::Host::Ipv4(ip)) => check_address(IpAddr::V4(ip), allow).map_err(|e| e.to_string()),
        Some(url::Host::Ipv6(ip)) => check_address(IpAddr::V6(ip), allow).map_err(|e| e.to_string()),
        Some(url::Host::Domain(_)) => Ok(()),
        None => Err("URL has no host".into()),
    }
}

/// Builds the download client with the fixed allow-list `config.allow_internal`.
pub fn client(config: &FetchConfig) -> anyhow::Result<reqwest::Client> {
    client_with_allow_list(config, &AllowList::new(config.allow_internal.clone()))
}

/// Builds the download client whose resolver and redirect checks read `allow` each time (so
/// [`AllowList::set`] governs its later connections); `config.allow_internal` is not used.
pub fn client_with_allow_list(config: &FetchConfig, allow: &AllowList) -> anyhow::Result<reqwest::Client> {
    let tls = tls_config(&config.ca_bundle)?;
    let allow = allow.clone();
    let redirect_allow = allow.clone();
    let max = config.max_redirects;
    let policy = reqwest::redirect::Policy::custom(move |attempt| {
        if attempt.previous().len() > max {
            return attempt.error(format!("more than {max} redirects"));
        }
        match check_url(attempt.url(), &redirect_allow.get()) {
            Ok(()) => attempt.follow(),
            Err(e) => {
                let msg = format!("redirect to {} refused: {e}", attempt.url());
                attempt.error(msg)
            }
        }
    });
    reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .dns_resolver(Arc::new(GuardedResolver { allow }))
        .redirect(policy)
        .connect_timeout(config.connect_timeout)
        .tcp_nodelay(true)
        .no_proxy()
        .user_agent(concat!("ssvm-agent/", env!("CARGO_PKG_VERSION")))
        .build()
        .context("failed to build the HTTP client")
}

fn tls_config(ca_bundle: &Path) -> anyhow::Result<rustls::ClientConfig> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject as _;
    let mut roots = rustls::RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(ca_bundle)
        .with_context(|| format!("failed to read CA bundle {}", ca_bundle.display()))?;
    for cert in certs {
        let cert = cert.with_context(|| format!("failed to parse CA bundle {}", ca_bundle.display()))?;
        // Bundles carry the odd certificate rustls cannot use; skip those, keep the rest.
        let _ = roots.add(cert);
    }
    anyhow::ensure!(
        !roots.is_empty(),
        "no usable CA certificate in {}",
        ca_bundle.display()
    );
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("failed to set TLS versions")?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_ranges() {
        for ip in [
            "127.0.0.1",
            "169.254.169.254",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "100.64.0.1",
            "0.0.0.0",
            "::1",
            "fe80::1",
            "fd00::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
        ] {
            assert!(internal_range(ip.parse().unwrap()).is_some(), "{ip}");
        }
        for ip in ["8.8.8.8", "203.0.113.9", "2001:4860:4860::8888", "172.32.0.1"] {
            assert!(internal_range(ip.parse().unwrap()).is_none(), "{ip}");
        }
    }

    #[test]
    fn allow_list() {
        let allow: Vec<IpNet> = vec!["127.0.0.0/8".parse().unwrap()];
        assert!(check_address("127.0.0.1".parse().unwrap(), &allow).is_ok());
        assert!(check_address("::ffff:127.0.0.1".parse().unwrap(), &allow).is_ok());
        let err = check_address("169.254.169.254".parse().unwrap(), &allow).unwrap_err();
        assert!(err.to_string().contains("169.254.169.254"), "{err}");
    }

    #[test]
    fn allow_list_swaps_whole_lists() {
        let list = AllowList::new(Vec::new());
        let before = list.get();
        assert!(check_address("127.0.0.1".parse().unwrap(), &before).is_err());
        list.clone().set(vec!["127.0.0.0/8".parse().unwrap()]);
        assert!(check_address("127.0.0.1".parse().unwrap(), &list.get()).is_ok());
        // A snapshot taken before the update keeps the old list.
        assert!(before.is_empty());
    }

    #[tokio::test]
    async fn resolver_reads_the_current_list() {
        let list = AllowList::new(Vec::new());
        let resolver = GuardedResolver { allow: list.clone() };
        let refused = resolver.resolve("localhost".parse().unwrap()).await;
        assert!(refused.is_err_and(|e| e.to_string().contains("internal address")));
        list.set(vec!["127.0.0.0/8".parse().unwrap(), "::1/128".parse().unwrap()]);
        let addrs: Vec<SocketAddr> = resolver
            .resolve("localhost".parse().unwrap())
            .await
            .unwrap()
            .collect();
        assert!(
            !addrs.is_empty() && addrs.iter().all(|a| a.ip().is_loopback()),
            "{addrs:?}"
        );
    }

    #[test]
    fn urls() {
        let allow = [];
        assert!(check_url(&"http://example.com/x.qcow2".parse().unwrap(), &allow).is_ok());
        assert!(check_url(&"http://127.0.0.1/x".parse().unwrap(), &allow).is_err());
        assert!(check_url(&"http://[::1]/x".parse().unwrap(), &allow).is_err());
        assert!(
            check_url(&"ftp://example.com/x".parse().unwrap(), &allow)
                .unwrap_err()
                .contains("scheme")
        );
        assert!(check_url(&"file:///etc/passwd".parse().unwrap(), &allow).is_err());
    }
}
