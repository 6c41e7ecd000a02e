//! The leader lease: with two cores on one PostgreSQL database, one holds the lease and acts
//! (fleet manager, download dispatcher, agent endpoint); the other serves the API and takes over
//! when the lease runs out.
//!
//! Invariants: the lease is one row (`leases.name = 'leader'`) changed only by conditional
//! updates, so at most one core holds an unexpired lease; a core that fails to renew drops its
//! leadership locally before the lease can expire ([`RENEW`] < [`TTL`] / 2), and closes its agent
//! connections so agents move to the new leader.

use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::watch;

use crate::agent::now_ms;
use crate::state::State;

/// How long a lease lasts without renewal.
pub const TTL: Duration = Duration::from_secs(6);
/// How often the holder renews it (and a standby tries to take it).
pub const RENEW: Duration = Duration::from_secs(2);

const NAME: &str = "leader";

fn ttl_ms() -> i64 {
    i64::try_from(TTL.as_millis()).unwrap_or(6000)
}

/// Takes or renews the lease for `holder`; true when `holder` holds it afterwards.
pub async fn try_acquire(pool: &sqlx::AnyPool, holder: &str) -> Result<bool, sqlx::Error> {
    let now = now_ms();
    sqlx::query(
        "INSERT INTO leases (name, holder, expires_ms) VALUES ($1, $2, $3) ON CONFLICT (name) DO NOTHING",
    )
    .bind(NAME)
    .bind(holder.to_owned())
    .bind(now + ttl_ms())
    .execute(pool)
    .await?;
    let done = sqlx::query(
        "UPDATE leases SET holder = $1, expires_ms = $2 WHERE name = $3 AND (holder = $1 OR expires_ms < $4)",
    )
    .bind(holder.to_owned())
    .bind(now + ttl_ms())
    .bind(NAME)
    .bind(now)
    .execute(pool)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Gives the lease up (clean shutdown), so the standby takes over at once.
pub async fn release(pool: &sqlx::AnyPool, holder: &str) {
    let _ = sqlx::query("UPDATE leases SET expires_ms = 0 WHERE name = $1 AND holder = $2")
        .bind(NAME)
        .bind(holder.to_owned())
        .execute(pool)
        .await;
}

/// Keeps `state.leader` in step with the lease until `stop`.
pub async fn run(state: State, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(RENEW);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => break,
        }
        let held = match tokio::time::timeout(RENEW, try_acquire(&state.db.pool, &state.instance_id)).await {
            Ok(Ok(h)) => h,
            Ok(Err(error)) => {
                tracing::warn!(%error, "Lease renewal failed");
                false
            }
            Err(_) => {
                tracing::warn!("Lease renewal timed out");
                false
            }
        };
        let was = state.leader.swap(held, Ordering::SeqCst);
        match (was, held) {
            (false, true) => {
                tracing::warn!(instance = %state.instance_id, "This core is now the active core (leader lease taken)")
            }
            (true, false) => {
                tracing::warn!(instance = %state.instance_id, "This core lost the leader lease: standing by");
                state.agents.close_all();
            }
            _ => {}
        }
    }
    if state.leader.load(Ordering::SeqCst) {
        release(&state.db.pool, &state.instance_id).await;
    }
}
