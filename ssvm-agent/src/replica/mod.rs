//! Replicas of store artefacts in object stores: a file of the NFS staging store copied to an
//! object under a key, checksummed on the way and verified after.
//!
//! Code map:
//! - [`s3`]: S3 (aws-sdk-s3): one PUT below a cutoff, multipart above it with parts that grow so
//!   any size fits in 10,000, CRC32C per part, the whole object's SHA-256 as metadata, resume of
//!   an interrupted upload from a journal on the staging store, orphaned uploads aborted; a
//!   template's `template.properties` beside its image; probes and removals.
//! - [`restore`]: an S3 object brought back into the staging store (a rebuild), verified before
//!   it takes its place.
//! - [`swift`]: OpenStack Swift over HTTP: auth v1 or Keystone v3, static large objects with
//!   MD5-checked segments, resume by segment, segment cleanup; its restores too.
//! - [`replicate`], [`delete`], [`probe`], [`fetch`]: the same for any [`ObjectTarget`].
//!
//! Invariants:
//! - An object appears under its final key only complete: a single PUT, or a multipart upload
//!   completed after every part is in and the file's SHA-256 matched the one it was asked for.
//! - A replica is reported done only after the object store answered for it with the file's
//!   size and SHA-256.
//! - Credentials live in [`systemvm_proto::Secret`]: never in a log line, an error or a journal.

pub mod restore;
pub mod s3;
pub mod swift;

use systemvm_proto::agent::{Fetched, ObjectTarget, Replicated};

use crate::store::Store;

/// Bytes written to the store at once when an object lands.
const LAND_WRITE: usize = 1 << 20;

/// Lands an object's body (the stream of its chunks) at `path` in `store`:
/// streamed into `<path>.part` in writes of [`LAND_WRITE`] while hashing, renamed into place only
/// when it hashes to `expected` (lowercase hex) and, when `size` is known, has that length; the
/// part file is removed on any failure. Returns the bytes written.
pub(crate) async fn land(
    store: &Store,
    path: &str,
    expected: &str,
    size: Option<u64>,
    chunks: impl futures_util::Stream<Item = Result<bytes::Bytes, ReplicaError>> + Send,
) -> Result<u64, ReplicaError> {
    if let Some((dir, _)) = path.rsplit_once('/') {
        store.create_dir_all(dir).await?;
    }
    let part = format!("{path}.part");
    let outcome = match write_part(store, &part, chunks).await {
        Ok((n, _)) if size.is_some_and(|s| s != n) => Err(ReplicaError::Verify(format!(
            "{path}: {n} bytes arrived, {} expected",
            size.unwrap_or_default()
        ))),
        Ok((_, actual)) if actual != expected => Err(ReplicaError::Checksum {
            expected: expected.to_owned(),
            actual,
        }),
        other => other.map(|(n, _)| n),
    };
    match outcome {
        Ok(n) => {
            store.rename(&part, path).await?;
            Ok(n)
        }
        Err(e) => {
            let _ = store.remove_file(&part).await;
            Err(e)
        }
    }
}

/// Writes the chunks into a new `part` file; its length and SHA-256.
async fn write_part(
    store: &Store,
    part: &str,
    chunks: impl futures_util::Stream<Item = Result<bytes::Bytes, ReplicaError>> + Send,
) -> Result<(u64, String), ReplicaError> {
    use futures_util::TryStreamExt as _;
    use sha2::Digest as _;
    let mut chunks = std::pin::pin!(chunks);
    let file = store.create(part).await?;
    let mut hash = sha2::Sha256::new();
    let mut buf = bytes::BytesMut::with_capacity(LAND_WRITE);
    let mut offset = 0u64;
    loop {
        let chunk = chunks.try_next().await?;
        let end = chunk.is_none();
        if let Some(c) = chunk {
            hash.update(&c);
            buf.extend_from_slice(&c);
        }
        while buf.len() >= LAND_WRITE || (end && !buf.is_empty()) {
            let n = buf.len().min(LAND_WRITE);
            store.write_at(&file, offset, buf.split_to(n).freeze()).await?;
            offset += n as u64;
        }
        if end {
            break;
        }
    }
    store.flush(&file).await?;
    Ok((offset, hex::encode(hash.finalize())))
}

/// Copies `path` of `store` (it must hash to `sha256`) to `key` in `target`.
pub async fn replicate(
    store: &Store,
    path: &str,
    sha256: &str,
    target: &ObjectTarget,
    key: &str,
) -> Result<Replicated, ReplicaError> {
    match target {
        ObjectTarget::S3(t) => s3::replicate(store, path, sha256, t, key, &s3::S3Options::default()).await,
        ObjectTarget::Swift(t) => swift::replicate(store, path, sha256, t, key).await,
    }
}

/// Removes the replica under `key` (with its companion and what an unfinished upload left).
pub async fn delete(target: &ObjectTarget, key: &str) -> Result<(), ReplicaError> {
    match target {
        ObjectTarget::S3(t) => s3::delete(t, key, &s3::S3Options::default()).await,
        ObjectTarget::Swift(t) => swift::delete(t, key).await,
    }
}

/// Checks that the object store takes these credentials and has the bucket or container.
pub async fn probe(target: &ObjectTarget) -> Result<(), ReplicaError> {
    match target {
        ObjectTarget::S3(t) => s3::probe(t, &s3::S3Options::default()).await,
        ObjectTarget::Swift(t) => swift::probe(t).await,
    }
}

/// A link that GETs the replica `key` until `expires` from now: a presigned S3 URL or a Swift
/// temp URL.
pub async fn presign(
    target: &ObjectTarget,
    key: &str,
    expires: std::time::Duration,
) -> Result<String, ReplicaError> {
    match target {
        ObjectTarget::S3(t) => s3::presign(t, key, expires, &s3::S3Options::default()).await,
        ObjectTarget::Swift(t) => swift::temp_url(t, key, expires).await,
    }
}

/// Brings the replica `key` back to `path` in `store`, verified against `sha256`.
pub async fn fetch(
    store: &Store,
    path: &str,
    key: &str,
    sha256: &str,
    target: &ObjectTarget,
) -> Result<Fetched, ReplicaError> {
    match target {
        ObjectTarget::S3(t) => restore::fetch(store, path, key, sha256, t, &s3::S3Options::default()).await,
        ObjectTarget::Swift(t) => swift::fetch(store, path, key, sha256, t).await,
    }
}

/// Why a replication failed: what the operator sees in the job's answer.
#[derive(Debug, thiserror::Error)]
pub enum ReplicaError {
    /// The staging store failed.
    #[error("staging store: {0}")]
    Store(#[from] crate::store::StoreError),
    /// The object store refused or failed a request (its error code and message).
    #[error("object store: {0}")]
    Remote(String),
    /// The object store could not be reached.
    #[error("object store unreachable: {0}")]
    Unreachable(String),
    /// The staging copy does not hash to what it should: nothing was completed.
    #[error("the staging copy's SHA-256 is {actual}, expected {expected}: the replica was not completed")]
    Checksum {
        /// What the artefact's record says.
        expected: String,
        /// What the file hashed to.
        actual: String,
    },
    /// The object store holds something else than what was sent.
    #[error("verification failed: {0}")]
    Verify(String),
    /// The request itself is unusable (endpoint, bucket, key).
    #[error("invalid replica target: {0}")]
    Invalid(String),
}
