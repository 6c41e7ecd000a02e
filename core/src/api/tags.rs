//! Tags: `createTags` (async), `deleteTags` (async), `listTags`, and the `tags` arrays of the
//! template and ISO answers.
//!
//! Invariants: tags are given as CloudStack's map parameter (`tags[0].key`, `tags[0].value`);
//! a caller lists the tags of the resources of its scope.

use std::collections::HashMap;

use serde_json::{Value, json};
use sqlx::Row as _;

use crate::api::{Filter, list_response, success};
use crate::command::{Access, Command, ParamSpec, Ty, opt, req};
use crate::error::ApiError;
use crate::handler;
use crate::model::directory::Scope;
use crate::model::tags::{self, TagType};
use crate::paging::Page;
use crate::params::Params;
use crate::state::{Caller, State};

const CREATE_TAGS: &[ParamSpec] = &[
    req("resourceids", Ty::String, "Comma-separated resource ids"),
    req("resourcetype", Ty::String, "Template, ISO, UserVm or Zone"),
    req("tags", Ty::Map, "tags[i].key / tags[i].value pairs"),
    opt("customer", Ty::String, "Who the tag is for (recorded)"),
];
const DELETE_TAGS: &[ParamSpec] = &[
    req("resourceids", Ty::String, "Comma-separated resource ids"),
    req("resourcetype", Ty::String, "Template, ISO, UserVm or Zone"),
    opt(
        "tags",
        Ty::Map,
        "tags[i].key (/ tags[i].value) to delete; none: every tag",
    ),
];
const LIST_TAGS: &[ParamSpec] = &[
    opt("resourceid", Ty::String, "Tags of this resource"),
    opt("resourcetype", Ty::String, "Tags of this resource type"),
    opt("key", Ty::String, "Tags with this key"),
    opt("value", Ty::String, "Tags with this value"),
    opt("customer", Ty::String, "Tags for this customer"),
    opt("account", Ty::String, "Accepted for compatibility"),
    opt("domainid", Ty::Uuid, "Accepted for compatibility"),
    opt("isrecursive", Ty::Boolean, "Accepted for compatibility"),
    opt("listall", Ty::Boolean, "Every tag the caller may see"),
    opt("keyword", Ty::String, "Substring of the key or value"),
    opt("page", Ty::Integer, "Page number"),
    opt("pagesize", Ty::Integer, "Page size"),
];

/// The tag commands.
pub static COMMANDS: &[Command] = &[
    Command::new(
        "createTags",
        "Tags resources",
        Access::ALL,
        CREATE_TAGS,
        handler!(create_tags),
    )
    .asynchronous()
    .returns(crate::api::fields::SUCCESS),
    Command::new(
        "deleteTags",
        "Removes tags from resources",
        Access::ALL,
        DELETE_TAGS,
        handler!(delete_tags),
    )
    .asynchronous()
    .returns(crate::api::fields::SUCCESS),
    Command::new(
        "listTags",
        "Lists tags",
        Access::ALL,
        LIST_TAGS,
        handler!(list_tags),
    )
    .returns(crate::api::fields::TAG),
];

/// The columns [`tag_json`] reads.
const SELECT: &str = "SELECT r.resource_type, r.resource_id, r.tag_key, r.tag_value, r.customer, a.id AS account_id, a.name AS account_name, d.id AS domain_id, d.name AS domain_name, d.path AS domain_path FROM resource_tags r LEFT JOIN accounts a ON a.id = r.account_id LEFT JOIN domains d ON d.id = a.domain_id";
const FROM: &str =
    "resource_tags r LEFT JOIN accounts a ON a.id = r.account_id LEFT JOIN domains d ON d.id = a.domain_id";

fn tag_json(row: &sqlx::any::AnyRow) -> Result<Value, sqlx::Error> {
    Ok(json!({
        "key": row.try_get::<String, _>("tag_key")?,
        "value": row.try_get::<String, _>("tag_value")?,
        "resourcetype": row.try_get::<String, _>("resource_type")?,
        "resourceid": row.try_get::<String, _>("resource_id")?,
        "account": row.try_get::<Option<String>, _>("account_name")?,
        "domainid": row.try_get::<Option<String>, _>("domain_id")?,
        "domain": row.try_get::<Option<String>, _>("domain_name")?,
        "domainpath": row
            .try_get::<Option<String>, _>("domain_path")?
            .map(|p| crate::model::directory::domains::display_path(&p)),
        "customer": row.try_get::<Option<String>, _>("customer")?,
    }))
}

/// The tags of the resources `ids` of type `t`, by resource id (one query).
pub async fn tags_of(
    state: &State,
    t: TagType,
    ids: &[&str],
) -> Result<HashMap<String, Vec<Value>>, sqlx::Error> {
    let mut out: HashMap<String, Vec<Value>> = HashMap::new();
    if ids.is_empty() {
        return Ok(out);
    }
    let mut f = Filter::default();
    f.eq("r.resource_type", t.as_str());
    f.any_of("r.resource_id", ids);
    for row in f.rows(&state.db.pool, SELECT, " ORDER BY r.tag_key").await? {
        let id: String = row.try_get("resource_id")?;
        out.entry(id).or_default().push(tag_json(&row)?);
    }
    Ok(out)
}

fn ids(p: &Params) -> Vec<&str> {
    p.non_empty("resourceids")
        .unwrap_or_default()
        .split(',')
        .map(str::trim)
        .filter(|i| !i.is_empty())
        .collect()
}

async fn create_tags(state: State, caller: Caller, p: Params) -> Result<Value, ApiError> {
    let t = TagType::parse(p.non_empty("resourcetype").unwrap_or_default())?;
    tags::create(
        &state,
        &caller,
        t,
        &ids(&p),
        &p.map("tags"),
        p.non_empty("customer"),
    )
    .await?;
    Ok(success())
}

async fn delete_tags(state: State, caller: Caller, p: Params) -> Result<Value, ApiError> {
    let t = TagType::parse(p.non_empty("resourcetype").unwrap_or_default())?;
    tags::delete(&state, &caller, t, &ids(&p), &p.map("tags")).await?;
    Ok(success())
}

async fn list_tags(state: State, caller: Caller, p: Params) -> Result<Value, ApiError> {
    let page = Page::from_params(&p, crate::model::settings::page_size(&state).await)?;
    let mut f = Filter::default();
    Scope::of(&caller).restrict(&mut f, "r.account_id", "d.path");
    if let Some(id) = p.non_empty("resourceid") {
        f.eq("r.resource_id", id);
    }
    if let Some(t) = p.non_empty("resourcetype") {
        f.eq("r.resource_type", TagType::parse(t)?.as_str());
    }
    if let Some(k) = p.non_empty("key") {
        f.eq("r.tag_key", k);
    }
    if let Some(v) = p.non_empty("value") {
        f.eq("r.tag_value", v);
    }
    if let Some(c) = p.non_empty("customer") {
        f.eq("r.customer", c);
    }
    if let Some(k) = p.non_empty("keyword") {
        f.keyword(&["r.tag_key", "r.tag_value"], k);
    }
    let total = f.count(&state.db.pool, FROM).await?;
    let rows = f
        .rows(
            &state.db.pool,
            SELECT,
            &format!(" ORDER BY r.created, r.resource_id, r.tag_key{}", page.sql()),
        )
        .await?;
    let items = rows.iter().map(tag_json).collect::<Result<Vec<_>, _>>()?;
    Ok(list_response("tag", total, items))
}
