//! Volume snapshots through the API (the HTTP side of [`crate::model::snapshots`] and the
//! backup runner): `createSnapshot`, `listSnapshots`, `deleteSnapshot`, `revertSnapshot`,
//! `createVolume` from a snapshot, and the snapshot policies.
//!
//! Invariants: `createSnapshot` records the request before its job waits, so the backup goes on
//! when the job's core goes away; the commands that need a storage VM's answer run on the lease
//! holder; a revert refuses a volume whose guest runs (CloudStack's 431); answers use
//! CloudStack's `snapshot`, `volume` and `snapshotpolicy` objects (`bytesread` is ours: what the
//! storage VM read from the disk).

use std::time::Duration;

use serde_json::{Value, json};
use sqlx::Row as _;
use systemvm_proto::agent::ImageRef;

use crate::api::{Filter, list_response, success};
use crate::command::{Command, ParamSpec, Ty, opt, req};
use crate::error::ApiError;
use crate::model::directory::Scope;
use crate::model::snapshots::{self, state};
use crate::model::volumes;
use crate::paging::Page;
use crate::params::Params;
use crate::roles::Access;
use crate::state::{Caller, State};

const CREATE: &[ParamSpec] = &[
    req("volumeid", Ty::Uuid, "The volume to snapshot"),
    opt("name", Ty::String, "Snapshot name (default: VM_VOLUME_TIMESTAMP)"),
    opt(
        "policyid",
        Ty::Uuid,
        "Accepted for compatibility (policies take their own snapshots)",
    ),
    opt("account", Ty::String, "Accepted for compatibility"),
    opt("domainid", Ty::Uuid, "Accepted for compatibility"),
    opt(
        "quiescevm",
        Ty::Boolean,
        "Accepted for compatibility (the backup is point in time)",
    ),
    opt("asyncbackup", Ty::Boolean, "Accepted for compatibility"),
    opt(
        "locationtype",
        Ty::String,
        "Accepted for compatibility (always secondary storage)",
    ),
    opt("tags", Ty::Map, "Accepted for compatibility"),
    opt("zoneids", Ty::String, "Accepted for compatibility"),
];

const LIST: &[ParamSpec] = &[
    opt("id", Ty::Uuid, "Snapshot id"),
    opt("ids", Ty::String, "Comma-separated snapshot ids"),
    opt("volumeid", Ty::Uuid, "Snapshots of this volume"),
    opt("name", Ty::String, "Snapshot name"),
    opt("keyword", Ty::String, "Substring of the name"),
    opt("snapshottype", Ty::String, "MANUAL or RECURRING"),
    opt("intervaltype", Ty::String, "HOURLY, DAILY, WEEKLY or MONTHLY"),
    opt("zoneid", Ty::Uuid, "Snapshots of this zone"),
    opt("account", Ty::String, "Accepted for compatibility"),
    opt("domainid", Ty::Uuid, "Accepted for compatibility"),
    opt("isrecursive", Ty::Boolean, "Accepted for compatibility"),
    opt("listall", Ty::Boolean, "Every snapshot the caller may see"),
    opt("projectid", Ty::Uuid, "Accepted for compatibility"),
    opt("tags", Ty::Map, "Accepted for compatibility"),
    opt(
        "showunique",
        Ty::Boolean,
        "false: one entry per store holding the snapshot (staging store and object stores)",
    ),
    opt("locationtype", Ty::String, "Accepted for compatibility"),
    opt("page", Ty::Integer, "Page number"),
    opt("pagesize", Ty::Integer, "Page size"),
];

const BY_ID: &[ParamSpec] = &[
    req("id", Ty::Uuid, "Snapshot id"),
    opt("zoneid", Ty::Uuid, "Accepted for compatibility"),
];

const CREATE_VOLUME: &[ParamSpec] = &[
    opt(
        "snapshotid",
        Ty::Uuid,
        "The snapshot to restore into a new volume (required here)",
    ),
    opt("name", Ty::String, "Volume name"),
    opt("zoneid", Ty::Uuid, "Zone (the snapshot's)"),
    opt(
        "storageid",
        Ty::Uuid,
        "Primary storage pool to write it to (ours; default: the source volume's pool, else the zone's first)",
    ),
    opt("diskofferingid", Ty::Uuid, "Accepted for compatibility"),
    opt(
        "size",
        Ty::Long,
        "Accepted for compatibility (the snapshot's size)",
    ),
    opt("account", Ty::String, "Accepted for compatibility"),
    opt("domainid", Ty::Uuid, "Accepted for compatibility"),
    opt("projectid", Ty::Uuid, "Accepted for compatibility"),
    opt("displayvolume", Ty::Boolean, "Accepted for compatibility"),
    opt("customid", Ty::String, "Accepted for compatibility"),
];

const CREATE_POLICY: &[ParamSpec] = &[
    req("volumeid", Ty::Uuid, "The volume"),
    req("intervaltype", Ty::String, "HOURLY, DAILY, WEEKLY or MONTHLY"),
    req(
        "schedule",
        Ty::String,
        "MM (hourly), MM:HH (daily), MM:HH:D (weekly, 1 = Sunday), MM:HH:DD (monthly, 1-28)",
    ),
    req("timezone", Ty::String, "Time zone of the schedule (IANA name)"),
    req("maxsnaps", Ty::Integer, "Snapshots kept (1-8)"),
    opt("fordisplay", Ty::Boolean, "Shown to users (default true)"),
    opt("tags", Ty::Map, "Accepted for compatibility"),
    opt("zoneids", Ty::String, "Accepted for compatibility"),
];

const LIST_POLICIES: &[ParamSpec] = &[
    opt("volumeid", Ty::Uuid, "Policies of this volume"),
    opt("id", Ty::Uuid, "Policy id"),
    opt("fordisplay", Ty::Boolean, "Shown policies only"),
    opt("keyword", Ty::String, "Accepted for compatibility"),
    opt("page", Ty::Integer, "Page number"),
    opt("pagesize", Ty::Integer, "Page size"),
];

const UPDATE_POLICY: &[ParamSpec] = &[
    req("id", Ty::Uuid, "Policy id"),
    opt("fordisplay", Ty::Boolean, "Shown to users"),
    opt("customid", Ty::String, "Accepted for compatibility"),
];

const DELETE_POLICIES: &[ParamSpec] = &[
    opt("id", Ty::Uuid, "Policy id"),
    opt("ids", Ty::String, "Comma-separated policy ids"),
];

/// The response fields of a snapshot.
pub const SNAPSHOT_FIELDS: crate::api::fields::Fields = &[
    ("id", "ID of the snapshot"),
    ("name", "name of the snapshot"),
    ("account", "the account associated with the snapshot"),
    ("domainid", "the domain ID of the snapshot's account"),
    ("domain", "the domain name of the snapshot's account"),
    ("snapshottype", "the type of the snapshot"),
    (
        "intervaltype",
        "valid types are hourly, daily, weekly, monthy, template, and none",
    ),
    ("volumeid", "ID of the disk volume"),
    ("volumename", "name of the disk volume"),
    ("volumetype", "type of the disk volume"),
    ("created", "the date the snapshot was created"),
    (
        "state",
        "the state of the snapshot. BackedUp means that snapshot is ready to be used",
    ),
    (
        "physicalsize",
        "physical size of backedup snapshot on image store",
    ),
    ("virtualsize", "virtual size of backedup snapshot on image store"),
    ("zoneid", "id of the availability zone"),
    ("zonename", "name of the availability zone"),
    ("datastoreid", "showunique=false: the store holding this copy"),
    ("datastorename", "showunique=false: its name"),
    ("datastoretype", "showunique=false: the store's role"),
    (
        "datastorestate",
        "showunique=false: the copy's state on the store",
    ),
    (
        "downloaddetails",
        "showunique=false: the copy's download state and percent",
    ),
    (
        "revertable",
        "indicates whether the underlying storage supports reverting the volume to this snapshot",
    ),
    (
        "bytesread",
        "bytes the storage VM read from the disk for this backup (ours)",
    ),
    ("tags", "the list of resource tags associated with snapshot"),
];

/// The response fields of a snapshot policy.
pub const POLICY_FIELDS: crate::api::fields::Fields = &[
    ("id", "the ID of the snapshot policy"),
    ("volumeid", "the ID of the disk volume"),
    ("schedule", "time the snapshot is scheduled to be taken."),
    ("intervaltype", "the interval type of the snapshot policy"),
    ("maxsnaps", "maximum number of snapshots retained"),
    ("timezone", "the time zone of the snapshot policy"),
    ("fordisplay", "is this policy for display to the regular user"),
];

/// This module's commands.
pub static COMMANDS: &[Command] = &[
    Command::new(
        "createSnapshot",
        "Backs a volume up to secondary storage: only its allocated data, or, for a running guest, what changed since its previous snapshot",
        Access::ALL,
        CREATE,
        crate::handler!(create_snapshot),
    )
    .asynchronous()
    .returns(SNAPSHOT_FIELDS),
    Command::new(
        "listSnapshots",
        "Lists volume snapshots",
        Access::ALL,
        LIST,
        crate::handler!(list_snapshots),
    )
    .returns(SNAPSHOT_FIELDS),
    Command::new(
        "deleteSnapshot",
        "Deletes a snapshot (its image stays, hidden, while a later snapshot builds on it)",
        Access::ALL,
        BY_ID,
        crate::handler!(delete_snapshot),
    )
    .asynchronous()
    .on_leader()
    .returns(crate::api::fields::SUCCESS),
    Command::new(
        "revertSnapshot",
        "Writes a snapshot back over its volume (its guest stopped)",
        Access::ALL,
        BY_ID,
        crate::handler!(revert_snapshot),
    )
    .asynchronous()
    .on_leader()
    .returns(SNAPSHOT_FIELDS),
    Command::new(
        "createVolume",
        "Creates a volume on primary storage from a snapshot",
        Access::ALL,
        CREATE_VOLUME,
        crate::handler!(create_volume),
    )
    .asynchronous()
    .on_leader()
    .returns(crate::api::volumes::VOLUME_FIELDS),
    Command::new(
        "createSnapshotPolicy",
        "Takes snapshots of a volume on a schedule, keeping the newest maxsnaps",
        Access::ALL,
        CREATE_POLICY,
        crate::handler!(create_policy),
    )
    .returns(POLICY_FIELDS),
    Command::new(
        "listSnapshotPolicies",
        "Lists the snapshot policies of a volume",
        Access::ALL,
        LIST_POLICIES,
        crate::handler!(list_policies),
    )
    .returns(POLICY_FIELDS),
    Command::new(
        "updateSnapshotPolicy",
        "Shows or hides a snapshot policy",
        Access::ALL,
        UPDATE_POLICY,
        crate::handler!(update_policy),
    )
    .asynchronous()
    .returns(POLICY_FIELDS),
    Command::new(
        "deleteSnapshotPolicies",
        "Deletes snapshot policies (their snapshots stay)",
        Access::ALL,
        DELETE_POLICIES,
        crate::handler!(delete_policies),
    )
    .returns(crate::api::fields::SUCCESS),
];

const SELECT: &str = "SELECT s.id, s.name, s.store_url, s.volume_id, s.volume_name, s.zone_id, z.name AS zone_name, s.account_id, a.name AS account_name, d.id AS domain_id, d.name AS domain_name, s.state, s.interval_type, s.virtual_size, s.physical_size, s.bytes_read, s.created, v.vol_type \
     FROM snapshots s JOIN zones z ON z.id = s.zone_id LEFT JOIN accounts a ON a.id = s.account_id LEFT JOIN domains d ON d.id = a.domain_id LEFT JOIN volumes v ON v.id = s.volume_id";
const FROM: &str = "snapshots s JOIN zones z ON z.id = s.zone_id LEFT JOIN accounts a ON a.id = s.account_id LEFT JOIN domains d ON d.id = a.domain_id LEFT JOIN volumes v ON v.id = s.volume_id";

fn snapshot_json(r: &sqlx::any::AnyRow) -> Result<Value, sqlx::Error> {
    let interval: String = r.try_get("interval_type")?;
    let st: String = r.try_get("state")?;
    Ok(json!({
        "id": r.try_get::<String, _>("id")?,
        "name": r.try_get::<String, _>("name")?,
        "account": r.try_get::<Option<String>, _>("account_name")?,
        "domainid": r.try_get::<Option<String>, _>("domain_id")?,
        "domain": r.try_get::<Option<String>, _>("domain_name")?,
        "snapshottype": interval,
        "intervaltype": interval,
        "volumeid": r.try_get::<String, _>("volume_id")?,
        "volumename": r.try_get::<String, _>("volume_name")?,
        "volumetype": r.try_get::<Option<String>, _>("vol_type")?.unwrap_or_else(|| "DATADISK".into()),
        "created": r.try_get::<String, _>("created")?,
        "revertable": st == state::BACKED_UP,
        "state": st,
        "physicalsize": r.try_get::<i64, _>("physical_size")?,
        "virtualsize": r.try_get::<i64, _>("virtual_size")?,
        "bytesread": r.try_get::<i64, _>("bytes_read")?,
        "zoneid": r.try_get::<String, _>("zone_id")?,
        "zonename": r.try_get::<String, _>("zone_name")?,
        "tags": [],
    }))
}

async fn snapshot_answer(state: &State, id: &str) -> Result<Value, ApiError> {
    let r = sqlx::query(&format!("{SELECT} WHERE s.id = $1"))
        .bind(id.to_owned())
        .fetch_one(&state.db.pool)
        .await?;
    Ok(json!({ "snapshot": snapshot_json(&r)? }))
}

fn internal(text: String) -> ApiError {
    ApiError::new(
        crate::error::code::INTERNAL_ERROR,
        crate::error::cs::SERVER_API,
        text,
    )
}

/// `createSnapshot`: records the request, then waits for the backup runner.
pub async fn create_snapshot(state: State, caller: Caller, p: Params) -> Result<Value, ApiError> {
    let volume = p.non_empty("volumeid").unwrap_or_default().to_owned();
    let id = snapshots::request(&state, &caller, &volume, p.non_empty("name"), None).await?;
    let wait = Duration::from_secs(
        crate::model::settings::uint(&state, &crate::model::settings::SNAPSHOT_WAIT).await,
    );
    let started = std::time::Instant::now();
    loop {
        let (st, error) = snapshots::outcome(&state, &id).await?;
        match st.as_str() {
            state::BACKED_UP => return snapshot_answer(&state, &id).await,
            state::ERROR => {
                return Err(internal(format!(
                    "Failed to create snapshot of volume {volume}: {}",
                    error.unwrap_or_default()
                )));
            }
            _ if started.elapsed() > wait => {
                return Err(internal(format!(
                    "Snapshot {id} of volume {volume} was not backed up within backup.snapshot.wait ({} s)",
                    wait.as_secs()
                )));
            }
            _ => tokio::time::sleep(Duration::from_millis(250)).await,
        }
    }
}

/// `listSnapshots`.
pub async fn list_snapshots(state: State, caller: Caller, p: Params) -> Result<Value, ApiError> {
    let page = Page::from_params(&p, crate::model::settings::page_size(&state).await)?;
    let mut f = Filter::default();
    Scope::of(&caller).restrict(&mut f, "s.account_id", "d.path");
    f.ne("s.state", state::DESTROYED);
    for (param, col) in [
        ("id", "s.id"),
        ("volumeid", "s.volume_id"),
        ("name", "s.name"),
        ("zoneid", "s.zone_id"),
    ] {
        if let Some(v) = p.non_empty(param) {
            f.eq(col, v);
        }
    }
    if let Some(ids) = p.non_empty("ids") {
        let ids: Vec<&str> = ids.split(',').map(str::trim).filter(|i| !i.is_empty()).collect();
        f.any_of("s.id", &ids);
    }
    match p
        .non_empty("snapshottype")
        .map(str::to_ascii_uppercase)
        .as_deref()
    {
        None => {}
        Some("MANUAL") => f.eq("s.interval_type", "MANUAL"),
        Some("RECURRING") => f.ne("s.interval_type", "MANUAL"),
        Some(other) => return Err(ApiError::param(format!("Unsupported snapshot type {other}"))),
    }
    if let Some(i) = p.non_empty("intervaltype") {
        let i = i.to_ascii_uppercase();
        if !snapshots::INTERVALS.contains(&i.as_str()) {
            return Err(ApiError::param(format!("Unsupported snapshot interval type {i}")));
        }
        f.eq("s.interval_type", &i);
    }
    if let Some(k) = p.non_empty("keyword") {
        f.keyword(&["s.name"], k);
    }
    let total = f.count(&state.db.pool, FROM).await?;
    let rows = f
        .rows(
            &state.db.pool,
            SELECT,
            &format!(" ORDER BY s.created_ms DESC, s.id{}", page.sql()),
        )
        .await?;
    let items = rows.iter().map(snapshot_json).collect::<Result<Vec<_>, _>>()?;
    if p.non_empty("showunique")
        .is_some_and(|v| v.eq_ignore_ascii_case("false"))
    {
        let urls: Vec<Option<String>> = rows
            .iter()
            .map(|r| r.try_get::<Option<String>, _>("store_url"))
            .collect::<Result<_, _>>()?;
        let items = per_store(&state, items, &urls).await?;
        let total = if p.non_empty("page").is_some() {
            total
        } else {
            i64::try_from(items.len()).unwrap_or(i64::MAX)
        };
        return Ok(list_response("snapshot", total, items));
    }
    Ok(list_response("snapshot", total, items))
}

/// `showunique=false`: one entry per snapshot and store that holds it (the staging store, then
/// each object store's replica), with CloudStack's `datastore*` fields and `downloaddetails`.
async fn per_store(
    state: &State,
    items: Vec<Value>,
    urls: &[Option<String>],
) -> Result<Vec<Value>, ApiError> {
    use crate::model::replicas;
    let ids: Vec<String> = items
        .iter()
        .filter_map(|v| v["id"].as_str().map(str::to_owned))
        .collect();
    let reps = replicas::by_artefact(state, &[replicas::kind::SNAPSHOT], &ids).await?;
    let stores: Vec<(String, String, String)> = sqlx::query_as("SELECT id, name, url FROM image_stores")
        .fetch_all(&state.db.pool)
        .await?;
    let mut out = Vec::new();
    for (v, url) in items.into_iter().zip(urls) {
        let id = v["id"].as_str().unwrap_or_default().to_owned();
        if let Some((sid, name, _)) = url.as_deref().and_then(|u| {
            stores
                .iter()
                .find(|(_, _, s)| crate::model::stores::same_store(s, u))
        }) {
            let ready = v["state"] == state::BACKED_UP;
            let mut e = v.clone();
            e["datastoreid"] = json!(sid);
            e["datastorename"] = json!(name);
            e["datastoretype"] = json!("Image");
            e["datastorestate"] = json!(if ready { "Ready" } else { "Allocated" });
            e["downloaddetails"] = json!({
                "downloadPercent": if ready { "100" } else { "0" },
                "downloadState": if ready { "DOWNLOADED" } else { "NOT_DOWNLOADED" },
            });
            out.push(e);
        }
        for r in reps.get(&id).into_iter().flatten() {
            let done = r.state == replicas::state::REPLICATED;
            let mut e = v.clone();
            e["datastoreid"] = json!(r.store_id);
            e["datastorename"] = json!(r.store_name);
            e["datastoretype"] = json!("Image");
            e["datastorestate"] = json!(match r.state.as_str() {
                replicas::state::REPLICATED => "Ready",
                replicas::state::REPLICATING => "Copying",
                replicas::state::FAILED => "Failed",
                replicas::state::DELETING => "Destroying",
                _ => "Allocated",
            });
            if let Some(err) = &r.error {
                e["status"] = json!(err);
            }
            e["downloaddetails"] = json!({
                "downloadPercent": if done { "100" } else { "0" },
                "downloadState": replicas::download_state(&r.state),
            });
            out.push(e);
        }
    }
    Ok(out)
}

/// `deleteSnapshot`.
pub async fn delete_snapshot(state: State, caller: Caller, p: Params) -> Result<Value, ApiError> {
    let id = p.non_empty("id").unwrap_or_default();
    snapshots::get_managed(&state, &caller, id).await?;
    crate::backup::delete(&state, id).await?;
    Ok(success())
}

/// A backed-up snapshot the caller manages.
async fn usable(state: &State, caller: &Caller, id: &str) -> Result<snapshots::Snapshot, ApiError> {
    let s = snapshots::get_managed(state, caller, id).await?;
    if s.state != state::BACKED_UP {
        return Err(ApiError::param(format!(
            "Snapshot {id} is not backed up (it is {})",
            s.state
        )));
    }
    Ok(s)
}

/// `revertSnapshot`: the snapshot written over its volume's file, the guest stopped.
pub async fn revert_snapshot(state: State, caller: Caller, p: Params) -> Result<Value, ApiError> {
    let id = p.non_empty("id").unwrap_or_default();
    let snap = usable(&state, &caller, id).await?;
    let vol = volumes::get(&state, &snap.volume_id).await?;
    if crate::backup::guest_running(&state, &vol).await? {
        return Err(ApiError::param(
            "The VM the specified disk is attached to is not in the shutdown state.",
        ));
    }
    let Some((_, pool_url)) = &vol.pool else {
        return Err(ApiError::param(format!(
            "Volume {} is not on a primary storage pool the storage VM reaches: create a volume from the snapshot instead",
            vol.name
        )));
    };
    crate::backup::restore(
        &state,
        &snap,
        ImageRef {
            store_url: pool_url.clone(),
            path: vol.path.clone(),
            format: vol.format.clone(),
        },
        None,
    )
    .await?;
    tracing::info!(snapshot = %id, volume = %vol.id, "Volume reverted to a snapshot");
    snapshot_answer(&state, id).await
}

/// `createVolume snapshotid=`: the snapshot written as a new qcow2 volume on a pool.
pub async fn create_volume(state: State, caller: Caller, p: Params) -> Result<Value, ApiError> {
    let Some(sid) = p.non_empty("snapshotid") else {
        return Err(ApiError::param(
            "snapshotid is required: volumes are created from snapshots here (disk offerings are not modelled)",
        ));
    };
    let snap = usable(&state, &caller, sid).await?;
    let source = volumes::get(&state, &snap.volume_id).await.ok();
    let pool = match p.non_empty("storageid") {
        Some(pool) => pool.to_owned(),
        None => match source
            .as_ref()
            .and_then(|v| v.pool.as_ref())
            .map(|(id, _)| id.clone())
        {
            Some(pool) => pool,
            None => volumes::first_pool_of_zone(&state, &snap.zone_id)
                .await?
                .ok_or_else(|| {
                    ApiError::param(format!("Zone {} has no primary storage pool", snap.zone_id))
                })?,
        },
    };
    let pool_url = volumes::pool_url(&state, &pool).await?;
    let id = crate::util::new_uuid().map_err(|e| ApiError::internal(&e))?;
    let written = crate::backup::restore(
        &state,
        &snap,
        ImageRef {
            store_url: pool_url,
            path: id.clone(),
            format: "QCOW2".into(),
        },
        None,
    )
    .await?;
    let name = p
        .non_empty("name")
        .map_or_else(|| format!("{}-{}", snap.name, &id[..8]), str::to_owned);
    volumes::record_created(
        &state,
        &id,
        &snap.account_id,
        &volumes::NewVolume {
            pool_id: &pool,
            path: &id,
            name: Some(&name),
            format: "QCOW2",
            size: written.virtual_size,
        },
    )
    .await?;
    let row = sqlx::query(&format!("{} WHERE v.id = $1", crate::api::volumes::VOLUME_SELECT))
        .bind(id.clone())
        .fetch_one(&state.db.pool)
        .await?;
    let mut v = crate::api::volumes::volume_json(&row)?;
    if let Some(o) = v.as_object_mut() {
        o.insert("snapshotid".into(), json!(sid));
        o.insert("physicalsize".into(), json!(written.physical_size));
        o.insert("virtualsize".into(), json!(written.virtual_size));
    }
    Ok(json!({ "volume": v }))
}

fn policy_json(r: &sqlx::any::AnyRow) -> Result<Value, sqlx::Error> {
    let interval: String = r.try_get("interval_type")?;
    Ok(json!({
        "id": r.try_get::<String, _>("id")?,
        "volumeid": r.try_get::<String, _>("volume_id")?,
        "schedule": r.try_get::<String, _>("schedule")?,
        "intervaltype": snapshots::INTERVALS.iter().position(|i| *i == interval).unwrap_or(0),
        "maxsnaps": r.try_get::<i64, _>("max_snaps")?,
        "timezone": r.try_get::<String, _>("timezone")?,
        "fordisplay": r.try_get::<i64, _>("for_display")? != 0,
        "tags": [],
    }))
}

const POLICY_SELECT: &str = "SELECT p.id, p.volume_id, p.interval_type, p.schedule, p.timezone, p.max_snaps, p.for_display FROM snapshot_policies p JOIN volumes v ON v.id = p.volume_id LEFT JOIN accounts a ON a.id = v.account_id LEFT JOIN domains d ON d.id = a.domain_id";
const POLICY_FROM: &str = "snapshot_policies p JOIN volumes v ON v.id = p.volume_id LEFT JOIN accounts a ON a.id = v.account_id LEFT JOIN domains d ON d.id = a.domain_id";

async fn policy_answer(state: &State, id: &str) -> Result<Value, ApiError> {
    let r = sqlx::query(&format!("{POLICY_SELECT} WHERE p.id = $1"))
        .bind(id.to_owned())
        .fetch_one(&state.db.pool)
        .await?;
    Ok(json!({ "snapshotpolicy": policy_json(&r)? }))
}

/// `createSnapshotPolicy`.
pub async fn create_policy(state: State, caller: Caller, p: Params) -> Result<Value, ApiError> {
    let max = p
        .non_empty("maxsnaps")
        .and_then(|m| m.parse::<i64>().ok())
        .ok_or_else(|| ApiError::param("maxsnaps must be a number"))?;
    let id = snapshots::create_policy(
        &state,
        &caller,
        &snapshots::NewPolicy {
            volume_id: p.non_empty("volumeid").unwrap_or_default(),
            interval: p.non_empty("intervaltype").unwrap_or_default(),
            schedule: p.non_empty("schedule").unwrap_or_default(),
            timezone: p.non_empty("timezone").unwrap_or_default(),
            max_snaps: max,
            for_display: p
                .non_empty("fordisplay")
                .is_none_or(|v| !v.eq_ignore_ascii_case("false")),
        },
    )
    .await?;
    policy_answer(&state, &id).await
}

/// `listSnapshotPolicies`.
pub async fn list_policies(state: State, caller: Caller, p: Params) -> Result<Value, ApiError> {
    let page = Page::from_params(&p, crate::model::settings::page_size(&state).await)?;
    if p.non_empty("id").is_none() && p.non_empty("volumeid").is_none() {
        return Err(ApiError::param("Unable to find a volume with id null"));
    }
    let mut f = Filter::default();
    Scope::of(&caller).restrict(&mut f, "v.account_id", "d.path");
    for (param, col) in [("id", "p.id"), ("volumeid", "p.volume_id")] {
        if let Some(v) = p.non_empty(param) {
            f.eq(col, v);
        }
    }
    if let Some(d) = p.non_empty("fordisplay") {
        f.flag("p.for_display", d.eq_ignore_ascii_case("true"));
    }
    let total = f.count(&state.db.pool, POLICY_FROM).await?;
    let rows = f
        .rows(
            &state.db.pool,
            POLICY_SELECT,
            &format!(" ORDER BY p.created, p.id{}", page.sql()),
        )
        .await?;
    let items = rows.iter().map(policy_json).collect::<Result<Vec<_>, _>>()?;
    Ok(list_response("snapshotpolicy", total, items))
}

/// `updateSnapshotPolicy`.
pub async fn update_policy(state: State, caller: Caller, p: Params) -> Result<Value, ApiError> {
    let id = p.non_empty("id").unwrap_or_default();
    let display = p.non_empty("fordisplay").map(|v| v.eq_ignore_ascii_case("true"));
    snapshots::update_policy(&state, &caller, id, display).await?;
    policy_answer(&state, id).await
}

/// `deleteSnapshotPolicies`.
pub async fn delete_policies(state: State, caller: Caller, p: Params) -> Result<Value, ApiError> {
    let mut ids: Vec<&str> = p
        .non_empty("ids")
        .map(|v| v.split(',').map(str::trim).filter(|i| !i.is_empty()).collect())
        .unwrap_or_default();
    if let Some(id) = p.non_empty("id") {
        ids.push(id);
    }
    snapshots::delete_policies(&state, &caller, &ids).await?;
    Ok(success())
}
