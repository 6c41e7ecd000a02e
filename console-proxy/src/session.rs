//! One console session: token checks, the VNC connection, both RFB handshakes, and the relay.
//!
//! Invariants:
//! * every session ends with a close code and a reason the console page shows (unless the browser
//!   stopped reading: then the close frame is tried briefly, and the socket is closed anyway);
//! * a link is spent when its session is accepted, and not before: [`authorize`] checks the token
//!   and refuses a spent one; [`run`] spends it once the browser finished its side of the RFB
//!   handshake (ClientInit) on a session that holds a slot, first here ([`crate::replay`]), then
//!   with core when linked to one, and only then connects to the VM. A refusal for the session
//!   limit, a failed upgrade or a browser that leaves before ClientInit leaves the link usable; an
//!   error asking core un-spends it;
//! * every write toward the browser has a deadline ([`ProxyConfig::write_timeout`]): a browser that
//!   stops reading ends its session ([`SessionEnd::BrowserStalled`]) instead of holding it open;
//! * the idle timeout ([`IdleTimeout`]) counts browser *input* only — KeyEvent, PointerEvent,
//!   ClientCutText (also on view-only sessions, where that input is dropped): noVNC sends
//!   FramebufferUpdateRequests all the time, and pings/pongs only show the browser is alive. A
//!   session without input for the timeout is closed with [`close_code::IDLE`]; the timeout is read
//!   at least every [`IDLE_RECHECK`], so a change applies to running sessions too, measured from
//!   their last input (or the start of the relay).

use std::net::SocketAddr;
use std::sync::Arc;
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
use crate::replay::{Attempt, ClaimError, ReplayStore};
use crate::transport::{TransportError, WsIn, WsReader, WsWriter};

/// Relay buffer (VNC → browser) size at the start of a session.
pub const RELAY_BUF_START: usize = 64 * 1024;
/// Largest relay buffer: a read that fills the buffer doubles it up to this size.
pub const RELAY_BUF_MAX: usize = 1024 * 1024;
/// Longest time between two readings of the idle timeout by a session.
pub const IDLE_RECHECK: Duration = Duration::from_secs(1);

/// The idle timeout of console sessions, shared by every session of a proxy and changeable while
/// they run (`--idle-timeout`, core's `consoleproxy.session.timeout`). Zero turns it off.
#[derive(Clone, Debug, Default)]
pub struct IdleTimeout(Arc<AtomicU64>);

impl IdleTimeout {
    /// A timeout of `limit` (zero: off).
    pub fn new(limit: Duration) -> Self {
        let timeout = IdleTimeout::default();
        timeout.set(limit);
        timeout
    }

    /// The current timeout; `None` when off.
    pub fn get(&self) -> Option<Duration> {
        match self.0.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(Duration::from_millis(ms)),
        }
    }

    /// Sets the timeout (zero: off); sessions read it within [`IDLE_RECHECK`].
    pub fn set(&self, limit: Duration) {
        let ms = u64::try_from(limit.as_millis()).unwrap_or(u64::MAX);
        self.0.store(ms, Ordering::Relaxed);
    }
}

/// A duration in the words of a close reason: "15 min", "90 s", "1500 ms".
fn spoken(d: Duration) -> String {
    let ms = d.as_millis();
    if ms >= 60_000 && ms.is_multiple_of(60_000) {
        format!("{} min", ms / 60_000)
    } else if ms >= 1000 && ms.is_multiple_of(1000) {
        format!("{} s", ms / 1000)
    } else {
        format!("{ms} ms")
    }
}

/// The close reason of an idle session.
pub fn idle_reason(limit: Duration) -> String {
    format!("no keyboard or mouse input for {}", spoken(limit))
}

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

/// Opens and checks a token for this client; refuses it when its session id was spent. Nothing is
/// spent here: [`run`] spends the id once the session is accepted.
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
    if replay.is_spent(&claims.session_id) {
        return Err(claim_refusal(ClaimError::AlreadyUsed));
    }
    Ok(claims)
}

/// The refusal for a session id that cannot be spent.
pub fn claim_refusal(e: ClaimError) -> Refusal {
    match e {
        ClaimError::AlreadyUsed => Refusal::new(
            close_code::TOKEN_REFUSED,
            "console token already used: each link opens one session",
        ),
        ClaimError::Superseded => Refusal::new(
            close_code::TOKEN_REFUSED,
            "console link opened again (in another window or tab)",
        ),
        ClaimError::Full => Refusal::new(close_code::BUSY, e.to_string()),
    }
}

/// An authorized session that holds a slot and waits to be accepted: its claims, its attempt at
/// the link, and core's claimer when the proxy is linked to one.
pub struct Pending {
    /// The token's claims.
    pub claims: ConsoleTokenClaims,
    /// The link's use, spent when the session is accepted.
    pub attempt: Attempt,
    /// Claims the session id from core too.
    pub claimer: Option<systemvm_agent_client::Claimer>,
}

/// Spends the link: here, then with core. When core cannot be asked (not connected, no answer),
/// the link is un-spent so that opening the console again works.
async fn spend(
    attempt: Attempt,
    claimer: Option<&systemvm_agent_client::Claimer>,
    claims: &ConsoleTokenClaims,
) -> Result<(), Refusal> {
    let spent = attempt
        .spend(claims.expires, crate::unix_now())
        .map_err(claim_refusal)?;
    if let Some(claimer) = claimer
        && let Err(refusal) = claim_fleet_wide(claimer, claims).await
    {
        if refusal.code != close_code::TOKEN_REFUSED {
            spent.undo();
        }
        return Err(refusal);
    }
    debug!("Console link spent");
    Ok(())
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
    /// The browser stopped reading: a write toward it timed out.
    BrowserStalled,
    /// No input from the browser for the idle timeout.
    Idle,
    /// The proxy is shutting down.
    Shutdown,
    /// A failure before or during the relay (already reported to the browser).
    Failed,
}

/// Runs an authorized session to its end: the browser's handshake up to ClientInit, the link spent
/// (the session is accepted), the VNC connection and handshake, the browser's ServerInit, the
/// relay. Every failure is sent to the browser as a close reason and logged.
pub async fn run<R, W>(
    config: &ProxyConfig,
    idle: &IdleTimeout,
    pending: Pending,
    mut reader: WsReader<R>,
    mut writer: WsWriter<W>,
    shutdown: watch::Receiver<bool>,
) -> SessionEnd
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let started = Instant::now();
    let Pending {
        claims,
        mut attempt,
        claimer,
    } = pending;
    let setup = async {
        // The browser first: one that leaves before ClientInit has not used the link.
        let client_rest = tokio::select! {
            rest = browser_handshake(&mut reader, &mut writer) => rest?,
            () = attempt.superseded() => return Err(claim_refusal(ClaimError::Superseded)),
        };
        spend(attempt, claimer.as_ref(), &claims).await?;
        let (vnc, server) = connect_vnc(config, &claims).await?;
        let name = Some(claims.vm.display_name.as_str()).filter(|n| !n.is_empty());
        writer
            .send_binary(&server.server_init.encode(name))
            .await
            .map_err(browser_gone)?;
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
    let view_only = claims.viewer == ViewerMode::ViewOnly;
    let end = relay(
        config,
        idle,
        reader,
        writer,
        vnc,
        server.rest,
        client_rest,
        view_only,
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

fn browser_gone(e: std::io::Error) -> Refusal {
    Refusal::new(close_code::GOING_AWAY, format!("browser connection lost: {e}"))
}

/// Offers the browser RFB 3.8 with security None, up to its ClientInit (the ServerInit, renamed to
/// the VM's display name, follows once the VNC server sent its own). Returns the client bytes that
/// followed ClientInit.
async fn browser_handshake<R, W>(
    reader: &mut WsReader<R>,
    writer: &mut WsWriter<W>,
) -> Result<Vec<u8>, Refusal>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    writer
        .send_binary(rfb::SERVER_VERSION)
        .await
        .map_err(browser_gone)?;
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
                    writer.send_binary(&progress.send).await.map_err(browser_gone)?;
                }
                if let Some(done) = progress.done {
                    return Ok(done.rest);
                }
            }
            Some(WsIn::Ping(payload)) => writer.send(Opcode::Pong, &payload).await.map_err(browser_gone)?,
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

/// When the browser was last heard from and last sent input, in ms since the relay started.
struct Clocks {
    epoch: Instant,
    heard: AtomicU64,
    input: AtomicU64,
}

impl Clocks {
    fn now(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn heard(&self) {
        self.heard.store(self.now(), Ordering::Relaxed);
    }

    fn input(&self) {
        self.input.store(self.now(), Ordering::Relaxed);
    }

    /// Time since the last input (or the start).
    fn quiet(&self) -> Duration {
        Duration::from_millis(self.now().saturating_sub(self.input.load(Ordering::Relaxed)))
    }
}

/// Relays both ways until one side ends. VNC → browser runs in `downstream`, which owns the browser's
/// write half and also sends pongs, pings and the close frame, and closes idle sessions; browser →
/// VNC runs in `upstream`, which follows the browser's messages (dropping input when view-only).
#[expect(clippy::too_many_arguments, reason = "one call site; the parts of a session")]
async fn relay<R, W>(
    config: &ProxyConfig,
    idle: &IdleTimeout,
    reader: WsReader<R>,
    writer: WsWriter<W>,
    vnc: TcpStream,
    server_rest: Vec<u8>,
    client_rest: Vec<u8>,
    view_only: bool,
    shutdown: watch::Receiver<bool>,
) -> SessionEnd
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let (vnc_r, vnc_w) = vnc.into_split();
    let (ctl_tx, ctl_rx) = mpsc::channel(8);
    let clocks = Clocks {
        epoch: Instant::now(),
        heard: AtomicU64::new(0),
        input: AtomicU64::new(0),
    };
    let up = upstream(reader, vnc_w, client_rest, view_only, ctl_tx, &clocks);
    let down = downstream(
        vnc_r,
        writer,
        server_rest,
        ctl_rx,
        config.keepalive,
        idle,
        &clocks,
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
    view_only: bool,
    ctl: mpsc::Sender<Control>,
    clocks: &Clocks,
) -> SessionEnd {
    let mut messages = Messages {
        split: InputFilter::default(),
        view_only,
        scratch: Vec::new(),
    };
    // Bytes that came along with ClientInit go first.
    let mut result = messages.forward(&client_rest, &mut vnc, clocks).await;
    loop {
        if let Err(refusal) = result {
            warn!(code = refusal.code, reason = %refusal.reason, "Console session failed");
            let _ = ctl.send(Control::Close(refusal.code, refusal.reason)).await;
            return SessionEnd::Failed;
        }
        result = match reader.next().await {
            Ok(Some(WsIn::Data(data))) => {
                clocks.heard();
                messages.forward(data, &mut vnc, clocks).await
            }
            Ok(Some(WsIn::Ping(payload))) => {
                clocks.heard();
                let _ = ctl.send(Control::Pong(payload)).await;
                Ok(())
            }
            Ok(Some(WsIn::Pong)) => {
                clocks.heard();
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

/// The browser's RFB messages on their way to the VNC server.
struct Messages {
    /// Follows message boundaries; tells input apart.
    split: InputFilter,
    /// Drop input instead of passing it.
    view_only: bool,
    /// What is left of a chunk after dropping input.
    scratch: Vec<u8>,
}

impl Messages {
    /// Sends `data` on (without input when view-only) and marks the input time when it held input.
    async fn forward(
        &mut self,
        data: &[u8],
        vnc: &mut tokio::net::tcp::OwnedWriteHalf,
        clocks: &Clocks,
    ) -> Result<(), Refusal> {
        let broken = |e: RfbError| Refusal::new(close_code::RFB_PROTOCOL, e.to_string());
        let (inputs, bytes) = if self.view_only {
            self.scratch.clear();
            let inputs = self.split.filter(data, &mut self.scratch).map_err(broken)?;
            (inputs, &self.scratch[..])
        } else {
            (self.split.observe(data).map_err(broken)?, data)
        };
        if inputs > 0 {
            clocks.input();
        }
        vnc.write_all(bytes).await.map_err(|e| {
            Refusal::new(
                close_code::TARGET_UNREACHABLE,
                format!("lost the VM's console: {e}"),
            )
        })
    }
}

#[expect(clippy::too_many_arguments, reason = "one call site; the parts of a session")]
async fn downstream<W: AsyncWrite + Unpin>(
    mut vnc: tokio::net::tcp::OwnedReadHalf,
    mut writer: WsWriter<W>,
    server_rest: Vec<u8>,
    mut ctl: mpsc::Receiver<Control>,
    keepalive: Duration,
    idle: &IdleTimeout,
    clocks: &Clocks,
    mut shutdown: watch::Receiver<bool>,
) -> SessionEnd {
    if !server_rest.is_empty() && writer.send_binary(&server_rest).await.is_err() {
        return write_failed(&mut writer).await;
    }
    let mut buf = vec![0u8; RELAY_BUF_START];
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + keepalive, keepalive);
    let idle_check = tokio::time::sleep(next_idle_check(idle, clocks));
    tokio::pin!(idle_check);
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
                        return write_failed(&mut writer).await;
                    }
                }
                Some(Control::Close(code, reason)) => {
                    let _ = writer.close(code, &reason).await;
                    return if code == close_code::NORMAL { SessionEnd::BrowserClosed } else { SessionEnd::Failed };
                }
                None => return SessionEnd::BrowserClosed,
            },
            () = &mut idle_check => {
                if let Some(limit) = idle.get()
                    && clocks.quiet() >= limit
                {
                    let _ = writer.close(close_code::IDLE, &idle_reason(limit)).await;
                    return SessionEnd::Idle;
                }
                idle_check.as_mut().reset(tokio::time::Instant::now() + next_idle_check(idle, clocks));
            }
            _ = ticker.tick() => {
                let silent_ms = clocks.now().saturating_sub(clocks.heard.load(Ordering::Relaxed));
                if silent_ms > 3 * keepalive.as_millis() as u64 {
                    let _ = writer.close(close_code::GOING_AWAY, "browser stopped answering").await;
                    return SessionEnd::BrowserSilent;
                }
                if writer.send(Opcode::Ping, b"").await.is_err() {
                    return write_failed(&mut writer).await;
                }
            }
            read = vnc.read(&mut buf) => match read {
                Ok(0) => {
                    let _ = writer.close(close_code::NORMAL, "the VM's console closed the connection").await;
                    return SessionEnd::VncClosed;
                }
                Ok(n) => {
                    if writer.send_binary(&buf[..n]).await.is_err() {
                        return write_failed(&mut writer).await;
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

/// How a session ends after a write toward the browser failed: a timed-out write (the browser
/// stopped reading) gets a brief close attempt.
async fn write_failed<W: AsyncWrite + Unpin>(writer: &mut WsWriter<W>) -> SessionEnd {
    if writer.stalled() {
        warn!("Browser stopped reading, closing its session");
        let _ = writer
            .close(close_code::GOING_AWAY, "the browser stopped reading")
            .await;
        SessionEnd::BrowserStalled
    } else {
        SessionEnd::BrowserClosed
    }
}

/// How long until a session next looks at its idle time: when it would reach the timeout, but at
/// most [`IDLE_RECHECK`] away (the timeout may change).
fn next_idle_check(idle: &IdleTimeout, clocks: &Clocks) -> Duration {
    match idle.get() {
        Some(limit) => limit.saturating_sub(clocks.quiet()).min(IDLE_RECHECK),
        None => IDLE_RECHECK,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idle_timeout_is_shared_and_zero_is_off() {
        let idle = IdleTimeout::new(Duration::ZERO);
        assert_eq!(idle.get(), None);
        let seen_by_a_session = idle.clone();
        idle.set(Duration::from_millis(2500));
        assert_eq!(seen_by_a_session.get(), Some(Duration::from_millis(2500)));
        idle.set(Duration::MAX);
        assert_eq!(seen_by_a_session.get(), Some(Duration::from_millis(u64::MAX)));
    }

    #[test]
    fn idle_reasons_read_as_words() {
        assert_eq!(
            idle_reason(Duration::from_secs(900)),
            "no keyboard or mouse input for 15 min"
        );
        assert_eq!(spoken(Duration::from_secs(2)), "2 s");
        assert_eq!(spoken(Duration::from_secs(90)), "90 s");
        assert_eq!(spoken(Duration::from_millis(1500)), "1500 ms");
        assert!(idle_reason(Duration::from_millis(u64::MAX)).len() <= 123);
    }

    #[test]
    fn idle_checks_come_at_the_deadline_or_within_the_recheck() {
        let clocks = Clocks {
            epoch: Instant::now(),
            heard: AtomicU64::new(0),
            input: AtomicU64::new(0),
        };
        let idle = IdleTimeout::new(Duration::from_millis(300));
        assert!(next_idle_check(&idle, &clocks) <= Duration::from_millis(300));
        idle.set(Duration::from_secs(3600));
        assert_eq!(next_idle_check(&idle, &clocks), IDLE_RECHECK);
        idle.set(Duration::ZERO);
        assert_eq!(next_idle_check(&idle, &clocks), IDLE_RECHECK);
    }
}
