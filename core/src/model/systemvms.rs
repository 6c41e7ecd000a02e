//! System VMs: registration, typed lifecycle and agent states, what the agent endpoint records
//! (connections, heartbeats, loads, endpoints) and what the fleet manager reads and writes.
//!
//! Invariants:
//! * a system VM's secret is shown once, by the registration, and stored only as its SHA-256
//!   digest ([`crate::util::hash_secret`]);
//! * `state` is the lifecycle state core manages ([`VmState`]), `agent_state` the agent channel
//!   ([`AgentState`]); both are written only here, as their typed names;
//! * heartbeats are stamped with the database's clock, and "Up" for any reader (either core)
//!   means `agent_state = Up` and a heartbeat within `agent.heartbeat.timeout` of the database's
//!   clock: a row left `Up` by a core that died does not count.

use sqlx::Row as _;
use systemvm_proto::agent::{AgentRole, Load, StorageLoad};

use crate::db::Db;
use crate::model::{DomainError, DomainResult};
use crate::util::{hash_secret, new_uuid, now_cs, now_ms, random_token};

/// Lifecycle states (`state` in `listSystemVms`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmState {
    /// Being started; its agent is not Up yet.
    Starting,
    /// Its agent is Up.
    Running,
    /// Being stopped (or drained, before a scale-in).
    Stopping,
    /// Stopped.
    Stopped,
    /// Destroyed (kept for the record, not listed).
    Destroyed,
    /// Failed to start repeatedly.
    Error,
}

impl VmState {
    /// The stored and displayed name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Starting => "Starting",
            Self::Running => "Running",
            Self::Stopping => "Stopping",
            Self::Stopped => "Stopped",
            Self::Destroyed => "Destroyed",
            Self::Error => "Error",
        }
    }

    /// Parses a stored name; unknown names read as `Error` (a row this build can't explain).
    pub fn parse(s: &str) -> Self {
        match s {
            "Starting" => Self::Starting,
            "Running" => Self::Running,
            "Stopping" => Self::Stopping,
            "Stopped" => Self::Stopped,
            "Destroyed" => Self::Destroyed,
            _ => Self::Error,
        }
    }
}

/// The agent channel's state (`agentstate`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AgentState {
    /// Connected and heartbeating.
    Up,
    /// Otherwise.
    Disconnected,
}

impl AgentState {
    /// The stored and displayed name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Up => "Up",
            Self::Disconnected => "Disconnected",
        }
    }

    /// Parses a stored name.
    pub fn parse(s: &str) -> Self {
        if s == "Up" { Self::Up } else { Self::Disconnected }
    }
}

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
) -> DomainResult<Registered> {
    let zone_id = crate::model::resolve_zone(pool, zone_id).await?;
    let id = new_uuid().map_err(|e| DomainError::Internal(e.to_string()))?;
    let secret = random_token::<32>().map_err(|e| DomainError::Internal(e.to_string()))?;
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
    .bind(VmState::Starting.as_str())
    .bind(AgentState::Disconnected.as_str())
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
        Err(sqlx::Error::Database(d)) if d.is_unique_violation() => Err(DomainError::Invalid(format!(
            "A system VM with name {name} already exists"
        ))),
        Err(e) => Err(e.into()),
    }
}

/// A managed VM as the fleet manager reads it.
#[derive(Debug, Clone)]
pub struct ManagedVm {
    /// Id.
    pub id: String,
    /// Name.
    pub name: String,
    /// Role.
    pub role: AgentRole,
    /// Zone.
    pub zone_id: String,
    /// Lifecycle state.
    pub state: VmState,
    /// Agent state.
    pub agent_state: AgentState,
    /// What core keeps it at.
    pub desired: VmState,
    /// The process driver's process id.
    pub pid: Option<u32>,
    /// Last start (ms).
    pub started_ms: Option<i64>,
    /// Failed starts in a row.
    pub start_failures: i64,
    /// Since when a proxy has had no session (ms).
    pub idle_since_ms: Option<i64>,
    /// Last heartbeat (ms, database clock).
    pub last_heartbeat_ms: Option<i64>,
    /// Last reported load.
    pub load: Option<Load>,
    /// The driver spec it was started with.
    pub driver: Option<String>,
    /// Storage VMs: the image store it serves (`None`: the zone's first).
    pub store_id: Option<String>,
}

impl ManagedVm {
    /// Console sessions the proxy reported.
    pub fn sessions(&self) -> u64 {
        self.load
            .as_ref()
            .and_then(|l| l.console)
            .map_or(0, |c| c.active_sessions)
    }
}

const VM_SELECT: &str = "SELECT id, name, role, zone_id, state, agent_state, desired, pid, started_ms, start_failures, idle_since_ms, last_heartbeat_ms, last_load, driver, store_id FROM system_vms WHERE managed = 1 AND removed IS NULL";

fn managed_vm(row: &sqlx::any::AnyRow) -> Result<ManagedVm, sqlx::Error> {
    let role: String = row.try_get("role")?;
    Ok(ManagedVm {
        id: row.try_get("id")?,
        name: row.try_get("name")?,
        role: AgentRole::parse(&role).unwrap_or(AgentRole::ConsoleProxy),
        zone_id: row.try_get("zone_id")?,
        state: VmState::parse(&row.try_get::<String, _>("state")?),
        agent_state: AgentState::parse(&row.try_get::<String, _>("agent_state")?),
        desired: row
            .try_get::<Option<String>, _>("desired")?
            .map_or(VmState::Running, |d| VmState::parse(&d)),
        pid: row
            .try_get::<Option<i64>, _>("pid")?
            .and_then(|p| u32::try_from(p).ok()),
        started_ms: row.try_get("started_ms")?,
        start_failures: row.try_get("start_failures")?,
        idle_since_ms: row.try_get("idle_since_ms")?,
        last_heartbeat_ms: row.try_get("last_heartbeat_ms")?,
        load: row
            .try_get::<Option<String>, _>("last_load")?
            .and_then(|l| serde_json::from_str(&l).ok()),
        driver: row.try_get("driver")?,
        store_id: row.try_get("store_id")?,
    })
}

/// Managed VMs (not removed), optionally of one zone.
pub async fn managed(pool: &sqlx::AnyPool, zone: Option<&str>) -> Result<Vec<ManagedVm>, sqlx::Error> {
    let rows = match zone {
        Some(z) => {
            sqlx::query(&format!("{VM_SELECT} AND zone_id = $1 ORDER BY created, name"))
                .bind(z.to_owned())
                .fetch_all(pool)
                .await?
        }
        None => {
            sqlx::query(&format!("{VM_SELECT} ORDER BY created, name"))
                .fetch_all(pool)
                .await?
        }
    };
    rows.iter().map(managed_vm).collect()
}

/// One managed VM; `NotFound` or `Invalid` (registered by hand) otherwise.
pub async fn managed_one(pool: &sqlx::AnyPool, id: &str) -> DomainResult<ManagedVm> {
    if let Some(row) = sqlx::query(&format!("{VM_SELECT} AND id = $1"))
        .bind(id.to_owned())
        .fetch_optional(pool)
        .await?
    {
        return Ok(managed_vm(&row)?);
    }
    let exists: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM system_vms WHERE id = $1 AND removed IS NULL")
        .bind(id.to_owned())
        .fetch_one(pool)
        .await?;
    Err(if exists > 0 {
        DomainError::Invalid(format!(
            "System VM {id} was registered by hand; core does not start or stop it"
        ))
    } else {
        DomainError::NotFound(format!("Unable to find system VM by id {id}"))
    })
}

/// What starting a VM needs to know of it.
#[derive(Debug, Clone)]
pub struct StartInfo {
    /// Name.
    pub name: String,
    /// Role.
    pub role: AgentRole,
    /// Zone.
    pub zone_id: String,
    /// The process of the previous start, if any.
    pub pid: Option<u32>,
    /// The driver spec of the previous start.
    pub driver: Option<String>,
    /// The zone's driver spec (`zones.systemvm_driver`).
    pub zone_driver: Option<String>,
    /// Storage VMs: the image store it serves (`None`: the zone's first).
    pub store_id: Option<String>,
}

/// Reads what [`StartInfo`] holds; `None` for an unknown or removed VM.
pub async fn start_info(pool: &sqlx::AnyPool, id: &str) -> Result<Option<StartInfo>, sqlx::Error> {
    let Some(row) = sqlx::query(
        "SELECT s.name, s.role, s.zone_id, s.pid, s.driver, s.store_id, z.systemvm_driver FROM system_vms s JOIN zones z ON z.id = s.zone_id WHERE s.id = $1 AND s.removed IS NULL",
    )
    .bind(id.to_owned())
    .fetch_optional(pool)
    .await?
    else {
        return Ok(None);
    };
    let role: String = row.try_get("role")?;
    Ok(Some(StartInfo {
        name: row.try_get("name")?,
        role: AgentRole::parse(&role).unwrap_or(AgentRole::ConsoleProxy),
        zone_id: row.try_get("zone_id")?,
        pid: row
            .try_get::<Option<i64>, _>("pid")?
            .and_then(|p| u32::try_from(p).ok()),
        driver: row.try_get("driver")?,
        zone_driver: row.try_get("systemvm_driver")?,
        store_id: row.try_get("store_id")?,
    }))
}

async fn exec<'q>(
    q: sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>>,
    pool: &sqlx::AnyPool,
) -> Result<u64, sqlx::Error> {
    q.execute(pool).await.map(|r| r.rows_affected())
}

/// Sets a VM's lifecycle state.
pub async fn set_state(pool: &sqlx::AnyPool, id: &str, s: VmState) -> Result<(), sqlx::Error> {
    exec(
        sqlx::query("UPDATE system_vms SET state = $1 WHERE id = $2")
            .bind(s.as_str())
            .bind(id.to_owned()),
        pool,
    )
    .await
    .map(|_| ())
}

/// A (re)start begins: new secret digest, `Starting`, wanted `Running`, on `driver`.
pub async fn mark_starting(
    pool: &sqlx::AnyPool,
    id: &str,
    secret: &str,
    driver: &str,
) -> Result<(), sqlx::Error> {
    exec(
        sqlx::query(
            "UPDATE system_vms SET secret_hash = $1, state = $2, desired = $3, driver = $4, started_ms = $5, idle_since_ms = NULL, pid = NULL WHERE id = $6",
        )
        .bind(hash_secret(secret))
        .bind(VmState::Starting.as_str())
        .bind(VmState::Running.as_str())
        .bind(driver.to_owned())
        .bind(now_ms())
        .bind(id.to_owned()),
        pool,
    )
    .await
    .map(|_| ())
}

/// Records the process of a start.
pub async fn set_pid(pool: &sqlx::AnyPool, id: &str, pid: Option<u32>) -> Result<(), sqlx::Error> {
    exec(
        sqlx::query("UPDATE system_vms SET pid = $1 WHERE id = $2")
            .bind(pid.map(i64::from))
            .bind(id.to_owned()),
        pool,
    )
    .await
    .map(|_| ())
}

/// A start failed at the driver: `Error`, one more failure.
pub async fn mark_start_failed(pool: &sqlx::AnyPool, id: &str) -> Result<(), sqlx::Error> {
    exec(
        sqlx::query("UPDATE system_vms SET state = $1, start_failures = start_failures + 1 WHERE id = $2")
            .bind(VmState::Error.as_str())
            .bind(id.to_owned()),
        pool,
    )
    .await
    .map(|_| ())
}

/// Counts one more failed start.
pub async fn add_start_failure(pool: &sqlx::AnyPool, id: &str) -> Result<(), sqlx::Error> {
    exec(
        sqlx::query("UPDATE system_vms SET start_failures = start_failures + 1 WHERE id = $1")
            .bind(id.to_owned()),
        pool,
    )
    .await
    .map(|_| ())
}

/// Forgets failed starts (a retry of a VM in `Error`).
pub async fn reset_start_failures(pool: &sqlx::AnyPool, id: &str) -> Result<(), sqlx::Error> {
    exec(
        sqlx::query("UPDATE system_vms SET start_failures = 0 WHERE id = $1").bind(id.to_owned()),
        pool,
    )
    .await
    .map(|_| ())
}

/// The agent came Up after a start: `Running`, no failures.
pub async fn mark_running(pool: &sqlx::AnyPool, id: &str) -> Result<(), sqlx::Error> {
    exec(
        sqlx::query("UPDATE system_vms SET state = $1, start_failures = 0 WHERE id = $2")
            .bind(VmState::Running.as_str())
            .bind(id.to_owned()),
        pool,
    )
    .await
    .map(|_| ())
}

/// A stop begins: `Stopping`, wanted `desired` (`Stopped` or `Destroyed`).
pub async fn mark_stopping(pool: &sqlx::AnyPool, id: &str, desired: VmState) -> Result<(), sqlx::Error> {
    exec(
        sqlx::query("UPDATE system_vms SET desired = $1, state = $2 WHERE id = $3")
            .bind(desired.as_str())
            .bind(VmState::Stopping.as_str())
            .bind(id.to_owned()),
        pool,
    )
    .await
    .map(|_| ())
}

/// A stop ended: `Stopped`, or `Destroyed` and removed.
pub async fn mark_stopped(pool: &sqlx::AnyPool, id: &str, destroyed: bool) -> Result<(), sqlx::Error> {
    let state = if destroyed {
        VmState::Destroyed
    } else {
        VmState::Stopped
    };
    exec(
        sqlx::query(
            "UPDATE system_vms SET state = $1, pid = NULL, agent_state = $2, removed = CASE WHEN $3 = 1 THEN $4 ELSE removed END WHERE id = $5",
        )
        .bind(state.as_str())
        .bind(AgentState::Disconnected.as_str())
        .bind(i64::from(destroyed))
        .bind(now_cs())
        .bind(id.to_owned()),
        pool,
    )
    .await
    .map(|_| ())
}

/// Core's processes of its VMs were stopped with core (`up` on Ctrl-C, tests): `Stopped`, still
/// wanted `Running`, so the next start of core starts them again as a start, not a crash.
pub async fn mark_stopped_with_core(pool: &sqlx::AnyPool, id: &str) -> Result<(), sqlx::Error> {
    exec(
        sqlx::query("UPDATE system_vms SET state = $1, pid = NULL, agent_state = $2 WHERE id = $3")
            .bind(VmState::Stopped.as_str())
            .bind(AgentState::Disconnected.as_str())
            .bind(id.to_owned()),
        pool,
    )
    .await
    .map(|_| ())
}

/// A registered VM becomes managed by `driver`, wanted `Running`.
pub async fn make_managed(pool: &sqlx::AnyPool, id: &str, driver: &str) -> Result<(), sqlx::Error> {
    exec(
        sqlx::query("UPDATE system_vms SET managed = 1, desired = $1, driver = $2 WHERE id = $3")
            .bind(VmState::Running.as_str())
            .bind(driver.to_owned())
            .bind(id.to_owned()),
        pool,
    )
    .await
    .map(|_| ())
}

/// The image store a storage VM serves.
pub async fn set_store(pool: &sqlx::AnyPool, id: &str, store_id: &str) -> Result<(), sqlx::Error> {
    exec(
        sqlx::query("UPDATE system_vms SET store_id = $1 WHERE id = $2")
            .bind(store_id.to_owned())
            .bind(id.to_owned()),
        pool,
    )
    .await
    .map(|_| ())
}

/// Since when a proxy has had no session (`None`: it has sessions).
pub async fn set_idle_since(pool: &sqlx::AnyPool, id: &str, since: Option<i64>) -> Result<(), sqlx::Error> {
    exec(
        sqlx::query("UPDATE system_vms SET idle_since_ms = $1 WHERE id = $2")
            .bind(since)
            .bind(id.to_owned()),
        pool,
    )
    .await
    .map(|_| ())
}

/// Scale-in: the proxy drains (`Stopping`, wanted `Destroyed`) from `now`.
pub async fn begin_drain(pool: &sqlx::AnyPool, id: &str, now: i64) -> Result<(), sqlx::Error> {
    exec(
        sqlx::query("UPDATE system_vms SET desired = $1, state = $2, idle_since_ms = $3 WHERE id = $4")
            .bind(VmState::Destroyed.as_str())
            .bind(VmState::Stopping.as_str())
            .bind(now)
            .bind(id.to_owned()),
        pool,
    )
    .await
    .map(|_| ())
}

/// A session arrived while draining: the proxy serves again.
pub async fn cancel_drain(pool: &sqlx::AnyPool, id: &str) -> Result<(), sqlx::Error> {
    exec(
        sqlx::query("UPDATE system_vms SET desired = $1, state = $2, idle_since_ms = NULL WHERE id = $3")
            .bind(VmState::Running.as_str())
            .bind(VmState::Running.as_str())
            .bind(id.to_owned()),
        pool,
    )
    .await
    .map(|_| ())
}

/// The lifecycle and agent state of a VM; `None` when unknown.
pub async fn status(pool: &sqlx::AnyPool, id: &str) -> Result<Option<(VmState, AgentState)>, sqlx::Error> {
    let row: Option<(String, String)> =
        sqlx::query_as("SELECT state, agent_state FROM system_vms WHERE id = $1")
            .bind(id.to_owned())
            .fetch_optional(pool)
            .await?;
    Ok(row.map(|(s, a)| (VmState::parse(&s), AgentState::parse(&a))))
}

/// The registered role and secret digest of a VM that is not removed (the agent's `Hello`).
pub async fn credentials(
    pool: &sqlx::AnyPool,
    id: &str,
) -> Result<Option<(String, String, String)>, sqlx::Error> {
    sqlx::query_as("SELECT role, secret_hash, zone_id FROM system_vms WHERE id = $1 AND removed IS NULL")
        .bind(id.to_owned())
        .fetch_optional(pool)
        .await
}

/// A connection or heartbeat of the agent: `Up`, heard now (database clock), with what it said.
pub async fn mark_up(
    db: &Db,
    id: &str,
    software_version: Option<&str>,
    load: Option<&Load>,
) -> Result<(), sqlx::Error> {
    let load = load.and_then(|l| serde_json::to_string(l).ok());
    exec(
        sqlx::query(&format!(
            "UPDATE system_vms SET agent_state = $1, last_heartbeat_ms = {}, software_version = COALESCE($2, software_version), last_load = COALESCE($3, last_load) WHERE id = $4",
            db.now_ms_sql()
        ))
        .bind(AgentState::Up.as_str())
        .bind(software_version.map(str::to_owned))
        .bind(load)
        .bind(id.to_owned()),
        &db.pool,
    )
    .await
    .map(|_| ())
}

/// The URL browsers reach an agent at (`Hello.endpoint`): a console proxy's, or a storage VM's
/// transfer server; empty clears it (a storage VM now without one).
pub async fn set_endpoint(pool: &sqlx::AnyPool, id: &str, endpoint: &str) -> Result<(), sqlx::Error> {
    exec(
        sqlx::query("UPDATE system_vms SET endpoint = $1 WHERE id = $2")
            .bind((!endpoint.is_empty()).then(|| endpoint.to_owned()))
            .bind(id.to_owned()),
        pool,
    )
    .await
    .map(|_| ())
}

/// The agent's current connection ended.
pub async fn mark_disconnected(pool: &sqlx::AnyPool, id: &str) -> Result<(), sqlx::Error> {
    exec(
        sqlx::query("UPDATE system_vms SET agent_state = $1, disconnected = $2 WHERE id = $3")
            .bind(AgentState::Disconnected.as_str())
            .bind(now_cs())
            .bind(id.to_owned()),
        pool,
    )
    .await
    .map(|_| ())
}

/// Marks agents silent for more than `timeout_ms` (database clock) `Disconnected`; returns how many.
pub async fn sweep_silent(db: &Db, timeout_ms: i64) -> Result<u64, sqlx::Error> {
    exec(
        sqlx::query(&format!(
            "UPDATE system_vms SET agent_state = $1, disconnected = $2 WHERE agent_state = $3 AND (last_heartbeat_ms IS NULL OR last_heartbeat_ms < {} - $4)",
            db.now_ms_sql()
        ))
        .bind(AgentState::Disconnected.as_str())
        .bind(now_cs())
        .bind(AgentState::Up.as_str())
        .bind(timeout_ms),
        &db.pool,
    )
    .await
}

/// The `WHERE` part "the agent is Up and heard within `timeout_ms`" (database clock); binds
/// nothing: `$up` and `$timeout` are the placeholders to bind.
fn up_clause(db: &Db, up: usize, timeout: usize) -> String {
    format!(
        "agent_state = ${up} AND last_heartbeat_ms >= {} - ${timeout}",
        db.now_ms_sql()
    )
}

/// What an Up storage VM reports, from its last heartbeat.
#[derive(Debug, Clone)]
pub struct StorageAgent {
    /// System VM id.
    pub id: String,
    /// Zone.
    pub zone_id: String,
    /// Its storage load.
    pub load: StorageLoad,
}

/// Storage VMs whose agent is Up (heard within `timeout_ms`), with their last reported load.
pub async fn storage_agents(db: &Db, timeout_ms: i64) -> Result<Vec<StorageAgent>, sqlx::Error> {
    let rows = sqlx::query(&format!(
        "SELECT id, zone_id, last_load FROM system_vms WHERE role = $1 AND removed IS NULL AND {} ORDER BY name",
        up_clause(db, 2, 3)
    ))
    .bind(AgentRole::SecStorage.as_str())
    .bind(AgentState::Up.as_str())
    .bind(timeout_ms)
    .fetch_all(&db.pool)
    .await?;
    let mut out = Vec::new();
    for row in rows {
        let load: Option<Load> = row
            .try_get::<Option<String>, _>("last_load")?
            .and_then(|l| serde_json::from_str(&l).ok());
        if let Some(storage) = load.and_then(|l| l.storage) {
            out.push(StorageAgent {
                id: row.try_get("id")?,
                zone_id: row.try_get("zone_id")?,
                load: storage,
            });
        }
    }
    Ok(out)
}

/// A console proxy that can take a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyCandidate {
    /// System VM id.
    pub id: String,
    /// Base URL browsers reach it at.
    pub endpoint: String,
    /// Open sessions.
    pub active: u64,
    /// Most sessions (0: unknown).
    pub max: u64,
}

/// Console proxies of `zone_id` that are Up (heard within `timeout_ms`), not draining, and
/// reported an endpoint: read from the database, so either core can choose.
pub async fn proxy_candidates(
    db: &Db,
    zone_id: &str,
    timeout_ms: i64,
) -> Result<Vec<ProxyCandidate>, sqlx::Error> {
    let rows = sqlx::query(&format!(
        "SELECT id, endpoint, last_load FROM system_vms WHERE role = $1 AND zone_id = $4 AND endpoint IS NOT NULL AND removed IS NULL AND state <> $5 AND {} ORDER BY name",
        up_clause(db, 2, 3)
    ))
    .bind(AgentRole::ConsoleProxy.as_str())
    .bind(AgentState::Up.as_str())
    .bind(timeout_ms)
    .bind(zone_id.to_owned())
    .bind(VmState::Stopping.as_str())
    .fetch_all(&db.pool)
    .await?;
    let mut out = Vec::new();
    for row in rows {
        let load = row
            .try_get::<Option<String>, _>("last_load")?
            .and_then(|l| serde_json::from_str::<Load>(&l).ok())
            .and_then(|l| l.console)
            .unwrap_or_default();
        out.push(ProxyCandidate {
            id: row.try_get("id")?,
            endpoint: row.try_get("endpoint")?,
            active: load.active_sessions,
            max: load.max_sessions,
        });
    }
    Ok(out)
}

/// Removes the records of zone `zone_id`'s destroyed system VMs (the zone is being deleted);
/// returns how many.
pub async fn purge_destroyed(conn: &mut sqlx::AnyConnection, zone_id: &str) -> Result<u64, sqlx::Error> {
    sqlx::query("DELETE FROM system_vms WHERE zone_id = $1 AND removed IS NOT NULL")
        .bind(zone_id.to_owned())
        .execute(conn)
        .await
        .map(|r| r.rows_affected())
}

/// Zones and their system VM driver spec.
pub async fn zone_drivers(pool: &sqlx::AnyPool) -> Result<Vec<(String, Option<String>)>, sqlx::Error> {
    sqlx::query_as("SELECT id, systemvm_driver FROM zones ORDER BY created")
        .fetch_all(pool)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_round_trip() {
        for s in [
            VmState::Starting,
            VmState::Running,
            VmState::Stopping,
            VmState::Stopped,
            VmState::Destroyed,
            VmState::Error,
        ] {
            assert_eq!(VmState::parse(s.as_str()), s);
        }
        assert_eq!(VmState::parse("Bogus"), VmState::Error);
        assert_eq!(AgentState::parse("Up"), AgentState::Up);
        assert_eq!(AgentState::parse("x"), AgentState::Disconnected);
    }
}
