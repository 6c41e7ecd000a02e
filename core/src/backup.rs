//! The snapshot backup runner (a background part, on the lease holder): queues the snapshots
//! of due policies, backs queued snapshots up through a storage VM, applies policy retention,
//! and carries out the storage VM's part of restores and deletions for the API.
//!
//! How a volume is read: a disk of a running libvirt guest through the host's pull-mode backup
//! (NBD export of a point-in-time view; incremental from the previous snapshot's checkpoint
//! while it exists, `kvm.incremental.snapshot` allows and the chain is shorter than
//! `snapshot.delta.max`), ended afterwards whatever happened; any other volume on a primary
//! pool through the storage VM's NFS client (full, the image's data clusters).
//!
//! Invariants: one backup per volume at a time; a backup job is ended on the host after every
//! attempt; a failed backup deletes the checkpoint it made (so the previous one still covers all
//! changes since it) and a successful one deletes its predecessor's (one checkpoint per chain);
//! a snapshot's file is removed from the store before its row, so no row points at nothing; a
//! command whose storage VM went away goes again to the next one serving the store (the
//! libvirt export stays up meanwhile, and the agent continues its image from its journal), at
//! most [`RESENDS`] times; a failed backup's leftovers are removed.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use systemvm_proto::agent::{
    AgentCommand, ImageRef, IncrementalFrom, SnapshotBackedUp, SnapshotCommand, TemplateInstall,
};
use tokio::sync::watch;

use crate::fleet::{BackupRequest, Driver};
use crate::hub::CallError;
use crate::model::snapshots::{self, Snapshot};
use crate::model::volumes::{self, Volume};
use crate::model::{DomainError, DomainResult, settings, stores};
use crate::state::State;

/// How often the runner looks for due policies and queued snapshots.
pub const INTERVAL: Duration = Duration::from_secs(2);
/// Backups running at once (each on its own volume).
pub const PARALLEL: usize = 4;
/// The first TCP port tried for a backup's NBD export on a host.
pub const NBD_PORT_BASE: u16 = 10809;

/// Runs until `stop`.
pub async fn run(state: State, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut running: tokio::task::JoinSet<()> = tokio::task::JoinSet::new();
    // Volume id → the snapshot being backed up on this core.
    let active: Arc<std::sync::Mutex<HashMap<String, String>>> = Arc::default();
    let mut was_leader = false;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = state.dispatch_wakeup.notified() => {}
            _ = stop.changed() => {
                running.abort_all();
                return;
            }
        }
        while running.try_join_next().is_some() {}
        if !state.is_leader() {
            was_leader = false;
            continue;
        }
        let result = async {
            if !was_leader {
                let ids: Vec<String> = lock(&active).values().cloned().collect();
                snapshots::requeue_running(&state, &ids).await?;
                was_leader = true;
            }
            for (policy, volume, interval) in
                snapshots::take_due_policies(&state, crate::util::now_ms()).await?
            {
                if let Err(error) = snapshots::request(
                    &state,
                    &system_caller(&state).await?,
                    &volume,
                    None,
                    Some((&policy, &interval)),
                )
                .await
                {
                    tracing::warn!(%error, %policy, "A snapshot policy could not queue its snapshot");
                }
            }
            for snap in snapshots::queued(&state).await? {
                let volume_busy = lock(&active).contains_key(&snap.volume_id);
                if volume_busy || running.len() >= PARALLEL {
                    continue;
                }
                if !snapshots::start(&state, &snap.id).await? {
                    continue;
                }
                lock(&active).insert(snap.volume_id.clone(), snap.id.clone());
                let (st, act) = (state.clone(), active.clone());
                running.spawn(async move {
                    let (id, volume) = (snap.id.clone(), snap.volume_id.clone());
                    if let Err(e) = back_up(&st, &snap).await {
                        discard_leftovers(&st, &snap).await;
                        let _ = snapshots::failed(&st, &id, &e.to_string()).await;
                    } else if let Some(policy) = &snap.policy_id {
                        retain(&st, policy).await;
                    }
                    lock(&act).remove(&volume);
                });
            }
            Ok::<_, DomainError>(())
        }
        .await;
        if let Err(error) = result {
            tracing::warn!(%error, "Snapshot runner failed to read the database");
        }
    }
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The root admin, on whose behalf policies take snapshots (the volume's owner stays the owner).
async fn system_caller(state: &State) -> DomainResult<crate::state::Caller> {
    crate::model::directory::auth::root_admin(state)
        .await?
        .map(|u| u.caller)
        .ok_or_else(|| DomainError::Internal("no root admin".into()))
}

/// A guest's host: the guest driver that knows the domain, with the domain's disks.
async fn guest_host(
    state: &State,
    domain: &str,
) -> DomainResult<Option<(Arc<dyn Driver>, Vec<crate::fleet::GuestDisk>, bool)>> {
    for d in &state.guest_drivers {
        match d.guest_disks(domain).await {
            Ok(Some((disks, running))) => return Ok(Some((d.clone(), disks, running))),
            Ok(None) => {}
            Err(e) => return Err(DomainError::Unavailable(e.to_string())),
        }
    }
    Ok(None)
}

/// Records the disks of the guests core knows as volumes (`--guest-libvirt` hosts).
pub async fn sync_guest_volumes(state: &State) -> DomainResult<()> {
    if state.guest_drivers.is_empty() {
        return Ok(());
    }
    let guests: Vec<(String, String)> =
        sqlx::query_as("SELECT id, hypervisor_ref FROM console_targets WHERE hypervisor_ref IS NOT NULL")
            .fetch_all(&state.db.pool)
            .await?;
    for (vm_id, domain) in guests {
        let Some((_, disks, _)) = guest_host(state, &domain).await? else {
            continue;
        };
        let first = disks.iter().map(|d| d.device.clone()).min();
        for d in &disks {
            volumes::sync_guest_disk(
                state,
                &volumes::GuestVolume {
                    vm_id: &vm_id,
                    device: &d.device,
                    host_path: &d.path,
                    format: &d.format,
                    size: d.size,
                    root: first.as_deref() == Some(d.device.as_str()),
                },
            )
            .await?;
        }
    }
    Ok(())
}

/// A storage VM connected to this core serving `store_url` in `zone`.
async fn storage_vm(state: &State, zone: &str, store_url: &str) -> DomainResult<String> {
    stores::connected_storage_vm(state, zone, store_url)
        .await?
        .ok_or_else(|| {
            DomainError::Unavailable(format!(
                "No storage VM serving image store {store_url} is connected"
            ))
        })
}

/// How long a command interrupted by its storage VM going away waits for one to serve the store
/// again (the fleet restarts a VM that died).
pub const RECONNECT_WAIT: Duration = Duration::from_secs(180);
/// How many times such a command is sent again.
pub const RESENDS: u32 = 3;

/// Sends `cmd` to a storage VM serving `store_url` in `zone` and reads the written image from
/// its answer. When the storage VM goes away before answering, the same command goes to the
/// next one serving the store (the agent continues the image from its journal).
async fn call_image(
    state: &State,
    (zone, store_url): (&str, &str),
    cmd: &AgentCommand,
) -> DomainResult<SnapshotBackedUp> {
    let wait = Duration::from_secs(settings::uint(state, &settings::SNAPSHOT_WAIT).await);
    let mut vm = storage_vm(state, zone, store_url).await?;
    let mut resends = 0;
    let answer = loop {
        match state.agents.call(&vm, cmd, wait).await {
            Ok(a) => break a,
            Err(e @ (CallError::Lost(_) | CallError::NotConnected(_))) if resends < RESENDS => {
                resends += 1;
                tracing::warn!(error = %e, store_url, "A storage VM went away during a snapshot command; it goes to the next one serving the store");
                let until = tokio::time::Instant::now() + RECONNECT_WAIT;
                vm = loop {
                    if let Some(v) = stores::connected_storage_vm(state, zone, store_url).await? {
                        break v;
                    }
                    if tokio::time::Instant::now() >= until {
                        return Err(DomainError::Unavailable(format!(
                            "{e}, and no storage VM serving {store_url} came back within {}s",
                            RECONNECT_WAIT.as_secs()
                        )));
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                };
            }
            Err(e) => return Err(DomainError::Unavailable(e.to_string())),
        }
    };
    if !answer.ok {
        return Err(DomainError::Unavailable(
            answer
                .error
                .unwrap_or_else(|| "the storage VM gave no reason".into()),
        ));
    }
    serde_json::from_value(answer.body)
        .map_err(|e| DomainError::Internal(format!("odd answer from the storage VM: {e}")))
}

/// The directory of a volume's snapshots and a snapshot's file name.
fn snapshot_place(snap: &Snapshot) -> (String, String) {
    (
        format!("snapshots/{}/{}", snap.account_id, snap.volume_id),
        format!("{}.qcow2", snap.id),
    )
}

async fn back_up(state: &State, snap: &Snapshot) -> DomainResult<()> {
    let vol = volumes::get(state, &snap.volume_id).await?;
    // Fails early when no storage VM serves the store.
    storage_vm(state, &snap.zone_id, &snap.store_url).await?;
    let max_rate =
        Some(settings::zone_uint(state, &snap.zone_id, &settings::SNAPSHOT_RATE).await).filter(|r| *r > 0);
    let (dir, name) = snapshot_place(snap);
    if let Some((_, domain, device)) = &vol.guest {
        let Some((driver, disks, running)) = guest_host(state, domain).await? else {
            return Err(DomainError::Unavailable(format!(
                "The guest {domain} is on no libvirt host core knows"
            )));
        };
        if running {
            let disk = disks.iter().find(|d| &d.device == device).ok_or_else(|| {
                DomainError::Unavailable(format!("The guest {domain} has no disk {device} any more"))
            })?;
            return back_up_running(
                state,
                snap,
                &vol,
                driver.as_ref(),
                (domain, device, &disk.path),
                (&dir, &name),
                max_rate,
            )
            .await;
        }
    }
    // Not attached to a running guest: the file on its pool (or an uploaded volume's).
    let Some(file) = vol.file() else {
        return Err(DomainError::Invalid(format!(
            "Volume {} is on no primary storage pool and its guest is not running: nothing can read it",
            vol.name
        )));
    };
    let cmd = AgentCommand::SnapshotBackup(SnapshotCommand {
        store_url: snap.store_url.clone(),
        nbd: String::new(),
        export: String::new(),
        dir,
        name,
        incremental: None,
        file: Some(file),
        max_rate,
    });
    let b = call_image(state, (&snap.zone_id, &snap.store_url), &cmd).await?;
    record(state, snap, &b, None, None).await
}

async fn back_up_running(
    state: &State,
    snap: &Snapshot,
    vol: &Volume,
    driver: &dyn Driver,
    (domain, device, disk_path): (&str, &str, &str),
    (dir, name): (&str, &str),
    max_rate: Option<u64>,
) -> DomainResult<()> {
    let (enabled, incremental_ok, delta_max) = snapshots::guest_policy(state, vol).await;
    if !enabled {
        return Err(DomainError::Invalid(
            "KVM Snapshot is not supported for Running VMs: set kvm.snapshot.enabled to true".into(),
        ));
    }
    let err = |e: crate::fleet::DriverError| DomainError::Unavailable(e.to_string());
    let checkpoints = driver.checkpoints(domain).await.map_err(err)?;
    let parent = match snapshots::chain_head(state, &vol.id).await? {
        Some((head, depth))
            if incremental_ok
                && depth < delta_max
                && head.checkpoint.as_ref().is_some_and(|c| checkpoints.contains(c)) =>
        {
            Some(head)
        }
        _ => None,
    };
    let checkpoint = format!("snap-{}", snap.id);
    if checkpoints.contains(&checkpoint) {
        // An earlier attempt of this snapshot on a core that stopped: its job and checkpoint
        // go, and the backup begins again.
        driver.backup_end(domain).await.map_err(err)?;
        driver.delete_checkpoint(domain, &checkpoint).await.map_err(err)?;
    }
    let scratch = format!(
        "{}/.{}-{}.scratch",
        disk_path.rsplit_once('/').map_or(".", |(d, _)| d),
        domain,
        snap.id
    );
    // A port in use on the host fails the begin: the next one is tried.
    let mut export = None;
    let mut last = None;
    for port in NBD_PORT_BASE..NBD_PORT_BASE + 8 {
        let req = BackupRequest {
            guest: domain,
            device,
            scratch: &scratch,
            port,
            checkpoint: &checkpoint,
            incremental_from: parent.as_ref().and_then(|p| p.checkpoint.as_deref()),
        };
        match driver.backup_begin(&req).await {
            Ok(e) => {
                export = Some(e);
                break;
            }
            Err(e) => {
                let text = e.to_string();
                let busy = text.contains("in use") || text.contains("Failed to bind");
                last = Some(e);
                if !busy {
                    break;
                }
            }
        }
    }
    let Some(export) = export else {
        return Err(last.map_or_else(|| DomainError::Unavailable("no backup".into()), err));
    };
    let cmd = AgentCommand::SnapshotBackup(SnapshotCommand {
        store_url: snap.store_url.clone(),
        nbd: export.address.clone(),
        export: export.export.clone(),
        dir: dir.to_owned(),
        name: name.to_owned(),
        incremental: match (&parent, &export.dirty_context) {
            (Some(p), Some(context)) => Some(IncrementalFrom {
                context: context.clone(),
                backing: p
                    .file
                    .as_deref()
                    .and_then(|f| f.rsplit('/').next())
                    .unwrap_or_default()
                    .to_owned(),
            }),
            _ => None,
        },
        file: None,
        max_rate,
    });
    let result = call_image(state, (&snap.zone_id, &snap.store_url), &cmd).await;
    if let Err(error) = driver.backup_end(domain).await {
        tracing::warn!(%error, domain, "Ending a backup job failed");
    }
    match result {
        Ok(b) => {
            if let Some(prev) = parent.as_ref().and_then(|p| p.checkpoint.as_deref()) {
                let _ = driver.delete_checkpoint(domain, prev).await;
            } else {
                // A new chain: older checkpoints of this disk are not needed any more.
                for c in checkpoints.iter().filter(|c| c.starts_with("snap-")) {
                    let _ = driver.delete_checkpoint(domain, c).await;
                }
            }
            record(
                state,
                snap,
                &b,
                parent.as_ref().map(|p| p.id.as_str()),
                Some(&checkpoint),
            )
            .await
        }
        Err(e) => {
            let _ = driver.delete_checkpoint(domain, &checkpoint).await;
            Err(e)
        }
    }
}

async fn record(
    state: &State,
    snap: &Snapshot,
    b: &SnapshotBackedUp,
    parent: Option<&str>,
    checkpoint: Option<&str>,
) -> DomainResult<()> {
    snapshots::backed_up(
        state,
        &snap.id,
        &snapshots::BackedUp {
            file: &b.file,
            parent_id: parent,
            checkpoint,
            virtual_size: b.virtual_size,
            physical_size: b.physical_size,
            bytes_read: b.bytes_read,
            sha256: &b.sha256,
        },
    )
    .await
}

/// Removes what a failed backup may have left in the store (a part file an agent that died
/// could not remove), best effort.
async fn discard_leftovers(state: &State, snap: &Snapshot) {
    let (dir, name) = snapshot_place(snap);
    let Ok(vm) = storage_vm(state, &snap.zone_id, &snap.store_url).await else {
        return;
    };
    let cmd = AgentCommand::DeleteSnapshot {
        store_url: snap.store_url.clone(),
        path: format!("{dir}/{name}"),
    };
    if let Err(error) = state.agents.call(&vm, &cmd, Duration::from_secs(60)).await {
        tracing::warn!(%error, id = %snap.id, "The leftovers of a failed backup were not removed");
    }
}

/// Deletes a policy's snapshots beyond its `maxsnaps`.
async fn retain(state: &State, policy: &str) {
    match snapshots::beyond_retention(state, policy).await {
        Ok(ids) => {
            for id in ids {
                if let Err(error) = delete(state, &id).await {
                    tracing::warn!(%error, %id, "Retention could not delete a snapshot");
                }
            }
        }
        Err(error) => tracing::warn!(%error, policy, "Retention could not read the policy's snapshots"),
    }
}

/// Deletes snapshot `id` by the chain rules: the images nothing builds on leave the store (then
/// their rows); the others stay, hidden.
pub async fn delete(state: &State, id: &str) -> DomainResult<()> {
    for s in snapshots::delete_plan(state, id).await? {
        if let Some(file) = &s.file {
            let vm = storage_vm(state, &s.zone_id, &s.store_url).await?;
            let cmd = AgentCommand::DeleteSnapshot {
                store_url: s.store_url.clone(),
                path: file.clone(),
            };
            let a = state
                .agents
                .call(&vm, &cmd, Duration::from_secs(60))
                .await
                .map_err(|e| DomainError::Unavailable(e.to_string()))?;
            if !a.ok {
                return Err(DomainError::Unavailable(a.error.unwrap_or_default()));
            }
        }
        snapshots::forget(state, &s.id).await?;
        tracing::info!(id = %s.id, "Snapshot deleted");
    }
    Ok(())
}

/// Writes snapshot `snap` (with its chain), flattened, to `to` through a storage VM of its store
/// (`template`: `to` is a template's image on that store).
pub async fn restore(
    state: &State,
    snap: &Snapshot,
    to: ImageRef,
    template: Option<TemplateInstall>,
) -> DomainResult<SnapshotBackedUp> {
    let file = snap
        .file
        .clone()
        .ok_or_else(|| DomainError::Invalid(format!("Snapshot {} is not backed up", snap.id)))?;
    let from = ImageRef {
        store_url: snap.store_url.clone(),
        path: file,
        format: "QCOW2".into(),
    };
    copy(state, (&snap.zone_id, &snap.store_url), from, to, template).await
}

/// Writes image `from` (with its chain), flattened, to `to` through a storage VM serving
/// `store_url` in `zone` (`createTemplate` from a volume: `from` is on a primary pool).
pub async fn copy(
    state: &State,
    (zone, store_url): (&str, &str),
    from: ImageRef,
    to: ImageRef,
    template: Option<TemplateInstall>,
) -> DomainResult<SnapshotBackedUp> {
    let cmd = AgentCommand::SnapshotRestore(systemvm_proto::agent::RestoreCommand { from, to, template });
    call_image(state, (zone, store_url), &cmd).await
}

/// Whether the volume's guest runs (a volume of no guest never does).
pub async fn guest_running(state: &State, vol: &Volume) -> DomainResult<bool> {
    match &vol.guest {
        Some((_, domain, _)) => Ok(guest_host(state, domain).await?.is_some_and(|(_, _, r)| r)),
        None => Ok(false),
    }
}
