//! The fleet manager loop, on the core holding the leader lease: each [`TICK`] it checks every
//! managed VM's health (restart, retry, drain, stop) and applies each zone's policy (a storage VM
//! once the zone has a store, console proxies by the scale rule).
//!
//! Invariants: see the `fleet` module; the manager skips a VM whose lock is held (a lifecycle
//! command is acting on it) and acts on nothing while this core is on standby.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use systemvm_proto::agent::AgentRole;
use tokio::sync::watch;

use crate::fleet::scale::{Decision, ProxyView, ScaleRule, decide};
use crate::fleet::{
    DRAIN_QUIET, ERROR_RETRY, Fleet, MAX_START_FAILURES, Placement, START_TIMEOUT, TAKEOVER_GRACE_MS, TICK,
    create_vm, driver, start_vm, stop_vm,
};
use crate::model::events::{self, Level};
use crate::model::systemvms::{self, AgentState, ManagedVm, VmState};
use crate::model::{consoles, settings};
use crate::state::State;
use crate::util::now_ms;

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
        let leader = state.is_leader();
        if leader && !was_leader {
            let now = state.db.now_ms().await.unwrap_or_else(|_| now_ms());
            fleet.leader_since_ms.store(now, Ordering::Relaxed);
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
        i64::try_from(settings::uint(state, &settings::HEARTBEAT_TIMEOUT).await * 1000).unwrap_or(i64::MAX);
    let db_now = state.db.now_ms().await?;
    for vm in systemvms::managed(&state.db.pool, None).await? {
        health(state, fleet, &vm, timeout_ms, db_now).await?;
    }
    for (zone, spec) in systemvms::zone_drivers(&state.db.pool).await? {
        // `none`: the zone's system VMs are started by hand; an unusable spec was refused by
        // createZone, or lost its boot configuration: nothing to deploy with.
        if fleet.driver_for(spec.as_deref()).is_some() {
            policy(state, fleet, &zone).await?;
        }
    }
    Ok(())
}

fn millis(d: std::time::Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

async fn restart(state: &State, fleet: &Fleet, vm: &ManagedVm, why: &str) -> Result<(), sqlx::Error> {
    events::record(
        state,
        &format!("{}.RESTART", events::prefix(vm.role)),
        Level::Warn,
        &format!("{}: {why}; restarting", vm.name),
        Some(&vm.id),
        Some(&vm.zone_id),
    )
    .await;
    if vm.state == VmState::Starting {
        systemvms::add_start_failure(&state.db.pool, &vm.id).await?;
        if vm.start_failures + 1 >= MAX_START_FAILURES {
            if let Some(d) = fleet.driver_for(vm.driver.as_deref()) {
                let _ = d.stop(&vm.id, &Placement { pid: vm.pid }, true).await;
            }
            systemvms::set_state(&state.db.pool, &vm.id, VmState::Error).await?;
            events::record(
                state,
                &format!("{}.START", events::prefix(vm.role)),
                Level::Error,
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
    if let Err(error) = start_vm(state, fleet, &vm.id).await {
        tracing::warn!(vm.id = %vm.id, %error, "Restart failed");
    }
    Ok(())
}

async fn health(
    state: &State,
    fleet: &Fleet,
    vm: &ManagedVm,
    timeout_ms: i64,
    db_now: i64,
) -> Result<(), sqlx::Error> {
    let lock = fleet.lock(&vm.id);
    let Ok(_guard) = lock.try_lock() else {
        return Ok(());
    };
    let now = now_ms();
    let pool = &state.db.pool;
    match (vm.desired, vm.state) {
        (VmState::Running, VmState::Error)
            if vm.started_ms.is_none_or(|s| now - s >= millis(ERROR_RETRY)) =>
        {
            systemvms::reset_start_failures(pool, &vm.id).await?;
            if let Err(error) = start_vm(state, fleet, &vm.id).await {
                tracing::warn!(vm.id = %vm.id, %error, "Retry of a VM in Error failed");
            }
        }
        (VmState::Running, VmState::Stopped) => {
            // Stopped together with core (a clean stop of core with its VMs): start it again.
            events::record(
                state,
                &format!("{}.START", events::prefix(vm.role)),
                Level::Info,
                &format!("Starting {} (it was stopped with core)", vm.name),
                Some(&vm.id),
                Some(&vm.zone_id),
            )
            .await;
            if let Err(error) = start_vm(state, fleet, &vm.id).await {
                tracing::warn!(vm.id = %vm.id, %error, "Start failed");
            }
        }
        (VmState::Running, VmState::Starting | VmState::Running) => {
            let Some(driver) = fleet.driver_for(vm.driver.as_deref()) else {
                return Ok(());
            };
            if let driver::VmState::Stopped(why) = driver.state(&vm.id, &Placement { pid: vm.pid }).await {
                return restart(state, fleet, vm, &format!("not running ({why})")).await;
            }
            let up = vm.agent_state == AgentState::Up && state.agents.connection(&vm.id).is_some();
            if vm.state == VmState::Starting {
                if up {
                    systemvms::mark_running(pool, &vm.id).await?;
                    events::record(
                        state,
                        &format!("{}.START", events::prefix(vm.role)),
                        Level::Info,
                        &format!("{} is Up", vm.name),
                        Some(&vm.id),
                        Some(&vm.zone_id),
                    )
                    .await;
                } else if vm.started_ms.is_some_and(|s| now - s > millis(START_TIMEOUT)) {
                    return restart(state, fleet, vm, "did not come Up in time").await;
                }
            } else {
                // After a takeover, agents need a reconnect round (up to the longest backoff).
                let since = fleet.leader_since_ms.load(Ordering::Relaxed) + TAKEOVER_GRACE_MS;
                let heard = vm.last_heartbeat_ms.unwrap_or(0).max(since);
                if db_now - heard > timeout_ms {
                    return restart(state, fleet, vm, "agent stopped heartbeating").await;
                }
                if vm.role == AgentRole::ConsoleProxy {
                    // Idle tracking for scale-in.
                    match (vm.sessions(), vm.idle_since_ms) {
                        (0, None) => systemvms::set_idle_since(pool, &vm.id, Some(now)).await?,
                        (n, Some(_)) if n > 0 => systemvms::set_idle_since(pool, &vm.id, None).await?,
                        _ => {}
                    }
                }
            }
        }
        (VmState::Destroyed, VmState::Stopping) => drain_step(state, fleet, vm, now).await?,
        (VmState::Stopped, s) if s != VmState::Stopped => {
            if let Err(error) = stop_vm(state, fleet, vm, false, false).await {
                tracing::warn!(vm.id = %vm.id, %error, "Stop failed");
            }
        }
        _ => {}
    }
    Ok(())
}

/// A draining proxy: destroyed once quiet; back in service when a session shows up.
async fn drain_step(state: &State, fleet: &Fleet, vm: &ManagedVm, now: i64) -> Result<(), sqlx::Error> {
    let last_claim = consoles::last_claim_ms(&state.db.pool, &vm.id).await?;
    let drain_started = vm.idle_since_ms.unwrap_or(now);
    if vm.sessions() > 0 || last_claim.is_some_and(|c| c > drain_started) {
        systemvms::cancel_drain(&state.db.pool, &vm.id).await?;
        events::record(
            state,
            &format!("{}.SCALEIN", events::prefix(vm.role)),
            Level::Info,
            &format!("{}: a session arrived while draining; kept", vm.name),
            Some(&vm.id),
            Some(&vm.zone_id),
        )
        .await;
        return Ok(());
    }
    if now - drain_started >= millis(DRAIN_QUIET) {
        match stop_vm(state, fleet, vm, false, true).await {
            Ok(()) => {
                events::record(
                    state,
                    &format!("{}.DESTROY", events::prefix(vm.role)),
                    Level::Info,
                    &format!("{} drained and destroyed", vm.name),
                    Some(&vm.id),
                    Some(&vm.zone_id),
                )
                .await;
            }
            Err(error) => tracing::warn!(vm.id = %vm.id, %error, "Destroying a drained proxy failed"),
        }
    }
    Ok(())
}

/// Every image store of the zone has a storage VM serving it; a storage VM whose store was
/// deleted is drained and destroyed.
async fn storage_policy(
    state: &State,
    fleet: &Fleet,
    zone: &str,
    vms: &[ManagedVm],
) -> Result<(), sqlx::Error> {
    let stores = crate::model::stores::of_zone(&state.db.pool, zone).await?;
    let serving: Vec<&ManagedVm> = vms
        .iter()
        .filter(|v| v.role == AgentRole::SecStorage && v.desired == VmState::Running)
        .collect();
    for (i, (store, url)) in stores.iter().enumerate() {
        // A storage VM without a store serves the zone's first one.
        let served = serving
            .iter()
            .any(|v| v.store_id.as_deref() == Some(store.as_str()) || (v.store_id.is_none() && i == 0));
        if !served
            && let Err(error) = create_vm(
                state,
                fleet,
                zone,
                AgentRole::SecStorage,
                Some(store),
                &format!("image store {url} has no storage VM"),
            )
            .await
        {
            tracing::warn!(zone, %error, "Could not start a storage VM");
        }
    }
    for v in &serving {
        if let Some(store) = &v.store_id
            && !stores.iter().any(|(s, _)| s == store)
        {
            systemvms::begin_drain(&state.db.pool, &v.id, now_ms()).await?;
            events::record(
                state,
                "SSVM.DESTROY",
                Level::Info,
                &format!("{}: its image store was deleted; draining", v.name),
                Some(&v.id),
                Some(zone),
            )
            .await;
        }
    }
    Ok(())
}

async fn policy(state: &State, fleet: &Fleet, zone: &str) -> Result<(), sqlx::Error> {
    let vms = systemvms::managed(&state.db.pool, Some(zone)).await?;
    storage_policy(state, fleet, zone, &vms).await?;
    let now = now_ms();
    let proxies: Vec<ProxyView> = vms
        .iter()
        .filter(|v| v.role == AgentRole::ConsoleProxy)
        .filter(|v| v.desired == VmState::Running || v.state == VmState::Stopping)
        .map(|v| ProxyView {
            id: v.id.clone(),
            running: v.state == VmState::Running,
            draining: v.desired == VmState::Destroyed,
            sessions: v.sessions(),
            idle_secs: v
                .idle_since_ms
                .map(|s| u64::try_from((now - s).max(0) / 1000).unwrap_or(0)),
        })
        .collect();
    let rule = ScaleRule {
        session_max: settings::zone_uint(state, zone, &settings::PROXY_SESSION_MAX).await,
        standby: settings::zone_uint(state, zone, &settings::PROXY_STANDBY).await,
        launch_max: settings::zone_uint(state, zone, &settings::PROXY_LAUNCH_MAX).await,
        idle_secs: settings::zone_uint(state, zone, &settings::PROXY_SCALEIN_IDLE).await,
        cooldown_secs: settings::zone_uint(state, zone, &settings::PROXY_SCALE_COOLDOWN).await,
    };
    // A zone without a proxy gets one at once; otherwise the scale rule is looked at every
    // `consoleproxy.capacityscan.interval` (CloudStack's capacity scan).
    let scan_ms = i64::try_from(settings::zone_uint(state, zone, &settings::PROXY_CAPACITY_SCAN).await)
        .unwrap_or(i64::MAX);
    if !proxies.is_empty() && fleet.last_scan_ms(zone).is_some_and(|l| now - l < scan_ms) {
        return Ok(());
    }
    fleet.scanned(zone, now);
    let since = fleet
        .last_scale_ms(zone)
        .map(|l| u64::try_from((now - l).max(0) / 1000).unwrap_or(0));
    // A proxy still starting (or stopped with core, about to start) will add capacity: wait for
    // it before deciding again.
    if vms.iter().any(|v| {
        v.role == AgentRole::ConsoleProxy
            && (v.state == VmState::Starting
                || (v.state == VmState::Stopped && v.desired == VmState::Running))
    }) {
        return Ok(());
    }
    let decision = decide(&proxies, &rule, since);
    let sessions: u64 = proxies.iter().map(|p| p.sessions).sum();
    match decision {
        Decision::Hold => {}
        Decision::ScaleOut => {
            fleet.scaled(zone, now);
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
            events::record(
                state,
                "PROXY.SCALEOUT",
                Level::Info,
                &format!("Scaling out: {why}"),
                None,
                Some(zone),
            )
            .await;
            if let Err(error) = create_vm(state, fleet, zone, AgentRole::ConsoleProxy, None, &why).await {
                tracing::warn!(zone, %error, "Could not start a console proxy");
            }
        }
        Decision::ScaleIn(id) => {
            fleet.scaled(zone, now);
            systemvms::begin_drain(&state.db.pool, &id, now).await?;
            events::record(
                state,
                "PROXY.SCALEIN",
                Level::Info,
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
