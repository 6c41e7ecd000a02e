//! The storage VM's transfer server: the port browsers reach (`serve --public-listen`), for
//! uploads signed by core (`POST /upload/<id>`, CloudStack's contract, and tus 1.0 on the same
//! URL) and download links (`GET /download/<token>/<name>`, `extractTemplate`). Routes:
//!
//! | method and path | does |
//! |---|---|
//! | `OPTIONS /upload/<id>` | CORS preflight for the upload headers |
//! | `POST /upload/<id>` | multipart/form-data upload (one file part); with `Tus-Resumable`: tus creation |
//! | `HEAD /upload/<id>` | tus: the upload's offset |
//! | `PATCH /upload/<id>` | tus: bytes at `Upload-Offset` |
//! | `GET`/`HEAD /download/<token>/<name>` | an installed template or ISO, with `Range` |
//!
//! Another storage VM copying a template (`copyTemplate`) reaches the same port over mutual TLS
//! ([`crate::peer`]): its handshake names this VM's peer name, and its connection serves
//! `/download/` links sealed for that VM only.
//!
//! Invariants:
//! * every request is authorized by what core sealed with the transfer keys (an upload ticket,
//!   a download link), checked before any byte is written or read; without keys from core
//!   nothing is served (503); a forged, altered or expired credential gets 403;
//! * nothing is listed: any other path is 404, and a link names one file of this agent's store;
//! * connections are capped ([`MAX_CONNECTIONS`], [`MAX_PER_ADDRESS`] from one address) and each
//!   request's headers arrive under a deadline; uploads run at most [`MAX_UPLOADS`] at once; an
//!   unfinished upload whose ticket expired is failed and its partial file removed;
//! * a 500 never carries internal detail (it is logged);
//! * with the operator's certificate (core's `uploadCustomCertificate`), a connection that opens
//!   with a TLS handshake is served over TLS on the same port; a new certificate applies to the
//!   next handshakes and never to established connections (a running upload goes on).

mod extract;
mod upload;

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use systemvm_agent_client::tls::{ServerCert, is_tls};
use systemvm_proto::console::KeySet;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tracing::{info, warn};

use crate::service::Agent;

/// Most connections at once.
pub const MAX_CONNECTIONS: usize = 256;
/// Most uploads receiving at once.
pub const MAX_UPLOADS: usize = 32;
/// Time for a request's headers.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// A response body: small answers and streamed files alike.
pub type Body = BoxBody<Bytes, std::io::Error>;

/// The transfer keys core pushed (they open upload tickets and download links).
#[derive(Clone, Default)]
pub struct TransferKeys(Arc<RwLock<Option<KeySet>>>);

impl TransferKeys {
    /// Replaces the keys.
    pub fn set(&self, keys: KeySet) {
        *self.0.write().unwrap_or_else(PoisonError::into_inner) = Some(keys);
    }

    /// The keys, once core sent them.
    pub fn get(&self) -> Option<KeySet> {
        self.0.read().unwrap_or_else(PoisonError::into_inner).clone()
    }
}

impl std::fmt::Debug for TransferKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ids = self.get().map(|k| k.ids());
        f.debug_struct("TransferKeys").field("ids", &ids).finish()
    }
}

/// What the transfer server shares between requests.
pub struct Transfers {
    agent: Arc<Agent>,
    keys: TransferKeys,
    /// The operator's certificate core pushed: connections that open with a TLS handshake get
    /// TLS with it (plain HTTP stays for labs, `use.https.to.upload=false`).
    cert: Arc<ServerCert>,
    tls: Arc<rustls::ServerConfig>,
    /// The channel to other storage VMs: a handshake for this VM's peer name gets mutual TLS
    /// on core's CA, and serves copies only.
    peers: Arc<crate::peer::Peers>,
    /// This storage VM's id (with core): tickets for another VM are refused.
    vm_id: Option<String>,
    uploads: Arc<Semaphore>,
    /// tus uploads between their requests: the install state kept in memory.
    sessions: Mutex<HashMap<String, upload::Slot>>,
}

impl Transfers {
    /// The server's state over `agent`, opening credentials with `keys`, serving TLS with `cert`
    /// once it holds one (and to other storage VMs with `peers`); `vm_id` is this storage VM's
    /// (tickets name the VM they are for).
    pub fn new(
        agent: Arc<Agent>,
        keys: TransferKeys,
        cert: Arc<ServerCert>,
        peers: Arc<crate::peer::Peers>,
        vm_id: Option<String>,
    ) -> anyhow::Result<Arc<Self>> {
        let tls = cert.server_config().context("failed to set up TLS")?;
        Ok(Arc::new(Transfers {
            agent,
            keys,
            cert,
            tls,
            peers,
            vm_id,
            uploads: Arc::new(Semaphore::new(MAX_UPLOADS)),
            sessions: Mutex::new(HashMap::new()),
        }))
    }

    fn sessions(&self) -> std::sync::MutexGuard<'_, HashMap<String, upload::Slot>> {
        self.sessions.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Binds the transfer listener.
pub async fn bind(listen: std::net::SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(listen)
        .await
        .with_context(|| format!("failed to bind the transfer server on {listen}"))
}

/// Serves transfers on `listener` until `shutdown` resolves.
pub async fn serve(
    transfers: Arc<Transfers>,
    listener: TcpListener,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    tokio::pin!(shutdown);
    let connections = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let per_address: Arc<Mutex<HashMap<std::net::IpAddr, usize>>> = Arc::default();
    info!(addr = %listener.local_addr()?, "Transfer server listening");
    let sweeper = {
        let transfers = transfers.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(SWEEP_EVERY).await;
                upload::sweep_expired(&transfers).await;
            }
        })
    };
    let _sweeper = AbortOnDrop(sweeper);
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => accepted.context("accept failed")?,
            () = &mut shutdown => break,
        };
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            warn!(%peer, "Transfer server full, refusing a connection");
            continue;
        };
        let Some(address_slot) = AddressSlot::take(&per_address, peer.ip()) else {
            warn!(%peer, "Too many connections from one address, refusing one");
            continue;
        };
        let transfers = transfers.clone();
        tokio::spawn(async move {
            let tls =
                (transfers.cert.is_set() || transfers.peers.is_ready()) && is_tls(&tcp, HEADER_TIMEOUT).await;
            if tls {
                match tokio::time::timeout(HEADER_TIMEOUT, handshake(&transfers, tcp)).await {
                    Ok(Ok((stream, client))) => {
                        serve_connection(transfers, TokioIo::new(stream), peer, client).await;
                    }
                    Ok(Err(error)) => tracing::debug!(%peer, %error, "TLS handshake failed"),
                    Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                }
            } else {
                serve_connection(transfers, TokioIo::new(tcp), peer, None).await;
            }
            drop(permit);
            drop(address_slot);
        });
    }
    Ok(())
}

/// Unfinished uploads whose tickets expired are failed this often.
const SWEEP_EVERY: Duration = Duration::from_secs(10);

/// Most connections at once from one client address.
pub const MAX_PER_ADDRESS: usize = 64;

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// One connection's place under [`MAX_PER_ADDRESS`]; given back when dropped.
struct AddressSlot {
    map: Arc<Mutex<HashMap<std::net::IpAddr, usize>>>,
    ip: std::net::IpAddr,
}

impl AddressSlot {
    fn take(map: &Arc<Mutex<HashMap<std::net::IpAddr, usize>>>, ip: std::net::IpAddr) -> Option<Self> {
        let mut m = map.lock().unwrap_or_else(PoisonError::into_inner);
        let n = m.entry(ip).or_insert(0);
        if *n >= MAX_PER_ADDRESS {
            return None;
        }
        *n += 1;
        Some(AddressSlot { map: map.clone(), ip })
    }
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        let mut m = self.map.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = m.get_mut(&self.ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                m.remove(&self.ip);
            }
        }
    }
}

/// The verified client certificate of a connection from another storage VM.
pub(crate) type PeerClient = Option<Arc<rustls::pki_types::CertificateDer<'static>>>;

/// The TLS handshake: this VM's peer name gets the peer configuration (a client certificate
/// from core's CA required), any other name the operator's certificate.
async fn handshake(
    transfers: &Transfers,
    tcp: tokio::net::TcpStream,
) -> std::io::Result<(tokio_rustls::server::TlsStream<tokio::net::TcpStream>, PeerClient)> {
    let start = tokio_rustls::LazyConfigAcceptor::new(rustls::server::Acceptor::default(), tcp).await?;
    let sni = start.client_hello().server_name().map(str::to_owned);
    if let Some(config) = transfers.peers.server_config_for(sni.as_deref()) {
        let stream = start.into_stream(config).await?;
        let client = stream
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|c| Arc::new(c.clone().into_owned()));
        if client.is_none() {
            return Err(std::io::Error::other(
                "a peer connection without a client certificate",
            ));
        }
        return Ok((stream, client));
    }
    if !transfers.cert.is_set() {
        return Err(std::io::Error::other(
            "TLS for another name than this VM's peer name, without a certificate",
        ));
    }
    Ok((start.into_stream(transfers.tls.clone()).await?, None))
}

async fn serve_connection<I>(transfers: Arc<Transfers>, io: I, peer: std::net::SocketAddr, client: PeerClient)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let service = service_fn(move |req| {
        let transfers = transfers.clone();
        let client = client.clone();
        async move { Ok::<_, Infallible>(route(transfers, req, client).await) }
    });
    if let Err(error) = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .serve_connection(io, service)
        .await
    {
        tracing::debug!(%peer, %error, "Transfer connection ended with an error");
    }
}

async fn route(t: Arc<Transfers>, req: Request<Incoming>, client: PeerClient) -> Response<Body> {
    let path = req.uri().path().to_owned();
    let mut resp = if client.is_some() && !path.starts_with("/download/") {
        // Another storage VM's connection serves copies only.
        text(StatusCode::NOT_FOUND, "not found")
    } else if let Some(id) = path.strip_prefix("/upload/") {
        let id = id.trim_end_matches('/').to_owned();
        if !crate::job::valid_job_id(&id) {
            text(StatusCode::NOT_FOUND, "no such upload")
        } else {
            match *req.method() {
                Method::OPTIONS => preflight(),
                Method::POST | Method::HEAD | Method::PATCH => upload::handle(&t, &id, req).await,
                _ => text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed"),
            }
        }
    } else if let Some(rest) = path.strip_prefix("/download/") {
        match *req.method() {
            Method::GET | Method::HEAD => extract::handle(&t, rest, req, client.as_deref()).await,
            Method::OPTIONS => preflight(),
            _ => text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed"),
        }
    } else {
        text(StatusCode::NOT_FOUND, "not found")
    };
    cors(resp.headers_mut());
    resp
}

/// Headers a browser may send with an upload (CloudStack's and tus's).
const ALLOW_HEADERS: &str = "x-signature, x-metadata, x-expires, content-type, tus-resumable, upload-length, upload-offset, upload-metadata, x-requested-with, x-http-method-override, range";
/// Headers a browser may read from the answers.
const EXPOSE_HEADERS: &str = "location, upload-offset, upload-length, tus-resumable, tus-version, tus-extension, tus-max-size, content-range, content-length, accept-ranges";

/// Any origin may use the server: requests are authorized by their ticket or link, never by
/// cookies, so no credentials are allowed cross-origin.
fn cors(h: &mut http::HeaderMap) {
    h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, HeaderValue::from_static("*"));
    h.insert(
        header::ACCESS_CONTROL_EXPOSE_HEADERS,
        HeaderValue::from_static(EXPOSE_HEADERS),
    );
}

fn preflight() -> Response<Body> {
    let mut resp = empty(StatusCode::NO_CONTENT);
    let h = resp.headers_mut();
    h.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static("POST, PATCH, HEAD, GET, OPTIONS"),
    );
    h.insert(
        header::ACCESS_CONTROL_ALLOW_HEADERS,
        HeaderValue::from_static(ALLOW_HEADERS),
    );
    h.insert(header::ACCESS_CONTROL_MAX_AGE, HeaderValue::from_static("86400"));
    resp
}

fn full(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Response<Body> {
    let mut resp = Response::new(Full::new(body.into()).map_err(|never| match never {}).boxed());
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

fn empty(status: StatusCode) -> Response<Body> {
    let mut resp = Response::new(Full::new(Bytes::new()).map_err(|never| match never {}).boxed());
    *resp.status_mut() = status;
    resp
}

/// A JSON answer `{"status": N, "message": …}`; a 500 says only "internal error" (the detail is
/// logged).
fn text(status: StatusCode, msg: &str) -> Response<Body> {
    let msg = if status == StatusCode::INTERNAL_SERVER_ERROR {
        warn!(error = %msg, "Transfer request failed");
        "internal error"
    } else {
        msg
    };
    let body = serde_json::json!({ "status": status.as_u16(), "message": msg }).to_string();
    full(status, "application/json", body)
}
