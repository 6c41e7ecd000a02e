//! Object stores (S3, Swift): a zone's durable copy of what its NFS staging stores hold. Records,
//! CloudStack's `details` keys, the sealed secret, health, deletion.
//!
//! Invariants:
//! * the secret key is stored sealed with core's secrets key (row name `object_stores/<id>`); it
//!   is opened only to build the [`ObjectTarget`] sent to a storage VM over core's TLS channel,
//!   and never reaches a list answer, a log line or an error text;
//! * a store is deleted only while no object of ours may live there: no replica `Replicated` or
//!   `Deleting`, and none `Replicating` unless the store is Down (see
//!   [`crate::model::replicas`]); its other rows go with it;
//! * health is what the last probe or replication said, with the time it said it.

use std::collections::{BTreeMap, HashMap};

use sqlx::Row as _;
use systemvm_proto::Secret;
use systemvm_proto::agent::{ObjectTarget, S3Target, SwiftAuth, SwiftTarget};

use crate::model::{DomainError, DomainResult};
use crate::secrets::Opened;
use crate::state::State;
use crate::util::{new_uuid, now_cs, now_ms};

/// Health of an object store.
pub mod health {
    /// Not checked yet.
    pub const UNKNOWN: &str = "Unknown";
    /// The last probe or replication succeeded.
    pub const UP: &str = "Up";
    /// The last probe or replication failed (`healthdetail` says why).
    pub const DOWN: &str = "Down";
}

/// The `details` keys that hold secrets: kept out of the stored details.
const SECRET_KEYS: &[&str] = &["secretkey", "key"];

/// CloudStack's S3 `details` keys (and ours: `region`, `pathstyle`); anything else is refused,
/// so a misspelt key does not pass unnoticed.
pub const S3_KEYS: &[&str] = &[
    "accesskey",
    "secretkey",
    "bucket",
    "endpoint",
    "usehttps",
    "connectiontimeout",
    "maxerrorretry",
    "sockettimeout",
    "connectionttl",
    "usetcpkeepalive",
    "s3signer",
    "region",
    "pathstyle",
];

/// An S3 store as `addImageStore provider=S3` describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Config {
    /// `http(s)://host[:port]`.
    pub endpoint: String,
    /// Bucket.
    pub bucket: String,
    /// Signing region.
    pub region: String,
    /// Path-style addressing.
    pub path_style: bool,
    /// Access key id.
    pub access_key: String,
    /// Secret key.
    pub secret_key: Secret,
}

fn flag(details: &BTreeMap<String, String>, key: &str, default: bool) -> DomainResult<bool> {
    match details.get(key).map(|v| v.trim().to_ascii_lowercase()) {
        None => Ok(default),
        Some(v) if v == "true" => Ok(true),
        Some(v) if v == "false" => Ok(false),
        Some(v) => Err(DomainError::Invalid(format!(
            "details key {key} must be true or false, not {v:?}"
        ))),
    }
}

/// Reads an S3 store's settings from CloudStack's `details` keys (`accesskey`, `secretkey`,
/// `bucket`, `endpoint`, `usehttps`; the timeouts and `s3signer` are accepted and kept) and ours
/// (`region`, default `us-east-1`; `pathstyle`, default true). `endpoint` is `host[:port]` (the
/// scheme from `usehttps`, default https) or a whole `http(s)://host[:port]`; without it, `url`.
pub fn s3_config(url: Option<&str>, details: &BTreeMap<String, String>) -> DomainResult<S3Config> {
    if let Some(k) = details.keys().find(|k| !S3_KEYS.contains(&k.as_str())) {
        return Err(DomainError::Invalid(format!(
            "Unknown S3 details key {k:?}; expected one of {}",
            S3_KEYS.join(", ")
        )));
    }
    let need = |k: &str| -> DomainResult<String> {
        details
            .get(k)
            .map(|v| v.trim().to_owned())
            .filter(|v| !v.is_empty())
            .ok_or_else(|| DomainError::Invalid(format!("An S3 image store needs details key {k}")))
    };
    let access_key = need("accesskey")?;
    let secret_key = need("secretkey")?;
    let bucket = need("bucket")?;
    if bucket.len() > 255
        || bucket
            .chars()
            .any(|c| c == '/' || c.is_whitespace() || c.is_control())
    {
        return Err(DomainError::Invalid(format!("Invalid S3 bucket name {bucket:?}")));
    }
    let https = flag(details, "usehttps", true)?;
    let raw = match details
        .get("endpoint")
        .map(|v| v.trim())
        .filter(|v| !v.is_empty())
    {
        Some(e) => e.to_owned(),
        None => url.map(str::to_owned).ok_or_else(|| {
            DomainError::Invalid("An S3 image store needs details key endpoint (or url)".into())
        })?,
    };
    let endpoint = if raw.starts_with("http://") || raw.starts_with("https://") {
        raw.trim_end_matches('/').to_owned()
    } else {
        format!(
            "{}://{}",
            if https { "https" } else { "http" },
            raw.trim_end_matches('/')
        )
    };
    let authority = endpoint.split_once("://").map_or("", |(_, a)| a);
    if authority.is_empty()
        || authority.contains(['/', '?', '#', '@'])
        || authority.chars().any(|c| c.is_whitespace() || c.is_control())
        || endpoint.len() > crate::model::stores::MAX_URL_LEN
    {
        return Err(DomainError::Invalid(format!(
            "Invalid S3 endpoint {endpoint:?}: expected host[:port] or http(s)://host[:port]"
        )));
    }
    let region = details
        .get("region")
        .map(|v| v.trim().to_owned())
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| "us-east-1".into());
    Ok(S3Config {
        endpoint,
        bucket,
        region,
        path_style: flag(details, "pathstyle", true)?,
        access_key,
        secret_key: Secret(secret_key),
    })
}

/// CloudStack's Swift `details` keys (and ours: `container`, `authversion`, `domain`,
/// `project`, `segmentsize`).
pub const SWIFT_KEYS: &[&str] = &[
    "account",
    "username",
    "key",
    "storagepolicy",
    "container",
    "authversion",
    "domain",
    "project",
    "segmentsize",
];

/// The default segment size of Swift's static large objects (ours).
pub const SWIFT_SEGMENT: u64 = 64 << 20;

/// A Swift store as `addImageStore provider=Swift` describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SwiftConfig {
    /// The auth URL (v1) or identity URL (v3).
    pub auth_url: String,
    /// `account:username` (v1) or the user name (v3).
    pub user: String,
    /// The key or password.
    pub key: Secret,
    /// The container.
    pub container: String,
    /// 1 (tempauth) or 3 (Keystone).
    pub version: u8,
    /// Keystone v3: the domain of the user and project.
    pub domain: String,
    /// Keystone v3: the project (default: `account`).
    pub project: String,
    /// The smallest segment of a large object.
    pub segment_size: u64,
}

/// Reads a Swift store's settings: `url` (the auth URL) and CloudStack's `account`, `username`,
/// `key` (tempauth's user is `account:username`); ours: `container` (default `templates`),
/// `authversion` (1 or 3, default 1), `domain` (default `Default`), `project` (default the
/// account), `segmentsize` (bytes, default 64 MiB, at least 1 MiB).
pub fn swift_config(url: Option<&str>, details: &BTreeMap<String, String>) -> DomainResult<SwiftConfig> {
    if let Some(k) = details.keys().find(|k| !SWIFT_KEYS.contains(&k.as_str())) {
        return Err(DomainError::Invalid(format!(
            "Unknown Swift details key {k:?}; expected one of {}",
            SWIFT_KEYS.join(", ")
        )));
    }
    let get = |k: &str| {
        details
            .get(k)
            .map(|v| v.trim().to_owned())
            .filter(|v| !v.is_empty())
    };
    let need = |k: &str| {
        get(k).ok_or_else(|| DomainError::Invalid(format!("A Swift image store needs details key {k}")))
    };
    let auth_url = url
        .map(|u| u.trim().trim_end_matches('/').to_owned())
        .filter(|u| u.starts_with("http://") || u.starts_with("https://"))
        .ok_or_else(|| DomainError::Invalid("A Swift image store needs url: its http(s) auth URL".into()))?;
    if auth_url.len() > crate::model::stores::MAX_URL_LEN
        || auth_url.chars().any(|c| c.is_whitespace() || c.is_control())
    {
        return Err(DomainError::Invalid(format!(
            "Invalid Swift auth URL {auth_url:?}"
        )));
    }
    let account = need("account")?;
    let username = need("username")?;
    let key = need("key")?;
    let version = match get("authversion").as_deref() {
        None | Some("1") => 1,
        Some("3") => 3,
        Some(v) => {
            return Err(DomainError::Invalid(format!(
                "details key authversion must be 1 or 3, not {v:?}"
            )));
        }
    };
    let container = get("container").unwrap_or_else(|| "templates".into());
    if container.len() > 256
        || container.contains('/')
        || container.chars().any(|c| c.is_whitespace() || c.is_control())
    {
        return Err(DomainError::Invalid(format!(
            "Invalid Swift container name {container:?}"
        )));
    }
    let segment_size = match get("segmentsize") {
        None => SWIFT_SEGMENT,
        Some(v) => v.parse::<u64>().ok().filter(|n| *n >= 1 << 20).ok_or_else(|| {
            DomainError::Invalid(format!(
                "details key segmentsize must be bytes, at least 1048576, not {v:?}"
            ))
        })?,
    };
    Ok(SwiftConfig {
        auth_url,
        user: if version == 1 {
            format!("{account}:{username}")
        } else {
            username
        },
        key: Secret(key),
        container,
        version,
        domain: get("domain").unwrap_or_else(|| "Default".into()),
        project: get("project").unwrap_or(account),
        segment_size,
    })
}

fn seal_name(id: &str) -> String {
    format!("object_stores/{id}")
}

/// Records an S3 store; returns its id.
pub async fn add_s3(
    state: &State,
    name: &str,
    zone_id: &str,
    c: &S3Config,
    details: &BTreeMap<String, String>,
) -> DomainResult<String> {
    let row = NewStore {
        provider: "S3",
        endpoint: &c.endpoint,
        bucket: &c.bucket,
        region: &c.region,
        path_style: c.path_style,
        access_key: &c.access_key,
        secret: c.secret_key.expose(),
    };
    let id = new_uuid().map_err(|e| DomainError::Internal(e.to_string()))?;
    add(state, &id, name, zone_id, &row, details).await
}

/// Records a Swift store; returns its id.
pub async fn add_swift(
    state: &State,
    name: &str,
    zone_id: &str,
    c: &SwiftConfig,
    details: &BTreeMap<String, String>,
) -> DomainResult<String> {
    let mut kept = details.clone();
    kept.insert("authversion".into(), c.version.to_string());
    kept.insert("domain".into(), c.domain.clone());
    kept.insert("project".into(), c.project.clone());
    kept.insert("segmentsize".into(), c.segment_size.to_string());
    let id = new_uuid().map_err(|e| DomainError::Internal(e.to_string()))?;
    let temp_key = crate::util::random_token::<32>().map_err(|e| DomainError::Internal(e.to_string()))?;
    let sealed = state
        .secrets
        .seal(&format!("{}/tempurl", seal_name(&id)), &temp_key)
        .map_err(|e| DomainError::Internal(e.to_string()))?;
    kept.insert("tempurlkey".into(), sealed);
    let row = NewStore {
        provider: "Swift",
        endpoint: &c.auth_url,
        bucket: &c.container,
        region: "",
        path_style: true,
        access_key: &c.user,
        secret: c.key.expose(),
    };
    add(state, &id, name, zone_id, &row, &kept).await
}

/// An object store's row.
struct NewStore<'a> {
    provider: &'a str,
    endpoint: &'a str,
    bucket: &'a str,
    region: &'a str,
    path_style: bool,
    access_key: &'a str,
    secret: &'a str,
}

async fn add(
    state: &State,
    id: &str,
    name: &str,
    zone_id: &str,
    c: &NewStore<'_>,
    details: &BTreeMap<String, String>,
) -> DomainResult<String> {
    let id = id.to_owned();
    let sealed = state
        .secrets
        .seal(&seal_name(&id), c.secret)
        .map_err(|e| DomainError::Internal(e.to_string()))?;
    let kept: serde_json::Map<String, serde_json::Value> = details
        .iter()
        .filter(|(k, _)| !SECRET_KEYS.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
        .collect();
    let nfs_named: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM image_stores WHERE name = $1")
        .bind(name.to_owned())
        .fetch_one(&state.db.pool)
        .await?;
    if nfs_named > 0 {
        return Err(DomainError::Invalid(format!(
            "An image store named {name} already exists"
        )));
    }
    let r = sqlx::query(
        "INSERT INTO object_stores (id, name, provider, zone_id, endpoint, bucket, region, path_style, access_key, secret_key, details, created) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
    )
    .bind(id.clone())
    .bind(name.to_owned())
    .bind(c.provider.to_owned())
    .bind(zone_id.to_owned())
    .bind(c.endpoint.to_owned())
    .bind(c.bucket.to_owned())
    .bind(c.region.to_owned())
    .bind(i64::from(c.path_style))
    .bind(c.access_key.to_owned())
    .bind(sealed)
    .bind(serde_json::Value::Object(kept).to_string())
    .bind(now_cs())
    .execute(&state.db.pool)
    .await;
    match r {
        Ok(_) => {
            tracing::info!(%id, name, provider = c.provider, endpoint = %c.endpoint, bucket = %c.bucket, "Added an object store");
            Ok(id)
        }
        Err(sqlx::Error::Database(d)) if d.is_unique_violation() => Err(DomainError::Invalid(format!(
            "An image store named {name} already exists"
        ))),
        Err(e) => Err(e.into()),
    }
}

/// An object store as listed.
#[derive(Debug, Clone)]
pub struct ObjectStore {
    /// Id.
    pub id: String,
    /// Name.
    pub name: String,
    /// `S3`.
    pub provider: String,
    /// Zone.
    pub zone_id: String,
    /// Zone name.
    pub zone_name: String,
    /// Endpoint URL.
    pub endpoint: String,
    /// Bucket.
    pub bucket: String,
    /// When it was added.
    pub created: String,
    /// [`health`].
    pub health: String,
    /// Why it is Down.
    pub health_detail: Option<String>,
    /// When health was last set (ms since the epoch; 0: never).
    pub health_checked_ms: i64,
}

impl ObjectStore {
    /// `protocol` as listed: the endpoint's scheme.
    pub fn protocol(&self) -> &str {
        self.endpoint.split_once("://").map_or("https", |(s, _)| s)
    }

    /// `url` as listed: S3's endpoint and bucket; Swift's auth URL (as CloudStack lists it).
    pub fn url(&self) -> String {
        if self.provider == "Swift" {
            self.endpoint.clone()
        } else {
            format!("{}/{}", self.endpoint, self.bucket)
        }
    }
}

/// Every object store, oldest first.
pub async fn list(state: &State) -> Result<Vec<ObjectStore>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT o.id, o.name, o.provider, o.zone_id, z.name AS zone_name, o.endpoint, o.bucket, o.created, o.health, o.health_detail, o.health_checked_ms \
         FROM object_stores o JOIN zones z ON z.id = o.zone_id ORDER BY o.created, o.name",
    )
    .fetch_all(&state.db.pool)
    .await?;
    rows.iter()
        .map(|r| {
            Ok(ObjectStore {
                id: r.try_get("id")?,
                name: r.try_get("name")?,
                provider: r.try_get("provider")?,
                zone_id: r.try_get("zone_id")?,
                zone_name: r.try_get("zone_name")?,
                endpoint: r.try_get("endpoint")?,
                bucket: r.try_get("bucket")?,
                created: r.try_get("created")?,
                health: r.try_get("health")?,
                health_detail: r.try_get("health_detail")?,
                health_checked_ms: r.try_get("health_checked_ms")?,
            })
        })
        .collect()
}

/// The object store `id`, if it is one.
pub async fn get(state: &State, id: &str) -> Result<Option<ObjectStore>, sqlx::Error> {
    Ok(list(state).await?.into_iter().find(|s| s.id == id))
}

/// Where storage VMs send store `id`'s objects: endpoint, bucket and the opened credentials.
pub async fn target(state: &State, id: &str) -> DomainResult<ObjectTarget> {
    let row = sqlx::query("SELECT provider, endpoint, bucket, region, path_style, access_key, secret_key, details FROM object_stores WHERE id = $1")
        .bind(id.to_owned())
        .fetch_optional(&state.db.pool)
        .await?
        .ok_or_else(|| DomainError::NotFound(format!("Unable to find object store {id}")))?;
    let sealed: String = row.try_get("secret_key")?;
    let secret = match state.secrets.open(&seal_name(id), &sealed) {
        Ok(Opened::Sealed(s)) => s,
        // Never stored in the clear; a plain value is a row someone wrote by hand.
        Ok(Opened::Plain(_)) => {
            return Err(DomainError::Internal(format!(
                "the secret key of object store {id} is not sealed"
            )));
        }
        Err(e) => return Err(DomainError::Internal(e.to_string())),
    };
    if row.try_get::<String, _>("provider")? == "Swift" {
        let details: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(&row.try_get::<String, _>("details")?).unwrap_or_default();
        let d = |k: &str| {
            details
                .get(k)
                .and_then(|v| v.as_str())
                .unwrap_or_default()
                .to_owned()
        };
        let user: String = row.try_get("access_key")?;
        let auth = if d("authversion") == "3" {
            SwiftAuth::V3 {
                user,
                password: Secret(secret),
                project: d("project"),
                domain: d("domain"),
            }
        } else {
            SwiftAuth::V1 {
                user,
                key: Secret(secret),
            }
        };
        return Ok(ObjectTarget::Swift(SwiftTarget {
            auth_url: row.try_get("endpoint")?,
            auth,
            container: row.try_get("bucket")?,
            segment_size: d("segmentsize").parse().unwrap_or(SWIFT_SEGMENT),
            ca_pem: None,
            temp_url_key: temp_url_key(state, id, &d("tempurlkey"))?,
        }));
    }
    Ok(ObjectTarget::S3(S3Target {
        endpoint: row.try_get("endpoint")?,
        region: row.try_get("region")?,
        bucket: row.try_get("bucket")?,
        access_key: row.try_get("access_key")?,
        secret_key: Secret(secret),
        path_style: row.try_get::<i64, _>("path_style")? != 0,
        ca_pem: None,
    }))
}

/// A Swift store's temp URL key (sealed in its details when it was added).
fn temp_url_key(state: &State, id: &str, sealed: &str) -> DomainResult<Option<Secret>> {
    if sealed.is_empty() {
        return Ok(None);
    }
    match state.secrets.open(&format!("{}/tempurl", seal_name(id)), sealed) {
        Ok(Opened::Sealed(k)) => Ok(Some(Secret(k))),
        Ok(Opened::Plain(_)) => Err(DomainError::Internal(format!(
            "the temp URL key of object store {id} is not sealed"
        ))),
        Err(e) => Err(DomainError::Internal(e.to_string())),
    }
}

/// Records the outcome of a probe or a replication: `Ok` is Up, `Err(why)` Down.
pub async fn set_health(state: &State, id: &str, outcome: Result<(), &str>) -> Result<(), sqlx::Error> {
    let (h, detail) = match outcome {
        Ok(()) => (health::UP, None),
        Err(why) => (health::DOWN, Some(why.chars().take(1000).collect::<String>())),
    };
    sqlx::query(
        "UPDATE object_stores SET health = $1, health_detail = $2, health_checked_ms = $3 WHERE id = $4",
    )
    .bind(h)
    .bind(detail)
    .bind(now_ms())
    .bind(id.to_owned())
    .execute(&state.db.pool)
    .await?;
    Ok(())
}

/// Bytes of the complete replicas in each object store.
pub async fn used_bytes(state: &State) -> Result<HashMap<String, u64>, sqlx::Error> {
    let rows: Vec<(String, i64)> = sqlx::query_as(
        "SELECT store_id, COALESCE(SUM(size), 0) FROM replicas WHERE state = 'Replicated' GROUP BY store_id",
    )
    .fetch_all(&state.db.pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(id, n)| (id, u64::try_from(n).unwrap_or(0)))
        .collect())
}

/// Deletes object store `id` while no object of ours lives there. `Ok(false)`: `id` is no
/// object store.
pub async fn delete(state: &State, id: &str) -> DomainResult<bool> {
    let mut tx = state.db.pool.begin().await?;
    let exists: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM object_stores WHERE id = $1")
        .bind(id.to_owned())
        .fetch_one(&mut *tx)
        .await?;
    if exists == 0 {
        return Ok(false);
    }
    // A copy in flight may still complete into a store that answers; one that is Down cannot.
    let live: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM replicas r JOIN object_stores o ON o.id = r.store_id WHERE r.store_id = $1 \
         AND (r.state IN ('Replicated', 'Deleting') OR (r.state = 'Replicating' AND o.health <> 'Down'))",
    )
    .bind(id.to_owned())
    .fetch_one(&mut *tx)
    .await?;
    if live > 0 {
        return Err(DomainError::InUse(format!(
            "Cannot delete image store {id}: it holds {live} replica(s) of templates, ISOs or snapshots; delete them first"
        )));
    }
    sqlx::query("DELETE FROM replicas WHERE store_id = $1")
        .bind(id.to_owned())
        .execute(&mut *tx)
        .await?;
    sqlx::query("DELETE FROM object_stores WHERE id = $1")
        .bind(id.to_owned())
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    tracing::info!(%id, "Deleted an object store");
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn cloudstack_details_make_an_s3_config() {
        let base = [("accesskey", "AK"), ("secretkey", "SK"), ("bucket", "b1")];
        let mut with = d(&base);
        with.insert("endpoint".into(), "s3.example:9000".into());
        with.insert("usehttps".into(), "false".into());
        let c = s3_config(None, &with).unwrap();
        assert_eq!(c.endpoint, "http://s3.example:9000");
        assert_eq!(
            (c.bucket.as_str(), c.region.as_str(), c.path_style),
            ("b1", "us-east-1", true)
        );
        assert_eq!(c.secret_key.expose(), "SK");
        // Default https; a whole URL as endpoint; url when there is no endpoint.
        let mut h = d(&base);
        h.insert("endpoint".into(), "s3.example".into());
        assert_eq!(s3_config(None, &h).unwrap().endpoint, "https://s3.example");
        assert_eq!(
            s3_config(Some("http://127.0.0.1:9/"), &d(&base))
                .unwrap()
                .endpoint,
            "http://127.0.0.1:9"
        );
        let mut r = d(&base);
        r.insert("endpoint".into(), "http://h".into());
        r.insert("region".into(), "eu-west-3".into());
        r.insert("connectiontimeout".into(), "5000".into());
        assert_eq!(s3_config(None, &r).unwrap().region, "eu-west-3");
    }

    fn details_strategy(
        keys: &'static [&'static str],
    ) -> impl proptest::strategy::Strategy<Value = BTreeMap<String, String>> {
        use proptest::prelude::*;
        let key = prop_oneof![
            proptest::sample::select(keys).prop_map(str::to_owned),
            "[a-z]{1,12}",
        ];
        proptest::collection::btree_map(key, ".{0,40}", 0..8)
    }

    proptest::proptest! {
        /// Any details (as an API caller may send them): a config or a clear refusal, never a
        /// panic, and the secret never in the refusal.
        #[test]
        fn arbitrary_details_never_panic_nor_echo_the_secret(
            mut d in details_strategy(S3_KEYS),
            mut w in details_strategy(SWIFT_KEYS),
            url in proptest::option::of(".{0,60}"),
        ) {
            d.insert("secretkey".into(), "S3-SECRET-VALUE-123".into());
            w.insert("key".into(), "SWIFT-SECRET-VALUE-456".into());
            if let Err(e) = s3_config(url.as_deref(), &d) {
                proptest::prop_assert!(!e.to_string().contains("S3-SECRET-VALUE-123"), "{}", e);
            }
            if let Err(e) = swift_config(url.as_deref(), &w) {
                proptest::prop_assert!(!e.to_string().contains("SWIFT-SECRET-VALUE-456"), "{}", e);
            }
        }
    }

    #[test]
    fn swift_details_make_a_swift_config() {
        let d = d(&[("account", "test"), ("username", "tester"), ("key", "K")]);
        let c = swift_config(Some("http://127.0.0.1:8080/auth/v1.0/"), &d).unwrap();
        assert_eq!(
            (c.user.as_str(), c.container.as_str(), c.version),
            ("test:tester", "templates", 1)
        );
        assert_eq!(
            (c.auth_url.as_str(), c.segment_size),
            ("http://127.0.0.1:8080/auth/v1.0", SWIFT_SEGMENT)
        );
        let mut v3 = d.clone();
        v3.insert("authversion".into(), "3".into());
        v3.insert("segmentsize".into(), "1048576".into());
        let c = swift_config(Some("https://k:5000/v3"), &v3).unwrap();
        assert_eq!(
            (c.user.as_str(), c.project.as_str(), c.domain.as_str()),
            ("tester", "test", "Default")
        );
        for (k, v) in [
            ("authversion", "2"),
            ("segmentsize", "1000"),
            ("container", "a/b"),
            ("bucket", "x"),
        ] {
            let mut m = d.clone();
            m.insert(k.into(), v.into());
            assert!(
                matches!(
                    swift_config(Some("http://h/auth/v1.0"), &m),
                    Err(DomainError::Invalid(_))
                ),
                "{k}={v}"
            );
        }
        assert!(swift_config(None, &d).is_err());
        assert!(swift_config(Some("ftp://h/"), &d).is_err());
    }

    #[test]
    fn bad_details_are_refused_with_the_key_named() {
        let ok = [
            ("accesskey", "AK"),
            ("secretkey", "SK"),
            ("bucket", "b"),
            ("endpoint", "h"),
        ];
        for (drop, why) in [
            ("accesskey", "accesskey"),
            ("secretkey", "secretkey"),
            ("bucket", "bucket"),
            ("endpoint", "endpoint"),
        ] {
            let mut m = d(&ok);
            m.remove(drop);
            let e = s3_config(None, &m).unwrap_err().to_string();
            assert!(e.contains(why), "{e}");
        }
        for (k, v) in [
            ("endpoint", "http://h/path"),
            ("endpoint", "http://u@h"),
            ("bucket", "a/b"),
            ("usehttps", "yes"),
            ("secretkeyy", "x"),
        ] {
            let mut m = d(&ok);
            m.insert(k.into(), v.into());
            assert!(
                matches!(s3_config(None, &m), Err(DomainError::Invalid(_))),
                "{k}={v}"
            );
        }
        // The secret is never in an error.
        let mut m = d(&ok);
        m.insert("usehttps".into(), "maybe".into());
        m.insert("secretkey".into(), "TOP-SECRET".into());
        assert!(
            !s3_config(None, &m)
                .unwrap_err()
                .to_string()
                .contains("TOP-SECRET")
        );
    }
}
