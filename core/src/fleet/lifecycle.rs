//! One system VM's lifecycle through its driver: start (with a fresh secret), stop, destroy,
//! create, and waiting for its agent. The manager and the lifecycle commands both use it, each
//! under the VM's lock ([`Fleet::lock`]).
//!
//! Invariants: each start issues a new secret (only its digest is stored), and whatever ran
//! before is stopped first, so a stale process of an earlier start can neither dial in nor hold
//! the VM's place; a failed start is recorded (`Error`, an event with the driver's reason).

use std::time::Duration;

use systemvm_proto::Secret;
use systemvm_proto::agent::AgentRole;

use crate::fleet::{Fleet, FleetError, Placement, VmSpec};
use crate::model::events::{self, Level};
use crate::model::systemvms::{self, AgentState, ManagedVm, VmState};
use crate::model::{settings, stores};
use crate::state::State;
use crate::util::random_token;

/// Starts (or restarts) a managed VM with a fresh secret; the VM is `Starting` until its agent is Up.
pub async fn start_vm(state: &State, fleet: &Fleet, id: &str) -> Result<(), FleetError> {
    let pool = &state.db.pool;
    let info = systemvms::start_info(pool, id)
        .await?
        .ok_or_else(|| FleetError::NotFound(id.to_owned()))?;
    // Whatever ran before goes first (a stale process must not hold the VM's place).
    if let Some(d) = fleet.driver_for(info.driver.as_deref()) {
        let _ = d.stop(id, &Placement { pid: info.pid }, true).await;
    }
    let driver = fleet
        .driver_for(info.zone_driver.as_deref())
        .ok_or_else(|| FleetError::NoDriver(info.zone_id.clone()))?;
    let driver_spec = fleet.spec_of(info.zone_driver.as_deref());
    let store_url = match info.role {
        AgentRole::SecStorage => Some(
            match &info.store_id {
                Some(store) => stores::url_of(pool, store).await?,
                None => stores::first_url_of_zone(pool, &info.zone_id).await?,
            }
            .ok_or_else(|| FleetError::NoStore(info.zone_id.clone()))?,
        ),
        AgentRole::ConsoleProxy => None,
    };
    let secret = random_token::<32>().map_err(|_| FleetError::Random)?;
    let allow_internal = settings::zone_text(state, &info.zone_id, &settings::ALLOWED_INTERNAL_SITES)
        .await
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect();
    let spec = VmSpec {
        id: id.to_owned(),
        name: info.name.clone(),
        role: info.role,
        zone_id: info.zone_id.clone(),
        secret: Secret(secret.clone()),
        core_urls: fleet.core_urls.clone(),
        ca: fleet.ca.clone(),
        store_url,
        allow_internal,
        max_sessions: settings::zone_uint(state, &info.zone_id, &settings::PROXY_SESSION_MAX).await,
    };
    systemvms::mark_starting(pool, id, &secret, &driver_spec).await?;
    match driver.start(&spec).await {
        Ok(p) => {
            systemvms::set_pid(pool, id, p.pid).await?;
            Ok(())
        }
        Err(source) => {
            systemvms::mark_start_failed(pool, id).await?;
            events::record(
                state,
                &format!("{}.START", events::prefix(info.role)),
                Level::Error,
                &format!("{} failed to start: {source}", info.name),
                Some(id),
                Some(&info.zone_id),
            )
            .await;
            Err(FleetError::StartFailed {
                name: info.name,
                source,
            })
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
) -> Result<(), FleetError> {
    let pool = &state.db.pool;
    let desired = if destroy {
        VmState::Destroyed
    } else {
        VmState::Stopped
    };
    systemvms::mark_stopping(pool, &vm.id, desired).await?;
    let driver = fleet
        .driver_for(vm.driver.as_deref())
        .ok_or_else(|| FleetError::DriverGone(vm.name.clone()))?;
    let failed = |source| FleetError::StopFailed {
        name: vm.name.clone(),
        source,
    };
    driver
        .stop(&vm.id, &Placement { pid: vm.pid }, force)
        .await
        .map_err(failed)?;
    if destroy {
        driver.destroy(&vm.id).await.map_err(failed)?;
    }
    systemvms::mark_stopped(pool, &vm.id, destroy).await?;
    Ok(())
}

/// Creates a managed VM of `role` in `zone` (a storage VM: serving `store`) and starts it.
pub async fn create_vm(
    state: &State,
    fleet: &Fleet,
    zone: &str,
    role: AgentRole,
    store: Option<&str>,
    why: &str,
) -> Result<String, FleetError> {
    let r = systemvms::register(&state.db.pool, role, Some(zone), None).await?;
    systemvms::make_managed(&state.db.pool, &r.id, fleet.driver.name()).await?;
    if let Some(store) = store {
        systemvms::set_store(&state.db.pool, &r.id, store).await?;
    }
    events::record(
        state,
        &format!("{}.CREATE", events::prefix(role)),
        Level::Info,
        &format!("Created {} ({why})", r.name),
        Some(&r.id),
        Some(zone),
    )
    .await;
    start_vm(state, fleet, &r.id).await?;
    Ok(r.id)
}

/// Waits until the VM's agent is Up and connected here (after a start).
pub async fn wait_up(state: &State, id: &str, within: Duration) -> Result<(), FleetError> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let (vm, agent) = systemvms::status(&state.db.pool, id)
            .await?
            .ok_or_else(|| FleetError::NotFound(id.to_owned()))?;
        if agent == AgentState::Up && state.agents.connection(id).is_some() {
            if vm != VmState::Running {
                systemvms::set_state(&state.db.pool, id, VmState::Running).await?;
            }
            return Ok(());
        }
        if vm == VmState::Error {
            return Err(FleetError::WentToError(id.to_owned()));
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(FleetError::NotUp {
                id: id.to_owned(),
                secs: within.as_secs(),
                state: vm.as_str(),
                agent: agent.as_str(),
            });
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Stops the processes/domains of every managed VM without changing what core wants of them
/// (core is stopping with its VMs: `up` on Ctrl-C, tests); the next start of core starts them
/// again, as starts, not as crashes.
pub async fn stop_all_with_core(state: &State, fleet: &Fleet) {
    match systemvms::managed(&state.db.pool, None).await {
        Ok(vms) => {
            for vm in vms {
                if let Some(d) = fleet.driver_for(vm.driver.as_deref()) {
                    let _ = d.stop(&vm.id, &Placement { pid: vm.pid }, false).await;
                }
                if vm.desired == VmState::Running
                    && let Err(error) = systemvms::mark_stopped_with_core(&state.db.pool, &vm.id).await
                {
                    tracing::warn!(%error, vm.id = %vm.id, "Could not record a system VM stopped with core");
                }
            }
        }
        Err(error) => tracing::warn!(%error, "Could not list the system VMs to stop"),
    }
}
