//! `listVirtualMachines` over the VMs core knows — its console targets (a VNC endpoint, or a
//! guest domain on a `--guest-libvirt` host) — so the UI shows their console button and Ansible's
//! `cs_instance_info` finds them (its `listVolumes` call is answered by `api::volumes`).
//!
//! Invariants: a caller lists the VMs of its scope (`model::directory::Scope`); the state is
//! `Running` (core opens their consoles; it does not run them); no address or password of the
//! target is answered.

use serde_json::{Value, json};
use sqlx::Row as _;

use crate::api::{Filter, list_response};
use crate::command::{Access, Command, ParamSpec, Ty, opt};
use crate::error::ApiError;
use crate::handler;
use crate::model::directory::Scope;
use crate::paging::Page;
use crate::params::Params;
use crate::state::{Caller, State};

const LIST_VMS: &[ParamSpec] = &[
    opt("id", Ty::Uuid, "VM id"),
    opt("ids", Ty::String, "Comma-separated VM ids"),
    opt("name", Ty::String, "VM name"),
    opt("zoneid", Ty::Uuid, "VMs of this zone"),
    opt("account", Ty::String, "VMs of this account"),
    opt("domainid", Ty::Uuid, "VMs of accounts in this domain"),
    opt("state", Ty::String, "Running (the only state here)"),
    opt("keyword", Ty::String, "Substring of the name"),
    opt("listall", Ty::Boolean, "Every VM the caller may see"),
    opt("details", Ty::String, "Accepted for compatibility"),
    opt("hostid", Ty::Uuid, "Accepted for compatibility"),
    opt("projectid", Ty::Uuid, "Accepted for compatibility"),
    opt("isrecursive", Ty::Boolean, "Accepted for compatibility"),
    opt("page", Ty::Integer, "Page number"),
    opt("pagesize", Ty::Integer, "Page size"),
];

/// The VM list command.
pub static COMMANDS: &[Command] = &[Command::new(
    "listVirtualMachines",
    "Lists the VMs whose consoles core opens",
    Access::ALL,
    LIST_VMS,
    handler!(list_virtual_machines),
)
.returns(crate::api::fields::VIRTUAL_MACHINE)];

const SELECT: &str = "SELECT c.id, c.name, c.zone_id, z.name AS zone_name, c.account_id, a.name AS account_name, d.id AS domain_id, d.name AS domain_name, c.hypervisor_ref, c.created FROM console_targets c JOIN zones z ON z.id = c.zone_id LEFT JOIN accounts a ON a.id = c.account_id LEFT JOIN domains d ON d.id = a.domain_id";
const FROM: &str = "console_targets c JOIN zones z ON z.id = c.zone_id LEFT JOIN accounts a ON a.id = c.account_id LEFT JOIN domains d ON d.id = a.domain_id";

fn vm_json(row: &sqlx::any::AnyRow) -> Result<Value, sqlx::Error> {
    let name: String = row.try_get("name")?;
    let libvirt: Option<String> = row.try_get("hypervisor_ref")?;
    Ok(json!({
        "id": row.try_get::<String, _>("id")?,
        "name": name,
        "displayname": name,
        "instancename": libvirt.unwrap_or_else(|| name.clone()),
        "state": "Running",
        "zoneid": row.try_get::<String, _>("zone_id")?,
        "zonename": row.try_get::<String, _>("zone_name")?,
        "accountid": row.try_get::<String, _>("account_id")?,
        "account": row.try_get::<Option<String>, _>("account_name")?,
        "domainid": row.try_get::<Option<String>, _>("domain_id")?,
        "domain": row.try_get::<Option<String>, _>("domain_name")?,
        "hypervisor": "KVM",
        "created": row.try_get::<String, _>("created")?,
        "haenable": false,
        "isdynamicallyscalable": false,
        "passwordenabled": false,
        "hostcontrolstate": "Enabled",
        "nic": [],
        "securitygroup": [],
        "affinitygroup": [],
        "tags": [],
        "details": {},
    }))
}

/// `listVirtualMachines`.
async fn list_virtual_machines(state: State, caller: Caller, p: Params) -> Result<Value, ApiError> {
    let page = Page::from_params(&p, crate::model::settings::page_size(&state).await)?;
    let mut f = Filter::default();
    Scope::of(&caller).restrict(&mut f, "c.account_id", "d.path");
    if let Some(id) = p.non_empty("id") {
        f.eq("c.id", id);
    }
    if let Some(ids) = p.non_empty("ids") {
        let ids: Vec<&str> = ids.split(',').map(str::trim).filter(|i| !i.is_empty()).collect();
        f.any_of("c.id", &ids);
    }
    if let Some(n) = p.non_empty("name") {
        f.eq("c.name", n);
    }
    if let Some(z) = p.non_empty("zoneid") {
        f.eq("c.zone_id", z);
    }
    if let Some(a) = p.non_empty("account") {
        f.eq("a.name", a);
    }
    if let Some(d) = p.non_empty("domainid") {
        f.eq("a.domain_id", d);
    }
    if let Some(s) = p.non_empty("state")
        && !s.eq_ignore_ascii_case("running")
    {
        return Ok(json!({}));
    }
    if let Some(k) = p.non_empty("keyword") {
        f.keyword(&["c.name"], k);
    }
    let total = f.count(&state.db.pool, FROM).await?;
    let rows = f
        .rows(
            &state.db.pool,
            SELECT,
            &format!(" ORDER BY c.created, c.id{}", page.sql()),
        )
        .await?;
    let items = rows.iter().map(vm_json).collect::<Result<Vec<_>, _>>()?;
    Ok(list_response("virtualmachine", total, items))
}
