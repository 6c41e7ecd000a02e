//! Zones: `createZone`, `listZones`, `deleteZone`, and the default zone made on first start.
//!
//! Invariants: zone names are unique; `networktype` is stored as `Basic` or `Advanced`;
//! `allocationstate` is `Enabled` or `Disabled`; only a root admin sees a zone's internal DNS
//! servers and its `systemvmdriver` (a hypervisor URI), as in CloudStack; a zone is deleted only
//! when nothing is left in it ([`crate::model::zones::delete`]).

use serde_json::{Value, json};
use sqlx::Row as _;

use crate::api::{Filter, list_response, success};
use crate::command::{ParamSpec, Ty, opt, req};
use crate::error::ApiError;
use crate::paging::Page;
use crate::params::Params;
use crate::state::{Caller, State};
use crate::util::{new_uuid, now_cs};

/// Name of the zone created on first start.
pub const DEFAULT_ZONE: &str = "default-zone";

/// `createZone` parameters.
pub const CREATE_ZONE: &[ParamSpec] = &[
    req("name", Ty::String, "Zone name"),
    req("networktype", Ty::String, "Basic or Advanced"),
    req("dns1", Ty::String, "First public DNS server"),
    req("internaldns1", Ty::String, "First internal DNS server"),
    opt("dns2", Ty::String, "Second public DNS server"),
    opt("internaldns2", Ty::String, "Second internal DNS server"),
    opt("domain", Ty::String, "Network domain of the zone"),
    opt(
        "allocationstate",
        Ty::String,
        "Enabled or Disabled (default Enabled)",
    ),
    opt(
        "systemvmdriver",
        Ty::String,
        "Ours: how core deploys the zone's system VMs: absent = core's driver, none = not at all (started by hand), libvirt:URI = libvirt domains on that host",
    ),
];
/// `listZones` parameters.
pub const LIST_ZONES: &[ParamSpec] = &[
    opt("id", Ty::Uuid, "Zone id"),
    opt("name", Ty::String, "Zone name"),
    opt("networktype", Ty::String, "Basic or Advanced"),
    opt("available", Ty::Boolean, "Accepted for compatibility"),
    opt("showcapacities", Ty::Boolean, "Accepted for compatibility"),
    opt("keyword", Ty::String, "Substring of the name"),
    opt("page", Ty::Integer, "Page number"),
    opt("pagesize", Ty::Integer, "Page size"),
];
/// `updateZone` parameters.
pub const UPDATE_ZONE: &[ParamSpec] = &[
    req("id", Ty::Uuid, "Zone id"),
    opt("name", Ty::String, "New name"),
    opt("dns1", Ty::String, "First public DNS server"),
    opt("dns2", Ty::String, "Second public DNS server"),
    opt("internaldns1", Ty::String, "First internal DNS server"),
    opt("internaldns2", Ty::String, "Second internal DNS server"),
    opt("ip6dns1", Ty::String, "First IPv6 DNS server"),
    opt("ip6dns2", Ty::String, "Second IPv6 DNS server"),
    opt("domain", Ty::String, "Network domain (empty: none)"),
    opt("guestcidraddress", Ty::String, "Guest CIDR"),
    opt("allocationstate", Ty::String, "Enabled or Disabled"),
    opt(
        "dhcpprovider",
        Ty::String,
        "Accepted for compatibility (VirtualRouter)",
    ),
    opt(
        "localstorageenabled",
        Ty::Boolean,
        "Accepted for compatibility (false)",
    ),
    opt("ispublic", Ty::Boolean, "Accepted for compatibility"),
    opt("sortkey", Ty::Integer, "Accepted for compatibility"),
    opt("dnssearchorder", Ty::String, "Accepted for compatibility"),
    opt("details", Ty::Map, "Accepted for compatibility"),
];
/// `deleteZone` parameters.
pub const DELETE_ZONE: &[ParamSpec] = &[req("id", Ty::Uuid, "Zone id")];

fn network_type(s: &str) -> Result<&'static str, ApiError> {
    match s.to_ascii_lowercase().as_str() {
        "basic" => Ok("Basic"),
        "advanced" => Ok("Advanced"),
        _ => Err(ApiError::param(format!(
            "Invalid network type {s:?}: use Basic or Advanced"
        ))),
    }
}

/// Checks a zone's `systemvmdriver`: `none`, `libvirt:URI`, or the name of core's own driver.
pub fn check_systemvm_driver(spec: &str, state: &State) -> Result<(), ApiError> {
    let own = state.fleet.get().map(|f| f.driver.name());
    let ok = spec == "none"
        || own == Some(spec)
        || spec
            .strip_prefix("libvirt:")
            .is_some_and(|u| u.contains("://") && !u.chars().any(|c| c.is_whitespace() || c.is_control()));
    if !ok {
        return Err(ApiError::param(format!(
            "Invalid systemvmdriver {spec:?}: use none, libvirt:URI, or this core's driver ({})",
            own.unwrap_or("none configured")
        )));
    }
    if spec.starts_with("libvirt:") && state.fleet.get().is_none_or(|f| f.zone_boot.is_none()) {
        return Err(ApiError::param(
            "A zone on a libvirt host needs a system VM image: run core with --driver qemu or libvirt and --vm-image",
        ));
    }
    Ok(())
}

/// What a caller sees of a zone: everything (root admin), or the zone without its internal DNS
/// servers and its system VM driver (users and read-only users).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum View {
    Admin,
    Public,
}

impl View {
    fn of(caller: &Caller) -> Self {
        if caller.role.is_admin() {
            Self::Admin
        } else {
            Self::Public
        }
    }
}

fn zone_json(row: &sqlx::any::AnyRow, view: View) -> Result<Value, sqlx::Error> {
    let nt: String = row.try_get("network_type")?;
    let driver: Option<String> = row.try_get("systemvm_driver")?;
    let mut v = json!({
        "id": row.try_get::<String, _>("id")?,
        "name": row.try_get::<String, _>("name")?,
        "networktype": nt,
        "allocationstate": row.try_get::<String, _>("allocation_state")?,
        "dns1": row.try_get::<Option<String>, _>("dns1")?,
        "dns2": row.try_get::<Option<String>, _>("dns2")?,
        "domain": row.try_get::<Option<String>, _>("domain")?,
        "ip6dns1": row.try_get::<Option<String>, _>("ip6_dns1")?,
        "ip6dns2": row.try_get::<Option<String>, _>("ip6_dns2")?,
        "guestcidraddress": row.try_get::<Option<String>, _>("guest_cidr")?,
        "securitygroupsenabled": nt == "Basic",
        "localstorageenabled": false,
        "dhcpprovider": "VirtualRouter",
        "type": "Core",
        "tags": [],
        "hasannotations": false,
        "created": row.try_get::<String, _>("created")?,
    });
    if view == View::Admin {
        v["internaldns1"] = json!(row.try_get::<Option<String>, _>("internal_dns1")?);
        v["internaldns2"] = json!(row.try_get::<Option<String>, _>("internal_dns2")?);
        if let Some(d) = driver {
            v["systemvmdriver"] = json!(d);
        }
    }
    Ok(v)
}

const SELECT: &str = "SELECT id, name, network_type, allocation_state, dns1, dns2, internal_dns1, internal_dns2, ip6_dns1, ip6_dns2, guest_cidr, domain, created, systemvm_driver FROM zones";

/// A zone to insert.
#[derive(Debug)]
pub struct NewZone<'a> {
    /// Name.
    pub name: &'a str,
    /// `Basic` or `Advanced`.
    pub network_type: &'a str,
    /// `Enabled` or `Disabled`.
    pub allocation_state: &'a str,
    /// DNS servers: dns1, dns2, internaldns1, internaldns2.
    pub dns: [Option<&'a str>; 4],
    /// Network domain.
    pub domain: Option<&'a str>,
}

/// Inserts a zone; returns its id.
pub async fn insert_zone(state: &State, z: &NewZone<'_>) -> Result<String, ApiError> {
    let id = new_uuid().map_err(|e| ApiError::internal(&e))?;
    let opt = |v: Option<&str>| v.map(str::to_owned);
    let r = sqlx::query(
        "INSERT INTO zones (id, name, network_type, allocation_state, dns1, dns2, internal_dns1, internal_dns2, domain, created) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
    )
    .bind(id.clone())
    .bind(z.name.to_owned())
    .bind(z.network_type.to_owned())
    .bind(z.allocation_state.to_owned())
    .bind(opt(z.dns[0]))
    .bind(opt(z.dns[1]))
    .bind(opt(z.dns[2]))
    .bind(opt(z.dns[3]))
    .bind(opt(z.domain))
    .bind(now_cs())
    .execute(&state.db.pool)
    .await;
    match r {
        Ok(_) => Ok(id),
        Err(sqlx::Error::Database(d)) if d.is_unique_violation() => Err(ApiError::param(format!(
            "A zone with name {} already exists",
            z.name
        ))),
        Err(e) => Err(e.into()),
    }
}

/// Creates the default zone when there is no zone at all.
pub async fn ensure_default_zone(state: &State) -> Result<(), ApiError> {
    let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM zones")
        .fetch_one(&state.db.pool)
        .await?;
    if n == 0 {
        insert_zone(
            state,
            &NewZone {
                name: DEFAULT_ZONE,
                network_type: "Advanced",
                allocation_state: "Enabled",
                dns: [Some("8.8.8.8"), None, Some("8.8.8.8"), None],
                domain: None,
            },
        )
        .await?;
    }
    Ok(())
}

/// `updateZone`.
pub async fn update_zone(state: State, caller: Caller, p: Params) -> Result<Value, ApiError> {
    let id = p.non_empty("id").unwrap_or_default();
    let mut up = crate::model::zones::ZoneUpdate {
        name: p.non_empty("name"),
        allocation_state: p.non_empty("allocationstate"),
        fields: Vec::new(),
    };
    for (param, col) in [
        ("dns1", "dns1"),
        ("dns2", "dns2"),
        ("internaldns1", "internal_dns1"),
        ("internaldns2", "internal_dns2"),
        ("ip6dns1", "ip6_dns1"),
        ("ip6dns2", "ip6_dns2"),
        ("domain", "domain"),
        ("guestcidraddress", "guest_cidr"),
    ] {
        if let Some(v) = p.get(param) {
            up.fields.push((col, v));
        }
    }
    crate::model::zones::update(&state.db.pool, id, &up).await?;
    let mut f = Filter::default();
    f.eq("id", id);
    let rows = f.rows(&state.db.pool, SELECT, "").await?;
    let row = rows
        .first()
        .ok_or_else(|| ApiError::param(format!("Unable to find zone by id {id}")))?;
    Ok(json!({ "zone": zone_json(row, View::of(&caller))? }))
}

/// `createZone`.
pub async fn create_zone(state: State, caller: Caller, p: Params) -> Result<Value, ApiError> {
    let allocation_state = match p
        .non_empty("allocationstate")
        .map(str::to_ascii_lowercase)
        .as_deref()
    {
        None | Some("enabled") => "Enabled",
        Some("disabled") => "Disabled",
        Some(other) => {
            return Err(ApiError::param(format!(
                "Invalid allocationstate {other:?}: use Enabled or Disabled"
            )));
        }
    };
    let driver = p.non_empty("systemvmdriver");
    if let Some(d) = driver {
        check_systemvm_driver(d, &state)?;
    }
    let id = insert_zone(
        &state,
        &NewZone {
            name: p.non_empty("name").unwrap_or_default(),
            network_type: network_type(p.non_empty("networktype").unwrap_or_default())?,
            allocation_state,
            dns: [
                p.non_empty("dns1"),
                p.non_empty("dns2"),
                p.non_empty("internaldns1"),
                p.non_empty("internaldns2"),
            ],
            domain: p.non_empty("domain"),
        },
    )
    .await?;
    if let Some(d) = driver {
        sqlx::query("UPDATE zones SET systemvm_driver = $1 WHERE id = $2")
            .bind(d.to_owned())
            .bind(id.clone())
            .execute(&state.db.pool)
            .await?;
    }
    let mut f = Filter::default();
    f.eq("id", &id);
    let rows = f.rows(&state.db.pool, SELECT, "").await?;
    let row = rows
        .first()
        .ok_or_else(|| ApiError::internal(&"zone vanished after insert"))?;
    Ok(json!({ "zone": zone_json(row, View::of(&caller))? }))
}

/// `listZones`.
pub async fn list_zones(state: State, caller: Caller, p: Params) -> Result<Value, ApiError> {
    let page = Page::from_params(&p, crate::model::settings::page_size(&state).await)?;
    let mut f = Filter::default();
    if let Some(id) = p.non_empty("id") {
        f.eq("id", id);
    }
    if let Some(name) = p.non_empty("name") {
        f.eq("name", name);
    }
    if let Some(nt) = p.non_empty("networktype") {
        f.eq("network_type", network_type(nt)?);
    }
    if let Some(k) = p.non_empty("keyword") {
        f.keyword(&["name"], k);
    }
    let total = f.count(&state.db.pool, "zones").await?;
    let rows = f
        .rows(
            &state.db.pool,
            SELECT,
            &format!(" ORDER BY created, name{}", page.sql()),
        )
        .await?;
    let view = View::of(&caller);
    let items = rows
        .iter()
        .map(|r| zone_json(r, view))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(list_response("zone", total, items))
}

/// `deleteZone`: refused (536) while anything is left in the zone.
pub async fn delete_zone(state: State, _caller: Caller, p: Params) -> Result<Value, ApiError> {
    let id = p.non_empty("id").unwrap_or_default();
    crate::model::zones::delete(&state.db.pool, id).await?;
    Ok(success())
}
