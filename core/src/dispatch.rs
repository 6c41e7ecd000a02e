//! The download dispatcher (a background part, on the lease holder): hands queued template and
//! ISO downloads, and cross-zone copies, to connected storage VMs.
//!
//! Invariants: a download is dispatched only to a storage VM that is connected and reports
//! serving the template's image store, with a fresh fencing epoch, and only that connection may
//! report its progress; dispatching is idempotent (the template id is the agent's
//! job id), so a download is sent again whenever the connection it went to is gone: after an
//! agent restart or a core restart the job is re-attached, never started twice.

use std::time::Duration;

use systemvm_proto::agent::{AgentCommand, JobPhase, JobProgress};
use tokio::sync::watch;

use crate::model::{copies, stores, templates};
use crate::state::State;

/// How often the dispatcher looks for downloads to hand out.
pub const DISPATCH_INTERVAL: Duration = Duration::from_secs(2);

/// Hands queued downloads to storage VMs, every [`DISPATCH_INTERVAL`] and whenever a template is
/// registered, until `stop`.
pub async fn run(state: State, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(DISPATCH_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = state.dispatch_wakeup.notified() => {}
            _ = stop.changed() => return,
        }
        if !state.is_leader() {
            continue;
        }
        if let Err(error) = dispatch_pending(&state).await {
            tracing::warn!(%error, "Download dispatcher failed to read the database");
        }
    }
}

async fn dispatch_pending(state: &State) -> Result<(), sqlx::Error> {
    let mut all = templates::pending_downloads(state).await?;
    all.extend(copies::pending(state).await?);
    for mut pending in all {
        let id = pending.command.job_id.clone();
        if state.dispatched_live(&id) {
            continue;
        }
        let Some(agent) =
            stores::connected_storage_vm(state, &pending.zone_id, &pending.command.store_url).await?
        else {
            let waiting = format!(
                "Waiting for a storage VM serving image store {}",
                pending.store_name
            );
            if pending.status != waiting {
                templates::set_waiting_status(state, &id, &waiting).await?;
            }
            continue;
        };
        let Some(conn) = state.agents.connection(&agent) else {
            continue;
        };
        // A copy: a fresh link on a storage VM that holds the template, sealed for this one.
        match copies::source_for(state, &mut pending, &agent).await {
            Ok(Ok(())) => {}
            Ok(Err(waiting)) => {
                if pending.status != waiting {
                    templates::set_waiting_status(state, &id, &waiting).await?;
                }
                continue;
            }
            Err(crate::model::DomainError::Db(e)) => return Err(e),
            Err(error) => {
                tracing::warn!(copy = %id, %error, "Could not prepare the source of a copy");
                continue;
            }
        }
        let mut download = pending.command;
        download.epoch = templates::next_epoch(state, &id).await?;
        // Recorded before sending: progress that comes before the answer is this connection's.
        state.dispatched_set(&id, &agent, conn);
        let command = AgentCommand::Download(download);
        match state
            .agents
            .call(&agent, &command, templates::COMMAND_TIMEOUT)
            .await
        {
            Ok(answer) if answer.ok => {
                tracing::info!(template = %id, agent = %agent, "Download dispatched to a storage VM");
                match serde_json::from_value::<JobProgress>(answer.body) {
                    Ok(p) => templates::apply_progress(state, &agent, &p).await?,
                    Err(error) => tracing::warn!(%error, "Storage VM answered a download without progress"),
                }
            }
            Ok(answer) => {
                state.dispatched_forget(&id);
                let reason = answer.error.unwrap_or_else(|| "refused by the storage VM".into());
                tracing::warn!(template = %id, agent = %agent, %reason, "Storage VM refused a download");
                let failed = JobProgress {
                    id: id.clone(),
                    state: Some(JobPhase::Failed),
                    error: Some(reason),
                    ..Default::default()
                };
                templates::apply_progress(state, &agent, &failed).await?;
            }
            Err(error) => {
                state.dispatched_forget(&id);
                tracing::warn!(template = %id, agent = %agent, %error, "Download not dispatched; will retry")
            }
        }
    }
    Ok(())
}
