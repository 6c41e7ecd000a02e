//! The HTTP(S) client for downloads: rustls with a configurable CA bundle, redirects up to a cap, and a
//! guard against server-side request forgery.
//!
//! Invariant: no request leaves for a loopback, link-local (cloud metadata), private or otherwise
//! internal address unless an allow-listed CIDR covers it. The check runs on every resolved address of
//! every hop (initial URL and each redirect), after DNS, so a name that resolves inside is refused too.
//! An IPv6 address that carries an IPv4 address (mapped, compatible, translated, NAT64 `64:ff9b::/96`,
//! 6to4 `2002::/16`, Teredo) is refused when that IPv4 address is internal; the local-use NAT64
//! prefix `64:ff9b:1::/48` is refused as a whole.
//!
//! The allow-list can change at runtime (core's `secstorage.allowed.internal.sites`): a client made
//! with [`client_with_allow_list`] reads its [`AllowList`] on every resolution and every redirect, so
//! a new list governs the next connection; no check ever sees half of an update.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
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

/// The internal range an address falls in, if any. IPv6 addresses that carry an IPv4 address
/// (IPv4-mapped, IPv4-compatible, SIIT-translated, NAT64, 6to4, Teredo) are judged by the IPv4
/// address they lead to as well (see [`embedded_ipv4`]); the local-use NAT64 prefix
/// `64:ff9b:1::/48` is internal as a whole (where it puts the IPv4 address is the operator's choice).
pub fn internal_range(ip: IpAddr) -> Option<&'static str> {
    match ip.to_canonical() {
        IpAddr::V4(v4) => internal_v4(v4),
        IpAddr::V6(v6) => internal_v6_itself(v6).or_else(|| {
            embedded_ipv4(v6)
                .into_iter()
                .find_map(|(kind, v4)| internal_v4(v4).map(|_| kind))
        }),
    }
}

/// The internal IPv6 range an address is in by itself (not counting an embedded IPv4 address).
fn internal_v6_itself(v6: Ipv6Addr) -> Option<&'static str> {
    let s = v6.segments();
    if v6.is_loopback() || v6.is_unspecified() {
        Some("loopback")
    } else if (s[0] & 0xffc0) == 0xfe80 {
        Some("link-local")
    } else if (s[0] & 0xfe00) == 0xfc00 {
        Some("unique local")
    } else if v6.is_multicast() {
        Some("multicast")
    } else if s[..3] == [0x64, 0xff9b, 1] {
        Some("local-use NAT64")
    } else {
        None
    }
}

fn internal_v4(v4: Ipv4Addr) -> Option<&'static str> {
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

/// The IPv4 addresses an IPv6 address leads to, with the kind of embedding: IPv4-mapped
/// (`::ffff:0:0/96`), SIIT-translated (`::ffff:0:0:0/96`), IPv4-compatible (`::/96`, deprecated),
/// NAT64 with the well-known prefix (`64:ff9b::/96`), 6to4 (`2002::/16`, bits 16–47) and Teredo
/// (`2001::/32`: the server, and the client's address stored inverted in the last 32 bits).
pub fn embedded_ipv4(v6: Ipv6Addr) -> Vec<(&'static str, Ipv4Addr)> {
    let s = v6.segments();
    let o = v6.octets();
    let last = Ipv4Addr::new(o[12], o[13], o[14], o[15]);
    let mut out = Vec::new();
    if s[..5] == [0; 5] && s[5] == 0xffff {
        out.push(("IPv4-mapped", last));
    } else if s[..4] == [0; 4] && s[4] == 0xffff && s[5] == 0 {
        out.push(("IPv4-translated", last));
    } else if s[..6] == [0; 6] {
        out.push(("IPv4-compatible", last));
    } else if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        out.push(("NAT64", last));
    } else if s[0] == 0x2002 {
        out.push(("6to4", Ipv4Addr::new(o[2], o[3], o[4], o[5])));
    } else if s[..2] == [0x2001, 0] {
        out.push(("Teredo server", Ipv4Addr::new(o[4], o[5], o[6], o[7])));
        out.push(("Teredo client", Ipv4Addr::new(!o[12], !o[13], !o[14], !o[15])));
    }
    out
}

/// Whether a download may reach `ip` under `allow`.
pub fn check_address(ip: IpAddr, allow: &[IpNet]) -> Result<(), InternalAddress> {
    let ip = ip.to_canonical();
    let allowed = |ip: IpAddr| allow.iter().any(|net| net.contains(&ip));
    let Some(range) = internal_range(ip) else {
        return Ok(());
    };
    if allowed(ip) {
        return Ok(());
    }
    // An address that leads to allow-listed IPv4 addresses only (and is not internal itself) passes.
    if let IpAddr::V6(v6) = ip {
        let embedded = embedded_ipv4(v6);
        if internal_v6_itself(v6).is_none()
            && !embedded.is_empty()
            && embedded
                .iter()
                .all(|(_, v4)| internal_v4(*v4).is_none() || allowed(IpAddr::V4(*v4)))
        {
            return Ok(());
        }
    }
    Err(InternalAddress { addr: ip, range })
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
    fn ipv6_forms_of_internal_ipv4_addresses() {
        let internal = [
            // IPv4-mapped, IPv4-compatible and SIIT-translated forms.
            ("::ffff:10.0.0.1", "private"),
            ("::127.0.0.1", "loopback"),
            ("::169.254.169.254", "link-local / cloud metadata"),
            ("::ffff:0:192.168.0.1", "IPv4-translated"),
            // NAT64, well-known prefix: the last 32 bits.
            ("64:ff9b::7f00:1", "NAT64"),
            ("64:ff9b::169.254.169.254", "NAT64"),
            ("64:ff9b::a00:1", "NAT64"),
            ("64:ff9b::c0a8:101", "NAT64"),
            ("64:ff9b::6440:1", "NAT64"),
            // Local-use NAT64 (RFC 8215): internal whatever it embeds.
            ("64:ff9b:1::a00:1", "local-use NAT64"),
            ("64:ff9b:1::808:808", "local-use NAT64"),
            ("64:ff9b:1:ffff::1", "local-use NAT64"),
            // 6to4: bits 16-47.
            ("2002:7f00:1::", "6to4"),
            ("2002:a9fe:a9fe::1", "6to4"),
            ("2002:c0a8:0101:1::1", "6to4"),
            ("2002:ac10:0001::", "6to4"),
            // Teredo: server in bits 32-63, client inverted in the last 32 bits.
            ("2001:0:7f00:1::808:808", "Teredo server"),
            ("2001:0:808:808::f5ff:fffe", "Teredo client"),
        ];
        for (ip, range) in internal {
            let addr: IpAddr = ip.parse().unwrap();
            assert!(internal_range(addr).is_some(), "{ip}");
            let err = check_address(addr, &[]).unwrap_err();
            if range.contains("NAT64")
                || range.contains("6to4")
                || range.contains("Teredo")
                || range.contains("translated")
            {
                assert_eq!(err.range, range, "{ip}");
            }
        }
        // The same forms of public IPv4 addresses are fine.
        for ip in [
            "64:ff9b::808:808",
            "64:ff9b::203.0.113.9",
            "2002:808:808::1",
            "2002:cb00:7109:1::1",
            "::8.8.8.8",
            "::ffff:0:8.8.8.8",
            "2001:0:808:808::f7f7:f7f7",
        ] {
            assert!(internal_range(ip.parse().unwrap()).is_none(), "{ip}");
        }
        // 64:ff9b::/96 only: other addresses under 64:ff9b::/32 are not NAT64 of the well-known prefix.
        assert_eq!(embedded_ipv4("64:ff9b:0:0:1::a00:1".parse().unwrap()), vec![]);
    }

    #[test]
    fn allow_list_covers_embedded_ipv4_addresses() {
        let ten: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        assert!(check_address("64:ff9b::a00:1".parse().unwrap(), &ten).is_ok());
        assert!(check_address("2002:a00:1::1".parse().unwrap(), &ten).is_ok());
        assert!(check_address("::ffff:10.1.2.3".parse().unwrap(), &ten).is_ok());
        assert!(check_address("64:ff9b::7f00:1".parse().unwrap(), &ten).is_err());
        // Local-use NAT64 needs its IPv6 range allowed.
        assert!(check_address("64:ff9b:1::a00:1".parse().unwrap(), &ten).is_err());
        let local_nat64: Vec<IpNet> = vec!["64:ff9b:1::/48".parse().unwrap()];
        assert!(check_address("64:ff9b:1::a00:1".parse().unwrap(), &local_nat64).is_ok());
        // Literal IPv6 hosts in URLs are checked the same way.
        assert!(
            check_url(
                &"http://[64:ff9b::a9fe:a9fe]/latest/meta-data".parse().unwrap(),
                &[]
            )
            .is_err()
        );
        assert!(check_url(&"http://[2002:a9fe:a9fe::]/x".parse().unwrap(), &[]).is_err());
        assert!(check_url(&"http://[::a9fe:a9fe]/x".parse().unwrap(), &[]).is_err());
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
