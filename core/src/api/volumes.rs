//! Primary storage and volumes: `createStoragePool`, `listStoragePools`, `deleteStoragePool`,
//! `importVolume`, `listVolumes`, `unmanageVolume` (the HTTP side of [`crate::model::volumes`]).
//!
//! Invariants: pools are managed by root admins; a caller lists the volumes of the accounts it
//! manages (its own for a user); answers use CloudStack's `storagepool` and `volume` objects.

use serde_json::{Value, json};
use sqlx::Row as _;

use crate::api::{Filter, list_response, success};
use crate::command::{Command, ParamSpec, Ty, opt, req};
use crate::error::ApiError;
use crate::model::directory::{ROOT_DOMAIN_ID, Scope};
use crate::model::volumes::{self, NewVolume};
use crate::paging::Page;
use crate::params::Params;
use crate::roles::Access;
use crate::state::{Caller, State};

const CREATE_POOL: &[ParamSpec] = &[
    req("name", Ty::String, "Name"),
    req("url", Ty::String, "nfs://HOST/EXPORT"),
    req("zoneid", Ty::Uuid, "Zone"),
    opt(
        "scope",
        Ty::String,
        "ZONE (the only scope here; CLUSTER is taken as ZONE)",
    ),
    opt("podid", Ty::Uuid, "Accepted for compatibility (no pods)"),
    opt("clusterid", Ty::Uuid, "Accepted for compatibility (no clusters)"),
    opt("hypervisor", Ty::String, "Accepted for compatibility (KVM)"),
    opt(
        "provider",
        Ty::String,
        "Accepted for compatibility (DefaultPrimary)",
    ),
    opt("tags", Ty::String, "Accepted for compatibility"),
    opt("details", Ty::Map, "Accepted for compatibility"),
];
const LIST_POOLS: &[ParamSpec] = &[
    opt("id", Ty::Uuid, "Storage pool id"),
    opt("name", Ty::String, "Name"),
    opt("zoneid", Ty::Uuid, "Zone id"),
    opt("scope", Ty::String, "Scope (ZONE)"),
    opt("keyword", Ty::String, "Substring of the name"),
    opt("podid", Ty::Uuid, "Accepted for compatibility"),
    opt("clusterid", Ty::Uuid, "Accepted for compatibility"),
    opt("page", Ty::Integer, "Page number"),
    opt("pagesize", Ty::Integer, "Page size"),
];
const DELETE_POOL: &[ParamSpec] = &[
    req("id", Ty::Uuid, "Storage pool id"),
    opt(
        "forced",
        Ty::Boolean,
        "Accepted for compatibility: a pool with volumes is never deleted",
    ),
];
const IMPORT_VOLUME: &[ParamSpec] = &[
    req("path", Ty::String, "Path of the image inside the pool's export"),
    req("storageid", Ty::Uuid, "Storage pool id"),
    opt("name", Ty::String, "Name (default: the file name)"),
    opt("format", Ty::String, "QCOW2 (default) or RAW (ours)"),
    req("size", Ty::Long, "Virtual size in bytes (ours)"),
    opt(
        "diskofferingid",
        Ty::Uuid,
        "Accepted for compatibility (no disk offerings)",
    ),
    opt(
        "account",
        Ty::String,
        "Accepted for compatibility: the caller's account owns it",
    ),
    opt("domainid", Ty::Uuid, "Accepted for compatibility"),
];
const LIST_VOLUMES: &[ParamSpec] = &[
    opt("id", Ty::Uuid, "Volume id"),
    opt("name", Ty::String, "Name"),
    opt("zoneid", Ty::Uuid, "Zone id"),
    opt("storageid", Ty::Uuid, "Storage pool id"),
    opt(
        "virtualmachineid",
        Ty::Uuid,
        "Accepted for compatibility (imported volumes are not attached)",
    ),
    opt("type", Ty::String, "ROOT or DATADISK"),
    opt("keyword", Ty::String, "Substring of the name"),
    opt("listall", Ty::Boolean, "Accepted for compatibility"),
    opt("account", Ty::String, "Accepted for compatibility"),
    opt("domainid", Ty::Uuid, "Accepted for compatibility"),
    opt("projectid", Ty::Uuid, "Accepted for compatibility"),
    opt("isrecursive", Ty::Boolean, "Accepted for compatibility"),
    opt("page", Ty::Integer, "Page number"),
    opt("pagesize", Ty::Integer, "Page size"),
];
const UNMANAGE_VOLUME: &[ParamSpec] = &[req("id", Ty::Uuid, "Volume id")];

/// The response fields of a storage pool.
pub const POOL_FIELDS: crate::api::fields::Fields = &[
    ("id", "the ID of the storage pool"),
    ("name", "the name of the storage pool"),
    ("zoneid", "the Zone ID of the storage pool"),
    ("zonename", "the Zone name of the storage pool"),
    ("type", "the storage pool type"),
    ("ipaddress", "the IP address of the storage pool"),
    ("path", "the storage pool path"),
    ("state", "the state of the storage pool"),
    ("scope", "the scope of the storage pool"),
    ("hypervisor", "the hypervisor type of the storage pool"),
    ("provider", "Storage provider for this pool"),
    ("created", "the date and time the storage pool was created"),
];
/// The response fields of a volume.
pub const VOLUME_FIELDS: crate::api::fields::Fields = &[
    ("id", "ID of the disk volume"),
    ("name", "name of the disk volume"),
    ("zoneid", "ID of the availability zone"),
    ("zonename", "name of the availability zone"),
    ("type", "type of the disk volume (ROOT or DATADISK)"),
    ("state", "the state of the disk volume"),
    ("size", "size of the disk volume"),
    ("storageid", "id of the primary storage hosting the disk volume"),
    ("storage", "name of the primary storage hosting the disk volume"),
    ("storagetype", "shared or local storage"),
    ("path", "the path of the volume"),
    ("format", "the image format of the volume (ours)"),
    ("account", "the account associated with the disk volume"),
    ("domainid", "the ID of the domain associated with the disk volume"),
    ("domain", "the domain associated with the disk volume"),
    ("created", "the date the disk volume was created"),
];

/// This module's commands.
pub static COMMANDS: &[Command] = &[
    Command::new(
        "createStoragePool",
        "Adds an NFS export as primary storage of a zone",
        Access::ADMIN,
        CREATE_POOL,
        crate::handler!(create_storage_pool),
    )
    .returns(POOL_FIELDS),
    Command::new(
        "listStoragePools",
        "Lists primary storage pools",
        Access::INFRA,
        LIST_POOLS,
        crate::handler!(list_storage_pools),
    )
    .returns(POOL_FIELDS),
    Command::new(
        "deleteStoragePool",
        "Deletes a primary storage pool that holds no volumes",
        Access::ADMIN,
        DELETE_POOL,
        crate::handler!(delete_storage_pool),
    )
    .returns(crate::api::fields::SUCCESS),
    Command::new(
        "importVolume",
        "Manages a disk image already on a primary storage pool as a volume (the file is not touched)",
        Access::ADMIN,
        IMPORT_VOLUME,
        crate::handler!(import_volume),
    )
    .returns(VOLUME_FIELDS),
    Command::new(
        "listVolumes",
        "Lists the volumes core manages",
        Access::ALL,
        LIST_VOLUMES,
        crate::handler!(list_volumes),
    )
    .returns(VOLUME_FIELDS),
    Command::new(
        "unmanageVolume",
        "Stops managing a volume (its file stays on the pool)",
        Access::ADMIN,
        UNMANAGE_VOLUME,
        crate::handler!(unmanage_volume),
    )
    .returns(crate::api::fields::SUCCESS),
];

const POOL_SELECT: &str = "SELECT p.id, p.name, p.zone_id, z.name AS zone_name, p.url, p.scope, p.created FROM storage_pools p JOIN zones z ON z.id = p.zone_id";
const POOL_FROM: &str = "storage_pools p JOIN zones z ON z.id = p.zone_id";

fn pool_json(row: &sqlx::any::AnyRow) -> Result<Value, sqlx::Error> {
    let url: String = row.try_get("url")?;
    let rest = url.strip_prefix("nfs://").unwrap_or(&url);
    let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
    let host = host.split(':').next().unwrap_or(host);
    Ok(json!({
        "id": row.try_get::<String, _>("id")?,
        "name": row.try_get::<String, _>("name")?,
        "zoneid": row.try_get::<String, _>("zone_id")?,
        "zonename": row.try_get::<String, _>("zone_name")?,
        "type": "NetworkFilesystem",
        "ipaddress": host,
        "path": format!("/{}", path.split('?').next().unwrap_or(path)),
        "state": "Up",
        "scope": row.try_get::<String, _>("scope")?,
        "hypervisor": "KVM",
        "provider": "DefaultPrimary",
        "created": row.try_get::<String, _>("created")?,
        "hasannotations": false,
    }))
}

/// `createStoragePool`.
pub async fn create_storage_pool(state: State, _caller: Caller, p: Params) -> Result<Value, ApiError> {
    let id = volumes::create_pool(
        &state,
        p.non_empty("name").unwrap_or_default(),
        p.non_empty("url").unwrap_or_default(),
        p.non_empty("zoneid").unwrap_or_default(),
    )
    .await?;
    let row = sqlx::query(&format!("{POOL_SELECT} WHERE p.id = $1"))
        .bind(id)
        .fetch_one(&state.db.pool)
        .await?;
    Ok(json!({ "storagepool": pool_json(&row)? }))
}

/// `listStoragePools`.
pub async fn list_storage_pools(state: State, _caller: Caller, p: Params) -> Result<Value, ApiError> {
    let page = Page::from_params(&p, crate::model::settings::page_size(&state).await)?;
    let mut f = Filter::default();
    for (param, col) in [("id", "p.id"), ("name", "p.name"), ("zoneid", "p.zone_id")] {
        if let Some(v) = p.non_empty(param) {
            f.eq(col, v);
        }
    }
    if let Some(s) = p.non_empty("scope") {
        f.eq("p.scope", &s.to_ascii_uppercase());
    }
    if let Some(k) = p.non_empty("keyword") {
        f.keyword(&["p.name"], k);
    }
    let total = f.count(&state.db.pool, POOL_FROM).await?;
    let rows = f
        .rows(
            &state.db.pool,
            POOL_SELECT,
            &format!(" ORDER BY p.created, p.name{}", page.sql()),
        )
        .await?;
    let items = rows.iter().map(pool_json).collect::<Result<Vec<_>, _>>()?;
    Ok(list_response("storagepool", total, items))
}

/// `deleteStoragePool`.
pub async fn delete_storage_pool(state: State, _caller: Caller, p: Params) -> Result<Value, ApiError> {
    volumes::delete_pool(&state, p.non_empty("id").unwrap_or_default()).await?;
    Ok(success())
}

pub(crate) const VOLUME_SELECT: &str = "SELECT v.id, v.name, v.zone_id, z.name AS zone_name, v.pool_id, p.name AS pool_name, v.vm_id, c.name AS vm_name, v.device, v.vol_type, v.account_id, a.name AS account_name, d.id AS domain_id, d.name AS domain_name, v.path, v.format, v.size, v.created, v.state, v.status \
     FROM volumes v JOIN zones z ON z.id = v.zone_id LEFT JOIN storage_pools p ON p.id = v.pool_id LEFT JOIN console_targets c ON c.id = v.vm_id LEFT JOIN accounts a ON a.id = v.account_id LEFT JOIN domains d ON d.id = a.domain_id";
const VOLUME_FROM: &str = "volumes v JOIN zones z ON z.id = v.zone_id LEFT JOIN storage_pools p ON p.id = v.pool_id LEFT JOIN console_targets c ON c.id = v.vm_id LEFT JOIN accounts a ON a.id = v.account_id LEFT JOIN domains d ON d.id = a.domain_id";

pub(crate) fn volume_json(row: &sqlx::any::AnyRow) -> Result<Value, sqlx::Error> {
    let vm: Option<String> = row.try_get("vm_id")?;
    let device: Option<String> = row.try_get("device")?;
    let mut v = json!({
        "id": row.try_get::<String, _>("id")?,
        "name": row.try_get::<String, _>("name")?,
        "zoneid": row.try_get::<String, _>("zone_id")?,
        "zonename": row.try_get::<String, _>("zone_name")?,
        "type": row.try_get::<String, _>("vol_type")?,
        "state": row.try_get::<String, _>("state")?,
        "size": row.try_get::<i64, _>("size")?,
        "storageid": row.try_get::<Option<String>, _>("pool_id")?,
        "storage": row.try_get::<Option<String>, _>("pool_name")?,
        "storagetype": if vm.is_some() && row.try_get::<Option<String>, _>("pool_id")?.is_none() { "local" } else { "shared" },
        "path": row.try_get::<String, _>("path")?,
        "format": row.try_get::<String, _>("format")?,
        "account": row.try_get::<Option<String>, _>("account_name")?.unwrap_or_default(),
        "domainid": row.try_get::<Option<String>, _>("domain_id")?.unwrap_or_else(|| ROOT_DOMAIN_ID.into()),
        "domain": row.try_get::<Option<String>, _>("domain_name")?.unwrap_or_else(|| "ROOT".into()),
        "created": row.try_get::<String, _>("created")?,
        "hypervisor": "KVM",
        "hasannotations": false,
    });
    if let (Some(status), Some(o)) = (row.try_get::<Option<String>, _>("status")?, v.as_object_mut()) {
        o.insert("status".into(), json!(status));
    }
    if let (Some(vm), Some(o)) = (vm, v.as_object_mut()) {
        o.insert("virtualmachineid".into(), json!(vm));
        o.insert(
            "vmname".into(),
            json!(row.try_get::<Option<String>, _>("vm_name")?),
        );
        o.insert(
            "vmdisplayname".into(),
            json!(row.try_get::<Option<String>, _>("vm_name")?),
        );
        o.insert("vmstate".into(), json!("Running"));
        o.insert("attached".into(), json!(row.try_get::<String, _>("created")?));
        // vda → 0, vdb → 1, …
        let id = device
            .as_deref()
            .and_then(|d| d.bytes().last())
            .map_or(0, |b| i64::from(b.saturating_sub(b'a')));
        o.insert("deviceid".into(), json!(id));
    }
    Ok(v)
}

/// `importVolume`.
pub async fn import_volume(state: State, caller: Caller, p: Params) -> Result<Value, ApiError> {
    let format = p.non_empty("format").unwrap_or("QCOW2").to_ascii_uppercase();
    let size = p
        .non_empty("size")
        .and_then(|s| s.parse::<u64>().ok())
        .ok_or_else(|| ApiError::param("size must be the volume's size in bytes"))?;
    let id = volumes::import(
        &state,
        &caller,
        &NewVolume {
            pool_id: p.non_empty("storageid").unwrap_or_default(),
            path: p.non_empty("path").unwrap_or_default(),
            name: p.non_empty("name"),
            format: &format,
            size,
        },
    )
    .await?;
    let row = sqlx::query(&format!("{VOLUME_SELECT} WHERE v.id = $1"))
        .bind(id)
        .fetch_one(&state.db.pool)
        .await?;
    Ok(json!({ "volume": volume_json(&row)? }))
}

/// `listVolumes`.
pub async fn list_volumes(state: State, caller: Caller, p: Params) -> Result<Value, ApiError> {
    let page = Page::from_params(&p, crate::model::settings::page_size(&state).await)?;
    // The disks of the guests core knows, as their hosts describe them now.
    if let Err(error) = crate::backup::sync_guest_volumes(&state).await {
        tracing::warn!(%error, "Could not read the guests' disks");
    }
    let mut f = Filter::default();
    Scope::of(&caller).restrict(&mut f, "v.account_id", "d.path");
    for (param, col) in [
        ("id", "v.id"),
        ("name", "v.name"),
        ("zoneid", "v.zone_id"),
        ("storageid", "v.pool_id"),
        ("virtualmachineid", "v.vm_id"),
    ] {
        if let Some(v) = p.non_empty(param) {
            f.eq(col, v);
        }
    }
    if let Some(t) = p.non_empty("type") {
        f.eq("v.vol_type", &t.to_ascii_uppercase());
    }
    if let Some(k) = p.non_empty("keyword") {
        f.keyword(&["v.name"], k);
    }
    let total = f.count(&state.db.pool, VOLUME_FROM).await?;
    let rows = f
        .rows(
            &state.db.pool,
            VOLUME_SELECT,
            &format!(" ORDER BY v.created, v.name{}", page.sql()),
        )
        .await?;
    let items = rows.iter().map(volume_json).collect::<Result<Vec<_>, _>>()?;
    Ok(list_response("volume", total, items))
}

/// `unmanageVolume`.
pub async fn unmanage_volume(state: State, caller: Caller, p: Params) -> Result<Value, ApiError> {
    volumes::unmanage(&state, &caller, p.non_empty("id").unwrap_or_default()).await?;
    Ok(success())
}
