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

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt as _, StreamExt as _};
use subtle::ConstantTimeEq as _;
use systemvm_proto::agent::{
    AgentMessage, AgentRole, ConfigUpdate, ConsoleKeys, CoreMessage, Hello, MAX_MESSAGE_SIZE, Refused,
    Welcome, validate_protocol_version,
};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use crate::limits::{ConnLimiter, ConnSlot};
use crate::model::keyrings::{self, Ring};
use crate::model::{consoles, sessions, settings, systemvms, templates};
use crate::state::State;
use crate::util::hash_secret;

/// Most agent connections at once (one per system VM, plus handshakes).
pub const MAX_CONNECTIONS: usize = 4096;
/// Most agent connections from one address (system VMs behind one NAT share an address).
pub const MAX_CONNECTIONS_PER_CLIENT: usize = 512;
/// Most connections still in their TLS/WebSocket/Hello handshake at once.
pub const MAX_HANDSHAKES: usize = 256;
/// Most handshakes in flight from one address.
pub const MAX_HANDSHAKES_PER_CLIENT: usize = 16;

/// Time allowed for the TLS handshake, the WebSocket upgrade and the `Hello`.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// The WebSocket path of the endpoint.
pub const PATH: &str = "/agent";

/// Accepts agent connections until `stop`.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    state: State,
    mut stop: watch::Receiver<bool>,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let connections = ConnLimiter::new(MAX_CONNECTIONS, MAX_CONNECTIONS_PER_CLIENT);
    let handshakes = ConnLimiter::new(MAX_HANDSHAKES, MAX_HANDSHAKES_PER_CLIENT);
    let mut conns = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            r = listener.accept() => match r {
                Ok((tcp, peer)) => {
                    // Refused at once (the socket closes): a flood holds no descriptor for long.
                    let slots = connections
                        .try_acquire(peer.ip())
                        .and_then(|c| handshakes.try_acquire(peer.ip()).map(|h| (c, h)));
                    let (conn_slot, handshake_slot) = match slots {
                        Ok(s) => s,
                        Err(why) => {
                            tracing::debug!(%peer, ?why, "Agent endpoint full, refusing a connection");
                            continue;
                        }
                    };
                    let (acceptor, state, stop) = (acceptor.clone(), state.clone(), stop.clone());
                    conns.spawn(async move {
                        let _conn_slot = conn_slot;
                        connection(tcp, peer, acceptor, state, stop, handshake_slot).await;
                    });
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
    // Each connection sees the stop too and sends its agent a close frame.
    drop(listener);
    while conns.join_next().await.is_some() {}
}

/// The lease holder's sweeps, every second: agents silent past `agent.heartbeat.timeout` are
/// marked `Disconnected`; every 5 s, uploads whose parameters expired unused are abandoned; every
/// minute, expired console session claims and login sessions go.
pub async fn monitor(state: State, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut ticks: u64 = 0;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        ticks = ticks.wrapping_add(1);
        if !state.is_leader() {
            continue;
        }
        if ticks.is_multiple_of(60) {
            match consoles::prune_claims(&state.db.pool).await {
                Ok(0) => {}
                Ok(n) => tracing::debug!(count = n, "Forgot expired console session claims"),
                Err(error) => tracing::warn!(%error, "Failed to prune console session claims"),
            }
            match sessions::sweep(&state.db.pool).await {
                Ok(0) => {}
                Ok(n) => tracing::debug!(count = n, "Swept expired login sessions"),
                Err(error) => tracing::warn!(%error, "Failed to sweep login sessions"),
            }
        }
        if ticks.is_multiple_of(5) {
            match crate::model::transfers::abandon_expired(&state.db.pool).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(count = n, "Abandoned uploads whose parameters expired unused"),
                Err(error) => tracing::warn!(%error, "Failed to abandon expired uploads"),
            }
        }
        let timeout = settings::uint(&state, &settings::HEARTBEAT_TIMEOUT).await;
        let timeout_ms = i64::try_from(timeout.saturating_mul(1000)).unwrap_or(i64::MAX);
        match systemvms::sweep_silent(&state.db, timeout_ms).await {
            Ok(0) => {}
            Ok(n) => tracing::warn!(
                count = n,
                timeout_secs = timeout,
                "Agents silent past the heartbeat timeout marked Disconnected"
            ),
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

/// Checks a `Hello`; returns the VM's zone, or (the reason given to the agent, the detail core
/// logs).
async fn verify(state: &State, h: &Hello) -> Result<String, (String, &'static str)> {
    validate_protocol_version(h.version).map_err(|e| (e.to_string(), "protocol version"))?;
    if !state.is_leader() {
        return Err((
            "this core is on standby; try the next core URL".to_owned(),
            "standby core",
        ));
    }
    let row = systemvms::credentials(&state.db.pool, &h.vm_id)
        .await
        .map_err(|error| {
            tracing::error!(%error, "Agent lookup failed");
            (
                "core could not check the registration; try again".to_owned(),
                "database error",
            )
        })?;
    let bad = |detail| ("unknown system VM id or wrong secret".to_owned(), detail);
    let (role, stored, zone) = row.ok_or_else(|| bad("no system VM with this id"))?;
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
    Ok(zone)
}

/// Pushes the current agent settings to every connected agent (a setting changed).
pub async fn push_config(state: &State) {
    for (vm_id, role) in state.agents.connected() {
        let zone = match systemvms::credentials(&state.db.pool, &vm_id).await {
            Ok(Some((_, _, zone))) => zone,
            Ok(None) => continue,
            Err(error) => {
                tracing::warn!(%error, "Could not read a system VM's zone to push its settings");
                continue;
            }
        };
        let config = settings::agent_config(state, &zone, role).await;
        if !state
            .agents
            .push(&vm_id, CoreMessage::ConfigUpdate(ConfigUpdate { config }))
        {
            tracing::warn!(vm.id = %vm_id, "Could not queue a settings update for an agent");
        }
    }
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
    handshake_slot: ConnSlot,
) {
    let accepted = tokio::time::timeout(HANDSHAKE_TIMEOUT, accept(tcp, acceptor)).await;
    // The handshake is over (done or failed): its slot goes back.
    drop(handshake_slot);
    let (ws, hello) = match accepted {
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
    let zone = match verify(&state, &hello).await {
        Ok(zone) => zone,
        Err((reason, detail)) => {
            tracing::warn!(%reason, %detail, "Agent refused");
            let _ = send(&mut ws, &CoreMessage::Refused(Refused { reason })).await;
            let _ = ws.close(None).await;
            return;
        }
    };
    let interval = settings::uint(&state, &settings::HEARTBEAT_INTERVAL).await;
    let timeout = settings::uint(&state, &settings::HEARTBEAT_TIMEOUT).await;
    let console_keys = match hello.role {
        AgentRole::ConsoleProxy => match consoles::current_keys(&state).await {
            Ok(set) => ConsoleKeys::from_key_set(&set).ok(),
            Err(error) => {
                tracing::error!(%error, "Could not read the console keys for a proxy");
                ConsoleKeys::from_key_set(&state.console_keys()).ok()
            }
        },
        AgentRole::SecStorage => None,
    };
    let transfer_keys = match hello.role {
        AgentRole::SecStorage => {
            let set = match keyrings::current(&state, Ring::Transfer).await {
                Ok(set) => set,
                Err(error) => {
                    tracing::error!(%error, "Could not read the transfer keys for a storage VM");
                    state.transfer_keys()
                }
            };
            ConsoleKeys::from_key_set(&set).ok()
        }
        AgentRole::ConsoleProxy => None,
    };
    let certificate = match crate::model::certificates::current(&state).await {
        Ok(c) => c,
        Err(error) => {
            tracing::error!(%error, "Could not read the custom certificate for an agent");
            None
        }
    };
    let peer_identity = match hello.role {
        AgentRole::SecStorage => match state.ca.issue_peer(&systemvm_proto::agent::peer_name(&vm_id)) {
            Ok((chain_pem, key_pem)) => Some(systemvm_proto::agent::PeerIdentity {
                chain_pem,
                key_pem: systemvm_proto::Secret(key_pem),
            }),
            Err(error) => {
                tracing::error!(%error, "Could not issue a storage VM's peer certificate");
                None
            }
        },
        AgentRole::ConsoleProxy => None,
    };
    let config = settings::agent_config(&state, &zone, hello.role).await;
    let (conn_id, mut replaced, mut outgoing) = state.agents.register(&vm_id, hello.role, hello.version);
    let from = From {
        vm_id: vm_id.clone(),
        conn: conn_id,
        role: hello.role,
    };
    if let Err(error) = systemvms::mark_up(&state.db, &vm_id, Some(&hello.software_version), None).await {
        tracing::error!(%error, "Failed to record the agent as Up");
    }
    // A storage VM without a transfer server reports none: its old URL must not be handed out.
    let endpoint = match (&hello.endpoint, hello.role) {
        (Some(e), _) => Some(e.as_str()),
        (None, AgentRole::SecStorage) => Some(""),
        (None, AgentRole::ConsoleProxy) => None,
    };
    if let Some(endpoint) = endpoint
        && let Err(error) = systemvms::set_endpoint(&state.db.pool, &vm_id, endpoint).await
    {
        tracing::error!(%error, "Failed to record the agent's endpoint");
    }
    let welcome = CoreMessage::Welcome(Welcome {
        version: systemvm_proto::agent::CURRENT_PROTOCOL_VERSION,
        heartbeat_interval_secs: interval,
        console_keys,
        config,
        transfer_keys,
        certificate,
        peer_identity,
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
                        if let Some(reply) = on_message(&state, &from, t.as_str()).await
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
        if let Err(error) = systemvms::mark_disconnected(&state.db.pool, &vm_id).await {
            tracing::error!(%error, "Failed to record the agent as Disconnected");
        }
        tracing::warn!(reason = ended, "Agent disconnected");
    }
}

/// Who sent a message: the VM, its connection, its registered role.
#[derive(Debug, Clone)]
struct From {
    vm_id: String,
    conn: u64,
    role: AgentRole,
}

/// Handles one agent message; returns the reply to send at once, if any. Each message is
/// accepted only from a sender entitled to it: answers from the connection the command went to,
/// download progress from the storage VM connection the job was dispatched to (upload progress
/// from the storage VM the upload goes to, on any connection of it), session claims
/// from console proxies.
async fn on_message(state: &State, from: &From, text: &str) -> Option<CoreMessage> {
    let vm_id = from.vm_id.as_str();
    match serde_json::from_str::<AgentMessage>(text) {
        Ok(AgentMessage::Heartbeat(hb)) => {
            if let Err(error) = systemvms::mark_up(&state.db, vm_id, None, Some(&hb.load)).await {
                tracing::error!(%error, "Failed to record a heartbeat");
            }
            None
        }
        Ok(AgentMessage::Answer(a)) => {
            state.agents.answered(vm_id, from.conn, a);
            None
        }
        Ok(AgentMessage::JobProgress(p)) => {
            let entitled = from.role == AgentRole::SecStorage
                && (state.dispatched_to(&p.id, vm_id, from.conn)
                    || crate::model::transfers::is_upload_to(state, &p.id, vm_id)
                        .await
                        .unwrap_or(false));
            if !entitled {
                tracing::warn!(job = %p.id, role = from.role.as_str(), "Progress for a job not dispatched to this connection, skipped");
                return None;
            }
            let applied = if crate::model::volume_uploads::is_volume_upload(state, &p.id)
                .await
                .unwrap_or(false)
            {
                crate::model::volume_uploads::apply_progress(state, &p).await
            } else {
                templates::apply_progress(state, vm_id, &p).await
            };
            if let Err(error) = applied {
                tracing::error!(%error, template = %p.id, "Failed to record download progress");
            }
            None
        }
        Ok(AgentMessage::ClaimSession(c)) if from.role == AgentRole::ConsoleProxy => {
            Some(CoreMessage::ClaimAnswer(consoles::claim(state, vm_id, &c).await))
        }
        Ok(AgentMessage::ClaimSession(c)) => {
            tracing::warn!(
                role = from.role.as_str(),
                "Session claim from an agent that is not a console proxy, refused"
            );
            Some(CoreMessage::ClaimAnswer(systemvm_proto::agent::ClaimAnswer {
                id: c.id,
                granted: false,
                reason: Some("only console proxies claim sessions".into()),
            }))
        }
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
