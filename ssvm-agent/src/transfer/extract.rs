//! Download links (`extractTemplate`, `extractIso`): `GET /download/<token>/<name>` serves the
//! installed file the sealed link names, whole or one `Range`, streamed from the store in 1 MiB
//! reads.
//!
//! Invariants: the link is opened (authentic, unexpired, for this agent's store, and for a link
//! sealed for a storage VM, on that VM's mutual-TLS connection) before the store is touched; the
//! name in the URL is cosmetic (the link decides the file). With the file's SHA-256 in the link,
//! it is the strong `ETag`, and a `Range` under a different `If-Range` gets the whole file.

use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body_util::{BodyExt as _, StreamBody};
use hyper::body::{Frame, Incoming};
use systemvm_proto::transfer::ExtractLink;
use systemvm_transfer::range::{self, Range};

use super::{Body, Transfers, empty, text};
use crate::download::BLOCK;
use crate::store::{FileId, Store};

/// The Content-Type of a file by its extension.
pub(super) fn content_type(name: &str) -> &'static str {
    let lower = name.to_ascii_lowercase();
    if lower.ends_with(".iso") {
        "application/x-iso9660-image"
    } else if lower.ends_with(".ova") {
        "application/x-tar"
    } else {
        "application/octet-stream"
    }
}

pub(super) async fn handle(
    t: &Transfers,
    rest: &str,
    req: Request<Incoming>,
    client: Option<&rustls::pki_types::CertificateDer<'static>>,
) -> Response<Body> {
    let token = rest.split_once('/').map_or(rest, |(token, _)| token);
    let Some(keys) = t.keys.get() else {
        return text(
            StatusCode::SERVICE_UNAVAILABLE,
            "this storage VM has no transfer keys from core yet",
        );
    };
    let forbidden = || {
        text(
            StatusCode::FORBIDDEN,
            "this download link is invalid or has expired",
        )
    };
    let Some(link) = ExtractLink::open(&keys, token, crate::job::now()) else {
        return forbidden();
    };
    // A link sealed for a storage VM serves only that VM's connection (its certificate).
    if let Some(vm) = &link.peer
        && !client.is_some_and(|c| crate::peer::presented(c, vm))
    {
        return forbidden();
    }
    let store = t.agent.downloader_now().store;
    if link.store_url.parse::<crate::store::StoreUrl>().ok().as_ref() != Some(store.url()) {
        return forbidden();
    }
    let (file, size) = match store.open_file(&link.file).await {
        Ok(f) => f,
        Err(e) if e.is_not_found() => return text(StatusCode::NOT_FOUND, "the file of this link is gone"),
        Err(e) => return text(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    };
    let etag = link.sha256.as_ref().map(|sha| format!("\"{sha}\""));
    // `If-Range`: the range only while the file is still the one the client has part of.
    let range_valid = match req.headers().get(header::IF_RANGE).and_then(|v| v.to_str().ok()) {
        None => true,
        Some(v) => etag.as_deref() == Some(v),
    };
    let asked = req
        .headers()
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .filter(|_| range_valid);
    let (status, start, end) = match range::parse(asked, size) {
        Range::Full => (StatusCode::OK, 0, size),
        Range::Part { start, end } => (StatusCode::PARTIAL_CONTENT, start, end + 1),
        Range::Unsatisfiable => {
            let mut resp = empty(StatusCode::RANGE_NOT_SATISFIABLE);
            if let Ok(v) = HeaderValue::from_str(&format!("bytes */{size}")) {
                resp.headers_mut().insert(header::CONTENT_RANGE, v);
            }
            return resp;
        }
    };
    let mut resp = if req.method() == http::Method::HEAD {
        empty(status)
    } else {
        let mut r = Response::new(stream(store, file, start, end));
        *r.status_mut() = status;
        r
    };
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(content_type(&link.name)),
    );
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(end - start));
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    if let Some(v) = etag.as_deref().and_then(|e| HeaderValue::from_str(e).ok()) {
        h.insert(header::ETAG, v);
    }
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("private, no-store"),
    );
    if let Ok(v) = HeaderValue::from_str(&format!(
        "attachment; filename=\"{}\"",
        link.name.replace(['"', '\\'], "_")
    )) {
        h.insert(header::CONTENT_DISPOSITION, v);
    }
    if status == StatusCode::PARTIAL_CONTENT
        && let Ok(v) = HeaderValue::from_str(&format!("bytes {start}-{}/{size}", end - 1))
    {
        h.insert(header::CONTENT_RANGE, v);
    }
    resp
}

/// Bytes `start..end` of `file`, read from the store block by block as the client takes them.
fn stream(store: Store, file: FileId, start: u64, end: u64) -> Body {
    let blocks = futures_util::stream::unfold(Some((store, file, start)), move |state| async move {
        let (store, file, pos) = state?;
        if pos >= end {
            return None;
        }
        let want = (end - pos).min(BLOCK as u64) as usize;
        match store.read_at(&file, pos, want).await {
            Ok(data) if data.is_empty() => Some((
                Err(std::io::Error::other("the file is shorter than it was")),
                None,
            )),
            Ok(data) => {
                let next = pos + data.len() as u64;
                Some((Ok(Frame::data(data)), Some((store, file, next))))
            }
            Err(e) => Some((Err(std::io::Error::other(e.to_string())), None)),
        }
    });
    StreamBody::new(blocks).boxed()
}
