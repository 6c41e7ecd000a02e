//! Consoles: core's inventory of VM consoles (`addConsoleTarget`, `listConsoleTargets`,
//! `deleteConsoleTarget`: our own commands, for VMs core does not deploy), CloudStack's
//! `createConsoleEndpoint`, and `rotateConsoleKeys`.
//!
//! Invariants:
//! * a console password is stored for sealing tokens only: no answer ever carries it (lists say
//!   `haspassword`), and it reaches a proxy only inside an encrypted token;
//! * a link goes through a console proxy whose agent is Up and that reported an endpoint, in the
//!   VM's zone, with spare sessions; among those, the proxy that served the VM's latest session
//!   is preferred (affinity), then the least loaded;
//! * each link carries a fresh session id that opens one session across the whole fleet (the
//!   proxy claims it from core before connecting, see `agent::claim`);
//! * key rotation keeps the previous key live, so links issued just before still open.

use serde_json::{Value, json};
use sqlx::Row as _;
use systemvm_proto::Secret;
use systemvm_proto::console::{ConsoleTarget, ConsoleTokenClaims, ViewerMode, VmRef, new_session_id};

use crate::api::{Filter, list_response, success};
use crate::command::{ParamSpec, Ty, opt, req};
use crate::error::ApiError;
use crate::model::consoles::{self, pick_proxy};
use crate::model::{settings, systemvms};
use crate::paging::Page;
use crate::params::Params;
use crate::state::{Caller, State};
use crate::util::{new_uuid, now_cs};

/// `addConsoleTarget` parameters.
pub const ADD_CONSOLE_TARGET: &[ParamSpec] = &[
    req("name", Ty::String, "VM name, shown in the console"),
    opt(
        "host",
        Ty::String,
        "Host name or address of the VNC server (with port)",
    ),
    opt("port", Ty::Integer, "TCP port of the VNC server (with host)"),
    opt(
        "hypervisorvm",
        Ty::String,
        "Instead of host/port: the VM's name on a hypervisor host core knows (libvirt domain); its VNC endpoint is read when a link is made",
    ),
    opt(
        "password",
        Ty::String,
        "VNC password (stored for sealing tokens; never shown)",
    ),
    opt(
        "id",
        Ty::Uuid,
        "Id to use (the VM's id in the system that runs it); default: a new one",
    ),
    opt("zoneid", Ty::Uuid, "Zone (default: the oldest zone)"),
    opt("accountid", Ty::Uuid, "Owning account (default: the caller's)"),
];
/// `listConsoleTargets` parameters.
pub const LIST_CONSOLE_TARGETS: &[ParamSpec] = &[
    opt("id", Ty::Uuid, "Id"),
    opt("name", Ty::String, "Name"),
    opt("zoneid", Ty::Uuid, "Zone id"),
    opt("keyword", Ty::String, "Substring of the name"),
    opt("page", Ty::Integer, "Page number"),
    opt("pagesize", Ty::Integer, "Page size"),
];
/// `deleteConsoleTarget` parameters.
pub const DELETE_CONSOLE_TARGET: &[ParamSpec] = &[req("id", Ty::Uuid, "Id")];
/// `createConsoleEndpoint` parameters.
pub const CREATE_CONSOLE_ENDPOINT: &[ParamSpec] = &[
    req("virtualmachineid", Ty::Uuid, "The VM"),
    opt(
        "token",
        Ty::String,
        "CloudStack's extra validation token: accepted for compatibility, not checked",
    ),
];

const SELECT: &str = "SELECT c.id, c.name, c.zone_id, z.name AS zone_name, c.account_id, a.name AS account_name, c.host, c.port, c.password, c.hypervisor_ref, c.created FROM console_targets c JOIN zones z ON z.id = c.zone_id LEFT JOIN accounts a ON a.id = c.account_id";

fn target_json(row: &sqlx::any::AnyRow) -> Result<Value, sqlx::Error> {
    let mut v = json!({
        "id": row.try_get::<String, _>("id")?,
        "name": row.try_get::<String, _>("name")?,
        "host": row.try_get::<String, _>("host")?,
        "port": row.try_get::<i64, _>("port")?,
        "haspassword": row.try_get::<Option<String>, _>("password")?.is_some(),
        "zoneid": row.try_get::<String, _>("zone_id")?,
        "zonename": row.try_get::<String, _>("zone_name")?,
        "accountid": row.try_get::<String, _>("account_id")?,
        "account": row.try_get::<Option<String>, _>("account_name")?.unwrap_or_default(),
        "created": row.try_get::<String, _>("created")?,
    });
    if let Some(r) = row.try_get::<Option<String>, _>("hypervisor_ref")? {
        v["hypervisorvm"] = json!(r);
    }
    Ok(v)
}

fn check_host(host: &str) -> Result<(), ApiError> {
    let ok = !host.is_empty()
        && host.len() <= 253
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'_'));
    if ok {
        Ok(())
    } else {
        Err(ApiError::param(format!(
            "Invalid host {host:?}: expected a host name or an IP address"
        )))
    }
}

/// `addConsoleTarget`.
pub async fn add_console_target(state: State, caller: Caller, p: Params) -> Result<Value, ApiError> {
    let name = p.non_empty("name").unwrap_or_default();
    if name.len() > 255 {
        return Err(ApiError::param("name is longer than 255 characters"));
    }
    let hypervisor_ref = p.non_empty("hypervisorvm");
    let (host, port) = match (hypervisor_ref, p.non_empty("host"), p.non_empty("port")) {
        (Some(r), None, None) => {
            if r.len() > 255 || r.chars().any(|c| c.is_control() || c.is_whitespace()) {
                return Err(ApiError::param(format!("Invalid hypervisorvm {r:?}")));
            }
            ("", 0)
        }
        (None, Some(host), Some(port)) => {
            check_host(host)?;
            let port: i64 = port.parse().unwrap_or(0);
            if !(1..=65535).contains(&port) {
                return Err(ApiError::param(format!("Invalid port {port}: expected 1-65535")));
            }
            (host, port)
        }
        _ => {
            return Err(ApiError::param(
                "Give either host and port of the VNC server, or hypervisorvm",
            ));
        }
    };
    let password = p.get("password").filter(|v| !v.is_empty());
    if password.is_some_and(|v| v.len() > 256) {
        return Err(ApiError::param("password is longer than 256 characters"));
    }
    let zone_id: String = match p.non_empty("zoneid") {
        Some(z) => sqlx::query_scalar("SELECT id FROM zones WHERE id = $1")
            .bind(z.to_owned())
            .fetch_optional(&state.db.pool)
            .await?
            .ok_or_else(|| ApiError::param(format!("Unable to find zone by id {z}")))?,
        None => sqlx::query_scalar("SELECT id FROM zones ORDER BY created, name LIMIT 1")
            .fetch_optional(&state.db.pool)
            .await?
            .ok_or_else(|| ApiError::param("No zone exists: create one first"))?,
    };
    let account_id: String = match p.non_empty("accountid") {
        Some(a) => sqlx::query_scalar("SELECT id FROM accounts WHERE id = $1")
            .bind(a.to_owned())
            .fetch_optional(&state.db.pool)
            .await?
            .ok_or_else(|| ApiError::param(format!("Unable to find account by id {a}")))?,
        None => caller.account_id.clone(),
    };
    let id = match p.non_empty("id") {
        Some(i) => i.to_ascii_lowercase(),
        None => new_uuid().map_err(|e| ApiError::internal(&e))?,
    };
    let r = sqlx::query(
        "INSERT INTO console_targets (id, name, zone_id, account_id, host, port, password, created, hypervisor_ref) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
    )
    .bind(id.clone())
    .bind(name.to_owned())
    .bind(zone_id)
    .bind(account_id)
    .bind(host.to_owned())
    .bind(port)
    .bind(password.map(str::to_owned))
    .bind(now_cs())
    .bind(hypervisor_ref.map(str::to_owned))
    .execute(&state.db.pool)
    .await;
    match r {
        Ok(_) => {}
        Err(sqlx::Error::Database(d)) if d.is_unique_violation() => {
            return Err(ApiError::param(format!(
                "A console target with id {id} already exists"
            )));
        }
        Err(e) => return Err(e.into()),
    }
    tracing::info!(%id, name, host, port, "Added a console target");
    let row = sqlx::query(&format!("{SELECT} WHERE c.id = $1"))
        .bind(id)
        .fetch_one(&state.db.pool)
        .await?;
    Ok(json!({ "consoletarget": target_json(&row)? }))
}

/// `listConsoleTargets`.
pub async fn list_console_targets(state: State, caller: Caller, p: Params) -> Result<Value, ApiError> {
    let page = Page::from_params(&p, crate::model::settings::page_size(&state).await)?;
    let mut f = Filter::default();
    if !caller.role.is_admin() {
        f.eq("c.account_id", &caller.account_id);
    }
    if let Some(v) = p.non_empty("id") {
        f.eq("c.id", &v.to_ascii_lowercase());
    }
    if let Some(v) = p.non_empty("name") {
        f.eq("c.name", v);
    }
    if let Some(v) = p.non_empty("zoneid") {
        f.eq("c.zone_id", v);
    }
    if let Some(k) = p.non_empty("keyword") {
        f.keyword(&["c.name"], k);
    }
    let total = f
        .count(
            &state.db.pool,
            "console_targets c JOIN zones z ON z.id = c.zone_id",
        )
        .await?;
    let rows = f
        .rows(
            &state.db.pool,
            SELECT,
            &format!(" ORDER BY c.created, c.name{}", page.sql()),
        )
        .await?;
    let items = rows.iter().map(target_json).collect::<Result<Vec<_>, _>>()?;
    Ok(list_response("consoletarget", total, items))
}

/// `deleteConsoleTarget`.
pub async fn delete_console_target(state: State, _caller: Caller, p: Params) -> Result<Value, ApiError> {
    let id = p.non_empty("id").unwrap_or_default().to_ascii_lowercase();
    let done = sqlx::query("DELETE FROM console_targets WHERE id = $1")
        .bind(id.clone())
        .execute(&state.db.pool)
        .await?;
    if done.rows_affected() == 0 {
        return Err(ApiError::param(format!(
            "Unable to find console target by id {id}"
        )));
    }
    crate::model::tags::forget(&state.db.pool, &id).await?;
    Ok(success())
}

/// `createConsoleEndpoint`: CloudStack answers `success: false` with `details` (not an error)
/// when no link can be made; so does this.
pub async fn create_console_endpoint(state: State, caller: Caller, p: Params) -> Result<Value, ApiError> {
    let vm_id = p
        .non_empty("virtualmachineid")
        .unwrap_or_default()
        .to_ascii_lowercase();
    let row = sqlx::query(
        "SELECT name, zone_id, account_id, host, port, password, hypervisor_ref FROM console_targets WHERE id = $1",
    )
    .bind(vm_id.clone())
    .fetch_optional(&state.db.pool)
    .await?;
    let Some(row) = row else {
        // Not a console target: a system VM's own console (the UI's System VMs page).
        return system_vm_console(&state, &caller, &vm_id).await;
    };
    let owner: String = row.try_get("account_id")?;
    if !caller.role.is_admin() && owner != caller.account_id {
        return Err(ApiError::denied(format!(
            "Account {} has no access to virtual machine {vm_id}",
            caller.account_name
        )));
    }
    let zone_id: String = row.try_get("zone_id")?;
    let failed = |details: String| json!({ "consoleendpoint": { "success": false, "details": details } });
    let target = match row.try_get::<Option<String>, _>("hypervisor_ref")? {
        Some(guest) => match guest_console(&state, &guest).await {
            Ok(Some(vnc)) => ConsoleTarget::Vnc {
                host: vnc.host,
                port: vnc.port,
                password: vnc.password,
            },
            Ok(None) => {
                return Ok(failed(format!(
                    "VM {guest} has no VNC console on the hypervisor hosts core knows (not running?)"
                )));
            }
            Err(error) => {
                // The driver's text (commands, host names) stays in the log.
                tracing::warn!(%error, %guest, "Could not read a guest VM's console from its hypervisor");
                return Ok(failed(format!(
                    "Could not ask the hypervisor about VM {guest}; the management server log says why"
                )));
            }
        },
        None => {
            let port_i: i64 = row.try_get("port")?;
            ConsoleTarget::Vnc {
                host: row.try_get("host")?,
                port: u16::try_from(port_i).unwrap_or(0),
                password: row.try_get::<Option<String>, _>("password")?.map(Secret),
            }
        }
    };
    let name: String = row.try_get("name")?;
    issue_link(&state, &vm_id, &name, &zone_id, target).await
}

/// A system VM's console: the VNC console its driver gives it (libvirt domains), or CloudStack's
/// `success: false` with why not. Admin and Resource Admin role types only, as the System VMs page.
async fn system_vm_console(state: &State, caller: &Caller, vm_id: &str) -> Result<Value, ApiError> {
    let not_found = || ApiError::param(format!("Unable to find virtual machine by id {vm_id}"));
    if !crate::roles::Access::INFRA.includes(caller.role.role_type()) {
        return Err(not_found());
    }
    let info = systemvms::start_info(&state.db.pool, vm_id)
        .await?
        .ok_or_else(not_found)?;
    let failed = |details: String| json!({ "consoleendpoint": { "success": false, "details": details } });
    let Some(fleet) = state.fleet.get() else {
        return Ok(failed(format!(
            "System VM {} is not deployed by core (started by hand): it has no console core can open",
            info.name
        )));
    };
    let spec = info.driver.as_deref().or(info.zone_driver.as_deref());
    let Some(driver) = fleet.driver_for(spec) else {
        return Ok(failed(format!(
            "System VM {} has no driver core can ask for its console",
            info.name
        )));
    };
    match driver.console_of(&info.name).await {
        Ok(Some(vnc)) => {
            let target = ConsoleTarget::Vnc {
                host: vnc.host,
                port: vnc.port,
                password: vnc.password,
            };
            issue_link(state, vm_id, &info.name, &info.zone_id, target).await
        }
        Ok(None) => Ok(failed(format!(
            "System VM {} has no VNC console: the {} driver does not give its VMs one",
            info.name,
            driver.name()
        ))),
        Err(error) => {
            tracing::warn!(%error, vm = %info.name, "Could not read a system VM's console from its driver");
            Ok(failed(format!(
                "Could not ask the driver about system VM {}; the management server log says why",
                info.name
            )))
        }
    }
}

/// Seals a one-time link to `target` for VM `vm_id` through a console proxy of `zone_id`.
async fn issue_link(
    state: &State,
    vm_id: &str,
    display_name: &str,
    zone_id: &str,
    target: ConsoleTarget,
) -> Result<Value, ApiError> {
    let failed = |details: String| json!({ "consoleendpoint": { "success": false, "details": details } });
    let timeout_ms = i64::try_from(settings::uint(state, &settings::HEARTBEAT_TIMEOUT).await)
        .unwrap_or(i64::MAX / 2000)
        .saturating_mul(1000);
    let candidates = systemvms::proxy_candidates(&state.db, zone_id, timeout_ms).await?;
    let affinity = consoles::affinity(&state.db.pool, vm_id).await?;
    let Some(proxy) = pick_proxy(&candidates, &affinity) else {
        let details = if candidates.is_empty() {
            format!("No console proxy is Up in zone {zone_id}")
        } else {
            "Every console proxy in the zone is at its session limit; try again shortly".to_owned()
        };
        tracing::warn!(%vm_id, %details, "No console link made");
        return Ok(failed(details));
    };
    let public = crate::model::certificates::public_url(
        state,
        systemvm_proto::agent::AgentRole::ConsoleProxy,
        &proxy.endpoint,
    )
    .await;
    let endpoint: http::Uri = match public.parse() {
        Ok(u) => u,
        Err(_) => {
            return Ok(failed(format!(
                "Console proxy {} reported an invalid endpoint",
                proxy.id
            )));
        }
    };
    let secure = endpoint.scheme_str() == Some("https");
    let host = endpoint.host().unwrap_or_default().to_owned();
    let port = endpoint.port_u16().unwrap_or(if secure { 443 } else { 80 });
    let validity = settings::zone_uint(state, zone_id, &settings::PROXY_URL_VALIDITY).await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let claims = ConsoleTokenClaims {
        target,
        vm: VmRef {
            id: vm_id.to_owned(),
            display_name: display_name.to_owned(),
        },
        session_id: new_session_id().map_err(|e| ApiError::internal(&e))?,
        not_before: now.saturating_sub(5),
        expires: now.saturating_add(validity),
        client_ip: None,
        allowed_origins: Vec::new(),
        viewer: ViewerMode::Interactive,
        keyboard_locale: None,
    };
    // Sealed with the stored keys, not this core's cache: the other core may have rotated them.
    let token = consoles::current_keys(state)
        .await?
        .seal(&claims)
        .map_err(|e| ApiError::internal(&e))?;
    let base = public.trim_end_matches('/');
    tracing::info!(%vm_id, proxy = %proxy.id, "Console link issued");
    Ok(json!({ "consoleendpoint": {
        "success": true,
        "details": format!("Console link valid for {validity} s, one session"),
        "url": format!("{base}/console?token={token}"),
        "websocket": {
            "token": token,
            "host": host,
            "port": port.to_string(),
            "path": "websockify",
            "extra": "",
        },
    }}))
}

/// Asks each guest driver (hypervisor hosts core knows) for `guest`'s VNC endpoint.
async fn guest_console(
    state: &State,
    guest: &str,
) -> Result<Option<crate::fleet::VncEndpoint>, crate::fleet::DriverError> {
    for driver in &state.guest_drivers {
        if let Some(vnc) = driver.console_of(guest).await? {
            return Ok(Some(vnc));
        }
    }
    Ok(None)
}

/// `rotateConsoleKeys`: new primary key, the previous one kept, older ones retired; the set is
/// stored, then pushed to every connected console proxy by the core holding the lease (either
/// core may receive the command).
pub async fn rotate_console_keys(state: State, _caller: Caller, _p: Params) -> Result<Value, ApiError> {
    let r = consoles::rotate(&state).await?;
    let mut v = json!({ "primary": r.primary, "keys": r.keys });
    if let Some(n) = r.pushed {
        v["proxiesupdated"] = json!(n);
    }
    Ok(json!({ "consolekeys": v }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts() {
        for ok in ["10.0.0.1", "::1", "kvm-host-1.example.com"] {
            assert!(check_host(ok).is_ok(), "{ok}");
        }
        for bad in ["", "a b", "x;rm", "h/p"] {
            assert!(check_host(bad).is_err(), "{bad}");
        }
    }
}
