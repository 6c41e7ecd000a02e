//! The fleet manager: core deploys, watches, restarts and scales its system VMs through a
//! [`Driver`], and records every decision as an event (`listEvents`).
//!
//! Each second, on the core that holds the leader lease ([`lease`]):
//! * **health** — a managed VM core wants Running is restarted when its process/domain is gone,
//!   when its agent stopped heartbeating (`agent.heartbeat.timeout`), or when it did not come Up
//!   within [`START_TIMEOUT`]; after [`MAX_START_FAILURES`] failed starts in a row it is put in
//!   `Error` and retried every [`ERROR_RETRY`];
//! * **policy** — per zone: one storage VM once the zone has an image store, at least one console
//!   proxy, one more when `proxies × consoleproxy.session.max − sessions ≤
//!   consoleproxy.capacity.standby` (CloudStack's rule, capped by `consoleproxy.launch.max`), and,
//!   unlike CloudStack, one fewer when a proxy has been idle for `consoleproxy.scalein.idle` and
//!   the others still leave more than the standby capacity ([`decide`]).
//!
//! Invariants:
//! * no live session is cut by scale-in: a proxy is drained first (state `Stopping`: no new links
//!   go to it), and destroyed only when it reports no session and has had no session claim for
//!   [`DRAIN_QUIET`]; a session that shows up meanwhile cancels the drain;
//! * no flapping: scaling in leaves capacity strictly above the standby (scaling out starts at or
//!   below it), and scale decisions in a zone are at least `consoleproxy.scale.cooldown` apart;
//! * each (re)start issues the VM a new secret (only its digest is stored), so a stale process
//!   of an earlier start cannot dial in;
//! * one operation per VM at a time (per-VM lock shared by the manager and the lifecycle API).

pub mod driver;
pub mod lease;
pub mod libvirt;
pub mod process;
pub mod qemu;
pub mod seed;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use serde_json::Value;
use sqlx::Row as _;
use systemvm_proto::Secret;
use systemvm_proto::agent::{AgentRole, Load};
use tokio::sync::watch;

pub use driver::{Driver, DriverError, Placement, VmSpec, VmState, VncEndpoint};

use crate::agent::{UP, hash_secret, now_ms};
use crate::api::systemvms;
use crate::state::State;
use crate::util::{new_uuid, now_cs, random_token};

/// How often the manager looks at the fleet.
pub const TICK: Duration = Duration::from_secs(1);
/// Time a started VM has to come Up before it is restarted.
pub const START_TIMEOUT: Duration = Duration::from_secs(60);
/// Failed starts in a row before a VM goes to `Error`.
pub const MAX_START_FAILURES: i64 = 3;
/// How often a VM in `Error` is tried again.
pub const ERROR_RETRY: Duration = Duration::from_secs(60);
/// Extra time agents get to reach a core that just took the lease over (ms).
pub const TAKEOVER_GRACE_MS: i64 = 30_000;
/// A draining proxy is destroyed only after this long without sessions or claims.
pub const DRAIN_QUIET: Duration = Duration::from_secs(5);

/// Lifecycle states (`state` in `listSystemVms`).
pub mod vm_state {
    /// Being started; its agent is not Up yet.
    pub const STARTING: &str = "Starting";
    /// Its agent is Up.
    pub const RUNNING: &str = "Running";
    /// Being stopped (or drained, before a scale-in).
    pub const STOPPING: &str = "Stopping";
    /// Stopped.
    pub const STOPPED: &str = "Stopped";
    /// Destroyed (kept for the record, not listed).
    pub const DESTROYED: &str = "Destroyed";
    /// Failed to start repeatedly.
    pub const ERROR: &str = "Error";
}

/// The fleet manager's fixed inputs.
#[derive(Debug)]
pub struct Fleet {
    /// The driver that runs the VMs.
    pub driver: Arc<dyn Driver>,
    /// Agent endpoint URLs the VMs are given (`--core`).
    pub core_urls: Vec<String>,
    /// Core's CA certificate (`--ca`).
    pub ca: std::path::PathBuf,
    /// What image drivers of zones (`libvirt:URI`) boot, and memory per VM; `None`: zones can't
    /// have their own libvirt host.
    pub zone_boot: Option<(qemu::Boot, u32)>,
    /// Where zone drivers keep per-VM files.
    pub vm_root: std::path::PathBuf,
    zone_drivers: std::sync::Mutex<HashMap<String, Arc<dyn Driver>>>,
    locks: std::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    last_scale_ms: std::sync::Mutex<HashMap<String, i64>>,
    /// When this core last became the leader (ms): agents get time to move over before their
    /// silence counts against them.
    leader_since_ms: std::sync::atomic::AtomicI64,
}

impl Fleet {
    /// A fleet run by `driver`.
    pub fn new(driver: Arc<dyn Driver>, core_urls: Vec<String>, ca: std::path::PathBuf) -> Self {
        Self {
            driver,
            core_urls,
            ca,
            zone_boot: None,
            vm_root: std::path::PathBuf::new(),
            zone_drivers: std::sync::Mutex::default(),
            locks: std::sync::Mutex::default(),
            last_scale_ms: std::sync::Mutex::default(),
            leader_since_ms: std::sync::atomic::AtomicI64::new(0),
        }
    }

    /// The driver a spec names (`system_vms.driver`, `zones.systemvm_driver`): core's own driver
    /// for its name or an empty/absent spec, a libvirt host for `libvirt:URI` (when image boot is
    /// configured); `None` for `none` or an unusable spec.
    pub fn driver_for(&self, spec: Option<&str>) -> Option<Arc<dyn Driver>> {
        match spec.map(str::trim).filter(|s| !s.is_empty()) {
            None => Some(self.driver.clone()),
            Some(s) if s == self.driver.name() => Some(self.driver.clone()),
            Some(s) => {
                let uri = s.strip_prefix("libvirt:")?;
                let (boot, memory_mib) = self.zone_boot.clone()?;
                let mut cache = self
                    .zone_drivers
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                let d = cache.entry(s.to_owned()).or_insert_with(|| {
                    Arc::new(libvirt::LibvirtDriver {
                        uri: uri.to_owned(),
                        vm_root: self.vm_root.clone(),
                        boot,
                        memory_mib,
                    })
                });
                Some(d.clone())
            }
        }
    }

    /// The spec stored for a VM started by `driver_for(zone_spec)`.
    fn spec_of(&self, zone_spec: Option<&str>) -> String {
        match zone_spec.map(str::trim).filter(|s| !s.is_empty()) {
            Some(s) if s.starts_with("libvirt:") => s.to_owned(),
            _ => self.driver.name().to_owned(),
        }
    }

    /// The lock serialising operations on one VM.
    pub fn lock(&self, vm_id: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.lock_of(vm_id)
    }

    fn lock_of(&self, vm_id: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.locks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry(vm_id.to_owned())
            .or_default()
            .clone()
    }
}

/// Records an event (`listEvents`) and logs it.
pub async fn event(
    state: &State,
    kind: &str,
    level: &str,
    description: &str,
    resource: Option<&str>,
    zone: Option<&str>,
) {
    if level == "ERROR" || level == "WARN" {
        tracing::warn!(event = kind, resource, %description, "Fleet event");
    } else {
        tracing::info!(event = kind, resource, %description, "Fleet event");
    }
    let Ok(id) = new_uuid() else { return };
    let r = sqlx::query(
        "INSERT INTO events (id, type, level, description, resource_id, zone_id, created, created_ms) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
    )
    .bind(id)
    .bind(kind.to_owned())
    .bind(level.to_owned())
    .bind(description.to_owned())
    .bind(resource.map(str::to_owned))
    .bind(zone.map(str::to_owned))
    .bind(now_cs())
    .bind(now_ms())
    .execute(&state.db.pool)
    .await;
    if let Err(error) = r {
        tracing::error!(%error, "Failed to record an event");
    }
}

/// CloudStack's event type prefix of a role (`PROXY`, `SSVM`).
pub fn event_prefix(role: AgentRole) -> &'static str {
    match role {
        AgentRole::ConsoleProxy => "PROXY",
        AgentRole::SecStorage => "SSVM",
    }
}

/// A managed VM as the manager reads it.
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
    pub state: String,
    /// Agent state.
    pub agent_state: String,
    /// What core keeps it at.
    pub desired: String,
    /// Driver handle.
    pub placement: Placement,
    /// Last start (ms).
    pub started_ms: Option<i64>,
    /// Failed starts in a row.
    pub start_failures: i64,
    /// Since when a proxy has had no session (ms).
    pub idle_since_ms: Option<i64>,
    /// Last heartbeat (ms).
    pub last_heartbeat_ms: Option<i64>,
    /// Last reported load.
    pub load: Option<Load>,
    /// The driver spec it was started with.
    pub driver: Option<String>,
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

const VM_SELECT: &str = "SELECT id, name, role, zone_id, state, agent_state, desired, pid, started_ms, start_failures, idle_since_ms, last_heartbeat_ms, last_load, driver FROM system_vms WHERE managed = 1 AND removed IS NULL";

fn managed_vm(row: &sqlx::any::AnyRow) -> Result<ManagedVm, sqlx::Error> {
    let role: String = row.try_get("role")?;
    Ok(ManagedVm {
        id: row.try_get("id")?,
        name: row.try_get("name")?,
        role: AgentRole::parse(&role).unwrap_or(AgentRole::ConsoleProxy),
        zone_id: row.try_get("zone_id")?,
        state: row.try_get("state")?,
        agent_state: row.try_get("agent_state")?,
        desired: row
            .try_get::<Option<String>, _>("desired")?
            .unwrap_or_else(|| vm_state::RUNNING.to_owned()),
        placement: Placement {
            pid: row
                .try_get::<Option<i64>, _>("pid")?
                .and_then(|p| u32::try_from(p).ok()),
        },
        started_ms: row.try_get("started_ms")?,
        start_failures: row.try_get("start_failures")?,
        idle_since_ms: row.try_get("idle_since_ms")?,
        last_heartbeat_ms: row.try_get("last_heartbeat_ms")?,
        load: row
            .try_get::<Option<String>, _>("last_load")?
            .and_then(|l| serde_json::from_str(&l).ok()),
        driver: row.try_get("driver")?,
    })
}

/// Managed VMs (not removed), optionally of one zone.
pub async fn managed_vms(state: &State, zone: Option<&str>) -> Result<Vec<ManagedVm>, sqlx::Error> {
    let rows = match zone {
        Some(z) => {
            sqlx::query(&format!("{VM_SELECT} AND zone_id = $1 ORDER BY created, name"))
                .bind(z.to_owned())
                .fetch_all(&state.db.pool)
                .await?
        }
        None => {
            sqlx::query(&format!("{VM_SELECT} ORDER BY created, name"))
                .fetch_all(&state.db.pool)
                .await?
        }
    };
    rows.iter().map(managed_vm).collect()
}

async fn set_state(state: &State, id: &str, vm_state: &str) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE system_vms SET state = $1 WHERE id = $2")
        .bind(vm_state.to_owned())
        .bind(id.to_owned())
        .execute(&state.db.pool)
        .await
        .map(|_| ())
}

async fn setting_u64(state: &State, name: &str, default: u64) -> u64 {
    state.setting(name).await.parse().unwrap_or(default)
}

/// A numeric setting as it applies in `zone` (its own value, else the global one).
async fn zone_u64(state: &State, zone: &str, name: &str, default: u64) -> u64 {
    crate::api::configs::zone_value(state, zone, name)
        .await
        .parse()
        .unwrap_or(default)
}

/// Starts (or restarts) a managed VM with a fresh secret; the VM is `Starting` until its agent is Up.
pub async fn start_vm(state: &State, fleet: &Fleet, id: &str) -> Result<(), String> {
    let row =
        sqlx::query("SELECT s.name, s.role, s.zone_id, s.pid, s.driver, z.systemvm_driver FROM system_vms s JOIN zones z ON z.id = s.zone_id WHERE s.id = $1 AND s.removed IS NULL")
            .bind(id.to_owned())
            .fetch_optional(&state.db.pool)
            .await
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("system VM {id} not found"))?;
    let name: String = row.try_get("name").map_err(|e| e.to_string())?;
    let role_text: String = row.try_get("role").map_err(|e| e.to_string())?;
    let role = AgentRole::parse(&role_text).ok_or_else(|| format!("unknown role {role_text}"))?;
    let zone_id: String = row.try_get("zone_id").map_err(|e| e.to_string())?;
    let old = Placement {
        pid: row
            .try_get::<Option<i64>, _>("pid")
            .ok()
            .flatten()
            .and_then(|p| u32::try_from(p).ok()),
    };
    // Whatever ran before goes first (a stale process must not hold the VM's place).
    let previous: Option<String> = row.try_get("driver").map_err(|e| e.to_string())?;
    if let Some(d) = fleet.driver_for(previous.as_deref()) {
        let _ = d.stop(id, &old, true).await;
    }
    let zone_spec: Option<String> = row.try_get("systemvm_driver").map_err(|e| e.to_string())?;
    let driver = fleet
        .driver_for(zone_spec.as_deref())
        .ok_or_else(|| format!("zone {zone_id} has no usable system VM driver ({zone_spec:?})"))?;
    let driver_spec = fleet.spec_of(zone_spec.as_deref());
    let store_url: Option<String> = match role {
        AgentRole::SecStorage => {
            let url: Option<String> = sqlx::query_scalar(
                "SELECT url FROM image_stores WHERE zone_id = $1 ORDER BY created, name LIMIT 1",
            )
            .bind(zone_id.clone())
            .fetch_optional(&state.db.pool)
            .await
            .map_err(|e| e.to_string())?;
            Some(url.ok_or_else(|| format!("zone {zone_id} has no image store for the storage VM"))?)
        }
        AgentRole::ConsoleProxy => None,
    };
    let secret = random_token::<32>().map_err(|e| e.to_string())?;
    let allow_internal =
        crate::api::configs::zone_value(state, &zone_id, "secstorage.allowed.internal.sites")
            .await
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect();
    let spec = VmSpec {
        id: id.to_owned(),
        name: name.clone(),
        role,
        zone_id: zone_id.clone(),
        secret: Secret(secret.clone()),
        core_urls: fleet.core_urls.clone(),
        ca: fleet.ca.clone(),
        store_url,
        allow_internal,
        max_sessions: zone_u64(state, &zone_id, "consoleproxy.session.max", 50).await,
    };
    sqlx::query(
        "UPDATE system_vms SET secret_hash = $1, state = $2, desired = $3, driver = $4, started_ms = $5, idle_since_ms = NULL, pid = NULL WHERE id = $6",
    )
    .bind(hash_secret(&secret))
    .bind(vm_state::STARTING)
    .bind(vm_state::RUNNING)
    .bind(driver_spec.clone())
    .bind(now_ms())
    .bind(id.to_owned())
    .execute(&state.db.pool)
    .await
    .map_err(|e| e.to_string())?;
    match driver.start(&spec).await {
        Ok(p) => {
            sqlx::query("UPDATE system_vms SET pid = $1 WHERE id = $2")
                .bind(p.pid.map(i64::from))
                .bind(id.to_owned())
                .execute(&state.db.pool)
                .await
                .map_err(|e| e.to_string())?;
            Ok(())
        }
        Err(e) => {
            let reason = e.to_string();
            let _ = sqlx::query(
                "UPDATE system_vms SET state = $1, start_failures = start_failures + 1 WHERE id = $2",
            )
            .bind(vm_state::ERROR)
            .bind(id.to_owned())
            .execute(&state.db.pool)
            .await;
            event(
                state,
                &format!("{}.START", event_prefix(role)),
                "ERROR",
                &format!("{name} failed to start: {reason}"),
                Some(id),
                Some(&zone_id),
            )
            .await;
            Err(reason)
        }
    }
}

/// Stops a managed VM and records it `Stopped` (or removes it, for `destroy`).
pub async fn stop_vm(
    state: &State,
    fleet: &Fleet,
    vm: &ManagedVm,
    force: bool,
    destroy: bool,
) -> Result<(), String> {
    let desired = if destroy {
        vm_state::DESTROYED
    } else {
        vm_state::STOPPED
    };
    sqlx::query("UPDATE system_vms SET desired = $1, state = $2 WHERE id = $3")
        .bind(desired)
        .bind(vm_state::STOPPING)
        .bind(vm.id.clone())
        .execute(&state.db.pool)
        .await
        .map_err(|e| e.to_string())?;
    let driver = fleet
        .driver_for(vm.driver.as_deref())
        .ok_or_else(|| format!("the driver {:?} of {} is not available", vm.driver, vm.name))?;
    driver
        .stop(&vm.id, &vm.placement, force)
        .await
        .map_err(|e| e.to_string())?;
    if destroy {
        driver.destroy(&vm.id).await.map_err(|e| e.to_string())?;
    }
    let final_state = if destroy {
        vm_state::DESTROYED
    } else {
        vm_state::STOPPED
    };
    sqlx::query(
        "UPDATE system_vms SET state = $1, pid = NULL, agent_state = 'Disconnected', removed = CASE WHEN $2 = 1 THEN $3 ELSE removed END WHERE id = $4",
    )
    .bind(final_state)
    .bind(i64::from(destroy))
    .bind(now_cs())
    .bind(vm.id.clone())
    .execute(&state.db.pool)
    .await
    .map_err(|e| e.to_string())?;
    Ok(())
}

/// Creates a managed VM of `role` in `zone` and starts it.
pub async fn create_vm(
    state: &State,
    fleet: &Fleet,
    zone: &str,
    role: AgentRole,
    why: &str,
) -> Result<String, String> {
    let r = systemvms::register(&state.db.pool, role, Some(zone), None)
        .await
        .map_err(|e| e.text)?;
    sqlx::query("UPDATE system_vms SET managed = 1, desired = $1, driver = $2 WHERE id = $3")
        .bind(vm_state::RUNNING)
        .bind(fleet.driver.name())
        .bind(r.id.clone())
        .execute(&state.db.pool)
        .await
        .map_err(|e| e.to_string())?;
    event(
        state,
        &format!("{}.CREATE", event_prefix(role)),
        "INFO",
        &format!("Created {} ({why})", r.name),
        Some(&r.id),
        Some(zone),
    )
    .await;
    start_vm(state, fleet, &r.id).await?;
    Ok(r.id)
}

/// Waits until the VM's agent is Up (after a start); `Err` with the VM's state on timeout.
pub async fn wait_up(state: &State, id: &str, within: Duration) -> Result<(), String> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let row = sqlx::query("SELECT state, agent_state FROM system_vms WHERE id = $1")
            .bind(id.to_owned())
            .fetch_optional(&state.db.pool)
            .await
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("system VM {id} not found"))?;
        let agent: String = row.try_get("agent_state").map_err(|e| e.to_string())?;
        let vm: String = row.try_get("state").map_err(|e| e.to_string())?;
        if agent == UP && state.agents.connection(id).is_some() {
            if vm != vm_state::RUNNING {
                set_state(state, id, vm_state::RUNNING)
                    .await
                    .map_err(|e| e.to_string())?;
            }
            return Ok(());
        }
        if vm == vm_state::ERROR {
            return Err(format!("system VM {id} failed to start"));
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(format!(
                "system VM {id} did not come Up within {}s (state {vm}, agent {agent})",
                within.as_secs()
            ));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A console proxy as the scaling rule sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyView {
    /// Id.
    pub id: String,
    /// Its agent is Up and it takes sessions.
    pub running: bool,
    /// Being drained for scale-in.
    pub draining: bool,
    /// Open sessions.
    pub sessions: u64,
    /// Seconds it has had no session (`None`: it has sessions).
    pub idle_secs: Option<u64>,
}

/// Scaling settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScaleRule {
    /// `consoleproxy.session.max`.
    pub session_max: u64,
    /// `consoleproxy.capacity.standby`.
    pub standby: u64,
    /// `consoleproxy.launch.max`.
    pub launch_max: u64,
    /// `consoleproxy.scalein.idle`: seconds a proxy must be idle before it is drained.
    pub idle_secs: u64,
    /// `consoleproxy.scale.cooldown`: seconds between scale decisions in a zone.
    pub cooldown_secs: u64,
}

/// What to do with a zone's console proxies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Nothing.
    Hold,
    /// Start one more proxy.
    ScaleOut,
    /// Drain this proxy, then destroy it.
    ScaleIn(String),
}

/// CloudStack's scale-out rule plus scale-in with hysteresis (see the module documentation).
/// `since_last_scale_secs` is `None` when the zone never scaled.
pub fn decide(proxies: &[ProxyView], rule: &ScaleRule, since_last_scale_secs: Option<u64>) -> Decision {
    let serving: Vec<&ProxyView> = proxies.iter().filter(|p| !p.draining).collect();
    let n = serving.len() as u64;
    if n == 0 {
        return Decision::ScaleOut;
    }
    let sessions: u64 = proxies.iter().map(|p| p.sessions).sum();
    let capacity = |count: u64| (count * rule.session_max).saturating_sub(sessions);
    let cooled = since_last_scale_secs.is_none_or(|s| s >= rule.cooldown_secs);
    if capacity(n) <= rule.standby {
        return if n < rule.launch_max.max(1) && cooled {
            Decision::ScaleOut
        } else {
            Decision::Hold
        };
    }
    if n > 1 && cooled && capacity(n - 1) > rule.standby {
        let idle = serving
            .iter()
            .filter(|p| p.running && p.sessions == 0 && p.idle_secs.is_some_and(|s| s >= rule.idle_secs))
            .max_by_key(|p| p.idle_secs);
        if let Some(p) = idle {
            return Decision::ScaleIn(p.id.clone());
        }
    }
    Decision::Hold
}

/// Runs the manager until `stop` (acts only while this core holds the lease).
pub async fn run(state: State, fleet: Arc<Fleet>, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut was_leader = false;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        let leader = state.leader.load(Ordering::Relaxed);
        if leader && !was_leader {
            fleet.leader_since_ms.store(now_ms(), Ordering::Relaxed);
        }
        was_leader = leader;
        if !leader {
            continue;
        }
        if let Err(error) = pass(&state, &fleet).await {
            tracing::warn!(%error, "Fleet manager pass failed");
        }
    }
}

async fn pass(state: &State, fleet: &Fleet) -> Result<(), sqlx::Error> {
    let timeout_ms =
        i64::try_from(setting_u64(state, "agent.heartbeat.timeout", 9).await * 1000).unwrap_or(i64::MAX);
    for vm in managed_vms(state, None).await? {
        health(state, fleet, &vm, timeout_ms).await?;
    }
    let zones: Vec<(String, Option<String>)> =
        sqlx::query_as("SELECT id, systemvm_driver FROM zones ORDER BY created")
            .fetch_all(&state.db.pool)
            .await?;
    for (zone, spec) in zones {
        // `none`: the zone's system VMs are started by hand; an unusable spec was refused by
        // createZone, or lost its boot configuration: nothing to deploy with.
        if fleet.driver_for(spec.as_deref()).is_some() {
            policy(state, fleet, &zone).await?;
        }
    }
    Ok(())
}

async fn restart(state: &State, fleet: &Fleet, vm: &ManagedVm, why: &str) -> Result<(), sqlx::Error> {
    event(
        state,
        &format!("{}.RESTART", event_prefix(vm.role)),
        "WARN",
        &format!("{}: {why}; restarting", vm.name),
        Some(&vm.id),
        Some(&vm.zone_id),
    )
    .await;
    if vm.state == vm_state::STARTING {
        sqlx::query("UPDATE system_vms SET start_failures = start_failures + 1 WHERE id = $1")
            .bind(vm.id.clone())
            .execute(&state.db.pool)
            .await?;
        if vm.start_failures + 1 >= MAX_START_FAILURES {
            if let Some(d) = fleet.driver_for(vm.driver.as_deref()) {
                let _ = d.stop(&vm.id, &vm.placement, true).await;
            }
            set_state(state, &vm.id, vm_state::ERROR).await?;
            event(
                state,
                &format!("{}.START", event_prefix(vm.role)),
                "ERROR",
                &format!(
                    "{} failed to come Up {MAX_START_FAILURES} times; retrying every {}s",
                    vm.name,
                    ERROR_RETRY.as_secs()
                ),
                Some(&vm.id),
                Some(&vm.zone_id),
            )
            .await;
            return Ok(());
        }
    }
    if let Err(e) = start_vm(state, fleet, &vm.id).await {
        tracing::warn!(vm.id = %vm.id, error = %e, "Restart failed");
    }
    Ok(())
}

async fn health(state: &State, fleet: &Fleet, vm: &ManagedVm, timeout_ms: i64) -> Result<(), sqlx::Error> {
    let lock = fleet.lock_of(&vm.id);
    let Ok(_guard) = lock.try_lock() else {
        return Ok(());
    };
    let now = now_ms();
    match (vm.desired.as_str(), vm.state.as_str()) {
        (vm_state::RUNNING, vm_state::ERROR)
            if vm
                .started_ms
                .is_none_or(|s| now - s >= i64::try_from(ERROR_RETRY.as_millis()).unwrap_or(60_000)) =>
        {
            sqlx::query("UPDATE system_vms SET start_failures = 0 WHERE id = $1")
                .bind(vm.id.clone())
                .execute(&state.db.pool)
                .await?;
            if let Err(e) = start_vm(state, fleet, &vm.id).await {
                tracing::warn!(vm.id = %vm.id, error = %e, "Retry of a VM in Error failed");
            }
        }
        (vm_state::RUNNING, vm_state::STARTING | vm_state::RUNNING) => {
            let Some(driver) = fleet.driver_for(vm.driver.as_deref()) else {
                return Ok(());
            };
            if let VmState::Stopped(why) = driver.state(&vm.id, &vm.placement).await {
                return restart(state, fleet, vm, &format!("not running ({why})")).await;
            }
            let up = vm.agent_state == UP && state.agents.connection(&vm.id).is_some();
            if vm.state == vm_state::STARTING {
                if up {
                    sqlx::query("UPDATE system_vms SET state = $1, start_failures = 0 WHERE id = $2")
                        .bind(vm_state::RUNNING)
                        .bind(vm.id.clone())
                        .execute(&state.db.pool)
                        .await?;
                    event(
                        state,
                        &format!("{}.START", event_prefix(vm.role)),
                        "INFO",
                        &format!("{} is Up", vm.name),
                        Some(&vm.id),
                        Some(&vm.zone_id),
                    )
                    .await;
                } else if vm
                    .started_ms
                    .is_some_and(|s| now - s > i64::try_from(START_TIMEOUT.as_millis()).unwrap_or(60_000))
                {
                    return restart(state, fleet, vm, "did not come Up in time").await;
                }
            } else {
                // After a takeover, agents need a reconnect round (up to the longest backoff).
                let since = fleet.leader_since_ms.load(Ordering::Relaxed) + TAKEOVER_GRACE_MS;
                let heard = vm.last_heartbeat_ms.unwrap_or(0).max(since);
                let silent = now - heard > timeout_ms;
                if silent {
                    return restart(state, fleet, vm, "agent stopped heartbeating").await;
                }
                if vm.role == AgentRole::ConsoleProxy {
                    // Idle tracking for scale-in.
                    match (vm.sessions(), vm.idle_since_ms) {
                        (0, None) => {
                            sqlx::query("UPDATE system_vms SET idle_since_ms = $1 WHERE id = $2")
                                .bind(now)
                                .bind(vm.id.clone())
                                .execute(&state.db.pool)
                                .await?;
                        }
                        (n, Some(_)) if n > 0 => {
                            sqlx::query("UPDATE system_vms SET idle_since_ms = NULL WHERE id = $1")
                                .bind(vm.id.clone())
                                .execute(&state.db.pool)
                                .await?;
                        }
                        _ => {}
                    }
                }
            }
        }
        (vm_state::DESTROYED, vm_state::STOPPING) => drain_step(state, fleet, vm, now).await?,
        (vm_state::STOPPED, s) if s != vm_state::STOPPED => {
            if let Err(e) = stop_vm(state, fleet, vm, false, false).await {
                tracing::warn!(vm.id = %vm.id, error = %e, "Stop failed");
            }
        }
        _ => {}
    }
    Ok(())
}

/// A draining proxy: destroyed once quiet; back in service when a session shows up.
async fn drain_step(state: &State, fleet: &Fleet, vm: &ManagedVm, now: i64) -> Result<(), sqlx::Error> {
    let quiet_ms = i64::try_from(DRAIN_QUIET.as_millis()).unwrap_or(5000);
    let last_claim: Option<i64> =
        sqlx::query_scalar("SELECT MAX(claimed_ms) FROM console_sessions WHERE proxy_id = $1")
            .bind(vm.id.clone())
            .fetch_one(&state.db.pool)
            .await?;
    let drain_started = vm.idle_since_ms.unwrap_or(now);
    if vm.sessions() > 0 || last_claim.is_some_and(|c| c > drain_started) {
        sqlx::query("UPDATE system_vms SET desired = $1, state = $2, idle_since_ms = NULL WHERE id = $3")
            .bind(vm_state::RUNNING)
            .bind(vm_state::RUNNING)
            .bind(vm.id.clone())
            .execute(&state.db.pool)
            .await?;
        event(
            state,
            "PROXY.SCALEIN",
            "INFO",
            &format!("{}: a session arrived while draining; kept", vm.name),
            Some(&vm.id),
            Some(&vm.zone_id),
        )
        .await;
        return Ok(());
    }
    if now - drain_started >= quiet_ms {
        match stop_vm(state, fleet, vm, false, true).await {
            Ok(()) => {
                event(
                    state,
                    "PROXY.DESTROY",
                    "INFO",
                    &format!("{} drained and destroyed (scale-in)", vm.name),
                    Some(&vm.id),
                    Some(&vm.zone_id),
                )
                .await;
            }
            Err(e) => tracing::warn!(vm.id = %vm.id, error = %e, "Destroying a drained proxy failed"),
        }
    }
    Ok(())
}

async fn policy(state: &State, fleet: &Fleet, zone: &str) -> Result<(), sqlx::Error> {
    let vms = managed_vms(state, Some(zone)).await?;
    let has_store: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM image_stores WHERE zone_id = $1")
        .bind(zone.to_owned())
        .fetch_one(&state.db.pool)
        .await?;
    let storage = vms
        .iter()
        .filter(|v| v.role == AgentRole::SecStorage && v.desired == vm_state::RUNNING)
        .count();
    if has_store > 0
        && storage == 0
        && let Err(e) = create_vm(
            state,
            fleet,
            zone,
            AgentRole::SecStorage,
            "the zone has an image store and no storage VM",
        )
        .await
    {
        tracing::warn!(zone, error = %e, "Could not start a storage VM");
    }
    let now = now_ms();
    let proxies: Vec<ProxyView> = vms
        .iter()
        .filter(|v| v.role == AgentRole::ConsoleProxy)
        .filter(|v| v.desired == vm_state::RUNNING || v.state == vm_state::STOPPING)
        .map(|v| ProxyView {
            id: v.id.clone(),
            running: v.state == vm_state::RUNNING,
            draining: v.desired == vm_state::DESTROYED,
            sessions: v.sessions(),
            idle_secs: v
                .idle_since_ms
                .map(|s| u64::try_from((now - s).max(0) / 1000).unwrap_or(0)),
        })
        .collect();
    let rule = ScaleRule {
        session_max: zone_u64(state, zone, "consoleproxy.session.max", 50).await,
        standby: zone_u64(state, zone, "consoleproxy.capacity.standby", 10).await,
        launch_max: zone_u64(state, zone, "consoleproxy.launch.max", 10).await,
        idle_secs: zone_u64(state, zone, "consoleproxy.scalein.idle", 300).await,
        cooldown_secs: zone_u64(state, zone, "consoleproxy.scale.cooldown", 30).await,
    };
    let last = fleet
        .last_scale_ms
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .get(zone)
        .copied();
    let since = last.map(|l| u64::try_from((now - l).max(0) / 1000).unwrap_or(0));
    // A proxy still starting will add capacity: wait for it before deciding again.
    if vms
        .iter()
        .any(|v| v.role == AgentRole::ConsoleProxy && v.state == vm_state::STARTING)
    {
        return Ok(());
    }
    let decision = decide(&proxies, &rule, since);
    let sessions: u64 = proxies.iter().map(|p| p.sessions).sum();
    match decision {
        Decision::Hold => {}
        Decision::ScaleOut => {
            fleet
                .last_scale_ms
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .insert(zone.to_owned(), now);
            let why = if proxies.is_empty() {
                "the zone has no console proxy".to_owned()
            } else {
                format!(
                    "{} proxies × {} sessions − {sessions} in use ≤ standby {}",
                    proxies.len(),
                    rule.session_max,
                    rule.standby
                )
            };
            event(
                state,
                "PROXY.SCALEOUT",
                "INFO",
                &format!("Scaling out: {why}"),
                None,
                Some(zone),
            )
            .await;
            if let Err(e) = create_vm(state, fleet, zone, AgentRole::ConsoleProxy, &why).await {
                tracing::warn!(zone, error = %e, "Could not start a console proxy");
            }
        }
        Decision::ScaleIn(id) => {
            fleet
                .last_scale_ms
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .insert(zone.to_owned(), now);
            sqlx::query("UPDATE system_vms SET desired = $1, state = $2, idle_since_ms = $3 WHERE id = $4")
                .bind(vm_state::DESTROYED)
                .bind(vm_state::STOPPING)
                .bind(now)
                .bind(id.clone())
                .execute(&state.db.pool)
                .await?;
            event(
                state,
                "PROXY.SCALEIN",
                "INFO",
                &format!(
                    "Scaling in: draining an idle proxy; {} remaining proxies × {} − {sessions} in use > standby {}",
                    proxies.len() - 1,
                    rule.session_max,
                    rule.standby
                ),
                Some(&id),
                Some(zone),
            )
            .await;
        }
    }
    Ok(())
}

/// The `systemvm` JSON of a VM (for lifecycle job results).
pub async fn vm_json(state: &State, id: &str) -> Result<Value, sqlx::Error> {
    systemvms::one(state, id).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(id: &str, sessions: u64, idle: Option<u64>) -> ProxyView {
        ProxyView {
            id: id.into(),
            running: true,
            draining: false,
            sessions,
            idle_secs: idle,
        }
    }

    const RULE: ScaleRule = ScaleRule {
        session_max: 10,
        standby: 5,
        launch_max: 3,
        idle_secs: 60,
        cooldown_secs: 30,
    };

    #[test]
    fn scales_out_by_cloudstacks_rule() {
        assert_eq!(decide(&[], &RULE, None), Decision::ScaleOut);
        // 1 × 10 − 4 = 6 > 5: enough.
        assert_eq!(decide(&[p("a", 4, None)], &RULE, None), Decision::Hold);
        // 1 × 10 − 5 = 5 ≤ 5: one more.
        assert_eq!(decide(&[p("a", 5, None)], &RULE, None), Decision::ScaleOut);
        // Capped by launch.max.
        let full = [p("a", 10, None), p("b", 10, None), p("c", 9, None)];
        assert_eq!(decide(&full, &RULE, None), Decision::Hold);
        // Cooldown.
        assert_eq!(decide(&[p("a", 5, None)], &RULE, Some(10)), Decision::Hold);
        assert_eq!(decide(&[p("a", 5, None)], &RULE, Some(30)), Decision::ScaleOut);
    }

    #[test]
    fn scales_in_idle_proxies_with_hysteresis() {
        // 2 × 10 − 2 = 18; without b: 10 − 2 = 8 > 5, b idle long enough → drain b.
        let two = [p("a", 2, None), p("b", 0, Some(120))];
        assert_eq!(decide(&two, &RULE, None), Decision::ScaleIn("b".into()));
        // Not idle long enough, or cooling down: hold.
        assert_eq!(
            decide(&[p("a", 2, None), p("b", 0, Some(10))], &RULE, None),
            Decision::Hold
        );
        assert_eq!(decide(&two, &RULE, Some(5)), Decision::Hold);
        // Without b: 10 − 5 = 5, not > 5: keep b (scaling in would trigger scaling out).
        assert_eq!(
            decide(&[p("a", 5, None), p("b", 0, Some(120))], &RULE, None),
            Decision::Hold
        );
        // Never below one proxy.
        assert_eq!(decide(&[p("a", 0, Some(999))], &RULE, None), Decision::Hold);
    }

    #[test]
    fn no_flapping_between_the_two_rules() {
        // For every load, a zone that just scaled in does not meet the scale-out rule, and one
        // that just scaled out does not meet the scale-in rule.
        for n in 1..=3u64 {
            for sessions in 0..=n * RULE.session_max {
                let mut proxies: Vec<ProxyView> = (0..n).map(|i| p(&format!("p{i}"), 0, Some(999))).collect();
                proxies[0].sessions = sessions;
                if let Decision::ScaleIn(id) = decide(&proxies, &RULE, None) {
                    proxies.retain(|x| x.id != id);
                    assert_ne!(
                        decide(&proxies, &RULE, None),
                        Decision::ScaleOut,
                        "n={n} s={sessions}"
                    );
                }
            }
        }
    }

    #[test]
    fn zone_driver_specs() {
        let process: Arc<dyn Driver> = Arc::new(process::ProcessDriver {
            bin_dir: "/bin".into(),
            vm_root: "/vms".into(),
        });
        let mut f = Fleet::new(process, vec![], "/ca.pem".into());
        assert_eq!(f.driver_for(None).unwrap().name(), "process");
        assert_eq!(f.driver_for(Some("process")).unwrap().name(), "process");
        assert!(f.driver_for(Some("none")).is_none());
        assert!(
            f.driver_for(Some("libvirt:qemu:///system")).is_none(),
            "no image to boot"
        );
        f.zone_boot = Some((
            qemu::Boot::Disk {
                image: "/svm.qcow2".into(),
            },
            256,
        ));
        let a = f.driver_for(Some("libvirt:qemu+ssh://kvm1/system")).unwrap();
        let b = f.driver_for(Some("libvirt:qemu+ssh://kvm1/system")).unwrap();
        assert_eq!(a.name(), "libvirt");
        assert!(Arc::ptr_eq(&a, &b), "one driver per host");
        assert_eq!(
            f.spec_of(Some("libvirt:qemu+ssh://kvm1/system")),
            "libvirt:qemu+ssh://kvm1/system"
        );
        assert_eq!(f.spec_of(None), "process");
    }

    #[test]
    fn draining_proxies_do_not_count_as_capacity() {
        let mut d = p("b", 0, Some(999));
        d.draining = true;
        assert_eq!(decide(&[p("a", 5, None), d], &RULE, None), Decision::ScaleOut);
    }
}
