//! Replication of a staging-store file to S3 with aws-sdk-s3.
//!
//! Below [`S3Options::cutoff`] the file goes in one PUT; above it in a multipart upload whose part
//! size is the larger of [`S3Options::min_part`] and what keeps the count within S3's 10,000
//! parts. Parts are read in order, hashed (the whole file's SHA-256) and sent up to
//! [`S3Options::concurrency`] at a time, so memory stays at about `(concurrency + 1) × part`. Each
//! part carries a CRC32C the server checks; the object carries the file's SHA-256 as the
//! `sha256` metadata entry (S3's ETag of a multipart object is not a digest of the file).
//!
//! Resume: the upload id and the parts the server acknowledged are kept in
//! `<file>.s3.journal` on the staging store (written atomically after each part). A new attempt
//! for the same file, key, bucket and layout takes the upload up again, asks the server which
//! parts it holds (`ListParts`), and sends only the others; a journal that does not match, or an
//! upload the server no longer knows, starts afresh (the old upload aborted). Multipart uploads
//! under the key that are not this one are aborted (servers without `ListMultipartUploads` are
//! left as they are).
//!
//! Verification: before completing, the file's SHA-256 must equal the expected one (else the
//! upload is aborted); after, a `HEAD` must give the file's size and the `sha256` metadata.

use std::sync::Arc;
use std::time::Duration;

use aws_sdk_s3::Client;
use aws_sdk_s3::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{ChecksumAlgorithm, CompletedMultipartUpload, CompletedPart};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::ReplicaError;
use crate::store::Store;

/// S3 allows at most this many parts in one upload.
pub const MAX_PARTS: u64 = 10_000;
/// S3's smallest part (all but the last).
pub const MIN_PART: u64 = 5 << 20;
/// The metadata entry holding the file's SHA-256 (hex).
pub const SHA256_META: &str = "sha256";

pub use systemvm_proto::agent::{Replicated, S3Target};

/// How replicas are cut and paced.
#[derive(Debug, Clone)]
pub struct S3Options {
    /// Files up to this size go in one PUT.
    pub cutoff: u64,
    /// The smallest part of a multipart upload (at least [`MIN_PART`]).
    pub min_part: u64,
    /// Parts in flight at once.
    pub concurrency: usize,
    /// Time for one request attempt (a part's upload included).
    pub attempt_timeout: Duration,
    /// Attempts per request (the SDK's retries with backoff).
    pub attempts: u32,
}

impl Default for S3Options {
    fn default() -> Self {
        S3Options {
            cutoff: 64 << 20,
            min_part: 16 << 20,
            concurrency: 4,
            attempt_timeout: Duration::from_secs(300),
            attempts: 3,
        }
    }
}

/// The journal of a multipart upload in progress, beside the file on the staging store.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
struct Journal {
    endpoint: String,
    bucket: String,
    key: String,
    size: u64,
    part_size: u64,
    sha256: String,
    upload_id: String,
    /// Acknowledged parts: (number, ETag, CRC32C).
    parts: Vec<(i32, String, Option<String>)>,
}

/// The part size for `size` bytes: at least `min_part`, whole MiB, and few enough parts.
pub fn part_size(size: u64, min_part: u64) -> u64 {
    let need = size.div_ceil(MAX_PARTS);
    let mib = 1 << 20;
    need.div_ceil(mib).saturating_mul(mib).max(min_part.max(MIN_PART))
}

/// An S3 client for `target` (TLS on rustls + ring, verified).
pub fn client(target: &S3Target, opts: &S3Options) -> Result<Client, ReplicaError> {
    use aws_smithy_http_client::tls;
    let url = url::Url::parse(&target.endpoint)
        .map_err(|e| ReplicaError::Invalid(format!("endpoint {}: {e}", target.endpoint)))?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err(ReplicaError::Invalid(format!(
            "endpoint {}: http(s)://host[:port] expected",
            target.endpoint
        )));
    }
    if target.bucket.is_empty() {
        return Err(ReplicaError::Invalid("no bucket".into()));
    }
    let mut trust = tls::TrustStore::empty().with_native_roots(true);
    if let Some(pem) = &target.ca_pem {
        trust = trust.with_pem_certificate(pem.as_bytes().to_vec());
    }
    let context = tls::TlsContext::builder()
        .with_trust_store(trust)
        .build()
        .map_err(|e| ReplicaError::Invalid(format!("TLS: {e}")))?;
    let http = aws_smithy_http_client::Builder::new()
        .tls_provider(tls::Provider::Rustls(tls::rustls_provider::CryptoMode::Ring))
        .tls_context(context)
        .build_https();
    let creds = Credentials::new(
        target.access_key.clone(),
        target.secret_key.expose().to_owned(),
        None,
        None,
        "staging-store",
    );
    let conf = aws_sdk_s3::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .http_client(http)
        .endpoint_url(target.endpoint.trim_end_matches('/'))
        .force_path_style(target.path_style)
        .region(Region::new(target.region.clone()))
        .credentials_provider(creds)
        .timeout_config(
            aws_sdk_s3::config::timeout::TimeoutConfig::builder()
                .connect_timeout(Duration::from_secs(10))
                .operation_attempt_timeout(opts.attempt_timeout)
                .build(),
        )
        .retry_config(
            aws_sdk_s3::config::retry::RetryConfig::standard().with_max_attempts(opts.attempts.max(1)),
        )
        .build();
    Ok(Client::from_conf(conf))
}

/// An SDK error as the operator should read it.
pub(crate) fn remote<E: ProvideErrorMetadata + std::error::Error + 'static>(
    what: &str,
    e: SdkError<E>,
) -> ReplicaError {
    match &e {
        SdkError::DispatchFailure(_) | SdkError::TimeoutError(_) => {
            ReplicaError::Unreachable(format!("{what}: {}", aws_sdk_s3::error::DisplayErrorContext(&e)))
        }
        _ => {
            let status = e.raw_response().map(|r| r.status().as_u16());
            let code = e.code().unwrap_or("unknown error").to_owned();
            let msg = e.message().unwrap_or("").to_owned();
            let status = status.map(|s| format!(" (HTTP {s})")).unwrap_or_default();
            ReplicaError::Remote(format!(
                "{what}: {code}{status}{}",
                if msg.is_empty() {
                    String::new()
                } else {
                    format!(": {msg}")
                }
            ))
        }
    }
}

fn code_of<E: ProvideErrorMetadata>(e: &SdkError<E>) -> Option<String> {
    e.code().map(str::to_owned)
}

/// Copies `path` of `store` to `key` in `target`'s bucket; `sha256` (hex) is the file's known
/// digest, checked on the way.
pub async fn replicate(
    store: &Store,
    path: &str,
    sha256: &str,
    target: &S3Target,
    key: &str,
    opts: &S3Options,
) -> Result<Replicated, ReplicaError> {
    if key.is_empty() || key.len() > 1024 {
        return Err(ReplicaError::Invalid(format!("key of {} bytes", key.len())));
    }
    let expected = sha256.to_ascii_lowercase();
    let s3 = client(target, opts)?;
    let (file, size) = store.open_file(path).await?;
    let journal_path = format!("{path}.s3.journal");
    let u = Upload {
        s3: &s3,
        store,
        file: &file,
        size,
        expected: &expected,
        target,
        key,
        journal_path: &journal_path,
    };
    let result = if size <= opts.cutoff {
        single_put(u).await
    } else {
        multipart(u, opts).await
    };
    let mut done = result?;
    verify(&s3, target, key, size, &expected).await?;
    if let Some((file, object)) = companion(path, key)
        && put_companion(&s3, store, target, &file, &object).await?
    {
        done.companions.push(object);
    }
    Ok(done)
}

/// The file replicated beside an artefact, and its key: a template's `template.properties`
/// (what a rebuilt store needs to list the install), when the store has one.
pub fn companion(path: &str, key: &str) -> Option<(String, String)> {
    if !path.starts_with("template/") {
        return None;
    }
    let name = crate::properties::TEMPLATE_PROPERTIES;
    let (dir, _) = path.rsplit_once('/')?;
    let (key_dir, _) = key.rsplit_once('/')?;
    Some((format!("{dir}/{name}"), format!("{key_dir}/{name}")))
}

/// Largest companion file.
pub const MAX_COMPANION: usize = 64 << 10;

async fn put_companion(
    s3: &Client,
    store: &Store,
    target: &S3Target,
    path: &str,
    key: &str,
) -> Result<bool, ReplicaError> {
    let data = match store.read_file(path, MAX_COMPANION).await {
        Ok(d) => d,
        Err(e) if e.is_not_found() => return Ok(false),
        Err(e) => return Err(e.into()),
    };
    let sha = hex::encode(Sha256::digest(&data));
    let len = data.len() as u64;
    s3.put_object()
        .bucket(&target.bucket)
        .key(key)
        .metadata(SHA256_META, &sha)
        .checksum_algorithm(ChecksumAlgorithm::Crc32C)
        .content_length(len as i64)
        .body(ByteStream::from(data))
        .send()
        .await
        .map_err(|e| remote("PutObject", e))?;
    verify(s3, target, key, len, &sha).await?;
    Ok(true)
}

/// One file's upload: the client, the source and where it goes.
#[derive(Clone, Copy)]
struct Upload<'a> {
    s3: &'a Client,
    store: &'a Store,
    file: &'a crate::store::FileId,
    size: u64,
    /// The file's SHA-256 (lowercase hex).
    expected: &'a str,
    target: &'a S3Target,
    key: &'a str,
    journal_path: &'a str,
}

async fn single_put(u: Upload<'_>) -> Result<Replicated, ReplicaError> {
    let Upload {
        s3,
        store,
        file,
        size,
        expected,
        target,
        key,
        ..
    } = u;
    let data = read_range(store, file, 0, size).await?;
    let actual = hex::encode(Sha256::digest(&data));
    if actual != expected {
        return Err(ReplicaError::Checksum {
            expected: expected.to_owned(),
            actual,
        });
    }
    s3.put_object()
        .bucket(&target.bucket)
        .key(key)
        .metadata(SHA256_META, expected)
        .checksum_algorithm(ChecksumAlgorithm::Crc32C)
        .content_length(size as i64)
        .body(ByteStream::from(data))
        .send()
        .await
        .map_err(|e| remote("PutObject", e))?;
    Ok(Replicated {
        key: key.to_owned(),
        size,
        sha256: expected.to_owned(),
        parts: 1,
        resumed_parts: 0,
        bytes_sent: size,
        companions: Vec::new(),
    })
}

/// Reads `len` bytes at `offset` in reads of at most 1 MiB (the NFS client's sweet spot).
async fn read_range(
    store: &Store,
    file: &crate::store::FileId,
    offset: u64,
    len: u64,
) -> Result<Bytes, ReplicaError> {
    const READ: u64 = 1 << 20;
    let mut buf = bytes::BytesMut::with_capacity(len as usize);
    let mut at = offset;
    let end = offset + len;
    while at < end {
        let want = READ.min(end - at) as usize;
        let chunk = store.read_at(file, at, want).await?;
        if chunk.is_empty() {
            return Err(ReplicaError::Verify(format!(
                "{} ended at {at} of {end} bytes: the staging copy changed while it was read",
                file.path()
            )));
        }
        at += chunk.len() as u64;
        buf.extend_from_slice(&chunk);
    }
    Ok(buf.freeze())
}

async fn multipart(u: Upload<'_>, opts: &S3Options) -> Result<Replicated, ReplicaError> {
    let Upload {
        s3,
        store,
        file,
        size,
        expected,
        target,
        key,
        journal_path,
    } = u;
    let part = part_size(size, opts.min_part);
    let count = size.div_ceil(part);
    if count > MAX_PARTS {
        return Err(ReplicaError::Invalid(format!("{size} bytes need {count} parts")));
    }
    let journal = match resume(u, part).await? {
        Some(j) => j,
        None => begin(u, part).await?,
    };
    let upload_id = journal.upload_id.clone();
    abort_others(s3, target, key, &upload_id).await;
    let resumed: std::collections::HashSet<i32> = journal.parts.iter().map(|p| p.0).collect();
    let resumed_parts = resumed.len() as u32;
    let journal = Arc::new(tokio::sync::Mutex::new(journal));
    let mut sha = Sha256::new();
    let mut running: tokio::task::JoinSet<Result<u64, ReplicaError>> = tokio::task::JoinSet::new();
    let mut sent = 0u64;
    let outcome: Result<(), ReplicaError> = async {
        for i in 0..count {
            let n = (i + 1) as i32;
            let offset = i * part;
            let len = part.min(size - offset);
            let data = read_range(store, file, offset, len).await?;
            sha.update(&data);
            if resumed.contains(&n) {
                continue;
            }
            while running.len() >= opts.concurrency.max(1) {
                if let Some(r) = running.join_next().await {
                    sent += r.map_err(|e| ReplicaError::Remote(format!("a part's task failed: {e}")))??;
                }
            }
            let (s3, bucket, key, id, journal, store, jpath) = (
                s3.clone(),
                target.bucket.clone(),
                key.to_owned(),
                upload_id.clone(),
                journal.clone(),
                store.clone(),
                journal_path.to_owned(),
            );
            running.spawn(async move {
                let out = s3
                    .upload_part()
                    .bucket(bucket)
                    .key(key)
                    .upload_id(id)
                    .part_number(n)
                    .checksum_algorithm(ChecksumAlgorithm::Crc32C)
                    .content_length(len as i64)
                    .body(ByteStream::from(data))
                    .send()
                    .await
                    .map_err(|e| remote(&format!("UploadPart {n}"), e))?;
                let etag = out
                    .e_tag()
                    .ok_or_else(|| ReplicaError::Remote(format!("UploadPart {n}: no ETag")))?
                    .to_owned();
                let mut j = journal.lock().await;
                j.parts.push((n, etag, out.checksum_crc32_c().map(str::to_owned)));
                write_journal(&store, &jpath, &j).await?;
                Ok(len)
            });
        }
        while let Some(r) = running.join_next().await {
            sent += r.map_err(|e| ReplicaError::Remote(format!("a part's task failed: {e}")))??;
        }
        Ok(())
    }
    .await;
    if let Err(e) = outcome {
        // The parts sent so far stay in the journal: the next attempt continues from them.
        running.abort_all();
        return Err(e);
    }
    let actual = hex::encode(sha.finalize());
    if actual != expected {
        let _ = s3
            .abort_multipart_upload()
            .bucket(&target.bucket)
            .key(key)
            .upload_id(&upload_id)
            .send()
            .await;
        let _ = store.remove_file(journal_path).await;
        return Err(ReplicaError::Checksum {
            expected: expected.to_owned(),
            actual,
        });
    }
    let mut parts = journal.lock().await.parts.clone();
    parts.sort_by_key(|p| p.0);
    parts.dedup_by_key(|p| p.0);
    let completed = CompletedMultipartUpload::builder()
        .set_parts(Some(
            parts
                .iter()
                .map(|(n, etag, crc)| {
                    CompletedPart::builder()
                        .part_number(*n)
                        .e_tag(etag)
                        .set_checksum_crc32_c(crc.clone())
                        .build()
                })
                .collect(),
        ))
        .build();
    s3.complete_multipart_upload()
        .bucket(&target.bucket)
        .key(key)
        .upload_id(&upload_id)
        .multipart_upload(completed)
        .send()
        .await
        .map_err(|e| remote("CompleteMultipartUpload", e))?;
    let _ = store.remove_file(journal_path).await;
    Ok(Replicated {
        key: key.to_owned(),
        size,
        sha256: expected.to_owned(),
        parts: count as u32,
        resumed_parts,
        bytes_sent: sent,
        companions: Vec::new(),
    })
}

/// A new multipart upload, with its journal.
async fn begin(u: Upload<'_>, part: u64) -> Result<Journal, ReplicaError> {
    let created =
        u.s3.create_multipart_upload()
            .bucket(&u.target.bucket)
            .key(u.key)
            .metadata(SHA256_META, u.expected)
            .checksum_algorithm(ChecksumAlgorithm::Crc32C)
            .send()
            .await
            .map_err(|e| remote("CreateMultipartUpload", e))?;
    let upload_id = created
        .upload_id()
        .ok_or_else(|| ReplicaError::Remote("CreateMultipartUpload: no upload id".into()))?
        .to_owned();
    let j = Journal {
        endpoint: u.target.endpoint.clone(),
        bucket: u.target.bucket.clone(),
        key: u.key.to_owned(),
        size: u.size,
        part_size: part,
        sha256: u.expected.to_owned(),
        upload_id,
        parts: Vec::new(),
    };
    write_journal(u.store, u.journal_path, &j).await?;
    Ok(j)
}

async fn write_journal(store: &Store, path: &str, j: &Journal) -> Result<(), ReplicaError> {
    let bytes = serde_json::to_vec(j).map_err(|e| ReplicaError::Invalid(e.to_string()))?;
    store.write_file_atomic(path, &bytes).await?;
    Ok(())
}

/// The journal of an earlier attempt at this very upload, with the parts the server still
/// holds; `None` to start afresh (a mismatched journal's upload is aborted).
async fn resume(u: Upload<'_>, part: u64) -> Result<Option<Journal>, ReplicaError> {
    let Upload {
        s3,
        store,
        size,
        expected,
        target,
        key,
        journal_path: path,
        ..
    } = u;
    let raw = match store.read_file(path, 4 << 20).await {
        Ok(raw) => raw,
        Err(e) if e.is_not_found() => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let Ok(mut j) = serde_json::from_slice::<Journal>(&raw) else {
        tracing::warn!(path, "An unreadable replica journal is set aside");
        return Ok(None);
    };
    let same = j.endpoint == target.endpoint
        && j.bucket == target.bucket
        && j.key == key
        && j.size == size
        && j.part_size == part
        && j.sha256 == expected;
    if !same {
        if j.endpoint == target.endpoint && j.bucket == target.bucket {
            let _ = s3
                .abort_multipart_upload()
                .bucket(&j.bucket)
                .key(&j.key)
                .upload_id(&j.upload_id)
                .send()
                .await;
        }
        return Ok(None);
    }
    // What the server holds of the upload (ListParts pages through up to 1,000 parts each).
    let mut held = std::collections::HashMap::new();
    let mut marker: Option<String> = None;
    loop {
        let r = s3
            .list_parts()
            .bucket(&target.bucket)
            .key(key)
            .upload_id(&j.upload_id)
            .set_part_number_marker(marker.clone())
            .send()
            .await;
        match r {
            Ok(out) => {
                for p in out.parts() {
                    if let Some(n) = p.part_number() {
                        held.insert(n, (p.e_tag().map(str::to_owned), p.size()));
                    }
                }
                if out.is_truncated() == Some(true) {
                    marker = out.next_part_number_marker().map(str::to_owned);
                    if marker.is_some() {
                        continue;
                    }
                }
                break;
            }
            Err(e) if code_of(&e).as_deref() == Some("NoSuchUpload") => {
                tracing::info!(
                    key,
                    "The interrupted upload is gone from the server: starting afresh"
                );
                return Ok(None);
            }
            Err(e) if code_of(&e).as_deref() == Some("NotImplemented") => {
                // The server cannot tell: the journal's parts are taken as they are.
                return Ok(Some(j));
            }
            Err(e) => return Err(remote("ListParts", e)),
        }
    }
    let count = size.div_ceil(part);
    j.parts.retain(|(n, etag, _)| {
        let len = if (*n as u64) == count {
            size - (count - 1) * part
        } else {
            part
        };
        // A server that lists no ETags (s3s-fs) is taken at the part's size.
        held.get(n)
            .is_some_and(|(e, s)| e.as_ref().is_none_or(|e| e == etag) && s.is_none_or(|s| s as u64 == len))
    });
    tracing::info!(
        key,
        parts = j.parts.len(),
        "Resuming an interrupted replica upload"
    );
    Ok(Some(j))
}

/// Aborts the multipart uploads under `key` other than `keep` (orphans of earlier attempts).
async fn abort_others(s3: &Client, target: &S3Target, key: &str, keep: &str) {
    let listed = s3
        .list_multipart_uploads()
        .bucket(&target.bucket)
        .prefix(key)
        .send()
        .await;
    match listed {
        Ok(out) => {
            for u in out.uploads() {
                let (Some(k), Some(id)) = (u.key(), u.upload_id()) else {
                    continue;
                };
                if k != key || id == keep {
                    continue;
                }
                match s3
                    .abort_multipart_upload()
                    .bucket(&target.bucket)
                    .key(k)
                    .upload_id(id)
                    .send()
                    .await
                {
                    Ok(_) => tracing::info!(key, upload = id, "Aborted an orphaned multipart upload"),
                    Err(e) => {
                        tracing::warn!(key, error = %remote("AbortMultipartUpload", e), "An orphaned multipart upload could not be aborted")
                    }
                }
            }
        }
        Err(e) => {
            tracing::debug!(key, error = %remote("ListMultipartUploads", e), "Orphaned uploads not listed")
        }
    }
}

/// Removes the object under `key` (and its companion, [`companion`]) and aborts the multipart
/// uploads still open under it; an object that is not there is not an error (S3's
/// `DeleteObject` succeeds then too).
pub async fn delete(target: &S3Target, key: &str, opts: &S3Options) -> Result<(), ReplicaError> {
    if key.is_empty() || key.len() > 1024 {
        return Err(ReplicaError::Invalid(format!("key of {} bytes", key.len())));
    }
    let s3 = client(target, opts)?;
    abort_others(&s3, target, key, "").await;
    s3.delete_object()
        .bucket(&target.bucket)
        .key(key)
        .send()
        .await
        .map_err(|e| remote("DeleteObject", e))?;
    if let Some((_, object)) = companion(key, key) {
        s3.delete_object()
            .bucket(&target.bucket)
            .key(&object)
            .send()
            .await
            .map_err(|e| remote("DeleteObject", e))?;
    }
    tracing::info!(key, bucket = %target.bucket, "Removed a replica");
    Ok(())
}

/// A presigned GET of `key`, valid `expires` (SigV4 query parameters; at most 7 days).
pub async fn presign(
    target: &S3Target,
    key: &str,
    expires: Duration,
    opts: &S3Options,
) -> Result<String, ReplicaError> {
    let s3 = client(target, opts)?;
    let config = aws_sdk_s3::presigning::PresigningConfig::expires_in(expires)
        .map_err(|e| ReplicaError::Invalid(format!("link validity: {e}")))?;
    let req = s3
        .get_object()
        .bucket(&target.bucket)
        .key(key)
        .presigned(config)
        .await
        .map_err(|e| {
            ReplicaError::Invalid(format!(
                "presigning {key}: {}",
                aws_sdk_s3::error::DisplayErrorContext(&e)
            ))
        })?;
    Ok(req.uri().to_owned())
}

/// Checks that the endpoint answers and the bucket is there for these credentials
/// (`HeadBucket`).
pub async fn probe(target: &S3Target, opts: &S3Options) -> Result<(), ReplicaError> {
    let s3 = client(target, opts)?;
    match s3.head_bucket().bucket(&target.bucket).send().await {
        Ok(_) => Ok(()),
        // A HEAD answer has no body, so no error code: the status says what went wrong.
        Err(e) => match e.raw_response().map(|r| r.status().as_u16()) {
            Some(404) => Err(ReplicaError::Remote(format!(
                "HeadBucket: NoSuchBucket (HTTP 404): bucket {} does not exist",
                target.bucket
            ))),
            Some(s @ (401 | 403)) => Err(ReplicaError::Remote(format!(
                "HeadBucket: AccessDenied (HTTP {s}): the credentials are not accepted for bucket {}",
                target.bucket
            ))),
            _ => Err(remote("HeadBucket", e)),
        },
    }
}

/// The object must be there with the file's size and SHA-256.
pub(crate) async fn verify(
    s3: &Client,
    target: &S3Target,
    key: &str,
    size: u64,
    sha256: &str,
) -> Result<(), ReplicaError> {
    let head = s3
        .head_object()
        .bucket(&target.bucket)
        .key(key)
        .send()
        .await
        .map_err(|e| remote("HeadObject", e))?;
    let len = head.content_length().unwrap_or(-1);
    if len != size as i64 {
        return Err(ReplicaError::Verify(format!(
            "{key} holds {len} bytes, {size} were sent"
        )));
    }
    let meta = head
        .metadata()
        .and_then(|m| m.get(SHA256_META))
        .map(String::as_str);
    if meta != Some(sha256) {
        return Err(ReplicaError::Verify(format!(
            "{key}'s sha256 metadata is {meta:?}, expected {sha256}"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_grow_so_any_size_fits() {
        assert_eq!(part_size(100 << 20, 16 << 20), 16 << 20);
        assert_eq!(part_size(1, 1), MIN_PART);
        for size in [1u64 << 30, 200 << 30, 5 << 40, 48_828_125 << 20] {
            let p = part_size(size, 16 << 20);
            assert!(size.div_ceil(p) <= MAX_PARTS, "{size}: {p}");
            assert_eq!(p % (1 << 20), 0);
        }
    }

    #[test]
    fn a_target_keeps_its_secret_out_of_debug() {
        let t = S3Target {
            endpoint: "http://127.0.0.1:9000".into(),
            region: "us-east-1".into(),
            bucket: "b".into(),
            access_key: "AK".into(),
            secret_key: "very-secret".into(),
            path_style: true,
            ca_pem: None,
        };
        assert!(!format!("{t:?}").contains("very-secret"));
    }
}
