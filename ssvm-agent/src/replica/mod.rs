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
