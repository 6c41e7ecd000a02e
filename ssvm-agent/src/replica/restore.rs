//! Bringing a replica back from S3 into the staging store (a store rebuilt after it was lost):
//! the object streamed into `<path>.part`, hashed on the way, renamed into place only when its
//! SHA-256 matches both the record core sent and the object's own `sha256` metadata; a
//! template's `template.properties` restored beside it (verified against its metadata too).
//!
//! Invariants: nothing appears under `path` unless it is complete and verified (a failure removes
//! the part file); an existing file at `path` is replaced only by a verified one.

use aws_sdk_s3::Client;
use sha2::{Digest, Sha256};
use systemvm_proto::agent::Fetched;

use super::ReplicaError;
use super::s3::{self, MAX_COMPANION, S3Options, S3Target, SHA256_META};
use crate::store::Store;

/// Restores the object `key` to `path` in `store`; `sha256` is the artefact's record.
pub async fn fetch(
    store: &Store,
    path: &str,
    key: &str,
    sha256: &str,
    target: &S3Target,
    opts: &S3Options,
) -> Result<Fetched, ReplicaError> {
    if key.is_empty() || key.len() > 1024 {
        return Err(ReplicaError::Invalid(format!("key of {} bytes", key.len())));
    }
    let expected = sha256.to_ascii_lowercase();
    let client = s3::client(target, opts)?;
    let size = head(&client, target, key, &expected).await?;
    let object = client
        .get_object()
        .bucket(&target.bucket)
        .key(key)
        .send()
        .await
        .map_err(|e| s3::remote("GetObject", e))?;
    let k = key.to_owned();
    let chunks = futures_util::stream::try_unfold(object.body, move |mut body| {
        let k = k.clone();
        async move {
            let chunk = body.try_next().await.map_err(|e| body_error(&k, &e))?;
            Ok(chunk.map(|c| (c, body)))
        }
    });
    super::land(store, path, &expected, Some(size), chunks).await?;
    let mut companions = Vec::new();
    if let Some((file, object)) = s3::companion(path, key)
        && let Some(data) = small(&client, target, &object).await?
    {
        store.write_file_atomic(&file, &data).await?;
        companions.push(file);
    }
    tracing::info!(key, path, size, "Replica restored into the store");
    Ok(Fetched {
        path: path.to_owned(),
        size,
        sha256: expected,
        companions,
    })
}

/// The object's size, once its `sha256` metadata says it is the file asked for.
async fn head(client: &Client, target: &S3Target, key: &str, expected: &str) -> Result<u64, ReplicaError> {
    let head = client
        .head_object()
        .bucket(&target.bucket)
        .key(key)
        .send()
        .await
        .map_err(|e| s3::remote("HeadObject", e))?;
    let meta = head
        .metadata()
        .and_then(|m| m.get(SHA256_META))
        .map(|s| s.to_ascii_lowercase());
    if meta.as_deref() != Some(expected) {
        return Err(ReplicaError::Verify(format!(
            "{key}'s sha256 metadata is {meta:?}, the record says {expected}"
        )));
    }
    u64::try_from(head.content_length().unwrap_or(-1))
        .map_err(|_| ReplicaError::Verify(format!("{key} has no size")))
}

/// A failure while reading an object's body: the SDK checks the CRC32C stored with the object
/// as the bytes arrive, so a damaged object shows here.
fn body_error(key: &str, e: &(dyn std::error::Error + 'static)) -> ReplicaError {
    let text = aws_sdk_s3::error::DisplayErrorContext(e).to_string();
    if text.to_ascii_lowercase().contains("checksum") {
        ReplicaError::Verify(format!("GetObject {key}: {text}"))
    } else {
        ReplicaError::Unreachable(format!("GetObject {key}: {text}"))
    }
}

/// A small object (a companion), checked against its `sha256` metadata; `None` when there is
/// none.
async fn small(client: &Client, target: &S3Target, key: &str) -> Result<Option<Vec<u8>>, ReplicaError> {
    let object = match client.get_object().bucket(&target.bucket).key(key).send().await {
        Ok(o) => o,
        Err(e) if e.as_service_error().is_some_and(|s| s.is_no_such_key()) => return Ok(None),
        Err(e) => return Err(s3::remote("GetObject", e)),
    };
    let meta = object
        .metadata()
        .and_then(|m| m.get(SHA256_META))
        .map(|s| s.to_ascii_lowercase());
    if object.content_length().is_some_and(|n| n > MAX_COMPANION as i64) {
        return Err(ReplicaError::Verify(format!(
            "{key} is larger than {MAX_COMPANION} bytes"
        )));
    }
    let data = object
        .body
        .collect()
        .await
        .map_err(|e| body_error(key, &e))?
        .into_bytes()
        .to_vec();
    let actual = hex::encode(Sha256::digest(&data));
    if meta.as_deref() != Some(actual.as_str()) {
        return Err(ReplicaError::Verify(format!(
            "{key} hashes to {actual}, its sha256 metadata is {meta:?}"
        )));
    }
    Ok(Some(data))
}
