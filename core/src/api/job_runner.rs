//! Async job executor: async commands are recorded in `async_jobs` and run on tokio tasks.
//!
//! Invariants: a job row exists (status 0) before its task starts, so `queryAsyncJobResult` never
//! misses a returned `jobid`; a task ends by writing status 1 with the handler's result or status 2
//! with the error body, and `jobresultcode` = the error code; jobs left pending by a previous run
//! are failed at start (530), since their tasks died with that process; shutdown aborts running
//! jobs, which the next start then fails the same way.

use serde_json::{Value, json};

use crate::command::Command;
use crate::error::ApiError;
use crate::params::Params;
use crate::state::{Caller, State};
use crate::util::{new_uuid, now_cs};

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

/// Records a job for `cmd` and starts it; returns the job id.
pub async fn submit(
    state: &State,
    caller: &Caller,
    cmd: &'static Command,
    params: Params,
) -> Result<String, ApiError> {
    let id = new_uuid().map_err(|e| ApiError::internal(&e))?;
    let instance_id = params.non_empty("id").map(str::to_owned);
    sqlx::query(
        "INSERT INTO async_jobs (id, account_id, user_id, cmd, status, result_code, instance_type, instance_id, created) VALUES ($1, $2, $3, $4, 0, 0, $5, $6, $7)",
    )
    .bind(id.clone())
    .bind(caller.account_id.clone())
    .bind(caller.user_id.clone())
    .bind(cmd_class(cmd.name))
    .bind(instance_id.as_ref().map(|_| "None".to_owned()))
    .bind(instance_id)
    .bind(now_cs())
    .execute(&state.db.pool)
    .await?;
    let (st, who, job_id) = (state.clone(), caller.clone(), id.clone());
    let mut running = state.jobs.lock().await;
    // Reap finished jobs so the set only holds running ones.
    while running.try_join_next().is_some() {}
    running.spawn(async move {
        // The handler runs on its own task so that a panic still ends the job (530); aborting
        // this task (shutdown) aborts the handler too.
        let handler = tokio::spawn((cmd.handler)(st.clone(), who, params));
        let _abort = AbortOnDrop(handler.abort_handle());
        let outcome = handler
            .await
            .unwrap_or_else(|e| Err(ApiError::internal(&format_args!("job task failed: {e}"))));
        let (status, code, result) = match outcome {
            Ok(v) => (status::SUCCEEDED, 0, v),
            Err(e) => (status::FAILED, i64::from(e.code), e.body()),
        };
        let write = sqlx::query(
            "UPDATE async_jobs SET status = $1, result_code = $2, result = $3, completed = $4 WHERE id = $5",
        )
        .bind(status)
        .bind(code)
        .bind(result.to_string())
        .bind(now_cs())
        .bind(job_id.clone())
        .execute(&st.db.pool)
        .await;
        if let Err(error) = write {
            tracing::error!(%error, job = %job_id, "Failed to record an async job's result");
        }
    });
    Ok(id)
}

/// Fails jobs a previous run left pending.
pub async fn fail_orphans(db: &sqlx::AnyPool) -> Result<u64, sqlx::Error> {
    let body = ApiError::new(
        530,
        crate::error::cs::SERVER_API,
        "job interrupted by a restart of the management service",
    )
    .body();
    let done = sqlx::query(
        "UPDATE async_jobs SET status = 2, result_code = 530, result = $1, completed = $2 WHERE status = 0",
    )
    .bind(body.to_string())
    .bind(now_cs())
    .execute(db)
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
        sqlx::query("INSERT INTO async_jobs (id, account_id, user_id, cmd, status, result_code, created) VALUES ('j', 'a', 'u', 'c', 0, 0, 't')")
            .execute(&db.pool)
            .await
            .unwrap();
        assert_eq!(fail_orphans(&db.pool).await.unwrap(), 1);
        let row = sqlx::query("SELECT id, account_id, user_id, cmd, status, result_code, result, instance_type, instance_id, created, completed FROM async_jobs")
            .fetch_one(&db.pool)
            .await
            .unwrap();
        let v = job_json(&row).unwrap();
        assert_eq!(v["jobstatus"], 2);
        assert_eq!(v["jobresultcode"], 530);
        assert_eq!(v["jobresult"]["errorcode"], 530);
        assert!(v["completed"].is_string());
        assert_eq!(row.try_get::<i64, _>("status").unwrap(), 2);
        assert_eq!(fail_orphans(&db.pool).await.unwrap(), 0);
    }

    #[test]
    fn class_name() {
        assert_eq!(
            cmd_class("deleteAccount"),
            "org.apache.cloudstack.api.command.DeleteAccountCmd"
        );
    }
}
