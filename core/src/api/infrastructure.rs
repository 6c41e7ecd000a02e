//! The infrastructure views the UI's dashboard and menus read: `listInfrastructure`,
//! `listZonesMetrics`, `listAlerts`, and `listPods`, `listClusters`, `listHosts`, `listRouters`,
//! which answer empty (this suite models no pods, clusters, hypervisor hosts or virtual routers
//! yet; primary storage is `api::volumes`).
//!
//! Invariants: `listAlerts` is computed from the fleet's state at the time of the call (a system
//! VM in Error, an agent disconnected), never stored, so an alert disappears with its cause;
//! counts in `listInfrastructure` are the same tables the lists read.

use serde_json::{Value, json};
use sqlx::Row as _;

use crate::api::list_response;
use crate::command::{Access, Command, ParamSpec, Ty, opt};
use crate::error::ApiError;
use crate::handler;
use crate::paging::Page;
use crate::params::Params;
use crate::state::{Caller, State};

const NONE: &[ParamSpec] = &[];
const LIST_ALERTS: &[ParamSpec] = &[
    opt("id", Ty::Uuid, "Alert id"),
    opt("name", Ty::String, "Alert name"),
    opt("type", Ty::String, "Alert type number"),
    opt("keyword", Ty::String, "Substring of the description"),
    opt("page", Ty::Integer, "Page number"),
    opt("pagesize", Ty::Integer, "Page size"),
];
const LIST_EMPTY: &[ParamSpec] = &[
    opt("id", Ty::Uuid, "Id"),
    opt("name", Ty::String, "Name"),
    opt("zoneid", Ty::Uuid, "Zone"),
    opt("podid", Ty::Uuid, "Pod"),
    opt("clusterid", Ty::Uuid, "Cluster"),
    opt("type", Ty::String, "Type"),
    opt("state", Ty::String, "State"),
    opt("hypervisor", Ty::String, "Hypervisor"),
    opt("keyword", Ty::String, "Substring of the name"),
    opt("listall", Ty::Boolean, "Accepted for compatibility"),
    opt("showcapacities", Ty::Boolean, "Accepted for compatibility"),
    opt("page", Ty::Integer, "Page number"),
    opt("pagesize", Ty::Integer, "Page size"),
];

/// The infrastructure commands.
pub static COMMANDS: &[Command] = &[
    Command::new(
        "listInfrastructure",
        "Counts of the cloud's infrastructure",
        Access::ADMIN,
        NONE,
        handler!(list_infrastructure),
    )
    .returns(crate::api::fields::INFRASTRUCTURE),
    Command::new(
        "listZonesMetrics",
        "Lists zones with their metrics",
        Access::ADMIN,
        crate::api::zones::LIST_ZONES,
        handler!(list_zones_metrics),
    )
    .returns(crate::api::fields::ZONE_METRICS),
    Command::new(
        "listAlerts",
        "Lists the fleet's current alerts",
        Access::INFRA,
        LIST_ALERTS,
        handler!(list_alerts),
    )
    .returns(crate::api::fields::ALERT),
    Command::new(
        "listPods",
        "Lists pods (none modelled)",
        Access::INFRA,
        LIST_EMPTY,
        handler!(empty),
    ),
    Command::new(
        "listClusters",
        "Lists clusters (none modelled)",
        Access::INFRA,
        LIST_EMPTY,
        handler!(empty),
    ),
    Command::new(
        "listHosts",
        "Lists hypervisor hosts (none modelled)",
        Access::INFRA,
        LIST_EMPTY,
        handler!(empty),
    ),
    Command::new(
        "listRouters",
        "Lists virtual routers (none)",
        Access::ADMINS,
        LIST_EMPTY,
        handler!(empty),
    ),
];

async fn count(state: &State, sql: &str) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(sql).fetch_one(&state.db.pool).await
}

/// `listInfrastructure`.
async fn list_infrastructure(state: State, _caller: Caller, _p: Params) -> Result<Value, ApiError> {
    let alerts = alerts(&state).await?.len();
    // A core is counted while its heartbeat is fresh (the lease's rule: 3 × the interval).
    let cores = count(
        &state,
        &format!(
            "SELECT COUNT(*) FROM core_instances WHERE heartbeat_ms > ({}) - 30000",
            state.db.now_ms_sql()
        ),
    )
    .await?;
    Ok(json!({ "infrastructure": {
        "zones": count(&state, "SELECT COUNT(*) FROM zones").await?,
        "pods": 0, "clusters": 0, "hosts": 0,
        "storagepools": count(&state, "SELECT COUNT(*) FROM storage_pools").await?,
        "imagestores": count(&state, "SELECT COUNT(*) FROM image_stores").await?,
        "objectstores": 0,
        "systemvms": count(&state, "SELECT COUNT(*) FROM system_vms").await?,
        "routers": 0, "ilbvms": 0, "cpusockets": 0,
        "managementservers": cores.max(1),
        "alerts": alerts,
        "backuprepositories": 0,
    }}))
}

/// `listZonesMetrics`: `listZones` plus the metrics fields (no hosts: zero capacity).
async fn list_zones_metrics(state: State, caller: Caller, p: Params) -> Result<Value, ApiError> {
    let mut v = crate::api::zones::list_zones(state, caller, p).await?;
    if let Some(zones) = v.get_mut("zone").and_then(Value::as_array_mut) {
        for z in zones {
            let enabled = z["allocationstate"].as_str().unwrap_or("Enabled");
            z["state"] = json!(enabled);
            z["clusters"] = json!("0 / 0");
            for k in ["cputotal", "cpuused", "cpuallocated", "cpumaxdeviation"] {
                z[k] = json!("0 Ghz");
            }
            for k in [
                "memorytotal",
                "memoryused",
                "memoryallocated",
                "memorymaxdeviation",
            ] {
                z[k] = json!("0 GB");
            }
            for k in [
                "cputhreshold",
                "cpudisablethreshold",
                "cpuallocatedthreshold",
                "cpuallocateddisablethreshold",
                "memorythreshold",
                "memorydisablethreshold",
                "memoryallocatedthreshold",
                "memoryallocateddisablethreshold",
            ] {
                z[k] = json!(false);
            }
        }
    }
    Ok(v)
}

/// One current alert.
struct Alert {
    id: String,
    ty: i64,
    name: &'static str,
    description: String,
    sent: String,
}

/// CloudStack's alert types for system VMs: 9 console proxy, 18 secondary storage VM.
fn alert_type(role: &str) -> (i64, &'static str) {
    if systemvm_proto::agent::AgentRole::parse(role) == Some(systemvm_proto::agent::AgentRole::ConsoleProxy) {
        (9, "ALERT.SERVICE.CONSOLEPROXY")
    } else {
        (18, "ALERT.SERVICE.SSVM")
    }
}

/// The agent version core expects (one workspace: core's own).
const AGENT_VERSION: &str = env!("CARGO_PKG_VERSION");

async fn alerts(state: &State) -> Result<Vec<Alert>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT id, name, role, state, agent_state, created, disconnected, software_version FROM system_vms WHERE state = 'Error' OR (state = 'Running' AND agent_state = 'Disconnected') \
         OR (state <> 'Destroyed' AND agent_state = 'Up' AND software_version IS NOT NULL AND software_version <> '' AND software_version <> $1) ORDER BY created, id",
    )
    .bind(AGENT_VERSION)
    .fetch_all(&state.db.pool)
    .await?;
    let mut out = Vec::with_capacity(rows.len());
    for row in rows {
        let (id, name, role, vm_state): (String, String, String, String) = (
            row.try_get("id")?,
            row.try_get("name")?,
            row.try_get("role")?,
            row.try_get("state")?,
        );
        let (ty, alert_name) = alert_type(&role);
        let agent_state: Option<String> = row.try_get("agent_state")?;
        let version: Option<String> = row.try_get("software_version")?;
        let description = if vm_state == "Error" {
            format!("System VM {name} is in Error: see listEvents for why")
        } else if agent_state.as_deref() == Some("Disconnected") {
            format!("The agent of running system VM {name} is disconnected")
        } else {
            format!(
                "System VM {name} runs agent version {}, core expects {AGENT_VERSION}: upgrade or recreate it",
                version.unwrap_or_default()
            )
        };
        let sent = row
            .try_get::<Option<String>, _>("disconnected")?
            .unwrap_or(row.try_get("created")?);
        out.push(Alert {
            id,
            ty,
            name: alert_name,
            description,
            sent,
        });
    }
    Ok(out)
}

/// `listAlerts`.
async fn list_alerts(state: State, _caller: Caller, p: Params) -> Result<Value, ApiError> {
    let page = Page::from_params(&p, crate::model::settings::page_size(&state).await)?;
    let keyword = p.non_empty("keyword").map(str::to_lowercase);
    let items: Vec<Value> = alerts(&state)
        .await?
        .into_iter()
        .filter(|a| p.non_empty("id").is_none_or(|id| id == a.id))
        .filter(|a| p.non_empty("name").is_none_or(|n| n == a.name))
        .filter(|a| p.non_empty("type").is_none_or(|t| t == a.ty.to_string()))
        .filter(|a| keyword.as_deref().is_none_or(|k| a.description.to_lowercase().contains(k)))
        .map(|a| json!({ "id": a.id, "type": a.ty, "name": a.name, "description": a.description, "sent": a.sent }))
        .collect();
    let total = i64::try_from(items.len()).unwrap_or(i64::MAX);
    Ok(list_response("alert", total, page.slice(items)))
}

async fn empty(_state: State, _caller: Caller, _p: Params) -> Result<Value, ApiError> {
    Ok(json!({}))
}
