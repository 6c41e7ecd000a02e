//! Cross-zone copies: `copyTemplate`, `copyIso` (the HTTP side of [`crate::model::copies`]).
//!
//! Invariants: both are asynchronous and, as CloudStack's, end when every destination holds the
//! template (or the first copy failed, with its reason); the copies are recorded before the job
//! waits, so they go on when the job's core goes away. The answer is the template as the first
//! destination zone lists it.

use serde_json::{Value, json};

use crate::api::templates::{TEMPLATE_SELECT, answers};
use crate::command::{Command, ParamSpec, Ty, opt, req};
use crate::error::ApiError;
use crate::model::copies;
use crate::params::Params;
use crate::roles::Access;
use crate::state::{Caller, State};

/// `copyTemplate` / `copyIso` parameters.
pub const COPY: &[ParamSpec] = &[
    req("id", Ty::Uuid, "Template or ISO id"),
    opt(
        "destzoneid",
        Ty::Uuid,
        "Zone to copy to (or destzoneids; not both)",
    ),
    opt(
        "destzoneids",
        Ty::String,
        "Zones to copy to, comma-separated (or destzoneid; not both)",
    ),
    opt(
        "sourcezoneid",
        Ty::Uuid,
        "Zone to copy from (default: the first zone where it is installed)",
    ),
];

/// This module's commands.
pub static COMMANDS: &[Command] = &[
    Command::new(
        "copyTemplate",
        "Copies a template to other zones: each zone's storage VM fetches it from a storage VM that holds it",
        Access::ALL,
        COPY,
        crate::handler!(copy_template),
    )
    .asynchronous()
    .returns(crate::api::fields::TEMPLATE),
    Command::new(
        "copyIso",
        "Copies an ISO to other zones: each zone's storage VM fetches it from a storage VM that holds it",
        Access::ALL,
        COPY,
        crate::handler!(copy_iso),
    )
    .asynchronous()
    .returns(crate::api::fields::TEMPLATE),
];

/// The destination zones: `destzoneids` (comma-separated) or `destzoneid`, CloudStack's rules.
fn destinations(p: &Params) -> Result<Vec<String>, ApiError> {
    let list: Vec<String> = p
        .non_empty("destzoneids")
        .map(|v| {
            v.split(',')
                .map(str::trim)
                .filter(|z| !z.is_empty())
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default();
    match (p.non_empty("destzoneid"), list.is_empty()) {
        (Some(_), false) => Err(ApiError::param(
            "Both destzoneid and destzoneids cannot be specified at the same time.",
        )),
        (Some(z), true) => Ok(vec![z.to_owned()]),
        (None, false) => {
            for z in &list {
                if uuid_like(z).is_none() {
                    return Err(ApiError::param(format!("Invalid zone id {z:?} in destzoneids")));
                }
            }
            let mut out: Vec<String> = Vec::new();
            for z in list {
                if !out.contains(&z) {
                    out.push(z);
                }
            }
            Ok(out)
        }
        (None, true) => Err(ApiError::param(
            "Either destzoneid or destzoneids parameters have to be specified.",
        )),
    }
}

/// `Some` when `s` is a UUID (8-4-4-4-12 hex digits).
fn uuid_like(s: &str) -> Option<()> {
    let parts: Vec<&str> = s.split('-').collect();
    let lens = [8, 4, 4, 4, 12];
    (parts.len() == 5
        && parts
            .iter()
            .zip(lens)
            .all(|(p, n)| p.len() == n && p.bytes().all(|b| b.is_ascii_hexdigit())))
    .then_some(())
}

async fn copy(state: State, caller: Caller, p: Params, iso: bool) -> Result<Value, ApiError> {
    let id = p.non_empty("id").unwrap_or_default();
    let zones = destinations(&p)?;
    copies::request(&state, &caller, id, iso, p.non_empty("sourcezoneid"), &zones).await?;
    copies::wait(&state, id, &zones).await?;
    let rows = sqlx::query(&format!("{TEMPLATE_SELECT} WHERE t.id = $1 AND p.zone_id = $2"))
        .bind(id.to_owned())
        .bind(zones[0].clone())
        .fetch_all(&state.db.pool)
        .await?;
    let items = answers(&state, &rows).await?;
    let item = items.into_iter().next().unwrap_or(Value::Null);
    let key = if iso { "iso" } else { "template" };
    Ok(json!({ key: item }))
}

/// `copyTemplate` (async).
pub async fn copy_template(state: State, caller: Caller, p: Params) -> Result<Value, ApiError> {
    copy(state, caller, p, false).await
}

/// `copyIso` (async).
pub async fn copy_iso(state: State, caller: Caller, p: Params) -> Result<Value, ApiError> {
    copy(state, caller, p, true).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuids() {
        assert!(uuid_like("0b0a2f6e-3c4d-4e5f-8a9b-0c1d2e3f4a5b").is_some());
        assert!(uuid_like("0b0a2f6e-3c4d-4e5f-8a9b-0c1d2e3f4a5").is_none());
        assert!(uuid_like("zone-a").is_none());
    }
}
