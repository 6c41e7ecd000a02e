//! One console session: token checks, the VNC connection, both RFB handshakes, and the relay.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use systemvm_proto::console::{ClaimsError, ConsoleTarget, ConsoleTokenClaims, TokenSealError, ViewerMode};
use systemvm_proto::rfb::{self, ClientDone, ClientHandshake, InputFilter, RfbError, ServerHandshake};
use systemvm_proto::ws::{Opcode, close_code};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

use crate::config::ProxyConfig;
use crate::replay::{ClaimError, ReplayStore};
use crate::transport::{TransportError, WsIn, WsReader, WsWriter};

/// Relay buffer (VNC → browser) size at the start of a session.
pub const RELAY_BUF_START: usize = 64 * 1024;
/// Largest relay buffer: a read that fills the buffer doubles it up to this size.
pub const RELAY_BUF_MAX: usize = 1024 * 1024;

/// A session the proxy will not run, with the close code and the words the console page shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// WebSocket close code.
    pub code: u16,
    /// Reason for the person at the console (at most 123 bytes are sent).
    pub reason: String,
}

impl Refusal {
    fn new(code: u16, reason: impl Into<String>) -> Self {
        Refusal {
            code,
            reason: reason.into(),
        }
    }
}

/// What the WebSocket upgrade request tells about the browser.
#[derive(Debug, Clone)]
pub struct ClientInfo {
    /// The `token` query parameter.
    pub token: Option<String>,
    /// The `Origin` header.
    pub origin: Option<String>,
    /// The `Host` header.
    pub host: Option<String>,
    /// The browser's socket address.
    pub peer: SocketAddr,
    /// Whether the request came over TLS.
    pub tls: bool,
}

/// Opens and checks a token for this client and spends its session id.
pub fn authorize(
    config: &ProxyConfig,
    keys: &systemvm_proto::console::KeySet,
    replay: &ReplayStore,
    client: &ClientInfo,
    now: u64,
) -> Result<ConsoleTokenClaims, Refusal> {
    let token = client
        .token
        .as_deref()
        .filter(|t| !t.is_empty())
        .ok_or_else(|| Refusal::new(close_code::TOKEN_REFUSED, "console link has no token"))?;
    let claims = keys.open(token).map_err(|e| {
        Refusal::new(
            close_code::TOKEN_REFUSED,
            match e {
                TokenSealError::UnknownKey(_) => {
                    "console token was issued with a key this proxy does not hold"
                }
                TokenSealError::UnsupportedVersion(_) => "console token format not supported by this proxy",
                _ => "console token is not valid",
            },
        )
    })?;
    claims.check_time(now).map_err(|e| {
        Refusal::new(
            close_code::TOKEN_REFUSED,
            match e {
                ClaimsError::Expired { .. } => "console token expired",
                ClaimsError::NotYetValid { .. } => "console token is not valid yet (check the clocks)",
                ClaimsError::BadWindow => "console token has an invalid validity window",
            },
        )
    })?;
    if let Some(ip) = claims.client_ip
        && ip.to_canonical() != client.peer.ip().to_canonical()
    {
        return Err(Refusal::new(
            close_code::FORBIDDEN,
            "console link was issued for another client address",
        ));
    }
    if !origin_allowed(config, &claims, client) {
        return Err(Refusal::new(
            close_code::FORBIDDEN,
            "console is not allowed from this web origin",
        ));
    }
    replay
        .claim(&claims.session_id, claims.expires, now)
        .map_err(|e| match e {
            ClaimError::AlreadyUsed => Refusal::new(
                close_code::TOKEN_REFUSED,
                "console token already used: each link opens one session",
            ),
            ClaimError::Full => Refusal::new(close_code::BUSY, e.to_string()),
        })?;
    Ok(claims)
}

/// Claims the token's session id from core (a link opens one session across every proxy).
pub async fn claim_fleet_wide(
    claimer: &systemvm_agent_client::Claimer,
    claims: &ConsoleTokenClaims,
) -> Result<(), Refusal> {
    use systemvm_agent_client::ClaimError;
    match claimer
        .claim_session(&claims.session_id, &claims.vm.id, claims.expires)
        .await
    {
        Ok(answer) if answer.granted => Ok(()),
        Ok(answer) => Err(Refusal::new(
            close_code::TOKEN_REFUSED,
            format!(
                "console token already used: {}",
                answer
                    .reason
                    .as_deref()
                    .unwrap_or("refused by the management server")
            ),
        )),
        Err(ClaimError::Unsupported(version)) => {
            tracing::debug!(
                version,
                "Core does not check session claims; the local replay check applies"
            );
            Ok(())
        }
        Err(e) => Err(Refusal::new(
            close_code::INTERNAL,
            format!(
                "the console proxy could not confirm this link with the management server ({e}); open the console again"
            ),
        )),
    }
}

/// Origin policy: the token's own list when it has one; otherwise the proxy's own origin or its
/// allow-list. Requests without `Origin` (not from a browser) pass unless the token names origins.
fn origin_allowed(config: &ProxyConfig, claims: &ConsoleTokenClaims, client: &ClientInfo) -> bool {
    let Some(origin) = client.origin.as_deref() else {
        return claims.allowed_origins.is_empty();
    };
    if let Some(verdict) = claims.origin_allowed(origin) {
        return verdict;
    }
    if config
        .allowed_origins
        .iter()
        .any(|o| o.eq_ignore_ascii_case(origin))
    {
        return true;
    }
    let scheme = if client.tls { "https://" } else { "http://" };
    match (origin.get(..scheme.len()), client.host.as_deref()) {
        (Some(s), Some(host)) if s.eq_ignore_ascii_case(scheme) => {
            origin[scheme.len()..].eq_ignore_ascii_case(host)
        }
        _ => false,
    }
}

/// Why a session ended, for the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionEnd {
    /// The VNC server closed its connection.
    VncClosed,
    /// The browser closed or went away.
    BrowserClosed,
    /// The browser stopped answering pings.
    BrowserSilent,
    /// The proxy is shutting down.
    Shutdown,
    /// A failure before or during the relay (already reported to the browser).
    Failed,
}

/// Runs an authorized session to its end: connect, handshakes, relay. Every failure is sent to the
/// browser as a close reason and logged.
pub async fn run<R, W>(
    config: &ProxyConfig,
    claims: ConsoleTokenClaims,
    mut reader: WsReader<R>,
    mut writer: WsWriter<W>,
    shutdown: watch::Receiver<bool>,
) -> SessionEnd
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let started = Instant::now();
    let setup = async {
        let (vnc, server) = connect_vnc(config, &claims).await?;
        let name = Some(claims.vm.display_name.as_str()).filter(|n| !n.is_empty());
        let client_rest = browser_handshake(&mut reader, &mut writer, &server, name).await?;
        Ok::<_, Refusal>((vnc, server, client_rest))
    };
    let (vnc, server, client_rest) = match tokio::time::timeout(config.handshake_timeout, setup).await {
        Ok(Ok(ready)) => ready,
        Ok(Err(refusal)) => {
            warn!(code = refusal.code, reason = %refusal.reason, "Console session failed");
            let _ = writer.close(refusal.code, &refusal.reason).await;
            return SessionEnd::Failed;
        }
        Err(_) => {
            let reason = "timed out setting up the console session";
            warn!(reason, "Console session failed");
            let _ = writer.close(close_code::TARGET_UNREACHABLE, reason).await;
            return SessionEnd::Failed;
        }
    };
    info!(
        width = server.server_init.width,
        height = server.server_init.height,
        security = server.security,
        setup_ms = started.elapsed().as_millis() as u64,
        "Console session connected"
    );
    let filter = (claims.viewer == ViewerMode::ViewOnly).then(InputFilter::default);
    let end = relay(
        config,
        reader,
        writer,
        vnc,
        server.rest,
        client_rest,
        filter,
        shutdown,
    )
    .await;
    info!(?end, secs = started.elapsed().as_secs(), "Console session ended");
    end
}

/// Connects to the VNC server and completes the RFB handshake as its client.
async fn connect_vnc(
    config: &ProxyConfig,
    claims: &ConsoleTokenClaims,
) -> Result<(TcpStream, ClientDone), Refusal> {
    let (host, port, password) = match &claims.target {
        ConsoleTarget::Vnc { host, port, password } => (host, *port, password.as_ref().map(|p| p.expose())),
        other => {
            return Err(Refusal::new(
                close_code::TARGET_UNREACHABLE,
                format!("{} consoles are not supported by this proxy", other.kind()),
            ));
        }
    };
    let unreachable = |what: String| Refusal::new(close_code::TARGET_UNREACHABLE, what);
    let mut stream =
        match tokio::time::timeout(config.connect_timeout, TcpStream::connect((host.as_str(), port))).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                return Err(unreachable(format!(
                    "cannot reach the VM's console at {host}:{port}: {e}"
                )));
            }
            Err(_) => {
                return Err(unreachable(format!(
                    "timed out reaching the VM's console at {host}:{port}"
                )));
            }
        };
    let _ = stream.set_nodelay(true);
    let mut hs = ClientHandshake::new(password, config.shared);
    let mut buf = vec![0u8; 4096];
    loop {
        let n = stream
            .read(&mut buf)
            .await
            .map_err(|e| unreachable(format!("lost the VM's console during the handshake: {e}")))?;
        if n == 0 {
            return Err(unreachable(
                "the VM's console closed the connection during the handshake".into(),
            ));
        }
        let progress = hs.advance(&buf[..n]).map_err(rfb_refusal)?;
        if !progress.send.is_empty() {
            stream
                .write_all(&progress.send)
                .await
                .map_err(|e| unreachable(format!("lost the VM's console during the handshake: {e}")))?;
        }
        if let Some(done) = progress.done {
            debug!(version = ?done.version, "VNC handshake complete");
            return Ok((stream, done));
        }
    }
}

fn rfb_refusal(e: RfbError) -> Refusal {
    let code = match e {
        RfbError::ServerRefused(_)
        | RfbError::NoSupportedSecurity { .. }
        | RfbError::PasswordRequired
        | RfbError::AuthFailed(_) => close_code::TARGET_AUTH,
        _ => close_code::RFB_PROTOCOL,
    };
    Refusal::new(code, e.to_string())
}

/// Offers the browser RFB 3.8 with security None, then sends the server's ServerInit (renamed to
/// the VM's display name). Returns the client bytes that followed ClientInit.
async fn browser_handshake<R, W>(
    reader: &mut WsReader<R>,
    writer: &mut WsWriter<W>,
    server: &ClientDone,
    name: Option<&str>,
) -> Result<Vec<u8>, Refusal>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let gone =
        |e: std::io::Error| Refusal::new(close_code::GOING_AWAY, format!("browser connection lost: {e}"));
    writer.send_binary(rfb::SERVER_VERSION).await.map_err(gone)?;
    let mut hs = ServerHandshake::new();
    loop {
        let input = reader
            .next()
            .await
            .map_err(|e| Refusal::new(e.close_code(), e.to_string()))?;
        match input {
            Some(WsIn::Data(data)) => {
                let progress = hs
                    .advance(data)
                    .map_err(|e| Refusal::new(close_code::RFB_PROTOCOL, e.to_string()))?;
                if !progress.send.is_empty() {
                    writer.send_binary(&progress.send).await.map_err(gone)?;
                }
                if let Some(done) = progress.done {
                    writer
                        .send_binary(&server.server_init.encode(name))
                        .await
                        .map_err(gone)?;
                    return Ok(done.rest);
                }
            }
            Some(WsIn::Ping(payload)) => writer.send(Opcode::Pong, &payload).await.map_err(gone)?,
            Some(WsIn::Pong) => {}
            Some(WsIn::Close(_)) | None => {
                return Err(Refusal::new(
                    close_code::NORMAL,
                    "browser left during the handshake",
                ));
            }
        }
    }
}

enum Control {
    Pong(Vec<u8>),
    Close(u16, String),
}

/// Relays both ways until one side ends. VNC → browser runs in `downstream`, which owns the browser's
/// write half and also sends pongs, pings and the close frame; browser → VNC runs in `upstream`.
#[expect(clippy::too_many_arguments, reason = "one call site; the parts of a session")]
async fn relay<R, W>(
    config: &ProxyConfig,
    reader: WsReader<R>,
    writer: WsWriter<W>,
    vnc: TcpStream,
    server_rest: Vec<u8>,
    client_rest: Vec<u8>,
    filter: Option<InputFilter>,
    shutdown: watch::Receiver<bool>,
) -> SessionEnd
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let (vnc_r, vnc_w) = vnc.into_split();
    let (ctl_tx, ctl_rx) = mpsc::channel(8);
    let epoch = Instant::now();
    let last_heard = AtomicU64::new(0);
    let up = upstream(reader, vnc_w, client_rest, filter, ctl_tx, &last_heard, epoch);
    let down = downstream(
        vnc_r,
        writer,
        server_rest,
        ctl_rx,
        config.keepalive,
        &last_heard,
        epoch,
        shutdown,
    );
    tokio::pin!(up, down);
    tokio::select! {
        end = &mut down => end,
        end = &mut up => {
            // Let downstream send the close frame upstream queued, within bounds.
            let _ = tokio::time::timeout(Duration::from_secs(5), &mut down).await;
            end
        }
    }
}

async fn upstream<R: AsyncRead + Unpin>(
    mut reader: WsReader<R>,
    mut vnc: tokio::net::tcp::OwnedWriteHalf,
    client_rest: Vec<u8>,
    mut filter: Option<InputFilter>,
    ctl: mpsc::Sender<Control>,
    last_heard: &AtomicU64,
    epoch: Instant,
) -> SessionEnd {
    let mut filtered = Vec::new();
    // Bytes that came along with ClientInit go first.
    let mut result = forward(&client_rest, &mut vnc, filter.as_mut(), &mut filtered).await;
    loop {
        if let Err(refusal) = result {
            warn!(code = refusal.code, reason = %refusal.reason, "Console session failed");
            let _ = ctl.send(Control::Close(refusal.code, refusal.reason)).await;
            return SessionEnd::Failed;
        }
        result = match reader.next().await {
            Ok(Some(WsIn::Data(data))) => {
                last_heard.store(epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
                forward(data, &mut vnc, filter.as_mut(), &mut filtered).await
            }
            Ok(Some(WsIn::Ping(payload))) => {
                last_heard.store(epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
                let _ = ctl.send(Control::Pong(payload)).await;
                Ok(())
            }
            Ok(Some(WsIn::Pong)) => {
                last_heard.store(epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
                Ok(())
            }
            Ok(Some(WsIn::Close(_))) => {
                let _ = ctl
                    .send(Control::Close(close_code::NORMAL, "console closed".into()))
                    .await;
                return SessionEnd::BrowserClosed;
            }
            Ok(None) => return SessionEnd::BrowserClosed,
            Err(TransportError::Io(e)) => {
                debug!(error = %e, "Browser connection failed");
                return SessionEnd::BrowserClosed;
            }
            Err(e) => Err(Refusal::new(e.close_code(), e.to_string())),
        };
    }
}

async fn forward(
    data: &[u8],
    vnc: &mut tokio::net::tcp::OwnedWriteHalf,
    filter: Option<&mut InputFilter>,
    scratch: &mut Vec<u8>,
) -> Result<(), Refusal> {
    let bytes = match filter {
        Some(f) => {
            scratch.clear();
            f.filter(data, scratch)
                .map_err(|e| Refusal::new(close_code::RFB_PROTOCOL, e.to_string()))?;
            &scratch[..]
        }
        None => data,
    };
    vnc.write_all(bytes).await.map_err(|e| {
        Refusal::new(
            close_code::TARGET_UNREACHABLE,
            format!("lost the VM's console: {e}"),
        )
    })
}

#[expect(clippy::too_many_arguments, reason = "one call site; the parts of a session")]
async fn downstream<W: AsyncWrite + Unpin>(
    mut vnc: tokio::net::tcp::OwnedReadHalf,
    mut writer: WsWriter<W>,
    server_rest: Vec<u8>,
    mut ctl: mpsc::Receiver<Control>,
    keepalive: Duration,
    last_heard: &AtomicU64,
    epoch: Instant,
    mut shutdown: watch::Receiver<bool>,
) -> SessionEnd {
    if !server_rest.is_empty() && writer.send_binary(&server_rest).await.is_err() {
        return SessionEnd::BrowserClosed;
    }
    let mut buf = vec![0u8; RELAY_BUF_START];
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + keepalive, keepalive);
    loop {
        tokio::select! {
            biased;
            _ = shutdown.changed() => {
                let _ = writer.close(close_code::GOING_AWAY, "console proxy is shutting down").await;
                return SessionEnd::Shutdown;
            }
            msg = ctl.recv() => match msg {
                Some(Control::Pong(payload)) => {
                    if writer.send(Opcode::Pong, &payload).await.is_err() {
                        return SessionEnd::BrowserClosed;
                    }
                }
                Some(Control::Close(code, reason)) => {
                    let _ = writer.close(code, &reason).await;
                    return if code == close_code::NORMAL { SessionEnd::BrowserClosed } else { SessionEnd::Failed };
                }
                None => return SessionEnd::BrowserClosed,
            },
            _ = ticker.tick() => {
                let silent_ms = (epoch.elapsed().as_millis() as u64).saturating_sub(last_heard.load(Ordering::Relaxed));
                if silent_ms > 3 * keepalive.as_millis() as u64 {
                    let _ = writer.close(close_code::GOING_AWAY, "browser stopped answering").await;
                    return SessionEnd::BrowserSilent;
                }
                if writer.send(Opcode::Ping, b"").await.is_err() {
                    return SessionEnd::BrowserClosed;
                }
            }
            read = vnc.read(&mut buf) => match read {
                Ok(0) => {
                    let _ = writer.close(close_code::NORMAL, "the VM's console closed the connection").await;
                    return SessionEnd::VncClosed;
                }
                Ok(n) => {
                    if writer.send_binary(&buf[..n]).await.is_err() {
                        return SessionEnd::BrowserClosed;
                    }
                    if n == buf.len() && buf.len() < RELAY_BUF_MAX {
                        buf.resize(buf.len() * 2, 0);
                    }
                }
                Err(e) => {
                    let reason = format!("lost the VM's console: {e}");
                    let _ = writer.close(close_code::TARGET_UNREACHABLE, &reason).await;
                    return SessionEnd::Failed;
                }
            },
        }
    }
}
