//! `listEvents`: what core decided and did (system VM starts, restarts, scaling), newest first.

use serde_json::{Value, json};
use sqlx::Row as _;

use crate::api::{Filter, list_response};
use crate::command::{ParamSpec, Ty, opt};
use crate::error::ApiError;
use crate::model::directory::ROOT_DOMAIN_ID;
use crate::paging::Page;
use crate::params::Params;
use crate::state::{Caller, State};

/// `listEvents` parameters.
pub const LIST_EVENTS: &[ParamSpec] = &[
    opt("id", Ty::Uuid, "Event id"),
    opt("type", Ty::String, "Event type, e.g. PROXY.SCALEOUT"),
    opt("level", Ty::String, "INFO, WARN or ERROR"),
    opt("resourceid", Ty::Uuid, "The system VM the event is about"),
    opt("keyword", Ty::String, "Substring of the description"),
    opt("page", Ty::Integer, "Page number"),
    opt("pagesize", Ty::Integer, "Page size"),
];

/// `listEvents` (root admins: events are about the fleet).
pub async fn list_events(state: State, _caller: Caller, p: Params) -> Result<Value, ApiError> {
    let page = Page::from_params(&p, crate::model::settings::page_size(&state).await)?;
    let mut f = Filter::default();
    for (param, col) in [
        ("id", "id"),
        ("type", "type"),
        ("level", "level"),
        ("resourceid", "resource_id"),
    ] {
        if let Some(v) = p.non_empty(param) {
            f.eq(col, v);
        }
    }
    if let Some(k) = p.non_empty("keyword") {
        f.keyword(&["description"], k);
    }
    let total = f.count(&state.db.pool, "events").await?;
    let rows = f
        .rows(
            &state.db.pool,
            "SELECT id, type, level, description, resource_id, created FROM events",
            &format!(" ORDER BY created_ms DESC, id{}", page.sql()),
        )
        .await?;
    let mut items = Vec::new();
    for r in &rows {
        let mut v = json!({
            "id": r.try_get::<String, _>("id")?,
            "type": r.try_get::<String, _>("type")?,
            "level": r.try_get::<String, _>("level")?,
            "description": r.try_get::<String, _>("description")?,
            "state": "Completed",
            "username": "system",
            "account": "system",
            "domain": "ROOT",
            "domainid": ROOT_DOMAIN_ID,
            "created": r.try_get::<String, _>("created")?,
        });
        if let Some(id) = r.try_get::<Option<String>, _>("resource_id")? {
            v["resourceid"] = json!(id);
            v["resourcetype"] = json!("SystemVm");
        }
        items.push(v);
    }
    Ok(list_response("event", total, items))
}
