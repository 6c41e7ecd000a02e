//! Image stores (secondary storage): URLs, records, which storage VM serves a store, capacity.
//!
//! Invariants:
//! * a store URL is stored normalized, in the form agents report it (no trailing `/`, no default
//!   NFS port), so a store and a storage VM's report compare as equal strings;
//! * a store is deleted only while no live template, snapshot or volume references it; the
//!   records of removed templates on it go with it;
//! * capacity figures come from the storage VMs' heartbeats, never from a call that could block
//!   on a hung store.

use std::collections::HashMap;

use serde_json::Value;

use crate::model::systemvms::{self, StorageAgent};
use crate::model::{DomainError, DomainResult, settings};
use crate::state::State;
use crate::util::{new_uuid, now_cs};

/// Longest URL accepted (stores and download sources).
pub const MAX_URL_LEN: usize = 2048;

/// What kind of store a URL names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// `nfs://HOST[:PORT]/EXPORT`.
    Nfs,
    /// `file:///PATH` (a directory on the storage VM's host).
    File,
}

impl Protocol {
    /// `protocol` as listed.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Nfs => "nfs",
            Self::File => "file",
        }
    }

    /// `providername` as listed.
    pub fn provider(self) -> &'static str {
        match self {
            Self::Nfs => "NFS",
            Self::File => "Local",
        }
    }
}

/// Checks an image store URL; returns its protocol.
pub fn protocol_of(url: &str) -> DomainResult<Protocol> {
    let bad = |why: &str| DomainError::Invalid(format!("Invalid image store URL {url:?}: {why}"));
    if url.len() > MAX_URL_LEN || url.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(bad("too long or contains spaces or control characters"));
    }
    if let Some(rest) = url.strip_prefix("nfs://") {
        let (host, path) = rest
            .split_once('/')
            .ok_or_else(|| bad("expected nfs://HOST/EXPORT"))?;
        if host.is_empty() || path.trim_matches('/').is_empty() {
            return Err(bad("expected nfs://HOST/EXPORT"));
        }
        Ok(Protocol::Nfs)
    } else if let Some(path) = url.strip_prefix("file://") {
        if !path.starts_with('/') || path.split('/').any(|c| c == "..") {
            return Err(bad("expected file:///ABSOLUTE/PATH"));
        }
        Ok(Protocol::File)
    } else {
        Err(bad("NFS stores are nfs://HOST/EXPORT; local ones file:///PATH"))
    }
}

/// A store URL in the form agents report it: no trailing `/`, no default NFS port.
pub fn normalize_url(url: &str) -> String {
    let url = url.trim_end_matches('/');
    match url.strip_prefix("nfs://").and_then(|r| r.split_once('/')) {
        Some((host, rest)) => {
            let host = host.strip_suffix(":2049").unwrap_or(host);
            format!("nfs://{host}/{rest}")
        }
        None => url.to_owned(),
    }
}

/// Whether two store URLs name the same store.
pub fn same_store(a: &str, b: &str) -> bool {
    normalize_url(a) == normalize_url(b)
}

/// Records a new store; returns its id.
pub async fn add(
    state: &State,
    name: &str,
    url: &str,
    zone_id: &str,
    details: &serde_json::Map<String, Value>,
    role: &str,
) -> DomainResult<String> {
    let protocol = protocol_of(url)?;
    let id = new_uuid().map_err(|e| DomainError::Internal(e.to_string()))?;
    let r = sqlx::query(
        "INSERT INTO image_stores (id, name, url, provider, protocol, zone_id, details, created, role) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
    )
    .bind(id.clone())
    .bind(name.to_owned())
    .bind(normalize_url(url))
    .bind(protocol.provider())
    .bind(protocol.as_str())
    .bind(zone_id.to_owned())
    .bind(Value::Object(details.clone()).to_string())
    .bind(now_cs())
    .bind(role.to_owned())
    .execute(&state.db.pool)
    .await;
    match r {
        Ok(_) => {
            tracing::info!(%id, name, url, role, "Added an image store");
            Ok(id)
        }
        Err(sqlx::Error::Database(d)) if d.is_unique_violation() => Err(DomainError::Invalid(format!(
            "An image store named {name} already exists"
        ))),
        Err(e) => Err(e.into()),
    }
}

/// Deletes a store that holds no templates.
pub async fn delete(state: &State, id: &str) -> DomainResult<()> {
    let used: i64 =
        sqlx::query_scalar("SELECT COUNT(*) FROM templates WHERE store_id = $1 AND removed IS NULL")
            .bind(id.to_owned())
            .fetch_one(&state.db.pool)
            .await?;
    let copies: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM template_copies WHERE store_id = $1")
        .bind(id.to_owned())
        .fetch_one(&state.db.pool)
        .await?;
    if used + copies > 0 {
        return Err(DomainError::InUse(format!(
            "Cannot delete image store {id}: it holds {} template(s) or ISO(s); delete them first",
            used + copies
        )));
    }
    let url = url_of(&state.db.pool, id).await?.unwrap_or_default();
    let snapshots: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM snapshots WHERE store_url = $1 AND file IS NOT NULL AND state <> 'Error'",
    )
    .bind(url)
    .fetch_one(&state.db.pool)
    .await?;
    let volumes: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM volumes WHERE store_id = $1")
        .bind(id.to_owned())
        .fetch_one(&state.db.pool)
        .await?;
    if snapshots + volumes > 0 {
        return Err(DomainError::InUse(format!(
            "Cannot delete image store {id}: it holds {snapshots} snapshot(s) and {volumes} uploaded or extracted volume(s); delete them first"
        )));
    }
    // Removed templates only remain as records; they go with their store.
    let mut tx = state.db.pool.begin().await?;
    sqlx::query("DELETE FROM templates WHERE store_id = $1 AND removed IS NOT NULL")
        .bind(id.to_owned())
        .execute(&mut *tx)
        .await?;
    let done = sqlx::query(
        "DELETE FROM image_stores WHERE id = $1 AND NOT EXISTS (SELECT 1 FROM templates WHERE store_id = $1)",
    )
    .bind(id.to_owned())
    .execute(&mut *tx)
    .await?;
    if done.rows_affected() == 0 {
        tx.rollback().await?;
        let exists: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM image_stores WHERE id = $1")
            .bind(id.to_owned())
            .fetch_one(&state.db.pool)
            .await?;
        return Err(if exists == 0 {
            DomainError::NotFound(format!("Unable to find image store by id {id}"))
        } else {
            DomainError::InUse(format!(
                "Cannot delete image store {id}: a template or ISO was added to it meanwhile"
            ))
        });
    }
    tx.commit().await?;
    Ok(())
}

/// The first store of a zone: its URL.
pub async fn first_url_of_zone(pool: &sqlx::AnyPool, zone_id: &str) -> Result<Option<String>, sqlx::Error> {
    sqlx::query_scalar("SELECT url FROM image_stores WHERE zone_id = $1 ORDER BY created, name LIMIT 1")
        .bind(zone_id.to_owned())
        .fetch_optional(pool)
        .await
}

/// The image stores of a zone (id, URL), oldest first.
pub async fn of_zone(pool: &sqlx::AnyPool, zone_id: &str) -> Result<Vec<(String, String)>, sqlx::Error> {
    sqlx::query_as("SELECT id, url FROM image_stores WHERE zone_id = $1 ORDER BY created, name")
        .bind(zone_id.to_owned())
        .fetch_all(pool)
        .await
}

/// The URL of store `id`.
pub async fn url_of(pool: &sqlx::AnyPool, id: &str) -> Result<Option<String>, sqlx::Error> {
    sqlx::query_scalar("SELECT url FROM image_stores WHERE id = $1")
        .bind(id.to_owned())
        .fetch_optional(pool)
        .await
}

/// Storage VMs that are Up now (either core's view: from the database).
pub async fn storage_agents(state: &State) -> Result<Vec<StorageAgent>, sqlx::Error> {
    let timeout_ms = i64::try_from(settings::uint(state, &settings::HEARTBEAT_TIMEOUT).await)
        .unwrap_or(i64::MAX / 2000)
        .saturating_mul(1000);
    systemvms::storage_agents(&state.db, timeout_ms).await
}

/// A storage VM in `zone_id` serving `store_url` and connected to this core (the lease
/// holder: only it has agent connections).
pub async fn connected_storage_vm(
    state: &State,
    zone_id: &str,
    store_url: &str,
) -> Result<Option<String>, sqlx::Error> {
    Ok(storage_agents(state)
        .await?
        .into_iter()
        .filter(|a| a.zone_id == zone_id)
        .filter(|a| {
            a.load
                .store_url
                .as_deref()
                .is_some_and(|u| same_store(u, store_url))
        })
        .find(|a| state.agents.connection(&a.id).is_some())
        .map(|a| a.id))
}

/// Capacity by normalized store URL (total, used), from the storage VMs' heartbeats.
pub async fn capacity(state: &State) -> Result<HashMap<String, (u64, u64)>, sqlx::Error> {
    let mut m = HashMap::new();
    for a in storage_agents(state).await? {
        if let (Some(url), Some(total)) = (a.load.store_url, a.load.capacity_total) {
            m.insert(normalize_url(&url), (total, a.load.capacity_used.unwrap_or(0)));
        }
    }
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_urls() {
        assert_eq!(
            protocol_of("nfs://10.0.0.5/export/secondary").unwrap(),
            Protocol::Nfs
        );
        assert_eq!(
            protocol_of("nfs://h:2049/e?mountport=20048").unwrap(),
            Protocol::Nfs
        );
        assert_eq!(protocol_of("file:///var/lib/secondary").unwrap(), Protocol::File);
        assert_eq!(Protocol::File.provider(), "Local");
        for bad in [
            "nfs://host",
            "nfs:///export",
            "file://relative/x",
            "file:///a/../etc",
            "s3://bucket",
            "nfs://h/e x",
            "nfs://h/e\n",
        ] {
            assert!(matches!(protocol_of(bad), Err(DomainError::Invalid(_))), "{bad}");
        }
    }

    #[test]
    fn store_urls_normalize_like_the_agent_reports_them() {
        assert_eq!(normalize_url("nfs://h:2049/e/"), "nfs://h/e");
        assert_eq!(
            normalize_url("nfs://h:3049/e?mountport=5"),
            "nfs://h:3049/e?mountport=5"
        );
        assert_eq!(normalize_url("file:///srv/sec/"), "file:///srv/sec");
        assert!(same_store("nfs://10.0.0.1/export", "nfs://10.0.0.1:2049/export/"));
        assert!(!same_store("nfs://10.0.0.1/export", "nfs://10.0.0.2/export"));
    }
}
