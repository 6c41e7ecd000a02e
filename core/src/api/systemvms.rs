//! System VMs: `registerSystemVm` (ours: registers an agent started outside core's drivers) and
//! `listSystemVms` (CloudStack's shape).
//!
//! Invariants: a system VM's secret is shown once, by the registration, and stored only as its
//! SHA-256 digest; `state` is the lifecycle state core manages (`Starting` for a hand-registered
//! VM, until drivers manage it), `agentstate` is the agent channel (`Up` | `Disconnected`).

use serde_json::{Value, json};
use sqlx::Row as _;
use systemvm_proto::agent::{AgentRole, Load};

use crate::agent::{DISCONNECTED, hash_secret};
use crate::api::{Filter, list_response};
use crate::command::{ParamSpec, Ty, opt, req};
use crate::error::ApiError;
use crate::paging::Page;
use crate::params::Params;
use crate::state::{Caller, State};
use crate::util::{new_uuid, now_cs, random_token};

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

/// A registered system VM, with its one-time secret.
#[derive(Debug)]
pub struct Registered {
    /// Id (`--vm-id`).
    pub id: String,
    /// Name.
    pub name: String,
    /// Role.
    pub role: AgentRole,
    /// Zone id.
    pub zone_id: String,
    /// The secret (`--secret`); not stored.
    pub secret: String,
}

/// Registers a system VM in `zone_id` (or the oldest zone); returns its id and secret.
pub async fn register(
    pool: &sqlx::AnyPool,
    role: AgentRole,
    zone_id: Option<&str>,
    name: Option<&str>,
) -> Result<Registered, ApiError> {
    let zone_id: String = match zone_id {
        Some(z) => sqlx::query_scalar("SELECT id FROM zones WHERE id = $1")
            .bind(z.to_owned())
            .fetch_optional(pool)
            .await?
            .ok_or_else(|| ApiError::param(format!("Unable to find zone by id {z}")))?,
        None => sqlx::query_scalar("SELECT id FROM zones ORDER BY created, name LIMIT 1")
            .fetch_optional(pool)
            .await?
            .ok_or_else(|| ApiError::param("No zone exists: create one first"))?,
    };
    let id = new_uuid().map_err(|e| ApiError::internal(&e))?;
    let secret = random_token::<32>().map_err(|e| ApiError::internal(&e))?;
    let name = match name {
        Some(n) => n.to_owned(),
        None => {
            let prefix = match role {
                AgentRole::ConsoleProxy => "v",
                AgentRole::SecStorage => "s",
            };
            format!("{prefix}-{}-VM", &id[..8])
        }
    };
    let r = sqlx::query(
        "INSERT INTO system_vms (id, name, role, zone_id, state, agent_state, secret_hash, created) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
    )
    .bind(id.clone())
    .bind(name.clone())
    .bind(role.as_str())
    .bind(zone_id.clone())
    .bind("Starting")
    .bind(DISCONNECTED)
    .bind(hash_secret(&secret))
    .bind(now_cs())
    .execute(pool)
    .await;
    match r {
        Ok(_) => Ok(Registered {
            id,
            name,
            role,
            zone_id,
            secret,
        }),
        Err(sqlx::Error::Database(d)) if d.is_unique_violation() => Err(ApiError::param(format!(
            "A system VM with name {name} already exists"
        ))),
        Err(e) => Err(e.into()),
    }
}

/// `registerSystemVm`.
pub async fn register_system_vm(state: State, _caller: Caller, p: Params) -> Result<Value, ApiError> {
    let role_text = p.non_empty("role").unwrap_or_default();
    let role = AgentRole::parse(role_text).ok_or_else(|| {
        ApiError::param(format!(
            "Invalid role {role_text:?}: use consoleproxy or secondarystoragevm"
        ))
    })?;
    let r = register(&state.db.pool, role, p.non_empty("zoneid"), p.non_empty("name")).await?;
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
    let page = Page::from_params(&p, state.page_size().await)?;
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

async fn managed(
    state: &State,
    p: &Params,
) -> Result<(std::sync::Arc<crate::fleet::Fleet>, crate::fleet::ManagedVm), ApiError> {
    let id = p.non_empty("id").unwrap_or_default();
    let fleet = state.fleet.get().cloned().ok_or_else(|| {
        ApiError::param("This core runs no hypervisor driver: start and stop system VMs where they run")
    })?;
    let vm = crate::fleet::managed_vms(state, None)
        .await?
        .into_iter()
        .find(|v| v.id == id);
    match vm {
        Some(vm) => Ok((fleet, vm)),
        None => {
            let exists: i64 =
                sqlx::query_scalar("SELECT COUNT(*) FROM system_vms WHERE id = $1 AND removed IS NULL")
                    .bind(id.to_owned())
                    .fetch_one(&state.db.pool)
                    .await?;
            Err(ApiError::param(if exists > 0 {
                format!("System VM {id} was registered by hand; core does not start or stop it")
            } else {
                format!("Unable to find system VM by id {id}")
            }))
        }
    }
}

fn failed(text: String) -> ApiError {
    ApiError::new(
        crate::error::code::INTERNAL_ERROR,
        crate::error::cs::SERVER_API,
        text,
    )
}

async fn lifecycle(state: State, p: Params, action: &'static str) -> Result<Value, ApiError> {
    let (fleet, vm) = managed(&state, &p).await?;
    let force = p
        .non_empty("forced")
        .is_some_and(|v| v.eq_ignore_ascii_case("true"));
    let prefix = crate::fleet::event_prefix(vm.role);
    let lock = fleet_lock(&fleet, &vm.id);
    let _guard = lock.lock().await;
    match action {
        "start" => {
            crate::fleet::start_vm(&state, &fleet, &vm.id)
                .await
                .map_err(failed)?;
            crate::fleet::wait_up(&state, &vm.id, START_WAIT)
                .await
                .map_err(failed)?;
        }
        "stop" => crate::fleet::stop_vm(&state, &fleet, &vm, force, false)
            .await
            .map_err(failed)?,
        "reboot" => {
            crate::fleet::stop_vm(&state, &fleet, &vm, force, false)
                .await
                .map_err(failed)?;
            crate::fleet::start_vm(&state, &fleet, &vm.id)
                .await
                .map_err(failed)?;
            crate::fleet::wait_up(&state, &vm.id, START_WAIT)
                .await
                .map_err(failed)?;
        }
        _ => crate::fleet::stop_vm(&state, &fleet, &vm, force, true)
            .await
            .map_err(failed)?,
    }
    crate::fleet::event(
        &state,
        &format!("{prefix}.{}", action.to_ascii_uppercase()),
        "INFO",
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

fn fleet_lock(fleet: &crate::fleet::Fleet, id: &str) -> std::sync::Arc<tokio::sync::Mutex<()>> {
    fleet.lock(id)
}

/// `startSystemVm` (async).
pub async fn start_system_vm(state: State, _caller: Caller, p: Params) -> Result<Value, ApiError> {
    lifecycle(state, p, "start").await
}

/// `stopSystemVm` (async).
pub async fn stop_system_vm(state: State, _caller: Caller, p: Params) -> Result<Value, ApiError> {
    lifecycle(state, p, "stop").await
}

/// `rebootSystemVm` (async).
pub async fn reboot_system_vm(state: State, _caller: Caller, p: Params) -> Result<Value, ApiError> {
    lifecycle(state, p, "reboot").await
}

/// `destroySystemVm` (async).
pub async fn destroy_system_vm(state: State, _caller: Caller, p: Params) -> Result<Value, ApiError> {
    lifecycle(state, p, "destroy").await
}
