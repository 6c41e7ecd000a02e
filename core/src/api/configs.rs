//! `listConfigurations` and `updateConfiguration`: the HTTP side of [`crate::model::settings`].
//!
//! Invariants: only settings the domain defines exist; answers are CloudStack's `configuration`
//! objects, with `scope` `zone` and `zoneid` when a zone was named.

use serde_json::{Value, json};

use crate::api::list_response;
use crate::command::{ParamSpec, Ty, opt, req};
use crate::error::ApiError;
use crate::model::settings::{self, Kind, SETTINGS, Setting};
use crate::paging::Page;
use crate::params::Params;
use crate::state::{Caller, State};

/// `listConfigurations` parameters.
pub const LIST_CONFIGURATIONS: &[ParamSpec] = &[
    opt("name", Ty::String, "Substring of the setting name"),
    opt(
        "zoneid",
        Ty::Uuid,
        "A zone: its values of the zone-scoped settings (consoleproxy.*, secstorage.*)",
    ),
    opt("category", Ty::String, "Category"),
    opt("keyword", Ty::String, "Substring of the name or description"),
    opt("page", Ty::Integer, "Page number"),
    opt("pagesize", Ty::Integer, "Page size"),
];
/// `updateConfiguration` parameters.
pub const UPDATE_CONFIGURATION: &[ParamSpec] = &[
    req("name", Ty::String, "Setting name"),
    opt(
        "value",
        Ty::String,
        "New value (absent or empty: the default; with zoneid: the global value)",
    ),
    opt(
        "zoneid",
        Ty::Uuid,
        "Set the value for this zone only (zone-scoped settings)",
    ),
];

fn setting_json(s: &Setting, value: &str, zone: Option<&str>) -> Value {
    // A secret is never answered, only whether it is set.
    let value = match (s.kind, value.is_empty()) {
        (Kind::Secret, false) => "********",
        _ => value,
    };
    let mut v = json!({
        "name": s.name,
        "value": value,
        "category": s.category,
        "description": s.description,
        "isdynamic": s.dynamic,
        "scope": "global",
        "defaultvalue": s.default,
        "type": match s.kind { Kind::Integer(..) => "Number", Kind::String | Kind::Secret => "String" },
        "component": "systemvm-core",
        "displaytext": s.name,
    });
    if let Some(z) = zone {
        v["scope"] = json!("zone");
        v["zoneid"] = json!(z);
    }
    v
}

/// `listConfigurations`.
pub async fn list_configurations(state: State, _caller: Caller, p: Params) -> Result<Value, ApiError> {
    let page = Page::from_params(&p, crate::model::settings::page_size(&state).await)?;
    let mut values = state.settings.read().await.clone();
    let zone = p.non_empty("zoneid");
    if let Some(z) = zone {
        crate::model::resolve_zone(&state.db.pool, Some(z)).await?;
        values.extend(settings::zone_values(&state, z).await?);
    }
    let name = p.non_empty("name").map(str::to_lowercase);
    let category = p.non_empty("category");
    let keyword = p.non_empty("keyword").map(str::to_lowercase);
    let matching: Vec<&Setting> = SETTINGS
        .iter()
        .copied()
        .filter(|s| zone.is_none() || s.zone)
        .filter(|s| name.as_deref().is_none_or(|n| s.name.contains(n)))
        .filter(|s| category.is_none_or(|c| s.category.eq_ignore_ascii_case(c)))
        .filter(|s| {
            keyword
                .as_deref()
                .is_none_or(|k| s.name.contains(k) || s.description.to_lowercase().contains(k))
        })
        .collect();
    let total = i64::try_from(matching.len()).unwrap_or(i64::MAX);
    let items = page
        .slice(matching)
        .into_iter()
        .map(|s| setting_json(s, values.get(s.name).map_or(s.default, String::as_str), zone))
        .collect();
    Ok(list_response("configuration", total, items))
}

/// `updateConfiguration`.
pub async fn update_configuration(state: State, _caller: Caller, p: Params) -> Result<Value, ApiError> {
    let name = p.non_empty("name").unwrap_or_default();
    let s = settings::find(name)
        .ok_or_else(|| ApiError::param(format!("Configuration {name} does not exist")))?;
    let value = p.non_empty("value");
    if let Some(zone) = p.non_empty("zoneid") {
        let now = settings::set_zone(&state, zone, s, value).await?;
        return Ok(json!({ "configuration": setting_json(s, &now, Some(zone)) }));
    }
    let now = settings::set_global(&state, s, value).await?;
    Ok(json!({ "configuration": setting_json(s, &now, None) }))
}
