//! `updateTemplate`, `updateIso`, `updateTemplatePermissions`, `updateIsoPermissions`,
//! `listTemplatePermissions`, `listIsoPermissions`.
//!
//! Invariants: answers are CloudStack's, quirks included: both permission lists answer under
//! `listtemplatepermissionsresponse` with one `templatepermission` object, not a list; the
//! permission updates answer `{"success":true}`.

use serde_json::{Value, json};

use crate::api::templates::{TEMPLATE_SELECT, flag, template_json, with_tags};
use crate::command::{Access, Command, ParamSpec, Ty, opt, req};
use crate::error::ApiError;
use crate::handler;
use crate::model::template_properties::{self, Permissions, PropertyUpdate, ShareOp};
use crate::params::Params;
use crate::state::{Caller, State};

const UPDATE: &[ParamSpec] = &[
    req("id", Ty::Uuid, "Template or ISO id"),
    opt("name", Ty::String, "New name"),
    opt("displaytext", Ty::String, "New description"),
    opt(
        "format",
        Ty::String,
        "The registered format (a different one is refused)",
    ),
    opt("ostypeid", Ty::Uuid, "OS type (listOsTypes)"),
    opt("bootable", Ty::Boolean, "ISOs: bootable"),
    opt("passwordenabled", Ty::Boolean, "Password reset enabled"),
    opt("sshkeyenabled", Ty::Boolean, "SSH key reset enabled"),
    opt(
        "isdynamicallyscalable",
        Ty::Boolean,
        "VMs from it may be scaled up live",
    ),
    opt("requireshvm", Ty::Boolean, "Templates: requires HVM"),
    opt("isrouting", Ty::Boolean, "Accepted for compatibility"),
    opt("sortkey", Ty::Integer, "Accepted for compatibility"),
    opt("details", Ty::Map, "Accepted for compatibility"),
    opt("cleanupdetails", Ty::Boolean, "Accepted for compatibility"),
    opt("templatetype", Ty::String, "Accepted for compatibility (USER)"),
    opt("arch", Ty::String, "Accepted for compatibility"),
];
const UPDATE_PERMISSIONS: &[ParamSpec] = &[
    req("id", Ty::Uuid, "Template or ISO id"),
    opt("ispublic", Ty::Boolean, "Visible to every account"),
    opt("isfeatured", Ty::Boolean, "Featured (admins)"),
    opt("isextractable", Ty::Boolean, "May be extracted"),
    opt(
        "accounts",
        Ty::String,
        "Comma-separated account names to share with (needs op)",
    ),
    opt("op", Ty::String, "add, remove or reset"),
    opt(
        "projectids",
        Ty::String,
        "Accepted for compatibility (no projects)",
    ),
];
const LIST_PERMISSIONS: &[ParamSpec] = &[req("id", Ty::Uuid, "Template or ISO id")];

/// The template and ISO property commands.
pub static COMMANDS: &[Command] = &[
    Command::new(
        "updateTemplate",
        "Updates a template's name, description, OS type and properties",
        Access::ALL,
        UPDATE,
        handler!(update_template),
    )
    .returns(crate::api::fields::TEMPLATE),
    Command::new(
        "updateIso",
        "Updates an ISO's name, description, OS type and properties",
        Access::ALL,
        UPDATE,
        handler!(update_iso),
    )
    .returns(crate::api::fields::TEMPLATE),
    Command::new(
        "updateTemplatePermissions",
        "Makes a template public, featured, extractable, or shares it with accounts",
        Access::ALL,
        UPDATE_PERMISSIONS,
        handler!(update_template_permissions),
    )
    .returns(crate::api::fields::SUCCESS),
    Command::new(
        "updateIsoPermissions",
        "Makes an ISO public, featured, extractable, or shares it with accounts",
        Access::ALL,
        UPDATE_PERMISSIONS,
        handler!(update_iso_permissions),
    )
    .returns(crate::api::fields::SUCCESS),
    Command::new(
        "listTemplatePermissions",
        "Who may use a template",
        Access::ALL,
        LIST_PERMISSIONS,
        handler!(list_template_permissions),
    )
    .returns(crate::api::fields::TEMPLATE_PERMISSION),
    Command::new(
        "listIsoPermissions",
        "Who may use an ISO",
        Access::ALL,
        LIST_PERMISSIONS,
        handler!(list_iso_permissions),
    )
    .answers_as("listtemplatepermissionsresponse")
    .returns(crate::api::fields::TEMPLATE_PERMISSION),
];

fn opt_flag(p: &Params, name: &str) -> Option<bool> {
    p.non_empty(name).map(|_| flag(p, name, false))
}

async fn update(state: State, caller: Caller, p: Params, iso: bool) -> Result<Value, ApiError> {
    let id = p.non_empty("id").unwrap_or_default();
    let up = PropertyUpdate {
        name: p.non_empty("name"),
        display_text: p.non_empty("displaytext"),
        format: p.non_empty("format"),
        os_type_id: p.non_empty("ostypeid"),
        bootable: opt_flag(&p, "bootable"),
        password_enabled: opt_flag(&p, "passwordenabled"),
        sshkey_enabled: opt_flag(&p, "sshkeyenabled"),
        dynamically_scalable: opt_flag(&p, "isdynamicallyscalable"),
        requires_hvm: opt_flag(&p, "requireshvm"),
    };
    template_properties::update(&state, &caller, id, iso, &up).await?;
    let rows = sqlx::query(&format!("{TEMPLATE_SELECT} WHERE t.id = $1"))
        .bind(id.to_owned())
        .fetch_all(&state.db.pool)
        .await?;
    let row = rows
        .first()
        .ok_or_else(|| ApiError::param(format!("Unable to find template by id {id}")))?;
    let t = with_tags(&state, vec![template_json(row)?]).await?;
    Ok(json!({ (if iso { "iso" } else { "template" }): t[0] }))
}

async fn update_template(state: State, caller: Caller, p: Params) -> Result<Value, ApiError> {
    update(state, caller, p, false).await
}

async fn update_iso(state: State, caller: Caller, p: Params) -> Result<Value, ApiError> {
    update(state, caller, p, true).await
}

async fn update_permissions(state: State, caller: Caller, p: Params, iso: bool) -> Result<Value, ApiError> {
    let share = match (p.non_empty("op"), p.non_empty("accounts")) {
        (None, None) => None,
        (Some(op), accounts) => {
            let op = match op.to_ascii_lowercase().as_str() {
                "add" => ShareOp::Add,
                "remove" => ShareOp::Remove,
                "reset" => ShareOp::Reset,
                other => {
                    return Err(ApiError::param(format!(
                        "Invalid op {other:?}: use add, remove or reset"
                    )));
                }
            };
            let names: Vec<&str> = accounts
                .unwrap_or_default()
                .split(',')
                .map(str::trim)
                .filter(|n| !n.is_empty())
                .collect();
            if op != ShareOp::Reset && names.is_empty() {
                return Err(ApiError::param("op add or remove needs accounts"));
            }
            Some((op, names))
        }
        (None, Some(_)) => return Err(ApiError::param("accounts needs op (add, remove or reset)")),
    };
    let perm = Permissions {
        public: opt_flag(&p, "ispublic"),
        featured: opt_flag(&p, "isfeatured"),
        extractable: opt_flag(&p, "isextractable"),
        share,
    };
    template_properties::set_permissions(&state, &caller, p.non_empty("id").unwrap_or_default(), iso, &perm)
        .await?;
    Ok(json!({ "success": true }))
}

async fn update_template_permissions(state: State, caller: Caller, p: Params) -> Result<Value, ApiError> {
    update_permissions(state, caller, p, false).await
}

async fn update_iso_permissions(state: State, caller: Caller, p: Params) -> Result<Value, ApiError> {
    update_permissions(state, caller, p, true).await
}

async fn list_permissions(state: State, caller: Caller, p: Params, iso: bool) -> Result<Value, ApiError> {
    let id = p.non_empty("id").unwrap_or_default();
    let rows = sqlx::query(&format!(
        "{TEMPLATE_SELECT} WHERE t.id = $1 AND t.is_iso = $2 AND t.removed IS NULL"
    ))
    .bind(id.to_owned())
    .bind(i64::from(iso))
    .fetch_all(&state.db.pool)
    .await?;
    let what = if iso { "ISO" } else { "template" };
    let t = rows
        .first()
        .map(template_json)
        .transpose()?
        .ok_or_else(|| ApiError::param(format!("Unable to find {what} by id {id}")))?;
    let public = t["ispublic"].as_bool().unwrap_or(false);
    if !caller.role.is_admin() && t["accountid"] != caller.account_id.as_str() && !public {
        return Err(ApiError::param(format!("Unable to find {what} by id {id}")));
    }
    let mut v = json!({ "id": id, "ispublic": public });
    if caller.role.is_admin() {
        v["domainid"] = t["domainid"].clone();
    }
    let accounts = template_properties::shared_with(&state, id).await?;
    if !accounts.is_empty() {
        v["account"] = json!(accounts);
    }
    Ok(json!({ "templatepermission": v }))
}

async fn list_template_permissions(state: State, caller: Caller, p: Params) -> Result<Value, ApiError> {
    list_permissions(state, caller, p, false).await
}

async fn list_iso_permissions(state: State, caller: Caller, p: Params) -> Result<Value, ApiError> {
    list_permissions(state, caller, p, true).await
}
