//! Every core follows what the other core may change in the database: settings (global and per
//! zone), the console-token keys, the transfer keys and the custom certificate. The core holding the lease pushes changes to its agents:
//! `ConfigUpdate` to the system VMs a changed setting concerns, `KeysUpdate` to console proxies, `TransferKeysUpdate` to storage VMs.
//!
//! Invariants: a change made on either core reaches this core's cache within
//! [`settings::FOLLOW_INTERVAL`] (at once when made here); the lease holder pushes agent settings
//! after every change it sees, so a dynamic setting needs no restart of any system VM; a database
//! error skips one round, never the task.

use tokio::sync::watch;

use crate::model::keyrings::{self, Ring};
use crate::model::{consoles, settings};
use crate::state::State;

/// Runs until `stop`.
pub async fn run(state: State, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(settings::FOLLOW_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut seen = settings::snapshot(&state.db.pool).await.ok();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = state.settings_changed.notified() => {}
            _ = stop.changed() => return,
        }
        let leader = state.is_leader();
        match settings::snapshot(&state.db.pool).await {
            Ok(now) => {
                if seen.as_ref() != Some(&now) {
                    if let Err(error) = settings::reload(&state).await {
                        tracing::warn!(%error, "Could not reload the settings");
                        continue;
                    }
                    if leader {
                        crate::agent::push_config(&state).await;
                    }
                    seen = Some(now);
                }
            }
            Err(error) => tracing::warn!(%error, "Could not read the settings tables"),
        }
        if let Err(error) = consoles::follow_keys(&state).await {
            tracing::warn!(%error, "Could not follow the console keys");
        }
        if let Err(error) = keyrings::follow(&state, Ring::Transfer).await {
            tracing::warn!(%error, "Could not follow the transfer keys");
        }
        if let Err(error) = crate::model::certificates::follow(&state).await {
            tracing::warn!(%error, "Could not follow the custom certificate");
        }
    }
}
