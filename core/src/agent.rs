//! The agent endpoint: system VMs dial in (`wss://CORE:8250/agent`), prove who they are, receive
//! the console-token keys and send heartbeats. Messages: `systemvm_proto::agent`; protocol:
//! `docs/agent-protocol.md`.
//!
//! Invariants:
//! * nothing but `Refused` is sent before a `Hello` with a registered id, the matching secret
//!   (compared as SHA-256 digests in constant time), the registered role and a supported protocol
//!   version; a refusal never says whether the id or the secret was wrong;
//! * one connection per system VM: a newer `Hello` for the same id replaces (closes) the older
//!   connection, and only the current connection may mark the VM `Disconnected`;
//! * `agent_state` is `Up` only while a connection is current and heard from within
//!   `agent.heartbeat.timeout`; the monitor task and each connection's read deadline both enforce
//!   it, so it also holds for rows left `Up` by a core that died;
//! * TLS handshake, WebSocket upgrade and `Hello` all complete within [`HANDSHAKE_TIMEOUT`];
//!   messages are limited to `MAX_MESSAGE_SIZE`; the secret never reaches a log.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures_util::{SinkExt as _, StreamExt as _};
use sha2::Digest as _;
use sqlx::Row as _;
use subtle::ConstantTimeEq as _;
use systemvm_proto::agent::{
    AgentCommand, AgentMessage, AgentRole, Answer, ClaimAnswer, ClaimSession, Command, ConsoleKeys,
    CoreMessage, Hello, MAX_MESSAGE_SIZE, Refused, Welcome, validate_protocol_version,
};
use systemvm_proto::console::KeySet;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use crate::state::State;
use crate::util::now_cs;

/// Time allowed for the TLS handshake, the WebSocket upgrade and the `Hello`.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// The WebSocket path of the endpoint.
pub const PATH: &str = "/agent";
/// `agent_state` of a connected, heartbeating agent.
pub const UP: &str = "Up";
/// `agent_state` otherwise.
pub const DISCONNECTED: &str = "Disconnected";

/// A current agent connection.
#[derive(Debug)]
struct Conn {
    id: u64,
    close: oneshot::Sender<()>,
    tx: mpsc::Sender<CoreMessage>,
    role: AgentRole,
    version: u32,
}

/// A command could not be answered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    /// The system VM has no current connection.
    #[error("system VM {0} is not connected")]
    NotConnected(String),
    /// The connection ended before the answer came.
    #[error("system VM {0} disconnected before answering")]
    Lost(String),
    /// No answer in time.
    #[error("system VM {vm_id} did not answer within {secs}s")]
    Timeout {
        /// The VM.
        vm_id: String,
        /// The time allowed.
        secs: u64,
    },
}

/// The current connection of each system VM, and the commands waiting for answers.
#[derive(Debug, Default)]
pub struct Hub {
    conns: std::sync::Mutex<HashMap<String, Conn>>,
    pending: std::sync::Mutex<HashMap<String, oneshot::Sender<Answer>>>,
    next: AtomicU64,
}

impl Hub {
    fn conns(&self) -> std::sync::MutexGuard<'_, HashMap<String, Conn>> {
        self.conns.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, HashMap<String, oneshot::Sender<Answer>>> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes a new connection current for `vm_id`, closing the previous one.
    fn register(
        &self,
        vm_id: &str,
        role: AgentRole,
        version: u32,
    ) -> (u64, oneshot::Receiver<()>, mpsc::Receiver<CoreMessage>) {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (close, closed) = oneshot::channel();
        let (tx, rx) = mpsc::channel(64);
        let conn = Conn {
            id,
            close,
            tx,
            role,
            version,
        };
        if let Some(old) = self.conns().insert(vm_id.to_owned(), conn) {
            let _ = old.close.send(());
        }
        (id, closed, rx)
    }

    /// Forgets connection `id` of `vm_id`; false when a newer connection replaced it.
    fn unregister(&self, vm_id: &str, id: u64) -> bool {
        let mut conns = self.conns();
        if conns.get(vm_id).is_some_and(|c| c.id == id) {
            conns.remove(vm_id);
            true
        } else {
            false
        }
    }

    /// The id of `vm_id`'s current connection.
    pub fn connection(&self, vm_id: &str) -> Option<u64> {
        self.conns().get(vm_id).map(|c| c.id)
    }

    /// The protocol version `vm_id`'s current connection speaks.
    pub fn version(&self, vm_id: &str) -> Option<u32> {
        self.conns().get(vm_id).map(|c| c.version)
    }

    /// Queues a message for `vm_id`; false when it is not connected or its queue is full.
    pub fn push(&self, vm_id: &str, message: CoreMessage) -> bool {
        self.conns()
            .get(vm_id)
            .is_some_and(|c| c.tx.try_send(message).is_ok())
    }

    /// Queues a message for every connected agent of `role`; returns how many got it.
    pub fn broadcast(&self, role: AgentRole, message: &CoreMessage) -> usize {
        self.conns()
            .values()
            .filter(|c| c.role == role)
            .filter(|c| c.tx.try_send(message.clone()).is_ok())
            .count()
    }

    /// Sends a command to `vm_id` and waits up to `timeout` for its answer.
    pub async fn call(
        &self,
        vm_id: &str,
        body: &AgentCommand,
        timeout: Duration,
    ) -> Result<Answer, CallError> {
        let id = format!("cmd-{}", self.next.fetch_add(1, Ordering::Relaxed));
        let (tx, rx) = oneshot::channel();
        self.pending().insert(id.clone(), tx);
        let sent = self.push(vm_id, CoreMessage::Command(Command::new(id.clone(), body)));
        let r = if !sent {
            Err(CallError::NotConnected(vm_id.to_owned()))
        } else {
            match tokio::time::timeout(timeout, rx).await {
                Ok(Ok(a)) => Ok(a),
                Ok(Err(_)) => Err(CallError::Lost(vm_id.to_owned())),
                Err(_) => Err(CallError::Timeout {
                    vm_id: vm_id.to_owned(),
                    secs: timeout.as_secs(),
                }),
            }
        };
        self.pending().remove(&id);
        r
    }

    /// Closes every connection (this core lost the leader lease).
    pub fn close_all(&self) {
        for (_, c) in self.conns().drain() {
            let _ = c.close.send(());
        }
    }

    fn answered(&self, answer: Answer) {
        match self.pending().remove(&answer.id) {
            Some(w) => {
                let _ = w.send(answer);
            }
            None => tracing::debug!(id = %answer.id, "Answer to no waiting command (late) skipped"),
        }
    }
}

/// SHA-256 of a secret, lowercase hex: what `system_vms.secret_hash` holds. Secrets are 32 random
/// bytes, so a fast hash is enough (no dictionary to guess from).
pub fn hash_secret(secret: &str) -> String {
    sha2::Sha256::digest(secret.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Unix milliseconds now.
pub fn now_ms() -> i64 {
    let t = time::OffsetDateTime::now_utc();
    i64::try_from(t.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX)
}

/// Loading or creating the console-token keys failed.
#[derive(Debug, thiserror::Error)]
pub enum ConsoleKeysError {
    /// The database failed.
    #[error("database error")]
    Db(#[from] sqlx::Error),
    /// The stored key set does not parse, or a key could not be generated.
    #[error("invalid console keys: {0}")]
    Keys(String),
}

/// Core's console-token keys, kept in `core_keys` (row `console`); created on first start.
pub async fn load_console_keys(pool: &sqlx::AnyPool) -> Result<KeySet, ConsoleKeysError> {
    let stored: Option<String> = sqlx::query_scalar("SELECT value FROM core_keys WHERE name = 'console'")
        .fetch_optional(pool)
        .await?;
    if let Some(text) = stored {
        return KeySet::from_json(&text).map_err(|e| ConsoleKeysError::Keys(e.to_string()));
    }
    let set = KeySet::generate().map_err(|e| ConsoleKeysError::Keys(e.to_string()))?;
    let json = set.to_json().map_err(|e| ConsoleKeysError::Keys(e.to_string()))?;
    // Two cores starting at once: the first insert wins and both use the stored set.
    sqlx::query(
        "INSERT INTO core_keys (name, value, created) VALUES ('console', $1, $2) ON CONFLICT (name) DO NOTHING",
    )
    .bind(json)
    .bind(now_cs())
    .execute(pool)
    .await?;
    let text: String = sqlx::query_scalar("SELECT value FROM core_keys WHERE name = 'console'")
        .fetch_one(pool)
        .await?;
    KeySet::from_json(&text).map_err(|e| ConsoleKeysError::Keys(e.to_string()))
}

async fn setting_secs(state: &State, name: &str, default: u64) -> u64 {
    state.setting(name).await.parse().unwrap_or(default)
}

/// Accepts agent connections until `stop`.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    state: State,
    mut stop: watch::Receiver<bool>,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let mut conns = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            r = listener.accept() => match r {
                Ok((tcp, peer)) => {
                    conns.spawn(connection(tcp, peer, acceptor.clone(), state.clone(), stop.clone()));
                }
                Err(error) => {
                    tracing::warn!(%error, "Agent endpoint accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            _ = stop.changed() => break,
        }
    }
    conns.shutdown().await;
}

/// Marks agents that stayed silent past `agent.heartbeat.timeout` as `Disconnected`, every second.
pub async fn monitor(state: State, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut ticks: u64 = 0;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        ticks = ticks.wrapping_add(1);
        if !state.leader.load(Ordering::SeqCst) {
            continue;
        }
        if ticks.is_multiple_of(60) {
            match prune_claims(&state.db.pool).await {
                Ok(0) => {}
                Ok(n) => tracing::debug!(count = n, "Forgot expired console session claims"),
                Err(error) => tracing::warn!(%error, "Failed to prune console session claims"),
            }
        }
        let timeout = setting_secs(&state, "agent.heartbeat.timeout", 9).await;
        let cutoff = now_ms().saturating_sub(i64::try_from(timeout.saturating_mul(1000)).unwrap_or(i64::MAX));
        let r = sqlx::query(
            "UPDATE system_vms SET agent_state = $1, disconnected = $2 WHERE agent_state = $3 AND (last_heartbeat_ms IS NULL OR last_heartbeat_ms < $4)",
        )
        .bind(DISCONNECTED)
        .bind(now_cs())
        .bind(UP)
        .bind(cutoff)
        .execute(&state.db.pool)
        .await;
        match r {
            Ok(done) if done.rows_affected() > 0 => {
                tracing::warn!(
                    count = done.rows_affected(),
                    timeout_secs = timeout,
                    "Agents silent past the heartbeat timeout marked Disconnected"
                );
            }
            Ok(_) => {}
            Err(error) => tracing::warn!(%error, "Agent monitor failed to update the database"),
        }
    }
}

type Ws = tokio_tungstenite::WebSocketStream<tokio_rustls::server::TlsStream<TcpStream>>;

/// Why one connection ended before or during its handshake.
#[derive(Debug, thiserror::Error)]
enum AcceptError {
    #[error("handshake timed out")]
    Timeout,
    #[error("TLS handshake failed")]
    Tls(#[source] std::io::Error),
    #[error("WebSocket upgrade failed")]
    Ws(#[source] tokio_tungstenite::tungstenite::Error),
    #[error("connection closed before Hello")]
    Closed,
    #[error("first message is not a Hello")]
    NotHello,
}

#[expect(
    clippy::result_large_err,
    reason = "tungstenite's handshake callback signature"
)]
fn check_path(req: &Request, resp: Response) -> Result<Response, ErrorResponse> {
    if req.uri().path() == PATH {
        Ok(resp)
    } else {
        let mut e = ErrorResponse::new(Some("not found".into()));
        *e.status_mut() = http::StatusCode::NOT_FOUND;
        Err(e)
    }
}

async fn accept(tcp: TcpStream, acceptor: tokio_rustls::TlsAcceptor) -> Result<(Ws, Hello), AcceptError> {
    let tls = acceptor.accept(tcp).await.map_err(AcceptError::Tls)?;
    let config = WebSocketConfig::default()
        .max_message_size(Some(MAX_MESSAGE_SIZE))
        .max_frame_size(Some(MAX_MESSAGE_SIZE));
    let mut ws = tokio_tungstenite::accept_hdr_async_with_config(tls, check_path, Some(config))
        .await
        .map_err(AcceptError::Ws)?;
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(t))) => {
                return match serde_json::from_str::<AgentMessage>(t.as_str()) {
                    Ok(AgentMessage::Hello(h)) => Ok((ws, h)),
                    _ => Err(AcceptError::NotHello),
                };
            }
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
            Some(Ok(_)) => return Err(AcceptError::NotHello),
            Some(Err(e)) => return Err(AcceptError::Ws(e)),
            None => return Err(AcceptError::Closed),
        }
    }
}

/// Checks a `Hello`; the error is (the reason given to the agent, the detail core logs).
async fn verify(state: &State, h: &Hello) -> Result<(), (String, &'static str)> {
    validate_protocol_version(h.version).map_err(|e| (e.to_string(), "protocol version"))?;
    if !state.leader.load(Ordering::SeqCst) {
        return Err((
            "this core is on standby; try the next core URL".to_owned(),
            "standby core",
        ));
    }
    let row = sqlx::query("SELECT role, secret_hash FROM system_vms WHERE id = $1 AND removed IS NULL")
        .bind(h.vm_id.clone())
        .fetch_optional(&state.db.pool)
        .await
        .map_err(|error| {
            tracing::error!(%error, "Agent lookup failed");
            (
                "core could not check the registration; try again".to_owned(),
                "database error",
            )
        })?;
    let bad = |detail| ("unknown system VM id or wrong secret".to_owned(), detail);
    let row = row.ok_or_else(|| bad("no system VM with this id"))?;
    let role: String = row.try_get("role").map_err(|_| bad("unreadable row"))?;
    let stored: String = row.try_get("secret_hash").map_err(|_| bad("unreadable row"))?;
    let given = hash_secret(h.secret.expose());
    if !bool::from(given.as_bytes().ct_eq(stored.as_bytes())) {
        return Err(bad("wrong secret"));
    }
    if AgentRole::parse(&role) != Some(h.role) {
        return Err((
            format!(
                "role {} does not match the registered role {role}",
                h.role.as_str()
            ),
            "role mismatch",
        ));
    }
    Ok(())
}

async fn send(ws: &mut Ws, m: &CoreMessage) -> Result<(), tokio_tungstenite::tungstenite::Error> {
    let text = serde_json::to_string(m).unwrap_or_default();
    ws.send(Message::text(text)).await
}

async fn connection(
    tcp: TcpStream,
    peer: SocketAddr,
    acceptor: tokio_rustls::TlsAcceptor,
    state: State,
    stop: watch::Receiver<bool>,
) {
    let (ws, hello) = match tokio::time::timeout(HANDSHAKE_TIMEOUT, accept(tcp, acceptor)).await {
        Ok(Ok(v)) => v,
        Ok(Err(error)) => {
            tracing::info!(%peer, error = %error, "Agent connection refused before Hello");
            return;
        }
        Err(_) => {
            tracing::info!(%peer, error = %AcceptError::Timeout, "Agent connection refused before Hello");
            return;
        }
    };
    let span = tracing::info_span!("agent", %peer, vm_id = %hello.vm_id, role = hello.role.as_str());
    tracing::Instrument::instrument(session(ws, hello, state, stop), span).await;
}

async fn session(mut ws: Ws, hello: Hello, state: State, mut stop: watch::Receiver<bool>) {
    let vm_id = hello.vm_id.clone();
    if let Err((reason, detail)) = verify(&state, &hello).await {
        tracing::warn!(%reason, %detail, "Agent refused");
        let _ = send(&mut ws, &CoreMessage::Refused(Refused { reason })).await;
        let _ = ws.close(None).await;
        return;
    }
    let interval = setting_secs(&state, "agent.heartbeat.interval", 3).await;
    let timeout = setting_secs(&state, "agent.heartbeat.timeout", 9).await;
    let console_keys = match hello.role {
        AgentRole::ConsoleProxy => ConsoleKeys::from_key_set(&state.console_keys()).ok(),
        AgentRole::SecStorage => None,
    };
    let (conn_id, mut replaced, mut outgoing) = state.agents.register(&vm_id, hello.role, hello.version);
    if let Err(error) = mark_up(&state, &vm_id, Some(&hello.software_version), None).await {
        tracing::error!(%error, "Failed to record the agent as Up");
    }
    if let Some(endpoint) = &hello.endpoint {
        let r = sqlx::query("UPDATE system_vms SET endpoint = $1 WHERE id = $2")
            .bind(endpoint.clone())
            .bind(vm_id.clone())
            .execute(&state.db.pool)
            .await;
        if let Err(error) = r {
            tracing::error!(%error, "Failed to record the agent's endpoint");
        }
    }
    let welcome = CoreMessage::Welcome(Welcome {
        version: systemvm_proto::agent::CURRENT_PROTOCOL_VERSION,
        heartbeat_interval_secs: interval,
        console_keys,
        config: Default::default(),
    });
    tracing::info!(version = hello.version, software_version = %hello.software_version, "Agent connected");
    let ended = if send(&mut ws, &welcome).await.is_err() {
        "connection lost while sending Welcome"
    } else {
        loop {
            tokio::select! {
                m = tokio::time::timeout(Duration::from_secs(timeout), ws.next()) => match m {
                    Err(_) => break "heartbeat timeout",
                    Ok(None | Some(Ok(Message::Close(_)))) => break "connection closed by the agent",
                    Ok(Some(Err(_))) => break "connection lost",
                    Ok(Some(Ok(Message::Text(t)))) => {
                        if let Some(reply) = on_message(&state, &vm_id, t.as_str()).await
                            && send(&mut ws, &reply).await.is_err()
                        {
                            break "connection lost";
                        }
                    }
                    Ok(Some(Ok(_))) => {}
                },
                Some(m) = outgoing.recv() => {
                    if send(&mut ws, &m).await.is_err() {
                        break "connection lost";
                    }
                }
                _ = &mut replaced => {
                    tracing::info!("Agent connection replaced by a newer one");
                    let _ = ws.close(None).await;
                    return;
                }
                _ = stop.changed() => break "core stopping",
            }
        }
    };
    let _ = ws.close(None).await;
    if state.agents.unregister(&vm_id, conn_id) {
        let r = sqlx::query("UPDATE system_vms SET agent_state = $1, disconnected = $2 WHERE id = $3")
            .bind(DISCONNECTED)
            .bind(now_cs())
            .bind(vm_id.clone())
            .execute(&state.db.pool)
            .await;
        if let Err(error) = r {
            tracing::error!(%error, "Failed to record the agent as Disconnected");
        }
        tracing::warn!(reason = ended, "Agent disconnected");
    }
}

async fn mark_up(
    state: &State,
    vm_id: &str,
    software_version: Option<&str>,
    load: Option<String>,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE system_vms SET agent_state = $1, last_heartbeat_ms = $2, software_version = COALESCE($3, software_version), last_load = COALESCE($4, last_load) WHERE id = $5",
    )
    .bind(UP)
    .bind(now_ms())
    .bind(software_version.map(str::to_owned))
    .bind(load)
    .bind(vm_id.to_owned())
    .execute(&state.db.pool)
    .await
    .map(|_| ())
}

/// Handles one agent message; returns the reply to send at once, if any.
async fn on_message(state: &State, vm_id: &str, text: &str) -> Option<CoreMessage> {
    match serde_json::from_str::<AgentMessage>(text) {
        Ok(AgentMessage::Heartbeat(hb)) => {
            let load = serde_json::to_string(&hb.load).ok();
            if let Err(error) = mark_up(state, vm_id, None, load).await {
                tracing::error!(%error, "Failed to record a heartbeat");
            }
            None
        }
        Ok(AgentMessage::Answer(a)) => {
            state.agents.answered(a);
            None
        }
        Ok(AgentMessage::JobProgress(p)) => {
            crate::api::templates::on_progress(state, vm_id, &p).await;
            None
        }
        Ok(AgentMessage::ClaimSession(c)) => Some(CoreMessage::ClaimAnswer(claim(state, vm_id, &c).await)),
        Ok(AgentMessage::Unknown) => {
            tracing::debug!("Skipped an agent message of an unknown type");
            None
        }
        Ok(AgentMessage::Hello(_)) => {
            tracing::warn!("Second Hello on a connection skipped");
            None
        }
        Err(error) => {
            tracing::warn!(%error, "Unreadable agent message skipped");
            None
        }
    }
}

/// Claims a console session id for the proxy `vm_id`: granted once per id across every proxy
/// (the row's primary key decides), remembered until the token expires.
async fn claim(state: &State, proxy_id: &str, c: &ClaimSession) -> ClaimAnswer {
    let refuse = |reason: &str| ClaimAnswer {
        id: c.id.clone(),
        granted: false,
        reason: Some(reason.to_owned()),
    };
    if c.session_id.is_empty() || c.session_id.len() > 128 {
        return refuse("invalid session id");
    }
    let expires_ms = i64::try_from(c.expires.saturating_mul(1000)).unwrap_or(i64::MAX);
    let r = sqlx::query(
        "INSERT INTO console_sessions (session_id, vm_id, proxy_id, claimed, claimed_ms, expires_ms) VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (session_id) DO NOTHING",
    )
    .bind(c.session_id.clone())
    .bind(c.vm_id.clone())
    .bind(proxy_id.to_owned())
    .bind(now_cs())
    .bind(now_ms())
    .bind(expires_ms)
    .execute(&state.db.pool)
    .await;
    match r {
        Ok(done) if done.rows_affected() == 1 => ClaimAnswer {
            id: c.id.clone(),
            granted: true,
            reason: None,
        },
        Ok(_) => {
            tracing::warn!(session_id = %c.session_id, vm_id = %c.vm_id, "Console session replayed: refused fleet-wide");
            refuse("this console link was already used")
        }
        Err(error) => {
            tracing::error!(%error, "Failed to record a console session claim");
            refuse("core could not record the session")
        }
    }
}

/// Forgets console session claims whose tokens have expired (a token can't be used after its
/// expiry, so its claim is no longer needed).
pub async fn prune_claims(pool: &sqlx::AnyPool) -> Result<u64, sqlx::Error> {
    sqlx::query("DELETE FROM console_sessions WHERE expires_ms < $1")
        .bind(now_ms().saturating_sub(60_000))
        .execute(pool)
        .await
        .map(|r| r.rows_affected())
}
