//! The leader lease and core heartbeats: with two cores on one PostgreSQL database, one holds the
//! lease and acts (fleet manager, download dispatcher, agent endpoint, jobs for the lease holder);
//! the other serves the API and takes over when the lease runs out. Every core also stamps its
//! row in `core_instances`, so a core can tell whether the owner of a job is still alive.
//!
//! Invariants: the lease is one row (`leases.name = 'leader'`) changed only by conditional
//! updates, judged by the database's clock (never a core's own), so at most one core holds an
//! unexpired lease whatever the cores' clocks say; a core that fails to renew drops its
//! leadership locally before the lease can expire ([`RENEW`] < [`TTL`] / 2), and closes its agent
//! connections so agents move to the new leader; a core is alive while its heartbeat is younger
//! than [`TTL`].

use std::time::Duration;

use tokio::sync::watch;

use crate::db::Db;
use crate::state::State;
use crate::util::now_cs;

/// How long a lease (and a core heartbeat) lasts without renewal.
pub const TTL: Duration = Duration::from_secs(6);
/// How often the holder renews it (and a standby tries to take it).
pub const RENEW: Duration = Duration::from_secs(2);

const NAME: &str = "leader";

/// [`TTL`] in milliseconds.
pub fn ttl_ms() -> i64 {
    i64::try_from(TTL.as_millis()).unwrap_or(6000)
}

/// Takes or renews the lease for `holder`; true when `holder` holds it afterwards.
pub async fn try_acquire(db: &Db, holder: &str) -> Result<bool, sqlx::Error> {
    let now = db.now_ms_sql();
    sqlx::query(&format!(
        "INSERT INTO leases (name, holder, expires_ms) VALUES ($1, $2, {now} + $3) ON CONFLICT (name) DO NOTHING"
    ))
    .bind(NAME)
    .bind(holder.to_owned())
    .bind(ttl_ms())
    .execute(&db.pool)
    .await?;
    let done = sqlx::query(&format!(
        "UPDATE leases SET holder = $1, expires_ms = {now} + $2 WHERE name = $3 AND (holder = $1 OR expires_ms < {now})"
    ))
    .bind(holder.to_owned())
    .bind(ttl_ms())
    .bind(NAME)
    .execute(&db.pool)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Gives the lease up (clean shutdown), so the standby takes over at once.
pub async fn release(db: &Db, holder: &str) {
    let _ = sqlx::query("UPDATE leases SET expires_ms = 0 WHERE name = $1 AND holder = $2")
        .bind(NAME)
        .bind(holder.to_owned())
        .execute(&db.pool)
        .await;
}

/// Stamps this core's heartbeat (database clock).
pub async fn heartbeat(db: &Db, instance: &str) -> Result<(), sqlx::Error> {
    sqlx::query(&format!(
        "INSERT INTO core_instances (id, heartbeat_ms, started) VALUES ($1, {now}, $2) ON CONFLICT (id) DO UPDATE SET heartbeat_ms = {now}",
        now = db.now_ms_sql()
    ))
    .bind(instance.to_owned())
    .bind(now_cs())
    .execute(&db.pool)
    .await
    .map(|_| ())
}

/// This core stops: its row goes, so the other core fails its unfinished jobs at once.
pub async fn deregister(db: &Db, instance: &str) {
    let _ = sqlx::query("DELETE FROM core_instances WHERE id = $1")
        .bind(instance.to_owned())
        .execute(&db.pool)
        .await;
}

/// The SQL condition "core `col` is not alive" (no heartbeat within [`TTL`], database clock).
pub fn dead_core_sql(db: &Db, col: &str) -> String {
    format!(
        "{col} NOT IN (SELECT id FROM core_instances WHERE heartbeat_ms >= {} - {})",
        db.now_ms_sql(),
        ttl_ms()
    )
}

/// Keeps `state.leader` in step with the lease and this core's heartbeat fresh, until `stop`.
pub async fn run(state: State, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(RENEW);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => break,
        }
        if let Err(error) = heartbeat(&state.db, &state.instance_id).await {
            tracing::warn!(%error, "Core heartbeat failed");
        }
        let held = match tokio::time::timeout(RENEW, try_acquire(&state.db, &state.instance_id)).await {
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
        let was = state.leader.swap(held, std::sync::atomic::Ordering::SeqCst);
        match (was, held) {
            (false, true) => {
                tracing::warn!(instance = %state.instance_id, "This core is now the active core (leader lease taken)");
                state.jobs_wakeup.notify_one();
            }
            (true, false) => {
                tracing::warn!(instance = %state.instance_id, "This core lost the leader lease: standing by");
                state.agents.close_all();
            }
            _ => {}
        }
    }
    if state.is_leader() {
        release(&state.db, &state.instance_id).await;
    }
    deregister(&state.db, &state.instance_id).await;
}
