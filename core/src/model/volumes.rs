//! Primary storage and volumes: NFS storage pools (`createStoragePool`) and the volumes core
//! knows on them (`importVolume`: a disk image already on the pool), what snapshots are taken of.
//!
//! Invariants: a pool is an `nfs://HOST/EXPORT` URL in a zone, named uniquely; a volume names a
//! relative path inside its pool (no `..`, no leading `/`), once per pool; a pool holding volumes
//! is not deleted; importing and unmanaging a volume never touches its file.

use sqlx::Row as _;

use crate::model::stores::{self, Protocol};
use crate::model::{DomainError, DomainResult};
use crate::state::{Caller, State};
use crate::util::{new_uuid, now_cs};

/// Volume formats an import may declare.
pub const VOLUME_FORMATS: &[&str] = &["QCOW2", "RAW"];

/// Records an NFS storage pool in `zone_id`; returns its id.
pub async fn create_pool(state: &State, name: &str, url: &str, zone_id: &str) -> DomainResult<String> {
    if name.is_empty() || name.len() > 255 {
        return Err(DomainError::Invalid("name must be 1 to 255 characters".into()));
    }
    if stores::protocol_of(url)? != Protocol::Nfs {
        return Err(DomainError::Invalid(format!(
            "Invalid url {url:?}: primary storage is an NFS export, nfs://HOST/EXPORT"
        )));
    }
    let zone = crate::model::resolve_zone(&state.db.pool, Some(zone_id)).await?;
    let id = new_uuid().map_err(|e| DomainError::Internal(e.to_string()))?;
    let r = sqlx::query(
        "INSERT INTO storage_pools (id, name, zone_id, url, scope, created) VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(id.clone())
    .bind(name.to_owned())
    .bind(zone)
    .bind(stores::normalize_url(url))
    .bind("ZONE")
    .bind(now_cs())
    .execute(&state.db.pool)
    .await;
    match r {
        Ok(_) => {
            tracing::info!(%id, name, url, "Added a primary storage pool");
            Ok(id)
        }
        Err(sqlx::Error::Database(d)) if d.is_unique_violation() => Err(DomainError::Invalid(format!(
            "A storage pool named {name} already exists"
        ))),
        Err(e) => Err(e.into()),
    }
}

/// Deletes a pool that holds no volumes.
pub async fn delete_pool(state: &State, id: &str) -> DomainResult<()> {
    let used: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM volumes WHERE pool_id = $1")
        .bind(id.to_owned())
        .fetch_one(&state.db.pool)
        .await?;
    if used > 0 {
        return Err(DomainError::InUse(format!(
            "Cannot delete storage pool {id}: it holds {used} volume(s); unmanage them first"
        )));
    }
    let done = sqlx::query("DELETE FROM storage_pools WHERE id = $1")
        .bind(id.to_owned())
        .execute(&state.db.pool)
        .await?;
    if done.rows_affected() == 0 {
        return Err(DomainError::NotFound(format!(
            "Unable to find storage pool by id {id}"
        )));
    }
    tracing::info!(%id, "Deleted a primary storage pool");
    Ok(())
}

/// A volume to import.
#[derive(Debug, Clone)]
pub struct NewVolume<'a> {
    /// The pool.
    pub pool_id: &'a str,
    /// Path of the image inside the pool.
    pub path: &'a str,
    /// Name (default: the path's file name).
    pub name: Option<&'a str>,
    /// `QCOW2` or `RAW`.
    pub format: &'a str,
    /// Virtual size in bytes.
    pub size: u64,
}

/// Checks a path inside a pool: relative, no `.`/`..` or empty segments, printable.
pub fn check_path(path: &str) -> DomainResult<()> {
    let bad = |why: &str| DomainError::Invalid(format!("Invalid path {path:?}: {why}"));
    if path.is_empty() || path.len() > 1024 {
        return Err(bad("empty or longer than 1024 characters"));
    }
    if path.starts_with('/') {
        return Err(bad("it is relative to the storage pool's export"));
    }
    if path.chars().any(char::is_control) {
        return Err(bad("control characters"));
    }
    if path.split('/').any(|s| s.is_empty() || s == "." || s == "..") {
        return Err(bad("empty, . or .. segments"));
    }
    Ok(())
}

/// Records a disk image already on a pool as a volume of the caller's account; returns its id.
pub async fn import(state: &State, caller: &Caller, v: &NewVolume<'_>) -> DomainResult<String> {
    check_path(v.path)?;
    if !VOLUME_FORMATS.contains(&v.format) {
        return Err(DomainError::Invalid(format!(
            "Format {:?} is not supported: use one of {}",
            v.format,
            VOLUME_FORMATS.join(", ")
        )));
    }
    if v.size == 0 {
        return Err(DomainError::Invalid(
            "size must be the volume's size in bytes".into(),
        ));
    }
    let zone: String = sqlx::query_scalar("SELECT zone_id FROM storage_pools WHERE id = $1")
        .bind(v.pool_id.to_owned())
        .fetch_optional(&state.db.pool)
        .await?
        .ok_or_else(|| DomainError::NotFound(format!("Unable to find storage pool by id {}", v.pool_id)))?;
    let name = v
        .name
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| v.path.rsplit('/').next().unwrap_or(v.path));
    if name.len() > 255 {
        return Err(DomainError::Invalid("name is longer than 255 characters".into()));
    }
    let id = new_uuid().map_err(|e| DomainError::Internal(e.to_string()))?;
    let r = sqlx::query(
        "INSERT INTO volumes (id, name, zone_id, pool_id, account_id, path, format, size, created) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
    )
    .bind(id.clone())
    .bind(name.to_owned())
    .bind(zone)
    .bind(v.pool_id.to_owned())
    .bind(caller.account_id.clone())
    .bind(v.path.to_owned())
    .bind(v.format.to_owned())
    .bind(i64::try_from(v.size).unwrap_or(i64::MAX))
    .bind(now_cs())
    .execute(&state.db.pool)
    .await;
    match r {
        Ok(_) => {
            tracing::info!(%id, path = v.path, "Imported a volume");
            Ok(id)
        }
        Err(sqlx::Error::Database(d)) if d.is_unique_violation() => Err(DomainError::Invalid(format!(
            "The volume at {} is already managed",
            v.path
        ))),
        Err(e) => Err(e.into()),
    }
}

/// Forgets a volume (its file stays on the pool).
pub async fn unmanage(state: &State, caller: &Caller, id: &str) -> DomainResult<()> {
    let row = sqlx::query("SELECT account_id FROM volumes WHERE id = $1")
        .bind(id.to_owned())
        .fetch_optional(&state.db.pool)
        .await?
        .ok_or_else(|| DomainError::NotFound(format!("Unable to find volume by id {id}")))?;
    let owner: String = row.try_get("account_id")?;
    crate::model::templates::ensure_manages(state, caller, &owner, "volume", id).await?;
    sqlx::query("DELETE FROM volumes WHERE id = $1")
        .bind(id.to_owned())
        .execute(&state.db.pool)
        .await?;
    tracing::info!(%id, "Unmanaged a volume; its file stays on the pool");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_stay_inside_the_pool() {
        assert!(check_path("vm-1/root.qcow2").is_ok());
        for bad in ["", "/etc/passwd", "../x", "a/../b", "a//b", "a/./b", "a\nb"] {
            assert!(check_path(bad).is_err(), "{bad:?}");
        }
    }
}
