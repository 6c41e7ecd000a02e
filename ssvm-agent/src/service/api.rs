//! The local JSON API of `ssvm-agent serve`, over an [`Agent`].
//!
//! | method and path | does |
//! |---|---|
//! | `POST /jobs` | submit a download (`{"id"?, "url", "path", "format", "checksum"?, "description"?, "epoch"?}`); 201 new, 200 same job again (a higher `epoch` is adopted), 409 same id with another spec |
//! | `GET /jobs` | every job, newest state |
//! | `GET /jobs/{id}` | one job: state, progress (bytes, total, percent, rate), result or error |
//! | `DELETE /jobs/{id}` | cancel a queued or running job |
//! | `GET /capacity` | the store's total/used/available, its health, and the job load |
//! | `GET /health` | the store's health |
//!
//! Invariants:
//! * the API listens on loopback unless told otherwise; a hung store makes `/health` say so and
//!   jobs fail with the reason, while the API keeps answering;
//! * request bodies are capped ([`MAX_BODY`]) and read with a header timeout; a 5xx answer never
//!   carries internal detail (it is logged instead).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context as _;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::Serialize;
use tokio::net::TcpListener;
use tracing::warn;

use super::{Agent, Submit};
use crate::job::valid_job_id;

/// Largest request body accepted by the API.
const MAX_BODY: usize = 64 * 1024;

/// Serves the API on `listen` until `shutdown` resolves.
pub async fn serve(
    agent: Arc<Agent>,
    listener: TcpListener,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    tokio::pin!(shutdown);
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => accepted.context("accept failed")?,
            () = &mut shutdown => break,
        };
        let agent = agent.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let agent = agent.clone();
                async move { Ok::<_, Infallible>(route(agent, req).await) }
            });
            if let Err(error) = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(10))
                .serve_connection(TokioIo::new(tcp), service)
                .await
            {
                warn!(%peer, %error, "API connection failed");
            }
        });
    }
    Ok(())
}

/// Binds the API listener.
pub async fn bind(listen: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(listen)
        .await
        .with_context(|| format!("failed to bind {listen}"))
}

fn json<T: Serialize>(status: StatusCode, value: &T) -> Response<Full<Bytes>> {
    let body = serde_json::to_vec_pretty(value).unwrap_or_else(|_| b"{}".to_vec());
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    resp
}

fn error(status: StatusCode, msg: &str) -> Response<Full<Bytes>> {
    // 5xx answers never carry internal detail.
    let text = if status.is_server_error() {
        "internal error"
    } else {
        msg
    };
    if status.is_server_error() {
        warn!(error = %msg, "API request failed");
    }
    json(status, &serde_json::json!({ "error": text }))
}

async fn route(agent: Arc<Agent>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path().trim_end_matches('/').to_owned();
    let method = req.method().clone();
    match (method, path.as_str()) {
        (Method::POST, "/jobs") => {
            let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
                Ok(b) => b.to_bytes(),
                Err(_) => return error(StatusCode::PAYLOAD_TOO_LARGE, "request body too large"),
            };
            let submit: Submit = match serde_json::from_slice(&body) {
                Ok(s) => s,
                Err(e) => return error(StatusCode::BAD_REQUEST, &format!("invalid job: {e}")),
            };
            match agent.submit(submit).await {
                Ok((status, record)) => json(status, &record),
                Err((status, msg)) => error(status, &msg),
            }
        }
        (Method::GET, "/jobs") => match agent.list().await {
            Ok(list) => json(StatusCode::OK, &list),
            Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, &format!("{e:#}")),
        },
        (Method::GET, "/capacity") => json(StatusCode::OK, &agent.capacity().await),
        (Method::GET, "/health") => json(StatusCode::OK, &agent.store_health()),
        (method, p) if p.starts_with("/jobs/") => {
            let id = &p["/jobs/".len()..];
            if !valid_job_id(id) {
                return error(StatusCode::BAD_REQUEST, "invalid job id");
            }
            match method {
                Method::GET => match agent.status(id).await {
                    Ok(Some(r)) => json(StatusCode::OK, &r),
                    Ok(None) => error(StatusCode::NOT_FOUND, "no such job"),
                    Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, &format!("{e:#}")),
                },
                Method::DELETE => {
                    if agent.cancel(id) {
                        json(
                            StatusCode::ACCEPTED,
                            &serde_json::json!({ "id": id, "cancelling": true }),
                        )
                    } else {
                        match agent.status(id).await {
                            Ok(Some(r)) => error(StatusCode::CONFLICT, &format!("job {id} is {:?}", r.state)),
                            Ok(None) => error(StatusCode::NOT_FOUND, "no such job"),
                            Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, &format!("{e:#}")),
                        }
                    }
                }
                _ => error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed"),
            }
        }
        _ => error(StatusCode::NOT_FOUND, "not found"),
    }
}
