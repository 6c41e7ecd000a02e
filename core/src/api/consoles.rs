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
use systemvm_proto::agent::{AgentRole, ConsoleKeys, CoreMessage, KeysUpdate, Load};
use systemvm_proto::console::{ConsoleTarget, ConsoleTokenClaims, ViewerMode, VmRef, new_session_id};

use crate::agent::UP;
use crate::api::{Filter, list_response, success};
use crate::command::{ParamSpec, Ty, opt, req};
use crate::error::ApiError;
use crate::paging::Page;
use crate::params::Params;
use crate::state::{Caller, Role, State};
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
    let page = Page::from_params(&p, state.page_size().await)?;
    let mut f = Filter::default();
    if caller.role != Role::Admin {
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
    Ok(success())
}

/// A console proxy that can take a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    /// System VM id.
    pub id: String,
    /// Base URL browsers reach it at.
    pub endpoint: String,
    /// Open sessions.
    pub active: u64,
    /// Most sessions (0: unknown).
    pub max: u64,
}

/// Picks a proxy: the one that served the VM's latest session when it still has room, else the
/// least loaded by fill ratio (ties: fewer sessions, then the order given).
pub fn pick_proxy<'a>(candidates: &'a [Candidate], affinity: &[String]) -> Option<&'a Candidate> {
    let has_room = |c: &&Candidate| c.max == 0 || c.active < c.max;
    for preferred in affinity {
        if let Some(c) = candidates.iter().filter(has_room).find(|c| &c.id == preferred) {
            return Some(c);
        }
    }
    candidates.iter().filter(has_room).min_by(|a, b| {
        let ratio = |c: &Candidate| {
            if c.max == 0 {
                0.0
            } else {
                c.active as f64 / c.max as f64
            }
        };
        ratio(a).total_cmp(&ratio(b)).then(a.active.cmp(&b.active))
    })
}

async fn candidates(state: &State, zone_id: &str) -> Result<Vec<Candidate>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT id, endpoint, last_load FROM system_vms WHERE role = $1 AND agent_state = $2 AND zone_id = $3 AND endpoint IS NOT NULL AND removed IS NULL AND state <> 'Stopping' ORDER BY name",
    )
    .bind(AgentRole::ConsoleProxy.as_str())
    .bind(UP)
    .bind(zone_id.to_owned())
    .fetch_all(&state.db.pool)
    .await?;
    let mut out = Vec::new();
    for row in rows {
        let id: String = row.try_get("id")?;
        if state.agents.connection(&id).is_none() {
            continue;
        }
        let load = row
            .try_get::<Option<String>, _>("last_load")?
            .and_then(|l| serde_json::from_str::<Load>(&l).ok())
            .and_then(|l| l.console)
            .unwrap_or_default();
        out.push(Candidate {
            id,
            endpoint: row.try_get("endpoint")?,
            active: load.active_sessions,
            max: load.max_sessions,
        });
    }
    Ok(out)
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
    .await?
    .ok_or_else(|| ApiError::param(format!("Unable to find virtual machine by id {vm_id}")))?;
    let owner: String = row.try_get("account_id")?;
    if caller.role != Role::Admin && owner != caller.account_id {
        return Err(ApiError::denied(format!(
            "Account {} has no access to virtual machine {vm_id}",
            caller.account_name
        )));
    }
    let zone_id: String = row.try_get("zone_id")?;
    let failed = |details: String| json!({ "consoleendpoint": { "success": false, "details": details } });
    let candidates = candidates(&state, &zone_id).await?;
    let affinity: Vec<String> = sqlx::query_scalar(
        "SELECT proxy_id FROM console_sessions WHERE vm_id = $1 ORDER BY claimed_ms DESC LIMIT 3",
    )
    .bind(vm_id.clone())
    .fetch_all(&state.db.pool)
    .await?;
    let Some(proxy) = pick_proxy(&candidates, &affinity) else {
        let details = if candidates.is_empty() {
            format!("No console proxy is Up in zone {zone_id}")
        } else {
            "Every console proxy in the zone is at its session limit; try again shortly".to_owned()
        };
        tracing::warn!(%vm_id, %details, "No console link made");
        return Ok(failed(details));
    };
    let endpoint: http::Uri = match proxy.endpoint.parse() {
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
    let validity: u64 = state
        .setting("consoleproxy.url.validity")
        .await
        .parse()
        .unwrap_or(300);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
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
            Err(e) => {
                return Ok(failed(format!(
                    "Could not ask the hypervisor about VM {guest}: {e}"
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
    let claims = ConsoleTokenClaims {
        target,
        vm: VmRef {
            id: vm_id.clone(),
            display_name: row.try_get("name")?,
        },
        session_id: new_session_id().map_err(|e| ApiError::internal(&e))?,
        not_before: now.saturating_sub(5),
        expires: now.saturating_add(validity),
        client_ip: None,
        allowed_origins: Vec::new(),
        viewer: ViewerMode::Interactive,
        keyboard_locale: None,
    };
    let token = state
        .console_keys()
        .seal(&claims)
        .map_err(|e| ApiError::internal(&e))?;
    let base = proxy.endpoint.trim_end_matches('/');
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
/// stored, then pushed to every connected console proxy.
pub async fn rotate_console_keys(state: State, _caller: Caller, _p: Params) -> Result<Value, ApiError> {
    let mut set = state.console_keys();
    let previous = set.ids();
    let new_id = set.rotate().map_err(|e| ApiError::internal(&e))?;
    let keep_from = previous.iter().copied().max().unwrap_or(new_id);
    for id in previous {
        if id < keep_from {
            set.retire(id);
        }
    }
    let json_text = set.to_json().map_err(|e| ApiError::internal(&e))?;
    sqlx::query("UPDATE core_keys SET value = $1, created = $2 WHERE name = 'console'")
        .bind(json_text)
        .bind(now_cs())
        .execute(&state.db.pool)
        .await?;
    let keys = ConsoleKeys::from_key_set(&set).map_err(|e| ApiError::internal(&e))?;
    let ids = set.ids();
    *state
        .console_keys
        .write()
        .unwrap_or_else(std::sync::PoisonError::into_inner) = set;
    let pushed = state.agents.broadcast(
        AgentRole::ConsoleProxy,
        &CoreMessage::KeysUpdate(KeysUpdate { console_keys: keys }),
    );
    tracing::info!(
        primary = new_id,
        ?ids,
        proxies = pushed,
        "Rotated the console-token keys"
    );
    Ok(json!({ "consolekeys": { "primary": new_id, "keys": ids, "proxiesupdated": pushed } }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(id: &str, active: u64, max: u64) -> Candidate {
        Candidate {
            id: id.into(),
            endpoint: format!("http://{id}"),
            active,
            max,
        }
    }

    #[test]
    fn picks_affinity_then_least_loaded() {
        let cs = [c("a", 5, 10), c("b", 1, 10), c("c", 10, 10)];
        assert_eq!(pick_proxy(&cs, &[]).unwrap().id, "b");
        assert_eq!(pick_proxy(&cs, &["a".into()]).unwrap().id, "a");
        // A full proxy loses its affinity.
        assert_eq!(pick_proxy(&cs, &["c".into(), "a".into()]).unwrap().id, "a");
        assert_eq!(pick_proxy(&cs, &["gone".into()]).unwrap().id, "b");
        assert!(pick_proxy(&[c("x", 3, 3)], &[]).is_none());
        assert!(pick_proxy(&[], &[]).is_none());
        // Fill ratio, not raw count.
        assert_eq!(pick_proxy(&[c("a", 4, 100), c("b", 2, 4)], &[]).unwrap().id, "a");
    }

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
