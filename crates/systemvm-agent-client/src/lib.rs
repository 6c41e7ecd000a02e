//! The agent side of the agent channel: a task that dials systemvm-core (`wss://CORE:8250/agent`),
//! says `Hello`, sends heartbeats with the caller's load and hands received console-token keys to
//! the caller. Protocol: `docs/agent-protocol.md`; messages: `systemvm_proto::agent`.
//!
//! Architecture invariant: this crate never depends on systemvm-core (checked by
//! `tests/e2e/layout.rs`); it talks to core only through the wire types.
//!
//! Invariants:
//! * core's certificate is verified against the `--ca` file only: no system roots, no way to turn
//!   verification off;
//! * the task never gives up: after any failure (connect, TLS, refusal, lost connection) it tries
//!   the next core URL at once ([`NEXT_URL_DELAY`]), and after a round over all of them waits 1 s
//!   doubling to 30 s, with ±20 % jitter; a `Welcome` resets the delay; only
//!   [`AgentClient::shutdown`] stops it;
//! * a core that stops answering (pings go with every heartbeat) for [`SILENT_CORE_INTERVALS`]
//!   intervals plus [`HANDSHAKE_TIMEOUT`] is treated as gone: the agent reconnects, trying the next URL;
//! * the secret never reaches a log.
//!
//! [`parent`]: agents started by core's process driver exit when that core dies.
#![forbid(unsafe_code)]

pub mod parent;
pub mod tls;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt as _, StreamExt as _};
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use systemvm_proto::Secret;

use systemvm_proto::agent::{
    AgentMessage, AgentRole, Answer, CLAIM_PROTOCOL_VERSION, CURRENT_PROTOCOL_VERSION, ClaimAnswer,
    ClaimSession, Command, ConsoleKeys, CoreMessage, Heartbeat, Hello, Load, MAX_MESSAGE_SIZE,
    validate_protocol_version,
};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

/// First reconnect delay.
pub const BACKOFF_MIN: Duration = Duration::from_secs(1);
/// Longest reconnect delay.
pub const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Heartbeat intervals without any frame from core (besides [`HANDSHAKE_TIMEOUT`]) after which the
/// agent drops the connection and reconnects.
pub const SILENT_CORE_INTERVALS: u32 = 3;
/// Time allowed to connect, complete TLS and the WebSocket upgrade, and get an answer to `Hello`.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause before trying the next core URL of a round.
pub const NEXT_URL_DELAY: Duration = Duration::from_millis(100);
/// Time core has to answer a [`ClaimSession`].
pub const CLAIM_TIMEOUT: Duration = Duration::from_secs(5);
/// Messages queued for core while the channel is down or busy; more are dropped (progress is
/// sent again, and core re-sends unfinished commands when an agent reconnects).
pub const OUTBOX_CAPACITY: usize = 256;

/// Building the client's configuration failed.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The CA file could not be read or holds no usable certificate.
    #[error("failed to load CA {path}: {reason}")]
    Ca {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// A core URL is not `wss://HOST:PORT/PATH`.
    #[error("invalid core URL {0:?}: expected wss://HOST:PORT/agent")]
    Url(String),
    /// No core URL was given.
    #[error("no core URL given")]
    NoUrl,
    /// rustls refused the configuration.
    #[error("TLS configuration failed")]
    Tls(#[from] rustls::Error),
}

/// One connection attempt failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// TCP connect failed.
    #[error("failed to connect to {url}")]
    Connect {
        /// The core URL.
        url: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The TLS handshake failed (e.g. core's certificate is not from the configured CA).
    #[error("TLS handshake with {url} failed")]
    Tls {
        /// The core URL.
        url: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The WebSocket upgrade or a later read/write failed.
    #[error("WebSocket error with {url}")]
    Ws {
        /// The core URL.
        url: String,
        /// Cause.
        #[source]
        source: Box<tokio_tungstenite::tungstenite::Error>,
    },
    /// Core refused the agent.
    #[error("core {url} refused this agent: {reason}")]
    Refused {
        /// The core URL.
        url: String,
        /// Core's reason.
        reason: String,
    },
    /// Core answered something else than `Welcome`/`Refused`, or an unsupported version.
    #[error("core {url} broke the protocol: {reason}")]
    Protocol {
        /// The core URL.
        url: String,
        /// What was wrong.
        reason: String,
    },
    /// The handshake took too long.
    #[error("handshake with {url} timed out")]
    Timeout {
        /// The core URL.
        url: String,
    },
}

/// Where the client stands, for callers and tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Status {
    /// Not connected yet, or reconnecting.
    Connecting,
    /// Welcomed by core at this URL.
    Up(String),
    /// The last attempt failed; the text is the error chain.
    Failed(String),
}

/// A core URL, parsed.
#[derive(Debug, Clone)]
struct CoreUrl {
    url: String,
    host: String,
    port: u16,
}

fn parse_url(url: &str) -> Result<CoreUrl, ConfigError> {
    let bad = || ConfigError::Url(url.to_owned());
    let uri: http::Uri = url.parse().map_err(|_| bad())?;
    if uri.scheme_str() != Some("wss") {
        return Err(bad());
    }
    let host = uri.host().ok_or_else(bad)?;
    let host = host.trim_start_matches('[').trim_end_matches(']').to_owned();
    Ok(CoreUrl {
        url: url.to_owned(),
        host,
        port: uri.port_u16().unwrap_or(8250),
    })
}

/// Everything the client needs.
#[derive(Clone)]
pub struct ClientConfig {
    urls: Vec<CoreUrl>,
    tls: Arc<rustls::ClientConfig>,
    /// What the agent is.
    pub role: AgentRole,
    /// Its id (`--vm-id`).
    pub vm_id: String,
    /// Its secret (`--secret`).
    pub secret: Secret,
    /// Optional features it supports.
    pub capabilities: Vec<String>,
    /// Its software version.
    pub software_version: String,
    /// Console proxies: the base URL browsers reach it at.
    pub endpoint: Option<String>,
}

impl std::fmt::Debug for ClientConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientConfig")
            .field("urls", &self.urls)
            .field("role", &self.role)
            .field("vm_id", &self.vm_id)
            .finish_non_exhaustive()
    }
}

impl ClientConfig {
    /// `urls`: `wss://HOST:PORT/agent`, comma-separated or as several entries; `ca`: a PEM file
    /// with the CA that issued core's certificate (the only trusted root).
    pub fn new(
        urls: &[String],
        ca: &Path,
        role: AgentRole,
        vm_id: impl Into<String>,
        secret: Secret,
    ) -> Result<Self, ConfigError> {
        let urls = urls
            .iter()
            .flat_map(|u| u.split(','))
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .map(parse_url)
            .collect::<Result<Vec<_>, _>>()?;
        if urls.is_empty() {
            return Err(ConfigError::NoUrl);
        }
        Ok(Self {
            urls,
            tls: tls_config(ca)?,
            role,
            vm_id: vm_id.into(),
            secret,
            capabilities: Vec::new(),
            software_version: String::new(),
            endpoint: None,
        })
    }
}

fn tls_config(ca: &Path) -> Result<Arc<rustls::ClientConfig>, ConfigError> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject as _;
    let err = |reason: String| ConfigError::Ca {
        path: ca.to_owned(),
        reason,
    };
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).map_err(|e| err(e.to_string()))? {
        let cert = cert.map_err(|e| err(e.to_string()))?;
        roots.add(cert).map_err(|e| err(e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(err("no certificate in the file".into()));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(Arc::new(
        rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth(),
    ))
}

/// A boxed answer future.
pub type AnswerFuture = Pin<Box<dyn Future<Output = Answer> + Send>>;

/// What the agent reports and receives.
#[derive(Clone)]
pub struct Hooks {
    /// Called before every heartbeat: the agent's current load.
    pub load: Arc<dyn Fn() -> Load + Send + Sync>,
    /// Called with the console-token keys from `Welcome` and `KeysUpdate`.
    pub keys: Arc<dyn Fn(ConsoleKeys) + Send + Sync>,
    /// Called with the transfer keys (storage VMs) from `Welcome` and `TransferKeysUpdate`.
    pub transfer_keys: Arc<dyn Fn(ConsoleKeys) + Send + Sync>,
    /// Called with the operator's certificate from `Welcome` and `CertificateUpdate`.
    pub certificate: Arc<dyn Fn(systemvm_proto::agent::ServerCertificate) + Send + Sync>,
    /// Called with the storage VM's peer certificate from `Welcome` (storage VMs).
    pub peer_identity: Arc<dyn Fn(systemvm_proto::agent::PeerIdentity) + Send + Sync>,
    /// Called with the agent's settings from `Welcome` and `ConfigUpdate` (core's setting names,
    /// `systemvm_proto::agent::config_keys`).
    pub config: Arc<dyn Fn(std::collections::BTreeMap<String, String>) + Send + Sync>,
    /// Runs a command from core; its answer is sent back on the channel. Commands run
    /// concurrently, each in its own task.
    pub command: Arc<dyn Fn(Command) -> AnswerFuture + Send + Sync>,
}

/// The answer to a command this agent does not support.
pub fn unsupported(command: &Command) -> Answer {
    Answer {
        id: command.id.clone(),
        ok: false,
        body: serde_json::Value::Null,
        error: Some("command not supported by this agent".into()),
    }
}

/// Sends messages to core on whatever connection is current (see [`OUTBOX_CAPACITY`]).
#[derive(Clone, Debug)]
pub struct Outbox(mpsc::Sender<AgentMessage>);

impl Outbox {
    /// Queues a message; `false` when the queue is full (the message is dropped).
    pub fn send(&self, message: AgentMessage) -> bool {
        self.0.try_send(message).is_ok()
    }
}

/// A session claim could not be decided by core.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClaimError {
    /// The channel to core is down.
    #[error("core is not reachable")]
    NotConnected,
    /// Core runs a protocol version without claims.
    #[error("core (protocol version {0}) does not check session claims")]
    Unsupported(u32),
    /// Core did not answer in time.
    #[error("core did not answer the session claim within {}s", CLAIM_TIMEOUT.as_secs())]
    Timeout,
}

/// Claims console session ids from core (see [`AgentClient::claimer`]).
#[derive(Clone, Debug)]
pub struct Claimer {
    outbox: Outbox,
    shared: Arc<Shared>,
}

impl Claimer {
    /// Core's protocol version on the current connection, `None` while the channel is down.
    pub fn core_version(&self) -> Option<u32> {
        match self.shared.core_version.load(Ordering::Relaxed) {
            0 => None,
            v => Some(v),
        }
    }

    /// Asks core to claim a console session id across the fleet: `Ok(answer)` is core's decision.
    pub async fn claim_session(
        &self,
        session_id: &str,
        vm_id: &str,
        expires: u64,
    ) -> Result<ClaimAnswer, ClaimError> {
        let version = self.core_version().ok_or(ClaimError::NotConnected)?;
        if version < CLAIM_PROTOCOL_VERSION {
            return Err(ClaimError::Unsupported(version));
        }
        let id = format!("claim-{}", self.shared.next_claim.fetch_add(1, Ordering::Relaxed));
        let (tx, rx) = oneshot::channel();
        self.shared
            .claims
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(id.clone(), tx);
        let sent = self.outbox.send(AgentMessage::ClaimSession(ClaimSession {
            id: id.clone(),
            session_id: session_id.to_owned(),
            vm_id: vm_id.to_owned(),
            expires,
        }));
        let r = if sent {
            match tokio::time::timeout(CLAIM_TIMEOUT, rx).await {
                Ok(Ok(answer)) => Ok(answer),
                Ok(Err(_)) => Err(ClaimError::NotConnected),
                Err(_) => Err(ClaimError::Timeout),
            }
        } else {
            Err(ClaimError::NotConnected)
        };
        self.shared
            .claims
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&id);
        r
    }
}

/// State shared by the client handle and its task.
#[derive(Debug, Default)]
struct Shared {
    /// Core's protocol version on the current connection (0 while down).
    core_version: AtomicU32,
    next_claim: AtomicU64,
    claims: Mutex<HashMap<String, oneshot::Sender<ClaimAnswer>>>,
}

impl std::fmt::Debug for Hooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Hooks")
    }
}

impl Default for Hooks {
    fn default() -> Self {
        Self {
            load: Arc::new(Load::default),
            keys: Arc::new(|_| {}),
            transfer_keys: Arc::new(|_| {}),
            certificate: Arc::new(|_| {}),
            peer_identity: Arc::new(|_| {}),
            config: Arc::new(|_| {}),
            command: Arc::new(|c| {
                let answer = unsupported(&c);
                Box::pin(async move { answer })
            }),
        }
    }
}

/// Starts the client task (see [`AgentClient::prepare`]).
pub type StartClient = Box<dyn FnOnce(ClientConfig, Hooks) -> AgentClient + Send>;

/// The running client task.
#[derive(Debug)]
pub struct AgentClient {
    status: watch::Receiver<Status>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
    outbox: Outbox,
    shared: Arc<Shared>,
}

impl AgentClient {
    /// Starts dialling core in the background.
    pub fn spawn(config: ClientConfig, hooks: Hooks) -> Self {
        let (_, start) = Self::prepare();
        start(config, hooks)
    }

    /// Two-step start for agents whose hooks need the [`Outbox`] (or the client) first: returns
    /// the outbox and a function that starts the task.
    pub fn prepare() -> (Outbox, StartClient) {
        let (tx, rx) = mpsc::channel(OUTBOX_CAPACITY);
        let outbox = Outbox(tx);
        let for_client = outbox.clone();
        let start = move |config: ClientConfig, hooks: Hooks| {
            let (status_tx, status) = watch::channel(Status::Connecting);
            let (stop, stop_rx) = watch::channel(false);
            let shared = Arc::new(Shared::default());
            let task = tokio::spawn(run(config, hooks, status_tx, stop_rx, rx, shared.clone()));
            Self {
                status,
                stop,
                task,
                outbox: for_client,
                shared,
            }
        };
        (outbox, Box::new(start))
    }

    /// The current status; `changed()` on it waits for the next.
    pub fn status(&self) -> watch::Receiver<Status> {
        self.status.clone()
    }

    /// Sends messages to core.
    pub fn outbox(&self) -> Outbox {
        self.outbox.clone()
    }

    /// Core's protocol version on the current connection, `None` while the channel is down.
    pub fn core_version(&self) -> Option<u32> {
        self.claimer().core_version()
    }

    /// A handle that claims console session ids through this client (cheap to clone).
    pub fn claimer(&self) -> Claimer {
        Claimer {
            outbox: self.outbox.clone(),
            shared: self.shared.clone(),
        }
    }

    /// Closes the connection and stops reconnecting.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

/// A number in `[0, 1)` that differs between calls and agents (jitter; not for secrets).
fn jitter_fraction() -> f64 {
    use std::hash::{BuildHasher as _, Hasher as _};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    (h.finish() % 10_000) as f64 / 10_000.0
}

/// The delay after `failures` failures in a row: 1 s doubling to 30 s, ±20 %.
pub fn backoff(failures: u32) -> Duration {
    let base = BACKOFF_MIN
        .saturating_mul(1u32 << failures.saturating_sub(1).min(5))
        .min(BACKOFF_MAX);
    base.mul_f64(0.8 + 0.4 * jitter_fraction())
}

async fn run(
    config: ClientConfig,
    hooks: Hooks,
    status: watch::Sender<Status>,
    mut stop: watch::Receiver<bool>,
    mut outbox: mpsc::Receiver<AgentMessage>,
    shared: Arc<Shared>,
) {
    let mut failures: u32 = 0;
    let mut next_url = 0usize;
    loop {
        let url = &config.urls[next_url % config.urls.len()];
        next_url = next_url.wrapping_add(1);
        let _ = status.send(Status::Connecting);
        let r = tokio::select! {
            r = session(&config, url, &hooks, &status, &mut failures, &mut outbox, &shared) => r,
            _ = stop.changed() => return,
        };
        shared.core_version.store(0, Ordering::Relaxed);
        // Claims waiting on the lost connection fail now rather than at their timeout.
        shared
            .claims
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clear();
        let error = match r {
            Ok(()) => "connection closed by core".to_owned(),
            Err(e) => error_chain(&e),
        };
        // The next core URL is tried at once; the backoff applies after a round over all of them.
        let delay = if next_url.is_multiple_of(config.urls.len()) {
            failures = failures.saturating_add(1);
            backoff(failures)
        } else {
            NEXT_URL_DELAY
        };
        tracing::warn!(url = %url.url, %error, retry_in_ms = delay.as_millis(), "Agent channel down");
        let _ = status.send(Status::Failed(error));
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = stop.changed() => return,
        }
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

type Ws = tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<TcpStream>>;

async fn handshake(
    config: &ClientConfig,
    url: &CoreUrl,
) -> Result<(Ws, systemvm_proto::agent::Welcome), ConnectError> {
    let u = || url.url.clone();
    let tcp = TcpStream::connect((url.host.as_str(), url.port))
        .await
        .map_err(|source| ConnectError::Connect { url: u(), source })?;
    let name =
        rustls::pki_types::ServerName::try_from(url.host.clone()).map_err(|e| ConnectError::Protocol {
            url: u(),
            reason: e.to_string(),
        })?;
    let tls = tokio_rustls::TlsConnector::from(config.tls.clone())
        .connect(name, tcp)
        .await
        .map_err(|source| ConnectError::Tls { url: u(), source })?;
    let ws_config = WebSocketConfig::default()
        .max_message_size(Some(MAX_MESSAGE_SIZE))
        .max_frame_size(Some(MAX_MESSAGE_SIZE));
    let ws_err = |e| ConnectError::Ws {
        url: u(),
        source: Box::new(e),
    };
    let (mut ws, _) = tokio_tungstenite::client_async_with_config(url.url.as_str(), tls, Some(ws_config))
        .await
        .map_err(ws_err)?;
    let hello = AgentMessage::Hello(Hello {
        version: CURRENT_PROTOCOL_VERSION,
        role: config.role,
        vm_id: config.vm_id.clone(),
        secret: config.secret.clone(),
        capabilities: config.capabilities.clone(),
        software_version: config.software_version.clone(),
        endpoint: config.endpoint.clone(),
    });
    ws.send(Message::text(serde_json::to_string(&hello).unwrap_or_default()))
        .await
        .map_err(ws_err)?;
    loop {
        let m = ws.next().await;
        let text = match m {
            Some(Ok(Message::Text(t))) => t,
            Some(Ok(Message::Close(_))) | None => {
                return Err(ConnectError::Protocol {
                    url: u(),
                    reason: "connection closed before Welcome".into(),
                });
            }
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Err(ws_err(e)),
        };
        match serde_json::from_str::<CoreMessage>(text.as_str()) {
            Ok(CoreMessage::Welcome(w)) => {
                validate_protocol_version(w.version).map_err(|e| ConnectError::Protocol {
                    url: u(),
                    reason: e.to_string(),
                })?;
                return Ok((ws, w));
            }
            Ok(CoreMessage::Refused(r)) => {
                return Err(ConnectError::Refused {
                    url: u(),
                    reason: r.reason,
                });
            }
            Ok(CoreMessage::Unknown) => continue,
            Ok(other) => {
                return Err(ConnectError::Protocol {
                    url: u(),
                    reason: format!("expected Welcome, got {other:?}"),
                });
            }
            Err(e) => {
                return Err(ConnectError::Protocol {
                    url: u(),
                    reason: e.to_string(),
                });
            }
        }
    }
}

/// One connection: handshake, then heartbeats until it breaks.
async fn session(
    config: &ClientConfig,
    url: &CoreUrl,
    hooks: &Hooks,
    status: &watch::Sender<Status>,
    failures: &mut u32,
    outbox: &mut mpsc::Receiver<AgentMessage>,
    shared: &Shared,
) -> Result<(), ConnectError> {
    let (mut ws, welcome) = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake(config, url))
        .await
        .map_err(|_| ConnectError::Timeout { url: url.url.clone() })??;
    *failures = 0;
    tracing::info!(
        url = %url.url,
        heartbeat_secs = welcome.heartbeat_interval_secs,
        core_version = welcome.version,
        "Agent channel up"
    );
    shared
        .core_version
        .store(welcome.version.max(1), Ordering::Relaxed);
    // Answers of commands run on this connection come back here.
    let (answers_tx, mut answers) = mpsc::channel::<Answer>(64);
    if let Some(keys) = welcome.console_keys {
        (hooks.keys)(keys);
    }
    if let Some(keys) = welcome.transfer_keys {
        (hooks.transfer_keys)(keys);
    }
    if let Some(cert) = welcome.certificate {
        (hooks.certificate)(cert);
    }
    if let Some(identity) = welcome.peer_identity {
        (hooks.peer_identity)(identity);
    }
    (hooks.config)(welcome.config);
    let _ = status.send(Status::Up(url.url.clone()));
    let ws_err = |e| ConnectError::Ws {
        url: url.url.clone(),
        source: Box::new(e),
    };
    let interval = Duration::from_secs(welcome.heartbeat_interval_secs.max(1));
    // Core answers the ping sent with every heartbeat; a core silent for this long is gone (a
    // dead host sends no FIN, and writes would only fill the socket buffer).
    let silence_limit = interval * SILENT_CORE_INTERVALS + HANDSHAKE_TIMEOUT;
    let mut last_heard = tokio::time::Instant::now();
    let mut tick = tokio::time::interval(interval);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                if last_heard.elapsed() > silence_limit {
                    return Err(ConnectError::Protocol {
                        url: url.url.clone(),
                        reason: format!("core silent for {}s", last_heard.elapsed().as_secs()),
                    });
                }
                let hb = AgentMessage::Heartbeat(Heartbeat { load: (hooks.load)() });
                ws.send(Message::text(serde_json::to_string(&hb).unwrap_or_default()))
                    .await
                    .map_err(ws_err)?;
                ws.send(Message::Ping(Default::default())).await.map_err(ws_err)?;
            }
            m = ws.next() => {
                last_heard = tokio::time::Instant::now();
                match m {
                None | Some(Ok(Message::Close(_))) => return Ok(()),
                Some(Err(e)) => return Err(ws_err(e)),
                Some(Ok(Message::Text(t))) => match serde_json::from_str::<CoreMessage>(t.as_str()) {
                    Ok(CoreMessage::KeysUpdate(k)) => (hooks.keys)(k.console_keys),
                    Ok(CoreMessage::TransferKeysUpdate(k)) => (hooks.transfer_keys)(k.transfer_keys),
                    Ok(CoreMessage::CertificateUpdate(c)) => (hooks.certificate)(c.certificate),
                    Ok(CoreMessage::ConfigUpdate(c)) => (hooks.config)(c.config),
                    Ok(CoreMessage::Command(c)) => {
                        let run = (hooks.command)(c);
                        let tx = answers_tx.clone();
                        tokio::spawn(async move {
                            let _ = tx.send(run.await).await;
                        });
                    }
                    Ok(CoreMessage::ClaimAnswer(a)) => {
                        let waiter = shared
                            .claims
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner)
                            .remove(&a.id);
                        if let Some(w) = waiter {
                            let _ = w.send(a);
                        }
                    }
                    Ok(CoreMessage::Unknown) => tracing::debug!("Skipped a core message of an unknown type"),
                    Ok(other) => tracing::debug!(message = ?other, "Unexpected core message skipped"),
                    Err(error) => tracing::warn!(%error, "Unreadable core message skipped"),
                },
                Some(Ok(_)) => {}
                }
            }
            Some(answer) = answers.recv() => {
                let m = AgentMessage::Answer(answer);
                ws.send(Message::text(serde_json::to_string(&m).unwrap_or_default()))
                    .await
                    .map_err(ws_err)?;
            }
            Some(m) = outbox.recv() => {
                ws.send(Message::text(serde_json::to_string(&m).unwrap_or_default()))
                    .await
                    .map_err(ws_err)?;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_thirty_seconds_with_jitter() {
        for (n, base) in [
            (1u32, 1.0f64),
            (2, 2.0),
            (3, 4.0),
            (5, 16.0),
            (6, 30.0),
            (60, 30.0),
        ] {
            let d = backoff(n).as_secs_f64();
            assert!(d >= base * 0.8 - 1e-9 && d <= base * 1.2 + 1e-9, "{n}: {d}");
        }
    }

    #[test]
    fn urls() {
        let u = parse_url("wss://[::1]:9000/agent").unwrap();
        assert_eq!((u.host.as_str(), u.port), ("::1", 9000));
        assert_eq!(parse_url("wss://core/agent").unwrap().port, 8250);
        assert!(parse_url("ws://core:1/agent").is_err());
        assert!(parse_url("nonsense").is_err());
    }
}

/// Where core is and who this system VM is (`--core URL[,URL…] --vm-id ID --secret S --ca PEM`).
#[derive(Clone, Debug)]
pub struct CoreLink {
    /// Core agent endpoint URLs, tried in turn.
    pub urls: Vec<String>,
    /// The id core issued.
    pub vm_id: String,
    /// The secret core issued.
    pub secret: systemvm_proto::Secret,
    /// PEM of core's CA.
    pub ca: std::path::PathBuf,
}

/// The agents' command-line flags for the link to core: all four together, or none (standalone).
#[derive(clap::Args, Debug, Default)]
pub struct CoreArgs {
    /// Core agent endpoint(s), wss://HOST:8250/agent, comma-separated.
    #[arg(long, value_delimiter = ',')]
    pub core: Vec<String>,
    /// System VM id issued by core.
    #[arg(long)]
    pub vm_id: Option<String>,
    /// System VM secret issued by core (or SYSTEMVM_AGENT_SECRET, to keep it out of `ps`).
    #[arg(
        long,
        env = "SYSTEMVM_AGENT_SECRET",
        hide_env_values = true,
        allow_hyphen_values = true
    )]
    pub secret: Option<String>,
    /// PEM of core's CA (core's DATA_DIR/ca.pem): the only CA trusted for core.
    #[arg(long)]
    pub ca: Option<std::path::PathBuf>,
}

/// The link flags were given partly.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("--core, --vm-id, --secret and --ca go together: give all four or none")]
pub struct IncompleteCoreArgs;

impl CoreArgs {
    /// The link, or `None` in standalone mode.
    pub fn link(self) -> Result<Option<CoreLink>, IncompleteCoreArgs> {
        match (self.core.is_empty(), self.vm_id, self.secret, self.ca) {
            (true, None, None, None) => Ok(None),
            (false, Some(vm_id), Some(secret), Some(ca)) => Ok(Some(CoreLink {
                urls: self.core,
                vm_id,
                secret: systemvm_proto::Secret(secret),
                ca,
            })),
            _ => Err(IncompleteCoreArgs),
        }
    }
}
