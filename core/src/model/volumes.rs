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

/// A volume, with what reaching its file takes.
#[derive(Debug, Clone)]
pub struct Volume {
    /// Id.
    pub id: String,
    /// Name.
    pub name: String,
    /// Zone.
    pub zone_id: String,
    /// Owner.
    pub account_id: String,
    /// The pool holding the file, and its URL; `None` for a guest disk outside any pool.
    pub pool: Option<(String, String)>,
    /// The guest whose disk it is: console target id, its libvirt domain, the disk's target.
    pub guest: Option<(String, String, String)>,
    /// Path in the pool, or on the guest's host.
    pub path: String,
    /// `QCOW2` or `RAW`.
    pub format: String,
    /// Virtual size.
    pub size: u64,
    /// The image store holding the file (an uploaded volume), by URL.
    pub store: Option<String>,
    /// CloudStack's volume state (`Ready`; an upload's: `crate::model::volume_uploads::state`).
    pub state: String,
}

impl Volume {
    /// Where the volume's file is for a storage VM to read it: its pool's file, or an uploaded
    /// volume's file on its image store; `None` for a guest disk outside any pool and for an
    /// upload not complete.
    pub fn file(&self) -> Option<systemvm_proto::agent::ImageRef> {
        let store_url = match (&self.pool, &self.store) {
            (Some((_, url)), _) => url.clone(),
            (None, Some(url)) if self.state == crate::model::volume_uploads::state::UPLOADED => url.clone(),
            _ => return None,
        };
        Some(systemvm_proto::agent::ImageRef {
            store_url,
            path: self.path.clone(),
            format: self.format.clone(),
        })
    }
}

/// Volume `id`.
pub async fn get(state: &State, id: &str) -> DomainResult<Volume> {
    let row = sqlx::query(
        "SELECT v.id, v.name, v.zone_id, v.account_id, v.pool_id, p.url AS pool_url, v.vm_id, c.hypervisor_ref, v.device, v.path, v.format, v.size, v.state, s.url AS store_url \
         FROM volumes v LEFT JOIN storage_pools p ON p.id = v.pool_id LEFT JOIN console_targets c ON c.id = v.vm_id LEFT JOIN image_stores s ON s.id = v.store_id WHERE v.id = $1",
    )
    .bind(id.to_owned())
    .fetch_optional(&state.db.pool)
    .await?
    .ok_or_else(|| DomainError::NotFound(format!("Unable to find volume by id {id}")))?;
    let pool = match (
        row.try_get::<Option<String>, _>("pool_id")?,
        row.try_get::<Option<String>, _>("pool_url")?,
    ) {
        (Some(p), Some(u)) => Some((p, u)),
        _ => None,
    };
    let guest = match (
        row.try_get::<Option<String>, _>("vm_id")?,
        row.try_get::<Option<String>, _>("hypervisor_ref")?,
        row.try_get::<Option<String>, _>("device")?,
    ) {
        (Some(v), Some(d), Some(dev)) => Some((v, d, dev)),
        _ => None,
    };
    Ok(Volume {
        id: row.try_get("id")?,
        name: row.try_get("name")?,
        zone_id: row.try_get("zone_id")?,
        account_id: row.try_get("account_id")?,
        pool,
        guest,
        path: row.try_get("path")?,
        format: row.try_get("format")?,
        size: u64::try_from(row.try_get::<i64, _>("size")?).unwrap_or(0),
        store: row.try_get("store_url")?,
        state: row.try_get("state")?,
    })
}

/// A disk of a guest VM core knows (a console target on a `--guest-libvirt` host).
#[derive(Debug, Clone)]
pub struct GuestVolume<'a> {
    /// The console target.
    pub vm_id: &'a str,
    /// The disk's target (`vda`).
    pub device: &'a str,
    /// The image on the host.
    pub host_path: &'a str,
    /// `QCOW2` or `RAW`.
    pub format: &'a str,
    /// Virtual size.
    pub size: u64,
    /// The guest's first disk (its root volume).
    pub root: bool,
}

/// Records (or refreshes) a guest's disk as a volume of the guest's account. A file under
/// `/mnt/<pool id>/` (where KVM hosts mount primary storage, as CloudStack's agent does) is on
/// that pool, so the storage VM can reach it.
pub async fn sync_guest_disk(state: &State, d: &GuestVolume<'_>) -> DomainResult<()> {
    let Some(target) = sqlx::query("SELECT zone_id, account_id, name FROM console_targets WHERE id = $1")
        .bind(d.vm_id.to_owned())
        .fetch_optional(&state.db.pool)
        .await?
    else {
        return Ok(());
    };
    let zone: String = target.try_get("zone_id")?;
    let account: String = target.try_get("account_id")?;
    let vm_name: String = target.try_get("name")?;
    let mut pool_id: Option<String> = None;
    let mut path = d.host_path.to_owned();
    if let Some(rest) = d.host_path.strip_prefix("/mnt/")
        && let Some((pool, inside)) = rest.split_once('/')
        && check_path(inside).is_ok()
    {
        let known: Option<String> =
            sqlx::query_scalar("SELECT id FROM storage_pools WHERE id = $1 AND zone_id = $2")
                .bind(pool.to_owned())
                .bind(zone.clone())
                .fetch_optional(&state.db.pool)
                .await?;
        if known.is_some() {
            pool_id = known;
            path = inside.to_owned();
        }
    }
    let kind = if d.root { "ROOT" } else { "DATADISK" };
    let size = i64::try_from(d.size).unwrap_or(i64::MAX);
    let updated = sqlx::query(
        "UPDATE volumes SET pool_id = $1, path = $2, format = $3, size = $4, vol_type = $5 WHERE vm_id = $6 AND device = $7",
    )
    .bind(pool_id.clone())
    .bind(path.clone())
    .bind(d.format.to_owned())
    .bind(size)
    .bind(kind)
    .bind(d.vm_id.to_owned())
    .bind(d.device.to_owned())
    .execute(&state.db.pool)
    .await?;
    if updated.rows_affected() > 0 {
        return Ok(());
    }
    // A file imported by hand earlier becomes the guest's disk.
    if let Some(pool) = &pool_id {
        let linked = sqlx::query(
            "UPDATE volumes SET vm_id = $1, device = $2, vol_type = $3 WHERE pool_id = $4 AND path = $5 AND vm_id IS NULL",
        )
        .bind(d.vm_id.to_owned())
        .bind(d.device.to_owned())
        .bind(kind)
        .bind(pool.clone())
        .bind(path.clone())
        .execute(&state.db.pool)
        .await?;
        if linked.rows_affected() > 0 {
            return Ok(());
        }
    }
    let id = new_uuid().map_err(|e| DomainError::Internal(e.to_string()))?;
    sqlx::query(
        "INSERT INTO volumes (id, name, zone_id, pool_id, vm_id, device, vol_type, account_id, path, format, size, created) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
    )
    .bind(id.clone())
    .bind(format!("{kind}-{vm_name}-{}", d.device))
    .bind(zone)
    .bind(pool_id)
    .bind(d.vm_id.to_owned())
    .bind(d.device.to_owned())
    .bind(kind)
    .bind(account)
    .bind(path)
    .bind(d.format.to_owned())
    .bind(size)
    .bind(now_cs())
    .execute(&state.db.pool)
    .await?;
    tracing::info!(%id, vm = d.vm_id, device = d.device, "Found a guest disk");
    Ok(())
}

/// Records a volume written on a pool by core (a volume created from a snapshot) for
/// `account_id`; returns its id (`id`, chosen before the file was written).
pub async fn record_created(
    state: &State,
    id: &str,
    account_id: &str,
    v: &NewVolume<'_>,
) -> DomainResult<()> {
    let zone: String = sqlx::query_scalar("SELECT zone_id FROM storage_pools WHERE id = $1")
        .bind(v.pool_id.to_owned())
        .fetch_optional(&state.db.pool)
        .await?
        .ok_or_else(|| DomainError::NotFound(format!("Unable to find storage pool by id {}", v.pool_id)))?;
    sqlx::query(
        "INSERT INTO volumes (id, name, zone_id, pool_id, account_id, path, format, size, created) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
    )
    .bind(id.to_owned())
    .bind(v.name.unwrap_or(id).to_owned())
    .bind(zone)
    .bind(v.pool_id.to_owned())
    .bind(account_id.to_owned())
    .bind(v.path.to_owned())
    .bind(v.format.to_owned())
    .bind(i64::try_from(v.size).unwrap_or(i64::MAX))
    .bind(now_cs())
    .execute(&state.db.pool)
    .await?;
    tracing::info!(%id, path = v.path, "Created a volume from a snapshot");
    Ok(())
}

/// The first pool of a zone.
pub async fn first_pool_of_zone(state: &State, zone_id: &str) -> DomainResult<Option<String>> {
    Ok(
        sqlx::query_scalar("SELECT id FROM storage_pools WHERE zone_id = $1 ORDER BY created, name LIMIT 1")
            .bind(zone_id.to_owned())
            .fetch_optional(&state.db.pool)
            .await?,
    )
}

/// The URL of pool `id`.
pub async fn pool_url(state: &State, id: &str) -> DomainResult<String> {
    sqlx::query_scalar("SELECT url FROM storage_pools WHERE id = $1")
        .bind(id.to_owned())
        .fetch_optional(&state.db.pool)
        .await?
        .ok_or_else(|| DomainError::NotFound(format!("Unable to find storage pool by id {id}")))
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
