//! `listApis`, generated from the command table.
//!
//! Invariant: a caller is shown exactly the commands it may call, each with every parameter it
//! accepts (the command table) and the fields of the object it answers (`api::fields`).

use serde_json::{Value, json};

use crate::api::list_response;
use crate::command::{Command, ParamSpec, Ty, opt};
use crate::error::ApiError;
use crate::params::Params;
use crate::state::{Caller, State};

/// `listApis` parameters.
pub const LIST_APIS: &[ParamSpec] = &[opt("name", Ty::String, "Exact command name")];

fn api_json(c: &Command) -> Value {
    let params: Vec<Value> = c
        .params
        .iter()
        .map(|p| {
            json!({
                "name": p.name,
                "type": p.ty.name(),
                "required": p.required,
                "description": p.description,
                "length": 255,
                "related": "",
            })
        })
        .collect();
    json!({
        "name": c.name,
        "description": c.description,
        "isasync": c.is_async,
        "since": "4.0.0",
        "related": "",
        "params": params,
        "response": c
            .returns
            .iter()
            .map(|(name, description)| json!({ "name": name, "description": description }))
            .collect::<Vec<_>>(),
    })
}

/// `listApis`.
pub async fn list_apis(_state: State, caller: Caller, p: Params) -> Result<Value, ApiError> {
    let name = p.non_empty("name");
    let items: Vec<Value> = crate::api::table()
        .iter()
        .filter(|c| c.allowed(caller.role))
        .filter(|c| name.is_none_or(|n| c.name == n))
        .map(api_json)
        .collect();
    let total = i64::try_from(items.len()).unwrap_or(i64::MAX);
    Ok(list_response("api", total, items))
}
