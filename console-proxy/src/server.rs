//! The public listener: TLS, HTTP routing, the WebSocket upgrade, and session tasks.
//!
//! Invariants:
//! * a connection gets [`REQUEST_TIMEOUT`] for its TLS handshake and for each request's headers
//!   (also while idle between requests);
//! * at most `max_sessions × 2 + 64` connections are in their HTTP phase at once; at that limit a
//!   new connection closes the oldest one that has not sent a complete request yet (else the oldest
//!   of all) to make room, so a flood of slow or silent connections cannot lock browsers out;
//! * a session slot is taken only by an authorized upgrade, and the link is spent only once the
//!   session is accepted ([`session::run`]).

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use systemvm_agent_client::tls::{CertError, ServerCert, is_tls};
use systemvm_proto::console::KeySet;
use tokio::io::{AsyncRead, AsyncWrite, ReadHalf, WriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::task::{AbortHandle, JoinSet};
use tracing::{Instrument as _, debug, info, info_span, warn};

use crate::config::ProxyConfig;
use crate::replay::ReplayStore;
use crate::session::{self, ClientInfo, IdleTimeout, Pending, Refusal};
use crate::transport::{WsReader, WsWriter};
use crate::web;

/// Time allowed for a TLS handshake and for an HTTP request's headers.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Time sessions get to close cleanly at shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

struct Shared {
    config: ProxyConfig,
    keys: RwLock<KeySet>,
    /// Claims session ids from core when linked to one.
    claimer: RwLock<Option<systemvm_agent_client::Claimer>>,
    replay: ReplayStore,
    /// The idle timeout every session reads (starts as `config.idle_timeout`).
    idle: IdleTimeout,
    sessions: Arc<Semaphore>,
    connections: Arc<Semaphore>,
    /// Connections in their HTTP phase, to close one when the limit is reached.
    http: Mutex<HttpConns>,
    shutdown: watch::Receiver<bool>,
    /// The certificate core pushes (`uploadCustomCertificate`): with it, connections that open
    /// with a TLS handshake get TLS on the same port (when no `--tls-cert` is set).
    pushed_cert: Arc<ServerCert>,
    pushed_tls: Arc<rustls::ServerConfig>,
}

/// Connections in their HTTP phase (not yet upgraded, or serving pages), by age, each with its
/// place under the connection limit.
#[derive(Default)]
struct HttpConns {
    next: u64,
    /// No complete request yet (TLS handshake, headers on their way): closed first.
    fresh: BTreeMap<u64, HttpConn>,
    /// Sent a request.
    serving: BTreeMap<u64, HttpConn>,
}

struct HttpConn {
    task: AbortHandle,
    place: OwnedSemaphorePermit,
}

impl Shared {
    fn http(&self) -> std::sync::MutexGuard<'_, HttpConns> {
        self.http.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Connection `id` sent a complete request.
    fn requested(&self, id: u64) {
        let mut http = self.http();
        if let Some(conn) = http.fresh.remove(&id) {
            http.serving.insert(id, conn);
        }
    }

    /// Connection `id` left its HTTP phase (closed or upgraded): its place is free.
    fn left_http(&self, id: u64) {
        let mut http = self.http();
        http.fresh.remove(&id);
        http.serving.remove(&id);
    }
}

/// A proxy serving in the background (tests and embedding); dropping it does not stop it, call
/// [`RunningProxy::shutdown`].
pub struct RunningProxy {
    /// The bound address of the public listener.
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl RunningProxy {
    /// Session slots in use: console sessions open or being set up.
    pub fn active_sessions(&self) -> usize {
        self.shared.config.max_sessions - self.shared.sessions.available_permits()
    }

    /// Installs a certificate core pushed (serial order; a bad one is refused and the current one
    /// kept). Established TLS sessions keep theirs; the next handshakes get it.
    pub fn set_certificate(&self, chain_pem: &str, key_pem: &str, serial: u64) -> Result<bool, CertError> {
        self.shared.pushed_cert.set_pem(chain_pem, key_pem, serial)
    }

    /// Replaces the token keys (rotation); sessions already open are not affected.
    pub fn set_keys(&self, keys: KeySet) {
        *self.shared.keys.write().unwrap_or_else(PoisonError::into_inner) = keys;
    }

    /// Sets the idle timeout (zero: off) of new sessions and, within
    /// [`session::IDLE_RECHECK`], of running ones (measured from their last input).
    pub fn set_idle_timeout(&self, limit: Duration) {
        self.shared.idle.set(limit);
    }

    /// The idle timeout now; `None` when off.
    pub fn idle_timeout(&self) -> Option<Duration> {
        self.shared.idle.get()
    }

    /// The idle timeout the proxy was configured with (`--idle-timeout`, the config file).
    pub fn configured_idle_timeout(&self) -> Duration {
        self.shared.config.idle_timeout
    }

    /// Makes every new session claim its id from core first (`serve --core`).
    pub fn set_claimer(&self, claimer: systemvm_agent_client::Claimer) {
        *self
            .shared
            .claimer
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Some(claimer);
    }

    /// Stops accepting, closes open sessions with code 1001, and waits for them (bounded).
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

/// Validates the configuration, binds the listener and serves in the background.
pub async fn start(config: ProxyConfig) -> anyhow::Result<RunningProxy> {
    config.validate()?;
    let listener = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("failed to bind {}", config.listen))?;
    let addr = listener.local_addr()?;
    let (stop, shutdown) = watch::channel(false);
    let pushed_cert = ServerCert::new();
    let pushed_tls = pushed_cert
        .server_config()
        .context("failed to set up TLS for pushed certificates")?;
    let shared = Arc::new(Shared {
        pushed_cert,
        pushed_tls,
        keys: RwLock::new(config.keys.clone()),
        replay: ReplayStore::default(),
        idle: IdleTimeout::new(config.idle_timeout),
        claimer: RwLock::new(None),
        sessions: Arc::new(Semaphore::new(config.max_sessions)),
        connections: Arc::new(Semaphore::new(
            config.max_sessions.saturating_mul(2).saturating_add(64),
        )),
        http: Mutex::default(),
        shutdown,
        config,
    });
    info!(%addr, tls = shared.config.tls.is_some(), web = %shared.config.web_root.display(), "Console proxy listening");
    let task = tokio::spawn(accept_loop(listener, shared.clone()));
    Ok(RunningProxy {
        addr,
        shared,
        stop,
        task,
    })
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    let mut shutdown = shared.shutdown.clone();
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            _ = shutdown.changed() => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok((tcp, peer)) => {
                    let permit = match shared.connections.clone().try_acquire_owned() {
                        Ok(permit) => permit,
                        Err(_) => match make_room(&shared) {
                            Some(permit) => permit,
                            None => {
                                debug!(%peer, "Connection limit reached, dropping connection");
                                continue;
                            }
                        },
                    };
                    // Registered before the task can run, so that it finds itself to leave.
                    let mut http = shared.http();
                    let id = http.next;
                    http.next += 1;
                    let task_shared = shared.clone();
                    let task = conns.spawn(
                        async move { handle_connection(task_shared, tcp, peer, id).await }
                            .instrument(info_span!("conn", %peer)),
                    );
                    http.fresh.insert(id, HttpConn { task, place: permit });
                }
                Err(error) => {
                    // Out of descriptors and the like: back off instead of spinning.
                    warn!(%error, "Accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
    drop(listener);
    if tokio::time::timeout(SHUTDOWN_GRACE, async {
        while conns.join_next().await.is_some() {}
    })
    .await
    .is_err()
    {
        warn!(
            left = conns.len(),
            "Connections still open after the shutdown grace period, aborting them"
        );
        conns.shutdown().await;
    }
    // Sessions hold a permit each; they saw the shutdown signal and close with code 1001.
    let all = u32::try_from(shared.config.max_sessions).unwrap_or(u32::MAX);
    if tokio::time::timeout(SHUTDOWN_GRACE, shared.sessions.acquire_many(all))
        .await
        .is_err()
    {
        warn!("Console sessions still open after the shutdown grace period");
    }
    info!("Console proxy stopped");
}

/// At the connection limit: closes the oldest connection without a complete request (else the
/// oldest in its HTTP phase) and hands its place on. (Its socket closes when its task next runs.)
fn make_room(shared: &Shared) -> Option<OwnedSemaphorePermit> {
    let victim = {
        let mut http = shared.http();
        match http.fresh.pop_first() {
            Some((_, conn)) => conn,
            None => http.serving.pop_first()?.1,
        }
    };
    victim.task.abort();
    debug!("Connection limit reached, closed the oldest waiting connection");
    Some(victim.place)
}

/// Takes a connection out of [`HttpConns`] when its task ends (however it ends).
struct HttpPhase {
    shared: Arc<Shared>,
    id: u64,
}

impl Drop for HttpPhase {
    fn drop(&mut self) {
        self.shared.left_http(self.id);
    }
}

async fn handle_connection(shared: Arc<Shared>, tcp: TcpStream, peer: SocketAddr, id: u64) {
    let _phase = HttpPhase {
        shared: shared.clone(),
        id,
    };
    let _ = tcp.set_nodelay(true);
    let tls = match shared.config.tls.clone() {
        Some(tls) => Some(tls),
        None if shared.pushed_cert.is_set() && is_tls(&tcp, REQUEST_TIMEOUT).await => {
            Some(shared.pushed_tls.clone())
        }
        None => None,
    };
    match tls {
        Some(tls) => {
            let acceptor = tokio_rustls::TlsAcceptor::from(tls);
            match tokio::time::timeout(REQUEST_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(stream)) => serve_http(shared, stream, peer, true, id).await,
                Ok(Err(error)) => debug!(%error, "TLS handshake failed"),
                Err(_) => debug!("TLS handshake timed out"),
            }
        }
        None => serve_http(shared, tcp, peer, false, id).await,
    }
}

/// A browser stream that splits into halves for the two relay directions.
pub trait BrowserStream: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    /// Read half.
    type Read: AsyncRead + Unpin + Send + 'static;
    /// Write half.
    type Write: AsyncWrite + Unpin + Send + 'static;
    /// Splits the stream.
    fn split_halves(self) -> (Self::Read, Self::Write);
}

impl BrowserStream for TcpStream {
    type Read = tokio::net::tcp::OwnedReadHalf;
    type Write = tokio::net::tcp::OwnedWriteHalf;
    fn split_halves(self) -> (Self::Read, Self::Write) {
        self.into_split()
    }
}

type TlsStream = tokio_rustls::server::TlsStream<TcpStream>;

impl BrowserStream for TlsStream {
    type Read = ReadHalf<TlsStream>;
    type Write = WriteHalf<TlsStream>;
    fn split_halves(self) -> (Self::Read, Self::Write) {
        tokio::io::split(self)
    }
}

async fn serve_http<S: BrowserStream>(shared: Arc<Shared>, io: S, peer: SocketAddr, tls: bool, id: u64) {
    let service = service_fn(move |req| {
        let shared = shared.clone();
        shared.requested(id);
        async move { Ok::<_, Infallible>(route::<S>(shared, req, peer, tls).await) }
    });
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(REQUEST_TIMEOUT)
        .max_buf_size(64 * 1024)
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades();
    if let Err(error) = conn.await {
        debug!(%error, "HTTP connection ended with an error");
    }
}

async fn route<S: BrowserStream>(
    shared: Arc<Shared>,
    req: Request<Incoming>,
    peer: SocketAddr,
    tls: bool,
) -> Response<Full<Bytes>> {
    if req.uri().path() == "/websockify" {
        return websocket::<S>(shared, req, peer, tls);
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed");
    }
    let Some(asset) = web::resolve(&shared.config.web_root, req.uri().path()) else {
        return text(
            StatusCode::NOT_FOUND,
            "not found: open a console link issued by the management server",
        );
    };
    match web::read(&asset).await {
        Ok(body) => {
            let mut resp = Response::new(Full::new(Bytes::from(body)));
            let h = resp.headers_mut();
            h.insert(header::CONTENT_TYPE, HeaderValue::from_static(asset.content_type));
            h.insert(
                header::X_CONTENT_TYPE_OPTIONS,
                HeaderValue::from_static("nosniff"),
            );
            // The page URL carries the token: never send it on as a Referer.
            h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
            if asset.cacheable {
                h.insert(
                    header::CACHE_CONTROL,
                    HeaderValue::from_static("public, max-age=3600"),
                );
            } else {
                h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
                h.insert(
                    header::CONTENT_SECURITY_POLICY,
                    HeaderValue::from_static(web::PAGE_CSP),
                );
            }
            resp
        }
        Err(error) => {
            debug!(error = %format!("{error:#}"), "Asset unavailable");
            text(StatusCode::NOT_FOUND, "not found")
        }
    }
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

fn header_str(req: &Request<Incoming>, name: header::HeaderName) -> Option<&str> {
    req.headers().get(name).and_then(|v| v.to_str().ok())
}

fn has_token(value: Option<&str>, token: &str) -> bool {
    value.is_some_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
}

/// Answers the WebSocket upgrade at `/websockify?token=…` and runs the session in its own task.
/// A refused token still gets the upgrade, so the browser reads the refusal as a close reason.
fn websocket<S: BrowserStream>(
    shared: Arc<Shared>,
    mut req: Request<Incoming>,
    peer: SocketAddr,
    tls: bool,
) -> Response<Full<Bytes>> {
    if req.method() != Method::GET
        || !has_token(header_str(&req, header::CONNECTION), "upgrade")
        || !has_token(header_str(&req, header::UPGRADE), "websocket")
    {
        return text(StatusCode::BAD_REQUEST, "expected a WebSocket upgrade");
    }
    if header_str(&req, header::SEC_WEBSOCKET_VERSION) != Some("13") {
        let mut resp = text(StatusCode::UPGRADE_REQUIRED, "WebSocket version 13 required");
        resp.headers_mut()
            .insert(header::SEC_WEBSOCKET_VERSION, HeaderValue::from_static("13"));
        return resp;
    }
    let Some(key) = req.headers().get(header::SEC_WEBSOCKET_KEY) else {
        return text(StatusCode::BAD_REQUEST, "missing Sec-WebSocket-Key");
    };
    let accept = tungstenite::handshake::derive_accept_key(key.as_bytes());
    let binary = has_token(header_str(&req, header::SEC_WEBSOCKET_PROTOCOL), "binary");

    let client = ClientInfo {
        token: req.uri().query().and_then(|q| {
            q.split('&')
                .find_map(|kv| kv.strip_prefix("token="))
                .map(str::to_owned)
        }),
        origin: header_str(&req, header::ORIGIN).map(str::to_owned),
        host: header_str(&req, header::HOST).map(str::to_owned),
        peer,
        tls,
    };
    let verdict = {
        let keys = shared.keys.read().unwrap_or_else(PoisonError::into_inner);
        session::authorize(&shared.config, &keys, &shared.replay, &client, crate::unix_now())
    };
    let span = match &verdict {
        Ok(claims) => info_span!("console", session.id = %claims.session_id, vm.id = %claims.vm.id,
                                 target = claims.target.kind(), %peer),
        Err(_) => info_span!("console", %peer),
    };
    // A slot for an authorized session only; its link is not spent until the session is accepted,
    // and this attempt replaces an earlier one with the same link that was not accepted yet.
    let admitted = verdict.and_then(|claims| {
        let permit = shared.sessions.clone().try_acquire_owned().map_err(|_| Refusal {
            code: systemvm_proto::ws::close_code::BUSY,
            reason: "console proxy is at its session limit, try again later".into(),
        })?;
        let attempt = shared
            .replay
            .begin(&claims.session_id)
            .map_err(session::claim_refusal)?;
        Ok((claims, attempt, permit))
    });
    let upgrade = hyper::upgrade::on(&mut req);
    let task_shared = shared.clone();
    tokio::spawn(
        async move {
            let upgraded = match upgrade.await {
                Ok(u) => u,
                Err(error) => {
                    debug!(%error, "WebSocket upgrade failed");
                    return;
                }
            };
            let parts = match upgraded.downcast::<TokioIo<S>>() {
                Ok(parts) => parts,
                Err(_) => {
                    warn!("Upgraded connection has an unexpected type");
                    return;
                }
            };
            let (read, write) = parts.io.into_inner().split_halves();
            let reader = WsReader::new(read, &parts.read_buf);
            let mut writer = WsWriter::new(write, task_shared.config.write_timeout);
            match admitted {
                Ok((claims, attempt, _permit)) => {
                    info!("Console session opening");
                    let claimer = task_shared
                        .claimer
                        .read()
                        .unwrap_or_else(PoisonError::into_inner)
                        .clone();
                    let pending = Pending {
                        claims,
                        attempt,
                        claimer,
                    };
                    let shutdown = task_shared.shutdown.clone();
                    session::run(
                        &task_shared.config,
                        &task_shared.idle,
                        pending,
                        reader,
                        writer,
                        shutdown,
                    )
                    .await;
                }
                Err(refusal) => {
                    warn!(code = refusal.code, reason = %refusal.reason, "Console session refused");
                    let _ = writer.close(refusal.code, &refusal.reason).await;
                }
            }
        }
        .instrument(span),
    );

    let mut resp = Response::new(Full::new(Bytes::new()));
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = resp.headers_mut();
    h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    if let Ok(v) = HeaderValue::from_str(&accept) {
        h.insert(header::SEC_WEBSOCKET_ACCEPT, v);
    }
    if binary {
        h.insert(header::SEC_WEBSOCKET_PROTOCOL, HeaderValue::from_static("binary"));
    }
    resp
}
