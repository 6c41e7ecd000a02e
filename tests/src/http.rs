//! A scriptable HTTP server on loopback, on a thread of its own (usable from sync and async tests).
//!
//! Plain http, or https with a given certificate. Routes serve bytes with an ETag and honour `Range: bytes=N-` (with `If-Range`), redirect, or
//! misbehave on purpose for their first requests: drop the connection after some bytes, or stall.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::StreamBody;
use hyper::body::{Frame, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;

/// How a route misbehaves, and for how many of its first requests.
#[derive(Clone, Debug, Default)]
pub struct Faults {
    /// Close the connection after this many body bytes.
    pub drop_after: Option<u64>,
    /// Send this many body bytes, then nothing (until the client gives up).
    pub stall_after: Option<u64>,
    /// How many requests misbehave (the later ones are served properly).
    pub times: usize,
}

/// What a path serves.
#[derive(Clone, Debug)]
pub enum Route {
    /// Bytes with an ETag, Range support, optional pacing and faults.
    File {
        /// The body.
        data: Bytes,
        /// Pause after each 256 KiB sent (throttling), if any.
        pace: Option<Duration>,
        /// Misbehaviour of the first requests.
        faults: Faults,
        /// Whether Range requests are honoured.
        ranges: bool,
    },
    /// A 302 to another location.
    Redirect(String),
}

/// One request as received.
#[derive(Clone, Debug)]
pub struct Logged {
    /// Request path.
    pub path: String,
    /// Its `Range` header.
    pub range: Option<String>,
}

#[derive(Default)]
struct State {
    routes: HashMap<String, Route>,
    served: HashMap<String, usize>,
    log: Vec<Logged>,
}

/// The running server.
pub struct HttpFixture {
    /// Its address.
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
}

const CHUNK: usize = 256 * 1024;

impl HttpFixture {
    /// Starts the server on 127.0.0.1 on its own thread and runtime.
    pub fn start() -> std::io::Result<Self> {
        Self::start_with(None)
    }

    /// Starts an https server with this certificate chain and key (PEM).
    pub fn start_tls(cert_pem: &str, key_pem: &str) -> std::io::Result<Self> {
        use rustls::pki_types::pem::PemObject as _;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let bad = |e: &dyn std::fmt::Display| std::io::Error::other(e.to_string());
        let chain = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| bad(&e))?;
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| bad(&e))?;
        let config =
            rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .map_err(|e| bad(&e))?
                .with_no_client_auth()
                .with_single_cert(chain, key)
                .map_err(|e| bad(&e))?;
        Self::start_with(Some(tokio_rustls::TlsAcceptor::from(Arc::new(config))))
    }

    fn start_with(tls: Option<tokio_rustls::TlsAcceptor>) -> std::io::Result<Self> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let state = Arc::new(Mutex::new(State::default()));
        let shared = state.clone();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        std::thread::spawn(move || {
            runtime.block_on(async move {
                let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
                    return;
                };
                while let Ok((tcp, _)) = listener.accept().await {
                    let state = shared.clone();
                    let tls = tls.clone();
                    tokio::spawn(async move {
                        let service = service_fn(move |req| {
                            let state = state.clone();
                            async move { Ok::<_, Infallible>(respond(&state, &req)) }
                        });
                        let http = http1::Builder::new();
                        match tls {
                            Some(acceptor) => {
                                if let Ok(stream) = acceptor.accept(tcp).await {
                                    let _ = http.serve_connection(TokioIo::new(stream), service).await;
                                }
                            }
                            None => {
                                let _ = http.serve_connection(TokioIo::new(tcp), service).await;
                            }
                        }
                    });
                }
            });
        });
        Ok(HttpFixture { addr, state })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Adds or replaces a route.
    pub fn route(&self, path: &str, route: Route) {
        self.state().routes.insert(path.to_owned(), route);
    }

    /// Serves `data` at `path` (with Range support).
    pub fn file(&self, path: &str, data: impl Into<Bytes>) {
        self.route(
            path,
            Route::File {
                data: data.into(),
                pace: None,
                faults: Faults::default(),
                ranges: true,
            },
        );
    }

    /// The URL of a path.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// The https URL of a path, with `host` as the name (the certificate's name).
    pub fn https_url(&self, host: &str, path: &str) -> String {
        format!("https://{host}:{}{path}", self.addr.port())
    }

    /// Requests received for a path.
    pub fn requests(&self, path: &str) -> Vec<Logged> {
        self.state()
            .log
            .iter()
            .filter(|l| l.path == path)
            .cloned()
            .collect()
    }
}

type Body = StreamBody<futures_channel_stream::Receiver>;

fn respond(state: &Arc<Mutex<State>>, req: &Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_owned();
    let range = req
        .headers()
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let if_range = req
        .headers()
        .get(header::IF_RANGE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let (route, nth) = {
        let mut st = state.lock().unwrap_or_else(PoisonError::into_inner);
        st.log.push(Logged {
            path: path.clone(),
            range: range.clone(),
        });
        let nth = st.served.entry(path.clone()).or_insert(0);
        *nth += 1;
        let nth = *nth;
        (st.routes.get(&path).cloned(), nth)
    };
    let (tx, body) = futures_channel_stream::channel();
    let mut resp = Response::new(StreamBody::new(body));
    match route {
        None => *resp.status_mut() = StatusCode::NOT_FOUND,
        Some(Route::Redirect(to)) => {
            *resp.status_mut() = StatusCode::FOUND;
            if let Ok(v) = header::HeaderValue::from_str(&to) {
                resp.headers_mut().insert(header::LOCATION, v);
            }
        }
        Some(Route::File {
            data,
            pace,
            faults,
            ranges,
        }) => {
            let etag = format!("\"{:x}-{}\"", data.len(), data.first().copied().unwrap_or(0));
            let start = range
                .as_deref()
                .filter(|_| ranges && if_range.as_deref().is_none_or(|v| v == etag))
                .and_then(|r| r.strip_prefix("bytes="))
                .and_then(|r| r.strip_suffix('-'))
                .and_then(|n| n.parse::<usize>().ok())
                .filter(|n| *n < data.len());
            let h = resp.headers_mut();
            if let Ok(v) = header::HeaderValue::from_str(&etag) {
                h.insert(header::ETAG, v);
            }
            if ranges {
                h.insert(header::ACCEPT_RANGES, header::HeaderValue::from_static("bytes"));
            }
            let body = match start {
                Some(n) => {
                    *resp.status_mut() = StatusCode::PARTIAL_CONTENT;
                    let cr = format!("bytes {n}-{}/{}", data.len() - 1, data.len());
                    if let Ok(v) = header::HeaderValue::from_str(&cr) {
                        resp.headers_mut().insert(header::CONTENT_RANGE, v);
                    }
                    data.slice(n..)
                }
                None => data,
            };
            if let Ok(v) = header::HeaderValue::from_str(&body.len().to_string()) {
                resp.headers_mut().insert(header::CONTENT_LENGTH, v);
            }
            let faulty = nth <= faults.times;
            tokio::spawn(async move {
                let mut sent = 0u64;
                for piece in body.chunks(CHUNK) {
                    let mut piece = body.slice_ref(piece);
                    if faulty {
                        if let Some(limit) = faults.drop_after.filter(|l| sent + piece.len() as u64 > *l) {
                            let keep = (limit - sent) as usize;
                            let _ = tx.send(Ok(Frame::data(piece.slice(..keep)))).await;
                            let _ = tx.send(Err(std::io::Error::other("dropped on purpose"))).await;
                            return;
                        }
                        if let Some(limit) = faults.stall_after.filter(|l| sent + piece.len() as u64 > *l) {
                            let keep = (limit - sent) as usize;
                            piece = piece.slice(..keep);
                            let _ = tx.send(Ok(Frame::data(piece))).await;
                            // Hold the connection open without sending, until the client leaves.
                            tx.closed().await;
                            return;
                        }
                    }
                    sent += piece.len() as u64;
                    if tx.send(Ok(Frame::data(piece))).await.is_err() {
                        return;
                    }
                    if let Some(p) = pace {
                        tokio::time::sleep(p).await;
                    }
                }
            });
        }
    }
    resp
}

/// A bounded channel as an HTTP body stream.
mod futures_channel_stream {
    use std::pin::Pin;
    use std::task::{Context, Poll};

    use bytes::Bytes;
    use hyper::body::Frame;
    use tokio::sync::mpsc;

    pub(super) type Item = Result<Frame<Bytes>, std::io::Error>;

    pub(super) fn channel() -> (mpsc::Sender<Item>, Receiver) {
        let (tx, rx) = mpsc::channel(4);
        (tx, Receiver(rx))
    }

    /// The receiving half, a `Stream` of body frames.
    pub(super) struct Receiver(mpsc::Receiver<Item>);

    impl futures_core::Stream for Receiver {
        type Item = Item;
        fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Item>> {
            self.0.poll_recv(cx)
        }
    }
}
