//! Uploads from browsers into the store, through the same pipeline as downloads (inspection,
//! checksum, `.part`, rename, `template.properties` last; see [`crate::download`]).
//!
//! - `POST /upload/<id>` with `multipart/form-data`: CloudStack's one-shot upload (the Mold UI's
//!   "Upload from local"); the one file part is streamed into the store.
//! - tus 1.0 on the same URL: `POST` with `Tus-Resumable` and `Upload-Length` creates the upload,
//!   `HEAD` tells its offset, `PATCH` appends at `Upload-Offset`. Between requests the hashes, the
//!   inspector and the offset stay in memory; the part file is flushed and its length journalled
//!   at least every [`FLUSH_EVERY`] or [`FLUSH_BYTES`] and at the last PATCH, so after a restart of
//!   the storage VM `HEAD` answers that journalled offset (at most that much behind; tus clients
//!   re-send from what `HEAD` says) and the state is rebuilt from the part file.
//!
//! Invariants:
//! * an upload id is used once: the first request that creates its job wins (under the runner's
//!   submit lock), every later creation is refused with 409; a finished upload never restarts;
//! * the declared size (Content-Length, Upload-Length) is checked against the ticket's limit
//!   before a byte is read, and the received bytes again as they arrive;
//! * a failed upload removes its part file and says why in its job record (core shows it);
//!   nothing that fails looks installed;
//! * one request writes an upload at a time (a second one gets 409 while the first runs).

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{Stream, TryStreamExt as _};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header};
use hyper::body::Incoming;
use systemvm_proto::transfer::UploadTicket;
use systemvm_transfer::multipart::{self, FilePart, MultipartError};
use systemvm_transfer::{tus, upload_headers};
use tracing::{info, warn};

use super::{Body, Transfers, empty, full, text};
use crate::checksum::Checksum;
use crate::download::{DownloadError, Downloader, Feed, FetchTask, InstallState};
use crate::job::{DownloadSpec, Installed, JobRecord, JobState};
use crate::store::FileId;

/// Room for the multipart envelope (boundaries, part headers, small text fields) above the
/// file's own limit when the Content-Length is checked.
pub(super) const MULTIPART_SLACK: u64 = 1 << 20;

/// A tus upload's part file is flushed (its resume point moved) at least this often, and at its
/// last PATCH.
pub(super) const FLUSH_EVERY: Duration = Duration::from_secs(1);

/// …and at least every this many bytes.
pub(super) const FLUSH_BYTES: u64 = 16 << 20;

/// A tus upload between its requests.
pub(super) struct Session {
    state: InstallState,
    file: FileId,
    dir: String,
    expected: Option<Checksum>,
    /// When, and at which offset, the part file was last flushed (the resume point a restart
    /// comes back to).
    flushed: (Instant, u64),
}

/// The slot of an upload in the session map: `None` while a request holds the session.
pub(super) type Slot = Option<Session>;

pub(super) async fn handle(t: &Arc<Transfers>, id: &str, req: Request<Incoming>) -> Response<Body> {
    let Some(keys) = t.keys.get() else {
        return text(
            StatusCode::SERVICE_UNAVAILABLE,
            "this storage VM has no transfer keys from core yet",
        );
    };
    let h = upload_headers(req.headers());
    let ticket = match UploadTicket::open(
        &keys,
        id,
        &h.metadata,
        &h.signature,
        &h.expires,
        crate::job::now(),
    ) {
        Ok(ticket) => ticket,
        Err(e) => {
            warn!(upload = id, error = %e, "Upload refused");
            return text(StatusCode::FORBIDDEN, &e.to_string());
        }
    };
    if let Some(me) = &t.vm_id
        && !ticket.vm_id.is_empty()
        && &ticket.vm_id != me
    {
        return text(
            StatusCode::MISDIRECTED_REQUEST,
            "this upload is for another storage VM",
        );
    }
    if ticket.store_url.parse::<crate::store::StoreUrl>().ok().as_ref() != Some(t.agent.store_url()) {
        return text(
            StatusCode::MISDIRECTED_REQUEST,
            &format!(
                "this storage VM serves {}, not the upload's store",
                t.agent.store_url()
            ),
        );
    }
    let tus = req.headers().contains_key("tus-resumable");
    let mut resp = match (req.method().clone(), tus) {
        (Method::POST, false) => single(t, &ticket, req).await,
        (Method::POST, true) => create(t, &ticket, req.headers()).await,
        (Method::HEAD, _) => offset(t, &ticket).await,
        _ => patch(t, &ticket, req).await,
    };
    if tus {
        resp.headers_mut()
            .insert("tus-resumable", HeaderValue::from_static(tus::VERSION));
    }
    resp
}

fn too_large(ticket: &UploadTicket) -> String {
    let why = if ticket.limit_reason.is_empty() {
        "the upload limit"
    } else {
        &ticket.limit_reason
    };
    format!(
        "the upload is larger than {why} allows ({} bytes)",
        ticket.max_bytes
    )
}

/// Creates the upload's job, once per id.
async fn begin(
    t: &Transfers,
    ticket: &UploadTicket,
    total: u64,
    resumable: bool,
) -> Result<JobRecord, Response<Body>> {
    let d = t.agent.downloader_now();
    let _serial = t.agent.serial().await;
    match d.journal.load(&ticket.id).await {
        Ok(Some(_)) => {
            return Err(text(
                StatusCode::CONFLICT,
                "this upload was already used: ask for new upload parameters",
            ));
        }
        Ok(None) => {}
        Err(e) => return Err(text(StatusCode::INTERNAL_SERVER_ERROR, &format!("{e:#}"))),
    }
    let spec = DownloadSpec {
        url: ticket.post_url.clone(),
        path: ticket.path.clone(),
        format: ticket.format.clone(),
        checksum: ticket.checksum.clone(),
        description: ticket.description.clone(),
        upload: true,
        resumable,
        expires: ticket.expires,
        peer: None,
    };
    if let Err(e) = spec.validate() {
        return Err(text(StatusCode::BAD_REQUEST, &format!("{e:#}")));
    }
    let mut record = JobRecord::new(&ticket.id, spec, &t.agent.store_url().to_string());
    record.epoch = ticket.epoch;
    record.state = JobState::Running;
    record.progress.total = Some(total);
    if let Err(e) = d.journal.save(&record).await {
        return Err(text(StatusCode::INTERNAL_SERVER_ERROR, &format!("{e:#}")));
    }
    info!(upload = %ticket.id, path = %ticket.path, total, "Upload started");
    Ok(record)
}

fn content_length(h: &HeaderMap) -> Option<u64> {
    h.get(header::CONTENT_LENGTH)?.to_str().ok()?.trim().parse().ok()
}

fn body_stream(body: Incoming) -> impl Stream<Item = Result<Bytes, hyper::Error>> + Send + 'static {
    http_body_util::BodyStream::new(body)
        .try_filter_map(|frame| futures_util::future::ready(Ok(frame.into_data().ok())))
}

fn file_stream(
    body: Incoming,
    boundary: String,
) -> impl Stream<Item = Result<Bytes, MultipartError>> + Send + 'static {
    let part = FilePart::new(body_stream(body), boundary);
    futures_util::stream::unfold(Some(part), |part| async move {
        let mut part = part?;
        match part.next_chunk().await {
            Ok(Some(chunk)) => Some((Ok(chunk), Some(part))),
            Ok(None) => None,
            Err(e) => Some((Err(e), None)),
        }
    })
}

fn fetch(d: &Downloader, ticket: &UploadTicket, state: &mut InstallState, limit: u64) -> FetchTask {
    FetchTask {
        hasher: state.download_hasher.take(),
        stall: d.settings.stall_timeout,
        max: limit.min(ticket.max_bytes).min(d.settings.max_size),
        bytes: state.written,
    }
}

/// CloudStack's one-shot multipart upload.
async fn single(t: &Transfers, ticket: &UploadTicket, req: Request<Incoming>) -> Response<Body> {
    let Some(len) = content_length(req.headers()) else {
        return text(StatusCode::LENGTH_REQUIRED, "Content-Length is required");
    };
    if len > ticket.max_bytes.saturating_add(MULTIPART_SLACK) {
        return text(StatusCode::PAYLOAD_TOO_LARGE, &too_large(ticket));
    }
    let content_type = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let boundary = match multipart::boundary(content_type) {
        Ok(b) => b,
        Err(e) => return text(StatusCode::BAD_REQUEST, &e.to_string()),
    };
    let Ok(_permit) = t.uploads.clone().try_acquire_owned() else {
        return text(
            StatusCode::TOO_MANY_REQUESTS,
            "too many uploads at once; retry later",
        );
    };
    let mut record = match begin(t, ticket, len, false).await {
        Ok(r) => r,
        Err(resp) => return resp,
    };
    let d = t.agent.downloader_now();
    let (live, cancel) = t.agent.track(&record);
    let result = async {
        let (dir, file, mut state, expected) = d.prepare(&mut record, &live, &cancel).await?;
        let fetch = fetch(&d, ticket, &mut state, u64::MAX);
        let feed = Feed::spawn(
            file_stream(req.into_body(), boundary),
            fetch,
            Some(len),
            false,
            true,
        );
        let (hasher, _) = d
            .pump(&mut record, &live, &cancel, &dir, &file, &mut state, feed)
            .await?;
        d.install(&mut record, &live, &dir, &mut state, hasher, expected.as_ref())
            .await
    }
    .await;
    t.agent.untrack(&record.id);
    finish(&d, &mut record, result, ticket).await
}

/// Ends an upload's job with its result and answers the request.
async fn finish(
    d: &Downloader,
    record: &mut JobRecord,
    result: Result<Installed, DownloadError>,
    ticket: &UploadTicket,
) -> Response<Body> {
    match result {
        Ok(installed) => {
            info!(upload = %record.id, file = %installed.file, "Upload installed");
            let body = serde_json::json!({
                "id": record.id,
                "state": "completed",
                "file": installed.file,
                "format": installed.format,
                "size": installed.physical_size,
                "virtualsize": installed.virtual_size,
                "sha256": installed.installed_sha256,
            });
            record.state = JobState::Completed;
            record.error = None;
            record.installed = Some(installed);
            d.save(record).await;
            let mut resp = full(StatusCode::OK, "application/json", body.to_string());
            if let Some(total) = record.progress.total {
                resp.headers_mut()
                    .insert("upload-offset", HeaderValue::from(total));
            }
            resp
        }
        Err(e) => {
            let fenced = matches!(e, DownloadError::Fenced);
            let (status, msg) = match e {
                DownloadError::TooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, too_large(ticket)),
                DownloadError::Permanent(m) if m.contains("no space") => {
                    (StatusCode::INSUFFICIENT_STORAGE, m)
                }
                DownloadError::Permanent(m) => (StatusCode::UNPROCESSABLE_ENTITY, m),
                DownloadError::Transient(m) => (StatusCode::BAD_REQUEST, format!("upload failed: {m}")),
                DownloadError::Cancelled => (StatusCode::CONFLICT, "the upload was cancelled".to_owned()),
                DownloadError::Fenced => (
                    StatusCode::CONFLICT,
                    "the template was deleted during the upload".to_owned(),
                ),
            };
            warn!(upload = %record.id, %status, error = %msg, "Upload failed");
            record.state = JobState::Failed;
            record.error = Some(msg.clone());
            d.discard_part(record).await;
            if !fenced && record.epoch > 0 && record.epoch_recorded {
                let _ =
                    crate::fence::forget(&d.store, record.spec.path.trim_matches('/'), record.epoch).await;
            }
            d.save(record).await;
            text(status, &msg)
        }
    }
}

/// tus creation.
async fn create(t: &Transfers, ticket: &UploadTicket, h: &HeaderMap) -> Response<Body> {
    let header = |name: &str| h.get(name).and_then(|v| v.to_str().ok());
    if let Err(e) = tus::check_version(header("tus-resumable")) {
        return text(StatusCode::PRECONDITION_FAILED, &e.to_string());
    }
    let total = match tus::number("Upload-Length", header("upload-length")) {
        Ok(n) => n,
        Err(e) => return text(StatusCode::BAD_REQUEST, &e.to_string()),
    };
    if let Some(m) = header("upload-metadata")
        && let Err(e) = tus::metadata(m)
    {
        return text(StatusCode::BAD_REQUEST, &e.to_string());
    }
    if total > ticket.max_bytes {
        return text(StatusCode::PAYLOAD_TOO_LARGE, &too_large(ticket));
    }
    let mut record = match begin(t, ticket, total, true).await {
        Ok(r) => r,
        Err(resp) => return resp,
    };
    let d = t.agent.downloader_now();
    let (live, cancel) = t.agent.track(&record);
    let prepared = d.prepare(&mut record, &live, &cancel).await;
    t.agent.untrack(&record.id);
    match prepared {
        Ok((dir, file, state, expected)) => {
            d.save(&record).await;
            t.sessions().insert(
                ticket.id.clone(),
                Some(Session {
                    state,
                    file,
                    dir,
                    expected,
                    flushed: (Instant::now(), 0),
                }),
            );
            let mut resp = empty(StatusCode::CREATED);
            if let Ok(v) = HeaderValue::from_str(&ticket.post_url) {
                resp.headers_mut().insert(header::LOCATION, v);
            }
            resp.headers_mut()
                .insert("upload-offset", HeaderValue::from(0u64));
            resp
        }
        Err(e) => finish(&d, &mut record, Err(e), ticket).await,
    }
}

/// The upload's job, when it is an upload of this agent.
async fn upload_record(t: &Transfers, id: &str) -> Result<JobRecord, Response<Body>> {
    match t.agent.downloader_now().journal.load(id).await {
        Ok(Some(r)) if r.spec.upload => Ok(r),
        Ok(_) => Err(text(StatusCode::NOT_FOUND, "no such upload: create it first")),
        Err(e) => Err(text(StatusCode::INTERNAL_SERVER_ERROR, &format!("{e:#}"))),
    }
}

fn ended(record: &JobRecord) -> Option<Response<Body>> {
    match record.state {
        JobState::Failed | JobState::Cancelled => Some(text(
            StatusCode::GONE,
            &format!(
                "the upload failed: {}",
                record.error.as_deref().unwrap_or("no reason recorded")
            ),
        )),
        _ => None,
    }
}

/// tus HEAD: the offset to resume from.
async fn offset(t: &Transfers, ticket: &UploadTicket) -> Response<Body> {
    let record = match upload_record(t, &ticket.id).await {
        Ok(r) => r,
        Err(resp) => return resp,
    };
    if let Some(resp) = ended(&record) {
        return resp;
    }
    let total = record.progress.total.unwrap_or(0);
    let offset = match record.state {
        JobState::Completed => total,
        _ => t
            .sessions()
            .get(&ticket.id)
            .and_then(|s| s.as_ref().map(|s| s.state.written))
            .unwrap_or(record.durable_offset),
    };
    let mut resp = empty(StatusCode::OK);
    let h = resp.headers_mut();
    h.insert("upload-offset", HeaderValue::from(offset));
    h.insert("upload-length", HeaderValue::from(total));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

/// tus PATCH: appends the body at `Upload-Offset`; installs when the upload is whole.
async fn patch(t: &Transfers, ticket: &UploadTicket, req: Request<Incoming>) -> Response<Body> {
    let h = req.headers();
    let header = |name: &str| h.get(name).and_then(|v| v.to_str().ok());
    if let Err(e) = tus::check_version(header("tus-resumable")) {
        return text(StatusCode::PRECONDITION_FAILED, &e.to_string());
    }
    if header("content-type").map(str::trim) != Some(tus::PATCH_CONTENT_TYPE) {
        return text(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            &format!("Content-Type must be {}", tus::PATCH_CONTENT_TYPE),
        );
    }
    let at = match tus::number("Upload-Offset", header("upload-offset")) {
        Ok(n) => n,
        Err(e) => return text(StatusCode::BAD_REQUEST, &e.to_string()),
    };
    let mut record = match upload_record(t, &ticket.id).await {
        Ok(r) => r,
        Err(resp) => return resp,
    };
    if let Some(resp) = ended(&record) {
        return resp;
    }
    let total = record.progress.total.unwrap_or(0);
    if record.state == JobState::Completed {
        return conflict(total, "the upload is complete");
    }
    let Ok(_permit) = t.uploads.clone().try_acquire_owned() else {
        return text(
            StatusCode::TOO_MANY_REQUESTS,
            "too many uploads at once; retry later",
        );
    };
    // Take the session (or the right to rebuild it); a request already writing keeps it.
    let held: Option<Slot> = {
        let mut sessions = t.sessions();
        match sessions.get_mut(&ticket.id) {
            Some(slot) if slot.is_none() => None,
            Some(slot) => Some(slot.take()),
            None => {
                sessions.insert(ticket.id.clone(), None);
                Some(None)
            }
        }
    };
    let Some(held) = held else {
        return text(StatusCode::CONFLICT, "another request is writing this upload");
    };
    let d = t.agent.downloader_now();
    let (live, cancel) = t.agent.track(&record);
    let session = match held {
        Some(s) => Ok(s),
        None => d
            .prepare(&mut record, &live, &cancel)
            .await
            .map(|(dir, file, state, expected)| Session {
                state,
                file,
                dir,
                expected,
                flushed: (Instant::now(), 0),
            }),
    };
    let mut session = match session {
        Ok(s) => s,
        Err(e) => {
            t.agent.untrack(&record.id);
            t.sessions().remove(&ticket.id);
            return finish(&d, &mut record, Err(e), ticket).await;
        }
    };
    if at != session.state.written {
        t.agent.untrack(&record.id);
        let written = session.state.written;
        t.sessions().insert(ticket.id.clone(), Some(session));
        return conflict(written, "Upload-Offset is not the upload's offset");
    }
    // The last PATCH, or one a second or FLUSH_BYTES after the last flush, makes its bytes the
    // resume point; the others leave that to the next (a restart re-sends at most that much).
    let end = content_length(h).map_or(total, |n| at.saturating_add(n));
    let flush = end >= total
        || session.flushed.0.elapsed() >= FLUSH_EVERY
        || end.saturating_sub(session.flushed.1) >= FLUSH_BYTES;
    let fetch = fetch(&d, ticket, &mut session.state, total);
    let mut feed = Feed::spawn(body_stream(req.into_body()), fetch, Some(total), false, false);
    if flush {
        session.flushed = (Instant::now(), end);
    } else {
        feed = feed.without_final_flush();
    }
    let pumped = d
        .pump(
            &mut record,
            &live,
            &cancel,
            &session.dir,
            &session.file,
            &mut session.state,
            feed,
        )
        .await;
    let result = match pumped {
        Ok((hasher, received)) if received < total => {
            session.state.download_hasher = hasher;
            t.agent.untrack(&record.id);
            t.sessions().insert(ticket.id.clone(), Some(session));
            let mut resp = empty(StatusCode::NO_CONTENT);
            resp.headers_mut()
                .insert("upload-offset", HeaderValue::from(received));
            return resp;
        }
        Ok((hasher, _)) => {
            d.install(
                &mut record,
                &live,
                &session.dir,
                &mut session.state,
                hasher,
                session.expected.as_ref(),
            )
            .await
        }
        Err(DownloadError::Transient(m)) => {
            // The request broke off: what reached the store is the resume point (journalled by
            // the pipeline); the next request rebuilds the session from the part file.
            t.agent.untrack(&record.id);
            t.sessions().remove(&ticket.id);
            info!(upload = %record.id, offset = record.durable_offset, reason = %m, "Upload interrupted; it resumes from the offset");
            return text(StatusCode::BAD_REQUEST, &format!("upload interrupted: {m}"));
        }
        Err(e) => Err(e),
    };
    t.agent.untrack(&record.id);
    t.sessions().remove(&ticket.id);
    let mut resp = finish(&d, &mut record, result, ticket).await;
    if resp.status() == StatusCode::OK {
        *resp.status_mut() = StatusCode::NO_CONTENT;
        *resp.body_mut() = empty(StatusCode::NO_CONTENT).into_body();
        resp.headers_mut().remove(header::CONTENT_TYPE);
    }
    resp
}

/// Fails the unfinished uploads whose tickets expired (no request can continue them any more):
/// their part files go, and core hears why. Uploads a request is writing are left alone (a
/// one-shot POST that began in time may finish).
pub(super) async fn sweep_expired(t: &Transfers) {
    let now = crate::job::now();
    let records = match t.agent.list().await {
        Ok(r) => r,
        Err(error) => {
            warn!(error = %format!("{error:#}"), "Upload sweep could not read the journal");
            return;
        }
    };
    let d = t.agent.downloader_now();
    for mut record in records {
        let spec = &record.spec;
        if !spec.upload || record.state.is_final() || spec.expires == 0 || now < spec.expires {
            continue;
        }
        if t.agent.is_tracked(&record.id) {
            continue;
        }
        t.sessions().remove(&record.id);
        record.state = JobState::Failed;
        record.error = Some("the upload's parameters expired before it completed; ask for new ones".into());
        d.discard_part(&mut record).await;
        if record.epoch > 0 && record.epoch_recorded {
            let _ = crate::fence::forget(&d.store, record.spec.path.trim_matches('/'), record.epoch).await;
        }
        d.save(&record).await;
        info!(upload = %record.id, "Unfinished upload expired; its partial file removed");
        t.agent.announce(&record);
    }
}

fn conflict(offset: u64, msg: &str) -> Response<Body> {
    let mut resp = text(StatusCode::CONFLICT, msg);
    resp.headers_mut()
        .insert("upload-offset", HeaderValue::from(offset));
    resp
}
