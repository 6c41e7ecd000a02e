//! Replicas in OpenStack Swift, natively over its HTTP API (no CLI, no credentials on a command
//! line): auth v1 (tempauth) or Keystone v3; one PUT up to the segment size, above it a static
//! large object (SLO) whose segments go to `<container>_segments/<key>/<size>/<segment size>/<n>`;
//! every PUT carries its MD5 as `ETag` (Swift refuses a body that does not match), the object
//! the file's SHA-256 as `X-Object-Meta-Sha256`; a `HEAD` verifies size and metadata after.
//!
//! Invariants:
//! * the manifest (what appears under the key) is written only after every segment is in and
//!   the file hashed to the SHA-256 it was asked for; a staging copy that hashes otherwise has
//!   its segments removed (other failures keep them for the next attempt);
//! * a later attempt of the same file and layout sends only the segments Swift does not already
//!   hold with the same MD5 (segment names are stable), so an interrupted replica resumes;
//! * removing a replica removes its segments and any left by an attempt that never completed;
//! * tokens and keys live in [`systemvm_proto::Secret`] or request headers only: never in a log
//!   line or an error.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use md5::Md5;
use reqwest::{Method, StatusCode};
use sha2::{Digest, Sha256};
use systemvm_proto::agent::{Fetched, Replicated, SwiftAuth, SwiftTarget};
use tokio::task::JoinSet;

use super::ReplicaError;
use crate::store::Store;

/// The metadata header carrying the file's SHA-256.
pub const SHA256_HEADER: &str = "x-object-meta-sha256";
/// Swift's default limit of segments in one manifest.
pub const MAX_SEGMENTS: u64 = 1000;
/// Segments in flight at once.
const CONCURRENCY: usize = 4;
/// Bytes read from the store at once.
const READ: usize = 1 << 20;
/// Time for one request (a segment's upload included).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(600);

/// An authenticated session: the account's storage URL and a token.
struct Session {
    http: reqwest::Client,
    storage_url: String,
    token: String,
}

fn http_client(ca_pem: Option<&str>) -> Result<reqwest::Client, ReplicaError> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject as _;
    let mut roots = rustls::RootCertStore::empty();
    if let Ok(certs) = CertificateDer::pem_file_iter("/etc/ssl/certs/ca-certificates.crt") {
        for c in certs.flatten() {
            let _ = roots.add(c);
        }
    }
    if let Some(pem) = ca_pem {
        for c in CertificateDer::pem_slice_iter(pem.as_bytes()) {
            let c = c.map_err(|e| ReplicaError::Invalid(format!("ca_pem: {e}")))?;
            roots
                .add(c)
                .map_err(|e| ReplicaError::Invalid(format!("ca_pem: {e}")))?;
        }
    }
    let tls = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| ReplicaError::Invalid(e.to_string()))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .connect_timeout(Duration::from_secs(10))
        .timeout(REQUEST_TIMEOUT)
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("ssvm-agent/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| ReplicaError::Invalid(format!("HTTP client: {e}")))
}

fn unreachable(what: &str, e: reqwest::Error) -> ReplicaError {
    // Without the URL: a storage URL may carry the account, never a secret, but keep it short.
    ReplicaError::Unreachable(format!("{what}: {}", e.without_url()))
}

async fn refused(what: &str, r: reqwest::Response) -> ReplicaError {
    let status = r.status();
    let body = r.text().await.unwrap_or_default();
    let body: String = body.chars().filter(|c| !c.is_control()).take(200).collect();
    let hint = match status {
        StatusCode::UNAUTHORIZED => " (the credentials are not accepted)",
        StatusCode::NOT_FOUND => " (no such container or object)",
        StatusCode::PAYLOAD_TOO_LARGE => " (over the container's or account's quota, or too large)",
        StatusCode::UNPROCESSABLE_ENTITY => " (the body does not match its ETag)",
        _ => "",
    };
    ReplicaError::Remote(format!(
        "{what}: HTTP {}{hint}{}",
        status.as_u16(),
        if body.is_empty() {
            String::new()
        } else {
            format!(": {body}")
        }
    ))
}

fn check_url(url: &str) -> Result<(), ReplicaError> {
    let u = url::Url::parse(url).map_err(|e| ReplicaError::Invalid(format!("auth URL {url}: {e}")))?;
    if !matches!(u.scheme(), "http" | "https") || u.host_str().is_none() {
        return Err(ReplicaError::Invalid(format!(
            "auth URL {url}: http(s)://host[:port]/… expected"
        )));
    }
    Ok(())
}

async fn authenticate(t: &SwiftTarget) -> Result<Session, ReplicaError> {
    check_url(&t.auth_url)?;
    if t.container.is_empty() || t.container.contains('/') {
        return Err(ReplicaError::Invalid(format!("container {:?}", t.container)));
    }
    let http = http_client(t.ca_pem.as_deref())?;
    let (storage_url, token) = match &t.auth {
        SwiftAuth::V1 { user, key } => {
            let r = http
                .get(&t.auth_url)
                .header("X-Auth-User", user)
                .header("X-Auth-Key", key.expose())
                .send()
                .await
                .map_err(|e| unreachable("auth", e))?;
            if !r.status().is_success() {
                return Err(refused("auth", r).await);
            }
            let h = |n: &str| {
                r.headers()
                    .get(n)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned)
            };
            match (h("x-storage-url"), h("x-auth-token")) {
                (Some(u), Some(tok)) => (u, tok),
                _ => {
                    return Err(ReplicaError::Remote(
                        "auth: no X-Storage-Url or X-Auth-Token in the answer".into(),
                    ));
                }
            }
        }
        SwiftAuth::V3 {
            user,
            password,
            project,
            domain,
        } => {
            let body = serde_json::json!({"auth": {
                "identity": {"methods": ["password"], "password": {"user": {
                    "name": user, "domain": {"name": domain}, "password": password.expose()}}},
                "scope": {"project": {"name": project, "domain": {"name": domain}}}}});
            let r = http
                .post(format!("{}/auth/tokens", t.auth_url.trim_end_matches('/')))
                .json(&body)
                .send()
                .await
                .map_err(|e| unreachable("Keystone auth", e))?;
            if !r.status().is_success() {
                return Err(refused("Keystone auth", r).await);
            }
            let token = r
                .headers()
                .get("x-subject-token")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
                .ok_or_else(|| ReplicaError::Remote("Keystone auth: no X-Subject-Token".into()))?;
            let v: serde_json::Value = r
                .json()
                .await
                .map_err(|e| ReplicaError::Remote(format!("Keystone auth: unreadable token: {e}")))?;
            (object_store_endpoint(&v)?, token)
        }
    };
    Ok(Session {
        http,
        storage_url: storage_url.trim_end_matches('/').to_owned(),
        token,
    })
}

/// The public `object-store` endpoint of a Keystone v3 token's catalog.
pub fn object_store_endpoint(token: &serde_json::Value) -> Result<String, ReplicaError> {
    let catalog = token["token"]["catalog"].as_array().cloned().unwrap_or_default();
    catalog
        .iter()
        .filter(|s| s["type"] == "object-store")
        .flat_map(|s| s["endpoints"].as_array().cloned().unwrap_or_default())
        .find(|e| e["interface"] == "public")
        .and_then(|e| e["url"].as_str().map(str::to_owned))
        .ok_or_else(|| {
            ReplicaError::Remote("Keystone auth: no public object-store endpoint in the catalog".into())
        })
}

/// Percent-encodes each path component of a key (its `/` stay).
fn path_of(key: &str) -> String {
    key.split('/')
        .map(|c| {
            url::form_urlencoded::byte_serialize(c.as_bytes())
                .collect::<String>()
                .replace('+', "%20")
        })
        .collect::<Vec<_>>()
        .join("/")
}

impl Session {
    fn url(&self, container: &str, key: &str) -> String {
        if key.is_empty() {
            format!("{}/{}", self.storage_url, path_of(container))
        } else {
            format!("{}/{}/{}", self.storage_url, path_of(container), path_of(key))
        }
    }

    fn req(&self, m: Method, url: String) -> reqwest::RequestBuilder {
        self.http.request(m, url).header("X-Auth-Token", &self.token)
    }
}

/// The segment size: at least `min`, grown in whole MiB so `size` fits in [`MAX_SEGMENTS`].
pub fn segment_size(size: u64, min: u64) -> u64 {
    let mib = 1u64 << 20;
    let need = size.div_ceil(MAX_SEGMENTS).max(min).max(mib);
    need.div_ceil(mib) * mib
}

async fn read_exact(
    store: &Store,
    file: &crate::store::FileId,
    offset: u64,
    len: u64,
) -> Result<Bytes, ReplicaError> {
    let mut buf = BytesMut::with_capacity(usize::try_from(len).unwrap_or(0));
    let mut at = offset;
    while at < offset + len {
        let want = usize::try_from((offset + len - at).min(READ as u64)).unwrap_or(READ);
        let chunk = store.read_at(file, at, want).await?;
        if chunk.is_empty() {
            return Err(ReplicaError::Verify(format!(
                "the staging copy ended at {at} bytes"
            )));
        }
        at += chunk.len() as u64;
        buf.extend_from_slice(&chunk);
    }
    Ok(buf.freeze())
}

/// Copies `path` of `store` to `key` in the target's container.
pub async fn replicate(
    store: &Store,
    path: &str,
    sha256: &str,
    target: &SwiftTarget,
    key: &str,
) -> Result<Replicated, ReplicaError> {
    if key.is_empty() || key.len() > 1024 {
        return Err(ReplicaError::Invalid(format!("key of {} bytes", key.len())));
    }
    let expected = sha256.to_ascii_lowercase();
    let s = authenticate(target).await?;
    let (file, size) = store.open_file(path).await?;
    let mut done = if size <= target.segment_size {
        let data = read_exact(store, &file, 0, size).await?;
        let actual = hex::encode(Sha256::digest(&data));
        if actual != expected {
            return Err(ReplicaError::Checksum { expected, actual });
        }
        put(&s, &target.container, key, data, Some(&expected)).await?;
        Replicated {
            key: key.to_owned(),
            size,
            sha256: expected.clone(),
            parts: 1,
            resumed_parts: 0,
            bytes_sent: size,
            companions: Vec::new(),
        }
    } else {
        slo(&s, store, &file, size, &expected, target, key).await?
    };
    verify(&s, &target.container, key, size, &expected).await?;
    if let Some((file, object)) = super::s3::companion(path, key) {
        match store.read_file(&file, super::s3::MAX_COMPANION).await {
            Ok(data) => {
                let sha = hex::encode(Sha256::digest(&data));
                put(&s, &target.container, &object, Bytes::from(data), Some(&sha)).await?;
                done.companions.push(object);
            }
            Err(e) if e.is_not_found() => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(done)
}

/// One PUT with its MD5 as `ETag` (Swift checks it) and the SHA-256 as metadata.
async fn put(
    s: &Session,
    container: &str,
    key: &str,
    data: Bytes,
    sha256: Option<&str>,
) -> Result<(), ReplicaError> {
    let md5 = hex::encode(Md5::digest(&data));
    let mut rb = s
        .req(Method::PUT, s.url(container, key))
        .header("ETag", &md5)
        .header("Content-Length", data.len())
        .body(data);
    if let Some(sha) = sha256 {
        rb = rb.header(SHA256_HEADER, sha);
    }
    let r = rb.send().await.map_err(|e| unreachable("PUT", e))?;
    if !r.status().is_success() {
        return Err(refused(&format!("PUT {key}"), r).await);
    }
    Ok(())
}

fn segments_container(container: &str) -> String {
    format!("{container}_segments")
}

async fn slo(
    s: &Session,
    store: &Store,
    file: &crate::store::FileId,
    size: u64,
    expected: &str,
    target: &SwiftTarget,
    key: &str,
) -> Result<Replicated, ReplicaError> {
    let seg = segment_size(size, target.segment_size);
    let segs = segments_container(&target.container);
    let r = s
        .req(Method::PUT, s.url(&segs, ""))
        .send()
        .await
        .map_err(|e| unreachable("PUT container", e))?;
    if !r.status().is_success() {
        return Err(refused(&format!("PUT container {segs}"), r).await);
    }
    let prefix = format!("{key}/{size}/{seg}");
    let count = size.div_ceil(seg);
    // What an earlier attempt left, with its MD5s: one listing, not a HEAD per segment.
    let held: std::collections::HashMap<String, String> =
        list(s, &segs, &format!("{prefix}/")).await?.into_iter().collect();
    let held = std::sync::Arc::new(held);
    // The file's SHA-256 in order on a thread of its own; MD5s and uploads in the segment tasks.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Bytes>(2);
    let hasher = tokio::task::spawn_blocking(move || {
        let mut h = Sha256::new();
        while let Some(b) = rx.blocking_recv() {
            h.update(&b);
        }
        hex::encode(h.finalize())
    });
    let mut in_flight: JoinSet<Result<(u64, String, bool), ReplicaError>> = JoinSet::new();
    let mut done = Vec::new();
    for n in 0..count {
        let offset = n * seg;
        let len = seg.min(size - offset);
        let data = read_exact(store, file, offset, len).await?;
        tx.send(data.clone())
            .await
            .map_err(|_| ReplicaError::Invalid("the hashing thread stopped".into()))?;
        while in_flight.len() >= CONCURRENCY {
            if let Some(r) = in_flight.join_next().await {
                done.push(r.map_err(|e| ReplicaError::Invalid(format!("segment task: {e}")))??);
            }
        }
        let name = format!("{prefix}/{:08}", n + 1);
        let (http, url, token, held) = (s.http.clone(), s.url(&segs, &name), s.token.clone(), held.clone());
        in_flight.spawn(async move {
            let d = data.clone();
            let md5 = tokio::task::spawn_blocking(move || hex::encode(Md5::digest(&d)))
                .await
                .map_err(|e| ReplicaError::Invalid(format!("MD5 task: {e}")))?;
            if held.get(&name) == Some(&md5) {
                return Ok((n, md5, true));
            }
            let r = http
                .put(url)
                .header("X-Auth-Token", token)
                .header("ETag", &md5)
                .header("Content-Length", data.len())
                .body(data)
                .send()
                .await
                .map_err(|e| unreachable("PUT segment", e))?;
            if r.status().is_success() {
                Ok((n, md5, false))
            } else {
                Err(refused("PUT segment", r).await)
            }
        });
    }
    drop(tx);
    while let Some(r) = in_flight.join_next().await {
        done.push(r.map_err(|e| ReplicaError::Invalid(format!("segment task: {e}")))??);
    }
    done.sort_by_key(|(n, _, _)| *n);
    let (mut resumed, mut sent) = (0u32, 0u64);
    let mut manifest = Vec::new();
    for (n, md5, was_held) in &done {
        let len = seg.min(size - n * seg);
        if *was_held {
            resumed += 1;
        } else {
            sent += len;
        }
        let path = format!("/{segs}/{prefix}/{:08}", n + 1);
        manifest.push(serde_json::json!({"path": path, "etag": md5, "size_bytes": len}));
    }
    let hash = hasher
        .await
        .map_err(|e| ReplicaError::Invalid(format!("hashing thread: {e}")))?;
    let actual = hash;
    if actual != expected {
        remove_segments(s, &segs, &format!("{key}/")).await;
        return Err(ReplicaError::Checksum {
            expected: expected.to_owned(),
            actual,
        });
    }
    let body = serde_json::to_vec(&manifest).map_err(|e| ReplicaError::Invalid(e.to_string()))?;
    let r = s
        .req(
            Method::PUT,
            format!("{}?multipart-manifest=put", s.url(&target.container, key)),
        )
        .header(SHA256_HEADER, expected)
        .body(body)
        .send()
        .await
        .map_err(|e| unreachable("PUT manifest", e))?;
    if !r.status().is_success() {
        return Err(refused(&format!("PUT manifest {key}"), r).await);
    }
    // Segments of other layouts (an attempt with another size or segment size) are orphans.
    remove_segments_except(s, &segs, &format!("{key}/"), &format!("{prefix}/")).await;
    Ok(Replicated {
        key: key.to_owned(),
        size,
        sha256: expected.to_owned(),
        parts: u32::try_from(count).unwrap_or(u32::MAX),
        resumed_parts: resumed,
        bytes_sent: sent,
        companions: Vec::new(),
    })
}

/// The object must be there with the file's size and SHA-256.
async fn verify(
    s: &Session,
    container: &str,
    key: &str,
    size: u64,
    sha256: &str,
) -> Result<(), ReplicaError> {
    let r = s
        .req(Method::HEAD, s.url(container, key))
        .send()
        .await
        .map_err(|e| unreachable("HEAD", e))?;
    if !r.status().is_success() {
        return Err(refused(&format!("HEAD {key}"), r).await);
    }
    let len = r
        .headers()
        .get("content-length")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let meta = r.headers().get(SHA256_HEADER).and_then(|v| v.to_str().ok());
    if len != Some(size) || meta != Some(sha256) {
        return Err(ReplicaError::Verify(format!(
            "{key} holds {len:?} bytes with sha256 {meta:?}; {size} bytes with {sha256} were sent"
        )));
    }
    Ok(())
}

/// Objects in `container` under `prefix`: name and MD5.
async fn list(s: &Session, container: &str, prefix: &str) -> Result<Vec<(String, String)>, ReplicaError> {
    let mut out = Vec::new();
    let mut marker = String::new();
    loop {
        let r = s
            .req(Method::GET, s.url(container, ""))
            .query(&[
                ("format", "json"),
                ("prefix", prefix),
                ("marker", marker.as_str()),
            ])
            .send()
            .await
            .map_err(|e| unreachable("GET container", e))?;
        if r.status() == StatusCode::NOT_FOUND {
            return Ok(out);
        }
        if !r.status().is_success() {
            return Err(refused(&format!("GET container {container}"), r).await);
        }
        let page: Vec<serde_json::Value> = r
            .json()
            .await
            .map_err(|e| ReplicaError::Remote(format!("listing {container}: {e}")))?;
        let names: Vec<(String, String)> = page
            .iter()
            .filter_map(|o| {
                let name = o["name"].as_str()?.to_owned();
                Some((name, o["hash"].as_str().unwrap_or_default().to_ascii_lowercase()))
            })
            .collect();
        match names.last() {
            Some((last, _)) => marker = last.clone(),
            None => return Ok(out),
        }
        out.extend(names);
    }
}

async fn remove_segments(s: &Session, segs: &str, prefix: &str) {
    remove_segments_except(s, segs, prefix, "\0").await;
}

/// Best effort: removes the segments under `prefix` but those under `keep`.
async fn remove_segments_except(s: &Session, segs: &str, prefix: &str, keep: &str) {
    let Ok(names) = list(s, segs, prefix).await else {
        return;
    };
    for (n, _) in names.iter().filter(|(n, _)| !n.starts_with(keep)) {
        match s.req(Method::DELETE, s.url(segs, n)).send().await {
            Ok(r) if r.status().is_success() || r.status() == StatusCode::NOT_FOUND => {}
            Ok(r) => {
                tracing::warn!(segment = %n, status = r.status().as_u16(), "A segment could not be removed")
            }
            Err(e) => {
                tracing::warn!(segment = %n, error = %e.without_url(), "A segment could not be removed")
            }
        }
    }
}

/// Removes the object under `key` with its segments, its companion, and any segments an
/// unfinished attempt left; an object that is not there is not an error.
pub async fn delete(target: &SwiftTarget, key: &str) -> Result<(), ReplicaError> {
    let s = authenticate(target).await?;
    let mut keys = vec![key.to_owned()];
    if let Some((_, object)) = super::s3::companion(key, key) {
        keys.push(object);
    }
    for k in &keys {
        // A plain DELETE: of a manifest it removes only the manifest; its segments go below
        // (SLO's `multipart-manifest=delete` answers 200 without deleting an object that is not
        // a manifest).
        let r = s
            .req(Method::DELETE, s.url(&target.container, k))
            .send()
            .await
            .map_err(|e| unreachable("DELETE", e))?;
        if !(r.status().is_success() || r.status() == StatusCode::NOT_FOUND) {
            return Err(refused(&format!("DELETE {k}"), r).await);
        }
    }
    remove_segments(&s, &segments_container(&target.container), &format!("{key}/")).await;
    tracing::info!(key, container = %target.container, "Removed a replica");
    Ok(())
}

/// A Swift temp URL for GET of `key`, valid `expires`: the account's `Temp-URL-Key` is set to
/// the target's key first (idempotent), then the link is signed with HMAC-SHA256 over
/// `GET\n<expires>\n<path>` (Swift's tempurl middleware).
pub async fn temp_url(target: &SwiftTarget, key: &str, expires: Duration) -> Result<String, ReplicaError> {
    use hmac::{KeyInit as _, Mac as _};
    let secret = target
        .temp_url_key
        .as_ref()
        .ok_or_else(|| ReplicaError::Invalid("no temp URL key for this store".into()))?;
    let s = authenticate(target).await?;
    let r = s
        .req(Method::POST, s.storage_url.clone())
        .header("X-Account-Meta-Temp-URL-Key", secret.expose())
        .send()
        .await
        .map_err(|e| unreachable("POST account", e))?;
    if !r.status().is_success() {
        return Err(refused("POST account (temp URL key)", r).await);
    }
    let url = s.url(&target.container, key);
    let parsed = url::Url::parse(&url).map_err(|e| ReplicaError::Invalid(format!("storage URL: {e}")))?;
    let until = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
        + expires.as_secs();
    let mut mac = hmac::Hmac::<Sha256>::new_from_slice(secret.expose().as_bytes())
        .map_err(|e| ReplicaError::Invalid(e.to_string()))?;
    mac.update(format!("GET\n{until}\n{}", parsed.path()).as_bytes());
    let sig = hex::encode(mac.finalize().into_bytes());
    Ok(format!("{url}?temp_url_sig={sig}&temp_url_expires={until}"))
}

/// Checks that the credentials are accepted and the container is there (`HEAD`).
pub async fn probe(target: &SwiftTarget) -> Result<(), ReplicaError> {
    let s = authenticate(target).await?;
    let r = s
        .req(Method::HEAD, s.url(&target.container, ""))
        .send()
        .await
        .map_err(|e| unreachable("HEAD container", e))?;
    match r.status() {
        st if st.is_success() => Ok(()),
        StatusCode::NOT_FOUND => Err(ReplicaError::Remote(format!(
            "HEAD container: NoSuchContainer (HTTP 404): container {} does not exist",
            target.container
        ))),
        _ => Err(refused("HEAD container", r).await),
    }
}

/// Restores the object `key` to `path` in `store` (a rebuild), verified against `sha256` and
/// the object's metadata before it takes its place; a template's properties come with it.
pub async fn fetch(
    store: &Store,
    path: &str,
    key: &str,
    sha256: &str,
    target: &SwiftTarget,
) -> Result<Fetched, ReplicaError> {
    let expected = sha256.to_ascii_lowercase();
    let s = authenticate(target).await?;
    let r = s
        .req(Method::GET, s.url(&target.container, key))
        .send()
        .await
        .map_err(|e| unreachable("GET", e))?;
    if !r.status().is_success() {
        return Err(refused(&format!("GET {key}"), r).await);
    }
    let meta = r
        .headers()
        .get(SHA256_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_ascii_lowercase);
    if meta.as_deref() != Some(expected.as_str()) {
        return Err(ReplicaError::Verify(format!(
            "{key}'s sha256 metadata is {meta:?}, the record says {expected}"
        )));
    }
    use futures_util::TryStreamExt as _;
    let chunks = r.bytes_stream().map_err(|e| unreachable("GET body", e));
    let size = super::land(store, path, &expected, None, chunks).await?;
    let mut companions = Vec::new();
    if let Some((file, object)) = super::s3::companion(path, key) {
        let r = s
            .req(Method::GET, s.url(&target.container, &object))
            .send()
            .await
            .map_err(|e| unreachable("GET", e))?;
        if r.status().is_success() {
            let meta = r
                .headers()
                .get(SHA256_HEADER)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            let data = r.bytes().await.map_err(|e| unreachable("GET body", e))?;
            if data.len() > super::s3::MAX_COMPANION
                || meta.as_deref() != Some(hex::encode(Sha256::digest(&data)).as_str())
            {
                return Err(ReplicaError::Verify(format!(
                    "{object} does not match its sha256 metadata"
                )));
            }
            store.write_file_atomic(&file, &data).await?;
            companions.push(file);
        }
    }
    Ok(Fetched {
        path: path.to_owned(),
        size,
        sha256: expected,
        companions,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_grow_so_any_size_fits() {
        assert_eq!(segment_size(100 << 20, 16 << 20), 16 << 20);
        for size in [1u64 << 30, 200 << 30, 5 << 40] {
            let s = segment_size(size, 16 << 20);
            assert!(size.div_ceil(s) <= MAX_SEGMENTS, "{size}: {s}");
            assert_eq!(s % (1 << 20), 0);
        }
    }

    #[test]
    fn keys_are_encoded_per_component() {
        assert_eq!(
            path_of("template/tmpl/2/a b?.qcow2"),
            "template/tmpl/2/a%20b%3F.qcow2"
        );
    }

    #[test]
    fn the_catalog_gives_the_public_object_store() {
        let v = serde_json::json!({"token": {"catalog": [
            {"type": "identity", "endpoints": [{"interface": "public", "url": "http://k:5000"}]},
            {"type": "object-store", "endpoints": [
                {"interface": "internal", "url": "http://i:8080/v1/AUTH_p"},
                {"interface": "public", "url": "http://s:8080/v1/AUTH_p"}]}]}});
        assert_eq!(object_store_endpoint(&v).unwrap(), "http://s:8080/v1/AUTH_p");
        assert!(object_store_endpoint(&serde_json::json!({})).is_err());
    }
}
