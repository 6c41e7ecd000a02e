//! Console proxy settings, validated before any port is bound.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use systemvm_proto::console::KeySet;

/// Validated settings of one console proxy.
#[derive(Clone, Debug)]
pub struct ProxyConfig {
    /// Address of the public listener (console page and WebSocket).
    pub listen: SocketAddr,
    /// Token keys: all of them open tokens.
    pub keys: KeySet,
    /// Certificate chain and key for `wss://`/`https://`; plain `ws://` when `None`.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Folder holding `console.html`, `static/` and `node_modules/@novnc/novnc`.
    pub web_root: PathBuf,
    /// Origins allowed besides the proxy's own (when a token names none itself).
    pub allowed_origins: Vec<String>,
    /// Most concurrent console sessions; more are refused with a close reason.
    pub max_sessions: usize,
    /// Time allowed to reach the VNC server.
    pub connect_timeout: Duration,
    /// Time allowed for both RFB handshakes together.
    pub handshake_timeout: Duration,
    /// Interval of WebSocket pings to the browser; a browser silent for three intervals is dropped.
    pub keepalive: Duration,
    /// Ask the VNC server to keep other viewers connected (RFB shared flag).
    pub shared: bool,
}

impl ProxyConfig {
    /// Settings with defaults for everything but the listener, keys and web root.
    pub fn new(listen: SocketAddr, keys: KeySet, web_root: PathBuf) -> Self {
        ProxyConfig {
            listen,
            keys,
            tls: None,
            web_root,
            allowed_origins: Vec::new(),
            max_sessions: 1000,
            connect_timeout: Duration::from_secs(10),
            handshake_timeout: Duration::from_secs(20),
            keepalive: Duration::from_secs(30),
            shared: true,
        }
    }

    /// Checks that the web root holds the console page and noVNC.
    pub fn validate(&self) -> anyhow::Result<()> {
        crate::web::check_root(&self.web_root)?;
        anyhow::ensure!(
            (1..=1_000_000).contains(&self.max_sessions),
            "max sessions must be between 1 and 1000000"
        );
        for origin in &self.allowed_origins {
            anyhow::ensure!(
                origin.starts_with("http://") || origin.starts_with("https://"),
                "allowed origin {origin:?} must look like https://host[:port]"
            );
        }
        Ok(())
    }
}

/// The web root used when none is configured: `share/console-proxy/web` next to an installed binary,
/// else the source tree's `console-proxy/web`.
pub fn default_web_root() -> PathBuf {
    if let Ok(exe) = std::env::current_exe()
        && let Some(prefix) = exe.parent().and_then(Path::parent)
    {
        let installed = prefix.join("share/console-proxy/web");
        if installed.join("console.html").is_file() {
            return installed;
        }
    }
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/web"))
}

/// Loads a key file written by `console-proxy keygen`.
pub fn load_keys(path: &Path) -> anyhow::Result<KeySet> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("failed to read key file {}", path.display()))?;
    KeySet::from_json(&text).with_context(|| format!("failed to load key file {}", path.display()))
}

/// Builds a TLS server configuration from PEM files (certificate chain, private key).
pub fn load_tls(cert: &Path, key: &Path) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};

    let chain = CertificateDer::pem_file_iter(cert)
        .with_context(|| format!("failed to read certificate {}", cert.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("failed to parse certificate {}", cert.display()))?;
    anyhow::ensure!(!chain.is_empty(), "no certificate in {}", cert.display());
    let key = PrivateKeyDer::from_pem_file(key)
        .with_context(|| format!("failed to read private key {}", key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("failed to set TLS versions")?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .context("certificate and key do not match")?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}
