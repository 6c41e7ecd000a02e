//! Image stores: `addImageStore`, `listImageStores`, `deleteImageStore` (the HTTP side of
//! [`crate::model::stores`]).
//!
//! Invariants: capacity figures in answers come from the storage VMs' heartbeats
//! ([`stores::capacity`]); `providername` follows the URL's protocol.

use std::collections::HashMap;

use serde_json::{Value, json};
use sqlx::Row as _;

use crate::api::{Filter, list_response, success};
use crate::command::{ParamSpec, Ty, opt, req};
use crate::error::ApiError;
use crate::model::stores::{self, normalize_url};
use crate::paging::Page;
use crate::params::Params;
use crate::state::{Caller, State};

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
    opt("details", Ty::Map, "details[i].key / details[i].value pairs"),
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

const STORE_SELECT: &str = "SELECT s.id, s.name, s.url, s.provider, s.protocol, s.zone_id, z.name AS zone_name, s.created FROM image_stores s JOIN zones z ON z.id = s.zone_id";

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
    stores::protocol_of(url)?;
    let zone_id = crate::model::resolve_zone(&state.db.pool, p.non_empty("zoneid")).await?;
    let name = p.non_empty("name").map_or_else(|| url.to_owned(), str::to_owned);
    let mut details = serde_json::Map::new();
    for (k, v) in p.map("details") {
        details.insert(k.to_owned(), json!(v));
    }
    let id = stores::add(&state, &name, url, &zone_id, &details).await?;
    let row = sqlx::query(&format!("{STORE_SELECT} WHERE s.id = $1"))
        .bind(id)
        .fetch_one(&state.db.pool)
        .await?;
    Ok(json!({ "imagestore": store_json(&row, &stores::capacity(&state).await?)? }))
}

/// `listImageStores`.
pub async fn list_image_stores(state: State, _caller: Caller, p: Params) -> Result<Value, ApiError> {
    let page = Page::from_params(&p, crate::model::settings::page_size(&state).await)?;
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
    let capacity = stores::capacity(&state).await?;
    let items = rows
        .iter()
        .map(|r| store_json(r, &capacity))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(list_response("imagestore", total, items))
}

/// `deleteImageStore`: refused while templates live on the store.
pub async fn delete_image_store(state: State, _caller: Caller, p: Params) -> Result<Value, ApiError> {
    stores::delete(&state, p.non_empty("id").unwrap_or_default()).await?;
    Ok(success())
}
