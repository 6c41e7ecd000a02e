//! `listCapacity`: secondary storage (type 6) per zone, as the storage VMs report it.

use serde_json::{Value, json};
use sqlx::Row as _;

use crate::api::{Filter, list_response};
use crate::command::{ParamSpec, Ty, opt};
use crate::error::ApiError;
use crate::model::stores::{self, normalize_url};
use crate::paging::Page;
use crate::params::Params;
use crate::state::{Caller, State};

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

/// `listCapacity`: secondary storage (type 6) per zone, from the storage VMs' heartbeats.
pub async fn list_capacity(state: State, _caller: Caller, p: Params) -> Result<Value, ApiError> {
    let page = Page::from_params(&p, crate::model::settings::page_size(&state).await)?;
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
    let capacity = stores::capacity(&state).await?;
    let mut items = Vec::new();
    for z in &zones {
        let zone_id: String = z.try_get("id")?;
        let (mut total, mut used) = (0u64, 0u64);
        for s in &stores {
            if s.try_get::<String, _>("zone_id")? == zone_id {
                let url: String = s.try_get("url")?;
                if let Some((t, u)) = capacity.get(&normalize_url(&url)) {
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
