//! Global settings: `listConfigurations`, `updateConfiguration`, and their definitions.
//!
//! Invariants: only settings defined in [`SETTINGS`] exist; a stored value always passed its
//! definition's type and range check; the in-memory cache is updated only after the database write
//! succeeded.

use std::collections::HashMap;

use serde_json::{Value, json};

use crate::api::list_response;
use crate::command::{ParamSpec, Ty, opt, req};
use crate::error::ApiError;
use crate::paging::Page;
use crate::params::Params;
use crate::state::{Caller, State};
use crate::util::now_cs;

/// A setting's value type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Integer within an inclusive range.
    Integer(i64, i64),
    /// Free text.
    String,
}

/// One setting this service knows.
#[derive(Debug, Clone, Copy)]
pub struct Setting {
    /// Name.
    pub name: &'static str,
    /// Category (`listConfigurations category=`).
    pub category: &'static str,
    /// Default value.
    pub default: &'static str,
    /// Type and range.
    pub kind: Kind,
    /// Whether a change applies without a restart.
    pub dynamic: bool,
    /// Description.
    pub description: &'static str,
}

/// Every setting.
pub const SETTINGS: &[Setting] = &[
    Setting {
        name: "consoleproxy.session.max",
        category: "Console Proxy",
        default: "50",
        kind: Kind::Integer(1, 100_000),
        dynamic: true,
        description: "The max number of viewer sessions console proxy is configured to serve for",
    },
    Setting {
        name: "consoleproxy.capacity.standby",
        category: "Console Proxy",
        default: "10",
        kind: Kind::Integer(0, 100_000),
        dynamic: true,
        description: "The minimal number of console proxy viewer sessions that system is able to serve immediately(standby capacity)",
    },
    Setting {
        name: "consoleproxy.capacityscan.interval",
        category: "Console Proxy",
        default: "30000",
        kind: Kind::Integer(1000, 86_400_000),
        dynamic: true,
        description: "The time interval(in millisecond) to scan whether or not system needs more console proxy to ensure minimal standby capacity",
    },
    Setting {
        name: "consoleproxy.launch.max",
        category: "Console Proxy",
        default: "10",
        kind: Kind::Integer(1, 1000),
        dynamic: true,
        description: "maximum number of console proxy instances per zone can be launched",
    },
    Setting {
        name: "consoleproxy.session.timeout",
        category: "Console Proxy",
        default: "300000",
        kind: Kind::Integer(1000, 86_400_000),
        dynamic: true,
        description: "Timeout(in milliseconds) that console proxy tries to maintain a viewer session before it times out the session for no activity",
    },
    Setting {
        name: "consoleproxy.scalein.idle",
        category: "Console Proxy",
        default: "300",
        kind: Kind::Integer(1, 86_400),
        dynamic: true,
        description: "Seconds a console proxy must be without sessions before it is drained and destroyed, when the others still leave more than the standby capacity",
    },
    Setting {
        name: "consoleproxy.scale.cooldown",
        category: "Console Proxy",
        default: "30",
        kind: Kind::Integer(0, 86_400),
        dynamic: true,
        description: "Seconds between two console proxy scale decisions in a zone",
    },
    Setting {
        name: "consoleproxy.url.validity",
        category: "Console Proxy",
        default: "300",
        kind: Kind::Integer(10, 86_400),
        dynamic: true,
        description: "Seconds a console link from createConsoleEndpoint stays usable (it opens one session)",
    },
    Setting {
        name: "secstorage.allowed.internal.sites",
        category: "Advanced",
        default: "",
        kind: Kind::String,
        dynamic: true,
        description: "Comma separated list of cidrs internal to the datacenter that can host template download servers, please note 0.0.0.0 is not a valid site",
    },
    Setting {
        name: "max.template.iso.size",
        category: "Storage",
        default: "50",
        kind: Kind::Integer(1, 1_000_000),
        dynamic: true,
        description: "The maximum size for a downloaded template or ISO (in GB).",
    },
    Setting {
        name: "default.page.size",
        category: "Advanced",
        default: "500",
        kind: Kind::Integer(1, 100_000),
        dynamic: true,
        description: "Default page size for API list* commands",
    },
    Setting {
        name: "integration.api.port",
        category: "Advanced",
        default: "0",
        kind: Kind::Integer(0, 65_535),
        dynamic: false,
        description: "Integration (unauthenticated) API port on 127.0.0.1, 0 to disable. Takes effect on restart",
    },
    Setting {
        name: "agent.heartbeat.interval",
        category: "Advanced",
        default: "3",
        kind: Kind::Integer(1, 3600),
        dynamic: true,
        description: "Seconds between two heartbeats of a system-VM agent (sent in Welcome; applies at the next connection)",
    },
    Setting {
        name: "agent.heartbeat.timeout",
        category: "Advanced",
        default: "9",
        kind: Kind::Integer(1, 86_400),
        dynamic: true,
        description: "Seconds of silence after which core marks a system-VM agent Disconnected and drops its connection",
    },
];

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

/// Whether a setting may have a value per zone (the fleet's settings).
pub fn zone_scoped(name: &str) -> bool {
    name.starts_with("consoleproxy.") || name.starts_with("secstorage.")
}

/// The value of `name` in `zone`: the zone's own value, else the global one.
pub async fn zone_value(state: &State, zone: &str, name: &str) -> String {
    if zone_scoped(name) {
        let v: Result<Option<String>, _> =
            sqlx::query_scalar("SELECT value FROM zone_configurations WHERE zone_id = $1 AND name = $2")
                .bind(zone.to_owned())
                .bind(name.to_owned())
                .fetch_optional(&state.db.pool)
                .await;
        match v {
            Ok(Some(v)) => return v,
            Ok(None) => {}
            Err(error) => tracing::warn!(%error, name, "Zone setting unreadable; using the global value"),
        }
    }
    state.setting(name).await
}

async fn zone_exists(state: &State, zone: &str) -> Result<(), ApiError> {
    let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM zones WHERE id = $1")
        .bind(zone.to_owned())
        .fetch_one(&state.db.pool)
        .await?;
    if n == 0 {
        return Err(ApiError::param(format!("Unable to find zone by id {zone}")));
    }
    Ok(())
}

/// Finds a setting definition.
pub fn find(name: &str) -> Option<&'static Setting> {
    SETTINGS.iter().find(|s| s.name == name)
}

/// Checks `value` against `s`'s type and range.
pub fn check(s: &Setting, value: &str) -> Result<(), ApiError> {
    match s.kind {
        Kind::String => Ok(()),
        Kind::Integer(lo, hi) => match value.parse::<i64>() {
            Ok(v) if (lo..=hi).contains(&v) => Ok(()),
            _ => Err(ApiError::param(format!(
                "Value {value:?} of configuration {} must be an integer from {lo} to {hi}",
                s.name
            ))),
        },
    }
}

/// Loads every setting: defaults overridden by stored values (invalid stored values are ignored).
pub async fn load(db: &sqlx::AnyPool) -> Result<HashMap<String, String>, sqlx::Error> {
    let mut map: HashMap<String, String> = SETTINGS
        .iter()
        .map(|s| (s.name.to_owned(), s.default.to_owned()))
        .collect();
    let rows: Vec<(String, String)> = sqlx::query_as("SELECT name, value FROM configurations")
        .fetch_all(db)
        .await?;
    for (name, value) in rows {
        match find(&name) {
            Some(s) if check(s, &value).is_ok() => {
                map.insert(name, value);
            }
            _ => tracing::warn!(%name, "Ignoring an unknown or invalid stored setting"),
        }
    }
    Ok(map)
}

fn setting_json(s: &Setting, value: &str) -> Value {
    json!({
        "name": s.name,
        "value": value,
        "category": s.category,
        "description": s.description,
        "isdynamic": s.dynamic,
        "scope": "global",
        "defaultvalue": s.default,
        "type": match s.kind { Kind::Integer(..) => "Number", Kind::String => "String" },
        "component": "systemvm-core",
        "displaytext": s.name,
    })
}

/// `listConfigurations`.
pub async fn list_configurations(state: State, _caller: Caller, p: Params) -> Result<Value, ApiError> {
    let page = Page::from_params(&p, state.page_size().await)?;
    let mut values = state.settings.read().await.clone();
    let zone = p.non_empty("zoneid");
    if let Some(z) = zone {
        zone_exists(&state, z).await?;
        let rows: Vec<(String, String)> =
            sqlx::query_as("SELECT name, value FROM zone_configurations WHERE zone_id = $1")
                .bind(z.to_owned())
                .fetch_all(&state.db.pool)
                .await?;
        values.extend(rows);
    }
    let name = p.non_empty("name").map(str::to_lowercase);
    let category = p.non_empty("category");
    let keyword = p.non_empty("keyword").map(str::to_lowercase);
    let matching: Vec<&Setting> = SETTINGS
        .iter()
        .filter(|s| zone.is_none() || zone_scoped(s.name))
        .filter(|s| name.as_deref().is_none_or(|n| s.name.contains(n)))
        .filter(|s| category.is_none_or(|c| s.category.eq_ignore_ascii_case(c)))
        .filter(|s| {
            keyword
                .as_deref()
                .is_none_or(|k| s.name.contains(k) || s.description.to_lowercase().contains(k))
        })
        .collect();
    let total = i64::try_from(matching.len()).unwrap_or(i64::MAX);
    let items = matching
        .iter()
        .skip(usize::try_from(page.offset).unwrap_or(usize::MAX))
        .take(
            page.limit
                .and_then(|l| usize::try_from(l).ok())
                .unwrap_or(usize::MAX),
        )
        .map(|s| {
            let mut v = setting_json(s, values.get(s.name).map_or(s.default, String::as_str));
            if let Some(z) = zone {
                v["scope"] = json!("zone");
                v["zoneid"] = json!(z);
            }
            v
        })
        .collect();
    Ok(list_response("configuration", total, items))
}

/// `updateConfiguration`.
pub async fn update_configuration(state: State, _caller: Caller, p: Params) -> Result<Value, ApiError> {
    let name = p.non_empty("name").unwrap_or_default();
    let s = find(name).ok_or_else(|| ApiError::param(format!("Configuration {name} does not exist")))?;
    if let Some(zone) = p.non_empty("zoneid") {
        if !zone_scoped(name) {
            return Err(ApiError::param(format!("Configuration {name} has no zone scope")));
        }
        zone_exists(&state, zone).await?;
        if let Some(v) = p.non_empty("value") {
            check(s, v)?;
        }
        let mut tx = state.db.pool.begin().await?;
        sqlx::query("DELETE FROM zone_configurations WHERE zone_id = $1 AND name = $2")
            .bind(zone.to_owned())
            .bind(name.to_owned())
            .execute(&mut *tx)
            .await?;
        if let Some(v) = p.non_empty("value") {
            sqlx::query(
                "INSERT INTO zone_configurations (zone_id, name, value, updated) VALUES ($1, $2, $3, $4)",
            )
            .bind(zone.to_owned())
            .bind(name.to_owned())
            .bind(v.to_owned())
            .bind(now_cs())
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        let value = zone_value(&state, zone, name).await;
        tracing::info!(%name, zone, "Zone setting updated");
        let mut v = setting_json(s, &value);
        v["scope"] = json!("zone");
        v["zoneid"] = json!(zone);
        return Ok(json!({ "configuration": v }));
    }
    let value = p.non_empty("value").unwrap_or(s.default);
    check(s, value)?;
    // Portable upsert: delete then insert, in one transaction.
    let mut tx = state.db.pool.begin().await?;
    sqlx::query("DELETE FROM configurations WHERE name = $1")
        .bind(name.to_owned())
        .execute(&mut *tx)
        .await?;
    sqlx::query("INSERT INTO configurations (name, value, updated) VALUES ($1, $2, $3)")
        .bind(name.to_owned())
        .bind(value.to_owned())
        .bind(now_cs())
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    state
        .settings
        .write()
        .await
        .insert(name.to_owned(), value.to_owned());
    tracing::info!(%name, "Setting updated");
    Ok(json!({ "configuration": setting_json(s, value) }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_pass_their_own_checks() {
        for s in SETTINGS {
            check(s, s.default).unwrap();
        }
    }

    #[test]
    fn bad_values_are_431() {
        let s = find("integration.api.port").unwrap();
        assert_eq!(check(s, "70000").unwrap_err().code, 431);
        assert_eq!(check(s, "abc").unwrap_err().code, 431);
        check(s, "8096").unwrap();
    }
}
