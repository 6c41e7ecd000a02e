//! Image stores: `addImageStore` (NFS or S3), `addImageStoreS3`, `listImageStores`,
//! `deleteImageStore`, the NFS staging stores (`createSecondaryStagingStore`,
//! `listSecondaryStagingStores`, `deleteSecondaryStagingStore`), `listReplicas` and
//! `rebuildImageStore` (ours): the
//! HTTP side of [`crate::model::stores`], [`crate::model::object_stores`] and
//! [`crate::model::replicas`].
//!
//! Invariants: capacity figures of NFS stores come from the storage VMs' heartbeats
//! ([`stores::capacity`]), those of object stores from the replicas recorded there;
//! `providername` follows the URL's protocol; an object store's secret key is never in an answer.

use std::collections::{BTreeMap, HashMap};

use serde_json::{Value, json};
use sqlx::Row as _;

use crate::api::{list_response, success};
use crate::command::{Command, ParamSpec, Ty, opt, req};
use crate::error::ApiError;
use crate::model::object_stores::{self, ObjectStore};
use crate::model::replicas;
use crate::model::stores::{self, normalize_url};
use crate::paging::Page;
use crate::params::Params;
use crate::roles::Access;
use crate::state::{Caller, State};

/// `addImageStore` parameters.
pub const ADD_IMAGE_STORE: &[ParamSpec] = &[
    req("provider", Ty::String, "NFS, S3 or Swift"),
    opt("name", Ty::String, "Name (default: from the URL)"),
    opt(
        "url",
        Ty::String,
        "NFS: nfs://HOST[:PORT]/EXPORT[?mountport=N] or file:///PATH; S3: the endpoint when details has none",
    ),
    opt("zoneid", Ty::Uuid, "Zone (default: the oldest zone)"),
    opt(
        "details",
        Ty::Map,
        "details[i].key / details[i].value pairs; S3: accesskey, secretkey, bucket, endpoint, usehttps, region, pathstyle",
    ),
];
/// `addImageStoreS3` parameters (CloudStack's older S3 command).
pub const ADD_IMAGE_STORE_S3: &[ParamSpec] = &[
    req("accesskey", Ty::String, "S3 access key"),
    req("secretkey", Ty::String, "S3 secret key"),
    req("bucket", Ty::String, "Name of the bucket (it must exist)"),
    req(
        "endpoint",
        Ty::String,
        "S3 endpoint: host[:port] or http(s)://host[:port]",
    ),
    opt(
        "usehttps",
        Ty::Boolean,
        "Use HTTPS when endpoint has no scheme (default true)",
    ),
    opt("connectiontimeout", Ty::Integer, "Accepted; not used"),
    opt("maxerrorretry", Ty::Integer, "Accepted; not used"),
    opt("sockettimeout", Ty::Integer, "Accepted; not used"),
    opt("connectionttl", Ty::Integer, "Accepted; not used"),
    opt("usetcpkeepalive", Ty::Boolean, "Accepted; not used"),
    opt(
        "s3signer",
        Ty::String,
        "Accepted; requests are signed with Signature V4",
    ),
    opt("region", Ty::String, "Signing region (ours; default us-east-1)"),
    opt(
        "pathstyle",
        Ty::Boolean,
        "Path-style addressing (ours; default true)",
    ),
    opt("name", Ty::String, "Name (ours; default: the bucket)"),
    opt("zoneid", Ty::Uuid, "Zone (ours; default: the oldest zone)"),
];
/// `listImageStores` parameters.
pub const LIST_IMAGE_STORES: &[ParamSpec] = &[
    opt("id", Ty::Uuid, "Image store id"),
    opt("name", Ty::String, "Name"),
    opt("provider", Ty::String, "Provider (NFS, Local, S3)"),
    opt("protocol", Ty::String, "Protocol (nfs, file, http, https)"),
    opt("zoneid", Ty::Uuid, "Zone id"),
    opt("keyword", Ty::String, "Substring of the name"),
    opt("page", Ty::Integer, "Page number"),
    opt("pagesize", Ty::Integer, "Page size"),
];
/// `deleteImageStore` parameters.
pub const DELETE_IMAGE_STORE: &[ParamSpec] = &[req("id", Ty::Uuid, "Image store id")];
/// `createSecondaryStagingStore` parameters.
pub const CREATE_STAGING_STORE: &[ParamSpec] = &[
    req(
        "url",
        Ty::String,
        "nfs://HOST[:PORT]/EXPORT[?mountport=N] or file:///PATH",
    ),
    opt("zoneid", Ty::Uuid, "Zone (default: the oldest zone)"),
    opt(
        "details",
        Ty::Map,
        "details[i].key / details[i].value pairs (kept)",
    ),
    opt("scope", Ty::String, "ZONE (the only scope)"),
    opt(
        "provider",
        Ty::String,
        "NFS (the only provider of staging stores)",
    ),
    opt("name", Ty::String, "Name (ours; default: the URL)"),
];
/// `listReplicas` parameters (ours).
pub const LIST_REPLICAS: &[ParamSpec] = &[
    opt("imagestoreid", Ty::Uuid, "Object store id"),
    opt("resourceid", Ty::Uuid, "Template, ISO, copy or snapshot id"),
    opt("resourcetype", Ty::String, "template, copy or snapshot"),
    opt(
        "state",
        Ty::String,
        "Pending, Replicating, Replicated, Failed, Deleting",
    ),
    opt("page", Ty::Integer, "Page number"),
    opt("pagesize", Ty::Integer, "Page size"),
];

/// `rebuildImageStore` parameters (ours).
pub const REBUILD_IMAGE_STORE: &[ParamSpec] = &[
    req("id", Ty::Uuid, "The NFS staging store to fill again"),
    opt(
        "objectstoreid",
        Ty::Uuid,
        "The object store to read (default: the zone's one holding most of the store's artefacts)",
    ),
];

/// Image store commands.
pub static COMMANDS: &[Command] = &[
    Command::new("addImageStore", "Adds a secondary storage (image) store: an NFS store, or an S3 bucket that the zone's staging stores are replicated to", Access::ADMIN, ADD_IMAGE_STORE, crate::handler!(add_image_store)).returns(crate::api::fields::IMAGE_STORE),
    Command::new("addImageStoreS3", "Adds an S3 bucket as the zone's object store", Access::ADMIN, ADD_IMAGE_STORE_S3, crate::handler!(add_image_store_s3)).returns(crate::api::fields::IMAGE_STORE),
    Command::new("listImageStores", "Lists image stores (NFS and S3) with their capacity and health", Access::ADMIN, LIST_IMAGE_STORES, crate::handler!(list_image_stores)).returns(crate::api::fields::IMAGE_STORE),
    Command::new("deleteImageStore", "Deletes an image store that holds no templates, ISOs, snapshots or replicas", Access::ADMIN, DELETE_IMAGE_STORE, crate::handler!(delete_image_store)).returns(crate::api::fields::SUCCESS),
    Command::new("createSecondaryStagingStore", "Adds an NFS staging store (role ImageCache): downloads, uploads and backups land on it and are replicated to the zone's object stores", Access::ADMIN, CREATE_STAGING_STORE, crate::handler!(create_staging_store)).returns(crate::api::fields::IMAGE_STORE),
    Command::new("listSecondaryStagingStores", "Lists the NFS staging stores", Access::ADMIN, LIST_IMAGE_STORES, crate::handler!(list_staging_stores)).returns(crate::api::fields::IMAGE_STORE),
    Command::new("deleteSecondaryStagingStore", "Deletes a staging store that holds nothing", Access::ADMIN, DELETE_IMAGE_STORE, crate::handler!(delete_staging_store)).returns(crate::api::fields::SUCCESS),
    Command::new("rebuildImageStore", "Brings every replicated template, ISO and snapshot of an NFS staging store back from an object store, verified (disaster recovery; ours)", Access::ADMIN, REBUILD_IMAGE_STORE, crate::handler!(rebuild_image_store)).on_leader().returns(crate::api::fields::REBUILD),
    Command::new("listReplicas", "Lists the replicas of templates, ISOs and snapshots in object stores, with their state (ours)", Access::ADMIN, LIST_REPLICAS, crate::handler!(list_replicas)).returns(crate::api::fields::REPLICA),
];

/// NFS roles.
const ROLE_IMAGE: &str = "Image";
const ROLE_CACHE: &str = "ImageCache";

const STORE_SELECT: &str = "SELECT s.id, s.name, s.url, s.provider, s.protocol, s.zone_id, z.name AS zone_name, s.created, s.role FROM image_stores s JOIN zones z ON z.id = s.zone_id";

fn store_json(row: &sqlx::any::AnyRow, capacity: &HashMap<String, (u64, u64)>) -> Result<Value, sqlx::Error> {
    let url: String = row.try_get("url")?;
    let provider = stores::protocol_of(&url).map_or_else(
        |_| row.try_get::<String, _>("provider"),
        |p| Ok(p.provider().to_owned()),
    )?;
    let mut v = json!({
        "id": row.try_get::<String, _>("id")?,
        "name": row.try_get::<String, _>("name")?,
        "url": url,
        "protocol": row.try_get::<String, _>("protocol")?,
        "providername": provider,
        "scope": "ZONE",
        "zoneid": row.try_get::<String, _>("zone_id")?,
        "zonename": row.try_get::<String, _>("zone_name")?,
        "readonly": false,
        "hasannotations": false,
    });
    if let Some((total, used)) = capacity.get(&normalize_url(&url)) {
        v["disksizetotal"] = json!(total);
        v["disksizeused"] = json!(used);
    }
    Ok(v)
}

fn object_store_json(s: &ObjectStore, used: &HashMap<String, u64>) -> Value {
    let mut v = json!({
        "id": s.id,
        "name": s.name,
        "url": s.url(),
        "protocol": s.protocol(),
        "providername": s.provider,
        "scope": "ZONE",
        "zoneid": s.zone_id,
        "zonename": s.zone_name,
        "readonly": false,
        "hasannotations": false,
        "disksizeused": used.get(&s.id).copied().unwrap_or(0),
        "health": s.health,
    });
    if let Some(d) = &s.health_detail {
        v["healthdetail"] = json!(d);
    }
    if s.health_checked_ms > 0 {
        v["healthchecked"] = json!(cs_time(s.health_checked_ms));
    }
    v
}

fn cs_time(ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .map_or_else(|_| crate::util::now_cs(), crate::util::format_cs)
}

fn details_of(p: &Params) -> BTreeMap<String, String> {
    p.map("details")
        .into_iter()
        .map(|(k, v)| (k.to_ascii_lowercase(), v.to_owned()))
        .collect()
}

async fn add_nfs(state: &State, p: &Params, role: &str) -> Result<Value, ApiError> {
    let url = p.non_empty("url").ok_or_else(|| {
        ApiError::param("Unable to execute API command addimagestore due to missing parameter url")
    })?;
    stores::protocol_of(url)?;
    let zone_id = crate::model::resolve_zone(&state.db.pool, p.non_empty("zoneid")).await?;
    let name = p.non_empty("name").map_or_else(|| url.to_owned(), str::to_owned);
    if object_stores::list(state).await?.iter().any(|s| s.name == name) {
        return Err(ApiError::param(format!(
            "An image store named {name} already exists"
        )));
    }
    let mut details = serde_json::Map::new();
    for (k, v) in p.map("details") {
        details.insert(k.to_owned(), json!(v));
    }
    let id = stores::add(state, &name, url, &zone_id, &details, role).await?;
    let row = sqlx::query(&format!("{STORE_SELECT} WHERE s.id = $1"))
        .bind(id)
        .fetch_one(&state.db.pool)
        .await?;
    Ok(store_json(&row, &stores::capacity(state).await?)?)
}

async fn add_s3(state: &State, p: &Params, details: &BTreeMap<String, String>) -> Result<Value, ApiError> {
    let config = object_stores::s3_config(p.non_empty("url"), details)?;
    let zone_id = crate::model::resolve_zone(&state.db.pool, p.non_empty("zoneid")).await?;
    let name = p
        .non_empty("name")
        .map_or_else(|| config.bucket.clone(), str::to_owned);
    let id = object_stores::add_s3(state, &name, &zone_id, &config, details).await?;
    let store = object_stores::get(state, &id)
        .await?
        .ok_or_else(|| ApiError::internal(&"the new object store is not there"))?;
    Ok(object_store_json(&store, &HashMap::new()))
}

async fn add_swift(state: &State, p: &Params) -> Result<Value, ApiError> {
    let details = details_of(p);
    let config = object_stores::swift_config(p.non_empty("url"), &details)?;
    let zone_id = crate::model::resolve_zone(&state.db.pool, p.non_empty("zoneid")).await?;
    let name = p
        .non_empty("name")
        .map_or_else(|| config.container.clone(), str::to_owned);
    let id = object_stores::add_swift(state, &name, &zone_id, &config, &details).await?;
    let store = object_stores::get(state, &id)
        .await?
        .ok_or_else(|| ApiError::internal(&"the new object store is not there"))?;
    Ok(object_store_json(&store, &HashMap::new()))
}

/// `addImageStore`.
pub async fn add_image_store(state: State, _caller: Caller, p: Params) -> Result<Value, ApiError> {
    let provider = p.non_empty("provider").unwrap_or_default();
    let store = if provider.eq_ignore_ascii_case("nfs") {
        add_nfs(&state, &p, ROLE_IMAGE).await?
    } else if provider.eq_ignore_ascii_case("s3") {
        add_s3(&state, &p, &details_of(&p)).await?
    } else if provider.eq_ignore_ascii_case("swift") {
        add_swift(&state, &p).await?
    } else {
        return Err(ApiError::param(format!(
            "Image store provider {provider:?} is not supported: use NFS, S3 or Swift"
        )));
    };
    Ok(json!({ "imagestore": store }))
}

/// `addImageStoreS3`: the same as `addImageStore provider=S3` with the keys as parameters.
pub async fn add_image_store_s3(state: State, _caller: Caller, p: Params) -> Result<Value, ApiError> {
    let mut details = BTreeMap::new();
    // The command's parameters are the details' keys (ours, region and pathstyle, too).
    for k in object_stores::S3_KEYS {
        if let Some(v) = p.non_empty(k) {
            details.insert((*k).to_owned(), v.to_owned());
        }
    }
    Ok(json!({ "imagestore": add_s3(&state, &p, &details).await? }))
}

/// NFS stores of `role` and (for [`ROLE_IMAGE`]) the object stores, filtered as the list
/// commands' parameters say, oldest first.
async fn listed(state: &State, p: &Params, role: &str) -> Result<Vec<Value>, ApiError> {
    let id = p.non_empty("id");
    let name = p.non_empty("name");
    let provider = p.non_empty("provider").map(str::to_ascii_lowercase);
    let protocol = p.non_empty("protocol").map(str::to_ascii_lowercase);
    let zone = p.non_empty("zoneid");
    let keyword = p.non_empty("keyword").map(str::to_ascii_lowercase);
    let keep = |v: &Value| {
        let s = |k: &str| v[k].as_str().unwrap_or_default().to_owned();
        id.is_none_or(|x| s("id") == x)
            && name.is_none_or(|x| s("name") == x)
            && provider
                .as_deref()
                .is_none_or(|x| s("providername").to_ascii_lowercase() == x)
            && protocol
                .as_deref()
                .is_none_or(|x| s("protocol").to_ascii_lowercase() == x)
            && zone.is_none_or(|x| s("zoneid") == x)
            && keyword.as_deref().is_none_or(|k| {
                s("name").to_ascii_lowercase().contains(k) || s("url").to_ascii_lowercase().contains(k)
            })
    };
    let rows = sqlx::query(&format!("{STORE_SELECT} ORDER BY s.created, s.name"))
        .fetch_all(&state.db.pool)
        .await?;
    let capacity = stores::capacity(state).await?;
    let mut items: Vec<(String, Value)> = Vec::new();
    for r in &rows {
        if r.try_get::<String, _>("role")? != role {
            continue;
        }
        items.push((r.try_get("created")?, store_json(r, &capacity)?));
    }
    if role == ROLE_IMAGE {
        let used = object_stores::used_bytes(state).await?;
        for s in object_stores::list(state).await? {
            items.push((s.created.clone(), object_store_json(&s, &used)));
        }
    }
    items.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(items.into_iter().map(|(_, v)| v).filter(keep).collect())
}

fn paged(page: &Page, all: Vec<Value>) -> (i64, Vec<Value>) {
    let total = i64::try_from(all.len()).unwrap_or(i64::MAX);
    (total, page.slice(all))
}

/// `listImageStores`.
pub async fn list_image_stores(state: State, _caller: Caller, p: Params) -> Result<Value, ApiError> {
    let page = Page::from_params(&p, crate::model::settings::page_size(&state).await)?;
    let (total, items) = paged(&page, listed(&state, &p, ROLE_IMAGE).await?);
    Ok(list_response("imagestore", total, items))
}

/// `deleteImageStore`: refused while templates, snapshots or replicas live on the store.
pub async fn delete_image_store(state: State, _caller: Caller, p: Params) -> Result<Value, ApiError> {
    let id = p.non_empty("id").unwrap_or_default();
    if !object_stores::delete(&state, id).await? {
        stores::delete(&state, id).await?;
    }
    Ok(success())
}

/// `createSecondaryStagingStore`.
pub async fn create_staging_store(state: State, _caller: Caller, p: Params) -> Result<Value, ApiError> {
    if let Some(provider) = p.non_empty("provider").filter(|v| !v.eq_ignore_ascii_case("nfs")) {
        return Err(ApiError::param(format!(
            "Staging store provider {provider:?} is not supported: use NFS"
        )));
    }
    if let Some(scope) = p.non_empty("scope").filter(|v| !v.eq_ignore_ascii_case("zone")) {
        return Err(ApiError::param(format!(
            "Staging store scope {scope:?} is not supported: use ZONE"
        )));
    }
    Ok(json!({ "secondarystorage": add_nfs(&state, &p, ROLE_CACHE).await? }))
}

/// `listSecondaryStagingStores`.
pub async fn list_staging_stores(state: State, _caller: Caller, p: Params) -> Result<Value, ApiError> {
    let page = Page::from_params(&p, crate::model::settings::page_size(&state).await)?;
    let (total, items) = paged(&page, listed(&state, &p, ROLE_CACHE).await?);
    Ok(list_response("secondarystagingstore", total, items))
}

/// `deleteSecondaryStagingStore`.
pub async fn delete_staging_store(state: State, _caller: Caller, p: Params) -> Result<Value, ApiError> {
    stores::delete(&state, p.non_empty("id").unwrap_or_default()).await?;
    Ok(success())
}

/// `rebuildImageStore` (ours): fails naming each artefact that could not be restored.
pub async fn rebuild_image_store(state: State, _caller: Caller, p: Params) -> Result<Value, ApiError> {
    let id = p.non_empty("id").unwrap_or_default();
    let r = crate::model::rebuild::rebuild(&state, id, p.non_empty("objectstoreid")).await?;
    if !r.failed.is_empty() {
        let list = r
            .failed
            .iter()
            .map(|(k, why)| format!("{k}: {why}"))
            .collect::<Vec<_>>()
            .join("; ");
        return Err(ApiError::new(
            crate::error::code::INTERNAL_ERROR,
            crate::error::cs::SERVER_API,
            format!(
                "Rebuilt {} of {} artefacts of image store {id}; not restored: {list}",
                r.restored,
                r.restored + r.failed.len() as u64
            ),
        ));
    }
    Ok(json!({ "rebuild": {
        "imagestoreid": r.store_id,
        "objectstoreid": r.object_store_id,
        "restored": r.restored,
        "bytes": r.bytes,
        "companions": r.companions,
    }}))
}

/// `listReplicas` (ours).
pub async fn list_replicas(state: State, _caller: Caller, p: Params) -> Result<Value, ApiError> {
    let page = Page::from_params(&p, crate::model::settings::page_size(&state).await)?;
    let kind = p.non_empty("resourcetype").map(str::to_ascii_lowercase);
    if let Some(k) = &kind
        && ![
            replicas::kind::TEMPLATE,
            replicas::kind::COPY,
            replicas::kind::SNAPSHOT,
        ]
        .contains(&k.as_str())
    {
        return Err(ApiError::param(format!(
            "resourcetype {k:?} is not one of template, copy, snapshot"
        )));
    }
    let kinds: Vec<&str> = kind.as_deref().into_iter().collect();
    let ids: Option<Vec<String>> = p.non_empty("resourceid").map(|i| vec![i.to_owned()]);
    let wanted_state = p.non_empty("state");
    let all: Vec<Value> = replicas::list(&state, p.non_empty("imagestoreid"), &kinds, ids.as_deref())
        .await?
        .into_iter()
        .filter(|l| wanted_state.is_none_or(|s| l.state.eq_ignore_ascii_case(s)))
        .map(|l| {
            let mut v = json!({
                "imagestoreid": l.store_id,
                "imagestorename": l.store_name,
                "resourcetype": l.kind,
                "resourceid": l.artefact_id,
                "zoneid": l.zone_id,
                "key": l.key,
                "size": l.size,
                "parts": l.parts,
                "state": l.state,
                "attempts": l.attempts,
                "updated": cs_time(l.updated_ms),
            });
            if let Some(e) = l.error {
                v["error"] = json!(e);
            }
            v
        })
        .collect();
    let (total, items) = paged(&page, all);
    Ok(list_response("replica", total, items))
}
