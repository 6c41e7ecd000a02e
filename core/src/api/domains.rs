//! Domains and roles: `listDomains`, `listDomainChildren`, `createDomain`, `updateDomain`,
//! `deleteDomain` (async), `listRoles`, `listRolePermissions`.
//!
//! Invariants: a caller lists the domains of its scope (a user: its own domain only); the
//! predefined roles are answered from `crate::roles`, the one place they are defined.

use serde_json::{Value, json};

use crate::api::{Filter, list_response, success};
use crate::command::{Access, Command, ParamSpec, Ty, opt, req};
use crate::error::ApiError;
use crate::handler;
use crate::model::directory::Scope;
use crate::model::directory::domains::{self, COLUMNS, Domain};
use crate::paging::Page;
use crate::params::Params;
use crate::roles::{Role, RoleType};
use crate::state::{Caller, State};

const LIST_DOMAINS: &[ParamSpec] = &[
    opt("id", Ty::Uuid, "Domain id"),
    opt("name", Ty::String, "Domain name"),
    opt("level", Ty::Integer, "Domains at this depth (ROOT is 0)"),
    opt("keyword", Ty::String, "Substring of the name"),
    opt("listall", Ty::Boolean, "Every domain the caller may see"),
    opt("details", Ty::String, "Accepted for compatibility"),
    opt("showicon", Ty::Boolean, "Accepted for compatibility"),
    opt("page", Ty::Integer, "Page number"),
    opt("pagesize", Ty::Integer, "Page size"),
];
const LIST_CHILDREN: &[ParamSpec] = &[
    opt("id", Ty::Uuid, "Parent domain (default: the caller's)"),
    opt(
        "isrecursive",
        Ty::Boolean,
        "All descendants, not only the children",
    ),
    opt("name", Ty::String, "Domain name"),
    opt("keyword", Ty::String, "Substring of the name"),
    opt("listall", Ty::Boolean, "Accepted for compatibility"),
    opt("page", Ty::Integer, "Page number"),
    opt("pagesize", Ty::Integer, "Page size"),
];
const CREATE_DOMAIN: &[ParamSpec] = &[
    req("name", Ty::String, "Domain name"),
    opt(
        "parentdomainid",
        Ty::Uuid,
        "Parent domain (default: the caller's)",
    ),
    opt(
        "networkdomain",
        Ty::String,
        "Network domain for the domain's networks",
    ),
    opt(
        "domainid",
        Ty::Uuid,
        "Id of the new domain (default: chosen by core)",
    ),
];
const UPDATE_DOMAIN: &[ParamSpec] = &[
    req("id", Ty::Uuid, "Domain id"),
    opt("name", Ty::String, "New name"),
    opt("networkdomain", Ty::String, "Network domain"),
];
const DELETE_DOMAIN: &[ParamSpec] = &[
    req("id", Ty::Uuid, "Domain id"),
    opt(
        "cleanup",
        Ty::Boolean,
        "true: also delete its subdomains, accounts and users; false (default): refuse while it has any",
    ),
];
const LIST_ROLES: &[ParamSpec] = &[
    opt("id", Ty::Uuid, "Role id"),
    opt("name", Ty::String, "Role name"),
    opt(
        "type",
        Ty::String,
        "Role type: Admin, ResourceAdmin, DomainAdmin or User",
    ),
    opt("keyword", Ty::String, "Substring of the name"),
    opt("page", Ty::Integer, "Page number"),
    opt("pagesize", Ty::Integer, "Page size"),
];
const LIST_ROLE_PERMISSIONS: &[ParamSpec] = &[opt("roleid", Ty::Uuid, "Role id (default: every role)")];

/// The domain and role commands.
pub static COMMANDS: &[Command] = &[
    Command::new(
        "listDomains",
        "Lists the domains the caller may see",
        Access::ADMINS,
        LIST_DOMAINS,
        handler!(list_domains),
    )
    .returns(crate::api::fields::DOMAIN),
    Command::new(
        "listDomainChildren",
        "Lists the subdomains of a domain",
        Access::ADMINS,
        LIST_CHILDREN,
        handler!(list_domain_children),
    )
    .returns(crate::api::fields::DOMAIN),
    Command::new(
        "createDomain",
        "Creates a domain",
        Access::DOMAIN,
        CREATE_DOMAIN,
        handler!(create_domain),
    )
    .returns(crate::api::fields::DOMAIN),
    Command::new(
        "updateDomain",
        "Renames a domain or sets its network domain",
        Access::ADMIN,
        UPDATE_DOMAIN,
        handler!(update_domain),
    )
    .returns(crate::api::fields::DOMAIN),
    Command::new(
        "deleteDomain",
        "Deletes a domain",
        Access::DOMAIN,
        DELETE_DOMAIN,
        handler!(delete_domain),
    )
    .asynchronous()
    .returns(crate::api::fields::SUCCESS),
    Command::new(
        "listRoles",
        "Lists the predefined roles",
        Access::ADMINS,
        LIST_ROLES,
        handler!(list_roles),
    )
    .returns(crate::api::fields::ROLE),
    Command::new(
        "listRolePermissions",
        "Lists the rules of the predefined roles",
        Access::ADMIN,
        LIST_ROLE_PERMISSIONS,
        handler!(list_role_permissions),
    )
    .returns(crate::api::fields::ROLE_PERMISSION),
];

async fn domain_json(state: &State, d: &Domain) -> Result<Value, sqlx::Error> {
    let children: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM domains WHERE parent_id = $1")
        .bind(d.id.clone())
        .fetch_one(&state.db.pool)
        .await?;
    let parent_name = match &d.parent_id {
        Some(p) => domains::get(state, p).await?.map(|p| p.name),
        None => None,
    };
    let unlimited = "Unlimited";
    Ok(json!({
        "id": d.id,
        "name": d.name,
        "level": d.level,
        "parentdomainid": d.parent_id,
        "parentdomainname": parent_name,
        "haschild": children > 0,
        "path": d.display_path(),
        "networkdomain": d.network_domain,
        "state": d.state,
        "created": d.created,
        "vmlimit": unlimited, "vmtotal": 0, "vmavailable": unlimited,
        "templatelimit": unlimited, "templateavailable": unlimited,
        "secondarystoragelimit": unlimited, "secondarystorageavailable": unlimited,
    }))
}

async fn answer_list(state: &State, f: &Filter, p: &Params) -> Result<Value, ApiError> {
    let page = Page::from_params(p, crate::model::settings::page_size(state).await)?;
    let total = f.count(&state.db.pool, "domains d").await?;
    let rows = f
        .rows(
            &state.db.pool,
            &format!("SELECT {COLUMNS} FROM domains d"),
            &format!(" ORDER BY d.level, d.path{}", page.sql()),
        )
        .await?;
    let mut items = Vec::with_capacity(rows.len());
    for row in &rows {
        items.push(domain_json(state, &domains::from_row(row)?).await?);
    }
    Ok(list_response("domain", total, items))
}

/// `listDomains`.
async fn list_domains(state: State, caller: Caller, p: Params) -> Result<Value, ApiError> {
    let mut f = Filter::default();
    // CloudStack: Admins see every domain; others their own, or their subtree with listall.
    match Scope::of(&caller) {
        Scope::All => {}
        Scope::Subtree(path) if p.non_empty("listall") == Some("true") => f.prefix("d.path", &path),
        Scope::Subtree(_) | Scope::Account(_) => f.eq("d.id", &caller.domain_id),
    }
    if let Some(id) = p.non_empty("id") {
        f.eq("d.id", id);
    }
    if let Some(n) = p.non_empty("name") {
        f.eq("d.name", n);
    }
    if let Some(l) = p.non_empty("level") {
        f.eq("CAST(d.level AS TEXT)", l);
    }
    if let Some(k) = p.non_empty("keyword") {
        f.keyword(&["d.name"], k);
    }
    answer_list(&state, &f, &p).await
}

/// `listDomainChildren`.
async fn list_domain_children(state: State, caller: Caller, p: Params) -> Result<Value, ApiError> {
    let parent =
        domains::get_in_scope(&state, &caller, p.non_empty("id").unwrap_or(&caller.domain_id)).await?;
    let mut f = Filter::default();
    if p.non_empty("isrecursive") == Some("true") {
        f.prefix("d.path", &parent.path);
        f.ne("d.id", &parent.id);
    } else {
        f.eq("d.parent_id", &parent.id);
    }
    if let Some(n) = p.non_empty("name") {
        f.eq("d.name", n);
    }
    if let Some(k) = p.non_empty("keyword") {
        f.keyword(&["d.name"], k);
    }
    answer_list(&state, &f, &p).await
}

/// `createDomain`.
async fn create_domain(state: State, caller: Caller, p: Params) -> Result<Value, ApiError> {
    let d = domains::create(
        &state,
        &caller,
        p.non_empty("name").unwrap_or_default(),
        p.non_empty("parentdomainid"),
        p.non_empty("networkdomain"),
        p.non_empty("domainid"),
    )
    .await?;
    Ok(json!({ "domain": domain_json(&state, &d).await? }))
}

/// `updateDomain`.
async fn update_domain(state: State, caller: Caller, p: Params) -> Result<Value, ApiError> {
    let d = domains::update(
        &state,
        &caller,
        p.non_empty("id").unwrap_or_default(),
        p.non_empty("name"),
        p.get("networkdomain"),
    )
    .await?;
    Ok(json!({ "domain": domain_json(&state, &d).await? }))
}

/// `deleteDomain` (async).
async fn delete_domain(state: State, caller: Caller, p: Params) -> Result<Value, ApiError> {
    let cleanup = p.non_empty("cleanup") == Some("true");
    domains::delete(&state, &caller, p.non_empty("id").unwrap_or_default(), cleanup).await?;
    Ok(success())
}

fn role_json(r: Role) -> Value {
    json!({
        "id": r.id(),
        "name": r.name(),
        "type": r.role_type().as_str(),
        "description": r.description(),
        "isdefault": true,
        "ispublic": true,
        "state": "ENABLED",
    })
}

/// `listRoles`: the caller sees the roles of its role type and below (CloudStack's rule for
/// non-admins), an Admin all of them.
async fn list_roles(state: State, caller: Caller, p: Params) -> Result<Value, ApiError> {
    let visible = |r: &Role| match caller.role.role_type() {
        RoleType::Admin => true,
        RoleType::DomainAdmin => matches!(r.role_type(), RoleType::DomainAdmin | RoleType::User),
        RoleType::ResourceAdmin => {
            matches!(
                r.role_type(),
                RoleType::ResourceAdmin | RoleType::DomainAdmin | RoleType::User
            )
        }
        RoleType::User => r.role_type() == RoleType::User,
    };
    let ty = match p.non_empty("type") {
        Some(t) => Some(RoleType::parse(t).ok_or_else(|| {
            ApiError::param(format!(
                "Invalid role type {t:?}: use Admin, ResourceAdmin, DomainAdmin or User"
            ))
        })?),
        None => None,
    };
    let keyword = p.non_empty("keyword").map(str::to_lowercase);
    let all: Vec<Value> = Role::ALL
        .into_iter()
        .filter(visible)
        .filter(|r| p.non_empty("id").is_none_or(|id| id == r.id()))
        .filter(|r| {
            p.non_empty("name")
                .is_none_or(|n| n.eq_ignore_ascii_case(r.name()))
        })
        .filter(|r| ty.is_none_or(|t| t == r.role_type()))
        .filter(|r| {
            keyword
                .as_deref()
                .is_none_or(|k| r.name().to_lowercase().contains(k))
        })
        .map(role_json)
        .collect();
    let total = i64::try_from(all.len()).unwrap_or(i64::MAX);
    let page = Page::from_params(&p, crate::model::settings::page_size(&state).await)?;
    let items = page.slice(all);
    Ok(list_response("role", total, items))
}

/// `listRolePermissions`.
async fn list_role_permissions(_state: State, _caller: Caller, p: Params) -> Result<Value, ApiError> {
    let roles: Vec<Role> = match p.non_empty("roleid") {
        Some(id) => {
            vec![Role::by_id(id).ok_or_else(|| ApiError::param(format!("Unable to find role by id {id}")))?]
        }
        None => Role::ALL.to_vec(),
    };
    let mut items = Vec::new();
    for r in roles {
        let n = Role::ALL.iter().position(|x| *x == r).unwrap_or(0);
        for (i, rule) in r.rules().iter().enumerate() {
            items.push(json!({
                // Stable ids: the role's place and the rule's.
                "id": format!("00000000-0000-4000-8200-{n:06x}{i:06x}"),
                "roleid": r.id(),
                "rolename": r.name(),
                "rule": rule.rule,
                "permission": rule.permission.as_str(),
                "description": rule.description,
            }));
        }
    }
    let total = i64::try_from(items.len()).unwrap_or(i64::MAX);
    Ok(list_response("rolepermission", total, items))
}
