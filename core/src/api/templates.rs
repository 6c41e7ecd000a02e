//! Templates and ISOs: `registerTemplate`, `registerIso`, `listTemplates`, `listIsos`,
//! `deleteTemplate`, `deleteIso` (the HTTP side of [`crate::model::templates`]).
//!
//! Invariants: list visibility follows the filter and the caller's role (a user sees its own and
//! public templates only); `deleteTemplate`/`deleteIso` run on the lease holder (they need a
//! storage VM's connection; the command table marks them so).

use serde_json::{Value, json};
use sqlx::Row as _;

use crate::api::{Filter, list_response, success};
use crate::command::{ParamSpec, Ty, opt, req};
use crate::error::ApiError;
use crate::model::directory::ROOT_DOMAIN_ID;
use crate::model::templates::{self, Deleted, NewTemplate, download_state};
use crate::paging::Page;
use crate::params::Params;
use crate::state::{Caller, State};

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
    opt("ostypeid", Ty::Uuid, "OS type id (listOsTypes)"),
    opt(
        "imagestoreuuid",
        Ty::Uuid,
        "Image store to install into (default: the zone's first)",
    ),
    opt("directdownload", Ty::Boolean, "Not supported: must be false"),
    opt(
        "account",
        Ty::String,
        "Accepted for compatibility: the caller's account owns it",
    ),
    opt(
        "domainid",
        Ty::Uuid,
        "Accepted for compatibility: the caller's domain",
    ),
    opt(
        "arch",
        Ty::String,
        "CPU architecture (x86_64 or aarch64; recorded only)",
    ),
    opt(
        "isdynamicallyscalable",
        Ty::Boolean,
        "Whether VMs from it may be scaled up live (recorded only)",
    ),
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
    TEMPLATE_COMMON[11],
    TEMPLATE_COMMON[12],
    TEMPLATE_COMMON[13],
    TEMPLATE_COMMON[14],
    req("format", Ty::String, "QCOW2, RAW, VHD or OVA"),
    req("hypervisor", Ty::String, "KVM, XenServer, VMware, …"),
    opt("passwordenabled", Ty::Boolean, "Password reset enabled"),
    opt("requireshvm", Ty::Boolean, "Requires HVM"),
    opt("bits", Ty::Integer, "32 or 64 (recorded only)"),
    opt(
        "sshkeyenabled",
        Ty::Boolean,
        "SSH key reset enabled (recorded only)",
    ),
    opt(
        "deployasis",
        Ty::Boolean,
        "VMware: deploy as is (not supported; false)",
    ),
    opt("templatetag", Ty::String, "Tag of the template (recorded only)"),
    opt(
        "templatetype",
        Ty::String,
        "USER (the only type registered by hand)",
    ),
    opt(
        "zoneids",
        Ty::String,
        "Zones (comma-separated): the first one is used",
    ),
    opt(
        "extensionid",
        Ty::Uuid,
        "Accepted for compatibility (no extensions)",
    ),
    opt(
        "externaldetails",
        Ty::String,
        "Accepted for compatibility (no extensions)",
    ),
    opt(
        "details",
        Ty::String,
        "Template details (accepted for compatibility)",
    ),
    opt("isrouting", Ty::Boolean, "Accepted for compatibility"),
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
    TEMPLATE_COMMON[11],
    TEMPLATE_COMMON[12],
    TEMPLATE_COMMON[13],
    TEMPLATE_COMMON[14],
    opt("bootable", Ty::Boolean, "Bootable (default true)"),
    opt(
        "passwordenabled",
        Ty::Boolean,
        "Password reset enabled (recorded only)",
    ),
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
    opt(
        "zoneid",
        Ty::Uuid,
        "Zone id: delete only the install in that zone (default: every zone)",
    ),
    opt(
        "forced",
        Ty::Boolean,
        "Remove the record even when no storage VM can delete the files (they stay on the store)",
    ),
];
/// A boolean parameter, `default` when absent.
pub(crate) fn flag(p: &Params, name: &str, default: bool) -> bool {
    p.non_empty(name)
        .map_or(default, |v| v.eq_ignore_ascii_case("true"))
}

/// The format a registration names: `ISO` for ISOs, else the `format` parameter upper-cased.
pub(crate) fn format_of(p: &Params, iso: bool) -> String {
    if iso {
        "ISO".to_owned()
    } else {
        p.non_empty("format").unwrap_or_default().to_ascii_uppercase()
    }
}

/// A template or ISO as `registerTemplate`/`registerIso` (and the upload commands) describe it.
pub(crate) fn new_template<'a>(p: &'a Params, iso: bool, format: &'a str, upload: bool) -> NewTemplate<'a> {
    let name = p.non_empty("name").unwrap_or_default();
    let hypervisor = if iso {
        "None"
    } else {
        p.non_empty("hypervisor").unwrap_or("KVM")
    };
    NewTemplate {
        name,
        display_text: p.non_empty("displaytext").unwrap_or(name),
        iso,
        format,
        hypervisor,
        url: if upload {
            ""
        } else {
            p.non_empty("url").unwrap_or_default()
        },
        checksum: p.non_empty("checksum"),
        // The UI's form sends `zoneids`; one zone per registration here.
        zone_id: p
            .non_empty("zoneid")
            .or_else(|| p.non_empty("zoneids").and_then(|z| z.split(',').next())),
        store_id: p.non_empty("imagestoreuuid"),
        public: flag(p, "ispublic", false),
        featured: flag(p, "isfeatured", false),
        extractable: flag(p, "isextractable", false),
        bootable: !iso || flag(p, "bootable", true),
        os_type_id: p.non_empty("ostypeid"),
        flags: crate::model::template_properties::Flags {
            password_enabled: flag(p, "passwordenabled", false),
            sshkey_enabled: flag(p, "sshkeyenabled", false),
            dynamically_scalable: flag(p, "isdynamicallyscalable", false),
            requires_hvm: !iso && flag(p, "requireshvm", true),
        },
        upload,
    }
}

async fn register(state: State, caller: Caller, p: Params, iso: bool) -> Result<Value, ApiError> {
    if flag(&p, "directdownload", false) {
        return Err(ApiError::param("Direct download templates are not supported"));
    }
    let format = format_of(&p, iso);
    let t = new_template(&p, iso, &format, false);
    let id = templates::register(&state, &caller, &t).await?;
    let rows = sqlx::query(&format!("{TEMPLATE_SELECT} WHERE t.id = $1"))
        .bind(id)
        .fetch_all(&state.db.pool)
        .await?;
    let items = answers(&state, &rows).await?;
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

/// The columns [`template_json`] reads: one row per template and zone.
pub(crate) const TEMPLATE_SELECT: &str = "SELECT t.id, t.name, t.display_text, t.is_iso, t.format, t.hypervisor, t.url, t.checksum, p.zone_id, z.name AS zone_name, p.store_id, st.name AS store_name, t.account_id, a.name AS account_name, t.is_public, t.is_featured, t.is_extractable, t.bootable, t.os_type_id, p.download_state, p.download_percent, p.status, p.size, p.physical_size, t.created, t.removed, t.password_enabled, t.sshkey_enabled, t.dynamically_scalable, t.requires_hvm, d.id AS domain_id, d.name AS domain_name, d.path AS domain_path \
     FROM templates t JOIN (SELECT id AS template_id, zone_id, store_id, download_state, download_percent, status, size, physical_size, created FROM templates \
       UNION ALL SELECT template_id, zone_id, store_id, download_state, download_percent, status, size, physical_size, created FROM template_copies) p ON p.template_id = t.id \
     JOIN zones z ON z.id = p.zone_id JOIN image_stores st ON st.id = p.store_id LEFT JOIN accounts a ON a.id = t.account_id LEFT JOIN domains d ON d.id = a.domain_id";
/// What [`TEMPLATE_SELECT`] reads from: one row per template and zone (its own zone, then one
/// per cross-zone copy, [`crate::model::copies`]), as CloudStack lists them.
const TEMPLATE_FROM: &str = "templates t JOIN (SELECT id AS template_id, zone_id, store_id, download_state, created FROM templates \
       UNION ALL SELECT template_id, zone_id, store_id, download_state, created FROM template_copies) p ON p.template_id = t.id \
     JOIN zones z ON z.id = p.zone_id JOIN image_stores st ON st.id = p.store_id LEFT JOIN accounts a ON a.id = t.account_id LEFT JOIN domains d ON d.id = a.domain_id";

/// Template and ISO rows (read with [`TEMPLATE_SELECT`]) as answers, with their tags.
pub(crate) async fn answers(state: &State, rows: &[sqlx::any::AnyRow]) -> Result<Vec<Value>, ApiError> {
    let items = rows.iter().map(template_json).collect::<Result<Vec<_>, _>>()?;
    let items = with_replicas(state, items).await?;
    Ok(with_tags(state, items).await?)
}

/// Adds each object store's replica to `downloaddetails`, after the staging store's entry.
async fn with_replicas(state: &State, mut items: Vec<Value>) -> Result<Vec<Value>, sqlx::Error> {
    let ids: Vec<String> = items
        .iter()
        .filter_map(|v| v["id"].as_str().map(str::to_owned))
        .collect();
    let replicas = crate::model::replicas::of_templates(state, &ids).await?;
    for v in &mut items {
        let key = (
            v["id"].as_str().unwrap_or_default().to_owned(),
            v["zoneid"].as_str().unwrap_or_default().to_owned(),
        );
        let Some(list) = replicas.get(&key) else {
            continue;
        };
        if let Some(details) = v["downloaddetails"].as_array_mut() {
            for (store, st) in list {
                let done = st == crate::model::replicas::state::REPLICATED;
                details.push(json!({
                    "datastore": store,
                    "downloadState": crate::model::replicas::download_state(st),
                    "downloadPercent": if done { "100" } else { "0" },
                }));
            }
        }
    }
    Ok(items)
}

/// Fills the `tags` of template and ISO answers (one query for all of them).
pub(crate) async fn with_tags(state: &State, mut items: Vec<Value>) -> Result<Vec<Value>, sqlx::Error> {
    use crate::model::tags::TagType;
    for t in [TagType::Template, TagType::Iso] {
        let iso = t == TagType::Iso;
        let ids: Vec<String> = items
            .iter()
            .filter(|v| (v["format"] == "ISO") == iso)
            .filter_map(|v| v["id"].as_str().map(str::to_owned))
            .collect();
        let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
        let tags = crate::api::tags::tags_of(state, t, &ids).await?;
        for v in items.iter_mut().filter(|v| (v["format"] == "ISO") == iso) {
            // A template listed in several zones carries its tags in each.
            if let Some(list) = v["id"].as_str().and_then(|id| tags.get(id).cloned()) {
                v["tags"] = Value::Array(list);
            }
        }
    }
    Ok(items)
}

/// A template or ISO as CloudStack's `TemplateResponse`.
pub(crate) fn template_json(row: &sqlx::any::AnyRow) -> Result<Value, sqlx::Error> {
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
        "domain": row.try_get::<Option<String>, _>("domain_name")?.unwrap_or_else(|| "ROOT".into()),
        "domainid": row.try_get::<Option<String>, _>("domain_id")?.unwrap_or_else(|| ROOT_DOMAIN_ID.into()),
        "bootable": b("bootable")?,
        "crossZones": false,
        "directdownload": false,
        "deployasis": false,
        "passwordenabled": b("password_enabled")?,
        "sshkeyenabled": b("sshkey_enabled")?,
        "isdynamicallyscalable": b("dynamically_scalable")?,
        "requireshvm": b("requires_hvm")?,
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
        if let Some(os) = crate::model::guest_os::by_id(&o) {
            v["ostypename"] = json!(os.name);
        }
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
    use crate::model::directory::Scope;
    let scope = Scope::of(caller);
    match filter.to_ascii_lowercase().as_str() {
        "featured" => f.flag("t.is_featured", true),
        // CloudStack: the caller's "permitted accounts": its own, or for a Domain or Resource
        // Admin every account of its subtree.
        "self" | "selfexecutable" => match &scope {
            Scope::Subtree(path) => f.prefix("d.path", path),
            _ => f.eq("t.account_id", &caller.account_id),
        },
        "community" => {
            f.flag("t.is_public", true);
            f.flag("t.is_featured", false);
        }
        "sharedexecutable" => f.shared_with(&caller.account_id),
        "executable" | "all" => match &scope {
            Scope::All => {}
            Scope::Subtree(path) => f.subtree_public_or_shared(path, &caller.account_id),
            Scope::Account(_) => f.own_or_public(&caller.account_id),
        },
        other => {
            return Err(ApiError::param(format!(
                "Invalid filter {other:?}: use featured, self, selfexecutable, sharedexecutable, executable, community or all"
            )));
        }
    }
    Ok(())
}

async fn list(state: State, caller: Caller, p: Params, iso: bool) -> Result<Value, ApiError> {
    let page = Page::from_params(&p, crate::model::settings::page_size(&state).await)?;
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
        f.eq("p.zone_id", v);
    }
    if let Some(v) = p.non_empty("hypervisor") {
        f.eq("LOWER(t.hypervisor)", &v.to_ascii_lowercase());
    }
    // CloudStack: `isready=true` lists ready ones only, `isready=false` means no readiness
    // filter; the featured, community and executable filters list ready ones only.
    let ready_only = match p.non_empty("isready") {
        Some(v) => v.eq_ignore_ascii_case("true"),
        None => matches!(
            filter.to_ascii_lowercase().as_str(),
            "featured" | "community" | "executable" | "selfexecutable" | "sharedexecutable"
        ),
    };
    if ready_only {
        f.eq("p.download_state", download_state::DOWNLOADED);
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
            &format!(" ORDER BY t.created, t.name, p.created{}", page.sql()),
        )
        .await?;
    let items = answers(&state, &rows).await?;
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
    let id = p.non_empty("id").unwrap_or_default();
    let what = if iso { "ISO" } else { "template" };
    match templates::delete(
        &state,
        &caller,
        id,
        iso,
        p.non_empty("zoneid"),
        flag(&p, "forced", false),
    )
    .await?
    {
        Deleted::Everything => Ok(success()),
        Deleted::RecordOnly(place) => Ok(
            json!({ "success": true, "displaytext": format!("{what} removed; its files remain on {place}") }),
        ),
    }
}

/// `deleteTemplate` (async; runs on the lease holder).
pub async fn delete_template(state: State, caller: Caller, p: Params) -> Result<Value, ApiError> {
    delete(state, caller, p, false).await
}

/// `deleteIso` (async; runs on the lease holder).
pub async fn delete_iso(state: State, caller: Caller, p: Params) -> Result<Value, ApiError> {
    delete(state, caller, p, true).await
}
