//! The async job executor: async commands are recorded in `async_jobs` and run on tokio tasks,
//! on the receiving core, or on the core holding the leader lease for commands marked `leader`
//! in the command table (they act on system VMs or need their connections).
//!
//! Invariants:
//! * a job row exists (status 0) before its task starts, so `queryAsyncJobResult` never misses a
//!   returned `jobid`, on either core (the row is in the shared database);
//! * a task ends by writing status 1 with the handler's result or status 2 with the error body,
//!   and `jobresultcode` = the error code;
//! * each running job names its owner (the core running it); a leader job is owned by nobody
//!   until the lease holder claims it with a conditional update, so exactly one core runs it;
//! * a pending job is failed (530) only when its owner is gone (no heartbeat within the lease
//!   TTL, database clock), never while the core running it lives; shutdown aborts this core's
//!   running jobs and removes its heartbeat, so they fail at once.

use std::time::Duration;

use serde_json::{Value, json};
use sqlx::Row as _;
use tokio::sync::watch;

use crate::command::Command;
use crate::error::ApiError;
use crate::fleet::lease;
use crate::params::Params;
use crate::state::{Caller, State};
use crate::util::{new_uuid, now_cs};

/// How often the lease holder looks for leader jobs (also woken when one is queued here), and
/// every core for jobs whose owner died.
pub const POLL: Duration = Duration::from_millis(500);
/// A leader job nobody claimed for this long fails (no core held the lease meanwhile).
pub const UNCLAIMED_TIMEOUT: Duration = Duration::from_secs(300);

/// Job status values (`jobstatus`).
pub mod status {
    /// Pending.
    pub const PENDING: i64 = 0;
    /// Succeeded.
    pub const SUCCEEDED: i64 = 1;
    /// Failed.
    pub const FAILED: i64 = 2;
}

/// The Java-style class name CloudStack reports in `cmd` (`DeleteAccountCmd`).
pub fn cmd_class(name: &str) -> String {
    let mut c = name.chars();
    let first = c
        .next()
        .map(|f| f.to_ascii_uppercase().to_string())
        .unwrap_or_default();
    format!("org.apache.cloudstack.api.command.{first}{}Cmd", c.as_str())
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Records a job for `cmd` and starts it here, or queues it for the lease holder; returns the
/// job id.
pub async fn submit(
    state: &State,
    caller: &Caller,
    cmd: &'static Command,
    params: Params,
) -> Result<String, ApiError> {
    let id = new_uuid().map_err(|e| ApiError::internal(&e))?;
    let instance_id = params.non_empty("id").map(str::to_owned);
    let (owner, stored_params) = if cmd.leader {
        (None, Some(json!(params.list).to_string()))
    } else {
        (Some(state.instance_id.clone()), None)
    };
    sqlx::query(
        "INSERT INTO async_jobs (id, account_id, user_id, cmd, status, result_code, instance_type, instance_id, created, owner, leader_only, params) VALUES ($1, $2, $3, $4, 0, 0, $5, $6, $7, $8, $9, $10)",
    )
    .bind(id.clone())
    .bind(caller.account_id.clone())
    .bind(caller.user_id.clone())
    .bind(cmd_class(cmd.name))
    .bind(instance_id.as_ref().map(|_| "None".to_owned()))
    .bind(instance_id)
    .bind(now_cs())
    .bind(owner)
    .bind(i64::from(cmd.leader))
    .bind(stored_params)
    .execute(&state.db.pool)
    .await?;
    if cmd.leader {
        state.jobs_wakeup.notify_one();
    } else {
        spawn(state, caller.clone(), cmd, params, id.clone()).await;
    }
    Ok(id)
}

async fn spawn(state: &State, caller: Caller, cmd: &'static Command, params: Params, job_id: String) {
    let st = state.clone();
    let mut running = state.jobs.lock().await;
    // Reap finished jobs so the set only holds running ones.
    while running.try_join_next().is_some() {}
    running.spawn(async move {
        // The handler runs on its own task so that a panic still ends the job (530); aborting
        // this task (shutdown) aborts the handler too.
        let handler = tokio::spawn((cmd.handler)(st.clone(), caller, params));
        let _abort = AbortOnDrop(handler.abort_handle());
        let outcome = handler
            .await
            .unwrap_or_else(|e| Err(ApiError::internal(&format_args!("job task failed: {e}"))));
        let (status, code, result) = match outcome {
            Ok(v) => (status::SUCCEEDED, 0, v),
            Err(e) => (status::FAILED, i64::from(e.code), e.body()),
        };
        if let Err(error) = finish(&st.db.pool, &job_id, status, code, &result).await {
            tracing::error!(%error, job = %job_id, "Failed to record an async job's result");
        }
    });
}

async fn finish(
    pool: &sqlx::AnyPool,
    id: &str,
    status: i64,
    code: i64,
    result: &Value,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE async_jobs SET status = $1, result_code = $2, result = $3, completed = $4 WHERE id = $5",
    )
    .bind(status)
    .bind(code)
    .bind(result.to_string())
    .bind(now_cs())
    .bind(id.to_owned())
    .execute(pool)
    .await
    .map(|_| ())
}

/// The job runner task: on the lease holder, claims and runs queued leader jobs; on every core,
/// fails pending jobs whose owner is gone. Until `stop`.
pub async fn run(state: State, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut ticks: u64 = 0;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = state.jobs_wakeup.notified() => {}
            _ = stop.changed() => return,
        }
        ticks = ticks.wrapping_add(1);
        if state.is_leader()
            && let Err(error) = run_leader_jobs(&state).await
        {
            tracing::warn!(%error, "Could not read the jobs queued for the active core");
        }
        if ticks.is_multiple_of(10) {
            match fail_orphans(&state.db).await {
                Ok(0) => {}
                Ok(n) => tracing::warn!(count = n, "Failed async jobs whose management server is gone"),
                Err(error) => tracing::warn!(%error, "Could not check for orphaned async jobs"),
            }
        }
    }
}

async fn run_leader_jobs(state: &State) -> Result<(), sqlx::Error> {
    let queued = sqlx::query(
        "SELECT id, cmd, user_id, params FROM async_jobs WHERE status = 0 AND leader_only = 1 AND owner IS NULL ORDER BY created",
    )
    .fetch_all(&state.db.pool)
    .await?;
    for row in queued {
        let id: String = row.try_get("id")?;
        let claimed =
            sqlx::query("UPDATE async_jobs SET owner = $1 WHERE id = $2 AND owner IS NULL AND status = 0")
                .bind(state.instance_id.clone())
                .bind(id.clone())
                .execute(&state.db.pool)
                .await?;
        if claimed.rows_affected() != 1 {
            continue;
        }
        let class: String = row.try_get("cmd")?;
        let user_id: String = row.try_get("user_id")?;
        let raw: Option<String> = row.try_get("params")?;
        let fail = |why: &str| {
            ApiError::new(
                crate::error::code::INTERNAL_ERROR,
                crate::error::cs::SERVER_API,
                why,
            )
            .body()
        };
        let Some(cmd) = crate::api::table().iter().find(|c| cmd_class(c.name) == class) else {
            finish(
                &state.db.pool,
                &id,
                status::FAILED,
                530,
                &fail("this management server does not know the command"),
            )
            .await?;
            continue;
        };
        let list: Option<Vec<(String, String)>> = raw.as_deref().and_then(|r| serde_json::from_str(r).ok());
        let Some(list) = list else {
            finish(
                &state.db.pool,
                &id,
                status::FAILED,
                530,
                &fail("the job's parameters are unreadable"),
            )
            .await?;
            continue;
        };
        let caller = match crate::model::directory::auth::by_id(state, &user_id).await? {
            Some(u) => u.caller,
            None => {
                let e = ApiError::denied("The user who submitted the job no longer exists or is disabled");
                finish(&state.db.pool, &id, status::FAILED, i64::from(e.code), &e.body()).await?;
                continue;
            }
        };
        tracing::info!(job = %id, command = cmd.name, "Running a job for the active core");
        spawn(state, caller, cmd, Params { list }, id).await;
    }
    Ok(())
}

/// Fails pending jobs whose owner is gone (no core heartbeat within the lease TTL), jobs of
/// builds without owners, and leader jobs no core claimed within [`UNCLAIMED_TIMEOUT`].
pub async fn fail_orphans(db: &crate::db::Db) -> Result<u64, sqlx::Error> {
    let body = ApiError::new(
        530,
        crate::error::cs::SERVER_API,
        "job interrupted: the management server running it stopped",
    )
    .body();
    let unclaimed_since =
        crate::util::now_ms() - i64::try_from(UNCLAIMED_TIMEOUT.as_millis()).unwrap_or(i64::MAX / 2);
    let done = sqlx::query(&format!(
        "UPDATE async_jobs SET status = 2, result_code = 530, result = $1, completed = $2 WHERE status = 0 AND ((owner IS NOT NULL AND {dead}) OR (owner IS NULL AND leader_only = 0) OR (owner IS NULL AND leader_only = 1 AND created < $3))",
        dead = lease::dead_core_sql(db, "owner")
    ))
    .bind(body.to_string())
    .bind(now_cs())
    .bind(crate::util::format_cs(
        time::OffsetDateTime::from_unix_timestamp(unclaimed_since / 1000).unwrap_or(time::OffsetDateTime::UNIX_EPOCH),
    ))
    .execute(&db.pool)
    .await?;
    Ok(done.rows_affected())
}

/// A job row as CloudStack's `AsyncJobResponse`.
pub fn job_json(row: &sqlx::any::AnyRow) -> Result<Value, sqlx::Error> {
    use sqlx::Row as _;
    let status: i64 = row.try_get("status")?;
    let mut v = json!({
        "jobid": row.try_get::<String, _>("id")?,
        "accountid": row.try_get::<String, _>("account_id")?,
        "userid": row.try_get::<String, _>("user_id")?,
        "cmd": row.try_get::<String, _>("cmd")?,
        "jobstatus": status,
        "jobprocstatus": 0,
        "jobresultcode": row.try_get::<i64, _>("result_code")?,
        "jobresulttype": "object",
        "created": row.try_get::<String, _>("created")?,
    });
    if let Some(t) = row.try_get::<Option<String>, _>("instance_type")? {
        v["jobinstancetype"] = json!(t);
    }
    if let Some(i) = row.try_get::<Option<String>, _>("instance_id")? {
        v["jobinstanceid"] = json!(i);
    }
    if status != status::PENDING {
        let raw: Option<String> = row.try_get("result")?;
        v["jobresult"] = raw
            .and_then(|r| serde_json::from_str(&r).ok())
            .unwrap_or_else(|| json!({}));
        if let Some(c) = row.try_get::<Option<String>, _>("completed")? {
            v["completed"] = json!(c);
        }
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn orphans_fail_with_530() {
        use sqlx::Row as _;
        let dir = tempfile::tempdir().unwrap();
        let db = crate::db::Db::open(None, dir.path()).await.unwrap();
        // A job of a live core stays; one of a dead core and one without an owner fail.
        lease::heartbeat(&db, "alive").await.unwrap();
        for (id, owner) in [("j", None), ("k", Some("gone")), ("live", Some("alive"))] {
            sqlx::query("INSERT INTO async_jobs (id, account_id, user_id, cmd, status, result_code, created, owner) VALUES ($1, 'a', 'u', 'c', 0, 0, 't', $2)")
                .bind(id)
                .bind(owner)
                .execute(&db.pool)
                .await
                .unwrap();
        }
        assert_eq!(fail_orphans(&db).await.unwrap(), 2);
        let live: i64 = sqlx::query_scalar("SELECT status FROM async_jobs WHERE id = 'live'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
        assert_eq!(live, 0, "the live core's job is not failed");
        let row = sqlx::query("SELECT id, account_id, user_id, cmd, status, result_code, result, instance_type, instance_id, created, completed FROM async_jobs WHERE id = 'j'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
        let v = job_json(&row).unwrap();
        assert_eq!(v["jobstatus"], 2);
        assert_eq!(v["jobresultcode"], 530);
        assert_eq!(v["jobresult"]["errorcode"], 530);
        assert!(v["completed"].is_string());
        assert_eq!(row.try_get::<i64, _>("status").unwrap(), 2);
        assert_eq!(fail_orphans(&db).await.unwrap(), 0);
    }

    #[test]
    fn class_name() {
        assert_eq!(
            cmd_class("deleteAccount"),
            "org.apache.cloudstack.api.command.DeleteAccountCmd"
        );
    }
}
