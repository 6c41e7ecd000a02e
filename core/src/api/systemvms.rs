//! System VMs: `registerSystemVm` (ours: registers an agent started outside core's drivers) and
//! `listSystemVms` (CloudStack's shape).
//!
//! Invariants: a system VM's secret is shown once, by the registration (the domain layer stores
//! only its digest); `state` is the lifecycle state core manages (`Starting` for a hand-registered
//! VM, until drivers manage it), `agentstate` is the agent channel (`Up` | `Disconnected`);
//! lifecycle commands run on the core holding the leader lease.

use serde_json::{Value, json};
use sqlx::Row as _;
use systemvm_proto::agent::{AgentRole, Load};

use crate::api::{Filter, list_response};
use crate::command::{ParamSpec, Ty, opt, req};
use crate::error::ApiError;
use crate::fleet::{self, FleetError};
use crate::model::events::{self, Level};
use crate::model::systemvms;
use crate::paging::Page;
use crate::params::Params;
use crate::state::{Caller, State};

/// `registerSystemVm` parameters.
pub const REGISTER_SYSTEM_VM: &[ParamSpec] = &[
    req(
        "role",
        Ty::String,
        "consoleproxy or secondarystoragevm (secstorage)",
    ),
    opt("zoneid", Ty::Uuid, "Zone id (default: the default zone)"),
    opt("name", Ty::String, "Name (default: s-N-VM or v-N-VM style)"),
];
/// `listSystemVms` parameters.
pub const LIST_SYSTEM_VMS: &[ParamSpec] = &[
    opt("id", Ty::Uuid, "System VM id"),
    opt("name", Ty::String, "Name"),
    opt("state", Ty::String, "State"),
    opt("systemvmtype", Ty::String, "consoleproxy or secondarystoragevm"),
    opt("zoneid", Ty::Uuid, "Zone id"),
    opt("keyword", Ty::String, "Substring of the name"),
    opt("page", Ty::Integer, "Page number"),
    opt("pagesize", Ty::Integer, "Page size"),
];

/// `registerSystemVm`.
pub async fn register_system_vm(state: State, _caller: Caller, p: Params) -> Result<Value, ApiError> {
    let role_text = p.non_empty("role").unwrap_or_default();
    let role = AgentRole::parse(role_text).ok_or_else(|| {
        ApiError::param(format!(
            "Invalid role {role_text:?}: use consoleproxy or secondarystoragevm"
        ))
    })?;
    let r = systemvms::register(&state.db.pool, role, p.non_empty("zoneid"), p.non_empty("name")).await?;
    tracing::info!(id = %r.id, name = %r.name, role = role.as_str(), "Registered a system VM");
    Ok(json!({ "systemvm": {
        "id": r.id,
        "name": r.name,
        "systemvmtype": r.role.cloudstack_type(),
        "zoneid": r.zone_id,
        "secret": r.secret,
    }}))
}

const SELECT: &str = "SELECT s.id, s.name, s.role, s.zone_id, z.name AS zone_name, s.state, s.agent_state, s.last_load, s.software_version, s.disconnected, s.created, s.managed, s.driver, s.endpoint FROM system_vms s JOIN zones z ON z.id = s.zone_id";

fn vm_json(row: &sqlx::any::AnyRow) -> Result<Value, sqlx::Error> {
    let role: String = row.try_get("role")?;
    let role = AgentRole::parse(&role);
    let load: Option<Load> = row
        .try_get::<Option<String>, _>("last_load")?
        .and_then(|l| serde_json::from_str(&l).ok());
    let mut v = json!({
        "id": row.try_get::<String, _>("id")?,
        "name": row.try_get::<String, _>("name")?,
        "systemvmtype": role.map_or("unknown", AgentRole::cloudstack_type),
        "zoneid": row.try_get::<String, _>("zone_id")?,
        "zonename": row.try_get::<String, _>("zone_name")?,
        "state": row.try_get::<String, _>("state")?,
        "agentstate": row.try_get::<String, _>("agent_state")?,
        "version": row.try_get::<Option<String>, _>("software_version")?.unwrap_or_default(),
        "created": row.try_get::<String, _>("created")?,
        "hasannotations": false,
        "managed": row.try_get::<i64, _>("managed")? != 0,
        "hypervisor": row.try_get::<Option<String>, _>("driver")?.unwrap_or_else(|| "None".into()),
    });
    if let Some(e) = row.try_get::<Option<String>, _>("endpoint")? {
        v["publicurl"] = json!(e);
    }
    if let Some(d) = row.try_get::<Option<String>, _>("disconnected")? {
        v["disconnected"] = json!(d);
    }
    if role == Some(AgentRole::ConsoleProxy) {
        let active = load
            .as_ref()
            .and_then(|l| l.console)
            .map_or(0, |c| c.active_sessions);
        v["activeviewersessions"] = json!(active);
    }
    if let Some(s) = load.and_then(|l| l.storage) {
        v["storagejobsrunning"] = json!(s.jobs_running);
        v["storagejobsqueued"] = json!(s.jobs_queued);
        v["storagehealth"] = json!(s.store_health);
    }
    Ok(v)
}

/// `listSystemVms`.
pub async fn list_system_vms(state: State, _caller: Caller, p: Params) -> Result<Value, ApiError> {
    let page = Page::from_params(&p, crate::model::settings::page_size(&state).await)?;
    let mut f = Filter::default();
    f.is_null("s.removed");
    if let Some(id) = p.non_empty("id") {
        f.eq("s.id", id);
    }
    if let Some(name) = p.non_empty("name") {
        f.eq("s.name", name);
    }
    if let Some(st) = p.non_empty("state") {
        f.eq("s.state", st);
    }
    if let Some(t) = p.non_empty("systemvmtype") {
        let role = AgentRole::parse(t).ok_or_else(|| {
            ApiError::param(format!(
                "Invalid systemvmtype {t:?}: use consoleproxy or secondarystoragevm"
            ))
        })?;
        f.eq("s.role", role.as_str());
    }
    if let Some(z) = p.non_empty("zoneid") {
        f.eq("s.zone_id", z);
    }
    if let Some(k) = p.non_empty("keyword") {
        f.keyword(&["s.name"], k);
    }
    let total = f
        .count(&state.db.pool, "system_vms s JOIN zones z ON z.id = s.zone_id")
        .await?;
    let rows = f
        .rows(
            &state.db.pool,
            SELECT,
            &format!(" ORDER BY s.created, s.name{}", page.sql()),
        )
        .await?;
    let items = rows.iter().map(vm_json).collect::<Result<Vec<_>, _>>()?;
    Ok(list_response("systemvm", total, items))
}

/// The `systemvm` object of one VM (also removed ones).
pub async fn one(state: &State, id: &str) -> Result<Value, sqlx::Error> {
    let row = sqlx::query(&format!("{SELECT} WHERE s.id = $1"))
        .bind(id.to_owned())
        .fetch_one(&state.db.pool)
        .await?;
    vm_json(&row)
}

/// Lifecycle command parameters (`id`, `forced`).
pub const LIFECYCLE: &[ParamSpec] = &[
    req("id", Ty::Uuid, "System VM id"),
    opt("forced", Ty::Boolean, "Stop at once instead of gracefully"),
];

/// How long `startSystemVm`/`rebootSystemVm` wait for the agent to come Up.
pub const START_WAIT: std::time::Duration = std::time::Duration::from_secs(90);

/// Carries out a lifecycle command. Lifecycle commands are leader jobs (the command table marks
/// them), so this runs on the core holding the lease, which alone runs the fleet: never two
/// instances of one VM.
async fn lifecycle(state: State, p: Params, action: &'static str) -> Result<Value, ApiError> {
    let id = p.non_empty("id").unwrap_or_default();
    let fleet = state.fleet.get().cloned().ok_or_else(|| {
        ApiError::param("This core runs no hypervisor driver: start and stop system VMs where they run")
    })?;
    let vm = systemvms::managed_one(&state.db.pool, id).await?;
    let force = p
        .non_empty("forced")
        .is_some_and(|v| v.eq_ignore_ascii_case("true"));
    let lock = fleet.lock(&vm.id);
    let _guard = lock.lock().await;
    let done: Result<(), FleetError> = async {
        match action {
            "start" => {
                fleet::start_vm(&state, &fleet, &vm.id).await?;
                fleet::wait_up(&state, &vm.id, START_WAIT).await
            }
            "stop" => fleet::stop_vm(&state, &fleet, &vm, force, false).await,
            "reboot" => {
                fleet::stop_vm(&state, &fleet, &vm, force, false).await?;
                fleet::start_vm(&state, &fleet, &vm.id).await?;
                fleet::wait_up(&state, &vm.id, START_WAIT).await
            }
            _ => fleet::stop_vm(&state, &fleet, &vm, force, true).await,
        }
    }
    .await;
    done?;
    events::record(
        &state,
        &format!("{}.{}", events::prefix(vm.role), action.to_ascii_uppercase()),
        Level::Info,
        &format!("{} {} through the API", vm.name, past_tense(action)),
        Some(&vm.id),
        Some(&vm.zone_id),
    )
    .await;
    Ok(json!({ "systemvm": one(&state, &vm.id).await? }))
}

fn past_tense(action: &str) -> &'static str {
    match action {
        "start" => "started",
        "stop" => "stopped",
        "reboot" => "rebooted",
        _ => "destroyed",
    }
}

/// `startSystemVm` (async; runs on the lease holder).
pub async fn start_system_vm(state: State, _caller: Caller, p: Params) -> Result<Value, ApiError> {
    lifecycle(state, p, "start").await
}

/// `stopSystemVm` (async; runs on the lease holder).
pub async fn stop_system_vm(state: State, _caller: Caller, p: Params) -> Result<Value, ApiError> {
    lifecycle(state, p, "stop").await
}

/// `rebootSystemVm` (async; runs on the lease holder).
pub async fn reboot_system_vm(state: State, _caller: Caller, p: Params) -> Result<Value, ApiError> {
    lifecycle(state, p, "reboot").await
}

/// `destroySystemVm` (async; runs on the lease holder).
pub async fn destroy_system_vm(state: State, _caller: Caller, p: Params) -> Result<Value, ApiError> {
    lifecycle(state, p, "destroy").await
}
