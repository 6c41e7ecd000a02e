//! `queryAsyncJobResult` and `listAsyncJobs`.
//!
//! Invariants: a non-admin caller only sees jobs of its own account (another account's job id is
//! answered as not found, so ids cannot be probed); the list key is `asyncjobs`.

use serde_json::Value;

use crate::api::job_runner::job_json;
use crate::api::{Filter, list_response};
use crate::command::{ParamSpec, Ty, opt, req};
use crate::error::ApiError;
use crate::paging::Page;
use crate::params::Params;
use crate::state::{Caller, State};

/// `queryAsyncJobResult` parameters.
pub const QUERY_ASYNC_JOB_RESULT: &[ParamSpec] = &[req("jobid", Ty::Uuid, "Job id")];
/// `listAsyncJobs` parameters.
pub const LIST_ASYNC_JOBS: &[ParamSpec] = &[
    opt("keyword", Ty::String, "Substring of the command class"),
    opt("listall", Ty::Boolean, "Accepted for compatibility"),
    opt("page", Ty::Integer, "Page number"),
    opt("pagesize", Ty::Integer, "Page size"),
];

const SELECT: &str = "SELECT id, account_id, user_id, cmd, status, result_code, result, instance_type, instance_id, created, completed FROM async_jobs";

fn scope(caller: &Caller, f: &mut Filter) {
    if !caller.role.is_admin() {
        f.eq("account_id", &caller.account_id);
    }
}

/// `queryAsyncJobResult`.
pub async fn query_async_job_result(state: State, caller: Caller, p: Params) -> Result<Value, ApiError> {
    let id = p.non_empty("jobid").unwrap_or_default();
    let mut f = Filter::default();
    f.eq("id", id);
    scope(&caller, &mut f);
    let rows = f.rows(&state.db.pool, SELECT, "").await?;
    let row = rows
        .first()
        .ok_or_else(|| ApiError::param(format!("Unable to find a job by id {id}")))?;
    Ok(job_json(row)?)
}

/// `listAsyncJobs`.
pub async fn list_async_jobs(state: State, caller: Caller, p: Params) -> Result<Value, ApiError> {
    let page = Page::from_params(&p, crate::model::settings::page_size(&state).await)?;
    let mut f = Filter::default();
    scope(&caller, &mut f);
    if let Some(k) = p.non_empty("keyword") {
        f.keyword(&["cmd"], k);
    }
    let total = f.count(&state.db.pool, "async_jobs").await?;
    let rows = f
        .rows(
            &state.db.pool,
            SELECT,
            &format!(" ORDER BY created, id{}", page.sql()),
        )
        .await?;
    let items = rows.iter().map(job_json).collect::<Result<Vec<_>, _>>()?;
    Ok(list_response("asyncjobs", total, items))
}
