//! Console proxy settings, validated before any port is bound.
//!
//! Two layers: [`dto::ConfigFile`] mirrors the optional TOML file (every field optional and
//! documented); [`ProxyConfig`] is the validated result with defaults filled in. Command-line flags
//! override the file.

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
    /// Longest wait for one write toward the browser: a browser that stops reading (its socket
    /// buffer full) is dropped after it, with a close frame (1001) when one still fits.
    pub write_timeout: Duration,
    /// Ask the VNC server to keep other viewers connected (RFB shared flag).
    pub shared: bool,
    /// A session without keyboard, mouse or clipboard input from the browser for this long is
    /// closed (close code 4008); zero: never. With core, `consoleproxy.session.timeout` replaces it
    /// while core sends that setting.
    pub idle_timeout: Duration,
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
            write_timeout: Duration::from_secs(30),
            shared: true,
            idle_timeout: Duration::ZERO,
        }
    }

    /// Checks that the web root holds the console page and noVNC.
    pub fn validate(&self) -> anyhow::Result<()> {
        crate::web::check_root(&self.web_root)?;
        anyhow::ensure!(
            (1..=1_000_000).contains(&self.max_sessions),
            "max sessions must be between 1 and 1000000"
        );
        anyhow::ensure!(
            !self.write_timeout.is_zero(),
            "the write timeout must not be zero"
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

/// The TOML configuration file, as written by operators.
pub mod dto {
    use std::net::SocketAddr;
    use std::path::PathBuf;

    use serde::Deserialize;

    /// `console-proxy serve --config FILE`. Every field is optional; flags override it.
    ///
    /// ```toml
    /// listen = "0.0.0.0:8443"
    /// keys = "/etc/console-proxy/keys.json"
    /// allowed_origins = ["https://cloud.example.com"]
    /// idle_timeout_secs = 900
    /// write_timeout_secs = 30
    /// [tls]
    /// cert = "/etc/console-proxy/cert.pem"
    /// key = "/etc/console-proxy/key.pem"
    /// ```
    #[derive(Debug, Default, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct ConfigFile {
        /// Address of the public listener (default 127.0.0.1:8080).
        pub listen: Option<SocketAddr>,
        /// Key file written by `console-proxy keygen` (required here or as `--keys`).
        pub keys: Option<PathBuf>,
        /// Web root with `console.html` and `node_modules/@novnc/novnc`.
        pub web: Option<PathBuf>,
        /// Web origins allowed to open consoles besides the proxy's own.
        #[serde(default)]
        pub allowed_origins: Vec<String>,
        /// Most concurrent console sessions (default 1000).
        pub max_sessions: Option<usize>,
        /// Seconds allowed to reach the VNC server (default 10).
        pub connect_timeout_secs: Option<u64>,
        /// Seconds allowed for both RFB handshakes (default 20).
        pub handshake_timeout_secs: Option<u64>,
        /// Seconds between pings to the browser (default 30); silent for three intervals = dropped.
        pub keepalive_secs: Option<u64>,
        /// Seconds one write toward the browser may wait (default 30): a browser that stops
        /// reading is dropped after it.
        pub write_timeout_secs: Option<u64>,
        /// RFB shared flag toward the VNC server: keep other viewers connected (default true).
        pub shared: Option<bool>,
        /// Seconds without keyboard, mouse or clipboard input after which a session is closed
        /// (default 0: never). noVNC's screen update requests do not count as input.
        pub idle_timeout_secs: Option<u64>,
        /// Serve https:// and wss:// with this certificate.
        pub tls: Option<TlsFiles>,
    }

    /// PEM files of the TLS listener.
    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct TlsFiles {
        /// Certificate chain, leaf first.
        pub cert: PathBuf,
        /// Private key of the leaf certificate.
        pub key: PathBuf,
    }

    impl ConfigFile {
        /// Reads and parses a TOML file.
        pub fn load(path: &std::path::Path) -> anyhow::Result<Self> {
            use anyhow::Context as _;
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("failed to read {}", path.display()))?;
            toml::from_str(&text).with_context(|| format!("invalid configuration file {}", path.display()))
        }
    }
}

/// Builds the configuration from the file (if any) and the flags that override it;
/// [`crate::start`] validates it before binding.
pub fn from_file_and_flags(file: dto::ConfigFile, flags: dto::ConfigFile) -> anyhow::Result<ProxyConfig> {
    from_file_and_flags_with(file, flags, true)
}

/// [`from_file_and_flags`], where the key file may be absent when `keys_required` is false (keys
/// then come from core; until they do, every token is refused).
pub fn from_file_and_flags_with(
    file: dto::ConfigFile,
    flags: dto::ConfigFile,
    keys_required: bool,
) -> anyhow::Result<ProxyConfig> {
    let keys = match flags.keys.or(file.keys) {
        Some(path) => load_keys(&path)?,
        None if !keys_required => KeySet::default(),
        None => anyhow::bail!("no key file: pass --keys or set `keys` in the config file"),
    };
    let listen = flags
        .listen
        .or(file.listen)
        .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 8080)));
    let web = flags.web.or(file.web).unwrap_or_else(default_web_root);
    let mut config = ProxyConfig::new(listen, keys, web);
    if let Some(tls) = flags.tls.or(file.tls) {
        config.tls = Some(load_tls(&tls.cert, &tls.key)?);
    }
    config.allowed_origins = if flags.allowed_origins.is_empty() {
        file.allowed_origins
    } else {
        flags.allowed_origins
    };
    let secs = |flag: Option<u64>, file: Option<u64>, default: &Duration| {
        flag.or(file).map_or(*default, |s| Duration::from_secs(s.max(1)))
    };
    config.max_sessions = flags
        .max_sessions
        .or(file.max_sessions)
        .unwrap_or(config.max_sessions);
    config.connect_timeout = secs(
        flags.connect_timeout_secs,
        file.connect_timeout_secs,
        &config.connect_timeout,
    );
    config.handshake_timeout = secs(
        flags.handshake_timeout_secs,
        file.handshake_timeout_secs,
        &config.handshake_timeout,
    );
    config.keepalive = secs(flags.keepalive_secs, file.keepalive_secs, &config.keepalive);
    config.write_timeout = secs(
        flags.write_timeout_secs,
        file.write_timeout_secs,
        &config.write_timeout,
    );
    config.shared = flags.shared.or(file.shared).unwrap_or(config.shared);
    config.idle_timeout = flags
        .idle_timeout_secs
        .or(file.idle_timeout_secs)
        .map_or(config.idle_timeout, Duration::from_secs);
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_parses_and_refuses_unknown_fields() {
        let file: dto::ConfigFile = toml::from_str(
            "listen = \"0.0.0.0:8443\"\nkeys = \"/k.json\"\nmax_sessions = 5\nidle_timeout_secs = 300\nwrite_timeout_secs = 7\n[tls]\ncert = \"c\"\nkey = \"k\"\n",
        )
        .unwrap();
        assert_eq!(file.listen, Some("0.0.0.0:8443".parse().unwrap()));
        assert_eq!(file.max_sessions, Some(5));
        assert_eq!(file.idle_timeout_secs, Some(300));
        assert_eq!(file.write_timeout_secs, Some(7));
        assert!(file.tls.is_some());
        let err = toml::from_str::<dto::ConfigFile>("lisen = \"x\"")
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown field"), "{err}");
    }

    #[test]
    fn flags_override_the_file() {
        let dir = std::env::temp_dir().join(format!("cp-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let keys = dir.join("keys.json");
        std::fs::write(&keys, KeySet::generate().unwrap().to_json().unwrap()).unwrap();
        let file = dto::ConfigFile {
            keys: Some(keys.clone()),
            max_sessions: Some(7),
            keepalive_secs: Some(99),
            idle_timeout_secs: Some(600),
            web: Some(PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/web"))),
            ..Default::default()
        };
        let flags = dto::ConfigFile {
            keepalive_secs: Some(5),
            write_timeout_secs: Some(12),
            ..Default::default()
        };
        let config = from_file_and_flags(file, flags).unwrap();
        assert_eq!(config.max_sessions, 7);
        assert_eq!(config.keepalive, Duration::from_secs(5));
        assert_eq!(config.write_timeout, Duration::from_secs(12));
        assert_eq!(config.listen, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(config.idle_timeout, Duration::from_secs(600));
        let off = dto::ConfigFile {
            idle_timeout_secs: Some(0),
            ..Default::default()
        };
        let file = dto::ConfigFile {
            keys: Some(keys.clone()),
            idle_timeout_secs: Some(600),
            web: Some(PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/web"))),
            ..Default::default()
        };
        assert_eq!(
            from_file_and_flags(file, off).unwrap().idle_timeout,
            Duration::ZERO
        );
        let none = from_file_and_flags(dto::ConfigFile::default(), dto::ConfigFile::default());
        assert!(none.unwrap_err().to_string().contains("no key file"));
    }
}
