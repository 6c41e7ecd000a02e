//! Secondary storage: image stores (`addImageStore`, `listImageStores`, `deleteImageStore`),
//! templates and ISOs (`registerTemplate`, `registerIso`, `listTemplates`, `listIsos`,
//! `deleteTemplate`, `deleteIso`), `listCapacity` (secondary storage), and the dispatcher that
//! hands downloads to the storage VMs.
//!
//! Invariants:
//! * a template row is written before its download is dispatched, and a download is dispatched
//!   only to a storage VM that is connected and reports serving the template's image store;
//! * dispatching is idempotent (the template id is the agent's job id), so the dispatcher sends a
//!   download again whenever the connection it went to is gone: after an agent restart or a core
//!   restart the job is re-attached, never started twice;
//! * progress only moves a template that is not removed and not finished; `isready` is true only
//!   after the agent reported the install complete (the file verified and `template.properties`
//!   written);
//! * capacity figures come from the storage VMs' heartbeats, never from a call that could block
//!   the API on a hung store.

use std::collections::HashMap;
use std::time::Duration;

use serde_json::{Value, json};
use sqlx::Row as _;
use systemvm_proto::agent::{
    AgentCommand, AgentRole, DownloadCommand, JobPhase, JobProgress, Load, StorageLoad,
};
use tokio::sync::watch;

use crate::agent::UP;
use crate::api::accounts::ROOT_DOMAIN_ID;
use crate::api::{Filter, list_response, success};
use crate::command::{ParamSpec, Ty, opt, req};
use crate::error::{ApiError, code, cs};
use crate::paging::Page;
use crate::params::Params;
use crate::state::{Caller, Role, State};
use crate::util::{new_uuid, now_cs};

/// Download states (CloudStack's `VMTemplateStorageResourceAssoc.Status`).
pub mod download_state {
    /// Not started (no storage VM has taken it yet).
    pub const NOT_DOWNLOADED: &str = "NOT_DOWNLOADED";
    /// A storage VM is downloading it.
    pub const IN_PROGRESS: &str = "DOWNLOAD_IN_PROGRESS";
    /// Installed.
    pub const DOWNLOADED: &str = "DOWNLOADED";
    /// Failed; `status` says why.
    pub const ERROR: &str = "DOWNLOAD_ERROR";
    /// Cancelled.
    pub const ABANDONED: &str = "ABANDONED";
}

/// How often the dispatcher looks for downloads to hand out.
pub const DISPATCH_INTERVAL: Duration = Duration::from_secs(2);
/// Time a storage VM has to answer a command.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest source URL accepted.
const MAX_URL_LEN: usize = 2048;

/// `addImageStore` parameters.
pub const ADD_IMAGE_STORE: &[ParamSpec] = &[
    req("provider", Ty::String, "NFS (S3 and Swift come later)"),
    opt("name", Ty::String, "Name (default: from the URL)"),
    opt(
        "url",
        Ty::String,
        "nfs://HOST[:PORT]/EXPORT[?mountport=N] or file:///PATH",
    ),
    opt("zoneid", Ty::Uuid, "Zone (default: the oldest zone)"),
    opt("details", Ty::String, "details[i].key / details[i].value pairs"),
];
/// `listImageStores` parameters.
pub const LIST_IMAGE_STORES: &[ParamSpec] = &[
    opt("id", Ty::Uuid, "Image store id"),
    opt("name", Ty::String, "Name"),
    opt("provider", Ty::String, "Provider"),
    opt("protocol", Ty::String, "Protocol (nfs, file)"),
    opt("zoneid", Ty::Uuid, "Zone id"),
    opt("keyword", Ty::String, "Substring of the name"),
    opt("page", Ty::Integer, "Page number"),
    opt("pagesize", Ty::Integer, "Page size"),
];
/// `deleteImageStore` parameters.
pub const DELETE_IMAGE_STORE: &[ParamSpec] = &[req("id", Ty::Uuid, "Image store id")];

const TEMPLATE_COMMON: &[ParamSpec] = &[
    req("name", Ty::String, "Name"),
    opt("displaytext", Ty::String, "Description (default: the name)"),
    req("url", Ty::String, "http(s) URL of the image"),
    opt(
        "zoneid",
        Ty::String,
        "Zone id (default: the oldest zone; -1 is taken as the default zone)",
    ),
    opt(
        "checksum",
        Ty::String,
        "Checksum of the download, {ALGO}hex (MD5 without a prefix)",
    ),
    opt("ispublic", Ty::Boolean, "Visible to every account"),
    opt("isfeatured", Ty::Boolean, "Featured (root admins only)"),
    opt("isextractable", Ty::Boolean, "May be extracted"),
    opt("ostypeid", Ty::String, "OS type id (recorded)"),
    opt(
        "imagestoreuuid",
        Ty::Uuid,
        "Image store to install into (default: the zone's first)",
    ),
    opt("directdownload", Ty::Boolean, "Not supported: must be false"),
];
/// `registerTemplate` parameters.
pub const REGISTER_TEMPLATE: &[ParamSpec] = &[
    TEMPLATE_COMMON[0],
    TEMPLATE_COMMON[1],
    TEMPLATE_COMMON[2],
    TEMPLATE_COMMON[3],
    TEMPLATE_COMMON[4],
    TEMPLATE_COMMON[5],
    TEMPLATE_COMMON[6],
    TEMPLATE_COMMON[7],
    TEMPLATE_COMMON[8],
    TEMPLATE_COMMON[9],
    TEMPLATE_COMMON[10],
    req("format", Ty::String, "QCOW2, RAW, VHD or OVA"),
    req("hypervisor", Ty::String, "KVM, XenServer, VMware, …"),
    opt("passwordenabled", Ty::Boolean, "Password reset enabled"),
    opt("requireshvm", Ty::Boolean, "Requires HVM"),
];
/// `registerIso` parameters.
pub const REGISTER_ISO: &[ParamSpec] = &[
    TEMPLATE_COMMON[0],
    TEMPLATE_COMMON[1],
    TEMPLATE_COMMON[2],
    TEMPLATE_COMMON[3],
    TEMPLATE_COMMON[4],
    TEMPLATE_COMMON[5],
    TEMPLATE_COMMON[6],
    TEMPLATE_COMMON[7],
    TEMPLATE_COMMON[8],
    TEMPLATE_COMMON[9],
    TEMPLATE_COMMON[10],
    opt("bootable", Ty::Boolean, "Bootable (default true)"),
];
/// `listTemplates` parameters.
pub const LIST_TEMPLATES: &[ParamSpec] = &[
    req(
        "templatefilter",
        Ty::String,
        "featured, self, selfexecutable, sharedexecutable, executable, community or all",
    ),
    opt("id", Ty::Uuid, "Template id"),
    opt("name", Ty::String, "Name"),
    opt("zoneid", Ty::Uuid, "Zone id"),
    opt("hypervisor", Ty::String, "Hypervisor"),
    opt(
        "isready",
        Ty::Boolean,
        "Only ready (true) or not ready (false) templates",
    ),
    opt("keyword", Ty::String, "Substring of the name or description"),
    opt("showremoved", Ty::Boolean, "Include removed templates"),
    opt("page", Ty::Integer, "Page number"),
    opt("pagesize", Ty::Integer, "Page size"),
];
/// `listIsos` parameters.
pub const LIST_ISOS: &[ParamSpec] = &[
    opt(
        "isofilter",
        Ty::String,
        "featured, self, selfexecutable, sharedexecutable, executable, community or all (default selfexecutable)",
    ),
    opt("id", Ty::Uuid, "ISO id"),
    opt("name", Ty::String, "Name"),
    opt("zoneid", Ty::Uuid, "Zone id"),
    opt(
        "bootable",
        Ty::Boolean,
        "Only bootable (true) or not (false) ISOs",
    ),
    opt(
        "isready",
        Ty::Boolean,
        "Only ready (true) or not ready (false) ISOs",
    ),
    opt("keyword", Ty::String, "Substring of the name or description"),
    opt("showremoved", Ty::Boolean, "Include removed ISOs"),
    opt("page", Ty::Integer, "Page number"),
    opt("pagesize", Ty::Integer, "Page size"),
];
/// `deleteTemplate` / `deleteIso` parameters.
pub const DELETE_TEMPLATE: &[ParamSpec] = &[
    req("id", Ty::Uuid, "Template or ISO id"),
    opt("zoneid", Ty::Uuid, "Zone id (templates live in one zone here)"),
    opt(
        "forced",
        Ty::Boolean,
        "Remove the record even when no storage VM can delete the files (they stay on the store)",
    ),
];
/// `listCapacity` parameters.
pub const LIST_CAPACITY: &[ParamSpec] = &[
    opt("zoneid", Ty::Uuid, "Zone id"),
    opt(
        "type",
        Ty::Integer,
        "Capacity type (6 = secondary storage, the only one reported)",
    ),
    opt(
        "fetchlatest",
        Ty::Boolean,
        "Accepted; figures are always the latest heartbeats",
    ),
    opt("sortby", Ty::String, "Accepted; one type is reported"),
    opt("page", Ty::Integer, "Page number"),
    opt("pagesize", Ty::Integer, "Page size"),
];

/// CloudStack's capacity type of secondary storage.
pub const CAPACITY_TYPE_SECONDARY_STORAGE: i64 = 6;

fn flag(p: &Params, name: &str, default: bool) -> bool {
    p.non_empty(name)
        .map_or(default, |v| v.eq_ignore_ascii_case("true"))
}

/// The zone `zone_id` names (or the oldest zone for `None` and CloudStack's `-1`).
async fn resolve_zone(pool: &sqlx::AnyPool, zone_id: Option<&str>) -> Result<String, ApiError> {
    match zone_id.filter(|z| *z != "-1") {
        Some(z) => {
            if !crate::util::is_uuid(z) {
                return Err(ApiError::param(format!("Invalid zone id {z:?}")));
            }
            sqlx::query_scalar("SELECT id FROM zones WHERE id = $1")
                .bind(z.to_owned())
                .fetch_optional(pool)
                .await?
                .ok_or_else(|| ApiError::param(format!("Unable to find zone by id {z}")))
        }
        None => sqlx::query_scalar("SELECT id FROM zones ORDER BY created, name LIMIT 1")
            .fetch_optional(pool)
            .await?
            .ok_or_else(|| ApiError::param("No zone exists: create one first")),
    }
}

/// Checks an image store URL; returns its protocol (`nfs` | `file`).
pub fn store_protocol(url: &str) -> Result<&'static str, ApiError> {
    let bad = |why: &str| ApiError::param(format!("Invalid image store URL {url:?}: {why}"));
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
        Ok("nfs")
    } else if let Some(path) = url.strip_prefix("file://") {
        if !path.starts_with('/') || path.split('/').any(|c| c == "..") {
            return Err(bad("expected file:///ABSOLUTE/PATH"));
        }
        Ok("file")
    } else {
        Err(bad("NFS stores are nfs://HOST/EXPORT; local ones file:///PATH"))
    }
}

/// A store URL in the form agents report it: no trailing `/`, no default NFS port.
pub fn normalize_store_url(url: &str) -> String {
    let url = url.trim_end_matches('/');
    match url.strip_prefix("nfs://").and_then(|r| r.split_once('/')) {
        Some((host, rest)) => {
            let host = host.strip_suffix(":2049").unwrap_or(host);
            format!("nfs://{host}/{rest}")
        }
        None => url.to_owned(),
    }
}

fn same_store(a: &str, b: &str) -> bool {
    normalize_store_url(a) == normalize_store_url(b)
}

/// What a connected storage VM reports, from its last heartbeat.
#[derive(Debug, Clone)]
pub struct StorageAgent {
    /// System VM id.
    pub id: String,
    /// Zone.
    pub zone_id: String,
    /// Its storage load.
    pub load: StorageLoad,
}

/// Storage VMs whose agent is Up, with their last reported load.
pub async fn storage_agents(state: &State) -> Result<Vec<StorageAgent>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT id, zone_id, last_load FROM system_vms WHERE role = $1 AND agent_state = $2 ORDER BY name",
    )
    .bind(AgentRole::SecStorage.as_str())
    .bind(UP)
    .fetch_all(&state.db.pool)
    .await?;
    let mut out = Vec::new();
    for row in rows {
        let load: Option<Load> = row
            .try_get::<Option<String>, _>("last_load")?
            .and_then(|l| serde_json::from_str(&l).ok());
        if let Some(storage) = load.and_then(|l| l.storage) {
            out.push(StorageAgent {
                id: row.try_get("id")?,
                zone_id: row.try_get("zone_id")?,
                load: storage,
            });
        }
    }
    Ok(out)
}

/// A connected storage VM in `zone_id` serving `store_url`.
async fn agent_for_store(
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

/// Capacity by store URL (total, used), from the storage VMs' heartbeats.
async fn store_capacity(state: &State) -> Result<HashMap<String, (u64, u64)>, sqlx::Error> {
    let mut m = HashMap::new();
    for a in storage_agents(state).await? {
        if let (Some(url), Some(total)) = (a.load.store_url, a.load.capacity_total) {
            m.insert(
                normalize_store_url(&url),
                (total, a.load.capacity_used.unwrap_or(0)),
            );
        }
    }
    Ok(m)
}

const STORE_SELECT: &str = "SELECT s.id, s.name, s.url, s.provider, s.protocol, s.zone_id, z.name AS zone_name, s.created FROM image_stores s JOIN zones z ON z.id = s.zone_id";

fn store_json(row: &sqlx::any::AnyRow, capacity: &HashMap<String, (u64, u64)>) -> Result<Value, sqlx::Error> {
    let url: String = row.try_get("url")?;
    let mut v = json!({
        "id": row.try_get::<String, _>("id")?,
        "name": row.try_get::<String, _>("name")?,
        "url": url,
        "protocol": row.try_get::<String, _>("protocol")?,
        "providername": row.try_get::<String, _>("provider")?,
        "scope": "ZONE",
        "zoneid": row.try_get::<String, _>("zone_id")?,
        "zonename": row.try_get::<String, _>("zone_name")?,
        "readonly": false,
        "hasannotations": false,
    });
    if let Some((total, used)) = capacity.get(&normalize_store_url(&url)) {
        v["disksizetotal"] = json!(total);
        v["disksizeused"] = json!(used);
    }
    Ok(v)
}

/// `addImageStore`.
pub async fn add_image_store(state: State, _caller: Caller, p: Params) -> Result<Value, ApiError> {
    let provider = p.non_empty("provider").unwrap_or_default();
    if !provider.eq_ignore_ascii_case("nfs") {
        return Err(ApiError::param(format!(
            "Image store provider {provider:?} is not supported yet: use NFS"
        )));
    }
    let url = p.non_empty("url").ok_or_else(|| {
        ApiError::param("Unable to execute API command addimagestore due to missing parameter url")
    })?;
    let protocol = store_protocol(url)?;
    let zone_id = resolve_zone(&state.db.pool, p.non_empty("zoneid")).await?;
    let id = new_uuid().map_err(|e| ApiError::internal(&e))?;
    let name = p.non_empty("name").map_or_else(|| url.to_owned(), str::to_owned);
    let mut details = serde_json::Map::new();
    for i in 0..100 {
        match (
            p.non_empty(&format!("details[{i}].key")),
            p.get(&format!("details[{i}].value")),
        ) {
            (Some(k), Some(v)) => {
                details.insert(k.to_owned(), json!(v));
            }
            _ => break,
        }
    }
    let r = sqlx::query(
        "INSERT INTO image_stores (id, name, url, provider, protocol, zone_id, details, created) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
    )
    .bind(id.clone())
    .bind(name.clone())
    .bind(normalize_store_url(url))
    .bind("NFS")
    .bind(protocol)
    .bind(zone_id)
    .bind(Value::Object(details).to_string())
    .bind(now_cs())
    .execute(&state.db.pool)
    .await;
    match r {
        Ok(_) => {}
        Err(sqlx::Error::Database(d)) if d.is_unique_violation() => {
            return Err(ApiError::param(format!(
                "An image store named {name} already exists"
            )));
        }
        Err(e) => return Err(e.into()),
    }
    tracing::info!(%id, %name, %url, "Added an image store");
    let row = sqlx::query(&format!("{STORE_SELECT} WHERE s.id = $1"))
        .bind(id)
        .fetch_one(&state.db.pool)
        .await?;
    Ok(json!({ "imagestore": store_json(&row, &store_capacity(&state).await?)? }))
}

/// `listImageStores`.
pub async fn list_image_stores(state: State, _caller: Caller, p: Params) -> Result<Value, ApiError> {
    let page = Page::from_params(&p, state.page_size().await)?;
    let mut f = Filter::default();
    if let Some(v) = p.non_empty("id") {
        f.eq("s.id", v);
    }
    if let Some(v) = p.non_empty("name") {
        f.eq("s.name", v);
    }
    if let Some(v) = p.non_empty("provider") {
        f.eq("LOWER(s.provider)", &v.to_ascii_lowercase());
    }
    if let Some(v) = p.non_empty("protocol") {
        f.eq("LOWER(s.protocol)", &v.to_ascii_lowercase());
    }
    if let Some(v) = p.non_empty("zoneid") {
        f.eq("s.zone_id", v);
    }
    if let Some(k) = p.non_empty("keyword") {
        f.keyword(&["s.name", "s.url"], k);
    }
    let from = "image_stores s JOIN zones z ON z.id = s.zone_id";
    let total = f.count(&state.db.pool, from).await?;
    let rows = f
        .rows(
            &state.db.pool,
            STORE_SELECT,
            &format!(" ORDER BY s.created, s.name{}", page.sql()),
        )
        .await?;
    let capacity = store_capacity(&state).await?;
    let items = rows
        .iter()
        .map(|r| store_json(r, &capacity))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(list_response("imagestore", total, items))
}

/// `deleteImageStore`: refused while templates live on the store.
pub async fn delete_image_store(state: State, _caller: Caller, p: Params) -> Result<Value, ApiError> {
    let id = p.non_empty("id").unwrap_or_default();
    let used: i64 =
        sqlx::query_scalar("SELECT COUNT(*) FROM templates WHERE store_id = $1 AND removed IS NULL")
            .bind(id.to_owned())
            .fetch_one(&state.db.pool)
            .await?;
    if used > 0 {
        return Err(ApiError::new(
            code::RESOURCE_IN_USE,
            cs::SERVER_API,
            format!(
                "Cannot delete image store {id}: it holds {used} template(s) or ISO(s); delete them first"
            ),
        ));
    }
    let done = sqlx::query(
        "DELETE FROM image_stores WHERE id = $1 AND NOT EXISTS (SELECT 1 FROM templates WHERE store_id = $1)",
    )
    .bind(id.to_owned())
    .execute(&state.db.pool)
    .await?;
    if done.rows_affected() == 0 {
        let exists: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM image_stores WHERE id = $1")
            .bind(id.to_owned())
            .fetch_one(&state.db.pool)
            .await?;
        return Err(if exists == 0 {
            ApiError::param(format!("Unable to find image store by id {id}"))
        } else {
            ApiError::new(
                code::RESOURCE_IN_USE,
                cs::SERVER_API,
                format!("Cannot delete image store {id}: removed templates still reference it"),
            )
        });
    }
    Ok(success())
}

/// Formats accepted by `registerTemplate` (what the storage agent installs).
const TEMPLATE_FORMATS: &[&str] = &["QCOW2", "RAW", "VHD", "OVA"];

/// Checks a checksum parameter: `{ALGO}hex` or bare hex (MD5), with the digest length of the
/// algorithm.
fn check_checksum(c: &str) -> Result<(), ApiError> {
    let (algo, hex) = match c.strip_prefix('{').and_then(|r| r.split_once('}')) {
        Some((a, h)) => (a.to_ascii_lowercase(), h),
        None => ("md5".to_owned(), c),
    };
    let len = match algo.as_str() {
        "md5" => 32,
        "sha1" | "sha-1" => 40,
        "sha224" | "sha-224" => 56,
        "sha256" | "sha-256" => 64,
        "sha384" | "sha-384" => 96,
        "sha512" | "sha-512" => 128,
        _ => {
            return Err(ApiError::param(format!(
                "Unsupported checksum algorithm {algo:?}"
            )));
        }
    };
    if hex.len() != len || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(ApiError::param(format!(
            "Invalid checksum {c:?}: expected {len} hex digits for {algo}"
        )));
    }
    Ok(())
}

fn check_source_url(url: &str) -> Result<(), ApiError> {
    let bad = |why: &str| ApiError::param(format!("Invalid url {url:?}: {why}"));
    if url.len() > MAX_URL_LEN || url.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(bad("too long or contains spaces or control characters"));
    }
    let lower = url.get(..8).unwrap_or(url).to_ascii_lowercase();
    if !lower.starts_with("http://") && !lower.starts_with("https://") {
        return Err(bad("only http:// and https:// URLs are supported"));
    }
    let uri: http::Uri = url.parse().map_err(|_| bad("not a URL"))?;
    if uri.host().is_none_or(str::is_empty) {
        return Err(bad("the URL has no host"));
    }
    Ok(())
}

async fn register(state: State, caller: Caller, p: Params, iso: bool) -> Result<Value, ApiError> {
    let name = p.non_empty("name").unwrap_or_default();
    if name.len() > 255 {
        return Err(ApiError::param("name is longer than 255 characters"));
    }
    let display = p.non_empty("displaytext").unwrap_or(name);
    let url = p.non_empty("url").unwrap_or_default();
    check_source_url(url)?;
    if flag(&p, "directdownload", false) {
        return Err(ApiError::param("Direct download templates are not supported"));
    }
    let format = if iso {
        "ISO".to_owned()
    } else {
        let f = p.non_empty("format").unwrap_or_default().to_ascii_uppercase();
        if !TEMPLATE_FORMATS.contains(&f.as_str()) {
            return Err(ApiError::param(format!(
                "Format {f:?} is not supported: use one of {}",
                TEMPLATE_FORMATS.join(", ")
            )));
        }
        f
    };
    let checksum = p.non_empty("checksum");
    if let Some(c) = checksum {
        check_checksum(c)?;
    }
    let hypervisor = if iso {
        "None".to_owned()
    } else {
        p.non_empty("hypervisor").unwrap_or("KVM").to_owned()
    };
    if flag(&p, "isfeatured", false) && caller.role != Role::Admin {
        return Err(ApiError::denied(
            "Only root admins may register featured templates",
        ));
    }
    let zone_id = resolve_zone(&state.db.pool, p.non_empty("zoneid")).await?;
    let store_id: String = match p.non_empty("imagestoreuuid") {
        Some(s) => sqlx::query_scalar("SELECT id FROM image_stores WHERE id = $1 AND zone_id = $2")
            .bind(s.to_owned())
            .bind(zone_id.clone())
            .fetch_optional(&state.db.pool)
            .await?
            .ok_or_else(|| ApiError::param(format!("Unable to find image store {s} in zone {zone_id}")))?,
        None => sqlx::query_scalar(
            "SELECT id FROM image_stores WHERE zone_id = $1 ORDER BY created, name LIMIT 1",
        )
        .bind(zone_id.clone())
        .fetch_optional(&state.db.pool)
        .await?
        .ok_or_else(|| {
            ApiError::param(format!(
                "Zone {zone_id} has no image store: add one with addImageStore first"
            ))
        })?,
    };
    let id = new_uuid().map_err(|e| ApiError::internal(&e))?;
    let install_path = format!("template/tmpl/{}/{id}", caller.account_id);
    sqlx::query(
        "INSERT INTO templates (id, name, display_text, is_iso, format, hypervisor, url, checksum, zone_id, store_id, account_id, is_public, is_featured, is_extractable, bootable, os_type_id, install_path, download_state, download_percent, status, created) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, 0, $19, $20)",
    )
    .bind(id.clone())
    .bind(name.to_owned())
    .bind(display.to_owned())
    .bind(i64::from(iso))
    .bind(format)
    .bind(hypervisor)
    .bind(url.to_owned())
    .bind(checksum.map(str::to_owned))
    .bind(zone_id)
    .bind(store_id)
    .bind(caller.account_id.clone())
    .bind(i64::from(flag(&p, "ispublic", false)))
    .bind(i64::from(flag(&p, "isfeatured", false)))
    .bind(i64::from(flag(&p, "isextractable", false)))
    .bind(i64::from(!iso || flag(&p, "bootable", true)))
    .bind(p.non_empty("ostypeid").map(str::to_owned))
    .bind(install_path)
    .bind(download_state::NOT_DOWNLOADED)
    .bind("Waiting for a storage VM")
    .bind(now_cs())
    .execute(&state.db.pool)
    .await?;
    tracing::info!(%id, name, url, iso, "Registered a template; download queued");
    state.dispatch_wakeup.notify_one();
    let rows = sqlx::query(&format!("{TEMPLATE_SELECT} WHERE t.id = $1"))
        .bind(id)
        .fetch_all(&state.db.pool)
        .await?;
    let items = rows.iter().map(template_json).collect::<Result<Vec<_>, _>>()?;
    let key = if iso { "iso" } else { "template" };
    Ok(json!({ "count": items.len(), key: items }))
}

/// `registerTemplate`.
pub async fn register_template(state: State, caller: Caller, p: Params) -> Result<Value, ApiError> {
    register(state, caller, p, false).await
}

/// `registerIso`.
pub async fn register_iso(state: State, caller: Caller, p: Params) -> Result<Value, ApiError> {
    register(state, caller, p, true).await
}

const TEMPLATE_SELECT: &str = "SELECT t.id, t.name, t.display_text, t.is_iso, t.format, t.hypervisor, t.url, t.checksum, t.zone_id, z.name AS zone_name, t.store_id, st.name AS store_name, t.account_id, a.name AS account_name, t.is_public, t.is_featured, t.is_extractable, t.bootable, t.os_type_id, t.download_state, t.download_percent, t.status, t.size, t.physical_size, t.created, t.removed \
     FROM templates t JOIN zones z ON z.id = t.zone_id JOIN image_stores st ON st.id = t.store_id LEFT JOIN accounts a ON a.id = t.account_id";
const TEMPLATE_FROM: &str = "templates t JOIN zones z ON z.id = t.zone_id JOIN image_stores st ON st.id = t.store_id LEFT JOIN accounts a ON a.id = t.account_id";

fn template_json(row: &sqlx::any::AnyRow) -> Result<Value, sqlx::Error> {
    let b = |c: &str| -> Result<bool, sqlx::Error> { Ok(row.try_get::<i64, _>(c)? != 0) };
    let state: String = row.try_get("download_state")?;
    let percent: i64 = row.try_get("download_percent")?;
    let ready = state == download_state::DOWNLOADED;
    let mut v = json!({
        "id": row.try_get::<String, _>("id")?,
        "name": row.try_get::<String, _>("name")?,
        "displaytext": row.try_get::<String, _>("display_text")?,
        "ispublic": b("is_public")?,
        "isfeatured": b("is_featured")?,
        "isextractable": b("is_extractable")?,
        "isready": ready,
        "status": row.try_get::<String, _>("status")?,
        "format": row.try_get::<String, _>("format")?,
        "hypervisor": row.try_get::<String, _>("hypervisor")?,
        "zoneid": row.try_get::<String, _>("zone_id")?,
        "zonename": row.try_get::<String, _>("zone_name")?,
        "templatetype": "USER",
        "url": row.try_get::<String, _>("url")?,
        "created": row.try_get::<String, _>("created")?,
        "accountid": row.try_get::<String, _>("account_id")?,
        "account": row.try_get::<Option<String>, _>("account_name")?.unwrap_or_default(),
        "domain": "ROOT",
        "domainid": ROOT_DOMAIN_ID,
        "bootable": b("bootable")?,
        "crossZones": false,
        "directdownload": false,
        "deployasis": false,
        "passwordenabled": false,
        "sshkeyenabled": false,
        "requireshvm": true,
        "details": {},
        "tags": [],
        "downloaddetails": [{
            "datastore": row.try_get::<String, _>("store_name")?,
            "downloadState": state,
            "downloadPercent": percent.to_string(),
        }],
        "hasannotations": false,
    });
    if let Some(c) = row.try_get::<Option<String>, _>("checksum")? {
        v["checksum"] = json!(c);
    }
    if let Some(o) = row.try_get::<Option<String>, _>("os_type_id")? {
        v["ostypeid"] = json!(o);
    }
    if let Some(s) = row.try_get::<Option<i64>, _>("size")? {
        v["size"] = json!(s);
    }
    if let Some(s) = row.try_get::<Option<i64>, _>("physical_size")? {
        v["physicalsize"] = json!(s);
    }
    if let Some(r) = row.try_get::<Option<String>, _>("removed")? {
        v["removed"] = json!(r);
    }
    Ok(v)
}

/// Adds the visibility rule of a `templatefilter`/`isofilter` value.
fn visibility(f: &mut Filter, filter: &str, caller: &Caller) -> Result<(), ApiError> {
    let admin = caller.role == Role::Admin;
    match filter.to_ascii_lowercase().as_str() {
        "featured" => f.flag("t.is_featured", true),
        "self" | "selfexecutable" => f.eq("t.account_id", &caller.account_id),
        "community" => {
            f.flag("t.is_public", true);
            f.flag("t.is_featured", false);
        }
        "sharedexecutable" => {
            if !admin {
                // Nothing is shared account-to-account here: only public templates of others.
                f.flag("t.is_public", true);
            }
        }
        "executable" | "all" => {
            if !admin {
                f.own_or_public(&caller.account_id);
            }
        }
        other => {
            return Err(ApiError::param(format!(
                "Invalid filter {other:?}: use featured, self, selfexecutable, sharedexecutable, executable, community or all"
            )));
        }
    }
    Ok(())
}

async fn list(state: State, caller: Caller, p: Params, iso: bool) -> Result<Value, ApiError> {
    let page = Page::from_params(&p, state.page_size().await)?;
    let mut f = Filter::default();
    f.flag("t.is_iso", iso);
    let filter = if iso {
        p.non_empty("isofilter").unwrap_or("selfexecutable")
    } else {
        p.non_empty("templatefilter").unwrap_or("selfexecutable")
    };
    visibility(&mut f, filter, &caller)?;
    if !flag(&p, "showremoved", false) {
        f.is_null("t.removed");
    }
    if let Some(v) = p.non_empty("id") {
        f.eq("t.id", v);
    }
    if let Some(v) = p.non_empty("name") {
        f.eq("t.name", v);
    }
    if let Some(v) = p.non_empty("zoneid") {
        f.eq("t.zone_id", v);
    }
    if let Some(v) = p.non_empty("hypervisor") {
        f.eq("LOWER(t.hypervisor)", &v.to_ascii_lowercase());
    }
    if let Some(v) = p.non_empty("isready") {
        if v.eq_ignore_ascii_case("true") {
            f.eq("t.download_state", download_state::DOWNLOADED);
        } else {
            f.ne("t.download_state", download_state::DOWNLOADED);
        }
    }
    if iso && let Some(v) = p.non_empty("bootable") {
        f.flag("t.bootable", v.eq_ignore_ascii_case("true"));
    }
    if let Some(k) = p.non_empty("keyword") {
        f.keyword(&["t.name", "t.display_text"], k);
    }
    let total = f.count(&state.db.pool, TEMPLATE_FROM).await?;
    let rows = f
        .rows(
            &state.db.pool,
            TEMPLATE_SELECT,
            &format!(" ORDER BY t.created, t.name{}", page.sql()),
        )
        .await?;
    let items = rows.iter().map(template_json).collect::<Result<Vec<_>, _>>()?;
    Ok(list_response(if iso { "iso" } else { "template" }, total, items))
}

/// `listTemplates`.
pub async fn list_templates(state: State, caller: Caller, p: Params) -> Result<Value, ApiError> {
    list(state, caller, p, false).await
}

/// `listIsos`.
pub async fn list_isos(state: State, caller: Caller, p: Params) -> Result<Value, ApiError> {
    list(state, caller, p, true).await
}

async fn delete(state: State, caller: Caller, p: Params, iso: bool) -> Result<Value, ApiError> {
    let id = p.non_empty("id").unwrap_or_default().to_owned();
    let what = if iso { "ISO" } else { "template" };
    let row = sqlx::query(
        "SELECT t.account_id, t.zone_id, t.install_path, t.download_state, st.url AS store_url, st.name AS store_name FROM templates t JOIN image_stores st ON st.id = t.store_id WHERE t.id = $1 AND t.is_iso = $2 AND t.removed IS NULL",
    )
    .bind(id.clone())
    .bind(i64::from(iso))
    .fetch_optional(&state.db.pool)
    .await?
    .ok_or_else(|| ApiError::param(format!("Unable to find {what} by id {id}")))?;
    let owner: String = row.try_get("account_id")?;
    if caller.role != Role::Admin && owner != caller.account_id {
        return Err(ApiError::denied(format!(
            "Account {} does not own {what} {id}",
            caller.account_name
        )));
    }
    let zone_id: String = row.try_get("zone_id")?;
    let path: String = row.try_get("install_path")?;
    let store_url: String = row.try_get("store_url")?;
    let store_name: String = row.try_get("store_name")?;
    let dl_state: String = row.try_get("download_state")?;
    let forced = flag(&p, "forced", false);
    let agent = agent_for_store(&state, &zone_id, &store_url).await?;
    let Some(agent) = agent else {
        if !forced {
            return Err(ApiError::new(
                code::INTERNAL_ERROR,
                cs::SERVER_API,
                format!(
                    "No storage VM serving image store {store_name} is connected, so the {what}'s files can't be deleted; retry when one is Up, or pass forced=true to remove the record and leave the files"
                ),
            ));
        }
        mark_removed(&state, &id).await?;
        tracing::warn!(%id, %path, "Removed a template record; its files stay on the store (forced, no storage VM)");
        return Ok(
            json!({ "success": true, "displaytext": format!("{what} removed; its files remain on {store_name} at {path}") }),
        );
    };
    if dl_state == download_state::IN_PROGRESS || dl_state == download_state::NOT_DOWNLOADED {
        // Stop the download first, so it can't install after the files are gone; ABANDONED keeps
        // the dispatcher and late progress away from it.
        sqlx::query(
            "UPDATE templates SET download_state = $1, status = $2 WHERE id = $3 AND download_state <> $4",
        )
        .bind(download_state::ABANDONED)
        .bind("Download cancelled: deleting")
        .bind(id.clone())
        .bind(download_state::DOWNLOADED)
        .execute(&state.db.pool)
        .await?;
        state.dispatched_forget(&id);
        let _ = state
            .agents
            .call(
                &agent,
                &AgentCommand::CancelJob { job_id: id.clone() },
                COMMAND_TIMEOUT,
            )
            .await;
    }
    let answer = state
        .agents
        .call(
            &agent,
            &AgentCommand::DeleteInstall {
                store_url: store_url.clone(),
                path: path.clone(),
            },
            COMMAND_TIMEOUT,
        )
        .await
        .map_err(|e| {
            ApiError::new(
                code::INTERNAL_ERROR,
                cs::SERVER_API,
                format!("Failed to delete the {what}'s files: {e}"),
            )
        })?;
    if !answer.ok {
        return Err(ApiError::new(
            code::INTERNAL_ERROR,
            cs::SERVER_API,
            format!(
                "Failed to delete the {what}'s files: {}",
                answer.error.unwrap_or_else(|| "no reason given".into())
            ),
        ));
    }
    mark_removed(&state, &id).await?;
    tracing::info!(%id, %path, "Deleted a template and its files");
    Ok(success())
}

async fn mark_removed(state: &State, id: &str) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE templates SET removed = $1, download_state = CASE WHEN download_state = $2 THEN download_state ELSE $3 END WHERE id = $4",
    )
    .bind(now_cs())
    .bind(download_state::DOWNLOADED)
    .bind(download_state::ABANDONED)
    .bind(id.to_owned())
    .execute(&state.db.pool)
    .await
    .map(|_| ())
}

/// `deleteTemplate`.
pub async fn delete_template(state: State, caller: Caller, p: Params) -> Result<Value, ApiError> {
    delete(state, caller, p, false).await
}

/// `deleteIso`.
pub async fn delete_iso(state: State, caller: Caller, p: Params) -> Result<Value, ApiError> {
    delete(state, caller, p, true).await
}

/// `listCapacity`: secondary storage (type 6) per zone, from the storage VMs' heartbeats.
pub async fn list_capacity(state: State, _caller: Caller, p: Params) -> Result<Value, ApiError> {
    let page = Page::from_params(&p, state.page_size().await)?;
    if let Some(t) = p.non_empty("type")
        && t.parse::<i64>().ok() != Some(CAPACITY_TYPE_SECONDARY_STORAGE)
    {
        return Ok(list_response("capacity", 0, vec![]));
    }
    let mut f = Filter::default();
    if let Some(z) = p.non_empty("zoneid") {
        f.eq("z.id", z);
    }
    let zones = f
        .rows(
            &state.db.pool,
            "SELECT z.id, z.name FROM zones z",
            " ORDER BY z.created, z.name",
        )
        .await?;
    let stores = sqlx::query("SELECT zone_id, url FROM image_stores")
        .fetch_all(&state.db.pool)
        .await?;
    let capacity = store_capacity(&state).await?;
    let mut items = Vec::new();
    for z in &zones {
        let zone_id: String = z.try_get("id")?;
        let (mut total, mut used) = (0u64, 0u64);
        for s in &stores {
            if s.try_get::<String, _>("zone_id")? == zone_id {
                let url: String = s.try_get("url")?;
                if let Some((t, u)) = capacity.get(&normalize_store_url(&url)) {
                    total = total.saturating_add(*t);
                    used = used.saturating_add(*u);
                }
            }
        }
        let percent = if total > 0 {
            format!("{:.2}", used as f64 * 100.0 / total as f64)
        } else {
            "0".to_owned()
        };
        items.push(json!({
            "type": CAPACITY_TYPE_SECONDARY_STORAGE,
            "name": "SECONDARY_STORAGE",
            "capacitytotal": total,
            "capacityused": used,
            "capacityallocated": 0,
            "percentused": percent,
            "zoneid": zone_id,
            "zonename": z.try_get::<String, _>("name")?,
        }));
    }
    let total = i64::try_from(items.len()).unwrap_or(i64::MAX);
    let items = page.slice(items);
    Ok(list_response("capacity", total, items))
}

/// Applies a storage VM's progress report to its template.
pub async fn on_progress(state: &State, vm_id: &str, p: &JobProgress) {
    if let Err(error) = apply_progress(state, vm_id, p).await {
        tracing::error!(%error, template = %p.id, "Failed to record download progress");
    }
}

async fn apply_progress(state: &State, vm_id: &str, p: &JobProgress) -> Result<(), sqlx::Error> {
    let phase = p.state.unwrap_or(JobPhase::Running);
    let (dl_state, status, percent) = match phase {
        JobPhase::Completed => (download_state::DOWNLOADED, "Download Complete".to_owned(), 100),
        JobPhase::Failed => (
            download_state::ERROR,
            p.error.clone().unwrap_or_else(|| "download failed".into()),
            i64::from(p.percent),
        ),
        JobPhase::Cancelled => (
            download_state::ABANDONED,
            "Download cancelled".to_owned(),
            i64::from(p.percent),
        ),
        JobPhase::Queued => (
            download_state::IN_PROGRESS,
            "Waiting for a download slot".to_owned(),
            0,
        ),
        JobPhase::Running | JobPhase::Unknown => (
            download_state::IN_PROGRESS,
            format!("{}% Downloaded", p.percent.min(100)),
            i64::from(p.percent.min(100)),
        ),
    };
    let installed = p.installed.as_ref().filter(|_| phase == JobPhase::Completed);
    let done = sqlx::query(
        "UPDATE templates SET download_state = $1, status = $2, download_percent = $3, agent_id = $4, \
         size = COALESCE($5, size), physical_size = COALESCE($6, physical_size), installed_file = COALESCE($7, installed_file), installed_sha256 = COALESCE($8, installed_sha256) \
         WHERE id = $9 AND removed IS NULL AND download_state IN ($10, $11)",
    )
    .bind(dl_state)
    .bind(status.clone())
    .bind(percent)
    .bind(vm_id.to_owned())
    .bind(installed.map(|i| i64::try_from(i.virtual_size).unwrap_or(i64::MAX)))
    .bind(installed.map(|i| i64::try_from(i.physical_size).unwrap_or(i64::MAX)))
    .bind(installed.map(|i| i.file.clone()))
    .bind(installed.map(|i| i.sha256.clone()))
    .bind(p.id.clone())
    .bind(download_state::NOT_DOWNLOADED)
    .bind(download_state::IN_PROGRESS)
    .execute(&state.db.pool)
    .await?;
    if phase.is_final() {
        state.dispatched_forget(&p.id);
        if done.rows_affected() > 0 {
            tracing::info!(template = %p.id, state = dl_state, %status, "Template download ended");
        }
    }
    Ok(())
}

/// Hands queued downloads to storage VMs, every [`DISPATCH_INTERVAL`] and whenever a template is
/// registered, until `stop`.
pub async fn dispatcher(state: State, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(DISPATCH_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = state.dispatch_wakeup.notified() => {}
            _ = stop.changed() => return,
        }
        if !state.leader.load(std::sync::atomic::Ordering::SeqCst) {
            continue;
        }
        if let Err(error) = dispatch_pending(&state).await {
            tracing::warn!(%error, "Download dispatcher failed to read the database");
        }
    }
}

async fn dispatch_pending(state: &State) -> Result<(), sqlx::Error> {
    let rows = sqlx::query(
        "SELECT t.id, t.name, t.display_text, t.url, t.format, t.checksum, t.install_path, t.zone_id, t.status, st.url AS store_url, st.name AS store_name \
         FROM templates t JOIN image_stores st ON st.id = t.store_id WHERE t.removed IS NULL AND t.download_state IN ($1, $2) ORDER BY t.created",
    )
    .bind(download_state::NOT_DOWNLOADED)
    .bind(download_state::IN_PROGRESS)
    .fetch_all(&state.db.pool)
    .await?;
    for row in rows {
        let id: String = row.try_get("id")?;
        if state.dispatched_live(&id) {
            continue;
        }
        let zone_id: String = row.try_get("zone_id")?;
        let store_url: String = row.try_get("store_url")?;
        let Some(agent) = agent_for_store(state, &zone_id, &store_url).await? else {
            let status: String = row.try_get("status")?;
            let waiting = format!(
                "Waiting for a storage VM serving image store {}",
                row.try_get::<String, _>("store_name")?
            );
            if status != waiting {
                sqlx::query("UPDATE templates SET status = $1 WHERE id = $2 AND download_state IN ($3, $4)")
                    .bind(waiting)
                    .bind(id.clone())
                    .bind(download_state::NOT_DOWNLOADED)
                    .bind(download_state::IN_PROGRESS)
                    .execute(&state.db.pool)
                    .await?;
            }
            continue;
        };
        let command = AgentCommand::Download(DownloadCommand {
            job_id: id.clone(),
            store_url,
            url: row.try_get("url")?,
            path: row.try_get("install_path")?,
            format: row.try_get("format")?,
            checksum: row.try_get("checksum")?,
            description: row.try_get("display_text")?,
        });
        let Some(conn) = state.agents.connection(&agent) else {
            continue;
        };
        match state.agents.call(&agent, &command, COMMAND_TIMEOUT).await {
            Ok(answer) if answer.ok => {
                state.dispatched_set(&id, &agent, conn);
                tracing::info!(template = %id, agent = %agent, "Download dispatched to a storage VM");
                match serde_json::from_value::<JobProgress>(answer.body) {
                    Ok(p) => apply_progress(state, &agent, &p).await?,
                    Err(error) => tracing::warn!(%error, "Storage VM answered a download without progress"),
                }
            }
            Ok(answer) => {
                let reason = answer.error.unwrap_or_else(|| "refused by the storage VM".into());
                tracing::warn!(template = %id, agent = %agent, %reason, "Storage VM refused a download");
                apply_progress(
                    state,
                    &agent,
                    &JobProgress {
                        id: id.clone(),
                        state: Some(JobPhase::Failed),
                        error: Some(reason),
                        ..Default::default()
                    },
                )
                .await?;
            }
            Err(error) => {
                tracing::warn!(template = %id, agent = %agent, %error, "Download not dispatched; will retry")
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_urls() {
        assert_eq!(store_protocol("nfs://10.0.0.5/export/secondary").unwrap(), "nfs");
        assert_eq!(store_protocol("nfs://h:2049/e?mountport=20048").unwrap(), "nfs");
        assert_eq!(store_protocol("file:///var/lib/secondary").unwrap(), "file");
        for bad in [
            "nfs://host",
            "nfs:///export",
            "file://relative/x",
            "file:///a/../etc",
            "s3://bucket",
            "nfs://h/e x",
            "nfs://h/e\n",
        ] {
            assert_eq!(store_protocol(bad).unwrap_err().code, 431, "{bad}");
        }
    }

    #[test]
    fn store_urls_normalize_like_the_agent_reports_them() {
        assert_eq!(normalize_store_url("nfs://h:2049/e/"), "nfs://h/e");
        assert_eq!(
            normalize_store_url("nfs://h:3049/e?mountport=5"),
            "nfs://h:3049/e?mountport=5"
        );
        assert_eq!(normalize_store_url("file:///srv/sec/"), "file:///srv/sec");
        assert!(same_store("nfs://10.0.0.1/export", "nfs://10.0.0.1:2049/export/"));
        assert!(!same_store("nfs://10.0.0.1/export", "nfs://10.0.0.2/export"));
    }

    #[test]
    fn checksums() {
        assert!(check_checksum("d41d8cd98f00b204e9800998ecf8427e").is_ok());
        assert!(
            check_checksum("{SHA-256}e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")
                .is_ok()
        );
        assert!(check_checksum("{sha1}da39a3ee5e6b4b0d3255bfef95601890afd80709").is_ok());
        for bad in [
            "abc",
            "{sha256}abc",
            "{crc32}00000000",
            "zz1d8cd98f00b204e9800998ecf8427e",
        ] {
            assert_eq!(check_checksum(bad).unwrap_err().code, 431, "{bad}");
        }
    }

    #[test]
    fn source_urls() {
        assert!(check_source_url("https://example.com/a.qcow2").is_ok());
        assert!(check_source_url("http://10.0.0.1:8000/x.iso").is_ok());
        for bad in [
            "ftp://x/y",
            "file:///etc/passwd",
            "http://",
            "nonsense",
            "http://x/a b",
        ] {
            assert_eq!(check_source_url(bad).unwrap_err().code, 431, "{bad}");
        }
        assert!(check_source_url(&format!("http://x/{}", "a".repeat(3000))).is_err());
    }
}
